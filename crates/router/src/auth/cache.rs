//! A short memory of the credentials `/v1` accepted, so that an inference request does not read the database for
//! its API key: an entry is believed for at most [`CREDENTIAL_TTL`], and revoking a key, deleting a user or signing
//! out forgets every entry at once. Unknown credentials are never remembered: each is looked up again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::auth::{Principal, TokenHash};

/// How long an accepted credential is believed without looking again (a session that expires meanwhile is taken
/// for at most this long more).
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(1);

/// Credentials remembered at most; when full, the memory starts over.
const MAX_ENTRIES: usize = 10_000;

/// Credentials accepted lately, by hash.
#[derive(Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<TokenHash, (Principal, Instant)>>,
}

impl CredentialCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<TokenHash, (Principal, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The principal behind `hash`, when it was accepted less than [`CREDENTIAL_TTL`] ago.
    pub fn get(&self, hash: TokenHash) -> Option<Principal> {
        let entries = self.entries();
        let (principal, at) = entries.get(&hash)?;
        (at.elapsed() < CREDENTIAL_TTL).then(|| principal.clone())
    }

    /// Remembers an accepted credential.
    pub fn put(&self, hash: TokenHash, principal: Principal) {
        let mut entries = self.entries();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(hash, (principal, Instant::now()));
    }

    /// Forgets everything: a credential was revoked.
    pub fn clear(&self) {
        self.entries().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::auth::{Role, Scope};

    fn principal() -> Principal {
        Principal { name: "api-key:app".into(), role: Role::Viewer, scope: Scope::Inference, session: None }
    }

    #[test]
    fn remembers_accepted_credentials_until_cleared() {
        let cache = CredentialCache::default();
        let hash = TokenHash::of("llmk_secret");
        assert!(cache.get(hash).is_none());
        cache.put(hash, principal());
        assert_eq!(cache.get(hash).map(|p| p.name), Some("api-key:app".to_owned()));
        assert!(cache.get(TokenHash::of("llmk_other")).is_none());
        cache.clear();
        assert!(cache.get(hash).is_none(), "a revocation forgets it");
    }

    #[test]
    fn stays_bounded() {
        let cache = CredentialCache::default();
        for i in 0..=MAX_ENTRIES {
            cache.put(TokenHash::of(&i.to_string()), principal());
        }
        assert!(cache.entries().len() <= MAX_ENTRIES);
    }
}
