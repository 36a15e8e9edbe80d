//! What one API key's jobs use, for `GET /v1/usage` and the limits checked at submission.

use super::super::error::StoreError;
use super::super::time::now_millis;
use super::rows::non_negative;
use super::{Dialect, JobStore};

/// The rolling window of daily compute, in milliseconds.
pub(crate) const DAY_MILLIS: i64 = 24 * 3600 * 1000;

/// The owner `$1`'s jobs queued or running: on SQLite the total its triggers keep (`owner_totals`, migration
/// `0015`), on PostgreSQL counted from the rows.
pub(crate) fn outstanding_sql(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "SELECT COALESCE((SELECT outstanding FROM owner_totals WHERE owner = $1), 0)",
        Dialect::Postgres => {
            "SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status IN ('queued', 'running') AND owner IS NOT NULL"
        }
    }
}

/// Bytes the owner `$1`'s jobs keep stored, their inputs and their images: on SQLite the total its triggers
/// keep (`owner_totals`), on PostgreSQL summed from the rows.
pub(crate) fn stored_bytes_sql(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::Sqlite => "SELECT COALESCE((SELECT stored_bytes FROM owner_totals WHERE owner = $1), 0)",
        Dialect::Postgres => {
            "SELECT CAST(COALESCE((SELECT SUM(input_bytes) FROM jobs WHERE owner = $1 AND owner IS NOT NULL), 0) \
             + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs j ON j.id = i.job_id WHERE j.owner = $1), 0) \
             AS BIGINT)"
        }
    }
}

/// Image-steps an owner submitted since `$2` (jobs cancelled before they started do not count).
pub(crate) const IMAGE_STEPS_SINCE: &str =
    "SELECT CAST(COALESCE(SUM(cost), 0) AS BIGINT) FROM jobs WHERE owner = $1 AND owner IS NOT NULL \
     AND created_at > $2 AND NOT (status = 'cancelled' AND started_at IS NULL)";

/// One key's consumption now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OwnerUsage {
    /// Jobs queued or running.
    pub outstanding: u64,
    /// Bytes of images and uploads its jobs keep.
    pub stored_bytes: u64,
    /// Image-steps (`n × steps`) submitted in the last 24 hours.
    pub image_steps_24h: u64,
}

impl JobStore {
    /// What `owner`'s jobs use now.
    pub async fn usage(&self, owner: &str) -> Result<OwnerUsage, StoreError> {
        let (outstanding, stored, steps): (i64, i64, i64) = on_read!(self, pool, dialect => {
            let (outstanding,): (i64,) = sqlx::query_as(outstanding_sql(dialect)).bind(owner).fetch_one(pool).await?;
            let (stored,): (i64,) = sqlx::query_as(stored_bytes_sql(dialect)).bind(owner).fetch_one(pool).await?;
            let (steps,): (i64,) = sqlx::query_as(IMAGE_STEPS_SINCE)
                .bind(owner)
                .bind(now_millis() - DAY_MILLIS)
                .fetch_one(pool)
                .await?;
            (outstanding, stored, steps)
        });
        Ok(OwnerUsage {
            outstanding: non_negative("jobs", "count", outstanding)?,
            stored_bytes: non_negative("jobs", "stored bytes", stored)?,
            image_steps_24h: non_negative("jobs", "image-steps", steps)?,
        })
    }
}
