//! Image editing pipelines: img2img (SDEdit), inpainting (9-channel U-Nets, or Blended Latent Diffusion with
//! plain 4-channel U-Nets), and InstructPix2Pix (8-channel U-Nets). Outpainting is inpainting on a padded
//! canvas, prepared by [`outpaint_canvas`].
//!
//! (Interface agreed with the HTTP layer; the implementation lands with the editing work.)

use image::{GrayImage, RgbImage};

use super::{GenerateRequest, StepObserver};
use crate::engine::error::EngineError;
use crate::engine::model::LoadedModel;

/// Which edit to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditMode {
    /// SDEdit: noise the encoded image to the strength's start timestep and denoise from there.
    Img2img,
    /// Repaint the white region of the mask.
    Inpaint,
    /// InstructPix2Pix: the prompt is an instruction.
    Instruct,
}

/// A validated edit request. `base.width`/`base.height` equal the image size (already resized by the caller).
#[derive(Debug, Clone)]
pub struct EditRequest {
    /// Prompt, guidance, scheduler, seed, images, optional starting noise (`latents`, unit Gaussian).
    pub base: GenerateRequest,
    /// The edit.
    pub mode: EditMode,
    /// The input picture, `base.width` × `base.height`.
    pub image: RgbImage,
    /// White = repaint, black = keep; same size as `image`. Required for `Inpaint`.
    pub mask: Option<GrayImage>,
    /// In (0, 1]: how far into the noise schedule the image is pushed (img2img, inpaint).
    pub strength: f32,
    /// InstructPix2Pix image guidance.
    pub image_guidance_scale: f32,
    /// Feathering, in pixels, of the blend of decoded pixels back into the original (4-channel inpainting).
    pub mask_blur: u32,
}

/// Runs an edit and returns one picture per requested image.
pub fn edit(
    _model: &mut LoadedModel,
    _request: &EditRequest,
    _observer: &mut dyn StepObserver,
) -> Result<Vec<RgbImage>, EngineError> {
    Err(EngineError::InvalidRequest("editing is not implemented yet".into()))
}

/// Pads `image` by the given margins (pixels) for outpainting and returns the canvas and its mask (white
/// where new content goes). The padding is filled by stretching the nearest edge pixels.
pub fn outpaint_canvas(image: &RgbImage, left: u32, right: u32, top: u32, bottom: u32) -> (RgbImage, GrayImage) {
    let (w, h) = image.dimensions();
    let (cw, ch) = (w + left + right, h + top + bottom);
    let canvas = RgbImage::from_fn(cw, ch, |x, y| {
        let sx = x.saturating_sub(left).min(w - 1);
        let sy = y.saturating_sub(top).min(h - 1);
        *image.get_pixel(sx, sy)
    });
    let mask = GrayImage::from_fn(cw, ch, |x, y| {
        let inside = x >= left && x < left + w && y >= top && y < top + h;
        image::Luma([if inside { 0 } else { 255 }])
    });
    (canvas, mask)
}
