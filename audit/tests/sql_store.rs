//! The SQL audit store, the same checks on SQLite and on PostgreSQL (the server on 127.0.0.1:5432;
//! each test makes its own database and drops it).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use futures::StreamExt;
use gatehouse_audit::AuditRecord;
use gatehouse_audit::sql::rollup::{Dimension, Granularity};
use gatehouse_audit::sql::{Cursor, SearchFilter, SqlStore, UsageQuery};
use serde_json::{Value, json};
use sqlx::Row;
use time::{Duration, OffsetDateTime, macros::datetime};

/// A store and what keeps it alive (a temp dir, or a database dropped at the end).
struct TestStore {
    store: SqlStore,
    _dir: Option<tempfile::TempDir>,
    database: Option<String>,
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let Some(database) = self.database.take() else {
            return;
        };
        // Drop the database from a thread with its own runtime: Drop cannot await. `WITH (FORCE)`
        // ends the store's connections, which belong to the test's (now blocked) runtime.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = sqlx::PgPool::connect(&admin_url()).await.unwrap();
                sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
                ))
                .execute(&admin)
                .await
                .unwrap();
            });
        })
        .join()
        .unwrap();
    }
}

fn admin_url() -> String {
    std::env::var("GATEHOUSE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

async fn sqlite() -> TestStore {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    TestStore {
        store: SqlStore::open(&url).await.unwrap(),
        _dir: Some(dir),
        database: None,
    }
}

async fn postgres() -> TestStore {
    let database = format!("gh_audit_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    // The name is generated above from a UUID, never from input.
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = admin_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{database}"))
        .unwrap();
    TestStore {
        store: SqlStore::open(&url).await.unwrap(),
        _dir: None,
        database: Some(database),
    }
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
    usage_comes_from_rollups,
    export_streams_every_match,
    content_expires_before_metadata,
    chains_verify_from_the_store,
);

const T0: OffsetDateTime = datetime!(2026-11-30 10:00:00 UTC);

fn record(i: usize) -> AuditRecord {
    let users = ["alice@contoso.com", "bob@contoso.com"];
    let ips = ["198.51.100.7", "203.0.113.20", "2001:db8::5"];
    let models = ["gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"];
    let prompt =
        json!([{"role": "user", "content": format!("question number {i} about invoices")}])
            .to_string();
    let completion = json!([{"role": "assistant", "content": format!("answer {i}")}]).to_string();
    let response = json!({"object": "chat.completion", "model": models[i % 2], "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {i}")}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 10 + i, "completion_tokens": 5, "total_tokens": 15 + i}});
    serde_json::from_value(json!({
        "TimeGenerated": (T0 + Duration::seconds(i as i64 * 7)).format(&time::format_description::well_known::Rfc3339).unwrap(),
        "CorrelationId": format!("call-{i:05}"), "GatewayId": "gw-1", "OperationId": "chatcompletions_create",
        "CallerIpAddress": ips[i % 3], "PeerIpAddress": "10.0.0.1", "Method": "POST",
        "Url": "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "ClientProtocol": "HTTP/1.1",
        "ResponseCode": if i % 10 == 9 { 429 } else { 200 }, "IsRequestSuccess": i % 10 != 9, "BackendResponseCode": 200,
        "BackendId": "east", "BackendUrl": "https://east.example/openai", "RequestSize": 120, "ResponseSize": 300,
        "TotalTime": 100 + i, "BackendTime": 90, "TimeToFirstByte": 20, "ApimSubscriptionId": if i.is_multiple_of(2) { "team-a" } else { "team-b" },
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
}

async fn a_replayed_batch_is_stored_once(store: &SqlStore) {
    let batch = records(20);
    assert_eq!(store.write(&batch).await.unwrap(), 20);
    assert_eq!(store.write(&batch[5..15]).await.unwrap(), 0);
    let usage = store
        .usage(&UsageQuery {
            granularity: Granularity::Hour,
            dimension: Dimension::All,
            from: T0,
            to: T0 + Duration::days(1),
            only: None,
        })
        .await
        .unwrap();
    assert_eq!(usage.iter().map(|p| p.requests).sum::<i64>(), 20);
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

async fn content_expires_before_metadata(store: &SqlStore) {
    // Calls every 7 s from T0: 0..=413 s.
    store.write(&records(60)).await.unwrap();
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
}

async fn chains_verify_from_the_store(store: &SqlStore) {
    let mut chainer = gatehouse_audit::chain::Chainer::in_memory();
    let mut batch = records(30);
    batch[3].request_messages = Some("ü".repeat(40_000)); // split into LLM pieces, rebuilt on read
    for record in &mut batch {
        chainer.link(record);
    }
    store.write(&batch).await.unwrap();
    let range = (T0, T0 + Duration::hours(1));
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.chains.iter().map(|c| c.records).sum::<u64>(), 30);

    // Content removed by retention does not break the chain.
    store
        .enforce_retention(T0 + Duration::seconds(50), T0, 100)
        .await
        .unwrap();
    let report = store.verify_chains(range.0, range.1).await.unwrap();
    assert!(report.is_intact(), "after content retention: {report:?}");

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
}
