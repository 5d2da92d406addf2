//! `POST /v1/run/stream`: the run route's request, answered as Server-Sent Events so a client
//! can show the job while it waits and runs:
//!
//! - `queued` `{"position"}`: jobs ahead of this one (0: next), sent as it changes;
//! - `step` `{"step","total","elapsed_ms","eta_ms","preview"}`: one per denoising step; the
//!   preview is a base64 PNG of the latents, one pixel per 8×8 block;
//! - `image` `{"image","seed","queue_time_ms","inference_time_ms"}`: the PNG (base64), the
//!   same bytes the run route answers for the same request; the stream ends;
//! - `error`: the Workers AI error envelope; the stream ends.
//!
//! Failures before the job is queued (auth, validation, a full queue) are ordinary HTTP errors,
//! as on the run route. Closing the stream drops the ticket, which cancels the job.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use futures_util::stream::{self, Stream};
use sdxl_engine::{Event, Ticket, Update};
use serde_json::json;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::generation::{self, encode_png, read_body, validate_run, Generation};
use crate::AppState;

pub async fn stream(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    body: Body,
) -> Result<Response, ApiError> {
    let (body, reservation) = read_body(&state, body).await?;
    let Generation { request, seed, parameters } = validate_run(&state, body, reservation).await?;
    let ticket = generation::submit(&state, &owner, request, true)?;
    let job = Job { ticket, seed, parameters, state };
    // the keep-alive comments also find a vanished client while the job waits in the queue
    Ok(Sse::new(events(job)).keep_alive(KeepAlive::default()).into_response())
}

/// A queued job and what its final event needs.
struct Job {
    ticket: Ticket,
    seed: u64,
    parameters: String,
    state: AppState,
}

/// The job's events; the stream owns the ticket, so dropping it (the client went away)
/// cancels the job.
fn events(job: Job) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    stream::unfold(Some(job), |job| async move {
        let mut job = job?;
        let event = match job.ticket.next().await {
            Update::Event(Event::Queued { position }) => named("queued", json!({ "position": position })),
            Update::Event(Event::Step { step, total, elapsed, preview }) => {
                let preview = match preview {
                    // a tiny image: encoding it here is cheaper than a hop to the blocking pool
                    Some(image) => sdxl_engine::png::encode(&image).ok().map(|png| base64(&png)),
                    None => None,
                };
                named(
                    "step",
                    json!({
                        "step": step,
                        "total": total,
                        "elapsed_ms": elapsed.as_millis() as u64,
                        "eta_ms": eta(elapsed, step, total).as_millis() as u64,
                        "preview": preview,
                    }),
                )
            }
            Update::Done(Ok(done)) => {
                job.state.generation_ended(false);
                let (queue_time, inference_time) = (done.queue_time, done.inference_time);
                let event = match encode_png(done.image, job.parameters.clone()).await {
                    Ok(png) => named(
                        "image",
                        json!({
                            "image": base64(&png),
                            // a string: JavaScript numbers lose seeds above 2^53
                            "seed": job.seed.to_string(),
                            "queue_time_ms": queue_time.as_millis() as u64,
                            "inference_time_ms": inference_time.as_millis() as u64,
                        }),
                    ),
                    Err(e) => named("error", e.envelope()),
                };
                return Some((Ok(event), None));
            }
            Update::Done(Err(e)) => {
                let error = generation::ended(&job.state, Err::<(), _>(e)).unwrap_err();
                return Some((Ok(named("error", error.envelope())), None));
            }
        };
        Some((Ok(event), Some(job)))
    })
}

fn named(name: &str, data: serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Time left if the remaining steps take as long as the ones so far (the first includes
/// encoding the prompt; the VAE decode after the last is not counted).
fn eta(elapsed: Duration, step: usize, total: usize) -> Duration {
    if step == 0 {
        return Duration::ZERO;
    }
    elapsed.mul_f64(total.saturating_sub(step) as f64 / step as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_extrapolates_the_mean_step() {
        assert_eq!(eta(Duration::from_secs(2), 1, 4), Duration::from_secs(6));
        assert_eq!(eta(Duration::from_secs(6), 3, 4), Duration::from_secs(2));
        assert_eq!(eta(Duration::from_secs(8), 4, 4), Duration::ZERO);
        assert_eq!(eta(Duration::from_secs(1), 0, 4), Duration::ZERO);
    }
}
