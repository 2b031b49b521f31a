//! `embeddings`: deterministic unit vectors derived from the input text.

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::answer::tokens_for_chars;
use crate::error::ApiError;
use crate::request::{DeploymentInPath, JsonBody};
use crate::state::SimulatorState;

/// Vector length when the request does not ask for `dimensions`.
const DEFAULT_DIMENSIONS: usize = 8;
/// The largest `dimensions` accepted.
const MAX_DIMENSIONS: usize = 4096;

/// `POST …/embeddings`.
pub(crate) async fn create(
    State(_state): State<SimulatorState>,
    deployment: DeploymentInPath,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let model = deployment.model(body.get("model").and_then(Value::as_str))?;
    let inputs = read_inputs(body.get("input"))?;
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(value) => value
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .ok_or_else(|| {
                ApiError::invalid_field(
                    "dimensions",
                    format!("'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}."),
                )
            })?,
    };
    let base64 = match body.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_field(
                "encoding_format",
                format!("'{other}' is not one of 'float', 'base64'."),
            ));
        }
    };
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            prompt_tokens += input.tokens;
            let vector = unit_vector(&input.text, dimensions);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })))
}

/// One input to embed: the text the vector is derived from and the tokens it costs.
struct EmbeddingInput {
    text: String,
    tokens: u64,
}

/// Reads `input`: a string, an array of strings, an array of tokens or of token arrays.
fn read_inputs(input: Option<&Value>) -> Result<Vec<EmbeddingInput>, ApiError> {
    let invalid = || {
        ApiError::invalid_field(
            "input",
            "'input' must be a non-empty string, array of strings, or tokens.",
        )
    };
    let text = |text: &str| EmbeddingInput {
        text: text.to_owned(),
        tokens: tokens_for_chars(text.chars().count()),
    };
    let tokens = |ids: &[Value]| EmbeddingInput {
        text: Value::from(ids.to_vec()).to_string(),
        tokens: u64::try_from(ids.len()).unwrap_or(u64::MAX),
    };
    match input {
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![text(s)]),
        Some(Value::Array(items)) if !items.is_empty() => {
            if items.iter().all(Value::is_number) {
                return Ok(vec![tokens(items)]);
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(s) if !s.is_empty() => Ok(text(s)),
                    Value::Array(ids) if !ids.is_empty() => Ok(tokens(ids)),
                    _ => Err(invalid()),
                })
                .collect()
        }
        _ => Err(invalid()),
    }
}

/// A vector of length one, the same for the same text and dimension.
fn unit_vector(text: &str, dimensions: usize) -> Vec<f32> {
    // FNV-1a seeds a splitmix64 sequence: cheap, stable across platforms and releases.
    let mut seed = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // Top 53 bits as a fraction in [0, 1), moved to [-1, 1).
            (z >> 11) as f64 / (1_u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        let mut basis = vec![0.0; dimensions];
        if let Some(first) = basis.first_mut() {
            *first = 1.0;
        }
        return basis;
    }
    raw.iter().map(|x| (x / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_unit_length_and_deterministic() {
        let a = unit_vector("hello", 8);
        assert_eq!(a.len(), 8);
        assert_eq!(a, unit_vector("hello", 8));
        assert_ne!(a, unit_vector("hello!", 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
}
