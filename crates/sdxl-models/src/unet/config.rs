//! `unet/config.json` (diffusers' `UNet2DConditionModel` config), resolved into one plan per
//! level so the model code never re-derives list/int variants.

use std::path::Path;

use serde::Deserialize;

use crate::config::{read_json, PerLevel};
use crate::{Error, Result};

/// The keys of `unet/config.json` this implementation reads; unknown keys are ignored and
/// keys whose non-default values we cannot honour are rejected in [`UNetConfig::resolve`].
/// (`resnet_out_scale_factor` is not read: diffusers hands it only to block types we do not
/// support, such as `ResnetDownsampleBlock2D`, so it never changes an SDXL-style UNet.)
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: PerLevel<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps")]
    pub norm_eps: f64,
    #[serde(default = "cross_dim")]
    pub cross_attention_dim: PerLevel<usize>,
    #[serde(default = "one_layer")]
    pub transformer_layers_per_block: PerLevel<PerLevel<usize>>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerLevel<usize>>>,
    #[serde(default = "eight")]
    pub attention_head_dim: PerLevel<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerLevel<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: PerLevel<bool>,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
}

impl Default for PerLevel<bool> {
    fn default() -> Self {
        PerLevel::Same(false)
    }
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn eight() -> PerLevel<usize> {
    PerLevel::Same(8)
}
fn two() -> PerLevel<usize> {
    PerLevel::Same(2)
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn eps() -> f64 {
    1e-5
}
fn thirty_two() -> usize {
    32
}
fn cross_dim() -> PerLevel<usize> {
    PerLevel::Same(1280)
}
fn one_layer() -> PerLevel<PerLevel<usize>> {
    PerLevel::Same(PerLevel::Same(1))
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_shift() -> String {
    "default".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

/// One level of the down path (or, mirrored, of the up path).
#[derive(Debug, Clone)]
pub struct LevelPlan {
    pub in_channels: usize,
    pub out_channels: usize,
    /// ResNet layers in the block (down: `layers_per_block`, up: `layers_per_block + 1`).
    pub layers: usize,
    /// Transformer depth after each ResNet, `None` for blocks without attention.
    pub transformer_depths: Option<Vec<usize>>,
    pub heads: usize,
    pub cross_attention_dim: usize,
    /// Up path only: channels coming from the level below.
    pub prev_output_channels: usize,
    /// Whether the block ends with a down/upsampler.
    pub resample: bool,
}

/// The resolved UNet architecture.
#[derive(Debug, Clone)]
pub struct UNetPlan {
    pub down: Vec<LevelPlan>,
    /// Mid block: transformer depth, heads, cross-attention width (`None`: no mid block).
    pub mid: Option<(usize, usize, usize)>,
    pub up: Vec<LevelPlan>,
    pub time_embed_dim: usize,
    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` for `text_time`.
    pub text_time: Option<(usize, usize)>,
}

impl UNetConfig {
    /// Reads `config.json` from the UNet folder.
    pub fn load(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// The cross-attention width of every level.
    pub fn cross_attention_dims(&self) -> Vec<usize> {
        match &self.cross_attention_dim {
            PerLevel::Same(d) => vec![*d],
            PerLevel::Each(v) => v.clone(),
        }
    }

    /// Checks what we support and expands per-level values; `path` names the file in errors.
    pub fn resolve(&self, path: &Path) -> Result<UNetPlan> {
        self.reject_unsupported(path)?;
        let levels = self.block_out_channels.len();
        if levels == 0 || self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(Error::config(
                path,
                "`down_block_types`, `up_block_types` and `block_out_channels` must have the same, non-zero length",
            ));
        }
        let layers = self.layers_per_block.expand(levels, "layers_per_block", path)?;
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim (the SDXL
        // configs store head *counts* under `attention_head_dim`).
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(levels, "num_attention_heads", path)?,
            None => self.attention_head_dim.expand(levels, "attention_head_dim", path)?,
        };
        let cross = self.cross_attention_dim.expand(levels, "cross_attention_dim", path)?;
        let depths: Vec<PerLevel<usize>> = match &self.transformer_layers_per_block {
            PerLevel::Same(inner) => vec![inner.clone(); levels],
            PerLevel::Each(v) if v.len() == levels => v.clone(),
            PerLevel::Each(v) => {
                return Err(Error::config(
                    path,
                    format!("`transformer_layers_per_block` has {} entries, the model has {levels} levels", v.len()),
                ))
            }
        };
        let channels = &self.block_out_channels;
        for (i, (&c, &h)) in channels.iter().zip(&heads).enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(Error::config(
                    path,
                    format!(
                        "`block_out_channels[{i}]` = {c} is not a multiple of `norm_num_groups` = {}",
                        self.norm_num_groups
                    ),
                ));
            }
            if h == 0 || c % h != 0 {
                return Err(Error::config(
                    path,
                    format!("`block_out_channels[{i}]` = {c} is not a multiple of its head count {h}"),
                ));
            }
        }

        let mut down = Vec::with_capacity(levels);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let attention = block_has_attention(kind, "DownBlock2D", "CrossAttnDownBlock2D", path)?;
            let depth_list = depths[i].expand(layers[i], "transformer_layers_per_block", path)?;
            down.push(LevelPlan {
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                layers: layers[i],
                transformer_depths: attention.then_some(depth_list),
                heads: heads[i],
                cross_attention_dim: cross[i],
                prev_output_channels: 0,
                resample: i + 1 < levels,
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let depth = match &depths[levels - 1] {
                    PerLevel::Same(d) => *d,
                    PerLevel::Each(v) => v.first().copied().unwrap_or(1),
                };
                Some((depth, heads[levels - 1], cross[levels - 1]))
            }
            Some(other) => return Err(Error::config(path, format!("unsupported `mid_block_type` {other:?}"))),
        };

        let reversed_channels: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(levels);
        let mut output_channels = reversed_channels[0];
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let level = levels - 1 - i;
            let attention = block_has_attention(kind, "UpBlock2D", "CrossAttnUpBlock2D", path)?;
            let n = layers[level] + 1;
            let depth_list = match &self.reverse_transformer_layers_per_block {
                Some(rev) => rev
                    .get(i)
                    .ok_or_else(|| Error::config(path, "`reverse_transformer_layers_per_block` is too short"))?
                    .expand(n, "reverse_transformer_layers_per_block", path)?,
                None => depths[level].expand(n, "transformer_layers_per_block", path)?,
            };
            let prev = output_channels;
            output_channels = reversed_channels[i];
            up.push(LevelPlan {
                in_channels: reversed_channels[(i + 1).min(levels - 1)],
                out_channels: output_channels,
                layers: n,
                transformer_depths: attention.then_some(depth_list),
                heads: heads[level],
                cross_attention_dim: cross[level],
                prev_output_channels: prev,
                resample: i + 1 < levels,
            });
        }

        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let dim = self
                    .addition_time_embed_dim
                    .ok_or_else(|| Error::config(path, "`text_time` needs `addition_time_embed_dim`"))?;
                let input = self
                    .projection_class_embeddings_input_dim
                    .ok_or_else(|| Error::config(path, "`text_time` needs `projection_class_embeddings_input_dim`"))?;
                Some((dim, input))
            }
            Some(other) => return Err(Error::config(path, format!("unsupported `addition_embed_type` {other:?}"))),
        };

        Ok(UNetPlan { down, mid, up, time_embed_dim: self.time_embedding_dim.unwrap_or(channels[0] * 4), text_time })
    }

    fn reject_unsupported(&self, path: &Path) -> Result<()> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| {
            Err(Error::config(path, format!("unsupported `{key}` = {value:?}")))
        };
        if self.act_fn != "silu" {
            return unsupported("act_fn", &self.act_fn);
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.attention_type != "default" {
            return unsupported("attention_type", &self.attention_type);
        }
        if self.class_embed_type.is_some() {
            return unsupported("class_embed_type", &self.class_embed_type);
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim", &self.encoder_hid_dim);
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim", &self.time_cond_proj_dim);
        }
        if self.time_embedding_act_fn.is_some() {
            return unsupported("time_embedding_act_fn", &self.time_embedding_act_fn);
        }
        if self.timestep_post_act.is_some() {
            return unsupported("timestep_post_act", &self.timestep_post_act);
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention", &true);
        }
        let only_cross = match &self.only_cross_attention {
            PerLevel::Same(b) => *b,
            PerLevel::Each(v) => v.iter().any(|b| *b),
        };
        if only_cross {
            return unsupported("only_cross_attention", &true);
        }
        if self.resnet_skip_time_act {
            return unsupported("resnet_skip_time_act", &true);
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(Error::config(path, "`conv_in_kernel` and `conv_out_kernel` must be odd"));
        }
        Ok(())
    }
}

fn block_has_attention(kind: &str, plain: &str, cross: &str, path: &Path) -> Result<bool> {
    if kind == plain {
        Ok(false)
    } else if kind == cross {
        Ok(true)
    } else {
        Err(Error::config(path, format!("unsupported block type {kind:?} (expected {plain} or {cross})")))
    }
}
