//! `GET /health` (the process answers), `GET /ready` (model loaded, not draining),
//! `GET /metrics` (Prometheus text) and `GET /openapi.json`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::AppState;

/// Never touches the queue, so it answers while the worker is busy.
pub async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// 200 while accepting work; 503 once draining for shutdown, while the job store does not
/// answer (back to 200 by itself once it does), and after repeated generations failed for
/// the server's own reasons (until one succeeds).
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" })))
    } else if !state.store_reachable() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "store_unreachable" })))
    } else if state.failing() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "failing" })))
    } else {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "queue_waiting": state.queue().waiting(), "busy": state.queue().busy() })),
        )
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!(sdxl_engine::metric_names::QUEUE_DEPTH).set(state.queue().waiting() as f64);
    // the job store's gauges are kept by the job runner: a scrape never queries the store
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.inner.metrics.render())
}

pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    Json(crate::openapi::document(state.config()))
}
