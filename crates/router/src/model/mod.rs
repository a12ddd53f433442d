//! The router's domain types, plain data: nodes, their lists, figures and events, validated inputs, roles and
//! principals, token hashes. This is the floor of the crate: it imports nothing of the router but the clock, and
//! knows neither HTTP (axum) nor SQL (sqlx), so every layer above can use it.

pub mod audit;
pub mod auth;
pub mod enrollment;
pub mod figures;
pub mod fleet;
pub mod health;
pub mod input;
pub mod node;
