//! The OpenAI images and models API's bodies, as the official SDKs send and read them; the
//! same types are the handlers' and `/openapi.json`'s.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// OpenAI's image generation request, plus this server's extensions. Other OpenAI fields
/// (`model`, `quality`, `style`, `background`, `moderation`, `user`) are accepted and ignored:
/// the server runs one model.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ImagesRequest {
    /// What to draw.
    #[schema(min_length = 1)]
    pub prompt: String,
    /// Number of images, 1-10; image i uses seed + i.
    #[schema(minimum = 1, maximum = 10, default = 1)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub n: Option<usize>,
    /// `"WxH"`, each side 256-2048, or `"auto"`: the model's native size (1024x1024, the default).
    pub size: Option<String>,
    /// `"b64_json"` (default), or `"url"`: a link on this server that serves the image until the
    /// job TTL expires it, to anyone holding the link.
    pub response_format: Option<String>,
    /// `"png"` (default, with the generation parameters), `"jpeg"` or `"webp"` (lossless).
    pub output_format: Option<String>,
    /// JPEG quality 0-100 (default 100); WebP is lossless and ignores it.
    #[schema(minimum = 0, maximum = 100)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub output_compression: Option<u8>,
    /// Extension: what to steer away from.
    pub negative_prompt: Option<String>,
    /// Extension: seed of the first image.
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub seed: Option<u64>,
    /// Extension: denoising steps (1-20).
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub num_steps: Option<usize>,
    /// Extension: guidance scale (0-30).
    pub guidance: Option<f64>,
    /// The sampler (an extension): euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim, unipc or
    /// lcm, each as its diffusers scheduler class computes it (default euler).
    pub sampler: Option<String>,
    /// The schedule (an extension): model (the model's own), karras, leading, linspace or
    /// trailing; `karras` needs a sampler that has it.
    pub schedule: Option<String>,
}

/// `POST /v1/images/edits`, a `multipart/form-data` body: img2img without a mask, inpainting
/// with one. Fields other than these are ignored.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // the schema of a body read field by field from the multipart stream
pub struct EditRequest {
    /// The input image (PNG, JPEG or WebP); `image[]` is taken too, its first file used.
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// What the edited image shows.
    #[schema(min_length = 1)]
    pub prompt: String,
    /// A PNG of the image's size whose fully transparent pixels mark what to repaint.
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    /// Number of images, 1-10.
    #[schema(minimum = 1, maximum = 10, default = 1)]
    pub n: Option<usize>,
    /// `"WxH"` or `"auto"` (the default): the input image's size.
    pub size: Option<String>,
    /// `"b64_json"` (default) or `"url"`.
    pub response_format: Option<String>,
    /// `"png"` (default), `"jpeg"` or `"webp"`.
    pub output_format: Option<String>,
    /// JPEG quality 0-100 (default 100).
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Extension: how much to change, 0-1. Default without a mask max(0.75, 1/steps); with a
    /// mask 1 (the masked area repainted whole).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Extension: what to steer away from.
    pub negative_prompt: Option<String>,
    /// Extension: seed of the first image.
    pub seed: Option<u64>,
    /// Extension: denoising steps (1-20).
    pub num_steps: Option<usize>,
    /// Extension: guidance scale (0-30).
    pub guidance: Option<f64>,
    /// The sampler (an extension): euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddim, unipc or
    /// lcm, each as its diffusers scheduler class computes it (default euler).
    pub sampler: Option<String>,
    /// The schedule (an extension): model (the model's own), karras, leading, linspace or
    /// trailing; `karras` needs a sampler that has it.
    pub schedule: Option<String>,
}

/// One generated image: `b64_json` or `url`, as asked.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageData {
    /// The image file, base64-encoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Where to fetch the image file; valid until the server's job TTL expires it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The response: creation time (Unix seconds), the images, their format and size.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
    /// `png`, `jpeg` or `webp`.
    pub output_format: String,
    /// `"WxH"` of the images.
    pub size: String,
}

/// A model, in OpenAI's list shape.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// The model's name, or `--model-id`.
    pub id: String,
    /// Always `"model"`.
    pub object: String,
    /// When the server started (Unix seconds).
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`: the one model this server runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: String,
    pub data: Vec<Model>,
}
