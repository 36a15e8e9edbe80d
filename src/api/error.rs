//! One error type for every HTTP answer that is not a success, one status table, one JSON body:
//! `{"error": {"code", "message", "field"?}}`. Internal errors are logged, never leaked.

use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// The JSON error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong, for programs (`code`, `field`) and people (`message`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_field`, `not_found`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The request field at fault, when there is one (`steps`, `latents`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, of the wrong type, or out of range.
    #[error("{message}")]
    InvalidField {
        /// The field.
        field: String,
        /// Why.
        message: String,
    },
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// The body is not declared as JSON.
    #[error("expected a JSON body with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// The body is over the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No key, or a key that is malformed, unknown or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key that may not use this route (`/metrics` needs an admin key).
    #[error("{0}")]
    Forbidden(String),
    /// No such job, image or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The image exists but is not ready (the job has not succeeded).
    #[error("{0}")]
    Conflict(String),
    /// The queue is full; try again after `retry_after` seconds.
    #[error("the queue is full ({queued} jobs waiting); retry after {retry_after} s")]
    QueueFull {
        /// Jobs waiting.
        queued: u64,
        /// Seconds to wait, sent as `Retry-After`.
        retry_after: u64,
    },
    /// The key already has `limit` jobs queued or running.
    #[error(
        "this API key already has {outstanding} jobs queued or running (limits.max_outstanding_per_key = {limit}); \
             wait for some to finish"
    )]
    TooManyOutstanding {
        /// Jobs the key has outstanding.
        outstanding: u64,
        /// The limit.
        limit: u64,
    },
    /// The request body stopped arriving, or did not arrive whole in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// The server is receiving as many request-body bytes as it may hold; retry shortly.
    #[error(
        "the server is already receiving its limit of {limit} request-body bytes \
         (server.max_body_bytes_in_flight); retry shortly"
    )]
    BodiesInFlight {
        /// The limit.
        limit: usize,
    },
    /// This key is sending as many request-body bytes as it may; retry when its uploads are received.
    #[error(
        "this API key is already sending its limit of {limit} request-body bytes \
         (limits.max_body_bytes_in_flight_per_key); retry when its other uploads are received"
    )]
    KeyBodiesInFlight {
        /// The limit.
        limit: usize,
    },
    /// The key keeps more images and uploads than `limits.max_stored_bytes_per_key`.
    #[error("{0}")]
    StorageQuota(String),
    /// A key's limit (`rate_limited`: submissions per minute; `compute_quota_exceeded`: image-steps per day)
    /// is used up: `429` with `Retry-After` and the `RateLimit-*` headers of that limit.
    #[error("{message}")]
    KeyLimit {
        /// `rate_limited` or `compute_quota_exceeded`.
        code: &'static str,
        /// What happened, naming the limit.
        message: String,
        /// The limit's state for the `RateLimit-*` headers.
        state: crate::jobs::RateState,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Not ready to serve (models loading, database down).
    #[error("{0}")]
    Unavailable(String),
    /// A synchronous service (the watermark detector) has as much waiting work as it may hold; retry shortly.
    #[error("{0}")]
    Busy(String),
    /// A bug or an infrastructure failure; details go to the log only.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// A field error.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidField { field: field.into(), message: message.into() }
    }

    /// An internal error with a detail for the log.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    /// The status table.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidField { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::QueueFull { .. }
            | ApiError::TooManyOutstanding { .. }
            | ApiError::StorageQuota(_)
            | ApiError::KeyLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::KeyBodiesInFlight { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Busy(_) | ApiError::BodiesInFlight { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::TooManyOutstanding { .. } => "too_many_outstanding_jobs",
            ApiError::StorageQuota(_) => "storage_quota_exceeded",
            ApiError::KeyLimit { code, .. } => code,
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::BodiesInFlight { .. } => "server_busy",
            ApiError::KeyBodiesInFlight { .. } => "too_many_body_bytes",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Busy(_) => "busy",
            ApiError::Internal(_) => "internal",
        }
    }

    /// Seconds to send as `Retry-After`, for errors that a later retry can get past.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QueueFull { retry_after, .. } | ApiError::KeyLimit { retry_after, .. } => Some(*retry_after),
            ApiError::BodiesInFlight { .. } | ApiError::KeyBodiesInFlight { .. } | ApiError::Busy(_) => Some(1),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        }
        let field = match &self {
            ApiError::InvalidField { field, .. } => Some(field.clone()),
            _ => None,
        };
        let body = ErrorBody { error: ErrorDetail { code: self.code().into(), message: self.to_string(), field } };
        let mut response = (self.status(), Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        if let ApiError::KeyLimit { state, .. } = &self {
            super::submit::rate_limit_headers(response.headers_mut(), state);
        }
        if response.status() == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<crate::api::validation::ValidationError> for ApiError {
    fn from(e: crate::api::validation::ValidationError) -> Self {
        use crate::api::validation::ValidationError;
        match e {
            ValidationError::Field { field, message } => ApiError::field(field, message),
            ValidationError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::jobs::JobsError> for ApiError {
    fn from(e: crate::jobs::JobsError) -> Self {
        use crate::jobs::JobsError;
        match e {
            JobsError::NotFound(_) | JobsError::NoImage(..) | JobsError::NoMask(_) | JobsError::Deleted(_) => {
                ApiError::NotFound(e.to_string())
            }
            JobsError::WrongState { .. } | JobsError::RunningElsewhere(_) => ApiError::Conflict(e.to_string()),
            JobsError::QueueFull { queued, retry_after } => ApiError::QueueFull { queued, retry_after },
            JobsError::OwnerBusy { outstanding, limit } => ApiError::TooManyOutstanding { outstanding, limit },
            JobsError::TimedOut(_) | JobsError::ShuttingDown(_) => ApiError::Unavailable(e.to_string()),
            JobsError::KeyReused => ApiError::field("Idempotency-Key", e.to_string()),
            JobsError::OverQuota { .. } => ApiError::StorageQuota(e.to_string()),
            JobsError::RateLimited { state, retry_after } => {
                ApiError::KeyLimit { code: "rate_limited", message: e.to_string(), state, retry_after }
            }
            JobsError::ComputeExhausted { used, limit, retry_after, .. } => {
                let limit32 = u32::try_from(limit).unwrap_or(u32::MAX);
                let remaining = u32::try_from(limit.saturating_sub(used)).unwrap_or(u32::MAX);
                let state = crate::jobs::RateState { limit: limit32, remaining, reset_seconds: retry_after };
                ApiError::KeyLimit { code: "compute_quota_exceeded", message: e.to_string(), state, retry_after }
            }
            JobsError::Store(store) => store.into(),
            JobsError::Files(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::net::body::Cut> for ApiError {
    fn from(cut: crate::net::body::Cut) -> Self {
        use crate::net::body::Cut;
        match cut {
            Cut::Stalled(_) | Cut::TooSlow(_) => ApiError::RequestTimeout(cut.to_string()),
            Cut::ServerBudget { limit } => ApiError::BodiesInFlight { limit },
            Cut::KeyBudget { limit } => ApiError::KeyBodiesInFlight { limit },
        }
    }
}

impl From<crate::jobs::StoreError> for ApiError {
    fn from(e: crate::jobs::StoreError) -> Self {
        ApiError::internal(e)
    }
}

/// The body limit, handed to [`AppJson`] through request extensions so its 413 can name the limit.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON extractor whose every rejection is an [`ApiError`] naming the field at fault.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_json(req, state).await.map(AppJson)
    }
}

/// Reads a JSON body: `415` unless it is declared JSON, a JSON `413` over the body limit, then
/// [`parse_json`]. Every JSON route reads its body through here, into one buffer (held once).
pub async fn read_json<T: DeserializeOwned, S: Send + Sync>(req: Request, _state: &S) -> Result<T, ApiError> {
    use crate::net::body::collect::{to_vec, CollectError};
    if !is_json(req.headers()) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = req.extensions().get::<BodyLimit>().map_or(0, |l| l.0);
    let bytes = to_vec(req.into_body(), limit).await.map_err(|e| match e {
        CollectError::TooLarge => ApiError::PayloadTooLarge { limit },
        CollectError::Read(detail) => ApiError::MalformedJson(format!("Failed to buffer the request body: {detail}")),
    })?;
    parse_json(&bytes)
}

impl<T: Serialize> IntoResponse for AppJson<T> {
    fn into_response(self) -> Response {
        Json(self.0).into_response()
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Deserialises `bytes`, turning serde's message into a field error: syntax errors are 400, type and value
/// errors 422 with the path of the offending field (`steps`, `latents`, …).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    match result {
        Ok(value) => {
            deserializer
                .end()
                .map_err(|e| ApiError::MalformedJson(format!("trailing data after the JSON value: {e}")))?;
            Ok(value)
        }
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            match inner.classify() {
                serde_json::error::Category::Syntax
                | serde_json::error::Category::Eof
                | serde_json::error::Category::Io => Err(ApiError::MalformedJson(format!("malformed JSON: {inner}"))),
                serde_json::error::Category::Data => {
                    let message = strip_position(&inner.to_string());
                    let field = field_from(&path, &message);
                    Err(ApiError::InvalidField { message: format!("{field}: {message}"), field })
                }
            }
        }
    }
}

/// serde_json appends " at line L column C"; the field name says more to a client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The field at fault: the path serde reached, or the name inside "unknown field `x`" / "missing field `x`".
fn field_from(path: &str, message: &str) -> String {
    for marker in ["unknown field `", "missing field `"] {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            if let Some(end) = rest.find('`') {
                let name = &rest[..end];
                return match path {
                    "" | "." => name.to_string(),
                    p if p == name || p.ends_with(&format!(".{name}")) => p.to_string(),
                    p => format!("{p}.{name}"),
                };
            }
        }
    }
    if path == "." || path.is_empty() {
        "body".to_string()
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        prompt: String,
        steps: Option<u32>,
    }

    fn field_of(body: &str) -> (StatusCode, Option<String>) {
        match parse_json::<Sample>(body.as_bytes()) {
            Ok(_) => (StatusCode::OK, None),
            Err(e) => {
                let f = match &e {
                    ApiError::InvalidField { field, .. } => Some(field.clone()),
                    _ => None,
                };
                (e.status(), f)
            }
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of(r#"{"prompt": "x", "steps": "ten"}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("steps".into()))
        );
        assert_eq!(
            field_of(r#"{"prompt": "x", "steps": -1}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("steps".into()))
        );
        assert_eq!(field_of(r#"{"steps": 3}"#), (StatusCode::UNPROCESSABLE_ENTITY, Some("prompt".into())));
        assert_eq!(
            field_of(r#"{"prompt": "x", "colour": 1}"#),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("colour".into()))
        );
        assert_eq!(field_of(r#"{"prompt": "x""#), (StatusCode::BAD_REQUEST, None));
        assert_eq!(field_of(r#"{"prompt": "x"} trailing"#), (StatusCode::BAD_REQUEST, None));
        assert_eq!(field_of(r#"{"prompt": "x"}"#), (StatusCode::OK, None));
    }
}
