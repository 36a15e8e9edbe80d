//! `GET /metrics`: Prometheus text format. Queue depth is read from the store at scrape time so that it
//! is right across processes sharing a database.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::jobs::JobStatus;

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
        (status = 500, description = "The database did not answer", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let counts = state.jobs.store().count_by_status().await?;
    for status in JobStatus::ALL {
        metrics::gauge!("denoised_jobs", "status" => status.as_str()).set(counts.get(status) as f64);
    }
    let body = crate::telemetry::metrics_handle().render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body))
}
