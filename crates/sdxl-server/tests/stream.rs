//! The progress stream (`POST /v1/run/stream`) and the playground page, over real HTTP.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use reqwest::StatusCode;
use sdxl_server::ServerConfig;
use serde_json::{json, Value};

const STREAM: &str = "/v1/run/stream";

/// The `(event, data)` pairs of a Server-Sent Events body (comments skipped).
fn parse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(str::trim_start);
            Some((field("event:")?.to_string(), serde_json::from_str(field("data:")?).expect("JSON data")))
        })
        .collect()
}

fn decode(base64: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(base64.as_str().expect("a base64 string")).expect("base64")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_reports_each_step_and_ends_with_the_run_routes_png() {
    let (base, _) = start(tiny_model(), 4, ServerConfig::default()).await;
    let body = json!({"prompt": "a cat", "width": 256, "height": 260, "num_steps": 3, "guidance": 0, "seed": 7});
    let response = post(&base, STREAM, body.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = parse_events(&response.text().await.unwrap());

    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["queued", "step", "step", "step", "image"], "{events:?}");
    assert_eq!(events[0].1, json!({"position": 0}));
    let steps = &events[1..4];
    let mut last_elapsed = 0;
    for (i, (_, step)) in steps.iter().enumerate() {
        assert_eq!((step["step"].as_u64(), step["total"].as_u64()), (Some(i as u64 + 1), Some(3)), "{step}");
        let elapsed = step["elapsed_ms"].as_u64().unwrap();
        assert!(elapsed >= last_elapsed, "{step}");
        last_elapsed = elapsed;
        // one pixel per 8×8 block of the 256×260 image
        let preview = image::load_from_memory(&decode(&step["preview"])).unwrap();
        assert_eq!((preview.width(), preview.height()), (32, 33));
    }
    assert_eq!(steps[2].1["eta_ms"], json!(0));

    let image = &events[4].1;
    assert_eq!(image["seed"], json!("7"));
    assert!(image["inference_time_ms"].is_u64() && image["queue_time_ms"].is_u64(), "{image}");
    let run = post(&base, RUN, body).await.bytes().await.unwrap();
    assert_eq!(decode(&image["image"]), run.as_ref(), "the stream's image is the run route's PNG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_stream_cancels_the_job() {
    let backend = SlowBackend::new(Duration::from_millis(50));
    let steps_run = backend.steps_run.clone();
    let (base, state) = start(backend, 2, ServerConfig::default()).await;
    let body = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 20});
    let mut response = post(&base, STREAM, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut text = String::new();
    while !text.contains("\"step\":2") {
        let chunk = response.chunk().await.unwrap().expect("the stream goes on until step 2");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.queue().busy() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!state.queue().busy(), "the worker should be free again");
    let run = steps_run.load(Ordering::SeqCst);
    assert!(run < 20, "generation ran all {run} steps after the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_stream_hears_its_position_and_errors_end_it() {
    let config = ServerConfig { request_timeout: Duration::from_millis(400), ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::from_millis(100)), 4, config).await;
    let long = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 20});
    let (first, second) = tokio::join!(post(&base, STREAM, long.clone()), async {
        // the first job is running by then
        tokio::time::sleep(Duration::from_millis(150)).await;
        post(&base, STREAM, long.clone()).await
    });
    let second = parse_events(&second.text().await.unwrap());
    assert_eq!(second[0], ("queued".to_string(), json!({"position": 0})), "{second:?}");
    // the 400 ms deadline passes: both end with the envelope of a 408
    for events in [parse_events(&first.text().await.unwrap()), second] {
        let (name, error) = events.last().unwrap();
        assert_eq!(name, "error", "{events:?}");
        assert_eq!(error["success"], json!(false));
        assert_eq!(error["errors"][0]["code"], json!(3007), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_job_starts_are_http_errors() {
    let config = ServerConfig { api_keys: vec!["k".into()], ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, config).await;
    let client = reqwest::Client::new();
    let url = format!("{base}{STREAM}");
    let refused = client.post(&url).json(&json!({"prompt": "x"})).send().await.unwrap();
    expect_error(refused, StatusCode::UNAUTHORIZED, 10000).await;
    let invalid = client.post(&url).bearer_auth("k").json(&json!({"prompt": "x", "num_steps": 99})).send().await;
    let message = expect_error(invalid.unwrap(), StatusCode::BAD_REQUEST, 5006).await;
    assert!(message.contains("num_steps"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_is_served_from_the_binary_without_auth() {
    let config = ServerConfig { api_keys: vec!["k".into()], ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, config).await;
    let page = reqwest::get(format!("{base}/")).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    for asset in ["/playground/app.js", "/playground/style.css"] {
        assert!(html.contains(asset), "the page loads {asset}");
        let response = reqwest::get(format!("{base}{asset}")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
        let text = response.text().await.unwrap();
        // no CDN: nothing the page uses comes from elsewhere
        assert!(!text.contains("https://") && !text.contains("http://"), "{asset} loads from another origin");
    }
    assert!(!html.contains("https://") && !html.contains("http://"), "the page loads from another origin");
}
