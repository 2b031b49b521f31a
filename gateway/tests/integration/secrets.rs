//! No key — the client's or the backend's — reaches a record, a log line, a metric or an error.

use gatehouse_simulator::{Fault, RetryHint};
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "current_thread")]
async fn keys_never_reach_records_logs_metrics_or_errors() {
    let (logs, _guard) = CapturedLogs::install(tracing::Level::TRACE);

    let (_key_file, key_ref) = backend_key_file();
    let first = simulator("s-first").await;
    let second = simulator("s-second").await;
    first.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(3),
        times: None,
    });
    let mut a = member("first", &first.url(), 1);
    a["credential"] = json!({"type": "api_key", "secret": key_ref});
    let mut b = member("second", &second.url(), 2);
    b["credential"] = json!({"type": "api_key", "secret": key_ref});
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [a, b]}]),
    ))
    .await;

    let mut bodies = Vec::new();
    let ok = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    bodies.push(ok.text().await.unwrap());
    let by_query = gw
        .raw(
            reqwest::Method::POST,
            &format!("{}&subscription-key={KEY}", chat_path("gpt-4o")),
        )
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    bodies.push(by_query.text().await.unwrap());
    let bearer = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .bearer_auth(KEY)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    bodies.push(bearer.text().await.unwrap());
    let wrong = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("api-key", "ghk_WrongKeyThatMustNotBeEchoed")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    bodies.push(wrong.text().await.unwrap());
    let admin = gw
        .raw(reqwest::Method::PUT, "/_gatehouse/config")
        .bearer_auth("guess-admin-token")
        .body("{}")
        .send()
        .await
        .unwrap();
    bodies.push(admin.text().await.unwrap());
    let metrics = gw.metrics().await;
    assert!(metrics.contains("gatehouse_requests_total"), "{metrics}");

    let records = gw.records(4).await;
    let records = serde_json::to_string(&records).unwrap();
    let logs = logs.text();
    assert!(!logs.is_empty(), "the test must have captured log lines");
    for secret in [
        KEY,
        BACKEND_KEY,
        "ghk_WrongKeyThatMustNotBeEchoed",
        ADMIN_TOKEN,
        "guess-admin-token",
    ] {
        assert!(!records.contains(secret), "secret in an audit record");
        assert!(!logs.contains(secret), "secret in a log line");
        assert!(!metrics.contains(secret), "secret in metrics");
        for body in &bodies {
            assert!(!body.contains(secret), "secret in a response body: {body}");
        }
    }
    // The backends did get the backend key, and only it.
    assert_eq!(second.requests()[0].header("api-key"), Some(BACKEND_KEY));
}

/// Credentials a client's body carries for a service the model calls — an "On your data"
/// source's search key and connection string, a Responses MCP tool's headers and OAuth token —
/// reach the member as sent, and never the record: `BackendRequestBody` holds a marker in their
/// place and everything else of the body.
#[tokio::test]
async fn credentials_in_a_body_reach_the_member_and_not_the_record() {
    const SECRETS: [&str; 4] = [
        "search-admin-key-1f2e",
        "AccountKey=cosmos-key-9a8b",
        "Bearer mcp-token-77c1",
        "oauth-token-5d4c",
    ];
    let sim = simulator("credentials").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("m", &sim.url(), 1)]}]),
    ))
    .await;
    let mut on_your_data = chat(None, false);
    on_your_data["data_sources"] = json!([
        {"type": "azure_search", "parameters": {
            "endpoint": "https://search.example", "index_name": "policies",
            "authentication": {"type": "api_key", "key": SECRETS[0]}}},
        {"type": "azure_cosmos_db", "parameters": {
            "authentication": {"type": "connection_string", "connection_string": SECRETS[1]}}}
    ]);
    let answered = gw
        .post(&chat_path("gpt-4o"))
        .json(&on_your_data)
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    // Escaped, as a client may write it: still found.
    let mcp = format!(
        r#"{{"model":"gpt-4o","input":"list my repositories","tools":[{{"type":"m\u0063p","server_label":"github","server_url":"https://mcp.example/sse","headers":{{"Authorization":"{}"}},"authorization":"{}"}}]}}"#,
        SECRETS[2], SECRETS[3]
    );
    // A body giving `tools` twice: the tree keeps the last (no credential), the bytes both.
    let twice = r#"{"model":"gpt-4o","input":"twice","tools":[{"type":"mcp","server_label":"a","server_url":"https://mcp.example/sse","headers":{"Authorization":"Bearer dup-token-3e2f"}}],"tools":[]}"#;
    for body in [mcp.as_str(), twice] {
        let answered = gw
            .post("/openai/v1/responses")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(answered.status(), 200, "{}", answered.text().await.unwrap());
    }

    let seen: String = sim
        .requests()
        .iter()
        .map(|request| String::from_utf8_lossy(&request.body).into_owned())
        .collect();
    let records = gw.records(3).await;
    let stored = serde_json::to_string(&records).unwrap();
    for secret in SECRETS.iter().chain(&["Bearer dup-token-3e2f"]) {
        assert!(seen.contains(secret), "the member got {secret}");
        assert!(!stored.contains(secret), "{secret} in a record: {stored}");
    }
    let chat_body: serde_json::Value =
        serde_json::from_str(records[0].backend_request_body.as_deref().unwrap()).unwrap();
    let search = &chat_body["data_sources"][0]["parameters"];
    assert_eq!(search["index_name"], "policies");
    assert_eq!(search["authentication"]["type"], "api_key");
    assert_eq!(search["authentication"]["key"], "[redacted by Gatehouse]");
    let responses_body: serde_json::Value =
        serde_json::from_str(records[1].backend_request_body.as_deref().unwrap()).unwrap();
    assert_eq!(responses_body["input"], "list my repositories");
    assert_eq!(
        responses_body["tools"][0]["server_url"],
        "https://mcp.example/sse"
    );
}
