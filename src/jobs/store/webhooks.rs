//! The webhook outbox: every statement on `job_webhooks` and `webhook_deliveries`.
//!
//! A job's webhook is recorded in the transaction that inserts the job ([`attach_webhook!`], from
//! `submit.rs`). Each terminal transition of the store queues the job's terminal delivery in its own
//! transaction ([`queue_terminal!`]), so an event is never lost between the job ending and the row being
//! written; `started` is queued just after the claim ([`JobStore::queue_started`]), best effort. Senders
//! claim due rows under a lease ([`JobStore::claim_deliveries`]; on PostgreSQL with `FOR UPDATE SKIP
//! LOCKED`, so two processes never take the same row) and record each attempt's outcome fenced by that
//! lease ([`JobStore::record_attempt`]).

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use uuid::Uuid;

use super::super::error::StoreError;
use super::super::time::now_millis;
use super::rows::{parse_uuid, to_u32};
use super::{Dialect, JobStore};

/// A job's webhook as submitted: where its events go and whether `started` goes too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobWebhook {
    /// The effective URL (the job's own, or its key's default), checked at submission.
    pub url: String,
    /// Whether the `started` event is delivered besides the terminal one.
    pub started: bool,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not yet delivered: waiting for its first attempt or for a retry.
    Pending,
    /// A receiver answered 2xx.
    Delivered,
    /// Every allowed attempt failed; no more will be made.
    Failed,
}

impl DeliveryStatus {
    fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "pending" => Ok(Self::Pending),
            "delivered" => Ok(Self::Delivered),
            "failed" => Ok(Self::Failed),
            other => Err(StoreError::corrupt("webhook_deliveries", format!("unknown status {other:?}"))),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

/// A job's webhook as its view shows it: the URL and its latest delivery (the terminal one once queued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookState {
    /// Where its events go.
    pub url: String,
    /// The event the status is about; `None` before any was queued.
    pub event: Option<String>,
    /// That delivery's state (`Pending` before any was queued).
    pub status: DeliveryStatus,
    /// Attempts made for that delivery.
    pub attempts: u32,
    /// Why its last attempt failed.
    pub last_error: Option<String>,
}

/// A delivery claimed by a sender for one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedDelivery {
    /// The `webhook-id`.
    pub id: String,
    /// The job the event is about.
    pub job_id: Uuid,
    /// `started`, `completed`, `failed` or `cancelled`.
    pub event: String,
    /// `started`: the job's attempt number.
    pub job_attempt: Option<u32>,
    /// Attempts begun, this one included.
    pub attempts: u32,
    /// When the event happened (unix milliseconds).
    pub created_at: i64,
}

/// Where a claimed delivery goes and who signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryTarget {
    /// The job's webhook URL.
    pub url: String,
    /// The job's API key id (`None`: submitted without a key; the config's secret signs).
    pub owner: Option<String>,
    /// That key's secret (`whsec_…`), if it has one.
    pub key_secret: Option<String>,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// It failed; try again at `at` (unix milliseconds).
    Retry {
        /// When.
        at: i64,
        /// Why it failed.
        error: String,
    },
    /// It failed and no attempt is left.
    GaveUp {
        /// Why the last attempt failed.
        error: String,
    },
}

/// The `webhook-id` of job `job`'s `event` (for `started`, of that attempt): the same on every attempt and
/// after restarts, and unique because a job ends once and starts once per attempt.
pub fn message_id(job: Uuid, event: &str, attempt: Option<u32>) -> String {
    match attempt {
        Some(attempt) => format!("msg_{}_{event}_{attempt}", job.simple()),
        None => format!("msg_{}_{event}", job.simple()),
    }
}

/// Records `$hook` (`Option<&JobWebhook>`) for the job with id text `$job_id`, inside the submitting
/// transaction `$tx`.
macro_rules! attach_webhook {
    ($tx:expr, $job_id:expr, $hook:expr) => {{
        let hook: Option<&$crate::jobs::store::JobWebhook> = $hook;
        if let Some(hook) = hook {
            sqlx::query("INSERT INTO job_webhooks (job_id, url, started) VALUES ($1, $2, $3)")
                .bind($job_id)
                .bind(&hook.url)
                .bind(i64::from(hook.started))
                .execute(&mut *$tx)
                .await?;
        }
    }};
}
pub(crate) use attach_webhook;

/// Queues the terminal `$event` (`completed`, `failed` or `cancelled`) of job `$job` (a [`Uuid`]) for
/// delivery, if it has a webhook, inside the transaction `$tx` that ends the job. `$now` is the event time.
macro_rules! queue_terminal {
    ($tx:expr, $job:expr, $event:expr, $now:expr) => {{
        let (job, event, now): (uuid::Uuid, &str, i64) = ($job, $event, $now);
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, job_id, event, job_attempt, status, attempts, next_attempt_at, \
             created_at) \
             SELECT $1, job_id, $2, NULL, 'pending', 0, $3, $3 FROM job_webhooks WHERE job_id = $4 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind($crate::jobs::store::webhooks::message_id(job, event, None))
        .bind(event)
        .bind(now)
        .bind(job.to_string())
        .execute(&mut *$tx)
        .await?;
    }};
}
pub(crate) use queue_terminal;

/// A claimed `webhook_deliveries` row.
#[derive(FromRow)]
struct ClaimedRow {
    id: String,
    job_id: String,
    event: String,
    job_attempt: Option<i64>,
    attempts: i64,
    created_at: i64,
}

impl TryFrom<ClaimedRow> for ClaimedDelivery {
    type Error = StoreError;

    fn try_from(row: ClaimedRow) -> Result<Self, StoreError> {
        Ok(ClaimedDelivery {
            job_id: parse_uuid("webhook_deliveries", &row.job_id)?,
            job_attempt: row.job_attempt.map(|a| to_u32("webhook_deliveries", "job_attempt", a)).transpose()?,
            attempts: to_u32("webhook_deliveries", "attempts", row.attempts)?,
            id: row.id,
            event: row.event,
            created_at: row.created_at,
        })
    }
}

/// The columns [`ClaimedRow`] reads.
macro_rules! claimed_columns {
    () => {
        "id, job_id, event, job_attempt, attempts, created_at"
    };
}

impl JobStore {
    /// Queues job `job`'s `started` event of attempt `attempt`, if its webhook asked for it. Best effort,
    /// just after the claim: a crash between the claim and this write loses the `started` event (never the
    /// terminal one).
    pub async fn queue_started(&self, job: Uuid, attempt: u32) -> Result<(), StoreError> {
        let wanted: Option<(i64,)> = on_read!(self, pool, _d =>
            sqlx::query_as("SELECT started FROM job_webhooks WHERE job_id = $1")
                .bind(job.to_string())
                .fetch_optional(pool)
                .await?);
        if !matches!(wanted, Some((1,))) {
            return Ok(());
        }
        let now = now_millis();
        on_write!(self, pool, _d => sqlx::query(
            "INSERT INTO webhook_deliveries (id, job_id, event, job_attempt, status, attempts, next_attempt_at, \
             created_at) \
             SELECT $1, job_id, 'started', $2, 'pending', 0, $3, $3 FROM job_webhooks WHERE job_id = $4 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(message_id(job, "started", Some(attempt)))
        .bind(i64::from(attempt))
        .bind(now)
        .bind(job.to_string())
        .execute(pool)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Takes up to `limit` due deliveries for sender `owner`: each gets one more attempt charged and a lease
    /// until `lease_until` (unix milliseconds; an attempt cut short by a crash is due again then). A job's
    /// terminal event waits while its `started` event is pending, so receivers get them in order. Oldest due
    /// first.
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let now = now_millis();
        // A read first: most polls find nothing due, and SQLite's one write connection is better left to jobs.
        let due: Option<(i64,)> = on_read!(self, pool, _d => sqlx::query_as(
            "SELECT CAST(1 AS BIGINT) FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $1 LIMIT 1",
        )
        .bind(now)
        .fetch_optional(pool)
        .await?);
        if due.is_none() {
            return Ok(Vec::new());
        }
        let rows: Vec<ClaimedRow> = on_write!(self, pool, dialect => {
            let sql = match dialect {
                Dialect::Sqlite => concat!(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_owner = $1, next_attempt_at = $2 \
                     WHERE status = 'pending' AND next_attempt_at <= $3 AND id IN ( \
                         SELECT d.id FROM webhook_deliveries d \
                         WHERE d.status = 'pending' AND d.next_attempt_at <= $3 \
                         AND NOT (d.event <> 'started' AND EXISTS (SELECT 1 FROM webhook_deliveries s \
                             WHERE s.job_id = d.job_id AND s.event = 'started' AND s.status = 'pending')) \
                         ORDER BY d.next_attempt_at, d.id LIMIT $4) \
                     RETURNING ",
                    claimed_columns!()
                ),
                Dialect::Postgres => concat!(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_owner = $1, next_attempt_at = $2 \
                     WHERE status = 'pending' AND next_attempt_at <= $3 AND id IN ( \
                         SELECT d.id FROM webhook_deliveries d \
                         WHERE d.status = 'pending' AND d.next_attempt_at <= $3 \
                         AND NOT (d.event <> 'started' AND EXISTS (SELECT 1 FROM webhook_deliveries s \
                             WHERE s.job_id = d.job_id AND s.event = 'started' AND s.status = 'pending')) \
                         ORDER BY d.next_attempt_at, d.id LIMIT $4 FOR UPDATE OF d SKIP LOCKED) \
                     RETURNING ",
                    claimed_columns!()
                ),
            };
            sqlx::query_as(sql)
                .bind(owner)
                .bind(lease_until)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        let mut claimed = rows.into_iter().map(ClaimedDelivery::try_from).collect::<Result<Vec<_>, _>>()?;
        claimed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(claimed)
    }

    /// Where job `job`'s deliveries go and the secret of its key; `None` if the job (or its webhook) is gone.
    pub async fn delivery_target(&self, job: Uuid) -> Result<Option<DeliveryTarget>, StoreError> {
        let row: Option<(String, Option<String>, Option<String>)> = on_read!(self, pool, _d => sqlx::query_as(
            "SELECT w.url, j.owner, k.webhook_secret FROM job_webhooks w JOIN jobs j ON j.id = w.job_id \
             LEFT JOIN api_keys k ON k.id = j.owner WHERE w.job_id = $1",
        )
        .bind(job.to_string())
        .fetch_optional(pool)
        .await?);
        Ok(row.map(|(url, owner, key_secret)| DeliveryTarget { url, owner, key_secret }))
    }

    /// Records the outcome of attempt `attempts` of delivery `id`, fenced by the claim: `false` (and nothing
    /// written) if sender `owner` no longer holds that attempt (its lease ran out and another sender took
    /// the row).
    pub async fn record_attempt(
        &self,
        id: &str,
        owner: &str,
        attempts: u32,
        outcome: &AttemptOutcome,
    ) -> Result<bool, StoreError> {
        let now = now_millis();
        let (status, next, error, finished) = match outcome {
            AttemptOutcome::Delivered => (DeliveryStatus::Delivered, now, None, Some(now)),
            AttemptOutcome::Retry { at, error } => (DeliveryStatus::Pending, *at, Some(error.as_str()), None),
            AttemptOutcome::GaveUp { error } => (DeliveryStatus::Failed, now, Some(error.as_str()), Some(now)),
        };
        let updated = on_write!(self, pool, _d => sqlx::query(
            "UPDATE webhook_deliveries SET status = $4, next_attempt_at = $5, last_error = $6, \
                 finished_at = $7, lease_owner = NULL \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $3 AND status = 'pending'",
        )
        .bind(id)
        .bind(owner)
        .bind(i64::from(attempts))
        .bind(status.as_str())
        .bind(next)
        .bind(error)
        .bind(finished)
        .execute(pool)
        .await?
        .rows_affected());
        Ok(updated == 1)
    }

    /// Job `job`'s webhook for its view: the URL and its latest delivery, the terminal one once queued.
    /// `None` when the job has no webhook.
    pub async fn webhook_state(&self, job: Uuid) -> Result<Option<WebhookState>, StoreError> {
        type Row = (String, Option<String>, Option<String>, Option<i64>, Option<String>);
        let row: Option<Row> = on_read!(self, pool, _d => sqlx::query_as(
            "SELECT w.url, d.event, d.status, d.attempts, d.last_error FROM job_webhooks w \
             LEFT JOIN webhook_deliveries d ON d.job_id = w.job_id WHERE w.job_id = $1 \
             ORDER BY CASE WHEN d.event = 'started' THEN 0 ELSE 1 END DESC, d.created_at DESC, d.id DESC LIMIT 1",
        )
        .bind(job.to_string())
        .fetch_optional(pool)
        .await?);
        let Some((url, event, status, attempts, last_error)) = row else { return Ok(None) };
        Ok(Some(WebhookState {
            url,
            event,
            status: status.as_deref().map_or(Ok(DeliveryStatus::Pending), DeliveryStatus::parse)?,
            attempts: attempts.map_or(Ok(0), |a| to_u32("webhook_deliveries", "attempts", a))?,
            last_error,
        }))
    }
}
