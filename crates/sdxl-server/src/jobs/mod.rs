//! Durable asynchronous jobs: a request is stored, any server sharing the store claims it
//! with a lease, renews the lease while it generates, and stores the PNG; the client polls.
//!
//! The store is one small trait with two implementations: SQLite (embedded, one machine) and
//! PostgreSQL (a fleet; claims use `FOR UPDATE SKIP LOCKED`). A job whose worker died is
//! claimed again once its lease runs out. The request is stored with its seed fixed, so a
//! job run twice gives the same bytes. Times are milliseconds since the Unix epoch from the
//! store's clock (see [`Clock`]): a server whose clock is wrong neither expires another's
//! result early nor takes over a live lease.
//!
//! Every job records its owner (a hash of the API key that stored it, see
//! [`crate::auth::Owner`]); jobs stored before owners were recorded have none. The store
//! answers any job by id; who may see it is decided in [`crate::job_api`], and a delete
//! names its owner so that it cannot remove another's.

mod postgres;
mod request;
pub mod runner;
mod sql;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use request::StoredRequest;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        Ok(match text {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "done" => Status::Done,
            "failed" => Status::Failed,
            other => return Err(StoreError(format!("unknown job status {other:?} in the store"))),
        })
    }
}

/// A failed job's answer: the HTTP status and Workers AI error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub status: u16,
    pub code: u32,
    pub message: String,
}

/// What the store knows about a job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: String,
    /// Who stored it; `None` for jobs stored before owners were recorded.
    pub owner: Option<String>,
    pub status: Status,
    /// Queued jobs ahead of this one (queued jobs only).
    pub position: Option<u64>,
    pub step: u64,
    pub total: u64,
    pub seed: u64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// How many times a worker has claimed it (more than 1: a worker died or lost its lease).
    pub attempts: u64,
    pub error: Option<JobError>,
}

/// A job a worker has claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub request: StoredRequest,
    /// Claims so far, this one included.
    pub attempts: u64,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The PNG.
    Done(Vec<u8>),
    Failed(JobError),
}

/// Why a claimed job goes back to the store unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// It never started (the server is shutting down): queued again, the claim not counted.
    Unstarted,
    /// The server failed it for its own reasons (a backend or device error): claimable again
    /// after the backoff of a lapsed lease, the claim counted.
    AfterServerFault,
}

/// The time a store call is made at: the store's own clock, the one clock of a fleet
/// (PostgreSQL's `now()`, or the machine's for SQLite), or a fixed time (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    Store,
    At(i64),
}

impl Clock {
    /// The statement parameter: `NULL` stands for the store's clock.
    pub(crate) fn param(self) -> Option<i64> {
        match self {
            Clock::Store => None,
            Clock::At(ms) => Some(ms),
        }
    }
}

/// A job to store.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub request: &'a StoredRequest,
    /// The client's `Idempotency-Key` and a hash of the body it came with.
    pub idempotency: Option<Idempotency<'a>>,
    /// Queued jobs past which it is refused.
    pub limits: QueueLimits,
}

#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub body_hash: &'a str,
}

/// Bounds on the stored queue: jobs waiting to be claimed, in all and of one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub total: u64,
    pub per_owner: u64,
}

impl QueueLimits {
    pub const NONE: QueueLimits = QueueLimits { total: u64::MAX, per_owner: u64::MAX };
}

/// What [`JobStore::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Stored as a new queued job.
    Queued,
    /// The owner already stored this body under this idempotency key: that job's id.
    Existing(String),
    /// The owner already used this idempotency key for a different body.
    KeyReused,
    /// Refused: the queue holds `limit` jobs already, of this owner if `per_owner`.
    Full { limit: u64, per_owner: bool },
}

/// What a sweep failed: jobs given up after their attempts, and jobs queued too long.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub gave_up: u64,
    pub too_old: u64,
}

/// The rules of [`JobStore::sweep`].
#[derive(Debug, Clone, Copy)]
pub struct SweepRules {
    /// Claims after which a job whose lease ran out is failed with [`GAVE_UP_CODE`].
    pub max_attempts: u32,
    /// Milliseconds after which a job never claimed is failed with [`TOO_OLD_CODE`].
    pub max_queued_age_ms: i64,
}

/// The store's size, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Jobs waiting to be claimed.
    pub queued: u64,
    /// Bytes of stored requests and images.
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A durable job queue shared by every server that opens it. Every time it compares or
/// records is read from `now`, [`Clock::Store`] in a server: servers whose clocks disagree
/// still agree on leases and expiry.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new queued job, unless the queue is full or the idempotency key was used.
    async fn submit(&self, job: &NewJob<'_>, now: Clock) -> Result<Submitted, StoreError>;
    /// Stores a job that has already run elsewhere (an image answered by URL): `done`, with
    /// `image`, kept until it expires like any finished job.
    async fn store_done(
        &self,
        id: &str,
        owner: &str,
        request: &StoredRequest,
        image: Vec<u8>,
        now: Clock,
    ) -> Result<(), StoreError>;
    /// Fails every job whose lease has run out after `max_attempts` claims (each time, the
    /// server running it stopped: a job that kills its server must not crash-loop the fleet),
    /// and every job queued longer than `max_queued_age_ms`.
    async fn sweep(&self, now: Clock, rules: SweepRules) -> Result<Swept, StoreError>;
    /// Claims a job for `worker` for `lease_ms`: the oldest queued one; else the oldest
    /// running one whose lease ran out at least `attempts × lease_ms` ago, a backoff that
    /// grows with each lapse, so a job whose server died waits behind every job that never ran.
    async fn claim(&self, worker: &str, now: Clock, lease_ms: i64) -> Result<Option<Claimed>, StoreError>;
    /// Extends `worker`'s lease to `lease_ms` from now and records its progress; `false` if
    /// the job is no longer `worker`'s to run (deleted, or claimed by another after the lease
    /// ran out). A lease that ran out while the store did not answer is still renewed if
    /// nobody took the job meanwhile.
    async fn renew(
        &self,
        id: &str,
        worker: &str,
        now: Clock,
        lease_ms: i64,
        step: u64,
        total: u64,
    ) -> Result<bool, StoreError>;
    /// Gives `worker`'s job back unfinished; `false` if it is no longer its job.
    async fn release(&self, id: &str, worker: &str, now: Clock, why: Release) -> Result<bool, StoreError>;
    /// Records how `worker`'s job ended; `false` (nothing stored) if it is no longer its job.
    async fn finish(&self, id: &str, worker: &str, now: Clock, outcome: Outcome) -> Result<bool, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// The PNG of a done job.
    async fn image(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes `owner`'s job and its result (a job without an owner too when
    /// `or_ownerless`); a running job's worker stops at its next renewal. Answers the status
    /// it had, `None` if there was no such job of that owner.
    async fn delete(&self, id: &str, owner: &str, or_ownerless: bool) -> Result<Option<Status>, StoreError>;
    /// Deletes jobs that finished more than `ttl_ms` ago; answers how many.
    async fn expire(&self, now: Clock, ttl_ms: i64) -> Result<u64, StoreError>;
    /// Jobs waiting and bytes stored (a scan of the table: call it now and then, not per
    /// request).
    async fn stats(&self) -> Result<StoreStats, StoreError>;
}

/// The Workers AI-style code of a job given up after its attempts (HTTP 500).
pub const GAVE_UP_CODE: u32 = 3031;

/// The stored message of a job given up after `attempts`.
pub fn gave_up_message(attempts: u32) -> String {
    format!("gave up after {attempts} attempts; the server running it stopped each time")
}

/// The code of a job that waited in the queue past `--job-max-queued-age` (HTTP 408).
pub const TOO_OLD_CODE: u32 = 3032;

/// The stored message of a job never started within `max_age_ms`.
pub fn too_old_message(max_age_ms: i64) -> String {
    format!("not started within {} s of being queued (`--job-max-queued-age`); submit it again", max_age_ms / 1000)
}

/// Opens (creating its table if needed) the store at `url`: `sqlite://PATH` or
/// `postgres://…` / `postgresql://…`.
pub async fn open(url: &str) -> Result<Arc<dyn JobStore>, StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url).await?))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(sqlite::SqliteStore::open(std::path::Path::new(path)).await?))
    } else {
        Err(StoreError(format!("`--jobs` must be sqlite://PATH or postgres://…, got {url:?}")))
    }
}

/// A new job id: 128 bits from the operating system's CSPRNG, in hex. Knowing an id is not
/// enough to read a job (it must also be the caller's), but ids are not guessable either.
///
/// # Panics
/// If the operating system has no random source, which no supported platform lacks.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system provides random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_128_random_bits() {
        let (a, b) = (super::new_id(), super::new_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
