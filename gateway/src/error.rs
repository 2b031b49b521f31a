//! The gateway's errors, each rendered once in the Azure OpenAI / API Management shape.
//!
//! Clients of Azure OpenAI parse `{"error": {"code", "message", "type", "param"}}`; the OpenAI SDKs
//! raise typed exceptions from the status code and read `error.message`. Every error the gateway
//! itself produces uses that shape, a 4xx for anything the caller can fix, and a message that helps
//! without revealing configuration or secrets.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::limits::LimitRefusal;

/// Why the gateway answered a call itself instead of a backend.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No credential in any of the accepted places.
    #[error(
        "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."
    )]
    MissingKey,
    /// A credential that matches no active subscription.
    #[error(
        "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."
    )]
    InvalidKey,
    /// A credential of a subscription past its expiry date.
    #[error(
        "Access denied because the subscription has expired. Ask an administrator to renew it."
    )]
    ExpiredKey,
    /// A subscription's secondary key after its `secondary_expires_at`: the previous key of a
    /// rotation whose overlap has ended.
    #[error(
        "Access denied because this subscription key was replaced and its overlap has ended. Use the subscription's current key."
    )]
    RetiredKey,
    /// An Entra ID token is required and none was presented.
    #[error(
        "Access denied due to missing Entra ID access token. Send one in the Authorization header as `Bearer <token>`."
    )]
    MissingToken,
    /// The Entra ID token was refused.
    #[error("Access denied due to an invalid Entra ID access token: {0}.")]
    InvalidToken(crate::entra::TokenError),
    /// No access rule grants the call.
    #[error("{}", permission_message(deployment.as_deref(), operation))]
    NotPermitted {
        /// The deployment the call names, if one.
        deployment: Option<String>,
        /// The operation id.
        operation: &'static str,
    },
    /// A line of a batch's input file makes a call no access rule grants the caller.
    #[error(
        "Line {line} of the batch's input file uses deployment '{deployment}' for operation '{operation}', which the caller is not permitted to use: no access rule grants it."
    )]
    BatchCallNotPermitted {
        /// The first line making that call.
        line: usize,
        /// The deployment the line names.
        deployment: String,
        /// The operation of the line's `url`.
        operation: &'static str,
    },
    /// A run names no model, and its assistant runs a deployment no access rule grants the
    /// caller.
    #[error(
        "The run's assistant runs deployment '{deployment}', which the caller is not permitted to use for operation '{operation}': no access rule grants it. A run may name a permitted deployment in `model` instead."
    )]
    AssistantModelNotPermitted {
        /// The assistant's `model`.
        deployment: String,
        /// The run's operation.
        operation: &'static str,
    },
    /// A Responses call's `image_generation` tool runs a deployment no access rule grants the
    /// caller.
    #[error(
        "The call's image_generation tool runs deployment '{deployment}', which the caller is not permitted to use for operation '{operation}': no access rule grants it."
    )]
    ToolModelNotPermitted {
        /// The image deployment (header or tool `model`).
        deployment: String,
        /// The call's operation.
        operation: &'static str,
    },
    /// No route of Azure OpenAI or OpenAI matches.
    #[error("Resource not found")]
    UnknownRoute,
    /// A route of the APIs that the gateway does not serve, on purpose; the message says why and
    /// what to use instead.
    #[error("{0}")]
    NotServed(&'static str),
    /// The body is larger than the configured limit.
    #[error("The request body is larger than the gateway accepts ({limit} bytes).")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client paused longer than the gateway waits while sending the request body.
    #[error(
        "The request body did not arrive in time: nothing was received for {} s.",
        idle.as_secs()
    )]
    RequestTimeout {
        /// The longest pause the gateway allows.
        idle: std::time::Duration,
    },
    /// The request is malformed in a way the caller can fix.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, for the caller.
        message: String,
        /// The offending parameter, if one.
        param: Option<&'static str>,
    },
    /// The body's media type is not the one the operation takes.
    #[error("{message}")]
    UnsupportedMediaType {
        /// What was expected and what came.
        message: String,
    },
    /// No pool serves the deployment the call names.
    #[error(
        "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."
    )]
    DeploymentNotFound,
    /// A stateful object the gateway has not seen created.
    #[error("No object with id '{0}' was created through this gateway.")]
    ObjectNotFound(String),
    /// Every member of the pool is throttled.
    #[error("Every backend for this deployment is rate limited. Try again in {} seconds.", crate::limits::whole_seconds(*retry_after))]
    AllThrottled {
        /// The shortest remaining wait among the members.
        retry_after: Duration,
    },
    /// Every member of the pool is failing.
    #[error("No backend for this deployment is available. Try again later.")]
    AllUnavailable,
    /// A list whose objects several members hold, one of which could not be read: a list
    /// without that member's objects would look complete.
    #[error(
        "The list is kept by several backends and one of them cannot be read now (it is rate limited or failing), so no part of it is answered.{}",
        retry_after.map(|wait| format!(" Try again in {} seconds.", crate::limits::whole_seconds(wait))).unwrap_or_default()
    )]
    ListIncomplete {
        /// How long that member asked to be left alone, when it said.
        retry_after: Option<Duration>,
    },
    /// A call that creates an object (a file, a batch, a fine-tuning job, …) reached a member
    /// that then timed out or broke the connection: the member may have created the object, so
    /// the call is not sent to another one, which could create it twice.
    #[error(
        "The backend {} after it was sent this call. The call creates an object and the backend may have created it, so the gateway did not send the call to another backend, which could create it twice: check whether the object exists before you retry.",
        if *timed_out { "did not answer in time" } else { "broke the connection" }
    )]
    OutcomeUnknown {
        /// The member's answer did not begin within its response timeout (else: the connection
        /// broke).
        timed_out: bool,
    },
    /// A call that creates an object was answered with more than the gateway reads whole to
    /// learn the object's id: the object may exist, and is not pinned to its member.
    #[error(
        "The backend's answer to this call, which creates an object, is larger than the gateway reads whole ({limit} bytes), so it was not passed on. The backend may have created the object: check whether it exists before you retry."
    )]
    CreatedAnswerTooLarge {
        /// The most the gateway reads.
        limit: usize,
    },
    /// The gateway is set to fail closed and cannot record calls now.
    #[error(
        "The gateway cannot record calls right now and is set to refuse them until it can. Try again later."
    )]
    AuditUnavailable,
    /// A usage limit refused the call: 429 for a rate, 403 for a quota, 400 for a call larger
    /// than a limit, 503 when the limit store fails closed.
    #[error(transparent)]
    Limit(#[from] LimitRefusal),
    /// The admin endpoint was called without a valid admin token.
    #[error("Access denied: a valid admin token is required.")]
    AdminUnauthorized,
    /// A signed admin request whose signature was refused, and why (it holds no secret).
    #[error("Access denied: {reason}.")]
    AdminSignatureRefused {
        /// Why: malformed, another time than the gateway's clock, or not matching.
        reason: String,
    },
    /// A configuration snapshot failed validation.
    #[error("{message}")]
    InvalidConfig {
        /// The exact field path and the problem.
        message: String,
    },
    /// A configuration snapshot is not newer than the running one.
    #[error("Configuration version {offered} is not newer than the running version {running}.")]
    StaleConfig {
        /// Version offered.
        offered: u64,
        /// Version running.
        running: u64,
        /// Whether the offered snapshot is the running one, field for field (a push repeated).
        same_content: bool,
    },
    /// The client closed its connection or reset its stream before the call reached a backend:
    /// the call is recorded and not sent on. No one receives this answer; the record's status is
    /// 499, as nginx logs such a request.
    #[error("The client closed the request before it was sent to a backend.")]
    ClientClosedRequest,
    /// The gateway's shutdown ended its drain while the call still waited for a backend's answer
    /// (its connection is closed by then, so no one receives this answer): the call is recorded
    /// as it stands and waited for no more.
    #[error("The gateway shut down before the backend answered.")]
    ShuttingDown,
    /// Something in the gateway failed; details are logged, not returned.
    #[error("The gateway failed to process the request.")]
    Internal,
}

fn permission_message(deployment: Option<&str>, operation: &str) -> String {
    match deployment {
        Some(deployment) => format!(
            "The caller is not permitted to use deployment '{deployment}' for operation '{operation}': no access rule grants it."
        ),
        None => format!(
            "The caller is not permitted to perform operation '{operation}': no access rule grants it."
        ),
    }
}

impl GatewayError {
    /// The HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingKey
            | GatewayError::InvalidKey
            | GatewayError::ExpiredKey
            | GatewayError::RetiredKey
            | GatewayError::AdminUnauthorized
            | GatewayError::AdminSignatureRefused { .. }
            | GatewayError::MissingToken => StatusCode::UNAUTHORIZED,
            GatewayError::InvalidToken(error) if error.is_unavailable() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            GatewayError::NotPermitted { .. }
            | GatewayError::BatchCallNotPermitted { .. }
            | GatewayError::AssistantModelNotPermitted { .. }
            | GatewayError::ToolModelNotPermitted { .. } => StatusCode::FORBIDDEN,
            GatewayError::UnknownRoute
            | GatewayError::NotServed(_)
            | GatewayError::DeploymentNotFound
            | GatewayError::ObjectNotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::AllThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::AllUnavailable
            | GatewayError::ListIncomplete { .. }
            | GatewayError::AuditUnavailable
            | GatewayError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::OutcomeUnknown { timed_out: true } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::OutcomeUnknown { timed_out: false }
            | GatewayError::CreatedAnswerTooLarge { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::InvalidConfig { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::StaleConfig { .. } => StatusCode::CONFLICT,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::ClientClosedRequest => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            GatewayError::Limit(refusal) => match refusal {
                LimitRefusal::Rate { .. } => StatusCode::TOO_MANY_REQUESTS,
                LimitRefusal::Quota { .. } => StatusCode::FORBIDDEN,
                LimitRefusal::TooLarge { .. } => StatusCode::BAD_REQUEST,
                LimitRefusal::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// A low-cardinality name of the error, for metrics and the audit record.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::MissingKey => "missing_key",
            GatewayError::InvalidKey => "invalid_key",
            GatewayError::ExpiredKey => "expired_key",
            GatewayError::RetiredKey => "retired_key",
            GatewayError::MissingToken => "missing_token",
            GatewayError::InvalidToken(error) if error.is_unavailable() => {
                "token_validation_unavailable"
            }
            GatewayError::InvalidToken(_) => "invalid_token",
            GatewayError::NotPermitted { .. }
            | GatewayError::BatchCallNotPermitted { .. }
            | GatewayError::AssistantModelNotPermitted { .. }
            | GatewayError::ToolModelNotPermitted { .. } => "not_permitted",
            GatewayError::UnknownRoute => "unknown_route",
            GatewayError::NotServed(_) => "not_served",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::RequestTimeout { .. } => "request_timeout",
            GatewayError::BadRequest { .. } => "bad_request",
            GatewayError::UnsupportedMediaType { .. } => "unsupported_media_type",
            GatewayError::DeploymentNotFound => "deployment_not_found",
            GatewayError::ObjectNotFound(_) => "object_not_found",
            GatewayError::AllThrottled { .. } => "all_backends_throttled",
            GatewayError::AllUnavailable => "all_backends_unavailable",
            GatewayError::ListIncomplete { .. } => "list_incomplete",
            GatewayError::OutcomeUnknown { .. } | GatewayError::CreatedAnswerTooLarge { .. } => {
                "backend_outcome_unknown"
            }
            GatewayError::AuditUnavailable => "audit_unavailable",
            GatewayError::AdminUnauthorized | GatewayError::AdminSignatureRefused { .. } => {
                "admin_unauthorized"
            }
            GatewayError::InvalidConfig { .. } => "invalid_config",
            GatewayError::StaleConfig { .. } => "stale_config",
            GatewayError::Internal => "internal",
            GatewayError::ClientClosedRequest => "client_closed_request",
            GatewayError::ShuttingDown => crate::in_flight::SHUTDOWN_REASON,
            GatewayError::Limit(refusal) => refusal.reason(),
        }
    }

    /// The `error.code` value of the body.
    fn code(&self) -> String {
        match self {
            GatewayError::DeploymentNotFound => "DeploymentNotFound".to_owned(),
            GatewayError::BadRequest { .. }
            | GatewayError::Limit(LimitRefusal::TooLarge { .. }) => {
                "invalid_request_error".to_owned()
            }
            GatewayError::InvalidConfig { .. } => "InvalidConfiguration".to_owned(),
            GatewayError::NotPermitted { .. }
            | GatewayError::BatchCallNotPermitted { .. }
            | GatewayError::AssistantModelNotPermitted { .. }
            | GatewayError::ToolModelNotPermitted { .. } => "PermissionDenied".to_owned(),
            _ => self.status().as_u16().to_string(),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let param = match &self {
            GatewayError::BadRequest { param, .. } => *param,
            _ => None,
        };
        let error_type = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let mut body = json!({
            "error": {
                "code": self.code(),
                "message": self.to_string(),
                "type": error_type,
                "param": param,
            },
            // API Management's own answers carry these two fields; clients written against APIM read them.
            "statusCode": status.as_u16(),
            "message": self.to_string(),
        });
        if let GatewayError::StaleConfig {
            running,
            same_content,
            ..
        } = &self
        {
            // For the portal: a push it repeats (a lost answer, a gateway registered again) finds
            // the version already running with the same content, and is done; the same version
            // with other content (the configuration file's own `version: 1`) is not.
            body["runningVersion"] = json!(running);
            body["sameContent"] = json!(same_content);
        }
        let mut response = (status, axum::Json(body)).into_response();
        let retry_after = match &self {
            GatewayError::AllThrottled { retry_after } => Some(*retry_after),
            GatewayError::ListIncomplete { retry_after } => *retry_after,
            GatewayError::Limit(refusal) => refusal.retry_after(),
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            let headers = response.headers_mut();
            let seconds = crate::limits::whole_seconds(retry_after);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
            headers.insert("retry-after-ms", HeaderValue::from(millis.max(1)));
        }
        response
    }
}
