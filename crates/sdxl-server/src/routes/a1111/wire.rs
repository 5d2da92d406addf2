//! AUTOMATIC1111's API bodies (`modules/api/models.py`), the fields this server acts on; any
//! other field a client sends (webuiapi sends some 45, SillyTavern its own `url` and `auth`)
//! is ignored. The same types are the handlers' and `/openapi.json`'s.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img`. Absent fields take AUTOMATIC1111's
/// defaults, except `steps` and `cfg_scale`, which take this server's (the model's).
#[derive(Debug, Deserialize, ToSchema)]
pub struct GenerationRequest {
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// Default 512.
    #[schema(minimum = 256, maximum = 2048)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub width: Option<usize>,
    /// Default 512.
    #[schema(minimum = 256, maximum = 2048)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub height: Option<usize>,
    /// Denoising steps, 1-150; default the server's (the model's).
    #[schema(minimum = 1, maximum = 150)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub steps: Option<usize>,
    /// Guidance scale, 0-30; default the server's (the model's).
    #[schema(minimum = 0.0, maximum = 30.0)]
    pub cfg_scale: Option<f64>,
    /// -1 (default): random; image i of the batch uses seed + i.
    pub seed: Option<i64>,
    /// Images per batch; `batch_size × n_iter` at most 10.
    #[schema(minimum = 1, maximum = 10, default = 1)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub batch_size: Option<usize>,
    #[schema(minimum = 1, maximum = 10, default = 1)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub n_iter: Option<usize>,
    /// A name or alias of `GET /sdapi/v1/samplers` (also the older "DPM++ 2M Karras" style);
    /// samplers this server lacks run as Euler, as `info` says.
    pub sampler_name: Option<String>,
    /// The older spelling of `sampler_name`, used when that is absent.
    pub sampler_index: Option<String>,
    /// `automatic` (the model's own schedule), `karras` or `sgm_uniform` (trailing timesteps);
    /// others run as `automatic`, as `info` says. A pair diffusers lacks (DDIM + Karras) is a 422.
    pub scheduler: Option<String>,
    /// `false`: answer no images (AUTOMATIC1111's `send_images`).
    #[serde(default)]
    pub send_images: Option<bool>,
    /// img2img: the input images (base64, a `data:` prefix allowed); the first is used.
    pub init_images: Option<Vec<String>>,
    /// img2img: the inpainting mask (white = repaint), base64.
    pub mask: Option<String>,
    /// img2img: how much to change, 0-1 (default 0.75).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub denoising_strength: Option<f64>,
    /// img2img: 1 repaints the mask's black area instead of its white.
    #[schema(minimum = 0, maximum = 1)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub inpainting_mask_invert: Option<u8>,
    /// img2img: echo the input images in `parameters`.
    #[serde(default)]
    pub include_init_images: Option<bool>,
    /// Only `sd_model_checkpoint` is looked at: it must name the loaded model.
    pub override_settings: Option<Value>,
}

/// The answer of txt2img and img2img.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GenerationResponse {
    /// The PNGs, base64 without a `data:` prefix, with the generation parameters in each.
    pub images: Vec<String>,
    /// The request as received, input images left out unless `include_init_images`.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON string of [`GenerationInfo`] (clients parse it).
    pub info: String,
}

/// What `info` holds, as AUTOMATIC1111's `Processed.js()` writes it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GenerationInfo {
    pub prompt: String,
    pub all_prompts: Vec<String>,
    pub negative_prompt: String,
    pub all_negative_prompts: Vec<String>,
    pub seed: u64,
    pub all_seeds: Vec<u64>,
    pub subseed: u64,
    pub all_subseeds: Vec<u64>,
    pub width: usize,
    pub height: usize,
    /// The sampler that ran.
    pub sampler_name: String,
    pub cfg_scale: f64,
    pub steps: usize,
    pub batch_size: usize,
    pub sd_model_name: String,
    pub denoising_strength: Option<f64>,
    /// Substitutions made (`"Sampler": "Euler a → Euler"`), and `"Interrupted": "true"`.
    #[schema(value_type = Object)]
    pub extra_generation_params: serde_json::Map<String, Value>,
    pub index_of_first_image: usize,
    /// Each image's parameters text (as in its PNG).
    pub infotexts: Vec<String>,
    pub job_timestamp: String,
    pub clip_skip: u32,
    pub is_using_inpainting_conditioning: bool,
    pub version: String,
}

/// An entry of `GET /sdapi/v1/sd-models`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SdModel {
    /// What `sd_model_checkpoint` holds.
    pub title: String,
    pub model_name: String,
    /// Not computed (hashing a 7 GB file at start-up): null, as AUTOMATIC1111 answers for a
    /// model not yet hashed.
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

/// An entry of `GET /sdapi/v1/samplers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Sampler {
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: serde_json::Map<String, Value>,
}

/// An entry of `GET /sdapi/v1/schedulers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Scheduler {
    pub name: String,
    pub label: String,
    pub aliases: Option<Vec<String>>,
    pub default_rho: f64,
    pub need_inner_model: bool,
}

/// An entry of `GET /sdapi/v1/upscalers`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Upscaler {
    pub name: String,
    pub model_name: Option<String>,
    pub model_path: Option<String>,
    pub model_url: Option<String>,
    pub scale: f64,
}

/// An entry of `GET /sdapi/v1/sd-vae` (and Forge's `sd-modules`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SdVae {
    pub model_name: String,
    pub filename: String,
}

/// An entry of `GET /sdapi/v1/loras`: a LoRA fused into the loaded model.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Lora {
    pub name: String,
    pub alias: String,
    pub path: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, Value>,
}

/// `GET /sdapi/v1/progress`: the caller's running txt2img/img2img request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// 0-1 over the whole batch; 0 when idle.
    pub progress: f64,
    /// Seconds left, estimated from the time so far.
    pub eta_relative: f64,
    pub state: ProgressState,
    /// The latest latent preview (base64 PNG), if any.
    pub current_image: Option<String>,
    pub textinfo: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProgressState {
    pub skipped: bool,
    pub interrupted: bool,
    pub stopping_generation: bool,
    pub job: String,
    /// Images in the batch; 0 when idle.
    pub job_count: usize,
    pub job_timestamp: String,
    /// The image being made, 0-based.
    pub job_no: usize,
    pub sampling_step: usize,
    pub sampling_steps: usize,
}
