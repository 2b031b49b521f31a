//! The server side of the Gatehouse portal, without its web framework: the config database,
//! who may do what, the snapshot built from the database and its push to every gateway.
//!
//! The page layer (`gatehouse-portal-app`, feature `ssr`) calls [`Portal`]'s operations; each
//! one checks the caller's role itself, so no page can forget to.

pub mod db;
pub mod error;
pub mod gateway_settings;
pub mod health;
pub mod insights;
pub mod ops;
pub mod pools;
pub mod push;
pub mod rules;
pub mod secret;
pub mod snapshot;
pub mod user;
pub mod versions;

pub use db::ConfigDb;
pub use error::PortalError;
pub use ops::Portal;
pub use user::SessionUser;
