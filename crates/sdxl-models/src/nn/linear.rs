//! A fully connected layer, `y = x · Wᵀ + b`, over the last dimension of any-rank input.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{flops, kernels, precision};

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, as torch stores it.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer with a bias.
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_bias(in_dim, out_dim, true, vb)
    }

    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::with_bias(in_dim, out_dim, false, vb)
    }

    pub fn with_bias(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        flops::add(2 * rows * in_dim * out_dim);
        let weight = precision::widened_for(&self.weight, x)?;
        let y = kernels::matmul_nt(&x.reshape((rows, in_dim))?, &weight)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("linear input has at least one dimension") = out_dim;
        y.reshape(out_dims)
    }
}
