//! Live state of running jobs that is not worth a database write per step: the latest progress and the
//! cancellation flag. Workers write, HTTP handlers read; nobody waits on anybody.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

/// Progress of one running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Denoiser calls done.
    pub step: u32,
    /// Denoiser calls in the job.
    pub total: u32,
}

#[derive(Debug)]
struct Entry {
    progress: Progress,
    cancel: Arc<AtomicBool>,
}

/// Latest progress and cancellation flags of the jobs running in this process.
#[derive(Debug, Default, Clone)]
pub struct ProgressBoard {
    entries: Arc<Mutex<HashMap<Uuid, Entry>>>,
}

impl ProgressBoard {
    /// Registers a job that is about to run and returns its cancellation flag.
    pub fn start(&self, job: Uuid, total: u32) -> Arc<AtomicBool> {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(
            job,
            Entry {
                progress: Progress { step: 0, total },
                cancel: cancel.clone(),
            },
        );
        cancel
    }

    /// Records that `step` of `total` calls are done.
    pub fn update(&self, job: Uuid, step: u32, total: u32) {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&job) {
            entry.progress = Progress { step, total };
        }
    }

    /// The latest progress of `job`, if it is running here.
    pub fn get(&self, job: Uuid) -> Option<Progress> {
        let map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&job).map(|e| e.progress)
    }

    /// Asks a running job to stop at its next step boundary. Returns whether it was running here.
    pub fn cancel(&self, job: Uuid) -> bool {
        let map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&job).map(|e| e.cancel.store(true, Ordering::SeqCst)).is_some()
    }

    /// Asks every running job to stop (shutdown after the grace period).
    pub fn cancel_all(&self) {
        let map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in map.values() {
            entry.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Forgets a job that has finished.
    pub fn finish(&self, job: Uuid) {
        let mut map = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(&job);
    }
}
