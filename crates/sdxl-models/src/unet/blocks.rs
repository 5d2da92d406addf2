//! The UNet's down, mid and up blocks (diffusers' `models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`/`CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`/`CrossAttnUpBlock2D`).
//! A block with attention follows each ResNet with a spatial transformer.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::LevelPlan;
use crate::nn::resnet::{ResnetBlock2D, ResnetConfig};
use crate::nn::sampling::{Downsample2D, Upsample2D};
use crate::nn::transformer::{Transformer2DModel, TransformerConfig};

/// Settings every block of one UNet shares.
#[derive(Debug, Clone, Copy)]
pub struct Shared {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
    pub downsample_padding: usize,
}

impl Shared {
    fn resnet(&self, in_channels: usize, out_channels: usize, output_scale_factor: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, depth: usize, context_dim: usize) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads,
            depth,
            context_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

fn transformers(vb: &VarBuilder, plan: &LevelPlan, shared: &Shared) -> candle_core::Result<Vec<Transformer2DModel>> {
    let Some(depths) = &plan.transformer_depths else { return Ok(Vec::new()) };
    depths
        .iter()
        .enumerate()
        .map(|(i, &depth)| {
            let cfg = shared.transformer(plan.out_channels, plan.heads, depth, plan.cross_attention_dim);
            Transformer2DModel::new(vb.pp("attentions").pp(i), &cfg)
        })
        .collect()
}

/// One level of the encoder path.
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, plan: &LevelPlan, shared: &Shared) -> candle_core::Result<Self> {
        let resnets = (0..plan.layers)
            .map(|i| {
                let cin = if i == 0 { plan.in_channels } else { plan.out_channels };
                let cfg = shared.resnet(cin, plan.out_channels, 1.0);
                ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg)
            })
            .collect::<candle_core::Result<_>>()?;
        let downsampler = plan
            .resample
            .then(|| {
                Downsample2D::new(
                    vb.pp("downsamplers").pp(0),
                    plan.out_channels,
                    plan.out_channels,
                    shared.downsample_padding,
                )
            })
            .transpose()?;
        Ok(Self { resnets, attentions: transformers(&vb, plan, shared)?, downsampler })
    }

    /// Returns the block's output and appends every intermediate state to `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(h, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                h = attention.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) pairs.
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        (depth, heads, context_dim): (usize, usize, usize),
        scale: f64,
        shared: &Shared,
    ) -> candle_core::Result<Self> {
        let cfg = shared.resnet(channels, channels, scale);
        Ok(Self {
            resnets: (0..2)
                .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg))
                .collect::<candle_core::Result<_>>()?,
            attentions: vec![Transformer2DModel::new(
                vb.pp("attentions").pp(0),
                &shared.transformer(channels, heads, depth, context_dim),
            )?],
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnets[0].forward(x.clone(), Some(temb))?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attention.forward(&h, context)?;
            h = resnet.forward(h, Some(temb))?;
        }
        Ok(h)
    }
}

/// One level of the decoder path; each ResNet consumes one skip connection.
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn new(vb: VarBuilder, plan: &LevelPlan, shared: &Shared) -> candle_core::Result<Self> {
        let resnets = (0..plan.layers)
            .map(|i| {
                let skip = if i + 1 == plan.layers { plan.in_channels } else { plan.out_channels };
                let cin = if i == 0 { plan.prev_output_channels } else { plan.out_channels };
                let cfg = shared.resnet(cin + skip, plan.out_channels, 1.0);
                ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg)
            })
            .collect::<candle_core::Result<_>>()?;
        let upsampler = plan
            .resample
            .then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), plan.out_channels, plan.out_channels))
            .transpose()?;
        Ok(Self { resnets, attentions: transformers(&vb, plan, shared)?, upsampler })
    }

    /// The number of skip connections the block consumes.
    pub fn skips_needed(&self) -> usize {
        self.resnets.len()
    }

    /// `skips`: this block's skip connections, in the order they were produced.
    /// `upsample_size`: the spatial size of the next level's skips.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        // res_hidden_states = res_hidden_states_tuple[-1], consumed last-first
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            // [B,C,H,W] ++ [B,Cs,H,W] -> [B,C+Cs,H,W]
            h = resnet.forward(Tensor::cat(&[&h, skip], 1)?, Some(temb))?;
            if let Some(attention) = self.attentions.get(i) {
                h = attention.forward(&h, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
