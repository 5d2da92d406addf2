//! The engine between front ends (CLI, HTTP) and the model library: fetching and loading a
//! model directory, validating requests into [`GenerateRequest`], noise, PNG encoding, and the
//! job [`Queue`] whose worker thread owns the model.

pub mod bench;
pub mod builtin;
pub mod error;
pub mod generate;
pub mod images;
pub mod inspect;
pub mod metric_names;
pub mod model;
pub mod output;
pub mod png;
pub mod preview;
pub mod queue;
pub mod request;
#[cfg(feature = "test-backend")]
pub mod test_backend;

pub use error::{Error, Result};
pub use queue::{
    Backend, Completed, Event, PipelineBackend, Placement, Queue, QueueConfig, Step, Submission, Ticket, Update,
};
pub use request::{GenerateRequest, Limits, NoiseSource, RawRequest, Sampling};
