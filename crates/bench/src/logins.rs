//! `bench logins`: sign-ins under a password-guessing attack (SPEC §9: memory stays flat, under 400 MB with 32
//! attackers in parallel). Attackers send wrong passwords back-to-back, each for a username of its own that no
//! other request uses, so the per-(username, address) throttle never stops them and every guess reaches the
//! password hashing pool; meanwhile one client signs in with the right password and is timed. The router's
//! resident memory is sampled throughout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::LoginsArgs;
use crate::http::{Client, encode_request};
use crate::router::{Router, RouterSpec};
use crate::stats::LatencySummary;

/// How often the router's resident memory is read.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Metrics of the router this mode reads at the end (absent from a router that predates them).
const COUNTERS: [&str; 2] = ["llm_router_password_hashes_refused_total", "llm_router_logins_throttled_total"];

/// What `bench logins` reports.
#[derive(Debug, Serialize)]
pub struct LoginsReport {
    pub attackers: usize,
    pub secs: f64,
    /// Wrong-password sign-ins answered, by HTTP status (`error` for no answer).
    pub attack_answers: BTreeMap<String, u64>,
    /// Wrong-password sign-ins answered per second, any status.
    pub attack_answers_per_sec: f64,
    /// Right-password sign-ins, by HTTP status.
    pub correct_answers: BTreeMap<String, u64>,
    /// Latency of right-password sign-ins answered 200.
    pub correct_latency: LatencySummary,
    pub rss_before_mb: f64,
    /// The highest resident size sampled during the attack.
    pub rss_max_sampled_mb: f64,
    /// `VmHWM` at the end: the highest resident size the kernel saw, samples or not.
    pub peak_rss_mb: f64,
    pub rss_after_mb: f64,
    /// The router's own counters at the end, where it has them.
    pub router_counters: BTreeMap<String, f64>,
}

/// Runs the whole mode against a router started from `spec`.
pub async fn run(spec: &RouterSpec, args: &LoginsArgs) -> anyhow::Result<LoginsReport> {
    let router = spec.start().await?;
    router.wait_ready().await?;
    let host = router.host();
    let before = router.memory()?;
    eprintln!("{} attackers sending wrong passwords for {} s, one client signing in...", args.attackers, args.secs);

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = JoinSet::new();
    for attacker in 0..args.attackers {
        attackers.spawn(attack(router.addr, host.clone(), attacker, stop.clone()));
    }
    let correct = tokio::spawn(sign_in_repeatedly(
        router.addr,
        host.clone(),
        spec.admin_password.clone(),
        Duration::from_millis(args.pause_ms),
        stop.clone(),
    ));
    let started = Instant::now();
    let window = Duration::from_secs_f64(args.secs);
    let mut rss_max = before.rss;
    while started.elapsed() < window {
        tokio::time::sleep(RSS_SAMPLE_EVERY).await;
        rss_max = rss_max.max(router.memory()?.rss);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();

    let mut attack_answers = BTreeMap::new();
    while let Some(counts) = attackers.join_next().await {
        for (status, count) in counts.context("an attacker task failed")? {
            *attack_answers.entry(status).or_default() += count;
        }
    }
    let (correct_answers, latencies) = correct.await.context("the timed sign-in task failed")?;
    let after = router.memory()?;
    let router_counters = counters(&router).await;
    router.stop().await?;

    let answered: u64 = attack_answers.iter().filter(|(status, _)| *status != "error").map(|(_, n)| n).sum();
    Ok(LoginsReport {
        attackers: args.attackers,
        secs: elapsed,
        attack_answers,
        attack_answers_per_sec: answered as f64 / elapsed,
        correct_answers,
        correct_latency: LatencySummary::from_nanos(latencies),
        rss_before_mb: before.rss_mb(),
        rss_max_sampled_mb: rss_max as f64 / 1e6,
        peak_rss_mb: after.peak_mb(),
        rss_after_mb: after.rss_mb(),
        router_counters,
    })
}

fn login_request(host: &str, username: &str, password: &str) -> anyhow::Result<Vec<u8>> {
    let body = serde_json::to_vec(&serde_json::json!({"username": username, "password": password}))?;
    Ok(encode_request("POST", "/v0/auth/login", host, &[("Content-Type", "application/json")], &body))
}

fn status_label(result: &Result<crate::http::Answer, crate::http::ClientError>) -> String {
    match result {
        Ok(answer) => answer.status.to_string(),
        Err(_) => "error".to_owned(),
    }
}

/// One attacker: wrong passwords back-to-back on one connection, a fresh username each time, until `stop`.
async fn attack(addr: SocketAddr, host: String, attacker: usize, stop: Arc<AtomicBool>) -> BTreeMap<String, u64> {
    let mut client = Client::new(addr);
    let mut answers = BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(request) = login_request(&host, &format!("guess-{attacker}-{n}"), "not-the-password-1") else {
            break;
        };
        n += 1;
        let result = client.send(&request).await;
        if result.is_err() {
            // Do not spin on a refused connection.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        *answers.entry(status_label(&result)).or_default() += 1;
    }
    answers
}

/// The legitimate user: signs in with the right password, pausing `pause` between sign-ins, until `stop`.
async fn sign_in_repeatedly(
    addr: SocketAddr,
    host: String,
    password: String,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> (BTreeMap<String, u64>, Vec<u64>) {
    let mut client = Client::new(addr);
    let mut answers = BTreeMap::new();
    let mut latencies = Vec::new();
    let Ok(request) = login_request(&host, "admin", &password) else {
        return (answers, latencies);
    };
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = client.send(&request).await;
        let latency = started.elapsed();
        if matches!(result, Ok(crate::http::Answer { status: 200 })) {
            latencies.push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
        }
        *answers.entry(status_label(&result)).or_default() += 1;
        tokio::time::sleep(pause).await;
    }
    (answers, latencies)
}

/// The router's counters of refused hashes and throttled sign-ins, from `GET /metrics`.
async fn counters(router: &Router) -> BTreeMap<String, f64> {
    let mut found = BTreeMap::new();
    let request = encode_request("GET", "/metrics", &router.host(), &[], b"");
    let mut client = Client::new(router.addr);
    if !matches!(client.send(&request).await, Ok(crate::http::Answer { status: 200 })) {
        return found;
    }
    let text = String::from_utf8_lossy(client.body()).into_owned();
    for line in text.lines() {
        let mut parts = line.split(' ');
        if let (Some(name), Some(value)) = (parts.next(), parts.next())
            && COUNTERS.contains(&name)
            && let Ok(value) = value.parse()
        {
            found.insert(name.to_owned(), value);
        }
    }
    found
}

fn counts_line(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts.iter().map(|(status, n)| format!("{status}: {n}")).collect::<Vec<_>>().join(", ")
}

/// The report for people.
pub fn print(report: &LoginsReport) {
    println!("logins: {} attackers, wrong passwords back-to-back for {:.1} s", report.attackers, report.secs);
    println!(
        "  attack         {} ({:.0} answers/s)",
        counts_line(&report.attack_answers),
        report.attack_answers_per_sec
    );
    println!("  right password {}", counts_line(&report.correct_answers));
    println!("  its latency    {}", report.correct_latency.line());
    println!(
        "  router RSS     before {:.1} MB, max sampled {:.1} MB, peak (VmHWM) {:.1} MB, after {:.1} MB",
        report.rss_before_mb, report.rss_max_sampled_mb, report.peak_rss_mb, report.rss_after_mb
    );
    if !report.router_counters.is_empty() {
        let line: Vec<String> = report.router_counters.iter().map(|(name, value)| format!("{name} {value}")).collect();
        println!("  router counts  {}", line.join(", "));
    }
}
