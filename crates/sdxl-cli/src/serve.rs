//! `sdxl serve`: load the model, start the worker, serve HTTP until SIGTERM or ctrl-c.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::hub::DownloadOptions;
use anyhow::Context;
use clap::Args;
use sdxl_engine::queue::{PipelineBackend, Queue, QueueConfig};
use sdxl_server::config::ModelFiles;
use sdxl_server::jobs::runner::{self, RunnerConfig};
use sdxl_server::{app, AppState, ServerConfig};
use tokio::sync::Notify;

use crate::defaults;
use crate::model_args::ModelArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model: a directory in the diffusers layout or a single-file checkpoint. Without it,
    /// SDXL-Lightning from the Hugging Face cache, downloaded there first if missing (see
    /// `sdxl download`).
    #[arg(long, env = "SDXL_MODEL")]
    model: Option<PathBuf>,
    /// The Lightning UNet (1, 2, 4 or 8 steps) to use when `--model` is absent.
    #[arg(
        long,
        env = "SDXL_LIGHTNING_STEPS",
        value_name = "N",
        default_value_t = 4,
        value_parser = crate::download::lightning_steps
    )]
    lightning_steps: u8,
    /// Address to listen on.
    #[arg(long, env = "SDXL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the start-up line says which).
    #[arg(long, env = "SDXL_PORT", default_value_t = 8080)]
    port: u16,
    /// Accepted API key, sent as `Authorization: Bearer KEY` or as the password of HTTP Basic
    /// auth; repeat for several (SDXL_API_KEYS: comma-separated). Each key's stored jobs are
    /// its own. None: open.
    #[arg(long = "api-key", env = "SDXL_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    api_keys: Vec<String>,
    /// Requests that may wait while one runs; more are refused with 429.
    #[arg(long, env = "SDXL_QUEUE_CAPACITY", default_value_t = 8)]
    queue_capacity: usize,
    /// Requests one API key may have waiting; more get 429 while other keys are still
    /// admitted. Default: half the queue capacity, at least 1. (An open server has one client.)
    #[arg(long, env = "SDXL_QUEUE_PER_KEY", value_name = "N")]
    queue_per_key: Option<usize>,
    /// A host name (with or without port) this server answers for besides IP addresses,
    /// `localhost` and the listen address; repeat for several, `*` for any. Other `Host`s get
    /// 421, so a web page cannot reach the server by rebinding its DNS name.
    #[arg(long = "allowed-host", env = "SDXL_ALLOWED_HOSTS", value_delimiter = ',', value_name = "HOST")]
    allowed_hosts: Vec<String>,
    /// A browser origin (`https://app.example`) allowed to call the API, with CORS; repeat for
    /// several. Other origins' requests that change state get 403; the playground (the
    /// server's own origin) always works.
    #[arg(long = "cors-origin", env = "SDXL_CORS_ORIGINS", value_delimiter = ',', value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Seconds a request may spend waiting plus generating before it fails with 408 (long
    /// work belongs on /v1/jobs). Default: 300 on a GPU; on the CPU twice the time of a
    /// default request at 1024² on 2 cores (440 s for 4 steps), at least 300.
    #[arg(long, env = "SDXL_REQUEST_TIMEOUT", value_name = "SECONDS")]
    request_timeout: Option<u64>,
    /// `num_steps` for requests that give none (1-20). Default: N for a Lightning N-step
    /// model (ByteDance's file names: the UNet, checkpoint or a LoRA), else 20.
    #[arg(long, env = "SDXL_DEFAULT_STEPS", value_name = "N")]
    default_steps: Option<usize>,
    /// `guidance` for requests that give none (0-30). Default: 0 for a Lightning model, else 7.5.
    #[arg(long, env = "SDXL_DEFAULT_GUIDANCE", value_name = "SCALE")]
    default_guidance: Option<f64>,
    /// The model id `GET /v1/models` lists (default: the model's name, as in the PNGs).
    #[arg(long, env = "SDXL_MODEL_ID")]
    model_id: Option<String>,
    /// This server's address as clients reach it (`https://images.example`), for the links of
    /// images answered with `response_format: "url"`. Default: `http://` + the request's Host.
    #[arg(long, env = "SDXL_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// Largest width × height accepted.
    #[arg(long, env = "SDXL_MAX_PIXELS")]
    max_pixels: Option<usize>,
    #[command(flatten)]
    model_args: ModelArgs,
    /// Seconds in-flight work may take to finish after SIGTERM / ctrl-c.
    #[arg(long, env = "SDXL_SHUTDOWN_GRACE", default_value_t = 30)]
    shutdown_grace: u64,
    /// Seconds a client may take to send its request line and headers.
    #[arg(long, env = "SDXL_HEADER_READ_TIMEOUT", default_value_t = 10)]
    header_read_timeout: u64,
    /// Seconds a client may take to send its request body.
    #[arg(long, env = "SDXL_BODY_READ_TIMEOUT", default_value_t = 60)]
    body_read_timeout: u64,
    /// Seconds a connection may stay open with no request in flight (between keep-alive
    /// requests, HTTP/1 and HTTP/2).
    #[arg(long, env = "SDXL_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,
    /// Seconds a response may wait on a client that reads nothing before the connection is
    /// closed (a progress stream's job is cancelled with it).
    #[arg(long, env = "SDXL_WRITE_TIMEOUT", default_value_t = 30)]
    write_timeout: u64,
    /// Connections served at once. Default: the soft open-file limit (`ulimit -n`) less
    /// max(64, limit/8), at least 8. Beyond it 16 more are each served one `/health`,
    /// `/ready` or `/metrics` request within 2 s (others get 503); more are closed at once.
    #[arg(long, env = "SDXL_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// Where the server keeps its files (the default job store, `jobs.db`); default
    /// $XDG_DATA_HOME/sdxl, else ~/.local/share/sdxl.
    #[arg(long, env = "SDXL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The durable job store for the asynchronous routes: sqlite://PATH, or postgres://… for
    /// servers that share one queue. Default: sqlite://DATA_DIR/jobs.db.
    #[arg(long, env = "SDXL_JOBS", hide_env_values = true)]
    jobs: Option<String>,
    /// Seconds a claimed job stays this server's without renewal; a job whose server died is
    /// run again after it.
    #[arg(long, env = "SDXL_JOB_LEASE", default_value_t = 30)]
    job_lease: u64,
    /// Claims after which a stored job whose server stops while running it (a crash, OOM,
    /// SIGKILL) is failed instead of run again.
    #[arg(long, env = "SDXL_JOB_MAX_ATTEMPTS", default_value_t = 3, value_name = "N")]
    job_max_attempts: u32,
    /// Seconds a stored job may wait unclaimed before it is failed (code 3032).
    #[arg(long, env = "SDXL_JOB_MAX_QUEUED_AGE", default_value_t = 86_400, value_name = "S")]
    job_max_queued_age: u64,
    /// Queued jobs in the store past which POST /v1/jobs answers 429 with Retry-After.
    #[arg(long, env = "SDXL_MAX_QUEUED_JOBS", default_value_t = 1000, value_name = "N")]
    max_queued_jobs: u64,
    /// Queued jobs of one API key past which its POSTs get 429. Default: --max-queued-jobs
    /// divided among the API keys (all of it with one key or none).
    #[arg(long, env = "SDXL_MAX_QUEUED_JOBS_PER_KEY", value_name = "N")]
    max_queued_jobs_per_key: Option<u64>,
    /// Largest body of a stored job, in bytes (input images included, as sent); it is kept
    /// until the job expires.
    #[arg(long, env = "SDXL_MAX_JOB_BODY", default_value_t = 16 * 1024 * 1024, value_name = "BYTES")]
    max_job_body: usize,
    /// Seconds finished jobs and their images are kept.
    #[arg(long, env = "SDXL_JOB_TTL", default_value_t = 86_400)]
    job_ttl: u64,
    /// Serve a model stand-in whose every step sleeps this many milliseconds, and load no
    /// model (load and fault tests; builds with the `test-backend` feature only).
    #[cfg(feature = "test-backend")]
    #[arg(long, value_name = "MS")]
    test_backend_step_ms: Option<u64>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::init_logging("info");
    if let Some(steps) = args.default_steps.filter(|s| !(1..=20).contains(s)) {
        anyhow::bail!("`--default-steps` must be between 1 and 20, got {steps}");
    }
    if let Some(guidance) = args.default_guidance.filter(|g| !g.is_finite() || !(0.0..=30.0).contains(g)) {
        anyhow::bail!("`--default-guidance` must be between 0 and 30, got {guidance}");
    }
    let queue_per_key = args.queue_per_key.unwrap_or((args.queue_capacity / 2).max(1));
    if queue_per_key == 0 {
        anyhow::bail!("`--queue-per-key` must be at least 1, got 0");
    }
    let queue_config = QueueConfig { capacity: args.queue_capacity, owner_share: queue_per_key };
    let mut allowed_hosts = args.allowed_hosts.clone();
    allowed_hosts.push(args.host.clone());
    let Loaded { queue, model, model_name, model_files, lightning, on_gpu } = start_queue(&args, queue_config)?;
    let (default_steps, default_guidance) =
        defaults::steps_and_guidance((args.default_steps, args.default_guidance), lightning);
    let request_timeout =
        args.request_timeout.map_or_else(|| defaults::request_timeout(default_steps, on_gpu), Duration::from_secs);
    tracing::info!(
        lightning_steps = lightning,
        default_steps,
        default_guidance,
        request_timeout_s = request_timeout.as_secs(),
        "request defaults"
    );
    let config = ServerConfig {
        api_keys: args.api_keys.clone(),
        default_steps,
        default_guidance,
        max_pixels: args.max_pixels,
        request_timeout,
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        body_read_timeout: Duration::from_secs(args.body_read_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        write_timeout: Duration::from_secs(args.write_timeout),
        max_connections: args.max_connections.unwrap_or_else(sdxl_server::default_max_connections),
        model_name,
        model_files,
        model_id: args.model_id.clone(),
        public_url: args.public_url.clone(),
        allowed_hosts,
        cors_origins: args.cors_origins.clone(),
        max_job_body: args.max_job_body,
        max_queued_jobs: args.max_queued_jobs,
        max_queued_jobs_per_key: args
            .max_queued_jobs_per_key
            .unwrap_or_else(|| args.max_queued_jobs.div_ceil(args.api_keys.len().max(1) as u64)),
        ..ServerConfig::default()
    };
    for (flag, value) in [
        ("--max-queued-jobs", args.max_queued_jobs),
        ("--max-queued-jobs-per-key", args.max_queued_jobs_per_key.unwrap_or(1)),
        ("--max-job-body", args.max_job_body as u64),
        ("--job-max-queued-age", args.job_max_queued_age),
        ("--idle-timeout", args.idle_timeout),
        ("--write-timeout", args.write_timeout),
        ("--max-connections", args.max_connections.map_or(1, |n| n as u64)),
    ] {
        if value == 0 {
            anyhow::bail!("`{flag}` must be at least 1, got 0");
        }
    }
    if args.job_max_attempts == 0 {
        anyhow::bail!("`--job-max-attempts` must be at least 1, got 0");
    }
    if args.job_lease < 3 {
        anyhow::bail!("`--job-lease` must be at least 3 seconds, got {}", args.job_lease);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let jobs_url = match &args.jobs {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", data_dir(args.data_dir.as_deref())?.join("jobs.db").display()),
    };
    let store = runtime.block_on(sdxl_server::jobs::open(&jobs_url))?;
    let state = AppState::with_jobs(queue, config, Some(store.clone()));
    let runner = RunnerConfig {
        lease: Duration::from_secs(args.job_lease),
        ttl: Duration::from_secs(args.job_ttl),
        max_attempts: args.job_max_attempts,
        max_queued_age: Duration::from_secs(args.job_max_queued_age),
        ..RunnerConfig::default()
    };
    tracing::info!(store = %redact(&jobs_url), worker = %runner.worker, "job store open");
    let runner = runtime.spawn(runner::run(state.clone(), store, runner));
    runtime.block_on(serve(args, model, state, runner))
}

/// `--data-dir`, else $XDG_DATA_HOME/sdxl, else ~/.local/share/sdxl.
fn data_dir(flag: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir.to_path_buf());
    }
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(data) = non_empty("XDG_DATA_HOME") {
        return Ok(data.join("sdxl"));
    }
    match non_empty("HOME") {
        Some(home) => Ok(home.join(".local/share/sdxl")),
        None => anyhow::bail!("no data directory: set --data-dir (or SDXL_DATA_DIR, XDG_DATA_HOME or HOME)"),
    }
}

/// A database URL without its password, for the log.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A started worker and what the defaults depend on.
struct Loaded {
    queue: Queue,
    /// The model's path, for the log.
    model: PathBuf,
    /// Its name for the PNG parameters and the model lists.
    model_name: String,
    model_files: ModelFiles,
    /// The steps of a Lightning distillation, if the files loaded are one.
    lightning: Option<usize>,
    on_gpu: bool,
}

/// Loads the model (downloading SDXL-Lightning first without `--model`) and starts its
/// worker.
fn start_queue(args: &ServeArgs, config: QueueConfig) -> anyhow::Result<Loaded> {
    #[cfg(feature = "test-backend")]
    if let Some(ms) = args.test_backend_step_ms {
        let backend = sdxl_engine::test_backend::DelayBackend { step: Duration::from_millis(ms) };
        let model = PathBuf::from(format!("test backend, {ms} ms per step"));
        let queue = Queue::start(backend, config);
        let model_name = "test-backend".into();
        let model_files = ModelFiles::default();
        return Ok(Loaded { queue, model, model_name, model_files, lightning: None, on_gpu: false });
    }
    let (model, downloaded_unet) = match &args.model {
        Some(path) => (path.clone(), None),
        None => {
            let options =
                DownloadOptions { lightning_steps: args.lightning_steps, progress: true, ..Default::default() };
            let found = crate::hub::ensure_model(&options)?;
            (found.dir, Some(found.unet))
        }
    };
    let mut overrides = args.model_args.overrides();
    overrides.unet = overrides.unet.or(downloaded_unet);
    let model_name = crate::model_args::model_name(&model, overrides.unet.as_deref());
    let weights = overrides.unet.iter().chain([&model]).chain(overrides.loras.iter().map(|l| &l.path));
    let lightning = defaults::lightning_steps_of(weights.map(PathBuf::as_path));
    let pipeline = args.model_args.load_with(&model, &overrides)?;
    let device = pipeline.device();
    let on_gpu = !device.is_cpu();
    tracing::info!(
        device = sdxl_engine::model::device_name(device),
        dtype = ?args.model_args.dtype_on(device),
        "model loaded"
    );
    let queue = Queue::start(PipelineBackend(pipeline), config);
    let model_files = ModelFiles {
        model: Some(overrides.unet.clone().unwrap_or_else(|| model.clone())),
        vae: overrides.vae.clone(),
        loras: overrides.loras.iter().map(|l| l.path.clone()).collect(),
    };
    Ok(Loaded { queue, model, model_name, model_files, lightning, on_gpu })
}

/// Serves until a signal, then drains: the HTTP server finishes its requests and the job
/// runner its stored job, within the grace period.
async fn serve(
    args: ServeArgs,
    model: PathBuf,
    state: AppState,
    runner: tokio::task::JoinHandle<()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let address: SocketAddr = listener.local_addr()?;
    tracing::info!(
        %address,
        model = %model.display(),
        auth = if state.auth_enabled() { "on" } else { "off" },
        "sdxl listening on http://{address}"
    );
    if !state.auth_enabled() {
        tracing::warn!("no API keys configured: anyone who can reach this address can generate images");
    }
    let signalled = Arc::new(Notify::new());
    let shutdown = {
        let (state, signalled) = (state.clone(), signalled.clone());
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: refusing new work, finishing what is in flight");
            state.start_draining();
            signalled.notify_one();
        }
    };
    let limits = sdxl_server::ConnectionLimits::from(state.config());
    let server = async {
        sdxl_server::serve(listener, app(state), limits, shutdown).await?;
        // the runner stops once draining, after storing the result of the job it runs
        runner.await.context("the job runner failed")?;
        anyhow::Ok(())
    };
    let grace = Duration::from_secs(args.shutdown_grace);
    tokio::select! {
        result = server => result?,
        _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over; exiting with work in flight");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = terminate => {} }
}
