//! The SDXL text-to-image pipeline, step for step as diffusers' `StableDiffusionXLPipeline`
//! (`pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`) runs it.
//!
//! The pipeline takes its initial noise as an input (a seeded draw or a caller's tensor of
//! shape [`Pipeline::latent_shape`]), so the same noise always gives the same pixels.

use candle_core::{DType, Device, Tensor};

use crate::clip::text_model::ClipTextModel;
use crate::clip::tokenizer::ClipTokenizer;
use crate::nn::div_scalar;
use crate::scheduler::{EulerDiscrete, Schedule};
use crate::unet::{Conditioning, UNet};
use crate::vae::Vae;
use crate::{Error, Result};

/// The loaded parts of an SDXL model directory.
pub struct Components {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    pub unet: UNet,
    pub vae: Vae,
    pub scheduler: EulerDiscrete,
    /// `force_zeros_for_empty_prompt` from `model_index.json`.
    pub force_zeros_for_empty_prompt: bool,
}

/// One text-to-image generation. `width`/`height` must be multiples of the VAE scale factor.
#[derive(Debug, Clone)]
pub struct Txt2Img<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs only when it is above 1.
    pub guidance: f64,
}

/// An 8-bit RGB image, rows top to bottom, `3 · width · height` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Reported after every denoising step.
pub struct StepProgress<'a> {
    /// Steps done, 1-based.
    pub step: usize,
    pub total: usize,
    /// The latents after this step, `[1, C, h, w]` (for previews and debugging).
    pub latents: &'a Tensor,
}

/// Text conditioning for the UNet, batch order `[negative, positive]` under guidance.
pub struct PromptEmbeddings {
    /// `[B, L, C1 + C2]`
    pub context: Tensor,
    /// `[B, P]`
    pub pooled: Tensor,
}

/// Loaded SDXL, ready to generate.
pub struct Pipeline {
    parts: Components,
    device: Device,
}

impl Pipeline {
    pub fn new(parts: Components, device: &Device) -> Self {
        Self { parts, device: device.clone() }
    }

    /// The loaded components.
    pub fn components(&self) -> &Components {
        &self.parts
    }

    /// Pixels per latent cell along each axis.
    pub fn vae_scale_factor(&self) -> usize {
        self.parts.vae.config().scale_factor()
    }

    /// Shape of the initial noise for an image of `width × height`: `[1, C, H/f, W/f]`.
    pub fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [1, self.parts.unet.config().in_channels, height / f, width / f]
    }

    /// Generates one image from `noise` (standard normal, [`Self::latent_shape`]).
    /// `on_step` is called after every denoising step.
    pub fn txt2img(&self, request: &Txt2Img, noise: &Tensor, on_step: &mut dyn FnMut(&StepProgress)) -> Result<RgbImage> {
        let f = self.vae_scale_factor();
        if request.width == 0 || request.height == 0 || !request.width.is_multiple_of(f) || !request.height.is_multiple_of(f) {
            return Err(Error::InvalidArgument(format!(
                "width and height must be positive multiples of {f}, got {}x{}",
                request.width, request.height
            )));
        }
        let shape = self.latent_shape(request.width, request.height);
        if noise.dims() != shape {
            return Err(Error::InvalidArgument(format!("noise has shape {:?}, expected {shape:?}", noise.dims())));
        }
        let guided = request.guidance > 1.0;

        // 1. encode the prompt (and the negative prompt under guidance)
        let text = self.encode_prompt(request.prompt, request.negative_prompt, guided)?;
        // 2. timesteps and sigmas
        let schedule = self.parts.scheduler.schedule(request.steps)?;
        // 3. initial latents: noise · init_noise_sigma
        let latents = (noise.to_dtype(DType::F32)?.to_device(&self.device)? * f64::from(schedule.init_noise_sigma))?;
        // 4. size conditioning: (original size, crop top-left, target size)
        let (h, w) = (request.height as f32, request.width as f32);
        let time_ids = vec![[h, w, 0.0, 0.0, h, w]; if guided { 2 } else { 1 }];
        // 5. denoise
        let latents = self.denoise(latents, &schedule, &text, &time_ids, request.guidance, on_step)?;
        // 6. decode
        self.decode(&latents)
    }

    /// `encode_prompt`: penultimate states of both encoders side by side, encoder 2's pooled
    /// vector. Under guidance the negative comes first; with no negative prompt and
    /// `force_zeros_for_empty_prompt` it is all zeros.
    pub fn encode_prompt(&self, prompt: &str, negative_prompt: Option<&str>, guided: bool) -> Result<PromptEmbeddings> {
        let positive = self.encode_text(prompt)?;
        if !guided {
            return Ok(positive);
        }
        let negative = match negative_prompt {
            None if self.parts.force_zeros_for_empty_prompt => PromptEmbeddings {
                context: positive.context.zeros_like()?,
                pooled: positive.pooled.zeros_like()?,
            },
            other => self.encode_text(other.unwrap_or(""))?,
        };
        Ok(PromptEmbeddings {
            context: Tensor::cat(&[&negative.context, &positive.context], 0)?,
            pooled: Tensor::cat(&[&negative.pooled, &positive.pooled], 0)?,
        })
    }

    fn encode_text(&self, text: &str) -> Result<PromptEmbeddings> {
        let p = &self.parts;
        let ids_1 = p.tokenizer.encode(text)?;
        let ids_2 = p.tokenizer_2.encode(text)?;
        if ids_1.len() != ids_2.len() {
            return Err(Error::InvalidArgument(format!(
                "the tokenizers disagree on the sequence length ({} vs {})",
                ids_1.len(),
                ids_2.len()
            )));
        }
        let first = p.text_encoder.forward(&[ids_1])?;
        let second = p.text_encoder_2.forward(&[ids_2])?;
        let pooled = second.pooled.ok_or_else(|| Error::InvalidArgument("text_encoder_2 has no projection".into()))?;
        // [1,L,C1] ++ [1,L,C2] -> [1,L,C1+C2]
        let context = Tensor::cat(&[&first.penultimate.to_dtype(DType::F32)?, &second.penultimate.to_dtype(DType::F32)?], 2)?;
        Ok(PromptEmbeddings { context, pooled: pooled.to_dtype(DType::F32)? })
    }

    /// The denoising loop from initial latents to final latents.
    fn denoise(
        &self,
        mut latents: Tensor,
        schedule: &Schedule,
        text: &PromptEmbeddings,
        time_ids: &[[f32; 6]],
        guidance: f64,
        on_step: &mut dyn FnMut(&StepProgress),
    ) -> Result<Tensor> {
        let guided = time_ids.len() == 2;
        let total = schedule.timesteps.len();
        let cond = Conditioning { context: &text.context, text_embeds: &text.pooled, time_ids };
        for (i, &t) in schedule.timesteps.iter().enumerate() {
            let input = if guided { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = schedule.scale_model_input(&input, i)?;
            let mut prediction = self.parts.unet.forward(&input, t, &cond)?;
            if guided {
                // uncond + g · (text - uncond)
                let uncond = prediction.narrow(0, 0, 1)?;
                let cond_pred = prediction.narrow(0, 1, 1)?;
                prediction = (&uncond + ((cond_pred - &uncond)? * guidance)?)?;
            }
            latents = schedule.step(&prediction, i, &latents)?;
            on_step(&StepProgress { step: i + 1, total, latents: &latents });
        }
        Ok(latents)
    }

    /// `latents / scaling_factor`, VAE decode, then `round(clamp(x/2 + 0.5, 0, 1) · 255)` with
    /// ties to even, as diffusers' image processor and numpy compute it in f32.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        let scaled = div_scalar(&latents.to_dtype(DType::F32)?, self.parts.vae.config().scaling_factor as f32)?;
        let image = self.parts.vae.decode(&scaled)?;
        to_rgb8(&image)
    }
}

/// `[1,3,H,W]` in [-1, 1] → interleaved 8-bit RGB.
pub fn to_rgb8(image: &Tensor) -> Result<RgbImage> {
    let (batch, channels, height, width) = image.dims4()?;
    if batch != 1 || channels != 3 {
        return Err(Error::InvalidArgument(format!("expected a [1,3,H,W] image, got {:?}", image.dims())));
    }
    // [1,3,H,W] -> [H,W,3]
    let hwc = image.squeeze(0)?.permute((1, 2, 0))?.contiguous()?;
    let values = hwc.flatten_all()?.to_vec1::<f32>()?;
    let pixels = values
        .into_iter()
        .map(|x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect();
    Ok(RgbImage { width, height, pixels })
}
