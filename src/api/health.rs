//! Liveness and readiness: `/healthz` says the process answers; `/readyz` says it can do work (the database
//! answers and every worker has its models loaded).

use std::sync::atomic::Ordering;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;

/// Health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> AppJson<Health> {
    AppJson(Health { status: "ok" })
}

/// The server can take and run jobs.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready; the message says why", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<AppJson<Health>, ApiError> {
    if !state.workers_ready.load(Ordering::SeqCst) {
        return Err(ApiError::Unavailable(
            "no worker is ready (models loading, no worker process alive, or shutting down)".into(),
        ));
    }
    state.jobs.store().ping().await.map_err(|e| ApiError::Unavailable(format!("database: {e}")))?;
    Ok(AppJson(Health { status: "ready" }))
}
