//! Noise schedulers, computed exactly as Hugging Face diffusers computes them.
//!
//! Interface contract used by the pipelines (the implementation fills in the families):
//! a scheduler is built from the model's `scheduler_config.json` plus a step count, exposes the timestep of
//! every denoiser call, scales the model input, and advances the sample one denoiser call at a time.

use ndarray::{ArrayD, ArrayViewD};

use super::rng::NoiseSource;

/// Result of one denoiser call.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample to feed to the next call (or the final latents after the last call).
    pub prev_sample: ArrayD<f32>,
    /// The scheduler's estimate of the clean latents, when it has one (used for step previews).
    pub pred_original_sample: Option<ArrayD<f32>>,
}

/// One configured scheduler run: `set_timesteps` already applied.
pub trait Scheduler: Send {
    /// Timestep passed to the U-Net for each denoiser call, in call order (Heun: 2N-1 entries).
    fn timesteps(&self) -> &[f64];
    /// Factor applied to unit-Gaussian noise to form the starting sample.
    fn init_noise_sigma(&self) -> f64;
    /// `scale_model_input` for call index `call`.
    fn scale_model_input(&self, sample: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32>;
    /// Advances the sample through call index `call` given the U-Net output.
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn NoiseSource,
    ) -> StepOutput;
}

// --- temporary stand-in until the scheduler family lands (replaced on merge) ---
/// Model scheduler config.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name`
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
}
/// Scheduler families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// DDIM
    Ddim,
}
impl SchedulerKind {
    /// From diffusers class.
    pub fn from_class_name(_c: &str) -> Option<Self> {
        Some(SchedulerKind::Ddim)
    }
    /// From request name.
    pub fn from_request_name(_c: &str) -> Option<Self> {
        Some(SchedulerKind::Ddim)
    }
    /// All.
    pub fn all() -> &'static [SchedulerKind] {
        &[SchedulerKind::Ddim]
    }
    /// Name.
    pub fn name(self) -> &'static str {
        "ddim"
    }
}
/// Builds.
pub fn build(_k: SchedulerKind, _c: &SchedulerConfig, _n: usize) -> Result<Box<dyn Scheduler>, String> {
    Err("not yet".into())
}
