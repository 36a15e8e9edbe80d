//! `LCMScheduler` (Luo et al. 2023): multistep consistency sampling for latent consistency models: each call
//! jumps to a clean estimate and re-noises it to the next timestep with fresh noise.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, BetaSpec, Rescale};
use super::config::{unsupported, PredictionType, SchedulerConfig};
use super::ddim::{x0_and_eps, x0_bound};
use super::error::SchedulerError;
use super::ops::{alpha_add_noise, draw_noise, map2, X0Bound};
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "LCMScheduler";

/// A configured LCM run.
#[derive(Debug, Clone)]
pub struct Lcm {
    acp: Vec<f32>,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    bound: X0Bound,
    timestep_scaling: f64,
}

impl Lcm {
    /// `LCMScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let spec = BetaSpec {
            class: CLASS,
            start: 0.00085,
            end: 0.012,
            schedule: "scaled_linear",
            extra: &[],
            rescale: Rescale::Plain,
        };
        let acp = alphas_cumprod(cfg, &spec)?;
        let train = cfg.train_steps();
        // LCM reads timestep_spacing but its set_timesteps does not use it; only validate the value.
        cfg.spacing(super::config::TimestepSpacing::Leading, CLASS)?;
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let original = cfg.original_inference_steps.unwrap_or(50);
        if original == 0 || original > train {
            return Err(unsupported("original_inference_steps", original, CLASS));
        }
        let k = train / original;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k as i64 - 1).collect();
        let invalid = |reason: String| SchedulerError::InvalidSteps { class: CLASS, steps: n, reason };
        if n > train {
            return Err(invalid(format!("more than the {train} training timesteps")));
        }
        if n > original {
            return Err(invalid(format!("more than original_inference_steps = {original}")));
        }
        // np.floor(np.linspace(0, len, n, endpoint=False)).
        let step = origin.len() as f64 / n as f64;
        let ts: Vec<i64> = (0..n).map(|i| origin[(i as f64 * step).floor() as usize]).collect();
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            acp,
            prediction,
            bound: x0_bound(cfg, false),
            timestep_scaling: cfg.timestep_scaling.unwrap_or(10.0),
        })
    }
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let t = self.ts[call];
        let prev = self.ts.get(call + 1).copied().unwrap_or(t);
        let a_t = self.acp[t as usize] as f64;
        let a_prev = self.acp[prev as usize] as f64;
        // Boundary-condition scalings with sigma_data = 0.5.
        let scaled = t as f64 * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let (x0, _) = x0_and_eps(self.prediction, a_t, &model_output, &sample);
        let x0 = self.bound.apply(x0);
        let denoised = map2(&x0.view(), &sample, |x0, x| c_out * x0 + c_skip * x);
        let prev_sample = if call + 1 != self.ts.len() {
            let z = draw_noise(noise, model_output.shape());
            let (ca, cb) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
            map2(&denoised.view(), &z.view(), |d, z| ca * d + cb * z)
        } else {
            denoised.clone()
        };
        StepOutput { prev_sample, pred_original_sample: Some(denoised) }
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        alpha_add_noise(self.acp[self.ts[call] as usize], &original, &noise)
    }
}
