//! One text encoder with its tokenizer (CLIP or T5): which of its outputs the family reads, and encoding a
//! text (through a bounded cache of its outputs, [`super::text_cache`], so repeated texts skip the graph).

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use super::error::EngineError;
use super::family::{EncoderSpec, HiddenLayer, TokenizerKind};
use super::graph::{Element, Feed, Graph};
use super::runtime::SessionFactory;
use super::t5_tokenizer::T5Tokenizer;
use super::text_cache::{TextCache, TextCacheLimits};
use super::tokenizer::ClipTokenizer;

/// The tokenizer of one text encoder.
#[derive(Debug)]
pub enum TextTokenizer {
    /// CLIP, padded to its `model_max_length` (77).
    Clip(ClipTokenizer),
    /// T5, padded to `length` (the family's `max_sequence_length`, capped by the tokenizer's own maximum).
    T5 {
        /// The tokenizer.
        tokenizer: T5Tokenizer,
        /// The padded sequence length.
        length: usize,
    },
}

impl TextTokenizer {
    /// The padded id sequence of `text`.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        match self {
            TextTokenizer::Clip(clip) => clip.encode_padded(text),
            TextTokenizer::T5 { tokenizer, length } => tokenizer.encode_padded(text, *length),
        }
    }
}

/// A text encoder graph, its tokenizer and the names of the outputs the pipeline uses.
#[derive(Debug)]
pub struct TextEncoder {
    /// The tokenizer of this encoder (SDXL's second one pads with `!`).
    pub tokenizer: TextTokenizer,
    /// The graph (`input_ids` in).
    pub graph: Graph,
    /// The output that conditions the denoiser (`last_hidden_state` or `hidden_states.{L-1}`), when used.
    pub hidden_output: Option<String>,
    /// The pooled output (`text_embeds` or `pooler_output`), when the family reads one and the graph has it.
    pub pooled_output: Option<String>,
    /// Outputs of texts encoded before, by token ids.
    cache: TextCache,
    /// Times the graph ran (texts not found in the cache).
    graph_runs: u64,
}

/// One text through one encoder.
#[derive(Debug, Clone)]
pub struct EncodedText {
    /// Hidden states `[1, seq, D]`, when the family reads them from this encoder.
    pub hidden: Option<ArrayD<f32>>,
    /// Pooled projection `[1, P]`, when the encoder has one.
    pub pooled: Option<ArrayD<f32>>,
}

impl TextEncoder {
    /// Opens `dir/<graph>/model.onnx` and `dir/<tokenizer>/` as `spec` says; T5 pads to `sequence_length`.
    pub fn load(
        factory: &SessionFactory,
        dir: &Path,
        spec: &EncoderSpec,
        sequence_length: Option<usize>,
    ) -> Result<Self, EngineError> {
        let path = dir.join(spec.graph).join("model.onnx");
        let tokenizer_dir = dir.join(spec.tokenizer);
        let tokenizer = match spec.tokenizer_kind {
            TokenizerKind::Clip => TextTokenizer::Clip(ClipTokenizer::from_dir(&tokenizer_dir)?),
            TokenizerKind::T5 => {
                let tokenizer = T5Tokenizer::from_dir(&tokenizer_dir)?;
                let length = sequence_length.unwrap_or(tokenizer.model_max_length()).min(tokenizer.model_max_length());
                TextTokenizer::T5 { tokenizer, length }
            }
        };
        let graph = Graph::open(factory, &path, spec.graph)?;
        let bad = |message: String| EngineError::Model { path: path.clone(), message };
        let ids = graph.input("input_ids").ok_or_else(|| bad("missing input `input_ids`".into()))?;
        if !matches!(ids.element, Element::I64 | Element::I32 | Element::F32) {
            return Err(bad(format!("input `input_ids` has an unsupported element type {:?}", ids.element)));
        }
        let hidden_output = spec.hidden.map(|layer| hidden_output(&graph, layer)).transpose().map_err(bad)?;
        let pooled_output = spec.pooled.and_then(|name| graph.output(name)).map(|o| o.name.clone());
        let cache = TextCache::new(TextCacheLimits::DEFAULT);
        Ok(Self { tokenizer, graph, hidden_output, pooled_output, cache, graph_runs: 0 })
    }

    /// Replaces the output cache with an empty one within `limits` ([`TextCacheLimits::OFF`] turns it off).
    pub fn set_cache_limits(&mut self, limits: TextCacheLimits) {
        self.cache = TextCache::new(limits);
    }

    /// How many times the graph has run: texts whose token ids were not in the cache. Lets tests and
    /// benchmarks see the cache at work.
    pub fn graph_runs(&self) -> u64 {
        self.graph_runs
    }

    /// Tokenizes `text` (padded to the tokenizer's length) and returns the graph's outputs for those token
    /// ids: from the cache when they were encoded before, else by running the graph (and caching the result).
    pub fn encode(&mut self, text: &str) -> Result<EncodedText, EngineError> {
        let ids = self.tokenizer.encode_padded(text)?;
        if let Some(cached) = self.cache.get(&ids) {
            return Ok(cached);
        }
        let encoded = self.run_graph(&ids)?;
        self.cache.insert(ids, encoded.clone());
        Ok(encoded)
    }

    fn run_graph(&mut self, ids: &[u32]) -> Result<EncodedText, EngineError> {
        self.graph_runs += 1;
        let ids: Vec<i64> = ids.iter().copied().map(i64::from).collect();
        let len = ids.len();
        let input_ids =
            ArrayD::from_shape_vec(IxDyn(&[1, len]), ids).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut outputs = self.graph.run(vec![("input_ids", Feed::Int(input_ids))])?;
        let graph = self.graph.name();
        let mut take = |name: &Option<String>| -> Result<Option<ArrayD<f32>>, EngineError> {
            match name {
                Some(name) => outputs
                    .remove(name)
                    .map(Some)
                    .ok_or_else(|| EngineError::Inference { graph, message: format!("no output `{name}`") }),
                None => Ok(None),
            }
        };
        let hidden = take(&self.hidden_output)?;
        let pooled = take(&self.pooled_output)?;
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
