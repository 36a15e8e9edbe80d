//! `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/images/{index}`: a job's state and its pictures.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, AppJson, ErrorBody};
use super::AppState;
use crate::auth::Principal;
use crate::engine::image::OutputFormat;
use crate::jobs::bus::{ImageInfo, MaskInfo};
use crate::jobs::progress::Progress;
use crate::jobs::store::{DeliveryStatus, WebhookState};
use crate::jobs::time::rfc3339_from_millis;
use crate::jobs::{has_computed_mask, Cancelled, ImageRecord, Job, JobStatus, LiveState, Priority};

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
    /// `low`, `normal` or `high`.
    pub priority: Priority,
    /// The pictures, once succeeded.
    pub images: Vec<ImageInfo>,
    /// The mask a DiffEdit job (`mask: "auto"`) computed and inpainted with, once succeeded; absent for
    /// every other job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskInfo>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Its webhook and how its delivery goes; absent when the job has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<JobWebhookView>,
}

/// A job's webhook as its view shows it: the URL and the state of its latest delivery (the terminal event's
/// once the job has ended). Never the signing secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobWebhookView {
    /// Where the job's events are sent.
    pub url: String,
    /// The event that `status` is about (`started`, `completed`, `failed` or `cancelled`); absent until the
    /// first event is queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// `pending` (not yet delivered: waiting for the event, its first attempt or a retry), `delivered` (the
    /// receiver answered 2xx) or `failed` (every allowed attempt failed).
    pub status: DeliveryStatus,
    /// Attempts made for that event.
    pub attempts: u32,
    /// Why the last attempt failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<WebhookState> for JobWebhookView {
    fn from(state: WebhookState) -> Self {
        Self {
            url: state.url,
            event: state.event,
            status: state.status,
            attempts: state.attempts,
            last_error: state.last_error,
        }
    }
}

/// A failed job's error.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobError {
    /// Stable code, e.g. `inference_error`, `max_attempts_exceeded`.
    pub code: String,
    /// Detail.
    pub message: String,
}

/// A job id from the path; anything that is not a UUID is simply no job.
pub fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::NotFound(format!("no job `{text}`")))
}

/// Builds the client view of `job` (its images, when it has succeeded, passed in).
pub async fn job_response(state: &AppState, job: Job, images: Vec<ImageRecord>) -> Result<JobResponse, ApiError> {
    let live = state.jobs.live_state(&job).await?;
    job_response_with(state, job, images, live).await
}

/// [`job_response`] with a live state the caller already has.
pub async fn job_response_with(
    state: &AppState,
    job: Job,
    images: Vec<ImageRecord>,
    live: LiveState,
) -> Result<JobResponse, ApiError> {
    let webhook = state.jobs.webhook(&job).await?.map(JobWebhookView::from);
    let error = job.error_code.map(|code| JobError { code, message: job.error_message.unwrap_or_default() });
    let mask = (job.status == JobStatus::Succeeded && has_computed_mask(&job.params)).then(|| MaskInfo::of(job.id));
    Ok(JobResponse {
        id: job.id,
        status: job.status,
        kind: job.params.kind().to_string(),
        model: job.model,
        params: job.params.public_view(),
        created_at: rfc3339_from_millis(job.created_at),
        started_at: job.started_at.map(rfc3339_from_millis),
        finished_at: job.finished_at.map(rfc3339_from_millis),
        progress: live.progress,
        queue_position: live.queue_position,
        attempts: job.attempts,
        priority: Priority::from_value(job.priority),
        images: images.iter().map(ImageInfo::from).collect(),
        mask,
        error,
        webhook,
    })
}

/// The view of a job with its images.
async fn full_response(state: &AppState, job: Job) -> Result<JobResponse, ApiError> {
    let images = state.jobs.images(&job).await?;
    job_response(state, job, images).await
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
    let job = state.jobs.find(&who, parse_id(&id)?).await?;
    Ok(AppJson(full_response(&state, job).await?))
}

/// `Cache-Control` of a finished job's files: they never change once written.
const IMMUTABLE: &str = "private, max-age=31536000, immutable";

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
    let (record, bytes) = state.jobs.image(&who, id, index).await?;
    let mime = OutputFormat::parse(&record.image.format).map_or("application/octet-stream", OutputFormat::mime);
    Ok((
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::ETAG, format!("\"{}\"", record.image.sha256)),
            (header::CACHE_CONTROL, IMMUTABLE.to_string()),
        ],
        bytes,
    )
        .into_response())
}

/// Downloads the mask a DiffEdit job (`mask: "auto"`) computed: white where the pictures were repainted.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/mask",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The mask, a grayscale PNG of the pictures' size", content_type = "image/png"),
        (status = 404, description = "No such job, or a job that computes no mask", body = ErrorBody),
        (status = 409, description = "The job has not succeeded (yet)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
pub async fn get_mask(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = state.jobs.mask(&who, parse_id(&id)?).await?;
    Ok(([(header::CONTENT_TYPE, "image/png".to_string()), (header::CACHE_CONTROL, IMMUTABLE.to_string())], bytes)
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
    let jobs = state.jobs.list(&who, status, cursor, limit + 1).await?;
    let more = jobs.len() > limit as usize;
    let mut data = Vec::with_capacity(limit as usize);
    for job in jobs.into_iter().take(limit as usize) {
        data.push(full_response(&state, job).await?);
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
    let (status, job) = match state.jobs.cancel(&who, parse_id(&id)?).await? {
        Cancelled::AtOnce(job) => (StatusCode::OK, job),
        Cancelled::Requested(job) => (StatusCode::ACCEPTED, job),
    };
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
    state.jobs.delete(&who, parse_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
