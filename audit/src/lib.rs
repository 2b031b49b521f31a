//! The audit side of Gatehouse.
//!
//! The gateway hands every finished [`AuditRecord`] to an [`AuditQueue`]; a writer task drains
//! the queue in batches into an [`AuditSink`]. The hot path never waits on a sink.

pub mod azure_monitor;
pub mod chain;
mod journal;
mod jsonl;
mod memory;
mod queue;
pub mod rows;
pub mod sql;

pub use chain::write_atomic;
use futures::future::BoxFuture;
pub use gatehouse_schema::AuditRecord;
pub use journal::journal_file_text;
pub use jsonl::JsonLinesSink;
pub use memory::MemorySink;
pub use queue::{
    Admission, AuditQueue, DEFAULT_CAPACITY, DEFAULT_JOURNAL_MAX_BYTES, DEFAULT_MAX_BYTES,
    DEFAULT_PUBLISH_HEADS_EVERY, DEFAULT_ROOM_WAIT, DEFAULT_SINK_TIMEOUT, FlushOverrun,
    MAX_REPLAY_CHUNK_BYTES, QueueSettings, QueueStats, RecordRefused, RecordSlot, WriterHandle,
    record_bytes,
};

/// Why a sink could not store a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An I/O error of the underlying file or connection.
    #[error("audit sink I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The record could not be encoded.
    #[error("audit record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    /// The destination asked not to be called again for a while (a 429's `Retry-After`, say):
    /// the queue does not try the sink again before `retry_after` has passed.
    #[error("audit sink busy, retry in {} ms: {reason}", retry_after.as_millis())]
    Busy {
        /// What the destination said.
        reason: String,
        /// How long it asked to be left alone.
        retry_after: std::time::Duration,
    },
}

impl SinkError {
    /// How long the destination asked not to be called again, if it said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            SinkError::Busy { retry_after, .. } => Some(*retry_after),
            SinkError::Io(_) | SinkError::Encode(_) => None,
        }
    }
}

/// A destination for audit records.
///
/// `write_batch` either stores every record of the batch or returns an error; the queue retries a
/// failed batch (after [`SinkError::retry_after`] when the error says), so a sink that stored part
/// of a batch before it failed receives those records again.
pub trait AuditSink: Send + Sync + 'static {
    /// Stores a batch of records, in order.
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>>;

    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Rows the sink has left out of its store for good since it started, because the store
    /// refused them whole however they were cut (an Azure Monitor row too large for a call even
    /// shortened); each is also logged. 0 for the stores that take every row.
    fn rows_left_out(&self) -> u64 {
        0
    }
}
