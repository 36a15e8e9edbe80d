//! Queue positions for many readers at once: one query for the whole queue order, shared by every status
//! read and event stream until the queue changes, instead of one counting query per reader per poll (which
//! grows as followers × queued jobs and was the main cost of submissions under load).
//!
//! The snapshot is re-read when this process has seen a lifecycle event since it was taken (the caller
//! passes the event bus's newest lifecycle id), when the asked-for job is missing from it (callers only ask
//! about jobs they just read as queued), and otherwise at least every [`MAX_AGE`] for changes made by other
//! processes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use uuid::Uuid;

use super::{JobStore, StoreError};

/// A snapshot older than this is re-read before answering.
const MAX_AGE: Duration = Duration::from_millis(250);

/// Cached queue order, refreshed by one caller at a time (the others wait and share its answer).
#[derive(Debug)]
pub struct QueuePositions {
    store: JobStore,
    snapshot: Mutex<Snapshot>,
}

#[derive(Debug, Default)]
struct Snapshot {
    taken: Option<Instant>,
    generation: u64,
    positions: HashMap<Uuid, u64>,
}

impl QueuePositions {
    /// Positions of `store`'s queue.
    pub fn new(store: JobStore) -> Self {
        Self { store, snapshot: Mutex::new(Snapshot::default()) }
    }

    /// Jobs ahead of `id` in claim order (0 = next), or `None` if it is not queued. `generation` is the
    /// event bus's newest lifecycle id: a snapshot taken under another generation is re-read.
    pub async fn get(&self, id: Uuid, generation: u64) -> Result<Option<u64>, StoreError> {
        let mut snapshot = self.snapshot.lock().await;
        let fresh = snapshot.taken.is_some_and(|t| t.elapsed() <= MAX_AGE) && snapshot.generation == generation;
        if !fresh || !snapshot.positions.contains_key(&id) {
            self.refresh(&mut snapshot, generation).await?;
        }
        Ok(snapshot.positions.get(&id).copied())
    }

    /// Re-reads the claim order into `snapshot`, marked as taken when the read starts (everything committed
    /// before then is in it) under `generation`.
    async fn refresh(&self, snapshot: &mut Snapshot, generation: u64) -> Result<(), StoreError> {
        let started = Instant::now();
        let order = self.store.queued_order().await?;
        snapshot.positions = order.into_iter().zip(0u64..).collect();
        snapshot.taken = Some(started);
        snapshot.generation = generation;
        Ok(())
    }

    /// The position of a job this process has just submitted, whose commit had ended at `committed`. When
    /// its owner is alone at its priority, the database counts it ([`JobStore::position_among_own`]);
    /// otherwise any snapshot taken after the commit holds it (or no longer holds it, if it was claimed since). Submissions that
    /// arrive together wait for one re-read of the queue and share it, instead of re-reading it one after the
    /// other for each new job.
    pub async fn of_new(&self, id: Uuid, committed: Instant, generation: u64) -> Result<Option<u64>, StoreError> {
        if let Some(position) = self.store.position_among_own(id).await? {
            return Ok(position);
        }
        let mut snapshot = self.snapshot.lock().await;
        if snapshot.taken.is_none_or(|t| t <= committed) {
            self.refresh(&mut snapshot, generation).await?;
        }
        Ok(snapshot.positions.get(&id).copied())
    }
}
