//! Scoring inverted latents against a key, as the paper does: a distance (mean L1 between the key and the
//! ring coefficients) and a p-value (the paper's test).
//!
//! The test: under the null hypothesis (no watermark, or another key), the ring coefficients `y` of the
//! inverted noise are complex Gaussian with independent real and imaginary parts of variance `s²`. Then
//! `η = Σ |κ − y|² / s²` over the independent coefficients (one of each conjugate pair `f, −f`; a real
//! plane's other half repeats them) follows a noncentral chi-square with `2P` degrees of freedom and
//! noncentrality `λ = Σ κ² / s²`, where `P` is the number of pairs and `κ` the key's values. A watermarked
//! picture inverts close to its key, so `η` is small and `p = F(η; 2P, λ)` tiny; another picture's `η`
//! falls anywhere in the distribution and its p-value is about uniform on [0, 1].
//!
//! `s²` is estimated as the paper does, from the same coefficients: `Σ |y|² / 2P`. That fits the test to the
//! scale the inversion comes back at, and makes it conservative:
//! `Σ |y|² / s²` is then `2P` exactly instead of a chi-square draw, so `η` spreads less than the distribution
//! says and p-values of unrelated noise gather around the middle instead of being uniform (measured on white
//! noise: 0.5 % below 0.05, none below 0.01). A verdict at `p < 0.01` so flags fewer than 1 % of unrelated
//! pictures, as long as their inverted noise is isotropic in the rings. Estimating `s²` from the rest of the
//! plane instead would make white noise uniform, but an inversion that collapses toward small values (as the
//! default model's do) then matches every key with small ring values: a p-value of 7e-6 for a wrong key was
//! measured that way.

use ndarray::{ArrayD, Axis};

use super::fourier::forward;
use super::pattern::{is_representative, ring_of, RingKey};
use super::stats::noncentral_chi_square_cdf;
use super::WatermarkError;

/// How close one image's inverted noise is to a key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Mean `|y − κ|` over every ring coefficient, divided by `sqrt(h·w)` (the scale of a white-noise
    /// coefficient) so it reads the same on every latent size. Around 1.4 for unrelated noise; near 0 for
    /// a perfect inversion of a watermarked picture.
    pub distance: f64,
    /// The probability of a statistic this small without the watermark.
    pub p_value: f64,
    /// `η`.
    pub statistic: f64,
    /// Degrees of freedom, `2P`.
    pub degrees_of_freedom: u32,
    /// `λ`.
    pub noncentrality: f64,
}

/// Scores every image of inverted latents `[n, C, h, w]` against `key`.
pub fn score(latents: &ArrayD<f32>, key: &RingKey) -> Result<Vec<Score>, WatermarkError> {
    let (channel, height, width) = key.check(latents.shape())?;
    let radius = key.spec().radius;
    let scale = ((height * width) as f64).sqrt();
    let mut scores = Vec::with_capacity(latents.shape()[0]);
    for image in latents.axis_iter(Axis(0)) {
        let plane: Vec<f32> = image.index_axis(Axis(0), channel).iter().copied().collect();
        let spectrum = forward(&plane, height, width);
        let (mut l1, mut count) = (0.0, 0usize);
        let (mut residual, mut energy, mut key_energy, mut pairs) = (0.0, 0.0, 0.0, 0usize);
        for ky in 0..height {
            for kx in 0..width {
                let Some(ring) = ring_of(ky, kx, height, width, radius) else { continue };
                let y = spectrum[ky * width + kx];
                let target = key.ring_value(ring, height, width);
                let difference = y - target;
                l1 += difference.norm();
                count += 1;
                if is_representative(ky, kx, height, width) {
                    residual += difference.norm_sqr();
                    energy += y.norm_sqr();
                    key_energy += target * target;
                    pairs += 1;
                }
            }
        }
        let variance = (energy / (2 * pairs.max(1)) as f64).max(f64::MIN_POSITIVE);
        let (statistic, noncentrality) = (residual / variance, key_energy / variance);
        let degrees_of_freedom = 2 * pairs as u32;
        scores.push(Score {
            distance: l1 / count as f64 / scale,
            p_value: noncentral_chi_square_cdf(statistic, f64::from(degrees_of_freedom), noncentrality),
            statistic,
            degrees_of_freedom,
            noncentrality,
        });
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::super::inject::inject;
    use super::super::pattern::WatermarkSpec;
    use super::*;
    use crate::engine::rng::{NoiseSource, SeededNoise};

    const SPEC: WatermarkSpec = WatermarkSpec { radius: 4, channel: 3, strength: 1.0 };

    fn noise(seed: u64) -> ArrayD<f32> {
        let mut values = vec![0f32; 4 * 16 * 16];
        SeededNoise::new(seed).fill_normal(&mut values);
        ArrayD::from_shape_vec(IxDyn(&[1, 4, 16, 16]), values).unwrap()
    }

    #[test]
    fn watermarked_noise_scores_a_tiny_p_value_for_its_key_only() {
        let key = RingKey::derive(b"tenant-a", SPEC);
        let other = RingKey::derive(b"tenant-b", SPEC);
        let mut marked = noise(42);
        inject(&mut marked, &key).unwrap();
        let own = score(&marked, &key).unwrap()[0];
        assert!(own.distance < 1e-4, "{own:?}");
        assert!(own.p_value < 1e-10, "{own:?}");
        assert_eq!(own.degrees_of_freedom, 48, "24 conjugate pairs in rings 1..=4");
        let theirs = score(&marked, &other).unwrap()[0];
        assert!(theirs.p_value > 1e-3 && theirs.distance > 0.5, "{theirs:?}");
        // Noise on top of the mark (an imperfect inversion) still detects.
        let mut rng = SeededNoise::new(7);
        let mut jitter = vec![0f32; marked.len()];
        rng.fill_normal(&mut jitter);
        let noisy = &marked + &ArrayD::from_shape_vec(IxDyn(marked.shape()), jitter).unwrap().mapv(|v| 0.3 * v);
        assert!(score(&noisy, &key).unwrap()[0].p_value < 1e-6);
    }

    /// The paper's test on clean noise: p-values spread over (0, 1) around the middle, and never below the
    /// threshold more often than the threshold says (conservative, not uniform: see the module's notes).
    #[test]
    fn clean_noise_never_scores_below_the_threshold_more_often_than_it_says() {
        let key = RingKey::derive(b"tenant-a", SPEC);
        let p: Vec<f64> = (0..400).map(|seed| score(&noise(1000 + seed), &key).unwrap()[0].p_value).collect();
        let below = |t: f64| p.iter().filter(|&&v| v < t).count() as f64 / p.len() as f64;
        assert!(below(0.01) <= 0.01, "P(p < 0.01) = {}", below(0.01));
        assert!(below(0.05) <= 0.05, "P(p < 0.05) = {}", below(0.05));
        assert!((0.35..=0.65).contains(&below(0.5)), "P(p < 0.5) = {}", below(0.5));
        assert!(below(0.2) > 0.02 && below(0.8) < 0.98, "spread: {} below 0.2, {} below 0.8", below(0.2), below(0.8));
        // A scaled copy of the same noise (an inversion that comes back smaller) scores the same.
        let (plain, half) = (noise(77), noise(77).mapv(|v| v * 0.5));
        let (a, b) = (score(&plain, &key).unwrap()[0], score(&half, &key).unwrap()[0]);
        assert!(b.p_value > 1e-3 && (a.p_value - b.p_value).abs() < 0.5, "{a:?} {b:?}");
    }
}
