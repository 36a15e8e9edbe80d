//! Prompt encoding: each text goes through every text encoder of the model once; the hidden states are
//! concatenated on the feature axis (SDXL: `[1, 77, 768 + 1280]`) and the pooled projection comes from the
//! last encoder that has one (SDXL's `text_encoder_2`).

use ndarray::{concatenate, ArrayD, Axis};

use crate::engine::error::EngineError;
use crate::engine::model::LoadedModel;

/// One text as the U-Net sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptEmbedding {
    /// `encoder_hidden_states` of one text, `[1, 77, D]`.
    pub hidden: ArrayD<f32>,
    /// Pooled text embedding `[1, P]` (SDXL's `text_embeds`), when the model has a pooled output.
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

/// Encodes `text` through every text encoder of `model`.
pub fn encode_prompt(model: &mut LoadedModel, text: &str) -> Result<PromptEmbedding, EngineError> {
    let fail = |message: String| EngineError::Inference { graph: "text_encoder", message };
    let mut hidden = Vec::with_capacity(model.text_encoders.len());
    let mut pooled = None;
    for encoder in &mut model.text_encoders {
        let encoded = encoder.encode(text)?;
        hidden.push(encoded.hidden);
        pooled = encoded.pooled.or(pooled);
    }
    let hidden = match hidden.len() {
        0 => return Err(fail("the model has no text encoder".into())),
        1 => hidden.remove(0),
        _ => {
            let views: Vec<_> = hidden.iter().map(|h| h.view()).collect();
            concatenate(Axis(hidden[0].ndim() - 1), &views).map_err(|e| fail(e.to_string()))?
        }
    };
    Ok(PromptEmbedding { hidden, pooled })
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
