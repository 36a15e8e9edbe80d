//! The one error type of the scheduler module.

use thiserror::Error;

use super::kind::Parameterization;

/// Why a scheduler could not be configured or positioned.
///
/// Every variant names what was wrong, so an API error can tell the user which config field or request value
/// to fix instead of silently falling back to a default that would change the image.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SchedulerError {
    /// `scheduler_config.json` is not valid JSON or a field has the wrong JSON type.
    #[error("invalid scheduler config: {0}")]
    InvalidJson(String),
    /// A field holds a value this scheduler family does not know or does not implement.
    #[error("scheduler config field `{field}` has unsupported value {value} for {class}")]
    UnsupportedValue {
        /// The config field, spelled as in `scheduler_config.json`.
        field: &'static str,
        /// The offending value, as JSON-ish text.
        value: String,
        /// The diffusers class being built (e.g. `DDIMScheduler`).
        class: &'static str,
    },
    /// The requested number of inference steps cannot be scheduled with this config.
    #[error("{class} cannot run {steps} inference steps: {reason}")]
    InvalidSteps {
        /// The diffusers class being built.
        class: &'static str,
        /// The requested step count.
        steps: usize,
        /// Why it is impossible.
        reason: String,
    },
    /// The config asks for dynamic shifting, which needs the image sequence length, and the caller gave none
    /// (build with [`super::build_with`] and [`super::RunOptions::image_seq_len`]).
    #[error("{class} has use_dynamic_shifting=true and needs the image sequence length to compute its shift")]
    MissingImageSeqLen {
        /// The diffusers class being built.
        class: &'static str,
    },
    /// A scheduler was asked to drive a model of the other parameterisation (e.g. a flow-matching scheduler on
    /// an SD 1.x U-Net), which would run without error and produce noise.
    #[error("scheduler `{scheduler}` needs {}; this model is {}", needs.model_description(), model.model_description())]
    WrongParameterization {
        /// The scheduler's request name.
        scheduler: &'static str,
        /// What the scheduler drives.
        needs: Parameterization,
        /// What the model is.
        model: Parameterization,
    },
    /// An img2img `strength` outside (0, 1] or one that leaves no denoising step.
    #[error("strength {strength} leaves no denoising step out of {steps} (or is outside (0, 1])")]
    InvalidStrength {
        /// The requested strength.
        strength: f64,
        /// The configured number of inference steps.
        steps: usize,
    },
}
