//! Submitting a job: idempotency replay, the queue and per-key limits, and the insert, in one transaction.

use uuid::Uuid;

use super::super::error::StoreError;
use super::super::model::{IdempotencyKey, NewJob, Submission, SubmitLimits};
use super::super::time::now_millis;
use super::rows::{non_negative, one_job, JobRow};
use super::{job_columns, postgres, Dialect, JobStore};

/// The job `key` already made for `owner` within its window (`Replayed`, or `KeyReused` when the request
/// differs), after clearing the key from jobs older than the window. A macro over the transaction `$tx` so
/// that it compiles for either backend's connection.
macro_rules! replay {
    ($tx:expr, $key:expr, $owner:expr, $now:expr) => {{
        let IdempotencyKey { key, fingerprint, window } = $key;
        let cutoff = $now - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE jobs SET idempotency_key = NULL \
             WHERE COALESCE(owner, '') = COALESCE($3, '') AND idempotency_key = $1 AND created_at < $2",
        )
        .bind(key)
        .bind(cutoff)
        .bind($owner)
        .execute(&mut *$tx)
        .await?;
        let existing: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, idempotency_fingerprint FROM jobs \
             WHERE COALESCE(owner, '') = COALESCE($2, '') AND idempotency_key = $1",
        )
        .bind(key)
        .bind($owner)
        .fetch_optional(&mut *$tx)
        .await?;
        match existing {
            None => None,
            Some((id, recorded)) => {
                let differs = matches!(recorded.as_deref(), Some(first) if !first.is_empty() && first != fingerprint);
                if differs && !fingerprint.is_empty() {
                    Some(Submission::KeyReused)
                } else {
                    let rows: Vec<JobRow> =
                        sqlx::query_as(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1"))
                            .bind(&id)
                            .fetch_all(&mut *$tx)
                            .await?;
                    one_job(rows)?.map(Submission::Replayed)
                }
            }
        }
    }};
}

/// Why `$new` may not be inserted now, if it may not: the queue, the owner's outstanding jobs or its stored
/// bytes at their limits, counted inside the caller's write transaction `$tx` (which holds the submission
/// lock), so racing submissions cannot overshoot them.
macro_rules! refusal {
    ($tx:expr, $new:expr, $limits:expr) => {{
        let (new, limits): (&NewJob, SubmitLimits) = ($new, $limits);
        let mut refusal = None;
        if limits.max_queued != u64::MAX {
            let (queued,): (i64,) =
                sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetch_one(&mut *$tx).await?;
            let queued = non_negative("jobs", "count", queued)?;
            if queued >= limits.max_queued {
                refusal = Some(Submission::QueueFull { queued });
            }
        }
        if let (None, Some(owner)) = (&refusal, &new.owner) {
            if limits.max_outstanding_per_owner != u64::MAX {
                let (outstanding,): (i64,) = sqlx::query_as(
                    // `owner IS NOT NULL` repeats the partial index's condition so the planner can pick it.
                    "SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status IN ('queued', 'running') \
                     AND owner IS NOT NULL",
                )
                .bind(owner)
                .fetch_one(&mut *$tx)
                .await?;
                let outstanding = non_negative("jobs", "count", outstanding)?;
                if outstanding >= limits.max_outstanding_per_owner {
                    refusal = Some(Submission::OwnerBusy { outstanding });
                }
            }
        }
        if let (None, Some(owner)) = (&refusal, &new.owner) {
            if limits.max_stored_bytes_per_owner != u64::MAX {
                // Bytes the owner's jobs keep stored: their inputs and their images.
                let (stored,): (i64,) = sqlx::query_as(
                    "SELECT CAST(COALESCE((SELECT SUM(input_bytes) FROM jobs WHERE owner = $1 AND owner IS NOT NULL), 0) \
                     + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs j ON j.id = i.job_id \
                                 WHERE j.owner = $1), 0) AS BIGINT)",
                )
                .bind(owner)
                .fetch_one(&mut *$tx)
                .await?;
                let stored = non_negative("jobs", "stored bytes", stored)?;
                if stored.saturating_add(new.input_bytes) > limits.max_stored_bytes_per_owner {
                    refusal = Some(Submission::OverQuota { stored });
                }
            }
        }
        refusal
    }};
}

impl JobStore {
    /// Submits a job in one write transaction: first the job an `Idempotency-Key` created within its window
    /// (keys are per owner: another API key's job is never returned), then the queue-depth and per-owner
    /// limits, then the insert. The transaction holds the database's submission lock (SQLite's write lock;
    /// a PostgreSQL advisory lock), so the limits are counted with no other submission in between, in this
    /// process or another one on the same database, and two racing requests with the same key get the same
    /// job. On PostgreSQL the commit also notifies idle workers of every process.
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
        let owner = new.owner.as_deref();
        on_write!(self, pool, dialect => {
            let mut tx = pool.begin_with(dialect.begin()).await?;
            if dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(postgres::SUBMIT_LOCK).execute(&mut *tx).await?;
            }
            if let Some(key) = idempotency {
                if let Some(answer) = replay!(tx, key, owner, now) {
                    tx.commit().await?;
                    return Ok(answer);
                }
            }
            if let Some(refusal) = refusal!(tx, &new, limits) {
                return Ok(refusal);
            }
            let rows: Vec<JobRow> = sqlx::query_as(concat!(
                "INSERT INTO jobs (id, kind, status, model, params, priority, attempts, max_attempts, created_at, \
                 idempotency_key, owner, idempotency_fingerprint, input_bytes) \
                 VALUES ($1, $2, 'queued', $3, $4, $5, 0, $6, $7, $8, $9, $10, $11) RETURNING ",
                job_columns!()
            ))
            .bind(Uuid::now_v7().to_string())
            .bind(new.params.kind())
            .bind(&new.model)
            .bind(new.params.encode())
            .bind(i64::from(new.priority))
            .bind(i64::from(new.max_attempts))
            .bind(now)
            .bind(idempotency.map(|i| i.key))
            .bind(owner)
            .bind(idempotency.map(|i| i.fingerprint).filter(|f| !f.is_empty()))
            .bind(i64::try_from(new.input_bytes).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            if let Some(row) = rows.first() {
                super::webhooks::attach_webhook!(tx, &row.id, new.webhook.as_ref());
            }
            if dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_notify($1, '')").bind(postgres::QUEUE_CHANNEL).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            let job = one_job(rows)?.ok_or_else(|| StoreError::corrupt("jobs", "INSERT … RETURNING returned no row"))?;
            Ok(Submission::Created(job))
        })
    }
}
