//! `DDIMScheduler` (Song et al. 2020) with eta = 0: the deterministic DDIM sampler.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, BetaSpec, Rescale};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SchedulerError;
use super::ops::{alpha_add_noise, map2, X0Bound};
use super::sigmas::integer_timesteps;
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "DDIMScheduler";

/// A configured DDIM run.
#[derive(Debug, Clone)]
pub struct Ddim {
    acp: Vec<f32>,
    final_acp: f32,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    n: usize,
    stride: i64,
    prediction: PredictionType,
    bound: X0Bound,
}

/// Reads `thresholding` / `clip_sample` into an [`X0Bound`], with the class's `clip_sample` default.
pub(crate) fn x0_bound(cfg: &SchedulerConfig, clip_default: bool) -> X0Bound {
    if cfg.thresholding.unwrap_or(false) {
        X0Bound::Dynamic {
            ratio: cfg.dynamic_thresholding_ratio.unwrap_or(0.995),
            max: cfg.sample_max_value.unwrap_or(1.0),
        }
    } else if cfg.clip_sample.unwrap_or(clip_default) {
        X0Bound::Clip(cfg.clip_sample_range.unwrap_or(1.0))
    } else {
        X0Bound::None
    }
}

/// Checks that every timestep indexes the training schedule.
pub(crate) fn check_timesteps(ts: &[i64], train: usize, n: usize, class: &'static str) -> Result<(), SchedulerError> {
    if n > train {
        return Err(SchedulerError::InvalidSteps {
            class,
            steps: n,
            reason: format!("more than the {train} training timesteps"),
        });
    }
    if let Some(bad) = ts.iter().find(|&&t| t < 0 || t >= train as i64) {
        return Err(SchedulerError::InvalidSteps {
            class,
            steps: n,
            reason: format!("timestep {bad} falls outside the training schedule (check steps_offset)"),
        });
    }
    Ok(())
}

/// `(x0, eps)` from the model output under `prediction`, at cumulative alpha `a`.
pub(crate) fn x0_and_eps(
    prediction: PredictionType,
    a: f64,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayViewD<'_, f32>,
) -> (ArrayD<f32>, ArrayD<f32>) {
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    match prediction {
        PredictionType::Epsilon => (map2(sample, model_output, |x, e| (x - sb * e) / sa), model_output.to_owned()),
        PredictionType::Sample => (model_output.to_owned(), map2(sample, model_output, |x, x0| (x - sa * x0) / sb)),
        PredictionType::VPrediction => {
            (map2(sample, model_output, |x, v| sa * x - sb * v), map2(sample, model_output, |x, v| sa * v + sb * x))
        }
    }
}

impl Ddim {
    /// `DDIMScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let spec = BetaSpec::linear(CLASS, Rescale::Plain);
        let acp = alphas_cumprod(cfg, &spec)?;
        let train = cfg.train_steps();
        let spacing = cfg.spacing(TimestepSpacing::Leading, CLASS)?;
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let ts = integer_timesteps(spacing, n, train, cfg.offset());
        check_timesteps(&ts, train, n, CLASS)?;
        let final_acp = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { acp[0] };
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            ts,
            final_acp,
            acp,
            n,
            stride: (train / n) as i64,
            prediction,
            bound: x0_bound(cfg, true),
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let t = self.ts[call];
        let prev = t - self.stride;
        let a_t = self.acp[t as usize] as f64;
        let a_prev = if prev >= 0 { self.acp[prev as usize] } else { self.final_acp } as f64;
        let (x0, eps) = x0_and_eps(self.prediction, a_t, &model_output, &sample);
        let x0 = self.bound.apply(x0);
        let (c0, c1) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        let prev_sample = map2(&x0.view(), &eps.view(), |x, e| c0 * x + c1 * e);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        alpha_add_noise(self.acp[self.ts[call] as usize], &original, &noise)
    }
}

/// `clip_sample` only (classes without `thresholding`), with a `false` default.
pub(crate) fn x0_bound_clip_only(cfg: &SchedulerConfig) -> X0Bound {
    if cfg.clip_sample.unwrap_or(false) {
        X0Bound::Clip(cfg.clip_sample_range.unwrap_or(1.0))
    } else {
        X0Bound::None
    }
}
