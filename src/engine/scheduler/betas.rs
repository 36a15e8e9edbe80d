//! The training noise schedule (betas and their cumulative alpha product), computed in float32 the way
//! PyTorch computes it, so that every derived number matches diffusers to the last digits.

use super::config::{unsupported, SchedulerConfig};
use super::error::SchedulerError;

/// A class's defaults and options for the beta schedule.
pub(crate) struct BetaSpec {
    /// The diffusers class, for error messages.
    pub class: &'static str,
    /// Default `beta_start`.
    pub start: f64,
    /// Default `beta_end`.
    pub end: f64,
    /// Default `beta_schedule`.
    pub schedule: &'static str,
    /// Extra schedule names the class accepts beyond linear/scaled_linear/squaredcos_cap_v2.
    pub extra: &'static [&'static str],
    /// How the class treats `rescale_betas_zero_snr`.
    pub rescale: Rescale,
}

impl BetaSpec {
    /// diffusers' default schedule (`linear`, 0.0001 to 0.02, no extra schedule names), which most classes use.
    pub(crate) fn linear(class: &'static str, rescale: Rescale) -> Self {
        BetaSpec { class, start: 0.0001, end: 0.02, schedule: "linear", extra: &[], rescale }
    }
}

/// How a class handles `rescale_betas_zero_snr`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rescale {
    /// The class has no such parameter: the field is ignored.
    Ignored,
    /// Rescale; the terminal alpha_cumprod stays 0.
    Plain,
    /// Rescale, then set the terminal alpha_cumprod to 2^-24 so sigmas stay finite.
    TerminalEpsilon,
}

/// `torch.linspace(start, end, n, dtype=float32)` as PyTorch's CPU kernel evaluates it.
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
}

/// `betas_for_alpha_bar`: betas that discretise a continuous alpha-bar function.
fn betas_for_alpha_bar(n: usize, alpha_bar: impl Fn(f64) -> f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let cumprod = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    let mut sqrt: Vec<f32> = cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt[0];
    let last = sqrt[sqrt.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `torch.cumprod` on a float32 CPU tensor: accumulates in float64, stores float32.
fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// The training schedule's `alphas_cumprod` (float32 values), per the class's config handling.
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, spec: &BetaSpec) -> Result<Vec<f32>, SchedulerError> {
    let n = cfg.train_steps();
    if n < 2 {
        return Err(unsupported("num_train_timesteps", n, spec.class));
    }
    let start = cfg.beta_start.unwrap_or(spec.start);
    let end = cfg.beta_end.unwrap_or(spec.end);
    let betas: Vec<f32> = if let Some(trained) = &cfg.trained_betas {
        if trained.len() != n {
            return Err(unsupported("trained_betas", format!("{} values", trained.len()), spec.class));
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        let schedule = cfg.beta_schedule.as_deref().unwrap_or(spec.schedule);
        match schedule {
            "linear" => linspace_f32(start as f32, end as f32, n),
            "scaled_linear" => {
                linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n).into_iter().map(|b| b * b).collect()
            }
            "squaredcos_cap_v2" => {
                betas_for_alpha_bar(n, |t| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2))
            }
            "exp" if spec.extra.contains(&"exp") => betas_for_alpha_bar(n, |t| (t * -12.0).exp()),
            "sigmoid" if spec.extra.contains(&"sigmoid") => linspace_f32(-6.0, 6.0, n)
                .into_iter()
                .map(|x| {
                    let s = 1.0 / (1.0 + (-x).exp());
                    s * (end - start) as f32 + start as f32
                })
                .collect(),
            other => return Err(unsupported("beta_schedule", format!("{other:?}"), spec.class)),
        }
    };
    let rescale = cfg.rescale_betas_zero_snr.unwrap_or(false) && spec.rescale != Rescale::Ignored;
    let betas = if rescale { rescale_zero_terminal_snr(&betas) } else { betas };
    let mut acp = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    if rescale && spec.rescale == Rescale::TerminalEpsilon {
        if let Some(last) = acp.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(acp)
}

/// The training sigmas `((1 - a) / a) ** 0.5` in float32, indexed by training timestep.
pub(crate) fn train_sigmas(acp: &[f32]) -> Vec<f32> {
    acp.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BetaSpec {
        BetaSpec::linear("DDIMScheduler", Rescale::Plain)
    }

    #[test]
    fn unknown_beta_schedule_names_field_and_value() {
        let cfg = SchedulerConfig { beta_schedule: Some("foo".into()), ..Default::default() };
        let err = alphas_cumprod(&cfg, &spec()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("beta_schedule") && text.contains("foo"), "{text}");
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let cfg = SchedulerConfig {
            beta_schedule: Some("scaled_linear".into()),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            rescale_betas_zero_snr: Some(true),
            ..Default::default()
        };
        let acp = alphas_cumprod(&cfg, &spec()).expect("builds");
        assert_eq!(acp[999], 0.0);
        assert!(acp[0] > 0.99);
    }
}
