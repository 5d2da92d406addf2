//! The OpenAI and AUTOMATIC1111 APIs over HTTP against a fake backend: the answers' shapes,
//! the defaults in force, errors in each API's envelope, and the per-key progress and
//! interrupt. The real clients run against the tiny model in `clients_tests/`.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{start, SlowBackend};
use reqwest::StatusCode;
use sdxl_server::ServerConfig;
use serde_json::{json, Value};

const ALICE: &str = "alice-key";
const BOB: &str = "bob-key";

fn keyed() -> ServerConfig {
    ServerConfig {
        api_keys: vec![ALICE.into(), BOB.into()],
        default_steps: 4,
        default_guidance: 0.0,
        ..ServerConfig::default()
    }
}

fn basic(key: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("webui:{key}")))
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn parameters_of(png_base64: &str) -> String {
    let png = base64::engine::general_purpose::STANDARD.decode(png_base64).unwrap();
    sdxl_engine::png::read_parameters(&png).unwrap().unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::new(width, height)
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

/// A `multipart/form-data` body: (content type, bytes) of `(name, file name, bytes)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "sdxl-test-boundary";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if let Some(file) = file {
            body.extend_from_slice(format!("; filename=\"{file}\"\r\nContent-Type: image/png").as_bytes());
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_generations_take_the_defaults_in_force_and_size_auto() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, keyed()).await;
    let request = client().post(format!("{base}/v1/images/generations")).bearer_auth(ALICE);
    let (status, body) = send(request.json(&json!({"prompt": "cyberpunk cat", "size": "auto"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let parameters = parameters_of(body["data"][0]["b64_json"].as_str().unwrap());
    assert!(parameters.contains("Steps: 4, Sampler: Euler, CFG scale: 0,"), "{parameters}");
    assert!(parameters.contains("Size: 1024x1024"), "{parameters}");
    assert_eq!((body["size"].as_str(), body["output_format"].as_str()), (Some("1024x1024"), Some("png")));
    // no job store here: a URL answer is refused, naming the field
    let request = client().post(format!("{base}/v1/images/generations")).bearer_auth(ALICE);
    let (status, body) = send(request.json(&json!({"prompt": "x", "response_format": "url"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("response_format"), "{body}");
    let request = client().post(format!("{base}/v1/images/generations")).bearer_auth(ALICE);
    let (status, body) = send(request.json(&json!({"prompt": "x", "n": 11}))).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("n")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_edits_are_img2img_without_a_mask_and_inpainting_with_one() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, keyed()).await;
    let image = png(256, 256);
    let edit = |parts: &[(&str, Option<&str>, &[u8])]| {
        let (content_type, body) = multipart(parts);
        client()
            .post(format!("{base}/v1/images/edits"))
            .bearer_auth(ALICE)
            .header("content-type", content_type)
            .body(body)
    };
    let (status, body) =
        send(edit(&[("image", Some("in.png"), &image), ("prompt", None, b"a hat"), ("n", None, b"2")])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let parameters = parameters_of(body["data"][0]["b64_json"].as_str().unwrap());
    assert!(parameters.contains("Size: 256x256") && parameters.contains("Denoising strength: 0.75"), "{parameters}");

    let mut mask = Vec::new();
    image::RgbaImage::from_pixel(256, 256, image::Rgba([0, 0, 0, 0]))
        .write_to(&mut std::io::Cursor::new(&mut mask), image::ImageFormat::Png)
        .unwrap();
    let parts: [(&str, Option<&str>, &[u8]); 3] =
        [("image[]", Some("in.png"), &image), ("mask", Some("m.png"), &mask), ("prompt", None, b"a hat")];
    let (status, body) = send(edit(&parts)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let parameters = parameters_of(body["data"][0]["b64_json"].as_str().unwrap());
    assert!(parameters.contains("Denoising strength: 1"), "{parameters}");

    // an opaque mask marks nothing: refused, naming the field
    let opaque = png(256, 256);
    let parts: [(&str, Option<&str>, &[u8]); 3] =
        [("image", Some("in.png"), &image), ("mask", Some("m.png"), &opaque), ("prompt", None, b"a hat")];
    let (status, body) = send(edit(&parts)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("`mask` must have an alpha channel"), "{body}");
    let (status, body) = send(edit(&[("prompt", None, b"no image")])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let request = client().post(format!("{base}/v1/images/edits")).bearer_auth(ALICE).json(&json!({"prompt": "x"}));
    assert_eq!(send(request).await.0, StatusCode::BAD_REQUEST, "a JSON body is not multipart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_the_loaded_model() {
    let config = ServerConfig { model_name: "sdxl_lightning_4step_unet".into(), ..keyed() };
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, config).await;
    let (status, list) = send(client().get(format!("{base}/v1/models")).bearer_auth(ALICE)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], json!("list"));
    assert_eq!(list["data"][0]["id"], json!("sdxl_lightning_4step_unet"));
    let (status, _) =
        send(client().get(format!("{base}/v1/models/sdxl_lightning_4step_unet")).bearer_auth(ALICE)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(client().get(format!("{base}/v1/models/dall-e-3")).bearer_auth(ALICE)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].is_string(), "{body}");
    let (status, _) = send(client().get(format!("{base}/v1/models"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt2img_answers_as_automatic1111() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, keyed()).await;
    let request = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic(ALICE));
    let body = json!({"prompt": "a fox <lora:detail:0.5>", "seed": 7, "batch_size": 2, "width": 256, "height": 256,
                      "sampler_name": "DPM++ 2M", "scheduler": "karras", "unknown": {"deep": [1]}});
    let (status, answer) = send(request.json(&body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["images"].as_array().unwrap().len(), 2);
    assert_eq!(answer["parameters"]["unknown"], json!({"deep": [1]}), "the request is echoed");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([7, 8]));
    assert_eq!((info["steps"].as_u64(), info["cfg_scale"].as_f64()), (Some(4), Some(0.0)), "the server's defaults");
    assert_eq!(info["prompt"], json!("a fox"), "extra-network tags are not prompt text");
    assert_eq!(info["sampler_name"], json!("DPM++ 2M"), "the sampler asked for runs");
    assert_eq!(info["extra_generation_params"], json!({}), "nothing fell back");
    let infotext = info["infotexts"][1].as_str().unwrap();
    assert!(infotext.contains("Sampler: DPM++ 2M, Schedule type: Karras,"), "{infotext}");
    assert!(infotext.ends_with(", Seed: 8, Size: 256x256, Model: sdxl"), "{infotext}");
    assert_eq!(parameters_of(answer["images"][1].as_str().unwrap()), infotext);

    // names this server lacks fall back and say so; a pair diffusers lacks is refused
    let request = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic(ALICE));
    let body =
        json!({"prompt": "x", "width": 256, "height": 256, "sampler_name": "Restart", "scheduler": "Exponential"});
    let (status, answer) = send(request.json(&body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sampler_name"], json!("Euler"));
    assert_eq!(info["extra_generation_params"]["Sampler"], json!("Restart → Euler"));
    assert_eq!(info["extra_generation_params"]["Schedule type"], json!("Exponential → Automatic"));
    let request = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic(ALICE));
    let (status, answer) =
        send(request.json(&json!({"prompt": "x", "sampler_name": "DDIM", "scheduler": "Karras"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["detail"][0]["loc"], json!(["body", "scheduler"]), "{answer}");
    assert!(answer.to_string().contains("DDIMScheduler"), "{answer}");

    let request = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic(ALICE));
    let (status, answer) = send(request.json(&json!({"prompt": "x", "cfg_scale": 31}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["detail"][0]["loc"], json!(["body", "cfg_scale"]), "{answer}");
    assert!(answer["errors"].as_str().unwrap().contains("between 0 and 30, got 31"), "{answer}");
    let request = client().post(format!("{base}/sdapi/v1/img2img")).header("authorization", basic(ALICE));
    let (status, answer) = send(request.json(&json!({"prompt": "x"}))).await;
    assert_eq!(
        (status, &answer["detail"][0]["loc"]),
        (StatusCode::UNPROCESSABLE_ENTITY, &json!(["body", "init_images"]))
    );

    let (status, answer) =
        send(client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", "Basic ")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["error"], json!("HTTPException"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_decodes_data_urls_and_inverts_masks_on_request() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, keyed()).await;
    let image = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png(256, 256)));
    let request = client().post(format!("{base}/sdapi/v1/img2img")).header("authorization", basic(ALICE));
    let body = json!({"prompt": "x", "init_images": [image], "mask": image, "inpainting_mask_invert": 1,
                      "denoising_strength": 0.5, "steps": 4});
    let (status, answer) = send(request.json(&body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["parameters"]["init_images"], Value::Null, "input images are not echoed");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["denoising_strength"], json!(0.5));
    assert_eq!(
        (info["width"].as_u64(), info["height"].as_u64()),
        (Some(512), Some(512)),
        "AUTOMATIC1111's default size"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_name_the_loaded_model_and_refuse_another() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, keyed()).await;
    let get = |path: &str| client().get(format!("{base}/sdapi/v1/{path}")).header("authorization", basic(ALICE));
    let (_, options) = send(get("options")).await;
    let (_, models) = send(get("sd-models")).await;
    assert_eq!(options["sd_model_checkpoint"], models[0]["title"]);
    let post = |body: Value| {
        client().post(format!("{base}/sdapi/v1/options")).header("authorization", basic(ALICE)).json(&body)
    };
    let mut round_trip = options.clone();
    round_trip["samples_format"] = json!("jpg");
    assert_eq!(send(post(round_trip)).await, (StatusCode::OK, Value::Null));
    assert_eq!(send(post(json!({"sd_model_checkpoint": ""}))).await.0, StatusCode::OK);
    assert_eq!(send(post(json!({"sd_model_checkpoint": "sdxl [abc123]"}))).await.0, StatusCode::OK);
    let (status, answer) = send(post(json!({"sd_model_checkpoint": "sd_xl_refiner_1.0"}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["detail"][0]["loc"], json!(["body", "sd_model_checkpoint"]), "{answer}");
    for path in
        ["samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae", "sd-modules", "loras", "scripts"]
    {
        assert_eq!(send(get(path)).await.0, StatusCode::OK, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_interrupt_are_each_keys_own() {
    let (base, _) = start(SlowBackend::new(Duration::from_millis(20)), 4, keyed()).await;
    let long = {
        let base = base.clone();
        tokio::spawn(async move {
            let request = client().post(format!("{base}/sdapi/v1/txt2img")).header("authorization", basic(ALICE));
            send(request.json(&json!({"prompt": "long", "steps": 150, "width": 256, "height": 256}))).await
        })
    };
    let progress = |key: &'static str| {
        let base = base.clone();
        async move { send(client().get(format!("{base}/sdapi/v1/progress")).header("authorization", basic(key))).await.1 }
    };
    let mut seen = Value::Null;
    for _ in 0..200 {
        seen = progress(ALICE).await;
        if seen["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen["state"]["sampling_steps"], json!(150), "{seen}");
    assert!(seen["progress"].as_f64().unwrap() > 0.01, "{seen}");
    assert_eq!(progress(BOB).await["state"]["job_count"], json!(0), "another key sees nothing");
    let interrupt = |key: &str| client().post(format!("{base}/sdapi/v1/interrupt")).header("authorization", basic(key));
    assert_eq!(send(interrupt(BOB)).await, (StatusCode::OK, json!({})));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!long.is_finished(), "another key's interrupt stops nothing");
    send(interrupt(ALICE)).await;
    let (status, answer) = tokio::time::timeout(Duration::from_secs(5), long).await.expect("stopped at once").unwrap();
    assert_eq!(status, StatusCode::OK, "{answer}");
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["extra_generation_params"]["Interrupted"], json!(true));
    assert_eq!(progress(ALICE).await["state"]["job_count"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_ignores_whatever_authorization_is_sent() {
    let (base, _) = start(SlowBackend::new(Duration::ZERO), 4, ServerConfig::default()).await;
    for value in ["Basic ", "Basic OnBhc3M=", "Bearer nothing"] {
        let (status, _) = send(client().get(format!("{base}/sdapi/v1/options")).header("authorization", value)).await;
        assert_eq!(status, StatusCode::OK, "{value}");
    }
}
