//! The Realtime API over WebSocket: the handshake judged as a call, the session relayed both
//! ways, one record for the session, limits on each response, failover at the handshake.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::{SinkExt as _, StreamExt as _};
use gatehouse_schema::OperationId;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use crate::harness::*;

/// A handshake's URI and headers, as a member double saw them.
type Handshake = (String, Vec<(String, String)>);

/// What a Realtime member double saw: each handshake, and the `response.create` events it
/// received.
#[derive(Default)]
struct Seen {
    handshakes: Mutex<Vec<Handshake>>,
    responses_asked: AtomicUsize,
    /// Sessions the member accepted that have ended since (its connection closed).
    sessions_ended: AtomicUsize,
    /// Connections the member took, before their handshakes.
    connections: AtomicUsize,
}

/// Counts a member double's session as ended when dropped.
struct SessionEnd(Arc<Seen>);

impl Drop for SessionEnd {
    fn drop(&mut self) {
        self.0.sessions_ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// A Realtime API member double on 127.0.0.1: it accepts WebSocket handshakes (or refuses each
/// with `refuse`, a status and its `retry-after-ms`) and speaks the Realtime API's events as its
/// reference documents them (OpenAI's Realtime API reference, server events `session.created`,
/// `conversation.item.created`, `response.created`, `response.text.delta`, `response.text.done`,
/// `response.done` with `usage`; Azure's realtime-audio-websockets how-to uses the same events):
/// each `response.create` is answered "Hello there" in two deltas, with 20 input tokens (5 of
/// them cached) and 10 output tokens, and each audio append is taken for a whole spoken turn,
/// which the member answers so by itself, as server voice activity detection does. A
/// `session.update` (`transcription_session.update`) is answered `session.updated`
/// (`transcription_session.updated`) with the session as sent. Text it cannot parse it ignores.
async fn realtime_member(refuse: Option<(u16, &'static str)>) -> (String, Arc<Seen>) {
    slow_realtime_member(std::time::Duration::ZERO, refuse).await
}

/// [`realtime_member`], answering each handshake only after `delay`.
async fn slow_realtime_member(
    delay: std::time::Duration,
    refuse: Option<(u16, &'static str)>,
) -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let state = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = Arc::clone(&state);
            seen.connections.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                // The refusal is tungstenite's own type, as large as it is.
                #[expect(clippy::result_large_err, reason = "tungstenite's callback signature")]
                let callback = |request: &Request, response: Response| {
                    let headers = request
                        .headers()
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.as_str().to_owned(),
                                value.to_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    seen.handshakes
                        .lock()
                        .unwrap()
                        .push((request.uri().to_string(), headers));
                    match refuse {
                        None => Ok(response),
                        Some((status, wait_ms)) => {
                            let mut refusal = ErrorResponse::new(Some(
                                json!({"error": {"code": "429", "message": "Rate limit is exceeded."}})
                                    .to_string(),
                            ));
                            *refusal.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            refusal
                                .headers_mut()
                                .insert("retry-after-ms", wait_ms.parse().unwrap());
                            refusal
                                .headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Err(refusal)
                        }
                    }
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await
                else {
                    return;
                };
                let _end = SessionEnd(Arc::clone(&seen));
                let created = json!({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_1", "object": "realtime.session", "model": "gpt-4o-realtime-preview-2024-12-17", "modalities": ["text"]}});
                if socket
                    .send(Message::Text(created.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                let mut serial = 0;
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        if let Message::Close(_) = message {
                            return;
                        }
                        continue;
                    };
                    let Ok(event) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    let replies = match event["type"].as_str().unwrap_or_default() {
                        "session.update" | "transcription_session.update" => {
                            let kind = event["type"].as_str().unwrap_or_default();
                            vec![json!({
                                "type": kind.replace(".update", ".updated"),
                                "event_id": "event_10",
                                "session": event["session"],
                            })]
                        }
                        "conversation.item.create" => vec![
                            json!({"type": "conversation.item.created", "event_id": "event_2", "item": event["item"]}),
                        ],
                        "response.create" => {
                            seen.responses_asked.fetch_add(1, Ordering::SeqCst);
                            serial += 1;
                            response_events(&format!("resp_{serial}"))
                        }
                        // Server voice activity detection, the Realtime API's default turn
                        // detection: the member decides the speech has stopped, commits the
                        // audio and starts a response by itself (server events
                        // `input_audio_buffer.speech_stopped`, `input_audio_buffer.committed`).
                        "input_audio_buffer.append" => {
                            serial += 1;
                            let mut events = vec![
                                json!({"type": "input_audio_buffer.speech_stopped", "event_id": "event_8", "audio_end_ms": 900, "item_id": "item_1"}),
                                json!({"type": "input_audio_buffer.committed", "event_id": "event_9", "previous_item_id": null, "item_id": "item_1"}),
                            ];
                            events.extend(response_events(&format!("resp_{serial}")));
                            events
                        }
                        _ => Vec::new(),
                    };
                    for reply in replies {
                        if socket
                            .send(Message::Text(reply.to_string().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, seen)
}

/// The events of one response of the member double: "Hello there" in two deltas, 20 input
/// tokens (5 of them cached) and 10 output tokens.
fn response_events(id: &str) -> Vec<Value> {
    vec![
        json!({"type": "response.created", "event_id": "event_3", "response": {"id": id, "object": "realtime.response", "status": "in_progress", "output": []}}),
        json!({"type": "response.text.delta", "event_id": "event_4", "response_id": id, "item_id": "item_2", "output_index": 0, "content_index": 0, "delta": "Hello"}),
        json!({"type": "response.text.delta", "event_id": "event_5", "response_id": id, "item_id": "item_2", "output_index": 0, "content_index": 0, "delta": " there"}),
        json!({"type": "response.text.done", "event_id": "event_6", "response_id": id, "item_id": "item_2", "output_index": 0, "content_index": 0, "text": "Hello there"}),
        json!({"type": "response.done", "event_id": "event_7", "response": {
            "id": id, "object": "realtime.response", "status": "completed",
            "output": [{"id": "item_2", "object": "realtime.item", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "Hello there"}]}],
            "usage": {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
                      "input_token_details": {"cached_tokens": 5, "text_tokens": 20, "audio_tokens": 0},
                      "output_token_details": {"text_tokens": 10, "audio_tokens": 0}}}}),
    ]
}

/// A gateway whose Realtime deployment is served by the one member at `member_url`.
async fn gateway_before(member_url: &str) -> TestGateway {
    TestGateway::start(snapshot(
        1,
        realtime_pool(json!([member("voice", member_url, 1)])),
    ))
    .await
}

fn realtime_pool(members: Value) -> Value {
    json!([{"id": "voice", "deployments": ["gpt-4o-realtime"], "members": members}])
}

/// Opens a session through the gateway at `url` (`http://…`) on `path_and_query`, with the
/// client key unless `key` is `None`.
async fn connect(
    url: &str,
    path_and_query: &str,
    key: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let ws_url = format!("{}{path_and_query}", url.replacen("http://", "ws://", 1));
    let mut request = ws_url.into_client_request().unwrap();
    if let Some(key) = key {
        request
            .headers_mut()
            .insert("api-key", key.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(socket, _)| socket)
}

/// The Realtime path Azure's SDKs open for deployment `gpt-4o-realtime`.
const SESSION_PATH: &str =
    "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime";

/// Opens a session with the client key on [`SESSION_PATH`] through the gateway at `url`, and
/// reads the member's `session.created`.
async fn open_session(
    url: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut socket = connect(url, SESSION_PATH, Some(KEY)).await.unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    socket
}

/// A rule of 50 tokens a minute for each subscription.
fn fifty_tokens_a_minute() -> Vec<gatehouse_schema::limits::LimitRule> {
    serde_json::from_value(json!([
        {"id": "voice-tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 50}
    ]))
    .unwrap()
}

/// The next text event of `socket`, parsed.
async fn next_event(
    socket: &mut (
             impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin
         ),
) -> Value {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
            .await
            .expect("an event within 10 s")
            .expect("the session is open")
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Events until (and with) the first of type `until`.
async fn events_until(
    socket: &mut (
             impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin
         ),
    until: &str,
) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = next_event(socket).await;
        let done = event["type"] == until;
        events.push(event);
        if done {
            return events;
        }
    }
}

fn user_message(text: &str) -> Message {
    Message::Text(
        json!({"type": "conversation.item.create", "event_id": "client_1", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
            .to_string()
            .into(),
    )
}

/// Speaks `turns` turns of audio on `socket`, each answered by a response the member starts by
/// itself (see [`realtime_member`]), and waits for each one's `response.done`.
async fn speak_turns<S>(socket: &mut S, turns: usize)
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message>
        + Unpin,
    <S as futures::Sink<Message>>::Error: std::fmt::Debug,
{
    for _ in 0..turns {
        let append = json!({"type": "input_audio_buffer.append", "event_id": "client_audio", "audio": "AAAA"});
        socket
            .send(Message::Text(append.to_string().into()))
            .await
            .unwrap();
        events_until(socket, "response.done").await;
    }
}

fn response_create() -> Message {
    Message::Text(
        json!({"type": "response.create", "event_id": "client_2", "response": {"modalities": ["text"]}})
            .to_string()
            .into(),
    )
}

/// A session opened the way Azure's SDKs open it is relayed event by event, the member reached
/// with its own key under its own name for the deployment, and the session is one record: the
/// events each way (without deltas), the user's message, the response and its usage.
#[tokio::test]
async fn a_realtime_session_is_relayed_and_recorded_as_one_call() {
    let (member_url, seen) = realtime_member(None).await;
    let (_key_file, key_ref) = backend_key_file();
    let mut voice = member("voice-east", &member_url, 1);
    voice["credential"] = json!({"type": "api_key", "secret": key_ref});
    voice["deployment"] = json!("gpt-4o-realtime-eastus");
    let gw = TestGateway::start(snapshot(1, realtime_pool(json!([voice])))).await;

    let mut socket = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap();
    let created = next_event(&mut socket).await;
    assert_eq!(created["type"], "session.created");
    socket.send(user_message("Say hello")).await.unwrap();
    socket.send(response_create()).await.unwrap();
    let events = events_until(&mut socket, "response.done").await;
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["Hello", " there"], "{events:?}");
    socket.close(None).await.unwrap();

    // The member: its own URL, name and key; never the client's key.
    let handshakes = seen.handshakes.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let (uri, headers) = &handshakes[0];
    assert_eq!(
        uri,
        "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime-eastus"
    );
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("api-key"), Some(BACKEND_KEY));
    assert!(
        headers.iter().all(|(_, value)| !value.contains(KEY)),
        "{headers:?}"
    );

    let record = gw.records(1).await.remove(0);
    assert_eq!(record.operation_id, Some(OperationId::RealtimeSession));
    assert_eq!(record.operation_id.unwrap().as_str(), "onhandshake");
    assert_eq!(record.response_code, 101);
    assert_eq!(record.backend_response_code, Some(101));
    assert_eq!(record.deployment_name.as_deref(), Some("gpt-4o-realtime"));
    assert_eq!(
        record.model_name.as_deref(),
        Some("gpt-4o-realtime-preview-2024-12-17")
    );
    assert_eq!(record.backend_id.as_deref(), Some("voice-east"));
    assert!(record.is_stream_completion);
    let usage = record.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cached_tokens
        ),
        (20, 10, 30, 5)
    );
    let prompt = record.request_messages.unwrap();
    assert!(prompt.contains("Say hello"), "{prompt}");
    let answer = record.response_messages.unwrap();
    assert!(answer.contains("Hello there"), "{answer}");
    let sent = record.backend_request_body.unwrap();
    assert!(sent.contains("\"response.create\""), "{sent}");
    let received = record.backend_response_body.unwrap();
    assert!(received.contains("\"response.done\""), "{received}");
    assert!(!received.contains("response.text.delta"), "{received}");
    assert!(record.time_to_first_byte.is_some());
    assert!(!record.url.contains(KEY));
}

/// The v1 and OpenAI routes name the deployment in `model`, and reach an Azure member's v1
/// route with the member's name for it.
#[tokio::test]
async fn the_v1_routes_take_the_deployment_from_model() {
    let (member_url, seen) = realtime_member(None).await;
    let gw = gateway_before(&member_url).await;
    for path in [
        "/openai/v1/realtime?model=gpt-4o-realtime",
        "/v1/realtime?model=gpt-4o-realtime",
    ] {
        let mut socket = connect(&gw.url, path, Some(KEY)).await.unwrap();
        assert_eq!(next_event(&mut socket).await["type"], "session.created");
        socket.close(None).await.unwrap();
    }
    let uris: Vec<String> = seen
        .handshakes
        .lock()
        .unwrap()
        .iter()
        .map(|(uri, _)| uri.clone())
        .collect();
    assert_eq!(
        uris,
        [
            "/openai/v1/realtime?model=gpt-4o-realtime",
            "/openai/v1/realtime?model=gpt-4o-realtime"
        ]
    );
    let records = gw.records(2).await;
    assert!(records.iter().all(|r| r.response_code == 101));
}

/// A handshake without a key, with a wrong one, for a deployment no pool serves, or without a
/// deployment is answered over HTTP in Azure's shape, and no member is asked.
#[tokio::test]
async fn a_refused_handshake_is_an_http_answer_and_reaches_no_member() {
    let (member_url, seen) = realtime_member(None).await;
    let gw = gateway_before(&member_url).await;
    let classic = SESSION_PATH;
    for (path, key, status) in [
        (classic, None, 401),
        (classic, Some("ghk_wrong"), 401),
        (
            "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-nope",
            Some(KEY),
            404,
        ),
        (
            "/openai/realtime?api-version=2025-04-01-preview",
            Some(KEY),
            400,
        ),
    ] {
        let refused = connect(&gw.url, path, key).await.unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else {
            panic!("{path}: {refused:?}");
        };
        assert_eq!(answer.status().as_u16(), status, "{path}");
        let body: Value = serde_json::from_slice(answer.body().as_deref().unwrap()).unwrap();
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    // A plain GET (no upgrade) is told how to open the session.
    let plain = gw.get(classic).send().await.unwrap();
    assert_eq!(plain.status(), 400);
    let message = azure_error(plain, 400).await;
    assert!(message.contains("WebSocket"), "{message}");
    assert!(seen.handshakes.lock().unwrap().is_empty());
    let records = gw.records(5).await;
    assert!(records.iter().all(|r| r.backend_id.is_none()));
}

/// A member that throttles the handshake is set aside and the session opens on the next; with
/// every member throttled the client gets 429 with the shortest wait.
#[tokio::test]
async fn a_throttled_handshake_goes_to_the_next_member() {
    let (throttled_url, throttled) = realtime_member(Some((429, "2000"))).await;
    let (open_url, open) = realtime_member(None).await;
    let gw = TestGateway::start(snapshot(
        1,
        realtime_pool(json!([
            member("busy", &throttled_url, 1),
            member("free", &open_url, 2)
        ])),
    ))
    .await;
    let path = SESSION_PATH;
    let mut socket = connect(&gw.url, path, Some(KEY)).await.unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    socket.close(None).await.unwrap();
    assert_eq!(throttled.handshakes.lock().unwrap().len(), 1);
    assert_eq!(open.handshakes.lock().unwrap().len(), 1);
    let record = gw.records(1).await.remove(0);
    let attempts: Vec<(String, Option<u16>)> = record
        .attempts
        .iter()
        .map(|a| (a.backend_id.clone(), a.status))
        .collect();
    assert_eq!(
        attempts,
        [
            ("busy".to_owned(), Some(429)),
            ("free".to_owned(), Some(101))
        ]
    );

    // Only the throttled member: 429 with its wait, the member asked once.
    let (alone_url, alone) = realtime_member(Some((429, "3000"))).await;
    let gw = TestGateway::start(snapshot(
        1,
        realtime_pool(json!([member("alone", &alone_url, 1)])),
    ))
    .await;
    let refused = connect(&gw.url, path, Some(KEY)).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(answer.status(), 429);
    let wait: u64 = answer.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((2_000..=3_000).contains(&wait), "{wait}");
    assert_eq!(alone.handshakes.lock().unwrap().len(), 1);
}

/// A member that refuses the gateway's credential (401) passes the handshake on to the next
/// member; alone, its refusal is the answer.
#[tokio::test]
async fn a_handshake_the_member_refuses_the_gateway_goes_to_the_next_member() {
    let (refusing_url, refusing) = realtime_member(Some((401, "0"))).await;
    let (open_url, open) = realtime_member(None).await;
    let gw = TestGateway::start(snapshot(
        1,
        realtime_pool(json!([
            member("wrong-key", &refusing_url, 1),
            member("free", &open_url, 2)
        ])),
    ))
    .await;
    let mut socket = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap();
    assert_eq!(next_event(&mut socket).await["type"], "session.created");
    socket.close(None).await.unwrap();
    assert_eq!(refusing.handshakes.lock().unwrap().len(), 1);
    assert_eq!(open.handshakes.lock().unwrap().len(), 1);
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        attempts_of(&record),
        [
            ("wrong-key", Some(401), Some("refused_gateway")),
            ("free", Some(101), None)
        ]
    );

    let gw = TestGateway::start(snapshot(
        1,
        realtime_pool(json!([member("wrong-key", &refusing_url, 1)])),
    ))
    .await;
    let refused = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(answer.status(), 401, "the member's refusal, as it came");
    assert_eq!(refusing.handshakes.lock().unwrap().len(), 2);
}

/// Each `response.create` is admitted against the caller's token limit: once the responses so
/// far spent it, the next is answered with an `error` event and never reaches the member; the
/// session stays open.
#[tokio::test]
async fn a_response_over_the_callers_token_limit_never_reaches_the_member() {
    let (member_url, seen) = realtime_member(None).await;
    let mut config = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    config.limits = fifty_tokens_a_minute();
    let gw = TestGateway::start(config).await;
    let mut socket = open_session(&gw.url).await;
    // 30 tokens each: the first two responses are admitted (0, then 30 of 50 spent), the third
    // (60 spent) is not.
    for _ in 0..2 {
        socket.send(response_create()).await.unwrap();
        events_until(&mut socket, "response.done").await;
    }
    socket.send(response_create()).await.unwrap();
    let refusal = next_event(&mut socket).await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refusal["error"]["event_id"], "client_2");
    // Still open: a message goes through.
    socket.send(user_message("still there?")).await.unwrap();
    assert_eq!(
        next_event(&mut socket).await["type"],
        "conversation.item.created"
    );
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 2);
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.usage.unwrap().total_tokens, 60);
}

/// Responses the member starts by itself (server voice activity detection) cannot be refused, but
/// their tokens count at once: the caller's next `response.create` is judged with them.
#[tokio::test]
async fn responses_the_member_starts_by_itself_count_against_the_callers_limit_at_once() {
    let (member_url, seen) = realtime_member(None).await;
    let mut config = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    config.limits = fifty_tokens_a_minute();
    let gw = TestGateway::start(config).await;
    let mut socket = open_session(&gw.url).await;
    // Two spoken turns, each answered by the member on its own: 60 tokens of the 50 a minute.
    speak_turns(&mut socket, 2).await;
    socket.send(response_create()).await.unwrap();
    let refusal = next_event(&mut socket).await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["error"]["code"], "rate_limit_exceeded");
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 0);
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.usage.unwrap().total_tokens, 60);
}

/// A client that leaves while the gateway opens the member's side (a member that takes 1.5 s to
/// accept) never sees its 101: the session still gets its record, marked client-aborted, and the
/// member's side is closed.
#[tokio::test]
async fn a_client_gone_before_its_upgrade_still_gets_a_record() {
    use tokio::io::AsyncWriteExt as _;
    let (member_url, seen) =
        slow_realtime_member(std::time::Duration::from_millis(1_500), None).await;
    let gw = gateway_before(&member_url).await;
    let address = gw.url.trim_start_matches("http://").to_owned();
    let mut client = tokio::net::TcpStream::connect(&address).await.unwrap();
    let handshake = format!(
        "GET {SESSION_PATH} HTTP/1.1\r\n\
         Host: {address}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         api-key: {KEY}\r\n\r\n"
    );
    client.write_all(handshake.as_bytes()).await.unwrap();
    // Gone once the gateway is connecting to the member, which takes its time to accept.
    for _ in 0..400 {
        if seen.connections.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    drop(client);
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.operation_id, Some(OperationId::RealtimeSession));
    assert!(record.client_aborted, "{record:?}");
    assert_eq!(record.response_code, 101);
    assert_eq!(seen.handshakes.lock().unwrap().len(), 1);
    // The member's side is not left open.
    for _ in 0..200 {
        if seen.sessions_ended.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the member's side of the session is still open");
}

/// Each side of a session is kept as its own capture limit says: with the answers' limit at 0
/// (metadata only) nothing the member said is kept, while the client's side still is.
#[tokio::test]
async fn each_side_of_a_session_is_kept_by_its_own_capture_limit() {
    let (member_url, _seen) = realtime_member(None).await;
    let mut config = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    config.capture.max_response_body_bytes = 0;
    let gw = TestGateway::start(config).await;
    let mut socket = open_session(&gw.url).await;
    socket.send(user_message("Say hello")).await.unwrap();
    socket.send(response_create()).await.unwrap();
    events_until(&mut socket, "response.done").await;
    socket.close(None).await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.backend_response_body, None);
    assert_eq!(record.response_messages, None);
    assert!(!record.response_body_truncated);
    assert!(
        record
            .request_messages
            .as_deref()
            .is_some_and(|m| m.contains("Say hello")),
        "{:?}",
        record.request_messages
    );
    assert!(record.backend_request_body.is_some());
    // The usage is metadata: kept.
    assert_eq!(record.usage.unwrap().total_tokens, 30);
}

/// Limits pushed while a session is open apply to it from its next response: the responses the
/// member starts by itself are charged under them, and the caller's next one is judged by them.
#[tokio::test]
async fn limits_pushed_during_a_session_apply_to_its_next_responses() {
    let (member_url, seen) = realtime_member(None).await;
    let pools = realtime_pool(json!([member("voice", &member_url, 1)]));
    let gw = TestGateway::start(snapshot(1, pools.clone())).await;
    let mut socket = open_session(&gw.url).await;
    let mut limited = snapshot(2, pools);
    limited.limits = fifty_tokens_a_minute();
    assert_eq!(gw.push_config(&limited).await.status(), 200);
    speak_turns(&mut socket, 2).await;
    socket.send(response_create()).await.unwrap();
    let refusal = next_event(&mut socket).await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(refusal["error"]["code"], "rate_limit_exceeded");
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 0);
}

/// A push that takes the session's deployment from every pool refuses the session's next
/// responses (`deployment_not_found`): no pool serves it, and its limits would count nothing.
#[tokio::test]
async fn a_deployment_pushed_away_during_a_session_refuses_its_next_responses() {
    let (member_url, seen) = realtime_member(None).await;
    let gw = TestGateway::start(snapshot(
        1,
        realtime_pool(json!([member("voice", &member_url, 1)])),
    ))
    .await;
    let mut socket = open_session(&gw.url).await;
    let mut moved = snapshot(
        2,
        json!([{"id": "voice", "deployments": ["gpt-4o-realtime-next"],
                "members": [member("voice", &member_url, 1)]}]),
    );
    moved.limits = fifty_tokens_a_minute();
    assert_eq!(gw.push_config(&moved).await.status(), 200);
    socket
        .send(Message::Text(
            json!({"type": "response.create", "event_id": "ask-1"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let refusal = next_event(&mut socket).await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(
        refusal["error"]["code"], "deployment_not_found",
        "{refusal}"
    );
    assert_eq!(refusal["error"]["event_id"], "ask-1", "{refusal}");
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 0);
}

/// Reads `socket` until the gateway closes it for a caller no longer admitted: its `error` event
/// (returned) and then its close frame, 1008 (policy violation).
async fn withdrawn(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    let event = next_event(socket).await;
    assert_eq!(event["type"], "error", "{event}");
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("the close frame within 10 s");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
        }
        other => panic!("not a close frame: {other:?}"),
    }
    event
}

/// Waits until the member double has seen `count` sessions end.
async fn member_sessions_ended(seen: &Seen, count: usize) {
    for _ in 0..400 {
        if seen.sessions_ended.load(Ordering::SeqCst) == count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "{} of the member's sessions ended, not {count}",
        seen.sessions_ended.load(Ordering::SeqCst)
    );
}

/// A subscription revoked while its session is open closes the session: the client is told why
/// and gets a 1008 close, the member's side is closed, and the record says why it ended. A push
/// that leaves the caller admitted leaves the session alone.
#[tokio::test]
async fn a_session_whose_subscription_is_revoked_is_closed() {
    let (member_url, seen) = realtime_member(None).await;
    let pools = realtime_pool(json!([member("voice", &member_url, 1)]));
    let gw = TestGateway::start(snapshot(1, pools.clone())).await;
    let mut socket = open_session(&gw.url).await;
    // Another change: the session goes on.
    let mut renamed = snapshot(2, pools.clone());
    renamed.subscriptions[0].display_name = "Team A (voice)".to_owned();
    assert_eq!(gw.push_config(&renamed).await.status(), 200);
    speak_turns(&mut socket, 1).await;

    let mut revoked = snapshot(3, pools);
    revoked.subscriptions[0].state = gatehouse_schema::config::SubscriptionState::Revoked;
    assert_eq!(gw.push_config(&revoked).await.status(), 200);
    let error = withdrawn(&mut socket).await;
    assert_eq!(error["error"]["code"], "invalid_key", "{error}");
    assert!(!error.to_string().contains(KEY), "{error}");
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.last_error_reason.as_deref(), Some("invalid_key"));
    assert_eq!(record.usage.unwrap().total_tokens, 30);
}

/// A regenerated key and a withdrawn access rule end the sessions opened with the key or under
/// the rule.
#[tokio::test]
async fn a_session_ends_with_its_key_or_its_access_rule() {
    let (member_url, seen) = realtime_member(None).await;
    let pools = realtime_pool(json!([member("voice", &member_url, 1)]));
    let with_rule = |version: u64, deployments: Value| {
        let mut value = serde_json::to_value(snapshot(version, pools.clone())).unwrap();
        value["access_rules"] = json!([
            {"id": "team-a-voice", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": deployments}
        ]);
        serde_json::from_value::<gatehouse_schema::config::ConfigSnapshot>(value).unwrap()
    };
    let gw = TestGateway::start(with_rule(1, json!(["gpt-4o-realtime"]))).await;

    let mut socket = open_session(&gw.url).await;
    assert_eq!(
        gw.push_config(&with_rule(2, json!(["gpt-4o-mini"])))
            .await
            .status(),
        200
    );
    let error = withdrawn(&mut socket).await;
    assert_eq!(error["error"]["code"], "not_permitted", "{error}");
    member_sessions_ended(&seen, 1).await;

    assert_eq!(
        gw.push_config(&with_rule(3, json!(["gpt-4o-*"])))
            .await
            .status(),
        200
    );
    let mut socket = open_session(&gw.url).await;
    let mut rotated = with_rule(4, json!(["gpt-4o-*"]));
    rotated.subscriptions[0].primary_key_hash =
        gatehouse_gateway::auth::hash_key("ghk_TheNewPrimaryKey00000000000000000000000");
    assert_eq!(gw.push_config(&rotated).await.status(), 200);
    let error = withdrawn(&mut socket).await;
    assert_eq!(error["error"]["code"], "invalid_key", "{error}");
    member_sessions_ended(&seen, 2).await;
    let records = gw.records(2).await;
    let reasons: Vec<_> = records
        .iter()
        .map(|record| record.last_error_reason.as_deref())
        .collect();
    assert_eq!(reasons, [Some("not_permitted"), Some("invalid_key")]);
}

/// Identity settings pushed while a session is open judge it too: a session opened with a key
/// ends when the settings come to require an Entra token, with the client told why.
#[tokio::test]
async fn a_session_ends_when_the_identity_settings_stop_taking_its_credential() {
    let (member_url, seen) = realtime_member(None).await;
    let pools = realtime_pool(json!([member("voice", &member_url, 1)]));
    let gw = TestGateway::start(snapshot(1, pools.clone())).await;
    let mut socket = open_session(&gw.url).await;
    let with_identity = |version: u64, require: &str| {
        let mut value = serde_json::to_value(snapshot(version, pools.clone())).unwrap();
        value["identity"] = json!({"require": require, "entra": {
            "tenants": ["72f988bf-86f1-41af-91ab-2d7cd011db47"],
            "audiences": ["api://gatehouse"]}});
        serde_json::from_value::<gatehouse_schema::config::ConfigSnapshot>(value).unwrap()
    };
    // Tokens taken beside keys: the key still counts.
    assert_eq!(
        gw.push_config(&with_identity(2, "key_or_token"))
            .await
            .status(),
        200
    );
    speak_turns(&mut socket, 1).await;
    assert_eq!(
        gw.push_config(&with_identity(3, "token")).await.status(),
        200
    );
    let error = withdrawn(&mut socket).await;
    assert_eq!(error["error"]["code"], "missing_token", "{error}");
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.last_error_reason.as_deref(), Some("missing_token"));
}

/// A subscription whose key expires while its session is open: the session ends then. The
/// expiry is set by a push during the session, which leaves the caller admitted until then.
#[tokio::test]
async fn a_session_ends_when_its_key_expires() {
    let (member_url, seen) = realtime_member(None).await;
    let pools = realtime_pool(json!([member("voice", &member_url, 1)]));
    let gw = TestGateway::start(snapshot(1, pools.clone())).await;
    let mut socket = open_session(&gw.url).await;
    let mut expiring = snapshot(2, pools);
    expiring.subscriptions[0].expires_at =
        Some(time::OffsetDateTime::now_utc() + time::Duration::seconds(1));
    assert_eq!(gw.push_config(&expiring).await.status(), 200);
    let error = withdrawn(&mut socket).await;
    assert_eq!(error["error"]["code"], "expired_key", "{error}");
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.last_error_reason.as_deref(), Some("expired_key"));
}

/// A gateway in front of the member at `member_url` whose Realtime sessions may idle for one
/// second and whose clients have one second to take each event.
async fn impatient_gateway(member_url: &str) -> TestGateway {
    TestGateway::start_with_client_timeouts(
        snapshot(1, realtime_pool(json!([member("voice", member_url, 1)]))),
        gatehouse_gateway::ClientTimeouts {
            send: std::time::Duration::from_secs(1),
            realtime_idle: std::time::Duration::from_secs(1),
            ..gatehouse_gateway::ClientTimeouts::default()
        },
    )
    .await
}

/// A session that passes no frame either way for the idle timeout is closed on both sides: the
/// client is told why and gets a 1001 close, the member's side is closed, and the record says
/// why it ended. Events, and the client's pings alone, keep a session open past the timeout.
#[tokio::test]
async fn a_session_idle_too_long_is_closed_on_both_sides() {
    let (member_url, seen) = realtime_member(None).await;
    let gw = impatient_gateway(&member_url).await;
    let mut socket = open_session(&gw.url).await;
    // 2.4 s, more than twice the timeout: an event or a ping every 400 ms.
    for round in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        if round % 2 == 0 {
            socket.send(Message::Ping(Vec::new().into())).await.unwrap();
        } else {
            socket.send(user_message("still here")).await.unwrap();
            assert_eq!(
                next_event(&mut socket).await["type"],
                "conversation.item.created"
            );
        }
    }
    // 2.4 s of pings alone.
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        socket.send(Message::Ping(Vec::new().into())).await.unwrap();
    }
    speak_turns(&mut socket, 1).await;
    assert_eq!(seen.sessions_ended.load(Ordering::SeqCst), 0);

    // Then silence.
    let started = std::time::Instant::now();
    let event = next_event(&mut socket).await;
    assert_eq!(event["type"], "error", "{event}");
    assert_eq!(event["error"]["code"], "realtime_idle_timeout", "{event}");
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("the close frame within 10 s");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("not a close frame: {other:?}"),
    }
    // The gateway's count began with the last event, a little before the client read it.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(500),
        "closed after {:?} of silence",
        started.elapsed()
    );
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("realtime_idle_timeout")
    );
    assert!(!record.client_aborted);
    assert_eq!(record.usage.unwrap().total_tokens, 30);
}

/// A Realtime member double that, once its handshake is done, streams audio deltas of 64 KiB
/// (`response.audio.delta`, OpenAI's Realtime API reference) until its connection fails: a long
/// spoken answer. Counts its sessions that ended.
async fn talkative_member() -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let state = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = Arc::clone(&state);
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let _end = SessionEnd(seen);
                let audio = "A".repeat(64 * 1024);
                let delta = json!({"type": "response.audio.delta", "event_id": "event_4", "response_id": "resp_1", "item_id": "item_2", "output_index": 0, "content_index": 0, "delta": audio}).to_string();
                // Bounded: 4 GiB at most, far past any socket buffer.
                for _ in 0..65_536 {
                    if socket
                        .send(Message::Text(delta.clone().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// A client that takes none of the events of a session: after the send timeout the session
/// ends, the member's side is closed, and the record says the client stalled.
#[tokio::test]
async fn a_client_that_takes_no_events_ends_its_session() {
    let (member_url, seen) = talkative_member().await;
    let gw = impatient_gateway(&member_url).await;
    let socket = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap();
    // The client reads nothing: the member's deltas fill the connection's buffers.
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("client_send_timeout")
    );
    assert!(record.client_aborted);
    assert!(record.response_size > 0);
    drop(socket);
}

/// A Realtime member double that accepts the handshake and then reads nothing, as a member
/// stuck on its side would.
async fn deaf_member() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                drop(socket);
            });
        }
    });
    url
}

/// A member that takes none of the client's events for the send timeout ends the session: the
/// client gets a 1011 close, and the record says the member's side failed.
#[tokio::test]
async fn a_member_that_takes_no_events_ends_its_session() {
    let gw = impatient_gateway(&deaf_member().await).await;
    let socket = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap();
    let (mut sending, mut receiving) = socket.split();
    let audio = json!({"type": "input_audio_buffer.append", "event_id": "client_audio", "audio": "A".repeat(64 * 1024)}).to_string();
    let flood = tokio::spawn(async move {
        // Bounded: 1 GiB at most, far past any socket buffer.
        for _ in 0..16_384 {
            if sending
                .send(Message::Text(audio.clone().into()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match receiving.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("the session ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the close frame within 10 s");
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(1011));
    flood.abort();
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("backend_stream_failed")
    );
    assert!(record.request_size > 0);
}

/// What the proxy double saw: the target of each `CONNECT` it tunnelled, and how many it refused.
#[derive(Default)]
struct ProxySeen {
    tunnels: Mutex<Vec<String>>,
    refused: AtomicUsize,
}

/// An HTTP proxy double on 127.0.0.1 that speaks `CONNECT` as RFC 9110 §9.3.6 describes it:
/// a request `CONNECT host:port HTTP/1.1` answered `200` and then a tunnel that relays bytes
/// both ways, or `407 Proxy Authentication Required` when `Proxy-Authorization` is not `Basic`
/// of `user:password` (RFC 9110 §11.7.1, RFC 7617). Anything but `CONNECT` is answered 405.
async fn connect_proxy(user: &'static str, password: &'static str) -> (u16, Arc<ProxySeen>) {
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(ProxySeen::default());
    let state = Arc::clone(&seen);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = Arc::clone(&state);
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut client = tokio::io::BufReader::new(stream);
                let mut request_line = String::new();
                if client.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    if client.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("proxy-authorization")
                    {
                        authorized = value.trim() == expected;
                    }
                }
                let mut parts = request_line.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
                    let _ = client
                        .get_mut()
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                if !authorized {
                    seen.refused.fetch_add(1, Ordering::SeqCst);
                    let _ = client
                        .get_mut()
                        .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                seen.tunnels.lock().unwrap().push(target.to_owned());
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client
                        .get_mut()
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                if client
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, seen)
}

/// When the environment names a proxy for the member's URL (`HTTP_PROXY` for `ws://`,
/// `HTTPS_PROXY` for `wss://`, as for calls), the member's side of a session goes through it in a
/// `CONNECT` tunnel, with the credentials of the proxy's URL; a proxy that refuses them sets the
/// member aside, and neither the answer nor the log repeats the proxy's password.
#[tokio::test]
async fn a_session_reaches_its_member_through_the_environments_proxy() {
    let (member_url, seen) = realtime_member(None).await;
    let member_authority = member_url.trim_start_matches("http://").to_owned();
    let snapshot = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    let (proxy_port, proxy) = connect_proxy("gatehouse", "proxy-Pa55word").await;

    let through = |password: &'static str| {
        let proxy_url = format!("http://gatehouse:{password}@127.0.0.1:{proxy_port}");
        let snapshot = snapshot.clone();
        async move {
            GatewayProcess::start_with_env(
                "realtime-proxied",
                &snapshot,
                json!({}),
                &[
                    ("HTTP_PROXY", proxy_url.as_str()),
                    ("HTTPS_PROXY", proxy_url.as_str()),
                    ("NO_PROXY", ""),
                    ("no_proxy", ""),
                ],
            )
            .await
        }
    };

    let gateway = through("proxy-Pa55word").await;
    let mut socket = open_session(&gateway.url).await;
    socket.send(user_message("Say hello")).await.unwrap();
    socket.send(response_create()).await.unwrap();
    events_until(&mut socket, "response.done").await;
    socket.close(None).await.unwrap();
    assert_eq!(*proxy.tunnels.lock().unwrap(), [member_authority]);
    assert_eq!(seen.handshakes.lock().unwrap().len(), 1);
    drop(gateway);

    let refused = through("Wr0ng-proxy-password").await;
    let answer = connect(&refused.url, SESSION_PATH, Some(KEY)).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(answer)) = answer else {
        panic!("the handshake was not refused: {answer:?}");
    };
    assert_eq!(answer.status(), 503);
    let body = String::from_utf8_lossy(answer.body().as_deref().unwrap_or_default()).into_owned();
    assert_eq!(proxy.refused.load(Ordering::SeqCst), 1);
    assert_eq!(seen.handshakes.lock().unwrap().len(), 1, "no new handshake");
    let log = refused.log();
    assert!(log.contains("proxy authorization required"), "{log}");
    for text in [&body, &log] {
        assert!(!text.contains("Wr0ng-proxy-password"), "{text}");
        assert!(!text.contains("gatehouse:"), "{text}");
    }
}

/// A Realtime member double that, once its handshake is done, sends `session.created` and then
/// pings every 300 ms (RFC 6455 §5.5.2), reading and ignoring what it is sent.
async fn pinging_member() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut sending, mut receiving) = socket.split();
                let created = json!({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_1", "object": "realtime.session", "model": "gpt-4o-realtime-preview-2024-12-17"}});
                if sending
                    .send(Message::Text(created.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                let pings = async move {
                    // Bounded: a minute at most.
                    for _ in 0..200 {
                        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        if sending
                            .send(Message::Ping(Vec::new().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                };
                let reads = async move { while let Some(Ok(_)) = receiving.next().await {} };
                tokio::select! { () = pings => {}, () = reads => {} }
            });
        }
    });
    url
}

/// A member's own pings say nothing of the client: a session whose client is silent is closed
/// after the idle timeout however often its member pings.
#[tokio::test]
async fn a_members_pings_do_not_keep_an_idle_session_open() {
    let gw = impatient_gateway(&pinging_member().await).await;
    let mut socket = open_session(&gw.url).await;
    let event = next_event(&mut socket).await;
    assert_eq!(event["error"]["code"], "realtime_idle_timeout", "{event}");
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("realtime_idle_timeout")
    );
}

/// A TCP stream that reads at most `chunk` bytes every `every`: a member on a slow link.
struct SlowReads {
    tcp: tokio::net::TcpStream,
    chunk: usize,
    every: std::time::Duration,
    next: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for SlowReads {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        let this = self.get_mut();
        if this.next.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        let room = buf.remaining().min(this.chunk);
        let mut limited = tokio::io::ReadBuf::new(buf.initialize_unfilled_to(room));
        let polled = std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut limited);
        if let std::task::Poll::Ready(Ok(())) = polled {
            let read = limited.filled().len();
            buf.advance(read);
            let at = tokio::time::Instant::now() + this.every;
            this.next.as_mut().reset(at);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for SlowReads {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A Realtime member double on a slow link: a 64 KiB receive buffer, read 128 KiB every 20 ms
/// (6.25 MiB/s); it answers each `conversation.item.create` with a short
/// `conversation.item.created`.
async fn slow_reading_member() -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // Set before listening, so that accepted connections inherit it (and the kernel does not
    // grow it to take a whole message at once).
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let slow = SlowReads {
                    tcp,
                    chunk: 128 * 1024,
                    every: std::time::Duration::from_millis(20),
                    next: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
                };
                let Ok(mut socket) = tokio_tungstenite::accept_async(slow).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    if text.as_str().contains("conversation.item.create") {
                        let created =
                            json!({"type": "conversation.item.created", "event_id": "event_2"});
                        if socket
                            .send(Message::Text(created.to_string().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

/// The send limit counts a pause, not a whole message: a 15 MiB message that a member on a
/// slow link takes over seconds (at most ≈ 4 MiB fit in the gateway's socket buffer, so its
/// writes wait ≈ 1.7 s in all, longer than the one-second limit) goes through, and the session
/// goes on.
#[tokio::test]
async fn a_long_message_a_slow_member_keeps_taking_goes_through() {
    let gw = impatient_gateway(&slow_reading_member().await).await;
    let mut socket = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap();
    let long = json!({"type": "conversation.item.create", "event_id": "client_1", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "A".repeat(15 << 20)}]}});
    let started = std::time::Instant::now();
    socket
        .send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    let event = next_event(&mut socket).await;
    assert_eq!(event["type"], "conversation.item.created", "{event}");
    assert!(
        started.elapsed() > std::time::Duration::from_secs(1),
        "the member took it within the limit ({:?}): the test shows nothing",
        started.elapsed()
    );
    socket.close(None).await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.last_error_reason, None);
}

/// What an [`interrupted_member`] does with its response once the test lets it go on.
#[derive(Clone, Copy)]
enum Rest {
    /// Sends the rest of [`response_events`]: `response.text.done`, then `response.done` with
    /// the usage.
    Finish,
    /// Drops its connection without a close frame, the response unfinished.
    HangUp,
}

/// A Realtime member double whose response is still running when its client leaves: a
/// `response.create` is answered at once with `response.created` and the two deltas of
/// [`response_events`], and the rest ([`Rest`]) waits until the returned `Notify` is notified.
/// Meanwhile the member reads nothing (a close of the gateway's waits unread).
async fn interrupted_member(rest: Rest) -> (String, Arc<tokio::sync::Notify>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let go_on = Arc::new(tokio::sync::Notify::new());
    let released = Arc::clone(&go_on);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let go_on = Arc::clone(&released);
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let created = json!({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_1", "object": "realtime.session", "model": "gpt-4o-realtime-preview-2024-12-17", "modalities": ["text"]}});
                if socket
                    .send(Message::Text(created.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let event: Value = serde_json::from_str(text.as_str()).unwrap();
                    if event["type"] != "response.create" {
                        continue;
                    }
                    let mut events = response_events("resp_1");
                    let later = events.split_off(3);
                    for event in events {
                        if socket
                            .send(Message::Text(event.to_string().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    go_on.notified().await;
                    match rest {
                        Rest::Finish => {
                            for event in later {
                                if socket
                                    .send(Message::Text(event.to_string().into()))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                        Rest::HangUp => return,
                    }
                }
            });
        }
    });
    (url, go_on)
}

/// A gateway on the one member at `member_url` whose callers have a daily quota of `tokens`.
async fn quota_gateway(member_url: &str, tokens: u64) -> TestGateway {
    let mut config = snapshot(1, realtime_pool(json!([member("voice", member_url, 1)])));
    config.limits = serde_json::from_value(json!([
        {"id": "voice-daily", "subject": {"kind": "each_subscription"},
         "token_quota": {"tokens": tokens, "period": "daily"}}
    ]))
    .unwrap();
    TestGateway::start(config).await
}

/// Asks for a response on a new session through `gw` and reads what the member sends of it at
/// once: `response.created` and two deltas.
async fn session_with_a_running_response(
    gw: &TestGateway,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut socket = open_session(&gw.url).await;
    socket.send(response_create()).await.unwrap();
    let kinds: Vec<Value> = [
        next_event(&mut socket).await,
        next_event(&mut socket).await,
        next_event(&mut socket).await,
    ]
    .iter()
    .map(|event| event["type"].clone())
    .collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.text.delta",
            "response.text.delta"
        ]
    );
    socket
}

/// How a client leaves a session.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// A close frame, and the gateway's answer to it read.
    Close,
    /// Its connection dropped, without a close frame.
    Drop,
}

impl Leave {
    /// Leaves `socket` this way; returns once the gateway has let go of the client's side (for
    /// a dropped connection, after a moment in which it sees the connection gone).
    async fn leave(
        self,
        mut socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) {
        match self {
            Leave::Close => {
                socket.close(None).await.unwrap();
                // The connection ends once the gateway has taken the close.
                tokio::time::timeout(std::time::Duration::from_secs(10), async {
                    while let Some(Ok(_)) = socket.next().await {}
                })
                .await
                .expect("the gateway ends the connection within 10 s");
            }
            Leave::Drop => {
                drop(socket);
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

/// A client that leaves while a response is still running — with a close frame or by dropping
/// its connection — does not take the response's tokens with it: the gateway reads the member on
/// (and does not pass the close on while the response runs, which would end it), charges the
/// usage of its `response.done` to the caller's quota, so that the caller's next session is
/// refused, and the record carries that usage, client-aborted.
#[tokio::test]
async fn a_response_its_client_left_running_is_charged_when_it_is_done() {
    for leave in [Leave::Close, Leave::Drop] {
        let (member_url, go_on) = interrupted_member(Rest::Finish).await;
        // The response's 30 tokens are more than the 25 of the quota.
        let gw = quota_gateway(&member_url, 25).await;
        let socket = session_with_a_running_response(&gw).await;
        leave.leave(socket).await;
        go_on.notify_one();
        let record = gw.records(1).await.remove(0);
        let usage = record
            .usage
            .unwrap_or_else(|| panic!("{leave:?}: no usage"));
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (20, 10, 30),
            "{leave:?}"
        );
        assert!(!usage.is_estimate, "{leave:?}");
        assert!(record.client_aborted, "{leave:?}");
        assert_eq!(record.last_error_reason, None, "{leave:?}");
        let answer = record.response_messages.unwrap_or_default();
        assert!(answer.contains("Hello there"), "{leave:?}: {answer}");
        let refused = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap_err();
        let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else {
            panic!("{leave:?}: {refused:?}");
        };
        assert_eq!(answer.status().as_u16(), 403, "{leave:?}");
    }
}

/// A member that breaks off a response its client left running: the response is charged what
/// its deltas carried ("Hello", " there": 2 tokens, an estimate), so that a caller with a quota of
/// 1 is refused its next session, and the record says the member's side failed.
#[tokio::test]
async fn a_response_broken_off_after_its_client_left_is_charged_its_deltas() {
    let (member_url, go_on) = interrupted_member(Rest::HangUp).await;
    let gw = quota_gateway(&member_url, 1).await;
    let socket = session_with_a_running_response(&gw).await;
    Leave::Close.leave(socket).await;
    go_on.notify_one();
    let record = gw.records(1).await.remove(0);
    let usage = record.usage.expect("an estimate of the response's tokens");
    assert_eq!((usage.completion_tokens, usage.total_tokens), (2, 2));
    assert!(usage.is_estimate);
    assert!(record.client_aborted);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("backend_stream_failed")
    );
    let refused = connect(&gw.url, SESSION_PATH, Some(KEY)).await.unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(answer) = refused else {
        panic!("{refused:?}");
    };
    assert_eq!(answer.status().as_u16(), 403);
}

/// A shutdown lets open Realtime sessions run through its drain (an upgraded connection is no
/// longer one the server's drain counts): a session open when SIGTERM comes still gets its
/// response after the gateway stopped taking connections, and is closed with 1001 once the
/// drain (two seconds here) is over; its record has the response's usage and says the shutdown
/// ended it.
#[tokio::test]
async fn a_shutdown_lets_realtime_sessions_run_until_its_drain_is_over() {
    let (member_url, _seen) = realtime_member(None).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let gateway = GatewayProcess::start_with(
        "realtime-drain",
        &snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)]))),
        json!({"shutdown_drain_seconds": 2, "audit": {"jsonl": audit}}),
    )
    .await;
    let url = gateway.url.clone();
    let mut socket = open_session(&url).await;
    let stopping = tokio::spawn(gateway.terminate());
    // The drain has begun once the gateway takes no new connections.
    let address = url.trim_start_matches("http://").to_owned();
    let mut draining = false;
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(&address).await.is_err() {
            draining = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(draining, "the gateway still takes connections");
    // A moment in which a gateway that did not wait for the session would have closed it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    socket.send(user_message("Say hello")).await.unwrap();
    socket.send(response_create()).await.unwrap();
    let events = events_until(&mut socket, "response.done").await;
    assert!(
        events.iter().any(|e| e["type"] == "response.text.delta"),
        "{events:?}"
    );
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("the session ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("the close frame within 10 s");
    assert_eq!(close.map(|frame| u16::from(frame.code)), Some(1001));
    let log = stopping.await.unwrap();
    assert!(!log.contains("records lost"), "{log}");
    let records: Vec<Value> = std::fs::read_to_string(&audit)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}\n{log}");
    let record = &records[0];
    assert_eq!(record["OperationId"], "onhandshake", "{record}");
    assert_eq!(record["LastErrorReason"], "gateway_shutdown", "{record}");
    assert_eq!(record["Usage"]["TotalTokens"], 30, "{record}");
    // No response was running when it was closed.
    assert_eq!(record["ClientAborted"], false, "{record}");
}

/// The resident memory of this process, in bytes (Linux's `/proc/self/status`, `VmRSS`).
#[cfg(target_os = "linux")]
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// A session holds no more of what it relays than its record keeps: with the capture limit at
/// 0 (metadata only), 96 user messages of 1 MiB each leave the gateway's memory as it was
/// (before, each was held until the session ended: 96 MiB more), and the record keeps none of
/// them.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_session_holds_no_more_of_its_messages_than_its_record_keeps() {
    let (member_url, _seen) = realtime_member(None).await;
    let mut config = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    config.capture.max_request_body_bytes = 0;
    let gw = TestGateway::start(config).await;
    let mut socket = open_session(&gw.url).await;
    let megabyte = "A".repeat(1 << 20);
    let mut send_messages = async |count: usize| {
        for _ in 0..count {
            socket.send(user_message(&megabyte)).await.unwrap();
            let created = next_event(&mut socket).await;
            assert_eq!(created["type"], "conversation.item.created");
        }
    };
    // The buffers of each side are as large as they grow before the count begins.
    send_messages(8).await;
    let before = resident_bytes();
    send_messages(96).await;
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "the process grew by {} MiB over 96 MiB of messages",
        grown >> 20
    );
    socket.close(None).await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.request_messages, None);
    assert_eq!(record.backend_request_body, None);
    assert!(!record.request_body_truncated);
    assert_eq!(
        record.request_size,
        104 * user_message(&megabyte).len() as u64
    );
}

/// A client's message larger than the snapshot's `max_request_body_bytes` is not read whole nor
/// passed on: the session ends, the client told why (`body_too_large`) and closed with 1009
/// (message too big), the member's side closed, and the record says why. A message under the
/// limit passes.
#[tokio::test]
async fn a_message_over_the_request_body_limit_ends_its_session_with_1009() {
    let (member_url, seen) = realtime_member(None).await;
    let mut config = snapshot(1, realtime_pool(json!([member("voice", &member_url, 1)])));
    config.max_request_body_bytes = 64 * 1024;
    let gw = TestGateway::start(config).await;
    let mut socket = open_session(&gw.url).await;
    socket
        .send(user_message(&"A".repeat(32 * 1024)))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut socket).await["type"],
        "conversation.item.created"
    );
    socket
        .send(user_message(&"A".repeat(100 * 1024)))
        .await
        .unwrap();
    let error = next_event(&mut socket).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["error"]["code"], "body_too_large", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes"),
        "{error}"
    );
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("the close frame within 10 s");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1009, "{frame:?}");
        }
        other => panic!("not a close frame: {other:?}"),
    }
    member_sessions_ended(&seen, 1).await;
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.last_error_reason.as_deref(), Some("body_too_large"));
    assert!(!record.client_aborted);
}

/// A client event the gateway cannot judge is answered with an `error` event and never reaches
/// the member: a `type` given twice (skipped as audio by the first, run as a response by a
/// member that reads the last), a member given twice deeper in, text the gateway's parser does
/// not read (a lone surrogate other parsers take, nesting deeper than 128), JSON that is not an
/// object, a binary message that is not text. The session goes on: an audio append, told
/// without parsing, still reaches the member.
#[tokio::test]
async fn an_event_the_gateway_cannot_judge_never_reaches_the_member() {
    let (member_url, seen) = realtime_member(None).await;
    let gw = gateway_before(&member_url).await;
    let mut socket = open_session(&gw.url).await;
    let deep = format!(
        r#"{{"type":"response.create","event_id":"client_deep","response":{{"metadata":{}{}}}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let unjudged: Vec<(Message, &str, Value)> = vec![
        (
            Message::Text(
                r#"{"type":"input_audio_buffer.append","type":"response.create","event_id":"client_dup"}"#.into(),
            ),
            "duplicate_member",
            json!("client_dup"),
        ),
        (
            Message::Text(
                r#"{"type":"response.create","event_id":"client_deeper","response":{"tools":[{"type":"function","type":"mcp"}]}}"#.into(),
            ),
            "duplicate_member",
            json!("client_deeper"),
        ),
        (
            Message::Text(
                r#"{"type":"response.create","event_id":"client_sur","response":{"instructions":"\ud800"}}"#.into(),
            ),
            "invalid_json",
            Value::Null,
        ),
        (Message::Text(deep.into()), "invalid_json", Value::Null),
        (
            Message::Text(r#"[{"type":"response.create"}]"#.into()),
            "invalid_json",
            Value::Null,
        ),
        (
            Message::Binary(vec![0xff, 0xfe, b'{'].into()),
            "invalid_json",
            Value::Null,
        ),
    ];
    for (message, code, event_id) in unjudged {
        let shown = format!("{message:?}");
        socket.send(message).await.unwrap();
        let error = next_event(&mut socket).await;
        assert_eq!(error["type"], "error", "{shown}: {error}");
        assert_eq!(error["error"]["type"], "invalid_request_error", "{shown}");
        assert_eq!(error["error"]["code"], code, "{shown}: {error}");
        assert_eq!(error["error"]["event_id"], event_id, "{shown}: {error}");
    }
    // Still open, the fast path still taken by a plain append.
    speak_turns(&mut socket, 1).await;
    socket.send(user_message("still there?")).await.unwrap();
    assert_eq!(
        next_event(&mut socket).await["type"],
        "conversation.item.created"
    );
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 0);
    let record = gw.records(1).await.remove(0);
    // The one response the member ran: the spoken turn's.
    assert_eq!(record.usage.unwrap().total_tokens, 30);
}

/// A `response.create` refused by a token quota used up is answered with the quota's code and
/// message, not a rate limit's.
#[tokio::test]
async fn a_response_refused_by_a_quota_says_so() {
    let (member_url, seen) = realtime_member(None).await;
    // The first response's 30 tokens use up the 25 of the quota.
    let gw = quota_gateway(&member_url, 25).await;
    let mut socket = open_session(&gw.url).await;
    socket.send(response_create()).await.unwrap();
    events_until(&mut socket, "response.done").await;
    socket.send(response_create()).await.unwrap();
    let refusal = next_event(&mut socket).await;
    assert_eq!(refusal["type"], "error", "{refusal}");
    assert_eq!(
        refusal["error"]["code"], "token_quota_exceeded",
        "{refusal}"
    );
    assert_eq!(refusal["error"]["event_id"], "client_2");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(message.contains("quota"), "{message}");
    socket.close(None).await.unwrap();
    assert_eq!(seen.responses_asked.load(Ordering::SeqCst), 1);
}

/// A remote MCP tool's credentials in a session's configuration (`headers`, `authorization`)
/// reach the member as sent, and are redacted in the record: in the client's `session.update`
/// and `transcription_session.update` (`BackendRequestBody`) and in the member's
/// `session.updated` echo (`BackendResponseBody`).
#[tokio::test]
async fn a_sessions_mcp_credentials_reach_the_member_and_not_the_record() {
    let (member_url, _seen) = realtime_member(None).await;
    let gw = gateway_before(&member_url).await;
    let mut socket = open_session(&gw.url).await;
    let tools = json!([{
        "type": "mcp",
        "server_label": "tickets",
        "server_url": "https://mcp.example/sse",
        "headers": {"Authorization": "Bearer mcp-header-secret"},
        "authorization": "mcp-oauth-secret",
        "require_approval": "never"
    }]);
    for kind in ["session.update", "transcription_session.update"] {
        let update = json!({"type": kind, "event_id": "client_s", "session": {"instructions": "be brief", "tools": tools}});
        socket
            .send(Message::Text(update.to_string().into()))
            .await
            .unwrap();
        let echo = next_event(&mut socket).await;
        assert_eq!(echo["type"], kind.replace(".update", ".updated"));
        // The member had them as sent (and its echo reaches the client unchanged).
        assert_eq!(
            echo["session"]["tools"][0]["headers"]["Authorization"],
            "Bearer mcp-header-secret"
        );
        assert_eq!(
            echo["session"]["tools"][0]["authorization"],
            "mcp-oauth-secret"
        );
    }
    socket.close(None).await.unwrap();
    let record = gw.records(1).await.remove(0);
    let marker = gatehouse_gateway::body_credentials::REDACTED;
    for (side, kept) in [
        ("BackendRequestBody", record.backend_request_body.unwrap()),
        ("BackendResponseBody", record.backend_response_body.unwrap()),
    ] {
        for secret in ["mcp-header-secret", "mcp-oauth-secret"] {
            assert!(!kept.contains(secret), "{side}: {kept}");
        }
        assert_eq!(kept.matches(marker).count(), 4, "{side}: {kept}");
        assert!(kept.contains("https://mcp.example/sse"), "{side}: {kept}");
        assert!(kept.contains("be brief"), "{side}: {kept}");
    }
}
