//! Timestep spacings and sigma schedules, written to reproduce NumPy's arithmetic (banker's rounding,
//! `arange`/`linspace` element formulas) because diffusers builds its schedules with NumPy.

use super::config::TimestepSpacing;

/// `np.linspace(start, stop, num)` (endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for float arguments.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    let len = if len.is_finite() && len > 0.0 { len as usize } else { 0 };
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// Descending integer timesteps of DDIM, DDPM, PNDM (`_timesteps` before PNDM's reordering) and LCM-like
/// schedulers: `n` values out of `train` training steps.
pub(crate) fn integer_timesteps(spacing: TimestepSpacing, n: usize, train: usize, offset: i64) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(|t| t.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (train / n) as i64;
            (0..n as i64).rev().map(|i| i * ratio + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            np_arange(train as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// Descending timesteps of the sigma-based discrete schedulers (Euler, Euler ancestral, Heun), rounded to
/// float32 as diffusers stores them.
pub(crate) fn float_timesteps(spacing: TimestepSpacing, n: usize, train: usize, offset: i64) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (train - 1) as f64, n).into_iter().rev().map(|t| t as f32 as f64).collect()
        }
        _ => integer_timesteps(spacing, n, train, offset).into_iter().map(|t| t as f64).collect(),
    }
}

/// Timesteps of the multistep solvers (DPM-Solver, UniPC): `n + 1` points, the last dropped.
pub(crate) fn multistep_timesteps(
    spacing: TimestepSpacing,
    n: usize,
    train: usize,
    last_timestep: usize,
    offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut ts: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect();
            ts.reverse();
            ts.pop();
            ts
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (n + 1)) as i64;
            let mut ts: Vec<i64> = (0..=n as i64).map(|i| i * ratio).collect();
            ts.reverse();
            ts.pop();
            ts.into_iter().map(|t| t + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio).into_iter().map(|t| t.round_ties_even() as i64 - 1).collect()
        }
    }
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = hi - lo;
    let frac = x - j as f64;
    if frac == 0.0 {
        lo
    } else {
        slope * frac + lo
    }
}

/// The Karras et al. (2022) sigma ramp with rho = 7, from `sigma_max` down to `sigma_min`.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates to `sigma`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas.len();
    // Index of the last log-sigma not above log_sigma (0 when none), capped so that `low + 1` exists.
    let low_idx = log_sigmas.iter().rposition(|&ls| log_sigma - ls as f64 >= 0.0).unwrap_or(0).min(count - 2);
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[low_idx + 1] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `np.log` of the float32 training sigmas (a float32 array in NumPy).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|&s| (s as f64).ln() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers() {
        assert_eq!(integer_timesteps(TimestepSpacing::Leading, 4, 1000, 1), vec![751, 501, 251, 1]);
        assert_eq!(integer_timesteps(TimestepSpacing::Trailing, 4, 1000, 0), vec![999, 749, 499, 249]);
        assert_eq!(integer_timesteps(TimestepSpacing::Linspace, 4, 1000, 0), vec![999, 666, 333, 0]);
        assert_eq!(multistep_timesteps(TimestepSpacing::Linspace, 4, 1000, 1000, 0), vec![999, 749, 500, 250]);
    }
}
