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
        #[source]
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
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
