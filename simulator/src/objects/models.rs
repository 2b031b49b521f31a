//! `models`: a fixed catalogue of the models the simulator pretends to serve.

use axum::Json;
use axum::extract::Path;
use serde_json::{Value, json};

use crate::error::ApiError;

/// Model ids and what each can do, as `(id, capability)`.
const MODELS: &[(&str, &str)] = &[
    ("gpt-4o", "chat_completion"),
    ("gpt-4o-mini", "chat_completion"),
    ("gpt-35-turbo-instruct", "completion"),
    ("text-embedding-3-small", "embeddings"),
    ("dall-e-3", "image_generation"),
    ("whisper", "transcription"),
    ("tts", "speech"),
];

/// When the catalogue "was created" (a fixed time, so answers are stable).
const CREATED: u64 = 1_733_011_200;

fn model_object(id: &str, capability: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": CREATED,
        "created_at": CREATED,
        "owned_by": "gatehouse-simulator",
        "status": "succeeded",
        "lifecycle_status": "generally-available",
        "capabilities": {capability: true},
    })
}

/// `GET …/models`.
pub(crate) async fn list() -> Json<Value> {
    let data: Vec<Value> = MODELS
        .iter()
        .map(|(id, cap)| model_object(id, cap))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET …/models/{model_id}`.
pub(crate) async fn retrieve(Path(model_id): Path<String>) -> Result<Json<Value>, ApiError> {
    MODELS
        .iter()
        .find(|(id, _)| *id == model_id)
        .map(|(id, cap)| Json(model_object(id, cap)))
        .ok_or_else(|| ApiError::no_such_object("model", &model_id))
}
