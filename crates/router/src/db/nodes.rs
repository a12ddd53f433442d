//! Rows of `nodes` and its child tables, `node_tokens` and `node_events`.

use anyhow::Context;
use futures_util::TryStreamExt;
use llm_router_protocol::{GpuDevice, NodeStatus};
use serde_json::value::RawValue;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::Store;
use crate::auth::token::TokenHash;
use crate::clock::{Millis, rfc3339};
use crate::registry::node::{Node, NodeEvent, NodeEventView};

/// A node as stored, with the hash of its token (imported nodes have none).
pub type StoredNode = (Node, Option<TokenHash>);

/// Heartbeat figures written behind, in batches.
#[derive(Debug, Clone)]
pub struct Figures {
    pub node_id: Uuid,
    pub last_seen_at: Millis,
    pub metrics: Option<Box<RawValue>>,
    /// Present only when the lists changed since the last write.
    pub models: Option<(Vec<String>, Vec<String>)>,
}

/// Why an insert did not happen.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error("a node with this machine name and runtime port already exists")]
    Duplicate,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Store {
    /// Every node with its lists and token hash, in one streamed query: each node's lists come as JSON arrays
    /// from indexed subqueries, so start-up holds one row at a time instead of every child row of the fleet.
    pub async fn load_nodes(&self) -> anyhow::Result<Vec<StoredNode>> {
        let mut conn = self.reader.acquire().await?;
        let mut rows = sqlx::query(LOAD_NODES).fetch(&mut *conn);
        let mut nodes = Vec::new();
        while let Some(row) = rows.try_next().await? {
            nodes.push(node_from_row(&row)?);
        }
        Ok(nodes)
    }

    /// Stores a newly registered node, its token and its first event in one transaction.
    pub async fn insert_node(&self, node: &Node, token: TokenHash, event: &NodeEvent) -> Result<(), InsertError> {
        let mut tx = self.writer.begin().await.map_err(anyhow::Error::from)?;
        if let Err(err) = insert_row(&mut tx, node, INSERT_NODE).await {
            let duplicate = err.as_database_error().is_some_and(|db| db.is_unique_violation());
            return Err(if duplicate { InsertError::Duplicate } else { anyhow::Error::from(err).into() });
        }
        write_lists(&mut tx, node).await?;
        write_token(&mut tx, node.id, token, node.registered_at).await?;
        write_event(&mut tx, event).await?;
        tx.commit().await.map_err(anyhow::Error::from)?;
        Ok(())
    }

    /// Imports nodes that have no token (legacy `nodes.json`) in one transaction. A node whose id, or machine name
    /// and port, is already stored is left out, which makes a repeated import add nothing. Returns the ids added.
    pub async fn import_nodes(&self, nodes: &[(Node, NodeEvent)]) -> anyhow::Result<Vec<Uuid>> {
        let mut tx = self.writer.begin().await?;
        let mut added = Vec::new();
        for (node, event) in nodes {
            let inserted = insert_row(&mut tx, node, INSERT_NODE_IF_NEW).await?;
            if inserted.rows_affected() == 1 {
                write_lists(&mut tx, node).await?;
                write_event(&mut tx, event).await?;
                added.push(node.id);
            }
        }
        tx.commit().await?;
        Ok(added)
    }

    /// Rewrites a re-registered node's descriptive fields, status and token in one transaction.
    pub async fn reregister_node(
        &self,
        node: &Node,
        token: TokenHash,
        now: Millis,
        event: Option<&NodeEvent>,
    ) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE nodes SET ip_address = ?, runtime_version = ?, status = ?, approved_at = ?, approved_by = ? \
             WHERE id = ?",
        )
        .bind(&node.ip_address)
        .bind(&node.runtime_version)
        .bind(node.status.as_str())
        .bind(node.approved_at)
        .bind(&node.approved_by)
        .bind(node.id.to_string())
        .execute(&mut *tx)
        .await?;
        write_lists(&mut tx, node).await?;
        write_token(&mut tx, node.id, token, now).await?;
        if let Some(event) = event {
            write_event(&mut tx, event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Persists a status change (and approval fields) together with its event.
    pub async fn record_transition(&self, node: &Node, event: &NodeEvent) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE nodes SET status = ?, approved_at = ?, approved_by = ? WHERE id = ?")
            .bind(node.status.as_str())
            .bind(node.approved_at)
            .bind(&node.approved_by)
            .bind(node.id.to_string())
            .execute(&mut *tx)
            .await?;
        write_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Persists the fields an administrator edits.
    pub async fn update_admin_fields(&self, node: &Node) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE nodes SET display_name = ?, notes = ? WHERE id = ?")
            .bind(&node.display_name)
            .bind(&node.notes)
            .bind(node.id.to_string())
            .execute(&mut *tx)
            .await?;
        replace_strings(
            &mut tx,
            "DELETE FROM node_tags WHERE node_id = ?",
            "INSERT INTO node_tags (node_id, position, tag) VALUES (?, ?, ?)",
            node.id,
            &node.tags,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a node with its lists and token; its events stay as the audit trail, plus one for the deletion.
    pub async fn delete_node(&self, id: Uuid, event: &NodeEvent) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM nodes WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        write_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Writes a batch of heartbeat figures in one transaction. Nodes deleted meanwhile match no row and are skipped.
    pub async fn flush_figures(&self, batch: &[Figures]) -> anyhow::Result<()> {
        let mut tx = self.writer.begin().await?;
        for figures in batch {
            let updated = sqlx::query("UPDATE nodes SET last_seen_at = ?, metrics = ? WHERE id = ?")
                .bind(figures.last_seen_at)
                .bind(metrics_json(&figures.metrics))
                .bind(figures.node_id.to_string())
                .execute(&mut *tx)
                .await?;
            if updated.rows_affected() == 0 {
                continue;
            }
            if let Some((loaded, ready)) = &figures.models {
                write_models(&mut tx, figures.node_id, loaded, ready).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A node's history, newest first.
    pub async fn node_events(&self, id: Uuid) -> anyhow::Result<Vec<NodeEventView>> {
        let rows = sqlx::query(
            "SELECT id, node_id, at, from_status, to_status, reason, actor FROM node_events \
             WHERE node_id = ? ORDER BY id DESC",
        )
        .bind(id.to_string())
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|row| {
                let node_id: String = row.try_get(1)?;
                Ok(NodeEventView {
                    id: row.try_get(0)?,
                    node_id: Uuid::parse_str(&node_id)?,
                    at: rfc3339(row.try_get(2)?),
                    from: row.try_get(3)?,
                    to: row.try_get(4)?,
                    reason: row.try_get(5)?,
                    actor: row.try_get(6)?,
                })
            })
            .collect()
    }
}

const INSERT_NODE: &str = "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, \
     display_name, notes, metrics, registered_at, approved_at, approved_by, last_seen_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

const INSERT_NODE_IF_NEW: &str = "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, \
     status, display_name, notes, metrics, registered_at, approved_at, approved_by, last_seen_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING";

async fn insert_row(
    conn: &mut SqliteConnection,
    node: &Node,
    sql: &'static str,
) -> Result<sqlx::sqlite::SqliteQueryResult, sqlx::Error> {
    let metrics = metrics_json(&node.metrics);
    sqlx::query(sql)
        .bind(node.id.to_string())
        .bind(&node.machine_name)
        .bind(&node.ip_address)
        .bind(i64::from(node.runtime_port))
        .bind(&node.runtime_version)
        .bind(node.status.as_str())
        .bind(&node.display_name)
        .bind(&node.notes)
        .bind(metrics)
        .bind(node.registered_at)
        .bind(node.approved_at)
        .bind(&node.approved_by)
        .bind(node.last_seen_at)
        .execute(&mut *conn)
        .await
}

fn metrics_json(metrics: &Option<Box<RawValue>>) -> Option<&str> {
    metrics.as_deref().map(RawValue::get)
}

/// Each node with its token hash and its lists as JSON arrays, in position order (the child tables' primary keys).
const LOAD_NODES: &str = "SELECT n.id, n.machine_name, n.ip_address, n.runtime_port, n.runtime_version, n.status, \
     n.display_name, n.notes, n.metrics, n.registered_at, n.approved_at, n.approved_by, n.last_seen_at, \
     (SELECT token_hash FROM node_tokens t WHERE t.node_id = n.id), \
     (SELECT json_group_array(json_array(model, count, memory_bytes)) FROM \
        (SELECT model, count, memory_bytes FROM node_gpu_devices WHERE node_id = n.id ORDER BY position)), \
     (SELECT json_group_array(runtime) FROM \
        (SELECT runtime FROM node_supported_runtimes WHERE node_id = n.id ORDER BY position)), \
     (SELECT json_group_array(model) FROM \
        (SELECT model FROM node_loaded_models WHERE node_id = n.id AND kind = 'loaded' ORDER BY position)), \
     (SELECT json_group_array(model) FROM \
        (SELECT model FROM node_loaded_models WHERE node_id = n.id AND kind = 'ready' ORDER BY position)), \
     (SELECT json_group_array(tag) FROM (SELECT tag FROM node_tags WHERE node_id = n.id ORDER BY position)) \
     FROM nodes n";

fn node_from_row(row: &SqliteRow) -> anyhow::Result<StoredNode> {
    let id_text: &str = row.try_get(0)?;
    let id = Uuid::parse_str(id_text).with_context(|| format!("malformed node id {id_text}"))?;
    let port: i64 = row.try_get(3)?;
    let status: &str = row.try_get(5)?;
    let metrics: Option<String> = row.try_get(8)?;
    let token: Option<&str> = row.try_get(13)?;
    let token = token.map(|hash| TokenHash::from_hex(hash).context("malformed token hash")).transpose()?;
    let gpus: Vec<(String, i64, Option<i64>)> = json_list(row, 14)?;
    let node = Node {
        id,
        machine_name: row.try_get(1)?,
        ip_address: row.try_get(2)?,
        runtime_port: u16::try_from(port).with_context(|| format!("bad port {port} for node {id}"))?,
        runtime_version: row.try_get(4)?,
        status: status.parse()?,
        display_name: row.try_get(6)?,
        notes: row.try_get(7)?,
        gpu_devices: gpus
            .into_iter()
            .map(|(model, count, memory)| GpuDevice {
                model,
                count,
                memory_bytes: memory.and_then(|m| u64::try_from(m).ok()),
            })
            .collect(),
        supported_runtimes: json_list(row, 15)?,
        loaded_models: json_list(row, 16)?,
        ready_models: json_list(row, 17)?,
        tags: json_list(row, 18)?,
        // Figures that are no longer valid JSON are dropped: the next heartbeat replaces them.
        metrics: metrics.and_then(|m| RawValue::from_string(m).ok()),
        registered_at: row.try_get(9)?,
        approved_at: row.try_get(10)?,
        approved_by: row.try_get(11)?,
        last_seen_at: row.try_get(12)?,
    };
    Ok((node, token))
}

/// A JSON array column built by `json_group_array`.
fn json_list<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: usize) -> anyhow::Result<Vec<T>> {
    let text: &str = row.try_get(column)?;
    serde_json::from_str(text).with_context(|| format!("malformed list in column {column}"))
}

/// Rewrites every list a registration carries: GPUs, runtimes, models, tags.
async fn write_lists(conn: &mut SqliteConnection, node: &Node) -> anyhow::Result<()> {
    let id = node.id.to_string();
    sqlx::query("DELETE FROM node_gpu_devices WHERE node_id = ?").bind(&id).execute(&mut *conn).await?;
    for (position, gpu) in node.gpu_devices.iter().enumerate() {
        sqlx::query(
            "INSERT INTO node_gpu_devices (node_id, position, model, count, memory_bytes) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(position as i64)
        .bind(&gpu.model)
        .bind(gpu.count)
        .bind(gpu.memory_bytes.and_then(|m| i64::try_from(m).ok()))
        .execute(&mut *conn)
        .await?;
    }
    replace_strings(
        conn,
        "DELETE FROM node_supported_runtimes WHERE node_id = ?",
        "INSERT INTO node_supported_runtimes (node_id, position, runtime) VALUES (?, ?, ?)",
        node.id,
        &node.supported_runtimes,
    )
    .await?;
    replace_strings(
        conn,
        "DELETE FROM node_tags WHERE node_id = ?",
        "INSERT INTO node_tags (node_id, position, tag) VALUES (?, ?, ?)",
        node.id,
        &node.tags,
    )
    .await?;
    write_models(conn, node.id, &node.loaded_models, &node.ready_models).await
}

async fn write_models(
    conn: &mut SqliteConnection,
    id: Uuid,
    loaded: &[String],
    ready: &[String],
) -> anyhow::Result<()> {
    let id = id.to_string();
    sqlx::query("DELETE FROM node_loaded_models WHERE node_id = ?").bind(&id).execute(&mut *conn).await?;
    for (kind, models) in [("loaded", loaded), ("ready", ready)] {
        for (position, model) in models.iter().enumerate() {
            sqlx::query("INSERT INTO node_loaded_models (node_id, kind, position, model) VALUES (?, ?, ?, ?)")
                .bind(&id)
                .bind(kind)
                .bind(position as i64)
                .bind(model)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

async fn replace_strings(
    conn: &mut SqliteConnection,
    delete_sql: &'static str,
    insert_sql: &'static str,
    id: Uuid,
    items: &[String],
) -> anyhow::Result<()> {
    let id = id.to_string();
    sqlx::query(delete_sql).bind(&id).execute(&mut *conn).await?;
    for (position, item) in items.iter().enumerate() {
        sqlx::query(insert_sql).bind(&id).bind(position as i64).bind(item).execute(&mut *conn).await?;
    }
    Ok(())
}

async fn write_token(conn: &mut SqliteConnection, id: Uuid, token: TokenHash, now: Millis) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO node_tokens (node_id, token_hash, created_at) VALUES (?, ?, ?) \
         ON CONFLICT (node_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
    )
    .bind(id.to_string())
    .bind(token.to_hex())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn write_event(conn: &mut SqliteConnection, event: &NodeEvent) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO node_events (node_id, at, from_status, to_status, reason, actor) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(event.node_id.to_string())
    .bind(event.at)
    .bind(event.from.map(NodeStatus::as_str))
    .bind(&event.to)
    .bind(&event.reason)
    .bind(&event.actor)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
