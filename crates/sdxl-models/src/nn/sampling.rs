//! diffusers' `Downsample2D` and `Upsample2D` (`models/downsampling.py`, `models/upsampling.py`)
//! in their conv variants.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::Conv2d;

use super::conv2d;

/// 3×3 convolution with stride 2. With `padding` 0, diffusers first pads one row and column
/// at the bottom and right (`F.pad(x, (0, 1, 0, 1))`), as the VAE encoder does.
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize, padding: usize) -> candle_core::Result<Self> {
        Ok(Self { conv: conv2d(channels, out_channels, 3, 2, padding, vb.pp("conv"))?, pad_bottom_right: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_bottom_right {
            // [B,C,H,W] -> [B,C,H+1,W+1]
            let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(x)
        }
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
        if (th, tw) == (2 * h, 2 * w) {
            return self.conv.forward_upsampled(x);
        }
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::*;

    // regression: `downsample_padding: 0` convolved without diffusers' bottom/right pad,
    // shrinking 12 → 5 instead of 6 (the upsampler then hid it by resizing to the skip).
    #[test]
    fn padding_zero_pads_bottom_right_like_diffusers() {
        let vb = VarBuilder::from_tensors(
            [
                ("conv.weight".to_string(), Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap()),
                ("conv.bias".to_string(), Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap()),
            ]
            .into(),
            DType::F32,
            &Device::Cpu,
        );
        let down = Downsample2D::new(vb, 1, 1, 0).unwrap();
        let x = Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let y = down.forward(&x).unwrap();
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        // windows at rows/cols {0,1,2} and {2,3,pad}: 9 ones, 6 ones, 6 ones, 4 ones
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![9.0, 6.0, 6.0, 4.0]);
    }
}
