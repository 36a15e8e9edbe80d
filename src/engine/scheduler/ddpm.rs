//! `DDPMScheduler` (Ho et al. 2020): the ancestral sampler of the original diffusion paper, drawing fresh
//! noise at every step except the last.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, BetaSpec, Rescale};
use super::config::{unsupported, PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddim::{check_timesteps, x0_and_eps, x0_bound};
use super::error::SchedulerError;
use super::ops::{alpha_add_noise, draw_noise, map2, map3, X0Bound};
use super::sigmas::integer_timesteps;
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "DDPMScheduler";

/// The supported `variance_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    Small,
    SmallLog,
    Large,
}

/// A configured DDPM run.
#[derive(Debug, Clone)]
pub struct Ddpm {
    acp: Vec<f32>,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    n: usize,
    prediction: PredictionType,
    bound: X0Bound,
    variance: Variance,
}

impl Ddpm {
    /// `DDPMScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let spec = BetaSpec { extra: &["sigmoid"], ..BetaSpec::linear(CLASS, Rescale::Plain) };
        let acp = alphas_cumprod(cfg, &spec)?;
        let train = cfg.train_steps();
        let spacing = cfg.spacing(TimestepSpacing::Leading, CLASS)?;
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let variance = match cfg.variance_type.as_deref() {
            None | Some("fixed_small") => Variance::Small,
            Some("fixed_small_log") => Variance::SmallLog,
            Some("fixed_large") => Variance::Large,
            Some(other) => return Err(unsupported("variance_type", other, CLASS)),
        };
        let ts = integer_timesteps(spacing, n, train, cfg.offset());
        check_timesteps(&ts, train, n, CLASS)?;
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            acp,
            n,
            prediction,
            bound: x0_bound(cfg, true),
            variance,
        })
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let t = self.ts[call];
        let prev = self.ts.get(call + 1).copied().unwrap_or(-1);
        let a_t = self.acp[t as usize] as f64;
        let a_prev = if prev >= 0 { self.acp[prev as usize] as f64 } else { 1.0 };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (x0, _) = x0_and_eps(self.prediction, a_t, &model_output, &sample);
        let x0 = self.bound.apply(x0);
        let c_x0 = a_prev.sqrt() * cur_beta / b_t;
        let c_x = cur_alpha.sqrt() * b_prev / b_t;
        let prev_sample = if t > 0 {
            let z = draw_noise(noise, model_output.shape());
            let small = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.variance {
                Variance::Small => small.sqrt(),
                Variance::SmallLog => (0.5 * small.ln()).exp(),
                Variance::Large => cur_beta.sqrt(),
            };
            map3(&x0.view(), &sample, &z.view(), |x0, x, z| c_x0 * x0 + c_x * x + std * z)
        } else {
            map2(&x0.view(), &sample, |x0, x| c_x0 * x0 + c_x * x)
        };
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        alpha_add_noise(self.acp[self.ts[call] as usize], &original, &noise)
    }
}
