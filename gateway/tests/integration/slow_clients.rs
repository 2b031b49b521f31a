//! Clients that send slowly or not at all (slowloris): their connections are closed, or their
//! call answered 408, and nothing reaches a backend. Clients that stop taking their answer are
//! disconnected (an HTTP/2 client that leaves one stream's window closed has that stream reset).
//! HTTP/2 peers that vanish are found by a ping; live ones keep their connections.

use std::time::Duration;

use gatehouse_gateway::ClientTimeouts;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::harness::*;

/// A gateway that gives clients one second for a request's head, one second of silence in a
/// body and one second to take more of an answer, in front of one simulator.
async fn impatient_gateway() -> (gatehouse_simulator::RunningSimulator, TestGateway) {
    let sim = simulator("patient").await;
    let config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    let timeouts = ClientTimeouts {
        request_head: Duration::from_secs(1),
        request_body: Duration::from_secs(1),
        send: Duration::from_secs(1),
        ..ClientTimeouts::default()
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

    // A connection that never sends a byte is closed as well, and so is one that sends only the
    // start of the HTTP/2 preface (hyper waits for the rest to tell the version, with no timer).
    let mut silent = connect(&gw).await;
    read_until_closed(&mut silent, Duration::from_secs(20)).await;
    for start in [&b"P"[..], b"PRI", b"PRI * HTTP/2.0\r\n\r\nSM\r\n"] {
        let mut stream = connect(&gw).await;
        stream.write_all(start).await.unwrap();
        read_until_closed(&mut stream, Duration::from_secs(20)).await;
    }

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

/// The frame types of a server's HTTP/2 byte stream (RFC 9113 §4.1: a 9-byte header whose
/// bytes 0–2 are the payload length and byte 3 the type).
fn http2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn an_http2_connection_whose_peer_stops_answering_is_pinged_then_closed() {
    const PING: u8 = 0x6;
    let (_sim, gw) = impatient_gateway().await;
    let mut stream = connect(&gw).await;
    // The client preface and an empty SETTINGS frame (RFC 9113 §3.4), then nothing: no request,
    // no answer to anything the gateway sends.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    let types = http2_frame_types(&received);
    assert!(
        types.contains(&PING),
        "the gateway pinged the silent peer before closing: frame types {types:?}"
    );
}

#[tokio::test]
async fn a_live_http2_client_keeps_its_connection_however_long_it_is_idle() {
    let (_sim, gw) = impatient_gateway().await;
    let io = hyper_util::rt::TokioIo::new(connect(&gw).await);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let open = tokio::spawn(connection);
    let health = format!("http://{}/healthz", gw.listening.addr);
    for call in 0..2 {
        let request = http::Request::get(&health)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "call {call} on the one connection");
        // Idle past the ping interval and its answer time: the client answers the ping (hyper does
        // on its own), so the connection stays.
        if call == 0 {
            tokio::time::sleep(Duration::from_millis(3_500)).await;
        }
    }
    assert!(!open.is_finished(), "the connection is still open");
}

/// Asks for an answer of about 16 MB (200 embeddings of 4,096 numbers) on a connection whose
/// receive buffer is small, reads the response head, pauses for `pause`, then reads on until the
/// gateway closes the connection. Returns the body bytes received and the length announced.
async fn large_answer_read_after(gw: &TestGateway, pause: Duration) -> (usize, usize) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.listening.addr).await.unwrap();
    let inputs: Vec<String> = (0..200).map(|i| format!("document {i}")).collect();
    let body = serde_json::to_vec(&json!({"input": inputs, "dimensions": 4096})).unwrap();
    stream
        .write_all(
            format!(
                "POST /openai/deployments/gpt-4o/embeddings?api-version=2024-10-21 HTTP/1.1\r\nHost: gateway\r\napi-key: {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(&body).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the connection closed before the response head");
        received.extend_from_slice(&buffer[..n]);
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let announced: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    tokio::time::sleep(pause).await;
    let rest = read_until_closed(&mut stream, Duration::from_secs(60)).await;
    (received.len() - head_end + rest.len(), announced)
}

#[tokio::test]
async fn a_client_that_stops_taking_its_answer_is_disconnected_and_the_call_recorded() {
    let (sim, gw) = impatient_gateway().await;
    // Paused three times the send timeout: the gateway gives up on the client.
    let (received, announced) = large_answer_read_after(&gw, Duration::from_secs(3)).await;
    assert!(
        announced > 8 << 20,
        "an answer larger than the socket buffers: {announced}"
    );
    assert!(
        received < announced,
        "the gateway closed the connection: {received} of {announced} bytes"
    );
    let records = gw.records(1).await;
    assert!(records[0].client_aborted, "the record says the client went");
    assert_eq!(records[0].backend_response_code, Some(200));
    assert_eq!(sim.hits(), 1);

    // Paused less than the send timeout: the whole answer arrives.
    let (received, announced) = large_answer_read_after(&gw, Duration::from_millis(400)).await;
    assert_eq!(
        received, announced,
        "a pause within the send timeout is not cut"
    );
}

#[tokio::test]
async fn an_http2_client_that_leaves_a_stream_window_closed_has_the_stream_reset_and_the_call_recorded()
 {
    let (logs, _guard) = CapturedLogs::install(tracing::Level::INFO);
    let (sim, gw) = impatient_gateway().await;
    let io = hyper_util::rt::TokioIo::new(connect(&gw).await);
    // A stream window of 64 KiB, opened again only as the client reads the body (hyper's client
    // does so on its own); a connection window large enough for other streams to go on.
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(4 << 20)
            .handshake(io)
            .await
            .unwrap();
    tokio::spawn(connection);
    let inputs: Vec<String> = (0..200).map(|i| format!("document {i}")).collect();
    let body = serde_json::to_vec(&json!({"input": inputs, "dimensions": 4096})).unwrap();
    let request = http::Request::post(format!(
        "http://{}/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21",
        gw.listening.addr
    ))
    .header("api-key", KEY)
    .header("content-type", "application/json")
    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let announced: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        announced > 8 << 20,
        "an answer larger than the window: {announced}"
    );

    // The client takes nothing for three times the send timeout: the gateway gives the stream
    // up, the record is completed from the backend and says the client went.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let records = gw.records(1).await;
    assert!(records[0].client_aborted, "the record says the client went");
    assert_eq!(records[0].backend_response_code, Some(200));
    assert_eq!(sim.hits(), 1);

    // The connection itself is fine: another call on it is answered.
    let health = http::Request::get(format!("http://{}/healthz", gw.listening.addr))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(health).await.unwrap().status(), 200);

    // The stalled answer ends with an error, never as a short answer that looks complete.
    let mut body = response.into_body();
    let mut received = 0;
    let ended = loop {
        match http_body_util::BodyExt::frame(&mut body).await {
            Some(Ok(frame)) => received += frame.data_ref().map_or(0, bytes::Bytes::len),
            Some(Err(error)) => break Err(error),
            None => break Ok(()),
        }
    };
    assert!(
        ended.is_err(),
        "the stream was reset after {received} bytes"
    );
    assert!(received < announced, "{received} of {announced} bytes");

    // The line that says so carries the call's request id, as the call's own lines do.
    let line = logs.line(
        "an HTTP/2 client took nothing of its answer within the send timeout (its stream's window stayed closed); the answer is given up",
    );
    assert_eq!(
        line["span"]["request_id"].as_str(),
        Some(records[0].correlation_id.as_str()),
        "{line}"
    );
}
