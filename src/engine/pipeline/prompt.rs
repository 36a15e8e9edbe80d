//! Prompt encoding shared by the pipelines: each text goes through the text encoder once, and the U-Net
//! batch is assembled from those hidden states in whatever order the guidance needs.

use ndarray::{concatenate, ArrayD, Axis, IxDyn};

use crate::engine::error::EngineError;
use crate::engine::graph::Feed;
use crate::engine::model::LoadedModel;

/// Hidden states `[1, 77, D]` of each text, in order. One text-encoder call per text keeps exports with a
/// fixed batch of 1 working.
pub(super) fn encode_texts(model: &mut LoadedModel, texts: &[&str]) -> Result<Vec<ArrayD<f32>>, EngineError> {
    let max_len = model.tokenizer.max_length();
    let mut hidden = Vec::with_capacity(texts.len());
    for text in texts {
        let ids: Vec<i64> = model.tokenizer.encode_padded(text)?.into_iter().map(i64::from).collect();
        let input_ids =
            ArrayD::from_shape_vec(IxDyn(&[1, max_len]), ids).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut outputs = model.text_encoder.run(vec![("input_ids", Feed::Int(input_ids))])?;
        let h = outputs
            .remove(&model.text_output)
            .ok_or_else(|| EngineError::Inference { graph: "text_encoder", message: "no hidden states".into() })?;
        hidden.push(h);
    }
    Ok(hidden)
}

/// The U-Net's `encoder_hidden_states`: each of `groups` repeated `n` times, groups in order (for example
/// `[uncond × n, cond × n]` for classifier-free guidance).
pub(super) fn stack(groups: &[&ArrayD<f32>], n: usize) -> Result<ArrayD<f32>, EngineError> {
    let parts: Vec<_> = groups.iter().flat_map(|h| std::iter::repeat_n(h.view(), n)).collect();
    concatenate(Axis(0), &parts).map_err(|e| EngineError::Inference { graph: "text_encoder", message: e.to_string() })
}

/// Embeddings for classifier-free guidance, `[uncond × n, cond × n]`, or `[cond × n]` when `guided` is off.
pub(super) fn cfg_embeddings(
    model: &mut LoadedModel,
    prompt: &str,
    negative_prompt: &str,
    n: usize,
    guided: bool,
) -> Result<ArrayD<f32>, EngineError> {
    if guided {
        let hidden = encode_texts(model, &[negative_prompt, prompt])?;
        stack(&[&hidden[0], &hidden[1]], n)
    } else {
        let hidden = encode_texts(model, &[prompt])?;
        stack(&[&hidden[0]], n)
    }
}
