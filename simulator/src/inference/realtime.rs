//! The Realtime API over a WebSocket (`GET …/realtime?deployment=…` or `?model=…` with an
//! upgrade), text only: `session.created` on connect, `session.updated` for a `session.update`,
//! `conversation.item.created` for each item, and for each `response.create` a response that
//! answers the last user message — `response.created`, the text in paced delta events, its done
//! event and `response.done` with its usage. Event shapes: OpenAI's Realtime API reference
//! (server events), which Azure OpenAI's Realtime API follows: the generally available names
//! (`response.output_text.delta`, content `output_text`), or the beta ones
//! (`response.text.delta`, content `text`) for a client that sends `OpenAI-Beta: realtime=v1`,
//! as the SDKs' beta clients do. Audio appends are taken and ignored.

use std::collections::HashMap;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use crate::answer::{answer_to, content_text, split_for_stream, tokens_for_chars};
use crate::error::ApiError;
use crate::state::SimulatorState;

/// `GET …/realtime`: the deployment from `deployment` (Azure classic) or `model`.
pub(crate) async fn connect(
    State(state): State<SimulatorState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let beta = headers
        .get("openai-beta")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.contains("realtime=v1"));
    let model = query
        .get("deployment")
        .or_else(|| query.get("model"))
        .filter(|name| !name.is_empty())
        .cloned()
        .ok_or_else(|| {
            ApiError::invalid_field("deployment", "The Realtime API names its deployment.")
        })?;
    Ok(upgrade.on_upgrade(move |socket| session(state, socket, model, beta)))
}

/// One session: answers the client's events until it closes; `beta`: with the beta event names.
async fn session(state: SimulatorState, mut socket: WebSocket, model: String, beta: bool) {
    let (delta_event, done_event, content_type) = if beta {
        ("response.text.delta", "response.text.done", "text")
    } else {
        (
            "response.output_text.delta",
            "response.output_text.done",
            "output_text",
        )
    };
    let session_id = state.new_id("sess", '_');
    let session = json!({"id": session_id, "object": "realtime.session", "model": model, "modalities": ["text"], "instructions": ""});
    let mut serial = 0_u64;
    let mut event = |kind: &str, mut body: Value| {
        serial += 1;
        if let Some(object) = body.as_object_mut() {
            object.insert("type".to_owned(), json!(kind));
            object.insert("event_id".to_owned(), json!(format!("event_{serial}")));
        }
        Message::Text(body.to_string().into())
    };
    if socket
        .send(event("session.created", json!({"session": session})))
        .await
        .is_err()
    {
        return;
    }
    let mut last_user = String::new();
    let mut prompt_chars = 0_usize;
    while let Some(Ok(message)) = socket.recv().await {
        let Message::Text(text) = message else {
            if matches!(message, Message::Close(_)) {
                return;
            }
            continue;
        };
        let Ok(client_event) = serde_json::from_str::<Value>(text.as_str()) else {
            let error = json!({"error": {"type": "invalid_request_error", "code": "invalid_json", "message": "The event is not JSON.", "param": null}});
            if socket.send(event("error", error)).await.is_err() {
                return;
            }
            continue;
        };
        let replies = match client_event["type"].as_str().unwrap_or_default() {
            "session.update" => vec![event("session.updated", json!({"session": session}))],
            "conversation.item.create" => {
                let item = &client_event["item"];
                if item["role"] == "user" {
                    last_user = content_text(item.get("content"));
                    prompt_chars += last_user.chars().count();
                }
                vec![event("conversation.item.created", json!({"item": item}))]
            }
            "response.create" => {
                let response_id = state.new_id("resp", '_');
                let item_id = state.new_id("item", '_');
                let text = answer_to("Simulated answer to", &last_user);
                let input_tokens = tokens_for_chars(prompt_chars);
                let output_tokens = tokens_for_chars(text.chars().count());
                let mut replies = vec![event(
                    "response.created",
                    json!({"response": {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}}),
                )];
                for piece in split_for_stream(&text, state.config().stream_chunks) {
                    replies.push(event(
                        delta_event,
                        json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
                    ));
                }
                replies.push(event(
                    done_event,
                    json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
                ));
                replies.push(event(
                    "response.done",
                    json!({"response": {
                        "id": response_id, "object": "realtime.response", "status": "completed",
                        "output": [{"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "content": [{"type": content_type, "text": text}]}],
                        "usage": {
                            "total_tokens": input_tokens + output_tokens,
                            "input_tokens": input_tokens, "output_tokens": output_tokens,
                            "input_token_details": {"cached_tokens": 0, "text_tokens": input_tokens, "audio_tokens": 0},
                            "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0},
                        },
                    }}),
                ));
                replies
            }
            _ => Vec::new(),
        };
        for reply in replies {
            let paced = matches!(&reply, Message::Text(text) if text.as_str().contains(".delta\""));
            if paced && !state.config().chunk_delay.is_zero() {
                tokio::time::sleep(state.config().chunk_delay).await;
            }
            if socket.send(reply).await.is_err() {
                return;
            }
        }
    }
}
