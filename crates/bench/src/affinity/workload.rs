//! What `bench affinity` asks, and how: the prompts of each workload, and an open-loop run that sends them through
//! one or more routers and times each one's first token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::runtime::BYTES_PER_TOKEN;
use crate::http::encode_request;
use crate::openloop;
use crate::proxy::MODEL;
use crate::sse::StreamClient;
use crate::standin::monotonic_ns;

/// Longest a request may take before it is abandoned and counted as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A workload of `bench affinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// `--prefixes` long system prompts, one chosen at random for each request, and a fresh question.
    Shared,
    /// Every request a prompt of its own.
    Fresh,
    /// One system prompt in `--hot-share` of the requests, the others as in `shared`.
    Hot,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Shared => "shared",
            Workload::Fresh => "fresh",
            Workload::Hot => "hot",
        }
    }
}

/// The prompts a workload is made of.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub workload: Workload,
    pub prefixes: Vec<String>,
    pub question_tokens: usize,
    pub fresh_tokens: usize,
    pub hot_share: f64,
    /// Makes the questions and the choices of one run differ from another's.
    pub seed: u64,
}

impl Prompts {
    /// `count` system prompts of `tokens` tokens, each different from its first word.
    pub fn system_prompts(count: usize, tokens: usize) -> Vec<String> {
        (0..count)
            .map(|p| text(&format!("System prompt {p}. You are agent {p} of the fleet."), p as u64, tokens))
            .collect()
    }

    /// The body of request `i`: a streamed chat completion.
    pub fn body(&self, i: u64) -> Vec<u8> {
        let draw = mix(self.seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let question = || text(&format!("Question {i}:"), draw, self.question_tokens);
        let messages = match self.workload {
            Workload::Fresh => {
                serde_json::json!([{"role": "user", "content": text(&format!("Request {i}:"), draw, self.fresh_tokens)}])
            }
            Workload::Shared | Workload::Hot => {
                let prefix = self.prefix_of(draw);
                serde_json::json!([
                    {"role": "system", "content": self.prefixes[prefix]},
                    {"role": "user", "content": question()},
                ])
            }
        };
        let body = serde_json::json!({"model": MODEL, "stream": true, "max_tokens": 16, "messages": messages});
        body.to_string().into_bytes()
    }

    /// Which system prompt a request with `draw` carries.
    fn prefix_of(&self, draw: u64) -> usize {
        let n = self.prefixes.len() as u64;
        let pick = mix(draw);
        match self.workload {
            Workload::Hot if n > 1 => {
                let share = (draw >> 11) as f64 / (1u64 << 53) as f64;
                if share < self.hot_share { 0 } else { 1 + (pick % (n - 1)) as usize }
            }
            _ => (pick % n) as usize,
        }
    }
}

/// SplitMix64's finalizer: a well-mixed 64-bit value from any other.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `lead`, then words drawn from `seed`, to `tokens` tokens of text.
fn text(lead: &str, seed: u64, tokens: usize) -> String {
    const WORDS: [&str; 32] = [
        "the", "fleet", "model", "answer", "token", "cache", "prompt", "node", "request", "router", "policy", "share",
        "memory", "queue", "serve", "user", "agent", "document", "context", "retrieve", "summary", "order", "client",
        "batch", "latency", "budget", "tenant", "region", "replica", "stream", "slot", "kernel",
    ];
    let bytes = tokens * BYTES_PER_TOKEN;
    let mut out = String::with_capacity(bytes + 16);
    out.push_str(lead);
    let mut state = seed;
    while out.len() < bytes {
        state = mix(state);
        out.push(' ');
        out.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    out.truncate(bytes.max(lead.len()));
    out
}

/// One request of a run, as answered.
#[derive(Debug, Clone)]
pub struct Record {
    pub due_ns: u64,
    /// When its first event arrived.
    pub first_ns: Option<u64>,
    pub end_ns: u64,
    pub outcome: Result<(), String>,
}

/// Sends `count` requests at `rate` (request `i` due at `i / rate`, whatever the answers before it did), request `i`
/// to router `i mod routers`, over `connections` workers; returns every request's record and the run's start.
pub async fn run(
    routers: &[SocketAddr],
    rate: f64,
    count: u64,
    connections: usize,
    prompts: Arc<Prompts>,
) -> anyhow::Result<(u64, Vec<Record>)> {
    let hosts: Arc<Vec<(SocketAddr, String)>> = Arc::new(routers.iter().map(|&a| (a, a.to_string())).collect());
    let run = openloop::start(rate, count, connections, |schedule| {
        let (prompts, hosts) = (prompts.clone(), hosts.clone());
        async move {
            let mut clients: Vec<StreamClient> = hosts.iter().map(|(addr, _)| StreamClient::new(*addr)).collect();
            let mut records = Vec::new();
            while let Some(i) = schedule.next().await {
                let k = (i % hosts.len() as u64) as usize;
                let headers = [("Content-Type", "application/json")];
                let request = encode_request("POST", "/v1/chat/completions", &hosts[k].1, &headers, &prompts.body(i));
                let (first_ns, outcome) = match clients[k].send_within(&request, true, REQUEST_TIMEOUT).await {
                    Ok(exchange) if exchange.status == 200 && exchange.done && !exchange.events.is_empty() => {
                        (Some(exchange.events[0].recv_ns), Ok(()))
                    }
                    Ok(exchange) => (None, Err(format!("HTTP {}", exchange.status))),
                    Err(label) => (None, Err(label)),
                };
                records.push(Record { due_ns: schedule.due(i), first_ns, end_ns: monotonic_ns(), outcome });
            }
            records
        }
    })?;
    let start_ns = run.start_ns;
    Ok((start_ns, run.finish().await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(workload: Workload) -> Prompts {
        Prompts {
            workload,
            prefixes: Prompts::system_prompts(10, 512),
            question_tokens: 16,
            fresh_tokens: 256,
            hot_share: 0.6,
            seed: 7,
        }
    }

    fn messages(body: &[u8]) -> Vec<(String, String)> {
        let json: serde_json::Value = serde_json::from_slice(body).expect("JSON");
        assert_eq!((json["model"].as_str(), json["stream"].as_bool()), (Some(MODEL), Some(true)));
        let list = json["messages"].as_array().expect("messages");
        let text = |value: &serde_json::Value| value.as_str().expect("a string").to_owned();
        list.iter().map(|m| (text(&m["role"]), text(&m["content"]))).collect()
    }

    #[test]
    fn system_prompts_have_their_length_and_differ_from_the_first_bytes() {
        let all = Prompts::system_prompts(10, 512);
        assert!(all.iter().all(|p| p.len() == 512 * BYTES_PER_TOKEN));
        for (a, b) in all.iter().zip(all.iter().skip(1)) {
            assert_ne!(a[..20], b[..20]);
        }
    }

    #[test]
    fn shared_requests_carry_every_prefix_evenly_with_a_question_of_their_own() {
        let shared = prompts(Workload::Shared);
        let mut seen = vec![0u32; 10];
        let mut questions = std::collections::HashSet::new();
        for i in 0..5000 {
            let m = messages(&shared.body(i));
            assert_eq!((m[0].0.as_str(), m[1].0.as_str()), ("system", "user"));
            seen[shared.prefixes.iter().position(|p| *p == m[0].1).expect("a known prefix")] += 1;
            assert_eq!(m[1].1.len(), 16 * BYTES_PER_TOKEN);
            questions.insert(m[1].1.clone());
        }
        assert_eq!(questions.len(), 5000);
        assert!(seen.iter().all(|&n| (400..=600).contains(&n)), "{seen:?}");
        // The same request is the same bytes: both policies are sent the same run.
        assert_eq!(shared.body(42), shared.body(42));
    }

    #[test]
    fn the_hot_prefix_carries_its_share() {
        let hot = prompts(Workload::Hot);
        let first = (0..5000).filter(|&i| messages(&hot.body(i))[0].1 == hot.prefixes[0]).count();
        assert!((2850..=3150).contains(&first), "{first}");
    }

    #[test]
    fn fresh_requests_share_nothing() {
        let fresh = prompts(Workload::Fresh);
        let (a, b) = (messages(&fresh.body(1)), messages(&fresh.body(2)));
        assert_eq!((a.len(), a[0].0.as_str()), (1, "user"));
        assert_eq!(a[0].1.len(), 256 * BYTES_PER_TOKEN);
        assert_ne!(a[0].1[..12], b[0].1[..12]);
    }
}
