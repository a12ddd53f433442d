//! Writes the state a router's database is in after it recorded the workload: the roll-ups of the whole period, and
//! the raw rows of its last days (what the router keeps after its pruning).
//!
//! 1. The older days are summed here, minute by minute, with the router's own sums of each record
//!    ([`UsageRecord::sums`]), and written straight into the roll-up tables, keyed as the router keys them: per
//!    (minute, hour, day; principal; model) and per (hour, day; node; model). SQLite: many rows per `INSERT` in one
//!    transaction per day; PostgreSQL: `COPY`. The principals' names go into `usage_principals`.
//!    The per-model roll-ups are then added up from the principal ones in SQL, as the router's writes would have.
//! 2. The last `--raw-days` are written through the router's own storage code ([`UsageStore::insert_usage`]) in
//!    batches of `--batch` records, oldest first: their raw rows and what they add to the roll-ups are the router's
//!    own. A bucket that straddles the two phases gets both: the router's upsert adds to the row written in step 1.
//! 3. The minutes that passed while writing are written the same way, so that the data reaches the present (the
//!    dashboard's last hour).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use llm_router::clock::Millis;
use llm_router::model::usage::{Step, UsageRecord, UsageSums};
use llm_router::store::Store;
use llm_router::store::sqlite::SqliteStore;
use llm_router::store::usage_sql::SUM_COLUMNS;
use serde::Serialize;
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::workload::{DAY_MS, Workload};

/// The roll-up tables, with the column beside bucket and model.
pub const ROLLUPS: [(&str, &str); 5] = [
    ("usage_minute", "principal"),
    ("usage_hour", "principal"),
    ("usage_day", "principal"),
    ("usage_node_hour", "node"),
    ("usage_node_day", "node"),
];

/// The per-model roll-ups, each derived from the principal roll-up of its step once the summed phase is written.
const MODEL_ROLLUPS: [(&str, &str); 3] =
    [("usage_minute", "usage_model_minute"), ("usage_hour", "usage_model_hour"), ("usage_day", "usage_model_day")];

/// The summed columns of every roll-up, in the router's order.
const SUMS: &str = "requests, errors, rejected, prompt_tokens, completion_tokens, unknown_usage, duration_ms";

/// Rows per multi-row `INSERT` on SQLite: ten values a row, under its 32,766 bound values.
const SQLITE_ROWS_PER_INSERT: usize = 3_000;

/// Rows buffered per table before they are written.
const ROWS_PER_WRITE: usize = 100_000;

/// Where the state goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// `router.db` in this data directory.
    Sqlite(std::path::PathBuf),
    /// This (fresh) PostgreSQL database.
    Postgres(String),
}

impl Target {
    /// The router's store on the target (migrations applied).
    pub async fn open(&self) -> anyhow::Result<Store> {
        Ok(match self {
            Target::Sqlite(dir) => Arc::new(SqliteStore::open(&dir.join("router.db")).await?),
            Target::Postgres(url) => llm_router::store::postgres::open(url).await?,
        })
    }
}

/// What was written, and how long it took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Filled {
    /// Requests in the state, over all phases.
    pub requests: u64,
    /// Of them, summed into the roll-ups directly (phase 1).
    pub summed: u64,
    /// Of them, written as raw rows through the router's storage code (phases 2 and 3).
    pub raw_rows: u64,
    /// The first minute and the end of the last one written.
    pub from_ms: Millis,
    pub to_ms: Millis,
    /// Where phase 2 began.
    pub raw_from_ms: Millis,
    pub summed_secs: f64,
    pub raw_secs: f64,
    /// Records per second through `insert_usage`.
    pub raw_records_per_sec: f64,
    /// Minutes written after the period, to reach the present.
    pub caught_up_minutes: u64,
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

/// Writes the workload's state into `target`: all but the last `raw_days` summed, those as raw rows in batches of
/// `batch`, then (when `catch_up`) the minutes up to the present.
pub async fn fill(
    workload: &Workload,
    target: &Target,
    raw_days: u32,
    batch: usize,
    catch_up: bool,
) -> anyhow::Result<Filled> {
    let raw_minutes = (u64::from(raw_days) * 1440).min(workload.minutes);
    let first_raw = workload.minutes - raw_minutes;
    let mut filled = Filled { from_ms: workload.start, raw_from_ms: workload.minute(first_raw), ..Filled::default() };
    // The schema, as the router makes it.
    target.open().await?.close().await;

    let started = Instant::now();
    let mut sink = Sink::connect(target, workload).await?;
    filled.summed = sum_directly(workload, 0..first_raw, &mut sink).await?;
    sink.names(workload, filled.raw_from_ms).await?;
    sink.close().await?;
    filled.summed_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let store = target.open().await?;
    let mut writer =
        RawWriter { store: &store, batch, pending: Vec::with_capacity(batch), written: 0, last_report: started };
    let mut next = first_raw;
    while next < workload.minutes {
        writer.minute(workload, next).await?;
        next += 1;
    }
    // Catch up with the present: the minutes that ended while writing (and while those were written).
    while catch_up && workload.minute(next) < Step::Minute.floor(now_ms()) {
        let now_minute = Step::Minute.floor(now_ms());
        while workload.minute(next) < now_minute {
            writer.minute(workload, next).await?;
            filled.caught_up_minutes += 1;
            next += 1;
        }
    }
    writer.flush().await?;
    store.upkeep().await?;
    store.close().await;
    filled.raw_rows = writer.written;
    filled.raw_secs = started.elapsed().as_secs_f64();
    filled.raw_records_per_sec = filled.raw_rows as f64 / filled.raw_secs.max(1e-9);
    filled.requests = filled.summed + filled.raw_rows;
    filled.to_ms = workload.minute(next);
    Ok(filled)
}

/// Sums the records of `minutes` and writes them into the roll-ups; returns how many requests.
async fn sum_directly(workload: &Workload, minutes: std::ops::Range<u64>, sink: &mut Sink) -> anyhow::Result<u64> {
    let mut sums = Rollups::new(workload);
    let mut records = Vec::new();
    let mut requests = 0;
    let mut last_report = Instant::now();
    let total = minutes.end - minutes.start;
    for i in minutes.clone() {
        let at = workload.minute(i);
        let new_day = i > minutes.start && Step::Day.floor(at) != sums.day;
        sums.turn(at, sink).await?;
        if new_day {
            // The day's rows are written and committed (one transaction per day on SQLite).
            sink.end_day().await?;
        }
        records.clear();
        workload.records(i, &mut records);
        requests += records.len() as u64;
        for record in &records {
            sums.add(workload, record);
        }
        if last_report.elapsed().as_secs() >= 10 {
            last_report = Instant::now();
            eprintln!("  summed {} of {total} minutes, {requests} requests...", i - minutes.start + 1);
        }
    }
    if !minutes.is_empty() {
        sums.finish(sink).await?;
        sink.end_day().await?;
    }
    Ok(requests)
}

/// The sums being added up: this minute's, hour's and day's per (principal, model), this hour's and day's per
/// (node, model); dense, indexed by `key * models + model`.
struct Rollups {
    models: usize,
    minute: Millis,
    hour: Millis,
    day: Millis,
    by_minute: Vec<UsageSums>,
    by_hour: Vec<UsageSums>,
    by_day: Vec<UsageSums>,
    node_hour: Vec<UsageSums>,
    node_day: Vec<UsageSums>,
    /// Principals, nodes and models in the order of their names: the order of the tables' keys.
    principal_order: Vec<usize>,
    node_order: Vec<usize>,
    model_order: Vec<usize>,
    principal_of: std::collections::HashMap<Arc<str>, usize>,
    node_of: std::collections::HashMap<uuid::Uuid, usize>,
}

impl Rollups {
    fn new(workload: &Workload) -> Rollups {
        let (p, n, m) = (workload.principals.len(), workload.nodes.len(), workload.models.len());
        let order = |names: Vec<String>| {
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by(|&a, &b| names[a].cmp(&names[b]));
            order
        };
        Rollups {
            models: m,
            minute: Millis::MIN,
            hour: Millis::MIN,
            day: Millis::MIN,
            by_minute: vec![UsageSums::default(); p * m],
            by_hour: vec![UsageSums::default(); p * m],
            by_day: vec![UsageSums::default(); p * m],
            node_hour: vec![UsageSums::default(); n * m],
            node_day: vec![UsageSums::default(); n * m],
            principal_order: order(workload.principals.iter().map(|p| p.id.to_string()).collect()),
            node_order: order(workload.nodes.iter().map(|n| n.to_string()).collect()),
            model_order: order(workload.models.iter().map(|m| m.to_string()).collect()),
            principal_of: workload.principals.iter().enumerate().map(|(i, p)| (p.id.clone(), i)).collect(),
            node_of: workload.nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect(),
        }
    }

    fn add(&mut self, workload: &Workload, record: &UsageRecord) {
        let sums = record.sums();
        let model = workload.model_index(&record.model).unwrap_or(0);
        let principal = self.principal_of[&record.principal];
        for table in [&mut self.by_minute, &mut self.by_hour, &mut self.by_day] {
            table[principal * self.models + model].add(&sums);
        }
        if let Some(node) = record.node {
            let node = self.node_of[&node];
            for table in [&mut self.node_hour, &mut self.node_day] {
                table[node * self.models + model].add(&sums);
            }
        }
    }

    /// Moves to the minute starting at `at`: writes the buckets that ended.
    async fn turn(&mut self, at: Millis, sink: &mut Sink) -> anyhow::Result<()> {
        if self.minute != Millis::MIN && at != self.minute {
            self.write_minute(sink).await?;
        }
        if self.hour != Millis::MIN && Step::Hour.floor(at) != self.hour {
            self.write_hour(sink).await?;
        }
        if self.day != Millis::MIN && Step::Day.floor(at) != self.day {
            self.write_day(sink).await?;
        }
        self.minute = at;
        self.hour = Step::Hour.floor(at);
        self.day = Step::Day.floor(at);
        Ok(())
    }

    /// Writes what is left: the last minute, and the hour and day it is in (their rest comes from the raw phase).
    async fn finish(&mut self, sink: &mut Sink) -> anyhow::Result<()> {
        self.write_minute(sink).await?;
        self.write_hour(sink).await?;
        self.write_day(sink).await
    }

    async fn write_minute(&mut self, sink: &mut Sink) -> anyhow::Result<()> {
        let rows = take_rows(&mut self.by_minute, self.minute, &self.principal_order, &self.model_order);
        sink.write(0, rows).await
    }

    async fn write_hour(&mut self, sink: &mut Sink) -> anyhow::Result<()> {
        let rows = take_rows(&mut self.by_hour, self.hour, &self.principal_order, &self.model_order);
        sink.write(1, rows).await?;
        let rows = take_rows(&mut self.node_hour, self.hour, &self.node_order, &self.model_order);
        sink.write(3, rows).await
    }

    async fn write_day(&mut self, sink: &mut Sink) -> anyhow::Result<()> {
        let rows = take_rows(&mut self.by_day, self.day, &self.principal_order, &self.model_order);
        sink.write(2, rows).await?;
        let rows = take_rows(&mut self.node_day, self.day, &self.node_order, &self.model_order);
        sink.write(4, rows).await
    }
}

/// One row of a roll-up table: bucket, key (principal or node index), model index, sums.
#[derive(Debug, Clone, Copy)]
struct Row {
    bucket: Millis,
    key: usize,
    model: usize,
    sums: UsageSums,
}

/// The rows of `table` that saw requests, in key order, and the table emptied.
fn take_rows(table: &mut [UsageSums], bucket: Millis, keys: &[usize], models: &[usize]) -> Vec<Row> {
    let per_key = models.len();
    let mut rows = Vec::new();
    for &key in keys {
        for &model in models {
            let sums = std::mem::take(&mut table[key * per_key + model]);
            if sums.requests > 0 {
                rows.push(Row { bucket, key, model, sums });
            }
        }
    }
    rows
}

/// Where summed rows are written: a connection of the bench's own, beside the router's code.
struct Sink {
    conn: Conn,
    /// Names of principals, nodes and models, by index.
    principals: Vec<String>,
    nodes: Vec<String>,
    models: Vec<String>,
    /// Rows waiting, per roll-up table (in the order of [`ROLLUPS`]).
    pending: [Vec<Row>; 5],
    in_transaction: bool,
}

enum Conn {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Sink {
    async fn connect(target: &Target, workload: &Workload) -> anyhow::Result<Sink> {
        let conn = match target {
            Target::Sqlite(dir) => {
                // A bulk load: the router's own durability is not needed while the state is built.
                let options = SqliteConnectOptions::new()
                    .filename(dir.join("router.db"))
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Off);
                Conn::Sqlite(SqliteConnection::connect_with(&options).await.context("opening the SQLite database")?)
            }
            Target::Postgres(url) => {
                Conn::Postgres(PgConnection::connect(url).await.context("connecting to PostgreSQL")?)
            }
        };
        Ok(Sink {
            conn,
            principals: workload.principals.iter().map(|p| p.id.to_string()).collect(),
            nodes: workload.nodes.iter().map(|n| n.to_string()).collect(),
            models: workload.models.iter().map(|m| m.to_string()).collect(),
            pending: Default::default(),
            in_transaction: false,
        })
    }

    async fn write(&mut self, table: usize, rows: Vec<Row>) -> anyhow::Result<()> {
        self.pending[table].extend(rows);
        if self.pending[table].len() >= ROWS_PER_WRITE {
            self.flush(table).await?;
        }
        Ok(())
    }

    /// Writes every table's waiting rows; on SQLite, commits the day's transaction.
    async fn end_day(&mut self) -> anyhow::Result<()> {
        for table in 0..ROLLUPS.len() {
            self.flush(table).await?;
        }
        if self.in_transaction
            && let Conn::Sqlite(conn) = &mut self.conn
        {
            sqlx::query("COMMIT").execute(&mut *conn).await?;
            self.in_transaction = false;
        }
        Ok(())
    }

    async fn flush(&mut self, table: usize) -> anyhow::Result<()> {
        let rows = std::mem::take(&mut self.pending[table]);
        if rows.is_empty() {
            return Ok(());
        }
        let (name, key_column) = ROLLUPS[table];
        let keys = if key_column == "node" { &self.nodes } else { &self.principals };
        match &mut self.conn {
            Conn::Sqlite(conn) => {
                if !self.in_transaction {
                    sqlx::query("BEGIN").execute(&mut *conn).await?;
                    self.in_transaction = true;
                }
                for chunk in rows.chunks(SQLITE_ROWS_PER_INSERT) {
                    let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
                        "INSERT INTO {name} (bucket, {key_column}, model, {SUM_COLUMNS}) "
                    ));
                    insert.push_values(chunk, |mut row, r| {
                        row.push_bind(r.bucket)
                            .push_bind(keys[r.key].as_str())
                            .push_bind(self.models[r.model].as_str());
                        for sum in r.sums.columns() {
                            row.push_bind(count(sum));
                        }
                    });
                    insert.build().execute(&mut *conn).await.with_context(|| format!("writing {name}"))?;
                }
            }
            Conn::Postgres(conn) => {
                let mut text = String::with_capacity(rows.len() * 128);
                for r in &rows {
                    let sums: Vec<String> = r.sums.columns().iter().map(u64::to_string).collect();
                    let _ =
                        writeln!(text, "{}\t{}\t{}\t{}", r.bucket, keys[r.key], self.models[r.model], sums.join("\t"));
                }
                let mut copy = conn
                    .copy_in_raw(&format!("COPY {name} (bucket, {key_column}, model, {SUM_COLUMNS}) FROM STDIN"))
                    .await?;
                copy.send(text.as_bytes()).await?;
                copy.finish().await.with_context(|| format!("writing {name}"))?;
            }
        }
        Ok(())
    }

    /// Every principal's name, as the router keeps them, seen last at `at`.
    async fn names(&mut self, workload: &Workload, at: Millis) -> anyhow::Result<()> {
        let rows: Vec<(&str, &str)> = workload.principals.iter().map(|p| (&*p.id, &*p.name)).collect();
        for chunk in rows.chunks(5_000) {
            match &mut self.conn {
                Conn::Sqlite(conn) => {
                    let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "INSERT INTO usage_principals (principal, name, last_seen) ",
                    );
                    insert.push_values(chunk, |mut row, (id, name)| {
                        row.push_bind(*id).push_bind(*name).push_bind(at);
                    });
                    insert.build().execute(&mut *conn).await?;
                }
                Conn::Postgres(conn) => {
                    let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                        "INSERT INTO usage_principals (principal, name, last_seen) ",
                    );
                    insert.push_values(chunk, |mut row, (id, name)| {
                        row.push_bind(*id).push_bind(*name).push_bind(at);
                    });
                    insert.build().execute(&mut *conn).await?;
                }
            }
        }
        Ok(())
    }

    async fn close(mut self) -> anyhow::Result<()> {
        self.end_day().await?;
        // The per-model sums are the principal sums added up over principals, as the router's own writes make them.
        for (principal_table, model_table) in MODEL_ROLLUPS {
            let sql = format!(
                "INSERT INTO {model_table} (bucket, model, {SUMS}) SELECT bucket, model, {summed} FROM {principal_table} \
                 GROUP BY bucket, model",
                summed = SUMS.split(", ").map(|c| format!("SUM({c})")).collect::<Vec<_>>().join(", ")
            );
            match &mut self.conn {
                Conn::Sqlite(conn) => sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map(|_| ())?,
                Conn::Postgres(conn) => sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await.map(|_| ())?,
            }
        }
        match self.conn {
            Conn::Sqlite(mut conn) => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&mut conn).await?;
                conn.close().await?;
            }
            Conn::Postgres(conn) => conn.close().await?,
        }
        Ok(())
    }
}

fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Records of the raw phase, written in batches through the router's storage code.
struct RawWriter<'a> {
    store: &'a Store,
    batch: usize,
    pending: Vec<UsageRecord>,
    written: u64,
    last_report: Instant,
}

impl RawWriter<'_> {
    async fn minute(&mut self, workload: &Workload, i: u64) -> anyhow::Result<()> {
        workload.records(i, &mut self.pending);
        while self.pending.len() >= self.batch {
            let rest = self.pending.split_off(self.batch);
            self.write().await?;
            self.pending = rest;
        }
        if self.last_report.elapsed().as_secs() >= 10 {
            self.last_report = Instant::now();
            let day = (workload.minute(i) - workload.start) / DAY_MS;
            eprintln!("  {} raw rows written (day {} of {})...", self.written, day + 1, workload.minutes / 1440);
        }
        Ok(())
    }

    async fn write(&mut self) -> anyhow::Result<()> {
        self.store.insert_usage(&self.pending).await.context("writing a batch of usage records")?;
        // The router copies its write-ahead log into SQLite's file beside its writes, every 250 ms.
        self.store.upkeep().await?;
        self.written += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pending.is_empty() {
            self.write().await?;
        }
        Ok(())
    }
}

/// `router.db` of `dir`, and its write-ahead log.
pub fn sqlite_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("router.db"), dir.join("router.db-wal"))
}
