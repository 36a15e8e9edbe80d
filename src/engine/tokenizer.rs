//! CLIP's byte-level BPE tokenizer, built with the `tokenizers` crate from the `vocab.json` + `merges.txt`
//! that optimum exports (many exports carry no `tokenizer.json`).
//!
//! The pipeline is the one Hugging Face's fast CLIP tokenizer uses: NFC, whitespace collapsed, lower-cased;
//! split on CLIP's regex (contractions, letter runs, single digits, punctuation runs); byte-level mapping;
//! BPE with a `</w>` end-of-word suffix; `<|startoftext|>` … `<|endoftext|>`; truncated to
//! `model_max_length` and padded with the export's padding token.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::EngineError;

/// CLIP's pre-tokenization pattern: special tokens, English contractions, letter runs, single digits and
/// runs of other non-space characters.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP tokenizer producing fixed-length id sequences for a text encoder.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl ClipTokenizer {
    /// Builds the tokenizer from an optimum `tokenizer/` folder.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let err = |m: String| EngineError::Tokenizer(format!("{}: {m}", dir.display()));
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                return Err(err(format!("missing {}", file.display())));
            }
        }
        let config = read_json(&dir.join("tokenizer_config.json"));
        let special = read_json(&dir.join("special_tokens_map.json"));
        let token = |key: &str, default: &str| -> String {
            token_content(special.get(key))
                .or_else(|| token_content(config.get(key)))
                .unwrap_or_else(|| default.to_string())
        };
        let bos_token = token("bos_token", "<|startoftext|>");
        let eos_token = token("eos_token", "<|endoftext|>");
        let pad_token = token("pad_token", &eos_token);
        let unk_token = token("unk_token", &eos_token);
        let max_length = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|v| *v >= 2.0 && *v <= 4096.0)
            .map_or(77, |v| v as usize);

        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk_token)
            .build()
            .map_err(|e| err(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(
                Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")
                    .map_err(|e| err(e.to_string()))?,
            ),
            NormalizerWrapper::Lowercase(Lowercase),
        ]);
        inner.with_normalizer(Some(normalizer)).map_err(|e| err(e.to_string()))?;
        let split = Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true)
            .map_err(|e| err(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])));
        inner
            .add_special_tokens([AddedToken::from(bos_token.clone(), true), AddedToken::from(eos_token.clone(), true)])
            .map_err(|e| err(e.to_string()))?;

        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| err(format!("token `{t}` is not in vocab.json")));
        let (bos, eos, pad) = (id(&bos_token)?, id(&eos_token)?, id(&pad_token)?);
        Ok(Self { inner, bos, eos, pad, max_length })
    }

    /// Sequence length the text encoder expects (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Ids without start/end tokens or padding, untruncated (for prompt-length checks).
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let encoding = self.inner.encode(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `<|startoftext|>` ids `<|endoftext|>`, truncated to `max_length` and padded with the padding token.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let content = self.content_ids(text)?;
        let keep = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(Value::Null)
}

/// Special tokens appear either as plain strings or as `{"content": "…", …}` objects.
fn token_content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}
