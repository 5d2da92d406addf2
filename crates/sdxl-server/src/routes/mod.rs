//! One module per endpoint.

pub mod health;
pub mod openai;
pub mod run;

use crate::error::ApiError;

/// Any unknown route: 404 with code 7003 in the envelope.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
