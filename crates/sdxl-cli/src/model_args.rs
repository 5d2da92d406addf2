//! The flags that say where a model's parts come from, shared by `generate` and `serve`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use sdxl_engine::model::Overrides;
use sdxl_models::lora::{parse_lora_arg, LoraFile};
use sdxl_models::nn::linear::Quantization;
use sdxl_models::pipeline::Decoder;

use crate::device::{self, DeviceArg};

/// Compute dtype of the UNet and text encoders.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// For a single-file --model: a diffusers directory whose configs, tokenizers and scheduler
    /// describe it (default: SDXL base's, built in).
    #[arg(long, env = "SDXL_CONFIG")]
    pub config: Option<PathBuf>,
    /// UNet weights used instead of the model's (diffusers or original key layout, e.g.
    /// ByteDance's sdxl_lightning_4step_unet.safetensors); the architecture stays the model's.
    #[arg(long, env = "SDXL_UNET")]
    pub unet: Option<PathBuf>,
    /// VAE used instead of the model's: a diffusers vae/ folder, or a weights file in either key
    /// layout (e.g. the fp16-fix VAE).
    #[arg(long, env = "SDXL_VAE")]
    pub vae: Option<PathBuf>,
    /// LoRA weights to fuse, FILE or FILE:SCALE (default scale 1); repeat for several
    /// (SDXL_LORAS: comma-separated). diffusers/PEFT and kohya files.
    #[arg(long = "lora", env = "SDXL_LORAS", value_delimiter = ',', value_parser = parse_lora_arg)]
    pub loras: Vec<LoraFile>,
    /// Override the scheduler's prediction type (epsilon, sample, v_prediction); `sample` is
    /// set automatically for ByteDance's 1-step x0 UNet.
    #[arg(long, env = "SDXL_PREDICTION_TYPE")]
    pub prediction_type: Option<String>,
    /// Where the model runs: cpu, cuda, cuda:N, or auto (the first GPU where this build has
    /// CUDA support and one answers, else the CPU).
    #[arg(long, env = "SDXL_DEVICE", default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute dtype of the UNet and text encoders (default: f32 on the CPU, f16 on a GPU; the
    /// VAE always decodes in f32).
    #[arg(long, env = "SDXL_DTYPE", value_enum)]
    pub dtype: Option<Dtype>,
    /// Keep the weight matrices in this dtype while computing in --dtype: `--weights-dtype f16`
    /// with f32 compute halves the memory at f32 arithmetic (default: the compute dtype; f16
    /// for what --quantize int8 leaves unquantized).
    #[arg(long, env = "SDXL_WEIGHTS_DTYPE", value_enum)]
    pub weights_dtype: Option<Dtype>,
    /// Quantize the UNet's and text encoders' linear layers (and the UNet's convolutions, on
    /// CPUs with AVX-512 VNNI) as they load: `int8` takes a fraction of their time on the CPU
    /// (f32 compute only), at a small loss (not pixel-exact); the other weight matrices are
    /// then kept in f16 unless --weights-dtype f32 says otherwise.
    #[arg(long, env = "SDXL_QUANTIZE", value_enum, default_value_t = QuantizeArg::None)]
    pub quantize: QuantizeArg,
    /// Which decoder makes the final image: `vae` (exact) or `tiny` (TAESD-XL, about 18×
    /// cheaper, softer; needs --tiny-decoder).
    #[arg(long, env = "SDXL_DECODER", value_enum, default_value_t = DecoderArg::Vae)]
    pub decoder: DecoderArg,
    /// TAESD-XL: a diffusers AutoencoderTiny folder (as `sdxl download --tiny-decoder` fetches)
    /// or a weights file in either layout. Loaded, it also makes the progress previews.
    #[arg(long, env = "SDXL_TINY_DECODER")]
    pub tiny_decoder: Option<PathBuf>,
}

/// `--quantize`: how the linear layers (and convolutions) keep their weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantizeArg {
    None,
    Int8,
}

impl From<QuantizeArg> for Quantization {
    fn from(q: QuantizeArg) -> Self {
        match q {
            QuantizeArg::None => Quantization::None,
            QuantizeArg::Int8 => Quantization::Int8,
        }
    }
}

/// `--decoder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecoderArg {
    Vae,
    Tiny,
}

impl From<DecoderArg> for Decoder {
    fn from(d: DecoderArg) -> Self {
        match d {
            DecoderArg::Vae => Decoder::Vae,
            DecoderArg::Tiny => Decoder::Tiny,
        }
    }
}

impl ModelArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            unet: self.unet.clone(),
            vae: self.vae.clone(),
            config: self.config.clone(),
            loras: self.loras.clone(),
            prediction_type: self.prediction_type.clone(),
            weights_dtype: self.weights_dtype.map(DType::from),
            quantize: self.quantize.into(),
            tiny_decoder: self.tiny_decoder.clone(),
            decoder: self.decoder.into(),
        }
    }

    /// The compute dtype on `device`: --dtype, else the device's default.
    pub fn dtype_on(&self, device: &Device) -> DType {
        self.dtype.map_or_else(|| device::default_dtype(device), DType::from)
    }

    /// Opens --device and loads the pipeline from `model` with these flags onto it.
    pub fn load(&self, model: &Path) -> anyhow::Result<sdxl_models::pipeline::Pipeline> {
        self.load_with(model, &self.overrides())
    }

    /// [`Self::load`] with `overrides` in place of the flags' own.
    pub fn load_with(&self, model: &Path, overrides: &Overrides) -> anyhow::Result<sdxl_models::pipeline::Pipeline> {
        let device = self.device.open()?;
        let dtype = self.dtype_on(&device);
        tracing::debug!(device = sdxl_engine::model::device_name(&device), ?dtype, "loading the model");
        Ok(sdxl_engine::model::load_with(model, overrides, dtype, &device)?)
    }
}

/// The name the PNG's parameters give the model: the UNet file's when one replaces the
/// model's, else the model file's or directory's, without `.safetensors`.
pub fn model_name(model: &Path, unet: Option<&Path>) -> String {
    let path = unet.unwrap_or(model);
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().to_string());
    name.strip_suffix(".safetensors").unwrap_or(&name).to_string()
}
