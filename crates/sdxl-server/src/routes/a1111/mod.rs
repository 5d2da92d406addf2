//! AUTOMATIC1111's web API (`/sdapi/v1/*`), as AUTOMATIC1111 and Forge answer it, for the
//! clients that speak it (Open WebUI's default image engine, SillyTavern, LibreChat, the
//! `webuiapi` package): txt2img and img2img here, the model, sampler and other lists, the
//! options, progress and interrupt in [`info`]. Errors use AUTOMATIC1111's envelope
//! ([`A1111Error`]); auth is the server's (Basic with the key as password works).

pub mod info;
mod sampling;
pub mod wire;

use axum::body::Body;
use axum::extract::State;
use axum::{Extension, Json};
use base64::Engine as _;
use sdxl_engine::images::{convert_mask, resize_rgb, MaskMarks};
use sdxl_engine::{Event, Limits, NoiseSource, RawRequest, Update};
use serde_json::{json, Map, Value};

use crate::auth::Owner;
use crate::error::{A1111Error, ApiError};
use crate::generation::{self, encode_png, read_body, validate_raw, Generation};
use crate::progress::BatchGuard;
use crate::wire::{decode_base64, parse_json};
use crate::AppState;
use wire::{GenerationInfo, GenerationRequest, GenerationResponse};

/// AUTOMATIC1111's bounds where they are wider than Workers AI's: its step slider goes to 150
/// (Open WebUI sends 50 by default).
pub const LIMITS: Limits = Limits { max_steps: 150, steps_field: "steps", default_side: 512, ..Limits::SERVER };

/// The most images one request may make (`batch_size × n_iter`); they queue one by one.
pub const MAX_IMAGES: usize = 10;

/// The version `info` reports.
const VERSION: &str = concat!("sdxl ", env!("CARGO_PKG_VERSION"));

pub async fn txt2img(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Body,
) -> Result<Json<GenerationResponse>, A1111Error> {
    Ok(Json(generate(&state, &owner, body, false).await.map_err(rename_fields)?))
}

pub async fn img2img(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Body,
) -> Result<Json<GenerationResponse>, A1111Error> {
    Ok(Json(generate(&state, &owner, body, true).await.map_err(rename_fields)?))
}

/// A request validated into the engine's terms, and what its answer reports.
struct Plan {
    template: RawRequest,
    seeds: Vec<u64>,
    batch_size: usize,
    sampler: String,
    extra: Map<String, Value>,
    send_images: bool,
}

async fn generate(state: &AppState, owner: &Owner, body: Body, img2img: bool) -> Result<GenerationResponse, ApiError> {
    let (bytes, reservation) = read_body(state, body).await?;
    let wire: GenerationRequest = parse_json(&bytes)?;
    let mut parameters: Value = parse_json(&bytes)?;
    let include_images = wire.include_init_images.unwrap_or(false);
    drop((bytes, reservation));
    if let Some(echo) = parameters.as_object_mut().filter(|_| !include_images) {
        for field in ["init_images", "mask"] {
            echo.entry(field).and_modify(|v| *v = Value::Null);
        }
    }
    let plan = plan(state, wire, img2img).await?;
    let guard = state.inner.progress.start(owner.id(), plan.seeds.len());
    let mut images = Vec::with_capacity(plan.seeds.len());
    let mut infotexts = Vec::with_capacity(plan.seeds.len());
    let mut extra = plan.extra.clone();
    let (mut width, mut height, mut strength) = (0, 0, None);
    for (i, &seed) in plan.seeds.iter().enumerate() {
        let raw = RawRequest { noise: NoiseSource::Seed(seed), ..plan.template.clone() };
        let generation = validate_raw(state, raw, seed, &LIMITS).await?;
        (width, height) = (generation.request.width, generation.request.height);
        strength = generation.request.source.as_ref().map(|s| s.strength);
        guard.update(|s| {
            s.image = i;
            (s.step, s.steps, s.preview) = (0, generation.request.steps, None);
        });
        let parameters = generation.parameters.clone();
        let finished = run_one(state, owner, generation, &guard).await?;
        // interrupted: as AUTOMATIC1111 answers what it had, the latest preview at full size
        let image = match finished {
            Some(image) => Some(image),
            None => guard.preview().and_then(|preview| resize_rgb(&preview, width, height).ok()),
        };
        if let (Some(image), true) = (image, plan.send_images) {
            images.push(base64::engine::general_purpose::STANDARD.encode(encode_png(image, parameters.clone()).await?));
        }
        infotexts.push(parameters);
        if guard.interrupted() {
            extra.insert("Interrupted".into(), json!(true));
            break;
        }
    }
    let info = GenerationInfo {
        prompt: plan.template.prompt.clone(),
        all_prompts: vec![plan.template.prompt.clone(); plan.seeds.len()],
        negative_prompt: plan.template.negative_prompt.clone().unwrap_or_default(),
        all_negative_prompts: vec![plan.template.negative_prompt.clone().unwrap_or_default(); plan.seeds.len()],
        seed: plan.seeds[0],
        all_seeds: plan.seeds.clone(),
        subseed: plan.seeds[0],
        all_subseeds: plan.seeds.clone(),
        width,
        height,
        sampler_name: plan.sampler,
        cfg_scale: plan.template.guidance,
        steps: plan.template.steps,
        batch_size: plan.batch_size,
        sd_model_name: state.config().model_name.clone(),
        denoising_strength: strength,
        extra_generation_params: extra,
        index_of_first_image: 0,
        infotexts,
        job_timestamp: job_timestamp(),
        clip_skip: 1,
        is_using_inpainting_conditioning: false,
        version: VERSION.into(),
    };
    let info = serde_json::to_string(&info).map_err(|_| ApiError::Internal)?;
    Ok(GenerationResponse { images, parameters, info })
}

/// Checks `wire` and turns it into the engine's request (input images decoded from base64,
/// a mask to invert inverted) with the batch's seeds.
async fn plan(state: &AppState, wire: GenerationRequest, img2img: bool) -> Result<Plan, ApiError> {
    let config = state.config();
    if let Some(name) = wire
        .override_settings
        .as_ref()
        .and_then(|o| o.get("sd_model_checkpoint"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
    {
        info::check_model(state, name, "override_settings.sd_model_checkpoint")?;
    }
    let batch_size = wire.batch_size.unwrap_or(1);
    let n_iter = wire.n_iter.unwrap_or(1);
    for (field, value) in [("batch_size", batch_size), ("n_iter", n_iter)] {
        if value == 0 {
            return Err(invalid(field, "at least 1", value));
        }
    }
    // checked on txt2img too, where they are otherwise unused: out of range is a schema
    // violation either way
    if let Some(strength) = wire.denoising_strength.filter(|s| !(0.0..=1.0).contains(s)) {
        return Err(invalid("denoising_strength", "between 0 and 1", strength));
    }
    if let Some(invert) = wire.inpainting_mask_invert.filter(|i| *i > 1) {
        return Err(invalid("inpainting_mask_invert", "0 or 1", invert));
    }
    let count = batch_size.saturating_mul(n_iter);
    if count > MAX_IMAGES {
        return Err(invalid("batch_size", &format!("such that batch_size × n_iter is at most {MAX_IMAGES}"), count));
    }
    let first_seed = match wire.seed {
        None | Some(-1) => sdxl_engine::request::random_seed() % 4_294_967_294,
        Some(seed) if seed >= 0 => seed as u64,
        Some(seed) => return Err(invalid("seed", "-1 (random) or at least 0", seed)),
    };
    let seeds = (0..count as u64).map(|i| first_seed.wrapping_add(i)).collect();
    let mut extra = Map::new();
    let requested = wire.sampler_name.or(wire.sampler_index).filter(|s| !s.is_empty());
    let scheduler = wire.scheduler.filter(|s| !s.is_empty());
    let (sampling, notes) = sampling::resolve(requested.as_deref(), scheduler.as_deref());
    if !sampling.sampler.supports(sampling.schedule) {
        return Err(invalid(
            "scheduler",
            &format!("a scheduler the sampler {:?} takes", sampling.sampler.label()),
            sdxl_models::scheduler::unsupported_pair(sampling.sampler, sampling.schedule),
        ));
    }
    for (key, note) in notes {
        extra.insert(key.into(), json!(note));
    }
    let sampler = sampling.sampler.label().to_string();
    let (image, mask, strength) = if img2img {
        let first = wire.init_images.as_ref().and_then(|images| images.first());
        let image = first.ok_or_else(|| invalid("init_images", "a list of at least one base64 image", "none"))?;
        let image = decode_base64("init_images", image)?;
        let mask = wire.mask.as_deref().filter(|m| !m.is_empty()).map(|m| decode_base64("mask", m)).transpose()?;
        let mask = match mask {
            Some(mask) if wire.inpainting_mask_invert == Some(1) => {
                let inverted = tokio::task::spawn_blocking(move || convert_mask(&mask, "mask", MaskMarks::Black));
                Some(inverted.await.map_err(|_| ApiError::Internal)?.map_err(ApiError::from_engine)?)
            }
            mask => mask,
        };
        (Some(image), mask, Some(wire.denoising_strength.unwrap_or(0.75)))
    } else {
        (None, None, None)
    };
    let template = RawRequest {
        prompt: strip_extra_networks(&wire.prompt),
        negative_prompt: Some(strip_extra_networks(&wire.negative_prompt)).filter(|n| !n.is_empty()),
        width: Some(wire.width.unwrap_or(LIMITS.default_side)),
        height: Some(wire.height.unwrap_or(LIMITS.default_side)),
        steps: wire.steps.unwrap_or(config.default_steps),
        guidance: wire.cfg_scale.unwrap_or(config.default_guidance),
        noise: NoiseSource::Seed(first_seed),
        image,
        mask,
        strength,
        sampling,
    };
    Ok(Plan { template, seeds, batch_size, sampler, extra, send_images: wire.send_images.unwrap_or(true) })
}

/// Runs one image, keeping the caller's progress up to date. `None`: interrupted (the job is
/// cancelled with its ticket).
async fn run_one(
    state: &AppState,
    owner: &Owner,
    generation: Generation,
    guard: &BatchGuard,
) -> Result<Option<sdxl_models::pixels::RgbImage>, ApiError> {
    let mut ticket = generation::submit(state, owner, generation.request, true)?;
    loop {
        let update = tokio::select! {
            update = ticket.next() => update,
            () = guard.until_interrupted() => return Ok(None),
        };
        match update {
            Update::Event(Event::Queued { position }) => guard.update(|s| s.waiting_behind = Some(position)),
            Update::Event(Event::Step { step, total, preview, .. }) => guard.update(|s| {
                (s.step, s.steps, s.waiting_behind) = (step, total, None);
                s.preview = preview.or(s.preview.take());
            }),
            Update::Done(result) => return Ok(Some(generation::ended(state, result)?.image)),
        }
    }
}

/// The prompt without AUTOMATIC1111's extra-network tags (`<lora:name:0.8>`, `<hypernet:…>`),
/// which its web UI strips before the text encoder sees the prompt; LoRAs here are fused at
/// start-up (`--lora`).
fn strip_extra_networks(prompt: &str) -> String {
    let mut out = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        let tag = &rest[start + 1..];
        let is_network = ["lora:", "lyco:", "hypernet:"].iter().any(|p| tag.starts_with(p));
        match tag.find('>').filter(|_| is_network) {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &tag[end + 1..];
            }
            None => {
                out.push_str(&rest[..=start]);
                rest = tag;
            }
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// The engine's field names → AUTOMATIC1111's, in validation errors.
fn rename_fields(error: ApiError) -> A1111Error {
    A1111Error(match error {
        ApiError::Invalid { field, bound, got } => {
            let field = match field.as_str() {
                "guidance" => "cfg_scale".into(),
                "strength" => "denoising_strength".into(),
                "image" => "init_images".into(),
                _ => field,
            };
            ApiError::Invalid { field, bound, got }
        }
        other => other,
    })
}

fn invalid(field: &str, bound: &str, got: impl ToString) -> ApiError {
    ApiError::Invalid { field: field.into(), bound: bound.into(), got: got.to_string() }
}

/// Now as AUTOMATIC1111 stamps jobs, `%Y%m%d%H%M%S` in UTC.
pub(crate) fn job_timestamp() -> String {
    let seconds = crate::routes::openai::unix_now();
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_network_tags_leave_the_prompt() {
        assert_eq!(strip_extra_networks("a cat <lora:detail:0.8> in snow"), "a cat  in snow");
        assert_eq!(strip_extra_networks("<hypernet:x:1>a <b> c"), "a <b> c");
        assert_eq!(strip_extra_networks("a < b"), "a < b");
        assert_eq!(strip_extra_networks("<lora:unclosed"), "<lora:unclosed");
    }

    #[test]
    fn dates_follow_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_425), (2025, 12, 3));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
