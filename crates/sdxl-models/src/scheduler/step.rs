//! The `step` of each scheduler class, with its state across the steps of one generation:
//! Heun's first half, the multistep solvers' earlier x₀ predictions. Scalar coefficients are
//! computed in f32, as diffusers' 0-d tensors compute them, and applied in diffusers' order.

use candle_core::Tensor;

use super::{alpha_sigma, NoiseSpace, Prediction, Sampler, Schedule};
use crate::nn::div_scalar;
use crate::{Error, Result};

/// Draws standard normal noise of a shape from the generation's generator.
pub type NoiseSource<'n> = dyn FnMut(&[usize]) -> Result<Tensor> + 'n;

/// Steps one generation through a [`Schedule`], UNet call by UNet call.
pub struct Stepper<'a> {
    schedule: &'a Schedule,
    /// Heun between its two calls: the first derivative, `dt` and the sample it started from.
    heun: Option<(Tensor, f32, Tensor)>,
    /// The multistep solvers' converted outputs (x₀), newest last, at most two.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
    /// UniPC: the sample its last predictor started from, and that predictor's order.
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl<'a> Stepper<'a> {
    pub(super) fn new(schedule: &'a Schedule) -> Self {
        Self { schedule, heun: None, outputs: Vec::new(), lower_order_nums: 0, last_sample: None, this_order: 0 }
    }

    /// `step` after UNet call `i`: the sample for call `i + 1` (or the final latents).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        match self.schedule.sampler {
            Sampler::Euler | Sampler::EulerAncestral => self.euler(model_output, i, sample, noise),
            Sampler::Heun => self.heun(model_output, i, sample),
            Sampler::DpmPp2M | Sampler::DpmPp2MSde => self.dpm_solver(model_output, i, sample, noise),
            Sampler::UniPc => self.unipc(model_output, i, sample),
            Sampler::Ddim | Sampler::Lcm => self.alpha_bar_step(model_output, i, sample, noise),
        }
    }

    /// Euler (`s_churn = 0`) and Euler ancestral.
    fn euler(&self, model_output: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseSource) -> Result<Tensor> {
        let s = self.schedule;
        let sigma = s.sigmas[i];
        let pred_original = sigma_x0(s.prediction, model_output, sample, sigma)?;
        // derivative = (sample - x0) / σ; prev = sample + derivative · (σ_next - σ)
        let derivative = div_scalar(&(sample - pred_original)?, sigma)?;
        let next = s.sigmas[i + 1];
        if s.sampler == Sampler::Euler {
            return Ok((sample + (derivative * f64::from(next - sigma))?)?);
        }
        let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
        let down = (next * next - up * up).sqrt();
        let prev = (sample + (derivative * f64::from(down - sigma))?)?;
        let drawn = noise(model_output.dims())?;
        Ok((prev + (drawn * f64::from(up))?)?)
    }

    /// Heun: an Euler step, then (on the next call, at the next sigma) the average of both
    /// derivatives applied from the same start.
    fn heun(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let s = self.schedule;
        let first = self.heun.is_none();
        let (sigma, next) = if first { (s.sigmas[i], s.sigmas[i + 1]) } else { (s.sigmas[i - 1], s.sigmas[i]) };
        let sigma_input = if first { sigma } else { next };
        let mut pred_original = sigma_x0(s.prediction, model_output, sample, sigma_input)?;
        if let Some(range) = s.clip {
            pred_original = pred_original.clamp(-range, range)?;
        }
        match self.heun.take() {
            None => {
                let derivative = div_scalar(&(sample - &pred_original)?, sigma)?;
                let dt = next - sigma;
                let prev = (sample + (&derivative * f64::from(dt))?)?;
                self.heun = Some((derivative, dt, sample.clone()));
                Ok(prev)
            }
            Some((first_derivative, dt, start)) => {
                let derivative = div_scalar(&(sample - &pred_original)?, next)?;
                let derivative = div_scalar(&(first_derivative + derivative)?, 2.0)?;
                Ok((start + (derivative * f64::from(dt))?)?)
            }
        }
    }

    /// DPM-Solver++ (2M), the ODE or the SDE variant: first order on the first and last step.
    fn dpm_solver(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let s = self.schedule;
        let x0 = alpha_sigma_x0(s.prediction, model_output, sample, s.sigmas[i])?;
        self.push_output(x0);
        let sde = s.sampler == Sampler::DpmPp2MSde;
        let drawn = if sde { Some(noise(model_output.dims())?) } else { None };
        let last = i + 1 == s.timesteps.len();
        let (alpha_t, sigma_t) = alpha_sigma(s.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(s.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let m0 = &self.outputs[self.outputs.len() - 1];
        let second = (self.lower_order_nums >= 1 && !last).then(|| {
            // D1 = (m0 - m1) / r0, r0 = h_0 / h
            let (alpha_s1, sigma_s1) = alpha_sigma(s.sigmas[i - 1]);
            let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
            let r0 = h_0 / h;
            (m0 - &self.outputs[self.outputs.len() - 2]).and_then(|d| d * f64::from(1.0 / r0))
        });
        let prev = match drawn {
            None => {
                // σ_t/σ_s · x − α_t(e^{−h} − 1) · D0 − ½ α_t(e^{−h} − 1) · D1
                let c = alpha_t * ((-h).exp() - 1.0);
                let mut x = ((sample * f64::from(sigma_t / sigma_s0))? - (m0 * f64::from(c))?)?;
                if let Some(d1) = second {
                    x = (x - (d1? * f64::from(0.5 * c))?)?;
                }
                x
            }
            Some(drawn) => {
                // σ_t/σ_s e^{−h} · x + α_t(1 − e^{−2h}) · D0 + ½ α_t(1 − e^{−2h}) · D1 + σ_t sqrt(1 − e^{−2h}) · z
                let c = alpha_t * (1.0 - (-2.0 * h).exp());
                let mut x = ((sample * f64::from(sigma_t / sigma_s0 * (-h).exp()))? + (m0 * f64::from(c))?)?;
                if let Some(d1) = second {
                    x = (x + (d1? * f64::from(0.5 * c))?)?;
                }
                (x + (drawn * f64::from(sigma_t * (1.0 - (-2.0 * h).exp()).sqrt()))?)?
            }
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev)
    }

    /// UniPC (bh2, x₀ prediction): the corrector on the previous step, then the predictor.
    fn unipc(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let s = self.schedule;
        let x0 = alpha_sigma_x0(s.prediction, model_output, sample, s.sigmas[i])?;
        let sample = match self.last_sample.take() {
            Some(last) if i > 0 => self.unipc_corrector(&x0, &last, i)?,
            _ => sample.clone(),
        };
        self.push_output(x0);
        let remaining = s.timesteps.len() - i;
        self.this_order = 2.min(remaining).min(self.lower_order_nums + 1);
        let prev = self.unipc_predictor(&sample, i)?;
        self.last_sample = Some(sample);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev)
    }

    /// `multistep_uni_p_bh_update`: from call `i`'s sample to call `i + 1`'s.
    fn unipc_predictor(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.schedule;
        let (alpha_t, sigma_t) = alpha_sigma(s.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(s.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let phi = (-h).exp_m1(); // h_phi_1 and B_h (bh2)
        let m0 = &self.outputs[self.outputs.len() - 1];
        let x_t = ((x * f64::from(sigma_t / sigma_s0))? - (m0 * f64::from(alpha_t * phi))?)?;
        if self.this_order < 2 {
            return Ok(x_t);
        }
        // order 2: ρ = ½, D1 = (m1 - m0) / r1
        let (alpha_s1, sigma_s1) = alpha_sigma(s.sigmas[i - 1]);
        let rk = (lambda(alpha_s1, sigma_s1) - lambda(alpha_s0, sigma_s0)) / h;
        let d1 = div_scalar(&(&self.outputs[self.outputs.len() - 2] - m0)?, rk)?;
        let pred_res = (d1 * 0.5)?;
        Ok((x_t - (pred_res * f64::from(alpha_t * phi))?)?)
    }

    /// `multistep_uni_c_bh_update`: corrects call `i`'s sample with its own x₀ (`model_t`),
    /// before that joins the history.
    fn unipc_corrector(&self, model_t: &Tensor, x: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.schedule;
        let order = self.this_order;
        let (alpha_t, sigma_t) = alpha_sigma(s.sigmas[i]);
        let (alpha_s0, sigma_s0) = alpha_sigma(s.sigmas[i - 1]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let hh = -h;
        let phi = hh.exp_m1(); // h_phi_1 and B_h (bh2)
        let m0 = &self.outputs[self.outputs.len() - 1];
        let x_t_ = ((x * f64::from(sigma_t / sigma_s0))? - (m0 * f64::from(alpha_t * phi))?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order == 1 {
            (d1_t * 0.5)?
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(s.sigmas[i - 2]);
            let rk = (lambda(alpha_s1, sigma_s1) - lambda_s0) / h;
            let d1 = div_scalar(&(&self.outputs[self.outputs.len() - 2] - m0)?, rk)?;
            // b_k = h_phi_k · k! / B_h for k = 1, 2; solve [[1, 1], [rk, 1]] ρ = b
            let phi_1 = phi / hh - 1.0;
            let b1 = phi_1 / phi;
            let phi_2 = phi_1 / hh - 0.5;
            let b2 = phi_2 * 2.0 / phi;
            let (rho0, rho1) = solve_2x2([[1.0, 1.0], [rk, 1.0]], [b1, b2]);
            ((d1 * f64::from(rho0))? + (d1_t * f64::from(rho1))?)?
        };
        Ok((x_t_ - (correction * f64::from(alpha_t * phi))?)?)
    }

    /// DDIM (η = 0) and LCM, in ᾱ at integer timesteps.
    fn alpha_bar_step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut NoiseSource,
    ) -> Result<Tensor> {
        let s = self.schedule;
        let NoiseSpace::AlphaBar { alphas_cumprod, final_alpha_cumprod } = &s.space else {
            return Err(Error::InvalidArgument("an ᾱ step on a σ schedule".into()));
        };
        let t = s.timesteps[i] as usize;
        let lcm = s.sampler == Sampler::Lcm;
        let prev_t = if lcm {
            // the next timestep of the schedule, itself on the last step
            s.timesteps.get(i + 1).map_or(t as i64, |&p| p as i64)
        } else {
            t as i64 - (alphas_cumprod.len() / s.steps) as i64
        };
        let alpha_t = alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 { alphas_cumprod[prev_t as usize] } else { *final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let (mut x0, epsilon) = match s.prediction {
            Prediction::Epsilon => (div_scalar(&(sample - (model_output * f64::from(sqrt_b))?)?, sqrt_a)?, None),
            Prediction::Sample => (model_output.clone(), None),
            Prediction::VPrediction => (
                ((sample * f64::from(sqrt_a))? - (model_output * f64::from(sqrt_b))?)?,
                Some(((model_output * f64::from(sqrt_a))? + (sample * f64::from(sqrt_b))?)?),
            ),
        };
        if let Some(range) = s.clip {
            x0 = x0.clamp(-range, range)?;
        }
        if lcm {
            // boundary conditions: c_skip = σ_d² / (τ² + σ_d²), c_out = τ / sqrt(τ² + σ_d²), τ = 10 t
            let scaled = t as f32 * s.timestep_scaling;
            let c_skip = 0.25 / (scaled * scaled + 0.25);
            let c_out = scaled / (scaled * scaled + 0.25).sqrt();
            let denoised = ((x0 * f64::from(c_out))? + (sample * f64::from(c_skip))?)?;
            if i + 1 == s.timesteps.len() {
                return Ok(denoised);
            }
            let drawn = noise(model_output.dims())?;
            return Ok(((denoised * f64::from(alpha_prev.sqrt()))? + (drawn * f64::from((1.0 - alpha_prev).sqrt()))?)?);
        }
        let epsilon = match (s.prediction, epsilon) {
            (Prediction::Epsilon, _) => model_output.clone(),
            (_, Some(epsilon)) => epsilon,
            // the sample predicted: ε = (x − sqrt(ᾱ) x₀) / sqrt(1 − ᾱ), from the unclipped x₀
            (_, None) => div_scalar(&(sample - (model_output * f64::from(sqrt_a))?)?, sqrt_b)?,
        };
        let direction = (epsilon * f64::from((1.0 - alpha_prev).sqrt()))?;
        Ok(((x0 * f64::from(alpha_prev.sqrt()))? + direction)?)
    }

    fn push_output(&mut self, x0: Tensor) {
        if self.outputs.len() == 2 {
            self.outputs.remove(0);
        }
        self.outputs.push(x0);
    }
}

/// x₀ of the σ-space classes (Euler, Heun).
fn sigma_x0(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - (model_output * f64::from(sigma))?)?,
        Prediction::Sample => model_output.clone(),
        // model_output · (−σ / sqrt(σ²+1)) + sample / (σ²+1)
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((model_output * f64::from(-sigma / s2.sqrt()))? + div_scalar(sample, s2)?)?
        }
    })
}

/// `convert_model_output` of DPM-Solver++ and UniPC: x₀ from α, σ of call `i`.
fn alpha_sigma_x0(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match prediction {
        Prediction::Epsilon => div_scalar(&(sample - (model_output * f64::from(sigma_t))?)?, alpha_t)?,
        Prediction::Sample => model_output.clone(),
        Prediction::VPrediction => ((sample * f64::from(alpha_t))? - (model_output * f64::from(sigma_t))?)?,
    })
}

/// λ = log α − log σ (infinite at σ = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `torch.linalg.solve` of a 2×2 system, by elimination with partial pivoting.
fn solve_2x2(a: [[f32; 2]; 2], b: [f32; 2]) -> (f32, f32) {
    let (a, b) = if a[1][0].abs() > a[0][0].abs() { ([a[1], a[0]], [b[1], b[0]]) } else { (a, b) };
    let factor = a[1][0] / a[0][0];
    let x1 = (b[1] - factor * b[0]) / (a[1][1] - factor * a[0][1]);
    let x0 = (b[0] - a[0][1] * x1) / a[0][0];
    (x0, x1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_2x2_solves() {
        let (x0, x1) = solve_2x2([[1.0, 1.0], [-0.5, 1.0]], [3.0, 0.0]);
        assert!((x0 - 2.0).abs() < 1e-6 && (x1 - 1.0).abs() < 1e-6, "{x0} {x1}");
    }
}
