//! The llm-router server as a library: the binary only parses configuration and calls [`app::run`].
//!
//! Layers, from the floor up (imports point down only; `docs/architecture.md` has the table a test holds the code
//! to): `clock`, `revision` and `model` (plain domain types and the clocks and counters they are stamped with);
//! `store` (all SQL, one contract per area, both backends); the services (`deploy`, `registry`, `routing`, `auth`, `audit`,
//! `validate`, `metrics`, `probe`, `legacy`, `rate_limit`, `net`, `config`, `tls`); HTTP (`error`, `routes`,
//! `proxy`, `server`, `state`); and the wiring (`app`).

pub mod app;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod deploy;
pub mod error;
pub mod legacy;
pub mod metrics;
pub mod model;
pub mod net;
pub mod probe;
pub mod proxy;
pub mod rate_limit;
pub mod registry;
pub mod revision;
pub mod routes;
pub mod routing;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod usage;
pub mod validate;
