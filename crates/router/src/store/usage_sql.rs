//! The statements of usage recording (SPEC §14), the same on both backends: a batch of requests is written as its
//! rows, the sums it adds to each roll-up and the names of its principals, in one transaction; series are read from
//! the coarsest roll-up that answers the question.
//!
//! A batch's sums are added up in memory first, one row per roll-up key, and written in key order: PostgreSQL refuses
//! to update one row twice in one statement, and routers that add to the same rows in the same order never deadlock.

use std::collections::BTreeMap;

use crate::clock::Millis;
use crate::model::usage::{GroupBy, Step, UsageRecord, UsageSums};

/// The roll-up tables: per (bucket, principal, model) for each step, and per (bucket, node, model) by hour and day.
pub const PRINCIPAL_ROLLUPS: [(&str, Step); 3] =
    [("usage_minute", Step::Minute), ("usage_hour", Step::Hour), ("usage_day", Step::Day)];
pub const NODE_ROLLUPS: [(&str, Step); 2] = [("usage_node_hour", Step::Hour), ("usage_node_day", Step::Day)];

/// The sums of one roll-up table added by a batch, by key: (bucket, principal or node, model).
pub type Sums = BTreeMap<(Millis, String, String), UsageSums>;

/// What `batch` adds to the principal roll-up of `step`.
pub fn by_principal(batch: &[UsageRecord], step: Step) -> Sums {
    let mut sums = Sums::new();
    for record in batch {
        let key = (step.floor(record.at), record.principal.to_string(), record.model.to_string());
        sums.entry(key).or_default().add(&record.sums());
    }
    sums
}

/// What `batch` adds to the node roll-up of `step`; requests refused before any node add nothing.
pub fn by_node(batch: &[UsageRecord], step: Step) -> Sums {
    let mut sums = Sums::new();
    for record in batch {
        let Some(node) = record.node else { continue };
        let key = (step.floor(record.at), node.to_string(), record.model.to_string());
        sums.entry(key).or_default().add(&record.sums());
    }
    sums
}

/// The table a series of `step` split by `group_by` is read from.
pub fn series_table(step: Step, group_by: Option<GroupBy>) -> &'static str {
    match (group_by, step) {
        (Some(GroupBy::Node), Step::Day) => "usage_node_day",
        (Some(GroupBy::Node), _) => "usage_node_hour",
        (_, Step::Minute) => "usage_minute",
        (_, Step::Hour) => "usage_hour",
        (_, Step::Day) => "usage_day",
    }
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

        use super::{NODE_ROLLUPS, PRINCIPAL_ROLLUPS, PRUNE_BUCKETS, SUM_COLUMNS, Sums, by_node, by_principal};
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
                add_sums(conn, table, "principal", &by_principal(batch, step)).await?;
            }
            for (table, step) in NODE_ROLLUPS {
                add_sums(conn, table, "node", &by_node(batch, step)).await?;
            }
            Ok(())
        }

        /// Adds `sums` to the rows of a roll-up table whose key column beside bucket and model is `key`.
        async fn add_sums(conn: &mut Conn, table: &str, key: &str, sums: &Sums) -> Result<(), StoreError> {
            let sums: Vec<_> = sums.iter().collect();
            let update = SUM_COLUMNS
                .split(", ")
                .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            // Ten values a row.
            for chunk in sums.chunks(3_000) {
                let mut upsert = QueryBuilder::<$db>::new(format!(
                    "INSERT INTO {table} (bucket, {key}, model, {SUM_COLUMNS}) "
                ));
                upsert.push_values(chunk, |mut row, ((bucket, key, model), s)| {
                    row.push_bind(*bucket)
                        .push_bind(key.as_str())
                        .push_bind(model.as_str())
                        .push_bind(count(s.requests))
                        .push_bind(count(s.errors))
                        .push_bind(count(s.rejected))
                        .push_bind(count(s.prompt_tokens))
                        .push_bind(count(s.completion_tokens))
                        .push_bind(count(s.unknown_usage))
                        .push_bind(count(s.duration_ms));
                });
                upsert.push(format!(" ON CONFLICT (bucket, {key}, model) DO UPDATE SET {update}"));
                upsert.build().execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// The buckets of a series, oldest first.
        pub async fn usage_series(conn: &mut Conn, q: &SeriesQuery) -> Result<Vec<UsageBucket>, StoreError> {
            let table = super::series_table(q.step, q.group_by);
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

        /// Time to first token of the streamed requests since `since`: (arrival, milliseconds).
        pub async fn first_tokens_since(conn: &mut Conn, since: Millis, limit: i64) -> Result<Vec<(Millis, u32)>, StoreError> {
            let rows = sqlx::query(
                "SELECT at, ttft_ms FROM usage_requests WHERE at >= $1 AND ttft_ms IS NOT NULL ORDER BY at DESC LIMIT $2",
            )
            .bind(since)
            .bind(limit)
            .fetch_all(conn)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in &rows {
                let ttft: i64 = row.try_get(1)?;
                out.push((row.try_get(0)?, u32::try_from(ttft).unwrap_or(u32::MAX)));
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
