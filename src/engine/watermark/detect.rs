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
//! `s²` is estimated from the plane's other independent coefficients (outside the rings, DC and the
//! self-conjugate Nyquist ones excluded): `Σ |y|² / 2Q` over those `Q` pairs. The paper estimates it from the
//! ring coefficients themselves, which makes `η` nearly constant under the null (its `Σ |y|²` part is then
//! `2P` by construction) and piles p-values around the middle: at 5 % it flagged 0.5 % of clean noise. An
//! inverted picture has more energy at low frequencies than at high ones, so this estimate errs toward
//! larger `η` and larger p-values on clean pictures: toward fewer false positives.

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
        let (mut residual, mut key_energy, mut pairs) = (0.0, 0.0, 0usize);
        let (mut outside_energy, mut outside_pairs) = (0.0, 0usize);
        for ky in 0..height {
            for kx in 0..width {
                let y = spectrum[ky * width + kx];
                let Some(ring) = ring_of(ky, kx, height, width, radius) else {
                    if is_representative(ky, kx, height, width) {
                        outside_energy += y.norm_sqr();
                        outside_pairs += 1;
                    }
                    continue;
                };
                let target = key.ring_value(ring, height, width);
                let difference = y - target;
                l1 += difference.norm();
                count += 1;
                if is_representative(ky, kx, height, width) {
                    residual += difference.norm_sqr();
                    key_energy += target * target;
                    pairs += 1;
                }
            }
        }
        let variance = (outside_energy / (2 * outside_pairs.max(1)) as f64).max(f64::MIN_POSITIVE);
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

    const SPEC: WatermarkSpec = WatermarkSpec { radius: 4, channel: 3 };

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

    #[test]
    fn clean_noise_gives_about_uniform_p_values() {
        let key = RingKey::derive(b"tenant-a", SPEC);
        let p: Vec<f64> = (0..400).map(|seed| score(&noise(1000 + seed), &key).unwrap()[0].p_value).collect();
        let below = |t: f64| p.iter().filter(|&&v| v < t).count() as f64 / p.len() as f64;
        assert!((0.0..=0.03).contains(&below(0.01)), "P(p < 0.01) = {}", below(0.01));
        assert!((0.02..=0.09).contains(&below(0.05)), "P(p < 0.05) = {}", below(0.05));
        assert!((0.42..=0.58).contains(&below(0.5)), "P(p < 0.5) = {}", below(0.5));
        assert!((0.85..=0.95).contains(&below(0.9)), "P(p < 0.9) = {}", below(0.9));
    }
}
