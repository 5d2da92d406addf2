//! The engine's error type.

/// Errors from loading a model or running a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is out of range or malformed; the message names the field and bound.
    #[error("{0}")]
    InvalidRequest(String),
    /// A request field outside its bound: the field, the bound (`"between 1 and 20"`) and the
    /// value sent, for front ends to report in their own terms.
    #[error("`{field}` must be {bound}, got {got}")]
    OutOfBounds { field: String, bound: String, got: String },
    /// The model directory is incomplete or inconsistent.
    #[error("model {dir}: {message}")]
    Model { dir: std::path::PathBuf, message: String },
    /// A noise or image file could not be used.
    #[error("{path}: {message}")]
    File { path: std::path::PathBuf, message: String },
    /// The model library failed.
    #[error(transparent)]
    Models(sdxl_models::Error),
    /// Writing the output image failed.
    #[error("cannot encode the image: {0}")]
    Encode(String),
    /// The queue already holds as many waiting jobs as it may; try again later.
    #[error("the queue is full")]
    QueueFull,
    /// The job's owner already has `share` jobs waiting, its share of the queue.
    #[error("this client already has {share} requests waiting, its share of the queue")]
    ShareFull { share: usize },
    /// The queue has stopped accepting jobs; a job still waiting at shutdown gets this too.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The job's deadline passed while it waited or between two denoising steps.
    #[error("request timed out")]
    Timeout,
    /// The job was stopped because its requester went away (or the step callback said so).
    #[error("request cancelled")]
    Cancelled,
    /// A bug: the backend panicked or the worker vanished. The text is for the log, not for
    /// a client.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sdxl_models::Error> for Error {
    /// The pipeline's own cancellation becomes [`Error::Cancelled`]; everything else is a
    /// model failure.
    fn from(e: sdxl_models::Error) -> Self {
        match e {
            sdxl_models::Error::Cancelled => Error::Cancelled,
            other => Error::Models(other),
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Models(e.into())
    }
}
