//! Previews of latents mid-generation. Where the tiny decoder (TAESD-XL) is loaded, the
//! latents decoded by it at full size, as ComfyUI's and A1111's TAESD previews: a fraction of
//! a step's time. Otherwise a fixed linear map from SDXL's four latent channels to RGB, one
//! pixel per latent (1/8 of the image's side): microseconds, no decoder at all.

use candle_core::{DType, Tensor};
use sdxl_models::pipeline::Pipeline;
use sdxl_models::pixels::RgbImage;

use crate::{Error, Result};

/// Latent channel → (R, G, B) weights for SDXL's VAE, fitted by least squares against decoded
/// images (ComfyUI's published factors). Values land roughly in [-1, 1].
const SDXL_LATENT_RGB: [[f32; 3]; 4] =
    [[0.3920, 0.4054, 0.4549], [-0.2634, -0.0196, 0.0653], [0.0568, 0.1687, -0.0755], [-0.3112, -0.2359, -0.2076]];

/// The preview of `latents` for a `width × height` image: by `pipeline`'s tiny decoder where it
/// has one (cropped to the image: the grid may be padded beyond it), else [`latent_preview`].
pub fn preview(pipeline: &Pipeline, latents: &Tensor, width: usize, height: usize) -> Result<RgbImage> {
    match pipeline.tiny_preview(latents) {
        Some(image) => Ok(crate::generate::crop(&image?, width, height)),
        None => latent_preview(latents, pipeline.vae_scale_factor(), width, height),
    }
}

/// The preview of `latents` (`[1, 4, h, w]`, a grid of `scale`-pixel cells) for an image of
/// `width × height` pixels: the cells that cover it (the grid may be padded beyond it), each
/// projected to one RGB pixel.
pub fn latent_preview(latents: &Tensor, scale: usize, width: usize, height: usize) -> Result<RgbImage> {
    let (batch, channels, grid_h, grid_w) = latents.dims4()?;
    if batch != 1 || channels != SDXL_LATENT_RGB.len() || scale == 0 {
        return Err(Error::Internal(format!("no preview for latents of shape {:?}", latents.dims())));
    }
    let (out_w, out_h) = (width.div_ceil(scale).min(grid_w), height.div_ceil(scale).min(grid_h));
    let values = latents.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let plane = grid_h * grid_w;
    let mut pixels = Vec::with_capacity(out_w * out_h * 3);
    for y in 0..out_h {
        for x in 0..out_w {
            let at = y * grid_w + x;
            for rgb in 0..3 {
                let value: f32 = SDXL_LATENT_RGB.iter().enumerate().map(|(c, w)| values[c * plane + at] * w[rgb]).sum();
                pixels.push((((value + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    Ok(RgbImage { width: out_w, height: out_h, pixels })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn each_latent_becomes_one_projected_pixel_cropped_to_the_image() {
        // a 2×3 grid: channel 0 is 1 everywhere, the others 0, except cell (0, 1) which is all 0
        let mut values = vec![0f32; 4 * 6];
        values[..6].copy_from_slice(&[1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        let latents = Tensor::from_vec(values, (1, 4, 2, 3), &Device::Cpu).unwrap();
        // 20 × 9 pixels at scale 8 need 3 × 2 cells; 12 × 9 need 2 × 2
        let full = latent_preview(&latents, 8, 20, 9).unwrap();
        assert_eq!((full.width, full.height), (3, 2));
        let first = |v: f32| ((v + 1.0) / 2.0 * 255.0).round() as u8;
        assert_eq!(&full.pixels[..3], &[first(0.3920), first(0.4054), first(0.4549)]);
        assert_eq!(&full.pixels[3..6], &[128, 128, 128], "zero latents are mid-grey");
        let cropped = latent_preview(&latents, 8, 12, 9).unwrap();
        assert_eq!((cropped.width, cropped.height), (2, 2));
        assert_eq!(&cropped.pixels[6..9], &full.pixels[9..12], "row 1 starts at cell (1, 0)");
    }

    #[test]
    fn other_latent_layouts_are_refused() {
        let latents = Tensor::zeros((1, 16, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(latent_preview(&latents, 8, 16, 16).is_err());
    }
}
