//! `FlowMatchEulerDiscreteScheduler` (SD3, Flux): Euler's method on the rectified-flow ODE.
//!
//! A flow-matching model sees `x_sigma = (1 - sigma) * x0 + sigma * noise` and predicts the velocity
//! `v = noise - x0`, so one Euler step is `x_next = x + (sigma_next - sigma) * v`, from sigma 1 (pure noise)
//! to 0. The model's timestep is `sigma * 1000`, there is no input scaling, and the initial sigma is 1.
//!
//! The schedule is where the care goes. diffusers 0.36 builds it in three stages:
//! 1. starting sigmas. SD3's pipeline calls `set_timesteps(n)`: a float64 linspace between the training
//!    schedule's ends, which `__init__` has *already shifted* in float32 (so SD3's last sigma is shifted
//!    twice: 0.0089 for `shift=3` rather than 0.003). Flux's pipeline passes `sigmas = linspace(1, 1/n, n)`,
//!    which `set_timesteps` turns into float32 before shifting;
//! 2. the shift, static (`shift * s / (1 + (shift - 1) * s)`) or, with `use_dynamic_shifting`, exponential in
//!    `mu` from the image sequence length ([`calculate_shift`]). NumPy keeps float32 arrays in float32 and
//!    float64 ones in float64, so Flux's shift is float32 arithmetic and SD3's float64;
//! 3. the sigmas rounded to float32, the timesteps `sigma * 1000` in float32, and a final sigma 0.

use ndarray::{ArrayD, ArrayViewD};

use super::config::{reject_flag, unsupported, SchedulerConfig};
use super::error::SchedulerError;
use super::ops::map2_f32;
use super::sigmas::np_linspace;
use super::{FlowSigmas, RunOptions, Scheduler, StepInput, StepOutput};
use crate::engine::rng::NoiseSource;

const CLASS: &str = "FlowMatchEulerDiscreteScheduler";

/// How a flow-matching schedule is moved toward the noisy end, where high-resolution images need more steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// The config's `shift` `s`: `s * sigma / (1 + (s - 1) * sigma)` (SD3 ships `s = 3`; 1 is no shift).
    Static(f64),
    /// `use_dynamic_shifting` with `time_shift_type = "exponential"`: `e^mu / (e^mu + (1/sigma - 1))`, with `mu`
    /// from the image sequence length (Flux).
    Dynamic {
        /// The shift exponent computed by [`calculate_shift`].
        mu: f64,
    },
}

impl Shift {
    /// The shift in float64, as NumPy applies it to SD3's float64 sigmas.
    fn apply_f64(self, sigma: f64) -> f64 {
        match self {
            Shift::Static(s) => s * sigma / (1.0 + (s - 1.0) * sigma),
            Shift::Dynamic { mu } => {
                let e = mu.exp();
                e / (e + (1.0 / sigma - 1.0))
            }
        }
    }

    /// The shift in float32, as NumPy/PyTorch apply it to float32 sigmas (the Python scalars rounded first).
    fn apply_f32(self, sigma: f32) -> f32 {
        match self {
            Shift::Static(s) => (s as f32 * sigma) / (1.0 + (s - 1.0) as f32 * sigma),
            Shift::Dynamic { mu } => {
                let e = mu.exp() as f32;
                e / (e + (1.0 / sigma - 1.0))
            }
        }
    }
}

/// The pipelines' `calculate_shift`: `mu` on the line through `(base_image_seq_len, base_shift)` and
/// `(max_image_seq_len, max_shift)`, evaluated at `image_seq_len` (extrapolated outside that range, as
/// diffusers does: 16 tokens give 0.459375 with the defaults).
pub fn calculate_shift(image_seq_len: usize, cfg: &SchedulerConfig) -> Result<f64, SchedulerError> {
    let base_len = cfg.base_image_seq_len.unwrap_or(256);
    let max_len = cfg.max_image_seq_len.unwrap_or(4096);
    if base_len == max_len {
        return Err(unsupported("max_image_seq_len", format!("{max_len} (equal to base_image_seq_len)"), CLASS));
    }
    let base_shift = cfg.base_shift.unwrap_or(0.5);
    let max_shift = cfg.max_shift.unwrap_or(1.15);
    let m = (max_shift - base_shift) / (max_len as f64 - base_len as f64);
    let b = base_shift - m * base_len as f64;
    let mu = image_seq_len as f64 * m + b;
    if !mu.is_finite() {
        return Err(unsupported("base_shift", format!("{base_shift} (with max_shift {max_shift}: mu is {mu})"), CLASS));
    }
    Ok(mu)
}

/// The img2img start of the SD3 and Flux pipelines' `get_timesteps`, which truncate after subtracting:
/// `t_start = int(max(n - min(n * strength, n), 0))`. This differs from the diffusion pipelines' formula
/// (28 steps at strength 0.3 run 9 calls here, 8 there) and leaves at least one call for any strength > 0.
pub fn flow_start_call(num_inference_steps: usize, strength: f64) -> Result<usize, SchedulerError> {
    let invalid = SchedulerError::InvalidStrength { strength, steps: num_inference_steps };
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(invalid);
    }
    let n = num_inference_steps as f64;
    let init_timestep = (n * strength).min(n);
    // Python's int() truncates toward zero; the operand is never negative here.
    let t_start = (n - init_timestep).max(0.0) as usize;
    if t_start >= num_inference_steps {
        return Err(invalid);
    }
    Ok(t_start)
}

/// A configured flow-matching Euler run.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    shift: Shift,
}

impl FlowMatchEuler {
    /// `FlowMatchEulerDiscreteScheduler.from_config(cfg)` then `set_timesteps` as the pipeline in `options`
    /// calls it: `set_timesteps(n)` (SD3) or with `sigmas = linspace(1, 1/n, n)` (Flux), plus
    /// `mu = calculate_shift(image_seq_len)` when the config uses dynamic shifting.
    pub fn new(cfg: &SchedulerConfig, n: usize, options: &RunOptions) -> Result<Self, SchedulerError> {
        reject_unimplemented(cfg)?;
        let train = train_steps(cfg)?;
        let shift = shift_for(cfg, options)?;
        let start = match options.flow_sigmas {
            FlowSigmas::Scheduler => scheduler_sigmas(cfg, train, n, shift)?,
            FlowSigmas::Linear => linear_sigmas(n, shift),
        };
        let timesteps = start.iter().map(|&s| (s * train as f32) as f64).collect();
        let mut sigmas: Vec<f64> = start.into_iter().map(f64::from).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas, shift })
    }

    /// The shift this run applied (its `mu` for dynamic shifting), for logs and tests.
    pub fn shift(&self) -> Shift {
        self.shift
    }
}

/// Rejects the config options diffusers 0.36 offers for this class that are not implemented here, so they
/// fail loudly instead of being ignored.
fn reject_unimplemented(cfg: &SchedulerConfig) -> Result<(), SchedulerError> {
    reject_flag(cfg.use_karras_sigmas, "use_karras_sigmas", CLASS)?;
    reject_flag(cfg.use_exponential_sigmas, "use_exponential_sigmas", CLASS)?;
    reject_flag(cfg.use_beta_sigmas, "use_beta_sigmas", CLASS)?;
    reject_flag(cfg.invert_sigmas, "invert_sigmas", CLASS)?;
    reject_flag(cfg.stochastic_sampling, "stochastic_sampling", CLASS)?;
    // diffusers tests `if shift_terminal:`, so 0 (like null) means off.
    if let Some(t) = cfg.shift_terminal.filter(|&t| t != 0.0) {
        return Err(unsupported("shift_terminal", t, CLASS));
    }
    match cfg.time_shift_type.as_deref() {
        None | Some("exponential") => Ok(()),
        Some(other) => Err(unsupported("time_shift_type", other, CLASS)),
    }
}

/// `num_train_timesteps`, which must be positive (the schedule divides by it).
fn train_steps(cfg: &SchedulerConfig) -> Result<usize, SchedulerError> {
    match cfg.train_steps() {
        0 => Err(unsupported("num_train_timesteps", 0, CLASS)),
        train => Ok(train),
    }
}

/// The config's static `shift`, which must be a positive number.
fn static_shift(cfg: &SchedulerConfig) -> Result<f64, SchedulerError> {
    let s = cfg.shift.unwrap_or(1.0);
    if !(s.is_finite() && s > 0.0) {
        return Err(unsupported("shift", s, CLASS));
    }
    Ok(s)
}

/// The shift `set_timesteps` applies: dynamic (needs the image sequence length) or the static `shift`.
fn shift_for(cfg: &SchedulerConfig, options: &RunOptions) -> Result<Shift, SchedulerError> {
    if cfg.use_dynamic_shifting.unwrap_or(false) {
        let len = options.image_seq_len.ok_or(SchedulerError::MissingImageSeqLen { class: CLASS })?;
        Ok(Shift::Dynamic { mu: calculate_shift(len, cfg)? })
    } else {
        Ok(Shift::Static(static_shift(cfg)?))
    }
}

/// SD3's `set_timesteps(n)`: float64 `linspace(1000 * sigma_max, 1000 * sigma_min, n) / 1000`, shifted, as
/// float32. `sigma_max`/`sigma_min` are the ends of the float32 training schedule of `__init__`, which applies
/// the static shift (not the dynamic one) there as well.
fn scheduler_sigmas(cfg: &SchedulerConfig, train: usize, n: usize, shift: Shift) -> Result<Vec<f32>, SchedulerError> {
    // `linspace(1, T, T)[::-1] / T` in float32: T / T is exactly 1, the last entry 1 / T.
    let mut ends = [1.0, 1.0 / train as f32];
    if !cfg.use_dynamic_shifting.unwrap_or(false) {
        let init_shift = Shift::Static(static_shift(cfg)?);
        ends = ends.map(|s| init_shift.apply_f32(s));
    }
    let train = train as f64;
    let [max, min] = ends.map(f64::from);
    let timesteps = np_linspace(max * train, min * train, n);
    Ok(timesteps.into_iter().map(|t| shift.apply_f64(t / train) as f32).collect())
}

/// Flux's `sigmas = np.linspace(1, 1/n, n)`, converted to float32 by `set_timesteps` and shifted in float32.
fn linear_sigmas(n: usize, shift: Shift) -> Vec<f32> {
    np_linspace(1.0, 1.0 / n as f64, n).into_iter().map(|s| shift.apply_f32(s as f32)).collect()
}

impl Scheduler for FlowMatchEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `prev = sample + (sigma_next - sigma) * model_output` in float32; the clean estimate
    /// `sample - sigma * model_output` (what diffusers' stochastic variant computes) is returned for previews.
    fn step(&mut self, input: StepInput<'_>, _noise: &mut dyn NoiseSource) -> StepOutput {
        let StepInput { call, model_output, sample } = input;
        let sigma = self.sigmas[call] as f32;
        let dt = self.sigmas[call + 1] as f32 - sigma;
        let prev_sample = map2_f32(&sample, &model_output, |x, v| x + dt * v);
        let x0 = map2_f32(&sample, &model_output, |x, v| x - sigma * v);
        StepOutput { prev_sample, pred_original_sample: Some(x0) }
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn start_call_for_strength(&self, strength: f64) -> Result<usize, SchedulerError> {
        flow_start_call(self.num_inference_steps(), strength)
    }

    /// diffusers' `scale_noise`: `sigma * noise + (1 - sigma) * original` in float32.
    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32> {
        let sigma = self.sigmas[call] as f32;
        map2_f32(&original, &noise, |x, z| sigma * z + (1.0 - sigma) * x)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;
    use crate::engine::rng::SeededNoise;

    fn sd3() -> SchedulerConfig {
        SchedulerConfig::from_json_str(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                "num_train_timesteps": 1000, "shift": 3.0}"#,
        )
        .expect("valid config")
    }

    fn flux() -> SchedulerConfig {
        SchedulerConfig::from_json_str(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000,
                "shift": 3.0, "use_dynamic_shifting": true}"#,
        )
        .expect("valid config")
    }

    fn flux_run(image_seq_len: usize) -> RunOptions {
        RunOptions { image_seq_len: Some(image_seq_len), flow_sigmas: FlowSigmas::Linear }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * a.abs().max(b.abs()) + 1e-9
    }

    #[test]
    fn unshifted_schedule_is_a_linspace_and_timesteps_are_sigma_times_1000() {
        let mut cfg = sd3();
        cfg.shift = None;
        let s = FlowMatchEuler::new(&cfg, 4, &RunOptions::default()).expect("builds");
        for (ours, want) in s.sigmas.iter().zip([1.0, 0.667, 0.334, 0.001, 0.0]) {
            assert!(close(*ours, want), "{ours} vs {want}");
        }
        for (t, sigma) in s.timesteps.iter().zip(&s.sigmas) {
            assert!(close(*t, sigma * 1000.0), "{t} vs {sigma}");
        }
        assert_eq!(s.sigmas.len(), s.timesteps.len() + 1);
    }

    #[test]
    fn sd3_schedule_ends_at_the_twice_shifted_sigma_min() {
        let s = FlowMatchEuler::new(&sd3(), 4, &RunOptions::default()).expect("builds");
        let shift = |x: f64| 3.0 * x / (1.0 + 2.0 * x);
        assert_eq!(s.sigmas[0], 1.0);
        assert!(close(s.sigmas[3], shift(shift(0.001))), "{}", s.sigmas[3]);
        // The interior points are the shifted linspace between the shifted ends.
        let lin = 1.0 + (shift(0.001) - 1.0) / 3.0;
        assert!((s.sigmas[1] - shift(lin)).abs() < 1e-7, "{} vs {}", s.sigmas[1], shift(lin));
        assert_eq!(s.shift(), Shift::Static(3.0));
    }

    #[test]
    fn dynamic_shift_mu_follows_the_pipelines_calculate_shift() {
        let cfg = flux();
        assert!(close(calculate_shift(256, &cfg).expect("mu"), 0.5));
        assert!(close(calculate_shift(4096, &cfg).expect("mu"), 1.15));
        assert!(close(calculate_shift(16, &cfg).expect("mu"), 0.459375));
        let s = FlowMatchEuler::new(&cfg, 4, &flux_run(4096)).expect("builds");
        let Shift::Dynamic { mu } = s.shift() else { panic!("dynamic shift expected") };
        assert!(close(mu, 1.15));
        // The static `shift` of the config is ignored under dynamic shifting, as in diffusers.
        let e = 1.15f64.exp();
        let want = e / (e + (1.0 / 0.75 - 1.0));
        assert!((s.sigmas[1] - want).abs() < 1e-6, "{} vs {want}", s.sigmas[1]);
        assert_eq!(s.sigmas[4], 0.0);
    }

    #[test]
    fn dynamic_shifting_without_a_sequence_length_is_a_typed_error() {
        let err = FlowMatchEuler::new(&flux(), 4, &RunOptions::default()).unwrap_err();
        assert_eq!(err, SchedulerError::MissingImageSeqLen { class: CLASS });
        let err = super::super::build(super::super::SchedulerKind::FlowEuler, &flux(), 4).err().expect("fails");
        assert!(matches!(err, SchedulerError::MissingImageSeqLen { .. }));
    }

    #[test]
    fn unimplemented_options_are_errors_naming_the_field() {
        type Edit = fn(&mut SchedulerConfig);
        let cases: [(&str, Edit); 9] = [
            ("use_karras_sigmas", |c| c.use_karras_sigmas = Some(true)),
            ("use_exponential_sigmas", |c| c.use_exponential_sigmas = Some(true)),
            ("use_beta_sigmas", |c| c.use_beta_sigmas = Some(true)),
            ("invert_sigmas", |c| c.invert_sigmas = Some(true)),
            ("stochastic_sampling", |c| c.stochastic_sampling = Some(true)),
            ("shift_terminal", |c| c.shift_terminal = Some(0.02)),
            ("time_shift_type", |c| c.time_shift_type = Some("linear".into())),
            ("shift", |c| c.shift = Some(0.0)),
            ("num_train_timesteps", |c| c.num_train_timesteps = Some(0)),
        ];
        for (field, edit) in cases {
            let mut cfg = sd3();
            edit(&mut cfg);
            match FlowMatchEuler::new(&cfg, 4, &RunOptions::default()) {
                Err(SchedulerError::UnsupportedValue { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected an unsupported-value error, got {other:?}"),
            }
        }
        let mut cfg = flux();
        cfg.max_image_seq_len = Some(256);
        assert!(matches!(
            FlowMatchEuler::new(&cfg, 4, &flux_run(16)),
            Err(SchedulerError::UnsupportedValue { field: "max_image_seq_len", .. })
        ));
        // Values that mean "off" in diffusers are accepted.
        let mut cfg = sd3();
        cfg.shift_terminal = Some(0.0);
        cfg.invert_sigmas = Some(false);
        cfg.time_shift_type = Some("exponential".into());
        assert!(FlowMatchEuler::new(&cfg, 4, &RunOptions::default()).is_ok());
    }

    #[test]
    fn euler_integrates_a_straight_flow_exactly() {
        // x_sigma = (1 - sigma) x0 + sigma * noise has the constant velocity noise - x0.
        let x0 = ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 2]), vec![0.5f32, -1.0, 0.25, 2.0]).expect("shape");
        let noise = ArrayD::from_shape_vec(IxDyn(&[1, 2, 1, 2]), vec![1.0f32, 0.5, -0.75, 0.1]).expect("shape");
        let velocity = &noise - &x0;
        let mut s = FlowMatchEuler::new(&sd3(), 6, &RunOptions::default()).expect("builds");
        let mut x = noise.clone();
        for call in 0..s.timesteps().len() {
            let out = s.step(StepInput::new(call, velocity.view(), x.view()), &mut SeededNoise::new(0));
            let x0_hat = out.pred_original_sample.expect("estimate");
            assert!(x0_hat.iter().zip(&x0).all(|(a, b)| (a - b).abs() < 1e-5), "call {call}: {x0_hat}");
            x = out.prev_sample;
        }
        assert!(x.iter().zip(&x0).all(|(a, b)| (a - b).abs() < 1e-5), "{x}");
    }

    #[test]
    fn add_noise_is_scale_noise_and_img2img_starts_as_the_flow_pipelines_do() {
        let s = FlowMatchEuler::new(&sd3(), 28, &RunOptions::default()).expect("builds");
        let x = ArrayD::from_elem(IxDyn(&[1, 1, 1, 2]), 2.0f32);
        let z = ArrayD::from_elem(IxDyn(&[1, 1, 1, 2]), -1.0f32);
        let start = s.start_call_for_strength(0.3).expect("start");
        assert_eq!(start, 19, "int(28 - 8.4), not 28 - int(8.4)");
        let sigma = s.sigmas[start];
        let noised = s.add_noise(x.view(), z.view(), start);
        assert!(noised.iter().all(|&v| ((v as f64) - (2.0 - 3.0 * sigma)).abs() < 1e-6), "{noised}");
        assert_eq!(s.add_noise(x.view(), z.view(), 0), z, "sigma 1 is pure noise");
        assert_eq!(flow_start_call(10, 1.0), Ok(0));
        assert_eq!(flow_start_call(10, 0.05), Ok(9), "any positive strength runs a call");
        assert!(flow_start_call(10, 0.0).is_err());
        assert!(flow_start_call(10, 1.5).is_err());
        assert!(flow_start_call(10, f64::NAN).is_err());
    }
}
