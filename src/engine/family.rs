//! Model families: which diffusers pipeline an export was made from, and what that means for the graphs the
//! engine must find and feed.
//!
//! The family is read from `model_index.json`'s `_class_name` ([`Family::detect`]); its optional conditioning
//! flags come from the same file ([`FamilyTraits::read`]). The graphs then confirm it at load time
//! ([`UnetExtras::from_graph`]): an SDXL U-Net must take `text_embeds` and `time_ids`, a consistency-distilled
//! U-Net takes `timestep_cond`, and a graph that takes anything else is refused with a one-line error.

use serde_json::Value;

use super::graph::Graph;

/// The families of export the engine runs.
/// Serialised as [`Family::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// Stable Diffusion 1.x / 2.x: one CLIP text encoder, `last_hidden_state`.
    #[serde(rename = "sd")]
    StableDiffusion,
    /// Stable Diffusion XL (base, refiner, inpainting): two CLIP encoders (the refiner has only the second),
    /// penultimate hidden states concatenated, pooled `text_embeds` and micro-conditioning `time_ids`.
    #[serde(rename = "sdxl")]
    StableDiffusionXl,
    /// Latent consistency models (SD-1.x-shaped): the guidance scale is embedded into `timestep_cond`, no
    /// classifier-free-guidance batch, `LCMScheduler`.
    #[serde(rename = "lcm")]
    LatentConsistency,
}

/// Pipeline classes per family, with and without optimum's `ORT` prefix.
const CLASSES: &[(&str, Family)] = &[
    ("StableDiffusionPipeline", Family::StableDiffusion),
    ("StableDiffusionImg2ImgPipeline", Family::StableDiffusion),
    ("StableDiffusionInpaintPipeline", Family::StableDiffusion),
    ("StableDiffusionInstructPix2PixPipeline", Family::StableDiffusion),
    ("StableDiffusionXLPipeline", Family::StableDiffusionXl),
    ("StableDiffusionXLImg2ImgPipeline", Family::StableDiffusionXl),
    ("StableDiffusionXLInpaintPipeline", Family::StableDiffusionXl),
    ("LatentConsistencyModelPipeline", Family::LatentConsistency),
    ("LatentConsistencyModelImg2ImgPipeline", Family::LatentConsistency),
];

/// Families that are recognised but not run yet, by class-name prefix.
const KNOWN_UNSUPPORTED: &[(&str, &str)] =
    &[("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusionXLInstructPix2Pix", "sdxl_instruct")];

impl Family {
    /// The family of a diffusers pipeline class (`_class_name` of `model_index.json`); `Err` says why the
    /// class cannot be run.
    pub fn detect(class_name: &str) -> Result<Self, String> {
        let bare = class_name.strip_prefix("ORT").unwrap_or(class_name);
        if let Some((_, family)) = CLASSES.iter().find(|(name, _)| *name == bare) {
            return Ok(*family);
        }
        if let Some((_, name)) = KNOWN_UNSUPPORTED.iter().find(|(prefix, _)| bare.starts_with(prefix)) {
            return Err(format!("pipeline `{class_name}` (family {name}) is not supported yet"));
        }
        let known: Vec<&str> = CLASSES.iter().map(|(name, _)| *name).collect();
        Err(format!("pipeline `{class_name}` is of no known family (supported: {})", known.join(", ")))
    }

    /// The name used in API documents (`sd`, `sdxl`, `lcm`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::StableDiffusion => "sd",
            Family::StableDiffusionXl => "sdxl",
            Family::LatentConsistency => "lcm",
        }
    }

    /// The step count the family's diffusers pipeline uses by default, where it differs from a typical
    /// Stable Diffusion run (LCM: 4).
    pub fn default_steps(self) -> Option<u32> {
        match self {
            Family::LatentConsistency => Some(4),
            Family::StableDiffusion | Family::StableDiffusionXl => None,
        }
    }

    /// The guidance scale of the family's diffusers pipeline, where it differs from Stable Diffusion's 7.5
    /// (SDXL: 5.0; LCM: 8.5, embedded into `timestep_cond` as `w = 7.5`).
    pub fn default_guidance_scale(self) -> Option<f32> {
        match self {
            Family::StableDiffusionXl => Some(5.0),
            Family::LatentConsistency => Some(8.5),
            Family::StableDiffusion => None,
        }
    }

    /// Which hidden state of each text encoder conditions the U-Net.
    pub fn hidden_layer(self) -> HiddenLayer {
        match self {
            Family::StableDiffusionXl => HiddenLayer::Penultimate,
            Family::StableDiffusion | Family::LatentConsistency => HiddenLayer::Last,
        }
    }

    /// The text encoders (graph folder, tokenizer folder) the family reads, in concatenation order. SDXL's
    /// first encoder is optional (the refiner has none): `text_encoder_present` says whether the export has it.
    pub fn text_encoders(self, text_encoder_present: bool) -> Vec<(&'static str, &'static str)> {
        match self {
            Family::StableDiffusionXl if !text_encoder_present => vec![("text_encoder_2", "tokenizer_2")],
            Family::StableDiffusionXl => vec![("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")],
            Family::StableDiffusion | Family::LatentConsistency => vec![("text_encoder", "tokenizer")],
        }
    }
}

/// Which text-encoder output becomes `encoder_hidden_states`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// `last_hidden_state` (after the final layer norm): SD 1.x/2.x, LCM.
    Last,
    /// diffusers' `hidden_states[-2]`, which optimum exports as `hidden_states.{L-1}` (`hidden_states.L` is the
    /// last layer's output *before* the final layer norm): SDXL.
    Penultimate,
}

/// The family's flags from `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyTraits {
    /// The family.
    pub family: Family,
    /// SDXL: an absent negative prompt gives zero embeddings instead of encoding `""`.
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL refiner: `time_ids` end with an aesthetic score instead of the target size.
    pub requires_aesthetics_score: bool,
}

impl FamilyTraits {
    /// Reads the family and its flags from a parsed `model_index.json`.
    pub fn read(index: &Value) -> Result<Self, String> {
        let class = index.get("_class_name").and_then(Value::as_str).unwrap_or_default();
        let family = Family::detect(class)?;
        let flag = |key: &str| index.get(key).and_then(Value::as_bool).unwrap_or(false);
        let sdxl = family == Family::StableDiffusionXl;
        Ok(Self {
            family,
            // diffusers' SDXL pipelines default `force_zeros_for_empty_prompt` to true.
            force_zeros_for_empty_prompt: sdxl
                && index.get("force_zeros_for_empty_prompt").and_then(Value::as_bool).unwrap_or(true),
            requires_aesthetics_score: sdxl && flag("requires_aesthetics_score"),
        })
    }
}

/// Whether `model_index.json` lists a component (`"text_encoder": ["transformers", "CLIPTextModel"]`, not
/// `[null, null]`).
pub fn lists_component(index: &Value, name: &str) -> bool {
    index.get(name).and_then(Value::as_array).is_some_and(|a| a.iter().any(|v| !v.is_null()))
}

/// What SDXL's `time_ids` hold after the original size and the crop's top-left corner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeIds {
    /// The target size (height, width): 6 values.
    TargetSize,
    /// An aesthetic score (the refiner): 5 values.
    AestheticScore,
}

/// The U-Net inputs beyond `sample`, `timestep` and `encoder_hidden_states`, read from the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnetExtras {
    /// SDXL: pooled text embedding (`text_embeds`) and `time_ids`.
    pub time_ids: Option<TimeIds>,
    /// Width of `timestep_cond` (the guidance-scale embedding of consistency-distilled U-Nets).
    pub timestep_cond: Option<usize>,
}

impl UnetExtras {
    /// Checks the U-Net's inputs against the family; `Err` is a one-line reason naming the input.
    pub fn from_graph(traits: &FamilyTraits, unet: &Graph, cond_dim_config: Option<usize>) -> Result<Self, String> {
        const BASE: [&str; 3] = ["sample", "timestep", "encoder_hidden_states"];
        let sdxl = traits.family == Family::StableDiffusionXl;
        let mut extras = UnetExtras { time_ids: None, timestep_cond: None };
        for spec in unet.inputs().iter().filter(|s| !BASE.contains(&s.name.as_str())) {
            if !spec.element.is_float() {
                return Err(format!("U-Net input `{}` has element type {:?}", spec.name, spec.element));
            }
            match spec.name.as_str() {
                "text_embeds" if sdxl => {}
                "time_ids" if sdxl => {
                    let (kind, width) = if traits.requires_aesthetics_score {
                        (TimeIds::AestheticScore, 5)
                    } else {
                        (TimeIds::TargetSize, 6)
                    };
                    match spec.shape.last() {
                        Some(&w) if w > 0 && w != width => {
                            return Err(format!(
                                "U-Net `time_ids` has {w} values, model_index.json implies {width} \
                                 (requires_aesthetics_score {})",
                                traits.requires_aesthetics_score
                            ));
                        }
                        _ => extras.time_ids = Some(kind),
                    }
                }
                "timestep_cond" => {
                    let declared = spec.shape.last().copied().filter(|&d| d > 0).map(|d| d as usize);
                    let width = declared.or(cond_dim_config).ok_or("U-Net `timestep_cond` has no known width")?;
                    extras.timestep_cond = Some(width);
                }
                other => {
                    return Err(format!(
                        "U-Net input `{other}` is not supported for family {}",
                        traits.family.as_str()
                    ));
                }
            }
        }
        if sdxl && (extras.time_ids.is_none() || unet.input("text_embeds").is_none()) {
            return Err("an SDXL U-Net must take `text_embeds` and `time_ids`".into());
        }
        if traits.family == Family::LatentConsistency && extras.timestep_cond.is_none() {
            return Err("a latent consistency U-Net must take `timestep_cond`".into());
        }
        Ok(extras)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_come_from_the_pipeline_class() {
        assert_eq!(Family::detect("StableDiffusionPipeline"), Ok(Family::StableDiffusion));
        assert_eq!(Family::detect("ORTStableDiffusionXLImg2ImgPipeline"), Ok(Family::StableDiffusionXl));
        assert_eq!(Family::detect("LatentConsistencyModelPipeline"), Ok(Family::LatentConsistency));
        assert!(Family::detect("FluxPipeline").unwrap_err().contains("family flux"));
        assert!(Family::detect("StableDiffusion3Pipeline").unwrap_err().contains("not supported yet"));
        assert!(Family::detect("KandinskyPipeline").unwrap_err().contains("no known family"));
    }

    #[test]
    fn sdxl_flags_default_as_diffusers_does() {
        let base = FamilyTraits::read(&serde_json::json!({"_class_name": "StableDiffusionXLPipeline"})).unwrap();
        assert!(base.force_zeros_for_empty_prompt && !base.requires_aesthetics_score);
        let refiner = FamilyTraits::read(&serde_json::json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": false,
            "requires_aesthetics_score": true
        }))
        .unwrap();
        assert!(!refiner.force_zeros_for_empty_prompt && refiner.requires_aesthetics_score);
        let sd = FamilyTraits::read(&serde_json::json!({"_class_name": "StableDiffusionPipeline"})).unwrap();
        assert!(!sd.force_zeros_for_empty_prompt);
    }

    #[test]
    fn components_listed_as_null_are_absent() {
        let index = serde_json::json!({"text_encoder": [null, null], "text_encoder_2": ["transformers", "X"]});
        assert!(!lists_component(&index, "text_encoder"));
        assert!(lists_component(&index, "text_encoder_2"));
        assert!(!lists_component(&index, "tokenizer"));
    }
}
