//! [`JobStore`]: every SQL statement of denoised, over SQLite (one host, the default) or PostgreSQL (a fleet).
//!
//! The queue follows the usual shape of SQL job queues: a job is **claimed** with one atomic
//! `UPDATE … RETURNING` that marks it running under a time-limited **lease** and charges an attempt; every later
//! transition is **fenced** on `(id, lease_owner, status = 'running')`, so a worker that lost its lease (because
//! a reaper re-queued the job and another worker claimed it) cannot overwrite the new owner's work; a **reaper**
//! ([`JobStore::recover_expired`]) re-queues jobs whose lease expired, or fails them once they have used all
//! their attempts. Every transition that ends a job also queues the job's webhook delivery, in the same
//! transaction (the outbox: `webhooks.rs`).
//!
//! Both backends run the same statements: the schemas use the same column types (text ids, i64 integers) and
//! the statements stay in the dialect both speak (`$N` placeholders, `RETURNING`, `COALESCE`, `CAST`). Where
//! they differ, [`Dialect`] picks: SQLite takes its write lock up front with `BEGIN IMMEDIATE`; PostgreSQL
//! claims with `FOR UPDATE SKIP LOCKED`, serialises submissions with an advisory lock (so limits counted in the
//! transaction hold across processes) and announces claimable jobs with `NOTIFY`.
//!
//! Fencing compares owner strings, so each worker should use an owner that is unique to its process run
//! (e.g. host, pid and a random suffix): an owner reused after a restart could complete a job claimed by its
//! previous incarnation.
//!
//! Statements that return rows from a write (`RETURNING`) are read with `fetch_all`, which steps them to
//! completion, so the autocommit transaction is committed (and, with `synchronous=FULL`, synced) before the
//! call returns.

/// Runs `$body` with `$pool` bound to the backend's pool for reads (typed per backend: the body is compiled
/// once for each, so one statement text serves both) and `$dialect` to its [`Dialect`].
macro_rules! on_read {
    ($store:expr, $pool:ident, $dialect:ident => $body:expr) => {
        match &$store.backend {
            $crate::jobs::store::Backend::Sqlite(pools) => {
                let ($pool, $dialect) = (&pools.read, $crate::jobs::store::Dialect::Sqlite);
                let _ = $dialect;
                $body
            }
            $crate::jobs::store::Backend::Postgres(pool) => {
                let ($pool, $dialect) = (pool, $crate::jobs::store::Dialect::Postgres);
                let _ = $dialect;
                $body
            }
        }
    };
}

/// Like [`on_read!`] with the pool for writes (SQLite's single write connection).
macro_rules! on_write {
    ($store:expr, $pool:ident, $dialect:ident => $body:expr) => {
        match &$store.backend {
            $crate::jobs::store::Backend::Sqlite(pools) => {
                let ($pool, $dialect) = (&pools.write, $crate::jobs::store::Dialect::Sqlite);
                let _ = $dialect;
                $body
            }
            $crate::jobs::store::Backend::Postgres(pool) => {
                let ($pool, $dialect) = (pool, $crate::jobs::store::Dialect::Postgres);
                let _ = $dialect;
                $body
            }
        }
    };
}

pub(crate) use {on_read, on_write};

mod events;
mod order;
pub mod postgres;
mod rows;
mod sqlite;
mod submit;
mod usage;
mod webhooks;
mod workers;

use std::time::Duration;

use sqlx::postgres::PgPool;
use uuid::Uuid;

pub use self::events::StoredEvent;
pub use self::usage::OwnerUsage;
pub use self::webhooks::{
    message_id, AttemptOutcome, ClaimedDelivery, DeliveryStatus, DeliveryTarget, JobWebhook, WebhookState,
};
pub use self::workers::{WorkerInfo, WorkerRegistration};
use super::error::StoreError;
use super::model::{
    ImageRecord, Job, JobStatus, NewImage, NewJob, RecoverReport, StatusCounts, Submission, SubmitLimits,
};
use super::time::now_millis;
use rows::{non_negative, one_job, parse_ids, parse_status, parse_uuid, seed_to_db, ImageRow, JobRow};

/// The `error_code` of a job that failed because its lease expired on its last allowed attempt.
pub const MAX_ATTEMPTS_EXCEEDED: &str = "max_attempts_exceeded";

/// The columns of `jobs` that make a [`Job`], in [`JobRow`] order (a macro so `concat!` can build static SQL).
macro_rules! job_columns {
    () => {
        "id, kind, status, model, params, priority, attempts, max_attempts, lease_owner, error_code, \
         error_message, created_at, started_at, finished_at, owner"
    };
}
pub(crate) use job_columns;

/// The columns of `images` that make an [`ImageRecord`].
macro_rules! image_columns {
    () => {
        "job_id, idx, seed, width, height, format, path, sha256, bytes, created_at"
    };
}

/// Which SQL dialect a statement is for, where the two backends differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// SQLite 3.35 or later.
    Sqlite,
    /// PostgreSQL 13 or later.
    Postgres,
}

impl Dialect {
    /// The statement that opens a write transaction: SQLite takes its write lock up front, so the
    /// transaction cannot fail half-way because another connection wrote first.
    pub(crate) fn begin(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
}

/// Which queued jobs a claim may take.
enum ClaimFilter {
    /// Jobs for one of these models (a JSON array; `None`: any model).
    Models(Option<String>),
    /// Jobs of this batch key costing at most `max_cost` image-steps.
    Companion { batch_key: String, max_cost: i64 },
}

/// The claim order over candidate rows `j` joined with their owner's pass `f`, then `$lock`: among equal
/// passes, the oldest job's owner goes first (the owner whose turn it is).
macro_rules! ordered_claim {
    ($lock:literal) => {
        concat!("ORDER BY j.priority DESC, COALESCE(f.pass, 0.0), j.created_at, j.id LIMIT 1", $lock)
    };
}

/// The owner-first claim of [`next_job_sql`] on SQLite, with `$top` narrowing the candidates that decide the
/// top priority, `$owners` the jobs whose owners are walked (alias `j`) and `$head` an owner's candidate jobs
/// (alias `k`).
macro_rules! owner_first {
    ($top:literal, $owners:literal, $head:literal) => {
        concat!(
            "WITH RECURSIVE \
                 top(p) AS (SELECT priority FROM jobs WHERE status = 'queued' ",
            $top,
            " \
                     ORDER BY priority DESC LIMIT 1), \
                 owners(o) AS ( \
                     SELECT (SELECT MIN(j.owner) FROM jobs j \
                         WHERE j.status = 'queued' AND j.priority = (SELECT p FROM top) ",
            $owners,
            ") \
                     UNION ALL \
                     SELECT (SELECT MIN(j.owner) FROM jobs j \
                         WHERE j.status = 'queued' AND j.priority = (SELECT p FROM top) AND j.owner > owners.o ",
            $owners,
            ") \
                     FROM owners WHERE owners.o IS NOT NULL), \
                 heads(owner, id, created_at) AS ( \
                     SELECT owners.o, j.id, j.created_at FROM owners JOIN jobs j ON j.id = ( \
                         SELECT k.id FROM jobs k \
                         WHERE k.status = 'queued' AND k.priority = (SELECT p FROM top) AND k.owner = owners.o ",
            $head,
            " ORDER BY k.created_at, k.id LIMIT 1) \
                     WHERE owners.o IS NOT NULL \
                     UNION ALL \
                     SELECT * FROM (SELECT NULL, k.id, k.created_at FROM jobs k \
                         WHERE k.status = 'queued' AND k.priority = (SELECT p FROM top) AND k.owner IS NULL ",
            $head,
            " ORDER BY k.created_at, k.id LIMIT 1)) \
             SELECT h.id FROM heads h LEFT JOIN fair_share f ON f.owner = COALESCE(h.owner, '') \
             ORDER BY COALESCE(f.pass, 0.0), h.created_at, h.id LIMIT 1"
        )
    };
}

/// The `SELECT` of the id of the job a claim with `filter` takes next (its parameters: `$4` the filter's text,
/// `$5` its number): the highest priority first; within it, the owner whose fair-share pass is lowest (the
/// owner with the oldest job among equal passes); that owner's oldest job.
///
/// SQLite finds it owner by owner for the claims of an `all` process and for cohort companions: a skip scan of
/// an index (the claim index; for companions, the queued jobs' batch-key index) lists the owners waiting at
/// the top priority, and each one's oldest job is one index seek, so the claim costs a few seeks per waiting
/// owner whatever the depth of the queue. PostgreSQL (whose `SKIP LOCKED` needs one ordered scan) and worker
/// processes restricted to their models order the candidates in one statement. Both give the same job
/// (tested).
fn next_job_sql(filter: &ClaimFilter, dialect: Dialect) -> &'static str {
    match (filter, dialect) {
        (ClaimFilter::Models(None), Dialect::Sqlite) => owner_first!("AND $4 IS NULL AND $5 IS NULL", "", ""),
        (ClaimFilter::Companion { .. }, Dialect::Sqlite) => owner_first!(
            "AND batch_key = $4 AND cost <= $5",
            "AND j.batch_key = $4",
            "AND k.batch_key = $4 AND k.cost <= $5"
        ),
        (ClaimFilter::Models(_), Dialect::Sqlite) => concat!(
            "SELECT j.id FROM jobs j LEFT JOIN fair_share f ON f.owner = COALESCE(j.owner, '') \
             WHERE j.status = 'queued' \
               AND ($4 IS NULL OR j.model IN (SELECT value FROM json_each($4))) AND $5 IS NULL ",
            ordered_claim!("")
        ),
        (ClaimFilter::Models(_), Dialect::Postgres) => concat!(
            "SELECT j.id FROM jobs j LEFT JOIN fair_share f ON f.owner = COALESCE(j.owner, '') \
             WHERE j.status = 'queued' \
               AND ($4::text IS NULL OR j.model IN (SELECT json_array_elements_text($4::json))) \
               AND $5::bigint IS NULL ",
            ordered_claim!(" FOR UPDATE OF j SKIP LOCKED")
        ),
        (ClaimFilter::Companion { .. }, Dialect::Postgres) => concat!(
            "SELECT j.id FROM jobs j LEFT JOIN fair_share f ON f.owner = COALESCE(j.owner, '') \
             WHERE j.status = 'queued' AND j.batch_key = $4 AND j.cost <= $5 ",
            ordered_claim!(" FOR UPDATE OF j SKIP LOCKED")
        ),
    }
}

/// The connection pools of one backend.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// A SQLite file (or in-memory database).
    Sqlite(sqlite::SqlitePools),
    /// A PostgreSQL database shared by a fleet.
    Postgres(PgPool),
}

/// The durable job queue: a handle on the database's connection pools. Cheap to clone (the pools are shared).
#[derive(Debug, Clone)]
pub struct JobStore {
    pub(crate) backend: Backend,
}

impl JobStore {
    /// Opens the database at `database_url` and applies its backend's migrations, so the server can start
    /// against an empty data directory or an empty PostgreSQL database.
    ///
    /// `sqlite://…` and `sqlite::memory:` open SQLite (see [`sqlite::open`]); `postgres://…` or
    /// `postgresql://…` open PostgreSQL.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        let backend = if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
            Backend::Postgres(postgres::open(database_url).await?)
        } else {
            Backend::Sqlite(sqlite::open(database_url).await?)
        };
        Ok(Self { backend })
    }

    /// The PostgreSQL pool when this store is on PostgreSQL: for listeners of its notification channels.
    pub fn postgres(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool),
            Backend::Sqlite(_) => None,
        }
    }

    /// Returns the pages freed by deletions to the file system (the retention sweep calls it). SQLite only:
    /// PostgreSQL's autovacuum does this.
    pub async fn reclaim_space(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pools) => sqlite::reclaim_space(pools).await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Checks that the database answers a query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_read!(self, pool, _d => sqlx::query("SELECT 1").execute(pool).await?.rows_affected());
        Ok(())
    }

    /// Closes every connection and waits for them to finish, for a clean shutdown (SQLite checkpoints its WAL
    /// when the last connection closes). Later calls on this store or its clones fail.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(pools) => {
                pools.write.close().await;
                pools.read.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }

    /// Enqueues a job with a new UUID v7; when it returns `Ok`, the job is committed and synced to disk, so
    /// the API may answer `202 Accepted`.
    pub async fn insert(&self, new: NewJob) -> Result<Job, StoreError> {
        match self.submit(new, None, SubmitLimits::NONE).await? {
            Submission::Created(job) => Ok(job),
            other => Err(StoreError::InvalidArgument(format!("unexpected refusal without limits: {other:?}"))),
        }
    }

    /// Inserts a job under a client's `Idempotency-Key`, or returns the job that key created within the last
    /// `window` (then `false`: nothing was inserted), with no queue limits: [`submit`](Self::submit) without
    /// [`SubmitLimits`].
    pub async fn insert_idempotent(&self, new: NewJob, key: &str, window: Duration) -> Result<(Job, bool), StoreError> {
        match self.submit(new, Some((key, window).into()), SubmitLimits::NONE).await? {
            Submission::Created(job) => Ok((job, true)),
            Submission::Replayed(job) => Ok((job, false)),
            other => Err(StoreError::InvalidArgument(format!("unexpected refusal without limits: {other:?}"))),
        }
    }

    /// Deletes up to `limit` jobs that ended before `cutoff_millis` (with their image records), returning
    /// them so the caller can remove their files. For the retention sweep.
    pub async fn delete_finished_before(&self, cutoff_millis: i64, limit: u32) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<JobRow> = on_write!(self, pool, _d => sqlx::query_as(concat!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') \
             AND finished_at < $1 ORDER BY finished_at LIMIT $2) RETURNING ",
            job_columns!()
        ))
        .bind(cutoff_millis)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?);
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Reads one job, for status endpoints and SSE; `None` if there is no such job.
    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = on_read!(self, pool, _d => sqlx::query_as(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?);
        row.map(Job::try_from).transpose()
    }

    /// Takes the next job for worker `owner`: it becomes `running` with a lease of `lease` from now,
    /// `started_at` now and one more attempt charged. Which job: the highest priority; among those, the
    /// owner (API key) furthest behind in the fair-share rotation (each claim moves its owner on by
    /// 1/weight); that owner's oldest job. On PostgreSQL a job another claim has locked is skipped for the
    /// next in that order.
    ///
    /// One transaction (SQLite: it holds the write lock from its first read; PostgreSQL: it skips rows
    /// another claim has locked), so any number of workers and processes can call it concurrently and each job
    /// is handed out once. `None` when the queue is empty.
    pub async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Job>, StoreError> {
        self.claim_for(owner, lease, None).await
    }

    /// Like [`claim`](Self::claim), taking only jobs for one of `models` (`None`: any model), so a worker
    /// process never claims a job for a model it has not loaded.
    pub async fn claim_for(
        &self,
        owner: &str,
        lease: Duration,
        models: Option<&[String]>,
    ) -> Result<Option<Job>, StoreError> {
        let models = models.map(|m| serde_json::Value::from(m.to_vec()).to_string());
        self.claim_where(owner, lease, ClaimFilter::Models(models)).await
    }

    /// Claims, for the worker `owner` that has just claimed a job whose [`JobParams::batch_key`] is
    /// `batch_key`, one more queued job of the same key that costs at most `max_cost` image-steps (so the
    /// cohort stays within the worker's batch), in the usual claim order.
    ///
    /// [`JobParams::batch_key`]: crate::jobs::JobParams::batch_key
    pub async fn claim_companion(
        &self,
        owner: &str,
        lease: Duration,
        batch_key: &str,
        max_cost: u64,
    ) -> Result<Option<Job>, StoreError> {
        let max_cost = i64::try_from(max_cost).unwrap_or(i64::MAX);
        self.claim_where(owner, lease, ClaimFilter::Companion { batch_key: batch_key.to_owned(), max_cost }).await
    }

    /// The claim statement with `filter` on the candidate jobs; the owner's fair-share pass advances by one
    /// job's worth in the same transaction.
    async fn claim_where(&self, owner: &str, lease: Duration, filter: ClaimFilter) -> Result<Option<Job>, StoreError> {
        let now = now_millis();
        let rows: Vec<JobRow> = on_write!(self, pool, dialect => {
            let (text, number) = match &filter {
                ClaimFilter::Models(models) => (models.clone(), None),
                ClaimFilter::Companion { batch_key, max_cost } => (Some(batch_key.clone()), Some(*max_cost)),
            };
            let sql = format!(
                "UPDATE jobs SET status = 'running', lease_owner = $1, lease_expires_at = $2, started_at = $3, \
                     attempts = attempts + 1, cancel_requested_at = NULL \
                 WHERE status = 'queued' AND id = ({}) \
                 RETURNING {}",
                next_job_sql(&filter, dialect),
                job_columns!()
            );
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let rows: Vec<JobRow> = sqlx::query_as(&sql)
                .bind(owner)
                .bind(deadline(now, lease))
                .bind(now)
                .bind(&text)
                .bind(number)
                .fetch_all(&mut *tx)
                .await?;
            if let Some(row) = rows.first() {
                sqlx::query(
                    "INSERT INTO fair_share (owner, pass) \
                     VALUES ($1, 1.0 / COALESCE((SELECT weight FROM api_keys WHERE id = $1), 1)) \
                     ON CONFLICT (owner) DO UPDATE SET pass = fair_share.pass + excluded.pass",
                )
                .bind(row.owner.clone().unwrap_or_default())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            rows
        });
        one_job(rows)
    }

    /// Extends the lease of a running job to `lease` from now, so a long generation is not reaped.
    ///
    /// Fenced: `false` if `owner` no longer holds the job (its lease was reaped, or it already finished);
    /// the worker should then stop working on it.
    pub async fn renew(&self, id: Uuid, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let result = on_write!(self, pool, _d => sqlx::query(
            "UPDATE jobs SET lease_expires_at = $3 \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(deadline(now_millis(), lease))
        .execute(pool)
        .await?
        .rows_affected());
        Ok(result == 1)
    }

    /// Records a job's images and marks it `succeeded`, in one transaction: clients never see a succeeded job
    /// without its images, nor images of a job that a lost lease handed to someone else.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn complete(&self, id: Uuid, owner: &str, images: &[NewImage]) -> Result<bool, StoreError> {
        let bytes = images
            .iter()
            .map(|image| {
                i64::try_from(image.bytes).map_err(|_| {
                    StoreError::InvalidArgument(format!(
                        "image {} has {} bytes, more than the database can hold",
                        image.index, image.bytes
                    ))
                })
            })
            .collect::<Result<Vec<i64>, _>>()?;
        let id_text = id.to_string();
        on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let now = now_millis();
            let updated = sqlx::query(
                "UPDATE jobs SET status = 'succeeded', finished_at = $3, lease_expires_at = NULL \
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            )
            .bind(&id_text)
            .bind(owner)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            for (image, bytes) in images.iter().zip(&bytes) {
                sqlx::query(
                    "INSERT INTO images (job_id, idx, seed, width, height, format, path, sha256, bytes, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&id_text)
                .bind(i64::from(image.index))
                .bind(seed_to_db(image.seed))
                .bind(i64::from(image.width))
                .bind(i64::from(image.height))
                .bind(&image.format)
                .bind(&image.path)
                .bind(&image.sha256)
                .bind(*bytes)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            webhooks::queue_terminal!(tx, id, "completed", now);
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Marks a running job `failed` with a machine-readable `code` and a human-readable `message`.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn fail(&self, id: Uuid, owner: &str, code: &str, message: &str) -> Result<bool, StoreError> {
        let now = now_millis();
        let result = on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let updated = sqlx::query(
                "UPDATE jobs SET status = 'failed', error_code = $3, error_message = $4, finished_at = $5, \
                     lease_expires_at = NULL \
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            )
            .bind(id.to_string())
            .bind(owner)
            .bind(code)
            .bind(message)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                webhooks::queue_terminal!(tx, id, "failed", now);
            }
            tx.commit().await?;
            updated
        });
        Ok(result == 1)
    }

    /// Gives a running job back to the queue without charging the attempt (graceful shutdown: the job did
    /// nothing wrong). It keeps its place: priority and `created_at` are unchanged.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn release(&self, id: Uuid, owner: &str) -> Result<bool, StoreError> {
        let result = on_write!(self, pool, _d => sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                 lease_owner = NULL, lease_expires_at = NULL, started_at = NULL \
             WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .execute(pool)
        .await?
        .rows_affected());
        let released = result == 1;
        if released {
            self.announce_claimable().await?;
        }
        Ok(released)
    }

    /// The reaper's pass: running jobs whose lease has expired (their worker died or hung) go back to
    /// `queued` with the attempt still charged, or become `failed` with code
    /// [`MAX_ATTEMPTS_EXCEEDED`] once `attempts >= max_attempts`. One transaction.
    pub async fn recover_expired(&self) -> Result<RecoverReport, StoreError> {
        self.recover_leases_expiring_by(now_millis()).await
    }

    /// Like [`recover_expired`](Self::recover_expired) but treats *every* running job as expired, for
    /// start-up when this process is the only one using the database (the jobs' workers died with the previous
    /// run). Never call it while another process may be working on the same database.
    pub async fn recover_all_running(&self) -> Result<RecoverReport, StoreError> {
        self.recover_leases_expiring_by(i64::MAX).await
    }

    async fn recover_leases_expiring_by(&self, cutoff: i64) -> Result<RecoverReport, StoreError> {
        let now = now_millis();
        let (failed, requeued): (Vec<(String,)>, Vec<(String,)>) = on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let failed: Vec<(String,)> = sqlx::query_as(
                "UPDATE jobs SET status = 'failed', error_code = $2, \
                     error_message = 'lease expired on attempt ' || attempts || ' of ' || max_attempts, \
                     finished_at = $3, lease_expires_at = NULL \
                 WHERE status = 'running' AND lease_expires_at <= $1 AND attempts >= max_attempts \
                 RETURNING id",
            )
            .bind(cutoff)
            .bind(MAX_ATTEMPTS_EXCEEDED)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            for (job,) in &failed {
                webhooks::queue_terminal!(tx, parse_uuid("jobs", job)?, "failed", now);
            }
            // What is still running and expired after the statement above has attempts left.
            let requeued = sqlx::query_as(
                "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL \
                 WHERE status = 'running' AND lease_expires_at <= $1 \
                 RETURNING id",
            )
            .bind(cutoff)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            (failed, requeued)
        });
        if !requeued.is_empty() {
            self.announce_claimable().await?;
        }
        Ok(RecoverReport { requeued: parse_ids(requeued)?, failed: parse_ids(failed)? })
    }

    /// Tells every process on a PostgreSQL database that a job may be claimed (`NOTIFY`), so idle workers
    /// elsewhere claim it now rather than at their next poll. Nothing to do on SQLite, whose processes poll.
    pub(crate) async fn announce_claimable(&self) -> Result<(), StoreError> {
        if let Backend::Postgres(pool) = &self.backend {
            sqlx::query("SELECT pg_notify($1, '')").bind(postgres::QUEUE_CHANNEL).execute(pool).await?;
        }
        Ok(())
    }

    /// Cancels a job that no worker has claimed yet, for `DELETE /jobs/{id}` or a cancel endpoint.
    /// `false` if the job does not exist or is not queued (a running job is cancelled by its worker, which
    /// then calls [`finish_cancelled`](Self::finish_cancelled)).
    pub async fn cancel_queued(&self, id: Uuid) -> Result<bool, StoreError> {
        let now = now_millis();
        let result = on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let updated = sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2 WHERE id = $1 AND status = 'queued'",
            )
            .bind(id.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                webhooks::queue_terminal!(tx, id, "cancelled", now);
            }
            tx.commit().await?;
            updated
        });
        Ok(result == 1)
    }

    /// Asks whichever worker runs job `id` to stop it for its client: the request is recorded on the row
    /// (the worker's dispatcher checks it while the job runs) and, on PostgreSQL, announced at once on
    /// [`postgres::STOP_CHANNEL`]. `false` if the job is not running.
    pub async fn request_cancel(&self, id: Uuid) -> Result<bool, StoreError> {
        let result = on_write!(self, pool, _d => sqlx::query(
            "UPDATE jobs SET cancel_requested_at = $2 WHERE id = $1 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(now_millis())
        .execute(pool)
        .await?
        .rows_affected());
        let requested = result == 1;
        if requested {
            self.announce_stop(id).await?;
        }
        Ok(requested)
    }

    /// Tells every process on a PostgreSQL database that running job `id` must stop (it was cancelled or
    /// deleted). Nothing to do on SQLite, where dispatchers find out by checking the row.
    pub(crate) async fn announce_stop(&self, id: Uuid) -> Result<(), StoreError> {
        if let Backend::Postgres(pool) = &self.backend {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(postgres::STOP_CHANNEL)
                .bind(id.to_string())
                .execute(pool)
                .await?;
        }
        Ok(())
    }

    /// Whether worker `owner`'s running job `id` should stop: a client asked to cancel it (`Some(true)`), or
    /// `owner` no longer holds it (`None`: deleted, reaped or finished elsewhere).
    pub async fn cancel_requested(&self, id: Uuid, owner: &str) -> Result<Option<bool>, StoreError> {
        let row: Option<(Option<i64>,)> = on_read!(self, pool, _d => sqlx::query_as(
            "SELECT cancel_requested_at FROM jobs WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .fetch_optional(pool)
        .await?);
        Ok(row.map(|(at,)| at.is_some()))
    }

    /// Cancels every queued job of `owner` (its API key was revoked); returns how many.
    pub async fn cancel_queued_of(&self, owner: &str) -> Result<u64, StoreError> {
        let now = now_millis();
        let cancelled: Vec<(String,)> = on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let cancelled: Vec<(String,)> = sqlx::query_as(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2 \
                 WHERE owner = $1 AND status = 'queued' AND owner IS NOT NULL RETURNING id",
            )
            .bind(owner)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            for (job,) in &cancelled {
                webhooks::queue_terminal!(tx, parse_uuid("jobs", job)?, "cancelled", now);
            }
            tx.commit().await?;
            cancelled
        });
        Ok(cancelled.len() as u64)
    }

    /// Marks a running job `cancelled` once its worker has stopped it at a client's request.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn finish_cancelled(&self, id: Uuid, owner: &str) -> Result<bool, StoreError> {
        let now = now_millis();
        let result = on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            let updated = sqlx::query(
                "UPDATE jobs SET status = 'cancelled', finished_at = $3, lease_expires_at = NULL \
                 WHERE id = $1 AND lease_owner = $2 AND status = 'running'",
            )
            .bind(id.to_string())
            .bind(owner)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated == 1 {
                webhooks::queue_terminal!(tx, id, "cancelled", now);
            }
            tx.commit().await?;
            updated
        });
        Ok(result == 1)
    }

    /// Jobs newest first, optionally only those in `status` and only those of `owner`, starting after the job
    /// `before` (the cursor of the previous page: ids are UUID v7, so they sort by creation time). At most
    /// `limit` rows.
    pub async fn list(
        &self,
        status: Option<JobStatus>,
        owner: Option<&str>,
        before: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Job>, StoreError> {
        // Two statements, so that a tenant's listing can use the `jobs_owner` index (an `$4 IS NULL OR …`
        // condition cannot). The casts tell PostgreSQL the type of parameters that only meet `IS NULL`.
        let sql = if owner.is_some() {
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE owner = $4 AND (CAST($1 AS TEXT) IS NULL OR status = $1) \
                 AND (CAST($2 AS TEXT) IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
            )
        } else {
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE (CAST($1 AS TEXT) IS NULL OR status = $1) AND (CAST($2 AS TEXT) IS NULL OR id < $2) \
                 AND CAST($4 AS TEXT) IS NULL ORDER BY id DESC LIMIT $3"
            )
        };
        let rows: Vec<JobRow> = on_read!(self, pool, _d => sqlx::query_as(sql)
            .bind(status.map(JobStatus::as_str))
            .bind(before.map(|id| id.to_string()))
            .bind(i64::from(limit))
            .bind(owner)
            .fetch_all(pool)
            .await?);
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Deletes a job and (by cascade) its image records. Returns whether it existed. The caller removes the
    /// image files and stops the job first if it was running; a worker that finishes later is fenced out.
    pub async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let result = on_write!(self, pool, _d => sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id.to_string())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(result == 1)
    }

    /// A job's images in index order, for the job status body and image listings (empty if none).
    pub async fn images(&self, job_id: Uuid) -> Result<Vec<ImageRecord>, StoreError> {
        let rows: Vec<ImageRow> = on_read!(self, pool, _d =>
            sqlx::query_as(concat!("SELECT ", image_columns!(), " FROM images WHERE job_id = $1 ORDER BY idx"))
                .bind(job_id.to_string())
                .fetch_all(pool)
                .await?);
        rows.into_iter().map(ImageRecord::try_from).collect()
    }

    /// One image of a job, for `GET /jobs/{id}/images/{idx}`; `None` if there is no such image.
    pub async fn image(&self, job_id: Uuid, idx: u32) -> Result<Option<ImageRecord>, StoreError> {
        let row: Option<ImageRow> = on_read!(self, pool, _d =>
            sqlx::query_as(concat!("SELECT ", image_columns!(), " FROM images WHERE job_id = $1 AND idx = $2"))
                .bind(job_id.to_string())
                .bind(i64::from(idx))
                .fetch_optional(pool)
                .await?);
        row.map(ImageRecord::try_from).transpose()
    }

    /// The number of jobs in each status, for the queue-depth gauges.
    pub async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let rows: Vec<(String, i64)> = on_read!(self, pool, _d =>
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetch_all(pool).await?);
        let mut counts = StatusCounts::default();
        for (status, n) in rows {
            let status = parse_status(&status)?;
            *counts.get_mut(status) = non_negative("jobs", "count", n)?;
        }
        Ok(counts)
    }
}

/// `now + lease` in unix milliseconds, saturating instead of overflowing for absurd leases.
fn deadline(now: i64, lease: Duration) -> i64 {
    now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
