//! The job store in PostgreSQL, for a fleet: every server opens the same database, and a
//! claim locks the row it takes with `FOR UPDATE SKIP LOCKED`, so servers claiming at once
//! take different jobs without waiting for each other.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use super::RECORD_COLUMNS;
use super::{record_from_row, Claimed, JobRecord, JobStore, Outcome, Status, StoreError, StoredRequest};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sdxl_jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    request TEXT NOT NULL,
    seed TEXT NOT NULL,
    status TEXT NOT NULL,
    worker TEXT,
    lease_until BIGINT,
    step BIGINT NOT NULL DEFAULT 0,
    total BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    image BYTEA,
    error_status BIGINT,
    error_code BIGINT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS sdxl_jobs_status_seq ON sdxl_jobs (status, seq);
CREATE INDEX IF NOT EXISTS sdxl_jobs_finished_at ON sdxl_jobs (finished_at);";

/// Servers starting together must not race to create the table: `CREATE … IF NOT EXISTS`
/// is not atomic in PostgreSQL. An advisory lock (any fixed key) serialises them.
const SCHEMA_LOCK: i64 = 0x5d71_6a0b;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url`, creating the table if missing.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool =
            PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
        let mut transaction = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK).execute(&mut *transaction).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *transaction).await?;
        // tables made before jobs had owners
        sqlx::raw_sql(&super::ADD_OWNER.replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS"))
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn submit(&self, id: &str, owner: Option<&str>, request: &StoredRequest, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sdxl_jobs (id, owner, request, seed, status, created_at) VALUES ($1, $5, $2, $3, 'queued', $4)",
        )
        .bind(id)
        .bind(request.to_json())
        .bind(&request.seed)
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn store_done(
        &self,
        id: &str,
        owner: Option<&str>,
        request: &StoredRequest,
        image: Vec<u8>,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sdxl_jobs (id, owner, request, seed, status, image, created_at, started_at, finished_at)
             VALUES ($1, $2, $3, $4, 'done', $5, $6, $6, $6)",
        )
        .bind(id)
        .bind(owner)
        .bind(request.to_json())
        .bind(&request.seed)
        .bind(image)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn give_up(&self, now: i64, max_attempts: u32) -> Result<u64, StoreError> {
        let failed = sqlx::query(
            "UPDATE sdxl_jobs SET status = 'failed', error_status = 500, error_code = $1, error_message = $2,
                 finished_at = $3, lease_until = NULL
             WHERE status = 'running' AND lease_until < $3 AND attempts >= $4",
        )
        .bind(i64::from(super::GAVE_UP_CODE))
        .bind(super::gave_up_message(max_attempts))
        .bind(now)
        .bind(i64::from(max_attempts))
        .execute(&self.pool)
        .await?;
        Ok(failed.rows_affected())
    }

    async fn claim(&self, worker: &str, now: i64, lease_until: i64) -> Result<Option<Claimed>, StoreError> {
        let row = sqlx::query(
            "UPDATE sdxl_jobs SET status = 'running', worker = $1, lease_until = $2, step = 0, total = 0,
                 attempts = attempts + 1, started_at = $3
             WHERE seq = (SELECT seq FROM sdxl_jobs
                          WHERE status = 'queued'
                             OR (status = 'running' AND lease_until + ($2 - $3) * attempts < $3)
                          ORDER BY status = 'running', seq LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, request",
        )
        .bind(worker)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(Claimed {
                id: row.try_get("id")?,
                request: StoredRequest::from_json(&row.try_get::<String, _>("request")?)?,
            })),
            None => Ok(None),
        }
    }

    async fn renew(&self, id: &str, worker: &str, lease_until: i64, step: u64, total: u64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE sdxl_jobs SET lease_until = $1, step = $2, total = $3
             WHERE id = $4 AND worker = $5 AND status = 'running'",
        )
        .bind(lease_until)
        .bind(step as i64)
        .bind(total as i64)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish(&self, id: &str, worker: &str, now: i64, outcome: Outcome) -> Result<bool, StoreError> {
        let (status, image, error) = match outcome {
            Outcome::Done(png) => ("done", Some(png), None),
            Outcome::Failed(error) => ("failed", None, Some(error)),
        };
        let done = sqlx::query(
            "UPDATE sdxl_jobs SET status = $1, image = $2, error_status = $3, error_code = $4, error_message = $5,
                 finished_at = $6, lease_until = NULL
             WHERE id = $7 AND worker = $8 AND status = 'running'",
        )
        .bind(status)
        .bind(image)
        .bind(error.as_ref().map(|e| i64::from(e.status)))
        .bind(error.as_ref().map(|e| i64::from(e.code)))
        .bind(error.map(|e| e.message))
        .bind(now)
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {RECORD_COLUMNS} FROM sdxl_jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let position = if row.try_get::<String, _>("status")? == "queued" {
            let seq: i64 = row.try_get("seq")?;
            let ahead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued' AND seq < $1")
                .bind(seq)
                .fetch_one(&self.pool)
                .await?;
            Some(ahead as u64)
        } else {
            None
        };
        record_from_row(&row, position).map(Some)
    }

    async fn image(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let image: Option<Option<Vec<u8>>> =
            sqlx::query_scalar("SELECT image FROM sdxl_jobs WHERE id = $1 AND status = 'done'")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(image.flatten())
    }

    async fn delete(&self, id: &str, owner: &str, or_ownerless: bool) -> Result<Option<Status>, StoreError> {
        let status: Option<String> = sqlx::query_scalar(
            "DELETE FROM sdxl_jobs WHERE id = $1 AND (owner = $2 OR (owner IS NULL AND $3)) RETURNING status",
        )
        .bind(id)
        .bind(owner)
        .bind(or_ownerless)
        .fetch_optional(&self.pool)
        .await?;
        status.as_deref().map(Status::parse).transpose()
    }

    async fn expire(&self, before: i64) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM sdxl_jobs WHERE finished_at IS NOT NULL AND finished_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected())
    }

    async fn queued(&self) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued'").fetch_one(&self.pool).await?;
        Ok(count as u64)
    }
}
