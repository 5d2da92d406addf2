//! The SQL of the job store, written once for both databases: statements are templates in
//! PostgreSQL's `$N` parameters, turned into each dialect's text when a store opens, and
//! [`sql_job_store!`] implements [`super::JobStore`] over them for each store's pool. A
//! statement that reads the time takes the [`super::Clock`] as `$1` and reads it as `{now}`:
//! the given time, or the database's own clock when it is `NULL`.

use super::{JobError, JobRecord, Status, StoreError};

/// What differs between the two databases.
pub(crate) struct Dialect {
    /// The parameter sigil: `$` (PostgreSQL) or `?` (SQLite's `?N` are numbered the same).
    pub sigil: char,
    /// Milliseconds since the Unix epoch by the database's clock.
    pub clock: &'static str,
    /// What a claim's subquery ends with to skip rows other servers are claiming.
    pub skip_locked: &'static str,
}

pub(crate) const POSTGRES: Dialect =
    Dialect { sigil: '$', clock: "(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT", skip_locked: "FOR UPDATE SKIP LOCKED" };

/// SQLite runs one writer at a time, so a claim needs no row lock; its clock is the
/// machine's, which every process sharing the file shares.
pub(crate) const SQLITE: Dialect =
    Dialect { sigil: '?', clock: "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)", skip_locked: "" };

/// Columns added since the table was first made, with their types: a table made earlier
/// gets them with `ALTER TABLE … ADD COLUMN`, which keeps every row (old jobs have no owner
/// and no idempotency key).
pub(crate) const ADDED_COLUMNS: [(&str, &str); 3] =
    [("owner", "TEXT"), ("idempotency_key", "TEXT"), ("request_hash", "TEXT")];

/// Made after [`ADDED_COLUMNS`] exist. `NULL`s are distinct in a unique index, so jobs without a
/// key never collide.
pub(crate) const IDEMPOTENCY_INDEX: &str =
    "CREATE UNIQUE INDEX IF NOT EXISTS sdxl_jobs_idempotency ON sdxl_jobs (idempotency_key)";

/// Every statement of the store, in one dialect.
pub(crate) struct Statements {
    pub lookup_key: String,
    pub submit: String,
    pub queued_of_owner: String,
    pub store_done: String,
    pub give_up: String,
    pub too_old: String,
    pub claim: String,
    pub renew: String,
    pub release_unstarted: String,
    pub release_after_fault: String,
    pub finish: String,
    pub get: String,
    pub position: String,
    pub image: String,
    pub delete: String,
    pub expire: String,
    pub stats: String,
}

impl Statements {
    pub fn new(dialect: &Dialect) -> Self {
        let sql = |template: &str| {
            template
                .replace("{now}", &format!("COALESCE($1, {})", dialect.clock))
                .replace("{skip_locked}", dialect.skip_locked)
                .replace('$', &dialect.sigil.to_string())
        };
        Statements {
            lookup_key: sql("SELECT id, request_hash FROM sdxl_jobs WHERE idempotency_key = $1"),
            // the bounds are checked in the statement, so that two servers cannot both take
            // the last place (SQLite: one writer; PostgreSQL: at most one extra per
            // concurrent submit, see docs/reliability.md)
            submit: sql(
                "INSERT INTO sdxl_jobs (id, owner, request, seed, status, created_at, idempotency_key, request_hash)
                 SELECT $2, $3, $4, $5, 'queued', {now}, $6, $7
                 WHERE (SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued') < $8
                   AND (SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued' AND owner = $3) < $9",
            ),
            queued_of_owner: sql("SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued' AND owner = $1"),
            store_done: sql(
                "INSERT INTO sdxl_jobs (id, owner, request, seed, status, image, created_at, started_at, finished_at)
                 VALUES ($2, $3, $4, $5, 'done', $6, {now}, {now}, {now})",
            ),
            give_up: sql(
                "UPDATE sdxl_jobs SET status = 'failed', error_status = 500, error_code = $2, error_message = $3,
                     finished_at = {now}, lease_until = NULL
                 WHERE status = 'running' AND lease_until < {now} AND attempts >= $4",
            ),
            too_old: sql(
                "UPDATE sdxl_jobs SET status = 'failed', error_status = 408, error_code = $2, error_message = $3,
                     finished_at = {now}
                 WHERE status = 'queued' AND created_at < {now} - $4",
            ),
            claim: sql(
                "UPDATE sdxl_jobs SET status = 'running', worker = $2, lease_until = {now} + $3, step = 0, total = 0,
                     attempts = attempts + 1, started_at = {now}
                 WHERE seq = (SELECT seq FROM sdxl_jobs
                              WHERE status = 'queued'
                                 OR (status = 'running' AND lease_until + $3 * attempts < {now})
                              ORDER BY status = 'running', seq LIMIT 1 {skip_locked})
                 RETURNING id, request, attempts",
            ),
            renew: sql("UPDATE sdxl_jobs SET lease_until = {now} + $2, step = $3, total = $4
                 WHERE id = $5 AND worker = $6 AND status = 'running'"),
            release_unstarted: sql(
                "UPDATE sdxl_jobs SET status = 'queued', worker = NULL, lease_until = NULL, started_at = NULL,
                     step = 0, total = 0, attempts = attempts - 1
                 WHERE id = $1 AND worker = $2 AND status = 'running'",
            ),
            // a lapsed lease with nobody's name on it: claimed again after the same backoff
            release_after_fault: sql("UPDATE sdxl_jobs SET worker = NULL, lease_until = {now}
                 WHERE id = $2 AND worker = $3 AND status = 'running'"),
            finish: sql(
                "UPDATE sdxl_jobs SET status = $2, image = $3, error_status = $4, error_code = $5, error_message = $6,
                     finished_at = {now}, lease_until = NULL
                 WHERE id = $7 AND worker = $8 AND status = 'running'",
            ),
            get: sql(&format!("SELECT {RECORD_COLUMNS} FROM sdxl_jobs WHERE id = $1")),
            position: sql("SELECT COUNT(*) FROM sdxl_jobs WHERE status = 'queued' AND seq < $1"),
            image: sql("SELECT image FROM sdxl_jobs WHERE id = $1 AND status = 'done'"),
            delete: sql(
                "DELETE FROM sdxl_jobs WHERE id = $1 AND (owner = $2 OR (owner IS NULL AND $3)) RETURNING status",
            ),
            expire: sql("DELETE FROM sdxl_jobs WHERE finished_at IS NOT NULL AND finished_at < {now} - $2"),
            stats: sql("SELECT COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0) AS queued,
                     COALESCE(SUM(LENGTH(request) + COALESCE(LENGTH(image), 0)), 0) AS bytes
                 FROM sdxl_jobs"),
        }
    }
}

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

/// `u64` → a SQL `BIGINT`, saturating (a limit of `u64::MAX` means none).
pub(crate) fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Implements [`super::JobStore`] for a store type with a `pool` (an sqlx pool of either
/// database) and `sql` ([`Statements`] in its dialect). The two databases' sqlx types share
/// these method names but no trait that covers them, hence a macro rather than a generic.
macro_rules! sql_job_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::jobs::JobStore for $store {
            async fn submit(
                &self,
                job: &$crate::jobs::NewJob<'_>,
                now: $crate::jobs::Clock,
            ) -> Result<$crate::jobs::Submitted, $crate::jobs::StoreError> {
                use sqlx::Row as _;
                use $crate::jobs::Submitted;
                let key = job.idempotency.map(|i| format!("{}:{}", job.owner, i.key));
                let lookup = || async {
                    let Some(key) = &key else { return Ok(None) };
                    let row = sqlx::query(&self.sql.lookup_key).bind(key).fetch_optional(&self.pool).await?;
                    Ok::<_, $crate::jobs::StoreError>(match row {
                        Some(row) => {
                            let hash: Option<String> = row.try_get("request_hash")?;
                            let same = hash.as_deref() == job.idempotency.map(|i| i.body_hash);
                            Some(if same { Submitted::Existing(row.try_get("id")?) } else { Submitted::KeyReused })
                        }
                        None => None,
                    })
                };
                if let Some(earlier) = lookup().await? {
                    return Ok(earlier);
                }
                let inserted = sqlx::query(&self.sql.submit)
                    .bind(now.param())
                    .bind(job.id)
                    .bind(job.owner)
                    .bind(job.request.to_json())
                    .bind(&job.request.seed)
                    .bind(&key)
                    .bind(job.idempotency.map(|i| i.body_hash))
                    .bind($crate::jobs::sql::bigint(job.limits.total))
                    .bind($crate::jobs::sql::bigint(job.limits.per_owner))
                    .execute(&self.pool)
                    .await;
                match inserted {
                    Ok(done) if done.rows_affected() == 1 => Ok(Submitted::Queued),
                    Ok(_) => {
                        let of_owner: i64 =
                            sqlx::query_scalar(&self.sql.queued_of_owner).bind(job.owner).fetch_one(&self.pool).await?;
                        let per_owner = $crate::jobs::sql::bigint(job.limits.per_owner) <= of_owner;
                        let limit = if per_owner { job.limits.per_owner } else { job.limits.total };
                        Ok(Submitted::Full { limit, per_owner })
                    }
                    // another request with the same key got in first
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() && key.is_some() => {
                        Ok(lookup().await?.unwrap_or(Submitted::KeyReused))
                    }
                    Err(e) => Err(e.into()),
                }
            }

            async fn store_done(
                &self,
                id: &str,
                owner: &str,
                request: &$crate::jobs::StoredRequest,
                image: Vec<u8>,
                now: $crate::jobs::Clock,
            ) -> Result<(), $crate::jobs::StoreError> {
                sqlx::query(&self.sql.store_done)
                    .bind(now.param())
                    .bind(id)
                    .bind(owner)
                    .bind(request.to_json())
                    .bind(&request.seed)
                    .bind(image)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn sweep(
                &self,
                now: $crate::jobs::Clock,
                rules: $crate::jobs::SweepRules,
            ) -> Result<$crate::jobs::Swept, $crate::jobs::StoreError> {
                let gave_up = sqlx::query(&self.sql.give_up)
                    .bind(now.param())
                    .bind(i64::from($crate::jobs::GAVE_UP_CODE))
                    .bind($crate::jobs::gave_up_message(rules.max_attempts))
                    .bind(i64::from(rules.max_attempts))
                    .execute(&self.pool)
                    .await?;
                let too_old = sqlx::query(&self.sql.too_old)
                    .bind(now.param())
                    .bind(i64::from($crate::jobs::TOO_OLD_CODE))
                    .bind($crate::jobs::too_old_message(rules.max_queued_age_ms))
                    .bind(rules.max_queued_age_ms)
                    .execute(&self.pool)
                    .await?;
                Ok($crate::jobs::Swept { gave_up: gave_up.rows_affected(), too_old: too_old.rows_affected() })
            }

            async fn claim(
                &self,
                worker: &str,
                now: $crate::jobs::Clock,
                lease_ms: i64,
            ) -> Result<Option<$crate::jobs::Claimed>, $crate::jobs::StoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(&self.sql.claim)
                    .bind(now.param())
                    .bind(worker)
                    .bind(lease_ms)
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    Some(row) => Ok(Some($crate::jobs::Claimed {
                        id: row.try_get("id")?,
                        request: $crate::jobs::StoredRequest::from_json(&row.try_get::<String, _>("request")?)?,
                        attempts: row.try_get::<i64, _>("attempts")? as u64,
                    })),
                    None => Ok(None),
                }
            }

            async fn renew(
                &self,
                id: &str,
                worker: &str,
                now: $crate::jobs::Clock,
                lease_ms: i64,
                step: u64,
                total: u64,
            ) -> Result<bool, $crate::jobs::StoreError> {
                let done = sqlx::query(&self.sql.renew)
                    .bind(now.param())
                    .bind(lease_ms)
                    .bind(step as i64)
                    .bind(total as i64)
                    .bind(id)
                    .bind(worker)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release(
                &self,
                id: &str,
                worker: &str,
                now: $crate::jobs::Clock,
                why: $crate::jobs::Release,
            ) -> Result<bool, $crate::jobs::StoreError> {
                let done = match why {
                    $crate::jobs::Release::Unstarted => {
                        sqlx::query(&self.sql.release_unstarted).bind(id).bind(worker).execute(&self.pool).await?
                    }
                    $crate::jobs::Release::AfterServerFault => {
                        sqlx::query(&self.sql.release_after_fault)
                            .bind(now.param())
                            .bind(id)
                            .bind(worker)
                            .execute(&self.pool)
                            .await?
                    }
                };
                Ok(done.rows_affected() == 1)
            }

            async fn finish(
                &self,
                id: &str,
                worker: &str,
                now: $crate::jobs::Clock,
                outcome: $crate::jobs::Outcome,
            ) -> Result<bool, $crate::jobs::StoreError> {
                let (status, image, error) = match outcome {
                    $crate::jobs::Outcome::Done(png) => ("done", Some(png), None),
                    $crate::jobs::Outcome::Failed(error) => ("failed", None, Some(error)),
                };
                let done = sqlx::query(&self.sql.finish)
                    .bind(now.param())
                    .bind(status)
                    .bind(image)
                    .bind(error.as_ref().map(|e| i64::from(e.status)))
                    .bind(error.as_ref().map(|e| i64::from(e.code)))
                    .bind(error.map(|e| e.message))
                    .bind(id)
                    .bind(worker)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn get(&self, id: &str) -> Result<Option<$crate::jobs::JobRecord>, $crate::jobs::StoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(&self.sql.get).bind(id).fetch_optional(&self.pool).await?;
                let Some(row) = row else { return Ok(None) };
                let position = if row.try_get::<String, _>("status")? == "queued" {
                    let seq: i64 = row.try_get("seq")?;
                    let ahead: i64 = sqlx::query_scalar(&self.sql.position).bind(seq).fetch_one(&self.pool).await?;
                    Some(ahead as u64)
                } else {
                    None
                };
                $crate::jobs::sql::record_from_row(&row, position).map(Some)
            }

            async fn image(&self, id: &str) -> Result<Option<Vec<u8>>, $crate::jobs::StoreError> {
                let image: Option<Option<Vec<u8>>> =
                    sqlx::query_scalar(&self.sql.image).bind(id).fetch_optional(&self.pool).await?;
                Ok(image.flatten())
            }

            async fn delete(
                &self,
                id: &str,
                owner: &str,
                or_ownerless: bool,
            ) -> Result<Option<$crate::jobs::Status>, $crate::jobs::StoreError> {
                let status: Option<String> = sqlx::query_scalar(&self.sql.delete)
                    .bind(id)
                    .bind(owner)
                    .bind(or_ownerless)
                    .fetch_optional(&self.pool)
                    .await?;
                status.as_deref().map($crate::jobs::Status::parse).transpose()
            }

            async fn expire(&self, now: $crate::jobs::Clock, ttl_ms: i64) -> Result<u64, $crate::jobs::StoreError> {
                let deleted = sqlx::query(&self.sql.expire).bind(now.param()).bind(ttl_ms).execute(&self.pool).await?;
                Ok(deleted.rows_affected())
            }

            async fn stats(&self) -> Result<$crate::jobs::StoreStats, $crate::jobs::StoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(&self.sql.stats).fetch_one(&self.pool).await?;
                Ok($crate::jobs::StoreStats {
                    queued: row.try_get::<i64, _>("queued")? as u64,
                    bytes: row.try_get::<i64, _>("bytes")? as u64,
                })
            }
        }
    };
}
pub(crate) use sql_job_store;
