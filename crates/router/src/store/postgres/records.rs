//! Join tokens, the audit log and fleet events.

use sqlx::{PgConnection, Postgres, QueryBuilder};
use uuid::Uuid;

use super::PgStore;
use crate::clock::Millis;
use crate::model::audit::{AuditEvent, RecordedAudit};
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinToken;
use crate::model::fleet::FleetEvent;
use crate::store::{AuditQuery, rows};

const JOIN_COLUMNS: &str = rows::JOIN_TOKEN_COLUMNS;

impl PgStore {
    pub(super) async fn insert_join_token(&self, token: &JoinToken) -> anyhow::Result<()> {
        let tags = serde_json::to_string(&token.tags)?;
        sqlx::query(
            "INSERT INTO join_tokens (id, name, token_hash, created_by, created_at, expires_at, max_uses, uses, \
             auto_approve, tags, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(token.id.to_string())
        .bind(&token.name)
        .bind(token.hash.to_hex())
        .bind(&token.created_by)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(token.max_uses.map(i64::from))
        .bind(i64::from(token.uses))
        .bind(token.auto_approve)
        .bind(&tags)
        .bind(token.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn join_tokens(&self) -> anyhow::Result<Vec<JoinToken>> {
        let sql = format!("SELECT {JOIN_COLUMNS} FROM join_tokens ORDER BY created_at DESC, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await?;
        rows.iter().map(rows::join_token).collect()
    }

    pub(super) async fn join_token(&self, hash: TokenHash) -> anyhow::Result<Option<JoinToken>> {
        let sql = format!("SELECT {JOIN_COLUMNS} FROM join_tokens WHERE token_hash = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(hash.to_hex()).fetch_optional(&self.pool).await?;
        row.as_ref().map(rows::join_token).transpose()
    }

    pub(super) async fn revoke_join_token(&self, id: Uuid, at: Millis) -> anyhow::Result<bool> {
        let found = sqlx::query("UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
            .bind(at)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(found.rows_affected() == 1)
    }

    pub(super) async fn insert_audit(&self, events: &[AuditEvent]) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let at: Vec<i64> = events.iter().map(|e| e.at).collect();
        let actor: Vec<&str> = events.iter().map(|e| e.actor.as_str()).collect();
        let client: Vec<Option<&str>> = events.iter().map(|e| e.client.as_deref()).collect();
        let action: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
        let target: Vec<Option<&str>> = events.iter().map(|e| e.target.as_deref()).collect();
        let outcome: Vec<&str> = events.iter().map(|e| e.outcome.as_str()).collect();
        sqlx::query(
            "INSERT INTO audit_events (at, actor, client, action, target, outcome) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])",
        )
        .bind(&at)
        .bind(&actor)
        .bind(&client)
        .bind(&action)
        .bind(&target)
        .bind(&outcome)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn audit_events(&self, page: AuditQuery<'_>) -> anyhow::Result<Vec<RecordedAudit>> {
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT id, at, actor, client, action, target, outcome FROM audit_events WHERE id < ",
        );
        query.push_bind(page.before.unwrap_or(i64::MAX));
        if let Some(actor) = page.actor {
            query.push(" AND actor = ").push_bind(actor);
        }
        if let Some(action) = page.action {
            query.push(" AND action = ").push_bind(action);
        }
        query.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(page.limit));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(rows::audit_event).collect()
    }

    pub(super) async fn insert_fleet_event(&self, event: &FleetEvent) -> anyhow::Result<i64> {
        let id = sqlx::query_scalar(
            "INSERT INTO fleet_events (at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, \
             resolution) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(event.at)
        .bind(&event.kind)
        .bind(&event.message)
        .bind(i64::try_from(event.nodes_affected).unwrap_or(i64::MAX))
        .bind(i64::try_from(event.nodes_live).unwrap_or(i64::MAX))
        .bind(event.resolved_at)
        .bind(&event.resolved_by)
        .bind(&event.resolution)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    pub(super) async fn resolve_fleet_event(
        &self,
        id: i64,
        at: Millis,
        by: Option<&str>,
        resolution: &str,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "UPDATE fleet_events SET resolved_at = $1, resolved_by = $2, resolution = $3 \
             WHERE id = $4 AND resolved_at IS NULL",
        )
        .bind(at)
        .bind(by)
        .bind(resolution)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn grow_fleet_event(
        &self,
        id: i64,
        nodes_affected: u64,
        nodes_live: u64,
        message: &str,
    ) -> anyhow::Result<bool> {
        let done = sqlx::query(
            "UPDATE fleet_events SET nodes_affected = $1, nodes_live = $2, message = $3 \
             WHERE id = $4 AND resolved_at IS NULL",
        )
        .bind(i64::try_from(nodes_affected).unwrap_or(i64::MAX))
        .bind(i64::try_from(nodes_live).unwrap_or(i64::MAX))
        .bind(message)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn fleet_events(&self, limit: u32) -> anyhow::Result<Vec<FleetEvent>> {
        let rows = sqlx::query(
            "SELECT id, at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, resolution \
             FROM fleet_events ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(rows::fleet_event).collect()
    }
}

/// One join token by id, in the caller's transaction.
pub(super) async fn join_token_by_id(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<Option<JoinToken>> {
    let sql = format!("SELECT {JOIN_COLUMNS} FROM join_tokens WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_optional(&mut *conn).await?;
    row.as_ref().map(rows::join_token).transpose()
}
