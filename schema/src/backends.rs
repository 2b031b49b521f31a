//! The gateway's answer to `GET /_gatehouse/backends`: each pool member's state as this gateway
//! sees it. The portal reads it from every registered gateway for the backend pools page.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Path of the backend-state endpoint (admin token required).
pub const BACKENDS_PATH: &str = "/_gatehouse/backends";

/// Every member of every pool of the running snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStates {
    /// The gateway's instance name.
    pub gateway: String,
    /// The config version it runs.
    pub version: u64,
    /// One entry per pool member, in snapshot order.
    pub members: Vec<MemberState>,
}

/// One member's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberState {
    /// The pool id.
    pub pool: String,
    /// The member id.
    pub member: String,
    /// Whether it takes calls now.
    pub state: MemberAvailability,
    /// Until when it is set aside (absent when available).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub set_aside_until: Option<OffsetDateTime>,
}

/// Whether a member takes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberAvailability {
    /// It takes calls.
    Available,
    /// It answered 429 and is set aside until its retry time.
    Throttled,
    /// It answered 5xx or could not be reached and is set aside for a while.
    Failing,
}

impl MemberAvailability {
    /// The state as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberAvailability::Available => "available",
            MemberAvailability::Throttled => "throttled",
            MemberAvailability::Failing => "failing",
        }
    }
}
