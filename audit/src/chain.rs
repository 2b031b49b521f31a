//! Tamper evidence: every audit record is linked into a hash chain, one chain per gateway
//! instance and UTC day, and [`verify`] names the first record of a chain that was changed or
//! removed.
//!
//! # The link
//!
//! The audit writer links records in the order it writes them ([`Chainer::link`]):
//!
//! ```text
//! content_hash = hex(SHA-256("gatehouse-audit-content/2\n" ‖ field₁ ‖ field₂ ‖ field₃ ‖ field₄))
//!   fieldᵢ     = 0x00                              when absent
//!              | 0x01 ‖ u64 BE byte length ‖ UTF-8  when present
//! record_hash  = hex(SHA-256(previous_hash ‖ canonical JSON of the metadata ‖ content_hash))
//! ```
//!
//! The content is the four fields retention may remove before the metadata: the request body,
//! the response body, the prompt and the completion (`BackendRequestBody`, `BackendResponseBody`,
//! `RequestMessages`, `ResponseMessages`), in that order. The *metadata* is the record with those
//! four and `Chain` set to `None`. Content removed by retention therefore leaves the metadata
//! verifiable through the `content_hash` its link carries.
//!
//! `previous_hash` is taken as the ASCII bytes of the previous record's `record_hash` text (64
//! lower-case hex digits), [`GENESIS_HASH`] (64 zeros) for the first record of a chain. The
//! *canonical JSON* is simply `serde_json::to_vec` of the [`AuditRecord`]: serde writes the
//! fields in their declaration order, with no whitespace, so the same record always gives the same
//! bytes. Two consequences:
//!
//! - a store must give a record back exactly as it was written, field for field, for it to verify;
//! - a field added to `AuditRecord` later must be left out of the JSON when it has its default
//!   value (`skip_serializing_if`), or every record written before it stops verifying.
//!
//! The content is hashed as it is, not as JSON: a captured body is JSON text whose every quote
//! JSON would escape, and escaping it cost more than hashing it. Records linked before this
//! (format 1) carry `content_hash = hex(SHA-256(canonical JSON of the four fields as an array))`;
//! [`verify`] accepts either. The format-2 input opens with its tag and a format-1 input with
//! `[`, so no input is read in both formats.
//!
//! Before hashing, [`Chainer::link`] normalises `TimeGenerated` to UTC with microsecond precision
//! (the precision of the SQL stores), so that a record read back from any store hashes the same.
//!
//! # Chain ids and segments
//!
//! A chain id is `{GatewayId}/{YYYY-MM-DD}`, the day of `TimeGenerated` in UTC. Sequences follow
//! the write order, not `TimeGenerated`: a long call that began before a short one may be written,
//! and linked, after it; a call that began just before midnight lands in the previous day's chain.
//!
//! The chainer keeps the head (next sequence, last hash) of every recent chain in a state file
//! ([`STATE_FILE`] in the journal directory), written atomically *before* the records it covers
//! are handed to a sink or the journal, so a restarted gateway continues its chains where they
//! stopped. It never guesses a head it does not know. When the state is missing or unreadable
//! (the first start, a lost disk, a writer without a journal directory), or a chain's day is older
//! than the days it keeps ([`KEEP_DAYS`]), the chain it starts is a new **segment** with a marked
//! id: `{GatewayId}/{YYYY-MM-DD}#{start}-{nonce}` (e.g.
//! `gw-1/2025-03-01#20250301T101500.123Z-4f2a`: the UTC time the writer started and a random
//! nonce), again from sequence 0 and the genesis hash. A restart therefore never forks a chain
//! silently: an auditor who sees a `#` segment knows that the writer started without knowing the
//! earlier part of that day's chain. A first start looks like a lost state, so a new gateway's
//! first day is such a segment; the chains of later days have plain ids.
//!
//! # Verifying
//!
//! [`verify`] takes records in (chain id, sequence) order and checks each chain from sequence 0;
//! a [`Verifier`] also takes the records just before a time range as anchors; [`verify_jsonl`]
//! reads a JSON-lines file (the [`JsonLinesSink`](crate::JsonLinesSink)'s) for a time range.
//! A chain breaks at a record when its content no longer matches its hash ([`BreakReason::Changed`]),
//! when records before it are missing or its `previous_hash` is not the hash of the record before
//! it ([`BreakReason::Removed`]), when it comes out of order ([`BreakReason::Reordered`]), or
//! when a second intact record claims its place ([`BreakReason::Forked`]: two gateways that share
//! one `gateway_id` write one chain from two ends; every replica needs its own id). An
//! exact copy of the record before it (the journal may deliver a record twice after a crash) is
//! counted as a duplicate, not a break.
//!
//! What a chain cannot show by itself: the removal of the *last* records of a chain (nothing
//! follows them to notice) or of a whole chain, and records rewritten together with every hash
//! after them (the hash is not keyed). For those the writer publishes each chain's head outside
//! the store ([`PublishedHead`], in the gateway's log), and [`Verifier::expect_published`] checks
//! the chains against the heads kept there.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use gatehouse_schema::AuditRecord;
use gatehouse_schema::audit::ChainLink;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Date, OffsetDateTime, UtcOffset};

/// The `previous_hash` of the first record of a chain: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Name of the chainer's state file inside the journal directory.
pub const STATE_FILE: &str = "chain-state.json";

/// Days of chain heads the chainer keeps, counted back from the newest day it has linked; a
/// record of an older day starts a marked segment.
pub const KEEP_DAYS: i64 = 7;

const STATE_VERSION: u32 = 1;

/// A SHA-256 hash.
type Hash = [u8; 32];

/// Links records into their chains and remembers each chain's head.
///
/// One chainer per writer: the chain order is the order [`Chainer::link`] is called in.
#[derive(Debug)]
pub struct Chainer {
    heads: BTreeMap<ChainKey, ChainHead>,
    /// Chains of this day or earlier that are not in `heads` may exist already (written before the
    /// state was lost, or pruned): they start as marked segments.
    unknown_through: Date,
    /// The segment marker of this chainer, `{start}-{nonce}`.
    marker: String,
    state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ChainKey {
    gateway_id: String,
    day: Date,
}

#[derive(Debug, Clone)]
struct ChainHead {
    chain_id: String,
    next_sequence: u64,
    last_hash: String,
    /// Linked into since [`Chainer::take_new_heads`] last took its head.
    unpublished: bool,
}

/// The state file's layout.
#[derive(Debug, Serialize, Deserialize)]
struct StoredState {
    version: u32,
    unknown_through: String,
    chains: Vec<StoredHead>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredHead {
    gateway_id: String,
    day: String,
    chain_id: String,
    next_sequence: u64,
    last_hash: String,
}

impl Chainer {
    /// A chainer that keeps its state in memory only: every chain of today or earlier that it
    /// starts is a marked segment, since it cannot know what an earlier process linked.
    pub fn in_memory() -> Chainer {
        Chainer {
            heads: BTreeMap::new(),
            unknown_through: OffsetDateTime::now_utc().date(),
            marker: segment_marker(),
            state_file: None,
        }
    }

    /// The head (last record linked) of every chain linked into since the last call: what the
    /// writer publishes outside the store ([`PublishedHead`]).
    pub fn take_new_heads(&mut self) -> Vec<PublishedHead> {
        let mut new_heads = Vec::new();
        for head in self.heads.values_mut() {
            // Set only once a record was linked, so `next_sequence` is at least 1.
            if head.unpublished {
                head.unpublished = false;
                new_heads.push(PublishedHead {
                    chain_id: head.chain_id.clone(),
                    sequence: head.next_sequence - 1,
                    record_hash: head.last_hash.clone(),
                });
            }
        }
        new_heads
    }

    /// A chainer that continues the chains recorded in `state_file` and saves its state there
    /// ([`Chainer::save`]). A missing or unreadable file is a lost state (logged): the chains of
    /// today and earlier start as marked segments.
    pub fn open(state_file: impl Into<PathBuf>) -> Chainer {
        let state_file = state_file.into();
        let mut chainer = Chainer::in_memory();
        match std::fs::read(&state_file) {
            Ok(bytes) => match chainer.restore(&bytes) {
                Ok(()) => {}
                Err(reason) => tracing::error!(
                    path = %state_file.display(),
                    %reason,
                    "audit chain state unreadable: today's chains start as new segments"
                ),
            },
            Err(error) if error.kind() == io::ErrorKind::NotFound => tracing::info!(
                path = %state_file.display(),
                "no audit chain state (first start, or lost): today's chains start as new segments"
            ),
            Err(error) => tracing::error!(
                path = %state_file.display(),
                %error,
                "audit chain state unreadable: today's chains start as new segments"
            ),
        }
        chainer.state_file = Some(state_file);
        chainer
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<(), String> {
        let stored: StoredState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if stored.version != STATE_VERSION {
            return Err(format!("unknown state version {}", stored.version));
        }
        let unknown_through = parse_day(&stored.unknown_through)
            .ok_or_else(|| format!("bad day {:?}", stored.unknown_through))?;
        let mut heads = BTreeMap::new();
        for head in stored.chains {
            let day = parse_day(&head.day).ok_or_else(|| format!("bad day {:?}", head.day))?;
            if parse_hash(&head.last_hash).is_none() {
                return Err(format!("bad hash in chain {}", head.chain_id));
            }
            heads.insert(
                ChainKey {
                    gateway_id: head.gateway_id,
                    day,
                },
                ChainHead {
                    chain_id: head.chain_id,
                    next_sequence: head.next_sequence,
                    last_hash: head.last_hash,
                    unpublished: false,
                },
            );
        }
        self.heads = heads;
        self.unknown_through = unknown_through;
        Ok(())
    }

    /// Links `record` into its chain: normalises its `TimeGenerated` (UTC, microseconds) and sets
    /// its [`ChainLink`], replacing any it had.
    pub fn link(&mut self, record: &mut AuditRecord) {
        record.time_generated = canonical_time(record.time_generated);
        record.chain = None;
        clamp_token_counts(record);
        let key = ChainKey {
            gateway_id: record.gateway_id.clone(),
            day: record.time_generated.date(),
        };
        let new_chain_id = (!self.heads.contains_key(&key)).then(|| self.new_chain_id(&key));
        let day = key.day;
        let head = self.heads.entry(key).or_insert_with(|| ChainHead {
            chain_id: new_chain_id.unwrap_or_default(),
            next_sequence: 0,
            last_hash: GENESIS_HASH.to_owned(),
            unpublished: false,
        });
        // The content is taken out while the metadata is hashed, and put back: the record is
        // hashed as `record_hash` would hash a copy without content, without copying the bodies.
        let content = take_content(record);
        let [a, b, c, d] = &content;
        let content_hash = hash_content(&(a, b, c, d));
        let hashes = hash_metadata(&head.last_hash, record, &content_hash)
            .map(|record_hash| (record_hash, content_hash));
        put_content(record, content);
        let (record_hash, content_hash) = match hashes {
            Ok(hashes) => hashes,
            Err(error) => {
                tracing::error!(
                    correlation_id = %record.correlation_id,
                    %error,
                    "audit record could not be encoded for its chain link; left unchained"
                );
                return;
            }
        };
        record.chain = Some(ChainLink {
            chain_id: head.chain_id.clone(),
            sequence: head.next_sequence,
            previous_hash: std::mem::replace(&mut head.last_hash, record_hash.clone()),
            record_hash,
            content_hash,
        });
        head.next_sequence += 1;
        head.unpublished = true;
        self.prune(day);
    }

    fn new_chain_id(&self, key: &ChainKey) -> String {
        let base = format!("{}/{}", key.gateway_id, format_day(key.day));
        if key.day <= self.unknown_through {
            format!("{base}#{}", self.marker)
        } else {
            base
        }
    }

    /// Forgets the heads of days more than [`KEEP_DAYS`] before `newest`.
    fn prune(&mut self, newest: Date) {
        let Some(oldest_kept) = newest.checked_sub(time::Duration::days(KEEP_DAYS)) else {
            return;
        };
        let mut forgotten = None;
        self.heads.retain(|key, _| {
            let keep = key.day >= oldest_kept;
            if !keep {
                forgotten = forgotten.max(Some(key.day));
            }
            keep
        });
        if let Some(day) = forgotten {
            self.unknown_through = self.unknown_through.max(day);
            // A forgotten day seen again (a clock stepped back) starts a segment of its own: under
            // this marker its first chain would take the same id again, from sequence 0, and
            // read as a fork.
            let used = std::mem::take(&mut self.marker);
            self.marker = segment_marker();
            while self.marker == used {
                self.marker = segment_marker();
            }
        }
    }

    /// The file the state is saved to, when there is one.
    pub fn state_file(&self) -> Option<&Path> {
        self.state_file.as_deref()
    }

    /// The state as the bytes of the state file.
    pub(crate) fn state_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let stored = StoredState {
            version: STATE_VERSION,
            unknown_through: format_day(self.unknown_through),
            chains: self
                .heads
                .iter()
                .map(|(key, head)| StoredHead {
                    gateway_id: key.gateway_id.clone(),
                    day: format_day(key.day),
                    chain_id: head.chain_id.clone(),
                    next_sequence: head.next_sequence,
                    last_hash: head.last_hash.clone(),
                })
                .collect(),
        };
        serde_json::to_vec_pretty(&stored)
    }

    /// Writes the state file atomically (a temporary file, fsync, rename, fsync of the
    /// directory). Does nothing for an in-memory chainer.
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let bytes = self.state_bytes().map_err(io::Error::other)?;
        write_atomic(path, &bytes)
    }
}

/// Replaces the file at `path` with `bytes` so that a crash or a power loss leaves either the
/// old or the new content: written to `path` + `.tmp`, synced, renamed, and the directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes a directory's entries (a created, renamed or removed file) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// `{start}-{nonce}`: the UTC start time to milliseconds and 16 random bits.
fn segment_marker() -> String {
    let now = OffsetDateTime::now_utc();
    let nonce = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0xffff;
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:03}Z-{nonce:04x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    )
}

fn format_day(day: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

fn parse_day(text: &str) -> Option<Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(text, &format).ok()
}

/// Caps a record's token counts at the largest a store keeps (`i64::MAX`, a `BIGINT`): a backend
/// may report any number, and a count hashed into the chain larger than the one stored would
/// read as a changed record.
fn clamp_token_counts(record: &mut AuditRecord) {
    const MAX: u64 = i64::MAX as u64;
    if let Some(usage) = record.usage.as_mut() {
        for count in [
            &mut usage.prompt_tokens,
            &mut usage.completion_tokens,
            &mut usage.total_tokens,
            &mut usage.cached_tokens,
            &mut usage.reasoning_tokens,
        ] {
            *count = (*count).min(MAX);
        }
    }
}

/// The start of `at`'s UTC day: a chain's records all lie in its day.
pub(crate) fn day_start(at: OffsetDateTime) -> OffsetDateTime {
    at.to_offset(time::UtcOffset::UTC)
        .replace_time(time::Time::MIDNIGHT)
}

/// The first UTC midnight at or after `at`.
pub(crate) fn day_end_at_or_after(at: OffsetDateTime) -> OffsetDateTime {
    let start = day_start(at);
    if start == at {
        start
    } else {
        start + time::Duration::days(1)
    }
}

/// UTC, truncated to whole microseconds.
fn canonical_time(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.to_offset(UtcOffset::UTC);
    at.replace_nanosecond(at.nanosecond() / 1_000 * 1_000)
        .unwrap_or(at)
}

/// The content of a record, apart from its metadata: what retention may remove first.
type Content<'a> = (
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
    &'a Option<String>,
);

fn content_of(record: &AuditRecord) -> Content<'_> {
    (
        &record.backend_request_body,
        &record.backend_response_body,
        &record.request_messages,
        &record.response_messages,
    )
}

/// Whether a record holds no content at all (never captured, or expired).
fn has_no_content(record: &AuditRecord) -> bool {
    let (a, b, c, d) = content_of(record);
    a.is_none() && b.is_none() && c.is_none() && d.is_none()
}

/// Hex SHA-256 of a record's content as [`Chainer::link`] hashes it now (format 2, see the module
/// docs).
pub fn content_hash(record: &AuditRecord) -> String {
    hash_content(&content_of(record))
}

/// Opens the input of a format-2 content hash. A format-1 input is JSON and opens with `[`, so no
/// input of one format is an input of the other.
const CONTENT_HASH_TAG: &[u8] = b"gatehouse-audit-content/2\n";

/// Format 2: SHA-256 over [`CONTENT_HASH_TAG`] and each of the four fields as a presence byte
/// (`0` absent, `1` present) followed, when present, by its length in bytes (u64, big-endian) and
/// its UTF-8 bytes as they are. The text is hashed as it is: no escaping, one `update` a field.
fn hash_content(content: &Content<'_>) -> String {
    let (a, b, c, d) = *content;
    let mut hasher = Sha256::new();
    hasher.update(CONTENT_HASH_TAG);
    for field in [a, b, c, d] {
        match field {
            None => hasher.update([0]),
            Some(text) => {
                hasher.update([1]);
                hasher.update((text.len() as u64).to_be_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    hex::encode(hasher.finalize())
}

/// Hex SHA-256 of a record's content as records linked before format 2 carry it (format 1: the
/// canonical JSON of the four fields as an array). [`verify`] still accepts it.
pub fn content_hash_format_1(record: &AuditRecord) -> Result<String, serde_json::Error> {
    hash_content_json(&content_of(record))
}

fn hash_content_json(content: &Content<'_>) -> Result<String, serde_json::Error> {
    json_sha256(b"", content, b"")
}

/// Whether `hash` is the content hash of `record`'s content in either format.
///
/// Stores written before an empty prompt or completion was kept as one empty piece (`454e45e`)
/// stored it as no piece at all, so such a message, linked as `Some("")`, reads back as `None`.
/// A message that reads back absent is therefore also tried as empty: the two differ by no text,
/// and every other field must still match as it is.
fn content_matches(record: &AuditRecord, hash: &str) -> bool {
    let matches = |content: &Content<'_>| {
        hash_content(content) == hash || hash_content_json(content).is_ok_and(|json| json == hash)
    };
    let content = content_of(record);
    if matches(&content) {
        return true;
    }
    let (request_body, response_body, request_messages, response_messages) = content;
    if request_messages.is_some() && response_messages.is_some() {
        return false;
    }
    let empty = Some(String::new());
    let request_choices = if request_messages.is_none() {
        vec![request_messages, &empty]
    } else {
        vec![request_messages]
    };
    let response_choices = if response_messages.is_none() {
        vec![response_messages, &empty]
    } else {
        vec![response_messages]
    };
    request_choices.iter().any(|request| {
        response_choices
            .iter()
            .any(|response| matches(&(request_body, response_body, request, response)))
    })
}

/// Hex SHA-256 over `previous_hash`, the canonical JSON of `record` without its content and its
/// `chain`, and `content_hash`.
pub fn record_hash(
    previous_hash: &str,
    record: &AuditRecord,
    content_hash: &str,
) -> Result<String, serde_json::Error> {
    let mut metadata = record.clone();
    metadata.chain = None;
    take_content(&mut metadata);
    hash_metadata(previous_hash, &metadata, content_hash)
}

/// [`record_hash`] of a record whose content and `chain` are already `None`.
fn hash_metadata(
    previous_hash: &str,
    metadata: &AuditRecord,
    content_hash: &str,
) -> Result<String, serde_json::Error> {
    json_sha256(previous_hash.as_bytes(), metadata, content_hash.as_bytes())
}

/// A record's content, owned.
type OwnedContent = [Option<String>; 4];

/// Takes a record's content out of it, leaving `None`s.
fn take_content(record: &mut AuditRecord) -> OwnedContent {
    [
        record.backend_request_body.take(),
        record.backend_response_body.take(),
        record.request_messages.take(),
        record.response_messages.take(),
    ]
}

/// Puts back what [`take_content`] took.
fn put_content(record: &mut AuditRecord, content: OwnedContent) {
    let [
        request_body,
        response_body,
        request_messages,
        response_messages,
    ] = content;
    record.backend_request_body = request_body;
    record.backend_response_body = response_body;
    record.request_messages = request_messages;
    record.response_messages = response_messages;
}

/// Bytes of serde's output gathered before they are handed to SHA-256.
const HASH_BUFFER: usize = 8 * 1024;

/// Hex SHA-256 over `prefix`, the canonical JSON of `value` and `suffix`.
///
/// serde writes a JSON string in fragments, one between every two escapes: a captured body is
/// JSON text whose every quote is escaped, so fragments of a few bytes. The JSON is gathered in a
/// buffer and hashed a buffer at a time, since handing SHA-256 each fragment on its own (its block
/// bookkeeping on every call) cost more than the hashing. The bytes hashed are the same.
fn json_sha256(
    prefix: &[u8],
    value: &impl Serialize,
    suffix: &[u8],
) -> Result<String, serde_json::Error> {
    let mut hasher = Sha256::new();
    hasher.update(prefix);
    let mut writer = io::BufWriter::with_capacity(HASH_BUFFER, HashWriter(hasher));
    serde_json::to_writer(&mut writer, value)?;
    let HashWriter(mut hasher) = writer
        .into_inner()
        .map_err(|error| serde_json::Error::io(error.into_error()))?;
    hasher.update(suffix);
    Ok(hex::encode(hasher.finalize()))
}

/// Feeds what it is given into the hash.
struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn parse_hash(text: &str) -> Option<Hash> {
    let mut hash = [0; 32];
    hex::decode_to_slice(text, &mut hash).ok()?;
    Some(hash)
}

/// Why a chain is broken at a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BreakReason {
    /// The record's content does not match its `record_hash`: it was changed after it was written.
    Changed,
    /// Records are missing before this one: its sequence skips some, or its `previous_hash` is not
    /// the hash of the record before it (one was removed, or the one before was rewritten
    /// together with its hash).
    Removed,
    /// The record comes before a record it follows in the chain.
    Reordered,
    /// Two records, each intact, claim the same place in the chain: two writers extended it
    /// (gateways that share one `gateway_id`), or a record was inserted with a hash of its own.
    Forked,
    /// The record verifies within the store, but its hash is not the one the gateway published
    /// for it ([`PublishedHead`]): it, or records before it, were rewritten together with every
    /// hash after them.
    Rewritten,
}

impl std::fmt::Display for BreakReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BreakReason::Changed => "changed",
            BreakReason::Removed => "removed",
            BreakReason::Reordered => "reordered",
            BreakReason::Forked => "forked",
            BreakReason::Rewritten => "rewritten",
        })
    }
}

/// The first record at which a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainBreak {
    /// The record's sequence in its chain.
    pub sequence: u64,
    /// The record's `CorrelationId`.
    pub correlation_id: String,
    /// What is wrong.
    pub reason: BreakReason,
    /// The same for a person, with the numbers.
    pub detail: String,
}

/// The result for one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// `{GatewayId}/{YYYY-MM-DD}`, with a `#…` marker for a segment.
    pub chain_id: String,
    /// Records of the chain checked (those after a break included).
    pub records: u64,
    /// Exact copies of the record before them, skipped (a replay after a crash).
    pub duplicates: u64,
    /// The first record that does not verify, if any.
    pub first_break: Option<ChainBreak>,
}

impl ChainReport {
    /// Whether every record checked verifies.
    pub fn is_intact(&self) -> bool {
        self.first_break.is_none()
    }

    /// The segment marker of a chain started without knowing that day's earlier chain (see the
    /// module docs), if this is one.
    pub fn segment_marker(&self) -> Option<&str> {
        self.chain_id.split_once('#').map(|(_, marker)| marker)
    }
}

/// The result of a verification, chain by chain in chain id order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// One report per chain with records checked.
    pub chains: Vec<ChainReport>,
    /// Records checked that carry no chain link (written before chaining, or inserted).
    pub unchained: u64,
    /// Lines of a JSON-lines file that are not an audit record.
    pub unreadable: u64,
}

impl VerifyReport {
    /// Whether every chain verifies and every record checked was chained and readable.
    pub fn is_intact(&self) -> bool {
        self.unchained == 0
            && self.unreadable == 0
            && self.chains.iter().all(ChainReport::is_intact)
    }

    /// The first break, in chain id order.
    pub fn first_break(&self) -> Option<(&ChainReport, &ChainBreak)> {
        self.chains
            .iter()
            .find_map(|chain| chain.first_break.as_ref().map(|broken| (chain, broken)))
    }

    /// The report of the chain `chain_id`.
    pub fn chain(&self, chain_id: &str) -> Option<&ChainReport> {
        self.chains.iter().find(|chain| chain.chain_id == chain_id)
    }
}

/// The message of the log line in which the audit writer publishes a chain's head.
pub const HEAD_MESSAGE: &str = "audit chain head";

/// The target of that log line.
pub const HEAD_TARGET: &str = "gatehouse_audit::chain_head";

/// A chain's head as the audit writer published it outside the store: the sequence and
/// `record_hash` of the last record it had linked into the chain then. The writer logs one
/// (info, target `gatehouse_audit::chain_head`, message [`HEAD_MESSAGE`], fields `chain_id`,
/// `sequence`, `record_hash`) for each chain it linked into, at most a minute after the link and
/// when it stops. Kept where the store's administrators cannot change it (a log collector, a
/// SIEM), these lines let [`Verifier::expect_published`] find what the chain alone cannot: its
/// last records removed, or records rewritten together with every hash after them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedHead {
    /// The chain.
    pub chain_id: String,
    /// The sequence of the chain's last record then.
    pub sequence: u64,
    /// Its `record_hash`.
    pub record_hash: String,
}

impl PublishedHead {
    /// The UTC day of the chain (`{GatewayId}/{YYYY-MM-DD}`, maybe with a `#…` marker).
    pub fn day(&self) -> Option<Date> {
        let (_, day) = self.chain_id.rsplit_once('/')?;
        parse_day(day.split('#').next().unwrap_or(day))
    }
}

/// Reads the heads the audit writer published from a file of its JSON log lines (other lines
/// are skipped: give it the gateway's whole log, or the lines a collector kept), the newest head
/// of each chain (the highest sequence).
pub fn read_published_heads(path: impl AsRef<Path>) -> io::Result<Vec<PublishedHead>> {
    let reader = BufReader::new(File::open(path)?);
    let mut newest: BTreeMap<String, PublishedHead> = BTreeMap::new();
    for line in reader.lines() {
        let line = line?;
        let Ok(serde_json::Value::Object(object)) = serde_json::from_str(&line) else {
            continue;
        };
        // Flattened (the gateway's JSON logs) or under `fields` (tracing's default JSON layout).
        let fields = match object.get("fields") {
            Some(serde_json::Value::Object(fields)) => fields,
            _ => &object,
        };
        if fields.get("message").and_then(serde_json::Value::as_str) != Some(HEAD_MESSAGE) {
            continue;
        }
        // Only the writer's own lines: another event could not carry this message, but a line
        // that names another target is not one of them.
        if object
            .get("target")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|target| target != HEAD_TARGET)
        {
            continue;
        }
        let head = (|| {
            Some(PublishedHead {
                chain_id: fields.get("chain_id")?.as_str()?.to_owned(),
                sequence: fields.get("sequence")?.as_u64()?,
                record_hash: fields.get("record_hash")?.as_str()?.to_owned(),
            })
        })();
        let Some(head) = head else {
            continue;
        };
        match newest.get(&head.chain_id) {
            Some(known) if known.sequence >= head.sequence => {}
            _ => {
                newest.insert(head.chain_id.clone(), head);
            }
        }
    }
    Ok(newest.into_values().collect())
}

/// The newest of `heads` for each chain (the highest sequence), with its hash as verification
/// compares it.
fn newest_heads<'a>(
    heads: impl IntoIterator<Item = &'a PublishedHead>,
) -> HashMap<&'a str, (u64, Option<Hash>)> {
    let mut newest: HashMap<&str, (u64, Option<Hash>)> = HashMap::new();
    for head in heads {
        let entry = newest
            .entry(head.chain_id.as_str())
            .or_insert((head.sequence, None));
        if entry.0 <= head.sequence {
            *entry = (head.sequence, parse_hash(&head.record_hash));
        }
    }
    newest
}

/// What verification needs of a chained record; the record itself is not kept.
#[derive(Debug)]
struct Linked {
    sequence: u64,
    previous_hash: Option<Hash>,
    record_hash: Option<Hash>,
    /// Whether the content hashes to `record_hash`.
    content_ok: bool,
    correlation_id: String,
    /// Where the record was in the input (file line or call order).
    position: u64,
}

/// Splits a record into its chain id and what verification needs of it; `None` when unchained.
/// A record made at or after `content_since` must still hold the content it was linked with;
/// one made before may have lost it to retention.
fn digest(
    mut record: AuditRecord,
    position: u64,
    content_since: Option<OffsetDateTime>,
) -> Option<(String, Linked)> {
    let link = record.chain.take()?;
    // Content removed by retention cannot be checked, but the metadata still can, through the
    // content hash the link carries. Within the content window no content may be missing: a
    // record whose bodies and messages were all deleted there was tampered with.
    let removable = content_since.is_none_or(|since| record.time_generated < since);
    let content_ok = (content_matches(&record, &link.content_hash)
        || (removable && has_no_content(&record)))
        && record_hash(&link.previous_hash, &record, &link.content_hash)
            .is_ok_and(|hash| hash == link.record_hash);
    Some((
        link.chain_id,
        Linked {
            sequence: link.sequence,
            previous_hash: parse_hash(&link.previous_hash),
            record_hash: parse_hash(&link.record_hash),
            content_ok,
            correlation_id: record.correlation_id,
            position,
        },
    ))
}

fn same(a: Option<Hash>, b: Option<Hash>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a == b)
}

/// One chain's verification so far.
#[derive(Debug, Default)]
struct ChainProgress {
    /// Sequence, hash and position of the last record accepted (or anchored).
    last: Option<(u64, Option<Hash>, u64)>,
    records: u64,
    duplicates: u64,
    first_break: Option<ChainBreak>,
    /// The head published for the chain ([`PublishedHead`]), and whether its record was met.
    published: Option<(u64, Option<Hash>)>,
    published_met: bool,
}

impl ChainProgress {
    fn anchor(&mut self, linked: &Linked) {
        self.last = Some((linked.sequence, linked.record_hash, linked.position));
        // A head at or before the record a range starts after is not for this check to meet.
        if self
            .published
            .is_some_and(|(sequence, _)| sequence <= linked.sequence)
        {
            self.published_met = true;
        }
    }

    fn check(&mut self, linked: Linked) {
        if self.first_break.is_some() {
            self.records += 1;
            return;
        }
        if let Some((sequence, hash, _)) = self.last
            && linked.sequence == sequence
            && linked.content_ok
            && same(linked.record_hash, hash)
        {
            self.duplicates += 1;
            return;
        }
        self.records += 1;
        let broken = match self.last {
            None if linked.sequence != 0 => Some((
                BreakReason::Removed,
                format!(
                    "the chain starts at sequence {}: records 0 to {} are missing",
                    linked.sequence,
                    linked.sequence - 1
                ),
            )),
            None if !same(linked.previous_hash, Some([0; 32])) => Some((
                BreakReason::Removed,
                "the first record of the chain does not start from the genesis hash".to_owned(),
            )),
            None => None,
            Some((last, _, _)) if linked.sequence > last + 1 => Some((
                BreakReason::Removed,
                if linked.sequence == last + 2 {
                    format!("record {} is missing", last + 1)
                } else {
                    format!(
                        "records {} to {} are missing",
                        last + 1,
                        linked.sequence - 1
                    )
                },
            )),
            Some((last, _, _)) if linked.sequence == last && linked.content_ok => Some((
                BreakReason::Forked,
                format!(
                    "a second record, itself intact, claims sequence {last}: two gateways that \
                     share one gateway_id write this chain (give each replica its own \
                     server.gateway_id), or a record was inserted"
                ),
            )),
            Some((last, _, _)) if linked.sequence == last => Some((
                BreakReason::Reordered,
                format!("a second, different record claims sequence {last}"),
            )),
            Some((last, _, _)) if linked.sequence < last => Some((
                BreakReason::Reordered,
                format!("sequence {} comes after sequence {last}", linked.sequence),
            )),
            Some((last, hash, _)) if !same(linked.previous_hash, hash) => Some((
                BreakReason::Removed,
                format!(
                    "its previous hash is not the hash of record {last}: a record between them \
                     was removed, or record {last} was rewritten with a new hash"
                ),
            )),
            Some((last, _, position)) if linked.position < position => Some((
                BreakReason::Reordered,
                format!("it is stored before record {last}, which it follows"),
            )),
            Some(_) => None,
        }
        .or_else(|| {
            (!linked.content_ok).then(|| {
                (
                    BreakReason::Changed,
                    "its content does not match its record hash".to_owned(),
                )
            })
        })
        .or_else(|| {
            let (sequence, hash) = self.published?;
            if linked.sequence != sequence {
                return None;
            }
            self.published_met = true;
            (!same(linked.record_hash, hash)).then(|| {
                (
                    BreakReason::Rewritten,
                    format!(
                        "its hash is not the one the gateway published for record {sequence}: \
                         it or records before it were rewritten, with every hash after them"
                    ),
                )
            })
        });
        match broken {
            Some((reason, detail)) => {
                self.first_break = Some(ChainBreak {
                    sequence: linked.sequence,
                    correlation_id: linked.correlation_id,
                    reason,
                    detail,
                });
            }
            None => self.anchor(&linked),
        }
    }

    fn report(mut self, chain_id: String) -> ChainReport {
        if self.first_break.is_none()
            && let Some((published, _)) = self.published
            && !self.published_met
        {
            let (next, detail) = match self.last {
                Some((last, _, _)) => (
                    last + 1,
                    format!(
                        "the chain ends at record {last}, but the gateway published its head at \
                         record {published}: {} removed",
                        if last + 1 == published {
                            format!("record {published} was")
                        } else {
                            format!("records {} to {published} were", last + 1)
                        }
                    ),
                ),
                None => (
                    0,
                    format!(
                        "no record of the chain is stored, but the gateway published its head at \
                         record {published}"
                    ),
                ),
            };
            self.first_break = Some(ChainBreak {
                sequence: next,
                correlation_id: String::new(),
                reason: BreakReason::Removed,
                detail,
            });
        }
        ChainReport {
            chain_id,
            records: self.records,
            duplicates: self.duplicates,
            first_break: self.first_break,
        }
    }
}

/// Verifies records fed one at a time, in (chain id, sequence) order.
///
/// For a time range, feed the record just before the range of each chain (by sequence) to
/// [`Verifier::anchor`] first, then the records of the range to [`Verifier::check`]; without an
/// anchor a chain must start at sequence 0.
#[derive(Debug, Default)]
pub struct Verifier {
    chains: BTreeMap<String, ChainProgress>,
    unchained: u64,
    position: u64,
    content_since: Option<OffsetDateTime>,
}

impl Verifier {
    /// A verifier with nothing checked, which takes a record without its content as one whose
    /// content retention removed.
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// This verifier, taking a record made at or after `since` without the content it was
    /// linked with as changed: retention removes content only from records older than its
    /// window, so within the window missing content was deleted by someone else.
    pub fn expecting_content_since(mut self, since: OffsetDateTime) -> Verifier {
        self.content_since = Some(since);
        self
    }

    /// Checks the chains against the heads the gateway published for them ([`PublishedHead`],
    /// the newest of each chain counts): the record at a head's sequence must carry its hash,
    /// and a chain must reach it. Give only the heads of the chains the verification covers
    /// (their days): a chain with a head and no record checked is reported removed.
    pub fn expect_published<'a>(&mut self, heads: impl IntoIterator<Item = &'a PublishedHead>) {
        for (chain_id, head) in newest_heads(heads) {
            self.chains
                .entry(chain_id.to_owned())
                .or_default()
                .published = Some(head);
        }
    }

    /// Takes `record` as the record before the checked ones in its chain, without checking it.
    pub fn anchor(&mut self, record: &AuditRecord) {
        if let Some(link) = &record.chain {
            let linked = Linked {
                sequence: link.sequence,
                previous_hash: parse_hash(&link.previous_hash),
                record_hash: parse_hash(&link.record_hash),
                content_ok: true,
                correlation_id: String::new(),
                position: self.next_position(),
            };
            self.chains
                .entry(link.chain_id.clone())
                .or_default()
                .anchor(&linked);
        }
    }

    /// Checks `record` against the record before it in its chain.
    pub fn check(&mut self, record: AuditRecord) {
        let position = self.next_position();
        match digest(record, position, self.content_since) {
            Some((chain_id, linked)) => self.chains.entry(chain_id).or_default().check(linked),
            None => self.unchained += 1,
        }
    }

    fn next_position(&mut self) -> u64 {
        self.position += 1;
        self.position
    }

    /// The report, chain by chain.
    pub fn finish(self) -> VerifyReport {
        VerifyReport {
            chains: self
                .chains
                .into_iter()
                .map(|(chain_id, progress)| progress.report(chain_id))
                .filter(|report| report.records > 0 || report.first_break.is_some())
                .collect(),
            unchained: self.unchained,
            unreadable: 0,
        }
    }
}

/// Verifies `records`, given in (chain id, sequence) order, every chain from sequence 0.
pub fn verify(records: impl IntoIterator<Item = AuditRecord>) -> VerifyReport {
    let mut verifier = Verifier::new();
    for record in records {
        verifier.check(record);
    }
    verifier.finish()
}

/// Verifies the chains of a JSON-lines file of audit records (one record per line, in write
/// order, as [`JsonLinesSink`](crate::JsonLinesSink) writes them) for records with
/// `from <= TimeGenerated < to` (either bound optional).
///
/// Every chain of a UTC day the range touches is checked whole, as
/// [`SqlStore::verify_chains`](crate::sql::SqlStore::verify_chains) checks stored chains: a range
/// checked from its first to its last record alone would miss a record removed just after it,
/// one changed and moved out of it by its `TimeGenerated`, or the first records of a day removed
/// with all the chain had in the range.
/// Since a chain follows the write order, a record is also [`BreakReason::Reordered`] when it
/// stands in the file before the record it follows. Memory: a small summary (about 150 bytes)
/// per chained record of the file.
pub fn verify_jsonl(
    path: impl AsRef<Path>,
    from: Option<OffsetDateTime>,
    to: Option<OffsetDateTime>,
    published: &[PublishedHead],
) -> io::Result<VerifyReport> {
    let in_range =
        |at: OffsetDateTime| from.is_none_or(|from| at >= from) && to.is_none_or(|to| at < to);
    let mut reader = BufReader::new(File::open(path)?);
    // Whether the UTC day of a record (its chain's day) overlaps the range: whether the record
    // lies between the start of `from`'s day and the first midnight at or after `to`.
    let (days_from, days_to) = (from.map(day_start), to.map(day_end_at_or_after));
    let day_touched = |at: OffsetDateTime| {
        days_from.is_none_or(|start| at >= start) && days_to.is_none_or(|end| at < end)
    };
    let mut chains: HashMap<String, (Vec<Linked>, bool)> = HashMap::new();
    let mut report = VerifyReport::default();
    let mut line = Vec::new();
    let mut number = 0_u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let record: AuditRecord = match serde_json::from_slice(&line) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(line = number, %error, "not an audit record");
                report.unreadable += 1;
                continue;
            }
        };
        let in_range = in_range(record.time_generated);
        let touched = day_touched(record.time_generated);
        // Nothing removes content from a JSON-lines file: a record without the content it was
        // linked with was edited.
        match digest(record, number, Some(OffsetDateTime::UNIX_EPOCH)) {
            Some((chain_id, linked)) => {
                let (records, day_in_range) = chains.entry(chain_id).or_default();
                records.push(linked);
                *day_in_range |= touched;
            }
            None if in_range => report.unchained += 1,
            None => {}
        }
    }
    // A published head of a day the range touches names a chain that must be there, when the
    // file is of its gateway (a collector's log may hold the heads of several).
    let gateways: std::collections::HashSet<String> = chains
        .keys()
        .filter_map(|chain_id| {
            chain_id
                .rsplit_once('/')
                .map(|(gateway, _)| gateway.to_owned())
        })
        .collect();
    for head in published {
        let expected = head
            .chain_id
            .rsplit_once('/')
            .is_some_and(|(gateway, _)| gateways.contains(gateway))
            && head
                .day()
                .is_some_and(|day| day_touched(day.midnight().assume_utc()));
        if expected {
            chains.entry(head.chain_id.clone()).or_default().1 = true;
        }
    }
    let mut chains: Vec<_> = chains
        .into_iter()
        .filter(|(_, (_, day_in_range))| *day_in_range)
        .collect();
    chains.sort_by(|a, b| a.0.cmp(&b.0));
    let newest = newest_heads(published);
    for (chain_id, (mut records, _)) in chains {
        records.sort_by_key(|linked| (linked.sequence, linked.position));
        let mut progress = ChainProgress {
            published: newest.get(chain_id.as_str()).copied(),
            ..ChainProgress::default()
        };
        for linked in records {
            progress.check(linked);
        }
        report.chains.push(progress.report(chain_id));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_time_is_utc_microseconds() {
        let at = time::macros::datetime!(2025-03-01 23:30:00.123456789 -02:00);
        let canonical = canonical_time(at);
        assert_eq!(canonical.offset(), UtcOffset::UTC);
        assert_eq!(canonical.nanosecond(), 123_456_000);
        assert_eq!(format_day(canonical.date()), "2025-03-02");
    }

    #[test]
    fn days_round_trip() {
        let day = time::macros::date!(2025 - 03 - 01);
        assert_eq!(parse_day(&format_day(day)), Some(day));
    }

    #[test]
    fn the_buffered_hash_is_the_hash_of_the_whole_json() {
        // A body full of escapes, several buffers long, between a prefix and a suffix.
        let body = r#"{"messages":[{"role":"user","content":"say \"hi\"\n"}]}"#.repeat(900);
        assert!(body.len() > 5 * HASH_BUFFER);
        let content = (
            Some(body.clone()),
            None::<String>,
            Some(body),
            Some("é".to_owned()),
        );
        let mut whole = b"previous".to_vec();
        whole.extend(serde_json::to_vec(&content).unwrap());
        whole.extend(b"suffix");
        assert_eq!(
            json_sha256(b"previous", &content, b"suffix").unwrap(),
            hex::encode(Sha256::digest(&whole))
        );
        assert_eq!(
            json_sha256(b"", &content, b"").unwrap(),
            hex::encode(Sha256::digest(serde_json::to_vec(&content).unwrap()))
        );
    }

    #[test]
    fn a_segment_marker_names_the_start_time() {
        let marker = segment_marker();
        assert_eq!(marker.len(), "20250301T101500.123Z-4f2a".len(), "{marker}");
        assert_eq!(&marker[8..9], "T");
    }
}
