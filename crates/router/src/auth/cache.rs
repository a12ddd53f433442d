//! What the router remembers of the credentials it accepted (session tokens, API keys), so that a request does not
//! read the database for its credential every time, and so that a router cut off from its database keeps serving
//! the callers it knew (SPEC §11).
//!
//! - An entry is believed for [`CREDENTIAL_TTL`] after the database last confirmed it; after that the credential is
//!   looked up again before it is accepted.
//! - While the database is unreachable, an entry confirmed within the grace period (`--credential-grace-secs`) is
//!   accepted from memory; one never accepted before, or confirmed longer ago, is not.
//! - A revocation (a sign-out, a deleted user or API key) forgets what it ends at once, here and, announced through
//!   the database, on every router: a credential revoked before an outage is never accepted during it.
//! - Unknown credentials are never remembered: each is looked up again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::auth::{Principal, Revoked, TokenHash};

/// How long an accepted credential is believed without looking again (a session that expires meanwhile is taken
/// for at most this long more).
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(1);

/// Credentials remembered at most: when full, those confirmed longest ago go first.
const MAX_ENTRIES: usize = 10_000;

/// A credential the database confirmed, and when.
#[derive(Debug, Clone)]
struct Remembered {
    principal: Principal,
    confirmed: Instant,
}

/// Credentials accepted lately, by hash.
pub struct CredentialCache {
    entries: Mutex<HashMap<TokenHash, Remembered>>,
    /// How long after its last confirmation a credential is still accepted while the database is unreachable.
    grace: Duration,
}

impl CredentialCache {
    /// A cache whose entries serve for `grace` while the database is unreachable (zero: not at all).
    pub fn new(grace: Duration) -> Self {
        CredentialCache { entries: Mutex::new(HashMap::new()), grace }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, Remembered>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The principal behind `hash`, when the database confirmed it less than [`CREDENTIAL_TTL`] ago.
    pub fn fresh(&self, hash: TokenHash) -> Option<Principal> {
        self.confirmed_within(hash, CREDENTIAL_TTL)
    }

    /// The principal behind `hash`, when the database confirmed it within the grace period: for a request that
    /// arrives while the database is unreachable.
    pub fn remembered(&self, hash: TokenHash) -> Option<Principal> {
        self.confirmed_within(hash, self.grace)
    }

    fn confirmed_within(&self, hash: TokenHash, age: Duration) -> Option<Principal> {
        let entries = self.entries();
        let entry = entries.get(&hash)?;
        (entry.confirmed.elapsed() < age).then(|| entry.principal.clone())
    }

    /// Remembers a credential the database just confirmed.
    pub fn put(&self, hash: TokenHash, principal: Principal) {
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&hash) {
            make_room(&mut entries, self.grace.max(CREDENTIAL_TTL));
        }
        entries.insert(hash, Remembered { principal, confirmed: Instant::now() });
    }

    /// Forgets one credential: the database no longer knows it.
    pub fn forget(&self, hash: TokenHash) {
        self.entries().remove(&hash);
    }

    /// Forgets every credential `revoked` ends.
    pub fn revoke(&self, revoked: &Revoked) {
        self.entries().retain(|_, entry| !entry.principal.revoked_by(revoked));
    }

    /// Forgets everything (a revocation that could not be read).
    pub fn clear(&self) {
        self.entries().clear();
    }

    /// Credentials remembered now.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees room: entries past any use first, then the older half.
fn make_room(entries: &mut HashMap<TokenHash, Remembered>, useful: Duration) {
    entries.retain(|_, entry| entry.confirmed.elapsed() < useful);
    if entries.len() >= MAX_ENTRIES {
        let mut ages: Vec<Instant> = entries.values().map(|entry| entry.confirmed).collect();
        ages.sort_unstable();
        let cutoff = ages[ages.len() / 2];
        entries.retain(|_, entry| entry.confirmed > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::model::auth::{Role, Scope};

    fn key(id: Uuid) -> Principal {
        Principal {
            name: "api-key:app".into(),
            role: Role::Viewer,
            scope: Scope::Inference,
            session: None,
            api_key: Some(id),
        }
    }

    #[test]
    fn remembers_accepted_credentials_until_revoked() {
        let cache = CredentialCache::new(Duration::from_secs(600));
        let (hash, id) = (TokenHash::of("llmk_secret"), Uuid::new_v4());
        assert!(cache.fresh(hash).is_none());
        cache.put(hash, key(id));
        assert_eq!(cache.fresh(hash).map(|p| p.name), Some("api-key:app".to_owned()));
        assert!(cache.remembered(hash).is_some());
        assert!(cache.fresh(TokenHash::of("llmk_other")).is_none());
        cache.revoke(&Revoked::ApiKey(Uuid::new_v4()));
        assert!(cache.fresh(hash).is_some(), "another key's revocation leaves it");
        cache.revoke(&Revoked::ApiKey(id));
        assert!(cache.fresh(hash).is_none() && cache.remembered(hash).is_none(), "its revocation forgets it");
    }

    #[test]
    fn a_sessions_end_or_its_users_deletion_forgets_it() {
        let cache = CredentialCache::new(Duration::from_secs(600));
        let hash = TokenHash::of("llms_secret");
        let session = Principal {
            name: "alice".into(),
            role: Role::Admin,
            scope: Scope::Admin,
            session: Some(hash),
            api_key: None,
        };
        cache.put(hash, session.clone());
        cache.revoke(&Revoked::User("bob".into()));
        assert!(cache.fresh(hash).is_some());
        cache.revoke(&Revoked::User("alice".into()));
        assert!(cache.fresh(hash).is_none());
        cache.put(hash, session);
        cache.revoke(&Revoked::Session(hash));
        assert!(cache.is_empty());
    }

    #[test]
    fn fresh_for_a_second_remembered_for_the_grace_period() {
        let cache = CredentialCache::new(Duration::from_secs(600));
        let hash = TokenHash::of("llmk_secret");
        cache.put(hash, key(Uuid::new_v4()));
        cache.entries().get_mut(&hash).expect("entry").confirmed -= CREDENTIAL_TTL;
        assert!(cache.fresh(hash).is_none(), "looked up again after a second");
        assert!(cache.remembered(hash).is_some(), "but still remembered for an outage");
        cache.entries().get_mut(&hash).expect("entry").confirmed -= Duration::from_secs(600);
        assert!(cache.remembered(hash).is_none(), "not past the grace period");
        let none = CredentialCache::new(Duration::ZERO);
        none.put(hash, key(Uuid::new_v4()));
        assert!(none.remembered(hash).is_none(), "a grace of zero remembers nothing for an outage");
    }

    #[test]
    fn stays_bounded() {
        let cache = CredentialCache::new(Duration::from_secs(600));
        for i in 0..=MAX_ENTRIES {
            cache.put(TokenHash::of(&i.to_string()), key(Uuid::new_v4()));
        }
        assert!(cache.len() <= MAX_ENTRIES);
        assert!(cache.fresh(TokenHash::of(&MAX_ENTRIES.to_string())).is_some(), "the newest stays");
    }
}
