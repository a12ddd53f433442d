//! `llm-router migrate --from <sqlite file> --to postgres://…` (SPEC §11): copies everything a router keeps from
//! its SQLite database into a PostgreSQL one, in one transaction, and checks in it, by counting keys, that every row
//! is there before it commits. Tables are read a page at a time in one SQLite read transaction, so a long history
//! is never held in memory whole.
//!
//! Rows keep their ids (event ids included, and the sequences behind them move past them), so a second run finds
//! every row already there and adds nothing; an interrupted run left nothing behind. Nodes are read through the
//! SQLite backend's own start-up read, which rebuilds a node's lists from its child rows where a row lacks their
//! copy; PostgreSQL keeps the lists as that copy alone. The SQLite file is brought to the current schema first
//! (its migrations, as a start of the router would), and is otherwise only read: stop the router before.

use std::path::Path;

use anyhow::{Context, bail};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row, SqliteConnection};

use super::postgres;
use super::sqlite::SqliteStore;
use super::{NodeStore, StoredNode};

/// How a column is read from SQLite and bound for PostgreSQL.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Int,
    /// SQLite's 0/1, PostgreSQL's boolean.
    Bool,
}

/// A table copied row for row; its first column is its key.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// The sequence of an identity key, moved past the copied ids.
    identity: bool,
}

use Kind::{Bool, Int, Text};

/// Every table besides `nodes`, parents before children.
const TABLES: &[Table] = &[
    Table {
        name: "node_tokens",
        columns: &[("node_id", Text), ("token_hash", Text), ("created_at", Int)],
        identity: false,
    },
    Table {
        name: "node_events",
        columns: &[
            ("id", Int),
            ("node_id", Text),
            ("at", Int),
            ("from_status", Text),
            ("to_status", Text),
            ("reason", Text),
            ("actor", Text),
        ],
        identity: true,
    },
    Table {
        name: "users",
        columns: &[("username", Text), ("password_hash", Text), ("role", Text), ("created_at", Int), ("limits", Text)],
        identity: false,
    },
    Table {
        name: "sessions",
        columns: &[("token_hash", Text), ("username", Text), ("created_at", Int), ("expires_at", Int)],
        identity: false,
    },
    Table {
        name: "api_keys",
        columns: &[
            ("id", Text),
            ("name", Text),
            ("key_hash", Text),
            ("role", Text),
            ("created_by", Text),
            ("created_at", Int),
            ("scope", Text),
            ("limits", Text),
            ("weight", Int),
        ],
        identity: false,
    },
    Table {
        name: "join_tokens",
        columns: &[
            ("id", Text),
            ("name", Text),
            ("token_hash", Text),
            ("created_by", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("max_uses", Int),
            ("uses", Int),
            ("auto_approve", Bool),
            ("tags", Text),
            ("revoked_at", Int),
        ],
        identity: false,
    },
    Table {
        name: "audit_events",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("actor", Text),
            ("client", Text),
            ("action", Text),
            ("target", Text),
            ("outcome", Text),
        ],
        identity: true,
    },
    Table {
        name: "fleet_events",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("kind", Text),
            ("message", Text),
            ("nodes_affected", Int),
            ("nodes_live", Int),
            ("resolved_at", Int),
            ("resolved_by", Text),
            ("resolution", Text),
        ],
        identity: true,
    },
    Table {
        name: "deployments",
        columns: &[
            ("id", Text),
            ("name", Text),
            ("model", Text),
            ("source", Text),
            ("sha256", Text),
            ("runtime", Text),
            ("args", Text),
            ("replicas", Int),
            ("gpu_memory_bytes", Int),
            ("selector_tags", Text),
            ("max_concurrency", Int),
            ("revision", Int),
            ("created_by", Text),
            ("created_at", Int),
            ("updated_at", Int),
        ],
        identity: false,
    },
    Table {
        name: "usage_requests",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("principal", Text),
            ("model", Text),
            ("node", Text),
            ("status", Int),
            ("prompt_tokens", Int),
            ("completion_tokens", Int),
            ("ttft_ms", Int),
            ("duration_ms", Int),
            ("retries", Int),
            ("stream", Bool),
        ],
        identity: true,
    },
];

/// The usage roll-ups and the names of principals (SPEC §14), and the replicas of deployments (SPEC §15): keyed by several columns, without SQLite row ids;
/// copied in pages by key, and checked by counting every row of the table.
const KEYED: &[(&str, &[&str], &[&str])] = &[
    ("usage_principals", &["principal"], &["name", "last_seen"]),
    ("usage_minute", &["bucket", "principal", "model"], ROLLUP_SUMS),
    ("usage_hour", &["bucket", "principal", "model"], ROLLUP_SUMS),
    ("usage_day", &["bucket", "principal", "model"], ROLLUP_SUMS),
    ("usage_node_hour", &["bucket", "node", "model"], ROLLUP_SUMS),
    ("usage_node_day", &["bucket", "node", "model"], ROLLUP_SUMS),
    ("usage_model_minute", &["bucket", "model"], ROLLUP_SUMS),
    ("usage_model_hour", &["bucket", "model"], ROLLUP_SUMS),
    ("usage_model_day", &["bucket", "model"], ROLLUP_SUMS),
    ("usage_ttft_minute", &["bucket", "bin"], &["count"]),
    (
        "deployment_replicas",
        &["deployment_id", "slot"],
        &[
            "node_id",
            "placed_at",
            "state",
            "revision",
            "reason",
            "bytes_done",
            "bytes_total",
            "port",
            "pid",
            "restarts",
            "download_ms",
            "start_ms",
            "ready_at",
            "updated_at",
            "gpus",
        ],
    ),
];

const ROLLUP_SUMS: &[&str] =
    &["requests", "errors", "rejected", "prompt_tokens", "completion_tokens", "unknown_usage", "duration_ms"];

/// Rows per insert statement.
const ROWS_PER_STATEMENT: usize = 1_000;

/// What one table's copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub table: &'static str,
    /// Rows in the SQLite database.
    pub rows: u64,
    /// Of those, rows added to PostgreSQL by this run (the others were there already).
    pub added: u64,
}

/// Copies everything from the SQLite database at `from` into the PostgreSQL database at `to`, printing one line
/// per table.
pub async fn run(from: &Path, to: &str) -> anyhow::Result<()> {
    for copied in copy(from, to).await? {
        println!(
            "{}: {} rows, {} copied, {} already there",
            copied.table,
            copied.rows,
            copied.added,
            copied.rows - copied.added
        );
    }
    println!("migrated {} to {}: every row is there", from.display(), postgres::redact(to));
    Ok(())
}

/// Copies and verifies; returns what each table's copy did.
pub async fn copy(from: &Path, to: &str) -> anyhow::Result<Vec<Copied>> {
    if !from.is_file() {
        bail!("{} is not a file: give the router's SQLite database (router.db in its data directory)", from.display());
    }
    // Brought to the current schema, as the router's start would.
    let store = SqliteStore::open(from).await?;
    let nodes = store.load_nodes().await?;
    store.close().await;
    let sqlite = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(from).read_only(true))
        .await
        .with_context(|| format!("opening {} to read", from.display()))?;
    let pg = postgres::migrated_pool(to).await?;
    let result = copy_all(&sqlite, &pg, &nodes).await;
    sqlite.close().await;
    pg.close().await;
    result
}

async fn copy_all(sqlite: &SqlitePool, pg: &PgPool, nodes: &[StoredNode]) -> anyhow::Result<Vec<Copied>> {
    let mut tx = pg.begin().await?;
    let mut report = Vec::new();
    let mut added = 0;
    for (node, _) in nodes {
        added += u64::from(postgres::copy_node(&mut tx, node).await?);
    }
    let ids: Vec<String> = nodes.iter().map(|(node, _)| node.id.to_string()).collect();
    let present: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE id = ANY($1)").bind(&ids).fetch_one(&mut *tx).await?;
    check("nodes", nodes.len() as u64, present)?;
    report.push(Copied { table: "nodes", rows: nodes.len() as u64, added });
    // One read transaction: every page of every table from the same state of the file.
    let mut read = sqlite.begin().await.context("reading SQLite")?;
    for table in TABLES {
        report.push(copy_table(&mut read, &mut tx, table).await?);
    }
    for (table, key, values) in KEYED {
        report.push(copy_keyed(&mut read, &mut tx, table, key, values).await?);
    }
    read.commit().await?;
    tx.commit().await.context("committing the copy")?;
    Ok(report)
}

/// Copies one table a page at a time (a fleet's history may be millions of rows), and checks in the same
/// transaction that every row read is in PostgreSQL: counted by key, so rows that were there already count too.
async fn copy_table(read: &mut SqliteConnection, tx: &mut PgConnection, table: &Table) -> anyhow::Result<Copied> {
    let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let (key, key_kind) = table.columns[0];
    let select =
        format!("SELECT rowid, {} FROM {} WHERE rowid > ? ORDER BY rowid LIMIT ?", columns.join(", "), table.name);
    let count = format!("SELECT COUNT(*) FROM {} WHERE {key} = ANY($1)", table.name);
    let (mut rows_read, mut added, mut present) = (0u64, 0u64, 0i64);
    let mut after = 0i64;
    loop {
        let rows = sqlx::query(sqlx::AssertSqlSafe(select.clone()))
            .bind(after)
            .bind(ROWS_PER_STATEMENT as i64)
            .fetch_all(&mut *read)
            .await
            .with_context(|| format!("reading {} from SQLite", table.name))?;
        let Some(last) = rows.last() else { break };
        after = last.try_get(0)?;
        let mut insert = QueryBuilder::<Postgres>::new(format!("INSERT INTO {} ({}) ", table.name, columns.join(", ")));
        let mut failed = None;
        insert.push_values(&rows, |mut values, row| {
            for (i, (_, kind)) in table.columns.iter().enumerate() {
                if let Err(err) = bind(&mut values, row, i + 1, *kind) {
                    failed.get_or_insert(err);
                }
            }
        });
        if let Some(err) = failed {
            return Err(err.context(format!("reading a row of {}", table.name)));
        }
        insert.push(" ON CONFLICT DO NOTHING");
        added += insert
            .build()
            .execute(&mut *tx)
            .await
            .with_context(|| format!("copying {} into PostgreSQL", table.name))?
            .rows_affected();
        let counted = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(count.clone()));
        let counted = match key_kind {
            Int => {
                let keys = rows.iter().map(|row| row.try_get::<i64, _>(1)).collect::<Result<Vec<_>, _>>()?;
                counted.bind(keys)
            }
            _ => {
                let keys = rows.iter().map(|row| row.try_get::<String, _>(1)).collect::<Result<Vec<_>, _>>()?;
                counted.bind(keys)
            }
        };
        present +=
            counted.fetch_one(&mut *tx).await.with_context(|| format!("counting {} in PostgreSQL", table.name))?;
        rows_read += rows.len() as u64;
        if rows.len() < ROWS_PER_STATEMENT {
            break;
        }
    }
    check(table.name, rows_read, present)?;
    if table.identity {
        let sql = format!(
            "SELECT setval(pg_get_serial_sequence('{0}', 'id'), GREATEST((SELECT MAX(id) FROM {0}), 1))",
            table.name
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    Ok(Copied { table: table.name, rows: rows_read, added })
}

/// Copies a table keyed by `key` (text columns but `bucket`, and `last_seen` and the sums, integers) a page at a
/// time in key order, then checks that PostgreSQL holds as many rows.
async fn copy_keyed(
    read: &mut SqliteConnection,
    tx: &mut PgConnection,
    table: &'static str,
    key: &[&str],
    values: &[&str],
) -> anyhow::Result<Copied> {
    let columns: Vec<&str> = key.iter().chain(values).copied().collect();
    let kind = |name: &str| {
        let text = matches!(
            name,
            "principal" | "model" | "node" | "name" | "deployment_id" | "node_id" | "state" | "reason" | "gpus"
        );
        if text { Text } else { Int }
    };
    let keys = key.join(", ");
    let marks = vec!["?"; key.len()].join(", ");
    let (mut rows_read, mut added) = (0u64, 0u64);
    let mut after: Option<SqliteRow> = None;
    loop {
        let mut select = format!("SELECT {} FROM {table}", columns.join(", "));
        if after.is_some() {
            select.push_str(&format!(" WHERE ({keys}) > ({marks})"));
        }
        select.push_str(&format!(" ORDER BY {keys} LIMIT {ROWS_PER_STATEMENT}"));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(select));
        if let Some(last) = &after {
            for (i, name) in key.iter().enumerate() {
                query = match kind(name) {
                    Text => query.bind(last.try_get::<String, _>(i)?),
                    _ => query.bind(last.try_get::<i64, _>(i)?),
                };
            }
        }
        let rows = query.fetch_all(&mut *read).await.with_context(|| format!("reading {table} from SQLite"))?;
        if rows.is_empty() {
            break;
        }
        let mut insert = QueryBuilder::<Postgres>::new(format!("INSERT INTO {table} ({}) ", columns.join(", ")));
        let mut failed = None;
        insert.push_values(&rows, |mut values, row| {
            for (i, name) in columns.iter().enumerate() {
                if let Err(err) = bind(&mut values, row, i, kind(name)) {
                    failed.get_or_insert(err);
                }
            }
        });
        if let Some(err) = failed {
            return Err(err.context(format!("reading a row of {table}")));
        }
        insert.push(" ON CONFLICT DO NOTHING");
        added += insert.build().execute(&mut *tx).await.with_context(|| format!("copying {table}"))?.rows_affected();
        rows_read += rows.len() as u64;
        let full = rows.len() == ROWS_PER_STATEMENT;
        after = rows.into_iter().last();
        if !full {
            break;
        }
    }
    let present: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"))).fetch_one(&mut *tx).await?;
    check(table, rows_read, present)?;
    Ok(Copied { table, rows: rows_read, added })
}

/// Fails, naming the table, unless every one of its `rows` SQLite rows was found in PostgreSQL.
fn check(table: &str, rows: u64, present: i64) -> anyhow::Result<()> {
    if u64::try_from(present).ok() != Some(rows) {
        bail!("{table}: {rows} rows in SQLite, but {present} of them in PostgreSQL after the copy; nothing was kept");
    }
    Ok(())
}

/// Binds column `i` of `row` as `kind`.
fn bind(
    values: &mut sqlx::query_builder::Separated<'_, Postgres, &'static str>,
    row: &SqliteRow,
    i: usize,
    kind: Kind,
) -> anyhow::Result<()> {
    match kind {
        Text => {
            values.push_bind(row.try_get::<Option<String>, _>(i)?);
        }
        Int => {
            values.push_bind(row.try_get::<Option<i64>, _>(i)?);
        }
        Bool => {
            values.push_bind(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0));
        }
    }
    Ok(())
}
