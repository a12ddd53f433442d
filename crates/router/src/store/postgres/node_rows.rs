//! The statements on a node's rows in PostgreSQL, shared by the writes of `nodes.rs`, the reads of `shared.rs` and
//! `llm-router migrate`: a node row read with its token and revision, its insert (or copy), its token, its events and
//! their cap, and the notification that announces a change to the other routers.

use anyhow::Context;
use llm_router_protocol::NodeStatus;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::model::figures::PackedFigures;
use crate::model::node::{Node, NodeEvent};
use crate::store::sqlite::lists;
use crate::store::{EVENTS_PER_NODE, SharedNode, StoreError, rows};

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
pub(super) async fn cap_events(conn: &mut PgConnection, id: Uuid) -> Result<(), StoreError> {
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

/// A node's token, replaced: the statement both backends share.
pub(super) use crate::store::sql::postgres::write_token;
