//! Step 10: the audit record of one call, filled in as the call goes.

use std::time::{Duration, Instant};

use crate::client_gone::ClientGone;

use gatehouse_audit::RecordSlot;
use gatehouse_schema::audit::{BackendAttempt, TokenUsage};
use gatehouse_schema::{AuditRecord, OperationId};
use http::request::Parts;
use time::OffsetDateTime;

use crate::auth::{KEY_QUERY, Principal};
use crate::caller::Caller;
use crate::classify::Call;
use crate::error::GatewayError;
use crate::limits::Reservation;

/// What a call holds until its record is handed on: the tokens usage limits reserved for it, and
/// the room in the audit queue taken for its record.
#[derive(Debug, Default)]
pub struct Holds {
    /// Tokens held by usage limits, reconciled with the usage when the record is finished.
    pub reservation: Option<Reservation>,
    /// Room for the record in the audit queue, taken before the call was served.
    pub slot: Option<RecordSlot>,
    /// Set when the call's work is counted with work that goes on after a call
    /// (`crate::deferred_work`): its own reservation is then given back whole.
    pub counted_with_deferred_work: bool,
}

/// An audit record under construction.
#[derive(Debug)]
pub struct CallRecord {
    /// The record; `finish` fills in the timing and outcome.
    pub record: AuditRecord,
    /// When the request arrived.
    pub started: Instant,
    /// When the first backend attempt started.
    pub backend_started: Option<Instant>,
    /// How long the call has waited for others: for the client's request body, and for each
    /// backend attempt's answer head (or its failure). The rest of its time is the gateway's own.
    pub waited: Duration,
    /// What the call holds until its record is handed on.
    pub holds: Holds,
    /// Set when the client left before the answer's head; the call goes on without it.
    pub client_gone: ClientGone,
    /// The client's own `x-request-id`, when it sent a sane one: echoed to it and passed to the
    /// backend. Never the record's `CorrelationId`, which the gateway always makes itself.
    pub client_request_id: Option<String>,
    /// How much of a text answer is kept in the record: the capture limit of the configuration
    /// the call runs under, not of one pushed while its answer streams.
    pub response_capture_limit: usize,
}

impl CallRecord {
    /// Starts a record for a request.
    pub fn new(
        gateway_id: &str,
        correlation_id: &str,
        client_request_id: Option<String>,
        parts: &Parts,
        caller: Caller,
        started: Instant,
    ) -> Self {
        let caller_ip_address = caller.client.to_string();
        let peer_ip_address = if caller.peer == caller.client {
            caller_ip_address.clone()
        } else {
            caller.peer.to_string()
        };
        let record = AuditRecord {
            time_generated: OffsetDateTime::now_utc(),
            correlation_id: correlation_id.to_owned(),
            gateway_id: gateway_id.to_owned(),
            operation_id: None,
            caller_ip_address,
            peer_ip_address,
            method: parts.method.as_str().to_owned(),
            url: redacted_url(parts),
            client_protocol: protocol(parts.version),
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
            time_to_first_token: None,
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
            waited: Duration::ZERO,
            holds: Holds::default(),
            client_gone: ClientGone::default(),
            client_request_id,
            response_capture_limit: 0,
        }
    }

    /// Notes the authenticated caller, in place of one noted before (a call authenticated again
    /// under a newer configuration).
    pub fn principal(&mut self, principal: &Principal) {
        let subscription = principal.subscription.as_ref();
        self.record.apim_subscription_id = subscription.map(|s| s.id.clone());
        self.record.product_id = subscription.and_then(|s| s.product.clone());
        let user = principal.user.as_ref();
        self.record.user_id = user.map(|u| u.object_id.clone());
        self.record.user_name = user.and_then(|u| u.username.clone().or_else(|| u.name.clone()));
        self.record.tenant_id = user.map(|u| u.tenant_id.clone());
        self.record.groups = user.map(|u| u.groups.clone()).unwrap_or_default();
    }

    /// Notes what the call is. An Assistants run names its deployment in its body's `model`
    /// (when it names one), and is recorded under it.
    pub fn call(&mut self, call: &Call) {
        use gatehouse_schema::OperationId as Op;
        self.record.operation_id = Some(call.operation);
        self.record.deployment_name = call.deployment.clone().or_else(|| {
            call.body_model_of(&[Op::CreateRun, Op::CreateThreadAndRun])
                .and_then(|model| crate::classify::valid_name(model).ok())
        });
        self.record.api_version = call.api_version.clone();
        self.record.is_stream_completion = call.is_stream;
    }

    /// Notes one backend attempt.
    pub fn attempt(&mut self, attempt: BackendAttempt) {
        self.record.attempts.push(attempt);
    }

    /// Notes the usage an answer reports, for a call that runs a model. Any other answer that
    /// carries `usage` (a stored response fetched again, a run or a batch polled) reports the
    /// work of the call that made the object, which is on that call's record: counted again
    /// here, every poll would add it to the caller's limits and to the usage dashboards.
    ///
    /// Tool outputs submitted to a run run the model again, and a run that stopped for a tool
    /// (`requires_action`) reports no usage yet: the answer that takes it to its end (a stream
    /// ending in `thread.run.completed`) carries the run's usage, which is on this call's record.
    /// A fetch that sees a background response or a run end gets its usage later, from
    /// `crate::deferred_work`, when the call that started the work left an entry for it.
    pub fn usage(&mut self, usage: Option<TokenUsage>) {
        let runs_a_model = self.record.operation_id.is_some_and(|operation| {
            operation.is_inference() || operation == OperationId::SubmitToolOutputsToRun
        });
        if usage.is_some() && runs_a_model {
            self.record.usage = usage;
        }
    }

    /// Completes the record for an answer of `status` with `sent` bytes.
    pub fn finish(mut self, status: u16, sent: u64) -> AuditRecord {
        let now = Instant::now();
        if self.client_gone.is_gone() {
            self.record.client_aborted = true;
        }
        self.record.response_code = status;
        self.record.is_request_success = (200..400).contains(&status);
        self.record.response_size = sent;
        self.record.total_time = millis(now - self.started);
        if let Some(backend_started) = self.backend_started {
            self.record.backend_time = millis(now - backend_started);
        }
        self.record
    }

    /// The gateway's own time so far: since the call arrived, less what it [waited](Self::waited)
    /// for.
    pub fn overhead(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.waited)
    }

    /// Takes what the call holds, to hand it on with the finished record.
    pub fn take_holds(&mut self) -> Holds {
        std::mem::take(&mut self.holds)
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

/// The protocol as `http::Version`'s `Debug` writes it (`HTTP/1.1`, `HTTP/2.0`).
fn protocol(version: http::Version) -> String {
    let known = match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        other => return format!("{other:?}"),
    };
    known.to_owned()
}

/// Whether re-encoding `query` would give it back unchanged with no credential in it: only
/// `key=value` pairs of characters `form_urlencoded` leaves as they are, none of them a key
/// parameter. Such a query (`api-version=2024-10-21`) is copied as it is.
fn plain_query(query: &str) -> bool {
    query.split('&').all(|pair| {
        let Some((key, value)) = pair.split_once('=') else {
            return false;
        };
        let plain = |text: &str| {
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_'))
        };
        !key.is_empty()
            && plain(key)
            && plain(value)
            && !key.eq_ignore_ascii_case(KEY_QUERY)
            && !key.eq_ignore_ascii_case("api-key")
    })
}

/// The request URL with credential query parameters replaced, so no key reaches a record.
fn redacted_url(parts: &Parts) -> String {
    let path = parts.uri.path();
    let Some(query) = parts.uri.query() else {
        return path.to_owned();
    };
    if plain_query(query) {
        return [path, "?", query].concat();
    }
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
    [path, "?", &query].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slow(query: &str) -> String {
        let pairs = url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| {
            if k.eq_ignore_ascii_case(KEY_QUERY) || k.eq_ignore_ascii_case("api-key") {
                (k, "REDACTED".into())
            } else {
                (k, v)
            }
        });
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }

    #[test]
    fn plain_queries_are_the_ones_reencoding_keeps() {
        for query in [
            "api-version=2024-10-21",
            "api-version=2024-10-21&limit=10&order=desc",
            "a=&b=1",
            "x*y=1.2_3",
        ] {
            assert!(plain_query(query), "{query}");
            assert_eq!(slow(query), query);
        }
        for query in [
            "subscription-key=abc",
            "API-KEY=abc",
            "a=b c",
            "a=b+c",
            "a=%41",
            "a",
            "a=1&&b=2",
            "a=1&",
            "=1",
            "a=1=2",
            "",
        ] {
            assert!(!plain_query(query), "{query}");
        }
    }

    #[test]
    fn protocols_read_as_debug_writes_them() {
        for version in [
            http::Version::HTTP_09,
            http::Version::HTTP_10,
            http::Version::HTTP_11,
            http::Version::HTTP_2,
            http::Version::HTTP_3,
        ] {
            assert_eq!(protocol(version), format!("{version:?}"));
        }
    }
}
