//! Group normalisation over `[B, C, ...]`, optionally followed by SiLU in the same pass (on
//! the CPU in f32 one fused kernel, see [`super::kernels::group_norm`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::kernels;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
    }

    /// `silu(group_norm(x))`, as every ResNet block applies them.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
    }

    /// The normalisation of `x` `[B, C, ...]` as a per-channel `x · scale + shift`:
    /// `(scale, shift)`, each `[B · C]`, equal to what [`Self::forward`] applies. `None` where
    /// the fused kernel does not run (other dtypes and devices).
    pub fn channel_affine(&self, x: &Tensor) -> candle_core::Result<Option<(Vec<f32>, Vec<f32>)>> {
        kernels::group_norm_affine(x, &self.weight, &self.bias, self.groups, self.eps)
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
        let ours = GroupNorm { weight: gamma, bias: beta, groups: 3, eps: 1e-5 };
        let expected = candle_core::Module::forward(&reference, &x).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        };
        assert!(diff(&ours.forward(&x).unwrap(), &expected) < 1e-5);
        let expected_silu = candle_nn::ops::silu(&expected).unwrap();
        assert!(diff(&ours.forward_silu(&x).unwrap(), &expected_silu) < 1e-5);
    }
}
