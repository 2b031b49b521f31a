//! Legacy `completions` (`text_completion`), streamed or not.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::SYSTEM_FINGERPRINT;
use crate::answer::{
    answer_to, completion_usage, content_filter_results, prompt_filter_results, split_for_stream,
    tokens_for_chars, wants_stream, wants_stream_usage,
};
use crate::error::ApiError;
use crate::request::{DeploymentInPath, JsonBody};
use crate::sse::{SseEvent, StreamEnd, sse_response};
use crate::state::{SimulatorState, unix_now};

/// `POST …/completions`.
pub(crate) async fn create(
    State(state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let model = deployment.model(body.get("model").and_then(Value::as_str))?;
    let (prompt_chars, first_prompt) = read_prompt(body.get("prompt"))?;
    let text = answer_to("Simulated completion of", &first_prompt);
    let usage = completion_usage(
        tokens_for_chars(prompt_chars),
        tokens_for_chars(text.chars().count()),
    );
    let id = state.new_id("cmpl", '-');
    let created = unix_now();
    let choice = |text: &str, finish: Value, filter: Value| {
        json!({
            "text": text,
            "index": 0,
            "finish_reason": finish,
            "logprobs": null,
            "content_filter_results": filter,
        })
    };

    if !wants_stream(&body) {
        return Ok(Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "prompt_filter_results": prompt_filter_results(),
            "choices": [choice(&text, json!("stop"), content_filter_results())],
            "usage": usage,
        }))
        .into_response());
    }

    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    };
    let mut events = vec![SseEvent::data(json!({
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": prompt_filter_results(),
    }))];
    for piece in split_for_stream(&text, state.config().stream_chunks) {
        events.push(SseEvent::paced_data(chunk(json!([choice(
            &piece,
            Value::Null,
            content_filter_results()
        )]))));
    }
    events.push(SseEvent::data(chunk(json!([choice(
        "",
        json!("stop"),
        json!({})
    )]))));
    if wants_stream_usage(&body) {
        let mut last = chunk(json!([]));
        if let Some(map) = last.as_object_mut() {
            map.insert("usage".to_owned(), usage);
        }
        events.push(SseEvent::data(last));
    }
    Ok(sse_response(&state, events, StreamEnd::Done))
}

/// Characters of every prompt and the text of the first one. A prompt is a string, an array of
/// strings, an array of tokens, or an array of token arrays (a token counts as four characters).
fn read_prompt(prompt: Option<&Value>) -> Result<(usize, String), ApiError> {
    let invalid = || {
        ApiError::invalid_field(
            "prompt",
            "'prompt' must be a string, an array of strings, or tokens.",
        )
    };
    let tokens = |count: usize| (count * 4, format!("{count} tokens"));
    match prompt {
        Some(Value::String(text)) => Ok((text.chars().count(), text.clone())),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                return Ok(tokens(items.len()));
            }
            let mut chars = 0;
            let mut first = None;
            for item in items {
                let (item_chars, text) = match item {
                    Value::String(text) => (text.chars().count(), text.clone()),
                    Value::Array(ids) => tokens(ids.len()),
                    _ => return Err(invalid()),
                };
                chars += item_chars;
                first.get_or_insert(text);
            }
            Ok((chars, first.unwrap_or_default()))
        }
        _ => Err(invalid()),
    }
}
