//! The credentials service: users, their sessions and API keys, what a presented credential stands for, and the
//! audit records of each change. It keeps one promise in one place: a revoked key, a deleted user or an ended session
//! stops working at once, on `/v0` and `/v1`, on this router and, announced through the database, on every router
//! sharing it. Handlers extract, call one method, render.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::cache::CredentialCache;
use super::password::{self, HashError, Hasher, UNKNOWN_USER_HASH};
use super::throttle::LoginThrottle;
use super::token::{NewToken, TokenKind};
use crate::audit::{AuditLog, Outcome};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::model::auth::{Principal, Revoked, Role, Scope, TokenHash};
use crate::model::tenant::Limits;
use crate::store::{ApiKeyRow, StorageFault, Store, StoreError, UserRow};
use crate::usage::{Limiter, Policy};
use crate::validate::{self, Invalid};

/// Why the service refused or could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The input is not acceptable; the message names the field.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The credential is unknown, expired or revoked.
    #[error("The session has expired or the credential is unknown; sign in again.")]
    UnknownCredential,
    #[error("Wrong username or password.")]
    WrongPassword,
    /// Too many failed sign-ins for this username from this address.
    #[error("Too many failed sign-ins for this username from this address; try again in {retry_after_secs} s.")]
    Throttled { retry_after_secs: u64 },
    #[error("A user named `{0}` already exists.")]
    UsernameTaken(String),
    #[error("No user named `{0}`.")]
    NoSuchUser(String),
    #[error("`{0}` is the last administrator; create another admin before deleting this one.")]
    LastAdmin(String),
    #[error("No API key with id `{0}`.")]
    NoSuchKey(String),
    /// `role` was given for a key that has no access to the admin API.
    #[error("`role` is for keys of scope `admin`; an `inference` key has no access to the admin API.")]
    RoleWithoutAdminScope,
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    /// How an audited action that ended in this error is recorded.
    fn outcome(&self) -> Outcome {
        match self {
            AuthError::Throttled { .. } | AuthError::Hash(HashError::Busy) => Outcome::Throttled,
            _ => Outcome::Failure,
        }
    }
}

/// Who does an audited action, and from where.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub name: &'a str,
    pub client: IpAddr,
}

/// A session just opened: its token, shown once, and whose it is.
#[derive(Debug)]
pub struct Session {
    pub token: NewToken,
    pub user: UserRow,
    pub ttl: Duration,
}

/// A key just created: its record, and the key itself, shown once.
#[derive(Debug)]
pub struct CreatedKey {
    pub row: ApiKeyRow,
    pub key: NewToken,
}

/// The audit log's name for a sign-in.
const LOGIN: &str = "auth.login";

/// Users, sessions, API keys and the memory of accepted credentials.
pub struct Credentials {
    store: Store,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    hasher: Hasher,
    sign_ins: LoginThrottle,
    remembered: CredentialCache,
    session_ttl: Duration,
    /// Keys' and users' limits and weights, held on `/v1`.
    limiter: Arc<Limiter>,
}

impl Credentials {
    /// The service over `store`; `grace` is how long an accepted credential is still taken while the database is
    /// unreachable (`--credential-grace-secs`).
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        hasher: Hasher,
        session_ttl: Duration,
        grace: Duration,
    ) -> Self {
        Credentials {
            limiter: Arc::new(Limiter::new(clock.clone(), store.clone())),
            store,
            clock,
            metrics,
            audit,
            hasher,
            sign_ins: LoginThrottle::default(),
            remembered: CredentialCache::new(grace),
            session_ttl,
        }
    }

    /// The limits of every key and user, and what each has used (SPEC §14).
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Reads every key's and user's limits and weight from the storage into the limiter: at start, and now and then
    /// for what other routers changed.
    pub async fn load_policies(&self) -> Result<(), StoreError> {
        let policies = self.store.policies().await?;
        self.limiter
            .set_all(policies.into_iter().map(|(id, limits, weight)| (id, Policy { limits, weight })).collect());
        Ok(())
    }

    /// The pool every password hash goes through.
    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Creates the first administrator when there is no user yet; answers the password when it generated one (to be
    /// shown once), `None` when it used `password` or another router created the administrator first.
    pub async fn ensure_first_admin(
        &self,
        username: &str,
        password: Option<&str>,
    ) -> anyhow::Result<Option<FirstAdmin>> {
        if self.store.count_users().await? > 0 {
            return Ok(None);
        }
        let (password, generated) = match password {
            Some(password) if !password.is_empty() => (password.to_owned(), false),
            _ => (password::generate(), true),
        };
        if let Some(problem) = validate::password_problem(&password) {
            anyhow::bail!("the first administrator's password {problem}");
        }
        let user = UserRow {
            username: username.to_owned(),
            password_hash: self.hasher.hash(password.clone()).await?,
            role: Role::Admin,
            created_at: self.clock.now_ms(),
        };
        // False: another router sharing the database created it first (SPEC §11).
        if !self.store.insert_user(&user).await? {
            return Ok(None);
        }
        Ok(Some(FirstAdmin { username: user.username, password: generated.then_some(password) }))
    }

    /// Signs `username` in from `from`, audited. After five wrong passwords within fifteen minutes for one username
    /// from one address, that pair is refused before any lookup or hash ([`LoginThrottle`]); an unknown username
    /// costs the same time as a wrong password.
    pub async fn sign_in(&self, username: &str, password: String, from: IpAddr) -> Result<Session, AuthError> {
        validate::text("username", username, validate::Text::Line)?;
        let result = self.try_sign_in(username, password, from).await;
        let outcome = result.as_ref().map_or_else(AuthError::outcome, |_| Outcome::Success);
        if let Err(AuthError::Throttled { .. }) = &result {
            Metrics::inc(&self.metrics.logins_throttled);
        }
        // A sign-in the router could not carry out (its database, its hashing) is not the user's doing.
        if !matches!(&result, Err(AuthError::Store(_) | AuthError::Hash(HashError::Failed(_)))) {
            self.audit.record(username, Some(from), LOGIN, None, outcome);
        }
        result
    }

    async fn try_sign_in(&self, username: &str, password: String, from: IpAddr) -> Result<Session, AuthError> {
        let attempt = self
            .sign_ins
            .begin(username, from, self.clock.now_ms())
            .map_err(|throttled| AuthError::Throttled { retry_after_secs: throttled.retry_after_secs })?;
        let user = self.store.user(username).await?;
        let stored = user.as_ref().map_or_else(|| UNKNOWN_USER_HASH.to_owned(), |u| u.password_hash.clone());
        let matches = self.hasher.verify(password, stored, from).await?;
        let user = match user {
            Some(user) if matches => {
                attempt.succeeded();
                user
            }
            _ => {
                attempt.failed(self.clock.now_ms());
                return Err(AuthError::WrongPassword);
            }
        };
        let token = NewToken::generate(TokenKind::Session);
        let now = self.clock.now_ms();
        let expires = now + i64::try_from(self.session_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.store.insert_session(token.hash(), &user.username, now, expires).await?;
        Ok(Session { token, user, ttl: self.session_ttl })
    }

    /// Ends the principal's session, if its credential is one (an API key ends only when deleted).
    pub async fn sign_out(&self, principal: &Principal) -> Result<(), AuthError> {
        if let Some(session) = principal.session {
            self.store.delete_session(session).await?;
            self.revoke(&Revoked::Session(session));
        }
        Ok(())
    }

    /// What the credential whose hash this is stands for. One the database confirmed within the last second is
    /// taken from memory; while the database is unreachable, one it confirmed within the grace period is too
    /// ([`crate::auth::cache`]).
    pub async fn principal(&self, hash: TokenHash) -> Result<Principal, AuthError> {
        if let Some(principal) = self.remembered.fresh(hash) {
            return Ok(principal);
        }
        match self.store.principal(hash, self.clock.now_ms()).await {
            Ok(Some(principal)) => {
                self.remembered.put(hash, principal.clone());
                Ok(principal)
            }
            Ok(None) => {
                self.remembered.forget(hash);
                Err(AuthError::UnknownCredential)
            }
            Err(err) if err.fault() == Some(StorageFault::Unreachable) => {
                let principal = self.remembered.remembered(hash).ok_or(err)?;
                Metrics::inc(&self.metrics.credentials_remembered);
                Ok(principal)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Forgets what `revoked` ends; `None` (an announcement that could not be read) forgets everything. For
    /// revocations other routers announced.
    pub fn announced(&self, revoked: Option<Revoked>) {
        match revoked {
            Some(revoked) => self.revoke(&revoked),
            None => self.remembered.clear(),
        }
    }

    fn revoke(&self, revoked: &Revoked) {
        self.remembered.revoke(revoked);
    }

    pub async fn users(&self) -> Result<Vec<UserRow>, AuthError> {
        Ok(self.store.users().await?)
    }

    /// Creates a user, the password stored as an Argon2id hash; audited as `user.create`.
    pub async fn create_user(
        &self,
        actor: Actor<'_>,
        username: String,
        password: String,
        role: Role,
    ) -> Result<UserRow, AuthError> {
        let target = username.clone();
        let result = async {
            validate::username(&username)?;
            if let Some(problem) = validate::password_problem(&password) {
                return Err(Invalid::Field(format!("`password` {problem}.")).into());
            }
            let user = UserRow {
                username,
                password_hash: self.hasher.hash(password).await?,
                role,
                created_at: self.clock.now_ms(),
            };
            if !self.store.insert_user(&user).await? {
                return Err(AuthError::UsernameTaken(user.username));
            }
            Ok(user)
        }
        .await;
        self.audited(actor, "user.create", &target, result)
    }

    /// Deletes a user and ends their sessions; audited as `user.delete`.
    pub async fn delete_user(&self, actor: Actor<'_>, username: &str) -> Result<(), AuthError> {
        let result = match self.store.delete_user(username).await {
            Ok(()) => {
                self.revoke(&Revoked::User(username.to_owned()));
                Ok(())
            }
            Err(StoreError::NotFound) => Err(AuthError::NoSuchUser(username.to_owned())),
            Err(StoreError::LastAdmin) => Err(AuthError::LastAdmin(username.to_owned())),
            Err(err) => Err(err.into()),
        };
        self.audited(actor, "user.delete", username, result)
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>, AuthError> {
        Ok(self.store.api_keys().await?)
    }

    /// Creates an API key of `scope` (default `admin`) and `role` (default `admin`; none for an `inference` key);
    /// audited as `api_key.create`.
    pub async fn create_api_key(
        &self,
        actor: Actor<'_>,
        name: &str,
        role: Option<Role>,
        scope: Option<Scope>,
        policy: KeyPolicy,
    ) -> Result<CreatedKey, AuthError> {
        let result = async {
            let name = validate::name(name)?;
            let limits = policy.limits.flatten().unwrap_or_default();
            validate::limits(&limits)?;
            let weight = validate::weight(policy.weight)?.unwrap_or(1);
            let scope = scope.unwrap_or(Scope::Admin);
            let role = match (scope, role) {
                (Scope::Admin, role) => role.unwrap_or(Role::Admin),
                (Scope::Inference, None) => Role::Viewer,
                (Scope::Inference, Some(_)) => return Err(AuthError::RoleWithoutAdminScope),
            };
            let key = NewToken::generate(TokenKind::ApiKey);
            let row = ApiKeyRow {
                id: Uuid::new_v4(),
                name,
                role,
                scope,
                created_by: actor.name.to_owned(),
                created_at: self.clock.now_ms(),
                limits,
                weight,
            };
            self.store.insert_api_key(&row, key.hash()).await?;
            self.limiter.set(&format!("key:{}", row.id), Policy { limits, weight });
            Ok(CreatedKey { row, key })
        }
        .await;
        self.audited(actor, "api_key.create", name, result)
    }

    /// Deletes the API key `id` (as given: a malformed id is no key); it stops working at once. Audited as
    /// `api_key.delete`.
    pub async fn delete_api_key(&self, actor: Actor<'_>, id: &str) -> Result<(), AuthError> {
        let result = async {
            let missing = || AuthError::NoSuchKey(id.to_owned());
            let key_id = Uuid::parse_str(id).map_err(|_| missing())?;
            if !self.store.delete_api_key(key_id).await? {
                return Err(missing());
            }
            self.revoke(&Revoked::ApiKey(key_id));
            Ok(())
        }
        .await;
        self.audited(actor, "api_key.delete", id, result)
    }

    /// Changes an API key's limits (replaced whole when given; `Some(None)` removes them) and weight (when given);
    /// applied at once on this router, within a second on the others. Audited as `api_key.update`.
    pub async fn update_api_key(&self, actor: Actor<'_>, id: &str, policy: KeyPolicy) -> Result<ApiKeyRow, AuthError> {
        let result = async {
            let missing = || AuthError::NoSuchKey(id.to_owned());
            let key_id = Uuid::parse_str(id).map_err(|_| missing())?;
            let new_limits = policy.limits.map(Option::unwrap_or_default);
            if let Some(limits) = &new_limits {
                validate::limits(limits)?;
            }
            let new_weight = validate::weight(policy.weight)?;
            let mut row = self.store.api_keys().await?.into_iter().find(|key| key.id == key_id).ok_or_else(missing)?;
            row.limits = new_limits.unwrap_or(row.limits);
            row.weight = new_weight.unwrap_or(row.weight);
            if !self.store.set_key_policy(key_id, &row.limits, row.weight).await? {
                return Err(missing());
            }
            self.limiter.set(&format!("key:{key_id}"), Policy { limits: row.limits, weight: row.weight });
            Ok(row)
        }
        .await;
        self.audited(actor, "api_key.update", id, result)
    }

    /// Sets a user's limits (`None`: none); applied at once on this router, within a second on the others. Audited
    /// as `user.update`.
    pub async fn set_user_limits(
        &self,
        actor: Actor<'_>,
        username: &str,
        limits: Option<Limits>,
    ) -> Result<Limits, AuthError> {
        let result = async {
            let limits = limits.unwrap_or_default();
            validate::limits(&limits)?;
            if !self.store.set_user_limits(username, &limits).await? {
                return Err(AuthError::NoSuchUser(username.to_owned()));
            }
            self.limiter.set(&format!("user:{username}"), Policy { limits, weight: 1 });
            Ok(limits)
        }
        .await;
        self.audited(actor, "user.update", username, result)
    }

    /// Records `action` on `target` by `actor`, ended as `result` says, and passes the result on.
    fn audited<T>(
        &self,
        actor: Actor<'_>,
        action: &str,
        target: &str,
        result: Result<T, AuthError>,
    ) -> Result<T, AuthError> {
        let outcome = result.as_ref().map_or_else(AuthError::outcome, |_| Outcome::Success);
        self.audit.record(actor.name, Some(actor.client), action, Some(target.to_owned()), outcome);
        result
    }
}

/// A key's limits and weight as asked: `limits` absent keeps them (`Some(None)`: none), `weight` absent keeps it.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyPolicy {
    pub limits: Option<Option<Limits>>,
    pub weight: Option<u32>,
}

/// The first administrator, just created; the password when the router generated it.
#[derive(Debug)]
pub struct FirstAdmin {
    pub username: String,
    pub password: Option<String>,
}
