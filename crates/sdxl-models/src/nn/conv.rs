//! A 2-D convolution with bias, square kernel, the same padding on every side.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{flops, kernels};

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
        let (b, _, h, w) = x.dims4()?;
        let (c_out, c_in, k, _) = self.weight.dims4()?;
        let out_h = (h + 2 * self.padding - k) / self.stride + 1;
        let out_w = (w + 2 * self.padding - k) / self.stride + 1;
        flops::add(2 * b * c_out * c_in * k * k * out_h * out_w);
        kernels::conv2d(x, &self.weight, &self.bias, self.stride, self.padding)
    }
}
