//! The Responses API: `POST …/responses` (streamed as typed events when asked), and
//! `GET`/`DELETE …/responses/{id}` for the responses this instance stored.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::answer::{answer_to, content_text, split_for_stream, tokens_for_chars, wants_stream};
use crate::error::ApiError;
use crate::objects::ObjectKind;
use crate::request::{DeploymentInPath, JsonBody};
use crate::sse::{SseEvent, StreamEnd, sse_response};
use crate::state::{SimulatorState, unix_now};

/// `POST …/responses`.
pub(crate) async fn create(
    State(state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let model = deployment.model(body.get("model").and_then(Value::as_str))?;
    let (input_chars, last_user) = read_input(&body)?;
    let text = answer_to("Simulated answer to", &last_user);
    let input_tokens = tokens_for_chars(input_chars);
    let output_tokens = tokens_for_chars(text.chars().count());
    let id = state.new_id("resp", '_');
    let message_id = state.new_id("msg", '_');
    let created_at = unix_now();
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);

    let message = |status: &str, text: Option<&str>| {
        let content = match text {
            Some(text) => json!([{"type": "output_text", "text": text, "annotations": []}]),
            None => json!([]),
        };
        json!({
            "type": "message",
            "id": message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        })
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({
            "id": id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "model": model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": body.get("previous_response_id").cloned().unwrap_or(Value::Null),
            "store": store,
            "temperature": body.get("temperature").cloned().unwrap_or(json!(1.0)),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p").cloned().unwrap_or(json!(1.0)),
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.get("metadata").cloned().unwrap_or_else(|| json!({})),
        })
    };
    let usage = json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    });
    let completed = response(
        "completed",
        json!([message("completed", Some(&text))]),
        usage,
    );
    if store {
        state
            .objects()
            .insert(ObjectKind::Response, completed.clone(), Bytes::new());
    }
    if !wants_stream(&body) {
        return Ok(Json(completed).into_response());
    }

    let in_progress = response("in_progress", json!([]), Value::Null);
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let mut sequence = 0_u64;
    let mut event = |name: &'static str, mut data: Value, paced: bool| {
        if let Some(map) = data.as_object_mut() {
            map.insert("type".to_owned(), json!(name));
            map.insert("sequence_number".to_owned(), json!(sequence));
        }
        sequence += 1;
        SseEvent::named(name, data, paced)
    };
    let at_text = |extra: Value| {
        let mut data = json!({"item_id": message_id, "output_index": 0, "content_index": 0});
        if let (Some(map), Value::Object(extra)) = (data.as_object_mut(), extra) {
            map.extend(extra);
        }
        data
    };
    let mut events = vec![
        event("response.created", json!({"response": in_progress}), false),
        event(
            "response.in_progress",
            json!({"response": in_progress}),
            false,
        ),
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": message("in_progress", None)}),
            false,
        ),
        event(
            "response.content_part.added",
            at_text(json!({"part": part("")})),
            false,
        ),
    ];
    for piece in split_for_stream(&text, state.config().stream_chunks) {
        events.push(event(
            "response.output_text.delta",
            at_text(json!({"delta": piece, "logprobs": []})),
            true,
        ));
    }
    events.push(event(
        "response.output_text.done",
        at_text(json!({"text": text, "logprobs": []})),
        false,
    ));
    events.push(event(
        "response.content_part.done",
        at_text(json!({"part": part(&text)})),
        false,
    ));
    events.push(event(
        "response.output_item.done",
        json!({"output_index": 0, "item": message("completed", Some(&text))}),
        false,
    ));
    events.push(event(
        "response.completed",
        json!({"response": completed}),
        false,
    ));
    Ok(sse_response(&state, events, StreamEnd::LastEvent))
}

/// Characters of the instructions and every input message, and the last user text.
fn read_input(body: &Map<String, Value>) -> Result<(usize, String), ApiError> {
    let instructions = body
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, |i| i.chars().count());
    match body.get("input") {
        Some(Value::String(text)) => Ok((instructions + text.chars().count(), text.clone())),
        Some(Value::Array(items)) => {
            let mut chars = instructions;
            let mut last_user = String::new();
            for item in items {
                let text = content_text(item.get("content"));
                chars += text.chars().count();
                if item.get("role").and_then(Value::as_str) == Some("user") {
                    last_user = text;
                }
            }
            Ok((chars, last_user))
        }
        _ => Err(ApiError::invalid_field(
            "input",
            "'input' must be a string or an array of input items.",
        )),
    }
}

/// `GET …/responses/{response_id}`.
pub(crate) async fn retrieve(
    State(state): State<SimulatorState>,
    Path(response_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .objects()
            .get(ObjectKind::Response, &response_id)?
            .body
            .clone(),
    ))
}

/// `DELETE …/responses/{response_id}`.
pub(crate) async fn delete(
    State(state): State<SimulatorState>,
    Path(response_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.objects().delete(
        ObjectKind::Response,
        &response_id,
        "response",
    )?))
}
