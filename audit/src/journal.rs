//! The writer's append-only journal on local disk: where records wait, in order, while the sink
//! is failing or slow, until they are replayed into it.
//!
//! # Format
//!
//! A directory of segment files `segment-{n}.journal` (`n` zero-padded to 20 digits, growing;
//! the smallest is the oldest). Each line holds one record, already linked into its chain:
//!
//! ```text
//! x{checksum} {json}\n
//! ```
//!
//! `json` is `serde_json` of the [`AuditRecord`] (it never holds a raw newline) and `checksum` the
//! 64-bit XXH3 hash of `json`, as 16 lower-case hex digits. A line whose newline is missing (torn
//! by a crash in the middle of an append) or whose checksum does not match is skipped when read
//! and counted ([`JournalStatus::skipped`]), never fatal.
//!
//! While the sink is down, records will wait in the journal for as long as the outage lasts, and
//! the journal's size limit decides how long that can be. Batches appended then are **packed**:
//! up to [`PACKED_LINE_RECORDS`] records a line, compressed together ([`LineKind::Packed`]):
//!
//! ```text
//! z{checksum} {records} {size} {data}\n
//! ```
//!
//! `data` is the base64 (standard alphabet, no padding) of the zlib stream (RFC 1950, level 1) of
//! the records' JSON joined by newlines, `size` the length of that JSON, `records` how many it
//! holds, and `checksum` the XXH3 of everything after the first space. Calls of one application
//! repeat their system prompt, their field names and much of their answers, so a packed line
//! takes a fraction of the bytes of its records' plain lines, and the same limit holds that many
//! times more records (`bench/journal_pack`: 3.1 × with the store benchmark's records, whose text
//! is random words; more for real conversations). Packing costs ≈ 9–17 µs of CPU a record to
//! journal and ≈ 17 µs more to replay, which is why a sink that is only slower than the calls,
//! where records pass through the journal within seconds, gets plain lines. A torn or damaged
//! packed line loses all its records; the skipped count takes the number its head gives
//! ([`records_lost`]).
//!
//! The checksum finds lines that a crash or the disk damaged; it is not what shows tampering (the
//! records' hash chain does that, [`crate::chain`]). So it is XXH3, which costs next to nothing
//! per byte, rather than a cryptographic hash: with SHA-256 the checksum was a quarter of an
//! append's time, and appends run for every record while the store is behind. Journals written
//! before XXH3 hold lines without the `x`, whose checksum is the first 8 bytes of the SHA-256 of
//! `json`; they are still read, so that a gateway upgraded with a backlog replays it.
//!
//! # Writing and reading
//!
//! An append writes a whole batch with one `write` and then `fsync`s the file (a new segment's
//! directory entry too), so a batch is either journaled or reported as not journaled; a failed
//! append is cut back off the file. Segments are never appended to by a later process: each
//! process starts a new one, so a torn tail left by a crash cannot swallow the next line. A new
//! segment is started once the current one reaches 1/16 of the journal's size limit (between
//! 4 KiB and 64 MiB).
//!
//! Replay reads from the oldest segment at a cursor, a chunk at a time; the cursor moves past a
//! chunk only once the sink has stored it ([`Journal::commit`]), and a segment is deleted once all
//! of it is stored. The cursor is saved in the file `head` (`{segment} {offset}`, replaced
//! atomically) at every commit, so that the next process resumes the oldest segment where this
//! one stopped: a shutdown with a backlog in the journal replays nothing twice. Only a crash between a chunk's store and
//! its commit, or a lost `head` file, replays part of a segment again (at most one segment's
//! worth); a store de-duplicates on `CorrelationId`, and [`verify`](crate::chain::verify) counts
//! such copies as duplicates.
//!
//! A chunk is bounded in records (as the reader asks) and in weight: its records weigh at most the
//! journal's chunk budget ([`record_bytes`], as the queue weighs what it holds in memory), unless
//! its first line alone weighs more, since a chunk holds at least one line for the replay to go
//! on. A line is judged before it is decoded, by its JSON's size plus the fixed part of a record's
//! weight for each of its records ([`weight_bound`]), which is never less than what they weigh:
//! their text is all in their JSON, where escapes only lengthen it. Packed lines are cut so that
//! each fits the budget by that measure; only a single record heavier than the budget, or a line
//! written by a process with a larger budget, makes a chunk heavier.
//!
//! One writer per directory: two gateways must not share a journal directory.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use gatehouse_schema::AuditRecord;
use sha2::{Digest, Sha256};

use crate::chain::{sync_dir, write_atomic};
use crate::queue::{RECORD_FIXED_BYTES, record_bytes};

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".journal";
/// The file that holds the replay cursor: the oldest segment's index and the offset stored so far.
const HEAD_FILE: &str = "head";
/// Hex digits of the per-line checksum.
const CHECKSUM_LEN: usize = 16;
/// The first byte of a line whose checksum is XXH3 (lines without it are SHA-256, see above).
const XXH3_MARK: u8 = b'x';
/// The first byte of a packed line.
const PACKED_MARK: u8 = b'z';
/// Most records in one packed line: a chunk read for the sink may run past the records it asks
/// for by at most one line's worth.
const PACKED_LINE_RECORDS: usize = 64;
/// Most bytes of JSON packed into one line, unless a single record is larger: what a packed line
/// inflates to is held in memory whole while it is read. A line is also cut to the journal's chunk
/// budget (see the module's documentation).
const PACKED_LINE_BYTES: usize = 16 << 20;
const MIN_SEGMENT_BYTES: u64 = 4 << 10;
const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// How a batch is laid out in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineKind {
    /// A record a line, as JSON: cheap to write and read.
    Plain,
    /// Many records a line, compressed together: a fraction of the bytes, for backlogs that will
    /// last (see the module's documentation).
    Packed,
}

/// Why records were not journaled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    /// The journal has reached its size limit.
    #[error("the audit journal is full ({bytes} of {max} bytes)")]
    Full {
        /// Bytes in the journal now.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The disk refused.
    #[error("audit journal I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A record could not be encoded.
    #[error("audit record could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The journal's size, for the writer's decisions and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JournalStatus {
    /// No segment left: nothing to replay.
    pub(crate) empty: bool,
    /// Records not yet stored.
    pub(crate) records: u64,
    /// Bytes of the segment files on disk.
    pub(crate) bytes: u64,
    /// Records skipped since the journal was opened: those of torn or corrupt lines (one a line,
    /// or the count a packed line's head gives) and lines that do not read as records.
    pub(crate) skipped: u64,
}

/// A stretch at the head of the journal that a chunk was read from (or a batch appended to);
/// [`Journal::commit`] consumes it once the sink has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stretch {
    segment: u64,
    start: u64,
    end: u64,
    /// Records in lines with a valid checksum.
    lines: u64,
    /// Records skipped: those of torn or corrupt lines ([`records_lost`]), and records
    /// of lines with a valid checksum that do not read as records.
    skipped: u64,
}

/// Records read from the head of the journal.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// The records, in journal order.
    pub(crate) records: Vec<AuditRecord>,
    /// Where they were read from.
    pub(crate) stretch: Stretch,
}

#[derive(Debug)]
struct Segment {
    index: u64,
    path: PathBuf,
    /// Bytes known to be written whole (a failed append's bytes excluded).
    len: u64,
    /// Lines with a valid checksum not yet consumed.
    records: u64,
}

/// An append-only journal in a directory of segments.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// The newest segment, open for appending, with its index.
    active: Option<(u64, File)>,
    /// Offset consumed so far in the oldest segment.
    head: u64,
    next_index: u64,
    max_bytes: u64,
    /// The most a chunk read for the sink weighs ([`record_bytes`]), unless its first line alone
    /// weighs more; packed lines are cut to fit it.
    chunk_bytes: u64,
    segment_bytes: u64,
    skipped: u64,
    /// The last record (segment, line offset, record of the line) copied to [`SET_ASIDE_FILE`],
    /// so that a chunk read again (its sink failed) copies none twice.
    set_aside_through: Option<(u64, u64, usize)>,
}

/// The file in the journal's directory that keeps the lines whose checksum is right but whose
/// JSON this build cannot read as a record (written by a newer build that knows an operation
/// this one does not: a downgrade with a backlog). Their segment is deleted once replayed; the
/// lines stay here, one JSON record a line, to be stored once a build that reads them runs
/// (`gatehouse-gateway` never reads this file itself).
pub const SET_ASIDE_FILE: &str = "unreadable-records.jsonl";

impl Journal {
    /// Opens (creating it if needed) the journal in `dir`, finding what an earlier process left.
    /// `max_bytes` is its size limit on disk, `chunk_bytes` what a chunk read for the sink may
    /// weigh (see the module's documentation).
    pub(crate) fn open(dir: &Path, max_bytes: u64, chunk_bytes: u64) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(index) = entry.file_name().to_str().and_then(segment_index) {
                found.push((index, entry.path()));
            }
        }
        found.sort();
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            active: None,
            head: 0,
            next_index: found.last().map_or(0, |(index, _)| index + 1),
            max_bytes,
            chunk_bytes,
            segment_bytes: (max_bytes / 16).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES),
            skipped: 0,
            set_aside_through: None,
        };
        // Where an earlier process stopped replaying: the segment the cursor names. Segments
        // before it were stored whole (the cursor names the oldest segment not stored), and one
        // still here is one whose deletion failed: it is deleted now, not replayed again.
        let mut resume = read_head(dir);
        for (index, path) in found {
            if let Some((segment, _)) = resume
                && index < segment
            {
                // Not replayed either way: a deletion that fails again is logged, not fatal.
                match fs::remove_file(&path) {
                    Ok(()) => tracing::warn!(
                        path = %path.display(),
                        "audit journal segment stored by an earlier run but not deleted; deleted now"
                    ),
                    Err(error) => tracing::error!(
                        path = %path.display(),
                        %error,
                        "audit journal segment stored by an earlier run cannot be deleted; it is not replayed"
                    ),
                }
                continue;
            }
            let from = match resume.take() {
                Some((segment, offset)) if segment == index => offset,
                _ => 0,
            };
            // A segment that cannot be read (its permissions, a failing disk) does not keep the
            // gateway from starting: it is set aside, whole, for an operator to look at.
            let mut scan = match scan(&path, from) {
                Ok(scan) => scan,
                Err(error) => {
                    set_aside_unreadable(&path, &error);
                    continue;
                }
            };
            if scan.from != from {
                tracing::warn!(
                    path = %path.display(),
                    offset = from,
                    "audit journal head is past the segment's end; the segment is replayed whole"
                );
            }
            if scan.lost > 0 {
                tracing::warn!(
                    path = %path.display(),
                    records = scan.lost,
                    "audit journal segment has torn or corrupt lines; their records are skipped"
                );
            }
            if scan.records == 0 {
                journal.skipped += scan.lost;
                if let Err(error) = fs::remove_file(&path) {
                    tracing::error!(
                        path = %path.display(),
                        %error,
                        "audit journal segment with nothing to replay cannot be deleted"
                    );
                }
                continue;
            }
            tracing::info!(
                path = %path.display(),
                records = scan.records,
                from = scan.from,
                "audit journal segment left by an earlier run; it is replayed first"
            );
            if journal.segments.is_empty() {
                journal.head = std::mem::take(&mut scan.from);
            }
            journal.segments.push_back(Segment {
                index,
                path,
                len: scan.len,
                records: scan.records,
            });
        }
        // The saved cursor now names this process's head, or nothing: a stale one (its segment
        // gone, say after a crash between deleting a segment and saving the cursor) must not
        // apply to a later segment that reuses the index.
        journal.save_head();
        Ok(journal)
    }

    /// The journal's size now.
    pub(crate) fn status(&self) -> JournalStatus {
        JournalStatus {
            empty: self.segments.is_empty(),
            records: self.segments.iter().map(|s| s.records).sum(),
            bytes: self.bytes(),
            skipped: self.skipped,
        }
    }

    fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Appends `records` after everything journaled so far, laid out as `kind` says, and makes
    /// them durable. Refuses when they would take the journal past its size limit, unless `force`
    /// or the journal is empty (a batch larger than the limit must still be able to go
    /// somewhere).
    pub(crate) fn append(
        &mut self,
        records: &[AuditRecord],
        force: bool,
        kind: LineKind,
    ) -> Result<Stretch, JournalError> {
        let buffer = match kind {
            LineKind::Plain => {
                // Room for the whole batch at once, so that the buffer is not copied as it grows:
                // the records' weight, and a quarter more for JSON's escapes and field names.
                let weight: u64 = records.iter().map(record_bytes).sum();
                let mut buffer =
                    Vec::with_capacity(usize::try_from(weight + weight / 4).unwrap_or(0));
                for record in records {
                    encode_line(&mut buffer, record)?;
                }
                buffer
            }
            LineKind::Packed => encode_packed_lines(records, self.chunk_bytes)?,
        };
        let bytes = self.bytes();
        let added = buffer.len() as u64;
        if !force && !self.segments.is_empty() && bytes + added > self.max_bytes {
            return Err(JournalError::Full {
                bytes,
                max: self.max_bytes,
            });
        }
        let rotate = match (&self.active, self.segments.back()) {
            (Some((active, _)), Some(last)) => {
                *active != last.index || last.len >= self.segment_bytes
            }
            _ => true,
        };
        if rotate {
            self.start_segment()?;
        }
        let (Some((index, file)), Some(segment)) = (self.active.as_mut(), self.segments.back_mut())
        else {
            return Err(io::Error::other("no journal segment open").into());
        };
        let start = segment.len;
        if let Err(error) = file.write_all(&buffer).and_then(|()| file.sync_data()) {
            // Cut the partial batch off; if even that fails, append no more to this segment: its
            // known length excludes the partial bytes, and after a restart they read as torn.
            if file.set_len(start).and_then(|()| file.sync_data()).is_err() {
                self.active = None;
            }
            return Err(error.into());
        }
        segment.len += added;
        segment.records += records.len() as u64;
        Ok(Stretch {
            segment: *index,
            start,
            end: segment.len,
            lines: records.len() as u64,
            skipped: 0,
        })
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let index = self.next_index;
        self.next_index += 1;
        let path = self
            .dir
            .join(format!("{SEGMENT_PREFIX}{index:020}{SEGMENT_SUFFIX}"));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push_back(Segment {
            index,
            path,
            len: 0,
            records: 0,
        });
        self.active = Some((index, file));
        Ok(())
    }

    /// Reads up to `max_records` records (more by at most a packed line's) weighing at most the
    /// chunk budget (more only when its first line alone does) from the head of the journal,
    /// without consuming them; `None` when the journal is empty. A chunk never spans two
    /// segments, and may hold no record when only skipped lines were left in a segment.
    pub(crate) fn read_chunk(&mut self, max_records: usize) -> io::Result<Option<Chunk>> {
        loop {
            let Some(front) = self.segments.front() else {
                return Ok(None);
            };
            let file = match File::open(&front.path) {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    tracing::error!(
                        path = %front.path.display(),
                        records = front.records,
                        "audit journal segment vanished; its records are lost"
                    );
                    self.skipped += front.records;
                    self.segments.pop_front();
                    self.head = 0;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let mut set_aside = SetAside {
                path: self.dir.join(SET_ASIDE_FILE),
                through: &mut self.set_aside_through,
            };
            return read_stretch(
                file,
                front,
                self.head,
                max_records,
                self.chunk_bytes,
                &mut set_aside,
            )
            .map(Some);
        }
    }

    /// Consumes a stretch the sink has stored (it must be the head of the journal), deleting the
    /// segments left with nothing to replay.
    pub(crate) fn commit(&mut self, stretch: Stretch) {
        let Some(front) = self.segments.front_mut() else {
            return;
        };
        if front.index != stretch.segment || stretch.start != self.head {
            tracing::error!(
                segment = stretch.segment,
                offset = stretch.start,
                "audit journal stretch is not at the head; it will be replayed again"
            );
            return;
        }
        self.head = stretch.end;
        front.records = front.records.saturating_sub(stretch.lines);
        self.skipped += stretch.skipped;
        self.reclaim();
        self.save_head();
    }

    /// Saves the replay cursor for the next process. A failure is logged: the next start then
    /// replays the oldest segment from an earlier point, and the store skips what it has.
    fn save_head(&self) {
        let path = self.dir.join(HEAD_FILE);
        let saved = match self.segments.front() {
            Some(front) => {
                write_atomic(&path, format!("{} {}\n", front.index, self.head).as_bytes())
            }
            None => match fs::remove_file(&path) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(error) = saved {
            tracing::warn!(%error, "audit journal head not saved; a restart replays more than needed");
        }
    }

    fn reclaim(&mut self) {
        let mut removed = false;
        while let Some(front) = self.segments.front() {
            if self.head < front.len {
                break;
            }
            if self
                .active
                .as_ref()
                .is_some_and(|(index, _)| *index == front.index)
            {
                self.active = None;
            }
            match fs::remove_file(&front.path) {
                Ok(()) => removed = true,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => tracing::error!(
                    path = %front.path.display(),
                    %error,
                    "stored audit journal segment not deleted; a restart would replay it again"
                ),
            }
            self.segments.pop_front();
            self.head = 0;
        }
        if removed && let Err(error) = sync_dir(&self.dir) {
            tracing::warn!(%error, "audit journal directory not synced after deleting a segment");
        }
    }
}

fn segment_index(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

/// Appends `record`'s line to `buffer`: its JSON is written in place, and the checksum filled in
/// before it once the JSON is there.
fn encode_line(buffer: &mut Vec<u8>, record: &AuditRecord) -> Result<(), serde_json::Error> {
    let line_start = buffer.len();
    buffer.push(XXH3_MARK);
    buffer.extend_from_slice(&[b'0'; CHECKSUM_LEN]);
    buffer.push(b' ');
    let json_start = buffer.len();
    if let Err(error) = serde_json::to_writer(&mut *buffer, record) {
        buffer.truncate(line_start);
        return Err(error);
    }
    let sum = xxh3_checksum(&buffer[json_start..]);
    buffer[line_start + 1..json_start - 1].copy_from_slice(&sum);
    buffer.push(b'\n');
    Ok(())
}

/// The packed lines of `records`: as many records a line as [`PACKED_LINE_RECORDS`],
/// [`PACKED_LINE_BYTES`] and a replay chunk's budget of `chunk_bytes` ([`weight_bound`]) allow,
/// at least one.
fn encode_packed_lines(records: &[AuditRecord], chunk_bytes: u64) -> Result<Vec<u8>, JournalError> {
    let mut buffer = Vec::new();
    let mut json = Vec::new();
    let mut packed = 0;
    for record in records {
        let line_end = json.len();
        if packed > 0 {
            json.push(b'\n');
        }
        serde_json::to_writer(&mut json, record)?;
        if packed > 0 && weight_bound(packed as u64 + 1, json.len() as u64) > chunk_bytes {
            // With this record the line could not be replayed within the budget: it starts the
            // next line.
            encode_packed_line(&mut buffer, packed, &json[..line_end])?;
            json.drain(..=line_end);
            packed = 0;
        }
        packed += 1;
        if packed == PACKED_LINE_RECORDS || json.len() >= PACKED_LINE_BYTES {
            encode_packed_line(&mut buffer, packed, &json)?;
            json.clear();
            packed = 0;
        }
    }
    if packed > 0 {
        encode_packed_line(&mut buffer, packed, &json)?;
    }
    Ok(buffer)
}

/// At least what `records` records whose JSON (joined by newlines) takes `json_bytes` weigh
/// ([`record_bytes`]): each one's text is in its JSON, where escapes only make it longer, and the
/// rest of its weight is the fixed part.
fn weight_bound(records: u64, json_bytes: u64) -> u64 {
    records
        .saturating_mul(RECORD_FIXED_BYTES)
        .saturating_add(json_bytes)
}

/// Appends the packed line of `records` records whose JSON, joined by newlines, is `json`.
fn encode_packed_line(buffer: &mut Vec<u8>, records: usize, json: &[u8]) -> io::Result<()> {
    let mut encoder =
        ZlibEncoder::new(Vec::with_capacity(json.len() / 4 + 64), Compression::fast());
    encoder.write_all(json)?;
    let compressed = encoder.finish()?;
    let line_start = buffer.len();
    buffer.push(PACKED_MARK);
    buffer.extend_from_slice(&[b'0'; CHECKSUM_LEN]);
    buffer.push(b' ');
    let payload_start = buffer.len();
    write!(buffer, "{records} {} ", json.len())?;
    let data_start = buffer.len();
    let data_len = base64::encoded_len(compressed.len(), false)
        .ok_or_else(|| io::Error::other("packed journal line too long to encode"))?;
    buffer.resize(data_start + data_len, 0);
    BASE64
        .encode_slice(&compressed, &mut buffer[data_start..])
        .map_err(io::Error::other)?;
    let sum = xxh3_checksum(&buffer[payload_start..]);
    buffer[line_start + 1..payload_start - 1].copy_from_slice(&sum);
    buffer.push(b'\n');
    Ok(())
}

/// The XXH3 checksum of `json`, as the line holds it.
fn xxh3_checksum(json: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hex = [0; CHECKSUM_LEN];
    let hash = xxhash_rust::xxh3::xxh3_64(json).to_be_bytes();
    // Cannot fail: the output is exactly twice the input's length.
    let _ = hex::encode_to_slice(hash, &mut hex);
    hex
}

/// The checksum of lines written before XXH3: the first 8 bytes of the SHA-256 of `json`.
fn sha256_checksum(json: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut hex = [0; CHECKSUM_LEN];
    let digest = Sha256::digest(json);
    let _ = hex::encode_to_slice(&digest[..CHECKSUM_LEN / 2], &mut hex);
    hex
}

/// A whole line with a valid checksum.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// One record's JSON.
    Record(&'a [u8]),
    /// A packed line: `records` records whose JSON, joined by newlines, is `size` bytes, in
    /// `data` (base64 of zlib).
    Packed {
        records: u64,
        size: u64,
        data: &'a [u8],
    },
}

impl Line<'_> {
    /// The records the line holds.
    fn records(&self) -> u64 {
        match self {
            Line::Record(_) => 1,
            Line::Packed { records, .. } => *records,
        }
    }

    /// At least what the line's records weigh ([`weight_bound`]), known before it is decoded.
    fn weight_bound(&self) -> u64 {
        match self {
            Line::Record(json) => weight_bound(1, json.len() as u64),
            Line::Packed { records, size, .. } => weight_bound(*records, *size),
        }
    }

    /// The JSON of the line's records, joined by newlines: a packed line's unpacked.
    fn json(&self) -> io::Result<Cow<'_, [u8]>> {
        match self {
            Line::Record(json) => Ok(Cow::Borrowed(json)),
            Line::Packed { size, data, .. } => unpack(*size, data).map(Cow::Owned),
        }
    }
}

/// The head of a packed line's payload (what follows the checksum): its record count (at least
/// one), its JSON's size, and its data.
fn packed_head(payload: &[u8]) -> Option<(u64, u64, &[u8])> {
    let mut fields = payload.splitn(3, |b| *b == b' ');
    let mut number = || {
        std::str::from_utf8(fields.next()?)
            .ok()?
            .parse::<u64>()
            .ok()
    };
    let records = number().filter(|n| *n > 0)?;
    let size = number()?;
    Some((records, size, fields.next()?))
}

/// A whole line with a valid checksum, of any kind.
fn decode_line(line: &[u8]) -> Option<Line<'_>> {
    let body = line.strip_suffix(b"\n")?;
    match body.first() {
        Some(&XXH3_MARK) | Some(&PACKED_MARK) => {
            let (sum, rest) = body[1..].split_at_checked(CHECKSUM_LEN)?;
            let payload = rest.strip_prefix(b" ")?;
            if xxh3_checksum(payload) != sum {
                return None;
            }
            if body[0] == XXH3_MARK {
                return Some(Line::Record(payload));
            }
            let (records, size, data) = packed_head(payload)?;
            Some(Line::Packed {
                records,
                size,
                data,
            })
        }
        _ => {
            let (sum, rest) = body.split_at_checked(CHECKSUM_LEN)?;
            let json = rest.strip_prefix(b" ")?;
            (sha256_checksum(json) == sum).then_some(Line::Record(json))
        }
    }
}

/// How many records a torn or corrupt line held, as far as can be told: the count a packed
/// line's head gives (unchecked, so only when it is a count a packed line can have), else one.
fn records_lost(line: &[u8]) -> u64 {
    line.strip_prefix(&[PACKED_MARK])
        .and_then(|rest| rest.get(CHECKSUM_LEN + 1..))
        .and_then(packed_head)
        .map(|(records, _, _)| records)
        .filter(|n| *n <= PACKED_LINE_RECORDS as u64)
        .unwrap_or(1)
}

/// The JSON of a packed line's records, joined by newlines: `size` bytes inflated from `data`.
fn unpack(size: u64, data: &[u8]) -> io::Result<Vec<u8>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let compressed = BASE64
        .decode(data)
        .map_err(|_| invalid("packed line: data is not base64"))?;
    // Room for what a line normally holds; a larger one (a single large record) grows as read.
    let expected = usize::try_from(size).map_err(|_| invalid("packed line: size too large"))?;
    let mut json = Vec::with_capacity(expected.min(PACKED_LINE_BYTES));
    ZlibDecoder::new(&compressed[..])
        .take(size.saturating_add(1))
        .read_to_end(&mut json)?;
    if json.len() != expected {
        return Err(invalid("packed line: data does not inflate to its size"));
    }
    Ok(json)
}

struct Scan {
    len: u64,
    /// Where counting started: the offset asked for, or 0 when it was not a line start within
    /// the segment.
    from: u64,
    /// Records of lines with a valid checksum from `from` on.
    records: u64,
    /// Records of torn or corrupt lines from `from` on ([`records_lost`]).
    lost: u64,
}

/// Renames a segment that cannot be read to `….unreadable-{unix ms}` (a name no segment, and no
/// segment set aside before, has), so that it is neither replayed nor read again at the next
/// start, and says so: its records are not stored.
fn set_aside_unreadable(path: &Path, error: &io::Error) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(
        ".unreadable-{}",
        time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
    ));
    let aside = PathBuf::from(aside);
    match fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            path = %path.display(),
            set_aside = %aside.display(),
            %error,
            "audit journal segment cannot be read: set aside, its records are not stored"
        ),
        Err(rename_error) => tracing::error!(
            path = %path.display(),
            %error,
            %rename_error,
            "audit journal segment cannot be read, nor set aside: its records are not replayed"
        ),
    }
}

/// Measures a segment and counts its lines from offset `from` on; from its start when `from` is
/// not a line start within the segment (its end counts as one: nothing is left).
fn scan(path: &Path, from: u64) -> io::Result<Scan> {
    let mut reader = BufReader::new(File::open(path)?);
    let (mut len, mut records, mut lost) = (0, 0, 0);
    // Lines before `from`, once it is known to be a line start.
    let mut before: Option<(u64, u64)> = None;
    let mut line = Vec::new();
    loop {
        if len == from {
            before = Some((records, lost));
        }
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        len += read as u64;
        match decode_line(&line) {
            Some(line) => records += line.records(),
            None => lost += records_lost(&line),
        }
    }
    Ok(match before {
        Some((records_before, lost_before)) => Scan {
            len,
            from,
            records: records - records_before,
            lost: lost - lost_before,
        },
        None => Scan {
            len,
            from: 0,
            records,
            lost,
        },
    })
}

/// The replay cursor an earlier process saved, if any and readable.
fn read_head(dir: &Path) -> Option<(u64, u64)> {
    let text = fs::read_to_string(dir.join(HEAD_FILE)).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some((segment.parse().ok()?, offset.parse().ok()?))
}

/// Reads the chunk of `segment` that starts at `start`: lines up to `max_records` records and,
/// unless it is the chunk's first line with records, up to `max_weight` ([`Line::weight_bound`]).
fn read_stretch(
    mut file: File,
    segment: &Segment,
    start: u64,
    max_records: usize,
    max_weight: u64,
    set_aside: &mut SetAside<'_>,
) -> io::Result<Chunk> {
    file.seek(SeekFrom::Start(start))?;
    let mut reader = BufReader::new(file.take(segment.len.saturating_sub(start)));
    let mut records = Vec::new();
    let mut stretch = Stretch {
        segment: segment.index,
        start,
        end: start,
        lines: 0,
        skipped: 0,
    };
    let mut line = Vec::new();
    // What the records read so far weigh, as the queue weighs them.
    let mut weight = 0;
    while records.len() < max_records {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        let Some(decoded) = decode_line(&line) else {
            tracing::warn!(
                segment = segment.index,
                offset = stretch.end,
                "torn or corrupt audit journal line skipped"
            );
            stretch.end += read as u64;
            stretch.skipped += records_lost(&line);
            continue;
        };
        if !records.is_empty() && weight + decoded.weight_bound() > max_weight {
            // Left for the next chunk, which starts with it.
            break;
        }
        let offset = stretch.end;
        stretch.end += read as u64;
        let count = decoded.records();
        stretch.lines += count;
        let before = records.len();
        match decoded.json() {
            Ok(json) => {
                for (n, json) in json.split(|b| *b == b'\n').enumerate() {
                    if !push_record(&mut records, json, segment.index) {
                        set_aside.keep((segment.index, offset, n), json);
                    }
                }
                weight += records[before..].iter().map(record_bytes).sum::<u64>();
            }
            Err(error) => {
                tracing::error!(segment = segment.index, %error, records = count, "packed audit journal line does not unpack; its records are skipped");
            }
        }
        let read_back = (records.len() - before) as u64;
        stretch.skipped += count.saturating_sub(read_back);
    }
    Ok(Chunk { records, stretch })
}

/// What a journal file holds, readable: each line's JSON on a line of its own, a packed line's
/// records unpacked; torn or damaged lines are left out. For looking into a journal, e.g. to check
/// that no secret is in it, which the packed lines' compressed bytes would hide from a plain
/// search.
pub fn journal_file_text(path: &Path) -> io::Result<Vec<u8>> {
    let mut text = Vec::new();
    let mut reader = BufReader::new(File::open(path)?);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(text);
        }
        if let Some(decoded) = decode_line(&line) {
            text.extend_from_slice(&decoded.json()?);
            text.push(b'\n');
        }
    }
}

/// Adds the record `json` holds to `records`; `false` (logged) when it is not a record.
fn push_record(records: &mut Vec<AuditRecord>, json: &[u8], segment: u64) -> bool {
    match serde_json::from_slice(json) {
        Ok(record) => {
            records.push(record);
            true
        }
        Err(error) => {
            tracing::error!(segment, %error, "audit journal line is not a record this build reads; set aside in {SET_ASIDE_FILE}");
            false
        }
    }
}

/// Where lines that do not read as records are copied ([`SET_ASIDE_FILE`]).
struct SetAside<'a> {
    path: PathBuf,
    through: &'a mut Option<(u64, u64, usize)>,
}

impl SetAside<'_> {
    /// Appends `json`, the record at `at` (segment, line offset, record of the line), unless
    /// one at or after it was copied already; synced, as the journal's own lines are. A failure
    /// is logged: the record is then lost with its segment, as before there was this file.
    fn keep(&mut self, at: (u64, u64, usize), json: &[u8]) {
        if self.through.is_some_and(|through| through >= at) {
            return;
        }
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut file| {
                let mut line = Vec::with_capacity(json.len() + 1);
                line.extend_from_slice(json);
                line.push(b'\n');
                file.write_all(&line)?;
                file.sync_data()
            });
        match written {
            Ok(()) => *self.through = Some(at),
            Err(error) => {
                tracing::error!(%error, path = %self.path.display(), "could not set aside an unreadable audit journal line; it is lost");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunk budget of the tests that are not about it: the queue's largest.
    const TEST_CHUNK_BYTES: u64 = 32 << 20;

    fn record(id: usize) -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "TimeGenerated": "2025-03-01T10:00:00Z",
            "CorrelationId": id.to_string(),
            "GatewayId": "gw",
            "OperationId": null,
            "CallerIpAddress": "127.0.0.1",
            "PeerIpAddress": "127.0.0.1",
            "Method": "POST",
            "Url": "/",
            "ClientProtocol": "HTTP/1.1",
            "ResponseCode": 200,
            "IsRequestSuccess": true,
            "BackendResponseCode": null,
            "BackendId": null,
            "BackendUrl": null,
            "RequestSize": 0,
            "ResponseSize": 0,
            "TotalTime": 0,
            "BackendTime": 0,
            "TimeToFirstByte": null,
            "ApimSubscriptionId": null,
            "ProductId": null,
            "UserId": null,
            "UserName": null,
            "TenantId": null,
            "DeploymentName": null,
            "ModelName": null,
            "ApiVersion": null,
            "IsStreamCompletion": false,
            "Usage": null,
            "BackendRequestBody": null,
            "RequestBodyTruncated": false,
            "BackendResponseBody": null,
            "ResponseBodyTruncated": false,
            "RequestMessages": null,
            "ResponseMessages": null,
            "ClientAborted": false,
            "LastErrorReason": null,
            "LastErrorMessage": null
        }))
        .unwrap()
    }

    fn records(range: std::ops::Range<usize>) -> Vec<AuditRecord> {
        range.map(record).collect()
    }

    fn drain(journal: &mut Journal) -> Vec<String> {
        let mut ids = Vec::new();
        while let Some(chunk) = journal.read_chunk(7).unwrap() {
            ids.extend(chunk.records.iter().map(|r| r.correlation_id.clone()));
            journal.commit(chunk.stretch);
        }
        ids
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| i.to_string()).collect()
    }

    #[test]
    fn appended_records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 16 << 10, TEST_CHUNK_BYTES).unwrap();
        for start in (0..100).step_by(10) {
            journal
                .append(&records(start..start + 10), true, LineKind::Plain)
                .unwrap();
        }
        assert!(
            journal.segments.len() > 1,
            "a 16 KiB journal rotates 4 KiB segments"
        );
        assert_eq!(journal.status().records, 100);
        assert_eq!(drain(&mut journal), ids(0..100));
        let status = journal.status();
        assert!(status.empty);
        assert_eq!((status.records, status.bytes), (0, 0));
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "stored segments are deleted"
        );
    }

    /// A line whose checksum is right but whose JSON this build does not read as a record (a
    /// newer build's operation, after a downgrade) is not lost with its segment: it is copied,
    /// once however often its chunk is read, to the set-aside file.
    #[test]
    fn a_line_this_build_cannot_read_is_set_aside_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut unknown = serde_json::to_value(record(1)).unwrap();
        unknown["OperationId"] = serde_json::json!("some_future_operation");
        let unknown = serde_json::to_vec(&unknown).unwrap();
        let mut bytes = Vec::new();
        encode_line(&mut bytes, &record(0)).unwrap();
        bytes.push(XXH3_MARK);
        bytes.extend_from_slice(&xxh3_checksum(&unknown));
        bytes.push(b' ');
        bytes.extend_from_slice(&unknown);
        bytes.push(b'\n');
        encode_line(&mut bytes, &record(2)).unwrap();
        fs::write(
            dir.path()
                .join(format!("{SEGMENT_PREFIX}{:020}{SEGMENT_SUFFIX}", 0)),
            &bytes,
        )
        .unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        let first = journal.read_chunk(10).unwrap().unwrap();
        let again = journal.read_chunk(10).unwrap().unwrap();
        assert_eq!(first.records, again.records);
        assert_eq!(drain(&mut journal), ["0", "2"]);
        let kept = fs::read(dir.path().join(SET_ASIDE_FILE)).unwrap();
        assert_eq!(kept, [unknown.as_slice(), b"\n"].concat());
    }

    /// A segment that cannot be read does not keep the journal from opening: it is set aside
    /// under another name, and the readable ones are replayed.
    #[test]
    fn a_segment_that_cannot_be_read_is_set_aside_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..3), false, LineKind::Plain)
                .unwrap();
        }
        // Reading a directory fails as a failing disk would.
        let unreadable = dir.path().join("segment-00000000000000000000.journal");
        assert!(!unreadable.exists() || unreadable.is_file());
        if unreadable.exists() {
            fs::rename(
                &unreadable,
                dir.path().join("segment-00000000000000000099.journal"),
            )
            .unwrap();
        }
        fs::create_dir(&unreadable).unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert!(!unreadable.exists());
        let set_aside: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("segment-00000000000000000000.journal.unreadable-"))
            .collect();
        assert_eq!(set_aside.len(), 1, "{set_aside:?}");
        assert_eq!(
            drain(&mut journal),
            ids(0..3),
            "the readable segment is replayed"
        );
    }

    #[test]
    fn a_chunk_not_committed_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        journal
            .append(&records(0..5), false, LineKind::Plain)
            .unwrap();
        let first = journal.read_chunk(3).unwrap().unwrap();
        let again = journal.read_chunk(3).unwrap().unwrap();
        assert_eq!(first.records, again.records);
        journal.commit(first.stretch);
        journal
            .append(&records(5..8), false, LineKind::Plain)
            .unwrap();
        assert_eq!(drain(&mut journal), ids(3..8));
    }

    #[test]
    fn a_reopened_journal_replays_and_never_appends_to_an_old_segment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..4), false, LineKind::Plain)
                .unwrap();
        }
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(journal.status().records, 4);
        journal
            .append(&records(4..6), false, LineKind::Plain)
            .unwrap();
        assert_eq!(journal.segments.len(), 2);
        assert_eq!(drain(&mut journal), ids(0..6));
    }

    #[test]
    fn a_reopened_journal_resumes_where_the_last_commit_left_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..10), false, LineKind::Plain)
                .unwrap();
            let stored = journal.read_chunk(4).unwrap().unwrap();
            journal.commit(stored.stretch);
            // Read but not stored: replayed again.
            journal.read_chunk(3).unwrap().unwrap();
        }
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(journal.status().records, 6);
        assert_eq!(drain(&mut journal), ids(4..10));
        assert!(
            !dir.path().join(HEAD_FILE).exists(),
            "an empty journal leaves no head behind"
        );

        // A cursor left behind with no segment (a crash after the last segment was deleted) is
        // forgotten at open, so that it never applies to a new segment with the same index.
        {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(HEAD_FILE), "0 100\n").unwrap();
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            assert!(!dir.path().join(HEAD_FILE).exists());
            journal
                .append(&records(0..3), false, LineKind::Plain)
                .unwrap();
            drop(journal);
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            assert_eq!(drain(&mut journal), ids(0..3));
        }

        // A segment stored whole whose deletion failed is still there, older than the one the
        // cursor names: it is not replayed, and the cursor still applies to its own segment.
        {
            let dir = tempfile::tempdir().unwrap();
            let (first, second) = {
                let mut journal = Journal::open(dir.path(), 16 << 10, TEST_CHUNK_BYTES).unwrap();
                let first = journal.next_index;
                journal
                    .append(&records(0..3), false, LineKind::Plain)
                    .unwrap();
                journal.start_segment().unwrap();
                let second = journal.next_index - 1;
                journal
                    .append(&records(3..9), false, LineKind::Plain)
                    .unwrap();
                (first, second)
            };
            let name = |index: u64| format!("{SEGMENT_PREFIX}{index:020}{SEGMENT_SUFFIX}");
            assert!(dir.path().join(name(first)).exists());
            // Where the cursor would be after records 3 and 4 of the second segment were stored.
            let second_lines = fs::read(dir.path().join(name(second))).unwrap();
            let two_lines = second_lines
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .nth(1)
                .map(|(at, _)| at + 1)
                .unwrap();
            fs::write(
                dir.path().join(HEAD_FILE),
                format!("{second} {two_lines}\n"),
            )
            .unwrap();
            let mut journal = Journal::open(dir.path(), 16 << 10, TEST_CHUNK_BYTES).unwrap();
            assert!(!dir.path().join(name(first)).exists(), "deleted at open");
            assert_eq!(drain(&mut journal), ids(5..9));
        }

        // A head that does not fit the segment (past its end, or not at a line start) is
        // ignored: the segment is replayed whole, never cut.
        for offset in ["999999", "5"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
                journal
                    .append(&records(0..3), false, LineKind::Plain)
                    .unwrap();
            }
            let segment = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .find_map(|name| segment_index(&name))
                .unwrap();
            fs::write(dir.path().join(HEAD_FILE), format!("{segment} {offset}\n")).unwrap();
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            assert_eq!(journal.status().records, 3, "head {offset}");
            assert_eq!(drain(&mut journal), ids(0..3), "head {offset}");
        }
    }

    #[test]
    fn torn_and_corrupt_lines_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..5), false, LineKind::Plain)
                .unwrap();
        }
        let path = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = fs::read(&path).unwrap();
        // Flip a byte inside the second line, and tear the last one.
        let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 30;
        bytes[second] ^= 0x20;
        bytes.truncate(bytes.len() - 10);
        fs::write(&path, &bytes).unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(journal.status().records, 3);
        assert_eq!(drain(&mut journal), ["0", "2", "3"]);
        assert_eq!(journal.status().skipped, 2);
    }

    #[test]
    fn lines_carry_an_xxh3_checksum_that_finds_any_changed_byte() {
        let mut buffer = b"earlier line\n".to_vec();
        encode_line(&mut buffer, &record(7)).unwrap();
        let line = &buffer[b"earlier line\n".len()..];
        assert_eq!(line[0], b'x');
        let json = serde_json::to_vec(&record(7)).unwrap();
        let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&json));
        assert_eq!(&line[1..17], sum.as_bytes());
        assert_eq!(line[17], b' ');
        assert_eq!(decode_line(line), Some(Line::Record(&json[..])));
        // Any byte changed, in the checksum or in the JSON, makes the line unreadable.
        for at in 1..line.len() - 1 {
            let mut changed = line.to_vec();
            changed[at] ^= 0x01;
            assert_eq!(decode_line(&changed), None, "byte {at} changed");
        }
        assert_eq!(decode_line(&line[..line.len() - 1]), None, "no newline");
    }

    #[test]
    fn lines_written_with_a_sha256_checksum_are_still_read() {
        // The form of lines before XXH3: 16 hex digits of the SHA-256, no mark.
        let legacy_line = |id: usize| {
            let json = serde_json::to_vec(&record(id)).unwrap();
            let mut line = hex::encode(&Sha256::digest(&json)[..8]).into_bytes();
            line.push(b' ');
            line.extend_from_slice(&json);
            line.push(b'\n');
            (line, json)
        };
        let (line, json) = legacy_line(3);
        assert_eq!(decode_line(&line), Some(Line::Record(&json[..])));
        let mut changed = line.clone();
        changed[40] ^= 0x01;
        assert_eq!(decode_line(&changed), None);

        // A journal left with such lines by an earlier version replays after an upgrade, and
        // what is appended now follows them.
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<u8> = (0..3).flat_map(|id| legacy_line(id).0).collect();
        fs::write(
            dir.path().join("segment-00000000000000000001.journal"),
            &old,
        )
        .unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(journal.status().records, 3);
        journal
            .append(&records(3..5), false, LineKind::Plain)
            .unwrap();
        assert_eq!(drain(&mut journal), ids(0..5));
        assert_eq!(journal.status().skipped, 0);
    }

    #[test]
    fn a_segment_of_torn_lines_only_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("segment-00000000000000000003.journal"),
            b"0123 {\"Torn",
        )
        .unwrap();
        let journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        let status = journal.status();
        assert!(status.empty);
        assert_eq!(status.skipped, 1);
        assert_eq!(journal.next_index, 4);
    }

    #[test]
    fn the_size_limit_refuses_appends_unless_empty_or_forced() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 2000, TEST_CHUNK_BYTES).unwrap();
        journal
            .append(&records(0..3), false, LineKind::Plain)
            .unwrap();
        assert!(matches!(
            journal.append(&records(3..4), false, LineKind::Plain),
            Err(JournalError::Full { .. })
        ));
        journal
            .append(&records(3..4), true, LineKind::Plain)
            .unwrap();
        assert_eq!(drain(&mut journal), ids(0..4));
        journal
            .append(&records(4..10), false, LineKind::Plain)
            .unwrap();
        assert_eq!(journal.status().records, 6);
    }

    /// Record `id` as a chat call of one application: its system prompt, a question and an
    /// answer, as bodies and messages, the way calls of one application repeat themselves.
    fn chat_record(id: usize) -> AuditRecord {
        let mut record = record(id);
        let system = "You are the internal assistant of the Contoso finance team. Answer \
                      concisely, cite the travel and expense policy, never reveal personal data.";
        let question = format!("Can I claim the hotel of trip {id} above the city limit?");
        let answer = format!(
            "For trip {id}: yes, with the pre-approval form and the itemised receipt, section 4.{}.",
            id % 9
        );
        let messages = serde_json::json!([
            {"role": "system", "content": system},
            {"role": "user", "content": question}
        ]);
        record.backend_request_body = Some(
            serde_json::json!({"messages": messages, "max_tokens": 300, "temperature": 0.2})
                .to_string(),
        );
        record.request_messages = Some(messages.to_string());
        let message = serde_json::json!({"role": "assistant", "content": answer});
        record.backend_response_body = Some(
            serde_json::json!({
                "id": format!("chatcmpl-{id:08}"),
                "object": "chat.completion",
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": 61, "completion_tokens": 24, "total_tokens": 85}
            })
            .to_string(),
        );
        record.response_messages = Some(serde_json::json!([message]).to_string());
        record
    }

    fn journal_bytes(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "journal"))
            .map(|path| fs::metadata(path).unwrap().len())
            .sum()
    }

    #[test]
    fn packed_lines_come_back_as_the_records_in_a_fraction_of_the_bytes() {
        let calls: Vec<AuditRecord> = (0..300).map(chat_record).collect();
        let plain_dir = tempfile::tempdir().unwrap();
        let mut plain = Journal::open(plain_dir.path(), 1 << 30, TEST_CHUNK_BYTES).unwrap();
        plain.append(&calls, false, LineKind::Plain).unwrap();
        let packed_dir = tempfile::tempdir().unwrap();
        let mut packed = Journal::open(packed_dir.path(), 1 << 30, TEST_CHUNK_BYTES).unwrap();
        let stretch = packed.append(&calls, false, LineKind::Packed).unwrap();
        assert_eq!(stretch.lines, 300);
        assert_eq!(packed.status().records, 300);

        let (plain_bytes, packed_bytes) = (
            journal_bytes(plain_dir.path()),
            journal_bytes(packed_dir.path()),
        );
        assert!(
            packed_bytes * 5 < plain_bytes,
            "packed {packed_bytes} bytes, plain {plain_bytes}"
        );
        let text = fs::read(packed.segments[0].path.clone()).unwrap();
        let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 300usize.div_ceil(PACKED_LINE_RECORDS));
        assert!(lines.iter().all(|line| line[0] == PACKED_MARK));

        // Read back whole, field for field, after a restart too.
        drop(packed);
        let mut packed = Journal::open(packed_dir.path(), 1 << 30, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(packed.status().records, 300);
        let mut read = Vec::new();
        while let Some(chunk) = packed.read_chunk(100).unwrap() {
            assert!(
                chunk.records.len() < 100 + PACKED_LINE_RECORDS,
                "a chunk runs past what it asks for by less than a line"
            );
            read.extend(chunk.records);
            packed.commit(chunk.stretch);
        }
        assert_eq!(read, calls);
        assert!(packed.status().empty);
        assert_eq!(packed.status().skipped, 0);
    }

    #[test]
    fn plain_and_packed_lines_mix_and_a_restart_resumes_between_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..5), false, LineKind::Plain)
                .unwrap();
            journal
                .append(&records(5..140), false, LineKind::Packed)
                .unwrap();
            journal
                .append(&records(140..145), false, LineKind::Plain)
                .unwrap();
            // Store the plain lines and the first packed line, then stop.
            let chunk = journal.read_chunk(6).unwrap().unwrap();
            assert_eq!(chunk.records.len(), 5 + PACKED_LINE_RECORDS);
            journal.commit(chunk.stretch);
        }
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert_eq!(
            journal.status().records,
            145 - 5 - PACKED_LINE_RECORDS as u64
        );
        assert_eq!(drain(&mut journal), ids(5 + PACKED_LINE_RECORDS..145));
    }

    #[test]
    fn a_damaged_packed_line_is_skipped_with_the_records_its_head_names() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
            journal
                .append(&records(0..10), false, LineKind::Packed)
                .unwrap();
            journal
                .append(&records(10..12), false, LineKind::Packed)
                .unwrap();
        }
        let path = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| path.extension().is_some_and(|ext| ext == "journal"))
            .unwrap();
        let mut bytes = fs::read(&path).unwrap();
        // A byte of the first line's data changed, and the second line torn.
        let first_end = bytes.iter().position(|b| *b == b'\n').unwrap();
        bytes[first_end - 5] ^= 0x01;
        bytes.truncate(bytes.len() - 3);
        fs::write(&path, &bytes).unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        assert!(journal.status().empty, "nothing readable is left");
        assert_eq!(
            journal.status().skipped,
            12,
            "10 and 2 records, as the heads say"
        );
        assert!(drain(&mut journal).is_empty());

        // Any one byte changed makes a packed line unreadable.
        let mut line = Vec::new();
        encode_packed_line(&mut line, 1, &serde_json::to_vec(&record(7)).unwrap()).unwrap();
        assert!(decode_line(&line).is_some());
        for at in 1..line.len() - 1 {
            let mut changed = line.clone();
            changed[at] ^= 0x01;
            assert_eq!(decode_line(&changed), None, "byte {at} changed");
        }
    }

    #[test]
    fn chunks_stay_within_the_budget_and_a_heavier_record_comes_alone() {
        let budget: u64 = 16 << 10;
        let with_body = |id: usize, bytes: usize| {
            let mut record = record(id);
            record.backend_request_body = Some("b".repeat(bytes));
            record
        };
        // Records of ≈ 4 KiB, and one of 40 KiB, more than the whole budget.
        let mut heavy: Vec<AuditRecord> = (0..30).map(|id| with_body(id, 3_000)).collect();
        heavy[12] = with_body(12, 40_000);
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 30, budget).unwrap();
        journal
            .append(&heavy[..10], false, LineKind::Plain)
            .unwrap();
        journal
            .append(&heavy[10..], false, LineKind::Packed)
            .unwrap();
        let mut read = Vec::new();
        while let Some(chunk) = journal.read_chunk(512).unwrap() {
            let weight: u64 = chunk.records.iter().map(record_bytes).sum();
            assert!(
                weight <= budget || chunk.records.len() == 1,
                "{} records weigh {weight}, over {budget}",
                chunk.records.len()
            );
            read.extend(chunk.records);
            journal.commit(chunk.stretch);
        }
        assert_eq!(read, heavy);
        assert_eq!(journal.status().skipped, 0);
    }

    #[test]
    fn a_journal_file_reads_as_its_records_json_whatever_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1 << 20, TEST_CHUNK_BYTES).unwrap();
        journal
            .append(&records(0..3), false, LineKind::Plain)
            .unwrap();
        journal
            .append(&records(3..80), false, LineKind::Packed)
            .unwrap();
        let text = journal_file_text(&journal.segments[0].path).unwrap();
        let expected: Vec<u8> = records(0..80)
            .iter()
            .flat_map(|record| {
                let mut line = serde_json::to_vec(record).unwrap();
                line.push(b'\n');
                line
            })
            .collect();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }
}
