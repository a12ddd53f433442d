//! Secrets handed out by the router: node tokens, session tokens and API keys.
//!
//! Each secret is 32 random bytes (256 bits), hex-encoded behind a prefix that names its kind, so a leaked string is
//! recognisable in logs and secret scanners. Only the SHA-256 of a secret is stored; random secrets of this size need
//! no password hashing.

use std::fmt;

use sha2::{Digest, Sha256};

/// What a secret is for; its prefix says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Node,
    Session,
    ApiKey,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Node => "llmn_",
            TokenKind::Session => "llms_",
            TokenKind::ApiKey => "llmk_",
        }
    }
}

/// A freshly generated secret. `Debug` never prints it.
pub struct NewToken {
    plaintext: String,
    hash: TokenHash,
}

impl NewToken {
    pub fn generate(kind: TokenKind) -> Self {
        let bytes: [u8; 32] = rand::random();
        let plaintext = format!("{}{}", kind.prefix(), hex::encode(bytes));
        let hash = TokenHash::of(&plaintext);
        NewToken { plaintext, hash }
    }

    /// The secret itself: to be shown once, to its owner, and never stored.
    pub fn plaintext(&self) -> &str {
        &self.plaintext
    }

    pub fn into_plaintext(self) -> String {
        self.plaintext
    }

    pub fn hash(&self) -> TokenHash {
        self.hash
    }
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("hash", &self.hash).finish_non_exhaustive()
    }
}

/// SHA-256 of a secret: what the database and the in-memory indexes hold.
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
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_pinned() {
        assert_eq!(TokenKind::Node.prefix(), "llmn_");
        assert_eq!(TokenKind::Session.prefix(), "llms_");
        assert_eq!(TokenKind::ApiKey.prefix(), "llmk_");
        let token = NewToken::generate(TokenKind::Node);
        assert!(token.plaintext().starts_with("llmn_"));
        assert_eq!(token.plaintext().len(), 5 + 64);
    }

    #[test]
    fn tokens_are_unique_and_hash_matches() {
        let a = NewToken::generate(TokenKind::ApiKey);
        let b = NewToken::generate(TokenKind::ApiKey);
        assert_ne!(a.plaintext(), b.plaintext());
        assert_eq!(TokenHash::of(a.plaintext()), a.hash());
        assert_eq!(TokenHash::from_hex(&a.hash().to_hex()), Some(a.hash()));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let token = NewToken::generate(TokenKind::Session);
        let printed = format!("{token:?}");
        assert!(!printed.contains(&token.plaintext()[5..]));
    }
}
