//! The statements of usage recording (SPEC §14), the same on both backends: a batch of requests is written as its
//! rows, the sums it adds to each roll-up and the names of its principals, in one transaction; series are read from
//! the coarsest roll-up that answers the question.
//!
//! A batch's sums are added up in memory first, one row per roll-up key, and written in key order: PostgreSQL refuses
//! to update one row twice in one statement, and routers that add to the same rows in the same order never deadlock.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::clock::Millis;
use crate::model::usage::{GroupBy, Step, UsageRecord, UsageSums};

/// The roll-up tables: per (bucket, principal, model) for each step, per (bucket, node, model) by hour and day, and
/// per (bucket, model) for each step (what the fleet's series and the split by model read: a few rows a bucket,
/// where the principal tables have one per principal and model).
pub const PRINCIPAL_ROLLUPS: [(&str, Step); 3] =
    [("usage_minute", Step::Minute), ("usage_hour", Step::Hour), ("usage_day", Step::Day)];
pub const NODE_ROLLUPS: [(&str, Step); 2] = [("usage_node_hour", Step::Hour), ("usage_node_day", Step::Day)];
pub const MODEL_ROLLUPS: [(&str, Step); 3] =
    [("usage_model_minute", Step::Minute), ("usage_model_hour", Step::Hour), ("usage_model_day", Step::Day)];

/// Times to first token are counted per minute in bins 25 % wide: bin `b` holds times up to 1.25^b ms.
pub const TTFT_BIN_GROWTH: f64 = 1.25;
/// The last bin: everything from about 1.25^63 ms (a day and more) up.
pub const TTFT_LAST_BIN: u32 = 63;

/// The bin of a time to first token of `ms` milliseconds.
pub fn ttft_bin(ms: u32) -> u32 {
    if ms <= 1 {
        return 0;
    }
    let bin = (f64::from(ms).ln() / TTFT_BIN_GROWTH.ln()).ceil();
    (bin as u32).min(TTFT_LAST_BIN)
}

/// The largest time bin `bin` holds, in milliseconds.
pub fn ttft_bin_top(bin: u32) -> u32 {
    TTFT_BIN_GROWTH.powi(bin as i32).floor() as u32
}

/// One row a batch adds to a roll-up table: the bucket, the key's values beside it, the sums.
pub type Row<'a> = (Millis, Vec<&'a str>, UsageSums);

/// What `batch` adds to the roll-up of `step` keyed by its principal and model, in key order.
pub fn by_principal(batch: &[UsageRecord], step: Step) -> Vec<Row<'_>> {
    let mut sums: BTreeMap<(Millis, &str, &str), UsageSums> = BTreeMap::new();
    for record in batch {
        sums.entry((step.floor(record.at), &*record.principal, &*record.model)).or_default().add(&record.sums());
    }
    sums.into_iter().map(|((bucket, principal, model), s)| (bucket, vec![principal, model], s)).collect()
}

/// What `batch` adds to the roll-up of `step` keyed by its model alone, in key order.
pub fn by_model(batch: &[UsageRecord], step: Step) -> Vec<Row<'_>> {
    let mut sums: BTreeMap<(Millis, &str), UsageSums> = BTreeMap::new();
    for record in batch {
        sums.entry((step.floor(record.at), &*record.model)).or_default().add(&record.sums());
    }
    sums.into_iter().map(|((bucket, model), s)| (bucket, vec![model], s)).collect()
}

/// What `batch` adds to the node roll-up of `step`, in key order; requests refused before any node add nothing. The
/// nodes' ids as text, once each, are kept in `names`.
pub fn by_node<'a>(batch: &'a [UsageRecord], step: Step, names: &'a NodeNames) -> Vec<Row<'a>> {
    let mut sums: BTreeMap<(Millis, &str, &str), UsageSums> = BTreeMap::new();
    for record in batch {
        let Some(node) = record.node.and_then(|id| names.get(&id)) else { continue };
        sums.entry((step.floor(record.at), &**node, &*record.model)).or_default().add(&record.sums());
    }
    sums.into_iter().map(|((bucket, node, model), s)| (bucket, vec![node, model], s)).collect()
}

/// The nodes of a batch, with their ids as text.
pub type NodeNames = BTreeMap<Uuid, Arc<str>>;

pub fn node_names(batch: &[UsageRecord]) -> NodeNames {
    batch.iter().filter_map(|r| r.node).map(|id| (id, Arc::from(id.to_string()))).collect()
}

/// Streamed requests per (minute, time-to-first-token bin), in key order.
pub fn batch_first_token_bins(batch: &[UsageRecord]) -> Vec<(Millis, i64, i64)> {
    let mut bins: BTreeMap<(Millis, u32), i64> = BTreeMap::new();
    for record in batch {
        if let Some(ms) = record.ttft_ms {
            *bins.entry((Step::Minute.floor(record.at), ttft_bin(ms))).or_default() += 1;
        }
    }
    bins.into_iter().map(|((bucket, bin), count)| (bucket, i64::from(bin), count)).collect()
}

/// The table a series of `step` split by `group_by`, of one principal or not, is read from: the model roll-ups
/// whenever no principal is asked for, the node roll-ups for nodes.
pub fn series_table(step: Step, group_by: Option<GroupBy>, of_principal: bool) -> &'static str {
    match (group_by, of_principal, step) {
        (Some(GroupBy::Node), _, Step::Day) => "usage_node_day",
        (Some(GroupBy::Node), _, _) => "usage_node_hour",
        (None | Some(GroupBy::Model), false, Step::Minute) => "usage_model_minute",
        (None | Some(GroupBy::Model), false, Step::Hour) => "usage_model_hour",
        (None | Some(GroupBy::Model), false, Step::Day) => "usage_model_day",
        (_, _, Step::Minute) => "usage_minute",
        (_, _, Step::Hour) => "usage_hour",
        (_, _, Step::Day) => "usage_day",
    }
}

/// The principal roll-up of `step`: what limits read spending from.
pub fn principal_table(step: Step) -> &'static str {
    match step {
        Step::Minute => "usage_minute",
        Step::Hour => "usage_hour",
        Step::Day => "usage_day",
    }
}

/// Every roll-up table, pruned by bucket.
pub fn all_rollups() -> impl Iterator<Item = &'static str> {
    PRINCIPAL_ROLLUPS
        .into_iter()
        .chain(NODE_ROLLUPS)
        .chain(MODEL_ROLLUPS)
        .map(|(table, _)| table)
        .chain(["usage_ttft_minute"])
}

/// Buckets removed per transaction when old roll-ups are pruned.
pub const PRUNE_BUCKETS: i64 = 120;

/// The summed columns, in the order every statement reads and writes them.
pub const SUM_COLUMNS: &str =
    "requests, errors, rejected, prompt_tokens, completion_tokens, unknown_usage, duration_ms";

/// Defines the usage statements for one backend: `$db` its database type, `$conn` its connection.
macro_rules! usage_statements {
    ($db:ty, $conn:ty) => {
        use sqlx::{QueryBuilder, Row};
        use uuid::Uuid;

        use super::{
            MODEL_ROLLUPS, NODE_ROLLUPS, PRINCIPAL_ROLLUPS, PRUNE_BUCKETS, Row as SumRow, SUM_COLUMNS, by_model, by_node,
            batch_first_token_bins, by_principal, node_names,
        };
        use crate::clock::Millis;
        use crate::model::usage::{
            GroupBy, RecordedRequest, RequestQuery, SeriesQuery, Tokens, UsageBucket, UsageRecord, UsageSums,
        };
        use crate::store::StoreError;

        type Conn = $conn;

        fn count(value: u64) -> i64 {
            i64::try_from(value).unwrap_or(i64::MAX)
        }

        /// Writes a batch of records: rows, roll-ups, principals' names.
        pub async fn insert_usage(conn: &mut Conn, batch: &[UsageRecord]) -> Result<(), StoreError> {
            // Eleven values a row, well under SQLite's 32,766 bound values.
            for chunk in batch.chunks(2_000) {
                let mut insert = QueryBuilder::<$db>::new(
                    "INSERT INTO usage_requests (at, principal, model, node, status, prompt_tokens, \
                     completion_tokens, ttft_ms, duration_ms, retries, stream) ",
                );
                insert.push_values(chunk, |mut row, r| {
                    row.push_bind(r.at)
                        .push_bind(&*r.principal)
                        .push_bind(&*r.model)
                        .push_bind(r.node.map(|id| id.to_string()))
                        .push_bind(i64::from(r.status))
                        .push_bind(r.tokens.map(|t| count(t.prompt)))
                        .push_bind(r.tokens.map(|t| count(t.completion)))
                        .push_bind(r.ttft_ms.map(i64::from))
                        .push_bind(i64::from(r.duration_ms))
                        .push_bind(i64::from(r.retries))
                        .push_bind(r.stream);
                });
                insert.build().execute(&mut *conn).await?;
            }
            let mut names = std::collections::BTreeMap::new();
            for r in batch {
                names.insert(&*r.principal, (&*r.principal_name, r.at));
            }
            let names: Vec<_> = names.into_iter().collect();
            for chunk in names.chunks(5_000) {
                let mut upsert = QueryBuilder::<$db>::new("INSERT INTO usage_principals (principal, name, last_seen) ");
                upsert.push_values(chunk, |mut row, (principal, (name, at))| {
                    row.push_bind(*principal).push_bind(*name).push_bind(*at);
                });
                upsert.push(
                    " ON CONFLICT (principal) DO UPDATE SET name = excluded.name, last_seen = excluded.last_seen",
                );
                upsert.build().execute(&mut *conn).await?;
            }
            for (table, step) in PRINCIPAL_ROLLUPS {
                add_sums(conn, table, "principal, model", &by_principal(batch, step)).await?;
            }
            let names = node_names(batch);
            for (table, step) in NODE_ROLLUPS {
                add_sums(conn, table, "node, model", &by_node(batch, step, &names)).await?;
            }
            for (table, step) in MODEL_ROLLUPS {
                add_sums(conn, table, "model", &by_model(batch, step)).await?;
            }
            let bins = batch_first_token_bins(batch);
            for chunk in bins.chunks(5_000) {
                let mut upsert = QueryBuilder::<$db>::new("INSERT INTO usage_ttft_minute (bucket, bin, count) ");
                upsert.push_values(chunk, |mut row, (bucket, bin, n)| {
                    row.push_bind(*bucket).push_bind(*bin).push_bind(*n);
                });
                upsert.push(" ON CONFLICT (bucket, bin) DO UPDATE SET count = usage_ttft_minute.count + excluded.count");
                upsert.build().execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// Adds `rows` to a roll-up table whose key beside its bucket is the columns `key`.
        async fn add_sums(conn: &mut Conn, table: &str, key: &str, rows: &[SumRow<'_>]) -> Result<(), StoreError> {
            let update = SUM_COLUMNS
                .split(", ")
                .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            // At most ten values a row.
            for chunk in rows.chunks(3_000) {
                let mut upsert = QueryBuilder::<$db>::new(format!(
                    "INSERT INTO {table} (bucket, {key}, {SUM_COLUMNS}) "
                ));
                upsert.push_values(chunk, |mut row, (bucket, keys, s)| {
                    row.push_bind(*bucket);
                    for key in keys {
                        row.push_bind(*key);
                    }
                    for sum in s.columns() {
                        row.push_bind(count(sum));
                    }
                });
                upsert.push(format!(" ON CONFLICT (bucket, {key}) DO UPDATE SET {update}"));
                upsert.build().execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// The buckets of a series, oldest first.
        pub async fn usage_series(conn: &mut Conn, q: &SeriesQuery) -> Result<Vec<UsageBucket>, StoreError> {
            let table = super::series_table(q.step, q.group_by, q.principal.is_some());
            let group = match q.group_by {
                None => "NULL",
                Some(GroupBy::Principal) => "principal",
                Some(GroupBy::Model) => "model",
                Some(GroupBy::Node) => "node",
            };
            let summed = SUM_COLUMNS
                .split(", ")
                .map(|c| format!("CAST(SUM({c}) AS BIGINT)"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut query = QueryBuilder::<$db>::new(format!("SELECT bucket, {group}, {summed} FROM {table} WHERE bucket >= "));
            query.push_bind(q.step.floor(q.from)).push(" AND bucket < ").push_bind(q.to);
            if let Some(principal) = &q.principal {
                query.push(" AND principal = ").push_bind(principal.as_str());
            }
            if let Some(model) = &q.model {
                query.push(" AND model = ").push_bind(model.as_str());
            }
            query.push(" GROUP BY bucket");
            if q.group_by.is_some() {
                query.push(format!(", {group}"));
            }
            query.push(" ORDER BY bucket");
            let rows = query.build().fetch_all(conn).await?;
            let mut buckets = Vec::with_capacity(rows.len());
            for row in &rows {
                let int = |i: usize| -> Result<u64, StoreError> {
                    Ok(u64::try_from(row.try_get::<Option<i64>, _>(i)?.unwrap_or(0)).unwrap_or(0))
                };
                buckets.push(UsageBucket {
                    at: row.try_get(0)?,
                    group: if q.group_by.is_some() { row.try_get(1)? } else { None },
                    sums: UsageSums {
                        requests: int(2)?,
                        errors: int(3)?,
                        rejected: int(4)?,
                        prompt_tokens: int(5)?,
                        completion_tokens: int(6)?,
                        unknown_usage: int(7)?,
                        duration_ms: int(8)?,
                    },
                });
            }
            Ok(buckets)
        }

        /// A page of recorded requests, newest first.
        pub async fn usage_requests(conn: &mut Conn, q: &RequestQuery) -> Result<Vec<RecordedRequest>, StoreError> {
            let mut query = QueryBuilder::<$db>::new(
                "SELECT r.id, r.at, r.principal, COALESCE(p.name, r.principal), r.model, r.node, r.status, \
                 r.prompt_tokens, r.completion_tokens, r.ttft_ms, r.duration_ms, r.retries, r.stream \
                 FROM usage_requests r LEFT JOIN usage_principals p ON p.principal = r.principal WHERE r.id < ",
            );
            query.push_bind(q.before.unwrap_or(i64::MAX));
            if let Some(from) = q.from {
                query.push(" AND r.at >= ").push_bind(from);
            }
            if let Some(to) = q.to {
                query.push(" AND r.at < ").push_bind(to);
            }
            if let Some(principal) = &q.principal {
                query.push(" AND r.principal = ").push_bind(principal.as_str());
            }
            if let Some(model) = &q.model {
                query.push(" AND r.model = ").push_bind(model.as_str());
            }
            if let Some(node) = q.node {
                query.push(" AND r.node = ").push_bind(node.to_string());
            }
            query.push(" ORDER BY r.id DESC LIMIT ").push_bind(i64::from(q.limit));
            let rows = query.build().fetch_all(conn).await?;
            let mut page = Vec::with_capacity(rows.len());
            for row in &rows {
                let small = |i: usize| -> Result<Option<u32>, StoreError> {
                    Ok(row.try_get::<Option<i64>, _>(i)?.map(|v| u32::try_from(v).unwrap_or(u32::MAX)))
                };
                let prompt: Option<i64> = row.try_get(7)?;
                let completion: Option<i64> = row.try_get(8)?;
                let tokens = match (prompt, completion) {
                    (Some(p), Some(c)) => Some(Tokens {
                        prompt: u64::try_from(p).unwrap_or(0),
                        completion: u64::try_from(c).unwrap_or(0),
                    }),
                    _ => None,
                };
                let node: Option<String> = row.try_get(5)?;
                let principal: String = row.try_get(2)?;
                let name: String = row.try_get(3)?;
                let model: String = row.try_get(4)?;
                page.push(RecordedRequest {
                    id: row.try_get(0)?,
                    record: UsageRecord {
                        at: row.try_get(1)?,
                        principal: principal.into(),
                        principal_name: name.into(),
                        model: model.into(),
                        node: node.and_then(|n| Uuid::parse_str(&n).ok()),
                        status: u16::try_from(row.try_get::<i64, _>(6)?).unwrap_or(0),
                        tokens,
                        ttft_ms: small(9)?,
                        duration_ms: small(10)?.unwrap_or(0),
                        retries: u8::try_from(row.try_get::<i64, _>(11)?).unwrap_or(u8::MAX),
                        stream: row.try_get(12)?,
                    },
                });
            }
            Ok(page)
        }

        /// Tokens (and requests) per principal in a roll-up table since `since`.
        pub async fn spent_since(
            conn: &mut Conn,
            table: &'static str,
            since: Millis,
        ) -> Result<Vec<(String, u64, u64)>, StoreError> {
            let sql = format!(
                "SELECT principal, CAST(SUM(requests) AS BIGINT), CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) \
                 FROM {table} WHERE bucket >= $1 GROUP BY principal"
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(since).fetch_all(conn).await?;
            let mut spent = Vec::with_capacity(rows.len());
            for row in &rows {
                let requests: Option<i64> = row.try_get(1)?;
                let tokens: Option<i64> = row.try_get(2)?;
                spent.push((
                    row.try_get(0)?,
                    u64::try_from(requests.unwrap_or(0)).unwrap_or(0),
                    u64::try_from(tokens.unwrap_or(0)).unwrap_or(0),
                ));
            }
            Ok(spent)
        }

        /// The names of the principals seen.
        pub async fn principal_names(conn: &mut Conn) -> Result<Vec<(String, String)>, StoreError> {
            let rows = sqlx::query("SELECT principal, name FROM usage_principals").fetch_all(conn).await?;
            let mut names = Vec::with_capacity(rows.len());
            for row in &rows {
                names.push((row.try_get(0)?, row.try_get(1)?));
            }
            Ok(names)
        }

        /// The streamed requests' time-to-first-token bins of the minutes from `from` to `to`: (minute, bin, count).
        pub async fn first_token_bins(conn: &mut Conn, from: Millis, to: Millis) -> Result<Vec<(Millis, u32, u64)>, StoreError> {
            let rows = sqlx::query(
                "SELECT bucket, bin, count FROM usage_ttft_minute WHERE bucket >= $1 AND bucket < $2 ORDER BY bucket, bin",
            )
            .bind(from)
            .bind(to)
            .fetch_all(conn)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let bin: i64 = row.try_get(1)?;
                let n: i64 = row.try_get(2)?;
                out.push((row.try_get(0)?, u32::try_from(bin).unwrap_or(0), u64::try_from(n).unwrap_or(0)));
            }
            Ok(out)
        }

        /// Removes the oldest buckets before `cutoff` of a roll-up table, at most [`PRUNE_BUCKETS`]; returns the
        /// rows removed.
        pub async fn prune_rollup(conn: &mut Conn, table: &'static str, cutoff: Millis) -> Result<u64, StoreError> {
            let sql = format!(
                "DELETE FROM {table} WHERE bucket IN \
                 (SELECT DISTINCT bucket FROM {table} WHERE bucket < $1 ORDER BY bucket LIMIT $2)"
            );
            let done = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cutoff).bind(PRUNE_BUCKETS).execute(conn).await?;
            Ok(done.rows_affected())
        }
    };
}

/// The usage statements on SQLite.
pub mod sqlite {
    usage_statements!(sqlx::Sqlite, sqlx::SqliteConnection);
}

/// The usage statements on PostgreSQL.
pub mod postgres {
    usage_statements!(sqlx::Postgres, sqlx::PgConnection);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_to_first_token_falls_in_a_bin_whose_top_is_within_a_quarter_above_it() {
        assert_eq!((ttft_bin(0), ttft_bin(1)), (0, 0));
        for ms in [2, 3, 10, 99, 250, 1_000, 12_345, 600_000] {
            let top = ttft_bin_top(ttft_bin(ms));
            assert!(top >= ms - 1 && f64::from(top) <= f64::from(ms) * TTFT_BIN_GROWTH + 1.0, "{ms} ms: top {top}");
        }
        assert_eq!(ttft_bin(u32::MAX), TTFT_LAST_BIN);
    }

    #[test]
    fn series_without_a_principal_read_the_model_sums() {
        assert_eq!(series_table(Step::Hour, Some(GroupBy::Model), false), "usage_model_hour");
        assert_eq!(series_table(Step::Day, None, false), "usage_model_day");
        assert_eq!(series_table(Step::Day, None, true), "usage_day");
        assert_eq!(series_table(Step::Minute, Some(GroupBy::Principal), false), "usage_minute");
        assert_eq!(series_table(Step::Hour, Some(GroupBy::Node), false), "usage_node_hour");
    }
}
