//! `bench limits`: one API key's `requests_per_minute` held by several routers together (SPEC §14: "routers sharing
//! a database enforce one limit together: in any minute, admitted requests exceed `requests_per_minute` by at most
//! 2 % plus one per router").
//!
//! `--routers` routers (default two, on one fresh PostgreSQL database; one on SQLite without `--postgres`) run with
//! `--inference-auth key` in front of one stand-in runtime. An API key of the `inference` scope is made with
//! `limits: {"requests_per_minute": --rpm}`; once every router answers it with `x-ratelimit-limit-requests`, the
//! run waits for the next minute to begin (UTC, the routers' clock too), then sends `--offered` × `--rpm` requests a
//! minute, on a schedule, to the routers in turn, for `--minutes` whole minutes. Every answer is counted in the
//! calendar minute it was sent in: admitted (200) or refused (429 `rate_limit_exceeded`), per router. A request
//! sent in one minute and answered in the next is counted in the first and reported (`straddling`): with answers in
//! a millisecond or two there are hardly any.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router::clock::{Millis, rfc3339};
use serde::Serialize;

use crate::affinity::Check;
use crate::cli::LimitsArgs;
use crate::fleet;
use crate::heartbeat::{finish_routers, start_routers};
use crate::http::{Client, encode_request};
use crate::openloop;
use crate::postgres;
use crate::proxy::{self, MODEL};
use crate::router::RouterSpec;
use crate::standin::{Behaviour, StandIns};
use crate::stats::ErrorCounts;
use crate::usage::now_ms;

/// Requests in flight at most (each worker has a connection to every router).
pub const WORKERS: usize = 16;

/// Longest wait for every router to answer the key with its limit.
const SETUP_DEADLINE: Duration = Duration::from_secs(15);

/// Longest a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `bench limits` reports.
#[derive(Debug, Serialize)]
pub struct LimitsReport {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    pub routers: usize,
    pub rpm: u64,
    /// Requests sent per minute, over all routers.
    pub offered_per_minute: f64,
    /// Most a minute may admit: `rpm` × (1 + tolerance) + one per router.
    pub bound: f64,
    pub minutes: Vec<MinuteTally>,
    /// Requests sent in one minute and answered in the next (counted in the first).
    pub straddling: u64,
    pub checks: Vec<Check>,
}

/// One calendar minute's answers.
#[derive(Debug, Clone, Serialize)]
pub struct MinuteTally {
    /// Its start (UTC).
    pub minute: String,
    /// Whether the run covered the whole minute.
    pub whole: bool,
    pub sent: u64,
    /// Answered 200, per router.
    pub admitted: Vec<u64>,
    /// Answered 429 `rate_limit_exceeded`, per router.
    pub refused: Vec<u64>,
    /// Anything else (other statuses, errors).
    pub other: ErrorCounts,
    pub admitted_total: u64,
    /// Admitted beyond `rpm` (0 when under).
    pub over: u64,
    /// How far under `rpm` the minute stayed, as a share of it (0 when at or over; `None` for a part of a minute).
    pub unused_share: Option<f64>,
    /// Seconds into the minute of its last admitted request, and of its first refused one.
    pub last_admitted_secs: Option<f64>,
    pub first_refused_secs: Option<f64>,
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Admitted,
    /// 429 with OpenAI's `rate_limit_exceeded`.
    Refused,
    Other(String),
}

/// One request as sent and answered, on the wall clock.
#[derive(Debug, Clone)]
pub struct Sent {
    pub router: usize,
    pub sent_ms: Millis,
    pub answered_ms: Millis,
    pub outcome: Outcome,
}

/// Runs the whole mode.
pub async fn run(spec: &RouterSpec, args: &LimitsArgs) -> anyhow::Result<LimitsReport> {
    let routers = args.routers();
    if routers > 1 && args.postgres.is_none() {
        bail!("--routers {routers} needs --postgres: routers share a PostgreSQL database, not SQLite");
    }
    let database = match &args.postgres {
        Some(server) => Some(postgres::Database::create(server).await?),
        None => None,
    };
    let mut spec = spec.clone();
    spec.extra_args.extend(["--inference-auth", "key"].map(str::to_owned));
    let behaviour = Behaviour { model: MODEL.to_owned(), chunks: 1, gap: Duration::from_millis(1) };
    let standins = StandIns::start(1, behaviour)?;
    let started = start_routers(&spec, routers, database.as_ref().map(|d| d.url.as_str())).await;
    let report = match &started {
        Ok(running) => {
            let addrs: Vec<SocketAddr> = running.iter().map(|r| r.addr).collect();
            let length = Duration::from_secs(args.minutes * 60);
            drive(&addrs, &spec.admin_password, standins.addrs(), args, length, true).await
        }
        Err(_) => Err(anyhow::anyhow!("the routers did not start")),
    };
    let mut report = finish_routers(started, database, report).await?;
    report.backend = if args.postgres.is_some() { "postgres" } else { "sqlite" };
    Ok(report)
}

/// Sets up the node and the key on the routers at `routers`, then sends the requests for `length`: from the next
/// minute's start when `align`, else at once.
pub async fn drive(
    routers: &[SocketAddr],
    password: &str,
    standins: &[SocketAddr],
    args: &LimitsArgs,
    length: Duration,
    align: bool,
) -> anyhow::Result<LimitsReport> {
    let first = routers[0];
    let host = first.to_string();
    let nodes = proxy::register(first, &host, standins).await?;
    let session = fleet::login(first, &host, password).await?;
    fleet::approve_nodes(first, &host, &session, &nodes, 4).await?;
    let heartbeat_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let heartbeats = proxy::keep_heartbeating(first, &host, &nodes, heartbeat_errors)?;
    let result = async {
        let limits = serde_json::json!({"requests_per_minute": args.rpm});
        let key = fleet::create_api_key(first, &host, &session, "limited", limits).await?;
        let requests: Arc<Vec<Vec<u8>>> = Arc::new(routers.iter().map(|addr| chat_request(*addr, &key)).collect());
        for (addr, request) in routers.iter().zip(requests.iter()) {
            wait_for_limit(*addr, request, args.rpm).await?;
        }
        let rate = args.offered * args.rpm as f64 / 60.0;
        let count = (rate * length.as_secs_f64()).round() as u64;
        if align {
            // The first request is due 50 ms after the run is set up: set it up that long before the minute turns.
            let next = (now_ms() / 60_000 + 1) * 60_000;
            let wait = (next - now_ms() - 50).max(0);
            eprintln!(
                "waiting {:.1} s for the next minute, then {rate:.1} requests/s to {} router(s) for {:.0} s...",
                wait as f64 / 1000.0,
                routers.len(),
                length.as_secs_f64()
            );
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        // When the first request is due, and the end of the schedule.
        let started_ms = now_ms() + 50;
        let sent = send(routers, &requests, rate, count).await?;
        let ended_ms = started_ms + length.as_millis() as Millis;
        anyhow::Ok(tally(&sent, routers.len(), args, started_ms, ended_ms))
    }
    .await;
    heartbeats.abort();
    result
}

/// A non-streaming chat completion to the router at `addr`, with `key`.
fn chat_request(addr: SocketAddr, key: &str) -> Vec<u8> {
    let bearer = format!("Bearer {key}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    encode_request("POST", "/v1/chat/completions", &addr.to_string(), &headers, &proxy::request_body(false, 0))
}

/// Sends `request` to `addr` until it is answered 200 with the key's limit in `x-ratelimit-limit-requests`: the
/// router knows the key and its limits (another router learns them from the database within a second or so).
async fn wait_for_limit(addr: SocketAddr, request: &[u8], rpm: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_DEADLINE;
    let mut client = Client::new(addr).keeping_heads();
    let expected = rpm.to_string();
    loop {
        let answer = client.send(request).await.context("a request with the limited key")?;
        if answer.status == 200 && client.header("x-ratelimit-limit-requests") == Some(expected.as_str()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "router {addr} did not answer the limited key 200 with x-ratelimit-limit-requests: {rpm} within \
                 {SETUP_DEADLINE:?} (last: HTTP {}, {:?})",
                answer.status,
                client.header("x-ratelimit-limit-requests")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `count` requests at `rate` a second, request i to router i mod the routers' count.
async fn send(
    routers: &[SocketAddr],
    requests: &Arc<Vec<Vec<u8>>>,
    rate: f64,
    count: u64,
) -> anyhow::Result<Vec<Sent>> {
    let routers = Arc::new(routers.to_vec());
    let running = openloop::start(rate, count, WORKERS, |schedule| {
        let (routers, requests) = (routers.clone(), requests.clone());
        async move {
            let mut clients: Vec<Client> = routers.iter().map(|addr| Client::new(*addr)).collect();
            let mut sent = Vec::new();
            while let Some(i) = schedule.next().await {
                let router = (i % routers.len() as u64) as usize;
                let client = &mut clients[router];
                let sent_ms = now_ms();
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, client.send(&requests[router])).await;
                let answered_ms = now_ms();
                let outcome = match answer {
                    Ok(Ok(answer)) if answer.status == 200 => Outcome::Admitted,
                    Ok(Ok(answer)) if answer.status == 429 => match error_code(client.body()).as_deref() {
                        Some("rate_limit_exceeded") => Outcome::Refused,
                        code => Outcome::Other(format!("HTTP 429 {}", code.unwrap_or("without a code"))),
                    },
                    Ok(Ok(answer)) => Outcome::Other(format!("HTTP {}", answer.status)),
                    Ok(Err(err)) => Outcome::Other(err.label()),
                    Err(_) => {
                        *client = Client::new(routers[router]);
                        Outcome::Other("timeout".to_owned())
                    }
                };
                sent.push(Sent { router, sent_ms, answered_ms, outcome });
            }
            sent
        }
    })?;
    running.finish().await
}

/// OpenAI's `error.code` of an error answer.
fn error_code(body: &[u8]) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    json["error"]["code"].as_str().map(str::to_owned)
}

/// Counts the answers per calendar minute of their sending; a minute the run's schedule (from `started_ms` to
/// `ended_ms`) did not cover whole, give or take 100 ms, is marked so.
pub fn tally(sent: &[Sent], routers: usize, args: &LimitsArgs, started_ms: Millis, ended_ms: Millis) -> LimitsReport {
    let bound = args.rpm as f64 * (1.0 + args.tolerance) + routers as f64;
    let mut minutes: std::collections::BTreeMap<Millis, MinuteTally> = std::collections::BTreeMap::new();
    let mut straddling = 0;
    for s in sent {
        let minute = s.sent_ms.div_euclid(60_000) * 60_000;
        if s.answered_ms.div_euclid(60_000) * 60_000 != minute {
            straddling += 1;
        }
        let tally = minutes.entry(minute).or_insert_with(|| MinuteTally {
            minute: rfc3339(minute),
            whole: minute + 100 >= started_ms && minute + 60_000 <= ended_ms + 100,
            sent: 0,
            admitted: vec![0; routers],
            refused: vec![0; routers],
            other: ErrorCounts::default(),
            admitted_total: 0,
            over: 0,
            unused_share: None,
            last_admitted_secs: None,
            first_refused_secs: None,
        });
        tally.sent += 1;
        let into = (s.sent_ms - minute) as f64 / 1000.0;
        match &s.outcome {
            Outcome::Admitted => {
                tally.admitted[s.router] += 1;
                tally.last_admitted_secs = Some(tally.last_admitted_secs.map_or(into, |t: f64| t.max(into)));
            }
            Outcome::Refused => {
                tally.refused[s.router] += 1;
                tally.first_refused_secs = Some(tally.first_refused_secs.map_or(into, |t: f64| t.min(into)));
            }
            Outcome::Other(label) => tally.other.add(label.clone()),
        }
    }
    let mut minutes: Vec<MinuteTally> = minutes.into_values().collect();
    for m in &mut minutes {
        m.admitted_total = m.admitted.iter().sum();
        m.over = m.admitted_total.saturating_sub(args.rpm);
        m.unused_share = m.whole.then(|| args.rpm.saturating_sub(m.admitted_total) as f64 / args.rpm as f64);
    }
    let worst = minutes.iter().map(|m| m.admitted_total).max().unwrap_or(0);
    let errors: u64 = minutes.iter().map(|m| m.other.total()).sum();
    let whole: Vec<&MinuteTally> = minutes.iter().filter(|m| m.whole).collect();
    let mut checks = vec![Check {
        what: format!("admitted per minute, {routers} router(s), requests_per_minute {}", args.rpm),
        measured: format!(
            "at most {worst} ({})",
            minutes.iter().map(|m| m.admitted_total.to_string()).collect::<Vec<_>>().join(" / ")
        ),
        bound: format!("<= {bound:.1}"),
        holds: (worst as f64) <= bound && errors == 0,
    }];
    if !whole.is_empty() {
        let least = whole.iter().map(|m| m.admitted_total).min().unwrap_or(0);
        checks.push(Check {
            what: "whole minutes: admitted, offered more than the limit".to_owned(),
            measured: format!("at least {least} of {}", args.rpm),
            bound: format!("the limit ({})", args.rpm),
            holds: least >= args.rpm,
        });
    }
    LimitsReport {
        backend: "",
        routers,
        rpm: args.rpm,
        offered_per_minute: args.offered * args.rpm as f64,
        bound,
        minutes,
        straddling,
        checks,
    }
}

/// The report for people.
pub fn print(report: &LimitsReport) {
    println!(
        "limits: {} router(s) on {}, one key with requests_per_minute {}, offered {:.0} a minute; bound {:.1} a minute",
        report.routers, report.backend, report.rpm, report.offered_per_minute, report.bound
    );
    for m in &report.minutes {
        let unused =
            m.unused_share.map_or_else(|| "part of a minute".to_owned(), |u| format!("{:.1} % unused", u * 100.0));
        println!(
            "  {} sent {:>5}  admitted {:>5} {:?}  refused {:?}  over by {}  {unused}; last admitted at {}, first \
             refused at {}; other: {}",
            m.minute,
            m.sent,
            m.admitted_total,
            m.admitted,
            m.refused,
            m.over,
            m.last_admitted_secs.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s")),
            m.first_refused_secs.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s")),
            m.other.line()
        );
    }
    println!("  requests sent in one minute and answered in the next: {}", report.straddling);
    for check in &report.checks {
        let verdict = if check.holds { "holds" } else { "FAILS" };
        println!("  {verdict:<5} {}: {} (bound {})", check.what, check.measured, check.bound);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Mode};
    use crate::router::InProcess;

    fn args(line: &str) -> LimitsArgs {
        let cli = Cli::try_parse_from(["bench", "limits"].into_iter().chain(line.split_whitespace())).expect("args");
        let Mode::Limits(args) = cli.mode else { panic!("limits expected") };
        args
    }

    #[test]
    fn counts_by_the_minute_a_request_was_sent_in() {
        let args = args("--rpm 3");
        assert_eq!((args.routers(), args.minutes, args.offered, args.tolerance), (1, 3, 2.5, 0.02));
        let at = |router, sent_ms, answered_ms, outcome| Sent { router, sent_ms, answered_ms, outcome };
        let sent = vec![
            at(0, 60_000, 60_001, Outcome::Admitted),
            at(1, 61_000, 61_001, Outcome::Admitted),
            at(0, 62_000, 62_001, Outcome::Admitted),
            at(1, 63_000, 63_001, Outcome::Admitted),
            at(0, 64_000, 64_001, Outcome::Refused),
            at(1, 119_999, 120_001, Outcome::Admitted),
            at(0, 120_000, 120_002, Outcome::Admitted),
            at(1, 121_000, 121_001, Outcome::Other("HTTP 503".to_owned())),
        ];
        let report = tally(&sent, 2, &args, 60_000, 180_000);
        assert_eq!(report.straddling, 1);
        assert_eq!(report.bound, 3.0 * 1.02 + 2.0);
        let [first, second] = &report.minutes[..] else { panic!("two minutes: {:?}", report.minutes) };
        assert!(first.whole && second.whole);
        assert_eq!((first.admitted.as_slice(), first.refused.as_slice()), ([2, 3].as_slice(), [1, 0].as_slice()));
        assert_eq!((first.admitted_total, first.over, first.unused_share), (5, 2, Some(0.0)));
        assert_eq!((first.last_admitted_secs, first.first_refused_secs), (Some(59.999), Some(4.0)));
        assert_eq!((second.admitted_total, second.over), (1, 0));
        assert!((second.unused_share.expect("whole") - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(second.other.total(), 1);
        // 5 admitted is within 3 × 1.02 + 2; the 503 fails the run.
        assert!(!report.checks[0].holds);
        assert!(!report.checks[1].holds, "the second minute admitted fewer than the limit");
        let partial = tally(&sent[..5], 2, &args, 61_500, 64_500);
        assert!(!partial.minutes[0].whole && partial.minutes[0].unused_share.is_none());
        assert!(partial.checks[0].holds && partial.checks.len() == 1);
    }

    /// Two seconds against one router in this process: the key gets its limit's worth and then OpenAI's 429s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_router_admits_the_limit_and_refuses_the_rest_with_rate_limit_exceeded() {
        use llm_router::config::InferenceAuth;

        let router = InProcess::start_with(|settings| settings.inference_auth = InferenceAuth::Key).await;
        let standins =
            StandIns::start(1, Behaviour { model: MODEL.to_owned(), chunks: 1, gap: Duration::from_millis(1) })
                .expect("stand-in");
        // 5 a minute, offered 8 a second (96 times the limit) for two seconds.
        let args = args("--rpm 5 --offered 96");
        let report = tokio::time::timeout(
            Duration::from_secs(60),
            drive(&[router.addr], &router.admin_password, standins.addrs(), &args, Duration::from_secs(2), false),
        )
        .await
        .expect("in time")
        .expect("the run completes");
        let sent: u64 = report.minutes.iter().map(|m| m.sent).sum();
        assert_eq!(sent, 16);
        for minute in &report.minutes {
            assert!(minute.admitted_total <= 5, "one router on SQLite counts exactly: {minute:?}");
            assert_eq!(minute.other.total(), 0, "{minute:?}");
            assert_eq!(minute.admitted_total + minute.refused[0], minute.sent);
        }
        // The setup's requests took one of the minute's five; a run straddling a minute boundary gets more.
        assert!(report.minutes.iter().map(|m| m.refused[0]).sum::<u64>() >= 6, "{:?}", report.minutes);
        router.stop().await;
    }
}
