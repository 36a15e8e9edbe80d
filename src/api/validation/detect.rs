//! Watermark detection requests into a [`PreparedDetection`], and the check that a text-to-image job can
//! carry a watermark at all.

use image::RgbImage;

use super::{named_model, ValidationError};
use crate::api::watermarks::DetectWatermarkRequest;
use crate::config::{LimitsConfig, WatermarkConfig};
use crate::engine::input::{self, ResizeMode};
use crate::engine::pipeline::invert::can_invert;
use crate::engine::watermark::pattern::fits;
use crate::engine::watermark::WatermarkSpec;
use crate::models::{ModelRegistry, ServedModel};

/// A detection ready for the detector.
#[derive(Debug)]
pub struct PreparedDetection {
    /// The served model's id.
    pub model: String,
    /// The picture, at a size the model takes.
    pub image: RgbImage,
    /// DDIM inversion steps.
    pub steps: u32,
}

/// Checks the fields and decodes the picture under the input limits. A picture whose sides are not
/// multiples of the model's `size_multiple`, or that is larger than the model's `max_pixels`, is resized
/// (stretched) to the model's native size: the rings are read in Fourier space, where a uniform rescale
/// moves them little.
pub fn detection(
    models: &ModelRegistry,
    limits: &LimitsConfig,
    config: &WatermarkConfig,
    fields: &DetectWatermarkRequest,
    image: &[u8],
) -> Result<PreparedDetection, ValidationError> {
    let served = named_model(models, fields.model.as_deref())?;
    can_invert(&served.info).map_err(|e| {
        ValidationError::field("model", format!("model `{}` cannot be checked for watermarks: {e}", served.name))
    })?;
    let steps = match fields.inversion_steps {
        Some(steps) if steps == 0 || steps > limits.max_steps => {
            return Err(ValidationError::field(
                "inversion_steps",
                format!("inversion_steps must be between 1 and {}", limits.max_steps),
            ))
        }
        Some(steps) => steps,
        None => config.inversion_steps,
    };
    let decoded = input::decode(image, limits.max_input_side, limits.max_input_pixels)
        .map_err(|e| ValidationError::field("image", format!("image: {e}")))?;
    let mut picture = decoded.to_rgb8();
    let multiple = served.info.size_multiple;
    let (width, height) = picture.dimensions();
    let fitting = width % multiple == 0 && height % multiple == 0;
    if !fitting || u64::from(width) * u64::from(height) > served.max_pixels {
        let side = served.info.native_size;
        picture = input::fit_rgb(&picture, side, side, ResizeMode::Stretch);
    }
    let spec = WatermarkSpec { radius: config.radius, channel: config.channel, strength: config.strength };
    carries_watermark(served, picture.width(), picture.height(), spec).map_err(|message| {
        ValidationError::field("image", format!("image is too small to hold a watermark: {message}"))
    })?;
    Ok(PreparedDetection { model: served.name.clone(), image: picture, steps })
}

/// Whether `served`'s pictures of `width × height` can carry `spec`'s rings and have them read back: a
/// DDIM-invertible model, the channel among its latent channels, the radius below half the latent side.
pub fn carries_watermark(served: &ServedModel, width: u32, height: u32, spec: WatermarkSpec) -> Result<(), String> {
    can_invert(&served.info).map_err(|e| e.to_string())?;
    if spec.channel >= served.info.latent_channels {
        return Err(format!(
            "watermark.channel {} is not one of the model's {} latent channels",
            spec.channel, served.info.latent_channels
        ));
    }
    let f = served.info.vae_scale_factor;
    fits(spec.radius, (height / f) as usize, (width / f) as usize).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{limits, registry};
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let picture = RgbImage::from_pixel(width, height, image::Rgb([200, 30, 30]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        picture.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    fn fields(patch: serde_json::Value) -> DetectWatermarkRequest {
        let mut json = serde_json::json!({});
        for (key, value) in patch.as_object().expect("patch object") {
            json[key] = value.clone();
        }
        serde_json::from_value(json).expect("request")
    }

    #[test]
    fn each_bad_field_is_named() {
        let config = WatermarkConfig { radius: 2, ..WatermarkConfig::default() };
        let cases = [
            ("model", fields(serde_json::json!({"model": "nope"})), png(64, 64)),
            ("inversion_steps", fields(serde_json::json!({"inversion_steps": 0})), png(64, 64)),
            ("inversion_steps", fields(serde_json::json!({"inversion_steps": 151})), png(64, 64)),
            ("image", fields(serde_json::json!({})), b"not a picture".to_vec()),
            ("image", fields(serde_json::json!({})), Vec::new()),
        ];
        for (field, request, image) in cases {
            let error = detection(&registry(), &limits(), &config, &request, &image).expect_err(field);
            assert_eq!(error.field_name(), Some(field), "{error}");
        }
        // Radius 4 does not fit the fixture's 8×8 latents.
        let wide = WatermarkConfig { radius: 4, ..WatermarkConfig::default() };
        let error = detection(&registry(), &limits(), &wide, &fields(serde_json::json!({})), &png(64, 64)).unwrap_err();
        assert_eq!(error.field_name(), Some("image"));
    }

    #[test]
    fn odd_sizes_are_brought_to_the_native_size() {
        let config = WatermarkConfig { radius: 2, ..WatermarkConfig::default() };
        let prepared =
            detection(&registry(), &limits(), &config, &fields(serde_json::json!({})), &png(50, 70)).unwrap();
        assert_eq!((prepared.model.as_str(), prepared.image.dimensions()), ("tiny-sd", (64, 64)));
        assert_eq!(prepared.steps, config.inversion_steps);
        // The configured default is not bound by `limits.max_steps`; a request's own value is.
        let tight = crate::config::LimitsConfig { max_steps: 2, ..limits() };
        let prepared = detection(&registry(), &tight, &config, &fields(serde_json::json!({})), &png(64, 64)).unwrap();
        assert_eq!(prepared.steps, 20);
        let asked = fields(serde_json::json!({"inversion_steps": 3}));
        let error = detection(&registry(), &tight, &config, &asked, &png(64, 64)).unwrap_err();
        assert_eq!(error.field_name(), Some("inversion_steps"));
    }
}
