//! Text-to-image requests (and the generation fields every edit shares) into [`GenerateParams`].

use base64::Engine as _;

use super::{named_model, ValidationError};
use crate::api::images::GenerateImageRequest;
use crate::config::LimitsConfig;
use crate::engine::image::OutputFormat;
use crate::engine::model::ModelInfo;
use crate::engine::preview::PreviewMode;
use crate::engine::scheduler::{self, SchedulerError, SchedulerKind};
use crate::jobs::params::GenerateParams;
use crate::models::{ModelRegistry, ServedModel};

/// Default denoising steps when neither the request nor the model config names any.
pub const DEFAULT_STEPS: u32 = 20;
/// Default classifier-free guidance scale likewise.
pub const DEFAULT_GUIDANCE: f32 = 7.5;

/// Checks every field against the model and the limits, resolving every default (the seed too, so a retried
/// job makes the same pictures). Returns the model's id and the parameters.
pub fn generation(
    models: &ModelRegistry,
    limits: &LimitsConfig,
    request: GenerateImageRequest,
) -> Result<(String, GenerateParams), ValidationError> {
    prompt("prompt", &request.prompt, limits, true)?;
    let negative_prompt = request.negative_prompt.unwrap_or_default();
    prompt("negative_prompt", &negative_prompt, limits, false)?;
    let served = named_model(models, request.model.as_deref())?;
    let info = &served.info;
    let width = side("width", request.width.unwrap_or(info.native_size), info.size_multiple, limits)?;
    let height = side("height", request.height.unwrap_or(info.native_size), info.size_multiple, limits)?;
    let steps = request.steps.or(served.default_steps).unwrap_or(DEFAULT_STEPS);
    if steps == 0 || steps > limits.max_steps {
        return Err(ValidationError::field("steps", format!("steps must be between 1 and {}", limits.max_steps)));
    }
    let guidance_scale = request.guidance_scale.or(served.default_guidance_scale).unwrap_or(DEFAULT_GUIDANCE);
    in_range("guidance_scale", guidance_scale, 0.0, 50.0)?;
    let guidance_rescale = request.guidance_rescale.unwrap_or(0.0);
    in_range("guidance_rescale", guidance_rescale, 0.0, 1.0)?;
    let scheduler = scheduler(info, request.scheduler.as_deref(), steps, (width, height))?;
    let n = request.n.unwrap_or(1);
    if n == 0 || n > limits.max_images {
        return Err(ValidationError::field("n", format!("n must be between 1 and {}", limits.max_images)));
    }
    work(served, width, height, steps, n)?;
    if let Some(encoded) = &request.latents {
        let f = info.vae_scale_factor;
        let shape = [n as usize, info.latent_channels as usize, (height / f) as usize, (width / f) as usize];
        latents(encoded, &shape, f)?;
    }
    if request.output_quality.is_some_and(|q| q == 0 || q > 100) {
        return Err(ValidationError::field("output_quality", "output_quality must be between 1 and 100"));
    }
    let preview_every = request.preview_every.unwrap_or_else(|| steps.div_ceil(10));
    if preview_every > steps {
        return Err(ValidationError::field(
            "preview_every",
            format!("preview_every must be between 0 and steps ({steps})"),
        ));
    }
    let params = GenerateParams {
        prompt: request.prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        guidance_rescale,
        scheduler: scheduler.name().to_string(),
        seed: request.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
        n,
        output_format: request.output_format.map(OutputFormat::from).unwrap_or_default(),
        output_quality: request.output_quality,
        preview_every,
        preview: request.preview.map(PreviewMode::from).unwrap_or_default(),
        latents: request.latents,
        latents_path: None,
        watermark: None,
    };
    Ok((served.name.clone(), params))
}

/// A prompt: with at least one visible character when `required`, at most `limits.max_prompt_chars`
/// characters.
pub(super) fn prompt(
    field: &'static str,
    text: &str,
    limits: &LimitsConfig,
    required: bool,
) -> Result<(), ValidationError> {
    if required && !text.chars().any(visible) {
        return Err(ValidationError::field(field, format!("{field} must have visible characters")));
    }
    if text.chars().count() > limits.max_prompt_chars {
        return Err(ValidationError::field(
            field,
            format!("{field} is longer than {} characters", limits.max_prompt_chars),
        ));
    }
    Ok(())
}

/// Whether `c` shows: not white space, not a control character, and not one of Unicode's invisible format
/// characters (zero-width spaces and joiners, bidirectional marks, the word joiner, the byte-order mark, the
/// soft hyphen, …), which a prompt made only of would count as empty.
fn visible(c: char) -> bool {
    let invisible = matches!(
        c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}'
    );
    !(c.is_whitespace() || c.is_control() || invisible)
}

/// A picture side: a multiple of the model's `multiple`, from `multiple` up to `limits.max_side`.
pub(super) fn side(
    field: &'static str,
    value: u32,
    multiple: u32,
    limits: &LimitsConfig,
) -> Result<u32, ValidationError> {
    if value < multiple || value > limits.max_side {
        return Err(ValidationError::field(
            field,
            format!("{field} must be between {multiple} and {} pixels", limits.max_side),
        ));
    }
    if value % multiple != 0 {
        return Err(ValidationError::field(field, format!("{field} must be a multiple of {multiple} for this model")));
    }
    Ok(value)
}

/// The model's area and work limits: `width × height` at most `max_pixels`, `n × steps × width × height` at
/// most `max_pixel_steps` (each checked alone, the sides and counts could still multiply into hours of work
/// and gigabytes of memory).
fn work(served: &ServedModel, width: u32, height: u32, steps: u32, n: u32) -> Result<(), ValidationError> {
    let area = u64::from(width) * u64::from(height);
    if area > served.max_pixels {
        return Err(ValidationError::field(
            "width",
            format!(
                "width × height = {area} pixels is over model `{}`'s limit of {} (max_pixels)",
                served.name, served.max_pixels
            ),
        ));
    }
    let work = area * u64::from(steps) * u64::from(n);
    if work > served.max_pixel_steps {
        return Err(ValidationError::field(
            "steps",
            format!(
                "n × steps × width × height = {work} is over model `{}`'s work budget of {} per job \
                 (max_pixel_steps): ask for fewer images, steps or pixels",
                served.name, served.max_pixel_steps
            ),
        ));
    }
    Ok(())
}

/// A finite number in `[min, max]`.
pub(super) fn in_range(field: &'static str, value: f32, min: f32, max: f32) -> Result<(), ValidationError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::field(field, format!("{field} must be between {min} and {max}")))
    }
}

/// The scheduler a request names (or the model's own), built once for the picture's size (flow matching with
/// dynamic shifting needs the image sequence length) so that a step count or config value it cannot take is
/// a `422` now instead of a job that fails later.
fn scheduler(
    info: &ModelInfo,
    name: Option<&str>,
    steps: u32,
    (width, height): (u32, u32),
) -> Result<SchedulerKind, ValidationError> {
    let kind = match name.map(str::trim) {
        None | Some("") | Some("default") => info.default_scheduler,
        Some(name) => SchedulerKind::from_request_name(name).ok_or_else(|| {
            ValidationError::field(
                "scheduler",
                format!("unknown scheduler `{name}`; see GET /v1/schedulers for the names"),
            )
        })?,
    };
    // A model's default scheduler tells its parameterisation; the other family would run and produce noise.
    kind.check_model(info.default_scheduler.parameterization())
        .map_err(|e| ValidationError::field("scheduler", e.to_string()))?;
    let options = info.run_options(width, height);
    scheduler::build_with(kind, &info.scheduler_config, steps as usize, &options).map_err(|e| match e {
        SchedulerError::InvalidSteps { .. } => ValidationError::field("steps", e.to_string()),
        other => ValidationError::field("scheduler", format!("{} cannot run this model: {other}", kind.name())),
    })?;
    Ok(kind)
}

/// Client latents: base64 `.npy` float32 of exactly `shape`, all finite.
fn latents(encoded: &str, shape: &[usize; 4], factor: u32) -> Result<(), ValidationError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| ValidationError::field("latents", format!("latents is not valid base64: {e}")))?;
    let array =
        crate::engine::npy::read_f32(&bytes).map_err(|e| ValidationError::field("latents", format!("latents: {e}")))?;
    if array.shape() != shape {
        return Err(ValidationError::field(
            "latents",
            format!(
                "latents has shape {:?}; this request needs [n, C, height/{factor}, width/{factor}] = {shape:?}",
                array.shape()
            ),
        ));
    }
    if array.iter().any(|v| !v.is_finite()) {
        return Err(ValidationError::field("latents", "latents contains NaN or infinite values"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{limits, registry};
    use super::*;

    /// A request: `{"prompt": "a red fox"}` with `patch`'s fields set.
    fn request(patch: serde_json::Value) -> GenerateImageRequest {
        let mut json = serde_json::json!({"prompt": "a red fox"});
        for (key, value) in patch.as_object().expect("patch object") {
            json[key] = value.clone();
        }
        serde_json::from_value(json).expect("request")
    }

    fn npy(shape: &[usize], value: f32) -> String {
        let count: usize = shape.iter().product();
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", dims.join(", "));
        let header = format!("{header:<117}\n");
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.bytes());
        for _ in 0..count {
            bytes.extend(value.to_le_bytes());
        }
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn defaults_are_resolved() {
        let (model, params) = generation(&registry(), &limits(), request(json!({}))).unwrap();
        assert_eq!(model, "tiny-sd");
        assert_eq!((params.width, params.height, params.steps, params.n), (64, 64, DEFAULT_STEPS, 1));
        assert_eq!(params.guidance_scale, DEFAULT_GUIDANCE);
        assert_eq!(params.scheduler, "pndm", "the model's own scheduler");
        assert_eq!(params.preview_every, 2);
        assert_eq!(params.negative_prompt, "");
    }

    #[test]
    fn each_bad_field_is_named() {
        let limits = limits();
        let big = "x".repeat(limits.max_prompt_chars + 1);
        let cases = [
            ("prompt", json!({"prompt": " "})),
            ("prompt", json!({"prompt": "\u{200B}\u{200D}\u{FEFF} \u{2060}"})),
            ("prompt", json!({"prompt": big})),
            ("negative_prompt", json!({"negative_prompt": big})),
            ("model", json!({"model": "nope"})),
            ("width", json!({"width": 65})),
            ("width", json!({"width": 0})),
            ("height", json!({"height": 4096})),
            ("steps", json!({"steps": 0})),
            ("steps", json!({"steps": 151})),
            ("guidance_scale", json!({"guidance_scale": 51.0})),
            ("guidance_rescale", json!({"guidance_rescale": 1.5})),
            ("scheduler", json!({"scheduler": "warp"})),
            ("scheduler", json!({"scheduler": "flow_euler"})),
            ("n", json!({"n": 9})),
            ("width", json!({"width": 192, "height": 128})),
            ("steps", json!({"width": 128, "height": 128, "n": 8, "steps": 51})),
            ("output_quality", json!({"output_quality": 0})),
            ("preview_every", json!({"preview_every": 30})),
            ("latents", json!({"latents": "!!"})),
            ("latents", json!({"latents": npy(&[1, 4, 4, 4], 0.0)})),
            ("latents", json!({"latents": npy(&[1, 4, 8, 8], f32::NAN)})),
        ];
        for (field, patch) in cases {
            let error = generation(&registry(), &limits, request(patch)).expect_err(field);
            assert_eq!(error.field_name(), Some(field), "{error}");
        }
    }
    #[test]
    fn good_latents_and_aliases_pass() {
        let request = request(json!({"latents": npy(&[2, 4, 8, 8], 0.5), "n": 2, "scheduler": "DPM++ 2M Karras"}));
        let (_, params) = generation(&registry(), &limits(), request).unwrap();
        assert_eq!(params.scheduler, "dpmpp_2m_karras");
        assert!(params.latents.is_some());
    }
}
