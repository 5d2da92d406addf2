//! Prometheus metrics: the recorder (installed once per process) and the request counter.
//! Engine metrics (queue depth, waits, step and generation seconds) are recorded by the
//! engine under the names in `sdxl_engine::metric_names`.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Responses by HTTP status.
pub const REQUESTS_TOTAL: &str = "sdxl_requests_total";

/// Stored asynchronous jobs waiting to be claimed: the shared store's backlog, the same on
/// every server that uses it (scale a fleet on it).
pub const JOBS_QUEUED: &str = "sdxl_jobs_queued";

/// Bytes the job store holds (requests and images), read every few seconds in the
/// background rather than per scrape.
pub const JOBS_STORED_BYTES: &str = "sdxl_jobs_stored_bytes";

/// Connections open, by pool: `main` (served in full, up to `--max-connections`) and
/// `overflow` (beyond it, health checks only).
pub const CONNECTIONS_OPEN: &str = "sdxl_connections_open";

/// Connections the server closed on its own, by reason: `first_request_timeout`,
/// `idle_timeout`, `write_timeout`, `evicted` (an overflow connection replaced by a newer
/// one), `overflow_deadline`, `refused` (beyond the cap and the overflow).
pub const CONNECTIONS_CLOSED: &str = "sdxl_connections_closed_total";

/// The process-wide Prometheus recorder; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (by an embedding program); then
            // this one renders nothing, which is better than failing to start.
            if metrics::set_global_recorder(recorder).is_ok() {
                sdxl_engine::metric_names::describe();
                metrics::describe_gauge!(JOBS_QUEUED, metrics::Unit::Count, "Stored jobs waiting to be claimed.");
                metrics::describe_gauge!(
                    JOBS_STORED_BYTES,
                    metrics::Unit::Bytes,
                    "Bytes of requests and images in the job store."
                );
                metrics::describe_gauge!(CONNECTIONS_OPEN, metrics::Unit::Count, "Connections open, by pool.");
                metrics::describe_counter!(
                    CONNECTIONS_CLOSED,
                    metrics::Unit::Count,
                    "Connections closed by the server's limits, by reason."
                );
            }
            handle
        })
        .clone()
}

/// Counts every response by status.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    metrics::counter!(REQUESTS_TOTAL, "status" => response.status().as_u16().to_string()).increment(1);
    response
}
