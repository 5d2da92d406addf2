//! The job store in PostgreSQL, for a fleet: every server opens the same database, and a
//! claim locks the row it takes with `FOR UPDATE SKIP LOCKED`, so servers claiming at once
//! take different jobs without waiting for each other. The statements are shared with
//! SQLite ([`super::sql`]); times are PostgreSQL's `now()`, the fleet's one clock.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use super::sql::{sql_job_store, Statements, ADDED_COLUMNS, IDEMPOTENCY_INDEX, POSTGRES};
use super::StoreError;

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
    error_message TEXT,
    idempotency_key TEXT,
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS sdxl_jobs_status_seq ON sdxl_jobs (status, seq);
CREATE INDEX IF NOT EXISTS sdxl_jobs_finished_at ON sdxl_jobs (finished_at);";

/// Servers starting together must not race to create the table: `CREATE … IF NOT EXISTS`
/// is not atomic in PostgreSQL. An advisory lock (any fixed key) serialises them.
const SCHEMA_LOCK: i64 = 0x5d71_6a0b;

pub struct PostgresStore {
    pool: PgPool,
    sql: Statements,
}

impl PostgresStore {
    /// Connects to `url`, creating the table if missing.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        // a short acquire timeout: while the database is down, requests get their 503 within
        // seconds rather than holding a connection slot for long
        let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(3)).connect(url).await?;
        let mut transaction = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK).execute(&mut *transaction).await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *transaction).await?;
        for (column, kind) in ADDED_COLUMNS {
            sqlx::raw_sql(&format!("ALTER TABLE sdxl_jobs ADD COLUMN IF NOT EXISTS {column} {kind}"))
                .execute(&mut *transaction)
                .await?;
        }
        sqlx::raw_sql(IDEMPOTENCY_INDEX).execute(&mut *transaction).await?;
        transaction.commit().await?;
        Ok(Self { pool, sql: Statements::new(&POSTGRES) })
    }
}

sql_job_store!(PostgresStore);
