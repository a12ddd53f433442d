//! Latency percentiles, error counts and medians: the arithmetic behind every report.

use std::collections::BTreeMap;

use serde::Serialize;

/// The value at percentile `pct` (0..=100) of ascending `sorted`, by the nearest-rank method: the smallest value
/// that at least `pct` percent of the samples do not exceed. `None` when there are no samples.
pub fn percentile(sorted: &[u64], pct: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let exact = pct / 100.0 * sorted.len() as f64;
    // 99.9 % of 1000 is 999.0000000000001 in floating point; the rank is still 999.
    let rank = (exact - exact * 1e-12).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median of `values`; the mean of the two middle ones for an even count. `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// How unevenly `counts` spread: the largest over the smallest (1.0: perfectly even; a zero counts as one).
pub fn spread(counts: &[u64]) -> f64 {
    let most = counts.iter().copied().max().unwrap_or(0) as f64;
    let least = counts.iter().copied().min().unwrap_or(0).max(1) as f64;
    most / least
}

/// Latency figures in milliseconds, from samples in nanoseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarizes samples given in nanoseconds, in any order.
    pub fn from_nanos(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let ms = |pct: f64| percentile(&samples, pct).map_or(0.0, nanos_to_ms);
        let mean = if samples.is_empty() {
            0.0
        } else {
            nanos_to_ms(samples.iter().map(|&s| u128::from(s)).sum::<u128>() as u64) / samples.len() as f64
        };
        LatencySummary {
            samples: samples.len(),
            mean_ms: mean,
            p50_ms: ms(50.0),
            p90_ms: ms(90.0),
            p99_ms: ms(99.0),
            p999_ms: ms(99.9),
            max_ms: ms(100.0),
        }
    }

    /// One line for people: `p50 0.412 ms  p99 ...`.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms   (mean {:.3} ms, {} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms, self.samples
        )
    }
}

/// What a hop in the middle adds to a latency: the routed figure minus the direct one, at the median and the 99th
/// percentile, and their ratios (`None` when the direct figure is zero).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Added {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p50_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
}

impl Added {
    pub fn between(direct: &LatencySummary, routed: &LatencySummary) -> Self {
        let ratio = |routed: f64, direct: f64| (direct > 0.0).then(|| routed / direct);
        Added {
            p50_ms: routed.p50_ms - direct.p50_ms,
            p99_ms: routed.p99_ms - direct.p99_ms,
            p50_ratio: ratio(routed.p50_ms, direct.p50_ms),
            p99_ratio: ratio(routed.p99_ms, direct.p99_ms),
        }
    }

    /// One line for people: `p50 +0.120 ms (×1.8)   p99 +0.410 ms (×1.5)`.
    pub fn line(&self) -> String {
        let times = |ratio: Option<f64>| ratio.map_or_else(String::new, |r| format!(" (×{r:.2})"));
        format!(
            "p50 {:+.3} ms{}   p99 {:+.3} ms{}",
            self.p50_ms,
            times(self.p50_ratio),
            self.p99_ms,
            times(self.p99_ratio)
        )
    }
}

fn nanos_to_ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// Failed requests, counted by kind (`HTTP 401`, `I/O ConnectionReset`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ErrorCounts(BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn add(&mut self, kind: impl Into<String>) {
        *self.0.entry(kind.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: ErrorCounts) {
        for (kind, count) in other.0 {
            *self.0.entry(kind).or_default() += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `none`, or `HTTP 401: 3, I/O ConnectionReset: 1`.
    pub fn line(&self) -> String {
        if self.0.is_empty() {
            return "none".to_owned();
        }
        self.0.iter().map(|(kind, count)| format!("{kind}: {count}")).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50));
        assert_eq!(percentile(&samples, 99.0), Some(99));
        assert_eq!(percentile(&samples, 99.9), Some(100));
        assert_eq!(percentile(&samples, 100.0), Some(100));
        assert_eq!(percentile(&samples, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // Ten samples: p50 is the 5th, p90 the 9th, p99 the 10th.
        let ten: Vec<u64> = (10..=100).step_by(10).collect();
        assert_eq!(percentile(&ten, 50.0), Some(50));
        assert_eq!(percentile(&ten, 90.0), Some(90));
        assert_eq!(percentile(&ten, 99.0), Some(100));
    }

    #[test]
    fn summary_sorts_and_converts_to_milliseconds() {
        // 1..=1000 µs, shuffled by reversal.
        let samples: Vec<u64> = (1..=1000).rev().map(|us| us * 1000).collect();
        let summary = LatencySummary::from_nanos(samples);
        assert_eq!(summary.samples, 1000);
        assert_eq!(summary.p50_ms, 0.5);
        assert_eq!(summary.p99_ms, 0.99);
        assert_eq!(summary.p999_ms, 0.999);
        assert_eq!(summary.max_ms, 1.0);
        assert!((summary.mean_ms - 0.5005).abs() < 1e-9);
        assert_eq!(LatencySummary::from_nanos(Vec::new()).max_ms, 0.0);
    }

    #[test]
    fn added_latency_is_routed_minus_direct() {
        let direct = LatencySummary::from_nanos((1..=100).map(|us| us * 1000).collect());
        let routed = LatencySummary::from_nanos((1..=100).map(|us| us * 1000 + 250_000).collect());
        let added = Added::between(&direct, &routed);
        assert!((added.p50_ms - 0.25).abs() < 1e-9, "{added:?}");
        assert!((added.p99_ms - 0.25).abs() < 1e-9, "{added:?}");
        assert!((added.p50_ratio.expect("ratio") - 0.3 / 0.05).abs() < 1e-9);
        assert_eq!(added.line(), "p50 +0.250 ms (×6.00)   p99 +0.250 ms (×3.53)");
        // A faster routed path shows as a negative figure, not as zero.
        assert!(Added::between(&routed, &direct).p99_ms < 0.0);
        let empty = LatencySummary::from_nanos(Vec::new());
        assert_eq!(Added::between(&empty, &routed).p50_ratio, None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn error_counts_merge_by_kind() {
        let mut a = ErrorCounts::default();
        a.add("HTTP 401");
        a.add("HTTP 401");
        let mut b = ErrorCounts::default();
        b.add("HTTP 401");
        b.add("connection closed");
        a.merge(b);
        assert_eq!(a.total(), 4);
        assert_eq!(a.line(), "HTTP 401: 3, connection closed: 1");
        assert_eq!(ErrorCounts::default().line(), "none");
    }
}
