//! `files`: multipart upload, list, retrieve, content (the exact bytes uploaded), delete.

use axum::Json;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ObjectKind, list_page};
use crate::error::ApiError;
use crate::request::Form;
use crate::state::{SimulatorState, unix_now};

/// Purposes Azure OpenAI and OpenAI accept for an upload.
const PURPOSES: &[&str] = &[
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "evals",
    "fine-tune",
    "fine-tune-results",
    "user_data",
    "vision",
];

/// `POST …/files` (multipart: `purpose`, `file`).
pub(crate) async fn upload(
    State(state): State<SimulatorState>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let form = Form::read(multipart).await?;
    let purpose = form
        .field("purpose")
        .ok_or_else(|| ApiError::invalid_field("purpose", "The 'purpose' field is required."))?;
    if !PURPOSES.contains(&purpose) {
        return Err(ApiError::invalid_field(
            "purpose",
            format!("'{purpose}' is not one of {}.", PURPOSES.join(", ")),
        ));
    }
    let file = form.require_file()?;
    let body = json!({
        "id": state.new_id("file", '-'),
        "object": "file",
        "bytes": file.bytes.len(),
        "created_at": unix_now(),
        "filename": file.filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": null,
    });
    state
        .objects()
        .insert(ObjectKind::File, body.clone(), file.bytes.clone());
    Ok(Json(body))
}

/// Query of `GET …/files`.
#[derive(Debug, Deserialize)]
pub(crate) struct FileFilter {
    purpose: Option<String>,
}

/// `GET …/files[?purpose=…]`.
pub(crate) async fn list(
    State(state): State<SimulatorState>,
    Query(filter): Query<FileFilter>,
) -> Json<Value> {
    let files = state
        .objects()
        .list(ObjectKind::File, |file| match &filter.purpose {
            Some(purpose) => file.get("purpose").and_then(Value::as_str) == Some(purpose.as_str()),
            None => true,
        });
    Json(list_page(files))
}

/// `GET …/files/{file_id}`.
pub(crate) async fn retrieve(
    State(state): State<SimulatorState>,
    Path(file_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        state
            .objects()
            .get(ObjectKind::File, &file_id)?
            .body
            .clone(),
    ))
}

/// `GET …/files/{file_id}/content`: the bytes exactly as uploaded.
pub(crate) async fn content(
    State(state): State<SimulatorState>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let bytes = state
        .objects()
        .get(ObjectKind::File, &file_id)?
        .content
        .clone();
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// `DELETE …/files/{file_id}`.
pub(crate) async fn delete(
    State(state): State<SimulatorState>,
    Path(file_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.objects().delete(
        ObjectKind::File,
        &file_id,
        "file",
    )?))
}
