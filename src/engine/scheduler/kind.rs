//! The scheduler names a request may use, their A1111 aliases, the model-default mapping from a diffusers
//! `_class_name`, and which kind of model (diffusion or flow matching) each scheduler can drive.

use super::error::SchedulerError;

/// One selectable sampler: a diffusers scheduler class plus the config overrides its name implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `PNDMScheduler` (PLMS when `skip_prk_steps`, as Stable Diffusion ships it).
    Pndm,
    /// `DDPMScheduler`.
    Ddpm,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerA,
    /// `HeunDiscreteScheduler`.
    Heun,
    /// `DPMSolverMultistepScheduler` as the model config sets it (dpmsolver++, order 2 by default).
    Dpmpp2m,
    /// `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` and `use_karras_sigmas=true`.
    Dpmpp2mKarras,
    /// `DPMSolverMultistepScheduler` with `algorithm_type="sde-dpmsolver++"` and `use_karras_sigmas=true`.
    Dpmpp2mSdeKarras,
    /// `UniPCMultistepScheduler`.
    UniPc,
    /// `LCMScheduler`.
    Lcm,
    /// `FlowMatchEulerDiscreteScheduler`: the flow-matching Euler sampler of SD3 and Flux.
    FlowEuler,
}

/// What a model's denoiser was trained to predict, which decides the schedulers that can drive it.
///
/// The two families are not interchangeable: a diffusion scheduler on a flow model (or the reverse) runs
/// without any error and produces noise, so the server must refuse the mismatch up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parameterization {
    /// A noise-prediction diffusion model (epsilon, v or sample prediction on a beta schedule): SD 1.x/2.x,
    /// SDXL, LCM.
    Diffusion,
    /// A rectified-flow model predicting the velocity `noise - x0`: SD3, Flux.
    FlowMatching,
}

impl Parameterization {
    /// The kind of model, in words, for error messages.
    pub fn model_description(self) -> &'static str {
        match self {
            Self::Diffusion => "a diffusion (noise-prediction) model such as SD 1.x/2.x or SDXL",
            Self::FlowMatching => "a flow-matching model such as SD3 or Flux",
        }
    }
}

/// A catalogue entry, e.g. for `GET /v1/schedulers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerInfo {
    /// The kind.
    pub kind: SchedulerKind,
    /// The canonical request name (`euler_a`).
    pub name: &'static str,
    /// The diffusers class it builds.
    pub class_name: &'static str,
    /// Other accepted names (A1111 display names), matched case-insensitively.
    pub aliases: &'static [&'static str],
    /// One line on what it is good for.
    pub description: &'static str,
}

const ALL: [SchedulerKind; 12] = [
    SchedulerKind::Ddim,
    SchedulerKind::Pndm,
    SchedulerKind::Ddpm,
    SchedulerKind::Euler,
    SchedulerKind::EulerA,
    SchedulerKind::Heun,
    SchedulerKind::Dpmpp2m,
    SchedulerKind::Dpmpp2mKarras,
    SchedulerKind::Dpmpp2mSdeKarras,
    SchedulerKind::UniPc,
    SchedulerKind::Lcm,
    SchedulerKind::FlowEuler,
];

impl SchedulerKind {
    /// Every kind, in catalogue order.
    pub fn all() -> &'static [SchedulerKind] {
        &ALL
    }

    /// The kinds that can drive a model of parameterisation `p`, in catalogue order (what a model lists and
    /// accepts).
    pub fn all_for(p: Parameterization) -> impl Iterator<Item = SchedulerKind> {
        ALL.into_iter().filter(move |k| k.parameterization() == p)
    }

    /// The kind of model this scheduler can drive.
    pub fn parameterization(self) -> Parameterization {
        match self {
            Self::FlowEuler => Parameterization::FlowMatching,
            _ => Parameterization::Diffusion,
        }
    }

    /// `Ok` when this scheduler can drive a model of parameterisation `model`; otherwise the error a request
    /// should report on its `scheduler` field.
    pub fn check_model(self, model: Parameterization) -> Result<(), SchedulerError> {
        let needs = self.parameterization();
        if needs == model {
            Ok(())
        } else {
            Err(SchedulerError::WrongParameterization { scheduler: self.name(), needs, model })
        }
    }

    /// The canonical request name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Ddpm => "ddpm",
            Self::Euler => "euler",
            Self::EulerA => "euler_a",
            Self::Heun => "heun",
            Self::Dpmpp2m => "dpmpp_2m",
            Self::Dpmpp2mKarras => "dpmpp_2m_karras",
            Self::Dpmpp2mSdeKarras => "dpmpp_2m_sde_karras",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
            Self::FlowEuler => "flow_euler",
        }
    }

    /// Other names a request may use for this kind (A1111 display names and common spellings).
    pub fn aliases(self) -> &'static [&'static str] {
        match self {
            Self::Ddim => &["DDIM"],
            Self::Pndm => &["PLMS", "PNDM"],
            Self::Ddpm => &["DDPM"],
            Self::Euler => &["Euler"],
            Self::EulerA => &["Euler a", "euler_ancestral", "Euler Ancestral"],
            Self::Heun => &["Heun"],
            Self::Dpmpp2m => &["DPM++ 2M"],
            Self::Dpmpp2mKarras => &["DPM++ 2M Karras"],
            Self::Dpmpp2mSdeKarras => &["DPM++ 2M SDE Karras"],
            Self::UniPc => &["UniPC"],
            Self::Lcm => &["LCM"],
            Self::FlowEuler => &["Euler (flow matching)", "FlowMatchEuler", "flow_match_euler"],
        }
    }

    /// The diffusers class this kind builds.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Ddpm => "DDPMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerA => "EulerAncestralDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Dpmpp2m | Self::Dpmpp2mKarras | Self::Dpmpp2mSdeKarras => "DPMSolverMultistepScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
            Self::FlowEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    /// One line on what the sampler is good for.
    pub fn description(self) -> &'static str {
        match self {
            Self::Ddim => "Deterministic, fast and stable at 20-50 steps; the usual choice for img2img and inversion.",
            Self::Pndm => "PLMS, Stable Diffusion 1.x's shipped default; deterministic, good at 30-50 steps.",
            Self::Ddpm => "The original stochastic sampler; needs many steps (100+), mostly for reference.",
            Self::Euler => "Simple and deterministic; good results at 20-30 steps.",
            Self::EulerA => {
                "Ancestral (adds fresh noise each step): varied, creative results at 20-40 steps; does not converge."
            }
            Self::Heun => "Second-order, two U-Net calls per step: higher quality per step but about twice as slow.",
            Self::Dpmpp2m => "DPM-Solver++ 2M: fast, deterministic, high quality at 15-25 steps.",
            Self::Dpmpp2mKarras => "DPM++ 2M with Karras sigmas: a popular default, sharp detail at 15-25 steps.",
            Self::Dpmpp2mSdeKarras => {
                "Stochastic DPM++ 2M with Karras sigmas: rich detail at 20-30 steps, varies with seed."
            }
            Self::UniPc => "UniPC predictor-corrector: among the best quality at very few steps (5-10).",
            Self::Lcm => "For latent-consistency (LCM/LCM-LoRA) models only: 1-8 steps, guidance near 1.",
            Self::FlowEuler => {
                "For flow-matching models only (SD3, Flux): Euler on the rectified flow, their shipped default."
            }
        }
    }

    /// Parses a request's scheduler name: a canonical name or an alias, case-insensitively.
    pub fn from_request_name(name: &str) -> Option<Self> {
        let wanted = name.trim();
        ALL.into_iter().find(|k| {
            k.name().eq_ignore_ascii_case(wanted) || k.aliases().iter().any(|a| a.eq_ignore_ascii_case(wanted))
        })
    }

    /// The kind for a model's `_class_name` (its default scheduler), if supported.
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        match class_name {
            "DDIMScheduler" => Some(Self::Ddim),
            "PNDMScheduler" => Some(Self::Pndm),
            "DDPMScheduler" => Some(Self::Ddpm),
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerA),
            "HeunDiscreteScheduler" => Some(Self::Heun),
            "DPMSolverMultistepScheduler" => Some(Self::Dpmpp2m),
            "UniPCMultistepScheduler" => Some(Self::UniPc),
            "LCMScheduler" => Some(Self::Lcm),
            "FlowMatchEulerDiscreteScheduler" => Some(Self::FlowEuler),
            _ => None,
        }
    }

    /// This kind's catalogue entry.
    pub fn info(self) -> SchedulerInfo {
        SchedulerInfo {
            kind: self,
            name: self.name(),
            class_name: self.class_name(),
            aliases: self.aliases(),
            description: self.description(),
        }
    }
}

/// Every selectable scheduler with its names and description (for `GET /v1/schedulers`).
pub fn catalogue() -> Vec<SchedulerInfo> {
    ALL.into_iter().map(SchedulerKind::info).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_and_a1111_aliases_resolve() {
        for kind in SchedulerKind::all() {
            assert_eq!(SchedulerKind::from_request_name(kind.name()), Some(*kind));
            for alias in kind.aliases() {
                assert_eq!(SchedulerKind::from_request_name(alias), Some(*kind), "{alias}");
                assert_eq!(SchedulerKind::from_request_name(&alias.to_uppercase()), Some(*kind));
            }
        }
        assert_eq!(SchedulerKind::from_request_name("PLMS"), Some(SchedulerKind::Pndm));
        assert_eq!(SchedulerKind::from_request_name("euler a"), Some(SchedulerKind::EulerA));
        assert_eq!(SchedulerKind::from_request_name("dpm++ 2m sde karras"), Some(SchedulerKind::Dpmpp2mSdeKarras));
        assert_eq!(SchedulerKind::from_request_name("DPM++ 2M Karras"), Some(SchedulerKind::Dpmpp2mKarras));
        assert_eq!(SchedulerKind::from_request_name("nope"), None);
    }

    #[test]
    fn class_names_round_trip_and_catalogue_is_complete() {
        assert_eq!(SchedulerKind::from_class_name("EulerDiscreteScheduler"), Some(SchedulerKind::Euler));
        assert_eq!(SchedulerKind::from_class_name("FlowMatchEulerDiscreteScheduler"), Some(SchedulerKind::FlowEuler));
        assert_eq!(SchedulerKind::from_class_name("FlowMatchHeunDiscreteScheduler"), None);
        let cat = catalogue();
        assert_eq!(cat.len(), 12);
        assert!(cat.iter().all(|i| !i.description.is_empty()));
    }
}

#[cfg(test)]
mod parameterization_tests {
    use super::*;

    #[test]
    fn each_model_family_lists_only_its_own_schedulers() {
        let diffusion: Vec<_> = SchedulerKind::all_for(Parameterization::Diffusion).collect();
        let flow: Vec<_> = SchedulerKind::all_for(Parameterization::FlowMatching).collect();
        assert_eq!(flow, [SchedulerKind::FlowEuler]);
        assert_eq!(diffusion.len(), 11);
        assert!(!diffusion.contains(&SchedulerKind::FlowEuler));
        assert_eq!(diffusion.len() + flow.len(), SchedulerKind::all().len());
    }

    #[test]
    fn a_mismatch_is_an_error_naming_what_the_scheduler_needs() {
        assert_eq!(SchedulerKind::FlowEuler.check_model(Parameterization::FlowMatching), Ok(()));
        assert_eq!(SchedulerKind::Euler.check_model(Parameterization::Diffusion), Ok(()));
        let err = SchedulerKind::FlowEuler.check_model(Parameterization::Diffusion).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("flow_euler") && text.contains("needs a flow-matching model"), "{text}");
        let err = SchedulerKind::Dpmpp2mKarras.check_model(Parameterization::FlowMatching).unwrap_err();
        assert!(err.to_string().contains("needs a diffusion"), "{err}");
    }

    #[test]
    fn flow_euler_resolves_from_its_names() {
        for name in ["flow_euler", "Euler (flow matching)", "flowmatcheuler", "FLOW_MATCH_EULER"] {
            assert_eq!(SchedulerKind::from_request_name(name), Some(SchedulerKind::FlowEuler), "{name}");
        }
        // Plain "Euler" stays the diffusion Euler.
        assert_eq!(SchedulerKind::from_request_name("Euler"), Some(SchedulerKind::Euler));
    }
}
