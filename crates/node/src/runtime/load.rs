//! The runtime's own load (SPEC §13): how many requests it computes now, how many wait in its queue, and how full
//! its KV cache is, read from its Prometheus `/metrics` at each heartbeat.
//!
//! | figure | vLLM | llama.cpp server (`--metrics`) | SGLang (`--enable-metrics`) |
//! |---|---|---|---|
//! | `running` | `vllm:num_requests_running` | `llamacpp:requests_processing` | `sglang:num_running_reqs` |
//! | `waiting` | `vllm:num_requests_waiting` | `llamacpp:requests_deferred` | `sglang:num_queue_reqs` |
//! | `kv_cache_usage` | `vllm:kv_cache_usage_perc`, else the older `vllm:gpu_cache_usage_perc` | `llamacpp:kv_cache_usage_ratio` | `sglang:token_usage` |
//!
//! A metric may come in several label sets: vLLM gives one per engine (data parallel), SGLang one per
//! data-parallel rank. Counts are summed over them, the KV cache share averaged (each engine has its own cache of
//! the same size). SGLang labels its figures with `tp_rank` and `pp_rank` too; the ranks of one scheduler see the
//! same requests, so only rank 0's figures count. vLLM's `_perc` is a fraction (0..=1) despite its name, as are
//! llama.cpp's ratio and SGLang's token usage. Counts are rounded and bounded to what the router accepts
//! ([`MAX_COUNT`]), the share to 0..=1; NaN and infinities are ignored; a figure no metric gives is left out.
//!
//! A runtime without `/metrics` (Ollama, llama-cpp-python, llama.cpp without `--metrics`) answers 404 or 501:
//! heartbeats then go without `load`, and [`LoadProbe`] asks again only after [`UNSERVED_RETRY`]. Reading the
//! metrics never fails a heartbeat.

use std::time::{Duration, Instant};

use llm_router_protocol::RuntimeLoad;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;

use super::{Runtime, endpoint, error_chain};

/// The largest request count the router accepts in a heartbeat's `load`.
pub use llm_router_protocol::MAX_REQUEST_COUNT as MAX_COUNT;
/// How long one read of `/metrics` may take: a heartbeat waits for it.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a `/metrics` answer that is read; a larger one is not read at all.
pub const MAX_METRICS_BYTES: usize = 8 << 20;
/// How long a runtime that serves no `/metrics` is left alone before it is asked again.
pub const UNSERVED_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figure {
    Running,
    Waiting,
    KvCache,
}

/// The metrics read, by figure; of two names that give the same figure, the one listed first wins.
const METRICS: [(&str, Figure); 10] = [
    ("vllm:num_requests_running", Figure::Running),
    ("vllm:num_requests_waiting", Figure::Waiting),
    ("vllm:kv_cache_usage_perc", Figure::KvCache),
    ("vllm:gpu_cache_usage_perc", Figure::KvCache),
    ("llamacpp:requests_processing", Figure::Running),
    ("llamacpp:requests_deferred", Figure::Waiting),
    ("llamacpp:kv_cache_usage_ratio", Figure::KvCache),
    ("sglang:num_running_reqs", Figure::Running),
    ("sglang:num_queue_reqs", Figure::Waiting),
    ("sglang:token_usage", Figure::KvCache),
];

/// Labels whose non-zero values mark a copy of rank 0's figures (SGLang's tensor and pipeline parallel ranks).
const REPLICA_LABELS: [&str; 2] = ["tp_rank", "pp_rank"];

/// The sum and number of the finite values of one metric over its label sets.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    sum: f64,
    count: u32,
}

/// The load in a Prometheus text exposition, or `None` when it holds none of the metrics read.
pub fn parse(text: &str) -> Option<RuntimeLoad> {
    let mut tallies = [Tally::default(); METRICS.len()];
    for line in text.lines() {
        if let Some((metric, value)) = sample(line) {
            let tally = &mut tallies[metric];
            tally.sum += value;
            tally.count += 1;
        }
    }
    let load = RuntimeLoad {
        running: first(&tallies, Figure::Running).map(count),
        waiting: first(&tallies, Figure::Waiting).map(count),
        kv_cache_usage: first(&tallies, Figure::KvCache).map(share),
    };
    (load != RuntimeLoad::default()).then_some(load)
}

/// The tally of the first metric giving `figure` that has a value.
fn first(tallies: &[Tally], figure: Figure) -> Option<Tally> {
    METRICS.iter().zip(tallies).find(|((_, f), t)| *f == figure && t.count > 0).map(|(_, t)| *t)
}

/// A count of requests: the sum over label sets, rounded, within 0..=[`MAX_COUNT`].
fn count(tally: Tally) -> u32 {
    // Bounded first, so the cast is exact.
    tally.sum.round().clamp(0.0, f64::from(MAX_COUNT)) as u32
}

/// A share of the KV cache: the mean over label sets, within 0..=1.
fn share(tally: Tally) -> f64 {
    (tally.sum / f64::from(tally.count)).clamp(0.0, 1.0)
}

/// One sample line of a metric read: its index in [`METRICS`] and its finite value. Comments (`# HELP`, `# TYPE`),
/// other metrics, replicas of rank 0 and lines that do not parse give `None`.
fn sample(line: &str) -> Option<(usize, f64)> {
    let line = line.trim();
    if line.starts_with('#') {
        return None;
    }
    let name_len = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
    let (name, rest) = line.split_at(name_len);
    let metric = METRICS.iter().position(|(known, _)| *known == name)?;
    let rest = match rest.strip_prefix('{') {
        Some(inside) => {
            let (labels, after) = labels(inside)?;
            if labels.iter().any(|(label, value)| REPLICA_LABELS.contains(label) && value != "0") {
                return None;
            }
            after
        }
        None => rest,
    };
    // The value, then an optional timestamp; at least one blank between the name or labels and the value.
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((metric, value))
}

/// The labels of a sample, from just after its `{`: each name with its unescaped value, and the text after the `}`.
/// `None` when they do not parse.
fn labels(mut text: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start();
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let name_len = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len());
        let (name, rest) = text.split_at(name_len);
        if name.is_empty() {
            return None;
        }
        let rest = rest.trim_start().strip_prefix('=')?.trim_start().strip_prefix('"')?;
        let (value, rest) = quoted(rest)?;
        labels.push((name, value));
        let rest = rest.trim_start();
        text = match rest.strip_prefix(',') {
            Some(after) => after,
            None if rest.starts_with('}') => rest,
            // Neither a comma nor the end of the labels after a value.
            None => return None,
        };
    }
}

/// A label value from just after its opening quote: the value with `\\`, `\"` and `\n` unescaped, and the text
/// after the closing quote.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[at + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
    None
}

/// Why the runtime's load could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The runtime has no `/metrics`, has it switched off (llama.cpp without `--metrics` answers 501) or keeps it
    /// behind a key the agent does not hold.
    #[error("the runtime serves no /metrics at {url} (HTTP {status})")]
    NotServed { url: String, status: u16 },
    /// The runtime did not answer, answered an error, or answered something too large.
    #[error("the runtime's /metrics at {url} is unreadable: {cause}")]
    Unreadable { url: String, cause: String },
}

/// Answers that say the runtime has no metrics to give this agent, rather than that it failed this time.
fn not_served(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED
    )
}

impl Runtime {
    /// `GET {runtime}/metrics`: the runtime's Prometheus text, within [`METRICS_TIMEOUT`] and
    /// [`MAX_METRICS_BYTES`].
    pub async fn metrics(&self) -> Result<String, LoadError> {
        let url = endpoint(&self.base, "metrics");
        let shown = url.to_string();
        let unreadable = |cause: String| LoadError::Unreadable { url: shown.clone(), cause };
        // Plain text, not OpenMetrics, from servers that negotiate (prometheus_client's).
        let mut response = self
            .http
            .get(url)
            .header(ACCEPT, "text/plain")
            .timeout(METRICS_TIMEOUT)
            .send()
            .await
            .map_err(|e| unreadable(error_chain(&e)))?;
        let status = response.status();
        if not_served(status) {
            return Err(LoadError::NotServed { url: shown, status: status.as_u16() });
        }
        if !status.is_success() {
            return Err(unreadable(format!("HTTP {}", status.as_u16())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| unreadable(error_chain(&e)))? {
            if body.len() + chunk.len() > MAX_METRICS_BYTES {
                return Err(unreadable(format!("larger than {MAX_METRICS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// What the last read gave, to log only changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Read,
    NoneKnown,
    NotServed,
    Unreadable,
}

/// The load of several runtimes of one node as one: requests running and waiting summed, the fullest KV cache.
/// `None` when none of them reported a load.
pub fn combine(loads: impl IntoIterator<Item = RuntimeLoad>) -> Option<RuntimeLoad> {
    let mut all: Option<RuntimeLoad> = None;
    for load in loads {
        let sum = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            (a, b) => a.or(b),
        };
        all = Some(match all {
            None => load,
            Some(so_far) => RuntimeLoad {
                running: sum(so_far.running, load.running),
                waiting: sum(so_far.waiting, load.waiting),
                kv_cache_usage: match (so_far.kv_cache_usage, load.kv_cache_usage) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                },
            },
        });
    }
    all
}

/// Reads the runtime's load at each heartbeat, leaving a runtime that serves no `/metrics` alone for a while.
#[derive(Debug)]
pub struct LoadProbe {
    retry_unserved: Duration,
    unserved_until: Option<Instant>,
    last: Option<Outcome>,
}

impl LoadProbe {
    /// A probe that asks a runtime without `/metrics` again after [`UNSERVED_RETRY`].
    pub fn new() -> Self {
        Self::retrying_after(UNSERVED_RETRY)
    }

    /// A probe that asks a runtime without `/metrics` again after `retry_unserved`.
    pub fn retrying_after(retry_unserved: Duration) -> Self {
        LoadProbe { retry_unserved, unserved_until: None, last: None }
    }

    /// The runtime's load now, or `None` when it cannot be read (never an error: heartbeats go without it).
    pub async fn sample(&mut self, runtime: &Runtime) -> Option<RuntimeLoad> {
        if self.unserved_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        self.unserved_until = None;
        let (outcome, load) = match runtime.metrics().await {
            Ok(text) => match parse(&text) {
                Some(load) => (Outcome::Read, Some(load)),
                None => (Outcome::NoneKnown, None),
            },
            Err(e) => {
                let outcome = match e {
                    LoadError::NotServed { .. } => {
                        self.unserved_until = Some(Instant::now() + self.retry_unserved);
                        Outcome::NotServed
                    }
                    LoadError::Unreadable { .. } => Outcome::Unreadable,
                };
                self.note(outcome, || e.to_string());
                return None;
            }
        };
        self.note(outcome, String::new);
        load
    }

    /// Log what the read gave when it differs from the last one.
    fn note(&mut self, outcome: Outcome, why: impl FnOnce() -> String) {
        if self.last == Some(outcome) {
            return;
        }
        self.last = Some(outcome);
        match outcome {
            Outcome::Read => tracing::info!("runtime load read from its /metrics; heartbeats carry it"),
            Outcome::NoneKnown => tracing::info!(
                "the runtime's /metrics has none of the load metrics of vLLM, llama.cpp or SGLang; heartbeats go \
                 without load"
            ),
            Outcome::NotServed => tracing::info!(
                cause = %why(),
                retry_in_secs = self.retry_unserved.as_secs_f64(),
                "heartbeats go without the runtime's load"
            ),
            Outcome::Unreadable => tracing::debug!(cause = %why(), "heartbeat without the runtime's load"),
        }
    }
}

impl Default for LoadProbe {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loads_of_a_node_s_runtimes_add_up_and_the_fullest_cache_counts() {
        let a = RuntimeLoad { running: Some(3), waiting: Some(1), kv_cache_usage: Some(0.25) };
        let b = RuntimeLoad { running: Some(2), waiting: None, kv_cache_usage: Some(0.75) };
        let c = RuntimeLoad { running: None, waiting: Some(4), kv_cache_usage: None };
        assert_eq!(
            combine([a, b, c]),
            Some(RuntimeLoad { running: Some(5), waiting: Some(5), kv_cache_usage: Some(0.75) })
        );
        assert_eq!(combine([a]), Some(a));
        assert_eq!(combine([]), None);
    }
    use proptest::prelude::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const VLLM: &str = include_str!("../../tests/fixtures/metrics/vllm.txt");
    const LLAMA_CPP: &str = include_str!("../../tests/fixtures/metrics/llama_cpp.txt");
    const SGLANG: &str = include_str!("../../tests/fixtures/metrics/sglang.txt");

    fn load(running: Option<u32>, waiting: Option<u32>, kv_cache_usage: Option<f64>) -> Option<RuntimeLoad> {
        Some(RuntimeLoad { running, waiting, kv_cache_usage })
    }

    #[test]
    fn vllm_engines_are_summed_and_their_caches_averaged() {
        let expected = (0.4285714285714286 + 0.125) / 2.0;
        assert_eq!(parse(VLLM), load(Some(5), Some(7), Some(expected)));
    }

    #[test]
    fn llama_cpp_server_metrics_are_read() {
        assert_eq!(parse(LLAMA_CPP), load(Some(3), Some(2), Some(0.367493)));
    }

    #[test]
    fn sglang_metrics_are_read() {
        assert_eq!(parse(SGLANG), load(Some(162), Some(2826), Some(0.28)));
    }

    #[test]
    fn newer_llama_cpp_without_kv_cache_figure_reports_counts_only() {
        // How later llama.cpp servers print their gauges: no `kv_cache_usage_ratio`.
        let text = "# HELP llamacpp:requests_processing Number of requests processing\n\
                    # TYPE llamacpp:requests_processing gauge\n\
                    llamacpp:requests_processing 1\n\
                    # HELP llamacpp:requests_deferred Number of requests deferred\n\
                    # TYPE llamacpp:requests_deferred gauge\n\
                    llamacpp:requests_deferred 0\n";
        assert_eq!(parse(text), load(Some(1), Some(0), None));
    }

    #[test]
    fn older_vllm_kv_cache_metric_is_the_fallback() {
        let old = "vllm:num_requests_running{model_name=\"m\"} 1.0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(parse(old), load(Some(1), None, Some(0.5)));
        let both = "vllm:gpu_cache_usage_perc{engine=\"0\"} 0.9\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.25\n";
        assert_eq!(parse(both), load(None, None, Some(0.25)), "the current name wins");
    }

    #[test]
    fn missing_metrics_are_left_out_and_none_at_all_is_no_load() {
        assert_eq!(parse("sglang:num_queue_reqs{model_name=\"m\"} 4.0\n"), load(None, Some(4), None));
        assert_eq!(parse(""), None);
        assert_eq!(parse("# HELP up Whether it is up.\n# TYPE up gauge\nup 1\nprocess_open_fds 12\n"), None);
        // llama-cpp-python's example server: metrics, but none of these.
        assert_eq!(parse("batch_server:active_completions 2\nbatch_server:free_sequences 6\n"), None);
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let text = "garbage\n\
                    vllm:num_requests_running\n\
                    vllm:num_requests_running{engine=\"0\" 3\n\
                    vllm:num_requests_running{engine=\"0\"}3\n\
                    vllm:num_requests_running{engine=0} 3\n\
                    vllm:num_requests_running{engine=\"0\"} three\n\
                    vllm:num_requests_running_total{engine=\"0\"} 50\n\
                    vllm:num_requests_runningx 50\n\
                    {\"vllm:num_requests_running\"} 50\n\
                    \u{feff}\u{0}\u{7f}{}}}\"\"\n\
                    vllm:num_requests_running{engine=\"1\"} 4\n";
        assert_eq!(parse(text), load(Some(4), None, None));
    }

    #[test]
    fn label_sets_are_summed_whatever_their_values_hold() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
                    # TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"a \\\"quoted\\\" name, with {braces} \\\\\"} 2.0\n\
                    vllm:num_requests_waiting{ engine = \"1\" , model_name=\"line\\nbreak\", } 3.0\n\
                    vllm:num_requests_waiting{} 4\n\
                    vllm:num_requests_waiting 5\n";
        assert_eq!(parse(text), load(None, Some(14), None));
    }

    #[test]
    fn timestamps_exponents_and_odd_spacing_are_read() {
        let text = "sglang:num_running_reqs{model_name=\"m\"} 1.5e+01 1712345678901\n\
                    sglang:num_queue_reqs\t2E3\r\n\
                    sglang:token_usage{model_name=\"m\"}  +7.5e-1   -1\n";
        assert_eq!(parse(text), load(Some(15), Some(2000), Some(0.75)));
    }

    #[test]
    fn counts_are_rounded_and_bounded_and_shares_clamped() {
        let text = "vllm:num_requests_running{engine=\"0\"} 2.4\nvllm:num_requests_running{engine=\"1\"} 0.2\n\
                    vllm:num_requests_waiting 1e12\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 1.7\n";
        assert_eq!(parse(text), load(Some(3), Some(MAX_COUNT), Some(1.0)));
        let negative = "llamacpp:requests_processing -4\nllamacpp:kv_cache_usage_ratio -0.2\n";
        assert_eq!(parse(negative), load(Some(0), None, Some(0.0)));
        let text = "vllm:num_requests_running 1e300\nvllm:num_requests_waiting 4294967296\n";
        assert_eq!(parse(text), load(Some(MAX_COUNT), Some(MAX_COUNT), None));
    }

    #[test]
    fn nan_and_infinities_are_ignored() {
        let text = "vllm:num_requests_running{engine=\"0\"} NaN\nvllm:num_requests_running{engine=\"1\"} 2\n\
                    vllm:num_requests_waiting +Inf\nvllm:num_requests_waiting{engine=\"1\"} -inf\n\
                    llamacpp:kv_cache_usage_ratio nan\nllamacpp:kv_cache_usage_ratio inf\n";
        assert_eq!(parse(text), load(Some(2), None, None));
    }

    #[test]
    fn only_rank_zero_of_a_parallel_sglang_scheduler_counts() {
        let text = "sglang:num_running_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"m\",pp_rank=\"0\",tp_rank=\"0\"} 4.0\n\
                    sglang:num_running_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"m\",pp_rank=\"0\",tp_rank=\"1\"} 4.0\n\
                    sglang:num_running_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"m\",pp_rank=\"0\",tp_rank=\"0\"} 6.0\n\
                    sglang:num_running_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"m\",pp_rank=\"1\",tp_rank=\"0\"} 6.0\n";
        assert_eq!(parse(text), load(Some(10), None, None));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_stays_within_bounds(input in any::<String>()) {
            check_bounds(parse(&input));
        }

        #[test]
        fn parse_never_panics_on_near_miss_lines(
            lines in proptest::collection::vec(
                r#"(vllm:num_requests_running|sglang:token_usage|llamacpp:requests_deferred)[{}a-z_=", \\]{0,30}[ \t]?[-+0-9.eEnaNIf]{0,12}( [0-9]{0,14})?"#,
                0..8,
            )
        ) {
            check_bounds(parse(&lines.join("\n")));
        }
    }

    fn check_bounds(load: Option<RuntimeLoad>) {
        let Some(load) = load else { return };
        assert!(load.running.is_some() || load.waiting.is_some() || load.kv_cache_usage.is_some());
        assert!(load.running.is_none_or(|n| n <= MAX_COUNT));
        assert!(load.waiting.is_none_or(|n| n <= MAX_COUNT));
        assert!(load.kv_cache_usage.is_none_or(|share| (0.0..=1.0).contains(&share)));
    }

    /// A runtime answering `/metrics` with `status` and `body`, counting the requests it gets.
    fn serve(status: &'static str, body: &'static str) -> (Runtime, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                if head.split_whitespace().nth(1) == Some("/metrics") {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        let url = reqwest::Url::parse(&format!("http://{addr}")).expect("url");
        (Runtime::new(url, Duration::from_secs(2)).expect("client"), hits)
    }

    #[tokio::test]
    async fn a_runtime_serving_metrics_gives_its_load_at_every_read() {
        let (runtime, hits) = serve("200 OK", SGLANG);
        let mut probe = LoadProbe::new();
        assert_eq!(probe.sample(&runtime).await, load(Some(162), Some(2826), Some(0.28)));
        assert_eq!(probe.sample(&runtime).await, load(Some(162), Some(2826), Some(0.28)));
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_runtime_without_metrics_is_left_alone_for_a_while() {
        for status in ["404 Not Found", "501 Not Implemented", "401 Unauthorized"] {
            let (runtime, hits) = serve(status, r#"{"detail":"Not Found"}"#);
            let mut probe = LoadProbe::new();
            assert_eq!(probe.sample(&runtime).await, None);
            assert_eq!(probe.sample(&runtime).await, None);
            assert_eq!(hits.load(Ordering::SeqCst), 1, "{status}: asked once, not at every heartbeat");

            let mut eager = LoadProbe::retrying_after(Duration::ZERO);
            assert_eq!(eager.sample(&runtime).await, None);
            assert_eq!(eager.sample(&runtime).await, None);
            assert_eq!(hits.load(Ordering::SeqCst), 3, "{status}: asked again once the wait is over");
        }
    }

    #[tokio::test]
    async fn a_failing_runtime_is_asked_again_at_the_next_heartbeat() {
        let (runtime, hits) = serve("503 Service Unavailable", "loading");
        let mut probe = LoadProbe::new();
        assert_eq!(probe.sample(&runtime).await, None);
        assert_eq!(probe.sample(&runtime).await, None);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert!(matches!(runtime.metrics().await, Err(LoadError::Unreadable { .. })));

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let url = reqwest::Url::parse(&format!("http://{addr}")).expect("url");
        let down = Runtime::new(url, Duration::from_secs(2)).expect("client");
        assert_eq!(LoadProbe::new().sample(&down).await, None);
    }
}
