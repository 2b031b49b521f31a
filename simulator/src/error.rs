//! The one error type of the simulator, rendered as Azure OpenAI renders errors:
//! `{"error": {"code", "message", "type", "param"}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answer in Azure OpenAI's shape.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    kind: Option<&'static str>,
    param: Option<String>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub(crate) fn new(
        status: StatusCode,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            kind: None,
            param: None,
        }
    }

    /// Azure's answer for a route or an object it does not know.
    pub(crate) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "404", "Resource not found")
    }

    /// A 404 for an object id this instance never created (or has deleted).
    pub(crate) fn no_such_object(kind: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "404",
            format!("No {kind} with id '{id}' found on this backend."),
        )
    }

    /// A 400 about one request field.
    pub(crate) fn invalid_field(param: &str, message: impl Into<String>) -> Self {
        Self {
            kind: Some("invalid_request_error"),
            param: Some(param.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "400", message)
        }
    }

    /// A 400 for a request whose body could not be read as expected.
    pub(crate) fn bad_body(message: impl Into<String>) -> Self {
        Self {
            kind: Some("invalid_request_error"),
            ..Self::new(StatusCode::BAD_REQUEST, "400", message)
        }
    }

    /// Azure's answer to a missing or wrong `api-key`.
    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        )
    }

    /// A request on a known path with a method the path does not take.
    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "405",
            "The requested method is not supported for this resource.",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "type": self.kind,
                "param": self.param,
            }
        });
        (self.status, Json(body)).into_response()
    }
}

/// Fallback for paths no route matches.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// Fallback for known paths called with the wrong method.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
