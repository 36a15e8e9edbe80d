//! `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/images/{index}`: a job's state and its pictures.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;
use crate::auth::Principal;
use crate::engine::image::OutputFormat;
use crate::jobs::time::rfc3339_from_millis;
use crate::jobs::{ImageRecord, Job, JobStatus};
use crate::worker::events::EventKind;
use crate::worker::progress::{Progress, StopReason};

/// A job as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResponse {
    /// Job id.
    pub id: Uuid,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    #[schema(value_type = String, example = "queued")]
    pub status: JobStatus,
    /// Job kind (`generate`).
    pub kind: String,
    /// Model id.
    pub model: String,
    /// The parameters the job runs with, every default resolved (the seed too). `latents`, when given, is
    /// replaced by its presence flag `has_latents`.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC; absent while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339 UTC; absent until the job ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Denoiser calls done and in all.
    pub progress: Progress,
    /// Jobs ahead of this one, while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Attempts used (a crash of a worker's process costs one).
    pub attempts: u32,
    /// The pictures, once succeeded.
    pub images: Vec<ImageInfo>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

/// One picture of a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageInfo {
    /// Position in the job's output.
    pub index: u32,
    /// Where to download it.
    pub url: String,
    /// The seed that made it: send it back with `n = 1` to reproduce this picture alone.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `png`, `jpeg` or `webp`.
    pub format: String,
}

/// A failed job's error.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobError {
    /// Stable code, e.g. `inference_error`, `max_attempts_exceeded`.
    pub code: String,
    /// Detail.
    pub message: String,
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::NotFound(format!("no job `{text}`")))
}

/// The job `id` if it exists and `who` may see it; another tenant's job is "not found", exactly like a
/// missing one, so ids reveal nothing.
pub async fn find_job(state: &AppState, who: &Principal, id: Uuid) -> Result<Job, ApiError> {
    match state.store.get(id).await? {
        Some(job) if who.can_see(job.owner.as_deref()) => Ok(job),
        _ => Err(ApiError::NotFound(format!("no job `{id}`"))),
    }
}

/// Steps the client sees for `job` (edits at partial strength run fewer than `steps`).
pub fn visible_steps(job: &Job) -> u32 {
    if job.kind == crate::jobs::params::KIND_EDIT {
        if let Ok(params) = serde_json::from_value::<crate::jobs::params::EditParams>(job.params.clone()) {
            return params.visible_steps();
        }
    }
    job.params.get("steps").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32
}

/// Builds the client view of `job`.
pub async fn job_response(state: &AppState, job: Job, images: Vec<ImageRecord>) -> Result<JobResponse, ApiError> {
    let total_steps = visible_steps(&job);
    let queue_position = match job.status {
        JobStatus::Queued => state.positions.get(job.id, state.bus.last_lifecycle_id()).await?,
        _ => None,
    };
    let progress = match job.status {
        JobStatus::Running => {
            state.progress.get(job.id).unwrap_or(Progress { step: 0, total: total_steps, eta_ms: None })
        }
        JobStatus::Succeeded => Progress { step: total_steps, total: total_steps, eta_ms: Some(0) },
        JobStatus::Queued => Progress {
            step: 0,
            total: total_steps,
            eta_ms: state.progress.queued_eta_ms(total_steps, queue_position.unwrap_or(0), state.workers),
        },
        _ => Progress { step: 0, total: total_steps, eta_ms: None },
    };
    let mut params = job.params.clone();
    if let Some(map) = params.as_object_mut() {
        let had = map.remove("latents").is_some();
        map.remove("image_path");
        map.remove("mask_path");
        map.insert("has_latents".into(), serde_json::Value::Bool(had));
    }
    let error = match (&job.error_code, &job.error_message) {
        (Some(code), message) => Some(JobError { code: code.clone(), message: message.clone().unwrap_or_default() }),
        _ => None,
    };
    Ok(JobResponse {
        id: job.id,
        status: job.status,
        kind: job.kind,
        model: job.model,
        params,
        created_at: rfc3339_from_millis(job.created_at),
        started_at: job.started_at.map(rfc3339_from_millis),
        finished_at: job.finished_at.map(rfc3339_from_millis),
        progress,
        queue_position,
        attempts: job.attempts,
        images: images
            .into_iter()
            .map(|i| ImageInfo {
                url: format!("/v1/jobs/{}/images/{}", job.id, i.index),
                index: i.index,
                seed: i.seed,
                width: i.width,
                height: i.height,
                format: i.format,
            })
            .collect(),
        error,
    })
}

/// A job's state, progress and images.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobResponse),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<AppJson<JobResponse>, ApiError> {
    let id = parse_id(&id)?;
    let job = find_job(&state, &who, id).await?;
    let images = if job.status == JobStatus::Succeeded { state.store.images(id).await? } else { Vec::new() };
    Ok(AppJson(job_response(&state, job, images).await?))
}

/// Downloads one picture of a succeeded job.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{index}",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("index" = u32, Path, description = "Image index, from 0"),
    ),
    responses(
        (status = 200, description = "The image bytes",
         content(("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 404, description = "No such job or image", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_image(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let index: u32 = index.parse().map_err(|_| ApiError::NotFound(format!("no image `{index}`")))?;
    let job = find_job(&state, &who, id).await?;
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::Conflict(format!(
            "job `{id}` is {}; images exist once it has succeeded",
            job.status.as_str()
        )));
    }
    let record = state
        .store
        .image(id, index)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job `{id}` has no image {index}")))?;
    let path = state.files.resolve(&record.path).ok_or_else(|| ApiError::internal("stored image path is unsafe"))?;
    let bytes = tokio::fs::read(&path).await.map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let mime = OutputFormat::parse(&record.format).map_or("application/octet-stream", OutputFormat::mime);
    Ok((
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::ETAG, format!("\"{}\"", record.sha256)),
            (header::CACHE_CONTROL, "private, max-age=31536000, immutable".to_string()),
        ],
        bytes,
    )
        .into_response())
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this status (`queued`, `running`, `succeeded`, `failed`, `cancelled`).
    pub status: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1–100 (default 20).
    pub limit: Option<u32>,
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobList {
    /// Always `list`.
    pub object: &'static str,
    /// The jobs.
    pub data: Vec<JobResponse>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// List jobs, newest first, optionally by status, with cursor pagination.
#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobList),
        (status = 422, description = "Bad status, cursor or limit", body = ErrorBody),
    )
)]
pub async fn list_jobs(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<AppJson<JobList>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::field("query", e.body_text()))?;
    let status = match query.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(s.parse::<JobStatus>().map_err(|_| {
            ApiError::field(
                "status",
                format!("unknown status `{s}`; one of queued, running, succeeded, failed, cancelled"),
            )
        })?),
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => {
            Some(Uuid::parse_str(c).map_err(|_| ApiError::field("cursor", "cursor is not one this server issued"))?)
        }
    };
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "limit must be between 1 and 100"));
    }
    let jobs = state.store.list(status, who.list_scope(), cursor, limit + 1).await?;
    let more = jobs.len() > limit as usize;
    let mut data = Vec::with_capacity(limit as usize);
    for job in jobs.into_iter().take(limit as usize) {
        let images = if job.status == JobStatus::Succeeded { state.store.images(job.id).await? } else { Vec::new() };
        data.push(job_response(&state, job, images).await?);
    }
    let next_cursor = if more { data.last().map(|j| j.id.to_string()) } else { None };
    Ok(AppJson(JobList { object: "list", data, next_cursor }))
}

/// Cancel a job: a queued job at once, a running one at its next step boundary.
#[utoipa::path(
    post,
    path = "/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled (it was queued)", body = JobResponse),
        (status = 202, description = "Cancellation requested; the running job stops at its next step", body = JobResponse),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job has already ended, or runs in another server process", body = ErrorBody),
    )
)]
pub async fn cancel_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let job = find_job(&state, &who, id).await?;
    let status = match job.status {
        JobStatus::Queued if state.store.cancel_queued(id).await? => {
            state.bus.publish(id, EventKind::Cancelled);
            axum::http::StatusCode::OK
        }
        JobStatus::Queued | JobStatus::Running => {
            if state.progress.stop(id, StopReason::Client) {
                axum::http::StatusCode::ACCEPTED
            } else {
                // Claimed between our read and the cancel, or running in another process.
                let now = state.store.get(id).await?.ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
                if now.status == JobStatus::Running && state.progress.stop(id, StopReason::Client) {
                    axum::http::StatusCode::ACCEPTED
                } else if now.status.is_terminal() {
                    return Err(ApiError::Conflict(format!("job `{id}` has already ended ({})", now.status.as_str())));
                } else {
                    return Err(ApiError::Conflict(format!("job `{id}` runs in another server process")));
                }
            }
        }
        other => return Err(ApiError::Conflict(format!("job `{id}` has already ended ({})", other.as_str()))),
    };
    let job = state.store.get(id).await?.ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
    let body = job_response(&state, job, Vec::new()).await?;
    Ok((status, AppJson(body)).into_response())
}

/// Delete a job and its images, cancelling it first if it is queued or running.
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such job", body = ErrorBody),
    )
)]
pub async fn delete_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let job = find_job(&state, &who, id).await?;
    if job.status == JobStatus::Running {
        state.progress.stop(id, StopReason::Client);
    }
    if !state.store.delete(id).await? {
        return Err(ApiError::NotFound(format!("no job `{id}`")));
    }
    if !job.status.is_terminal() {
        state.bus.note_owner(id, job.owner.as_deref());
        state.bus.publish(id, EventKind::Cancelled);
    }
    state.bus.forget(id);
    let files = state.files.clone();
    let input = job.params.get("image_path").and_then(serde_json::Value::as_str).map(str::to_string);
    tokio::task::spawn_blocking(move || {
        if let Some(input) = input {
            files.remove_input_of(&input)?;
        }
        files.remove_job(id)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::internal(format!("removing images of {id}: {e}")))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}
