//! [`NodeStore`] on PostgreSQL: nodes, their tokens and events, and the heartbeat figures written behind.
//!
//! Every write that changes a node other than its figures raises the row's `revision`, stamps `changed_xid` with
//! its transaction and notifies `llm_router_nodes`, in the same transaction: how the other routers learn of it
//! (`shared.rs`). The statements on a node's rows these writes are made of are in `node_rows.rs`.

use futures_util::TryStreamExt;
use uuid::Uuid;

use super::PgStore;
use super::node_rows::{
    cap_events, copy_node, insert_row, node_columns, node_from_row, notify_node, write_events, write_token,
};
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinUse;
use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::store::sql::postgres as sql;
use crate::store::sqlite::lists;
use crate::store::{Figures, NewNode, NodeStore, SharedNode, StoreError, StoreResult, StoredNode};

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
