//! Types shared by every Gatehouse crate.
//!
//! Everything here is plain data, serialisable and wasm-safe: the gateway, the audit store and
//! the portal speak to each other only through these types and HTTP.

#[cfg(feature = "keys")]
pub mod admin_signature;
pub mod audit;
pub mod backends;
pub mod config;
pub mod identity;
#[cfg(feature = "keys")]
pub mod keys;
pub mod limits;
pub mod operation;
pub mod portal;
pub mod validate;

pub use audit::AuditRecord;
pub use config::ConfigSnapshot;
pub use limits::LimitRule;
pub use operation::OperationId;
