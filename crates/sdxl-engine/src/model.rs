//! Loading an SDXL model into a [`Pipeline`], from any of the layouts it is published in.
//!
//! - A diffusers directory: `model_index.json` and the folders `unet/`, `vae/`,
//!   `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; each
//!   model folder has a `config.json` and `*.safetensors` (or `*.fp16.safetensors`) weights.
//! - A single-file checkpoint in the original (SGM) layout: weights only, with the configs,
//!   tokenizers and scheduler of SDXL base (or of a diffusers directory given as `config`).
//!
//! Either can have its UNet or VAE replaced by another file, and LoRA files fused in.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sdxl_models::clip::text_model::ClipTextModel;
use sdxl_models::clip::tokenizer::ClipTokenizer;
use sdxl_models::lora::{LoraFile, LoraSet};
use sdxl_models::nn::linear::{self, Quantization};
use sdxl_models::pipeline::{Components, Decoder, Pipeline};
use sdxl_models::scheduler::{Scheduler, SchedulerConfig};
use sdxl_models::sgm;
use sdxl_models::unet::UNet;
use sdxl_models::vae::tiny::{TinyDecoder, TinyDecoderConfig};
use sdxl_models::vae::Vae;
use sdxl_models::weights::{Checkpoint, ComponentWeights};
use serde::Deserialize;

use crate::{Error, Result};

/// The folders every SDXL description must have.
const CONFIG_FOLDERS: [&str; 7] =
    ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"];

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
}

fn yes() -> bool {
    true
}

/// Where a model's parts come from beyond its directory or file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A UNet weights file (diffusers or original key layout) used instead of the model's;
    /// the architecture still comes from the model's `unet/config.json`.
    pub unet: Option<PathBuf>,
    /// A VAE: a diffusers `vae/` folder (config and weights), or a weights file (diffusers or
    /// original layout) for the model's VAE config, such as the fp16-fix VAE.
    pub vae: Option<PathBuf>,
    /// For single-file checkpoints: a diffusers directory whose configs, tokenizers and
    /// scheduler describe the model, instead of SDXL base's.
    pub config: Option<PathBuf>,
    /// LoRA files fused into the UNet and text encoders, in order.
    pub loras: Vec<LoraFile>,
    /// Replaces the scheduler's `prediction_type` (`epsilon`, `sample`, `v_prediction`).
    pub prediction_type: Option<String>,
    /// Keeps every part's matrices and convolution kernels in this dtype (f16 or bf16: half
    /// the memory of f32) while the arithmetic runs in the compute dtype; `None` keeps them in
    /// the compute dtype.
    pub weights_dtype: Option<DType>,
    /// Quantizes the UNet's and text encoders' linear layers, and the UNet's convolutions
    /// where the CPU has the int8 kernel for them, as they load (int8: a fraction of their
    /// time on the CPU, not pixel-exact); the default keeps them as stored.
    pub quantize: Quantization,
    /// A tiny decoder (TAESD-XL): a diffusers `AutoencoderTiny` folder or a weights file in
    /// either layout. Loaded, it makes the progress previews; `decoder` says whether it also
    /// makes the final image.
    pub tiny_decoder: Option<PathBuf>,
    pub decoder: Decoder,
}

impl Overrides {
    /// The scheduler settings a UNet file needs. ByteDance's SDXL-Lightning UNets
    /// (`sdxl_lightning_*`) are trained for trailing timesteps, and the 1-step `*_x0_*` UNet
    /// predicts the clean sample; their model card sets both on the base scheduler. The
    /// all-in-one `sdxl_lightning_*step.safetensors` files are recognised the same way.
    fn scheduler_changes(&self, model: &Path) -> (Option<&'static str>, Option<String>) {
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_lowercase());
        let name =
            self.unet.as_deref().and_then(file_name).or_else(|| model.is_file().then(|| file_name(model)).flatten());
        let lightning = name.as_deref().is_some_and(|n| n.starts_with("sdxl_lightning"));
        let x0 = lightning && name.as_deref().is_some_and(|n| n.contains("_x0"));
        let spacing = lightning.then_some("trailing");
        let prediction = self.prediction_type.clone().or_else(|| x0.then(|| "sample".to_string()));
        (spacing, prediction)
    }
}

/// A device's name for logs and reports: `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Loads the SDXL model in `dir`, running the UNet and text encoders in `dtype` (the VAE
/// always decodes in f32).
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Pipeline> {
    load_with(dir, &Overrides::default(), dtype, device)
}

/// Loads the model at `model` (a diffusers directory or a single-file checkpoint) with some
/// parts taken from elsewhere.
pub fn load_with(model: &Path, overrides: &Overrides, dtype: DType, device: &Device) -> Result<Pipeline> {
    let model_error = |message: String| Error::Model { dir: model.to_path_buf(), message };
    if model.is_dir() {
        if overrides.config.is_some() {
            return Err(model_error("`--config` applies to single-file checkpoints, not model directories".into()));
        }
        let weights = |folder: &str, stem: &str| -> Result<ComponentWeights> {
            Ok(ComponentWeights::diffusers(Checkpoint::open(&model.join(folder), stem)?))
        };
        build(model, model, overrides, dtype, device, &weights)
    } else if model.is_file() {
        let checkpoint = Checkpoint::open_files(vec![model.to_path_buf()])?;
        if !sgm::is_single_file(checkpoint.names()) {
            return Err(model_error(
                "not a single-file SDXL checkpoint (no `model.diffusion_model.`, `first_stage_model.` or \
                 `conditioner.embedders.` keys); give a UNet file with --unet and a model directory with --model"
                    .into(),
            ));
        }
        let builtin;
        let description = match &overrides.config {
            Some(dir) => dir.as_path(),
            None => {
                builtin = crate::builtin::sdxl_base_description()?;
                builtin.path()
            }
        };
        let weights = |folder: &str, _stem: &str| -> Result<ComponentWeights> {
            let prefix = match folder {
                "unet" => sgm::UNET_PREFIX,
                "vae" => sgm::VAE_PREFIX,
                "text_encoder" => sgm::CLIP_L_PREFIX,
                _ => sgm::CLIP_G_PREFIX,
            };
            Ok(ComponentWeights::original(checkpoint.clone(), prefix))
        };
        build(model, description, overrides, dtype, device, &weights)
    } else {
        Err(model_error("no such file or directory".into()))
    }
}

/// The architecture a diffusers directory describes (SDXL base's when `None`) with made-up
/// weights (see [`ComponentWeights::random`]), for benchmarks: `overrides` says how the
/// weights are kept and which decoder decodes (a tiny decoder of TAESD-XL's size where it is
/// the tiny one); its file paths are ignored.
pub fn random(description: Option<&Path>, overrides: &Overrides, dtype: DType, device: &Device) -> Result<Pipeline> {
    let builtin;
    let dir = match description {
        Some(dir) => dir,
        None => {
            builtin = crate::builtin::sdxl_base_description()?;
            builtin.path()
        }
    };
    // The made-up weights need no files: only the precision options apply.
    let precision =
        Overrides { weights_dtype: overrides.weights_dtype, quantize: overrides.quantize, ..Overrides::default() };
    let pipeline = build(dir, dir, &precision, dtype, device, &|_, _| Ok(ComponentWeights::random()))?;
    Ok(match overrides.decoder {
        Decoder::Vae => pipeline,
        Decoder::Tiny => {
            let tiny = TinyDecoder::load_from(TinyDecoderConfig::default(), &ComponentWeights::random(), device)?;
            pipeline.with_tiny_decoder(tiny, Decoder::Tiny)
        }
    })
}

/// Builds the pipeline from the description in `dir` (configs, tokenizers, scheduler) and the
/// weights that `weights(folder, stem)` finds for each component.
fn build(
    model: &Path,
    dir: &Path,
    overrides: &Overrides,
    dtype: DType,
    device: &Device,
    weights: &dyn Fn(&str, &str) -> Result<ComponentWeights>,
) -> Result<Pipeline> {
    if device.is_cpu() && dtype == DType::BF16 {
        // candle's CPU backend has no bf16 matrix multiply
        return Err(Error::InvalidRequest("dtype bf16 is not supported on the CPU; use f32 or f16".into()));
    }
    if device.is_cuda() {
        // With f16/bf16 compute the f32 VAE's products may use TF32 tensor cores, as PyTorch's
        // cuDNN convolutions do by default; an f32 computation (the parity mode) stays exact.
        // (A process-wide switch of candle's; a process holds one model.)
        candle_core::cuda::set_gemm_reduced_precision_f32(dtype != DType::F32);
    }
    // int8 leaves the convolutions and embedding tables as matrices: in the fast mode they are
    // kept in f16 too (1.2 GB less for SDXL, measured no slower) unless asked otherwise.
    let weights_dtype = match (overrides.weights_dtype, overrides.quantize) {
        (None, Quantization::Int8) if dtype == DType::F32 => Some(DType::F16),
        (stored, _) => stored,
    };
    let narrow = match weights_dtype {
        Some(stored) if stored == dtype => None,
        Some(DType::F16 | DType::BF16) if dtype == DType::F32 => weights_dtype,
        Some(stored) => {
            return Err(Error::InvalidRequest(format!(
                "weights dtype {stored:?} with compute dtype {dtype:?}: weights can only be kept narrower \
                 (f16 or bf16) than an f32 computation"
            )))
        }
        None => None,
    };
    if overrides.quantize == Quantization::Int8 && !linear::int8_supported(dtype, device) {
        return Err(Error::InvalidRequest(format!(
            "--quantize int8 runs on the CPU with f32 compute, not {dtype:?} on {}",
            device_name(device)
        )));
    }
    if overrides.decoder == Decoder::Tiny && overrides.tiny_decoder.is_none() {
        return Err(Error::InvalidRequest(
            "--decoder tiny needs the tiny decoder: --tiny-decoder FILE or folder (`sdxl download --tiny-decoder` \
             fetches madebyollin/taesdxl)"
                .into(),
        ));
    }
    let model_error = |message: String| Error::Model { dir: model.to_path_buf(), message };
    let description_error = |message: String| Error::Model { dir: dir.to_path_buf(), message };
    if !dir.is_dir() {
        return Err(description_error("not a directory".into()));
    }
    for name in CONFIG_FOLDERS {
        if !dir.join(name).is_dir() {
            return Err(description_error(format!("missing component folder `{name}/`")));
        }
    }
    let index_path = dir.join("model_index.json");
    if !index_path.is_file() {
        return Err(description_error("missing `model_index.json`".into()));
    }
    let index: ModelIndex = sdxl_models::config::read_json(&index_path)?;
    let lora = if overrides.loras.is_empty() { None } else { Some(LoraSet::load(&overrides.loras)?) };
    let with_lora = |w: ComponentWeights| w.with_lora(lora.clone()).stored_as(narrow);

    let unet_weights = match &overrides.unet {
        Some(file) => standalone(file, "unet")?,
        None => weights("unet", "diffusion_pytorch_model")?,
    };
    let (vae_dir, vae_weights) = match &overrides.vae {
        Some(path) if path.is_dir() => {
            (path.clone(), ComponentWeights::diffusers(Checkpoint::open(path, "diffusion_pytorch_model")?))
        }
        Some(file) => (dir.join("vae"), standalone(file, "vae")?),
        None => (dir.join("vae"), weights("vae", "diffusion_pytorch_model")?),
    };
    let text_encoder = |folder: &str, with_projection: bool| -> Result<ClipTextModel> {
        let weights = with_lora(weights(folder, "model")?);
        let dir = dir.join(folder);
        Ok(linear::building_with(overrides.quantize, || {
            ClipTextModel::load_from(&dir, with_projection, &weights, dtype, device)
        })?)
    };
    let components = Components {
        tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
        tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
        text_encoder: text_encoder("text_encoder", false)?,
        text_encoder_2: text_encoder("text_encoder_2", true)?,
        unet: linear::building_with(overrides.quantize, || {
            UNet::load_from(&dir.join("unet"), &with_lora(unet_weights), dtype, device)
        })?,
        vae: Vae::load_from(&vae_dir, &vae_weights.stored_as(narrow), device)?,
        tiny_decoder: overrides.tiny_decoder.as_deref().map(|path| load_tiny_decoder(path, device)).transpose()?,
        decoder: overrides.decoder,
        scheduler: load_scheduler(&dir.join("scheduler").join("scheduler_config.json"), model, overrides)?,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
    };
    if let Some(lora) = &lora {
        lora.finish()?;
    }
    check_compatible(&components).map_err(model_error)?;
    Ok(Pipeline::new(components, device))
}

/// TAESD-XL from a diffusers `AutoencoderTiny` folder (with its config) or a weights file
/// (TAESD-XL's config).
fn load_tiny_decoder(path: &Path, device: &Device) -> Result<TinyDecoder> {
    Ok(if path.is_dir() {
        TinyDecoder::load(path, device)?
    } else {
        TinyDecoder::load_file(path, TinyDecoderConfig::default(), device)?
    })
}

/// A separately distributed UNet or VAE file, in diffusers' layout or the original one (with
/// or without the single-file prefix).
fn standalone(file: &Path, component: &str) -> Result<ComponentWeights> {
    let checkpoint = Checkpoint::open_files(vec![file.to_path_buf()])?;
    let (prefix, original_marker) = match component {
        "unet" => (sgm::UNET_PREFIX, "input_blocks.0.0.weight"),
        _ => (sgm::VAE_PREFIX, "decoder.up.0.block.0.conv1.weight"),
    };
    Ok(if checkpoint.names().any(|n| n.starts_with(prefix)) {
        ComponentWeights::original(checkpoint, prefix)
    } else if checkpoint.contains(original_marker) {
        ComponentWeights::original(checkpoint, "")
    } else {
        ComponentWeights::diffusers(checkpoint)
    })
}

fn load_scheduler(path: &Path, model: &Path, overrides: &Overrides) -> Result<Scheduler> {
    let mut config: SchedulerConfig = sdxl_models::config::read_json(path)?;
    let (spacing, prediction) = overrides.scheduler_changes(model);
    if let Some(spacing) = spacing {
        config.timestep_spacing = spacing.to_string();
    }
    if let Some(prediction) = prediction {
        config.prediction_type = prediction;
    }
    Scheduler::new(&config).map_err(|message| Error::Models(sdxl_models::Error::config(path, message)))
}

/// Cross-component checks: the UNet's context and pooled widths must match the encoders'.
fn check_compatible(c: &Components) -> std::result::Result<(), String> {
    let context = c.text_encoder.hidden_size() + c.text_encoder_2.hidden_size();
    let unet = c.unet.config();
    let cross = unet.cross_attention_dims();
    if let Some(bad) = cross.iter().find(|&&d| d != context) {
        return Err(format!(
            "unet `cross_attention_dim` {bad} does not match the text encoders' combined width {context}"
        ));
    }
    if let (Some(expected), Some(pooled)) = (c.unet.text_embeds_dim(), c.text_encoder_2.projection_dim()) {
        if expected != pooled {
            return Err(format!(
                "unet add-embedding expects a pooled width of {expected}, text_encoder_2 `projection_dim` is {pooled}"
            ));
        }
    }
    if let Some(tiny) = &c.tiny_decoder {
        let (vae, tiny) = (c.vae.config(), tiny.config());
        if tiny.latent_channels != vae.latent_channels || tiny.scale_factor() != vae.scale_factor() {
            return Err(format!(
                "the tiny decoder takes {} latent channels at {}× scale, the VAE's latents are {} channels at {}×",
                tiny.latent_channels,
                tiny.scale_factor(),
                vae.latent_channels,
                vae.scale_factor()
            ));
        }
    }
    if unet.in_channels != c.vae.config().latent_channels {
        return Err(format!(
            "unet `in_channels` {} does not match vae `latent_channels` {}",
            unet.in_channels,
            c.vae.config().latent_channels
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(unet: Option<&str>, prediction: Option<&str>) -> (Option<&'static str>, Option<String>) {
        let o = Overrides {
            unet: unet.map(PathBuf::from),
            prediction_type: prediction.map(String::from),
            ..Overrides::default()
        };
        o.scheduler_changes(Path::new("/nonexistent/model"))
    }

    #[test]
    fn lightning_unets_get_their_scheduler_settings() {
        assert_eq!(changes(Some("/m/sdxl_lightning_4step_unet.safetensors"), None), (Some("trailing"), None));
        assert_eq!(
            changes(Some("/m/sdxl_lightning_1step_x0_unet.safetensors"), None),
            (Some("trailing"), Some("sample".into()))
        );
        assert_eq!(changes(Some("/m/my_unet.safetensors"), None), (None, None));
        assert_eq!(changes(None, Some("v_prediction")), (None, Some("v_prediction".into())));
    }

    fn tiny(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures").join(name)
    }

    fn image(pipeline: &Pipeline) -> sdxl_models::pixels::RgbImage {
        use crate::request::{GenerateRequest, Limits, NoiseSource, RawRequest};
        let raw = RawRequest {
            prompt: "a red bicycle".into(),
            negative_prompt: Some("blurry".into()),
            width: Some(64),
            height: Some(64),
            steps: 2,
            guidance: 5.0,
            noise: NoiseSource::Seed(7),
            image: None,
            mask: None,
            strength: None,
            sampling: Default::default(),
        };
        let request = GenerateRequest::parse(raw, &Limits::CLI).unwrap();
        crate::generate::generate(pipeline, &request, &mut |_| std::ops::ControlFlow::Continue(())).unwrap()
    }

    // A model shipped in f16, kept in f16 and computed in f32, is the f32 computation of the
    // very same numbers: the widening is exact, so the pixels must be identical.
    #[test]
    fn f16_weights_with_f32_compute_equal_the_f32_computation_of_an_f16_model() {
        let dir = tiny("tiny-2level-fp16");
        let wide = load(&dir, DType::F32, &Device::Cpu).unwrap();
        let narrow_overrides = Overrides { weights_dtype: Some(DType::F16), ..Overrides::default() };
        let narrow = load_with(&dir, &narrow_overrides, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(image(&narrow), image(&wide));
    }

    // An f32 model kept in bf16 is a rounded copy: close to the f32 image, but not the same
    // (otherwise the option changed nothing).
    #[test]
    fn bf16_weights_round_an_f32_model() {
        let dir = tiny("tiny-sdxl");
        let wide = image(&load(&dir, DType::F32, &Device::Cpu).unwrap());
        let overrides = Overrides { weights_dtype: Some(DType::BF16), ..Overrides::default() };
        let narrow = image(&load_with(&dir, &overrides, DType::F32, &Device::Cpu).unwrap());
        let largest = wide.pixels.iter().zip(&narrow.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(largest > 0, "bf16 weights left every pixel unchanged");
        assert!(largest <= 16, "bf16 weights moved a pixel by {largest}/255");
    }

    // `sdxl bench --decoder tiny` times what it says: the made-up pipeline decodes with the
    // tiny decoder.
    #[test]
    fn made_up_weights_keep_the_decoder_asked_for() {
        let overrides = Overrides { decoder: Decoder::Tiny, quantize: Quantization::Int8, ..Overrides::default() };
        let pipeline = random(Some(&tiny("tiny-sdxl")), &overrides, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pipeline.components().decoder, Decoder::Tiny);
        assert!(pipeline.components().tiny_decoder.is_some());
        let vae = random(Some(&tiny("tiny-sdxl")), &Overrides::default(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vae.components().decoder, Decoder::Vae);
    }

    #[test]
    fn weights_cannot_be_wider_than_the_computation() {
        let overrides = Overrides { weights_dtype: Some(DType::F32), ..Overrides::default() };
        let err = load_with(&tiny("tiny-sdxl"), &overrides, DType::F16, &Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("narrower"), "{err}");
    }
}
