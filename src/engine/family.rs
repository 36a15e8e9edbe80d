//! Model families: which diffusers pipeline an export was made from, and what that means for the graphs the
//! engine must find and feed.
//!
//! The family is read from `model_index.json`'s `_class_name` ([`Family::detect`]); its optional conditioning
//! flags come from the same file ([`FamilyTraits::read`]). The graphs then confirm it at load time
//! ([`UnetExtras::from_graph`]): an SDXL U-Net must take `text_embeds` and `time_ids`, a consistency-distilled
//! U-Net takes `timestep_cond`, and a graph that takes anything else is refused with a one-line error.

use serde_json::Value;

use super::graph::Graph;
use super::scheduler::Parameterization;

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
    /// Stable Diffusion 3: CLIP-L and CLIP-G (penultimate states, pooled `text_embeds`) plus an optional T5,
    /// a joint-attention transformer on 16-channel latents, flow matching.
    #[serde(rename = "sd3")]
    StableDiffusion3,
    /// Flux.1 (dev with a guidance embedding, schnell without): CLIP pooled plus T5 states, a transformer on
    /// 2×2-packed 16-channel latents with position ids, flow matching with dynamic shifting.
    #[serde(rename = "flux")]
    Flux,
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
    ("StableDiffusion3Pipeline", Family::StableDiffusion3),
    ("StableDiffusion3Img2ImgPipeline", Family::StableDiffusion3),
    ("StableDiffusion3InpaintPipeline", Family::StableDiffusion3),
    ("FluxPipeline", Family::Flux),
    ("FluxImg2ImgPipeline", Family::Flux),
];

/// Families (or variants of supported ones: ControlNet, Fill, Kontext, …) that are recognised but not run yet,
/// by class-name prefix; checked after the exact classes above.
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
            Family::StableDiffusion3 => "sd3",
            Family::Flux => "flux",
        }
    }

    /// What the family's denoiser predicts, which decides the schedulers that can drive it.
    pub fn parameterization(self) -> Parameterization {
        match self {
            Family::StableDiffusion3 | Family::Flux => Parameterization::FlowMatching,
            _ => Parameterization::Diffusion,
        }
    }

    /// The folder of the denoiser graph: `unet` or `transformer`.
    pub fn denoiser_dir(self) -> &'static str {
        match self {
            Family::StableDiffusion3 | Family::Flux => "transformer",
            _ => "unet",
        }
    }

    /// The T5 sequence length the family's pipeline pads to (`max_sequence_length`: SD3 256, Flux 512).
    pub fn max_sequence_length(self) -> Option<usize> {
        match self {
            Family::StableDiffusion3 => Some(256),
            Family::Flux => Some(512),
            _ => None,
        }
    }

    /// The step count the family's diffusers pipeline uses by default, where it differs from a typical
    /// Stable Diffusion run (LCM: 4).
    pub fn default_steps(self) -> Option<u32> {
        match self {
            Family::LatentConsistency => Some(4),
            Family::StableDiffusion3 | Family::Flux => Some(28),
            Family::StableDiffusion | Family::StableDiffusionXl => None,
        }
    }

    /// The guidance scale of the family's diffusers pipeline, where it differs from Stable Diffusion's 7.5
    /// (SDXL: 5.0; LCM: 8.5, embedded into `timestep_cond` as `w = 7.5`; SD3: 7.0; Flux: 3.5, the guidance
    /// embedding's input, ignored by schnell).
    pub fn default_guidance_scale(self) -> Option<f32> {
        match self {
            Family::StableDiffusionXl => Some(5.0),
            Family::LatentConsistency => Some(8.5),
            Family::StableDiffusion3 => Some(7.0),
            Family::Flux => Some(3.5),
            Family::StableDiffusion => None,
        }
    }

    /// The text encoders the family reads, in the order the pipeline combines them. SDXL's first encoder is
    /// optional (the refiner has none): `text_encoder_present` says whether the export has it. SD3's T5 is
    /// marked optional (diffusers feeds zeros without it); the caller drops it when the export lacks it.
    pub fn text_encoders(self, text_encoder_present: bool) -> Vec<EncoderSpec> {
        let clip = |graph, tokenizer, hidden, pooled| EncoderSpec {
            graph,
            tokenizer,
            tokenizer_kind: TokenizerKind::Clip,
            hidden,
            pooled,
            optional: false,
        };
        let t5 = |graph, tokenizer, optional| EncoderSpec {
            graph,
            tokenizer,
            tokenizer_kind: TokenizerKind::T5,
            hidden: Some(HiddenLayer::Last),
            pooled: None,
            optional,
        };
        let last = Some(HiddenLayer::Last);
        let penultimate = Some(HiddenLayer::Penultimate);
        match self {
            Family::StableDiffusion | Family::LatentConsistency => vec![clip("text_encoder", "tokenizer", last, None)],
            Family::StableDiffusionXl => {
                let second = clip("text_encoder_2", "tokenizer_2", penultimate, Some("text_embeds"));
                if text_encoder_present {
                    vec![clip("text_encoder", "tokenizer", penultimate, Some("text_embeds")), second]
                } else {
                    vec![second]
                }
            }
            Family::StableDiffusion3 => vec![
                clip("text_encoder", "tokenizer", penultimate, Some("text_embeds")),
                clip("text_encoder_2", "tokenizer_2", penultimate, Some("text_embeds")),
                t5("text_encoder_3", "tokenizer_3", true),
            ],
            Family::Flux => {
                vec![
                    clip("text_encoder", "tokenizer", None, Some("pooler_output")),
                    t5("text_encoder_2", "tokenizer_2", false),
                ]
            }
        }
    }
}

/// Which tokenizer a text encoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// CLIP's byte-level BPE from `vocab.json` + `merges.txt`, 77 tokens.
    Clip,
    /// A T5 SentencePiece-Unigram tokenizer from `tokenizer.json`, padded to the family's `max_sequence_length`.
    T5,
}

/// One text encoder of a family: its folders and which of its outputs the pipeline reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSpec {
    /// Graph folder (`text_encoder_2`).
    pub graph: &'static str,
    /// Tokenizer folder (`tokenizer_2`).
    pub tokenizer: &'static str,
    /// The tokenizer's kind.
    pub tokenizer_kind: TokenizerKind,
    /// Which hidden state conditions the denoiser; `None` when only the pooled output is used (Flux's CLIP).
    pub hidden: Option<HiddenLayer>,
    /// The pooled output the pipeline reads (`text_embeds`, or Flux's `pooler_output`); with `text_embeds`
    /// the output is read only when the graph has it (SDXL's first encoder has none).
    pub pooled: Option<&'static str>,
    /// Whether the pipeline runs without it (SD3's T5: zeros instead).
    pub optional: bool,
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
        assert_eq!(Family::detect("ORTFluxPipeline"), Ok(Family::Flux));
        assert_eq!(Family::detect("StableDiffusion3InpaintPipeline"), Ok(Family::StableDiffusion3));
        assert!(Family::detect("FluxFillPipeline").unwrap_err().contains("family flux"));
        assert!(Family::detect("StableDiffusion3ControlNetPipeline").unwrap_err().contains("not supported yet"));
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
