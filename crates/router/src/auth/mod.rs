//! Authentication: the credentials service ([`credentials::Credentials`]: users, sessions, API keys, what a presented
//! credential stands for, their revocation and audit), and what it is built from: Argon2 password hashing through a
//! bounded pool, the secrets the router hands out, the sign-in throttle, and the short memory of accepted credentials.
//! The extractors that make handlers check a credential (`AdminUser`, `Viewer`, `NodeAuth`) are HTTP and live in
//! `routes/extract.rs`; roles and principals are domain types in `model/auth.rs`.

pub mod cache;
pub mod credentials;
pub mod password;
pub mod throttle;
pub mod token;
