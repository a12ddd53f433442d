//! [`EnrollmentStore`] on SQLite: join tokens created, listed and revoked; each use is counted in the transaction
//! that stores the node (`commit.rs`, with `sql::use_join_token`).

use uuid::Uuid;

use super::{SqliteStore, write_tx};
use crate::clock::Millis;
use crate::model::auth::TokenHash;
use crate::model::enrollment::JoinToken;
use crate::store::sql::sqlite as sql;
use crate::store::{EnrollmentStore, StoreResult};

impl EnrollmentStore for SqliteStore {
    fn insert_join_token<'a>(&'a self, token: &'a JoinToken) -> StoreResult<'a, ()> {
        Box::pin(async move { write_tx!(self, |tx| sql::insert_join_token(tx, token)) })
    }

    fn join_tokens(&self) -> StoreResult<'_, Vec<JoinToken>> {
        Box::pin(async move { sql::join_tokens(&mut *self.reader().await?).await })
    }

    fn join_token(&self, hash: TokenHash) -> StoreResult<'_, Option<JoinToken>> {
        Box::pin(async move { sql::join_token(&mut *self.reader().await?, hash).await })
    }

    fn revoke_join_token(&self, id: Uuid, at: Millis) -> StoreResult<'_, bool> {
        Box::pin(async move { write_tx!(self, |tx| sql::revoke_join_token(tx, id, at)) })
    }
}
