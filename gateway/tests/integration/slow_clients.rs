//! Clients that send slowly or not at all (slowloris): their connections are closed, or their
//! call answered 408, and nothing reaches a backend.

use std::time::Duration;

use gatehouse_gateway::ClientTimeouts;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::harness::*;

/// A gateway that gives clients one second for a request's head and one second of silence in a
/// body, in front of one simulator.
async fn impatient_gateway() -> (gatehouse_simulator::RunningSimulator, TestGateway) {
    let sim = simulator("patient").await;
    let config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    let timeouts = ClientTimeouts {
        request_head: Duration::from_secs(1),
        request_body: Duration::from_secs(1),
    };
    (
        sim,
        TestGateway::start_with_client_timeouts(config, timeouts).await,
    )
}

async fn connect(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.listening.addr).await.unwrap()
}

/// Reads until the gateway closes the connection; panics if it is still open after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(within, async {
        let mut buffer = [0_u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .expect("the gateway closed the connection");
    received
}

#[tokio::test]
async fn a_request_head_that_does_not_arrive_in_time_closes_the_connection() {
    let (sim, gw) = impatient_gateway().await;
    let mut stream = connect(&gw).await;
    // The request line and one header, then nothing: the head never ends.
    stream
        .write_all(
            format!(
                "POST {} HTTP/1.1\r\nHost: gateway\r\napi-key: {KEY}\r\n",
                chat_path("gpt-4o")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    assert!(
        received.is_empty() || String::from_utf8_lossy(&received).starts_with("HTTP/1.1 408"),
        "nothing or a 408, got {:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(sim.hits(), 0, "no backend saw the call");

    // A connection that never sends a byte is closed as well.
    let mut silent = connect(&gw).await;
    read_until_closed(&mut silent, Duration::from_secs(20)).await;

    // The gateway goes on serving.
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn a_kept_alive_connection_idle_past_the_head_timeout_is_closed() {
    let (_sim, gw) = impatient_gateway().await;
    let mut stream = connect(&gw).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0_u8; 4096];
    let n = stream.read(&mut buffer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"),
        "the first call is answered and the connection kept"
    );
    // No next request: the gateway closes the connection once the head timeout has passed.
    let rest = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    assert!(
        rest.is_empty(),
        "nothing more is sent: {:?}",
        String::from_utf8_lossy(&rest)
    );
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_is_answered_408_and_reaches_no_backend() {
    let (sim, gw) = impatient_gateway().await;
    let mut stream = connect(&gw).await;
    // The head promises 100 bytes; 10 come, then nothing.
    stream
        .write_all(
            format!(
                "POST {} HTTP/1.1\r\nHost: gateway\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"messages",
                chat_path("gpt-4o")
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 408"), "408, got {text:?}");
    let body = &text[text.find("\r\n\r\n").expect("a head and a body") + 4..];
    let body: Value = serde_json::from_str(body).expect("an Azure-shaped JSON body");
    assert_eq!(body["error"]["code"], "408");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("did not arrive in time") && message.contains("1 s"),
        "{message}"
    );
    assert!(!text.contains(KEY), "the key is not echoed");
    assert_eq!(sim.hits(), 0, "no backend saw the call");

    // A body that arrives in pieces, each within the timeout, is served.
    let mut stream = connect(&gw).await;
    let payload = serde_json::to_vec(&chat(None, false)).unwrap();
    let (first, second) = payload.split_at(payload.len() / 2);
    stream
        .write_all(
            format!(
                "POST {} HTTP/1.1\r\nHost: gateway\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                chat_path("gpt-4o"),
                payload.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    stream.write_all(second).await.unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    assert!(
        String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(sim.hits(), 1);
}
