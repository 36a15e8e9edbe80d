//! Putting a validated job into the queue: the one path every submitting route (native and
//! OpenAI-compatible) goes through, so each job is committed before any answer, the queue limit and
//! `Idempotency-Key` are honoured everywhere, the dispatcher is woken and followers get their first
//! `queued` event.

use std::time::Duration;

use axum::http::HeaderMap;

use super::error::ApiError;
use super::jobs::visible_steps;
use super::AppState;
use crate::auth::Principal;
use crate::jobs::{Job, NewJob, Submission, SubmitLimits};
use crate::worker::events::EventKind;

/// Header whose repeat within [`IDEMPOTENCY_WINDOW`] returns the job the first request created.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// How long an `Idempotency-Key` keeps pointing at its job.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The client's `Idempotency-Key`, checked: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::field("Idempotency-Key", "Idempotency-Key must be ASCII"))?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::field("Idempotency-Key", "Idempotency-Key must be 1 to 255 visible ASCII characters"));
    }
    Ok(Some(key.to_string()))
}

/// A submission's outcome: the job, and whether this request created it (`false`: an idempotent replay).
#[derive(Debug)]
pub struct Submitted {
    /// The job.
    pub job: Job,
    /// Whether this request created it.
    pub created: bool,
}

/// Commits a job of `kind` for `model` with `params`, owned by `who` (or finds the one `who`'s `key`
/// created: a replay is answered even when the queue or the key is at its limit) and announces it.
pub async fn enqueue(
    state: &AppState,
    who: &Principal,
    kind: &str,
    model: String,
    params: serde_json::Value,
    key: Option<&str>,
) -> Result<Submitted, ApiError> {
    let new = NewJob {
        kind: kind.into(),
        model,
        params,
        priority: 0,
        max_attempts: state.queue.max_attempts,
        owner: who.owner().map(str::to_string),
    };
    let limits = SubmitLimits {
        max_queued: state.queue.max_queued,
        max_outstanding_per_owner: state.limits.max_outstanding_per_key,
    };
    let (job, created) = match state.store.submit(new, key.map(|k| (k, IDEMPOTENCY_WINDOW)), limits).await? {
        Submission::Created(job) => (job, true),
        Submission::Replayed(job) => (job, false),
        Submission::QueueFull { queued } => {
            let per_job = state.progress.queued_eta_ms(20, 0, state.workers).unwrap_or(1000);
            let retry_after = (per_job * queued.min(100) / 1000 / state.workers.max(1) as u64).clamp(1, 300);
            return Err(ApiError::QueueFull { queued, retry_after });
        }
        Submission::OwnerBusy { outstanding } => {
            return Err(ApiError::TooManyOutstanding { outstanding, limit: state.limits.max_outstanding_per_key });
        }
    };
    if created {
        state.wake.notify_one();
        metrics::counter!("denoised_jobs_submitted_total").increment(1);
        let position = state.positions.get(job.id, state.bus.last_lifecycle_id()).await?.unwrap_or(0);
        let eta_ms = state.progress.queued_eta_ms(visible_steps(&job), position, state.workers);
        state.bus.note_owner(job.id, job.owner.as_deref());
        state.bus.publish(job.id, EventKind::Queued { position, eta_ms });
    }
    Ok(Submitted { job, created })
}
