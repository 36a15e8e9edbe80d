//! The detector thread: one named OS thread that owns its own ONNX sessions (loaded on first use, per
//! model) and answers detection requests from a bounded channel, one at a time, on a oneshot.
//!
//! Detection does not go through the job queue: it produces no files, is cheap to retry, and its caller
//! wants the answer in the response. A separate thread keeps it off the workers, whose sessions belong to
//! queued jobs, and off the async runtime. The cost is a second copy of each model's sessions that is asked
//! for detection (VAE encoder, text encoder and U-Net), loaded on first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use image::RgbImage;
use tokio::sync::oneshot;
use tracing::{info, info_span, warn};

use crate::engine::model::LoadedModel;
use crate::engine::pipeline::invert::invert;
use crate::engine::pipeline::StepObserver;
use crate::engine::runtime::SessionFactory;
use crate::engine::watermark::{score, RingKey, Score};
use crate::engine::EngineError;
use crate::models::ModelRegistry;

/// One detection: a picture (already at a size the model takes), the inversion steps and the keys to score.
#[derive(Debug)]
pub struct Detection {
    /// The served model's id.
    pub model: String,
    /// The picture.
    pub image: RgbImage,
    /// DDIM inversion steps.
    pub steps: usize,
    /// The keys to score, in the order the answer lists them.
    pub keys: Vec<RingKey>,
}

/// Why a detection has no answer.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// As many detections wait as `[watermark] max_queued_detections` allows.
    #[error("the detector is busy ({0} detections waiting); retry shortly")]
    Busy(usize),
    /// It did not finish in time (it is stopped at its next step).
    #[error("the detection did not finish within {0} s")]
    TimedOut(u64),
    /// The detector thread has ended.
    #[error("the detector has stopped")]
    Gone,
    /// The engine failed (inversion or scoring).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

struct Queued {
    detection: Detection,
    stop: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Vec<Score>, EngineError>>,
}

/// Handle on the detector thread; dropping it ends and joins the thread.
pub struct Detector {
    sender: Option<SyncSender<Queued>>,
    handle: Option<JoinHandle<()>>,
    capacity: usize,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector").field("capacity", &self.capacity).finish()
    }
}

impl Detector {
    /// Starts the thread; it loads a model's sessions with `factory` the first time a detection names it.
    pub fn start(factory: SessionFactory, registry: Arc<ModelRegistry>, capacity: usize) -> std::io::Result<Self> {
        let (sender, receiver) = sync_channel::<Queued>(capacity);
        let handle = std::thread::Builder::new()
            .name("denoised-detector".into())
            .spawn(move || serve(receiver, &factory, &registry))?;
        Ok(Self { sender: Some(sender), handle: Some(handle), capacity })
    }

    /// Runs `detection` and returns one score per key, waiting at most `timeout`. A detection whose caller
    /// stops waiting (the time limit, a client that hangs up, shutdown) is stopped at its next step.
    pub async fn detect(&self, detection: Detection, timeout: Duration) -> Result<Vec<Score>, DetectError> {
        let stop = Arc::new(AtomicBool::new(false));
        let _abandon = StopOnDrop(stop.clone());
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.as_ref().ok_or(DetectError::Gone)?;
        sender.try_send(Queued { detection, stop: stop.clone(), reply }).map_err(|e| match e {
            TrySendError::Full(_) => DetectError::Busy(self.capacity),
            TrySendError::Disconnected(_) => DetectError::Gone,
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(_)) => Err(DetectError::Gone),
            Err(_) => Err(DetectError::TimedOut(timeout.as_secs())),
        }
    }
}

impl Drop for Detector {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                warn!("the detector thread ended with a panic");
            }
        }
    }
}

/// Sets a detection's stop flag when its caller's future ends, answered or not (a finished detection ignores
/// it).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Stops an inversion between steps once its caller has given up.
struct StopWhenAbandoned<'a>(&'a AtomicBool);

impl StepObserver for StopWhenAbandoned<'_> {
    fn on_step(&mut self, _step: usize, _total: usize, _preview: Option<RgbImage>) {}

    fn should_stop(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

fn serve(receiver: Receiver<Queued>, factory: &SessionFactory, registry: &ModelRegistry) {
    let mut models: HashMap<String, LoadedModel> = HashMap::new();
    while let Ok(Queued { detection, stop, reply }) = receiver.recv() {
        let span = info_span!("detect", model = %detection.model);
        let _entered = span.enter();
        if stop.load(Ordering::SeqCst) || reply.is_closed() {
            continue;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(&detection, &stop, &mut models, factory, registry)
        }))
        .unwrap_or_else(|_| Err(EngineError::InvalidRequest("the detector failed unexpectedly".into())));
        let _ = reply.send(outcome);
    }
}

fn run(
    detection: &Detection,
    stop: &AtomicBool,
    models: &mut HashMap<String, LoadedModel>,
    factory: &SessionFactory,
    registry: &ModelRegistry,
) -> Result<Vec<Score>, EngineError> {
    if !models.contains_key(&detection.model) {
        let served = registry
            .get(&detection.model)
            .ok_or_else(|| EngineError::InvalidRequest(format!("model `{}` is not served", detection.model)))?;
        let loaded = LoadedModel::load(served.info.clone(), factory)?;
        info!(model = %detection.model, "detector loaded the model");
        models.insert(detection.model.clone(), loaded);
    }
    let model =
        models.get_mut(&detection.model).ok_or_else(|| EngineError::InvalidRequest("model not loaded".into()))?;
    let started = std::time::Instant::now();
    let noise = invert(model, &detection.image, detection.steps, &mut StopWhenAbandoned(stop))?;
    let scores = detection
        .keys
        .iter()
        .map(|key| {
            let fail = |message: String| EngineError::InvalidRequest(format!("watermark: {message}"));
            score(&noise, key)
                .map_err(|e| fail(e.to_string()))?
                .into_iter()
                .next()
                .ok_or_else(|| fail("no image".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    metrics::histogram!("denoised_watermark_detect_seconds").record(started.elapsed().as_secs_f64());
    Ok(scores)
}
