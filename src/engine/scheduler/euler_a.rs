//! `EulerAncestralDiscreteScheduler`: Euler steps down to `sigma_down`, then fresh noise back up to the
//! next sigma (k-diffusion's `sample_euler_ancestral`, eta = 1).

use super::betas::{BetaSpec, Rescale};
use super::config::{PredictionType, SchedulerConfig};
use super::error::SchedulerError;
use super::euler::{sigma_schedule, SigmaOptions};
use super::ops::{draw_noise, map3_f32};
use super::sigma_run::{SigmaRun, SigmaStepper};
use super::{StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// A configured Euler ancestral run.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    run: SigmaRun,
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
        Ok(Self { run: SigmaRun::new(cfg, CLASS, sched.timesteps, sched.sigmas, prediction) })
    }
}

impl SigmaStepper for EulerAncestral {
    fn run(&self) -> &SigmaRun {
        &self.run
    }

    fn step_sigma(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let sigma = self.run.sigmas[call];
        let (from, to) = (sigma, self.run.sigmas[call + 1]);
        let x0 = self.run.x0(sigma, &model_output, &sample);
        let (from, to) = (from as f32, to as f32);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let s = from;
        let dt = down - s;
        let z = draw_noise(noise, model_output.shape());
        let prev_sample = map3_f32(&sample, &x0.view(), &z.view(), |x, x0, z| x + (x - x0) / s * dt + z * up);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }
}
