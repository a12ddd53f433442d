//! Rows of `nodes` and its child tables, `node_tokens` and `node_events`.

use std::collections::HashMap;

use anyhow::Context;
use llm_router_protocol::{GpuDevice, NodeStatus};
use sqlx::{Row, SqliteConnection};
use uuid::Uuid;

use super::Store;
use crate::auth::token::TokenHash;
use crate::clock::{Millis, rfc3339};
use crate::registry::node::{Node, NodeEvent, NodeEventView, NodeMetrics};

/// A node as stored, with the hash of its token (imported nodes have none).
pub type StoredNode = (Node, Option<TokenHash>);

/// Heartbeat figures written behind, in batches.
#[derive(Debug, Clone)]
pub struct Figures {
    pub node_id: Uuid,
    pub last_seen_at: Millis,
    pub metrics: Option<NodeMetrics>,
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
    /// Every node with its lists and token hash; one query per table, joined in memory, so start-up stays fast at
    /// 100,000 nodes.
    pub async fn load_nodes(&self) -> anyhow::Result<Vec<StoredNode>> {
        let mut conn = self.reader.acquire().await?;
        let mut gpus: HashMap<String, Vec<GpuDevice>> = HashMap::new();
        for row in
            sqlx::query("SELECT node_id, model, count, memory_bytes FROM node_gpu_devices ORDER BY node_id, position")
                .fetch_all(&mut *conn)
                .await?
        {
            let memory: Option<i64> = row.try_get(3)?;
            gpus.entry(row.try_get(0)?).or_default().push(GpuDevice {
                model: row.try_get(1)?,
                count: row.try_get(2)?,
                memory_bytes: memory.and_then(|m| u64::try_from(m).ok()),
            });
        }
        let mut loaded: HashMap<String, Vec<String>> = HashMap::new();
        let mut ready: HashMap<String, Vec<String>> = HashMap::new();
        for row in sqlx::query("SELECT node_id, kind, model FROM node_loaded_models ORDER BY node_id, kind, position")
            .fetch_all(&mut *conn)
            .await?
        {
            let kind: String = row.try_get(1)?;
            let target = if kind == "ready" { &mut ready } else { &mut loaded };
            target.entry(row.try_get(0)?).or_default().push(row.try_get(2)?);
        }
        let runtimes =
            load_list(&mut conn, "SELECT node_id, runtime FROM node_supported_runtimes ORDER BY node_id, position")
                .await?;
        let mut tags = load_list(&mut conn, "SELECT node_id, tag FROM node_tags ORDER BY node_id, position").await?;
        let mut tokens: HashMap<String, TokenHash> = HashMap::new();
        for row in sqlx::query("SELECT node_id, token_hash FROM node_tokens").fetch_all(&mut *conn).await? {
            let hash: String = row.try_get(1)?;
            let hash = TokenHash::from_hex(&hash).context("malformed token hash in node_tokens")?;
            tokens.insert(row.try_get(0)?, hash);
        }
        let mut runtimes = runtimes;
        let rows = sqlx::query(
            "SELECT id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, notes, \
             metrics, registered_at, approved_at, approved_by, last_seen_at FROM nodes",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut nodes = Vec::with_capacity(rows.len());
        for row in rows {
            let id_text: String = row.try_get(0)?;
            let id = Uuid::parse_str(&id_text).with_context(|| format!("malformed node id {id_text}"))?;
            let status: String = row.try_get(5)?;
            let port: i64 = row.try_get(3)?;
            let metrics: Option<String> = row.try_get(8)?;
            let node = Node {
                id,
                machine_name: row.try_get(1)?,
                ip_address: row.try_get(2)?,
                runtime_port: u16::try_from(port).with_context(|| format!("bad port {port} for node {id}"))?,
                runtime_version: row.try_get(4)?,
                status: status.parse()?,
                display_name: row.try_get(6)?,
                notes: row.try_get(7)?,
                gpu_devices: gpus.remove(&id_text).unwrap_or_default(),
                supported_runtimes: runtimes.remove(&id_text).unwrap_or_default(),
                loaded_models: loaded.remove(&id_text).unwrap_or_default(),
                ready_models: ready.remove(&id_text).unwrap_or_default(),
                tags: tags.remove(&id_text).unwrap_or_default(),
                // Figures that no longer parse (an older format) are dropped: the next heartbeat replaces them.
                metrics: metrics.and_then(|m| serde_json::from_str(&m).ok()),
                registered_at: row.try_get(9)?,
                approved_at: row.try_get(10)?,
                approved_by: row.try_get(11)?,
                last_seen_at: row.try_get(12)?,
            };
            let token = tokens.remove(&id_text);
            nodes.push((node, token));
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
                .bind(metrics_json(&figures.metrics)?)
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
    let metrics = metrics_json(&node.metrics).map_err(|err| sqlx::Error::Encode(err.into()))?;
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

fn metrics_json(metrics: &Option<NodeMetrics>) -> anyhow::Result<Option<String>> {
    metrics.as_ref().map(serde_json::to_string).transpose().context("encoding node metrics")
}

async fn load_list(conn: &mut SqliteConnection, sql: &'static str) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for row in sqlx::query(sql).fetch_all(&mut *conn).await? {
        out.entry(row.try_get(0)?).or_default().push(row.try_get(1)?);
    }
    Ok(out)
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
