//! Inference figures (SPEC §8), by model and never by node: answers by status class, time to the upstream's
//! headers, time to the first byte of the answer, retries, ejections, and the queue's length. A node's own figures
//! are in its JSON; a series per node would multiply with the fleet.
//!
//! Only models some node has ready get series: a request naming an unknown model is counted by the HTTP metrics of
//! its route, so a client cannot create series by inventing names.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};

use super::{Histogram, Level};

/// Buckets of inference latencies, in seconds: a non-streamed answer's headers come after the whole generation.
const INFERENCE_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How a request's node was chosen (SPEC §13), as `routing::Outcome` names it.
pub const HOW_ROUTED: [&str; 6] = ["affinity", "spilled", "no_prefix", "new_prefix", "least_loaded", "trial"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabels {
    model: String,
    how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyTokenLabels {
    principal: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The limits a request can be refused by (SPEC §14), as `rate_limited_total`'s `reason`.
pub const LIMIT_REASONS: [&str; 4] = ["requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    model: String,
    class: &'static str,
}

fn inference_histogram() -> Histogram {
    Histogram::new(INFERENCE_BUCKETS)
}

/// The families of the inference figures, and the handles of each model taken from them once.
pub struct InferenceMetrics {
    answers: Family<ClassLabels, Counter>,
    routed: Family<HowLabels, Counter>,
    upstream_headers: Family<ModelLabel, Histogram, fn() -> Histogram>,
    first_byte: Family<ModelLabel, Histogram, fn() -> Histogram>,
    retries: Family<ModelLabel, Counter>,
    ejections: Family<ModelLabel, Counter>,
    /// Requests waiting for a node below its `max_concurrency` (set when scraped).
    pub queued: Level,
    tokens: Family<TokenLabels, Counter>,
    tokens_by_key: Family<KeyTokenLabels, Counter>,
    /// Series per principal too (`--metrics-per-key`).
    pub per_key: std::sync::atomic::AtomicBool,
    rate_limited: [Counter; 4],
    /// Usage records written, lost (too many waited while the storage was down), and waiting (set when scraped).
    pub usage_written: Level,
    pub usage_lost: Level,
    pub usage_pending: Level,
    by_model: RwLock<HashMap<Box<str>, Arc<ModelMetrics>>>,
}

/// The inference figures of one model.
pub struct ModelMetrics {
    answers: [Counter; 5],
    routed: [Counter; 6],
    /// From sending a request to a node to its answer's headers, for answers that came.
    pub upstream_headers: Histogram,
    /// From the request's arrival to the first byte of the answer's body leaving the router.
    pub first_byte: Histogram,
    /// Tries on another node after a failure before the first byte.
    pub retries: Counter,
    /// Nodes ejected from routing by a failure of a request for this model.
    pub ejections: Counter,
    /// Tokens of its answers, as the runtimes' `usage` reported them.
    prompt_tokens: Counter,
    completion_tokens: Counter,
}

impl ModelMetrics {
    /// Counts an answer to the client, by its status class: the node's, or the router's own 429 or 503.
    pub fn answered(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.answers[class].inc();
    }

    /// Counts a request sent to a node, by how the node was chosen (one of [`HOW_ROUTED`]).
    pub fn routed(&self, how: &str) {
        if let Some(at) = HOW_ROUTED.iter().position(|name| *name == how) {
            self.routed[at].inc();
        }
    }
}

impl InferenceMetrics {
    /// Counts an answer's tokens: by model, and by principal with `--metrics-per-key`.
    pub fn tokens(&self, model: &str, principal: &str, tokens: crate::model::usage::Tokens) {
        let figures = self.model(model);
        figures.prompt_tokens.inc_by(tokens.prompt);
        figures.completion_tokens.inc_by(tokens.completion);
        if self.per_key.load(std::sync::atomic::Ordering::Relaxed) {
            for (kind, count) in [("prompt", tokens.prompt), ("completion", tokens.completion)] {
                self.tokens_by_key
                    .get_or_create(&KeyTokenLabels { principal: principal.to_owned(), kind })
                    .inc_by(count);
            }
        }
    }

    /// Counts a request refused by a limit.
    pub fn rate_limited(&self, reason: &str) {
        if let Some(at) = LIMIT_REASONS.iter().position(|name| *name == reason) {
            self.rate_limited[at].inc();
        }
    }

    pub(super) fn register(registry: &mut Registry) -> Self {
        let answers = Family::<ClassLabels, Counter>::default();
        registry.register(
            "llm_router_inference_requests",
            "Inference requests answered, by model and status class (the node's answer, or the router's 429 or 503)",
            answers.clone(),
        );
        let routed = Family::<HowLabels, Counter>::default();
        registry.register(
            "llm_router_inference_routed",
            "Inference requests sent to a node, by model and how the node was chosen (SPEC §13): `affinity` (the \
             node its prefix or session ranks first), `spilled` (another one: the first was over the load bound, \
             full, ejected or tried), `no_prefix` (nothing to follow: the least loaded of two), `new_prefix` (the \
             first request of its prefix here lately: the least loaded of two), `least_loaded` (the policy), \
             `trial` (the one request after an ejection)",
            routed.clone(),
        );
        let upstream_headers = Family::new_with_constructor(inference_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "llm_router_inference_upstream_headers",
            "Time from sending an inference request to a node to its answer's headers, by model",
            Unit::Seconds,
            upstream_headers.clone(),
        );
        let first_byte = Family::new_with_constructor(inference_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "llm_router_inference_first_byte",
            "Time from an inference request's arrival to the first byte of its answer's body leaving the router, \
             by model",
            Unit::Seconds,
            first_byte.clone(),
        );
        let retries = Family::<ModelLabel, Counter>::default();
        registry.register(
            "llm_router_inference_retries",
            "Inference requests tried again on another node after a failure before the first byte, by model",
            retries.clone(),
        );
        let ejections = Family::<ModelLabel, Counter>::default();
        registry.register(
            "llm_router_inference_ejections",
            "Nodes ejected from routing after failures, by the model of the request that failed",
            ejections.clone(),
        );
        let queued = Level::default();
        registry.register(
            "llm_router_inference_queued",
            "Inference requests waiting for a node below its max_concurrency",
            queued.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "llm_router_tokens",
            "Tokens of inference answers as the runtimes' usage reported them, by model and kind (prompt, completion)",
            tokens.clone(),
        );
        let tokens_by_key = Family::<KeyTokenLabels, Counter>::default();
        registry.register(
            "llm_router_principal_tokens",
            "Tokens of inference answers by principal (key:<id>, user:<name>, anonymous) and kind; only with \
             --metrics-per-key",
            tokens_by_key.clone(),
        );
        let limited = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "llm_router_rate_limited",
            "Inference requests refused by a key's or user's limit, by the limit (SPEC §14)",
            limited.clone(),
        );
        let rate_limited = LIMIT_REASONS.map(|reason| limited.get_or_create_owned(&ReasonLabel { reason }));
        let usage_written = Level::default();
        registry.register(
            "llm_router_usage_records_written",
            "Inference request records written to the storage since the start",
            usage_written.clone(),
        );
        let usage_lost = Level::default();
        registry.register(
            "llm_router_usage_records_lost",
            "Inference request records lost since the start: more waited to be written than the router keeps while \
             its storage fails",
            usage_lost.clone(),
        );
        let usage_pending = Level::default();
        registry.register(
            "llm_router_usage_records_pending",
            "Inference request records waiting to be written",
            usage_pending.clone(),
        );
        InferenceMetrics {
            tokens,
            tokens_by_key,
            per_key: std::sync::atomic::AtomicBool::new(false),
            rate_limited,
            usage_written,
            usage_lost,
            usage_pending,
            answers,
            routed,
            upstream_headers,
            first_byte,
            retries,
            ejections,
            queued,
            by_model: RwLock::new(HashMap::new()),
        }
    }

    /// The figures of `model`, created on its first request.
    pub fn model(&self, model: &str) -> Arc<ModelMetrics> {
        if let Some(found) = self.by_model.read().unwrap_or_else(|p| p.into_inner()).get(model) {
            return found.clone();
        }
        let mut by_model = self.by_model.write().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = by_model.get(model) {
            return found.clone();
        }
        let label = ModelLabel { model: model.to_owned() };
        let created = Arc::new(ModelMetrics {
            answers: CLASSES
                .map(|class| self.answers.get_or_create_owned(&ClassLabels { model: model.to_owned(), class })),
            routed: HOW_ROUTED.map(|how| self.routed.get_or_create_owned(&HowLabels { model: model.to_owned(), how })),
            upstream_headers: self.upstream_headers.get_or_create_owned(&label),
            first_byte: self.first_byte.get_or_create_owned(&label),
            retries: self.retries.get_or_create_owned(&label),
            ejections: self.ejections.get_or_create_owned(&label),
            prompt_tokens: self.tokens.get_or_create_owned(&TokenLabels { model: model.to_owned(), kind: "prompt" }),
            completion_tokens: self
                .tokens
                .get_or_create_owned(&TokenLabels { model: model.to_owned(), kind: "completion" }),
        });
        by_model.insert(model.into(), created.clone());
        created
    }
}
