//! `images/generations`: a tiny valid PNG, as many times as asked.

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::answer::answer_to;
use crate::error::ApiError;
use crate::request::{DeploymentInPath, JsonBody};
use crate::state::{SimulatorState, unix_now};

/// A 1×1 PNG (one blue-grey pixel).
pub(crate) const TINY_PNG: [u8; 69] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x30, 0x4e, 0x9b, 0x09,
    0x00, 0x02, 0x02, 0x01, 0x33, 0x68, 0x7a, 0x31, 0xf8, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The most images one request may ask for.
const MAX_IMAGES: u64 = 10;

/// `POST …/images/generations`.
pub(crate) async fn generate(
    State(_state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    deployment.model(body.get("model").and_then(Value::as_str))?;
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::invalid_field("prompt", "'prompt' is required."))?;
    let count = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(n) => n
            .as_u64()
            .filter(|n| (1..=MAX_IMAGES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_field("n", format!("'n' must be from 1 to {MAX_IMAGES}."))
            })?,
    };
    let png = base64::engine::general_purpose::STANDARD.encode(TINY_PNG);
    let as_url = body.get("response_format").and_then(Value::as_str) == Some("url");
    let revised_prompt = answer_to("Simulated image of", prompt);
    let image = if as_url {
        json!({"url": format!("data:image/png;base64,{png}"), "revised_prompt": revised_prompt})
    } else {
        json!({"b64_json": png, "revised_prompt": revised_prompt})
    };
    let data: Vec<Value> = (0..count).map(|_| image.clone()).collect();
    Ok(Json(json!({"created": unix_now(), "data": data})))
}
