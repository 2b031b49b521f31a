//! Streams reach the client as the backend sends them; the record still gets the whole answer.

use std::time::{Duration, Instant};

use futures::StreamExt;
use gatehouse_simulator::SimulatorConfig;
use serde_json::{Value, json};

use crate::harness::*;

async fn slow_gateway(
    delay_ms: u64,
    chunks: usize,
) -> (gatehouse_simulator::RunningSimulator, TestGateway) {
    let sim = simulator_with(SimulatorConfig {
        id: "slow".into(),
        chunk_delay: Duration::from_millis(delay_ms),
        stream_chunks: chunks,
        ..SimulatorConfig::default()
    })
    .await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("slow", &sim.url(), 1)]}]),
    ))
    .await;
    (sim, gw)
}

#[tokio::test]
async fn chunks_arrive_as_the_backend_sends_them() {
    chunks_arrive_as_sent(http::Version::HTTP_11).await;
}

/// An HTTP/2 answer goes through a task and a channel of its own (`stream_window`): its chunks
/// are not held back either.
#[tokio::test]
async fn chunks_arrive_as_the_backend_sends_them_over_http2() {
    chunks_arrive_as_sent(http::Version::HTTP_2).await;
}

/// A streamed chat call over `version`, answered over it.
async fn streamed_chat(gw: &TestGateway, version: http::Version) -> reqwest::Response {
    let response = gw
        .post_over(version, &chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), version);
    response
}

/// A call over `version`, whose chunks must reach the client ~100 ms apart, as the backend sends
/// them.
async fn chunks_arrive_as_sent(version: http::Version) {
    let (_sim, gw) = slow_gateway(100, 6).await;
    let response = streamed_chat(&gw, version).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(Instant::now());
        text.extend_from_slice(&chunk);
    }
    let gaps: Vec<u128> = arrivals
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    let spaced = gaps.iter().filter(|g| (60..=250).contains(*g)).count();
    assert!(
        spaced >= 5,
        "chunks must arrive ~100 ms apart, not all at the end: gaps {gaps:?}"
    );
    let text = String::from_utf8(text).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"));
}

/// Time to first token is the first event that carries output: not Azure's opening
/// prompt-filter event nor the role-only chunk, which the simulator sends at once, but its first
/// content, which it sends 300 ms later.
#[tokio::test]
async fn time_to_first_token_is_the_first_content_not_the_first_byte() {
    let (_sim, gw) = slow_gateway(300, 2).await;
    let response = streamed_chat(&gw, http::Version::HTTP_11).await;
    let body = response.text().await.unwrap();
    assert!(body.contains("prompt_filter_results"), "{body}");
    let record = gw.records(1).await.remove(0);
    let first_byte = record.time_to_first_byte.unwrap();
    let first_token = record.time_to_first_token.unwrap();
    assert!(first_token >= 300, "first token after {first_token} ms");
    assert!(
        first_byte < first_token,
        "first byte {first_byte} ms, first token {first_token} ms"
    );
}

/// Time to first token is a stream's: an answer sent whole (its output comes with its first
/// byte) has a first byte and no first token, a chat completion as embeddings.
#[tokio::test]
async fn an_answer_sent_whole_has_a_first_byte_and_no_first_token() {
    let (_sim, gw) = slow_gateway(0, 1).await;
    let chat = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    let record = gw.records(1).await.remove(0);
    assert!(record.usage.unwrap().completion_tokens > 0);
    assert!(record.time_to_first_byte.is_some());
    assert_eq!(record.time_to_first_token, None);

    let embeddings = gw
        .post("/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21")
        .json(&json!({"input": "a sentence"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 200);
    let record = gw.records(2).await.remove(1);
    assert!(record.time_to_first_byte.is_some());
    assert_eq!(record.time_to_first_token, None);
}

/// A gateway whose one Azure member answers every call with `content_type` and `body`, sent
/// chunked and ended 100 ms later (no `Content-Length`: the relay learns that the body is over
/// only when it ends).
async fn answering(content_type: &'static str, body: &'static str) -> TestGateway {
    let url = serve_stub(axum::Router::new().fallback(move || async move {
        let end = futures::stream::once(tokio::time::sleep(Duration::from_millis(100)))
            .filter_map(|()| async { None });
        let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(body)]).chain(end);
        (
            [(http::header::CONTENT_TYPE, content_type)],
            axum::body::Body::from_stream(chunks),
        )
    }))
    .await;
    TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("stub", &url, 1)]}]),
    ))
    .await
}

/// A stream whose first output is in a last event without its blank line (read only when the
/// body ends) still has a time to first token. The client asks for the usage chunk itself, so
/// the gateway passes the stream as it comes (it holds back nothing to filter).
#[tokio::test]
async fn output_in_a_last_event_without_its_blank_line_has_a_first_token() {
    let gw = answering(
        "text/event-stream",
        "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n\
         data: {\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}",
    )
    .await;
    let mut request = chat(None, true);
    request["stream_options"] = json!({"include_usage": true});
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    let record = gw.records(1).await.remove(0);
    let first_byte = record.time_to_first_byte.unwrap();
    assert!(record.time_to_first_token.unwrap() >= first_byte);
}

/// A call that asked for a stream and was answered whole, with its usage, is an answer sent
/// whole: no first token.
#[tokio::test]
async fn a_stream_asked_for_and_answered_whole_has_no_first_token() {
    let gw = answering(
        "application/json",
        r#"{"object":"chat.completion","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#,
    )
    .await;
    let response = streamed_chat(&gw, http::Version::HTTP_11).await;
    assert_eq!(response.status(), 200);
    response.text().await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert!(record.is_stream_completion);
    assert!(record.usage.is_some() && record.time_to_first_byte.is_some());
    assert_eq!(record.time_to_first_token, None);
}

#[tokio::test]
async fn the_record_holds_the_reassembled_completion_and_usage() {
    let (_sim, gw) = slow_gateway(0, 5).await;
    let mut request = chat(None, true);
    request["stream_options"] = json!({"include_usage": true});
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    // What the client read, put together.
    let mut client_text = String::new();
    let mut client_usage = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        if let Some(content) = chunk["choices"]
            .get(0)
            .and_then(|c| c["delta"]["content"].as_str())
        {
            client_text.push_str(content);
        }
        if chunk["usage"].is_object() {
            client_usage = Some(chunk["usage"].clone());
        }
    }
    let record = gw.records(1).await.remove(0);
    assert!(record.is_stream_completion);
    let stored: Value =
        serde_json::from_str(record.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(stored["object"], "chat.completion");
    assert_eq!(
        stored["choices"][0]["message"]["content"].as_str().unwrap(),
        client_text
    );
    let usage = record.usage.unwrap();
    let client_usage = client_usage.unwrap();
    assert_eq!(
        usage.prompt_tokens,
        client_usage["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage.completion_tokens,
        client_usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(!usage.is_estimate);
    assert!(record.time_to_first_byte.is_some());
    assert_eq!(record.response_size, body.len() as u64);
    assert!(
        record
            .request_messages
            .unwrap()
            .contains("capital of Norway")
    );
    assert!(record.response_messages.unwrap().contains(&client_text));
}

#[tokio::test]
async fn a_client_hang_up_ends_cleanly_and_the_record_is_still_complete() {
    client_hang_up(http::Version::HTTP_11).await;
}

/// On HTTP/2 a hang-up resets the stream, and the connection may stay: the answer's task sees
/// the stream go and lets the backend's answer be drained for the record.
#[tokio::test]
async fn an_http2_client_hang_up_ends_cleanly_and_the_record_is_still_complete() {
    client_hang_up(http::Version::HTTP_2).await;
}

/// A client over `version` that takes one chunk of a stream and goes.
async fn client_hang_up(version: http::Version) {
    let (sim, gw) = slow_gateway(50, 10).await;
    let response = streamed_chat(&gw, version).await;
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let record = gw.records(1).await.remove(0);
    assert!(record.client_aborted);
    let stored: Value =
        serde_json::from_str(record.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(
        stored["choices"][0]["finish_reason"], "stop",
        "the gateway read the backend to the end"
    );
    // The gateway keeps serving.
    let next = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(sim.hits(), 2);
}

#[tokio::test]
async fn bodies_over_the_capture_limit_are_cut_and_flagged() {
    let sim = simulator("capture").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    config.capture.max_request_body_bytes = 64;
    config.capture.max_response_body_bytes = 32;
    let gw = TestGateway::start(config).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let full: Value = response.json().await.unwrap();
    let record = gw.records(1).await.remove(0);
    assert!(record.request_body_truncated && record.response_body_truncated);
    assert_eq!(record.backend_request_body.unwrap().len(), 64);
    assert_eq!(record.backend_response_body.unwrap().len(), 32);
    // Usage is still read from the whole answer.
    assert_eq!(
        record.usage.unwrap().total_tokens,
        full["usage"]["total_tokens"].as_u64().unwrap()
    );

    // The messages are kept within the same limits (cut at a character), streamed or not.
    let long = json!({"messages": [{"role": "user", "content": "é".repeat(200)}]});
    for stream in [false, true] {
        let mut body = long.clone();
        body["stream"] = json!(stream);
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let records = gw.records(3).await;
    for record in &records[1..] {
        let prompt = record.request_messages.as_deref().unwrap();
        let completion = record.response_messages.as_deref().unwrap();
        assert!(prompt.len() <= 64 && prompt.len() >= 62, "{prompt}");
        assert!(
            prompt.starts_with("[{") && prompt.ends_with("éé"),
            "{prompt}"
        );
        assert!(completion.len() <= 32, "{completion}");
        assert!(record.request_body_truncated && record.response_body_truncated);
    }
}

#[tokio::test]
async fn metadata_only_capture_flags_nothing_as_cut() {
    let sim = simulator("capture-none").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    config.capture.max_request_body_bytes = 0;
    config.capture.max_response_body_bytes = 0;
    let gw = TestGateway::start(config).await;
    for stream in [false, true] {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, stream))
            .send()
            .await
            .unwrap();
        response.bytes().await.unwrap();
    }
    for record in gw.records(2).await {
        assert!(!record.request_body_truncated && !record.response_body_truncated);
        assert!(record.backend_request_body.is_none() && record.backend_response_body.is_none());
        assert!(record.request_messages.is_none() && record.response_messages.is_none());
        assert!(record.usage.is_some(), "usage is still read");
    }
}

#[tokio::test]
async fn shutdown_drains_a_stream_in_flight_and_refuses_new_calls() {
    let (_sim, gw) = slow_gateway(60, 8).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    gw.listening.shutdown(Duration::from_secs(10));
    let body = response
        .text()
        .await
        .expect("the stream in flight completes");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
}

#[tokio::test]
async fn metrics_count_calls_tokens_attempts_and_member_state() {
    let (sim, gw) = slow_gateway(0, 3).await;
    let streamed = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    streamed.text().await.unwrap();
    sim.set_fault(gatehouse_simulator::Fault::Throttle {
        hint: gatehouse_simulator::RetryHint::RetryAfterSeconds(30),
        times: None,
    });
    let throttled = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), 429);
    gw.records(2).await;
    let text = gw.metrics().await;
    for needle in [
        r#"gatehouse_requests_total{operation="chatcompletions_create",deployment="gpt-4o",backend="slow",status="200"} 1"#,
        r#"gatehouse_requests_total{operation="chatcompletions_create",deployment="gpt-4o",backend="slow",status="429"} 1"#,
        r#"gatehouse_backend_attempts_total{backend="slow",outcome="throttled"} 1"#,
        r#"gatehouse_backend_available{pool="p",backend="slow"} 0"#,
        r#"gatehouse_tokens_total{deployment="gpt-4o",kind="prompt"}"#,
        "gatehouse_request_duration_seconds_bucket",
        // The streamed call sent output; the throttled one none.
        r#"gatehouse_time_to_first_token_seconds_count{operation="chatcompletions_create"} 1"#,
        "gatehouse_config_version 1",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}

/// A stub that answers an Assistants run with the run stream fixture, and a chat call with a
/// stream of events in no shape the gateway knows.
async fn stream_shapes_backend() -> String {
    use axum::response::IntoResponse as _;
    let sse = |body: &'static str| {
        ([(http::header::CONTENT_TYPE, "text/event-stream")], body).into_response()
    };
    let app = axum::Router::new()
        .route(
            "/openai/threads/{thread}/runs",
            axum::routing::post(move || async move {
                sse(include_str!("../fixtures/azure/assistants-run-stream.sse"))
            }),
        )
        .route(
            "/openai/threads/{thread}/runs/{run}/submit_tool_outputs",
            axum::routing::post(move || async move {
                sse(include_str!("../fixtures/azure/assistants-run-stream.sse"))
            }),
        )
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            axum::routing::post(move || async move { sse(UNKNOWN_STREAM) }),
        );
    serve_stub(app).await
}

const UNKNOWN_STREAM: &str = "event: note\ndata: {\"note\": \"first\"}\n\n: a comment\nevent: note\ndata: {\"note\": \"second\"}\n\n";

/// A streamed Assistants run is recorded as its run and the messages it wrote, with the run's
/// usage; a stream of a shape the gateway does not know keeps its events as they came. Both reach
/// the client unchanged.
#[tokio::test]
async fn assistants_runs_and_unknown_streams_are_kept_on_record() {
    let backend = stream_shapes_backend().await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true,
                "members": [member("a", &backend, 1)]}]),
    ))
    .await;
    let run = gw
        .post("/openai/threads/thread_abc123/runs?api-version=2024-05-01-preview")
        .json(&json!({"assistant_id": "asst_abc123", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 200);
    let received = run.text().await.unwrap();
    assert_eq!(
        received,
        include_str!("../fixtures/azure/assistants-run-stream.sse")
    );
    let chat = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.text().await.unwrap(), UNKNOWN_STREAM);
    // A run that stopped for a tool goes on with its outputs: the stream that carries it to its
    // end carries the run's usage, which is on that call's record (the first stream's ended at
    // `requires_action`, with none).
    let submitted = gw
        .post("/openai/threads/thread_abc123/runs/run_abc123/submit_tool_outputs?api-version=2024-05-01-preview")
        .json(&json!({"tool_outputs": [{"tool_call_id": "call_1", "output": "paid"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 200);
    let _ = submitted.text().await.unwrap();

    let records = gw.records(3).await;
    let of = |operation| {
        records
            .iter()
            .find(|record| record.operation_id == Some(operation))
            .unwrap()
    };
    use gatehouse_schema::OperationId;
    let submitted = of(OperationId::SubmitToolOutputsToRun);
    assert_eq!(
        submitted.usage.as_ref().map(|usage| usage.total_tokens),
        Some(142),
        "{submitted:?}"
    );
    let run = of(OperationId::CreateRun);
    let body: Value = serde_json::from_str(run.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(
        (body["object"].as_str(), body["status"].as_str()),
        (Some("thread.run"), Some("completed"))
    );
    let usage = run.usage.as_ref().unwrap();
    assert_eq!((usage.total_tokens, usage.is_estimate), (142, false));
    assert_eq!(run.model_name.as_deref(), Some("gpt-4o"));
    let messages: Value = serde_json::from_str(run.response_messages.as_deref().unwrap()).unwrap();
    assert_eq!(
        messages[0]["content"][0]["text"]["value"],
        "Invoice 42 was paid on 3 March."
    );
    let unknown = of(OperationId::ChatCompletionsCreate);
    assert_eq!(
        unknown.backend_response_body.as_deref(),
        Some(UNKNOWN_STREAM)
    );
    assert!(!unknown.response_body_truncated);
}
