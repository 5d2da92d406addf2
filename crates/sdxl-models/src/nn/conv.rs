//! A 2-D convolution with bias, square kernel, the same padding on every side.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{flops, kernels, precision, GroupNorm};

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[out, in, k, k]`
    weight: Tensor,
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
        Ok(Self { weight, bias, stride, padding })
    }

    /// `[B, Cin, H, W] -> [B, Cout, H', W']`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.count_flops(x, h, w)?;
        kernels::conv2d(x, &precision::widened_for(&self.weight, x)?, &self.bias, self.stride, self.padding)
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
        if self.winograd_applies(x, false, residual) {
            if let Some((scale, shift)) = norm.channel_affine(x)? {
                let (_, _, h, w) = x.dims4()?;
                self.count_flops(x, h, w)?;
                let weight = precision::widened_for(&self.weight, x)?;
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
        if self.winograd_applies(x, true, None) {
            self.count_flops(x, 2 * h, 2 * w)?;
            let weight = precision::widened_for(&self.weight, x)?;
            return kernels::winograd_conv2d(x, &weight, &self.bias, self.padding, true, None, None);
        }
        self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    fn winograd_applies(&self, x: &Tensor, upsample: bool, residual: Option<&Tensor>) -> bool {
        // (the weight may be stored narrower; it is widened to x's dtype before the kernel)
        self.stride == 1 && kernels::winograd_applies(x, &self.weight, &self.bias, self.padding, upsample, residual)
    }

    /// Counts the multiply-adds of convolving `x` seen at `h × w` (see [`flops`]).
    fn count_flops(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<()> {
        let b = x.dim(0)?;
        let (c_out, c_in, k, _) = self.weight.dims4()?;
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
