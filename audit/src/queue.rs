//! The bounded queue between the gateway's hot path and a sink, and the writer task behind it.
//!
//! # The writer
//!
//! [`AuditQueue::submit`] puts a record on a bounded channel and never waits. One writer task
//! takes records off it in batches (up to 512), links each into its hash chain
//! ([`Chainer`](crate::chain::Chainer); the chain order is the write order), saves the chain
//! heads, and then:
//!
//! - while the journal is empty, writes the batch to the sink. A write that fails, or takes
//!   longer than [`QueueSettings::sink_timeout`], sends the batch to the journal; a slow write is
//!   left running, and if it succeeds after all, its batch is taken back out of the journal;
//! - while the journal holds anything, appends the batch to the journal, behind what is there, and
//!   keeps taking records; the append runs on a blocking thread while the next batch is linked,
//!   and is settled before that batch is placed or anything else touches the journal. A replayer
//!   feeds the journal to the sink, oldest first, one chunk at a time; the first chunk after a
//!   failure is the probe, retried with exponential backoff (100 ms doubling to 5 s, or longer
//!   when the sink asks for it, as after a 429: [`SinkError::retry_after`]). Once the journal is
//!   empty, batches go straight to the sink again.
//!
//! At shutdown, a backlog in the journal stays there ([`WriterHandle::finish`]), and so do the
//! records the sink has no time left for ([`WriterHandle::finish_within`]).
//! At start, whatever an earlier process left in the journal directory is replayed before any new
//! record. The writer has at most one sink write in flight, so the sink receives records in
//! submit order. A sink write still running after ten timeouts (and at least a minute) is
//! abandoned: its records stay in the journal, or are written again.
//!
//! # Delivery
//!
//! Every record [`AuditQueue::submit`] accepts reaches the sink once, in order, with two
//! exceptions. After a crash, the records of the batch or segment being stored when it happened
//! may reach the sink twice (stored, then replayed because the journal did not yet know); an
//! abandoned write that did land is written again. Stores de-duplicate on `CorrelationId`, and on
//! a call's place in its chain once retention removed it (`sql::retired_chains`). And the
//! records in the channel and in the writer's hands (at most the queue capacity plus a batch)
//! live in memory until they are written or journaled: a crash loses them (those already linked
//! leave a gap in their chain, see [`chain`](crate::chain)). The one other loss is a shutdown
//! while both the sink and the journal's disk fail; it is logged with the count.
//!
//! Without a journal directory ([`AuditQueue::start`]), a failed batch is retried with backoff
//! while the channel fills; records submitted while it is full are refused and counted.
//!
//! # Room for every record
//!
//! A call takes room for its record before it is served ([`AuditQueue::reserve`]), and hands the
//! record over in that room when it ends ([`RecordSlot::submit`]), which never refuses. While the
//! queue is full — the writer takes records slower than calls come, even into the journal — new
//! calls wait for room, so that calls slow down to the pace at which records are kept instead of
//! outrunning it and losing records. A call waits at most [`QueueSettings::room_wait`], and not
//! at all when the writer cannot take records anywhere (the sink is down and the journal full or
//! missing, or the writer stopped): then it is served without room (its record is refused if
//! the queue is still full when it ends) or, failing closed, refused.
//!
//! The queue is full in bytes too: [`QueueSettings::max_bytes`] bounds what the records handed
//! over and not yet stored or journaled weigh ([`record_bytes`]), since captured bodies make some
//! records thousands of times heavier than others. At the bound new calls wait as for a full
//! queue; the records of calls already in progress are still taken, so the bound is soft by those.
//! A chunk replayed from the journal is read up to 512 records and up to
//! [`QueueSettings::replay_chunk_bytes`] (a quarter of the bound, at most 32 MiB), so that a
//! backlog of heavy records is not read into memory hundreds of megabytes at a time beside them.
//!
//! # Admission and fail-closed
//!
//! [`AuditQueue::admission`] says, before a call is forwarded, whether its record could be kept;
//! with [`QueueSettings::fail_closed`] the gateway refuses calls while it is
//! [`Admission::Closed`] ([`AuditQueue::refuses_calls`]), and calls that get no room.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gatehouse_schema::AuditRecord;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use crate::chain::{Chainer, STATE_FILE, write_atomic};
use crate::journal::{Journal, JournalError, JournalStatus, LineKind, Stretch};
use crate::{AuditSink, SinkError};

/// How long a call waits for room in a full queue by default.
pub const DEFAULT_ROOM_WAIT: Duration = Duration::from_secs(5);
/// Most records written to the sink in one batch.
const MAX_BATCH: usize = 512;
/// Most records taken at once when they go to the journal: every append costs a sync of the
/// journal and of the chain state, whose time a slow disk spends whatever the size, so batches
/// behind a backlog are taken larger.
const JOURNAL_BATCH: usize = 4_096;
/// Wait before the first retry after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A sink write still running after this many timeouts, and at least [`ABANDON_AFTER_AT_LEAST`],
/// is abandoned.
const ABANDON_AFTER_TIMEOUTS: u32 = 10;
/// See [`ABANDON_AFTER_TIMEOUTS`].
const ABANDON_AFTER_AT_LEAST: Duration = Duration::from_secs(60);
/// Longest wait before the next try that a sink may ask for ([`SinkError::retry_after`]); the
/// records wait in the journal meanwhile.
const MAX_ASKED_WAIT: Duration = Duration::from_secs(10 * 60);
/// Records linked between two yields of the writer task.
const LINKS_PER_YIELD: usize = 64;
/// How long the writer waits for a short batch to fill up before it places it. Every batch costs
/// a transaction in the store, and when it goes to the journal an fsync of the journal and of the
/// chain state: taken as they trickle in, a busy gateway's records made batches of a few records,
/// and those costs, hundreds of times a second, took CPU from the calls.
const BATCH_LINGER: Duration = Duration::from_millis(20);
/// How often the writer looks at the channel while a direct write is in flight.
const BACKLOG_CHECK_EVERY: Duration = Duration::from_millis(10);

/// How long a sink write may take before its batch goes to the journal, unless set.
pub const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(5);
/// The journal's size limit, unless set: 1 GiB.
pub const DEFAULT_JOURNAL_MAX_BYTES: u64 = 1 << 30;
/// The queue's capacity, unless set.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// The bytes of records the queue and its writer hold in memory, unless set: 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// The most a chunk replayed from the journal weighs, whatever [`QueueSettings::max_bytes`]:
/// 32 MiB ([`QueueSettings::replay_chunk_bytes`]).
pub const MAX_REPLAY_CHUNK_BYTES: u64 = 32 << 20;

/// How the queue and its writer behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Records the channel holds, counting the room that calls in progress took for theirs
    /// ([`AuditQueue::reserve`]): past it, new calls wait, and [`AuditQueue::submit`] refuses.
    pub capacity: usize,
    /// Bytes of the records held in memory, submitted and neither stored nor journaled yet
    /// ([`record_bytes`]): at or past it, new calls wait as they do for a full queue, and
    /// [`AuditQueue::submit`] refuses. Records of calls that already hold room are taken past
    /// it, so the bound is soft by what those calls bring. The chunk of the journal being
    /// replayed is held beside them, and weighs at most
    /// [`QueueSettings::replay_chunk_bytes`].
    pub max_bytes: u64,
    /// Where the journal and the chain state live; `None` keeps no journal (records wait in the
    /// channel while the sink is down) and no chain state (every start begins marked segments).
    pub journal_dir: Option<PathBuf>,
    /// How long a sink write may take before its batch goes to the journal.
    pub sink_timeout: Duration,
    /// The journal's size limit; past it, records wait in the channel.
    pub journal_max_bytes: u64,
    /// Whether the gateway refuses calls it could not record ([`AuditQueue::refuses_calls`]).
    pub fail_closed: bool,
    /// How long a call waits for room in a full queue before it goes on without
    /// ([`AuditQueue::reserve`]).
    pub room_wait: Duration,
    /// At most how long after a record is linked the head of its chain is published outside the
    /// store ([`PublishedHead`](crate::chain::PublishedHead), a log line).
    pub publish_heads_every: Duration,
}

impl QueueSettings {
    /// The most a chunk replayed from the journal weighs ([`record_bytes`]), on top of the
    /// records [`QueueSettings::max_bytes`] bounds: a quarter of that bound, at most
    /// [`MAX_REPLAY_CHUNK_BYTES`]. A chunk is heavier only when it is a single record (or a single
    /// packed line of an earlier process) that weighs more, so that the replay goes on.
    pub fn replay_chunk_bytes(&self) -> u64 {
        (self.max_bytes / 4).min(MAX_REPLAY_CHUNK_BYTES)
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            capacity: DEFAULT_CAPACITY,
            max_bytes: DEFAULT_MAX_BYTES,
            journal_dir: None,
            sink_timeout: DEFAULT_SINK_TIMEOUT,
            journal_max_bytes: DEFAULT_JOURNAL_MAX_BYTES,
            fail_closed: false,
            room_wait: DEFAULT_ROOM_WAIT,
            publish_heads_every: DEFAULT_PUBLISH_HEADS_EVERY,
        }
    }
}

/// [`QueueSettings::publish_heads_every`] unless set: a minute.
pub const DEFAULT_PUBLISH_HEADS_EVERY: Duration = Duration::from_secs(60);

/// Whether a record handed over now would be kept, for the gateway to decide before it forwards
/// a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The sink is storing records as they come.
    Open,
    /// Records are kept, but not in the sink yet: it is failing or slow and they go to the
    /// journal, or the journal is being replayed. Calls proceed; operators should look.
    Degraded,
    /// A record handed over now may be refused: the queue is full, or the sink is failing and the
    /// journal cannot take more (at its size limit, the disk refused, or no journal), or the
    /// writer has stopped. With `fail_closed` the gateway refuses calls.
    Closed,
}

/// Room for one call's record in the queue, taken before the call is served
/// ([`AuditQueue::reserve`]); dropping it unused gives the room back.
#[derive(Debug)]
pub struct RecordSlot {
    permit: mpsc::OwnedPermit<AuditRecord>,
    shared: Arc<Shared>,
}

impl RecordSlot {
    /// Hands the record over in the room taken for it; never refuses for want of space.
    pub fn submit(self, mut record: AuditRecord) {
        let bytes = take_in(&mut record);
        let correlation_id = record.correlation_id.clone();
        // Counted before the send: once sent, the writer may store the record and release its
        // bytes before this thread runs again, and a count added after that would stay for good.
        self.shared.taken(bytes);
        let sender = self.permit.send(record);
        if sender.is_closed() {
            // The writer task is gone (it panicked): nothing will take the record.
            self.shared.untaken(bytes);
            self.shared.refused(&correlation_id, RecordRefused::Stopped);
        }
    }
}

/// Why [`AuditQueue::try_submit`] refused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordRefused {
    /// The queue is at capacity, in records or in bytes.
    #[error("the audit queue is full")]
    Full,
    /// The writer task has stopped.
    #[error("the audit writer has stopped")]
    Stopped,
}

/// The sending side, cloned into every request.
#[derive(Debug, Clone)]
pub struct AuditQueue {
    sender: mpsc::Sender<AuditRecord>,
    shared: Arc<Shared>,
}

/// What the queue and the writer share: counters and the writer's state.
#[derive(Debug, Default)]
struct Shared {
    /// The sink's [`AuditSink::rows_left_out`], read after each successful write.
    sink_rows_left_out: AtomicU64,
    enqueued: AtomicU64,
    /// Records of `enqueued` written to the sink or the journal.
    settled: AtomicU64,
    /// Bytes of the records of `enqueued` not settled yet ([`record_bytes`]).
    held_bytes: AtomicU64,
    max_bytes: u64,
    /// Woken when `held_bytes` falls below `max_bytes`.
    bytes_freed: tokio::sync::Notify,
    written: AtomicU64,
    rejected: AtomicU64,
    write_errors: AtomicU64,
    journaled: AtomicU64,
    journal_errors: AtomicU64,
    journal_records: AtomicU64,
    journal_bytes: AtomicU64,
    journal_skipped: AtomicU64,
    sink_down: AtomicBool,
    /// The writer holds records it can place neither in the sink nor in the journal.
    blocked: AtomicBool,
    has_journal: bool,
    journal_max_bytes: u64,
    fail_closed: bool,
    /// Calls that found the queue full and waited for room.
    waited: AtomicU64,
    room_wait: Duration,
}

impl Shared {
    fn add(counter: &AtomicU64, count: usize) {
        counter.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Counts a record of `bytes` handed to the writer.
    fn taken(&self, bytes: u64) {
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.enqueued.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back the count of a record [`Shared::taken`] counted and the writer never got.
    fn untaken(&self, bytes: u64) {
        self.enqueued.fetch_sub(1, Ordering::Relaxed);
        self.release_bytes(bytes);
    }

    /// Counts records handed over earlier as out of memory: stored, journaled, or (at a shutdown
    /// that could keep them nowhere) lost; `settled` unless lost.
    fn release(&self, records: &[AuditRecord], settled: bool) {
        let bytes: u64 = records.iter().map(record_bytes).sum();
        if settled {
            Shared::add(&self.settled, records.len());
        }
        self.release_bytes(bytes);
    }

    /// Takes `bytes` off the bytes held in memory, waking calls that wait for room when that
    /// brings them under the bound.
    fn release_bytes(&self, bytes: u64) {
        // Saturating: a miscount must never wrap around to a queue that looks full for good.
        let before = self
            .held_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(bytes))
            })
            .unwrap_or_else(|held| held);
        if before >= self.max_bytes && before.saturating_sub(bytes) < self.max_bytes {
            self.bytes_freed.notify_waiters();
        }
    }

    /// Whether the records held in memory are under the byte bound.
    fn under_max_bytes(&self) -> bool {
        self.held_bytes.load(Ordering::Relaxed) < self.max_bytes
    }

    /// Waits until the records held in memory are under the byte bound.
    async fn bytes_under_max(&self) {
        loop {
            let freed = self.bytes_freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so that a release between the two still wakes it.
            freed.as_mut().enable();
            if self.under_max_bytes() {
                return;
            }
            freed.await;
        }
    }

    /// Counts and logs a record the queue could not take.
    fn refused(&self, correlation_id: &str, reason: RecordRefused) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%correlation_id, %reason, "audit queue refused a record");
    }
}

/// A snapshot of the queue's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Records submitted and held in memory: neither in the sink nor in the journal yet.
    pub depth: u64,
    /// Bytes of those records ([`record_bytes`]).
    pub depth_bytes: u64,
    /// Records handed to the queue since start.
    pub enqueued: u64,
    /// Records the sink has stored since start, replayed ones included.
    pub written: u64,
    /// Records refused because the queue was full or the writer had stopped.
    pub rejected: u64,
    /// Calls that found the queue full and waited for room for their record.
    pub waited: u64,
    /// Sink writes that failed or timed out.
    pub write_errors: u64,
    /// Records appended to the journal since start.
    pub journaled: u64,
    /// Records in the journal waiting for the sink.
    pub journal_records: u64,
    /// Bytes of the journal on disk.
    pub journal_bytes: u64,
    /// Records lost to torn or corrupt journal lines, or unreadable as records, since start.
    pub journal_skipped: u64,
    /// Journal appends and chain state saves the disk refused.
    pub journal_errors: u64,
    /// Rows the sink left out of its store for good ([`AuditSink::rows_left_out`]), as of its
    /// last successful write.
    pub sink_rows_left_out: u64,
    /// Whether the last sink write succeeded.
    pub sink_up: bool,
}

/// The writer task; await [`WriterHandle::finish_within`] (or [`WriterHandle::finish`]) at
/// shutdown to flush what is queued.
#[derive(Debug)]
pub struct WriterHandle {
    task: JoinHandle<()>,
    shared: Arc<Shared>,
    /// Tells the writer by when it must have finished ([`WriterHandle::finish_within`]).
    finish_by: oneshot::Sender<Instant>,
}

/// The writer did not finish within the limit [`WriterHandle::finish_within`] gave it: the
/// records still in memory (`stats.depth`) are lost when the process ends; those in the journal
/// are replayed at the next start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit writer did not finish within {} ms", limit.as_millis())]
pub struct FlushOverrun {
    /// The limit it was given.
    pub limit: Duration,
    /// The counters when the limit passed.
    pub stats: QueueStats,
}

impl WriterHandle {
    /// Waits, once every [`AuditQueue`] clone is dropped, until the writer has put every record
    /// in the sink or the journal. With an empty journal the last records go to the sink. When
    /// the journal holds a backlog (the sink was down or slower than the calls), the writer stops
    /// replaying it and appends what is left behind it: the next start replays it all, and a
    /// shutdown takes moments however large the backlog. The same happens when the sink fails
    /// after the queue closed (or a write still runs one timeout after it). At shutdown the
    /// journal takes records past its size limit rather than lose them. Without a journal the
    /// writer keeps retrying the sink. Returns the final counters.
    ///
    /// This waits as long as the writer takes: with a sink that is slow but answers within its
    /// timeout, that is one write per batch of 512 records queued. A caller with a limit uses
    /// [`WriterHandle::finish_within`].
    pub async fn finish(self) -> QueueStats {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "audit writer task failed");
        }
        stats(&self.shared)
    }

    /// [`WriterHandle::finish`] within `limit`, which the writer is told: once the queue is
    /// closed it sends batches to the sink only while more than one sink timeout plus half of
    /// the rest of `limit` is left. Then, with a journal, the batch being written is also
    /// appended to the journal (taken out again if its write succeeds), everything else goes
    /// behind it, and the writer stops once that write ends or times out, so that it finishes
    /// within the limit however slow the sink is, with half of what the limit leaves beyond one
    /// sink timeout for the journal's appends. The next start replays the journal, oldest first.
    /// Without a journal the writer keeps trying the sink until the limit passes.
    ///
    /// # Errors
    ///
    /// [`FlushOverrun`] when the writer has not finished when `limit` passes: the records it
    /// still holds are lost if the process ends.
    pub async fn finish_within(self, limit: Duration) -> Result<QueueStats, FlushOverrun> {
        let WriterHandle {
            task,
            shared,
            finish_by,
        } = self;
        let deadline = Instant::now() + limit;
        // Refused only when the writer has stopped already.
        let _ = finish_by.send(deadline);
        match tokio::time::timeout_at(deadline, task).await {
            Ok(joined) => {
                if let Err(error) = joined {
                    tracing::error!(%error, "audit writer task failed");
                }
                Ok(stats(&shared))
            }
            Err(_) => Err(FlushOverrun {
                limit,
                stats: stats(&shared),
            }),
        }
    }
}

impl AuditQueue {
    /// Starts a writer for `sink` behind a queue of `capacity` records, with no journal and
    /// chain state in memory only (see [`QueueSettings::journal_dir`]).
    pub fn start(sink: Arc<dyn AuditSink>, capacity: usize) -> (AuditQueue, WriterHandle) {
        let settings = QueueSettings {
            capacity,
            ..QueueSettings::default()
        };
        spawn(sink, &settings, Chainer::in_memory(), None)
    }

    /// Starts a writer for `sink` with `settings`: opens the journal directory (creating it),
    /// loads the chain state and schedules the replay of what an earlier run left.
    pub async fn start_with(
        sink: Arc<dyn AuditSink>,
        settings: QueueSettings,
    ) -> io::Result<(AuditQueue, WriterHandle)> {
        let Some(dir) = settings.journal_dir.clone() else {
            return Ok(spawn(sink, &settings, Chainer::in_memory(), None));
        };
        let max_bytes = settings.journal_max_bytes;
        let chunk_bytes = settings.replay_chunk_bytes();
        let (journal, chainer) = tokio::task::spawn_blocking(move || {
            let journal = Journal::open(&dir, max_bytes, chunk_bytes)?;
            let chainer = Chainer::open(dir.join(STATE_FILE));
            Ok::<_, io::Error>((journal, chainer))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(spawn(sink, &settings, chainer, Some(journal)))
    }

    /// Hands a record to the writer without waiting. Returns `false` (and counts it) when the
    /// queue is full or the writer is gone.
    pub fn submit(&self, record: AuditRecord) -> bool {
        self.try_submit(record).is_ok()
    }

    /// Takes room for one call's record. While the queue is full (in records, or in bytes:
    /// [`QueueSettings::max_bytes`]) this waits for room, up to
    /// [`QueueSettings::room_wait`] (counted in [`QueueStats::waited`]) — unless the writer can
    /// place records nowhere (see [`Admission::Closed`]), when waiting would not help. `Err`
    /// when no room came: the call then goes on without (its record is submitted with
    /// [`AuditQueue::submit`]) or, failing closed, is refused.
    pub async fn reserve(&self) -> Result<RecordSlot, RecordRefused> {
        let sender = if self.shared.under_max_bytes() {
            match self.sender.clone().try_reserve_owned() {
                Ok(permit) => return Ok(self.slot(permit)),
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(RecordRefused::Stopped),
                Err(mpsc::error::TrySendError::Full(sender)) => sender,
            }
        } else if self.sender.is_closed() {
            return Err(RecordRefused::Stopped);
        } else {
            self.sender.clone()
        };
        if self.stuck() {
            return Err(RecordRefused::Full);
        }
        self.shared.waited.fetch_add(1, Ordering::Relaxed);
        let room = async {
            self.shared.bytes_under_max().await;
            sender.reserve_owned().await
        };
        match tokio::time::timeout(self.shared.room_wait, room).await {
            Ok(Ok(permit)) => Ok(self.slot(permit)),
            Ok(Err(_)) => Err(RecordRefused::Stopped),
            Err(_) => {
                tracing::warn!(
                    wait_ms = self.shared.room_wait.as_millis(),
                    "no room in the audit queue in time; the call goes on without"
                );
                Err(RecordRefused::Full)
            }
        }
    }

    fn slot(&self, permit: mpsc::OwnedPermit<AuditRecord>) -> RecordSlot {
        RecordSlot {
            permit,
            shared: Arc::clone(&self.shared),
        }
    }

    /// Hands a record to the writer without waiting, saying why when it cannot (the refusal is
    /// counted and logged).
    pub fn try_submit(&self, mut record: AuditRecord) -> Result<(), RecordRefused> {
        if !self.shared.under_max_bytes() && !self.sender.is_closed() {
            self.shared
                .refused(&record.correlation_id, RecordRefused::Full);
            return Err(RecordRefused::Full);
        }
        let bytes = take_in(&mut record);
        // Counted before the send, as in `RecordSlot::submit`.
        self.shared.taken(bytes);
        match self.sender.try_send(record) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.shared.untaken(bytes);
                let (record, refused) = match error {
                    mpsc::error::TrySendError::Full(record) => (record, RecordRefused::Full),
                    mpsc::error::TrySendError::Closed(record) => (record, RecordRefused::Stopped),
                };
                self.shared.refused(&record.correlation_id, refused);
                Err(refused)
            }
        }
    }

    /// Whether a record handed over now would be kept; see [`Admission`].
    pub fn admission(&self) -> Admission {
        let shared = &self.shared;
        if self.sender.capacity() == 0 || !shared.under_max_bytes() || self.stuck() {
            Admission::Closed
        } else if shared.sink_down.load(Ordering::Relaxed)
            || shared.journal_records.load(Ordering::Relaxed) > 0
        {
            Admission::Degraded
        } else {
            Admission::Open
        }
    }

    /// Whether the writer can place records nowhere: it stopped, or the sink is down with no
    /// journal, a full one, or records in hand that the journal refused. While the sink works,
    /// a full journal only slows the writer: the sink drains it, then takes the records the
    /// writer holds, and room comes at the pace the sink keeps.
    fn stuck(&self) -> bool {
        let shared = &self.shared;
        if self.sender.is_closed() {
            return true;
        }
        let journal_full = shared.journal_bytes.load(Ordering::Relaxed) >= shared.journal_max_bytes;
        shared.sink_down.load(Ordering::Relaxed)
            && (!shared.has_journal || journal_full || shared.blocked.load(Ordering::Relaxed))
    }

    /// Whether the gateway must refuse a call that holds room for its record
    /// ([`AuditQueue::reserve`]): the queue is set to fail closed and the writer can place
    /// records nowhere. A full queue alone does not count: the call's room is taken.
    pub fn refuses_calls(&self) -> bool {
        self.shared.fail_closed && self.stuck()
    }

    /// Whether the queue is set to fail closed ([`QueueSettings::fail_closed`]).
    pub fn fail_closed(&self) -> bool {
        self.shared.fail_closed
    }

    /// The queue's counters now.
    pub fn stats(&self) -> QueueStats {
        stats(&self.shared)
    }
}

fn stats(shared: &Shared) -> QueueStats {
    let enqueued = shared.enqueued.load(Ordering::Relaxed);
    QueueStats {
        depth: enqueued.saturating_sub(shared.settled.load(Ordering::Relaxed)),
        depth_bytes: shared.held_bytes.load(Ordering::Relaxed),
        enqueued,
        written: shared.written.load(Ordering::Relaxed),
        rejected: shared.rejected.load(Ordering::Relaxed),
        waited: shared.waited.load(Ordering::Relaxed),
        write_errors: shared.write_errors.load(Ordering::Relaxed),
        journaled: shared.journaled.load(Ordering::Relaxed),
        journal_records: shared.journal_records.load(Ordering::Relaxed),
        journal_bytes: shared.journal_bytes.load(Ordering::Relaxed),
        journal_skipped: shared.journal_skipped.load(Ordering::Relaxed),
        journal_errors: shared.journal_errors.load(Ordering::Relaxed),
        sink_rows_left_out: shared.sink_rows_left_out.load(Ordering::Relaxed),
        sink_up: !shared.sink_down.load(Ordering::Relaxed),
    }
}

fn spawn(
    sink: Arc<dyn AuditSink>,
    settings: &QueueSettings,
    chainer: Chainer,
    journal: Option<Journal>,
) -> (AuditQueue, WriterHandle) {
    let (sender, receiver) = mpsc::channel(settings.capacity.max(1));
    let shared = Arc::new(Shared {
        has_journal: journal.is_some(),
        journal_max_bytes: settings.journal_max_bytes,
        max_bytes: settings.max_bytes,
        fail_closed: settings.fail_closed,
        room_wait: settings.room_wait,
        ..Shared::default()
    });
    let journal_status = journal.as_ref().map_or(
        JournalStatus {
            empty: true,
            records: 0,
            bytes: 0,
            skipped: 0,
        },
        Journal::status,
    );
    let (finish_by, told_finish_by) = oneshot::channel();
    let writer = Writer {
        sink,
        receiver,
        told_finish_by: Some(told_finish_by),
        sink_until: None,
        out_of_sink_time: false,
        shared: Arc::clone(&shared),
        chainer,
        publish_heads_at: None,
        publish_heads_every: settings.publish_heads_every,
        journal: journal.map(|journal| Arc::new(Mutex::new(journal))),
        journal_status,
        sink_timeout: settings.sink_timeout.max(Duration::from_millis(1)),
        in_flight: None,
        appending: None,
        held: None,
        held_retry: Instant::now(),
        held_at_bytes: 0,
        next_attempt: Instant::now(),
        backoff: FIRST_BACKOFF,
        closed: false,
        drained: false,
        failed_since_close: false,
    };
    writer.publish();
    let task = tokio::spawn(writer.run());
    (
        AuditQueue {
            sender,
            shared: Arc::clone(&shared),
        },
        WriterHandle {
            task,
            shared,
            finish_by,
        },
    )
}

type Batch = Arc<Vec<AuditRecord>>;

/// Makes a record handed to the queue what the writer will link and store, and weighs it as
/// such: its NUL characters replaced with U+FFFD, since every store keeps, and the verifier reads
/// back, the same text (PostgreSQL cannot hold U+0000). Replaced before it is weighed: each NUL
/// takes three bytes instead of one, and a record weighed first would be released heavier than it
/// was counted, so that the bytes held drifted down and the byte bound stopped holding.
fn take_in(record: &mut AuditRecord) -> u64 {
    record.replace_nul();
    record_bytes(record)
}

/// The part of a record's weight ([`record_bytes`]) that does not depend on its text: the
/// record's own size and the numbers, flags and attempts it carries, roughly.
pub(crate) const RECORD_FIXED_BYTES: u64 = 1_024;

/// What a record weighs in memory, as [`QueueSettings::max_bytes`] counts it: its text (bodies,
/// messages, addresses, names, groups and error texts) and a fixed part for the rest.
///
/// The journal bounds a replay chunk's weight by its lines' JSON before it decodes them (see
/// `journal`), which holds only while every text counted here is one the record's JSON holds.
pub fn record_bytes(record: &AuditRecord) -> u64 {
    let optional = [
        &record.backend_id,
        &record.backend_url,
        &record.apim_subscription_id,
        &record.product_id,
        &record.user_id,
        &record.user_name,
        &record.tenant_id,
        &record.deployment_name,
        &record.model_name,
        &record.api_version,
        &record.backend_request_body,
        &record.backend_response_body,
        &record.request_messages,
        &record.response_messages,
        &record.last_error_reason,
        &record.last_error_message,
    ];
    let text = [
        &record.correlation_id,
        &record.gateway_id,
        &record.caller_ip_address,
        &record.peer_ip_address,
        &record.method,
        &record.url,
        &record.client_protocol,
    ]
    .iter()
    .map(|text| text.len())
    .chain(
        optional
            .iter()
            .map(|text| text.as_ref().map_or(0, String::len)),
    )
    .chain(record.groups.iter().map(String::len))
    .sum::<usize>();
    RECORD_FIXED_BYTES + text as u64
}

/// The writer task's state.
struct Writer {
    sink: Arc<dyn AuditSink>,
    receiver: mpsc::Receiver<AuditRecord>,
    /// Where [`WriterHandle::finish_within`] says by when the writer must have finished; `None`
    /// once the writer has heard (a deadline, or that none will come: the handle was dropped).
    told_finish_by: Option<oneshot::Receiver<Instant>>,
    /// With a journal, once the queue is closed, batches go to the sink only until then, so that
    /// the writer finishes by the time it was given ([`WriterHandle::finish_within`]).
    sink_until: Option<Instant>,
    /// `sink_until` has passed since the queue closed: the writer starts no sink write, and what
    /// it holds goes to the journal.
    out_of_sink_time: bool,
    shared: Arc<Shared>,
    chainer: Chainer,
    /// When to publish the heads of the chains linked into since they were last published
    /// (`None`: nothing linked since).
    publish_heads_at: Option<Instant>,
    publish_heads_every: Duration,
    journal: Option<Arc<Mutex<Journal>>>,
    /// The journal's size after the last operation on it.
    journal_status: JournalStatus,
    sink_timeout: Duration,
    /// The one sink write running, if any.
    in_flight: Option<InFlight>,
    /// The journal append running while the writer links the next batch, if any.
    appending: Option<Appending>,
    /// Linked records that neither the sink nor the journal took yet; nothing is received while
    /// they wait, so that they keep their place.
    held: Option<Batch>,
    /// When to try the journal again for `held`.
    held_retry: Instant,
    /// Journal bytes when it last refused `held`: it is tried again once the journal shrinks.
    held_at_bytes: u64,
    /// When to try the sink again (replay or `held`) after a failure.
    next_attempt: Instant,
    backoff: Duration,
    /// Every sender is gone.
    closed: bool,
    /// ...and every record they sent has been received.
    drained: bool,
    /// A sink write failed or timed out after the queue closed: the writer stops once everything
    /// is in the journal, which may then grow past its limit rather than lose records.
    failed_since_close: bool,
}

/// A journal append on a blocking thread. The writer links (and saves the chain heads of) the
/// next batch meanwhile, and settles this append before it places that batch anywhere or does
/// anything else with the journal.
struct Appending {
    task: JoinHandle<(Result<Stretch, JournalError>, JournalStatus)>,
    batch: Batch,
}

type AppendResult = Result<(Result<Stretch, JournalError>, JournalStatus), JoinError>;

/// Appends records to the journal on a blocking thread; the task ends with the journal's state
/// after the append.
fn spawn_append(
    journal: Arc<Mutex<Journal>>,
    records: Batch,
    force: bool,
    kind: LineKind,
) -> JoinHandle<(Result<Stretch, JournalError>, JournalStatus)> {
    tokio::task::spawn_blocking(move || {
        let mut journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
        let result = journal.append(&records, force, kind);
        (result, journal.status())
    })
}

struct InFlight {
    task: JoinHandle<Result<(), SinkError>>,
    job: Job,
    count: usize,
    /// When to act on a write still running: first its timeout, then (re-armed when the queue
    /// closes) the end of the grace it gets at shutdown.
    deadline: Option<Instant>,
    abandon_at: Instant,
    timed_out: bool,
}

enum Job {
    /// A batch from the channel; `journaled` once it was also appended to the (empty) journal
    /// because the write timed out.
    Direct {
        records: Batch,
        journaled: Option<Stretch>,
    },
    /// A chunk read from the head of the journal.
    Replay { stretch: Stretch },
}

impl Job {
    /// Whether the records of this write are safe in the journal.
    fn journaled(&self) -> bool {
        !matches!(
            self,
            Job::Direct {
                journaled: None,
                ..
            }
        )
    }
}

enum Event {
    Received(Vec<AuditRecord>),
    /// The journal append running in the background ended.
    Appended(AppendResult),
    Drained,
    Completed(Result<Result<(), SinkError>, JoinError>),
    TimedOut,
    Abandon,
    Wake,
    /// Time to look whether records pile up behind the direct write in flight.
    CheckBacklog,
    /// [`WriterHandle::finish_within`] gave the writer until then (`None`: it never will).
    FinishBy(Option<Instant>),
    /// Time to publish the heads of the chains linked into.
    PublishHeads,
}

impl Writer {
    async fn run(mut self) {
        let mut buffer = Vec::with_capacity(MAX_BATCH);
        loop {
            if !self.closed && self.receiver.is_closed() {
                self.close();
            }
            if self.sink_time_runs_out() {
                self.settle_append().await;
                self.out_of_sink_time = true;
                tracing::warn!(
                    sink = self.sink.name(),
                    "audit sink too slow to store every record before the shutdown's limit; \
                     the rest go to the journal for the next start"
                );
                // The records behind the write in flight may follow it into the journal only
                // once it is there.
                self.journal_in_flight().await;
            }
            if self.in_flight.is_none() {
                self.settle_append().await;
                self.start_next().await;
            }
            self.publish();
            if self.drained {
                self.settle_append().await;
                if self.may_exit() {
                    break;
                }
            }
            let event = self.next_event(&mut buffer).await;
            // Only a new batch is linked while an append runs; anything else that concerns the
            // journal or the order of records waits for it.
            if !matches!(event, Event::Received(_) | Event::Appended(_)) {
                self.settle_append().await;
            }
            match event {
                Event::Received(mut batch) => {
                    self.top_up(&mut batch).await;
                    self.accept(batch).await;
                }
                Event::Appended(result) => {
                    if let Some(appending) = self.appending.take() {
                        self.appended(appending.batch, result);
                    }
                }
                Event::Drained => {
                    self.drained = true;
                    if !self.closed {
                        self.close();
                    }
                }
                Event::Completed(Ok(Ok(()))) => self.stored().await,
                Event::Completed(Ok(Err(error))) => {
                    self.failed_write(&error.to_string(), error.retry_after())
                        .await;
                }
                Event::Completed(Err(error)) => {
                    self.failed_write(&format!("sink write task failed: {error}"), None)
                        .await;
                }
                Event::TimedOut => self.timed_out().await,
                Event::Abandon => {
                    if let Some(flight) = &self.in_flight {
                        flight.task.abort();
                    }
                    self.failed_write("abandoned: still running long after its timeout", None)
                        .await;
                }
                Event::Wake => {}
                Event::CheckBacklog => {
                    if self.backlogged(0) {
                        self.journal_in_flight().await;
                    }
                }
                Event::PublishHeads => self.publish_heads(),
                Event::FinishBy(deadline) => {
                    self.told_finish_by = None;
                    if let Some(deadline) = deadline {
                        // Half of what is left beyond one sink timeout for the sink, half for
                        // the journal; the last write gets its timeout after that.
                        let now = Instant::now();
                        let left = deadline.saturating_duration_since(now);
                        self.sink_until = Some(now + left.saturating_sub(self.sink_timeout) / 2);
                    }
                }
            }
        }
        self.publish_heads();
        self.publish();
    }

    /// Logs the head of every chain linked into since the last time ([`PublishedHead`]
    /// (crate::chain::PublishedHead)): the log, kept apart from the store, is where an auditor
    /// finds what the chain alone cannot show (`verify-audit --heads`).
    fn publish_heads(&mut self) {
        self.publish_heads_at = None;
        for head in self.chainer.take_new_heads() {
            tracing::info!(
                target: crate::chain::HEAD_TARGET,
                chain_id = %head.chain_id,
                sequence = head.sequence,
                record_hash = %head.record_hash,
                "{}",
                crate::chain::HEAD_MESSAGE
            );
        }
    }

    /// Every sender is gone: try the sink once more right away, and give a write that is
    /// already slow one more timeout to finish.
    fn close(&mut self) {
        self.closed = true;
        let now = Instant::now();
        self.next_attempt = now;
        if let Some(flight) = &mut self.in_flight
            && flight.timed_out
        {
            flight.deadline = Some(now + self.sink_timeout);
        }
    }

    /// Whether the queue is closed, the writer has a journal, and the time it may give the sink
    /// ([`WriterHandle::finish_within`]) has just run out.
    fn sink_time_runs_out(&self) -> bool {
        self.closed
            && !self.out_of_sink_time
            && self.journal.is_some()
            && self.sink_until.is_some_and(|until| Instant::now() >= until)
    }

    /// At shutdown, whether the records not stored yet go to the journal rather than the sink:
    /// the sink failed since the queue closed, the journal holds a backlog, or the time the
    /// writer may give the sink has run out. Replaying a backlog, or writing batch after batch to
    /// a slow sink, can take longer than the process is given to stop (a supervisor then kills
    /// it, and the records in memory with it); the next start replays the journal instead.
    fn shutting_down_without_sink(&self) -> bool {
        self.closed
            && (self.failed_since_close
                || self.out_of_sink_time
                || (self.journal.is_some() && !self.journal_status.empty))
    }

    /// Once drained: whether everything is stored, or (see [`Writer::shutting_down_without_sink`])
    /// safe in the journal.
    fn may_exit(&mut self) -> bool {
        if self.held.is_some() {
            return false;
        }
        let journal_holds_the_rest = self.shutting_down_without_sink();
        match &self.in_flight {
            None => self.journal_status.empty || journal_holds_the_rest,
            // Its records are in the journal: a late success would only make a duplicate.
            Some(flight)
                if journal_holds_the_rest && flight.timed_out && flight.job.journaled() =>
            {
                flight.task.abort();
                self.in_flight = None;
                true
            }
            Some(_) => false,
        }
    }

    /// Waits for the next thing to do.
    async fn next_event(&mut self, buffer: &mut Vec<AuditRecord>) -> Event {
        let receive = self.can_receive();
        let now = Instant::now();
        let (has_flight, deadline, abandon_at) = match &self.in_flight {
            Some(flight) => (true, flight.deadline, flight.abandon_at),
            None => (false, None, now),
        };
        let waiting = !has_flight && (!self.journal_status.empty || self.held.is_some());
        // While a direct write is in flight nothing is received (its records must reach the
        // journal first, see `journal_in_flight`): look now and then whether the channel fills.
        let direct_in_flight = self
            .in_flight
            .as_ref()
            .is_some_and(|flight| !flight.job.journaled())
            && self.journal.is_some();
        let wake_at = if self.held.is_some() && !self.journal_status.empty {
            self.next_attempt.min(self.held_retry)
        } else {
            self.next_attempt
        };
        let limit = self.batch_limit();
        let sink_until = self
            .sink_until
            .filter(|_| self.closed && !self.out_of_sink_time && self.journal.is_some());
        let has_finish_by = self.told_finish_by.is_some();
        let told_finish_by = &mut self.told_finish_by;
        let finish_by = async {
            match told_finish_by {
                Some(told) => told.await.ok(),
                None => std::future::pending().await,
            }
        };
        let publish_heads_at = self.publish_heads_at;
        let receiver = &mut self.receiver;
        let in_flight = &mut self.in_flight;
        let has_append = self.appending.is_some();
        let appending = &mut self.appending;
        let append_done = async {
            match appending {
                Some(appending) => (&mut appending.task).await,
                None => std::future::pending().await,
            }
        };
        let completion = async {
            match in_flight {
                Some(flight) => (&mut flight.task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = receiver.recv_many(buffer, limit), if receive => {
                if received == 0 {
                    Event::Drained
                } else {
                    Event::Received(std::mem::replace(buffer, Vec::with_capacity(MAX_BATCH)))
                }
            }
            result = completion, if has_flight => Event::Completed(result),
            result = append_done, if has_append => Event::Appended(result),
            () = tokio::time::sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => {
                Event::TimedOut
            }
            () = tokio::time::sleep_until(abandon_at), if has_flight => Event::Abandon,
            () = tokio::time::sleep_until(wake_at), if waiting => Event::Wake,
            () = tokio::time::sleep(BACKLOG_CHECK_EVERY), if direct_in_flight => Event::CheckBacklog,
            deadline = finish_by, if has_finish_by => Event::FinishBy(deadline),
            () = tokio::time::sleep_until(sink_until.unwrap_or(now)), if sink_until.is_some() => {
                Event::Wake
            }
            () = tokio::time::sleep_until(publish_heads_at.unwrap_or(now)), if publish_heads_at.is_some() => {
                Event::PublishHeads
            }
            else => {
                // Not reached: with nothing to wait for, the writer has exited. Never spin.
                tokio::time::sleep(FIRST_BACKOFF).await;
                Event::Wake
            }
        }
    }

    /// Whether a received batch could be placed now without overtaking older records.
    fn can_receive(&self) -> bool {
        if self.drained || self.held.is_some() {
            return false;
        }
        match &self.in_flight {
            None => true,
            Some(flight) => flight.job.journaled(),
        }
    }

    /// How many records to take at once: a batch for the sink, or (behind a backlog, where
    /// they go to the journal) up to [`JOURNAL_BATCH`].
    fn batch_limit(&self) -> usize {
        let to_sink = self.in_flight.is_none() && self.journal_status.empty && !self.backlogged(0);
        if to_sink || self.journal.is_none() {
            MAX_BATCH
        } else {
            JOURNAL_BATCH
        }
    }

    /// Adds to a short batch what arrives within [`BATCH_LINGER`], up to [`MAX_BATCH`] records.
    /// Nothing waits once the queue is closing.
    async fn top_up(&mut self, batch: &mut Vec<AuditRecord>) {
        let deadline = Instant::now() + BATCH_LINGER;
        while batch.len() < MAX_BATCH && !self.closed {
            let room = MAX_BATCH - batch.len();
            match tokio::time::timeout_at(deadline, self.receiver.recv_many(batch, room)).await {
                Ok(0) => self.close(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    /// Links a received batch and writes it to the sink or, behind older records, the journal.
    async fn accept(&mut self, mut batch: Vec<AuditRecord>) {
        for (index, record) in batch.iter_mut().enumerate() {
            // Its NUL characters were replaced as it was handed over (`take_in`).
            self.chainer.link(record);
            if index % LINKS_PER_YIELD == LINKS_PER_YIELD - 1 {
                tokio::task::yield_now().await;
            }
        }
        if self.publish_heads_at.is_none() && !batch.is_empty() {
            self.publish_heads_at = Some(Instant::now() + self.publish_heads_every);
        }
        self.save_chain().await;
        // Where this batch goes depends on where the one before it went.
        self.settle_append().await;
        let batch = Arc::new(batch);
        // A batch taken large (see `batch_limit`) goes behind the backlog it was taken for.
        if self.held.is_none()
            && self.in_flight.is_none()
            && self.journal_status.empty
            && !self.out_of_sink_time
            && batch.len() <= MAX_BATCH
            && !self.backlogged(batch.len())
        {
            self.start_write(
                Job::Direct {
                    records: Arc::clone(&batch),
                    journaled: None,
                },
                batch,
            );
        } else {
            self.spill(batch).await;
        }
    }

    /// Whether records arrive faster than the sink stores them: with the batch just taken
    /// (`taken` records), the channel was half full. Batches then go to the journal (an append,
    /// far faster than a store write), and the sink is fed from the journal while the channel
    /// keeps being emptied — so a store that is slow, not down, never makes the queue refuse
    /// records.
    fn backlogged(&self, taken: usize) -> bool {
        self.journal.is_some() && self.receiver.len() + taken >= self.receiver.max_capacity() / 2
    }

    /// Saves the chain heads before the records they cover are written anywhere, so that a
    /// restart never reuses a sequence.
    async fn save_chain(&mut self) {
        let Some(path) = self.chainer.state_file().map(PathBuf::from) else {
            return;
        };
        let saved = match self.chainer.state_bytes() {
            Ok(bytes) => {
                let target = path.clone();
                tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|result| result)
            }
            Err(error) => Err(io::Error::other(error)),
        };
        if let Err(error) = saved {
            self.shared.journal_errors.fetch_add(1, Ordering::Relaxed);
            // A stale state would make the next start reuse sequences; without one it starts
            // marked segments instead.
            let removed = std::fs::remove_file(&path);
            tracing::error!(
                path = %path.display(),
                %error,
                stale_state_removed = removed.is_ok(),
                "audit chain state not saved"
            );
        }
    }

    /// Puts linked records behind the journal — appended in the background while the writer
    /// goes on, unless the queue is closing — or holds them when it cannot take them.
    async fn spill(&mut self, batch: Batch) {
        let Some(journal) = self.journal.clone() else {
            // Retried on the sink, with backoff, while the channel fills.
            self.held = Some(batch);
            return;
        };
        self.settle_append().await;
        if let Some(held) = self.held.take() {
            // The journal refused the batch before this one: this one waits behind it.
            let mut records = Arc::unwrap_or_clone(held);
            records.extend(batch.iter().cloned());
            self.held = Some(Arc::new(records));
            return;
        }
        if self.closed {
            self.place(batch, true).await;
        } else {
            let task = spawn_append(journal, Arc::clone(&batch), false, self.line_kind());
            self.appending = Some(Appending { task, batch });
        }
    }

    /// Waits for the append running in the background, if any, and takes in its outcome.
    async fn settle_append(&mut self) {
        if let Some(appending) = self.appending.take() {
            let result = appending.task.await;
            self.appended(appending.batch, result);
        }
    }

    /// Takes in the outcome of a background append, as [`Writer::place`] does its own.
    fn appended(&mut self, batch: Batch, result: AppendResult) {
        let result = self.take_append(batch.len(), result);
        self.placed(batch, true, false, result);
    }

    /// Takes in the journal's state after an append of `records` and counts them if it took them.
    fn take_append(
        &mut self,
        records: usize,
        result: AppendResult,
    ) -> Result<Stretch, JournalError> {
        let (result, status) = result.map_err(|error| JournalError::Io(io::Error::other(error)))?;
        self.journal_status = status;
        if result.is_ok() {
            Shared::add(&self.shared.journaled, records);
        }
        result
    }

    /// Appends records to the journal; holds them when it refuses, or at a shutdown without
    /// sink gives them up.
    async fn place(&mut self, batch: Batch, first_try: bool) {
        let force = self.shutting_down_without_sink();
        let result = self.append(&batch, force).await;
        self.placed(batch, first_try, force, result);
    }

    /// Settles a batch the journal took, holds one it refused, or (`force`, at shutdown) gives it
    /// up.
    fn placed(
        &mut self,
        batch: Batch,
        first_try: bool,
        force: bool,
        result: Result<Stretch, JournalError>,
    ) {
        match result {
            Ok(_) => self.shared.release(&batch, true),
            Err(error) if force => {
                self.shared.release(&batch, false);
                self.shared.journal_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %error,
                    records = batch.len(),
                    "audit records could be neither stored nor journaled at shutdown: lost"
                );
            }
            Err(error) => {
                match (&error, first_try) {
                    (JournalError::Full { .. }, true) => tracing::warn!(
                        %error,
                        records = batch.len(),
                        "audit journal full; records wait in memory and the queue fills"
                    ),
                    (JournalError::Full { .. }, false) => {}
                    _ => {
                        self.shared.journal_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            %error,
                            records = batch.len(),
                            "audit records not journaled; they wait in memory and the queue fills"
                        );
                    }
                }
                self.held_at_bytes = self.journal_status.bytes;
                self.held_retry = Instant::now() + self.backoff.max(FIRST_BACKOFF);
                self.held = Some(batch);
            }
        }
    }

    /// Appends to the journal, off the runtime's threads.
    async fn append(&mut self, batch: &Batch, force: bool) -> Result<Stretch, JournalError> {
        let Some(journal) = &self.journal else {
            return Err(JournalError::Io(io::Error::other(
                "no journal directory is set",
            )));
        };
        let kind = self.line_kind();
        let result = spawn_append(Arc::clone(journal), Arc::clone(batch), force, kind).await;
        self.take_append(batch.len(), result)
    }

    /// How a batch goes into the journal: packed while the sink is down, since the records will
    /// then wait as long as the outage lasts and the journal's size limit decides how long that
    /// may be; plain while the sink works and is only behind, since they then pass through within
    /// seconds and packing would cost the calls CPU for nothing.
    fn line_kind(&self) -> LineKind {
        if self.shared.sink_down.load(Ordering::Relaxed) {
            LineKind::Packed
        } else {
            LineKind::Plain
        }
    }

    /// With no write running: starts the next one (the held batch, or the next journal chunk)
    /// when it is due, or moves the held batch into the journal once it has room.
    async fn start_next(&mut self) {
        let now = Instant::now();
        if let Some(held) = self.held.take() {
            if self.journal_status.empty && !self.out_of_sink_time {
                if now >= self.next_attempt {
                    self.start_write(
                        Job::Direct {
                            records: Arc::clone(&held),
                            journaled: None,
                        },
                        held,
                    );
                } else {
                    self.held = Some(held);
                }
                return;
            }
            let shrunk = self.journal_status.bytes < self.held_at_bytes;
            if shrunk || now >= self.held_retry || self.shutting_down_without_sink() {
                self.place(held, false).await;
            } else {
                self.held = Some(held);
            }
        }
        if !self.journal_status.empty && now >= self.next_attempt && !self.closed {
            self.start_replay().await;
        }
    }

    async fn start_replay(&mut self) {
        let Some(journal) = &self.journal else {
            return;
        };
        let journal = Arc::clone(journal);
        let read = tokio::task::spawn_blocking(move || {
            let mut journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
            let chunk = journal.read_chunk(MAX_BATCH);
            (chunk, journal.status())
        })
        .await;
        let error = match read {
            Ok((Ok(chunk), status)) => {
                self.journal_status = status;
                match chunk {
                    Some(chunk) if chunk.records.is_empty() => self.commit(chunk.stretch).await,
                    Some(chunk) => self.start_write(
                        Job::Replay {
                            stretch: chunk.stretch,
                        },
                        Arc::new(chunk.records),
                    ),
                    None => {}
                }
                return;
            }
            Ok((Err(error), _)) => error,
            Err(error) => io::Error::other(error),
        };
        self.shared.journal_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%error, "audit journal not readable; retrying");
        self.failed();
    }

    async fn commit(&mut self, stretch: Stretch) {
        let Some(journal) = &self.journal else {
            return;
        };
        let journal = Arc::clone(journal);
        match tokio::task::spawn_blocking(move || {
            let mut journal = journal.lock().unwrap_or_else(PoisonError::into_inner);
            journal.commit(stretch);
            journal.status()
        })
        .await
        {
            Ok(status) => self.journal_status = status,
            Err(error) => tracing::error!(%error, "audit journal commit failed"),
        }
    }

    fn start_write(&mut self, job: Job, records: Batch) {
        let now = Instant::now();
        let count = records.len();
        let sink = Arc::clone(&self.sink);
        self.in_flight = Some(InFlight {
            task: tokio::spawn(async move { sink.write_batch(&records).await }),
            job,
            count,
            deadline: Some(now + self.sink_timeout),
            abandon_at: now
                + (self.sink_timeout * ABANDON_AFTER_TIMEOUTS).max(ABANDON_AFTER_AT_LEAST),
            timed_out: false,
        });
    }

    /// Puts the batch of the direct write in flight in the (empty) journal, so that the batches
    /// behind it can follow it there and the channel keeps being emptied: when the write is slower
    /// than the timeout, or when records pile up behind it (the channel is half full, see
    /// [`Writer::backlogged`]). The write keeps running; if it succeeds, its batch is taken back
    /// out of the journal.
    async fn journal_in_flight(&mut self) {
        let Some(mut flight) = self.in_flight.take() else {
            return;
        };
        if let Job::Direct {
            records,
            journaled: journaled @ None,
        } = &mut flight.job
            && self.journal.is_some()
        {
            let records = Arc::clone(records);
            // At shutdown past its size limit, as every batch then.
            let force = self.shutting_down_without_sink();
            match self.append(&records, force).await {
                Ok(stretch) => {
                    *journaled = Some(stretch);
                    self.shared.release(&records, true);
                }
                Err(error) => {
                    self.shared.journal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%error, "audit batch of the write in flight not journaled");
                }
            }
        }
        self.in_flight = Some(flight);
    }

    /// The write in flight is slower than the timeout: count it, and put a batch from the channel
    /// in the journal so that new records can follow it there. The write keeps running. At
    /// shutdown, the grace of a slow write has run out.
    async fn timed_out(&mut self) {
        let Some(mut flight) = self.in_flight.take() else {
            return;
        };
        flight.deadline = None;
        if flight.timed_out {
            self.failed_since_close = true;
            self.in_flight = Some(flight);
            return;
        }
        flight.timed_out = true;
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        self.shared.sink_down.store(true, Ordering::Relaxed);
        if self.closed {
            self.failed_since_close = true;
        }
        tracing::warn!(
            sink = self.sink.name(),
            records = flight.count,
            timeout_ms = self.sink_timeout.as_millis(),
            "audit sink write timed out; records go to the journal meanwhile"
        );
        self.in_flight = Some(flight);
        self.journal_in_flight().await;
    }

    /// The write in flight has stored its records.
    async fn stored(&mut self) {
        let Some(flight) = self.in_flight.take() else {
            return;
        };
        Shared::add(&self.shared.written, flight.count);
        match flight.job {
            Job::Direct {
                records,
                journaled: None,
            } => self.shared.release(&records, true),
            // A slow write that made it after all takes its batch back out of the journal.
            Job::Direct {
                journaled: Some(stretch),
                ..
            }
            | Job::Replay { stretch } => self.commit(stretch).await,
        }
        self.shared
            .sink_rows_left_out
            .store(self.sink.rows_left_out(), Ordering::Relaxed);
        if self.shared.sink_down.swap(false, Ordering::Relaxed) {
            tracing::info!(sink = self.sink.name(), "audit sink stores records again");
        }
        self.backoff = FIRST_BACKOFF;
        self.next_attempt = Instant::now();
    }

    /// The write in flight failed (or was abandoned): its records stay in, or go to, the
    /// journal, and the sink is tried again after a backoff, or after the wait the sink asked
    /// for when that is longer (at most [`MAX_ASKED_WAIT`]).
    async fn failed_write(&mut self, error: &str, retry_after: Option<Duration>) {
        let Some(flight) = self.in_flight.take() else {
            return;
        };
        if !flight.timed_out {
            self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        }
        let wait = retry_after
            .unwrap_or_default()
            .min(MAX_ASKED_WAIT)
            .max(self.backoff);
        tracing::warn!(
            sink = self.sink.name(),
            error,
            records = flight.count,
            retry_in_ms = wait.as_millis(),
            "audit batch not stored"
        );
        self.failed();
        self.next_attempt = Instant::now() + wait;
        if let Job::Direct {
            records,
            journaled: None,
        } = flight.job
        {
            self.spill(records).await;
        }
    }

    /// Marks the sink down and schedules the next attempt.
    fn failed(&mut self) {
        self.shared.sink_down.store(true, Ordering::Relaxed);
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        if self.closed {
            self.failed_since_close = true;
        }
    }

    /// Publishes the writer's state for stats and admission.
    fn publish(&self) {
        let shared = &self.shared;
        let status = self.journal_status;
        shared
            .journal_records
            .store(status.records, Ordering::Relaxed);
        shared.journal_bytes.store(status.bytes, Ordering::Relaxed);
        shared
            .journal_skipped
            .store(status.skipped, Ordering::Relaxed);
        shared.blocked.store(self.held.is_some(), Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{JsonLinesSink, MemorySink};

    /// The `CorrelationId`s of the records of the JSON-lines file at `path`, in order.
    pub(crate) fn correlation_ids(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                serde_json::from_str::<AuditRecord>(line)
                    .unwrap()
                    .correlation_id
            })
            .collect()
    }

    /// A record of a call with id `id` and nothing else; the other modules' tests use it too.
    pub(crate) fn record(id: &str) -> AuditRecord {
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
            time_to_first_token: None,
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_bytes_held_come_back_to_zero_when_everything_is_stored() {
        // Submitters on four threads race the writer: a record's bytes must be counted before
        // the writer can store it and take them off, or the count drifts up for good.
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 64);
        let submitters: Vec<_> = (0..8)
            .map(|t| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    for i in 0..1_500 {
                        let mut record = record(&format!("{t}-{i}"));
                        record.backend_request_body = Some("x".repeat(100));
                        queue.reserve().await.unwrap().submit(record);
                        if i % 2 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for submitter in submitters {
            submitter.await.unwrap();
        }
        drop(queue);
        let stats = writer.finish().await;
        assert_eq!(stats.written, 12_000);
        assert_eq!((stats.depth, stats.depth_bytes), (0, 0));
    }

    /// A sink that stores every record but says it left some rows out of its store (as the
    /// Azure Monitor sink does with a row too large even shortened).
    struct LeavingOut(MemorySink);

    impl AuditSink for LeavingOut {
        fn write_batch<'a>(
            &'a self,
            records: &'a [AuditRecord],
        ) -> futures::future::BoxFuture<'a, Result<(), SinkError>> {
            self.0.write_batch(records)
        }

        fn name(&self) -> &'static str {
            "leaving-out"
        }

        fn rows_left_out(&self) -> u64 {
            3
        }
    }

    #[tokio::test]
    async fn the_rows_a_sink_left_out_are_in_the_stats() {
        let (queue, writer) = AuditQueue::start(Arc::new(LeavingOut(MemorySink::new())), 16);
        assert_eq!(queue.stats().sink_rows_left_out, 0, "before any write");
        queue.reserve().await.unwrap().submit(record("a"));
        drop(queue);
        let stats = writer.finish().await;
        assert_eq!((stats.written, stats.sink_rows_left_out), (1, 3));
    }

    #[tokio::test]
    async fn nul_characters_are_replaced_before_the_record_is_linked() {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 16);
        let mut odd = record("nul");
        odd.api_version = Some("v\0".to_owned());
        odd.backend_response_body = Some("a\0b".to_owned());
        assert!(queue.submit(odd));
        drop(queue);
        writer.finish().await;
        let records = sink.records();
        assert_eq!(records[0].api_version.as_deref(), Some("v\u{FFFD}"));
        assert_eq!(
            records[0].backend_response_body.as_deref(),
            Some("a\u{FFFD}b")
        );
        assert!(crate::chain::verify(records).is_intact());
    }

    /// Lets writes through one at a time, as the test opens the gate; counts the writes begun.
    struct GatedSink {
        gate: tokio::sync::Semaphore,
        started: AtomicU64,
    }

    impl AuditSink for GatedSink {
        fn write_batch<'a>(
            &'a self,
            _records: &'a [AuditRecord],
        ) -> futures::future::BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                self.started.fetch_add(1, Ordering::SeqCst);
                self.gate
                    .acquire()
                    .await
                    .map_err(|error| SinkError::Io(io::Error::other(error)))?
                    .forget();
                Ok(())
            })
        }

        fn name(&self) -> &'static str {
            "gated"
        }
    }

    /// Waits (at most 20 s) until `sink` has begun `writes` writes.
    async fn writes_begun(sink: &GatedSink, writes: u64) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while sink.started.load(Ordering::SeqCst) < writes {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_with_nul_characters_is_released_with_the_bytes_it_was_counted_with() {
        // PCM silence captured in a text answer: 100,000 NULs, each stored as U+FFFD (3 bytes).
        let sink = Arc::new(GatedSink {
            gate: tokio::sync::Semaphore::new(0),
            started: AtomicU64::new(0),
        });
        let settings = QueueSettings {
            capacity: 16,
            sink_timeout: Duration::from_secs(60),
            ..QueueSettings::default()
        };
        let (queue, writer) = AuditQueue::start_with(sink.clone(), settings)
            .await
            .unwrap();
        let mut silence = record("silence");
        silence.backend_response_body = Some("\0".repeat(100_000));
        queue.reserve().await.unwrap().submit(silence);
        writes_begun(&sink, 1).await;
        // Handed over while the record with NULs is being stored, and still held after.
        let mut held = record("held");
        held.backend_request_body = Some("x".repeat(300_000));
        let held_bytes = record_bytes(&held);
        queue.reserve().await.unwrap().submit(held);
        assert!(queue.stats().depth_bytes > held_bytes);
        sink.gate.add_permits(1);
        writes_begun(&sink, 2).await;
        assert_eq!(
            queue.stats().depth_bytes,
            held_bytes,
            "only the record still held weighs"
        );
        sink.gate.add_permits(1);
        drop(queue);
        let stats = writer.finish().await;
        assert_eq!((stats.written, stats.depth, stats.depth_bytes), (2, 0, 0));
    }

    #[tokio::test]
    async fn queue_delivers_every_record_in_order() {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 4096);
        for i in 0..1000 {
            assert!(queue.submit(record(&i.to_string())));
        }
        drop(queue);
        let stats = writer.finish().await;
        let records = sink.records();
        let ids: Vec<_> = records.iter().map(|r| r.correlation_id.clone()).collect();
        assert_eq!(ids, (0..1000).map(|i| i.to_string()).collect::<Vec<_>>());
        assert_eq!((stats.written, stats.depth), (1000, 0));
        assert!(crate::chain::verify(records).is_intact());
    }

    /// Refuses its first write with [`SinkError::Busy`], then stores; notes when each write began.
    struct BusyOnce {
        asked: Duration,
        starts: Mutex<Vec<Instant>>,
        stored: Mutex<Vec<AuditRecord>>,
    }

    impl AuditSink for BusyOnce {
        fn write_batch<'a>(
            &'a self,
            records: &'a [AuditRecord],
        ) -> futures::future::BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                let mut starts = self.starts.lock().unwrap();
                starts.push(Instant::now());
                if starts.len() == 1 {
                    return Err(SinkError::Busy {
                        reason: "429 (test)".to_owned(),
                        retry_after: self.asked,
                    });
                }
                self.stored.lock().unwrap().extend_from_slice(records);
                Ok(())
            })
        }

        fn name(&self) -> &'static str {
            "busy-once"
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sink_that_asks_for_a_wait_is_not_tried_again_before_it() {
        for (asked, expected) in [
            (Duration::from_secs(30), Duration::from_secs(30)),
            // Capped, and never shorter than the queue's own backoff.
            (Duration::from_secs(3600), MAX_ASKED_WAIT),
            (Duration::ZERO, FIRST_BACKOFF),
        ] {
            let sink = Arc::new(BusyOnce {
                asked,
                starts: Mutex::new(Vec::new()),
                stored: Mutex::new(Vec::new()),
            });
            let (queue, writer) = AuditQueue::start(sink.clone(), 16);
            assert!(queue.submit(record("a")));
            tokio::time::sleep(expected + Duration::from_secs(1)).await;
            let starts = sink.starts.lock().unwrap().clone();
            assert_eq!(starts.len(), 2, "asked {asked:?}: tried again once");
            let waited = starts[1] - starts[0];
            assert!(
                waited >= expected && waited < expected + Duration::from_millis(500),
                "asked {asked:?}: tried again after {waited:?}, expected {expected:?}"
            );
            drop(queue);
            writer.finish().await;
            assert_eq!(sink.stored.lock().unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn jsonl_sink_appends_one_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/records.jsonl");
        let sink = JsonLinesSink::open(&path).await.unwrap();
        sink.write_batch(&[record("a"), record("b")]).await.unwrap();
        sink.write_batch(&[record("c")]).await.unwrap();
        assert_eq!(correlation_ids(&path), ["a", "b", "c"]);
    }
}
