//! `sdxl bench`: timings of the full-size SDXL architecture with made-up weights (speed does
//! not depend on weight values, so nothing is downloaded).
//!
//! Each measurement runs `warmups` times untimed (one by default), then `runs` times; it reports the median wall time,
//! the achieved GFLOP/s (the FLOPs the matrix products counted, see
//! [`sdxl_models::nn::flops`], over the median time) and the peak resident memory of the
//! process during the measured runs (weights included).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdxl_models::nn::flops;
use sdxl_models::pipeline::{Decoder, Generation, Pipeline};
use sdxl_models::scheduler::Sampler;
use sdxl_models::unet::{Conditioning, UNet};
use sdxl_models::weights::ComponentWeights;

use crate::model::Overrides;

use crate::{Error, Result};

/// What a measurement times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    /// Both text encoders on one prompt.
    TextEncoders,
    /// One UNet evaluation on one latent.
    UnetStep,
    /// One UNet evaluation on the two latents of classifier-free guidance.
    UnetStepCfg,
    /// The decoder the pipeline decodes with: the VAE, or the tiny one.
    VaeDecode,
    VaeEncode,
    /// A whole 4-step image: text encoders, four UNet steps, decode (the VAE's or the tiny one).
    Image4Step,
}

impl Component {
    pub const ALL: [Component; 6] =
        [Self::TextEncoders, Self::UnetStep, Self::UnetStepCfg, Self::VaeDecode, Self::VaeEncode, Self::Image4Step];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::TextEncoders => "text_encoders",
            Self::UnetStep => "unet_step",
            Self::UnetStepCfg => "unet_step_cfg",
            Self::VaeDecode => "vae_decode",
            Self::VaeEncode => "vae_encode",
            Self::Image4Step => "image_4step",
        }
    }

    /// Whether the work depends on the image size.
    pub fn has_resolution(self) -> bool {
        self != Self::TextEncoders
    }
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub component: &'static str,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Square image side in pixels; `None` for the text encoders.
    pub resolution: Option<usize>,
    pub median_s: f64,
    pub gflops: f64,
    pub peak_rss_mb: f64,
    pub runs: usize,
    /// For a quantized UNet step: the relative L2 error of its output against the f32 UNet
    /// with the same made-up weights and inputs ([`unet_step_error`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rel_error: Option<f64>,
}

/// The full-size SDXL base architecture (as single-file checkpoints are read), or the one the
/// diffusers directory `description` gives, with made-up weights, computing in `dtype`, its
/// weights kept and its decoder chosen as `options` say.
pub fn random_sdxl(description: Option<&Path>, options: &Overrides, dtype: DType, device: &Device) -> Result<Pipeline> {
    crate::model::random(description, options, dtype, device)
}

/// The relative L2 error `‖ours − f32‖ / ‖f32‖` of one UNet step of `pipeline` (quantized)
/// against the f32 UNet of the same architecture and made-up weights, on the same inputs:
/// `pipeline`'s prompt embeddings and one latent of noise at `resolution`. The f32 UNet is
/// built for the comparison and dropped before this returns.
pub fn unet_step_error(pipeline: &Pipeline, description: Option<&Path>, resolution: usize) -> Result<f64> {
    let builtin;
    let dir = match description {
        Some(dir) => dir,
        None => {
            builtin = crate::builtin::sdxl_base_description()?;
            builtin.path()
        }
    };
    let device = pipeline.device();
    let text = pipeline.encode_prompt(PROMPT, None, false)?;
    let size = resolution as f32;
    let time_ids = vec![[size, size, 0.0, 0.0, size, size]];
    let [_, c, h, w] = pipeline.latent_shape(resolution, resolution);
    let sample = Tensor::randn(0f32, 1f32, (1, c, h, w), device)?;
    let cond = Conditioning { context: &text.context, text_embeds: &text.pooled, time_ids: &time_ids };
    let ours = pipeline.components().unet.forward(&sample, 999.0, &cond)?.to_dtype(DType::F32)?;
    let exact = {
        let unet = UNet::load_from(&dir.join("unet"), &ComponentWeights::random(), DType::F32, device)?;
        unet.forward(&sample, 999.0, &cond)?
    };
    let squared = |t: &Tensor| -> Result<f64> { Ok(f64::from(t.sqr()?.sum_all()?.to_scalar::<f32>()?)) };
    Ok((squared(&(&ours - &exact)?)? / squared(&exact)?).sqrt())
}

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon, detailed, 35mm";

/// Times `component` at `resolution` (ignored for the text encoders).
pub fn measure(
    pipeline: &Pipeline,
    component: Component,
    resolution: usize,
    warmups: usize,
    runs: usize,
) -> Result<Measurement> {
    let device = pipeline.device().clone();
    let f = pipeline.vae_scale_factor();
    if resolution == 0 || !resolution.is_multiple_of(f) {
        return Err(Error::InvalidRequest(format!("resolution must be a positive multiple of {f}, got {resolution}")));
    }
    let parts = pipeline.components();
    let latent = |batch: usize| -> Result<Tensor> {
        let [_, c, h, w] = pipeline.latent_shape(resolution, resolution);
        Ok(Tensor::randn(0f32, 1f32, (batch, c, h, w), &device)?)
    };
    let mut work: Box<dyn FnMut() -> Result<()>> = match component {
        Component::TextEncoders => {
            Box::new(|| pipeline.encode_prompt(PROMPT, None, false).map(drop).map_err(Error::from))
        }
        Component::UnetStep | Component::UnetStepCfg => {
            let guided = component == Component::UnetStepCfg;
            let text = pipeline.encode_prompt(PROMPT, None, guided)?;
            let batch = if guided { 2 } else { 1 };
            let size = resolution as f32;
            let time_ids = vec![[size, size, 0.0, 0.0, size, size]; batch];
            let sample = latent(batch)?;
            Box::new(move || {
                let cond = Conditioning { context: &text.context, text_embeds: &text.pooled, time_ids: &time_ids };
                parts.unet.forward(&sample, 999.0, &cond).map(drop).map_err(Error::from)
            })
        }
        Component::VaeDecode => {
            let latents = latent(1)?;
            Box::new(move || {
                match (parts.decoder, &parts.tiny_decoder) {
                    (Decoder::Tiny, Some(tiny)) => tiny.decode(&latents),
                    _ => parts.vae.decode(&latents),
                }
                .map(drop)
                .map_err(Error::from)
            })
        }
        Component::VaeEncode => {
            let image = Tensor::rand(-1f32, 1f32, (1, 3, resolution, resolution), &device)?;
            Box::new(move || parts.vae.encode_mean(&image).map(drop).map_err(Error::from))
        }
        Component::Image4Step => {
            let noise = latent(1)?;
            Box::new(move || {
                let request = Generation {
                    prompt: PROMPT,
                    negative_prompt: None,
                    width: resolution,
                    height: resolution,
                    steps: 4,
                    guidance: 0.0,
                    source: None,
                    sampler: Sampler::Euler,
                    schedule: Default::default(),
                    seed: 0,
                };
                pipeline
                    .generate(&request, &noise, &mut |_| std::ops::ControlFlow::Continue(()))
                    .map(drop)
                    .map_err(Error::from)
            })
        }
    };
    // A GPU runs the queued kernels after the call returns: a run ends when the device is idle.
    let mut run = || -> Result<()> {
        work()?;
        Ok(device.synchronize()?)
    };
    for _ in 0..warmups {
        run()?; // first-touch allocations, thread pools, kernel loading
    }
    reset_peak_rss();
    flops::take();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let flops_per_run = flops::take() as f64 / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    Ok(Measurement {
        component: component.name(),
        device: crate::model::device_name(&device),
        resolution: component.has_resolution().then_some(resolution),
        median_s,
        gflops: flops_per_run / median_s / 1e9,
        peak_rss_mb: peak_rss_bytes() as f64 / 1e6,
        runs: times.len(),
        rel_error: None,
    })
}

/// Resets the kernel's high-water mark of resident memory to the current size (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory since start or the last reset (`VmHWM`; 0 if unknown).
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
