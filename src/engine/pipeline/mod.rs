//! Pipelines: the orchestration of tokenizer, text encoder, scheduler, U-Net and VAE for each job kind.

pub mod cohort;
pub mod conditioning;
mod denoise;
pub mod diffedit;
pub mod edit;
pub mod guidance;
pub mod invert;
pub mod joint_text;
pub mod mask;
mod noise;
pub mod packing;
pub mod prompt;
mod text_to_image;
pub mod vae;

pub use cohort::{can_share, text_to_image_cohort, CohortMember, ScheduleKey};
pub use diffedit::{diffedit, DiffEditOptions, DiffEditOutput};
pub use edit::{edit, edit_with, outpaint_canvas, EditMode, EditRequest};
pub use noise::BatchNoise;
pub use text_to_image::{text_to_image, text_to_image_with, GenerateRequest};

use image::RgbImage;

use super::preview::PreviewMode;
use super::rng::NoiseSource;

/// Inputs of a run beyond its request, for callers that replay a reference run or need diffusers' exact
/// distinction between an absent negative prompt and an empty one. The default changes nothing.
#[derive(Default)]
pub struct RunExtras<'a> {
    /// Noise for the scheduler's draws after the start (LCM between steps, ancestral and SDE schedulers)
    /// instead of the per-image seeded generators.
    pub step_noise: Option<&'a mut dyn NoiseSource>,
    /// Encode an empty negative prompt even when the model zeroes absent ones (SDXL base's
    /// `force_zeros_for_empty_prompt`): diffusers' `negative_prompt=""` rather than `None`. A request's empty
    /// negative prompt otherwise means "none".
    pub encode_empty_negative: bool,
}

impl RunExtras<'_> {
    /// The negative prompt of `request` as diffusers would receive it: `None` when empty (unless
    /// [`Self::encode_empty_negative`]).
    pub fn negative_prompt<'r>(&self, request: &'r GenerateRequest) -> Option<&'r str> {
        let text = request.negative_prompt.as_str();
        (!text.is_empty() || self.encode_empty_negative).then_some(text)
    }
}

/// What a pipeline reports after each denoiser call, and how it learns that it should stop.
pub trait StepObserver {
    /// Called after denoiser call `step` (1-based) of `total`, with a preview when [`Self::preview_wanted`]
    /// asked for one.
    fn on_step(&mut self, step: usize, total: usize, preview: Option<RgbImage>);
    /// Whether to render a preview after call `step`, and how. Previews cost time, so the default is never.
    fn preview_wanted(&self, _step: usize, _total: usize) -> Option<PreviewMode> {
        None
    }
    /// Checked before every denoiser call; `true` stops the run with [`super::EngineError::Cancelled`].
    fn should_stop(&self) -> bool {
        false
    }
}

/// An observer that ignores progress and never stops: for tools and tests.
#[derive(Debug, Default)]
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn on_step(&mut self, _step: usize, _total: usize, _preview: Option<RgbImage>) {}
}
