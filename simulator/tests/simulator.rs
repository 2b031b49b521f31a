//! The simulator over real sockets, called the way the gateway and the SDKs call it.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers too: any unexpected error fails the test"
)]

use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use futures::StreamExt as _;
use gatehouse_simulator::{Fault, RetryHint, RunningSimulator, Simulator, SimulatorConfig};
use serde_json::{Value, json};

const API_VERSION: &str = "api-version=2024-10-21";

async fn start(config: SimulatorConfig) -> RunningSimulator {
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn start_named(id: &str) -> RunningSimulator {
    start(SimulatorConfig {
        id: id.to_owned(),
        ..SimulatorConfig::default()
    })
    .await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_json(url: String, body: Value) -> reqwest::Response {
    client().post(url).json(&body).send().await.unwrap()
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "When is the quarterly report due, and to whom?"}
        ],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// A multipart/form-data body with text fields and one `file` part.
fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "gatehouse-test-boundary";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some((filename, bytes)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_multipart(
    url: String,
    fields: &[(&str, &str)],
    file: Option<(&str, &[u8])>,
) -> reqwest::Response {
    let (content_type, body) = multipart(fields, file);
    client()
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.unwrap();
    let error = body["error"].clone();
    for key in ["code", "message", "type", "param"] {
        assert!(error.get(key).is_some(), "error body lacks {key}: {body}");
    }
    error
}

// ---------------------------------------------------------------- chat

#[tokio::test]
async fn chat_answers_on_every_route_style_with_usage() {
    let sim = start_named("sim-chat").await;
    let url = sim.url();
    for (route, model) in [
        (format!("{url}/v1/chat/completions"), "gpt-4o"),
        (format!("{url}/openai/v1/chat/completions"), "gpt-4o"),
        (
            format!("{url}/openai/deployments/my-deployment/chat/completions?{API_VERSION}"),
            "my-deployment",
        ),
    ] {
        let response = post_json(route.clone(), chat_body(false, false)).await;
        assert_eq!(response.status(), 200, "{route}");
        assert_eq!(response.headers()["x-gatehouse-simulator"], "sim-chat");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], model, "{route}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "Simulated answer to: When is the quarterly report due, and to"
        );
        let usage = &body["usage"];
        // 14 + 46 characters of messages ≈ 15 tokens; the 61-character answer ≈ 16 tokens.
        assert_eq!(usage["prompt_tokens"], 15);
        assert_eq!(usage["completion_tokens"], 16);
        assert_eq!(usage["total_tokens"], 31);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
    }
    assert_eq!(sim.hits(), 3);
}

#[tokio::test]
async fn classic_routes_need_api_version_and_unknown_routes_404() {
    let sim = start_named("sim-404").await;
    let url = sim.url();
    for route in [
        format!("{url}/openai/deployments/d/chat/completions"),
        format!("{url}/openai/deployments/d/unknown?{API_VERSION}"),
        format!("{url}/v2/chat/completions"),
    ] {
        let response = post_json(route.clone(), chat_body(false, false)).await;
        assert_eq!(response.status(), 404, "{route}");
        let error = error_of(response).await;
        assert_eq!(error["code"], "404");
        assert_eq!(error["message"], "Resource not found");
    }
}

#[tokio::test]
async fn malformed_json_and_missing_fields_are_azure_shaped_400s() {
    let sim = start_named("sim-400").await;
    let response = client()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .header("content-type", "application/json")
        .body("{\"model\": \"gpt-4o\", \"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["code"], "400");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("parse the JSON body")
    );

    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        json!({"model": "m"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(response).await["param"], "messages");

    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(response).await["param"], "model");
}

#[tokio::test]
async fn stream_sends_azure_framing_and_usage_only_when_asked() {
    let sim = start_named("sim-stream").await;
    let non_stream: Value = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(false, false),
    )
    .await
    .json()
    .await
    .unwrap();
    for include_usage in [false, true] {
        let response = post_json(
            format!(
                "{}/openai/deployments/d/chat/completions?{API_VERSION}",
                sim.url()
            ),
            chat_body(true, include_usage),
        )
        .await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let data = sse_data(&response.text().await.unwrap());
        assert_eq!(data.last().unwrap(), "[DONE]");
        let events: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        // First event: Azure's prompt filter verdict with empty choices and ids.
        assert_eq!(events[0]["choices"], json!([]));
        assert_eq!(events[0]["id"], "");
        assert!(events[0]["prompt_filter_results"][0]["content_filter_results"].is_object());
        let contents: Vec<&Value> = events
            .iter()
            .filter(|e| {
                e["choices"][0]["delta"].get("content").is_some()
                    && e["choices"][0]["delta"].get("role").is_none()
            })
            .collect();
        assert_eq!(contents.len(), 5, "stream_chunks defaults to 5");
        let text: String = contents
            .iter()
            .map(|e| e["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(text, non_stream["choices"][0]["message"]["content"]);
        let finish: Vec<&Value> = events
            .iter()
            .filter(|e| e["choices"][0]["finish_reason"] == "stop")
            .collect();
        assert_eq!(finish.len(), 1);
        let usage_chunks: Vec<&Value> =
            events.iter().filter(|e| e.get("usage").is_some()).collect();
        if include_usage {
            assert_eq!(usage_chunks.len(), 1);
            let last = events.last().unwrap();
            assert_eq!(last["choices"], json!([]));
            assert_eq!(last["usage"], non_stream["usage"]);
        } else {
            assert!(
                usage_chunks.is_empty(),
                "usage chunk sent without include_usage"
            );
        }
    }
}

#[tokio::test]
async fn stream_chunks_arrive_one_by_one_with_the_delay_between_them() {
    let sim = start(SimulatorConfig {
        id: "sim-slow".into(),
        chunk_delay: Duration::from_millis(100),
        stream_chunks: 4,
        ..SimulatorConfig::default()
    })
    .await;
    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(true, false),
    )
    .await;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut content_times = Vec::new();
    while let Some(frame) = body.next().await {
        buffer.push_str(std::str::from_utf8(&frame.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if event.contains("\"content\":\"") && !event.contains("\"role\"") {
                content_times.push(Instant::now());
            }
        }
    }
    assert_eq!(content_times.len(), 4);
    let gaps: Vec<Duration> = content_times.windows(2).map(|p| p[1] - p[0]).collect();
    for gap in &gaps {
        // 100 ms apart when sent; a busy test machine may deliver one a little late.
        assert!(
            *gap >= Duration::from_millis(80),
            "chunks only {gap:?} apart: {gaps:?}"
        );
    }
}

#[tokio::test]
async fn broken_stream_stops_without_done() {
    let sim = start_named("sim-break").await;
    sim.set_fault(Fault::BreakStreamAfter { chunks: 3 });
    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(true, true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = String::new();
    let mut failed = false;
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => received.push_str(std::str::from_utf8(&bytes).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body ended cleanly");
    assert_eq!(sse_data(&received).len(), 3);
    assert!(!received.contains("[DONE]"));

    // Non-streamed answers are unaffected.
    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(false, false),
    )
    .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn stalled_stream_sends_its_events_then_falls_silent_with_the_connection_open() {
    let sim = start_named("sim-stall").await;
    let set = post_json(
        format!("{}/_simulator/fault", sim.url()),
        json!({"kind": "stall_stream_after", "chunks": 2}),
    )
    .await;
    assert_eq!(set.status(), 200);
    assert_eq!(sim.fault(), Fault::StallStreamAfter { chunks: 2 });
    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(true, true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while sse_data(&received).len() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the first two events arrive");
        received.push_str(std::str::from_utf8(&frame.unwrap().unwrap()).unwrap());
    }
    // Nothing more, and no end either: the stream neither breaks nor completes.
    let next = tokio::time::timeout(Duration::from_millis(500), body.next()).await;
    assert!(next.is_err(), "the stream went on: {next:?}");
    assert_eq!(sse_data(&received).len(), 2);
    assert!(!received.contains("[DONE]"));

    // Non-streamed answers are unaffected.
    let response = post_json(
        format!("{}/v1/chat/completions", sim.url()),
        chat_body(false, false),
    )
    .await;
    assert_eq!(response.status(), 200);
}

// ---------------------------------------------------------------- faults, auth, counting

#[tokio::test]
async fn throttle_sends_each_hint_header() {
    let sim = start_named("sim-429").await;
    let date = SystemTime::now() + Duration::from_secs(30);
    let cases = [
        (
            RetryHint::RetryAfterMs(1500),
            Some(("retry-after-ms", "1500".to_owned())),
            2,
        ),
        (
            RetryHint::RetryAfterSeconds(7),
            Some(("retry-after", "7".to_owned())),
            7,
        ),
        (
            RetryHint::RetryAfterHttpDate(date),
            Some(("retry-after", httpdate::fmt_http_date(date))),
            30,
        ),
        (
            RetryHint::RateLimitResetRequests("6m0s".into()),
            Some(("x-ratelimit-reset-requests", "6m0s".to_owned())),
            360,
        ),
        (
            RetryHint::RateLimitResetTokens("250ms".into()),
            Some(("x-ratelimit-reset-tokens", "250ms".to_owned())),
            1,
        ),
        (RetryHint::None, None, 1),
    ];
    for (hint, header, seconds) in cases {
        sim.set_fault(Fault::Throttle {
            hint: hint.clone(),
            times: Some(1),
        });
        let response = post_json(
            format!("{}/v1/chat/completions", sim.url()),
            chat_body(false, false),
        )
        .await;
        assert_eq!(response.status(), 429, "{hint:?}");
        let hint_headers: Vec<&str> = [
            "retry-after-ms",
            "retry-after",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        ]
        .into_iter()
        .filter(|name| response.headers().contains_key(*name))
        .collect();
        match &header {
            Some((name, value)) => {
                assert_eq!(hint_headers, vec![*name], "{hint:?}");
                assert_eq!(response.headers()[*name].to_str().unwrap(), value);
            }
            None => assert!(hint_headers.is_empty()),
        }
        let error = error_of(response).await;
        assert_eq!(error["code"], "429");
        let message = error["message"].as_str().unwrap();
        // An HTTP date has second resolution: allow one second less.
        assert!(
            message == format!("Rate limit is exceeded. Try again in {seconds} seconds.")
                || message
                    == format!(
                        "Rate limit is exceeded. Try again in {} seconds.",
                        seconds - 1
                    ),
            "{message}"
        );
        // `times: Some(1)` lets the next request through.
        let response = post_json(
            format!("{}/v1/chat/completions", sim.url()),
            chat_body(false, false),
        )
        .await;
        assert_eq!(response.status(), 200, "{hint:?}");
    }
    assert_eq!(sim.fault(), Fault::None);
}

#[tokio::test]
async fn server_error_fault_counts_down_and_can_be_switched_over_http() {
    let sim = start_named("sim-500").await;
    let control = format!("{}/_simulator/fault", sim.url());
    let chat = format!("{}/openai/v1/chat/completions", sim.url());

    let set = post_json(
        control.clone(),
        json!({"kind": "server_error", "status": 503, "times": 2}),
    )
    .await;
    assert_eq!(set.status(), 200);
    for _ in 0..2 {
        let response = post_json(chat.clone(), chat_body(false, false)).await;
        assert_eq!(response.status(), 503);
        assert_eq!(error_of(response).await["code"], "503");
    }
    assert_eq!(
        post_json(chat.clone(), chat_body(false, false))
            .await
            .status(),
        200
    );

    post_json(
        control.clone(),
        json!({"kind": "throttle", "retry_after_ms": 2000}),
    )
    .await;
    for _ in 0..3 {
        let response = post_json(chat.clone(), chat_body(false, false)).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after-ms"], "2000");
    }
    post_json(control.clone(), json!({"kind": "none"})).await;
    assert_eq!(
        post_json(chat.clone(), chat_body(false, false))
            .await
            .status(),
        200
    );

    let refused = post_json(control, json!({"kind": "server_error", "status": 404})).await;
    assert_eq!(refused.status(), 400);

    let stats: Value = client()
        .get(format!("{}/_simulator/stats", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["id"], "sim-500");
    assert_eq!(stats["hits"], 7, "control routes are not counted");
    assert_eq!(stats["fault"], json!({"kind": "none"}));
}

#[tokio::test]
async fn hits_and_recorded_requests() {
    let sim = start_named("sim-count").await;
    assert_eq!(sim.hits(), 0);
    client()
        .post(format!(
            "{}/openai/deployments/d/embeddings?{API_VERSION}",
            sim.url()
        ))
        .header("api-key", "k1")
        .header("X-Custom", "Value")
        .json(&json!({"input": "hello"}))
        .send()
        .await
        .unwrap();
    client()
        .get(format!("{}/v1/models", sim.url()))
        .send()
        .await
        .unwrap();
    client()
        .get(format!("{}/nowhere", sim.url()))
        .send()
        .await
        .unwrap();
    client()
        .get(format!("{}/_simulator/stats", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(sim.hits(), 3);
    let seen = sim.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path,
        format!("/openai/deployments/d/embeddings?{API_VERSION}")
    );
    assert_eq!(seen[0].header("api-key"), Some("k1"));
    assert!(
        seen[0]
            .headers
            .contains(&("x-custom".to_owned(), "Value".to_owned()))
    );
    assert_eq!(seen[0].json().unwrap()["input"], "hello");
    assert_eq!(seen[1].path, "/v1/models");
    assert_eq!(seen[2].path, "/nowhere");
}

#[tokio::test]
async fn required_key_is_checked_in_both_headers() {
    let sim = start(SimulatorConfig {
        id: "sim-auth".into(),
        require_api_key: Some("backend-key".into()),
        ..SimulatorConfig::default()
    })
    .await;
    let url = format!("{}/v1/chat/completions", sim.url());
    let send = |name: &'static str, value: &'static str| {
        client()
            .post(url.clone())
            .header(name, value)
            .json(&chat_body(false, false))
            .send()
    };
    assert_eq!(send("api-key", "backend-key").await.unwrap().status(), 200);
    assert_eq!(
        send("authorization", "Bearer backend-key")
            .await
            .unwrap()
            .status(),
        200
    );
    let wrong = send("api-key", "client-key").await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(error_of(wrong).await["code"], "401");
    let missing = post_json(url.clone(), chat_body(false, false)).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(sim.hits(), 4);
}

#[tokio::test]
async fn required_bearer_token_refuses_keys_and_other_tokens() {
    let sim = start(SimulatorConfig {
        id: "sim-bearer".into(),
        require_bearer_prefix: Some("entra-at-".into()),
        ..SimulatorConfig::default()
    })
    .await;
    let url = format!("{}/v1/chat/completions", sim.url());
    let send = |headers: &'static [(&'static str, &'static str)]| {
        let mut request = client().post(url.clone()).json(&chat_body(false, false));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    let ok = send(&[("authorization", "Bearer entra-at-1")])
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for refused in [
        &[("authorization", "Bearer other-token")][..],
        &[("authorization", "Bearer entra-at-")][..],
        &[("api-key", "entra-at-1")][..],
        &[("authorization", "Bearer entra-at-1"), ("api-key", "k")][..],
        &[][..],
    ] {
        let answer = send(refused).await.unwrap();
        assert_eq!(answer.status(), 401, "{refused:?}");
        assert_eq!(error_of(answer).await["code"], "401");
    }
    assert_eq!(
        sim.requests()[0].header("authorization"),
        Some("Bearer entra-at-1")
    );
}

// ---------------------------------------------------------------- other inference

#[tokio::test]
async fn completions_embeddings_images_speech() {
    let sim = start_named("sim-misc").await;
    let url = sim.url();

    let completion: Value = post_json(
        format!("{url}/v1/completions"),
        json!({"model": "m", "prompt": "Say hi"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(
        completion["choices"][0]["text"],
        "Simulated completion of: Say hi"
    );
    assert_eq!(completion["usage"]["prompt_tokens"], 2);

    let stream = post_json(
        format!("{url}/v1/completions"),
        json!({"model": "m", "prompt": "Say hi", "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await
    .text()
    .await
    .unwrap();
    let data = sse_data(&stream);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["total_tokens"],
        completion["usage"]["total_tokens"]
    );

    let embeddings: Value = post_json(
        format!("{url}/openai/v1/embeddings"),
        json!({"model": "e", "input": ["one", "two"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(embeddings["data"].as_array().unwrap().len(), 2);
    let vector: Vec<f64> =
        serde_json::from_value(embeddings["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(vector.len(), 8);
    assert!((vector.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-4);
    assert_eq!(
        embeddings["usage"],
        json!({"prompt_tokens": 2, "total_tokens": 2})
    );

    let encoded: Value = post_json(
        format!("{url}/v1/embeddings"),
        json!({"model": "e", "input": "one", "dimensions": 16, "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 16 * 4);
    let first = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let plain: Value = post_json(
        format!("{url}/v1/embeddings"),
        json!({"model": "e", "input": "one", "dimensions": 16}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        f64::from(first),
        plain["data"][0]["embedding"][0].as_f64().unwrap()
    );

    let image: Value = post_json(
        format!("{url}/openai/deployments/dalle/images/generations?{API_VERSION}"),
        json!({"prompt": "a lighthouse", "n": 2}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(image["data"].as_array().unwrap().len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(image["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    for (format, content_type) in [(None, "audio/mpeg"), (Some("wav"), "audio/wav")] {
        let mut body = json!({"model": "tts", "input": "Hello there", "voice": "alloy"});
        if let Some(format) = format {
            body["response_format"] = json!(format);
        }
        let speech = post_json(format!("{url}/v1/audio/speech"), body).await;
        assert_eq!(speech.status(), 200);
        assert_eq!(speech.headers()["content-type"], content_type);
        let audio = speech.bytes().await.unwrap();
        assert!(
            (2_000..20_000).contains(&audio.len()),
            "{} bytes",
            audio.len()
        );
    }
}

#[tokio::test]
async fn transcription_reads_the_multipart_form() {
    let sim = start_named("sim-audio").await;
    let audio = vec![7_u8; 1234];
    let response = post_multipart(
        format!(
            "{}/openai/deployments/whisper/audio/transcriptions?{API_VERSION}",
            sim.url()
        ),
        &[("language", "en")],
        Some(("a.wav", &audio)),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["text"],
        "Simulated transcription of a.wav (1234 bytes)."
    );

    let response = post_multipart(
        format!("{}/v1/audio/translations", sim.url()),
        &[("model", "whisper"), ("response_format", "text")],
        Some(("b.mp3", b"abc")),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        "Simulated translation of b.mp3 (3 bytes).\n"
    );

    let missing = post_multipart(
        format!("{}/v1/audio/transcriptions", sim.url()),
        &[("model", "whisper")],
        None,
    )
    .await;
    assert_eq!(missing.status(), 400);
    assert_eq!(error_of(missing).await["param"], "file");
}

#[tokio::test]
async fn responses_are_stored_streamed_and_local_to_their_instance() {
    let a = start_named("sim-a").await;
    let b = start_named("sim-b").await;
    let created: Value = post_json(
        format!("{}/openai/v1/responses", a.url()),
        json!({"model": "gpt-4o", "input": "Summarise the memo"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(created["object"], "response");
    assert_eq!(
        created["output"][0]["content"][0]["text"],
        "Simulated answer to: Summarise the memo"
    );
    assert_eq!(created["usage"]["input_tokens"], 5);
    assert!(created["usage"]["output_tokens"].as_u64().unwrap() > 0);
    let id = created["id"].as_str().unwrap();
    assert!(id.contains("sim-a"), "{id}");

    let fetched = client()
        .get(format!("{}/openai/responses/{id}?{API_VERSION}", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);
    let foreign = client()
        .get(format!("{}/v1/responses/{id}", b.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);

    let stream = post_json(
        format!("{}/v1/responses", a.url()),
        json!({"model": "gpt-4o", "input": [{"role": "user", "content": "Summarise the memo"}], "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(stream.starts_with("event: response.created\n"));
    let events: Vec<Value> = sse_data(&stream)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], n);
    }
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Simulated answer to: Summarise the memo");
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(
        completed["response"]["usage"]["total_tokens"],
        created["usage"]["total_tokens"]
    );
}

// ---------------------------------------------------------------- objects

#[tokio::test]
async fn files_round_trip_and_foreign_ids_404() {
    let a = start_named("sim-a").await;
    let b = start_named("sim-b").await;
    let content = b"{\"custom_id\":\"1\"}\n{\"custom_id\":\"2\"}\n";
    let uploaded = post_multipart(
        format!("{}/openai/files?{API_VERSION}", a.url()),
        &[("purpose", "batch")],
        Some(("data.jsonl", content)),
    )
    .await;
    assert_eq!(uploaded.status(), 200);
    let file: Value = uploaded.json().await.unwrap();
    let id = file["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("file-sim-a-"), "{id}");
    assert_eq!(file["bytes"], content.len());
    assert_eq!(file["filename"], "data.jsonl");
    assert_eq!(file["purpose"], "batch");

    let get =
        |sim: &RunningSimulator, path: String| client().get(format!("{}{path}", sim.url())).send();
    let retrieved: Value = get(&a, format!("/v1/files/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(retrieved, file);
    let downloaded = get(&a, format!("/openai/v1/files/{id}/content"))
        .await
        .unwrap();
    assert_eq!(downloaded.bytes().await.unwrap().as_ref(), content);
    let listed: Value = get(&a, format!("/openai/files?purpose=batch&{API_VERSION}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["id"], id.as_str());

    // Another instance never saw it, whatever the route style.
    for path in [
        format!("/v1/files/{id}"),
        format!("/openai/files/{id}/content?{API_VERSION}"),
    ] {
        let response = get(&b, path).await.unwrap();
        assert_eq!(response.status(), 404);
        assert_eq!(error_of(response).await["code"], "404");
    }
    let foreign_batch = post_json(
        format!("{}/v1/batches", b.url()),
        json!({"input_file_id": id, "endpoint": "/chat/completions", "completion_window": "24h"}),
    )
    .await;
    assert_eq!(foreign_batch.status(), 404);

    let batch: Value = post_json(
        format!("{}/v1/batches", a.url()),
        json!({"input_file_id": id, "endpoint": "/chat/completions", "completion_window": "24h"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let batch_id = batch["id"].as_str().unwrap();
    assert_eq!(batch["status"], "validating");
    let cancelled: Value = client()
        .post(format!(
            "{}/openai/batches/{batch_id}/cancel?{API_VERSION}",
            a.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        get(&b, format!("/v1/batches/{batch_id}"))
            .await
            .unwrap()
            .status(),
        404
    );

    let deleted: Value = client()
        .delete(format!("{}/v1/files/{id}", a.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        deleted,
        json!({"id": id, "object": "file", "deleted": true})
    );
    assert_eq!(
        get(&a, format!("/v1/files/{id}")).await.unwrap().status(),
        404
    );
}

#[tokio::test]
async fn assistants_threads_vector_stores_and_models() {
    let a = start_named("sim-a").await;
    let b = start_named("sim-b").await;
    for (path, body, prefix) in [
        (
            "/assistants",
            json!({"model": "gpt-4o", "name": "helper"}),
            "asst_sim-a-",
        ),
        ("/threads", json!({}), "thread_sim-a-"),
        ("/vector_stores", json!({"name": "docs"}), "vs_sim-a-"),
    ] {
        let created: Value = post_json(format!("{}/openai{path}?{API_VERSION}", a.url()), body)
            .await
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        assert!(id.starts_with(prefix), "{id}");
        let here = client()
            .get(format!("{}/v1{path}/{id}", a.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(here.status(), 200);
        let there = client()
            .get(format!("{}/v1{path}/{id}", b.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(there.status(), 404);
    }
    let models: Value = client()
        .get(format!("{}/openai/models?{API_VERSION}", a.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(models["data"].as_array().unwrap().len() >= 3);
    let model = client()
        .get(format!("{}/v1/models/gpt-4o", a.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(model.json::<Value>().await.unwrap()["id"], "gpt-4o");
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let sim = start_named("sim-stop").await;
    let url = sim.url();
    assert!(url.starts_with("http://127.0.0.1:"));
    assert_eq!(
        client()
            .get(format!("{url}/v1/models"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    sim.shutdown().await;
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert!(fresh.get(format!("{url}/v1/models")).send().await.is_err());
}
