//! Queue positions for many readers at once: one query for the whole queue order, shared by every status
//! read and event stream for a short while, instead of one counting query per reader per poll (which grows
//! as followers × queued jobs and was the main cost of submissions under load).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use uuid::Uuid;

use super::{JobStore, StoreError};

/// A snapshot older than this is re-read before answering.
const MAX_AGE: Duration = Duration::from_millis(250);

/// A job missing from a snapshot at least this old triggers a re-read (it may have been queued since).
const MISS_REFRESH_AGE: Duration = Duration::from_millis(50);

/// Cached queue order, refreshed by one caller at a time (the others wait and share its answer).
#[derive(Debug)]
pub struct QueuePositions {
    store: JobStore,
    snapshot: Mutex<Snapshot>,
}

#[derive(Debug, Default)]
struct Snapshot {
    taken: Option<Instant>,
    positions: HashMap<Uuid, u64>,
}

impl QueuePositions {
    /// Positions of `store`'s queue.
    pub fn new(store: JobStore) -> Self {
        Self { store, snapshot: Mutex::new(Snapshot::default()) }
    }

    /// Jobs ahead of `id` in claim order (0 = next), or `None` if it is not queued; at most [`MAX_AGE`] old.
    pub async fn get(&self, id: Uuid) -> Result<Option<u64>, StoreError> {
        let mut snapshot = self.snapshot.lock().await;
        let age = snapshot.taken.map(|t| t.elapsed());
        let stale = age.is_none_or(|a| a > MAX_AGE);
        let missing_and_old = !snapshot.positions.contains_key(&id) && age.is_none_or(|a| a > MISS_REFRESH_AGE);
        if stale || missing_and_old {
            let order = self.store.queued_order().await?;
            snapshot.positions = order.into_iter().zip(0u64..).collect();
            snapshot.taken = Some(Instant::now());
        }
        Ok(snapshot.positions.get(&id).copied())
    }
}
