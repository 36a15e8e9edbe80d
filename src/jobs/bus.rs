//! The progress bus: what clients following a job are told, and when.
//!
//! Per job it keeps a snapshot — the lifecycle events so far (`queued`, `started`, terminal) and only the
//! latest `progress` event — behind a `watch` channel: publishing never waits for a reader, a reader that
//! keeps up sees every event, a slow one skips intermediate progress but never a lifecycle event. The same
//! events also go out on broadcast channels for the all-jobs stream, with a replay ring of recent lifecycle
//! events for reconnecting clients.
//!
//! Event ids are one process-wide sequence, started from the clock (microseconds) so that ids keep
//! increasing across restarts and `Last-Event-ID` stays meaningful.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use utoipa::ToSchema;
use uuid::Uuid;

/// Lifecycle events kept for replay on the all-jobs stream.
const REPLAY_RING: usize = 4096;

/// One event about one job. Serialised as the SSE `data:` JSON; `id` goes on the SSE `id:` line.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobEvent {
    /// Position in the process-wide event sequence.
    #[serde(skip)]
    pub id: u64,
    /// The job.
    pub job_id: Uuid,
    /// Who the job belongs to, when this process knows (for filtering per-tenant streams without a lookup;
    /// never sent to clients).
    #[serde(skip)]
    pub owner: EventOwner,
    /// What happened, with its fields at the top level of the JSON next to `type`.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The owner of an event's job as the bus knew it when the event was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EventOwner {
    /// Not recorded in this process (the job came from another process or an earlier run): ask the store.
    #[default]
    Unknown,
    /// The submitting API key's id, or `None` for a job submitted without authentication.
    Known(Option<Arc<str>>),
}

/// Owners remembered at most; past it the memory starts over (events then fall back to store lookups).
const OWNER_MEMORY: usize = 65_536;

/// A picture of a finished job, as events report it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EventImage {
    /// Position in the job's output.
    pub index: u32,
    /// Where to download it.
    pub url: String,
    /// The seed that made it.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
}

/// What happened.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// Waiting; `position` jobs are ahead.
    Queued {
        /// Jobs ahead of this one.
        position: u64,
        /// Rough wait estimate from measured step times, when there is one.
        #[serde(skip_serializing_if = "Option::is_none")]
        eta_ms: Option<u64>,
    },
    /// A worker took the job.
    Started {
        /// Attempt number (1 unless a crash re-queued it).
        attempt: u32,
    },
    /// A denoiser call finished.
    Progress {
        /// Calls done.
        step: u32,
        /// Calls in all.
        total: u32,
        /// Estimated time to the last call, from this job's measured step times.
        eta_ms: u64,
        /// `data:image/jpeg;base64,…` picture of the predicted result, when one was due.
        #[serde(skip_serializing_if = "Option::is_none")]
        preview: Option<String>,
    },
    /// Done; the images are stored.
    Completed {
        /// The pictures.
        images: Vec<EventImage>,
    },
    /// Failed for good.
    Failed {
        /// Stable error code.
        code: String,
        /// Detail.
        message: String,
    },
    /// Cancelled by a client.
    Cancelled,
}

impl EventKind {
    /// The SSE event name (`queued`, `progress`, …).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Queued { .. } => "queued",
            EventKind::Started { .. } => "started",
            EventKind::Progress { .. } => "progress",
            EventKind::Completed { .. } => "completed",
            EventKind::Failed { .. } => "failed",
            EventKind::Cancelled => "cancelled",
        }
    }

    /// Whether the job ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::Completed { .. } | EventKind::Failed { .. } | EventKind::Cancelled)
    }
}

/// What a job's followers can see: every lifecycle event and the latest progress.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `queued`, `started` and terminal events, in order.
    pub lifecycle: Vec<JobEvent>,
    /// The latest progress event.
    pub progress: Option<JobEvent>,
}

impl Snapshot {
    /// Events after `last_id`, in id order.
    pub fn after(&self, last_id: u64) -> Vec<JobEvent> {
        let mut events: Vec<JobEvent> =
            self.lifecycle.iter().chain(self.progress.iter()).filter(|e| e.id > last_id).cloned().collect();
        events.sort_by_key(|e| e.id);
        events
    }

    /// Whether the job has ended.
    pub fn is_terminal(&self) -> bool {
        self.lifecycle.last().is_some_and(|e| e.kind.is_terminal())
    }
}

struct Inner {
    next_id: AtomicU64,
    jobs: Mutex<HashMap<Uuid, watch::Sender<Snapshot>>>,
    lifecycle: broadcast::Sender<JobEvent>,
    progress: broadcast::Sender<JobEvent>,
    ring: Mutex<VecDeque<JobEvent>>,
    owners: Mutex<HashMap<Uuid, Option<Arc<str>>>>,
}

/// The process-wide progress bus. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// An empty bus whose ids start above any id a previous run of this process handed out.
    pub fn new() -> Self {
        let start =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
        Self {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(start),
                jobs: Mutex::new(HashMap::new()),
                lifecycle: broadcast::channel(REPLAY_RING).0,
                progress: broadcast::channel(64).0,
                ring: Mutex::new(VecDeque::with_capacity(REPLAY_RING)),
                owners: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A fresh event id.
    pub fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Builds an event with a fresh id without publishing it (for state read back from the database).
    pub fn event(&self, job_id: Uuid, kind: EventKind) -> JobEvent {
        let owner = self
            .inner
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&job_id)
            .map_or(EventOwner::Unknown, |owner| EventOwner::Known(owner.clone()));
        JobEvent { id: self.next_id(), job_id, owner, kind }
    }

    /// Records who `job` belongs to, so that its events carry it (call on submission and on claim).
    pub fn note_owner(&self, job: Uuid, owner: Option<&str>) {
        let mut owners = self.inner.owners.lock().unwrap_or_else(PoisonError::into_inner);
        if owners.len() >= OWNER_MEMORY && !owners.contains_key(&job) {
            owners.clear();
        }
        owners.insert(job, owner.map(Arc::from));
    }

    /// Id of the newest lifecycle event (0 before any): it changes whenever a job is queued, starts or ends in
    /// this process, so readers of cached queue state know when to re-read it.
    pub fn last_lifecycle_id(&self) -> u64 {
        self.inner.ring.lock().unwrap_or_else(PoisonError::into_inner).back().map_or(0, |e| e.id)
    }

    /// Publishes an event: into the job's snapshot and onto the all-jobs stream. After a terminal event the
    /// job's entry is dropped; followers still hold the final snapshot.
    pub fn publish(&self, job_id: Uuid, kind: EventKind) -> JobEvent {
        let event = self.event(job_id, kind);
        let terminal = event.kind.is_terminal();
        let progress = matches!(event.kind, EventKind::Progress { .. });
        {
            let mut jobs = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let sender = jobs.entry(job_id).or_insert_with(|| watch::channel(Snapshot::default()).0);
            sender.send_modify(|snapshot| {
                if progress {
                    snapshot.progress = Some(event.clone());
                } else {
                    snapshot.lifecycle.push(event.clone());
                }
            });
            if terminal {
                jobs.remove(&job_id);
                self.inner.owners.lock().unwrap_or_else(PoisonError::into_inner).remove(&job_id);
            }
        }
        if progress {
            let _ = self.inner.progress.send(event.clone());
        } else {
            let mut ring = self.inner.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if ring.len() == REPLAY_RING {
                ring.pop_front();
            }
            ring.push_back(event.clone());
            let _ = self.inner.lifecycle.send(event.clone());
        }
        event
    }

    /// Follows one job. Subscribe before reading the job from the database, so nothing falls in between.
    pub fn subscribe(&self, job_id: Uuid) -> watch::Receiver<Snapshot> {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.entry(job_id).or_insert_with(|| watch::channel(Snapshot::default()).0).subscribe()
    }

    /// Drops a job's entry if nobody follows it and nothing was published for it (a follower of a job that
    /// ran elsewhere or had already ended created it).
    pub fn release(&self, job_id: Uuid) {
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if jobs.get(&job_id).is_some_and(|s| s.receiver_count() == 0 && s.borrow().lifecycle.is_empty()) {
            jobs.remove(&job_id);
        }
    }

    /// Forgets a deleted job.
    pub fn forget(&self, job_id: Uuid) {
        self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner).remove(&job_id);
    }

    /// Whether anyone would see a progress event for `job_id` (worth rendering a preview for).
    pub fn has_followers(&self, job_id: Uuid) -> bool {
        if self.inner.progress.receiver_count() > 0 {
            return true;
        }
        let jobs = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.get(&job_id).is_some_and(|s| s.receiver_count() > 0)
    }

    /// Follows every job: lifecycle events (never skipped unless a reader falls thousands behind) and
    /// progress events (skipped when the reader is slow).
    pub fn subscribe_all(&self) -> (broadcast::Receiver<JobEvent>, broadcast::Receiver<JobEvent>) {
        (self.inner.lifecycle.subscribe(), self.inner.progress.subscribe())
    }

    /// Recent lifecycle events after `last_id`, for a reconnecting all-jobs follower.
    pub fn replay_after(&self, last_id: u64) -> Vec<JobEvent> {
        let ring = self.inner.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().filter(|e| e.id > last_id).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: u32) -> EventKind {
        EventKind::Progress { step, total: 10, eta_ms: 0, preview: None }
    }

    #[test]
    fn snapshot_keeps_lifecycle_and_latest_progress() {
        let bus = EventBus::new();
        let job = Uuid::now_v7();
        let rx = bus.subscribe(job);
        let queued = bus.publish(job, EventKind::Queued { position: 0, eta_ms: None });
        bus.publish(job, EventKind::Started { attempt: 1 });
        for step in 1..=5 {
            bus.publish(job, progress(step));
        }
        let snap = rx.borrow().clone();
        assert_eq!(snap.lifecycle.len(), 2);
        assert!(matches!(snap.progress.as_ref().unwrap().kind, EventKind::Progress { step: 5, .. }));
        let after = snap.after(queued.id);
        assert_eq!(after.len(), 2, "started and the latest progress");
        assert!(after[0].id < after[1].id);
        assert!(!snap.is_terminal());
    }

    #[test]
    fn terminal_event_reaches_followers_and_drops_the_entry() {
        let bus = EventBus::new();
        let job = Uuid::now_v7();
        let mut rx = bus.subscribe(job);
        bus.publish(job, EventKind::Cancelled);
        assert!(rx.has_changed().unwrap_or(true));
        assert!(rx.borrow_and_update().is_terminal());
        assert!(!bus.has_followers(job));
        assert_eq!(bus.replay_after(0).len(), 1);
    }

    #[test]
    fn ids_increase_and_serialise_with_type_at_top_level() {
        let bus = EventBus::new();
        let job = Uuid::nil();
        let a = bus.publish(job, progress(1));
        let b = bus.publish(job, progress(2));
        assert!(b.id > a.id);
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["type"], "progress");
        assert_eq!(json["step"], 2);
        assert_eq!(json["job_id"], Uuid::nil().to_string());
        assert!(json.get("id").is_none());
        assert!(json.get("preview").is_none());
    }
}
