//! The one way the gateway connects to Redis (shared usage limits, the shared object map).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::secret::Secret;

/// A multiplexed connection to `url` that connects on first use and again whenever it breaks;
/// connecting is bounded by `timeout`, and so is every answer unless `answers_within` says
/// longer (for a caller that stops waiting itself but wants a late answer all the same). The
/// error never quotes the URL, which may hold a password.
pub(crate) fn connect_lazily(
    url: &Secret<String>,
    timeout: Duration,
    answers_within: Option<Duration>,
) -> Result<ConnectionManager, String> {
    // The parse error of the redis crate may quote the URL; this message never does.
    let client = redis::Client::open(url.expose().as_str())
        .map_err(|_| "not a valid redis:// or rediss:// URL".to_owned())?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(answers_within.unwrap_or(timeout).max(timeout)))
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("cannot set up the connection: {:?}", e.kind()))
}
