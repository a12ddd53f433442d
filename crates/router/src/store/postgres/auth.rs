//! Users, sessions and API keys. Ending a session, revoking a key or deleting a user notifies
//! `llm_router_credentials`, so that every router forgets what it remembered of them at once.

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::PgStore;
use crate::clock::Millis;
use crate::model::auth::{Principal, Revoked, Role, TokenHash};
use crate::store::{ApiKeyRow, DeleteUserError, UserRow, rows};

/// The channel a credential's end is announced on.
pub(super) const CREDENTIALS_CHANNEL: &str = "llm_router_credentials";

/// Announces `revoked` to every router, with the transaction that revokes it.
async fn notify_credentials(conn: &mut PgConnection, revoked: &Revoked) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CREDENTIALS_CHANNEL)
        .bind(revoked.encode())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl PgStore {
    pub(super) async fn count_users(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users").fetch_one(&self.pool).await?.try_get(0)?)
    }

    pub(super) async fn insert_user(&self, user: &UserRow) -> anyhow::Result<bool> {
        let result = sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (username) DO NOTHING",
        )
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(user.role.as_str())
        .bind(user.created_at)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub(super) async fn user(&self, username: &str) -> anyhow::Result<Option<UserRow>> {
        let row = sqlx::query("SELECT username, password_hash, role, created_at FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| rows::user(&row)).transpose()
    }

    pub(super) async fn users(&self) -> anyhow::Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT username, password_hash, role, created_at FROM users ORDER BY username")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rows::user).collect()
    }

    /// Deletes a user and their sessions. The administrators are locked first, so two routers deleting the last
    /// two at once cannot both succeed.
    pub(super) async fn delete_user(&self, username: &str) -> Result<(), DeleteUserError> {
        let refused: anyhow::Result<Option<DeleteUserError>> = async {
            let mut tx = self.pool.begin().await?;
            let admins: Vec<String> =
                sqlx::query_scalar("SELECT username FROM users WHERE role = 'admin' ORDER BY username FOR UPDATE")
                    .fetch_all(&mut *tx)
                    .await?;
            let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(role) = role else { return Ok(Some(DeleteUserError::NotFound)) };
            if role == Role::Admin.as_str() && admins.len() <= 1 {
                return Ok(Some(DeleteUserError::LastAdmin));
            }
            sqlx::query("DELETE FROM users WHERE username = $1").bind(username).execute(&mut *tx).await?;
            notify_credentials(&mut tx, &Revoked::User(username.to_owned())).await?;
            tx.commit().await?;
            Ok(None)
        }
        .await;
        match refused? {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    pub(super) async fn insert_session(
        &self,
        hash: TokenHash,
        username: &str,
        now: Millis,
        expires_at: Millis,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE expires_at <= $1").bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(hash.to_hex())
            .bind(username)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn delete_session(&self, hash: TokenHash) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(hash.to_hex()).execute(&mut *tx).await?;
        notify_credentials(&mut tx, &Revoked::Session(hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn principal(&self, hash: TokenHash, now: Millis) -> anyhow::Result<Option<Principal>> {
        let hex = hash.to_hex();
        let session = sqlx::query(
            "SELECT u.username, u.role FROM sessions s JOIN users u ON u.username = s.username \
             WHERE s.token_hash = $1 AND s.expires_at > $2",
        )
        .bind(&hex)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = session {
            return Ok(Some(rows::session_principal(&row, hash)?));
        }
        let key = sqlx::query("SELECT name, role, scope, id FROM api_keys WHERE key_hash = $1")
            .bind(&hex)
            .fetch_optional(&self.pool)
            .await?;
        key.as_ref().map(rows::key_principal).transpose()
    }

    pub(super) async fn insert_api_key(&self, key: &ApiKeyRow, hash: TokenHash) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, name, key_hash, role, scope, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(key.id.to_string())
        .bind(&key.name)
        .bind(hash.to_hex())
        .bind(key.role.as_str())
        .bind(key.scope.as_str())
        .bind(&key.created_by)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn api_keys(&self) -> anyhow::Result<Vec<ApiKeyRow>> {
        let rows =
            sqlx::query("SELECT id, name, role, scope, created_by, created_at FROM api_keys ORDER BY created_at, id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(rows::api_key).collect()
    }

    pub(super) async fn delete_api_key(&self, id: Uuid) -> anyhow::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(id.to_string()).execute(&mut *tx).await?;
        notify_credentials(&mut tx, &Revoked::ApiKey(id)).await?;
        tx.commit().await?;
        Ok(result.rows_affected() == 1)
    }
}
