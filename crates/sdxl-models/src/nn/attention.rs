//! diffusers' `Attention` (`models/attention_processor.py`) with the default SDPA processor:
//! multi-head scaled dot-product attention over token sequences `[B, N, C]`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{flops, kernels, Linear};

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
            to_q: Linear::with_bias(cfg.query_dim, inner, cfg.qkv_bias, vb.pp("to_q"))?,
            to_k: Linear::with_bias(cfg.context_dim, inner, cfg.qkv_bias, vb.pp("to_k"))?,
            to_v: Linear::with_bias(cfg.context_dim, inner, cfg.qkv_bias, vb.pp("to_v"))?,
            to_out: Linear::new(inner, cfg.query_dim, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `x`: [B, N, C]; `context`: [B, M, Cc] or `None` for self-attention. Returns [B, N, C].
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(x);
        if kernels::flash_applies(x, self.head_dim) {
            return self.forward_flash(x, context);
        }
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let (b, h, n, d) = q.dims4()?;
        let m = k.dim(2)?;
        flops::add(4 * b * h * n * m * d);
        let flat = |t: &Tensor| t.reshape((b * h, (), d));
        let out = kernels::attention(&flat(&q)?, &flat(&k)?, &flat(&v)?, 1.0 / (d as f64).sqrt())?;
        // [B*H,N,Dh] -> [B,N,H*Dh]
        let out = out.reshape((b, h, n, d))?.transpose(1, 2)?.reshape((b, n, h * d))?;
        self.to_out.forward(&out)
    }

    /// [`Self::forward`] through flash attention, which reads the heads where the projections
    /// put them.
    fn forward_flash(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let m = context.dim(1)?;
        let (h, d) = (self.heads, self.head_dim);
        flops::add(4 * b * h * n * m * d);
        let q = self.to_q.forward(x)?.reshape((b, n, h, d))?;
        let k = self.to_k.forward(context)?.reshape((b, m, h, d))?;
        let v = self.to_v.forward(context)?.reshape((b, m, h, d))?;
        let out = kernels::flash_attention(&q, &k, &v, 1.0 / (d as f64).sqrt())?;
        self.to_out.forward(&out.reshape((b, n, h * d))?)
    }

    /// [B,N,H*Dh] -> [B,H,N,Dh]
    fn split_heads(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = t.dims3()?;
        t.reshape((b, n, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous()
    }
}
