//! One module per endpoint.

pub mod a1111;
pub mod health;
pub mod jobs;
pub mod openai;
pub mod playground;
pub mod run;
pub mod stream;

use crate::error::ApiError;

/// Any unknown route: 404 with code 7003 in the envelope.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A known route with a method it does not serve: 405 with code 10405 in the envelope (the
/// router adds the `Allow` header).
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
