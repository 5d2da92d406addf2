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
use sdxl_server::jobs::{
    Claimed, Clock, JobRecord, JobStore, NewJob, Outcome, QueueLimits, Release, Status, StoreError, StoreStats,
    StoredRequest, Submitted, SweepRules, Swept,
};
use sdxl_server::{app, AppState, ServerConfig};
use serde_json::{json, Value};

const SHORT_RUN: &str = "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning";

/// A server with an SQLite job store in `dir` and its runner.
async fn start_with_jobs(backend: impl Backend, dir: &std::path::Path) -> String {
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.join("jobs.db").display())).await.unwrap();
    serve_with_store(backend, store, Duration::from_secs(30)).await
}

/// A server over `store` with its runner (leases of `lease`); answers its address.
async fn serve_with_store(
    backend: impl Backend,
    store: std::sync::Arc<dyn sdxl_server::jobs::JobStore>,
    lease: Duration,
) -> String {
    serve_with(backend, store, RunnerConfig { lease, ..quick_runner() }, ServerConfig::default()).await
}

/// A runner that polls often.
fn quick_runner() -> RunnerConfig {
    RunnerConfig { poll: Duration::from_millis(20), ..RunnerConfig::default() }
}

/// A server with `server` settings over `store` with a runner of `config`.
async fn serve_with(
    backend: impl Backend,
    store: std::sync::Arc<dyn sdxl_server::jobs::JobStore>,
    config: RunnerConfig,
    server: ServerConfig,
) -> String {
    let queue = Queue::start(backend, QueueConfig::with_capacity(4));
    let state = AppState::with_jobs(queue, server, Some(store.clone()));
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

/// The SQLite store behind a switch that makes every call fail, as a database that stopped
/// answering.
struct Outage {
    store: std::sync::Arc<dyn JobStore>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Outage {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl JobStore for Outage {
    async fn submit(&self, job: &NewJob<'_>, now: Clock) -> Result<Submitted, StoreError> {
        self.check()?;
        self.store.submit(job, now).await
    }
    async fn store_done(
        &self,
        id: &str,
        owner: &str,
        request: &StoredRequest,
        image: Vec<u8>,
        now: Clock,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.store_done(id, owner, request, image, now).await
    }
    async fn sweep(&self, now: Clock, rules: SweepRules) -> Result<Swept, StoreError> {
        self.check()?;
        self.store.sweep(now, rules).await
    }
    async fn claim(&self, worker: &str, now: Clock, lease_ms: i64) -> Result<Option<Claimed>, StoreError> {
        self.check()?;
        self.store.claim(worker, now, lease_ms).await
    }
    async fn renew(
        &self,
        id: &str,
        worker: &str,
        now: Clock,
        lease_ms: i64,
        step: u64,
        total: u64,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.store.renew(id, worker, now, lease_ms, step, total).await
    }
    async fn release(&self, id: &str, worker: &str, now: Clock, why: Release) -> Result<bool, StoreError> {
        self.check()?;
        self.store.release(id, worker, now, why).await
    }
    async fn finish(&self, id: &str, worker: &str, now: Clock, outcome: Outcome) -> Result<bool, StoreError> {
        self.check()?;
        self.store.finish(id, worker, now, outcome).await
    }
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.check()?;
        self.store.get(id).await
    }
    async fn image(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        self.store.image(id).await
    }
    async fn delete(&self, id: &str, owner: &str, or_ownerless: bool) -> Result<Option<Status>, StoreError> {
        self.check()?;
        self.store.delete(id, owner, or_ownerless).await
    }
    async fn expire(&self, now: Clock, ttl_ms: i64) -> Result<u64, StoreError> {
        self.check()?;
        self.store.expire(now, ttl_ms).await
    }
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.check()?;
        self.store.stats().await
    }
}

/// A server over an [`Outage`] store with a 3 s lease; answers its address and the switch.
async fn start_with_outage(
    backend: impl Backend,
    dir: &std::path::Path,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let sqlite = sdxl_server::jobs::open(&format!("sqlite://{}", dir.join("jobs.db").display())).await.unwrap();
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = std::sync::Arc::new(Outage { store: sqlite, down: down.clone() });
    (serve_with_store(backend, store, Duration::from_secs(3)).await, down)
}

async fn ready_status(base: &str) -> StatusCode {
    reqwest::get(format!("{base}/ready")).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_a_503_and_not_ready_until_it_answers_again() {
    let dir = tempfile::tempdir().unwrap();
    let (base, down) = start_with_outage(SlowBackend::new(Duration::ZERO), dir.path()).await;
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let response = post(&base, "/v1/jobs", json!({"prompt": "x", "num_steps": 1, "width": 256, "height": 256})).await;
    assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("5".into()));
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, 3040).await;
    assert_eq!(ready_status(&base).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reqwest::get(format!("{base}/health")).await.unwrap().status(), StatusCode::OK);
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    // the runner's next claim finds the store answering again
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready_status(&base).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "still not ready after the store came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = post(&base, "/v1/jobs", json!({"prompt": "x", "num_steps": 1, "width": 256, "height": 256})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(await_job(&base, &id).await["status"], json!("done"));
}

// regression: one failed lease renewal dropped the ticket (the generation stopped and the job
// ran again), and a failed `finish` threw the finished image away
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_rides_out_a_store_outage_shorter_than_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SlowBackend::new(Duration::from_millis(100));
    let steps_run = backend.steps_run.clone();
    let (base, down) = start_with_outage(backend, dir.path()).await;
    let body = json!({"prompt": "x", "num_steps": 20, "width": 256, "height": 256});
    let id = post(&base, "/v1/jobs", body).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    while steps_run.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // down for 2 s of the 3 s lease, past the end of the generation (2 s of steps)
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let job = await_job(&base, &id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("done"), Some(1)), "{job}");
    assert_eq!(steps_run.load(std::sync::atomic::Ordering::SeqCst), 20, "the generation ran once, whole");
    let image = reqwest::get(format!("{base}/v1/jobs/{id}/image")).await.unwrap();
    assert_eq!(image.status(), StatusCode::OK);
}

fn small_job(seed: u64) -> Value {
    json!({"prompt": "x", "num_steps": 4, "width": 256, "height": 256, "seed": seed})
}

async fn submit_id(base: &str, body: Value) -> String {
    let response = post(base, "/v1/jobs", body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

// regression: a broken device turned the whole stored queue into failures while /ready
// stayed 200
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_server_fails_runs_again_then_fails_and_the_failing_server_stops_taking_work() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FailingBackend::default();
    let calls = backend.calls.clone();
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await.unwrap();
    let runner = RunnerConfig { lease: Duration::from_millis(300), max_attempts: 3, ..quick_runner() };
    let base = serve_with(backend, store, runner, ServerConfig::default()).await;
    assert_eq!(ready_status(&base).await, StatusCode::OK);
    let id = submit_id(&base, small_job(1)).await;
    let job = await_job(&base, &id).await;
    assert_eq!((job["status"].as_str(), job["attempts"].as_u64()), (Some("failed"), Some(3)), "{job}");
    assert_eq!(job["error"]["code"], json!(3030), "the last attempt's own error: {job}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3, "run once per attempt");
    // three faults in a row: not ready, and no more claims
    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], json!("failing"));
    let next = submit_id(&base, small_job(2)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next: Value = reqwest::get(format!("{base}/v1/jobs/{next}")).await.unwrap().json().await.unwrap();
    assert_eq!(next["status"], json!("queued"), "left for the rest of the fleet: {next}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stored_queue_is_bounded_in_all_and_per_key_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await.unwrap();
    let config = ServerConfig { max_queued_jobs: 2, max_queued_jobs_per_key: 2, ..ServerConfig::default() };
    let backend = SlowBackend::new(Duration::from_millis(50));
    let base = serve_with(backend, store, quick_runner(), config).await;
    let running = submit_id(&base, json!({"prompt": "x", "num_steps": 20, "width": 256, "height": 256})).await;
    while reqwest::get(format!("{base}/v1/jobs/{running}")).await.unwrap().json::<Value>().await.unwrap()["status"]
        != json!("running")
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let queued = [submit_id(&base, small_job(1)).await, submit_id(&base, small_job(2)).await];
    let refused = post(&base, "/v1/jobs", small_job(3)).await;
    assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string()), Some("10".into()));
    let message = expect_error(refused, StatusCode::TOO_MANY_REQUESTS, 3040).await;
    assert!(message.contains("2 queued jobs") && message.contains("--max-queued-jobs"), "{message}");
    for id in queued.iter().chain([&running]) {
        assert_eq!(await_job(&base, id).await["status"], json!("done"), "every accepted job completes");
    }
    assert_eq!(post(&base, "/v1/jobs", small_job(3)).await.status(), StatusCode::ACCEPTED, "room again");

    let dir = tempfile::tempdir().unwrap();
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await.unwrap();
    let config = ServerConfig { max_queued_jobs: 10, max_queued_jobs_per_key: 1, ..ServerConfig::default() };
    let busy = SlowBackend::new(Duration::from_secs(1));
    let base = serve_with(busy, store, quick_runner(), config).await;
    let first = submit_id(&base, small_job(1)).await;
    while reqwest::get(format!("{base}/v1/jobs/{first}")).await.unwrap().json::<Value>().await.unwrap()["status"]
        != json!("running")
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    submit_id(&base, small_job(2)).await;
    let message = expect_error(post(&base, "/v1/jobs", small_job(3)).await, StatusCode::TOO_MANY_REQUESTS, 3040).await;
    assert!(message.contains("of this API key") && message.contains("--max-queued-jobs-per-key"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_gives_one_job_and_another_body_under_it_is_a_409() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_with_jobs(SlowBackend::new(Duration::ZERO), dir.path()).await;
    let client = reqwest::Client::new();
    let send = |path: &str, key: &str, body: Value| {
        client.post(format!("{base}{path}")).header("idempotency-key", key).json(&body).send()
    };
    // no seed: the server draws one; the retry must not draw another
    let body = json!({"prompt": "a lighthouse", "num_steps": 2, "width": 256, "height": 256});
    let first: Value = send("/v1/jobs", "key-1", body.clone()).await.unwrap().json().await.unwrap();
    let again = send("/v1/jobs", "key-1", body.clone()).await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.unwrap();
    assert_eq!((&again["id"], &again["seed"]), (&first["id"], &first["seed"]), "the same job");
    let queued = format!("{SHORT_RUN}?queueRequest=true");
    let workers: Value = send(&queued, "key-1", body.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(workers["result"]["request_id"], first["id"], "the Workers AI route shares the keys");
    let other = send("/v1/jobs", "key-1", json!({"prompt": "a lighthouse at night"})).await.unwrap();
    let message = expect_error(other, StatusCode::CONFLICT, 3042).await;
    assert!(message.contains("Idempotency-Key"), "{message}");
    let fresh: Value = send("/v1/jobs", "key-2", body.clone()).await.unwrap().json().await.unwrap();
    assert_ne!(fresh["id"], first["id"]);
    let bad = send("/v1/jobs", &"k".repeat(256), body).await.unwrap();
    let message = expect_error(bad, StatusCode::BAD_REQUEST, 5006).await;
    assert!(message.contains("Idempotency-Key") && message.contains("255"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_job_body_is_bounded_below_the_synchronous_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await.unwrap();
    let config = ServerConfig { max_job_body: 4096, ..ServerConfig::default() };
    let base = serve_with(SlowBackend::new(Duration::ZERO), store, quick_runner(), config).await;
    let big = json!({"prompt": "x", "num_steps": 1, "width": 256, "height": 256, "image_b64": "A".repeat(8192)});
    let message = expect_error(post(&base, "/v1/jobs", big.clone()).await, StatusCode::PAYLOAD_TOO_LARGE, 3006).await;
    assert!(message.contains("4096 bytes") && message.contains("--max-job-body"), "{message}");
    let synchronous = post(&base, SHORT_RUN, big).await;
    assert_eq!(synchronous.status(), StatusCode::BAD_REQUEST, "the synchronous route reads it (a bad image)");
}

// regression: a claimed job still waiting in the model queue at SIGTERM was stored as a
// permanent failure (503 "shutting down") instead of going back to the queue
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_job_still_waiting_at_shutdown_goes_back_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await.unwrap();
    let queue = Queue::start(SlowBackend::new(Duration::from_millis(200)), QueueConfig::with_capacity(4));
    let state = AppState::with_jobs(queue, ServerConfig::default(), Some(store.clone()));
    tokio::spawn(runner::run(state.clone(), store.clone(), quick_runner()));
    // a synchronous generation keeps the model busy for 4 s
    let busy = sdxl_engine::GenerateRequest::parse(raw("sync", 20, 1), &sdxl_engine::Limits::SERVER).unwrap();
    let running = state.queue().submit(busy, Instant::now() + Duration::from_secs(60)).unwrap();
    let stored = StoredRequest::new(&raw("stored", 2, 2), 2);
    let job = NewJob { id: "waiting", owner: "o", request: &stored, idempotency: None, limits: QueueLimits::NONE };
    assert_eq!(store.submit(&job, Clock::Store).await.unwrap(), Submitted::Queued);
    // the runner yields 2 s to idle servers, then claims it behind the running generation
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get("waiting").await.unwrap().unwrap().status != Status::Running {
        assert!(Instant::now() < deadline, "never claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.start_draining();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let record = store.get("waiting").await.unwrap().unwrap();
        if record.status != Status::Running {
            assert_eq!((record.status, record.attempts, record.error), (Status::Queued, 0, None), "queued again");
            break;
        }
        assert!(Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(running);
}
