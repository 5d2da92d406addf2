//! Building blocks shared by the UNet and the VAE, ported from diffusers' `models/`:
//! ResNet blocks, attention, the spatial transformer, down- and upsamplers.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod cpu;
pub mod flops;
pub mod group_norm;
pub mod kernels;
pub mod linear;
pub mod precision;
pub mod resnet;
pub mod sampling;
pub mod transformer;

use candle_core::Tensor;
use candle_nn::VarBuilder;

pub use activation::Activation;
pub use conv::Conv2d;
pub use group_norm::GroupNorm;
pub use linear::Linear;

/// A 2-D convolution with bias, `padding` on every side.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    Conv2d::new(in_channels, out_channels, kernel, stride, padding, vb)
}

/// SiLU (`x · sigmoid(x)`), the activation of every diffusers ResNet block.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(x)
}

/// `tensor / scalar` as torch computes it in f32: a true division. (candle's `Tensor / f64`
/// multiplies by the rounded reciprocal, which differs in the last bit; with the cosine
/// schedule's σ ≈ 2·10⁴ that bit shows in the pixels.)
pub fn div_scalar(t: &Tensor, divisor: f32) -> candle_core::Result<Tensor> {
    let divisor = Tensor::new(divisor, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&divisor)
}

#[cfg(test)]
mod tests {
    use super::*;

    // regression: dividing by σ through candle's `Tensor / f64` multiplied by 1/σ, one ulp
    // away from torch's true division, visible in pixels for σ ≈ 2·10⁴.
    #[test]
    fn div_scalar_is_a_true_division() {
        let values: Vec<f32> = (1..2000).map(|i| i as f32 * 0.37).collect();
        let t = Tensor::new(values.as_slice(), &candle_core::Device::Cpu).unwrap();
        let divisor = 20291.3_f32;
        let ours = div_scalar(&t, divisor).unwrap().to_vec1::<f32>().unwrap();
        let exact: Vec<f32> = values.iter().map(|v| v / divisor).collect();
        assert_eq!(ours, exact);
        let reciprocal = (t / f64::from(divisor)).unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(reciprocal, exact, "the reciprocal multiply should differ somewhere, or this test pins nothing");
    }
}
