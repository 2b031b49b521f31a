//! Inference operations: the calls a model answers.

pub(crate) mod audio;
pub(crate) mod chat;
pub(crate) mod completions;
pub(crate) mod embeddings;
pub(crate) mod images;
pub(crate) mod realtime;
pub(crate) mod responses;

/// `system_fingerprint` of every simulated answer, so a captured answer says where it came from.
pub(crate) const SYSTEM_FINGERPRINT: &str = "fp_gatehouse_simulator";
