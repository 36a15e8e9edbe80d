//! A bounded cache of one text encoder's outputs, keyed by the padded token ids it was given.
//!
//! Serving traffic repeats itself: the empty negative prompt is encoded for nearly every guided job, and
//! clients resubmit the same prompt with new seeds. A text encoder is a pure function of its token ids, so
//! its outputs can be reused bit for bit. The cache belongs to one encoder of one loaded model (one worker's
//! sessions), so its key needs no model name: a worker never mixes another model's or another device's
//! embeddings into its jobs. It is bounded both in entries and in bytes (a Flux T5 state is 8 MiB, a CLIP
//! state 0.2 MiB) and evicts the least recently used entry first.

use std::collections::HashMap;

use super::text_encoder::EncodedText;

/// How much one encoder's cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextCacheLimits {
    /// Most texts kept.
    pub entries: usize,
    /// Most bytes of embeddings kept (float32 hidden and pooled states).
    pub bytes: usize,
}

impl TextCacheLimits {
    /// What every encoder gets unless told otherwise: 256 texts and 32 MiB (about 140 SD 1.x prompts, 4 Flux
    /// T5 states).
    pub const DEFAULT: Self = Self { entries: 256, bytes: 32 << 20 };

    /// A cache that keeps nothing.
    pub const OFF: Self = Self { entries: 0, bytes: 0 };
}

impl Default for TextCacheLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

struct Entry {
    value: EncodedText,
    bytes: usize,
    last_used: u64,
}

/// Least-recently-used map from token ids to an encoder's outputs, within [`TextCacheLimits`].
pub struct TextCache {
    limits: TextCacheLimits,
    entries: HashMap<Vec<u32>, Entry>,
    bytes: usize,
    clock: u64,
}

impl std::fmt::Debug for TextCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCache")
            .field("limits", &self.limits)
            .field("entries", &self.entries.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl TextCache {
    /// An empty cache within `limits`.
    pub fn new(limits: TextCacheLimits) -> Self {
        Self { limits, entries: HashMap::new(), bytes: 0, clock: 0 }
    }

    /// The outputs recorded for `ids`, marking them as just used.
    pub fn get(&mut self, ids: &[u32]) -> Option<EncodedText> {
        self.clock += 1;
        let entry = self.entries.get_mut(ids)?;
        entry.last_used = self.clock;
        Some(entry.value.clone())
    }

    /// Records `value` as the outputs for `ids`, evicting the least recently used entries until both limits
    /// hold. A value larger than the byte limit on its own is not kept.
    pub fn insert(&mut self, ids: Vec<u32>, value: EncodedText) {
        let bytes = size_of_value(&value) + ids.len() * std::mem::size_of::<u32>();
        if self.limits.entries == 0 || bytes > self.limits.bytes {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.entries.remove(&ids) {
            self.bytes -= old.bytes;
        }
        while self.entries.len() >= self.limits.entries || self.bytes + bytes > self.limits.bytes {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some(evicted) = self.entries.remove(&oldest) {
                self.bytes -= evicted.bytes;
            }
        }
        self.bytes += bytes;
        self.entries.insert(ids, Entry { value, bytes, last_used: self.clock });
    }

    /// Texts kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes kept now (embeddings and keys).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

fn size_of_value(value: &EncodedText) -> usize {
    let floats = value.hidden.as_ref().map_or(0, |a| a.len()) + value.pooled.as_ref().map_or(0, |a| a.len());
    floats * std::mem::size_of::<f32>()
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;

    fn value(fill: f32, floats: usize) -> EncodedText {
        EncodedText { hidden: Some(ArrayD::from_elem(IxDyn(&[1, floats]), fill)), pooled: None }
    }

    #[test]
    fn a_hit_returns_the_same_values() {
        let mut cache = TextCache::new(TextCacheLimits::DEFAULT);
        assert!(cache.get(&[1, 2, 3]).is_none());
        cache.insert(vec![1, 2, 3], value(0.5, 4));
        let hit = cache.get(&[1, 2, 3]).unwrap();
        assert_eq!(hit.hidden.unwrap(), ArrayD::from_elem(IxDyn(&[1, 4]), 0.5));
        assert!(cache.get(&[1, 2, 4]).is_none());
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut cache = TextCache::new(TextCacheLimits { entries: 2, bytes: usize::MAX });
        cache.insert(vec![1], value(1.0, 1));
        cache.insert(vec![2], value(2.0, 1));
        cache.get(&[1]);
        cache.insert(vec![3], value(3.0, 1));
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[2]).is_none(), "2 was the least recently used");
        assert!(cache.get(&[1]).is_some() && cache.get(&[3]).is_some());
    }

    #[test]
    fn bytes_are_bounded() {
        // Each entry: 100 floats (400 bytes) plus a 1-id key (4 bytes).
        let mut cache = TextCache::new(TextCacheLimits { entries: 100, bytes: 1000 });
        for id in 0..10 {
            cache.insert(vec![id], value(id as f32, 100));
            assert!(cache.bytes() <= 1000, "{} bytes", cache.bytes());
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[9]).is_some() && cache.get(&[8]).is_some());
        cache.insert(vec![99], value(0.0, 1000));
        assert!(cache.get(&[99]).is_none(), "a value over the whole budget is not kept");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn replacing_a_key_keeps_the_count_right() {
        let mut cache = TextCache::new(TextCacheLimits { entries: 4, bytes: usize::MAX });
        cache.insert(vec![1], value(1.0, 10));
        cache.insert(vec![1], value(2.0, 10));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.bytes(), 44);
        assert_eq!(cache.get(&[1]).unwrap().hidden.unwrap()[[0, 0]], 2.0);
    }

    #[test]
    fn off_keeps_nothing() {
        let mut cache = TextCache::new(TextCacheLimits::OFF);
        cache.insert(vec![1], value(1.0, 1));
        assert!(cache.is_empty());
    }
}
