//! Rows of `nodes` and its child tables, `node_tokens` and `node_events`.

use anyhow::Context;
use futures_util::TryStreamExt;
use llm_router_protocol::{GpuDevice, NodeStatus};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{Sqlite, SqliteRow};
use sqlx::{QueryBuilder, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{StorageFault, Store, Writer, WriterPool, write_tx};
use crate::auth::token::TokenHash;
use crate::clock::{Millis, rfc3339};
use crate::registry::node::{Node, NodeEvent, NodeEventView, PackedMetrics};

/// A node as stored, with the hash of its token (imported nodes have none).
pub type StoredNode = (Node, Option<TokenHash>);

/// Heartbeat figures written behind, in batches.
#[derive(Debug, Clone)]
pub struct Figures {
    pub node_id: Uuid,
    pub last_seen_at: Millis,
    pub metrics: Option<PackedMetrics>,
    /// The node's lists, present only when its models changed since the last write.
    pub lists: Option<NodeLists>,
}

/// Every list of a node: what the child tables hold, and what the `lists` copy on its row holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLists {
    /// `[model, count, memory_bytes]` per GPU group.
    pub gpu_devices: Vec<(String, i64, Option<u64>)>,
    pub supported_runtimes: Vec<String>,
    pub loaded_models: Vec<String>,
    pub ready_models: Vec<String>,
    pub tags: Vec<String>,
}

impl NodeLists {
    pub fn of(node: &Node) -> Self {
        NodeLists {
            gpu_devices: node.gpu_devices.iter().map(|g| (g.model.clone(), g.count, g.memory_bytes)).collect(),
            supported_runtimes: node.supported_runtimes.clone(),
            loaded_models: node.loaded_models.clone(),
            ready_models: node.ready_models.clone(),
            tags: node.tags.clone(),
        }
    }

    fn apply_to(self, node: &mut Node) {
        node.gpu_devices = self
            .gpu_devices
            .into_iter()
            .map(|(model, count, memory_bytes)| GpuDevice { model, count, memory_bytes })
            .collect();
        node.supported_runtimes = self.supported_runtimes;
        node.loaded_models = self.loaded_models;
        node.ready_models = self.ready_models;
        node.tags = self.tags;
    }
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
    /// Every node with its lists and token hash, one row per node: the lists come from the copy on the node's
    /// row, so start-up does not read the fleet's million child rows. A database whose rows lack that copy
    /// (written by something other than the router) is read from the child tables instead, merged in key order.
    pub async fn load_nodes(&self) -> anyhow::Result<Vec<StoredNode>> {
        let mut conn = self.reader.acquire().await?;
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

    /// Stores a newly registered node, its token and its first event, and returns once they are committed.
    ///
    /// Registrations that arrive together are committed together (group commit): the node's writes run in a
    /// savepoint of a shared transaction, so one failing registration does not affect the others, and the batch
    /// pays one durable commit instead of one each.
    pub async fn insert_node(&self, node: Node, token: TokenHash, event: NodeEvent) -> Result<(), InsertError> {
        let (reply, answer) = oneshot::channel();
        self.inserts
            .send(InsertJob { node, token, event, reply })
            .await
            .map_err(|_| anyhow::anyhow!("the database is closed"))?;
        answer.await.map_err(|_| anyhow::anyhow!("the database is closed"))?
    }

    /// Imports nodes that have no token (legacy `nodes.json`) in one transaction. A node whose id, or machine name
    /// and port, is already stored is left out, which makes a repeated import add nothing. Returns the ids added.
    pub async fn import_nodes(&self, nodes: &[(Node, NodeEvent)]) -> anyhow::Result<Vec<Uuid>> {
        write_tx!(self, |tx| async {
            let mut added = Vec::new();
            for (node, event) in nodes {
                let inserted = insert_row(tx, node, INSERT_NODE_IF_NEW).await?;
                if inserted.rows_affected() == 1 {
                    insert_lists(tx, node).await?;
                    write_event(tx, event).await?;
                    added.push(node.id);
                }
            }
            anyhow::Ok(added)
        })
    }

    /// Rewrites a re-registered node's descriptive fields, status and token in one transaction.
    pub async fn reregister_node(
        &self,
        node: &Node,
        token: TokenHash,
        now: Millis,
        event: Option<&NodeEvent>,
    ) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
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
            write_lists(tx, node).await?;
            write_token(tx, node.id, token, now).await?;
            if let Some(event) = event {
                write_event(tx, event).await?;
            }
            anyhow::Ok(())
        })
    }

    /// Persists a status change (and approval fields) together with its event.
    pub async fn record_transition(&self, node: &Node, event: &NodeEvent) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query("UPDATE nodes SET status = ?, approved_at = ?, approved_by = ? WHERE id = ?")
                .bind(node.status.as_str())
                .bind(node.approved_at)
                .bind(&node.approved_by)
                .bind(node.id.to_string())
                .execute(&mut *tx)
                .await?;
            write_event(tx, event).await?;
            cap_events(tx, node.id).await
        })
    }

    /// Persists the fields an administrator edits.
    pub async fn update_admin_fields(&self, node: &Node) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query("UPDATE nodes SET display_name = ?, notes = ? WHERE id = ?")
                .bind(&node.display_name)
                .bind(&node.notes)
                .bind(node.id.to_string())
                .execute(&mut *tx)
                .await?;
            replace_strings(
                tx,
                "DELETE FROM node_tags WHERE node_id = ?",
                "INSERT INTO node_tags (node_id, position, tag) VALUES (?, ?, ?)",
                node.id,
                &node.tags,
            )
            .await?;
            write_lists_copy(tx, node.id, &NodeLists::of(node)).await
        })
    }

    /// Removes a node with its lists and token; its events stay as the audit trail, plus one for the deletion.
    pub async fn delete_node(&self, id: Uuid, event: &NodeEvent) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query("DELETE FROM nodes WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
            write_event(tx, event).await
        })
    }

    /// Writes a batch of heartbeat figures in one transaction. Nodes deleted meanwhile match no row and are skipped.
    pub async fn flush_figures(&self, batch: &[Figures]) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            // One statement per chunk, not per node: each statement is a round trip to the database thread.
            for chunk in batch.chunks(FIGURES_PER_STATEMENT) {
                let mut update = QueryBuilder::<Sqlite>::new("WITH v (id, last_seen_at, metrics) AS (");
                update.push_values(chunk, |mut row, figures| {
                    row.push_bind(figures.node_id.to_string())
                        .push_bind(figures.last_seen_at)
                        .push_bind(metrics_json(&figures.metrics));
                });
                update.push(
                    ") UPDATE nodes SET last_seen_at = v.last_seen_at, metrics = v.metrics FROM v WHERE nodes.id = v.id",
                );
                update.build().execute(&mut *tx).await?;
            }
            for figures in batch {
                let Some(lists) = &figures.lists else { continue };
                let exists = sqlx::query("SELECT 1 FROM nodes WHERE id = ?")
                    .bind(figures.node_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
                if exists {
                    write_models(tx, figures.node_id, &lists.loaded_models, &lists.ready_models).await?;
                    write_lists_copy(tx, figures.node_id, lists).await?;
                }
            }
            anyhow::Ok(())
        })
    }

    /// A page of a node's history, newest first: at most `limit` events older than the event `before` (all when
    /// `None`).
    pub async fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> anyhow::Result<Vec<NodeEventView>> {
        let rows = sqlx::query(
            "SELECT id, node_id, at, from_status, to_status, reason, actor FROM node_events \
             WHERE node_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
        )
        .bind(id.to_string())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
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

    /// Removes events recorded before `cutoff`, a bounded batch per transaction so that the writer is never held
    /// for long. Returns how many were removed.
    pub async fn prune_events(&self, cutoff: Millis) -> anyhow::Result<u64> {
        let mut removed = 0;
        loop {
            let batch = write_tx!(self, |tx| async {
                let done = sqlx::query(
                    "DELETE FROM node_events WHERE id IN (SELECT id FROM node_events WHERE at < ? LIMIT ?)",
                )
                .bind(cutoff)
                .bind(PRUNE_BATCH)
                .execute(&mut *tx)
                .await?;
                anyhow::Ok(done.rows_affected())
            })?;
            removed += batch;
            if batch < PRUNE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }
}

/// Most events kept per node (SPEC §9): a node's older events go as new ones are written.
pub const EVENTS_PER_NODE: i64 = 1000;

/// Events removed per transaction by [`Store::prune_events`].
const PRUNE_BATCH: i64 = 10_000;

/// Keeps the newest [`EVENTS_PER_NODE`] events of a node. Two index probes when there is nothing to remove.
async fn cap_events(conn: &mut SqliteConnection, id: Uuid) -> anyhow::Result<()> {
    let id = id.to_string();
    sqlx::query(
        "DELETE FROM node_events WHERE node_id = ? AND id <= \
         (SELECT id FROM node_events WHERE node_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
    )
    .bind(&id)
    .bind(&id)
    .bind(EVENTS_PER_NODE)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

const INSERT_NODE: &str = "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, \
     display_name, notes, metrics, registered_at, approved_at, approved_by, last_seen_at, lists) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

const INSERT_NODE_IF_NEW: &str = "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, \
     status, display_name, notes, metrics, registered_at, approved_at, approved_by, last_seen_at, lists) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING";

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
        .bind(serde_json::to_string(&NodeLists::of(node)).map_err(|err| sqlx::Error::Encode(err.into()))?)
        .execute(&mut *conn)
        .await
}

fn metrics_json(metrics: &Option<PackedMetrics>) -> Option<&str> {
    metrics.as_ref().map(PackedMetrics::as_str)
}

/// A registration waiting for the next group commit.
pub(super) struct InsertJob {
    node: Node,
    token: TokenHash,
    event: NodeEvent,
    reply: oneshot::Sender<Result<(), InsertError>>,
}

/// Most registrations in one group commit.
const INSERTS_PER_COMMIT: usize = 64;

/// Commits waiting registrations in groups until every sender is gone.
pub(super) async fn group_commits(writer: WriterPool, mut jobs: mpsc::Receiver<InsertJob>) {
    let mut batch = Vec::with_capacity(INSERTS_PER_COMMIT);
    while jobs.recv_many(&mut batch, INSERTS_PER_COMMIT).await > 0 {
        let results = commit_group(&writer, &batch).await;
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// One result per job. A registration refused as a duplicate is undone alone (its savepoint) and the others stay;
/// any other failure (a full disk, an I/O error) may already have undone the whole transaction inside SQLite, so
/// the group fails as one and every job gets the error: no answer of success for a row that was not committed.
async fn commit_group(pool: &WriterPool, batch: &[InsertJob]) -> Vec<Result<(), InsertError>> {
    let outcome = async {
        let mut writer = Writer::acquire(pool).await?;
        let result = async {
            let mut tx = writer.begin().await?;
            let mut results = Vec::with_capacity(batch.len());
            for job in batch {
                sqlx::query("SAVEPOINT registration").execute(&mut *tx).await?;
                match insert_one(&mut tx, job).await {
                    Ok(()) => {
                        sqlx::query("RELEASE registration").execute(&mut *tx).await?;
                        results.push(Ok(()));
                    }
                    Err(InsertError::Duplicate) => {
                        sqlx::raw_sql("ROLLBACK TO registration; RELEASE registration").execute(&mut *tx).await?;
                        results.push(Err(InsertError::Duplicate));
                    }
                    Err(InsertError::Other(err)) => return Err(err),
                }
            }
            tx.commit().await?;
            Ok(results)
        }
        .await;
        writer.finish(result).await
    }
    .await;
    match outcome {
        Ok(results) => results,
        Err(err) => {
            let fault = err.downcast_ref::<StorageFault>().is_some();
            let message = format!("{err:#}");
            batch
                .iter()
                .map(|_| {
                    let err = anyhow::anyhow!("registration not stored: {message}");
                    Err(InsertError::Other(if fault { err.context(StorageFault) } else { err }))
                })
                .collect()
        }
    }
}

async fn insert_one(conn: &mut SqliteConnection, job: &InsertJob) -> Result<(), InsertError> {
    if let Err(err) = insert_row(conn, &job.node, INSERT_NODE).await {
        let duplicate = err.as_database_error().is_some_and(|db| db.is_unique_violation());
        return Err(if duplicate { InsertError::Duplicate } else { anyhow::Error::from(err).into() });
    }
    insert_lists(conn, &job.node).await?;
    write_token(conn, job.node.id, job.token, job.node.registered_at).await?;
    write_event(conn, &job.event).await?;
    Ok(())
}

/// Nodes per statement of a figures batch (three parameters each, well under SQLite's limit of 32,766).
const FIGURES_PER_STATEMENT: usize = 500;

const LOAD_NODES: &str = "SELECT n.id, n.machine_name, n.ip_address, n.runtime_port, n.runtime_version, n.status, \
     n.display_name, n.notes, n.metrics, n.registered_at, n.approved_at, n.approved_by, n.last_seen_at, n.lists, \
     t.token_hash FROM nodes n LEFT JOIN node_tokens t ON t.node_id = n.id";
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
        last_seen_at: row.try_get(12)?,
    };
    let has_lists = match lists.map(serde_json::from_str::<NodeLists>) {
        Some(Ok(lists)) => {
            lists.apply_to(&mut node);
            true
        }
        _ => false,
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

/// Writes the child rows of a node that has none (a new node, or one whose rows were just deleted): one statement
/// per table, since each statement is a round trip to the database thread.
async fn insert_lists(conn: &mut SqliteConnection, node: &Node) -> anyhow::Result<()> {
    let id = node.id.to_string();
    if !node.gpu_devices.is_empty() {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO node_gpu_devices (node_id, position, model, count, memory_bytes) ",
        );
        insert.push_values(node.gpu_devices.iter().enumerate(), |mut row, (position, gpu)| {
            row.push_bind(&id)
                .push_bind(position as i64)
                .push_bind(&gpu.model)
                .push_bind(gpu.count)
                .push_bind(gpu.memory_bytes.and_then(|m| i64::try_from(m).ok()));
        });
        insert.build().execute(&mut *conn).await?;
    }
    let loaded = node.loaded_models.iter().enumerate().map(|(position, model)| ("loaded", position, model));
    let ready = node.ready_models.iter().enumerate().map(|(position, model)| ("ready", position, model));
    let models: Vec<_> = loaded.chain(ready).collect();
    if !models.is_empty() {
        let mut insert =
            QueryBuilder::<Sqlite>::new("INSERT INTO node_loaded_models (node_id, kind, position, model) ");
        insert.push_values(models, |mut row, (kind, position, model)| {
            row.push_bind(&id).push_bind(kind).push_bind(position as i64).push_bind(model);
        });
        insert.build().execute(&mut *conn).await?;
    }
    let lists = [
        ("INSERT INTO node_supported_runtimes (node_id, position, runtime) ", &node.supported_runtimes),
        ("INSERT INTO node_tags (node_id, position, tag) ", &node.tags),
    ];
    for (statement, items) in lists {
        if items.is_empty() {
            continue;
        }
        let mut insert = QueryBuilder::<Sqlite>::new(statement);
        insert.push_values(items.iter().enumerate(), |mut row, (position, item)| {
            row.push_bind(&id).push_bind(position as i64).push_bind(item);
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Rewrites every list of a node that is already stored: child rows and the copy on its row.
async fn write_lists(conn: &mut SqliteConnection, node: &Node) -> anyhow::Result<()> {
    let id = node.id.to_string();
    for delete in [
        "DELETE FROM node_gpu_devices WHERE node_id = ?",
        "DELETE FROM node_supported_runtimes WHERE node_id = ?",
        "DELETE FROM node_tags WHERE node_id = ?",
        "DELETE FROM node_loaded_models WHERE node_id = ?",
    ] {
        sqlx::query(delete).bind(&id).execute(&mut *conn).await?;
    }
    insert_lists(conn, node).await?;
    write_lists_copy(conn, node.id, &NodeLists::of(node)).await
}

/// The copy of a node's lists on its row, read at start-up.
async fn write_lists_copy(conn: &mut SqliteConnection, id: Uuid, lists: &NodeLists) -> anyhow::Result<()> {
    sqlx::query("UPDATE nodes SET lists = ? WHERE id = ?")
        .bind(serde_json::to_string(lists).context("encoding node lists")?)
        .bind(id.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
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
