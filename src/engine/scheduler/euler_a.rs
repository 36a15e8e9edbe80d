//! `EulerAncestralDiscreteScheduler`: Euler steps down to `sigma_down`, then fresh noise back up to the
//! next sigma (k-diffusion's `sample_euler_ancestral`, eta = 1).

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{BetaSpec, Rescale};
use super::config::{PredictionType, SchedulerConfig};
use super::error::SchedulerError;
use super::euler::{scale_by_sigma, sigma_init_noise, sigma_schedule, sigma_x0, SigmaOptions};
use super::ops::{draw_noise, map3_f32, sigma_add_noise};
use super::{Scheduler, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// A configured Euler ancestral run.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: PredictionType,
}

impl EulerAncestral {
    /// `EulerAncestralDiscreteScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let prediction = cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction])?;
        let opts = SigmaOptions {
            class: CLASS,
            beta: BetaSpec::linear(CLASS, Rescale::TerminalEpsilon),
            karras: false,
            final_sigmas: false,
            sigma_bounds: false,
        };
        let sched = sigma_schedule(cfg, n, &opts)?;
        Ok(Self {
            init_sigma: sigma_init_noise(cfg, &sched.sigmas, CLASS),
            timesteps: sched.timesteps,
            sigmas: sched.sigmas,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        scale_by_sigma(&sample, self.sigmas[call])
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn NoiseSource,
    ) -> StepOutput {
        let sigma = self.sigmas[call];
        let (from, to) = (sigma, self.sigmas[call + 1]);
        let x0 = sigma_x0(self.prediction, sigma, &model_output, &sample);
        let (from, to) = (from as f32, to as f32);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let s = from;
        let dt = down - s;
        let z = draw_noise(noise, model_output.shape());
        let prev_sample = map3_f32(&sample, &x0.view(), &z.view(), |x, x0, z| x + (x - x0) / s * dt + z * up);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        sigma_add_noise(self.sigmas[call], &original, &noise)
    }
}
