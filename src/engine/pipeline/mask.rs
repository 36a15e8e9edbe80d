//! Inpainting masks: diffusers' preprocessing (binarised at 0.5 at full resolution, nearest-resized to the
//! latent grid, masked picture), and the feathered pixel blend that keeps everything outside the mask as it
//! was for Blended Latent Diffusion.

use image::{GrayImage, RgbImage};
use ndarray::{Array2, Array4, ArrayView2, ArrayView4};

/// 1 where the mask asks for new content (`value / 255 ≥ 0.5`, i.e. value ≥ 128), 0 elsewhere: diffusers'
/// `VaeImageProcessor` mask handling (`do_binarize`), `[H, W]`.
pub fn binarise(mask: &GrayImage) -> Array2<f32> {
    let (w, h) = mask.dimensions();
    Array2::from_shape_fn((h as usize, w as usize), |(y, x)| {
        let unit = f32::from(mask.get_pixel(x as u32, y as u32)[0]) / 255.0;
        if unit < 0.5 {
            0.0
        } else {
            1.0
        }
    })
}

/// The mask on the latent grid, `[1, 1, H/factor, W/factor]`: PyTorch's default `interpolate` (mode
/// `nearest`) for an integer ratio takes the pixel at `(factor·i, factor·j)`.
pub fn latent_mask(binary: ArrayView2<'_, f32>, factor: usize) -> Array4<f32> {
    let (h, w) = binary.dim();
    let factor = factor.max(1);
    Array4::from_shape_fn((1, 1, h / factor, w / factor), |(_, _, i, j)| binary[[i * factor, j * factor]])
}

/// The picture with the region to repaint blanked: `pixels · (mask < 0.5)` (the region becomes 0, mid grey
/// in [-1, 1]), as diffusers computes the inpainting U-Net's masked image. `pixels` is `[1, 3, H, W]`.
pub fn masked_pixels(pixels: ArrayView4<'_, f32>, binary: ArrayView2<'_, f32>) -> Array4<f32> {
    let mut out = pixels.to_owned();
    for ((_, _, y, x), v) in out.indexed_iter_mut() {
        let keep = if binary[[y, x]] < 0.5 { 1.0 } else { 0.0 };
        *v *= keep;
    }
    out
}

/// A feathered copy of a binary mask: 0 outside the mask, rising linearly inside it to 1 at `radius + 1`
/// pixels (chessboard distance) from the nearest kept pixel. Feathering only inwards means the blend never
/// touches a pixel outside the mask; the picture's border does not count as kept, so outpainting margins stay
/// fully new. `radius` 0 returns the mask itself.
pub fn feather(binary: ArrayView2<'_, f32>, radius: u32) -> Array2<f32> {
    if radius == 0 {
        return binary.mapv(|v| if v >= 0.5 { 1.0 } else { 0.0 });
    }
    let (h, w) = binary.dim();
    let far = u32::MAX / 2;
    // Two-pass chamfer with unit weights on all 8 neighbours: the exact chessboard distance to a kept pixel.
    let mut dist = Array2::from_shape_fn((h, w), |(y, x)| if binary[[y, x]] >= 0.5 { far } else { 0 });
    for y in 0..h {
        for x in 0..w {
            let mut d = dist[[y, x]];
            if y > 0 {
                d = d.min(dist[[y - 1, x]] + 1);
                if x > 0 {
                    d = d.min(dist[[y - 1, x - 1]] + 1);
                }
                if x + 1 < w {
                    d = d.min(dist[[y - 1, x + 1]] + 1);
                }
            }
            if x > 0 {
                d = d.min(dist[[y, x - 1]] + 1);
            }
            dist[[y, x]] = d;
        }
    }
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let mut d = dist[[y, x]];
            if y + 1 < h {
                d = d.min(dist[[y + 1, x]] + 1);
                if x > 0 {
                    d = d.min(dist[[y + 1, x - 1]] + 1);
                }
                if x + 1 < w {
                    d = d.min(dist[[y + 1, x + 1]] + 1);
                }
            }
            if x + 1 < w {
                d = d.min(dist[[y, x + 1]] + 1);
            }
            dist[[y, x]] = d;
        }
    }
    let ramp = (radius + 1) as f32;
    dist.mapv(|d| (d as f32 / ramp).min(1.0))
}

/// `weight·generated + (1 − weight)·original` per pixel, rounded; where `weight` is 0 the original pixel comes
/// back exactly. All three must have the same size.
pub fn blend_pixels(generated: &RgbImage, original: &RgbImage, weight: ArrayView2<'_, f32>) -> RgbImage {
    RgbImage::from_fn(generated.width(), generated.height(), |x, y| {
        let m = weight[[y as usize, x as usize]];
        let (g, o) = (generated.get_pixel(x, y), original.get_pixel(x, y));
        if m <= 0.0 {
            return *o;
        }
        let px = |c: usize| (m * f32::from(g[c]) + (1.0 - m) * f32::from(o[c])).round().clamp(0.0, 255.0) as u8;
        image::Rgb([px(0), px(1), px(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect_mask(w: u32, h: u32, x0: u32, x1: u32, y0: u32, y1: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, y| image::Luma([if x >= x0 && x < x1 && y >= y0 && y < y1 { 255 } else { 0 }]))
    }

    #[test]
    fn binarises_at_half() {
        let m = GrayImage::from_fn(3, 1, |x, _| image::Luma([[127, 128, 255][x as usize]]));
        assert_eq!(binarise(&m).into_raw_vec_and_offset().0, vec![0.0, 1.0, 1.0]);
    }

    #[test]
    fn latent_mask_samples_the_top_left_pixel_of_each_cell() {
        let b = binarise(&rect_mask(64, 64, 20, 44, 12, 40));
        let l = latent_mask(b.view(), 8);
        assert_eq!(l.shape(), &[1, 1, 8, 8]);
        for i in 0..8 {
            for j in 0..8 {
                let inside = (2..=4).contains(&i) && (3..=5).contains(&j);
                assert_eq!(l[[0, 0, i, j]], if inside { 1.0 } else { 0.0 }, "{i},{j}");
            }
        }
    }

    #[test]
    fn feathering_stays_inside_and_reaches_one() {
        let b = binarise(&rect_mask(32, 32, 8, 24, 8, 24));
        let f = feather(b.view(), 3);
        for ((y, x), v) in f.indexed_iter() {
            if b[[y, x]] == 0.0 {
                assert_eq!(*v, 0.0);
            }
        }
        assert_eq!(f[[8, 8]], 0.25);
        assert_eq!(f[[16, 16]], 1.0);
        assert_eq!(f[[11, 16]], 1.0);
        // A mask touching the border is not feathered there.
        let edge = binarise(&rect_mask(16, 16, 0, 16, 0, 4));
        assert_eq!(feather(edge.view(), 2)[[0, 0]], 1.0);
    }

    #[test]
    fn blend_keeps_unmasked_pixels_exactly() {
        let g = RgbImage::from_pixel(4, 1, image::Rgb([200, 200, 200]));
        let o = RgbImage::from_pixel(4, 1, image::Rgb([10, 20, 30]));
        let w = Array2::from_shape_vec((1, 4), vec![0.0, 0.5, 1.0, 0.0]).unwrap();
        let b = blend_pixels(&g, &o, w.view());
        assert_eq!(b.get_pixel(0, 0), o.get_pixel(0, 0));
        assert_eq!(b.get_pixel(1, 0), &image::Rgb([105, 110, 115]));
        assert_eq!(b.get_pixel(2, 0), g.get_pixel(2, 0));
    }
}
