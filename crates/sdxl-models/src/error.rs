//! The error type of the model library: every failure names what it is about (a file, a
//! config key, a checkpoint tensor), so a caller can print it as one line.

use std::path::PathBuf;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        // Not marked #[source]: the message already carries it, and error chains printed
        // with their causes would repeat it.
        source: std::io::Error,
    },
    /// A JSON config or tokenizer file is malformed or lacks a required key.
    #[error("invalid {path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A checkpoint does not match the architecture its config describes.
    #[error("checkpoint {path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A config asks for something this implementation does not support.
    #[error("unsupported {what}: {value}")]
    Unsupported { what: String, value: String },
    /// An argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's step callback asked the run to stop.
    #[error("generation cancelled")]
    Cancelled,
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Drops candle's captured backtrace (present under `RUST_BACKTRACE`), so the error
    /// stays one line; the operation and shapes in the message are what a user can act on.
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(strip_backtrace(e))
    }
}

/// The error without candle's backtrace wrapper.
pub fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        other => other,
    }
}

/// The result type of the model library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A config error for `path`.
    pub fn config(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Config { path: path.into(), message: message.to_string() }
    }

    /// An I/O error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
