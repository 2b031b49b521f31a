//! `chat/completions`: a deterministic answer to the last user message, streamed like Azure
//! streams it when asked, and kept when the call asks (`"store": true`).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::SYSTEM_FINGERPRINT;
use crate::answer::{
    answer_to, completion_usage, content_filter_results, prompt_filter_results, read_messages,
    split_for_stream, tokens_for_chars, wants_stream, wants_stream_usage,
};
use crate::error::ApiError;
use crate::objects::stored_completions;
use crate::request::{DeploymentInPath, JsonBody};
use crate::sse::{SseEvent, StreamEnd, sse_response};
use crate::state::{SimulatorState, unix_now};

/// `POST …/chat/completions`.
pub(crate) async fn create(
    State(state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let model = deployment.model(body.get("model").and_then(Value::as_str))?;
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_field("messages", "'messages' must be a non-empty array.")
        })?;
    let (prompt_chars, last_user) = read_messages(messages);
    let text = answer_to("Simulated answer to", &last_user);
    let usage = completion_usage(
        tokens_for_chars(prompt_chars),
        tokens_for_chars(text.chars().count()),
    );
    let id = state.new_id("chatcmpl", '-');
    let created = unix_now();
    let completion = json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "prompt_filter_results": prompt_filter_results(),
        "choices": [{
            "index": 0,
            "finish_reason": "stop",
            "logprobs": null,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "content_filter_results": content_filter_results(),
        }],
        "usage": usage,
    });
    if body.get("store").and_then(Value::as_bool) == Some(true) {
        stored_completions::store(&state, &completion, &body, messages);
    }

    if !wants_stream(&body) {
        return Ok(Json(completion).into_response());
    }

    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    };
    let delta = |delta: Value, finish: Value, filter: Value| {
        json!([{
            "index": 0,
            "delta": delta,
            "finish_reason": finish,
            "logprobs": null,
            "content_filter_results": filter,
        }])
    };
    let mut events = vec![
        // Azure's first event: no choices, empty ids, the prompt's filter verdict.
        SseEvent::data(json!({
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": prompt_filter_results(),
        })),
        SseEvent::data(chunk(delta(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            json!({}),
        ))),
    ];
    for piece in split_for_stream(&text, state.config().stream_chunks) {
        events.push(SseEvent::paced_data(chunk(delta(
            json!({"content": piece}),
            Value::Null,
            content_filter_results(),
        ))));
    }
    events.push(SseEvent::data(chunk(delta(
        json!({}),
        json!("stop"),
        json!({}),
    ))));
    if wants_stream_usage(&body) {
        let mut last = chunk(json!([]));
        if let Some(map) = last.as_object_mut() {
            map.insert("usage".to_owned(), usage);
        }
        events.push(SseEvent::data(last));
    }
    Ok(sse_response(&state, events, StreamEnd::Done))
}
