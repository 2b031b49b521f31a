//! Steps 7 and 8: pick a member, call it, fail over while nothing has reached the client, and
//! stream the answer back through the capture tee.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::body::HttpBody as _;
use axum::response::Response;
use bytes::Bytes;
use gatehouse_schema::audit::BackendAttempt;
use gatehouse_schema::config::BackendKind;
use gatehouse_schema::identity::AccessRule;
use gatehouse_schema::{AuditRecord, OperationId};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tracing::Instrument;

use crate::affinity;
use crate::app::Gateway;
use crate::assistant_model;
use crate::auth::Principal;
use crate::authorize;
use crate::backend_url::BackendUrl;
use crate::batch_input::{self, BatchCall, InputFileError};
use crate::capture::{self, BodyCapture, PARSE_LIMIT, SseTap};
use crate::classify::{self, BodyKind, Call, ObjectFamily, RouteStyle};
use crate::error::GatewayError;
use crate::idle_deadline::IdleDeadline;
use crate::in_flight::{InFlight, SHUTDOWN_REASON};
use crate::member_read::MemberRead;
use crate::peek::{
    REFERENCE_ID_KEYS, REFERENCE_LIST_KEYS, RequestPeek, ResponsePeek, StreamOptions,
};
use crate::pool::{Member, MemberCredential, Pool, Selection, SetAsideReason};
use crate::record::{CallRecord, Holds, millis};
use crate::retry_hint;
use crate::runtime::Runtime;
use crate::stream_window::Answer;
use crate::upstream::{SendError, UpstreamBody};
use crate::usage::TokenWork;

/// The Azure OpenAI GA `api-version` used when neither the client nor the member names one.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";
/// The first Azure `api-version` that takes `stream_options.include_usage` (`azure-specs.md` §1.2).
const STREAM_USAGE_SINCE: &str = "2024-09-01";
/// The member the gateway adds in front of a request body to ask a stream for its usage chunk.
const STREAM_USAGE_OPTION: &[u8] = br#""stream_options":{"include_usage":true},"#;
/// After a client hangs up, how long more of the backend is read to complete the record (an HTTP
/// answer's rest, a Realtime session's running responses).
pub(crate) const DRAIN_TIME: Duration = Duration::from_secs(60);
/// After a client hangs up, how many more bytes of the backend are read to complete the record.
pub(crate) const DRAIN_BYTES: u64 = 16 * 1024 * 1024;

/// Request headers never forwarded: hop-by-hop, the client's credentials, and what the gateway sets.
const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "authorization",
    "api-key",
    "ocp-apim-subscription-key",
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    // Other claims of the client's address, which only the gateway's trusted proxies may make
    // (`server.trusted_proxies`): a member must not take a caller's word for where it is.
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-azure-clientip",
    "x-azure-socketip",
    // Asked for identity so that the capture can read the body.
    "accept-encoding",
    "x-request-id",
    // The OpenAI organization and project a call is billed to, and whose files and assistants
    // it reaches, are those of the member's own key, never the caller's choice.
    "openai-organization",
    "openai-project",
];

/// Response headers never passed back: hop-by-hop, a member's cookies, and the OpenAI
/// organization and project of the member's own key (the gateway's account, not the caller's).
const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "set-cookie",
    "openai-organization",
    "openai-project",
];

/// Where a call goes: one pool, possibly pinned to one member.
struct Target<'a> {
    pool: &'a Arc<Pool>,
    pinned: Option<usize>,
}

/// Sends the call to a backend and returns the response that streams to the client.
pub async fn forward(
    gateway: &Arc<Gateway>,
    runtime: &Runtime,
    principal: &Principal,
    call: Call,
    parts: &Parts,
    body: Bytes,
    record: &mut Option<CallRecord>,
) -> Result<Response, GatewayError> {
    let objects = objects_of(&call);
    // Objects created through another replica are in the shared map, if there is one.
    gateway.affinity.learn(&objects).await;
    let target = target(gateway, runtime, &call, &objects)?;
    // Each member of a resource pool lists only the objects it holds: a list goes to all of them.
    // Boxed: its future is large, and every call's future would otherwise carry (and move) room
    // for it.
    if target.pinned.is_none() && crate::list_merge::merges(&call, &parts.method, target.pool) {
        return Box::pin(crate::list_merge::forward(
            gateway,
            call,
            parts,
            target.pool,
            record,
        ))
        .await;
    }
    let mut tried: Vec<usize> = Vec::new();
    // The shortest wait a member asked for in a 429 during this call: a member that answered 429
    // with a wait of zero (or a `Retry-After` date already past) is not set aside, yet the call
    // ran out of members because of a throttle, and the client is told so.
    let mut throttled: Option<Duration> = None;
    let client_query = parts.uri.query();
    // The last member's refusal of the gateway itself (see [`Refusal`]), relayed when no member
    // is left to try. Boxed, as its read and its relay are: the call's future, moved as it runs,
    // is not made larger for a path few calls take.
    let mut refused: Option<Box<Refusal>> = None;
    loop {
        // A client that left before the answer's head: no backend is sent its call now.
        if record.as_ref().is_some_and(|r| r.client_gone.is_gone()) {
            return Err(GatewayError::ClientClosedRequest);
        }
        let now = Instant::now();
        let (member, index) = match target.pinned {
            Some(index) => {
                let member = &target.pool.members[index];
                if !tried.is_empty() || member.health.set_aside_state(now).is_some() {
                    if let Some(refusal) = refused.take() {
                        return Box::pin(refusal.relay(gateway, call, record, parts.version)).await;
                    }
                    return Err(unavailable(member, now, throttled));
                }
                (Arc::clone(member), index)
            }
            None => match target.pool.select(&tried, now) {
                (Selection::Member(member), Some(index)) => (member, index),
                (Selection::AllThrottled(wait), _) => {
                    // A member that answered this call 429 with a shorter wait (zero: it was not
                    // set aside) is free sooner than the ones set aside.
                    let wait = throttled.map_or(wait, |shortest| shortest.min(wait));
                    return Err(GatewayError::AllThrottled { retry_after: wait });
                }
                _ => {
                    // A throttle ends; a refusal of the gateway's credential does not, so a wait
                    // is the better answer when there is one.
                    if throttled.is_none()
                        && let Some(refusal) = refused.take()
                    {
                        return Box::pin(refusal.relay(gateway, call, record, parts.version)).await;
                    }
                    return Err(out_of_members(throttled));
                }
            },
        };
        tried.push(index);

        let url = upstream_url(&member, &call, client_query)?;
        let attempt_started = Instant::now();
        // The record names the member of the last attempt, whatever becomes of it: the one whose
        // answer (or failure) the client gets.
        if let Some(record) = record.as_mut() {
            record.record.backend_id = Some(member.config.id.clone());
            record.record.backend_url = Some(url.clone());
        }
        // The member's own credential; without one (no token) the member counts as unreachable.
        let credential = match credential_header(&member).await {
            Ok(credential) => credential,
            Err(error) => {
                tracing::warn!(backend = %member.config.id, %error, "no credential for the backend; member set aside");
                member.health.set_aside(
                    SetAsideReason::Failing,
                    retry_hint::DEFAULT_SET_ASIDE,
                    Instant::now(),
                );
                gateway
                    .metrics
                    .backend_attempt(&member.config.id, "credential_failed");
                let reason = format!("credential_failed: {error}");
                note_attempt(
                    record,
                    &member,
                    None,
                    millis(attempt_started.elapsed()),
                    Some(&reason),
                );
                if let Some(record) = record.as_mut() {
                    record.waited += attempt_started.elapsed();
                }
                continue;
            }
        };
        // What only the member can tell — the calls a batch's input file makes, the model a
        // run's assistant runs — is authorized before the call is sent.
        if let Some(rules) = runtime.snapshot.access_rules.as_deref()
            && matches!(
                call.operation,
                OperationId::BatchCreate | OperationId::CreateRun | OperationId::CreateThreadAndRun
            )
        {
            // The member's credential, and the client's `OpenAI-Beta` (OpenAI answers an
            // Assistants read without `assistants=v2` with 400 `invalid_beta`).
            let mut beta = HeaderMap::new();
            if let Some(value) = parts.headers.get("openai-beta") {
                beta.insert("openai-beta", value.clone());
            }
            let headers = upstream_headers(&beta, credential.clone(), request_id(record));
            // A shutdown whose drain is over waits for no read either.
            let checked = tokio::select! {
                checked = authorize_on_member(rules, principal, &member, &call, headers) => checked?,
                () = gateway.calls.stopped() => {
                    return Err(shut_down(record, &member, attempt_started));
                }
            };
            let elapsed = attempt_started.elapsed();
            if let Some(record) = record.as_mut() {
                record.waited += elapsed;
            }
            match checked {
                MemberRead::Read(()) => {}
                MemberRead::Failed {
                    reason,
                    status,
                    wait,
                } => {
                    tracing::warn!(backend = %member.config.id, reason, "could not read from the backend what the call runs; member set aside");
                    let attempt = FailedAttempt {
                        status: status.map(|s| s.as_u16()),
                        wait,
                        outcome: reason,
                        elapsed_ms: millis(elapsed),
                    };
                    attempt.set_aside(gateway, &member, record, &mut throttled);
                    continue;
                }
                MemberRead::Refused(response) => {
                    if response.status() == StatusCode::UNAUTHORIZED
                        && let Some(MemberCredential::Entra { credential, scope }) =
                            &member.credential
                    {
                        // As for the call's own answer, below.
                        credential.forget_refused(scope);
                    }
                    if Refusal::of(response.status()) {
                        // The member turned the gateway away, not the call: as for the call's
                        // own answer, below.
                        refused = Some(
                            Box::pin(Refusal::keep(gateway, &member, *response, elapsed, record))
                                .await,
                        );
                        continue;
                    }
                    gateway
                        .metrics
                        .backend_attempt(&member.config.id, "answered");
                    note_attempt(
                        record,
                        &member,
                        Some(response.status().as_u16()),
                        millis(elapsed),
                        Some(refused_read_reason(&call)),
                    );
                    let answer = Answered {
                        member,
                        response: *response,
                        asked_usage: false,
                    };
                    return answer.relay(gateway, call, record, parts.version).await;
                }
            }
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let (upstream_body, asked_usage) = upstream_body(&member, &call, &body, content_type);
        let headers = upstream_headers(&parts.headers, credential, request_id(record));
        if let Some(record) = record.as_mut() {
            record.backend_started.get_or_insert(attempt_started);
        }
        // A URL of percent-encoded segments is always a valid URI; should it ever not be, the
        // attempt fails like a refused one.
        let sent = match http::Uri::try_from(url) {
            Ok(uri) => {
                let timeout = Duration::from_millis(member.config.response_timeout_ms);
                let sending = member
                    .client
                    .send(parts.method.clone(), uri, headers, upstream_body);
                // A shutdown whose drain is over waits for no answer: the record is finished now.
                tokio::select! {
                    sent = tokio::time::timeout(timeout, sending) => {
                        sent.unwrap_or_else(|_| Err(SendError::timed_out(timeout)))
                    }
                    () = gateway.calls.stopped() => {
                        return Err(shut_down(record, &member, attempt_started));
                    }
                }
            }
            Err(_) => Err(SendError::invalid_uri()),
        };
        let elapsed = attempt_started.elapsed();
        let elapsed_ms = millis(elapsed);
        if let Some(record) = record.as_mut() {
            record.waited += elapsed;
        }
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                let reason = error.reason();
                tracing::warn!(backend = %member.config.id, reason, "backend attempt failed");
                let attempt = FailedAttempt {
                    status: None,
                    wait: retry_hint::DEFAULT_SET_ASIDE,
                    outcome: reason,
                    elapsed_ms,
                };
                attempt.set_aside(gateway, &member, record, &mut throttled);
                // A call that creates an object goes to another member only when this one cannot
                // have received it; chat and other completions are retried as they always are
                // (a stored response is one of those).
                if !error.is_connect()
                    && call
                        .creates
                        .is_some_and(|family| !family.made_by_model_calls())
                {
                    return Err(GatewayError::OutcomeUnknown {
                        timed_out: error.is_timeout(),
                    });
                }
                continue;
            }
        };
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED
            && let Some(MemberCredential::Entra { credential, scope }) = &member.credential
        {
            // A token revoked or expired early: the next call fetches a new one (not after every
            // 401: see `forget_refused`).
            credential.forget_refused(scope);
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let wait = retry_hint::set_aside_for(status, response.headers(), SystemTime::now());
            tracing::info!(backend = %member.config.id, status = status.as_u16(), wait_ms = millis(wait), "backend set aside");
            let attempt = FailedAttempt {
                status: Some(status.as_u16()),
                wait,
                outcome: if status == StatusCode::TOO_MANY_REQUESTS {
                    "throttled"
                } else {
                    "server_error"
                },
                elapsed_ms,
            };
            attempt.set_aside(gateway, &member, record, &mut throttled);
            if let Some(record) = record.as_mut() {
                record.record.backend_response_code = Some(status.as_u16());
            }
            // A call that creates an object and got a 500, 502 or 504 may have created it (the
            // member, or a proxy in front of it, failed after taking the call): sent to another
            // member it could create a second one. Its answer goes to the client as it is, as a
            // broken connection after sending does (`OutcomeUnknown`).
            let outcome_unknown = matches!(status.as_u16(), 500 | 502 | 504)
                && call
                    .creates
                    .is_some_and(|family| !family.made_by_model_calls());
            if !outcome_unknown {
                // Nothing has reached the client: the next member gets the call at once.
                continue;
            }
        } else if Refusal::of(status) {
            // Another member may take the gateway's credential: nothing has reached the client,
            // and the refused call was not run, so the next member gets it at once.
            refused =
                Some(Box::pin(Refusal::keep(gateway, &member, response, elapsed, record)).await);
            continue;
        } else {
            gateway
                .metrics
                .backend_attempt(&member.config.id, "answered");
            note_attempt(record, &member, Some(status.as_u16()), elapsed_ms, None);
        }
        let answer = Answered {
            member,
            response,
            asked_usage,
        };
        return answer.relay(gateway, call, record, parts.version).await;
    }
}

/// Relays `response`, `member`'s answer (or one the gateway made of its members' answers), with
/// the call's record.
pub(crate) async fn relay_answer(
    gateway: &Arc<Gateway>,
    call: Call,
    member: Arc<Member>,
    response: http::Response<UpstreamBody>,
    record: &mut Option<CallRecord>,
    client_version: http::Version,
) -> Result<Response, GatewayError> {
    let answer = Answered {
        member,
        response,
        asked_usage: false,
    };
    answer.relay(gateway, call, record, client_version).await
}

/// A member's answer that goes to the client.
struct Answered {
    member: Arc<Member>,
    response: http::Response<UpstreamBody>,
    /// Whether the gateway asked the stream for its usage chunk (see [`relay`]).
    asked_usage: bool,
}

impl Answered {
    /// Relays the answer with the call's record, which the relay owns from here on.
    async fn relay(
        self,
        gateway: &Arc<Gateway>,
        call: Call,
        record: &mut Option<CallRecord>,
        client_version: http::Version,
    ) -> Result<Response, GatewayError> {
        let Some(record) = record.take() else {
            return Err(GatewayError::Internal);
        };
        Ok(relay(
            gateway,
            call,
            self.member,
            self.response,
            record,
            self.asked_usage,
            client_version,
        )
        .await)
    }
}

/// The id a member is sent as `x-request-id`: the client's own, else the call's correlation id.
pub(crate) fn request_id(record: &Option<CallRecord>) -> Option<&str> {
    record.as_ref().map(|r| {
        r.client_request_id
            .as_deref()
            .unwrap_or(&r.record.correlation_id)
    })
}

/// A member's refusal of the gateway itself: 401 (the member's key or token is wrong, expired,
/// or its identity lacks a role for the operation: Azure answers that 401 `PermissionDenied`) or
/// 403 (the member's network rules or its role turn the gateway away). The caller's own key was
/// judged by the gateway and never reaches a member, so such an answer says nothing about the
/// caller: the call goes to the next member, as the reference architecture's retry policy sends
/// it on after a 401 (`azure-specs.md` §7.1). The member is not set aside: a refusal may be of
/// one operation only (a role that may call models but not create fine-tuning jobs), and the
/// member serves every other call. When no member is left, the last refusal is the answer, as it
/// came.
pub(crate) struct Refusal {
    /// The member's answer, read whole.
    answer: Answered,
    /// Where the member was sent the call.
    backend_url: Option<String>,
}

impl Refusal {
    /// The most of a refusal's body kept to relay it; a longer one is cut (refusals are a few
    /// hundred bytes of JSON).
    const MAX_BODY: usize = 64 * 1024;

    /// The longest a refusal's body is read: a member that sends the head of a refusal and then
    /// stalls does not hold the call (nor a shutdown) for its idle timeout.
    const READ_LIMIT: Duration = Duration::from_secs(5);

    /// Whether a member's `status` refuses the gateway.
    pub(crate) fn of(status: StatusCode) -> bool {
        status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
    }

    /// Logs, counts and records `member`'s refusal `status`, an attempt that took `elapsed_ms`.
    pub(crate) fn note(
        gateway: &Gateway,
        member: &Member,
        status: StatusCode,
        elapsed_ms: u64,
        record: &mut Option<CallRecord>,
    ) {
        tracing::warn!(
            backend = %member.config.id,
            status = status.as_u16(),
            "the backend refused the gateway; trying the next member"
        );
        gateway
            .metrics
            .backend_attempt(&member.config.id, REFUSED_OUTCOME);
        note_attempt(
            record,
            member,
            Some(status.as_u16()),
            elapsed_ms,
            Some(REFUSED_OUTCOME),
        );
    }

    /// Notes `member`'s refusal `response`, which took `elapsed`, and reads it whole (at most
    /// [`Refusal::MAX_BODY`], for at most [`Refusal::READ_LIMIT`]), to be relayed if no other
    /// member takes the call.
    async fn keep(
        gateway: &Gateway,
        member: &Arc<Member>,
        response: http::Response<UpstreamBody>,
        elapsed: Duration,
        record: &mut Option<CallRecord>,
    ) -> Box<Refusal> {
        Refusal::note(gateway, member, response.status(), millis(elapsed), record);
        let (mut parts, mut body) = response.into_parts();
        // A refusal cut short is relayed as far as it came, with the length of what is relayed.
        parts.headers.remove(header::CONTENT_LENGTH);
        let mut kept = Vec::new();
        let reading = async {
            while let Ok(Some(data)) = crate::member_read::next_chunk(member, &mut body).await {
                let room = Refusal::MAX_BODY - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
                if kept.len() == Refusal::MAX_BODY {
                    break;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(Refusal::READ_LIMIT, reading) => {}
            () = gateway.calls.stopped() => {}
        }
        Box::new(Refusal {
            answer: Answered {
                member: Arc::clone(member),
                response: http::Response::from_parts(parts, UpstreamBody::Whole(Some(kept.into()))),
                asked_usage: false,
            },
            backend_url: record
                .as_ref()
                .and_then(|record| record.record.backend_url.clone()),
        })
    }

    /// Relays the refusal, its member named on the record (a later attempt named another).
    async fn relay(
        self: Box<Self>,
        gateway: &Arc<Gateway>,
        call: Call,
        record: &mut Option<CallRecord>,
        client_version: http::Version,
    ) -> Result<Response, GatewayError> {
        let Refusal {
            answer,
            backend_url,
        } = *self;
        if let Some(record) = record.as_mut() {
            record.record.backend_id = Some(answer.member.config.id.clone());
            record.record.backend_url = backend_url;
        }
        answer.relay(gateway, call, record, client_version).await
    }
}

/// The outcome metrics and the record give an attempt the member refused (see [`Refusal`]).
const REFUSED_OUTCOME: &str = "refused_gateway";

/// An attempt that failed before anything reached the client: the member could not be reached,
/// throttled (429) or failed (5xx).
pub(crate) struct FailedAttempt {
    /// The member's status, when it answered.
    status: Option<u16>,
    /// How long the member is set aside.
    wait: Duration,
    /// The attempt's outcome as metrics and the record name it.
    outcome: &'static str,
    elapsed_ms: u64,
}

impl FailedAttempt {
    /// An attempt that ended with `status` (when the member answered) after `elapsed_ms`, its
    /// member to be set aside for `wait`; `outcome` names it in metrics and the record.
    pub(crate) fn new(
        status: Option<u16>,
        wait: Duration,
        outcome: &'static str,
        elapsed_ms: u64,
    ) -> FailedAttempt {
        FailedAttempt {
            status,
            wait,
            outcome,
            elapsed_ms,
        }
    }

    /// Sets `member` aside (as throttled after a 429, else as failing), notes a 429's wait as
    /// the call's shortest throttle so far, and counts and records the attempt.
    pub(crate) fn set_aside(
        self,
        gateway: &Gateway,
        member: &Member,
        record: &mut Option<CallRecord>,
        throttled: &mut Option<Duration>,
    ) {
        let wait = self.wait;
        let reason = if self.status == Some(StatusCode::TOO_MANY_REQUESTS.as_u16()) {
            *throttled = Some(throttled.map_or(wait, |shortest| shortest.min(wait)));
            SetAsideReason::Throttled
        } else {
            SetAsideReason::Failing
        };
        member.health.set_aside(reason, wait, Instant::now());
        gateway
            .metrics
            .backend_attempt(&member.config.id, self.outcome);
        note_attempt(
            record,
            member,
            self.status,
            self.elapsed_ms,
            Some(self.outcome),
        );
    }
}

/// Why a call pinned to `member` cannot be sent to it now.
fn unavailable(member: &Member, now: Instant, throttled: Option<Duration>) -> GatewayError {
    match member.health.set_aside_state(now) {
        Some((SetAsideReason::Throttled, wait)) => GatewayError::AllThrottled { retry_after: wait },
        _ => out_of_members(throttled),
    }
}

/// Notes the attempt on `member`, begun at `started`, that a shutdown whose drain is over stopped
/// waiting for; the call's error.
fn shut_down(record: &mut Option<CallRecord>, member: &Member, started: Instant) -> GatewayError {
    note_attempt(
        record,
        member,
        None,
        millis(started.elapsed()),
        Some(SHUTDOWN_REASON),
    );
    GatewayError::ShuttingDown
}

/// No member is left to try and none is set aside as throttled: 429 when a member answered this
/// call with a 429 (its wait was zero, so it is not set aside), else 503.
pub(crate) fn out_of_members(throttled: Option<Duration>) -> GatewayError {
    match throttled {
        Some(wait) => GatewayError::AllThrottled { retry_after: wait },
        None => GatewayError::AllUnavailable,
    }
}

pub(crate) fn note_attempt(
    record: &mut Option<CallRecord>,
    member: &Member,
    status: Option<u16>,
    elapsed_ms: u64,
    error: Option<&str>,
) {
    if let Some(record) = record.as_mut() {
        record.attempt(BackendAttempt {
            backend_id: member.config.id.clone(),
            status,
            elapsed_ms,
            error: error.map(str::to_owned),
        });
    }
}

/// The stateful objects a call addresses (in its path) or references (in its body).
fn objects_of(call: &Call) -> Vec<String> {
    call.object
        .as_ref()
        .map(|(_, id)| id.clone())
        .into_iter()
        .chain(referenced_objects(call))
        .collect()
}

/// The pool for the call, pinned to a member when it addresses (or references) one of
/// `objects`, the call's stateful objects.
fn target<'a>(
    gateway: &Gateway,
    runtime: &'a Runtime,
    call: &Call,
    objects: &[String],
) -> Result<Target<'a>, GatewayError> {
    // A chat message's file part is a hint, not an address: a file held by a member of another
    // pool (a resource pool on the same Azure resource as the deployment's) leaves the call to
    // its deployment's pool, which may read it, rather than refusing it. So are a Responses
    // call's files and vector stores; the response it continues and its conversation are not.
    let continued = continued_objects(call);
    let hint_only = |id: &String| match call.operation {
        OperationId::ChatCompletionsCreate => true,
        OperationId::CreateResponse => !continued.contains(&id.as_str()),
        _ => false,
    };
    // The objects the call addresses first: a hint never decides where a call that continues
    // an object goes.
    let ordered = objects
        .iter()
        .filter(|id| !hint_only(id))
        .chain(objects.iter().filter(|id| hint_only(id)));
    for id in ordered {
        let hint_only = hint_only(id);
        if let Some(member_id) = gateway.affinity.member_of(id) {
            if let Some((pool, index)) = runtime.member(&member_id) {
                // The call was authorized for its deployment: the member holding the object
                // must serve that one, not run another under the same name (a member's rename).
                if let Some(deployment) = call.deployment.as_deref()
                    && !runtime
                        .pool_for(Some(deployment))
                        .is_some_and(|serving| Arc::ptr_eq(serving, pool))
                {
                    if hint_only {
                        continue;
                    }
                    return Err(GatewayError::BadRequest {
                        message: format!(
                            "The object the call refers to lives on a backend that does not serve \
                             deployment `{deployment}`: use a deployment of the pool that created it."
                        ),
                        param: None,
                    });
                }
                return Ok(Target {
                    pool,
                    pinned: Some(index),
                });
            }
            if hint_only {
                continue;
            }
            tracing::warn!(object = %id, member = %member_id, "object's member is no longer configured");
            return Err(GatewayError::ObjectNotFound(id.clone()));
        }
    }
    let pool = runtime
        .pool_for(call.deployment.as_deref())
        .ok_or(GatewayError::DeploymentNotFound)?;
    Ok(Target { pool, pinned: None })
}

/// The objects a Responses call continues, which hold its context: the response named in
/// `previous_response_id` and the `conversation` (an id, or `{"id": …}`).
fn continued_objects(call: &Call) -> Vec<&str> {
    if call.operation != OperationId::CreateResponse {
        return Vec::new();
    }
    let Some(body) = call.json() else {
        return Vec::new();
    };
    let conversation = body.get("conversation").and_then(|conversation| {
        conversation
            .as_str()
            .or_else(|| conversation.get("id").and_then(Value::as_str))
    });
    body.get("previous_response_id")
        .and_then(Value::as_str)
        .into_iter()
        .chain(conversation)
        .collect()
}

/// Ids of stateful objects a call refers to in its body (a batch's input file, a run's
/// assistant, an assistant's vector stores, a message's attachments, a chat message's file part,
/// a response's predecessor or conversation), which pin it to their member.
fn referenced_objects(call: &Call) -> Vec<String> {
    // Resource calls (an assistant's `tool_resources`, a thread's messages' `attachments`) and
    // Responses (`tools[].vector_store_ids`, `input_file` parts) name objects below the top
    // level, so their whole body is read; other calls only when a top-level member names one.
    let whole_body = call.deployment.is_none() || call.operation == OperationId::CreateResponse;
    let names_any = if whole_body {
        call.json_bytes()
            .is_some_and(crate::peek::mentions_reference_key)
    } else if call.operation == OperationId::ChatCompletionsCreate {
        // A chat message's file part (`{"type": "file", "file": {"file_id": …}}`) names an
        // uploaded file deep in `messages`: one scan for that key, not for every reference key.
        call.peek.as_ref().is_some_and(|peek| peek.references)
            || call.json_bytes().is_some_and(crate::peek::mentions_file_id)
    } else {
        call.peek.as_ref().is_some_and(|peek| peek.references)
    };
    if !names_any {
        return Vec::new();
    }
    let Some(json) = call.json() else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    collect_references(json, 0, &mut ids);
    ids
}

/// How deep references are looked for (`messages[].attachments[].file_id` is 4 levels down).
const REFERENCE_DEPTH: usize = 8;

/// Adds the object ids `value` names, at any depth up to [`REFERENCE_DEPTH`], in document order.
fn collect_references(value: &Value, depth: usize, ids: &mut Vec<String>) {
    if depth > REFERENCE_DEPTH {
        return;
    }
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                if REFERENCE_ID_KEYS.contains(&key.as_str()) {
                    match member {
                        Value::String(id) => ids.push(id.clone()),
                        // A response's `conversation` is its id or `{"id": …}`.
                        Value::Object(object) if key == "conversation" => {
                            ids.extend(object.get("id").and_then(Value::as_str).map(str::to_owned));
                        }
                        // A code interpreter's `container` is its id, or a new one's settings
                        // (`{"type": "auto", "file_ids": […]}`), which may name files.
                        Value::Object(_) if key == "container" => {
                            collect_references(member, depth + 1, ids);
                        }
                        _ => {}
                    }
                } else if REFERENCE_LIST_KEYS.contains(&key.as_str()) {
                    if let Some(list) = member.as_array() {
                        ids.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
                    }
                } else {
                    collect_references(member, depth + 1, ids);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_references(item, depth + 1, ids);
            }
        }
        _ => {}
    }
}

/// Authorizes what `call` will run that only `member` can tell, read from it with `headers`
/// (the member's credential): the calls of a batch's input file, the model of the assistant a
/// run names no model for (see [`assistant_model`]). `Read(())` when there was nothing to read
/// or all of it is granted.
async fn authorize_on_member(
    rules: &[AccessRule],
    principal: &Principal,
    member: &Member,
    call: &Call,
    headers: HeaderMap,
) -> Result<MemberRead<()>, GatewayError> {
    if call.operation == OperationId::BatchCreate {
        let calls = match read_batch_input(member, call, headers).await?.into_read() {
            Ok(calls) => calls,
            Err(ended) => return Ok(ended),
        };
        let calls = calls.map_err(|error| GatewayError::BadRequest {
            message: error.to_string(),
            param: Some("input_file_id"),
        })?;
        authorize::authorize_batch(rules, principal, &calls)?;
    } else if let Some(assistant) = assistant_of_run_without_model(call)? {
        let url = member_url(member, call, ["assistants", assistant.as_str()], None)?;
        let Ok(uri) = http::Uri::try_from(url) else {
            return Err(GatewayError::Internal);
        };
        let model = match assistant_model::read_assistant_model(member, uri, headers)
            .await
            .into_read()
        {
            Ok(model) => model,
            Err(ended) => return Ok(ended),
        };
        authorize::authorize_assistant_model(rules, principal, call.operation, &model)?;
    }
    Ok(MemberRead::Read(()))
}

/// The outcome recorded for an attempt whose member refused the read [`authorize_on_member`]
/// made.
fn refused_read_reason(call: &Call) -> &'static str {
    if call.operation == OperationId::BatchCreate {
        "input_file_refused"
    } else {
        "assistant_refused"
    }
}

/// The assistant whose model a run runs, when the run (or thread-and-run) names no `model` of
/// its own.
fn assistant_of_run_without_model(call: &Call) -> Result<Option<String>, GatewayError> {
    if !matches!(
        call.operation,
        OperationId::CreateRun | OperationId::CreateThreadAndRun
    ) || call.peek.as_ref().is_some_and(|peek| peek.model.is_some())
    {
        return Ok(None);
    }
    // A run without an assistant is the member's to refuse; it runs nothing.
    let Some(assistant) = call
        .json()
        .and_then(|body| body.get("assistant_id"))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    classify::valid_id(assistant)
        .map(Some)
        .map_err(|_| GatewayError::BadRequest {
            message: "The run's `assistant_id` is not a valid assistant id.".to_owned(),
            param: Some("assistant_id"),
        })
}

/// Reads the input file a batch names from `member`, which the batch will be sent to. A batch
/// naming no `input_file_id` (Azure's `input_blob` is read by the member from storage the gateway
/// cannot see) is refused: what it would run cannot be checked.
async fn read_batch_input(
    member: &Member,
    call: &Call,
    headers: HeaderMap,
) -> Result<MemberRead<Result<Vec<BatchCall>, InputFileError>>, GatewayError> {
    let file = call
        .json()
        .and_then(|body| body.get("input_file_id"))
        .and_then(Value::as_str)
        .ok_or_else(|| GatewayError::BadRequest {
            message: "The batch names no `input_file_id`: access rules apply to this gateway, so \
                      a batch must run a file uploaded to it, which the gateway reads to check \
                      the deployments it uses."
                .to_owned(),
            param: Some("input_file_id"),
        })?;
    let file = classify::valid_id(file).map_err(|_| GatewayError::BadRequest {
        message: "The batch's `input_file_id` is not a valid file id.".to_owned(),
        param: Some("input_file_id"),
    })?;
    let url = member_url(member, call, ["files", file.as_str(), "content"], None)?;
    let Ok(uri) = http::Uri::try_from(url) else {
        return Err(GatewayError::Internal);
    };
    Ok(batch_input::read_input_file(member, uri, headers).await)
}

/// The member's URL for the call, built from percent-encoded segments (never by string
/// formatting; see [`BackendUrl`]).
fn upstream_url(
    member: &Member,
    call: &Call,
    client_query: Option<&str>,
) -> Result<String, GatewayError> {
    member_url(
        member,
        call,
        call.op_path.iter().map(String::as_str),
        client_query,
    )
}

/// The member's URL for `ops` (the path after the style prefix) in the style `call` was made in.
pub(crate) fn member_url<'a>(
    member: &'a Member,
    call: &'a Call,
    ops: impl IntoIterator<Item = &'a str>,
    client_query: Option<&str>,
) -> Result<String, GatewayError> {
    let url = BackendUrl::new(&member.config.endpoint);
    let deployment = member
        .config
        .deployment
        .as_deref()
        .or(call.deployment.as_deref());
    let ops = ops.into_iter();
    let (url, api_version) = match (member.config.kind, call.style) {
        (BackendKind::AzureOpenai, RouteStyle::AzureDeployment) => {
            let deployment = deployment.ok_or(GatewayError::DeploymentNotFound)?;
            let url = url.segments(["openai", "deployments", deployment].into_iter().chain(ops));
            (url, Some(classic_api_version(member, call)))
        }
        (BackendKind::AzureOpenai, RouteStyle::AzureResource) => (
            url.segments(std::iter::once("openai").chain(ops)),
            Some(classic_api_version(member, call)),
        ),
        // v1 preview features are selected with `api-version=preview`; pass it on.
        (BackendKind::AzureOpenai, RouteStyle::AzureV1) => (
            url.segments(["openai", "v1"].into_iter().chain(ops)),
            call.api_version.as_deref(),
        ),
        (BackendKind::AzureOpenai, RouteStyle::OpenAi) => {
            (url.segments(["openai", "v1"].into_iter().chain(ops)), None)
        }
        (BackendKind::Openai, _) => (url.segments(ops), None),
    };
    Ok(url.query(api_version, client_query))
}

/// The `api-version` an Azure classic (deployment or resource) route is sent with.
pub(crate) fn classic_api_version<'a>(member: &'a Member, call: &'a Call) -> &'a str {
    call.api_version
        .as_deref()
        .or(member.config.api_version.as_deref())
        .unwrap_or(DEFAULT_API_VERSION)
}

/// The multipart form `body` with its `model` field set to `model`: the value of the part the
/// form reader took for `model` (`field`: its position among the parts and its value, see
/// `classify`) replaced, or, when the form has none, a `model` part added in front. The part is
/// found by position, not by reading its header again: however the part spells its name
/// (`name=model`, `name = "model"`), the member gets one `model` field, never two. `None` when
/// the form has no usable boundary or the part at that position does not hold that value.
fn form_with_model(
    body: &Bytes,
    content_type: &str,
    field: Option<(usize, &str)>,
    model: &str,
) -> Option<Bytes> {
    let boundary = multer::parse_boundary(content_type).ok()?;
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let starts: Vec<usize> = crate::classify::delimiter_starts(body, delimiter).collect();
    let first = *starts.first()?;
    if let Some((position, value)) = field {
        let (start, next) = (*starts.get(position)?, *starts.get(position + 1)?);
        let head_end = memchr::memmem::find(&body[start..next], b"\r\n\r\n")?;
        // The value runs from after the blank line to the CRLF before the next delimiter.
        let value_start = start + head_end + 4;
        let value_end = next.checked_sub(2)?.max(value_start);
        if &body[value_start..value_end] != value.as_bytes() {
            return None;
        }
        let mut form = Vec::with_capacity(body.len() + model.len());
        form.extend_from_slice(&body[..value_start]);
        form.extend_from_slice(model.as_bytes());
        form.extend_from_slice(&body[value_end..]);
        return Some(Bytes::from(form));
    }
    let mut form = Vec::with_capacity(body.len() + model.len() + 96);
    form.extend_from_slice(&body[..first]);
    form.extend_from_slice(delimiter);
    form.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n");
    form.extend_from_slice(model.as_bytes());
    form.extend_from_slice(b"\r\n");
    form.extend_from_slice(&body[first..]);
    Some(Bytes::from(form))
}

/// Whether the member answers `stream_options.include_usage` with a usage chunk: OpenAI and
/// OpenAI-compatible members, Azure v1 routes, and Azure classic routes from api-version
/// `2024-09-01-preview` on (`preview` and `latest` too) — unless its configuration says it
/// refuses the parameter (`stream_usage: false`).
fn reports_stream_usage(member: &Member, call: &Call) -> bool {
    if !member.config.stream_usage {
        return false;
    }
    match (member.config.kind, call.style) {
        (BackendKind::Openai, _)
        | (BackendKind::AzureOpenai, RouteStyle::AzureV1 | RouteStyle::OpenAi) => true,
        (BackendKind::AzureOpenai, RouteStyle::AzureDeployment | RouteStyle::AzureResource) => {
            api_version_has_stream_usage(classic_api_version(member, call))
        }
    }
}

/// Whether an Azure `api-version` (`2024-10-21`, `2025-04-01-preview`, `preview`, …) is
/// `2024-09-01-preview` or later; the date prefix decides.
fn api_version_has_stream_usage(version: &str) -> bool {
    let version = version.trim().to_ascii_lowercase();
    if matches!(version.as_str(), "preview" | "latest" | "v1") {
        return true;
    }
    let Some(date) = version.get(..10) else {
        return false;
    };
    let shaped = date.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        _ => b.is_ascii_digit(),
    });
    shaped && date >= STREAM_USAGE_SINCE
}

/// Whether the gateway asks this call's stream for its usage chunk: a streamed chat or legacy
/// completion that did not ask for it itself, to a member that supports the option. The client
/// never sees the chunk (see [`SseTap::removing_usage`]).
///
/// OpenAI members are asked too: their other chunks then carry `"usage": null`, which the tap
/// removes again, and the record gets exact counts instead of estimates.
fn asks_for_stream_usage(member: &Member, call: &Call, peek: &RequestPeek) -> bool {
    use gatehouse_schema::OperationId as Op;
    let (asked_by_client, options_mergeable) = match peek.stream_options {
        StreamOptions::Absent | StreamOptions::Null => (false, true),
        StreamOptions::Object { include_usage } => (include_usage.unwrap_or(false), true),
        StreamOptions::Other => (false, false),
    };
    matches!(
        call.operation,
        Op::ChatCompletionsCreate | Op::CompletionsCreate
    ) && call.is_stream
        && !asked_by_client
        && options_mergeable
        && reports_stream_usage(member, call)
}

/// The client's body with `"stream_options":{"include_usage":true},` put first in the object,
/// every other byte unchanged; `None` unless it is a non-empty JSON object.
fn with_stream_usage_option(body: &[u8]) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let next = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace())?;
    if *next == b'}' {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + STREAM_USAGE_OPTION.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(STREAM_USAGE_OPTION);
    out.extend_from_slice(&body[open + 1..]);
    Some(Bytes::from(out))
}

/// The body for the member, and whether the gateway asked it for the stream's usage chunk: the
/// client's bytes, unless the model name must change or the usage option is added.
fn upstream_body(
    member: &Member,
    call: &Call,
    body: &Bytes,
    content_type: Option<&str>,
) -> (Bytes, bool) {
    // The member's name for the pool's deployment: only a call that names that deployment (in the
    // path or the body) is about it. A resource call names another model (an assistant's, a
    // fine-tuning base) or none (a batch, a continued response) and keeps its body.
    let rename = call
        .deployment
        .as_ref()
        .and(member.config.deployment.as_deref());
    // A member that takes the model in the body needs it even when the client named it in the path.
    let needs_model =
        member.config.kind == BackendKind::Openai || call.style != RouteStyle::AzureDeployment;
    let Some(peek) = &call.peek else {
        // A form (a transcription, an image edit) names its model in its `model` field: the
        // member's name, or the path's deployment for a member that takes it there.
        let wanted = match (rename, needs_model) {
            (Some(name), true) => Some(name),
            (None, true) if call.style == RouteStyle::AzureDeployment => call.deployment.as_deref(),
            _ => None,
        };
        if call.body_kind == BodyKind::Multipart
            && let (Some(model), Some(content_type)) = (wanted, content_type)
            && let Some(form) = form_with_model(
                body,
                content_type,
                call.form_model
                    .as_ref()
                    .map(|(position, value)| (*position, value.as_str())),
                model,
            )
        {
            return (form, false);
        }
        return (body.clone(), false);
    };
    let current = peek.model.as_deref();
    // On a deployment route the path names the deployment — the one access rules, limits and
    // the record went by — so a `model` in the body that says otherwise is replaced, never
    // forwarded to a member that would run it.
    let path_named = call.style == RouteStyle::AzureDeployment;
    let wanted = match (rename, needs_model) {
        (Some(name), true) => Some(name),
        (None, true) if current.is_none() || path_named => call.deployment.as_deref(),
        _ => None,
    };
    let rename = wanted.filter(|name| current != Some(*name));
    let ask_usage = asks_for_stream_usage(member, call, peek);
    if rename.is_none() && !ask_usage {
        return (body.clone(), false);
    }
    if rename.is_none() && peek.stream_options == StreamOptions::Absent {
        // The common case: one member added in front, the client's bytes kept as they are.
        if let Some(bytes) = with_stream_usage_option(body) {
            return (bytes, true);
        }
    }
    let Some(mut json) = call.json().cloned() else {
        return (body.clone(), false);
    };
    let Some(object) = json.as_object_mut() else {
        return (body.clone(), false);
    };
    if let Some(name) = rename {
        object.insert("model".to_owned(), Value::String(name.to_owned()));
    }
    if ask_usage {
        let options = object
            .entry("stream_options")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if options.is_null() {
            *options = Value::Object(serde_json::Map::new());
        }
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".to_owned(), Value::Bool(true));
        }
    }
    match serde_json::to_vec(&json) {
        Ok(bytes) => (Bytes::from(bytes), ask_usage),
        Err(_) => (body.clone(), false),
    }
}

/// The header that carries the member's credential: its key as `api-key` (Azure) or
/// `Authorization: Bearer` (OpenAI), or an Entra access token as `Authorization: Bearer` (and no
/// `api-key`). Marked sensitive, so that it is never logged.
pub(crate) async fn credential_header(
    member: &Member,
) -> Result<Option<(HeaderName, HeaderValue)>, crate::entra_credential::CredentialError> {
    let (name, value) = match &member.credential {
        None => return Ok(None),
        Some(MemberCredential::ApiKey(secret)) => {
            let secret = secret.current();
            match member.config.kind {
                BackendKind::AzureOpenai => {
                    (HeaderName::from_static("api-key"), secret.expose().clone())
                }
                BackendKind::Openai => {
                    (header::AUTHORIZATION, format!("Bearer {}", secret.expose()))
                }
            }
        }
        Some(MemberCredential::Entra { credential, scope }) => {
            let token = credential.token(scope).await?;
            (header::AUTHORIZATION, format!("Bearer {}", token.expose()))
        }
    };
    Ok(HeaderValue::from_str(&value).ok().map(|mut value| {
        value.set_sensitive(true);
        (name, value)
    }))
}

/// The fields a message's `Connection` header names: they were meant for that one connection,
/// so a proxy removes them with the header itself (RFC 9110 §7.6.1), or a client could hand a
/// backend headers its own hop never carried, and a member the client. `Content-Type` is never
/// among them: the gateway read the body by it, and the next hop must read it the same way.
/// Empty, without allocating, for the messages that name none or only `keep-alive`/`close`.
fn connection_options(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut listed = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for option in value.as_bytes().split(|&b| b == b',') {
            let option = option.trim_ascii();
            if option.eq_ignore_ascii_case(b"keep-alive") || option.eq_ignore_ascii_case(b"close") {
                continue;
            }
            // `from_bytes` lower-cases; what is no field name names no field.
            if let Ok(name) = HeaderName::from_bytes(option)
                && name != header::CONTENT_TYPE
            {
                listed.push(name);
            }
        }
    }
    listed
}

pub(crate) fn upstream_headers(
    client: &HeaderMap,
    credential: Option<(HeaderName, HeaderValue)>,
    request_id: Option<&str>,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(client.len() + 2);
    let listed = connection_options(client);
    for (name, value) in client {
        if !DROPPED_REQUEST_HEADERS.contains(&name.as_str()) && !listed.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some((name, value)) = credential {
        headers.insert(name, value);
    }
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert("x-request-id", id);
    }
    // What the backends always received (reqwest's default) when the client named none.
    headers
        .entry(header::ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    headers
}

/// Streams the backend's answer to the client through the capture, and completes the record.
///
/// `asked_usage`: the gateway added `stream_options.include_usage`, so the usage chunk is read for
/// the record and left out of what the client receives. `client_version`: the client's HTTP
/// version (an HTTP/2 answer is given up when its stream's window stays closed, see
/// [`crate::stream_window`]).
async fn relay(
    gateway: &Arc<Gateway>,
    call: Call,
    member: Arc<Member>,
    mut response: http::Response<UpstreamBody>,
    mut record: CallRecord,
    asked_usage: bool,
    client_version: http::Version,
) -> Response {
    let status = response.status();
    record.record.backend_response_code = Some(status.as_u16());
    let mut headers = HeaderMap::with_capacity(response.headers().len() + 2);
    let listed = connection_options(response.headers());
    for (name, value) in response.headers() {
        if !DROPPED_RESPONSE_HEADERS.contains(&name.as_str()) && !listed.contains(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    // Binary answers (speech, file downloads) are measured, not copied into the record.
    let is_text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/json")
                || v.starts_with("text/")
                || v.contains("+json")
                || v.starts_with("application/jsonl")
        });
    let capture_limit = if is_text {
        record.response_capture_limit
    } else {
        0
    };
    let filter_usage = asked_usage && is_sse;
    if filter_usage {
        // The client receives fewer bytes than the backend sent.
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut tee = Tee::new(capture_limit, is_sse, filter_usage);
    // A fetch or a cancel whose answer may show deferred work ended is read for it even when too
    // large to parse (a response whose output holds generated images).
    tee.follows = call.creates.is_none() && crate::deferred_work::reports_on(call.operation);

    // A call that creates an object answers with a small JSON object. It is read whole so that the
    // object's member is on record before the client can ask about the object.
    if call.creates.is_some() && !call.is_stream && status.is_success() {
        let idle = Duration::from_millis(member.config.response_idle_timeout_ms);
        let reading = Instant::now();
        // A shutdown whose drain is over waits no more for the rest of the answer.
        let (parts, mut upstream) = response.into_parts();
        let read = tokio::select! {
            read = read_limited(&mut upstream, PARSE_LIMIT, idle) => read,
            () = gateway.calls.stopped() => Err(ReadCut::ShuttingDown),
        };
        record.waited += reading.elapsed();
        match read {
            Ok(body) => {
                // Boxed: its future would otherwise make every call's future larger (by ≈ 4 KB,
                // copied whole when the call's future is boxed), and only creates need it.
                return Box::pin(finish_created(
                    gateway, call, member, status, headers, record, tee, body,
                ))
                .await;
            }
            // A response that is too large to read whole (images of the image-generation tool
            // in its output) is relayed as it streams, pinned by the `id` it opens with.
            Err(ReadCut::TooLarge(head))
                if call.creates.is_some_and(ObjectFamily::made_by_model_calls) =>
            {
                // A stored chat completion's call asked for it to be kept; a response is kept
                // unless it asked not to be.
                let stored = call.creates == Some(ObjectFamily::ChatCompletion)
                    || call
                        .json()
                        .and_then(|body| body.get("store"))
                        .and_then(Value::as_bool)
                        != Some(false);
                if stored && let Some(id) = crate::peek::leading_member_str(&head, "id") {
                    remember_object(gateway, &call, &member, &id).await;
                }
                response = http::Response::from_parts(
                    parts,
                    UpstreamBody::Resumed {
                        head: Some(head),
                        rest: Box::new(upstream),
                    },
                );
            }
            Err(cut) => {
                // The member took the call and may have created the object: the client is told
                // so, not that no backend was available (its SDK would retry, and create it
                // twice). A member that broke or fell silent is set aside as for a cut stream.
                let (reason, error) = match cut {
                    ReadCut::TooLarge(_) => (
                        "answer_too_large",
                        GatewayError::CreatedAnswerTooLarge { limit: PARSE_LIMIT },
                    ),
                    ReadCut::Broke => (
                        "backend_stream_failed",
                        GatewayError::OutcomeUnknown { timed_out: false },
                    ),
                    ReadCut::Silent => (
                        "response_idle_timeout",
                        GatewayError::OutcomeUnknown { timed_out: true },
                    ),
                    ReadCut::ShuttingDown => (
                        SHUTDOWN_REASON,
                        GatewayError::OutcomeUnknown { timed_out: false },
                    ),
                };
                if matches!(cut, ReadCut::Broke | ReadCut::Silent) {
                    set_aside_after_cut(&member);
                    gateway.metrics.answer_cut(&member.config.id, reason);
                }
                tracing::warn!(backend = %member.config.id, reason, "the answer to a call that creates an object could not be read whole");
                let holds = record.take_holds();
                let mut audit = record.finish_error(&error);
                audit.last_error_reason = Some(reason.to_owned());
                gateway.finish(audit, holds);
                return axum::response::IntoResponse::into_response(error);
            }
        }
    }
    if status.is_success()
        && call.object.as_ref().is_some_and(|_| call_deletes(&call))
        && let Some((_, id)) = &call.object
        && let Err(error) = gateway.affinity.forget(id).await
    {
        tracing::warn!(%error, "could not journal an object's deletion");
    }

    gateway
        .metrics
        .overhead
        .observe(record.overhead().as_secs_f64());
    // The length the backend declared, so that the chunk that completes it ends the call even
    // when the backend ends its stream only later (HTTP/2: END_STREAM in a frame of its own).
    let body_left = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = RelayBody {
        upstream: Some(response.into_body()),
        idle: IdleDeadline::new(Duration::from_millis(
            member.config.response_idle_timeout_ms,
        )),
        call: Some(RelayCall {
            gateway: Arc::clone(gateway),
            call,
            member,
            status,
            tee,
            record,
            sent: 0,
            body_left,
            span: tracing::Span::current(),
            pinned: None,
            in_flight: gateway.calls.enter(),
        }),
    };
    let body = if client_version == http::Version::HTTP_2 {
        gateway.stall_watch.body(body)
    } else {
        Body::from_stream(body)
    };
    build_response(status, headers, body)
}

/// Finishes a call that created an object, its answer read whole (`body`): the object pinned to
/// its member before the client has its id, the record completed, the answer sent.
#[expect(
    clippy::too_many_arguments,
    reason = "the relay's state, handed over whole at the one place it ends this way"
)]
async fn finish_created(
    gateway: &Arc<Gateway>,
    call: Call,
    member: Arc<Member>,
    status: StatusCode,
    headers: HeaderMap,
    mut record: CallRecord,
    mut tee: Tee,
    body: Bytes,
) -> Response {
    let _ = tee.push(body.clone());
    if let Some(summary) = tee.json() {
        remember_created(gateway, &call, &member, &summary).await;
        if status.is_success() && call.operation == OperationId::CreateResponse {
            remember_containers(gateway, &member, &summary).await;
        }
    }
    let sent = body.len() as u64;
    gateway
        .metrics
        .overhead
        .observe(record.overhead().as_secs_f64());
    record.record.time_to_first_byte = Some(millis(record.started.elapsed()));
    let answer = tee.complete(&mut record, &call);
    let estimate = estimate_needed(status, &call, &record, answer.as_ref());
    let follow = crate::deferred_work::follow(&call, status, answer.as_ref());
    let holds = record.take_holds();
    let audit = record.finish(status.as_u16(), sent);
    match estimate {
        // Deferred work is left before the client has the object's id, so that its first poll
        // finds the entry.
        None => gateway.finish_following(audit, holds, follow).await,
        // Counting must not delay the answer.
        Some(work) => {
            let in_flight = gateway.calls.enter();
            let finishing = finish_estimated(Arc::clone(gateway), audit, holds, work, follow);
            tokio::spawn(
                async move {
                    finishing.await;
                    drop(in_flight);
                }
                .in_current_span(),
            );
        }
    }
    build_response(status, headers, Body::from(body))
}

/// The response body the client reads: each backend chunk passes through the tee as hyper asks
/// for it, on the connection's own task — no extra task or channel per call, and backpressure is
/// hyper's. The call is finished with the chunk that completes the backend's body (hyper stops
/// polling a body once its `Content-Length` is written, so the end is not always polled for).
/// When the client goes away first, `Drop` hands the rest of the backend's answer to a drain task
/// so that the record is still complete.
struct RelayBody {
    upstream: Option<UpstreamBody>,
    /// How long the backend may stay silent once its answer has begun.
    idle: IdleDeadline,
    call: Option<RelayCall>,
}

/// What the relay needs to finish the call's record.
struct RelayCall {
    gateway: Arc<Gateway>,
    call: Call,
    member: Arc<Member>,
    status: StatusCode,
    tee: Tee,
    record: CallRecord,
    sent: u64,
    /// What the backend's declared `Content-Length` still holds, when it declared one.
    body_left: Option<u64>,
    span: tracing::Span,
    /// The object a streamed create announced, pinned as it passed.
    pinned: Option<String>,
    /// The call counted as under way until its record is handed on.
    in_flight: InFlight,
}

impl RelayCall {
    /// Notes that the member broke off or fell silent while the rest of an answer was read after
    /// its client left: the cut is counted, the member set aside as while a client reads
    /// ([`RelayBody::cut`]), `reason` put on the record.
    fn cut(&mut self, reason: &'static str) {
        set_aside_after_cut(&self.member);
        self.gateway
            .metrics
            .answer_cut(&self.member.config.id, reason);
        self.record.record.last_error_reason = Some(reason.to_owned());
    }

    /// Notes that bytes went on to the client: the first are the call's time to first byte, the
    /// first after the stream carried generated output its time to first token (the clock is
    /// read only for those two).
    fn note_sent(&mut self) {
        let first_token =
            self.record.record.time_to_first_token.is_none() && self.tee.output_started();
        if self.record.record.time_to_first_byte.is_some() && !first_token {
            return;
        }
        let at = millis(self.record.started.elapsed());
        let record = &mut self.record.record;
        record.time_to_first_byte.get_or_insert(at);
        if first_token {
            record.time_to_first_token = Some(at);
        }
    }

    /// Pins the object a streamed create announced to this member, in memory at once and in the
    /// journal and the shared map on a task.
    fn pin_early(&mut self, id: String) {
        if self.call.creates.is_none() || !self.status.is_success() {
            return;
        }
        let until = expiry_for(&self.call);
        pin_then_journal(
            &self.gateway,
            &self.member.config.id,
            vec![(id.clone(), until)],
            self.span.clone(),
        );
        self.pinned = Some(id);
    }

    /// Completes the record; async work (journaling a created object, counting tokens) goes to
    /// a task, everything else happens here.
    fn finish(mut self) {
        let span = self.span.clone();
        let _entered = span.enter();
        // Files the backend made itself (a batch's output) live on this member too, for good.
        let mut produced: Vec<(String, Option<i64>)> =
            if self.status.is_success() && names_produced_files(&self.call) {
                self.tee
                    .json()
                    .map(|answer| produced_files(&answer))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|id| self.gateway.affinity.member_of(id).is_none())
                    .map(|id| (id, None))
                    .collect()
            } else {
                Vec::new()
            };
        // The code interpreter's containers a response ran in live on this member too: read
        // from a whole answer that names a code interpreter call (its tree is not parsed
        // otherwise), else from a stream's reassembled response.
        let ran_code =
            self.status.is_success() && self.call.operation == OperationId::CreateResponse;
        let whole_containers = ran_code
            .then(|| self.tee.whole())
            .flatten()
            .filter(|body| memchr::memmem::find(body, b"code_interpreter_call").is_some())
            .and_then(|body| serde_json::from_slice::<Value>(body).ok())
            .map(|answer| response_containers(&answer));
        let answer = self.tee.complete(&mut self.record, &self.call);
        if ran_code {
            let containers = whole_containers
                .or_else(|| answer.as_ref().map(response_containers))
                .unwrap_or_default();
            let until = container_expiry();
            produced.extend(
                containers
                    .into_iter()
                    .filter(|id| self.gateway.affinity.member_of(id).is_none())
                    .map(|id| (id, until)),
            );
        }
        // From the answer as one object (a stream's reassembled, whatever the capture keeps),
        // else from the captured body.
        let created = (self.call.creates.is_some() && self.status.is_success())
            .then(|| {
                answer
                    .as_ref()
                    .and_then(|answer| created_id(&self.call, answer))
                    .or_else(|| {
                        let body = self.record.record.backend_response_body.as_deref()?;
                        created_id(&self.call, &serde_json::from_str::<Value>(body).ok()?)
                    })
            })
            .flatten()
            .filter(|id| self.pinned.as_ref() != Some(id));
        // Pinned here at once, before the answer's last chunk reaches the client (it is handed
        // on after this): the journal and the shared map follow on a task.
        let until = expiry_for(&self.call);
        if let Some(id) = &created {
            self.gateway.affinity.pin(id, &self.member.config.id, until);
        }
        for (id, until) in &produced {
            self.gateway
                .affinity
                .pin(id, &self.member.config.id, *until);
        }
        let estimate = estimate_needed(self.status, &self.call, &self.record, answer.as_ref());
        let follow = crate::deferred_work::follow(&self.call, self.status, answer.as_ref());
        let holds = self.record.take_holds();
        let audit = self.record.finish(self.status.as_u16(), self.sent);
        if created.is_none() && estimate.is_none() && produced.is_empty() && follow.is_none() {
            self.gateway.finish(audit, holds);
            return;
        }
        let RelayCall {
            gateway,
            member,
            in_flight,
            ..
        } = self;
        tokio::spawn(
            async move {
                let pins = created.into_iter().map(|id| (id, until)).chain(produced);
                for (id, until) in pins {
                    journal_pinned(&gateway, &member.config.id, &id, until).await;
                }
                match estimate {
                    None => gateway.finish_following(audit, holds, follow).await,
                    Some(work) => finish_estimated(gateway, audit, holds, work, follow).await,
                }
                drop(in_flight);
            }
            .in_current_span(),
        );
    }
}

impl RelayBody {
    /// The backend's answer is over: its connection is let go and the call's record finished.
    fn finish(&mut self) {
        self.upstream = None;
        if let Some(relay) = self.call.take() {
            relay.finish();
        }
    }

    /// Ends the relay with the backend's answer incomplete: the cut is counted and put on the
    /// call's record with `reason` and `message`, the member set aside like a failing one (it
    /// broke or hung mid-answer, so the next calls go elsewhere), the record finished, and the
    /// client gets `error`, so that it sees a broken response, not a short one that looks
    /// complete.
    fn cut(
        &mut self,
        reason: &'static str,
        message: String,
        error: std::io::Error,
    ) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        if let Some(relay) = self.call.as_mut() {
            set_aside_after_cut(&relay.member);
            relay
                .gateway
                .metrics
                .answer_cut(&relay.member.config.id, reason);
            relay.record.record.last_error_reason = Some(reason.to_owned());
            relay.record.record.last_error_message = Some(message);
        }
        self.finish();
        Poll::Ready(Some(Err(error)))
    }
}

/// Sets aside a member whose answer broke or fell silent after it began, for the time a failing
/// member is set aside when nothing says otherwise; a longer wait it already has (a throttle's
/// `Retry-After`) stands.
pub(crate) fn set_aside_after_cut(member: &Member) {
    member.health.set_aside_at_least(
        SetAsideReason::Failing,
        retry_hint::DEFAULT_SET_ASIDE,
        Instant::now(),
    );
}

impl futures::Stream for RelayBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let (Some(upstream), Some(relay)) = (this.upstream.as_mut(), this.call.as_mut()) else {
                return Poll::Ready(None);
            };
            let polled = match std::pin::Pin::new(&mut *upstream).poll_frame(cx) {
                Poll::Ready(polled) => polled,
                Poll::Pending => {
                    if !this.idle.expired(cx) {
                        return Poll::Pending;
                    }
                    let silence = millis(this.idle.after());
                    tracing::warn!(parent: &relay.span, backend = %relay.member.config.id, silence_ms = silence, "backend silent too long after its answer began; answer cut and member set aside");
                    return this.cut(
                        "response_idle_timeout",
                        format!(
                            "The backend sent nothing for {silence} ms once its answer had begun (response_idle_timeout_ms); the answer was cut."
                        ),
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "backend silent too long",
                        ),
                    );
                }
            };
            this.idle.progressed();
            match polled {
                Some(Ok(frame)) => {
                    // Trailers are not relayed.
                    let Ok(chunk) = frame.into_data() else {
                        continue;
                    };
                    // Whether this chunk completes the backend's body: its stream ended, or the
                    // length it declared is reached (hyper stops polling a body whose
                    // `Content-Length` it has written, so the end may never be polled for).
                    if let Some(left) = relay.body_left.as_mut() {
                        *left = left.saturating_sub(chunk.len() as u64);
                    }
                    let complete = upstream.is_end_stream() || relay.body_left == Some(0);
                    // What goes on to the client: the chunk, or what passes the usage filter.
                    let mut outgoing = relay.tee.push(chunk);
                    if complete {
                        outgoing = relay.tee.end(outgoing);
                    }
                    // A streamed create names its object at the start: pinned before the client
                    // reads the id, so that a call about it in the meantime (a cancel, the next
                    // turn) finds its member.
                    if let Some(id) = relay.tee.take_created() {
                        relay.pin_early(id);
                    }
                    if let Some(outgoing) = &outgoing {
                        relay.sent += outgoing.len() as u64;
                        relay.note_sent();
                    }
                    if complete {
                        this.finish();
                        return Poll::Ready(outgoing.map(Ok));
                    }
                    match outgoing {
                        Some(outgoing) => return Poll::Ready(Some(Ok(outgoing))),
                        None => continue,
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(parent: &relay.span, backend = %relay.member.config.id, %error, "backend stream broke after the response started; member set aside");
                    return this.cut(
                        "backend_stream_failed",
                        "The backend's response ended early.".to_owned(),
                        std::io::Error::other("backend stream failed"),
                    );
                }
                None => {
                    // What the usage filter still held goes out now, as it came.
                    if let Some(held) = relay.tee.end(None) {
                        relay.sent += held.len() as u64;
                        relay.note_sent();
                        this.finish();
                        return Poll::Ready(Some(Ok(held)));
                    }
                    // A last event without its blank line, read only now, may be the first
                    // that carried output: its bytes went out, it ends here.
                    if relay.sent > 0 {
                        relay.note_sent();
                    }
                    this.finish();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Answer for RelayBody {
    fn is_over(&self) -> bool {
        self.call.is_none()
    }

    fn span(&self) -> Option<&tracing::Span> {
        self.call.as_ref().map(|call| &call.span)
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        let (Some(mut upstream), Some(mut relay)) = (self.upstream.take(), self.call.take()) else {
            return;
        };
        if upstream.is_end_stream() {
            // Nothing was left to send (an empty body hyper never polled).
            relay.finish();
            return;
        }
        // The client hung up before the end: read the rest of the answer, bounded, for the record.
        // A client that leaves once the stream said it is over (`[DONE]`, while the member has
        // not closed the body yet) had the whole answer: it did not abort.
        if !relay.tee.stream_ended() {
            relay.record.record.client_aborted = true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            relay.finish();
            return;
        };
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + DRAIN_TIME;
            // The member may pause as long as while a client reads, no longer.
            let idle = Duration::from_millis(relay.member.config.response_idle_timeout_ms);
            let mut drained: u64 = 0;
            loop {
                let wait_until = deadline.min(tokio::time::Instant::now() + idle);
                // Once the shutdown's drain is over, the record is finished with what came.
                let next = tokio::select! {
                    biased;
                    () = relay.gateway.calls.stopped() => {
                        relay.record.record.last_error_reason = Some(SHUTDOWN_REASON.to_owned());
                        break;
                    }
                    next = tokio::time::timeout_at(wait_until, upstream.frame()) => next,
                };
                match next {
                    Ok(Some(Ok(frame))) => {
                        let Ok(chunk) = frame.into_data() else {
                            continue;
                        };
                        drained += chunk.len() as u64;
                        let _ = relay.tee.push(chunk);
                        if drained > DRAIN_BYTES {
                            relay.record.record.last_error_reason =
                                Some("drain_size_exceeded".to_owned());
                            break;
                        }
                    }
                    Ok(Some(Err(_))) => {
                        relay.cut("backend_stream_failed");
                        break;
                    }
                    Ok(None) => break,
                    Err(_) if wait_until < deadline => {
                        relay.cut("response_idle_timeout");
                        break;
                    }
                    Err(_) => {
                        relay.record.record.last_error_reason =
                            Some("drain_time_exceeded".to_owned());
                        break;
                    }
                }
            }
            relay.finish();
        });
    }
}

/// What to count when a successful inference call's answer carried no usage (an api-version
/// without `include_usage`, a stream cut short or stopped by the content filter, a drain that hit
/// its limit, an answer without `usage`); `None` when the backend's counts are on the record.
fn estimate_needed(
    status: StatusCode,
    call: &Call,
    record: &CallRecord,
    answer: Option<&Value>,
) -> Option<TokenWork> {
    if !status.is_success() || record.record.usage.is_some() || still_running(answer) {
        return None;
    }
    TokenWork::plan(
        call.operation,
        call.json(),
        answer,
        call.deployment.as_deref(),
    )
}

/// Whether an answer is an object whose model work goes on after the call: a background
/// response or a run, queued, in progress or waiting for tool outputs. What it will use is not
/// known yet, so nothing is counted for it (an estimate from the prompt alone would give back
/// the whole allowance for the answer): the tokens reserved for the call wait for the call that
/// sees the work end (`crate::deferred_work`).
fn still_running(answer: Option<&Value>) -> bool {
    let Some(answer) = answer else {
        return false;
    };
    let object = answer.get("object").and_then(Value::as_str);
    let status = answer.get("status").and_then(Value::as_str);
    matches!(object, Some("response" | "thread.run"))
        && matches!(status, Some("queued" | "in_progress" | "requires_action"))
}

/// Counts the tokens off the client's path and hands the record on, after what `follow` says
/// about work that goes on after a call.
async fn finish_estimated(
    gateway: Arc<Gateway>,
    mut audit: AuditRecord,
    holds: Holds,
    work: TokenWork,
    follow: Option<crate::deferred_work::Follow>,
) {
    audit.usage = work.count_off_path().await;
    gateway.finish_following(audit, holds, follow).await;
}

fn call_deletes(call: &Call) -> bool {
    use gatehouse_schema::OperationId as Op;
    matches!(
        call.operation,
        Op::FilesDelete
            | Op::DeleteAssistant
            | Op::DeleteThread
            | Op::DeleteResponse
            | Op::DeleteVectorStore
            | Op::DeleteChatCompletion
            | Op::DeleteContainer
            | Op::DeleteConversation
            | Op::DeleteEval
    )
}

fn build_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Why an answer could not be read whole.
#[derive(Debug)]
enum ReadCut {
    /// Longer than the limit: what was read (the limit and at most a chunk more).
    TooLarge(Bytes),
    /// The member broke it off.
    Broke,
    /// The member paused longer than its idle limit.
    Silent,
    /// The gateway's shutdown stopped waiting for it.
    ShuttingDown,
}

/// Reads a small answer whole: at most `limit` bytes, and no pause longer than `idle`. An answer
/// too large leaves the rest of it in `upstream`.
async fn read_limited(
    upstream: &mut UpstreamBody,
    limit: usize,
    idle: Duration,
) -> Result<Bytes, ReadCut> {
    let mut body = Vec::new();
    while let Some(frame) = tokio::time::timeout(idle, upstream.frame())
        .await
        .map_err(|_| ReadCut::Silent)?
    {
        let Ok(chunk) = frame.map_err(|_| ReadCut::Broke)?.into_data() else {
            continue;
        };
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk);
            return Err(ReadCut::TooLarge(Bytes::from(body)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// Pins to `member` the files `items` (objects of a list one member answered) name as made by
/// it ([`produced_files`]) and that no member holds yet: in memory at once, in the journal and
/// the shared map on a task. A merged list's page is relayed as from the pool's first member,
/// so its files are pinned here, where each member's own answer is read.
pub(crate) fn pin_listed_files(gateway: &Arc<Gateway>, call: &Call, member: &str, items: &[Value]) {
    if !names_produced_files(call) {
        return;
    }
    let ids: Vec<(String, Option<i64>)> = items
        .iter()
        .flat_map(produced_files)
        .filter(|id| gateway.affinity.member_of(id).is_none())
        .map(|id| (id, None))
        .collect();
    if !ids.is_empty() {
        pin_then_journal(gateway, member, ids, tracing::Span::current());
    }
}

/// Pins `objects` (id, expiry) to `member` in memory at once, and journals them (and shares
/// them) on a task in `span`.
fn pin_then_journal(
    gateway: &Arc<Gateway>,
    member: &str,
    objects: Vec<(String, Option<i64>)>,
    span: tracing::Span,
) {
    for (id, until) in &objects {
        gateway.affinity.pin(id, member, *until);
    }
    let (gateway, member) = (Arc::clone(gateway), member.to_owned());
    tokio::spawn(
        async move {
            for (id, until) in objects {
                journal_pinned(&gateway, &member, &id, until).await;
            }
        }
        .instrument(span),
    );
}

/// Journals (and shares) an object already pinned to `member` in memory; a journal that fails
/// is logged: the object stays pinned until the gateway stops.
async fn journal_pinned(gateway: &Gateway, member: &str, id: &str, until: Option<i64>) {
    if let Err(error) = gateway.affinity.remember_pinned(id, member, until).await {
        tracing::error!(%error, object = %id, "could not journal which member holds an object");
    }
}

/// Whether the answer to `call` may name files its member made itself: a batch's output and
/// error files, a fine-tuning job's result files, the file a completed upload became.
fn names_produced_files(call: &Call) -> bool {
    use gatehouse_schema::OperationId as Op;
    matches!(
        call.operation,
        Op::BatchGet
            | Op::BatchList
            | Op::BatchCancel
            | Op::FineTuningGet
            | Op::FineTuningList
            | Op::FineTuningCancel
            | Op::CompleteUpload
    )
}

/// The ids of the files an answer about batches, fine-tuning jobs or uploads names as made by the
/// backend (`output_file_id`, `error_file_id`, `result_files`, a completed upload's `file`), of
/// the object or of each in a list's `data`.
fn produced_files(answer: &Value) -> Vec<String> {
    let objects: Vec<&Value> = match answer.get("data").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None => vec![answer],
    };
    let mut ids = Vec::new();
    for object in objects {
        for key in ["output_file_id", "error_file_id"] {
            if let Some(id) = object.get(key).and_then(Value::as_str) {
                ids.push(id.to_owned());
            }
        }
        if let Some(files) = object.get("result_files").and_then(Value::as_array) {
            ids.extend(files.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        // A completed upload: `{"object": "upload", "status": "completed", "file": {"id": …}}`.
        if object.get("object").and_then(Value::as_str) == Some("upload")
            && let Some(id) = object.pointer("/file/id").and_then(Value::as_str)
        {
            ids.push(id.to_owned());
        }
    }
    ids.retain(|id| !id.is_empty());
    ids
}

/// The containers a response's code interpreter ran in (`output[]` items of type
/// `code_interpreter_call`, their `container_id`): made by its member, which alone holds their
/// files.
fn response_containers(response: &Value) -> Vec<String> {
    response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|item| item.get("type").and_then(Value::as_str) == Some("code_interpreter_call"))
        .filter_map(|item| item.get("container_id").and_then(Value::as_str))
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The id of the object a create call's answer names: `thread_id` for a thread created with its
/// run, else `id`. A response made with `"store": false` is kept nowhere: none.
fn created_id(call: &Call, response: &Value) -> Option<String> {
    if call.creates == Some(ObjectFamily::Response)
        && response.get("store").and_then(Value::as_bool) == Some(false)
    {
        return None;
    }
    let key = match call.creates? {
        ObjectFamily::Thread
            if call.operation == gatehouse_schema::OperationId::CreateThreadAndRun =>
        {
            "thread_id"
        }
        _ => "id",
    };
    response.get(key).and_then(Value::as_str).map(str::to_owned)
}

async fn remember_created(gateway: &Gateway, call: &Call, member: &Member, response: &Value) {
    if let Some(id) = created_id(call, response) {
        remember_object(gateway, call, member, &id).await;
    }
}

/// Journals the code interpreter's containers a response ran in (see [`response_containers`])
/// as held by `member`, the ones not known yet.
async fn remember_containers(gateway: &Gateway, member: &Member, response: &Value) {
    for id in response_containers(response) {
        if gateway.affinity.member_of(&id).is_none() {
            remember_held(gateway, member, &id, container_expiry()).await;
        }
    }
}

/// When the memory of a container met in a response's output ends (unix seconds).
fn container_expiry() -> Option<i64> {
    affinity::expiry_of(ObjectFamily::Container, time::OffsetDateTime::now_utc())
}

/// Journals that `call` created object `id` on `member`, living as long as its family does.
async fn remember_object(gateway: &Gateway, call: &Call, member: &Member, id: &str) {
    remember_held(gateway, member, id, expiry_for(call)).await;
}

/// Records that `member` holds object `id` until `until` (unix seconds; `None`: until deleted),
/// in memory, the journal and the shared map; a journal that fails is logged.
async fn remember_held(gateway: &Gateway, member: &Member, id: &str, until: Option<i64>) {
    if let Err(error) = gateway
        .affinity
        .remember(id, &member.config.id, until)
        .await
    {
        tracing::error!(%error, object = %id, "could not journal which member holds an object");
    }
}

/// When the object `call` creates expires by itself (unix seconds): a stored response's 30 days;
/// `None` for objects that live until deleted.
fn expiry_for(call: &Call) -> Option<i64> {
    call.creates
        .and_then(|family| affinity::expiry_of(family, time::OffsetDateTime::now_utc()))
}

/// The `object`, `id` and `status` that the start of an answer too large to parse names (an
/// object opens with them), as a JSON object; `None` unless it names all three.
fn object_head(start: &[u8]) -> Option<Value> {
    let mut head = serde_json::Map::new();
    for field in ["object", "id", "status"] {
        let value = crate::peek::leading_member_str(start, field)?;
        head.insert(field.to_owned(), Value::String(value));
    }
    Some(Value::Object(head))
}

/// Usage as an answer's `usage` member, the way [`capture::usage_of`] reads it back.
fn usage_json(usage: &gatehouse_schema::audit::TokenUsage) -> Value {
    serde_json::json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    })
}

/// The last bytes of an answer too large to parse that are kept for its `model` and `usage`
/// ([`ResponsePeek::read_tail`]).
const ANSWER_TAIL: usize = 64 * 1024;

/// Appends `chunk` to an answer's tail, keeping its last [`ANSWER_TAIL`] bytes at least (cut back
/// now and then, not at every chunk).
fn append_to_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    tail.extend_from_slice(chunk);
    if tail.len() > 2 * ANSWER_TAIL {
        tail.drain(..tail.len() - ANSWER_TAIL);
    }
}

/// The copy of the response kept for the record.
struct Tee {
    capture: BodyCapture,
    answer: AnswerCopy,
    /// Whether an answer too large to parse is read for what it says of deferred work: its
    /// `object`, `id` and `status` from its start (`AnswerCopy::Tail::head`).
    follows: bool,
}

/// What is kept of an answer, besides its captured bytes, for the record's model, usage and
/// messages.
#[expect(
    clippy::large_enum_variant,
    reason = "one per call, in the relay's state, as the three options it replaces were; a boxed tap would cost every streamed call an allocation"
)]
enum AnswerCopy {
    /// A stream, reassembled as it passes; its bytes are captured only while its shape is not
    /// recognised ([`SseTap::recognised`]).
    Stream(SseTap),
    /// The whole answer, while it stays within [`PARSE_LIMIT`].
    Whole(Vec<u8>),
    /// An answer that outgrew [`PARSE_LIMIT`]: its last bytes, and the `model` its start named
    /// before the large part (a Responses object names it before its `output`; an embeddings
    /// list only after its `data`, where the tail has it).
    Tail {
        tail: Vec<u8>,
        head_model: Option<String>,
        /// The `object`, `id` and `status` its start names, when read (see [`Tee::follows`]).
        head: Option<Value>,
    },
}

impl Tee {
    /// `filter_usage`: the stream's usage chunk was asked for by the gateway and is kept from the
    /// client.
    fn new(capture_limit: usize, is_sse: bool, filter_usage: bool) -> Tee {
        let answer = match (is_sse, filter_usage) {
            (false, _) => AnswerCopy::Whole(Vec::new()),
            (true, false) => AnswerCopy::Stream(SseTap::default()),
            (true, true) => AnswerCopy::Stream(SseTap::removing_usage()),
        };
        Tee {
            capture: BodyCapture::new(capture_limit),
            answer,
            follows: false,
        }
    }

    /// Copies a chunk and returns what goes on to the client: the chunk itself, unless the usage
    /// filter holds part of it back (then what passes, possibly nothing).
    fn push(&mut self, chunk: Bytes) -> Option<Bytes> {
        match &mut self.answer {
            AnswerCopy::Stream(sse) if sse.recognised() => return sse.pass(chunk),
            AnswerCopy::Stream(sse) => {
                // A stream of a shape the tap does not reassemble (yet) is kept as it came, up to
                // the limit, for the record.
                let passed = sse.pass(chunk.clone());
                if !sse.recognised() {
                    self.capture.push(&chunk);
                }
                return passed;
            }
            AnswerCopy::Whole(whole) if whole.len() + chunk.len() <= PARSE_LIMIT => {
                whole.extend_from_slice(&chunk);
            }
            AnswerCopy::Whole(whole) => {
                // (The answer's start: what was kept, or this chunk when it is the first.)
                let start: &[u8] = if whole.is_empty() { &chunk } else { whole };
                let head_model = crate::peek::leading_member_str(start, "model");
                let head = self.follows.then(|| object_head(start)).flatten();
                let mut tail = std::mem::take(whole);
                append_to_tail(&mut tail, &chunk);
                self.answer = AnswerCopy::Tail {
                    tail,
                    head_model,
                    head,
                };
            }
            AnswerCopy::Tail { tail, .. } => append_to_tail(tail, &chunk),
        }
        self.capture.push(&chunk);
        Some(chunk)
    }

    /// The body is over: `passed` (what its last chunk let through) followed by what the usage
    /// filter still held, which goes on to the client as it came (see [`SseTap::end`]).
    fn end(&mut self, passed: Option<Bytes>) -> Option<Bytes> {
        let AnswerCopy::Stream(sse) = &mut self.answer else {
            return passed;
        };
        let Some(held) = sse.end() else {
            return passed;
        };
        match passed {
            Some(passed) => Some([passed, held].concat().into()),
            None => Some(held),
        }
    }

    /// The whole answer's bytes, when it is kept whole.
    fn whole(&self) -> Option<&[u8]> {
        match &self.answer {
            AnswerCopy::Whole(whole) => Some(whole),
            AnswerCopy::Stream(_) | AnswerCopy::Tail { .. } => None,
        }
    }

    /// The whole answer as JSON, when it is kept whole and is JSON.
    fn json(&self) -> Option<Value> {
        match &self.answer {
            AnswerCopy::Whole(whole) => serde_json::from_slice(whole).ok(),
            AnswerCopy::Stream(_) | AnswerCopy::Tail { .. } => None,
        }
    }

    /// Whether a stream has carried generated output (see [`SseTap::output_started`]).
    fn output_started(&self) -> bool {
        match &self.answer {
            AnswerCopy::Stream(sse) => sse.output_started(),
            AnswerCopy::Whole(_) | AnswerCopy::Tail { .. } => false,
        }
    }

    /// Whether a stream has passed its end (see [`SseTap::ended`]).
    fn stream_ended(&self) -> bool {
        match &self.answer {
            AnswerCopy::Stream(sse) => sse.ended(),
            AnswerCopy::Whole(_) | AnswerCopy::Tail { .. } => false,
        }
    }

    /// The id of an object a stream has just announced it created (see
    /// [`SseTap::take_created`]), once.
    fn take_created(&mut self) -> Option<String> {
        match &mut self.answer {
            AnswerCopy::Stream(sse) => sse.take_created(),
            AnswerCopy::Whole(_) | AnswerCopy::Tail { .. } => None,
        }
    }

    /// Writes what the response amounted to into the record, and returns the answer as one JSON
    /// object (a stream reassembled), when it is one.
    fn complete(self, record: &mut CallRecord, call: &Call) -> Option<Value> {
        let limit = self.capture.limit();
        let body = match self.answer {
            AnswerCopy::Stream(sse) => {
                let summary = sse.finish();
                record.usage(summary.usage);
                record.record.model_name = summary.model;
                if summary.failed && record.record.last_error_reason.is_none() {
                    record.record.last_error_reason = Some("backend_stream_error".to_owned());
                }
                match summary.response.as_ref() {
                    Some(response) if limit > 0 => {
                        record.record.response_messages =
                            capture::within_limit(capture::response_messages(response), limit);
                        let text = response.to_string();
                        record.record.response_body_truncated = text.len() > limit;
                        let mut capture = BodyCapture::new(limit);
                        capture.push(text.as_bytes());
                        record.record.backend_response_body = capture.into_text();
                    }
                    Some(_) => {}
                    // Not reassembled: the events as they came (nothing with a limit of 0).
                    None => {
                        record.record.response_body_truncated = self.capture.truncated();
                        record.record.backend_response_body = self.capture.into_text();
                    }
                }
                return summary.response;
            }
            AnswerCopy::Tail {
                tail,
                head_model,
                head,
            } => {
                // Too large to parse: `usage` from its end, `model` from its start or its end,
                // the messages not at all.
                let peek = ResponsePeek::read_tail(&tail);
                record.usage(peek.usage);
                record.record.model_name = head_model.or(peek.model);
                record.record.response_body_truncated = self.capture.truncated();
                record.record.backend_response_body = self.capture.into_text();
                // What deferred work needs of it: its head, and the usage from its end.
                return head.map(|mut head| {
                    if let (Value::Object(fields), Some(usage)) = (&mut head, peek.usage) {
                        fields.insert("usage".to_owned(), usage_json(&usage));
                    }
                    head
                });
            }
            AnswerCopy::Whole(body) => body,
        };
        let wants_messages = call.operation.is_inference() && limit > 0;
        record.record.response_body_truncated = self.capture.truncated();
        record.record.backend_response_body = self.capture.into_text();
        // The record needs `model`, `usage` and the completion's messages: read them without the
        // tree, which is parsed only when usage is missing (for the estimate), or when the answer
        // may say that work going on after its call has ended or goes on (`deferred_work`).
        if let Some((peek, messages)) = ResponsePeek::read_with_messages(&body, wants_messages) {
            let answer = (peek.usage.is_none()
                || crate::deferred_work::may_follow(call.operation, &body))
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten();
            record.usage(peek.usage);
            record.record.model_name = peek.model;
            record.record.response_messages = capture::within_limit(messages, limit);
            return answer;
        }
        let json = serde_json::from_slice::<Value>(&body).ok();
        if let Some(json) = &json {
            record.usage(capture::usage_of(json));
            record.record.model_name = json.get("model").and_then(Value::as_str).map(str::to_owned);
            if wants_messages {
                record.record.response_messages =
                    capture::within_limit(capture::response_messages(json), limit);
            }
        }
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The form as the form reader classifies it on an OpenAI-style route, renamed for a member.
    fn renamed_form(content_type: &str, form: &str, model: &str) -> Option<Bytes> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
        let body = Bytes::from(form.to_owned());
        let call = crate::classify::classify(
            &http::Method::POST,
            "/v1/audio/transcriptions",
            None,
            &headers,
            &body,
        )
        .unwrap();
        let field = call
            .form_model
            .as_ref()
            .map(|(position, value)| (*position, value.as_str()));
        form_with_model(&body, content_type, field, model)
    }

    #[test]
    fn a_forms_model_is_replaced_or_added_and_every_other_byte_kept() {
        let content_type = "multipart/form-data; boundary=XyZ";
        let file = "RIFF--XyZ not a delimiter\r\n-XyZ neither";
        // However the part spells its name, as long as the form reader takes it for `model`.
        for disposition in [
            "form-data; name=\"model\"",
            "form-data; name=model",
            "form-data; name = \"model\"",
            "form-data;\tname=\"model\"",
        ] {
            let with_model = format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n{file}\r\n\
                 --XyZ\r\nContent-Disposition: {disposition}\r\n\r\nwhisper\r\n\
                 --XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nde\r\n--XyZ--\r\n"
            );
            let renamed = renamed_form(content_type, &with_model, "whisper-prod").unwrap();
            assert_eq!(
                String::from_utf8(renamed.to_vec()).unwrap(),
                with_model.replace("\r\n\r\nwhisper\r\n", "\r\n\r\nwhisper-prod\r\n"),
                "{disposition}"
            );
        }
        let without = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n{file}\r\n--XyZ--\r\n"
        );
        let body = Bytes::from(without.clone());
        let added = form_with_model(&body, content_type, None, "whisper").unwrap();
        assert_eq!(
            String::from_utf8(added.to_vec()).unwrap(),
            format!(
                "--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n{without}"
            )
        );
        // A position that does not hold the value read is not overwritten.
        let with_model = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n{file}\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XyZ--\r\n"
        );
        let with_model = Bytes::from(with_model);
        assert_eq!(
            form_with_model(&with_model, content_type, Some((0, "whisper")), "m"),
            None
        );
        assert!(form_with_model(&with_model, content_type, Some((1, "whisper")), "m").is_some());
        assert_eq!(
            form_with_model(&body, "multipart/form-data", None, "m"),
            None
        );
    }

    #[test]
    fn api_versions_with_stream_usage_start_at_2024_09_01_preview() {
        for version in [
            "2024-09-01-preview",
            "2024-10-21",
            "2024-10-01-preview",
            "2025-04-01-preview",
            "preview",
            "latest",
        ] {
            assert!(api_version_has_stream_usage(version), "{version}");
        }
        for version in [
            "2024-06-01",
            "2024-08-01-preview",
            "2024-02-15-preview",
            "2023-05-15",
            "",
            "garbage-version",
            "2024-9-1",
        ] {
            assert!(!api_version_has_stream_usage(version), "{version}");
        }
    }

    #[test]
    fn the_usage_option_goes_first_and_every_client_byte_stays() {
        let body = br#"  {"messages":[{"role":"user","content":"hi"}], "stream": true, "seed": 12345678901234567890}"#;
        let out = with_stream_usage_option(body).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"  {"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}], "stream": true, "seed": 12345678901234567890}"#
        );
        assert_eq!(with_stream_usage_option(b"{ }"), None);
        assert_eq!(with_stream_usage_option(b"[1]"), None);
    }
}
