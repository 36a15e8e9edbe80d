//! `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/images/{index}`: a job's state and its pictures.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;
use crate::engine::image::OutputFormat;
use crate::jobs::time::rfc3339_from_millis;
use crate::jobs::{ImageRecord, Job, JobStatus};
use crate::worker::progress::Progress;

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

/// Builds the client view of `job`.
pub async fn job_response(state: &AppState, job: Job, images: Vec<ImageRecord>) -> Result<JobResponse, ApiError> {
    let total_steps = job.params.get("steps").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32;
    let progress = match job.status {
        JobStatus::Running => state.progress.get(job.id).unwrap_or(Progress {
            step: 0,
            total: total_steps,
        }),
        JobStatus::Succeeded => Progress {
            step: total_steps,
            total: total_steps,
        },
        _ => Progress {
            step: 0,
            total: total_steps,
        },
    };
    let queue_position = match job.status {
        JobStatus::Queued => state.store.queue_position(job.id).await?,
        _ => None,
    };
    let mut params = job.params.clone();
    if let Some(map) = params.as_object_mut() {
        let had = map.remove("latents").is_some();
        map.insert("has_latents".into(), serde_json::Value::Bool(had));
    }
    let error = match (&job.error_code, &job.error_message) {
        (Some(code), message) => Some(JobError {
            code: code.clone(),
            message: message.clone().unwrap_or_default(),
        }),
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
pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<AppJson<JobResponse>, ApiError> {
    let id = parse_id(&id)?;
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
    let images = if job.status == JobStatus::Succeeded {
        state.store.images(id).await?
    } else {
        Vec::new()
    };
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
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let index: u32 = index
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no image `{index}`")))?;
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
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
    let path = state
        .files
        .resolve(&record.path)
        .ok_or_else(|| ApiError::internal("stored image path is unsafe"))?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    let mime = OutputFormat::parse(&record.format).map_or("application/octet-stream", OutputFormat::mime);
    Ok((
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::ETAG, format!("\"{}\"", record.sha256)),
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable".to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}
