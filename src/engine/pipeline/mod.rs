//! Pipelines: the orchestration of tokenizer, text encoder, scheduler, U-Net and VAE for each job kind.

mod denoise;
pub mod edit;
pub mod guidance;
pub mod mask;
mod noise;
mod prompt;
mod text_to_image;
pub mod vae;

pub use edit::{edit, outpaint_canvas, EditMode, EditRequest};
pub use noise::BatchNoise;
pub use text_to_image::{text_to_image, GenerateRequest};

use image::RgbImage;

use super::preview::PreviewMode;

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
