//! Retention: finished jobs, their image records and their files are deleted a configured time after they
//! end, by a background sweep.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::jobs::time::now_millis;
use crate::jobs::{Jobs, JobsError};

/// How often the sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Jobs deleted per statement, so one sweep never holds the write lock for long.
const BATCH: u32 = 500;

/// Deletes every job that ended more than `keep` ago, with its files. Returns how many were deleted.
pub async fn sweep(jobs: &Jobs, keep: Duration) -> Result<usize, JobsError> {
    let cutoff = now_millis() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let expired = jobs.store().delete_finished_before(cutoff, BATCH).await?;
        if expired.is_empty() {
            if total > 0 {
                jobs.store().reclaim_space().await?;
            }
            return Ok(total);
        }
        total += expired.len();
        if let Err(e) = jobs.remove_files(expired).await {
            warn!(error = %e, "removing files of expired jobs failed; they stay on disk");
        }
    }
}

/// Sweeps at start-up and then every ten minutes until `shutdown` turns true.
pub async fn run(jobs: Jobs, keep: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        match sweep(&jobs, keep).await {
            Ok(0) => {}
            Ok(n) => info!(deleted = n, "retention: deleted finished jobs past their retention"),
            Err(e) => warn!(error = %e, "retention sweep failed"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}
