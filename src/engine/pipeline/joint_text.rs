//! How each family joins its text encoders' outputs into one [`PromptEmbedding`]:
//!
//! * SD 1.x/2.x, LCM, SDXL: hidden states concatenated on the feature axis (SDXL `[1, 77, 768 + 1280]`), the
//!   pooled embedding from the last encoder that has one;
//! * SD3: CLIP-L ‖ CLIP-G penultimate states (features), zero-padded to T5's width, then joined with T5's
//!   states on the sequence axis (`[1, 77 + 256, 4096]`); zeros `[1, max_sequence_length,
//!   joint_attention_dim]` stand in for a missing T5. Pooled = CLIP-L ‖ CLIP-G `text_embeds`;
//! * Flux: T5's states, and CLIP's `pooler_output` as the pooled embedding.

use ndarray::{concatenate, ArrayD, Axis, IxDyn};

use super::prompt::PromptEmbedding;
use crate::engine::error::EngineError;
use crate::engine::family::{EncoderSpec, Family, TokenizerKind};
use crate::engine::model::ModelInfo;
use crate::engine::text_encoder::EncodedText;

fn fail(message: impl Into<String>) -> EngineError {
    EngineError::Inference { graph: "text_encoder", message: message.into() }
}

/// Joins the outputs of `info`'s encoders (in `info.text_encoders` order) as the family's pipeline does.
pub fn join(info: &ModelInfo, outputs: Vec<EncodedText>) -> Result<PromptEmbedding, EngineError> {
    let parts: Vec<(&EncoderSpec, EncodedText)> = info.text_encoders.iter().zip(outputs).collect();
    match info.family() {
        Family::StableDiffusion3 => sd3(info, parts),
        Family::Flux => flux(parts),
        Family::StableDiffusion | Family::StableDiffusionXl | Family::LatentConsistency => concatenated(parts),
    }
}

/// `parts` joined along `axis` (negative: from the end).
fn cat(parts: &[&ArrayD<f32>], axis: isize) -> Result<ArrayD<f32>, EngineError> {
    let first = parts.first().ok_or_else(|| fail("the model has no text encoder"))?;
    let axis = if axis < 0 { first.ndim() as isize + axis } else { axis } as usize;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    concatenate(Axis(axis), &views).map_err(|e| fail(e.to_string()))
}

fn concatenated(parts: Vec<(&EncoderSpec, EncodedText)>) -> Result<PromptEmbedding, EngineError> {
    let hidden: Vec<&ArrayD<f32>> = parts.iter().filter_map(|(_, e)| e.hidden.as_ref()).collect();
    let pooled = parts.iter().rev().find_map(|(_, e)| e.pooled.clone());
    Ok(PromptEmbedding { hidden: cat(&hidden, -1)?, pooled })
}

fn sd3(info: &ModelInfo, parts: Vec<(&EncoderSpec, EncodedText)>) -> Result<PromptEmbedding, EngineError> {
    let (clips, t5): (Vec<_>, Vec<_>) = parts.iter().partition(|(spec, _)| spec.tokenizer_kind == TokenizerKind::Clip);
    let clip_hidden: Vec<&ArrayD<f32>> = clips.iter().filter_map(|(_, e)| e.hidden.as_ref()).collect();
    let clip_pooled: Vec<&ArrayD<f32>> = clips.iter().filter_map(|(_, e)| e.pooled.as_ref()).collect();
    if clip_hidden.len() != 2 || clip_pooled.len() != 2 {
        return Err(fail("SD3 needs the hidden states and `text_embeds` of both CLIP encoders"));
    }
    let clip = cat(&clip_hidden, -1)?;
    let t5 = match t5.first().and_then(|(_, e)| e.hidden.clone()) {
        Some(states) => states,
        None => {
            let width = info.joint_attention_dim.ok_or_else(|| fail("no T5 encoder and no joint_attention_dim"))?;
            ArrayD::zeros(IxDyn(&[1, info.max_sequence_length.unwrap_or(256), width]))
        }
    };
    let (t5_width, clip_width) = (t5.shape()[t5.ndim() - 1], clip.shape()[clip.ndim() - 1]);
    if t5_width < clip_width {
        return Err(fail(format!("T5 states are {t5_width} wide, narrower than the CLIP states ({clip_width})")));
    }
    let mut padding_shape = clip.shape().to_vec();
    padding_shape[clip.ndim() - 1] = t5_width - clip_width;
    let padded = cat(&[&clip, &ArrayD::zeros(IxDyn(&padding_shape))], -1)?;
    Ok(PromptEmbedding { hidden: cat(&[&padded, &t5], -2)?, pooled: Some(cat(&clip_pooled, -1)?) })
}

fn flux(parts: Vec<(&EncoderSpec, EncodedText)>) -> Result<PromptEmbedding, EngineError> {
    let pooled =
        parts.iter().find_map(|(_, e)| e.pooled.clone()).ok_or_else(|| fail("Flux needs CLIP's pooled output"))?;
    let hidden = parts
        .into_iter()
        .find(|(spec, _)| spec.tokenizer_kind == TokenizerKind::T5)
        .and_then(|(_, e)| e.hidden)
        .ok_or_else(|| fail("Flux needs T5's hidden states"))?;
    Ok(PromptEmbedding { hidden, pooled: Some(pooled) })
}
