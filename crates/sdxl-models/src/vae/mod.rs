//! The SDXL VAE (diffusers' `AutoencoderKL`): the decoder turns latents into RGB in [-1, 1].
//!
//! Shapes: latents `[B, latent_channels, h, w]` → image `[B, out_channels, h·f, w·f]` with
//! `f = 2^(levels-1)`, the VAE scale factor. Decoding always runs in f32.

pub mod decoder;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Conv2d;
use serde::Deserialize;

use self::decoder::Decoder;
use crate::config::read_json;
use crate::nn::conv2d;
use crate::weights::Checkpoint;
use crate::{Error, Result};

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn three() -> usize { 3 }
fn four() -> usize { 4 }
fn one() -> usize { 1 }
fn thirty_two() -> usize { 32 }
fn default_scaling() -> f64 { 0.18215 }
fn silu() -> String { "silu".into() }
fn yes() -> bool { true }

impl VaeConfig {
    /// `2^(len(block_out_channels) - 1)`: pixels per latent cell along each axis.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::config(path, "`block_out_channels` is empty"));
        }
        if self.act_fn != "silu" {
            return Err(Error::config(path, format!("unsupported `act_fn` {:?}", self.act_fn)));
        }
        if self.latents_mean.is_some() || self.latents_std.is_some() {
            return Err(Error::config(path, "`latents_mean`/`latents_std` are not supported"));
        }
        for kind in &self.up_block_types {
            if kind != "UpDecoderBlock2D" {
                return Err(Error::config(path, format!("unsupported up block type {kind:?}")));
            }
        }
        if !self.up_block_types.is_empty() && self.up_block_types.len() != self.block_out_channels.len() {
            return Err(Error::config(path, "`up_block_types` and `block_out_channels` differ in length"));
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(Error::config(path, format!("channel count {c} is not a multiple of `norm_num_groups` = {}", self.norm_num_groups)));
        }
        Ok(())
    }
}

/// Tensors of the encoder half, which txt2img does not load.
const ENCODER_TENSORS: &[&str] = &["encoder.", "quant_conv."];

/// The VAE's decoding half.
pub struct Vae {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

impl Vae {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (in f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: VaeConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let checkpoint = Checkpoint::open(dir, "diffusion_pytorch_model")?;
        let vb = checkpoint.var_builder(DType::F32, device);
        let build = || -> candle_core::Result<Self> {
            let l = config.latent_channels;
            Ok(Self {
                post_quant_conv: config.use_post_quant_conv.then(|| conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))).transpose()?,
                decoder: Decoder::new(vb.pp("decoder"), &config)?,
                config: config.clone(),
            })
        };
        let vae = build().map_err(|e| checkpoint.error(e))?;
        checkpoint.finish(ENCODER_TENSORS)?;
        Ok(vae)
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes latents that are already divided by `scaling_factor`: `[B,L,h,w] -> [B,3,h·f,w·f]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(DType::F32)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        Ok(self.decoder.forward(&z)?)
    }
}
