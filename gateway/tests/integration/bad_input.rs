//! Bad input gets a clear 4xx in Azure's shape, never a panic, never a backend call.

use serde_json::json;

use crate::harness::*;

async fn gateway() -> (gatehouse_simulator::RunningSimulator, TestGateway) {
    let sim = simulator("bad").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    config.max_request_body_bytes = 64 * 1024;
    (sim, TestGateway::start(config).await)
}

#[tokio::test]
async fn malformed_json_wrong_content_type_and_oversized_bodies() {
    let (sim, gw) = gateway().await;
    let malformed = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    let message = azure_error(malformed, 400).await;
    assert!(message.contains("not valid JSON"), "{message}");

    let not_object = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "application/json")
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    azure_error(not_object, 400).await;

    let wrong_type = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    let message = azure_error(wrong_type, 415).await;
    assert!(message.contains("JSON"), "{message}");

    let json_to_multipart = gw
        .post("/openai/deployments/gpt-4o/audio/transcriptions?api-version=2024-10-21")
        .json(&json!({"file": "x"}))
        .send()
        .await
        .unwrap();
    azure_error(json_to_multipart, 415).await;

    let big = "x".repeat(100 * 1024);
    let oversized = gw
        .post(&chat_path("gpt-4o"))
        .json(&json!({"messages": [{"role": "user", "content": big}]}))
        .send()
        .await
        .unwrap();
    let message = azure_error(oversized, 413).await;
    assert!(message.contains("65536"), "{message}");

    // Without Content-Length (chunked), the limit still holds. The body is several times what the
    // socket buffers hold: the gateway reads the rest of it before it answers, so the client
    // gets the 413 rather than a connection reset by unread data.
    let chunks = futures::stream::iter((0..100).map(|_| Ok::<_, std::io::Error>(vec![b' '; 4096])));
    let chunked = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    azure_error(chunked, 413).await;

    let no_model = gw
        .post("/v1/chat/completions")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(no_model, 400).await;
    assert!(message.contains("model"), "{message}");
    assert_eq!(sim.hits(), 0);
}

#[tokio::test]
async fn path_traversal_and_header_injection_are_refused() {
    let (sim, gw) = gateway().await;
    for path in [
        "/openai/deployments/..%2F..%2Fadmin/chat/completions?api-version=2024-10-21",
        "/openai/deployments/%2e%2e/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt-4o%0d%0aX-Injected:%201/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt-4o%00/chat/completions?api-version=2024-10-21",
    ] {
        let response = gw.post(path).json(&chat(None, false)).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(status == 400 || status == 404, "{path}: {status}");
        azure_error(response, status).await;
    }
    for path in [
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21%00",
        "/openai/deployments/gpt-4o/chat/completions?api-version=x%0d%0aX-Injected:%201",
        // Empty: the gateway's own 400, not the member's answer to an empty version.
        "/openai/deployments/gpt-4o/chat/completions?api-version=",
    ] {
        let response = gw.post(path).json(&chat(None, false)).send().await.unwrap();
        let message = azure_error(response, 400).await;
        assert!(message.contains("api-version"), "{path}: {message}");
    }
    let traversal_in_body = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("../../etc/passwd"), false))
        .send()
        .await
        .unwrap();
    azure_error(traversal_in_body, 400).await;
    let bad_id = gw
        .get("/openai/files/..%2Fsecrets?api-version=2024-10-21")
        .send()
        .await
        .unwrap();
    assert!(bad_id.status().is_client_error());
    assert_eq!(sim.hits(), 0);

    // A request id that could smuggle text into logs is replaced, not echoed.
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("x-request-id", "abc\"}{\"forged\":1")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let echoed = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(echoed, "abc\"}{\"forged\":1");
    assert_eq!(echoed.len(), 36, "a fresh UUID: {echoed}");
    // A sane one is kept end to end.
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("x-request-id", "req-123")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-123");
    assert_eq!(
        sim.requests().last().unwrap().header("x-request-id"),
        Some("req-123")
    );
}

/// A JSON body that gives `model` (or `stream`, `stream_options`) twice is refused: the gateway
/// would judge the call by the last, a backend that takes the first would run the other model.
/// Escaped spellings of the key, which take the tree's slower path, are caught as well.
#[tokio::test]
async fn a_member_the_gateway_judges_by_given_twice_is_refused() {
    let (sim, gw) = gateway().await;
    for (path, body, member) in [
        (
            "/v1/chat/completions".to_owned(),
            r#"{"model":"o1","model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            "model",
        ),
        (
            chat_path("gpt-4o"),
            r#"{"stream":false,"messages":[],"stream":true}"#,
            "stream",
        ),
        (
            "/v1/chat/completions".to_owned(),
            r#"{"model":"o1","messages":[{"role":"user","content":"\ud83d\ude00"}],"mod\u0065l":"gpt-4o"}"#,
            "model",
        ),
    ] {
        let refused = gw
            .post(&path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let message = azure_error(refused, 400).await;
        assert!(
            message.contains(&format!("gives `{member}` more than once")),
            "{body}: {message}"
        );
    }
    assert_eq!(sim.hits(), 0, "no backend was called");
}

/// The model a run or an eval run names is the deployment its limits count by and its rules
/// judge: one that is no deployment name (megabytes of it, a path, a line break) is refused like
/// a path's deployment, neither echoed whole nor made a counter.
#[tokio::test]
async fn a_run_naming_no_valid_model_is_refused() {
    let (sim, gw) = gateway().await;
    let long = "m".repeat(10_000);
    for (path, body) in [
        (
            "/openai/threads/thread_1/runs?api-version=2024-10-21".to_owned(),
            json!({"assistant_id": "asst_1", "model": long}),
        ),
        (
            "/openai/threads/runs?api-version=2024-10-21".to_owned(),
            json!({"assistant_id": "asst_1", "model": "gpt-4o/../x"}),
        ),
        (
            "/openai/evals/eval_1/runs?api-version=2025-04-01-preview".to_owned(),
            json!({"data_source": {"type": "completions", "model": "gpt-4o\nx"}}),
        ),
    ] {
        let refused = gw.post(&path).json(&body).send().await.unwrap();
        let text = refused.text().await.unwrap();
        assert!(text.len() < 1_000, "{path}: {} bytes", text.len());
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deployment name is not valid"),
            "{path}: {text}"
        );
        assert_eq!(error["error"]["param"], "model", "{path}: {text}");
    }
    assert_eq!(sim.hits(), 0, "no backend was called");
}
