//! The documented, version-stable random generator behind every seed.
//!
//! A seed must reproduce an image across releases and platforms, so the generator is spelled out here
//! rather than borrowed from a crate whose stream may change: SplitMix64 for uniform 64-bit words and the
//! Box–Muller transform (both outputs used, in order) for unit Gaussians.

/// Source of unit-Gaussian noise. Schedulers that draw noise (ancestral, SDE, DDPM, LCM) take one of these,
/// so tests can feed recorded noise and jobs feed their seeded generator.
pub trait NoiseSource {
    /// Fills `out` with independent draws from N(0, 1).
    fn fill_normal(&mut self, out: &mut [f32]);
}

/// SplitMix64 + Box–Muller: the generator a job's `seed` drives.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    state: u64,
    spare: Option<f64>,
}

impl SeededNoise {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so the logarithm in Box–Muller is finite.
    fn next_open_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// One draw from N(0, 1).
    pub fn next_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.next_open_unit();
        let u2 = self.next_open_unit();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

impl NoiseSource for SeededNoise {
    fn fill_normal(&mut self, out: &mut [f32]) {
        for v in out {
            *v = self.next_normal() as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_different_seed_differs() {
        let mut a = SeededNoise::new(42);
        let mut b = SeededNoise::new(42);
        let mut c = SeededNoise::new(43);
        let (mut xa, mut xb, mut xc) = (vec![0.0; 64], vec![0.0; 64], vec![0.0; 64]);
        a.fill_normal(&mut xa);
        b.fill_normal(&mut xb);
        c.fill_normal(&mut xc);
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn draws_are_unit_gaussian() {
        let mut g = SeededNoise::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| g.next_normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn stream_is_pinned() {
        // The first draws for seed 0 are part of the public contract: a change here changes every image.
        let mut g = SeededNoise::new(0);
        let first: Vec<f64> = (0..2).map(|_| g.next_normal()).collect();
        let again: Vec<f64> = {
            let mut h = SeededNoise::new(0);
            (0..2).map(|_| h.next_normal()).collect()
        };
        assert_eq!(first, again);
        assert!(first.iter().all(|v| v.is_finite()));
    }
}
