//! The SQL audit store, the same checks on SQLite and on PostgreSQL (the server on 127.0.0.1:5432;
//! each test makes its own database and drops it).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use futures::StreamExt;
use gatehouse_audit::AuditRecord;
use gatehouse_audit::sql::rollup::{Dimension, Granularity};
use gatehouse_audit::sql::{Cursor, Page, SearchFilter, SqlStore, StoreError, UsageQuery};
use gatehouse_test_support::TestDatabase;
use serde_json::{Value, json};
use sqlx::Row;
use time::{Duration, OffsetDateTime, macros::datetime};

/// A store and what keeps it alive (a temp dir, or a database dropped at the end). The store
/// is dropped first, its database after it.
struct TestStore {
    store: SqlStore,
    _dir: Option<tempfile::TempDir>,
    _database: Option<TestDatabase>,
}

async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    TestStore {
        store: SqlStore::open(&url).await.unwrap(),
        _dir: Some(dir),
        _database: None,
    }
}

async fn postgres() -> TestStore {
    let database = postgres_database().await;
    TestStore {
        store: SqlStore::open(&database.url).await.unwrap(),
        _dir: None,
        _database: Some(database),
    }
}

/// A new empty database of the test's own.
async fn postgres_database() -> TestDatabase {
    TestDatabase::new("gh_audit").await
}

macro_rules! on_both_engines {
    ($($check:ident),* $(,)?) => {
        $(
            mod $check {
                #[tokio::test]
                async fn sqlite() {
                    let test = super::sqlite().await;
                    super::$check(&test.store).await;
                }
                #[tokio::test]
                async fn postgres() {
                    let test = super::postgres().await;
                    super::$check(&test.store).await;
                }
            }
        )*
    };
}

on_both_engines!(
    records_land_in_azure_shaped_tables,
    a_replayed_batch_is_stored_once,
    search_filters_and_keyset_pages,
    full_text_finds_words_and_split_words_as_phrases,
    full_text_searches_what_the_messages_say_not_their_json,
    full_text_folds_accents_and_cases_alike_on_both_engines,
    full_text_drops_accents_written_apart_on_both_engines,
    full_text_words_joined_by_punctuation_are_phrases_on_both_engines,
    reindexing_a_range_rebuilds_what_an_earlier_version_indexed,
    usage_comes_from_rollups,
    export_streams_every_match,
    content_expires_before_metadata,
    a_call_whose_metadata_went_and_content_stayed_is_stored_again,
    a_call_retention_removed_is_not_stored_or_counted_again,
    chains_verify_from_the_store,
    chains_verify_against_their_published_heads,
    chains_verify_a_day_whose_first_records_were_removed,
    chains_verify_while_retention_removes_content,
    content_deleted_inside_its_window_breaks_the_chain,
    chains_linked_before_the_content_hash_change_verify_from_the_store,
    a_gateway_id_is_held_by_one_live_instance,
    records_holding_nul_characters_are_stored,
    absurd_token_counts_keep_the_rollups_positive,
    an_absurdly_long_model_name_is_stored,
);

/// Retention dropping a day's content partitions while a batch's content transaction writes the
/// pieces and then the bodies of today's calls: both take their tables in the same order, so
/// neither is aborted as a deadlock. The batch's transaction is played here by the locks its
/// inserts take (`ROW EXCLUSIVE` on the pieces' table, then on the bodies').
#[tokio::test]
async fn postgres_retention_and_a_content_write_do_not_deadlock() {
    let database = postgres_database().await;
    let store = SqlStore::open(&database.url).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let mut old = records(1);
    old[0].time_generated = now - Duration::days(10);
    assert_eq!(store.write(&old).await.unwrap(), 1);
    store.maintain_partitions().await.unwrap();
    let pool = store.postgres_pool().unwrap().clone();
    let mut writing = pool.begin().await.unwrap();
    sqlx::query(r#"LOCK TABLE "GatehouseLlmLogPieces" IN ROW EXCLUSIVE MODE"#)
        .execute(&mut *writing)
        .await
        .unwrap();
    let retention = tokio::spawn({
        let store = SqlStore::open(&database.url).await.unwrap();
        async move {
            store
                .enforce_retention(now - Duration::days(9), now - Duration::days(365), 100)
                .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    sqlx::query(r#"LOCK TABLE "GatehouseCallContent" IN ROW EXCLUSIVE MODE"#)
        .execute(&mut *writing)
        .await
        .unwrap();
    writing.commit().await.unwrap();
    let report = retention.await.unwrap().unwrap();
    assert!(report.content_removed >= 1, "{report:?}");
}

/// Two gateways writing to one PostgreSQL store at once share rollup rows (the minute's `all`
/// row, the status classes, the models): each batch locks them in key order, so neither waits for
/// a row the other holds while holding one it wants (PostgreSQL would abort one of them as a
/// deadlock, and its batch would go to the journal).
#[tokio::test]
async fn postgres_writers_sharing_rollup_rows_do_not_deadlock() {
    let database = postgres_database().await;
    let first = SqlStore::open(&database.url).await.unwrap();
    let second = SqlStore::open(&database.url).await.unwrap();
    let batch = |writer: usize, round: usize| -> Vec<AuditRecord> {
        (0..100)
            .map(|i| {
                let mut record = record(i);
                record.correlation_id = format!("w{writer}-r{round}-{i}");
                record.time_generated = T0 + Duration::seconds(i as i64 % 3);
                record.user_name = Some(format!("user-{}", (i * 7 + writer) % 13));
                record.model_name = Some(format!("model-{}", (i + round) % 5));
                record
            })
            .collect()
    };
    for round in 0..20 {
        let (a, b) = (batch(0, round), batch(1, round));
        let (a, b) = tokio::join!(first.write(&a), second.write(&b));
        assert_eq!((a.unwrap(), b.unwrap()), (100, 100), "round {round}");
    }
    let usage = usage_of_all(&first, Granularity::Minute, Duration::hours(1)).await;
    assert_eq!(usage.iter().map(|p| p.requests).sum::<i64>(), 2 * 20 * 100);
}

/// Another process writing the same SQLite file (the portal's `ANALYZE` at its start, a reindex)
/// makes a batch wait for the lock, not fail: the batch's transaction reads before it writes,
/// and SQLite does not wait for a read lock to be raised to a write one.
#[tokio::test]
async fn sqlite_batches_wait_for_another_writer_of_the_file() {
    use sqlx::ConnectOptions as _;
    let test = sqlite().await;
    let path: String =
        sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
            .fetch_one(test.store.sqlite_pool().unwrap())
            .await
            .unwrap();
    let mut other = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .busy_timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let analyzing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                sqlx::query("ANALYZE").execute(&mut other).await.unwrap();
                runs += 1;
                tokio::task::yield_now().await;
            }
            runs
        })
    };
    for round in 0..100 {
        let mut batch = records(3);
        for (i, record) in batch.iter_mut().enumerate() {
            record.correlation_id = format!("r{round}-{i}");
        }
        assert_eq!(test.store.write(&batch).await.unwrap(), 3, "round {round}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(analyzing.await.unwrap() > 0);
}

/// The SQLite the store runs on is built as `.cargo/config.toml` asks: without the process-wide
/// mutexes of memory statistics and memory management, on which the store's two writer
/// connections waited for each other (bench/README.md). A build that lost the setting fails here.
#[tokio::test]
async fn sqlite_is_built_without_process_wide_memory_mutexes() {
    let test = sqlite().await;
    let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
        .fetch_all(test.store.sqlite_pool().unwrap())
        .await
        .unwrap();
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "{options:?}"
    );
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "{options:?}"
    );
    assert!(options.iter().any(|o| o == "ENABLE_FTS5"), "{options:?}");
}

/// The planner's statistics are refreshed for every indexed table of the schema, never for the
/// full-text index's shadow tables, and only while the store is under the bound: `ANALYZE` counts
/// every index entry exactly, and at every start of a store larger than memory that took minutes.
#[tokio::test]
async fn sqlite_planner_statistics_are_bounded_and_skip_the_full_text_shadow_tables() {
    let test = sqlite().await;
    let store = &test.store;
    assert_eq!(store.write(&records(40)).await.unwrap(), 40);
    store.optimize().await.unwrap();
    let pool = store.sqlite_pool().unwrap();

    let indexed: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema AS t WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name <> '_sqlx_migrations' \
         AND EXISTS (SELECT 1 FROM pragma_index_list(t.name) WHERE origin <> 'pk') ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let shadow: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM search.sqlite_schema WHERE type = 'table' AND name LIKE 'GatehouseContentSearch\\_%' ESCAPE '\\'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(shadow.len() >= 3, "FTS5 shadow tables: {shadow:?}");
    let planned: Vec<&str> = gatehouse_audit::sql::PLANNED_TABLES
        .iter()
        .map(|statement| statement.trim_start_matches("ANALYZE "))
        .collect();
    for table in &indexed {
        assert!(
            planned.contains(&table.as_str()),
            "{table} is indexed but not analyzed"
        );
    }

    let analyzed: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tbl FROM sqlite_stat1 ORDER BY tbl")
            .fetch_all(pool)
            .await
            .unwrap();
    for table in &planned {
        assert!(
            analyzed.iter().any(|t| t == table),
            "{table} has no statistics: {analyzed:?}"
        );
    }
    // The shadow tables are in the index's own file, which holds no statistics at all.
    let index_statistics: i64 =
        sqlx::query_scalar("SELECT count(*) FROM search.sqlite_schema WHERE name = 'sqlite_stat1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        index_statistics, 0,
        "the full-text index's file was analyzed"
    );

    // Past the bound the statistics stay as they were: the 80 calls written next are not counted.
    let stat = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT stat FROM sqlite_stat1 WHERE idx = 'GatehouseGatewayLogs_Time'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let before = stat().await;
    assert!(before.starts_with("40 "), "{before}");
    let mut more = records(120);
    more.drain(..40);
    assert_eq!(store.write(&more).await.unwrap(), 80);
    assert!(!store.refresh_planner_statistics(100).await.unwrap());
    assert_eq!(stat().await, before);
    assert!(store.refresh_planner_statistics(120).await.unwrap());
    assert!(stat().await.starts_with("120 "), "{}", stat().await);
}

/// SQLite's full-text index is a file of its own beside the store (`audit.db-search`), written
/// by its own connection. An index that lacks calls (here: its file deleted, as after a crash
/// between the two commits or on a store from before the index had its own file) is rebuilt from
/// the LLM log in the background, and searches find every call again.
#[tokio::test]
async fn sqlite_full_text_index_is_a_file_of_its_own_and_catches_up_from_the_llm_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let url = format!("sqlite:{}", path.display());
    let index_file = dir.path().join("audit.db-search");
    let range = SearchFilter::between(T0, T0 + Duration::hours(1));
    let find = |text: &'static str| SearchFilter {
        text: Some(text.into()),
        limit: 100,
        ..range.clone()
    };
    let found = |page: gatehouse_audit::sql::Page| {
        page.items
            .into_iter()
            .map(|c| c.correlation_id)
            .collect::<Vec<_>>()
    };

    let store = SqlStore::open(&url).await.unwrap();
    let mut first = records(60);
    first[10] = record_saying(10, "alpha\nbravo");
    assert_eq!(store.write(&first).await.unwrap(), 60);
    assert_eq!(
        found(store.search(&find("number 42")).await.unwrap()),
        ["call-00042"]
    );
    let indexed: i64 =
        sqlx::query_scalar("SELECT IndexedThrough FROM search.GatehouseSearchProgress")
            .fetch_one(store.sqlite_pool().unwrap())
            .await
            .unwrap();
    assert_eq!(indexed, 60, "the index holds every call up to the last");
    let merging: Vec<(String, i64)> = sqlx::query_as(
        "SELECT k, v FROM search.GatehouseContentSearch_config WHERE k IN ('automerge', 'crisismerge') ORDER BY k",
    )
    .fetch_all(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    assert_eq!(
        merging,
        [("automerge".to_owned(), 16), ("crisismerge".to_owned(), 64)],
        "segments are merged a little with each batch, not a whole level at once"
    );
    store.close().await;
    assert!(index_file.exists());

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("audit.db-search{suffix}")));
    }
    let store = SqlStore::open(&url).await.unwrap();
    // Calls written while the index catches up are indexed by the catch-up, in order.
    let mut later = records(90);
    later.drain(..60);
    assert_eq!(store.write(&later).await.unwrap(), 30);
    // Settling waits for the catch-up: then searches find every call.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.settle_search_index(),
    )
    .await
    .expect("the index catches up within 30 s")
    .unwrap();
    assert_eq!(
        found(store.search(&find("number 42")).await.unwrap()),
        ["call-00042"]
    );
    assert_eq!(
        found(store.search(&find("number 77")).await.unwrap()),
        ["call-00077"]
    );
    assert_eq!(
        found(store.search(&find("bravo")).await.unwrap()),
        ["call-00010"]
    );
    let (indexed, rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT IndexedThrough FROM search.GatehouseSearchProgress), \
                (SELECT count(*) FROM search.GatehouseContentSearch_docsize)",
    )
    .fetch_one(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    assert_eq!((indexed, rows), (90, 90), "every call indexed once");
    // Caught up, the index takes new calls as they are written again.
    let mut newest = records(100);
    newest.drain(..90);
    assert_eq!(store.write(&newest).await.unwrap(), 10);
    assert_eq!(
        found(store.search(&find("number 95")).await.unwrap()),
        ["call-00095"]
    );
    store.close().await;
}

/// Two processes on one SQLite store (the gateway and the portal) may both catch the full-text
/// index up. A catch-up that read a call's pieces before retention in the other process removed
/// them does not leave an entry for the expired prompt, and a catch-up that finds the index moved
/// on meanwhile indexes nothing twice.
#[tokio::test]
async fn a_catch_up_in_a_second_process_indexes_no_expired_call_and_nothing_twice() {
    use sqlx::ConnectOptions as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let url = format!("sqlite:{}", path.display());
    let first = SqlStore::open(&url).await.unwrap();
    assert_eq!(
        first
            .write(&[record_saying(1, "zebra"), record_saying(2, "yak")])
            .await
            .unwrap(),
        2
    );
    first.close().await;
    // The index lacks both calls (as after a crash between the two files' commits).
    let connect = |file: std::path::PathBuf| async move {
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(file)
            .busy_timeout(std::time::Duration::from_secs(30))
            .connect()
            .await
    };
    let mut index = connect(dir.path().join("audit.db-search")).await.unwrap();
    sqlx::query("UPDATE GatehouseSearchProgress SET IndexedThrough = 0")
        .execute(&mut index)
        .await
        .unwrap();
    sqlx::query("DELETE FROM GatehouseContentSearch")
        .execute(&mut index)
        .await
        .unwrap();
    // The other process holds the index's write lock while the catch-up reads the pieces.
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut index)
        .await
        .unwrap();
    let second = SqlStore::open(&url).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Meanwhile retention there removes the first call's content (not indexed yet: no entry).
    let mut main = connect(path.clone()).await.unwrap();
    sqlx::query("DELETE FROM ApiManagementGatewayLlmLog WHERE CorrelationId = 'call-00001' AND SequenceNumber > 0")
        .execute(&mut main)
        .await
        .unwrap();
    sqlx::query("DELETE FROM GatehouseCallContent WHERE CorrelationId = 'call-00001'")
        .execute(&mut main)
        .await
        .unwrap();
    sqlx::query("COMMIT").execute(&mut index).await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        second.settle_search_index(),
    )
    .await
    .expect("the index catches up within 30 s")
    .unwrap();
    assert_eq!(found(&second, "zebra").await, Vec::<String>::new());
    assert_eq!(found(&second, "yak").await, ["call-00002"]);
    let entries: i64 =
        sqlx::query_scalar("SELECT count(*) FROM search.GatehouseContentSearch_docsize")
            .fetch_one(second.sqlite_pool().unwrap())
            .await
            .unwrap();
    assert_eq!(entries, 1, "one entry, for the call that kept its content");
    second.close().await;
}

/// SQLite keeps bodies compressed (as its archive format stores files) and the Azure-shaped view
/// shows them as text: through the store's connections, through the `sqlite3` shell (which has
/// `sqlar_uncompress` built in), and for rows written before compression, unchanged.
/// SQLite numbers new calls above every call the full-text index has had, even once retention
/// has removed them all (a quiet weekend with metadata kept a day): a number used again would
/// sit at or below `IndexedThrough`, where a batch the index missed is never caught up.
#[tokio::test]
async fn sqlite_record_ids_rise_past_the_indexed_calls_even_when_all_are_gone() {
    let test = sqlite().await;
    let store = &test.store;
    store.write(&records(5)).await.unwrap();
    let gone = T0 + Duration::days(1);
    let report = store.enforce_retention(gone, gone, 7).await.unwrap();
    assert_eq!(report.metadata_removed, 5, "{report:?}");
    store.write(&[record(7)]).await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "SELECT RecordId FROM GatehouseGatewayLogs WHERE CorrelationId = 'call-00007'",
    )
    .fetch_one(store.sqlite_pool().unwrap())
    .await
    .unwrap();
    assert!(id > 5, "RecordId {id} was used before");
    store.settle_search_index().await.unwrap();
    assert_eq!(found(store, "number 7").await, ["call-00007"]);
}

#[tokio::test]
async fn sqlite_bodies_are_stored_compressed_and_read_as_text() {
    let test = sqlite().await;
    let store = &test.store;
    let mut batch = records(3);
    let long_body = json!({"messages": [{"role": "user", "content": "the quarterly invoice review for Contoso, again and again; ".repeat(200)}]}).to_string();
    batch[0].backend_request_body = Some(long_body.clone());
    batch[1].backend_response_body = None;
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    let pool = store.sqlite_pool().unwrap();

    let (kind, stored, size): (String, i64, i64) = sqlx::query_as(
        "SELECT typeof(BackendRequestBody), length(BackendRequestBody), BackendRequestBodySize FROM GatehouseCallContent WHERE CorrelationId = 'call-00000'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(kind, "blob");
    assert_eq!(size, long_body.len() as i64);
    assert!(stored * 10 < size, "{stored} bytes stored for {size}");

    let view = |id: &'static str| async move {
        sqlx::query_as::<_, (Option<String>, Option<String>)>(
            "SELECT BackendRequestBody, BackendResponseBody FROM ApiManagementGatewayLogs WHERE CorrelationId = ?",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    assert_eq!(
        view("call-00000").await.0.as_deref(),
        Some(long_body.as_str())
    );
    assert_eq!(view("call-00001").await.1, None);
    assert_eq!(
        view("call-00002").await,
        (
            batch[2].backend_request_body.clone(),
            batch[2].backend_response_body.clone()
        )
    );
    let parsed: Vec<i64> = sqlx::query_scalar(
        "SELECT json_extract(BackendResponseBody, '$.usage.total_tokens') FROM ApiManagementGatewayLogs WHERE BackendResponseBody IS NOT NULL ORDER BY CorrelationId",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(parsed, [15, 17]);
    let detail = store.call("call-00000").await.unwrap().unwrap();
    assert_eq!(
        detail.backend_request_body.as_deref(),
        Some(long_body.as_str())
    );

    // A row from before compression: TEXT, no size.
    sqlx::query("UPDATE GatehouseCallContent SET BackendRequestBody = 'plain {\"old\": 1}', BackendRequestBodySize = NULL WHERE CorrelationId = 'call-00002'")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(
        view("call-00002").await.0.as_deref(),
        Some("plain {\"old\": 1}")
    );

    // A damaged row is an SQL error, not a crash or a wrong text.
    sqlx::query("UPDATE GatehouseCallContent SET BackendRequestBodySize = BackendRequestBodySize + 1 WHERE CorrelationId = 'call-00000'")
        .execute(pool)
        .await
        .unwrap();
    let Err(error) = sqlx::query("SELECT BackendRequestBody FROM ApiManagementGatewayLogs WHERE CorrelationId = 'call-00000'")
        .fetch_one(pool)
        .await
    else {
        panic!("a body that does not inflate to its size must be an error");
    };
    assert!(
        error
            .to_string()
            .contains("does not inflate to its recorded size"),
        "{error}"
    );
    sqlx::query("UPDATE GatehouseCallContent SET BackendRequestBodySize = BackendRequestBodySize - 1 WHERE CorrelationId = 'call-00000'")
        .execute(pool)
        .await
        .unwrap();

    // The sqlite3 shell reads the same view with its built-in sqlar_uncompress.
    let path = test._dir.as_ref().unwrap().path().join("audit.db");
    let shell = std::process::Command::new("sqlite3")
        .arg("-readonly")
        .arg(&path)
        .arg("SELECT BackendRequestBody FROM ApiManagementGatewayLogs WHERE CorrelationId = 'call-00000'")
        .output()
        .expect("the sqlite3 shell (Debian package sqlite3)");
    assert!(
        shell.status.success(),
        "{}",
        String::from_utf8_lossy(&shell.stderr)
    );
    assert_eq!(
        String::from_utf8(shell.stdout).unwrap().trim_end(),
        long_body
    );
}

const T0: OffsetDateTime = datetime!(2026-11-30 10:00:00 UTC);

fn record(i: usize) -> AuditRecord {
    let users = ["alice@contoso.com", "bob@contoso.com"];
    let ips = ["198.51.100.7", "203.0.113.20", "2001:db8::5"];
    let models = ["gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"];
    let prompt =
        json!([{"role": "user", "content": format!("question number {i} about invoices")}])
            .to_string();
    let completion = json!([{"role": "assistant", "content": format!("answer {i}")}]).to_string();
    // Half the calls sent output (a time to first token), half did not.
    let first_token = (i % 2 == 1).then_some(35 + i);
    let response = json!({"object": "chat.completion", "model": models[i % 2], "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {i}")}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 10 + i, "completion_tokens": 5, "total_tokens": 15 + i}});
    serde_json::from_value(json!({
        "TimeGenerated": (T0 + Duration::seconds(i as i64 * 7)).format(&time::format_description::well_known::Rfc3339).unwrap(),
        "CorrelationId": format!("call-{i:05}"), "GatewayId": "gw-1", "OperationId": "chatcompletions_create",
        "CallerIpAddress": ips[i % 3], "PeerIpAddress": "10.0.0.1", "Method": "POST",
        "Url": "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "ClientProtocol": "HTTP/1.1",
        "ResponseCode": if i % 10 == 9 { 429 } else { 200 }, "IsRequestSuccess": i % 10 != 9, "BackendResponseCode": 200,
        "BackendId": "east", "BackendUrl": "https://east.example/openai", "RequestSize": 120, "ResponseSize": 300,
        "TotalTime": 100 + i, "BackendTime": 90, "TimeToFirstByte": 20, "TimeToFirstToken": first_token, "ApimSubscriptionId": if i.is_multiple_of(2) { "team-a" } else { "team-b" },
        "ProductId": "research", "UserId": format!("oid-{}", i % 2), "UserName": users[i % 2], "TenantId": "tenant-1",
        "Groups": if i.is_multiple_of(2) { json!(["group-red"]) } else { json!(["group-blue", "group-red"]) },
        "DeploymentName": "gpt-4o", "ModelName": models[i % 2], "ApiVersion": "2024-10-21", "IsStreamCompletion": i.is_multiple_of(3),
        "Usage": {"PromptTokens": 10 + i, "CompletionTokens": 5, "TotalTokens": 15 + i, "CachedTokens": 0, "ReasoningTokens": 0, "IsEstimate": false},
        "Attempts": [{"BackendId": "east", "Status": 200, "ElapsedMs": 90, "Error": null}],
        "BackendRequestBody": json!({"messages": serde_json::from_str::<Value>(&prompt).unwrap()}).to_string(), "RequestBodyTruncated": false,
        "BackendResponseBody": response.to_string(), "ResponseBodyTruncated": false,
        "RequestMessages": prompt, "ResponseMessages": completion, "ClientAborted": false,
        "LastErrorReason": null, "LastErrorMessage": null
    }))
    .unwrap()
}

fn records(n: usize) -> Vec<AuditRecord> {
    (0..n).map(record).collect()
}

async fn records_land_in_azure_shaped_tables(store: &SqlStore) {
    let mut batch = records(6);
    let long_prompt = "ä".repeat(50_000); // 100,000 bytes → 4 pieces of ≤ 32 KB
    batch[0].request_messages = Some(long_prompt.clone());
    assert_eq!(store.write(&batch).await.unwrap(), 6);

    // The published usage query's shape: parse BackendResponseBody of chat calls.
    let bodies: Vec<String> = match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => sqlx::query("SELECT BackendResponseBody, ResponseCode FROM ApiManagementGatewayLogs WHERE OperationId = 'chatcompletions_create' AND ResponseCode = 200 ORDER BY TimeGenerated")
            .fetch_all(pool).await.unwrap().iter().map(|r| r.get(0)).collect(),
        (_, Some(pool)) => sqlx::query(r#"SELECT "BackendResponseBody", "ResponseCode" FROM "ApiManagementGatewayLogs" WHERE "OperationId" = 'chatcompletions_create' AND "ResponseCode" = 200 ORDER BY "TimeGenerated""#)
            .fetch_all(pool).await.unwrap().iter().map(|r| r.get(0)).collect(),
        _ => unreachable!(),
    };
    assert_eq!(bodies.len(), 6);
    let parsed: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(parsed["usage"]["total_tokens"], 15);

    // The LLM log: a header row with tokens, then pieces.
    let detail = store.call("call-00000").await.unwrap().unwrap();
    assert_eq!(
        detail.request_messages.as_deref(),
        Some(long_prompt.as_str())
    );
    assert_eq!(detail.summary.total_tokens, Some(15));
    assert_eq!(detail.prompt_tokens, Some(10));
    assert!(
        detail
            .backend_response_body
            .unwrap()
            .contains("chat.completion")
    );
    let pieces: i64 = match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => sqlx::query("SELECT count(*) FROM ApiManagementGatewayLlmLog WHERE CorrelationId = 'call-00000' AND RequestMessages IS NOT NULL").fetch_one(pool).await.unwrap().get(0),
        (_, Some(pool)) => sqlx::query(r#"SELECT count(*) FROM "ApiManagementGatewayLlmLog" WHERE "CorrelationId" = 'call-00000' AND "RequestMessages" IS NOT NULL"#).fetch_one(pool).await.unwrap().get(0),
        _ => unreachable!(),
    };
    assert_eq!(pieces, 4);
    assert!(store.call("no-such-call").await.unwrap().is_none());

    // Time to first token: a column of the view, read back with the call.
    let first_tokens: Vec<Option<i64>> = match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => sqlx::query(
            "SELECT TimeToFirstToken FROM ApiManagementGatewayLogs ORDER BY TimeGenerated",
        )
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect(),
        (_, Some(pool)) => sqlx::query(
            r#"SELECT "TimeToFirstToken" FROM "ApiManagementGatewayLogs" ORDER BY "TimeGenerated""#,
        )
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect(),
        _ => unreachable!(),
    };
    assert_eq!(
        first_tokens,
        [None, Some(36), None, Some(38), None, Some(40)]
    );
    let detail = store.call("call-00001").await.unwrap().unwrap();
    assert_eq!(
        (detail.time_to_first_byte, detail.time_to_first_token),
        (Some(20), Some(36))
    );
}

/// A NUL character (a client's `api-version=%00`, a backend's text answer) in a record that did
/// not come through the audit writer (which replaces them before linking): PostgreSQL's `text`
/// and `jsonb` refuse U+0000, so it stores U+FFFD instead of refusing the batch with every
/// other record in it, on every retry. SQLite keeps the text as it is.
async fn records_holding_nul_characters_are_stored(store: &SqlStore) {
    let mut batch = records(2);
    let odd = &mut batch[1];
    odd.api_version = Some("v\0".to_owned());
    odd.backend_request_body = Some("a\0b".to_owned());
    odd.request_messages = Some("[{\"role\":\"user\",\"content\":\"x\u{0}y\"}]".to_owned());
    odd.groups = vec!["group\0red".to_owned()];
    odd.attempts[0].error = Some("e\0".to_owned());
    assert_eq!(store.write(&batch).await.unwrap(), 2);
    let expected = |text: &str| {
        if store.postgres_pool().is_some() {
            text.replace('\0', "\u{FFFD}")
        } else {
            text.to_owned()
        }
    };
    let detail = store.call("call-00001").await.unwrap().unwrap();
    assert_eq!(
        detail.backend_request_body.as_deref(),
        Some(expected("a\0b").as_str())
    );
    assert_eq!(
        detail.request_messages.as_deref(),
        Some(expected("[{\"role\":\"user\",\"content\":\"x\u{0}y\"}]").as_str())
    );
    let attempts: Value = serde_json::from_str(&detail.attempts).unwrap();
    assert_eq!(attempts[0]["Error"], expected("e\0"), "{attempts}");
    assert!(store.call("call-00000").await.unwrap().is_some());
    // Stored once: written again, it is the same call.
    assert_eq!(store.write(&batch).await.unwrap(), 0);
}

async fn a_replayed_batch_is_stored_once(store: &SqlStore) {
    let batch = records(20);
    // A batch that holds one record twice (a replay beside the original) stores it once.
    let mut doubled = batch[..10].to_vec();
    doubled.push(batch[3].clone());
    assert_eq!(store.write(&doubled).await.unwrap(), 10);
    assert_eq!(store.write(&batch).await.unwrap(), 10);
    assert_eq!(store.write(&batch[5..15]).await.unwrap(), 0);
    let usage = usage_of_all(store, Granularity::Hour, Duration::days(1)).await;
    assert_eq!(usage.iter().map(|p| p.requests).sum::<i64>(), 20);
}

/// A gateway id is held by one instance: renewed by it, refused to another while it is renewed,
/// taken over once it lapsed, free again once released; a release by another instance leaves it.
async fn a_gateway_id_is_held_by_one_live_instance(store: &SqlStore) {
    use gatehouse_audit::sql::{ClaimOutcome, GatewayClaim};
    let lapse = std::time::Duration::from_secs(30);
    let at = |seconds: i64| T0 + Duration::seconds(seconds);

    assert_eq!(
        store
            .claim_gateway_id("gw-1", "a", "host-a", at(0), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held
    );
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "a", "host-a", at(10), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held,
        "a renewal"
    );
    let held_by_a = ClaimOutcome::HeldByAnother(GatewayClaim {
        instance_id: "a".into(),
        host: "host-a".into(),
        seen_at_ms: (at(10).unix_timestamp_nanos() / 1_000_000) as i64,
    });
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "b", "host-b", at(35), lapse)
            .await
            .unwrap(),
        held_by_a,
        "renewed 25 s ago: still a's"
    );
    assert_eq!(
        store
            .claim_gateway_id("gw-2", "b", "host-b", at(35), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held,
        "another id is free"
    );
    store.release_gateway_id("gw-1", "b", at(35)).await.unwrap();
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "b", "host-b", at(36), lapse)
            .await
            .unwrap(),
        held_by_a,
        "b cannot release a's claim"
    );
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "b", "host-b", at(41), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held,
        "not renewed for 31 s: taken over"
    );
    assert!(
        matches!(
            store.claim_gateway_id("gw-1", "a", "host-a", at(42), lapse).await.unwrap(),
            ClaimOutcome::HeldByAnother(GatewayClaim { instance_id, .. }) if instance_id == "b"
        ),
        "a, back, finds it b's"
    );
    // A release that comes late, after the same instance (restarted) renewed again, leaves the
    // claim it holds now.
    store.release_gateway_id("gw-1", "b", at(40)).await.unwrap();
    assert!(
        store.gateway_id_holder("gw-1").await.unwrap().is_some(),
        "renewed at 41 s: a release of the claim as of 40 s leaves it"
    );
    // A renewal the store runs late (sent at 40 s, run after the one of 41 s) does not move the
    // claim back in time, so the late release of the claim as of 40 s still leaves it.
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "b", "host-b", at(40), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held
    );
    store.release_gateway_id("gw-1", "b", at(40)).await.unwrap();
    assert!(store.gateway_id_holder("gw-1").await.unwrap().is_some());
    store.release_gateway_id("gw-1", "b", at(41)).await.unwrap();
    assert_eq!(store.gateway_id_holder("gw-1").await.unwrap(), None);
    assert_eq!(
        store
            .claim_gateway_id("gw-1", "a", "host-a", at(43), lapse)
            .await
            .unwrap(),
        ClaimOutcome::Held,
        "released: free at once"
    );
}

async fn search_filters_and_keyset_pages(store: &SqlStore) {
    store.write(&records(60)).await.unwrap();
    let range = SearchFilter::between(T0, T0 + Duration::hours(1));

    let by_user = store
        .search(&SearchFilter {
            user: Some("bob@contoso.com".into()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(by_user.items.len(), 30);
    assert!(
        by_user
            .items
            .iter()
            .all(|c| c.user_name.as_deref() == Some("bob@contoso.com"))
    );
    let by_oid = store
        .search(&SearchFilter {
            user: Some("oid-1".into()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(by_oid.items.len(), 30);
    // A user as an auditor types it: names and object ids ignore ASCII case, on both engines.
    for typed in ["Bob@Contoso.COM", "OID-1"] {
        let found = store
            .search(&SearchFilter {
                user: Some(typed.into()),
                limit: 100,
                ..range.clone()
            })
            .await
            .unwrap();
        assert_eq!(found.items.len(), 30, "{typed}");
    }

    let by_ip = store
        .search(&SearchFilter {
            caller: Some("198.51.100.7/32".parse().unwrap()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(by_ip.items.len(), 20);
    let by_cidr = store
        .search(&SearchFilter {
            caller: Some("203.0.113.0/24".parse().unwrap()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert!(
        by_cidr
            .items
            .iter()
            .all(|c| c.caller_ip_address == "203.0.113.20")
            && by_cidr.items.len() == 20
    );
    let by_v6 = store
        .search(&SearchFilter {
            caller: Some("2001:db8::/32".parse().unwrap()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(by_v6.items.len(), 20);
    // Every IPv6 caller, and no IPv4 one (stored as IPv4-mapped IPv6 keys); the mapped range
    // itself means the IPv4 callers.
    for (net, callers) in [("::/0", 20), ("::/64", 0), ("::ffff:0:0/96", 40)] {
        let found = store
            .search(&SearchFilter {
                caller: Some(net.parse().unwrap()),
                limit: 100,
                ..range.clone()
            })
            .await
            .unwrap();
        assert_eq!(found.items.len(), callers, "{net}");
    }

    let by_text = store
        .search(&SearchFilter {
            text: Some("number 42".into()),
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        by_text
            .items
            .iter()
            .map(|c| c.correlation_id.as_str())
            .collect::<Vec<_>>(),
        ["call-00042"]
    );
    // FTS syntax in user text is taken literally, not interpreted.
    let hostile = store
        .search(&SearchFilter {
            text: Some("\"invoices\" OR NEAR( *".into()),
            ..range.clone()
        })
        .await;
    assert!(hostile.is_ok(), "{hostile:?}");

    let throttled = store
        .search(&SearchFilter {
            status: Some(429),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(throttled.items.len(), 6);
    let mini = store
        .search(&SearchFilter {
            model: Some("gpt-4o-mini-2024-07-18".into()),
            subscription: Some("team-b".into()),
            limit: 100,
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(mini.items.len(), 30);

    // Keyset pages: newest first, no duplicate, no gap.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .search(&SearchFilter {
                limit: 7,
                cursor,
                ..range.clone()
            })
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|c| c.correlation_id.clone()));
        match page.next {
            Some(token) => cursor = Some(Cursor::decode(&token).unwrap()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..60).rev().map(|i| format!("call-{i:05}")).collect();
    assert_eq!(seen, expected);
    assert!(Cursor::decode("garbage").is_err());
    // Times no record has (PostgreSQL cannot even hold the first), and one whose nanoseconds
    // overflow: refused as bad cursors, not a store error or a panic.
    for crafted in [
        "-300000000000000000_1",
        "170141183460469231731687303715884105727_1",
        "253402300800000000_1",
    ] {
        assert!(
            matches!(Cursor::decode(crafted), Err(StoreError::BadCursor)),
            "{crafted}"
        );
    }

    // Full-text pages, alone (the index leads) and with a user (the calls table leads): every
    // match once, newest first, and no call without the words.
    for user in [None, Some("bob@contoso.com")] {
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .search(&SearchFilter {
                    text: Some("question invoices".into()),
                    user: user.map(str::to_owned),
                    limit: 9,
                    cursor,
                    ..range.clone()
                })
                .await
                .unwrap();
            seen.extend(page.items.iter().map(|c| c.correlation_id.clone()));
            match page.next {
                Some(token) => cursor = Some(Cursor::decode(&token).unwrap()),
                None => break,
            }
        }
        let expected: Vec<String> = (0..60)
            .rev()
            .filter(|i| user.is_none() || i % 2 == 1)
            .map(|i| format!("call-{i:05}"))
            .collect();
        assert_eq!(seen, expected, "full text with user {user:?}");
    }
    // A cursor of one order is refused by a search that lists in the other: on SQLite a
    // full-text search led by its index lists newest stored first (by RecordId, which a call
    // replayed late puts out of time order), where a time cursor would skip or repeat calls. On
    // PostgreSQL every search lists by time.
    let text_search = |user: Option<&str>, cursor: Option<Cursor>| SearchFilter {
        text: Some("question invoices".into()),
        user: user.map(str::to_owned),
        limit: 9,
        cursor,
        ..range.clone()
    };
    let next = |page: Page| Cursor::decode(&page.next.unwrap()).unwrap();
    let of_the_index = next(store.search(&text_search(None, None)).await.unwrap());
    let of_the_calls = next(
        store
            .search(&text_search(Some("bob@contoso.com"), None))
            .await
            .unwrap(),
    );
    let crossed = [
        store.search(&text_search(None, Some(of_the_calls))).await,
        store
            .search(&text_search(Some("bob@contoso.com"), Some(of_the_index)))
            .await,
    ];
    for result in crossed {
        if store.sqlite_pool().is_some() {
            assert!(matches!(result, Err(StoreError::BadCursor)), "{result:?}");
        } else {
            assert!(result.is_ok(), "{result:?}");
        }
    }
    let narrowed = store
        .search(&SearchFilter {
            text: Some("number 43".into()),
            user: Some("bob@contoso.com".into()),
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(narrowed.items.len(), 1);
    let elsewhere = store
        .search(&SearchFilter {
            text: Some("number 42".into()),
            user: Some("bob@contoso.com".into()),
            ..range.clone()
        })
        .await
        .unwrap();
    assert!(elsewhere.items.is_empty(), "{elsewhere:?}");
}

/// A call with `prompt` as its prompt (`RequestMessages`).
fn record_saying(i: usize, prompt: &str) -> AuditRecord {
    let mut record = record(i);
    record.request_messages = Some(json!([{"role": "user", "content": prompt}]).to_string());
    record
}

/// The calls a full-text search of `text` finds, by `CorrelationId`, oldest first.
async fn found(store: &SqlStore, text: &str) -> Vec<String> {
    let page = store
        .search(&SearchFilter {
            text: Some(text.to_owned()),
            limit: 100,
            ..SearchFilter::between(T0 - Duration::hours(1), T0 + Duration::hours(2))
        })
        .await
        .unwrap();
    let mut ids: Vec<String> = page.items.into_iter().map(|c| c.correlation_id).collect();
    ids.sort();
    ids
}

/// Words are runs of letters and digits, found whatever their case; a search word that splits
/// into several (an invoice number) finds them only side by side; a prompt too large for one
/// full-text vector is stored, and searchable by its first words.
async fn full_text_finds_words_and_split_words_as_phrases(store: &SqlStore) {
    let mut huge = String::from("needle ");
    for i in 0..150_000 {
        huge.push_str(&format!("w{i} "));
    }
    let batch = vec![
        record_saying(0, "Please pay INV-2024-0042 today, Café Ünïcode."),
        record_saying(1, "inv 2024 and then 0042, apart"),
        record_saying(2, &huge),
    ];
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    store.settle_search_index().await.unwrap();

    assert_eq!(found(store, "INV-2024-0042").await, ["call-00000"]);
    assert_eq!(found(store, "inv-2024-0042").await, ["call-00000"]);
    assert_eq!(found(store, "0042").await, ["call-00000", "call-00001"]);
    assert_eq!(found(store, "2024 apart").await, ["call-00001"]);
    assert_eq!(found(store, "CAFÉ ünïcode").await, ["call-00000"]);
    assert_eq!(found(store, "needle").await, ["call-00002"]);
    assert_eq!(found(store, "w7").await, ["call-00002"]);
    assert!(found(store, "nowhere").await.is_empty());
    assert!(found(store, "?? --").await.is_empty());
}

/// Search covers what prompts and completions say: the word after a line break is a word (the
/// JSON text has `\nword`), and the JSON's keys, roles and inlined media are not searchable.
async fn full_text_searches_what_the_messages_say_not_their_json(store: &SqlStore) {
    let mut answered = record_saying(1, "Summarise the report");
    answered.response_messages = Some(
        json!([{"role": "assistant", "content": "Revenue rose.\nMargins\tfell.\r\nOutlook: \"stable\""}])
            .to_string(),
    );
    let mut picture = record(2);
    picture.request_messages = Some(
        json!([{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg"}}
        ]}])
        .to_string(),
    );
    let batch = vec![
        record_saying(0, "Dear team,\nplease review\n\nthe budget"),
        answered,
        picture,
    ];
    assert!(
        batch[0]
            .request_messages
            .as_deref()
            .unwrap()
            .contains("\\nplease")
    );
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    store.settle_search_index().await.unwrap();

    assert_eq!(found(store, "please").await, ["call-00000"]);
    assert_eq!(found(store, "budget team").await, ["call-00000"]);
    assert_eq!(found(store, "margins").await, ["call-00001"]);
    assert_eq!(found(store, "fell outlook stable").await, ["call-00001"]);
    assert_eq!(found(store, "picture").await, ["call-00002"]);
    // A phrase never runs from the prompt into the completion (FTS5 keeps them in two columns;
    // PostgreSQL's vector leaves a gap between them): "the report" ends the prompt, "Revenue"
    // starts the completion.
    assert_eq!(found(store, "summarise-the-report").await, ["call-00001"]);
    assert_eq!(found(store, "revenue-rose").await, ["call-00001"]);
    assert!(found(store, "report-revenue").await.is_empty());
    for absent in [
        "nplease",
        "nmargins",
        "role",
        "content",
        "user",
        "assistant",
        "image_url",
    ] {
        assert!(found(store, absent).await.is_empty(), "{absent} was found");
    }
    assert!(found(store, "iVBORw0KGgoAAAANSUhEUg").await.is_empty());
}

/// Both engines fold words the same way (SQLite's `unicode61 remove_diacritics 2`): without
/// case or the accents of Latin letters, a final sigma as a sigma, and an Indic word split at
/// its vowel signs (a phrase of its parts when searched whole).
async fn full_text_folds_accents_and_cases_alike_on_both_engines(store: &SqlStore) {
    let batch = vec![
        record_saying(0, "Réunion à Montréal pour l'ÉTÉ, ΟΔΟΣ"),
        record_saying(1, "हिन्दी भाषा"),
        record_saying(2, "Reunion in Montreal"),
    ];
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    store.settle_search_index().await.unwrap();

    assert_eq!(
        found(store, "reunion montreal").await,
        ["call-00000", "call-00002"]
    );
    assert_eq!(
        found(store, "RÉUNION MONTRÉAL").await,
        ["call-00000", "call-00002"]
    );
    assert_eq!(found(store, "été").await, ["call-00000"]);
    assert_eq!(found(store, "ete").await, ["call-00000"]);
    assert_eq!(found(store, "οδος").await, ["call-00000"]);
    assert_eq!(found(store, "Οδοσ").await, ["call-00000"]);
    assert_eq!(found(store, "हिन्दी").await, ["call-00001"]);
    assert_eq!(found(store, "भाषा").await, ["call-00001"]);
    // Words that differ only by a vowel sign are the same parts: a limit of `unicode61`, kept
    // on PostgreSQL so that both engines find the same calls.
    assert_eq!(found(store, "भाषी").await, ["call-00001"]);
    assert!(found(store, "Montréalais").await.is_empty());
}

/// A prompt written with accents apart from their letters (`n`, `a`, U+0303, `o`, as text
/// copied from some systems is) is found by the word with or without its accent, in either form,
/// and not by the letters before the accent: SQLite's `unicode61 remove_diacritics 2` drops such
/// an accent inside the word, and the store's words on PostgreSQL do too. An overline (U+0305)
/// is no accent SQLite drops: it separates words on both.
async fn full_text_drops_accents_written_apart_on_both_engines(store: &SqlStore) {
    let batch = vec![
        record_saying(0, "Eu na\u{303}o sei, cafe\u{301}"),
        record_saying(1, "na praia"),
        record_saying(2, "x\u{305}y"),
    ];
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    store.settle_search_index().await.unwrap();

    for search in ["não", "nao", "NA\u{303}O", "café", "cafe\u{301}", "cafe"] {
        assert_eq!(found(store, search).await, ["call-00000"], "{search}");
    }
    assert_eq!(found(store, "na").await, ["call-00001"]);
    assert!(found(store, "o").await.is_empty());
    assert_eq!(found(store, "x").await, ["call-00002"]);
    assert_eq!(found(store, "x\u{305}y").await, ["call-00002"]);
    assert!(found(store, "xy").await.is_empty());
}

/// A search word whose parts are joined by `_`, `'`, `,` or a tag is the phrase of its parts on
/// both engines: `user_id` finds "user_id" and not "user name and id". (PostgreSQL's own parser,
/// asked about calls stored before the store split words itself, makes of `user_id` the plain
/// AND of `user` and `id`, and of `x<b>y` the phrase `x y`.)
async fn full_text_words_joined_by_punctuation_are_phrases_on_both_engines(store: &SqlStore) {
    let batch = vec![
        record_saying(0, "look up the user_id first"),
        record_saying(1, "the user name and the id"),
        record_saying(2, "don't panic at x,y"),
        record_saying(3, "t is what don said, y or x"),
        record_saying(4, "x y and b"),
    ];
    assert_eq!(store.write(&batch).await.unwrap(), 5);
    store.settle_search_index().await.unwrap();

    assert_eq!(found(store, "user_id").await, ["call-00000"]);
    assert_eq!(found(store, "look USER_ID").await, ["call-00000"]);
    assert_eq!(found(store, "user").await, ["call-00000", "call-00001"]);
    assert_eq!(found(store, "don't").await, ["call-00002"]);
    assert_eq!(found(store, "x,y").await, ["call-00002", "call-00004"]);
    assert!(found(store, "x<b>y").await.is_empty());
    assert!(found(store, "id_user").await.is_empty());
}

/// A backend may report any number of tokens: a call counts as at most `u32::MAX`, and the
/// sums of a rollup row stay positive (in release builds a plain sum wrapped to a negative; on
/// PostgreSQL `bigint` refused it with every other record of the batch).
async fn absurd_token_counts_keep_the_rollups_positive(store: &SqlStore) {
    let mut batch = records(3);
    for record in &mut batch[..2] {
        let usage = record.usage.as_mut().unwrap();
        usage.prompt_tokens = u64::MAX;
        usage.total_tokens = u64::MAX;
    }
    batch[2].time_generated = batch[0].time_generated;
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    // Written again in a second batch, into the same rows.
    let mut more = records(2);
    for (i, record) in more.iter_mut().enumerate() {
        record.correlation_id = format!("more-{i}");
        record.time_generated = batch[0].time_generated;
        record.usage.as_mut().unwrap().total_tokens = u64::MAX;
    }
    assert_eq!(store.write(&more).await.unwrap(), 2);
    let usage = usage_of_all(store, Granularity::Minute, Duration::hours(1)).await;
    let max = i64::from(u32::MAX);
    let total: i64 = usage.iter().map(|p| p.total_tokens).sum();
    assert_eq!(total, 4 * max + batch[2].usage.unwrap().total_tokens as i64);
    assert!(
        usage
            .iter()
            .all(|p| p.prompt_tokens >= 0 && p.total_tokens >= 0)
    );
}

/// A backend that names an absurdly long `model` does not make the batch unstorable (the rollup
/// key on PostgreSQL holds at most ≈ 2,700 bytes): the call's row keeps the name whole, its
/// rollups a start of it.
async fn an_absurdly_long_model_name_is_stored(store: &SqlStore) {
    let mut batch = records(2);
    let long: String = (0..8_000)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    batch[0].model_name = Some(long.clone());
    assert_eq!(store.write(&batch).await.unwrap(), 2);
    let stored = store.call("call-00000").await.unwrap().unwrap();
    assert_eq!(stored.summary.model_name.as_deref(), Some(long.as_str()));
    let by_model = store
        .usage(&UsageQuery {
            granularity: Granularity::Minute,
            dimension: Dimension::Model,
            from: T0,
            to: T0 + Duration::hours(1),
            only: None,
        })
        .await
        .unwrap();
    let cut = by_model
        .iter()
        .find(|p| long.starts_with(&p.value) && p.value.len() > 100)
        .expect("the long model's rollup");
    assert_eq!(
        cut.value.len(),
        gatehouse_audit::sql::rollup::MAX_DIMENSION_VALUE
    );
}

/// Usage of every call (`Dimension::All`) from T0 over `span`.
async fn usage_of_all(
    store: &SqlStore,
    granularity: Granularity,
    span: Duration,
) -> Vec<gatehouse_audit::sql::UsagePoint> {
    store
        .usage(&UsageQuery {
            granularity,
            dimension: Dimension::All,
            from: T0,
            to: T0 + span,
            only: None,
        })
        .await
        .unwrap()
}

async fn usage_comes_from_rollups(store: &SqlStore) {
    let batch = records(60);
    store.write(&batch).await.unwrap();
    let query = |dimension, only| UsageQuery {
        granularity: Granularity::Minute,
        dimension,
        from: T0,
        to: T0 + Duration::hours(1),
        only,
    };
    let by_model = store.usage(&query(Dimension::Model, None)).await.unwrap();
    let total: i64 = by_model.iter().map(|p| p.total_tokens).sum();
    let expected: i64 = batch
        .iter()
        .map(|r| r.usage.unwrap().total_tokens as i64)
        .sum();
    assert_eq!(total, expected);
    let errors: i64 = by_model.iter().map(|p| p.errors).sum();
    assert_eq!(errors, 6);
    assert!(by_model.iter().all(|p| p.value.starts_with("gpt-4o")));
    // A team lead of group-blue sees only group-blue.
    let blue = store
        .usage(&query(Dimension::Group, Some(vec!["group-blue".into()])))
        .await
        .unwrap();
    assert!(blue.iter().all(|p| p.value == "group-blue"));
    assert_eq!(blue.iter().map(|p| p.requests).sum::<i64>(), 30);
    let red = store
        .usage(&query(Dimension::Group, Some(vec!["group-red".into()])))
        .await
        .unwrap();
    assert_eq!(red.iter().map(|p| p.requests).sum::<i64>(), 60);
    let nobody = store
        .usage(&query(Dimension::Group, Some(vec![])))
        .await
        .unwrap();
    assert!(nobody.is_empty());
    let latency_max = by_model.iter().map(|p| p.latency_max_ms).max().unwrap();
    assert_eq!(latency_max, 159);

    // Totals over the range: one point per value, the sums of its buckets.
    let totals = store
        .usage_totals(&query(Dimension::Model, None))
        .await
        .unwrap();
    assert_eq!(totals.len(), 2, "{totals:?}");
    for total in &totals {
        let points = by_model.iter().filter(|p| p.value == total.value);
        let (requests, tokens, max) = points.fold((0, 0, 0), |(r, t, m), p| {
            (r + p.requests, t + p.total_tokens, m.max(p.latency_max_ms))
        });
        assert_eq!(
            (total.requests, total.total_tokens, total.latency_max_ms),
            (requests, tokens, max)
        );
    }
    assert_eq!(totals.iter().map(|p| p.total_tokens).sum::<i64>(), expected);
    // Every sum, and a team lead's restriction, alike on the totals: per value, the points of
    // `usage` added up, by group (a call counted in each of its groups) and by user.
    for (dimension, only) in [
        (Dimension::Group, None),
        (Dimension::Group, Some(vec!["group-blue".to_owned()])),
        (Dimension::Group, Some(vec![])),
        (Dimension::User, None),
    ] {
        let points = store.usage(&query(dimension, only.clone())).await.unwrap();
        let totals = store
            .usage_totals(&query(dimension, only.clone()))
            .await
            .unwrap();
        let mut summed: std::collections::BTreeMap<&str, [i64; 7]> = Default::default();
        for p in &points {
            let sums = summed.entry(p.value.as_str()).or_default();
            for (sum, add) in sums.iter_mut().zip([
                p.requests,
                p.errors,
                p.prompt_tokens,
                p.completion_tokens,
                p.total_tokens,
                p.latency_sum_ms,
                0,
            ]) {
                *sum += add;
            }
            sums[6] = sums[6].max(p.latency_max_ms);
        }
        let got: std::collections::BTreeMap<&str, [i64; 7]> = totals
            .iter()
            .map(|t| {
                (
                    t.value.as_str(),
                    [
                        t.requests,
                        t.errors,
                        t.prompt_tokens,
                        t.completion_tokens,
                        t.total_tokens,
                        t.latency_sum_ms,
                        t.latency_max_ms,
                    ],
                )
            })
            .collect();
        assert_eq!(got, summed, "{dimension:?} {only:?}");
        assert_eq!(got.len(), totals.len(), "one row per value");
        if let Some(only) = &only {
            assert!(totals.iter().all(|t| only.contains(&t.value)), "{totals:?}");
        }
    }
}

async fn export_streams_every_match(store: &SqlStore) {
    let batch: Vec<AuditRecord> = (0..2_500).map(record).collect();
    for chunk in batch.chunks(500) {
        store.write(chunk).await.unwrap();
    }
    let range = SearchFilter::between(T0, T0 + Duration::days(2));
    let exported: Vec<_> = store
        .export(SearchFilter {
            user: Some("alice@contoso.com".into()),
            ..range
        })
        .collect()
        .await;
    assert_eq!(exported.len(), 1_250);
    assert!(
        exported
            .iter()
            .all(|r| r.as_ref().unwrap().user_name.as_deref() == Some("alice@contoso.com"))
    );
}

/// A call whose metadata rows are gone while its content row stayed (retention's metadata step
/// ran between a journaled batch's write and its replay) is stored again when the journal
/// replays it: the content row already there does not fail the batch, and so does not hold
/// the journal back.
async fn a_call_whose_metadata_went_and_content_stayed_is_stored_again(store: &SqlStore) {
    let batch = records(3);
    assert_eq!(store.write(&batch).await.unwrap(), 3);
    // What retention's metadata step removes of a call.
    for (sqlite, postgres) in [
        (
            "DELETE FROM ApiManagementGatewayLlmLog WHERE CorrelationId = ?",
            r#"DELETE FROM "GatehouseLlmLogHeaders" WHERE "CorrelationId" = $1"#,
        ),
        (
            "DELETE FROM GatehouseGatewayLogs WHERE CorrelationId = ?",
            r#"DELETE FROM "GatehouseGatewayLogs" WHERE "CorrelationId" = $1"#,
        ),
    ] {
        execute_on_engine(store, sqlite, postgres, "call-00001".to_owned()).await;
    }
    assert!(store.call("call-00001").await.unwrap().is_none());
    assert_eq!(store.write(&batch).await.unwrap(), 1);
    let again = store.call("call-00001").await.unwrap().unwrap();
    assert_eq!(again.backend_request_body, batch[1].backend_request_body);
    assert_eq!(again.backend_response_body, batch[1].backend_response_body);
}

/// The requests the minute rollups hold for the hour from `T0`.
async fn requests_rolled_up(store: &SqlStore) -> i64 {
    usage_of_all(store, Granularity::Minute, Duration::hours(1))
        .await
        .iter()
        .map(|p| p.requests)
        .sum()
}

/// A journal days behind replays calls that metadata retention has removed since they were
/// stored (a replay after a crash between a chunk's store and its commit): they are neither
/// stored again nor added to the rollups, which retention keeps, a second time. A call of the
/// same chain that was never stored still is.
async fn a_call_retention_removed_is_not_stored_or_counted_again(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(12);
    for record in &mut batch {
        chainer.link(record);
    }
    // A call recorded without a chain (a writer that links none) is recognised by its id alone.
    batch[11].chain = None;
    assert_eq!(store.write(&batch[..10]).await.unwrap(), 10);
    assert_eq!(requests_rolled_up(store).await, 10);
    // Calls 0 to 4 (T0 to T0 + 28 s) go whole.
    let cutoff = T0 + Duration::seconds(30);
    let report = store.enforce_retention(cutoff, cutoff, 2).await.unwrap();
    assert_eq!(report.metadata_removed, 5, "{report:?}");
    assert_eq!(requests_rolled_up(store).await, 10, "rollups are kept");

    // The whole batch replayed: nothing is new, the removed calls stay removed.
    assert_eq!(store.write(&batch[..10]).await.unwrap(), 0);
    assert_eq!(requests_rolled_up(store).await, 10);
    for i in 0..5 {
        let id = format!("call-{i:05}");
        assert!(store.call(&id).await.unwrap().is_none(), "{id}");
    }
    let again = store.enforce_retention(cutoff, cutoff, 2).await.unwrap();
    assert_eq!(again.metadata_removed, 0, "{again:?}");

    // Calls never stored are, with a chain (a later sequence) and without.
    assert_eq!(store.write(&batch[9..]).await.unwrap(), 2);
    assert_eq!(requests_rolled_up(store).await, 12);
}

/// Runs one statement on the store's engine, `sqlite` or `postgres` (the same statement in each
/// engine's quoting), with `value` bound to its one parameter.
async fn execute_on_engine<T>(store: &SqlStore, sqlite: &str, postgres: &str, value: T)
where
    T: for<'q> sqlx::Encode<'q, sqlx::Sqlite>
        + sqlx::Type<sqlx::Sqlite>
        + for<'q> sqlx::Encode<'q, sqlx::Postgres>
        + sqlx::Type<sqlx::Postgres>
        + Send
        + 'static,
{
    match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => {
            sqlx::query(sqlite).bind(value).execute(pool).await.unwrap();
        }
        (_, Some(pool)) => {
            sqlx::query(postgres)
                .bind(value)
                .execute(pool)
                .await
                .unwrap();
        }
        _ => unreachable!(),
    }
}

/// Removes a call's metadata row, as someone tampering with the store would.
async fn delete_call(store: &SqlStore, id: &str) {
    execute_on_engine(
        store,
        "DELETE FROM GatehouseGatewayLogs WHERE CorrelationId = ?",
        r#"DELETE FROM "GatehouseGatewayLogs" WHERE "CorrelationId" = $1"#,
        id.to_owned(),
    )
    .await;
}

async fn content_expires_before_metadata(store: &SqlStore) {
    // Calls every 7 s from T0: 0..=413 s; call 21's prompt is split into LLM-log pieces.
    let mut batch = records(60);
    batch[21].request_messages = Some("ü".repeat(40_000));
    store.write(&batch).await.unwrap();
    let report = store
        .enforce_retention(T0 + Duration::seconds(200), T0 + Duration::seconds(100), 7)
        .await
        .unwrap();
    assert_eq!(report.metadata_removed, 15, "{report:?}"); // 0, 7, …, 98 s
    assert_eq!(report.content_removed, 29, "{report:?}"); // everything before 200 s
    assert!(
        report.batches > 3,
        "small batches, several transactions: {report:?}"
    );

    // Gone entirely.
    assert!(store.call("call-00000").await.unwrap().is_none());
    // Metadata kept, content gone.
    let kept = store
        .call("call-00020")
        .await
        .unwrap()
        .expect("metadata kept");
    assert_eq!(kept.summary.total_tokens, Some(35));
    assert_eq!(kept.prompt_tokens, Some(30));
    assert_eq!(kept.backend_request_body, None);
    assert_eq!(kept.backend_response_body, None);
    assert_eq!(kept.request_messages, None);
    assert_eq!(kept.response_messages, None);
    let range = SearchFilter::between(T0, T0 + Duration::hours(1));
    let text = store
        .search(&SearchFilter {
            text: Some("number 20".into()),
            ..range.clone()
        })
        .await
        .unwrap();
    assert!(
        text.items.is_empty(),
        "full text of expired content is gone"
    );
    // Newer content untouched.
    let fresh = store.call("call-00040").await.unwrap().unwrap();
    assert!(fresh.backend_response_body.is_some() && fresh.request_messages.is_some());
    let text = store
        .search(&SearchFilter {
            text: Some("number 40".into()),
            ..range.clone()
        })
        .await
        .unwrap();
    assert_eq!(text.items.len(), 1);
    let all = store
        .search(&SearchFilter {
            limit: 100,
            ..range
        })
        .await
        .unwrap();
    assert_eq!(all.items.len(), 45);
    // A second run finds nothing more.
    let again = store
        .enforce_retention(T0 + Duration::seconds(200), T0 + Duration::seconds(100), 7)
        .await
        .unwrap();
    assert_eq!(
        (
            again.content_removed,
            again.metadata_removed,
            again.message_pieces_removed
        ),
        (0, 0, 0)
    );

    // A journal replaying calls whose metadata is kept does not bring their content back.
    assert_eq!(store.write(&batch[15..45]).await.unwrap(), 0);
    for id in ["call-00020", "call-00021"] {
        let kept = store.call(id).await.unwrap().expect("metadata kept");
        assert_eq!(
            (
                kept.backend_request_body,
                kept.backend_response_body,
                kept.request_messages,
                kept.response_messages
            ),
            (None, None, None, None),
            "{id}"
        );
    }
    let text = store
        .search(&SearchFilter {
            text: Some("number 20".into()),
            ..SearchFilter::between(T0, T0 + Duration::hours(1))
        })
        .await
        .unwrap();
    assert!(text.items.is_empty(), "the replay indexed nothing");
    let again = store
        .enforce_retention(T0 + Duration::seconds(200), T0 + Duration::seconds(100), 7)
        .await
        .unwrap();
    assert_eq!(
        again.content_removed + again.message_pieces_removed,
        0,
        "{again:?}"
    );
    // Newer content is as it was.
    let fresh = store.call("call-00040").await.unwrap().unwrap();
    assert!(fresh.backend_response_body.is_some() && fresh.request_messages.is_some());
}

/// Writes `batch` (linked, `T0` onwards), checks that its chains verify from the store, removes
/// the content of the records before `T0` + `content_seconds` by retention, checks again, and
/// returns the range checked.
async fn chains_verify_written_and_after_content_retention(
    store: &SqlStore,
    batch: &[AuditRecord],
    content_seconds: i64,
) -> (OffsetDateTime, OffsetDateTime) {
    assert_eq!(store.write(batch).await.unwrap(), batch.len());
    let range = (T0, T0 + Duration::hours(1));
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(
        report.chains.iter().map(|c| c.records).sum::<u64>(),
        batch.len() as u64
    );

    // Content removed by retention does not break the chain.
    let removed = store
        .enforce_retention(T0 + Duration::seconds(content_seconds), T0, 100)
        .await
        .unwrap();
    assert!(removed.content_removed > 0, "{removed:?}");
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    assert!(report.is_intact(), "after content retention: {report:?}");
    range
}

/// The heads the writer published find what the stored chain alone cannot: its last record
/// removed, then the whole chain.
async fn chains_verify_against_their_published_heads(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(10);
    for record in &mut batch {
        chainer.link(record);
    }
    let heads = chainer.take_new_heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(store.write(&batch).await.unwrap(), 10);
    let range = (T0, T0 + Duration::hours(1));
    let verify = |heads: Vec<gatehouse_audit::chain::PublishedHead>| async move {
        store
            .verify_chains_against(
                range.0,
                range.1,
                gatehouse_audit::chain::Verifier::new(),
                &heads,
            )
            .await
            .unwrap()
    };
    assert!(verify(heads.clone()).await.is_intact());
    // Removes the records from `sequence` on.
    let delete = |sequence: i64| {
        execute_on_engine(
            store,
            "DELETE FROM GatehouseGatewayLogs WHERE ChainSequence >= ?",
            r#"DELETE FROM "GatehouseGatewayLogs" WHERE "ChainSequence" >= $1"#,
            sequence,
        )
    };
    delete(9).await;
    assert!(
        store
            .verify_chains(range.0, range.1)
            .await
            .unwrap()
            .is_intact()
    );
    let report = verify(heads.clone()).await;
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (broken.sequence, broken.reason.to_string().as_str()),
        (9, "removed"),
        "{report:?}"
    );
    // A head of a day the range does not touch is not expected.
    let next_day = (
        T0 + Duration::days(2),
        T0 + Duration::days(2) + Duration::hours(1),
    );
    let elsewhere = store
        .verify_chains_against(
            next_day.0,
            next_day.1,
            gatehouse_audit::chain::Verifier::new(),
            &heads,
        )
        .await
        .unwrap();
    assert!(
        elsewhere.is_intact() && elsewhere.chains.is_empty(),
        "{elsewhere:?}"
    );

    delete(0).await;
    let report = verify(heads).await;
    assert_eq!(report.chains.len(), 1, "{report:?}");
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (broken.sequence, broken.reason.to_string().as_str()),
        (0, "removed")
    );
}

async fn chains_verify_from_the_store(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(30);
    batch[3].request_messages = Some("ü".repeat(40_000)); // split into LLM pieces, rebuilt on read
    // A backend's absurd count: stored as the largest a BIGINT holds, hashed as stored.
    batch[4].usage.as_mut().unwrap().prompt_tokens = u64::MAX;
    // A streamed submit_tool_outputs carries the run's answer as its messages, though it is not
    // an inference call: its pieces are kept and read back.
    batch[5].operation_id = Some(gatehouse_schema::OperationId::SubmitToolOutputsToRun);
    // An empty completion is not a missing one: hashed apart, so stored and read back apart.
    batch[20].response_messages = Some(String::new());
    batch[21].request_messages = Some(String::new());
    batch[21].response_messages = None;
    for record in &mut batch {
        chainer.link(record);
    }
    let range = chains_verify_written_and_after_content_retention(store, &batch, 50).await;
    for (id, record) in [("call-00020", &batch[20]), ("call-00021", &batch[21])] {
        let read = store.call(id).await.unwrap().unwrap();
        assert_eq!(
            (read.request_messages, read.response_messages),
            (
                record.request_messages.clone(),
                record.response_messages.clone()
            ),
            "{id}"
        );
    }

    // A changed field is named.
    match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => {
            sqlx::query("UPDATE GatehouseGatewayLogs SET TotalTokens = 1 WHERE CorrelationId = 'call-00012'").execute(pool).await.unwrap();
        }
        (_, Some(pool)) => {
            sqlx::query(r#"UPDATE "GatehouseGatewayLogs" SET "TotalTokens" = 1 WHERE "CorrelationId" = 'call-00012'"#).execute(pool).await.unwrap();
        }
        _ => unreachable!(),
    }
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(broken.correlation_id, "call-00012");
    assert_eq!(broken.reason.to_string(), "changed");

    // A removed record is named by the one after the gap.
    match (store.sqlite_pool(), store.postgres_pool()) {
        (Some(pool), _) => {
            sqlx::query("UPDATE GatehouseGatewayLogs SET TotalTokens = 27 WHERE CorrelationId = 'call-00012'").execute(pool).await.unwrap();
            sqlx::query("DELETE FROM GatehouseGatewayLogs WHERE CorrelationId = 'call-00020'")
                .execute(pool)
                .await
                .unwrap();
        }
        (_, Some(pool)) => {
            sqlx::query(r#"UPDATE "GatehouseGatewayLogs" SET "TotalTokens" = 27 WHERE "CorrelationId" = 'call-00012'"#).execute(pool).await.unwrap();
            sqlx::query(
                r#"DELETE FROM "GatehouseGatewayLogs" WHERE "CorrelationId" = 'call-00020'"#,
            )
            .execute(pool)
            .await
            .unwrap();
        }
        _ => unreachable!(),
    }
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("call-00021", "removed"),
        "{report:?}"
    );

    // Every record a range held removed: the chain around it is still checked, whole.
    let removed: Vec<String> = (22..=24).map(|i| format!("call-{i:05}")).collect();
    for id in &removed {
        delete_call(store, id).await;
    }
    // Records 22 to 24 were written at T0 + 154 s to T0 + 168 s.
    let emptied = (T0 + Duration::seconds(150), T0 + Duration::seconds(170));
    let report = store.verify_chains(emptied.0, emptied.1).await.unwrap();
    assert_eq!(report.chains.len(), 1, "{report:?}");
    assert!(!report.is_intact(), "{report:?}");
    // A range on a day the chain does not hold names no chain.
    let next_day = (
        T0 + Duration::days(1),
        T0 + Duration::days(1) + Duration::hours(1),
    );
    let report = store.verify_chains(next_day.0, next_day.1).await.unwrap();
    assert!(report.chains.is_empty(), "{report:?}");
    assert!(report.is_intact(), "{report:?}");
    // A record without a chain link in the range (inserted, or written before chaining) is
    // counted, and the range is not intact.
    let mut inserted = record(90);
    inserted.time_generated = next_day.0 + Duration::minutes(10);
    inserted.chain = None;
    assert_eq!(store.write(&[inserted]).await.unwrap(), 1);
    let report = store.verify_chains(next_day.0, next_day.1).await.unwrap();
    assert_eq!(report.unchained, 1, "{report:?}");
    assert!(!report.is_intact(), "{report:?}");
    let report = store.verify_chains(emptied.0, emptied.1).await.unwrap();
    assert_eq!(report.unchained, 0, "outside the range: {report:?}");
}

/// The first records of a chain's day removed with everything the chain had in the range: no
/// record of it is left before the range, but its day is in the range, and the chain, checked
/// from its start, shows the gap.
async fn chains_verify_a_day_whose_first_records_were_removed(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(30);
    for record in &mut batch {
        chainer.link(record);
    }
    assert_eq!(store.write(&batch).await.unwrap(), batch.len());
    // Records 0 to 4 were written at T0 to T0 + 28 s.
    for i in 0..5 {
        delete_call(store, &format!("call-{i:05}")).await;
    }
    let report = store
        .verify_chains(T0 - Duration::hours(1), T0 + Duration::seconds(30))
        .await
        .unwrap();
    assert_eq!(report.chains.len(), 1, "{report:?}");
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("call-00005", "removed"),
        "{report:?}"
    );
}

/// Retention removes content while a verification runs: each call's bodies and pieces go
/// together and the verification reads a record with its pieces from one snapshot, so no record
/// is ever seen with part of its content and named as changed. 600 records: more than a page of
/// the verification's reads.
async fn chains_verify_while_retention_removes_content(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(600);
    for (i, record) in batch.iter_mut().enumerate() {
        if i % 50 == 7 {
            // Split into several LLM-log pieces.
            record.request_messages = Some(format!("[\"{}\"]", "ü".repeat(40_000)));
        }
        chainer.link(record);
    }
    assert_eq!(store.write(&batch).await.unwrap(), batch.len());
    let range = (T0, T0 + Duration::hours(2));
    // PostgreSQL: the records' day (in the past) gets its partitions now, not in the retention
    // run. Rows moved out of the DEFAULT partition are not seen by a snapshot taken before the
    // move (PostgreSQL's partition changes are not MVCC-safe), which is not what this tests.
    store.maintain_partitions().await.unwrap();

    let done = std::cell::Cell::new(false);
    let retention = async {
        // Every call's content, one call per transaction; the metadata stays.
        let report = store
            .enforce_retention(T0 + Duration::hours(2), T0, 1)
            .await
            .unwrap();
        done.set(true);
        report
    };
    let verifications = async {
        let mut runs = 0;
        loop {
            let last = done.get();
            let report = store.verify_chains(range.0, range.1).await.unwrap();
            runs += 1;
            assert!(report.is_intact(), "verification {runs}: {report:?}");
            assert_eq!(
                report.chains.iter().map(|c| c.records).sum::<u64>(),
                600,
                "verification {runs}"
            );
            if last {
                return runs;
            }
            tokio::task::yield_now().await;
        }
    };
    let (report, runs) = tokio::join!(retention, verifications);
    assert_eq!(report.content_removed, 600, "{report:?}");
    assert!(
        runs >= 3,
        "only {runs} verifications ran beside the retention"
    );
    let call = store.call("call-00007").await.unwrap().unwrap();
    assert!(call.request_messages.is_none() && call.backend_request_body.is_none());
}

/// A call's content deleted by hand inside the content window (no retention removes it there)
/// is named `changed` by a verification told where the window starts; a verification not told
/// takes it for content retention removed, as before.
async fn content_deleted_inside_its_window_breaks_the_chain(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(4);
    for record in &mut batch {
        // Bodies only: the content is then one row of `GatehouseCallContent` a call.
        record.request_messages = None;
        record.response_messages = None;
        chainer.link(record);
    }
    assert_eq!(store.write(&batch).await.unwrap(), batch.len());
    let range = (T0, T0 + Duration::hours(1));
    let window_start = T0 - Duration::days(1);
    let report = store
        .verify_chains_expecting_content(range.0, range.1, window_start)
        .await
        .unwrap();
    assert!(report.is_intact(), "{report:?}");
    execute_on_engine(
        store,
        "DELETE FROM GatehouseCallContent WHERE CorrelationId = ?",
        r#"DELETE FROM "GatehouseCallContent" WHERE "CorrelationId" = $1"#,
        "call-00002".to_owned(),
    )
    .await;
    let call = store.call("call-00002").await.unwrap().unwrap();
    assert!(call.backend_request_body.is_none() && call.backend_response_body.is_none());
    let report = store
        .verify_chains_expecting_content(range.0, range.1, window_start)
        .await
        .unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("call-00002", "changed"),
        "{report:?}"
    );
    // Past the window's start the same record may have lost its content to retention.
    let report = store
        .verify_chains_expecting_content(range.0, range.1, T0 + Duration::hours(1))
        .await
        .unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert!(
        store
            .verify_chains(range.0, range.1)
            .await
            .unwrap()
            .is_intact()
    );
}

/// `batch` linked into one chain as a gateway from before the chain's content hash format 2
/// linked it (its first `format_1` records: the content hashed as a JSON array), and the rest as
/// a gateway of format 2 continues that chain after an upgrade.
fn linked_across_the_content_hash_change(
    mut batch: Vec<AuditRecord>,
    format_1: usize,
) -> Vec<AuditRecord> {
    use gatehouse_audit::chain;
    let chain_id = format!("gw-1/{}", T0.date());
    let mut previous = chain::GENESIS_HASH.to_owned();
    for (sequence, record) in batch.iter_mut().enumerate() {
        record.chain = None;
        let content_hash = if sequence < format_1 {
            chain::content_hash_format_1(record).unwrap()
        } else {
            chain::content_hash(record)
        };
        let record_hash = chain::record_hash(&previous, record, &content_hash).unwrap();
        record.chain = Some(gatehouse_schema::audit::ChainLink {
            chain_id: chain_id.clone(),
            sequence: sequence as u64,
            previous_hash: std::mem::replace(&mut previous, record_hash.clone()),
            record_hash,
            content_hash,
        });
    }
    batch
}

async fn chains_linked_before_the_content_hash_change_verify_from_the_store(store: &SqlStore) {
    let mut batch = records(20);
    batch[2].request_messages = Some("ü".repeat(40_000)); // split into LLM pieces, rebuilt on read
    let batch = linked_across_the_content_hash_change(batch, 12);
    // Records 0 to 14 lose their content: format-1 and format-2 records alike.
    let range = chains_verify_written_and_after_content_retention(store, &batch, 100).await;

    // A changed field of a format-1 record (9) is named, before one of a format-2 record (16).
    for call in ["call-00016", "call-00009"] {
        let updated = match (store.sqlite_pool(), store.postgres_pool()) {
            (Some(pool), _) => sqlx::query(
                "UPDATE GatehouseGatewayLogs SET ResponseCode = 500 WHERE CorrelationId = ?",
            )
            .bind(call)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
            (_, Some(pool)) => sqlx::query(
                r#"UPDATE "GatehouseGatewayLogs" SET "ResponseCode" = 500 WHERE "CorrelationId" = $1"#,
            )
            .bind(call)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected(),
            _ => unreachable!(),
        };
        assert_eq!(updated, 1, "{call}");
    }
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("call-00009", "changed"),
        "{report:?}"
    );
}

// PostgreSQL: the per-call tables are partitioned by UTC day (migration 0004).

/// The partitioned tables.
const DAILY_TABLES: [&str; 4] = [
    "GatehouseGatewayLogs",
    "GatehouseCallContent",
    "GatehouseLlmLogHeaders",
    "GatehouseLlmLogPieces",
];

/// Midnight UTC of day `n` of the partition tests (day 0 is 2026-11-20).
fn day(n: i64) -> OffsetDateTime {
    datetime!(2026-11-20 00:00:00 UTC) + Duration::days(n)
}

/// The name the store gives `table`'s partition of the day of `at`.
fn partition_name(table: &str, at: OffsetDateTime) -> String {
    let date = at.date();
    format!(
        "{table}_p{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// A call with prompt, completion and bodies at `at`.
fn record_at(id: &str, at: OffsetDateTime) -> AuditRecord {
    let mut record = record(1);
    record.correlation_id = id.to_owned();
    record.time_generated = at;
    record
}

/// The partitions of `table`, from the catalog.
async fn partitions_of(pool: &sqlx::PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1 ORDER BY 1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The partitions of `table` that hold rows of call `id`.
async fn partitions_holding(pool: &sqlx::PgPool, table: &str, id: &str) -> Vec<String> {
    // `table` is one of the constants above.
    sqlx::query_scalar(&format!(
        r#"SELECT DISTINCT c.relname::text FROM "{table}" t JOIN pg_class c ON c.oid = t.tableoid WHERE t."CorrelationId" = $1"#
    ))
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The ids of the full-text word index's blocks, in order.
async fn block_ids(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar(r#"SELECT "BlockId" FROM "GatehouseSearchBlocks" ORDER BY 1"#)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Rows of each partitioned table, in the order of [`DAILY_TABLES`].
async fn row_counts(pool: &sqlx::PgPool) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in DAILY_TABLES {
        let count: i64 = sqlx::query_scalar(&format!(r#"SELECT count(*) FROM "{table}""#))
            .fetch_one(pool)
            .await
            .unwrap();
        counts.push(count);
    }
    counts
}

/// The detailed planner statistics of the full-text vectors (migration 0005) and of the blocks'
/// words (0007) reach the partitions the store creates after the migrations.
#[tokio::test]
async fn postgres_partitions_made_later_keep_the_search_statistics() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let later = day(40);
    store
        .create_partitions(later.date(), later.date())
        .await
        .unwrap();
    for (table, column) in [
        ("GatehouseCallContent", "SearchText"),
        ("GatehouseSearchBlocks", "Words"),
    ] {
        let partition = partition_name(table, later);
        let target: i32 = sqlx::query_scalar(
            r#"SELECT attstattarget::int4 FROM pg_attribute WHERE attrelid = $1::regclass AND attname = $2"#,
        )
        .bind(format!("\"{partition}\""))
        .bind(column)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(target, 1000, "{partition}");
    }
}

/// Migration 0011 makes `ApiManagementGatewayLogs` again to show `TimeToFirstToken`: a store
/// migrated from before it keeps the privileges granted on the view (an auditors' role), and
/// shows the new column.
#[tokio::test]
async fn postgres_the_view_made_again_keeps_its_grants() {
    let database = postgres_database().await;
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    let all = sqlx::migrate!("../migrations/audit/postgres");
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            all.migrations
                .iter()
                .filter(|migration| migration.version < 11)
                .cloned()
                .collect(),
        ),
        ignore_missing: all.ignore_missing,
        locking: all.locking,
        no_tx: all.no_tx,
    };
    before.run(&pool).await.unwrap();
    // Roles belong to the server: a name of this test's own, dropped before any assertion.
    let role = format!("gh_auditors_{}", uuid::Uuid::new_v4().simple());
    for statement in [
        format!(r#"CREATE ROLE "{role}""#),
        format!(r#"GRANT SELECT ON "ApiManagementGatewayLogs" TO "{role}" WITH GRANT OPTION"#),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    let opened = SqlStore::open(&database.url).await.map(drop);
    let privileges: Result<(bool, bool, bool), sqlx::Error> = sqlx::query_as(
        r#"SELECT has_table_privilege($1, '"ApiManagementGatewayLogs"', 'SELECT'),
                  has_table_privilege($1, '"ApiManagementGatewayLogs"', 'SELECT WITH GRANT OPTION'),
                  has_table_privilege($1, '"ApiManagementGatewayLogs"', 'INSERT')"#,
    )
    .bind(&role)
    .fetch_one(&pool)
    .await;
    let column: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns \
         WHERE table_name = 'ApiManagementGatewayLogs' AND column_name = 'TimeToFirstToken'",
    )
    .fetch_one(&pool)
    .await;
    for statement in [
        format!(r#"DROP OWNED BY "{role}""#),
        format!(r#"DROP ROLE "{role}""#),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    pool.close().await;
    opened.unwrap();
    assert_eq!(privileges.unwrap(), (true, true, false));
    assert_eq!(column.unwrap(), 1);
}

/// Store sessions run without JIT compilation, which costs more than the store's short
/// statements take.
#[tokio::test]
async fn postgres_store_sessions_run_without_jit() {
    let test = postgres().await;
    let pool = test.store.postgres_pool().unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(jit, "off");
}

/// The word index holds blocks of up to 64 calls of one day (migration 0007): every call with
/// words names a block that holds all of them, and a batch needs far fewer blocks than calls.
#[tokio::test]
async fn postgres_calls_are_indexed_in_blocks_of_their_day() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let mut batch = records(300);
    batch[7].request_messages = None;
    batch[7].response_messages = None;
    assert_eq!(store.write(&batch).await.unwrap(), 300);
    let (calls, in_blocks, blocks, largest): (i64, i64, i64, i64) = sqlx::query_as(
        r#"SELECT (SELECT count(*) FROM "GatehouseCallContent"),
                  (SELECT count(*) FROM "GatehouseCallContent" WHERE "SearchBlock" IS NOT NULL),
                  (SELECT count(*) FROM "GatehouseSearchBlocks"),
                  (SELECT max(n) FROM (SELECT count(*) AS n FROM "GatehouseCallContent" GROUP BY "SearchBlock") m)"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    // The call without messages has bodies, so a content row, but no words and no block.
    assert_eq!((calls, in_blocks), (300, 299));
    // Three writers share the batch: at most two blocks each here.
    assert!((5..=6).contains(&blocks), "{blocks} blocks");
    assert!(largest <= 64, "{largest}");
    // Every named block exists (a call naming a missing one could never be found), holds all of
    // its call's words and is of its call's day.
    let (joined, outside, wrong_day): (i64, i64, i64) = sqlx::query_as(
        r#"SELECT count(*),
                  count(*) FILTER (WHERE NOT tsvector_to_array(c."SearchText") <@ tsvector_to_array(b."Words")),
                  count(*) FILTER (WHERE b."TimeGenerated" <> date_trunc('day', c."TimeGenerated" AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
           FROM "GatehouseCallContent" c JOIN "GatehouseSearchBlocks" b ON b."BlockId" = c."SearchBlock""#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((joined, outside, wrong_day), (299, 0, 0));
    // A word of one call of a block finds that call alone.
    assert_eq!(found(store, "number 123").await, ["call-00123"]);
}

/// Gives call `id` the full-text vector PostgreSQL's parser makes of `text`, as the store wrote
/// vectors before it split the words itself, and a block of the word index of its own with
/// those words, as migration 0007 left the calls stored before it.
async fn vector_as_before(pool: &sqlx::PgPool, id: &str, text: &str) {
    sqlx::query(
        r#"WITH c AS (
               UPDATE "GatehouseCallContent" SET "SearchText" = to_tsvector('simple', $1), "SearchBlock" = NULL
               WHERE "CorrelationId" = $2 RETURNING "CorrelationId", "TimeGenerated", "SearchText")
           INSERT INTO "GatehouseSearchBlocks" SELECT "CorrelationId", "TimeGenerated", strip("SearchText") FROM c
           ON CONFLICT ("BlockId", "TimeGenerated") DO UPDATE SET "Words" = EXCLUDED."Words""#,
    )
    .bind(text)
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

/// A gateway of a version before the word index of blocks (migration 0007), still running during
/// a rolling upgrade, writes content rows with a vector and no block: migration 0009's trigger
/// gives each its block as it is written, so its calls are found by text at once; a replay of
/// such a row fails nothing. Without the trigger they would not be found (checked last).
#[tokio::test]
async fn postgres_calls_written_by_an_earlier_version_are_found_by_text() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let batch = vec![
        record_saying(0, "quarterly forecast for the harbour project"),
        record_saying(1, "the harbour is closed on sunday"),
        record_saying(2, "nothing to see here"),
    ];
    store.write(&batch).await.unwrap();
    assert_eq!(found(store, "harbour").await, ["call-00000", "call-00001"]);

    // Removes the calls' content rows and their blocks, for them to be written again as the
    // INSERT of an earlier version wrote them (`insert_as_before`).
    async fn remove_content(pool: &sqlx::PgPool, ids: &[&str]) {
        sqlx::query(
            r#"WITH old AS (
                   DELETE FROM "GatehouseCallContent" WHERE "CorrelationId" = ANY($1)
                   RETURNING "CorrelationId", "TimeGenerated", "BackendRequestBody", "BackendResponseBody", "SearchText", "SearchBlock"),
               blocks AS (DELETE FROM "GatehouseSearchBlocks" WHERE "BlockId" IN (SELECT coalesce("SearchBlock", "CorrelationId") FROM old))
               SELECT count(*) FROM old"#,
        )
        .bind(ids)
        .execute(pool)
        .await
        .unwrap();
    }
    let ids = ["call-00000", "call-00001", "call-00002"];
    // The rows as they are, kept aside (the database is this test's own).
    sqlx::query(
        r#"CREATE TABLE "Kept" AS SELECT "CorrelationId", "TimeGenerated", "BackendRequestBody", "BackendResponseBody", "SearchText" FROM "GatehouseCallContent" WHERE "CorrelationId" = ANY($1)"#,
    )
    .bind(&ids[..])
    .execute(pool)
    .await
    .unwrap();
    // The INSERT of an earlier version: its own vector, no "SearchBlock" column.
    let insert_as_before = || async {
        sqlx::query(
            r#"INSERT INTO "GatehouseCallContent" ("CorrelationId", "TimeGenerated", "BackendRequestBody", "BackendResponseBody", "SearchText") SELECT * FROM "Kept" ON CONFLICT ("CorrelationId", "TimeGenerated") DO NOTHING"#,
        )
        .execute(pool)
        .await
        .unwrap()
        .rows_affected()
    };
    remove_content(pool, &ids).await;
    assert!(found(store, "harbour").await.is_empty());
    assert_eq!(insert_as_before().await, 3);
    assert_eq!(found(store, "harbour").await, ["call-00000", "call-00001"]);
    assert_eq!(found(store, "quarterly harbour").await, ["call-00000"]);
    // Replayed: nothing fails, nothing is doubled.
    assert_eq!(insert_as_before().await, 0);
    let blocks: i64 = sqlx::query_scalar(
        r#"SELECT count(*) FROM "GatehouseSearchBlocks" WHERE "BlockId" = ANY($1)"#,
    )
    .bind(&ids[..])
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(blocks, 3);
    // The calls this version writes never fire it: their blocks are the store's own.
    store
        .write(&[record_saying(3, "harbour lights")])
        .await
        .unwrap();
    let (own, fired): (Option<String>, i64) = sqlx::query_as(
        r#"SELECT (SELECT "SearchBlock" FROM "GatehouseCallContent" WHERE "CorrelationId" = 'call-00003'),
                  (SELECT count(*) FROM "GatehouseSearchBlocks" WHERE "BlockId" = 'call-00003')"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(own.is_some_and(|block| block != "call-00003"));
    assert_eq!(
        fired, 0,
        "the trigger made a block for a call of this version"
    );

    // Without the trigger, the same rows are not found.
    sqlx::query(
        r#"DROP TRIGGER "GatehouseCallContent_BlockOfUnblocked" ON "GatehouseCallContent""#,
    )
    .execute(pool)
    .await
    .unwrap();
    remove_content(pool, &ids).await;
    assert_eq!(insert_as_before().await, 3);
    assert_eq!(found(store, "harbour").await, ["call-00003"]);
}

/// Calls stored before the store built its own full-text vectors (PostgreSQL's parser made them,
/// which keeps an e-mail address as one word) are still found by what found them then.
#[tokio::test]
async fn postgres_search_finds_calls_whose_vectors_postgres_built() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let batch = vec![
        record_saying(0, "write to bob@contoso.com about 1234.56"),
        record_saying(1, "bob works at contoso dot com"),
    ];
    store.write(&batch).await.unwrap();
    for call in &batch {
        vector_as_before(
            pool,
            &call.correlation_id,
            call.request_messages.as_deref().unwrap(),
        )
        .await;
    }
    let legacy: String = sqlx::query_scalar(
        r#"SELECT "SearchText"::text FROM "GatehouseCallContent" WHERE "CorrelationId" = 'call-00000'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(legacy.contains("'bob@contoso.com'"), "{legacy}");

    assert_eq!(found(store, "bob@contoso.com").await, ["call-00000"]);
    assert_eq!(found(store, "1234.56").await, ["call-00000"]);
    assert_eq!(found(store, "contoso").await, ["call-00001"]);
}

/// Calls whose vectors PostgreSQL's parser built are found by the words that parser makes and the
/// store does not (the `-2024` of an invoice number, an accented word), and a search word that
/// parser splits into the store's own words (`user_id`) is a phrase for them as for every call:
/// the parser's words are asked for only where they differ from the store's.
#[tokio::test]
async fn postgres_vectors_postgres_built_are_found_by_its_words_and_no_wider() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let batch = vec![
        record_saying(0, "pay INV-2024-0042 in Réunion"),
        record_saying(1, "the user_id is set"),
        record_saying(2, "the user name and the id"),
        record_saying(3, "a user and an id, written now"),
    ];
    store.write(&batch).await.unwrap();
    for call in &batch[..3] {
        vector_as_before(
            pool,
            &call.correlation_id,
            call.request_messages.as_deref().unwrap(),
        )
        .await;
    }
    let legacy: String = sqlx::query_scalar(
        r#"SELECT "SearchText"::text FROM "GatehouseCallContent" WHERE "CorrelationId" = 'call-00000'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        legacy.contains("'-2024'") && legacy.contains("'réunion'"),
        "{legacy}"
    );

    assert_eq!(found(store, "INV-2024-0042").await, ["call-00000"]);
    assert_eq!(found(store, "réunion pay").await, ["call-00000"]);
    assert_eq!(found(store, "user_id").await, ["call-00001"]);
    assert_eq!(
        found(store, "id").await,
        ["call-00001", "call-00002", "call-00003"]
    );
}

/// Writes only append to the full-text index's pending list; the store merges it after each
/// batch on its own, and `settle_search_index` merges whatever is left.
#[tokio::test]
async fn postgres_full_text_pending_list_is_merged_beside_the_writes() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let limit: String = sqlx::query_scalar("SHOW gin_pending_list_limit")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(limit, "64MB");
    sqlx::query("CREATE EXTENSION pageinspect")
        .execute(pool)
        .await
        .unwrap();
    // The full-text index of the partition that holds the calls' blocks (of the day, or DEFAULT).
    let pending = || async {
        sqlx::query_scalar::<_, i64>(
            r#"SELECT n_pending_tuples FROM gin_metapage_info(get_raw_page((
                   SELECT x.indexrelid::regclass::text FROM pg_index x
                   JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam
                   WHERE a.amname = 'gin' AND x.indrelid = (
                       SELECT tableoid FROM "GatehouseSearchBlocks" WHERE "BlockId" = (
                           SELECT "SearchBlock" FROM "GatehouseCallContent" WHERE "CorrelationId" = 'call-00000'))), 0))"#,
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };

    store.write(&records(60)).await.unwrap();
    // The task merges without being asked: the pending list (far below its 64 MB limit, so no
    // write merged it) empties.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pending().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pending list was not merged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(found(store, "number 42").await, ["call-00042"]);

    // Pending entries are found before the merge too.
    let mut late = record_saying(60, "a late question");
    late.correlation_id = "call-late".to_owned();
    store.write(&[late]).await.unwrap();
    assert_eq!(found(store, "late question").await, ["call-late"]);

    // Settling merges what is pending itself: vectors changed behind the store's back (which
    // wakes no merge task) stay pending until it is asked. First the merge the late call woke
    // must be over, or it would merge them too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let merging: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND state <> 'idle' AND query LIKE '%gin_clean_pending_list%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if merging == 0 && pending().await == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late call's merge did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for id in ["call-00001", "call-00002"] {
        vector_as_before(pool, id, "rewritten words").await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(pending().await > 0, "nothing was left pending to settle");
    store.settle_search_index().await.unwrap();
    assert_eq!(pending().await, 0);
    assert_eq!(found(store, "late question").await, ["call-late"]);
    assert_eq!(
        found(store, "rewritten words").await,
        ["call-00001", "call-00002"]
    );
}

/// Partitions of prompts, completions and vectors keep 8 KB rows whole and compress vectors with
/// lz4, whether they existed at migration or were made later.
#[tokio::test]
async fn postgres_content_partitions_keep_rows_whole() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    store
        .create_partitions(day(40).date(), day(41).date())
        .await
        .unwrap();
    for table in ["GatehouseCallContent", "GatehouseLlmLogPieces"] {
        let partitions: Vec<(String, Option<Vec<String>>)> = sqlx::query_as(
            "SELECT c.relname::text, c.reloptions FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(quote_ident($1))",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(partitions.len() > 3, "{partitions:?}");
        assert!(
            partitions
                .iter()
                .any(|(name, _)| *name == partition_name(table, day(40))),
            "{partitions:?}"
        );
        for (name, options) in &partitions {
            assert_eq!(
                options.as_deref(),
                Some(&["toast_tuple_target=8160".to_owned()][..]),
                "{name}"
            );
        }
    }
    let lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    if lz4 {
        let compressions: Vec<(String, String)> = sqlx::query_as(
            r#"SELECT a.attrelid::regclass::text, a.attcompression::text FROM pg_attribute a
               WHERE a.attname = 'SearchText' AND a.attrelid IN (
                   SELECT inhrelid FROM pg_inherits WHERE inhparent = '"GatehouseCallContent"'::regclass)"#,
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(
            compressions.iter().all(|(_, c)| c == "l"),
            "{compressions:?}"
        );
    }
}

/// Metadata partitions dropped whole note how far they removed each chain, as deleted rows do:
/// a replay of their calls (a journal days behind) is not stored or counted again.
#[tokio::test]
async fn postgres_calls_of_dropped_days_are_not_stored_or_counted_again() {
    let test = postgres().await;
    let store = &test.store;
    store
        .create_partitions(day(0).date(), day(3).date())
        .await
        .unwrap();
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    // Calls on days 0 and 1 at 06:00 and 18:00, one chain a day.
    let mut batch: Vec<AuditRecord> = (0..2)
        .flat_map(|d| [6, 18].map(|h| record_at(&format!("d{d}-{h}"), day(d) + Duration::hours(h))))
        .collect();
    for record in &mut batch {
        chainer.link(record);
    }
    let mut later = record_at("d1-20", day(1) + Duration::hours(20));
    chainer.link(&mut later);
    assert_eq!(store.write(&batch).await.unwrap(), 4);
    let requests = || async {
        store
            .usage(&UsageQuery {
                granularity: Granularity::Hour,
                dimension: Dimension::All,
                from: day(0),
                to: day(3),
                only: None,
            })
            .await
            .unwrap()
            .iter()
            .map(|p| p.requests)
            .sum::<i64>()
    };
    assert_eq!(requests().await, 4);
    // Day 0 dropped whole, day 1 before noon deleted.
    let cutoff = day(1) + Duration::hours(12);
    let report = store.enforce_retention(cutoff, cutoff, 10).await.unwrap();
    assert_eq!(report.metadata_removed, 3, "{report:?}");
    assert!(report.partitions_dropped >= 1, "{report:?}");

    assert_eq!(
        store.write(&batch).await.unwrap(),
        0,
        "a replay stores nothing"
    );
    assert_eq!(requests().await, 4, "and counts nothing again");
    for id in ["d0-6", "d0-18", "d1-6"] {
        assert!(store.call(id).await.unwrap().is_none(), "{id}");
    }
    assert!(store.call("d1-18").await.unwrap().is_some());
    // A later call of day 1's chain, never stored, is.
    assert_eq!(store.write(&[later]).await.unwrap(), 1);
    assert_eq!(requests().await, 5);
}

#[tokio::test]
async fn postgres_retention_drops_whole_days_and_keeps_the_edge_exact() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    store
        .create_partitions(day(0).date(), day(7).date())
        .await
        .unwrap();
    // Eight days of four calls (06:00, 12:00, 18:00, 23:59:59), and one from a clock far behind.
    let times = [
        Duration::hours(6),
        Duration::hours(12),
        Duration::hours(18),
        Duration::seconds(86_399),
    ];
    let mut batch: Vec<AuditRecord> = (0..8)
        .flat_map(|d| {
            times
                .iter()
                .enumerate()
                .map(move |(i, t)| record_at(&format!("d{d}-{i}"), day(d) + *t))
        })
        .collect();
    batch.push(record_at("long-ago", datetime!(2001-01-01 08:00:00 UTC)));
    assert_eq!(store.write(&batch).await.unwrap(), 33);
    for table in DAILY_TABLES {
        let partitions = partitions_of(pool, table).await;
        for d in 0..8 {
            assert!(
                partitions.contains(&partition_name(table, day(d))),
                "{table} day {d}: {partitions:?}"
            );
        }
        assert!(partitions.contains(&format!("{table}_default")));
        assert_eq!(
            partitions_holding(pool, table, "d3-1").await,
            vec![partition_name(table, day(3))]
        );
        assert_eq!(
            partitions_holding(pool, table, "long-ago").await,
            vec![format!("{table}_default")]
        );
    }

    // "Now" is day 7 at noon; content is kept 2 days, metadata 5.
    let now = day(7) + Duration::hours(12);
    let content_before = now - Duration::days(2); // day 5, 12:00
    let metadata_before = now - Duration::days(5); // day 2, 12:00
    let pieces_before: i64 = sqlx::query_scalar(
        r#"SELECT count(*) FROM "ApiManagementGatewayLlmLog" WHERE "SequenceNumber" > 0 AND "TimeGenerated" < $1"#,
    )
    .bind(content_before)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(pieces_before >= 21, "{pieces_before}");
    let report = store
        .enforce_retention(content_before, metadata_before, 3)
        .await
        .unwrap();
    // Content: days 0-4 whole (20 calls), day 5 at 06:00, and the call in DEFAULT.
    assert_eq!(report.content_removed, 22, "{report:?}");
    assert_eq!(report.message_pieces_removed, pieces_before as u64);
    // Metadata: days 0-1 whole (8 calls), day 2 at 06:00, and the call in DEFAULT.
    assert_eq!(report.metadata_removed, 10, "{report:?}");
    // Content, pieces and the word index's blocks: days 0-4; metadata: days 0-1.
    assert_eq!(report.partitions_dropped, 5 + 5 + 5 + 2 + 2, "{report:?}");

    // Whole days are gone from the catalog; the days inside the windows are still there. The
    // blocks of day 5 stay with the calls of that day whose content is kept.
    for (table, first_kept) in [
        ("GatehouseCallContent", 5),
        ("GatehouseLlmLogPieces", 5),
        ("GatehouseSearchBlocks", 5),
        ("GatehouseGatewayLogs", 2),
        ("GatehouseLlmLogHeaders", 2),
    ] {
        let partitions = partitions_of(pool, table).await;
        for d in 0..8 {
            assert_eq!(
                partitions.contains(&partition_name(table, day(d))),
                d >= first_kept,
                "{table} day {d}: {partitions:?}"
            );
        }
    }
    assert_eq!(
        row_counts(pool).await,
        vec![33 - 10, 33 - 22, 33 - 10, 11 * 2]
    );

    // Exactly the calls whose content is kept are found by their words.
    let kept = store
        .search(&SearchFilter {
            text: Some("invoices".into()),
            limit: 100,
            ..SearchFilter::between(datetime!(2001-01-01 00:00:00 UTC), day(9))
        })
        .await
        .unwrap();
    let mut kept: Vec<String> = kept.items.into_iter().map(|c| c.correlation_id).collect();
    kept.sort();
    assert_eq!(
        kept,
        [
            "d5-1", "d5-2", "d5-3", "d6-0", "d6-1", "d6-2", "d6-3", "d7-0", "d7-1", "d7-2", "d7-3"
        ]
    );

    // Metadata older than its window is gone, at the exact edge too.
    for gone in ["d0-0", "d1-3", "d2-0", "long-ago"] {
        assert!(store.call(gone).await.unwrap().is_none(), "{gone}");
    }
    // Metadata kept without content: at the metadata cutoff itself, and up to the content cutoff.
    for metadata_only in ["d2-1", "d4-3", "d5-0"] {
        let call = store
            .call(metadata_only)
            .await
            .unwrap()
            .expect(metadata_only);
        assert_eq!(call.prompt_tokens, Some(11), "{metadata_only}");
        assert_eq!(call.summary.total_tokens, Some(16), "{metadata_only}");
        assert_eq!(
            (
                call.backend_request_body,
                call.backend_response_body,
                call.request_messages,
                call.response_messages
            ),
            (None, None, None, None),
            "{metadata_only}"
        );
    }
    // Content kept inside its window, from the content cutoff itself.
    for whole in ["d5-1", "d6-0", "d7-3"] {
        let call = store.call(whole).await.unwrap().expect(whole);
        assert!(
            call.backend_request_body.is_some()
                && call.backend_response_body.is_some()
                && call.request_messages.is_some()
                && call.response_messages.is_some(),
            "{whole}"
        );
    }

    // A second run finds nothing more.
    let again = store
        .enforce_retention(content_before, metadata_before, 3)
        .await
        .unwrap();
    assert_eq!(
        (
            again.content_removed,
            again.message_pieces_removed,
            again.metadata_removed,
            again.partitions_dropped
        ),
        (0, 0, 0, 0),
        "{again:?}"
    );
}

#[tokio::test]
async fn postgres_a_replayed_batch_over_several_days_is_stored_once() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    store
        .create_partitions(day(0).date(), day(2).date())
        .await
        .unwrap();
    let mut batch: Vec<AuditRecord> = (0..3)
        .flat_map(|d| {
            (0..5).map(move |i| record_at(&format!("d{d}-{i}"), day(d) + Duration::hours(i)))
        })
        .collect();
    batch.push(record_at("future", datetime!(2099-06-01 10:00:00 UTC)));
    assert_eq!(store.write(&batch).await.unwrap(), 16);
    let counts = row_counts(pool).await;
    assert_eq!(counts[0], 16);
    let blocks = block_ids(pool).await;
    assert!(!blocks.is_empty());
    assert_eq!(store.write(&batch).await.unwrap(), 0);
    assert_eq!(store.write(&batch[3..9]).await.unwrap(), 0);
    assert_eq!(row_counts(pool).await, counts);
    // The replays' calls keep their blocks, and the blocks made for them again are gone.
    assert_eq!(block_ids(pool).await, blocks);
    let usage = store
        .usage(&UsageQuery {
            granularity: Granularity::Hour,
            dimension: Dimension::All,
            from: day(0),
            to: datetime!(2100-01-01 00:00:00 UTC),
            only: None,
        })
        .await
        .unwrap();
    assert_eq!(usage.iter().map(|p| p.requests).sum::<i64>(), 16);
}

#[tokio::test]
async fn postgres_unexpected_times_land_in_default_and_move_to_their_day() {
    let database = postgres_database().await;
    let url = database.url.clone();
    let test = TestStore {
        store: SqlStore::open(&url).await.unwrap(),
        _dir: None,
        _database: Some(database),
    };
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    let future = datetime!(2099-06-01 10:00:00 UTC);
    // Ten days ago: outside the days the store prepares (yesterday to three days ahead).
    let late = OffsetDateTime::now_utc() - Duration::days(10);
    let batch = vec![record_at("future", future), record_at("late", late)];
    assert_eq!(store.write(&batch).await.unwrap(), 2);
    for table in DAILY_TABLES {
        for id in ["future", "late"] {
            assert_eq!(
                partitions_holding(pool, table, id).await,
                vec![format!("{table}_default")],
                "{table} {id}"
            );
        }
    }
    let stored = store.call("future").await.unwrap().expect("in DEFAULT");
    assert!(stored.request_messages.is_some() && stored.backend_response_body.is_some());
    assert_eq!(
        store.write(&batch).await.unwrap(),
        0,
        "a replay into DEFAULT"
    );

    // The day's partition is created with the rows DEFAULT held for it.
    assert_eq!(
        store
            .create_partitions(future.date(), future.date())
            .await
            .unwrap(),
        5,
        "a partition of each per-call table and of the blocks"
    );
    for table in DAILY_TABLES {
        assert_eq!(
            partitions_holding(pool, table, "future").await,
            vec![partition_name(table, future)],
            "{table}"
        );
    }
    let moved = store
        .call("future")
        .await
        .unwrap()
        .expect("moved, not lost");
    assert_eq!(moved, stored);
    assert_eq!(
        store.write(&batch).await.unwrap(),
        0,
        "a replay after the move"
    );

    // The hourly maintenance does the same for recent days that DEFAULT holds rows for.
    assert!(store.maintain_partitions().await.unwrap() >= 4);
    for table in DAILY_TABLES {
        assert_eq!(
            partitions_holding(pool, table, "late").await,
            vec![partition_name(table, late)],
            "{table}"
        );
    }
    assert_eq!(row_counts(pool).await[0], 2);

    // Several gateways preparing the same days at once: each partition is made exactly once.
    let others = [
        SqlStore::open(&url).await.unwrap(),
        SqlStore::open(&url).await.unwrap(),
        SqlStore::open(&url).await.unwrap(),
    ];
    let (first, last) = (day(100).date(), day(109).date());
    let created = futures::future::try_join_all(
        others
            .iter()
            .map(|other| other.create_partitions(first, last)),
    )
    .await
    .unwrap();
    // The four per-call tables and the word index's blocks, ten days each.
    assert_eq!(created.iter().sum::<u64>(), 5 * 10, "{created:?}");
    for other in &others {
        other.close().await;
    }
}

#[tokio::test]
async fn postgres_a_reopened_store_keeps_its_rows() {
    let database = postgres_database().await;
    let url = database.url.clone();
    let test = TestStore {
        store: SqlStore::open(&url).await.unwrap(),
        _dir: None,
        _database: Some(database),
    };
    let batch: Vec<AuditRecord> = (0..6)
        .map(|i| record_at(&format!("r{i}"), day(i) + Duration::hours(9)))
        .collect();
    test.store
        .create_partitions(day(0).date(), day(2).date())
        .await
        .unwrap();
    assert_eq!(test.store.write(&batch).await.unwrap(), 6);
    let before = row_counts(test.store.postgres_pool().unwrap()).await;
    test.store.close().await;

    let reopened = SqlStore::open(&url).await.unwrap();
    let pool = reopened.postgres_pool().unwrap();
    assert_eq!(row_counts(pool).await, before);
    for i in 0..6 {
        let call = reopened
            .call(&format!("r{i}"))
            .await
            .unwrap()
            .expect("kept");
        assert!(call.request_messages.is_some());
    }
    assert_eq!(reopened.write(&batch).await.unwrap(), 0);
    let page = reopened
        .search(&SearchFilter {
            text: Some("invoices".into()),
            limit: 100,
            ..SearchFilter::between(day(0), day(6))
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 6);
    reopened.close().await;
}

#[tokio::test]
async fn postgres_a_store_at_migration_3_keeps_its_rows_in_day_and_month_partitions() {
    let database = postgres_database().await;
    let url = database.url.clone();
    let _drop = TestStore {
        store: SqlStore::connect(&url).await.unwrap(),
        _dir: None,
        _database: Some(database),
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let mut migrator = sqlx::migrate::Migrator::new(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../migrations/audit/postgres"
    )))
    .await
    .unwrap();
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= 3)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    migrator.run(&pool).await.unwrap();
    // Calls every 11 hours over the last three days, and two more than a year ago, as the store
    // wrote them before 0004. Times are relative to now: 0004 gives days from the previous month
    // on a partition each and older months one partition per month.
    let start = OffsetDateTime::now_utc().date().midnight().assume_utc() - Duration::days(3)
        + Duration::hours(1);
    let times: Vec<OffsetDateTime> = (0..6)
        .map(|i| start + Duration::hours(11 * i))
        .chain([start - Duration::days(400), start - Duration::days(399)])
        .collect();
    sqlx::query(
        r#"INSERT INTO "GatehouseGatewayLogs" ("TimeGenerated", "CorrelationId", "OperationName", "Category", "GatewayId", "OperationId", "CallerIpAddress", "CallerIpKey", "PeerIpAddress", "Method", "Url", "ClientProtocol", "ResponseCode", "IsRequestSuccess", "RequestSize", "ResponseSize", "TotalTime", "BackendTime", "Groups", "IsStreamCompletion", "PromptTokens", "CompletionTokens", "TotalTokens", "TokensEstimated", "Attempts", "AttemptCount", "RequestBodyTruncated", "ResponseBodyTruncated", "ClientAborted")
           SELECT ($1::timestamptz[])[i + 1], 'old-' || i, 'Microsoft.ApiManagement/GatewayLogs', 'GatewayLogs', 'gw-1', 'chatcompletions_create', '198.51.100.7', 'k', '10.0.0.1', 'POST', '/', 'HTTP/1.1', 200, true, 1, 1, 100, 90, '[]', false, 10, 5, 15, false, '[]', 1, false, false, false
           FROM generate_series(0, 7) i"#,
    )
    .bind(&times)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO "GatehouseCallContent" SELECT "CorrelationId", "TimeGenerated", '{"messages":[]}', '{"object":"chat.completion"}', to_tsvector('simple', 'ledger ' || "CorrelationId") FROM "GatehouseGatewayLogs""#,
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO "ApiManagementGatewayLlmLog" SELECT "TimeGenerated", "CorrelationId", 'Microsoft.ApiManagement/GatewayLlmLogs', 'gpt-4o', 'gpt-4o', '2024-10-21', false, 10, 5, 15, s, CASE WHEN s > 0 THEN 'prompt ' || s END, CASE WHEN s > 0 THEN 'completion ' || s END FROM "GatehouseGatewayLogs", generate_series(0, 2) s"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let max_record_id: i64 =
        sqlx::query_scalar(r#"SELECT max("RecordId") FROM "GatehouseGatewayLogs""#)
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;

    let store = SqlStore::open(&url).await.unwrap();
    let pool = store.postgres_pool().unwrap();
    assert_eq!(row_counts(pool).await, vec![8, 8, 8, 16]);
    for (i, at) in times.iter().enumerate() {
        let id = format!("old-{i}");
        for table in DAILY_TABLES {
            let expected = if i < 6 {
                partition_name(table, *at)
            } else {
                format!("{table}_p{:04}{:02}", at.year(), u8::from(at.month()))
            };
            assert_eq!(
                partitions_holding(pool, table, &id).await,
                vec![expected],
                "{table} {id}"
            );
        }
    }
    let old = store.call("old-4").await.unwrap().expect("migrated");
    assert_eq!(old.request_messages.as_deref(), Some("prompt 1prompt 2"));
    assert_eq!(
        old.response_messages.as_deref(),
        Some("completion 1completion 2")
    );
    assert_eq!(
        old.backend_response_body.as_deref(),
        Some(r#"{"object":"chat.completion"}"#)
    );
    let found = store
        .search(&SearchFilter {
            text: Some("ledger".into()),
            limit: 100,
            ..SearchFilter::between(start - Duration::days(500), start + Duration::days(3))
        })
        .await
        .unwrap();
    assert_eq!(found.items.len(), 8);
    // New calls continue the same RecordId sequence.
    store
        .write(&[record_at("new", start + Duration::hours(70))])
        .await
        .unwrap();
    let new_id: i64 = sqlx::query_scalar(
        r#"SELECT "RecordId" FROM "GatehouseGatewayLogs" WHERE "CorrelationId" = 'new'"#,
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(new_id > max_record_id);
    // The month partitions go whole once the month is past the cutoff.
    let cutoff = start - Duration::days(100);
    let report = store.enforce_retention(cutoff, cutoff, 500).await.unwrap();
    assert_eq!(
        (report.metadata_removed, report.content_removed),
        (2, 2),
        "{report:?}"
    );
    assert!(report.partitions_dropped >= 4, "{report:?}");
    assert!(store.call("old-6").await.unwrap().is_none());
    assert_eq!(row_counts(pool).await, vec![7, 7, 7, 14]);
    store.close().await;
}

#[tokio::test]
async fn postgres_chains_verify_next_to_a_dropped_day() {
    let test = postgres().await;
    let store = &test.store;
    let pool = store.postgres_pool().unwrap();
    store
        .create_partitions(day(0).date(), day(2).date())
        .await
        .unwrap();
    // One chain a day (gateway gw-1), five calls each.
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch: Vec<AuditRecord> = (0..3)
        .flat_map(|d| {
            (0..5)
                .map(move |i| record_at(&format!("d{d}-{i}"), day(d) + Duration::hours(2 * i + 1)))
        })
        .collect();
    for record in &mut batch {
        chainer.link(record);
    }
    store.write(&batch).await.unwrap();
    let all = store.verify_chains(day(0), day(3)).await.unwrap();
    assert!(all.is_intact(), "{all:?}");
    assert_eq!(all.chains.len(), 3);

    // Day 0 expires whole: its partition is dropped and its chain is gone with it; the chains of
    // the days inside the window still verify, on their own and in a range that reaches back.
    let report = store.enforce_retention(day(1), day(1), 100).await.unwrap();
    // Day 0 of the four per-call tables and of the word index's blocks.
    assert_eq!((report.metadata_removed, report.partitions_dropped), (5, 5));
    let kept = store.verify_chains(day(0), day(3)).await.unwrap();
    assert!(kept.is_intact(), "{kept:?}");
    assert_eq!(kept.chains.len(), 2);
    assert_eq!(kept.chains.iter().map(|c| c.records).sum::<u64>(), 10);

    // A record removed inside the window is named by the one after the gap.
    sqlx::query(r#"DELETE FROM "GatehouseGatewayLogs" WHERE "CorrelationId" = 'd2-2'"#)
        .execute(pool)
        .await
        .unwrap();
    let report = store.verify_chains(day(2), day(3)).await.unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("d2-3", "removed"),
        "{report:?}"
    );

    // The day that holds the metadata cutoff loses its first calls: its chain then starts with a
    // gap, reported at its first kept record (docs/audit.md, "Retention").
    store
        .enforce_retention(
            day(1) + Duration::hours(4),
            day(1) + Duration::hours(4),
            100,
        )
        .await
        .unwrap();
    let report = store.verify_chains(day(1), day(2)).await.unwrap();
    let (_, broken) = report.first_break().expect("a break");
    assert_eq!(
        (
            broken.correlation_id.as_str(),
            broken.reason.to_string().as_str()
        ),
        ("d1-2", "removed"),
        "{report:?}"
    );
}

/// Gives every stored call the full-text entry an earlier version made: the JSON of its messages,
/// split by SQLite's tokenizer or PostgreSQL's parser, so that the first word of a second line is
/// indexed glued to the `n` of `\n`.
async fn index_as_before(store: &SqlStore, calls: &[AuditRecord]) {
    let json = |call: &AuditRecord| {
        format!(
            "{} {}",
            call.request_messages.as_deref().unwrap_or_default(),
            call.response_messages.as_deref().unwrap_or_default()
        )
    };
    if let Some(pool) = store.sqlite_pool() {
        for call in calls {
            let id: i64 = sqlx::query_scalar(
                "SELECT RecordId FROM GatehouseGatewayLogs WHERE CorrelationId = ?",
            )
            .bind(&call.correlation_id)
            .fetch_one(pool)
            .await
            .unwrap();
            sqlx::query("DELETE FROM search.GatehouseContentSearch WHERE rowid = ?")
                .bind(id)
                .execute(pool)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO search.GatehouseContentSearch (rowid, Prompt, Completion) VALUES (?, ?, '')",
            )
            .bind(id)
            .bind(json(call))
            .execute(pool)
            .await
            .unwrap();
        }
    } else {
        let pool = store.postgres_pool().unwrap();
        for call in calls {
            vector_as_before(pool, &call.correlation_id, &json(call)).await;
        }
    }
}

/// Calls whose full-text entries an earlier version made are searched as new ones once their
/// time range is indexed again from the LLM log; calls outside the range keep their entries, and
/// no call is indexed twice.
async fn reindexing_a_range_rebuilds_what_an_earlier_version_indexed(store: &SqlStore) {
    let mut calls = records(40);
    calls[5] = record_saying(5, "alpha\nbravo");
    calls[30] = record_saying(30, "alpha\nbravo");
    assert_eq!(store.write(&calls).await.unwrap(), 40);
    store.settle_search_index().await.unwrap();
    assert_eq!(found(store, "bravo").await, ["call-00005", "call-00030"]);
    let blocks_of_the_write = match store.postgres_pool() {
        Some(pool) => sqlx::query_scalar(r#"SELECT "BlockId" FROM "GatehouseSearchBlocks""#)
            .fetch_all(pool)
            .await
            .unwrap(),
        None => Vec::<String>::new(),
    };

    index_as_before(store, &calls).await;
    assert!(found(store, "bravo").await.is_empty());
    assert_eq!(found(store, "nbravo").await, ["call-00005", "call-00030"]);

    // Calls 0 to 19: T0 to T0 + 133 s, seven seconds apart.
    let first_twenty = store
        .reindex_search(T0, T0 + Duration::seconds(140))
        .await
        .unwrap();
    assert_eq!(first_twenty, 20);
    assert_eq!(found(store, "bravo").await, ["call-00005"]);
    assert_eq!(
        found(store, "nbravo").await,
        ["call-00030"],
        "outside the range"
    );

    let all = store
        .reindex_search(T0 - Duration::hours(1), T0 + Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(all, 40);
    assert_eq!(found(store, "bravo").await, ["call-00005", "call-00030"]);
    assert!(found(store, "nbravo").await.is_empty());
    if let Some(pool) = store.postgres_pool() {
        // The blocks the calls had (one each, as an earlier version left them, then the first
        // reindex's) are gone with the last call naming them. Left: the 40 calls' one new
        // block, and the blocks of the first write, which `index_as_before` left unnamed.
        let mut blocks: Vec<String> =
            sqlx::query_scalar(r#"SELECT "BlockId" FROM "GatehouseSearchBlocks""#)
                .fetch_all(pool)
                .await
                .unwrap();
        let named: Vec<String> =
            sqlx::query_scalar(r#"SELECT DISTINCT "SearchBlock" FROM "GatehouseCallContent""#)
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(named.len(), 1, "{named:?}");
        let mut expected = blocks_of_the_write;
        expected.extend(named);
        expected.sort();
        blocks.sort();
        assert_eq!(blocks, expected);
    }
    // Each call once: an entry left beside its new one would be found twice, or make the
    // index's insert fail.
    let invoices = found(store, "invoices").await;
    assert_eq!(invoices.len(), 38);
    assert_eq!(
        invoices
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        38
    );
    assert_eq!(
        store
            .reindex_search(T0 + Duration::hours(1), T0 + Duration::hours(2))
            .await
            .unwrap(),
        0,
        "an empty range"
    );
}
