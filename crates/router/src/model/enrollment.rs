//! Join tokens (SPEC §9): what an operator hands to new machines so that they join with tags, without the anonymous
//! rate limit, and, when the token says so, approved by that rule.

use uuid::Uuid;

use super::auth::TokenHash;
use crate::clock::Millis;

/// A join token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinToken {
    pub id: Uuid,
    pub name: String,
    pub hash: TokenHash,
    pub created_by: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// `None`: any number of machines may join with it until it expires.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub auto_approve: bool,
    pub tags: Vec<String>,
    pub revoked_at: Option<Millis>,
}

/// Why a join token cannot be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unusable {
    Unknown,
    Expired,
    UsedUp,
    Revoked,
}

impl JoinToken {
    /// Whether a machine may join with this token at `now`; the use itself is counted when the node is stored.
    pub fn check(&self, now: Millis) -> Result<(), Unusable> {
        if self.revoked_at.is_some() {
            Err(Unusable::Revoked)
        } else if now >= self.expires_at {
            Err(Unusable::Expired)
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            Err(Unusable::UsedUp)
        } else {
            Ok(())
        }
    }

    /// Why a use of `token` (as it reads now; `None`: it is gone) could not be counted at `at`: what made it
    /// unusable, or used up by a registration that counted the last use first.
    pub fn refusal(token: Option<&JoinToken>, at: Millis) -> Unusable {
        token.map_or(Unusable::Unknown, |token| token.check(at).err().unwrap_or(Unusable::UsedUp))
    }

    /// Who approves the nodes this token admits: `join-token:<name>`.
    pub fn actor(&self) -> String {
        format!("join-token:{}", self.name)
    }
}

/// What a registration with a valid join token carries into the store: the token's use is counted in the same
/// transaction as the node, and refused there if the token stopped being usable meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinUse {
    pub token_id: Uuid,
    pub name: String,
    pub at: Millis,
}
