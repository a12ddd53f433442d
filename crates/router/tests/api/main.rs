//! Integration tests of the router's HTTP API, its storage and its binary. One test binary for the crate.

mod admin;
mod architecture;
mod audit;
mod binary;
mod connections;
mod durability;
mod errors;
mod exposition;
mod fleet;
mod health;
mod heartbeat;
mod helpers;
mod hostile_input;
mod inference;
mod join_tokens;
mod legacy;
mod listing;
mod migrate;
mod multi_router;
mod observability;
mod postgres;
mod registration;
mod registration_limits;
mod sign_in_limits;
mod storage;
mod tls;
