//! The HTTP figures of the router's metrics: requests answered by matched route, method and status, and their
//! latency. Each route's handles are taken from the families once and found again under a read lock, without
//! allocating.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;

use super::{Histogram, Metrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

/// The statistics of one route, by method.
pub(super) type ByMethod = Vec<(Box<str>, RouteStats)>;

/// Highest HTTP status counted separately; anything above is counted as 599.
const MAX_STATUS: u16 = 599;

/// The handles of one matched route and method.
pub(super) struct RouteStats {
    duration: Histogram,
    /// By status, each taken from the family on the first request that answered it.
    by_status: Box<[OnceLock<Counter>]>,
}

impl Metrics {
    /// Records one answered request of a matched route.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let status = status.min(MAX_STATUS);
        {
            let http = self.http.read().unwrap_or_else(|p| p.into_inner());
            let found = http.get(route).and_then(|methods| methods.iter().find(|(m, _)| &**m == method));
            if let Some((_, stats)) = found {
                self.record(stats, method, route, status, elapsed);
                return;
            }
        }
        let mut http = self.http.write().unwrap_or_else(|p| p.into_inner());
        let methods = http.entry(route.into()).or_default();
        let at = match methods.iter().position(|(m, _)| &**m == method) {
            Some(at) => at,
            None => {
                let labels = RouteLabels { method: method.to_owned(), route: route.to_owned() };
                let by_status = (0..=MAX_STATUS).map(|_| OnceLock::new()).collect();
                methods.push((
                    method.into(),
                    RouteStats { duration: self.durations.get_or_create_owned(&labels), by_status },
                ));
                methods.len() - 1
            }
        };
        self.record(&methods[at].1, method, route, status, elapsed);
    }

    fn record(&self, stats: &RouteStats, method: &str, route: &str, status: u16, elapsed: Duration) {
        stats.duration.observe(elapsed.as_secs_f64());
        let counter = stats.by_status[usize::from(status)].get_or_init(|| {
            self.requests.get_or_create_owned(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
        });
        counter.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use llm_router_protocol::NodeStatus;

    use crate::metrics::Metrics;
    use crate::metrics::exposition::parse;
    use crate::metrics::tests::scrape;
    use crate::store::Availability;

    #[test]
    fn requests_are_counted_by_route_method_and_status() {
        let metrics = Metrics::default();
        metrics.request("POST", "/v0/health", 200, Duration::from_millis(2));
        metrics.request("POST", "/v0/health", 200, Duration::from_millis(3));
        metrics.request("POST", "/v0/health", 401, Duration::from_millis(1));
        metrics.request("GET", "/v0/health", 1000, Duration::from_millis(1));
        let scraped = scrape(&metrics, &HashMap::from([(NodeStatus::Online, 7)]), 0);
        let requests = |method: &str, status: &str| {
            let labels = [("method", method), ("route", "/v0/health"), ("status", status)];
            scraped.value("llm_router_http_requests_total", &labels)
        };
        assert_eq!(scraped.types["llm_router_http_requests"], "counter");
        assert_eq!(requests("POST", "200"), Some(2.0));
        assert_eq!(requests("POST", "401"), Some(1.0));
        assert_eq!(requests("GET", "599"), Some(1.0), "statuses above 599 count as 599");
        assert_eq!(scraped.samples("llm_router_http_requests_total").count(), 3, "no series for unseen statuses");
        let latency = [("method", "POST"), ("route", "/v0/health")];
        assert_eq!(scraped.value("llm_router_http_request_duration_seconds_count", &latency), Some(3.0));
        assert_eq!(scraped.value("llm_router_http_request_duration_seconds_bucket", &[("le", "0.001")]), None);
        let bucket = |le| {
            let labels = [("method", "POST"), ("route", "/v0/health"), ("le", le)];
            scraped.value("llm_router_http_request_duration_seconds_bucket", &labels)
        };
        assert_eq!(bucket("0.0005"), Some(0.0));
        assert_eq!(bucket("0.001"), Some(1.0));
        assert_eq!(bucket("0.0025"), Some(2.0));
        assert_eq!(bucket("0.005"), Some(3.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(scraped.value("llm_router_nodes", &[("status", "online")]), Some(7.0));
        assert_eq!(scraped.value("llm_router_nodes", &[("status", "pending")]), Some(0.0));
        assert_eq!(scraped.samples("llm_router_nodes").count(), NodeStatus::ALL.len());
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::default();
        let route = "/odd/\"quoted\"/back\\slash/new\nline";
        metrics.request("GET", route, 200, Duration::from_millis(1));
        let text = metrics.render(&HashMap::new(), 0, Availability::Available);
        assert!(text.contains(r#"route="/odd/\"quoted\"/back\\slash/new\nline""#), "{text}");
        let scraped = parse(&text).unwrap_or_else(|error| panic!("{error} in:\n{text}"));
        let labels = [("method", "GET"), ("route", route), ("status", "200")];
        assert_eq!(scraped.value("llm_router_http_requests_total", &labels), Some(1.0));
    }
}
