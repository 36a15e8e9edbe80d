//! Job events shared through the database (PostgreSQL only): every process appends the events it makes and
//! reads everyone's back in one order, so a follower on any API process sees the steps of a job that a
//! worker process on another host runs, and event ids (the table's sequence) mean the same on every process.

use uuid::Uuid;

use super::super::error::StoreError;
use super::super::time::now_millis;
use super::rows::parse_uuid;
use super::{postgres, Backend, JobStore};

/// One event as stored: its place in the fleet-wide order, its job, its owner when the writer knew it, and
/// its JSON body (`type` and fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Fleet-wide event id, increasing in commit order.
    pub id: i64,
    /// The job.
    pub job_id: Uuid,
    /// `Some(owner)` when the writer knew the job's API key (`Some(None)`: submitted without one).
    pub owner: Option<Option<String>>,
    /// The event's JSON.
    pub body: String,
}

/// An event to append: job, known owner (as in [`StoredEvent::owner`]) and JSON body.
pub type NewEvent = (Uuid, Option<Option<String>>, String);

impl JobStore {
    /// Appends events in one transaction and notifies every listening process. The transaction holds the
    /// events lock, so ids commit in the order they are drawn and a reader never skips one.
    /// An error on SQLite, which has no shared event log.
    pub async fn append_events(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let pool = self.shared_log()?;
        let now = now_millis();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(postgres::EVENTS_LOCK).execute(&mut *tx).await?;
        for (job, owner, body) in events {
            sqlx::query(
                "INSERT INTO job_events (job_id, owner, owner_known, body, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(job.to_string())
            .bind(owner.clone().flatten())
            .bind(i64::from(owner.is_some()))
            .bind(body)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("SELECT pg_notify($1, '')").bind(postgres::EVENTS_CHANNEL).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` events after `after`, in id order.
    pub async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<StoredEvent>, StoreError> {
        let pool = self.shared_log()?;
        let rows: Vec<(i64, String, Option<String>, i64, String)> = sqlx::query_as(
            "SELECT id, job_id, owner, owner_known, body FROM job_events WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
        rows.into_iter()
            .map(|(id, job, owner, known, body)| {
                Ok(StoredEvent {
                    id,
                    job_id: parse_uuid("job_events", &job)?,
                    owner: (known != 0).then_some(owner),
                    body,
                })
            })
            .collect()
    }

    /// The id of the newest event written before `before_millis` (0 if none): where a process that starts
    /// now begins reading, so that it replays recent history for reconnecting clients but not all of it.
    pub async fn last_event_before(&self, before_millis: i64) -> Result<i64, StoreError> {
        let pool = self.shared_log()?;
        let (id,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM job_events WHERE created_at < $1")
            .bind(before_millis)
            .fetch_one(pool)
            .await?;
        Ok(id.unwrap_or(0))
    }

    /// Deletes events older than `before_millis`; returns how many went.
    pub async fn prune_events(&self, before_millis: i64) -> Result<u64, StoreError> {
        let pool = self.shared_log()?;
        let result =
            sqlx::query("DELETE FROM job_events WHERE created_at < $1").bind(before_millis).execute(pool).await?;
        Ok(result.rows_affected())
    }

    fn shared_log(&self) -> Result<&sqlx::PgPool, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(pool),
            Backend::Sqlite(_) => Err(StoreError::InvalidArgument("SQLite has no shared event log".into())),
        }
    }
}
