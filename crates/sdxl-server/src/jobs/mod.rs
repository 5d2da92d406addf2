//! Durable asynchronous jobs: a request is stored, any server sharing the store claims it
//! with a lease, renews the lease while it generates, and stores the PNG; the client polls.
//!
//! The store is one small trait with two implementations: SQLite (embedded, one machine) and
//! PostgreSQL (a fleet; claims use `FOR UPDATE SKIP LOCKED`). A job whose worker died is
//! claimed again once its lease runs out. The request is stored with its seed fixed, so a
//! job run twice gives the same bytes. Times are milliseconds since the Unix epoch from the
//! servers' clocks, which a fleet keeps in sync well within a lease.
//!
//! Every job records its owner (a hash of the API key that stored it, see
//! [`crate::auth::Owner`]); jobs stored before owners were recorded have none. The store
//! answers any job by id; who may see it is decided in [`crate::job_api`], and a delete
//! names its owner so that it cannot remove another's.

mod postgres;
mod request;
pub mod runner;
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
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The PNG.
    Done(Vec<u8>),
    Failed(JobError),
}

#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(pub String);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A durable job queue shared by every server that opens it.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new queued job for `owner`.
    async fn submit(&self, id: &str, owner: Option<&str>, request: &StoredRequest, now: i64) -> Result<(), StoreError>;
    /// Stores a job that has already run elsewhere (an image answered by URL): `done`, with
    /// `image`, kept until it expires like any finished job.
    async fn store_done(
        &self,
        id: &str,
        owner: Option<&str>,
        request: &StoredRequest,
        image: Vec<u8>,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Fails every job whose lease has run out after `max_attempts` claims (each time, the
    /// server running it stopped: a job that kills its server must not crash-loop the fleet),
    /// with [`GAVE_UP_CODE`]; answers how many.
    async fn give_up(&self, now: i64, max_attempts: u32) -> Result<u64, StoreError>;
    /// Claims a job for `worker` until `lease_until`: the oldest queued one; else the oldest
    /// running one whose lease ran out at least `attempts × lease` ago (the lease being
    /// `lease_until - now`), a backoff that grows with each lapse, so a job whose server died
    /// waits behind every job that never ran.
    async fn claim(&self, worker: &str, now: i64, lease_until: i64) -> Result<Option<Claimed>, StoreError>;
    /// Extends `worker`'s lease and records its progress; `false` if the job is no longer
    /// `worker`'s to run (deleted, or claimed by another after the lease ran out).
    async fn renew(&self, id: &str, worker: &str, lease_until: i64, step: u64, total: u64) -> Result<bool, StoreError>;
    /// Records how `worker`'s job ended; `false` (nothing stored) if it is no longer its job.
    async fn finish(&self, id: &str, worker: &str, now: i64, outcome: Outcome) -> Result<bool, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// The PNG of a done job.
    async fn image(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Deletes `owner`'s job and its result (a job without an owner too when
    /// `or_ownerless`); a running job's worker stops at its next renewal. Answers the status
    /// it had, `None` if there was no such job of that owner.
    async fn delete(&self, id: &str, owner: &str, or_ownerless: bool) -> Result<Option<Status>, StoreError>;
    /// Deletes jobs that finished before `before`; answers how many.
    async fn expire(&self, before: i64) -> Result<u64, StoreError>;
    /// Jobs waiting to be claimed.
    async fn queued(&self) -> Result<u64, StoreError>;
}

/// The Workers AI-style code of a job given up after its attempts (HTTP 500).
pub const GAVE_UP_CODE: u32 = 3031;

/// The stored message of a job given up after `attempts`.
pub fn gave_up_message(attempts: u32) -> String {
    format!("gave up after {attempts} attempts; the server running it stopped each time")
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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
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

/// Adds the `owner` column to a table made before jobs had owners (`ALTER TABLE … ADD
/// COLUMN` keeps every row; they are left without an owner).
pub(crate) const ADD_OWNER: &str = "ALTER TABLE sdxl_jobs ADD COLUMN owner TEXT";

/// `(seq, id, owner, status, step, total, seed, created_at, started_at, finished_at, attempts,
/// error_status, error_code, error_message)`: the columns both stores select for a record.
pub(crate) const RECORD_COLUMNS: &str = "seq, id, owner, status, step, total, seed, created_at, started_at, \
                                         finished_at, attempts, error_status, error_code, error_message";

/// A record from a row of [`RECORD_COLUMNS`], with its queue position.
pub(crate) fn record_from_row<R: sqlx::Row>(row: &R, position: Option<u64>) -> Result<JobRecord, StoreError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database>,
{
    let error_status: Option<i64> = row.try_get("error_status")?;
    let error = match error_status {
        Some(status) => Some(JobError {
            status: status as u16,
            code: row.try_get::<Option<i64>, _>("error_code")?.unwrap_or(0) as u32,
            message: row.try_get::<Option<String>, _>("error_message")?.unwrap_or_default(),
        }),
        None => None,
    };
    let seed: String = row.try_get("seed")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        status: Status::parse(&row.try_get::<String, _>("status")?)?,
        position,
        step: row.try_get::<i64, _>("step")? as u64,
        total: row.try_get::<i64, _>("total")? as u64,
        seed: seed.parse().map_err(|_| StoreError(format!("bad seed {seed:?} in the store")))?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        attempts: row.try_get::<i64, _>("attempts")? as u64,
        error,
    })
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
