//! Server-sent events: `GET /v1/jobs/{id}/events` follows one job, `GET /v1/events` every job.
//!
//! A stream first sends what is already known (replaying what a reconnecting client missed after its
//! `Last-Event-ID`), then follows the progress bus; it ends after a terminal event or when the server shuts
//! down. A slow client skips intermediate progress events, never a lifecycle event. Disconnecting never
//! cancels a job.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::auth::Principal;
use crate::jobs::{Job, JobStatus};
use crate::worker::events::{EventImage, EventKind, EventOwner, JobEvent, Snapshot};

/// How often a stream re-reads a queued job's position (and notices jobs finished by another process).
const POLL: Duration = Duration::from_millis(500);

type Sender = mpsc::Sender<Result<Event, Infallible>>;

fn last_event_id(headers: &HeaderMap) -> u64 {
    headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn sse_response(rx: mpsc::Receiver<Result<Event, Infallible>>) -> Response {
    let mut response = Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Sends one event; `false` once the client has gone.
async fn send(tx: &Sender, event: &JobEvent) -> bool {
    let data = match Event::default().id(event.id.to_string()).event(event.kind.name()).json_data(event) {
        Ok(data) => data,
        Err(e) => {
            tracing::error!(error = %e, "serialising an event failed");
            return true;
        }
    };
    tx.send(Ok(data)).await.is_ok()
}

/// Follow one job's events.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
    ),
    responses(
        (status = 200, description = "Server-sent events `queued`, `started`, `progress`, `completed`, `failed`, \
         `cancelled`; each `data:` is a JSON object with `type`, `job_id` and the event's fields",
         content_type = "text/event-stream", body = JobEvent),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn job_events(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no job `{id}`")))?;
    let rx = state.bus.subscribe(id);
    let job = match super::jobs::find_job(&state, &who, id).await {
        Ok(job) => job,
        Err(e) => {
            drop(rx);
            state.bus.release(id);
            return Err(e);
        }
    };
    let (tx, out) = mpsc::channel(16);
    tokio::spawn(follow_job(state, who, job, rx, last_event_id(&headers), tx));
    Ok(sse_response(out))
}

/// Builds the terminal event of a job that the database says has ended.
async fn terminal_from_store(state: &AppState, job: &Job) -> Option<EventKind> {
    match job.status {
        JobStatus::Succeeded => {
            let images = state.store.images(job.id).await.ok()?;
            Some(EventKind::Completed {
                images: images
                    .into_iter()
                    .map(|r| EventImage {
                        index: r.index,
                        url: format!("/v1/jobs/{}/images/{}", job.id, r.index),
                        seed: r.seed,
                        width: r.width,
                        height: r.height,
                        format: r.format,
                    })
                    .collect(),
            })
        }
        JobStatus::Failed => Some(EventKind::Failed {
            code: job.error_code.clone().unwrap_or_default(),
            message: job.error_message.clone().unwrap_or_default(),
        }),
        JobStatus::Cancelled => Some(EventKind::Cancelled),
        JobStatus::Queued | JobStatus::Running => None,
    }
}

async fn follow_job(
    state: AppState,
    who: Principal,
    job: Job,
    mut rx: watch::Receiver<Snapshot>,
    mut last: u64,
    tx: Sender,
) {
    let id = job.id;
    let mut shutdown = state.shutdown.clone();
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + super::auth::RECHECK, super::auth::RECHECK);
    let mut position: Option<u64> = None;
    let mut started_seen = false;
    let mut bus_open = true;
    let mut check_store = true;
    let mut poll = tokio::time::interval(POLL);
    'follow: loop {
        let snapshot = rx.borrow_and_update().clone();
        for event in &snapshot.lifecycle {
            match event.kind {
                EventKind::Queued { position: p, .. } => position = Some(p),
                EventKind::Started { .. } => started_seen = true,
                _ => {}
            }
        }
        for event in snapshot.after(last) {
            if !send(&tx, &event).await {
                break 'follow;
            }
            last = event.id;
            if event.kind.is_terminal() {
                break 'follow;
            }
        }
        if snapshot.is_terminal() {
            break;
        }
        if check_store {
            check_store = false;
            let Ok(current) = state.store.get(id).await else { continue };
            let Some(current) = current else {
                // Deleted: tell the follower it will not finish.
                let _ = send(&tx, &state.bus.event(id, EventKind::Cancelled)).await;
                break;
            };
            if let Some(kind) = terminal_from_store(&state, &current).await {
                if rx.borrow().is_terminal() {
                    continue; // the bus has it too: sent on the next pass, with its own id
                }
                let _ = send(&tx, &state.bus.event(id, kind)).await;
                break;
            }
            match current.status {
                JobStatus::Queued => {
                    let now = state.positions.get(id, state.bus.last_lifecycle_id()).await.ok().flatten();
                    if now.is_some() && now != position {
                        position = now;
                        let p = now.unwrap_or(0);
                        let steps = super::jobs::visible_steps(&current);
                        let eta_ms = state.progress.queued_eta_ms(steps, p, state.workers);
                        let event = state.bus.event(id, EventKind::Queued { position: p, eta_ms });
                        if !send(&tx, &event).await {
                            break;
                        }
                        last = last.max(event.id);
                    }
                }
                JobStatus::Running if !started_seen => {
                    started_seen = true;
                    let event = state.bus.event(id, EventKind::Started { attempt: current.attempts });
                    if !send(&tx, &event).await {
                        break;
                    }
                    last = last.max(event.id);
                }
                _ => {}
            }
        }
        tokio::select! {
            changed = rx.changed(), if bus_open => {
                if changed.is_err() {
                    // The job's entry was dropped (terminal or deleted): drain the final snapshot, then ask the store.
                    bus_open = false;
                    check_store = true;
                }
            }
            _ = poll.tick() => check_store = true,
            _ = recheck.tick() => if !super::auth::still_allowed(&state, &who).await { break },
            _ = shutdown.changed() => break,
            _ = tx.closed() => break,
        }
    }
    drop(rx);
    state.bus.release(id);
}

/// Follow every job's events (for dashboards); a tenant key sees only its own jobs.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "jobs",
    params(("Last-Event-ID" = Option<String>, Header, description = "Replay lifecycle events after this id")),
    responses(
        (status = 200, description = "Server-sent events of every job, as on `/v1/jobs/{id}/events`",
         content_type = "text/event-stream", body = JobEvent),
    )
)]
pub async fn all_events(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
) -> Response {
    let (lifecycle, progress) = state.bus.subscribe_all();
    let last = last_event_id(&headers);
    let replay = if last > 0 { state.bus.replay_after(last) } else { Vec::new() };
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(follow_all(state, Visibility::new(who), lifecycle, progress, replay, tx));
    sse_response(out)
}

/// Which jobs an all-jobs stream may show, with each job's answer remembered (one store read per job).
struct Visibility {
    who: Principal,
    known: HashMap<Uuid, bool>,
}

impl Visibility {
    /// Remembered answers at most; past it the memory starts over.
    const MEMORY: usize = 16_384;

    fn new(who: Principal) -> Self {
        Self { who, known: HashMap::new() }
    }

    async fn allows(&mut self, state: &AppState, event: &JobEvent) -> bool {
        if self.who.admin {
            return true;
        }
        if let EventOwner::Known(owner) = &event.owner {
            return self.who.can_see(owner.as_deref());
        }
        let job = event.job_id;
        if let Some(&known) = self.known.get(&job) {
            return known;
        }
        let visible = match state.store.get(job).await {
            Ok(Some(found)) => self.who.can_see(found.owner.as_deref()),
            // Deleted jobs and store errors show nothing (and are asked again next time).
            _ => return false,
        };
        if self.known.len() >= Self::MEMORY {
            self.known.clear();
        }
        self.known.insert(job, visible);
        visible
    }
}

async fn follow_all(
    state: AppState,
    mut visibility: Visibility,
    mut lifecycle: broadcast::Receiver<JobEvent>,
    mut progress: broadcast::Receiver<JobEvent>,
    replay: Vec<JobEvent>,
    tx: Sender,
) {
    let mut shutdown = state.shutdown.clone();
    let mut recheck =
        tokio::time::interval_at(tokio::time::Instant::now() + super::auth::RECHECK, super::auth::RECHECK);
    let mut last_lifecycle = 0;
    for event in replay {
        if visibility.allows(&state, &event).await && !send(&tx, &event).await {
            return;
        }
        last_lifecycle = event.id;
    }
    loop {
        tokio::select! {
            event = lifecycle.recv() => match event {
                Ok(event) if event.id <= last_lifecycle => {}
                Ok(event) => {
                    last_lifecycle = event.id;
                    if visibility.allows(&state, &event).await && !send(&tx, &event).await { return; }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Too far behind to keep the no-loss promise: say so and end; the client reconnects with
                    // Last-Event-ID and gets the missed lifecycle events replayed.
                    let message = format!("the stream fell {missed} lifecycle events behind; reconnect with Last-Event-ID");
                    let _ = tx.send(Ok(Event::default().event("error").data(message))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            event = progress.recv() => match event {
                Ok(event) => if visibility.allows(&state, &event).await && !send(&tx, &event).await { return; },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = recheck.tick() => if !super::auth::still_allowed(&state, &visibility.who).await { return },
            _ = shutdown.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
