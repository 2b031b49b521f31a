//! Tamper evidence: a changed, removed or moved record is named by the verifier; a clean chain,
//! a replayed duplicate or a record read back from a store is not.

#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use gatehouse_audit::AuditRecord;
use gatehouse_audit::chain::{
    BreakReason, ChainBreak, Chainer, GENESIS_HASH, HEAD_MESSAGE, PublishedHead, STATE_FILE,
    Verifier, VerifyReport, read_published_heads, verify, verify_jsonl,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::datetime;

const DAY_ONE: OffsetDateTime = datetime!(2025-03-01 23:59:50 UTC);

fn record(i: usize, at: OffsetDateTime) -> AuditRecord {
    AuditRecord {
        time_generated: at,
        correlation_id: format!("call-{i:05}"),
        gateway_id: "gw-1".to_owned(),
        operation_id: None,
        caller_ip_address: "10.0.0.7".to_owned(),
        peer_ip_address: "10.0.0.7".to_owned(),
        method: "POST".to_owned(),
        url: "/openai/deployments/gpt-4o/chat/completions".to_owned(),
        client_protocol: "HTTP/2.0".to_owned(),
        response_code: 200,
        is_request_success: true,
        backend_response_code: Some(200),
        backend_id: Some("east".to_owned()),
        backend_url: None,
        request_size: 100,
        response_size: 400,
        total_time: 20,
        backend_time: 18,
        time_to_first_byte: None,
        time_to_first_token: None,
        apim_subscription_id: Some("team-a".to_owned()),
        product_id: None,
        user_id: None,
        user_name: None,
        tenant_id: None,
        groups: vec!["g-1".to_owned()],
        deployment_name: Some("gpt-4o".to_owned()),
        model_name: None,
        api_version: None,
        is_stream_completion: false,
        usage: None,
        attempts: vec![],
        backend_request_body: Some(format!(r#"{{"prompt":"number {i}"}}"#)),
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

/// `count` records a second apart from `start`, linked in that order.
fn linked(count: usize, start: OffsetDateTime) -> Vec<AuditRecord> {
    let mut chainer = Chainer::in_memory();
    (0..count)
        .map(|i| {
            let seconds = u64::try_from(i).expect("small");
            let mut record = record(i, start + Duration::from_secs(seconds));
            chainer.link(&mut record);
            record
        })
        .collect()
}

fn write_jsonl(path: &Path, records: &[AuditRecord]) {
    let mut file = std::fs::File::create(path).unwrap();
    for record in records {
        serde_json::to_writer(&mut file, record).unwrap();
        file.write_all(b"\n").unwrap();
    }
}

fn first_break(report: &VerifyReport) -> ChainBreak {
    report
        .first_break()
        .map(|(_, broken)| broken.clone())
        .expect("a break")
}

fn link_of(record: &AuditRecord) -> &gatehouse_schema::audit::ChainLink {
    record.chain.as_ref().expect("linked")
}

/// The content hash of format 2: the tag, then each field as a presence byte and, when present,
/// its length (u64, big-endian) and bytes.
fn content_hash_v2(record: &AuditRecord) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"gatehouse-audit-content/2\n");
    for field in content_fields(record) {
        match field {
            None => hasher.update([0]),
            Some(text) => {
                hasher.update([1]);
                hasher.update(u64::try_from(text.len()).unwrap().to_be_bytes());
                hasher.update(text.as_bytes());
            }
        }
    }
    hex::encode(hasher.finalize())
}

/// The content hash of format 1 (records linked before format 2): SHA-256 of the four fields
/// as a JSON array.
fn content_hash_v1(record: &AuditRecord) -> String {
    hex::encode(Sha256::digest(
        serde_json::to_vec(&content_fields(record)).unwrap(),
    ))
}

fn content_fields(record: &AuditRecord) -> [Option<&str>; 4] {
    [
        record.backend_request_body.as_deref(),
        record.backend_response_body.as_deref(),
        record.request_messages.as_deref(),
        record.response_messages.as_deref(),
    ]
}

/// SHA-256 over the previous hash, the record's metadata as JSON and the content hash.
fn record_hash_of(previous: &str, record: &AuditRecord, content_hash: &str) -> String {
    let mut metadata = record.clone();
    metadata.chain = None;
    metadata.backend_request_body = None;
    metadata.backend_response_body = None;
    metadata.request_messages = None;
    metadata.response_messages = None;
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(serde_json::to_vec(&metadata).unwrap());
    hasher.update(content_hash.as_bytes());
    hex::encode(hasher.finalize())
}

/// `records` linked by hand the way a writer of format 1 linked them.
fn linked_in_format_1(records: &mut [AuditRecord]) {
    let mut previous = GENESIS_HASH.to_owned();
    for (sequence, record) in records.iter_mut().enumerate() {
        record.chain = None;
        let content_hash = content_hash_v1(record);
        let record_hash = record_hash_of(&previous, record, &content_hash);
        record.chain = Some(gatehouse_schema::audit::ChainLink {
            chain_id: "gw-1/2025-03-01".to_owned(),
            sequence: sequence as u64,
            previous_hash: std::mem::replace(&mut previous, record_hash.clone()),
            record_hash,
            content_hash,
        });
    }
}

#[test]
fn the_link_is_sha256_of_the_previous_hash_the_metadata_and_the_content_as_it_is() {
    let mut records = linked(3, datetime!(2025-03-01 10:00 UTC));
    records[2].request_messages = Some("[\"a \\\"quoted\\\" prompt\"]".to_owned());
    records[2].chain = None;
    let mut chainer = Chainer::in_memory();
    for record in &mut records {
        chainer.link(record);
    }
    let mut previous = GENESIS_HASH.to_owned();
    for (sequence, record) in records.iter().enumerate() {
        let link = link_of(record);
        let content_hash = content_hash_v2(record);
        assert_eq!(link.sequence, sequence as u64);
        assert_eq!(link.previous_hash, previous);
        assert_eq!(link.content_hash, content_hash);
        assert_ne!(link.content_hash, content_hash_v1(record));
        assert_eq!(
            link.record_hash,
            record_hash_of(&previous, record, &content_hash)
        );
        previous.clone_from(&link.record_hash);
    }
}

#[test]
fn content_moved_between_fields_or_across_their_boundary_is_changed() {
    let mut records = linked(4, datetime!(2025-03-01 10:00 UTC));
    for record in &mut records {
        record.chain = None;
        record.backend_request_body = Some("ab".to_owned());
        record.backend_response_body = Some("c".to_owned());
    }
    let mut chainer = Chainer::in_memory();
    for record in &mut records {
        chainer.link(record);
    }
    assert!(verify(records.clone()).is_intact());

    // The same bytes, the boundary moved: "a" and "bc".
    let mut shifted = records.clone();
    shifted[1].backend_request_body = Some("a".to_owned());
    shifted[1].backend_response_body = Some("bc".to_owned());
    let broken = first_break(&verify(shifted));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 1));

    // The request body moved to the prompt's field.
    records[3].request_messages = records[3].backend_request_body.take();
    let broken = first_break(&verify(records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 3));
}

#[test]
fn records_linked_in_format_1_still_verify_and_their_changes_are_named() {
    let mut records: Vec<_> = (0..6)
        .map(|i| {
            let mut record = record(i, datetime!(2025-03-01 10:00 UTC));
            record.response_messages = Some(format!("[\"answer {i}\"]"));
            record
        })
        .collect();
    linked_in_format_1(&mut records);
    assert!(verify(records.clone()).is_intact());

    // Content removed by retention from a format-1 record still leaves its metadata verifiable.
    records[1].backend_request_body = None;
    records[1].response_messages = None;
    assert!(verify(records.clone()).is_intact());

    records[3].response_messages = Some("[\"a different answer\"]".to_owned());
    let broken = first_break(&verify(records.clone()));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 3));

    // A format-1 chain continued by a writer of format 2 verifies across the change.
    let mut later = records[..3].to_vec();
    let head = link_of(&later[2]).clone();
    let mut next = record(9, datetime!(2025-03-01 10:00 UTC));
    next.chain = None;
    let content_hash = content_hash_v2(&next);
    let record_hash = record_hash_of(&head.record_hash, &next, &content_hash);
    next.chain = Some(gatehouse_schema::audit::ChainLink {
        sequence: 3,
        previous_hash: head.record_hash,
        record_hash,
        content_hash,
        ..head
    });
    later.push(next);
    assert!(verify(later).is_intact());
}

#[test]
fn a_clean_chain_verifies_across_two_days() {
    // Twenty records a second apart from ten seconds before midnight: two days, two chains.
    let records = linked(20, DAY_ONE);
    let chain_ids: Vec<_> = records
        .iter()
        .map(|r| link_of(r).chain_id.clone())
        .collect();
    assert!(
        chain_ids[9].starts_with("gw-1/2025-03-01"),
        "{}",
        chain_ids[9]
    );
    assert!(
        chain_ids[10].starts_with("gw-1/2025-03-02"),
        "{}",
        chain_ids[10]
    );
    assert_eq!(link_of(&records[10]).sequence, 0);

    let report = verify(records.clone());
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains.len(), 2);
    assert!(report.chains.iter().all(|chain| chain.records == 10));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_jsonl(&path, &records);
    let report = verify_jsonl(&path, None, None, &[]).unwrap();
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains.len(), 2);
}

#[test]
fn records_from_both_days_interleaved_in_write_order_verify() {
    // A long call that began before midnight is written after calls of the new day.
    let mut chainer = Chainer::in_memory();
    let times = [0, 15, 16, 2, 17, 5, 18];
    let records: Vec<_> = times
        .iter()
        .enumerate()
        .map(|(i, seconds)| {
            let mut record = record(i, DAY_ONE + Duration::from_secs(*seconds));
            chainer.link(&mut record);
            record
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_jsonl(&path, &records);
    let report = verify_jsonl(&path, None, None, &[]).unwrap();
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains.len(), 2);
    assert_eq!(report.chains[0].records, 3);
    assert_eq!(report.chains[1].records, 4);
}

#[test]
fn a_changed_field_names_that_record_as_changed() {
    let mut records = linked(10, datetime!(2025-03-01 10:00 UTC));
    records[4].url = "/openai/deployments/gpt-4o-mini/chat/completions".to_owned();
    let broken = first_break(&verify(records));
    assert_eq!(broken.reason, BreakReason::Changed);
    assert_eq!(broken.sequence, 4);
    assert_eq!(broken.correlation_id, "call-00004");
}

/// A record whose content was all taken out is taken for one whose content retention removed
/// by `verify`, which knows no window; nothing removes content from a JSON-lines file, so there
/// it is `changed`, and so it is for a verifier told where the content window starts.
#[test]
fn content_taken_out_of_a_record_inside_its_window_is_changed() {
    let mut records = linked(6, datetime!(2025-03-01 10:00 UTC));
    records[3].backend_request_body = None;
    records[3].backend_response_body = None;
    records[3].request_messages = None;
    records[3].response_messages = None;
    assert!(verify(records.clone()).is_intact());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_jsonl(&path, &records);
    let broken = first_break(&verify_jsonl(&path, None, None, &[]).unwrap());
    assert_eq!(
        (broken.reason, broken.correlation_id.as_str()),
        (BreakReason::Changed, "call-00003")
    );

    let mut verifier = gatehouse_audit::chain::Verifier::new()
        .expecting_content_since(datetime!(2025-03-01 00:00 UTC));
    for record in records.clone() {
        verifier.check(record);
    }
    let broken = first_break(&verifier.finish());
    assert_eq!(broken.correlation_id, "call-00003");
    let mut verifier = gatehouse_audit::chain::Verifier::new()
        .expecting_content_since(datetime!(2025-03-02 00:00 UTC));
    for record in records {
        verifier.check(record);
    }
    assert!(verifier.finish().is_intact());
}

#[test]
fn a_deleted_record_names_the_record_after_the_gap_as_removed() {
    let mut records = linked(10, datetime!(2025-03-01 10:00 UTC));
    records.remove(4);
    let report = verify(records);
    let broken = first_break(&report);
    assert_eq!(broken.reason, BreakReason::Removed);
    assert_eq!(broken.sequence, 5);
    assert_eq!(broken.correlation_id, "call-00005");
    assert!(broken.detail.contains("record 4"), "{}", broken.detail);
}

#[test]
fn a_deleted_first_record_is_named_too() {
    let mut records = linked(5, datetime!(2025-03-01 10:00 UTC));
    records.remove(0);
    let broken = first_break(&verify(records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 1));
}

#[test]
fn a_record_rewritten_with_a_fresh_hash_breaks_the_next_link() {
    let mut records = linked(10, datetime!(2025-03-01 10:00 UTC));
    // Someone who knows the scheme rewrites record 4 and recomputes its hash…
    let mut forged = records[4].clone();
    let mut link = forged.chain.take().unwrap();
    forged.response_code = 500;
    link.record_hash =
        gatehouse_audit::chain::record_hash(&link.previous_hash, &forged, &link.content_hash)
            .unwrap();
    forged.chain = Some(link);
    records[4] = forged;
    // …then record 5 no longer follows it.
    let broken = first_break(&verify(records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 5));
}

#[test]
fn swapped_lines_of_a_jsonl_file_are_reordered() {
    let mut records = linked(10, datetime!(2025-03-01 10:00 UTC));
    records.swap(3, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_jsonl(&path, &records);
    let report = verify_jsonl(&path, None, None, &[]).unwrap();
    let broken = first_break(&report);
    assert_eq!(broken.reason, BreakReason::Reordered);
    assert_eq!(broken.sequence, 4);
    assert_eq!(broken.correlation_id, "call-00004");
}

#[test]
fn two_gateways_with_one_gateway_id_are_named_as_a_fork() {
    // Two days ahead: a day neither chainer started without knowing, so both chains get the
    // plain id `gw-1/{day}` (a gateway's first day is a segment with a marker of its own).
    let day = OffsetDateTime::now_utc() + Duration::from_secs(2 * 86_400);
    let mut one = Chainer::in_memory();
    let mut two = Chainer::in_memory();
    let mut records = Vec::new();
    for i in 0..6 {
        let at = day + Duration::from_secs(u64::try_from(i).expect("small"));
        let mut record = record(i, at);
        if i % 2 == 0 {
            one.link(&mut record);
        } else {
            two.link(&mut record);
        }
        records.push(record);
    }
    let chain = records[0].chain.as_ref().unwrap().chain_id.clone();
    assert_eq!(records[1].chain.as_ref().unwrap().chain_id, chain);
    assert!(!chain.contains('#'), "{chain}");
    // As a store reads them: by chain and sequence.
    records.sort_by_key(|r| r.chain.as_ref().unwrap().sequence);
    let report = verify(records);
    let broken = first_break(&report);
    assert_eq!(
        (
            broken.reason,
            broken.sequence,
            broken.correlation_id.as_str()
        ),
        (BreakReason::Forked, 0, "call-00001")
    );
    assert!(broken.detail.contains("gateway_id"), "{}", broken.detail);
}

#[test]
fn a_replayed_stretch_counts_as_duplicates_not_a_break() {
    let records = linked(15, datetime!(2025-03-01 10:00 UTC));
    let mut written = records[..10].to_vec();
    written.extend_from_slice(&records[5..10]);
    written.extend_from_slice(&records[10..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_jsonl(&path, &written);
    let report = verify_jsonl(&path, None, None, &[]).unwrap();
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(
        (report.chains[0].records, report.chains[0].duplicates),
        (15, 5)
    );
}

#[test]
fn a_time_range_checks_the_chains_it_touches_whole() {
    // Records one second apart; the range holds records 10 to 14.
    let start = datetime!(2025-03-01 10:00 UTC);
    let from = Some(start + Duration::from_secs(10));
    let to = Some(start + Duration::from_secs(15));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let check = |records: &[AuditRecord]| {
        write_jsonl(&path, records);
        verify_jsonl(&path, from, to, &[]).unwrap()
    };

    let report = check(&linked(20, start));
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains[0].records, 20);

    let mut records = linked(20, start);
    records[12].url = "/changed".to_owned();
    let broken = first_break(&check(&records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 12));

    let mut records = linked(20, start);
    records.remove(9);
    let broken = first_break(&check(&records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 10));
    assert!(broken.detail.contains("record 9"), "{}", broken.detail);

    // The record just after the range removed: the range's own records are intact, the chain
    // is not.
    let mut records = linked(20, start);
    records.remove(15);
    let broken = first_break(&check(&records));
    assert_eq!(broken.reason, BreakReason::Removed);

    // A record changed and moved out of the range by its time, after it or before it.
    for (index, moved_to) in [(14, 16), (10, 9)] {
        let mut records = linked(20, start);
        records[index].url = "/changed".to_owned();
        records[index].time_generated = start + Duration::from_secs(moved_to);
        let broken = first_break(&check(&records));
        assert_eq!(
            (broken.reason, broken.sequence),
            (BreakReason::Changed, index as u64),
            "record {index} moved to {moved_to} s"
        );
    }

    // Every record of the range removed: the chain has records on both sides, and shows the gap.
    let mut records = linked(20, start);
    records.drain(10..15);
    let report = check(&records);
    assert!(!report.is_intact(), "{report:#?}");
    assert_eq!(first_break(&report).reason, BreakReason::Removed);

    // A change elsewhere in a chain the range touches is named too (the SQL stores check chains
    // whole as well).
    let mut records = linked(20, start);
    records[3].url = "/changed".to_owned();
    let broken = first_break(&check(&records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 3));

    // The first records of the day removed up to the range's end: nothing of the chain is left
    // before the range, yet its day is in it, and the chain shows its missing start.
    let mut records = linked(20, start);
    records.drain(..15);
    let report = check(&records);
    assert_eq!(report.chains.len(), 1, "{report:#?}");
    assert_eq!(first_break(&report).reason, BreakReason::Removed);

    // A range on another day checks none of it.
    write_jsonl(&path, &linked(20, start));
    let next_day = Some(start + Duration::from_secs(86_400));
    let report = verify_jsonl(&path, next_day, None, &[]).unwrap();
    assert!(report.chains.is_empty(), "{report:#?}");
}

#[test]
fn a_verifier_takes_the_record_before_a_range_as_anchor() {
    let records = linked(10, datetime!(2025-03-01 10:00 UTC));
    let mut verifier = Verifier::new();
    verifier.anchor(&records[5]);
    for record in records[6..].iter().cloned() {
        verifier.check(record);
    }
    let report = verifier.finish();
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains[0].records, 4);

    // Without its anchor the range cannot be told apart from a chain missing its start.
    let report = verify(records[6..].to_vec());
    assert_eq!(first_break(&report).reason, BreakReason::Removed);
}

#[test]
fn unchained_records_are_reported() {
    let mut records = linked(3, datetime!(2025-03-01 10:00 UTC));
    records.push(record(99, datetime!(2025-03-01 10:00:05 UTC)));
    let report = verify(records);
    assert_eq!(report.unchained, 1);
    assert!(!report.is_intact());
}

#[test]
fn a_record_read_back_from_a_store_still_verifies() {
    let mut chainer = Chainer::in_memory();
    let mut record = record(1, datetime!(2025-03-01 23:30:00.123456789 -02:00));
    chainer.link(&mut record);
    assert_eq!(
        record.time_generated,
        datetime!(2025-03-02 01:30:00.123456 UTC)
    );
    assert!(link_of(&record).chain_id.starts_with("gw-1/2025-03-02"));
    let text = serde_json::to_string(&record).unwrap();
    let read_back: AuditRecord = serde_json::from_str(&text).unwrap();
    assert!(verify([read_back]).is_intact());
}

#[test]
fn the_chain_state_survives_a_restart_and_a_lost_state_starts_a_marked_segment() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join(STATE_FILE);
    let start = datetime!(2025-03-01 10:00 UTC);
    let mut all = Vec::new();
    let mut link_with = |chainer: &mut Chainer, range: std::ops::Range<usize>| {
        for i in range {
            let seconds = u64::try_from(i).expect("small");
            let mut record = record(i, start + Duration::from_secs(seconds));
            chainer.link(&mut record);
            all.push(record);
        }
        chainer.save().unwrap();
    };

    let mut chainer = Chainer::open(&state);
    link_with(&mut chainer, 0..3);
    let mut chainer = Chainer::open(&state);
    link_with(&mut chainer, 3..6);
    std::fs::remove_file(&state).unwrap();
    let mut chainer = Chainer::open(&state);
    link_with(&mut chainer, 6..9);

    let first = link_of(&all[0]).chain_id.clone();
    assert!(
        first.starts_with("gw-1/2025-03-01#"),
        "a first start is a marked segment: {first}"
    );
    assert_eq!(
        link_of(&all[5]).chain_id,
        first,
        "a restart continues the chain"
    );
    assert_eq!(link_of(&all[5]).sequence, 5);
    let segment = link_of(&all[6]).chain_id.clone();
    assert_ne!(segment, first, "a lost state never reuses a chain id");
    assert!(segment.starts_with("gw-1/2025-03-01#"), "{segment}");
    assert_eq!(link_of(&all[6]).sequence, 0);

    let report = verify(all);
    assert!(report.is_intact(), "{report:#?}");
    assert_eq!(report.chains.len(), 2);
}

#[test]
fn a_later_day_than_the_start_gets_a_plain_chain_id() {
    let mut chainer = Chainer::in_memory();
    let tomorrow = OffsetDateTime::now_utc() + Duration::from_secs(86_400);
    let mut record = record(1, tomorrow);
    chainer.link(&mut record);
    let chain_id = &link_of(&record).chain_id;
    assert!(!chain_id.contains('#'), "{chain_id}");
    assert!(chain_id.starts_with("gw-1/"));
}

/// A day whose head was forgotten (more than a week older than a later record, as after a clock
/// stepped forward) and that is seen again (the clock stepped back) starts a new marked segment,
/// not a second chain under the id of the first: the records verify, with no fork.
#[test]
fn a_forgotten_day_seen_again_starts_a_segment_of_its_own() {
    let mut chainer = Chainer::in_memory();
    let today = OffsetDateTime::now_utc();
    let mut records = Vec::new();
    for (i, at) in [
        today,
        today + Duration::from_secs(10 * 86_400),
        today + Duration::from_secs(1),
    ]
    .into_iter()
    .enumerate()
    {
        let mut record = record(i, at);
        chainer.link(&mut record);
        records.push(record);
    }
    let (first, again) = (link_of(&records[0]), link_of(&records[2]));
    assert!(first.chain_id.contains('#'), "{}", first.chain_id);
    assert_ne!(first.chain_id, again.chain_id, "a new segment");
    assert_eq!(again.sequence, 0);
    let report = verify(records);
    assert!(report.is_intact(), "{report:#?}");
}

#[test]
fn expired_content_still_verifies_but_changed_content_does_not() {
    let mut records = linked(6, datetime!(2025-03-01 10:00 UTC));
    for record in &mut records[..3] {
        record.backend_request_body = None;
        record.backend_response_body = None;
        record.request_messages = None;
        record.response_messages = None;
    }
    assert!(
        verify(records.clone()).is_intact(),
        "content removed by retention is not a break"
    );
    records[4].response_messages = Some("[\"a different answer\"]".to_owned());
    let broken = first_break(&verify(records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 4));
}

/// Stores written before `454e45e` kept an empty prompt or completion as no piece at all, so a
/// record linked with `Some("")` reads back from them with `None` there: a genuine record, which
/// must verify, while any other change to its content must still be named.
#[test]
fn an_empty_message_read_back_as_absent_still_verifies() {
    let mut chainer = Chainer::in_memory();
    let mut records: Vec<AuditRecord> = (0..4)
        .map(|i| {
            let seconds = u64::try_from(i).expect("small");
            let mut record = record(
                i,
                datetime!(2025-03-01 10:00 UTC) + Duration::from_secs(seconds),
            );
            record.request_messages = Some(if i == 1 {
                String::new()
            } else {
                "[\"hi\"]".to_owned()
            });
            record.response_messages = Some(if i >= 2 {
                String::new()
            } else {
                "[\"hello\"]".to_owned()
            });
            chainer.link(&mut record);
            record
        })
        .collect();
    records[1].request_messages = None;
    records[2].response_messages = None;
    records[3].request_messages = None;
    let broken = first_break(&verify(records.clone()));
    assert_eq!(
        (broken.reason, broken.sequence),
        (BreakReason::Changed, 3),
        "a prompt that was not empty and is gone is a change"
    );
    records[3].request_messages = Some("[\"hi\"]".to_owned());
    records[3].response_messages = None;
    assert!(
        verify(records.clone()).is_intact(),
        "{:#?}",
        verify(records.clone())
    );
    records[2].backend_request_body = Some("{\"prompt\":\"changed\"}".to_owned());
    let broken = first_break(&verify(records));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Changed, 2));
}

/// A day after the chainer's start, whose chains have plain ids: two chainers linking the same
/// records give the same chain.
const LATER_DAY: OffsetDateTime = datetime!(2099-06-01 10:00:00 UTC);

/// Links `records` with a chainer of its own, and returns them with the heads it would publish.
fn linked_with_heads(mut records: Vec<AuditRecord>) -> (Vec<AuditRecord>, Vec<PublishedHead>) {
    let mut chainer = Chainer::in_memory();
    for record in &mut records {
        chainer.link(record);
    }
    let heads = chainer.take_new_heads();
    assert!(chainer.take_new_heads().is_empty(), "taken once");
    (records, heads)
}

fn verify_against(records: Vec<AuditRecord>, heads: &[PublishedHead]) -> VerifyReport {
    let mut verifier = Verifier::new();
    verifier.expect_published(heads);
    for record in records {
        verifier.check(record);
    }
    verifier.finish()
}

fn later_records(count: usize) -> Vec<AuditRecord> {
    (0..count)
        .map(|i| {
            record(
                i,
                LATER_DAY + Duration::from_secs(u64::try_from(i).unwrap()),
            )
        })
        .collect()
}

/// What the chain alone cannot show, its published head shows: the last records removed, the
/// whole chain removed, and records rewritten with every hash after them made again.
#[test]
fn published_heads_find_a_cut_tail_and_a_rewritten_chain() {
    let (records, heads) = linked_with_heads(later_records(10));
    assert_eq!(
        heads,
        [PublishedHead {
            chain_id: "gw-1/2099-06-01".to_owned(),
            sequence: 9,
            record_hash: records[9].chain.as_ref().unwrap().record_hash.clone(),
        }]
    );
    assert_eq!(heads[0].day(), Some(LATER_DAY.date()));
    assert!(verify_against(records.clone(), &heads).is_intact());

    // The last three removed: the chain alone verifies, its head does not.
    let cut: Vec<AuditRecord> = records[..7].to_vec();
    assert!(verify(cut.clone()).is_intact());
    let broken = first_break(&verify_against(cut, &heads));
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 7));
    assert!(
        broken.detail.contains("records 7 to 9"),
        "{}",
        broken.detail
    );

    // Record 5 changed and every hash from it on made again: intact alone, not against its head.
    let mut rewritten = later_records(10);
    rewritten[5].user_name = Some("someone else".to_owned());
    let (rewritten, _) = linked_with_heads(rewritten);
    assert!(verify(rewritten.clone()).is_intact());
    let broken = first_break(&verify_against(rewritten, &heads));
    assert_eq!(
        (broken.reason, broken.sequence),
        (BreakReason::Rewritten, 9)
    );

    // No record of the chain left at all.
    let report = verify_against(Vec::new(), &heads);
    let broken = first_break(&report);
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 0));
    assert_eq!(report.chains[0].chain_id, "gw-1/2099-06-01");

    // An older head of a chain that has grown since is met on the way.
    let (more, _) = linked_with_heads(later_records(12));
    assert!(verify_against(more, &heads).is_intact());
}

/// The heads are read from the gateway's JSON log, flattened or not, among its other lines; the
/// newest head of each chain counts, and a JSON-lines audit file is checked against them.
#[test]
fn published_heads_are_read_from_the_log_and_checked_with_a_jsonl_file() {
    let (records, heads) = linked_with_heads(later_records(4));
    let (earlier, _) = linked_with_heads(later_records(2));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let line = |head: &PublishedHead, nested: bool| {
        let fields = serde_json::json!({
            "message": HEAD_MESSAGE,
            "chain_id": head.chain_id,
            "sequence": head.sequence,
            "record_hash": head.record_hash,
        });
        if nested {
            serde_json::json!({"level": "INFO", "fields": fields}).to_string()
        } else {
            let mut flat = fields;
            flat["level"] = "INFO".into();
            flat.to_string()
        }
    };
    let older = PublishedHead {
        chain_id: heads[0].chain_id.clone(),
        sequence: 1,
        record_hash: earlier[1].chain.as_ref().unwrap().record_hash.clone(),
    };
    std::fs::write(
        &log,
        format!(
            "not json\n{}\n{{\"message\":\"call finished\"}}\n{}\n",
            line(&heads[0], false),
            line(&older, true)
        ),
    )
    .unwrap();
    // A line of another target is not a head, whatever it says.
    let mut forged: serde_json::Value = serde_json::from_str(&line(&heads[0], false)).unwrap();
    forged["sequence"] = 99.into();
    forged["target"] = "gatehouse_gateway::app".into();
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&format!("{forged}\n"));
    std::fs::write(&log, text).unwrap();
    assert_eq!(
        read_published_heads(&log).unwrap(),
        heads,
        "the newest head"
    );

    let file = dir.path().join("audit.jsonl");
    let write = |records: &[AuditRecord]| {
        let mut out = std::fs::File::create(&file).unwrap();
        for record in records {
            writeln!(out, "{}", serde_json::to_string(record).unwrap()).unwrap();
        }
    };
    write(&records);
    assert!(verify_jsonl(&file, None, None, &heads).unwrap().is_intact());
    // The head of another gateway's chain (a collector's log holds several) is not this file's.
    let mut with_another = heads.clone();
    with_another.push(PublishedHead {
        chain_id: "gw-2/2099-06-01".to_owned(),
        sequence: 5,
        record_hash: GENESIS_HASH.to_owned(),
    });
    assert!(
        verify_jsonl(&file, None, None, &with_another)
            .unwrap()
            .is_intact()
    );
    write(&records[..3]);
    assert!(verify_jsonl(&file, None, None, &[]).unwrap().is_intact());
    let broken = first_break(&verify_jsonl(&file, None, None, &heads).unwrap());
    assert_eq!((broken.reason, broken.sequence), (BreakReason::Removed, 3));
    // A head of a day outside the range is not expected.
    let other_day = Some(LATER_DAY + time::Duration::days(3));
    assert!(
        verify_jsonl(&file, other_day, None, &heads)
            .unwrap()
            .is_intact()
    );
}
