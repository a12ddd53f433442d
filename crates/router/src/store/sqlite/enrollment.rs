//! Rows of `join_tokens`: created, listed, revoked, and each use counted in the transaction that stores the node.

use sqlx::SqliteConnection;
use uuid::Uuid;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::{JoinToken, JoinUse};
use crate::store::{InsertError, rows};
const COLUMNS: &str = rows::JOIN_TOKEN_COLUMNS;

impl SqliteStore {
    pub(super) async fn insert_join_token(&self, token: &JoinToken) -> anyhow::Result<()> {
        let tags = serde_json::to_string(&token.tags)?;
        write_tx!(self, |tx| async {
            sqlx::query(
                "INSERT INTO join_tokens (id, name, token_hash, created_by, created_at, expires_at, max_uses, uses, \
                 auto_approve, tags, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            .execute(&mut *tx)
            .await?;
            anyhow::Ok(())
        })
    }

    pub(super) async fn join_tokens(&self) -> anyhow::Result<Vec<JoinToken>> {
        let sql = format!("SELECT {COLUMNS} FROM join_tokens ORDER BY created_at DESC, id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&self.reader).await?;
        rows.iter().map(rows::join_token).collect()
    }

    pub(super) async fn join_token(&self, hash: TokenHash) -> anyhow::Result<Option<JoinToken>> {
        let sql = format!("SELECT {COLUMNS} FROM join_tokens WHERE token_hash = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(hash.to_hex()).fetch_optional(&self.reader).await?;
        row.as_ref().map(rows::join_token).transpose()
    }

    pub(super) async fn revoke_join_token(&self, id: Uuid, at: Millis) -> anyhow::Result<bool> {
        write_tx!(self, |tx| async {
            let found = sqlx::query("UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(at)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            anyhow::Ok(found.rows_affected() == 1)
        })
    }
}

/// Counts one use of a join token, in the caller's transaction, if it is still usable at the time of the use: of
/// two registrations racing for a token's last use, exactly one gets it.
pub(super) async fn use_join_token(conn: &mut SqliteConnection, join: &JoinUse) -> Result<(), InsertError> {
    let id = join.token_id.to_string();
    let used = sqlx::query(
        "UPDATE join_tokens SET uses = uses + 1 WHERE id = ? AND revoked_at IS NULL AND expires_at > ? \
         AND (max_uses IS NULL OR uses < max_uses)",
    )
    .bind(&id)
    .bind(join.at)
    .execute(&mut *conn)
    .await
    .map_err(anyhow::Error::from)?;
    if used.rows_affected() == 1 {
        return Ok(());
    }
    let sql = format!("SELECT {COLUMNS} FROM join_tokens WHERE id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(anyhow::Error::from)?;
    let token = row.as_ref().map(rows::join_token).transpose()?;
    Err(InsertError::JoinToken(JoinToken::refusal(token.as_ref(), join.at)))
}
