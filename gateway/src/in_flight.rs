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
    /// The Realtime sessions among them: an upgraded connection is no longer one the server's
    /// shutdown drain waits for, so the shutdown waits for these itself
    /// ([`CallsInFlight::sessions_ended`]).
    sessions: TaskTracker,
    stopping: CancellationToken,
}

/// One call under way: held until its record is handed on (moved into whatever task finishes
/// it; a clone holds the same call).
#[derive(Debug, Clone)]
pub struct InFlight {
    #[expect(dead_code, reason = "held, never read: counts the call")]
    call: TaskTrackerToken,
    #[expect(dead_code, reason = "held, never read: counts a Realtime session")]
    session: Option<TaskTrackerToken>,
}

impl CallsInFlight {
    /// Counts a call that has begun.
    pub fn enter(&self) -> InFlight {
        InFlight {
            call: self.calls.token(),
            session: None,
        }
    }

    /// Counts a Realtime session whose client was answered 101: a call, and one of the sessions
    /// the shutdown waits for once the server's drain is over.
    pub fn enter_session(&self) -> InFlight {
        InFlight {
            call: self.calls.token(),
            session: Some(self.sessions.token()),
        }
    }

    /// Waits, until `until` at most, for the Realtime sessions still open to end by themselves
    /// (closed by their clients or members); `Err` with how many are open then. For the
    /// shutdown, once the server's drain is over: what is left of it is the sessions'. Those
    /// still open after it are closed by [`CallsInFlight::stop`].
    pub async fn sessions_ended(&self, until: tokio::time::Instant) -> Result<(), usize> {
        self.sessions.close();
        tokio::time::timeout_at(until, self.sessions.wait())
            .await
            .map_err(|_| self.sessions.len())
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
