//! The audit record: everything the gateway knows about one call.
//!
//! Field names follow Azure Monitor's `ApiManagementGatewayLogs` and `ApiManagementGatewayLlmLog`
//! columns (serialised in their PascalCase spelling) so that stores can lay the record out in
//! those tables and the published KQL keeps working; the fields Azure lacks (user, tenant, groups,
//! time to first token, cached and reasoning tokens, attempts, flags) carry Gatehouse names.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::operation::OperationId;

/// One call through the gateway, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AuditRecord {
    /// When the gateway started processing the request.
    #[serde(with = "time::serde::rfc3339")]
    pub time_generated: OffsetDateTime,
    /// The gateway's id of the call (a UUIDv7, never the client's `x-request-id`), the join key
    /// between the two tables.
    pub correlation_id: String,
    /// The id of the gateway instance that handled the call.
    pub gateway_id: String,
    /// Lower-cased Azure spec operation id; `None` when the route was not recognised.
    pub operation_id: Option<OperationId>,
    /// The resolved client address (through trusted proxies).
    pub caller_ip_address: String,
    /// The immediate peer address of the TCP connection.
    pub peer_ip_address: String,
    /// HTTP method of the incoming request.
    pub method: String,
    /// URL of the incoming request, with credential query parameters removed.
    pub url: String,
    /// HTTP version of the incoming request.
    pub client_protocol: String,
    /// Status sent to the client.
    pub response_code: u16,
    /// Whether the status sent was 2xx or 3xx.
    pub is_request_success: bool,
    /// Status received from the final backend attempt, if any reached a backend.
    pub backend_response_code: Option<u16>,
    /// Pool member of the final attempt.
    pub backend_id: Option<String>,
    /// URL sent to the final backend (no credentials).
    pub backend_url: Option<String>,
    /// Bytes received from the client.
    pub request_size: u64,
    /// Bytes sent to the client.
    pub response_size: u64,
    /// Milliseconds from the request's arrival to the last byte sent.
    pub total_time: u64,
    /// Milliseconds spent waiting on backends (all attempts).
    pub backend_time: u64,
    /// Milliseconds from the request's arrival to the first response byte sent (streams: first token).
    pub time_to_first_byte: Option<u64>,
    /// Subscription that authenticated the call.
    pub apim_subscription_id: Option<String>,
    /// Product of that subscription.
    pub product_id: Option<String>,
    /// User (Entra object id) behind the call, when a token authenticated it.
    pub user_id: Option<String>,
    /// User's display name or UPN.
    pub user_name: Option<String>,
    /// Entra tenant id.
    pub tenant_id: Option<String>,
    /// Entra groups of the caller.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Deployment (model) name the client asked for.
    pub deployment_name: Option<String>,
    /// Model that answered, from the response.
    pub model_name: Option<String>,
    /// `api-version` sent by the client.
    pub api_version: Option<String>,
    /// Whether the client asked for a stream.
    pub is_stream_completion: bool,
    /// Token usage, when known.
    pub usage: Option<TokenUsage>,
    /// Backend attempts, in order (the last one is the one answered).
    #[serde(default)]
    pub attempts: Vec<BackendAttempt>,
    /// Request body as received (up to the capture limit).
    pub backend_request_body: Option<String>,
    /// Whether the request body was cut at the capture limit.
    pub request_body_truncated: bool,
    /// Response body (up to the capture limit); for streams a reassembled `chat.completion` JSON.
    pub backend_response_body: Option<String>,
    /// Whether the response body was cut at the capture limit.
    pub response_body_truncated: bool,
    /// The prompt (request messages / input), as JSON text.
    pub request_messages: Option<String>,
    /// The completion (response messages / output), as JSON text.
    pub response_messages: Option<String>,
    /// Whether the client hung up before the response was complete.
    pub client_aborted: bool,
    /// Why the gateway itself ended the call with an error, if it did.
    pub last_error_reason: Option<String>,
    /// The error message the gateway returned, if any.
    pub last_error_message: Option<String>,
    /// The record's place in its tamper-evidence chain; set by the audit writer, not the gateway.
    #[serde(default)]
    pub chain: Option<ChainLink>,
}

/// A record's link in a hash chain (one chain per gateway instance and UTC day).
///
/// `content_hash` = SHA-256 of the record's content (request and response bodies, prompt and
/// completion, each as its length and bytes; `gatehouse_audit::chain` has the exact input);
/// `record_hash` = SHA-256 over `previous_hash`, the canonical JSON
/// of the record without content and chain, and `content_hash`. Changing or removing any record
/// breaks every later link; content can expire under retention and the metadata still verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChainLink {
    /// `{gateway_id}/{YYYY-MM-DD}`.
    pub chain_id: String,
    /// Position in the chain, from 0.
    pub sequence: u64,
    /// Hex SHA-256 of the previous record in the chain (64 zeros for the first).
    pub previous_hash: String,
    /// Hex SHA-256 of this record.
    pub record_hash: String,
    /// Hex SHA-256 of this record's content.
    #[serde(default)]
    pub content_hash: String,
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TokenUsage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// Total tokens.
    pub total_tokens: u64,
    /// Prompt tokens served from the cache.
    pub cached_tokens: u64,
    /// Completion tokens spent on reasoning.
    pub reasoning_tokens: u64,
    /// Whether the counts are the gateway's estimate rather than the backend's report.
    pub is_estimate: bool,
}

/// One try of one backend member within a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct BackendAttempt {
    /// Pool member tried.
    pub backend_id: String,
    /// Status it answered, or `None` when the connection failed.
    pub status: Option<u16>,
    /// Milliseconds until its response headers (or the failure).
    pub elapsed_ms: u64,
    /// Why the attempt did not answer the call, when it did not.
    pub error: Option<String>,
}
