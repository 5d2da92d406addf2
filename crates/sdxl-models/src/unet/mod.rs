//! The SDXL UNet (diffusers' `UNet2DConditionModel`), built entirely from `unet/config.json`.
//!
//! Shapes: `sample [B,Cin,h,w]`, a scalar timestep, `context [B,77,Cctx]` and, for
//! `addition_embed_type = "text_time"`, `text_embeds [B,P]` + `time_ids [B,6]`;
//! output `[B,Cout,h,w]`. Any `h`, `w` work: upsamplers return to the skip sizes.

pub mod blocks;
pub mod config;
pub mod embeddings;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Conv2d, GroupNorm};

use self::blocks::{DownBlock, MidBlock, Shared, UpBlock};
use self::config::{UNetConfig, UNetPlan};
use self::embeddings::{timestep_features, TimestepEmbedding};
use crate::nn::conv2d;
use std::sync::Arc;

use crate::lora::Component;
use crate::weights::{Checkpoint, ComponentWeights};
use crate::{Error, Result};

/// The `text_time` size conditioning: `add_time_proj` features of the six `time_ids`,
/// concatenated after the pooled text embedding, through `add_embedding`.
struct TextTimeEmbedding {
    add_embedding: TimestepEmbedding,
    time_dim: usize,
}

/// Conditioning inputs of an SDXL UNet.
pub struct Conditioning<'a> {
    /// Text context `[B, 77, Cctx]`.
    pub context: &'a Tensor,
    /// Pooled text embedding `[B, P]` (`text_embeds`).
    pub text_embeds: &'a Tensor,
    /// `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]` per batch row.
    pub time_ids: &'a [[f32; 6]],
}

pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    device: Device,
}

impl UNet {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let weights = ComponentWeights::diffusers(Checkpoint::open(dir, "diffusion_pytorch_model")?);
        Self::load_from(dir, &weights, dtype, device)
    }

    /// Loads the architecture from `dir/config.json` and the weights from `weights` (a
    /// separately distributed UNet file such as ByteDance's Lightning UNets, or the UNet of a
    /// single-file checkpoint), fusing the LoRA updates it carries.
    pub fn load_from(dir: &Path, weights: &ComponentWeights, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = UNetConfig::load(&config_path)?;
        let plan = config.resolve(&config_path)?;
        if let Some(lora) = weights.lora() {
            let names = plan.clone();
            lora.set_alias(Component::Unet, Arc::new(move |module| crate::sgm::unet_name(&names, module)));
        }
        let vb =
            weights.var_builder(|prefix| crate::sgm::unet_map(&plan, prefix), Some(Component::Unet), dtype, device);
        let unet = Self::new(vb, config, &plan, dtype, device).map_err(|e| weights.error(e))?;
        weights.finish(&[])?;
        Ok(unet)
    }

    fn new(
        vb: VarBuilder,
        config: UNetConfig,
        plan: &UNetPlan,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let channels = &config.block_out_channels;
        let c0 = channels[0];
        let shared = Shared {
            temb_channels: plan.time_embed_dim,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            use_linear_projection: config.use_linear_projection,
            downsample_padding: config.downsample_padding,
        };
        let text_time = plan
            .text_time
            .map(|(time_dim, input_dim)| -> candle_core::Result<_> {
                Ok(TextTimeEmbedding {
                    add_embedding: TimestepEmbedding::new(vb.pp("add_embedding"), input_dim, plan.time_embed_dim)?,
                    time_dim,
                })
            })
            .transpose()?;
        let down_blocks = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, level)| DownBlock::new(vb.pp("down_blocks").pp(i), level, &shared))
            .collect::<candle_core::Result<_>>()?;
        let mid_block = plan
            .mid
            .map(|mid| {
                MidBlock::new(
                    vb.pp("mid_block"),
                    channels[channels.len() - 1],
                    mid,
                    config.mid_block_scale_factor,
                    &shared,
                )
            })
            .transpose()?;
        let up_blocks = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, level)| UpBlock::new(vb.pp("up_blocks").pp(i), level, &shared))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv_in: conv2d(
                config.in_channels,
                c0,
                config.conv_in_kernel,
                1,
                (config.conv_in_kernel - 1) / 2,
                vb.pp("conv_in"),
            )?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), c0, plan.time_embed_dim)?,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(config.norm_num_groups, c0, config.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                c0,
                config.out_channels,
                config.conv_out_kernel,
                1,
                (config.conv_out_kernel - 1) / 2,
                vb.pp("conv_out"),
            )?,
            config,
            dtype,
            device: device.clone(),
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The width `text_embeds` must have for the `text_time` embedding, if the UNet has one.
    pub fn text_embeds_dim(&self) -> Option<usize> {
        let input = self.config.projection_class_embeddings_input_dim?;
        self.text_time.as_ref().map(|tt| input.saturating_sub(6 * tt.time_dim))
    }

    /// Time embedding `[B, T]` for `timestep` plus, if configured, the `text_time` embedding.
    fn embedding(&self, timestep: f32, batch: usize, cond: &Conditioning) -> Result<Tensor> {
        let cfg = &self.config;
        let c0 = cfg.block_out_channels[0];
        // t_emb = time_proj(timesteps).to(sample.dtype); emb = time_embedding(t_emb)
        let features =
            timestep_features(&vec![timestep; batch], c0, cfg.flip_sin_to_cos, cfg.freq_shift, &self.device)?;
        let mut emb = self.time_embedding.forward(&features, self.dtype)?;
        if let Some(tt) = &self.text_time {
            if cond.time_ids.len() != batch || cond.text_embeds.dim(0)? != batch {
                return Err(Error::InvalidArgument(format!(
                    "unet: conditioning batch differs from sample batch {batch}"
                )));
            }
            let pooled_dim = cond.text_embeds.dim(1)?;
            if Some(pooled_dim) != self.text_embeds_dim() {
                return Err(Error::InvalidArgument(format!(
                    "unet: text_embeds width {pooled_dim} + 6 × addition_time_embed_dim {} does not match `projection_class_embeddings_input_dim`",
                    tt.time_dim
                )));
            }
            let ids: Vec<f32> = cond.time_ids.iter().flatten().copied().collect();
            // time_embeds = add_time_proj(time_ids.flatten()).reshape(B, -1): [B*6, d] -> [B, 6d]
            let time_embeds = timestep_features(&ids, tt.time_dim, cfg.flip_sin_to_cos, cfg.freq_shift, &self.device)?
                .reshape((batch, 6 * tt.time_dim))?
                .to_dtype(self.dtype)?;
            // add_embeds = concat([text_embeds, time_embeds], -1): [B, P + 6d]
            let add_embeds = Tensor::cat(&[&cond.text_embeds.to_dtype(self.dtype)?, &time_embeds], 1)?;
            emb = (emb + tt.add_embedding.forward(&add_embeds, self.dtype)?)?;
        }
        Ok(emb)
    }

    /// One denoiser evaluation.
    pub fn forward(&self, sample: &Tensor, timestep: f32, cond: &Conditioning) -> Result<Tensor> {
        let (batch, _, _, _) = sample.dims4()?;
        let out_dtype = sample.dtype();
        let sample = sample.to_dtype(self.dtype)?;
        let context = cond.context.to_dtype(self.dtype)?;
        let temb = self.embedding(timestep, batch, cond)?;
        let mut h = if self.config.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample };
        h = self.conv_in.forward(&h)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &temb, &context, &mut skips)?;
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &temb, &context)?;
        }
        for block in &self.up_blocks {
            let take = block.skips_needed();
            let block_skips = skips.split_off(skips.len() - take);
            let upsample_size = match skips.last() {
                Some(next) => Some((next.dim(2)?, next.dim(3)?)),
                None => None,
            };
            h = block.forward(&h, &block_skips, &temb, &context, upsample_size)?;
        }
        let h = self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)?;
        Ok(h.to_dtype(out_dtype)?)
    }
}
