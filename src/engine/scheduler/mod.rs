//! Noise schedulers, computed exactly as Hugging Face diffusers computes them.
//!
//! Interface contract used by the pipelines (the implementation fills in the families):
//! a scheduler is built from the model's `scheduler_config.json` plus a step count, exposes the timestep of
//! every denoiser call, scales the model input, and advances the sample one denoiser call at a time.
//!
//! ```text
//! let kind = SchedulerKind::from_request_name("DPM++ 2M Karras")          // or from_class_name(model default)
//! let mut s = build(kind, &SchedulerConfig::from_json_str(text)?, steps)?;
//! let start = 0;                                    // img2img: s.start_call_for_strength(strength)?
//! let mut x = noise * s.init_noise_sigma();         // img2img: s.add_noise(image_latents, noise, start)
//! for call in start..s.timesteps().len() {
//!     let input = s.scale_model_input(x.view(), call);
//!     let eps = unet(input, s.timesteps()[call]);
//!     x = s.step(StepInput::new(call, eps.view(), x.view()), &mut rng).prev_sample;
//! }
//! ```
//!
//! One file per algorithm family; the Karras and SDE variants of DPM-Solver++ are config overrides applied
//! by [`build`], as A1111's sampler names imply.
//!
//! Flow-matching models (SD3, Flux) use [`flow_euler`]: the loop is the same, with `init_noise_sigma` 1, no
//! input scaling, and img2img noising by `add_noise` = diffusers' `scale_noise`. Their schedule can depend on
//! the image size (Flux's dynamic shift), so they are built with [`build_with`] and a [`RunOptions`].
//! [`SchedulerKind::parameterization`] tells which models a scheduler can drive.

pub mod betas;
pub mod config;
pub mod ddim;
pub mod ddim_inverse;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod error;
pub mod euler;
pub mod euler_a;
pub mod flow_euler;
pub mod heun;
pub mod kind;
pub mod lcm;
mod ops;
pub mod pndm;
pub mod sigma_run;
pub mod sigmas;
pub mod unipc;

use ndarray::{ArrayD, ArrayViewD};

use super::rng::NoiseSource;

pub use config::{parse_lenient_json, SchedulerConfig};
pub use error::SchedulerError;
pub use kind::{catalogue, Parameterization, SchedulerInfo, SchedulerKind};

/// Result of one denoiser call.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample to feed to the next call (or the final latents after the last call).
    pub prev_sample: ArrayD<f32>,
    /// The scheduler's estimate of the clean latents, when it has one (used for step previews).
    pub pred_original_sample: Option<ArrayD<f32>>,
}

/// What one step consumes: the call index, the U-Net's output for it and the sample it was given.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    /// Index into [`Scheduler::timesteps`].
    pub call: usize,
    /// The denoiser's prediction at this call.
    pub model_output: ArrayViewD<'a, f32>,
    /// The sample before the step.
    pub sample: ArrayViewD<'a, f32>,
}

impl<'a> StepInput<'a> {
    /// The input of call `call`.
    pub fn new(call: usize, model_output: ArrayViewD<'a, f32>, sample: ArrayViewD<'a, f32>) -> Self {
        Self { call, model_output, sample }
    }
}

/// One configured scheduler run: `set_timesteps` already applied.
///
/// `call` is always the index into [`Scheduler::timesteps`]; a run may start past 0 (img2img) but must then
/// visit every later call in order. Arrays are `[b, C, h, w]` for any batch size `b`; `model_output` and
/// `sample` must have the same shape (a mismatch or a `call` out of range is a caller bug and panics).
pub trait Scheduler: Send {
    /// Timestep passed to the U-Net for each denoiser call, in call order (Heun: 2N-1 entries).
    fn timesteps(&self) -> &[f64];
    /// Factor applied to unit-Gaussian noise to form the starting sample (1 for the variance-preserving
    /// families; the sigma-parameterised ones override it).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// `scale_model_input` for call index `call` (the identity unless the family scales its input).
    fn scale_model_input(&self, sample: ArrayViewD<'_, f32>, _call: usize) -> ArrayD<f32> {
        sample.to_owned()
    }
    /// Advances the sample through call index `call` given the U-Net output.
    fn step(&mut self, input: StepInput<'_>, noise: &mut dyn NoiseSource) -> StepOutput;

    /// The number of inference steps the run was built for (diffusers' `num_inference_steps`, which can be
    /// fewer than the calls: Heun makes 2N-1 calls, PLMS N+1).
    fn num_inference_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// diffusers' `scheduler.order`: U-Net calls per step as the img2img start computation counts them
    /// (2 for Heun, 1 otherwise).
    fn order(&self) -> usize {
        1
    }

    /// The sigma of each call plus the final one, for the sigma-parameterised families (Euler, Euler a,
    /// Heun, DPM-Solver, UniPC) and flow matching (where sigma runs from 1, pure noise, to 0); `None` for the
    /// alpha-parameterised ones (DDIM, PNDM, DDPM, LCM).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// img2img: the first call index to run for `strength` in (0, 1], as diffusers' `get_timesteps` computes
    /// it (`t_start = n - min(int(n * strength), n)`, times `order`; the flow-matching pipelines truncate
    /// later, see [`flow_euler`]).
    fn start_call_for_strength(&self, strength: f64) -> Result<usize, SchedulerError> {
        start_call(self.num_inference_steps(), self.order(), self.timesteps().len(), strength)
    }

    /// Noises clean latents `original` to the noise level of call `call` (img2img's starting sample, or
    /// inpainting's re-noised known region), as diffusers' `add_noise` does for that call's timestep
    /// (`scale_noise` for flow matching, which the SD3/Flux img2img pipelines call instead).
    fn add_noise(&self, original: ArrayViewD<'_, f32>, noise: ArrayViewD<'_, f32>, call: usize) -> ArrayD<f32>;
}

/// diffusers' `get_timesteps` for img2img: the first call index for `strength`.
pub fn start_call(
    num_inference_steps: usize,
    order: usize,
    calls: usize,
    strength: f64,
) -> Result<usize, SchedulerError> {
    let invalid = SchedulerError::InvalidStrength { strength, steps: num_inference_steps };
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(invalid);
    }
    let n = num_inference_steps;
    // Python's int() truncates the float product.
    let init_timestep = ((n as f64 * strength) as usize).min(n);
    let t_start = n.saturating_sub(init_timestep);
    let start = t_start * order;
    if start >= calls {
        return Err(invalid);
    }
    Ok(start)
}

/// What a pipeline passes to `set_timesteps` besides the step count, for the schedulers whose schedule
/// depends on the run (flow matching). The diffusion families ignore it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// The number of image tokens the transformer sees: `(h / p) * (w / p)` for latents `h x w` and patch
    /// size `p` (Flux packs 2x2 patches: 4096 for 1024x1024 images, 16 for 64x64; SD3 uses its
    /// `patch_size`). Flow schedulers with `use_dynamic_shifting` derive their shift `mu` from it, as the
    /// pipelines' `calculate_shift` does; without it they fail with [`SchedulerError::MissingImageSeqLen`].
    pub image_seq_len: Option<usize>,
    /// Which sigmas a flow-matching pipeline hands to `set_timesteps` (SD3 and Flux differ).
    pub flow_sigmas: FlowSigmas,
}

/// The starting sigmas of a flow-matching run, before shifting: diffusers' SD3 and Flux pipelines differ here,
/// and the difference changes every timestep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlowSigmas {
    /// `set_timesteps(n)` without sigmas (SD3): the scheduler's own linspace between the ends of its training
    /// schedule (already shifted when the shift is static), then shifted.
    #[default]
    Scheduler,
    /// `sigmas = np.linspace(1, 1/n, n)` passed to `set_timesteps` (Flux).
    Linear,
}

/// Builds `kind` from a model's scheduler config and sets `num_inference_steps`, like diffusers'
/// `Class.from_config(model_config)` followed by `set_timesteps(n)`.
///
/// The kind may differ from the config's `_class_name`; fields the class does not take are ignored. The
/// Karras variants force `use_karras_sigmas=true` and the SDE variant `algorithm_type="sde-dpmsolver++"`.
/// Equivalent to [`build_with`] and default [`RunOptions`] (no image sequence length, SD3-style sigmas).
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    build_with(kind, config, num_inference_steps, &RunOptions::default())
}

/// [`build`] for a run whose schedule depends on more than the step count: flow matching with dynamic
/// shifting (Flux) needs [`RunOptions::image_seq_len`], and Flux's own sigmas are
/// [`FlowSigmas::Linear`].
pub fn build_with(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    options: &RunOptions,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    if num_inference_steps == 0 {
        return Err(SchedulerError::InvalidSteps {
            class: kind.class_name(),
            steps: 0,
            reason: "at least one step is needed".into(),
        });
    }
    let mut cfg = config.clone();
    match kind {
        SchedulerKind::Dpmpp2mKarras => {
            cfg.use_karras_sigmas = Some(true);
            cfg.algorithm_type = Some("dpmsolver++".into());
        }
        SchedulerKind::Dpmpp2mSdeKarras => {
            cfg.use_karras_sigmas = Some(true);
            cfg.algorithm_type = Some("sde-dpmsolver++".into());
        }
        _ => {}
    }
    let n = num_inference_steps;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&cfg, n)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&cfg, n)?),
        SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(&cfg, n)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&cfg, n)?),
        SchedulerKind::EulerA => Box::new(euler_a::EulerAncestral::new(&cfg, n)?),
        SchedulerKind::Heun => Box::new(heun::Heun::new(&cfg, n)?),
        SchedulerKind::Dpmpp2m | SchedulerKind::Dpmpp2mKarras | SchedulerKind::Dpmpp2mSdeKarras => {
            Box::new(dpmpp_2m::DpmSolverMultistep::new(&cfg, n)?)
        }
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(&cfg, n)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(&cfg, n)?),
        SchedulerKind::FlowEuler => Box::new(flow_euler::FlowMatchEuler::new(&cfg, n, options)?),
    })
}

#[cfg(test)]
mod tests;
