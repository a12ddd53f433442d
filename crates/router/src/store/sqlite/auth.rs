//! [`AccountStore`] on SQLite: users, sessions and API keys, with the statements of `store/sql.rs`.

use uuid::Uuid;

use crate::model::tenant::Limits;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::auth::{Principal, TokenHash};
use crate::store::sql::sqlite as sql;
use crate::store::{AccountStore, ApiKeyRow, StoreResult, UserRow};

impl AccountStore for SqliteStore {
    fn count_users(&self) -> StoreResult<'_, i64> {
        Box::pin(async move { sql::count_users(&mut *self.reader().await?).await })
    }

    fn insert_user<'a>(&'a self, user: &'a UserRow) -> StoreResult<'a, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_user(tx, user)) })
    }

    fn user<'a>(&'a self, username: &'a str) -> StoreResult<'a, Option<UserRow>> {
        Box::pin(async move { sql::user(&mut *self.reader().await?, username).await })
    }

    fn users(&self) -> StoreResult<'_, Vec<UserRow>> {
        Box::pin(async move { sql::users(&mut *self.reader().await?).await })
    }

    /// The one writer makes the count of administrators hold until the deletion commits.
    fn delete_user<'a>(&'a self, username: &'a str) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::delete_user(tx, username)) })
    }

    fn insert_session<'a>(
        &'a self,
        hash: TokenHash,
        username: &'a str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_session(tx, hash, username, now, expires_at)) })
    }

    fn delete_session(&self, hash: TokenHash) -> StoreResult<'_, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::delete_session(tx, hash)) })
    }

    fn principal(&self, hash: TokenHash, now: Millis) -> StoreResult<'_, Option<Principal>> {
        Box::pin(async move { sql::principal(&mut *self.reader().await?, hash, now).await })
    }

    fn insert_api_key<'a>(&'a self, key: &'a ApiKeyRow, hash: TokenHash) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_api_key(tx, key, hash)) })
    }

    fn api_keys(&self) -> StoreResult<'_, Vec<ApiKeyRow>> {
        Box::pin(async move { sql::api_keys(&mut *self.reader().await?).await })
    }

    fn delete_api_key(&self, id: Uuid) -> StoreResult<'_, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::delete_api_key(tx, id)) })
    }

    fn set_key_policy<'a>(&'a self, id: Uuid, limits: &'a Limits, weight: u32) -> StoreResult<'a, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::set_key_policy(tx, id, limits, weight)) })
    }

    fn set_user_limits<'a>(&'a self, username: &'a str, limits: &'a Limits) -> StoreResult<'a, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::set_user_limits(tx, username, limits)) })
    }

    fn policies(&self) -> StoreResult<'_, Vec<(String, Limits, u32)>> {
        Box::pin(async move { sql::policies(&mut *self.reader().await?).await })
    }
}
