//! What the state of `bench usage` takes on disk, and how the database answers each query's statements: their
//! plans, and their time alone, without the router.
//!
//! The statements are those of the router's `store/usage_sql.rs` (`usage_series`, `first_token_bins`), written
//! out here with the values the router binds; a change there must be made here too for `--explain` to say the truth.

use std::time::Instant;

use anyhow::Context;
use llm_router::clock::Millis;
use llm_router::model::usage::Step;
use serde::Serialize;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Row};

use super::fill::{ROLLUPS, Target, now_ms, sqlite_files};
use super::workload::Workload;
use super::{Filled, Storage};
use crate::cli::UsageArgs;
use crate::stats::median;

/// The roll-ups per model and the time-to-first-token bins, beside [`ROLLUPS`].
const MODEL_TABLES: [&str; 4] = ["usage_model_minute", "usage_model_hour", "usage_model_day", "usage_ttft_minute"];

/// Times each statement is run alone for its median.
const STATEMENT_RUNS: usize = 5;

/// One statement of a query: its plan and its time alone.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub query: String,
    pub statement: String,
    pub sql: String,
    pub plan: String,
    pub median_ms: f64,
    pub rows: usize,
}

/// The sizes of the database and of each usage table; on PostgreSQL after `VACUUM ANALYZE` of the usage tables
/// (what autovacuum does to tables that grew).
pub async fn storage(
    target: &Target,
    filled: &Filled,
    args: &UsageArgs,
    workload: &Workload,
) -> anyhow::Result<Storage> {
    let mut tables: Vec<&str> = vec!["usage_requests"];
    tables.extend(ROLLUPS.iter().map(|(table, _)| *table));
    tables.extend(MODEL_TABLES);
    tables.push("usage_principals");
    let mut storage = Storage::default();
    match target {
        Target::Sqlite(dir) => {
            let (file, wal) = sqlite_files(dir);
            storage.database_bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
            storage.wal_bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
            storage.database_bytes += storage.wal_bytes;
            let mut conn = sqlite(dir).await?;
            eprintln!("measuring the tables (dbstat)...");
            let rows = sqlx::query("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetch_all(&mut conn).await?;
            let mut sizes = std::collections::HashMap::new();
            for row in &rows {
                sizes.insert(row.try_get::<String, _>(0)?, u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0));
            }
            for table in &tables {
                // A table's own b-tree, and its indexes (`usage_requests_by_time`).
                let bytes: u64 =
                    sizes.iter().filter(|(name, _)| name.starts_with(table)).map(|(_, bytes)| *bytes).sum();
                let (count,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                    .fetch_one(&mut conn)
                    .await?;
                storage.tables.push(((*table).to_owned(), bytes, u64::try_from(count).unwrap_or(0)));
            }
            conn.close().await?;
        }
        Target::Postgres(url) => {
            let mut conn = PgConnection::connect(url).await?;
            eprintln!("VACUUM ANALYZE of the usage tables, as autovacuum would...");
            for table in &tables {
                sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) {table}"))).execute(&mut conn).await?;
            }
            let (bytes,): (i64,) =
                sqlx::query_as("SELECT pg_database_size(current_database())").fetch_one(&mut conn).await?;
            storage.database_bytes = u64::try_from(bytes).unwrap_or(0);
            for table in &tables {
                let (bytes,): (i64,) = sqlx::query_as("SELECT pg_total_relation_size($1::regclass)")
                    .bind(*table)
                    .fetch_one(&mut conn)
                    .await?;
                let (count,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                    .fetch_one(&mut conn)
                    .await?;
                storage.tables.push((
                    (*table).to_owned(),
                    u64::try_from(bytes).unwrap_or(0),
                    u64::try_from(count).unwrap_or(0),
                ));
            }
            conn.close().await?;
        }
    }
    for (table, bytes, _) in &storage.tables {
        if table == "usage_requests" {
            storage.raw_bytes += bytes;
        } else if ROLLUPS.iter().any(|(name, _)| name == table) || MODEL_TABLES.contains(&table.as_str()) {
            storage.rollup_bytes += bytes;
        }
    }
    let raw_rows = storage.tables.iter().find(|(t, ..)| t == "usage_requests").map_or(0, |(_, _, rows)| *rows);
    storage.raw_bytes_per_million_rows =
        if raw_rows > 0 { storage.raw_bytes as f64 * 1e6 / raw_rows as f64 } else { 0.0 };
    storage.rollup_bytes_per_million_requests = storage.rollup_bytes as f64 * 1e6 / filled.requests.max(1) as f64;
    // The requests of the last --request-log-days, as the workload spreads them.
    let kept_minutes = u64::from(args.request_log_days.min(args.days)) * 1440;
    let kept: u64 = (workload.minutes - kept_minutes..workload.minutes).map(|i| workload.count(i)).sum();
    storage.raw_bytes_at_request_log_days =
        if raw_rows > 0 { (storage.raw_bytes as f64 / raw_rows as f64 * kept as f64) as u64 } else { 0 };
    Ok(storage)
}

async fn sqlite(dir: &std::path::Path) -> anyhow::Result<SqliteConnection> {
    let options = SqliteConnectOptions::new().filename(sqlite_files(dir).0).read_only(true);
    SqliteConnection::connect_with(&options).await.context("opening the SQLite database")
}

/// A statement of one of the timed queries, with the values the router binds.
struct Statement {
    query: &'static str,
    name: &'static str,
    sql: String,
    binds: [i64; 2],
}

/// The router's `usage_series` statement for a step and a grouping (`None`: the totals).
fn series_sql(table: &str, group: Option<&str>) -> String {
    let summed =
        ["requests", "errors", "rejected", "prompt_tokens", "completion_tokens", "unknown_usage", "duration_ms"]
            .map(|c| format!("CAST(SUM({c}) AS BIGINT)"))
            .join(", ");
    let (column, grouped) = match group {
        Some(group) => (group.to_owned(), format!(", {group}")),
        None => ("NULL".to_owned(), String::new()),
    };
    format!(
        "SELECT bucket, {column}, {summed} FROM {table} WHERE bucket >= $1 AND bucket < $2 GROUP BY bucket{grouped} \
         ORDER BY bucket"
    )
}

fn statements(from: Millis, now: Millis) -> Vec<Statement> {
    let to = now + 1;
    let live_to = Step::Minute.floor(now) + 60_000;
    let live_from = live_to - 3_600_000;
    let day = Step::Day.floor(from);
    vec![
        Statement {
            query: "totals by day",
            name: "series",
            sql: series_sql("usage_model_day", None),
            binds: [day, to],
        },
        Statement {
            query: "by principal by day",
            name: "series",
            sql: series_sql("usage_day", Some("principal")),
            binds: [day, to],
        },
        Statement {
            query: "by model by hour",
            name: "series",
            sql: series_sql("usage_model_hour", Some("model")),
            binds: [Step::Hour.floor(from), to],
        },
        Statement {
            query: "by node by day",
            name: "series",
            sql: series_sql("usage_node_day", Some("node")),
            binds: [day, to],
        },
        Statement {
            query: "live: the last hour",
            name: "series",
            sql: series_sql("usage_model_minute", None),
            binds: [live_from, live_to],
        },
        Statement {
            query: "live: the last hour",
            name: "first tokens",
            sql: "SELECT bucket, bin, count FROM usage_ttft_minute WHERE bucket >= $1 AND bucket < $2 \
                  ORDER BY bucket, bin"
                .to_owned(),
            binds: [live_from, live_to],
        },
    ]
}

/// Each statement on `$conn`: its plan (`$explain` before it, the plan's text in column `$column`), then its time
/// alone, [`STATEMENT_RUNS`] times. The same on both backends but for the connection's type.
macro_rules! explain_each {
    ($statements:expr, $conn:expr, $explain:literal, $column:literal) => {{
        let mut plans = Vec::with_capacity($statements.len());
        for s in $statements {
            let explained = sqlx::query(sqlx::AssertSqlSafe(format!(concat!($explain, " {}"), s.sql)))
                .bind(s.binds[0])
                .bind(s.binds[1])
                .fetch_all(&mut $conn)
                .await?;
            let plan = explained
                .iter()
                .map(|row| row.try_get::<String, _>($column))
                .collect::<Result<Vec<_>, _>>()?
                .join("\n");
            let mut times = Vec::with_capacity(STATEMENT_RUNS);
            let mut rows = 0;
            for _ in 0..STATEMENT_RUNS {
                let started = Instant::now();
                rows = sqlx::query(sqlx::AssertSqlSafe(s.sql.clone()))
                    .bind(s.binds[0])
                    .bind(s.binds[1])
                    .fetch_all(&mut $conn)
                    .await?
                    .len();
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
            plans.push(plan_of(s, plan, &times, rows));
        }
        plans
    }};
}

/// Each query's statements: plan, and median time alone.
pub async fn plans(target: &Target, from: Millis) -> anyhow::Result<Vec<Plan>> {
    let statements = statements(from, now_ms());
    let plans = match target {
        Target::Sqlite(dir) => {
            let mut conn = sqlite(dir).await?;
            let plans = explain_each!(&statements, conn, "EXPLAIN QUERY PLAN", 3);
            conn.close().await?;
            plans
        }
        Target::Postgres(url) => {
            let mut conn = PgConnection::connect(url).await?;
            let plans = explain_each!(&statements, conn, "EXPLAIN (ANALYZE, BUFFERS)", 0);
            conn.close().await?;
            plans
        }
    };
    Ok(plans)
}

fn plan_of(s: &Statement, plan: String, times: &[f64], rows: usize) -> Plan {
    Plan {
        query: s.query.to_owned(),
        statement: s.name.to_owned(),
        sql: s.sql.clone(),
        plan,
        median_ms: median(times).unwrap_or(0.0),
        rows,
    }
}
