//! `scheduler/scheduler_config.json`, parsed the way diffusers' `from_config` reads it.
//!
//! Every field is optional: a missing field takes the default of the class being built (diffusers'
//! `__init__` defaults), which differ between classes. Values are validated by each family when it is built,
//! so a value that matters but is not supported is an error naming the field, never a silent default.

use serde::{Deserialize, Deserializer};

use super::error::SchedulerError;

/// The fields of a diffusers scheduler config that any supported family reads.
///
/// Unknown keys are ignored, as diffusers ignores keys a class does not take.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The class the model was saved with (e.g. `PNDMScheduler`): the model's default scheduler.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// The diffusers version that wrote the file (informational).
    #[serde(rename = "_diffusers_version")]
    pub diffusers_version: Option<String>,
    /// Number of training timesteps (1000 for every SD model).
    pub num_train_timesteps: Option<usize>,
    /// First beta of the training schedule.
    pub beta_start: Option<f64>,
    /// Last beta of the training schedule.
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2` (plus `sigmoid` for DDPM and `exp` for Heun).
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    /// Offset added to `leading` timesteps (1 for SD 1.x).
    pub steps_offset: Option<i64>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// Use the Karras et al. sigma ramp (Euler, Heun, DPM-Solver, UniPC).
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigma ramp (not implemented: an error when true).
    pub use_exponential_sigmas: Option<bool>,
    /// Beta-distribution sigma ramp (not implemented: an error when true).
    pub use_beta_sigmas: Option<bool>,
    /// Lu et al. lambda ramp of DPM-Solver (not implemented: an error when true).
    pub use_lu_lambdas: Option<bool>,
    /// Flow-matching sigmas (not implemented: an error when true).
    pub use_flow_sigmas: Option<bool>,
    /// Flow matching: shift sigmas by `mu` from the image sequence length (Flux) instead of by `shift`
    /// (DPM-Solver and UniPC do not implement it: an error when true there).
    pub use_dynamic_shifting: Option<bool>,
    /// Flow matching: the static shift `s` of `s * sigma / (1 + (s - 1) * sigma)` (SD3: 3.0).
    pub shift: Option<f64>,
    /// Flow matching: `mu` at `base_image_seq_len` tokens (dynamic shifting).
    pub base_shift: Option<f64>,
    /// Flow matching: `mu` at `max_image_seq_len` tokens (dynamic shifting).
    pub max_shift: Option<f64>,
    /// Flow matching: the sequence length where `mu = base_shift`.
    pub base_image_seq_len: Option<usize>,
    /// Flow matching: the sequence length where `mu = max_shift`.
    pub max_image_seq_len: Option<usize>,
    /// Flow matching: `exponential` or `linear` form of the dynamic shift (only `exponential` is implemented).
    pub time_shift_type: Option<String>,
    /// Flow matching: use `1 - sigma` (not implemented: an error when true).
    pub invert_sigmas: Option<bool>,
    /// Flow matching: stretch the schedule to end at this sigma (not implemented: an error when set).
    pub shift_terminal: Option<f64>,
    /// Flow matching: re-noise each step with fresh noise (not implemented: an error when true).
    pub stochastic_sampling: Option<bool>,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: Option<bool>,
    /// Use alpha_cumprod = 1 for the step past the last timestep (DDIM, PNDM, LCM).
    pub set_alpha_to_one: Option<bool>,
    /// Clamp the predicted clean sample to `±clip_sample_range`.
    pub clip_sample: Option<bool>,
    /// Bound used by `clip_sample`.
    pub clip_sample_range: Option<f64>,
    /// Dynamic thresholding of the predicted clean sample (Imagen).
    pub thresholding: Option<bool>,
    /// Quantile used by dynamic thresholding.
    pub dynamic_thresholding_ratio: Option<f64>,
    /// Upper bound of the dynamic threshold.
    pub sample_max_value: Option<f64>,
    /// Multistep solver order (DPM-Solver, UniPC).
    pub solver_order: Option<usize>,
    /// Use lower-order steps at the end (stabilises runs under 15 steps).
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: take a first-order (Euler) final step.
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: `dpmsolver++` or `sde-dpmsolver++`.
    pub algorithm_type: Option<String>,
    /// DPM-Solver `midpoint`/`heun`; UniPC `bh1`/`bh2`.
    pub solver_type: Option<String>,
    /// UniPC: predict x0 (data prediction) rather than noise.
    pub predict_x0: Option<bool>,
    /// UniPC: step indices where the corrector is skipped.
    pub disable_corrector: Option<Vec<usize>>,
    /// UniPC: an external predictor scheduler (not supported: an error when set).
    pub solver_p: Option<serde_json::Value>,
    /// Last sigma: `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: clip lambda(t) from below (for cosine schedules).
    #[serde(deserialize_with = "lenient_f64")]
    pub lambda_min_clipped: Option<f64>,
    /// DDPM `fixed_small`/...; DPM-Solver `learned`/`learned_range` (the latter are not supported).
    pub variance_type: Option<String>,
    /// PNDM: skip the Runge-Kutta warm-up (what Stable Diffusion does).
    pub skip_prk_steps: Option<bool>,
    /// LCM: the step count of the distillation schedule.
    pub original_inference_steps: Option<usize>,
    /// LCM: scale of the timestep in the boundary-condition scalings.
    pub timestep_scaling: Option<f64>,
    /// Euler: `discrete` or `continuous` (continuous = 0.25 log sigma, for v-prediction models).
    pub timestep_type: Option<String>,
    /// Euler: sigma interpolation, `linear` (`log_linear` is not supported).
    pub interpolation_type: Option<String>,
    /// Euler: lower end of the Karras ramp (defaults to the schedule's).
    pub sigma_min: Option<f64>,
    /// Euler: upper end of the Karras ramp (defaults to the schedule's).
    pub sigma_max: Option<f64>,
}

impl SchedulerConfig {
    /// Parses the text of a `scheduler_config.json`, accepting the `NaN`/`Infinity`/`-Infinity` literals that
    /// Python's `json` module writes (diffusers saves `lambda_min_clipped: -Infinity`).
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        let value = parse_lenient_json(text)?;
        Self::from_value(value)
    }

    /// Reads a config from an already parsed JSON value (e.g. the `config` object of a golden file).
    pub fn from_value(value: serde_json::Value) -> Result<Self, SchedulerError> {
        serde_json::from_value(value).map_err(|e| SchedulerError::InvalidJson(e.to_string()))
    }
}

/// Parses JSON that may contain Python's non-standard `NaN`, `Infinity` and `-Infinity` literals.
///
/// Those literals (outside strings) become the strings `"NaN"`, `"Infinity"` and `"-Infinity"`; numeric
/// fields of [`SchedulerConfig`] that can hold them accept those strings.
pub fn parse_lenient_json(text: &str) -> Result<serde_json::Value, SchedulerError> {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let literal = ["-Infinity", "Infinity", "NaN"].into_iter().find(|lit| rest.starts_with(lit));
        if let Some(lit) = literal {
            out.push('"');
            out.push_str(lit);
            out.push('"');
            rest = &rest[lit.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    serde_json::from_str(&out).map_err(|e| SchedulerError::InvalidJson(e.to_string()))
}

/// Reads a float that may be written as a number or as one of the strings `parse_lenient_json` produces.
fn lenient_f64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrText {
        Num(f64),
        Text(String),
    }
    match Option::<NumOrText>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumOrText::Num(v)) => Ok(Some(v)),
        Some(NumOrText::Text(t)) => match t.as_str() {
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            other => Err(serde::de::Error::custom(format!("expected a number, got {other:?}"))),
        },
    }
}

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD 1.x, SDXL).
    Epsilon,
    /// The velocity `alpha * noise - sigma * x0` (SD 2.x 768).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are spread over the training timesteps (Lin et al. 2023, table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `arange(n) * (T // n) + steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T/n)) - 1`.
    Trailing,
    /// `linspace(0, T-1, n)`.
    Linspace,
}

/// What the last sigma of a sigma schedule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// The sample is fully denoised at the end.
    Zero,
    /// The last sigma is the training schedule's smallest.
    SigmaMin,
}

/// Config accessors with a class's defaults; each returns a typed value or an error naming the field.
impl SchedulerConfig {
    pub(crate) fn train_steps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    /// The training timestep count, after checking that `n` inference steps fit in it (diffusers raises the
    /// same error in every scheduler's `set_timesteps`).
    pub(crate) fn checked_train_steps(&self, n: usize, class: &'static str) -> Result<usize, SchedulerError> {
        let train = self.train_steps();
        if n > train {
            return Err(SchedulerError::InvalidSteps {
                class,
                steps: n,
                reason: format!("more than the {train} training timesteps"),
            });
        }
        Ok(train)
    }

    pub(crate) fn prediction(
        &self,
        class: &'static str,
        allowed: &[PredictionType],
    ) -> Result<PredictionType, SchedulerError> {
        let raw = self.prediction_type.as_deref().unwrap_or("epsilon");
        let parsed = match raw {
            "epsilon" => Some(PredictionType::Epsilon),
            "v_prediction" => Some(PredictionType::VPrediction),
            "sample" => Some(PredictionType::Sample),
            _ => None,
        };
        match parsed {
            Some(p) if allowed.contains(&p) => Ok(p),
            _ => Err(unsupported("prediction_type", raw, class)),
        }
    }

    pub(crate) fn spacing(
        &self,
        default: TimestepSpacing,
        class: &'static str,
    ) -> Result<TimestepSpacing, SchedulerError> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some(other) => Err(unsupported("timestep_spacing", other, class)),
        }
    }

    pub(crate) fn final_sigmas(&self, class: &'static str) -> Result<FinalSigmas, SchedulerError> {
        match self.final_sigmas_type.as_deref() {
            None | Some("zero") => Ok(FinalSigmas::Zero),
            Some("sigma_min") => Ok(FinalSigmas::SigmaMin),
            Some(other) => Err(unsupported("final_sigmas_type", other, class)),
        }
    }

    pub(crate) fn offset(&self) -> i64 {
        self.steps_offset.unwrap_or(0)
    }
}

/// An error for a field whose value is not supported by `class`.
pub(crate) fn unsupported(field: &'static str, value: impl ToString, class: &'static str) -> SchedulerError {
    SchedulerError::UnsupportedValue { field, value: value.to_string(), class }
}

/// Rejects a boolean feature flag that this implementation does not provide when it is set.
pub(crate) fn reject_flag(flag: Option<bool>, field: &'static str, class: &'static str) -> Result<(), SchedulerError> {
    match flag {
        Some(true) => Err(unsupported(field, "true", class)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_are_accepted_outside_strings_only() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "algorithm_type": "NaN-Infinity"}"#,
        )
        .expect("parses");
        assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(cfg.algorithm_type.as_deref(), Some("NaN-Infinity"));
    }

    #[test]
    fn wrong_json_type_is_an_error() {
        let err = SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#).unwrap_err();
        assert!(matches!(err, SchedulerError::InvalidJson(_)));
    }
}
