//! One CLIP text encoder with its tokenizer: which of its outputs the family reads, and encoding a text.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use super::error::EngineError;
use super::family::HiddenLayer;
use super::graph::{Element, Feed, Graph};
use super::runtime::SessionFactory;
use super::tokenizer::ClipTokenizer;

/// A text encoder graph, its tokenizer and the names of the outputs the pipeline uses.
#[derive(Debug)]
pub struct TextEncoder {
    /// The tokenizer of this encoder (SDXL's second one pads with `!`).
    pub tokenizer: ClipTokenizer,
    /// The graph (`input_ids` in).
    pub graph: Graph,
    /// The output that conditions the U-Net (`last_hidden_state` or `hidden_states.{L-1}`).
    pub hidden_output: String,
    /// The pooled projection (`text_embeds`), when the graph has one.
    pub pooled_output: Option<String>,
}

/// One text through one encoder.
#[derive(Debug, Clone)]
pub struct EncodedText {
    /// Hidden states `[1, 77, D]`.
    pub hidden: ArrayD<f32>,
    /// Pooled projection `[1, P]`, when the encoder has one.
    pub pooled: Option<ArrayD<f32>>,
}

impl TextEncoder {
    /// Opens `dir/<graph_dir>/model.onnx` and `dir/<tokenizer_dir>/`, and picks the outputs for `layer`.
    pub fn load(
        factory: &SessionFactory,
        dir: &Path,
        (graph_dir, tokenizer_dir): (&'static str, &'static str),
        layer: HiddenLayer,
    ) -> Result<Self, EngineError> {
        let path = dir.join(graph_dir).join("model.onnx");
        let tokenizer = ClipTokenizer::from_dir(&dir.join(tokenizer_dir))?;
        let graph = Graph::open(factory, &path, graph_dir)?;
        let bad = |message: String| EngineError::Model { path: path.clone(), message };
        let ids = graph.input("input_ids").ok_or_else(|| bad("missing input `input_ids`".into()))?;
        if !matches!(ids.element, Element::I64 | Element::I32 | Element::F32) {
            return Err(bad(format!("input `input_ids` has an unsupported element type {:?}", ids.element)));
        }
        let hidden_output = hidden_output(&graph, layer).map_err(bad)?;
        let pooled_output = graph.output("text_embeds").map(|o| o.name.clone());
        Ok(Self { tokenizer, graph, hidden_output, pooled_output })
    }

    /// Tokenizes `text` (padded to the tokenizer's length) and runs the graph.
    pub fn encode(&mut self, text: &str) -> Result<EncodedText, EngineError> {
        let max_len = self.tokenizer.max_length();
        let ids: Vec<i64> = self.tokenizer.encode_padded(text)?.into_iter().map(i64::from).collect();
        let input_ids =
            ArrayD::from_shape_vec(IxDyn(&[1, max_len]), ids).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut outputs = self.graph.run(vec![("input_ids", Feed::Int(input_ids))])?;
        let graph = self.graph.name();
        let hidden = outputs
            .remove(&self.hidden_output)
            .ok_or_else(|| EngineError::Inference { graph, message: format!("no output `{}`", self.hidden_output) })?;
        let pooled = match &self.pooled_output {
            Some(name) => Some(
                outputs
                    .remove(name)
                    .ok_or_else(|| EngineError::Inference { graph, message: format!("no output `{name}`") })?,
            ),
            None => None,
        };
        Ok(EncodedText { hidden, pooled })
    }
}

/// The output for `layer`: `last_hidden_state`, or `hidden_states.{L-1}` where `L` is the highest index the
/// export has (`hidden_states.0` is the embedding layer's output, `hidden_states.L` the last layer's before
/// the final layer norm, so diffusers' `hidden_states[-2]` is `L-1`).
fn hidden_output(graph: &Graph, layer: HiddenLayer) -> Result<String, String> {
    match layer {
        HiddenLayer::Last => graph
            .output("last_hidden_state")
            .map(|o| o.name.clone())
            .or_else(|| graph.outputs().first().map(|o| o.name.clone()))
            .ok_or_else(|| "no output named last_hidden_state".to_string()),
        HiddenLayer::Penultimate => {
            let last = graph
                .outputs()
                .iter()
                .filter_map(|o| o.name.strip_prefix("hidden_states.").and_then(|i| i.parse::<usize>().ok()))
                .max()
                .filter(|&l| l >= 1)
                .ok_or("no `hidden_states.N` outputs: export the text encoder with its hidden states")?;
            Ok(format!("hidden_states.{}", last - 1))
        }
    }
}
