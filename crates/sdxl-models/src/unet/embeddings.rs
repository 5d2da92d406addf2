//! Sinusoidal timestep features and the MLP that embeds them (diffusers'
//! `models/embeddings.py`: `get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// `get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift)` in f32:
/// `[N] -> [N, dim]`, with frequencies `exp(-ln(10000)·i / (dim/2 - shift))`.
pub fn timestep_features(
    values: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    // exponent = -math.log(max_period) * arange(half, float32) / (half - shift), all in f32
    let log_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let frequencies: Vec<f32> = (0..half).map(|i| (log_period * i as f32 / denominator).exp()).collect();
    let mut data = Vec::with_capacity(values.len() * dim);
    for &t in values {
        let args: Vec<f32> = frequencies.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (values.len(), dim), device)
}

/// `TimestepEmbedding`: linear → SiLU → linear.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: Linear::new(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: Linear::new(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }

    /// `[N, in] -> [N, out]`, computed in `dtype`.
    pub fn forward(&self, x: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let h = candle_nn::ops::silu(&self.linear_1.forward(&x.to_dtype(dtype)?)?)?;
        self.linear_2.forward(&h)
    }
}
