//! Fills a router database with a large fleet directly, without HTTP: the router has created the schema (its
//! migrations ran on a first start), and the rows are written here in one transaction, many per statement, in the
//! shapes of `crates/router/migrations/0001_init.sql`.

use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Sqlite, SqliteConnection};
use uuid::Uuid;

use crate::fleet::{self, GPU_GROUPS, GPUS_PER_GROUP, MODELS};

/// Nodes per statement: the widest table (13 columns) stays far below SQLite's 32,766 bound variables.
const NODES_PER_STATEMENT: usize = 500;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// How many of the seeded nodes end up in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusMix {
    pub online: usize,
    pub offline: usize,
    pub pending: usize,
}

/// The status of seeded node `i`: 5 % pending, 25 % offline, 70 % online.
pub fn status_of(i: usize) -> &'static str {
    match i % 20 {
        0 => "pending",
        1..=5 => "offline",
        _ => "online",
    }
}

/// One node's `nodes` row, ready to bind.
struct NodeRow {
    id: String,
    machine_name: String,
    ip_address: String,
    status: &'static str,
    display_name: Option<String>,
    metrics: Option<String>,
    /// The copy of the node's lists the router keeps on the row (what start-up reads).
    lists: String,
    registered_at: i64,
    approved_at: Option<i64>,
    approved_by: Option<&'static str>,
    last_seen_at: i64,
    token_hash: String,
}

fn node_row(i: usize, now: i64, with_metrics: bool) -> anyhow::Result<NodeRow> {
    let status = status_of(i);
    let approved = status != "pending";
    let registered_at = now - 30 * DAY_MS + (i as i64 % 1000) * 60_000;
    let last_seen_at = if status == "offline" { now - 6 * 3600 * 1000 } else { now - (i as i64 % 10) * 1000 };
    // The router stores heartbeat figures packed as positional arrays:
    // [cpu, memory, active, [[index, model, utilization, used, total, temperature], ...]].
    let gpus: Vec<serde_json::Value> = fleet::gpu_metrics(i)
        .into_iter()
        .map(|g| {
            serde_json::json!([
                g.index,
                g.model,
                g.utilization,
                g.memory_used_bytes,
                g.memory_total_bytes,
                g.temperature_c
            ])
        })
        .collect();
    let metrics = serde_json::json!([(i % 90) as f64 + 5.5, (i % 70) as f64 + 20.25, i % 17, gpus]);
    // A token hash is the hex SHA-256 of a secret; two random UUIDs give the same shape and are unique.
    let token_hash = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    // The same lists the child tables get below, as the router writes them on the node's row.
    let lists = serde_json::json!({
        "gpu_devices": GPU_GROUPS.iter().map(|(model, memory)| (model, GPUS_PER_GROUP, memory)).collect::<Vec<_>>(),
        "supported_runtimes": ["vllm", "llama_cpp"],
        "loaded_models": MODELS,
        "ready_models": MODELS,
        "tags": fleet::tags(i),
    });
    Ok(NodeRow {
        id: Uuid::new_v4().to_string(),
        machine_name: fleet::machine_name(i),
        ip_address: fleet::ip_address(i),
        status,
        display_name: i.is_multiple_of(10).then(|| format!("Rack {} node {}", i % 40, i)),
        metrics: if with_metrics { Some(serde_json::to_string(&metrics)?) } else { None },
        lists: serde_json::to_string(&lists)?,
        registered_at,
        approved_at: approved.then_some(registered_at + 3_600_000),
        approved_by: approved.then_some("admin"),
        last_seen_at,
        token_hash,
    })
}

/// Inserts `count` nodes with their GPUs, runtimes, models, tags, token and events into the database at `path`,
/// in one transaction. `with_metrics`: every node carries the figures of a last heartbeat (8 GPUs), as a fleet that
/// has been running does. The router must not be running.
pub async fn seed(path: &Path, count: usize, with_metrics: bool) -> anyhow::Result<StatusMix> {
    let options = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // A bench database: if this process dies, the file is thrown away anyway.
        .synchronous(SqliteSynchronous::Off);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {} to seed it", path.display()))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
    let mut mix = StatusMix::default();
    let mut tx = conn.begin().await?;
    let mut first = 0;
    while first < count {
        let last = (first + NODES_PER_STATEMENT).min(count);
        let rows = (first..last).map(|i| node_row(i, now, with_metrics)).collect::<anyhow::Result<Vec<_>>>()?;
        for row in &rows {
            match row.status {
                "online" => mix.online += 1,
                "offline" => mix.offline += 1,
                _ => mix.pending += 1,
            }
        }
        insert_chunk(&mut tx, &rows, first).await.with_context(|| format!("inserting nodes {first}..{last}"))?;
        first = last;
    }
    tx.commit().await.context("committing the seeded nodes")?;
    conn.close().await?;
    Ok(mix)
}

async fn insert_chunk(conn: &mut SqliteConnection, rows: &[NodeRow], first: usize) -> anyhow::Result<()> {
    let mut nodes = QueryBuilder::<Sqlite>::new(
        "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, \
         notes, metrics, lists, registered_at, approved_at, approved_by, last_seen_at) ",
    );
    nodes.push_values(rows, |mut b, row| {
        b.push_bind(row.id.clone())
            .push_bind(row.machine_name.clone())
            .push_bind(row.ip_address.clone())
            .push_bind(8000_i64)
            .push_bind("vllm 0.8.5")
            .push_bind(row.status)
            .push_bind(row.display_name.clone())
            .push_bind(None::<String>)
            .push_bind(row.metrics.clone())
            .push_bind(row.lists.clone())
            .push_bind(row.registered_at)
            .push_bind(row.approved_at)
            .push_bind(row.approved_by)
            .push_bind(row.last_seen_at);
    });
    nodes.build().execute(&mut *conn).await?;

    let mut gpus =
        QueryBuilder::<Sqlite>::new("INSERT INTO node_gpu_devices (node_id, position, model, count, memory_bytes) ");
    let gpu_rows = rows.iter().flat_map(|row| GPU_GROUPS.iter().enumerate().map(move |(pos, gpu)| (row, pos, gpu)));
    gpus.push_values(gpu_rows, |mut b, (row, pos, (model, memory))| {
        b.push_bind(row.id.clone())
            .push_bind(pos as i64)
            .push_bind(*model)
            .push_bind(i64::from(GPUS_PER_GROUP))
            .push_bind(*memory as i64);
    });
    gpus.build().execute(&mut *conn).await?;

    let mut models = QueryBuilder::<Sqlite>::new("INSERT INTO node_loaded_models (node_id, kind, position, model) ");
    let model_rows = rows.iter().flat_map(|row| {
        ["loaded", "ready"]
            .into_iter()
            .flat_map(move |kind| MODELS.iter().enumerate().map(move |(pos, model)| (row, kind, pos, *model)))
    });
    models.push_values(model_rows, |mut b, (row, kind, pos, model)| {
        b.push_bind(row.id.clone()).push_bind(kind).push_bind(pos as i64).push_bind(model);
    });
    models.build().execute(&mut *conn).await?;

    let mut runtimes = QueryBuilder::<Sqlite>::new("INSERT INTO node_supported_runtimes (node_id, position, runtime) ");
    let runtime_rows =
        rows.iter().flat_map(|row| ["vllm", "llama_cpp"].into_iter().enumerate().map(move |(pos, rt)| (row, pos, rt)));
    runtimes.push_values(runtime_rows, |mut b, (row, pos, runtime)| {
        b.push_bind(row.id.clone()).push_bind(pos as i64).push_bind(runtime);
    });
    runtimes.build().execute(&mut *conn).await?;

    let mut tags = QueryBuilder::<Sqlite>::new("INSERT INTO node_tags (node_id, position, tag) ");
    let tag_rows = rows
        .iter()
        .enumerate()
        .flat_map(|(k, row)| fleet::tags(first + k).into_iter().enumerate().map(move |(pos, tag)| (row, pos, tag)));
    tags.push_values(tag_rows, |mut b, (row, pos, tag)| {
        b.push_bind(row.id.clone()).push_bind(pos as i64).push_bind(tag);
    });
    tags.build().execute(&mut *conn).await?;

    let mut tokens = QueryBuilder::<Sqlite>::new("INSERT INTO node_tokens (node_id, token_hash, created_at) ");
    tokens.push_values(rows, |mut b, row| {
        b.push_bind(row.id.clone()).push_bind(row.token_hash.clone()).push_bind(row.registered_at);
    });
    tokens.build().execute(&mut *conn).await?;

    // The history the API shows: the registration, and the approval for approved nodes.
    let mut events =
        QueryBuilder::<Sqlite>::new("INSERT INTO node_events (node_id, at, from_status, to_status, reason, actor) ");
    let event_rows = rows.iter().flat_map(|row| {
        let registered = Some((row, row.registered_at, None, "pending", "registered", None));
        let approved = row.approved_at.map(|at| (row, at, Some("pending"), "online", "approved", Some("admin")));
        registered.into_iter().chain(approved)
    });
    events.push_values(event_rows, |mut b, (row, at, from, to, reason, actor)| {
        b.push_bind(row.id.clone()).push_bind(at).push_bind(from).push_bind(to).push_bind(reason).push_bind(actor);
    });
    events.build().execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mix_is_mostly_online() {
        let mix: Vec<&str> = (0..20).map(status_of).collect();
        assert_eq!(mix.iter().filter(|s| **s == "pending").count(), 1);
        assert_eq!(mix.iter().filter(|s| **s == "offline").count(), 5);
        assert_eq!(mix.iter().filter(|s| **s == "online").count(), 14);
    }

    #[test]
    fn rows_have_the_shapes_the_router_reads() {
        let row = node_row(1, 1_700_000_000_000, true).expect("row");
        assert_eq!(row.token_hash.len(), 64);
        assert!(row.token_hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(Uuid::parse_str(&row.id).is_ok());
        let metrics: serde_json::Value = serde_json::from_str(row.metrics.as_deref().expect("metrics")).expect("JSON");
        assert_eq!(metrics[3].as_array().map(Vec::len), Some(8), "packed: [cpu, memory, active, gpus]");
        assert_eq!(metrics[3][0].as_array().map(Vec::len), Some(6), "packed GPU: six positions");
        let lists: serde_json::Value = serde_json::from_str(&row.lists).expect("lists JSON");
        assert_eq!(lists["gpu_devices"].as_array().map(Vec::len), Some(GPU_GROUPS.len()));
        assert_eq!(row.approved_by, Some("admin"));
        let bare = node_row(0, 0, false).expect("row");
        assert!(bare.approved_at.is_none() && bare.metrics.is_none());
    }

    /// The router's own migrations, so a schema change that breaks the seeder fails here.
    static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../router/migrations");

    #[tokio::test]
    async fn seeds_every_table_of_the_router_schema() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("router.db");
        let options =
            SqliteConnectOptions::from_str("sqlite://").expect("options").filename(&path).create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&options).await.expect("create");
        MIGRATOR.run(&mut conn).await.expect("migrate");
        conn.close().await.expect("close");

        // More than one statement's worth, and not a multiple of it.
        let count = NODES_PER_STATEMENT * 2 + 7;
        let mix = seed(&path, count, true).await.expect("seed");
        assert_eq!(mix.online + mix.offline + mix.pending, count);
        assert_eq!(mix.pending, count.div_ceil(20));

        let mut conn = SqliteConnection::connect_with(&options).await.expect("open");
        for (table, per_node) in [
            ("nodes", 1),
            ("node_gpu_devices", 2),
            ("node_loaded_models", 4),
            ("node_supported_runtimes", 2),
            ("node_tags", 2),
            ("node_tokens", 1),
        ] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await.expect("count");
            assert_eq!(n as usize, count * per_node, "{table}");
        }
        let events: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM node_events").fetch_one(&mut conn).await.expect("count");
        assert_eq!(events as usize, count + mix.online + mix.offline);
        let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT machine_name) FROM nodes")
            .fetch_one(&mut conn)
            .await
            .expect("count");
        assert_eq!(distinct as usize, count);
    }
}
