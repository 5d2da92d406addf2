//! The request layer every route and the job runner share: read the body within the
//! budget, validate it into the engine's [`GenerateRequest`] (input images decoded off the
//! runtime, the operator's pixel cap checked), run it on the queue under its owner's share,
//! and encode the PNG with its parameters. Routes only translate their API's shape to and
//! from this.

use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use sdxl_engine::output::OutputFormat;
use sdxl_engine::queue::{Completed, Submission};
use sdxl_engine::{GenerateRequest, Limits, NoiseSource, RawRequest, Sampling, Ticket};
use sdxl_models::pixels::RgbImage;

use crate::admission::Reservation;
use crate::auth::Owner;
use crate::error::ApiError;
use crate::jobs::StoredRequest;
use crate::wire::{decode_base64, parse_json, RunRequest};
use crate::{AppState, ServerConfig};

/// A validated request and what its answer needs.
pub struct Generation {
    pub request: GenerateRequest,
    pub seed: u64,
    /// The text written into the PNG's `parameters` chunk.
    pub parameters: String,
}

/// Reads the whole body within the shared body-memory budget (see [`crate::admission`]):
/// 413 past the body limit, 408 if it has not wholly arrived within the body-read timeout
/// (the whole body, not the pauses between its pieces, so a trickle is cut off too). Keep the
/// reservation while the bytes are parsed.
pub async fn read_body(state: &AppState, body: Body) -> Result<(Bytes, Reservation), ApiError> {
    let config = state.config();
    state.inner.admission.read_body(body, config.body_limit, config.body_read_timeout).await
}

/// A run-route body (read and reserved) → a [`Generation`], decoded on the blocking pool;
/// the reservation is returned once the body is parsed.
pub async fn validate_run(state: &AppState, body: Bytes, reservation: Reservation) -> Result<Generation, ApiError> {
    let config = state.config().clone();
    let generation = state
        .inner
        .admission
        .decode(move || {
            let (request, seed) = validate_run_body(&body, &config)?;
            Ok(Generation::new(request, seed, &config))
        })
        .await;
    drop(reservation);
    generation
}

impl Generation {
    pub fn new(request: GenerateRequest, seed: u64, config: &ServerConfig) -> Self {
        let parameters = sdxl_engine::png::parameters_text(&request, &config.model_name);
        Self { request, seed, parameters }
    }
}

/// An API's request in the engine's terms → a [`Generation`], validated (input images decoded)
/// on the blocking pool like a run-route body.
pub async fn validate_raw(
    state: &AppState,
    raw: RawRequest,
    seed: u64,
    limits: &'static Limits,
) -> Result<Generation, ApiError> {
    let config = state.config().clone();
    state
        .inner
        .admission
        .decode(move || Ok(Generation::new(parse_raw_with(raw, &config, limits)?, seed, &config)))
        .await
}

/// A run route's body → the engine's validated request (input images decoded) and its seed,
/// with `config`'s defaults and limits in force. Everything a client controls goes through
/// here, so this is what the fuzz target drives.
pub fn validate_run_body(body: &[u8], config: &ServerConfig) -> Result<(GenerateRequest, u64), ApiError> {
    let (raw, seed) = to_raw(parse_json(body)?, config)?;
    Ok((parse_raw(raw, config)?, seed))
}

/// A run route's body → the request a job stores: validated like [`validate_run_body`], with
/// the defaults applied and the seed drawn.
pub fn validate_job_body(body: &[u8], config: &ServerConfig) -> Result<StoredRequest, ApiError> {
    let (raw, seed) = to_raw(parse_json(body)?, config)?;
    parse_raw(raw.clone(), config)?;
    Ok(StoredRequest::new(&raw, seed))
}

/// The engine's raw request → its validated form, with the operator's pixel cap.
pub fn parse_raw(raw: RawRequest, config: &ServerConfig) -> Result<GenerateRequest, ApiError> {
    parse_raw_with(raw, config, &Limits::SERVER)
}

/// [`parse_raw`] within an API's own `limits`.
pub fn parse_raw_with(raw: RawRequest, config: &ServerConfig, limits: &Limits) -> Result<GenerateRequest, ApiError> {
    let request = GenerateRequest::parse(raw, limits).map_err(ApiError::from_engine)?;
    check_pixels(&request, config.max_pixels)?;
    Ok(request)
}

/// Wire fields → the engine's raw request and its seed, with the defaults in force.
fn to_raw(wire: RunRequest, config: &ServerConfig) -> Result<(RawRequest, u64), ApiError> {
    if wire.prompt.is_empty() {
        return Err(ApiError::BadRequest("`prompt` must be at least 1 character long".into()));
    }
    // checked even without an image, where it is otherwise ignored: out of range is a schema
    // violation either way
    if let Some(strength) = wire.strength.filter(|s| !(0.0..=1.0).contains(s)) {
        return Err(ApiError::BadRequest(format!("`strength` must be between 0 and 1, got {strength}")));
    }
    let image = match (wire.image, wire.image_b64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("`image` and `image_b64` are mutually exclusive".into()))
        }
        (Some(bytes), None) => Some(bytes.0),
        (None, Some(text)) => Some(decode_base64("image_b64", &text)?),
        (None, None) => None,
    };
    let seed = wire.seed.unwrap_or_else(sdxl_engine::request::random_seed);
    let raw = RawRequest {
        prompt: wire.prompt,
        negative_prompt: wire.negative_prompt,
        width: wire.width,
        height: wire.height,
        steps: wire.num_steps.unwrap_or(config.default_steps),
        guidance: wire.guidance.unwrap_or(config.default_guidance),
        noise: NoiseSource::Seed(seed),
        image,
        mask: wire.mask.map(|m| m.0),
        strength: wire.strength,
        sampling: Sampling::parse(wire.sampler.as_deref(), wire.schedule.as_deref()).map_err(ApiError::from_engine)?,
    };
    Ok((raw, seed))
}

/// `--max-pixels`: the operator's cap on `width × height`.
pub fn check_pixels(request: &GenerateRequest, max_pixels: Option<usize>) -> Result<(), ApiError> {
    match max_pixels {
        Some(max) if request.width * request.height > max => Err(ApiError::BadRequest(format!(
            "`width` × `height` must be at most {max} pixels, got {}",
            request.width * request.height
        ))),
        _ => Ok(()),
    }
}

/// Queues `request` for `owner` (within its share of the queue) with the configured
/// deadline; `previews` adds a preview to every step event. Dropping the ticket cancels it.
pub fn submit(state: &AppState, owner: &Owner, request: GenerateRequest, previews: bool) -> Result<Ticket, ApiError> {
    let deadline = Instant::now() + state.config().request_timeout;
    let how = Submission { owner: owner.queue_share(), previews, ..Submission::default() };
    state.queue().submit_with(request, deadline, how).map_err(ApiError::from_engine)
}

/// [`submit`], then waits for the result. If the client goes away, this future is dropped
/// with the ticket, which cancels the job.
pub async fn execute(state: &AppState, owner: &Owner, request: GenerateRequest) -> Result<Completed, ApiError> {
    ended(state, submit(state, owner, request, false)?.wait().await)
}

/// A generation's result for its client, with its end recorded for
/// [`AppState::failing`].
pub fn ended<T>(state: &AppState, result: Result<T, sdxl_engine::Error>) -> Result<T, ApiError> {
    state.generation_ended(result.as_ref().is_err_and(crate::error::is_server_fault));
    result.map_err(ApiError::from_engine)
}

/// The PNG of a generated image, with its generation `parameters` in a text chunk; encoded
/// on the blocking pool.
pub async fn encode_png(image: RgbImage, parameters: String) -> Result<Vec<u8>, ApiError> {
    encode_image(image, parameters, OutputFormat::Png).await
}

/// A generated image in `format` (only PNG carries the `parameters`), encoded on the blocking
/// pool.
pub async fn encode_image(image: RgbImage, parameters: String, format: OutputFormat) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || format.encode(&image, &parameters))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(ApiError::from_engine)
}

/// Runs `generation` for `owner` and answers 200 `image/png` with the seed and timing headers.
pub async fn png_response(state: &AppState, owner: &Owner, generation: Generation) -> Result<Response, ApiError> {
    let Generation { request, seed, parameters } = generation;
    let done = execute(state, owner, request).await?;
    let (queue_time, inference_time) = (done.queue_time, done.inference_time);
    let png = encode_png(done.image, parameters).await?;
    let mut response = png.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert("x-seed", HeaderValue::from(seed));
    headers.insert("x-queue-time-ms", HeaderValue::from(queue_time.as_millis() as u64));
    headers.insert("x-inference-time-ms", HeaderValue::from(inference_time.as_millis() as u64));
    Ok(response)
}
