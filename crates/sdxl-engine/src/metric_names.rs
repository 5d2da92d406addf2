//! Names of the metrics the job queue records through the `metrics` facade.
//!
//! The engine only records; whoever installs a recorder (the server's Prometheus exporter)
//! decides where they go. With no recorder installed the macros do nothing. Names carry the
//! `sdxl_` prefix; durations are in seconds and end in `_seconds`.

/// Gauge: jobs waiting in the queue (the running job not counted).
pub const QUEUE_DEPTH: &str = "sdxl_queue_depth";
/// Histogram: seconds from submission to the start of generation, for jobs that started.
pub const QUEUE_WAIT_SECONDS: &str = "sdxl_queue_wait_seconds";
/// Histogram: seconds between two consecutive denoising steps of one job. The first step
/// is not recorded: its time includes prompt encoding (and, for img2img, image encoding).
pub const STEP_SECONDS: &str = "sdxl_step_seconds";
/// Histogram: seconds of a whole successful generation, prompt encoding to decoded pixels.
pub const GENERATION_SECONDS: &str = "sdxl_generation_seconds";
/// Counter: jobs that left the queue, labelled [`OUTCOME`].
pub const JOBS_TOTAL: &str = "sdxl_jobs_total";
/// The label of [`JOBS_TOTAL`]; its values are [`Outcome::as_str`].
pub const OUTCOME: &str = "outcome";

/// How a job ended, the value of the [`OUTCOME`] label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An image was produced.
    Ok,
    /// The backend failed or panicked.
    Error,
    /// The requester went away, or the queue shut down before the job started.
    Cancelled,
    /// The deadline passed while waiting or during generation.
    Timeout,
}

impl Outcome {
    /// The label value: `ok`, `error`, `cancelled` or `timeout`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Timeout => "timeout",
        }
    }
}

/// Registers units and help texts with the installed recorder; call once after installing
/// it (the facade forwards descriptions only to a recorder that exists at the time).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Jobs waiting in the queue, the running job not counted.");
    describe_histogram!(QUEUE_WAIT_SECONDS, Unit::Seconds, "Time from submission to the start of generation.");
    describe_histogram!(STEP_SECONDS, Unit::Seconds, "Time of one denoising step (after the first).");
    describe_histogram!(GENERATION_SECONDS, Unit::Seconds, "Time of a whole successful generation.");
    describe_counter!(JOBS_TOTAL, Unit::Count, "Jobs that left the queue, by outcome (ok, error, cancelled, timeout).");
}

/// Counts one job in [`JOBS_TOTAL`].
pub(crate) fn count_job(outcome: Outcome) {
    metrics::counter!(JOBS_TOTAL, OUTCOME => outcome.as_str()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for name in [QUEUE_DEPTH, QUEUE_WAIT_SECONDS, STEP_SECONDS, GENERATION_SECONDS, JOBS_TOTAL] {
            assert!(name.starts_with("sdxl_"), "{name} lacks the sdxl_ prefix");
        }
        for name in [QUEUE_WAIT_SECONDS, STEP_SECONDS, GENERATION_SECONDS] {
            assert!(name.ends_with("_seconds"), "{name} is a duration without the _seconds suffix");
        }
        let outcomes = [Outcome::Ok, Outcome::Error, Outcome::Cancelled, Outcome::Timeout].map(Outcome::as_str);
        assert_eq!(outcomes, ["ok", "error", "cancelled", "timeout"]);
    }
}
