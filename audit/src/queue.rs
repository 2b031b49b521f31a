//! The bounded queue between the gateway's hot path and a sink.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gatehouse_schema::AuditRecord;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::AuditSink;

/// Most records written in one batch.
const MAX_BATCH: usize = 512;
/// Wait before retrying a batch the sink refused.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The sending side, cloned into every request.
#[derive(Debug, Clone)]
pub struct AuditQueue {
    sender: mpsc::Sender<AuditRecord>,
    stats: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    enqueued: AtomicU64,
    written: AtomicU64,
    rejected: AtomicU64,
    write_errors: AtomicU64,
}

/// A snapshot of the queue's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Records waiting to be written.
    pub depth: u64,
    /// Records handed to the queue since start.
    pub enqueued: u64,
    /// Records the sink has stored.
    pub written: u64,
    /// Records refused because the queue was full.
    pub rejected: u64,
    /// Batches the sink failed to store (each retried).
    pub write_errors: u64,
}

/// The writer task; await [`WriterHandle::finish`] at shutdown to flush what is queued.
#[derive(Debug)]
pub struct WriterHandle {
    task: JoinHandle<()>,
}

impl WriterHandle {
    /// Waits until every record queued before all senders were dropped has been written.
    pub async fn finish(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "audit writer task failed");
        }
    }
}

impl AuditQueue {
    /// Starts a writer for `sink` behind a queue of `capacity` records.
    pub fn start(sink: Arc<dyn AuditSink>, capacity: usize) -> (AuditQueue, WriterHandle) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(Counters::default());
        let task = tokio::spawn(write_loop(sink, receiver, Arc::clone(&stats)));
        (AuditQueue { sender, stats }, WriterHandle { task })
    }

    /// Hands a record to the writer without waiting. Returns `false` (and counts it) when the
    /// queue is full or the writer is gone.
    pub fn submit(&self, record: AuditRecord) -> bool {
        match self.sender.try_send(record) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(error) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                let record = match error {
                    mpsc::error::TrySendError::Full(record)
                    | mpsc::error::TrySendError::Closed(record) => record,
                };
                tracing::error!(
                    correlation_id = %record.correlation_id,
                    "audit queue refused a record"
                );
                false
            }
        }
    }

    /// The queue's counters now.
    pub fn stats(&self) -> QueueStats {
        let enqueued = self.stats.enqueued.load(Ordering::Relaxed);
        let written = self.stats.written.load(Ordering::Relaxed);
        QueueStats {
            depth: enqueued.saturating_sub(written),
            enqueued,
            written,
            rejected: self.stats.rejected.load(Ordering::Relaxed),
            write_errors: self.stats.write_errors.load(Ordering::Relaxed),
        }
    }
}

async fn write_loop(
    sink: Arc<dyn AuditSink>,
    mut receiver: mpsc::Receiver<AuditRecord>,
    stats: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut batch, MAX_BATCH).await > 0 {
        loop {
            match sink.write_batch(&batch).await {
                Ok(()) => break,
                Err(error) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sink = sink.name(), %error, records = batch.len(), "audit batch not stored; retrying");
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
        stats
            .written
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JsonLinesSink, MemorySink};

    fn record(id: &str) -> AuditRecord {
        AuditRecord {
            time_generated: time::OffsetDateTime::UNIX_EPOCH,
            correlation_id: id.to_owned(),
            gateway_id: "test".to_owned(),
            operation_id: None,
            caller_ip_address: "127.0.0.1".to_owned(),
            peer_ip_address: "127.0.0.1".to_owned(),
            method: "POST".to_owned(),
            url: "/".to_owned(),
            client_protocol: "HTTP/1.1".to_owned(),
            response_code: 200,
            is_request_success: true,
            backend_response_code: None,
            backend_id: None,
            backend_url: None,
            request_size: 0,
            response_size: 0,
            total_time: 0,
            backend_time: 0,
            time_to_first_byte: None,
            apim_subscription_id: None,
            product_id: None,
            user_id: None,
            user_name: None,
            tenant_id: None,
            groups: vec![],
            deployment_name: None,
            model_name: None,
            api_version: None,
            is_stream_completion: false,
            usage: None,
            attempts: vec![],
            backend_request_body: None,
            request_body_truncated: false,
            backend_response_body: None,
            response_body_truncated: false,
            request_messages: None,
            response_messages: None,
            client_aborted: false,
            last_error_reason: None,
            last_error_message: None,
            chain: None,
        }
    }

    #[tokio::test]
    async fn queue_delivers_every_record_in_order() {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 4096);
        for i in 0..1000 {
            assert!(queue.submit(record(&i.to_string())));
        }
        drop(queue);
        writer.finish().await;
        let ids: Vec<_> = sink
            .records()
            .into_iter()
            .map(|r| r.correlation_id)
            .collect();
        assert_eq!(ids, (0..1000).map(|i| i.to_string()).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn jsonl_sink_appends_one_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/records.jsonl");
        let sink = JsonLinesSink::open(&path).await.unwrap();
        sink.write_batch(&[record("a"), record("b")]).await.unwrap();
        sink.write_batch(&[record("c")]).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|line| {
                serde_json::from_str::<AuditRecord>(line)
                    .unwrap()
                    .correlation_id
            })
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }
}
