//! What the hash chain's content hash costs a record, in the format the audit writer links now
//! (format 2: each field's length and bytes as they are) against the format it linked before
//! (format 1: the fields as a JSON array, so every quote of a captured body escaped), and what a
//! whole link (`Chainer::link`: the content hash and the metadata's JSON hash) costs.
//!
//! The records are [`store_write`](../store_write.rs)'s: chat-completion calls whose request and
//! response bodies hold the prompt and the completion, plus the prompt and completion messages.
//! Each measure runs over every record, three rounds, and the fastest round counts. Prints µs a
//! record and the ratio format 2 / format 1, and appends one JSON line to
//! `bench/out/chain_link-<UTC timestamp>.json`. See `bench/README.md`.
#![expect(clippy::print_stdout, reason = "a benchmark prints its report")]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use clap::Parser;
use gatehouse_audit::chain::{self, Chainer};
use gatehouse_bench::records::{Generator, TextArgs};
use gatehouse_bench::report::append_result;
use gatehouse_schema::AuditRecord;
use serde_json::json;
use time::OffsetDateTime;

/// Upper bound of `--records`, so that a run stays within seconds.
const MAX_RECORDS: usize = 100_000;

/// Rounds of each measure; the fastest counts.
const ROUNDS: usize = 3;

/// The content hash's cost a record, format 2 against format 1.
#[derive(Debug, Parser)]
#[command(name = "chain_link")]
struct Args {
    /// Records hashed in each round, at most 100,000.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    #[command(flatten)]
    text: TextArgs,
    /// Where the JSON result goes.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        (1..=MAX_RECORDS).contains(&args.records),
        "--records must be between 1 and {MAX_RECORDS}"
    );
    let started = OffsetDateTime::now_utc();
    let shape = args.text.shape(args.records, 200, false);
    let mut records = Generator::new(&shape, started).batch(0, args.records);
    let content_bytes: usize = records.iter().map(content_len).sum::<usize>() / records.len();

    let format_1 = fastest(&records, |record| {
        black_box(
            chain::content_hash_format_1(record)
                .map(|hash| hash.len())
                .unwrap_or(0),
        );
    });
    let format_2 = fastest(&records, |record| {
        black_box(chain::content_hash(record).len());
    });
    // The generator links its records as the audit writer does; the link is timed anew.
    for record in &mut records {
        record.chain = None;
    }
    let mut linked = Vec::new();
    let mut link = Duration::MAX;
    for _ in 0..ROUNDS {
        linked = records.clone();
        let mut chainer = Chainer::in_memory();
        let begun = Instant::now();
        for record in &mut linked {
            chainer.link(record);
        }
        link = link.min(begun.elapsed());
    }
    ensure!(
        chain::verify(linked).is_intact(),
        "the records linked do not verify"
    );

    let per_record = |total: Duration| total.as_secs_f64() * 1e6 / args.records as f64;
    let (us_1, us_2, us_link) = (per_record(format_1), per_record(format_2), per_record(link));
    println!(
        "{} records, {content_bytes} bytes of content a record (bodies, prompt, completion)",
        args.records
    );
    println!("| measure | µs a record |");
    println!("|---|---|");
    println!("| content hash, format 1 (JSON array) | {us_1:.2} |");
    println!("| content hash, format 2 (lengths and bytes) | {us_2:.2} |");
    println!("| whole link, format 2 (`Chainer::link`) | {us_link:.2} |");
    println!("content hash format 2 / format 1: {:.2} ×", us_2 / us_1);
    let path = append_result(
        &args.out_dir,
        "chain_link",
        started,
        &json!({
            "records": args.records,
            "content_bytes_per_record": content_bytes,
            "content_hash_format_1_us": us_1,
            "content_hash_format_2_us": us_2,
            "link_format_2_us": us_link,
            "format_2_over_format_1": us_2 / us_1,
        }),
    )?;
    println!("JSON: {}", path.display());
    Ok(())
}

/// The fastest of [`ROUNDS`] rounds of `measure` over every record.
fn fastest(records: &[AuditRecord], mut measure: impl FnMut(&AuditRecord)) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let begun = Instant::now();
            for record in records {
                measure(record);
            }
            begun.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn content_len(record: &AuditRecord) -> usize {
    [
        &record.backend_request_body,
        &record.backend_response_body,
        &record.request_messages,
        &record.response_messages,
    ]
    .into_iter()
    .map(|field| field.as_ref().map_or(0, String::len))
    .sum()
}
