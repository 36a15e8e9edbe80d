//! DDIM inversion (diffusers' `DDIMInverseScheduler`, eta = 0): the deterministic DDIM update run backwards,
//! from clean latents toward the noise that would have produced them. Watermark detection inverts a picture
//! with it to read the pattern its starting noise carried.
//!
//! The schedule is the trailing one, ascending: for `n` steps and `T` training timesteps the denoiser is
//! called at `T/n − 1, 2T/n − 1, …, T − 1` (rounded), so the run ends at `T − 1`, where text-to-image starts.
//! Call `i` takes the sample at the level of call `i − 1` (clean, alpha = 1, before the first), asks the
//! denoiser at call `i`'s timestep, and moves the sample to that level:
//! `x_t = sqrt(a_t)·x0 + sqrt(1 − a_t)·eps`, with `x0` and `eps` read from the prediction at the lower level.

use ndarray::{ArrayD, ArrayViewD};

use super::betas::{alphas_cumprod, BetaSpec, Rescale};
use super::config::{PredictionType, SchedulerConfig};
use super::ddim::{check_timesteps, x0_and_eps};
use super::error::SchedulerError;
use super::ops::{alpha_add_noise, map2};
use super::{Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "DDIMInverseScheduler";

/// A configured DDIM inversion run.
#[derive(Debug, Clone)]
pub struct DdimInverse {
    acp: Vec<f32>,
    ts: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
}

impl DdimInverse {
    /// The inversion of `n` steps for a model trained with `cfg`'s noise schedule.
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self, SchedulerError> {
        let acp = alphas_cumprod(cfg, &BetaSpec::linear(CLASS, Rescale::Plain))?;
        let train = cfg.train_steps();
        if n == 0 {
            return Err(SchedulerError::InvalidSteps { class: CLASS, steps: 0, reason: "at least one step".into() });
        }
        let prediction =
            cfg.prediction(CLASS, &[PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample])?;
        let ts = ascending_trailing(n, train);
        check_timesteps(&ts, train, n, CLASS)?;
        Ok(Self { timesteps: ts.iter().map(|&t| t as f64).collect(), ts, acp, prediction })
    }

    /// Cumulative alpha of the level before call `call` (1 before the first: clean latents).
    fn alpha_before(&self, call: usize) -> f64 {
        match call.checked_sub(1) {
            Some(prev) => f64::from(self.acp[self.ts[prev] as usize]),
            None => 1.0,
        }
    }
}

/// `round(i·T/n) − 1` for `i = 1..=n`: the trailing schedule in ascending order.
fn ascending_trailing(n: usize, train: usize) -> Vec<i64> {
    (1..=n).map(|i| (i as f64 * train as f64 / n as f64).round() as i64 - 1).collect()
}

impl Scheduler for DdimInverse {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let a_low = self.alpha_before(call);
        let a_high = f64::from(self.acp[self.ts[call] as usize]);
        let (x0, eps) = x0_and_eps(self.prediction, a_low, &model_output, &sample);
        let (c0, c1) = (a_high.sqrt(), (1.0 - a_high).sqrt());
        let prev_sample = map2(&x0.view(), &eps.view(), |x, e| c0 * x + c1 * e);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        alpha_add_noise(self.acp[self.ts[call] as usize], &original, &noise)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;
    use crate::engine::rng::SeededNoise;

    fn config() -> SchedulerConfig {
        SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "prediction_type": "epsilon"}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_schedule_climbs_to_the_last_training_timestep() {
        let s = DdimInverse::new(&config(), 20).unwrap();
        assert_eq!(s.timesteps().first(), Some(&49.0));
        assert_eq!(s.timesteps().last(), Some(&999.0));
        assert!(s.timesteps().windows(2).all(|w| w[1] > w[0]));
        assert!(DdimInverse::new(&config(), 0).is_err());
    }

    /// With an oracle that always predicts the true noise, inversion of `sqrt(a)·x0 + sqrt(1 − a)·eps`
    /// lands exactly on the DDIM trajectory: at the end the sample is `sqrt(a_T)·x0 + sqrt(1 − a_T)·eps`.
    #[test]
    fn inverting_with_the_true_noise_reaches_the_noised_sample() {
        let mut s = DdimInverse::new(&config(), 10).unwrap();
        let mut rng = SeededNoise::new(3);
        let mut draw = |n: usize| {
            let mut v = vec![0f32; n];
            rng.fill_normal(&mut v);
            ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), v).unwrap()
        };
        let (x0, eps) = (draw(4), draw(4));
        let mut x = x0.clone();
        let mut noise = SeededNoise::new(0);
        for call in 0..s.timesteps().len() {
            x = s.step(StepInput::new(call, eps.view(), x.view()), &mut noise).prev_sample;
        }
        let expected = s.add_noise(x0.view(), eps.view(), 9);
        for (a, b) in x.iter().zip(expected.iter()) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
