//! Pictures clients send: decoded under strict limits (so a corrupt file or a decompression bomb is an error,
//! never a crash or an allocation storm), turned into masks, and fitted to a size the model accepts.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, Limits, RgbImage};

/// Why an uploaded picture was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputImageError {
    /// Empty payload.
    #[error("the image is empty")]
    Empty,
    /// Not PNG, JPEG or WebP.
    #[error("unsupported image format (send PNG, JPEG or WebP)")]
    Unsupported,
    /// The bytes do not decode.
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    /// Over the configured size.
    #[error("the image is {width}x{height}; the limit is {max_side} px per side and {max_pixels} pixels")]
    TooLarge {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Longest side allowed.
        max_side: u32,
        /// Most pixels allowed.
        max_pixels: u64,
    },
}

/// How an input picture reaches the target size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Scale to cover the target, then cut the overflow from the centre.
    #[default]
    Crop,
    /// Scale to fit inside the target, then extend the edges to fill it.
    Fit,
    /// Scale each axis independently.
    Stretch,
}

/// Decodes PNG, JPEG or WebP bytes, refusing anything over `max_side` per side or `max_pixels` in all before
/// any pixel memory is allocated.
pub fn decode(bytes: &[u8], max_side: u32, max_pixels: u64) -> Result<DynamicImage, InputImageError> {
    if bytes.is_empty() {
        return Err(InputImageError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| InputImageError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        _ => return Err(InputImageError::Unsupported),
    }
    let (width, height) = reader.into_dimensions().map_err(|e| InputImageError::Corrupt(e.to_string()))?;
    if width == 0 || height == 0 {
        return Err(InputImageError::Corrupt("zero-sized image".into()));
    }
    if width > max_side || height > max_side || u64::from(width) * u64::from(height) > max_pixels {
        return Err(InputImageError::TooLarge { width, height, max_side, max_pixels });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| InputImageError::Corrupt(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| InputImageError::Corrupt(e.to_string()))
}

/// Whether the picture has any pixel that is not fully opaque.
pub fn has_transparency(image: &DynamicImage) -> bool {
    image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p[3] < 255)
}

/// A mask (white = repaint): from transparency when the picture has any (transparent = repaint, as the
/// OpenAI API does), else from brightness (white = repaint).
pub fn mask_from(image: &DynamicImage) -> GrayImage {
    if has_transparency(image) {
        let rgba = image.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([if rgba.get_pixel(x, y)[3] < 128 { 255 } else { 0 }])
        })
    } else {
        image.to_luma8()
    }
}

/// Rounds `value` to the nearest positive multiple of `multiple`.
pub fn round_to_multiple(value: u32, multiple: u32) -> u32 {
    let multiple = multiple.max(1);
    (((value + multiple / 2) / multiple) * multiple).max(multiple)
}

/// Brings a picture to `width`×`height` by `mode`.
pub fn fit_rgb(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    fit(image, width, height, mode, FilterType::Lanczos3)
}

/// Brings a mask to `width`×`height` by `mode`, with the same geometry as [`fit_rgb`], then binarises it.
pub fn fit_mask(mask: &GrayImage, width: u32, height: u32, mode: ResizeMode) -> GrayImage {
    let mut out = fit(mask, width, height, mode, FilterType::Triangle);
    for p in out.pixels_mut() {
        p[0] = if p[0] >= 128 { 255 } else { 0 };
    }
    out
}

fn fit<P>(
    image: &image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    mode: ResizeMode,
    filter: FilterType,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    match mode {
        ResizeMode::Stretch => image::imageops::resize(image, width, height, filter),
        ResizeMode::Crop => {
            let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
            let (sw, sh) =
                (((w as f64 * scale).round() as u32).max(width), ((h as f64 * scale).round() as u32).max(height));
            let scaled = image::imageops::resize(image, sw, sh, filter);
            image::imageops::crop_imm(&scaled, (sw - width) / 2, (sh - height) / 2, width, height).to_image()
        }
        ResizeMode::Fit => {
            let scale = (width as f64 / w as f64).min(height as f64 / h as f64);
            let (sw, sh) = (
                ((w as f64 * scale).round() as u32).clamp(1, width),
                ((h as f64 * scale).round() as u32).clamp(1, height),
            );
            let scaled = image::imageops::resize(image, sw, sh, filter);
            let (left, top) = ((width - sw) / 2, (height - sh) / 2);
            image::ImageBuffer::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(left).min(sw - 1);
                let sy = y.saturating_sub(top).min(sh - 1);
                *scaled.get_pixel(sx, sy)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_supported_formats_and_refuses_the_rest() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(10, 6, image::Rgb([1, 2, 3])));
        assert_eq!(decode(&png(&img), 100, 10_000).unwrap().width(), 10);
        assert_eq!(decode(b"", 100, 100), Err(InputImageError::Empty));
        assert_eq!(decode(b"GIF89a\x01\x00\x01\x00", 100, 100), Err(InputImageError::Unsupported));
        assert_eq!(decode(b"hello, not an image", 100, 100), Err(InputImageError::Unsupported));
        let mut truncated = png(&img);
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(decode(&truncated, 100, 10_000), Err(InputImageError::Corrupt(_))));
        assert!(matches!(decode(&png(&img), 8, 10_000), Err(InputImageError::TooLarge { .. })));
        assert!(matches!(decode(&png(&img), 100, 59), Err(InputImageError::TooLarge { .. })));
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_decoding() {
        // A 3000x3000 PNG of one colour compresses to a few kilobytes but would decode to 9 megapixels.
        let mut header_only = Vec::new();
        {
            let mut encoder = png_encoder(&mut header_only, 3_000, 3_000);
            encoder.set_compression(png::Compression::Fast);
            let mut writer = encoder.write_header().unwrap();
            let row = vec![0u8; 3_000];
            let mut stream = writer.stream_writer().unwrap();
            for _ in 0..3_000 {
                std::io::Write::write_all(&mut stream, &row).unwrap();
            }
            stream.finish().unwrap();
        }
        assert!(header_only.len() < 100_000);
        assert!(matches!(decode(&header_only, 4096, 4_000_000), Err(InputImageError::TooLarge { .. })));
    }

    fn png_encoder(out: &mut Vec<u8>, w: u32, h: u32) -> png::Encoder<'_, &mut Vec<u8>> {
        let mut encoder = png::Encoder::new(out, w, h);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
    }

    #[test]
    fn masks_come_from_alpha_or_brightness() {
        let mut rgba = image::RgbaImage::from_pixel(4, 4, image::Rgba([9, 9, 9, 255]));
        rgba.put_pixel(1, 1, image::Rgba([9, 9, 9, 0]));
        let mask = mask_from(&DynamicImage::ImageRgba8(rgba));
        assert_eq!(mask.get_pixel(1, 1)[0], 255);
        assert_eq!(mask.get_pixel(0, 0)[0], 0);
        let gray = GrayImage::from_fn(4, 4, |x, _| image::Luma([if x < 2 { 255 } else { 0 }]));
        let mask = mask_from(&DynamicImage::ImageLuma8(gray));
        assert_eq!(mask.get_pixel(0, 3)[0], 255);
        assert_eq!(mask.get_pixel(3, 3)[0], 0);
    }

    #[test]
    fn resize_modes_reach_the_target() {
        let img = RgbImage::from_fn(100, 50, |x, _| image::Rgb([x as u8, 0, 0]));
        for mode in [ResizeMode::Crop, ResizeMode::Fit, ResizeMode::Stretch] {
            assert_eq!(fit_rgb(&img, 64, 64, mode).dimensions(), (64, 64), "{mode:?}");
        }
        let mask = GrayImage::from_fn(100, 50, |x, _| image::Luma([if x < 50 { 255 } else { 0 }]));
        let fitted = fit_mask(&mask, 64, 64, ResizeMode::Stretch);
        assert!(fitted.pixels().all(|p| p[0] == 0 || p[0] == 255));
        assert_eq!(fitted.get_pixel(5, 5)[0], 255);
        assert_eq!(fitted.get_pixel(60, 5)[0], 0);
        assert_eq!(round_to_multiple(500, 64), 512);
        assert_eq!(round_to_multiple(10, 64), 64);
        assert_eq!(round_to_multiple(100, 8), 104);
    }
}
