//! `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022,
//! algorithm 2 without churn). Also home of the sigma schedule shared by Euler ancestral and Heun.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, train_sigmas, BetaSpec, Rescale};
use super::config::{reject_flag, unsupported, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SchedulerError;
use super::ops::{map1, map2_f32};
use super::sigma_run::{SigmaRun, SigmaStepper};
use super::sigmas::{float_timesteps, interp, karras, log_sigmas, sigma_to_t};
use super::{StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "EulerDiscreteScheduler";

/// Timesteps and sigmas (both float32 values) of a discrete sigma-space scheduler.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    /// Timestep of each step.
    pub timesteps: Vec<f64>,
    /// Sigma of each step plus the final sigma.
    pub sigmas: Vec<f64>,
}

/// Options of [`sigma_schedule`] that differ between the discrete sigma-space classes.
pub(crate) struct SigmaOptions {
    pub class: &'static str,
    pub beta: BetaSpec,
    /// Whether the class reads `use_karras_sigmas`.
    pub karras: bool,
    /// Whether the class reads `final_sigmas_type` (otherwise the final sigma is 0).
    pub final_sigmas: bool,
    /// Whether the class reads `sigma_min` / `sigma_max` for the Karras ramp.
    pub sigma_bounds: bool,
}

/// The `set_timesteps` of Euler, Euler ancestral and Heun (before Heun's doubling).
pub(crate) fn sigma_schedule(
    cfg: &SchedulerConfig,
    n: usize,
    opts: &SigmaOptions,
) -> Result<SigmaSchedule, SchedulerError> {
    let class = opts.class;
    let acp = alphas_cumprod(cfg, &opts.beta)?;
    let train = cfg.checked_train_steps(n, class)?;
    let spacing = cfg.spacing(TimestepSpacing::Linspace, class)?;
    let mut timesteps = float_timesteps(spacing, n, train, cfg.offset());
    if timesteps.iter().any(|&t| t < 0.0 || t > (train - 1) as f64) {
        return Err(SchedulerError::InvalidSteps {
            class,
            steps: n,
            reason: "a timestep falls outside the training schedule (check steps_offset)".into(),
        });
    }
    let full = train_sigmas(&acp);
    let logs = log_sigmas(&full);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &full)).collect();
    if opts.karras && cfg.use_karras_sigmas.unwrap_or(false) {
        let lo = cfg.sigma_min.filter(|_| opts.sigma_bounds).unwrap_or(sigmas[sigmas.len() - 1]);
        let hi = cfg.sigma_max.filter(|_| opts.sigma_bounds).unwrap_or(sigmas[0]);
        sigmas = karras(lo, hi, n);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32 as f64).collect();
    }
    let last =
        if opts.final_sigmas && cfg.final_sigmas(class)? == FinalSigmas::SigmaMin { full[0] as f64 } else { 0.0 };
    sigmas.push(last);
    let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    Ok(SigmaSchedule { timesteps, sigmas })
}

/// `init_noise_sigma` of the sigma-space classes: the largest sigma, or `sqrt(max^2 + 1)` for `leading`.
pub(crate) fn sigma_init_noise(cfg: &SchedulerConfig, sigmas: &[f64], class: &'static str) -> f64 {
    let max = sigmas.iter().copied().fold(0.0f64, f64::max) as f32;
    match cfg.spacing(TimestepSpacing::Linspace, class) {
        Ok(TimestepSpacing::Leading) => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// `sample / sqrt(sigma^2 + 1)`, the divisor rounded to float32 as diffusers computes it.
pub(crate) fn scale_by_sigma(sample: &ArrayViewD<'_, f32>, sigma: f64) -> ArrayD<f32> {
    let s = sigma as f32;
    let d = (s * s + 1.0).sqrt() as f64;
    map1(sample, |x| x / d)
}

/// The clean-sample estimate of the sigma-space classes at noise level `sigma`.
pub(crate) fn sigma_x0(
    prediction: PredictionType,
    sigma: f64,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayViewD<'_, f32>,
) -> ArrayD<f32> {
    let s = sigma as f32;
    match prediction {
        PredictionType::Epsilon => map2_f32(sample, model_output, |x, e| x - s * e),
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let d = s * s + 1.0;
            map2_f32(sample, model_output, |x, v| v * c_out + x / d)
        }
        PredictionType::Sample => model_output.to_owned(),
    }
}

/// A configured Euler run.
#[derive(Debug, Clone)]
pub struct Euler {
    run: SigmaRun,
}

impl Euler {
    /// `EulerDiscreteScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        reject_flag(cfg.use_exponential_sigmas, "use_exponential_sigmas", CLASS)?;
        reject_flag(cfg.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        match cfg.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => return Err(unsupported("interpolation_type", other, CLASS)),
        }
        let continuous = match cfg.timestep_type.as_deref() {
            None | Some("discrete") => false,
            Some("continuous") => true,
            Some(other) => return Err(unsupported("timestep_type", other, CLASS)),
        };
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let opts = SigmaOptions {
            class: CLASS,
            beta: BetaSpec::linear(CLASS, Rescale::TerminalEpsilon),
            karras: true,
            final_sigmas: true,
            sigma_bounds: true,
        };
        let sched = sigma_schedule(cfg, n, &opts)?;
        let timesteps = if continuous && prediction == PredictionType::VPrediction {
            let k = sched.sigmas.len() - 1;
            sched.sigmas[..k].iter().map(|&s| (0.25 * (s as f32).ln()) as f64).collect()
        } else {
            sched.timesteps
        };
        Ok(Self { run: SigmaRun::new(cfg, CLASS, timesteps, sched.sigmas, prediction) })
    }
}

impl SigmaStepper for Euler {
    fn run(&self) -> &SigmaRun {
        &self.run
    }

    fn step_sigma(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let sigma = self.run.sigmas[call];
        let x0 = self.run.x0(sigma, &model_output, &sample);
        let s = sigma as f32;
        let dt = self.run.sigmas[call + 1] as f32 - s;
        let prev_sample = map2_f32(&sample, &x0.view(), |x, x0| x + (x - x0) / s * dt);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }
}
