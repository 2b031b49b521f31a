//! What packing the audit journal's lines buys and costs: the same records journaled by the audit
//! writer behind a sink that is only slow (plain lines, a record each) and behind a sink that is
//! down (packed lines, compressed together), then replayed into a working sink.
//!
//! The records are [`store_write`](../store_write.rs)'s: chat-completion calls with 2 KB prompts and
//! completions (words drawn from a vocabulary, so they compress less than real conversations,
//! which repeat their system prompts, documents and earlier turns). For each layout the benchmark
//! reports the journal's bytes a record (the size limit holds that many times fewer records),
//! and the writer's CPU a record to link and journal the records and to replay them (the
//! process's user and system time over each phase, from `/proc/self/stat`).
//! Prints a table and the ratios packed / plain, and appends one JSON line to
//! `bench/out/journal_pack-<UTC timestamp>.json`. See `bench/README.md`.
#![expect(clippy::print_stdout, reason = "a benchmark prints its report")]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::future::BoxFuture;
use gatehouse_audit::{AuditQueue, AuditSink, QueueSettings, SinkError};
use gatehouse_bench::proc_stat::{USER_HZ, own_jiffies};
use gatehouse_bench::records::{Generator, TextArgs};
use gatehouse_bench::report::append_result;
use gatehouse_schema::AuditRecord;
use serde_json::json;
use time::OffsetDateTime;

/// Upper bound of `--records`, so that a run stays within a minute or two.
const MAX_RECORDS: usize = 200_000;

/// Journal bytes and CPU a record, plain lines against packed ones.
#[derive(Debug, Parser)]
#[command(name = "journal_pack")]
struct Args {
    /// Records journaled and replayed for each layout, at most 200,000.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    #[command(flatten)]
    text: TextArgs,
    /// Where the JSON result goes.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
}

/// What the sink does with a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// The write does not return until the mode changes: a sink slower than any timeout.
    Stall = 0,
    /// The write fails at once: a sink that is down.
    Fail = 1,
    /// The write succeeds: the records are counted.
    Store = 2,
}

/// A sink the benchmark switches between stalling, failing and storing.
#[derive(Clone, Default)]
struct SwitchSink {
    mode: Arc<AtomicU8>,
    /// Writes begun.
    started: Arc<AtomicU64>,
    stored: Arc<AtomicU64>,
}

impl SwitchSink {
    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }
}

impl AuditSink for SwitchSink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            while self.mode() == Mode::Stall as u8 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if self.mode() == Mode::Fail as u8 {
                return Err(SinkError::Io(std::io::Error::other(
                    "sink down (benchmark)",
                )));
            }
            self.stored
                .fetch_add(records.len() as u64, Ordering::SeqCst);
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "journal_pack"
    }
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Result<Duration> {
    let ticks = own_jiffies().context("no CPU time in /proc/self/stat")?;
    Ok(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// What one layout measured.
struct Layout {
    name: &'static str,
    records: usize,
    journal_bytes: u64,
    journal_seconds: f64,
    journal_cpu: Duration,
    replay_seconds: f64,
    replay_cpu: Duration,
}

impl Layout {
    fn bytes_per_record(&self) -> f64 {
        self.journal_bytes as f64 / self.records as f64
    }

    fn cpu_us(cpu: Duration, records: usize) -> f64 {
        cpu.as_secs_f64() * 1e6 / records as f64
    }
}

/// Waits until `done` holds, or fails at `deadline` saying `what` never happened.
async fn wait_until(
    deadline: Instant,
    layout: &str,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<()> {
    while !done() {
        ensure!(Instant::now() < deadline, "{layout}: never {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Journals `records` behind a sink in `behind` mode (stalling: plain lines; failing: packed
/// ones), then lets the sink store them and replays the journal.
async fn measure(name: &'static str, behind: Mode, records: &[AuditRecord]) -> Result<Layout> {
    let dir = tempfile::tempdir().context("temporary journal directory")?;
    let sink = SwitchSink::default();
    sink.set(behind);
    let (queue, writer) = AuditQueue::start_with(
        Arc::new(sink.clone()),
        QueueSettings {
            journal_dir: Some(dir.path().to_path_buf()),
            journal_max_bytes: 64 << 30,
            // A stalled write must never time out: its sink counts as slow, not down.
            sink_timeout: Duration::from_secs(3_600),
            capacity: 2_048,
            ..QueueSettings::default()
        },
    )
    .await
    .context("start the audit writer")?;

    let total = records.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    let cpu_before = process_cpu()?;
    let started = Instant::now();
    // The sink is slow or down before the records come, as in an outage: the first record's
    // write has begun (and, down, failed) before the others are submitted.
    let (first, rest) = records.split_first().context("no records")?;
    queue
        .reserve()
        .await
        .map_err(|refused| anyhow::anyhow!("no room for a record: {refused:?}"))?
        .submit(first.clone());
    wait_until(deadline, name, "the first write began", || {
        sink.started.load(Ordering::SeqCst) > 0
            && (behind != Mode::Fail || queue.stats().write_errors > 0)
    })
    .await?;
    for record in rest {
        let slot = queue
            .reserve()
            .await
            .map_err(|refused| anyhow::anyhow!("no room for a record: {refused:?}"))?;
        slot.submit(record.clone());
    }
    // Every record in the journal; behind a stalled sink the batch of the write in flight too.
    wait_until(deadline, name, "records all journaled", || {
        queue.stats().journal_records >= total
    })
    .await?;
    let journal_seconds = started.elapsed().as_secs_f64();
    let journal_cpu = process_cpu()?.saturating_sub(cpu_before);
    let journal_bytes = queue.stats().journal_bytes;

    let cpu_before = process_cpu()?;
    let started = Instant::now();
    sink.set(Mode::Store);
    wait_until(deadline, name, "the journal replayed", || {
        queue.stats().journal_records == 0 && sink.stored.load(Ordering::SeqCst) >= total
    })
    .await?;
    let replay_seconds = started.elapsed().as_secs_f64();
    let replay_cpu = process_cpu()?.saturating_sub(cpu_before);
    drop(queue);
    let stats = writer.finish().await;
    ensure!(
        stats.journal_skipped == 0,
        "{name}: {} records skipped",
        stats.journal_skipped
    );
    Ok(Layout {
        name,
        records: records.len(),
        journal_bytes,
        journal_seconds,
        journal_cpu,
        replay_seconds,
        replay_cpu,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.records == 0 || args.records > MAX_RECORDS {
        bail!("--records must be between 1 and {MAX_RECORDS}");
    }
    let started_at = OffsetDateTime::now_utc();
    let shape = args.text.shape(args.records, 400, true);
    let mut generator = Generator::new(&shape, started_at);
    let mut records = generator.batch(0, args.records);
    // The writer links them itself, as it links the gateway's.
    for record in &mut records {
        record.chain = None;
    }
    println!(
        "journal_pack: {} records (prompt {} B, completion {} B, sizes varied), journaled and replayed per layout",
        args.records, args.text.prompt_bytes, args.text.completion_bytes
    );

    let plain = measure("plain (sink slow)", Mode::Stall, &records).await?;
    let packed = measure("packed (sink down)", Mode::Fail, &records).await?;

    println!();
    println!(
        "{:<20} {:>9} {:>10} {:>9} {:>16} {:>15} {:>15}",
        "layout",
        "records",
        "journal MB",
        "B/record",
        "journal CPU µs/r",
        "replay CPU µs/r",
        "journal s"
    );
    for layout in [&plain, &packed] {
        println!(
            "{:<20} {:>9} {:>10.1} {:>9.0} {:>16.1} {:>15.1} {:>15.2}",
            layout.name,
            layout.records,
            layout.journal_bytes as f64 / 1e6,
            layout.bytes_per_record(),
            Layout::cpu_us(layout.journal_cpu, layout.records),
            Layout::cpu_us(layout.replay_cpu, layout.records),
            layout.journal_seconds,
        );
    }
    let capacity = plain.bytes_per_record() / packed.bytes_per_record();
    let journal_cpu = Layout::cpu_us(packed.journal_cpu, packed.records)
        - Layout::cpu_us(plain.journal_cpu, plain.records);
    let replay_cpu = Layout::cpu_us(packed.replay_cpu, packed.records)
        - Layout::cpu_us(plain.replay_cpu, plain.records);
    println!();
    println!("records a journal of the same size holds, packed / plain: {capacity:.2}x");
    println!(
        "CPU a record, packed minus plain: journaling {journal_cpu:+.1} µs, replaying {replay_cpu:+.1} µs"
    );

    let layout_json = |layout: &Layout| {
        json!({
            "layout": layout.name,
            "records": layout.records,
            "journal_bytes": layout.journal_bytes,
            "bytes_per_record": layout.bytes_per_record(),
            "journal_seconds": layout.journal_seconds,
            "journal_cpu_seconds": layout.journal_cpu.as_secs_f64(),
            "replay_seconds": layout.replay_seconds,
            "replay_cpu_seconds": layout.replay_cpu.as_secs_f64(),
        })
    };
    let path = append_result(
        &args.out_dir,
        "journal_pack",
        started_at,
        &json!({
            "benchmark": "journal_pack",
            "started": started_at.to_string(),
            "records": args.records,
            "prompt_bytes": args.text.prompt_bytes,
            "completion_bytes": args.text.completion_bytes,
            "seed": args.text.seed,
            "layouts": [layout_json(&plain), layout_json(&packed)],
            "capacity_ratio": capacity,
            "journal_cpu_us_added": journal_cpu,
            "replay_cpu_us_added": replay_cpu,
        }),
    )?;
    println!("result: {}", path.display());
    Ok(())
}
