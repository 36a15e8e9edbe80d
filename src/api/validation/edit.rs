//! Edit requests into [`EditParams`] and prepared pictures, in four steps: [`decode`] the picture and mask
//! under the limits, [`resize`] them to the target size, [`outpaint`] (pad the canvas and mask the new
//! area), and [`defaults`] for the edit's own numbers; the generation fields go through
//! [`super::generation`].

use std::io::Cursor;

use image::{DynamicImage, GenericImageView, GrayImage, RgbImage};

use super::generate::{generation, in_range, prompt};
use super::{named_model, ValidationError};
use crate::api::edits::EditImageRequest;
use crate::api::images::GenerateImageRequest;
use crate::config::LimitsConfig;
use crate::engine::image::OutputFormat;
use crate::engine::input::{self, InputImageError, ResizeMode};
use crate::engine::model::Capability;
use crate::engine::pipeline::diffedit::{
    can_diffedit, DEFAULT_ENCODE_STRENGTH, DEFAULT_SAMPLES, DEFAULT_THRESHOLD, MAX_SAMPLES,
};
use crate::engine::pipeline::outpaint_canvas;
use crate::jobs::params::{DiffEditParams, EditKind, EditParams};
use crate::jobs::EditInputs;
use crate::models::{ModelRegistry, ServedModel};

/// A validated edit: the model, the parameters (input paths still empty: the jobs service fills them when
/// it stores the pictures) and the pictures at their final size.
#[derive(Debug, Clone)]
pub struct PreparedEdit {
    /// The model's id.
    pub model: String,
    /// Everything but the input paths.
    pub params: EditParams,
    /// Picture and mask as PNG.
    pub inputs: EditInputs,
}

/// Decodes, checks and fits the pictures, and resolves every parameter. CPU work (decoding, resizing,
/// PNG encoding): call it off the async runtime.
pub fn edit(
    models: &ModelRegistry,
    limits: &LimitsConfig,
    fields: EditImageRequest,
    image: &[u8],
    mask: Option<&[u8]>,
) -> Result<PreparedEdit, ValidationError> {
    let mode = fields.mode;
    let served = model_for(models, fields.model.as_deref(), mode)?;
    let multiple = served.info.size_multiple;
    let auto = fields.mask.as_deref() == Some(AUTO_MASK);
    let diffedit = diffedit(mode, &fields, auto, limits)?;
    if auto {
        can_diffedit(&served.info).map_err(|e| {
            ValidationError::field("mask", format!("model `{}` cannot compute DiffEdit masks: {e}", served.name))
        })?;
    }
    let (picture, mask) =
        if auto { (decode_picture(image, limits)?.to_rgb8(), None) } else { decode(image, mask, mode, limits)? };
    let width = fields.width.unwrap_or_else(|| input::round_to_multiple(picture.width(), multiple));
    let height = fields.height.unwrap_or_else(|| input::round_to_multiple(picture.height(), multiple));
    let resize_mode = fields.resize_mode.map(ResizeMode::from).unwrap_or_default();
    let (picture, mask) = resize(&picture, mask, (width, height), resize_mode, multiple, limits)?;
    let margins = Margins { left: fields.left, right: fields.right, top: fields.top, bottom: fields.bottom };
    let (picture, mask) = match mode {
        EditKind::Outpaint => {
            let (picture, mask) = outpaint(&picture, margins, multiple, limits)?;
            (picture, Some(mask))
        }
        _ => {
            margins.refuse()?;
            (picture, mask)
        }
    };
    if mask.as_ref().is_some_and(|m| !m.pixels().any(|p| p[0] > 0)) {
        return Err(ValidationError::field("mask", "the mask marks nothing to repaint"));
    }
    let (strength, image_guidance_scale, mask_blur) = defaults(mode, &fields)?;
    let generation_fields = GenerateImageRequest {
        priority: None,
        watermark: Some(false),
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
        webhook_url: None,
        webhook_events: None,
    };
    let (model, generate) = generation(models, limits, generation_fields)?;
    let inputs = EditInputs {
        original: original(image),
        image_png: png(&DynamicImage::ImageRgb8(picture))?,
        mask_png: mask.map(|m| png(&DynamicImage::ImageLuma8(m))).transpose()?,
    };
    let params = EditParams {
        generate,
        mode,
        strength,
        image_guidance_scale,
        mask_blur,
        resize_mode,
        image_path: String::new(),
        mask_path: None,
        original_path: None,
        diffedit,
    };
    Ok(PreparedEdit { model, params, inputs })
}

/// The picture as the client sent it, with the file extension of its format (it decoded, so it is one of
/// the accepted formats).
fn original(image: &[u8]) -> Option<(Vec<u8>, &'static str)> {
    OutputFormat::of_bytes(image).map(|format| (image.to_vec(), format.extension()))
}

fn capability(mode: EditKind) -> Capability {
    match mode {
        EditKind::Img2img => Capability::Img2img,
        EditKind::Inpaint => Capability::Inpaint,
        EditKind::Outpaint => Capability::Outpaint,
        EditKind::Instruct => Capability::Instruct,
    }
}

/// The model a request names (or the first that can do `mode`), refused when it cannot do `mode`; the
/// message names the models that can.
fn model_for<'a>(
    models: &'a ModelRegistry,
    name: Option<&str>,
    mode: EditKind,
) -> Result<&'a ServedModel, ValidationError> {
    let needed = capability(mode);
    let served = match name {
        Some(_) => named_model(models, name)?,
        None => match models.all().iter().find(|m| m.info.can(needed)) {
            Some(able) => able,
            None => named_model(models, None)?,
        },
    };
    if served.info.can(needed) {
        return Ok(served);
    }
    let able: Vec<&str> = models.all().iter().filter(|m| m.info.can(needed)).map(|m| m.name.as_str()).collect();
    let which = if able.is_empty() {
        "no configured model can".to_string()
    } else {
        format!("models that can: {}", able.join(", "))
    };
    Err(ValidationError::field("mode", format!("model `{}` cannot do `{}`; {which}", served.name, mode.name())))
}

fn image_error(field: &'static str, e: InputImageError) -> ValidationError {
    ValidationError::field(field, format!("{field}: {e}"))
}

/// The `mask` value that asks for a DiffEdit mask.
pub const AUTO_MASK: &str = "auto";

/// DiffEdit's fields: with `mask: "auto"`, mode `inpaint` and a `source_prompt` are required and the mask
/// knobs take diffusers' defaults (`mask_encode_strength` 0.5 in (0, 1], `mask_samples` 10 in 1–32,
/// `mask_threshold` 3 above 0); without it, any of them is an error naming it.
pub fn diffedit(
    mode: EditKind,
    fields: &EditImageRequest,
    auto: bool,
    limits: &LimitsConfig,
) -> Result<Option<DiffEditParams>, ValidationError> {
    if !auto {
        let given = [
            ("source_prompt", fields.source_prompt.is_some()),
            ("mask_encode_strength", fields.mask_encode_strength.is_some()),
            ("mask_samples", fields.mask_samples.is_some()),
            ("mask_threshold", fields.mask_threshold.is_some()),
        ];
        return match given.into_iter().find(|(_, given)| *given) {
            Some((name, _)) => {
                Err(ValidationError::field(name, format!("{name} is only used with `mask: \"auto\"` (DiffEdit)")))
            }
            None => Ok(None),
        };
    }
    if mode != EditKind::Inpaint {
        return Err(ValidationError::field(
            "mask",
            format!("`mask: \"auto\"` (DiffEdit) needs mode `inpaint`, not `{}`", mode.name()),
        ));
    }
    let source_prompt = fields.source_prompt.clone().ok_or_else(|| {
        ValidationError::field("source_prompt", "`mask: \"auto\"` needs a source_prompt: what the picture shows")
    })?;
    prompt("source_prompt", &source_prompt, limits, true)?;
    let mask_encode_strength = fields.mask_encode_strength.unwrap_or(DEFAULT_ENCODE_STRENGTH);
    if !(mask_encode_strength.is_finite() && mask_encode_strength > 0.0 && mask_encode_strength <= 1.0) {
        return Err(ValidationError::field("mask_encode_strength", "mask_encode_strength must be in (0, 1]"));
    }
    let mask_samples = fields.mask_samples.unwrap_or(DEFAULT_SAMPLES);
    if !(1..=MAX_SAMPLES).contains(&mask_samples) {
        return Err(ValidationError::field(
            "mask_samples",
            format!("mask_samples must be between 1 and {MAX_SAMPLES}"),
        ));
    }
    let mask_threshold = fields.mask_threshold.unwrap_or(DEFAULT_THRESHOLD);
    if !(mask_threshold.is_finite() && mask_threshold > 0.0) {
        return Err(ValidationError::field("mask_threshold", "mask_threshold must be a positive number"));
    }
    Ok(Some(DiffEditParams { source_prompt, mask_encode_strength, mask_samples, mask_threshold }))
}

/// Decodes the picture under the input limits (checked before any pixel is decoded).
fn decode_picture(image: &[u8], limits: &LimitsConfig) -> Result<DynamicImage, ValidationError> {
    input::decode(image, limits.max_input_side, limits.max_input_pixels).map_err(|e| image_error("image", e))
}

/// Decodes the picture and the mask under the input limits (checked before any pixel is decoded). Inpaint
/// without a mask takes the picture's own transparent pixels; a mask for any other mode is refused.
pub fn decode(
    image: &[u8],
    mask: Option<&[u8]>,
    mode: EditKind,
    limits: &LimitsConfig,
) -> Result<(RgbImage, Option<GrayImage>), ValidationError> {
    let decoded = decode_picture(image, limits)?;
    let mask = match (mask, mode) {
        (Some(_), mode) if mode != EditKind::Inpaint => {
            return Err(ValidationError::field(
                "mask",
                format!("mask is only used by mode `inpaint`, not `{}`", mode.name()),
            ));
        }
        (Some(bytes), _) => {
            let mask = input::decode(bytes, limits.max_input_side, limits.max_input_pixels)
                .map_err(|e| image_error("mask", e))?;
            if mask.dimensions() != decoded.dimensions() {
                let ((mw, mh), (iw, ih)) = (mask.dimensions(), decoded.dimensions());
                return Err(ValidationError::field(
                    "mask",
                    format!("mask is {mw}x{mh} but the image is {iw}x{ih}; they must be the same size"),
                ));
            }
            Some(input::mask_from(&mask))
        }
        (None, EditKind::Inpaint) if input::has_transparency(&decoded) => Some(input::mask_from(&decoded)),
        (None, EditKind::Inpaint) => {
            return Err(ValidationError::field(
                "mask",
                "inpaint needs a mask (or an image with transparent pixels to repaint)",
            ));
        }
        (None, _) => None,
    };
    Ok((decoded.to_rgb8(), mask))
}

/// Fits the picture (and mask) to `(width, height)`, which must be multiples of `multiple` within the
/// limits.
pub fn resize(
    picture: &RgbImage,
    mask: Option<GrayImage>,
    (width, height): (u32, u32),
    mode: ResizeMode,
    multiple: u32,
    limits: &LimitsConfig,
) -> Result<(RgbImage, Option<GrayImage>), ValidationError> {
    for (name, value) in [("width", width), ("height", height)] {
        if value == 0 || value % multiple != 0 || value > limits.max_side {
            return Err(ValidationError::field(
                name,
                format!("{name} must be a multiple of {multiple} up to {}", limits.max_side),
            ));
        }
    }
    let picture = input::fit_rgb(picture, width, height, mode);
    Ok((picture, mask.map(|m| input::fit_mask(&m, width, height, mode))))
}

/// Outpainting margins in pixels.
#[derive(Debug, Clone, Copy, Default)]
pub struct Margins {
    /// Added on the left.
    pub left: Option<u32>,
    /// Added on the right.
    pub right: Option<u32>,
    /// Added at the top.
    pub top: Option<u32>,
    /// Added at the bottom.
    pub bottom: Option<u32>,
}

impl Margins {
    fn named(self) -> [(&'static str, Option<u32>); 4] {
        [("left", self.left), ("right", self.right), ("top", self.top), ("bottom", self.bottom)]
    }

    /// Margins given to a mode other than outpaint are an error naming the first.
    fn refuse(self) -> Result<(), ValidationError> {
        match self.named().into_iter().find(|(_, v)| v.is_some()) {
            Some((name, _)) => Err(ValidationError::field(name, format!("{name} is only used by mode `outpaint`"))),
            None => Ok(()),
        }
    }
}

/// Pads the canvas by the margins (edges extended) and masks the new area.
pub fn outpaint(
    picture: &RgbImage,
    margins: Margins,
    multiple: u32,
    limits: &LimitsConfig,
) -> Result<(RgbImage, GrayImage), ValidationError> {
    for (name, value) in margins.named() {
        if value.unwrap_or(0) % 8 != 0 || value.unwrap_or(0) > limits.max_side {
            return Err(ValidationError::field(name, format!("{name} must be a multiple of 8")));
        }
    }
    let [l, r, t, b] = margins.named().map(|(_, v)| v.unwrap_or(0));
    if l + r + t + b == 0 {
        return Err(ValidationError::field("left", "outpaint needs at least one of left, right, top, bottom"));
    }
    let (w, h) = (picture.width() + l + r, picture.height() + t + b);
    for (side, size, field) in
        [("width", w, if l > 0 { "left" } else { "right" }), ("height", h, if t > 0 { "top" } else { "bottom" })]
    {
        if size % multiple != 0 || size > limits.max_side {
            return Err(ValidationError::field(
                field,
                format!("the canvas {side} {size} must be a multiple of {multiple} up to {}", limits.max_side),
            ));
        }
    }
    Ok(outpaint_canvas(picture, l, r, t, b))
}

/// The edit's own numbers with their per-mode defaults: strength (0.75 for img2img, else 1), image guidance
/// (1.5) and mask blur (4 px).
pub fn defaults(mode: EditKind, fields: &EditImageRequest) -> Result<(f32, f32, u32), ValidationError> {
    let strength = fields.strength.unwrap_or(if mode == EditKind::Img2img { 0.75 } else { 1.0 });
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(ValidationError::field("strength", "strength must be in (0, 1]"));
    }
    let image_guidance_scale = fields.image_guidance_scale.unwrap_or(1.5);
    in_range("image_guidance_scale", image_guidance_scale, 1.0, 20.0)?;
    let mask_blur = fields.mask_blur.unwrap_or(4);
    if mask_blur > 64 {
        return Err(ValidationError::field("mask_blur", "mask_blur must be at most 64"));
    }
    Ok((strength, image_guidance_scale, mask_blur))
}

fn png(image: &DynamicImage) -> Result<Vec<u8>, ValidationError> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).map_err(|e| ValidationError::Internal(e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{limits, registry};
    use super::*;

    fn encoded(picture: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        picture.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A picture; with `hole`, its left half is transparent.
    fn picture(width: u32, height: u32, hole: bool) -> Vec<u8> {
        encoded(DynamicImage::ImageRgba8(image::RgbaImage::from_fn(width, height, |x, y| {
            let alpha = if hole && x < width / 2 { 0 } else { 255 };
            image::Rgba([(x * 4) as u8, (y * 4) as u8, 90, alpha])
        })))
    }

    /// A mask; with `on`, white right of column 10.
    fn mask(width: u32, height: u32, on: bool) -> Vec<u8> {
        encoded(DynamicImage::ImageLuma8(GrayImage::from_fn(width, height, |x, _| {
            image::Luma([if on && x > 10 { 255 } else { 0 }])
        })))
    }

    /// An img2img request of "a fox" with `patch`'s fields set.
    fn run(patch: serde_json::Value, image: &[u8], mask: Option<&[u8]>) -> Result<PreparedEdit, ValidationError> {
        let mut fields = json!({"mode": "img2img", "prompt": "a fox"});
        for (key, value) in patch.as_object().expect("patch object") {
            fields[key] = value.clone();
        }
        edit(&registry(), &limits(), serde_json::from_value(fields).expect("fields"), image, mask)
    }

    #[test]
    fn img2img_keeps_the_size_rounded_to_the_multiple() {
        let prepared = run(json!({}), &picture(70, 130, false), None).unwrap();
        assert_eq!((prepared.params.generate.width, prepared.params.generate.height), (64, 128));
        assert_eq!(prepared.params.strength, 0.75);
        assert!(prepared.inputs.mask_png.is_none());
    }

    #[test]
    fn outpaint_pads_and_masks_the_new_area() {
        let prepared = run(json!({"mode": "outpaint", "right": 64}), &picture(64, 64, false), None).unwrap();
        assert_eq!((prepared.params.generate.width, prepared.params.generate.height), (128, 64));
        let mask = image::load_from_memory(prepared.inputs.mask_png.as_ref().unwrap()).unwrap().to_luma8();
        assert_eq!((mask.get_pixel(10, 10)[0], mask.get_pixel(120, 10)[0]), (0, 255));
        assert_eq!(prepared.params.strength, 1.0);
    }

    #[test]
    fn inpaint_takes_transparent_pixels_without_a_mask() {
        let prepared = run(json!({"mode": "inpaint"}), &picture(64, 64, true), None).unwrap();
        assert!(prepared.inputs.mask_png.is_some());
    }

    #[test]
    fn each_bad_input_is_named() {
        let good = picture(64, 64, false);
        let (other_size, empty, marked) = (mask(32, 32, true), mask(64, 64, false), mask(64, 64, true));
        let inpaint = json!({"mode": "inpaint"});
        type Case<'a> = (&'static str, serde_json::Value, &'a [u8], Option<&'a [u8]>);
        let cases: [Case; 16] = [
            ("image", json!({}), b"not a picture", None),
            ("mask", json!({}), &good, Some(&marked)),
            ("mask", inpaint.clone(), &good, None),
            ("mask", inpaint.clone(), &good, Some(&other_size)),
            ("mask", inpaint, &good, Some(&empty)),
            ("mode", json!({"mode": "instruct", "model": "tiny-sd"}), &good, None),
            ("model", json!({"model": "nope"}), &good, None),
            ("width", json!({"width": 70}), &good, None),
            ("left", json!({"left": 8}), &good, None),
            ("left", json!({"mode": "outpaint"}), &good, None),
            ("right", json!({"mode": "outpaint", "right": 12}), &good, None),
            ("right", json!({"mode": "outpaint", "right": 8}), &good, None),
            ("strength", json!({"strength": 0.0}), &good, None),
            ("image_guidance_scale", json!({"image_guidance_scale": 0.5}), &good, None),
            ("mask_blur", json!({"mask_blur": 65}), &good, None),
            ("steps", json!({"steps": 0}), &good, None),
        ];
        for (field, patch, image, mask) in cases {
            let error = run(patch, image, mask).expect_err(field);
            assert_eq!(error.field_name(), Some(field), "{error}");
        }
    }

    #[test]
    fn diffedit_takes_mask_auto_with_a_source_prompt_and_defaults() {
        let good = picture(64, 64, false);
        let auto = json!({"mode": "inpaint", "mask": "auto", "source_prompt": "a red fox", "steps": 20});
        let prepared = run(auto, &good, None).unwrap();
        assert!(prepared.inputs.mask_png.is_none(), "the mask is computed when the job runs");
        let diffedit = prepared.params.diffedit.clone().expect("DiffEdit settings");
        assert_eq!(diffedit.source_prompt, "a red fox");
        assert_eq!((diffedit.mask_encode_strength, diffedit.mask_samples, diffedit.mask_threshold), (0.5, 10, 3.0));
        assert_eq!(prepared.params.visible_steps(), 30, "20 inpainting steps and 10 mask draws");
        // A picture with transparent pixels does not bring its own mask along.
        let holed = json!({"mode": "inpaint", "mask": "auto", "source_prompt": "a fox", "mask_samples": 3});
        let prepared = run(holed, &picture(64, 64, true), None).unwrap();
        assert!(prepared.inputs.mask_png.is_none());
        assert_eq!(prepared.params.diffedit.map(|d| d.mask_samples), Some(3));
    }

    #[test]
    fn diffedit_mistakes_are_named() {
        let good = picture(64, 64, false);
        let marked = mask(64, 64, true);
        let auto = |patch: serde_json::Value| {
            let mut fields = json!({"mode": "inpaint", "mask": "auto", "source_prompt": "a fox"});
            for (key, value) in patch.as_object().expect("patch object") {
                fields[key] = value.clone();
            }
            fields
        };
        type Case<'a> = (&'static str, serde_json::Value, Option<&'a [u8]>);
        let cases: [Case; 12] = [
            ("mask", auto(json!({"mode": "img2img"})), None),
            ("mask", auto(json!({"mode": "outpaint", "right": 8})), None),
            ("source_prompt", json!({"mode": "inpaint", "mask": "auto"}), None),
            ("source_prompt", auto(json!({"source_prompt": " "})), None),
            ("source_prompt", json!({"mode": "inpaint", "source_prompt": "a fox"}), Some(&marked)),
            ("mask_samples", json!({"mask_samples": 4}), None),
            ("mask_encode_strength", auto(json!({"mask_encode_strength": 0.0})), None),
            ("mask_encode_strength", auto(json!({"mask_encode_strength": 1.5})), None),
            ("mask_samples", auto(json!({"mask_samples": 0})), None),
            ("mask_samples", auto(json!({"mask_samples": 33})), None),
            ("mask_threshold", auto(json!({"mask_threshold": 0.0})), None),
            ("mask_threshold", auto(json!({"mask_threshold": -1.0})), None),
        ];
        for (field, patch, mask) in cases {
            let error = run(patch.clone(), &good, mask).expect_err(field);
            assert_eq!(error.field_name(), Some(field), "{patch}: {error}");
        }
    }

    #[test]
    fn instruct_goes_to_the_model_that_can() {
        // tiny-sd cannot, tiny-sd-instruct can: with no model named, the one that can is chosen.
        let prepared = run(json!({"mode": "instruct"}), &picture(64, 64, false), None).unwrap();
        assert_eq!(prepared.model, "tiny-sd-instruct");
    }
}
