//! The Workers AI–compatible HTTP server: routes, wire types, auth, the error table,
//! metrics and OpenAPI. The model runs on the engine's worker thread; handlers only
//! validate, enqueue and await.

mod admission;
pub mod auth;
pub mod config;
mod connection;
pub mod error;
pub mod generation;
mod job_api;
pub mod jobs;
mod listener;
pub mod metrics;
pub mod openapi;
pub mod origin;
mod progress;
mod routes;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use sdxl_engine::queue::Queue;

pub use config::ServerConfig;
pub use connection::{default_max_connections, ConnectionLimits};
pub use generation::validate_run_body;
pub use listener::serve;

/// The model id this server answers for.
pub const MODEL_ID: &str = "@cf/bytedance/stable-diffusion-xl-lightning";

/// Generations failed in a row for the server's own reasons after which it reports itself
/// not ready and claims no stored jobs.
pub const FAILING_AFTER: u32 = 3;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    config: ServerConfig,
    keys: auth::ApiKeys,
    draining: AtomicBool,
    /// Whether the job store answered its last call (`/ready` fails while it does not).
    store_reachable: AtomicBool,
    /// Generations in a row that failed for the server's own reasons.
    faults_in_a_row: AtomicU32,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    admission: admission::Admission,
    origins: origin::OriginPolicy,
    /// The durable job store, when the job routes are on.
    jobs: Option<Arc<dyn jobs::JobStore>>,
    /// When the server started (Unix seconds).
    started: u64,
    /// The AUTOMATIC1111 requests running, for its progress and interrupt routes.
    progress: Arc<progress::Board>,
}

impl AppState {
    pub fn new(queue: Queue, config: ServerConfig) -> Self {
        Self::with_jobs(queue, config, None)
    }

    /// With the asynchronous job routes served from `jobs` (run the
    /// [`jobs::runner`] beside it to execute the stored jobs).
    pub fn with_jobs(queue: Queue, config: ServerConfig, jobs: Option<Arc<dyn jobs::JobStore>>) -> Self {
        let keys = auth::ApiKeys::new(&config.api_keys);
        let admission =
            admission::Admission::new(config.body_memory_budget, config.body_limit, config.concurrent_decodes);
        let origins = origin::OriginPolicy::new(&config.allowed_hosts, &config.cors_origins);
        let draining = AtomicBool::new(false);
        let metrics = metrics::install();
        let started = routes::openai::unix_now();
        let inner = Inner {
            queue,
            config,
            keys,
            draining,
            store_reachable: AtomicBool::new(true),
            faults_in_a_row: AtomicU32::new(0),
            metrics,
            admission,
            origins,
            jobs,
            started,
            progress: Arc::default(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// When the server started (Unix seconds).
    pub fn started(&self) -> u64 {
        self.inner.started
    }

    /// Whether requests must carry an API key.
    pub fn auth_enabled(&self) -> bool {
        self.inner.keys.enabled()
    }

    /// Marks the server as draining: `/ready` fails and the queue takes no new work.
    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.queue.shutdown();
    }

    /// Records whether a call to the job store succeeded.
    pub fn store_answered(&self, answered: bool) {
        if self.inner.store_reachable.swap(answered, Ordering::SeqCst) != answered {
            if answered {
                tracing::info!("the job store answers again");
            } else {
                tracing::warn!("the job store is unreachable; /ready answers 503 until it answers");
            }
        }
    }

    /// Whether the job store answered its last call.
    pub fn store_reachable(&self) -> bool {
        self.inner.store_reachable.load(Ordering::SeqCst)
    }

    /// Records how a generation ended: failed for the server's own reasons
    /// ([`error::is_server_fault`]) or not.
    pub fn generation_ended(&self, server_fault: bool) {
        if !server_fault {
            self.inner.faults_in_a_row.store(0, Ordering::SeqCst);
        } else if self.inner.faults_in_a_row.fetch_add(1, Ordering::SeqCst) + 1 == FAILING_AFTER {
            tracing::error!(
                faults = FAILING_AFTER,
                "generations keep failing for this server's own reasons; /ready answers 503 and no stored \
                 jobs are claimed until one succeeds"
            );
        }
    }

    /// Whether the last [`FAILING_AFTER`] generations all failed for the server's own reasons.
    pub fn failing(&self) -> bool {
        self.inner.faults_in_a_row.load(Ordering::SeqCst) >= FAILING_AFTER
    }

    /// Whether [`AppState::start_draining`] was called.
    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }
}

/// AUTOMATIC1111's API ([`routes::a1111`]).
fn a1111_routes() -> Router<AppState> {
    use routes::a1111::{self, info};
    Router::new()
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/options", get(info::get_options).post(info::set_options))
        .route("/sdapi/v1/sd-models", get(info::sd_models))
        .route("/sdapi/v1/samplers", get(info::samplers))
        .route("/sdapi/v1/schedulers", get(info::schedulers))
        .route("/sdapi/v1/upscalers", get(info::upscalers))
        .route("/sdapi/v1/latent-upscale-modes", get(info::latent_upscale_modes))
        .route("/sdapi/v1/sd-vae", get(info::sd_vae))
        .route("/sdapi/v1/sd-modules", get(info::sd_vae))
        .route("/sdapi/v1/loras", get(info::loras))
        .route("/sdapi/v1/scripts", get(info::scripts))
        .route("/sdapi/v1/refresh-checkpoints", post(info::refresh_checkpoints))
        .route("/sdapi/v1/progress", get(info::progress))
        .route("/sdapi/v1/interrupt", post(info::interrupt))
}

/// The router with every route; tests drive it without opening a port.
///
/// Layers, outermost first: the request counter, the browser-origin guard (every route), CORS
/// for the allowed origins, then the API-key check over the protected routes only (health,
/// readiness, metrics, the OpenAPI document and the playground stay open).
pub fn app(state: AppState) -> Router {
    let protected = Router::new()
        .route("/client/v4/accounts/{account_id}/ai/run/{*model}", post(routes::run::account_route))
        .route("/ai/run/{*model}", post(routes::run::short_route))
        .route("/v1/images/generations", post(routes::openai::generations))
        .route("/v1/images/edits", post(routes::openai::edits::edits))
        .route("/v1/models", get(routes::openai::models))
        .route("/v1/models/{*id}", get(routes::openai::model))
        .route("/v1/run/stream", post(routes::stream::stream))
        .route("/v1/jobs", post(routes::jobs::submit))
        .route("/v1/jobs/{id}", get(routes::jobs::status).delete(routes::jobs::cancel))
        .route("/v1/jobs/{id}/image", get(routes::jobs::image))
        .merge(a1111_routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    let open = Router::new()
        .route("/", get(routes::playground::page))
        .route("/playground/app.js", get(routes::playground::script))
        .route("/playground/style.css", get(routes::playground::style))
        .route("/health", get(routes::health::health))
        .route("/ready", get(routes::health::ready))
        .route("/metrics", get(routes::health::metrics))
        .route("/openapi.json", get(routes::health::openapi))
        // the unguessable file name is the credential of an image answered by URL
        .route("/v1/images/files/{name}", get(routes::openai::file));
    let mut router =
        protected.merge(open).fallback(routes::not_found).method_not_allowed_fallback(routes::method_not_allowed);
    if let Some(cors) = origin::cors_layer(&state.config().cors_origins) {
        router = router.layer(cors);
    }
    router
        .layer(axum::middleware::from_fn_with_state(state.clone(), origin::guard))
        .layer(axum::middleware::from_fn(metrics::count_requests))
        .with_state(state)
}
