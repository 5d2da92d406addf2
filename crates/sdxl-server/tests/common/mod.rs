//! What the HTTP tests share: a server on an ephemeral port over the tiny model or a slow
//! fake backend, and the expected answers.
#![allow(dead_code)] // each test binary uses its own part

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use reqwest::StatusCode;
use sdxl_engine::queue::{Backend, PipelineBackend, Queue, QueueConfig, Step};
use sdxl_engine::{GenerateRequest, Limits, NoiseSource, RawRequest};
use sdxl_models::pixels::RgbImage;
use sdxl_server::{app, AppState, ServerConfig};
use serde_json::{json, Value};

pub const RUN: &str = "/client/v4/accounts/abc/ai/run/@cf/bytedance/stable-diffusion-xl-lightning";

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdxl-models/tests/fixtures")
}

pub async fn start(backend: impl Backend, capacity: usize, config: ServerConfig) -> (String, AppState) {
    let queue = Queue::start(backend, QueueConfig::with_capacity(capacity));
    let state = AppState::new(queue, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app(state.clone())).into_future());
    (format!("http://{address}"), state)
}

pub fn tiny_model() -> PipelineBackend {
    PipelineBackend(sdxl_engine::model::load(&fixtures().join("tiny-sdxl"), DType::F32, &Device::Cpu).unwrap())
}

/// Sleeps `step_time` per step, counting steps; returns a gray image of the asked size.
#[derive(Clone)]
pub struct SlowBackend {
    pub step_time: Duration,
    pub steps_run: Arc<AtomicUsize>,
}

impl SlowBackend {
    pub fn new(step_time: Duration) -> Self {
        Self { step_time, steps_run: Arc::new(AtomicUsize::new(0)) }
    }
}

impl Backend for SlowBackend {
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> sdxl_engine::Result<RgbImage> {
        for step in 1..=request.steps {
            std::thread::sleep(self.step_time);
            self.steps_run.fetch_add(1, Ordering::SeqCst);
            if on_step(&Step { done: step, total: request.steps, latents: None }).is_break() {
                return Err(sdxl_engine::Error::Cancelled);
            }
        }
        Ok(RgbImage {
            width: request.width,
            height: request.height,
            pixels: vec![128; 3 * request.width * request.height],
        })
    }
}

/// Fails every generation for the server's own reasons, as a broken device would; counts
/// the calls.
#[derive(Clone, Default)]
pub struct FailingBackend {
    pub calls: Arc<AtomicUsize>,
}

impl Backend for FailingBackend {
    fn generate(
        &mut self,
        _request: &GenerateRequest,
        _on_step: &mut dyn FnMut(&Step) -> ControlFlow<()>,
    ) -> sdxl_engine::Result<RgbImage> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(sdxl_engine::Error::Internal("the device is lost".into()))
    }
}

pub async fn post(base: &str, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap()
}

/// Asserts a Workers AI error envelope with `status` and `code`; returns the message.
pub async fn expect_error(response: reqwest::Response, status: StatusCode, code: u64) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], json!(false), "{body}");
    assert_eq!(body["result"], Value::Null);
    assert_eq!(body["messages"], json!([]));
    assert_eq!(body["errors"][0]["code"], json!(code), "{body}");
    body["errors"][0]["message"].as_str().unwrap().to_string()
}

pub fn png_to_rgb(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory(bytes).unwrap().to_rgb8()
}

/// What the engine (and so `sdxl generate`) produces for the same request.
pub fn engine_png(raw: RawRequest) -> Vec<u8> {
    let request = GenerateRequest::parse(raw, &Limits::SERVER).unwrap();
    let PipelineBackend(pipeline) = tiny_model();
    let image = sdxl_engine::generate::generate(&pipeline, &request, &mut |_| ControlFlow::Continue(())).unwrap();
    let parameters = sdxl_engine::png::parameters_text(&request, &ServerConfig::default().model_name);
    sdxl_engine::png::encode_with_parameters(&image, &parameters).unwrap()
}

pub fn raw(prompt: &str, steps: usize, seed: u64) -> RawRequest {
    RawRequest {
        prompt: prompt.into(),
        negative_prompt: None,
        width: Some(256),
        height: Some(256),
        steps,
        guidance: 0.0,
        noise: NoiseSource::Seed(seed),
        image: None,
        mask: None,
        strength: None,
        sampling: Default::default(),
    }
}
