//! The 2-D discrete Fourier transform of a latent plane (row-major `h × w`), by rows then columns with
//! rustfft. Forward is unnormalised (numpy's `fft2`), inverse divides by `h·w` (numpy's `ifft2`).

use rustfft::num_complex::Complex64;
use rustfft::{FftDirection, FftPlanner};

/// `fft2` of a real plane.
pub fn forward(plane: &[f32], height: usize, width: usize) -> Vec<Complex64> {
    let mut data: Vec<Complex64> = plane.iter().map(|&v| Complex64::new(f64::from(v), 0.0)).collect();
    transform(&mut data, height, width, FftDirection::Forward);
    data
}

/// The real part of `ifft2` of a spectrum.
pub fn inverse_real(mut spectrum: Vec<Complex64>, height: usize, width: usize) -> Vec<f32> {
    transform(&mut spectrum, height, width, FftDirection::Inverse);
    let scale = 1.0 / (height * width) as f64;
    spectrum.iter().map(|c| (c.re * scale) as f32).collect()
}

/// In-place unnormalised 2-D transform of `data` (`height × width`, row-major).
fn transform(data: &mut [Complex64], height: usize, width: usize, direction: FftDirection) {
    let mut planner = FftPlanner::<f64>::new();
    let rows = planner.plan_fft(width, direction);
    for row in data.chunks_exact_mut(width) {
        rows.process(row);
    }
    let columns = planner.plan_fft(height, direction);
    let mut column = vec![Complex64::new(0.0, 0.0); height];
    for x in 0..width {
        for (y, c) in column.iter_mut().enumerate() {
            *c = data[y * width + x];
        }
        columns.process(&mut column);
        for (y, c) in column.iter().enumerate() {
            data[y * width + x] = *c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_then_inverse_is_the_identity_and_matches_a_direct_dft() {
        let (h, w) = (4, 6);
        let plane: Vec<f32> = (0..h * w).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let spectrum = forward(&plane, h, w);
        // One coefficient by the definition.
        let (ky, kx) = (1, 2);
        let mut direct = Complex64::new(0.0, 0.0);
        for y in 0..h {
            for x in 0..w {
                let angle = -std::f64::consts::TAU * ((ky * y) as f64 / h as f64 + (kx * x) as f64 / w as f64);
                direct += Complex64::from_polar(f64::from(plane[y * w + x]), angle);
            }
        }
        assert!((spectrum[ky * w + kx] - direct).norm() < 1e-9);
        let back = inverse_real(spectrum, h, w);
        for (a, b) in plane.iter().zip(&back) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
