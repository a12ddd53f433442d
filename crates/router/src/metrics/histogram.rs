//! The histogram of the router's metrics: fixed buckets kept in atomics, so that an observation costs two relaxed
//! increments and no lock (prometheus-client's own histogram takes a mutex on every observation).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Latency buckets in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A cumulative histogram with fixed buckets; cloning it gives another handle on the same figures.
#[derive(Clone, Debug)]
pub struct Histogram(Arc<Buckets>);

#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// Observations by the first bound they do not exceed; the last one counts those above every bound.
    counts: Box<[AtomicU64]>,
    /// Sum of observations, in millionths of the unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(super) fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram(Arc::new(Buckets { bounds, counts, sum_micros: AtomicU64::new(0) }))
    }

    pub(super) fn latency() -> Self {
        Histogram::new(LATENCY_BUCKETS)
    }

    /// Counts one observation: two relaxed increments.
    pub fn observe(&self, value: f64) {
        let buckets = &*self.0;
        let bucket = buckets.bounds.iter().position(|bound| value <= *bound).unwrap_or(buckets.bounds.len());
        buckets.counts[bucket].fetch_add(1, Ordering::Relaxed);
        buckets.sum_micros.fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        let buckets = &*self.0;
        let counts: Vec<(f64, u64)> = (buckets.bounds.iter().copied().chain([f64::INFINITY]))
            .zip(buckets.counts.iter().map(|count| count.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' total, so that the `+Inf` bucket always equals it.
        let count = counts.iter().map(|(_, n)| n).sum();
        let sum = buckets.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &counts, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::metrics::Metrics;
    use crate::metrics::tests::scrape;

    #[test]
    fn histograms_are_cumulative() {
        let metrics = Metrics::default();
        for value in [0.05, 5.0, 50.0] {
            metrics.flush_lag_seconds.observe(value);
        }
        let scraped = scrape(&metrics, &HashMap::new(), 0);
        assert_eq!(scraped.types["llm_router_flush_lag_seconds"], "histogram");
        let bucket = |le: &str| scraped.value("llm_router_flush_lag_seconds_bucket", &[("le", le)]);
        assert_eq!(bucket("0.1"), Some(1.0));
        assert_eq!(bucket("2.0"), Some(1.0));
        assert_eq!(bucket("5.0"), Some(2.0));
        assert_eq!(bucket("30.0"), Some(2.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(scraped.value("llm_router_flush_lag_seconds_sum", &[]), Some(55.05));
        assert_eq!(scraped.value("llm_router_flush_lag_seconds_count", &[]), Some(3.0));
    }
}
