//! A 2-D convolution with bias, square kernel, the same padding on every side; its weights
//! kept as loaded, or quantized to int8 as they load (inside [`super::linear::building_with`]
//! with int8, on CPUs with the int8 kernel).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels::{ConvInput, Int8Conv};
use super::linear::{self, Quantization};
use super::{flops, kernels, precision, GroupNorm};

/// Convolutions with fewer channels than this on either side stay as loaded under int8: the
/// UNet's first and last (4 latent channels), which cost little and touch the latents directly,
/// and the narrow ones of small test models, where quantizing them took the tiny models' images
/// further from f32 (worst mean difference 5.8 against 3.5; every SDXL convolution between has
/// 320 channels or more).
const INT8_MIN_CHANNELS: usize = 32;

#[derive(Debug, Clone)]
enum Weights {
    /// `[out, in, k, k]`, as loaded.
    Dense(Tensor),
    /// Quantized (with its own copy of the bias).
    Int8(Int8Conv),
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    weights: Weights,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        let int8 = if linear::building() == Quantization::Int8 && in_channels.min(out_channels) >= INT8_MIN_CHANNELS {
            Int8Conv::quantize(&weight, &bias, stride, padding)?
        } else {
            None
        };
        let weights = int8.map_or(Weights::Dense(weight), Weights::Int8);
        Ok(Self { weights, bias, stride, padding })
    }

    /// `[out, in, k, k]`.
    fn dims(&self) -> candle_core::Result<(usize, usize, usize, usize)> {
        match &self.weights {
            Weights::Dense(weight) => weight.dims4(),
            Weights::Int8(int8) => {
                let [o, i, k, _] = int8.dims();
                Ok((o, i, k, k))
            }
        }
    }

    /// `[B, Cin, H, W] -> [B, Cout, H', W']`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.count_flops(x, h, w)?;
        match &self.weights {
            Weights::Dense(weight) => {
                kernels::conv2d(x, &precision::widened_for(weight, x)?, &self.bias, self.stride, self.padding)
            }
            Weights::Int8(int8) => int8.forward(x, ConvInput::default(), None),
        }
    }

    /// `self(silu(norm(x)))`, with the normalisation applied as the convolution reads its
    /// input where the kernel allows it, so the normalised tensor is never stored.
    pub fn forward_group_norm_silu(&self, x: &Tensor, norm: &GroupNorm) -> candle_core::Result<Tensor> {
        self.forward_group_norm_silu_plus(x, norm, None)
    }

    /// `residual + self(silu(norm(x)))` (`self(…)` alone without a residual): a ResNet
    /// block's last convolution and skip connection, summed as the output is written where
    /// the kernel allows it, so the sum needs no tensor of its own.
    pub fn forward_group_norm_silu_plus(
        &self,
        x: &Tensor,
        norm: &GroupNorm,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if let Weights::Int8(int8) = &self.weights {
            let (_, _, h, w) = x.dims4()?;
            self.count_flops(x, h, w)?;
            return match norm.channel_affine(x)? {
                Some((scale, shift)) => {
                    let input = ConvInput { affine: Some((&scale, &shift)), upsample: false };
                    int8.forward(x, input, residual)
                }
                None => int8.forward(&norm.forward_silu(x)?, ConvInput::default(), residual),
            };
        }
        if let Some(weight) = self.winograd_weight(x, false, residual) {
            if let Some((scale, shift)) = norm.channel_affine(x)? {
                let (_, _, h, w) = x.dims4()?;
                self.count_flops(x, h, w)?;
                let weight = precision::widened_for(weight, x)?;
                let affine = Some((scale.as_slice(), shift.as_slice()));
                return kernels::winograd_conv2d(x, &weight, &self.bias, self.padding, false, affine, residual);
            }
        }
        let y = self.forward(&norm.forward_silu(x)?)?;
        match residual {
            Some(residual) => residual + y,
            None => Ok(y),
        }
    }

    /// `self(x upsampled 2× by nearest neighbour)`, without storing the upsampled tensor where
    /// the kernel allows it.
    pub fn forward_upsampled(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if let Weights::Int8(int8) = &self.weights {
            self.count_flops(x, 2 * h, 2 * w)?;
            return int8.forward(x, ConvInput { affine: None, upsample: true }, None);
        }
        if let Some(weight) = self.winograd_weight(x, true, None) {
            self.count_flops(x, 2 * h, 2 * w)?;
            let weight = precision::widened_for(weight, x)?;
            return kernels::winograd_conv2d(x, &weight, &self.bias, self.padding, true, None, None);
        }
        self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// The weight for the Winograd kernel, where it takes this convolution.
    fn winograd_weight(&self, x: &Tensor, upsample: bool, residual: Option<&Tensor>) -> Option<&Tensor> {
        // (the weight may be stored narrower; it is widened to x's dtype before the kernel)
        let Weights::Dense(weight) = &self.weights else { return None };
        (self.stride == 1 && kernels::winograd_applies(x, weight, &self.bias, self.padding, upsample, residual))
            .then_some(weight)
    }

    #[cfg(test)]
    fn winograd_applies(&self, x: &Tensor, upsample: bool, residual: Option<&Tensor>) -> bool {
        self.winograd_weight(x, upsample, residual).is_some()
    }

    /// Counts the multiply-adds of convolving `x` seen at `h × w` (see [`flops`]).
    fn count_flops(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<()> {
        let b = x.dim(0)?;
        let (c_out, c_in, k, _) = self.dims()?;
        let out_h = (h + 2 * self.padding - k) / self.stride + 1;
        let out_w = (w + 2 * self.padding - k) / self.stride + 1;
        flops::add(2 * b * c_out * c_in * k * k * out_h * out_w);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i as f32 + 0.5) * 0.7548 + seed as f32 * 1.37).sin()).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn layers(c_in: usize, c_out: usize) -> (Conv2d, GroupNorm) {
        let tensors = [
            ("conv.weight", random(&[c_out, c_in, 3, 3], 1)),
            ("conv.bias", random(&[c_out], 2)),
            ("norm.weight", random(&[c_in], 3)),
            ("norm.bias", random(&[c_in], 4)),
        ]
        .map(|(name, t)| (name.to_string(), t));
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, &Device::Cpu);
        let conv = Conv2d::new(c_in, c_out, 3, 1, 1, vb.pp("conv")).unwrap();
        let norm = GroupNorm::new(4, c_in, 1e-6, vb.pp("norm")).unwrap();
        (conv, norm)
    }

    fn identical(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    // The fused paths must give the very bits of the unfused ones, at sizes that take the
    // Winograd kernel (≥ 64 tiles, with OpenBLAS installed) and at sizes that do not.
    #[test]
    fn fused_group_norm_silu_gives_the_unfused_bits() {
        for (c_in, c_out, h, w) in [(16, 8, 34, 37), (8, 12, 6, 5)] {
            let (conv, norm) = layers(c_in, c_out);
            let x = random(&[2, c_in, h, w], 5).affine(3.0, 0.5).unwrap();
            assert_eq!(
                conv.winograd_applies(&x, false, None),
                h > 8 && kernels::openblas_expected(),
                "the case must test the path it is meant for"
            );
            let fused = conv.forward_group_norm_silu(&x, &norm).unwrap();
            let unfused = conv.forward(&norm.forward_silu(&x).unwrap()).unwrap();
            assert!(identical(&fused, &unfused), "{:?}", (c_in, c_out, h, w));
            let residual = random(unfused.dims(), 6);
            let summed = conv.forward_group_norm_silu_plus(&x, &norm, Some(&residual)).unwrap();
            assert!(identical(&summed, &(&residual + &unfused).unwrap()), "residual {:?}", (c_in, c_out, h, w));
        }
    }

    // Inside an int8 scope the wide convolutions are quantized (on CPUs with the kernel) and
    // stay near the f32 result on every path; the narrow ones, and any built after, are not.
    #[test]
    fn int8_scope_quantizes_the_wide_convolutions() {
        let (c_in, c_out) = (32, 48);
        let (dense, norm) = layers(c_in, c_out);
        let (int8, _) = linear::building_with(Quantization::Int8, || layers(c_in, c_out));
        let (narrow, _) = linear::building_with(Quantization::Int8, || layers(4, 48));
        assert!(matches!(narrow.weights, Weights::Dense(_)));
        assert!(matches!(layers(c_in, c_out).0.weights, Weights::Dense(_)), "the scope must end with the call");
        if !matches!(int8.weights, Weights::Int8(_)) {
            eprintln!("no int8 convolution kernel on this CPU");
            return;
        }
        let error = |a: &Tensor, b: &Tensor| {
            let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            (diff / b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt()
        };
        // (`sin(40 x)` breaks up the smooth made-up values, whose products with the smooth
        // made-up weights cancel to small outputs that magnify the 8-bit error)
        let x = random(&[1, c_in, 12, 10], 5).affine(40.0, 0.0).unwrap().sin().unwrap();
        let residual = random(&[1, c_out, 12, 10], 6);
        let pairs = [
            (int8.forward(&x).unwrap(), dense.forward(&x).unwrap()),
            (
                int8.forward_group_norm_silu_plus(&x, &norm, Some(&residual)).unwrap(),
                dense.forward_group_norm_silu_plus(&x, &norm, Some(&residual)).unwrap(),
            ),
            (int8.forward_upsampled(&x).unwrap(), dense.forward_upsampled(&x).unwrap()),
        ];
        for (i, (ours, exact)) in pairs.iter().enumerate() {
            assert_eq!(ours.dims(), exact.dims());
            let e = error(ours, exact);
            assert!(e > 0.0 && e < 0.02, "path {i}: relative error {e}");
        }
    }

    #[test]
    fn fused_upsampling_gives_the_unfused_bits() {
        for (c_in, c_out, h, w) in [(8, 16, 17, 19), (8, 8, 3, 4)] {
            let (conv, _) = layers(c_in, c_out);
            let x = random(&[2, c_in, h, w], 6);
            assert_eq!(
                conv.winograd_applies(&x, true, None),
                h > 8 && kernels::openblas_expected(),
                "the case must test the path it is meant for"
            );
            let fused = conv.forward_upsampled(&x).unwrap();
            let unfused = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap()).unwrap();
            assert!(identical(&fused, &unfused), "{:?}", (c_in, c_out, h, w));
        }
    }
}
