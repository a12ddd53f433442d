//! [`NodeStore`] on PostgreSQL: nodes, their tokens and events, and the heartbeat figures written behind.
//!
//! Every write that changes a node other than its figures raises the row's `revision`, stamps `changed_xid` with
//! its transaction and notifies `llm_router_nodes`, in the same transaction: how the other routers learn of it
//! (`shared.rs`).

use anyhow::Context;
use futures_util::TryStreamExt;
use llm_router_protocol::NodeStatus;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgStore;
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinUse;
use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::store::sql::postgres as sql;
use crate::store::sqlite::lists;
use crate::store::{
    EVENTS_PER_NODE, Figures, NewNode, NodeStore, SharedNode, StoreError, StoreResult, StoredNode, rows,
};

/// The channel a node change is announced on; its payload is the node's id.
pub(super) const NODES_CHANNEL: &str = "llm_router_nodes";

/// The columns [`node_from_row`] reads, from `nodes n LEFT JOIN node_tokens t`: a node's, and its revision.
pub(super) fn node_columns() -> String {
    format!("{}, n.revision", rows::NODE_COLUMNS)
}

/// A node row with its token hash and revision, read with [`node_columns`].
pub(super) fn node_from_row(row: &PgRow) -> anyhow::Result<SharedNode> {
    let (mut node, copy, token) = rows::node(row)?;
    let id = node.id;
    let copy = copy.with_context(|| format!("node {id} has no lists"))?;
    lists::decode(copy).with_context(|| format!("malformed lists of node {id}"))?.apply_to(&mut node);
    Ok(SharedNode { node, token, revision: row.try_get(19)? })
}

impl PgStore {
    /// Records the revision a committed write of this router gave node `id` (see
    /// [`SharedStorage::written_revision`](crate::store::SharedStorage::written_revision)).
    fn wrote(&self, id: Uuid, revision: i64) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let entry = written.entry(id).or_insert(0);
        *entry = (*entry).max(revision);
    }
}

impl NodeStore for PgStore {
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>> {
        Box::pin(self.gated(async move {
            let sql = format!("SELECT {} FROM nodes n LEFT JOIN node_tokens t ON t.node_id = n.id", node_columns());
            let mut conn = self.pool.acquire().await?;
            let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *conn);
            let mut nodes = Vec::new();
            while let Some(row) = rows.try_next().await? {
                let SharedNode { node, token, .. } = node_from_row(&row)?;
                nodes.push((node, token));
            }
            Ok(nodes)
        }))
    }

    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> StoreResult<'_, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            insert_row(&mut tx, &node).await?;
            if let Some(join) = &join {
                sql::use_join_token(&mut tx, join).await?;
            }
            write_token(&mut tx, node.id, token, node.registered_at).await?;
            write_events(&mut tx, &events).await?;
            notify_node(&mut tx, node.id).await?;
            tx.commit().await?;
            self.wrote(node.id, 1);
            Ok(())
        }))
    }

    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let mut added = Vec::new();
            for new in nodes {
                let node = &new.node;
                if !copy_node(&mut tx, node).await? {
                    continue;
                }
                if let Some(token) = new.token {
                    write_token(&mut tx, node.id, token, node.registered_at).await?;
                }
                write_events(&mut tx, &new.events).await?;
                added.push(node.id);
            }
            if !added.is_empty() {
                notify_node(&mut tx, Uuid::nil()).await?;
            }
            tx.commit().await?;
            for id in &added {
                self.wrote(*id, 1);
            }
            Ok(added)
        }))
    }

    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            if let Some(join) = join {
                sql::use_join_token(&mut tx, join).await?;
            }
            let revision: Option<i64> = sqlx::query_scalar(
                "UPDATE nodes SET ip_address = $1, runtime_version = $2, status = $3, approved_at = $4, \
                 approved_by = $5, join_token = $6, lists = $7, revision = revision + 1, \
                 changed_xid = pg_current_xact_id() WHERE id = $8 RETURNING revision",
            )
            .bind(&node.ip_address)
            .bind(&node.runtime_version)
            .bind(node.status.as_str())
            .bind(node.approved_at)
            .bind(&node.approved_by)
            .bind(&node.join_token)
            .bind(lists::encode_node(node))
            .bind(node.id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            write_token(&mut tx, node.id, token, now).await?;
            write_events(&mut tx, events).await?;
            notify_node(&mut tx, node.id).await?;
            tx.commit().await?;
            self.wrote(node.id, revision.unwrap_or(0));
            Ok(())
        }))
    }

    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let revision: Option<i64> = sqlx::query_scalar(
                "UPDATE nodes SET status = $1, approved_at = $2, approved_by = $3, cordoned = $4, conditions = $5, \
                 revision = revision + 1, changed_xid = pg_current_xact_id() WHERE id = $6 RETURNING revision",
            )
            .bind(node.status.as_str())
            .bind(node.approved_at)
            .bind(&node.approved_by)
            .bind(node.cordoned)
            .bind(node.conditions.encode())
            .bind(node.id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            write_events(&mut tx, [event]).await?;
            cap_events(&mut tx, node.id).await?;
            notify_node(&mut tx, node.id).await?;
            tx.commit().await?;
            self.wrote(node.id, revision.unwrap_or(0));
            Ok(())
        }))
    }

    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let revision: Option<i64> = sqlx::query_scalar(
                "UPDATE nodes SET display_name = $1, notes = $2, max_concurrency = $3, lists = $4, \
                 revision = revision + 1, changed_xid = pg_current_xact_id() WHERE id = $5 RETURNING revision",
            )
            .bind(&node.display_name)
            .bind(&node.notes)
            .bind(node.max_concurrency.map(i64::from))
            .bind(lists::encode_node(node))
            .bind(node.id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            notify_node(&mut tx, node.id).await?;
            tx.commit().await?;
            self.wrote(node.id, revision.unwrap_or(0));
            Ok(())
        }))
    }

    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM nodes WHERE id = $1").bind(id.to_string()).execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO node_deletions (id, deleted_at) VALUES ($1, $2) \
                 ON CONFLICT (id) DO UPDATE SET deleted_at = excluded.deleted_at, deleted_xid = pg_current_xact_id()",
            )
            .bind(id.to_string())
            .bind(event.at)
            .execute(&mut *tx)
            .await?;
            write_events(&mut tx, [event]).await?;
            notify_node(&mut tx, id).await?;
            tx.commit().await?;
            // Every row of the node still to be read back (a read whose snapshot predates the deletion) is older
            // than the deletion: marked as this router's own, so that it does not bring the node back into memory.
            self.written.lock().unwrap_or_else(|p| p.into_inner()).insert(id, i64::MAX);
            Ok(())
        }))
    }

    /// Writes a batch of figures with one statement. Rows are locked in id order first, so two routers flushing
    /// the same nodes (a node whose heartbeats a load balancer spreads) wait for each other instead of
    /// deadlocking. The lock joins the batch's ids rather than testing `id = ANY($1)`: a flush that waited for
    /// another re-checks each row the other updated, and against the array that re-check is a scan of the whole
    /// batch per row (10,000 × 10,000 comparisons, seconds), against the join it is one comparison.
    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            if batch.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = batch.iter().map(|f| f.node_id.to_string()).collect();
            let seen: Vec<i64> = batch.iter().map(|f| f.last_seen_at).collect();
            let metrics: Vec<Option<&str>> =
                batch.iter().map(|f| f.figures.as_ref().map(PackedFigures::as_str)).collect();
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "SELECT 1 FROM nodes n JOIN UNNEST($1::text[]) AS v (id) ON n.id = v.id ORDER BY n.id \
                 FOR NO KEY UPDATE OF n",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE nodes SET last_seen_at = v.last_seen_at, metrics = v.metrics, seen_xid = pg_current_xact_id(), \
                 seen_by = $4 FROM UNNEST($1::text[], $2::bigint[], $3::text[]) AS v (id, last_seen_at, metrics) \
                 WHERE nodes.id = v.id",
            )
            .bind(&ids)
            .bind(&seen)
            .bind(&metrics)
            .bind(&self.me)
            .execute(&mut *tx)
            .await?;
            // Models changed: the node's lists are written anew (nodes deleted meanwhile match no row).
            let mut revisions = Vec::new();
            for figures in batch {
                let Some(node_lists) = &figures.lists else { continue };
                let revision: Option<i64> = sqlx::query_scalar(
                    "UPDATE nodes SET lists = $1, revision = revision + 1, changed_xid = pg_current_xact_id() \
                     WHERE id = $2 RETURNING revision",
                )
                .bind(lists::encode(node_lists))
                .bind(figures.node_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(revision) = revision {
                    notify_node(&mut tx, figures.node_id).await?;
                    revisions.push((figures.node_id, revision));
                }
            }
            tx.commit().await?;
            for (id, revision) in revisions {
                self.wrote(id, revision);
            }
            Ok(())
        }))
    }

    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>> {
        Box::pin(self.gated(async move { sql::node_events(&mut *self.pool.acquire().await?, id, limit, before).await }))
    }

    /// Removes old node events, and the records of deletions as old (every router has long read them).
    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        Box::pin(self.gated(async move {
            let removed = self.prune_before("node_events", cutoff).await?;
            sqlx::query("DELETE FROM node_deletions WHERE deleted_at < $1").bind(cutoff).execute(&self.pool).await?;
            Ok(removed)
        }))
    }
}

impl PgStore {
    /// Removes the rows of `table` (with `id` and `at` columns) from before `cutoff`, in bounded batches.
    pub(super) async fn prune_before(&self, table: &'static str, cutoff: Millis) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let batch = sql::prune_batch(&mut *self.pool.acquire().await?, table, cutoff).await?;
            removed += batch;
            if batch < crate::store::sql::PRUNE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds a node's columns in the order of the inserts' column lists.
fn bind_node<'q>(query: Query<'q>, node: &'q Node) -> Query<'q> {
    query
        .bind(node.id.to_string())
        .bind(node.machine_name.as_str())
        .bind(node.ip_address.as_str())
        .bind(i64::from(node.runtime_port))
        .bind(node.runtime_version.as_str())
        .bind(node.status.as_str())
        .bind(node.display_name.as_deref())
        .bind(node.notes.as_deref())
        .bind(node.figures.as_ref().map(PackedFigures::as_str))
        .bind(node.registered_at)
        .bind(node.approved_at)
        .bind(node.approved_by.as_deref())
        .bind(node.last_seen_at)
        .bind(lists::encode_node(node))
        .bind(node.join_token.as_deref())
        .bind(node.cordoned)
        .bind(node.max_concurrency.map(i64::from))
        .bind(node.conditions.encode())
}

/// Adds a node copied from another database, unless its id (or its machine name and port) is there already;
/// returns whether it was added.
pub(in crate::store) async fn copy_node(conn: &mut PgConnection, node: &Node) -> Result<bool, StoreError> {
    let insert = sqlx::query(
        "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, notes, \
         metrics, registered_at, approved_at, approved_by, last_seen_at, lists, join_token, cordoned, max_concurrency, \
         conditions) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT DO NOTHING",
    );
    Ok(bind_node(insert, node).execute(&mut *conn).await?.rows_affected() == 1)
}

/// Inserts one node's row; a duplicate comes back as [`StoreError::Duplicate`].
pub(super) async fn insert_row(conn: &mut PgConnection, node: &Node) -> Result<(), StoreError> {
    let insert = sqlx::query(
        "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, notes, \
         metrics, registered_at, approved_at, approved_by, last_seen_at, lists, join_token, cordoned, max_concurrency, \
         conditions) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    );
    bind_node(insert, node).execute(&mut *conn).await?;
    Ok(())
}

pub(super) async fn write_token(
    conn: &mut PgConnection,
    id: Uuid,
    token: TokenHash,
    now: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO node_tokens (node_id, token_hash, created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (node_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
    )
    .bind(id.to_string())
    .bind(token.to_hex())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Appends events to their nodes' histories, with one statement.
pub(super) async fn write_events<'a>(
    conn: &mut PgConnection,
    events: impl IntoIterator<Item = &'a NodeEvent>,
) -> Result<(), StoreError> {
    let events: Vec<&NodeEvent> = events.into_iter().collect();
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = events.iter().map(|e| e.node_id.to_string()).collect();
    let at: Vec<i64> = events.iter().map(|e| e.at).collect();
    let from: Vec<Option<&str>> = events.iter().map(|e| e.from.map(NodeStatus::as_str)).collect();
    let to: Vec<&str> = events.iter().map(|e| e.to.as_str()).collect();
    let reason: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    let actor: Vec<Option<&str>> = events.iter().map(|e| e.actor.as_deref()).collect();
    sqlx::query(
        "INSERT INTO node_events (node_id, at, from_status, to_status, reason, actor) \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])",
    )
    .bind(&ids)
    .bind(&at)
    .bind(&from)
    .bind(&to)
    .bind(&reason)
    .bind(&actor)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Keeps the newest [`EVENTS_PER_NODE`] events of a node.
async fn cap_events(conn: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
    let id = id.to_string();
    sqlx::query(
        "DELETE FROM node_events WHERE node_id = $1 AND id <= \
         (SELECT id FROM node_events WHERE node_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
    )
    .bind(&id)
    .bind(EVENTS_PER_NODE)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Announces a change of node `id` to every router, when the transaction commits.
pub(super) async fn notify_node(conn: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(NODES_CHANNEL).bind(id.to_string()).execute(&mut *conn).await?;
    Ok(())
}
