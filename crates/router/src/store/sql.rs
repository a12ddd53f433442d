//! The statements both backends run as they are, written once: parameters as `$1`, `$2`… (PostgreSQL's, which
//! SQLite reads too, numbered in the order they first appear), column types both read alike (text, 64-bit integers,
//! booleans). [`statements!`] makes one module of them per backend, [`sqlite`] and [`postgres`], each taking that
//! backend's connection; the backends run them inside their own transactions and around their own extras (a
//! notification, a lock). Statements that differ (a node's rows, upserts, what PostgreSQL announces) stay in each
//! backend's folder.

/// Defines every shared statement for one backend: `$db` its database type, `$conn` its connection.
macro_rules! statements {
    ($db:ty, $conn:ty) => {
        use sqlx::{QueryBuilder, Row};
        use uuid::Uuid;

        use crate::clock::Millis;
        use crate::model::audit::{AuditEvent, RecordedAudit};
        use crate::model::auth::{Principal, TokenHash};
        use crate::model::enrollment::{JoinToken, JoinUse, Unusable};
        use crate::model::fleet_event::FleetEvent;
        use crate::model::node::RecordedEvent;
        use crate::model::tenant::Limits;
        use crate::store::{ApiKeyRow, AuditQuery, StoreError, UserRow, rows};

        type Conn = $conn;

        /// Stores `token` as a node's one token, replacing any earlier one.
        pub async fn write_token(conn: &mut Conn, id: Uuid, token: TokenHash, now: Millis) -> Result<(), StoreError> {
            sqlx::query(
                "INSERT INTO node_tokens (node_id, token_hash, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (node_id) DO UPDATE SET token_hash = excluded.token_hash, created_at = excluded.created_at",
            )
            .bind(id.to_string())
            .bind(token.to_hex())
            .bind(now)
            .execute(conn)
            .await?;
            Ok(())
        }

        // Users.

        pub async fn count_users(conn: &mut Conn) -> Result<i64, StoreError> {
            Ok(sqlx::query("SELECT COUNT(*) FROM users").fetch_one(conn).await?.try_get(0)?)
        }

        /// Inserts a user; `false` when the name is taken.
        pub async fn insert_user(conn: &mut Conn, user: &UserRow) -> Result<bool, StoreError> {
            let done = sqlx::query(
                "INSERT INTO users (username, password_hash, role, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (username) DO NOTHING",
            )
            .bind(&user.username)
            .bind(&user.password_hash)
            .bind(user.role.as_str())
            .bind(user.created_at)
            .execute(conn)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        pub async fn user(conn: &mut Conn, username: &str) -> Result<Option<UserRow>, StoreError> {
            let row = sqlx::query("SELECT username, password_hash, role, created_at FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(conn)
                .await?;
            Ok(row.map(|row| rows::user(&row)).transpose()?)
        }

        pub async fn users(conn: &mut Conn) -> Result<Vec<UserRow>, StoreError> {
            let rows = sqlx::query("SELECT username, password_hash, role, created_at FROM users ORDER BY username")
                .fetch_all(conn)
                .await?;
            Ok(rows.iter().map(rows::user).collect::<anyhow::Result<_>>()?)
        }

        /// Deletes `username` (and, by the foreign key, their sessions) once it is known not to be the last
        /// administrator: [`StoreError::NotFound`], [`StoreError::LastAdmin`]. Run in the caller's transaction, after
        /// whatever lock the backend needs for the count to hold.
        pub async fn delete_user(conn: &mut Conn, username: &str) -> Result<(), StoreError> {
            let role: Option<String> = sqlx::query_scalar("SELECT role FROM users WHERE username = $1")
                .bind(username)
                .fetch_optional(&mut *conn)
                .await?;
            let Some(role) = role else { return Err(StoreError::NotFound) };
            if role == "admin" {
                let admins: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role = 'admin'").fetch_one(&mut *conn).await?;
                if admins <= 1 {
                    return Err(StoreError::LastAdmin);
                }
            }
            sqlx::query("DELETE FROM sessions WHERE username = $1").bind(username).execute(&mut *conn).await?;
            sqlx::query("DELETE FROM users WHERE username = $1").bind(username).execute(&mut *conn).await?;
            Ok(())
        }

        // Sessions and API keys.

        /// Stores a session, and drops the expired ones.
        pub async fn insert_session(
            conn: &mut Conn,
            hash: TokenHash,
            username: &str,
            now: Millis,
            expires_at: Millis,
        ) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM sessions WHERE expires_at <= $1").bind(now).execute(&mut *conn).await?;
            sqlx::query("INSERT INTO sessions (token_hash, username, created_at, expires_at) VALUES ($1, $2, $3, $4)")
                .bind(hash.to_hex())
                .bind(username)
                .bind(now)
                .bind(expires_at)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        pub async fn delete_session(conn: &mut Conn, hash: TokenHash) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(hash.to_hex()).execute(conn).await?;
            Ok(())
        }

        /// The signed-in user behind a session token or API key, if it is valid now.
        pub async fn principal(conn: &mut Conn, hash: TokenHash, now: Millis) -> Result<Option<Principal>, StoreError> {
            let hex = hash.to_hex();
            let session = sqlx::query(
                "SELECT u.username, u.role FROM sessions s JOIN users u ON u.username = s.username \
                 WHERE s.token_hash = $1 AND s.expires_at > $2",
            )
            .bind(&hex)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = session {
                return Ok(Some(rows::session_principal(&row, hash)?));
            }
            let key = sqlx::query("SELECT name, role, scope, id FROM api_keys WHERE key_hash = $1")
                .bind(&hex)
                .fetch_optional(&mut *conn)
                .await?;
            Ok(key.as_ref().map(rows::key_principal).transpose()?)
        }

        pub async fn insert_api_key(conn: &mut Conn, key: &ApiKeyRow, hash: TokenHash) -> Result<(), StoreError> {
            sqlx::query(
                "INSERT INTO api_keys (id, name, key_hash, role, scope, created_by, created_at, limits, weight) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(key.id.to_string())
            .bind(&key.name)
            .bind(hash.to_hex())
            .bind(key.role.as_str())
            .bind(key.scope.as_str())
            .bind(&key.created_by)
            .bind(key.created_at)
            .bind(key.limits.encode())
            .bind(i64::from(key.weight))
            .execute(conn)
            .await?;
            Ok(())
        }

        pub async fn api_keys(conn: &mut Conn) -> Result<Vec<ApiKeyRow>, StoreError> {
            let rows = sqlx::query(
                "SELECT id, name, role, scope, created_by, created_at, limits, weight FROM api_keys \
                 ORDER BY created_at, id",
            )
            .fetch_all(conn)
            .await?;
            Ok(rows.iter().map(rows::api_key).collect::<anyhow::Result<_>>()?)
        }

        /// Sets an API key's limits and weight; `false` when there is no key with this id.
        pub async fn set_key_policy(
            conn: &mut Conn,
            id: Uuid,
            limits: &Limits,
            weight: u32,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query("UPDATE api_keys SET limits = $2, weight = $3 WHERE id = $1")
                .bind(id.to_string())
                .bind(limits.encode())
                .bind(i64::from(weight))
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Sets a user's limits; `false` when there is no such user.
        pub async fn set_user_limits(conn: &mut Conn, username: &str, limits: &Limits) -> Result<bool, StoreError> {
            let done = sqlx::query("UPDATE users SET limits = $2 WHERE username = $1")
                .bind(username)
                .bind(limits.encode())
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Every key and user with limits or a weight other than 1, by tenant id (`key:<id>`, `user:<name>`).
        pub async fn policies(conn: &mut Conn) -> Result<Vec<(String, Limits, u32)>, StoreError> {
            let rows = sqlx::query(
                "SELECT 'key:' || id, limits, weight FROM api_keys WHERE limits IS NOT NULL OR weight <> 1 \
                 UNION ALL SELECT 'user:' || username, limits, 1 FROM users WHERE limits IS NOT NULL",
            )
            .fetch_all(conn)
            .await?;
            let mut policies = Vec::with_capacity(rows.len());
            for row in &rows {
                let limits: Option<String> = row.try_get(1)?;
                let weight: i64 = row.try_get(2)?;
                policies.push((
                    row.try_get(0)?,
                    Limits::decode(limits.as_deref()),
                    u32::try_from(weight).unwrap_or(1),
                ));
            }
            Ok(policies)
        }

        /// Revokes an API key; `false` when there was none with this id.
        pub async fn delete_api_key(conn: &mut Conn, id: Uuid) -> Result<bool, StoreError> {
            let done = sqlx::query("DELETE FROM api_keys WHERE id = $1").bind(id.to_string()).execute(conn).await?;
            Ok(done.rows_affected() == 1)
        }

        // Join tokens.

        pub async fn insert_join_token(conn: &mut Conn, token: &JoinToken) -> Result<(), StoreError> {
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
            .execute(conn)
            .await?;
            Ok(())
        }

        /// Every join token, newest first.
        pub async fn join_tokens(conn: &mut Conn) -> Result<Vec<JoinToken>, StoreError> {
            let sql = format!("SELECT {} FROM join_tokens ORDER BY created_at DESC, id", rows::JOIN_TOKEN_COLUMNS);
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(conn).await?;
            Ok(rows.iter().map(rows::join_token).collect::<anyhow::Result<_>>()?)
        }

        pub async fn join_token(conn: &mut Conn, hash: TokenHash) -> Result<Option<JoinToken>, StoreError> {
            let sql = format!("SELECT {} FROM join_tokens WHERE token_hash = $1", rows::JOIN_TOKEN_COLUMNS);
            let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(hash.to_hex()).fetch_optional(conn).await?;
            Ok(row.as_ref().map(rows::join_token).transpose()?)
        }

        /// Revokes a join token at `at` (the first revocation stands); `false` when there is none with this id.
        pub async fn revoke_join_token(conn: &mut Conn, id: Uuid, at: Millis) -> Result<bool, StoreError> {
            let done = sqlx::query("UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2")
                .bind(at)
                .bind(id.to_string())
                .execute(conn)
                .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Counts one use of a join token, in the caller's transaction, if it is still usable at the time of the
        /// use: of two registrations racing for a token's last use, exactly one gets it; the other gets
        /// [`StoreError::JoinToken`] with the reason.
        pub async fn use_join_token(conn: &mut Conn, join: &JoinUse) -> Result<(), StoreError> {
            let id = join.token_id.to_string();
            let used = sqlx::query(
                "UPDATE join_tokens SET uses = uses + 1 WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2 \
                 AND (max_uses IS NULL OR uses < max_uses)",
            )
            .bind(&id)
            .bind(join.at)
            .execute(&mut *conn)
            .await?;
            if used.rows_affected() == 1 {
                return Ok(());
            }
            let sql = format!("SELECT {} FROM join_tokens WHERE id = $1", rows::JOIN_TOKEN_COLUMNS);
            let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&id).fetch_optional(&mut *conn).await?;
            let token = row.as_ref().map(rows::join_token).transpose()?;
            let why: Unusable = JoinToken::refusal(token.as_ref(), join.at);
            Err(StoreError::JoinToken(why))
        }

        // The audit log.

        /// Appends events, as few statements as the bound values allow.
        pub async fn insert_audit(conn: &mut Conn, events: &[AuditEvent]) -> Result<(), StoreError> {
            // Six values each, well under SQLite's limit of 32,766 (and PostgreSQL's of 65,535).
            for chunk in events.chunks(4_000) {
                let mut insert =
                    QueryBuilder::<$db>::new("INSERT INTO audit_events (at, actor, client, action, target, outcome) ");
                insert.push_values(chunk, |mut row, event| {
                    row.push_bind(event.at)
                        .push_bind(event.actor.as_str())
                        .push_bind(event.client.as_deref())
                        .push_bind(event.action.as_str())
                        .push_bind(event.target.as_deref())
                        .push_bind(event.outcome.as_str());
                });
                insert.build().execute(&mut *conn).await?;
            }
            Ok(())
        }

        /// A page of the audit log, newest first.
        pub async fn audit_events(conn: &mut Conn, page: AuditQuery<'_>) -> Result<Vec<RecordedAudit>, StoreError> {
            let mut query = QueryBuilder::<$db>::new(
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
            let rows = query.build().fetch_all(conn).await?;
            Ok(rows.iter().map(rows::audit_event).collect::<anyhow::Result<_>>()?)
        }

        // Fleet events.

        /// Records a fleet event; returns its id.
        pub async fn insert_fleet_event(conn: &mut Conn, event: &FleetEvent) -> Result<i64, StoreError> {
            Ok(sqlx::query_scalar(
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
            .fetch_one(conn)
            .await?)
        }

        /// Marks a fleet event resolved; `false` when there is no such event or it was resolved already.
        pub async fn resolve_fleet_event(
            conn: &mut Conn,
            id: i64,
            at: Millis,
            by: Option<&str>,
            resolution: &str,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query(
                "UPDATE fleet_events SET resolved_at = $1, resolved_by = $2, resolution = $3 \
                 WHERE id = $4 AND resolved_at IS NULL",
            )
            .bind(at)
            .bind(by)
            .bind(resolution)
            .bind(id)
            .execute(conn)
            .await?;
            Ok(done.rows_affected() > 0)
        }

        /// Counts more nodes in a fleet event that lasts; `false` when there is none or it was resolved.
        pub async fn grow_fleet_event(
            conn: &mut Conn,
            id: i64,
            nodes_affected: u64,
            nodes_live: u64,
            message: &str,
        ) -> Result<bool, StoreError> {
            let done = sqlx::query(
                "UPDATE fleet_events SET nodes_affected = $1, nodes_live = $2, message = $3 \
                 WHERE id = $4 AND resolved_at IS NULL",
            )
            .bind(i64::try_from(nodes_affected).unwrap_or(i64::MAX))
            .bind(i64::try_from(nodes_live).unwrap_or(i64::MAX))
            .bind(message)
            .bind(id)
            .execute(conn)
            .await?;
            Ok(done.rows_affected() > 0)
        }

        /// The latest `limit` fleet events, newest first.
        pub async fn fleet_events(conn: &mut Conn, limit: u32) -> Result<Vec<FleetEvent>, StoreError> {
            let rows = sqlx::query(
                "SELECT id, at, kind, message, nodes_affected, nodes_live, resolved_at, resolved_by, resolution \
                 FROM fleet_events ORDER BY id DESC LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(conn)
            .await?;
            Ok(rows.iter().map(rows::fleet_event).collect::<anyhow::Result<_>>()?)
        }

        // Node events.

        /// A page of a node's history, newest first.
        pub async fn node_events(
            conn: &mut Conn,
            id: Uuid,
            limit: u32,
            before: Option<i64>,
        ) -> Result<Vec<RecordedEvent>, StoreError> {
            let rows = sqlx::query(
                "SELECT id, node_id, at, from_status, to_status, reason, actor FROM node_events \
                 WHERE node_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
            )
            .bind(id.to_string())
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(conn)
            .await?;
            Ok(rows.iter().map(rows::node_event).collect::<anyhow::Result<_>>()?)
        }

        /// Removes at most [`PRUNE_BATCH`](super::PRUNE_BATCH) rows of `table` (with `id` and `at` columns) from
        /// before `cutoff`; returns how many. The caller repeats it, a transaction each, until fewer come back.
        pub async fn prune_batch(conn: &mut Conn, table: &'static str, cutoff: Millis) -> Result<u64, StoreError> {
            let sql = format!("DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE at < $1 LIMIT $2)");
            let done =
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(cutoff).bind(super::PRUNE_BATCH).execute(conn).await?;
            Ok(done.rows_affected())
        }
    };
}

/// Rows removed per transaction when old events are pruned.
pub const PRUNE_BATCH: i64 = 10_000;

/// The shared statements on SQLite.
pub mod sqlite {
    statements!(sqlx::Sqlite, sqlx::SqliteConnection);
}

/// The shared statements on PostgreSQL.
pub mod postgres {
    statements!(sqlx::Postgres, sqlx::PgConnection);
}
