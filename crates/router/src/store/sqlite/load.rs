//! Start-up: every node with its lists and token, one row per node.

use anyhow::Context;
use futures_util::TryStreamExt;
use llm_router_protocol::GpuDevice;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::lists;
use crate::model::auth::TokenHash;
use crate::model::figures::PackedMetrics;
use crate::model::health::Conditions;
use crate::model::node::{Node, NodeLists};
use crate::store::StoredNode;

/// Every node with its lists and token hash, one row per node: the lists come from the copy on the node's
/// row, so start-up does not read the fleet's million child rows. A database whose rows lack that copy
/// (written by something other than the router) is read from the child tables instead, merged in key order.
pub(super) async fn load_nodes(reader: &SqlitePool) -> anyhow::Result<Vec<StoredNode>> {
    let mut conn = reader.acquire().await?;
    let mut nodes: Vec<StoredNode> = Vec::new();
    let mut complete = true;
    {
        let mut rows = sqlx::query(LOAD_NODES).fetch(&mut *conn);
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

const LOAD_NODES: &str = "SELECT n.id, n.machine_name, n.ip_address, n.runtime_port, n.runtime_version, n.status, \
     n.display_name, n.notes, n.metrics, n.registered_at, n.approved_at, n.approved_by, n.last_seen_at, n.lists, \
     t.token_hash, n.join_token, n.cordoned, n.max_concurrency, n.conditions FROM nodes n LEFT JOIN node_tokens t ON t.node_id = n.id";
const LOAD_GPUS: &str = "SELECT node_id, model, count, memory_bytes FROM node_gpu_devices ORDER BY node_id, position";
const LOAD_RUNTIMES: &str = "SELECT node_id, runtime FROM node_supported_runtimes ORDER BY node_id, position";
const LOAD_MODELS: &str = "SELECT node_id, kind, model FROM node_loaded_models ORDER BY node_id, kind, position";
const LOAD_TAGS: &str = "SELECT node_id, tag FROM node_tags ORDER BY node_id, position";

/// A node row with its token hash; the flag tells whether the row carried the copy of its lists.
fn node_from_row(row: &SqliteRow) -> anyhow::Result<(StoredNode, bool)> {
    let id_text: &str = row.try_get(0)?;
    let id = Uuid::parse_str(id_text).with_context(|| format!("malformed node id {id_text}"))?;
    let port: i64 = row.try_get(3)?;
    let status: &str = row.try_get(5)?;
    let metrics: Option<String> = row.try_get(8)?;
    let lists: Option<&str> = row.try_get(13)?;
    let token: Option<&str> = row.try_get(14)?;
    let token = token.map(|hash| TokenHash::from_hex(hash).context("malformed token hash")).transpose()?;
    let mut node = Node {
        id,
        machine_name: row.try_get(1)?,
        ip_address: row.try_get(2)?,
        runtime_port: u16::try_from(port).with_context(|| format!("bad port {port} for node {id}"))?,
        runtime_version: row.try_get(4)?,
        status: status.parse()?,
        display_name: row.try_get(6)?,
        notes: row.try_get(7)?,
        gpu_devices: Vec::new(),
        supported_runtimes: Vec::new(),
        loaded_models: Vec::new(),
        ready_models: Vec::new(),
        tags: Vec::new(),
        metrics: metrics.map(PackedMetrics::from_stored),
        registered_at: row.try_get(9)?,
        approved_at: row.try_get(10)?,
        approved_by: row.try_get(11)?,
        join_token: row.try_get(15)?,
        cordoned: row.try_get(16)?,
        max_concurrency: row.try_get(17)?,
        conditions: row.try_get::<Option<&str>, _>(18)?.map(Conditions::decode).unwrap_or_default(),
        last_seen_at: row.try_get(12)?,
    };
    let has_lists = match lists.and_then(lists::decode) {
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
