//! Who acts: roles, the principal behind a request, and the hash by which every secret is known.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            other => Err(anyhow::anyhow!("unknown role `{other}`")),
        }
    }
}

/// Where a credential may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The admin API (as far as the role allows) and `/v1`: every session, and API keys unless made otherwise.
    Admin,
    /// `/v1` only: the key to hand to applications.
    Inference,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Inference => "inference",
        }
    }
}

impl FromStr for Scope {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Scope::Admin),
            "inference" => Ok(Scope::Inference),
            other => Err(anyhow::anyhow!("unknown scope `{other}`")),
        }
    }
}

/// Who is making a request.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The username, or `api-key:<name>` for an API key.
    pub name: String,
    pub role: Role,
    pub scope: Scope,
    /// The session's token hash when the credential is a session (so logout can end it).
    pub session: Option<TokenHash>,
    /// The key's id when the credential is an API key.
    pub api_key: Option<Uuid>,
}

impl Principal {
    /// Whether `revoked` ends this principal's credential.
    pub fn revoked_by(&self, revoked: &Revoked) -> bool {
        match revoked {
            Revoked::Session(hash) => self.session == Some(*hash),
            Revoked::User(name) => self.session.is_some() && self.name == *name,
            Revoked::ApiKey(id) => self.api_key == Some(*id),
        }
    }
}

/// A credential that stopped being valid: what every router forgets of it at once (SPEC §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// A session ended (sign-out).
    Session(TokenHash),
    /// A user was deleted, and every session of theirs with them.
    User(String),
    /// An API key was deleted.
    ApiKey(Uuid),
}

impl Revoked {
    /// The text other routers are told: `session:<hash>`, `user:<name>`, `api-key:<id>`.
    pub fn encode(&self) -> String {
        match self {
            Revoked::Session(hash) => format!("session:{}", hash.to_hex()),
            Revoked::User(name) => format!("user:{name}"),
            Revoked::ApiKey(id) => format!("api-key:{id}"),
        }
    }

    /// What [`Revoked::encode`] wrote; `None` for anything else.
    pub fn decode(text: &str) -> Option<Revoked> {
        let (kind, value) = text.split_once(':')?;
        match kind {
            "session" => TokenHash::from_hex(value).map(Revoked::Session),
            "user" => Some(Revoked::User(value.to_owned())),
            "api-key" => Uuid::parse_str(value).ok().map(Revoked::ApiKey),
            _ => None,
        }
    }
}

/// SHA-256 of a secret (node token, session token, API key): what the database and the in-memory indexes hold.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(secret: &str) -> Self {
        TokenHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(TokenHash(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod revoked_tests {
    use super::*;

    #[test]
    fn a_revocation_reads_back_as_written_and_names_whom_it_ends() {
        let hash = TokenHash::of("llms_secret");
        let key = Uuid::new_v4();
        for revoked in [Revoked::Session(hash), Revoked::User("alice:x".into()), Revoked::ApiKey(key)] {
            assert_eq!(Revoked::decode(&revoked.encode()), Some(revoked));
        }
        assert_eq!(Revoked::decode(""), None);
        assert_eq!(Revoked::decode("session:zz"), None);
        let session = Principal {
            name: "alice".into(),
            role: Role::Admin,
            scope: Scope::Admin,
            session: Some(hash),
            api_key: None,
        };
        let api_key = Principal {
            name: "api-key:app".into(),
            role: Role::Admin,
            scope: Scope::Inference,
            session: None,
            api_key: Some(key),
        };
        assert!(session.revoked_by(&Revoked::Session(hash)) && session.revoked_by(&Revoked::User("alice".into())));
        assert!(!session.revoked_by(&Revoked::Session(TokenHash::of("other"))));
        assert!(!api_key.revoked_by(&Revoked::User("api-key:app".into())), "a user's deletion leaves keys alone");
        assert!(api_key.revoked_by(&Revoked::ApiKey(key)) && !session.revoked_by(&Revoked::ApiKey(key)));
    }
}
