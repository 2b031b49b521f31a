//! Token usage: exact when the backend reports it (the gateway asks a stream for its usage chunk
//! and hides that chunk from the client), estimated with the model's tokenizer otherwise.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use gatehouse_gateway::usage::{Encoding, TokenWork};
use gatehouse_schema::OperationId;
use gatehouse_simulator::{RunningSimulator, SimulatorConfig};
use serde_json::{Value, json};

use crate::harness::*;

async fn azure_gateway(sim: &RunningSimulator) -> TestGateway {
    TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await
}

fn chat_path_at(api_version: &str) -> String {
    format!("/openai/deployments/gpt-4o/chat/completions?api-version={api_version}")
}

/// The `data:` payloads of an SSE body, in order.
fn data_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// The usage object of a stream's usage chunk, if it has one.
fn usage_chunk(body: &str) -> Option<Value> {
    data_events(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["usage"].is_object())
        .map(|c| c["usage"].clone())
}

/// The first non-empty `id` and its `created` of a chat stream (the simulator makes them per call).
fn id_and_created(body: &str) -> (String, u64) {
    data_events(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["id"].as_str().is_some_and(|id| !id.is_empty()))
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["created"].as_u64().unwrap(),
            )
        })
        .unwrap()
}

/// `body` with another call's id and timestamp, so two calls' streams can be compared byte for byte.
fn as_if_from(body: &str, other: &str) -> String {
    let (id, created) = id_and_created(body);
    let (other_id, other_created) = id_and_created(other);
    body.replace(&id, &other_id).replace(
        &format!("\"created\":{created}"),
        &format!("\"created\":{other_created}"),
    )
}

/// Calls the simulator directly, as a client of Azure without the gateway would.
async fn direct(sim: &RunningSimulator, path: &str, body: &Value) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}{path}", sim.url()))
        .json(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_azure_stream_gets_its_usage_chunk_asked_for_and_hidden_from_the_client() {
    let sim = simulator("azure").await;
    let gw = azure_gateway(&sim).await;
    let path = chat_path_at("2024-10-21");
    let request = chat(None, true);
    let client_body = gw
        .post(&path)
        .json(&request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // The gateway asked for the usage chunk.
    let seen = sim.requests().pop().unwrap().json().unwrap();
    assert_eq!(seen["stream_options"], json!({"include_usage": true}));
    assert_eq!(seen["messages"], request["messages"]);

    // The client read exactly what Azure sends a request without the option.
    let without_gateway = direct(&sim, &path, &request).await;
    assert_eq!(usage_chunk(&without_gateway), None);
    assert_eq!(usage_chunk(&client_body), None, "{client_body}");
    assert_eq!(as_if_from(&client_body, &without_gateway), without_gateway);

    // The record has the backend's own counts.
    let mut asking = request.clone();
    asking["stream_options"] = json!({"include_usage": true});
    let reported = usage_chunk(&direct(&sim, &path, &asking).await).unwrap();
    let record = gw.records(1).await.remove(0);
    let usage = record.usage.unwrap();
    assert!(!usage.is_estimate);
    assert_eq!(
        usage.prompt_tokens,
        reported["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage.completion_tokens,
        reported["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage.total_tokens,
        reported["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(record.response_size, client_body.len() as u64);
    let stored: Value =
        serde_json::from_str(record.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(stored["usage"]["total_tokens"], reported["total_tokens"]);
}

#[tokio::test]
async fn azure_v1_routes_and_legacy_completions_are_asked_too() {
    let sim = simulator("azure-v1").await;
    let gw = azure_gateway(&sim).await;
    let mut request = chat(Some("gpt-4o"), true);
    // An existing `stream_options` object is merged into, not replaced.
    request["stream_options"] = json!({"include_obfuscation": false});
    let body = gw
        .post("/openai/v1/chat/completions")
        .json(&request)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(usage_chunk(&body), None);
    let seen = sim.requests().pop().unwrap().json().unwrap();
    assert_eq!(
        seen["stream_options"],
        json!({"include_obfuscation": false, "include_usage": true})
    );

    let body = gw
        .post("/openai/deployments/gpt-4o/completions?api-version=2025-04-01-preview")
        .json(&json!({"prompt": "Say hi", "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(usage_chunk(&body), None);
    assert!(body.trim_end().ends_with("data: [DONE]"));
    let seen = sim.requests().pop().unwrap().json().unwrap();
    assert_eq!(seen["stream_options"]["include_usage"], true);

    let records = gw.records(2).await;
    for record in &records {
        let usage = record.usage.unwrap();
        assert!(!usage.is_estimate && usage.total_tokens > 0, "{usage:?}");
    }
}

#[tokio::test]
async fn an_api_version_without_include_usage_is_not_asked_and_the_record_is_estimated() {
    let sim = simulator("old-azure").await;
    let gw = azure_gateway(&sim).await;
    let path = chat_path_at("2024-06-01");
    let request = chat(None, true);
    let sent = serde_json::to_vec(&request).unwrap();
    let client_body = gw
        .post(&path)
        .header("content-type", "application/json")
        .body(sent.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // The backend got the client's bytes, without `stream_options`.
    let seen = sim.requests().pop().unwrap();
    assert_eq!(seen.body.as_ref(), sent.as_slice());
    assert!(seen.json().unwrap().get("stream_options").is_none());
    assert_eq!(usage_chunk(&client_body), None);

    let record = gw.records(1).await.remove(0);
    let usage = record.usage.unwrap();
    assert!(usage.is_estimate);
    // The cookbook count of the two messages with o200k_base (gpt-4o): 3 + 1 + 4 per message,
    // give or take, and 3 for the reply; the simulator's four-characters-a-token says 11.
    assert!(
        (15..=30).contains(&usage.prompt_tokens),
        "prompt tokens {}",
        usage.prompt_tokens
    );
    let expected = TokenWork::plan(
        OperationId::ChatCompletionsCreate,
        Some(&request),
        None,
        Some("gpt-4o"),
    )
    .unwrap()
    .count();
    assert_eq!(usage.prompt_tokens, expected.prompt_tokens);
    // The completion is the streamed text, counted.
    let text: String = data_events(&client_body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|choice| choice["delta"]["content"].as_str().map(str::to_owned))
        })
        .collect();
    assert!(text.contains("capital of Norway"), "{text}");
    assert_eq!(
        usage.completion_tokens,
        Encoding::O200kBase.count(&text),
        "{text}"
    );
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
}

#[tokio::test]
async fn a_client_that_asks_for_usage_itself_still_receives_the_chunk() {
    let sim = simulator("asks").await;
    let gw = azure_gateway(&sim).await;
    let path = chat_path_at("2024-10-21");
    let mut request = chat(None, true);
    request["stream_options"] = json!({"include_usage": true});
    let sent = serde_json::to_vec(&request).unwrap();
    let client_body = gw
        .post(&path)
        .header("content-type", "application/json")
        .body(sent.clone())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sim.requests().pop().unwrap().body.as_ref(), sent.as_slice());
    let events = data_events(&client_body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    let reported = usage_chunk(&client_body).unwrap();
    let usage = gw.records(1).await.remove(0).usage.unwrap();
    assert!(!usage.is_estimate);
    assert_eq!(
        usage.total_tokens,
        reported["total_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn a_client_hang_up_mid_stream_still_gets_a_record_with_exact_usage() {
    let sim = simulator_with(SimulatorConfig {
        id: "slow".into(),
        chunk_delay: Duration::from_millis(50),
        stream_chunks: 10,
        ..SimulatorConfig::default()
    })
    .await;
    let gw = azure_gateway(&sim).await;
    let response = gw
        .post(&chat_path_at("2024-10-21"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let record = gw.records(1).await.remove(0);
    assert!(record.client_aborted);
    let usage = record.usage.unwrap();
    assert!(
        !usage.is_estimate,
        "the gateway read the backend to its usage chunk"
    );
    assert!(usage.prompt_tokens > 0 && usage.completion_tokens > 0);
    let stored: Value =
        serde_json::from_str(record.backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(stored["choices"][0]["finish_reason"], "stop");
}

/// The chunks OpenAI streams for "Oslo is the capital.", with and without `include_usage`:
/// with it, every chunk carries `"usage":null` (last) and a usage chunk precedes `[DONE]`.
fn openai_stream(include_usage: bool) -> Vec<String> {
    let chunk = |choices: Value| {
        json!({"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_x", "choices": choices})
        .to_string()
    };
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut chunks = vec![chunk(delta(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ))];
    for piece in ["Oslo", " is", " the capital."] {
        chunks.push(chunk(delta(json!({"content": piece}), Value::Null)));
    }
    chunks.push(chunk(delta(json!({}), json!("stop"))));
    let mut events: Vec<String> = chunks
        .into_iter()
        .map(|c| {
            if include_usage {
                let open = c.strip_suffix('}').unwrap();
                format!("data: {open},\"usage\":null}}\n\n")
            } else {
                format!("data: {c}\n\n")
            }
        })
        .collect();
    if include_usage {
        let usage = chunk(json!([]));
        let open = usage.strip_suffix('}').unwrap();
        events.push(format!(
            "data: {open},\"usage\":{{\"prompt_tokens\":21,\"completion_tokens\":5,\"total_tokens\":26,\"prompt_tokens_details\":{{\"cached_tokens\":16}},\"completion_tokens_details\":{{\"reasoning_tokens\":0}}}}}}\n\n"
        ));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

/// An answer of server-sent `events`, then whatever `after` yields before the body ends.
fn event_stream(
    events: Vec<String>,
    after: impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    let events = events
        .into_iter()
        .map(|e| Ok::<_, Infallible>(Bytes::from(e)));
    Response::builder()
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(Body::from_stream(
            futures::stream::iter(events).chain(after),
        ))
        .unwrap()
}

/// A backend that answers like OpenAI: streams per [`openai_stream`], and non-streamed answers
/// without any `usage` (as some OpenAI-compatible servers do).
async fn openai_backend() -> String {
    sse_backend(openai_stream).await
}

/// An OpenAI-style backend: a plain answer to a call that does not stream, else the events
/// `stream` gives (told whether the call asked for the usage chunk).
async fn sse_backend(stream: fn(bool) -> Vec<String>) -> String {
    let app = axum::Router::new().fallback(move |body: Bytes| async move {
        let request: Value = serde_json::from_slice(&body).unwrap();
        if !request["stream"].as_bool().unwrap_or(false) {
            return axum::Json(json!({
                "id": "chatcmpl-plain", "object": "chat.completion", "created": 1_700_000_000,
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Oslo is the capital."}}],
            }))
            .into_response();
        }
        let include_usage = request["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        event_stream(stream(include_usage), futures::stream::empty())
    });
    serve_stub(app).await
}

#[tokio::test]
async fn openai_members_are_asked_too_and_the_client_sees_openai_framing_unchanged() {
    let url = openai_backend().await;
    let gw = openai_gateway(&url).await;
    let client_body = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(client_body, openai_stream(false).concat());
    let usage = gw.records(1).await.remove(0).usage.unwrap();
    assert!(!usage.is_estimate);
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cached_tokens
        ),
        (21, 5, 26, 16)
    );
}

#[tokio::test]
async fn a_non_streamed_answer_without_usage_is_estimated() {
    let url = openai_backend().await;
    let gw = openai_gateway(&url).await;
    let response = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer.get("usage").is_none(),
        "the client's answer is untouched"
    );
    let usage = gw.records(1).await.remove(0).usage.unwrap();
    assert!(usage.is_estimate);
    assert_eq!(
        usage.completion_tokens,
        Encoding::O200kBase.count("Oslo is the capital.")
    );
    assert!(usage.prompt_tokens > 0);
}

/// An answer too large to parse whole (an embeddings batch of thousands of vectors, ~9 MB here)
/// still gives its exact usage and model, read from its end.
#[tokio::test]
async fn a_huge_embeddings_answer_keeps_its_exact_usage_and_model() {
    let vector = format!("[{}]", vec!["-0.012345678"; 3072].join(","));
    let data = (0..240)
        .map(|i| format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#))
        .collect::<Vec<_>>()
        .join(",");
    let answer = format!(
        r#"{{"object":"list","data":[{data}],"model":"text-embedding-3-large","usage":{{"prompt_tokens":4812,"total_tokens":4812}}}}"#
    );
    assert!(answer.len() > 8 * 1024 * 1024, "{} bytes", answer.len());
    let url = serve_stub(axum::Router::new().route(
        "/openai/deployments/{deployment}/embeddings",
        axum::routing::post(move || {
            let answer = answer.clone();
            async move { ([("content-type", "application/json")], answer) }
        }),
    ))
    .await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["embed"], "members": [member("a", &url, 1)]}]),
    ))
    .await;
    let response = gw
        .post("/openai/deployments/embed/embeddings?api-version=2024-10-21")
        .json(&json!({"input": vec!["a sentence to embed"; 240]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let received = response.bytes().await.unwrap();
    assert!(received.len() > 8 * 1024 * 1024);
    let record = gw.records(1).await.remove(0);
    let usage = record.usage.unwrap();
    assert!(
        !usage.is_estimate,
        "the backend's own count, not an estimate"
    );
    assert_eq!((usage.prompt_tokens, usage.total_tokens), (4812, 4812));
    assert_eq!(record.model_name.as_deref(), Some("text-embedding-3-large"));
}

/// With the usage chunk taken out, everything else reaches the client byte for byte: keep-alive
/// comments, an event without data, CRLF line ends, and a last event the backend did not close
/// with a blank line.
#[tokio::test]
async fn with_the_usage_chunk_taken_out_every_other_byte_reaches_the_client_as_sent() {
    fn stream(include_usage: bool) -> Vec<String> {
        let mut events = openai_stream(include_usage);
        // `data: [DONE]\n\n` comes last: send it without its blank line.
        let done = events.pop().unwrap();
        assert_eq!(done, "data: [DONE]\n\n");
        events.insert(0, ": keep-alive\r\n\r\n".to_owned());
        events.insert(2, "event: ping\n\n".to_owned());
        events.push("data: [DONE]\n".to_owned());
        events
    }
    let url = sse_backend(stream).await;
    let gw = openai_gateway(&url).await;
    let client_body = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(client_body, stream(false).concat());
    let record = gw.records(1).await.remove(0);
    let usage = record.usage.unwrap();
    assert!(!usage.is_estimate);
    assert_eq!(usage.total_tokens, 26);
}

/// A client that stops reading at `[DONE]`, while the member has not closed its body yet (its
/// last chunk or HTTP/2 `END_STREAM` comes later), had the whole answer: the record does not say
/// it aborted.
#[tokio::test]
async fn a_client_that_leaves_after_done_did_not_abort() {
    let app = axum::Router::new().fallback(|| async {
        // With the usage chunk the gateway asks an OpenAI member for; the body ends two seconds
        // after `[DONE]`.
        let late_end = futures::stream::once(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, Infallible>(Bytes::new())
        });
        event_stream(openai_stream(true), late_end)
    });
    let url = serve_stub(app).await;
    let gw = openai_gateway(&url).await;
    let response = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    while !received.ends_with(b"data: [DONE]\n\n") {
        received.extend_from_slice(&stream.next().await.unwrap().unwrap());
    }
    drop(stream);
    let record = gw.records(1).await.remove(0);
    assert!(!record.client_aborted, "the client had the whole answer");
    assert!(!record.usage.unwrap().is_estimate);
}

/// An OpenAI-compatible member that refuses `stream_options` (as Azure did before
/// `2024-09-01-preview`: "Unrecognized request argument supplied: stream_options") fails every
/// stream when asked; configured `stream_usage: false`, it is not asked, its streams reach the
/// client as sent and their tokens are estimated.
#[tokio::test]
async fn a_member_that_refuses_stream_options_can_be_left_unasked() {
    let app = axum::Router::new().fallback(|body: Bytes| async move {
        let request: Value = serde_json::from_slice(&body).unwrap();
        if request.get("stream_options").is_some() {
            let refusal = json!({"error": {"message": "Unrecognized request argument supplied: stream_options",
                                           "type": "invalid_request_error", "param": null, "code": null}});
            return (axum::http::StatusCode::BAD_REQUEST, axum::Json(refusal)).into_response();
        }
        event_stream(openai_stream(false), futures::stream::empty())
    });
    let url = serve_stub(app).await;
    for (stream_usage, status) in [(true, 400), (false, 200)] {
        let gw = TestGateway::start(snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "members": [
                {"id": "compat", "kind": "openai", "endpoint": format!("{url}/v1"), "priority": 1,
                 "weight": 1, "stream_usage": stream_usage},
            ]}]),
        ))
        .await;
        let response = gw
            .post("/v1/chat/completions")
            .json(&chat(Some("gpt-4o"), true))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "stream_usage: {stream_usage}");
        if status == 200 {
            assert_eq!(
                response.text().await.unwrap(),
                openai_stream(false).concat()
            );
            let usage = gw.records(1).await.remove(0).usage.unwrap();
            assert!(usage.is_estimate, "counted with the tokenizer");
        }
    }
}
