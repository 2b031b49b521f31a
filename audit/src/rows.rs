//! An audit record laid out as rows of Azure Monitor's API Management tables.
//!
//! Every store writes these rows — SQL tables and Log Analytics custom tables alike — so the column
//! names and types are defined once. `ApiManagementGatewayLogs` gets one row per call;
//! `ApiManagementGatewayLlmLog` gets a header row (`SequenceNumber` 0, with `DeploymentName`, model
//! and tokens), then the prompt and the completion in pieces of at most [`MESSAGE_PIECE_BYTES`],
//! as API Management splits them (`azure-specs.md` §3.2).

use gatehouse_schema::AuditRecord;
use serde::Serialize;
use time::OffsetDateTime;

/// Largest piece of a prompt or completion in one LLM-log row (API Management's 32 KB).
pub const MESSAGE_PIECE_BYTES: usize = 32 * 1024;

/// One row of `ApiManagementGatewayLogs`, with Gatehouse's extra columns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GatewayLogRow {
    /// When processing started.
    #[serde(with = "time::serde::rfc3339")]
    pub time_generated: OffsetDateTime,
    /// Join key with the LLM table.
    pub correlation_id: String,
    /// Constant `Microsoft.ApiManagement/GatewayLogs`.
    pub operation_name: &'static str,
    /// Constant `GatewayLogs`.
    pub category: &'static str,
    /// Gateway instance.
    pub gateway_id: String,
    /// Lower-cased spec operation id (empty when the route was unknown).
    pub operation_id: String,
    /// Resolved client address.
    pub caller_ip_address: String,
    /// Immediate peer.
    pub peer_ip_address: String,
    /// HTTP method.
    pub method: String,
    /// Request URL (credentials redacted).
    pub url: String,
    /// HTTP version.
    pub client_protocol: String,
    /// Status sent.
    pub response_code: i32,
    /// 2xx or 3xx.
    pub is_request_success: bool,
    /// Status of the final backend attempt.
    pub backend_response_code: Option<i32>,
    /// Member of the final attempt.
    pub backend_id: Option<String>,
    /// URL of the final attempt.
    pub backend_url: Option<String>,
    /// Bytes received.
    pub request_size: i64,
    /// Bytes sent.
    pub response_size: i64,
    /// Milliseconds in all.
    pub total_time: i64,
    /// Milliseconds on backends.
    pub backend_time: i64,
    /// Milliseconds to the first byte sent.
    pub time_to_first_byte: Option<i64>,
    /// Milliseconds to the first generated output sent (see `AuditRecord::time_to_first_token`).
    pub time_to_first_token: Option<i64>,
    /// Subscription id.
    pub apim_subscription_id: Option<String>,
    /// Product id.
    pub product_id: Option<String>,
    /// User object id.
    pub user_id: Option<String>,
    /// User name or UPN.
    pub user_name: Option<String>,
    /// Entra tenant of the caller (`TenantId` is Log Analytics' workspace column).
    pub entra_tenant_id: Option<String>,
    /// Entra groups, as a JSON array.
    pub groups: String,
    /// Deployment asked for.
    pub deployment_name: Option<String>,
    /// Model that answered.
    pub model_name: Option<String>,
    /// Client's `api-version`.
    pub api_version: Option<String>,
    /// Whether the client asked for a stream.
    pub is_stream_completion: bool,
    /// Prompt tokens.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens.
    pub completion_tokens: Option<i64>,
    /// Total tokens.
    pub total_tokens: Option<i64>,
    /// Cached prompt tokens.
    pub cached_tokens: Option<i64>,
    /// Reasoning tokens.
    pub reasoning_tokens: Option<i64>,
    /// Whether token counts are the gateway's estimate.
    pub tokens_estimated: bool,
    /// Backend attempts, as a JSON array.
    pub attempts: String,
    /// Number of backend attempts.
    pub attempt_count: i32,
    /// Request body (up to the capture limit).
    pub backend_request_body: Option<String>,
    /// Response body; for streams the reassembled completion JSON.
    pub backend_response_body: Option<String>,
    /// Request body cut at the limit.
    pub request_body_truncated: bool,
    /// Response body cut at the limit.
    pub response_body_truncated: bool,
    /// The client hung up early.
    pub client_aborted: bool,
    /// Gateway error reason.
    pub last_error_reason: Option<String>,
    /// Gateway error message.
    pub last_error_message: Option<String>,
    /// Hash chain id.
    pub chain_id: Option<String>,
    /// Position in the chain.
    pub chain_sequence: Option<i64>,
    /// Previous record's hash.
    pub previous_hash: Option<String>,
    /// This record's hash.
    pub record_hash: Option<String>,
    /// The hash of this record's content.
    pub content_hash: Option<String>,
}

/// One row of `ApiManagementGatewayLlmLog`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LlmLogRow {
    /// When processing started.
    #[serde(with = "time::serde::rfc3339")]
    pub time_generated: OffsetDateTime,
    /// Join key with the gateway table.
    pub correlation_id: String,
    /// Operation id (lower-cased spec id).
    pub operation_name: String,
    /// Deployment asked for; empty on message rows (the labs filter header rows with `DeploymentName != ''`).
    pub deployment_name: String,
    /// Model that answered (header row).
    pub model_name: String,
    /// Client's `api-version`.
    pub api_version: String,
    /// Whether the call streamed.
    pub is_stream_completion: bool,
    /// Prompt tokens (header row).
    pub prompt_tokens: Option<i64>,
    /// Completion tokens (header row).
    pub completion_tokens: Option<i64>,
    /// Total tokens (header row).
    pub total_tokens: Option<i64>,
    /// 0 for the header, then 1, 2, … for message pieces in order.
    pub sequence_number: i32,
    /// A piece of the prompt (JSON text, split on character boundaries).
    pub request_messages: Option<String>,
    /// A piece of the completion.
    pub response_messages: Option<String>,
}

fn count(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl GatewayLogRow {
    /// The gateway-log row of a record.
    pub fn from_record(record: &AuditRecord) -> GatewayLogRow {
        let usage = record.usage;
        GatewayLogRow {
            time_generated: record.time_generated,
            correlation_id: record.correlation_id.clone(),
            operation_name: "Microsoft.ApiManagement/GatewayLogs",
            category: "GatewayLogs",
            gateway_id: record.gateway_id.clone(),
            operation_id: record
                .operation_id
                .map(|o| o.as_str().to_owned())
                .unwrap_or_default(),
            caller_ip_address: record.caller_ip_address.clone(),
            peer_ip_address: record.peer_ip_address.clone(),
            method: record.method.clone(),
            url: record.url.clone(),
            client_protocol: record.client_protocol.clone(),
            response_code: i32::from(record.response_code),
            is_request_success: record.is_request_success,
            backend_response_code: record.backend_response_code.map(i32::from),
            backend_id: record.backend_id.clone(),
            backend_url: record.backend_url.clone(),
            request_size: count(record.request_size),
            response_size: count(record.response_size),
            total_time: count(record.total_time),
            backend_time: count(record.backend_time),
            time_to_first_byte: record.time_to_first_byte.map(count),
            time_to_first_token: record.time_to_first_token.map(count),
            apim_subscription_id: record.apim_subscription_id.clone(),
            product_id: record.product_id.clone(),
            user_id: record.user_id.clone(),
            user_name: record.user_name.clone(),
            entra_tenant_id: record.tenant_id.clone(),
            groups: serde_json::to_string(&record.groups).unwrap_or_else(|_| "[]".to_owned()),
            deployment_name: record.deployment_name.clone(),
            model_name: record.model_name.clone(),
            api_version: record.api_version.clone(),
            is_stream_completion: record.is_stream_completion,
            prompt_tokens: usage.map(|u| count(u.prompt_tokens)),
            completion_tokens: usage.map(|u| count(u.completion_tokens)),
            total_tokens: usage.map(|u| count(u.total_tokens)),
            cached_tokens: usage.map(|u| count(u.cached_tokens)),
            reasoning_tokens: usage.map(|u| count(u.reasoning_tokens)),
            tokens_estimated: usage.is_some_and(|u| u.is_estimate),
            attempts: serde_json::to_string(&record.attempts).unwrap_or_else(|_| "[]".to_owned()),
            attempt_count: i32::try_from(record.attempts.len()).unwrap_or(i32::MAX),
            backend_request_body: record.backend_request_body.clone(),
            backend_response_body: record.backend_response_body.clone(),
            request_body_truncated: record.request_body_truncated,
            response_body_truncated: record.response_body_truncated,
            client_aborted: record.client_aborted,
            last_error_reason: record.last_error_reason.clone(),
            last_error_message: record.last_error_message.clone(),
            chain_id: record.chain.as_ref().map(|c| c.chain_id.clone()),
            chain_sequence: record.chain.as_ref().map(|c| count(c.sequence)),
            previous_hash: record.chain.as_ref().map(|c| c.previous_hash.clone()),
            record_hash: record.chain.as_ref().map(|c| c.record_hash.clone()),
            content_hash: record.chain.as_ref().map(|c| c.content_hash.clone()),
        }
    }
}

impl LlmLogRow {
    /// The LLM-log rows of a record: none for a call that is not model inference and carries
    /// no messages (a streamed `submit_tool_outputs`, which continues a run, carries the run's
    /// answer in `ResponseMessages`, and its pieces are kept as an inference call's are).
    pub fn from_record(record: &AuditRecord) -> Vec<LlmLogRow> {
        let has_messages = record.request_messages.is_some() || record.response_messages.is_some();
        let Some(operation) = record
            .operation_id
            .filter(|o| o.is_inference() || has_messages)
        else {
            return Vec::new();
        };
        let usage = record.usage;
        let header = LlmLogRow {
            time_generated: record.time_generated,
            correlation_id: record.correlation_id.clone(),
            operation_name: operation.as_str().to_owned(),
            deployment_name: record.deployment_name.clone().unwrap_or_default(),
            model_name: record.model_name.clone().unwrap_or_default(),
            api_version: record.api_version.clone().unwrap_or_default(),
            is_stream_completion: record.is_stream_completion,
            prompt_tokens: usage.map(|u| count(u.prompt_tokens)),
            completion_tokens: usage.map(|u| count(u.completion_tokens)),
            total_tokens: usage.map(|u| count(u.total_tokens)),
            sequence_number: 0,
            request_messages: None,
            response_messages: None,
        };
        let message_row =
            |sequence: usize, request: Option<String>, response: Option<String>| LlmLogRow {
                deployment_name: String::new(),
                model_name: String::new(),
                prompt_tokens: None,
                completion_tokens: None,
                total_tokens: None,
                sequence_number: i32::try_from(sequence).unwrap_or(i32::MAX),
                request_messages: request,
                response_messages: response,
                ..header.clone()
            };
        let mut rows = vec![header.clone()];
        for piece in record
            .request_messages
            .as_deref()
            .map(message_pieces)
            .unwrap_or_default()
        {
            rows.push(message_row(rows.len(), Some(piece.to_owned()), None));
        }
        for piece in record
            .response_messages
            .as_deref()
            .map(message_pieces)
            .unwrap_or_default()
        {
            rows.push(message_row(rows.len(), None, Some(piece.to_owned())));
        }
        rows
    }
}

/// The LLM-log pieces of a prompt or a completion: an empty one is one empty piece, so that a
/// record's `Some("")` is stored apart from its `None` and reads back as it was written (the
/// record's hash chain link tells the two apart).
fn message_pieces(text: &str) -> Vec<&str> {
    let pieces = split_pieces(text);
    if pieces.is_empty() { vec![""] } else { pieces }
}

/// Splits text into pieces of at most [`MESSAGE_PIECE_BYTES`], never inside a character.
pub fn split_pieces(text: &str) -> Vec<&str> {
    split_at_most(text, MESSAGE_PIECE_BYTES)
}

/// Splits text into pieces of at most `limit` bytes (at least one character each), on character
/// boundaries.
pub fn split_at_most(text: &str, limit: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(limit.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_schema::OperationId;
    use gatehouse_schema::audit::TokenUsage;

    fn record() -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "TimeGenerated": "2026-12-01T10:00:00Z", "CorrelationId": "c-1", "GatewayId": "gw", "OperationId": "chatcompletions_create",
            "CallerIpAddress": "198.51.100.7", "PeerIpAddress": "10.0.0.1", "Method": "POST", "Url": "/openai/deployments/gpt-4o/chat/completions",
            "ClientProtocol": "HTTP/1.1", "ResponseCode": 200, "IsRequestSuccess": true, "BackendResponseCode": 200, "BackendId": "east",
            "BackendUrl": "https://east/openai", "RequestSize": 100, "ResponseSize": 200, "TotalTime": 30, "BackendTime": 25,
            "TimeToFirstByte": 10, "ApimSubscriptionId": "team-a", "ProductId": null, "UserId": null, "UserName": null, "TenantId": null,
            "Groups": ["g1"], "DeploymentName": "gpt-4o", "ModelName": "gpt-4o-2024-08-06", "ApiVersion": "2024-10-21",
            "IsStreamCompletion": true, "Usage": {"PromptTokens": 5, "CompletionTokens": 7, "TotalTokens": 12, "CachedTokens": 0, "ReasoningTokens": 0, "IsEstimate": false},
            "Attempts": [], "BackendRequestBody": "{}", "RequestBodyTruncated": false, "BackendResponseBody": "{}", "ResponseBodyTruncated": false,
            "RequestMessages": "[\"hi\"]", "ResponseMessages": "[\"hello\"]", "ClientAborted": false, "LastErrorReason": null, "LastErrorMessage": null
        }))
        .unwrap()
    }

    #[test]
    fn gateway_row_uses_azure_names_and_types() {
        let row = serde_json::to_value(GatewayLogRow::from_record(&record())).unwrap();
        assert_eq!(row["OperationId"], "chatcompletions_create");
        assert_eq!(row["ResponseCode"], 200);
        assert_eq!(row["TotalTokens"], 12);
        assert_eq!(row["Category"], "GatewayLogs");
        assert_eq!(row["Groups"], "[\"g1\"]");
    }

    #[test]
    fn llm_rows_have_a_header_then_pieces_in_order() {
        let mut record = record();
        let long: String = "ü".repeat(40_000); // 80,000 bytes
        record.request_messages = Some(long.clone());
        record.usage = Some(TokenUsage {
            prompt_tokens: 1,
            completion_tokens: 2,
            total_tokens: 3,
            ..TokenUsage::default()
        });
        let rows = LlmLogRow::from_record(&record);
        assert_eq!(rows[0].sequence_number, 0);
        assert_eq!(rows[0].deployment_name, "gpt-4o");
        assert_eq!(rows[0].total_tokens, Some(3));
        let request: Vec<_> = rows
            .iter()
            .filter_map(|r| r.request_messages.as_deref())
            .collect();
        assert_eq!(request.len(), 3);
        assert!(request.iter().all(|p| p.len() <= MESSAGE_PIECE_BYTES));
        assert_eq!(request.concat(), long);
        assert_eq!(
            rows.last().unwrap().response_messages.as_deref(),
            Some("[\"hello\"]")
        );
        let sequence: Vec<i32> = rows.iter().map(|r| r.sequence_number).collect();
        assert_eq!(sequence, (0..rows.len() as i32).collect::<Vec<_>>());
        assert!(rows[1..].iter().all(|r| r.deployment_name.is_empty()));

        // A call that runs no model: its messages' pieces are kept all the same (a streamed
        // submit_tool_outputs carries the run's answer); without messages it has no rows.
        record.operation_id = Some(OperationId::SubmitToolOutputsToRun);
        assert_eq!(LlmLogRow::from_record(&record).len(), rows.len());
        record.operation_id = Some(OperationId::FilesList);
        record.request_messages = None;
        record.response_messages = None;
        assert!(LlmLogRow::from_record(&record).is_empty());
    }

    #[test]
    fn an_empty_message_is_one_empty_piece_and_no_message_none() {
        let mut record = record();
        record.request_messages = Some(String::new());
        record.response_messages = None;
        let rows = LlmLogRow::from_record(&record);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[1].sequence_number, 1);
        assert_eq!(rows[1].request_messages.as_deref(), Some(""));
        assert_eq!(rows[1].response_messages, None);
        record.request_messages = None;
        assert_eq!(LlmLogRow::from_record(&record).len(), 1);
    }
}
