//! What happens to every API request before its handler: it is counted and recorded, its key is
//! checked, and the fault in force may answer instead of the handler. Every response, control
//! routes included, is stamped with the simulator's id.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::{SeenRequest, SimulatorState};

/// The largest request body accepted (uploads included).
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Response header naming the simulator instance that answered.
pub const SIMULATOR_HEADER: &str = "x-gatehouse-simulator";

/// Counts, records, authenticates, then lets the fault or the handler answer.
pub(crate) async fn observe(
    State(state): State<SimulatorState>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "413",
            format!("The request body could not be read or exceeds {MAX_BODY_BYTES} bytes."),
        )
        .into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    state.record(SeenRequest {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: bytes.clone(),
    });
    let simulator = &state.config().id;

    if !authorized(&state, &parts.headers) {
        tracing::debug!(%simulator, method = %parts.method, %path, "simulator refused a request without a valid key");
        return ApiError::unauthorized().into_response();
    }
    let fault_answer = state.fault_switch().take_error_answer();
    if let Some(answer) = fault_answer {
        tracing::info!(%simulator, method = %parts.method, %path, status = answer.status().as_u16(), "simulator answered with a fault");
        return answer;
    }
    let method = parts.method.clone();
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    tracing::debug!(%simulator, %method, %path, status = response.status().as_u16(), "simulator answered");
    response
}

/// Whether the request carries the configured key and bearer token (always, when neither is
/// configured).
fn authorized(state: &SimulatorState, headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer "));
    let config = state.config();
    if let Some(prefix) = &config.require_bearer_prefix {
        let token_ok = bearer
            .is_some_and(|token| token.len() > prefix.len() && token.starts_with(prefix.as_str()));
        if !token_ok || headers.contains_key("api-key") {
            return false;
        }
    }
    let Some(expected) = &config.require_api_key else {
        return true;
    };
    header("api-key") == Some(expected.as_str()) || bearer.is_some_and(|token| token == expected)
}

/// Names the instance in `x-gatehouse-simulator` and adds Azure's `apim-request-id`.
pub(crate) async fn stamp(State(state): State<SimulatorState>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    let id = HeaderValue::from_str(&state.config().id)
        .unwrap_or_else(|_| HeaderValue::from_static("simulator"));
    headers.insert(SIMULATOR_HEADER, id);
    if let Ok(request_id) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        headers.insert("apim-request-id", request_id);
    }
    response
}
