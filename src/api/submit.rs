//! What every submitting route shares: the client's `Idempotency-Key`, and the one `202 Accepted` answer
//! (`Location`, the job, and `Idempotent-Replayed: true` when the key's earlier job is returned).

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, AppJson};
use super::jobs::job_response;
use super::AppState;
use crate::jobs::Submitted;

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

/// The `202 Accepted` answer to a submission.
pub async fn accepted(state: &AppState, submitted: Submitted) -> Result<Response, ApiError> {
    let location = format!("/v1/jobs/{}", submitted.job.id);
    let body = job_response(state, submitted.job, Vec::new()).await?;
    let mut response = (StatusCode::ACCEPTED, [(header::LOCATION, location)], AppJson(body)).into_response();
    if !submitted.created {
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(response)
}
