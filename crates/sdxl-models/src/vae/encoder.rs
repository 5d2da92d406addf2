//! diffusers' `Encoder` (`models/autoencoders/vae.py`): conv in, `DownEncoderBlock2D`s (ResNets
//! then a stride-2 downsampler with diffusers' bottom/right padding, except the last), the
//! same mid block as the decoder, GroupNorm, SiLU, conv out to the distribution's
//! `2 · latent_channels` moments.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, GroupNorm};

use super::decoder::MidBlock;
use super::VaeConfig;
use crate::nn::conv2d;
use crate::nn::resnet::{ResnetBlock2D, ResnetConfig};
use crate::nn::sampling::Downsample2D;

const EPS: f64 = 1e-6;

struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let channels = &cfg.block_out_channels;
        let resnet = |cin, cout| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        };
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut prev = channels[0];
        for (i, &out) in channels.iter().enumerate() {
            let db = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| ResnetBlock2D::new(db.pp("resnets").pp(j), &resnet(if j == 0 { prev } else { out }, out)))
                .collect::<candle_core::Result<_>>()?;
            // downsample_padding=0: pad (0,1,0,1), then a 3×3 stride-2 conv
            let downsampler = (i + 1 < channels.len())
                .then(|| Downsample2D::new(db.pp("downsamplers").pp(0), out, out, 0))
                .transpose()?;
            down_blocks.push(DownEncoderBlock { resnets, downsampler });
            prev = out;
        }
        let top = channels[channels.len() - 1];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, channels[0], 3, 1, 1, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, groups, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(groups, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(top, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    /// `[B,3,H,W] -> [B,2L,H/f,W/f]` (mean and log-variance, before `quant_conv`)
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
