//! TAESD-XL, the "tiny decoder": diffusers' `AutoencoderTiny`, decoder half
//! ([`vae.py` `DecoderTiny`](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/autoencoders/vae.py),
//! [`unet_2d_blocks.py` `AutoencoderTinyBlock`](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_blocks.py)).
//! A distilled stand-in for the SDXL VAE decoder (`madebyollin/taesdxl`: 1.2 M parameters
//! against 49 M, plain 3×3 convolutions and ReLU, no normalisation or attention), for fast
//! previews and fast final images at some loss of detail.
//!
//! Shapes: latents `[B, latent_channels, h, w]` → image `[B, out_channels, h·f, w·f]` with
//! `f = 2^(stages − 1)` (8 for TAESD-XL). Runs in f32, like the VAE, and returns the same
//! contract as [`super::Vae::decode`]: roughly [-1, 1], not clamped, so
//! [`crate::pixels::RgbImage::from_tensor`] turns it into bytes exactly as diffusers'
//! `VaeImageProcessor` does.
//!
//! Scaling: the decoder takes latents already divided by *its own* `scaling_factor`, which is
//! 1.0 for TAESD-XL: it decodes the UNet's latents as they are, not divided by the SDXL VAE's
//! 0.13025. diffusers' SDXL pipeline divides by `pipe.vae.config.scaling_factor` whichever VAE
//! it holds, and ignores `shift_factor`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::checkpoint::Checkpoint;
use crate::config::read_json;
use crate::key_map::{KeyMap, Stored};
use crate::nn::{conv2d, div_scalar, Conv2d};
use crate::weights::ComponentWeights;
use crate::{Error, Result};

/// `config.json` of an `AutoencoderTiny` (the decoder's keys and `scaling_factor`; encoder
/// keys are ignored). Missing keys take diffusers' defaults, which are TAESD-XL's values.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct TinyDecoderConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    /// Width of each stage. diffusers' `DecoderTiny` only runs with one width for all
    /// stages (its blocks never change the channel count), so they must be equal.
    pub decoder_block_out_channels: Vec<usize>,
    /// `AutoencoderTinyBlock`s per stage.
    pub num_decoder_blocks: Vec<usize>,
    /// Only `"relu"` (TAESD's); each block's final `fuse` is a ReLU whatever this says.
    pub act_fn: String,
    /// Only `"nearest"`.
    pub upsample_fn: String,
    /// Only 2.
    pub upsampling_scaling_factor: usize,
    /// The pipeline divides latents by this before decoding (1.0 for TAESD-XL).
    pub scaling_factor: f64,
}

impl Default for TinyDecoderConfig {
    /// diffusers' `AutoencoderTiny` defaults, which `madebyollin/taesdxl` uses unchanged.
    fn default() -> Self {
        Self {
            latent_channels: 4,
            out_channels: 3,
            decoder_block_out_channels: vec![64; 4],
            num_decoder_blocks: vec![3, 3, 3, 1],
            act_fn: "relu".into(),
            upsample_fn: "nearest".into(),
            upsampling_scaling_factor: 2,
            scaling_factor: 1.0,
        }
    }
}

impl TinyDecoderConfig {
    /// Reads and checks an `AutoencoderTiny` `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate().map_err(|message| Error::config(path, message))?;
        Ok(config)
    }

    /// Pixels per latent cell along each axis (8 for TAESD-XL).
    pub fn scale_factor(&self) -> usize {
        self.upsampling_scaling_factor.pow(self.decoder_block_out_channels.len().saturating_sub(1) as u32)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let widths = &self.decoder_block_out_channels;
        if widths.is_empty() {
            return Err("`decoder_block_out_channels` is empty".into());
        }
        if widths.len() != self.num_decoder_blocks.len() {
            return Err(format!(
                "`decoder_block_out_channels` has {} entries but `num_decoder_blocks` has {}",
                widths.len(),
                self.num_decoder_blocks.len()
            ));
        }
        if widths.iter().any(|&c| c != widths[0]) || widths[0] == 0 {
            return Err(format!("`decoder_block_out_channels` must be one non-zero width repeated, got {widths:?}"));
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            return Err("`latent_channels` and `out_channels` must be positive".into());
        }
        if self.act_fn != "relu" {
            return Err(format!("unsupported `act_fn` {:?} (only \"relu\")", self.act_fn));
        }
        if self.upsample_fn != "nearest" {
            return Err(format!("unsupported `upsample_fn` {:?} (only \"nearest\")", self.upsample_fn));
        }
        if self.upsampling_scaling_factor != 2 {
            return Err(format!("unsupported `upsampling_scaling_factor` {} (only 2)", self.upsampling_scaling_factor));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!("`scaling_factor` must be positive, got {}", self.scaling_factor));
        }
        Ok(())
    }
}

/// `AutoencoderTinyBlock` with equal in/out widths (so `skip` is the identity):
/// `relu(conv(x) + x)`, `conv` = conv, ReLU, conv, ReLU, conv.
struct Block {
    conv: [Conv2d; 3],
}

impl Block {
    fn new(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        let c = |i: usize| conv2d(channels, channels, 3, 1, 1, vb.pp("conv").pp(i));
        // nn.Sequential(conv, act, conv, act, conv): the convolutions are entries 0, 2, 4
        Ok(Self { conv: [c(0)?, c(2)?, c(4)?] })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv[0].forward(x)?.relu()?;
        let h = self.conv[1].forward(&h)?.relu()?;
        // self.fuse(self.conv(x) + self.skip(x))
        (self.conv[2].forward(&h)? + x)?.relu()
    }
}

/// One stage: its blocks, then (all but the last stage) nearest 2× upsampling and a 3×3
/// convolution without bias; the last stage's convolution maps to `out_channels`, with bias.
struct Stage {
    blocks: Vec<Block>,
    upsample: bool,
    conv: Conv2d,
}

/// The TAESD decoder. Build it with [`TinyDecoder::load`] (a diffusers directory),
/// [`TinyDecoder::load_file`] (one safetensors file in either layout) or
/// [`TinyDecoder::load_from`].
pub struct TinyDecoder {
    config: TinyDecoderConfig,
    conv_in: Conv2d,
    stages: Vec<Stage>,
}

/// The key diffusers-layout files start with, and the one an original TAESD decoder file
/// (`taesdxl_decoder.safetensors`: `nn.Sequential` indices, `Clamp` at 0) starts with.
const DIFFUSERS_FIRST: &str = "decoder.layers.0.weight";
const ORIGINAL_FIRST: &str = "1.weight";

impl TinyDecoder {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors`, a
    /// diffusers `AutoencoderTiny` such as `madebyollin/taesdxl`; the encoder's tensors are
    /// ignored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = TinyDecoderConfig::load(&dir.join("config.json"))?;
        let weights = ComponentWeights::diffusers(Checkpoint::open(dir, "diffusion_pytorch_model")?);
        Self::load_from(config, &weights, device)
    }

    /// Loads one safetensors file, telling the layout by its keys: diffusers'
    /// (`decoder.layers.*`, e.g. `diffusion_pytorch_model.safetensors`) or the original TAESD
    /// decoder's (`1.weight`, …, e.g. `taesdxl_decoder.safetensors`, which comes without a
    /// config: pass [`TinyDecoderConfig::default`] for it).
    pub fn load_file(path: &Path, config: TinyDecoderConfig, device: &Device) -> Result<Self> {
        let checkpoint = Checkpoint::open_files(vec![path.to_path_buf()])?;
        let weights = if checkpoint.contains(DIFFUSERS_FIRST) {
            ComponentWeights::diffusers(checkpoint)
        } else if checkpoint.contains(ORIGINAL_FIRST) {
            ComponentWeights::original(checkpoint, "")
        } else {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!(
                    "holds neither `{DIFFUSERS_FIRST}` (a diffusers AutoencoderTiny) nor `{ORIGINAL_FIRST}` \
                     (an original TAESD decoder)"
                ),
            });
        };
        Self::load_from(config, &weights, device)
    }

    /// Builds the decoder from `weights` in diffusers' names (`decoder.layers.{i}.…`; encoder
    /// tensors ignored) or, for [`Layout::Original`](crate::weights::Layout::Original), the
    /// original TAESD names under its prefix (`{i+1}.…`: the original `nn.Sequential` starts
    /// with its clamp). [`ComponentWeights::random`] builds a full-size one for benchmarks.
    pub fn load_from(config: TinyDecoderConfig, weights: &ComponentWeights, device: &Device) -> Result<Self> {
        config.validate().map_err(|message| Error::InvalidArgument(format!("tiny decoder config: {message}")))?;
        let vb = weights.var_builder(original_map, None, DType::F32, device);
        let decoder = Self::new(vb.pp("decoder"), config).map_err(|e| weights.error(e))?;
        weights.finish(&["encoder."])?;
        Ok(decoder)
    }

    fn new(vb: VarBuilder, config: TinyDecoderConfig) -> candle_core::Result<Self> {
        let layers = vb.pp("layers");
        let width = config.decoder_block_out_channels[0];
        // layers = [Conv2d(latent, width), act] + per stage: blocks, (Upsample, Conv2d(bias=False)) or the final Conv2d
        let conv_in = conv2d(config.latent_channels, width, 3, 1, 1, layers.pp(0))?;
        let mut index = 2;
        let last = config.num_decoder_blocks.len() - 1;
        let mut stages = Vec::with_capacity(config.num_decoder_blocks.len());
        for (i, &count) in config.num_decoder_blocks.iter().enumerate() {
            let blocks =
                (index..index + count).map(|j| Block::new(layers.pp(j), width)).collect::<candle_core::Result<_>>()?;
            index += count;
            let upsample = i != last;
            let conv = if upsample {
                index += 1; // nn.Upsample has no parameters
                conv3x3_without_bias(width, width, layers.pp(index))?
            } else {
                conv2d(width, config.out_channels, 3, 1, 1, layers.pp(index))?
            };
            index += 1;
            stages.push(Stage { blocks, upsample, conv });
        }
        Ok(Self { config, conv_in, stages })
    }

    /// The parsed config.
    pub fn config(&self) -> &TinyDecoderConfig {
        &self.config
    }

    /// Image pixels per latent pixel along each axis (8 for TAESD-XL).
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// Decodes latents that are already divided by `config().scaling_factor`:
    /// `[B,L,h,w] -> [B,3,h·f,w·f]` in f32, roughly [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = latents.to_dtype(DType::F32)?;
        // x = torch.tanh(x / 3) * 3: a soft clamp of the latents to ±3
        let z = (div_scalar(&z, 3.0)?.tanh()? * 3.0)?;
        let mut h = self.conv_in.forward(&z)?.relu()?;
        for stage in &self.stages {
            for block in &stage.blocks {
                h = block.forward(&h)?;
            }
            // [B,C,H,W] -> [B,C,2H,2W] (nn.Upsample nearest, fused into the convolution)
            h = if stage.upsample { stage.conv.forward_upsampled(&h)? } else { stage.conv.forward(&h)? };
        }
        // x.mul(2).sub(1): TAESD's [0, 1] to diffusers' [-1, 1]
        Ok(h.affine(2.0, -1.0)?)
    }
}

/// `nn.Conv2d(cin, cout, 3, padding=1, bias=False)` as the project's [`Conv2d`] (and so its
/// fast kernels): the checkpoint's weight with a zero bias, which adds nothing.
fn conv3x3_without_bias(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let weight = vb.get((cout, cin, 3, 3), "weight")?.to_dtype(DType::F32)?;
    let bias = Tensor::zeros(cout, DType::F32, weight.device())?;
    let device = weight.device().clone();
    let tensors = HashMap::from([("weight".to_string(), weight), ("bias".to_string(), bias)]);
    Conv2d::new(cin, cout, 3, 1, 1, VarBuilder::from_tensors(tensors, DType::F32, &device))
}

/// Where the original TAESD decoder file stores each diffusers name:
/// `decoder.layers.{i}.rest` → `{prefix}{i+1}.rest`.
fn original_map(prefix: &str) -> KeyMap {
    let prefix = prefix.to_string();
    KeyMap::new(move |name| {
        let original = name
            .strip_prefix("decoder.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(index, rest)| Some(format!("{}.{rest}", index.parse::<usize>().ok()? + 1)))
            .unwrap_or_else(|| format!("?{name}"));
        Stored::Key(format!("{prefix}{original}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_are_the_sequential_index_plus_one() {
        let map = original_map("");
        assert_eq!(map.locate("decoder.layers.0.weight"), Stored::Key("1.weight".into()));
        assert_eq!(map.locate("decoder.layers.17.conv.4.bias"), Stored::Key("18.conv.4.bias".into()));
        assert_eq!(map.locate("encoder.layers.0.weight"), Stored::Key("?encoder.layers.0.weight".into()));
    }

    #[test]
    fn defaults_are_taesdxl_and_scale_by_eight() {
        let config = TinyDecoderConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.scale_factor(), 8);
        let parsed: TinyDecoderConfig = serde_json::from_str(r#"{"_class_name": "AutoencoderTiny"}"#).unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn random_weights_build_the_full_size_decoder() {
        let decoder =
            TinyDecoder::load_from(TinyDecoderConfig::default(), &ComponentWeights::random(), &Device::Cpu).unwrap();
        let latents = Tensor::zeros((1, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(decoder.decode(&latents).unwrap().dims(), [1, 3, 16, 24]);
    }

    #[test]
    fn unequal_widths_are_refused() {
        let config = TinyDecoderConfig { decoder_block_out_channels: vec![64, 64, 32, 64], ..Default::default() };
        assert!(config.validate().unwrap_err().contains("decoder_block_out_channels"));
        let config = TinyDecoderConfig { act_fn: "silu".into(), ..Default::default() };
        assert!(config.validate().unwrap_err().contains("act_fn"));
    }
}
