//! [`AccountStore`] on PostgreSQL: users, sessions and API keys, with the statements of `store/sql.rs`. Ending a
//! session, revoking a key or deleting a user notifies `llm_router_credentials` with what was revoked, in the same
//! transaction, so that every router forgets it at once.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::model::tenant::Limits;

use super::PgStore;
use crate::clock::Millis;
use crate::model::auth::{Principal, Revoked, TokenHash};
use crate::store::sql::postgres as sql;
use crate::store::{AccountStore, ApiKeyRow, StoreError, StoreResult, UserRow};

/// The channel a credential's end is announced on.
pub(super) const CREDENTIALS_CHANNEL: &str = "llm_router_credentials";

/// Announces `revoked` to every router, with the transaction that revokes it.
async fn notify_credentials(conn: &mut PgConnection, revoked: &Revoked) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CREDENTIALS_CHANNEL)
        .bind(revoked.encode())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl AccountStore for PgStore {
    fn count_users(&self) -> StoreResult<'_, i64> {
        Box::pin(self.gated(async move { sql::count_users(&mut *self.pool.acquire().await?).await }))
    }

    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool> {
        Box::pin(self.gated(async move { sql::insert_user(&mut *self.pool.acquire().await?, user).await }))
    }

    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>> {
        Box::pin(self.gated(async move { sql::user(&mut *self.pool.acquire().await?, username).await }))
    }

    fn users(&self) -> StoreResult<'_, Vec<UserRow>> {
        Box::pin(self.gated(async move { sql::users(&mut *self.pool.acquire().await?).await }))
    }

    /// The administrators are locked first, so two routers deleting the last two at once cannot both succeed.
    fn delete_user<'a>(&'a self, username: &'a str) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT username FROM users WHERE role = 'admin' ORDER BY username FOR UPDATE")
                .execute(&mut *tx)
                .await?;
            sql::delete_user(&mut tx, username).await?;
            notify_credentials(&mut tx, &Revoked::User(username.to_owned())).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn insert_session<'a>(
        &'a self,
        hash: TokenHash,
        username: &'a str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::insert_session(&mut tx, hash, username, now, expires_at).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn delete_session(&self, hash: TokenHash) -> StoreResult<'_, ()> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            sql::delete_session(&mut tx, hash).await?;
            notify_credentials(&mut tx, &Revoked::Session(hash)).await?;
            tx.commit().await?;
            Ok(())
        }))
    }

    fn principal(&self, hash: TokenHash, now: Millis) -> StoreResult<'_, Option<Principal>> {
        Box::pin(self.gated(async move { sql::principal(&mut *self.pool.acquire().await?, hash, now).await }))
    }

    fn insert_api_key<'a>(&'a self, key: &'a ApiKeyRow, hash: TokenHash) -> StoreResult<'a, ()> {
        Box::pin(self.gated(async move { sql::insert_api_key(&mut *self.pool.acquire().await?, key, hash).await }))
    }

    fn api_keys(&self) -> StoreResult<'_, Vec<ApiKeyRow>> {
        Box::pin(self.gated(async move { sql::api_keys(&mut *self.pool.acquire().await?).await }))
    }

    fn delete_api_key(&self, id: Uuid) -> StoreResult<'_, bool> {
        Box::pin(self.gated(async move {
            let mut tx = self.pool.begin().await?;
            let found = sql::delete_api_key(&mut tx, id).await?;
            notify_credentials(&mut tx, &Revoked::ApiKey(id)).await?;
            tx.commit().await?;
            Ok(found)
        }))
    }

    fn set_key_policy<'a>(&'a self, id: Uuid, limits: &'a Limits, weight: u32) -> StoreResult<'a, bool> {
        Box::pin(
            self.gated(async move { sql::set_key_policy(&mut *self.pool.acquire().await?, id, limits, weight).await }),
        )
    }

    fn set_user_limits<'a>(&'a self, username: &'a str, limits: &'a Limits) -> StoreResult<'a, bool> {
        Box::pin(
            self.gated(async move { sql::set_user_limits(&mut *self.pool.acquire().await?, username, limits).await }),
        )
    }

    fn policies(&self) -> StoreResult<'_, Vec<(String, Limits, u32)>> {
        Box::pin(self.gated(async move { sql::policies(&mut *self.pool.acquire().await?).await }))
    }
}
