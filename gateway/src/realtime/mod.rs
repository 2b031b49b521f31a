//! The Realtime API: a WebSocket session between a client and a member, relayed event by event.
//!
//! Clients open the session as Azure's and OpenAI's SDKs do (`azure-specs.md` §1.8; OpenAI's
//! Python SDK, `lib/azure.py` `_configure_realtime`): `GET /openai/realtime?api-version=…&
//! deployment=…` with an `Upgrade: websocket` head (Azure classic), `/openai/v1/realtime?model=…`
//! (Azure v1) or `/v1/realtime?model=…` (OpenAI). The gateway judges the handshake as it judges a
//! call — key or token, access rules, limits — before it opens the member's side, and answers the
//! client's upgrade only once the member accepted its own: every refusal, a member's too, is an
//! HTTP answer. A member that refuses the upgrade with 429 or 5xx, or cannot be reached, is set
//! aside and the next one is tried, as for any call.
//!
//! Events then pass both ways unchanged (pings are answered on each side by its own end), but a
//! client's event must be one the gateway can judge: one JSON object that gives no member twice
//! (else the gateway and the member could read two different events), no larger than the snapshot's
//! `max_request_body_bytes` (a larger message ends the session, 1009). One it cannot judge is
//! answered with an `error` event and not passed on. The session is one record (`OperationId`
//! `onhandshake`, as API Management logs a WebSocket API): the client's events and the member's,
//! one JSON text a line (audio appends and `*.delta` events left out: each `*.done` event holds the
//! whole; an MCP tool's credentials redacted, see [`crate::body_credentials`]), the user's
//! messages, every response's output, and the usage every `response.done` reported, summed; what
//! the record keeps is kept within the capture limits as the session goes, so that a long session
//! holds no more than its record will. Each `response.create` the client sends is admitted against
//! the caller's limits as a call is, and settled with the usage of the `response.done` that answers
//! it; a refused one never reaches the member, and the client gets an `error` event instead (the
//! Realtime API's shape for a client event that failed). Responses the member starts by itself
//! (voice activity detection) cannot be refused, but each is charged to the caller's counters as
//! its `response.done` arrives, so the caller's next `response.create` is judged with them counted.
//! Both follow the rules the gateway runs at the time, not those of the handshake.
//!
//! Access is judged again while the session lasts: under each snapshot pushed during it (a
//! subscription revoked or suspended, its key regenerated, an access rule withdrawn), and when
//! the subscription's key expires. A caller no longer admitted gets an `error` event and the
//! session is closed (1008, policy violation); the record says why. An Entra token is judged at
//! the handshake only, as Azure OpenAI judges it (a session outlives its token).
//!
//! A session through which no event passes either way, nor a ping or pong of the client's, for the
//! Realtime idle timeout (`server.realtime_idle_timeout_seconds`) is closed on both sides, so a
//! client gone without closing its connection does not hold a member's session; a side that
//! leaves an event untaken for the send timeout (`server.send_timeout_seconds`) ends it too.
//!
//! A client that leaves (closes, drops its connection, stalls) while responses still run does not
//! take their tokens with it: as the rest of an HTTP answer after its client hung up, the member
//! is read on, bounded, for their `response.done` events, which are charged and recorded as
//! before; a response that never gets one (a bound ran out, the member broke off, the session
//! ended otherwise) is charged the tokens of the text its deltas carried.
//!
//! An upgraded connection no longer counts for the server's shutdown drain: each session is
//! counted among the calls in flight as a session too, and the shutdown gives those what is left
//! of its drain ([`crate::in_flight::CallsInFlight::sessions_ended`]) before it closes them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts as _;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse as _, Response};
use futures::{SinkExt as _, StreamExt as _};
use gatehouse_schema::audit::TokenUsage;
use gatehouse_schema::config::BackendKind;
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest as _};
use tracing::Instrument as _;

use crate::app::{self, Gateway};
use crate::auth::Principal;
use crate::backend_url::BackendUrl;
use crate::capture::BodyCapture;
use crate::classify::{self, Call, RouteStyle};
use crate::error::GatewayError;
use crate::limits::{LimitRefusal, Reservation};
use crate::pool::{Member, Selection};
use crate::proxy::{self, DRAIN_BYTES, DRAIN_TIME, FailedAttempt};
use crate::record::{CallRecord, millis};
use crate::retry_hint;
use crate::runtime::Runtime;
use crate::upstream::{WebSocketRefusal, WebSocketTransport};
use crate::usage::Encoding;

mod client_events;
mod kept;

use client_events::{is_plain_audio_append, leading_type_is, read_client_event, unreadable_event};
use kept::{KeptItems, keep_event};

/// How long a member has to finish the WebSocket handshake once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long closing each side of a session whose caller is no longer admitted may take.
const WITHDRAW_NOTICE_LIMIT: Duration = Duration::from_secs(5);

/// The record's `LastErrorReason` for a session closed because no traffic passed either way for
/// the Realtime idle timeout.
const IDLE_REASON: &str = "realtime_idle_timeout";

/// The record's `LastErrorReason` for a session whose client left an event untaken for the send
/// timeout.
const CLIENT_STALLED_REASON: &str = "client_send_timeout";

/// After a client left, how long a response it asked for may take to start (`response.created`)
/// before it is no longer waited for: the member answers a `response.create` at once, with
/// that or an `error` event, which may not name it (a client event without `event_id`).
const ASK_ANSWER_LIMIT: Duration = Duration::from_secs(5);

/// How much of the text of a running response's deltas is kept for its estimate; beyond it,
/// bytes are counted four to a token.
const ESTIMATE_TEXT_LIMIT: usize = 1024 * 1024;

/// The member's side of a session.
type MemberSocket = tokio_tungstenite::WebSocketStream<WebSocketTransport>;

/// Why a handshake was not accepted: an error of the gateway's, or a member's own answer.
enum Refused {
    Error(GatewayError),
    Answered(http::Response<Option<Vec<u8>>>),
}

impl From<GatewayError> for Refused {
    fn from(error: GatewayError) -> Self {
        Refused::Error(error)
    }
}

/// What an accepted handshake opened.
struct Opened {
    member: Arc<Member>,
    socket: MemberSocket,
    principal: Principal,
    /// The SHA-256 of the subscription key the handshake presented, to judge it again.
    key_digest: Option<[u8; 32]>,
    call: Call,
}

/// Serves a Realtime API handshake and, once both sides are upgraded, the session.
pub(crate) async fn serve(
    gateway: Arc<Gateway>,
    style: RouteStyle,
    mut parts: Parts,
    record: CallRecord,
) -> Response {
    // Watched from before the handshake is judged: a snapshot installed during it is judged
    // again once the session runs.
    let installs = gateway.installs();
    let runtime = gateway.runtime();
    let mut record = Some(record);
    let opened = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => open(&gateway, &runtime, style, &parts, &mut record)
            .await
            .map(|opened| (upgrade, opened)),
        Err(rejection) => Err(Refused::Error(GatewayError::BadRequest {
            message: format!(
                "The Realtime API is a WebSocket: open it with an HTTP/1.1 upgrade (wss://…). \
                 {rejection}"
            ),
            param: None,
        })),
    };
    let Some(mut record) = record else {
        return GatewayError::Internal.into_response();
    };
    let (mut upgrade, opened) = match opened {
        Ok(opened) => opened,
        Err(Refused::Error(error)) => {
            let holds = record.take_holds();
            gateway.finish(record.finish_error(&error), holds);
            return error.into_response();
        }
        Err(Refused::Answered(answer)) => {
            let status = answer.status().as_u16();
            record.record.backend_response_code = Some(status);
            let response = relay_refusal(answer);
            let holds = record.take_holds();
            gateway.finish(record.finish(status, 0), holds);
            return response;
        }
    };
    if parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == "realtime")
    {
        upgrade = upgrade.protocols(["realtime"]);
    }
    // A client's message is a request body: no larger than the snapshot of the handshake takes
    // one (tungstenite's own default, 64 MiB, would be more). A frame's header past it ends the
    // session before its payload is read ([`Ended::MessageTooBig`]).
    let largest_message =
        usize::try_from(runtime.snapshot.max_request_body_bytes).unwrap_or(usize::MAX);
    upgrade = upgrade
        .max_message_size(largest_message)
        .max_frame_size(largest_message);
    record.record.backend_response_code = Some(101);
    let in_flight = gateway.calls.enter_session();
    let span = tracing::Span::current();
    // The session goes to whichever of the two callbacks runs: a client gone between the 101 and
    // the upgrade still gets its record.
    let session = Arc::new(std::sync::Mutex::new(Some(Session::new(
        gateway, runtime, installs, opened, record,
    ))));
    let failed = Arc::clone(&session);
    upgrade
        .on_failed_upgrade(move |error| {
            tracing::warn!(%error, "the client's side of a Realtime session could not be upgraded");
            let taken = failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(session) = taken {
                session.finish(Ended::ClientGone);
            }
        })
        .on_upgrade(move |client| {
            async move {
                let taken = session
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(session) = taken {
                    session.relay(client).await;
                }
                drop(in_flight);
            }
            .instrument(span)
        })
}

/// Judges the handshake and opens the member's side.
async fn open(
    gateway: &Arc<Gateway>,
    runtime: &Arc<Runtime>,
    style: RouteStyle,
    parts: &Parts,
    record: &mut Option<CallRecord>,
) -> Result<Opened, Refused> {
    // Room for the record, the caller, fail-closed: as for any call (`app::pipeline`).
    let slot = gateway.record_room().await;
    let has_slot = slot.is_some();
    if let Some(record) = record.as_mut() {
        record.holds.slot = slot;
    }
    let principal = app::authenticate(gateway, runtime, parts).await?;
    let key_digest = principal.subscription.as_ref().and_then(|_| {
        crate::auth::presented_key_digest(
            &runtime.snapshot.identity,
            &parts.headers,
            parts.uri.query(),
        )
    });
    if let Some(record) = record.as_mut() {
        record.principal(&principal);
    }
    if gateway.refuses_unrecorded(has_slot) {
        return Err(GatewayError::AuditUnavailable.into());
    }
    let call = classify::realtime(style, parts.uri.query())?;
    if let Some(record) = record.as_mut() {
        record.call(&call);
    }
    crate::authorize::authorize(runtime.snapshot.access_rules.as_deref(), &principal, &call)?;
    let mut admission = app::limit(gateway, runtime, &principal, &call).await?;
    if let Some(record) = record.as_mut() {
        record.holds.reservation = admission.take_reservation();
    }
    let (member, socket) = connect_member(gateway, runtime, &call, parts, record).await?;
    Ok(Opened {
        member,
        socket,
        principal,
        key_digest,
        call,
    })
}

/// Opens the session on a member of the deployment's pool, trying the next member when one
/// cannot be reached, throttles (429) or fails (5xx) the handshake.
async fn connect_member(
    gateway: &Gateway,
    runtime: &Runtime,
    call: &Call,
    parts: &Parts,
    record: &mut Option<CallRecord>,
) -> Result<(Arc<Member>, MemberSocket), Refused> {
    let pool = runtime
        .pool_for(call.deployment.as_deref())
        .ok_or(GatewayError::DeploymentNotFound)?;
    let mut tried: Vec<usize> = Vec::new();
    let mut throttled: Option<Duration> = None;
    // The last member's refusal of the gateway itself, relayed when no member is left (as for
    // calls: `proxy::Refusal`).
    let mut refused: Option<RefusedHandshake> = None;
    loop {
        // A client that left is not given a member's session now.
        if record.as_ref().is_some_and(|r| r.client_gone.is_gone()) {
            return Err(GatewayError::ClientClosedRequest.into());
        }
        let (member, index) = match pool.select(&tried, Instant::now()) {
            (Selection::Member(member), Some(index)) => (member, index),
            (Selection::AllThrottled(wait), _) => {
                let wait = throttled.map_or(wait, |shortest| shortest.min(wait));
                return Err(GatewayError::AllThrottled { retry_after: wait }.into());
            }
            _ => {
                if throttled.is_none()
                    && let Some((answer, backend_id, backend_url)) = refused.take()
                {
                    if let Some(record) = record.as_mut() {
                        record.record.backend_id = Some(backend_id);
                        record.record.backend_url = backend_url;
                    }
                    return Err(Refused::Answered(answer));
                }
                return Err(proxy::out_of_members(throttled).into());
            }
        };
        tried.push(index);
        let started = Instant::now();
        let request = match member_request(&member, call, parts, record).await {
            Ok(request) => request,
            Err(reason) => {
                tracing::warn!(backend = %member.config.id, %reason, "no Realtime request for the backend; member set aside");
                FailedAttempt::new(None, retry_hint::DEFAULT_SET_ASIDE, "credential_failed", 0)
                    .set_aside(gateway, &member, record, &mut throttled);
                continue;
            }
        };
        if let Some(record) = record.as_mut() {
            record.backend_started.get_or_insert(started);
            record.record.backend_id = Some(member.config.id.clone());
            record.record.backend_url = Some(request.uri().to_string());
        }
        let connecting = member.client.connect_websocket(request, HANDSHAKE_TIMEOUT);
        let connected = tokio::select! {
            connected = connecting => connected,
            () = gateway.calls.stopped() => return Err(GatewayError::ShuttingDown.into()),
        };
        let elapsed_ms = millis(started.elapsed());
        if let Some(record) = record.as_mut() {
            record.waited += started.elapsed();
        }
        let refusal = match connected {
            Ok((socket, _)) => {
                gateway
                    .metrics
                    .backend_attempt(&member.config.id, "answered");
                proxy::note_attempt(record, &member, Some(101), elapsed_ms, None);
                return Ok((member, socket));
            }
            Err(refusal) => refusal,
        };
        let (status, wait, outcome) = match refusal {
            WebSocketRefusal::Answered(answer) => {
                let status = answer.status();
                if proxy::Refusal::of(status) {
                    // The member turned the gateway away (its credential, its network rules):
                    // the next member is asked.
                    proxy::Refusal::note(gateway, &member, status, elapsed_ms, record);
                    let backend_url = record
                        .as_ref()
                        .and_then(|record| record.record.backend_url.clone());
                    refused = Some((answer, member.config.id.clone(), backend_url));
                    continue;
                }
                if status != StatusCode::TOO_MANY_REQUESTS && !status.is_server_error() {
                    // The member's own refusal (a 404 for a deployment it lacks) goes to the
                    // client as it came.
                    gateway
                        .metrics
                        .backend_attempt(&member.config.id, "answered");
                    proxy::note_attempt(record, &member, Some(status.as_u16()), elapsed_ms, None);
                    return Err(Refused::Answered(answer));
                }
                let wait = retry_hint::set_aside_for(
                    status,
                    answer.headers(),
                    std::time::SystemTime::now(),
                );
                let outcome = if status == StatusCode::TOO_MANY_REQUESTS {
                    "throttled"
                } else {
                    "server_error"
                };
                (Some(status.as_u16()), wait, outcome)
            }
            WebSocketRefusal::Unreachable(detail) | WebSocketRefusal::Broke(detail) => {
                tracing::warn!(backend = %member.config.id, %detail, "Realtime handshake with the backend failed");
                (None, retry_hint::DEFAULT_SET_ASIDE, "connect_failed")
            }
            WebSocketRefusal::TimedOut => {
                tracing::warn!(backend = %member.config.id, "Realtime handshake with the backend timed out");
                (None, retry_hint::DEFAULT_SET_ASIDE, "handshake_timeout")
            }
        };
        FailedAttempt::new(status, wait, outcome, elapsed_ms).set_aside(
            gateway,
            &member,
            record,
            &mut throttled,
        );
    }
}

/// A member's refusal of the gateway's handshake, kept to be relayed when no member is left,
/// with the member's id and URL for the record (a later attempt named another).
type RefusedHandshake = (http::Response<Option<Vec<u8>>>, String, Option<String>);

/// The member's handshake request: its URL in the style of its kind, its credential, the call's
/// request id, and the client's `OpenAI-Beta`.
async fn member_request(
    member: &Member,
    call: &Call,
    parts: &Parts,
    record: &Option<CallRecord>,
) -> Result<http::Request<()>, String> {
    let url = member_url(member, call, parts.uri.query());
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|error| format!("the member's Realtime URL: {error}"))?;
    let headers = request.headers_mut();
    if let Some((name, value)) = proxy::credential_header(member)
        .await
        .map_err(|error| error.to_string())?
    {
        headers.insert(name, value);
    }
    if let Some(id) = proxy::request_id(record)
        && let Ok(value) = HeaderValue::from_str(id)
    {
        headers.insert("x-request-id", value);
    }
    if let Some(beta) = parts.headers.get("openai-beta") {
        headers.insert("openai-beta", beta.clone());
    }
    Ok(request)
}

/// The member's Realtime URL: `ws(s)://…/openai/realtime?api-version=…&deployment=…` for an Azure
/// member addressed in the classic style, `…/openai/v1/realtime?model=…` in the v1 and OpenAI
/// styles, `…/realtime?model=…` under an OpenAI member's endpoint. The deployment is the member's
/// name for it; the client's other query parameters pass on, its key and names do not.
fn member_url(member: &Member, call: &Call, client_query: Option<&str>) -> String {
    let deployment = member
        .config
        .deployment
        .as_deref()
        .or(call.deployment.as_deref())
        .unwrap_or_default();
    let url = BackendUrl::new(&member.config.endpoint);
    let (url, api_version, name) = match (member.config.kind, call.style) {
        (BackendKind::AzureOpenai, RouteStyle::AzureResource | RouteStyle::AzureDeployment) => (
            url.segments(["openai", "realtime"]),
            Some(proxy::classic_api_version(member, call)),
            "deployment",
        ),
        (BackendKind::AzureOpenai, RouteStyle::AzureV1) => (
            url.segments(["openai", "v1", "realtime"]),
            call.api_version.as_deref(),
            "model",
        ),
        (BackendKind::AzureOpenai, RouteStyle::OpenAi) => {
            (url.segments(["openai", "v1", "realtime"]), None, "model")
        }
        (BackendKind::Openai, _) => (url.segments(["realtime"]), None, "model"),
    };
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair(name, deployment);
    for (key, value) in client_query
        .into_iter()
        .flat_map(|query| url::form_urlencoded::parse(query.as_bytes()))
    {
        if !matches!(key.as_ref(), "deployment" | "model") {
            query.append_pair(&key, &value);
        }
    }
    let url = url.query(api_version, Some(&query.finish()));
    match url.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some(("http", rest)) => format!("ws://{rest}"),
        _ => url,
    }
}

/// A member's refusal of the handshake, relayed: its status, content type and body.
fn relay_refusal(answer: http::Response<Option<Vec<u8>>>) -> Response {
    let (head, body) = answer.into_parts();
    let mut response = Response::new(axum::body::Body::from(body.unwrap_or_default()));
    *response.status_mut() = head.status;
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(value) = head.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    for name in ["retry-after-ms", "x-ms-error-code", "apim-request-id"] {
        if let Some(value) = head.headers.get(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// One relayed session and what its record keeps of it.
struct Session {
    gateway: Arc<Gateway>,
    runtime: Arc<Runtime>,
    /// The caller as the identity settings in force see it (see [`Session::judge_again`]).
    principal: Principal,
    /// The caller as the handshake admitted it: its key's subscription (as the keys in force
    /// hold it) and the Entra identity its token gave, whatever the settings take now.
    admitted: Principal,
    /// See [`Opened::key_digest`].
    key_digest: Option<[u8; 32]>,
    /// Changes with each snapshot installed; the caller is judged again under each.
    installs: tokio::sync::watch::Receiver<u64>,
    call: Call,
    member: Arc<Member>,
    socket: Option<MemberSocket>,
    record: CallRecord,
    /// The client's events, as kept for `BackendRequestBody` (credentials redacted).
    sent: BodyCapture,
    /// The member's events, as kept for `BackendResponseBody` (credentials redacted).
    received: BodyCapture,
    /// The user's messages (`conversation.item.create` items), for `RequestMessages`.
    prompt: KeptItems,
    /// Every response's output items, for `ResponseMessages`.
    output: KeptItems,
    usage: Option<TokenUsage>,
    /// The client's `response.create` events not answered by a `response.done` yet, oldest
    /// first.
    pending: VecDeque<Asked>,
    /// The responses the member started that have not ended yet.
    running: Vec<RunningResponse>,
    /// Bytes from the client and to it.
    bytes_in: u64,
    bytes_out: u64,
}

/// A `response.create` of the client's that no `response.done` answered yet.
struct Asked {
    /// Its reservation under the caller's limits; none when no rule applied.
    reservation: Option<Reservation>,
    /// Its `event_id`, by which the member's `error` event names it if refused.
    event_id: Option<String>,
}

/// A response the member started (`response.created`) that has not ended yet (no
/// `response.done`), and what it is charged if it never does.
struct RunningResponse {
    id: String,
    /// The text its deltas carried so far (text, transcripts, function arguments; audio is not
    /// read), up to [`ESTIMATE_TEXT_LIMIT`].
    text: String,
    /// Bytes of delta text beyond that limit.
    beyond: u64,
}

impl RunningResponse {
    fn new(id: &str) -> RunningResponse {
        RunningResponse {
            id: id.to_owned(),
            text: String::new(),
            beyond: 0,
        }
    }

    /// Adds the text of one of its deltas.
    fn add(&mut self, delta: &str) {
        if self.text.len() + delta.len() <= ESTIMATE_TEXT_LIMIT {
            self.text.push_str(delta);
        } else {
            self.beyond += delta.len() as u64;
        }
    }

    /// Its tokens so far, estimated from its deltas' text (blocking: the tokenizer).
    fn estimate(&self, encoding: Encoding) -> u64 {
        encoding.count(&self.text) + self.beyond.div_ceil(4)
    }
}

/// How a session ended, for the record.
enum Ended {
    /// The client closed it (or left).
    Client,
    /// The client left an event untaken for the send timeout.
    ClientStalled,
    /// The client left before its side was upgraded.
    ClientGone,
    /// The member closed it.
    Member,
    /// The member's side broke.
    MemberBroke,
    /// The gateway shut down.
    ShuttingDown,
    /// The caller's access ended (the reason: a [`GatewayError::reason`]).
    Withdrawn(&'static str),
    /// No traffic passed either way for the Realtime idle timeout.
    Idle,
    /// The client sent a message larger than the snapshot's `max_request_body_bytes`.
    MessageTooBig,
}

impl Session {
    fn new(
        gateway: Arc<Gateway>,
        runtime: Arc<Runtime>,
        installs: tokio::sync::watch::Receiver<u64>,
        opened: Opened,
        record: CallRecord,
    ) -> Session {
        let capture = &runtime.snapshot.capture;
        let (request_limit, response_limit) = (
            capture.max_request_body_bytes,
            capture.max_response_body_bytes,
        );
        Session {
            sent: BodyCapture::new(request_limit),
            received: BodyCapture::new(response_limit),
            gateway,
            runtime,
            admitted: opened.principal.clone(),
            principal: opened.principal,
            key_digest: opened.key_digest,
            installs,
            call: opened.call,
            member: opened.member,
            socket: Some(opened.socket),
            record,
            prompt: KeptItems::new(request_limit),
            output: KeptItems::new(response_limit),
            usage: None,
            pending: VecDeque::new(),
            running: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Relays events both ways until one side closes, then finishes the record. A side that
    /// leaves an event untaken for the send timeout, or a session that passes no traffic either way
    /// for the Realtime idle timeout, ends the session. A client that leaves while responses run
    /// leaves the member's side open until they are done ([`Session::read_after_client`]).
    async fn relay(mut self, mut client: WebSocket) {
        let Some(mut member) = self.socket.take() else {
            return;
        };
        let timeouts = self.gateway.client_timeouts;
        member.get_mut().limit_sends(timeouts.send);
        let mut installs = self.installs.clone();
        let access_ends = tokio::time::sleep_until(self.access_ends());
        tokio::pin!(access_ends);
        // Each frame notes its time; the timer is moved only when it fires, cheaper than
        // resetting it for every audio append.
        let mut last_frame = tokio::time::Instant::now();
        let idle_check = tokio::time::sleep(timeouts.realtime_idle);
        tokio::pin!(idle_check);
        let ended = loop {
            tokio::select! {
                from_client = client.recv() => {
                    let message = match from_client {
                        Some(Ok(message)) => message,
                        // A message over the size the upgrade takes: nothing more of the
                        // client's is read (its rest would be buffered whole).
                        Some(Err(error)) if message_too_big(&error) => {
                            break self.refuse_large_message(&mut client, &mut member).await;
                        }
                        // Gone without a close frame. A read also flushes what waits to be sent
                        // (a pong, a close): its send deadline may be what failed it.
                        Some(Err(error)) => break client_send_failed(&error),
                        None => break Ended::Client,
                    };
                    last_frame = tokio::time::Instant::now();
                    let closing = matches!(message, ws::Message::Close(_));
                    if closing && self.responses_running() {
                        // The member ends its responses at a close, unfinished and unbilled
                        // here: its side is closed once they are done. The client's closing
                        // handshake is finished now.
                        let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, client.close()).await;
                        break Ended::Client;
                    }
                    if let Some(refusal) = self.note_client(&message).await {
                        // An event the gateway cannot judge, or a response the caller's limits
                        // refuse: the client is told, the member never sees it.
                        if let Err(error) = client.send(ws::Message::Text(refusal.into())).await {
                            break client_send_failed(&error);
                        }
                        continue;
                    }
                    let Some(message) = to_member(message) else { continue };
                    // Its writes fail once the member has taken nothing for the send timeout
                    // (`WebSocketTransport::limit_sends`).
                    if member.send(message).await.is_err() {
                        let broke = client.send(close_message(1011, "the backend's side of the session broke"));
                        let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, broke).await;
                        break Ended::MemberBroke;
                    }
                    // A long message may take the member a while: the session was busy, not idle.
                    last_frame = tokio::time::Instant::now();
                    if closing {
                        break Ended::Client;
                    }
                }
                from_member = member.next() => {
                    let Some(Ok(message)) = from_member else {
                        let broke = client.send(close_message(1011, "the backend's side of the session broke"));
                        let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, broke).await;
                        break Ended::MemberBroke;
                    };
                    // The member's own pings and pongs stay on its side: they say nothing of
                    // the client, whose vanishing the idle limit is there to notice.
                    if !matches!(message, tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) {
                        last_frame = tokio::time::Instant::now();
                    }
                    let closing = matches!(message, tungstenite::Message::Close(_));
                    self.bytes_out += data_len(&message);
                    self.note_member(&message).await;
                    let Some(message) = to_client(message) else { continue };
                    if let Err(error) = client.send(message).await {
                        break client_send_failed(&error);
                    }
                    last_frame = tokio::time::Instant::now();
                    if closing {
                        break Ended::Member;
                    }
                }
                () = self.gateway.calls.stopped() => {
                    // The drain is over: responses under way are cut, their client does not
                    // get them (as a call cut by it, the record says client-aborted).
                    if !self.running.is_empty() {
                        self.record.record.client_aborted = true;
                    }
                    let going = client.send(close_message(1001, "the gateway is shutting down"));
                    let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, going).await;
                    close_member(&mut member).await;
                    break Ended::ShuttingDown;
                }
                Ok(()) = installs.changed() => {
                    if let Err(error) = self.judge_again() {
                        break self.withdraw(error, &mut client, &mut member).await;
                    }
                    access_ends.as_mut().reset(self.access_ends());
                }
                () = &mut access_ends => {
                    match self.judge_again() {
                        Err(error) => break self.withdraw(error, &mut client, &mut member).await,
                        // Still admitted (the key's expiry was moved or lifted meanwhile).
                        Ok(()) => access_ends.as_mut().reset(self.access_ends()),
                    }
                }
                () = &mut idle_check => {
                    let idle_until = last_frame + timeouts.realtime_idle;
                    if tokio::time::Instant::now() < idle_until {
                        idle_check.as_mut().reset(idle_until);
                        continue;
                    }
                    break close_idle(timeouts.realtime_idle, &mut client, &mut member).await;
                }
            }
        };
        if matches!(ended, Ended::Client | Ended::ClientStalled) {
            // The client left: the member's side is closed for it, once the responses it
            // left running are done.
            drop(client);
            self.read_after_client(&mut member).await;
            close_member(&mut member).await;
        }
        self.charge_cut_responses().await;
        self.finish(ended);
    }

    /// Whether responses run: asked for and not done, or started by the member and not done.
    fn responses_running(&self) -> bool {
        !self.pending.is_empty() || !self.running.is_empty()
    }

    /// Reads the member on after the client left while responses ran, until each is done, so
    /// that their `response.done` events are charged and recorded as while the client was
    /// there; nothing goes to the client, and the record says client-aborted once a response is
    /// under way. Bounded as the rest of an HTTP answer whose client hung up: [`DRAIN_TIME`] and
    /// [`DRAIN_BYTES`] in all, the member's `response_idle_timeout_ms` between two messages, and
    /// the end of the shutdown's drain. A bound that runs out, or a member that breaks off,
    /// leaves its reason on the record; what is still running then is charged by its deltas
    /// ([`Session::charge_cut_responses`]). A response asked for and not started yet is waited
    /// for [`ASK_ANSWER_LIMIT`] only: the member may have refused it without naming it.
    async fn read_after_client(&mut self, member: &mut MemberSocket) {
        let deadline = tokio::time::Instant::now() + DRAIN_TIME;
        let idle = Duration::from_millis(self.member.config.response_idle_timeout_ms);
        let mut drained: u64 = 0;
        while self.responses_running() {
            let under_way = !self.running.is_empty();
            if under_way {
                self.record.record.client_aborted = true;
            }
            let quiet = if under_way {
                idle
            } else {
                idle.min(ASK_ANSWER_LIMIT)
            };
            let wait_until = deadline.min(tokio::time::Instant::now() + quiet);
            let next = tokio::select! {
                biased;
                () = self.gateway.calls.stopped() => {
                    self.record.record.last_error_reason =
                        Some(crate::in_flight::SHUTDOWN_REASON.to_owned());
                    return;
                }
                next = tokio::time::timeout_at(wait_until, member.next()) => next,
            };
            let reason = match next {
                Ok(Some(Ok(message))) => {
                    // The member ended the session itself.
                    if matches!(message, tungstenite::Message::Close(_)) {
                        return;
                    }
                    drained += message.len() as u64;
                    self.note_member(&message).await;
                    if drained <= DRAIN_BYTES {
                        continue;
                    }
                    "drain_size_exceeded"
                }
                Ok(Some(Err(_)) | None) => {
                    crate::proxy::set_aside_after_cut(&self.member);
                    "backend_stream_failed"
                }
                // Nothing started: the asks left are taken as refused.
                Err(_) if !under_way => return,
                // Silent mid-response: set aside as a member whose answer stalls.
                Err(_) if wait_until < deadline => {
                    crate::proxy::set_aside_after_cut(&self.member);
                    "response_idle_timeout"
                }
                Err(_) => "drain_time_exceeded",
            };
            self.record.record.last_error_reason = Some(reason.to_owned());
            return;
        }
    }

    /// Charges the responses still running when the session ended (their `response.done` never
    /// came) the tokens of the text their deltas carried, and adds them to the record's usage,
    /// which then says it holds an estimate. Audio is not counted: a spoken answer is charged its
    /// transcript.
    async fn charge_cut_responses(&mut self) {
        let running = std::mem::take(&mut self.running);
        if running.is_empty() {
            return;
        }
        let model = self
            .record
            .record
            .model_name
            .clone()
            .or_else(|| self.call.deployment.clone())
            .unwrap_or_default();
        let encoding = Encoding::for_model(&model);
        // The tokenizer may have to be loaded first: off the runtime's workers.
        let counted = tokio::task::spawn_blocking(move || {
            running
                .iter()
                .map(|response| response.estimate(encoding))
                .sum::<u64>()
        })
        .await;
        let tokens = match counted {
            Ok(tokens) => tokens,
            Err(error) => {
                tracing::warn!(%error, "the tokens of Realtime responses cut short could not be counted");
                return;
            }
        };
        if tokens == 0 {
            return;
        }
        let total = self.usage.get_or_insert(TokenUsage::default());
        total.completion_tokens += tokens;
        total.total_tokens += tokens;
        total.is_estimate = true;
        self.charge(tokens).await;
    }

    /// Judges the caller again under the snapshot the gateway runs now: its subscription key
    /// (revoked, suspended, regenerated, expired), the identity settings (the credentials they
    /// require, the tenants and kinds of tokens they take; the token is not validated again)
    /// and the access rules for the session's deployment.
    fn judge_again(&mut self) -> Result<(), GatewayError> {
        let runtime = self.gateway.runtime();
        let mut judged = crate::auth::judge_admitted(&runtime.snapshot.identity, &self.admitted)?;
        // The key is looked up only when the settings still take it: a key they ignore (a
        // session kept by its token) cannot end the session by being revoked.
        if judged.subscription.is_some()
            && let Some(digest) = &self.key_digest
        {
            let subscription = runtime
                .keys
                .subscription_for_digest(digest, time::OffsetDateTime::now_utc())?;
            self.admitted.subscription = Some(Arc::clone(&subscription));
            judged.subscription = Some(subscription);
        }
        self.principal = judged;
        crate::authorize::authorize(
            runtime.snapshot.access_rules.as_deref(),
            &self.principal,
            &self.call,
        )
    }

    /// When the caller's key stops being accepted (the subscription's `expires_at`, or the
    /// secondary key's `secondary_expires_at`), as an instant of the runtime's clock; far off
    /// when it does not expire.
    fn access_ends(&self) -> tokio::time::Instant {
        // A year: as good as never for a session, and far from overflowing the clock.
        const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);
        let ends = match (&self.principal.subscription, &self.key_digest) {
            (Some(subscription), Some(digest)) => {
                let secondary = subscription.primary_key_hash.0 != *digest;
                let retired = subscription.secondary_expires_at.filter(|_| secondary);
                match (subscription.expires_at, retired) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => None,
        };
        let left = ends.map_or(NEVER, |at| {
            Duration::try_from(at - time::OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
        });
        tokio::time::Instant::now() + left.min(NEVER)
    }

    /// Ends a session whose caller is no longer admitted ([`close_both`], with 1008: policy
    /// violation).
    async fn withdraw(
        &self,
        error: GatewayError,
        client: &mut WebSocket,
        member: &mut MemberSocket,
    ) -> Ended {
        let reason = error.reason();
        tracing::info!(
            reason,
            "a Realtime session was closed: its caller is no longer admitted"
        );
        let message = format!("The session was closed: {error}");
        let close = close_message(1008, "the caller is no longer admitted");
        close_both(client, member, reason, &message, close).await;
        Ended::Withdrawn(reason)
    }

    /// Ends a session whose client sent a message larger than the snapshot of its handshake takes
    /// (`max_request_body_bytes`) ([`close_both`], with 1009: message too big). The message is
    /// not read on, nor passed to the member.
    async fn refuse_large_message(
        &self,
        client: &mut WebSocket,
        member: &mut MemberSocket,
    ) -> Ended {
        let limit = self.runtime.snapshot.max_request_body_bytes;
        let error = GatewayError::BodyTooLarge { limit };
        tracing::info!(
            limit,
            "a Realtime session was closed: its client sent a message larger than the gateway takes"
        );
        let message = format!(
            "The session was closed: a message of the client's was larger than the gateway \
             accepts ({limit} bytes)."
        );
        let close = close_message(1009, "the message is larger than the gateway accepts");
        close_both(client, member, error.reason(), &message, close).await;
        Ended::MessageTooBig
    }

    /// Notes a client's message before it goes to the member. `Some` is the `error` event to
    /// answer it with instead, and the member never sees the message: an event the gateway
    /// cannot judge ([`read_client_event`]), or a `response.create` the caller's limits refuse.
    async fn note_client(&mut self, message: &ws::Message) -> Option<String> {
        let text = match message {
            ws::Message::Text(text) => text.as_str(),
            // The Realtime API's events are JSON text; one sent in a binary frame is judged as
            // one in a text frame (a member may read it so), anything else is not passed on.
            ws::Message::Binary(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    self.bytes_in += bytes.len() as u64;
                    return Some(unreadable_event("it is a binary message that is not text"));
                }
            },
            _ => return None,
        };
        self.bytes_in += text.len() as u64;
        // Audio appends come many a second, each tens of kilobytes of base64: told without
        // parsing them when nothing in their text could say otherwise.
        if is_plain_audio_append(text) {
            return None;
        }
        let event = match read_client_event(text) {
            Ok(event) => event,
            Err(refusal) => return Some(refusal),
        };
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind == "input_audio_buffer.append" {
            // Audio, base64: counted in the size, not kept.
            return None;
        }
        keep_event(&mut self.sent, text, &event);
        match kind {
            "conversation.item.create" => {
                if let Some(item) = event
                    .get("item")
                    .filter(|item| item.get("type").and_then(Value::as_str) == Some("message"))
                {
                    self.prompt.push(item);
                }
            }
            "response.create" => return self.admit_response(&event).await,
            _ => {}
        }
        None
    }

    /// Admits a `response.create` against the caller's limits: its reservation waits for the
    /// `response.done` that answers it; a refusal is the `error` event for the client.
    async fn admit_response(&mut self, event: &Value) -> Option<String> {
        // Judged by the rules the gateway runs now: a push during the session applies to it.
        let runtime = self.gateway.runtime();
        let event_id = event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // A push that took the session's deployment from every pool ends its new responses: the
        // limits would have nothing to count them by, and no pool serves it any more.
        if self.call.deployment.is_some()
            && runtime.pool_for(self.call.deployment.as_deref()).is_none()
        {
            let error = GatewayError::DeploymentNotFound;
            tracing::info!(
                reason = error.reason(),
                "a Realtime response was refused: no pool serves the session's deployment any more"
            );
            return Some(error_event(
                error.reason(),
                &error.to_string(),
                event.get("event_id").cloned().unwrap_or(Value::Null),
            ));
        }
        if runtime.snapshot.limits.is_empty() {
            self.pending.push_back(Asked {
                reservation: None,
                event_id,
            });
            return None;
        }
        match app::limit(&self.gateway, &runtime, &self.principal, &self.call).await {
            Ok(mut admission) => {
                self.pending.push_back(Asked {
                    reservation: admission.take_reservation(),
                    event_id,
                });
                None
            }
            Err(error) => {
                tracing::info!(
                    reason = error.reason(),
                    "a Realtime response was refused by the caller's limits"
                );
                Some(error_event(
                    limit_refusal_code(&error),
                    &error.to_string(),
                    event.get("event_id").cloned().unwrap_or(Value::Null),
                ))
            }
        }
    }

    /// Notes a member's message (its size is counted by the caller, as sent to the client).
    async fn note_member(&mut self, message: &tungstenite::Message) {
        let tungstenite::Message::Text(text) = message else {
            return;
        };
        let text = text.as_str();
        self.record
            .record
            .time_to_first_byte
            .get_or_insert_with(|| millis(self.record.started.elapsed()));
        // Audio deltas (large) are neither kept nor read: told by their type, which the member
        // writes first, without parsing them.
        if leading_type_is(text, is_audio_delta) {
            return;
        }
        let Ok(event) = serde_json::from_str::<Value>(text) else {
            return;
        };
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // Other deltas are not kept either (each `*.done` holds the whole), but the text they
        // add to a running response is what it is charged if it is cut.
        if kind.ends_with(".delta") {
            if !is_audio_delta(kind) {
                self.note_delta(&event);
            }
            return;
        }
        keep_event(&mut self.received, text, &event);
        match kind {
            "session.created" | "session.updated" => {
                if let Some(model) = event.pointer("/session/model").and_then(Value::as_str) {
                    self.record.record.model_name = Some(model.to_owned());
                }
            }
            "response.created" => {
                if let Some(id) = event.pointer("/response/id").and_then(Value::as_str) {
                    self.running.push(RunningResponse::new(id));
                }
            }
            "response.done" => self.response_done(&event).await,
            "error" => self.ask_refused(&event),
            _ => {}
        }
    }

    /// Adds the text of a delta (`delta`) to the running response it belongs to (`response_id`).
    fn note_delta(&mut self, event: &Value) {
        let (Some(id), Some(delta)) = (
            event.get("response_id").and_then(Value::as_str),
            event.get("delta").and_then(Value::as_str),
        ) else {
            return;
        };
        if let Some(response) = self.running.iter_mut().find(|response| response.id == id) {
            response.add(delta);
        }
    }

    /// A member's `error` event that names a `response.create` still waiting (its `event_id`):
    /// the member refused it, so no `response.done` will answer it, and its reservation is
    /// given back.
    fn ask_refused(&mut self, event: &Value) {
        let Some(refused) = event.pointer("/error/event_id").and_then(Value::as_str) else {
            return;
        };
        let Some(at) = self
            .pending
            .iter()
            .position(|asked| asked.event_id.as_deref() == Some(refused))
        else {
            return;
        };
        if let Some(reservation) = self.pending.remove(at).and_then(|asked| asked.reservation) {
            self.gateway.limiter.reconcile(reservation, Some(0));
        }
    }

    /// A response ended: its output and usage are kept, and the reservation of the
    /// `response.create` it answers settled with its tokens.
    async fn response_done(&mut self, event: &Value) {
        let response = event.get("response").unwrap_or(&Value::Null);
        if let Some(id) = response.get("id").and_then(Value::as_str) {
            self.running.retain(|running| running.id != id);
        }
        for item in response
            .get("output")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.output.push(item);
        }
        let usage = response.get("usage").and_then(realtime_usage);
        let tokens = usage.map(|usage| usage.total_tokens);
        if let Some(usage) = usage {
            let total = self.usage.get_or_insert(TokenUsage::default());
            total.prompt_tokens += usage.prompt_tokens;
            total.completion_tokens += usage.completion_tokens;
            total.total_tokens += usage.total_tokens;
            total.cached_tokens += usage.cached_tokens;
        }
        // What a response used is charged under the rules the gateway runs now, in their
        // windows of now (a quota's hour may have ended while the response ran), before the
        // caller's next response is judged; the reservation of the `response.create` it answers
        // (of no tokens: the gateway reads no maximum in it) is given back. A response the
        // member started by itself (voice activity) has no reservation. With Redis, the relay
        // waits for the charge (at most the store's timeout) so that the next response sees it.
        let reserved = self.pending.pop_front().and_then(|asked| asked.reservation);
        match (reserved, tokens) {
            (Some(reservation), Some(tokens)) => {
                self.gateway.limiter.reconcile(reservation, Some(0));
                self.charge(tokens).await;
            }
            (Some(reservation), None) => self.gateway.limiter.reconcile(reservation, None),
            (None, Some(tokens)) => self.charge(tokens).await,
            (None, None) => {}
        }
    }

    /// Charges `tokens` the session used to the caller's counters, under the rules of now.
    async fn charge(&self, tokens: u64) {
        let runtime = self.gateway.runtime();
        app::charge(&self.gateway, &runtime, &self.principal, &self.call, tokens).await;
    }

    /// Finishes the record: what the session kept, its usage, and its end.
    fn finish(mut self, ended: Ended) {
        let record = &mut self.record;
        record.record.request_size = self.bytes_in;
        // Each side as its capture limit says; a limit of 0 (metadata only) keeps nothing of it.
        let capture = &self.runtime.snapshot.capture;
        // Each was kept within its limit as the session went (see [`KeptItems`]); what was left
        // out flags its side as cut, as an HTTP call's body cut at the limit does.
        if capture.max_request_body_bytes > 0 {
            let (messages, cut) = self.prompt.finish();
            record.record.request_body_truncated = self.sent.truncated() || cut;
            record.record.backend_request_body = self.sent.into_text();
            record.record.request_messages = messages;
        }
        if capture.max_response_body_bytes > 0 {
            let (messages, cut) = self.output.finish();
            record.record.response_body_truncated = self.received.truncated() || cut;
            record.record.backend_response_body = self.received.into_text();
            record.record.response_messages = messages;
        }
        record.usage(self.usage);
        match ended {
            Ended::Client | Ended::Member => {}
            Ended::ClientGone => record.record.client_aborted = true,
            Ended::ClientStalled => {
                record.record.client_aborted = true;
                // A reason of the reading on after it (a bound that ran out) says more.
                record
                    .record
                    .last_error_reason
                    .get_or_insert_with(|| CLIENT_STALLED_REASON.to_owned());
            }
            Ended::Idle => record.record.last_error_reason = Some(IDLE_REASON.to_owned()),
            Ended::MemberBroke => {
                record.record.last_error_reason = Some("backend_stream_failed".to_owned());
                crate::proxy::set_aside_after_cut(&self.member);
            }
            Ended::ShuttingDown => {
                record.record.last_error_reason =
                    Some(crate::in_flight::SHUTDOWN_REASON.to_owned());
            }
            Ended::Withdrawn(reason) => {
                record.record.last_error_reason = Some(reason.to_owned());
            }
            Ended::MessageTooBig => {
                let limit = self.runtime.snapshot.max_request_body_bytes;
                record.record.last_error_reason =
                    Some(GatewayError::BodyTooLarge { limit }.reason().to_owned());
            }
        }
        // Responses still open when the session ended keep their reservations charged (and were
        // charged their deltas, see `charge_cut_responses`); the session's own reservation (the
        // handshake's, of no tokens) is settled at none: the tokens of responses the member
        // started by itself were charged as each ended.
        let mut holds = record.take_holds();
        for reservation in self
            .pending
            .into_iter()
            .filter_map(|asked| asked.reservation)
        {
            self.gateway.limiter.reconcile(reservation, None);
        }
        if let Some(reservation) = holds.reservation.take() {
            self.gateway.limiter.reconcile(reservation, Some(0));
        }
        let audit = self.record.finish(101, self.bytes_out);
        self.gateway.finish(audit, holds);
    }
}

/// The usage of a Realtime `response.done` (`input_tokens`, `output_tokens`, `total_tokens`,
/// `input_token_details.cached_tokens`; OpenAI's Realtime API reference, server event
/// `response.done`).
fn realtime_usage(usage: &Value) -> Option<TokenUsage> {
    let number = |key: &str| usage.get(key).and_then(Value::as_u64);
    let prompt = number("input_tokens")?;
    let completion = number("output_tokens").unwrap_or(0);
    Some(TokenUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: number("total_tokens").unwrap_or(prompt.saturating_add(completion)),
        cached_tokens: usage
            .pointer("/input_token_details/cached_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        reasoning_tokens: 0,
        is_estimate: false,
    })
}

/// The `code` of the `error` event that answers a `response.create` the caller's limits refuse:
/// `rate_limit_exceeded` for a rate (429 for a call); otherwise the reason the record and the
/// metrics give the refusal: `token_quota_exceeded` for a quota used up (403),
/// `exceeds_token_limit` for a response larger than a limit (400), `limit_store_unavailable` for
/// a limit store that cannot be reached (503).
fn limit_refusal_code(error: &GatewayError) -> &'static str {
    match error {
        GatewayError::Limit(LimitRefusal::Rate { .. }) => "rate_limit_exceeded",
        other => other.reason(),
    }
}

/// Whether an event type is an audio delta (`response.audio.delta`, `response.output_audio.delta`):
/// base64 audio, large, never read.
fn is_audio_delta(kind: &str) -> bool {
    kind.ends_with("audio.delta")
}

/// The bytes of a message's data (text or binary); control frames count none.
fn data_len(message: &tungstenite::Message) -> u64 {
    match message {
        tungstenite::Message::Text(_) | tungstenite::Message::Binary(_) => message.len() as u64,
        _ => 0,
    }
}

/// A client's message as the member is sent it; pings and pongs stay on their side.
fn to_member(message: ws::Message) -> Option<tungstenite::Message> {
    Some(match message {
        ws::Message::Text(text) => tungstenite::Message::Text(text.as_str().into()),
        ws::Message::Binary(bytes) => tungstenite::Message::Binary(bytes),
        ws::Message::Close(frame) => {
            tungstenite::Message::Close(frame.map(|frame| tungstenite::protocol::CloseFrame {
                code: frame.code.into(),
                reason: frame.reason.as_str().into(),
            }))
        }
        ws::Message::Ping(_) | ws::Message::Pong(_) => return None,
    })
}

/// A member's message as the client is sent it; pings and pongs stay on their side.
fn to_client(message: tungstenite::Message) -> Option<ws::Message> {
    Some(match message {
        tungstenite::Message::Text(text) => ws::Message::Text(text.as_str().into()),
        tungstenite::Message::Binary(bytes) => ws::Message::Binary(bytes),
        tungstenite::Message::Close(frame) => {
            ws::Message::Close(frame.map(|frame| ws::CloseFrame {
                code: frame.code.into(),
                reason: frame.reason.as_str().into(),
            }))
        }
        tungstenite::Message::Ping(_)
        | tungstenite::Message::Pong(_)
        | tungstenite::Message::Frame(_) => return None,
    })
}

/// Whether reading a client's message failed because it is larger than the upgrade takes
/// (`max_message_size`, `max_frame_size`).
fn message_too_big(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        if matches!(
            error.downcast_ref::<tungstenite::Error>(),
            Some(tungstenite::Error::Capacity(
                tungstenite::error::CapacityError::MessageTooLong { .. }
            ))
        ) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// How a session ends when a frame could not be sent to its client: its connection's writes
/// fail with `TimedOut` once it has taken nothing for the send timeout (`server::ClientStream`).
fn client_send_failed(error: &axum::Error) -> Ended {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = cause {
        let timed_out = error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|error| error.kind() == std::io::ErrorKind::TimedOut);
        if timed_out {
            return Ended::ClientStalled;
        }
        cause = error.source();
    }
    Ended::Client
}

/// Closes the member's side, giving up after [`WITHDRAW_NOTICE_LIMIT`] (a member that reads
/// nothing does not hold the session open).
async fn close_member(member: &mut MemberSocket) {
    let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, member.close(None)).await;
}

/// Ends a session that passed no traffic either way for `idle` ([`close_both`], with 1001: going
/// away).
async fn close_idle(idle: Duration, client: &mut WebSocket, member: &mut MemberSocket) -> Ended {
    tracing::info!(
        idle_seconds = idle.as_secs(),
        "a Realtime session was closed: no event passed either way"
    );
    let message = format!(
        "The session was closed: no event passed either way for {} s.",
        idle.as_secs()
    );
    let close = close_message(1001, "the session was idle too long");
    close_both(client, member, IDLE_REASON, &message, close).await;
    Ended::Idle
}

/// Ends a session from the gateway's side: the member's side is closed first, then the client is
/// told why in an `error` event (`code`, `message`) and its side closed with `close`, each within
/// [`WITHDRAW_NOTICE_LIMIT`] (a client that reads nothing does not hold the session open).
async fn close_both(
    client: &mut WebSocket,
    member: &mut MemberSocket,
    code: &str,
    message: &str,
    close: ws::Message,
) {
    close_member(member).await;
    let event = error_event(code, message, Value::Null);
    let notice = async {
        client.send(ws::Message::Text(event.into())).await?;
        client.send(close).await
    };
    let _ = tokio::time::timeout(WITHDRAW_NOTICE_LIMIT, notice).await;
}

/// An `error` event of the gateway's for the client, in the Realtime API's shape (server event
/// `error`: `invalid_request_error`, `code`, `message`, and the `event_id` of the client's event
/// it answers, if one).
fn error_event(code: &str, message: &str, client_event_id: Value) -> String {
    json!({
        "type": "error",
        "event_id": format!("event_gatehouse_{}", uuid::Uuid::now_v7().simple()),
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": null,
            "event_id": client_event_id,
        },
    })
    .to_string()
}

/// A close frame for the client.
fn close_message(code: u16, reason: &'static str) -> ws::Message {
    ws::Message::Close(Some(ws::CloseFrame {
        code,
        reason: reason.into(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_response_is_estimated_from_the_text_of_its_deltas() {
        let mut response = RunningResponse::new("resp_1");
        response.add("Hello");
        response.add(" there");
        assert_eq!(response.estimate(Encoding::O200kBase), 2);
        // Past the text kept, four bytes to a token.
        response.add(&"a".repeat(ESTIMATE_TEXT_LIMIT));
        assert_eq!(response.estimate(Encoding::O200kBase), 2 + 262_144);
    }
}
