//! `GET /v1/workers`: the worker processes registered on this database, for operators of a fleet.

use axum::extract::State;
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;
use crate::auth::Principal;
use crate::jobs::store::WorkerInfo;

/// The worker processes, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    /// Always `list`.
    pub object: &'static str,
    /// Every registered worker process; crashed ones stay listed (not `alive`) for a while.
    pub data: Vec<WorkerInfo>,
}

/// List the worker processes (admin keys only).
#[utoipa::path(
    get,
    path = "/v1/workers",
    tag = "health",
    responses(
        (status = 200, description = "The registered worker processes", body = WorkerList),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    )
)]
pub async fn list_workers(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<AppJson<WorkerList>, ApiError> {
    if !who.admin {
        return Err(ApiError::Forbidden("listing workers needs an admin key".into()));
    }
    let data = state.jobs.store().workers(crate::fleet::ALIVE_MILLIS).await?;
    Ok(AppJson(WorkerList { object: "list", data }))
}
