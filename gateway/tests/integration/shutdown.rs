//! Shutdown through the real binary: calls still running when the drain ends are recorded.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::harness::{GatewayProcess, KEY, chat, chat_path, member, serve_stub, snapshot};

/// How long the stub backend takes for what the calls wait on: far beyond the drain.
const BACKEND_TAKES: Duration = Duration::from_secs(40);

/// A backend that answers the head of a stream at once, sends one chunk, then nothing for
/// [`BACKEND_TAKES`].
async fn stalling_stream() -> axum::response::Response {
    let first = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Oslo\"}}]}\n\n";
    let chunks = futures::stream::unfold(0, move |step| async move {
        match step {
            0 => Some((Ok::<_, std::io::Error>(Bytes::from(first)), 1)),
            1 => {
                tokio::time::sleep(BACKEND_TAKES).await;
                Some((Ok(Bytes::from("data: [DONE]\n\n")), 2))
            }
            _ => None,
        }
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

/// A backend that takes [`BACKEND_TAKES`] before the head of its answer.
async fn slow_head() -> axum::Json<Value> {
    tokio::time::sleep(BACKEND_TAKES).await;
    axum::Json(json!({"id": "c1", "object": "chat.completion", "choices": []}))
}

/// A backend that creates an object: the head of its answer at once, half of the object, then
/// nothing for [`BACKEND_TAKES`].
async fn stalling_creation() -> axum::response::Response {
    let chunks = futures::stream::unfold(0, move |step| async move {
        match step {
            0 => Some((
                Ok::<_, std::io::Error>(Bytes::from(r#"{"id":"asst_1","object":"assistant","#)),
                1,
            )),
            1 => {
                tokio::time::sleep(BACKEND_TAKES).await;
                Some((Ok(Bytes::from(r#""model":"gpt-4o"}"#)), 2))
            }
            _ => None,
        }
    });
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(chunks))
        .unwrap()
}

/// A gateway on `backend` with a drain of one second and its records in a JSONL file.
async fn gateway_on(name: &str, backend: &str, audit: &std::path::Path) -> GatewayProcess {
    let pools = json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true,
                        "members": [member("a", backend, 1)]}]);
    GatewayProcess::start_with(
        name,
        &snapshot(1, pools),
        json!({"shutdown_drain_seconds": 1, "audit": {"jsonl": audit}}),
    )
    .await
}

/// Sends a call that the backend keeps waiting, shuts the gateway down (SIGTERM) while it runs,
/// and returns the records the gateway wrote with its log, asserting that the shutdown took a few
/// seconds and ended well.
async fn shut_down_during(
    name: &str,
    backend: Router,
    path: &str,
    body: Value,
) -> (Vec<Value>, String) {
    let backend = serve_stub(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gateway = gateway_on(name, &backend, &audit).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = client
        .post(format!("{}{path}", gateway.url))
        .header("api-key", KEY)
        .json(&body)
        .send();
    let call = tokio::spawn(async move {
        let response = call.await?;
        response.bytes().await
    });
    // The call has reached the backend (and, streamed, its first chunk the client).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    let log = gateway.terminate().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the shutdown took {took:?}; its log:\n{log}"
    );
    assert!(
        call.await.unwrap().is_err(),
        "the client's call was cut by the shutdown"
    );
    assert!(!log.contains("records lost"), "{log}");
    let records = std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (records, log)
}

#[tokio::test]
async fn a_call_waiting_for_its_answer_when_the_drain_ends_is_recorded() {
    let backend = Router::new().route("/{*path}", post(slow_head));
    let (records, log) = shut_down_during(
        "shutdown-head",
        backend,
        &chat_path("gpt-4o"),
        chat(None, false),
    )
    .await;
    assert_eq!(records.len(), 1, "{records:?}\n{log}");
    let record = &records[0];
    assert_eq!(record["LastErrorReason"], "gateway_shutdown", "{record}");
    assert_eq!(record["ClientAborted"], true, "{record}");
    assert_eq!(record["BackendId"], "a", "{record}");
}

#[tokio::test]
async fn a_stream_still_running_when_the_drain_ends_is_recorded_with_what_came() {
    let backend = Router::new().route("/{*path}", post(stalling_stream));
    let (records, log) = shut_down_during(
        "shutdown-stream",
        backend,
        &chat_path("gpt-4o"),
        chat(None, true),
    )
    .await;
    assert_eq!(records.len(), 1, "{records:?}\n{log}");
    let record = &records[0];
    assert_eq!(record["LastErrorReason"], "gateway_shutdown", "{record}");
    assert_eq!(record["ClientAborted"], true, "{record}");
    assert_eq!(record["BackendResponseCode"], 200, "{record}");
    assert!(
        record.to_string().contains("Oslo"),
        "the record keeps what the backend sent: {record}"
    );
}

#[tokio::test]
async fn a_creation_whose_answer_is_still_arriving_when_the_drain_ends_is_recorded() {
    let backend = Router::new().route("/{*path}", post(stalling_creation));
    let (records, log) = shut_down_during(
        "shutdown-creation",
        backend,
        "/openai/assistants?api-version=2024-05-01-preview",
        json!({"model": "gpt-4o"}),
    )
    .await;
    assert_eq!(records.len(), 1, "{records:?}\n{log}");
    let record = &records[0];
    assert_eq!(record["LastErrorReason"], "gateway_shutdown", "{record}");
    assert_eq!(record["OperationId"], "create_assistant", "{record}");
    assert_eq!(record["BackendResponseCode"], 200, "{record}");
}

/// Asked to stop, the gateway says at once that it is not ready, and still serves calls for
/// `shutdown_delay_seconds`, so that a load balancer takes it out of rotation before its listener
/// closes.
#[tokio::test]
async fn a_gateway_asked_to_stop_is_not_ready_and_serves_calls_for_its_delay() {
    let backend = crate::harness::simulator("delay").await;
    let pools = json!([{"id": "p", "deployments": ["gpt-4o"],
                        "members": [member("a", &backend.url(), 1)]}]);
    let gateway = GatewayProcess::start_with(
        "shutdown-delay",
        &snapshot(1, pools),
        json!({"shutdown_delay_seconds": 3, "shutdown_drain_seconds": 1}),
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let ready = client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let stopping = Instant::now();
    gateway.send_sigterm();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A new connection each time: a load balancer's probe, a call it still sends.
    let fresh = || {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
    };
    let ready = fresh()
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.text().await.unwrap(), "shutting down");
    let call = fresh()
        .post(format!("{}{}", gateway.url, chat_path("gpt-4o")))
        .header("api-key", KEY)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200, "served during the delay");
    let (exit, log) = gateway.exit_within(Duration::from_secs(15)).await;
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{log}");
    assert!(
        stopping.elapsed() >= Duration::from_secs(3),
        "the delay was kept: {:?}",
        stopping.elapsed()
    );
}

/// A second SIGTERM ends a long drain at once: the stream still running is cut and recorded, and
/// the gateway exits well.
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let backend = serve_stub(Router::new().route("/{*path}", post(stalling_stream))).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let pools = json!([{"id": "p", "deployments": ["gpt-4o"],
                        "members": [member("a", &backend, 1)]}]);
    let gateway = GatewayProcess::start_with(
        "shutdown-hurried",
        &snapshot(1, pools),
        json!({"shutdown_drain_seconds": 60, "audit": {"jsonl": audit}}),
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = client
        .post(format!("{}{}", gateway.url, chat_path("gpt-4o")))
        .header("api-key", KEY)
        .json(&chat(None, true))
        .send();
    let call = tokio::spawn(async move { call.await?.bytes().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopping = Instant::now();
    gateway.send_sigterm();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.send_sigterm();
    let (exit, log) = gateway.exit_within(Duration::from_secs(20)).await;
    let took = stopping.elapsed();
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{log}");
    assert!(took < Duration::from_secs(15), "took {took:?}\n{log}");
    assert!(call.await.unwrap().is_err(), "the stream was cut");
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}\n{log}");
    assert_eq!(records[0]["LastErrorReason"], "gateway_shutdown");
    assert!(records[0].to_string().contains("Oslo"), "{}", records[0]);
}
