//! Settings of a running server.

use std::time::Duration;

/// What `sdxl serve` was started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bearer tokens accepted; empty runs the server open.
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
    /// Bytes of request bodies that may be in memory at once, over all connections.
    pub body_memory_budget: usize,
    /// Requests whose input images may be decoded at once.
    pub concurrent_decodes: usize,
    /// How long a client may take to send its request line and headers.
    pub header_read_timeout: Duration,
    /// The model's name in the parameters written into every PNG.
    pub model_name: String,
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
            body_read_timeout: Duration::from_secs(60),
            body_memory_budget: 512 * 1024 * 1024,
            concurrent_decodes: 2,
            header_read_timeout: Duration::from_secs(10),
            model_name: "sdxl".into(),
        }
    }
}
