//! `bench bodies`: a burst of large `/v1` request bodies at once, and what it does to the router's memory while it
//! lasts and after (issue: 20 bodies of 33,000,000 bytes took the router from 55 MB to 1,077 MB, and 266 MB stayed).
//! Each of `--clients` clients sends `--rounds` chat completions of `--body-bytes` bytes back-to-back on its own
//! connection, all at once; the model is one no node serves, so the router reads each body whole and answers 404
//! (or 503 when its body budget is full). The router's resident memory is sampled throughout, then for
//! `--settle-secs` after the burst.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::BodiesArgs;
use crate::http::{Client, encode_request};
use crate::router::RouterSpec;

/// How often the router's resident memory is read.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// What `bench bodies` reports.
#[derive(Debug, Serialize)]
pub struct BodiesReport {
    pub clients: usize,
    pub rounds: usize,
    pub body_bytes: usize,
    /// Answers by HTTP status (`error` for no answer).
    pub answers: BTreeMap<String, u64>,
    pub burst_secs: f64,
    pub rss_before_mb: f64,
    /// The highest resident size sampled during the burst.
    pub rss_max_sampled_mb: f64,
    /// `VmHWM`: the highest resident size the kernel saw.
    pub peak_rss_mb: f64,
    /// Resident size right after the burst, and `--settle-secs` later.
    pub rss_after_mb: f64,
    pub rss_settled_mb: f64,
    pub settle_secs: f64,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &BodiesArgs) -> anyhow::Result<BodiesReport> {
    let mut spec = spec.clone();
    spec.extra_args.extend(["--inference-auth", "none"].map(str::to_owned));
    let router = spec.start().await?;
    router.wait_ready().await?;
    let host = router.host();
    let before = router.memory()?;
    let request = chat_request(&host, args.body_bytes)?;
    eprintln!("{} clients sending {} bodies of {} bytes each, at once...", args.clients, args.rounds, args.body_bytes);
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for _ in 0..args.clients {
        let (request, addr, rounds) = (request.clone(), router.addr, args.rounds);
        clients.spawn(async move {
            let mut client = Client::new(addr);
            let mut answers: BTreeMap<String, u64> = BTreeMap::new();
            for _ in 0..rounds {
                let label = match client.send(&request).await {
                    Ok(answer) => answer.status.to_string(),
                    Err(err) => err.label(),
                };
                *answers.entry(label).or_default() += 1;
            }
            answers
        });
    }
    let mut rss_max = before.rss;
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        tokio::select! {
            done = clients.join_next() => match done {
                Some(counts) => {
                    for (status, count) in counts.context("a client task failed")? {
                        *answers.entry(status).or_default() += count;
                    }
                }
                None => break,
            },
            () = tokio::time::sleep(RSS_SAMPLE_EVERY) => rss_max = rss_max.max(router.memory()?.rss),
        }
    }
    let burst_secs = started.elapsed().as_secs_f64();
    let after = router.memory()?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs)).await;
    let settled = router.memory()?;
    router.stop().await?;
    Ok(BodiesReport {
        clients: args.clients,
        rounds: args.rounds,
        body_bytes: args.body_bytes,
        answers,
        burst_secs,
        rss_before_mb: before.rss_mb(),
        rss_max_sampled_mb: rss_max as f64 / 1e6,
        peak_rss_mb: settled.peak_mb(),
        rss_after_mb: after.rss_mb(),
        rss_settled_mb: settled.rss_mb(),
        settle_secs: args.settle_secs,
    })
}

/// A chat completion of `bytes` bytes for a model no node serves.
fn chat_request(host: &str, bytes: usize) -> anyhow::Result<Vec<u8>> {
    let head = br#"{"model": "no-such-model", "messages": [{"role": "user", "content": ""#;
    let tail = br#""}]}"#;
    let padding = bytes.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(bytes);
    body.extend_from_slice(head);
    body.resize(head.len() + padding, b'x');
    body.extend_from_slice(tail);
    Ok(encode_request("POST", "/v1/chat/completions", host, &[("Content-Type", "application/json")], &body))
}

/// The report for people.
pub fn print(report: &BodiesReport) {
    println!(
        "bodies: {} clients × {} bodies of {} bytes, at once, in {:.1} s",
        report.clients, report.rounds, report.body_bytes, report.burst_secs
    );
    let answers: Vec<String> = report.answers.iter().map(|(status, n)| format!("{status}: {n}")).collect();
    println!("  answers     {}", answers.join(", "));
    println!(
        "  router RSS  before {:.1} MB, max sampled {:.1} MB, peak (VmHWM) {:.1} MB, right after {:.1} MB, {:.0} s \
         later {:.1} MB",
        report.rss_before_mb,
        report.rss_max_sampled_mb,
        report.peak_rss_mb,
        report.rss_after_mb,
        report.settle_secs,
        report.rss_settled_mb
    );
}
