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
        let settings = TokenizerSettings::read(dir);
        let token = |key: &str, default: &str| settings.token(key, default);
        let bos_token = token("bos_token", "<|startoftext|>");
        let eos_token = token("eos_token", "<|endoftext|>");
        let pad_token = token("pad_token", &eos_token);
        let unk_token = token("unk_token", &eos_token);
        let max_length = settings.model_max_length(4096).unwrap_or(77);

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

/// A tokenizer folder's settings as transformers saves them (`tokenizer_config.json` and
/// `special_tokens_map.json`), read the same way by the CLIP and the T5 tokenizer. Missing or unreadable
/// files count as empty: every setting has a default.
pub(crate) struct TokenizerSettings {
    config: Value,
    special: Value,
}

impl TokenizerSettings {
    /// Reads `dir`'s settings files.
    pub(crate) fn read(dir: &Path) -> Self {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or(Value::Null)
        };
        Self { config: read("tokenizer_config.json"), special: read("special_tokens_map.json") }
    }

    /// A special token's text (`eos_token`, …): the special-tokens map first, then the config, else
    /// `default`. Tokens appear as plain strings or as `{"content": "…", …}` objects.
    pub(crate) fn token(&self, key: &str, default: &str) -> String {
        let content = |value: Option<&Value>| match value? {
            Value::String(s) => Some(s.clone()),
            Value::Object(map) => map.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        content(self.special.get(key)).or_else(|| content(self.config.get(key))).unwrap_or_else(|| default.into())
    }

    /// `model_max_length`, when the config gives a sane one (at least 2, at most `cap`; transformers writes a
    /// huge sentinel when there is none).
    pub(crate) fn model_max_length(&self, cap: usize) -> Option<usize> {
        let value = self.config.get("model_max_length").and_then(Value::as_f64)?;
        (value >= 2.0 && value <= cap as f64).then_some(value as usize)
    }
}
