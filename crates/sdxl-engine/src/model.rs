//! Loading a diffusers-layout SDXL directory into a [`Pipeline`].
//!
//! The directory holds `model_index.json` and the folders `unet/`, `vae/`, `text_encoder/`,
//! `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, `scheduler/`; each model folder has a
//! `config.json` and `*.safetensors` (or `*.fp16.safetensors`) weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sdxl_models::clip::text_model::ClipTextModel;
use sdxl_models::clip::tokenizer::ClipTokenizer;
use sdxl_models::pipeline::{Components, Pipeline};
use sdxl_models::scheduler::{EulerDiscrete, SchedulerConfig};
use sdxl_models::unet::UNet;
use sdxl_models::vae::Vae;
use sdxl_models::weights::Checkpoint;
use serde::Deserialize;

use crate::{Error, Result};

/// The components every SDXL directory must have.
const COMPONENTS: [&str; 7] =
    ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"];

#[derive(Deserialize)]
struct ModelIndex {
    #[serde(default = "yes")]
    force_zeros_for_empty_prompt: bool,
}

fn yes() -> bool {
    true
}

/// Where a model's parts come from beyond its directory.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// A UNet weights file (diffusers key layout) used instead of `unet/`'s weights; the
    /// architecture still comes from `unet/config.json`.
    pub unet: Option<PathBuf>,
    /// Replaces the scheduler's `prediction_type` (`epsilon`, `sample`, `v_prediction`).
    pub prediction_type: Option<String>,
}

impl Overrides {
    /// The scheduler settings a UNet file needs. ByteDance's SDXL-Lightning UNets
    /// (`sdxl_lightning_*`) are trained for trailing timesteps, and the 1-step `*_x0_*` UNet
    /// predicts the clean sample; their model card sets both on the base scheduler.
    fn scheduler_changes(&self) -> (Option<&'static str>, Option<String>) {
        let name = self.unet.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_lowercase());
        let lightning = name.as_deref().is_some_and(|n| n.starts_with("sdxl_lightning"));
        let x0 = lightning && name.as_deref().is_some_and(|n| n.contains("_x0"));
        let spacing = lightning.then_some("trailing");
        let prediction = self.prediction_type.clone().or_else(|| x0.then(|| "sample".to_string()));
        (spacing, prediction)
    }
}

/// Loads the SDXL model in `dir`, running the UNet and text encoders in `dtype` (the VAE
/// always decodes in f32).
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Pipeline> {
    load_with(dir, &Overrides::default(), dtype, device)
}

/// [`load`] with some parts taken from elsewhere.
pub fn load_with(dir: &Path, overrides: &Overrides, dtype: DType, device: &Device) -> Result<Pipeline> {
    if device.is_cpu() && dtype == DType::BF16 {
        // candle's CPU backend has no bf16 matrix multiply
        return Err(Error::InvalidRequest("dtype bf16 is not supported on the CPU; use f32 or f16".into()));
    }
    let model_error = |message: String| Error::Model { dir: dir.to_path_buf(), message };
    if !dir.is_dir() {
        return Err(model_error("not a directory".into()));
    }
    for name in COMPONENTS {
        if !dir.join(name).is_dir() {
            return Err(model_error(format!("missing component folder `{name}/`")));
        }
    }
    let index_path = dir.join("model_index.json");
    let index: ModelIndex = if index_path.is_file() {
        sdxl_models::config::read_json(&index_path)?
    } else {
        return Err(model_error("missing `model_index.json`".into()));
    };
    let components = Components {
        tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
        tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
        text_encoder: ClipTextModel::load(&dir.join("text_encoder"), false, dtype, device)?,
        text_encoder_2: ClipTextModel::load(&dir.join("text_encoder_2"), true, dtype, device)?,
        unet: match &overrides.unet {
            Some(file) => {
                UNet::load_weights(&dir.join("unet"), Checkpoint::open_files(vec![file.clone()])?, dtype, device)?
            }
            None => UNet::load(&dir.join("unet"), dtype, device)?,
        },
        vae: Vae::load(&dir.join("vae"), device)?,
        scheduler: load_scheduler(&dir.join("scheduler").join("scheduler_config.json"), overrides)?,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
    };
    check_compatible(&components).map_err(model_error)?;
    Ok(Pipeline::new(components, device))
}

fn load_scheduler(path: &Path, overrides: &Overrides) -> Result<EulerDiscrete> {
    let mut config: SchedulerConfig = sdxl_models::config::read_json(path)?;
    let (spacing, prediction) = overrides.scheduler_changes();
    if let Some(spacing) = spacing {
        config.timestep_spacing = spacing.to_string();
    }
    if let Some(prediction) = prediction {
        config.prediction_type = prediction;
    }
    EulerDiscrete::new(&config).map_err(|message| Error::Models(sdxl_models::Error::config(path, message)))
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
        let o = Overrides { unet: unet.map(PathBuf::from), prediction_type: prediction.map(String::from) };
        o.scheduler_changes()
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
}
