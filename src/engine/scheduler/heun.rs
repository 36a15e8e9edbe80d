//! `HeunDiscreteScheduler`: Heun's second-order method in sigma space (Karras et al. 2022, algorithm 1).
//! Each step but the last makes two U-Net calls (an Euler predictor and a trapezoidal corrector), so a run
//! of N steps makes 2N-1 calls.

use ndarray::ArrayD;

use super::betas::{BetaSpec, Rescale};
use super::config::{reject_flag, PredictionType, SchedulerConfig};
use super::ddim::x0_bound_clip_only;
use super::error::SchedulerError;
use super::euler::{sigma_schedule, SigmaOptions};
use super::ops::{map2, map3, X0Bound};
use super::sigma_run::{SigmaRun, SigmaStepper};
use super::{StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "HeunDiscreteScheduler";

/// The first-order half of a step, kept for its corrector call.
#[derive(Debug, Clone)]
struct Pending {
    derivative: ArrayD<f32>,
    dt: f64,
    sample: ArrayD<f32>,
}

/// A configured Heun run.
#[derive(Debug, Clone)]
pub struct Heun {
    run: SigmaRun,
    n: usize,
    bound: X0Bound,
    pending: Option<Pending>,
}

impl Heun {
    /// `HeunDiscreteScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        reject_flag(cfg.use_exponential_sigmas, "use_exponential_sigmas", CLASS)?;
        reject_flag(cfg.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let opts = SigmaOptions {
            class: CLASS,
            beta: BetaSpec {
                class: CLASS,
                start: 0.00085,
                end: 0.012,
                schedule: "linear",
                extra: &["exp"],
                rescale: Rescale::Ignored,
            },
            karras: true,
            final_sigmas: false,
            sigma_bounds: false,
        };
        let sched = sigma_schedule(cfg, n, &opts)?;
        // sigmas: s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0; timesteps: t0, t1, t1, ..., t_{n-1}, t_{n-1}.
        let k = sched.sigmas.len();
        let mut sigmas = vec![sched.sigmas[0]];
        for &s in &sched.sigmas[1..k - 1] {
            sigmas.extend([s, s]);
        }
        sigmas.push(sched.sigmas[k - 1]);
        let mut timesteps = vec![sched.timesteps[0]];
        for &t in &sched.timesteps[1..] {
            timesteps.extend([t, t]);
        }
        Ok(Self {
            run: SigmaRun::new(cfg, CLASS, timesteps, sigmas, prediction),
            n,
            bound: x0_bound_clip_only(cfg),
            pending: None,
        })
    }
}

impl SigmaStepper for Heun {
    fn run(&self) -> &SigmaRun {
        &self.run
    }

    fn step_sigma(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        match self.pending.take() {
            None => {
                let sigma = self.run.sigmas[call];
                let next = self.run.sigmas[call + 1];
                let x0 = self.bound.apply(self.run.x0(sigma, &model_output, &sample));
                let derivative = map2(&sample, &x0.view(), |x, x0| (x - x0) / sigma);
                let dt = next - sigma;
                let prev_sample = map2(&sample, &derivative.view(), |x, d| x + d * dt);
                self.pending = Some(Pending { derivative, dt, sample: sample.to_owned() });
                StepOutput { prev_sample, pred_original_sample: Some(x0) }
            }
            Some(p) => {
                let next = self.run.sigmas[call];
                let x0 = self.bound.apply(self.run.x0(next, &model_output, &sample));
                let derivative = map3(&sample, &x0.view(), &p.derivative.view(), |x, x0, d0| {
                    let d1 = (x - x0) / next;
                    (d0 + d1) / 2.0
                });
                let dt = p.dt;
                let prev_sample = map2(&p.sample.view(), &derivative.view(), |x, d| x + d * dt);
                StepOutput { prev_sample, pred_original_sample: Some(x0) }
            }
        }
    }

    fn steps(&self) -> usize {
        self.n
    }

    fn calls_per_step(&self) -> usize {
        2
    }
}
