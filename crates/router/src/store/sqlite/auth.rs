//! Rows of `users`, `sessions` and `api_keys`.

use sqlx::Row;
use uuid::Uuid;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::auth::{Principal, Role, TokenHash};
use crate::store::{ApiKeyRow, DeleteUserError, UserRow, rows};

impl SqliteStore {
    pub(super) async fn count_users(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users").fetch_one(&self.reader).await?.try_get(0)?)
    }

    /// Inserts a user; `Ok(false)` when the name is taken.
    pub(super) async fn insert_user(&self, user: &UserRow) -> anyhow::Result<bool> {
        write_tx!(self, |tx| async {
            let result = sqlx::query(
                "INSERT INTO users (username, password_hash, role, created_at) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (username) DO NOTHING",
            )
            .bind(&user.username)
            .bind(&user.password_hash)
            .bind(user.role.as_str())
            .bind(user.created_at)
            .execute(&mut *tx)
            .await?;
            anyhow::Ok(result.rows_affected() == 1)
        })
    }

    pub(super) async fn user(&self, username: &str) -> anyhow::Result<Option<UserRow>> {
        let row = sqlx::query("SELECT username, password_hash, role, created_at FROM users WHERE username = ?")
            .bind(username)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|row| rows::user(&row)).transpose()
    }

    pub(super) async fn users(&self) -> anyhow::Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT username, password_hash, role, created_at FROM users ORDER BY username")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(rows::user).collect()
    }

    /// Deletes a user and their sessions, refusing to remove the last administrator.
    pub(super) async fn delete_user(&self, username: &str) -> Result<(), DeleteUserError> {
        let refused: Option<DeleteUserError> = write_tx!(self, |tx| async {
            let role: Option<String> = sqlx::query("SELECT role FROM users WHERE username = ?")
                .bind(username)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get(0))
                .transpose()?;
            let Some(role) = role else { return anyhow::Ok(Some(DeleteUserError::NotFound)) };
            if role == Role::Admin.as_str() {
                let admins: i64 = sqlx::query("SELECT COUNT(*) FROM users WHERE role = 'admin'")
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|row| row.try_get(0))?;
                if admins <= 1 {
                    return Ok(Some(DeleteUserError::LastAdmin));
                }
            }
            sqlx::query("DELETE FROM users WHERE username = ?").bind(username).execute(&mut *tx).await?;
            Ok(None)
        })?;
        refused.map_or(Ok(()), Err)
    }

    pub(super) async fn insert_session(
        &self,
        hash: TokenHash,
        username: &str,
        now: Millis,
        expires_at: Millis,
    ) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query("DELETE FROM sessions WHERE expires_at <= ?").bind(now).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES (?, ?, ?, ?)")
                .bind(hash.to_hex())
                .bind(username)
                .bind(now)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
            anyhow::Ok(())
        })
    }

    pub(super) async fn delete_session(&self, hash: TokenHash) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query("DELETE FROM sessions WHERE token_hash = ?").bind(hash.to_hex()).execute(&mut *tx).await?;
            anyhow::Ok(())
        })
    }

    /// The signed-in user behind a session token or API key, if it is valid now.
    pub(super) async fn principal(&self, hash: TokenHash, now: Millis) -> anyhow::Result<Option<Principal>> {
        let hex = hash.to_hex();
        let session = sqlx::query(
            "SELECT u.username, u.role FROM sessions s JOIN users u ON u.username = s.username \
             WHERE s.token_hash = ? AND s.expires_at > ?",
        )
        .bind(&hex)
        .bind(now)
        .fetch_optional(&self.reader)
        .await?;
        if let Some(row) = session {
            return Ok(Some(rows::session_principal(&row, hash)?));
        }
        let key = sqlx::query("SELECT name, role, scope, id FROM api_keys WHERE key_hash = ?")
            .bind(&hex)
            .fetch_optional(&self.reader)
            .await?;
        key.as_ref().map(rows::key_principal).transpose()
    }

    pub(super) async fn insert_api_key(&self, key: &ApiKeyRow, hash: TokenHash) -> anyhow::Result<()> {
        write_tx!(self, |tx| async {
            sqlx::query(
                "INSERT INTO api_keys (id, name, key_hash, role, scope, created_by, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(key.id.to_string())
            .bind(&key.name)
            .bind(hash.to_hex())
            .bind(key.role.as_str())
            .bind(key.scope.as_str())
            .bind(&key.created_by)
            .bind(key.created_at)
            .execute(&mut *tx)
            .await?;
            anyhow::Ok(())
        })
    }

    pub(super) async fn api_keys(&self) -> anyhow::Result<Vec<ApiKeyRow>> {
        let rows =
            sqlx::query("SELECT id, name, role, scope, created_by, created_at FROM api_keys ORDER BY created_at, id")
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(rows::api_key).collect()
    }

    /// Revokes an API key; `Ok(false)` when there was none with this id.
    pub(super) async fn delete_api_key(&self, id: Uuid) -> anyhow::Result<bool> {
        write_tx!(self, |tx| async {
            let result =
                sqlx::query("DELETE FROM api_keys WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
            anyhow::Ok(result.rows_affected() == 1)
        })
    }
}
