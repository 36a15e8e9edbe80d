//! Per-image noise for a batch: image `i` of a job with seed `s` draws from its own generator seeded
//! `s + i`, so every image can be reproduced on its own, whatever batch it ran in.

use crate::engine::rng::{NoiseSource, SeededNoise};

/// One seeded generator per image of a batch; a batch-shaped fill is split into equal per-image chunks.
#[derive(Debug, Clone)]
pub struct BatchNoise {
    generators: Vec<SeededNoise>,
}

impl BatchNoise {
    /// Generators for `seeds`, one per image, in batch order.
    pub fn new(seeds: &[u64]) -> Self {
        Self { generators: seeds.iter().map(|s| SeededNoise::new(*s)).collect() }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.generators.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }
}

impl NoiseSource for BatchNoise {
    fn fill_normal(&mut self, out: &mut [f32]) {
        let n = self.generators.len().max(1);
        let chunk = out.len() / n;
        if chunk == 0 || out.len() % n != 0 {
            // Not batch-shaped: draw everything from the first image's generator.
            if let Some(g) = self.generators.first_mut() {
                g.fill_normal(out);
            }
            return;
        }
        for (g, part) in self.generators.iter_mut().zip(out.chunks_mut(chunk)) {
            g.fill_normal(part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_draws_the_same_noise_alone_or_in_a_batch() {
        let mut batch = BatchNoise::new(&[10, 11]);
        let mut alone = BatchNoise::new(&[11]);
        let mut b = vec![0.0; 8];
        let mut a = vec![0.0; 4];
        batch.fill_normal(&mut b);
        alone.fill_normal(&mut a);
        assert_eq!(&b[4..], &a[..]);
        assert_ne!(&b[..4], &b[4..]);
    }
}
