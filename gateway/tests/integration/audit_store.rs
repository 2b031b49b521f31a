//! The gateway writing to the real audit store (SQLite file, the PostgreSQL server), through the
//! journaled queue, and failing closed when it cannot record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use gatehouse_audit::sql::{SearchFilter, SqlStore};
use gatehouse_audit::{AuditRecord, AuditSink, MemorySink, QueueSettings, SinkError};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::harness::*;

async fn streamed_call_is_stored_as_the_client_saw_it(store: SqlStore) {
    let sim = simulator("store").await;
    let state_dir = Arc::new(tempfile::tempdir().unwrap());
    let settings = QueueSettings {
        journal_dir: Some(state_dir.path().join("audit-journal")),
        ..QueueSettings::default()
    };
    let gw = TestGateway::start_recording(
        &sim.url(),
        Arc::new(store.clone()),
        settings,
        state_dir,
        MemorySink::new(),
    )
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("x-forwarded-for", "198.51.100.44")
        .header("x-request-id", "store-stream-1")
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "store-stream-1");
    let correlation_id = response.headers()["x-gatehouse-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    let client_text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|c| c["delta"]["content"].as_str())
                .map(str::to_owned)
        })
        .collect();
    assert!(!client_text.is_empty());
    // A second call that reuses the client's request id is a call of its own, recorded too: the
    // record's CorrelationId is the gateway's, never the client's.
    let again = gw
        .post(&chat_path("gpt-4o"))
        .header("x-forwarded-for", "198.51.100.44")
        .header("x-request-id", "store-stream-1")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let again_id = again.headers()["x-gatehouse-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(again_id, correlation_id);
    again.text().await.unwrap();
    gw.stop().await;

    assert!(
        store.call("store-stream-1").await.unwrap().is_none(),
        "the client's id is not a CorrelationId"
    );
    assert!(store.call(&again_id).await.unwrap().is_some());
    let detail = store
        .call(&correlation_id)
        .await
        .unwrap()
        .expect("the call is stored");
    let stored: Value =
        serde_json::from_str(detail.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(stored["object"], "chat.completion");
    assert_eq!(
        stored["choices"][0]["message"]["content"].as_str().unwrap(),
        client_text
    );
    assert!(stored["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(
        detail.chain.is_some(),
        "the record carries its hash-chain link"
    );
    let now = OffsetDateTime::now_utc();
    let by_ip = store
        .search(&SearchFilter {
            caller: Some("198.51.100.44/32".parse().unwrap()),
            ..SearchFilter::between(
                now - time::Duration::hours(1),
                now + time::Duration::hours(1),
            )
        })
        .await
        .unwrap();
    assert_eq!(by_ip.items.len(), 2, "both calls are on record");
    let mut ids: Vec<&str> = by_ip
        .items
        .iter()
        .map(|c| c.correlation_id.as_str())
        .collect();
    ids.sort_unstable();
    let mut expected = [correlation_id.as_str(), again_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn a_streamed_call_lands_in_sqlite_as_the_client_saw_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!("sqlite:{}", dir.path().join("audit.db").display()))
        .await
        .unwrap();
    streamed_call_is_stored_as_the_client_saw_it(store).await;
}

#[tokio::test]
async fn a_streamed_call_lands_in_postgres_as_the_client_saw_it() {
    let database = TestDatabase::new("gh_gateway").await;
    let store = SqlStore::open(&database.url).await.unwrap();
    streamed_call_is_stored_as_the_client_saw_it(store.clone()).await;
    store.close().await;
    drop(database);
}

/// A sink that fails while `down` is set.
#[derive(Clone, Default)]
struct Flaky {
    down: Arc<AtomicBool>,
    inner: MemorySink,
}

impl AuditSink for Flaky {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                return Err(SinkError::Io(std::io::Error::other("store is down")));
            }
            self.inner.write_batch(records).await
        })
    }
    fn name(&self) -> &'static str {
        "flaky"
    }
}

#[tokio::test]
async fn fail_closed_refuses_calls_it_cannot_record_and_recovers() {
    let sim = simulator("closed").await;
    let flaky = Flaky::default();
    flaky.down.store(true, Ordering::SeqCst);
    let state_dir = Arc::new(tempfile::tempdir().unwrap());
    let settings = QueueSettings {
        journal_dir: Some(state_dir.path().join("audit-journal")),
        journal_max_bytes: 1, // no room: a down store closes admission at once
        fail_closed: true,
        sink_timeout: Duration::from_millis(200),
        ..QueueSettings::default()
    };
    let gw = TestGateway::start_recording(
        &sim.url(),
        Arc::new(flaky.clone()),
        settings,
        state_dir,
        flaky.inner.clone(),
    )
    .await;
    let mut refused = false;
    for _ in 0..50 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            let message = azure_error(response, 503).await;
            assert!(message.contains("cannot record"), "{message}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "a fail-closed gateway must refuse calls once it cannot record them"
    );
    // It says so to the load balancer.
    assert_eq!(gw.get("/readyz").send().await.unwrap().status(), 503);
    let hits_when_closed = sim.hits();
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        sim.hits(),
        hits_when_closed,
        "a refused call never reaches a backend"
    );

    flaky.down.store(false, Ordering::SeqCst);
    let mut recovered = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "calls are served again once the store is back");
    assert_eq!(gw.get("/readyz").send().await.unwrap().status(), 200);
    // Every call that was answered 200 is on record, those held while the store was down too.
    let answered = sim.hits() as usize;
    let mut recorded = 0;
    for _ in 0..100 {
        recorded = flaky
            .inner
            .records()
            .iter()
            .filter(|r| r.response_code == 200)
            .count();
        if recorded >= answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recorded, answered, "answered calls missing from the record");
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    found
}

#[tokio::test]
async fn keys_never_reach_the_store_or_the_journal() {
    let sim = simulator("no-keys").await;
    let data = tempfile::tempdir().unwrap();
    let store = SqlStore::open(&format!(
        "sqlite:{}",
        data.path().join("audit.db").display()
    ))
    .await
    .unwrap();
    // The store is down for the first calls, so their records pass through the disk journal.
    let flaky = Flaky::default();
    flaky.down.store(true, Ordering::SeqCst);
    let state_dir = Arc::new(tempfile::tempdir().unwrap());
    let journal = state_dir.path().join("audit-journal");
    let settings = QueueSettings {
        journal_dir: Some(journal.clone()),
        sink_timeout: Duration::from_millis(100),
        ..QueueSettings::default()
    };
    let tee = Tee {
        flaky: flaky.clone(),
        store: store.clone(),
    };
    let gw = TestGateway::start_recording(
        &sim.url(),
        Arc::new(tee),
        settings,
        Arc::clone(&state_dir),
        MemorySink::new(),
    )
    .await;
    let path = chat_path("gpt-4o");
    gw.raw(reqwest::Method::POST, &path)
        .header("api-key", KEY)
        .json(&chat(None, true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    gw.raw(
        reqwest::Method::POST,
        &format!("{path}&subscription-key={KEY}"),
    )
    .json(&chat(None, false))
    .send()
    .await
    .unwrap();
    gw.raw(reqwest::Method::POST, &path)
        .bearer_auth(KEY)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    gw.raw(reqwest::Method::POST, &path)
        .header("api-key", "ghk_WrongKeyNeverStored")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let journaled: Vec<_> = files_under(&journal);
    assert!(
        journaled.iter().any(|(_, bytes)| !bytes.is_empty()),
        "the journal held records while the store was down"
    );
    for (file, bytes) in &journaled {
        // The records as JSON too: while the store is down they are packed, compressed, where a
        // search of the raw bytes would find nothing whatever they held.
        let records = if file.extension().is_some_and(|ext| ext == "journal") {
            gatehouse_audit::journal_file_text(file).unwrap()
        } else {
            Vec::new()
        };
        for text in [
            String::from_utf8_lossy(bytes),
            String::from_utf8_lossy(&records),
        ] {
            for secret in [KEY, "ghk_WrongKeyNeverStored"] {
                assert!(
                    !text.contains(secret),
                    "a key in journal file {}",
                    file.display()
                );
            }
        }
    }
    let unpacked: Vec<u8> = journaled
        .iter()
        .filter(|(file, _)| file.extension().is_some_and(|ext| ext == "journal"))
        .flat_map(|(file, _)| gatehouse_audit::journal_file_text(file).unwrap())
        .collect();
    assert!(
        String::from_utf8_lossy(&unpacked).contains(r#""CorrelationId""#),
        "the records were read out of the journal"
    );
    assert!(
        journaled.iter().any(|(file, bytes)| {
            file.extension().is_some_and(|ext| ext == "journal") && bytes.first() == Some(&b'z')
        }),
        "with the store down the journal held packed lines, and they were searched unpacked"
    );
    flaky.down.store(false, Ordering::SeqCst);
    // The running gateway replays its journal into the store (a shutdown would leave it for the
    // next start): wait for it, bounded by the writer's longest backoff and then some.
    let now = OffsetDateTime::now_utc();
    let filter = SearchFilter {
        limit: 100,
        ..SearchFilter::between(
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut stored = store.search(&filter).await.unwrap().items.len();
    while stored < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stored = store.search(&filter).await.unwrap().items.len();
    }
    gw.stop().await;
    assert_eq!(stored, 4, "every call is stored once the store is back");
    store.close().await;
    for (file, bytes) in files_under(data.path()) {
        let text = String::from_utf8_lossy(&bytes);
        for secret in [KEY, "ghk_WrongKeyNeverStored"] {
            assert!(
                !text.contains(secret),
                "a key in store file {}",
                file.display()
            );
        }
    }
}

/// Writes to the store only while the flaky switch is up.
struct Tee {
    flaky: Flaky,
    store: SqlStore,
}

impl AuditSink for Tee {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.flaky.write_batch(records).await?;
            self.store.write_batch(records).await
        })
    }
    fn name(&self) -> &'static str {
        "flaky-store"
    }
}

async fn metric(gw: &TestGateway, name: &str) -> String {
    let text = gw.metrics().await;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// While records come faster than the writer keeps them, calls wait for room in the queue before
/// they are served, instead of being served with their records refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_room_in_a_full_audit_queue_and_every_record_is_kept() {
    let sim = simulator("room").await;
    let gated = Gated::shut();
    let gw = TestGateway::start_gated(&sim.url(), &gated, 4).await;
    let call = |gw: &TestGateway| {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
    };
    // The first record goes into a write that waits at the gate; four more fill the queue.
    assert_eq!(call(&gw).await.unwrap().status(), 200);
    for _ in 0..50 {
        if gated.started.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gated.started.load(Ordering::SeqCst),
        1,
        "the first write started"
    );
    for _ in 0..4 {
        assert_eq!(call(&gw).await.unwrap().status(), 200);
    }
    // Six more calls wait for room before they are served.
    let waiting: Vec<_> = (0..6).map(|_| tokio::spawn(call(&gw))).collect();
    for _ in 0..100 {
        if metric(&gw, "gatehouse_audit_room_waits_total").await == "6" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&gw, "gatehouse_audit_room_waits_total").await, "6");
    // A counter (not a gauge), and the scrapes above did not add the same waits twice.
    let text = gw.metrics().await;
    assert!(
        text.contains("# TYPE gatehouse_audit_room_waits counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE gatehouse_audit_write_errors counter"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        waiting.iter().all(|call| !call.is_finished()),
        "no call is served while its record has no room"
    );
    assert_eq!(sim.hits(), 5, "the waiting calls reached no backend");

    gated.open.send_replace(true);
    for call in waiting {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    let records = gw.records(11).await;
    let mut ids: Vec<_> = records.iter().map(|r| r.correlation_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "one record for every call");
    assert_eq!(
        metric(&gw, "gatehouse_audit_records_rejected_total").await,
        "0"
    );
    // What the store took, and that it is up; no journal here, so nothing lost nor refused.
    for _ in 0..100 {
        if metric(&gw, "gatehouse_audit_records_written_total").await == "11" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&gw, "gatehouse_audit_records_written_total").await,
        "11"
    );
    assert_eq!(metric(&gw, "gatehouse_audit_sink_up").await, "1");
    assert_eq!(
        metric(&gw, "gatehouse_audit_journal_records_skipped_total").await,
        "0"
    );
    assert_eq!(
        metric(&gw, "gatehouse_audit_journal_errors_total").await,
        "0"
    );
    gw.stop().await;
}

/// `gatehouse-gateway analyze-audit` refreshes a SQLite store's planner statistics in full (past
/// the size up to which the store does it itself) and refuses a PostgreSQL URL with a clear error.
#[tokio::test]
async fn analyze_audit_refreshes_a_sqlite_stores_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let store = SqlStore::open(&url).await.unwrap();
    let pool = store.sqlite_pool().unwrap().clone();
    let analyzed = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sqlite_stat1")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // An empty store has nothing to count; the command adds rows once calls are stored.
    let record: AuditRecord = serde_json::from_value(json!({
        "TimeGenerated": "2026-12-01T10:00:00Z", "CorrelationId": "analyze-1", "GatewayId": "gw",
        "CallerIpAddress": "203.0.113.7", "PeerIpAddress": "10.0.0.1", "Method": "POST",
        "Url": "/openai/deployments/gpt-4o/chat/completions", "ClientProtocol": "HTTP/1.1",
        "ResponseCode": 200, "IsRequestSuccess": true, "RequestSize": 10, "ResponseSize": 20,
        "TotalTime": 30, "BackendTime": 25, "IsStreamCompletion": false,
        "RequestBodyTruncated": false, "ResponseBodyTruncated": false, "ClientAborted": false
    }))
    .unwrap();
    assert_eq!(store.write(&[record]).await.unwrap(), 1);
    sqlx::query("DELETE FROM sqlite_stat1")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(analyzed().await, 0);

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
        .args(["analyze-audit", "--database", &url])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("planner statistics refreshed in"),
        "{output:?}"
    );
    assert!(analyzed().await >= 4);

    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
        .args([
            "analyze-audit",
            "--database",
            "postgres://127.0.0.1:5432/none",
        ])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("statistics are refreshed for SQLite"),
        "{refused:?}"
    );
}

/// `gatehouse-gateway reindex-audit` indexes a time range of a store again from its LLM log, and
/// refuses a range that ends before it starts with a clear error.
#[tokio::test]
async fn reindex_audit_indexes_a_range_of_a_store_again() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let store = SqlStore::open(&url).await.unwrap();
    let call = |id: &str, at: &str| -> AuditRecord {
        serde_json::from_value(json!({
            "TimeGenerated": at, "CorrelationId": id, "GatewayId": "gw", "OperationId": "chatcompletions_create",
            "CallerIpAddress": "203.0.113.7", "PeerIpAddress": "10.0.0.1", "Method": "POST",
            "Url": "/openai/deployments/gpt-4o/chat/completions", "ClientProtocol": "HTTP/1.1",
            "ResponseCode": 200, "IsRequestSuccess": true, "RequestSize": 10, "ResponseSize": 20,
            "TotalTime": 30, "BackendTime": 25, "IsStreamCompletion": false,
            "RequestMessages": "[{\"role\":\"user\",\"content\":\"first line\\nsecond line\"}]",
            "RequestBodyTruncated": false, "ResponseBodyTruncated": false, "ClientAborted": false
        }))
        .unwrap()
    };
    let calls = [
        call("reindex-1", "2026-12-01T10:00:00Z"),
        call("reindex-2", "2026-12-01T11:00:00Z"),
        call("reindex-3", "2026-12-02T10:00:00Z"),
    ];
    assert_eq!(store.write(&calls).await.unwrap(), 3);
    store.close().await;

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
        .args([
            "reindex-audit",
            "--database",
            &url,
            "--from",
            "2026-12-01T00:00:00Z",
            "--to",
            "2026-12-02T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("2 calls indexed again in "),
        "{output:?}"
    );

    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
        .args([
            "reindex-audit",
            "--database",
            &url,
            "--from",
            "2026-12-02T00:00:00Z",
            "--to",
            "2026-12-01T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--from must be before --to"),
        "{refused:?}"
    );
}

/// Records with large captured bodies reach the queue's byte bound long before its count: calls
/// then wait for room as they do for a full queue, and memory stays bounded while the store lags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_room_while_the_records_held_weigh_the_byte_bound() {
    let sim = simulator("bytes").await;
    let gated = Gated::shut();
    let settings = QueueSettings {
        capacity: 1_000,
        max_bytes: 100_000,
        journal_dir: None,
        sink_timeout: Duration::from_secs(60),
        room_wait: Duration::from_secs(30),
        ..QueueSettings::default()
    };
    let gw = TestGateway::start_recording(
        &sim.url(),
        Arc::new(gated.clone()),
        settings,
        Arc::new(tempfile::tempdir().unwrap()),
        gated.inner.clone(),
    )
    .await;
    // A 60 KB prompt: the record holds it in the captured body and in the prompt's messages.
    let mut body = chat(None, false);
    body["messages"][1]["content"] = json!("What is this? ".repeat(4_300));
    let call = |gw: &TestGateway| gw.post(&chat_path("gpt-4o")).json(&body).send();

    assert_eq!(call(&gw).await.unwrap().status(), 200);
    for _ in 0..100 {
        if metric(&gw, "gatehouse_audit_queue_bytes")
            .await
            .parse::<u64>()
            .unwrap()
            >= 100_000
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held: u64 = metric(&gw, "gatehouse_audit_queue_bytes")
        .await
        .parse()
        .unwrap();
    assert!(held >= 120_000, "the first record is held, {held} bytes");

    let waiting = tokio::spawn(call(&gw));
    for _ in 0..100 {
        if metric(&gw, "gatehouse_audit_room_waits_total").await == "1" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&gw, "gatehouse_audit_room_waits_total").await, "1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "not served while memory is at the bound"
    );
    assert_eq!(sim.hits(), 1, "the waiting call reached no backend");

    gated.open.send_replace(true);
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
    let records = gw.records(2).await;
    assert_eq!(records.len(), 2);
    for _ in 0..100 {
        if metric(&gw, "gatehouse_audit_queue_bytes").await == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&gw, "gatehouse_audit_queue_bytes").await, "0");
    assert_eq!(
        metric(&gw, "gatehouse_audit_records_rejected_total").await,
        "0"
    );
    gw.stop().await;
}

/// The gateway publishes its chains' heads in its log; `verify-audit --heads` checks the store
/// against them and finds the last record of a chain removed, which the chain alone cannot show.
#[tokio::test]
async fn verify_audit_finds_a_chains_removed_tail_by_the_heads_in_the_log() {
    let sim = simulator("heads").await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let gateway = GatewayProcess::start_with(
        "chain-heads",
        &snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
        ),
        json!({"log_format": "json", "audit": {"database": url, "chain_heads_seconds": 1}}),
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..3 {
        let response = client
            .post(format!("{}{}", gateway.url, chat_path("gpt-4o")))
            .header("api-key", KEY)
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Published a second after the links, while the gateway runs.
    for _ in 0..100 {
        if gateway.log().contains("audit chain head") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gateway.terminate().await;
    let heads = dir.path().join("gateway.log");
    std::fs::write(&heads, &log).unwrap();
    let from = (OffsetDateTime::now_utc() - time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let verify = |with_heads: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"));
        command.args(["verify-audit", "--database", &url, "--from", &from]);
        if with_heads {
            command.arg("--heads").arg(&heads);
        }
        command.output().unwrap()
    };
    let intact = verify(true);
    assert!(intact.status.success(), "{intact:?}\n{log}");
    assert!(
        String::from_utf8_lossy(&intact.stdout).contains("3 records, intact"),
        "{intact:?}"
    );

    // The chain's last record removed: the chain alone still verifies; against its head, not.
    let store = SqlStore::open(&url).await.unwrap();
    let pool = store.sqlite_pool().unwrap().clone();
    sqlx::query("DELETE FROM GatehouseGatewayLogs WHERE ChainSequence = 2")
        .execute(&pool)
        .await
        .unwrap();
    store.close().await;
    assert!(verify(false).status.success());
    let cut = verify(true);
    assert!(!cut.status.success(), "{cut:?}");
    let out = String::from_utf8_lossy(&cut.stdout);
    assert!(
        out.contains("FIRST BREAK")
            && out.contains("Removed")
            && out.contains("record 2 was removed"),
        "{out}"
    );
}
