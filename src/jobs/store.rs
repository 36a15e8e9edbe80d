//! [`JobStore`]: every SQL statement of denoised, over a SQLite file.
//!
//! The queue follows the usual shape of SQL job queues: a job is **claimed** with one atomic
//! `UPDATE … RETURNING` that marks it running under a time-limited **lease** and charges an attempt; every later
//! transition is **fenced** on `(id, lease_owner, status = 'running')`, so a worker that lost its lease (because
//! a reaper re-queued the job and another worker claimed it) cannot overwrite the new owner's work; a **reaper**
//! ([`JobStore::recover_expired`]) re-queues jobs whose lease expired, or fails them once they have used all
//! their attempts.
//!
//! Fencing compares owner strings, so each worker should use an owner that is unique to its process run
//! (e.g. host, pid and a random suffix): an owner reused after a restart could complete a job claimed by its
//! previous incarnation.
//!
//! Statements that return rows from a write (`RETURNING`) are read with `fetch_all`, which steps them to
//! completion, so the autocommit transaction is committed (and, with `synchronous=FULL`, synced) before the
//! call returns.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::FromRow;
use uuid::Uuid;

use super::error::StoreError;
use super::model::{
    IdempotencyKey, ImageRecord, Job, JobStatus, NewImage, NewJob, RecoverReport, StatusCounts, Submission,
    SubmitLimits,
};
use super::params::JobParams;
use super::time::now_millis;

/// The `error_code` of a job that failed because its lease expired on its last allowed attempt.
pub const MAX_ATTEMPTS_EXCEEDED: &str = "max_attempts_exceeded";

/// How long a statement waits for another connection's write lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRAGMA auto_vacuum`'s value for `INCREMENTAL`.
const INCREMENTAL_VACUUM: i64 = 2;

/// Connections per pool for a database file. SQLite serialises writers anyway; a few connections let reads
/// (status polls, image lookups) proceed while a write waits.
const MAX_CONNECTIONS: u32 = 8;

/// The columns of `jobs` that make a [`Job`], in [`JobRow`] order (a macro so `concat!` can build static SQL).
macro_rules! job_columns {
    () => {
        "id, kind, status, model, params, priority, attempts, max_attempts, lease_owner, error_code, \
         error_message, created_at, started_at, finished_at, owner"
    };
}

/// The columns of `images` that make an [`ImageRecord`].
macro_rules! image_columns {
    () => {
        "job_id, idx, seed, width, height, format, path, sha256, bytes, created_at"
    };
}

/// The durable job queue: a handle on a SQLite connection pool. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct JobStore {
    /// Reads (and, for in-memory databases, everything).
    pool: SqlitePool,
    /// Every write goes through this one connection, so that concurrent writers queue in order inside the
    /// process instead of polling SQLite's lock with the busy handler's sleeps (which made submissions slow
    /// under load).
    writer: SqlitePool,
}

impl JobStore {
    /// Opens (creating if missing, with its parent folder) the database at `database_url` and applies the
    /// migrations, so the server can start against an empty data directory.
    ///
    /// Accepts `sqlite://path/to/file.db` (relative or absolute: `sqlite:///abs/path.db`) and
    /// `sqlite::memory:` (for tests: one connection, since each in-memory connection is its own database).
    /// Files are opened with WAL, `synchronous=FULL` (a job is on disk before the API answers 202),
    /// a 5 s busy timeout, foreign keys on and incremental auto-vacuum (a database made before it is
    /// vacuumed once, here, to switch), so that [`JobStore::reclaim_space`] can shrink the file.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        let in_memory = database_url.contains(":memory:") || database_url.contains("mode=memory");
        let mut options = SqliteConnectOptions::from_str(database_url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(SqliteSynchronous::Full);
        if in_memory {
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?;
            sqlx::migrate!("./migrations").run(&pool).await?;
            return Ok(Self { writer: pool.clone(), pool });
        }
        options = options.journal_mode(SqliteJournalMode::Wal).auto_vacuum(SqliteAutoVacuum::Incremental);
        create_parent_dir(options.get_filename()).await?;
        let writer = SqlitePoolOptions::new().max_connections(1).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations").run(&writer).await?;
        let (mode,): (i64,) = sqlx::query_as("PRAGMA auto_vacuum").fetch_one(&writer).await?;
        if mode != INCREMENTAL_VACUUM {
            sqlx::query("PRAGMA auto_vacuum = INCREMENTAL").execute(&writer).await?;
            sqlx::query("VACUUM").execute(&writer).await?;
        }
        let pool = SqlitePoolOptions::new().max_connections(MAX_CONNECTIONS).connect_with(options).await?;
        Ok(Self { pool, writer })
    }

    /// Returns the pages freed by deletions to the file system (the retention sweep calls it), so the
    /// database file shrinks instead of keeping its largest size.
    pub async fn reclaim_space(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA incremental_vacuum").execute(&self.writer).await?;
        Ok(())
    }

    /// Checks that the database answers a query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection and waits for them to finish, for a clean shutdown (the WAL is checkpointed
    /// when the last connection closes). Later calls on this store or its clones fail.
    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
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

    /// Submits a job in one `BEGIN IMMEDIATE` transaction: first the job an `Idempotency-Key` created within
    /// its window (keys are per owner: another API key's job is never returned), then the queue-depth and
    /// per-owner limits, then the insert. Because the limits are counted inside the write transaction,
    /// concurrent submissions (in this process or another one on the same database) cannot overshoot them,
    /// and two racing requests with the same key get the same job.
    pub async fn submit(
        &self,
        new: NewJob,
        idempotency: Option<IdempotencyKey<'_>>,
        limits: SubmitLimits,
    ) -> Result<Submission, StoreError> {
        if new.max_attempts == 0 {
            return Err(StoreError::InvalidArgument("max_attempts must be at least 1".into()));
        }
        let now = now_millis();
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(key) = idempotency {
            if let Some(answer) = replay(&mut tx, key, new.owner.as_deref(), now).await? {
                tx.commit().await?;
                return Ok(answer);
            }
        }
        if let Some(refusal) = refusal(&mut tx, &new, limits).await? {
            return Ok(refusal);
        }
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "INSERT INTO jobs (id, kind, status, model, params, priority, attempts, max_attempts, created_at, \
             idempotency_key, owner, idempotency_fingerprint, input_bytes) \
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING ",
            job_columns!()
        ))
        .bind(Uuid::now_v7().to_string())
        .bind(new.params.kind())
        .bind(&new.model)
        .bind(new.params.encode())
        .bind(new.priority)
        .bind(i64::from(new.max_attempts))
        .bind(now)
        .bind(idempotency.map(|i| i.key))
        .bind(&new.owner)
        .bind(idempotency.map(|i| i.fingerprint).filter(|f| !f.is_empty()))
        .bind(i64::try_from(new.input_bytes).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let job = one_job(rows)?.ok_or_else(|| StoreError::corrupt("jobs", "INSERT … RETURNING returned no row"))?;
        Ok(Submission::Created(job))
    }

    /// Deletes up to `limit` jobs that ended before `cutoff_millis` (with their image records), returning
    /// them so the caller can remove their files. For the retention sweep.
    pub async fn delete_finished_before(&self, cutoff_millis: i64, limit: u32) -> Result<Vec<Job>, StoreError> {
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') \
             AND finished_at < ?1 ORDER BY finished_at LIMIT ?2) RETURNING ",
            job_columns!()
        ))
        .bind(cutoff_millis)
        .bind(i64::from(limit))
        .fetch_all(&self.writer)
        .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Reads one job, for status endpoints and SSE; `None` if there is no such job.
    pub async fn get(&self, id: Uuid) -> Result<Option<Job>, StoreError> {
        let row: Option<JobRow> = sqlx::query_as(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(Job::try_from).transpose()
    }

    /// Takes the next job for worker `owner`: the highest priority, then the oldest, queued job becomes
    /// `running` with a lease of `lease` from now, `started_at` now and one more attempt charged.
    ///
    /// One atomic statement (it holds SQLite's write lock from its first read), so any number of workers and
    /// processes can call it concurrently and each job is handed out once. `None` when the queue is empty.
    pub async fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Job>, StoreError> {
        let now = now_millis();
        let rows: Vec<JobRow> = sqlx::query_as(concat!(
            "UPDATE jobs SET status = 'running', lease_owner = ?1, lease_expires_at = ?2, started_at = ?3, \
                 attempts = attempts + 1 \
             WHERE status = 'queued' AND id = ( \
                 SELECT id FROM jobs WHERE status = 'queued' \
                 ORDER BY priority DESC, created_at, id LIMIT 1) \
             RETURNING ",
            job_columns!()
        ))
        .bind(owner)
        .bind(deadline(now, lease))
        .bind(now)
        .fetch_all(&self.writer)
        .await?;
        one_job(rows)
    }

    /// Extends the lease of a running job to `lease` from now, so a long generation is not reaped.
    ///
    /// Fenced: `false` if `owner` no longer holds the job (its lease was reaped, or it already finished);
    /// the worker should then stop working on it.
    pub async fn renew(&self, id: Uuid, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE jobs SET lease_expires_at = ?3 \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(deadline(now_millis(), lease))
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
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
        // IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so the transaction cannot
        // fail half-way because another connection wrote first.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_millis();
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', finished_at = ?3, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
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
        for (image, bytes) in images.iter().zip(bytes) {
            sqlx::query(
                "INSERT INTO images (job_id, idx, seed, width, height, format, path, sha256, bytes, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .bind(&id_text)
            .bind(i64::from(image.index))
            .bind(seed_to_db(image.seed))
            .bind(i64::from(image.width))
            .bind(i64::from(image.height))
            .bind(&image.format)
            .bind(&image.path)
            .bind(&image.sha256)
            .bind(bytes)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Marks a running job `failed` with a machine-readable `code` and a human-readable `message`.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn fail(&self, id: Uuid, owner: &str, code: &str, message: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE jobs SET status = 'failed', error_code = ?3, error_message = ?4, finished_at = ?5, \
                 lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(code)
        .bind(message)
        .bind(now_millis())
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives a running job back to the queue without charging the attempt (graceful shutdown: the job did
    /// nothing wrong). It keeps its place: priority and `created_at` are unchanged.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn release(&self, id: Uuid, owner: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), lease_owner = NULL, \
                 lease_expires_at = NULL, started_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let failed: Vec<(String,)> = sqlx::query_as(
            "UPDATE jobs SET status = 'failed', error_code = ?2, \
                 error_message = 'lease expired on attempt ' || attempts || ' of ' || max_attempts, \
                 finished_at = ?3, lease_expires_at = NULL \
             WHERE status = 'running' AND lease_expires_at <= ?1 AND attempts >= max_attempts \
             RETURNING id",
        )
        .bind(cutoff)
        .bind(MAX_ATTEMPTS_EXCEEDED)
        .bind(now_millis())
        .fetch_all(&mut *tx)
        .await?;
        // What is still running and expired after the statement above has attempts left.
        let requeued: Vec<(String,)> = sqlx::query_as(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL, started_at = NULL \
             WHERE status = 'running' AND lease_expires_at <= ?1 \
             RETURNING id",
        )
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RecoverReport { requeued: parse_ids(requeued)?, failed: parse_ids(failed)? })
    }

    /// Cancels a job that no worker has claimed yet, for `DELETE /jobs/{id}` or a cancel endpoint.
    /// `false` if the job does not exist or is not queued (a running job is cancelled by its worker, which
    /// then calls [`finish_cancelled`](Self::finish_cancelled)).
    pub async fn cancel_queued(&self, id: Uuid) -> Result<bool, StoreError> {
        let result =
            sqlx::query("UPDATE jobs SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'")
                .bind(id.to_string())
                .bind(now_millis())
                .execute(&self.writer)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Cancels every queued job of `owner` (its API key was revoked); returns how many.
    pub async fn cancel_queued_of(&self, owner: &str) -> Result<u64, StoreError> {
        let result = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?2 \
             WHERE owner = ?1 AND status = 'queued' AND owner IS NOT NULL",
        )
        .bind(owner)
        .bind(now_millis())
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected())
    }

    /// Marks a running job `cancelled` once its worker has stopped it at a client's request.
    ///
    /// Fenced: `false` (and nothing written) if `owner` no longer holds the job.
    pub async fn finish_cancelled(&self, id: Uuid, owner: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?3, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND status = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .bind(now_millis())
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
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
        // Two statements, so that a tenant's listing can use the `jobs_owner` index (an `?4 IS NULL OR …`
        // condition cannot).
        let sql = if owner.is_some() {
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE owner = ?4 AND (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2) \
                 ORDER BY id DESC LIMIT ?3"
            )
        } else {
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2) AND ?4 IS NULL \
                 ORDER BY id DESC LIMIT ?3"
            )
        };
        let rows: Vec<JobRow> = sqlx::query_as(sql)
            .bind(status.map(JobStatus::as_str))
            .bind(before.map(|id| id.to_string()))
            .bind(i64::from(limit))
            .bind(owner)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Deletes a job and (by cascade) its image records. Returns whether it existed. The caller removes the
    /// image files and stops the job first if it was running; a worker that finishes later is fenced out.
    pub async fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM jobs WHERE id = ?1").bind(id.to_string()).execute(&self.writer).await?;
        Ok(result.rows_affected() == 1)
    }

    /// A job's images in index order, for the job status body and image listings (empty if none).
    pub async fn images(&self, job_id: Uuid) -> Result<Vec<ImageRecord>, StoreError> {
        let rows: Vec<ImageRow> =
            sqlx::query_as(concat!("SELECT ", image_columns!(), " FROM images WHERE job_id = ?1 ORDER BY idx"))
                .bind(job_id.to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(ImageRecord::try_from).collect()
    }

    /// One image of a job, for `GET /jobs/{id}/images/{idx}`; `None` if there is no such image.
    pub async fn image(&self, job_id: Uuid, idx: u32) -> Result<Option<ImageRecord>, StoreError> {
        let row: Option<ImageRow> =
            sqlx::query_as(concat!("SELECT ", image_columns!(), " FROM images WHERE job_id = ?1 AND idx = ?2"))
                .bind(job_id.to_string())
                .bind(i64::from(idx))
                .fetch_optional(&self.pool)
                .await?;
        row.map(ImageRecord::try_from).transpose()
    }

    /// How many queued jobs will be claimed before this one (0 = next), in claim order (priority, then age);
    /// `None` if the job does not exist or is no longer queued. For clients waiting on a busy server.
    pub async fn queue_position(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        let ahead: Option<(i64,)> = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM jobs AS o WHERE o.status = 'queued' AND ( \
                     o.priority > j.priority \
                     OR (o.priority = j.priority AND o.created_at < j.created_at) \
                     OR (o.priority = j.priority AND o.created_at = j.created_at AND o.id < j.id))) \
             FROM jobs AS j WHERE j.id = ?1 AND j.status = 'queued'",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        ahead.map(|(n,)| non_negative("jobs", "queue position", n)).transpose()
    }

    /// Every queued job's id in claim order (priority, then age), for [`QueuePositions`](super::QueuePositions).
    pub async fn queued_order(&self) -> Result<Vec<Uuid>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, created_at, id")
                .fetch_all(&self.pool)
                .await?;
        parse_ids(rows)
    }

    /// The read pool, for the other tables of this database (API keys).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The write connection, for writes to the other tables of this database (API keys).
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// The number of jobs in each status, for the queue-depth gauges.
    pub async fn count_by_status(&self) -> Result<StatusCounts, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetch_all(&self.pool).await?;
        let mut counts = StatusCounts::default();
        for (status, n) in rows {
            let status = parse_status(&status)?;
            *counts.get_mut(status) = non_negative("jobs", "count", n)?;
        }
        Ok(counts)
    }
}

/// Creates the folder that will hold the SQLite file, since SQLite creates the file but not its folder.
async fn create_parent_dir(file: &Path) -> Result<(), StoreError> {
    match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| StoreError::CreateDir { path: parent.to_owned(), source }),
        _ => Ok(()),
    }
}

/// `now + lease` in unix milliseconds, saturating instead of overflowing for absurd leases.
fn deadline(now: i64, lease: Duration) -> i64 {
    now.saturating_add(i64::try_from(lease.as_millis()).unwrap_or(i64::MAX))
}

/// Seeds are u64 but SQLite integers are i64: store the i64 with the same 64 bits (two's complement), so
/// every seed round-trips exactly (seeds above `i64::MAX` read negative in raw SQL).
fn seed_to_db(seed: u64) -> i64 {
    seed as i64
}

/// The inverse of [`seed_to_db`].
fn seed_from_db(stored: i64) -> u64 {
    stored as u64
}

fn one_job(rows: Vec<JobRow>) -> Result<Option<Job>, StoreError> {
    if rows.len() > 1 {
        return Err(StoreError::corrupt("jobs", format!("a single-row statement returned {} rows", rows.len())));
    }
    rows.into_iter().next().map(Job::try_from).transpose()
}

fn parse_uuid(table: &'static str, text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::corrupt(table, format!("bad id {text:?}: {e}")))
}

fn parse_ids(rows: Vec<(String,)>) -> Result<Vec<Uuid>, StoreError> {
    rows.iter().map(|(id,)| parse_uuid("jobs", id)).collect()
}

fn parse_status(text: &str) -> Result<JobStatus, StoreError> {
    text.parse().map_err(|e| StoreError::corrupt("jobs", format!("{e}")))
}

fn to_u32(table: &'static str, column: &str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::corrupt(table, format!("{column} = {value} does not fit a u32")))
}

fn non_negative(table: &'static str, column: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(table, format!("{column} = {value} is negative")))
}

/// The job `key` already made for `owner` within its window (`Replayed`, or `KeyReused` when the request
/// differs), after clearing the key from jobs older than the window.
async fn replay(
    tx: &mut sqlx::SqliteConnection,
    IdempotencyKey { key, fingerprint, window }: IdempotencyKey<'_>,
    owner: Option<&str>,
    now: i64,
) -> Result<Option<Submission>, StoreError> {
    let cutoff = now - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE jobs SET idempotency_key = NULL \
         WHERE COALESCE(owner, '') = COALESCE(?3, '') AND idempotency_key = ?1 AND created_at < ?2",
    )
    .bind(key)
    .bind(cutoff)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    let existing: Option<JobRow> = sqlx::query_as(concat!(
        "SELECT ",
        job_columns!(),
        " FROM jobs WHERE COALESCE(owner, '') = COALESCE(?2, '') AND idempotency_key = ?1"
    ))
    .bind(key)
    .bind(owner)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = existing else { return Ok(None) };
    let (recorded,): (Option<String>,) = sqlx::query_as("SELECT idempotency_fingerprint FROM jobs WHERE id = ?1")
        .bind(&row.id)
        .fetch_one(&mut *tx)
        .await?;
    let differs = matches!(recorded.as_deref(), Some(first) if !first.is_empty() && first != fingerprint);
    if differs && !fingerprint.is_empty() {
        return Ok(Some(Submission::KeyReused));
    }
    Ok(Some(Submission::Replayed(Job::try_from(row)?)))
}

/// Why `new` may not be inserted now, if it may not: the queue, the owner's outstanding jobs or its stored
/// bytes at their limits (counted inside the caller's write transaction, so racing submissions cannot
/// overshoot them).
async fn refusal(
    tx: &mut sqlx::SqliteConnection,
    new: &NewJob,
    limits: SubmitLimits,
) -> Result<Option<Submission>, StoreError> {
    if limits.max_queued != u64::MAX {
        let (queued,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetch_one(&mut *tx).await?;
        let queued = non_negative("jobs", "count", queued)?;
        if queued >= limits.max_queued {
            return Ok(Some(Submission::QueueFull { queued }));
        }
    }
    let Some(owner) = &new.owner else { return Ok(None) };
    if limits.max_outstanding_per_owner != u64::MAX {
        let (outstanding,): (i64,) = sqlx::query_as(
            // `owner IS NOT NULL` repeats the partial index's condition so the planner can pick it.
            "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND status IN ('queued', 'running') AND owner IS NOT NULL",
        )
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let outstanding = non_negative("jobs", "count", outstanding)?;
        if outstanding >= limits.max_outstanding_per_owner {
            return Ok(Some(Submission::OwnerBusy { outstanding }));
        }
    }
    if limits.max_stored_bytes_per_owner != u64::MAX {
        let stored = stored_bytes(&mut *tx, owner).await?;
        if stored.saturating_add(new.input_bytes) > limits.max_stored_bytes_per_owner {
            return Ok(Some(Submission::OverQuota { stored }));
        }
    }
    Ok(None)
}

/// Bytes `owner`'s jobs keep stored: their inputs and their images.
async fn stored_bytes(tx: &mut sqlx::SqliteConnection, owner: &str) -> Result<u64, StoreError> {
    let (stored,): (i64,) = sqlx::query_as(
        "SELECT COALESCE((SELECT SUM(input_bytes) FROM jobs WHERE owner = ?1 AND owner IS NOT NULL), 0) \
         + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs j ON j.id = i.job_id WHERE j.owner = ?1), 0)",
    )
    .bind(owner)
    .fetch_one(tx)
    .await?;
    non_negative("jobs", "stored bytes", stored)
}

/// A `jobs` row as SQLite types, converted (and checked) into a [`Job`].
#[derive(FromRow)]
struct JobRow {
    id: String,
    kind: String,
    status: String,
    model: String,
    params: String,
    priority: i64,
    attempts: i64,
    max_attempts: i64,
    lease_owner: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    owner: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        Ok(Job {
            id: parse_uuid("jobs", &row.id)?,
            status: parse_status(&row.status)?,
            model: row.model,
            params: JobParams::decode(&row.kind, &row.params)
                .map_err(|e| StoreError::corrupt("jobs", format!("params of {}: {e}", row.id)))?,
            priority: i32::try_from(row.priority)
                .map_err(|_| StoreError::corrupt("jobs", format!("priority {} does not fit an i32", row.priority)))?,
            attempts: to_u32("jobs", "attempts", row.attempts)?,
            max_attempts: to_u32("jobs", "max_attempts", row.max_attempts)?,
            lease_owner: row.lease_owner,
            error_code: row.error_code,
            error_message: row.error_message,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            owner: row.owner,
        })
    }
}

/// An `images` row as SQLite types, converted (and checked) into an [`ImageRecord`].
#[derive(FromRow)]
struct ImageRow {
    job_id: String,
    idx: i64,
    seed: i64,
    width: i64,
    height: i64,
    format: String,
    path: String,
    sha256: String,
    bytes: i64,
    created_at: i64,
}

impl TryFrom<ImageRow> for ImageRecord {
    type Error = StoreError;

    fn try_from(row: ImageRow) -> Result<Self, StoreError> {
        let image = NewImage {
            index: to_u32("images", "idx", row.idx)?,
            seed: seed_from_db(row.seed),
            width: to_u32("images", "width", row.width)?,
            height: to_u32("images", "height", row.height)?,
            format: row.format,
            path: row.path,
            sha256: row.sha256,
            bytes: non_negative("images", "bytes", row.bytes)?,
        };
        Ok(ImageRecord { job_id: parse_uuid("images", &row.job_id)?, image, created_at: row.created_at })
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
