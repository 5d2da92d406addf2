//! The durable-job operations the routes share (see [`crate::jobs`] for the store): submit
//! a run body as a stored job, find a job for its owner, delete it, and answer its image,
//! stored error or state. A job is only ever found for the owner that stored it: for any
//! other owner it does not exist (404, as an unknown id).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::generation::validate_job_body;
use crate::jobs::{
    Clock, Idempotency, JobError, JobRecord, JobStore, NewJob, QueueLimits, Status, StoreError, StoredRequest,
    Submitted,
};
use crate::AppState;
use sdxl_engine::output::content_type_of;

fn store(state: &AppState) -> Result<&Arc<dyn JobStore>, ApiError> {
    state.inner.jobs.as_ref().ok_or(ApiError::NotFound)
}

/// A store call's result for a client: a store that does not answer is a 503 with
/// `Retry-After` (never "inference failed"), and marks the store unreachable for `/ready`.
fn checked<T>(state: &AppState, result: Result<T, StoreError>) -> Result<T, ApiError> {
    state.store_answered(result.is_ok());
    result.map_err(store_error)
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "job store failed");
    ApiError::StoreUnavailable
}

/// The longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The request's `Idempotency-Key`, if any: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| (1..=MAX_IDEMPOTENCY_KEY).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(key) => Ok(Some(key.to_string())),
        None => Err(ApiError::BadRequest(format!(
            "the `Idempotency-Key` header must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        ))),
    }
}

/// Validates a run body and stores it as `owner`'s queued job; answers its id. With an
/// idempotency key, the same key and body answer the job stored the first time (the same
/// key with another body: 409).
pub async fn submit_body(
    state: &AppState,
    owner: &Owner,
    idempotency_key: Option<&str>,
    body: Body,
) -> Result<String, ApiError> {
    let store = store(state)?;
    if state.draining() {
        return Err(ApiError::ShuttingDown);
    }
    let config = state.config();
    let limit = config.max_job_body.min(config.body_limit);
    let (body, reservation) = match state.inner.admission.read_body(body, limit, config.body_read_timeout).await {
        Err(ApiError::PayloadTooLarge(_)) if limit < config.body_limit => return Err(ApiError::JobBodyTooLarge(limit)),
        other => other?,
    };
    let body_hash = idempotency_key.map(|_| hex_sha256(&body));
    let config = config.clone();
    let stored: StoredRequest = state.inner.admission.decode(move || validate_job_body(&body, &config)).await?;
    drop(reservation);
    let id = crate::jobs::new_id();
    let job = NewJob {
        id: &id,
        owner: owner.id(),
        request: &stored,
        idempotency: idempotency_key.zip(body_hash.as_deref()).map(|(key, body_hash)| Idempotency { key, body_hash }),
        limits: QueueLimits {
            total: state.config().max_queued_jobs,
            per_owner: state.config().max_queued_jobs_per_key,
        },
    };
    match checked(state, store.submit(&job, Clock::Store).await)? {
        Submitted::Queued => Ok(id),
        Submitted::Existing(earlier) => Ok(earlier),
        Submitted::KeyReused => Err(ApiError::IdempotencyKeyReused),
        Submitted::Full { limit, per_owner } => Err(ApiError::JobQueueFull { limit, per_key: per_owner }),
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// `owner`'s job `id`; 404 if there is none, or it is another owner's.
pub async fn find(state: &AppState, owner: &Owner, id: &str) -> Result<JobRecord, ApiError> {
    let record = checked(state, store(state)?.get(id).await)?;
    record.filter(|r| owner.owns(r.owner.as_deref())).ok_or_else(|| ApiError::UnknownJob(id.into()))
}

/// Deletes `owner`'s job `id` (cancelling it if it waits or runs); answers what it was.
/// The answer of `DELETE /v1/jobs/{id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    /// `cancelled` if it was queued or running, `deleted` if it had finished.
    #[schema(pattern = "^(cancelled|deleted)$")]
    pub status: String,
}

pub async fn delete(state: &AppState, owner: &Owner, id: &str) -> Result<Deleted, ApiError> {
    let status = match checked(state, store(state)?.delete(id, owner.id(), owner.is_anonymous()).await)? {
        Some(Status::Queued | Status::Running) => "cancelled",
        Some(Status::Done | Status::Failed) => "deleted",
        None => return Err(ApiError::UnknownJob(id.into())),
    };
    Ok(Deleted { id: id.into(), status: status.into() })
}

/// The Workers AI poll: the PNG once done, the stored error if it failed, else
/// `{"result": {"status", "request_id"}}` in the success envelope.
pub async fn poll(state: &AppState, owner: &Owner, id: &str) -> Result<Response, ApiError> {
    let record = find(state, owner, id).await?;
    match record.status {
        Status::Done | Status::Failed => finished_image(state, &record).await,
        Status::Queued | Status::Running => {
            Ok(Json(queued_envelope(&record.id, record.status.as_str())).into_response())
        }
    }
}

/// Workers AI's answer to a queued request, and to a poll of one not finished:
/// `{"result": {"status", "request_id"}, "success": true, "errors": [], "messages": []}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueuedEnvelope {
    pub result: QueuedResult,
    /// Always true.
    pub success: bool,
    /// Always empty.
    #[schema(value_type = Vec<Object>, max_items = 0)]
    pub errors: Vec<Value>,
    /// Always empty.
    #[schema(value_type = Vec<Object>, max_items = 0)]
    pub messages: Vec<Value>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QueuedResult {
    /// `queued` or `running`.
    #[schema(pattern = "^(queued|running)$")]
    pub status: String,
    pub request_id: String,
}

pub fn queued_envelope(id: &str, status: &str) -> QueuedEnvelope {
    QueuedEnvelope {
        result: QueuedResult { status: status.into(), request_id: id.into() },
        success: true,
        errors: Vec::new(),
        messages: Vec::new(),
    }
}

/// A run route body that is exactly `{"request_id": "…"}`: a poll, not a generation.
pub fn poll_request(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Poll {
        request_id: String,
    }
    // a poll is tiny; a generation request is never parsed twice
    (body.len() <= 1024).then(|| serde_json::from_slice::<Poll>(body).ok()).flatten().map(|p| p.request_id)
}

/// A done job's PNG (with its seed), a failed job's stored error, else 409.
pub async fn finished_image(state: &AppState, record: &JobRecord) -> Result<Response, ApiError> {
    match (record.status, &record.error) {
        (Status::Done, _) => {
            let png = checked(state, store(state)?.image(&record.id).await)?;
            // deleted between the two reads (its TTL ran out)
            let image = png.ok_or_else(|| ApiError::UnknownJob(record.id.clone()))?;
            // an image stored for a URL answer may be a JPEG or WebP
            let content_type = content_type_of(&image);
            let mut response = image.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert("x-seed", HeaderValue::from(record.seed));
            Ok(response)
        }
        (Status::Failed, Some(error)) => Ok(stored_error(error)),
        (status, _) => Err(ApiError::NotReady(record.id.clone(), status.as_str())),
    }
}

/// Ids of images stored for a URL answer start with this; only those are served by
/// [`shared_image`], without a key (the id is the credential), so no other job is.
const SHARED_PREFIX: &str = "img_";

/// The job store, where images answered by URL are kept; refused before any work is done
/// when the server runs without one.
pub fn image_store(state: &AppState) -> Result<&Arc<dyn JobStore>, ApiError> {
    state.inner.jobs.as_ref().ok_or_else(|| {
        ApiError::BadRequest("`response_format` \"url\" needs the job store, which this server runs without".into())
    })
}

/// Stores an image generated for `owner` so that a URL can serve it until the job TTL
/// expires it; answers its file name (`img_<128-bit id>.<extension>`).
pub async fn store_image(
    state: &AppState,
    owner: &Owner,
    stored: &StoredRequest,
    image: Vec<u8>,
    extension: &str,
) -> Result<String, ApiError> {
    let store = state.inner.jobs.as_ref().ok_or_else(|| {
        ApiError::BadRequest("`response_format` \"url\" needs the job store, which this server runs without".into())
    })?;
    let id = format!("{SHARED_PREFIX}{}", crate::jobs::new_id());
    checked(state, store.store_done(&id, owner.id(), stored, image, Clock::Store).await)?;
    Ok(format!("{id}.{extension}"))
}

/// The image of a URL answer by its file name; 404 for any other name, expired or not.
pub async fn shared_image(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let id = name.rsplit_once('.').map_or(name, |(id, _)| id);
    if !id.starts_with(SHARED_PREFIX) {
        return Err(ApiError::NotFound);
    }
    let image = checked(state, store(state)?.image(id).await)?.ok_or(ApiError::NotFound)?;
    let content_type = content_type_of(&image);
    let mut response = image.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    Ok(response)
}

/// A failed job's error, answered as the synchronous route would have.
fn stored_error(error: &JobError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "result": null,
        "success": false,
        "errors": [{ "code": error.code, "message": error.message }],
        "messages": [],
    });
    (status, Json(body)).into_response()
}

/// A stored job as `GET /v1/jobs/{id}` answers it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: String,
    /// `queued`, `running`, `done` or `failed`.
    #[schema(pattern = "^(queued|running|done|failed)$")]
    pub status: String,
    /// Queued jobs ahead of this one (queued jobs only).
    #[schema(minimum = 0)]
    pub position: Option<u64>,
    /// Denoising steps done.
    pub step: u64,
    pub total: u64,
    /// The seed, in decimal (JSON numbers lose precision above 2^53 in many clients).
    pub seed: String,
    /// Times a server took it; above 1 after a server died.
    pub attempts: u64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When the last attempt started.
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<JobFailure>,
}

/// How a failed job failed: its Workers AI code and message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobFailure {
    pub code: u32,
    pub message: String,
}

pub fn record_json(record: &JobRecord) -> Job {
    Job {
        id: record.id.clone(),
        status: record.status.as_str().into(),
        position: record.position,
        step: record.step,
        total: record.total,
        seed: record.seed.to_string(),
        attempts: record.attempts,
        created_at: record.created_at,
        started_at: record.started_at,
        finished_at: record.finished_at,
        error: record.error.as_ref().map(|e| JobFailure { code: e.code, message: e.message.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_request_id_is_a_poll() {
        assert_eq!(poll_request(br#"{"request_id": "abc"}"#), Some("abc".into()));
        assert_eq!(poll_request(br#"{"request_id": "abc", "prompt": "x"}"#), None);
        assert_eq!(poll_request(br#"{"prompt": "x"}"#), None);
        assert_eq!(poll_request(b"not json"), None);
    }
}
