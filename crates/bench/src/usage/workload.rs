//! The requests `bench usage` pretends a fleet served: who sent them, to which model and node, when, and how each
//! ended. Every minute's requests are drawn from a generator seeded by the minute alone, so a minute is the same
//! whichever way it is written (as raw rows through the router's own storage code, or summed into roll-ups
//! directly) and in whatever order.
//!
//! - *When*: `--requests` spread over `--days` ending now, minute by minute, following a daily cycle (peak at 15:00
//!   UTC, 1.6 times the mean; trough at 03:00, 0.4 times) and quieter weekends (0.6).
//! - *Who*: `--principals` API keys, the k-th sending a share proportional to 1/k (Zipf: with 200 keys the first
//!   sends 17 % of everything, the last 0.09 %); each uses one to three models, mostly its first.
//! - *Which model*: `--models`, some more popular than others; each is served by `--nodes` / `--models` nodes (node
//!   i serves model i mod `--models`), and a request goes to one of its model's nodes at random.
//! - *How it ended*: 1 % refused by a limit (429, no node), 0.3 % no node available (503, no node), 0.2 % failed on
//!   the node (502), 0.5 % answered without usage from the runtime, the rest answered with usage; 60 % of requests
//!   (per key: 20 to 90 %) are streams with a time to first token.

use std::sync::Arc;

use llm_router::clock::Millis;
use llm_router::model::usage::{Step, Tokens, UsageRecord};
use uuid::Uuid;

pub const MINUTE_MS: Millis = 60_000;
pub const DAY_MS: Millis = 86_400_000;

/// Names of the first models; more than these are named `model-{i}`.
const MODEL_NAMES: [&str; 8] = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "Qwen/Qwen2.5-32B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "meta-llama/Llama-3.3-70B-Instruct",
    "Qwen/Qwen2.5-Coder-7B-Instruct",
    "google/gemma-2-9b-it",
    "BAAI/bge-m3",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B",
];

/// What the workload is made of.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub requests: u64,
    pub days: u32,
    pub principals: usize,
    pub models: usize,
    pub nodes: usize,
    pub seed: u64,
}

/// One tenant: its id and name as recorded, and its models with their cumulative shares.
#[derive(Debug, Clone)]
pub struct Principal {
    pub id: Arc<str>,
    pub name: Arc<str>,
    /// (model index, cumulative share up to and including it).
    pub models: Vec<(usize, f64)>,
    pub stream_share: f64,
    pub mean_prompt_tokens: f64,
}

/// The tenants, models and nodes, and how many requests each minute holds.
pub struct Workload {
    pub principals: Vec<Principal>,
    /// Cumulative share of the principals, in order.
    principal_cdf: Vec<f64>,
    pub models: Vec<Arc<str>>,
    pub nodes: Vec<Uuid>,
    /// Nodes serving each model.
    nodes_of: Vec<Vec<usize>>,
    /// The first minute (its start) and how many minutes the period has.
    pub start: Millis,
    pub minutes: u64,
    /// Requests per unit of [`weight`], so that the period holds `requests`.
    per_weight: f64,
    /// Sum of the weights of minutes `0..i`, for the period and two days past it (minutes written while the period
    /// is being written continue it).
    cumulative: Vec<f64>,
    seed: u64,
}

/// The weight of the minute starting at `at`: the daily cycle times the weekend's dip.
pub fn weight(at: Millis) -> f64 {
    let hours = at.rem_euclid(DAY_MS) as f64 / 3_600_000.0;
    let daily = 1.0 + 0.6 * (std::f64::consts::TAU * (hours - 15.0) / 24.0).cos();
    // 1970-01-01 was a Thursday: day 0 of the week is Sunday.
    let weekday = (at.div_euclid(DAY_MS) + 4).rem_euclid(7);
    let weekly = if weekday == 0 || weekday == 6 { 0.6 } else { 1.0 };
    daily * weekly
}

impl Workload {
    /// The workload of `shape` over the `days` before `end` (rounded down to a minute).
    pub fn new(shape: Shape, end: Millis) -> Workload {
        let end = Step::Minute.floor(end);
        let minutes = u64::from(shape.days) * 1440;
        let start = end - minutes as Millis * MINUTE_MS;
        let models: Vec<Arc<str>> = (0..shape.models)
            .map(|i| Arc::from(MODEL_NAMES.get(i).map_or_else(|| format!("model-{i}"), |name| (*name).to_owned())))
            .collect();
        let mut rng = Rng::new(shape.seed ^ 0x7e7a_7e7a);
        // Model j is picked 1/(j+1) as often as model 0 by a principal's first choice.
        let model_cdf = cdf((0..shape.models).map(|j| 1.0 / (j as f64 + 1.0)));
        let principals: Vec<Principal> = (0..shape.principals)
            .map(|k| {
                let count = (1 + rng.below(3) as usize).min(shape.models);
                let mut chosen: Vec<usize> = Vec::with_capacity(count);
                while chosen.len() < count {
                    let model = pick(&model_cdf, rng.unit());
                    if !chosen.contains(&model) {
                        chosen.push(model);
                    }
                }
                let shares: &[f64] = match count {
                    1 => &[1.0],
                    2 => &[0.75, 1.0],
                    _ => &[0.6, 0.9, 1.0],
                };
                Principal {
                    id: Arc::from(format!(
                        "key:{}",
                        Uuid::from_u128(0x7e7a_0000_0000_4000_8000_0000_0000_0000 | k as u128)
                    )),
                    name: Arc::from(format!("app-{k:03}")),
                    models: chosen.into_iter().zip(shares.iter().copied()).collect(),
                    stream_share: 0.2 + 0.7 * rng.unit(),
                    mean_prompt_tokens: 100.0 + 1900.0 * rng.unit(),
                }
            })
            .collect();
        let principal_cdf = cdf((0..shape.principals).map(|k| 1.0 / (k as f64 + 1.0)));
        let nodes: Vec<Uuid> =
            (0..shape.nodes).map(|i| Uuid::from_u128(0x0de0_0000_0000_4000_8000_0000_0000_0000 | i as u128)).collect();
        let nodes_of =
            (0..shape.models).map(|m| (0..shape.nodes).filter(|i| i % shape.models == m).collect()).collect();
        let mut cumulative = Vec::with_capacity(minutes as usize + 2 * 1440 + 1);
        let mut sum = 0.0;
        cumulative.push(sum);
        for i in 0..minutes + 2 * 1440 {
            sum += weight(start + i as Millis * MINUTE_MS);
            cumulative.push(sum);
        }
        let total_weight = cumulative[minutes as usize];
        Workload {
            principals,
            principal_cdf,
            models,
            nodes,
            nodes_of,
            start,
            minutes,
            per_weight: shape.requests as f64 / total_weight,
            cumulative,
            seed: shape.seed,
        }
    }

    /// The start of minute `i` of the period (any `i`: minutes past the period continue its pattern).
    pub fn minute(&self, i: u64) -> Millis {
        self.start + i as Millis * MINUTE_MS
    }

    /// Requests in minute `i`: the period's requests, shared by weight, rounded so that the minutes up to any point
    /// add up to the rounded share of that point (each minute rounded on its own would drift).
    pub fn count(&self, i: u64) -> u64 {
        match (self.cumulative.get(i as usize), self.cumulative.get(i as usize + 1)) {
            (Some(before), Some(after)) => {
                (after * self.per_weight).round() as u64 - (before * self.per_weight).round() as u64
            }
            // Far past the period: its share alone.
            _ => (weight(self.minute(i)) * self.per_weight).round() as u64,
        }
    }

    /// The records of minute `i`, in time order, appended to `out`.
    pub fn records(&self, i: u64, out: &mut Vec<UsageRecord>) {
        let count = self.count(i);
        let start = self.minute(i);
        // Seeds that follow each other would start sequences that overlap (SplitMix walks its state by a constant):
        // the minute's seed is mixed first.
        let mut rng = Rng::new(mix(self.seed ^ mix(i.wrapping_add(1))));
        out.reserve(count as usize);
        for n in 0..count {
            let at = start + (n as i64 * MINUTE_MS) / count as i64;
            out.push(self.request(at, &mut rng));
        }
    }

    /// One request at `at`.
    fn request(&self, at: Millis, rng: &mut Rng) -> UsageRecord {
        let principal = &self.principals[pick(&self.principal_cdf, rng.unit())];
        let share = rng.unit();
        let model = principal.models.iter().find(|(_, cum)| share < *cum).map_or(principal.models[0].0, |m| m.0);
        let nodes = &self.nodes_of[model];
        let node = self.nodes[nodes[rng.below(nodes.len() as u64) as usize]];
        let stream = rng.unit() < principal.stream_share;
        let outcome = rng.unit();
        let (status, node, answered) = match outcome {
            o if o < 0.010 => (429, None, false),
            o if o < 0.013 => (503, None, false),
            o if o < 0.015 => (502, Some(node), false),
            _ => (200, Some(node), true),
        };
        let tokens = (answered && outcome >= 0.020).then(|| Tokens {
            prompt: (principal.mean_prompt_tokens * (0.25 + 1.5 * rng.unit())) as u64,
            completion: 20 + rng.below(480),
        });
        let ttft_ms = (stream && answered).then(|| 30 + (rng.unit().powi(2) * 800.0) as u32);
        let duration_ms = match (answered, tokens) {
            (false, _) => 1 + rng.below(30) as u32,
            (true, Some(t)) => ttft_ms.unwrap_or(60) + t.completion as u32 * 12,
            (true, None) => ttft_ms.unwrap_or(60) + 2_000,
        };
        UsageRecord {
            at,
            principal: principal.id.clone(),
            principal_name: principal.name.clone(),
            model: self.models[model].clone(),
            node,
            status,
            tokens,
            ttft_ms,
            duration_ms,
            retries: u8::from(answered && rng.unit() < 0.01),
            stream,
        }
    }

    /// Index of `model` among the models.
    pub fn model_index(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| &**m == model)
    }
}

/// Cumulative shares of `weights`, normalised to end at 1.
fn cdf(weights: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut sum = 0.0;
    let mut out: Vec<f64> = weights
        .map(|w| {
            sum += w;
            sum
        })
        .collect();
    for value in &mut out {
        *value /= sum;
    }
    out
}

/// The index whose cumulative share first exceeds `u` (0 ≤ u < 1).
fn pick(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

/// SplitMix64's finaliser: a bijection of 64-bit values that scatters neighbours.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: small, fast and good enough for a benchmark's draws.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn shape(requests: u64, days: u32) -> Shape {
        Shape { requests, days, principals: 200, models: 8, nodes: 64, seed: 1 }
    }

    /// 2026-03-04 (a Wednesday) 00:00 UTC.
    const WEDNESDAY: Millis = 1_772_582_400_000;

    #[test]
    fn the_period_holds_the_requests_following_the_day_and_the_week() {
        let workload = Workload::new(shape(100_000_000, 30), WEDNESDAY + 12 * 3_600_000 + 59_999);
        assert_eq!(workload.minutes, 30 * 1440);
        assert_eq!(workload.minute(workload.minutes), WEDNESDAY + 12 * 3_600_000, "ends at the minute");
        let counts: Vec<u64> = (0..workload.minutes).map(|i| workload.count(i)).collect();
        assert_eq!(counts.iter().sum::<u64>(), 100_000_000);
        let at = |at: Millis| counts[((at - workload.start) / MINUTE_MS) as usize];
        // A weekday: 1.6 times the mean at 15:00, 0.4 times at 03:00; a Sunday 0.6 times that.
        let (peak, trough) = (at(WEDNESDAY - DAY_MS + 15 * 3_600_000), at(WEDNESDAY - DAY_MS + 3 * 3_600_000));
        assert!((peak as f64 / trough as f64 - 4.0).abs() < 0.01, "{peak} / {trough}");
        let sunday = at(WEDNESDAY - 3 * DAY_MS + 15 * 3_600_000);
        assert!((sunday as f64 / peak as f64 - 0.6).abs() < 0.01, "{sunday} / {peak}");
        // Past the period the pattern goes on.
        assert!(workload.count(workload.minutes + 10) > 0);
    }

    #[test]
    fn keys_send_zipf_shares_to_their_one_to_three_models_on_the_models_nodes() {
        let workload = Workload::new(shape(1_000_000, 1), WEDNESDAY);
        let mut records = Vec::new();
        for i in 0..workload.minutes {
            workload.records(i, &mut records);
        }
        assert_eq!(records.len(), 1_000_000);
        assert!(records.windows(2).all(|w| w[0].at <= w[1].at), "in time order");
        let mut by_principal: HashMap<&str, u64> = HashMap::new();
        for record in &records {
            *by_principal.entry(&record.principal).or_default() += 1;
            let principal = workload.principals.iter().find(|p| p.id == record.principal).expect("a known key");
            let model = workload.model_index(&record.model).expect("a known model");
            assert!(principal.models.iter().any(|(m, _)| *m == model), "a model of its key");
            if let Some(node) = record.node {
                let n = workload.nodes.iter().position(|id| *id == node).expect("a known node");
                assert_eq!(n % 8, model, "a node serving its model");
            }
        }
        // The k-th key's share is 1/k over H(200) = 5.878.
        let first = by_principal[&*workload.principals[0].id] as f64 / 1e6;
        let tenth = by_principal[&*workload.principals[9].id] as f64 / 1e6;
        assert!((first - 1.0 / 5.878).abs() < 0.005, "{first}");
        assert!((tenth - 0.1 / 5.878).abs() < 0.002, "{tenth}");
        assert_eq!(by_principal.len(), 200);
        for principal in &workload.principals {
            assert!((1..=3).contains(&principal.models.len()));
            let mut models: Vec<usize> = principal.models.iter().map(|(m, _)| *m).collect();
            models.dedup();
            assert_eq!(models.len(), principal.models.len(), "distinct models");
        }
        // How requests end: 1 % refused by a limit, 0.5 % failed, most answered with usage.
        let share = |f: &dyn Fn(&UsageRecord) -> bool| records.iter().filter(|r| f(r)).count() as f64 / 1e6;
        assert!((share(&|r| r.status == 429) - 0.01).abs() < 0.001);
        assert!((share(&|r| r.status >= 500) - 0.005).abs() < 0.001);
        assert!((share(&|r| r.status == 200 && r.tokens.is_none()) - 0.005).abs() < 0.001);
        assert!(share(&|r| r.node.is_none()) > 0.012);
        // The same minute drawn twice is the same.
        let (mut again, mut once) = (Vec::new(), Vec::new());
        workload.records(700, &mut once);
        workload.records(700, &mut again);
        assert_eq!(once, again);
    }
}
