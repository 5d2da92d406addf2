//! The server over real HTTP on an ephemeral port: the tiny model for the happy paths, a
//! slow fake backend for queueing, timeouts and cancellation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use sdxl_engine::queue::{Queue, QueueConfig};
use sdxl_server::{app, AppState, ServerConfig};
use serde_json::{json, Value};

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_image_returns_the_engines_png() {
    let (base, _) = start(tiny_model(), 4, ServerConfig::default()).await;
    let body = json!({"prompt": "a cat", "width": 256, "height": 256, "num_steps": 2, "guidance": 0, "seed": 7});
    let response = post(&base, RUN, body.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    assert_eq!(response.headers()["x-seed"], "7");
    assert!(response.headers().contains_key("x-queue-time-ms"));
    assert!(response.headers().contains_key("x-inference-time-ms"));
    let png = response.bytes().await.unwrap();
    assert_eq!(png_to_rgb(&png).dimensions(), (256, 256));
    let expected = tokio::task::spawn_blocking(|| engine_png(raw("a cat", 2, 7))).await.unwrap();
    assert_eq!(png.as_ref(), expected.as_slice());
    // the short route answers the same
    let short = post(&base, "/ai/run/@cf/bytedance/stable-diffusion-xl-lightning", body).await;
    assert_eq!(short.bytes().await.unwrap(), png);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_array_and_base64_give_the_same_img2img() {
    let (base, _) = start(tiny_model(), 4, ServerConfig::default()).await;
    let input = std::fs::read(fixtures().join("golden/tiny-sdxl/edit_input_64x64.png")).unwrap();
    let mask = std::fs::read(fixtures().join("golden/tiny-sdxl/edit_mask_64x64.png")).unwrap();
    let common = json!({"prompt": "a cat", "num_steps": 4, "guidance": 0, "strength": 0.5, "seed": 3, "width": 256, "height": 256});
    let with = |extra: Value| {
        let mut body = common.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let by_array = post(&base, RUN, with(json!({"image": input}))).await;
    assert_eq!(by_array.status(), StatusCode::OK);
    let b64 = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&input));
    let by_b64 = post(&base, RUN, with(json!({"image_b64": b64}))).await;
    assert_eq!(by_b64.status(), StatusCode::OK);
    let (a, b) = (by_array.bytes().await.unwrap(), by_b64.bytes().await.unwrap());
    assert_eq!(a, b);
    let inpainted = post(&base, RUN, with(json!({"image": input, "mask": mask}))).await;
    assert_eq!(inpainted.status(), StatusCode::OK);
    let inpainted = inpainted.bytes().await.unwrap();
    assert_eq!(png_to_rgb(&inpainted).dimensions(), (256, 256));
    assert_ne!(inpainted, a, "the mask must change the result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_envelope_and_the_server_keeps_serving() {
    let config = ServerConfig { api_keys: vec!["secret".into()], body_limit: 1 << 20, ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, config).await;
    let client = reqwest::Client::new();
    let send = |path: &str, body: Value| client.post(format!("{base}{path}")).bearer_auth("secret").json(&body).send();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"width": 256}), "missing field `prompt`"),
        (json!({"prompt": ""}), "`prompt` must be at least 1 character"),
        (json!({"prompt": "x", "width": 4096}), "`width` must be between 256 and 2048, got 4096"),
        (json!({"prompt": "x", "num_steps": 0}), "`num_steps` must be between 1 and 20, got 0"),
        (json!({"prompt": "x", "num_steps": 21}), "`num_steps` must be between 1 and 20, got 21"),
        (json!({"prompt": "x", "guidance": 31}), "`guidance` must be between 0 and 30, got 31"),
        (json!({"prompt": "x", "image": [1, 300]}), "`image`: items must be integers between 0 and 255, got 300"),
        (json!({"prompt": "x", "image": [1], "image_b64": "AA=="}), "`image` and `image_b64` are mutually exclusive"),
        (json!({"prompt": "x", "image": [1, 2, 3]}), "`image` is not a PNG, JPEG or WebP image"),
        (json!({"prompt": "x", "mask": [1, 2, 3]}), "`mask` requires `image`"),
        (json!({"prompt": "x", "seed": -1}), "`seed`"),
    ];
    for (body, expected) in cases {
        let message = expect_error(send(RUN, body.clone()).await.unwrap(), StatusCode::BAD_REQUEST, 5006).await;
        assert!(message.contains(expected), "{body}: {message}");
    }
    let not_json = client.post(format!("{base}{RUN}")).bearer_auth("secret").body("{not json").send().await.unwrap();
    expect_error(not_json, StatusCode::BAD_REQUEST, 5006).await;
    let wrong_token =
        client.post(format!("{base}{RUN}")).bearer_auth("guess").json(&json!({"prompt": "x"})).send().await.unwrap();
    expect_error(wrong_token, StatusCode::UNAUTHORIZED, 10000).await;
    let no_token = client.post(format!("{base}{RUN}")).json(&json!({"prompt": "x"})).send().await.unwrap();
    expect_error(no_token, StatusCode::UNAUTHORIZED, 10000).await;
    let unknown_model = send("/client/v4/accounts/abc/ai/run/@cf/other/model", json!({"prompt": "x"})).await.unwrap();
    let message = expect_error(unknown_model, StatusCode::BAD_REQUEST, 5007).await;
    assert!(message.contains("@cf/other/model"), "{message}");
    let unknown_route = client.get(format!("{base}/nope")).send().await.unwrap();
    expect_error(unknown_route, StatusCode::NOT_FOUND, 7003).await;
    let huge = json!({"prompt": "x", "image": vec![0u8; 1 << 20]});
    let too_large = send(RUN, huge).await.unwrap();
    // regression: without `connection: close` the client pooled the connection the server was
    // closing, and the next request on it failed (IncompleteMessage)
    assert_eq!(too_large.headers().get("connection").map(|v| v.to_str().unwrap()), Some("close"));
    expect_error(too_large, StatusCode::PAYLOAD_TOO_LARGE, 3006).await;
    // still serving
    let ok = send(RUN, json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 1})).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_and_health_stays_fast() {
    let backend = SlowBackend::new(Duration::from_millis(100));
    let (base, state) = start(backend, 1, ServerConfig::default()).await;
    let body = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 3});
    let requests: Vec<_> = (0..6).map(|_| tokio::spawn(post_owned(base.clone(), body.clone()))).collect();
    // while the worker is busy, /health answers quickly
    while !state.queue().busy() {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(100), "health took {:?}", started.elapsed());
    let mut statuses = Vec::new();
    for request in requests {
        let response = request.await.unwrap();
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            expect_error(response, StatusCode::TOO_MANY_REQUESTS, 3040).await;
        } else {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(png_to_rgb(&response.bytes().await.unwrap()).dimensions(), (256, 256));
        }
        statuses.push(status);
    }
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == StatusCode::OK).count() >= 2, "{statuses:?}");
}

async fn post_owned(base: String, body: Value) -> reqwest::Response {
    post(&base, RUN, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_stops_its_generation() {
    let backend = SlowBackend::new(Duration::from_millis(50));
    let steps_run = backend.steps_run.clone();
    let (base, state) = start(backend, 2, ServerConfig::default()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let body = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 20});
    assert!(client.post(format!("{base}{RUN}")).json(&body).send().await.is_err(), "the client should time out");
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.queue().busy() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!state.queue().busy(), "the worker should be free again");
    let run = steps_run.load(Ordering::SeqCst);
    assert!(run < 20, "generation ran all {run} steps after the client left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_408() {
    let config = ServerConfig { request_timeout: Duration::from_millis(150), ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::from_millis(100)), 2, config).await;
    let response = post(&base, RUN, json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 10})).await;
    expect_error(response, StatusCode::REQUEST_TIMEOUT, 3007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_work_and_fails_readiness() {
    let (base, state) = start(SlowBackend::new(Duration::ZERO), 2, ServerConfig::default()).await;
    assert_eq!(reqwest::get(format!("{base}/ready")).await.unwrap().status(), StatusCode::OK);
    state.start_draining();
    assert_eq!(reqwest::get(format!("{base}/ready")).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reqwest::get(format!("{base}/health")).await.unwrap().status(), StatusCode::OK);
    let response = post(&base, RUN, json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 1})).await;
    expect_error(response, StatusCode::SERVICE_UNAVAILABLE, 3040).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_route_returns_n_images() {
    let (base, _) = start(tiny_model(), 4, ServerConfig::default()).await;
    let body = json!({"prompt": "a cat", "n": 2, "size": "256x256", "num_steps": 1, "guidance": 0, "seed": 5});
    let response = post(&base, "/v1/images/generations", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let images: Vec<Vec<u8>> = data
        .iter()
        .map(|d| base64::engine::general_purpose::STANDARD.decode(d["b64_json"].as_str().unwrap()).unwrap())
        .collect();
    assert_ne!(images[0], images[1], "image i uses seed + i");
    let expected = tokio::task::spawn_blocking(|| engine_png(raw("a cat", 1, 6))).await.unwrap();
    assert_eq!(images[1], expected);
    let bad = post(&base, "/v1/images/generations", json!({"prompt": "x", "response_format": "url"})).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let error: Value = bad.json().await.unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("response_format"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_openapi_describe_the_server() {
    let config = ServerConfig { default_steps: 6, default_guidance: 1.5, ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, config).await;
    assert_eq!(post(&base, RUN, json!({"prompt": "x", "width": 256, "height": 256})).await.status(), StatusCode::OK);
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    for name in [
        "sdxl_requests_total",
        "sdxl_queue_depth",
        "sdxl_generation_seconds",
        "sdxl_step_seconds",
        "sdxl_queue_wait_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }
    let doc: Value = reqwest::get(format!("{base}/openapi.json")).await.unwrap().json().await.unwrap();
    let properties = &doc["components"]["schemas"]["RunRequest"]["properties"];
    assert_eq!(properties["num_steps"]["default"], json!(6));
    assert_eq!(properties["guidance"]["default"], json!(1.5));
    assert!(doc["paths"]["/v1/images/generations"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServerConfig { header_read_timeout: Duration::from_millis(200), ..ServerConfig::default() };
    let queue = Queue::start(SlowBackend::new(Duration::ZERO), QueueConfig::with_capacity(1));
    let state = AppState::new(queue, config.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = sdxl_server::ConnectionLimits::from(&config);
    tokio::spawn(sdxl_server::serve(listener, app(state), limits, std::future::pending()));
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    // the server closes the connection (possibly after a 408) instead of waiting forever
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(150), "closed too early");
    // a well-behaved client is still served
    let health = reqwest::get(format!("http://{address}/health")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_gets_408_in_the_envelope() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServerConfig { body_read_timeout: Duration::from_millis(200), ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 1, config).await;
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":3007"), "{answer}");
}

// regression: the body timeout bounded the pauses between pieces, so a client sending one
// byte every 100 ms held its connection and handler for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_when_the_whole_body_is_late() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = ServerConfig { body_read_timeout: Duration::from_millis(500), ..ServerConfig::default() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 1, config).await;
    let address = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST {RUN} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut answer)).await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":3007"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
}

// regressions found by schemathesis (load_tests/schema.sh) and while making the OpenAPI
// document say what the server does
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_violations_and_odd_requests_get_the_envelope() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, ServerConfig::default()).await;
    let client = reqwest::Client::new();
    // `strength` out of range was accepted (200) when there was no image to apply it to
    for strength in [json!(2), json!(-0.5), json!(1e308)] {
        let body = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 1, "strength": strength});
        let message = expect_error(post(&base, RUN, body).await, StatusCode::BAD_REQUEST, 5006).await;
        assert!(message.contains("`strength` must be between 0 and 1"), "{message}");
    }
    let fine = json!({"prompt": "x", "width": 256, "height": 256, "num_steps": 1, "strength": 0.3});
    assert_eq!(post(&base, RUN, fine).await.status(), StatusCode::OK);
    // a known route with another method answered 405 with an empty body
    let wrong_method = client.delete(format!("{base}{RUN}")).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "POST");
    expect_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, 10405).await;
    let wrong_method = client.post(format!("{base}/health")).send().await.unwrap();
    assert!(wrong_method.headers()["allow"].to_str().unwrap().contains("GET"));
    expect_error(wrong_method, StatusCode::METHOD_NOT_ALLOWED, 10405).await;
    // a path segment that is not UTF-8 got axum's plain-text 400
    for path in ["/client/v4/accounts/%FF/ai/run/@cf/bytedance/stable-diffusion-xl-lightning", "/ai/run/%FF%FE"] {
        let response = client.post(format!("{base}{path}")).json(&json!({"prompt": "x"})).send().await.unwrap();
        let message = expect_error(response, StatusCode::BAD_REQUEST, 5006).await;
        assert!(message.contains("invalid URL"), "{path}: {message}");
    }
    // `size` is exactly the documented pattern: no spaces, signs or leading zeros
    for size in [" 256x256", "+256x256", "0256x256", "256 x 256"] {
        let body = json!({"prompt": "x", "size": size, "num_steps": 1});
        let response = post(&base, "/v1/images/generations", body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{size:?}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"]["message"].as_str().unwrap().contains("`size`"), "{error}");
    }
    let body = json!({"prompt": "x", "size": "256x2048", "num_steps": 1});
    assert_eq!(post(&base, "/v1/images/generations", body).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_answer() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, ServerConfig::default()).await;
    let doc: Value = reqwest::get(format!("{base}/openapi.json")).await.unwrap().json().await.unwrap();
    let account =
        &doc["paths"]["/client/v4/accounts/{account_id}/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"]["post"];
    // the path parameter was not declared, so the document was invalid
    assert_eq!(account["parameters"][0]["name"], json!("account_id"));
    assert_eq!(account["parameters"][0]["in"], json!("path"));
    let short = &doc["paths"]["/ai/run/@cf/bytedance/stable-diffusion-xl-lightning"]["post"];
    for operation in [account, short] {
        assert!(operation["responses"]["200"]["content"]["image/png"].is_object(), "{operation}");
        for status in ["400", "408", "413", "429", "500", "503"] {
            let schema = &operation["responses"][status]["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(schema, &json!("#/components/schemas/ErrorEnvelope"), "{status}");
        }
        assert!(operation["responses"]["429"]["headers"]["Retry-After"].is_object());
    }
    // the OpenAI route documented only its 200
    let images = &doc["paths"]["/v1/images/generations"]["post"];
    for status in ["400", "408", "413", "429", "500", "503"] {
        let schema = &images["responses"][status]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(schema, &json!("#/components/schemas/OpenAiError"), "{status}");
    }
    let envelope = &doc["components"]["schemas"]["ErrorEnvelope"];
    assert_eq!(envelope["required"], json!(["result", "success", "errors", "messages"]));
    let images_request = &doc["components"]["schemas"]["ImagesRequest"]["properties"];
    assert_eq!(images_request["guidance"]["maximum"], json!(30));
    assert!(images_request["size"]["pattern"].is_string());
    assert_eq!(
        doc["paths"]["/ready"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]["required"],
        json!(["status"])
    );
}

// regression (schemathesis, coverage phase): `1.0` is an `integer` to JSON Schema and to
// Workers AI, but integer fields refused it with 400
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_written_as_floats_are_integers() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 2, ServerConfig::default()).await;
    let body = json!({"prompt": "x", "width": 256.0, "height": 2.56e2, "num_steps": 1.0, "seed": 7.0});
    let response = post(&base, RUN, body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-seed"], "7");
    assert_eq!(png_to_rgb(&response.bytes().await.unwrap()).dimensions(), (256, 256));
    let body = json!({"prompt": "x", "n": 2.0, "size": "256x256", "num_steps": 1.0, "seed": 3.0});
    let response = post(&base, "/v1/images/generations", body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["data"].as_array().unwrap().len(), 2);
    // a fraction is still refused
    let body = json!({"prompt": "x", "width": 256.5, "height": 256, "num_steps": 1});
    let message = expect_error(post(&base, RUN, body).await, StatusCode::BAD_REQUEST, 5006).await;
    assert!(message.starts_with("`width`: invalid value"), "{message}");
}
