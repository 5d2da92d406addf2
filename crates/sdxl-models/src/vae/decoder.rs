//! diffusers' `Decoder` (`models/autoencoders/vae.py`): conv in, a mid block with one
//! single-head attention, `UpDecoderBlock2D`s (ResNets then a ×2 upsampler, except the last),
//! GroupNorm, SiLU, conv out.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, GroupNorm};

use super::VaeConfig;
use crate::nn::attention::{Attention, AttentionConfig};
use crate::nn::conv2d;
use crate::nn::resnet::{ResnetBlock2D, ResnetConfig};
use crate::nn::sampling::Upsample2D;

const EPS: f64 = 1e-6;

/// The VAE mid block's attention: GroupNorm, attention over the H·W positions, residual.
struct SpatialAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let cfg = AttentionConfig {
            query_dim: channels,
            context_dim: channels,
            heads: 1,
            head_dim: channels,
            qkv_bias: true,
        };
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, EPS, vb.pp("group_norm"))?,
            attention: Attention::new(vb, &cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B,C,H,W] -> [B,HW,C]
        let t = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let t = self.attention.forward(&t, None)?;
        // [B,HW,C] -> [B,C,H,W]
        t.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

/// `UNetMidBlock2D` without a time embedding: ResNet, optional attention, ResNet.
pub(super) struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    pub(super) fn new(
        vb: VarBuilder,
        channels: usize,
        groups: usize,
        add_attention: bool,
    ) -> candle_core::Result<Self> {
        let cfg = ResnetConfig {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        };
        Ok(Self {
            resnets: [
                ResnetBlock2D::new(vb.pp("resnets").pp(0), &cfg)?,
                ResnetBlock2D::new(vb.pp("resnets").pp(1), &cfg)?,
            ],
            attention: add_attention
                .then(|| SpatialAttention::new(vb.pp("attentions").pp(0), channels, groups))
                .transpose()?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnets[0].forward(x.clone(), None)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.resnets[1].forward(h, None)
    }
}

struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let resnet = |cin, cout| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        };
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = top;
        for (i, &out) in reversed.iter().enumerate() {
            let ub = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(ub.pp("resnets").pp(j), &resnet(if j == 0 { prev } else { out }, out)))
                .collect::<candle_core::Result<_>>()?;
            let upsampler =
                (i + 1 < reversed.len()).then(|| Upsample2D::new(ub.pp("upsamplers").pp(0), out, out)).transpose()?;
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            prev = out;
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, top, 3, 1, 1, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, groups, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, cfg.block_out_channels[0], EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// `[B,L,h,w] -> [B,3,h·f,w·f]`
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(h, None)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
