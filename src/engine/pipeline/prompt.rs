//! Prompt encoding: each text goes through every text encoder of the model once, and the outputs are joined
//! as the family's pipeline joins them ([`super::joint_text`]).

use ndarray::ArrayD;

use crate::engine::error::EngineError;
use crate::engine::model::LoadedModel;

/// One text as the U-Net sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEmbedding {
    /// `encoder_hidden_states` of one text, `[1, seq, D]` (77 for CLIP, 333 for SD3, 512 for Flux).
    pub hidden: ArrayD<f32>,
    /// Pooled text embedding `[1, P]` (SDXL's `text_embeds`, SD3's/Flux's `pooled_projections`), when the model
    /// has a pooled output.
    pub pooled: Option<ArrayD<f32>>,
}

impl PromptEmbedding {
    /// Zeros of the same shapes (SDXL's `force_zeros_for_empty_prompt`).
    fn zeros_like(&self) -> Self {
        Self {
            hidden: ArrayD::zeros(self.hidden.raw_dim()),
            pooled: self.pooled.as_ref().map(|p| ArrayD::zeros(p.raw_dim())),
        }
    }
}

/// The prompt and, when the run has a negative branch, the negative prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    /// What to draw.
    pub positive: PromptEmbedding,
    /// What to steer away from; `None` when no U-Net branch uses it.
    pub negative: Option<PromptEmbedding>,
}

/// Encodes `text` through every text encoder of `model` and joins the outputs as the family does
/// ([`super::joint_text`]).
pub fn encode_prompt(model: &mut LoadedModel, text: &str) -> Result<PromptEmbedding, EngineError> {
    let outputs = model.text_encoders.iter_mut().map(|encoder| encoder.encode(text)).collect::<Result<Vec<_>, _>>()?;
    super::joint_text::join(&model.info, outputs)
}

/// Encodes the prompt and, when `negative_branch`, the negative prompt as diffusers does: a negative prompt
/// of `None` gives zeros when the model sets `force_zeros_for_empty_prompt` (SDXL base), and is encoded as
/// `""` otherwise; any given text, `""` included, is encoded.
pub fn encode_prompts(
    model: &mut LoadedModel,
    prompt: &str,
    negative: Option<&str>,
    negative_branch: bool,
) -> Result<Prompts, EngineError> {
    let positive = encode_prompt(model, prompt)?;
    let negative = if !negative_branch {
        None
    } else if negative.is_none() && model.info.traits.force_zeros_for_empty_prompt {
        Some(positive.zeros_like())
    } else {
        Some(encode_prompt(model, negative.unwrap_or(""))?)
    };
    Ok(Prompts { positive, negative })
}
