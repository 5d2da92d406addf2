//! Group normalisation over `[B, C, ...]`, optionally followed by SiLU in the same pass.
//!
//! On the CPU in f32 it is one fused kernel: per (batch, group), the statistics (two passes,
//! as torch computes them), then normalise, scale, shift and activate in a third, in parallel
//! over groups. candle's composed version makes several full passes and temporaries, which
//! dominate the VAE's large, shallow layers. Other dtypes and devices use candle's ops.

use candle_core::{DType, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::math::{self, with_avx2};

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// The composed candle version, for the other dtypes and devices.
    fallback: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { weight, bias, groups, eps, fallback })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(group_norm(x))`, as every ResNet block applies them.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, true)
    }

    /// The normalisation of `x` `[B, C, ...]` as a per-channel `x · scale + shift`:
    /// `(scale, shift)`, each `[B · C]`, equal to what [`Self::forward`] applies. `None` where
    /// the fused kernel does not run (other dtypes and devices).
    pub fn channel_affine(&self, x: &Tensor) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
        if !self.fused(x) {
            return Ok(None);
        }
        let channels = x.dim(1)?;
        let per_group = channels / self.groups;
        let group_len = x.elem_count() / (x.dim(0)? * self.groups).max(1);
        let x = x.contiguous()?;
        let (weight, bias) = (self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?);
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { unreachable!("checked: a CPU tensor") };
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        let input = &cpu.as_slice::<f32>()?[start..end];
        let affine: Vec<Vec<(f32, f32)>> = input
            .par_chunks(group_len)
            .enumerate()
            .map(|(i, x)| {
                let stats = with_avx2(
                    #[inline(always)]
                    || GroupStats::of(x, self.eps),
                );
                let first = (i % self.groups) * per_group;
                (first..first + per_group).map(|c| stats.affine(weight[c], bias[c])).collect()
            })
            .collect();
        Ok(Some(affine.into_iter().flatten().unzip()))
    }

    fn fused(&self, x: &Tensor) -> bool {
        x.dtype() == DType::F32 && x.device().is_cpu() && self.weight.dtype() == DType::F32
    }

    fn run(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if !self.fused(x) {
            let y = candle_core::Module::forward(&self.fallback, x)?;
            return if silu { candle_nn::ops::silu(&y) } else { Ok(y) };
        }
        let dims = x.dims().to_vec();
        let channels = dims[1];
        let plane: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let x = x.contiguous()?;
        let (weight, bias) = (self.weight.to_vec1::<f32>()?, self.bias.to_vec1::<f32>()?);
        let mut out = vec![0f32; x.elem_count()];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else { unreachable!("checked: a CPU tensor") };
            let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
            let input = &cpu.as_slice::<f32>()?[start..end];
            let group_len = per_group * plane;
            out.par_chunks_mut(group_len).zip(input.par_chunks(group_len)).enumerate().for_each(|(i, (y, x))| {
                let first_channel = (i % self.groups) * per_group;
                let (gamma, beta) = (&weight[first_channel..], &bias[first_channel..]);
                with_avx2(
                    #[inline(always)]
                    || normalize_group(x, y, plane, gamma, beta, self.eps, silu),
                );
            });
        }
        Tensor::from_vec(out, dims, x.device())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_matches_candle_with_and_without_silu() {
        let n = 2 * 6 * 5 * 7;
        let values: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0 + 1.5).collect();
        let x = Tensor::from_vec(values, (2, 6, 5, 7), &Device::Cpu).unwrap();
        let gamma = Tensor::new(&[1.0f32, 0.5, -2.0, 1.5, 0.1, 3.0], &Device::Cpu).unwrap();
        let beta = Tensor::new(&[0.0f32, 0.3, -0.2, 1.0, 0.0, -1.0], &Device::Cpu).unwrap();
        let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 6, 3, 1e-5).unwrap();
        let ours = GroupNorm { weight: gamma, bias: beta, groups: 3, eps: 1e-5, fallback: reference.clone() };
        let expected = candle_core::Module::forward(&reference, &x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&ours.forward(&x).unwrap(), &expected) < 1e-5);
        let expected_silu = candle_nn::ops::silu(&expected).unwrap();
        assert!(diff(&ours.forward_silu(&x).unwrap(), &expected_silu) < 1e-5);
    }
}
