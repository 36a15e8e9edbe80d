//! The bookkeeping every discrete sigma-space scheduler (Euler, Euler ancestral, Heun) shares: the
//! timestep and sigma of each call, the initial noise scale, input scaling by `sqrt(sigma^2 + 1)`, the
//! clean-sample estimate and img2img noising. A family implements [`SigmaStepper`] — its own step rule
//! over a [`SigmaRun`] — and gets the whole [`Scheduler`] interface from it.

use ndarray::{ArrayD, ArrayViewD};

use super::config::{PredictionType, SchedulerConfig};
use super::euler::{scale_by_sigma, sigma_init_noise, sigma_x0};
use super::ops::sigma_add_noise;
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

/// One configured sigma-space run.
#[derive(Debug, Clone)]
pub struct SigmaRun {
    /// Timestep passed to the U-Net at each call.
    pub timesteps: Vec<f64>,
    /// Sigma of each call plus the final one.
    pub sigmas: Vec<f64>,
    /// `init_noise_sigma`.
    pub init_sigma: f64,
    /// What the U-Net predicts.
    pub prediction: PredictionType,
}

impl SigmaRun {
    /// A run over `timesteps` and `sigmas` of class `class`, whose initial noise scale follows from them.
    pub fn new(
        cfg: &SchedulerConfig,
        class: &'static str,
        timesteps: Vec<f64>,
        sigmas: Vec<f64>,
        prediction: PredictionType,
    ) -> Self {
        Self { init_sigma: sigma_init_noise(cfg, &sigmas, class), timesteps, sigmas, prediction }
    }

    /// The clean-sample estimate at noise level `sigma`.
    pub fn x0(&self, sigma: f64, model_output: &ArrayViewD<'_, f32>, sample: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        sigma_x0(self.prediction, sigma, model_output, sample)
    }
}

/// A sigma-space family: its step rule over a [`SigmaRun`]. Every such type is a [`Scheduler`].
pub trait SigmaStepper: Send {
    /// The run's timesteps and sigmas.
    fn run(&self) -> &SigmaRun;

    /// [`Scheduler::step`] for this family.
    fn step_sigma(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput;

    /// [`Scheduler::num_inference_steps`] (Heun: fewer than its calls).
    fn steps(&self) -> usize {
        self.run().timesteps.len()
    }

    /// [`Scheduler::order`].
    fn calls_per_step(&self) -> usize {
        1
    }
}

impl<T: SigmaStepper> Scheduler for T {
    fn timesteps(&self) -> &[f64] {
        &self.run().timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.run().init_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        scale_by_sigma(&sample, self.run().sigmas[call])
    }

    fn step(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput {
        self.step_sigma(input, noise)
    }

    fn num_inference_steps(&self) -> usize {
        self.steps()
    }

    fn order(&self) -> usize {
        self.calls_per_step()
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.run().sigmas)
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        sigma_add_noise(self.run().sigmas[call], &original, &noise)
    }
}
