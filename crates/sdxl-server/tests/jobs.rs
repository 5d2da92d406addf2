//! The asynchronous job routes over real HTTP, on an SQLite store with the runner beside the
//! server (as `sdxl serve` runs them). Restarts, several servers on PostgreSQL and killed
//! workers are tested with whole processes in `jobs_tests/`.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use sdxl_engine::queue::{Backend, Queue, QueueConfig};
use sdxl_server::jobs::runner::{self, RunnerConfig};
use sdxl_server::{app, AppState, ServerConfig};
use serde_json::{json, Value};

const SHORT_RUN: &str = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning";

/// A server with an SQLite job store in `dir` and its runner.
async fn start_with_jobs(backend: impl Backend, dir: &std::path::Path) -> String {
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.join("jobs.db").display())).await.unwrap();
    let queue = Queue::start(backend, QueueConfig::with_capacity(4));
    let state = AppState::with_jobs(queue, ServerConfig::default(), Some(store.clone()));
    let config = RunnerConfig {
        worker: "test".into(),
        lease: Duration::from_secs(30),
        ttl: Duration::from_secs(3600),
        poll: Duration::from_millis(20),
    };
    tokio::spawn(runner::run(state.clone(), store, config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app(state)).into_future());
    format!("http://{address}")
}

/// Polls the job until `status` is final; answers its record.
async fn await_job(base: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record: Value = reqwest::get(format!("{base}/v1/jobs/{id}")).await.unwrap().json().await.unwrap();
        if ["done", "failed"].contains(&record["status"].as_str().unwrap()) {
            return record;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_gives_the_run_routes_png_by_either_api() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_with_jobs(tiny_model(), dir.path()).await;
    let body = json!({"prompt": "a cat", "width": 256, "height": 256, "num_steps": 2, "guidance": 0, "seed": 9});
    let sync = post(&base, RUN, body.clone()).await.bytes().await.unwrap();

    let submitted = post(&base, "/v1/jobs", body.clone()).await;
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    let record: Value = submitted.json().await.unwrap();
    let id = record["id"].as_str().unwrap().to_string();
    assert_eq!((record["status"].as_str(), record["seed"].as_str()), (Some("queued"), Some("9")));
    let done = await_job(&base, &id).await;
    assert_eq!(
        (done["status"].as_str(), done["step"].as_u64(), done["attempts"].as_u64()),
        (Some("done"), Some(2), Some(1))
    );
    let image = reqwest::get(format!("{base}/v1/jobs/{id}/image")).await.unwrap();
    assert_eq!(image.headers()["x-seed"], "9");
    assert_eq!(image.bytes().await.unwrap(), sync, "the job's PNG is the run route's");

    // Workers AI: ?queueRequest=true, then poll with {"request_id"}
    let queued: Value = post(&base, &format!("{SHORT_RUN}?queueRequest=true"), body).await.json().await.unwrap();
    assert_eq!((queued["success"].as_bool(), queued["result"]["status"].as_str()), (Some(true), Some("queued")));
    let request_id = queued["result"]["request_id"].as_str().unwrap().to_string();
    await_job(&base, &request_id).await;
    let polled = post(&base, SHORT_RUN, json!({ "request_id": request_id })).await;
    assert_eq!(polled.headers()["content-type"], "image/png");
    assert_eq!(polled.bytes().await.unwrap(), sync);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_unknown_and_deleted_jobs_answer_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_with_jobs(SlowBackend::new(Duration::from_millis(50)), dir.path()).await;
    let long = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 20});
    let first: Value = post(&base, "/v1/jobs", long.clone()).await.json().await.unwrap();
    let second: Value = post(&base, "/v1/jobs", long).await.json().await.unwrap();
    let (first, second) = (first["id"].as_str().unwrap(), second["id"].as_str().unwrap());
    let not_ready = reqwest::get(format!("{base}/v1/jobs/{second}/image")).await.unwrap();
    expect_error(not_ready, StatusCode::CONFLICT, 3041).await;
    let poll = post(&base, SHORT_RUN, json!({ "request_id": second })).await.json::<Value>().await.unwrap();
    assert!(["queued", "running"].contains(&poll["result"]["status"].as_str().unwrap()), "{poll}");

    let client = reqwest::Client::new();
    // the queued one, then the running one (which then stops: the queue serves the next job)
    for id in [second, first] {
        let cancelled: Value =
            client.delete(format!("{base}/v1/jobs/{id}")).send().await.unwrap().json().await.unwrap();
        assert_eq!(cancelled["status"], "cancelled");
        let gone = reqwest::get(format!("{base}/v1/jobs/{id}")).await.unwrap();
        expect_error(gone, StatusCode::NOT_FOUND, 7003).await;
    }
    let quick = json!({"prompt": "y", "width": 256, "height": 256, "num_steps": 1});
    let quick: Value = post(&base, "/v1/jobs", quick).await.json().await.unwrap();
    let quick = quick["id"].as_str().unwrap();
    assert_eq!(await_job(&base, quick).await["status"], "done", "the cancelled job freed the worker");
    let deleted: Value = client.delete(format!("{base}/v1/jobs/{quick}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(deleted["status"], "deleted");
    for gone in [format!("{base}/v1/jobs/{quick}"), format!("{base}/v1/jobs/nonexistent/image")] {
        expect_error(reqwest::get(gone).await.unwrap(), StatusCode::NOT_FOUND, 7003).await;
    }
    let bad_mode = post(&base, &format!("{SHORT_RUN}?queueRequest=null"), json!({"prompt": "x"})).await;
    let message = expect_error(bad_mode, StatusCode::BAD_REQUEST, 5006).await;
    assert!(message.contains("queueRequest"), "{message}");
    let invalid = post(&base, "/v1/jobs", json!({"prompt": "x", "num_steps": 50})).await;
    let message = expect_error(invalid, StatusCode::BAD_REQUEST, 5006).await;
    assert!(message.contains("num_steps"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_the_job_routes_do_not_exist() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, ServerConfig::default()).await;
    let response = post(&base, "/v1/jobs", json!({"prompt": "x"})).await;
    expect_error(response, StatusCode::NOT_FOUND, 7003).await;
}
