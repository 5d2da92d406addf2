//! `POST /v1/images/generations`: the OpenAI images API shape, for clients built on it.
//! Answers `{created, data: [{b64_json}]}`; errors use OpenAI's `{"error": {...}}` shape with
//! the same statuses as the Workers AI routes ([`OpenAiError`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Owner;
use crate::error::{ApiError, OpenAiError};
use crate::generation::{encode_png, execute, parse_raw, read_body, Generation};
use crate::wire::parse_json;
use crate::AppState;

/// OpenAI's image generation request, plus this server's extensions. Other OpenAI fields
/// (`model`, `quality`, `style`, `user`) are accepted and ignored: the server runs one model.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ImagesRequest {
    /// What to draw.
    pub prompt: String,
    /// Number of images, 1-4; image i uses seed + i.
    #[schema(minimum = 1, maximum = 4, default = 1)]
    #[serde(default, deserialize_with = "crate::wire::optional_integer")]
    pub n: Option<usize>,
    /// `"WxH"`, each side 256-2048 (default `"1024x1024"`).
    pub size: Option<String>,
    /// Only `"b64_json"` is supported.
    pub response_format: Option<String>,
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
}

/// One generated image.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageData {
    /// The PNG, base64-encoded.
    pub b64_json: String,
}

/// The response: creation time (Unix seconds) and the images.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
}

pub async fn generations(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let (body, reservation) = read_body(&state, &headers, body).await?;
    let wire: ImagesRequest = parse_json(&body)?;
    drop((body, reservation));
    let n = wire.n.unwrap_or(1);
    if !(1..=4).contains(&n) {
        return Err(ApiError::BadRequest(format!("`n` must be between 1 and 4, got {n}")).into());
    }
    if let Some(format) = wire.response_format.as_deref().filter(|f| *f != "b64_json") {
        return Err(ApiError::BadRequest(format!("`response_format` must be \"b64_json\", got {format:?}")).into());
    }
    let (width, height) = parse_size(wire.size.as_deref().unwrap_or("1024x1024"))?;
    let first_seed = wire.seed.unwrap_or_else(sdxl_engine::request::random_seed);
    let config = state.config();
    let mut data = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let seed = first_seed.wrapping_add(i);
        let raw = sdxl_engine::RawRequest {
            prompt: wire.prompt.clone(),
            negative_prompt: wire.negative_prompt.clone(),
            width: Some(width),
            height: Some(height),
            steps: wire.num_steps.unwrap_or(config.default_steps),
            guidance: wire.guidance.unwrap_or(config.default_guidance),
            noise: sdxl_engine::NoiseSource::Seed(seed),
            image: None,
            mask: None,
            strength: None,
        };
        if raw.prompt.is_empty() {
            return Err(ApiError::BadRequest("`prompt` must be at least 1 character long".into()).into());
        }
        let Generation { request, parameters, .. } = Generation::new(parse_raw(raw, config)?, seed, config);
        let done = execute(&state, &owner, request).await?;
        let png = encode_png(done.image, parameters).await?;
        data.push(ImageData { b64_json: base64::engine::general_purpose::STANDARD.encode(png) });
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(Json(ImagesResponse { created, data }))
}

/// `"WxH"` → (W, H): decimal sides without sign, spaces or leading zeros, as the OpenAPI
/// pattern says; the bounds are checked with the rest of the request.
fn parse_size(size: &str) -> Result<(usize, usize), ApiError> {
    let invalid = || ApiError::BadRequest(format!("`size` must look like \"1024x1024\", got {size:?}"));
    let side = |text: &str| {
        let canonical = !text.is_empty() && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit());
        canonical.then(|| text.parse().ok()).flatten().ok_or_else(invalid)
    };
    let (w, h) = size.split_once('x').ok_or_else(invalid)?;
    Ok((side(w)?, side(h)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512x768").unwrap(), (512, 768));
        assert!(parse_size("512").is_err());
        assert!(parse_size("ax1").is_err());
        // only what the OpenAPI pattern admits
        for size in [" 512x512", "512 x512", "+512x512", "0512x512", "512x", "x512", "512x512x512", "५१२x512"] {
            assert!(parse_size(size).is_err(), "{size:?}");
        }
    }
}
