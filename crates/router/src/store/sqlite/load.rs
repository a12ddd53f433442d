//! Start-up: every node with its lists and token, one row per node.
//!
//! [`node_batches`] reads the fleet in parts, each on a reader connection of its own (each with its own SQLite
//! thread), decoded on the runtime's workers and handed over in batches: start-up reads on every core, and never
//! holds the fleet twice.

use anyhow::Context;
use futures_util::TryStreamExt;
use llm_router_protocol::GpuDevice;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, SqliteConnection};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::lists;
use crate::model::node::NodeLists;
use crate::store::{NodeBatches, StoreError, StoredNode, rows};

/// Parts the fleet is read in, at once: one per core of the 2-core reference machine (a reader connection each).
const PARTS: i64 = 2;

/// Nodes handed over at a time.
const BATCH: usize = 1024;

/// Reads every node in [`PARTS`] parts by row id, at once; the batches come in any order.
pub(super) async fn node_batches(reader: &SqlitePool) -> Result<NodeBatches, StoreError> {
    let (first, last): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT MIN(rowid), MAX(rowid) FROM nodes").fetch_one(reader).await?;
    let (sender, batches) = mpsc::channel(4 * PARTS as usize);
    let mut readers = Vec::new();
    if let (Some(first), Some(last)) = (first, last) {
        let step = (last - first) / PARTS + 1;
        let mut from = first;
        while from <= last {
            let to = from.saturating_add(step - 1).min(last);
            readers.push(tokio::spawn(read_part(reader.clone(), from, to, sender.clone())));
            from = to + 1;
        }
    }
    Ok(NodeBatches::new(batches, readers))
}

/// Reads the nodes whose row ids lie in `from..=to` and sends them in batches; a failure is sent as the last one.
async fn read_part(reader: SqlitePool, from: i64, to: i64, batches: mpsc::Sender<Result<Vec<StoredNode>, StoreError>>) {
    let read = async {
        let mut conn = reader.acquire().await?;
        let mut batch = Vec::with_capacity(BATCH);
        let mut incomplete = Vec::new();
        {
            let sql = format!("{} WHERE n.rowid BETWEEN ? AND ?", load_nodes_sql());
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(from).bind(to).fetch(&mut *conn);
            while let Some(row) = rows.try_next().await? {
                let (node, has_lists) = node_from_row(&row)?;
                if !has_lists {
                    incomplete.push(node);
                    continue;
                }
                batch.push(node);
                if batch.len() == BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                    if batches.send(Ok(full)).await.is_err() {
                        return Ok::<_, StoreError>(None);
                    }
                }
            }
        }
        if !incomplete.is_empty() {
            tracing::warn!(
                nodes = incomplete.len(),
                "some nodes lack the copy of their lists; reading them from the child tables"
            );
            load_lists_from_child_tables(&mut conn, &mut incomplete).await?;
            batch.append(&mut incomplete);
        }
        Ok(Some(batch))
    };
    let last = match read.await {
        Ok(Some(batch)) if batch.is_empty() => return,
        Ok(Some(batch)) => Ok(batch),
        Ok(None) => return,
        Err(err) => Err(err),
    };
    let _ = batches.send(last).await;
}

/// Every node with its lists and token hash, one row per node: the lists come from the copy on the node's
/// row, so start-up does not read the fleet's million child rows. A database whose rows lack that copy
/// (written by something other than the router) is read from the child tables instead, merged in key order.
pub(super) async fn load_nodes(reader: &SqlitePool) -> Result<Vec<StoredNode>, StoreError> {
    let mut conn = reader.acquire().await?;
    let mut nodes: Vec<StoredNode> = Vec::new();
    let mut complete = true;
    {
        let sql = load_nodes_sql();
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *conn);
        while let Some(row) = rows.try_next().await? {
            let (node, has_lists) = node_from_row(&row)?;
            complete &= has_lists;
            nodes.push(node);
        }
    }
    if !complete {
        tracing::warn!("some nodes lack the copy of their lists; reading them from the child tables");
        load_lists_from_child_tables(&mut conn, &mut nodes).await?;
    }
    Ok(nodes)
}

/// Every node with its token hash.
fn load_nodes_sql() -> String {
    format!("SELECT {} FROM nodes n LEFT JOIN node_tokens t ON t.node_id = n.id", rows::NODE_COLUMNS)
}
const LOAD_GPUS: &str = "SELECT node_id, model, count, memory_bytes FROM node_gpu_devices ORDER BY node_id, position";
const LOAD_RUNTIMES: &str = "SELECT node_id, runtime FROM node_supported_runtimes ORDER BY node_id, position";
const LOAD_MODELS: &str = "SELECT node_id, kind, model FROM node_loaded_models ORDER BY node_id, kind, position";
const LOAD_TAGS: &str = "SELECT node_id, tag FROM node_tags ORDER BY node_id, position";

/// A node row with its token hash; the flag tells whether the row carried the copy of its lists.
fn node_from_row(row: &SqliteRow) -> anyhow::Result<(StoredNode, bool)> {
    let (mut node, copy, token) = rows::node(row)?;
    let has_lists = match copy.and_then(lists::decode) {
        Some(lists) => {
            lists.apply_to(&mut node);
            true
        }
        None => false,
    };
    Ok(((node, token), has_lists))
}

/// Rebuilds every node's lists from the child tables: each read once in key order and merged into the nodes.
async fn load_lists_from_child_tables(conn: &mut SqliteConnection, nodes: &mut [StoredNode]) -> anyhow::Result<()> {
    // Uuid order is the byte order of the ids' lowercase text, which is the child tables' key order.
    nodes.sort_unstable_by_key(|(node, _)| node.id);
    for (node, _) in nodes.iter_mut() {
        NodeLists::default().apply_to(node);
    }
    merge_children(conn, nodes, LOAD_GPUS, |(node, _), row| {
        let memory: Option<i64> = row.try_get(3)?;
        node.gpu_devices.push(GpuDevice {
            model: row.try_get(1)?,
            count: row.try_get(2)?,
            memory_bytes: memory.and_then(|m| u64::try_from(m).ok()),
            uuids: None,
        });
        Ok(())
    })
    .await?;
    merge_children(conn, nodes, LOAD_RUNTIMES, |(node, _), row| {
        node.supported_runtimes.push(row.try_get(1)?);
        Ok(())
    })
    .await?;
    merge_children(conn, nodes, LOAD_MODELS, |(node, _), row| {
        let kind: &str = row.try_get(1)?;
        let list = if kind == "ready" { &mut node.ready_models } else { &mut node.loaded_models };
        list.push(row.try_get(2)?);
        Ok(())
    })
    .await?;
    merge_children(conn, nodes, LOAD_TAGS, |(node, _), row| {
        node.tags.push(row.try_get(1)?);
        Ok(())
    })
    .await
}

/// Streams `sql` (rows ordered by node id in column 0) and hands each row to `apply` with its node. `nodes` must be
/// sorted by id; rows of nodes that do not exist are skipped.
async fn merge_children(
    conn: &mut SqliteConnection,
    nodes: &mut [StoredNode],
    sql: &'static str,
    mut apply: impl FnMut(&mut StoredNode, &SqliteRow) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query(sql).fetch(&mut *conn);
    let mut next = 0;
    while let Some(row) = rows.try_next().await? {
        let id_text: &str = row.try_get(0)?;
        let id = Uuid::parse_str(id_text).with_context(|| format!("malformed node id {id_text}"))?;
        while next < nodes.len() && nodes[next].0.id < id {
            next += 1;
        }
        match nodes.get_mut(next) {
            Some(node) if node.0.id == id => apply(node, &row)?,
            _ => {}
        }
    }
    Ok(())
}
