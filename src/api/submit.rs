//! What every submitting route shares: the client's `Idempotency-Key`, and the one `202 Accepted` answer
//! (`Location`, the job, and `Idempotent-Replayed: true` when the key's earlier job is returned).

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, AppJson};
use super::jobs::{job_response, job_response_with};
use super::AppState;
use crate::auth::Principal;
use crate::jobs::{Priority, RateState, Submitted};

/// Header whose repeat within [`crate::jobs::IDEMPOTENCY_WINDOW`] returns the job the first request created.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The client's `Idempotency-Key`, checked: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_HEADER) else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::field("Idempotency-Key", "Idempotency-Key must be ASCII"))?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::field("Idempotency-Key", "Idempotency-Key must be 1 to 255 visible ASCII characters"));
    }
    Ok(Some(key.to_string()))
}

/// The priority a request asked for, if `who` may use it: `high` is for admin keys.
pub fn priority(who: &Principal, asked: Option<Priority>) -> Result<Priority, ApiError> {
    let priority = asked.unwrap_or_default();
    if priority == Priority::High && !who.admin {
        return Err(ApiError::Forbidden("priority `high` is for admin keys; use `normal` or `low`".into()));
    }
    Ok(priority)
}

/// The `202 Accepted` answer to a submission.
pub async fn accepted(state: &AppState, submitted: Submitted) -> Result<Response, ApiError> {
    let location = format!("/v1/jobs/{}", submitted.job.id);
    let rate = submitted.rate;
    let body = match submitted.live {
        Some(live) => job_response_with(state, submitted.job, Vec::new(), live).await?,
        None => job_response(state, submitted.job, Vec::new()).await?,
    };
    let mut response = (StatusCode::ACCEPTED, [(header::LOCATION, location)], AppJson(body)).into_response();
    if !submitted.created {
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    if let Some(rate) = rate {
        rate_limit_headers(response.headers_mut(), &rate);
    }
    Ok(response)
}

/// The IETF `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers of a key's submission rate.
pub fn rate_limit_headers(headers: &mut HeaderMap, rate: &RateState) {
    headers.insert("ratelimit-limit", header::HeaderValue::from(rate.limit));
    headers.insert("ratelimit-remaining", header::HeaderValue::from(rate.remaining));
    headers.insert("ratelimit-reset", header::HeaderValue::from(rate.reset_seconds));
}
