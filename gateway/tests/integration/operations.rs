//! Operations: health, structured logs with the request id, caller address, backpressure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use crate::harness::*;

/// Logs written to a file (or a pipe to a collector) are plain text: no terminal colour codes.
#[tokio::test]
async fn text_logs_to_a_file_carry_no_colour_codes() {
    let gateway = GatewayProcess::start("plain-log", &snapshot(1, json!([])), json!({})).await;
    let mut log = String::new();
    for _ in 0..200 {
        log = gateway.log();
        if log.contains("gatehouse gateway listening") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    gateway.stop().await;
    assert!(log.contains("gatehouse gateway listening"), "{log}");
    assert!(log.contains(" version=1"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log:?}");
}

#[tokio::test]
async fn health_and_readiness_need_no_key() {
    let sim = simulator("ops").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    assert_eq!(
        gw.raw(reqwest::Method::GET, "/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.raw(reqwest::Method::GET, "/readyz")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let empty = TestGateway::start(snapshot(1, json!([]))).await;
    assert_eq!(
        empty
            .raw(reqwest::Method::GET, "/readyz")
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
}

/// The operational and admin paths are served by their routes — the backend states with the
/// admin token, a wrong method refused as such — and every other path, however close, is a
/// model call: the call pipeline answers it in Azure's shape and asks for a key.
#[tokio::test]
async fn operational_paths_have_their_routes_and_every_other_path_is_a_call() {
    let sim = simulator("routes").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    assert!(gw.metrics().await.contains("# TYPE gatehouse_"));
    assert_eq!(
        gw.raw(reqwest::Method::POST, "/healthz")
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    let backends: serde_json::Value = gw
        .raw(reqwest::Method::GET, "/_gatehouse/backends")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(backends["members"][0]["member"], "a", "{backends}");
    let without_token = gw
        .raw(reqwest::Method::GET, "/_gatehouse/backends")
        .send()
        .await
        .unwrap();
    azure_error(without_token, 401).await;
    for path in [
        "/healthz/",
        "/metrics/x",
        "/_gatehouse/backendsx",
        "/openai/models",
    ] {
        let answer = gw.raw(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(answer.status(), 401, "{path}");
        azure_error(answer, 401).await;
    }
    assert_eq!(sim.hits(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn every_call_logs_one_structured_line_with_its_request_id_and_caller() {
    let (logs, _guard) = CapturedLogs::install(tracing::Level::INFO);

    let sim = simulator("logs").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("x-request-id", "req-log-42")
        // The harness trusts 127.0.0.0/8, so the forwarded client is believed.
        .header("x-forwarded-for", "198.51.100.7")
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-log-42");
    let correlation_id = response.headers()["x-gatehouse-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.text().await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.caller_ip_address, "198.51.100.7");
    assert_eq!(record.peer_ip_address, "127.0.0.1");
    // The record's id is the gateway's own (a time-ordered UUID), named in the response.
    assert_eq!(record.correlation_id, correlation_id);
    assert_eq!(
        uuid::Uuid::parse_str(&record.correlation_id)
            .unwrap()
            .get_version_num(),
        7
    );

    let line = logs.line("call finished");
    assert_eq!(
        line["span"]["request_id"],
        correlation_id.as_str(),
        "{line}"
    );
    assert_eq!(line["span"]["client_request_id"], "req-log-42", "{line}");
    assert_eq!(line["fields"]["status"], 200);
    assert_eq!(line["fields"]["operation"], "chatcompletions_create");
    assert_eq!(line["fields"]["caller_ip"], "198.51.100.7");
}

/// A backend that streams `total` bytes as fast as it is allowed to, counting what it produced.
async fn firehose(total_chunks: usize, produced: Arc<AtomicUsize>) -> String {
    const CHUNK: usize = 64 * 1024;
    let app = axum::Router::new().fallback(move || {
        let produced = Arc::clone(&produced);
        async move {
            let stream = futures::stream::iter(0..total_chunks).map(move |_| {
                produced.fetch_add(1, Ordering::Relaxed);
                Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; CHUNK]))
            });
            axum::response::Response::builder()
                .header("content-type", "application/octet-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    });
    serve_stub(app).await
}

#[tokio::test]
async fn a_slow_client_slows_the_backend_instead_of_filling_memory() {
    const TOTAL_CHUNKS: usize = 4096; // 256 MiB
    let produced = Arc::new(AtomicUsize::new(0));
    let url = firehose(TOTAL_CHUNKS, Arc::clone(&produced)).await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["tts"], "members": [member("hose", &url, 1)]}]),
    );
    config.capture.max_response_body_bytes = 0;
    let gw = TestGateway::start(config).await;
    let response = gw
        .post("/openai/deployments/tts/audio/speech?api-version=2024-10-21")
        .json(&json!({"input": "x", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The client reads nothing for a while: only socket buffers and the relay's bounded channel fill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let buffered_mib = produced.load(Ordering::Relaxed) * 64 / 1024;
    assert!(
        buffered_mib < 48,
        "the gateway read {buffered_mib} MiB ahead of a client that read nothing"
    );
    // Then the client reads it all, intact.
    let mut received = 0usize;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, TOTAL_CHUNKS * 64 * 1024);
    eprintln!("read ahead of a stalled client: {buffered_mib} MiB of 256 MiB");
}

#[tokio::test]
async fn invented_deployment_names_do_not_become_metric_labels() {
    let sim = simulator("labels").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "named", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]},
            {"id": "rest", "deployments": ["*"], "members": [member("b", &sim.url(), 1)]},
        ]),
    ))
    .await;
    for name in ["gpt-4o", "made-up-1", "made-up-2"] {
        let response = gw
            .post(&chat_path(name))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    gw.records(3).await;
    let text = gw.metrics().await;
    assert!(text.contains(r#"deployment="gpt-4o""#), "{text}");
    assert!(text.contains(r#"deployment="*""#), "{text}");
    assert!(
        !text.contains("made-up"),
        "a client-chosen name became a label:\n{text}"
    );
}

/// Logs filtered to warnings still name the call a warning is about: the call's span is kept at
/// every level.
#[tokio::test]
async fn a_warning_inside_a_call_names_its_request_id_with_logs_at_warn() {
    let (logs, _guard) = CapturedLogs::install(tracing::Level::WARN);
    // A port nothing listens on, then a member that answers.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let sim = simulator("answers").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"],
                "members": [member("closed", &closed, 1), member("answers", &sim.url(), 2)]}]),
    ))
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("x-request-id", "req-warned-1")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let line = logs.line("backend attempt failed");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["span"]["name"], "call", "{line}");
    assert_eq!(line["span"]["client_request_id"], "req-warned-1", "{line}");
    assert!(line["span"]["request_id"].is_string(), "{line}");
}
