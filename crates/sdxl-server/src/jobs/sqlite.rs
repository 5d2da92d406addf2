//! The job store in an SQLite file: the default, for one machine. SQLite runs one writing
//! statement at a time, so a claim (one `UPDATE … RETURNING`) is atomic without row locks.
//! The statements are shared with PostgreSQL ([`super::sql`]).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::sql::{sql_job_store, Statements, ADDED_COLUMNS, IDEMPOTENCY_INDEX, SQLITE};
use super::StoreError;

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
    error_message TEXT,
    idempotency_key TEXT,
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS sdxl_jobs_status_seq ON sdxl_jobs (status, seq);
CREATE INDEX IF NOT EXISTS sdxl_jobs_finished_at ON sdxl_jobs (finished_at);";

pub struct SqliteStore {
    pool: SqlitePool,
    sql: Statements,
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
        for (column, kind) in ADDED_COLUMNS {
            let present: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info('sdxl_jobs') WHERE name = ?1")
                    .bind(column)
                    .fetch_one(&pool)
                    .await?;
            if present == 0 {
                sqlx::raw_sql(&format!("ALTER TABLE sdxl_jobs ADD COLUMN {column} {kind}")).execute(&pool).await?;
            }
        }
        sqlx::raw_sql(IDEMPOTENCY_INDEX).execute(&pool).await?;
        Ok(Self { pool, sql: Statements::new(&SQLITE) })
    }
}

sql_job_store!(SqliteStore);

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sdxl_engine::{NoiseSource, RawRequest};
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

    use super::*;
    use crate::jobs::{
        Clock, Idempotency, JobError, JobStore, NewJob, Outcome, QueueLimits, Release, Status, StoredRequest,
        Submitted, SweepRules, Swept, GAVE_UP_CODE, TOO_OLD_CODE,
    };

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
            sampling: Default::default(),
        };
        StoredRequest::new(&raw, seed)
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("data/jobs.db")).await.unwrap();
        (dir, store)
    }

    /// Stores `owner`'s job `id` at `now` with no bounds and no idempotency key.
    async fn submit(store: &SqliteStore, id: &str, owner: &str, request: &StoredRequest, now: i64) {
        let job = NewJob { id, owner, request, idempotency: None, limits: QueueLimits::NONE };
        assert_eq!(store.submit(&job, Clock::At(now)).await.unwrap(), Submitted::Queued);
    }

    async fn claim(store: &SqliteStore, worker: &str, now: i64, lease_ms: i64) -> Option<String> {
        store.claim(worker, Clock::At(now), lease_ms).await.unwrap().map(|c| c.id)
    }

    const RULES: SweepRules = SweepRules { max_attempts: 2, max_queued_age_ms: 1_000_000 };

    #[tokio::test]
    async fn jobs_are_claimed_in_order_and_each_once() {
        let (_dir, store) = store().await;
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            submit(&store, id, "owner", &request(id, i as u64), 100).await;
        }
        assert_eq!(store.get("c").await.unwrap().unwrap().position, Some(2));
        assert_eq!(store.stats().await.unwrap().queued, 3);
        let first = store.claim("w1", Clock::At(200), 10_000).await.unwrap().unwrap();
        assert_eq!((first.id.as_str(), first.attempts), ("a", 1));
        assert_eq!(first.request, request("a", 0), "the request comes back as stored");
        assert_eq!(claim(&store, "w2", 200, 10_000).await.as_deref(), Some("b"));
        let c = store.get("c").await.unwrap().unwrap();
        assert_eq!((c.status, c.position), (Status::Queued, Some(0)));
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.position, a.attempts, a.started_at), (Status::Running, None, 1, Some(200)));
        assert_eq!(store.stats().await.unwrap().queued, 1);
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_claimed_again_and_the_first_worker_loses_it() {
        let (_dir, store) = store().await;
        submit(&store, "a", "owner", &request("a", 1), 0).await;
        claim(&store, "dead", 0, 1_000).await.unwrap();
        assert!(store.renew("a", "dead", Clock::At(500), 1_000, 1, 4).await.unwrap(), "its own lease renews");
        assert!(claim(&store, "live", 1_000, 10_000).await.is_none(), "the lease still runs");
        // lapsed at 1 500, then one lease (10 000) of backoff for its one attempt
        assert!(claim(&store, "live", 11_000, 10_000).await.is_none(), "backing off");
        assert_eq!(claim(&store, "live", 11_600, 10_000).await.as_deref(), Some("a"), "claimed again");
        assert!(!store.renew("a", "dead", Clock::At(12_000), 1_000, 2, 4).await.unwrap(), "the first worker lost it");
        assert!(!store.finish("a", "dead", Clock::At(12_000), Outcome::Done(vec![1])).await.unwrap());
        assert!(store.finish("a", "live", Clock::At(13_000), Outcome::Done(vec![7, 7])).await.unwrap());
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.attempts, a.finished_at), (Status::Done, 2, Some(13_000)));
        assert_eq!(store.image("a").await.unwrap(), Some(vec![7, 7]));
    }

    // regression: one failed renewal dropped the job; a lease that lapsed while the store did
    // not answer is still this worker's if nobody took the job
    #[tokio::test]
    async fn a_lapsed_lease_nobody_took_is_renewed() {
        let (_dir, store) = store().await;
        submit(&store, "a", "owner", &request("a", 1), 0).await;
        claim(&store, "w", 0, 1_000).await.unwrap();
        assert!(store.renew("a", "w", Clock::At(16_000), 1_000, 3, 4).await.unwrap());
        assert!(claim(&store, "other", 16_500, 1_000).await.is_none(), "the renewed lease holds");
    }

    // regression: a job whose run killed its server was claimed again forever, lowest seq
    // first, ahead of every newer job
    #[tokio::test]
    async fn a_job_whose_server_keeps_dying_waits_behind_new_jobs_then_is_given_up() {
        let (_dir, store) = store().await;
        submit(&store, "poison", "owner", &request("p", 1), 0).await;
        claim(&store, "w1", 0, 1_000).await.unwrap();
        submit(&store, "fresh", "owner", &request("f", 2), 500).await;
        // w1 died: at 5 000 the poison job is claimable again, but the fresh one goes first
        assert_eq!(claim(&store, "w2", 5_000, 1_000).await.as_deref(), Some("fresh"));
        assert_eq!(claim(&store, "w3", 5_000, 1_000).await.as_deref(), Some("poison"));
        // w3 died too: two attempts, the most allowed
        assert_eq!(store.sweep(Clock::At(5_500), RULES).await.unwrap().gave_up, 0, "its lease still runs");
        assert_eq!(store.sweep(Clock::At(7_000), RULES).await.unwrap().gave_up, 1);
        let poison = store.get("poison").await.unwrap().unwrap();
        assert_eq!((poison.status, poison.attempts), (Status::Failed, 2));
        let error = poison.error.unwrap();
        assert_eq!((error.status, error.code), (500, GAVE_UP_CODE));
        assert!(error.message.contains("gave up after 2 attempts"), "{}", error.message);
        assert_eq!(store.get("fresh").await.unwrap().unwrap().status, Status::Running, "one attempt: not given up");
        assert!(store.finish("fresh", "w2", Clock::At(7_500), Outcome::Done(vec![1])).await.unwrap());
        assert!(claim(&store, "w4", 100_000, 1_000).await.is_none(), "never claimed again");
    }

    #[tokio::test]
    async fn released_jobs_run_again_unstarted_at_once_after_a_fault_with_backoff() {
        let (_dir, store) = store().await;
        submit(&store, "a", "owner", &request("a", 1), 0).await;
        claim(&store, "w", 0, 1_000).await.unwrap();
        assert!(store.release("a", "w", Clock::At(10), Release::Unstarted).await.unwrap());
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.attempts, a.position), (Status::Queued, 0, Some(0)), "as if never claimed");
        assert!(!store.release("a", "w", Clock::At(10), Release::Unstarted).await.unwrap(), "not w's any more");
        let again = store.claim("w", Clock::At(20), 1_000).await.unwrap().unwrap();
        assert_eq!(again.attempts, 1);
        assert!(store.release("a", "w", Clock::At(100), Release::AfterServerFault).await.unwrap());
        assert!(!store.renew("a", "w", Clock::At(110), 1_000, 1, 4).await.unwrap(), "nobody's job now");
        assert!(claim(&store, "v", 1_000, 1_000).await.is_none(), "one lease of backoff for one attempt");
        let third = store.claim("v", Clock::At(1_200), 1_000).await.unwrap().unwrap();
        assert_eq!((third.id.as_str(), third.attempts), ("a", 2));
    }

    #[tokio::test]
    async fn jobs_queued_too_long_fail_with_their_own_code() {
        let (_dir, store) = store().await;
        let rules = SweepRules { max_attempts: 3, max_queued_age_ms: 1_000 };
        submit(&store, "old", "owner", &request("o", 1), 0).await;
        submit(&store, "new", "owner", &request("n", 2), 900).await;
        assert_eq!(claim(&store, "w", 10, 100_000).await.as_deref(), Some("old"));
        assert_eq!(store.sweep(Clock::At(1_500), rules).await.unwrap(), Swept::default(), "old runs; new is young");
        // back in the queue, never started: now it is too old
        store.release("old", "w", Clock::At(1_500), Release::Unstarted).await.unwrap();
        assert_eq!(store.sweep(Clock::At(1_500), rules).await.unwrap(), Swept { gave_up: 0, too_old: 1 });
        let old = store.get("old").await.unwrap().unwrap();
        let error = old.error.unwrap();
        assert_eq!((old.status, error.status, error.code), (Status::Failed, 408, TOO_OLD_CODE));
        assert!(error.message.contains("not started within 1 s"), "{}", error.message);
        assert_eq!(store.get("new").await.unwrap().unwrap().status, Status::Queued);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_all_and_per_owner() {
        let (_dir, store) = store().await;
        let limits = QueueLimits { total: 3, per_owner: 2 };
        let r = request("x", 1);
        let try_submit = |id: &'static str, owner: &'static str| {
            let store = &store;
            let r = &r;
            async move {
                let job = NewJob { id, owner, request: r, idempotency: None, limits };
                store.submit(&job, Clock::At(0)).await.unwrap()
            }
        };
        assert_eq!(try_submit("a1", "alice").await, Submitted::Queued);
        assert_eq!(try_submit("a2", "alice").await, Submitted::Queued);
        assert_eq!(try_submit("a3", "alice").await, Submitted::Full { limit: 2, per_owner: true });
        assert_eq!(try_submit("b1", "bob").await, Submitted::Queued);
        assert_eq!(try_submit("b2", "bob").await, Submitted::Full { limit: 3, per_owner: false });
        claim(&store, "w", 1, 1_000).await.unwrap();
        assert_eq!(try_submit("b2", "bob").await, Submitted::Queued, "a claimed job leaves the queue");
        assert!(store.get("a3").await.unwrap().is_none(), "a refused job is not stored");
    }

    #[tokio::test]
    async fn an_idempotency_key_gives_one_job_per_body() {
        let (_dir, store) = store().await;
        let r = request("x", 1);
        let keyed = |id, owner, key, body_hash| NewJob {
            id,
            owner,
            request: &r,
            idempotency: Some(Idempotency { key, body_hash }),
            limits: QueueLimits { total: 2, per_owner: 1 },
        };
        assert_eq!(store.submit(&keyed("j1", "alice", "k", "h1"), Clock::At(0)).await.unwrap(), Submitted::Queued);
        assert_eq!(
            store.submit(&keyed("j2", "alice", "k", "h1"), Clock::At(1)).await.unwrap(),
            Submitted::Existing("j1".into()),
            "the same job, even with alice's share of the queue full"
        );
        assert_eq!(store.submit(&keyed("j3", "alice", "k", "h2"), Clock::At(1)).await.unwrap(), Submitted::KeyReused);
        let bobs = store.submit(&keyed("j4", "bob", "k", "h1"), Clock::At(1)).await.unwrap();
        assert_eq!(bobs, Submitted::Queued, "keys are per owner");
        store.delete("j1", "alice", false).await.unwrap();
        assert_eq!(
            store.submit(&keyed("j5", "alice", "k", "h1"), Clock::At(2)).await.unwrap(),
            Submitted::Queued,
            "a deleted job frees its key"
        );
    }

    #[tokio::test]
    async fn the_stores_clock_stamps_jobs_when_none_is_given() {
        let (_dir, store) = store().await;
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let job =
            NewJob { id: "a", owner: "o", request: &request("a", 1), idempotency: None, limits: QueueLimits::NONE };
        store.submit(&job, Clock::Store).await.unwrap();
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let created = store.get("a").await.unwrap().unwrap().created_at;
        assert!((before - 5..=after + 5).contains(&created), "{before} <= {created} <= {after}");
        let claimed = store.claim("w", Clock::Store, 60_000).await.unwrap().unwrap();
        assert_eq!(claimed.id, "a");
        assert!(store.claim("v", Clock::Store, 60_000).await.unwrap().is_none(), "the lease runs by the same clock");
    }

    #[tokio::test]
    async fn deleting_stops_the_worker_and_the_job_is_gone() {
        let (_dir, store) = store().await;
        submit(&store, "queued", "owner", &request("q", 1), 0).await;
        submit(&store, "running", "owner", &request("r", 2), 0).await;
        assert_eq!(store.delete("queued", "owner", false).await.unwrap(), Some(Status::Queued));
        assert_eq!(claim(&store, "w", 10, 10_000).await.as_deref(), Some("running"), "a deleted job is never claimed");
        assert_eq!(store.delete("running", "owner", false).await.unwrap(), Some(Status::Running));
        assert!(!store.renew("running", "w", Clock::At(20), 10_000, 1, 4).await.unwrap(), "the worker hears of it");
        assert!(!store.finish("running", "w", Clock::At(30), Outcome::Done(vec![1])).await.unwrap());
        assert!(store.get("running").await.unwrap().is_none());
        assert_eq!(store.delete("running", "owner", false).await.unwrap(), None);
    }

    #[tokio::test]
    async fn failures_are_kept_and_finished_jobs_expire() {
        let (_dir, store) = store().await;
        submit(&store, "bad", "owner", &request("bad", 1), 0).await;
        submit(&store, "good", "owner", &request("good", 2), 0).await;
        submit(&store, "waiting", "owner", &request("waiting", 3), 0).await;
        claim(&store, "w", 0, 10_000).await;
        let error = JobError { status: 408, code: 3007, message: "request timed out".into() };
        assert!(store.finish("bad", "w", Clock::At(100), Outcome::Failed(error.clone())).await.unwrap());
        claim(&store, "w", 100, 10_000).await;
        assert!(store.finish("good", "w", Clock::At(200), Outcome::Done(vec![1, 2, 3])).await.unwrap());
        assert_eq!(store.get("bad").await.unwrap().unwrap().error, Some(error));
        let stats = store.stats().await.unwrap();
        let requests: u64 =
            ["bad", "good", "waiting"].iter().zip(1..).map(|(p, s)| request(p, s).to_json().len() as u64).sum();
        assert_eq!((stats.queued, stats.bytes), (1, requests + 3), "requests and the image");
        assert_eq!(store.expire(Clock::At(1_150), 1_000).await.unwrap(), 1, "only what finished before 150");
        assert!(store.get("bad").await.unwrap().is_none());
        assert_eq!(store.expire(Clock::At(2_000), 1_000).await.unwrap(), 1);
        assert!(store.get("waiting").await.unwrap().is_some(), "unfinished jobs never expire");
    }

    #[tokio::test]
    async fn deletes_name_their_owner() {
        let (_dir, store) = store().await;
        submit(&store, "a", "alice", &request("a", 1), 0).await;
        assert_eq!(store.delete("a", "bob", false).await.unwrap(), None, "not bob's");
        assert_eq!(store.delete("a", "bob", true).await.unwrap(), None, "nor ownerless");
        assert_eq!(store.get("a").await.unwrap().unwrap().owner.as_deref(), Some("alice"));
        assert_eq!(store.delete("a", "alice", false).await.unwrap(), Some(Status::Queued));
    }

    #[tokio::test]
    async fn a_table_from_before_owners_and_keys_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display())).unwrap();
        let old = SqlitePool::connect_with(options.create_if_missing(true)).await.unwrap();
        let old_schema = SCHEMA.replace("    owner TEXT,\n", "").replace(
            "    error_message TEXT,\n    idempotency_key TEXT,\n    request_hash TEXT\n",
            "    error_message TEXT\n",
        );
        assert!(!old_schema.contains("owner") && !old_schema.contains("idempotency"));
        sqlx::raw_sql(&old_schema).execute(&old).await.unwrap();
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
        submit(&store, "new", "someone", &request("new", 8), 2).await;
        assert_eq!(claim(&store, "w", 3, 100).await.as_deref(), Some("old"), "and it still runs in order");
        assert_eq!(store.delete("old", "anonymous", true).await.unwrap(), Some(Status::Running));
        drop(store);
        SqliteStore::open(&path).await.expect("opening a migrated table again");
    }

    #[tokio::test]
    async fn jobs_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = SqliteStore::open(&path).await.unwrap();
        submit(&store, "a", "owner", &request("a", u64::MAX), 0).await;
        store.pool.close().await;
        let reopened = SqliteStore::open(&path).await.unwrap();
        let a = reopened.get("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.seed), (Status::Queued, u64::MAX));
    }
}
