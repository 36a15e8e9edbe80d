//! The watermark key: from a secret, one real value per ring; and the ring geometry of a latent plane.
//!
//! Ring `i` (1 ≤ i ≤ radius) holds the Fourier coefficients whose signed frequency `(fy, fx)` lies at
//! distance `d = sqrt(fy² + fx²)` with `i − 1 < d ≤ i` (the paper's nested circular masks, innermost last).
//! The DC coefficient (`d = 0`, the channel's mean) is never touched: models trained with offset noise read
//! it as the picture's overall colour, and brightness changes move it first.
//!
//! Ring values are real, so the pattern is symmetric under `f → −f` and its inverse FFT is real: nothing is
//! lost when the noise is brought back to real numbers (a complex value's imaginary part would be). Each
//! value is `strength · v_i · sqrt(h·w)` with `v_i ~ N(0, 1)` (at strength 1, the paper's, the size of a
//! white-noise coefficient), drawn from a [`SeededNoise`] seeded with the first 8 bytes (little-endian) of
//! `SHA-256("denoised tree-ring v1\0" ‖ secret)`. The same secret always gives the same pattern.

use sha2::{Digest, Sha256};

use super::WatermarkError;
use crate::engine::rng::SeededNoise;

/// Where the pattern goes and how strong it is: the ring radius (in latent frequency units), the latent
/// channel, and a factor on the ring values.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WatermarkSpec {
    /// Outer ring radius; rings `1..=radius` are written.
    pub radius: u32,
    /// The latent channel that carries the pattern.
    pub channel: u32,
    /// Multiplies every ring value: 1 is the paper's (the size of a white-noise coefficient); more survives
    /// more of what the model and attacks do to the picture, and changes the picture more.
    pub strength: f64,
}

/// A watermark key: the spec and the ring values derived from a secret. Its `Debug` leaves the values out,
/// since they are as good as the secret for forging or stripping the mark.
#[derive(Clone, PartialEq)]
pub struct RingKey {
    spec: WatermarkSpec,
    /// `v_1..=v_radius`, unit scale.
    values: Vec<f64>,
}

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingKey").field("spec", &self.spec).field("values", &"<redacted>").finish()
    }
}

/// The domain separation prefix of the pattern's seed.
const SEED_DOMAIN: &[u8] = b"denoised tree-ring v1\0";

impl RingKey {
    /// The key of `secret` (any bytes; the server uses the key's stored secret) for `spec`.
    pub fn derive(secret: &[u8], spec: WatermarkSpec) -> Self {
        let digest = Sha256::new().chain_update(SEED_DOMAIN).chain_update(secret).finalize();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        let mut rng = SeededNoise::new(u64::from_le_bytes(seed));
        let values = (0..spec.radius).map(|_| rng.next_normal()).collect();
        Self { spec, values }
    }

    /// Where the key writes.
    pub fn spec(&self) -> WatermarkSpec {
        self.spec
    }

    /// The target value of ring `ring` (1-based) on an `h × w` plane.
    pub(super) fn ring_value(&self, ring: usize, height: usize, width: usize) -> f64 {
        self.values[ring - 1] * ((height * width) as f64).sqrt() * self.spec.strength
    }

    /// Checks that the key fits latents `[n, C, h, w]` and returns `(channel, h, w)`.
    pub(super) fn check(&self, shape: &[usize]) -> Result<(usize, usize, usize), WatermarkError> {
        let channel = self.spec.channel as usize;
        let &[_, channels, height, width] = shape else {
            return Err(WatermarkError::NoChannel { shape: shape.to_vec(), channel });
        };
        if channel >= channels {
            return Err(WatermarkError::NoChannel { shape: shape.to_vec(), channel });
        }
        fits(self.spec.radius, height, width)?;
        Ok((channel, height, width))
    }
}

/// Whether rings up to `radius` fit an `h × w` plane: `1 ≤ radius < min(h, w) / 2`.
pub fn fits(radius: u32, height: usize, width: usize) -> Result<(), WatermarkError> {
    let limit = height.min(width) / 2;
    if radius == 0 || radius as usize >= limit {
        return Err(WatermarkError::RadiusTooLarge { radius, height, width, limit });
    }
    Ok(())
}

/// The signed frequency of FFT index `k` on an axis of `n` points (numpy's `fftfreq(n) · n`).
pub fn signed_frequency(k: usize, n: usize) -> i64 {
    if k < n.div_ceil(2) {
        k as i64
    } else {
        k as i64 - n as i64
    }
}

/// The ring (1-based) of FFT index `(ky, kx)` on an `h × w` plane, or `None` outside rings `1..=radius`
/// (the DC coefficient included).
pub fn ring_of(ky: usize, kx: usize, height: usize, width: usize, radius: u32) -> Option<usize> {
    let (fy, fx) = (signed_frequency(ky, height), signed_frequency(kx, width));
    let d = ((fy * fy + fx * fx) as f64).sqrt();
    (d > 0.0 && d <= f64::from(radius)).then(|| d.ceil() as usize)
}

/// Whether FFT index `(ky, kx)` is the representative of its conjugate pair `{f, −f}` (positive `fy`, or
/// `fy = 0` and positive `fx`). A real plane's coefficients at `f` and `−f` are conjugates, so only one of
/// each pair is independent; the statistics count each pair once.
pub fn is_representative(ky: usize, kx: usize, height: usize, width: usize) -> bool {
    let (fy, fx) = (signed_frequency(ky, height), signed_frequency(kx, width));
    fy > 0 || (fy == 0 && fx > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: WatermarkSpec = WatermarkSpec { radius: 4, channel: 3, strength: 1.0 };

    #[test]
    fn the_same_secret_gives_the_same_values_and_others_differ() {
        let a = RingKey::derive(b"alpha", SPEC);
        assert_eq!(a, RingKey::derive(b"alpha", SPEC));
        assert_ne!(a, RingKey::derive(b"alphb", SPEC));
        assert_eq!(a.values.len(), 4);
        assert!(!format!("{a:?}").contains(&a.values[0].to_string()), "Debug must not show the values");
    }

    #[test]
    fn rings_are_nested_circles_without_the_dc_coefficient() {
        let (h, w) = (16, 16);
        let mut counts = [0usize; 5];
        for ky in 0..h {
            for kx in 0..w {
                if let Some(ring) = ring_of(ky, kx, h, w, 4) {
                    counts[ring] += 1;
                }
            }
        }
        // Integer points with 0 < d ≤ 4: 48 (the 49 of the disc less the centre).
        assert_eq!(counts.iter().sum::<usize>(), 48);
        assert_eq!((counts[1], counts[2]), (4, 8), "d = 1; d ∈ (1, 2]: √2 ×4 and 2 ×4");
        assert_eq!(ring_of(0, 0, h, w, 4), None);
        assert_eq!(ring_of(15, 0, h, w, 4), Some(1), "index 15 is frequency −1");
        assert_eq!(signed_frequency(8, 16), -8);
    }

    #[test]
    fn radius_must_stay_below_nyquist() {
        assert!(fits(7, 16, 16).is_ok());
        assert!(fits(8, 16, 16).is_err());
        assert!(fits(0, 16, 16).is_err());
        let key = RingKey::derive(b"k", SPEC);
        assert!(key.check(&[1, 4, 16, 16]).is_ok());
        assert!(key.check(&[1, 3, 16, 16]).is_err(), "no channel 3");
        assert!(key.check(&[1, 4, 8, 8]).is_err(), "radius 4 needs more than 8x8");
    }
}
