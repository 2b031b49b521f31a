#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! The Azure Monitor sink against a local double of Entra ID's token endpoint and the Logs
//! Ingestion API. The double speaks their documented wire format and enforces their limits: it
//! checks the client-credentials form, the bearer token and its expiry, `api-version`,
//! `Content-Type`, gzip, and answers 413 to a call over 1 MB, as Azure does; like Azure, it
//! truncates a field value over 64 KB without saying so (and counts it, so tests can see it), and
//! replaces a `TimeGenerated` more than two days old or more than a day ahead by the time it
//! received the row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use gatehouse_audit::azure_monitor::{
    AzureMonitorConfig, AzureMonitorSink, CALL_TIME_COLUMN, DEFAULT_AUTHORITY,
    DEFAULT_GATEWAY_STREAM, DEFAULT_LLM_STREAM, MAX_CALL_BYTES, MAX_FIELD_BYTES, MAX_ROW_BYTES,
};
use gatehouse_audit::rows::MESSAGE_PIECE_BYTES;
use gatehouse_audit::{AuditRecord, AuditSink};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[path = "support/column_names.rs"]
mod column_names;
use column_names::assert_valid_column_name;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "0f7c1b8e-2a34-4d1e-9f3a-5c6d7e8f9a0b";
const CLIENT_SECRET: &str = "Zq8~secretValue.OnlyTheTestKnows_123";
const DCR: &str = "dcr-000a00a000a00000a000000aa000a0aa";
const MONITOR_SCOPE: &str = "https://monitor.azure.com//.default";
const API_VERSION: &str = "2023-01-01";
/// Where Azure cuts a field value ("64 KB").
const AZURE_FIELD_LIMIT: usize = 65_536;
/// How old a `TimeGenerated` Azure keeps, and how far ahead: "Standard columns in Azure Monitor
/// Logs" (<https://learn.microsoft.com/azure/azure-monitor/logs/log-standard-columns#timegenerated>)
/// says that a value more than 2 days before the time received, or more than a day in the
/// future, is replaced by the time received.
const AZURE_TIME_GENERATED_MAX_AGE: time::Duration = time::Duration::hours(48);
const AZURE_TIME_GENERATED_MAX_AHEAD: time::Duration = time::Duration::hours(24);

// ---------------------------------------------------------------------------------------------
// The double
// ---------------------------------------------------------------------------------------------

/// A failure the double answers instead of storing a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// 429 with `Retry-After: 1`.
    Throttle,
    /// 429 with `Retry-After` of this many seconds.
    ThrottleFor(u64),
    /// No answer for two minutes (then a 500).
    Hang,
    /// 500.
    ServerError,
    /// 401, as for a revoked token.
    Unauthorized,
}

/// What Entra's token endpoint answers instead of issuing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenFault {
    /// 503, as Entra answers when it is unavailable.
    Unavailable,
    /// 429 with `Retry-After` of this many seconds.
    ThrottleFor(u64),
    /// No answer for two minutes (then a 503).
    Hang,
}

/// One ingestion call as the double saw it.
#[derive(Debug, Clone)]
struct Call {
    stream: String,
    status: u16,
    request_id: String,
    token: String,
    gzip: bool,
    compressed_bytes: usize,
    json_bytes: usize,
    rows: Vec<Value>,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// Issued tokens and when they expire.
    tokens: HashMap<String, Instant>,
    token_requests: usize,
    /// What to answer to the next calls: `None` = behave.
    faults: VecDeque<Option<Fault>>,
    calls: Vec<Call>,
    /// Rows stored, per stream, in arrival order.
    stored: HashMap<String, Vec<Value>>,
    /// Field values stored truncated, as `{row id}.{column}`.
    truncated_fields: Vec<String>,
}

struct DoubleState {
    /// The client secret Entra takes (a test rotates it).
    expected_secret: Mutex<String>,
    token_lifetime_seconds: AtomicU64,
    max_body_bytes: AtomicUsize,
    /// Echo the received secret / token in error answers, as a careless server might.
    echo: AtomicBool,
    /// What the token endpoint answers instead of a token (`None`: it issues one).
    token_fault: Mutex<Option<TokenFault>>,
    inner: Mutex<Inner>,
}

struct Double {
    address: SocketAddr,
    state: Arc<DoubleState>,
}

impl Double {
    async fn start_expecting(secret: &str) -> Double {
        let state = Arc::new(DoubleState {
            expected_secret: Mutex::new(secret.to_owned()),
            token_lifetime_seconds: AtomicU64::new(3599),
            max_body_bytes: AtomicUsize::new(MAX_CALL_BYTES),
            echo: AtomicBool::new(false),
            token_fault: Mutex::new(None),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(issue_token))
            .route("/dataCollectionRules/{dcr}/streams/{stream}", post(ingest))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Double { address, state }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    fn fail_next(&self, faults: &[Option<Fault>]) {
        self.inner().faults.extend(faults.iter().copied());
    }

    fn fail_tokens(&self, fault: Option<TokenFault>) {
        *self.state.token_fault.lock().unwrap() = fault;
    }

    fn revoke_tokens(&self) {
        self.inner().tokens.clear();
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.inner.lock().unwrap()
    }

    fn calls(&self, stream: &str) -> Vec<Call> {
        self.inner()
            .calls
            .iter()
            .filter(|c| c.stream == stream)
            .cloned()
            .collect()
    }

    fn stored(&self, stream: &str) -> Vec<Value> {
        self.inner().stored.get(stream).cloned().unwrap_or_default()
    }

    fn truncated_fields(&self) -> Vec<String> {
        self.inner().truncated_fields.clone()
    }

    fn token_requests(&self) -> usize {
        self.inner().token_requests
    }

    /// Every token the double ever issued (revoked ones too: they are in the calls).
    fn issued_tokens(&self) -> Vec<String> {
        let inner = self.inner();
        let mut tokens: HashSet<String> = inner.tokens.keys().cloned().collect();
        tokens.extend(inner.calls.iter().map(|c| c.token.clone()));
        tokens.into_iter().filter(|t| !t.is_empty()).collect()
    }

    /// The double's own check of the documented limit, over every call it received.
    fn assert_no_call_over_the_limit(&self) {
        for call in &self.inner().calls {
            assert!(call.gzip, "every call is gzip-encoded");
            assert!(
                call.json_bytes <= MAX_CALL_BYTES && call.compressed_bytes <= MAX_CALL_BYTES,
                "a call carried {} bytes of JSON ({} compressed)",
                call.json_bytes,
                call.compressed_bytes
            );
            assert_ne!(call.status, 413, "the sink sent a call Azure would refuse");
        }
    }
}

/// `POST /{tenant}/oauth2/v2.0/token` — the client-credentials grant of the Microsoft identity
/// platform: form in, `{"token_type","expires_in","access_token"}` out, OAuth error bodies
/// (`{"error","error_description"}`) otherwise.
async fn issue_token(
    State(state): State<Arc<DoubleState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let oauth_error = |status: StatusCode, error: &str, description: String| {
        (
            status,
            axum::Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/x-www-form-urlencoded")
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: form body expected".to_owned(),
        );
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    state.inner.lock().unwrap().token_requests += 1;
    let unavailable = || {
        oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "AADSTS90033: A transient error has occurred. Please try again.".to_owned(),
        )
    };
    let fault = *state.token_fault.lock().unwrap();
    match fault {
        None => {}
        Some(TokenFault::Unavailable) => return unavailable(),
        Some(TokenFault::ThrottleFor(seconds)) => {
            let mut throttled = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "AADSTS50196: The server terminated an operation because it encountered a client request loop.".to_owned(),
            );
            throttled
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
            return throttled;
        }
        Some(TokenFault::Hang) => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            return unavailable();
        }
    }
    if tenant != TENANT {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            format!("AADSTS90002: Tenant '{tenant}' not found."),
        );
    }
    if field("grant_type") != "client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003".to_owned(),
        );
    }
    if field("scope") != MONITOR_SCOPE {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            format!("AADSTS70011: scope '{}' is not valid", field("scope")),
        );
    }
    if field("client_id") != CLIENT_ID
        || field("client_secret") != *state.expected_secret.lock().unwrap()
    {
        let mut description = "AADSTS7000215: Invalid client secret provided.".to_owned();
        if state.echo.load(Ordering::SeqCst) {
            description.push_str(&format!(" Received '{}'.", field("client_secret")));
        }
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    }
    let lifetime = state.token_lifetime_seconds.load(Ordering::SeqCst);
    let token = format!("eyJ0eXAiOiJKV1Qi.{}", uuid::Uuid::new_v4().simple());
    state.inner.lock().unwrap().tokens.insert(
        token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": token,
    }))
    .into_response()
}

/// `POST /dataCollectionRules/{dcr}/streams/{stream}?api-version=2023-01-01` — the Logs
/// Ingestion API: bearer token, JSON array body (optionally gzip), 204 on success, an Azure error
/// object otherwise. Every call is recorded, whatever the answer.
async fn ingest(
    State(state): State<Arc<DoubleState>>,
    Path((dcr, stream)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let received = OffsetDateTime::now_utc();
    let mut call = Call {
        stream: stream.clone(),
        status: 204,
        request_id: header_text("x-ms-client-request-id"),
        token: header_text("authorization")
            .strip_prefix("Bearer ")
            .unwrap_or_default()
            .to_owned(),
        gzip: header_text("content-encoding") == "gzip",
        compressed_bytes: body.len(),
        json_bytes: 0,
        rows: Vec::new(),
        at: Instant::now(),
    };
    let echo = state.echo.load(Ordering::SeqCst);
    let checked = check_call(&state, &dcr, &query, &headers, &body, &mut call);
    let hangs = checked.is_ok() && {
        let mut inner = state.inner.lock().unwrap();
        let hangs = inner.faults.front() == Some(&Some(Fault::Hang));
        if hangs {
            inner.faults.pop_front();
            call.status = 500;
            inner.calls.push(call.clone());
        }
        hangs
    };
    if hangs {
        tokio::time::sleep(Duration::from_secs(120)).await;
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let mut inner = state.inner.lock().unwrap();
    let fault = if checked.is_ok() {
        inner.faults.pop_front().flatten()
    } else {
        None
    };
    let (status, code, message) = match (checked, fault) {
        (Err(refusal), _) => refusal,
        (Ok(()), None) => {
            let mut rows = call.rows.clone();
            for row in &mut rows {
                keep_or_replace_time_generated(row, received);
                let id = row["GatehouseRowId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                for (column, value) in row.as_object_mut().unwrap() {
                    if let Value::String(text) = value
                        && text.len() > AZURE_FIELD_LIMIT
                    {
                        let mut end = AZURE_FIELD_LIMIT;
                        while !text.is_char_boundary(end) {
                            end -= 1;
                        }
                        text.truncate(end);
                        inner.truncated_fields.push(format!("{id}.{column}"));
                    }
                }
            }
            inner.stored.entry(stream).or_default().extend(rows);
            inner.calls.push(call);
            return StatusCode::NO_CONTENT.into_response();
        }
        (Ok(()), Some(Fault::Throttle)) => (
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "1".to_owned(),
        ),
        (Ok(()), Some(Fault::ThrottleFor(seconds))) => (
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            seconds.to_string(),
        ),
        (Ok(()), Some(Fault::ServerError | Fault::Hang)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "ServiceError",
            "try again".to_owned(),
        ),
        (Ok(()), Some(Fault::Unauthorized)) => (
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
            if echo {
                format!("token '{}' was revoked", call.token)
            } else {
                "token was revoked".to_owned()
            },
        ),
    };
    call.status = status.as_u16();
    inner.calls.push(call);
    let body = axum::Json(json!({"error": {"code": code, "message": message.clone()}}));
    if status == StatusCode::TOO_MANY_REQUESTS {
        // The message carries the seconds to wait, as Azure's 429 messages do.
        (status, [(header::RETRY_AFTER, message)], body).into_response()
    } else {
        (status, body).into_response()
    }
}

/// A row's `TimeGenerated` as Azure stores it: as sent, unless it is more than
/// [`AZURE_TIME_GENERATED_MAX_AGE`] before `received` or more than
/// [`AZURE_TIME_GENERATED_MAX_AHEAD`] after it, when it becomes `received`.
fn keep_or_replace_time_generated(row: &mut Value, received: OffsetDateTime) {
    let sent = row["TimeGenerated"]
        .as_str()
        .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok());
    let kept = sent.is_some_and(|sent| {
        sent >= received - AZURE_TIME_GENERATED_MAX_AGE
            && sent <= received + AZURE_TIME_GENERATED_MAX_AHEAD
    });
    if !kept {
        row["TimeGenerated"] = json!(received.format(&Rfc3339).unwrap());
    }
}

/// What Azure checks before it accepts a call; fills in the call's sizes and rows.
fn check_call(
    state: &DoubleState,
    dcr: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    call: &mut Call,
) -> Result<(), (StatusCode, &'static str, String)> {
    if query.get("api-version").map(String::as_str) != Some(API_VERSION) {
        return Err((
            StatusCode::BAD_REQUEST,
            "InvalidApiVersion",
            "api-version".to_owned(),
        ));
    }
    if dcr != DCR || ![DEFAULT_GATEWAY_STREAM, DEFAULT_LLM_STREAM].contains(&call.stream.as_str()) {
        return Err((
            StatusCode::NOT_FOUND,
            "InvalidStream",
            format!("{dcr}/{}", call.stream),
        ));
    }
    let token_valid = state
        .inner
        .lock()
        .unwrap()
        .tokens
        .get(&call.token)
        .is_some_and(|expiry| Instant::now() < *expiry);
    if !token_valid {
        let message = if state.echo.load(Ordering::SeqCst) {
            format!("token '{}' is not valid", call.token)
        } else {
            "token is not valid".to_owned()
        };
        return Err((StatusCode::UNAUTHORIZED, "InvalidToken", message));
    }
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/json")
    {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "InvalidContentType",
            String::new(),
        ));
    }
    let limit = state.max_body_bytes.load(Ordering::SeqCst);
    let json_body = if call.gzip {
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(body)
            .take(u64::try_from(limit).unwrap() + 1)
            .read_to_end(&mut decoded)
            .map_err(|_| (StatusCode::BAD_REQUEST, "InvalidGzip", String::new()))?;
        decoded
    } else {
        body.to_vec()
    };
    call.json_bytes = json_body.len();
    // The documented limit holds compressed or uncompressed.
    if body.len() > limit || json_body.len() > limit {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            "ContentLengthLimitExceeded",
            "Maximum allowed content length: 1048576 bytes (1 MB).".to_owned(),
        ));
    }
    match serde_json::from_slice::<Value>(&json_body) {
        Ok(Value::Array(rows)) if rows.iter().all(Value::is_object) => {
            call.rows = rows;
            Ok(())
        }
        _ => Err((
            StatusCode::BAD_REQUEST,
            "InvalidPayload",
            "a JSON array of objects is expected".to_owned(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct Setup {
    double: Double,
    _secret_dir: tempfile::TempDir,
    secret_path: std::path::PathBuf,
}

async fn setup() -> Setup {
    setup_expecting(CLIENT_SECRET).await
}

async fn setup_expecting(expected_secret: &str) -> Setup {
    let double = Double::start_expecting(expected_secret).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_path = dir.path().join("client-secret");
    // As a mounted secret often is: with a trailing newline that is not part of it.
    std::fs::write(&secret_path, format!("{CLIENT_SECRET}\n")).unwrap();
    Setup {
        double,
        _secret_dir: dir,
        secret_path,
    }
}

fn config(setup: &Setup, overrides: Value) -> AzureMonitorConfig {
    config_for(&setup.double, &setup.secret_path, overrides)
}

fn config_for(double: &Double, secret_path: &FsPath, overrides: Value) -> AzureMonitorConfig {
    let mut value = json!({
        "endpoint": double.url(),
        "dcr_immutable_id": DCR,
        "credential": {
            "tenant_id": TENANT,
            "client_id": CLIENT_ID,
            "client_secret": format!("file:{}", secret_path.display()),
            "authority": double.url(),
        },
    });
    for (key, override_value) in overrides.as_object().unwrap() {
        value[key] = override_value.clone();
    }
    serde_json::from_value(value).unwrap()
}

fn new_sink(setup: &Setup, overrides: Value) -> AzureMonitorSink {
    AzureMonitorSink::new(config(setup, overrides)).unwrap()
}

fn prompt(bytes: usize, seed: usize) -> String {
    // Multi-byte characters and JSON escapes, so that cuts must respect both.
    let filler: String = format!("record {seed}: \"Grüße\" ü—ok\\n ")
        .chars()
        .cycle()
        .take(bytes)
        .collect();
    format!(r#"[{{"role":"user","content":{}}}]"#, json!(filler))
}

fn completion(seed: usize) -> String {
    format!(r#"[{{"role":"assistant","content":"answer {seed}"}}]"#)
}

/// A minute ago, to the millisecond 123: a time Azure keeps as sent.
fn recent() -> OffsetDateTime {
    (OffsetDateTime::now_utc() - time::Duration::minutes(1))
        .replace_millisecond(123)
        .unwrap()
}

fn record(index: usize, prompt_bytes: usize, streamed: bool) -> AuditRecord {
    let prompt = prompt(prompt_bytes, index);
    let completion = completion(index);
    serde_json::from_value(json!({
        "TimeGenerated": recent().format(&Rfc3339).unwrap(),
        "CorrelationId": format!("0190c0de-0000-7000-8000-{index:012}"),
        "GatewayId": "gw-1",
        "OperationId": "chatcompletions_create",
        "CallerIpAddress": "198.51.100.7",
        "PeerIpAddress": "10.0.0.1",
        "Method": "POST",
        "Url": "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        "ClientProtocol": "HTTP/1.1",
        "ResponseCode": 200,
        "IsRequestSuccess": true,
        "BackendResponseCode": 200,
        "BackendId": "east",
        "BackendUrl": "https://east.openai.azure.com/openai/deployments/gpt-4o/chat/completions",
        "RequestSize": prompt.len() + 40,
        "ResponseSize": 900,
        "TotalTime": 1200,
        "BackendTime": 1100,
        "TimeToFirstByte": 300,
        "ApimSubscriptionId": "team-research",
        "ProductId": "research",
        "UserId": null, "UserName": null, "TenantId": null,
        "Groups": ["g-research"],
        "DeploymentName": "gpt-4o",
        "ModelName": "gpt-4o-2024-08-06",
        "ApiVersion": "2024-10-21",
        "IsStreamCompletion": streamed,
        "Usage": {"PromptTokens": prompt_bytes / 4 + 10, "CompletionTokens": 7, "TotalTokens": prompt_bytes / 4 + 17,
                  "CachedTokens": 0, "ReasoningTokens": 0, "IsEstimate": false},
        "Attempts": [{"BackendId": "east", "Status": 200, "ElapsedMs": 1100, "Error": null}],
        "BackendRequestBody": format!(r#"{{"messages":{prompt},"stream":{streamed}}}"#),
        "RequestBodyTruncated": false,
        "BackendResponseBody": format!(r#"{{"object":"chat.completion","choices":[{{"message":{completion}}}],"usage":{{"total_tokens":17}}}}"#),
        "ResponseBodyTruncated": false,
        "RequestMessages": prompt,
        "ResponseMessages": completion,
        "ClientAborted": false,
        "LastErrorReason": null,
        "LastErrorMessage": null
    }))
    .unwrap()
}

fn text<'a>(row: &'a Value, column: &str) -> &'a str {
    row[column].as_str().expect(column)
}

fn row_ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| text(r, "GatehouseRowId").to_owned())
        .collect()
}

/// The LLM rows of one call, in sequence order.
fn llm_rows_of<'a>(rows: &'a [Value], correlation_id: &str) -> Vec<&'a Value> {
    let mut mine: Vec<&Value> = rows
        .iter()
        .filter(|r| r["CorrelationId"] == correlation_id)
        .collect();
    mine.sort_by_key(|r| r["SequenceNumber"].as_i64().unwrap());
    mine
}

fn joined(rows: &[&Value], column: &str) -> String {
    rows.iter().filter_map(|r| r[column].as_str()).collect()
}

/// Bytes a text takes inside a JSON string (escapes included, quotes not): how the sink counts
/// a field.
fn json_len(text: &str) -> usize {
    serde_json::to_string(text).unwrap().len() - 2
}

/// Every text field of every row the double stored is within the field limit, counted as JSON.
fn assert_every_field_within_the_limit(double: &Double) {
    for stream in [DEFAULT_GATEWAY_STREAM, DEFAULT_LLM_STREAM] {
        for row in double.stored(stream) {
            for (column, value) in row.as_object().unwrap() {
                if let Value::String(text) = value {
                    assert!(
                        json_len(text) <= MAX_FIELD_BYTES,
                        "{column}: {} bytes as JSON",
                        json_len(text)
                    );
                }
            }
        }
    }
    assert_eq!(
        double.truncated_fields(),
        Vec::<String>::new(),
        "Azure cut nothing"
    );
}

/// A body as the gateway captures it at its limit (1 MiB by default), heavy with escapes: its
/// JSON form is twice as long.
fn escaped_body(field: &str) -> String {
    let body = format!(r#"{{"{field}":"{}"#, r#"\"\\"#.repeat(1024 * 1024 / 4));
    body[..1024 * 1024].to_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_batch_arrives_complete_in_both_tables_with_azure_column_names() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    // Every fourth call has a prompt over 100 KB; every other one streamed.
    let records: Vec<AuditRecord> = (0..16)
        .map(|i| record(i, if i % 4 == 0 { 150_000 } else { 2_000 }, i % 2 == 1))
        .collect();

    sink.write_batch(&records).await.unwrap();

    let double = &setup.double;
    double.assert_no_call_over_the_limit();
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    assert_eq!(gateway.len(), records.len());
    for (record, row) in records.iter().zip(&gateway) {
        let id = &record.correlation_id;
        for column in row.as_object().unwrap().keys() {
            assert_valid_column_name(column);
        }
        assert_eq!(text(row, "CorrelationId"), id);
        assert_eq!(
            text(row, "GatehouseRowId"),
            format!("{id}:ApiManagementGatewayLogs:0")
        );
        assert_eq!(
            OffsetDateTime::parse(text(row, "TimeGenerated"), &Rfc3339).unwrap(),
            record.time_generated
        );
        assert_eq!(
            row["ResponseCode"],
            json!(200),
            "ResponseCode is a JSON number"
        );
        assert_eq!(row["BackendResponseCode"], json!(200));
        assert_eq!(row["TotalTime"], json!(1200));
        assert_eq!(row["IsRequestSuccess"], json!(true));
        assert_eq!(
            row["IsStreamCompletion"],
            json!(record.is_stream_completion)
        );
        assert_eq!(text(row, "OperationId"), "chatcompletions_create");
        assert_eq!(
            text(row, "OperationName"),
            "Microsoft.ApiManagement/GatewayLogs"
        );
        assert_eq!(text(row, "CallerIpAddress"), "198.51.100.7");
        assert_eq!(text(row, "ApimSubscriptionId"), "team-research");
        assert_eq!(
            row["TotalTokens"],
            json!(record.usage.unwrap().total_tokens)
        );

        // Bodies Azure would cut silently are cut by the sink and flagged; a JSON body to JSON
        // that still parses, its long strings shortened and the rest whole.
        let sent_body = text(row, "BackendRequestBody");
        let full_body = record.backend_request_body.as_deref().unwrap();
        assert!(json_len(sent_body) <= MAX_FIELD_BYTES);
        let cut = json_len(full_body) > MAX_FIELD_BYTES;
        if cut {
            let sent: Value = serde_json::from_str(sent_body).unwrap();
            let full: Value = serde_json::from_str(full_body).unwrap();
            assert_eq!(sent["stream"], full["stream"]);
            assert_eq!(
                sent["messages"].as_array().unwrap().len(),
                full["messages"].as_array().unwrap().len()
            );
            assert_ne!(sent, full);
        } else {
            assert_eq!(sent_body, full_body);
        }
        assert_eq!(row["RequestBodyTruncated"], json!(cut));
        assert_eq!(
            cut,
            record.request_messages.as_ref().unwrap().len() > 100_000
        );
        assert_eq!(
            text(row, "BackendResponseBody"),
            record.backend_response_body.as_deref().unwrap()
        );
        assert_eq!(row["ResponseBodyTruncated"], json!(false));

        // The LLM table: a header row, then the prompt and completion whole, in pieces.
        let pieces = llm_rows_of(&llm, id);
        let sequence: Vec<i64> = pieces
            .iter()
            .map(|r| r["SequenceNumber"].as_i64().unwrap())
            .collect();
        assert_eq!(sequence, (0..pieces.len() as i64).collect::<Vec<_>>());
        assert_eq!(text(pieces[0], "DeploymentName"), "gpt-4o");
        assert_eq!(text(pieces[0], "ModelName"), "gpt-4o-2024-08-06");
        assert_eq!(
            pieces[0]["PromptTokens"],
            json!(record.usage.unwrap().prompt_tokens)
        );
        assert_eq!(
            joined(&pieces, "RequestMessages"),
            record.request_messages.as_deref().unwrap()
        );
        assert_eq!(
            joined(&pieces, "ResponseMessages"),
            record.response_messages.as_deref().unwrap()
        );
        for piece in &pieces {
            for column in piece.as_object().unwrap().keys() {
                assert_valid_column_name(column);
            }
            assert_eq!(
                piece["IsStreamCompletion"],
                json!(record.is_stream_completion)
            );
            assert!(
                piece["RequestMessages"]
                    .as_str()
                    .is_none_or(|p| p.len() <= MESSAGE_PIECE_BYTES)
            );
            assert_eq!(
                text(piece, "GatehouseRowId"),
                format!(
                    "{id}:ApiManagementGatewayLlmLog:{}",
                    piece["SequenceNumber"].as_i64().unwrap()
                )
            );
        }
        if cut {
            assert!(pieces.len() >= 6, "a 150 KB prompt takes five 32 KB pieces");
        }
    }
    let all_ids: Vec<String> = row_ids(&gateway).into_iter().chain(row_ids(&llm)).collect();
    let distinct: HashSet<&String> = all_ids.iter().collect();
    assert_eq!(distinct.len(), all_ids.len(), "row ids are unique");
    for call in double.calls(DEFAULT_GATEWAY_STREAM) {
        uuid::Uuid::parse_str(&call.request_id).expect("x-ms-client-request-id is a GUID");
    }
}

/// A record replayed from the journal after a long outage: Azure stores a `TimeGenerated` more
/// than two days old as the time it received the row, and the call's own time stays in
/// `GatehouseTimeGenerated`, where the portal reads it (`coalesce(GatehouseTimeGenerated,
/// TimeGenerated)`, `portal-core/src/insights/kql.rs`).
#[tokio::test]
async fn a_record_sent_more_than_two_days_late_keeps_its_time_in_its_own_column() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let mut late = record(0, 500, false);
    late.time_generated = recent() - time::Duration::days(3);
    let on_time = record(1, 500, false);
    let sent_at = OffsetDateTime::now_utc();

    sink.write_batch(&[late.clone(), on_time.clone()])
        .await
        .unwrap();

    let double = &setup.double;
    let time_of = |row: &Value, column: &str| {
        OffsetDateTime::parse(text(row, column), &Rfc3339).expect(column)
    };
    // What the portal reads as the call's time: the call's own column, else TimeGenerated (rows
    // written before the column existed).
    let read_back = |row: &Value| match row.get(CALL_TIME_COLUMN) {
        Some(Value::String(_)) => time_of(row, CALL_TIME_COLUMN),
        _ => time_of(row, "TimeGenerated"),
    };
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    let late_row = gateway
        .iter()
        .find(|row| text(row, "CorrelationId") == late.correlation_id)
        .unwrap();
    // Azure put the time it received the row in TimeGenerated; the call's time is kept.
    assert!(time_of(late_row, "TimeGenerated") >= sent_at, "{late_row}");
    assert_eq!(time_of(late_row, CALL_TIME_COLUMN), late.time_generated);
    assert_eq!(read_back(late_row), late.time_generated);
    let late_pieces = llm_rows_of(&llm, &late.correlation_id);
    assert!(late_pieces.len() > 1, "a header and the message pieces");
    for piece in late_pieces {
        assert!(time_of(piece, "TimeGenerated") >= sent_at, "{piece}");
        assert_eq!(read_back(piece), late.time_generated);
    }
    // A record sent in time has the same time in both columns.
    let on_time_row = gateway
        .iter()
        .find(|row| text(row, "CorrelationId") == on_time.correlation_id)
        .unwrap();
    assert_eq!(
        time_of(on_time_row, "TimeGenerated"),
        on_time.time_generated
    );
    assert_eq!(read_back(on_time_row), on_time.time_generated);
    // A row stored before the sink sent the column reads its TimeGenerated.
    let mut older = on_time_row.clone();
    older.as_object_mut().unwrap().remove(CALL_TIME_COLUMN);
    assert_eq!(read_back(&older), on_time.time_generated);
}

#[tokio::test]
async fn a_large_batch_is_split_over_several_calls_each_under_one_megabyte() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let records: Vec<AuditRecord> = (0..30)
        .map(|i| record(i, 200_000 + i * 1_000, i % 3 == 0))
        .collect();

    sink.write_batch(&records).await.unwrap();

    let double = &setup.double;
    double.assert_no_call_over_the_limit();
    let gateway_calls = double.calls(DEFAULT_GATEWAY_STREAM);
    let llm_calls = double.calls(DEFAULT_LLM_STREAM);
    // ~64 KB of body per gateway row; ~200 KB of prompt per call in the LLM table.
    assert!(
        gateway_calls.len() >= 2,
        "{} gateway calls",
        gateway_calls.len()
    );
    assert!(llm_calls.len() >= 6, "{} LLM calls", llm_calls.len());
    // Rows arrive once each, in record order.
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    let correlation: Vec<&str> = gateway.iter().map(|r| text(r, "CorrelationId")).collect();
    let expected: Vec<&str> = records.iter().map(|r| r.correlation_id.as_str()).collect();
    assert_eq!(correlation, expected);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    for record in &records {
        let pieces = llm_rows_of(&llm, &record.correlation_id);
        assert_eq!(
            joined(&pieces, "RequestMessages"),
            record.request_messages.as_deref().unwrap()
        );
    }
    let ids = row_ids(&llm);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
}

#[tokio::test]
async fn throttled_calls_are_retried_after_retry_after_without_loss_and_with_the_same_row_ids() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let records: Vec<AuditRecord> = (0..5).map(|i| record(i, 1_000, false)).collect();
    setup
        .double
        .fail_next(&[Some(Fault::Throttle), Some(Fault::Throttle)]);

    let started = Instant::now();
    sink.write_batch(&records).await.unwrap();

    let double = &setup.double;
    let calls = double.calls(DEFAULT_GATEWAY_STREAM);
    let statuses: Vec<u16> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [429, 429, 204]);
    for pair in calls.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(950),
            "Retry-After: 1 is honoured"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    // The same call each time: same rows, same row ids, same client request id.
    assert_eq!(row_ids(&calls[0].rows), row_ids(&calls[2].rows));
    assert_eq!(row_ids(&calls[1].rows), row_ids(&calls[2].rows));
    assert_eq!(calls[0].request_id, calls[2].request_id);
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), records.len());
    let llm = double.stored(DEFAULT_LLM_STREAM);
    for record in &records {
        assert_eq!(
            joined(
                &llm_rows_of(&llm, &record.correlation_id),
                "RequestMessages"
            ),
            record.request_messages.as_deref().unwrap()
        );
    }
    double.assert_no_call_over_the_limit();
}

#[tokio::test]
async fn server_errors_end_in_an_error_after_max_attempts_and_the_batch_sent_again_resumes() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({"max_attempts": 2}));
    let records: Vec<AuditRecord> = (0..4).map(|i| record(i, 1_000, true)).collect();
    // The gateway-log call goes through; every try of the LLM-log call fails.
    setup
        .double
        .fail_next(&[None, Some(Fault::ServerError), Some(Fault::ServerError)]);

    let error = sink.write_batch(&records).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("gave up after 2 attempts"), "{message}");
    assert!(message.contains("HTTP 500"), "{message}");
    assert!(message.contains(DEFAULT_LLM_STREAM), "{message}");
    assert_eq!(setup.double.calls(DEFAULT_LLM_STREAM).len(), 2);

    // The queue sends the batch again: the sink skips the gateway rows Azure already took.
    sink.write_batch(&records).await.unwrap();
    let gateway = setup.double.stored(DEFAULT_GATEWAY_STREAM);
    assert_eq!(gateway.len(), records.len(), "no gateway row sent twice");
    assert_eq!(setup.double.calls(DEFAULT_GATEWAY_STREAM).len(), 1);
    let llm = setup.double.stored(DEFAULT_LLM_STREAM);
    let ids = row_ids(&llm);
    assert!(!ids.is_empty());
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());

    // A sink that cannot know (a restarted gateway replaying its journal) sends them again:
    // the copies carry the same ids.
    new_sink(&setup, json!({}))
        .write_batch(&records)
        .await
        .unwrap();
    let gateway = setup.double.stored(DEFAULT_GATEWAY_STREAM);
    assert_eq!(gateway.len(), 2 * records.len());
    let distinct: HashSet<String> = row_ids(&gateway).into_iter().collect();
    assert_eq!(distinct.len(), records.len());
}

#[tokio::test]
async fn a_batch_interrupted_part_way_resumes_at_the_first_call_not_accepted() {
    let setup = setup().await;
    // ~10 KB a gateway row: a dozen calls of ~25 KB for the gateway stream.
    let sink = new_sink(
        &setup,
        json!({"max_batch_bytes": 25_000, "max_attempts": 1}),
    );
    let records: Vec<AuditRecord> = (0..40).map(|i| record(i, 4_000, false)).collect();
    // Five calls go through, the sixth fails: the write fails.
    let mut faults = vec![None; 5];
    faults.push(Some(Fault::ServerError));
    setup.double.fail_next(&faults);
    sink.write_batch(&records).await.unwrap_err();
    let accepted_first = setup.double.stored(DEFAULT_GATEWAY_STREAM).len();
    assert!(accepted_first > 0 && accepted_first < records.len());

    // Sent again (as the queue does), and interrupted again two calls later.
    setup
        .double
        .fail_next(&[None, None, Some(Fault::ServerError)]);
    sink.write_batch(&records).await.unwrap_err();
    // And again, to the end.
    sink.write_batch(&records).await.unwrap();

    let double = &setup.double;
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    let correlation: Vec<&str> = gateway.iter().map(|r| text(r, "CorrelationId")).collect();
    let expected: Vec<&str> = records.iter().map(|r| r.correlation_id.as_str()).collect();
    assert_eq!(correlation, expected, "every row once, in order");
    let llm = double.stored(DEFAULT_LLM_STREAM);
    let ids = row_ids(&llm);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
    for record in &records {
        assert_eq!(
            joined(
                &llm_rows_of(&llm, &record.correlation_id),
                "RequestMessages"
            ),
            record.request_messages.as_deref().unwrap()
        );
    }
    // The first call of the second write began where the first write stopped.
    let calls = double.calls(DEFAULT_GATEWAY_STREAM);
    let second_write_first_row = &calls[6].rows[0];
    assert_eq!(
        text(second_write_first_row, "CorrelationId"),
        records[accepted_first].correlation_id
    );

    // Stored whole, the batch is forgotten: handed over once more, it is sent once more.
    sink.write_batch(&records[..1]).await.unwrap();
    assert_eq!(
        double.stored(DEFAULT_GATEWAY_STREAM).len(),
        records.len() + 1
    );
}

/// A failed batch that the queue hands back in smaller pieces (its journal replays a chunk at a
/// time) sends no row Azure accepted twice: storing one piece forgets that piece's rows only.
#[tokio::test]
async fn a_failed_batch_replayed_in_pieces_sends_no_row_twice() {
    let setup = setup().await;
    let sink = new_sink(
        &setup,
        json!({"max_batch_bytes": 25_000, "max_attempts": 1}),
    );
    let records: Vec<AuditRecord> = (0..40).map(|i| record(i, 4_000, false)).collect();
    let mut faults = vec![None; 5];
    faults.push(Some(Fault::ServerError));
    setup.double.fail_next(&faults);
    sink.write_batch(&records).await.unwrap_err();
    let accepted_first = setup.double.stored(DEFAULT_GATEWAY_STREAM).len();
    assert!(accepted_first > 1 && accepted_first < records.len());

    // The replay: a first piece Azure accepted whole, then the rest.
    sink.write_batch(&records[..1]).await.unwrap();
    sink.write_batch(&records[1..]).await.unwrap();

    let gateway = setup.double.stored(DEFAULT_GATEWAY_STREAM);
    let correlation: Vec<&str> = gateway.iter().map(|r| text(r, "CorrelationId")).collect();
    let expected: Vec<&str> = records.iter().map(|r| r.correlation_id.as_str()).collect();
    assert_eq!(correlation, expected, "every row once, in order");
    let llm = row_ids(&setup.double.stored(DEFAULT_LLM_STREAM));
    assert_eq!(llm.iter().collect::<HashSet<_>>().len(), llm.len());
}

#[tokio::test]
async fn a_retry_after_longer_than_the_write_may_take_goes_to_the_queue() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({"max_write_seconds": 5}));
    let records: Vec<AuditRecord> = (0..3).map(|i| record(i, 500, false)).collect();
    setup.double.fail_next(&[Some(Fault::ThrottleFor(40))]);

    let error = tokio::time::timeout(Duration::from_secs(20), sink.write_batch(&records))
        .await
        .expect("the sink does not sleep through a 40 s Retry-After")
        .unwrap_err();
    assert_eq!(
        error.retry_after(),
        Some(Duration::from_secs(40)),
        "{error}"
    );
    assert_eq!(setup.double.calls(DEFAULT_GATEWAY_STREAM).len(), 1);
    sink.write_batch(&records).await.unwrap();
    assert_eq!(
        setup.double.stored(DEFAULT_GATEWAY_STREAM).len(),
        records.len()
    );

    // A wait longer than the sink waits between tries (`max_retry_wait_seconds`) is not cut to
    // it: the queue is told the whole wait, and Azure is not called again inside it.
    let sink = new_sink(&setup, json!({"max_retry_wait_seconds": 2}));
    let calls = setup.double.calls(DEFAULT_GATEWAY_STREAM).len();
    setup.double.fail_next(&[Some(Fault::ThrottleFor(30))]);
    let error = tokio::time::timeout(Duration::from_secs(20), sink.write_batch(&records))
        .await
        .expect("the sink hands a long wait to the queue at once")
        .unwrap_err();
    assert_eq!(
        error.retry_after(),
        Some(Duration::from_secs(30)),
        "{error}"
    );
    assert_eq!(setup.double.calls(DEFAULT_GATEWAY_STREAM).len(), calls + 1);
    let sink = new_sink(
        &setup,
        json!({"max_retry_wait_seconds": 2, "max_attempts": 1}),
    );
    setup.double.fail_next(&[Some(Fault::ThrottleFor(120))]);
    let error = sink.write_batch(&records).await.unwrap_err();
    assert_eq!(
        error.retry_after(),
        Some(Duration::from_secs(120)),
        "{error}"
    );
}

#[tokio::test]
async fn the_last_retry_after_before_the_tries_run_out_goes_to_the_queue() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({"max_attempts": 2}));
    let records: Vec<AuditRecord> = (0..2).map(|i| record(i, 500, false)).collect();
    setup
        .double
        .fail_next(&[Some(Fault::Throttle), Some(Fault::ThrottleFor(7))]);
    let error = sink.write_batch(&records).await.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)), "{error}");
    assert!(
        error.to_string().contains("gave up after 2 attempts"),
        "{error}"
    );

    // A 5xx gives no wait: the queue's own backoff applies.
    let sink = new_sink(&setup, json!({"max_attempts": 1}));
    setup.double.fail_next(&[Some(Fault::ServerError)]);
    let error = sink.write_batch(&records).await.unwrap_err();
    assert_eq!(error.retry_after(), None, "{error}");
}

#[tokio::test]
async fn a_write_ends_within_its_time_even_when_azure_never_answers() {
    let setup = setup().await;
    let sink = new_sink(
        &setup,
        json!({"max_write_seconds": 2, "timeout_seconds": 30}),
    );
    let records: Vec<AuditRecord> = (0..2).map(|i| record(i, 500, false)).collect();
    setup.double.fail_next(&[Some(Fault::Hang)]);

    let error = tokio::time::timeout(Duration::from_secs(20), sink.write_batch(&records))
        .await
        .expect("the write gives up when its time is up, not after the 30 s call timeout")
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("are up"), "{message}");
    assert!(error.retry_after().is_some(), "{message}");
    sink.write_batch(&records).await.unwrap();
    assert_eq!(
        setup.double.stored(DEFAULT_GATEWAY_STREAM).len(),
        records.len()
    );
}

#[tokio::test]
async fn no_field_reaches_azure_longer_than_it_keeps() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let mut record = record(1, 90_000, false);
    // A user in thousands of groups, a long query string, a long error, many attempts.
    record.groups = (0..3_000)
        .map(|i| format!("6f0c1d2e-3b4a-5c6d-7e8f-{i:012}"))
        .collect();
    record.url = format!(
        "/openai/deployments/gpt-4o/chat/completions?q={}",
        "ü".repeat(40_000)
    );
    record.last_error_message = Some("x".repeat(70_000));
    let attempt = record.attempts[0].clone();
    record.attempts = vec![attempt; 2_000];
    let attempts = record.attempts.len();
    // A backend that names its model at length, and the other text that comes from the request
    // or the caller's token: the gateway bounds some of it before, the sink does not count on it.
    record.model_name = Some("gpt-4o-".repeat(10_000));
    record.method = "PROPFIND".repeat(9_000);
    record.deployment_name = Some("d".repeat(70_000));
    record.api_version = Some("2024-10-21".repeat(7_000));
    record.user_id = Some("u".repeat(70_000));
    record.tenant_id = Some("t".repeat(70_000));

    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();

    let double = &setup.double;
    assert_eq!(
        double.truncated_fields(),
        Vec::<String>::new(),
        "Azure cut nothing"
    );
    let row = &double.stored(DEFAULT_GATEWAY_STREAM)[0];
    let groups: Vec<String> = serde_json::from_str(text(row, "Groups")).unwrap();
    assert!(
        groups.len() > 1_000 && groups.len() < 3_000,
        "{} groups",
        groups.len()
    );
    assert_eq!(
        groups[..],
        record.groups[..groups.len()],
        "the leading groups, whole"
    );
    let kept: Vec<Value> = serde_json::from_str(text(row, "Attempts")).unwrap();
    assert!(
        kept.len() > 100 && kept.len() < attempts,
        "{} attempts",
        kept.len()
    );
    let url = text(row, "Url");
    assert!(url.len() <= MAX_FIELD_BYTES && record.url.starts_with(url));
    assert!(text(row, "LastErrorMessage").len() <= MAX_FIELD_BYTES);
    for (column, whole) in [
        ("ModelName", record.model_name.as_deref().unwrap()),
        ("Method", &record.method),
        ("DeploymentName", record.deployment_name.as_deref().unwrap()),
        ("ApiVersion", record.api_version.as_deref().unwrap()),
        ("UserId", record.user_id.as_deref().unwrap()),
        ("EntraTenantId", record.tenant_id.as_deref().unwrap()),
    ] {
        let sent = text(row, column);
        assert!(
            sent.len() <= MAX_FIELD_BYTES && sent.len() > 60_000 && whole.starts_with(sent),
            "{column}: {} bytes sent",
            sent.len()
        );
    }
    assert_eq!(row["RequestBodyTruncated"], true);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    let header = llm_rows_of(&llm, &record.correlation_id)[0];
    assert_eq!(header["SequenceNumber"], 0);
    for column in ["ModelName", "DeploymentName", "ApiVersion"] {
        assert_eq!(header[column], row[column], "the LLM header's {column}");
    }
    // The prompt itself is whole, in the LLM rows.
    assert_eq!(
        joined(
            &llm_rows_of(&llm, &record.correlation_id),
            "RequestMessages"
        ),
        record.request_messages.as_deref().unwrap()
    );
}

#[tokio::test]
async fn a_row_of_escaped_text_fits_in_a_call_and_every_field_in_its_limit() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let mut record = record(1, 2_000, false);
    // A backend naming its model in control characters (6 bytes each as JSON), a long error
    // likewise, a user name of quotes (2 bytes each), and both bodies as large as the gateway
    // captures them: cut at 64,000 bytes of UTF-8 each, this row took over 1 MB as JSON.
    record.model_name = Some("\u{1}".repeat(70_000));
    record.last_error_message = Some("\u{1}".repeat(70_000));
    record.user_name = Some("\"".repeat(70_000));
    record.backend_request_body = Some(escaped_body("messages"));
    record.request_body_truncated = true;
    record.backend_response_body = Some(escaped_body("choices"));
    record.response_body_truncated = true;

    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();

    let double = &setup.double;
    double.assert_no_call_over_the_limit();
    assert!(!double.inner().calls.is_empty());
    assert_every_field_within_the_limit(double);
    assert_eq!(sink.rows_set_aside(), 0);
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    assert_eq!(gateway.len(), 1, "the row is stored");
    let row = &gateway[0];
    assert_eq!(text(row, "CorrelationId"), record.correlation_id);
    for (column, whole) in [
        ("ModelName", record.model_name.as_deref().unwrap()),
        (
            "LastErrorMessage",
            record.last_error_message.as_deref().unwrap(),
        ),
        ("UserName", record.user_name.as_deref().unwrap()),
        (
            "BackendRequestBody",
            record.backend_request_body.as_deref().unwrap(),
        ),
        (
            "BackendResponseBody",
            record.backend_response_body.as_deref().unwrap(),
        ),
    ] {
        let sent = text(row, column);
        assert!(
            sent.len() < whole.len() && whole.starts_with(sent),
            "{column}: cut, and on a character"
        );
        assert!(
            json_len(sent) > MAX_FIELD_BYTES - 6,
            "{column}: cut no shorter than needed ({} bytes as JSON)",
            json_len(sent)
        );
    }
    assert_eq!(row["RequestBodyTruncated"], true);
    assert_eq!(row["ResponseBodyTruncated"], true);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    let header = llm_rows_of(&llm, &record.correlation_id)[0];
    assert_eq!(header["ModelName"], row["ModelName"]);
    assert_eq!(
        joined(
            &llm_rows_of(&llm, &record.correlation_id),
            "RequestMessages"
        ),
        record.request_messages.as_deref().unwrap()
    );
}

#[tokio::test]
async fn a_prompt_of_escapes_is_whole_in_pieces_each_within_the_field_limit() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let mut record = record(1, 2_000, false);
    // 32 KB pieces of control characters would take 192 KB each as JSON.
    let prompt = "\u{1}\u{2}ü".repeat(40_000);
    record.request_messages = Some(prompt.clone());

    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();

    let double = &setup.double;
    double.assert_no_call_over_the_limit();
    assert_every_field_within_the_limit(double);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    let pieces = llm_rows_of(&llm, &record.correlation_id);
    assert_eq!(joined(&pieces, "RequestMessages"), prompt);
    let sequence: Vec<i64> = pieces
        .iter()
        .map(|r| r["SequenceNumber"].as_i64().unwrap())
        .collect();
    assert_eq!(sequence, (0..pieces.len() as i64).collect::<Vec<_>>());
    assert_eq!(
        joined(&pieces, "ResponseMessages"),
        record.response_messages.as_deref().unwrap()
    );
    let ids = row_ids(&llm);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
}

#[tokio::test]
async fn a_row_over_the_row_budget_has_its_longest_texts_shortened_to_fit() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let mut record = record(1, 2_000, false);
    // Every text the sink caps at the field limit, at it, and the gateway's own error reason
    // (which it does not cap) beyond it: together more than a call may carry.
    let control = "\u{1}".repeat(70_000);
    record.method = control.clone();
    record.url = control.clone();
    record.user_id = Some(control.clone());
    record.user_name = Some(control.clone());
    record.tenant_id = Some(control.clone());
    record.deployment_name = Some(control.clone());
    record.model_name = Some(control.clone());
    record.api_version = Some(control.clone());
    record.last_error_message = Some(control.clone());
    record.backend_url = Some(control.clone());
    record.groups = (0..3_000)
        .map(|i| format!("6f0c1d2e-3b4a-5c6d-7e8f-{i:012}"))
        .collect();
    record.backend_request_body = Some(escaped_body("messages"));
    record.backend_response_body = Some(escaped_body("choices"));
    record.last_error_reason = Some("\u{1}".repeat(100_000));
    let attempt = record.attempts[0].clone();
    record.attempts = vec![attempt; 2_000];

    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();
    // Sent again, the row is shortened alike and keeps its id.
    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();

    let double = &setup.double;
    double.assert_no_call_over_the_limit();
    assert_every_field_within_the_limit(double);
    assert_eq!(sink.rows_set_aside(), 0);
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    assert_eq!(gateway.len(), 2);
    assert_eq!(gateway[0], gateway[1], "the same row both times");
    let row = &gateway[0];
    assert!(serde_json::to_vec(row).unwrap().len() <= MAX_ROW_BYTES);
    assert_eq!(text(row, "CorrelationId"), record.correlation_id);
    assert_eq!(
        text(row, "GatehouseRowId"),
        format!("{}:ApiManagementGatewayLogs:0", record.correlation_id)
    );
    let reason = text(row, "LastErrorReason");
    assert!(
        !reason.is_empty()
            && record
                .last_error_reason
                .as_deref()
                .unwrap()
                .starts_with(reason)
    );
    let groups: Vec<String> = serde_json::from_str(text(row, "Groups")).unwrap();
    assert!(!groups.is_empty() && groups.len() < 3_000);
    assert_eq!(groups[..], record.groups[..groups.len()], "whole groups");
    let attempts: Vec<Value> = serde_json::from_str(text(row, "Attempts")).unwrap();
    assert!(!attempts.is_empty() && attempts.len() < 2_000);
    assert_eq!(row["AttemptCount"], 2_000);
    assert_eq!(row["RequestBodyTruncated"], true);
    assert_eq!(row["ResponseBodyTruncated"], true);
}

#[tokio::test]
async fn a_row_refused_alone_as_too_large_is_shortened_or_left_out_never_retried_forever() {
    let setup = setup().await;
    // An endpoint far stricter than documented.
    setup
        .double
        .state
        .max_body_bytes
        .store(30_000, Ordering::SeqCst);
    let sink = new_sink(&setup, json!({}));
    let mut record = record(1, 1_000, false);
    record.backend_request_body = Some("b".repeat(60_000));

    sink.write_batch(std::slice::from_ref(&record))
        .await
        .unwrap();

    let double = &setup.double;
    let calls = double.inner().calls.clone();
    assert!(calls.iter().any(|c| c.status == 413));
    assert!(
        calls
            .iter()
            .filter(|c| c.status == 204)
            .all(|c| c.json_bytes <= 30_000)
    );
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    assert_eq!(gateway.len(), 1);
    let body = text(&gateway[0], "BackendRequestBody");
    assert!(!body.is_empty() && body.len() < 30_000);
    assert_eq!(gateway[0]["RequestBodyTruncated"], true);
    let llm = double.stored(DEFAULT_LLM_STREAM);
    assert_eq!(
        joined(
            &llm_rows_of(&llm, &record.correlation_id),
            "RequestMessages"
        ),
        record.request_messages.as_deref().unwrap(),
        "small rows are sent as they are"
    );
    assert_eq!(sink.rows_set_aside(), 0);

    // So strict that no row fits, however short: each row is left out, counted, and the write
    // ends instead of failing forever.
    setup
        .double
        .state
        .max_body_bytes
        .store(200, Ordering::SeqCst);
    let other = self::record(2, 1_000, false);
    sink.write_batch(std::slice::from_ref(&other))
        .await
        .unwrap();
    assert_eq!(
        sink.rows_set_aside(),
        4,
        "the gateway row and three LLM rows"
    );
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 1);
    assert!(llm_rows_of(&double.stored(DEFAULT_LLM_STREAM), &other.correlation_id).is_empty());
}

/// A record whose rows cannot fit in a call however short (its correlation id alone is over a
/// megabyte) is left out, and counted once: not again each time the queue sends its batch anew
/// after a failed write.
#[tokio::test]
async fn rows_left_out_are_counted_once_however_often_their_batch_is_sent() {
    let setup = setup().await;
    let mut huge = record(0, 100, false);
    huge.correlation_id = "x".repeat(MAX_CALL_BYTES + 1);
    let records = [huge, record(1, 100, false)];
    let once = new_sink(&setup, json!({}));
    once.write_batch(&records).await.unwrap();
    let rows_of_the_record = once.rows_set_aside();
    assert!(rows_of_the_record > 0);

    let sink = new_sink(&setup, json!({"max_attempts": 1}));
    setup.double.fail_next(&[Some(Fault::ServerError)]);
    sink.write_batch(&records).await.unwrap_err();
    sink.write_batch(&records).await.unwrap();
    assert_eq!(sink.rows_set_aside(), rows_of_the_record);
}

#[tokio::test]
async fn network_errors_are_retried_with_backoff_then_reported() {
    let setup = setup().await;
    // An ingestion endpoint that hangs up on every connection (the port stays held, so no
    // other test's double can take it).
    let hang_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = hang_up.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((connection, _)) = hang_up.accept().await {
            drop(connection);
        }
    });
    let mut config = config(&setup, json!({"max_attempts": 3}));
    config.endpoint = format!("http://{closed}/").parse().unwrap();
    let sink = AzureMonitorSink::new(config).unwrap();

    let started = Instant::now();
    let error = sink
        .write_batch(&[record(0, 100, false)])
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("gave up after 3 attempts"), "{message}");
    assert!(message.contains("network error"), "{message}");
    // 0.5 s, then 1 s between the three tries.
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    assert_eq!(
        setup.double.token_requests(),
        1,
        "the token is kept meanwhile"
    );
}

#[tokio::test]
async fn the_token_is_reused_across_calls_and_refreshed_after_revocation_and_before_expiry() {
    let setup = setup().await;
    let sink = new_sink(&setup, json!({}));
    let double = &setup.double;
    let batch = |offset: usize| -> Vec<AuditRecord> {
        (offset..offset + 2)
            .map(|i| record(i, 500, false))
            .collect()
    };
    let statuses = |from: usize| -> Vec<u16> {
        double.inner().calls[from..]
            .iter()
            .map(|c| c.status)
            .collect()
    };

    // One token for every call while it is fresh.
    sink.write_batch(&batch(0)).await.unwrap();
    sink.write_batch(&batch(2)).await.unwrap();
    assert_eq!(double.token_requests(), 1);
    let calls = double.inner().calls.clone();
    assert_eq!(calls.len(), 4, "two streams, two batches");
    assert!(
        calls
            .iter()
            .all(|c| c.token == calls[0].token && c.status == 204)
    );

    // A token revoked early: one 401, one new token, the call goes through. The new token is
    // valid 301 s, so the sink keeps it for 1 s (it refreshes 5 minutes before expiry).
    double
        .state
        .token_lifetime_seconds
        .store(301, Ordering::SeqCst);
    double.revoke_tokens();
    sink.write_batch(&batch(4)).await.unwrap();
    assert_eq!(double.token_requests(), 2);
    assert_eq!(statuses(4), [401, 204, 204]);
    let second = double.inner().calls.last().unwrap().token.clone();
    assert_ne!(second, calls[0].token);

    // Past its refresh time the token is replaced before use: no 401 this time.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    sink.write_batch(&batch(6)).await.unwrap();
    assert_eq!(double.token_requests(), 3);
    assert_eq!(statuses(7), [204, 204]);
    let third = double.inner().calls.last().unwrap().token.clone();
    assert_ne!(third, second);
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 8);

    // Past its refresh time with Entra unavailable, the token still valid (for almost five
    // minutes) is used: the write goes through.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    double.fail_tokens(Some(TokenFault::Unavailable));
    sink.write_batch(&batch(8)).await.unwrap();
    assert!(double.token_requests() > 3, "a refresh was tried");
    assert_eq!(double.inner().calls.last().unwrap().token, third);
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 10);
}

/// A client secret rotated in Entra: while the old one is refused the token in hand is used to
/// its end, and once the new secret is at the reference (the file a secret store mounts) it is
/// read again and asked with, without a restart.
#[tokio::test]
async fn a_rotated_client_secret_is_read_again_and_the_current_token_used_meanwhile() {
    let setup = setup().await;
    let double = &setup.double;
    // Tokens valid 301 s: the sink refreshes them after 1 s (5 minutes before expiry).
    double
        .state
        .token_lifetime_seconds
        .store(301, Ordering::SeqCst);
    let sink = new_sink(&setup, json!({}));
    sink.write_batch(&[record(0, 100, false)]).await.unwrap();
    let first = double.inner().calls.last().unwrap().token.clone();

    // Entra now takes only the new secret; the file still holds the old one.
    *double.state.expected_secret.lock().unwrap() = "the-rotated-secret".to_owned();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    sink.write_batch(&[record(1, 100, false)]).await.unwrap();
    assert!(double.token_requests() > 1, "a refresh was tried");
    let calls = double.inner().calls.clone();
    assert!(calls.iter().all(|c| c.token == first && c.status == 204));

    // The new secret arrives at the reference: the next refresh reads it.
    std::fs::write(&setup.secret_path, "the-rotated-secret\n").unwrap();
    sink.write_batch(&[record(2, 100, false)]).await.unwrap();
    let second = double.inner().calls.last().unwrap().token.clone();
    assert_ne!(second, first);
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 3);
}

/// A sink whose token is due for refresh (tokens valid 301 s are refreshed 1 s after they are
/// issued) and still valid for almost five minutes, after one write; the token it holds.
async fn sink_due_for_refresh(setup: &Setup, overrides: Value) -> (AzureMonitorSink, String) {
    let double = &setup.double;
    double
        .state
        .token_lifetime_seconds
        .store(301, Ordering::SeqCst);
    let sink = new_sink(setup, overrides);
    sink.write_batch(&[record(0, 100, false)]).await.unwrap();
    assert_eq!(double.token_requests(), 1);
    let token = double.inner().calls.last().unwrap().token.clone();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    (sink, token)
}

#[tokio::test]
async fn a_throttled_refresh_is_asked_once_and_the_cached_token_used_meanwhile() {
    let setup = setup().await;
    let (sink, held) = sink_due_for_refresh(&setup, json!({})).await;
    let double = &setup.double;
    double.fail_tokens(Some(TokenFault::ThrottleFor(60)));

    for i in 1..5 {
        sink.write_batch(&[record(i, 100, false)]).await.unwrap();
    }
    assert_eq!(
        double.token_requests(),
        2,
        "one refresh, then Entra's Retry-After is honoured"
    );
    // Entra answers again, but the wait it asked for has not passed.
    double.fail_tokens(None);
    sink.write_batch(&[record(5, 100, false)]).await.unwrap();
    assert_eq!(double.token_requests(), 2);
    let calls = double.inner().calls.clone();
    assert!(calls.iter().all(|c| c.token == held && c.status == 204));
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 6);
}

#[tokio::test]
async fn a_hanging_token_endpoint_does_not_hold_up_writes_while_the_token_is_valid() {
    let setup = setup().await;
    // A write's time (2 s) shorter than a hanging token request takes to fail (the 30 s call
    // timeout): the refresh is cut short and the write goes on with the cached token.
    let (sink, held) = sink_due_for_refresh(&setup, json!({"max_write_seconds": 2})).await;
    let double = &setup.double;
    double.fail_tokens(Some(TokenFault::Hang));

    for i in 1..4 {
        tokio::time::timeout(
            Duration::from_secs(20),
            sink.write_batch(&[record(i, 100, false)]),
        )
        .await
        .expect("a write is not held up by the hanging token endpoint")
        .unwrap();
    }
    assert_eq!(
        double.token_requests(),
        2,
        "one refresh tried, none again while it backs off"
    );
    let calls = double.inner().calls.clone();
    assert!(calls.iter().all(|c| c.token == held && c.status == 204));
    assert_eq!(double.stored(DEFAULT_GATEWAY_STREAM).len(), 4);
}

#[tokio::test]
async fn a_call_refused_as_too_large_is_halved_until_it_fits() {
    let setup = setup().await;
    // A stricter endpoint than the sink's own measure: defence in depth.
    setup
        .double
        .state
        .max_body_bytes
        .store(200_000, Ordering::SeqCst);
    let sink = new_sink(&setup, json!({}));
    let records: Vec<AuditRecord> = (0..12).map(|i| record(i, 100_000, false)).collect();

    sink.write_batch(&records).await.unwrap();

    let double = &setup.double;
    let calls = double.inner().calls.clone();
    assert!(calls.iter().any(|c| c.status == 413));
    assert!(
        calls
            .iter()
            .filter(|c| c.status == 204)
            .all(|c| c.json_bytes <= 200_000)
    );
    let gateway = double.stored(DEFAULT_GATEWAY_STREAM);
    let correlation: Vec<&str> = gateway.iter().map(|r| text(r, "CorrelationId")).collect();
    let expected: Vec<&str> = records.iter().map(|r| r.correlation_id.as_str()).collect();
    assert_eq!(correlation, expected, "every row once, in order");
    let llm = double.stored(DEFAULT_LLM_STREAM);
    assert_eq!(
        row_ids(&llm).into_iter().collect::<HashSet<_>>().len(),
        llm.len()
    );
    for record in &records {
        assert_eq!(
            joined(
                &llm_rows_of(&llm, &record.correlation_id),
                "RequestMessages"
            ),
            record.request_messages.as_deref().unwrap()
        );
    }
}

#[tokio::test]
async fn neither_the_client_secret_nor_a_token_appears_in_errors_or_debug_output() {
    // A wrong secret, and a token endpoint that echoes what it received.
    let setup = setup_expecting("another-secret").await;
    setup.double.state.echo.store(true, Ordering::SeqCst);
    let sink = new_sink(&setup, json!({}));
    let error = sink
        .write_batch(&[record(0, 100, false)])
        .await
        .unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("invalid_client"), "{shown}");
    assert!(shown.contains("HTTP 401"), "{shown}");
    assert!(!shown.contains(CLIENT_SECRET), "{shown}");
    assert_eq!(
        setup.double.token_requests(),
        1,
        "a refused secret is not retried"
    );

    // The right secret; the ingestion endpoint echoes the bearer token in its refusals.
    let setup = setup_expecting(CLIENT_SECRET).await;
    setup.double.state.echo.store(true, Ordering::SeqCst);
    let sink = new_sink(&setup, json!({}));
    sink.write_batch(&[record(1, 100, false)]).await.unwrap();
    setup
        .double
        .fail_next(&[Some(Fault::Unauthorized), Some(Fault::Unauthorized)]);
    let error = sink
        .write_batch(&[record(2, 100, false)])
        .await
        .unwrap_err();
    let shown = format!("{error} {error:?}");
    assert!(shown.contains("HTTP 401"), "{shown}");
    let config = config(&setup, json!({}));
    let debug = format!("{sink:?} {config:?}");
    assert!(debug.contains("*****"), "{debug}");
    let tokens = setup.double.issued_tokens();
    assert_eq!(tokens.len(), 2, "one token, then one refresh after the 401");
    for token in &tokens {
        assert!(!shown.contains(token.as_str()), "{shown}");
        assert!(!debug.contains(token.as_str()), "{debug}");
    }
    assert!(!shown.contains(CLIENT_SECRET) && !debug.contains(CLIENT_SECRET));
}

#[tokio::test]
async fn configuration_reads_from_yaml_with_defaults_and_is_checked() {
    let yaml = r#"
endpoint: https://my-dcr-abcd.eastus-1.ingest.monitor.azure.com
dcr_immutable_id: dcr-000a00a000a00000a000000aa000a0aa
credential:
  tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
  client_id: 0f7c1b8e-2a34-4d1e-9f3a-5c6d7e8f9a0b
  client_secret: env:GATEHOUSE_AZURE_MONITOR_SECRET
"#;
    let config: AzureMonitorConfig = serde_yaml_ng::from_str(yaml).unwrap();
    assert_eq!(config.gateway_stream, "Custom-ApiManagementGatewayLogs_CL");
    assert_eq!(config.llm_stream, "Custom-ApiManagementGatewayLlmLog_CL");
    assert!(config.max_batch_bytes < MAX_CALL_BYTES);
    assert_eq!(config.max_attempts, 5);
    assert_eq!(config.max_retry_wait_seconds, 60);
    assert_eq!(config.credential.as_ref().unwrap().authority, None);
    assert_eq!(DEFAULT_AUTHORITY, "https://login.microsoftonline.com");

    // A secret in clear is refused by the reference type itself.
    let clear = yaml.replace("env:GATEHOUSE_AZURE_MONITOR_SECRET", "Zq8~secret");
    let refused = serde_yaml_ng::from_str::<AzureMonitorConfig>(&clear).unwrap_err();
    assert!(!refused.to_string().contains("Zq8~secret"));

    let setup = setup().await;
    let too_big = AzureMonitorSink::new(config_for(
        &setup.double,
        &setup.secret_path,
        json!({"max_batch_bytes": 2_000_000}),
    ))
    .unwrap_err();
    assert!(too_big.to_string().contains("max_batch_bytes"));
    let missing = setup.secret_path.with_file_name("absent");
    let unreadable =
        AzureMonitorSink::new(config_for(&setup.double, &missing, json!({}))).unwrap_err();
    assert!(unreadable.to_string().contains("absent"), "{unreadable}");

    // Without a credential the sink needs an identity to sign in with.
    let mut anonymous = config.clone();
    anonymous.credential = None;
    let refused = AzureMonitorSink::new(anonymous).unwrap_err().to_string();
    assert!(
        refused.contains("credential") && refused.contains("server.entra_credential"),
        "{refused}"
    );
}
