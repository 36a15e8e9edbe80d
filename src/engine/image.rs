//! Conversions between decoder tensors and pictures, and encoding to the formats clients ask for.

use std::io::Cursor;

use image::{ImageFormat, RgbImage};
use ndarray::{Array4, ArrayView4, Axis};

use super::error::EngineError;

/// Output formats a job can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Lossless PNG (the default).
    #[default]
    Png,
    /// JPEG at quality 90.
    Jpeg,
    /// Lossless WebP.
    Webp,
}

impl OutputFormat {
    /// The HTTP `Content-Type`.
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// File extension used in storage.
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpg",
            OutputFormat::Webp => "webp",
        }
    }

    /// Parses the name stored with a job.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "png" => Some(OutputFormat::Png),
            "jpeg" | "jpg" => Some(OutputFormat::Jpeg),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    /// The format `bytes` are in, when it is one of these (by their content, not a name).
    pub fn of_bytes(bytes: &[u8]) -> Option<Self> {
        match image::guess_format(bytes).ok()? {
            ImageFormat::Png => Some(OutputFormat::Png),
            ImageFormat::Jpeg => Some(OutputFormat::Jpeg),
            ImageFormat::WebP => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }
}

/// Turns a VAE decoder output `[b, 3, H, W]` in [-1, 1] into pictures, as diffusers does:
/// `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded.
pub fn tensor_to_images(decoded: ArrayView4<'_, f32>) -> Vec<RgbImage> {
    decoded
        .axis_iter(Axis(0))
        .map(|chw| {
            let (h, w) = (chw.shape()[1], chw.shape()[2]);
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let px = |c: usize| {
                    let v = (chw[[c, y as usize, x as usize]] / 2.0 + 0.5).clamp(0.0, 1.0);
                    (v * 255.0).round() as u8
                };
                image::Rgb([px(0), px(1), px(2)])
            })
        })
        .collect()
}

/// Turns a picture into the VAE encoder's input `[1, 3, H, W]` in [-1, 1], as diffusers' `VaeImageProcessor`
/// does: `u8 / 255`, then `2x - 1`, each rounded to float32 like NumPy/PyTorch.
pub fn image_to_tensor(image: &RgbImage) -> Array4<f32> {
    let (w, h) = image.dimensions();
    Array4::from_shape_fn((1, 3, h as usize, w as usize), |(_, c, y, x)| {
        let unit = f32::from(image.get_pixel(x as u32, y as u32)[c]) / 255.0;
        2.0 * unit - 1.0
    })
}

/// Default JPEG quality.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// Encodes a picture in `format`; `quality` (1–100) applies to JPEG.
pub fn encode(image: &RgbImage, format: OutputFormat, quality: Option<u8>) -> Result<Vec<u8>, EngineError> {
    let mut out = Cursor::new(Vec::new());
    match format {
        OutputFormat::Png => image.write_to(&mut out, ImageFormat::Png),
        OutputFormat::Webp => image.write_to(&mut out, ImageFormat::WebP),
        OutputFormat::Jpeg => {
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out,
                quality.unwrap_or(DEFAULT_JPEG_QUALITY).clamp(1, 100),
            );
            image.write_with_encoder(encoder)
        }
    }
    .map_err(|e| EngineError::Image(e.to_string()))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    #[test]
    fn decoder_range_maps_to_bytes_like_diffusers() {
        let mut t = Array4::<f32>::zeros((1, 3, 1, 3));
        t[[0, 0, 0, 0]] = -1.0;
        t[[0, 0, 0, 1]] = 1.0;
        t[[0, 0, 0, 2]] = 5.0;
        let images = tensor_to_images(t.view());
        assert_eq!(images[0].get_pixel(0, 0)[0], 0);
        assert_eq!(images[0].get_pixel(1, 0)[0], 255);
        assert_eq!(images[0].get_pixel(2, 0)[0], 255);
        assert_eq!(images[0].get_pixel(0, 0)[1], 128); // 0 -> 0.5 -> 127.5 rounds to 128
    }

    #[test]
    fn pictures_map_to_the_encoder_range() {
        let img =
            RgbImage::from_fn(2, 1, |x, _| if x == 0 { image::Rgb([0, 255, 51]) } else { image::Rgb([255, 0, 0]) });
        let t = image_to_tensor(&img);
        assert_eq!(t.shape(), &[1, 3, 1, 2]);
        assert_eq!(t[[0, 0, 0, 0]], -1.0);
        assert_eq!(t[[0, 1, 0, 0]], 1.0);
        assert_eq!(t[[0, 2, 0, 0]], 2.0 * (51.0f32 / 255.0) - 1.0);
        assert_eq!(t[[0, 0, 0, 1]], 1.0);
    }

    #[test]
    fn jpeg_quality_changes_the_size() {
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * y) as u8, (x * 7) as u8, (y * 3) as u8]));
        let small = encode(&img, OutputFormat::Jpeg, Some(10)).unwrap();
        let large = encode(&img, OutputFormat::Jpeg, Some(100)).unwrap();
        assert!(small.len() < large.len());
    }

    #[test]
    fn every_format_round_trips() {
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 50]));
        for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            let bytes = encode(&img, format, None).unwrap();
            let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (16, 8), "{format:?}");
            let guessed = image::guess_format(&bytes).unwrap();
            assert_eq!(guessed.to_mime_type(), format.mime());
        }
    }
}
