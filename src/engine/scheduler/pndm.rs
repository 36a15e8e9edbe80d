//! `PNDMScheduler` (Liu et al. 2022): pseudo numerical methods. With `skip_prk_steps` (Stable Diffusion's
//! setting) it is PLMS, a linear multistep method; otherwise a Runge-Kutta warm-up of 4 calls per step over
//! the first 3 steps precedes it.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, BetaSpec, Rescale};
use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::ddim::check_timesteps;
use super::error::SchedulerError;
use super::ops::{alpha_add_noise, map2, map3, map4};
use super::sigmas::integer_timesteps;
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "PNDMScheduler";

/// A configured PNDM run. The multistep history advances with every `step` call, as diffusers' `counter`.
#[derive(Debug, Clone)]
pub struct Pndm {
    acp: Vec<f32>,
    final_acp: f32,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    prk_len: usize,
    n: usize,
    stride: i64,
    prediction: PredictionType,
    counter: usize,
    ets: Vec<ArrayD<f32>>,
    cur_sample: Option<ArrayD<f32>>,
    cur_model_output: Option<ArrayD<f32>>,
}

impl Pndm {
    /// `PNDMScheduler.from_config(cfg)` then `set_timesteps(n)`.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let spec = BetaSpec::linear(CLASS, Rescale::Ignored);
        let acp = alphas_cumprod(cfg, &spec)?;
        let train = cfg.train_steps();
        let spacing = cfg.spacing(TimestepSpacing::Leading, CLASS)?;
        let prediction = cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction])?;
        // `_timesteps`, ascending.
        let mut base = integer_timesteps(spacing, n, train, cfg.offset());
        base.reverse();
        let skip_prk = cfg.skip_prk_steps.unwrap_or(false);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            let len = base.len();
            let mut plms: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.push(base[len - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                return Err(SchedulerError::InvalidSteps {
                    class: CLASS,
                    steps: n,
                    reason: "the Runge-Kutta warm-up needs at least 4 steps (or skip_prk_steps=true)".into(),
                });
            }
            let half = (train / n / 2) as i64;
            let tail = &base[base.len() - 4..];
            let pairs: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let ts: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        check_timesteps(&ts, train, n, CLASS)?;
        let final_acp = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { acp[0] };
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            prk_len: prk.len(),
            ts,
            acp,
            final_acp,
            n,
            stride: (train / n) as i64,
            prediction,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// Formula (9) of the PNDM paper: moves `sample` from timestep `t` to `prev` along `eps`.
    fn prev_sample(&self, sample: &ArrayViewD<'_, f32>, t: i64, prev: i64, eps: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let a_t = self.acp[t as usize] as f64;
        let a_prev = if prev >= 0 { self.acp[prev as usize] } else { self.final_acp } as f64;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let k = (a_prev - a_t) / denom;
        match self.prediction {
            PredictionType::VPrediction => {
                let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
                map2(sample, eps, |x, v| {
                    let e = sa * v + sb * x;
                    sample_coeff * x - k * e
                })
            }
            _ => map2(sample, eps, |x, e| sample_coeff * x - k * e),
        }
    }

    fn step_prk(&mut self, model_output: ArrayViewD<'_, f32>, t: i64, sample: ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let diff = if self.counter % 2 == 1 { 0 } else { self.stride / 2 };
        let prev = t - diff;
        let t = self.ts[self.counter / 4 * 4];
        let phase = self.counter % 4;
        let acc = self.cur_model_output.take();
        let eps = match phase {
            0 => {
                self.cur_model_output = Some(model_output.mapv(|e| ((1.0 / 6.0) * e as f64) as f32));
                self.ets.push(model_output.to_owned());
                self.cur_sample = Some(sample.to_owned());
                model_output.to_owned()
            }
            1 | 2 => {
                let acc = acc.unwrap_or_else(|| ArrayD::zeros(model_output.raw_dim()));
                self.cur_model_output = Some(map2(&acc.view(), &model_output, |a, e| a + (1.0 / 3.0) * e));
                model_output.to_owned()
            }
            _ => {
                let acc = acc.unwrap_or_else(|| ArrayD::zeros(model_output.raw_dim()));
                map2(&acc.view(), &model_output, |a, e| a + (1.0 / 6.0) * e)
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.to_owned());
        self.prev_sample(&cur.view(), t, prev, &eps.view())
    }

    fn step_plms(&mut self, model_output: ArrayViewD<'_, f32>, t: i64, sample: ArrayViewD<'_, f32>) -> ArrayD<f32> {
        let mut t = t;
        let mut prev = t - self.stride;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.to_owned());
        } else {
            prev = t;
            t += self.stride;
        }
        let ets = &self.ets;
        let k = ets.len();
        let mut base = sample.to_owned();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_owned());
            model_output.to_owned()
        } else if k == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                base = cur;
            }
            map2(&model_output, &ets[0].view(), |a, b| (a + b) / 2.0)
        } else if k == 2 {
            map2(&ets[1].view(), &ets[0].view(), |a, b| (3.0 * a - b) / 2.0)
        } else if k == 3 {
            map3(&ets[2].view(), &ets[1].view(), &ets[0].view(), |a, b, c| (23.0 * a - 16.0 * b + 5.0 * c) / 12.0)
        } else {
            map4(&ets[k - 1].view(), &ets[k - 2].view(), &ets[k - 3].view(), &ets[k - 4].view(), |a, b, c, d| {
                (1.0 / 24.0) * (55.0 * a - 59.0 * b + 37.0 * c - 9.0 * d)
            })
        };
        self.prev_sample(&base.view(), t, prev, &eps.view())
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let t = self.ts[call];
        let prev_sample = if self.counter < self.prk_len {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        };
        self.counter += 1;
        StepOutput { prev_sample, pred_original_sample: None }
    }

    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        alpha_add_noise(self.acp[self.ts[call] as usize], &original, &noise)
    }
}
