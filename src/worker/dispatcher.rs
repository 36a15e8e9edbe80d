//! The dispatcher: claims jobs from the store when a worker is idle, hands them over, keeps their leases
//! alive while they run, and records the outcome (fenced by the lease) once the images are safely stored.
//! It also runs the reaper that re-queues jobs whose worker died.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::pool::{Reply, Task, WorkError, WorkItem, WorkOutcome, WorkOutput, WorkerPool};
use crate::credentials::{parameters_sha256, ContentCredentials, OutputClaim, Parent};
use crate::engine::image::OutputFormat;
use crate::jobs::params::GenerateParams;
use crate::jobs::progress::StopReason;
use crate::jobs::{Job, JobParams, Jobs};

use crate::storage::ImageFiles;

/// Queue timing.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// Lease length; renewed every third of it.
    pub lease: Duration,
    /// How often to look for jobs from other processes and for expired leases.
    pub poll: Duration,
    /// How long running jobs get to finish at shutdown before they are handed back to the queue.
    pub shutdown_grace: Duration,
    /// How long a job may run before it is stopped and failed with `timeout`.
    pub job_timeout: Duration,
}

/// Everything the dispatcher needs.
pub struct Dispatcher {
    /// The jobs service: the store to claim from and where outcomes are recorded.
    pub jobs: Jobs,
    /// The worker threads.
    pub pool: Arc<WorkerPool>,
    /// Timing.
    pub settings: DispatchSettings,
    /// Unique per process: lease owners are `{process}/worker-{i}`.
    pub process_id: String,
    /// Claim only jobs for these models (`None`: any job).
    pub models: Option<Vec<String>>,
    /// Signs C2PA content credentials into every output before it is stored (`None`: outputs are stored as
    /// encoded).
    pub credentials: Option<Arc<ContentCredentials>>,
}

impl Dispatcher {
    /// Runs until `shutdown` turns true, then lets running jobs finish within the grace period and hands the
    /// rest back to the queue.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let (idle_tx, mut idle_rx) = mpsc::unbounded_channel::<usize>();
        for index in 0..this.pool.len() {
            let _ = idle_tx.send(index);
        }
        let mut running: JoinSet<()> = JoinSet::new();
        let reaper = tokio::spawn(reap(this.clone(), shutdown.clone()));
        'outer: loop {
            let worker = tokio::select! {
                _ = shutdown.changed() => break 'outer,
                w = idle_rx.recv() => match w { Some(w) => w, None => break 'outer },
                Some(_) = running.join_next(), if !running.is_empty() => continue,
            };
            let owner = format!("{}/worker-{worker}", this.process_id);
            let job = loop {
                if *shutdown.borrow() {
                    break 'outer;
                }
                match this.jobs.store().claim_for(&owner, this.settings.lease, this.models.as_deref()).await {
                    Ok(Some(job)) => break job,
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "claiming a job failed; retrying"),
                }
                tokio::select! {
                    _ = shutdown.changed() => break 'outer,
                    _ = this.jobs.wake().notified() => {}
                    _ = tokio::time::sleep(this.settings.poll) => {}
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
            };
            let cohort = this.with_companions(job, &owner, worker).await;
            let this = this.clone();
            let idle = IdleOnDrop { tx: idle_tx.clone(), worker };
            running.spawn(async move { this.execute(cohort, owner, idle).await });
        }
        info!(running = running.len(), "dispatcher stopping");
        let grace = tokio::time::sleep(this.settings.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = running.join_next() => if next.is_none() { break },
                _ = &mut grace => {
                    warn!(running = running.len(), "grace period over: stopping running jobs and re-queueing them");
                    this.jobs.progress().stop_all(StopReason::Shutdown);
                    while running.join_next().await.is_some() {}
                    break;
                }
            }
        }
        reaper.abort();
    }

    /// `job` and, when `worker` batches, queued jobs that can share its denoiser calls (same
    /// [`JobParams::batch_key`]), claimed now up to the worker's `max_batch` images. A job that arrives later
    /// waits for the next cohort or runs on another worker.
    async fn with_companions(&self, job: Job, owner: &str, worker: usize) -> Vec<Job> {
        let max_batch = self.pool.max_batch(worker) as u64;
        let steps = u64::from(job.params.visible_steps()).max(1);
        let key = job.params.batch_key(&job.model).filter(|_| max_batch > 1);
        let mut images = job.params.image_steps() / steps;
        let mut cohort = vec![job];
        let Some(key) = key else { return cohort };
        while images < max_batch {
            let room = (max_batch - images) * steps;
            match self.jobs.store().claim_companion(owner, self.settings.lease, &key, room).await {
                Ok(Some(next)) => {
                    images += next.params.image_steps() / steps;
                    cohort.push(next);
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "claiming a job to share a cohort failed; running without it");
                    break;
                }
            }
        }
        cohort
    }

    /// Runs `jobs` (one, or a cohort sharing its denoiser calls) on `idle`'s worker and records each
    /// outcome. The worker is marked idle (by dropping `idle`) as soon as its thread has handed back every
    /// outcome, before the images and the new statuses are written, so the next claim and job overlap these
    /// durable writes instead of waiting for them.
    async fn execute(&self, jobs: Vec<Job>, owner: String, idle: IdleOnDrop) {
        let worker = idle.worker;
        let idle = Arc::new(idle);
        let progress = self.jobs.progress();
        let mut items = Vec::with_capacity(jobs.len());
        let mut members = Vec::with_capacity(jobs.len());
        for job in jobs {
            let (params, task, steps) = match self.task_of(&job).await {
                Ok(parts) => parts,
                Err(Unrunnable { code, message }) => {
                    self.jobs.failed(job.id, &owner, code, &message).await;
                    continue;
                }
            };
            let stop = progress.start(job.id, steps);
            let (reply, outcome) = oneshot::channel();
            items.push(WorkItem {
                job: job.id,
                model: job.model.clone(),
                task,
                steps,
                format: params.output_format,
                quality: params.output_quality,
                stop: stop.clone(),
                preview_every: params.preview_every,
                preview_mode: params.preview,
                reply: Reply::new(reply),
            });
            members.push(Member { job, format: params.output_format, stop, outcome });
        }
        if items.is_empty() {
            return;
        }
        if let Err(e) = self.pool.submit_cohort(worker, items) {
            for member in &members {
                progress.finish(member.job.id);
                error!(id = %member.job.id, error = %e, "worker refused a job; handing it back");
                let _ = self.jobs.store().release(member.job.id, &owner).await;
            }
            return;
        }
        let cohort = members.len();
        futures_util::future::join_all(
            members.into_iter().map(|member| self.follow(member, &owner, worker, cohort, idle.clone())),
        )
        .await;
    }

    /// Follows one job handed to `worker` until its outcome is recorded.
    async fn follow(&self, member: Member, owner: &str, worker: usize, cohort: usize, idle: Arc<IdleOnDrop>) {
        let Member { job, format, stop, outcome } = member;
        let id = job.id;
        info!(%id, worker, cohort, attempt = job.attempts, "job started");
        self.jobs.started(&job).await;
        let outcome = self.wait_renewing(&job, owner, outcome).await;
        drop(idle);
        self.jobs.progress().finish(id);
        match outcome {
            Some(Ok(output)) => match self.with_credentials(&job, format, output).await {
                Ok(output) => self.jobs.succeeded(id, owner, format, output).await,
                Err(Unrunnable { code, message }) => {
                    error!(%id, code, detail = %message, "signing the job's content credentials failed");
                    self.jobs.failed(id, owner, code, &message).await
                }
            },
            Some(Err(WorkError::Engine { code: "cancelled", .. })) => self.stopped(id, owner, stop.reason()).await,
            Some(Err(e)) => {
                error!(%id, code = e.code(), detail = %e, "the job's run failed");
                self.jobs.failed(id, owner, e.code(), e.public_message()).await
            }
            None => self.jobs.failed(id, owner, "worker_lost", "the worker thread stopped while running the job").await,
        }
    }

    /// `output` of `job` with signed content credentials embedded in its pictures, when this process signs;
    /// an edit's manifest records the picture the client sent as its parent. Signing runs on a blocking thread.
    async fn with_credentials(
        &self,
        job: &Job,
        format: OutputFormat,
        output: WorkOutput,
    ) -> Result<WorkOutput, Unrunnable> {
        let Some(credentials) = self.credentials.clone() else { return Ok(output) };
        let WorkOutput { images, mask } = output;
        let parent = match &job.params {
            JobParams::Edit(edit) => {
                let key = edit.original_path.as_deref().unwrap_or(&edit.image_path);
                Some(read_input(self.jobs.files(), key).await?)
            }
            _ => None,
        };
        let (id, model, hash) = (job.id, job.model.clone(), parameters_sha256(&job.params.public_view()));
        let signing = tokio::task::spawn_blocking(move || {
            let parent = parent.as_deref().map(Parent::of);
            images
                .into_iter()
                .map(|mut image| {
                    let claim = OutputClaim {
                        job: id,
                        index: image.index,
                        seed: image.seed,
                        model: &model,
                        parameters_sha256: &hash,
                        parent,
                    };
                    let started = std::time::Instant::now();
                    image.bytes = credentials.sign(&image.bytes, format, &claim)?;
                    metrics::histogram!("denoised_content_credentials_seconds").record(started.elapsed().as_secs_f64());
                    Ok(image)
                })
                .collect::<Result<Vec<_>, crate::credentials::CredentialsError>>()
        });
        let failed = |message: String| Unrunnable { code: "content_credentials_failed", message };
        let images = signing.await.map_err(|e| failed(e.to_string()))?.map_err(|e| failed(e.to_string()))?;
        Ok(WorkOutput { images, mask })
    }

    /// Records why a stopped job stopped.
    async fn stopped(&self, id: Uuid, owner: &str, reason: Option<StopReason>) {
        match reason {
            Some(StopReason::Shutdown) | None => self.jobs.handed_back(id, owner).await,
            Some(StopReason::Timeout) => {
                let limit = self.settings.job_timeout.as_secs();
                let message = format!("the job ran longer than {limit} s and was stopped");
                self.jobs.failed(id, owner, "timeout", &message).await
            }
            Some(StopReason::Client) => self.jobs.cancelled_while_running(id, owner).await,
            // Another attempt owns the job now; its outcome is that attempt's to record.
            Some(StopReason::LeaseLost) => info!(%id, "job stopped after losing its lease"),
        }
    }

    /// Rebuilds a job's work from its stored parameters and its stored inputs (an edit's pictures, the
    /// client's latents): the bytes come from storage here, on the async side; pictures are decoded on a
    /// blocking thread. The worker thread gets finished engine requests and never touches storage.
    async fn task_of(&self, job: &Job) -> Result<(GenerateParams, Task, u32), Unrunnable> {
        let files = self.jobs.files();
        match job.params.clone() {
            JobParams::Edit(params) => {
                let latents = read_optional(files, params.generate.latents_path.as_deref()).await?;
                let image = read_input(files, &params.image_path).await?;
                let mask = read_optional(files, params.mask_path.as_deref()).await?;
                let inputs = tokio::task::spawn_blocking(move || {
                    let (image, mask) = decode_inputs(&image, mask.as_deref())?;
                    let request = params.to_request(image, mask, latents.as_deref())?;
                    Ok::<_, String>((params, request))
                });
                let (params, request) = inputs.await.map_err(|e| e.to_string())??;
                let steps = params.visible_steps();
                Ok((params.generate, Task::Edit(Box::new(request)), steps))
            }
            JobParams::Generate(params) => {
                let latents = read_optional(files, params.latents_path.as_deref()).await?;
                let request = params.to_request(latents.as_deref())?;
                let steps = params.steps;
                Ok((params, Task::Generate(request), steps))
            }
            JobParams::Unreadable { kind, error, .. } => {
                Err(format!("stored parameters of kind `{kind}`: {error}").into())
            }
        }
    }

    /// Waits for the worker's outcome, renewing the lease every third of its length. A job past its time
    /// limit, whose lease was lost (another process re-queued it), or whose API key was revoked is asked to
    /// stop; so is one that a client cancelled or deleted through another process (checked every poll
    /// interval; on PostgreSQL the fleet listener stops it at once).
    async fn wait_renewing(
        &self,
        job: &Job,
        owner: &str,
        mut outcome: oneshot::Receiver<WorkOutcome>,
    ) -> Option<WorkOutcome> {
        let id = job.id;
        let period = (self.settings.lease / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(period);
        ticker.tick().await;
        let mut check = tokio::time::interval(self.settings.poll);
        check.tick().await;
        let deadline = tokio::time::sleep(self.settings.job_timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        loop {
            tokio::select! {
                result = &mut outcome => return result.ok(),
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    warn!(%id, "job timed out; stopping it");
                    self.jobs.progress().stop(id, StopReason::Timeout);
                }
                _ = ticker.tick() => match self.jobs.store().renew(id, owner, self.settings.lease).await {
                    Ok(true) if self.jobs.owner_revoked(job).await => {
                        warn!(%id, "the job's API key was revoked; stopping it");
                        self.jobs.progress().stop(id, StopReason::Client);
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(%id, "lease lost while running; stopping the job");
                        self.jobs.progress().stop(id, StopReason::LeaseLost);
                    }
                    Err(e) => warn!(%id, error = %e, "lease renewal failed"),
                },
                _ = check.tick() => match self.jobs.store().cancel_requested(id, owner).await {
                    Ok(Some(false)) | Err(_) => {}
                    Ok(Some(true)) => {
                        info!(%id, "a client cancelled the job; stopping it");
                        self.jobs.progress().stop(id, StopReason::Client);
                    }
                    Ok(None) => {
                        info!(%id, "the job was deleted or taken over; stopping it");
                        self.jobs.progress().stop(id, StopReason::LeaseLost);
                    }
                },
            }
        }
    }
}

/// A job handed to a worker: what its outcome needs.
struct Member {
    job: Job,
    format: crate::engine::image::OutputFormat,
    stop: crate::jobs::progress::StopFlag,
    outcome: oneshot::Receiver<WorkOutcome>,
}

/// Hands a worker back to the dispatcher's idle list when dropped, so that every way out of
/// [`Dispatcher::execute`] (a job that never reached the worker included) frees the worker exactly once.
struct IdleOnDrop {
    tx: mpsc::UnboundedSender<usize>,
    worker: usize,
}

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        let _ = self.tx.send(self.worker);
    }
}

async fn reap(this: Arc<Dispatcher>, mut shutdown: watch::Receiver<bool>) {
    loop {
        match this.jobs.store().recover_expired().await {
            Ok(report) if !report.is_empty() => {
                info!(?report, "re-queued jobs whose lease expired");
                this.jobs.wake().notify_waiters();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "reaper failed"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(this.settings.poll) => {}
        }
    }
}

/// Why a claimed job cannot run: its failure code and message.
struct Unrunnable {
    code: &'static str,
    message: String,
}

/// Parameters that do not make a request (`invalid_params`).
impl From<String> for Unrunnable {
    fn from(message: String) -> Self {
        Self { code: "invalid_params", message }
    }
}

/// Reads one of a job's stored inputs (latents, an edit's picture or mask) by its key; a failure is the
/// storage's (`storage_error`), not the request's.
async fn read_input(files: &ImageFiles, key: &str) -> Result<Vec<u8>, Unrunnable> {
    files
        .read(key)
        .await
        .map_err(|e| Unrunnable { code: "storage_error", message: format!("reading the stored input: {e}") })
}

/// [`read_input`] for an input the job may not have.
async fn read_optional(files: &ImageFiles, key: Option<&str>) -> Result<Option<Vec<u8>>, Unrunnable> {
    match key {
        Some(key) => read_input(files, key).await.map(Some),
        None => Ok(None),
    }
}

/// Decodes an edit job's stored picture and mask.
fn decode_inputs(image: &[u8], mask: Option<&[u8]>) -> Result<(image::RgbImage, Option<image::GrayImage>), String> {
    let decode = |bytes: &[u8], what: &str| {
        image::load_from_memory(bytes).map_err(|e| format!("decoding the stored {what}: {e}"))
    };
    let picture = decode(image, "picture")?.to_rgb8();
    let mask = mask.map(|m| decode(m, "mask").map(|d| d.to_luma8())).transpose()?;
    Ok((picture, mask))
}
