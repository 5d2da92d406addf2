//! The job store in an SQLite file: the default, for one machine. SQLite runs one writing
//! statement at a time, so a claim (one `UPDATE … RETURNING`) is atomic without row locks.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;

use super::RECORD_COLUMNS;
use super::{record_from_row, Claimed, JobRecord, JobStore, Outcome, Status, StoreError, StoredRequest};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS sdxl_jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,
    request TEXT NOT NULL,
    seed TEXT NOT NULL,
    status TEXT NOT NULL,
    worker TEXT,
    lease_until INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    image BLOB,
    error_status INTEGER,
    error_code INTEGER,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS sdxl_jobs_status_seq ON sdxl_jobs (status, seq);
CREATE INDEX IF NOT EXISTS sdxl_jobs_finished_at ON sdxl_jobs (finished_at);";

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens `path`, creating the file, its directory and the table if missing.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            // WAL: readers (status polls) never wait for the writer; NORMAL sync is durable
            // across process crashes, which is what a restart needs
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let has_owner: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info('sdxl_jobs') WHERE name = 'owner'")
                .fetch_one(&pool)
                .await?;
        if has_owner == 0 {
            sqlx::raw_sql(super::ADD_OWNER).execute(&pool).await?;
        }
        Ok(Self { pool })
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn submit(&self, id: &str, owner: Option<&str>, request: &StoredRequest, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sdxl_jobs (id, owner, request, seed, status, created_at) VALUES (?1, ?5, ?2, ?3, 'queued', ?4)",
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
             VALUES (?1, ?2, ?3, ?4, 'done', ?5, ?6, ?6, ?6)",
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
            "UPDATE sdxl_jobs SET status = 'failed', error_status = 500, error_code = ?1, error_message = ?2,
                 finished_at = ?3, lease_until = NULL
             WHERE status = 'running' AND lease_until < ?3 AND attempts >= ?4",
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
            "UPDATE sdxl_jobs SET status = 'running', worker = ?1, lease_until = ?2, step = 0, total = 0,
                 attempts = attempts + 1, started_at = ?3
             WHERE seq = (SELECT seq FROM sdxl_jobs
                          WHERE status = 'queued'
                             OR (status = 'running' AND lease_until + (?2 - ?3) * attempts < ?3)
                          ORDER BY status = 'running', seq LIMIT 1)
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
            "UPDATE sdxl_jobs SET lease_until = ?1, step = ?2, total = ?3
             WHERE id = ?4 AND worker = ?5 AND status = 'running'",
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
            "UPDATE sdxl_jobs SET status = ?1, image = ?2, error_status = ?3, error_code = ?4, error_message = ?5,
                 finished_at = ?6, lease_until = NULL
             WHERE id = ?7 AND worker = ?8 AND status = 'running'",
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
        let row = sqlx::query(&format!("SELECT {RECORD_COLUMNS} FROM sdxl_jobs WHERE id = ?1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let position = if row.try_get::<String, _>("status")? == "queued" {
            let seq: i64 = row.try_get("seq")?;
            let ahead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued' AND seq < ?1")
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
            sqlx::query_scalar("SELECT image FROM sdxl_jobs WHERE id = ?1 AND status = 'done'")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(image.flatten())
    }

    async fn delete(&self, id: &str, owner: &str, or_ownerless: bool) -> Result<Option<Status>, StoreError> {
        let status: Option<String> = sqlx::query_scalar(
            "DELETE FROM sdxl_jobs WHERE id = ?1 AND (owner = ?2 OR (owner IS NULL AND ?3)) RETURNING status",
        )
        .bind(id)
        .bind(owner)
        .bind(or_ownerless)
        .fetch_optional(&self.pool)
        .await?;
        status.as_deref().map(Status::parse).transpose()
    }

    async fn expire(&self, before: i64) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM sdxl_jobs WHERE finished_at IS NOT NULL AND finished_at < ?1")
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

#[cfg(test)]
mod tests {
    use sdxl_engine::{NoiseSource, RawRequest};

    use super::*;
    use crate::jobs::{JobError, Status};

    fn request(prompt: &str, seed: u64) -> StoredRequest {
        let raw = RawRequest {
            prompt: prompt.into(),
            negative_prompt: None,
            width: Some(256),
            height: Some(256),
            steps: 4,
            guidance: 0.0,
            noise: NoiseSource::Seed(seed),
            image: None,
            mask: None,
            strength: None,
        };
        StoredRequest::new(&raw, seed)
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("data/jobs.db")).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn jobs_are_claimed_in_order_and_each_once() {
        let (_dir, store) = store().await;
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            store.submit(id, Some("owner"), &request(id, i as u64), 100).await.unwrap();
        }
        assert_eq!(store.get("c").await.unwrap().unwrap().position, Some(2));
        assert_eq!(store.queued().await.unwrap(), 3);
        let first = store.claim("w1", 200, 10_000).await.unwrap().unwrap();
        let second = store.claim("w2", 200, 10_000).await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), second.id.as_str()), ("a", "b"));
        assert_eq!(first.request, request("a", 0), "the request comes back as stored");
        let c = store.get("c").await.unwrap().unwrap();
        assert_eq!((c.status, c.position), (Status::Queued, Some(0)));
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.position, a.attempts, a.started_at), (Status::Running, None, 1, Some(200)));
        assert_eq!(store.queued().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_claimed_again_and_the_first_worker_loses_it() {
        let (_dir, store) = store().await;
        store.submit("a", Some("owner"), &request("a", 1), 0).await.unwrap();
        store.claim("dead", 0, 1_000).await.unwrap().unwrap();
        assert!(store.renew("a", "dead", 1_500, 1, 4).await.unwrap(), "its own lease renews");
        assert!(store.claim("live", 1_000, 11_000).await.unwrap().is_none(), "the lease still runs");
        // lapsed at 1 500, then one lease (10 000) of backoff for its one attempt
        assert!(store.claim("live", 11_000, 21_000).await.unwrap().is_none(), "backing off");
        let again = store.claim("live", 11_600, 21_600).await.unwrap().expect("the lapsed job is claimed again");
        assert_eq!(again.id, "a");
        assert!(!store.renew("a", "dead", 12_000, 2, 4).await.unwrap(), "the first worker lost it");
        assert!(!store.finish("a", "dead", 12_000, Outcome::Done(vec![1])).await.unwrap());
        assert!(store.finish("a", "live", 13_000, Outcome::Done(vec![7, 7])).await.unwrap());
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.attempts, a.finished_at), (Status::Done, 2, Some(13_000)));
        assert_eq!(store.image("a").await.unwrap(), Some(vec![7, 7]));
    }

    // regression: a job whose run killed its server was claimed again forever, lowest seq
    // first, ahead of every newer job
    #[tokio::test]
    async fn a_job_whose_server_keeps_dying_waits_behind_new_jobs_then_is_given_up() {
        let (_dir, store) = store().await;
        store.submit("poison", Some("owner"), &request("p", 1), 0).await.unwrap();
        store.claim("w1", 0, 1_000).await.unwrap().unwrap();
        store.submit("fresh", Some("owner"), &request("f", 2), 500).await.unwrap();
        // w1 died: at 5 000 the poison job is claimable again, but the fresh one goes first
        assert_eq!(store.claim("w2", 5_000, 6_000).await.unwrap().unwrap().id, "fresh");
        assert_eq!(store.claim("w3", 5_000, 6_000).await.unwrap().unwrap().id, "poison");
        // w3 died too: two attempts, the most allowed
        assert_eq!(store.give_up(5_500, 2).await.unwrap(), 0, "its lease still runs");
        assert_eq!(store.give_up(7_000, 2).await.unwrap(), 1);
        let poison = store.get("poison").await.unwrap().unwrap();
        assert_eq!((poison.status, poison.attempts), (Status::Failed, 2));
        let error = poison.error.unwrap();
        assert_eq!((error.status, error.code), (500, super::super::GAVE_UP_CODE));
        assert!(error.message.contains("gave up after 2 attempts"), "{}", error.message);
        assert_eq!(store.get("fresh").await.unwrap().unwrap().status, Status::Running, "one attempt: not given up");
        assert!(store.finish("fresh", "w2", 7_500, Outcome::Done(vec![1])).await.unwrap());
        assert!(store.claim("w4", 100_000, 101_000).await.unwrap().is_none(), "never claimed again");
    }

    #[tokio::test]
    async fn deleting_stops_the_worker_and_the_job_is_gone() {
        let (_dir, store) = store().await;
        store.submit("queued", Some("owner"), &request("q", 1), 0).await.unwrap();
        store.submit("running", Some("owner"), &request("r", 2), 0).await.unwrap();
        assert_eq!(store.delete("queued", "owner", false).await.unwrap(), Some(Status::Queued));
        let running = store.claim("w", 10, 10_000).await.unwrap().unwrap();
        assert_eq!(running.id, "running", "a deleted job is never claimed");
        assert_eq!(store.delete("running", "owner", false).await.unwrap(), Some(Status::Running));
        assert!(!store.renew("running", "w", 10_020, 1, 4).await.unwrap(), "the worker hears of it");
        assert!(!store.finish("running", "w", 10_030, Outcome::Done(vec![1])).await.unwrap());
        assert!(store.get("running").await.unwrap().is_none());
        assert_eq!(store.delete("running", "owner", false).await.unwrap(), None);
    }

    #[tokio::test]
    async fn failures_are_kept_and_finished_jobs_expire() {
        let (_dir, store) = store().await;
        store.submit("bad", Some("owner"), &request("bad", 1), 0).await.unwrap();
        store.submit("good", Some("owner"), &request("good", 2), 0).await.unwrap();
        store.submit("waiting", Some("owner"), &request("waiting", 3), 0).await.unwrap();
        store.claim("w", 0, 10_000).await.unwrap();
        let error = JobError { status: 408, code: 3007, message: "request timed out".into() };
        assert!(store.finish("bad", "w", 100, Outcome::Failed(error.clone())).await.unwrap());
        store.claim("w", 100, 10_000).await.unwrap();
        assert!(store.finish("good", "w", 200, Outcome::Done(vec![1])).await.unwrap());
        assert_eq!(store.get("bad").await.unwrap().unwrap().error, Some(error));
        assert_eq!(store.expire(150).await.unwrap(), 1, "only what finished before 150");
        assert!(store.get("bad").await.unwrap().is_none());
        assert_eq!(store.expire(1_000).await.unwrap(), 1);
        assert!(store.get("waiting").await.unwrap().is_some(), "unfinished jobs never expire");
    }

    #[tokio::test]
    async fn deletes_name_their_owner() {
        let (_dir, store) = store().await;
        store.submit("a", Some("alice"), &request("a", 1), 0).await.unwrap();
        assert_eq!(store.delete("a", "bob", false).await.unwrap(), None, "not bob's");
        assert_eq!(store.delete("a", "bob", true).await.unwrap(), None, "nor ownerless");
        assert_eq!(store.get("a").await.unwrap().unwrap().owner.as_deref(), Some("alice"));
        assert_eq!(store.delete("a", "alice", false).await.unwrap(), Some(Status::Queued));
    }

    #[tokio::test]
    async fn a_table_from_before_owners_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
        let old = SqlitePool::connect_with(options.create_if_missing(true)).await.unwrap();
        sqlx::raw_sql(&SCHEMA.replace("    owner TEXT,\n", "")).execute(&old).await.unwrap();
        sqlx::query(
            "INSERT INTO sdxl_jobs (id, request, seed, status, created_at) VALUES ('old', ?1, '7', 'queued', 1)",
        )
        .bind(request("old", 7).to_json())
        .execute(&old)
        .await
        .unwrap();
        old.close().await;
        let store = SqliteStore::open(&path).await.unwrap();
        let kept = store.get("old").await.unwrap().expect("nothing lost");
        assert_eq!((kept.owner, kept.seed, kept.status), (None, 7, Status::Queued));
        assert_eq!(store.delete("old", "someone", false).await.unwrap(), None, "no key's job");
        store.submit("new", Some("someone"), &request("new", 8), 2).await.unwrap();
        assert_eq!(store.claim("w", 3, 100).await.unwrap().unwrap().id, "old", "and it still runs in order");
        assert_eq!(store.delete("old", "anonymous", true).await.unwrap(), Some(Status::Running));
        drop(store);
        SqliteStore::open(&path).await.expect("opening a migrated table again");
    }

    #[tokio::test]
    async fn jobs_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.submit("a", Some("owner"), &request("a", u64::MAX), 0).await.unwrap();
        store.pool.close().await;
        let reopened = SqliteStore::open(&path).await.unwrap();
        let a = reopened.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.seed), (Status::Queued, u64::MAX));
    }
}
