//! Argon2id password hashing. Hashing is deliberately slow, so it runs on the blocking pool, never on the async
//! workers that serve heartbeats.

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// Hashes a password into a PHC string (`$argon2id$...`).
pub async fn hash(password: String) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || hash_blocking(&password)).await?
}

/// Checks a password against a stored PHC string; a malformed stored hash counts as a mismatch.
pub async fn verify(password: String, phc: String) -> anyhow::Result<bool> {
    Ok(tokio::task::spawn_blocking(move || verify_blocking(&password, &phc)).await?)
}

fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let hashed = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing a password failed: {e}"))?;
    Ok(hashed.to_string())
}

fn verify_blocking(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A strong password for the first administrator when none was configured.
pub fn generate() -> String {
    let bytes: [u8; 18] = rand::random();
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_with_argon2id_and_verifies() {
        let phc = hash("correct horse".to_owned()).await.expect("hash");
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify("correct horse".to_owned(), phc.clone()).await.expect("verify"));
        assert!(!verify("wrong horse".to_owned(), phc).await.expect("verify"));
        assert!(!verify("x".to_owned(), "not a hash".to_owned()).await.expect("verify"));
    }

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 36);
        assert_ne!(a, b);
    }
}
