//! The SDXL pipelines, step for step as diffusers runs them:
//! `StableDiffusionXLPipeline` (text to image), `StableDiffusionXLImg2ImgPipeline` and
//! `StableDiffusionXLInpaintPipeline` with a 4-channel UNet
//! (`pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl*.py`).
//!
//! The pipeline takes its noise as an input (a seeded draw or a caller's tensor of shape
//! [`Pipeline::latent_shape`]): the start latents in text-to-image, the noise added to the
//! image latents in img2img and inpainting. The same noise always gives the same pixels.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};

use crate::clip::text_model::ClipTextModel;
use crate::clip::tokenizer::ClipTokenizer;
use crate::nn::div_scalar;
use crate::noise::{NormalFill, TorchGenerator};
use crate::pixels::{GrayImage, RgbImage};
use crate::scheduler::{Sampler, Schedule, ScheduleKind, Scheduler};
use crate::unet::{Conditioning, UNet};
use crate::vae::tiny::TinyDecoder;
use crate::vae::Vae;
use crate::{Error, Result};

/// Which decoder turns the final latents into pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoder {
    /// The model's VAE (pixel-exact with diffusers).
    #[default]
    Vae,
    /// The tiny decoder, TAESD-XL (about 18× fewer FLOPs than the VAE; softer detail).
    Tiny,
}

/// The loaded parts of an SDXL model directory.
pub struct Components {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    pub unet: UNet,
    /// Encodes img2img and inpainting inputs; decodes unless `decoder` says otherwise.
    pub vae: Vae,
    /// TAESD-XL, where loaded: the previews, and the final decode when `decoder` is `Tiny`.
    pub tiny_decoder: Option<TinyDecoder>,
    pub decoder: Decoder,
    pub scheduler: Scheduler,
    /// `force_zeros_for_empty_prompt` from `model_index.json`.
    pub force_zeros_for_empty_prompt: bool,
}

/// One generation. `width`/`height` must be multiples of the VAE scale factor.
#[derive(Debug, Clone)]
pub struct Generation<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// Classifier-free guidance scale; guidance runs only when it is above 1.
    pub guidance: f64,
    /// The image to start from (img2img, inpainting); `None` for text to image.
    pub source: Option<Source<'a>>,
    pub sampler: Sampler,
    /// The schedule: the scheduler config's, Karras sigmas or a timestep spacing.
    pub schedule: ScheduleKind,
    /// A stochastic sampler's per-step noise continues a CPU torch generator seeded with this
    /// after the initial latents' draw, as diffusers' pipelines draw from their generator.
    pub seed: u64,
}

/// The input image of img2img and inpainting, already at the generation size.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub image: &'a RgbImage,
    /// How much of the schedule runs: the last `min(int(steps · strength), steps)` steps.
    pub strength: f64,
    /// Inpainting mask (white = repaint), at the generation size.
    pub mask: Option<&'a GrayImage>,
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

/// What the denoising loop starts from and, for inpainting, re-imposes after each step.
struct Start {
    latents: Tensor,
    inpaint: Option<Inpaint>,
}

/// Inpainting state: the clean image latents, the latent-grid mask and the noise.
struct Inpaint {
    image_latents: Tensor,
    mask: Tensor,
    noise: Tensor,
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

    /// This pipeline with `tiny` as its tiny decoder, decoding with `decoder`.
    pub fn with_tiny_decoder(mut self, tiny: TinyDecoder, decoder: Decoder) -> Self {
        self.parts.tiny_decoder = Some(tiny);
        self.parts.decoder = decoder;
        self
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loaded components.
    pub fn components(&self) -> &Components {
        &self.parts
    }

    /// Pixels per latent cell along each axis.
    pub fn vae_scale_factor(&self) -> usize {
        self.parts.vae.config().scale_factor()
    }

    /// Shape of the noise for an image of `width × height`: `[1, C, H/f, W/f]`.
    pub fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [1, self.parts.unet.config().in_channels, height / f, width / f]
    }

    /// Generates one image from `noise` (standard normal, [`Self::latent_shape`]).
    /// `on_step` is called after every denoising step; answering [`ControlFlow::Break`]
    /// stops the run, which then returns [`Error::Cancelled`] without decoding.
    pub fn generate(
        &self,
        request: &Generation,
        noise: &Tensor,
        on_step: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<RgbImage> {
        self.check(request, noise)?;
        let guided = request.guidance > 1.0;

        // 1. encode the prompt (and the negative prompt under guidance)
        let text = self.encode_prompt(request.prompt, request.negative_prompt, guided)?;
        // 2. timesteps and sigmas, cut to the last int(steps · strength) for an input image
        let mut schedule = self.parts.scheduler.schedule_for(request.steps, request.sampler, request.schedule)?;
        if let Some(source) = &request.source {
            schedule = schedule.from_strength(request.steps, source.strength)?;
        }
        // 3. start latents
        let noise = noise.to_dtype(DType::F32)?.to_device(&self.device)?;
        let start = self.start_latents(request.source.as_ref(), &noise, &schedule)?;
        // 4. size conditioning: (original size, crop top-left, target size)
        let (h, w) = (request.height as f32, request.width as f32);
        let time_ids = vec![[h, w, 0.0, 0.0, h, w]; if guided { 2 } else { 1 }];
        // 5. denoise
        let mut generator = request.sampler.is_stochastic().then(|| {
            let mut generator = TorchGenerator::new(request.seed);
            generator.randn(noise.elem_count(), NormalFill::default()); // the initial latents
            generator
        });
        let device = self.device.clone();
        let mut step_noise = |shape: &[usize]| -> Result<Tensor> {
            let generator = generator
                .as_mut()
                .ok_or_else(|| Error::InvalidArgument("a deterministic sampler drew noise".into()))?;
            let values = generator.randn(shape.iter().product(), NormalFill::default());
            Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(&device)?)
        };
        let steps = Steps { text: &text, time_ids: &time_ids, guidance: request.guidance };
        let latents = self.denoise(start, &schedule, &steps, &mut step_noise, on_step)?;
        // 6. decode
        self.decode(&latents)
    }

    fn check(&self, request: &Generation, noise: &Tensor) -> Result<()> {
        let f = self.vae_scale_factor();
        let (width, height) = (request.width, request.height);
        if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            return Err(Error::InvalidArgument(format!(
                "width and height must be positive multiples of {f}, got {width}x{height}"
            )));
        }
        let shape = self.latent_shape(width, height);
        if noise.dims() != shape {
            return Err(Error::InvalidArgument(format!("noise has shape {:?}, expected {shape:?}", noise.dims())));
        }
        if let Some(source) = &request.source {
            if (source.image.width, source.image.height) != (width, height) {
                return Err(Error::InvalidArgument(format!(
                    "the input image is {}x{}, the generation {width}x{height}",
                    source.image.width, source.image.height
                )));
            }
            if let Some(mask) = source.mask {
                if (mask.width, mask.height) != (width, height) {
                    return Err(Error::InvalidArgument(format!(
                        "the mask is {}x{}, the generation {width}x{height}",
                        mask.width, mask.height
                    )));
                }
            }
        }
        Ok(())
    }

    /// `prepare_latents` of the three pipelines.
    fn start_latents(&self, source: Option<&Source>, noise: &Tensor, schedule: &Schedule) -> Result<Start> {
        let Some(source) = source else {
            // text to image: noise · init_noise_sigma
            return Ok(Start { latents: (noise * f64::from(schedule.init_noise_sigma))?, inpaint: None });
        };
        let image_latents = self.encode_image(source.image)?;
        let Some(mask) = source.mask else {
            // img2img: add_noise(image_latents, noise, first timestep)
            return Ok(Start { latents: schedule.add_noise(&image_latents, noise, 0)?, inpaint: None });
        };
        // inpainting: strength 1 starts from pure noise, otherwise from the noised image
        let latents = if source.strength == 1.0 {
            (noise * f64::from(schedule.init_noise_sigma))?
        } else {
            schedule.add_noise(&image_latents, noise, 0)?
        };
        // mask → latent grid with nearest-neighbour, as F.interpolate(mask, size=(h, w))
        let (_, _, h, w) = image_latents.dims4()?;
        let mask = mask.to_mask(&self.device)?.upsample_nearest2d(h, w)?;
        Ok(Start { latents, inpaint: Some(Inpaint { image_latents, mask, noise: noise.clone() }) })
    }

    /// `scaling_factor · mean(encoder(image))`, `[1, L, H/f, W/f]`.
    fn encode_image(&self, image: &RgbImage) -> Result<Tensor> {
        let pixels = image.to_tensor(&self.device)?;
        let mean = self.parts.vae.encode_mean(&pixels)?;
        Ok((mean * self.parts.vae.config().scaling_factor)?)
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
            None if self.parts.force_zeros_for_empty_prompt => {
                PromptEmbeddings { context: positive.context.zeros_like()?, pooled: positive.pooled.zeros_like()? }
            }
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
        let context =
            Tensor::cat(&[&first.penultimate.to_dtype(DType::F32)?, &second.penultimate.to_dtype(DType::F32)?], 2)?;
        Ok(PromptEmbeddings { context, pooled: pooled.to_dtype(DType::F32)? })
    }

    /// The denoising loop from start latents to final latents.
    fn denoise(
        &self,
        start: Start,
        schedule: &Schedule,
        steps: &Steps,
        step_noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
        on_step: &mut dyn FnMut(&StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor> {
        let Steps { text, time_ids, guidance } = *steps;
        let guided = time_ids.len() == 2;
        let total = schedule.timesteps.len();
        let cond = Conditioning { context: &text.context, text_embeds: &text.pooled, time_ids };
        let mut latents = start.latents;
        let mut stepper = schedule.stepper();
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
            latents = stepper.step(&prediction, i, &latents, step_noise)?;
            if let Some(inpaint) = &start.inpaint {
                latents = inpaint.keep_unmasked(&latents, schedule, i)?;
            }
            if on_step(&StepProgress { step: i + 1, total, latents: &latents }).is_break() {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }

    /// `latents / scaling_factor`, decode (by the VAE, or the tiny decoder where chosen), then
    /// 8-bit RGB as diffusers rounds it.
    pub fn decode(&self, latents: &Tensor) -> Result<RgbImage> {
        match (self.parts.decoder, &self.parts.tiny_decoder) {
            (Decoder::Vae, _) => {
                let scaled = div_scalar(&latents.to_dtype(DType::F32)?, self.parts.vae.config().scaling_factor as f32)?;
                RgbImage::from_tensor(&self.parts.vae.decode(&scaled)?)
            }
            (Decoder::Tiny, Some(tiny)) => tiny_decode(tiny, latents),
            (Decoder::Tiny, None) => Err(Error::InvalidArgument("the tiny decoder is chosen but not loaded".into())),
        }
    }

    /// The latents mid-generation decoded by the tiny decoder, where one is loaded (a
    /// fraction of a step's time; `None` without one).
    pub fn tiny_preview(&self, latents: &Tensor) -> Option<Result<RgbImage>> {
        self.parts.tiny_decoder.as_ref().map(|tiny| tiny_decode(tiny, latents))
    }
}

/// diffusers' decode with an `AutoencoderTiny` as the pipeline's VAE: `latents /
/// scaling_factor` (1 for TAESD-XL), decode, 8-bit RGB.
fn tiny_decode(tiny: &TinyDecoder, latents: &Tensor) -> Result<RgbImage> {
    let scaled = div_scalar(&latents.to_dtype(DType::F32)?, tiny.config().scaling_factor as f32)?;
    RgbImage::from_tensor(&tiny.decode(&scaled)?)
}

/// What every denoising step is conditioned on.
#[derive(Clone, Copy)]
struct Steps<'a> {
    text: &'a PromptEmbeddings,
    time_ids: &'a [[f32; 6]],
    guidance: f64,
}

impl Inpaint {
    /// After step `i`: outside the mask, the image latents noised to the next timestep (or
    /// clean after the last step); inside, the denoised latents.
    /// `latents = (1 - mask) · init_latents_proper + mask · latents`
    fn keep_unmasked(&self, latents: &Tensor, schedule: &Schedule, i: usize) -> Result<Tensor> {
        let proper = if i + 1 < schedule.timesteps.len() {
            schedule.add_noise(&self.image_latents, &self.noise, i + 1)?
        } else {
            self.image_latents.clone()
        };
        let keep = (1.0 - &self.mask)?;
        Ok((proper.broadcast_mul(&keep)? + self.mask.broadcast_mul(latents)?)?)
    }
}
