//! Classifier-free guidance and its rescale (Lin et al., "Common Diffusion Noise Schedules and Sample Steps
//! are Flawed", §3.4), which tames over-exposure with zero-terminal-SNR models.

use ndarray::{ArrayD, ArrayViewD, Axis};

/// `uncond + scale * (cond - uncond)`.
pub fn guide(uncond: ArrayViewD<'_, f32>, cond: ArrayViewD<'_, f32>, scale: f32) -> ArrayD<f32> {
    &uncond + &((&cond - &uncond) * scale)
}

/// Rescales guided predictions per batch item so their standard deviation matches the conditional
/// prediction's, then blends: `rescale * rescaled + (1 - rescale) * guided` (diffusers' `rescale_noise_cfg`,
/// unbiased standard deviations over all but the batch axis).
pub fn rescale(guided: ArrayD<f32>, cond: ArrayViewD<'_, f32>, rescale: f32) -> ArrayD<f32> {
    if rescale <= 0.0 {
        return guided;
    }
    let mut out = guided;
    for (mut item, text) in out.axis_iter_mut(Axis(0)).zip(cond.axis_iter(Axis(0))) {
        let std_text = unbiased_std(text.iter().copied());
        let std_cfg = unbiased_std(item.iter().copied());
        if std_cfg == 0.0 || !std_cfg.is_finite() {
            continue;
        }
        let factor = (std_text / std_cfg) as f32;
        item.mapv_inplace(|v| rescale * (v * factor) + (1.0 - rescale) * v);
    }
    out
}

fn unbiased_std(values: impl Iterator<Item = f32> + Clone) -> f64 {
    let n = values.clone().count();
    if n < 2 {
        return 0.0;
    }
    let mean = values.clone().map(f64::from).sum::<f64>() / n as f64;
    let var = values.map(|v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn rescale_matches_diffusers() {
        // Reference: torch, diffusers' rescale_noise_cfg with guidance_rescale = 0.7.
        let cfg = ArrayD::from_shape_fn(IxDyn(&[2, 2, 2, 2]), |i| {
            let k = i[0] * 8 + i[1] * 4 + i[2] * 2 + i[3];
            k as f32 * 0.1 - 0.5
        });
        let text = ArrayD::from_shape_fn(IxDyn(&[2, 2, 2, 2]), |i| {
            let k = i[0] * 8 + i[1] * 4 + i[2] * 2 + i[3];
            (k as f32).cos()
        });
        let expected = [
            -1.2528431, -1.0022745, -0.7517059, -0.5011372, -0.2505686, 0.0, 0.2505687, 0.5011372, 0.7060118,
            0.9413491, 1.1766862, 1.4120235, 1.6473608, 1.8826982, 2.118035, 2.3533723,
        ];
        let out = rescale(cfg, text.view(), 0.7);
        for (a, b) in out.iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_rescale_is_identity_and_guide_is_linear() {
        let u = ArrayD::from_elem(IxDyn(&[1, 2]), 1.0f32);
        let c = ArrayD::from_elem(IxDyn(&[1, 2]), 3.0f32);
        let g = guide(u.view(), c.view(), 7.5);
        assert_eq!(g[[0, 0]], 16.0);
        assert_eq!(rescale(g.clone(), c.view(), 0.0), g);
    }
}
