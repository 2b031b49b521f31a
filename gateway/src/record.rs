//! Step 10: the audit record of one call, filled in as the call goes.

use std::time::Instant;

use gatehouse_schema::AuditRecord;
use gatehouse_schema::audit::{BackendAttempt, TokenUsage};
use http::request::Parts;
use time::OffsetDateTime;

use crate::auth::{KEY_QUERY, Principal};
use crate::caller::Caller;
use crate::classify::Call;
use crate::error::GatewayError;

/// An audit record under construction.
#[derive(Debug)]
pub struct CallRecord {
    /// The record; `finish` fills in the timing and outcome.
    pub record: AuditRecord,
    /// When the request arrived.
    pub started: Instant,
    /// When the first backend attempt started.
    pub backend_started: Option<Instant>,
}

impl CallRecord {
    /// Starts a record for a request.
    pub fn new(
        gateway_id: &str,
        correlation_id: &str,
        parts: &Parts,
        caller: Caller,
        started: Instant,
    ) -> Self {
        let record = AuditRecord {
            time_generated: OffsetDateTime::now_utc(),
            correlation_id: correlation_id.to_owned(),
            gateway_id: gateway_id.to_owned(),
            operation_id: None,
            caller_ip_address: caller.client.to_string(),
            peer_ip_address: caller.peer.to_string(),
            method: parts.method.to_string(),
            url: redacted_url(parts),
            client_protocol: format!("{:?}", parts.version),
            response_code: 0,
            is_request_success: false,
            backend_response_code: None,
            backend_id: None,
            backend_url: None,
            request_size: 0,
            response_size: 0,
            total_time: 0,
            backend_time: 0,
            time_to_first_byte: None,
            apim_subscription_id: None,
            product_id: None,
            user_id: None,
            user_name: None,
            tenant_id: None,
            groups: Vec::new(),
            deployment_name: None,
            model_name: None,
            api_version: None,
            is_stream_completion: false,
            usage: None,
            attempts: Vec::new(),
            backend_request_body: None,
            request_body_truncated: false,
            backend_response_body: None,
            response_body_truncated: false,
            request_messages: None,
            response_messages: None,
            client_aborted: false,
            last_error_reason: None,
            last_error_message: None,
            chain: None,
        };
        CallRecord {
            record,
            started,
            backend_started: None,
        }
    }

    /// Notes the authenticated caller.
    pub fn principal(&mut self, principal: &Principal) {
        self.record.apim_subscription_id = Some(principal.subscription.id.clone());
        self.record.product_id = principal.subscription.product.clone();
    }

    /// Notes what the call is.
    pub fn call(&mut self, call: &Call) {
        self.record.operation_id = Some(call.operation);
        self.record.deployment_name = call.deployment.clone();
        self.record.api_version = call.api_version.clone();
        self.record.is_stream_completion = call.is_stream;
    }

    /// Notes one backend attempt.
    pub fn attempt(&mut self, attempt: BackendAttempt) {
        self.record.attempts.push(attempt);
    }

    /// Notes usage.
    pub fn usage(&mut self, usage: Option<TokenUsage>) {
        if usage.is_some() {
            self.record.usage = usage;
        }
    }

    /// Completes the record for an answer of `status` with `sent` bytes.
    pub fn finish(mut self, status: u16, sent: u64) -> AuditRecord {
        let now = Instant::now();
        self.record.response_code = status;
        self.record.is_request_success = (200..400).contains(&status);
        self.record.response_size = sent;
        self.record.total_time = millis(now - self.started);
        if let Some(backend_started) = self.backend_started {
            self.record.backend_time = millis(now - backend_started);
        }
        self.record
    }

    /// Completes the record for an error the gateway answered itself.
    pub fn finish_error(mut self, error: &GatewayError) -> AuditRecord {
        self.record.last_error_reason = Some(error.reason().to_owned());
        self.record.last_error_message = Some(error.to_string());
        self.finish(error.status().as_u16(), 0)
    }
}

/// Whole milliseconds of a duration.
pub fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The request URL with credential query parameters replaced, so no key reaches a record.
fn redacted_url(parts: &Parts) -> String {
    let path = parts.uri.path();
    let Some(query) = parts.uri.query() else {
        return path.to_owned();
    };
    let pairs = url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| {
        if k.eq_ignore_ascii_case(KEY_QUERY) || k.eq_ignore_ascii_case("api-key") {
            (k, "REDACTED".into())
        } else {
            (k, v)
        }
    });
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{path}?{query}")
}
