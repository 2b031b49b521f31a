//! An audit sink that writes to Azure Monitor Logs through the Logs Ingestion API.
//!
//! Every record becomes one `ApiManagementGatewayLogs` row and its `ApiManagementGatewayLlmLog`
//! rows (laid out once, in [`crate::rows`]), sent to two streams of one data collection rule (DCR)
//! whose data flows end in the custom tables `ApiManagementGatewayLogs_CL` and
//! `ApiManagementGatewayLlmLog_CL`. The column names are Azure's, so the published KQL works once
//! the table name is changed (`azure-specs.md` §4.2: the API cannot write the built-in tables).
//!
//! Wire formats, as documented:
//! - **Token** — Microsoft identity platform, OAuth 2.0 client credentials grant
//!   (<https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow>):
//!   `POST {authority}/{tenant}/oauth2/v2.0/token` with the form `grant_type=client_credentials`,
//!   `client_id`, `client_secret`, `scope=https://monitor.azure.com//.default`; the answer is
//!   `{"token_type":"Bearer","expires_in":3599,"access_token":"…"}`.
//! - **Upload** — Logs Ingestion API
//!   (<https://learn.microsoft.com/azure/azure-monitor/logs/logs-ingestion-api-overview>):
//!   `POST {endpoint}/dataCollectionRules/{dcr immutable id}/streams/{stream}?api-version=2023-01-01`
//!   with `Authorization: Bearer`, `Content-Type: application/json`, optional
//!   `Content-Encoding: gzip` and `x-ms-client-request-id`; the body is a JSON array of objects
//!   matching the stream declaration. Success is `204 No Content`.
//! - **Limits** — Azure Monitor service limits, "Logs Ingestion API"
//!   (<https://learn.microsoft.com/azure/azure-monitor/fundamentals/service-limits>): at most 1 MB
//!   per call, compressed or uncompressed; field values over 64 KB are truncated; beyond the rate
//!   limits the answer is 429 with `Retry-After`.
//!
//! Delivery is at least once. The API does not de-duplicate, so a row can arrive twice — for
//! instance when a 204 is lost, or when the sink or the queue sends a call again whose answer
//! never came. Every row therefore carries [`ROW_ID_COLUMN`], a deterministic id
//! (`{CorrelationId}:{table}:{SequenceNumber}`) that a query can `distinct` on.
//!
//! # A batch that fails part way
//!
//! A batch takes several calls when it is large. The sink remembers the rows of every call
//! Azure accepted until the whole batch is stored, and skips them when the queue hands it the
//! same records again (after an error, or from its journal): a batch that fails at its tenth
//! call resumes there instead of sending the first nine again, and so always gets through,
//! however often it is interrupted.
//!
//! One write never runs longer than [`AzureMonitorConfig::max_write_seconds`] — below the minute
//! after which the queue abandons a write still running. When retries and waits would take it
//! past that, the sink stops and tells the queue how long Azure asked it to wait
//! ([`SinkError::Busy`]); the queue keeps the records in its journal meanwhile, so neither a long
//! `Retry-After` nor the last one before the tries run out is lost on the way.
//!
//! # Fields longer than Azure keeps
//!
//! Azure truncates a field value over 64 KB without saying so. The sink cuts such values itself
//! so that nothing is cut unannounced: the two bodies are cut and their truncation flags raised
//! (the prompts and completions are whole in the LLM rows, in 32 KB pieces); `Groups` and
//! `Attempts` keep as many leading entries as fit, still valid JSON arrays; other text that comes
//! from the request, the backend's answer or the caller's token (`Method`, `Url`, `UserId`,
//! `UserName`, `EntraTenantId`, `DeploymentName`, `ModelName`, `ApiVersion`, `LastErrorMessage`,
//! `BackendUrl`, and in the LLM rows `DeploymentName`, `ModelName` and `ApiVersion`) is cut on a
//! character boundary. Each cut is logged with the call's correlation id; the SQL store keeps the
//! whole values. The other columns are the gateway's own (ids, addresses, codes, error reasons,
//! chain hashes) or its configuration's (subscription, product, backend id).

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::sync::PoisonError;
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use futures::future::BoxFuture;
use gatehouse_schema::AuditRecord;
use gatehouse_schema::config::{SecretRef, SecretSource};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;
use uuid::Uuid;

use crate::rows::{GatewayLogRow, LlmLogRow, split_at_most};
use crate::{AuditSink, SinkError};

/// The Logs Ingestion API version this sink speaks.
pub const LOGS_INGESTION_API_VERSION: &str = "2023-01-01";

/// The most one ingestion call may carry, in bytes of JSON (the limit holds compressed or
/// uncompressed; the uncompressed size is the larger, so that is what the sink measures). "1 MB" is
/// read as 1,000,000 bytes, the smaller of its two readings.
pub const MAX_CALL_BYTES: usize = 1_000_000;

/// The longest field value Azure stores whole, in UTF-8 bytes ("64 KB", read as 64,000 bytes: a
/// value this sink lets through is never cut by Azure without the truncation flag).
pub const MAX_FIELD_BYTES: usize = 64_000;

/// The column added to every row sent: a deterministic id, the same when a batch is sent again.
pub const ROW_ID_COLUMN: &str = "GatehouseRowId";

/// Default stream for gateway-log rows (its data flow outputs to `ApiManagementGatewayLogs_CL`).
pub const DEFAULT_GATEWAY_STREAM: &str = "Custom-ApiManagementGatewayLogs_CL";

/// Default stream for LLM-log rows (its data flow outputs to `ApiManagementGatewayLlmLog_CL`).
pub const DEFAULT_LLM_STREAM: &str = "Custom-ApiManagementGatewayLlmLog_CL";

/// Default Entra ID authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// The client-credentials scope of Azure Monitor ingestion, as the Logs Ingestion docs spell it
/// (the double slash is theirs: resource `https://monitor.azure.com/` + `/.default`).
const MONITOR_SCOPE: &str = "https://monitor.azure.com//.default";

/// A token is refreshed this long before it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// First wait after a network error or a 5xx without `Retry-After`; doubles with each attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// How much of an error answer goes into an error message.
const MAX_ERROR_TEXT: usize = 512;

/// Most row ids remembered as delivered while a batch is not yet stored whole (a few MB); past it
/// the memory starts again, which at worst sends some rows twice.
const MAX_REMEMBERED_ROWS: usize = 100_000;

/// Table names used in row ids.
const GATEWAY_TABLE: &str = "ApiManagementGatewayLogs";
const LLM_TABLE: &str = "ApiManagementGatewayLlmLog";

/// Where and how the sink writes (`server.audit.azure_monitor` in the gateway's configuration).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureMonitorConfig {
    /// The DCR's logs-ingestion endpoint, or a data collection endpoint (DCE).
    pub endpoint: Url,
    /// The DCR's immutable id (`dcr-…`).
    pub dcr_immutable_id: String,
    /// Stream declared in the DCR for gateway-log rows.
    #[serde(default = "default_gateway_stream")]
    pub gateway_stream: String,
    /// Stream declared in the DCR for LLM-log rows.
    #[serde(default = "default_llm_stream")]
    pub llm_stream: String,
    /// The Entra ID application the sink signs in as (it needs Monitoring Metrics Publisher on
    /// the DCR).
    pub credential: ClientCredentials,
    /// Most bytes of JSON per call; at most [`MAX_CALL_BYTES`]. A single row larger than this
    /// (but within the hard limit) goes alone.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Tries per call (the first included) on 429, 5xx and network errors before the batch fails.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Longest wait between two tries, whatever `Retry-After` says, in seconds.
    #[serde(default = "default_max_retry_wait_seconds")]
    pub max_retry_wait_seconds: u64,
    /// Time limit of one HTTP call, in seconds.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Longest time one batch may take, tries and waits included, in seconds; at most
    /// [`MAX_WRITE_SECONDS`], under the minute after which the audit queue abandons a write. A
    /// batch not stored by then is resumed later, from the first row not yet accepted.
    #[serde(default = "default_max_write_seconds")]
    pub max_write_seconds: u64,
}

/// The most [`AzureMonitorConfig::max_write_seconds`] may be: the audit queue abandons a write
/// still running after a minute at the least.
pub const MAX_WRITE_SECONDS: u64 = 55;

/// Entra ID client credentials (an app registration and one of its client secrets).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentials {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// The client secret, as a reference: `env:NAME` or `file:/path`.
    pub client_secret: SecretRef,
    /// The identity platform's authority, [`DEFAULT_AUTHORITY`] when absent; another cloud's, or
    /// a local double in tests.
    #[serde(default)]
    pub authority: Option<Url>,
}

fn default_gateway_stream() -> String {
    DEFAULT_GATEWAY_STREAM.to_owned()
}

fn default_llm_stream() -> String {
    DEFAULT_LLM_STREAM.to_owned()
}

fn default_max_batch_bytes() -> usize {
    // Headroom under the hard limit, in case Azure counts a few bytes we do not.
    MAX_CALL_BYTES - 50_000
}

fn default_max_attempts() -> u32 {
    5
}

fn default_max_retry_wait_seconds() -> u64 {
    60
}

fn default_timeout_seconds() -> u64 {
    30
}

fn default_max_write_seconds() -> u64 {
    50
}

/// Why the Azure Monitor sink could not start or store a batch. Never contains the client secret
/// or a token.
#[derive(Debug, thiserror::Error)]
pub enum AzureMonitorError {
    /// The configuration cannot work.
    #[error("azure monitor sink: invalid configuration: {0}")]
    Config(String),
    /// The client secret reference could not be resolved.
    #[error("azure monitor sink: client secret `{reference}` could not be read: {reason}")]
    Secret {
        /// The reference (never the secret).
        reference: String,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("azure monitor sink: HTTP client: {0}")]
    Client(reqwest::Error),
    /// Entra ID refused to issue a token.
    #[error("azure monitor sink: Entra ID refused a token (HTTP {status}): {message}")]
    Token {
        /// Status of the token endpoint.
        status: u16,
        /// Its `error` and `error_description`, secrets removed.
        message: String,
    },
    /// The ingestion endpoint refused a call in a way that retrying will not fix.
    #[error("azure monitor sink: stream `{stream}` refused a call (HTTP {status}): {message}")]
    Rejected {
        /// The stream.
        stream: String,
        /// Status answered.
        status: u16,
        /// The answer's text, secrets removed.
        message: String,
    },
    /// Every try of a call failed with a transient error, or the write's time was up.
    #[error(
        "azure monitor sink: stream `{stream}`: gave up after {attempts} attempts; last: {last}"
    )]
    GaveUp {
        /// The stream.
        stream: String,
        /// Tries made.
        attempts: u32,
        /// The last failure.
        last: String,
        /// How long Azure asked to be left alone, or the wait before the next try that did
        /// not fit in the write's time.
        retry_after: Option<Duration>,
    },
    /// One row is larger than a call may carry (cannot happen with the rows this crate builds).
    #[error(
        "azure monitor sink: row `{row_id}` is {bytes} bytes of JSON, more than one call may carry ({MAX_CALL_BYTES})"
    )]
    RowTooLarge {
        /// The row's id.
        row_id: String,
        /// Its size as JSON.
        bytes: usize,
    },
    /// A row could not be encoded.
    #[error("azure monitor sink: a row could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    /// A body could not be compressed.
    #[error("azure monitor sink: compression failed: {0}")]
    Compress(std::io::Error),
}

impl From<AzureMonitorError> for SinkError {
    fn from(error: AzureMonitorError) -> Self {
        match error {
            AzureMonitorError::GaveUp {
                retry_after: Some(retry_after),
                ..
            } => SinkError::Busy {
                reason: error.to_string(),
                retry_after,
            },
            error => SinkError::Io(std::io::Error::other(error)),
        }
    }
}

/// A secret value (client secret or access token): `Debug` prints `*****`.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl Secret {
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// Reads the secret a reference points to; a trailing newline of a file is not part of it.
fn resolve_secret(reference: &SecretRef) -> Result<Secret, AzureMonitorError> {
    let failure = |reason: String| AzureMonitorError::Secret {
        reference: reference.as_str().to_owned(),
        reason,
    };
    let value = match reference.source() {
        SecretSource::Env(name) => std::env::var(name)
            .map_err(|_| failure(format!("environment variable `{name}` is not set")))?,
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|error| failure(error.to_string()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
        SecretSource::KeyVault(_) => {
            return Err(failure(
                "the Azure Monitor sink reads its client secret from `env:` or `file:` only"
                    .to_owned(),
            ));
        }
    };
    if value.is_empty() {
        return Err(failure("it is empty".to_owned()));
    }
    Ok(Secret(value))
}

/// An access token and when to stop using it.
#[derive(Debug)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
    /// When Entra said it expires.
    expires_at: Instant,
}

/// How long before its expiry a cached token is no longer used while its refresh fails.
const TOKEN_EXPIRY_SAFETY: Duration = Duration::from_secs(30);

/// One stream of the DCR and the URL that writes to it.
#[derive(Debug)]
struct Stream {
    name: String,
    url: Url,
}

/// Writes audit records to Azure Monitor Logs (see the module documentation).
#[derive(Debug)]
pub struct AzureMonitorSink {
    config: AzureMonitorConfig,
    client: reqwest::Client,
    client_secret: Secret,
    token_url: Url,
    gateway: Stream,
    llm: Stream,
    token: Mutex<Option<CachedToken>>,
    /// Ids of the rows Azure accepted since the last batch stored whole (see the module
    /// documentation).
    delivered: std::sync::Mutex<HashSet<String>>,
}

impl AzureMonitorSink {
    /// Checks the configuration, reads the client secret and prepares the HTTP client. No call
    /// is made until the first batch.
    pub fn new(config: AzureMonitorConfig) -> Result<Self, AzureMonitorError> {
        let invalid = |what: &str| AzureMonitorError::Config(what.to_owned());
        for (value, name) in [
            (&config.dcr_immutable_id, "dcr_immutable_id"),
            (&config.gateway_stream, "gateway_stream"),
            (&config.llm_stream, "llm_stream"),
            (&config.credential.tenant_id, "credential.tenant_id"),
            (&config.credential.client_id, "credential.client_id"),
        ] {
            if value.is_empty() {
                return Err(AzureMonitorError::Config(format!("{name} is empty")));
            }
        }
        if config.max_batch_bytes < 1024 || config.max_batch_bytes > MAX_CALL_BYTES {
            return Err(AzureMonitorError::Config(format!(
                "max_batch_bytes must be between 1024 and {MAX_CALL_BYTES}"
            )));
        }
        if config.max_attempts == 0 {
            return Err(invalid("max_attempts must be at least 1"));
        }
        if !(1..=MAX_WRITE_SECONDS).contains(&config.max_write_seconds) {
            return Err(AzureMonitorError::Config(format!(
                "max_write_seconds must be between 1 and {MAX_WRITE_SECONDS}"
            )));
        }
        let authority = match &config.credential.authority {
            Some(authority) => authority.clone(),
            None => Url::parse(DEFAULT_AUTHORITY).map_err(|_| invalid("credential.authority"))?,
        };
        let token_url = url_with_segments(
            &authority,
            &[&config.credential.tenant_id, "oauth2", "v2.0", "token"],
        )
        .ok_or_else(|| invalid("credential.authority cannot take a path"))?;
        let stream = |name: &str| -> Result<Stream, AzureMonitorError> {
            let mut url = url_with_segments(
                &config.endpoint,
                &[
                    "dataCollectionRules",
                    &config.dcr_immutable_id,
                    "streams",
                    name,
                ],
            )
            .ok_or_else(|| invalid("endpoint cannot take a path"))?;
            url.query_pairs_mut()
                .append_pair("api-version", LOGS_INGESTION_API_VERSION);
            Ok(Stream {
                name: name.to_owned(),
                url,
            })
        };
        let gateway = stream(&config.gateway_stream)?;
        let llm = stream(&config.llm_stream)?;
        let client_secret = resolve_secret(&config.credential.client_secret)?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_seconds.max(1)))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(AzureMonitorError::Client)?;
        Ok(AzureMonitorSink {
            config,
            client,
            client_secret,
            token_url,
            gateway,
            llm,
            token: Mutex::new(None),
            delivered: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// The configuration the sink runs with.
    pub fn config(&self) -> &AzureMonitorConfig {
        &self.config
    }

    /// Sends the rows Azure has not accepted yet to one stream, in calls of at most
    /// `max_batch_bytes`; a call refused with 413 is halved and sent again (the sink's own
    /// measure should make that impossible). Gives up at `deadline`.
    async fn upload(
        &self,
        stream: &Stream,
        rows: &[EncodedRow],
        deadline: Instant,
    ) -> Result<(), AzureMonitorError> {
        let rows: Vec<&EncodedRow> = {
            let delivered = self
                .delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            rows.iter()
                .filter(|row| !delivered.contains(&row.id))
                .collect()
        };
        let mut pending = pack(&rows, self.config.max_batch_bytes);
        pending.reverse();
        while let Some(call) = pending.pop() {
            match self.post(stream, call, deadline).await {
                Ok(()) => self.remember_delivered(call),
                Err(CallError::TooLarge(_)) if call.len() > 1 => {
                    tracing::warn!(
                        stream = %stream.name,
                        rows = call.len(),
                        bytes = json_array_len(call),
                        "azure monitor refused a call as too large; halving it"
                    );
                    let (first, second) = call.split_at(call.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
                Err(CallError::TooLarge(message)) => {
                    return Err(AzureMonitorError::Rejected {
                        stream: stream.name.clone(),
                        status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                        message,
                    });
                }
                Err(CallError::Failed(error)) => return Err(error),
            }
        }
        Ok(())
    }

    /// Notes the rows of a call Azure accepted, so that a batch sent again skips them.
    fn remember_delivered(&self, call: &[&EncodedRow]) {
        let mut delivered = self
            .delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if delivered.len() + call.len() > MAX_REMEMBERED_ROWS {
            delivered.clear();
        }
        delivered.extend(call.iter().map(|row| row.id.clone()));
    }

    /// One call: retried on 429, 5xx and network errors, with one token refresh on 401/403,
    /// until `deadline`.
    async fn post(
        &self,
        stream: &Stream,
        rows: &[&EncodedRow],
        deadline: Instant,
    ) -> Result<(), CallError> {
        let body = gzip(json_array(rows)).await.map_err(CallError::Failed)?;
        // One id per call, kept across its retries, so that Azure support can follow them.
        let request_id = Uuid::new_v4().to_string();
        let call_timeout = Duration::from_secs(self.config.timeout_seconds.max(1));
        let mut attempt = 0;
        let mut refreshed = false;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.out_of_time(stream, attempt - 1, "no time left".to_owned(), None));
            }
            let token = tokio::time::timeout(left, self.token())
                .await
                .unwrap_or_else(|_| {
                    Err(TokenFailure::Transient {
                        reason: "token endpoint: no answer in the write's time".to_owned(),
                        wait: None,
                    })
                });
            let (last, wait) = match token {
                Err(TokenFailure::Fatal(error)) => return Err(CallError::Failed(error)),
                Err(TokenFailure::Transient { reason, wait }) => (reason, wait),
                Ok(token) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let sent = self
                        .client
                        .post(stream.url.clone())
                        .timeout(call_timeout.min(left.max(Duration::from_millis(1))))
                        .bearer_auth(token.expose())
                        .header(CONTENT_TYPE, "application/json")
                        .header(CONTENT_ENCODING, "gzip")
                        .header("x-ms-client-request-id", &request_id)
                        .body(body.clone())
                        .send()
                        .await;
                    let response = match sent {
                        Ok(response) => response,
                        Err(error) => {
                            let reason = format!("network error: {}", with_causes(&error));
                            self.give_up_or_wait(
                                stream,
                                attempt,
                                &request_id,
                                reason,
                                None,
                                deadline,
                            )
                            .await?;
                            continue;
                        }
                    };
                    let status = response.status();
                    if status.is_success() {
                        return Ok(());
                    }
                    let retry_after = retry_after(response.headers());
                    let message = self.error_text(response, Some(&token)).await;
                    match status {
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if !refreshed => {
                            // A token revoked or expired early: one fresh token, then give up.
                            refreshed = true;
                            self.forget(&token).await;
                            attempt -= 1;
                            continue;
                        }
                        StatusCode::PAYLOAD_TOO_LARGE => return Err(CallError::TooLarge(message)),
                        StatusCode::TOO_MANY_REQUESTS => {}
                        _ if status.is_server_error() => {}
                        _ => {
                            return Err(CallError::Failed(AzureMonitorError::Rejected {
                                stream: stream.name.clone(),
                                status: status.as_u16(),
                                message,
                            }));
                        }
                    }
                    (format!("HTTP {}: {message}", status.as_u16()), retry_after)
                }
            };
            self.give_up_or_wait(stream, attempt, &request_id, last, wait, deadline)
                .await?;
        }
    }

    /// After a transient failure: an error when the tries are spent or the next would start
    /// after `deadline` (carrying the wait Azure asked for, for the queue to keep), else sleeps
    /// until the next.
    async fn give_up_or_wait(
        &self,
        stream: &Stream,
        attempt: u32,
        request_id: &str,
        reason: String,
        retry_after: Option<Duration>,
        deadline: Instant,
    ) -> Result<(), CallError> {
        // The queue is told the wait Azure asked for, whole (it bounds it itself): trying again
        // sooner would only be throttled again.
        if attempt >= self.config.max_attempts {
            return Err(CallError::Failed(AzureMonitorError::GaveUp {
                stream: stream.name.clone(),
                attempts: attempt,
                last: reason,
                retry_after,
            }));
        }
        // Within a write the sink waits at most `max_retry_wait_seconds`; a longer wait asked
        // for is the queue's to keep.
        let cap = Duration::from_secs(self.config.max_retry_wait_seconds);
        let wait = retry_after.unwrap_or_else(|| backoff(attempt));
        if wait > cap || Instant::now() + wait >= deadline {
            return Err(self.out_of_time(stream, attempt, reason, Some(wait)));
        }
        tracing::warn!(
            stream = %stream.name,
            attempt,
            request_id,
            wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            %reason,
            "azure monitor call failed; retrying"
        );
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The error that ends a write whose time is up: the queue tries again after `wait`.
    fn out_of_time(
        &self,
        stream: &Stream,
        attempts: u32,
        last: String,
        wait: Option<Duration>,
    ) -> CallError {
        CallError::Failed(AzureMonitorError::GaveUp {
            stream: stream.name.clone(),
            attempts,
            last: format!(
                "{last} (the write's {} s are up; the rows not yet accepted are sent again later)",
                self.config.max_write_seconds
            ),
            retry_after: Some(wait.unwrap_or(FIRST_BACKOFF)),
        })
    }

    /// The cached token, or a new one when it is missing or due for refresh. A refresh that
    /// fails for a while (Entra throttling or unreachable) leaves the cached token in use until
    /// shortly before it expires: the writes go on meanwhile.
    async fn token(&self) -> Result<Secret, TokenFailure> {
        let mut cached = self.token.lock().await;
        if let Some(current) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(current.token.clone());
        }
        match self.new_token().await {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
            Err(TokenFailure::Transient { reason, wait }) => {
                match cached
                    .as_ref()
                    .filter(|c| Instant::now() + TOKEN_EXPIRY_SAFETY < c.expires_at)
                {
                    Some(current) => {
                        tracing::warn!(%reason, "Azure Monitor: could not refresh the access token; using the current one until it expires");
                        Ok(current.token.clone())
                    }
                    None => Err(TokenFailure::Transient { reason, wait }),
                }
            }
            Err(fatal) => Err(fatal),
        }
    }

    /// A new token from the token endpoint.
    async fn new_token(&self) -> Result<CachedToken, TokenFailure> {
        let issued_at = Instant::now();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.config.credential.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
            ("scope", MONITOR_SCOPE),
        ];
        let response = self
            .client
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|error| TokenFailure::Transient {
                reason: format!("token endpoint: network error: {}", with_causes(&error)),
                wait: None,
            })?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let wait = retry_after(response.headers());
            let message = self.error_text(response, None).await;
            return Err(TokenFailure::Transient {
                reason: format!("token endpoint: HTTP {}: {message}", status.as_u16()),
                wait,
            });
        }
        if !status.is_success() {
            let message = self.error_text(response, None).await;
            return Err(TokenFailure::Fatal(AzureMonitorError::Token {
                status: status.as_u16(),
                message,
            }));
        }
        let answer: TokenResponse =
            response
                .json()
                .await
                .map_err(|error| TokenFailure::Transient {
                    reason: format!("token endpoint: unreadable answer: {error}"),
                    wait: None,
                })?;
        let lifetime = Duration::from_secs(answer.expires_in.seconds());
        Ok(CachedToken {
            token: Secret(answer.access_token),
            refresh_at: issued_at + lifetime.saturating_sub(TOKEN_REFRESH_MARGIN),
            expires_at: issued_at + lifetime,
        })
    }

    /// Drops the cached token if it is still `stale` (another call may have refreshed it).
    async fn forget(&self, stale: &Secret) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == stale) {
            *cached = None;
        }
    }

    /// A short text of an error answer with every secret this sink knows replaced by `*****`
    /// (an endpoint that echoes what it received must not leak it into logs).
    async fn error_text(&self, response: reqwest::Response, token: Option<&Secret>) -> String {
        let mut text = response.text().await.unwrap_or_default();
        for secret in std::iter::once(&self.client_secret).chain(token) {
            text = text.replace(secret.expose(), "*****");
        }
        let text = text.trim();
        match split_at_most(text, MAX_ERROR_TEXT).as_slice() {
            [] => "(no body)".to_owned(),
            [whole] => (*whole).to_owned(),
            [first, ..] => format!("{first}…"),
        }
    }
}

impl AuditSink for AzureMonitorSink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let deadline = Instant::now() + Duration::from_secs(self.config.max_write_seconds);
            let rows = encode_rows(records)?;
            self.upload(&self.gateway, &rows.gateway, deadline).await?;
            self.upload(&self.llm, &rows.llm, deadline).await?;
            // Stored whole: what was remembered is of no more use.
            self.delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "azure_monitor"
    }
}

/// Why one call failed.
enum CallError {
    /// 413: the caller may split the call.
    TooLarge(String),
    /// Anything else that ends the call.
    Failed(AzureMonitorError),
}

/// Why no token could be had.
enum TokenFailure {
    /// Worth another try (network, 429, 5xx).
    Transient {
        reason: String,
        wait: Option<Duration>,
    },
    /// Retrying will not help (wrong secret, unknown client…).
    Fatal(AzureMonitorError),
}

/// The token endpoint's answer. Not `Debug`: it holds the token in clear.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: ExpiresIn,
}

/// `expires_in` is a number in v2.0 answers and was a string in v1.0 ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum ExpiresIn {
    Number(u64),
    Text(String),
}

impl ExpiresIn {
    fn seconds(&self) -> u64 {
        match self {
            ExpiresIn::Number(seconds) => *seconds,
            ExpiresIn::Text(text) => text.trim().parse().unwrap_or(0),
        }
    }
}

/// A row as sent: Azure's columns plus [`ROW_ID_COLUMN`].
#[derive(Serialize)]
struct IngestionRow<'a, R> {
    #[serde(rename = "GatehouseRowId")]
    row_id: &'a str,
    #[serde(flatten)]
    row: &'a R,
}

/// One row as JSON, with its id.
struct EncodedRow {
    id: String,
    json: Vec<u8>,
}

impl AsRef<[u8]> for EncodedRow {
    fn as_ref(&self) -> &[u8] {
        &self.json
    }
}

/// The rows of a batch as JSON objects, one list per stream, in record order.
struct EncodedRows {
    gateway: Vec<EncodedRow>,
    llm: Vec<EncodedRow>,
}

fn encode_rows(records: &[AuditRecord]) -> Result<EncodedRows, AzureMonitorError> {
    let mut gateway = Vec::with_capacity(records.len());
    let mut llm = Vec::new();
    for record in records {
        let mut row = GatewayLogRow::from_record(record);
        cap_long_fields(&mut row);
        let id = row_id(&row.correlation_id, GATEWAY_TABLE, 0);
        gateway.push(encode_row(id, &row)?);
        // Message pieces are at most 32 KB already (`rows::MESSAGE_PIECE_BYTES`).
        for mut row in LlmLogRow::from_record(record) {
            cap_llm_fields(&mut row);
            let id = row_id(&row.correlation_id, LLM_TABLE, row.sequence_number);
            llm.push(encode_row(id, &row)?);
        }
    }
    Ok(EncodedRows { gateway, llm })
}

/// Cuts every field of a gateway-log row that Azure would truncate unannounced (see the module
/// documentation), and logs what was cut.
fn cap_long_fields(row: &mut GatewayLogRow) {
    cap_field(
        &mut row.backend_request_body,
        &mut row.request_body_truncated,
    );
    cap_field(
        &mut row.backend_response_body,
        &mut row.response_body_truncated,
    );
    let mut cut = Vec::new();
    for (name, value) in [("Groups", &mut row.groups), ("Attempts", &mut row.attempts)] {
        if let Some(dropped) = cap_json_array(value) {
            cut.push(format!("{name}: {dropped} trailing entries left out"));
        }
    }
    // The text that comes from the request, the backend's answer or the caller's token. The rest
    // is the gateway's own (ids, addresses, status codes, error reasons) or its configuration's.
    cut.extend(cut_long_texts([
        ("Method", Some(&mut row.method)),
        ("Url", Some(&mut row.url)),
        ("UserId", row.user_id.as_mut()),
        ("UserName", row.user_name.as_mut()),
        ("EntraTenantId", row.entra_tenant_id.as_mut()),
        ("DeploymentName", row.deployment_name.as_mut()),
        ("ModelName", row.model_name.as_mut()),
        ("ApiVersion", row.api_version.as_mut()),
        ("LastErrorMessage", row.last_error_message.as_mut()),
        ("BackendUrl", row.backend_url.as_mut()),
    ]));
    if !cut.is_empty() {
        tracing::warn!(
            correlation_id = %row.correlation_id,
            cut = %cut.join("; "),
            "azure monitor keeps at most 64 KB a field; the whole values are in the call's record only"
        );
    }
}

/// Cuts the texts of an LLM-log row that come from the call or its answer (deployment, model,
/// `api-version`) as [`cap_long_fields`] does. Silently: they are the gateway-log row's values,
/// whose cut is logged.
fn cap_llm_fields(row: &mut LlmLogRow) {
    cut_long_texts([
        ("DeploymentName", Some(&mut row.deployment_name)),
        ("ModelName", Some(&mut row.model_name)),
        ("ApiVersion", Some(&mut row.api_version)),
    ]);
}

/// Cuts each text over [`MAX_FIELD_BYTES`] to it, on a character boundary; says what it cut.
fn cut_long_texts<'a>(
    texts: impl IntoIterator<Item = (&'static str, Option<&'a mut String>)>,
) -> Vec<String> {
    let mut cut = Vec::new();
    for (name, value) in texts {
        if let Some(text) = value.filter(|text| text.len() > MAX_FIELD_BYTES) {
            let length = text.len();
            cut_text(text);
            cut.push(format!("{name}: cut from {length} bytes"));
        }
    }
    cut
}

/// Keeps the leading entries of a JSON array that fit in [`MAX_FIELD_BYTES`]; the number left
/// out, or `None` when the value fits (or is not an array, which the rows never hold).
fn cap_json_array(value: &mut String) -> Option<usize> {
    if value.len() <= MAX_FIELD_BYTES {
        return None;
    }
    let Ok(entries) = serde_json::from_str::<Vec<serde_json::Value>>(value) else {
        cut_text(value);
        return Some(0);
    };
    let mut kept = String::from("[");
    let mut count = 0;
    for entry in &entries {
        let text = entry.to_string();
        let separator = usize::from(count > 0);
        if kept.len() + separator + text.len() + 1 > MAX_FIELD_BYTES {
            break;
        }
        if count > 0 {
            kept.push(',');
        }
        kept.push_str(&text);
        count += 1;
    }
    kept.push(']');
    *value = kept;
    Some(entries.len() - count)
}

/// Cuts text to [`MAX_FIELD_BYTES`] on a character boundary.
fn cut_text(text: &mut String) {
    let kept = split_at_most(text, MAX_FIELD_BYTES)
        .first()
        .map_or(0, |piece| piece.len());
    text.truncate(kept);
}

/// `{CorrelationId}:{table}:{SequenceNumber}`: the same row gets the same id every time it is sent.
fn row_id(correlation_id: &str, table: &str, sequence: i32) -> String {
    format!("{correlation_id}:{table}:{sequence}")
}

fn encode_row<R: Serialize>(id: String, row: &R) -> Result<EncodedRow, AzureMonitorError> {
    let json = serde_json::to_vec(&IngestionRow { row_id: &id, row })?;
    if json_array_len(std::slice::from_ref(&json)) > MAX_CALL_BYTES {
        return Err(AzureMonitorError::RowTooLarge {
            row_id: id,
            bytes: json.len(),
        });
    }
    Ok(EncodedRow { id, json })
}

/// Cuts a value Azure would truncate silently to [`MAX_FIELD_BYTES`] (on a character boundary)
/// and raises its truncation flag.
fn cap_field(value: &mut Option<String>, truncated: &mut bool) {
    if let Some(text) = value.as_mut().filter(|t| t.len() > MAX_FIELD_BYTES) {
        cut_text(text);
        *truncated = true;
    }
}

/// Size of `[row,row,…]`.
fn json_array_len<R: AsRef<[u8]>>(rows: &[R]) -> usize {
    2 + rows.iter().map(|row| row.as_ref().len()).sum::<usize>() + rows.len().saturating_sub(1)
}

fn json_array<R: AsRef<[u8]>>(rows: &[R]) -> Vec<u8> {
    let mut body = Vec::with_capacity(json_array_len(rows));
    body.push(b'[');
    for (index, row) in rows.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(row.as_ref());
    }
    body.push(b']');
    body
}

/// Consecutive runs of rows whose JSON array stays within `limit` bytes; a row that alone
/// exceeds `limit` is a run of its own.
fn pack<R: AsRef<[u8]>>(rows: &[R], limit: usize) -> Vec<&[R]> {
    let mut calls = Vec::new();
    let mut start = 0;
    let mut size = 2;
    for (index, row) in rows.iter().enumerate() {
        let length = row.as_ref().len();
        let added = length + usize::from(index > start);
        if index > start && size + added > limit {
            calls.push(&rows[start..index]);
            start = index;
            size = 2 + length;
        } else {
            size += added;
        }
    }
    if start < rows.len() {
        calls.push(&rows[start..]);
    }
    calls
}

/// Compresses a body off the async threads (a megabyte takes milliseconds).
async fn gzip(json: Vec<u8>) -> Result<Bytes, AzureMonitorError> {
    tokio::task::spawn_blocking(move || {
        let mut encoder = GzEncoder::new(Vec::with_capacity(json.len() / 4), Compression::fast());
        encoder.write_all(&json)?;
        encoder.finish()
    })
    .await
    .map_err(|error| AzureMonitorError::Compress(std::io::Error::other(error)))?
    .map(Bytes::from)
    .map_err(AzureMonitorError::Compress)
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// An error and its causes, `: `-separated (reqwest's own text omits why a connection failed).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Exponential backoff: 0.5 s, 1 s, 2 s, … (capped by the caller).
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(16))
}

/// `base` with `segments` appended to its path (a trailing empty segment dropped first), or
/// `None` for a URL that cannot take a path.
fn url_with_segments(base: &Url, segments: &[&str]) -> Option<Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .ok()?
        .pop_if_empty()
        .extend(segments);
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes.iter().map(|&n| vec![b'x'; n]).collect()
    }

    #[test]
    fn pack_keeps_each_call_within_the_limit_and_in_order() {
        let rows = rows(&[40, 40, 40, 200, 10, 10]);
        let calls = pack(&rows, 100);
        let lens: Vec<usize> = calls.iter().map(|c| c.len()).collect();
        assert_eq!(lens, [2, 1, 1, 2]);
        assert!(calls[0..1].iter().all(|c| json_array_len(c) <= 100));
        assert_eq!(json_array_len(calls[0]), json_array(calls[0]).len());
        assert_eq!(calls.concat(), rows);
        assert!(pack::<Vec<u8>>(&[], 100).is_empty());
    }

    #[test]
    fn long_bodies_are_cut_on_a_character_boundary_and_flagged() {
        let mut body = Some("ü".repeat(40_000));
        let mut truncated = false;
        cap_field(&mut body, &mut truncated);
        let body = body.unwrap();
        assert!(truncated);
        assert_eq!(body.len(), MAX_FIELD_BYTES);
        assert!(body.chars().all(|c| c == 'ü'));

        let mut short = Some("{}".to_owned());
        let mut flag = false;
        cap_field(&mut short, &mut flag);
        assert_eq!((short.as_deref(), flag), (Some("{}"), false));
    }

    #[test]
    fn urls_are_built_from_segments() {
        let base = Url::parse("https://dce.example/").unwrap();
        let url =
            url_with_segments(&base, &["dataCollectionRules", "dcr-1/..", "streams"]).unwrap();
        assert_eq!(
            url.as_str(),
            "https://dce.example/dataCollectionRules/dcr-1%2F../streams"
        );
        assert!(url_with_segments(&Url::parse("mailto:a@b").unwrap(), &["x"]).is_none());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
    }
}
