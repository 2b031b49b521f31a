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
