//! The loop that takes stored jobs to this server's model: it claims the oldest stored job,
//! runs it through the same queue as the synchronous routes, renews the lease every second
//! with the progress, and stores the PNG. It also deletes results older than the TTL.
//!
//! Stored and synchronous work share the model fairly. When the queue is idle the runner
//! claims at once. When it is busy the runner waits [`YIELD_TO_IDLE_SERVERS`] first (so
//! an idle server of the fleet takes the job), then claims and places the job ahead of the
//! waiting requests ([`Placement::Ahead`], one at a time): with both kinds waiting they
//! alternate, so neither starves the other, and a synchronous request waits behind at most
//! one stored job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sdxl_engine::{Event, Placement, Submission, Update};

use super::{now_ms, Claimed, JobError, JobStore, Outcome, StoreError};
use crate::error::ApiError;
use crate::generation::{encode_png, parse_raw};
use crate::AppState;

/// How long a busy server leaves a stored job to the fleet's idle servers before it claims
/// the job itself.
pub const YIELD_TO_IDLE_SERVERS: Duration = Duration::from_secs(2);

/// How the runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// This server's name in the store's `worker` column.
    pub worker: String,
    /// How long a claim lasts without renewal; a job whose worker died runs again after it.
    pub lease: Duration,
    /// How long finished jobs (and their images) are kept.
    pub ttl: Duration,
    /// How often an idle runner looks for work.
    pub poll: Duration,
    /// Claims after which a job whose lease keeps running out is failed.
    pub max_attempts: u32,
}

/// A worker name unique to this process: host, process id and a random suffix.
pub fn worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sdxl".into());
    format!("{host}-{}-{}", std::process::id(), &super::new_id()[..8])
}

/// Runs until the server drains.
pub async fn run(state: AppState, store: Arc<dyn JobStore>, config: RunnerConfig) {
    let expiry = tokio::spawn(expire(state.clone(), store.clone(), config.ttl));
    let mut busy_since: Option<Instant> = None;
    while !state.draining() {
        let busy = state.queue().busy() || state.queue().waiting() > 0;
        if !busy {
            busy_since = None;
        } else if busy_since.get_or_insert_with(Instant::now).elapsed() < YIELD_TO_IDLE_SERVERS {
            tokio::time::sleep(config.poll).await;
            continue;
        }
        let now = now_ms();
        match store.give_up(now, config.max_attempts).await {
            Ok(0) | Err(_) => {}
            Ok(n) => {
                tracing::warn!(
                    jobs = n,
                    attempts = config.max_attempts,
                    "gave up on jobs whose server stopped each time"
                );
                metrics::counter!(sdxl_engine::metric_names::JOBS_TOTAL, sdxl_engine::metric_names::OUTCOME => "gave_up").increment(n);
            }
        }
        let claimed = store.claim(&config.worker, now, now + config.lease.as_millis() as i64).await;
        state.store_answered(claimed.is_ok());
        match claimed {
            Ok(Some(job)) => {
                busy_since = None;
                if let Err(e) = run_job(&state, store.as_ref(), &config, job).await {
                    tracing::warn!(error = %e, "job store failed during a job");
                    tokio::time::sleep(config.poll).await;
                }
            }
            Ok(None) => tokio::time::sleep(config.poll).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim a job");
                tokio::time::sleep(config.poll).await;
            }
        }
    }
    expiry.abort();
}

/// Deletes finished jobs past their TTL, at start and then every min(30 s, TTL), whether or
/// not a job is running, until the server drains.
async fn expire(state: AppState, store: Arc<dyn JobStore>, ttl: Duration) {
    let mut ticks = tokio::time::interval(Duration::from_secs(30).min(ttl).max(Duration::from_millis(100)));
    while !state.draining() {
        ticks.tick().await;
        match store.expire(now_ms() - ttl.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "deleted finished jobs past their TTL"),
            Err(e) => tracing::warn!(error = %e, "cannot delete expired jobs"),
        }
    }
}

/// How long a finished job's result is kept in memory, retrying, while the store does not
/// answer.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(600);

/// Stores how a job ended, retrying (1 s, doubling to 16 s) while the store does not answer,
/// so that a finished image outlives a store outage of up to [`FINISH_RETRY_FOR`].
async fn store_outcome(
    state: &AppState,
    store: &dyn JobStore,
    config: &RunnerConfig,
    id: &str,
    (step, total): (u64, u64),
    outcome: Outcome,
) {
    let lease = config.lease.as_millis() as i64;
    let give_up = Instant::now() + FINISH_RETRY_FOR;
    let mut wait = Duration::from_secs(1);
    loop {
        // the last progress first (renewals come once a second; a short job may have had none)
        let stored = match store.renew(id, &config.worker, now_ms() + lease, step, total).await {
            Ok(true) => store.finish(id, &config.worker, now_ms(), outcome.clone()).await,
            other => other,
        };
        state.store_answered(stored.is_ok());
        match stored {
            Ok(true) => return,
            Ok(false) => {
                tracing::info!(job = %id, "the job was deleted or taken over before it finished");
                return;
            }
            Err(e) if Instant::now() + wait < give_up => {
                tracing::warn!(job = %id, error = %e, retry_in_s = wait.as_secs(), "cannot store the job's result");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(16));
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "gave up storing the job's result; it runs again elsewhere");
                return;
            }
        }
    }
}

/// Runs one claimed job to its stored end, unless it stops being this worker's job
/// (cancelled, or its lease lost), which cancels the generation.
async fn run_job(
    state: &AppState,
    store: &dyn JobStore,
    config: &RunnerConfig,
    job: Claimed,
) -> Result<(), StoreError> {
    let Claimed { id, request } = job;
    let lease = config.lease.as_millis() as i64;
    let failed = |e: ApiError| {
        let (status, code) = e.status_and_code();
        Outcome::Failed(JobError { status: status.as_u16(), code, message: e.to_string() })
    };
    let parsed = request.to_raw().map_err(|e| ApiError::BadRequest(e.0)).and_then(|raw| parse_raw(raw, state.config()));
    let request = match parsed {
        Ok(request) => request,
        Err(e) => {
            store.finish(&id, &config.worker, now_ms(), failed(e)).await?;
            return Ok(());
        }
    };
    tracing::info!(job = %id, "running a stored job");
    let parameters = sdxl_engine::png::parameters_text(&request, &state.config().model_name);
    let deadline = Instant::now() + state.config().request_timeout;
    let ahead = Submission { placement: Placement::Ahead, ..Submission::default() };
    let mut ticket = match state.queue().submit_with(request, deadline, ahead) {
        Ok(ticket) => ticket,
        // draining: the lease runs out and the job goes to another server, or to this one
        // after a restart
        Err(e) => {
            tracing::info!(job = %id, error = %e, "cannot run the claimed job now");
            return Ok(());
        }
    };
    let (mut step, mut total) = (0, 0);
    let mut renewal = tokio::time::interval(Duration::from_secs(1).min(config.lease / 3));
    // the lease as this server last renewed it: a store that does not answer for a while
    // does not stop the generation, only a lease that has really run out does
    let mut lease_until = Instant::now() + config.lease;
    let outcome = loop {
        tokio::select! {
            update = ticket.next() => match update {
                Update::Event(Event::Step { step: done, total: of, .. }) => (step, total) = (done as u64, of as u64),
                Update::Event(Event::Queued { .. }) => {}
                Update::Done(Ok(done)) => break match encode_png(done.image, parameters).await {
                    Ok(png) => Outcome::Done(png),
                    Err(e) => failed(e),
                },
                Update::Done(Err(e)) => break failed(ApiError::from_engine(e)),
            },
            _ = renewal.tick() => {
                let renewed = store.renew(&id, &config.worker, now_ms() + lease, step, total).await;
                state.store_answered(renewed.is_ok());
                match renewed {
                    Ok(true) => lease_until = Instant::now() + config.lease,
                    Ok(false) => {
                        tracing::info!(job = %id, "the job was deleted or taken over; stopping it");
                        return Ok(()); // dropping the ticket stops the generation
                    }
                    Err(e) if Instant::now() < lease_until => {
                        tracing::warn!(job = %id, error = %e, "cannot renew the lease; the job goes on, retrying");
                    }
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "the lease ran out while the store did not answer; stopping");
                        return Ok(());
                    }
                }
            }
        }
    };
    store_outcome(state, store, config, &id, (step, total), outcome).await;
    Ok(())
}
