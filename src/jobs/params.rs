//! The parameters stored with a job: what the API validated and what a worker needs to run it again,
//! identically, after any number of restarts.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::engine::image::OutputFormat;
use crate::engine::input::ResizeMode;
use crate::engine::pipeline::{EditMode, EditRequest, GenerateRequest};
use crate::engine::preview::PreviewMode;
use crate::engine::scheduler::SchedulerKind;

/// Job kind of text-to-image jobs in the store.
pub const KIND_GENERATE: &str = "generate";

/// Job kind of edit jobs in the store.
pub const KIND_EDIT: &str = "edit";

/// Stored parameters of a text-to-image job. Every default is resolved before storing (the seed too), so a
/// retried job produces the same pictures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// What to draw.
    pub prompt: String,
    /// What to avoid.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f32,
    /// Guidance rescale in [0, 1].
    #[serde(default)]
    pub guidance_rescale: f32,
    /// Canonical scheduler name.
    pub scheduler: String,
    /// Seed of the first image; image `i` uses `seed + i`.
    pub seed: u64,
    /// Number of images.
    pub n: u32,
    /// Encoding of the stored images.
    pub output_format: OutputFormat,
    /// JPEG quality (1–100) when the client chose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_quality: Option<u8>,
    /// Denoiser calls between step previews (0: none).
    #[serde(default)]
    pub preview_every: u32,
    /// How previews are rendered.
    #[serde(default)]
    pub preview: PreviewMode,
    /// Base64 `.npy` float32 initial latents, when the client supplied them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
}

impl GenerateParams {
    /// Rebuilds the engine request. Fails only if the stored JSON was tampered with or the scheduler name
    /// is no longer known.
    pub fn to_request(&self) -> Result<GenerateRequest, String> {
        let scheduler = SchedulerKind::from_request_name(&self.scheduler)
            .ok_or_else(|| format!("unknown scheduler `{}`", self.scheduler))?;
        let latents = match &self.latents {
            None => None,
            Some(b64) => {
                let bytes =
                    base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("latents: {e}"))?;
                Some(crate::engine::npy::read_f32(&bytes).map_err(|e| format!("latents: {e}"))?)
            }
        };
        Ok(GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            guidance_rescale: self.guidance_rescale,
            scheduler,
            seed: self.seed,
            images: self.n,
            latents,
        })
    }
}

/// Stored parameters of an edit job: the generation parameters plus the edit and where its prepared input
/// picture and mask (already at the final size) are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditParams {
    /// Prompt, size (of the final canvas), steps, guidance, scheduler, seed, images, format, previews.
    #[serde(flatten)]
    pub generate: GenerateParams,
    /// `img2img`, `inpaint`, `outpaint` or `instruct`.
    pub mode: String,
    /// How much of the picture is redrawn.
    pub strength: f32,
    /// InstructPix2Pix image guidance.
    pub image_guidance_scale: f32,
    /// Feathering of the pixel blend (plain-model inpainting).
    pub mask_blur: u32,
    /// How the input was fitted to the size.
    pub resize_mode: ResizeMode,
    /// The prepared picture, relative to `data_dir`.
    pub image_path: String,
    /// The prepared mask (white = repaint), relative to `data_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_path: Option<String>,
}

impl EditParams {
    /// Rebuilds the engine request with the stored picture and mask (already decoded by the caller).
    pub fn to_request(&self, image: image::RgbImage, mask: Option<image::GrayImage>) -> Result<EditRequest, String> {
        let mode = match self.mode.as_str() {
            "img2img" => EditMode::Img2img,
            "inpaint" | "outpaint" => EditMode::Inpaint,
            "instruct" => EditMode::Instruct,
            other => return Err(format!("unknown edit mode `{other}`")),
        };
        Ok(EditRequest {
            base: self.generate.to_request()?,
            mode,
            image,
            mask,
            strength: self.strength,
            image_guidance_scale: self.image_guidance_scale,
            mask_blur: self.mask_blur,
        })
    }

    /// Steps the client will see: img2img and partial-strength inpainting run `strength` of the schedule,
    /// as diffusers counts them.
    pub fn visible_steps(&self) -> u32 {
        let steps = self.generate.steps;
        if self.mode == "instruct" {
            return steps;
        }
        ((steps as f32 * self.strength) as u32).clamp(1, steps)
    }
}
