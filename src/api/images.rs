//! `POST /v1/images`: validate a text-to-image request into stored job parameters, commit the job, answer
//! `202 Accepted`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{ApiError, AppJson, ErrorBody};
use super::jobs::{job_response, JobResponse};
use super::AppState;
use crate::auth::Principal;
use crate::engine::image::OutputFormat;
use crate::engine::preview::PreviewMode;
use crate::engine::scheduler::SchedulerKind;
use crate::jobs::params::{GenerateParams, KIND_GENERATE};

/// Default denoising steps when a request names none.
pub const DEFAULT_STEPS: u32 = 20;
/// Default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE: f32 = 7.5;

/// Encodings a client can ask for (the API's name for the engine's [`OutputFormat`]).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
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
#[derive(Debug, Deserialize, ToSchema)]
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
    /// Base64 `.npy` float32 array `[n, 4, height/8, width/8]` of unit-Gaussian noise to start from instead
    /// of seeded noise; the server scales it by the scheduler's initial sigma, as diffusers' `latents=` does.
    #[serde(default)]
    pub latents: Option<String>,
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
        (status = 429, description = "The queue is full (see `Retry-After`), or this key has `limits.max_outstanding_per_key` jobs queued or running", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat within 24 h returns the same job")),
)]
pub async fn create_image_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: axum::http::HeaderMap,
    AppJson(request): AppJson<GenerateImageRequest>,
) -> Result<Response, ApiError> {
    let key = super::submit::idempotency_key(&headers)?;
    let submitted = submit_generate(&state, &who, request, key.as_deref()).await?;
    let replayed = !submitted.created;
    let job = submitted.job;
    let location = format!("/v1/jobs/{}", job.id);
    let body = job_response(&state, job, Vec::new()).await?;
    let mut response = (StatusCode::ACCEPTED, [(header::LOCATION, location)], AppJson(body)).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Validates and enqueues a text-to-image request.
pub async fn submit_generate(
    state: &AppState,
    who: &Principal,
    request: GenerateImageRequest,
    key: Option<&str>,
) -> Result<super::submit::Submitted, ApiError> {
    let (model, params) = validate(state, request)?;
    let params = serde_json::to_value(&params).map_err(ApiError::internal)?;
    super::submit::enqueue(state, who, KIND_GENERATE, model, params, key).await
}

/// Checks every field against the model and the configured limits, resolving every default.
pub fn validate(state: &AppState, request: GenerateImageRequest) -> Result<(String, GenerateParams), ApiError> {
    let limits = &state.limits;
    if request.prompt.trim().is_empty() {
        return Err(ApiError::field("prompt", "prompt must not be empty"));
    }
    if request.prompt.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::field("prompt", format!("prompt is longer than {} characters", limits.max_prompt_chars)));
    }
    let negative_prompt = request.negative_prompt.unwrap_or_default();
    if negative_prompt.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::field(
            "negative_prompt",
            format!("negative_prompt is longer than {} characters", limits.max_prompt_chars),
        ));
    }
    let served = match &request.model {
        Some(name) => state.models.get(name).ok_or_else(|| {
            ApiError::field("model", format!("unknown model `{name}`; available: {}", state.models.names()))
        })?,
        None => state.models.default_model().ok_or_else(|| ApiError::internal("no model configured"))?,
    };
    let info = &served.info;
    let factor = info.vae_scale_factor;
    let multiple = info.size_multiple;
    let side = |name: &str, value: Option<u32>| -> Result<u32, ApiError> {
        let v = value.unwrap_or(info.native_size);
        let min = multiple;
        if v < min || v > limits.max_side {
            return Err(ApiError::field(name, format!("{name} must be between {min} and {} pixels", limits.max_side)));
        }
        if v % multiple != 0 {
            return Err(ApiError::field(name, format!("{name} must be a multiple of {multiple} for this model")));
        }
        Ok(v)
    };
    let width = side("width", request.width)?;
    let height = side("height", request.height)?;
    let steps = request.steps.or(served.default_steps).unwrap_or(DEFAULT_STEPS);
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::field("steps", format!("steps must be between 1 and {}", limits.max_steps)));
    }
    let guidance_scale = request.guidance_scale.or(served.default_guidance_scale).unwrap_or(DEFAULT_GUIDANCE);
    if !guidance_scale.is_finite() || !(0.0..=50.0).contains(&guidance_scale) {
        return Err(ApiError::field("guidance_scale", "guidance_scale must be between 0 and 50"));
    }
    let guidance_rescale = request.guidance_rescale.unwrap_or(0.0);
    if !guidance_rescale.is_finite() || !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(ApiError::field("guidance_rescale", "guidance_rescale must be between 0 and 1"));
    }
    let scheduler = match request.scheduler.as_deref().map(str::trim) {
        None | Some("") | Some("default") => info.default_scheduler,
        Some(name) => SchedulerKind::from_request_name(name).ok_or_else(|| {
            ApiError::field("scheduler", format!("unknown scheduler `{name}`; see GET /v1/schedulers for the names"))
        })?,
    };
    // A model's default scheduler tells its parameterisation; the other family would run and produce noise.
    let model_kind = info.default_scheduler.parameterization();
    scheduler.check_model(model_kind).map_err(|e| ApiError::field("scheduler", e.to_string()))?;
    // Building the schedule now turns a step count or config value the scheduler cannot take into a 422
    // instead of a job that fails later.
    crate::engine::scheduler::build(scheduler, &info.scheduler_config, steps as usize).map_err(|e| match e {
        crate::engine::scheduler::SchedulerError::InvalidSteps { .. } => ApiError::field("steps", e.to_string()),
        other => ApiError::field("scheduler", format!("{} cannot run this model: {other}", scheduler.name())),
    })?;
    let n = request.n.unwrap_or(1);
    if n == 0 || n > limits.max_images {
        return Err(ApiError::field("n", format!("n must be between 1 and {}", limits.max_images)));
    }
    let latents = match request.latents {
        None => None,
        Some(encoded) => {
            let expected =
                [n as usize, info.latent_channels as usize, (height / factor) as usize, (width / factor) as usize];
            check_latents(&encoded, &expected)?;
            Some(encoded)
        }
    };
    let output_quality = request.output_quality;
    if output_quality.is_some_and(|q| q == 0 || q > 100) {
        return Err(ApiError::field("output_quality", "output_quality must be between 1 and 100"));
    }
    let preview_every = request.preview_every.unwrap_or_else(|| steps.div_ceil(10));
    if preview_every > steps {
        return Err(ApiError::field("preview_every", format!("preview_every must be between 0 and steps ({steps})")));
    }
    let seed = request.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let params = GenerateParams {
        prompt: request.prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        guidance_rescale,
        scheduler: scheduler.name().to_string(),
        seed,
        n,
        output_format: request.output_format.map(OutputFormat::from).unwrap_or_default(),
        output_quality,
        preview_every,
        preview: request.preview.map(PreviewMode::from).unwrap_or_default(),
        latents,
    };
    Ok((served.name.clone(), params))
}

fn check_latents(encoded: &str, expected: &[usize; 4]) -> Result<(), ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| ApiError::field("latents", format!("latents is not valid base64: {e}")))?;
    let array =
        crate::engine::npy::read_f32(&bytes).map_err(|e| ApiError::field("latents", format!("latents: {e}")))?;
    if array.shape() != expected {
        return Err(ApiError::field(
            "latents",
            format!(
                "latents has shape {:?}; this request needs [n, C, height/8, width/8] = {:?}",
                array.shape(),
                expected
            ),
        ));
    }
    if array.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::field("latents", "latents contains NaN or infinite values"));
    }
    Ok(())
}
