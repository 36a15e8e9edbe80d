//! Pipelines: the orchestration of tokenizer, text encoder, scheduler, U-Net and VAE for each job kind.

pub mod guidance;
mod noise;
mod text_to_image;

pub use noise::BatchNoise;
pub use text_to_image::{text_to_image, GenerateRequest};

use ndarray::ArrayD;

/// What a pipeline reports after each denoiser call, and how it learns that it should stop.
pub trait StepObserver {
    /// Called after denoiser call `step` (1-based) of `total`. `predicted` is the scheduler's current estimate
    /// of the clean latents, when it has one (for previews).
    fn on_step(&mut self, step: usize, total: usize, predicted: Option<&ArrayD<f32>>);
    /// Checked before every denoiser call; `true` stops the run with [`super::EngineError::Cancelled`].
    fn should_stop(&self) -> bool {
        false
    }
}

/// An observer that ignores progress and never stops: for tools and tests.
#[derive(Debug, Default)]
pub struct NoObserver;

impl StepObserver for NoObserver {
    fn on_step(&mut self, _step: usize, _total: usize, _predicted: Option<&ArrayD<f32>>) {}
}
