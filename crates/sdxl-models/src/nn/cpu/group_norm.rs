//! Group normalisation over `[B, C, ...]` in f32, optionally followed by SiLU, as one kernel:
//! per (batch, group), the statistics (two passes, as torch computes them), then normalise,
//! scale, shift and activate in a third, in parallel over groups. candle's composed version
//! makes several full passes and temporaries, which dominate the VAE's large, shallow layers.

use candle_core::Tensor;
use rayon::prelude::*;

use super::math::{self, with_avx2};
use super::with_data;

/// `group_norm(x) · γ + β`, then SiLU when `silu`, for `x` `[B, C, ...]` and `γ`, `β` `[C]`.
pub fn group_norm(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    groups: usize,
    eps: f64,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let per_group = dims[1] / groups;
    let plane: usize = dims[2..].iter().product();
    let group_len = per_group * plane;
    let mut out = vec![0f32; x.elem_count()];
    with_data(x, |input| {
        out.par_chunks_mut(group_len).zip(input.par_chunks(group_len)).enumerate().for_each(|(i, (y, x))| {
            let first_channel = (i % groups) * per_group;
            let (gamma, beta) = (&gamma[first_channel..], &beta[first_channel..]);
            with_avx2(
                #[inline(always)]
                || normalize_group(x, y, plane, gamma, beta, eps, silu),
            );
        });
    })?;
    Tensor::from_vec(out, dims, x.device())
}

/// The normalisation of `x` `[B, C, ...]` as a per-channel `x · scale + shift`: `(scale,
/// shift)`, each `[B · C]`, equal to what [`group_norm`] applies.
pub fn channel_affine(
    x: &Tensor,
    gamma: &[f32],
    beta: &[f32],
    groups: usize,
    eps: f64,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let per_group = x.dim(1)? / groups;
    let group_len = x.elem_count() / (x.dim(0)? * groups).max(1);
    let affine: Vec<Vec<(f32, f32)>> = with_data(x, |input| {
        input
            .par_chunks(group_len)
            .enumerate()
            .map(|(i, x)| {
                let stats = with_avx2(
                    #[inline(always)]
                    || GroupStats::of(x, eps),
                );
                let first = (i % groups) * per_group;
                (first..first + per_group).map(|c| stats.affine(gamma[c], beta[c])).collect()
            })
            .collect()
    })?;
    Ok(affine.into_iter().flatten().unzip())
}

/// One group: `y = (x − mean) / √(var + eps) · γ[c] + β[c]`, then SiLU if asked.
#[inline(always)]
fn normalize_group(x: &[f32], y: &mut [f32], plane: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) {
    let stats = GroupStats::of(x, eps);
    for (c, (x, y)) in x.chunks_exact(plane).zip(y.chunks_exact_mut(plane)).enumerate() {
        let (scale, shift) = stats.affine(gamma[c], beta[c]);
        if silu {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = math::silu(x * scale + shift);
            }
        } else {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * scale + shift;
            }
        }
    }
}

/// A group's mean and `1 / √(var + eps)`, in f64.
struct GroupStats {
    mean: f64,
    rstd: f64,
}

impl GroupStats {
    #[inline(always)]
    fn of(x: &[f32], eps: f64) -> Self {
        // Two passes, as torch does it: the mean, then the mean squared deviation (no
        // cancellation).
        let n = x.len() as f64;
        let mean = math::sum_by_runs(x, |v| v) / n;
        let mean_f32 = mean as f32;
        let var = math::sum_by_runs(x, |v| (v - mean_f32) * (v - mean_f32)) / n;
        Self { mean, rstd: 1.0 / (var + eps).sqrt() }
    }

    /// The normalisation of one channel as `x · scale + shift`.
    fn affine(&self, gamma: f32, beta: f32) -> (f32, f32) {
        let scale = (self.rstd * f64::from(gamma)) as f32;
        let shift = (f64::from(beta) - self.mean * self.rstd * f64::from(gamma)) as f32;
        (scale, shift)
    }
}
