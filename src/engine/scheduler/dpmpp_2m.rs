//! `DPMSolverMultistepScheduler` (Lu et al. 2022): DPM-Solver++ and its SDE variant, multistep orders 1-3.
//! The request names `dpmpp_2m`, `dpmpp_2m_karras` and `dpmpp_2m_sde_karras` all build this class.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, train_sigmas, BetaSpec, Rescale};
use super::config::{reject_flag, unsupported, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::error::SchedulerError;
use super::ops::{draw_noise, map2, map3, map4, X0Bound};
use super::sigmas::{interp, karras, log_sigmas, multistep_timesteps, sigma_to_t};
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "DPMSolverMultistepScheduler";

/// `(alpha_t, sigma_t, lambda_t)` of a sigma, in float32 as diffusers' `_sigma_to_alpha_sigma_t`.
pub(crate) fn alpha_sigma_lambda(sigma: f64) -> (f32, f32, f32) {
    let s = sigma as f32;
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    let sigma_t = s * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

/// `add_noise` of the multistep solvers: `alpha_t * x + sigma_t * noise` at the call's sigma.
pub(crate) fn multistep_add_noise(
    sigma: f64,
    original: &ArrayViewD<'_, f32>,
    noise: &ArrayViewD<'_, f32>,
) -> ArrayD<f32> {
    let (a, s, _) = alpha_sigma_lambda(sigma);
    let (a, s) = (a as f64, s as f64);
    map2(original, noise, |x, n| a * x + s * n)
}

/// The data-prediction (x0) conversion shared by the multistep solvers.
pub(crate) fn multistep_x0(
    prediction: PredictionType,
    sigma: f64,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayViewD<'_, f32>,
) -> ArrayD<f32> {
    let (alpha, sigma_t, _) = alpha_sigma_lambda(sigma);
    let (a, s) = (alpha as f64, sigma_t as f64);
    match prediction {
        PredictionType::Epsilon => map2(sample, model_output, |x, e| (x - s * e) / a),
        PredictionType::VPrediction => map2(sample, model_output, |x, v| a * x - s * v),
        PredictionType::Sample => model_output.to_owned(),
    }
}

/// `thresholding` into an [`X0Bound`] (the multistep solvers have no `clip_sample`).
pub(crate) fn threshold_bound(cfg: &SchedulerConfig) -> X0Bound {
    if cfg.thresholding.unwrap_or(false) {
        X0Bound::Dynamic {
            ratio: cfg.dynamic_thresholding_ratio.unwrap_or(0.995),
            max: cfg.sample_max_value.unwrap_or(1.0),
        }
    } else {
        X0Bound::None
    }
}

/// The solver a config asks for; options this implementation does not reproduce are errors.
struct Solver {
    sde: bool,
    heun: bool,
    order: usize,
}

fn solver(cfg: &SchedulerConfig) -> Result<Solver, SchedulerError> {
    for (flag, name) in [
        (cfg.use_exponential_sigmas, "use_exponential_sigmas"),
        (cfg.use_beta_sigmas, "use_beta_sigmas"),
        (cfg.use_lu_lambdas, "use_lu_lambdas"),
        (cfg.use_flow_sigmas, "use_flow_sigmas"),
        (cfg.use_dynamic_shifting, "use_dynamic_shifting"),
    ] {
        reject_flag(flag, name, CLASS)?;
    }
    let sde = match cfg.algorithm_type.as_deref() {
        None | Some("dpmsolver++") | Some("deis") => false,
        Some("sde-dpmsolver++") => true,
        Some(other) => return Err(unsupported("algorithm_type", other, CLASS)),
    };
    let heun = match cfg.solver_type.as_deref() {
        None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => false,
        Some("heun") => true,
        Some(other) => return Err(unsupported("solver_type", other, CLASS)),
    };
    let order = cfg.solver_order.unwrap_or(2);
    if !(1..=3).contains(&order) {
        return Err(unsupported("solver_order", order, CLASS));
    }
    if let Some(v @ ("learned" | "learned_range")) = cfg.variance_type.as_deref() {
        return Err(unsupported("variance_type", v, CLASS));
    }
    Ok(Solver { sde, heun, order })
}

/// `set_timesteps(n)`: the timesteps, the sigmas (plus the final one, float32 values) and the final-sigma
/// rule.
fn schedule(cfg: &SchedulerConfig, n: usize) -> Result<(Vec<f64>, Vec<f64>, FinalSigmas), SchedulerError> {
    let acp = alphas_cumprod(cfg, &BetaSpec::linear(CLASS, Rescale::TerminalEpsilon))?;
    let train = cfg.checked_train_steps(n, CLASS)?;
    let spacing = cfg.spacing(TimestepSpacing::Linspace, CLASS)?;
    // lambda_min_clipped: searchsorted over the ascending (flipped) lambda(t).
    let clip = cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
    let clipped_idx = acp
        .iter()
        .filter(|&&a| {
            let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
            (lambda as f64) < clip
        })
        .count();
    let last_timestep = train - clipped_idx;
    let full = train_sigmas(&acp);
    let mut ts: Vec<f64> =
        multistep_timesteps(spacing, n, train, last_timestep, cfg.offset()).into_iter().map(|t| t as f64).collect();
    let mut sigmas: Vec<f64>;
    if cfg.use_karras_sigmas.unwrap_or(false) {
        let logs = log_sigmas(&full);
        sigmas = karras(full[0] as f64, full[train - 1] as f64, n);
        let round = cfg.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
        ts = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                if round {
                    t.round_ties_even()
                } else {
                    t.trunc()
                }
            })
            .collect();
    } else {
        sigmas = ts.iter().map(|&t| interp(t, &full)).collect();
    }
    if ts.iter().any(|&t| t < 0.0 || t >= train as f64) {
        return Err(SchedulerError::InvalidSteps {
            class: CLASS,
            steps: n,
            reason: "a timestep falls outside the training schedule (check steps_offset)".into(),
        });
    }
    let final_sigmas = cfg.final_sigmas(CLASS)?;
    sigmas.push(match final_sigmas {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => full[0] as f64,
    });
    Ok((ts, sigmas.into_iter().map(|s| s as f32 as f64).collect(), final_sigmas))
}

/// A configured DPM-Solver++ run.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    n: usize,
    prediction: PredictionType,
    bound: X0Bound,
    order: usize,
    sde: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    history: Vec<ArrayD<f32>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    /// `DPMSolverMultistepScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let Solver { sde, heun, order } = solver(cfg)?;
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let (timesteps, sigmas, final_sigmas) = schedule(cfg, n)?;
        Ok(Self {
            timesteps,
            sigmas,
            n,
            prediction,
            bound: threshold_bound(cfg),
            order,
            sde,
            heun,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_zero: final_sigmas == FinalSigmas::Zero,
            history: Vec::new(),
            lower_order_nums: 0,
        })
    }

    fn first_order(&self, call: usize, x: &ArrayViewD<'_, f32>, noise: Option<&ArrayD<f32>>) -> ArrayD<f32> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[call + 1]);
        let (_, s_s, l_s) = alpha_sigma_lambda(self.sigmas[call]);
        let h = l_t - l_s;
        let m0 = self.history[self.history.len() - 1].view();
        match noise {
            None => {
                let cx = (s_t / s_s) as f64;
                let cm = (a_t * ((-h).exp() - 1.0)) as f64;
                map2(x, &m0, |x, m| cx * x - cm * m)
            }
            Some(z) => {
                let cx = (s_t / s_s * (-h).exp()) as f64;
                let cm = (a_t * (1.0 - (-2.0 * h).exp())) as f64;
                let cz = (s_t * (1.0 - (-2.0 * h).exp()).sqrt()) as f64;
                map3(x, &m0, &z.view(), |x, m, z| cx * x + cm * m + cz * z)
            }
        }
    }

    fn second_order(&self, call: usize, x: &ArrayViewD<'_, f32>, noise: Option<&ArrayD<f32>>) -> ArrayD<f32> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[call + 1]);
        let (_, s_s0, l_s0) = alpha_sigma_lambda(self.sigmas[call]);
        let (_, _, l_s1) = alpha_sigma_lambda(self.sigmas[call - 1]);
        let k = self.history.len();
        let (m0, m1) = (self.history[k - 1].view(), self.history[k - 2].view());
        let (h, h0) = (l_t - l_s0, l_s0 - l_s1);
        let r0 = h0 / h;
        let inv_r0 = (1.0 / r0) as f64;
        // D1 = (m0 - m1) / r0, rounded to float32 as torch stores it.
        let d1 = map2(&m0, &m1, |a, b| inv_r0 * ((a as f32 - b as f32) as f64));
        match noise {
            None => {
                let cx = (s_t / s_s0) as f64;
                let e = (-h).exp() - 1.0;
                let c0 = (a_t * e) as f64;
                let c1 = if self.heun { -((a_t * (e / h + 1.0)) as f64) } else { (0.5 * (a_t * e)) as f64 };
                map3(x, &m0, &d1.view(), |x, d0, d1| cx * x - c0 * d0 - c1 * d1)
            }
            Some(z) => {
                let cx = (s_t / s_s0 * (-h).exp()) as f64;
                let e = 1.0 - (-2.0 * h).exp();
                let c0 = (a_t * e) as f64;
                let c1 = if self.heun { (a_t * (e / (-2.0 * h) + 1.0)) as f64 } else { (0.5 * (a_t * e)) as f64 };
                let cz = (s_t * e.sqrt()) as f64;
                map4(x, &m0, &d1.view(), &z.view(), |x, d0, d1, z| cx * x + c0 * d0 + c1 * d1 + cz * z)
            }
        }
    }

    fn third_order(&self, call: usize, x: &ArrayViewD<'_, f32>, noise: Option<&ArrayD<f32>>) -> ArrayD<f32> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[call + 1]);
        let (_, s_s0, l_s0) = alpha_sigma_lambda(self.sigmas[call]);
        let (_, _, l_s1) = alpha_sigma_lambda(self.sigmas[call - 1]);
        let (_, _, l_s2) = alpha_sigma_lambda(self.sigmas[call - 2]);
        let k = self.history.len();
        let (m0, m1, m2) = (self.history[k - 1].view(), self.history[k - 2].view(), self.history[k - 3].view());
        let (h, h0, h1) = (l_t - l_s0, l_s0 - l_s1, l_s1 - l_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let (i0, i1) = ((1.0 / r0) as f64, (1.0 / r1) as f64);
        let w = (r0 / (r0 + r1)) as f64;
        let v = (1.0 / (r0 + r1)) as f64;
        let d1_0 = map2(&m0, &m1, |a, b| i0 * (a - b));
        let d1_1 = map2(&m1, &m2, |a, b| i1 * (a - b));
        let d1 = map2(&d1_0.view(), &d1_1.view(), |p, q| p + w * (p - q));
        let d2 = map2(&d1_0.view(), &d1_1.view(), |p, q| v * (p - q));
        let sum = match noise {
            None => {
                let e = (-h).exp() - 1.0;
                let cx = (s_t / s_s0) as f64;
                let c0 = -((a_t * e) as f64);
                let c1 = (a_t * (e / h + 1.0)) as f64;
                let c2 = -((a_t * ((e + h) / (h * h) - 0.5)) as f64);
                map4(x, &m0, &d1.view(), &d2.view(), |x, d0, d1, d2| cx * x + c0 * d0 + c1 * d1 + c2 * d2)
            }
            Some(_) => {
                let e = 1.0 - (-2.0 * h).exp();
                let cx = (s_t / s_s0 * (-h).exp()) as f64;
                let c0 = (a_t * e) as f64;
                let c1 = (a_t * (e / (-2.0 * h) + 1.0)) as f64;
                let c2 = (a_t * ((e - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5)) as f64;
                map4(x, &m0, &d1.view(), &d2.view(), |x, d0, d1, d2| cx * x + c0 * d0 + c1 * d1 + c2 * d2)
            }
        };
        match noise {
            None => sum,
            Some(z) => {
                let cz = (s_t * (1.0 - (-2.0 * h).exp()).sqrt()) as f64;
                map2(&sum.view(), &z.view(), |s, z| s + cz * z)
            }
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let len = self.timesteps.len();
        let lower_final =
            call == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let lower_second = call + 2 == len && self.lower_order_final && len < 15;
        let x0 = self.bound.apply(multistep_x0(self.prediction, self.sigmas[call], &model_output, &sample));
        self.history.push(x0.clone());
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let z = if self.sde { Some(draw_noise(noise, model_output.shape())) } else { None };
        let prev_sample = if self.order == 1 || self.lower_order_nums < 1 || lower_final {
            self.first_order(call, &sample, z.as_ref())
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_second {
            self.second_order(call, &sample, z.as_ref())
        } else {
            self.third_order(call, &sample, z.as_ref())
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        multistep_add_noise(self.sigmas[call], &original, &noise)
    }
}
