//! Element-wise arithmetic on latents shared by the families.
//!
//! Latents are float32 `[b, C, h, w]` arrays; every scalar coefficient is computed in float64 and each element
//! is combined in float64 before rounding back, which stays within float32 rounding of diffusers' own
//! float32 tensor arithmetic. All functions work for any batch size and any rank.

use ndarray::{ArrayD, ArrayViewD, Zip};

use crate::engine::rng::NoiseSource;

/// `f(a)` element-wise.
pub(crate) fn map1(a: &ArrayViewD<'_, f32>, f: impl Fn(f64) -> f64) -> ArrayD<f32> {
    a.mapv(|x| f(x as f64) as f32)
}

/// `f(a, b)` element-wise. Panics if the shapes differ (a caller bug: the U-Net output has the sample's shape).
pub(crate) fn map2(a: &ArrayViewD<'_, f32>, b: &ArrayViewD<'_, f32>, f: impl Fn(f64, f64) -> f64) -> ArrayD<f32> {
    Zip::from(a).and(b).map_collect(|&x, &y| f(x as f64, y as f64) as f32)
}

/// `f(a, b, c)` element-wise. Panics if the shapes differ.
pub(crate) fn map3(
    a: &ArrayViewD<'_, f32>,
    b: &ArrayViewD<'_, f32>,
    c: &ArrayViewD<'_, f32>,
    f: impl Fn(f64, f64, f64) -> f64,
) -> ArrayD<f32> {
    Zip::from(a).and(b).and(c).map_collect(|&x, &y, &z| f(x as f64, y as f64, z as f64) as f32)
}

/// `f(a, b, c, d)` element-wise. Panics if the shapes differ.
pub(crate) fn map4(
    a: &ArrayViewD<'_, f32>,
    b: &ArrayViewD<'_, f32>,
    c: &ArrayViewD<'_, f32>,
    d: &ArrayViewD<'_, f32>,
    f: impl Fn(f64, f64, f64, f64) -> f64,
) -> ArrayD<f32> {
    Zip::from(a).and(b).and(c).and(d).map_collect(|&x, &y, &z, &w| f(x as f64, y as f64, z as f64, w as f64) as f32)
}

/// One draw of unit-Gaussian noise with `shape`, filled in row-major order as `randn_tensor` fills it.
pub(crate) fn draw_noise(noise: &mut dyn NoiseSource, shape: &[usize]) -> ArrayD<f32> {
    let len: usize = shape.iter().product();
    let mut buf = vec![0.0f32; len];
    noise.fill_normal(&mut buf);
    ArrayD::from_shape_vec(shape.to_vec(), buf).unwrap_or_else(|_| unreachable!("length matches shape"))
}

/// How the predicted clean sample is bounded before it is used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum X0Bound {
    /// Used as is.
    None,
    /// `clip_sample`: clamped to `±range`.
    Clip(f64),
    /// `thresholding`: Imagen's dynamic thresholding per batch item.
    Dynamic {
        /// Quantile of |x0| that sets the threshold.
        ratio: f64,
        /// Upper bound of the threshold.
        max: f64,
    },
}

impl X0Bound {
    /// Applies the bound to a predicted clean sample `[b, ...]`.
    pub(crate) fn apply(self, x0: ArrayD<f32>) -> ArrayD<f32> {
        match self {
            X0Bound::None => x0,
            X0Bound::Clip(r) => x0.mapv(|v| (v as f64).clamp(-r, r) as f32),
            X0Bound::Dynamic { ratio, max } => dynamic_threshold(x0, ratio, max),
        }
    }
}

/// `_threshold_sample`: per batch item, s = quantile(|x|, ratio) clamped to [1, max]; x = clamp(x, ±s) / s.
fn dynamic_threshold(mut x0: ArrayD<f32>, ratio: f64, max: f64) -> ArrayD<f32> {
    if x0.ndim() == 0 {
        return x0;
    }
    for mut item in x0.outer_iter_mut() {
        let mut abs: Vec<f32> = item.iter().map(|v| v.abs()).collect();
        if abs.is_empty() {
            continue;
        }
        abs.sort_by(f32::total_cmp);
        // torch.quantile, linear interpolation between the two nearest ranks.
        let pos = ratio * (abs.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = pos.ceil() as usize;
        let frac = pos - lo as f64;
        let q = abs[lo] as f64 + (abs[hi] as f64 - abs[lo] as f64) * frac;
        // torch.clamp(min=1, max=max): the upper bound wins when max < 1.
        let s = q.max(1.0).min(max);
        item.mapv_inplace(|v| ((v as f64).clamp(-s, s) / s) as f32);
    }
    x0
}

/// `add_noise` of the alpha-parameterised schedulers: `sqrt(a) * x0 + sqrt(1 - a) * noise`, with the
/// coefficients rounded to float32 as diffusers computes them.
pub(crate) fn alpha_add_noise(
    alpha_cumprod: f32,
    original: &ArrayViewD<'_, f32>,
    noise: &ArrayViewD<'_, f32>,
) -> ArrayD<f32> {
    let sa = alpha_cumprod.sqrt() as f64;
    let sb = (1.0 - alpha_cumprod).sqrt() as f64;
    map2(original, noise, |x, n| sa * x + sb * n)
}

/// `add_noise` of the sigma-parameterised discrete schedulers (Euler, Heun): `x0 + sigma * noise`.
pub(crate) fn sigma_add_noise(sigma: f64, original: &ArrayViewD<'_, f32>, noise: &ArrayViewD<'_, f32>) -> ArrayD<f32> {
    map2(original, noise, |x, n| x + n * sigma)
}

/// `f(a, b)` element-wise in float32, for formulas that must round exactly as PyTorch's float32 kernels do
/// (each tensor operation rounds; the closure spells out the same operations in the same order).
pub(crate) fn map2_f32(a: &ArrayViewD<'_, f32>, b: &ArrayViewD<'_, f32>, f: impl Fn(f32, f32) -> f32) -> ArrayD<f32> {
    Zip::from(a).and(b).map_collect(|&x, &y| f(x, y))
}

/// `f(a, b, c)` element-wise in float32 (see [`map2_f32`]).
pub(crate) fn map3_f32(
    a: &ArrayViewD<'_, f32>,
    b: &ArrayViewD<'_, f32>,
    c: &ArrayViewD<'_, f32>,
    f: impl Fn(f32, f32, f32) -> f32,
) -> ArrayD<f32> {
    Zip::from(a).and(b).and(c).map_collect(|&x, &y, &z| f(x, y, z))
}
