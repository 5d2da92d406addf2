//! diffusers' `EulerDiscreteScheduler` (`schedulers/scheduling_euler_discrete.py`), reproduced
//! with the same precisions diffusers uses: betas and cumulative products in f32 tensors
//! (the product accumulated in f64, as torch does on the CPU), timestep grids in numpy's
//! f64 then f32, sigma interpolation in f64, stored sigmas in f32. The same schedule drives
//! `EulerAncestralDiscreteScheduler`, whose step adds fresh noise ([`Sampler`]).

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

/// How a denoising step moves the sample, as a diffusers scheduler class does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampler {
    /// `EulerDiscreteScheduler` (deterministic).
    #[default]
    Euler,
    /// `EulerAncestralDiscreteScheduler`: an Euler step to `σ_down`, then noise of `σ_up`.
    EulerAncestral,
}

impl Sampler {
    pub const ALL: [Sampler; 2] = [Sampler::Euler, Sampler::EulerAncestral];

    /// The name requests use.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler_a",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether its steps draw noise.
    pub fn is_stochastic(self) -> bool {
        matches!(self, Sampler::EulerAncestral)
    }
}

/// The Euler scheduler's immutable training schedule.
#[derive(Debug, Clone)]
pub struct EulerDiscrete {
    /// `sqrt((1 - ᾱ) / ᾱ)` for every training timestep, in f32.
    train_sigmas: Vec<f32>,
    spacing: Spacing,
    steps_offset: usize,
    prediction: Prediction,
}

/// The schedule for one generation: `timesteps[i]` with `sigmas[i]`, plus a final sigma 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub timesteps: Vec<f32>,
    /// One longer than `timesteps`; the last entry is 0.
    pub sigmas: Vec<f32>,
    /// The scale of the initial noise.
    pub init_noise_sigma: f32,
    pub prediction: Prediction,
    pub sampler: Sampler,
}

impl EulerDiscrete {
    /// Reads and validates `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: SchedulerConfig = read_json(path)?;
        Self::new(&config).map_err(|message| Error::config(path, message))
    }

    /// Builds the schedule; the error message names the config key.
    pub fn new(cfg: &SchedulerConfig) -> std::result::Result<Self, String> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| Err(format!("unsupported `{key}` = {value:?}"));
        let spacing = match cfg.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            "trailing" => Spacing::Trailing,
            other => return unsupported("timestep_spacing", &other),
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
        if cfg.use_karras_sigmas || cfg.use_exponential_sigmas || cfg.use_beta_sigmas {
            return Err("karras, exponential and beta sigmas are not supported".into());
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
        let n = cfg.num_train_timesteps;
        if n < 2 {
            return Err("`num_train_timesteps` must be at least 2".into());
        }
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule.as_str()) {
            (Some(b), _) if b.len() == n => b.iter().map(|&x| x as f32).collect(),
            (Some(_), _) => return Err("`trained_betas` must have `num_train_timesteps` entries".into()),
            (None, "linear") => torch_linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n),
            (None, "scaled_linear") => torch_linspace_f32(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            (None, "squaredcos_cap_v2") => cosine_betas(n),
            (None, other) => return unsupported("beta_schedule", &other),
        };
        // alphas_cumprod = cumprod(1 - betas): f32 values, f64 accumulator
        let mut product = 1f64;
        let train_sigmas = betas
            .iter()
            .map(|&beta| {
                product *= f64::from(1.0f32 - beta);
                let alpha_bar = product as f32;
                ((1.0 - alpha_bar) / alpha_bar).sqrt()
            })
            .collect();
        Ok(Self { train_sigmas, spacing, steps_offset: cfg.steps_offset, prediction })
    }

    /// What the UNet predicts under this config.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// `set_timesteps(steps)`: the timestep grid and its sigmas, Euler's step.
    pub fn schedule(&self, steps: usize) -> Result<Schedule> {
        self.schedule_for(steps, Sampler::Euler, None)
    }

    /// `SchedulerClass.from_config(config, timestep_spacing=spacing).set_timesteps(steps)`
    /// for `sampler`'s class (`spacing` `None`: the config's).
    pub fn schedule_for(&self, steps: usize, sampler: Sampler, spacing: Option<Spacing>) -> Result<Schedule> {
        let n = self.train_sigmas.len();
        if steps == 0 || steps > n {
            return Err(Error::InvalidArgument(format!("`steps` must be between 1 and {n}, got {steps}")));
        }
        let spacing = spacing.unwrap_or(self.spacing);
        let timesteps: Vec<f32> = match spacing {
            Spacing::Linspace => {
                numpy_linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect()
            }
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps).rev().map(|i| (i * ratio) as f32 + self.steps_offset as f32).collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                numpy_arange(n as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect()
            }
        };
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(f64::from(t), &self.train_sigmas) as f32).collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        if sampler == Sampler::EulerAncestral && self.prediction == Prediction::Sample {
            return Err(Error::InvalidArgument(
                "the euler_a sampler does not take a model that predicts the sample (diffusers' neither)".into(),
            ));
        }
        Ok(Schedule { timesteps, sigmas, init_noise_sigma, prediction: self.prediction, sampler })
    }
}

impl Schedule {
    /// `get_timesteps(steps, strength)` of the img2img and inpaint pipelines: only the last
    /// `min(int(steps · strength), steps)` timesteps run (diffusers' `set_begin_index`);
    /// `init_noise_sigma` stays that of the full schedule.
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
        let start = steps - run;
        self.timesteps.drain(..start);
        self.sigmas.drain(..start);
        Ok(self)
    }

    /// `scale_model_input`: `sample / sqrt(σᵢ² + 1)`.
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        Ok(div_scalar(sample, (sigma * sigma + 1.0).sqrt())?)
    }

    /// `step`: the sample at step `i + 1`. Euler is deterministic (`s_churn = 0`); Euler
    /// ancestral draws its noise from `noise` (diffusers' `randn_tensor` on the pipeline's
    /// generator, the shape of `model_output`).
    pub fn step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        let pred_original = match self.prediction {
            Prediction::Epsilon => (sample - (model_output * f64::from(sigma))?)?,
            Prediction::Sample => model_output.clone(),
            // model_output * (-σ / sqrt(σ²+1)) + sample / (σ²+1)
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                ((model_output * f64::from(-sigma / s2.sqrt()))? + div_scalar(sample, s2)?)?
            }
        };
        // derivative = (sample - x0) / σ; prev = sample + derivative · (σ_next - σ)
        let derivative = div_scalar(&(sample - pred_original)?, sigma)?;
        let next = self.sigmas[i + 1];
        match self.sampler {
            Sampler::Euler => Ok((sample + (derivative * f64::from(next - sigma))?)?),
            Sampler::EulerAncestral => {
                // in f32, as diffusers' 0-d tensors compute them
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                let down = (next * next - up * up).sqrt();
                let prev = (sample + (derivative * f64::from(down - sigma))?)?;
                let drawn = noise(model_output.dims())?;
                Ok((prev + (drawn * f64::from(up))?)?)
            }
        }
    }

    /// `add_noise` at step `i`: `original + noise · σᵢ`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        Ok((original + (noise * f64::from(self.sigmas[i]))?)?)
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the CPU kernel computes it: the
/// first half counts up from `start`, the second half down from `end`.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 })
        .collect()
}

/// `betas_for_alpha_bar(n, "cosine")` with diffusers' `max_beta = 0.999`, in f64, stored f32.
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64 (endpoint included; `num = 1` gives `[start]`).
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + i · (second - start)` as numpy's fill computes them.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 0 { start } else { start + i as f64 * delta }).collect()
}

/// `np.interp(x, arange(len(table)), table)` in f64, clamped at both ends.
fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    if x >= last as f64 {
        return f64::from(table[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(table[j]), f64::from(table[j + 1]));
    if x == j as f64 {
        return y0;
    }
    (y1 - y0) * (x - j as f64) + y0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_arange_reproduces_the_extra_trailing_step() {
        // np.arange(1000, 0, -1000/61) has 62 entries: floating-point makes the ratio 61.000…1
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
    }

    #[test]
    fn numpy_linspace_of_one_is_the_start() {
        assert_eq!(numpy_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(numpy_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
    }

    #[test]
    fn interp_clamps_and_interpolates() {
        let table = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(-1.0, &table), 1.0);
        assert_eq!(interp(5.0, &table), 7.0);
        assert_eq!(interp(1.5, &table), 5.0);
    }
}
