//! Whom a `/v1` request is counted to (SPEC §14): its API key, the signed-in user, or `anonymous` when the router
//! asks no credential. Usage is recorded, limits are held and the queue's fair share is kept per tenant.

use std::sync::Arc;

use super::auth::Principal;

/// Largest weight a key may have in the fair share of the queue.
pub const MAX_WEIGHT: u32 = 100;

/// Whom a request belongs to, and its weight in the queue's fair share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// `key:<uuid>`, `user:<name>` or `anonymous`: what usage is recorded and limits are kept under.
    pub id: Arc<str>,
    /// What a person reads: the key's or the user's name.
    pub name: Arc<str>,
    /// Share of the queue's free places against other tenants' (1–[`MAX_WEIGHT`]).
    pub weight: u32,
}

impl Tenant {
    /// Everyone, when the router asks no credential.
    pub fn anonymous() -> Tenant {
        Tenant { id: Arc::from("anonymous"), name: Arc::from("anonymous"), weight: 1 }
    }

    /// The tenant of a signed-in principal: its API key, else its user.
    pub fn of(principal: &Principal) -> Tenant {
        match principal.api_key {
            Some(id) => Tenant {
                id: Arc::from(format!("key:{id}")),
                name: Arc::from(principal.name.strip_prefix("api-key:").unwrap_or(&principal.name)),
                weight: 1,
            },
            None => Tenant {
                id: Arc::from(format!("user:{}", principal.name)),
                name: Arc::from(principal.name.as_str()),
                weight: 1,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::model::auth::{Role, Scope};

    #[test]
    fn a_key_is_counted_by_its_id_and_a_user_by_name() {
        let id = Uuid::new_v4();
        let key = Principal {
            name: "api-key:batch".into(),
            role: Role::Viewer,
            scope: Scope::Inference,
            session: None,
            api_key: Some(id),
        };
        let tenant = Tenant::of(&key);
        assert_eq!((&*tenant.id, &*tenant.name), (format!("key:{id}").as_str(), "batch"));
        let user = Principal { name: "alice".into(), api_key: None, ..key };
        assert_eq!(&*Tenant::of(&user).id, "user:alice");
        assert_eq!(&*Tenant::anonymous().id, "anonymous");
    }
}

/// Largest value of a limit.
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// What a key or a user may use (SPEC §14); each limit is optional. Per-minute limits turn with the UTC minute,
/// `tokens_per_day` at UTC midnight, `tokens_per_month` on the first of the month (UTC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The limits with their names, for checks and messages.
    pub fn named(&self) -> [(&'static str, Option<u64>); 4] {
        [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("tokens_per_day", self.tokens_per_day),
            ("tokens_per_month", self.tokens_per_month),
        ]
    }

    /// The limits as stored: JSON, `None` for none.
    pub fn encode(&self) -> Option<String> {
        (!self.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    /// What [`Limits::encode`] stored; an unreadable value reads as no limits.
    pub fn decode(text: Option<&str>) -> Limits {
        text.and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default()
    }
}
