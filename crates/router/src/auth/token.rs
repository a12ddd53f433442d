//! Secrets handed out by the router: node tokens, session tokens, API keys and join tokens.
//!
//! Each secret is 32 random bytes (256 bits), hex-encoded behind a prefix that names its kind, so a leaked string is
//! recognisable in logs and secret scanners. Only the SHA-256 of a secret is stored; random secrets of this size need
//! no password hashing.

use std::fmt;

use crate::model::auth::TokenHash;

/// What a secret is for; its prefix says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Node,
    Session,
    ApiKey,
    Join,
}

impl TokenKind {
    pub fn prefix(self) -> &'static str {
        match self {
            TokenKind::Node => "llmn_",
            TokenKind::Session => "llms_",
            TokenKind::ApiKey => "llmk_",
            TokenKind::Join => "llmj_",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_pinned() {
        assert_eq!(TokenKind::Node.prefix(), "llmn_");
        assert_eq!(TokenKind::Session.prefix(), "llms_");
        assert_eq!(TokenKind::ApiKey.prefix(), "llmk_");
        assert_eq!(TokenKind::Join.prefix(), "llmj_");
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
