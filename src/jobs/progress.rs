//! Live state of running jobs that is not worth a database write per step: the latest progress, step-time
//! estimates, and the cancellation flag. Workers write, HTTP handlers read; nobody waits on anybody.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use uuid::Uuid;

/// Progress of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// Denoiser calls done.
    pub step: u32,
    /// Denoiser calls in the job.
    pub total: u32,
    /// Estimated milliseconds until the job's last call (from measured step times); absent until measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

/// Why a running job was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A client cancelled or deleted it: it ends `cancelled`.
    Client,
    /// The server is shutting down: it goes back to the queue.
    Shutdown,
    /// It ran past `queue.job_timeout_seconds`: it fails with `timeout`.
    Timeout,
    /// Its lease was lost (another process re-queued it): its result would be discarded, so it stops.
    LeaseLost,
}

/// A running job's stop request, shared between the HTTP side and the worker thread. Besides the flag the
/// worker checks between steps, it runs hooks at once when set: the worker registers one that interrupts
/// the ONNX Runtime call in progress, so a stop does not wait for a long step to end.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<StopState>);

#[derive(Default)]
struct StopState {
    reason: AtomicU8,
    hooks: Mutex<Vec<StopHook>>,
}

type StopHook = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for StopFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StopFlag").field(&self.reason()).finish()
    }
}

impl StopFlag {
    /// Asks the job to stop; the first reason wins, and the hooks run once, on the first request.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Client => 1,
            StopReason::Shutdown => 2,
            StopReason::Timeout => 3,
            StopReason::LeaseLost => 4,
        };
        if self.0.reason.compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            for hook in self.0.hooks.lock().unwrap_or_else(PoisonError::into_inner).iter() {
                hook();
            }
        }
    }

    /// Runs `hook` when the job is asked to stop (at once if it already was).
    pub fn on_stop(&self, hook: impl Fn() + Send + Sync + 'static) {
        let mut hooks = self.0.hooks.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_set() {
            hook();
        }
        hooks.push(Box::new(hook));
    }

    /// Whether a stop was requested.
    pub fn is_set(&self) -> bool {
        self.0.reason.load(Ordering::SeqCst) != 0
    }

    /// The reason, once set.
    pub fn reason(&self) -> Option<StopReason> {
        match self.0.reason.load(Ordering::SeqCst) {
            1 => Some(StopReason::Client),
            2 => Some(StopReason::Shutdown),
            3 => Some(StopReason::Timeout),
            4 => Some(StopReason::LeaseLost),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    progress: Progress,
    started: Instant,
    stop: StopFlag,
}

#[derive(Debug, Default)]
struct State {
    running: HashMap<Uuid, Entry>,
    /// Exponential moving average of milliseconds per denoiser call, over all jobs.
    step_ms: Option<f64>,
}

/// Latest progress and stop flags of the jobs running in this process.
#[derive(Debug, Default, Clone)]
pub struct ProgressBoard {
    state: Arc<Mutex<State>>,
}

impl ProgressBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a job that is about to run and returns its stop flag.
    pub fn start(&self, job: Uuid, total: u32) -> StopFlag {
        let stop = StopFlag::default();
        let entry =
            Entry { progress: Progress { step: 0, total, eta_ms: None }, started: Instant::now(), stop: stop.clone() };
        self.lock().running.insert(job, entry);
        stop
    }

    /// Records that `step` of `total` calls are done and returns the updated progress with its estimate.
    pub fn update(&self, job: Uuid, step: u32, total: u32) -> Progress {
        let mut state = self.lock();
        let Some(entry) = state.running.get_mut(&job) else {
            return Progress { step, total, eta_ms: None };
        };
        let per_step = entry.started.elapsed().as_secs_f64() * 1000.0 / f64::from(step.max(1));
        let eta = (per_step * f64::from(total.saturating_sub(step))).round() as u64;
        entry.progress = Progress { step, total, eta_ms: Some(eta) };
        let progress = entry.progress;
        state.step_ms = Some(match state.step_ms {
            Some(avg) => 0.9 * avg + 0.1 * per_step,
            None => per_step,
        });
        progress
    }

    /// The latest progress of `job`, if it is running here.
    pub fn get(&self, job: Uuid) -> Option<Progress> {
        self.lock().running.get(&job).map(|e| e.progress)
    }

    /// A rough wait for a queued job: `steps` calls of its own plus `ahead` jobs of the same size before it,
    /// spread over `workers`, at the measured average step time.
    pub fn queued_eta_ms(&self, steps: u32, ahead: u64, workers: usize) -> Option<u64> {
        let per_step = self.lock().step_ms?;
        let jobs = (ahead as f64 / workers.max(1) as f64).ceil() + 1.0;
        Some((per_step * f64::from(steps) * jobs).round() as u64)
    }

    /// Asks a running job to stop at its next step boundary. Returns whether it was running here.
    pub fn stop(&self, job: Uuid, reason: StopReason) -> bool {
        self.lock().running.get(&job).map(|e| e.stop.stop(reason)).is_some()
    }

    /// Asks every running job to stop.
    pub fn stop_all(&self, reason: StopReason) {
        for entry in self.lock().running.values() {
            entry.stop.stop(reason);
        }
    }

    /// Forgets a job that has finished.
    pub fn finish(&self, job: Uuid) {
        self.lock().running.remove(&job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_comes_from_measured_steps_and_stop_keeps_the_first_reason() {
        let board = ProgressBoard::default();
        let job = Uuid::now_v7();
        let stop = board.start(job, 10);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let p = board.update(job, 2, 10);
        let eta = p.eta_ms.unwrap();
        assert!(eta >= 60, "8 steps at >= 10 ms each: {eta}");
        assert!(board.queued_eta_ms(10, 1, 1).unwrap() >= 2 * 10 * 10);
        assert!(board.stop(job, StopReason::Client));
        board.stop_all(StopReason::Shutdown);
        assert_eq!(stop.reason(), Some(StopReason::Client));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        stop.on_stop(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a hook added after the stop runs at once");
        let fresh = StopFlag::default();
        let counter = calls.clone();
        fresh.on_stop(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        fresh.stop(StopReason::Timeout);
        fresh.stop(StopReason::Client);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "hooks run once, on the first stop");
        board.finish(job);
        assert!(!board.stop(job, StopReason::Client));
        assert!(board.get(job).is_none());
    }
}
