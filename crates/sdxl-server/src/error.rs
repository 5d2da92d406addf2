//! The one table from failures to HTTP status and Workers AI error code, and the error
//! envelope `{"result":null,"success":false,"errors":[{"code":N,"message":"…"}],"messages":[]}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every way a request can fail, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Body not JSON, schema violation, bad image bytes, conflicting fields.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or unknown API key.
    #[error("authentication error")]
    Unauthorized,
    /// A browser request from an origin the server does not allow.
    #[error("{0}")]
    Forbidden(String),
    /// A `Host` that is not this server's (DNS rebinding, or a misrouted request).
    #[error("{0}")]
    MisdirectedHost(String),
    /// A browser request whose body is declared as a type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A model other than the one this server runs.
    #[error("no such model {0}")]
    UnknownModel(String),
    /// No route matches.
    #[error("no route for that URI")]
    NotFound,
    /// No stored job has that id (never submitted, or deleted after its TTL).
    #[error("no job with id {0:?}")]
    UnknownJob(String),
    /// The job has no image yet.
    #[error("job {0:?} is {1}; its image is not ready")]
    NotReady(String, &'static str),
    /// The route exists, but not for this method (the `Allow` header lists the methods).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body exceeds the configured limit.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The queue is full; the client should retry after the given seconds.
    #[error("the queue is full, retry later")]
    QueueFull { retry_after_seconds: u64 },
    /// The client's key already has its share of the queue waiting; other keys are admitted.
    #[error("this API key already has {share} requests waiting, its share of the queue; retry later")]
    ShareFull { share: usize },
    /// Request bodies being read already take the whole body-memory budget.
    #[error("the server is reading as many request bodies as it can hold; retry later")]
    BodiesBusy,
    /// The server has as many connections open as it serves; beyond them it answers only
    /// `/health`, `/ready` and `/metrics`.
    #[error("the server has too many connections open; retry later")]
    TooManyConnections,
    /// The request waited or ran past its deadline.
    #[error("request timed out")]
    Timeout,
    /// The server is draining for shutdown.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Generation failed; the detail is logged, not returned.
    #[error("inference failed")]
    Internal,
}

impl ApiError {
    /// HTTP status and Workers AI error code (DESIGN §5).
    pub fn status_and_code(&self) -> (StatusCode, u32) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, 5006),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, 10000),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, 10403),
            ApiError::MisdirectedHost(_) => (StatusCode::MISDIRECTED_REQUEST, 10421),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 10415),
            ApiError::UnknownModel(_) => (StatusCode::BAD_REQUEST, 5007),
            ApiError::NotFound => (StatusCode::NOT_FOUND, 7003),
            ApiError::UnknownJob(_) => (StatusCode::NOT_FOUND, 7003),
            ApiError::NotReady(..) => (StatusCode::CONFLICT, 3041),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 10405),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, 3006),
            ApiError::QueueFull { .. } | ApiError::ShareFull { .. } | ApiError::BodiesBusy => {
                (StatusCode::TOO_MANY_REQUESTS, 3040)
            }
            ApiError::Timeout => (StatusCode::REQUEST_TIMEOUT, 3007),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, 3040),
            ApiError::TooManyConnections => (StatusCode::SERVICE_UNAVAILABLE, 3040),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, 3030),
        }
    }

    /// Maps an engine failure; internal details go to the log only.
    pub fn from_engine(e: sdxl_engine::Error) -> Self {
        use sdxl_engine::Error as E;
        match e {
            E::InvalidRequest(message) => ApiError::BadRequest(message),
            E::QueueFull => ApiError::QueueFull { retry_after_seconds: 5 },
            E::ShareFull { share } => ApiError::ShareFull { share },
            E::Timeout => ApiError::Timeout,
            E::ShuttingDown => ApiError::ShuttingDown,
            // the client is gone; nobody reads this answer
            E::Cancelled => ApiError::Timeout,
            other => {
                tracing::error!(error = %other, "generation failed");
                ApiError::Internal
            }
        }
    }
}

impl ApiError {
    /// The Workers AI error envelope for this error.
    pub fn envelope(&self) -> serde_json::Value {
        let (_, code) = self.status_and_code();
        json!({
            "result": null,
            "success": false,
            "errors": [{ "code": code, "message": self.to_string() }],
            "messages": [],
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        let mut response = (status, axum::Json(self.envelope())).into_response();
        if let Some(seconds) = self.retry_after_seconds() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // The body may be partly unread, so the connection cannot carry another request:
        // say so, or a client may reuse it and see it closed under its next request.
        if matches!(self, ApiError::PayloadTooLarge(_) | ApiError::Timeout | ApiError::BodiesBusy) {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl ApiError {
    /// When a client should try again (`Retry-After`), for the errors that pass.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after_seconds } => Some(*retry_after_seconds),
            ApiError::ShareFull { .. } | ApiError::BodiesBusy => Some(5),
            ApiError::TooManyConnections => Some(1),
            _ => None,
        }
    }

    /// This error in the envelope of the API that `path` belongs to: OpenAI's
    /// `{"error": {...}}` under `/v1/images`, else Workers AI's.
    pub fn render_for(self, path: &str) -> Response {
        if path.starts_with("/v1/images") {
            OpenAiError(self).into_response()
        } else {
            self.into_response()
        }
    }
}

/// An [`ApiError`] in OpenAI's error shape, with the same statuses as the Workers AI routes.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let (status, code) = self.0.status_and_code();
        let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
        let body = json!({ "error": { "message": self.0.to_string(), "type": kind, "code": code } });
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = self.0.retry_after_seconds() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
