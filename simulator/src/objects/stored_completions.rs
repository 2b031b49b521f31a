//! Stored chat completions: a chat completion made with `"store": true` is kept with the
//! messages it answered, and can be listed, read, given new metadata and deleted
//! (`GET|POST|DELETE …/chat/completions/{id}`, `GET …/chat/completions/{id}/messages`,
//! `GET …/chat/completions`), as OpenAI's and Azure OpenAI's stored completions are.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ObjectKind, list_page};
use crate::error::ApiError;
use crate::request::JsonBody;
use crate::state::SimulatorState;

/// Keeps `completion` (as a non-streamed call would have answered it) with the request's
/// `metadata` and `messages`, each message given an id as the service gives them.
pub(crate) fn store(
    state: &SimulatorState,
    completion: &Value,
    request: &Map<String, Value>,
    messages: &[Value],
) {
    let mut kept = completion.clone();
    if let Some(object) = kept.as_object_mut() {
        object.insert(
            "metadata".to_owned(),
            request
                .get("metadata")
                .cloned()
                .unwrap_or_else(|| json!({})),
        );
        object.insert("request_id".to_owned(), Value::Null);
    }
    let id = kept["id"].as_str().unwrap_or_default().to_owned();
    let messages: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(index, message)| {
            let mut message = message.clone();
            if let Some(object) = message.as_object_mut() {
                object.insert("id".to_owned(), json!(format!("{id}-{index}")));
            }
            message
        })
        .collect();
    let content = serde_json::to_vec(&messages).unwrap_or_default();
    state
        .objects()
        .insert(ObjectKind::ChatCompletion, kept, content.into());
}

/// Query of the list call: the model the completions ran on.
#[derive(Deserialize)]
pub(crate) struct ListQuery {
    model: Option<String>,
}

/// `GET …/chat/completions`.
pub(crate) async fn list(
    State(state): State<SimulatorState>,
    Query(query): Query<ListQuery>,
) -> Json<Value> {
    let data = state.objects().list(ObjectKind::ChatCompletion, |body| {
        query
            .model
            .as_deref()
            .is_none_or(|model| body["model"] == model)
    });
    Json(list_page(data))
}

/// `GET …/chat/completions/{id}`.
pub(crate) async fn retrieve(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let objects = state.objects();
    Ok(Json(
        objects.get(ObjectKind::ChatCompletion, &id)?.body.clone(),
    ))
}

/// `POST …/chat/completions/{id}`: replaces the completion's `metadata`, the only member that
/// can change.
pub(crate) async fn update(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let metadata = body
        .get("metadata")
        .filter(|m| m.is_object() || m.is_null())
        .cloned()
        .ok_or_else(|| ApiError::invalid_field("metadata", "'metadata' must be an object."))?;
    let mut objects = state.objects();
    let stored = objects.get_mut(ObjectKind::ChatCompletion, &id)?;
    stored.body["metadata"] = metadata;
    Ok(Json(stored.body.clone()))
}

/// `DELETE …/chat/completions/{id}`.
pub(crate) async fn delete(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let deleted =
        state
            .objects()
            .delete(ObjectKind::ChatCompletion, &id, "chat.completion.deleted")?;
    Ok(Json(deleted))
}

/// `GET …/chat/completions/{id}/messages`: the messages the completion answered.
pub(crate) async fn messages(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let objects = state.objects();
    let stored = objects.get(ObjectKind::ChatCompletion, &id)?;
    let messages: Vec<Value> = serde_json::from_slice(&stored.content).unwrap_or_default();
    Ok(Json(list_page(messages)))
}
