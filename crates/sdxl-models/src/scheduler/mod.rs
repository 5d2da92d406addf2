//! diffusers' schedulers (`schedulers/scheduling_*.py`), each built from the model's
//! `scheduler_config.json` as `SchedulerClass.from_config(config)` builds it, with the
//! precisions diffusers uses: betas and cumulative products in f32 tensors (the product
//! accumulated in f64, as torch does on the CPU), timestep grids in numpy's f64, sigma
//! interpolation in f64, stored sigmas and step coefficients in f32.
//!
//! [`Scheduler`] is the training schedule; [`Scheduler::schedule_for`] is `set_timesteps` for
//! one generation ([`Schedule`]); [`Stepper`] carries a generation's multistep state.

mod grid;
mod step;

pub use step::Stepper;

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::config::read_json;
use crate::nn::div_scalar;
use crate::{Error, Result};

/// `scheduler/scheduler_config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "linear")]
    pub beta_schedule: String,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default = "linspace")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "linear")]
    pub interpolation_type: String,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "zero")]
    pub final_sigmas_type: String,
    #[serde(default = "discrete")]
    pub timestep_type: String,
    /// Keys of other scheduler classes that `from_config` carries over when present; absent,
    /// each class's own default applies.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub thresholding: Option<bool>,
    #[serde(default)]
    pub sigma_min: Option<f64>,
    #[serde(default)]
    pub sigma_max: Option<f64>,
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.0001
}
fn beta_end() -> f64 {
    0.02
}
fn linear() -> String {
    "linear".into()
}
fn epsilon() -> String {
    "epsilon".into()
}
fn linspace() -> String {
    "linspace".into()
}
fn zero() -> String {
    "zero".into()
}
fn discrete() -> String {
    "discrete".into()
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The added noise ε.
    Epsilon,
    /// The clean sample x₀ (SDXL-Lightning's 1-step UNet).
    Sample,
    /// v = α·ε − σ·x₀.
    VPrediction,
}

/// Where the timesteps of a generation sit on the training schedule (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

impl Spacing {
    pub const ALL: [Spacing; 3] = [Spacing::Leading, Spacing::Linspace, Spacing::Trailing];

    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Linspace => "linspace",
            Spacing::Trailing => "trailing",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A generation's schedule: the model's, Karras sigmas, or a timestep spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScheduleKind {
    /// The scheduler config's spacing (and its `use_karras_sigmas`).
    #[default]
    Model,
    /// `use_karras_sigmas=True`.
    Karras,
    /// `timestep_spacing=…`.
    Spacing(Spacing),
}

impl ScheduleKind {
    pub const ALL: [ScheduleKind; 5] = [
        ScheduleKind::Model,
        ScheduleKind::Karras,
        ScheduleKind::Spacing(Spacing::Leading),
        ScheduleKind::Spacing(Spacing::Linspace),
        ScheduleKind::Spacing(Spacing::Trailing),
    ];

    /// The name requests use.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Model => "model",
            ScheduleKind::Karras => "karras",
            ScheduleKind::Spacing(spacing) => spacing.name(),
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// AUTOMATIC1111's "Schedule type" for it (`None` for the model's own).
    pub fn label(self) -> Option<&'static str> {
        match self {
            ScheduleKind::Model => None,
            ScheduleKind::Karras => Some("Karras"),
            ScheduleKind::Spacing(Spacing::Trailing) => Some("SGM Uniform"),
            ScheduleKind::Spacing(spacing) => Some(spacing.name()),
        }
    }
}

/// How a denoising step moves the sample, as a diffusers scheduler class does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// `EulerDiscreteScheduler` (deterministic).
    #[default]
    Euler,
    /// `EulerAncestralDiscreteScheduler`: an Euler step to `σ_down`, then noise of `σ_up`.
    EulerAncestral,
    /// `HeunDiscreteScheduler`: two UNet calls a step (one for the last).
    Heun,
    /// `DPMSolverMultistepScheduler`, `dpmsolver++`, order 2, midpoint.
    DpmPp2M,
    /// The same with `algorithm_type="sde-dpmsolver++"`: fresh noise every step.
    DpmPp2MSde,
    /// `DDIMScheduler` with the pipelines' `eta = 0`.
    Ddim,
    /// `UniPCMultistepScheduler`: bh2, order 2, predicting x₀, corrector on.
    UniPc,
    /// `LCMScheduler`: fresh noise every step but the last.
    Lcm,
}

impl Sampler {
    pub const ALL: [Sampler; 8] = [
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::Heun,
        Sampler::DpmPp2M,
        Sampler::DpmPp2MSde,
        Sampler::Ddim,
        Sampler::UniPc,
        Sampler::Lcm,
    ];

    /// The name requests use.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_a",
            Sampler::Heun => "heun",
            Sampler::DpmPp2M => "dpmpp_2m",
            Sampler::DpmPp2MSde => "dpmpp_2m_sde",
            Sampler::Ddim => "ddim",
            Sampler::UniPc => "unipc",
            Sampler::Lcm => "lcm",
        }
    }

    /// Its name in AUTOMATIC1111 and the tools that follow it.
    pub fn label(self) -> &'static str {
        match self {
            Sampler::Euler => "Euler",
            Sampler::EulerAncestral => "Euler a",
            Sampler::Heun => "Heun",
            Sampler::DpmPp2M => "DPM++ 2M",
            Sampler::DpmPp2MSde => "DPM++ 2M SDE",
            Sampler::Ddim => "DDIM",
            Sampler::UniPc => "UniPC",
            Sampler::Lcm => "LCM",
        }
    }

    /// The diffusers class it reproduces.
    pub fn class_name(self) -> &'static str {
        match self {
            Sampler::Euler => "EulerDiscreteScheduler",
            Sampler::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Sampler::Heun => "HeunDiscreteScheduler",
            Sampler::DpmPp2M | Sampler::DpmPp2MSde => "DPMSolverMultistepScheduler",
            Sampler::Ddim => "DDIMScheduler",
            Sampler::UniPc => "UniPCMultistepScheduler",
            Sampler::Lcm => "LCMScheduler",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether its steps draw noise.
    pub fn is_stochastic(self) -> bool {
        matches!(self, Sampler::EulerAncestral | Sampler::DpmPp2MSde | Sampler::Lcm)
    }

    /// Whether its class has `use_karras_sigmas`.
    pub fn has_karras(self) -> bool {
        matches!(self, Sampler::Euler | Sampler::Heun | Sampler::DpmPp2M | Sampler::DpmPp2MSde | Sampler::UniPc)
    }

    /// Whether its class reads `timestep_spacing` (LCM lays its own grid out).
    pub fn has_spacing(self) -> bool {
        self != Sampler::Lcm
    }

    /// Whether diffusers offers this sampler with `kind`.
    pub fn supports(self, kind: ScheduleKind) -> bool {
        match kind {
            ScheduleKind::Model => true,
            ScheduleKind::Karras => self.has_karras(),
            ScheduleKind::Spacing(_) => self.has_spacing(),
        }
    }

    /// UNet calls per step before the last (`order` of the class, as the pipelines use it).
    fn order(self) -> usize {
        if self == Sampler::Heun {
            2
        } else {
            1
        }
    }
}

/// The model's training schedule, ready for any sampler.
#[derive(Debug, Clone)]
pub struct Scheduler {
    /// ᾱ for every training timestep, in f32.
    alphas_cumprod: Vec<f32>,
    /// `sqrt((1 - ᾱ) / ᾱ)` for every training timestep, in f32.
    train_sigmas: Vec<f32>,
    spacing: Spacing,
    steps_offset: usize,
    prediction: Prediction,
    karras: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    clip_sample: Option<bool>,
    clip_sample_range: f32,
    set_alpha_to_one: Option<bool>,
    lcm_original_steps: usize,
    lcm_timestep_scaling: f32,
}

/// How a class adds noise to a clean sample and what its `step` needs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NoiseSpace {
    /// Euler, Euler ancestral, Heun: `x + σ·n`, inputs scaled by `1/sqrt(σ² + 1)`.
    Sigma,
    /// DPM-Solver, UniPC: `α·x + σ·n` with `α = 1/sqrt(σ² + 1)`.
    AlphaSigma,
    /// DDIM, LCM: `sqrt(ᾱ_t)·x + sqrt(1 - ᾱ_t)·n`, indexed by the (integer) timestep.
    AlphaBar {
        alphas_cumprod: Vec<f32>,
        /// ᾱ "before" timestep 0 (`set_alpha_to_one`).
        final_alpha_cumprod: f32,
    },
}

/// The schedule for one generation: `timesteps[i]` with `sigmas[i]`, one entry per UNet call,
/// plus a final sigma.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub timesteps: Vec<f32>,
    /// One longer than `timesteps`; the last entry is 0.
    pub sigmas: Vec<f32>,
    /// The scale of the initial noise.
    pub init_noise_sigma: f32,
    pub prediction: Prediction,
    pub sampler: Sampler,
    /// `num_inference_steps` of the whole schedule (before an img2img strength cuts it).
    steps: usize,
    space: NoiseSpace,
    /// `clip_sample_range` where the class clips x₀.
    clip: Option<f32>,
    /// LCM's `timestep_scaling`.
    timestep_scaling: f32,
}

impl Scheduler {
    /// Reads and validates `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: SchedulerConfig = read_json(path)?;
        Self::new(&config).map_err(|message| Error::config(path, message))
    }

    /// Builds the schedule; the error message names the config key.
    pub fn new(cfg: &SchedulerConfig) -> std::result::Result<Self, String> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| Err(format!("unsupported `{key}` = {value:?}"));
        let spacing = match Spacing::parse(&cfg.timestep_spacing) {
            Some(spacing) => spacing,
            None => return unsupported("timestep_spacing", &cfg.timestep_spacing),
        };
        let prediction = match cfg.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "sample" | "original_sample" => Prediction::Sample,
            "v_prediction" => Prediction::VPrediction,
            other => return unsupported("prediction_type", &other),
        };
        if cfg.interpolation_type != "linear" {
            return unsupported("interpolation_type", &cfg.interpolation_type);
        }
        if cfg.use_exponential_sigmas || cfg.use_beta_sigmas {
            return Err("exponential and beta sigmas are not supported".into());
        }
        if cfg.rescale_betas_zero_snr {
            return unsupported("rescale_betas_zero_snr", &true);
        }
        if cfg.final_sigmas_type != "zero" {
            return unsupported("final_sigmas_type", &cfg.final_sigmas_type);
        }
        if cfg.timestep_type != "discrete" {
            return unsupported("timestep_type", &cfg.timestep_type);
        }
        if cfg.thresholding == Some(true) {
            return unsupported("thresholding", &true);
        }
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err("`num_train_timesteps` must be at least 2".into());
        }
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) if b.len() == n => b.iter().map(|&x| x as f32).collect(),
            (Some(_), _) => return Err("`trained_betas` must have `num_train_timesteps` entries".into()),
            (None, "linear") => grid::torch_linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n),
            (None, "scaled_linear") => {
                grid::torch_linspace_f32(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, "squaredcos_cap_v2") => grid::cosine_betas(n),
            (None, other) => return unsupported("beta_schedule", &other),
        };
        // alphas_cumprod = cumprod(1 - betas): f32 values, f64 accumulator
        let mut product = 1f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&beta| {
                product *= f64::from(1.0f32 - beta);
                product as f32
            })
            .collect();
        let train_sigmas = alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let lcm_original_steps = cfg.original_inference_steps.unwrap_or(50);
        if lcm_original_steps == 0 || lcm_original_steps > n {
            return Err(format!("`original_inference_steps` must be between 1 and {n}"));
        }
        Ok(Self {
            alphas_cumprod,
            train_sigmas,
            spacing,
            steps_offset: cfg.steps_offset,
            prediction,
            karras: cfg.use_karras_sigmas,
            sigma_min: cfg.sigma_min,
            sigma_max: cfg.sigma_max,
            clip_sample: cfg.clip_sample,
            clip_sample_range: cfg.clip_sample_range.unwrap_or(1.0) as f32,
            set_alpha_to_one: cfg.set_alpha_to_one,
            lcm_original_steps,
            lcm_timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0) as f32,
        })
    }

    /// What the UNet predicts under this config.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// `set_timesteps(steps)`: the timestep grid and its sigmas, Euler's step.
    pub fn schedule(&self, steps: usize) -> Result<Schedule> {
        self.schedule_for(steps, Sampler::Euler, ScheduleKind::Model)
    }

    /// `SchedulerClass.from_config(config, …).set_timesteps(steps)` for `sampler`'s class,
    /// with `kind`'s `use_karras_sigmas` or `timestep_spacing`.
    pub fn schedule_for(&self, steps: usize, sampler: Sampler, kind: ScheduleKind) -> Result<Schedule> {
        let n = self.train_sigmas.len();
        if steps == 0 || steps > n {
            return Err(Error::InvalidArgument(format!("`steps` must be between 1 and {n}, got {steps}")));
        }
        if !sampler.supports(kind) {
            return Err(Error::InvalidArgument(unsupported_pair(sampler, kind)));
        }
        if sampler == Sampler::EulerAncestral && self.prediction == Prediction::Sample {
            return Err(Error::InvalidArgument(
                "the euler_a sampler does not take a model that predicts the sample (diffusers' neither)".into(),
            ));
        }
        let spacing = match kind {
            ScheduleKind::Spacing(spacing) => spacing,
            ScheduleKind::Model | ScheduleKind::Karras => self.spacing,
        };
        let karras = sampler.has_karras() && (kind == ScheduleKind::Karras || self.karras);
        let mut schedule = match sampler {
            Sampler::Euler | Sampler::EulerAncestral | Sampler::Heun => self.sigma_schedule(steps, spacing, karras),
            Sampler::DpmPp2M | Sampler::DpmPp2MSde | Sampler::UniPc => self.multistep_schedule(steps, spacing, karras),
            Sampler::Ddim => {
                let timesteps = grid::timesteps(grid::GridStyle::Ddim, spacing, n, steps, self.steps_offset);
                self.alpha_bar_schedule(timesteps, self.clip_sample.unwrap_or(true))
            }
            Sampler::Lcm => self.lcm_schedule(steps)?,
        };
        schedule.sampler = sampler;
        schedule.steps = steps;
        if sampler == Sampler::Heun {
            // each step but the first runs twice: t0, t1, t1, t2, t2, …; σ0, σ1, σ1, …, 0
            let (t, s) = (&schedule.timesteps, &schedule.sigmas);
            let timesteps = std::iter::once(t[0]).chain(t[1..].iter().flat_map(|&x| [x, x])).collect();
            let last = s.len() - 1;
            let sigmas =
                std::iter::once(s[0]).chain(s[1..last].iter().flat_map(|&x| [x, x])).chain([s[last]]).collect();
            schedule.timesteps = timesteps;
            schedule.sigmas = sigmas;
            schedule.clip = self.clip_sample.unwrap_or(false).then_some(self.clip_sample_range);
        }
        Ok(schedule)
    }

    /// Euler's grid (also Euler ancestral's and Heun's), Karras sigmas from its own sigmas.
    fn sigma_schedule(&self, steps: usize, spacing: Spacing, karras: bool) -> Schedule {
        let n = self.train_sigmas.len();
        let mut timesteps = grid::timesteps(grid::GridStyle::Euler, spacing, n, steps, self.steps_offset);
        let sigmas64: Vec<f64> = timesteps.iter().map(|&t| grid::interp(f64::from(t), &self.train_sigmas)).collect();
        let mut sigmas: Vec<f32> = if karras {
            let min = self.sigma_min.unwrap_or(sigmas64[steps - 1]);
            let max = self.sigma_max.unwrap_or(sigmas64[0]);
            let karras = grid::karras(min, max, steps);
            let logs = self.log_sigmas();
            timesteps = karras.iter().map(|&s| grid::sigma_to_t(s, &logs) as f32).collect();
            karras.into_iter().map(|s| s as f32).collect()
        } else {
            sigmas64.into_iter().map(|s| s as f32).collect()
        };
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        self.schedule_of(timesteps, sigmas, init_noise_sigma, NoiseSpace::Sigma)
    }

    /// DPM-Solver's and UniPC's grid: integer timesteps, Karras sigmas from the training range.
    fn multistep_schedule(&self, steps: usize, spacing: Spacing, karras: bool) -> Schedule {
        let n = self.train_sigmas.len();
        let (timesteps, mut sigmas) = if karras {
            let min = self.sigma_min.unwrap_or(f64::from(self.train_sigmas[0]));
            let max = self.sigma_max.unwrap_or(f64::from(self.train_sigmas[n - 1]));
            let karras = grid::karras(min, max, steps);
            let logs = self.log_sigmas();
            let timesteps = karras.iter().map(|&s| grid::sigma_to_t(s, &logs).round_ties_even() as f32).collect();
            (timesteps, karras.into_iter().map(|s| s as f32).collect::<Vec<_>>())
        } else {
            let timesteps = grid::timesteps(grid::GridStyle::Multistep, spacing, n, steps, self.steps_offset);
            let sigmas = timesteps.iter().map(|&t| grid::interp(f64::from(t), &self.train_sigmas) as f32).collect();
            (timesteps, sigmas)
        };
        sigmas.push(0.0);
        self.schedule_of(timesteps, sigmas, 1.0, NoiseSpace::AlphaSigma)
    }

    /// `LCMScheduler.set_timesteps`: `steps` of the distilled grid of `original_inference_steps`.
    fn lcm_schedule(&self, steps: usize) -> Result<Schedule> {
        let n = self.train_sigmas.len();
        let original = self.lcm_original_steps;
        if steps > original {
            return Err(Error::InvalidArgument(format!(
                "`steps` must be at most the scheduler's `original_inference_steps` ({original}) for the lcm sampler, got {steps}"
            )));
        }
        let k = n / original;
        // lcm_origin_timesteps reversed, then floor(linspace(0, len, steps, endpoint=False))
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps =
            (0..steps).map(|i| origin[(i as f64 * (original as f64 / steps as f64)).floor() as usize] as f32).collect();
        let mut schedule = self.alpha_bar_schedule(timesteps, self.clip_sample.unwrap_or(false));
        schedule.timestep_scaling = self.lcm_timestep_scaling;
        Ok(schedule)
    }

    /// DDIM's and LCM's schedule: noise levels from ᾱ at integer timesteps.
    fn alpha_bar_schedule(&self, timesteps: Vec<f32>, clip: bool) -> Schedule {
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| self.train_sigmas[t as usize]).collect();
        sigmas.push(0.0);
        let final_alpha_cumprod = if self.set_alpha_to_one.unwrap_or(true) { 1.0 } else { self.alphas_cumprod[0] };
        let space = NoiseSpace::AlphaBar { alphas_cumprod: self.alphas_cumprod.clone(), final_alpha_cumprod };
        let mut schedule = self.schedule_of(timesteps, sigmas, 1.0, space);
        schedule.clip = clip.then_some(self.clip_sample_range);
        schedule
    }

    fn schedule_of(&self, timesteps: Vec<f32>, sigmas: Vec<f32>, init_noise_sigma: f32, space: NoiseSpace) -> Schedule {
        Schedule {
            steps: timesteps.len(),
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: self.prediction,
            sampler: Sampler::Euler,
            space,
            clip: None,
            timestep_scaling: 0.0,
        }
    }

    /// `np.log` of the f32 training sigmas, in f32.
    fn log_sigmas(&self) -> Vec<f32> {
        self.train_sigmas.iter().map(|s| s.ln()).collect()
    }
}

/// The error for a sampler and schedule diffusers does not pair.
pub fn unsupported_pair(sampler: Sampler, kind: ScheduleKind) -> String {
    let why = match kind {
        ScheduleKind::Karras => "has no `use_karras_sigmas`",
        _ => "takes no `timestep_spacing`",
    };
    format!(
        "the sampler `{}` does not take the schedule `{}`: diffusers' {} {why}",
        sampler.name(),
        kind.name(),
        sampler.class_name()
    )
}

impl Schedule {
    /// `get_timesteps(steps, strength)` of the img2img and inpaint pipelines: only the last
    /// `min(int(steps · strength), steps)` steps run (diffusers' `set_begin_index`, at
    /// `t_start · order` UNet calls); `init_noise_sigma` stays that of the full schedule.
    pub fn from_strength(mut self, steps: usize, strength: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::InvalidArgument(format!("`strength` must be between 0 and 1, got {strength}")));
        }
        let run = ((steps as f64 * strength) as usize).min(steps);
        if run < 1 {
            return Err(Error::InvalidArgument(format!(
                "`steps` × `strength` must give at least one step: int({steps} × {strength}) = 0"
            )));
        }
        let start = (steps - run) * self.sampler.order();
        self.timesteps.drain(..start);
        self.sigmas.drain(..start);
        Ok(self)
    }

    /// A fresh stepping state for one pass over this schedule.
    pub fn stepper(&self) -> Stepper<'_> {
        Stepper::new(self)
    }

    /// `scale_model_input` at UNet call `i`: `sample / sqrt(σᵢ² + 1)` for the classes that
    /// scale, the sample itself for the rest.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        if self.space != NoiseSpace::Sigma {
            return Ok(sample.clone());
        }
        let sigma = self.sigmas[i];
        Ok(div_scalar(sample, (sigma * sigma + 1.0).sqrt())?)
    }

    /// `add_noise` at call `i` (the step index diffusers' schedulers keep, or the timestep
    /// `timesteps[i]` for DDIM and LCM).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        match &self.space {
            NoiseSpace::Sigma => Ok((original + (noise * f64::from(self.sigmas[i]))?)?),
            NoiseSpace::AlphaSigma => {
                let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
                Ok(((original * f64::from(alpha))? + (noise * f64::from(sigma))?)?)
            }
            NoiseSpace::AlphaBar { alphas_cumprod, .. } => {
                let alpha_bar = alphas_cumprod[self.timesteps[i] as usize];
                let (a, b) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
                Ok(((original * f64::from(a))? + (noise * f64::from(b))?)?)
            }
        }
    }
}

/// `_sigma_to_alpha_sigma_t`: `α = 1/sqrt(σ² + 1)`, `σ_t = σ·α`, in f32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}
