//! Integration tests of the router's HTTP API, its storage and its binary. One test binary for the crate.

mod admin;
mod binary;
mod connections;
mod errors;
mod heartbeat;
mod helpers;
mod legacy;
mod observability;
mod registration;
mod storage;
