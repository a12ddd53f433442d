//! Prometheus metrics, kept per application instance and rendered as text at `GET /metrics`.
//!
//! Counters and histograms are plain atomics: the heartbeat path pays one relaxed increment per figure, and each
//! app (each test) has its own registry instead of a process-wide global.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use llm_router_protocol::NodeStatus;

/// Latency buckets in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Batch size buckets, in nodes.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
/// Flush lag buckets, in seconds.
const LAG_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// A cumulative histogram with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum of observations, in millionths of the unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|bound| value <= *bound) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Everything the router counts.
pub struct Metrics {
    pub registrations: AtomicU64,
    pub heartbeats: AtomicU64,
    pub approvals: AtomicU64,
    pub deletions: AtomicU64,
    /// Status changes, by the status reached.
    transitions: [AtomicU64; 4],
    pub flush_batch_size: Histogram,
    pub flush_lag_seconds: Histogram,
    pub flush_errors: AtomicU64,
    pub sweep_seconds: Histogram,
    /// Sign-ins refused by the throttle, before any password check.
    pub logins_throttled: AtomicU64,
    /// Password hashes refused because the hashing pool and its queue were full.
    pub hashes_refused: AtomicU64,
    /// Anonymous registrations refused by the per-address rate limit.
    pub registrations_rate_limited: AtomicU64,
    /// Registrations refused because the pending cap was reached.
    pub registrations_too_many_pending: AtomicU64,
    /// Pending nodes removed after `--pending-ttl-hours` without a heartbeat.
    pub pending_expired: AtomicU64,
    /// Client connections open now (a gauge, kept by the accept loop).
    pub connections_open: AtomicU64,
    /// The cap on open client connections (a gauge, set once at start).
    pub connections_max: AtomicU64,
    /// Idle or half-open connections closed to make room for a new client at the cap.
    pub connections_evicted: AtomicU64,
    /// New connections answered 503 and closed because every connection was busy.
    pub connections_refused: AtomicU64,
    /// Connections closed for not sending a request's headers in time.
    pub header_timeouts: AtomicU64,
    /// Keep-alive connections closed for staying idle too long.
    pub idle_timeouts: AtomicU64,
    /// By matched route, then by method: looked up without allocating on every request.
    http: RwLock<HashMap<String, ByMethod>>,
}

/// The statistics of one route, by method.
type ByMethod = Vec<(String, Arc<RouteStats>)>;

/// Highest HTTP status counted separately; anything above is counted as 599.
const MAX_STATUS: usize = 599;

/// Requests of one matched route and method.
struct RouteStats {
    duration: Histogram,
    by_status: Vec<AtomicU64>,
}

impl RouteStats {
    fn new() -> Self {
        RouteStats {
            duration: Histogram::new(LATENCY_BUCKETS),
            by_status: (0..=MAX_STATUS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            registrations: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            approvals: AtomicU64::new(0),
            deletions: AtomicU64::new(0),
            transitions: Default::default(),
            flush_batch_size: Histogram::new(BATCH_BUCKETS),
            flush_lag_seconds: Histogram::new(LAG_BUCKETS),
            flush_errors: AtomicU64::new(0),
            sweep_seconds: Histogram::new(LATENCY_BUCKETS),
            logins_throttled: AtomicU64::new(0),
            hashes_refused: AtomicU64::new(0),
            registrations_rate_limited: AtomicU64::new(0),
            registrations_too_many_pending: AtomicU64::new(0),
            pending_expired: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_max: AtomicU64::new(0),
            connections_evicted: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            http: RwLock::new(HashMap::new()),
        }
    }
}

fn index(status: NodeStatus) -> usize {
    NodeStatus::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn transition(&self, to: NodeStatus) {
        self.transitions[index(to)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records one answered request of a matched route.
    pub fn request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let found = {
            let http = self.http.read().unwrap_or_else(|p| p.into_inner());
            http.get(route).and_then(|methods| methods.iter().find(|(m, _)| m == method).map(|(_, s)| s.clone()))
        };
        let stats = found.unwrap_or_else(|| {
            let mut http = self.http.write().unwrap_or_else(|p| p.into_inner());
            let methods = http.entry(route.to_owned()).or_default();
            match methods.iter().find(|(m, _)| m == method) {
                Some((_, stats)) => stats.clone(),
                None => {
                    let stats = Arc::new(RouteStats::new());
                    methods.push((method.to_owned(), stats.clone()));
                    stats
                }
            }
        });
        stats.duration.observe(elapsed.as_secs_f64());
        stats.by_status[usize::from(status).min(MAX_STATUS)].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition; `nodes` are the current counts by status, `storage_faults` the writes the
    /// store could not make.
    pub fn render(&self, nodes: &HashMap<NodeStatus, usize>, storage_faults: u64) -> String {
        let storage_faults = AtomicU64::new(storage_faults);
        let mut out = String::with_capacity(4096);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut out, "llm_router_nodes", "gauge", "Nodes known to the router, by status.");
        for status in NodeStatus::ALL {
            let _ = writeln!(out, "llm_router_nodes{{status=\"{status}\"}} {}", nodes.get(&status).unwrap_or(&0));
        }
        for (name, help, counter) in [
            (
                "llm_router_registrations_total",
                "Registrations accepted (new, token rotation, takeover).",
                &self.registrations,
            ),
            ("llm_router_heartbeats_total", "Heartbeats accepted.", &self.heartbeats),
            ("llm_router_approvals_total", "Nodes approved by an administrator.", &self.approvals),
            ("llm_router_deletions_total", "Nodes deleted by an administrator.", &self.deletions),
            ("llm_router_flush_errors_total", "Failed writes of heartbeat figures (retried).", &self.flush_errors),
            (
                "llm_router_storage_errors_total",
                "Writes the database could not make (disk full, I/O error); each was undone and its caller told.",
                &storage_faults,
            ),
            (
                "llm_router_logins_throttled_total",
                "Sign-ins refused by the per-username-and-address throttle (429 login_throttled).",
                &self.logins_throttled,
            ),
            (
                "llm_router_password_hashes_refused_total",
                "Password checks refused because the hashing pool was full (429 hashing_busy).",
                &self.hashes_refused,
            ),
            (
                "llm_router_registrations_rate_limited_total",
                "Anonymous registrations refused by the per-address rate limit (429 rate_limited).",
                &self.registrations_rate_limited,
            ),
            (
                "llm_router_registrations_too_many_pending_total",
                "Registrations refused because the pending cap was reached (429 too_many_pending).",
                &self.registrations_too_many_pending,
            ),
            (
                "llm_router_pending_expired_total",
                "Pending nodes removed after the pending TTL without a heartbeat.",
                &self.pending_expired,
            ),
            (
                "llm_router_http_connections_evicted_total",
                "Idle or half-open client connections closed to make room for a new one at the cap.",
                &self.connections_evicted,
            ),
            (
                "llm_router_http_connections_refused_total",
                "New client connections answered 503 and closed because every connection was busy.",
                &self.connections_refused,
            ),
        ] {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        for (name, help, gauge) in [
            ("llm_router_http_connections_open", "Client connections open now.", &self.connections_open),
            ("llm_router_http_connections_max", "The cap on open client connections.", &self.connections_max),
        ] {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", gauge.load(Ordering::Relaxed));
        }
        family(
            &mut out,
            "llm_router_http_connection_timeouts_total",
            "counter",
            "Client connections closed by a timeout: `header` (request headers too slow), `idle` (keep-alive unused).",
        );
        for (kind, counter) in [("header", &self.header_timeouts), ("idle", &self.idle_timeouts)] {
            let value = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "llm_router_http_connection_timeouts_total{{kind=\"{kind}\"}} {value}");
        }
        family(&mut out, "llm_router_status_changes_total", "counter", "Node status changes, by the status reached.");
        for status in NodeStatus::ALL {
            let value = self.transitions[index(status)].load(Ordering::Relaxed);
            let _ = writeln!(out, "llm_router_status_changes_total{{to=\"{status}\"}} {value}");
        }
        for (name, help, histogram) in [
            (
                "llm_router_flush_batch_size",
                "Nodes whose heartbeat figures one write-behind batch stored.",
                &self.flush_batch_size,
            ),
            (
                "llm_router_flush_lag_seconds",
                "Age of the oldest figures a write-behind batch stored.",
                &self.flush_lag_seconds,
            ),
            (
                "llm_router_offline_sweep_seconds",
                "Duration of one offline sweep over the registry.",
                &self.sweep_seconds,
            ),
        ] {
            family(&mut out, name, "histogram", help);
            histogram.render(&mut out, name, "");
        }
        let http = self.http.read().unwrap_or_else(|p| p.into_inner());
        let mut routes: Vec<(&str, &str, &RouteStats)> = http
            .iter()
            .flat_map(|(route, methods)| methods.iter().map(move |(m, stats)| (m.as_str(), route.as_str(), &**stats)))
            .collect();
        routes.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
        family(
            &mut out,
            "llm_router_http_requests_total",
            "counter",
            "HTTP requests answered, by matched route, method and status.",
        );
        for (method, route, stats) in &routes {
            for (status, count) in stats.by_status.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "llm_router_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
                    );
                }
            }
        }
        family(
            &mut out,
            "llm_router_http_request_duration_seconds",
            "histogram",
            "HTTP request latency, by matched route and method.",
        );
        for (method, route, stats) in &routes {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            stats.duration.render(&mut out, "llm_router_http_request_duration_seconds", &labels);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let histogram = Histogram::new(&[1.0, 10.0]);
        for value in [0.5, 5.0, 50.0] {
            histogram.observe(value);
        }
        let mut out = String::new();
        histogram.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 55.5\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
    }

    #[test]
    fn requests_are_counted_by_route_method_and_status() {
        let metrics = Metrics::default();
        metrics.request("POST", "/v0/health", 200, Duration::from_millis(2));
        metrics.request("POST", "/v0/health", 200, Duration::from_millis(3));
        metrics.request("POST", "/v0/health", 401, Duration::from_millis(1));
        let text = metrics.render(&HashMap::from([(NodeStatus::Online, 7)]), 0);
        assert!(text.contains("llm_router_http_requests_total{method=\"POST\",route=\"/v0/health\",status=\"200\"} 2"));
        assert!(text.contains("llm_router_http_requests_total{method=\"POST\",route=\"/v0/health\",status=\"401\"} 1"));
        assert!(text.contains("llm_router_nodes{status=\"online\"} 7"));
        assert!(text.contains("llm_router_nodes{status=\"pending\"} 0"));
    }
}
