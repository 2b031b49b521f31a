//! Batches run the calls their input file names: with access rules, each of those calls must be
//! granted as the same call made directly would be, checked against the file the member holds.

use std::time::Duration;

use gatehouse_schema::OperationId;
use gatehouse_simulator::{Fault, RetryHint};
use serde_json::{Value, json};

use crate::harness::*;

const BATCHES: &str = "/openai/batches?api-version=2024-10-21";

/// A gateway whose subscription may run anything on `gpt-4o-*` (batches included) and only
/// embeddings on `text-embedding-*`.
async fn gateway_with_rules(sim_url: &str) -> TestGateway {
    let mut value = serde_json::to_value(snapshot(
        1,
        json!([{"id": "p", "deployments": ["*"], "serves_resources": true,
                "members": [member("a", sim_url, 1)]}]),
    ))
    .unwrap();
    value["access_rules"] = json!([
        {"id": "batch-on-gpt-4o", "grantee": {"kind": "subscription", "id": "team-a"},
         "deployments": ["gpt-4o-*"], "resources": true},
        {"id": "embeddings", "grantee": {"kind": "subscription", "id": "team-a"},
         "deployments": ["text-embedding-*"], "operations": ["embeddings_create"]}
    ]);
    TestGateway::start(serde_json::from_value(value).unwrap()).await
}

/// One input-file line calling `url` on `model`.
fn line(id: usize, url: &str, model: &str) -> String {
    let body = if url.ends_with("embeddings") {
        json!({"model": model, "input": "hello"})
    } else {
        json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
    };
    let line =
        json!({"custom_id": format!("task-{id}"), "method": "POST", "url": url, "body": body});
    format!("{line}\n")
}

/// Uploads `content` as a batch input file through the gateway; its id.
async fn upload(gw: &TestGateway, content: String) -> String {
    upload_batch_file(&gw.url, content).await
}

async fn create_batch(gw: &TestGateway, body: Value) -> reqwest::Response {
    gw.post(BATCHES).json(&body).send().await.unwrap()
}

fn batch_for(file: &str) -> Value {
    json!({"input_file_id": file, "endpoint": "/chat/completions", "completion_window": "24h"})
}

/// How many batches the simulator was asked to create.
fn batches_created(sim: &gatehouse_simulator::RunningSimulator) -> usize {
    sim.requests()
        .iter()
        .filter(|seen| seen.method == "POST" && seen.path.starts_with("/openai/batches"))
        .count()
}

/// A batch whose every line is granted is created; one line on an ungranted deployment, or on a
/// granted deployment for an ungranted operation, refuses the whole batch with 403 naming that
/// line, and the member never sees the batch.
#[tokio::test]
async fn a_batch_runs_only_calls_the_callers_rules_grant() {
    let sim = simulator("batch-rules").await;
    let gw = gateway_with_rules(&sim.url()).await;

    let granted = upload(
        &gw,
        [
            line(1, "/chat/completions", "gpt-4o-batch"),
            line(2, "/embeddings", "text-embedding-3-small"),
            line(3, "/v1/chat/completions", "GPT-4O-batch"),
        ]
        .concat(),
    )
    .await;
    let response = create_batch(&gw, batch_for(&granted)).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(batches_created(&sim), 1);
    // The gateway read the file back from the member, without the client's key.
    let read = sim
        .requests()
        .into_iter()
        .find(|seen| {
            seen.method == "GET" && seen.path.contains(&format!("/files/{granted}/content"))
        })
        .expect("the input file was read");
    assert!(
        read.headers.iter().all(|(_, value)| !value.contains(KEY)),
        "{:?}",
        read.headers
    );

    for (lines, expected) in [
        (
            vec![
                line(1, "/chat/completions", "gpt-4o-batch"),
                line(2, "/chat/completions", "gpt-4o-batch"),
                line(3, "/chat/completions", "o1-batch"),
            ],
            "Line 3 of the batch's input file uses deployment 'o1-batch' for operation 'chatcompletions_create'",
        ),
        (
            // The embeddings rule grants no chat.
            vec![line(1, "/chat/completions", "text-embedding-3-small")],
            "Line 1 of the batch's input file uses deployment 'text-embedding-3-small' for operation 'chatcompletions_create'",
        ),
    ] {
        let file = upload(&gw, lines.concat()).await;
        let response = create_batch(&gw, batch_for(&file)).await;
        let message = azure_error(response, 403).await;
        assert!(message.contains(expected), "{message}");
    }
    assert_eq!(
        batches_created(&sim),
        1,
        "no refused batch reached the member"
    );
    let records = gw.records(6).await;
    let refused: Vec<_> = records
        .iter()
        .filter(|record| {
            record.operation_id == Some(OperationId::BatchCreate) && record.response_code == 403
        })
        .collect();
    assert_eq!(refused.len(), 2, "each refusal is on record");
}

/// An input file the gateway cannot judge, a batch that names none, and a file the member does
/// not have are refused with a clear error; a member throttling the read is a throttled member.
/// None of them creates a batch.
#[tokio::test]
async fn a_batch_whose_input_cannot_be_checked_is_not_created() {
    let sim = simulator("batch-unreadable").await;
    let gw = gateway_with_rules(&sim.url()).await;

    let garbled = upload(
        &gw,
        format!(
            "{}{{\"url\": \"/chat/completions\"",
            line(1, "/chat/completions", "gpt-4o-batch")
        ),
    )
    .await;
    let message = azure_error(create_batch(&gw, batch_for(&garbled)).await, 400).await;
    assert!(
        message.contains("Line 2 of the batch's input file is not a batch request"),
        "{message}"
    );

    let from_storage = json!({"input_blob": "https://example.blob.core.windows.net/in/batch.jsonl",
                              "endpoint": "/chat/completions", "completion_window": "24h"});
    let message = azure_error(create_batch(&gw, from_storage).await, 400).await;
    assert!(message.contains("names no `input_file_id`"), "{message}");

    // A file the gateway never saw: the member's own 404 comes back.
    let response = create_batch(&gw, batch_for("file-0000000000000000")).await;
    assert_eq!(response.status(), 404);

    // The member throttles the read: the batch, pinned to the member holding its file, is
    // answered 429 with the member's wait.
    let file = upload(&gw, line(1, "/chat/completions", "gpt-4o-batch")).await;
    sim.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterMs(400),
        times: Some(1),
    });
    let response = create_batch(&gw, batch_for(&file)).await;
    assert_eq!(response.status(), 429);
    let retry_after_ms: u64 = response.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=400).contains(&retry_after_ms), "{retry_after_ms}");
    assert_eq!(batches_created(&sim), 0);

    // Once the member is back, the same batch is created.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = create_batch(&gw, batch_for(&file)).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(batches_created(&sim), 1);
}

/// Without access rules everything is allowed: the batch is sent without reading its file.
#[tokio::test]
async fn without_rules_a_batch_is_sent_without_reading_its_file() {
    let sim = simulator("batch-no-rules").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["*"], "serves_resources": true,
                "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let file = upload(&gw, line(1, "/chat/completions", "o1-batch")).await;
    let response = create_batch(&gw, batch_for(&file)).await;
    assert_eq!(response.status(), 200);
    assert!(
        sim.requests()
            .iter()
            .all(|seen| !seen.path.contains("/content")),
        "the file was not read"
    );
}
