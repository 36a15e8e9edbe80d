//! `POST /v1/images`: the text-to-image request, validated (`validation::generation`) into a job, answered
//! `202 Accepted`.

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, AppJson, ErrorBody};
use super::jobs::JobResponse;
use super::validation;
use super::watermarks::job_watermark;
use super::webhook::{job_webhook, WebhookEvent};
use super::AppState;
use crate::auth::Principal;
use crate::engine::image::OutputFormat;
use crate::engine::preview::PreviewMode;
use crate::jobs::{Idempotency, JobParams, JobRequest, Priority, Submitted};

/// Encodings a client can ask for (the API's name for the engine's [`OutputFormat`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Lossless PNG.
    Png,
    /// JPEG, quality 90.
    Jpeg,
    /// Lossless WebP.
    Webp,
}

impl From<ImageFormat> for OutputFormat {
    fn from(f: ImageFormat) -> Self {
        match f {
            ImageFormat::Png => OutputFormat::Png,
            ImageFormat::Jpeg => OutputFormat::Jpeg,
            ImageFormat::Webp => OutputFormat::Webp,
        }
    }
}

/// How step previews are rendered (the API's name for the engine's [`PreviewMode`]).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PreviewKind {
    /// The model's cheap approximate decoder.
    Approx,
    /// The full VAE decoder.
    Vae,
}

impl From<PreviewKind> for PreviewMode {
    fn from(k: PreviewKind) -> Self {
        match k {
            PreviewKind::Approx => PreviewMode::Approx,
            PreviewKind::Vae => PreviewMode::Vae,
        }
    }
}

/// A text-to-image request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateImageRequest {
    /// What to draw.
    #[schema(example = "a large red circle top left on a blue background", min_length = 1)]
    pub prompt: String,
    /// What to steer away from.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Model id from `GET /v1/models`; default: the first configured model.
    #[serde(default)]
    pub model: Option<String>,
    /// `http`/`https` URL told of this job's end by a signed `POST` (Standard Webhooks; see the README),
    /// instead of the API key's default webhook URL. Its host must resolve to public addresses only.
    #[serde(default)]
    #[schema(max_length = 2048)]
    pub webhook_url: Option<String>,
    /// Events sent to the webhook besides the terminal one (`completed`, `failed` or `cancelled`, always
    /// sent): `["started"]` adds the moment a worker takes the job.
    #[serde(default)]
    pub webhook_events: Option<Vec<WebhookEvent>>,
    /// Width in pixels, a multiple of the model's `size_multiple` (64 for Stable Diffusion); default: the model's native size.
    #[serde(default)]
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of the model's `size_multiple` (64 for Stable Diffusion); default: the model's native size.
    #[serde(default)]
    #[schema(minimum = 8, maximum = 2048, multiple_of = 8)]
    pub height: Option<u32>,
    /// Denoising steps (default: the model's configured default, else 20).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 150)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; 1 or less turns guidance off (default: the model's configured default,
    /// else 7.5).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 50)]
    pub guidance_scale: Option<f32>,
    /// Rescales guided predictions toward the conditional one's spread (0 = off, 0.7 is typical for
    /// zero-terminal-SNR models).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub guidance_rescale: Option<f32>,
    /// Scheduler name or alias (see `GET /v1/schedulers`); `default` or absent: the model's own.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Seed of the first image; image `i` uses `seed + i`. Random when absent (and reported in the job).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Images in this job (default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<u32>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<ImageFormat>,
    /// JPEG quality, 1–100 (default 90).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub output_quality: Option<u8>,
    /// Denoiser calls between step previews sent to event followers; 0 = none. Default: a tenth of the
    /// steps, rounded up. Previews are only rendered while someone follows the job.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 150)]
    pub preview_every: Option<u32>,
    /// `approx` (default: the model's cheap preview decoder) or `vae` (full VAE decode, slower, exact).
    #[serde(default)]
    pub preview: Option<PreviewKind>,
    /// Base64 `.npy` float32 array `[n, C, height/f, width/f]` of unit-Gaussian noise to start from instead of
    /// seeded noise (`C` latent channels and `f` the VAE factor: 4 and 8 for Stable Diffusion); the server
    /// scales it by the scheduler's initial sigma, as diffusers' `latents=` does.
    #[serde(default)]
    pub latents: Option<String>,
    /// How soon it runs relative to other jobs: `low`, `normal` (default) or `high` (admin keys only). Among
    /// jobs of one priority, keys take turns by weight.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Write a Tree-Ring watermark into the starting noise (see `POST /v1/watermarks/detect`): `true` uses
    /// the API key's watermark, else the server's (a `422` when neither exists); `false` none. Absent: the
    /// key's when it is on, else the server's when `[watermark] default_on`. The job's `params.watermark.key`
    /// says whose it got.
    #[serde(default)]
    pub watermark: Option<bool>,
}

/// Submit a text-to-image job.
#[utoipa::path(
    post,
    path = "/v1/images",
    tag = "images",
    request_body = GenerateImageRequest,
    responses(
        (status = 202, description = "Job accepted and stored", body = JobResponse,
         headers(("Location" = String, description = "URL of the job"))),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `error.field` names it", body = ErrorBody),
        (status = 403, description = "`priority: high` without an admin key", body = ErrorBody),
        (status = 429, description = "The queue is full (see `Retry-After`), this key has `limits.max_outstanding_per_key` jobs queued or running, keeps `limits.max_stored_bytes_per_key` of images and uploads (`storage_quota_exceeded`), made its `rate_per_minute` submissions (`rate_limited`) or used its `daily_image_steps` (`compute_quota_exceeded`); see `Retry-After` and `RateLimit-*`", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"), ("RateLimit-Limit" = u32, description = "Submissions per minute (rate limits)"), ("RateLimit-Remaining" = u32, description = "Submissions left now"), ("RateLimit-Reset" = u64, description = "Seconds until the limit is whole again"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat of the same request within 24 h returns the same job; the key with a different request or route is a 422")),
)]
pub async fn create_image_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: axum::http::HeaderMap,
    AppJson(request): AppJson<GenerateImageRequest>,
) -> Result<Response, ApiError> {
    let key = super::submit::idempotency_key(&headers)?;
    let submitted = submit_generate(&state, &who, request, key, "/v1/images").await?;
    super::submit::accepted(&state, submitted).await
}

/// Validates and enqueues a text-to-image request (the native and the OpenAI route); an `Idempotency-Key` is
/// bound to `route` and the request.
pub async fn submit_generate(
    state: &AppState,
    who: &Principal,
    request: GenerateImageRequest,
    key: Option<String>,
    route: &str,
) -> Result<Submitted, ApiError> {
    let idempotency = match key {
        Some(key) => Some(Idempotency::new(key, route, &[&serde_json::to_vec(&request).map_err(ApiError::internal)?])),
        None => None,
    };
    let priority = super::submit::priority(who, request.priority)?;
    let (url, events) = (request.webhook_url.clone(), request.webhook_events.clone());
    let asked = request.watermark;
    let (model, mut params) = validation::generation(&state.models, &state.limits, request)?;
    params.watermark = job_watermark(state, who, asked, &model, (params.width, params.height)).await?;
    let webhook = job_webhook(state, who, url.as_deref(), events.as_deref()).await?;
    let request = JobRequest { model, params: JobParams::Generate(params), inputs: None, priority, webhook };
    Ok(state.jobs.submit(who, request, idempotency.as_ref()).await?)
}
