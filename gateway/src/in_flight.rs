//! The calls under way, each until its audit record is handed on, so that a shutdown waits for
//! their records before it flushes the audit queue.
//!
//! A call outlives its connection in two ways: a client (or the end of the shutdown drain, which
//! closes every connection left) that leaves before the answer's head leaves the call on a task
//! of its own ([`crate::client_gone`]), and one that leaves mid-answer leaves the rest of the
//! answer to a drain task ([`crate::proxy`]). Both hold the gateway, and with it the audit queue,
//! for as long as a backend takes: a shutdown that did not wait for them would flush the queue
//! without their records, and end the process with them. Each call holds an [`InFlight`] from
//! its start to the moment its record is handed on; at shutdown, once the drain is over,
//! [`CallsInFlight::stop`] tells those still running to stop waiting on their backends and
//! finish their records at once (`LastErrorReason` `gateway_shutdown`), and waits for them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

/// The reason a record gives when the shutdown cut its call short.
pub const SHUTDOWN_REASON: &str = "gateway_shutdown";

/// The calls of one gateway that have not handed on their records yet.
#[derive(Debug, Default)]
pub struct CallsInFlight {
    calls: TaskTracker,
    stopping: CancellationToken,
}

/// One call under way: held until its record is handed on (moved into whatever task finishes
/// it; a clone holds the same call).
#[derive(Debug, Clone)]
pub struct InFlight(
    #[expect(dead_code, reason = "held, never read: counts the call")] TaskTrackerToken,
);

impl CallsInFlight {
    /// Counts a call that has begun.
    pub fn enter(&self) -> InFlight {
        InFlight(self.calls.token())
    }

    /// Ready once the shutdown has stopped waiting for calls: a call's backend is waited for no
    /// more, and its record is finished as it stands.
    pub async fn stopped(&self) {
        self.stopping.cancelled().await;
    }

    /// Tells every call still running to finish its record at once, and waits at most `limit`
    /// until all have handed their records on. `Err` with how many are still running after it.
    pub async fn stop(&self, limit: Duration) -> Result<(), usize> {
        self.stopping.cancel();
        self.calls.close();
        tokio::time::timeout(limit, self.calls.wait())
            .await
            .map_err(|_| self.calls.len())
    }
}
