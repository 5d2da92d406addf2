//! The one table from failures to HTTP status and Workers AI error code, and the three
//! envelopes one error is rendered in: Workers AI's
//! `{"result":null,"success":false,"errors":[{"code":N,"message":"…"}],"messages":[]}`,
//! OpenAI's `{"error":{"message","type","param","code"}}` and AUTOMATIC1111's
//! `{"error","detail","body","errors"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every way a request can fail, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Body not JSON, bad image bytes, conflicting fields.
    #[error("{0}")]
    BadRequest(String),
    /// A field outside its bound: which field, the bound it must meet, and what was sent.
    #[error("`{field}` must be {bound}, got {got}")]
    Invalid { field: String, bound: String, got: String },
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
    /// A model id that `GET /v1/models/{id}` does not know.
    #[error("the model {0:?} does not exist")]
    UnknownModelId(String),
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
    /// A body for the job store beyond `--max-job-body`.
    #[error(
        "a stored job's body must be at most {0} bytes (`--max-job-body`); send smaller input images, \
         or use the synchronous routes"
    )]
    JobBodyTooLarge(usize),
    /// The job store holds as many queued jobs as allowed (of this key, if `per_key`).
    #[error(
        "the job store already holds {limit} queued jobs{}, its limit (`--max-queued-jobs{}`); retry later",
        if *per_key { " of this API key" } else { "" },
        if *per_key { "-per-key" } else { "" }
    )]
    JobQueueFull { limit: u64, per_key: bool },
    /// An `Idempotency-Key` the client already used for a different body.
    #[error("this Idempotency-Key was used for a different request body; use a new key for a new request")]
    IdempotencyKeyReused,
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
    #[error(
        "request timed out: it waited and ran longer than this server's request timeout; \
         submit long work to POST /v1/jobs and poll it"
    )]
    Timeout,
    /// The body did not wholly arrive within the body-read timeout.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The durable job store did not answer; the request may be retried.
    #[error("the job store is unreachable; retry later")]
    StoreUnavailable,
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
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => (StatusCode::BAD_REQUEST, 5006),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, 10000),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, 10403),
            ApiError::MisdirectedHost(_) => (StatusCode::MISDIRECTED_REQUEST, 10421),
            ApiError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 10415),
            ApiError::UnknownModel(_) => (StatusCode::BAD_REQUEST, 5007),
            ApiError::NotFound => (StatusCode::NOT_FOUND, 7003),
            ApiError::UnknownJob(_) | ApiError::UnknownModelId(_) => (StatusCode::NOT_FOUND, 7003),
            ApiError::NotReady(..) => (StatusCode::CONFLICT, 3041),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 10405),
            ApiError::PayloadTooLarge(_) | ApiError::JobBodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, 3006),
            ApiError::JobQueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, 3040),
            ApiError::IdempotencyKeyReused => (StatusCode::CONFLICT, 3042),
            ApiError::QueueFull { .. } | ApiError::ShareFull { .. } | ApiError::BodiesBusy => {
                (StatusCode::TOO_MANY_REQUESTS, 3040)
            }
            ApiError::Timeout | ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, 3007),
            ApiError::ShuttingDown | ApiError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, 3040),
            ApiError::TooManyConnections => (StatusCode::SERVICE_UNAVAILABLE, 3040),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, 3030),
        }
    }

    /// Maps an engine failure; internal details go to the log only.
    pub fn from_engine(e: sdxl_engine::Error) -> Self {
        use sdxl_engine::Error as E;
        match e {
            E::InvalidRequest(message) => ApiError::BadRequest(message),
            E::OutOfBounds { field, bound, got } => ApiError::Invalid { field, bound, got },
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

/// Whether a generation failed for the server's own reasons (a backend panic, a model or
/// device error) rather than the request's: such a job is run again, elsewhere if need be,
/// and a server that keeps failing stops taking work ([`crate::AppState::failing`]).
pub fn is_server_fault(e: &sdxl_engine::Error) -> bool {
    use sdxl_engine::Error as E;
    matches!(e, E::Internal(_) | E::Models(_) | E::Model { .. } | E::Encode(_))
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
        let response = (status, axum::Json(self.envelope())).into_response();
        self.with_headers(response)
    }
}

impl ApiError {
    /// When a client should try again (`Retry-After`), for the errors that pass.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after_seconds } => Some(*retry_after_seconds),
            ApiError::ShareFull { .. } | ApiError::BodiesBusy | ApiError::StoreUnavailable => Some(5),
            ApiError::TooManyConnections => Some(1),
            ApiError::JobQueueFull { .. } => Some(10),
            _ => None,
        }
    }

    /// This error in the envelope of the API that `path` belongs to: OpenAI's under
    /// `/v1/images` and `/v1/models`, AUTOMATIC1111's under `/sdapi`, else Workers AI's.
    pub fn render_for(self, path: &str) -> Response {
        if path.starts_with("/v1/images") || path.starts_with("/v1/models") {
            OpenAiError(self).into_response()
        } else if path.starts_with("/sdapi/") {
            A1111Error(self).into_response()
        } else {
            self.into_response()
        }
    }

    /// The field an [`ApiError::Invalid`] names.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Adds this error's headers (`Retry-After`, `Connection: close`) to a response in any
    /// envelope.
    fn with_headers(&self, mut response: Response) -> Response {
        if let Some(seconds) = self.retry_after_seconds() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // The body may be partly unread, so the connection cannot carry another request:
        // say so, or a client may reuse it and see it closed under its next request.
        if matches!(
            self,
            ApiError::PayloadTooLarge(_)
                | ApiError::JobBodyTooLarge(_)
                | ApiError::Timeout
                | ApiError::BodyTimeout
                | ApiError::BodiesBusy
        ) {
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
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
        let body = json!({
            "error": { "message": self.0.to_string(), "type": kind, "param": self.0.field(), "code": code }
        });
        self.0.with_headers((status, axum::Json(body)).into_response())
    }
}

/// An [`ApiError`] as AUTOMATIC1111's API answers one: `{"error", "detail", "body", "errors"}`,
/// with 422 for a request that fails validation (FastAPI's status for it) and the same
/// statuses as the other routes otherwise. `detail` of a validation error is FastAPI's list of
/// `{"loc", "msg", "type"}`, else the message.
pub struct A1111Error(pub ApiError);

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        let (status, _) = self.0.status_and_code();
        let message = self.0.to_string();
        let validation = matches!(self.0, ApiError::BadRequest(_) | ApiError::Invalid { .. });
        let body = if validation {
            let location = match self.0.field() {
                Some(field) => json!(["body", field]),
                None => json!(["body"]),
            };
            json!({
                "error": "RequestValidationError",
                "detail": [{ "loc": location, "msg": message, "type": "value_error" }],
                "body": "",
                "errors": message,
            })
        } else {
            json!({ "error": "HTTPException", "detail": message, "body": "", "errors": message })
        };
        let status = if validation { StatusCode::UNPROCESSABLE_ENTITY } else { status };
        let mut response = self.0.with_headers((status, axum::Json(body)).into_response());
        if matches!(self.0, ApiError::Unauthorized) {
            // AUTOMATIC1111's --api-auth is HTTP Basic
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"sdxl\""));
        }
        response
    }
}
