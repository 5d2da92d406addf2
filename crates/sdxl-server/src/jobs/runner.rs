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

use super::{Claimed, Clock, JobError, JobStore, Outcome, Release, StoreError, SweepRules};
use crate::error::{is_server_fault, ApiError};
use crate::generation::{encode_png, parse_raw};
use crate::AppState;

/// How long a busy server leaves a stored job to the fleet's idle servers before it claims
/// the job itself.
pub const YIELD_TO_IDLE_SERVERS: Duration = Duration::from_secs(2);

/// How often the runner fails jobs past their attempts or their queued age.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How often the store's size is read for `/metrics`.
const STATS_EVERY: Duration = Duration::from_secs(5);

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
    /// Claims after which a job whose lease keeps running out (or that keeps failing for the
    /// server's own reasons) is failed.
    pub max_attempts: u32,
    /// How long a job may wait unclaimed before it is failed.
    pub max_queued_age: Duration,
}

impl Default for RunnerConfig {
    /// `sdxl serve`'s defaults.
    fn default() -> Self {
        RunnerConfig {
            worker: worker_name(),
            lease: Duration::from_secs(30),
            ttl: Duration::from_secs(86_400),
            poll: Duration::from_millis(250),
            max_attempts: 3,
            max_queued_age: Duration::from_secs(86_400),
        }
    }
}

impl RunnerConfig {
    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }
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
    let stats = tokio::spawn(watch_size(state.clone(), store.clone()));
    let rules =
        SweepRules { max_attempts: config.max_attempts, max_queued_age_ms: config.max_queued_age.as_millis() as i64 };
    let mut busy_since: Option<Instant> = None;
    let mut last_sweep: Option<Instant> = None;
    while !state.draining() {
        let busy = state.queue().busy() || state.queue().waiting() > 0;
        if !busy {
            busy_since = None;
        } else if busy_since.get_or_insert_with(Instant::now).elapsed() < YIELD_TO_IDLE_SERVERS {
            tokio::time::sleep(config.poll).await;
            continue;
        }
        if last_sweep.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(Instant::now());
            sweep(store.as_ref(), rules).await;
        }
        if state.failing() {
            // this server's generations keep failing: leave the jobs to the rest of the fleet
            tokio::time::sleep(config.poll).await;
            continue;
        }
        let claimed = store.claim(&config.worker, Clock::Store, config.lease_ms()).await;
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
    stats.abort();
}

/// Fails the jobs past their attempts or their queued age, and counts them.
async fn sweep(store: &dyn JobStore, rules: SweepRules) {
    use sdxl_engine::metric_names::{JOBS_TOTAL, OUTCOME};
    match store.sweep(Clock::Store, rules).await {
        Ok(swept) => {
            if swept.gave_up > 0 {
                tracing::warn!(
                    jobs = swept.gave_up,
                    attempts = rules.max_attempts,
                    "gave up on jobs whose server stopped each time"
                );
                metrics::counter!(JOBS_TOTAL, OUTCOME => "gave_up").increment(swept.gave_up);
            }
            if swept.too_old > 0 {
                tracing::warn!(jobs = swept.too_old, "failed jobs that waited past --job-max-queued-age");
                metrics::counter!(JOBS_TOTAL, OUTCOME => "too_old").increment(swept.too_old);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot sweep the job store"),
    }
}

/// Deletes finished jobs past their TTL, at start and then every min(30 s, TTL), whether or
/// not a job is running, until the server drains.
async fn expire(state: AppState, store: Arc<dyn JobStore>, ttl: Duration) {
    let mut ticks = tokio::time::interval(Duration::from_secs(30).min(ttl).max(Duration::from_millis(100)));
    while !state.draining() {
        ticks.tick().await;
        match store.expire(Clock::Store, ttl.as_millis() as i64).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "deleted finished jobs past their TTL"),
            Err(e) => tracing::warn!(error = %e, "cannot delete expired jobs"),
        }
    }
}

/// Reads the store's backlog and size into the `/metrics` gauges every [`STATS_EVERY`], so
/// that a scrape never queries the store; also tells `/ready` when an unreachable store
/// answers again while the runner is busy.
async fn watch_size(state: AppState, store: Arc<dyn JobStore>) {
    let mut ticks = tokio::time::interval(STATS_EVERY);
    loop {
        ticks.tick().await;
        let stats = store.stats().await;
        state.store_answered(stats.is_ok());
        match stats {
            Ok(stats) => {
                metrics::gauge!(crate::metrics::JOBS_QUEUED).set(stats.queued as f64);
                metrics::gauge!(crate::metrics::JOBS_STORED_BYTES).set(stats.bytes as f64);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the job store's size"),
        }
    }
}

/// How long a finished job's result is kept in memory, retrying, while the store does not
/// answer.
const FINISH_RETRY_FOR: Duration = Duration::from_secs(600);

/// Stores how a job ended (or gives it back), retrying (1 s, doubling to 16 s) while the
/// store does not answer, so that a finished image outlives a store outage of up to
/// [`FINISH_RETRY_FOR`].
async fn store_outcome(
    state: &AppState,
    store: &dyn JobStore,
    config: &RunnerConfig,
    id: &str,
    (step, total): (u64, u64),
    outcome: Result<Outcome, Release>,
) {
    let give_up = Instant::now() + FINISH_RETRY_FOR;
    let mut wait = Duration::from_secs(1);
    loop {
        let stored = match &outcome {
            // the last progress first (renewals come once a second; a short job may have had none)
            Ok(outcome) => match store.renew(id, &config.worker, Clock::Store, config.lease_ms(), step, total).await {
                Ok(true) => store.finish(id, &config.worker, Clock::Store, outcome.clone()).await,
                other => other,
            },
            Err(why) => store.release(id, &config.worker, Clock::Store, *why).await,
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
/// (cancelled, or taken over after its lease ran out), which cancels the generation. A job
/// that fails for the server's own reasons (shutting down, a backend or device error) goes
/// back to the store rather than being failed, within the same attempts as a lapsed lease.
async fn run_job(
    state: &AppState,
    store: &dyn JobStore,
    config: &RunnerConfig,
    job: Claimed,
) -> Result<(), StoreError> {
    let Claimed { id, request, attempts } = job;
    let failed = |e: ApiError| {
        let (status, code) = e.status_and_code();
        Outcome::Failed(JobError { status: status.as_u16(), code, message: e.to_string() })
    };
    let parsed = request.to_raw().map_err(|e| ApiError::BadRequest(e.0)).and_then(|raw| parse_raw(raw, state.config()));
    let request = match parsed {
        Ok(request) => request,
        Err(e) => {
            store.finish(&id, &config.worker, Clock::Store, failed(e)).await?;
            return Ok(());
        }
    };
    tracing::info!(job = %id, attempts, "running a stored job");
    let parameters = sdxl_engine::png::parameters_text(&request, &state.config().model_name);
    let deadline = Instant::now() + state.config().request_timeout;
    let ahead = Submission { placement: Placement::Ahead, ..Submission::default() };
    let mut ticket = match state.queue().submit_with(request, deadline, ahead) {
        Ok(ticket) => ticket,
        Err(e) => {
            tracing::info!(job = %id, error = %e, "cannot run the claimed job now; it goes back to the queue");
            store_outcome(state, store, config, &id, (0, 0), Err(Release::Unstarted)).await;
            return Ok(());
        }
    };
    let (mut step, mut total) = (0, 0);
    let mut renewal = tokio::time::interval(Duration::from_secs(1).min(config.lease / 3));
    let outcome = loop {
        tokio::select! {
            update = ticket.next() => match update {
                Update::Event(Event::Step { step: done, total: of, .. }) => (step, total) = (done as u64, of as u64),
                Update::Event(Event::Queued { .. }) => {}
                Update::Done(Ok(done)) => {
                    state.generation_ended(false);
                    break Ok(match encode_png(done.image, parameters).await {
                        Ok(png) => Outcome::Done(png),
                        Err(e) => failed(e),
                    });
                }
                Update::Done(Err(sdxl_engine::Error::ShuttingDown)) => break Err(Release::Unstarted),
                Update::Done(Err(e)) => {
                    let fault = is_server_fault(&e);
                    state.generation_ended(fault);
                    if fault && attempts < u64::from(config.max_attempts) {
                        tracing::warn!(job = %id, error = %e, attempts, "the server failed the job; it runs again");
                        break Err(Release::AfterServerFault);
                    }
                    break Ok(failed(ApiError::from_engine(e)));
                }
            },
            _ = renewal.tick() => {
                // a store that does not answer does not stop the generation: only the store
                // saying the job is no longer ours does (once it answers again)
                let renewed = store.renew(&id, &config.worker, Clock::Store, config.lease_ms(), step, total).await;
                state.store_answered(renewed.is_ok());
                match renewed {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(job = %id, "the job was deleted or taken over; stopping it");
                        return Ok(()); // dropping the ticket stops the generation
                    }
                    Err(e) => tracing::warn!(job = %id, error = %e, "cannot renew the lease; the job goes on, retrying"),
                }
            }
        }
    };
    store_outcome(state, store, config, &id, (step, total), outcome).await;
    Ok(())
}
