//! Int8 products on candle's quantized CPU matmul in its `Q8_0` format (CPUs without
//! AVX-512 VNNI): weights in blocks of 32 along the input dimension, each
//! block 32 int8 values and one f16 scale (1.06 bytes a weight); activations quantized the
//! same way, per 32 values of each token, as the product runs; int32 sums of each block
//! scaled back to f32. That is finer than one scale per output channel and per token, so it
//! loses less.
//!
//! Measured at the UNet's shapes on a 2-core Zen 3 (AVX2, no VNNI) against the f32 sgemm:
//! 0.40–0.52× of its time where the input dimension is a multiple of 256, and 4.4× *slower*
//! where it is not (candle's vectorised dot product only runs on whole groups of 256 there).
//! So the input dimension is padded with zero weights up to a multiple of 256 (640 → 768: 20%
//! more arithmetic, still half the f32 time), and the activations with zeros to match.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

/// The input-dimension multiple on which candle's `Q8_0` product is fast.
const FAST_MULTIPLE: usize = 256;

/// A weight matrix `[out, in]` in int8, ready for `x · Wᵀ`.
#[derive(Debug, Clone)]
pub struct Blocks {
    matmul: QMatMul,
    in_dim: usize,
    padded_in: usize,
    out_dim: usize,
}

impl Blocks {
    /// Quantizes `weight` (`[out, in]`, f32, f16 or bf16, on the CPU); the f32 copy made on the
    /// way lives only for the call.
    pub fn quantize(weight: &Tensor) -> candle_core::Result<Self> {
        if !weight.device().is_cpu() {
            return Err(candle_core::Error::Msg("int8 weights are computed on the CPU only".into()));
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let padded_in = in_dim.div_ceil(FAST_MULTIPLE) * FAST_MULTIPLE;
        let weight = weight.to_dtype(DType::F32)?;
        let weight = if padded_in > in_dim { weight.pad_with_zeros(1, 0, padded_in - in_dim)? } else { weight };
        let quantized = QTensor::quantize(&weight.contiguous()?, GgmlDType::Q8_0)?;
        Ok(Self { matmul: QMatMul::from_qtensor(quantized)?, in_dim, padded_in, out_dim })
    }

    /// `(out, in)`, the shape of the matrix it was quantized from.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_dim, self.in_dim)
    }

    /// `x · Wᵀ` for `x` `[rows, in]` in f32: `[rows, out]` in f32.
    pub fn matmul_nt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = if self.padded_in > self.in_dim { x.pad_with_zeros(1, 0, self.padded_in - self.in_dim)? } else { x };
        self.matmul.forward(&x.contiguous()?)
    }

    /// The f32 matrix the int8 one stands for (`[out, in]`), for tests and error measurements.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        let full = match &self.matmul {
            QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
        };
        full.narrow(1, 0, self.in_dim)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{relative_error, values};
    use super::*;

    #[test]
    fn padded_and_unpadded_widths_match_the_f32_product() {
        // 640 is padded to 768, 512 is not; 70 rows are not a multiple of any tile
        for (rows, in_dim, out_dim) in [(70, 640, 48), (70, 512, 40), (1, 320, 16)] {
            let x = values(rows, in_dim, 0.3);
            let w = values(out_dim, in_dim, 1.1);
            let q = Blocks::quantize(&w).unwrap();
            assert_eq!(q.dims(), (out_dim, in_dim));
            let ours = q.matmul_nt(&x).unwrap();
            assert_eq!(ours.dims(), &[rows, out_dim]);
            let exact = x.matmul(&w.t().unwrap()).unwrap();
            let error = relative_error(&ours, &exact);
            // 8-bit blocks of 32 on both sides: well under 1% on smooth values
            assert!(error < 0.01, "{rows}×{in_dim}×{out_dim}: relative error {error}");
            assert!(error > 0.0, "an int8 product should not be exact on these values");
            // the dequantized matrix is the one quantization chose
            let back = q.dequantize().unwrap();
            assert_eq!(back.dims(), w.dims());
            assert!(relative_error(&back, &w) < 0.01);
        }
    }

    #[test]
    fn half_precision_weights_quantize_like_their_f32_values() {
        let w = values(32, 256, 2.0).to_dtype(DType::F16).unwrap();
        let from_half = Blocks::quantize(&w).unwrap().dequantize().unwrap();
        let from_f32 = Blocks::quantize(&w.to_dtype(DType::F32).unwrap()).unwrap().dequantize().unwrap();
        assert_eq!(from_half.to_vec2::<f32>().unwrap(), from_f32.to_vec2::<f32>().unwrap());
    }
}
