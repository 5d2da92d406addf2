//! `POST /v1/images/edits`: OpenAI's edit call, a `multipart/form-data` body as the SDKs send
//! it. Without a mask it is img2img; with one, inpainting where the mask is fully transparent.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::{Extension, Json};
use sdxl_engine::images::{convert_mask, MaskMarks};
use sdxl_engine::{NoiseSource, RawRequest, Sampling};

use super::wire::ImagesResponse;
use super::{invalid, Answer};
use crate::auth::Owner;
use crate::error::{ApiError, OpenAiError};
use crate::generation::read_body;
use crate::AppState;

/// img2img strength without a mask: a clear change that keeps the composition (also
/// AUTOMATIC1111's default), raised to one step's worth for models of fewer than 2 steps.
const IMG2IMG_STRENGTH: f64 = 0.75;

/// The text fields an edit takes; other fields are ignored.
const TEXT_FIELDS: [&str; 13] = [
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "strength",
    "negative_prompt",
    "seed",
    "num_steps",
    "guidance",
    "sampler",
    "schedule",
];

/// The fields of an edit as sent.
#[derive(Default)]
struct Form {
    image: Option<Bytes>,
    mask: Option<Bytes>,
    text: HashMap<&'static str, String>,
}

pub async fn edits(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok())
        .ok_or_else(|| ApiError::BadRequest("the body must be multipart/form-data with a boundary".into()))?;
    let (body, reservation) = read_body(&state, body).await?;
    let form = read_form(body, boundary).await?;
    drop(reservation);
    let text = |name: &str| form.text.get(name).map(String::as_str);
    let number = |name: &'static str| -> Result<Option<u64>, ApiError> {
        text(name)
            .map(|v| v.trim().parse::<u64>().map_err(|_| invalid(name, "an integer", format!("{v:?}"))))
            .transpose()
    };
    let float = |name: &'static str| -> Result<Option<f64>, ApiError> {
        text(name).map(|v| v.trim().parse::<f64>().map_err(|_| invalid(name, "a number", format!("{v:?}")))).transpose()
    };
    let prompt = text("prompt").unwrap_or_default().to_string();
    if prompt.is_empty() {
        return Err(invalid("prompt", "at least 1 character long", "\"\"").into());
    }
    let image = form.image.ok_or_else(|| ApiError::BadRequest("`image` is required: the image to edit".into()))?;
    let to_usize = |v: Option<u64>| v.map(|v| usize::try_from(v).unwrap_or(usize::MAX));
    let compression = number("output_compression")?.map(|q| u8::try_from(q).unwrap_or(u8::MAX));
    let answer = Answer::parse(
        &to_usize(number("n")?),
        text("size"),
        &text("response_format").map(Into::into),
        &text("output_format").map(Into::into),
        compression,
    )?;
    let config = state.config();
    let steps = to_usize(number("num_steps")?).unwrap_or(config.default_steps);
    // OpenAI's mask: transparent = edit; the engine's: white = repaint
    let mask = match &form.mask {
        Some(mask) => {
            let mask = mask.clone();
            let converted = tokio::task::spawn_blocking(move || convert_mask(&mask, "mask", MaskMarks::Transparent));
            Some(converted.await.map_err(|_| ApiError::Internal)?.map_err(ApiError::from_engine)?)
        }
        None => None,
    };
    let strength = match float("strength")? {
        Some(strength) => strength,
        None if mask.is_some() => 1.0,
        None => IMG2IMG_STRENGTH.max(1.0 / steps.max(1) as f64),
    };
    let (width, height) = answer.size.unzip();
    let template = RawRequest {
        prompt,
        negative_prompt: text("negative_prompt").map(Into::into),
        width,
        height,
        steps,
        guidance: float("guidance")?.unwrap_or(config.default_guidance),
        noise: NoiseSource::Seed(0),
        image: Some(image.to_vec()),
        mask,
        strength: Some(strength),
        sampling: Sampling::parse(text("sampler"), text("schedule")).map_err(ApiError::from_engine)?,
    };
    Ok(Json(answer.run(&state, &owner, &headers, template, number("seed")?).await?))
}

/// Reads the multipart body (already within the body limit): the first `image` or `image[]`
/// file, the `mask`, and the text fields an edit takes.
async fn read_form(body: Bytes, boundary: String) -> Result<Form, ApiError> {
    let malformed = |e: multer::Error| ApiError::BadRequest(format!("malformed multipart body: {e}"));
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut form = Form::default();
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(malformed)?;
        match name.as_str() {
            "image" | "image[]" => {
                form.image.get_or_insert(bytes);
            }
            "mask" => form.mask = Some(bytes),
            other => {
                if let Some(known) = TEXT_FIELDS.iter().find(|f| **f == other) {
                    let value = String::from_utf8(bytes.to_vec())
                        .map_err(|_| ApiError::BadRequest(format!("`{known}` is not UTF-8 text")))?;
                    form.text.insert(known, value);
                }
            }
        }
    }
    Ok(form)
}
