//! Server-sent events: `GET /v1/jobs/{id}/events` follows one job, `GET /v1/events` every job, both as
//! the jobs service's follows (see `jobs::follow` for what they send and when they end) rendered as SSE.
//! A stream also ends when its key is revoked. Disconnecting never cancels a job.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use tokio_stream::StreamExt as _;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::auth::Principal;
use crate::jobs::bus::JobEvent;
use crate::jobs::{Follow, Lagged};

fn last_event_id(headers: &HeaderMap) -> u64 {
    headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// One event as SSE: its id, its type as the event name, its JSON as data. A stream that fell behind gets
/// an `error` event before it ends.
fn sse_event(item: Result<JobEvent, Lagged>) -> Event {
    match item {
        Ok(event) => Event::default()
            .id(event.id.to_string())
            .event(event.kind.name())
            .json_data(&event)
            .unwrap_or_else(|e| Event::default().event("error").data(format!("serialising an event failed: {e}"))),
        Err(lagged) => Event::default().event("error").data(lagged.to_string()),
    }
}

/// An SSE response over a follow, with keep-alives and no proxy buffering.
pub fn sse_response(follow: Follow) -> Response {
    let stream = follow.map(|item| Ok::<_, std::convert::Infallible>(sse_event(item)));
    let mut response = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
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
    let id = super::jobs::parse_id(&id)?;
    let revoked = super::auth::revoked(state.clone(), who.clone());
    let follow = state.jobs.follow(&who, id, last_event_id(&headers), revoked).await?;
    Ok(sse_response(follow))
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
    let revoked = super::auth::revoked(state.clone(), who.clone());
    sse_response(state.jobs.follow_all(who, last_event_id(&headers), revoked))
}
