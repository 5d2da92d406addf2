//! diffusers' `Downsample2D` and `Upsample2D` (`models/downsampling.py`, `models/upsampling.py`)
//! in their conv variants.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, VarBuilder};

use super::conv2d;

/// 3×3 convolution with stride 2: `[B,C,H,W] -> [B,C,⌈H/2⌉,⌈W/2⌉]` (with padding 1).
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize, padding: usize) -> candle_core::Result<Self> {
        Ok(Self { conv: conv2d(channels, out_channels, 3, 2, padding, vb.pp("conv"))? })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour upsampling (×2, or to an explicit size), then a 3×3 convolution.
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> candle_core::Result<Self> {
        Ok(Self { conv: conv2d(channels, out_channels, 3, 1, 1, vb.pp("conv"))? })
    }

    /// `size`: the (H, W) to reach; `None` doubles. The UNet passes its skip connection's size
    /// so odd sizes come back exactly (diffusers' `upsample_size`).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
