//! Authentication services: Argon2 password hashing through a bounded pool, the secrets the router hands out, the
//! sign-in throttle, and the short memory of credentials `/v1` accepted. The extractors that make handlers check a credential (`AdminUser`, `Viewer`, `NodeAuth`)
//! are HTTP and live in `routes/extract.rs`; roles and principals are domain types in `model/auth.rs`.

pub mod cache;
pub mod password;
pub mod throttle;
pub mod token;
