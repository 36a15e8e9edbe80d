//! Retention: finished jobs, their image records and their files are deleted a configured time after they
//! end, by a background sweep.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::jobs::time::now_millis;
use crate::jobs::{JobStore, StoreError};
use crate::storage::ImageFiles;

/// How often the sweep runs.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Jobs deleted per statement, so one sweep never holds the write lock for long.
const BATCH: u32 = 500;

/// Deletes every job that ended more than `keep` ago, with its files. Returns how many were deleted.
pub async fn sweep(store: &JobStore, files: &ImageFiles, keep: Duration) -> Result<usize, StoreError> {
    let cutoff = now_millis() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let jobs = store.delete_finished_before(cutoff, BATCH).await?;
        if jobs.is_empty() {
            return Ok(total);
        }
        total += jobs.len();
        let files = files.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for job in jobs {
                if let Some(input) = job.params.get("image_path").and_then(serde_json::Value::as_str) {
                    files.remove_input_of(input)?;
                }
                files.remove_job(job.id)?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(removed, Ok(Ok(()))) {
            warn!("removing files of expired jobs failed; they stay on disk");
        }
    }
}

/// Sweeps at start-up and then every ten minutes until `shutdown` turns true.
pub async fn run(store: JobStore, files: ImageFiles, keep: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        match sweep(&store, &files, keep).await {
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
