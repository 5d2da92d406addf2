//! Running a validated request: noise for the (padded) latent grid, the pipeline, and the
//! crop back to the size asked for.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sdxl_models::pipeline::{Generation, Pipeline, Source, StepProgress};
use sdxl_models::pixels::RgbImage;

use crate::images::{resize_rgb, to_gray};
use crate::request::{GenerateRequest, NoiseSource};
use crate::{Error, Result};

/// The size the pipeline runs at: each side rounded up to a multiple of 8 and of the VAE
/// scale factor, so any requested size maps onto a whole latent grid.
pub fn padded_size(pipeline: &Pipeline, width: usize, height: usize) -> (usize, usize) {
    let multiple = pipeline.vae_scale_factor().max(8);
    (width.div_ceil(multiple) * multiple, height.div_ceil(multiple) * multiple)
}

/// The initial noise for `request` at the padded size.
pub fn initial_noise(pipeline: &Pipeline, request: &GenerateRequest) -> Result<Tensor> {
    let (width, height) = padded_size(pipeline, request.width, request.height);
    let shape = pipeline.latent_shape(width, height);
    match &request.noise {
        NoiseSource::Seed(seed) => {
            let values = sdxl_models::noise::randn(*seed, &shape);
            Ok(Tensor::from_vec(values, &shape, &Device::Cpu)?)
        }
        NoiseSource::File(path) => read_noise(path, &shape),
    }
}

/// Reads the f32 tensor `noise` from a safetensors file and checks its shape.
fn read_noise(path: &Path, shape: &[usize; 4]) -> Result<Tensor> {
    let file_error = |message: String| Error::File { path: path.to_path_buf(), message };
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| file_error(e.to_string()))?;
    let noise = tensors.get("noise").ok_or_else(|| file_error("no tensor named `noise`".into()))?;
    if noise.dtype() != DType::F32 {
        return Err(file_error(format!("tensor `noise` is {:?}, expected f32", noise.dtype())));
    }
    if noise.dims() != shape {
        return Err(file_error(format!("tensor `noise` has shape {:?}, expected {shape:?}", noise.dims())));
    }
    Ok(noise.clone())
}

/// Generates the image for `request`, exactly `width × height`. `on_step` runs after every
/// denoising step; answering [`ControlFlow::Break`] stops the run with [`Error::Cancelled`].
pub fn generate(
    pipeline: &Pipeline,
    request: &GenerateRequest,
    on_step: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
) -> Result<RgbImage> {
    let noise = initial_noise(pipeline, request)?;
    let (width, height) = padded_size(pipeline, request.width, request.height);
    // The input image and mask are resized to the generation size (a no-op when they match).
    let resized = match &request.source {
        Some(source) => Some((
            resize_rgb(&source.image, width, height)?,
            source.mask.as_ref().map(|m| resize_rgb(m, width, height).map(|m| to_gray(&m))).transpose()?,
        )),
        None => None,
    };
    let generation = Generation {
        prompt: &request.prompt,
        negative_prompt: request.negative_prompt.as_deref(),
        width,
        height,
        steps: request.steps,
        guidance: request.guidance,
        source: request.source.as_ref().zip(resized.as_ref()).map(|(source, (image, mask))| Source {
            image,
            strength: source.strength,
            mask: mask.as_ref(),
        }),
        sampler: request.sampling.sampler,
        schedule: request.sampling.schedule,
        // a noise file gives no generator: a stochastic sampler's steps then draw from seed 0
        seed: match request.noise {
            NoiseSource::Seed(seed) => seed,
            NoiseSource::File(_) => 0,
        },
    };
    // A GPU runs a step's kernels after the step's call returns; waiting for them before
    // reporting keeps progress and step times true (and costs little: the next step waits anyway).
    let device = pipeline.device().clone();
    let mut on_step = |progress: &StepProgress| {
        // a failed device fails the next step's kernels too, which reports it
        let _ = device.synchronize();
        on_step(progress)
    };
    let image = pipeline.generate(&generation, &noise, &mut on_step)?;
    Ok(crop(&image, request.width, request.height))
}

/// The top-left `width × height` of `image`.
pub fn crop(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if image.width == width && image.height == height {
        return image.clone();
    }
    let pixels = (0..height)
        .flat_map(|y| {
            let start = 3 * y * image.width;
            image.pixels[start..start + 3 * width].iter().copied()
        })
        .collect();
    RgbImage { width, height, pixels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_keeps_the_top_left_pixels() {
        let pixels: Vec<u8> = (0..3 * 4 * 2).map(|v| v as u8).collect();
        let image = RgbImage { width: 4, height: 2, pixels };
        let cropped = crop(&image, 3, 1);
        assert_eq!(cropped.pixels, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!((cropped.width, cropped.height), (3, 1));
    }
}
