//! Worker threads: one OS thread per `[[workers]]` entry, each owning its own ONNX sessions for every
//! configured model (a session is never shared). Work arrives on a bounded channel; results go back on a
//! oneshot. A panicking pipeline fails that job and the thread lives on.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tracing::{error, info, info_span, warn};
use uuid::Uuid;

use crate::engine::image::{encode, OutputFormat};
use crate::engine::model::LoadedModel;
use crate::engine::pipeline::{
    diffedit, edit, text_to_image, text_to_image_cohort, CohortMember, EditRequest, GenerateRequest, StepObserver,
};
use crate::engine::preview::PreviewMode;
use crate::engine::runtime::{Device, RunControl, Runtime};
use crate::engine::EngineError;
use crate::jobs::bus::{EventBus, EventKind, ProgressEvent};
use crate::jobs::progress::{ProgressBoard, StopFlag};
use crate::models::ModelRegistry;

/// One job handed to a worker thread.
#[derive(Debug)]
pub struct WorkItem {
    /// The job's id (for progress and logs).
    pub job: Uuid,
    /// Which configured model runs it.
    pub model: String,
    /// What to run.
    pub task: Task,
    /// Steps the client sees (progress is reported in these).
    pub steps: u32,
    /// Encoding of the outputs.
    pub format: OutputFormat,
    /// JPEG quality, when the client chose one.
    pub quality: Option<u8>,
    /// Set to stop the job at its next step boundary.
    pub stop: StopFlag,
    /// Denoiser calls between previews (0: none).
    pub preview_every: u32,
    /// How previews are rendered.
    pub preview_mode: PreviewMode,
    /// Where the outcome goes.
    pub reply: Reply,
}

/// Where a job's outcome goes: sent once, by whichever part of the worker finishes the job (a member of a
/// cohort that stops is answered before the others finish).
#[derive(Debug)]
pub struct Reply(std::sync::Mutex<Option<oneshot::Sender<WorkOutcome>>>);

impl Reply {
    /// A reply on `sender`.
    pub fn new(sender: oneshot::Sender<WorkOutcome>) -> Self {
        Self(std::sync::Mutex::new(Some(sender)))
    }

    /// Sends `outcome` unless an outcome was sent already.
    fn send(&self, outcome: WorkOutcome) {
        let sender = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(sender) = sender {
            if sender.send(outcome).is_err() {
                warn!("job result dropped: the dispatcher is gone");
            }
        }
    }
}

/// The work of one job.
#[derive(Debug)]
pub enum Task {
    /// Text to image.
    Generate(GenerateRequest),
    /// An edit.
    Edit(Box<EditRequest>),
}

impl Task {
    /// The generation parameters every task has.
    pub fn base(&self) -> &GenerateRequest {
        match self {
            Task::Generate(r) => r,
            Task::Edit(e) => &e.base,
        }
    }
}

/// One encoded output image.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    /// Position in the job's output.
    pub index: u32,
    /// The seed that made it.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded file.
    pub bytes: Vec<u8>,
}

/// Why a job did not produce images.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkError {
    /// The engine refused or failed.
    #[error("{message}")]
    Engine {
        /// Stable error code.
        code: &'static str,
        /// Detail.
        message: String,
    },
    /// The pipeline panicked; the worker survived.
    #[error("worker panicked: {0}")]
    Panicked(String),
}

impl WorkError {
    /// Stable error code for the job record.
    pub fn code(&self) -> &'static str {
        match self {
            WorkError::Engine { code, .. } => code,
            WorkError::Panicked(_) => "worker_panicked",
        }
    }

    /// What the job record and its client are told: a plain sentence per code. The detail (ONNX Runtime's
    /// messages carry internal file paths and buffer sizes) goes to the server log only.
    pub fn public_message(&self) -> &'static str {
        match self.code() {
            "inference_error" => "the model failed while running (for example, out of memory); see the server log",
            "image_error" => "the pictures could not be read or encoded; see the server log",
            "worker_panicked" => "the worker failed unexpectedly while running the job; see the server log",
            "unknown_model" => "the model is not loaded by this worker",
            _ => "the job failed; see the server log",
        }
    }
}

impl From<EngineError> for WorkError {
    fn from(e: EngineError) -> Self {
        WorkError::Engine { code: e.code(), message: e.to_string() }
    }
}

/// The result of a work item.
pub type WorkOutcome = Result<WorkOutput, WorkError>;

/// What a job made: its encoded pictures and, for a DiffEdit job, the mask they were inpainted with.
#[derive(Debug, Clone, Default)]
pub struct WorkOutput {
    /// The pictures, in index order.
    pub images: Vec<EncodedImage>,
    /// DiffEdit's computed mask as PNG (white = repainted), at the pictures' size; `None` for other jobs.
    pub mask: Option<Vec<u8>>,
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A worker failed to load a model or its device.
    #[error("worker {worker} ({device}): {source}")]
    Load {
        /// Worker index.
        worker: usize,
        /// Its device.
        device: String,
        /// What failed.
        source: EngineError,
    },
    /// A worker thread could not be spawned or died during start-up.
    #[error("worker {0} died during start-up")]
    Died(usize),
}

/// Why a work item could not be handed to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No worker has this index.
    #[error("no worker {0}")]
    NoSuchWorker(usize),
    /// The worker already has work.
    #[error("worker {0} is busy")]
    Busy(usize),
    /// The worker thread has ended.
    #[error("worker {0} has stopped")]
    Gone(usize),
}

struct WorkerThread {
    sender: SyncSender<Vec<WorkItem>>,
    handle: Option<JoinHandle<()>>,
    max_batch: usize,
}

/// The running worker threads.
pub struct WorkerPool {
    workers: Vec<WorkerThread>,
    ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool").field("workers", &self.workers.len()).finish()
    }
}

/// What each worker thread is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    /// Device of its sessions.
    pub device: Device,
    /// Intra-op threads.
    pub threads: usize,
    /// Images one shared denoiser call may carry (1: every job alone).
    pub max_batch: usize,
}

impl WorkerPool {
    /// Starts one thread per spec; each loads every model of `registry`. Returns once all are loaded, or
    /// with the first failure (a `cuda:N` worker whose provider cannot load fails here, never falls back).
    pub fn start(
        runtime: &Runtime,
        registry: &ModelRegistry,
        specs: &[WorkerSpec],
        progress: ProgressBoard,
        bus: EventBus,
    ) -> Result<Self, PoolError> {
        let mut workers = Vec::with_capacity(specs.len());
        let mut loaded = Vec::with_capacity(specs.len());
        // With several CPU workers, weights memory-mapped from external data are shared, not re-packed per worker.
        let share_weights = specs.iter().filter(|s| s.device == Device::Cpu).count() > 1;
        for (index, spec) in specs.iter().enumerate() {
            let (sender, receiver) = sync_channel::<Vec<WorkItem>>(1);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), EngineError>>();
            let factory = runtime.session_factory(spec.device, spec.threads).with_shared_weights(share_weights);
            let control = factory.run_control().clone();
            let registry = registry.clone();
            let progress = progress.clone();
            let bus = bus.clone();
            let (device, threads) = (spec.device, spec.threads);
            let handle = std::thread::Builder::new()
                .name(format!("denoised-worker-{index}"))
                .spawn(move || {
                    let span = info_span!("worker", index, %device);
                    let _entered = span.enter();
                    lower_priority(device, threads);
                    let mut models = Vec::new();
                    for served in registry.all() {
                        match LoadedModel::load(served.info.clone(), &factory) {
                            Ok(m) => models.push((served.name.clone(), m)),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    info!(models = models.len(), "worker ready");
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    serve(receiver, &mut models, &progress, &bus, &control);
                })
                .map_err(|_| PoolError::Died(index))?;
            workers.push(WorkerThread { sender, handle: Some(handle), max_batch: spec.max_batch.max(1) });
            loaded.push((index, spec.device, ready_rx));
        }
        let pool = Self { workers, ready: Arc::new(AtomicBool::new(false)) };
        for (worker, device, ready_rx) in loaded {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(PoolError::Load { worker, device: device.to_string(), source }),
                Err(_) => return Err(PoolError::Died(worker)),
            }
        }
        pool.ready.store(true, Ordering::SeqCst);
        Ok(pool)
    }

    /// Number of worker threads.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether the pool has no workers.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// True once every worker has its models loaded (and until shutdown).
    pub fn ready_flag(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// Images one shared denoiser call of worker `index` may carry.
    pub fn max_batch(&self, index: usize) -> usize {
        self.workers.get(index).map_or(1, |w| w.max_batch)
    }

    /// Hands `item` to worker `index`, which must be idle. Fails if the worker is busy or gone.
    pub fn submit(&self, index: usize, item: WorkItem) -> Result<(), SubmitError> {
        self.submit_cohort(index, vec![item])
    }

    /// Hands `items` to worker `index` (idle) to run together: text-to-image jobs that share a schedule share
    /// their denoiser calls; anything else runs one after the other. Fails if the worker is busy or gone.
    pub fn submit_cohort(&self, index: usize, items: Vec<WorkItem>) -> Result<(), SubmitError> {
        let worker = self.workers.get(index).ok_or(SubmitError::NoSuchWorker(index))?;
        worker.sender.try_send(items).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Busy(index),
            TrySendError::Disconnected(_) => SubmitError::Gone(index),
        })
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.ready.store(false, Ordering::SeqCst);
        let handles: Vec<JoinHandle<()>> = self
            .workers
            .drain(..)
            .filter_map(|mut w| {
                drop(w.sender);
                w.handle.take()
            })
            .collect();
        for handle in handles {
            if handle.join().is_err() {
                warn!("a worker thread ended with a panic");
            }
        }
    }
}

struct JobObserver<'a> {
    board: &'a ProgressBoard,
    bus: &'a EventBus,
    item: &'a WorkItem,
    last_step: std::time::Instant,
    reported: u32,
}

impl JobObserver<'_> {
    /// Progress is reported in the steps the client asked for, not in denoiser calls (PLMS makes N+1 calls,
    /// Heun 2N-1): call `call` of `calls` maps to step ⌈call · steps / calls⌉, so the last call is the last step.
    fn user_step(&self, call: usize, calls: usize) -> u32 {
        let steps = u64::from(self.item.steps);
        (call as u64 * steps).div_ceil(calls.max(1) as u64) as u32
    }
}

impl StepObserver for JobObserver<'_> {
    fn on_step(&mut self, call: usize, calls: usize, preview: Option<image::RgbImage>) {
        let now = std::time::Instant::now();
        metrics::histogram!("denoised_step_seconds").record(now.duration_since(self.last_step).as_secs_f64());
        self.last_step = now;
        let step = self.user_step(call, calls);
        if step == self.reported && preview.is_none() {
            return;
        }
        self.reported = step;
        let total = self.item.steps;
        let progress = self.board.update(self.item.job, step, total);
        let preview = preview.and_then(|picture| preview_data_url(&picture));
        self.bus.publish(
            self.item.job,
            EventKind::Progress(ProgressEvent { step, total, eta_ms: progress.eta_ms.unwrap_or(0), preview }),
        );
    }

    fn preview_wanted(&self, call: usize, calls: usize) -> Option<PreviewMode> {
        let every = self.item.preview_every;
        let step = self.user_step(call, calls);
        let due = every > 0 && step != self.reported && step % every == 0;
        (due && self.bus.has_followers(self.item.job)).then_some(self.item.preview_mode)
    }

    fn should_stop(&self) -> bool {
        self.item.stop.is_set()
    }
}

/// A small JPEG data URL of a preview picture.
fn preview_data_url(picture: &image::RgbImage) -> Option<String> {
    use base64::Engine as _;
    let mut jpeg = std::io::Cursor::new(Vec::new());
    picture.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 75)).ok()?;
    Some(format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(jpeg.into_inner())))
}

fn serve(
    receiver: Receiver<Vec<WorkItem>>,
    models: &mut [(String, LoadedModel)],
    progress: &ProgressBoard,
    bus: &EventBus,
    control: &RunControl,
) {
    while let Ok(items) = receiver.recv() {
        if items.len() > 1 && items.iter().all(|item| matches!(item.task, Task::Generate(_))) {
            serve_cohort(&items, models, progress, bus, control);
        } else {
            for item in &items {
                serve_one(item, models, progress, bus, control);
            }
        }
    }
}

/// Runs one job alone and sends its outcome.
fn serve_one(
    item: &WorkItem,
    models: &mut [(String, LoadedModel)],
    progress: &ProgressBoard,
    bus: &EventBus,
    control: &RunControl,
) {
    let span = info_span!("job", id = %item.job, model = %item.model);
    let _entered = span.enter();
    let interruptible = Interruptible::arm(std::slice::from_ref(&item.stop), control);
    let outcome = guarded(|| run(item, models, progress, bus));
    interruptible.disarm();
    item.reply.send(as_stop(item, outcome));
}

/// Runs text-to-image jobs together, sharing their denoiser calls, and sends each outcome as soon as that
/// job is finished. The call in progress is interrupted only when every member has been asked to stop:
/// one member's cancel never cuts the others' call short.
fn serve_cohort(
    items: &[WorkItem],
    models: &mut [(String, LoadedModel)],
    progress: &ProgressBoard,
    bus: &EventBus,
    control: &RunControl,
) {
    let ids: Vec<String> = items.iter().map(|item| item.job.to_string()).collect();
    let span = info_span!("cohort", jobs = %ids.join(","), model = %items[0].model);
    let _entered = span.enter();
    let stops: Vec<StopFlag> = items.iter().map(|item| item.stop.clone()).collect();
    let interruptible = Interruptible::arm(&stops, control);
    let outcome = guarded(|| run_cohort(items, models, progress, bus));
    interruptible.disarm();
    if let Err(error) = outcome {
        // A panic or a model that is not loaded: every member not answered yet gets it.
        for item in items {
            item.reply.send(as_stop(item, Err(error.clone())));
        }
    }
}

/// A failed outcome of a job that was asked to stop is a stop: a run cut short fails inside ONNX Runtime.
fn as_stop(item: &WorkItem, outcome: WorkOutcome) -> WorkOutcome {
    match outcome {
        Err(error) if item.stop.is_set() => {
            if error.code() == "inference_error" {
                metrics::counter!("denoised_onnx_runs_interrupted_total").increment(1);
            }
            Err(WorkError::from(EngineError::Cancelled))
        }
        other => other,
    }
}

/// While a job (or a cohort) runs, a stop request also interrupts the ONNX Runtime call in progress, once
/// every job sharing it has been asked to stop. Disarmed (under the same lock) before the next work starts,
/// so a late stop of finished work never reaches the next one.
struct Interruptible {
    armed: Arc<std::sync::Mutex<bool>>,
    control: RunControl,
}

impl Interruptible {
    fn arm(stops: &[StopFlag], control: &RunControl) -> Self {
        let armed = Arc::new(std::sync::Mutex::new(true));
        // Each flag's hook runs once, on its first stop: the last one to run finds no one left to serve.
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(stops.len()));
        for stop in stops {
            let (hook_armed, hook_control, running) = (armed.clone(), control.clone(), running.clone());
            stop.on_stop(move || {
                let armed = hook_armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if running.fetch_sub(1, Ordering::SeqCst) == 1 && *armed {
                    hook_control.interrupt();
                }
            });
        }
        Self { armed, control: control.clone() }
    }

    fn disarm(self) {
        let mut armed = self.armed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *armed = false;
        self.control.reset();
    }
}

/// How much lower than the rest of the process a worker that does not run under `SCHED_IDLE` runs (a nice
/// increment).
const WORKER_NICENESS: i32 = 10;

/// Lowers the calling worker thread's CPU priority before it builds its sessions (ONNX Runtime's intra-op
/// threads, made by it, inherit it): when cores are scarce, accepting and answering requests (short,
/// latency-bound) goes before another slice of a denoising step (long, throughput-bound).
///
/// A CPU worker with one thread (the default layout) runs under `SCHED_IDLE`: it gets every cycle the HTTP
/// side leaves, and a request's thread that wakes up takes its core at once (with a nice value alone the
/// kernel lets the running worker finish its slice first, which put milliseconds into every hop of a
/// submission; measured under `wrk`: p99 15 ms instead of 16–21 ms). A worker with several threads keeps the
/// normal policy at a higher nice value: its threads meet at every operator, and one of them stopped at once
/// by any other thread stalls the rest (a job took 20–30 ms longer under `SCHED_IDLE`). So does a GPU worker,
/// which mostly waits for its device and must launch the next kernels promptly. Linux keeps both per thread.
#[cfg(target_os = "linux")]
fn lower_priority(device: Device, threads: usize) {
    // SAFETY: gettid, sched_setscheduler and setpriority take plain values and touch only the calling
    // thread's scheduling.
    let outcome = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        if device == Device::Cpu && threads <= 1 {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(thread, libc::SCHED_IDLE, &param)
        } else {
            libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, WORKER_NICENESS)
        }
    };
    if outcome != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not lower the worker thread's priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_device: Device, _threads: usize) {}

/// Runs `job`, turning a panic into a failed outcome so that the worker thread survives it.
fn guarded<T>(job: impl FnOnce() -> Result<T, WorkError>) -> Result<T, WorkError> {
    catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        error!(%message, "pipeline panicked; failing the job and keeping the worker");
        Err(WorkError::Panicked(message))
    })
}

fn run(item: &WorkItem, models: &mut [(String, LoadedModel)], progress: &ProgressBoard, bus: &EventBus) -> WorkOutcome {
    let model = find_model(models, &item.model)?;
    let started = std::time::Instant::now();
    let mut observer = JobObserver { board: progress, bus, item, last_step: started, reported: 0 };
    let (images, mask) = match &item.task {
        Task::Generate(request) => (text_to_image(model, request, &mut observer)?, None),
        Task::Edit(request) if request.diffedit.is_some() => {
            let output = diffedit(model, request, &mut observer)?;
            (output.images, Some(output.mask))
        }
        Task::Edit(request) => (edit(model, request, &mut observer)?, None),
    };
    metrics::histogram!("denoised_job_seconds").record(started.elapsed().as_secs_f64());
    let mask = mask.as_ref().map(mask_png).transpose()?;
    Ok(WorkOutput { images: encode_images(item, &images)?, mask })
}

/// Runs text-to-image `items` as one cohort, answering each member as it finishes.
fn run_cohort(
    items: &[WorkItem],
    models: &mut [(String, LoadedModel)],
    progress: &ProgressBoard,
    bus: &EventBus,
) -> Result<(), WorkError> {
    let model = find_model(models, &items[0].model)?;
    let started = std::time::Instant::now();
    let mut observers: Vec<JobObserver<'_>> =
        items.iter().map(|item| JobObserver { board: progress, bus, item, last_step: started, reported: 0 }).collect();
    let members: Vec<CohortMember<'_>> = items
        .iter()
        .zip(observers.iter_mut())
        .filter_map(|(item, observer)| match &item.task {
            Task::Generate(request) => Some(CohortMember { request, observer: observer as &mut dyn StepObserver }),
            Task::Edit(_) => None,
        })
        .collect();
    metrics::histogram!("denoised_cohort_jobs").record(members.len() as f64);
    text_to_image_cohort(model, members, &mut |index, pictures| {
        let item = &items[index];
        let outcome = pictures
            .map_err(WorkError::from)
            .and_then(|pictures| encode_images(item, &pictures))
            .map(|images| WorkOutput { images, mask: None });
        if outcome.is_ok() {
            metrics::histogram!("denoised_job_seconds").record(started.elapsed().as_secs_f64());
        }
        item.reply.send(as_stop(item, outcome));
    });
    Ok(())
}

/// The loaded model called `name`.
fn find_model<'m>(models: &'m mut [(String, LoadedModel)], name: &str) -> Result<&'m mut LoadedModel, WorkError> {
    models
        .iter_mut()
        .find(|(loaded, _)| loaded == name)
        .map(|(_, m)| m)
        .ok_or_else(|| WorkError::Engine { code: "unknown_model", message: format!("model `{name}` is not loaded") })
}

/// A computed mask as a grayscale PNG.
fn mask_png(mask: &image::GrayImage) -> Result<Vec<u8>, WorkError> {
    let mut out = std::io::Cursor::new(Vec::new());
    mask.write_to(&mut out, image::ImageFormat::Png).map_err(|e| EngineError::Image(e.to_string()))?;
    Ok(out.into_inner())
}

/// `images` of `item` encoded in its output format, with their seeds.
fn encode_images(item: &WorkItem, images: &[image::RgbImage]) -> Result<Vec<EncodedImage>, WorkError> {
    let seeds = item.task.base().seeds();
    images
        .iter()
        .zip(seeds)
        .enumerate()
        .map(|(index, (image, seed))| {
            Ok(EncodedImage {
                index: index as u32,
                seed,
                width: image.width(),
                height: image.height(),
                bytes: encode(image, item.format, item.quality)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_job_fails_with_a_code_and_the_thread_goes_on() {
        let outcome: WorkOutcome = guarded(|| panic!("index out of bounds in a pipeline"));
        let err = outcome.unwrap_err();
        assert_eq!(err.code(), "worker_panicked");
        assert!(err.to_string().contains("index out of bounds"));
        let formatted: WorkOutcome = guarded(|| panic!("{} {}", "formatted", 1));
        assert!(formatted.unwrap_err().to_string().contains("formatted 1"));
        // The same thread keeps working after catching.
        assert!(guarded(|| Ok::<_, WorkError>(Vec::<EncodedImage>::new())).is_ok());
    }

    /// A one-thread CPU worker yields to every normal thread at once (`SCHED_IDLE`); a CPU worker with several
    /// threads and a GPU worker keep the normal policy at a higher nice value; the spawning thread is untouched.
    #[cfg(target_os = "linux")]
    #[test]
    fn worker_threads_run_below_the_http_side() {
        let policy_and_nice = |device: Device, threads: usize| {
            std::thread::spawn(move || {
                lower_priority(device, threads);
                // SAFETY: plain queries of the calling thread's scheduling (0 = this thread).
                unsafe { (libc::sched_getscheduler(0), libc::getpriority(libc::PRIO_PROCESS, 0)) }
            })
            .join()
            .unwrap()
        };
        // SAFETY: as above.
        let (own_policy, own_nice) = unsafe { (libc::sched_getscheduler(0), libc::getpriority(libc::PRIO_PROCESS, 0)) };
        let lowered = (libc::SCHED_OTHER, (own_nice + WORKER_NICENESS).min(19));
        assert_eq!(policy_and_nice(Device::Cpu, 1).0, libc::SCHED_IDLE);
        assert_eq!(policy_and_nice(Device::Cpu, 2), lowered);
        assert_eq!(policy_and_nice(Device::Cuda(0), 1), lowered);
        assert_eq!(own_policy, libc::SCHED_OTHER);
    }

    #[test]
    fn engine_errors_keep_their_code() {
        let err = WorkError::from(EngineError::Cancelled);
        assert_eq!(err.code(), "cancelled");
        let err = WorkError::from(EngineError::Inference { graph: "unet", message: "boom".into() });
        assert_eq!(err.code(), "inference_error");
    }
}
