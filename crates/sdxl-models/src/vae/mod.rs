//! The SDXL VAE (diffusers' `AutoencoderKL`): the encoder maps RGB in [-1, 1] to the latent
//! distribution, whose mean we use; the decoder turns latents back into RGB.
//!
//! Shapes: image `[B, in_channels, H, W]` ↔ latents `[B, latent_channels, H/f, W/f]` with
//! `f = 2^(levels-1)`, the VAE scale factor. The VAE always runs in f32.

pub mod decoder;
pub mod encoder;
mod tiling;
pub mod tiny;

use std::path::Path;

use crate::nn::Conv2d;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use self::decoder::Decoder;
use self::encoder::Encoder;
use crate::config::read_json;
use crate::nn::conv2d;
use crate::weights::{Checkpoint, ComponentWeights};
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
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// The image size the VAE was trained on; it sets the tile size of tiled decoding.
    #[serde(default = "thirty_two")]
    pub sample_size: usize,
}

/// Images wider or taller than this many pixels are decoded in tiles: SDXL's native 1024²
/// still decodes in one piece, exactly like diffusers' default; 2048² then needs the memory
/// of a 1024² decode instead of four times that.
pub const TILED_ABOVE: usize = 1024;

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn silu() -> String {
    "silu".into()
}
fn yes() -> bool {
    true
}

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
        for (key, types, supported) in [
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
        ] {
            if let Some(kind) = types.iter().find(|k| *k != supported) {
                return Err(Error::config(path, format!("unsupported entry {kind:?} in `{key}`")));
            }
            if !types.is_empty() && types.len() != self.block_out_channels.len() {
                return Err(Error::config(path, format!("`{key}` and `block_out_channels` differ in length")));
            }
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(Error::config(
                path,
                format!("channel count {c} is not a multiple of `norm_num_groups` = {}", self.norm_num_groups),
            ));
        }
        Ok(())
    }
}

/// The VAE: encoder for img2img and inpainting, decoder for every generation.
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
}

impl Vae {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (in f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let weights = ComponentWeights::diffusers(Checkpoint::open(dir, "diffusion_pytorch_model")?);
        Self::load_from(dir, &weights, device)
    }

    /// Loads the architecture from `dir/config.json` and the weights from `weights` (a
    /// standalone VAE file, or the VAE of a single-file checkpoint).
    pub fn load_from(dir: &Path, weights: &ComponentWeights, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config: VaeConfig = read_json(&config_path)?;
        config.validate(&config_path)?;
        let levels = config.block_out_channels.len();
        let vb = weights.var_builder(|prefix| crate::sgm::vae_map(levels, prefix), None, DType::F32, device);
        let build = || -> candle_core::Result<Self> {
            let l = config.latent_channels;
            Ok(Self {
                encoder: Encoder::new(vb.pp("encoder"), &config)?,
                quant_conv: config
                    .use_quant_conv
                    .then(|| conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv")))
                    .transpose()?,
                post_quant_conv: config
                    .use_post_quant_conv
                    .then(|| conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv")))
                    .transpose()?,
                decoder: Decoder::new(vb.pp("decoder"), &config)?,
                config: config.clone(),
            })
        };
        let vae = build().map_err(|e| weights.error(e))?;
        weights.finish(&[])?;
        Ok(vae)
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The mean of the latent distribution of `image` (`[B,3,H,W]` in [-1, 1]):
    /// `[B, L, H/f, W/f]`, not yet multiplied by `scaling_factor`.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        let h = self.encoder.forward(&image.to_dtype(DType::F32)?)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&h)?,
            None => h,
        };
        // DiagonalGaussianDistribution: mean, logvar = moments.chunk(2, dim=1)
        Ok(moments.narrow(1, 0, self.config.latent_channels)?)
    }

    /// Decodes latents that are already divided by `scaling_factor`: `[B,L,h,w] -> [B,3,h·f,w·f]`.
    /// Images wider or taller than [`TILED_ABOVE`] are decoded in tiles
    /// ([`Self::decode_tiled`]), which bounds memory; smaller ones in one piece, as diffusers
    /// does by default.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        if h.max(w) * self.scale_factor() > TILED_ABOVE && h.max(w) > self.tile_latent_size() {
            return self.decode_tiled(latents);
        }
        self.decode_in_one_piece(latents)
    }

    /// Decodes without tiling, whatever the size.
    pub fn decode_in_one_piece(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.decoder.forward(&self.post_quant(latents)?)?)
    }

    /// Decodes in overlapping tiles exactly as diffusers' `AutoencoderKL` with `enable_tiling()`
    /// (see [`tiling`]); the same as [`Self::decode`] when the latents fit in one tile.
    pub fn decode_tiled(&self, latents: &Tensor) -> Result<Tensor> {
        let z = self.post_quant(latents)?;
        tiling::decode_tiled(&z, self.tile_latent_size(), self.config.sample_size, |tile| {
            Ok(self.decoder.forward(tile)?)
        })
    }

    fn post_quant(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(DType::F32)?;
        Ok(match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        })
    }

    /// Image pixels per latent pixel along each axis (8 for SDXL).
    pub fn scale_factor(&self) -> usize {
        1 << self.config.block_out_channels.len().saturating_sub(1)
    }

    /// The tile edge in latent pixels (diffusers' `tile_latent_min_size`; 128 for SDXL).
    fn tile_latent_size(&self) -> usize {
        (self.config.sample_size / self.scale_factor()).max(1)
    }
}
