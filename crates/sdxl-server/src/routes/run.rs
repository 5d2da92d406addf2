//! `POST /client/v4/accounts/{account_id}/ai/run/{model}` and `POST /ai/run/{model}`:
//! the Workers AI text-to-image call, answered with the PNG; `?queueRequest=true` stores it as
//! a durable job instead, and a body of `{"request_id"}` polls one.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::auth::Owner;
use crate::error::ApiError;
use crate::generation::{png_response, read_body, validate_run};
use crate::{job_api, AppState, MODEL_ID};

/// The account-scoped route (the account id is accepted and ignored).
pub async fn account_route(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    path: Result<Path<(String, String)>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((_account_id, model)) = path.map_err(bad_path)?;
    let idempotency_key = job_api::idempotency_key(&headers)?;
    run(Call { state, owner, model, query, idempotency_key }, body).await
}

/// The short route without an account.
pub async fn short_route(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(model) = path.map_err(bad_path)?;
    let idempotency_key = job_api::idempotency_key(&headers)?;
    run(Call { state, owner, model, query, idempotency_key }, body).await
}

/// What both run routes hand on.
struct Call {
    state: AppState,
    owner: Owner,
    model: String,
    query: Option<String>,
    /// Used with `?queueRequest=true` only.
    idempotency_key: Option<String>,
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

async fn run(call: Call, body: Body) -> Result<Response, ApiError> {
    let Call { state, owner, model, query, idempotency_key } = call;
    let model = model.trim_start_matches('/');
    if model != MODEL_ID {
        return Err(ApiError::UnknownModel(model.to_string()));
    }
    if queue_request(query.as_deref())? {
        let id = job_api::submit_body(&state, &owner, idempotency_key.as_deref(), body).await?;
        return Ok(Json(job_api::queued_envelope(&id, "queued")).into_response());
    }
    let (body, reservation) = read_body(&state, body).await?;
    if let Some(id) = job_api::poll_request(&body) {
        return job_api::poll(&state, &owner, &id).await;
    }
    let generation = validate_run(&state, body, reservation).await?;
    png_response(&state, &owner, generation).await
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
