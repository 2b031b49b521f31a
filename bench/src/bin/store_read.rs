//! Audit store reads at scale: fills a store with realistic records (10 million by default, spread
//! over 30 days) and times the read API the portal uses against the audit-store issue's targets:
//!
//! | query | target (p95) |
//! |---|---|
//! | usage for 30 days by model, by group (hourly rollups) | 300 ms |
//! | search by user, by caller IP, over 7 days (first page of 50) | 300 ms |
//! | full-text search of prompt and completion | 1.5 s |
//! | one record in full | 20 ms |
//! | export of 100,000 rows | flat memory (RSS growth reported) |
//!
//! The fill goes through [`SqlStore::write`], the gateway's own write path, in batches. Records
//! older than `--content-days` are written without bodies and messages, as content retention
//! leaves them (metadata kept 30 days, content 7 by default); that keeps 10 million records on
//! one disk. A store can be kept (`--keep`) and measured again without filling it twice: pass
//! the same `--sqlite-path` or `--postgres-database` and the fill is skipped when the store holds
//! the records already. Prints one line per query and appends the result as one JSON line to
//! `bench/out/store_read-<UTC timestamp>.json`. With `--rebuild-search-index` (SQLite) it then
//! deletes the store's full-text index file and times the rebuild from the LLM log, as after a
//! lost or deleted index. See `bench/README.md`.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a benchmark prints its report and its errors"
)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use gatehouse_audit::AuditRecord;
use gatehouse_audit::sql::rollup::{Dimension, Granularity};
use gatehouse_audit::sql::{SearchFilter, SqlStore, UsageQuery, search_index_path};
use gatehouse_bench::postgres::{database_url, redact};
use gatehouse_bench::records::{GROUPS, Generator, Rng, Shape, caller_ip, user_name};
use gatehouse_bench::report::{append_result, calls_held};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// Upper bound of `--records`.
const MAX_RECORDS: usize = 20_000_000;
/// Days the records span, ending now.
const SPAN_DAYS: i64 = 30;
/// Rows an export reads.
const EXPORT_ROWS: usize = 100_000;

/// Audit store read latency on a store of millions of records.
#[derive(Debug, Parser)]
#[command(name = "store_read")]
struct Args {
    /// Engine to measure.
    #[arg(long, value_enum, default_value = "sqlite")]
    engine: EngineArg,
    /// Records in the store (filled when it holds fewer), at most 20,000,000.
    #[arg(long, default_value_t = 10_000_000)]
    records: usize,
    /// Records per `write` call while filling.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Page cache of the SQLite store's writer, MiB (the gateway's default is 64). A larger one
    /// fills a large store faster: fewer index pages read back from the file.
    #[arg(long, default_value_t = gatehouse_audit::sql::DEFAULT_SQLITE_WRITER_CACHE_MIB)]
    sqlite_cache_mib: u32,
    /// Records older than this many days carry no content (bodies, prompt, completion), as
    /// content retention leaves them.
    #[arg(long, default_value_t = 7)]
    content_days: i64,
    /// Mean bytes of a prompt (each varies between a quarter and 1.75 times it).
    #[arg(long, default_value_t = 1_200)]
    prompt_bytes: usize,
    /// Mean bytes of a completion.
    #[arg(long, default_value_t = 800)]
    completion_bytes: usize,
    /// Distinct users.
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// Timed runs of each query (each with other parameters).
    #[arg(long, default_value_t = 40)]
    samples: usize,
    /// Stop filling after this many minutes (the reads then run on what was written).
    #[arg(long, default_value_t = 180)]
    fill_minutes: u64,
    /// SQLite file of the store (default: a temporary directory, removed unless `--keep`).
    #[arg(long)]
    sqlite_path: Option<PathBuf>,
    /// PostgreSQL server URL of a user that may create databases.
    #[arg(
        long,
        env = "GATEHOUSE_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    /// PostgreSQL database of the store (default: `gh_read_<uuid>`, dropped unless `--keep`).
    /// Letters, digits and `_` only.
    #[arg(long)]
    postgres_database: Option<String>,
    /// Keep the store after the run (to measure it again without filling it).
    #[arg(long)]
    keep: bool,
    /// Seed of the record generator and of the query parameters.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Directory for the JSON result.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    out_dir: PathBuf,
    /// Exit with status 2 when a query misses its target.
    #[arg(long)]
    check: bool,
    /// SQLite: after the queries, delete the store's full-text index file (`<file>-search`) and
    /// time its rebuild from the LLM log, then check that searches find the same calls.
    #[arg(long)]
    rebuild_search_index: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    Sqlite,
    Postgres,
}

impl Args {
    fn shape(&self) -> Shape {
        Shape {
            seed: self.seed,
            records: self.records,
            spread: time::Duration::days(SPAN_DAYS),
            prompt_bytes: self.prompt_bytes,
            completion_bytes: self.completion_bytes,
            users: self.users,
            vary_sizes: true,
        }
    }
}

/// The timings of one query.
#[derive(Debug)]
struct QueryTiming {
    name: &'static str,
    target: Duration,
    samples: Vec<Duration>,
    /// Rows the query returned, summed over the samples (shows that it found something).
    rows: usize,
}

impl QueryTiming {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn passed(&self) -> bool {
        self.percentile(95.0) <= self.target
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(error) => {
            eprintln!("store_read: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<bool> {
    ensure!(
        (1..=MAX_RECORDS).contains(&args.records),
        "--records must be 1..={MAX_RECORDS}"
    );
    ensure!(
        (1..=10_000).contains(&args.batch),
        "--batch must be 1..=10000"
    );
    ensure!(args.samples >= 1, "--samples must be at least 1");
    ensure!(
        (0..=SPAN_DAYS).contains(&args.content_days),
        "--content-days must be 0..={SPAN_DAYS}"
    );
    ensure!(
        !args.rebuild_search_index || args.engine == EngineArg::Sqlite,
        "--rebuild-search-index: SQLite only (PostgreSQL's index is in its own tables)"
    );
    let started = OffsetDateTime::now_utc();
    match args.engine {
        EngineArg::Sqlite => {
            let (dir, path) = match &args.sqlite_path {
                Some(path) => (None, path.clone()),
                None => {
                    let dir = tempfile::Builder::new()
                        .prefix("gh_read_")
                        .tempdir()
                        .context("create a temporary directory")?;
                    let path = dir.path().join("audit.db");
                    (Some(dir), path)
                }
            };
            let store = SqlStore::open_with_cache(
                &format!("sqlite:{}", path.display()),
                args.sqlite_cache_mib,
            )
            .await
            .context("open the SQLite store")?;
            let result = match measure(&store, args, "sqlite", started).await {
                Ok(passed) if args.rebuild_search_index => {
                    rebuild_search_index(store, &path, args, started)
                        .await
                        .map(|()| passed)
                }
                other => {
                    store.close().await;
                    other
                }
            };
            match dir {
                Some(dir) if args.keep => {
                    let kept = dir.keep();
                    println!("kept: {}", kept.join("audit.db").display());
                }
                _ => {}
            }
            result
        }
        EngineArg::Postgres => run_postgres(args, started).await,
    }
}

async fn run_postgres(args: &Args, started: OffsetDateTime) -> Result<bool> {
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.postgres_url)
        .await
        .with_context(|| format!("connect to PostgreSQL ({})", redact(&args.postgres_url)))?;
    let database = match &args.postgres_database {
        Some(name) => {
            ensure!(
                !name.is_empty()
                    && name.len() <= 63
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "--postgres-database: letters, digits and _ only (at most 63)"
            );
            name.clone()
        }
        None => format!("gh_read_{}", uuid::Uuid::new_v4().simple()),
    };
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&database)
            .fetch_one(&admin)
            .await?;
    if !exists {
        // The name is checked above (or made from a UUID): letters, digits and `_`.
        sqlx::query(&format!("CREATE DATABASE \"{database}\""))
            .execute(&admin)
            .await
            .with_context(|| format!("create database {database}"))?;
    }
    let url = database_url(&args.postgres_url, &database)?;
    let result = async {
        let store = SqlStore::open(&url)
            .await
            .context("open the PostgreSQL store")?;
        let result = measure(&store, args, "postgres", started).await;
        store.close().await;
        result
    }
    .await;
    if args.keep {
        println!("kept: database {database}");
    } else {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .execute(&admin)
        .await
        .with_context(|| format!("drop database {database} (drop it by hand)"))?;
    }
    admin.close().await;
    result
}

async fn measure(
    store: &SqlStore,
    args: &Args,
    engine: &'static str,
    started: OffsetDateTime,
) -> Result<bool> {
    let held = calls_held(store).await?;
    let fill = if held < args.records as i64 {
        Some(fill(store, args, held as usize, started).await?)
    } else {
        println!("store holds {held} records: no fill");
        None
    };
    // A store that just took millions of rows has stale planner statistics until autovacuum
    // (PostgreSQL) or an operator (SQLite past a million calls) refreshes them: refresh them now,
    // as a store in steady use has them. A kept store measured again keeps the ones it has.
    if fill.is_some() {
        if let Some(pool) = store.postgres_pool() {
            sqlx::query("ANALYZE")
                .execute(pool)
                .await
                .context("ANALYZE")?;
        } else {
            // As `gatehouse-gateway analyze-audit` does; the store refreshes them itself only up to
            // PLANNER_REFRESH_MAX_CALLS.
            let refresh = Instant::now();
            store
                .refresh_planner_statistics(i64::MAX)
                .await
                .context("ANALYZE")?;
            println!(
                "planner statistics refreshed in {:.1} s (a full ANALYZE)",
                refresh.elapsed().as_secs_f64()
            );
        }
    }
    let total = calls_held(store).await?;
    let now = OffsetDateTime::now_utc();
    let mut rng = Rng(args.seed ^ 0x5EED);
    let mut timings = Vec::new();

    for dimension in [Dimension::Model, Dimension::Group] {
        let name = match dimension {
            Dimension::Model => "usage 30 days by model",
            _ => "usage 30 days by group",
        };
        let mut timing = QueryTiming {
            name,
            target: Duration::from_millis(300),
            samples: Vec::new(),
            rows: 0,
        };
        for i in 0..args.samples {
            // A team lead's view (some groups) every other run, an admin's (all) otherwise.
            let only = (dimension == Dimension::Group && i % 2 == 1)
                .then(|| vec![(*rng.pick(GROUPS)).to_owned()]);
            let query = UsageQuery {
                granularity: Granularity::Hour,
                dimension,
                from: now - time::Duration::days(SPAN_DAYS),
                to: now,
                only,
            };
            let clock = Instant::now();
            let points = store.usage(&query).await?;
            timing.samples.push(clock.elapsed());
            timing.rows += points.len();
        }
        timings.push(timing);
    }

    let week = |filter: &mut SearchFilter| {
        filter.from = now - time::Duration::days(7);
        filter.to = now;
    };
    let mut by_user = QueryTiming {
        name: "search by user, 7 days",
        target: Duration::from_millis(300),
        samples: Vec::new(),
        rows: 0,
    };
    let mut by_ip = QueryTiming {
        name: "search by caller IP, 7 days",
        target: Duration::from_millis(300),
        samples: Vec::new(),
        rows: 0,
    };
    let mut ids = Vec::new();
    for _ in 0..args.samples {
        let user = rng.below(args.users);
        let mut filter = SearchFilter::between(now, now);
        week(&mut filter);
        filter.user = Some(user_name(user));
        let clock = Instant::now();
        let page = store.search(&filter).await?;
        by_user.samples.push(clock.elapsed());
        by_user.rows += page.items.len();
        if let Some(call) = page.items.get(rng.below(page.items.len().max(1))) {
            ids.push(call.correlation_id.clone());
        }

        let mut filter = SearchFilter::between(now, now);
        week(&mut filter);
        let address = caller_ip(rng.below(args.users));
        let address: std::net::IpAddr = address.parse().context("generated address")?;
        filter.caller = Some(ipnet::IpNet::from(address));
        let clock = Instant::now();
        let page = store.search(&filter).await?;
        by_ip.samples.push(clock.elapsed());
        by_ip.rows += page.items.len();
    }
    timings.push(by_user);
    timings.push(by_ip);

    let mut by_network = QueryTiming {
        name: "search by caller network /16, 7 days",
        target: Duration::from_millis(300),
        samples: Vec::new(),
        rows: 0,
    };
    for _ in 0..args.samples {
        let mut filter = SearchFilter::between(now, now);
        week(&mut filter);
        filter.caller = Some(
            format!("10.{}.0.0/16", 20 + rng.below(8))
                .parse()
                .context("network")?,
        );
        let clock = Instant::now();
        let page = store.search(&filter).await?;
        by_network.samples.push(clock.elapsed());
        by_network.rows += page.items.len();
    }
    timings.push(by_network);

    // Full text: a rare term (an invoice number) and two common words, over the content window.
    let mut full_text = QueryTiming {
        name: "full-text search, content window",
        target: Duration::from_millis(1_500),
        samples: Vec::new(),
        rows: 0,
    };
    let probes = probe_terms(store, args, now).await?;
    for i in 0..args.samples {
        let mut filter = SearchFilter::between(now - time::Duration::days(args.content_days), now);
        filter.text = Some(if i % 2 == 0 {
            probes[rng.below(probes.len())].clone()
        } else {
            [
                "invoice supplier",
                "refund escalation",
                "database latency",
                "budget forecast",
            ][rng.below(4)]
            .to_owned()
        });
        let clock = Instant::now();
        let page = store.search(&filter).await?;
        full_text.samples.push(clock.elapsed());
        full_text.rows += page.items.len();
    }
    timings.push(full_text);

    let mut one = QueryTiming {
        name: "one record in full",
        target: Duration::from_millis(20),
        samples: Vec::new(),
        rows: 0,
    };
    ensure!(
        !ids.is_empty(),
        "no search by user found a call: is the store empty?"
    );
    for i in 0..args.samples {
        let id = &ids[i % ids.len()];
        let clock = Instant::now();
        let call = store.call(id).await?;
        one.samples.push(clock.elapsed());
        one.rows += usize::from(call.is_some());
    }
    timings.push(one);

    let export = export(store, now).await?;

    print_report(engine, total, fill.as_ref(), &timings, &export);
    write_json(
        args,
        engine,
        started,
        total,
        fill.as_ref(),
        &timings,
        &export,
    )?;
    let all_passed = timings.iter().all(QueryTiming::passed);
    Ok(all_passed || !args.check)
}

/// How the fill went.
#[derive(Debug)]
struct Fill {
    records: usize,
    elapsed: Duration,
    stopped_early: bool,
}

/// Writes records `from..args.records` through the store's write path, printing progress.
async fn fill(store: &SqlStore, args: &Args, from: usize, started: OffsetDateTime) -> Result<Fill> {
    // A PostgreSQL store in steady use has a partition for each day: its daily maintenance makes
    // the next days' before they begin. Back-dated records would otherwise all land in the
    // DEFAULT partition. Nothing to do on SQLite.
    let span = time::Duration::days(SPAN_DAYS);
    store
        .create_partitions((started - span).date(), started.date())
        .await
        .context("create the day partitions of the fill")?;
    let shape = args.shape();
    let mut generator = Generator::new(&shape, started);
    let content_cutoff = started - time::Duration::days(args.content_days);
    let (records, batch_size) = (args.records, args.batch);
    // The records are made on a thread of their own while the store writes the previous batch
    // (generating and hash-chaining a batch takes about as long as writing it), two batches ahead.
    let (batches, mut ready) = tokio::sync::mpsc::channel::<Vec<AuditRecord>>(2);
    let generating = std::thread::spawn(move || {
        // Skip the records the store already holds (same seed: the same sequence, and the same
        // hash chain).
        let mut skipped = 0;
        while skipped < from {
            let size = batch_size.min(from - skipped);
            generator.batch(skipped, size);
            skipped += size;
        }
        let mut made = from;
        while made < records {
            let size = batch_size.min(records - made);
            let mut batch = generator.batch(made, size);
            for record in &mut batch {
                if record.time_generated < content_cutoff {
                    record.backend_request_body = None;
                    record.backend_response_body = None;
                    record.request_messages = None;
                    record.response_messages = None;
                }
            }
            made += size;
            if batches.blocking_send(batch).is_err() {
                break; // the writer stopped
            }
        }
    });
    let clock = Instant::now();
    let limit = Duration::from_secs(args.fill_minutes * 60);
    let mut written = from;
    let mut last_report = Instant::now();
    let mut stopped_early = false;
    println!(
        "filling {} records ({} held) into the store ...",
        args.records, from
    );
    while let Some(batch) = ready.recv().await {
        let size = batch.len();
        let stored = store
            .write(&batch)
            .await
            .with_context(|| format!("batch at record {written}"))?;
        ensure!(
            stored == size,
            "batch at record {written}: stored {stored} of {size}"
        );
        written += size;
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            let done = written - from;
            let rate = done as f64 / clock.elapsed().as_secs_f64();
            println!(
                "  {written} records, {rate:.0}/s, about {:.0} min to go",
                (args.records - written) as f64 / rate.max(1.0) / 60.0
            );
        }
        if clock.elapsed() >= limit && written < args.records {
            stopped_early = true;
            println!("  stopped at --fill-minutes with {written} records");
            break;
        }
    }
    drop(ready);
    generating
        .join()
        .map_err(|_| anyhow::anyhow!("the record generator panicked"))?;
    ensure!(
        stopped_early || written == args.records,
        "the generator stopped at record {written} of {}",
        args.records
    );
    Ok(Fill {
        records: written - from,
        elapsed: clock.elapsed(),
        stopped_early,
    })
}

/// Deletes the full-text index file of the SQLite store at `path` and times its rebuild: the store
/// opened again finds its index behind and catches up from the LLM log in the background
/// (`audit/src/sql/search_index.rs`); [`SqlStore::settle_search_index`] waits for the end. The
/// same searches must then find the same calls. Closes the store.
async fn rebuild_search_index(
    store: SqlStore,
    path: &Path,
    args: &Args,
    started: OffsetDateTime,
) -> Result<()> {
    let now = OffsetDateTime::now_utc();
    let mut texts = probe_terms(&store, args, now).await?;
    texts.extend(["invoice supplier", "budget forecast"].map(str::to_owned));
    let window = SearchFilter::between(now - time::Duration::days(args.content_days), now);
    let found_before = searches(&store, &window, &texts).await?;
    let before = indexed(&store).await?;
    let total = calls_held(&store).await?;
    store.close().await;

    let file = search_index_path(path).into_os_string();
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.clone();
        name.push(suffix);
        match std::fs::remove_file(&name) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error).with_context(|| format!("remove {}", name.display()));
            }
        }
    }
    println!(
        "full-text index file deleted ({} calls with text); rebuilding it ...",
        before.1
    );
    let clock = Instant::now();
    let store =
        SqlStore::open_with_cache(&format!("sqlite:{}", path.display()), args.sqlite_cache_mib)
            .await
            .context("open the SQLite store again")?;
    store.settle_search_index().await?;
    let elapsed = clock.elapsed();
    let after = indexed(&store).await?;
    let found_after = searches(&store, &window, &texts).await?;
    store.close().await;
    ensure!(
        after == before,
        "the rebuilt index holds (IndexedThrough, calls) {after:?}, the deleted one {before:?}"
    );
    ensure!(
        found_after == found_before,
        "the same searches found other calls after the rebuild"
    );
    let rate = after.1 as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "full-text index rebuilt from the LLM log: {} calls with text ({total} in the store) in {:.1} s, {rate:.0} calls/s; {} searches find the same calls",
        after.1,
        elapsed.as_secs_f64(),
        found_after.len()
    );
    let path = append_result(
        &args.out_dir,
        "store_read",
        started,
        &json!({
            "benchmark": "store_read_rebuild_search_index",
            "engine": "sqlite",
            "records": total,
            "calls_with_text": after.1,
            "seconds": elapsed.as_secs_f64(),
            "calls_per_second": rate,
            "searches_compared": found_after.len(),
        }),
    )?;
    println!("result: {}", path.display());
    Ok(())
}

/// The calls each full-text search of `texts` finds in `window`, in order.
async fn searches(
    store: &SqlStore,
    window: &SearchFilter,
    texts: &[String],
) -> Result<Vec<Vec<String>>> {
    let mut found = Vec::new();
    for text in texts {
        let mut filter = window.clone();
        filter.text = Some(text.clone());
        let page = store.search(&filter).await?;
        found.push(page.items.into_iter().map(|c| c.correlation_id).collect());
    }
    Ok(found)
}

/// The SQLite full-text index's progress: its `IndexedThrough` and the calls it holds.
async fn indexed(store: &SqlStore) -> Result<(i64, i64)> {
    let pool = store.sqlite_pool().context("a SQLite store")?;
    let counts = sqlx::query_as(
        "SELECT (SELECT IndexedThrough FROM search.GatehouseSearchProgress), \
                (SELECT count(*) FROM search.GatehouseContentSearch_docsize)",
    )
    .fetch_one(pool)
    .await?;
    Ok(counts)
}

/// Rare terms that exist in the content window: invoice numbers taken from stored prompts.
async fn probe_terms(store: &SqlStore, args: &Args, now: OffsetDateTime) -> Result<Vec<String>> {
    let mut filter = SearchFilter::between(now - time::Duration::days(args.content_days), now);
    filter.limit = 20;
    let page = store.search(&filter).await?;
    let mut terms = Vec::new();
    for call in &page.items {
        if let Some(detail) = store.call(&call.correlation_id).await?
            && let Some(prompt) = detail.request_messages
            && let Some(term) = prompt
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .find(|word| word.starts_with("INV-"))
        {
            terms.push(term.to_owned());
        }
    }
    if terms.is_empty() {
        terms.push("invoice".to_owned());
    }
    Ok(terms)
}

/// What the export of 100,000 rows took.
#[derive(Debug)]
struct Export {
    rows: usize,
    elapsed: Duration,
    rss_start_kb: u64,
    rss_peak_kb: u64,
}

/// Streams the newest 100,000 calls, sampling the resident set size as it goes.
async fn export(store: &SqlStore, now: OffsetDateTime) -> Result<Export> {
    let filter = SearchFilter::between(now - time::Duration::days(SPAN_DAYS), now);
    let rss_start_kb = rss_kb();
    let mut rss_peak_kb = rss_start_kb;
    let clock = Instant::now();
    let mut rows = 0;
    let mut stream = std::pin::pin!(store.export(filter));
    while let Some(row) = stream.next().await {
        row?;
        rows += 1;
        if rows % 1_000 == 0 {
            rss_peak_kb = rss_peak_kb.max(rss_kb());
        }
        if rows == EXPORT_ROWS {
            break;
        }
    }
    Ok(Export {
        rows,
        elapsed: clock.elapsed(),
        rss_start_kb,
        rss_peak_kb,
    })
}

/// Resident set size of this process, kB (0 where /proc is not there).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

fn print_report(
    engine: &str,
    total: i64,
    fill: Option<&Fill>,
    timings: &[QueryTiming],
    export: &Export,
) {
    println!();
    println!("store_read: {engine}, {total} records in the store");
    if let Some(fill) = fill {
        println!(
            "fill: {} records in {:.0} s ({:.0}/s){}",
            fill.records,
            fill.elapsed.as_secs_f64(),
            fill.records as f64 / fill.elapsed.as_secs_f64().max(0.001),
            if fill.stopped_early {
                ", stopped at --fill-minutes"
            } else {
                ""
            }
        );
    }
    println!(
        "{:<40} {:>7} {:>9} {:>9} {:>9} {:>8}  verdict",
        "query", "samples", "p50 ms", "p95 ms", "target", "rows"
    );
    for timing in timings {
        println!(
            "{:<40} {:>7} {:>9.1} {:>9.1} {:>9.0} {:>8}  {} (p95 / target = {:.2})",
            timing.name,
            timing.samples.len(),
            ms(timing.percentile(50.0)),
            ms(timing.percentile(95.0)),
            ms(timing.target),
            timing.rows,
            if timing.passed() { "PASS" } else { "FAIL" },
            ms(timing.percentile(95.0)) / ms(timing.target),
        );
    }
    println!(
        "export: {} rows in {:.1} s; resident memory {} MB at the start, {} MB at most (growth {} MB)",
        export.rows,
        export.elapsed.as_secs_f64(),
        export.rss_start_kb / 1024,
        export.rss_peak_kb / 1024,
        export.rss_peak_kb.saturating_sub(export.rss_start_kb) / 1024,
    );
}

/// Appends the run's JSON line to the file named after the run's start (`started`), where the
/// index rebuild's line goes too.
fn write_json(
    args: &Args,
    engine: &str,
    started: OffsetDateTime,
    total: i64,
    fill: Option<&Fill>,
    timings: &[QueryTiming],
    export: &Export,
) -> Result<()> {
    let queries: Vec<Value> = timings
        .iter()
        .map(|t| {
            json!({
                "query": t.name,
                "samples": t.samples.len(),
                "p50_ms": ms(t.percentile(50.0)),
                "p95_ms": ms(t.percentile(95.0)),
                "target_ms": ms(t.target),
                "rows": t.rows,
                "pass": t.passed(),
            })
        })
        .collect();
    let line = json!({
        "benchmark": "store_read",
        "engine": engine,
        "records": total,
        "content_days": args.content_days,
        "prompt_bytes": args.prompt_bytes,
        "completion_bytes": args.completion_bytes,
        "users": args.users,
        "seed": args.seed,
        "fill": fill.map(|f| json!({
            "records": f.records,
            "seconds": f.elapsed.as_secs_f64(),
            "stopped_early": f.stopped_early,
        })),
        "queries": queries,
        "export": {
            "rows": export.rows,
            "seconds": export.elapsed.as_secs_f64(),
            "rss_start_kb": export.rss_start_kb,
            "rss_peak_kb": export.rss_peak_kb,
        },
    });
    let path = append_result(&args.out_dir, "store_read", started, &line)?;
    println!("result: {}", path.display());
    Ok(())
}
