//! T5's SentencePiece-Unigram tokenizer (SD3's `tokenizer_3`, Flux's `tokenizer_2`), read from the
//! `tokenizer.json` that `T5TokenizerFast` saves: normalizer, Metaspace pre-tokenizer (the leading `▁`) and
//! Unigram model all come from the file, so the ids are the fast tokenizer's.
//!
//! The pipelines call it with `padding="max_length", max_length=L, truncation=True`: the content is cut to
//! `L - 1` ids, `</s>` is appended and the rest is padded with `<pad>`; no attention mask reaches the graph.

use std::path::Path;

use tokenizers::Tokenizer;

use super::error::EngineError;
use super::tokenizer::TokenizerSettings;

/// A T5 tokenizer producing fixed-length id sequences.
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
    model_max_length: usize,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("model_max_length", &self.model_max_length)
            .finish()
    }
}

impl T5Tokenizer {
    /// Reads `dir/tokenizer.json`; the end and padding tokens come from `special_tokens_map.json` or
    /// `tokenizer_config.json` (defaults `</s>` and `<pad>`).
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Tokenizer(format!("{}: {m}", dir.display()));
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(err(format!("missing {}", file.display())));
        }
        let inner = Tokenizer::from_file(&file).map_err(|e| err(e.to_string()))?;
        let settings = TokenizerSettings::read(dir);
        let token = |key: &str, default: &str| settings.token(key, default);
        let id = |t: String| inner.token_to_id(&t).ok_or_else(|| err(format!("token `{t}` is not in tokenizer.json")));
        let eos = id(token("eos_token", "</s>"))?;
        let pad = id(token("pad_token", "<pad>"))?;
        let model_max_length = settings.model_max_length(1_000_000).unwrap_or(512);
        Ok(Self { inner, eos, pad, model_max_length })
    }

    /// `model_max_length` of the tokenizer config (512 for T5 v1.1).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// Ids without `</s>` or padding, untruncated.
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The content cut to `length - 1` ids, `</s>`, then `<pad>` up to `length` (`length` ≥ 1).
    pub fn encode_padded(&self, text: &str, length: usize) -> Result<Vec<u32>, EngineError> {
        let length = length.max(1);
        let mut ids = self.content_ids(text)?;
        ids.truncate(length - 1);
        ids.push(self.eos);
        ids.resize(length, self.pad);
        Ok(ids)
    }
}
