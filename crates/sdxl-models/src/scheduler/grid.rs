//! The timestep and sigma grids of diffusers' schedulers' `set_timesteps`, with numpy's and
//! torch's arithmetic reproduced: numpy's f64 `linspace`/`arange`/`interp`, half-to-even
//! rounding, torch's f32 `linspace`, and the Karras sigmas with their `_sigma_to_t`.

use super::Spacing;

/// How a scheduler class lays its grid out for a spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GridStyle {
    /// `EulerDiscreteScheduler`, its ancestral twin and Heun: f32 timesteps, unrounded linspace.
    Euler,
    /// `DDIMScheduler`: integer timesteps, the linspace rounded.
    Ddim,
    /// `DPMSolverMultistepScheduler` and `UniPCMultistepScheduler`: `steps + 1` points with the
    /// last dropped for linspace and leading.
    Multistep,
}

/// The timesteps of `set_timesteps(steps)` (`n` training timesteps), as f32 values.
pub(super) fn timesteps(style: GridStyle, spacing: Spacing, n: usize, steps: usize, offset: usize) -> Vec<f32> {
    let plus_one = usize::from(style == GridStyle::Multistep);
    match spacing {
        Spacing::Linspace => {
            let grid = numpy_linspace(0.0, (n - 1) as f64, steps + plus_one);
            let values = grid.into_iter().rev().take(steps);
            match style {
                GridStyle::Euler => values.map(|t| t as f32).collect(),
                GridStyle::Ddim | GridStyle::Multistep => values.map(|t| t.round_ties_even() as f32).collect(),
            }
        }
        Spacing::Leading => {
            let ratio = n / (steps + plus_one);
            (0..steps + plus_one).rev().take(steps).map(|i| (i * ratio + offset) as f32).collect()
        }
        Spacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            numpy_arange(n as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() as f32 - 1.0).collect()
        }
    }
}

/// `_convert_to_karras`: `steps` sigmas from `max` to `min`, ρ = 7, in f64.
pub(super) fn karras(min: f64, max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    numpy_linspace(0.0, 1.0, steps).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating `log_sigmas`
/// (the f32 logs of the training sigmas, increasing) linearly.
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index whose log sigma is at most `log_sigma`
    let at_most = log_sigmas.iter().filter(|&&l| log_sigma - f64::from(l) >= 0.0).count();
    let low_idx = at_most.saturating_sub(1).min(log_sigmas.len() - 2);
    let (low, high) = (f64::from(log_sigmas[low_idx]), f64::from(log_sigmas[low_idx + 1]));
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `torch.linspace(start, end, steps, dtype=float32)` as the CPU kernel computes it: the
/// first half counts up from `start`, the second half down from `end`.
pub(super) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
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
pub(super) fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64 (endpoint included; `num = 1` gives `[start]`).
pub(super) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
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
pub(super) fn interp(x: f64, table: &[f32]) -> f64 {
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

    #[test]
    fn grids_follow_each_class() {
        // diffusers 0.42, 1000 training steps, 4 inference steps, steps_offset 1
        let grid = |style, spacing| timesteps(style, spacing, 1000, 4, 1);
        assert_eq!(grid(GridStyle::Euler, Spacing::Leading), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(grid(GridStyle::Euler, Spacing::Linspace), vec![999.0, 666.0, 333.0, 0.0]);
        assert_eq!(grid(GridStyle::Ddim, Spacing::Trailing), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(grid(GridStyle::Multistep, Spacing::Linspace), vec![999.0, 749.0, 500.0, 250.0]);
        assert_eq!(grid(GridStyle::Multistep, Spacing::Leading), vec![801.0, 601.0, 401.0, 201.0]);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let logs: Vec<f32> = [0.1f32, 0.2, 0.4, 0.8].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.2f32 as f64, &logs) - 1.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(10.0, &logs), 3.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }
}
