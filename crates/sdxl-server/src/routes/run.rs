//! `POST /client/v4/accounts/{account_id}/ai/run/{model}` and `POST /ai/run/{model}`:
//! the Workers AI text-to-image call, answered with the PNG.

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::{BodyExt, Limited};
use sdxl_engine::queue::Completed;
use sdxl_engine::{GenerateRequest, Limits, NoiseSource, RawRequest};
use sdxl_models::pixels::RgbImage;

use super::jobs;
use crate::error::ApiError;
use crate::jobs::StoredRequest;
use crate::wire::{decode_base64, parse_json, RunRequest};
use crate::{AppState, ServerConfig, MODEL_ID};

/// The account-scoped route (the account id is accepted and ignored).
pub async fn account_route(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((_account_id, model)) = path.map_err(bad_path)?;
    run(state, &model, query.as_deref(), &headers, body).await
}

/// The short route without an account.
pub async fn short_route(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(model) = path.map_err(bad_path)?;
    run(state, &model, query.as_deref(), &headers, body).await
}

/// Whether the query asks for Workers AI's asynchronous mode: `?queueRequest=true` (or
/// `false`; any other value is refused). Other query parameters are ignored.
fn queue_request(query: Option<&str>) -> Result<bool, ApiError> {
    let mut queued = false;
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "queueRequest" {
            queued = match value {
                "true" => true,
                "false" => false,
                other => {
                    return Err(ApiError::BadRequest(format!("`queueRequest` must be true or false, got {other:?}")))
                }
            };
        }
    }
    Ok(queued)
}

/// A path segment axum cannot decode (percent-encoded bytes that are not UTF-8): 400 in the
/// envelope, not axum's plain-text rejection.
fn bad_path(rejection: PathRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid URL: {}", rejection.body_text()))
}

async fn run(
    state: AppState,
    model: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.inner.keys.check(headers)?;
    let model = model.trim_start_matches('/');
    if model != MODEL_ID {
        return Err(ApiError::UnknownModel(model.to_string()));
    }
    if queue_request(query)? {
        let id = jobs::submit_body(&state, headers, body).await?;
        return Ok(Json(jobs::queued_envelope(&id, "queued")).into_response());
    }
    let (body, reservation) = read_body(&state, headers, body).await?;
    if let Some(id) = jobs::poll_request(&body) {
        return jobs::poll(&state, &id).await;
    }
    let config = state.config().clone();
    let (request, seed) = state.inner.admission.decode(move || validate_run_body(&body, &config)).await?;
    drop(reservation);
    let parameters = sdxl_engine::png::parameters_text(&request, &state.config().model_name);
    let done = execute(&state, request).await?;
    png_response(done, &parameters, seed).await
}

/// Reads the whole body within the shared body-memory budget (see [`crate::admission`]),
/// refusing more than the body limit with 413, and a body that has not wholly arrived within
/// the body-read timeout with 408. The timeout bounds the whole body, not the pauses between
/// its pieces, so a client trickling one byte at a time is cut off too. The reservation is
/// returned with the bytes: keep it while they are parsed.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(axum::body::Bytes, crate::admission::Reservation), ApiError> {
    let config = state.config();
    let limit = config.body_limit;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let reservation = state.inner.admission.reserve_body(declared, limit, config.body_read_timeout).await?;
    let collected = tokio::time::timeout(config.body_read_timeout, Limited::new(body, limit).collect())
        .await
        .map_err(|_| ApiError::Timeout)?;
    match collected {
        Ok(collected) => Ok((collected.to_bytes(), reservation)),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(e) => Err(ApiError::BadRequest(format!("cannot read the request body: {e}"))),
    }
}

/// A run route's body → the engine's validated request (input images decoded) and its seed,
/// with `config`'s defaults and limits in force. Everything a client controls goes through
/// here, so this is what the fuzz target drives.
pub fn validate_run_body(body: &[u8], config: &ServerConfig) -> Result<(GenerateRequest, u64), ApiError> {
    let wire: RunRequest = parse_json(body)?;
    to_request(wire, config)
}

/// Wire fields → the engine's validated request, with the defaults in force.
fn to_request(wire: RunRequest, config: &ServerConfig) -> Result<(GenerateRequest, u64), ApiError> {
    let (raw, seed) = to_raw(wire, config)?;
    let request = GenerateRequest::parse(raw, &Limits::SERVER).map_err(ApiError::from_engine)?;
    check_pixels(&request, config.max_pixels)?;
    Ok((request, seed))
}

/// A run route's body → the request a job stores: validated like [`validate_run_body`], with
/// the defaults applied and the seed drawn.
pub fn validate_job_body(body: &[u8], config: &ServerConfig) -> Result<StoredRequest, ApiError> {
    let (raw, seed) = to_raw(parse_json(body)?, config)?;
    let request = GenerateRequest::parse(raw.clone(), &Limits::SERVER).map_err(ApiError::from_engine)?;
    check_pixels(&request, config.max_pixels)?;
    Ok(StoredRequest::new(&raw, seed))
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

/// Enqueues `request` with the configured deadline and waits for it. If the client goes
/// away, this future is dropped with the ticket, which cancels the job.
pub async fn execute(state: &AppState, request: GenerateRequest) -> Result<Completed, ApiError> {
    let deadline = Instant::now() + state.config().request_timeout;
    let ticket = state.queue().submit(request, deadline).map_err(ApiError::from_engine)?;
    ticket.wait().await.map_err(ApiError::from_engine)
}

/// The PNG of a generated image, with its generation `parameters` in a text chunk; encoded
/// on the blocking pool.
pub async fn encode_png(image: RgbImage, parameters: String) -> Result<Vec<u8>, ApiError> {
    tokio::task::spawn_blocking(move || sdxl_engine::png::encode_with_parameters(&image, &parameters))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(ApiError::from_engine)
}

/// 200 `image/png` with the seed and timing headers.
async fn png_response(done: Completed, parameters: &str, seed: u64) -> Result<Response, ApiError> {
    let (queue_time, inference_time) = (done.queue_time, done.inference_time);
    let png = encode_png(done.image, parameters.to_string()).await?;
    let mut response = png.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    headers.insert("x-seed", HeaderValue::from(seed));
    headers.insert("x-queue-time-ms", HeaderValue::from(queue_time.as_millis() as u64));
    headers.insert("x-inference-time-ms", HeaderValue::from(inference_time.as_millis() as u64));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_request_is_true_or_false() {
        assert!(!queue_request(None).unwrap());
        assert!(queue_request(Some("queueRequest=true")).unwrap());
        assert!(!queue_request(Some("other=1&queueRequest=false")).unwrap());
        for bad in ["queueRequest=null", "queueRequest=1", "queueRequest", "queueRequest=true&queueRequest=x"] {
            assert!(queue_request(Some(bad)).is_err(), "{bad}");
        }
    }
}
