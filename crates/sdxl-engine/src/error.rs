//! The engine's error type.

/// Errors from loading a model or running a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is out of range or malformed; the message names the field and bound.
    #[error("{0}")]
    InvalidRequest(String),
    /// The model directory is incomplete or inconsistent.
    #[error("model {dir}: {message}")]
    Model { dir: std::path::PathBuf, message: String },
    /// A noise or image file could not be used.
    #[error("{path}: {message}")]
    File { path: std::path::PathBuf, message: String },
    /// The model library failed.
    #[error(transparent)]
    Models(#[from] sdxl_models::Error),
    /// Writing the output image failed.
    #[error("cannot encode the image: {0}")]
    Encode(String),
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Models(e.into())
    }
}
