//! Every route style reaches the right backend path with the right operation id.

use std::sync::{Arc, Mutex};

use gatehouse_schema::OperationId;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn each_route_style_is_classified_and_rewritten_for_the_member() {
    let sim = simulator("routes").await;
    let mut renamed = member("azure", &sim.url(), 1);
    renamed["deployment"] = json!("gpt-4o-eastus");
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "chat", "deployments": ["gpt-4o"], "members": [renamed]},
            {"id": "emb", "deployments": ["text-embedding-3-small"], "serves_resources": true, "members": [member("emb", &sim.url(), 1)]}
        ]),
    ))
    .await;

    // (client path, body, expected operation, expected deployment, expected backend path prefix)
    let cases = [
        (
            chat_path("gpt-4o"),
            chat(None, false),
            OperationId::ChatCompletionsCreate,
            "gpt-4o",
            "/openai/deployments/gpt-4o-eastus/chat/completions?api-version=2024-10-21",
        ),
        (
            "/openai/v1/chat/completions".to_owned(),
            chat(Some("gpt-4o"), false),
            OperationId::ChatCompletionsCreate,
            "gpt-4o",
            "/openai/v1/chat/completions",
        ),
        (
            "/v1/chat/completions".to_owned(),
            chat(Some("gpt-4o"), false),
            OperationId::ChatCompletionsCreate,
            "gpt-4o",
            "/openai/v1/chat/completions",
        ),
        (
            "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
                .to_owned(),
            json!({"input": "hello"}),
            OperationId::EmbeddingsCreate,
            "text-embedding-3-small",
            "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21",
        ),
        (
            "/v1/embeddings".to_owned(),
            json!({"input": ["a", "b"], "model": "text-embedding-3-small"}),
            OperationId::EmbeddingsCreate,
            "text-embedding-3-small",
            "/openai/v1/embeddings",
        ),
        (
            "/openai/deployments/gpt-4o/completions?api-version=2024-10-21".to_owned(),
            json!({"prompt": "Say hi"}),
            OperationId::CompletionsCreate,
            "gpt-4o",
            "/openai/deployments/gpt-4o-eastus/completions?api-version=2024-10-21",
        ),
        (
            "/openai/deployments/gpt-4o/images/generations?api-version=2024-10-21".to_owned(),
            json!({"prompt": "a lighthouse"}),
            OperationId::ImageGenerationsCreate,
            "gpt-4o",
            "/openai/deployments/gpt-4o-eastus/images/generations",
        ),
    ];
    for (i, (path, body, operation, deployment, backend_path)) in cases.iter().enumerate() {
        let response = gw.post(path).json(body).send().await.unwrap();
        assert_eq!(response.status(), 200, "case {i}: {path}");
        let seen = sim.requests().pop().unwrap();
        assert!(
            seen.path.starts_with(backend_path),
            "case {i}: backend saw {}",
            seen.path
        );
        let records = gw.records(i + 1).await;
        let record = &records[i];
        assert_eq!(record.operation_id, Some(*operation), "case {i}");
        assert_eq!(
            record.deployment_name.as_deref(),
            Some(*deployment),
            "case {i}"
        );
    }
    // Renaming puts the member's deployment into the body of v1 calls.
    let v1 = &sim.requests()[1];
    assert_eq!(v1.json().unwrap()["model"], "gpt-4o-eastus");

    // Resource routes go to the resource pool and keep their api-version.
    let models = gw
        .get("/openai/models?api-version=2024-10-21")
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(
        sim.requests().pop().unwrap().path,
        "/openai/models?api-version=2024-10-21"
    );
    let records = gw.records(cases.len() + 1).await;
    assert_eq!(
        records.last().unwrap().operation_id,
        Some(OperationId::ModelsList)
    );
}

#[tokio::test]
async fn a_member_rename_is_put_only_into_calls_that_name_a_deployment() {
    // The rename is the member's name for the pool's deployment: a resource call names another
    // model (an assistant's) or none (a batch, a continued response), and is sent as it came.
    let sim = simulator("rename-resources").await;
    let mut renamed = member("east", &sim.url(), 1);
    renamed["deployment"] = json!("gpt-4o-eastus");
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [renamed]}]),
    ))
    .await;

    let assistant = json!({"model": "gpt-4o-mini", "instructions": "Be brief."});
    gw.post("/openai/assistants?api-version=2024-05-01-preview")
        .json(&assistant)
        .send()
        .await
        .unwrap();
    let seen = sim.requests().pop().unwrap();
    assert!(seen.path.starts_with("/openai/assistants"), "{}", seen.path);
    assert_eq!(
        seen.json().unwrap(),
        assistant,
        "the assistant's model is the caller's"
    );

    let batch = json!({"input_file_id": "file-abc", "endpoint": "/chat/completions", "completion_window": "24h"});
    gw.post("/openai/batches?api-version=2024-10-21")
        .json(&batch)
        .send()
        .await
        .unwrap();
    let seen = sim.requests().pop().unwrap();
    assert!(seen.path.starts_with("/openai/batches"), "{}", seen.path);
    assert_eq!(seen.json().unwrap(), batch, "a batch gets no model added");

    let continued = json!({"previous_response_id": "resp_abc", "input": "and then?"});
    gw.post("/openai/v1/responses")
        .json(&continued)
        .send()
        .await
        .unwrap();
    let seen = sim.requests().pop().unwrap();
    assert_eq!(
        seen.json().unwrap(),
        continued,
        "a continued response gets no model added"
    );

    // A call that names the pool's deployment still gets the member's name.
    gw.post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o", "input": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        sim.requests().pop().unwrap().json().unwrap()["model"],
        "gpt-4o-eastus"
    );
}

#[tokio::test]
async fn speech_returns_binary_and_multipart_is_forwarded_intact() {
    let sim = simulator("binary").await;
    let gw = TestGateway::start(snapshot(1, json!([{"id": "p", "deployments": ["tts", "whisper"], "members": [member("a", &sim.url(), 1)]}]))).await;
    let speech = gw
        .post("/openai/deployments/tts/audio/speech?api-version=2024-10-21")
        .json(&json!({"input": "Hello there", "voice": "alloy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(speech.status(), 200);
    let audio = speech.bytes().await.unwrap();
    assert!(
        audio.len() > 100,
        "binary body expected, got {} bytes",
        audio.len()
    );

    let wav = vec![7u8; 4096];
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(wav.clone())
                .file_name("a.wav")
                .mime_str("audio/wav")
                .unwrap(),
        )
        .text("model", "whisper");
    let transcription = gw
        .post("/v1/audio/transcriptions")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(transcription.status(), 200);
    let text: serde_json::Value = transcription.json().await.unwrap();
    assert!(text["text"].as_str().unwrap().contains("4096"), "{text}");
    let records = gw.records(2).await;
    assert_eq!(
        records[1].operation_id,
        Some(OperationId::TranscriptionsCreate)
    );
    assert_eq!(records[1].deployment_name.as_deref(), Some("whisper"));
    // The binary speech answer is measured, not stored as text.
    assert_eq!(records[0].response_size, audio.len() as u64);
    assert_eq!(records[0].backend_response_body.as_deref(), None);
}

/// A multipart body is read with its boundary as sent: browsers put capitals in theirs
/// (`----WebKitFormBoundary…`), and media types are case-insensitive.
#[tokio::test]
async fn a_multipart_boundary_with_capitals_is_read_as_sent() {
    let sim = simulator("boundary").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["whisper"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&[7u8; 2048]);
    body.extend_from_slice(
        format!(
            "\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\
             whisper\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
    let transcription = gw
        .post("/v1/audio/transcriptions")
        .header(
            "content-type",
            format!("Multipart/Form-Data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(transcription.status(), 200);
    let text: serde_json::Value = transcription.json().await.unwrap();
    assert!(text["text"].as_str().unwrap().contains("2048"), "{text}");
    let records = gw.records(1).await;
    assert_eq!(records[0].deployment_name.as_deref(), Some("whisper"));
    assert_eq!(sim.hits(), 1);
}

/// On a deployment route the path names the deployment that access rules, limits and the record
/// go by: a member that takes the model from the body gets that one, whatever the body says.
#[tokio::test]
async fn a_body_model_other_than_the_path_deployment_never_reaches_the_member() {
    let models = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&models);
    let url = serve_stub(axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let seen = Arc::clone(&seen);
            async move {
                let model = body["model"].as_str().unwrap_or_default().to_owned();
                seen.lock().unwrap().push(model.clone());
                axum::Json(json!({
                    "id": "c1", "object": "chat.completion", "created": 1, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                }))
            }
        }),
    ))
    .await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o-mini", "o1"], "members": [
            {"id": "openai", "kind": "openai", "endpoint": format!("{url}/v1"), "priority": 1, "weight": 1},
        ]}]),
    ))
    .await;
    let answer = gw
        .post(&chat_path("gpt-4o-mini"))
        .json(&chat(Some("o1"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(*models.lock().unwrap(), ["gpt-4o-mini"]);
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.deployment_name.as_deref(), Some("gpt-4o-mini"));

    // A form whose `model` field names another deployment than the path is refused (its model
    // is judged, and set for the member, by the path).
    let form = |model: &str| {
        reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(vec![7u8; 64])
                    .file_name("a.wav")
                    .mime_str("audio/wav")
                    .unwrap(),
            )
            .text("model", model.to_owned())
    };
    let refused = gw
        .post("/openai/deployments/gpt-4o-mini/audio/transcriptions?api-version=2024-10-21")
        .multipart(form("o1"))
        .send()
        .await
        .unwrap();
    let message = azure_error(refused, 400).await;
    assert!(message.contains("`gpt-4o-mini`"), "{message}");
    assert_eq!(models.lock().unwrap().len(), 1, "no backend saw it");
}

#[tokio::test]
async fn a_form_naming_the_path_deployment_is_forwarded() {
    let sim = simulator("form-model").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["whisper"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let form = audio_form().text("model", "whisper");
    let transcription = gw
        .post("/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(transcription.status(), 200);
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn unknown_routes_and_deployments_are_404_in_azure_shape() {
    let sim = simulator("unknown").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let unknown_route = gw
        .get("/openai/nothing-here?api-version=2024-10-21")
        .send()
        .await
        .unwrap();
    azure_error(unknown_route, 404).await;
    let unknown_root = gw.get("/admin.php").send().await.unwrap();
    azure_error(unknown_root, 404).await;
    let unknown_deployment = gw
        .post(&chat_path("gpt-5-secret"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(unknown_deployment, 404).await;
    assert!(message.contains("deployment"), "{message}");
    assert_eq!(sim.hits(), 0);
}

/// Routes of the APIs the gateway does not serve on purpose are 404 with a message that says
/// why and what to use, not "Resource not found": Realtime client secrets, sessions and WebRTC
/// calls (an ephemeral key would take a browser past the gateway) and video generation.
#[tokio::test]
async fn routes_not_served_on_purpose_say_why() {
    let sim = simulator("not-served").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o-realtime"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let realtime = [
        "/openai/v1/realtime/client_secrets",
        "/openai/v1/realtime/calls",
        "/v1/realtime/client_secrets",
        "/v1/realtime/sessions",
        "/v1/realtime/transcription_sessions",
        "/openai/realtimeapi/sessions?api-version=2025-04-01-preview",
    ];
    for path in realtime {
        let body = json!({"session": {"type": "realtime", "model": "gpt-4o-realtime"}});
        let refused = gw.post(path).json(&body).send().await.unwrap();
        let message = azure_error(refused, 404).await;
        assert!(message.contains("ephemeral key"), "{path}: {message}");
        assert!(message.contains("/openai/v1/realtime"), "{path}: {message}");
    }
    for path in [
        "/openai/v1/videos",
        "/v1/videos",
        "/openai/v1/video/generations/jobs",
    ] {
        let refused = gw
            .post(path)
            .json(&json!({"model": "sora", "prompt": "a cat"}))
            .send()
            .await
            .unwrap();
        let message = azure_error(refused, 404).await;
        assert!(message.contains("Video generation"), "{path}: {message}");
    }
    assert_eq!(sim.hits(), 0);
    let records = gw.records(realtime.len() + 3).await;
    assert!(
        records
            .iter()
            .all(|record| record.last_error_reason.as_deref() == Some("not_served")),
        "{records:?}"
    );
}

#[tokio::test]
async fn a_form_with_two_model_fields_is_refused() {
    // Authorized by one `model` field, the member could run the other: refused before any
    // backend sees it, on the deployment route and on the v1 route alike.
    let sim = simulator("form-two-models").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["whisper"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    for path in [
        "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21",
        "/openai/v1/audio/transcriptions",
    ] {
        let form = audio_form().text("model", "whisper").text("model", "o1");
        let refused = gw.post(path).multipart(form).send().await.unwrap();
        let message = azure_error(refused, 400).await;
        assert!(
            message.contains("more than one `model`"),
            "{path}: {message}"
        );
        // A second `model` the form reader would not see (`NAME=`, `name*=`; parameter names
        // ignore case), and a form it cannot read whole: refused too.
        for (disposition, expected) in [
            (r#"form-data; NAME="model""#, "spells its `name` parameter"),
            (
                r#"form-data; name*=UTF-8''model"#,
                "spells its `name` parameter",
            ),
            // A `model` the reader would not see but a backend taking the last `name` would: a
            // second `name`, a second header, a `name=` inside a quoted filename.
            (
                r#"form-data; name="x"; name="model""#,
                "more than once or ambiguously",
            ),
            (
                "form-data; name=\"x\"\r\nContent-Disposition: form-data; name=\"model\"",
                "more than one Content-Disposition header",
            ),
            (
                r#"form-data; filename="a name=x;"; name="model""#,
                "more than once or ambiguously",
            ),
            (
                "form-data; name=\"model\"\r\nContent-Disposition: form-data; name=\"x\"",
                "more than one Content-Disposition header",
            ),
        ] {
            let body = format!(
                "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n\
                 --b0undary\r\nContent-Disposition: {disposition}\r\n\r\no1\r\n\
                 --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n\
                 --b0undary--\r\n"
            );
            let refused = gw
                .post(path)
                .header("content-type", "multipart/form-data; boundary=b0undary")
                .body(body)
                .send()
                .await
                .unwrap();
            let message = azure_error(refused, 400).await;
            assert!(
                message.contains(expected),
                "{path} {disposition}: {message}"
            );
        }
        let cut = "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper";
        let refused = gw
            .post(path)
            .header("content-type", "multipart/form-data; boundary=b0undary")
            .body(cut)
            .send()
            .await
            .unwrap();
        let message = azure_error(refused, 400).await;
        assert!(message.contains("cannot be read"), "{path}: {message}");
        // Where the readers would not agree on the parts (text before the first delimiter on its
        // line), too many parts, and delimiters with no head (each head once looked for to the
        // end of the body: quadratic work on one request).
        let parts =
            "--b0undary\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\ny\r\n".repeat(1_001);
        let headless = "\r\n--b0undary".repeat(200_000);
        for (body, expected) in [
            (
                "xyz--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--b0undary--\r\n".to_owned(),
                "first boundary delimiter",
            ),
            (format!("{parts}--b0undary--\r\n"), "more than 1000 parts"),
            (headless, "more than 1000 parts"),
        ] {
            let refused = gw
                .post(path)
                .header("content-type", "multipart/form-data; boundary=b0undary")
                .body(body)
                .send()
                .await
                .unwrap();
            let message = azure_error(refused, 400).await;
            assert!(message.contains(expected), "{path}: {message}");
        }
    }
    assert_eq!(sim.hits(), 0);
}

/// A member that runs its own deployment gets it in a form's `model` too (a v1 transcription),
/// and a member that takes the model in the body gets the path's deployment added to a form
/// that names none: the form is never sent with a model the member would not run.
#[tokio::test]
async fn a_forms_model_is_the_members_name() {
    let sim = simulator("form-rename").await;
    let mut renamed = member("a", &sim.url(), 1);
    renamed["deployment"] = json!("whisper-prod");
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["whisper"], "members": [renamed]}]),
    ))
    .await;
    let form = audio_form().text("model", "whisper").text("language", "de");
    let response = gw
        .post("/openai/v1/audio/transcriptions")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let seen = sim.requests().remove(0);
    let body = String::from_utf8_lossy(&seen.body).into_owned();
    assert!(
        body.contains("name=\"model\"\r\n\r\nwhisper-prod\r\n"),
        "{body}"
    );
    assert!(body.contains("name=\"language\"\r\n\r\nde\r\n"), "{body}");
    assert!(
        body.contains(&"\u{7}".repeat(512)),
        "the file part is kept whole"
    );
}

/// A transcription form with a 512-byte WAV file part and no other field.
fn audio_form() -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(vec![7u8; 512])
            .file_name("a.wav")
            .mime_str("audio/wav")
            .unwrap(),
    )
}

/// A transcription form with `stream=true` (gpt-4o-transcribe) is a streamed call: the record
/// says so and carries the usage of the final event. The stub speaks the streamed transcription
/// events of OpenAI's API reference (Audio, "Stream Event (transcript.text.delta)" and
/// "(transcript.text.done)"), which Azure's v1 route passes on.
#[tokio::test]
async fn a_streamed_transcription_is_recorded_as_a_stream_with_its_usage() {
    let url = serve_stub(axum::Router::new().route(
        "/openai/v1/audio/transcriptions",
        axum::routing::post(|| async {
            (
                [("content-type", "text/event-stream")],
                concat!(
                    "data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hello\"}\n\n",
                    "data: {\"type\":\"transcript.text.done\",\"text\":\"Hello\",\"usage\":",
                    "{\"type\":\"tokens\",\"input_tokens\":14,\"output_tokens\":2,\"total_tokens\":16}}\n\n",
                ),
            )
        }),
    ))
    .await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o-transcribe"], "members": [member("a", &url, 1)]}]),
    ))
    .await;
    for (at, (stream, streamed)) in [("true", true), ("false", false)].into_iter().enumerate() {
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(vec![7u8; 512])
                    .file_name("a.wav")
                    .mime_str("audio/wav")
                    .unwrap(),
            )
            .text("model", "gpt-4o-transcribe")
            .text("stream", stream);
        let answer = gw
            .post("/openai/v1/audio/transcriptions")
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert!(
            answer
                .text()
                .await
                .unwrap()
                .contains("transcript.text.done")
        );
        let record = gw.records(at + 1).await.remove(at);
        assert_eq!(record.operation_id, Some(OperationId::TranscriptionsCreate));
        assert_eq!(record.is_stream_completion, streamed, "stream={stream}");
        let usage = record.usage.expect("the final event's usage");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.is_estimate
            ),
            (14, 2, false),
            "stream={stream}"
        );
    }
    // A form that asks twice is refused before any member is called.
    let form = reqwest::multipart::Form::new()
        .text("model", "gpt-4o-transcribe")
        .text("stream", "true")
        .text("stream", "false");
    let refused = gw
        .post("/openai/v1/audio/transcriptions")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["param"], "stream", "{body}");
}

/// A form's `prompt` — an image edit's instruction, a transcription's hint — is the record's
/// `RequestMessages` (as a JSON string), so that an auditor finds who asked for what; the file
/// parts are never recorded. The stub answers as OpenAI's "Create image edit" does.
#[tokio::test]
async fn a_forms_prompt_is_on_record_and_its_files_are_not() {
    let url = serve_stub(axum::Router::new().route(
        "/openai/v1/images/edits",
        axum::routing::post(|| async {
            axum::Json(json!({"created": 1, "data": [{"b64_json": "AAAA"}],
                "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210,
                          "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}}))
        }),
    ))
    .await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-image-1"], "members": [member("a", &url, 1)]}]),
    ))
    .await;
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(b"\x89PNG secret pixels".to_vec())
                .file_name("cat.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .text("model", "gpt-image-1")
        .text("prompt", "Add a red \"hat\"");
    let answer = gw
        .post("/openai/v1/images/edits")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.operation_id, Some(OperationId::ImageEditsCreate));
    assert_eq!(
        record.request_messages.as_deref(),
        Some(r#""Add a red \"hat\"""#)
    );
    assert_eq!(record.backend_request_body, None);
    assert_eq!(record.usage.unwrap().total_tokens, 4210);
}
