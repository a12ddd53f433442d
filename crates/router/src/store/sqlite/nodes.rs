//! [`NodeStore`] on SQLite: nodes, their tokens and their events written, a node's history read. Registrations and
//! status changes go through the group commits of `commit.rs`, start-up through `load.rs`, lists through `lists.rs`.

use std::collections::HashSet;

use llm_router_protocol::NodeStatus;
use sqlx::query_builder::Separated;
use sqlx::sqlite::Sqlite;
use sqlx::{QueryBuilder, SqliteConnection};
use uuid::Uuid;

use super::lists::{self, Rows};
use super::{SqliteStore, commit, load, write_tx};
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinUse;
use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent, NodeLists, RecordedEvent};
use crate::store::sql::{PRUNE_BATCH, sqlite as sql};
use crate::store::{EVENTS_PER_NODE, Figures, NewNode, NodeBatches, NodeStore, StoreError, StoreResult, StoredNode};

impl NodeStore for SqliteStore {
    fn load_nodes(&self) -> StoreResult<'_, Vec<StoredNode>> {
        Box::pin(load::load_nodes(&self.reader))
    }

    fn node_batches(&self) -> StoreResult<'_, NodeBatches> {
        Box::pin(load::node_batches(&self.reader))
    }

    fn insert_node(
        &self,
        node: Node,
        token: TokenHash,
        events: Vec<NodeEvent>,
        join: Option<JoinUse>,
    ) -> StoreResult<'_, ()> {
        Box::pin(commit::insert_node(&self.inserts, node, token, events, join))
    }

    /// Adds nodes as they are (an import, a seeded fleet), many per statement, in one transaction.
    fn import_nodes<'a>(&'a self, nodes: &'a [NewNode]) -> StoreResult<'a, Vec<Uuid>> {
        Box::pin(async move {
            write_tx!(self, |tx| async {
                let mut added = Vec::new();
                for chunk in nodes.chunks(NODES_PER_STATEMENT) {
                    let mut insert = QueryBuilder::<Sqlite>::new(INSERT_NODE);
                    insert.push_values(chunk, |mut row, new| bind_node(&mut row, &new.node));
                    insert.push(" ON CONFLICT DO NOTHING RETURNING id");
                    let ids: Vec<String> = insert.build_query_scalar().fetch_all(&mut *tx).await?;
                    let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
                    let fresh: Vec<&NewNode> =
                        chunk.iter().filter(|new| ids.contains(new.node.id.to_string().as_str())).collect();
                    let node_lists: Vec<NodeLists> = fresh.iter().map(|new| NodeLists::of(&new.node)).collect();
                    let pairs: Vec<(Uuid, &NodeLists)> =
                        fresh.iter().zip(&node_lists).map(|(new, lists)| (new.node.id, lists)).collect();
                    lists::write(tx, &pairs, Rows::New).await?;
                    for new in &fresh {
                        if let Some(token) = new.token {
                            write_token(tx, new.node.id, token, new.node.registered_at).await?;
                        }
                    }
                    write_events(tx, fresh.iter().flat_map(|new| &new.events)).await?;
                    added.extend(fresh.iter().map(|new| new.node.id));
                }
                Ok::<_, StoreError>(added)
            })
        })
    }

    /// Rewrites a re-registered node's descriptive fields, lists, status and token in one transaction, with its
    /// events, counting the use of the join token it came with.
    fn reregister_node<'a>(
        &'a self,
        node: &'a Node,
        token: TokenHash,
        now: Millis,
        events: &'a [NodeEvent],
        join: Option<&'a JoinUse>,
    ) -> StoreResult<'a, ()> {
        Box::pin(async move {
            write_tx!(self, |tx| async {
                if let Some(join) = join {
                    sql::use_join_token(tx, join).await?;
                }
                sqlx::query(
                    "UPDATE nodes SET ip_address = ?, runtime_version = ?, status = ?, approved_at = ?, \
                 approved_by = ?, join_token = ? WHERE id = ?",
                )
                .bind(&node.ip_address)
                .bind(&node.runtime_version)
                .bind(node.status.as_str())
                .bind(node.approved_at)
                .bind(&node.approved_by)
                .bind(&node.join_token)
                .bind(node.id.to_string())
                .execute(&mut *tx)
                .await?;
                lists::write(tx, &[(node.id, &NodeLists::of(node))], Rows::Replace).await?;
                write_token(tx, node.id, token, now).await?;
                write_events(tx, events).await
            })
        })
    }

    fn record_transition<'a>(&'a self, node: &'a Node, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        Box::pin(commit::record_transition(&self.transitions, node, event))
    }

    /// Persists the fields an administrator edits.
    fn update_admin_fields<'a>(&'a self, node: &'a Node) -> StoreResult<'a, ()> {
        Box::pin(async move {
            write_tx!(self, |tx| async {
                sqlx::query("UPDATE nodes SET display_name = ?, notes = ?, max_concurrency = ? WHERE id = ?")
                    .bind(&node.display_name)
                    .bind(&node.notes)
                    .bind(node.max_concurrency)
                    .bind(node.id.to_string())
                    .execute(&mut *tx)
                    .await?;
                lists::write(tx, &[(node.id, &NodeLists::of(node))], Rows::Replace).await
            })
        })
    }

    /// Removes a node with its lists and token; its events stay as the audit trail, plus one for the deletion.
    fn delete_node<'a>(&'a self, id: Uuid, event: &'a NodeEvent) -> StoreResult<'a, ()> {
        Box::pin(async move {
            write_tx!(self, |tx| async {
                sqlx::query("DELETE FROM nodes WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
                write_events(tx, [event]).await
            })
        })
    }

    /// Writes a batch of heartbeat figures in transactions of [`FLUSH_WORK`] rows at most. Nodes deleted meanwhile
    /// match no row and are skipped.
    ///
    /// Not one transaction for the whole batch: the writer is the one connection every decision is committed on, and
    /// a flush of 10,000 nodes whose models changed (a fleet coming up) held it for a third of a second, while the
    /// heartbeats that turned those nodes online waited for their commits (SPEC §10: p99 < 20 ms in a storm). Between
    /// two chunks the writer takes the commits waiting for it. A chunk that fails leaves the earlier ones written; the
    /// caller writes the whole batch again, which rewrites them with the same figures.
    fn flush_figures<'a>(&'a self, batch: &'a [Figures]) -> StoreResult<'a, ()> {
        Box::pin(async move {
            for chunk in flush_chunks(batch) {
                write_tx!(self, |tx| async {
                    // One statement per chunk, not per node: each statement is a round trip to the database thread.
                    let mut update = QueryBuilder::<Sqlite>::new("WITH v (id, last_seen_at, metrics) AS (");
                    update.push_values(chunk, |mut row, written| {
                        row.push_bind(written.node_id.to_string())
                            .push_bind(written.last_seen_at)
                            .push_bind(metrics_json(&written.figures));
                    });
                    update.push(
                    ") UPDATE nodes SET last_seen_at = v.last_seen_at, metrics = v.metrics FROM v WHERE nodes.id = v.id",
                );
                    update.build().execute(&mut *tx).await?;
                    // Models changed: the node's models and the copy of its lists are written anew, unless it was deleted
                    // meanwhile (its other lists change only with a registration or an edit, written there).
                    let changed: Vec<(Uuid, &NodeLists)> =
                        chunk.iter().filter_map(|figures| Some((figures.node_id, figures.lists.as_ref()?))).collect();
                    if changed.is_empty() {
                        return Ok(());
                    }
                    lists::write_models(tx, &changed).await
                })?;
            }
            Ok(())
        })
    }

    fn node_events(&self, id: Uuid, limit: u32, before: Option<i64>) -> StoreResult<'_, Vec<RecordedEvent>> {
        Box::pin(async move { sql::node_events(&mut *self.reader().await?, id, limit, before).await })
    }

    fn prune_events(&self, cutoff: Millis) -> StoreResult<'_, u64> {
        Box::pin(self.prune_before("node_events", cutoff))
    }
}

impl SqliteStore {
    /// Removes the rows of `table` (with `id` and `at` columns) from before `cutoff`, a bounded batch per
    /// transaction so that the writer is never held for long. Returns how many were removed.
    pub(super) async fn prune_before(&self, table: &'static str, cutoff: Millis) -> Result<u64, StoreError> {
        let mut removed = 0;
        loop {
            let batch = write_tx!(self, |tx| sql::prune_batch(tx, table, cutoff))?;
            removed += batch;
            if batch < PRUNE_BATCH as u64 {
                return Ok(removed);
            }
        }
    }
}

/// The columns of a node's row, the copy of its lists included ([`lists::encode_node`]); its child rows go through
/// [`lists::write`], its token through [`write_token`].
const INSERT_NODE: &str = "INSERT INTO nodes (id, machine_name, ip_address, runtime_port, runtime_version, status, \
     display_name, notes, metrics, registered_at, approved_at, approved_by, last_seen_at, lists, join_token, cordoned, \
     max_concurrency, conditions) ";

/// The work of one transaction of a flush of figures, in rows: a node's figures are one, a node whose models changed
/// (its model rows rewritten) counts [`LISTS_WORK`]: a few milliseconds of the writer's time on the reference
/// machine under heartbeat load, which is what a status change committed meanwhile may wait.
const FLUSH_WORK: usize = 500;

/// The work of writing one node's models, against its figures' one.
const LISTS_WORK: usize = 4;

/// `batch` cut into the transactions of a flush, each at most [`FLUSH_WORK`].
fn flush_chunks(batch: &[Figures]) -> impl Iterator<Item = &[Figures]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut work = 0;
        let len = rest
            .iter()
            .position(|figures| {
                work += if figures.lists.is_some() { LISTS_WORK } else { 1 };
                work > FLUSH_WORK
            })
            .unwrap_or(rest.len())
            .max(1);
        let (chunk, tail) = rest.split_at(len);
        rest = tail;
        Some(chunk)
    })
}

/// Nodes per statement of an import (18 values each, well under SQLite's limit of 32,766).
const NODES_PER_STATEMENT: usize = 500;

/// Binds the values of a node's row, in the order of [`INSERT_NODE`].
fn bind_node(row: &mut Separated<'_, Sqlite, &'static str>, node: &Node) {
    row.push_bind(node.id.to_string())
        .push_bind(node.machine_name.as_str())
        .push_bind(node.ip_address.as_str())
        .push_bind(i64::from(node.runtime_port))
        .push_bind(node.runtime_version.as_str())
        .push_bind(node.status.as_str())
        .push_bind(node.display_name.as_deref())
        .push_bind(node.notes.as_deref())
        .push_bind(metrics_json(&node.figures))
        .push_bind(node.registered_at)
        .push_bind(node.approved_at)
        .push_bind(node.approved_by.as_deref())
        .push_bind(node.last_seen_at)
        .push_bind(lists::encode_node(node))
        .push_bind(node.join_token.as_deref())
        .push_bind(node.cordoned)
        .push_bind(node.max_concurrency)
        .push_bind(node.conditions.encode());
}

/// Inserts one node's row; a duplicate comes back as [`StoreError::Duplicate`].
pub(super) async fn insert_row(conn: &mut SqliteConnection, node: &Node) -> Result<(), StoreError> {
    let mut insert = QueryBuilder::<Sqlite>::new(INSERT_NODE);
    insert.push_values([node], |mut row, node| bind_node(&mut row, node));
    insert.build().execute(&mut *conn).await?;
    Ok(())
}

/// A node's token, replaced: the statement both backends share.
pub(super) use crate::store::sql::sqlite::write_token;

/// The `metrics` column holds a node's packed figures.
fn metrics_json(figures: &Option<PackedFigures>) -> Option<&str> {
    figures.as_ref().map(PackedFigures::as_str)
}

/// Appends events to their nodes' histories, many per statement.
pub(super) async fn write_events<'a>(
    conn: &mut SqliteConnection,
    events: impl IntoIterator<Item = &'a NodeEvent>,
) -> Result<(), StoreError> {
    let events: Vec<&NodeEvent> = events.into_iter().collect();
    // Six values each, well under SQLite's limit of 32,766.
    for chunk in events.chunks(5_000) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO node_events (node_id, at, from_status, to_status, reason, actor) ",
        );
        insert.push_values(chunk, |mut row, event| {
            row.push_bind(event.node_id.to_string())
                .push_bind(event.at)
                .push_bind(event.from.map(NodeStatus::as_str))
                .push_bind(event.to.as_str())
                .push_bind(event.reason.as_str())
                .push_bind(event.actor.as_deref());
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Persists status changes (and approval fields, whether cordoned, conditions) with their events, in the caller's
/// transaction: a group commit of transitions (`commit.rs`). Three statements for the whole group, whatever its size
/// (each statement is a round trip to the database thread, and the group's commit is what a heartbeat that changed
/// its node's status waits for): one update of every row, one insert of every event, one cap of the nodes' events.
/// A node changed twice in one group ends with its last change, as if committed one after the other.
pub(super) async fn write_transitions(
    tx: &mut SqliteConnection,
    changes: &[(&Node, &NodeEvent)],
) -> Result<(), StoreError> {
    // Seven values a row, well under SQLite's limit of 32,766 bound values: a group is at most a few hundred.
    let mut last = std::collections::HashMap::with_capacity(changes.len());
    for (node, _) in changes {
        last.insert(node.id, *node);
    }
    let mut update =
        QueryBuilder::<Sqlite>::new("WITH v (id, status, approved_at, approved_by, cordoned, conditions) AS (");
    update.push_values(last.values(), |mut row, node| {
        row.push_bind(node.id.to_string())
            .push_bind(node.status.as_str())
            .push_bind(node.approved_at)
            .push_bind(node.approved_by.as_deref())
            .push_bind(node.cordoned)
            .push_bind(node.conditions.encode());
    });
    update.push(
        ") UPDATE nodes SET status = v.status, approved_at = v.approved_at, approved_by = v.approved_by, \
         cordoned = v.cordoned, conditions = v.conditions FROM v WHERE nodes.id = v.id",
    );
    update.build().execute(&mut *tx).await?;
    write_events(tx, changes.iter().map(|(_, event)| *event)).await?;
    let mut cap = QueryBuilder::<Sqlite>::new("WITH v (node_id) AS (");
    cap.push_values(last.keys(), |mut row, id| {
        row.push_bind(id.to_string());
    });
    cap.push(
        ") DELETE FROM node_events WHERE id IN (SELECT e.id FROM v JOIN node_events e ON e.node_id = v.node_id \
         WHERE e.id <= (SELECT x.id FROM node_events x WHERE x.node_id = v.node_id ORDER BY x.id DESC LIMIT 1 OFFSET ",
    );
    cap.push_bind(EVENTS_PER_NODE);
    cap.push("))");
    cap.build().execute(&mut *tx).await?;
    Ok(())
}
