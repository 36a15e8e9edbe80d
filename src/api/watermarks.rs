//! Tree-Ring watermarks over HTTP: which watermark a text-to-image job gets (`watermark` on
//! `POST /v1/images`), and `POST /v1/watermarks/detect`, answered synchronously by the detector thread
//! within `[watermark] detect_timeout_seconds` (see [`crate::watermark::detector`] for why it is not a job).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{parse_json, ApiError, ErrorBody};
use super::validation::{self, carries_watermark};
use super::AppState;
use crate::auth::{KeyWatermark, Principal};
use crate::jobs::params::WatermarkParams;
use crate::watermark::{DetectError, Detection, WatermarkState, SERVER_KEY};

/// A detection request. As JSON, `image` is base64 or a `data:` URL; as multipart, a file, and the other
/// fields are form values.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectWatermarkRequest {
    /// The picture to check: PNG, JPEG or WebP. Sides that are not multiples of the model's `size_multiple`
    /// are stretched to the model's native size.
    #[serde(default)]
    #[schema(format = Byte)]
    pub image: Option<String>,
    /// The model that made the picture (its latent space is where the watermark lives); default: the first
    /// configured model.
    #[serde(default)]
    pub model: Option<String>,
    /// DDIM inversion steps (default `[watermark] inversion_steps`); more is slower and reads the rings
    /// back more exactly.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 150)]
    pub inversion_steps: Option<u32>,
}

/// The multipart form, for the OpenAPI document.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct DetectWatermarkForm {
    /// The picture to check.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// Model id.
    #[schema(value_type = Option<String>)]
    model: Option<String>,
    /// DDIM inversion steps.
    #[schema(value_type = Option<u32>)]
    inversion_steps: Option<u32>,
}

/// One key's result.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyDetection {
    /// The API key id, or `server` for the server's own watermark.
    pub key: String,
    /// The key's name (`server` for the server's).
    pub name: String,
    /// Mean |y − κ| over the ring coefficients of the inverted noise, in units of a white-noise coefficient:
    /// about 1.4 for a picture without this watermark, well below for one with it.
    pub distance: f64,
    /// The probability of a distance statistic this small for a picture without this watermark (the paper's
    /// noncentral chi-square test).
    pub p_value: f64,
    /// `p_value < threshold`.
    pub detected: bool,
}

/// What a detection found.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DetectWatermarkResponse {
    /// The model whose latent space was read.
    pub model: String,
    /// DDIM inversion steps run.
    pub inversion_steps: u32,
    /// The p-value below which a key counts as detected (`[watermark] p_value_threshold`): the false-positive
    /// rate per key tested.
    pub threshold: f64,
    /// Whether any tested key was detected.
    pub watermarked: bool,
    /// Among the detected keys, the one whose pattern is closest (smallest `distance`): whose watermark the
    /// picture most likely carries. Ring patterns of different keys are not orthogonal (a 16×16 latent has
    /// room for a few rings only), so a strong watermark can push other keys below the threshold too.
    pub closest: Option<String>,
    /// One entry per key the caller may test: its own key; every key for admin keys (and without
    /// authentication); and the server's watermark when one is configured. Empty when none has a watermark.
    pub keys: Vec<KeyDetection>,
}

/// Check a picture for the watermarks the caller may test.
#[utoipa::path(
    post,
    path = "/v1/watermarks/detect",
    tag = "watermarks",
    request_body(content(
        (DetectWatermarkRequest = "application/json"),
        (DetectWatermarkForm = "multipart/form-data"),
    )),
    responses(
        (status = 200, description = "Each testable key's distance, p-value and verdict", body = DetectWatermarkResponse),
        (status = 400, description = "Malformed JSON or multipart body", body = ErrorBody),
        (status = 413, description = "Body over the size limit", body = ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = ErrorBody),
        (status = 422, description = "A field is invalid (corrupt or oversized image, unknown model or one that \
         cannot be inverted, inversion_steps out of range); `error.field` names it", body = ErrorBody),
        (status = 503, description = "This process runs no models (role `api`), the detector is busy (see \
         `Retry-After`), or the detection did not finish within `[watermark] detect_timeout_seconds`", body = ErrorBody,
         headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ),
)]
pub async fn detect_watermark(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    request: Request,
) -> Result<Json<DetectWatermarkResponse>, ApiError> {
    let (fields, image) = read_body(&state, request).await?;
    let (models, limits, config) = (state.models.clone(), state.limits.clone(), state.watermark.config.clone());
    let prepared =
        tokio::task::spawn_blocking(move || validation::detection(&models, &limits, &config, &fields, &image))
            .await
            .map_err(ApiError::internal)??;
    let detector = state.watermark.detector.clone().ok_or_else(|| {
        ApiError::Unavailable("this process runs no models (role `api`); send detections to one that does".into())
    })?;
    let testable = testable_keys(&state, &who).await?;
    let threshold = state.watermark.config.p_value_threshold;
    let detection = Detection {
        model: prepared.model.clone(),
        image: prepared.image,
        steps: prepared.steps as usize,
        keys: testable.iter().map(|(_, _, secret)| state.watermark.ring_key(secret)).collect(),
    };
    let scores = if detection.keys.is_empty() {
        Vec::new()
    } else {
        let timeout = Duration::from_secs(state.watermark.config.detect_timeout_seconds);
        detector.detect(detection, timeout).await.map_err(detect_error)?
    };
    let keys: Vec<KeyDetection> = testable
        .into_iter()
        .zip(scores)
        .map(|((key, name, _), score)| KeyDetection {
            key,
            name,
            distance: score.distance,
            p_value: score.p_value,
            detected: score.p_value < threshold,
        })
        .collect();
    let closest =
        keys.iter().filter(|k| k.detected).min_by(|a, b| a.distance.total_cmp(&b.distance)).map(|k| k.key.clone());
    Ok(Json(DetectWatermarkResponse {
        model: prepared.model,
        inversion_steps: prepared.steps,
        threshold,
        watermarked: closest.is_some(),
        closest,
        keys,
    }))
}

/// `(id, name, secret)` of every watermark `who` may test: their own key's; every key's for admins (and
/// without authentication); the server's when configured.
async fn testable_keys(state: &AppState, who: &Principal) -> Result<Vec<(String, String, String)>, ApiError> {
    let scope = match (&who.key_id, who.admin) {
        (_, true) => None,
        (Some(id), false) => Some(id.as_str()),
        (None, false) => return Ok(server_key(state).into_iter().collect()),
    };
    let keys = state.auth.keys.watermark_secrets(scope).await.map_err(ApiError::internal)?;
    let mut testable: Vec<_> = keys.into_iter().map(|k| (k.id, k.name, k.secret)).collect();
    testable.extend(server_key(state));
    Ok(testable)
}

fn server_key(state: &AppState) -> Option<(String, String, String)> {
    let secret = state.watermark.config.secret.clone()?;
    Some((SERVER_KEY.to_string(), SERVER_KEY.to_string(), secret))
}

fn detect_error(e: DetectError) -> ApiError {
    match e {
        DetectError::Busy(_) => ApiError::Busy(e.to_string()),
        DetectError::TimedOut(_) | DetectError::Gone => ApiError::Unavailable(e.to_string()),
        DetectError::Engine(engine) => ApiError::internal(engine),
    }
}

/// Reads the body as JSON or multipart into the fields and the image bytes.
async fn read_body(state: &AppState, request: Request) -> Result<(DetectWatermarkRequest, Vec<u8>), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let form = super::form::read_form(request, state).await?;
        if form.mask.is_some() {
            return Err(ApiError::field("mask", "a detection takes no mask"));
        }
        let fields: DetectWatermarkRequest =
            parse_json(&serde_json::to_vec(&form.values).map_err(ApiError::internal)?)?;
        let image = form.image.ok_or_else(|| ApiError::field("image", "image is required"))?;
        return Ok((fields, image));
    }
    if !content_type.starts_with("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let mut fields: DetectWatermarkRequest = super::error::read_json(request, state).await?;
    let image = match fields.image.take() {
        Some(text) => super::edits::decode_base64("image", &text)?,
        None => return Err(ApiError::field("image", "image is required")),
    };
    Ok((fields, image))
}

/// The watermark of a text-to-image job by `who`, for `asked` (the request's `watermark`; see [`choose`]). A
/// default watermark that the model or size cannot carry is left out; one asked for is a `422` naming
/// `watermark`.
pub async fn job_watermark(
    state: &AppState,
    who: &Principal,
    asked: Option<bool>,
    model: &str,
    (width, height): (u32, u32),
) -> Result<Option<WatermarkParams>, ApiError> {
    if asked == Some(false) {
        return Ok(None);
    }
    let own = match &who.key_id {
        Some(id) => state.auth.keys.watermark(id).await.map_err(ApiError::internal)?.map(|w| (id.as_str(), w)),
        None => None,
    };
    let Some(chosen) = choose(&state.watermark, asked, own)? else { return Ok(None) };
    let served = state.models.get(model).ok_or_else(|| ApiError::internal("validated model is gone"))?;
    match carries_watermark(served, width, height, state.watermark.spec()) {
        Ok(()) => Ok(Some(chosen)),
        Err(message) if asked == Some(true) => Err(ApiError::field("watermark", format!("watermark: {message}"))),
        Err(_) => Ok(None),
    }
}

/// Whose watermark a job gets: `asked = false` none; `true` the caller's key's own (`own`: its id and
/// watermark, made with `keys create --watermark`), else the server's, else a `422`; absent, the key's when
/// it is on, else the server's when `[watermark] default_on`.
fn choose(
    settings: &WatermarkState,
    asked: Option<bool>,
    own: Option<(&str, KeyWatermark)>,
) -> Result<Option<WatermarkParams>, ApiError> {
    Ok(match (asked, own) {
        (Some(false), _) => None,
        (Some(true), Some((id, own))) => Some(settings.params(id, &own.secret)),
        (Some(true), None) => Some(settings.server().ok_or_else(|| {
            ApiError::field(
                "watermark",
                "no watermark is configured for this key (`denoised keys update NAME --watermark on`) or the server \
                 (`[watermark] secret`)",
            )
        })?),
        (None, Some((id, own))) if own.on => Some(settings.params(id, &own.secret)),
        (None, _) if settings.config.default_on => settings.server(),
        (None, _) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatermarkConfig;

    fn settings(secret: Option<&str>, default_on: bool) -> WatermarkState {
        let config = WatermarkConfig { secret: secret.map(str::to_string), default_on, ..WatermarkConfig::default() };
        WatermarkState { config, detector: None }
    }

    fn key(on: bool) -> Option<(&'static str, KeyWatermark)> {
        Some(("a1b2c3d4e5f6", KeyWatermark { secret: "key-secret".into(), on }))
    }

    #[test]
    fn whose_watermark_a_job_gets() {
        let server = Some("server-secret-0123456789");
        let whose = |settings: &WatermarkState, asked, own| {
            choose(settings, asked, own).map(|chosen| chosen.map(|p| (p.key, p.secret)))
        };
        let mine = Some(("a1b2c3d4e5f6".to_string(), "key-secret".to_string()));
        let servers = Some(("server".to_string(), "server-secret-0123456789".to_string()));
        let cases = [
            // (server secret, default_on, asked, the key's watermark) → whose
            ((server, true), Some(false), key(true), None),
            ((server, false), Some(true), key(false), mine.clone()),
            ((server, false), Some(true), None, servers.clone()),
            ((server, false), None, key(true), mine.clone()),
            ((server, false), None, key(false), None),
            ((server, true), None, key(false), servers.clone()),
            ((server, true), None, None, servers.clone()),
            ((None, true), None, None, None),
            ((None, false), None, None, None),
        ];
        for ((secret, default_on), asked, own, expected) in cases {
            let chosen = whose(&settings(secret, default_on), asked, own.clone());
            assert_eq!(chosen.unwrap(), expected, "{secret:?} {default_on} {asked:?} {own:?}");
        }
        let refused = choose(&settings(None, false), Some(true), None).unwrap_err();
        assert!(matches!(refused, ApiError::InvalidField { ref field, .. } if field == "watermark"), "{refused:?}");
    }
}
