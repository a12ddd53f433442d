//! `bench usage`: how fast the router answers usage over a month of a busy fleet, and what keeping it costs (SPEC
//! §14: "a 30-day usage query over 100 million recorded requests answers in < 100 ms").
//!
//! 1. A fresh database (SQLite in the data directory, or a fresh PostgreSQL database with `--postgres`) is filled
//!    with the state `--requests` recorded requests over `--days` leave in it (`fill`, with the workload of
//!    `workload`): the roll-ups of the whole period, the raw rows of the last `--request-log-days`.
//! 2. Its storage is measured: the database's size, and each usage table's (SQLite: `dbstat`; PostgreSQL:
//!    `pg_total_relation_size`, after the `VACUUM ANALYZE` autovacuum would have made), per million requests.
//! 3. `--runs` times, the real router is started on it, and each query is timed over HTTP, one call at a time on one
//!    keep-alive connection, `--warmups` untimed calls then `--calls` timed: the period's totals by day; by
//!    principal by day; by model by hour; by node by day; and the dashboard's last hour (`/v0/usage/live`).
//! 4. With `--explain`, each query's statements are explained and timed alone, without the router.

mod explain;
mod fill;
pub mod workload;

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, bail};
use llm_router::clock::rfc3339;
use serde::Serialize;

use crate::affinity::Check;
use crate::cli::UsageArgs;
use crate::fleet;
use crate::http::{Client, encode_request};
use crate::postgres;
use crate::router::RouterSpec;
use crate::stats::{ErrorCounts, LatencySummary};
pub use explain::Plan;
pub use fill::{Filled, Target, fill, now_ms};
use workload::{Shape, Workload};

/// SPEC §14's bound on a 30-day usage query, in milliseconds.
const BOUND_MS: f64 = 100.0;

/// What `bench usage` reports.
#[derive(Debug, Serialize)]
pub struct UsageReport {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    pub requests: u64,
    pub days: u32,
    pub principals: usize,
    pub models: usize,
    pub nodes: usize,
    pub request_log_days: u32,
    /// Days whose raw rows were written (the rest of --request-log-days is extrapolated).
    pub raw_days: u32,
    pub filled: Filled,
    pub storage: Storage,
    /// Each query over all runs.
    pub queries: Vec<QueryTiming>,
    /// Each run's p50 and p99 of each query, in milliseconds.
    pub runs: Vec<Vec<(String, f64, f64)>>,
    pub plans: Vec<Plan>,
    pub checks: Vec<Check>,
}

/// The database's size and each usage table's.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Storage {
    /// SQLite: the file and its write-ahead log; PostgreSQL: `pg_database_size`.
    pub database_bytes: u64,
    pub wal_bytes: u64,
    /// Per usage table: name, bytes (indexes included), rows.
    pub tables: Vec<(String, u64, u64)>,
    /// `usage_requests` with its index.
    pub raw_bytes: u64,
    /// The five roll-up tables.
    pub rollup_bytes: u64,
    pub raw_bytes_per_million_rows: f64,
    /// Roll-ups per million requests of the period.
    pub rollup_bytes_per_million_requests: f64,
    /// The raw rows of --request-log-days at the measured size per row (the measured rows when all were written).
    pub raw_bytes_at_request_log_days: u64,
}

/// One query's timings over all runs, and what its first answer held.
#[derive(Debug, Clone, Serialize)]
pub struct QueryTiming {
    pub name: String,
    pub path: String,
    pub ok: u64,
    pub errors: ErrorCounts,
    pub latency: LatencySummary,
    pub answer_bytes: usize,
    /// `totals.requests` of the answer (the live hour: its minutes' requests added up).
    pub requests: u64,
    /// Groups of a grouped answer; buckets of the fleet's series (the live hour: minutes).
    pub groups: usize,
    pub buckets: usize,
    /// Whether SPEC §14's bound applies (the 30-day queries).
    pub bounded: bool,
}

/// Runs the whole mode.
pub async fn run(spec: &RouterSpec, args: &UsageArgs) -> anyhow::Result<UsageReport> {
    if args.nodes < args.models {
        bail!("--nodes ({}) must be at least --models ({}): every model needs a node", args.nodes, args.models);
    }
    let database = match &args.postgres {
        Some(server) => Some(postgres::Database::create(server).await?),
        None => None,
    };
    let target = match &database {
        Some(database) => Target::Postgres(database.url.clone()),
        None => Target::Sqlite(spec.data_dir.clone()),
    };
    let result = measure(spec, args, &target).await;
    if let Some(database) = database {
        if args.keep_database {
            eprintln!("database kept: {}", database.url);
        } else {
            database.remove().await?;
        }
    }
    result
}

/// Fills `target`, measures its storage, and times the queries on routers started on it.
pub async fn measure(spec: &RouterSpec, args: &UsageArgs, target: &Target) -> anyhow::Result<UsageReport> {
    let shape = Shape {
        requests: args.requests,
        days: args.days,
        principals: args.principals,
        models: args.models,
        nodes: args.nodes,
        seed: args.seed,
    };
    let workload = Workload::new(shape, now_ms());
    let raw_days = args.raw_days();
    eprintln!(
        "writing {} requests over {} days ({} keys, {} models, {} nodes): roll-ups summed for {} days, raw rows \
         through the router's storage code for the last {raw_days}...",
        args.requests,
        args.days,
        args.principals,
        args.models,
        args.nodes,
        args.days - raw_days
    );
    let filled = fill(&workload, target, raw_days, args.batch, true).await?;
    eprintln!(
        "  {} requests: {} summed in {:.0} s, {} raw rows in {:.0} s ({:.0} records/s)",
        filled.requests,
        filled.summed,
        filled.summed_secs,
        filled.raw_rows,
        filled.raw_secs,
        filled.raw_records_per_sec
    );
    let storage = explain::storage(target, &filled, args, &workload).await?;
    let mut spec = spec.clone();
    if let Target::Postgres(url) = target {
        spec.extra_args.extend(["--database-url".to_owned(), url.clone()]);
    }
    spec.extra_args.extend(["--request-log-days".to_owned(), args.request_log_days.max(1).to_string()]);
    let from = rfc3339(filled.from_ms);
    let queries = queries(&from);
    let mut pooled: Vec<Vec<u64>> = vec![Vec::new(); queries.len()];
    let mut timings = Vec::new();
    let mut runs = Vec::new();
    for run in 0..args.runs {
        eprintln!("run {} of {}: starting the router and timing the queries...", run + 1, args.runs);
        let router = spec.start().await?;
        let timed = async {
            router.wait_ready().await?;
            let session = fleet::login(router.addr, &router.host(), &spec.admin_password).await?;
            time_queries(router.addr, &session, &queries, args.warmups, args.calls).await
        }
        .await;
        let stopped = router.stop().await;
        let timed = timed?;
        stopped?;
        runs.push(
            timed
                .iter()
                .map(|(timing, _)| (timing.name.clone(), timing.latency.p50_ms, timing.latency.p99_ms))
                .collect(),
        );
        for (k, (timing, samples)) in timed.into_iter().enumerate() {
            pooled[k].extend(samples);
            if run == 0 {
                timings.push(timing);
            } else {
                timings[k].ok += timing.ok;
                timings[k].errors.merge(timing.errors);
            }
        }
    }
    for (timing, samples) in timings.iter_mut().zip(pooled) {
        timing.latency = LatencySummary::from_nanos(samples);
    }
    let plans = if args.explain { explain::plans(target, filled.from_ms).await? } else { Vec::new() };
    let checks = checks(&timings, &filled);
    Ok(UsageReport {
        backend: match target {
            Target::Sqlite(_) => "sqlite",
            Target::Postgres(_) => "postgres",
        },
        requests: args.requests,
        days: args.days,
        principals: args.principals,
        models: args.models,
        nodes: args.nodes,
        request_log_days: args.request_log_days,
        raw_days,
        filled,
        storage,
        queries: timings,
        runs,
        plans,
        checks,
    })
}

/// The queries timed: (name, path, bounded by SPEC §14).
pub fn queries(from: &str) -> Vec<(&'static str, String, bool)> {
    vec![
        ("totals by day", format!("/v0/usage?from={from}&step=day"), true),
        ("by principal by day", format!("/v0/usage?from={from}&step=day&group_by=principal"), true),
        ("by model by hour", format!("/v0/usage?from={from}&step=hour&group_by=model"), true),
        ("by node by day", format!("/v0/usage?from={from}&step=day&group_by=node"), true),
        ("live: the last hour", "/v0/usage/live".to_owned(), false),
    ]
}

/// Times each query, one call at a time on one connection: its timing and its samples in nanoseconds.
pub async fn time_queries(
    addr: SocketAddr,
    session: &str,
    queries: &[(&'static str, String, bool)],
    warmups: usize,
    calls: usize,
) -> anyhow::Result<Vec<(QueryTiming, Vec<u64>)>> {
    let host = addr.to_string();
    let bearer = format!("Bearer {session}");
    let mut client = Client::new(addr);
    let mut out = Vec::with_capacity(queries.len());
    for (name, path, bounded) in queries {
        let request = encode_request("GET", path, &host, &[("Authorization", &bearer)], b"");
        let mut timing = QueryTiming {
            name: (*name).to_owned(),
            path: path.clone(),
            ok: 0,
            errors: ErrorCounts::default(),
            latency: LatencySummary::from_nanos(Vec::new()),
            answer_bytes: 0,
            requests: 0,
            groups: 0,
            buckets: 0,
            bounded: *bounded,
        };
        let mut samples = Vec::with_capacity(calls);
        for call in 0..warmups + calls {
            let sent = Instant::now();
            let answer = client.send(&request).await;
            let elapsed = sent.elapsed().as_nanos() as u64;
            match answer {
                Ok(answer) if answer.status == 200 => {
                    if call == 0 {
                        read_answer(&mut timing, client.body())
                            .with_context(|| format!("reading the answer to {path}"))?;
                    }
                    if call >= warmups {
                        timing.ok += 1;
                        samples.push(elapsed);
                    }
                }
                Ok(answer) => {
                    if call == 0 {
                        bail!("GET {path} answered HTTP {}: {}", answer.status, String::from_utf8_lossy(client.body()));
                    }
                    timing.errors.add(format!("HTTP {}", answer.status));
                }
                Err(err) => timing.errors.add(err.label()),
            }
        }
        timing.latency = LatencySummary::from_nanos(samples.clone());
        out.push((timing, samples));
    }
    Ok(out)
}

/// What an answer holds: its size, requests, groups and buckets.
fn read_answer(timing: &mut QueryTiming, body: &[u8]) -> anyhow::Result<()> {
    timing.answer_bytes = body.len();
    let json: serde_json::Value = serde_json::from_slice(body)?;
    match &json {
        serde_json::Value::Array(minutes) => {
            timing.buckets = minutes.len();
            timing.requests = minutes.iter().filter_map(|m| m["requests"].as_u64()).sum();
        }
        _ => {
            timing.requests = json["totals"]["requests"].as_u64().context("no totals.requests")?;
            timing.buckets = json["series"].as_array().map_or(0, Vec::len);
            timing.groups = json["groups"].as_array().map_or(0, Vec::len);
        }
    }
    Ok(())
}

/// SPEC §14's bound for each 30-day query (p99 of its calls), and that it counted every request written.
fn checks(timings: &[QueryTiming], filled: &Filled) -> Vec<Check> {
    timings
        .iter()
        .filter(|t| t.bounded)
        .map(|t| Check {
            what: format!("30-day usage, {}: p99 of {} calls", t.name, t.latency.samples),
            measured: format!("{:.1} ms (p50 {:.1} ms)", t.latency.p99_ms, t.latency.p50_ms),
            bound: format!("< {BOUND_MS} ms"),
            holds: t.latency.p99_ms < BOUND_MS && t.errors.total() == 0 && (t.requests <= filled.requests),
        })
        .collect()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The report for people.
pub fn print(report: &UsageReport) {
    let f = &report.filled;
    println!(
        "usage on {}: {} requests over {} days, {} keys, {} models, {} nodes; raw rows kept {} days ({} written)",
        report.backend,
        f.requests,
        report.days,
        report.principals,
        report.models,
        report.nodes,
        report.request_log_days,
        report.raw_days
    );
    println!(
        "  written      {} summed into roll-ups in {:.0} s; {} raw rows through insert_usage in {:.0} s ({:.0}/s), \
         {} minutes caught up",
        f.summed, f.summed_secs, f.raw_rows, f.raw_secs, f.raw_records_per_sec, f.caught_up_minutes
    );
    let s = &report.storage;
    println!(
        "  storage      database {:.1} MB (write-ahead log {:.1} MB); raw rows {:.1} MB ({:.1} MB per million rows), \
         roll-ups {:.1} MB ({:.1} MB per million requests)",
        mb(s.database_bytes),
        mb(s.wal_bytes),
        mb(s.raw_bytes),
        mb(s.raw_bytes_per_million_rows as u64),
        mb(s.rollup_bytes),
        mb(s.rollup_bytes_per_million_requests as u64)
    );
    if report.raw_days < report.request_log_days {
        println!(
            "               raw rows of {} days at that size: {:.1} MB (extrapolated)",
            report.request_log_days,
            mb(s.raw_bytes_at_request_log_days)
        );
    }
    for (table, bytes, rows) in &s.tables {
        println!("               {table:<16} {:>10.1} MB {rows:>12} rows", mb(*bytes));
    }
    for t in &report.queries {
        println!("  {:<20} {}", t.name, t.latency.line());
        println!(
            "  {:<20} {} ok, errors: {}; answer {} bytes: {} requests, {} groups, {} buckets",
            "",
            t.ok,
            t.errors.line(),
            t.answer_bytes,
            t.requests,
            t.groups,
            t.buckets
        );
    }
    for (k, run) in report.runs.iter().enumerate() {
        let line: Vec<String> = run.iter().map(|(name, p50, p99)| format!("{name} {p50:.1}/{p99:.1}")).collect();
        println!("  run {}: p50/p99 ms: {}", k + 1, line.join(", "));
    }
    for plan in &report.plans {
        println!(
            "  plan of {} ({}): the statement alone {:.2} ms median, {} rows",
            plan.query, plan.statement, plan.median_ms, plan.rows
        );
        for line in plan.plan.lines() {
            println!("      {line}");
        }
    }
    for check in &report.checks {
        let verdict = if check.holds { "holds" } else { "FAILS" };
        println!("  {verdict:<5} {}: {} (bound {})", check.what, check.measured, check.bound);
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use sqlx::{Connection, Row};

    use super::*;
    use crate::cli::{Cli, Mode};
    use crate::router::InProcess;

    fn args(line: &str) -> UsageArgs {
        let cli = Cli::try_parse_from(["bench", "usage"].into_iter().chain(line.split_whitespace())).expect("args");
        let Mode::Usage(args) = cli.mode else { panic!("usage expected") };
        args
    }

    /// Every row of every roll-up table, in key order.
    async fn rollups(dir: &std::path::Path) -> Vec<String> {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", dir.join("router.db").display()))
            .await
            .expect("open");
        let mut out = Vec::new();
        let model_tables =
            [("usage_model_minute", "model"), ("usage_model_hour", "model"), ("usage_model_day", "model")];
        for (table, key) in fill::ROLLUPS.into_iter().chain(model_tables) {
            let sql = format!(
                "SELECT bucket, {key}, model, requests, errors, rejected, prompt_tokens, completion_tokens, \
                 unknown_usage, duration_ms FROM {table} ORDER BY bucket, {key}, model"
            );
            for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut conn).await.expect("read") {
                let values: Vec<String> = (0..10)
                    .map(|i| row.try_get::<i64, _>(i).map(|v| v.to_string()).or_else(|_| row.try_get::<String, _>(i)))
                    .collect::<Result<_, _>>()
                    .expect("values");
                out.push(format!("{table} {}", values.join(" ")));
            }
        }
        out
    }

    #[test]
    fn the_documented_command_parses() {
        let args = args("--postgres postgres://u@h/db");
        assert_eq!((args.requests, args.days, args.principals, args.models, args.nodes), (100_000_000, 30, 200, 8, 64));
        assert_eq!(
            (args.request_log_days, args.raw_days(), args.batch, args.calls, args.warmups),
            (7, 7, 10_000, 20, 2)
        );
        assert_eq!(self::args("--raw-days 2").raw_days(), 2);
        assert_eq!(self::args("--raw-days 9").raw_days(), 7, "no more than the router keeps");
        assert!(Cli::try_parse_from(["bench", "usage", "--requests", "0"]).is_err());
    }

    /// A small month: the roll-ups written directly are the ones the router's own code writes from the raw rows,
    /// row for row; a router started on the database answers every query with every request written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn summed_roll_ups_equal_the_routers_own_and_every_query_counts_every_request() {
        let args = args(
            "--requests 30000 --days 2 --principals 12 --models 3 --nodes 6 --request-log-days 1 --batch 4000 \
             --calls 3 --warmups 1",
        );
        let shape = Shape { requests: 30_000, days: 2, principals: 12, models: 3, nodes: 6, seed: 7 };
        let workload = Workload::new(shape, now_ms());
        let (half, summed) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let filled = fill(&workload, &Target::Sqlite(half.path().to_owned()), 1, 4_000, false).await.expect("fill");
        let all_summed =
            fill(&workload, &Target::Sqlite(summed.path().to_owned()), 0, 4_000, false).await.expect("fill");
        assert_eq!((filled.requests, all_summed.requests, all_summed.raw_rows), (30_000, 30_000, 0));
        let last_day: u64 = (1440..2880).map(|i| workload.count(i)).sum();
        assert_eq!((filled.raw_rows, filled.summed), (last_day, 30_000 - last_day));
        let (a, b) = (rollups(half.path()).await, rollups(summed.path()).await);
        assert!(a.len() > 1000, "{}", a.len());
        assert_eq!(a, b, "the same roll-ups, written either way");

        let target = Target::Sqlite(half.path().to_owned());
        let storage = explain::storage(&target, &filled, &args, &workload).await.expect("storage");
        let rows = |name: &str| storage.tables.iter().find(|(t, ..)| t == name).map(|(_, _, rows)| *rows);
        assert_eq!(rows("usage_requests"), Some(last_day));
        assert_eq!(rows("usage_principals"), Some(12));
        assert!(storage.raw_bytes > 0 && storage.rollup_bytes > 0 && storage.database_bytes >= storage.raw_bytes);
        assert_eq!(storage.raw_bytes_at_request_log_days, storage.raw_bytes, "all the raw rows kept were written");

        let path = half.path().to_owned();
        let router = InProcess::start_in(half, |_| {}).await;
        let session = fleet::login(router.addr, &router.addr.to_string(), &router.admin_password).await.expect("login");
        let timed = time_queries(router.addr, &session, &queries(&rfc3339(filled.from_ms)), 1, 3).await.expect("timed");
        let mut records = Vec::new();
        for i in 0..workload.minutes {
            workload.records(i, &mut records);
        }
        let with_node = records.iter().filter(|r| r.node.is_some()).count() as u64;
        let answered: Vec<(&str, u64, usize, usize)> =
            timed.iter().map(|(t, _)| (t.name.as_str(), t.requests, t.groups, t.buckets)).collect();
        assert!((2..=3).contains(&answered[0].3), "two days over two or three calendar days: {answered:?}");
        assert_eq!((answered[2].1, answered[2].2), (30_000, 3));
        assert!((48..=49).contains(&answered[2].3), "{answered:?}");
        assert_eq!((answered[3].1, answered[3].2), (with_node, 6));
        assert_eq!((answered[4].0, answered[4].3), ("live: the last hour", 60));
        assert!(answered[4].1 > 0);
        for (timing, samples) in &timed {
            assert_eq!((timing.ok, timing.errors.total(), samples.len()), (3, 0, 3), "{timing:?}");
        }
        assert_eq!(answered[0].0, "totals by day");
        assert_eq!((answered[0].1, answered[0].2), (30_000, 0));
        assert_eq!(answered[1], ("by principal by day", 30_000, 12, answered[0].3));

        let plans = explain::plans(&Target::Sqlite(path), filled.from_ms).await.expect("plans");
        assert_eq!(plans.len(), 6);
        assert!(plans.iter().all(|p| !p.plan.is_empty()), "{plans:?}");
        assert_eq!(plans[0].rows, answered[0].3, "a row a day of the totals");
        router.stop().await;
    }
}
