//! Int8 weight matrices for the linear layers (`--quantize int8`), in the format the CPU runs
//! fastest, chosen once per process:
//!
//! - [`vnni`] on AVX-512 VNNI: our kernel, one scale per output channel and per token, run on
//!   AMX tiles ([`amx`]) where the CPU has them (same sums, same results);
//! - [`blocks`] elsewhere: candle's `Q8_0`, one scale per 32 values on both sides.
//!
//! And int8 convolutions ([`Int8Conv`], [`conv`]), on the first format only.

mod amx;
mod blocks;
mod conv;
mod vnni;

pub use conv::{ConvInput, Int8Conv};

use candle_core::{DType, Device, Tensor};

/// A weight matrix `[out, in]` in int8, ready for `x · Wᵀ`.
#[derive(Debug, Clone)]
pub struct Int8Matrix(Format);

#[derive(Debug, Clone)]
enum Format {
    Vnni(vnni::Packed),
    Blocks(blocks::Blocks),
}

impl Int8Matrix {
    /// Quantizes `weight` (`[out, in]`, f32, f16 or bf16, on the CPU); the f32 copy made on the
    /// way lives only for the call.
    pub fn quantize(weight: &Tensor) -> candle_core::Result<Self> {
        if !weight.device().is_cpu() {
            return Err(candle_core::Error::Msg("int8 weights are computed on the CPU only".into()));
        }
        if !vnni::available() {
            return Ok(Self(Format::Blocks(blocks::Blocks::quantize(weight)?)));
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let packed = super::with_data(&weight.to_dtype(DType::F32)?, |w| vnni::Packed::quantize(w, out_dim, in_dim))?;
        Ok(Self(Format::Vnni(packed)))
    }

    /// `(out, in)`, the shape of the matrix it was quantized from.
    pub fn dims(&self) -> (usize, usize) {
        match &self.0 {
            Format::Vnni(packed) => packed.dims(),
            Format::Blocks(blocks) => blocks.dims(),
        }
    }

    /// `x · Wᵀ` for `x` `[rows, in]`: `[rows, out]` in f32.
    pub fn matmul_nt(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.0 {
            Format::Vnni(packed) => {
                let (rows, _) = x.dims2()?;
                let out = super::with_data(&x.to_dtype(DType::F32)?, |x| packed.matmul_nt(x, rows))?;
                Tensor::from_vec(out, (rows, packed.dims().0), &Device::Cpu)
            }
            Format::Blocks(blocks) => blocks.matmul_nt(x),
        }
    }

    /// The f32 matrix the int8 one stands for (`[out, in]`), for tests and error measurements.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        match &self.0 {
            Format::Vnni(packed) => Tensor::from_vec(packed.dequantize(), packed.dims(), &Device::Cpu),
            Format::Blocks(blocks) => blocks.dequantize(),
        }
    }
}

/// Smooth made-up matrices and the error measure that the format tests share.
#[cfg(test)]
mod test_values {
    use candle_core::{Device, Tensor};

    pub fn values(rows: usize, cols: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 * 0.618 + seed).sin() * 1.7).tanh()).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    pub fn relative_error(ours: &Tensor, exact: &Tensor) -> f32 {
        let diff = (ours - exact).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        (diff / exact.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::test_values::{relative_error, values};
    use super::*;

    // Whichever format this CPU chose: near the f32 product, and its dequantized matrix near
    // the weights (8 bits on smooth values: well under 1 %).
    #[test]
    fn the_chosen_format_stays_near_the_f32_product() {
        for (rows, in_dim, out_dim) in [(70, 640, 48), (3, 77, 20)] {
            let x = values(rows, in_dim, 0.3);
            let w = values(out_dim, in_dim, 1.1).to_dtype(DType::F16).unwrap();
            let q = Int8Matrix::quantize(&w).unwrap();
            assert_eq!(q.dims(), (out_dim, in_dim));
            let w = w.to_dtype(DType::F32).unwrap();
            let error = relative_error(&q.matmul_nt(&x).unwrap(), &x.matmul(&w.t().unwrap()).unwrap());
            assert!(error > 0.0 && error < 0.01, "{rows}×{in_dim}×{out_dim}: relative error {error}");
            assert!(relative_error(&q.dequantize().unwrap(), &w) < 0.01);
        }
    }
}
