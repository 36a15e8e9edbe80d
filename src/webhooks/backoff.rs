//! When a failed delivery is tried again, and when it is given up: exponential backoff (each wait four times
//! the one before, from `initial` up to `max_delay`) with jitter (each wait shortened by up to a quarter, at
//! random, so the retries of many deliveries that failed together spread out instead of arriving together),
//! for at most `max_attempts` attempts and never past `retry_for` after the event.
//!
//! With the defaults (5 s, ×4, 8 attempts) the waits are about 5 s, 20 s, 80 s, 5 min, 21 min, 85 min and
//! 5.7 h: a receiver that is down for a few hours still gets the event.

use std::time::Duration;

/// How much longer each wait is than the one before.
const FACTOR: u32 = 4;

/// The largest share of a wait that jitter takes off.
const JITTER: f64 = 0.25;

/// The retry rules of deliveries (`[webhooks]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts at most, the first included.
    pub max_attempts: u32,
    /// No attempt starts later than this after the event.
    pub retry_for: Duration,
    /// The wait after the first failed attempt (before jitter).
    pub initial: Duration,
    /// The longest wait.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The wait after `failed` attempts have failed (1 = after the first), before jitter.
    pub fn base_delay(&self, failed: u32) -> Duration {
        let growth = FACTOR.saturating_pow(failed.saturating_sub(1).min(30));
        self.initial.saturating_mul(growth).min(self.max_delay)
    }

    /// The wait after `failed` failed attempts with jitter: `unit` (uniform in [0, 1)) picks where in
    /// `[¾ base, base]` it falls.
    pub fn delay(&self, failed: u32, unit: f64) -> Duration {
        self.base_delay(failed).mul_f64(1.0 - JITTER * unit.clamp(0.0, 1.0))
    }

    /// What to do after attempt number `attempts` failed, `elapsed` after the event: wait this long and try
    /// again, or `None`: give up.
    pub fn next(&self, attempts: u32, elapsed: Duration, unit: f64) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let wait = self.delay(attempts, unit);
        (elapsed.saturating_add(wait) <= self.retry_for).then_some(wait)
    }
}

/// A uniform number in [0, 1) from the operating system's random source (0.5 if it fails: jitter is only a
/// spreading aid).
pub fn unit_random() -> f64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 8,
            retry_for: Duration::from_secs(24 * 3600),
            initial: Duration::from_secs(5),
            max_delay: Duration::from_secs(6 * 3600),
        }
    }

    #[test]
    fn waits_grow_fourfold_up_to_the_cap() {
        let p = policy();
        let base: Vec<u64> = (1..=9).map(|n| p.base_delay(n).as_secs()).collect();
        assert_eq!(base, [5, 20, 80, 320, 1280, 5120, 20480, 21600, 21600]);
        assert_eq!(p.base_delay(1000), p.max_delay, "no overflow for absurd counts");
    }

    #[test]
    fn jitter_stays_within_three_quarters_and_the_whole_wait() {
        let p = policy();
        for failed in 1..=8 {
            let base = p.base_delay(failed);
            for unit in [0.0, 0.1, 0.5, 0.999_999, 1.0, -3.0, 7.0] {
                let wait = p.delay(failed, unit);
                assert!(wait <= base && wait >= base.mul_f64(0.75), "{failed} {unit}: {wait:?} vs {base:?}");
            }
        }
        for _ in 0..1000 {
            let u = unit_random();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn deliveries_give_up_after_max_attempts_or_retry_for() {
        let p = policy();
        assert_eq!(p.next(1, Duration::ZERO, 0.0), Some(Duration::from_secs(5)));
        assert!(p.next(7, Duration::from_secs(3600), 0.0).is_some());
        assert_eq!(p.next(8, Duration::ZERO, 0.0), None, "the eighth attempt was the last");
        let short = RetryPolicy { retry_for: Duration::from_secs(60), ..p };
        assert_eq!(short.next(2, Duration::from_secs(30), 0.0), Some(Duration::from_secs(20)));
        assert_eq!(short.next(3, Duration::from_secs(30), 0.0), None, "80 s more would pass retry_for");
        // The whole default schedule fits in a day.
        let total: Duration = (1..8).map(|n| p.base_delay(n)).sum();
        assert!(total < p.retry_for && total > Duration::from_secs(7 * 3600), "{total:?}");
    }
}
