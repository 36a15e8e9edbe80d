//! The dispatcher: claims jobs from the store when a worker is idle, hands them over, keeps their leases
//! alive while they run, and records the outcome (fenced by the lease) once the images are safely on disk.
//! It also runs the reaper that re-queues jobs whose worker died.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinSet;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::events::{EventBus, EventImage, EventKind};
use super::pool::{EncodedImage, Task, WorkError, WorkItem, WorkOutcome, WorkerPool};
use super::progress::{ProgressBoard, StopReason};
use crate::engine::image::OutputFormat;
use crate::jobs::params::{EditParams, GenerateParams, KIND_EDIT};
use crate::jobs::{Job, JobStore, NewImage};
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
    /// The job store.
    pub store: JobStore,
    /// The worker threads.
    pub pool: Arc<WorkerPool>,
    /// Live progress and cancellation.
    pub progress: ProgressBoard,
    /// What followers of a job are told.
    pub bus: EventBus,
    /// Image files.
    pub files: ImageFiles,
    /// Woken when a job is submitted in this process.
    pub wake: Arc<Notify>,
    /// Timing.
    pub settings: DispatchSettings,
    /// Unique per process: lease owners are `{process}/worker-{i}`.
    pub process_id: String,
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
                match this.store.claim(&owner, this.settings.lease).await {
                    Ok(Some(job)) => break job,
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "claiming a job failed; retrying"),
                }
                tokio::select! {
                    _ = shutdown.changed() => break 'outer,
                    _ = this.wake.notified() => {}
                    _ = tokio::time::sleep(this.settings.poll) => {}
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
            };
            let this = this.clone();
            let idle_tx = idle_tx.clone();
            running.spawn(async move {
                this.execute(job, worker, owner).await;
                let _ = idle_tx.send(worker);
            });
        }
        info!(running = running.len(), "dispatcher stopping");
        let grace = tokio::time::sleep(this.settings.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = running.join_next() => if next.is_none() { break },
                _ = &mut grace => {
                    warn!(running = running.len(), "grace period over: stopping running jobs and re-queueing them");
                    this.progress.stop_all(StopReason::Shutdown);
                    while running.join_next().await.is_some() {}
                    break;
                }
            }
        }
        reaper.abort();
    }

    async fn execute(&self, job: Job, worker: usize, owner: String) {
        let id = job.id;
        let (params, task, steps) = match self.task_of(&job).await {
            Ok(parts) => parts,
            Err(message) => return self.fail(id, &owner, "invalid_params", &message).await,
        };
        let stop = self.progress.start(id, steps);
        let (reply, outcome) = oneshot::channel();
        let item = WorkItem {
            job: id,
            model: job.model.clone(),
            task,
            steps,
            format: params.output_format,
            quality: params.output_quality,
            stop: stop.clone(),
            preview_every: params.preview_every,
            preview_mode: params.preview,
            reply,
        };
        if let Err(e) = self.pool.submit(worker, item) {
            self.progress.finish(id);
            error!(%id, error = %e, "worker refused a job; handing it back");
            let _ = self.store.release(id, &owner).await;
            return;
        }
        info!(%id, worker, attempt = job.attempts, "job started");
        self.bus.note_owner(id, job.owner.as_deref());
        self.bus.publish(id, EventKind::Started { attempt: job.attempts });
        let outcome = self.wait_renewing(id, &owner, outcome).await;
        self.progress.finish(id);
        match outcome {
            Some(Ok(images)) => self.complete(id, &owner, params.output_format, images).await,
            Some(Err(WorkError::Engine { code: "cancelled", .. })) => match stop.reason() {
                Some(StopReason::Shutdown) | None => self.hand_back(id, &owner).await,
                Some(StopReason::Timeout) => {
                    let limit = self.settings.job_timeout.as_secs();
                    self.fail(id, &owner, "timeout", &format!("the job ran longer than {limit} s and was stopped"))
                        .await
                }
                Some(StopReason::Client) => match self.store.finish_cancelled(id, &owner).await {
                    Ok(true) => {
                        info!(%id, "job cancelled while running");
                        self.bus.publish(id, EventKind::Cancelled);
                    }
                    Ok(false) => info!(%id, "cancelled job was deleted or its lease lost"),
                    Err(e) => error!(%id, error = %e, "recording the cancellation failed"),
                },
            },
            Some(Err(e)) => self.fail(id, &owner, e.code(), &e.to_string()).await,
            None => self.fail(id, &owner, "worker_lost", "the worker thread stopped while running the job").await,
        }
    }

    /// Rebuilds a job's work from its stored parameters (and, for edits, its stored input pictures).
    async fn task_of(&self, job: &Job) -> Result<(GenerateParams, Task, u32), String> {
        if job.kind == KIND_EDIT {
            let params: EditParams = serde_json::from_value(job.params.clone()).map_err(|e| e.to_string())?;
            let files = self.files.clone();
            let (image_path, mask_path) = (params.image_path.clone(), params.mask_path.clone());
            let (image, mask) =
                tokio::task::spawn_blocking(move || load_inputs(&files, &image_path, mask_path.as_deref()))
                    .await
                    .map_err(|e| e.to_string())??;
            let request = params.to_request(image, mask)?;
            let steps = params.visible_steps();
            return Ok((params.generate, Task::Edit(Box::new(request)), steps));
        }
        let params: GenerateParams = serde_json::from_value(job.params.clone()).map_err(|e| e.to_string())?;
        let request = params.to_request()?;
        let steps = params.steps;
        Ok((params, Task::Generate(request), steps))
    }

    /// Shutdown stopped the job: it goes back to the queue, uncharged.
    async fn hand_back(&self, id: Uuid, owner: &str) {
        match self.store.release(id, owner).await {
            Ok(true) => {
                info!(%id, "job handed back to the queue");
                let position = self.store.queue_position(id).await.ok().flatten().unwrap_or(0);
                self.bus.publish(id, EventKind::Queued { position, eta_ms: None });
            }
            Ok(false) => warn!(%id, "lease lost before the job could be handed back"),
            Err(e) => error!(%id, error = %e, "handing the job back failed; the reaper will re-queue it"),
        }
    }

    /// Waits for the worker's outcome, renewing the lease every third of its length.
    async fn wait_renewing(
        &self,
        id: Uuid,
        owner: &str,
        mut outcome: oneshot::Receiver<WorkOutcome>,
    ) -> Option<WorkOutcome> {
        let period = (self.settings.lease / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(period);
        ticker.tick().await;
        let deadline = tokio::time::sleep(self.settings.job_timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        loop {
            tokio::select! {
                result = &mut outcome => return result.ok(),
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    warn!(%id, "job timed out; stopping it");
                    self.progress.stop(id, StopReason::Timeout);
                }
                _ = ticker.tick() => match self.store.renew(id, owner, self.settings.lease).await {
                    Ok(true) => {}
                    Ok(false) => warn!(%id, "lease lost while running; the result will be discarded"),
                    Err(e) => warn!(%id, error = %e, "lease renewal failed"),
                },
            }
        }
    }

    async fn complete(&self, id: Uuid, owner: &str, format: OutputFormat, images: Vec<EncodedImage>) {
        let files = self.files.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<NewImage>> {
            images
                .into_iter()
                .map(|image| {
                    let path = files.write(id, image.index, format.extension(), &image.bytes)?;
                    Ok(NewImage {
                        index: image.index,
                        seed: image.seed,
                        width: image.width,
                        height: image.height,
                        format: format.as_str().to_string(),
                        path,
                        sha256: sha256_hex(&image.bytes),
                        bytes: image.bytes.len() as u64,
                    })
                })
                .collect()
        })
        .await;
        let records = match written {
            Ok(Ok(records)) => records,
            Ok(Err(e)) => return self.fail(id, owner, "storage_error", &format!("writing images: {e}")).await,
            Err(e) => return self.fail(id, owner, "storage_error", &format!("writing images: {e}")).await,
        };
        match self.store.complete(id, owner, &records).await {
            Ok(true) => {
                info!(%id, images = records.len(), "job succeeded");
                metrics::counter!("denoised_jobs_total", "outcome" => "succeeded").increment(1);
                let images = records
                    .iter()
                    .map(|r| EventImage {
                        index: r.index,
                        url: format!("/v1/jobs/{id}/images/{}", r.index),
                        seed: r.seed,
                        width: r.width,
                        height: r.height,
                        format: r.format.clone(),
                    })
                    .collect();
                self.bus.publish(id, EventKind::Completed { images });
            }
            Ok(false) => {
                if matches!(self.store.get(id).await, Ok(None)) {
                    info!(%id, "job was deleted while running; removing its images");
                    let _ = self.files.remove_job(id);
                } else {
                    warn!(%id, "lease lost before completion; another attempt owns the job");
                }
            }
            Err(e) => error!(%id, error = %e, "recording completion failed; the job will run again"),
        }
    }

    async fn fail(&self, id: Uuid, owner: &str, code: &str, message: &str) {
        warn!(%id, code, message, "job failed");
        metrics::counter!("denoised_jobs_total", "outcome" => "failed").increment(1);
        match self.store.fail(id, owner, code, message).await {
            Ok(true) => {
                self.bus.publish(id, EventKind::Failed { code: code.to_string(), message: message.to_string() });
            }
            Ok(false) => warn!(%id, "lease lost before the failure could be recorded"),
            Err(e) => error!(%id, error = %e, "recording the failure failed"),
        }
    }
}

async fn reap(this: Arc<Dispatcher>, mut shutdown: watch::Receiver<bool>) {
    loop {
        match this.store.recover_expired().await {
            Ok(report) if !report.is_empty() => {
                info!(?report, "re-queued jobs whose lease expired");
                this.wake.notify_waiters();
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

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads an edit job's stored picture and mask.
fn load_inputs(
    files: &ImageFiles,
    image: &str,
    mask: Option<&str>,
) -> Result<(image::RgbImage, Option<image::GrayImage>), String> {
    let read = |relative: &str| -> Result<image::DynamicImage, String> {
        let path = files.resolve(relative).ok_or_else(|| format!("unsafe input path {relative}"))?;
        image::open(&path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let picture = read(image)?.to_rgb8();
    let mask = mask.map(|m| read(m).map(|d| d.to_luma8())).transpose()?;
    Ok((picture, mask))
}
