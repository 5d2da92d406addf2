//! The engine between front ends (CLI, HTTP) and the model library: loading a model
//! directory, validating requests into [`GenerateRequest`], noise, PNG encoding.

pub mod error;
pub mod generate;
pub mod images;
pub mod model;
pub mod png;
pub mod request;

pub use error::{Error, Result};
pub use request::{GenerateRequest, Limits, NoiseSource, RawRequest};
