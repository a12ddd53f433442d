//! The llm-router server as a library: the binary only parses configuration and calls [`app::run`].

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod db;
pub mod error;
pub mod legacy;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod rate_limit;
pub mod registry;
pub mod routes;
pub mod server;
