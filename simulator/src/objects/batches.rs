//! `batches`: create (the input file must exist on this instance), retrieve, list, cancel.
//! A simulated batch stays `validating` until cancelled; nothing runs it.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::{ObjectKind, list_page};
use crate::error::ApiError;
use crate::request::JsonBody;
use crate::state::{SimulatorState, unix_now};

/// How long a batch may run, in seconds (the only window Azure offers: 24h).
const COMPLETION_WINDOW_SECS: u64 = 24 * 3600;

/// `POST …/batches`.
pub(crate) async fn create(
    State(state): State<SimulatorState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let input_file_id = body
        .get("input_file_id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_field("input_file_id", "'input_file_id' is required."))?;
    let mut objects = state.objects();
    objects.get(ObjectKind::File, input_file_id)?;
    let now = unix_now();
    let batch = json!({
        "id": state.new_id("batch", '_'),
        "object": "batch",
        "endpoint": body.get("endpoint").cloned().unwrap_or_else(|| json!("/chat/completions")),
        "errors": null,
        "input_file_id": input_file_id,
        "completion_window": body.get("completion_window").cloned().unwrap_or_else(|| json!("24h")),
        "status": "validating",
        "output_file_id": null,
        "error_file_id": null,
        "created_at": now,
        "in_progress_at": null,
        "expires_at": now + COMPLETION_WINDOW_SECS,
        "finalizing_at": null,
        "completed_at": null,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.get("metadata").cloned().unwrap_or(Value::Null),
    });
    objects.insert(ObjectKind::Batch, batch.clone(), bytes::Bytes::new());
    Ok(Json(batch))
}

/// `GET …/batches/{batch_id}`.
pub(crate) async fn retrieve(
    State(state): State<SimulatorState>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .objects()
            .get(ObjectKind::Batch, &batch_id)?
            .body
            .clone(),
    ))
}

/// `GET …/batches`.
pub(crate) async fn list(State(state): State<SimulatorState>) -> Json<Value> {
    Json(list_page(state.objects().list(ObjectKind::Batch, |_| true)))
}

/// `POST …/batches/{batch_id}/cancel`.
pub(crate) async fn cancel(
    State(state): State<SimulatorState>,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let mut objects = state.objects();
    let batch = objects.get_mut(ObjectKind::Batch, &batch_id)?;
    if let Some(map) = batch.body.as_object_mut() {
        let now = unix_now();
        map.insert("status".to_owned(), json!("cancelled"));
        map.insert("cancelling_at".to_owned(), json!(now));
        map.insert("cancelled_at".to_owned(), json!(now));
    }
    Ok(Json(batch.body.clone()))
}
