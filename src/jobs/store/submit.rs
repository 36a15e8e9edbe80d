//! Submitting a job: idempotency replay, the queue and per-key limits, and the insert, in one transaction.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::super::error::StoreError;
use super::super::model::{IdempotencyKey, Job, NewJob, RateState, Submission, SubmitLimits};
use super::super::time::now_millis;
use super::rows::{non_negative, one_job, JobRow};
use super::usage::{outstanding_sql, stored_bytes_sql, DAY_MILLIS};
use super::{job_columns, postgres, Backend, Dialect, JobStore};

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

/// Queued jobs, counted inside the transaction `$tx`: on SQLite from the per-priority counts its triggers
/// keep (`queue_levels`), on PostgreSQL by counting the rows.
macro_rules! queued_count {
    ($tx:expr, $dialect:expr) => {{
        let sql = match $dialect {
            Dialect::Sqlite => "SELECT COALESCE(SUM(queued), 0) FROM queue_levels",
            Dialect::Postgres => "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
        };
        let (queued,): (i64,) = sqlx::query_as(sql).fetch_one(&mut *$tx).await?;
        non_negative("jobs", "count", queued)?
    }};
}

/// Why `$new` may not be inserted now, if it may not: the queue, the owner's outstanding jobs or its stored
/// bytes at their limits, counted inside the caller's write transaction `$tx` (which holds the submission
/// lock), so racing submissions cannot overshoot them.
macro_rules! refusal {
    ($tx:expr, $dialect:expr, $new:expr, $limits:expr, $queued:expr) => {{
        let (new, limits, known): (&NewJob, SubmitLimits, Option<u64>) = ($new, $limits, $queued);
        let mut refusal = None;
        if limits.max_queued != u64::MAX {
            let queued = match known {
                Some(queued) => queued,
                None => queued_count!($tx, $dialect),
            };
            refusal = queue_full(queued, limits);
        }
        if let (None, Some(owner)) = (&refusal, &new.owner) {
            if limits.max_outstanding_per_owner != u64::MAX {
                let (outstanding,): (i64,) =
                    sqlx::query_as(outstanding_sql($dialect)).bind(owner).fetch_one(&mut *$tx).await?;
                refusal = owner_busy(non_negative("jobs", "count", outstanding)?, limits);
            }
        }
        if let (None, Some(owner), Some(limit)) = (&refusal, &new.owner, limits.daily_image_steps) {
            let window: Vec<(i64, i64)> = sqlx::query_as(
                "SELECT created_at, cost FROM jobs WHERE owner = $1 AND owner IS NOT NULL AND created_at > $2 \
                 AND NOT (status = 'cancelled' AND started_at IS NULL) ORDER BY created_at",
            )
            .bind(owner)
            .bind(now_millis() - DAY_MILLIS)
            .fetch_all(&mut *$tx)
            .await?;
            refusal = over_daily_compute(&window, new.cost, limit, now_millis());
        }
        if let (None, Some(owner)) = (&refusal, &new.owner) {
            if limits.max_stored_bytes_per_owner != u64::MAX {
                // Bytes the owner's jobs keep stored: their inputs and their images.
                let (stored,): (i64,) =
                    sqlx::query_as(stored_bytes_sql($dialect)).bind(owner).fetch_one(&mut *$tx).await?;
                refusal = over_quota(non_negative("jobs", "stored bytes", stored)?, new.input_bytes, limits);
            }
        }
        refusal
    }};
}

/// The refusal of a submission whose key already has `outstanding` jobs queued or running.
fn owner_busy(outstanding: u64, limits: SubmitLimits) -> Option<Submission> {
    (outstanding >= limits.max_outstanding_per_owner).then_some(Submission::OwnerBusy { outstanding })
}

/// The refusal of a submission whose `input_bytes` would take its key's `stored` bytes past its quota.
fn over_quota(stored: u64, input_bytes: u64, limits: SubmitLimits) -> Option<Submission> {
    (stored.saturating_add(input_bytes) > limits.max_stored_bytes_per_owner).then_some(Submission::OverQuota { stored })
}

/// The refusal of a submission when `queued` jobs already wait and the queue holds `limits.max_queued`.
fn queue_full(queued: u64, limits: SubmitLimits) -> Option<Submission> {
    (queued >= limits.max_queued).then_some(Submission::QueueFull { queued })
}

/// Takes one submission from `$owner`'s token bucket of `$rate` per minute, or says when one will be there.
macro_rules! take_token {
    ($tx:expr, $dialect:expr, $owner:expr, $rate:expr, $now:expr) => {{
        let row: Option<(f64, i64)> = sqlx::query_as("SELECT tokens, updated_at FROM rate_buckets WHERE owner = $1")
            .bind($owner)
            .fetch_optional(&mut *$tx)
            .await?;
        let tokens = refilled(row, $rate, $now);
        if tokens < 1.0 {
            let state = RateState { limit: $rate, remaining: 0, reset_seconds: seconds_to_full(tokens, $rate) };
            let retry_after_ms = ((1.0 - tokens) * 60_000.0 / f64::from($rate)).ceil() as u64;
            Some(Submission::RateLimited { state, retry_after_ms })
        } else {
            sqlx::query(
                "INSERT INTO rate_buckets (owner, tokens, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (owner) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at",
            )
            .bind($owner)
            .bind(tokens - 1.0)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
            None
        }
    }};
}

/// An owner that had nothing queued joins the fair-share rotation at the virtual time of the owners already
/// waiting, neither ahead of them with credit saved while idle nor behind them.
/// SQLite condition: the owner `$owner` (an SQL expression; `''` stands for jobs without an owner too) has
/// queued jobs. One seek per priority level that has queued jobs (`queue_levels`), so its cost does not grow
/// with the queue.
macro_rules! waiting_sqlite {
    ($owner:literal) => {
        concat!(
            "(EXISTS (SELECT 1 FROM queue_levels l WHERE l.queued > 0 AND EXISTS (SELECT 1 FROM jobs j \
                 WHERE j.status = 'queued' AND j.priority = l.priority AND j.owner = ", $owner, ")) \
             OR (", $owner, " = '' AND EXISTS (SELECT 1 FROM queue_levels l WHERE l.queued > 0 AND EXISTS ( \
                 SELECT 1 FROM jobs j WHERE j.status = 'queued' AND j.priority = l.priority AND j.owner IS NULL))))"
        )
    };
}

#[cfg(test)]
pub(super) use waiting_sqlite;

macro_rules! join_rotation {
    ($tx:expr, $dialect:expr, $owner:expr) => {{
        let waiting_sql = match $dialect {
            // Per priority level with queued jobs, one seek in the claim index (which orders a level by owner).
            Dialect::Sqlite => concat!("SELECT 1 WHERE ", waiting_sqlite!("$1"), " LIMIT 1"),
            Dialect::Postgres => "SELECT 1 FROM jobs WHERE status = 'queued' AND COALESCE(owner, '') = $1 LIMIT 1",
        };
        let waiting: Option<i32> = sqlx::query_scalar(waiting_sql).bind($owner).fetch_optional(&mut *$tx).await?;
        if waiting.is_none() {
            let sql = match $dialect {
                // The owners in the rotation that have queued jobs, each checked by seeks as above.
                Dialect::Sqlite => concat!(
                    "INSERT INTO fair_share (owner, pass) VALUES ($1, (SELECT COALESCE(MIN(f.pass), 0.0) FROM \
                     fair_share f WHERE ",
                    waiting_sqlite!("f.owner"),
                    ")) ON CONFLICT (owner) DO UPDATE SET pass = MAX(fair_share.pass, excluded.pass)"
                ),
                Dialect::Postgres => {
                    "INSERT INTO fair_share (owner, pass) VALUES ($1, (SELECT COALESCE(MIN(f.pass), 0.0) FROM \
                     fair_share f WHERE f.owner IN (SELECT COALESCE(owner, '') FROM jobs WHERE status = 'queued'))) \
                     ON CONFLICT (owner) DO UPDATE SET pass = GREATEST(fair_share.pass, excluded.pass)"
                }
            };
            sqlx::query(sql).bind($owner).execute(&mut *$tx).await?;
        }
    }};
}

/// Refuses a job of `cost` image-steps when the owner's `window` of (created_at, cost) in the last 24 hours
/// leaves no room under `limit`; the wait is until enough of the window ages out (a day for a job that can
/// never fit).
fn over_daily_compute(window: &[(i64, i64)], cost: u64, limit: u64, now: i64) -> Option<Submission> {
    let used: u64 = window.iter().map(|(_, c)| u64::try_from(*c).unwrap_or(0)).sum();
    if used.saturating_add(cost) <= limit {
        return None;
    }
    let mut left = used;
    let mut retry_after_ms = DAY_MILLIS as u64;
    if cost <= limit {
        for (created_at, c) in window {
            left = left.saturating_sub(u64::try_from(*c).unwrap_or(0));
            if left.saturating_add(cost) <= limit {
                retry_after_ms = u64::try_from(created_at + DAY_MILLIS - now).unwrap_or(0).max(1);
                break;
            }
        }
    }
    Some(Submission::ComputeExhausted { used, limit, retry_after_ms })
}

/// A bucket's tokens now: what it held, plus a minute's `rate` per minute since, at most `rate`; a new
/// bucket starts full.
pub(super) fn refilled(row: Option<(f64, i64)>, rate: u32, now: i64) -> f64 {
    let rate = f64::from(rate);
    match row {
        None => rate,
        Some((tokens, at)) => (tokens + (now - at).max(0) as f64 * rate / 60_000.0).min(rate),
    }
}

/// Seconds until a bucket holding `tokens` of `rate` is full again.
pub(super) fn seconds_to_full(tokens: f64, rate: u32) -> u64 {
    ((f64::from(rate) - tokens).max(0.0) * 60.0 / f64::from(rate)).ceil() as u64
}

/// The columns a submission writes, in the order of its `VALUES`: the single insert of [`submit_in!`] and
/// the many-row insert of a group's plain submissions ([`insert_plain`]) share it.
macro_rules! inserted_columns {
    () => {
        "(id, kind, status, model, params, priority, attempts, max_attempts, created_at, idempotency_key, owner, \
         idempotency_fingerprint, input_bytes, cost, batch_key)"
    };
}

/// One submission inside the open write transaction `$tx`: the idempotency replay, the limits, the rate
/// bucket, the insert. Evaluates to `Result<(Submission, bool), StoreError>`, the bool saying whether what it
/// wrote must be committed (a refusal by the limits wrote nothing worth keeping).
macro_rules! submit_in {
    ($tx:expr, $dialect:expr, $new:expr, $idempotency:expr, $limits:expr, $queued:expr) => {
        async {
            let (new, idempotency, limits, dialect): (&NewJob, Option<IdempotencyKey<'_>>, SubmitLimits, Dialect) =
                ($new, $idempotency, $limits, $dialect);
            let now = now_millis();
            let owner = new.owner.as_deref();
            if let Some(key) = idempotency {
                if let Some(answer) = replay!($tx, key, owner, now) {
                    return Ok((answer, true));
                }
            }
            if let Some(refusal) = refusal!($tx, dialect, new, limits, $queued) {
                return Ok((refusal, false));
            }
            if let (Some(owner), Some(rate)) = (owner, limits.rate_per_minute) {
                if let Some(refusal) = take_token!($tx, dialect, owner, rate, now) {
                    return Ok((refusal, true));
                }
            }
            join_rotation!($tx, dialect, owner.unwrap_or(""));
            let rows: Vec<JobRow> = sqlx::query_as(concat!(
                "INSERT INTO jobs ",
                inserted_columns!(),
                " VALUES ($1, $2, 'queued', $3, $4, $5, 0, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING ",
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
            .bind(i64::try_from(new.cost).unwrap_or(i64::MAX))
            .bind(new.params.batch_key(&new.model))
            .fetch_all(&mut *$tx)
            .await?;
            if let Some(row) = rows.first() {
                super::webhooks::attach_webhook!($tx, &row.id, new.webhook.as_ref());
            }
            if dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_notify($1, '')").bind(postgres::QUEUE_CHANNEL).execute(&mut *$tx).await?;
            }
            let job =
                one_job(rows)?.ok_or_else(|| StoreError::corrupt("jobs", "INSERT … RETURNING returned no row"))?;
            Ok::<_, StoreError>((Submission::Created(job), true))
        }
        .await
    };
}

impl JobStore {
    /// Where `owner`'s bucket of `rate` submissions per minute stands now (read only).
    pub async fn rate_state(&self, owner: &str, rate: u32) -> Result<RateState, StoreError> {
        let row: Option<(f64, i64)> = super::on_read!(self, pool, _d =>
            sqlx::query_as("SELECT tokens, updated_at FROM rate_buckets WHERE owner = $1")
                .bind(owner)
                .fetch_optional(pool)
                .await?);
        let tokens = refilled(row, rate, now_millis());
        Ok(RateState { limit: rate, remaining: tokens.floor() as u32, reset_seconds: seconds_to_full(tokens, rate) })
    }

    /// Submits a job in one write transaction: first the job an `Idempotency-Key` created within its window
    /// (keys are per owner: another API key's job is never returned), then the queue-depth and per-owner
    /// limits, then the insert. The transaction holds the database's submission lock (SQLite's write lock;
    /// a PostgreSQL advisory lock), so the limits are counted with no other submission in between, in this
    /// process or another one on the same database, and two racing requests with the same key get the same
    /// job. On PostgreSQL the commit also notifies idle workers of every process.
    ///
    /// On SQLite, submissions that arrive while a commit is being synced wait for the next one and share it
    /// (group commit, see [`GroupCommit`]): each still returns only after the commit that holds it.
    pub async fn submit(
        &self,
        new: NewJob,
        idempotency: Option<IdempotencyKey<'_>>,
        limits: SubmitLimits,
    ) -> Result<Submission, StoreError> {
        if new.max_attempts == 0 {
            return Err(StoreError::InvalidArgument("max_attempts must be at least 1".into()));
        }
        match &self.backend {
            Backend::Sqlite(pools) => pools.submissions.submit(new, idempotency, limits).await,
            Backend::Postgres(pool) => {
                let dialect = Dialect::Postgres;
                let mut tx = pool.begin_with(dialect.begin()).await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(postgres::SUBMIT_LOCK).execute(&mut *tx).await?;
                let (answer, keep) = submit_in!(tx, dialect, &new, idempotency, limits, None)?;
                if keep {
                    tx.commit().await?;
                }
                Ok(answer)
            }
        }
    }
}

/// How many submissions one SQLite commit holds at most.
const GROUP_LIMIT: usize = 256;

/// How many submissions may wait for the group-commit task before callers wait to hand theirs over.
const GROUP_QUEUE: usize = 4096;

/// A submission waiting for its group's commit.
struct PendingSubmission {
    new: NewJob,
    idempotency: Option<OwnedIdempotencyKey>,
    limits: SubmitLimits,
    reply: oneshot::Sender<Result<Submission, StoreError>>,
}

/// [`IdempotencyKey`] with owned strings, to wait in the queue.
struct OwnedIdempotencyKey {
    key: String,
    fingerprint: String,
    window: std::time::Duration,
}

impl OwnedIdempotencyKey {
    fn borrowed(&self) -> IdempotencyKey<'_> {
        IdempotencyKey { key: &self.key, fingerprint: &self.fingerprint, window: self.window }
    }
}

/// Group commit for SQLite submissions: one task owns the write connection's submission transactions and
/// commits every submission that arrived while the previous commit was being synced in one transaction, each
/// inside its own savepoint (a refused or failing submission rolls back alone). The durability of each `202`
/// is unchanged (an answer leaves only after the commit that holds its job, with `synchronous=FULL`), but
/// one sync serves many jobs instead of one, and no request handler can be cancelled half-way through a
/// write transaction.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    queue: mpsc::Sender<PendingSubmission>,
    /// Group transactions run so far (read by the tests that check submissions are grouped).
    #[cfg_attr(not(test), allow(dead_code))]
    commits: Arc<AtomicU64>,
}

impl std::fmt::Debug for PendingSubmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSubmission").field("model", &self.new.model).finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the task that commits submissions on `write`, SQLite's one write connection. It ends when the
    /// last handle is dropped.
    pub(crate) fn start(write: SqlitePool) -> Self {
        let (queue, pending) = mpsc::channel(GROUP_QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(run_groups(write, pending, commits.clone()));
        Self { queue, commits }
    }

    /// How many group transactions the task has run.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    async fn submit(
        &self,
        new: NewJob,
        idempotency: Option<IdempotencyKey<'_>>,
        limits: SubmitLimits,
    ) -> Result<Submission, StoreError> {
        let idempotency = idempotency.map(|i| OwnedIdempotencyKey {
            key: i.key.to_owned(),
            fingerprint: i.fingerprint.to_owned(),
            window: i.window,
        });
        let (reply, answer) = oneshot::channel();
        let pending = PendingSubmission { new, idempotency, limits, reply };
        self.queue.send(pending).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Takes whatever submissions are waiting (at most [`GROUP_LIMIT`]) and commits them together, until every
/// [`GroupCommit`] handle is gone.
async fn run_groups(write: SqlitePool, mut pending: mpsc::Receiver<PendingSubmission>, commits: Arc<AtomicU64>) {
    let mut group = Vec::with_capacity(GROUP_LIMIT);
    let mut held: Option<(PoolConnection<sqlx::Sqlite>, Instant)> = None;
    while pending.recv_many(&mut group, GROUP_LIMIT).await > 0 {
        metrics::histogram!("denoised_submissions_per_commit").record(group.len() as f64);
        let connection = match held.take() {
            Some(held) => Ok(held),
            None => write.acquire().await.map(|connection| (connection, Instant::now())),
        };
        let answers = match connection {
            Ok((mut connection, since)) => {
                let answers = commit_group(&mut connection, &group).await;
                // While submissions keep coming, the next group reuses the connection (handing it back costs
                // a round trip to its thread), for a bounded time so that the workers' writes get their turn.
                if !pending.is_empty() && since.elapsed() < HOLD_WRITE_CONNECTION {
                    held = Some((connection, since));
                }
                answers
            }
            Err(error) => everyone_fails(group.len(), error.into()),
        };
        commits.fetch_add(1, Ordering::Relaxed);
        for (submission, answer) in group.drain(..).zip(answers) {
            // The caller may have gone (a closed connection): its job stays committed, like any job whose
            // `202` was lost on the way.
            let _ = submission.reply.send(answer);
        }
    }
}

/// How long the group-commit task keeps the write connection for consecutive groups at most.
const HOLD_WRITE_CONNECTION: Duration = Duration::from_millis(10);

/// The same failure as every answer of a group of `size`.
fn everyone_fails(size: usize, error: StoreError) -> Vec<Result<Submission, StoreError>> {
    let cause = Arc::new(error);
    (0..size).map(|_| Err(StoreError::Group(cause.clone()))).collect()
}

/// Runs every submission of `group` in one write transaction and commits; the answers are in `group`'s
/// order. When the transaction cannot be opened or committed, every answer is that error.
///
/// A submission that writes state of its own (an idempotency key, a key's rate or daily compute, a webhook)
/// runs alone inside a savepoint, so that a refused or failing one rolls back alone. The others ([`plain`])
/// only need the queue's length and their key's totals (jobs outstanding, bytes stored), which the group
/// reads once and keeps up to date: they are judged in arrival order by the same rules ([`queue_full`],
/// [`owner_busy`], [`over_quota`]) and inserted together by one statement ([`insert_plain`]), after those
/// with state of their own. Per submission that is one row of a statement instead of four to six
/// statements (savepoint, limits, rotation check, insert, release), each a round trip to the database
/// thread, which was what limited how many submissions one write connection took per second.
async fn commit_group(
    connection: &mut sqlx::SqliteConnection,
    group: &[PendingSubmission],
) -> Vec<Result<Submission, StoreError>> {
    let dialect = Dialect::Sqlite;
    let everyone_fails = |error: StoreError| everyone_fails(group.len(), error);
    let mut tx = match sqlx::Connection::begin_with(connection, dialect.begin()).await {
        Ok(tx) => tx,
        Err(error) => return everyone_fails(error.into()),
    };
    // The queue's length, counted once for the group (no other write runs until it commits) and kept up to
    // date by its inserts, instead of once per submission.
    let mut queued = None;
    if group.iter().any(|s| s.limits.max_queued != u64::MAX) {
        match count_queued(&mut tx).await {
            Ok(count) => queued = Some(count),
            Err(error) => return everyone_fails(error),
        }
    }
    let mut answers: Vec<Option<Result<Submission, StoreError>>> = group.iter().map(|_| None).collect();
    for (submission, answer) in group.iter().zip(answers.iter_mut()) {
        if !plain(submission) {
            *answer = Some(submit_counted(&mut tx, submission, &mut queued).await);
        }
    }
    // The keys' totals, read once per key for the group and kept up to date by its accepted submissions.
    let mut totals: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut accepted = Vec::new();
    for (index, submission) in group.iter().enumerate().filter(|(_, s)| plain(s)) {
        let waiting = queued.map(|count| count + accepted.len() as u64);
        let mut refusal = waiting.and_then(|count| queue_full(count, submission.limits));
        let limits = submission.limits;
        let key_limited = limits.max_outstanding_per_owner != u64::MAX || limits.max_stored_bytes_per_owner != u64::MAX;
        if let (None, Some(owner), true) = (&refusal, submission.new.owner.as_deref(), key_limited) {
            let (outstanding, stored) = match totals.get(owner) {
                Some(&known) => known,
                None => match owner_totals(&mut tx, owner).await {
                    Ok(read) => *totals.entry(owner).or_insert(read),
                    Err(error) => {
                        answers[index] = Some(Err(error));
                        continue;
                    }
                },
            };
            refusal = owner_busy(outstanding, submission.limits)
                .or_else(|| over_quota(stored, submission.new.input_bytes, submission.limits));
            if refusal.is_none() {
                totals.insert(owner, (outstanding + 1, stored.saturating_add(submission.new.input_bytes)));
            }
        }
        match refusal {
            Some(refusal) => answers[index] = Some(Ok(refusal)),
            None => accepted.push(index),
        }
    }
    for chunk in accepted.chunks(PLAIN_ROWS) {
        let plain: Vec<&PendingSubmission> = chunk.iter().map(|&i| &group[i]).collect();
        match insert_plain_in_savepoint(&mut tx, &plain).await {
            Ok(jobs) => {
                if let Some(count) = queued.as_mut() {
                    *count += jobs.len() as u64;
                }
                for (&index, job) in chunk.iter().zip(jobs) {
                    answers[index] = Some(Ok(Submission::Created(job)));
                }
            }
            // Nothing of it was kept: each submission is tried alone, so that only the one at fault fails.
            Err(_) => {
                for &index in chunk {
                    answers[index] = Some(submit_counted(&mut tx, &group[index], &mut queued).await);
                }
            }
        }
    }
    if let Err(error) = tx.commit().await {
        return everyone_fails(error.into());
    }
    answers
        .into_iter()
        .map(|answer| answer.unwrap_or_else(|| Err(StoreError::corrupt("jobs", "a submission was left unanswered"))))
        .collect()
}

/// Rows in one many-row insert at most (13 values each, well under SQLite's limit on bound values).
const PLAIN_ROWS: usize = 128;

/// Whether `submission` can be inserted with others: it writes no state of its own besides its job row (no
/// idempotency key, no webhook, no per-key rate or daily compute to take from), so what it needs to know is
/// the queue's length and its key's totals, which the group reads once and keeps up to date.
fn plain(submission: &PendingSubmission) -> bool {
    let limits = submission.limits;
    let keyed_state =
        submission.new.owner.is_some() && (limits.rate_per_minute.is_some() || limits.daily_image_steps.is_some());
    submission.idempotency.is_none() && submission.new.webhook.is_none() && !keyed_state
}

/// The key `owner`'s jobs queued or running and its stored bytes (`owner_totals`).
async fn owner_totals(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, owner: &str) -> Result<(u64, u64), StoreError> {
    let (outstanding,): (i64,) =
        sqlx::query_as(outstanding_sql(Dialect::Sqlite)).bind(owner).fetch_one(&mut **tx).await?;
    let (stored,): (i64,) = sqlx::query_as(stored_bytes_sql(Dialect::Sqlite)).bind(owner).fetch_one(&mut **tx).await?;
    Ok((non_negative("jobs", "count", outstanding)?, non_negative("jobs", "stored bytes", stored)?))
}

/// One submission alone in its savepoint, keeping the group's count of queued jobs up to date.
async fn submit_counted(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    submission: &PendingSubmission,
    queued: &mut Option<u64>,
) -> Result<Submission, StoreError> {
    let answer = submit_in_savepoint(tx, submission, *queued).await;
    if let (Ok(Submission::Created(_)), Some(count)) = (&answer, queued.as_mut()) {
        *count += 1;
    }
    answer
}

/// [`insert_plain`] inside a savepoint: on any error (the statement, or a row that does not read back as a
/// job) everything it wrote is rolled back.
async fn insert_plain_in_savepoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    plain: &[&PendingSubmission],
) -> Result<Vec<Job>, StoreError> {
    let mut savepoint = sqlx::Connection::begin(&mut **tx).await?;
    match insert_plain(&mut savepoint, plain).await {
        Ok(jobs) => {
            savepoint.commit().await?;
            Ok(jobs)
        }
        Err(error) => {
            savepoint.rollback().await?;
            Err(error)
        }
    }
}

/// Inserts `plain` submissions (see [`plain`]) with one statement, after placing each of their owners in
/// the fair-share rotation once; the jobs come back in `plain`'s order.
async fn insert_plain(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    plain: &[&PendingSubmission],
) -> Result<Vec<Job>, StoreError> {
    let dialect = Dialect::Sqlite;
    let mut owners: Vec<&str> = plain.iter().map(|s| s.new.owner.as_deref().unwrap_or("")).collect();
    owners.sort_unstable();
    owners.dedup();
    for owner in owners {
        join_rotation!(*tx, dialect, owner);
    }
    let now = now_millis();
    let ids: Vec<String> = plain.iter().map(|_| Uuid::now_v7().to_string()).collect();
    let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(concat!("INSERT INTO jobs ", inserted_columns!(), " "));
    insert.push_values(plain.iter().zip(&ids), |mut row, (submission, id)| {
        let new = &submission.new;
        row.push_bind(id.as_str())
            .push_bind(new.params.kind())
            .push_bind("queued")
            .push_bind(new.model.as_str())
            .push_bind(new.params.encode())
            .push_bind(i64::from(new.priority))
            .push_bind(0_i64)
            .push_bind(i64::from(new.max_attempts))
            .push_bind(now)
            .push_bind(None::<String>)
            .push_bind(new.owner.as_deref())
            .push_bind(None::<String>)
            .push_bind(i64::try_from(new.input_bytes).unwrap_or(i64::MAX))
            .push_bind(i64::try_from(new.cost).unwrap_or(i64::MAX))
            .push_bind(new.params.batch_key(&new.model));
    });
    insert.push(concat!(" RETURNING ", job_columns!()));
    let rows: Vec<JobRow> = insert.build_query_as().fetch_all(&mut **tx).await?;
    let mut inserted: HashMap<String, JobRow> = rows.into_iter().map(|row| (row.id.clone(), row)).collect();
    ids.iter()
        .map(|id| {
            let row = inserted.remove(id).ok_or_else(|| StoreError::corrupt("jobs", "a many-row insert lost a row"))?;
            Job::try_from(row)
        })
        .collect()
}

/// Queued jobs, inside the group's transaction.
async fn count_queued(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>) -> Result<u64, StoreError> {
    Ok(queued_count!(*tx, Dialect::Sqlite))
}

/// One submission of a group inside its own savepoint: kept when it inserted or changed state that must
/// last (a replay clears expired keys, a rate refusal drains the bucket), rolled back otherwise.
async fn submit_in_savepoint(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    submission: &PendingSubmission,
    queued: Option<u64>,
) -> Result<Submission, StoreError> {
    let dialect = Dialect::Sqlite;
    let mut savepoint = sqlx::Connection::begin(&mut **tx).await?;
    let idempotency = submission.idempotency.as_ref().map(OwnedIdempotencyKey::borrowed);
    match submit_in!(savepoint, dialect, &submission.new, idempotency, submission.limits, queued) {
        Ok((answer, true)) => {
            savepoint.commit().await?;
            Ok(answer)
        }
        Ok((answer, false)) => {
            savepoint.rollback().await?;
            Ok(answer)
        }
        Err(error) => {
            savepoint.rollback().await?;
            Err(error)
        }
    }
}
