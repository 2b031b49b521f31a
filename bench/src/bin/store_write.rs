//! Audit store write throughput: how many audit records per second [`SqlStore::write`] stores on
//! SQLite and on PostgreSQL, with 2 KB prompts and 2 KB completions.
//!
//! The records look like the gateway's: chat-completion calls with the prompt in
//! `RequestMessages` and in `BackendRequestBody`, the completion in `ResponseMessages` and in a
//! `chat.completion` `BackendResponseBody` with usage, varied users, addresses, models, groups and
//! subscriptions, distinct `CorrelationId`s, `TimeGenerated` spread over the last few hours, and
//! hash-chain links as the audit writer sets them. They are written in batches of the gateway
//! queue's size (512) to a fresh SQLite file in a temporary directory and to a fresh PostgreSQL
//! database that the benchmark creates and drops. Every batch is generated and chained before the
//! clock starts; the clock then runs over the `write` calls back to back and the settling of the
//! full-text index's background work ([`SqlStore::settle_search_index`]), so that no work of the
//! store goes unmeasured. One untimed warm-up batch goes first.
//!
//! `--engines postgres,postgres-no-word-index` also measures PostgreSQL with the full-text word
//! index (over blocks of up to 64 calls) replaced by a GIN of one entry a block: a diagnostic of
//! what that index costs the write.
//!
//! Prints one line per engine (records, seconds, records/s, ratio to the target, PASS/FAIL) and
//! appends the whole result as one JSON line to `bench/out/store_write-<UTC timestamp>.json`.
//! See `bench/README.md`.
#![expect(clippy::print_stdout, reason = "a benchmark prints its report")]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use gatehouse_audit::sql::{SqlStore, search_index_path};
use gatehouse_bench::postgres::{database_url, redact};
use gatehouse_bench::proc_stat::{USER_HZ, own_jiffies, process_jiffies};
use gatehouse_bench::records::{Generator, Shape};
use gatehouse_bench::report::{append_result, count_calls};
use gatehouse_schema::AuditRecord;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The issue's target: records per second, on each engine.
const TARGET_RECORDS_PER_SECOND: f64 = 5_000.0;
/// Upper bound of `--records`, so that a run stays within minutes.
const MAX_RECORDS: usize = 200_000;
/// Upper bound of `--batch`.
const MAX_BATCH: usize = 10_000;
/// Hours over which `TimeGenerated` is spread, ending now.
const SPREAD_HOURS: i64 = 3;

/// Audit store write throughput on SQLite and PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "store_write")]
struct Args {
    /// Records to write per engine (timed), at most 200,000.
    #[arg(long, default_value_t = 50_000)]
    records: usize,
    /// Records per `write` call (the gateway queue's batch size is 512).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// PostgreSQL server URL of a user that may create databases; the benchmark creates
    /// `gh_bench_<uuid>` on that server and drops it at the end.
    #[arg(
        long,
        env = "GATEHOUSE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// Engines to measure, comma-separated. `postgres-no-word-index` is a diagnostic: PostgreSQL
    /// without the full-text word index, to show what that index costs (not counted by
    /// `--check`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "sqlite,postgres"
    )]
    engines: Vec<EngineArg>,
    /// Bytes of the prompt (`RequestMessages` JSON).
    #[arg(long, default_value_t = 2048)]
    prompt_bytes: usize,
    /// Bytes of the completion (`ResponseMessages` JSON).
    #[arg(long, default_value_t = 2048)]
    completion_bytes: usize,
    /// Stop an engine after this many seconds of timed writing (the rate is then of what was
    /// written, and the run is marked `stopped_early`).
    #[arg(long, default_value_t = 90)]
    time_limit: u64,
    /// Directory in which the SQLite store's temporary directory is made (default: the system's
    /// temporary directory). Put it on the disk the gateway would use.
    #[arg(long)]
    sqlite_dir: Option<PathBuf>,
    /// Seed of the record generator (both engines get the same records).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the JSON result.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    out_dir: PathBuf,
    /// Exit with status 2 when an engine misses the target (by default the exit status only says
    /// whether the benchmark ran).
    #[arg(long)]
    check: bool,
}

impl Args {
    /// The records this run writes: fixed sizes, 400 users, spread over the last few hours.
    fn shape(&self) -> Shape {
        Shape {
            seed: self.seed,
            records: self.records,
            spread: time::Duration::hours(SPREAD_HOURS),
            prompt_bytes: self.prompt_bytes,
            completion_bytes: self.completion_bytes,
            users: 400,
            vary_sizes: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Sqlite,
    Postgres,
    /// A diagnostic, not a configuration the store offers: PostgreSQL with the full-text word
    /// index (GIN over each call's words) replaced by a GIN of one entry a call, so that the run
    /// shows what the word index costs the write. Searches by text do not work on such a store.
    PostgresNoWordIndex,
}

impl EngineArg {
    fn name(self) -> &'static str {
        match self {
            EngineArg::Sqlite => "sqlite",
            EngineArg::Postgres => "postgres",
            EngineArg::PostgresNoWordIndex => "postgres-no-word-index",
        }
    }
}

/// What one engine did.
#[derive(Debug)]
struct Measurement {
    engine: &'static str,
    records: usize,
    batches: usize,
    /// The timed phase: every batch written back to back, then the full-text index settled.
    write_time: Duration,
    batch_latencies: Vec<Duration>,
    stopped_early: bool,
    /// Rows of `GatehouseGatewayLogs` after the run (warm-up included), counted by the database.
    stored_rows: i64,
    /// Size of the database on disk after the run.
    disk_bytes: u64,
    /// Text bytes of the timed records (prompt, completion and both bodies).
    payload_bytes: u64,
    /// CPU use during the timed phase.
    cpu: CpuUse,
}

impl Measurement {
    fn records_per_second(&self) -> f64 {
        let seconds = self.write_time.as_secs_f64();
        if seconds > 0.0 {
            self.records as f64 / seconds
        } else {
            0.0
        }
    }

    fn ratio(&self) -> f64 {
        self.records_per_second() / TARGET_RECORDS_PER_SECOND
    }

    fn passed(&self) -> bool {
        self.ratio() >= 1.0
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        let mut sorted = self.batch_latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, sorted.len()) - 1;
        sorted[index].as_secs_f64() * 1_000.0
    }

    fn json(&self) -> Value {
        json!({
            "engine": self.engine,
            "records": self.records,
            "batches": self.batches,
            "seconds": self.write_time.as_secs_f64(),
            "records_per_second": self.records_per_second(),
            "ratio_to_target": self.ratio(),
            "pass": self.passed(),
            "stopped_early": self.stopped_early,
            "batch_ms": {
                "p50": self.percentile_ms(50.0),
                "p90": self.percentile_ms(90.0),
                "p99": self.percentile_ms(99.0),
                "max": self.percentile_ms(100.0),
            },
            "stored_rows": self.stored_rows,
            "disk_bytes": self.disk_bytes,
            "payload_bytes": self.payload_bytes,
            "payload_mb_per_second": self.payload_bytes as f64 / 1e6 / self.write_time.as_secs_f64().max(1e-9),
            "cpu": {
                "host_busy": self.cpu.host_busy,
                "host_iowait": self.cpu.host_iowait,
                "bench_process_seconds": self.cpu.bench_seconds,
                "postgres_server_seconds": self.cpu.postgres_seconds,
            },
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(error) => {
            #[expect(clippy::print_stderr, reason = "the benchmark's error message")]
            {
                eprintln!("store_write: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the benchmark; `Ok(false)` when `--check` is given and an engine missed the target.
async fn run(args: &Args) -> Result<bool> {
    ensure!(
        (1..=MAX_RECORDS).contains(&args.records),
        "--records must be between 1 and {MAX_RECORDS}"
    );
    ensure!(
        (1..=MAX_BATCH).contains(&args.batch),
        "--batch must be between 1 and {MAX_BATCH}"
    );
    ensure!(!args.engines.is_empty(), "--engines names no engine");
    ensure!(
        args.prompt_bytes <= 64 * 1024 && args.completion_bytes <= 64 * 1024,
        "--prompt-bytes and --completion-bytes are at most 65536"
    );

    let idle_check = CpuSample::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let load = CpuSample::now().since(&idle_check);
    if let Some(busy) = load.host_busy
        && busy > 0.10
    {
        println!(
            "warning: the machine is {:.0} % busy before the run; figures will be low and noisy",
            busy * 100.0
        );
    }
    let started = OffsetDateTime::now_utc();
    let sample = Generator::new(&args.shape(), started).record(0);
    println!(
        "store_write: {} records per engine in batches of {}, 1 warm-up batch; prompt {} B (RequestMessages), completion {} B (ResponseMessages), request body {} B, response body {} B; target {} records/s",
        args.records,
        args.batch,
        sample.request_messages.as_deref().map_or(0, str::len),
        sample.response_messages.as_deref().map_or(0, str::len),
        sample.backend_request_body.as_deref().map_or(0, str::len),
        sample.backend_response_body.as_deref().map_or(0, str::len),
        TARGET_RECORDS_PER_SECOND,
    );

    let mut results = Vec::new();
    for engine in dedup(&args.engines) {
        println!("{}: writing…", engine.name());
        let run = async {
            match engine {
                EngineArg::Sqlite => run_sqlite(args, started).await,
                EngineArg::Postgres | EngineArg::PostgresNoWordIndex => {
                    run_postgres(args, started, engine).await
                }
            }
        };
        let measurement = run
            .await
            .with_context(|| format!("{} benchmark failed", engine.name()))?;
        results.push(measurement);
    }

    println!();
    println!(
        "{:<22} {:>8} {:>8} {:>10} {:>6} {:>6} {:>12} {:>12} {:>9} {:>8}",
        "engine",
        "records",
        "seconds",
        "records/s",
        "ratio",
        "target",
        "batch p50 ms",
        "batch p99 ms",
        "MB/s in",
        "MB disk"
    );
    for m in &results {
        println!(
            "{:<22} {:>8} {:>8.2} {:>10.0} {:>6.2} {:>6} {:>12.1} {:>12.1} {:>9.1} {:>8.1}{}",
            m.engine,
            m.records,
            m.write_time.as_secs_f64(),
            m.records_per_second(),
            m.ratio(),
            if m.passed() { "PASS" } else { "FAIL" },
            m.percentile_ms(50.0),
            m.percentile_ms(99.0),
            m.payload_bytes as f64 / 1e6 / m.write_time.as_secs_f64().max(1e-9),
            m.disk_bytes as f64 / 1e6,
            if m.stopped_early {
                "  (stopped at --time-limit)"
            } else {
                ""
            },
        );
    }
    println!();
    println!(
        "{:<22} {:>11} {:>9} {:>10} {:>14} {:>14}",
        "engine", "wall s", "host busy", "io wait", "bench CPU s", "postgres CPU s"
    );
    let share = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.0} %", v * 100.0));
    let seconds = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for m in &results {
        println!(
            "{:<22} {:>11.2} {:>9} {:>10} {:>14} {:>14}",
            m.engine,
            m.write_time.as_secs_f64(),
            share(m.cpu.host_busy),
            share(m.cpu.host_iowait),
            seconds(m.cpu.bench_seconds),
            seconds(m.cpu.postgres_seconds),
        );
    }
    println!(
        "(over the timed phase; the machine has {} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if let [first, rest @ ..] = results.as_slice() {
        for other in rest {
            println!(
                "{} / {} records/s: {:.2}",
                other.engine,
                first.engine,
                other.records_per_second() / first.records_per_second().max(1e-9)
            );
        }
    }

    let path = write_json(args, started, &sample, &results)?;
    println!("result: {}", path.display());

    // The diagnostic engine is not the store as it ships, so it has no target to miss.
    let diagnostic = EngineArg::PostgresNoWordIndex.name();
    Ok(!(args.check
        && results
            .iter()
            .any(|m| m.engine != diagnostic && !m.passed())))
}

fn dedup(engines: &[EngineArg]) -> Vec<EngineArg> {
    let mut out = Vec::new();
    for engine in engines {
        if !out.contains(engine) {
            out.push(*engine);
        }
    }
    out
}

/// SQLite: a fresh file in a temporary directory, removed at the end.
async fn run_sqlite(args: &Args, started: OffsetDateTime) -> Result<Measurement> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("gh_bench_");
    let dir = match &args.sqlite_dir {
        Some(parent) => builder.tempdir_in(parent),
        None => builder.tempdir(),
    }
    .context("create a temporary directory for the SQLite store")?;
    let file = dir.path().join("audit.db");
    let url = format!("sqlite:{}", file.display());
    let store = SqlStore::open(&url)
        .await
        .context("open the SQLite store")?;
    let result = tokio::select! {
        result = measure(&store, "sqlite", args, started) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    store.close().await;
    let mut measurement = result?;
    // The store's file and its full-text index's, each with its write-ahead log and shared memory.
    measurement.disk_bytes = [file.clone(), search_index_path(&file)]
        .into_iter()
        .flat_map(|name| {
            ["", "-wal", "-shm"].map(|suffix| {
                let mut name = name.clone().into_os_string();
                name.push(suffix);
                name
            })
        })
        .filter_map(|name| std::fs::metadata(name).ok())
        .map(|m| m.len())
        .sum();
    drop(dir);
    Ok(measurement)
}

/// PostgreSQL: a database `gh_bench_<uuid>` created for the run and dropped at its end, whether
/// the run worked, failed or was interrupted.
///
/// For [`EngineArg::PostgresNoWordIndex`] the full-text word index is swapped for a GIN of one
/// entry a block before the first write ([`replace_word_index`]).
async fn run_postgres(
    args: &Args,
    started: OffsetDateTime,
    engine: EngineArg,
) -> Result<Measurement> {
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&args.postgres_url)
        .await
        .with_context(|| format!("connect to PostgreSQL ({})", redact(&args.postgres_url)))?;
    // The name comes from a UUID, never from input.
    let database = format!("gh_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&admin)
        .await
        .with_context(|| format!("create database {database}"))?;
    let url = database_url(&args.postgres_url, &database)?;

    let run = async {
        let store = SqlStore::open(&url)
            .await
            .context("open the PostgreSQL store")?;
        if engine == EngineArg::PostgresNoWordIndex {
            replace_word_index(&store).await?;
        }
        let result = measure(&store, engine.name(), args, started).await;
        let size = match (&result, store.postgres_pool()) {
            (Ok(_), Some(pool)) => {
                sqlx::query_scalar::<_, i64>("SELECT pg_database_size(current_database())")
                    .fetch_one(pool)
                    .await
                    .ok()
            }
            _ => None,
        };
        store.close().await;
        let mut measurement = result?;
        measurement.disk_bytes = size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
        Ok::<_, anyhow::Error>(measurement)
    };
    let result = tokio::select! {
        result = run => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    // WITH (FORCE) ends any connection the run left behind (an error path, an interrupt).
    let dropped = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await;
    admin.close().await;
    match (result, dropped) {
        (Ok(measurement), Ok(_)) => Ok(measurement),
        (Ok(_), Err(error)) => {
            Err(error).with_context(|| format!("drop database {database} (drop it by hand)"))
        }
        (Err(error), Ok(_)) => Err(error),
        (Err(error), Err(drop_error)) => Err(error.context(format!(
            "and dropping database {database} failed too (drop it by hand): {drop_error}"
        ))),
    }
}

/// Writes one warm-up batch, then `--records` records in batches, timing each `write` call only.
async fn measure(
    store: &SqlStore,
    engine: &'static str,
    args: &Args,
    started: OffsetDateTime,
) -> Result<Measurement> {
    let mut generator = Generator::new(&args.shape(), started);

    let warm_up = generator.batch(0, args.batch.min(args.records));
    let stored = store.write(&warm_up).await.context("warm-up batch")?;
    ensure!(
        stored == warm_up.len(),
        "warm-up stored {stored} of {}",
        warm_up.len()
    );
    drop(warm_up);

    // Every batch is made before the clock starts, so that the timed phase has no pause in
    // which the store's background work (SQLite's checkpoints, PostgreSQL's full-text merges)
    // would run unmeasured.
    let mut batches = Vec::with_capacity(args.records.div_ceil(args.batch));
    let mut made = 0;
    while made < args.records {
        let size = args.batch.min(args.records - made);
        batches.push(generator.batch(made, size));
        made += size;
    }

    let limit = Duration::from_secs(args.time_limit);
    let mut batch_latencies = Vec::with_capacity(batches.len());
    let mut written = 0;
    let mut payload_bytes = 0u64;
    let mut stopped_early = false;
    let cpu_before = CpuSample::now();
    let wall = Instant::now();
    for batch in batches {
        let size = batch.len();
        let clock = Instant::now();
        let stored = store.write(&batch).await;
        let elapsed = clock.elapsed();

        let stored = stored.with_context(|| format!("batch at record {written}"))?;
        ensure!(
            stored == size,
            "batch at record {written}: stored {stored} of {size} (duplicate CorrelationIds?)"
        );
        payload_bytes += batch.iter().map(payload_len).sum::<u64>();
        batch_latencies.push(elapsed);
        written += size;
        if wall.elapsed() >= limit && written < args.records {
            stopped_early = true;
            break;
        }
    }
    // The full-text index's background work for these batches is part of writing them.
    store
        .settle_search_index()
        .await
        .context("settling the full-text index")?;
    let write_time = wall.elapsed();
    let cpu = CpuSample::now().since(&cpu_before);

    let stored_rows = count_calls(store).await?;
    let expected = written + args.batch.min(args.records);
    ensure!(
        usize::try_from(stored_rows).ok() == Some(expected),
        "the store holds {stored_rows} call rows, expected {expected}"
    );
    Ok(Measurement {
        engine,
        records: written,
        batches: batch_latencies.len(),
        write_time,
        batch_latencies,
        stopped_early,
        stored_rows,
        disk_bytes: 0,
        payload_bytes,
        cpu,
    })
}

fn payload_len(record: &AuditRecord) -> u64 {
    [
        &record.request_messages,
        &record.response_messages,
        &record.backend_request_body,
        &record.backend_response_body,
    ]
    .iter()
    .map(|text| text.as_deref().map_or(0, str::len) as u64)
    .sum()
}

fn write_json(
    args: &Args,
    started: OffsetDateTime,
    sample: &AuditRecord,
    results: &[Measurement],
) -> Result<PathBuf> {
    let line = json!({
        "bench": "store_write",
        "started": started.format(&time::format_description::well_known::Rfc3339)?,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "records": args.records,
        "batch": args.batch,
        "warm_up_batches": 1,
        "time_limit_seconds": args.time_limit,
        "seed": args.seed,
        "record_bytes": {
            "request_messages": sample.request_messages.as_deref().map_or(0, str::len),
            "response_messages": sample.response_messages.as_deref().map_or(0, str::len),
            "backend_request_body": sample.backend_request_body.as_deref().map_or(0, str::len),
            "backend_response_body": sample.backend_response_body.as_deref().map_or(0, str::len),
        },
        "target_records_per_second": TARGET_RECORDS_PER_SECOND,
        "engines": results.iter().map(Measurement::json).collect::<Vec<_>>(),
    });
    append_result(&args.out_dir, "store_write", started, &line)
}

// ---------------------------------------------------------------------------------------------
// CPU accounting (Linux /proc; absent elsewhere)
// ---------------------------------------------------------------------------------------------

/// Counters read from `/proc` at one instant.
#[derive(Debug, Clone, Default)]
struct CpuSample {
    /// `(busy, iowait, total)` jiffies of the whole machine, from `/proc/stat`.
    host: Option<(u64, u64, u64)>,
    /// utime + stime of this process (all threads: SQLite runs in them).
    bench: Option<u64>,
    /// utime + stime of every process named `postgres` (the local server), by pid.
    postgres: Vec<(u32, u64)>,
}

/// CPU used between two samples.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    /// Share of the machine's CPU time that was busy (not idle, not waiting for I/O).
    host_busy: Option<f64>,
    /// Share of the machine's CPU time spent idle waiting for I/O.
    host_iowait: Option<f64>,
    /// CPU seconds of this process.
    bench_seconds: Option<f64>,
    /// CPU seconds of the local PostgreSQL server's processes.
    postgres_seconds: Option<f64>,
}

impl CpuSample {
    fn now() -> CpuSample {
        CpuSample {
            host: host_jiffies(),
            bench: own_jiffies(),
            postgres: postgres_jiffies(),
        }
    }

    fn since(&self, before: &CpuSample) -> CpuUse {
        let host = match (before.host, self.host) {
            (Some((b0, w0, t0)), Some((b1, w1, t1))) if t1 > t0 => {
                let total = (t1 - t0) as f64;
                Some((
                    b1.saturating_sub(b0) as f64 / total,
                    w1.saturating_sub(w0) as f64 / total,
                ))
            }
            _ => None,
        };
        let bench = match (before.bench, self.bench) {
            (Some(b0), Some(b1)) => Some(b1.saturating_sub(b0) as f64 / USER_HZ),
            _ => None,
        };
        let postgres = (!self.postgres.is_empty()).then(|| {
            let jiffies: u64 = self
                .postgres
                .iter()
                .map(|(pid, now)| {
                    let then = before
                        .postgres
                        .iter()
                        .find(|(p, _)| p == pid)
                        .map_or(0, |(_, j)| *j);
                    now.saturating_sub(then)
                })
                .sum();
            jiffies as f64 / USER_HZ
        });
        CpuUse {
            host_busy: host.map(|(busy, _)| busy),
            host_iowait: host.map(|(_, iowait)| iowait),
            bench_seconds: bench,
            postgres_seconds: postgres,
        }
    }
}

/// `(busy, iowait, total)` jiffies from the `cpu` line of `/proc/stat`.
fn host_jiffies() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = values.iter().take(8).sum();
    let idle = *values.get(3)?;
    let iowait = values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle + iowait), iowait, total))
}

fn postgres_jiffies() -> Vec<(u32, u64)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (comm, jiffies) = process_jiffies(&stat)?;
            (comm == "postgres").then_some((pid, jiffies))
        })
        .collect()
}

/// Replaces the full-text word index of a freshly migrated PostgreSQL store (GIN over the
/// `"Words"` of each block of calls, one entry per distinct word of a block) by a GIN over the
/// block's `"BlockId"` alone (one entry a block), keeping its name, so that the store's
/// background merge and its settling find it and merge its pending list as before.
async fn replace_word_index(store: &SqlStore) -> Result<()> {
    let pool = store
        .postgres_pool()
        .context("the PostgreSQL store has no pool")?;
    let mut tx = pool.begin().await?;
    sqlx::query(r#"DROP INDEX "GatehouseSearchBlocks_Words""#)
        .execute(&mut *tx)
        .await
        .context("drop the word index")?;
    sqlx::query(
        r#"CREATE INDEX "GatehouseSearchBlocks_Words" ON "GatehouseSearchBlocks" USING GIN ((ARRAY["BlockId"]))"#,
    )
    .execute(&mut *tx)
    .await
    .context("create the one-entry index")?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_have_the_asked_sizes_and_distinct_ids() {
        let args = Args::parse_from(["store_write"]);
        let mut generator = Generator::new(&args.shape(), OffsetDateTime::now_utc());
        let batch = generator.batch(0, 100);
        let ids: std::collections::HashSet<_> =
            batch.iter().map(|r| r.correlation_id.clone()).collect();
        assert_eq!(ids.len(), 100);
        for record in &batch {
            let prompt = record.request_messages.as_deref().unwrap();
            let completion = record.response_messages.as_deref().unwrap();
            assert!((2_040..=2_060).contains(&prompt.len()), "{}", prompt.len());
            assert!(
                (2_040..=2_060).contains(&completion.len()),
                "{}",
                completion.len()
            );
            let body: Value =
                serde_json::from_str(record.backend_response_body.as_deref().unwrap()).unwrap();
            assert_eq!(body["object"], "chat.completion");
            assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 500);
            assert!(record.chain.is_some());
        }
    }
}
