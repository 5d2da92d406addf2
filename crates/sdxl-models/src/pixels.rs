//! 8-bit images in and out of the pipeline, converted exactly as diffusers' `VaeImageProcessor`
//! converts them: RGB bytes to `[-1, 1]` (`2·(v/255) − 1` in f32), masks binarised at 0.5,
//! and decoded tensors back to bytes with `round_half_even(clamp(x/2 + 0.5, 0, 1) · 255)`.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, `3 · width · height` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// An 8-bit single-channel image (an inpainting mask: white = repaint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!("{what} holds {len} bytes, its size needs {expected}")))
    }
}

impl RgbImage {
    /// `[1, 3, H, W]` in [-1, 1]: `np.array(img).astype(float32) / 255`, then `2x − 1`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        check_len("image", self.pixels.len(), 3 * self.width * self.height)?;
        let values: Vec<f32> = self.pixels.iter().map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0).collect();
        // [H,W,3] -> [1,3,H,W]
        let hwc = Tensor::from_vec(values, (self.height, self.width, 3), device)?;
        Ok(hwc.permute((2, 0, 1))?.contiguous()?.unsqueeze(0)?)
    }

    /// Interleaved 8-bit RGB from a `[1,3,H,W]` tensor in [-1, 1].
    pub fn from_tensor(image: &Tensor) -> Result<Self> {
        let (batch, channels, height, width) = image.dims4()?;
        if batch != 1 || channels != 3 {
            return Err(Error::InvalidArgument(format!("expected a [1,3,H,W] image, got {:?}", image.dims())));
        }
        // [1,3,H,W] -> [H,W,3]
        let hwc = image.squeeze(0)?.permute((1, 2, 0))?.contiguous()?;
        let values = hwc.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let pixels =
            values.into_iter().map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
        Ok(Self { width, height, pixels })
    }
}

impl GrayImage {
    /// `[1, 1, H, W]` of 0 and 1: `v/255 >= 0.5` (that is, `v >= 128`) repaints.
    pub fn to_mask(&self, device: &Device) -> Result<Tensor> {
        check_len("mask", self.pixels.len(), self.width * self.height)?;
        let values: Vec<f32> =
            self.pixels.iter().map(|&v| if f32::from(v) / 255.0 >= 0.5 { 1.0 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(values, (1, 1, self.height, self.width), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_binarises_at_half() {
        let mask = GrayImage { width: 4, height: 1, pixels: vec![0, 127, 128, 255] };
        let t = mask.to_mask(&Device::Cpu).unwrap();
        assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn rgb_round_trips() {
        let image = RgbImage { width: 2, height: 1, pixels: vec![0, 128, 255, 10, 20, 30] };
        let t = image.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), [1, 3, 1, 2]);
        assert_eq!(RgbImage::from_tensor(&t).unwrap(), image);
    }

    #[test]
    fn wrong_buffer_length_is_an_error() {
        let image = RgbImage { width: 2, height: 2, pixels: vec![0; 5] };
        assert!(image.to_tensor(&Device::Cpu).is_err());
    }
}
