//! `POST /v1/edits`: img2img, inpainting, outpainting and instruction edits, as JSON (images as base64 or
//! data URLs) or `multipart/form-data` (files `image` and `mask`, other fields as form values).
//!
//! Everything that can be checked is checked here — decoding under limits, mask size, the model's modes,
//! sizes — so a bad upload is a 4xx naming the field, never an accepted job that fails later. The prepared
//! picture and mask are stored beside the job, so a retried job edits exactly the same pixels.

use std::io::Cursor;

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use image::{DynamicImage, GenericImageView, GrayImage, RgbImage};
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{parse_json, ApiError, ErrorBody};
use super::images::{validate, GenerateImageRequest, ImageFormat, PreviewKind};
use super::jobs::{job_response, JobResponse};
use super::AppState;
use crate::auth::Principal;
use crate::engine::input::{self, InputImageError, ResizeMode};
use crate::engine::model::Capability;
use crate::engine::pipeline::outpaint_canvas;
use crate::jobs::params::{EditParams, KIND_EDIT};

/// Edit modes clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EditModeParam {
    /// SDEdit: keep the composition, redraw per the prompt.
    Img2img,
    /// Repaint the masked region.
    Inpaint,
    /// Extend the canvas by `left`/`right`/`top`/`bottom` pixels.
    Outpaint,
    /// InstructPix2Pix: the prompt is an instruction.
    Instruct,
}

impl EditModeParam {
    fn capability(self) -> Capability {
        match self {
            EditModeParam::Img2img => Capability::Img2img,
            EditModeParam::Inpaint => Capability::Inpaint,
            EditModeParam::Outpaint => Capability::Outpaint,
            EditModeParam::Instruct => Capability::Instruct,
        }
    }

    fn name(self) -> &'static str {
        match self {
            EditModeParam::Img2img => "img2img",
            EditModeParam::Inpaint => "inpaint",
            EditModeParam::Outpaint => "outpaint",
            EditModeParam::Instruct => "instruct",
        }
    }
}

/// An edit request. As JSON, `image` and `mask` are base64 or `data:` URLs; as multipart, they are files and
/// every other field is a form value.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditImageRequest {
    /// `img2img`, `inpaint`, `outpaint` or `instruct` (see each model's `capabilities`).
    pub mode: EditModeParam,
    /// The picture to edit: PNG, JPEG or WebP.
    #[schema(format = Byte)]
    pub image: Option<String>,
    /// `inpaint`: white = repaint, black = keep; or a PNG whose transparent pixels mark the region. Must
    /// have the image's size. Without a mask, the image's own transparent pixels are the region.
    #[schema(format = Byte)]
    pub mask: Option<String>,
    /// What the result should show (`instruct`: the instruction).
    pub prompt: String,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// Model id; default: the first configured model that can do `mode`.
    pub model: Option<String>,
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
    /// Base64 `.npy` float32 `[n, 4, height/8, width/8]` unit-Gaussian noise instead of seeded noise.
    pub latents: Option<String>,
}

/// How an input picture reaches the target size.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
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
    /// The mask (see the JSON form).
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Vec<u8>>,
    /// Edit mode.
    mode: EditModeParam,
    /// Prompt or instruction.
    prompt: String,
    /// Every other field of the JSON form, as a form value.
    #[schema(value_type = Option<String>)]
    other_fields: Option<String>,
}

/// Fields whose multipart text is a number or boolean in the JSON form.
const NUMERIC_FIELDS: &[&str] = &[
    "strength",
    "image_guidance_scale",
    "mask_blur",
    "width",
    "height",
    "left",
    "right",
    "top",
    "bottom",
    "steps",
    "guidance_scale",
    "guidance_rescale",
    "seed",
    "n",
    "preview_every",
    "output_quality",
];

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
        (status = 429, description = "The queue is full (see `Retry-After`), or this key has `limits.max_outstanding_per_key` jobs queued or running", body = ErrorBody),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat within 24 h returns the same job")),
)]
pub async fn create_edit_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = super::submit::idempotency_key(request.headers())?;
    let (fields, image, mask) = read_body(&state, request).await?;
    let submitted = submit_edit(&state, &who, fields, image, mask, key.as_deref()).await?;
    let replayed = !submitted.created;
    let job = submitted.job;
    let location = format!("/v1/jobs/{}", job.id);
    let body = job_response(&state, job, Vec::new()).await?;
    let mut response =
        (StatusCode::ACCEPTED, [(header::LOCATION, location)], super::error::AppJson(body)).into_response();
    if replayed {
        response.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Validates an edit, stores its prepared picture and mask, and enqueues it.
pub async fn submit_edit(
    state: &AppState,
    who: &Principal,
    fields: EditImageRequest,
    image: Vec<u8>,
    mask: Option<Vec<u8>>,
    key: Option<&str>,
) -> Result<super::submit::Submitted, ApiError> {
    let limits = state.limits.clone();
    let prepared = tokio::task::spawn_blocking({
        let state = state.clone();
        move || prepare(&state, fields, &image, mask.as_deref(), &limits)
    })
    .await
    .map_err(ApiError::internal)??;
    let inputs = state.files.clone();
    let folder = uuid::Uuid::new_v4();
    let Prepared { model, mut params, image_png, mask_png } = prepared;
    let (image_path, mask_path) = tokio::task::spawn_blocking(move || -> std::io::Result<(String, Option<String>)> {
        let image_path = inputs.write_input(folder, "image.png", &image_png)?;
        let mask_path = mask_png.map(|m| inputs.write_input(folder, "mask.png", &m)).transpose()?;
        Ok((image_path, mask_path))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::internal(format!("storing the input image: {e}")))?;
    params.image_path = image_path;
    params.mask_path = mask_path;
    let params_json = serde_json::to_value(&params).map_err(ApiError::internal)?;
    match super::submit::enqueue(state, who, KIND_EDIT, model, params_json, key).await {
        Ok(submitted) => {
            if !submitted.created {
                // A replay: the first request's job keeps its own stored inputs.
                let _ = state.files.remove_input(folder);
            }
            Ok(submitted)
        }
        Err(e) => {
            let _ = state.files.remove_input(folder);
            Err(e)
        }
    }
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
        let limit = state.max_body_bytes;
        let multipart =
            Multipart::from_request(request, state).await.map_err(|e| ApiError::MalformedJson(e.body_text()))?;
        return read_multipart(multipart, limit).await;
    }
    if !content_type.starts_with("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let mut fields: EditImageRequest = super::error::read_json(request, state).await?;
    let image = match fields.image.take() {
        Some(text) => decode_base64("image", &text)?,
        None => return Err(ApiError::field("image", "image is required")),
    };
    let mask = fields.mask.take().map(|text| decode_base64("mask", &text)).transpose()?;
    Ok((fields, image, mask))
}

async fn read_multipart(
    mut multipart: Multipart,
    limit: usize,
) -> Result<(EditImageRequest, Vec<u8>, Option<Vec<u8>>), ApiError> {
    let mut values = serde_json::Map::new();
    let mut image = None;
    let mut mask = None;
    let too_large = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit }
        } else {
            ApiError::MalformedJson(format!("malformed multipart body: {}", e.body_text()))
        }
    };
    while let Some(field) = multipart.next_field().await.map_err(too_large)? {
        let name = field.name().unwrap_or_default().trim_end_matches("[]").to_string();
        match name.as_str() {
            "image" => image = Some(field.bytes().await.map_err(too_large)?.to_vec()),
            "mask" => mask = Some(field.bytes().await.map_err(too_large)?.to_vec()),
            "" => return Err(ApiError::MalformedJson("a multipart field has no name".into())),
            _ => {
                let text = field.text().await.map_err(too_large)?;
                let value = form_value(&name, text);
                values.insert(name, value);
            }
        }
    }
    let fields: EditImageRequest = parse_json(&serde_json::to_vec(&values).map_err(ApiError::internal)?)?;
    let image = image.ok_or_else(|| ApiError::field("image", "image is required"))?;
    Ok((fields, image, mask))
}

/// A multipart text value as its JSON-form equivalent: numbers for numeric fields (when they parse; else
/// left as text so the field error names them), text otherwise.
pub fn form_value(name: &str, text: String) -> serde_json::Value {
    if NUMERIC_FIELDS.contains(&name) {
        if let Some(number) =
            serde_json::from_str::<serde_json::Value>(text.trim()).ok().filter(serde_json::Value::is_number)
        {
            return number;
        }
    }
    serde_json::Value::String(text)
}

/// Base64 or a `data:image/…;base64,` URL.
fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.trim().strip_prefix("data:") {
        Some(rest) => {
            rest.split_once(',').map(|(_, data)| data).ok_or_else(|| ApiError::field(field, "malformed data URL"))?
        }
        None => text.trim(),
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|e| ApiError::field(field, format!("{field} is not valid base64: {e}")))
}

struct Prepared {
    model: String,
    params: EditParams,
    image_png: Vec<u8>,
    mask_png: Option<Vec<u8>>,
}

fn image_error(field: &str, e: InputImageError) -> ApiError {
    ApiError::field(field, format!("{field}: {e}"))
}

fn png(image: &DynamicImage) -> Result<Vec<u8>, ApiError> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).map_err(ApiError::internal)?;
    Ok(out.into_inner())
}

/// Decodes, checks and fits the pictures, and resolves every parameter.
fn prepare(
    state: &AppState,
    fields: EditImageRequest,
    image_bytes: &[u8],
    mask_bytes: Option<&[u8]>,
    limits: &crate::config::LimitsConfig,
) -> Result<Prepared, ApiError> {
    let mode = fields.mode;
    let served = match &fields.model {
        Some(name) => state.models.get(name).ok_or_else(|| {
            ApiError::field("model", format!("unknown model `{name}`; available: {}", state.models.names()))
        })?,
        None => state
            .models
            .all()
            .iter()
            .find(|m| m.info.capabilities.contains(&mode.capability()))
            .or_else(|| state.models.default_model())
            .ok_or_else(|| ApiError::internal("no model configured"))?,
    };
    if !served.info.capabilities.contains(&mode.capability()) {
        let able: Vec<&str> = state
            .models
            .all()
            .iter()
            .filter(|m| m.info.capabilities.contains(&mode.capability()))
            .map(|m| m.name.as_str())
            .collect();
        let which = if able.is_empty() {
            "no configured model can".to_string()
        } else {
            format!("models that can: {}", able.join(", "))
        };
        return Err(ApiError::field("mode", format!("model `{}` cannot do `{}`; {which}", served.name, mode.name())));
    }
    let info = &served.info;
    let multiple = info.size_multiple;

    let decoded = input::decode(image_bytes, limits.max_input_side, limits.max_input_pixels)
        .map_err(|e| image_error("image", e))?;
    let mut mask = match mask_bytes {
        Some(bytes) => {
            if !matches!(mode, EditModeParam::Inpaint) {
                return Err(ApiError::field(
                    "mask",
                    format!("mask is only used by mode `inpaint`, not `{}`", mode.name()),
                ));
            }
            let mask = input::decode(bytes, limits.max_input_side, limits.max_input_pixels)
                .map_err(|e| image_error("mask", e))?;
            if mask.dimensions() != decoded.dimensions() {
                return Err(ApiError::field(
                    "mask",
                    format!(
                        "mask is {}x{} but the image is {}x{}; they must be the same size",
                        mask.width(),
                        mask.height(),
                        decoded.width(),
                        decoded.height()
                    ),
                ));
            }
            Some(input::mask_from(&mask))
        }
        None if matches!(mode, EditModeParam::Inpaint) => {
            if input::has_transparency(&decoded) {
                Some(input::mask_from(&decoded))
            } else {
                return Err(ApiError::field(
                    "mask",
                    "inpaint needs a mask (or an image with transparent pixels to repaint)",
                ));
            }
        }
        None => None,
    };
    let rgb: RgbImage = decoded.to_rgb8();
    let width = fields.width.unwrap_or_else(|| input::round_to_multiple(rgb.width(), multiple));
    let height = fields.height.unwrap_or_else(|| input::round_to_multiple(rgb.height(), multiple));
    for (name, value) in [("width", width), ("height", height)] {
        if value == 0 || value % multiple != 0 || value > limits.max_side {
            return Err(ApiError::field(
                name,
                format!("{name} must be a multiple of {multiple} up to {}", limits.max_side),
            ));
        }
    }
    let resize = fields.resize_mode.map(ResizeMode::from).unwrap_or_default();
    let mut picture = input::fit_rgb(&rgb, width, height, resize);
    mask = mask.map(|m| input::fit_mask(&m, width, height, resize));

    let margins = [("left", fields.left), ("right", fields.right), ("top", fields.top), ("bottom", fields.bottom)];
    if matches!(mode, EditModeParam::Outpaint) {
        for (name, value) in margins {
            if value.unwrap_or(0) % 8 != 0 || value.unwrap_or(0) > limits.max_side {
                return Err(ApiError::field(name, format!("{name} must be a multiple of 8")));
            }
        }
        let [l, r, t, b] = margins.map(|(_, v)| v.unwrap_or(0));
        if l + r + t + b == 0 {
            return Err(ApiError::field("left", "outpaint needs at least one of left, right, top, bottom"));
        }
        let (cw, ch) = (width + l + r, height + t + b);
        if cw % multiple != 0 || cw > limits.max_side {
            return Err(ApiError::field(
                if l > 0 { "left" } else { "right" },
                format!("the canvas width {cw} must be a multiple of {multiple} up to {}", limits.max_side),
            ));
        }
        if ch % multiple != 0 || ch > limits.max_side {
            return Err(ApiError::field(
                if t > 0 { "top" } else { "bottom" },
                format!("the canvas height {ch} must be a multiple of {multiple} up to {}", limits.max_side),
            ));
        }
        let (canvas, canvas_mask) = outpaint_canvas(&picture, l, r, t, b);
        picture = canvas;
        mask = Some(canvas_mask);
    } else if let Some((name, _)) = margins.iter().find(|(_, v)| v.is_some()) {
        return Err(ApiError::field(*name, format!("{name} is only used by mode `outpaint`")));
    }
    if let Some(m) = &mask {
        if !m.pixels().any(|p| p[0] > 0) {
            return Err(ApiError::field("mask", "the mask marks nothing to repaint"));
        }
    }
    let strength = fields.strength.unwrap_or(if matches!(mode, EditModeParam::Img2img) { 0.75 } else { 1.0 });
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(ApiError::field("strength", "strength must be in (0, 1]"));
    }
    let image_guidance_scale = fields.image_guidance_scale.unwrap_or(1.5);
    if !image_guidance_scale.is_finite() || !(1.0..=20.0).contains(&image_guidance_scale) {
        return Err(ApiError::field("image_guidance_scale", "image_guidance_scale must be between 1 and 20"));
    }
    let mask_blur = fields.mask_blur.unwrap_or(4);
    if mask_blur > 64 {
        return Err(ApiError::field("mask_blur", "mask_blur must be at most 64"));
    }
    let generation = GenerateImageRequest {
        prompt: fields.prompt,
        negative_prompt: fields.negative_prompt,
        model: Some(served.name.clone()),
        width: Some(picture.width()),
        height: Some(picture.height()),
        steps: fields.steps,
        guidance_scale: fields.guidance_scale,
        guidance_rescale: fields.guidance_rescale,
        scheduler: fields.scheduler,
        seed: fields.seed,
        n: fields.n,
        output_format: fields.output_format,
        output_quality: fields.output_quality,
        preview_every: fields.preview_every,
        preview: fields.preview,
        latents: fields.latents,
    };
    let (model, generate) = validate(state, generation)?;
    let image_png = png(&DynamicImage::ImageRgb8(picture))?;
    let mask_png = mask.map(|m: GrayImage| png(&DynamicImage::ImageLuma8(m))).transpose()?;
    let params = EditParams {
        generate,
        mode: mode.name().to_string(),
        strength,
        image_guidance_scale,
        mask_blur,
        resize_mode: resize,
        image_path: String::new(),
        mask_path: None,
    };
    Ok(Prepared { model, params, image_png, mask_png })
}
