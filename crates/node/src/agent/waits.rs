//! The agent's waits (SPEC §5): the backoff while the router is unreachable, the wait a `Retry-After` asks for,
//! and the heartbeat interval with its jitter. Pure functions of a random number in `[0, 1)`, tested without
//! sleeping.

use std::time::Duration;

/// The wait before retry number `attempt` (0 for the first) while the router is unreachable: `base · 2^attempt`,
/// capped at `cap`, then "equal jitter": a uniform pick in its upper half, so agents that lost the router together
/// do not come back in step, and the wait never drops to nothing.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let exponential = base.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(cap);
    let half = exponential / 2;
    half + half.mul_f64(unit.clamp(0.0, 1.0))
}

/// The longest `Retry-After` the agent obeys; a larger one (a broken or hostile proxy) is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// The wait after the router answered `Retry-After: retry_after`: at least that (capped at [`MAX_RETRY_AFTER`]),
/// plus up to 10 % jitter so that agents turned away together do not return together, and never less than the
/// `backoff` the failure count would give anyway.
pub fn retry_later_delay(retry_after: Duration, backoff: Duration, unit: f64) -> Duration {
    let asked = retry_after.min(MAX_RETRY_AFTER);
    let jittered = (asked + asked.mul_f64(0.1 * unit.clamp(0.0, 1.0))).min(MAX_RETRY_AFTER.max(asked));
    jittered.max(backoff)
}

/// The wait before the next heartbeat: the router's interval, ±10 %.
pub fn heartbeat_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// The router's interval, never below one second whatever it says.
pub(super) fn interval(secs: u64) -> Duration {
    Duration::from_secs(secs.max(1))
}

pub(super) fn random_unit() -> f64 {
    use rand::RngExt;
    rand::rng().random::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_until_the_cap() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        // With the highest jitter the wait is the full exponential step.
        let waits: Vec<u64> = (0..9).map(|n| backoff_delay(n, base, cap, 1.0).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(u32::MAX, base, cap, 1.0), cap);
    }

    #[test]
    fn backoff_jitter_stays_in_the_upper_half() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(60);
        assert_eq!(backoff_delay(3, base, cap, 0.0), 400 * MS);
        assert_eq!(backoff_delay(3, base, cap, 0.5), 600 * MS);
        assert_eq!(backoff_delay(3, base, cap, 1.0), 800 * MS);
        // Out-of-range randomness is clamped rather than trusted.
        assert_eq!(backoff_delay(3, base, cap, 7.0), 800 * MS);
        assert_eq!(backoff_delay(3, base, cap, -1.0), 400 * MS);
        assert_eq!(backoff_delay(20, base, cap, 0.0), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_is_waited_at_least_and_capped_at_fifteen_minutes() {
        let secs = Duration::from_secs;
        // The router's figure wins over a short backoff, with at most 10 % more.
        assert_eq!(retry_later_delay(secs(30), 100 * MS, 0.0), secs(30));
        assert_eq!(retry_later_delay(secs(30), 100 * MS, 1.0), secs(33));
        for unit in [0.0, 0.3, 0.99] {
            let wait = retry_later_delay(secs(600), secs(1), unit);
            assert!(wait >= secs(600) && wait <= secs(660), "{wait:?}");
        }
        // A longer backoff (many failures in a row) still applies.
        assert_eq!(retry_later_delay(secs(1), secs(45), 0.5), secs(45));
        // Absurd values are cut to 15 minutes, jitter included.
        assert_eq!(retry_later_delay(secs(86_400 * 365), secs(1), 1.0), MAX_RETRY_AFTER);
        assert_eq!(retry_later_delay(secs(14 * 60 + 59), secs(1), 1.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn heartbeat_jitter_is_ten_percent_either_way() {
        let interval = Duration::from_secs(10);
        assert_eq!(heartbeat_delay(interval, 0.0), Duration::from_secs(9));
        assert_eq!(heartbeat_delay(interval, 0.5), Duration::from_secs(10));
        assert_eq!(heartbeat_delay(interval, 1.0), Duration::from_secs(11));
        for unit in [0.0, 0.1, 0.33, 0.77, 0.999] {
            let wait = heartbeat_delay(interval, unit);
            assert!(wait >= Duration::from_secs(9) && wait <= Duration::from_secs(11), "{wait:?}");
        }
    }

    #[test]
    fn random_units_are_in_range() {
        for _ in 0..1000 {
            let unit = random_unit();
            assert!((0.0..1.0).contains(&unit), "{unit}");
        }
    }

    #[test]
    fn interval_is_never_zero() {
        assert_eq!(interval(0), Duration::from_secs(1));
        assert_eq!(interval(7), Duration::from_secs(7));
    }
}
