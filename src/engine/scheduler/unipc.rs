//! `UniPCMultistepScheduler` (Zhao et al. 2023): a unified predictor-corrector multistep solver; each call
//! first corrects the previous step with the new model output, then predicts the next sample.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::betas::{alphas_cumprod, train_sigmas, BetaSpec, Rescale};
use super::config::{reject_flag, unsupported, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
use super::dpmpp_2m::{alpha_sigma_lambda, multistep_add_noise, multistep_x0, threshold_bound};
use super::error::SchedulerError;
use super::ops::{map2, X0Bound};
use super::sigmas::{interp, karras, log_sigmas, multistep_timesteps, sigma_to_t};
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "UniPCMultistepScheduler";

/// See [`UniPc::span`].
struct Span<'a> {
    a_t: f32,
    s_t: f32,
    a_s0: f32,
    s_s0: f32,
    h: f32,
    m0: ArrayViewD<'a, f32>,
    older: Vec<(ArrayViewD<'a, f32>, f32)>,
    rks: Vec<f32>,
}

/// A configured UniPC run.
#[derive(Debug, Clone)]
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    n: usize,
    prediction: PredictionType,
    bound: X0Bound,
    order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    history: Vec<ArrayD<f32>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<ArrayD<f32>>,
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (dst, src) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *dst -= f * src;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// The B(h) coefficient and the `(R, b)` system of the UniPC update, in float32 as diffusers computes them.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    rows: Vec<Vec<f64>>,
    b: Vec<f64>,
}

impl UniPc {
    /// `UniPCMultistepScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        for (flag, name) in [
            (cfg.use_exponential_sigmas, "use_exponential_sigmas"),
            (cfg.use_beta_sigmas, "use_beta_sigmas"),
            (cfg.use_flow_sigmas, "use_flow_sigmas"),
            (cfg.use_dynamic_shifting, "use_dynamic_shifting"),
        ] {
            reject_flag(flag, name, CLASS)?;
        }
        if let Some(p) = cfg.solver_p.as_ref().filter(|v| !v.is_null()) {
            return Err(unsupported("solver_p", p, CLASS));
        }
        let bh2 = match cfg.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => true,
            Some("bh1") => false,
            Some(other) => return Err(unsupported("solver_type", other, CLASS)),
        };
        let order = cfg.solver_order.unwrap_or(2);
        if order == 0 {
            return Err(unsupported("solver_order", order, CLASS));
        }
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let spec = BetaSpec::linear(CLASS, Rescale::TerminalEpsilon);
        let acp = alphas_cumprod(cfg, &spec)?;
        let train = cfg.checked_train_steps(n, CLASS)?;
        let spacing = cfg.spacing(TimestepSpacing::Linspace, CLASS)?;
        let full = train_sigmas(&acp);
        let final_sigmas = cfg.final_sigmas(CLASS)?;
        let mut ts: Vec<f64> =
            multistep_timesteps(spacing, n, train, train, cfg.offset()).into_iter().map(|t| t as f64).collect();
        let mut sigmas: Vec<f64>;
        let last;
        if cfg.use_karras_sigmas.unwrap_or(false) {
            let logs = log_sigmas(&full);
            sigmas = karras(full[0] as f64, full[train - 1] as f64, n);
            ts = sigmas.iter().map(|&s| sigma_to_t(s, &logs).round_ties_even()).collect();
            last = match final_sigmas {
                FinalSigmas::Zero => 0.0,
                FinalSigmas::SigmaMin => sigmas[sigmas.len() - 1],
            };
        } else {
            sigmas = ts.iter().map(|&t| interp(t, &full)).collect();
            last = match final_sigmas {
                FinalSigmas::Zero => 0.0,
                FinalSigmas::SigmaMin => full[0] as f64,
            };
        }
        if ts.iter().any(|&t| t < 0.0 || t >= train as f64) {
            return Err(SchedulerError::InvalidSteps {
                class: CLASS,
                steps: n,
                reason: "a timestep falls outside the training schedule (check steps_offset)".into(),
            });
        }
        sigmas.push(last);
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps: ts,
            sigmas,
            n,
            prediction,
            bound: threshold_bound(cfg),
            order,
            bh2,
            predict_x0: cfg.predict_x0.unwrap_or(true),
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            history: Vec::new(),
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
        })
    }

    /// The model output in the solver's parameterisation (x0 when `predict_x0`, else epsilon).
    fn convert(&self, call: usize, model_output: &ArrayViewD<'_, f32>, sample: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let sigma = self.sigmas[call];
        if self.predict_x0 {
            return self.bound.apply(multistep_x0(self.prediction, sigma, model_output, sample));
        }
        let (alpha, sigma_t, _) = alpha_sigma_lambda(sigma);
        let (a, s) = (alpha as f64, sigma_t as f64);
        match self.prediction {
            PredictionType::Epsilon => model_output.to_owned(),
            PredictionType::Sample => map2(sample, model_output, |x, x0| (x - a * x0) / s),
            PredictionType::VPrediction => map2(sample, model_output, |x, v| a * v + s * x),
        }
    }

    /// `rks`, `h_phi_1`, `B(h)` and the linear system for an update of `order` with step size `h`.
    fn coefficients(&self, h: f32, rks: &[f32], order: usize) -> Coefficients {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: f32 = 1.0;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut rows = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            rows.push(rks.iter().map(|&r| r.powi(i as i32 - 1) as f64).collect());
            b.push((h_phi_k * factorial / b_h) as f64);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients { h_phi_1, b_h, rows, b }
    }

    /// `sum_k rho_k * (m_k - m0) / r_k` over the older history entries, in float64.
    fn weighted_differences(
        &self,
        m0: &ArrayViewD<'_, f32>,
        older: &[(ArrayViewD<'_, f32>, f32)],
        rhos: &[f64],
    ) -> ArrayD<f64> {
        let mut acc = ArrayD::<f64>::zeros(m0.raw_dim());
        for ((mi, rk), &rho) in older.iter().zip(rhos) {
            let rk = *rk;
            Zip::from(&mut acc).and(mi).and(m0).for_each(|a, &mi, &m0| {
                let d = ((mi - m0) / rk) as f64;
                *a += rho * d;
            });
        }
        acc
    }

    /// What the predictor and the corrector both read for a step from call `from` to call `to`: the two
    /// noise levels, `h = λ_to − λ_from`, the latest model output and the `order − 1` older ones with their
    /// ratios `r_i = (λ_{from − i} − λ_from) / h` (then the final ratio 1).
    fn span(&self, from: usize, to: usize, order: usize) -> Span<'_> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigmas[to]);
        let (a_s0, s_s0, l_s0) = alpha_sigma_lambda(self.sigmas[from]);
        let h = l_t - l_s0;
        let k = self.history.len();
        let mut older = Vec::new();
        let mut rks = Vec::new();
        for i in 1..order {
            let (_, _, l_si) = alpha_sigma_lambda(self.sigmas[from - i]);
            let rk = (l_si - l_s0) / h;
            rks.push(rk);
            older.push((self.history[k - 1 - i].view(), rk));
        }
        rks.push(1.0);
        Span { a_t, s_t, a_s0, s_s0, h, m0: self.history[k - 1].view(), older, rks }
    }

    /// The predictor (`multistep_uni_p_bh_update`) from call `call` to `call + 1`.
    fn predict(&self, call: usize, x: &ArrayViewD<'_, f32>, order: usize) -> ArrayD<f32> {
        let Span { a_t, s_t, a_s0, s_s0, h, m0, older, rks } = self.span(call, call + 1, order);
        let c = self.coefficients(h, &rks, order);
        let rhos: Vec<f64> = if older.is_empty() {
            Vec::new()
        } else if order == 2 {
            vec![0.5]
        } else {
            let m = order - 1;
            let rows = c.rows[..m].iter().map(|r| r[..m].to_vec()).collect();
            solve(rows, c.b[..m].to_vec()).into_iter().map(|v| v as f32 as f64).collect()
        };
        let res = self.weighted_differences(&m0, &older, &rhos);
        let (cx, cm, cr) = self.update_coefficients(a_t, s_t, a_s0, s_s0, c.h_phi_1, c.b_h);
        let mut out = ArrayD::<f32>::zeros(x.raw_dim());
        Zip::from(&mut out).and(x).and(&m0).and(&res).for_each(|o, &x, &m, &r| {
            *o = (cx * x as f64 - cm * m as f64 - cr * r) as f32;
        });
        out
    }

    /// The corrector (`multistep_uni_c_bh_update`) of the step that ended at call `call`.
    fn correct(
        &self,
        call: usize,
        this_model_output: &ArrayViewD<'_, f32>,
        last: &ArrayViewD<'_, f32>,
        order: usize,
    ) -> ArrayD<f32> {
        let Span { a_t, s_t, a_s0, s_s0, h, m0, older, rks } = self.span(call - 1, call, order);
        let c = self.coefficients(h, &rks, order);
        let rhos: Vec<f64> = if order == 1 {
            vec![0.5]
        } else {
            solve(c.rows.clone(), c.b.clone()).into_iter().map(|v| v as f32 as f64).collect()
        };
        let rho_last = rhos[rhos.len() - 1];
        let res = self.weighted_differences(&m0, &older, &rhos[..rhos.len() - 1]);
        let (cx, cm, cr) = self.update_coefficients(a_t, s_t, a_s0, s_s0, c.h_phi_1, c.b_h);
        let mut out = ArrayD::<f32>::zeros(last.raw_dim());
        Zip::from(&mut out).and(last).and(&m0).and(&res).and(this_model_output).for_each(|o, &x, &m, &r, &mt| {
            let d1_t = (mt - m) as f64;
            *o = (cx * x as f64 - cm * m as f64 - cr * (r + rho_last * d1_t)) as f32;
        });
        out
    }

    /// `(c_x, c_m, c_r)` of `x_t = c_x x - c_m m0 - c_r residual` in either parameterisation.
    fn update_coefficients(&self, a_t: f32, s_t: f32, a_s0: f32, s_s0: f32, h_phi_1: f32, b_h: f32) -> (f64, f64, f64) {
        if self.predict_x0 {
            ((s_t / s_s0) as f64, (a_t * h_phi_1) as f64, (a_t * b_h) as f64)
        } else {
            ((a_t / a_s0) as f64, (s_t * h_phi_1) as f64, (s_t * b_h) as f64)
        }
    }
}

impl Scheduler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let converted = self.convert(call, &model_output, &sample);
        let use_corrector = call > 0 && !self.disable_corrector.contains(&(call - 1)) && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(call, &converted.view(), &last.view(), self.this_order),
            _ => sample.to_owned(),
        };
        self.history.push(converted.clone());
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let len = self.timesteps.len();
        let this_order = if self.lower_order_final { self.order.min(len - call) } else { self.order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev_sample = self.predict(call, &sample.view(), self.this_order);
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        let pred_original_sample = if self.predict_x0 { Some(converted) } else { None };
        StepOutput { prev_sample, pred_original_sample }
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
