//! The layer that guards request bodies, inside authentication so that it knows the key: a body that
//! cannot fit the budget by its `Content-Length` is refused before a byte is read; any other body is
//! wrapped so that it is charged as it arrives and cut off when it stalls ([`crate::net::body`]). A body
//! cut off is answered here — `408`, `429` or `503` — whatever the handler made of its failed read.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Body as _;

use super::error::ApiError;
use super::openai::OpenAiError;
use super::AppState;
use crate::auth::Principal;
use crate::net::body::guarded::{CutRecord, GuardedBody};
use crate::net::body::Cut;

/// Wraps the request's body (if it has one) for the budget and the deadlines.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let key = request.extensions().get::<Principal>().and_then(|who| who.key_id.clone());
    let openai = super::auth::speaks_openai(request.uri().path());
    let rules = &state.http.bodies;
    let declared = request.body().size_hint().exact().and_then(|n| usize::try_from(n).ok());
    let limit = state.http.max_body_bytes;
    if let Some(declared) = declared.filter(|n| *n > limit) {
        return too_large(request, declared, limit, rules.deadlines, openai).await;
    }
    if let Some(declared) = declared {
        if let Err(cut) = rules.budget.fits(key.as_deref(), declared) {
            return refuse(cut, openai);
        }
    }
    let account = Arc::new(rules.budget.account(key));
    let record = CutRecord::default();
    let deadlines = rules.deadlines;
    let request = request.map(|body| Body::new(GuardedBody::new(body, account.clone(), deadlines, record.clone())));
    let response = next.run(request).await;
    drop(account);
    match record.get() {
        Some(cut) => refuse(*cut, openai),
        None => response,
    }
}

/// Bodies declared over the limit but under this many times it are read and dropped before the `413`, so
/// that clients which only read the answer once they have sent everything (most HTTP libraries) see it
/// instead of a broken pipe; larger ones are refused at once.
const DRAIN_FACTOR: usize = 4;

/// The `413` to a body whose `Content-Length` is over `server.max_body_bytes`, after dropping the body
/// (within its deadlines, never holding more than one chunk) when it is not absurdly large.
async fn too_large(
    request: Request,
    declared: usize,
    limit: usize,
    deadlines: crate::net::body::BodyDeadlines,
    openai: bool,
) -> Response {
    use http_body_util::BodyExt as _;
    if declared <= limit.saturating_mul(DRAIN_FACTOR) {
        let mut body = request.into_body();
        let drained = tokio::time::timeout(deadlines.total, async {
            while let Ok(Some(Ok(_))) = tokio::time::timeout(deadlines.idle, body.frame()).await {}
        });
        let _ = drained.await;
    }
    let error = ApiError::PayloadTooLarge { limit };
    let mut response = if openai { OpenAiError(error).into_response() } else { error.into_response() };
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The answer to a body cut off (or refused up front), in the route's error shape. The connection is
/// closed after it, since the rest of the body was never read.
fn refuse(cut: Cut, openai: bool) -> Response {
    let reason = match cut {
        Cut::Stalled(_) => "stalled",
        Cut::TooSlow(_) => "too_slow",
        Cut::ServerBudget { .. } => "server_budget",
        Cut::KeyBudget { .. } => "key_budget",
    };
    metrics::counter!("denoised_request_bodies_refused_total", "reason" => reason).increment(1);
    let error = ApiError::from(cut);
    let mut response = if openai { OpenAiError(error).into_response() } else { error.into_response() };
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Adds to every operation that takes a request body its `408` (body stalled or too slow) and `503`
/// (server's body budget spent) answers, and the per-key body budget to its `429`.
pub fn document(spec: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

    const KEY_BUDGET: &str = "this key has `limits.max_body_bytes_in_flight_per_key` request-body bytes in \
                              flight (see `Retry-After`)";
    for (path, item) in spec.paths.paths.iter_mut() {
        let body = if super::auth::speaks_openai(path) { "OpenAiErrorBody" } else { "ErrorBody" };
        let answer = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(body))).build())
                .build()
        };
        let operations = [&mut item.post, &mut item.put, &mut item.patch];
        for operation in operations.into_iter().flatten().filter(|o| o.request_body.is_some()) {
            let responses = &mut operation.responses.responses;
            responses.entry("408".into()).or_insert_with(|| {
                answer(
                    "The body sent nothing for `server.body_idle_timeout_seconds`, or did not arrive whole \
                        within `server.body_timeout_seconds`",
                )
                .into()
            });
            responses.entry("503".into()).or_insert_with(|| {
                answer(
                    "The server is receiving `server.max_body_bytes_in_flight` request-body bytes already; \
                        retry after `Retry-After`",
                )
                .into()
            });
            match responses.get_mut("429") {
                Some(utoipa::openapi::RefOr::T(existing)) => {
                    existing.description = format!("{}, or {KEY_BUDGET}", existing.description);
                }
                _ => {
                    responses.insert(
                        "429".into(),
                        answer(&format!("This request would exceed the budget: {KEY_BUDGET}")).into(),
                    );
                }
            }
        }
    }
}
