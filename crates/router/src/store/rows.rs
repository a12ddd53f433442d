//! Records read back from a row, the same for every backend: both store the same columns in the same order, and
//! [`Columns`] reads a column of either.

use anyhow::Context;
use uuid::Uuid;

use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::{Principal, Scope, TokenHash};
use crate::model::enrollment::JoinToken;
use crate::model::figures::PackedFigures;
use crate::model::fleet_event::FleetEvent;
use crate::model::health::Conditions;
use crate::model::node::{Node, NodeEvent, RecordedEvent};
use crate::store::{ApiKeyRow, UserRow};

/// The column readers a row of any backend offers, by position.
pub(super) trait Columns {
    fn text(&self, i: usize) -> anyhow::Result<String>;
    fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>>;
    /// A text column borrowed from the row, for what is parsed rather than kept.
    fn str(&self, i: usize) -> anyhow::Result<&str>;
    fn opt_str(&self, i: usize) -> anyhow::Result<Option<&str>>;
    fn int(&self, i: usize) -> anyhow::Result<i64>;
    fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>>;
    fn boolean(&self, i: usize) -> anyhow::Result<bool>;
}

macro_rules! columns {
    ($row:ty) => {
        impl Columns for $row {
            fn text(&self, i: usize) -> anyhow::Result<String> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn str(&self, i: usize) -> anyhow::Result<&str> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn opt_str(&self, i: usize) -> anyhow::Result<Option<&str>> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn int(&self, i: usize) -> anyhow::Result<i64> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
            fn boolean(&self, i: usize) -> anyhow::Result<bool> {
                Ok(sqlx::Row::try_get(self, i)?)
            }
        }
    };
}

columns!(sqlx::sqlite::SqliteRow);
columns!(sqlx::postgres::PgRow);

/// `username, password_hash, role, created_at`
pub(super) fn user(row: &impl Columns) -> anyhow::Result<UserRow> {
    Ok(UserRow {
        username: row.text(0)?,
        password_hash: row.text(1)?,
        role: row.text(2)?.parse()?,
        created_at: row.int(3)?,
    })
}

/// `username, role` of the user behind session `hash`.
pub(super) fn session_principal(row: &impl Columns, hash: TokenHash) -> anyhow::Result<Principal> {
    Ok(Principal {
        name: row.text(0)?,
        role: row.text(1)?.parse()?,
        scope: Scope::Admin,
        session: Some(hash),
        api_key: None,
    })
}

/// `name, role, scope, id` of an API key.
pub(super) fn key_principal(row: &impl Columns) -> anyhow::Result<Principal> {
    Ok(Principal {
        name: format!("api-key:{}", row.text(0)?),
        role: row.text(1)?.parse()?,
        scope: row.text(2)?.parse()?,
        session: None,
        api_key: Some(Uuid::parse_str(&row.text(3)?)?),
    })
}

/// `id, name, role, scope, created_by, created_at`
pub(super) fn api_key(row: &impl Columns) -> anyhow::Result<ApiKeyRow> {
    Ok(ApiKeyRow {
        id: Uuid::parse_str(&row.text(0)?)?,
        name: row.text(1)?,
        role: row.text(2)?.parse()?,
        scope: row.text(3)?.parse()?,
        created_by: row.text(4)?,
        created_at: row.int(5)?,
        limits: crate::model::tenant::Limits::decode(row.opt_str(6)?),
        weight: u32::try_from(row.int(7)?).unwrap_or(1),
    })
}

/// The columns [`join_token`] reads.
pub(super) const JOIN_TOKEN_COLUMNS: &str =
    "id, name, token_hash, created_by, created_at, expires_at, max_uses, uses, auto_approve, tags, revoked_at";

pub(super) fn join_token(row: &impl Columns) -> anyhow::Result<JoinToken> {
    Ok(JoinToken {
        id: Uuid::parse_str(&row.text(0)?)?,
        name: row.text(1)?,
        hash: TokenHash::from_hex(&row.text(2)?).context("malformed join token hash")?,
        created_by: row.text(3)?,
        created_at: row.int(4)?,
        expires_at: row.int(5)?,
        max_uses: row.opt_int(6)?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        uses: u32::try_from(row.int(7)?).unwrap_or(u32::MAX),
        auto_approve: row.boolean(8)?,
        tags: serde_json::from_str(&row.text(9)?)?,
        revoked_at: row.opt_int(10)?,
    })
}

/// `id, node_id, at, from_status, to_status, reason, actor`
pub(super) fn node_event(row: &impl Columns) -> anyhow::Result<RecordedEvent> {
    Ok(RecordedEvent {
        id: row.int(0)?,
        event: NodeEvent {
            node_id: Uuid::parse_str(&row.text(1)?)?,
            at: row.int(2)?,
            from: row.opt_text(3)?.map(|from| from.parse()).transpose()?,
            to: row.text(4)?,
            reason: row.text(5)?,
            actor: row.opt_text(6)?,
        },
    })
}

/// `id, at, actor, client, action, target, outcome`
pub(super) fn audit_event(row: &impl Columns) -> anyhow::Result<RecordedAudit> {
    Ok(RecordedAudit {
        id: row.int(0)?,
        event: AuditEvent {
            at: row.int(1)?,
            actor: row.text(2)?,
            client: row.opt_text(3)?,
            action: row.text(4)?,
            target: row.opt_text(5)?,
            outcome: row.text(6)?,
        },
    })
}

/// `id, at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, resolution`
pub(super) fn fleet_event(row: &impl Columns) -> anyhow::Result<FleetEvent> {
    Ok(FleetEvent {
        id: row.int(0)?,
        at: row.int(1)?,
        kind: row.text(2)?,
        message: row.text(3)?,
        nodes_affected: u64::try_from(row.int(4)?).unwrap_or(0),
        nodes_live: u64::try_from(row.int(5)?).unwrap_or(0),
        resolved_at: row.opt_int(6)?,
        resolved_by: row.opt_text(7)?,
        resolution: row.opt_text(8)?,
    })
}

/// The columns [`node`] reads, from `nodes n LEFT JOIN node_tokens t ON t.node_id = n.id`.
pub(super) const NODE_COLUMNS: &str = "n.id, n.machine_name, n.ip_address, n.runtime_port, n.runtime_version, \
     n.status, n.display_name, n.notes, n.metrics, n.registered_at, n.approved_at, n.approved_by, n.last_seen_at, \
     n.lists, t.token_hash, n.join_token, n.cordoned, n.max_concurrency, n.conditions";

/// A node row read with [`NODE_COLUMNS`]: the node with empty lists, the stored copy of its lists (put on the node
/// by the caller, which knows what to do without one), and its token hash.
pub(super) fn node<R: Columns>(row: &R) -> anyhow::Result<(Node, Option<&str>, Option<TokenHash>)> {
    let id_text = row.str(0)?;
    let id = Uuid::parse_str(id_text).with_context(|| format!("malformed node id {id_text}"))?;
    let port = row.int(3)?;
    let token = row.opt_str(14)?.map(|hash| TokenHash::from_hex(hash).context("malformed token hash")).transpose()?;
    let node = Node {
        id,
        machine_name: row.text(1)?,
        ip_address: row.text(2)?,
        runtime_port: u16::try_from(port).with_context(|| format!("bad port {port} for node {id}"))?,
        runtime_version: row.text(4)?,
        status: row.str(5)?.parse()?,
        display_name: row.opt_text(6)?,
        notes: row.opt_text(7)?,
        gpu_devices: Vec::new(),
        supported_runtimes: Vec::new(),
        loaded_models: Vec::new(),
        ready_models: Vec::new(),
        tags: Vec::new(),
        figures: row.opt_text(8)?.map(PackedFigures::from_stored),
        registered_at: row.int(9)?,
        approved_at: row.opt_int(10)?,
        approved_by: row.opt_text(11)?,
        join_token: row.opt_text(15)?,
        cordoned: row.boolean(16)?,
        max_concurrency: row.opt_int(17)?.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        conditions: row.opt_str(18)?.map(Conditions::decode).unwrap_or_default(),
        last_seen_at: row.opt_int(12)?,
    };
    Ok((node, row.opt_str(13)?, token))
}
