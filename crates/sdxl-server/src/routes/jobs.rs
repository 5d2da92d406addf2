//! Asynchronous jobs in the durable store (see [`crate::jobs`] and [`crate::job_api`]):
//! `POST /v1/jobs` (the run route's body; 202 with the id), `GET /v1/jobs/{id}` (status, queue
//! position, progress), `GET /v1/jobs/{id}/image` (the PNG once done) and
//! `DELETE /v1/jobs/{id}` (cancel and delete). Another key's job answers 404, as an unknown id.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::auth::Owner;
use crate::error::ApiError;
use crate::job_api::{self, record_json, Deleted, Job};
use crate::AppState;

pub async fn submit(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = job_api::idempotency_key(&headers)?;
    let id = job_api::submit_body(&state, &owner, key.as_deref(), body).await?;
    let record = job_api::find(&state, &owner, &id).await?;
    let mut response = (StatusCode::ACCEPTED, Json(record_json(&record))).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

pub async fn status(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, ApiError> {
    let record = job_api::find(&state, &owner, &job_id(path)?).await?;
    Ok(Json(record_json(&record)))
}

pub async fn image(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let record = job_api::find(&state, &owner, &job_id(path)?).await?;
    job_api::finished_image(&state, &record).await
}

pub async fn cancel(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Deleted>, ApiError> {
    Ok(Json(job_api::delete(&state, &owner, &job_id(path)?).await?))
}

fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| ApiError::BadRequest(format!("invalid URL: {}", e.body_text())))
}
