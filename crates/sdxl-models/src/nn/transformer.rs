//! diffusers' `Transformer2DModel` with continuous input and its `BasicTransformerBlock`s
//! (`models/transformers/transformer_2d.py`, `models/attention.py`): GroupNorm, projection in,
//! blocks of self-attention, cross-attention on the text context and a GEGLU feed-forward,
//! projection out, residual. `[B,C,H,W] × [B,77,Cctx] -> [B,C,H,W]`.

use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::attention::{Attention, AttentionConfig};
use super::{conv2d, kernels, Conv2d, GroupNorm, Linear};

/// Shape of a spatial transformer.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// Projection in/out: a linear layer on tokens, or a 1×1 convolution on the feature map.
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, dim: usize, linear_projection: bool) -> candle_core::Result<Self> {
        Ok(if linear_projection {
            Self::Linear(Linear::new(dim, dim, vb)?)
        } else {
            Self::Conv(conv2d(dim, dim, 1, 1, 0, vb)?)
        })
    }
}

/// GEGLU feed-forward: `proj` to twice the inner width, `h · gelu(gate)`, back to `dim`.
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::new(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            out: Linear::new(inner, dim, vb.pp("net").pp("2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let projected = self.proj.forward(x)?;
        self.out.forward(&kernels::geglu(&projected)?)
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, cfg: &TransformerConfig) -> candle_core::Result<Self> {
        let dim = cfg.channels;
        let head_dim = dim / cfg.heads;
        let attention =
            |context_dim| AttentionConfig { query_dim: dim, context_dim, heads: cfg.heads, head_dim, qkv_bias: false };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), &attention(dim))?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), &attention(cfg.context_dim))?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// `x`: [B,N,C]; `context`: [B,M,Cctx].
    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }
}

pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &TransformerConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        Ok(Self {
            norm: GroupNorm::new(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(vb.pp("proj_in"), c, cfg.use_linear_projection)?,
            transformer_blocks: (0..cfg.depth)
                .map(|i| BasicTransformerBlock::new(vb.pp("transformer_blocks").pp(i), cfg))
                .collect::<candle_core::Result<_>>()?,
            proj_out: Projection::new(vb.pp("proj_out"), c, cfg.use_linear_projection)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let mut t = self.norm.forward(x)?;
        if let Projection::Conv(conv) = &self.proj_in {
            t = conv.forward(&t)?;
        }
        // [B,C,H,W] -> [B,HW,C]
        t = t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        if let Projection::Linear(lin) = &self.proj_in {
            t = lin.forward(&t)?;
        }
        for block in &self.transformer_blocks {
            t = block.forward(&t, context)?;
        }
        if let Projection::Linear(lin) = &self.proj_out {
            t = lin.forward(&t)?;
        }
        // [B,HW,C] -> [B,C,H,W]
        t = t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()?;
        if let Projection::Conv(conv) = &self.proj_out {
            t = conv.forward(&t)?;
        }
        t + x
    }
}
