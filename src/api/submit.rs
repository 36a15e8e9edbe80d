//! Putting a validated job into the queue: the one path every submitting route (native and
//! OpenAI-compatible) goes through, so each job is committed before any answer, the dispatcher is woken and
//! followers get their first `queued` event.

use super::error::ApiError;
use super::jobs::visible_steps;
use super::AppState;
use crate::jobs::{Job, NewJob};
use crate::worker::events::EventKind;

/// Commits a job of `kind` for `model` with `params` and announces it.
pub async fn enqueue(state: &AppState, kind: &str, model: String, params: serde_json::Value) -> Result<Job, ApiError> {
    let job = state
        .store
        .insert(NewJob { kind: kind.into(), model, params, priority: 0, max_attempts: state.queue.max_attempts })
        .await?;
    state.wake.notify_one();
    metrics::counter!("denoised_jobs_submitted_total").increment(1);
    let position = state.store.queue_position(job.id).await?.unwrap_or(0);
    let eta_ms = state.progress.queued_eta_ms(visible_steps(&job), position, state.workers);
    state.bus.publish(job.id, EventKind::Queued { position, eta_ms });
    Ok(job)
}
