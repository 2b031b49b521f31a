//! Assistants, threads and vector stores, minimally: create, retrieve, delete (and list for
//! assistants and vector stores). Enough for a client to prove where each object lives.

use axum::Json;
use axum::extract::{Path, State};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{ObjectKind, list_page};
use crate::error::ApiError;
use crate::request::JsonBody;
use crate::state::{SimulatorState, unix_now};

/// A field of the request, or a default.
fn field(body: &Map<String, Value>, name: &str, default: Value) -> Value {
    body.get(name).cloned().unwrap_or(default)
}

/// `POST …/assistants`.
pub(crate) async fn create_assistant(
    State(state): State<SimulatorState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field("model", "'model' is required."))?;
    let assistant = json!({
        "id": state.new_id("asst", '_'),
        "object": "assistant",
        "created_at": unix_now(),
        "name": field(&body, "name", Value::Null),
        "description": field(&body, "description", Value::Null),
        "model": model,
        "instructions": field(&body, "instructions", Value::Null),
        "tools": field(&body, "tools", json!([])),
        "tool_resources": field(&body, "tool_resources", json!({})),
        "metadata": field(&body, "metadata", json!({})),
        "temperature": field(&body, "temperature", json!(1.0)),
        "top_p": field(&body, "top_p", json!(1.0)),
        "response_format": field(&body, "response_format", json!("auto")),
    });
    state
        .objects()
        .insert(ObjectKind::Assistant, assistant.clone(), Bytes::new());
    Ok(Json(assistant))
}

/// `GET …/assistants`.
pub(crate) async fn list_assistants(State(state): State<SimulatorState>) -> Json<Value> {
    Json(list_page(
        state.objects().list(ObjectKind::Assistant, |_| true),
    ))
}

/// `GET …/assistants/{assistant_id}`.
pub(crate) async fn retrieve_assistant(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .objects()
            .get(ObjectKind::Assistant, &id)?
            .body
            .clone(),
    ))
}

/// `DELETE …/assistants/{assistant_id}`.
pub(crate) async fn delete_assistant(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.objects().delete(
        ObjectKind::Assistant,
        &id,
        "assistant.deleted",
    )?))
}

/// `POST …/threads`.
pub(crate) async fn create_thread(
    State(state): State<SimulatorState>,
    JsonBody(body): JsonBody,
) -> Json<Value> {
    let thread = json!({
        "id": state.new_id("thread", '_'),
        "object": "thread",
        "created_at": unix_now(),
        "metadata": field(&body, "metadata", json!({})),
        "tool_resources": field(&body, "tool_resources", json!({})),
    });
    state
        .objects()
        .insert(ObjectKind::Thread, thread.clone(), Bytes::new());
    Json(thread)
}

/// `GET …/threads/{thread_id}`.
pub(crate) async fn retrieve_thread(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state.objects().get(ObjectKind::Thread, &id)?.body.clone(),
    ))
}

/// `DELETE …/threads/{thread_id}`.
pub(crate) async fn delete_thread(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.objects().delete(
        ObjectKind::Thread,
        &id,
        "thread.deleted",
    )?))
}

/// `POST …/vector_stores`.
pub(crate) async fn create_vector_store(
    State(state): State<SimulatorState>,
    JsonBody(body): JsonBody,
) -> Json<Value> {
    let files = body
        .get("file_ids")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let store = json!({
        "id": state.new_id("vs", '_'),
        "object": "vector_store",
        "created_at": unix_now(),
        "name": field(&body, "name", Value::Null),
        "usage_bytes": 0,
        "file_counts": {"in_progress": 0, "completed": files, "failed": 0, "cancelled": 0, "total": files},
        "status": "completed",
        "expires_after": field(&body, "expires_after", Value::Null),
        "expires_at": null,
        "last_active_at": unix_now(),
        "metadata": field(&body, "metadata", json!({})),
    });
    state
        .objects()
        .insert(ObjectKind::VectorStore, store.clone(), Bytes::new());
    Json(store)
}

/// `GET …/vector_stores`.
pub(crate) async fn list_vector_stores(State(state): State<SimulatorState>) -> Json<Value> {
    Json(list_page(
        state.objects().list(ObjectKind::VectorStore, |_| true),
    ))
}

/// `GET …/vector_stores/{vector_store_id}`.
pub(crate) async fn retrieve_vector_store(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .objects()
            .get(ObjectKind::VectorStore, &id)?
            .body
            .clone(),
    ))
}

/// `DELETE …/vector_stores/{vector_store_id}`.
pub(crate) async fn delete_vector_store(
    State(state): State<SimulatorState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.objects().delete(
        ObjectKind::VectorStore,
        &id,
        "vector_store.deleted",
    )?))
}
