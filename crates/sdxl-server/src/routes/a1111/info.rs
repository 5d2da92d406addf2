//! AUTOMATIC1111's lists, options, progress and interrupt. The lists hold what this server
//! has: the one loaded model, the samplers with Euler and the model's own schedule first (SillyTavern
//! takes the first of each as its default), no upscalers but "None", the `--vae` and `--lora`
//! files if any.

use std::path::Path;

use axum::body::Body;
use axum::extract::State;
use axum::{Extension, Json};
use base64::Engine as _;
use serde_json::{json, Map, Value};

use super::job_timestamp;
use super::sampling;
use super::wire::{Lora, Progress, ProgressState, Sampler, Scheduler, SdModel, SdVae, Upscaler};
use crate::auth::Owner;
use crate::error::{A1111Error, ApiError};
use crate::generation::read_body;
use crate::wire::parse_json;
use crate::AppState;

/// The loaded model as `/sd-models` lists it.
fn loaded_model(state: &AppState) -> SdModel {
    let config = state.config();
    let filename = config.model_files.model.as_deref().map_or_else(|| config.model_name.clone(), display);
    SdModel {
        title: config.model_name.clone(),
        model_name: config.model_name.clone(),
        hash: None,
        sha256: None,
        filename,
        config: None,
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn file_stem(path: &Path) -> String {
    let name = path.file_name().map_or_else(|| display(path), |n| n.to_string_lossy().into_owned());
    name.strip_suffix(".safetensors").map(String::from).unwrap_or(name)
}

/// Whether `name` names the loaded model (its title or name, with or without a
/// `.safetensors` suffix or a ` [hash]` tail as AUTOMATIC1111 titles carry); 400 naming
/// `field` otherwise: this server cannot switch models.
pub fn check_model(state: &AppState, name: &str, field: &str) -> Result<(), ApiError> {
    let model = &state.config().model_name;
    let bare = name.split(" [").next().unwrap_or(name).trim();
    let bare = bare.strip_suffix(".safetensors").unwrap_or(bare);
    if bare == model {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            field: field.into(),
            bound: format!("the loaded model {model:?} (this server runs one model; see /sdapi/v1/sd-models)"),
            got: format!("{name:?}"),
        })
    }
}

pub async fn sd_models(State(state): State<AppState>) -> Json<Vec<SdModel>> {
    Json(vec![loaded_model(&state)])
}

/// `GET /sdapi/v1/options`: the options clients read. Open WebUI and SillyTavern use this as
/// their health check and read `sd_model_checkpoint`.
pub async fn get_options(State(state): State<AppState>) -> Json<Value> {
    let config = state.config();
    let vae = config.model_files.vae.as_deref().map_or_else(|| "Automatic".into(), file_stem);
    Json(json!({
        "sd_model_checkpoint": loaded_model(&state).title,
        "sd_checkpoint_hash": null,
        "sd_vae": vae,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
        "sd_lora": "None",
    }))
}

/// `POST /sdapi/v1/options`: any options object (Open WebUI posts back the whole of what it
/// read). `sd_model_checkpoint`, when given and not empty, must name the loaded model; the
/// other options are accepted and have no effect. Answers `null`, as AUTOMATIC1111 does.
pub async fn set_options(State(state): State<AppState>, body: Body) -> Result<Json<Value>, A1111Error> {
    let (body, reservation) = read_body(&state, body).await?;
    let options: Map<String, Value> = parse_json(&body)?;
    drop((body, reservation));
    match options.get("sd_model_checkpoint") {
        None | Some(Value::Null) => {}
        Some(Value::String(name)) if name.is_empty() => {}
        Some(Value::String(name)) => check_model(&state, name, "sd_model_checkpoint")?,
        Some(other) => {
            return Err(ApiError::Invalid {
                field: "sd_model_checkpoint".into(),
                bound: "a model title".into(),
                got: other.to_string(),
            }
            .into())
        }
    }
    Ok(Json(Value::Null))
}

pub async fn samplers() -> Json<Vec<Sampler>> {
    let list = sdxl_engine::request::Sampler::ALL.into_iter().map(|s| Sampler {
        name: s.label().into(),
        aliases: sampling::aliases(s).iter().map(|a| a.to_string()).collect(),
        options: Map::new(),
    });
    Json(list.collect())
}

pub async fn schedulers() -> Json<Vec<Scheduler>> {
    let list = sampling::SCHEDULERS.iter().map(|&(name, label, kind)| Scheduler {
        name: name.into(),
        label: label.into(),
        aliases: None,
        default_rho: if kind == sdxl_engine::request::ScheduleKind::Karras { 7.0 } else { -1.0 },
        need_inner_model: false,
    });
    Json(list.collect())
}

pub async fn upscalers() -> Json<Vec<Upscaler>> {
    Json(vec![Upscaler { name: "None".into(), model_name: None, model_path: None, model_url: None, scale: 4.0 }])
}

/// None: this server has no hires pass.
pub async fn latent_upscale_modes() -> Json<Vec<Value>> {
    Json(Vec::new())
}

/// `GET /sdapi/v1/sd-vae` (and Forge's `sd-modules`): the `--vae` file, if one replaced the
/// model's.
pub async fn sd_vae(State(state): State<AppState>) -> Json<Vec<SdVae>> {
    let vae = state.config().model_files.vae.as_deref();
    Json(vae.map(|path| SdVae { model_name: file_stem(path), filename: display(path) }).into_iter().collect())
}

/// `GET /sdapi/v1/loras`: the LoRAs fused in at start-up.
pub async fn loras(State(state): State<AppState>) -> Json<Vec<Lora>> {
    let loras = state.config().model_files.loras.iter();
    Json(
        loras
            .map(|path| Lora {
                name: file_stem(path),
                alias: file_stem(path),
                path: display(path),
                metadata: Map::new(),
            })
            .collect(),
    )
}

/// `GET /sdapi/v1/scripts`: none (webuiapi asks at start-up).
pub async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [], "img2img": [] }))
}

/// `POST /sdapi/v1/refresh-checkpoints`: nothing to rescan; `null` as AUTOMATIC1111 answers.
pub async fn refresh_checkpoints() -> Json<Value> {
    Json(Value::Null)
}

/// `GET /sdapi/v1/progress`: the caller's latest running txt2img/img2img request. Idle:
/// progress 0 and `job_count` 0, which clients wait for.
pub async fn progress(State(state): State<AppState>, Extension(owner): Extension<Owner>) -> Json<Progress> {
    let idle = ProgressState {
        skipped: false,
        interrupted: false,
        stopping_generation: false,
        job: String::new(),
        job_count: 0,
        job_timestamp: "0".into(),
        job_no: 0,
        sampling_step: 0,
        sampling_steps: 0,
    };
    let Some(snapshot) = state.inner.progress.latest(owner.id()) else {
        return Json(Progress { progress: 0.0, eta_relative: 0.0, state: idle, current_image: None, textinfo: None });
    };
    let batch = &snapshot.state;
    let images = batch.images.max(1) as f64;
    let within = if batch.steps == 0 { 0.0 } else { batch.step as f64 / batch.steps as f64 };
    // AUTOMATIC1111's formula: 0.01 at the start, so that a started job never reads as idle
    let progress = (0.01 + (batch.image as f64 + within) / images).min(1.0);
    let elapsed = snapshot.elapsed.as_secs_f64();
    let current_image = batch.preview.as_ref().and_then(|preview| sdxl_engine::png::encode(preview).ok());
    let textinfo = match batch.waiting_behind {
        Some(position) => format!("Waiting in the queue: {position} ahead"),
        None => format!("Image {} of {}, step {} of {}", batch.image + 1, batch.images, batch.step, batch.steps),
    };
    Json(Progress {
        progress,
        eta_relative: elapsed / progress - elapsed,
        state: ProgressState {
            interrupted: snapshot.interrupted,
            job: "txt2img".into(),
            job_count: batch.images,
            job_timestamp: job_timestamp(),
            job_no: batch.image,
            sampling_step: batch.step,
            sampling_steps: batch.steps,
            ..idle
        },
        current_image: current_image.map(|png| base64::engine::general_purpose::STANDARD.encode(png)),
        textinfo: Some(textinfo),
    })
}

/// `POST /sdapi/v1/interrupt`: stops the caller's running txt2img/img2img requests at once
/// (their jobs are cancelled); each answers what it had. `{}` as AUTOMATIC1111 answers.
pub async fn interrupt(State(state): State<AppState>, Extension(owner): Extension<Owner>) -> Json<Value> {
    let stopped = state.inner.progress.interrupt(owner.id());
    tracing::debug!(stopped, "interrupt");
    Json(json!({}))
}
