//! The one writer of a node's lists: its child rows (`node_gpu_devices`, `node_supported_runtimes`,
//! `node_loaded_models`, `node_tags`) and the copy of them on its row (`nodes.lists`, what start-up reads), always
//! written together, for one node or a whole batch; and the one definition of that copy's encoding. A new node's
//! copy goes in with its row (the insert binds [`encode_node`]) and its child rows are written here in the same
//! transaction; for a stored node, both are written here.
//!
//! (Migration `0002` filled the copy once for rows written before it existed; migrations are history and stay as they
//! were applied.)

use std::borrow::Cow;

use llm_router_protocol::GpuDevice;
use serde::{Deserialize, Serialize};
use sqlx::query_builder::Separated;
use sqlx::sqlite::Sqlite;
use sqlx::{QueryBuilder, SqliteConnection};
use uuid::Uuid;

use crate::model::node::{Node, NodeLists};
use crate::store::StoreError;

/// Most values bound in one statement: SQLite allows 32,766. Rows are written many per statement, since each
/// statement is a round trip to the database thread.
const MAX_BINDS: usize = 30_000;

/// Whether the nodes are new or stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rows {
    /// Rows just inserted, their copy already in their `lists` column ([`encode_node`], bound by the insert):
    /// only the child rows are written.
    New,
    /// Stored nodes: their child rows are replaced and their copy rewritten.
    Replace,
}

/// The copy's stored form: `{"gpu_devices": [[model, count, memory_bytes], …], "supported_runtimes": […],
/// "loaded_models": […], "ready_models": […], "tags": […]}`, and `"gpu_uuids": [[uuid, …] or null, …]` (one entry per
/// GPU group) only when some group has uuids. Borrowed when written, owned when read.
#[derive(Serialize, Deserialize)]
struct Copy<'a> {
    gpu_devices: Vec<(Cow<'a, str>, i64, Option<u64>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gpu_uuids: Option<Vec<Option<Cow<'a, [String]>>>>,
    supported_runtimes: Cow<'a, [String]>,
    loaded_models: Cow<'a, [String]>,
    ready_models: Cow<'a, [String]>,
    tags: Cow<'a, [String]>,
}

/// The copy of `lists` as stored on the node's row.
pub(in crate::store) fn encode(lists: &NodeLists) -> String {
    let NodeLists { gpu_devices, supported_runtimes, loaded_models, ready_models, tags } = lists;
    encode_parts(gpu_devices, supported_runtimes, loaded_models, ready_models, tags)
}

/// The copy of `node`'s lists, as the `lists` column of its new row (see [`Rows::New`]).
pub(in crate::store) fn encode_node(node: &Node) -> String {
    encode_parts(&node.gpu_devices, &node.supported_runtimes, &node.loaded_models, &node.ready_models, &node.tags)
}

fn encode_parts(
    gpu_devices: &[GpuDevice],
    supported_runtimes: &[String],
    loaded_models: &[String],
    ready_models: &[String],
    tags: &[String],
) -> String {
    let copy = Copy {
        gpu_devices: gpu_devices.iter().map(|g| (Cow::Borrowed(g.model.as_str()), g.count, g.memory_bytes)).collect(),
        gpu_uuids: gpu_devices
            .iter()
            .any(|g| g.uuids.is_some())
            .then(|| gpu_devices.iter().map(|g| g.uuids.as_deref().map(Cow::Borrowed)).collect()),
        supported_runtimes: Cow::Borrowed(supported_runtimes),
        loaded_models: Cow::Borrowed(loaded_models),
        ready_models: Cow::Borrowed(ready_models),
        tags: Cow::Borrowed(tags),
    };
    // Strings, numbers and arrays always encode.
    serde_json::to_string(&copy).unwrap_or_default()
}

/// The lists of a stored copy; `None` when the text is not one.
pub(in crate::store) fn decode(text: &str) -> Option<NodeLists> {
    let copy: Copy = serde_json::from_str(text).ok()?;
    let mut uuids = copy.gpu_uuids.unwrap_or_default().into_iter();
    Some(NodeLists {
        gpu_devices: copy
            .gpu_devices
            .into_iter()
            .map(|(model, count, memory_bytes)| GpuDevice {
                model: model.into_owned(),
                count,
                memory_bytes,
                uuids: uuids.next().flatten().map(Cow::into_owned),
            })
            .collect(),
        supported_runtimes: exact(copy.supported_runtimes),
        loaded_models: exact(copy.loaded_models),
        ready_models: exact(copy.ready_models),
        tags: exact(copy.tags),
    })
}

/// A decoded list without the room a growing vector keeps for more: at start-up, 100,000 nodes' lists are decoded,
/// and the room would be a tenth of the fleet's memory.
fn exact(list: Cow<'_, [String]>) -> Vec<String> {
    let mut list = list.into_owned();
    list.shrink_to_fit();
    list
}

/// Writes every list of `nodes` (whose rows exist): the child rows, and the copy on each row of stored nodes.
pub(super) async fn write(
    conn: &mut SqliteConnection,
    nodes: &[(Uuid, &NodeLists)],
    rows: Rows,
) -> Result<(), StoreError> {
    let ids: Vec<String> = nodes.iter().map(|(id, _)| id.to_string()).collect();
    if rows == Rows::Replace {
        for table in ["node_gpu_devices", "node_supported_runtimes", "node_loaded_models", "node_tags"] {
            for chunk in ids.chunks(MAX_BINDS) {
                let mut delete = QueryBuilder::<Sqlite>::new(format!("DELETE FROM {table} WHERE node_id IN ("));
                let mut list = delete.separated(", ");
                for id in chunk {
                    list.push_bind(id.as_str());
                }
                delete.push(")");
                delete.build().execute(&mut *conn).await?;
            }
        }
    }
    let pairs = || ids.iter().map(String::as_str).zip(nodes.iter().map(|(_, lists)| *lists));

    let gpus: Vec<_> = pairs()
        .flat_map(|(id, lists)| lists.gpu_devices.iter().enumerate().map(move |(position, gpu)| (id, position, gpu)))
        .collect();
    insert(
        conn,
        "INSERT INTO node_gpu_devices (node_id, position, model, count, memory_bytes) ",
        5,
        &gpus,
        |row, (id, position, gpu)| {
            row.push_bind(*id)
                .push_bind(*position as i64)
                .push_bind(gpu.model.as_str())
                .push_bind(gpu.count)
                .push_bind(gpu.memory_bytes.and_then(|m| i64::try_from(m).ok()));
        },
    )
    .await?;

    let models: Vec<_> = pairs()
        .flat_map(|(id, lists)| {
            let loaded = lists.loaded_models.iter().enumerate().map(move |(position, m)| (id, "loaded", position, m));
            let ready = lists.ready_models.iter().enumerate().map(move |(position, m)| (id, "ready", position, m));
            loaded.chain(ready)
        })
        .collect();
    insert(
        conn,
        "INSERT INTO node_loaded_models (node_id, kind, position, model) ",
        4,
        &models,
        |row, (id, kind, position, model)| {
            row.push_bind(*id).push_bind(*kind).push_bind(*position as i64).push_bind(model.as_str());
        },
    )
    .await?;

    let strings = |pick: fn(&NodeLists) -> &Vec<String>| -> Vec<(&str, usize, &str)> {
        pairs()
            .flat_map(|(id, lists)| {
                pick(lists).iter().enumerate().map(move |(position, item)| (id, position, item.as_str()))
            })
            .collect()
    };
    for (head, items) in [
        ("INSERT INTO node_supported_runtimes (node_id, position, runtime) ", strings(|l| &l.supported_runtimes)),
        ("INSERT INTO node_tags (node_id, position, tag) ", strings(|l| &l.tags)),
    ] {
        insert(conn, head, 3, &items, |row, (id, position, item)| {
            row.push_bind(*id).push_bind(*position as i64).push_bind(*item);
        })
        .await?;
    }

    if rows == Rows::New {
        return Ok(());
    }
    let copies: Vec<(&str, String)> = pairs().map(|(id, lists)| (id, encode(lists))).collect();
    if let [(id, copy)] = copies.as_slice() {
        // One node (a registration, an edit): the plain statement, cheaper than joining a table of values.
        sqlx::query("UPDATE nodes SET lists = ? WHERE id = ?")
            .bind(copy.as_str())
            .bind(*id)
            .execute(&mut *conn)
            .await?;
        return Ok(());
    }
    update_copies(conn, &copies).await
}

/// Writes the models of `nodes` (`node_loaded_models`) and the copy of their lists: what a heartbeat changes. Nodes
/// whose row is gone (deleted meanwhile) are skipped. Three statements, whatever the number of nodes up to the bound
/// values' limit: the flush of figures that writes them holds the writer every status change waits for.
pub(super) async fn write_models(conn: &mut SqliteConnection, nodes: &[(Uuid, &NodeLists)]) -> Result<(), StoreError> {
    let ids: Vec<String> = nodes.iter().map(|(id, _)| id.to_string()).collect();
    for chunk in ids.chunks(MAX_BINDS) {
        let mut delete = QueryBuilder::<Sqlite>::new("DELETE FROM node_loaded_models WHERE node_id IN (");
        let mut list = delete.separated(", ");
        for id in chunk {
            list.push_bind(id.as_str());
        }
        delete.push(")");
        delete.build().execute(&mut *conn).await?;
    }
    let models: Vec<_> = ids
        .iter()
        .zip(nodes)
        .flat_map(|(id, (_, lists))| {
            let loaded = lists.loaded_models.iter().enumerate().map(move |(position, m)| (id, "loaded", position, m));
            let ready = lists.ready_models.iter().enumerate().map(move |(position, m)| (id, "ready", position, m));
            loaded.chain(ready)
        })
        .collect();
    for chunk in models.chunks(MAX_BINDS / 4) {
        let mut insert = QueryBuilder::<Sqlite>::new("WITH v (node_id, kind, position, model) AS (");
        insert.push_values(chunk, |mut row, (id, kind, position, model)| {
            row.push_bind(id.as_str()).push_bind(*kind).push_bind(*position as i64).push_bind(model.as_str());
        });
        insert.push(
            ") INSERT INTO node_loaded_models (node_id, kind, position, model) \
             SELECT v.node_id, v.kind, v.position, v.model FROM v JOIN nodes ON nodes.id = v.node_id",
        );
        insert.build().execute(&mut *conn).await?;
    }
    let copies: Vec<(&str, String)> =
        ids.iter().map(String::as_str).zip(nodes.iter().map(|(_, l)| encode(l))).collect();
    update_copies(conn, &copies).await
}

/// Rewrites the copy on each of these nodes' rows (those that exist).
async fn update_copies(conn: &mut SqliteConnection, copies: &[(&str, String)]) -> Result<(), StoreError> {
    for chunk in copies.chunks(MAX_BINDS / 2) {
        let mut update = QueryBuilder::<Sqlite>::new("WITH v (id, lists) AS (");
        update.push_values(chunk, |mut row, (id, copy)| {
            row.push_bind(*id).push_bind(copy.as_str());
        });
        update.push(") UPDATE nodes SET lists = v.lists FROM v WHERE nodes.id = v.id");
        update.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Inserts `rows` with `head` (`INSERT INTO table (columns) `), as few statements as the bound values allow.
async fn insert<'a, T>(
    conn: &mut SqliteConnection,
    head: &'static str,
    columns: usize,
    rows: &'a [T],
    mut bind: impl FnMut(&mut Separated<'_, Sqlite, &'static str>, &'a T),
) -> Result<(), StoreError> {
    for chunk in rows.chunks(MAX_BINDS / columns) {
        let mut insert = QueryBuilder::<Sqlite>::new(head);
        insert.push_values(chunk, |mut row, item| bind(&mut row, item));
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_round_trips() {
        let lists = NodeLists {
            gpu_devices: vec![GpuDevice {
                model: "NVIDIA H100".into(),
                count: 8,
                memory_bytes: Some(80 << 30),
                uuids: None,
            }],
            supported_runtimes: vec!["vllm".into()],
            loaded_models: vec!["a".into(), "b".into()],
            ready_models: vec!["a".into()],
            tags: vec!["rack-1".into()],
        };
        let text = encode(&lists);
        assert!(text.starts_with(r#"{"gpu_devices":[["NVIDIA H100",8,85899345920]]"#), "{text}");
        assert_eq!(decode(&text), Some(lists));
        assert_eq!(decode("not json"), None);
    }

    #[test]
    fn gpu_uuids_are_kept_when_known() {
        let lists = NodeLists {
            gpu_devices: vec![
                GpuDevice { model: "A".into(), count: 1, memory_bytes: None, uuids: None },
                GpuDevice {
                    model: "B".into(),
                    count: 2,
                    memory_bytes: None,
                    uuids: Some(vec!["GPU-1".into(), "GPU-2".into()]),
                },
            ],
            ..NodeLists::default()
        };
        let text = encode(&lists);
        assert!(text.contains(r#""gpu_uuids":[null,["GPU-1","GPU-2"]]"#), "{text}");
        assert_eq!(decode(&text), Some(lists));
    }
}
