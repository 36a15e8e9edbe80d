//! Writing a key into a job's starting noise: for every image, the key's channel is transformed, the
//! coefficients of rings `1..=radius` are set to the key's ring values, and the plane is transformed back
//! (real part). Every other channel, and every coefficient outside the rings, is unchanged.

use ndarray::{ArrayD, Axis};

use super::fourier::{forward, inverse_real};
use super::pattern::{ring_of, RingKey};
use super::WatermarkError;

/// Writes `key` into unit-Gaussian latents `[n, C, h, w]` in place.
pub fn inject(latents: &mut ArrayD<f32>, key: &RingKey) -> Result<(), WatermarkError> {
    let (channel, height, width) = key.check(latents.shape())?;
    let radius = key.spec().radius;
    for mut image in latents.axis_iter_mut(Axis(0)) {
        let mut plane = image.index_axis_mut(Axis(0), channel);
        let values: Vec<f32> = plane.iter().copied().collect();
        let mut spectrum = forward(&values, height, width);
        for ky in 0..height {
            for kx in 0..width {
                if let Some(ring) = ring_of(ky, kx, height, width, radius) {
                    spectrum[ky * width + kx] = key.ring_value(ring, height, width).into();
                }
            }
        }
        let marked = inverse_real(spectrum, height, width);
        for (out, value) in plane.iter_mut().zip(marked) {
            *out = value;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::super::pattern::WatermarkSpec;
    use super::*;
    use crate::engine::rng::{NoiseSource, SeededNoise};

    fn noise(seed: u64, shape: &[usize]) -> ArrayD<f32> {
        let mut values = vec![0f32; shape.iter().product()];
        SeededNoise::new(seed).fill_normal(&mut values);
        ArrayD::from_shape_vec(IxDyn(shape), values).unwrap()
    }

    #[test]
    fn only_the_rings_of_the_chosen_channel_change() {
        let key = RingKey::derive(b"secret", WatermarkSpec { radius: 3, channel: 1, strength: 1.0 });
        let original = noise(5, &[2, 4, 16, 16]);
        let mut marked = original.clone();
        inject(&mut marked, &key).unwrap();
        for c in [0, 2, 3] {
            assert_eq!(marked.index_axis(Axis(1), c), original.index_axis(Axis(1), c), "channel {c}");
        }
        for image in 0..2 {
            let before: Vec<f32> = original.index_axis(Axis(0), image).index_axis(Axis(0), 1).iter().copied().collect();
            let after: Vec<f32> = marked.index_axis(Axis(0), image).index_axis(Axis(0), 1).iter().copied().collect();
            assert_ne!(before, after);
            let (b, a) = (forward(&before, 16, 16), forward(&after, 16, 16));
            for k in 0..256 {
                let (ky, kx) = (k / 16, k % 16);
                match ring_of(ky, kx, 16, 16, 3) {
                    Some(ring) => {
                        let target = key.ring_value(ring, 16, 16);
                        assert!((a[k].re - target).abs() < 1e-3 && a[k].im.abs() < 1e-3, "ring {ring} at {k}");
                    }
                    None => assert!((a[k] - b[k]).norm() < 1e-3, "outside the rings at {k}"),
                }
            }
        }
        // Keeps the noise's scale: the marked channel's variance stays near 1.
        let channel = marked.index_axis(Axis(1), 1);
        let var = channel.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / channel.len() as f64;
        assert!((0.5..1.6).contains(&var), "variance {var}");
    }

    #[test]
    fn a_key_that_does_not_fit_is_refused() {
        let key = RingKey::derive(b"secret", WatermarkSpec { radius: 4, channel: 4, strength: 1.0 });
        assert!(inject(&mut noise(1, &[1, 4, 16, 16]), &key).is_err());
    }
}
