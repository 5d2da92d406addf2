//! OpenAI's images and models API, for the clients built on its SDKs:
//! `POST /v1/images/generations` (JSON), `POST /v1/images/edits` (multipart, [`edits`]),
//! `GET /v1/models[/{id}]`, and `GET /v1/images/files/{name}`, which serves images answered
//! with `response_format: "url"`. Errors use OpenAI's `{"error": {...}}` shape with the same
//! statuses as the Workers AI routes ([`OpenAiError`]).

pub mod edits;
pub mod wire;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use axum::{Extension, Json};
use base64::Engine as _;
use sdxl_engine::output::OutputFormat;
use sdxl_engine::{Limits, NoiseSource, RawRequest, Sampling};

use crate::auth::Owner;
use crate::error::{ApiError, OpenAiError};
use crate::generation::{encode_image, execute, read_body, validate_raw};
use crate::jobs::StoredRequest;
use crate::wire::parse_json;
use crate::{job_api, AppState};
use wire::{ImageData, ImagesRequest, ImagesResponse, Model, ModelList};

/// The most images one request may ask for (OpenAI's bound); they queue one after another.
pub const MAX_IMAGES: usize = 10;

pub async fn generations(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let (body, reservation) = read_body(&state, body).await?;
    let wire: ImagesRequest = parse_json(&body)?;
    drop((body, reservation));
    if wire.prompt.is_empty() {
        return Err(invalid("prompt", "at least 1 character long", "\"\"").into());
    }
    let answer = Answer::parse(
        &wire.n,
        wire.size.as_deref(),
        &wire.response_format,
        &wire.output_format,
        wire.output_compression,
    )?;
    // "auto": the model's native size, which the engine gives a request without one
    let (width, height) = answer.size.unzip();
    let config = state.config();
    let template = RawRequest {
        prompt: wire.prompt,
        negative_prompt: wire.negative_prompt,
        width,
        height,
        steps: wire.num_steps.unwrap_or(config.default_steps),
        guidance: wire.guidance.unwrap_or(config.default_guidance),
        noise: NoiseSource::Seed(0),
        image: None,
        mask: None,
        strength: None,
        sampling: Sampling::parse(wire.sampler.as_deref(), wire.schedule.as_deref()).map_err(ApiError::from_engine)?,
    };
    Ok(Json(answer.run(&state, &owner, &headers, template, wire.seed).await?))
}

/// How an images request wants its answer.
pub(crate) struct Answer {
    n: usize,
    /// `None`: `"auto"`.
    size: Option<(usize, usize)>,
    url: bool,
    format: OutputFormat,
}

impl Answer {
    /// The fields every images route shares; `size` absent is `auto`.
    fn parse(
        n: &Option<usize>,
        size: Option<&str>,
        response_format: &Option<String>,
        output_format: &Option<String>,
        compression: Option<u8>,
    ) -> Result<Self, ApiError> {
        let n = n.unwrap_or(1);
        if !(1..=MAX_IMAGES).contains(&n) {
            return Err(invalid("n", &format!("between 1 and {MAX_IMAGES}"), n));
        }
        let size = match size {
            None | Some("auto") => None,
            Some(size) => Some(parse_size(size)?),
        };
        let url = match response_format.as_deref() {
            None | Some("b64_json") => false,
            Some("url") => true,
            Some(other) => return Err(invalid("response_format", "\"b64_json\" or \"url\"", format!("{other:?}"))),
        };
        if let Some(quality) = compression.filter(|q| *q > 100) {
            return Err(invalid("output_compression", "between 0 and 100", quality));
        }
        let format = match output_format.as_deref() {
            None | Some("png") => OutputFormat::Png,
            Some("jpeg" | "jpg") => OutputFormat::Jpeg { quality: compression.unwrap_or(100) },
            Some("webp") => OutputFormat::Webp,
            Some(other) => return Err(invalid("output_format", "\"png\", \"jpeg\" or \"webp\"", format!("{other:?}"))),
        };
        Ok(Self { n, size, url, format })
    }

    /// Runs `template` `n` times (image i with seed `first_seed + i`, random when absent),
    /// one after another through the queue, and answers the images as asked.
    async fn run(
        self,
        state: &AppState,
        owner: &Owner,
        headers: &HeaderMap,
        template: RawRequest,
        first_seed: Option<u64>,
    ) -> Result<ImagesResponse, ApiError> {
        if self.url {
            job_api::image_store(state)?;
        }
        let first_seed = first_seed.unwrap_or_else(sdxl_engine::request::random_seed);
        let mut data = Vec::with_capacity(self.n);
        let mut size = String::new();
        for i in 0..self.n as u64 {
            let seed = first_seed.wrapping_add(i);
            let raw = RawRequest { noise: NoiseSource::Seed(seed), ..template.clone() };
            let stored = self.url.then(|| StoredRequest::new(&raw, seed));
            let generation = validate_raw(state, raw, seed, &Limits::SERVER).await?;
            size = format!("{}x{}", generation.request.width, generation.request.height);
            let done = execute(state, owner, generation.request).await?;
            let file = encode_image(done.image, generation.parameters, self.format).await?;
            data.push(match stored {
                Some(stored) => {
                    let name = job_api::store_image(state, owner, &stored, file, self.format.extension()).await?;
                    ImageData {
                        b64_json: None,
                        url: Some(format!("{}/v1/images/files/{name}", base_url(state, headers))),
                    }
                }
                None => ImageData { b64_json: Some(base64::engine::general_purpose::STANDARD.encode(file)), url: None },
            });
        }
        let output_format = self.format.extension().to_string();
        Ok(ImagesResponse { created: unix_now(), data, output_format, size })
    }
}

/// Where clients reach this server: `--public-url`, else `http://` and the request's `Host`
/// (which the origin guard has checked is one of this server's).
fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config().public_url {
        return url.trim_end_matches('/').to_string();
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    format!("http://{host}")
}

/// `GET /v1/images/files/{name}`: an image answered by URL. The unguessable name is the
/// credential (no key: clients hand the link to browsers and other services).
pub async fn file(State(state): State<AppState>, Path(name): Path<String>) -> Result<Response, OpenAiError> {
    Ok(job_api::shared_image(&state, &name).await?)
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList { object: "list".into(), data: vec![model_of(&state)] })
}

/// `GET /v1/models/{id}`: the model this server runs, else 404.
pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Model>, OpenAiError> {
    let model = model_of(&state);
    if id.trim_start_matches('/') != model.id {
        return Err(ApiError::UnknownModelId(id).into());
    }
    Ok(Json(model))
}

fn model_of(state: &AppState) -> Model {
    Model {
        id: state.config().model_id().to_string(),
        object: "model".into(),
        created: state.started(),
        owned_by: "sdxl".into(),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn invalid(field: &str, bound: &str, got: impl ToString) -> ApiError {
    ApiError::Invalid { field: field.into(), bound: bound.into(), got: got.to_string() }
}

/// `"WxH"` → (W, H): decimal sides without sign, spaces or leading zeros, as the OpenAPI
/// pattern says; the bounds are checked with the rest of the request.
fn parse_size(size: &str) -> Result<(usize, usize), ApiError> {
    let invalid = || invalid("size", "\"auto\" or like \"1024x1024\"", format!("{size:?}"));
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

    #[test]
    fn answers_name_the_field_they_refuse() {
        let parse = |n: Option<usize>, format: Option<&str>, output: Option<&str>, q: Option<u8>| {
            Answer::parse(&n, Some("auto"), &format.map(Into::into), &output.map(Into::into), q)
        };
        assert!(parse(Some(10), Some("url"), Some("jpeg"), Some(80)).is_ok());
        for (result, field) in [
            (parse(Some(11), None, None, None), "n"),
            (parse(Some(0), None, None, None), "n"),
            (parse(None, Some("b64"), None, None), "response_format"),
            (parse(None, None, Some("gif"), None), "output_format"),
            (parse(None, None, Some("jpeg"), Some(101)), "output_compression"),
        ] {
            assert_eq!(result.err().and_then(|e| e.field().map(String::from)).as_deref(), Some(field));
        }
        let jpeg = parse(None, None, Some("jpeg"), Some(80)).unwrap();
        assert_eq!(jpeg.format, OutputFormat::Jpeg { quality: 80 });
        assert!(jpeg.size.is_none());
    }
}
