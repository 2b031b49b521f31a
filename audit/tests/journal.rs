//! The audit writer against a sink that fails, recovers and stalls: no record lost, none out of
//! order, none twice, the journal replayed after a restart, and admission for fail-closed.

#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use gatehouse_audit::chain::{BreakReason, STATE_FILE, verify};
use gatehouse_audit::{
    Admission, AuditQueue, AuditRecord, AuditSink, QueueSettings, QueueStats, RecordRefused,
    SinkError, WriterHandle, record_bytes,
};

/// A sink the test switches between working, failing and stalling.
#[derive(Clone)]
struct SwitchSink(Arc<SinkState>);

struct SinkState {
    stored: Mutex<Vec<AuditRecord>>,
    failing: AtomicBool,
    /// While set, a write waits for `release` (at most 30 s), far past the queue's timeout.
    stalling: AtomicBool,
    release: tokio::sync::watch::Sender<bool>,
    /// Writes that have started.
    started: AtomicU64,
    /// Writes that have returned, successful or not.
    returned: AtomicU64,
    /// How long every write takes (a slow store), in milliseconds.
    delay_ms: AtomicU64,
}

impl SwitchSink {
    fn new() -> SwitchSink {
        SwitchSink(Arc::new(SinkState {
            stored: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
            stalling: AtomicBool::new(false),
            release: tokio::sync::watch::Sender::new(false),
            started: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
        }))
    }

    fn delay(&self, delay: Duration) {
        self.0
            .delay_ms
            .store(u64::try_from(delay.as_millis()).unwrap(), Ordering::SeqCst);
    }

    fn failing(&self, failing: bool) {
        self.0.failing.store(failing, Ordering::SeqCst);
    }

    fn stalling(&self, stalling: bool) {
        self.0.stalling.store(stalling, Ordering::SeqCst);
        if !stalling {
            self.0.release.send_replace(true);
        }
    }

    fn started(&self) -> u64 {
        self.0.started.load(Ordering::SeqCst)
    }

    fn returned(&self) -> u64 {
        self.0.returned.load(Ordering::SeqCst)
    }

    fn records(&self) -> Vec<AuditRecord> {
        self.0.stored.lock().unwrap().clone()
    }
}

impl AuditSink for SwitchSink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let state = &self.0;
            state.started.fetch_add(1, Ordering::SeqCst);
            let delay = state.delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if state.stalling.load(Ordering::SeqCst) {
                let mut released = state.release.subscribe();
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    released.wait_for(|released| *released),
                )
                .await;
            }
            let result = if state.failing.load(Ordering::SeqCst) {
                Err(SinkError::Io(std::io::Error::other("sink down (test)")))
            } else {
                state.stored.lock().unwrap().extend_from_slice(records);
                Ok(())
            };
            state.returned.fetch_add(1, Ordering::SeqCst);
            result
        })
    }

    fn name(&self) -> &'static str {
        "switch"
    }
}

fn record(i: usize) -> AuditRecord {
    let at = time::macros::datetime!(2025-03-01 10:00:00 UTC)
        + Duration::from_millis(u64::try_from(i).expect("small"));
    AuditRecord {
        time_generated: at,
        correlation_id: format!("call-{i:05}"),
        gateway_id: "gw-test".to_owned(),
        operation_id: None,
        caller_ip_address: "10.0.0.7".to_owned(),
        peer_ip_address: "10.0.0.7".to_owned(),
        method: "POST".to_owned(),
        url: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21".to_owned(),
        client_protocol: "HTTP/1.1".to_owned(),
        response_code: 200,
        is_request_success: true,
        backend_response_code: Some(200),
        backend_id: Some("east".to_owned()),
        backend_url: None,
        request_size: 120,
        response_size: 480,
        total_time: 35,
        backend_time: 30,
        time_to_first_byte: Some(12),
        time_to_first_token: Some(14),
        apim_subscription_id: Some("team-a".to_owned()),
        product_id: None,
        user_id: None,
        user_name: None,
        tenant_id: None,
        groups: vec![],
        deployment_name: Some("gpt-4o".to_owned()),
        model_name: Some("gpt-4o-2024-08-06".to_owned()),
        api_version: Some("2024-10-21".to_owned()),
        is_stream_completion: false,
        usage: None,
        attempts: vec![],
        backend_request_body: Some(format!(
            r#"{{"messages":[{{"role":"user","content":"question number {i}"}}]}}"#
        )),
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

fn ids(records: &[AuditRecord]) -> Vec<String> {
    records.iter().map(|r| r.correlation_id.clone()).collect()
}

fn expected(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| record(i).correlation_id).collect()
}

fn settings(dir: &Path) -> QueueSettings {
    QueueSettings {
        journal_dir: Some(dir.to_path_buf()),
        ..QueueSettings::default()
    }
}

async fn start(sink: &SwitchSink, settings: QueueSettings) -> (AuditQueue, WriterHandle) {
    AuditQueue::start_with(Arc::new(sink.clone()), settings)
        .await
        .unwrap()
}

/// Waits (at most 20 s) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// Waits until the writer has stored everything it was given, the journal's backlog included: a
/// shutdown leaves a backlog in the journal for the next start.
async fn settle(queue: &AuditQueue) {
    eventually("the writer to store every record", || {
        let stats = queue.stats();
        stats.depth == 0 && stats.journal_records == 0
    })
    .await;
}

/// Submits records `0..count` in chunks of 100 with `pause` after each (a steady arrival rate of
/// 100 / `pause`), asserting that the queue takes every one.
async fn submit_paced(queue: &AuditQueue, count: usize, pause: Duration) {
    for chunk in 0..count.div_ceil(100) {
        for i in chunk * 100..((chunk + 1) * 100).min(count) {
            assert!(
                queue.submit(record(i)),
                "record {i} refused: {:?}",
                queue.stats()
            );
        }
        tokio::time::sleep(pause).await;
    }
}

async fn finish(queue: AuditQueue, writer: WriterHandle) -> QueueStats {
    drop(queue);
    tokio::time::timeout(Duration::from_secs(30), writer.finish())
        .await
        .expect("the writer finishes")
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "journal"))
        .collect();
    found.sort();
    found
}

/// The first bytes of the lines in the journal's segments now: `x` for plain lines, `z` for
/// packed ones.
fn line_marks(dir: &Path) -> BTreeSet<u8> {
    segments(dir)
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .flat_map(|bytes| {
            bytes
                .split(|b| *b == b'\n')
                .filter_map(|line| line.first().copied())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_records_survive_a_sink_outage_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    sink.failing(true);
    let (queue, writer) = start(&sink, settings(dir.path())).await;

    for i in 0..2_500 {
        assert!(queue.submit(record(i)), "record {i} refused");
    }
    eventually("records in the journal", || queue.stats().journaled > 0).await;
    assert_eq!(queue.admission(), Admission::Degraded);
    assert_eq!(
        line_marks(dir.path()),
        BTreeSet::from([b'z']),
        "records wait for a sink that is down in packed lines"
    );
    for i in 2_500..4_000 {
        assert!(queue.submit(record(i)), "record {i} refused");
    }
    sink.failing(false);
    for i in 4_000..5_000 {
        assert!(queue.submit(record(i)), "record {i} refused");
    }
    settle(&queue).await;
    let stats = finish(queue, writer).await;

    let stored = sink.records();
    assert_eq!(
        ids(&stored),
        expected(0..5_000),
        "every record once, in submit order"
    );
    assert!(stats.write_errors > 0);
    assert_eq!((stats.written, stats.rejected, stats.depth), (5_000, 0, 0));
    assert_eq!((stats.journal_records, stats.journal_bytes), (0, 0));
    assert!(
        segments(dir.path()).is_empty(),
        "stored segments are deleted"
    );
    let report = verify(stored);
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains.len(), 1);
    assert_eq!(report.chains[0].records, 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_sends_records_to_the_journal_without_blocking_submit() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    sink.stalling(true);
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            capacity: 64,
            sink_timeout: Duration::from_millis(50),
            ..settings(dir.path())
        },
    )
    .await;

    // Twenty times what the queue holds: only a writer that keeps taking records while the
    // first write is stuck lets every submit succeed.
    for chunk in 0..20 {
        for i in chunk * 50..(chunk + 1) * 50 {
            assert!(queue.submit(record(i)), "record {i} refused");
        }
        eventually("the writer to take the chunk", || queue.stats().depth == 0).await;
    }
    assert_eq!(
        sink.returned(),
        0,
        "the submit loop finished before the slow sink returned once"
    );
    // The channel is empty as soon as the writer has taken the last batch, but the journal's
    // append of it runs beside the writer and counts it when done; and a backlog sends the stuck
    // write's batch to the journal before its timeout has fired. Both are waited for, then
    // counted exactly.
    eventually(
        "every record journaled and the stuck write timed out",
        || {
            let stats = queue.stats();
            stats.journaled >= 1_000 && stats.write_errors >= 1
        },
    )
    .await;
    let stats = queue.stats();
    assert_eq!(
        stats.journaled, 1_000,
        "the stuck batch and all later ones are journaled"
    );
    assert_eq!(stats.write_errors, 1, "one write timed out");
    assert!(!stats.sink_up);
    assert_eq!(queue.admission(), Admission::Degraded);

    sink.stalling(false);
    eventually("the slow write to return", || sink.returned() == 1).await;
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    let stored = sink.records();
    assert_eq!(
        ids(&stored),
        expected(0..1_000),
        "the slow batch, stored after all, is not replayed again"
    );
    assert_eq!((stats.written, stats.journal_records), (1_000, 0));
    assert!(verify(stored).is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_stuck_sink_and_the_next_start_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let stuck = SwitchSink::new();
    stuck.stalling(true);
    let quick = QueueSettings {
        sink_timeout: Duration::from_millis(50),
        ..settings(dir.path())
    };
    let (queue, writer) = start(&stuck, quick.clone()).await;
    for i in 0..100 {
        assert!(queue.submit(record(i)));
    }
    eventually("the writer to take every record", || {
        queue.stats().depth == 0
    })
    .await;
    // The sink would hold the write for 30 s; the writer gives it one more timeout.
    let stats = finish(queue, writer).await;
    assert_eq!((stats.written, stats.journal_records), (0, 100));
    assert_eq!(stuck.returned(), 0);

    let up = SwitchSink::new();
    let (queue, writer) = start(&up, quick).await;
    settle(&queue).await;
    finish(queue, writer).await;
    let stored = up.records();
    assert_eq!(ids(&stored), expected(0..100));
    assert!(verify(stored).is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replays_the_journal_before_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let down = SwitchSink::new();
    down.failing(true);
    let (queue, writer) = start(&down, settings(dir.path())).await;
    for i in 0..300 {
        assert!(queue.submit(record(i)));
    }
    let stats = finish(queue, writer).await;
    assert!(down.records().is_empty());
    assert_eq!(
        stats.journal_records, 300,
        "the writer stops once all is journaled"
    );

    let up = SwitchSink::new();
    let (queue, writer) = start(&up, settings(dir.path())).await;
    assert_eq!(queue.stats().journal_records, 300);
    for i in 300..400 {
        assert!(queue.submit(record(i)));
    }
    settle(&queue).await;
    let stats = finish(queue, writer).await;

    let stored = up.records();
    assert_eq!(
        ids(&stored),
        expected(0..400),
        "replayed first, then the new records"
    );
    assert_eq!((stats.written, stats.journal_records), (400, 0));
    let report = verify(stored);
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(
        report.chains.len(),
        1,
        "the chain continues across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_journal_line_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let down = SwitchSink::new();
    down.failing(true);
    let (queue, writer) = start(&down, settings(dir.path())).await;
    for i in 0..200 {
        assert!(queue.submit(record(i)));
    }
    finish(queue, writer).await;
    // A crash in the middle of an append: the last line loses its end. The sink was down, so
    // the lines are packed, and the torn one takes all the records it packed.
    let newest = segments(dir.path()).pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    let last_start = bytes[..bytes.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |at| at + 1);
    let last = &bytes[last_start..];
    assert_eq!(last[0], b'z', "packed while the sink was down");
    let torn: usize = std::str::from_utf8(&last[18..])
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=64).contains(&torn), "{torn}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(bytes.len() as u64 - 40)
        .unwrap();

    let up = SwitchSink::new();
    let (queue, writer) = start(&up, settings(dir.path())).await;
    assert!(queue.submit(record(200)));
    settle(&queue).await;
    let stats = finish(queue, writer).await;

    let stored = up.records();
    let mut want = expected(0..200 - torn);
    want.push(record(200).correlation_id);
    assert_eq!(ids(&stored), want);
    assert_eq!(
        stats.journal_skipped, torn as u64,
        "the torn line's records, as its head names them"
    );
    // The lost records show in the chain: the one after them names the gap.
    let broken = verify(stored)
        .first_break()
        .map(|(_, broken)| broken.clone());
    let broken = broken.expect("a gap");
    assert_eq!(broken.reason, BreakReason::Removed);
    assert_eq!(broken.sequence, 200);
    assert_eq!(broken.correlation_id, "call-00200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_admission_closes_when_the_journal_is_full_and_reopens_after_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    sink.failing(true);
    let max = 16 * 1024;
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            capacity: 1_000,
            journal_max_bytes: max,
            fail_closed: true,
            ..settings(dir.path())
        },
    )
    .await;
    assert!(queue.fail_closed());
    assert_eq!(queue.admission(), Admission::Open);

    assert!(queue.submit(record(0)));
    eventually("the first record journaled", || {
        queue.stats().journaled == 1
    })
    .await;
    assert_eq!(queue.admission(), Admission::Degraded);
    assert!(!queue.refuses_calls(), "degraded, but every record is kept");

    let mut submitted = 1;
    while queue.admission() != Admission::Closed {
        assert!(submitted < 500, "the journal never filled up");
        assert!(queue.submit(record(submitted)));
        submitted += 1;
        eventually("the writer to place the record", || {
            queue.stats().depth == 0 || queue.admission() == Admission::Closed
        })
        .await;
    }
    assert!(queue.refuses_calls());
    let stats = queue.stats();
    assert!(
        stats.journal_bytes <= max && stats.journal_bytes > max / 2,
        "{stats:?}"
    );

    sink.failing(false);
    eventually("admission to open again", || {
        queue.admission() == Admission::Open
    })
    .await;
    assert!(!queue.refuses_calls());
    let stats = finish(queue, writer).await;
    let stored = sink.records();
    assert_eq!(
        ids(&stored),
        expected(0..submitted),
        "nothing lost while closed"
    );
    assert_eq!(stats.rejected, 0);
    assert!(verify(stored).is_intact());
}

/// A sink slower than the calls (here: stalled, not failing) fills the journal, and the writer
/// holds records the journal refused; calls that come then wait for room, and every record comes
/// through once the sink catches up. Before, the writer counted itself stuck while it held them:
/// such calls got no room at once and went on without their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_in_front_of_a_working_sink_makes_calls_wait_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    sink.stalling(true);
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            capacity: 4,
            journal_max_bytes: 16 * 1024,
            sink_timeout: Duration::from_secs(60),
            room_wait: Duration::from_secs(60),
            ..settings(dir.path())
        },
    )
    .await;
    queue.reserve().await.unwrap().submit(record(0));
    eventually("the first write to start", || sink.started() == 1).await;
    // Calls arrive one every 5 ms for a second while the sink stalls: the journal fills within
    // the first few, and the later ones find the writer holding what it refused.
    let mut calls = Vec::new();
    for i in 1..200 {
        let queue = queue.clone();
        calls.push(tokio::spawn(async move {
            match queue.reserve().await {
                Ok(slot) => {
                    slot.submit(record(i));
                    Ok(())
                }
                Err(refused) => Err(format!("call {i} got no room: {refused:?}")),
            }
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = queue.stats();
    assert!(stats.sink_up && stats.waited > 0, "{stats:?}");

    sink.stalling(false);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    let mut stored = ids(&sink.records());
    stored.sort();
    stored.dedup();
    assert_eq!(stored, expected(0..200), "every call's record");
    assert_eq!(stats.rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_journal_records_wait_in_the_queue_and_admission_closes() {
    let sink = SwitchSink::new();
    sink.failing(true);
    let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 100);
    for i in 0..10 {
        assert!(queue.submit(record(i)));
    }
    eventually("the sink failure", || !queue.stats().sink_up).await;
    assert_eq!(
        queue.admission(),
        Admission::Closed,
        "nowhere to keep records"
    );
    assert!(!queue.refuses_calls(), "not set to fail closed");
    sink.failing(false);
    let stats = finish(queue, writer).await;
    assert_eq!(ids(&sink.records()), expected(0..10));
    assert_eq!((stats.written, stats.journaled), (10, 0));
}

/// A queue of `capacity` without a journal, filled with records 1 to `capacity` behind the write
/// of record 0, which stalls: the writer takes nothing more meanwhile.
async fn full_behind_a_stalled_write(
    sink: &SwitchSink,
    capacity: usize,
    room_wait: Duration,
) -> (AuditQueue, WriterHandle) {
    sink.stalling(true);
    let settings = QueueSettings {
        capacity,
        journal_dir: None,
        sink_timeout: Duration::from_secs(60),
        room_wait,
        ..QueueSettings::default()
    };
    let (queue, writer) = start(sink, settings).await;
    queue.reserve().await.unwrap().submit(record(0));
    eventually("the first write to start", || sink.started() == 1).await;
    for i in 1..=capacity {
        queue.reserve().await.unwrap().submit(record(i));
    }
    (queue, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_room_in_a_full_queue_and_no_record_is_refused() {
    let sink = SwitchSink::new();
    let (queue, writer) = full_behind_a_stalled_write(&sink, 4, Duration::from_secs(20)).await;
    assert_eq!(queue.admission(), Admission::Closed, "the queue is full");
    // Eight more calls: each takes room for its record before it would be served.
    let calls: Vec<_> = (5..13)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let slot = queue
                    .reserve()
                    .await
                    .expect("room comes once the sink is back");
                slot.submit(record(i));
            })
        })
        .collect();
    eventually("every call to wait", || queue.stats().waited == 8).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        calls.iter().all(|call| !call.is_finished()),
        "no call goes on while the queue is full"
    );

    sink.stalling(false);
    for call in calls {
        call.await.unwrap();
    }
    let stats = finish(queue, writer).await;
    let mut stored = ids(&sink.records());
    stored.sort();
    assert_eq!(stored, expected(0..13), "every call's record, none refused");
    assert_eq!((stats.rejected, stats.waited), (0, 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waits_for_room_only_while_waiting_can_help() {
    let sink = SwitchSink::new();
    let (queue, writer) = full_behind_a_stalled_write(&sink, 2, Duration::from_millis(200)).await;
    // A slow write: waiting may help, for at most `room_wait`.
    let asked = tokio::time::Instant::now();
    assert_eq!(queue.reserve().await.unwrap_err(), RecordRefused::Full);
    assert!(asked.elapsed() >= Duration::from_millis(200));
    assert_eq!(queue.stats().waited, 1);
    // A failed write and no journal: the writer can keep the records nowhere but in the full
    // queue, and a call is not kept waiting for nothing.
    sink.failing(true);
    sink.stalling(false);
    eventually("the sink failure", || !queue.stats().sink_up).await;
    let asked = tokio::time::Instant::now();
    assert_eq!(queue.reserve().await.unwrap_err(), RecordRefused::Full);
    assert!(asked.elapsed() < Duration::from_millis(200));
    assert_eq!(queue.stats().waited, 1, "no second wait");
    sink.failing(false);
    let stats = finish(queue, writer).await;
    assert_eq!(ids(&sink.records()), expected(0..3));
    assert_eq!(stats.rejected, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_chain_state_starts_a_marked_segment_instead_of_a_fork() {
    let dir = tempfile::tempdir().unwrap();
    let first = SwitchSink::new();
    let (queue, writer) = start(&first, settings(dir.path())).await;
    for i in 0..10 {
        assert!(queue.submit(record(i)));
    }
    finish(queue, writer).await;
    std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();

    let second = SwitchSink::new();
    let (queue, writer) = start(&second, settings(dir.path())).await;
    for i in 10..20 {
        assert!(queue.submit(record(i)));
    }
    finish(queue, writer).await;

    let mut all = first.records();
    all.extend(second.records());
    let report = verify(all);
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(
        report.chains.len(),
        2,
        "two segments of one day, each from sequence 0"
    );
    for chain in &report.chains {
        assert!(
            chain.chain_id.starts_with("gw-test/2025-03-01#"),
            "{}",
            chain.chain_id
        );
        assert!(chain.segment_marker().is_some());
        assert_eq!(chain.records, 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_the_arrivals_never_makes_the_queue_refuse_records() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    // Every write takes 400 ms (far under the timeout): at most 1,280 records a second stored.
    sink.delay(Duration::from_millis(400));
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            capacity: 2_000,
            ..settings(dir.path())
        },
    )
    .await;
    // 10,000 records at 2,500 a second (well within what even an unoptimised writer journals):
    // writing them straight to the store would fill the queue within two seconds. The backlog
    // goes to the journal instead, and the store catches up.
    submit_paced(&queue, 10_000, Duration::from_millis(40)).await;
    let stats = queue.stats();
    assert_eq!(stats.rejected, 0);
    assert!(stats.journaled > 0, "the backlog went to the journal");
    assert_eq!(
        line_marks(dir.path()),
        BTreeSet::from([b'x']),
        "a backlog behind a store that works passes through in plain lines"
    );
    assert_eq!(stats.write_errors, 0, "the store never failed or timed out");
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    let mut stored = ids(&sink.records());
    stored.sort();
    let mut all = expected(0..10_000);
    all.sort();
    assert_eq!(stored, all, "every record stored exactly once");
    assert_eq!(stats.journal_records, 0);
    assert!(verify(sink.records()).is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_leaves_the_backlog_in_the_journal_and_the_next_start_stores_it() {
    let dir = tempfile::tempdir().unwrap();
    // 200 ms a write (at most 2,560 records a second) against 4,000 arrivals a second: a backlog
    // builds up in the journal, whose replay would take seconds at shutdown.
    let slow = SwitchSink::new();
    slow.delay(Duration::from_millis(200));
    let (queue, writer) = start(
        &slow,
        QueueSettings {
            capacity: 2_000,
            ..settings(dir.path())
        },
    )
    .await;
    submit_paced(&queue, 5_000, Duration::from_millis(25)).await;
    let writes_before_shutdown = slow.returned();
    let stats = finish(queue, writer).await;
    let first = slow.records();
    assert!(
        stats.journal_records > 0 && first.len() < 5_000,
        "the backlog stays in the journal: {} stored, {stats:?}",
        first.len()
    );
    assert_eq!(
        first.len() as u64 + stats.journal_records,
        5_000,
        "every record is stored or journaled: {stats:?}"
    );
    assert!(
        slow.returned() <= writes_before_shutdown + 1,
        "at shutdown the writer lets the write in flight end and starts no other ({} writes, {} before)",
        slow.returned(),
        writes_before_shutdown
    );

    let up = SwitchSink::new();
    let (queue, writer) = start(&up, settings(dir.path())).await;
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    assert_eq!((stats.journal_records, stats.journal_bytes), (0, 0));
    let mut all = first;
    all.extend(up.records());
    let mut stored = ids(&all);
    stored.sort();
    assert!(
        stored == expected(0..5_000),
        "every record exactly once across the restart ({} stored)",
        stored.len()
    );
    assert!(verify(all).is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_in_flight_does_not_make_the_queue_refuse_records() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    // Every write takes two seconds (under the timeout), while 3,000 records arrive at 2,500 a
    // second: they would overflow the channel (2,000) during the first write if nothing were
    // received while it runs. The channel's slack (0.8 s of arrivals) absorbs the pauses of a
    // test build's writer on a busy machine.
    sink.delay(Duration::from_secs(2));
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            capacity: 2_000,
            ..settings(dir.path())
        },
    )
    .await;
    submit_paced(&queue, 3_000, Duration::from_millis(40)).await;
    let stats = queue.stats();
    assert_eq!(stats.rejected, 0);
    assert!(
        stats.journaled > 0,
        "the records behind the long write went to the journal"
    );
    assert_eq!(stats.write_errors, 0, "the store never failed or timed out");
    sink.delay(Duration::ZERO);
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    let mut stored = ids(&sink.records());
    stored.sort();
    assert!(
        stored == expected(0..3_000),
        "every record stored exactly once ({} stored)",
        stored.len()
    );
    assert_eq!(stats.journal_records, 0);
    assert!(verify(sink.records()).is_intact());
}

/// Record `i` with a captured request body of `body_bytes`.
fn weighty(i: usize, body_bytes: usize) -> AuditRecord {
    AuditRecord {
        backend_request_body: Some("x".repeat(body_bytes)),
        ..record(i)
    }
}

#[test]
fn a_record_weighs_what_its_bodies_and_messages_hold() {
    let bare = AuditRecord {
        backend_request_body: None,
        ..record(1)
    };
    let light = record_bytes(&bare);
    assert!(light > 0);
    let heavy = AuditRecord {
        backend_request_body: Some("a".repeat(10_000)),
        backend_response_body: Some("b".repeat(20_000)),
        request_messages: Some("c".repeat(3_000)),
        response_messages: Some("d".repeat(4_000)),
        groups: vec!["g".repeat(500)],
        ..bare.clone()
    };
    assert_eq!(record_bytes(&heavy) - light, 37_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_room_while_the_records_held_reach_the_byte_bound() {
    let sink = SwitchSink::new();
    sink.stalling(true);
    let weight = record_bytes(&weighty(0, 100_000));
    let settings = QueueSettings {
        // Room for a thousand records by count: only the bytes bind here.
        capacity: 1_000,
        max_bytes: 3 * weight,
        journal_dir: None,
        sink_timeout: Duration::from_secs(60),
        room_wait: Duration::from_secs(20),
        ..QueueSettings::default()
    };
    let (queue, writer) = start(&sink, settings).await;
    queue.reserve().await.unwrap().submit(weighty(0, 100_000));
    eventually("the first write to start", || sink.started() == 1).await;
    // The stalled write still holds record 0: it counts until it is stored.
    for i in 1..3 {
        queue.reserve().await.unwrap().submit(weighty(i, 100_000));
    }
    assert_eq!(queue.stats().depth_bytes, 3 * weight);
    assert_eq!(queue.stats().waited, 0, "no wait under the bound");
    assert_eq!(queue.admission(), Admission::Closed, "at the byte bound");

    let calls: Vec<_> = (3..7)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move {
                let slot = queue.reserve().await.expect("room comes once a write ends");
                slot.submit(weighty(i, 100_000));
            })
        })
        .collect();
    eventually("every call to wait", || queue.stats().waited == 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        calls.iter().all(|call| !call.is_finished()),
        "no call goes on while the records held weigh the bound"
    );
    // A record handed over without room is refused at the bound, and counted.
    assert_eq!(
        queue.try_submit(weighty(99, 10)).unwrap_err(),
        RecordRefused::Full
    );
    assert_eq!(queue.stats().rejected, 1);

    sink.stalling(false);
    for call in calls {
        call.await.unwrap();
    }
    let stats = finish(queue, writer).await;
    let mut stored = ids(&sink.records());
    stored.sort();
    assert_eq!(stored, expected(0..7), "every call's record");
    assert_eq!((stats.depth, stats.depth_bytes), (0, 0));
    assert_eq!((stats.waited, stats.rejected), (4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_records_leave_memory_and_calls_do_not_wait_for_a_stalled_store() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SwitchSink::new();
    sink.stalling(true);
    let weight = record_bytes(&weighty(0, 100_000));
    let (queue, writer) = start(
        &sink,
        QueueSettings {
            max_bytes: 2 * weight,
            sink_timeout: Duration::from_millis(50),
            room_wait: Duration::from_secs(20),
            ..settings(dir.path())
        },
    )
    .await;
    queue.reserve().await.unwrap().submit(weighty(0, 100_000));
    queue.reserve().await.unwrap().submit(weighty(1, 100_000));
    // The stalled write times out, its batch goes to the journal, and memory is free again.
    eventually("the records to leave memory", || {
        let stats = queue.stats();
        stats.depth_bytes == 0 && stats.journal_records >= 1
    })
    .await;
    // Forty more calls, twenty times the bound, none of them waiting: the journal takes them.
    for i in 2..42 {
        let slot = tokio::time::timeout(Duration::from_secs(10), queue.reserve())
            .await
            .expect("room without a long wait")
            .unwrap();
        slot.submit(weighty(i, 100_000));
        if i % 2 == 1 {
            eventually("the journal to take the records", || {
                queue.stats().depth_bytes < 2 * weight
            })
            .await;
        }
    }
    sink.stalling(false);
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    assert_eq!(ids(&sink.records()), expected(0..42), "all, in order");
    assert_eq!((stats.depth_bytes, stats.waited, stats.rejected), (0, 0, 0));
}

/// A sink that fails while the test says, and notes of each batch it stores the records' ids and
/// what the batch weighs ([`record_bytes`]), without keeping the records.
#[derive(Default)]
struct WeighingSink {
    failing: AtomicBool,
    /// Per batch stored: its records' ids and its weight.
    batches: Mutex<Vec<(Vec<String>, u64)>>,
}

impl AuditSink for WeighingSink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err(SinkError::Io(std::io::Error::other("sink down (test)")));
            }
            let weight = records.iter().map(record_bytes).sum();
            self.batches.lock().unwrap().push((ids(records), weight));
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "weighing"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_heavy_records_is_replayed_in_chunks_within_the_replay_budget() {
    // 600 records of 256 KiB each wait in the journal through an outage. Read 512 at a time, a
    // replay chunk would hold 128 MiB beside the 4 MiB the byte bound lets the queue hold (with
    // bodies of a megabyte, half a gigabyte).
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(WeighingSink::default());
    sink.failing.store(true, Ordering::SeqCst);
    let settings = QueueSettings {
        max_bytes: 4 << 20,
        room_wait: Duration::from_secs(60),
        ..settings(dir.path())
    };
    let budget = settings.replay_chunk_bytes();
    assert_eq!(budget, 1 << 20, "a quarter of the byte bound");
    let (queue, writer) = AuditQueue::start_with(sink.clone(), settings)
        .await
        .unwrap();
    for i in 0..600 {
        queue.reserve().await.unwrap().submit(weighty(i, 256 << 10));
    }
    eventually("every record to be journaled", || {
        let stats = queue.stats();
        stats.depth == 0 && stats.journal_records == 600
    })
    .await;
    sink.failing.store(false, Ordering::SeqCst);
    settle(&queue).await;
    let stats = finish(queue, writer).await;
    assert_eq!((stats.written, stats.rejected), (600, 0));

    let batches = sink.batches.lock().unwrap().clone();
    for (records, weight) in &batches {
        assert!(
            *weight <= budget,
            "a replayed batch of {} records weighs {weight} bytes, over the budget of {budget}",
            records.len()
        );
    }
    let stored: Vec<String> = batches.into_iter().flat_map(|(ids, _)| ids).collect();
    assert_eq!(stored, expected(0..600), "every record once, in order");
}

/// What the gateway gives the flush at shutdown with `sink_timeout_ms` 5,000: one sink timeout
/// plus 30 s (`gateway/src/main.rs`, `FLUSH_GRACE`).
const GATEWAY_FLUSH_LIMIT: Duration = Duration::from_secs(35);

/// A store that answers every write, but only after 4.5 s (Azure answering 429 with
/// `Retry-After: 4`, a loaded PostgreSQL), just under the 5 s timeout: the 4,500 records queued
/// at shutdown would take nine such writes, 40 s, past the flush's limit. The writer sends to
/// the sink only while there is time, journals the rest, and the next start delivers them all in
/// order.
#[tokio::test(start_paused = true)]
async fn a_slow_sink_at_shutdown_leaves_the_rest_in_the_journal_within_the_flush_limit() {
    let dir = tempfile::tempdir().unwrap();
    let slow = SwitchSink::new();
    slow.delay(Duration::from_millis(4_500));
    let (queue, writer) = start(&slow, settings(dir.path())).await;
    for i in 0..4_500 {
        assert!(queue.submit(record(i)));
    }
    drop(queue);
    let started = tokio::time::Instant::now();
    let stats = writer
        .finish_within(GATEWAY_FLUSH_LIMIT)
        .await
        .expect("the flush ends within the gateway's limit");
    assert!(started.elapsed() <= GATEWAY_FLUSH_LIMIT);
    let first = slow.records();
    assert_eq!(stats.depth, 0, "nothing left in memory: {stats:?}");
    // Until 15 s into the flush (half of what 35 s leave beyond the 5 s timeout) batches go to
    // the sink: the fourth, begun at 13.5 s, ends at 18 s.
    assert_eq!(
        (first.len(), slow.started()),
        (4 * 512, 4),
        "the sink stores what it has time for, and no write starts after that: {stats:?}"
    );
    assert!(
        stats.journal_records > 0,
        "the records the sink had no time for are journaled: {stats:?}"
    );
    assert_eq!(
        first.len() as u64 + stats.journal_records,
        4_500,
        "every record is stored or journaled: {stats:?}"
    );

    let up = SwitchSink::new();
    let (queue, writer) = start(&up, settings(dir.path())).await;
    settle(&queue).await;
    finish(queue, writer).await;
    let mut all = first;
    all.extend(up.records());
    assert!(
        ids(&all) == expected(0..4_500),
        "every record once, in order, across the restart ({} stored)",
        all.len()
    );
    assert!(verify(all).is_intact());
}
