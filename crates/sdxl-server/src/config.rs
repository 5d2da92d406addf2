//! Settings of a running server.

use std::path::PathBuf;
use std::time::Duration;

/// What `sdxl serve` was started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// API keys accepted (as bearer tokens or Basic passwords); empty runs the server open.
    pub api_keys: Vec<String>,
    /// `num_steps` when a request gives none (Workers AI: 20).
    pub default_steps: usize,
    /// `guidance` when a request gives none (Workers AI: 7.5).
    pub default_guidance: f64,
    /// Largest `width × height` accepted, if limited below 2048².
    pub max_pixels: Option<usize>,
    /// Queue wait plus generation, after which a request fails with 408.
    pub request_timeout: Duration,
    /// Largest request body; admits a 2048×2048 PNG sent as a JSON integer array.
    pub body_limit: usize,
    /// How long a client may take to send its body.
    pub body_read_timeout: Duration,
    /// Largest body of a job for the store (`POST /v1/jobs`, `?queueRequest=true`): it is kept
    /// until its TTL, so it is bounded well below `body_limit`.
    pub max_job_body: usize,
    /// Queued jobs in the store past which submissions get 429.
    pub max_queued_jobs: u64,
    /// Queued jobs of one API key past which its submissions get 429.
    pub max_queued_jobs_per_key: u64,
    /// Bytes of request bodies that may be in memory at once, over all connections.
    pub body_memory_budget: usize,
    /// Requests whose input images may be decoded at once.
    pub concurrent_decodes: usize,
    /// How long a client may take to send its request line and headers.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in flight, between requests.
    pub idle_timeout: Duration,
    /// How long a write to a client may make no progress before its connection is closed.
    pub write_timeout: Duration,
    /// Connections served at once; default [`crate::default_max_connections`], from the
    /// open-file limit. A few more get only the health checks.
    pub max_connections: usize,
    /// The model's name in the parameters written into every PNG, and in the model lists of
    /// the OpenAI and AUTOMATIC1111 APIs.
    pub model_name: String,
    /// The files the model was loaded from, for the AUTOMATIC1111 model lists.
    pub model_files: ModelFiles,
    /// The id `GET /v1/models` answers (default: `model_name`).
    pub model_id: Option<String>,
    /// The server's address as clients reach it (`https://images.example`), for the URLs of
    /// images answered by URL; default `http://` and the request's `Host`.
    pub public_url: Option<String>,
    /// Host names accepted in `Host` besides IP addresses and loopback names (`*`: any).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the API (CORS); the server's own is always allowed.
    pub cors_origins: Vec<String>,
}

/// Where the loaded model's parts came from.
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    /// The model (a diffusers directory or a checkpoint file).
    pub model: Option<PathBuf>,
    /// `--vae`, if it replaced the model's.
    pub vae: Option<PathBuf>,
    /// The LoRAs fused in.
    pub loras: Vec<PathBuf>,
}

impl ServerConfig {
    /// The model id of the OpenAI API.
    pub fn model_id(&self) -> &str {
        self.model_id.as_deref().unwrap_or(&self.model_name)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            default_steps: 20,
            default_guidance: 7.5,
            max_pixels: None,
            request_timeout: Duration::from_secs(300),
            body_limit: 128 * 1024 * 1024,
            max_job_body: 16 * 1024 * 1024,
            max_queued_jobs: 1000,
            max_queued_jobs_per_key: 1000,
            body_read_timeout: Duration::from_secs(60),
            body_memory_budget: 512 * 1024 * 1024,
            concurrent_decodes: 2,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: crate::default_max_connections(),
            model_name: "sdxl".into(),
            model_files: ModelFiles::default(),
            model_id: None,
            public_url: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
        }
    }
}
