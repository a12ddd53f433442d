//! Prometheus metrics, kept per application instance and served at `GET /metrics` in the OpenMetrics text format.
//!
//! The registry, counters, gauges, label families and the encoding (label values escaped) are prometheus-client's.
//! Each app (each test) owns its [`Metrics`] and so its own registry, never a process-wide global. Counters and
//! gauges are single atomics. Histograms are this module's [`Histogram`], also atomics: prometheus-client's takes a
//! mutex on every observation, and every heartbeat observes the same route's latency histogram.
//!
//! Every request passes [`Metrics::request`]: it finds its route's handles (taken from the families once) under a
//! read lock, without allocating, and pays atomic increments.
//!
//! This file holds [`Metrics`] itself: its families, their registration and the scrape. The histogram is in
//! `histogram.rs`, the HTTP figures by route in `requests.rs`, the inference figures by model in `inference.rs`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;

use llm_router_protocol::{NodeStatus, ReplicaState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::store::Availability;

mod histogram;
mod inference;
mod requests;

pub use histogram::Histogram;
pub use inference::{InferenceMetrics, ModelMetrics};
use requests::{ByMethod, RequestLabels, RouteLabels};

/// The content type of [`Metrics::render`]'s text: OpenMetrics 1.0, which Prometheus asks for and reads.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Batch size buckets, in nodes.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
/// Flush lag buckets, in seconds.
const LAG_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

/// A gauge of a count: connections open, the connection cap.
pub type Level = Gauge<u64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToLabel {
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Everything the router counts.
pub struct Metrics {
    pub registrations: Counter,
    pub heartbeats: Counter,
    pub approvals: Counter,
    pub deletions: Counter,
    /// Status changes, by the status reached, in the order of [`NodeStatus::ALL`].
    transitions: [Counter; NodeStatus::ALL.len()],
    pub flush_batch_size: Histogram,
    pub flush_lag_seconds: Histogram,
    pub flush_errors: Counter,
    pub sweep_seconds: Histogram,
    /// Sign-ins refused by the throttle, before any password check.
    pub logins_throttled: Counter,
    /// Password hashes refused because the hashing pool and its queue were full.
    pub hashes_refused: Counter,
    /// Anonymous registrations refused by the per-address rate limit.
    pub registrations_rate_limited: Counter,
    /// Registrations with a join token that is not known.
    pub join_tokens_unknown: Counter,
    /// Registrations refused before any lookup because their address sent too many unknown join tokens.
    pub join_tokens_throttled: Counter,
    /// Registrations refused because the pending cap was reached.
    pub registrations_too_many_pending: Counter,
    /// Pending nodes removed after `--pending-ttl-hours` without a heartbeat.
    pub pending_expired: Counter,
    /// Audit events dropped because the audit log's queue was full (a flood of failed sign-ins).
    pub audit_dropped: Counter,
    /// Requests accepted on a credential remembered while the database was unreachable.
    pub credentials_remembered: Counter,
    /// Mass silences recorded (SPEC §10: more than half of the live nodes went offline within `offline_after / 2`).
    pub mass_silences: Counter,
    /// 1 while the latest mass silence is unresolved (its nodes have not come back and no one dismissed it), else 0.
    pub mass_silence: Level,
    /// 1 while this router decides offline transitions: always with SQLite; with a shared database, while it holds
    /// the sweep lease (SPEC §11).
    pub sweep_lease: Level,
    /// Client connections open now (kept by the accept loop).
    pub connections_open: Level,
    /// Agents waiting on `GET /v0/assignments` now, each on a connection of its own (SPEC §15).
    pub assignment_waits: Level,
    /// The cap on open client connections (set once at start).
    pub connections_max: Level,
    /// Idle or half-open connections closed to make room for a new client at the cap.
    pub connections_evicted: Counter,
    /// New connections answered 503 and closed because every connection was busy.
    pub connections_refused: Counter,
    /// Connections closed for not sending a request's headers in time.
    pub header_timeouts: Counter,
    /// Keep-alive connections closed for staying idle too long.
    pub idle_timeouts: Counter,
    /// Connections closed because their client left an answer unread for the write timeout.
    pub write_timeouts: Counter,
    /// New connections refused because their source held its share of the connections, all busy.
    pub connections_source_capped: Counter,
    /// `/v1` traffic, by model.
    pub inference: InferenceMetrics,
    /// Replicas of deployments by state (SPEC §15), set at each scrape.
    replicas: Family<StateLabel, Level>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// The handles of `requests` and `durations`, by matched route, then by method.
    http: RwLock<HashMap<Box<str>, ByMethod>>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let registrations = counter(
            &mut registry,
            "llm_router_registrations",
            "Registrations accepted (new, token rotation, takeover)",
        );
        let heartbeats = counter(&mut registry, "llm_router_heartbeats", "Heartbeats accepted");
        let approvals = counter(&mut registry, "llm_router_approvals", "Nodes approved by an administrator");
        let deletions = counter(&mut registry, "llm_router_deletions", "Nodes deleted by an administrator");
        let flush_errors =
            counter(&mut registry, "llm_router_flush_errors", "Failed writes of heartbeat figures (retried)");
        let logins_throttled = counter(
            &mut registry,
            "llm_router_logins_throttled",
            "Sign-ins refused by the per-username-and-address throttle (429 login_throttled)",
        );
        let hashes_refused = counter(
            &mut registry,
            "llm_router_password_hashes_refused",
            "Password checks refused because the hashing pool was full (429 hashing_busy)",
        );
        let registrations_rate_limited = counter(
            &mut registry,
            "llm_router_registrations_rate_limited",
            "Anonymous registrations refused by the per-address rate limit (429 rate_limited)",
        );
        let join_tokens_unknown = counter(
            &mut registry,
            "llm_router_join_tokens_unknown",
            "Registrations with an unknown join token (401 join_token_invalid)",
        );
        let join_tokens_throttled = counter(
            &mut registry,
            "llm_router_join_tokens_throttled",
            "Registrations refused because their address sent too many unknown join tokens (429 join_token_throttled)",
        );
        let registrations_too_many_pending = counter(
            &mut registry,
            "llm_router_registrations_too_many_pending",
            "Registrations refused because the pending cap was reached (429 too_many_pending)",
        );
        let pending_expired = counter(
            &mut registry,
            "llm_router_pending_expired",
            "Pending nodes removed after the pending TTL without a heartbeat",
        );
        let audit_dropped = counter(
            &mut registry,
            "llm_router_audit_dropped",
            "Audit events dropped because the audit log's write queue was full",
        );
        let credentials_remembered = counter(
            &mut registry,
            "llm_router_credentials_remembered",
            "Requests accepted on a credential remembered while the database was unreachable",
        );
        let mass_silences = counter(
            &mut registry,
            "llm_router_mass_silences",
            "Mass silences: more than half of the live nodes (at least 10) went offline within half of offline_after",
        );
        let mass_silence = Level::default();
        registry.register(
            "llm_router_mass_silence",
            "1 while the latest mass silence is unresolved (its nodes not back, not dismissed), else 0",
            mass_silence.clone(),
        );
        let sweep_lease = Level::default();
        registry.register(
            "llm_router_sweep_lease",
            "1 while this router decides offline transitions (SQLite: always; a shared database: while it holds the \
             sweep lease), else 0",
            sweep_lease.clone(),
        );
        let replicas = Family::<StateLabel, Level>::default();
        for state in ReplicaState::ALL {
            replicas.get_or_create(&StateLabel { state: state.as_str() }).set(0);
        }
        registry.register(
            "llm_router_deployment_replicas",
            "Replicas of deployments, by state: pending (no node, or not taken up yet), downloading, starting, ready, \
             failed",
            replicas.clone(),
        );
        let connections_evicted = counter(
            &mut registry,
            "llm_router_http_connections_evicted",
            "Idle or half-open client connections closed to make room for a new one at the cap",
        );
        let connections_refused = counter(
            &mut registry,
            "llm_router_http_connections_refused",
            "New client connections answered 503 and closed because every connection was busy",
        );
        let connections_source_capped = counter(
            &mut registry,
            "llm_router_http_connections_source_capped",
            "New client connections answered 503 because their source address held its share of the connections, \
             every one busy",
        );
        let connections_open = Level::default();
        registry.register("llm_router_http_connections_open", "Client connections open now", connections_open.clone());
        let assignment_waits = Level::default();
        registry.register(
            "llm_router_assignment_waits",
            "Agents waiting on their assignments now (GET /v0/assignments), each on a connection of its own",
            assignment_waits.clone(),
        );
        let connections_max = Level::default();
        registry.register(
            "llm_router_http_connections_max",
            "The cap on open client connections",
            connections_max.clone(),
        );
        let timeouts = Family::<KindLabel, Counter>::default();
        registry.register(
            "llm_router_http_connection_timeouts",
            "Client connections closed by a timeout: `header` (request headers too slow), `idle` (keep-alive unused), \
             `write` (an answer left unread)",
            timeouts.clone(),
        );
        let changes = Family::<ToLabel, Counter>::default();
        registry.register("llm_router_status_changes", "Node status changes, by the status reached", changes.clone());
        let flush_batch_size = Histogram::new(BATCH_BUCKETS);
        registry.register(
            "llm_router_flush_batch_size",
            "Nodes whose heartbeat figures one write-behind batch stored",
            flush_batch_size.clone(),
        );
        let flush_lag_seconds = Histogram::new(LAG_BUCKETS);
        registry.register_with_unit(
            "llm_router_flush_lag",
            "Age of the oldest figures a write-behind batch stored",
            Unit::Seconds,
            flush_lag_seconds.clone(),
        );
        let sweep_seconds = Histogram::latency();
        registry.register_with_unit(
            "llm_router_offline_sweep",
            "Duration of one offline sweep over the registry",
            Unit::Seconds,
            sweep_seconds.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "llm_router_http_requests",
            "HTTP requests answered, by matched route, method and status",
            requests.clone(),
        );
        let durations = Family::new_with_constructor(Histogram::latency as fn() -> Histogram);
        registry.register_with_unit(
            "llm_router_http_request_duration",
            "HTTP request latency, by matched route and method",
            Unit::Seconds,
            durations.clone(),
        );
        let inference = InferenceMetrics::register(&mut registry);
        Metrics {
            inference,
            registrations,
            heartbeats,
            approvals,
            deletions,
            transitions: NodeStatus::ALL.map(|status| changes.get_or_create_owned(&ToLabel { to: status.as_str() })),
            flush_batch_size,
            flush_lag_seconds,
            flush_errors,
            sweep_seconds,
            logins_throttled,
            hashes_refused,
            registrations_rate_limited,
            join_tokens_unknown,
            join_tokens_throttled,
            registrations_too_many_pending,
            pending_expired,
            audit_dropped,
            credentials_remembered,
            mass_silences,
            mass_silence,
            sweep_lease,
            replicas,
            connections_open,
            assignment_waits,
            connections_max,
            connections_evicted,
            connections_refused,
            header_timeouts: timeouts.get_or_create_owned(&KindLabel { kind: "header" }),
            idle_timeouts: timeouts.get_or_create_owned(&KindLabel { kind: "idle" }),
            write_timeouts: timeouts.get_or_create_owned(&KindLabel { kind: "write" }),
            connections_source_capped,
            requests,
            durations,
            http: RwLock::new(HashMap::new()),
            registry,
        }
    }
}

impl Metrics {
    /// Sets the replicas of deployments per state, for a scrape.
    pub fn set_replicas(&self, counts: &HashMap<ReplicaState, usize>) {
        for state in ReplicaState::ALL {
            let count = counts.get(&state).copied().unwrap_or(0) as u64;
            self.replicas.get_or_create(&StateLabel { state: state.as_str() }).set(count);
        }
    }
}

/// A counter registered under `name`; the encoding adds `_total` to its samples.
fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

fn index(status: NodeStatus) -> usize {
    NodeStatus::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

impl Metrics {
    /// Counts one event on one of the counters above.
    pub fn inc(counter: &Counter) {
        counter.inc();
    }

    /// Counts one node status change, by the status reached.
    pub fn transition(&self, to: NodeStatus) {
        self.transitions[index(to)].inc();
    }

    /// The OpenMetrics text exposition (see [`CONTENT_TYPE`]); `nodes` are the current counts by status,
    /// `storage_faults` the writes the store could not make, `database` whether the store can be used now.
    pub fn render(&self, nodes: &HashMap<NodeStatus, usize>, storage_faults: u64, database: Availability) -> String {
        // The figures known at scrape time only, in a registry of their own.
        let mut now = Registry::default();
        let by_status = Family::<StatusLabel, Level>::default();
        for status in NodeStatus::ALL {
            let count = nodes.get(&status).copied().unwrap_or(0);
            by_status.get_or_create(&StatusLabel { status: status.as_str() }).set(count as u64);
        }
        now.register("llm_router_nodes", "Nodes known to the router, by status", by_status);
        let states = Family::<StateLabel, Level>::default();
        for state in [Availability::Available, Availability::Unreachable, Availability::Lost] {
            states.get_or_create(&StateLabel { state: state.as_str() }).set(u64::from(state == database));
        }
        now.register(
            "llm_router_database",
            "1 for the state the database is in now: available, unreachable (routing goes on from memory), lost (the \
             database file was deleted or replaced; no change is taken until a restart)",
            states,
        );
        now.register(
            "llm_router_storage_errors",
            "Writes the database could not make (disk full, I/O error); each was undone and its caller told",
            ConstCounter::new(storage_faults),
        );
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &now)
            .and_then(|()| encode_registry(&mut out, &self.registry))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

#[cfg(test)]
#[path = "../tests/api/exposition.rs"]
mod exposition;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::exposition::{Exposition, parse};
    use super::*;

    pub(super) fn scrape(metrics: &Metrics, nodes: &HashMap<NodeStatus, usize>, storage_faults: u64) -> Exposition {
        let text = metrics.render(nodes, storage_faults, Availability::Available);
        parse(&text).unwrap_or_else(|error| panic!("{error} in:\n{text}"))
    }

    #[test]
    fn every_family_keeps_its_name_and_type() {
        let metrics = Metrics::default();
        metrics.request("GET", "/healthz", 200, Duration::from_millis(1));
        Metrics::inc(&metrics.registrations);
        Metrics::inc(&metrics.header_timeouts);
        metrics.transition(NodeStatus::Online);
        metrics.connections_max.set(64);
        // Families labelled by model appear with the first request for a model.
        metrics.inference.model("m").answered(200);
        let scraped = scrape(&metrics, &HashMap::new(), 3);
        let expected = [
            ("llm_router_nodes", "gauge"),
            ("llm_router_database", "gauge"),
            ("llm_router_storage_errors", "counter"),
            ("llm_router_registrations", "counter"),
            ("llm_router_heartbeats", "counter"),
            ("llm_router_approvals", "counter"),
            ("llm_router_deletions", "counter"),
            ("llm_router_flush_errors", "counter"),
            ("llm_router_logins_throttled", "counter"),
            ("llm_router_password_hashes_refused", "counter"),
            ("llm_router_registrations_rate_limited", "counter"),
            ("llm_router_join_tokens_unknown", "counter"),
            ("llm_router_join_tokens_throttled", "counter"),
            ("llm_router_registrations_too_many_pending", "counter"),
            ("llm_router_pending_expired", "counter"),
            ("llm_router_audit_dropped", "counter"),
            ("llm_router_credentials_remembered", "counter"),
            ("llm_router_mass_silences", "counter"),
            ("llm_router_mass_silence", "gauge"),
            ("llm_router_sweep_lease", "gauge"),
            ("llm_router_http_connections_evicted", "counter"),
            ("llm_router_http_connections_refused", "counter"),
            ("llm_router_http_connections_source_capped", "counter"),
            ("llm_router_http_connections_open", "gauge"),
            ("llm_router_http_connections_max", "gauge"),
            ("llm_router_http_connection_timeouts", "counter"),
            ("llm_router_status_changes", "counter"),
            ("llm_router_flush_batch_size", "histogram"),
            ("llm_router_flush_lag_seconds", "histogram"),
            ("llm_router_offline_sweep_seconds", "histogram"),
            ("llm_router_http_requests", "counter"),
            ("llm_router_http_request_duration_seconds", "histogram"),
            ("llm_router_inference_requests", "counter"),
            ("llm_router_inference_routed", "counter"),
            ("llm_router_inference_upstream_headers_seconds", "histogram"),
            ("llm_router_inference_first_byte_seconds", "histogram"),
            ("llm_router_inference_retries", "counter"),
            ("llm_router_inference_ejections", "counter"),
            ("llm_router_inference_queued", "gauge"),
            ("llm_router_tokens", "counter"),
            ("llm_router_rate_limited", "counter"),
            ("llm_router_usage_records_written", "gauge"),
            ("llm_router_usage_records_lost", "gauge"),
            ("llm_router_usage_records_pending", "gauge"),
            ("llm_router_deployment_replicas", "gauge"),
            ("llm_router_assignment_waits", "gauge"),
        ];
        for (family, kind) in expected {
            assert_eq!(scraped.types.get(family).map(String::as_str), Some(kind), "{family}");
        }
        assert_eq!(scraped.types.len(), expected.len(), "{:?}", scraped.types);
        assert_eq!(scraped.value("llm_router_storage_errors_total", &[]), Some(3.0));
        assert_eq!(scraped.value("llm_router_rate_limited_total", &[("reason", "tokens_per_day")]), Some(0.0));
        assert_eq!(scraped.value("llm_router_registrations_total", &[]), Some(1.0));
        assert_eq!(scraped.value("llm_router_heartbeats_total", &[]), Some(0.0));
        assert_eq!(scraped.value("llm_router_http_connections_max", &[]), Some(64.0));
        assert_eq!(scraped.value("llm_router_http_connection_timeouts_total", &[("kind", "header")]), Some(1.0));
        assert_eq!(scraped.value("llm_router_http_connection_timeouts_total", &[("kind", "idle")]), Some(0.0));
        assert_eq!(scraped.value("llm_router_status_changes_total", &[("to", "online")]), Some(1.0));
        assert_eq!(scraped.samples("llm_router_status_changes_total").count(), NodeStatus::ALL.len());
        assert_eq!(
            scraped.value("llm_router_inference_requests_total", &[("model", "m"), ("class", "2xx")]),
            Some(1.0)
        );
        assert_eq!(scraped.samples("llm_router_inference_requests_total").count(), 5, "every class, from the start");
    }
}
