//! How one simulator instance behaves.

use std::time::Duration;

/// Settings of one simulator instance.
///
/// Build it with struct update syntax so that new fields do not break callers:
/// `SimulatorConfig { id: "sim-a".into(), ..SimulatorConfig::default() }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatorConfig {
    /// Stable name of this instance. It is sent back in the `x-gatehouse-simulator` response
    /// header and is part of every object id the instance creates, so tests can tell which
    /// backend answered.
    pub id: String,
    /// Pause before each content chunk of a streamed answer.
    pub chunk_delay: Duration,
    /// Number of content chunks in a streamed answer (default 5).
    pub stream_chunks: usize,
    /// When set, every request must carry `api-key: <key>` or `Authorization: Bearer <key>`,
    /// otherwise the simulator answers 401 with an Azure-shaped error.
    pub require_api_key: Option<String>,
    /// When set, every request must carry `Authorization: Bearer <token>` whose token starts with
    /// this prefix, and no `api-key` header, otherwise the simulator answers 401 with an
    /// Azure-shaped error. This is how an Azure OpenAI resource that accepts only Entra ID tokens
    /// behaves; tests issue tokens with the prefix from a token-endpoint double and read the exact
    /// token the backend saw from [`crate::SeenRequest`].
    pub require_bearer_prefix: Option<String>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            id: "sim".to_owned(),
            chunk_delay: Duration::ZERO,
            stream_chunks: 5,
            require_api_key: None,
            require_bearer_prefix: None,
        }
    }
}
