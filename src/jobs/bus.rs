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
//!
//! A **shared** bus (a fleet on PostgreSQL) publishes nothing itself: what this process publishes goes to its
//! outbox, which the fleet relay writes to the database's event log, and what the relay reads back from that
//! log — every process's events, with fleet-wide ids — is delivered here. So every process shows the same
//! events under the same ids, and `Last-Event-ID` works whichever API process a client reconnects to.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use utoipa::ToSchema;
use uuid::Uuid;

use super::model::{ImageRecord, NewImage};

/// Lifecycle events kept for replay on the all-jobs stream.
const REPLAY_RING: usize = 4096;

/// One event about one job. Serialised as the SSE `data:` JSON (`type`, `job_id` and the event's fields at
/// the top level); `id` goes on the SSE `id:` line. Its OpenAPI schema is a `oneOf` of one plain object per
/// event type with `type` as the discriminator, which generated clients turn into
/// typed classes.
#[derive(Debug, Clone, Serialize)]
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

/// A picture of a finished job, as job views and `completed` events describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Position in the job's output.
    pub index: u32,
    /// Where to download it.
    pub url: String,
    /// The seed that made it: send it back with `n = 1` to reproduce this picture alone.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
}

impl ImageInfo {
    /// The download path of image `index` of `job`: the one place that spells it.
    pub fn url(job: Uuid, index: u32) -> String {
        format!("/v1/jobs/{job}/images/{index}")
    }

    /// The descriptor of `image` of `job`.
    pub fn new(job: Uuid, image: &NewImage) -> Self {
        Self {
            index: image.index,
            url: Self::url(job, image.index),
            seed: image.seed,
            width: image.width,
            height: image.height,
            format: image.format.clone(),
        }
    }
}

impl From<&ImageRecord> for ImageInfo {
    fn from(r: &ImageRecord) -> Self {
        Self::new(r.job_id, &r.image)
    }
}

/// Waiting; `position` jobs are ahead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct QueuedEvent {
    /// Jobs ahead of this one.
    pub position: u64,
    /// Rough wait estimate from measured step times, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

/// A worker took the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartedEvent {
    /// Attempt number (1 unless a crash re-queued it).
    pub attempt: u32,
}

/// A denoiser call finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProgressEvent {
    /// Calls done.
    pub step: u32,
    /// Calls in all.
    pub total: u32,
    /// Estimated time to the last call, from this job's measured step times.
    pub eta_ms: u64,
    /// `data:image/jpeg;base64,…` picture of the predicted result, when one was due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

/// Done; the images are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CompletedEvent {
    /// The pictures.
    pub images: Vec<ImageInfo>,
    /// The mask a DiffEdit job (`mask: "auto"`) computed and inpainted with; absent for other jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskInfo>,
}

/// Where a job's computed mask is served, as job views and `completed` events describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MaskInfo {
    /// `/v1/jobs/{id}/mask`: a grayscale PNG of the pictures' size, white = repainted.
    pub url: String,
}

impl MaskInfo {
    /// The mask of the job `id`.
    pub fn of(id: uuid::Uuid) -> Self {
        Self { url: format!("/v1/jobs/{id}/mask") }
    }
}

/// Failed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailedEvent {
    /// Stable error code.
    pub code: String,
    /// Detail.
    pub message: String,
}

/// Cancelled by a client (or deleted while it ran).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CancelledEvent {}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// See [`QueuedEvent`].
    Queued(QueuedEvent),
    /// See [`StartedEvent`].
    Started(StartedEvent),
    /// See [`ProgressEvent`].
    Progress(ProgressEvent),
    /// See [`CompletedEvent`].
    Completed(CompletedEvent),
    /// See [`FailedEvent`].
    Failed(FailedEvent),
    /// See [`CancelledEvent`].
    Cancelled(CancelledEvent),
}

impl EventKind {
    /// A `cancelled` event.
    pub const CANCELLED: EventKind = EventKind::Cancelled(CancelledEvent {});

    /// The SSE event name (`queued`, `progress`, …), also the JSON `type`.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Queued(_) => "queued",
            EventKind::Started(_) => "started",
            EventKind::Progress(_) => "progress",
            EventKind::Completed(_) => "completed",
            EventKind::Failed(_) => "failed",
            EventKind::Cancelled(_) => "cancelled",
        }
    }

    /// Whether the job ends with this event.
    pub fn is_terminal(&self) -> bool {
        matches!(self, EventKind::Completed(_) | EventKind::Failed(_) | EventKind::Cancelled(_))
    }

    /// A `queued` event.
    pub fn queued(position: u64, eta_ms: Option<u64>) -> Self {
        EventKind::Queued(QueuedEvent { position, eta_ms })
    }

    /// A `failed` event.
    pub fn failed(code: impl Into<String>, message: impl Into<String>) -> Self {
        EventKind::Failed(FailedEvent { code: code.into(), message: message.into() })
    }
}

/// Each event type's OpenAPI schema: a plain object with `type` (a one-value enum, the discriminator),
/// `job_id` and that event's own fields, named `QueuedEvent`, `StartedEvent`, … in the components.
fn event_variant_schemas() -> Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)> {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
    use utoipa::openapi::RefOr;
    use utoipa::PartialSchema;
    let variants: [(&str, RefOr<Schema>); 6] = [
        ("queued", QueuedEvent::schema()),
        ("started", StartedEvent::schema()),
        ("progress", ProgressEvent::schema()),
        ("completed", CompletedEvent::schema()),
        ("failed", FailedEvent::schema()),
        ("cancelled", CancelledEvent::schema()),
    ];
    let string = || ObjectBuilder::new().schema_type(SchemaType::new(Type::String));
    variants
        .into_iter()
        .filter_map(|(name, schema)| {
            let RefOr::T(Schema::Object(fields)) = schema else { return None };
            let mut object = ObjectBuilder::new()
                .description(fields.description.clone())
                .property("type", string().enum_values(Some([name])).description(Some("The event type.")))
                .required("type")
                .property(
                    "job_id",
                    string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))).description(Some("The job.")),
                )
                .required("job_id");
            for (property, schema) in fields.properties {
                object = object.property(property, schema);
            }
            for required in fields.required {
                object = object.required(required);
            }
            Some((event_schema_name(name), RefOr::T(Schema::Object(object.build()))))
        })
        .collect()
}

/// `queued` → `QueuedEvent`.
fn event_schema_name(name: &str) -> String {
    let mut chars = name.chars();
    chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str() + "Event").unwrap_or_default()
}

/// [`JobEvent`]'s schema is a discriminated `oneOf` of references to the event types' objects.
impl utoipa::PartialSchema for JobEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{Discriminator, OneOfBuilder, Schema};
        use utoipa::openapi::{Ref, RefOr};
        let names = ["queued", "started", "progress", "completed", "failed", "cancelled"];
        let reference = |name: &str| format!("#/components/schemas/{}", event_schema_name(name));
        let discriminator =
            Discriminator::with_mapping("type", names.iter().map(|name| (name.to_string(), reference(name))));
        let one_of = names
            .iter()
            .fold(OneOfBuilder::new(), |one_of, name| one_of.item(Ref::new(reference(name))))
            .discriminator(Some(discriminator))
            .description(Some("One event; `type` says which."));
        RefOr::T(Schema::OneOf(one_of.build()))
    }
}

impl ToSchema for JobEvent {
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        schemas.push(("ImageInfo".into(), <ImageInfo as utoipa::PartialSchema>::schema()));
        schemas.extend(event_variant_schemas());
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
    /// Where a shared bus sends what this process publishes (see the module documentation); `None` for a
    /// bus that delivers locally.
    outbox: Option<mpsc::UnboundedSender<JobEvent>>,
    /// The receiving end of the outbox, until the relay takes it.
    outbox_reader: Mutex<Option<mpsc::UnboundedReceiver<JobEvent>>>,
    jobs: Mutex<HashMap<Uuid, watch::Sender<Snapshot>>>,
    lifecycle: broadcast::Sender<JobEvent>,
    progress: broadcast::Sender<JobEvent>,
    ring: Mutex<VecDeque<JobEvent>>,
    owners: Mutex<HashMap<Uuid, Option<Arc<str>>>>,
    /// Open all-jobs streams by what they may see: `None` every job (admins), `Some(owner)` one key's jobs.
    all_followers: Mutex<HashMap<Option<Arc<str>>, usize>>,
}

/// An open all-jobs stream's place in the follower count; dropping it ends the count.
#[derive(Debug)]
pub struct AllJobsFollower {
    bus: EventBus,
    scope: Option<Arc<str>>,
}

impl Drop for AllJobsFollower {
    fn drop(&mut self) {
        let mut counts = self.bus.inner.all_followers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.scope) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.scope);
            }
        }
    }
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
        Self::with(start, None)
    }

    /// An empty shared bus (see the module documentation): publishing fills the outbox, which the relay
    /// takes with [`take_outbox`](Self::take_outbox), and only [`deliver`](Self::deliver) reaches followers.
    pub fn shared() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = Self::with(0, Some(tx));
        *bus.inner.outbox_reader.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
        bus
    }

    /// Whether this bus is shared through the database.
    pub fn is_shared(&self) -> bool {
        self.inner.outbox.is_some()
    }

    /// The events this process published, for the relay to write (once: later calls get `None`).
    pub fn take_outbox(&self) -> Option<mpsc::UnboundedReceiver<JobEvent>> {
        self.inner.outbox_reader.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn with(start: u64, outbox: Option<mpsc::UnboundedSender<JobEvent>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                next_id: AtomicU64::new(start),
                outbox,
                outbox_reader: Mutex::new(None),
                jobs: Mutex::new(HashMap::new()),
                lifecycle: broadcast::channel(REPLAY_RING).0,
                progress: broadcast::channel(64).0,
                ring: Mutex::new(VecDeque::with_capacity(REPLAY_RING)),
                owners: Mutex::new(HashMap::new()),
                all_followers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A fresh event id. On a shared bus, where ids come from the database, it is the id of the last event
    /// delivered: an event made from state read back from the store is the state as of that event, and a
    /// client resuming after it misses nothing.
    pub fn next_id(&self) -> u64 {
        if self.is_shared() {
            self.inner.next_id.load(Ordering::SeqCst)
        } else {
            self.inner.next_id.fetch_add(1, Ordering::SeqCst)
        }
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

    /// Publishes an event: into the job's snapshot and onto the all-jobs stream (on a shared bus: into the
    /// outbox, to come back through [`deliver`](Self::deliver)). After a terminal event the job's entry is
    /// dropped; followers still hold the final snapshot.
    pub fn publish(&self, job_id: Uuid, kind: EventKind) -> JobEvent {
        let event = self.event(job_id, kind);
        match &self.inner.outbox {
            Some(outbox) => {
                let _ = outbox.send(event.clone());
                event
            }
            None => self.deliver(event),
        }
    }

    /// Makes `event` (with its id) known to this process's followers; the relay's way in for events read
    /// from the database's log.
    pub fn deliver(&self, event: JobEvent) -> JobEvent {
        if self.is_shared() {
            self.inner.next_id.fetch_max(event.id, Ordering::SeqCst);
        }
        let job_id = event.job_id;
        let terminal = event.kind.is_terminal();
        let progress = matches!(event.kind, EventKind::Progress(_));
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

    /// The latest progress event this process has seen for `job_id`, if it is still running: on an API
    /// process of a fleet, the progress of a job that a worker process runs.
    pub fn latest_progress(&self, job_id: Uuid) -> Option<ProgressEvent> {
        let jobs = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = jobs.get(&job_id)?.borrow();
        match snapshot.progress.as_ref().map(|e| &e.kind) {
            Some(EventKind::Progress(progress)) => Some(progress.clone()),
            _ => None,
        }
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

    /// Whether anyone who may see `job_id` would see its progress events (worth rendering a preview for): a
    /// follower of the job, or an all-jobs stream of an admin or of the job's own key. Always on a shared bus.
    pub fn has_followers(&self, job_id: Uuid) -> bool {
        if self.is_shared() {
            // Followers on other processes cannot be counted from here.
            return true;
        }
        let following = self.inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if following.get(&job_id).is_some_and(|s| s.receiver_count() > 0) {
            return true;
        }
        drop(following);
        let counts = self.inner.all_followers.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.contains_key(&None) {
            return true;
        }
        let owners = self.inner.owners.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(owners.get(&job_id), Some(Some(owner)) if counts.contains_key(&Some(owner.clone())))
    }

    /// Follows every job: lifecycle events (never skipped unless a reader falls thousands behind) and
    /// progress events (skipped when the reader is slow). `scope` is what the stream may show: `None` every
    /// job, `Some(owner)` that key's jobs; hold the returned follower for as long as the stream is open.
    pub fn subscribe_all(
        &self,
        scope: Option<&str>,
    ) -> (broadcast::Receiver<JobEvent>, broadcast::Receiver<JobEvent>, AllJobsFollower) {
        let scope: Option<Arc<str>> = scope.map(Arc::from);
        *self.inner.all_followers.lock().unwrap_or_else(PoisonError::into_inner).entry(scope.clone()).or_insert(0) += 1;
        let follower = AllJobsFollower { bus: self.clone(), scope };
        (self.inner.lifecycle.subscribe(), self.inner.progress.subscribe(), follower)
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
        EventKind::Progress(ProgressEvent { step, total: 10, eta_ms: 0, preview: None })
    }

    #[test]
    fn snapshot_keeps_lifecycle_and_latest_progress() {
        let bus = EventBus::new();
        let job = Uuid::now_v7();
        let rx = bus.subscribe(job);
        let queued = bus.publish(job, EventKind::queued(0, None));
        bus.publish(job, EventKind::Started(StartedEvent { attempt: 1 }));
        for step in 1..=5 {
            bus.publish(job, progress(step));
        }
        let snap = rx.borrow().clone();
        assert_eq!(snap.lifecycle.len(), 2);
        assert!(matches!(snap.progress.as_ref().unwrap().kind, EventKind::Progress(ProgressEvent { step: 5, .. })));
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
        bus.publish(job, EventKind::CANCELLED);
        assert!(rx.has_changed().unwrap_or(true));
        assert!(rx.borrow_and_update().is_terminal());
        assert!(!bus.has_followers(job));
        assert_eq!(bus.replay_after(0).len(), 1);
    }

    #[test]
    fn previews_are_wanted_only_by_followers_who_may_see_the_job() {
        let bus = EventBus::new();
        let (alices, bobs) = (Uuid::now_v7(), Uuid::now_v7());
        bus.note_owner(alices, Some("alice"));
        bus.note_owner(bobs, Some("bob"));
        assert!(!bus.has_followers(alices));
        let (_l, _p, alice) = bus.subscribe_all(Some("alice"));
        assert!(bus.has_followers(alices) && !bus.has_followers(bobs), "alice's stream shows only her jobs");
        let (_l2, _p2, admin) = bus.subscribe_all(None);
        assert!(bus.has_followers(bobs), "an admin stream shows every job");
        drop(admin);
        drop(alice);
        assert!(!bus.has_followers(alices) && !bus.has_followers(bobs));
        let _one = bus.subscribe(bobs);
        assert!(bus.has_followers(bobs));
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
