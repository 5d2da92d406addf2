//! A server shared by several API keys and reachable from browsers: each key's jobs are its
//! own by every route, one key cannot take the whole queue, stored jobs are not starved by
//! synchronous traffic, small requests pass beside trickling uploads, and web pages of other
//! origins (or rebound DNS names) get nothing.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use reqwest::StatusCode;
use sdxl_engine::queue::{Backend, Queue, QueueConfig};
use sdxl_server::jobs::runner::{self, RunnerConfig};
use sdxl_server::{app, AppState, ServerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "alice-key";
const BOB: &str = "bob-key";

/// A server with keys for Alice and Bob, a queue of `capacity` with `share` per key, and an
/// SQLite job store in `dir` with its runner.
async fn start_shared(backend: impl Backend, capacity: usize, share: usize, dir: &std::path::Path) -> String {
    let store = sdxl_server::jobs::open(&format!("sqlite://{}", dir.join("jobs.db").display())).await.unwrap();
    let queue = Queue::start(backend, QueueConfig { capacity, owner_share: share });
    let config = ServerConfig { api_keys: vec![ALICE.into(), BOB.into()], ..ServerConfig::default() };
    let state = AppState::with_jobs(queue, config, Some(store.clone()));
    let runner_config = RunnerConfig { poll: Duration::from_millis(20), ..RunnerConfig::default() };
    tokio::spawn(runner::run(state.clone(), store, runner_config));
    serve(state).await
}

async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, app(state)).into_future());
    format!("http://{address}")
}

fn basic(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("webui:{key}")))
}

fn small(seed: u64) -> Value {
    json!({"prompt": "a cat", "width": 256, "height": 256, "num_steps": 1, "guidance": 0, "seed": seed})
}

async fn await_done(client: &reqwest::Client, base: &str, id: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let record: Value =
            client.get(format!("{base}/v1/jobs/{id}")).bearer_auth(key).send().await.unwrap().json().await.unwrap();
        if record["status"] == "done" {
            return;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {record}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_cannot_see_each_others_jobs_by_any_route() {
    let dir = tempfile::tempdir().unwrap();
    let base = start_shared(SlowBackend::new(Duration::ZERO), 4, 2, dir.path()).await;
    let client = reqwest::Client::new();
    let submitted = client.post(format!("{base}/v1/jobs")).bearer_auth(ALICE).json(&small(1)).send().await.unwrap();
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    let id = submitted.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "128 bits in hex");
    await_done(&client, &base, &id, ALICE).await;

    // every way Bob could reach Alice's job answers as for an id that does not exist
    let unknown = "0123456789abcdef0123456789abcdef";
    for job in [id.as_str(), unknown] {
        let get = client.get(format!("{base}/v1/jobs/{job}")).bearer_auth(BOB).send().await.unwrap();
        let message = expect_error(get, StatusCode::NOT_FOUND, 7003).await;
        assert!(message.contains(job), "{message}");
        let image = client.get(format!("{base}/v1/jobs/{job}/image")).header("authorization", basic(BOB));
        expect_error(image.send().await.unwrap(), StatusCode::NOT_FOUND, 7003).await;
        let poll = client.post(format!("{base}{RUN}")).bearer_auth(BOB).json(&json!({ "request_id": job }));
        expect_error(poll.send().await.unwrap(), StatusCode::NOT_FOUND, 7003).await;
        let delete = client.delete(format!("{base}/v1/jobs/{job}")).bearer_auth(BOB).send().await.unwrap();
        expect_error(delete, StatusCode::NOT_FOUND, 7003).await;
    }
    // and the job is still Alice's, by Bearer or by Basic auth
    let image = client.get(format!("{base}/v1/jobs/{id}/image")).header("authorization", basic(ALICE));
    let image = image.send().await.unwrap();
    assert_eq!(image.status(), StatusCode::OK);
    assert_eq!(image.headers()["content-type"], "image/png");
    let poll = client.post(format!("{base}{RUN}")).header("authorization", format!("bearer {ALICE}"));
    let poll = poll.json(&json!({ "request_id": id })).send().await.unwrap();
    assert_eq!(poll.status(), StatusCode::OK, "the scheme is case-insensitive");
    let deleted = client.delete(format!("{base}/v1/jobs/{id}")).bearer_auth(ALICE).send().await.unwrap();
    assert_eq!(deleted.json::<Value>().await.unwrap()["status"], "deleted");
    // no key, or a wrong one: 401 before anything else
    let anonymous = client.get(format!("{base}/v1/jobs/{unknown}")).send().await.unwrap();
    expect_error(anonymous, StatusCode::UNAUTHORIZED, 10000).await;
    let wrong = client.get(format!("{base}/v1/jobs/{unknown}")).header("authorization", basic("alice-ke"));
    expect_error(wrong.send().await.unwrap(), StatusCode::UNAUTHORIZED, 10000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_flooding_the_queue_leaves_room_for_another() {
    let dir = tempfile::tempdir().unwrap();
    // slow enough that none finishes while a burst of requests arrives
    let backend = SlowBackend::new(Duration::from_millis(300));
    let base = start_shared(backend, 4, 2, dir.path()).await;
    let client = reqwest::Client::new();
    let send = |key: &'static str, seed: u64| {
        let request =
            client.post(format!("{base}{RUN}")).bearer_auth(key).json(&small(seed)).timeout(Duration::from_secs(60));
        tokio::spawn(request.send())
    };
    // Alice sends 9 at once: one runs, two wait (her share), the rest are refused at once
    let alice: Vec<_> = (0..9).map(|i| send(ALICE, i)).collect();
    let mut refused = 0;
    let mut flood = Vec::new();
    for request in alice {
        flood.push(request.await.unwrap().unwrap());
    }
    for response in flood {
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(response.headers()["retry-after"], "5");
            let message = expect_error(response, StatusCode::TOO_MANY_REQUESTS, 3040).await;
            assert!(message.contains("share"), "{message}");
            refused += 1;
        } else {
            assert_eq!(response.status(), StatusCode::OK);
        }
    }
    assert_eq!(refused, 6, "one runs and two wait");
    // (all of Alice's are answered now; her share is free again) flood once more, then Bob
    let again: Vec<_> = (0..9).map(|i| send(ALICE, 100 + i)).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bob = client.post(format!("{base}{RUN}")).bearer_auth(BOB).json(&small(7)).send().await.unwrap();
    assert_eq!(bob.status(), StatusCode::OK, "Bob is admitted beside Alice's flood");
    for request in again {
        request.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_jobs_are_not_starved_by_synchronous_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SlowBackend::new(Duration::from_millis(150));
    let base = start_shared(backend, 4, 4, dir.path()).await;
    let client = reqwest::Client::new();
    // three synchronous clients that each send again the moment they are answered: the
    // queue is never idle while the test runs
    let busy: Vec<_> = (0..3)
        .map(|i| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                loop {
                    let _ = client.post(format!("{base}{RUN}")).bearer_auth(BOB).json(&small(i)).send().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let submitted = client.post(format!("{base}/v1/jobs")).bearer_auth(ALICE).json(&small(5)).send().await.unwrap();
    let id = submitted.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    // the runner yields 2 s to idle servers, then runs the job next: well within 10 s
    let started = Instant::now();
    await_done(&client, &base, &id, ALICE).await;
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    for client in busy {
        client.abort();
    }
}

/// Sends `head` and then `body` bytes one at a time every `gap`, on a raw socket; never ends.
async fn trickle(address: String, head: String, gap: Duration) {
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    socket.write_all(head.as_bytes()).await.unwrap();
    loop {
        if socket.write_all(b"1\r\nx\r\n").await.is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_request_is_served_at_once_while_two_uploads_trickle() {
    // the default body budget (512 MiB) and limit (128 MiB): each undeclared upload used to
    // reserve 2 x 128 MiB up front, so two of them took the whole budget
    let (base, _state) = start(SlowBackend::new(Duration::ZERO), 4, ServerConfig::default()).await;
    let address = base.trim_start_matches("http://").to_string();
    let head = "POST /ai/run/@cf/bytedance/stable-diffusion-xl-lightning HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n";
    let uploads: Vec<_> =
        (0..2).map(|_| tokio::spawn(trickle(address.clone(), head.to_string(), Duration::from_millis(100)))).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let response = post(&base, RUN, small(3)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    for upload in uploads {
        upload.abort();
    }
}

#[tokio::test]
async fn browsers_of_other_origins_and_rebound_hosts_get_nothing() {
    let config = ServerConfig { cors_origins: vec!["https://app.example".into()], ..ServerConfig::default() };
    let (base, _state) = start(SlowBackend::new(Duration::ZERO), 4, config).await;
    let port = base.rsplit(':').next().unwrap().to_string();
    let client = reqwest::Client::new();
    let run = format!("{base}{RUN}");
    // a cross-site page's simple POST (text/plain: no preflight)
    let cross = client.post(&run).header("origin", "http://evil.example").header("content-type", "text/plain");
    let cross = cross.body(small(1).to_string()).send().await.unwrap();
    let message = expect_error(cross, StatusCode::FORBIDDEN, 10403).await;
    assert!(message.contains("evil.example"), "{message}");
    // the server's own page, with a JSON body declared as text
    let own = format!("http://127.0.0.1:{port}");
    let labelled = client.post(&run).header("origin", &own).header("content-type", "text/plain");
    let labelled = labelled.body(small(1).to_string()).send().await.unwrap();
    expect_error(labelled, StatusCode::UNSUPPORTED_MEDIA_TYPE, 10415).await;
    // DNS rebinding: the attacker's name, now pointing here, in Host
    let rebound = client.get(format!("{base}/v1/jobs/x")).header("host", format!("rebind.attacker.example:{port}"));
    expect_error(rebound.send().await.unwrap(), StatusCode::MISDIRECTED_REQUEST, 10421).await;
    let rebound_post = client.post(&run).header("host", "rebind.attacker.example").json(&small(1));
    expect_error(rebound_post.send().await.unwrap(), StatusCode::MISDIRECTED_REQUEST, 10421).await;
    // the OpenAI route refuses in OpenAI's shape
    let openai = client.post(format!("{base}/v1/images/generations")).header("origin", "http://evil.example");
    let openai = openai.json(&json!({"prompt": "x"})).send().await.unwrap();
    assert_eq!(openai.status(), StatusCode::FORBIDDEN);
    assert_eq!(openai.json::<Value>().await.unwrap()["error"]["code"], 10403);

    // what works: curl and the SDKs (no Origin), the playground (its own origin), localhost
    assert_eq!(post(&base, RUN, small(1)).await.status(), StatusCode::OK);
    let playground = client.post(&run).header("origin", &own).json(&small(1)).send().await.unwrap();
    assert_eq!(playground.status(), StatusCode::OK);
    let local = client.post(&run).header("host", format!("localhost:{port}")).json(&small(1)).send().await.unwrap();
    assert_eq!(local.status(), StatusCode::OK);

    // an allowed origin: preflight and answers carry CORS headers for it alone
    let preflight = client
        .request(reqwest::Method::OPTIONS, &run)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "https://app.example");
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap().to_string();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    let answer = client.post(&run).header("origin", "https://app.example").json(&small(1)).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["access-control-allow-origin"], "https://app.example");
    let exposed = answer.headers()["access-control-expose-headers"].to_str().unwrap().to_string();
    assert!(exposed.contains("x-seed"), "{exposed}");
    let other = client
        .request(reqwest::Method::OPTIONS, &run)
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_playground_is_served_with_a_strict_content_security_policy() {
    let (base, _state) = start(SlowBackend::new(Duration::ZERO), 4, ServerConfig::default()).await;
    for path in ["/", "/playground/app.js", "/playground/style.css"] {
        let response = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
    }
    let page = reqwest::get(format!("{base}/")).await.unwrap().text().await.unwrap();
    // the policy allows no inline script: the page's only script is the file
    assert_eq!(page.matches("<script").count(), 1);
    assert!(page.contains("<script src=\"/playground/app.js\""));
}

#[tokio::test]
async fn open_routes_stay_open_when_keys_are_set() {
    let config = ServerConfig { api_keys: vec![ALICE.into()], ..ServerConfig::default() };
    let (base, _state) = start(SlowBackend::new(Duration::ZERO), 4, config).await;
    for path in ["/", "/health", "/ready", "/metrics", "/openapi.json", "/playground/app.js"] {
        assert_eq!(reqwest::get(format!("{base}{path}")).await.unwrap().status(), StatusCode::OK, "{path}");
    }
    let client = reqwest::Client::new();
    for (method, path) in [("POST", RUN), ("POST", "/v1/run/stream"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x")] {
        let request = client.request(method.parse().unwrap(), format!("{base}{path}")).json(&small(1));
        expect_error(request.send().await.unwrap(), StatusCode::UNAUTHORIZED, 10000).await;
    }
    let openai = client.post(format!("{base}/v1/images/generations")).json(&json!({"prompt": "x"}));
    let openai = openai.send().await.unwrap();
    assert_eq!(openai.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(openai.json::<Value>().await.unwrap()["error"]["code"], 10000, "in OpenAI's shape");
    let mut socket = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    socket.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "no Host at all is not a browser: {answer}");
}
