//! The audit record: everything the gateway knows about one call.
//!
//! Field names follow Azure Monitor's `ApiManagementGatewayLogs` and `ApiManagementGatewayLlmLog`
//! columns (serialised in their PascalCase spelling) so that stores can lay the record out in
//! those tables and the published KQL keeps working; the fields Azure lacks (user, tenant, groups,
//! time to first token, cached and reasoning tokens, attempts, flags) carry Gatehouse names.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::operation::OperationId;

/// What a NUL character (U+0000) in a record's text becomes ([`AuditRecord::replace_nul`]).
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

impl AuditRecord {
    /// Replaces every NUL character (U+0000) in the record's text with [`NUL_REPLACEMENT`], and
    /// says whether there was one. PostgreSQL's `text` and `jsonb` cannot hold U+0000 (a batch
    /// holding one would be refused whole, and on every retry), while a client puts one in a
    /// record with `api-version=%00` or a backend with a NUL in a text answer. The audit writer
    /// does this before it links a record into its hash chain, so every store keeps, and the
    /// verifier reads back, the same text.
    pub fn replace_nul(&mut self) -> bool {
        // Destructured whole, without `..`: a text field added later must be named here.
        let AuditRecord {
            time_generated: _,
            correlation_id,
            gateway_id,
            operation_id: _,
            caller_ip_address,
            peer_ip_address,
            method,
            url,
            client_protocol,
            response_code: _,
            is_request_success: _,
            backend_response_code: _,
            backend_id,
            backend_url,
            request_size: _,
            response_size: _,
            total_time: _,
            backend_time: _,
            time_to_first_byte: _,
            time_to_first_token: _,
            apim_subscription_id,
            product_id,
            user_id,
            user_name,
            tenant_id,
            groups,
            deployment_name,
            model_name,
            api_version,
            is_stream_completion: _,
            usage: _,
            attempts,
            backend_request_body,
            request_body_truncated: _,
            backend_response_body,
            response_body_truncated: _,
            request_messages,
            response_messages,
            client_aborted: _,
            last_error_reason,
            last_error_message,
            chain,
        } = self;
        let mut texts: Vec<&mut String> = vec![
            correlation_id,
            gateway_id,
            caller_ip_address,
            peer_ip_address,
            method,
            url,
            client_protocol,
        ];
        texts.extend(
            [
                backend_id,
                backend_url,
                apim_subscription_id,
                product_id,
                user_id,
                user_name,
                tenant_id,
                deployment_name,
                model_name,
                api_version,
                backend_request_body,
                backend_response_body,
                request_messages,
                response_messages,
                last_error_reason,
                last_error_message,
            ]
            .into_iter()
            .flatten(),
        );
        texts.extend(groups.iter_mut());
        for attempt in attempts.iter_mut() {
            let BackendAttempt {
                backend_id,
                status: _,
                elapsed_ms: _,
                error,
            } = attempt;
            texts.push(backend_id);
            texts.extend(error.as_mut());
        }
        if let Some(ChainLink {
            chain_id,
            sequence: _,
            previous_hash,
            record_hash,
            content_hash,
        }) = chain
        {
            texts.extend([chain_id, previous_hash, record_hash, content_hash]);
        }
        let mut replaced = false;
        for text in texts {
            // `contains` on bytes is a `memchr`: a record without NUL costs one scan.
            if text.as_bytes().contains(&0) {
                *text = text.replace('\0', NUL_REPLACEMENT.encode_utf8(&mut [0; 4]));
                replaced = true;
            }
        }
        replaced
    }
}

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
    /// Milliseconds from the request's arrival to the first response byte sent.
    pub time_to_first_byte: Option<u64>,
    /// Milliseconds from the request's arrival to the first generated output a streamed answer
    /// sent: the first event that carries some (a content, refusal, tool-call or audio delta, a
    /// Responses API `…delta` event — not Azure's opening prompt-filter event, nor a role-only
    /// chunk). `None` for an answer sent whole (its output came with its first byte, see
    /// `time_to_first_byte`), and for a stream that sent no output. Left out of the serialized
    /// record when `None`, so records written before the field existed keep their hash chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token: Option<u64>,
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

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// A record with every optional field present.
    fn full_record() -> AuditRecord {
        let text = |s: &str| Some(s.to_owned());
        AuditRecord {
            time_generated: OffsetDateTime::UNIX_EPOCH,
            correlation_id: "c".into(),
            gateway_id: "g".into(),
            operation_id: Some(OperationId::ChatCompletionsCreate),
            caller_ip_address: "10.0.0.1".into(),
            peer_ip_address: "10.0.0.2".into(),
            method: "POST".into(),
            url: "/u".into(),
            client_protocol: "HTTP/1.1".into(),
            response_code: 200,
            is_request_success: true,
            backend_response_code: Some(200),
            backend_id: text("b"),
            backend_url: text("http://b"),
            request_size: 1,
            response_size: 2,
            total_time: 3,
            backend_time: 4,
            time_to_first_byte: Some(5),
            time_to_first_token: Some(6),
            apim_subscription_id: text("s"),
            product_id: text("p"),
            user_id: text("u"),
            user_name: text("n"),
            tenant_id: text("t"),
            groups: vec!["g1".into(), "g2".into()],
            deployment_name: text("d"),
            model_name: text("m"),
            api_version: text("v"),
            is_stream_completion: false,
            usage: Some(TokenUsage::default()),
            attempts: vec![BackendAttempt {
                backend_id: "b".into(),
                status: None,
                elapsed_ms: 1,
                error: text("e"),
            }],
            backend_request_body: text("q"),
            request_body_truncated: false,
            backend_response_body: text("a"),
            response_body_truncated: false,
            request_messages: text("qm"),
            response_messages: text("am"),
            client_aborted: false,
            last_error_reason: text("r"),
            last_error_message: text("x"),
            chain: Some(ChainLink {
                chain_id: "ch".into(),
                sequence: 1,
                previous_hash: "ph".into(),
                record_hash: "rh".into(),
                content_hash: "co".into(),
            }),
        }
    }

    /// The JSON pointers of every string in `value`.
    fn strings(value: &Value, at: String, out: &mut Vec<String>) {
        match value {
            Value::String(_) => out.push(at),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    strings(item, format!("{at}/{i}"), out);
                }
            }
            Value::Object(members) => {
                for (key, member) in members {
                    strings(member, format!("{at}/{key}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn every_text_field_loses_its_nul_characters() {
        // Every string of the serialised record that is free text (an enum or a time refuses
        // the NUL) gets one; a field `replace_nul` forgot would keep it.
        let mut json = serde_json::to_value(full_record()).unwrap();
        let mut pointers = Vec::new();
        strings(&json, String::new(), &mut pointers);
        let mut with_nul = 0;
        for pointer in &pointers {
            let before = json.pointer(pointer).unwrap().clone();
            let text = format!("a\0{}\0", before.as_str().unwrap());
            *json.pointer_mut(pointer).unwrap() = Value::String(text);
            if serde_json::from_value::<AuditRecord>(json.clone()).is_ok() {
                with_nul += 1;
            } else {
                *json.pointer_mut(pointer).unwrap() = before;
            }
        }
        assert!(with_nul >= 30, "only {with_nul} text fields found");
        let mut record: AuditRecord = serde_json::from_value(json).unwrap();
        assert!(record.replace_nul());
        let out = serde_json::to_string(&record).unwrap();
        assert!(!out.contains("\\u0000"), "{out}");
        assert_eq!(out.matches(NUL_REPLACEMENT).count(), 2 * with_nul);
        assert_eq!(record.api_version.as_deref(), Some("a\u{FFFD}v\u{FFFD}"));
        assert!(!record.replace_nul(), "nothing left to replace");
        assert!(!full_record().replace_nul());
    }
}
