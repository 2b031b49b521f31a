//! Integration tests: the gateway in-process, against simulator backends that count their hits.
//!
//! One test binary (faster to link); one module per capability.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod azure_identity_double;
mod harness;

mod assistants;
mod audit_store;
mod auth;
mod azure_monitor_identity;
mod backend_credentials;
mod bad_input;
mod batches;
mod client_gone;
mod config_endpoint;
mod entra;
mod entra_double;
mod failover;
mod gateway_ids;
mod limits;
mod lists;
mod operations;
mod realtime;
mod routes;
mod sdk_compat;
mod secrets;
mod shutdown;
mod slow_clients;
mod state_dir;
mod stickiness;
mod store_outage;
mod streaming;
mod tls;
mod usage;
