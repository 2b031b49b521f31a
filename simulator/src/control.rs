//! `/_simulator/…`: switch faults and read counters from outside the process (the run command,
//! Python tests). These routes are not counted, recorded, authenticated or faulted.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::fault::{Fault, FaultRequest};
use crate::request::JsonBody;
use crate::state::SimulatorState;

/// `POST /fault`, `GET /fault`, `GET /stats`, to be nested under `/_simulator`.
pub(crate) fn router() -> axum::Router<SimulatorState> {
    Router::new()
        .route("/fault", post(set_fault).get(stats))
        .route("/stats", get(stats))
}

/// `POST /_simulator/fault` with e.g. `{"kind":"throttle","retry_after_ms":2000,"times":1}`,
/// `{"kind":"server_error","status":503}`, `{"kind":"break_stream_after","chunks":3}`,
/// `{"kind":"stall_stream_after","chunks":3}`, `{"kind":"none"}`.
async fn set_fault(
    State(state): State<SimulatorState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let request: FaultRequest = serde_json::from_value(Value::Object(body))
        .map_err(|e| ApiError::bad_body(format!("Not a fault: {e}")))?;
    let fault = Fault::try_from(request).map_err(ApiError::bad_body)?;
    state.set_fault(fault);
    Ok(stats(State(state)).await)
}

/// `GET /_simulator/stats`: `{"id", "hits", "fault"}`.
async fn stats(State(state): State<SimulatorState>) -> Json<Value> {
    Json(json!({
        "id": state.config().id,
        "hits": state.hits(),
        "fault": state.fault().to_json(),
    }))
}
