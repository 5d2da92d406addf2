//! diffusers' `Attention` (`models/attention_processor.py`) with the default SDPA processor:
//! multi-head scaled dot-product attention over token sequences `[B, N, C]`.

use candle_core::{DType, Module, Tensor};
use candle_nn::{linear, linear_b, Linear, VarBuilder};

/// Multi-head attention; keys and values come from `context` when given (cross-attention).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

/// Shape of an attention layer.
pub struct AttentionConfig {
    /// Width of the query sequence, and of the output.
    pub query_dim: usize,
    /// Width of the key/value sequence (`cross_attention_dim`), or `query_dim` for self-attention.
    pub context_dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether `to_q`/`to_k`/`to_v` carry a bias (the VAE's do, the UNet's do not).
    pub qkv_bias: bool,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> candle_core::Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        Ok(Self {
            to_q: linear_b(cfg.query_dim, inner, cfg.qkv_bias, vb.pp("to_q"))?,
            to_k: linear_b(cfg.context_dim, inner, cfg.qkv_bias, vb.pp("to_k"))?,
            to_v: linear_b(cfg.context_dim, inner, cfg.qkv_bias, vb.pp("to_v"))?,
            to_out: linear(inner, cfg.query_dim, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: [B, N, C]; `context`: [B, M, Cc] or `None` for self-attention. Returns [B, N, C].
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = scaled_dot_product(&q, &k, &v, self.head_dim)?;
        // [B,H,N,Dh] -> [B,N,H*Dh]
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, h * d))?;
        self.to_out.forward(&out)
    }

    /// [B,N,H*Dh] -> [B,H,N,Dh]
    fn split_heads(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
    }
}

/// softmax(q·kᵀ/√d)·v over [B,H,N,Dh]; the softmax runs in f32 whatever the compute dtype.
fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, head_dim: usize) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    probs.matmul(v)
}
