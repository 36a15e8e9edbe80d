//! [`Jobs`]: the one service in front of the queue. It holds the store, the event bus, live progress, the
//! shared queue positions, the dispatcher's wake-up and the file store, and offers what routes do with a
//! job — submit, find, read its live state and images, cancel, delete — plus what workers record — started,
//! succeeded, failed, handed back, cancelled. Following a job ([`Jobs::follow`], [`Jobs::wait`]) lives in
//! `follow.rs`. Every HTTP route, native or OpenAI-compatible, goes through it; it knows nothing of HTTP.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};
use uuid::Uuid;

use super::bus::{CompletedEvent, EventBus, EventKind, ImageInfo, MaskInfo, StartedEvent};
use super::params::JobParams;
use super::progress::{Progress, ProgressBoard, StopReason};
use super::store::JobWebhook;
use super::{
    IdempotencyKey, ImageRecord, Job, JobStatus, JobStore, NewImage, NewJob, QueuePositions, RateState, StoreError,
    SubmitLimits,
};
use crate::auth::Principal;
use crate::engine::image::OutputFormat;
use crate::storage::{ImageFiles, StorageError};
use crate::worker::pool::{EncodedImage, WorkOutput};

/// How long an `Idempotency-Key` keeps pointing at its job.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Queue rules the service applies to every submission.
#[derive(Debug, Clone, Copy)]
pub struct JobRules {
    /// Claims a job may use (`queue.max_attempts`).
    pub max_attempts: u32,
    /// Queued jobs at most (`queue.max_queued`).
    pub max_queued: u64,
    /// Queued or running jobs per key at most (`limits.max_outstanding_per_key`).
    pub max_outstanding_per_key: u64,
    /// Stored bytes per key at most (`limits.max_stored_bytes_per_key`).
    pub max_stored_bytes_per_key: u64,
    /// Worker threads (for wait estimates).
    pub workers: usize,
}

/// Everything that can go wrong with a job operation, for the HTTP layer to map to statuses.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// No such job, or one the caller may not see (the same answer, so ids reveal nothing).
    #[error("no job `{0}`")]
    NotFound(Uuid),
    /// The job has no image with this index.
    #[error("job `{0}` has no image {1}")]
    NoImage(Uuid, u32),
    /// The job computes no mask (only DiffEdit jobs, `mask: "auto"`, do).
    #[error("job `{0}` has no computed mask (only edits with `mask: \"auto\"` have one)")]
    NoMask(Uuid),
    /// The job is not in a state that allows the operation.
    #[error("job `{id}` is {status}; {why}")]
    WrongState {
        /// The job.
        id: Uuid,
        /// Its state.
        status: JobStatus,
        /// What the operation needed.
        why: &'static str,
    },
    /// The job runs in another server process, which alone can stop it.
    #[error("job `{0}` runs in another server process")]
    RunningElsewhere(Uuid),
    /// The queue is full.
    #[error("the queue is full ({queued} jobs waiting); retry after {retry_after} s")]
    QueueFull {
        /// Jobs waiting.
        queued: u64,
        /// Suggested wait in seconds.
        retry_after: u64,
    },
    /// The key has too many jobs queued or running.
    #[error("this key already has {outstanding} jobs queued or running (limit {limit})")]
    OwnerBusy {
        /// Jobs outstanding.
        outstanding: u64,
        /// The limit.
        limit: u64,
    },
    /// The key keeps too many bytes stored (images and uploads of jobs not yet deleted).
    #[error(
        "this key keeps {stored} bytes of images and uploads (limit {limit}); delete jobs (DELETE /v1/jobs/{{id}}) \
         or wait for retention"
    )]
    OverQuota {
        /// Bytes stored.
        stored: u64,
        /// The quota.
        limit: u64,
    },
    /// The `Idempotency-Key` already names a job made from a different request (or on another route).
    #[error("this Idempotency-Key was used for a different request; use a new key for a new request")]
    KeyReused,
    /// The key made its `rate_per_minute` submissions already.
    #[error("this API key may submit {} jobs per minute (its rate_per_minute); retry after {} s", state.limit, retry_after)]
    RateLimited {
        /// The key's bucket.
        state: RateState,
        /// Seconds until one more submission is allowed.
        retry_after: u64,
    },
    /// The job's image-steps would pass the key's daily compute.
    #[error(
        "this API key submitted {used} image-steps (n × steps) in the last 24 hours; this job needs {cost} more \
         and its daily_image_steps is {limit}; retry after {retry_after} s"
    )]
    ComputeExhausted {
        /// Image-steps in the last 24 hours.
        used: u64,
        /// What this job needs.
        cost: u64,
        /// The key's daily limit.
        limit: u64,
        /// Seconds until it fits.
        retry_after: u64,
    },
    /// A wait ran out of time.
    #[error("job `{0}` did not finish in time; follow /v1/jobs/{0}")]
    TimedOut(Uuid),
    /// A wait was cut short because the server is shutting down.
    #[error("the server is shutting down; follow /v1/jobs/{0} after it restarts")]
    ShuttingDown(Uuid),
    /// The job was deleted while it was followed.
    #[error("job `{0}` was deleted")]
    Deleted(Uuid),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be written, read or removed.
    #[error("{0}")]
    Files(String),
}

/// A client's `Idempotency-Key` and a digest of what it was sent with (the route and the request), so a
/// replay is told apart from a different request that reuses the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The key.
    pub key: String,
    /// Hex SHA-256 of the route and the request's parts.
    pub fingerprint: String,
}

impl Idempotency {
    /// The key with the digest of `route` and `parts` (each part length-prefixed, so parts cannot run into
    /// each other).
    pub fn new(key: String, route: &str, parts: &[&[u8]]) -> Self {
        use sha2::Digest;
        let mut digest = sha2::Sha256::new();
        for part in std::iter::once(route.as_bytes()).chain(parts.iter().copied()) {
            digest.update((part.len() as u64).to_le_bytes());
            digest.update(part);
        }
        Self { key, fingerprint: digest.finalize().iter().map(|b| format!("{b:02x}")).collect() }
    }
}

/// An edit's prepared pictures, stored beside the job so that a retried job edits the same pixels.
#[derive(Debug, Clone)]
pub struct EditInputs {
    /// The picture as the client sent it and its file extension: the history content credentials record
    /// (`None` when its format is not known).
    pub original: Option<(Vec<u8>, &'static str)>,
    /// The picture at its final size, as PNG.
    pub image_png: Vec<u8>,
    /// The mask (white = repaint), as PNG.
    pub mask_png: Option<Vec<u8>>,
}

/// A validated job to enqueue.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// The model that runs it.
    pub model: String,
    /// Its parameters (an edit's input paths are filled in by [`Jobs::submit`]).
    pub params: JobParams,
    /// An edit's pictures.
    pub inputs: Option<EditInputs>,
    /// Where its events are delivered (checked by the caller: see `crate::webhooks::target`).
    pub webhook: Option<JobWebhook>,
    /// Its claim priority (`high` is for admin keys; the route checks).
    pub priority: Priority,
}

/// How soon a job is claimed relative to others: every `high` job before any `normal` one, and so on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// After every `normal` and `high` job.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Before every `normal` and `low` job; admin keys only.
    High,
}

impl Priority {
    /// The stored value (`jobs.priority`).
    pub fn value(self) -> i32 {
        match self {
            Priority::Low => -1,
            Priority::Normal => 0,
            Priority::High => 1,
        }
    }

    /// The priority a stored value stands for (values between the three round toward `normal`).
    pub fn from_value(value: i32) -> Self {
        match value {
            v if v < 0 => Priority::Low,
            0 => Priority::Normal,
            _ => Priority::High,
        }
    }
}

/// A job whose inputs are stored, ready for its row.
struct ReadyJob {
    model: String,
    params: JobParams,
    priority: Priority,
    input_bytes: u64,
    webhook: Option<JobWebhook>,
}

/// A submission's outcome: the job, and whether this request created it (`false`: an idempotent replay).
#[derive(Debug)]
pub struct Submitted {
    /// The job.
    pub job: Job,
    /// Whether this request created it.
    pub created: bool,
    /// The key's submission rate after this submission, when it has one (for the `RateLimit-*` headers).
    pub rate: Option<RateState>,
    /// The live state announced in the job's `queued` event, when this request created it: the `202` body
    /// says the same instead of reading the queue again.
    pub live: Option<LiveState>,
}

/// What a cancellation did.
#[derive(Debug)]
pub enum Cancelled {
    /// The job was queued and is cancelled now.
    AtOnce(Job),
    /// The job is running here and stops at its next step.
    Requested(Job),
}

/// A job's live state beside its stored row.
#[derive(Debug, Clone, Copy)]
pub struct LiveState {
    /// Steps done and in all, with an estimate.
    pub progress: Progress,
    /// Jobs ahead, while queued.
    pub queue_position: Option<u64>,
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    pub(super) store: JobStore,
    pub(super) bus: EventBus,
    pub(super) progress: ProgressBoard,
    pub(super) positions: Arc<QueuePositions>,
    pub(super) wake: Arc<Notify>,
    pub(super) files: ImageFiles,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) rules: JobRules,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("rules", &self.rules).finish_non_exhaustive()
    }
}

impl Jobs {
    /// The service over `store` and `files`; follows and waits end when `shutdown` turns true.
    pub fn new(store: JobStore, files: ImageFiles, rules: JobRules, shutdown: watch::Receiver<bool>) -> Self {
        // A fleet on PostgreSQL shares its events through the database (see `crate::fleet`).
        let bus = if store.postgres().is_some() { EventBus::shared() } else { EventBus::new() };
        Self {
            positions: Arc::new(QueuePositions::new(store.clone())),
            store,
            bus,
            progress: ProgressBoard::default(),
            wake: Arc::new(Notify::new()),
            files,
            shutdown,
            rules,
        }
    }

    /// The job store (for readiness probes, metrics and the key table).
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// The event bus (worker threads publish progress on it).
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// Live progress and stop flags (worker threads update it).
    pub fn progress(&self) -> &ProgressBoard {
        &self.progress
    }

    /// The file store.
    pub fn files(&self) -> &ImageFiles {
        &self.files
    }

    /// Woken when a job is submitted here (the dispatcher waits on it).
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Commits a job owned by `who` (or finds the one `who`'s `Idempotency-Key` created for the same request:
    /// a replay is answered
    /// even when the queue or the key is at its limit), stores an edit's pictures first, wakes the
    /// dispatcher and announces the job to followers.
    pub async fn submit(
        &self,
        who: &Principal,
        request: JobRequest,
        idempotency: Option<&Idempotency>,
    ) -> Result<Submitted, JobsError> {
        let JobRequest { model, mut params, inputs, priority, webhook } = request;
        let folder = Uuid::new_v4();
        let stored = self.store_inputs(folder, &mut params, inputs).await;
        let outcome = match stored {
            Ok(input_bytes) => {
                let ready = ReadyJob { model, params, priority, input_bytes, webhook };
                self.enqueue(who, ready, idempotency).await
            }
            Err(e) => Err(e),
        };
        if !matches!(outcome, Ok(Submitted { created: true, .. })) {
            // Refused, failed, or a replay whose first request's job keeps its own inputs.
            if let Err(e) = self.files.remove_input(folder).await {
                warn!(%folder, error = %e, "removing the inputs of a submission that made no job failed");
            }
        }
        outcome
    }

    /// Writes the job's blobs — an edit's pictures, the client's latents — under `inputs/{folder}/` and
    /// points the parameters at them, so the job row stays small. Returns their size in bytes.
    async fn store_inputs(
        &self,
        folder: Uuid,
        params: &mut JobParams,
        inputs: Option<EditInputs>,
    ) -> Result<u64, JobsError> {
        let latents = match params.generation_mut().and_then(|g| g.latents.take()) {
            Some(b64) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| JobsError::Files(format!("latents: {e}")))?,
            ),
            None => None,
        };
        if inputs.is_none() && latents.is_none() {
            return Ok(0);
        }
        let bytes = latents.as_ref().map_or(0, Vec::len)
            + inputs.as_ref().map_or(0, |i| {
                i.image_png.len()
                    + i.mask_png.as_ref().map_or(0, Vec::len)
                    + i.original.as_ref().map_or(0, |(bytes, _)| bytes.len())
            });
        let files = &self.files;
        let written = async {
            let latents = match latents {
                Some(bytes) => Some(files.write_input(folder, "latents.npy", bytes).await?),
                None => None,
            };
            let pictures = match inputs {
                Some(inputs) => {
                    let image = files.write_input(folder, "image.png", inputs.image_png).await?;
                    let mask = match inputs.mask_png {
                        Some(mask) => Some(files.write_input(folder, "mask.png", mask).await?),
                        None => None,
                    };
                    let original = match inputs.original {
                        Some((bytes, extension)) => {
                            Some(files.write_input(folder, &format!("original.{extension}"), bytes).await?)
                        }
                        None => None,
                    };
                    Some((image, mask, original))
                }
                None => None,
            };
            Ok::<_, StorageError>((latents, pictures))
        };
        let (latents_path, pictures) =
            written.await.map_err(|e| JobsError::Files(format!("storing the job's inputs: {e}")))?;
        if let Some(generation) = params.generation_mut() {
            generation.latents_path = latents_path;
        }
        if let (Some((image_path, mask_path, original_path)), JobParams::Edit(edit)) = (pictures, params) {
            edit.image_path = image_path;
            edit.mask_path = mask_path;
            edit.original_path = original_path;
        }
        Ok(bytes as u64)
    }

    async fn enqueue(
        &self,
        who: &Principal,
        ready: ReadyJob,
        idempotency: Option<&Idempotency>,
    ) -> Result<Submitted, JobsError> {
        let ReadyJob { model, params, priority, input_bytes, webhook } = ready;
        let cost = params.image_steps();
        let new = NewJob {
            model,
            params,
            priority: priority.value(),
            max_attempts: self.rules.max_attempts,
            owner: who.owner().map(str::to_string),
            input_bytes,
            cost,
            webhook,
        };
        let limits = SubmitLimits {
            max_queued: self.rules.max_queued,
            max_outstanding_per_owner: self.rules.max_outstanding_per_key,
            max_stored_bytes_per_owner: self.rules.max_stored_bytes_per_key,
            rate_per_minute: who.limits.rate_per_minute,
            daily_image_steps: who.limits.daily_image_steps,
        };
        let key = idempotency.map(|i| IdempotencyKey {
            key: &i.key,
            fingerprint: &i.fingerprint,
            window: IDEMPOTENCY_WINDOW,
        });
        let submission = self.store.submit(new, key, limits).await?;
        let committed = std::time::Instant::now();
        let (job, created) = match submission {
            super::Submission::Created(job) => (job, true),
            super::Submission::Replayed(job) => (job, false),
            super::Submission::QueueFull { queued } => {
                let workers = self.rules.workers.max(1) as u64;
                let per_job = self.progress.queued_eta_ms(20, 0, self.rules.workers).unwrap_or(1000);
                let retry_after = (per_job * queued.min(100) / 1000 / workers).clamp(1, 300);
                return Err(JobsError::QueueFull { queued, retry_after });
            }
            super::Submission::KeyReused => return Err(JobsError::KeyReused),
            super::Submission::OverQuota { stored } => {
                return Err(JobsError::OverQuota { stored, limit: self.rules.max_stored_bytes_per_key });
            }
            super::Submission::OwnerBusy { outstanding } => {
                return Err(JobsError::OwnerBusy { outstanding, limit: self.rules.max_outstanding_per_key });
            }
            super::Submission::RateLimited { state, retry_after_ms } => {
                return Err(JobsError::RateLimited { state, retry_after: retry_after_ms.div_ceil(1000).max(1) });
            }
            super::Submission::ComputeExhausted { used, limit, retry_after_ms } => {
                let retry_after = retry_after_ms.div_ceil(1000).max(1);
                return Err(JobsError::ComputeExhausted { used, cost, limit, retry_after });
            }
        };
        let rate = match (who.owner(), who.limits.rate_per_minute) {
            (Some(owner), Some(rate)) => Some(self.store.rate_state(owner, rate).await?),
            _ => None,
        };
        let mut live = None;
        if created {
            self.wake.notify_one();
            metrics::counter!("denoised_jobs_submitted_total").increment(1);
            self.bus.note_owner(job.id, job.owner.as_deref());
            // A worker may have claimed the job since its commit: then nothing is ahead of it any more, and the
            // answer (which shows the job as committed, queued) says 0, like its `queued` event.
            let position = self.positions.of_new(job.id, committed, self.bus.last_lifecycle_id()).await?.unwrap_or(0);
            let total = job.params.visible_steps();
            let eta_ms = self.progress.queued_eta_ms(total, position, self.rules.workers);
            self.bus.publish(job.id, EventKind::queued(position, eta_ms));
            live = Some(LiveState { progress: Progress { step: 0, total, eta_ms }, queue_position: Some(position) });
        }
        Ok(Submitted { job, created, rate, live })
    }

    /// The job `id` if it exists and `who` may see it; another tenant's job is "not found", exactly like a
    /// missing one, so ids reveal nothing.
    pub async fn find(&self, who: &Principal, id: Uuid) -> Result<Job, JobsError> {
        match self.store.get(id).await? {
            Some(job) if who.can_see(job.owner.as_deref()) => Ok(job),
            _ => Err(JobsError::NotFound(id)),
        }
    }

    /// A page of `who`'s jobs, newest first, after `cursor`.
    pub async fn list(
        &self,
        who: &Principal,
        status: Option<JobStatus>,
        cursor: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Job>, JobsError> {
        Ok(self.store.list(status, who.list_scope(), cursor, limit).await?)
    }

    /// Jobs ahead of `id` in claim order, or `None` if it is not queued.
    pub(super) async fn queue_position(&self, id: Uuid) -> Result<Option<u64>, JobsError> {
        Ok(self.positions.get(id, self.bus.last_lifecycle_id()).await?)
    }

    /// A rough wait for a queued job with `steps` steps and `position` jobs ahead.
    pub(super) fn queued_eta_ms(&self, steps: u32, position: u64) -> Option<u64> {
        self.progress.queued_eta_ms(steps, position, self.rules.workers)
    }

    /// The live part of a job's state: progress with an estimate, and the queue position while queued.
    pub async fn live_state(&self, job: &Job) -> Result<LiveState, JobsError> {
        let total = job.params.visible_steps();
        let queue_position = match job.status {
            JobStatus::Queued => self.queue_position(job.id).await?,
            _ => None,
        };
        let progress = match job.status {
            JobStatus::Running => self
                .progress
                .get(job.id)
                .or_else(|| {
                    let seen = self.bus.latest_progress(job.id)?;
                    Some(Progress { step: seen.step, total: seen.total, eta_ms: Some(seen.eta_ms) })
                })
                .unwrap_or(Progress { step: 0, total, eta_ms: None }),
            JobStatus::Succeeded => Progress { step: total, total, eta_ms: Some(0) },
            JobStatus::Queued => {
                Progress { step: 0, total, eta_ms: self.queued_eta_ms(total, queue_position.unwrap_or(0)) }
            }
            _ => Progress { step: 0, total, eta_ms: None },
        };
        Ok(LiveState { progress, queue_position })
    }

    /// `job`'s webhook and the state of its latest delivery; `None` when it has none.
    pub async fn webhook(&self, job: &Job) -> Result<Option<super::store::WebhookState>, JobsError> {
        Ok(self.store.webhook_state(job.id).await?)
    }

    /// The images of a job that has succeeded (none otherwise).
    pub async fn images(&self, job: &Job) -> Result<Vec<ImageRecord>, JobsError> {
        if job.status != JobStatus::Succeeded {
            return Ok(Vec::new());
        }
        Ok(self.store.images(job.id).await?)
    }

    /// Image `index` of `who`'s job `id` with its bytes; the job must have succeeded.
    pub async fn image(&self, who: &Principal, id: Uuid, index: u32) -> Result<(ImageRecord, Vec<u8>), JobsError> {
        let job = self.find(who, id).await?;
        if job.status != JobStatus::Succeeded {
            return Err(JobsError::WrongState { id, status: job.status, why: "images exist once it has succeeded" });
        }
        let record = self.store.image(id, index).await?.ok_or(JobsError::NoImage(id, index))?;
        let bytes = self.image_bytes(&record).await?;
        Ok((record, bytes))
    }

    /// The mask `who`'s DiffEdit job `id` computed, as PNG; the job must have succeeded.
    pub async fn mask(&self, who: &Principal, id: Uuid) -> Result<Vec<u8>, JobsError> {
        let job = self.find(who, id).await?;
        if !has_computed_mask(&job.params) {
            return Err(JobsError::NoMask(id));
        }
        if job.status != JobStatus::Succeeded {
            return Err(JobsError::WrongState { id, status: job.status, why: "its mask exists once it has succeeded" });
        }
        self.files.read(&ImageFiles::mask_key(id)).await.map_err(|e| JobsError::Files(e.to_string()))
    }

    /// The stored bytes of an image.
    pub async fn image_bytes(&self, record: &ImageRecord) -> Result<Vec<u8>, JobsError> {
        self.files.read(&record.image.path).await.map_err(|e| JobsError::Files(e.to_string()))
    }

    /// Cancels `who`'s job `id`: a queued job at once, a running one at its next step.
    pub async fn cancel(&self, who: &Principal, id: Uuid) -> Result<Cancelled, JobsError> {
        let job = self.find(who, id).await?;
        let at_once = match job.status {
            JobStatus::Queued if self.store.cancel_queued(id).await? => {
                self.bus.publish(id, EventKind::CANCELLED);
                true
            }
            JobStatus::Queued | JobStatus::Running => {
                if !self.progress.stop(id, StopReason::Client) {
                    // Claimed between our read and the cancel, or running in another process.
                    let now = self.store.get(id).await?.ok_or(JobsError::NotFound(id))?;
                    let stopped = now.status == JobStatus::Running
                        && (self.progress.stop(id, StopReason::Client) || self.store.request_cancel(id).await?);
                    if now.status.is_terminal() {
                        return Err(JobsError::WrongState { id, status: now.status, why: "it has already ended" });
                    } else if !stopped {
                        return Err(JobsError::RunningElsewhere(id));
                    }
                }
                false
            }
            status => return Err(JobsError::WrongState { id, status, why: "it has already ended" }),
        };
        let job = self.store.get(id).await?.ok_or(JobsError::NotFound(id))?;
        Ok(if at_once { Cancelled::AtOnce(job) } else { Cancelled::Requested(job) })
    }

    /// Deletes `who`'s job `id` with its files, stopping it first if it runs here.
    pub async fn delete(&self, who: &Principal, id: Uuid) -> Result<(), JobsError> {
        let job = self.find(who, id).await?;
        if job.status == JobStatus::Running {
            self.progress.stop(id, StopReason::Client);
        }
        if !self.store.delete(id).await? {
            return Err(JobsError::NotFound(id));
        }
        if job.status == JobStatus::Running {
            // Its worker may be in another process: it stops when it sees the row gone (at once on PostgreSQL).
            self.store.announce_stop(id).await?;
        }
        if !job.status.is_terminal() {
            self.bus.note_owner(id, job.owner.as_deref());
            self.bus.publish(id, EventKind::CANCELLED);
        }
        self.bus.forget(id);
        self.remove_files(vec![job]).await
    }

    /// Removes the files of jobs whose rows are gone (deletion and the retention sweep).
    pub async fn remove_files(&self, jobs: Vec<Job>) -> Result<(), JobsError> {
        for job in jobs {
            self.files
                .remove_job_files(job.id, job.params.input_path())
                .await
                .map_err(|e| JobsError::Files(format!("removing files: {e}")))?;
        }
        Ok(())
    }

    /// Whether `job`'s API key has been revoked since it was submitted (its running job is then stopped; a
    /// database error counts as not revoked, so a hiccup stops nothing).
    pub async fn owner_revoked(&self, job: &Job) -> bool {
        match &job.owner {
            Some(owner) => !crate::auth::KeyStore::new(&self.store).is_live(owner).await.unwrap_or(true),
            None => false,
        }
    }

    /// Records that a worker took `job`: announced to followers, and queued for its webhook when it asked
    /// for `started` (best effort: a failed write is logged and the job runs on).
    pub async fn started(&self, job: &Job) {
        self.bus.note_owner(job.id, job.owner.as_deref());
        self.bus.publish(job.id, EventKind::Started(StartedEvent { attempt: job.attempts }));
        if let Err(e) = self.store.queue_started(job.id, job.attempts).await {
            warn!(id = %job.id, error = %e, "queueing the webhook's started event failed");
        }
    }

    /// Records a finished job's images, fenced by its lease. The images (and a DiffEdit job's mask, at
    /// [`ImageFiles::mask_key`]) are stored whole first, so the database never points at a missing one.
    pub async fn succeeded(&self, id: Uuid, owner: &str, format: OutputFormat, output: WorkOutput) {
        let WorkOutput { images, mask } = output;
        let computed_mask = mask.is_some().then(|| MaskInfo::of(id));
        if let Some(mask) = mask {
            if let Err(e) = self.files.write_mask(id, mask).await {
                return self.failed(id, owner, "storage_error", &format!("writing the mask: {e}")).await;
            }
        }
        let records = match self.store_images(id, format, images).await {
            Ok(records) => records,
            Err(e) => return self.failed(id, owner, "storage_error", &format!("writing images: {e}")).await,
        };
        match self.store.complete(id, owner, &records).await {
            Ok(true) => {
                info!(%id, images = records.len(), "job succeeded");
                metrics::counter!("denoised_jobs_total", "outcome" => "succeeded").increment(1);
                let images = records.iter().map(|r| ImageInfo::new(id, r)).collect();
                self.bus.publish(id, EventKind::Completed(CompletedEvent { images, mask: computed_mask }));
            }
            Ok(false) => {
                if matches!(self.store.get(id).await, Ok(None)) {
                    info!(%id, "job was deleted while running; removing its images");
                    if let Err(e) = self.files.remove_job(id).await {
                        warn!(%id, error = %e, "removing the images of a deleted job failed");
                    }
                } else {
                    warn!(%id, "lease lost before completion; another attempt owns the job");
                }
            }
            Err(e) => error!(%id, error = %e, "recording completion failed; the job will run again"),
        }
    }

    /// Stores a finished job's images and describes them for the database.
    async fn store_images(
        &self,
        id: Uuid,
        format: OutputFormat,
        images: Vec<EncodedImage>,
    ) -> Result<Vec<NewImage>, StorageError> {
        let mut records = Vec::with_capacity(images.len());
        for image in images {
            let (sha256, bytes) = (sha256_hex(&image.bytes), image.bytes.len() as u64);
            records.push(NewImage {
                index: image.index,
                seed: image.seed,
                width: image.width,
                height: image.height,
                format: format.as_str().to_string(),
                path: self.files.write_image(id, image.index, format.extension(), image.bytes).await?,
                sha256,
                bytes,
            });
        }
        Ok(records)
    }

    /// Records a failure, fenced by the lease.
    pub async fn failed(&self, id: Uuid, owner: &str, code: &str, message: &str) {
        warn!(%id, code, message, "job failed");
        metrics::counter!("denoised_jobs_total", "outcome" => "failed").increment(1);
        let recorded = self.store.fail(id, owner, code, message).await;
        if fenced(id, "the failure", recorded) {
            self.bus.publish(id, EventKind::failed(code, message));
        }
    }

    /// Shutdown stopped the job: it goes back to the queue, uncharged.
    pub async fn handed_back(&self, id: Uuid, owner: &str) {
        if fenced(id, "the hand-back (the reaper re-queues it)", self.store.release(id, owner).await) {
            info!(%id, "job handed back to the queue");
            let position = self.store.queue_position(id).await.ok().flatten().unwrap_or(0);
            self.bus.publish(id, EventKind::queued(position, None));
        }
    }

    /// A client's cancellation stopped the running job.
    pub async fn cancelled_while_running(&self, id: Uuid, owner: &str) {
        if fenced(id, "the cancellation", self.store.finish_cancelled(id, owner).await) {
            info!(%id, "job cancelled while running");
            self.bus.publish(id, EventKind::CANCELLED);
        }
    }
}

/// Whether a job computes its mask when it runs (a DiffEdit edit).
pub fn has_computed_mask(params: &JobParams) -> bool {
    matches!(params, JobParams::Edit(edit) if edit.diffedit.is_some())
}

/// Whether a fenced write of `what` took effect; a lost lease (the job was deleted, or another attempt owns
/// it) or a database error is logged and leaves the job to its new owner or the reaper.
fn fenced(id: Uuid, what: &str, written: Result<bool, StoreError>) -> bool {
    match written {
        Ok(true) => true,
        Ok(false) => {
            warn!(%id, "{what} was not recorded: the job was deleted or its lease lost");
            false
        }
        Err(e) => {
            error!(%id, error = %e, "recording {what} failed");
            false
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
