//! `POST /v1/edits`: img2img, inpainting, outpainting and instruction edits, as JSON (images as base64 or
//! data URLs) or `multipart/form-data` (files `image` and `mask`, other fields as form values).
//!
//! Everything that can be checked is checked at submission (`validation::edit`: decoding under limits, mask
//! size, the model's modes, sizes), so a bad upload is a 4xx naming the field, never an accepted job that
//! fails later. The prepared picture and mask are stored beside the job, so a retried job edits exactly the
//! same pixels.

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{parse_json, ApiError, ErrorBody};
use super::images::{ImageFormat, PreviewKind};
use super::jobs::JobResponse;
use super::validation;
use super::validation::AUTO_MASK;
use super::webhook::{job_webhook, WebhookEvent};
use super::AppState;
use crate::auth::Principal;
use crate::engine::input::ResizeMode;
use crate::jobs::params::EditKind;
use crate::jobs::{Idempotency, JobParams, JobRequest, Priority, Submitted};

/// An edit request. As JSON, `image` and `mask` are base64 or `data:` URLs; as multipart, they are files and
/// every other field is a form value.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditImageRequest {
    /// `img2img`, `inpaint`, `outpaint` or `instruct` (see each model's `capabilities`).
    pub mode: EditKind,
    /// The picture to edit: PNG, JPEG or WebP.
    #[schema(format = Byte)]
    pub image: Option<String>,
    /// `inpaint`: white = repaint, black = keep; or a PNG whose transparent pixels mark the region. Must
    /// have the image's size. Without a mask, the image's own transparent pixels are the region. The text
    /// `auto` computes the mask with DiffEdit from `source_prompt` and `prompt` (returned as the job's `mask`).
    #[schema(format = Byte)]
    pub mask: Option<String>,
    /// DiffEdit (`mask: "auto"`, mode `inpaint`; required there, refused elsewhere): what the picture shows.
    /// The mask marks where the model's noise predictions under it and under `prompt` differ.
    pub source_prompt: Option<String>,
    /// DiffEdit: how far into the schedule the picture is noised to compare the predictions, in (0, 1]
    /// (default 0.5).
    #[schema(minimum = 0, maximum = 1)]
    pub mask_encode_strength: Option<f32>,
    /// DiffEdit: noise draws averaged, 1–32 (default 10); each is one denoiser call, counted as a step.
    #[schema(minimum = 1, maximum = 32)]
    pub mask_samples: Option<u32>,
    /// DiffEdit: a latent cell is repainted where its difference exceeds `mask_threshold / 2` times the
    /// mean difference (diffusers' `mask_thresholding_ratio`; default 3, above 0).
    #[schema(exclusive_minimum = 0)]
    pub mask_threshold: Option<f32>,
    /// What the result should show (`instruct`: the instruction).
    pub prompt: String,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// Model id; default: the first configured model that can do `mode`.
    pub model: Option<String>,
    /// `http`/`https` URL told of this job's end by a signed `POST` (see `POST /v1/images`).
    #[schema(max_length = 2048)]
    pub webhook_url: Option<String>,
    /// Events sent to the webhook besides the terminal one: `["started"]` (in a form: `started`, or one
    /// `webhook_events` part per event).
    pub webhook_events: Option<Vec<WebhookEvent>>,
    /// In (0, 1]: how much of the picture is redrawn (default 0.75 for img2img, 1.0 for inpaint/outpaint).
    #[schema(minimum = 0, maximum = 1)]
    pub strength: Option<f32>,
    /// `instruct`: how closely to keep the input picture (default 1.5).
    #[schema(minimum = 1, maximum = 20)]
    pub image_guidance_scale: Option<f32>,
    /// Inpainting with plain models: feathering of the blend back into the original, in pixels (default 4).
    #[schema(maximum = 64)]
    pub mask_blur: Option<u32>,
    /// Target width; default: the input width rounded to the model's `size_multiple`.
    pub width: Option<u32>,
    /// Target height; default: the input height rounded to the model's `size_multiple`.
    pub height: Option<u32>,
    /// How the input reaches the target size: `crop` (default), `fit` or `stretch`.
    pub resize_mode: Option<ResizeModeParam>,
    /// `outpaint`: pixels to add on the left (multiple of 8).
    pub left: Option<u32>,
    /// `outpaint`: pixels to add on the right (multiple of 8).
    pub right: Option<u32>,
    /// `outpaint`: pixels to add at the top (multiple of 8).
    pub top: Option<u32>,
    /// `outpaint`: pixels to add at the bottom (multiple of 8).
    pub bottom: Option<u32>,
    /// Denoising steps (default 20; img2img runs `strength` of them).
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (default 7.5).
    pub guidance_scale: Option<f32>,
    /// Guidance rescale in [0, 1].
    pub guidance_rescale: Option<f32>,
    /// Scheduler name or alias.
    pub scheduler: Option<String>,
    /// Seed of the first image.
    pub seed: Option<u64>,
    /// Images in this job (default 1).
    pub n: Option<u32>,
    /// `png` (default), `jpeg` or `webp`.
    pub output_format: Option<ImageFormat>,
    /// JPEG quality, 1–100.
    pub output_quality: Option<u8>,
    /// Steps between previews (0 = none).
    pub preview_every: Option<u32>,
    /// `approx` or `vae`.
    pub preview: Option<PreviewKind>,
    /// Base64 `.npy` float32 `[n, C, height/f, width/f]` unit-Gaussian noise instead of seeded noise (`C`
    /// latent channels and `f` the VAE factor: 4 and 8 for Stable Diffusion).
    pub latents: Option<String>,
    /// `low`, `normal` (default) or `high` (admin keys only).
    pub priority: Option<Priority>,
}

/// How an input picture reaches the target size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResizeModeParam {
    /// Scale to cover, cut the overflow from the centre.
    Crop,
    /// Scale to fit inside, extend the edges.
    Fit,
    /// Scale each axis independently.
    Stretch,
}

impl From<ResizeModeParam> for ResizeMode {
    fn from(m: ResizeModeParam) -> Self {
        match m {
            ResizeModeParam::Crop => ResizeMode::Crop,
            ResizeModeParam::Fit => ResizeMode::Fit,
            ResizeModeParam::Stretch => ResizeMode::Stretch,
        }
    }
}

/// The multipart form, for the OpenAPI document.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct EditImageForm {
    /// The picture to edit.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// The mask (see the JSON form); the text `auto` for a DiffEdit mask.
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Vec<u8>>,
    /// Edit mode.
    mode: EditKind,
    /// Prompt or instruction.
    prompt: String,
    /// Every other field of the JSON form, as a form value.
    #[schema(value_type = Option<String>)]
    other_fields: Option<String>,
}

/// Submit an edit job.
#[utoipa::path(
    post,
    path = "/v1/edits",
    tag = "images",
    request_body(content(
        (EditImageRequest = "application/json"),
        (EditImageForm = "multipart/form-data"),
    )),
    responses(
        (status = 202, description = "Job accepted and stored", body = JobResponse,
         headers(("Location" = String, description = "URL of the job"))),
        (status = 400, description = "Malformed JSON or multipart body", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "A field is invalid (corrupt or oversized image, mask of the wrong size, a mode \
         the model cannot do, …); `error.field` names it", body = ErrorBody),
        (status = 403, description = "`priority: high` without an admin key", body = ErrorBody),
        (status = 429, description = "The queue is full (see `Retry-After`), this key has `limits.max_outstanding_per_key` jobs queued or running, keeps `limits.max_stored_bytes_per_key` of images and uploads (`storage_quota_exceeded`), made its `rate_per_minute` submissions (`rate_limited`) or used its `daily_image_steps` (`compute_quota_exceeded`); see `Retry-After` and `RateLimit-*`", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"), ("RateLimit-Limit" = u32, description = "Submissions per minute (rate limits)"), ("RateLimit-Remaining" = u32, description = "Submissions left now"), ("RateLimit-Reset" = u64, description = "Seconds until the limit is whole again"))),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat of the same request within 24 h returns the same job; the key with a different request or route is a 422")),
)]
pub async fn create_edit_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = super::submit::idempotency_key(request.headers())?;
    let (fields, image, mask) = read_body(&state, request).await?;
    let submitted = submit_edit(&state, &who, fields, image, mask, key, "/v1/edits").await?;
    super::submit::accepted(&state, submitted).await
}

/// Validates an edit (off the async runtime: it decodes pictures) and submits it with its prepared
/// pictures (the native and the OpenAI route); an `Idempotency-Key` is bound to `route` and the request.
pub async fn submit_edit(
    state: &AppState,
    who: &Principal,
    fields: EditImageRequest,
    image: Vec<u8>,
    mask: Option<Vec<u8>>,
    key: Option<String>,
    route: &str,
) -> Result<Submitted, ApiError> {
    let idempotency = match key {
        Some(key) => {
            let fields = serde_json::to_vec(&fields).map_err(ApiError::internal)?;
            let mask = mask.as_deref().unwrap_or_default();
            Some(Idempotency::new(key, route, &[&fields, &image, mask]))
        }
        None => None,
    };
    let priority = super::submit::priority(who, fields.priority)?;
    let (url, events) = (fields.webhook_url.clone(), fields.webhook_events.clone());
    let (models, limits) = (state.models.clone(), state.limits.clone());
    let prepared =
        tokio::task::spawn_blocking(move || validation::edit(&models, &limits, fields, &image, mask.as_deref()))
            .await
            .map_err(ApiError::internal)??;
    let webhook = job_webhook(state, who, url.as_deref(), events.as_deref()).await?;
    let request = JobRequest {
        model: prepared.model,
        params: JobParams::Edit(prepared.params),
        inputs: Some(prepared.inputs),
        priority,
        webhook,
    };
    Ok(state.jobs.submit(who, request, idempotency.as_ref()).await?)
}

/// Reads the body as JSON or multipart into the fields and the raw image and mask bytes.
async fn read_body(
    state: &AppState,
    request: Request,
) -> Result<(EditImageRequest, Vec<u8>, Option<Vec<u8>>), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let form = super::form::read_form(request, state).await?;
        let mut fields: EditImageRequest = parse_json(&serde_json::to_vec(&form.values).map_err(ApiError::internal)?)?;
        let image = form.image.ok_or_else(|| ApiError::field("image", "image is required"))?;
        let mask = match form.mask {
            Some(bytes) if bytes.trim_ascii() == AUTO_MASK.as_bytes() => {
                fields.mask = Some(AUTO_MASK.into());
                None
            }
            other => other,
        };
        return Ok((fields, image, mask));
    }
    if !content_type.starts_with("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let mut fields: EditImageRequest = super::error::read_json(request, state).await?;
    let image = match fields.image.take() {
        Some(text) => decode_base64("image", &text)?,
        None => return Err(ApiError::field("image", "image is required")),
    };
    let mask = match fields.mask.take() {
        Some(text) if text.trim() == AUTO_MASK => {
            fields.mask = Some(AUTO_MASK.into());
            None
        }
        other => other.map(|text| decode_base64("mask", &text)).transpose()?,
    };
    Ok((fields, image, mask))
}

/// The `data:` URL media types a picture may declare.
const DATA_URL_TYPES: &[&str] = &["image/png", "image/jpeg", "image/webp"];

/// Base64, or a `data:image/png|jpeg|webp;base64,` URL (any other declared type, or a URL that is not
/// base64, is refused: the declared type is part of what the client said).
pub(super) fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.trim().strip_prefix("data:") {
        Some(rest) => {
            let (header, data) = rest.split_once(',').ok_or_else(|| ApiError::field(field, "malformed data URL"))?;
            let media_type = header.strip_suffix(";base64").ok_or_else(|| {
                ApiError::field(field, format!("{field} must be a base64 data URL (`data:image/png;base64,…`)"))
            })?;
            if !DATA_URL_TYPES.contains(&media_type.to_ascii_lowercase().as_str()) {
                return Err(ApiError::field(
                    field,
                    format!("{field} declares `{media_type}`; one of {} is needed", DATA_URL_TYPES.join(", ")),
                ));
            }
            data
        }
        None => text.trim(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| ApiError::field(field, format!("{field} is not valid base64: {e}")))
}
