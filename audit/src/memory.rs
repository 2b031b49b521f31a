//! An in-memory sink, for tests and for embedding.

use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use gatehouse_schema::AuditRecord;

use crate::{AuditSink, SinkError};

/// Keeps every record in memory; clones share the same records.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<AuditRecord>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every record stored so far, in order.
    pub fn records(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AuditSink for MemorySink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(records);
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
