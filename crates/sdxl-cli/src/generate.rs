//! `sdxl generate`: one image from the command line.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use sdxl_engine::{GenerateRequest, Limits, NoiseSource, RawRequest, Sampling};
use sdxl_models::pipeline::{Pipeline, StepProgress};

use crate::model_args::ModelArgs;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a directory in the diffusers layout (model_index.json, unet/, vae/, ...) or a
    /// single-file checkpoint (.safetensors in the original SGM / ComfyUI layout).
    #[arg(long)]
    model: PathBuf,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (used when --guidance is above 1).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image width in pixels (8-4096); default: the input image's width, else 1024.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (8-4096); default: the input image's height, else 1024.
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps (1-100); 4 suits the 4-step SDXL-Lightning UNet.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Classifier-free guidance scale (0-30); guidance runs only above 1. Lightning uses 0.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    guidance: f64,
    /// Seed of the initial noise, as torch.Generator("cpu").manual_seed(SEED); random if absent.
    #[arg(long, conflicts_with = "noise")]
    seed: Option<u64>,
    /// Noise: a safetensors file with one f32 tensor `noise` of shape [1, C, H/f, W/f]
    /// (C latent channels, f the VAE scale factor: [1, 4, H/8, W/8] for SDXL). With --image it
    /// is the noise added to the image latents. A stochastic sampler's per-step noise then
    /// comes from a generator seeded with 0.
    #[arg(long)]
    noise: Option<PathBuf>,
    /// The sampler, as the diffusers scheduler class of that name computes it: euler
    /// (EulerDiscreteScheduler) or euler_a (EulerAncestralDiscreteScheduler, whose per-step
    /// noise continues the seed's generator).
    #[arg(long, default_value = "euler")]
    sampler: String,
    /// The timestep spacing: model (the scheduler config's), leading, linspace or trailing.
    #[arg(long, default_value = "model")]
    schedule: String,
    /// Input image (PNG, JPEG or WebP) for img2img, or for inpainting with --mask; resized
    /// to the output size with a Lanczos filter when its size differs.
    #[arg(long)]
    image: Option<PathBuf>,
    /// How much of the schedule runs on the input image (0-1, default 1): the last
    /// int(steps x strength) steps.
    #[arg(long, allow_negative_numbers = true)]
    strength: Option<f64>,
    /// Inpainting mask (white = repaint, black = keep); needs --image.
    #[arg(long)]
    mask: Option<PathBuf>,
    #[command(flatten)]
    model_args: ModelArgs,
    /// Where to write the PNG.
    #[arg(long)]
    output: PathBuf,
    /// Write a preview of the latents after each step to DIR/step-NN.png (a linear projection,
    /// one pixel per 8×8 block; made without the VAE, so it costs next to nothing).
    #[arg(long, value_name = "DIR")]
    previews: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let noise = match (&args.noise, args.seed) {
        (Some(path), _) => NoiseSource::File(path.clone()),
        (None, Some(seed)) => NoiseSource::Seed(seed),
        (None, None) => NoiseSource::Seed(sdxl_engine::request::random_seed()),
    };
    let request = GenerateRequest::parse(
        RawRequest {
            prompt: args.prompt,
            negative_prompt: args.negative_prompt,
            width: args.width,
            height: args.height,
            steps: args.steps,
            guidance: args.guidance,
            noise,
            image: args.image.as_deref().map(read_input).transpose()?,
            mask: args.mask.as_deref().map(read_input).transpose()?,
            strength: args.strength,
            sampling: Sampling::parse(Some(&args.sampler), Some(&args.schedule))?,
        },
        &Limits::CLI,
    )?;
    if let Some(dir) = &args.previews {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let pipeline = args.model_args.load(&args.model)?;
    // indicatif draws only when stderr is a terminal, so scripts and tests see no bar
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} step {pos}/{len} {msg} elapsed {elapsed} eta {eta}")
            .expect("progress template is valid"),
    );
    let start = Instant::now();
    let mut step_times = Vec::new();
    let mut preview_error = None;
    let image = sdxl_engine::generate::generate(&pipeline, &request, &mut |progress| {
        step_times.push(start.elapsed() - step_times.iter().sum::<Duration>());
        bar.set_length(progress.total as u64);
        bar.set_position(progress.step as u64);
        bar.set_message(format!("{:.2} s/step", step_times.last().map_or(0.0, Duration::as_secs_f64)));
        if let Some(dir) = &args.previews {
            let written = write_preview(dir, &pipeline, &request, progress);
            if let Err(e) = written {
                preview_error = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    });
    bar.finish_and_clear();
    if let Some(e) = preview_error {
        return Err(e);
    }
    let image = image?;
    eprintln!("{}", timing_summary(&step_times, start.elapsed()));
    let name = crate::model_args::model_name(&args.model, args.model_args.unet.as_deref());
    let parameters = sdxl_engine::png::parameters_text(&request, &name);
    let png = sdxl_engine::png::encode_with_parameters(&image, &parameters)?;
    std::fs::write(&args.output, png).with_context(|| format!("cannot write {}", args.output.display()))?;
    if let NoiseSource::Seed(seed) = request.noise {
        eprintln!("seed {seed}");
    }
    Ok(())
}

/// The preview of the latents after `progress.step`, as DIR/step-NN.png.
fn write_preview(
    dir: &Path,
    pipeline: &Pipeline,
    request: &GenerateRequest,
    progress: &StepProgress,
) -> anyhow::Result<()> {
    let preview = sdxl_engine::preview::preview(pipeline, progress.latents, request.width, request.height)?;
    let path = dir.join(format!("step-{:02}.png", progress.step));
    std::fs::write(&path, sdxl_engine::png::encode(&preview)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `4 steps in 4.52 s (1.05 1.01 0.99 1.00 s/step), decoding 0.47 s`: where the time went.
fn timing_summary(step_times: &[Duration], total: Duration) -> String {
    let steps: Duration = step_times.iter().sum();
    let each: Vec<String> = step_times.iter().map(|t| format!("{:.2}", t.as_secs_f64())).collect();
    format!(
        "{} steps in {:.2} s ({} s/step), decoding {:.2} s",
        step_times.len(),
        steps.as_secs_f64(),
        each.join(" "),
        total.saturating_sub(steps).as_secs_f64()
    )
}

fn read_input(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
