//! OpenAI-compatible image endpoints on the same queue and workers: `POST /v1/images/generations` and
//! `POST /v1/images/edits`. They wait for the job and answer `{created, data: [{b64_json | url}]}`, or with
//! `stream: true` send OpenAI's image stream events built from step previews. Errors use OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, so OpenAI SDKs raise their usual exceptions.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;

use super::edits::{submit_edit, EditImageRequest};
use super::error::{parse_json, ApiError};
use super::images::{submit_generate, GenerateImageRequest, ImageFormat};
use super::AppState;
use crate::auth::Principal;
use crate::jobs::bus::{EventKind, ImageInfo, JobEvent, ProgressEvent};
use crate::jobs::{forever, Job, JobStatus, JobsError};

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl From<crate::jobs::StoreError> for OpenAiError {
    fn from(e: crate::jobs::StoreError) -> Self {
        OpenAiError(e.into())
    }
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    /// The error.
    pub error: OpenAiErrorDetail,
}

/// OpenAI's error fields.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// `invalid_request_error`, `not_found_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// Stable code.
    pub code: Option<String>,
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let error = self.0;
        if let ApiError::Internal(detail) = &error {
            tracing::error!(%detail, "internal error");
        }
        let status = match error.status() {
            // OpenAI answers every client mistake with 400.
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        let kind = match status.as_u16() {
            404 => "not_found_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let param = match &error {
            ApiError::InvalidField { field, .. } => Some(field.clone()),
            _ => None,
        };
        let retry_after = error.retry_after();
        let code = match &error {
            ApiError::Unauthorized(_) => "invalid_api_key",
            other => other.code(),
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorDetail { message: error.to_string(), kind: kind.into(), param, code: Some(code.into()) },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `b64_json` or `url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Base64 image data in the response.
    #[default]
    B64Json,
    /// A URL to download the image from this server.
    Url,
}

/// OpenAI's image generation request, plus denoised's extensions.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiGenerateRequest {
    /// What to draw.
    pub prompt: String,
    /// Model id from `GET /v1/models`; default: the first configured.
    pub model: Option<String>,
    /// Images, 1–8.
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` (multiples of the model's `size_multiple`) or `auto` (the native size).
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    pub response_format: Option<ResponseFormat>,
    /// `png` (default), `jpeg` or `webp`.
    pub output_format: Option<ImageFormat>,
    /// JPEG quality, 0–100 (default 90); WebP is lossless and PNG ignores it.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Send OpenAI's image stream events instead of one JSON answer.
    pub stream: Option<bool>,
    /// With `stream`: how many partial images (0–3) to send, from step previews.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u32>,
    /// Accepted for compatibility; recorded nowhere.
    pub user: Option<String>,
    /// Accepted for compatibility; ignored.
    pub safety_identifier: Option<String>,
    /// Accepted for compatibility; ignored (`auto`).
    pub quality: Option<String>,
    /// Accepted for compatibility; ignored.
    pub style: Option<String>,
    /// Accepted for compatibility; ignored (`opaque`).
    pub background: Option<String>,
    /// Accepted for compatibility; ignored.
    pub moderation: Option<String>,
    /// Extension: what to avoid.
    pub negative_prompt: Option<String>,
    /// Extension: denoising steps.
    pub steps: Option<u32>,
    /// Extension: classifier-free guidance scale.
    pub guidance_scale: Option<f32>,
    /// Extension: scheduler name or alias.
    pub scheduler: Option<String>,
    /// Extension: seed.
    pub seed: Option<u64>,
}

/// One image of an OpenAI answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiImage {
    /// Base64 image, with `response_format = b64_json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Download URL, with `response_format = url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Always absent: prompts are used as given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
}

/// OpenAI's images response.
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiImagesResponse {
    /// Unix seconds.
    pub created: u64,
    /// The images.
    pub data: Vec<OpenAiImage>,
    /// `png`, `jpeg` or `webp`.
    pub output_format: String,
    /// `WIDTHxHEIGHT`.
    pub size: String,
}

/// How long a non-streaming OpenAI request waits for its job.
const WAIT_LIMIT: Duration = Duration::from_secs(600);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Parses `WIDTHxHEIGHT` or `auto`.
fn parse_size(size: Option<&str>) -> Result<(Option<u32>, Option<u32>), ApiError> {
    match size.map(str::trim) {
        None | Some("") | Some("auto") => Ok((None, None)),
        Some(text) => {
            let (w, h) = text
                .split_once(['x', 'X'])
                .ok_or_else(|| ApiError::field("size", format!("size `{text}` is not WIDTHxHEIGHT or auto")))?;
            let parse = |v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| ApiError::field("size", format!("size `{text}` is not WIDTHxHEIGHT or auto")))
            };
            Ok((Some(parse(w)?), Some(parse(h)?)))
        }
    }
}

/// Generate images (OpenAI-compatible).
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = OpenAiGenerateRequest,
    responses(
        (status = 200, description = "The images (or, with `stream`, `image_generation.partial_image` and \
         `image_generation.completed` server-sent events)", body = OpenAiImagesResponse),
        (status = 400, description = "Invalid request (OpenAI error shape; `param` names the field)", body = OpenAiErrorBody),
        (status = 413, description = "Body over the size limit", body = OpenAiErrorBody),
        (status = 415, description = "Body is not JSON", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full (see `Retry-After`), this key has `limits.max_outstanding_per_key` jobs queued or running, or it keeps `limits.max_stored_bytes_per_key` of images and uploads (`storage_quota_exceeded`)", body = OpenAiErrorBody),
        (status = 500, description = "The job failed", body = OpenAiErrorBody),
    )
)]
pub async fn generations(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, OpenAiError> {
    let body: OpenAiGenerateRequest = super::error::read_json(request, &state).await?;
    let (width, height) = parse_size(body.size.as_deref())?;
    let partial = partial_images(body.partial_images)?;
    let steps = body.steps;
    let generation = GenerateImageRequest {
        prompt: body.prompt,
        negative_prompt: body.negative_prompt,
        model: body.model,
        width,
        height,
        steps,
        guidance_scale: body.guidance_scale,
        guidance_rescale: None,
        scheduler: body.scheduler,
        seed: body.seed,
        n: body.n,
        output_format: body.output_format,
        output_quality: body.output_compression.map(|c| c.max(1)),
        preview_every: Some(0),
        preview: None,
        latents: None,
        priority: None,
        webhook_url: None,
        webhook_events: None,
        watermark: None,
    };
    let mut generation = generation;
    if body.stream.unwrap_or(false) && partial > 0 {
        let total = steps.unwrap_or(super::validation::DEFAULT_STEPS);
        generation.preview_every = Some(total.div_ceil(partial + 1).max(1));
    }
    let key = super::submit::idempotency_key(&headers)?;
    let job = submit_generate(&state, &who, generation, key, "/v1/images/generations").await?.job;
    let format = body.response_format.unwrap_or_default();
    if body.stream.unwrap_or(false) {
        return Ok(stream(state, who, job, partial, "image_generation"));
    }
    respond(&state, &who, job, format).await
}

fn partial_images(value: Option<u32>) -> Result<u32, ApiError> {
    let partial = value.unwrap_or(0);
    if partial > 3 {
        return Err(ApiError::field("partial_images", "partial_images must be between 0 and 3"));
    }
    Ok(partial)
}

/// Waits for the job (ending early at shutdown), then builds OpenAI's answer.
async fn respond(state: &AppState, who: &Principal, job: Job, format: ResponseFormat) -> Result<Response, OpenAiError> {
    let id = job.id;
    let finished = state.jobs.wait(who, id, WAIT_LIMIT).await.map_err(ApiError::from)?;
    match finished.status {
        JobStatus::Succeeded => {}
        JobStatus::Cancelled => return Err(ApiError::Conflict(format!("job `{id}` was cancelled")).into()),
        _ => {
            let message = finished.error_message.clone().unwrap_or_else(|| "the job failed".into());
            return Err(ApiError::Internal(format!("job {id} failed: {message}")).into());
        }
    }
    let records = state.jobs.images(&finished).await.map_err(ApiError::from)?;
    let mut data = Vec::with_capacity(records.len());
    for record in &records {
        let image = match format {
            ResponseFormat::Url => OpenAiImage {
                b64_json: None,
                url: Some(state.http.url(&ImageInfo::url(id, record.image.index))),
                revised_prompt: None,
            },
            ResponseFormat::B64Json => {
                let bytes = state.jobs.image_bytes(record).await.map_err(ApiError::from)?;
                OpenAiImage {
                    b64_json: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    url: None,
                    revised_prompt: None,
                }
            }
        };
        data.push(image);
    }
    let first = records.first();
    let body = OpenAiImagesResponse {
        created: now_secs(),
        data,
        output_format: first.map_or_else(|| "png".into(), |r| r.image.format.clone()),
        size: first.map_or_else(|| "auto".into(), |r| format!("{}x{}", r.image.width, r.image.height)),
    };
    Ok(Json(body).into_response())
}

/// OpenAI's image stream: partial images from previews, then one completed event per image (or an `error`
/// event when the job fails, is cancelled, or the server shuts down first).
fn stream(state: AppState, who: Principal, job: Job, partial: u32, prefix: &'static str) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(stream_job(state, who, job, partial, prefix, tx));
    let mut response = Sse::new(ReceiverStream::new(out)).keep_alive(KeepAlive::default()).into_response();
    response.headers_mut().insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}

type Sender = mpsc::Sender<Result<Event, Infallible>>;

async fn send_json(tx: &Sender, name: String, data: serde_json::Value) -> bool {
    tx.send(Ok(Event::default().event(name).data(data.to_string()))).await.is_ok()
}

async fn stream_job(state: AppState, who: Principal, job: Job, partial: u32, prefix: &'static str, tx: Sender) {
    let id = job.id;
    let Some(params) = job.params.generation() else { return };
    let (size, format) = (format!("{}x{}", params.width, params.height), params.output_format.as_str());
    let Ok(mut follow) = state.jobs.follow(&who, id, 0, forever()).await else { return };
    let mut sent_partials = 0;
    loop {
        let item = tokio::select! {
            item = follow.next() => item,
            _ = tx.closed() => return,
        };
        let Some(item) = item else { break };
        let Ok(JobEvent { kind: EventKind::Progress(ProgressEvent { preview: Some(url), .. }), .. }) = item else {
            continue;
        };
        if sent_partials < partial {
            let data = serde_json::json!({
                "type": format!("{prefix}.partial_image"),
                "b64_json": url.split_once(',').map_or("", |(_, d)| d),
                "created_at": now_secs(),
                "size": size,
                "quality": "auto",
                "background": "opaque",
                "output_format": "jpeg",
                "partial_image_index": sent_partials,
            });
            sent_partials += 1;
            if !send_json(&tx, format!("{prefix}.partial_image"), data).await {
                return;
            }
        }
    }
    drop(follow);
    let done = match state.jobs.find(&who, id).await {
        Ok(job) => job,
        Err(e) => {
            let error =
                serde_json::json!({"type": "error", "error": {"message": e.to_string(), "type": "server_error"}});
            let _ = send_json(&tx, "error".into(), error).await;
            return;
        }
    };
    if done.status != JobStatus::Succeeded {
        let message = match done.status {
            JobStatus::Queued | JobStatus::Running => ApiError::from(JobsError::ShuttingDown(id)).to_string(),
            status => done.error_message.clone().unwrap_or_else(|| format!("the job ended {status}")),
        };
        let error = serde_json::json!({"type": "error", "error": {"message": message, "type": "server_error", "code": done.error_code}});
        let _ = send_json(&tx, "error".into(), error).await;
        return;
    }
    let Ok(records) = state.jobs.images(&done).await else { return };
    for record in records {
        let Ok(bytes) = state.jobs.image_bytes(&record).await else { return };
        let data = serde_json::json!({
            "type": format!("{prefix}.completed"),
            "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
            "created_at": now_secs(),
            "size": format!("{}x{}", record.image.width, record.image.height),
            "quality": "auto",
            "background": "opaque",
            "output_format": format,
            "usage": {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0, "total_tokens": 0},
        });
        if !send_json(&tx, format!("{prefix}.completed"), data).await {
            return;
        }
    }
}

/// The multipart form of `POST /v1/images/edits`, for the OpenAPI document.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiEditForm {
    /// The picture (`image` or `image[]`; the first is used).
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Transparent pixels mark what to edit. Without it, the edit is img2img of the whole picture.
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Vec<u8>>,
    /// What the result should show.
    prompt: String,
    /// Model id.
    model: Option<String>,
    /// Images, 1–8.
    n: Option<u32>,
    /// `WIDTHxHEIGHT` or `auto` (the input size rounded to the model's multiple).
    size: Option<String>,
    /// `b64_json` (default) or `url`.
    response_format: Option<ResponseFormat>,
    /// `png`, `jpeg` or `webp`.
    output_format: Option<ImageFormat>,
    /// Stream `image_edit.partial_image` / `image_edit.completed` events.
    stream: Option<bool>,
    /// With `stream`: partial images, 0–3.
    partial_images: Option<u32>,
    /// Extensions (`negative_prompt`, `steps`, `guidance_scale`, `scheduler`, `seed`, `strength`) as form values.
    #[schema(value_type = Option<String>)]
    extensions: Option<String>,
}

/// OpenAI fields that the native edit request does not take.
const OPENAI_ONLY: &[&str] = &[
    "size",
    "response_format",
    "stream",
    "partial_images",
    "user",
    "safety_identifier",
    "quality",
    "background",
    "input_fidelity",
    "output_compression",
    "moderation",
];

/// Edit images (OpenAI-compatible): inpainting when a mask is given, img2img otherwise.
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "openai",
    request_body(content((OpenAiEditForm = "multipart/form-data"))),
    responses(
        (status = 200, description = "The images (or, with `stream`, `image_edit.partial_image` and \
         `image_edit.completed` server-sent events)", body = OpenAiImagesResponse),
        (status = 400, description = "Invalid request (OpenAI error shape)", body = OpenAiErrorBody),
        (status = 413, description = "Body over the size limit", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full (see `Retry-After`), this key has `limits.max_outstanding_per_key` jobs queued or running, or it keeps `limits.max_stored_bytes_per_key` of images and uploads (`storage_quota_exceeded`)", body = OpenAiErrorBody),
        (status = 500, description = "The job failed", body = OpenAiErrorBody),
    )
)]
pub async fn edits(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, OpenAiError> {
    let mut form = super::form::read_form(request, &state).await?;
    let image = form.image.take().ok_or_else(|| ApiError::field("image", "image is required"))?;
    let mask = form.mask.take();
    let size = form.take_text("size");
    let format = match form.take_text("response_format").as_deref() {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(other) => {
            return Err(ApiError::field("response_format", format!("unknown response_format `{other}`")).into())
        }
    };
    let streaming = matches!(form.take_text("stream").as_deref(), Some("true") | Some("True") | Some("1"));
    let partial = match form.values.remove("partial_images") {
        None => 0,
        Some(v) => partial_images(Some(
            v.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| ApiError::field("partial_images", "partial_images must be a number"))?,
        ))?,
    };
    let mut values = form.values;
    for key in OPENAI_ONLY {
        values.remove(*key);
    }
    if let Some(compression) = values.remove("output_compression") {
        let quality = compression
            .as_u64()
            .filter(|q| *q <= 100)
            .ok_or_else(|| ApiError::field("output_compression", "output_compression must be 0-100"))?;
        values.insert("output_quality".into(), quality.max(1).into());
    }
    let (width, height) = parse_size(size.as_deref())?;
    values.insert("mode".into(), serde_json::Value::String(if mask.is_some() { "inpaint" } else { "img2img" }.into()));
    for (key, value) in [("width", width), ("height", height)] {
        if let Some(v) = value {
            values.insert(key.into(), v.into());
        }
    }
    if streaming && partial > 0 {
        let steps =
            values.get("steps").and_then(|v| v.as_u64()).unwrap_or(u64::from(super::validation::DEFAULT_STEPS)) as u32;
        values.insert("preview_every".into(), steps.div_ceil(partial + 1).max(1).into());
    } else {
        values.insert("preview_every".into(), 0.into());
    }
    let fields: EditImageRequest = parse_json(&serde_json::to_vec(&values).map_err(ApiError::internal)?)?;
    let key = super::submit::idempotency_key(&headers)?;
    let job = submit_edit(&state, &who, fields, image, mask, key, "/v1/images/edits").await?.job;
    if streaming {
        return Ok(stream(state, who, job, partial, "image_edit"));
    }
    respond(&state, &who, job, format).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size(Some("64x128")).unwrap(), (Some(64), Some(128)));
        assert_eq!(parse_size(Some("auto")).unwrap(), (None, None));
        assert_eq!(parse_size(None).unwrap(), (None, None));
        assert!(parse_size(Some("big")).is_err());
        assert!(parse_size(Some("64xabc")).is_err());
    }

    #[test]
    fn errors_have_openai_shape_and_400_for_client_mistakes() {
        let response = OpenAiError(ApiError::field("size", "bad size")).into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = OpenAiError(ApiError::Internal("x".into())).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
