//! Building blocks shared by the UNet and the VAE, ported from diffusers' `models/`:
//! ResNet blocks, attention, the spatial transformer, down- and upsamplers.

pub mod attention;
pub mod resnet;
pub mod sampling;
pub mod transformer;

use candle_core::Tensor;
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

/// A 2-D convolution with bias, `padding` on every side.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)
}

/// SiLU (`x · sigmoid(x)`), the activation of every diffusers ResNet block.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::silu(x)
}
