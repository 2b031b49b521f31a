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
//!   `{"token_type":"Bearer","expires_in":3599,"access_token":"…"}`. The token is reused until
//!   five minutes before it expires; a refresh that fails leaves it in use until shortly before
//!   then, and Entra is not asked again for a while (see "A token refresh that fails" below).
//!   When Entra refuses the client secret, it is read again from its `env:`/`file:` reference,
//!   so a rotated secret is taken up without a restart. Without `credential`, the token comes
//!   from the identity the sink is given ([`IdentityTokenSource`]: the gateway's own, e.g. a
//!   managed identity) and is cached the same way.
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
//! # Rows sent late
//!
//! Azure Monitor replaces a `TimeGenerated` more than two days before the time it receives the
//! row, or more than a day after it, by the time received ("Standard columns in Azure Monitor
//! Logs", <https://learn.microsoft.com/azure/azure-monitor/logs/log-standard-columns#timegenerated>).
//! The queue's journal keeps records for as long as the endpoint refuses them (a role assignment
//! removed over a weekend is enough), so every row also carries the call's own time in
//! [`CALL_TIME_COLUMN`], which Azure stores as sent; the portal reads a call's time from it, and
//! from `TimeGenerated` for rows written before it existed. A batch holding records more than
//! 47 hours old is logged as a warning, once per batch.
//!
//! # A token refresh that fails
//!
//! While the cached token is still valid, a refresh gets at most a few seconds (never more than
//! half the write's time left), and when it fails — Entra throttling, failing, hanging or
//! refusing the secret — the cached token is used and Entra is not asked again for 30 s, doubling
//! with each failure in a row up to four minutes, and never sooner than the `Retry-After` Entra
//! gave; a secret that changed at its reference ends the wait after a refusal. Once no valid
//! token is left, every call asks Entra, its failure ends the try, and the write retries as it
//! does any transient error.
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
//! Azure truncates a field value over 64 KB without saying so. The documentation does not say
//! whether the value is counted as sent (JSON text, escapes included) or as stored, so the sink
//! counts it as JSON, which is never the smaller: a `"` takes 2 bytes, a control character 6
//! (`\u0001`). It cuts such values itself so that nothing is cut unannounced: the two bodies are
//! cut and their truncation flags raised — a JSON body to JSON that still parses, its longest
//! strings shortened and its numbers (`usage`) and shorter strings (`model`, ids) whole (the prompts and completions are whole in the LLM rows,
//! in 32 KB pieces, a piece whose escapes take it over 64 KB split further); `Groups` and
//! `Attempts` keep as many leading entries as fit, still valid JSON arrays; other text that comes
//! from the request, the backend's answer or the caller's token (`Method`, `Url`, `UserId`,
//! `UserName`, `EntraTenantId`, `DeploymentName`, `ModelName`, `ApiVersion`, `LastErrorMessage`,
//! `BackendUrl`, and in the LLM rows `DeploymentName`, `ModelName` and `ApiVersion`) is cut on a
//! character boundary. Each cut is logged with the call's correlation id; the SQL store keeps the
//! whole values. The other columns are the gateway's own (ids, addresses, codes, error reasons,
//! chain hashes) or its configuration's (subscription, product, backend id).
//!
//! # Rows that must fit in one call
//!
//! A row cannot be split over calls, and a batch is retried until it is stored, so one row too
//! large for a call would hold back every later one. A row over [`MAX_ROW_BYTES`] of JSON has its
//! longest texts shortened, all to one length, until it fits (any text column but its id, time
//! and correlation id; a body's truncation flag is raised), and the cut is logged. Should Azure
//! still refuse a row alone as too large, the sink halves it the same way until Azure takes it;
//! a row that cannot be made small enough is left out with an error in the log and counted
//! ([`AzureMonitorSink::rows_set_aside`]), and the rest of the batch goes on.

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
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
use serde_json::{Map, Value};
use time::OffsetDateTime;
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

/// The longest field value Azure stores whole, in bytes of the value as a JSON string, escapes
/// included and quotes not ("64 KB", read as 64,000 bytes; the JSON form is never shorter than the
/// UTF-8 value, so a value this sink lets through is within the limit however Azure counts it,
/// and never cut by Azure without the truncation flag).
pub const MAX_FIELD_BYTES: usize = 64_000;

/// The most bytes of JSON one row may take: it always goes in one call, with the headroom the
/// default `max_batch_bytes` keeps under [`MAX_CALL_BYTES`] and room for the array's brackets.
/// A longer row has its longest texts shortened (see the module documentation).
pub const MAX_ROW_BYTES: usize = MAX_CALL_BYTES - CALL_HEADROOM - 2;

/// Bytes kept free under [`MAX_CALL_BYTES`] by default, in case Azure counts a few we do not.
const CALL_HEADROOM: usize = 50_000;

/// The column added to every row sent: a deterministic id, the same when a batch is sent again.
pub const ROW_ID_COLUMN: &str = "GatehouseRowId";

/// The column added to every row sent: the call's own time (the row's `TimeGenerated`), which
/// Azure stores as sent even when it replaces `TimeGenerated` by the time it received a row sent
/// late (see the module documentation).
pub const CALL_TIME_COLUMN: &str = "GatehouseTimeGenerated";

/// Age past which a row is about to lose its `TimeGenerated` to Azure's receive time (two days):
/// a batch holding one is logged as a warning.
const LATE_ROW_AGE: time::Duration = time::Duration::hours(47);

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

/// Longest a refresh may take while the cached token is still valid: past it the write goes on
/// with the cached token.
const REFRESH_TIME_LIMIT: Duration = Duration::from_secs(5);

/// How long the cached token is used before Entra is asked again after a refresh failed; doubles
/// with each failure in a row, up to [`MAX_REFRESH_BACKOFF`].
const FIRST_REFRESH_BACKOFF: Duration = Duration::from_secs(30);

/// Longest wait between two refreshes that fail while the cached token is still valid (unless
/// Entra's `Retry-After` asks for more).
const MAX_REFRESH_BACKOFF: Duration = Duration::from_secs(4 * 60);

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
    /// The Entra ID application the sink signs in as with a client secret. Absent: the identity
    /// the sink is given ([`AzureMonitorSink::with_identity`]; in the gateway its own
    /// `server.entra_credential`: a client secret, a certificate or a managed identity). Either
    /// needs the Monitoring Metrics Publisher role on the DCR.
    #[serde(default)]
    pub credential: Option<ClientCredentials>,
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

/// An identity that issues access tokens of its own (the gateway's `server.entra_credential`),
/// for a sink configured without [`AzureMonitorConfig::credential`].
pub trait IdentityTokenSource: Send + Sync + fmt::Debug {
    /// A bearer token for `scope` and how long it stays valid from now. The error never holds a
    /// secret or a token.
    fn token<'a>(
        &'a self,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<IssuedToken, IdentityTokenError>>;
}

/// An access token an [`IdentityTokenSource`] issued.
pub struct IssuedToken {
    /// The bearer token.
    pub token: String,
    /// How long it stays valid from when it was handed over.
    pub valid_for: Duration,
}

/// Why an [`IdentityTokenSource`] gave no token.
#[derive(Debug, Clone)]
pub struct IdentityTokenError {
    /// What failed, without a secret.
    pub message: String,
    /// Whether the token endpoint refused the identity (a missing role, a wrong client id), as
    /// opposed to failing or being out of reach.
    pub refused: bool,
}

/// Who issues the sink's access tokens.
#[derive(Debug)]
enum Issuer {
    /// An app registration, with its client secret (the client credentials grant).
    ClientSecret(Box<AppRegistration>),
    /// The identity the sink was given.
    Identity(std::sync::Arc<dyn IdentityTokenSource>),
}

/// An app registration the sink signs in as, and where.
#[derive(Debug)]
struct AppRegistration {
    credentials: ClientCredentials,
    token_url: Url,
    /// The client secret as last read from its reference: read again when Entra refuses it, so
    /// a secret rotated in its file or variable is taken up without a restart.
    secret: std::sync::RwLock<Secret>,
}

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
    MAX_CALL_BYTES - CALL_HEADROOM
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
    /// The identity the sink was given was refused a token.
    #[error("azure monitor sink: the gateway's identity was refused a token: {0}")]
    Identity(String),
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
    /// One row cannot be made small enough for a call, even with its texts shortened. Never
    /// returned by a write: the row is left out, and this is logged (see the module
    /// documentation).
    #[error(
        "azure monitor sink: row `{row_id}` is {bytes} bytes of JSON and cannot be shortened enough for one call"
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
    /// When Entra is next asked for a new one: five minutes before it expires, then after each
    /// failed refresh when the backoff has passed.
    refresh_at: Instant,
    /// When Entra said it expires.
    expires_at: Instant,
    /// Refreshes that failed in a row since it was issued.
    failed_refreshes: u32,
    /// The last refresh failed because Entra refused the client secret: a new secret at its
    /// reference ends the backoff.
    secret_refused: bool,
}

/// How long before its expiry a cached token is no longer used while its refresh fails.
const TOKEN_EXPIRY_SAFETY: Duration = Duration::from_secs(30);

/// Whether a cached token may still be used at `now` (until [`TOKEN_EXPIRY_SAFETY`] before it
/// expires), its refresh due or not.
fn usable_at(token: &CachedToken, now: Instant) -> bool {
    now + TOKEN_EXPIRY_SAFETY < token.expires_at
}

/// How long the cached token is used before Entra is asked again after `failures` refreshes in
/// a row failed: [`FIRST_REFRESH_BACKOFF`], doubling up to [`MAX_REFRESH_BACKOFF`], and never
/// less than the `Retry-After` Entra gave.
fn refresh_backoff(failures: u32, retry_after: Option<Duration>) -> Duration {
    let grown = FIRST_REFRESH_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_REFRESH_BACKOFF);
    grown.max(retry_after.unwrap_or_default())
}

impl Issuer {
    /// The app registration `credentials`, its token endpoint and its client secret as read now.
    fn client_secret(credentials: &ClientCredentials) -> Result<Issuer, AzureMonitorError> {
        let invalid = |what: &str| AzureMonitorError::Config(what.to_owned());
        for (value, name) in [
            (&credentials.tenant_id, "credential.tenant_id"),
            (&credentials.client_id, "credential.client_id"),
        ] {
            if value.is_empty() {
                return Err(AzureMonitorError::Config(format!("{name} is empty")));
            }
        }
        let authority = match &credentials.authority {
            Some(authority) => authority.clone(),
            None => Url::parse(DEFAULT_AUTHORITY).map_err(|_| invalid("credential.authority"))?,
        };
        let token_url = url_with_segments(
            &authority,
            &[&credentials.tenant_id, "oauth2", "v2.0", "token"],
        )
        .ok_or_else(|| invalid("credential.authority cannot take a path"))?;
        let secret = resolve_secret(&credentials.client_secret)?;
        Ok(Issuer::ClientSecret(Box::new(AppRegistration {
            credentials: credentials.clone(),
            token_url,
            secret: std::sync::RwLock::new(secret),
        })))
    }
}

/// A token from the identity the sink was given, cached as one from the token endpoint is. A
/// refusal is as final as Entra's refusal of a client secret; anything else is tried again.
async fn identity_token(identity: &dyn IdentityTokenSource) -> Result<CachedToken, TokenFailure> {
    let issued_at = Instant::now();
    match identity.token(MONITOR_SCOPE).await {
        Ok(issued) => Ok(CachedToken {
            token: Secret(issued.token),
            refresh_at: issued_at + issued.valid_for.saturating_sub(TOKEN_REFRESH_MARGIN),
            expires_at: issued_at + issued.valid_for,
            failed_refreshes: 0,
            secret_refused: false,
        }),
        Err(error) if error.refused => Err(TokenFailure::Fatal(AzureMonitorError::Identity(
            error.message,
        ))),
        Err(error) => Err(TokenFailure::Transient {
            reason: format!("the gateway's identity: {}", error.message),
            wait: None,
        }),
    }
}

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
    issuer: Issuer,
    gateway: Stream,
    llm: Stream,
    token: Mutex<Option<CachedToken>>,
    /// Ids of the rows Azure accepted since the last batch stored whole (see the module
    /// documentation).
    delivered: std::sync::Mutex<HashSet<String>>,
    /// Rows left out because no shortening made them small enough (see the module documentation).
    set_aside: AtomicU64,
}

impl AzureMonitorSink {
    /// Checks the configuration, reads the client secret and prepares the HTTP client. No call
    /// is made until the first batch. The configuration must name its `credential`.
    pub fn new(config: AzureMonitorConfig) -> Result<Self, AzureMonitorError> {
        Self::build(config, None)
    }

    /// Like [`AzureMonitorSink::new`], signing in with `identity` when the configuration names
    /// no `credential` of its own (one it names is used instead).
    pub fn with_identity(
        config: AzureMonitorConfig,
        identity: std::sync::Arc<dyn IdentityTokenSource>,
    ) -> Result<Self, AzureMonitorError> {
        Self::build(config, Some(identity))
    }

    fn build(
        config: AzureMonitorConfig,
        identity: Option<std::sync::Arc<dyn IdentityTokenSource>>,
    ) -> Result<Self, AzureMonitorError> {
        let invalid = |what: &str| AzureMonitorError::Config(what.to_owned());
        for (value, name) in [
            (&config.dcr_immutable_id, "dcr_immutable_id"),
            (&config.gateway_stream, "gateway_stream"),
            (&config.llm_stream, "llm_stream"),
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
        let issuer = match (&config.credential, identity) {
            (Some(credentials), _) => Issuer::client_secret(credentials)?,
            (None, Some(identity)) => Issuer::Identity(identity),
            (None, None) => {
                return Err(invalid(
                    "credential: name the app registration the sink signs in as (tenant_id, \
                     client_id, client_secret), or give the gateway an identity of its own \
                     (server.entra_credential)",
                ));
            }
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_seconds.max(1)))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(AzureMonitorError::Client)?;
        Ok(AzureMonitorSink {
            config,
            client,
            issuer,
            gateway,
            llm,
            token: Mutex::new(None),
            delivered: std::sync::Mutex::new(HashSet::new()),
            set_aside: AtomicU64::new(0),
        })
    }

    /// The configuration the sink runs with.
    pub fn config(&self) -> &AzureMonitorConfig {
        &self.config
    }

    /// Rows left out of Azure Monitor since the sink started because even shortened they were
    /// too large for one call (each one is also logged as an error).
    pub fn rows_set_aside(&self) -> u64 {
        self.set_aside.load(Ordering::Relaxed)
    }

    /// Sends the rows Azure has not accepted yet to one stream, in calls of at most
    /// `max_batch_bytes`; a call refused with 413 is halved and sent again, and a row refused
    /// alone is shortened (the sink's own measure should make both impossible). Gives up at
    /// `deadline`.
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
                    // Refusing the same row again and again would hold back the whole stream.
                    for row in call {
                        self.send_shortened(stream, row, &message, deadline).await?;
                    }
                }
                Err(CallError::Failed(error)) => return Err(error),
            }
        }
        Ok(())
    }

    /// Sends a row Azure refused alone as too large, its texts shortened to half its size, then
    /// half again, until Azure takes it; a row that cannot be shortened enough is left out with
    /// an error in the log (and remembered as done, so that the batch is not held back by it).
    async fn send_shortened(
        &self,
        stream: &Stream,
        row: &EncodedRow,
        refusal: &str,
        deadline: Instant,
    ) -> Result<(), AzureMonitorError> {
        let mut refusal = refusal.to_owned();
        let mut size = row.json.len();
        loop {
            let (shortened, cut) = match shorten_row(&row.id, &row.json, size / 2) {
                Ok(shortened) => shortened,
                Err(error @ AzureMonitorError::RowTooLarge { .. }) => {
                    self.set_aside.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        stream = %stream.name,
                        row_id = %row.id,
                        bytes = row.json.len(),
                        %refusal,
                        %error,
                        "azure monitor refused a row as too large even shortened; it is left out of Azure Monitor, the rest of the batch goes on"
                    );
                    self.remember_delivered(&[row]);
                    return Ok(());
                }
                Err(error) => return Err(error),
            };
            size = shortened.json.len();
            match self.post(stream, &[&shortened], deadline).await {
                Ok(()) => {
                    tracing::warn!(
                        stream = %stream.name,
                        row_id = %row.id,
                        bytes = row.json.len(),
                        sent_bytes = size,
                        %cut,
                        %refusal,
                        "azure monitor refused a row alone as too large; it was stored with its longest texts shortened"
                    );
                    self.remember_delivered(&[row]);
                    return Ok(());
                }
                Err(CallError::TooLarge(again)) => refusal = again,
                Err(CallError::Failed(error)) => return Err(error),
            }
        }
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
            let token = tokio::time::timeout(left, self.token(deadline))
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
    /// fails (Entra throttling, failing, hanging, or refusing a secret) leaves the cached token in
    /// use until shortly before it expires: the writes go on meanwhile, and the operator has the
    /// token's remaining lifetime to put the new secret in place. While the cached token is
    /// valid, a refresh gets at most [`REFRESH_TIME_LIMIT`] (and half the time left before
    /// `deadline`), and after a failure Entra is not asked again until [`refresh_backoff`] has
    /// passed; a client secret that changed at its reference ends that wait after a refusal.
    async fn token(&self, deadline: Instant) -> Result<Secret, TokenFailure> {
        let mut cached = self.token.lock().await;
        let now = Instant::now();
        if let Some(current) = cached.as_ref().filter(|c| now < c.refresh_at)
            && !(current.secret_refused && self.secret_changed())
        {
            return Ok(current.token.clone());
        }
        let still_valid = cached.as_ref().is_some_and(|c| usable_at(c, now));
        let fresh = if still_valid {
            let limit = REFRESH_TIME_LIMIT.min(deadline.saturating_duration_since(now) / 2);
            tokio::time::timeout(limit, self.new_token())
                .await
                .unwrap_or_else(|_| {
                    Err(TokenFailure::Transient {
                        reason: format!(
                            "token endpoint: no answer within {} ms",
                            limit.as_millis()
                        ),
                        wait: None,
                    })
                })
        } else {
            self.new_token().await
        };
        let failure = match fresh {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cached = Some(fresh);
                return Ok(token);
            }
            Err(failure) => failure,
        };
        let now = Instant::now();
        let Some(current) = cached.as_mut().filter(|c| usable_at(c, now)) else {
            return Err(failure);
        };
        current.failed_refreshes = current.failed_refreshes.saturating_add(1);
        let retry_after = match &failure {
            TokenFailure::Transient { wait, .. } => *wait,
            TokenFailure::Fatal(_) => None,
        };
        let backoff = refresh_backoff(current.failed_refreshes, retry_after);
        let last_use = current
            .expires_at
            .checked_sub(TOKEN_EXPIRY_SAFETY)
            .unwrap_or(now);
        current.refresh_at = (now + backoff).min(last_use);
        current.secret_refused = matches!(failure, TokenFailure::Fatal(_));
        let retry_in_seconds = current.refresh_at.saturating_duration_since(now).as_secs();
        match &failure {
            TokenFailure::Transient { reason, .. } => {
                tracing::warn!(%reason, retry_in_seconds, "Azure Monitor: could not refresh the access token; using the current one until it expires");
            }
            TokenFailure::Fatal(error) => {
                tracing::error!(%error, retry_in_seconds, "Azure Monitor: Entra ID refused to refresh the access token; using the current one until it expires");
            }
        }
        Ok(current.token.clone())
    }

    /// Whether the client secret at its reference differs from the one last read (a rotation
    /// since Entra refused it); never for an identity the sink was given.
    fn secret_changed(&self) -> bool {
        match &self.issuer {
            Issuer::ClientSecret(app) => resolve_secret(&app.credentials.client_secret)
                .is_ok_and(|now| now != *app.secret.read().unwrap_or_else(PoisonError::into_inner)),
            Issuer::Identity(_) => false,
        }
    }

    /// A new token: from the identity the sink was given, or from the token endpoint with the
    /// client secret. When Entra refuses the client secret, the secret is read again from its
    /// reference and, if it changed (a rotation), asked with once more.
    async fn new_token(&self) -> Result<CachedToken, TokenFailure> {
        let app = match &self.issuer {
            Issuer::Identity(identity) => return identity_token(identity.as_ref()).await,
            Issuer::ClientSecret(app) => app.as_ref(),
        };
        let sent = app
            .secret
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match self.token_with(app, &sent).await {
            Err(TokenFailure::Fatal(AzureMonitorError::Token { status, message }))
                if matches!(status, 400 | 401) =>
            {
                let refused = || {
                    TokenFailure::Fatal(AzureMonitorError::Token {
                        status,
                        message: message.clone(),
                    })
                };
                let reread = match resolve_secret(&app.credentials.client_secret) {
                    Ok(secret) => secret,
                    Err(error) => {
                        tracing::warn!(%error, "Azure Monitor: could not read the client secret again after Entra ID refused it");
                        return Err(refused());
                    }
                };
                if reread == sent {
                    return Err(refused());
                }
                tracing::info!(
                    "Azure Monitor: the client secret changed at its reference; asking Entra ID with the new one"
                );
                *app.secret.write().unwrap_or_else(PoisonError::into_inner) = reread.clone();
                self.token_with(app, &reread).await
            }
            other => other,
        }
    }

    /// The client secret as last read, when the sink signs in with one.
    fn current_secret(&self) -> Option<Secret> {
        match &self.issuer {
            Issuer::ClientSecret(app) => Some(
                app.secret
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            ),
            Issuer::Identity(_) => None,
        }
    }

    /// A new token from `app`'s token endpoint, asked for with `secret`.
    async fn token_with(
        &self,
        app: &AppRegistration,
        secret: &Secret,
    ) -> Result<CachedToken, TokenFailure> {
        let issued_at = Instant::now();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", app.credentials.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("scope", MONITOR_SCOPE),
        ];
        let response = self
            .client
            .post(app.token_url.clone())
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
            let message = self.error_text(response, Some(secret)).await;
            return Err(TokenFailure::Transient {
                reason: format!("token endpoint: HTTP {}: {message}", status.as_u16()),
                wait,
            });
        }
        if !status.is_success() {
            let message = self.error_text(response, Some(secret)).await;
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
            failed_refreshes: 0,
            secret_refused: false,
        })
    }

    /// Drops the cached token if it is still `stale` (another call may have refreshed it).
    async fn forget(&self, stale: &Secret) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == stale) {
            *cached = None;
        }
    }

    /// A short text of an error answer with every secret this sink knows, and `sent` (the token
    /// or client secret the call carried), replaced by `*****` (an endpoint that echoes what it
    /// received must not leak it into logs).
    async fn error_text(&self, response: reqwest::Response, sent: Option<&Secret>) -> String {
        let mut text = response.text().await.unwrap_or_default();
        let current = self.current_secret();
        for secret in current.iter().chain(sent) {
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
            warn_of_late_rows(records);
            let rows = encode_rows(records)?;
            self.upload(&self.gateway, &rows.gateway, deadline).await?;
            self.upload(&self.llm, &rows.llm, deadline).await?;
            // Counted when the batch is stored, so once however often it was sent.
            self.set_aside.fetch_add(rows.set_aside, Ordering::Relaxed);
            // Stored whole: its rows need remembering no more. Only its own: the queue may hand
            // a failed batch back in smaller pieces (its journal replays it a chunk at a time),
            // and the rows of the pieces still to come that Azure accepted must still be skipped.
            let mut delivered = self
                .delivered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for row in rows.gateway.iter().chain(&rows.llm) {
                delivered.remove(&row.id);
            }
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "azure_monitor"
    }

    fn rows_left_out(&self) -> u64 {
        self.rows_set_aside()
    }
}

/// Logs a warning, once for the batch, when it holds records more than [`LATE_ROW_AGE`] old:
/// Azure keeps their `TimeGenerated` only when it receives them within two days, and stores the
/// time received otherwise (the call's time stays in [`CALL_TIME_COLUMN`]).
fn warn_of_late_rows(records: &[AuditRecord]) {
    let now = OffsetDateTime::now_utc();
    let late: Vec<OffsetDateTime> = records
        .iter()
        .map(|record| record.time_generated)
        .filter(|time_generated| now - *time_generated > LATE_ROW_AGE)
        .collect();
    let Some(oldest) = late.iter().min() else {
        return;
    };
    tracing::warn!(
        late = late.len(),
        records = records.len(),
        %oldest,
        "azure monitor: the batch holds records more than 47 hours old; Azure stores a TimeGenerated more than two days old as the time it receives the row, the call's own time is kept in GatehouseTimeGenerated"
    );
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

/// A row as sent: Azure's columns plus [`ROW_ID_COLUMN`] and [`CALL_TIME_COLUMN`].
#[derive(Serialize)]
struct IngestionRow<'a, R> {
    #[serde(rename = "GatehouseRowId")]
    row_id: &'a str,
    /// The row's `TimeGenerated` again, which Azure keeps as sent.
    #[serde(rename = "GatehouseTimeGenerated", with = "time::serde::rfc3339")]
    call_time: OffsetDateTime,
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
    /// Rows left out: too large even shortened.
    set_aside: u64,
}

fn encode_rows(records: &[AuditRecord]) -> Result<EncodedRows, AzureMonitorError> {
    let mut rows = EncodedRows {
        gateway: Vec::with_capacity(records.len()),
        llm: Vec::new(),
        set_aside: 0,
    };
    for record in records {
        let mut row = GatewayLogRow::from_record(record);
        cap_long_fields(&mut row);
        let id = row_id(&row.correlation_id, GATEWAY_TABLE, 0);
        let encoded = encode_row(id, row.time_generated, &row);
        rows.keep(encoded, |rows| &mut rows.gateway)?;
        // Message pieces are at most 32 KB (`rows::MESSAGE_PIECE_BYTES`), but may take more as
        // JSON: those are split further, and the rows numbered again in order.
        let pieces = LlmLogRow::from_record(record)
            .into_iter()
            .flat_map(fit_pieces);
        for (sequence, mut row) in pieces.enumerate() {
            row.sequence_number = i32::try_from(sequence).unwrap_or(i32::MAX);
            cap_llm_fields(&mut row);
            let id = row_id(&row.correlation_id, LLM_TABLE, row.sequence_number);
            let encoded = encode_row(id, row.time_generated, &row);
            rows.keep(encoded, |rows| &mut rows.llm)?;
        }
    }
    Ok(rows)
}

impl EncodedRows {
    /// Adds a row to its list; a row too large even shortened is left out with an error in the
    /// log (it would hold back every later batch), any other error ends the batch.
    fn keep(
        &mut self,
        row: Result<EncodedRow, AzureMonitorError>,
        list: impl FnOnce(&mut Self) -> &mut Vec<EncodedRow>,
    ) -> Result<(), AzureMonitorError> {
        match row {
            Ok(row) => list(self).push(row),
            Err(error @ AzureMonitorError::RowTooLarge { .. }) => {
                self.set_aside += 1;
                tracing::error!(%error, "azure monitor: a row is left out of Azure Monitor, the rest of the batch goes on");
            }
            Err(error) => return Err(error),
        }
        Ok(())
    }
}

/// A message row whose piece takes more than [`MAX_FIELD_BYTES`] as JSON (a 32 KB piece of
/// quotes or control characters) as several rows with smaller pieces, in order; any other row as
/// it is.
fn fit_pieces(mut row: LlmLogRow) -> Vec<LlmLogRow> {
    let too_long = |piece: &Option<String>| {
        piece
            .as_deref()
            .is_some_and(|piece| json_len(piece) > MAX_FIELD_BYTES)
    };
    if !too_long(&row.request_messages) && !too_long(&row.response_messages) {
        return vec![row];
    }
    let request = row.request_messages.take().unwrap_or_default();
    let response = row.response_messages.take().unwrap_or_default();
    let mut rows = Vec::new();
    for piece in split_json_at_most(&request, MAX_FIELD_BYTES) {
        rows.push(LlmLogRow {
            request_messages: Some(piece.to_owned()),
            ..row.clone()
        });
    }
    for piece in split_json_at_most(&response, MAX_FIELD_BYTES) {
        rows.push(LlmLogRow {
            response_messages: Some(piece.to_owned()),
            ..row.clone()
        });
    }
    rows
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
        if let Some(dropped) = cap_json_array(value, MAX_FIELD_BYTES) {
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

/// Cuts each text over [`MAX_FIELD_BYTES`] as JSON to it, on a character boundary; says what it
/// cut.
fn cut_long_texts<'a>(
    texts: impl IntoIterator<Item = (&'static str, Option<&'a mut String>)>,
) -> Vec<String> {
    let mut cut = Vec::new();
    for (name, value) in texts {
        if let Some(text) = value.filter(|text| json_len(text) > MAX_FIELD_BYTES) {
            let length = text.len();
            cut_text(text, MAX_FIELD_BYTES);
            cut.push(format!("{name}: cut from {length} bytes"));
        }
    }
    cut
}

/// Keeps the leading entries of a JSON array that fit in `limit` bytes as JSON text; the number
/// left out, or `None` when the value fits (or is not an array, which the rows never hold).
fn cap_json_array(value: &mut String, limit: usize) -> Option<usize> {
    if json_len(value) <= limit {
        return None;
    }
    let Ok(entries) = serde_json::from_str::<Vec<Value>>(value) else {
        cut_text(value, limit);
        return Some(0);
    };
    let mut kept = String::from("[");
    // The brackets, then each entry and its comma, as they will be escaped.
    let mut size = 2;
    let mut count = 0;
    for entry in &entries {
        let text = entry.to_string();
        let added = json_len(&text) + usize::from(count > 0);
        if size + added > limit {
            break;
        }
        if count > 0 {
            kept.push(',');
        }
        kept.push_str(&text);
        size += added;
        count += 1;
    }
    kept.push(']');
    *value = kept;
    Some(entries.len() - count)
}

/// Cuts text on a character boundary to the longest start that takes at most `limit` bytes as
/// JSON.
fn cut_text(text: &mut String, limit: usize) {
    let kept = json_prefix_len(text, limit);
    text.truncate(kept);
}

/// Bytes a text takes inside a JSON string as `serde_json` writes it, quotes excluded: `"`, `\`
/// and the short escapes (`\n`…) take 2, the other control characters 6 (`\u0001`), every other
/// byte 1 (characters beyond ASCII are written as they are).
fn json_len(text: &str) -> usize {
    text.bytes().map(escaped_len).sum()
}

/// Bytes one byte of UTF-8 takes in a JSON string (see [`json_len`]).
fn escaped_len(byte: u8) -> usize {
    match byte {
        b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 2,
        0x00..=0x1f => 6,
        _ => 1,
    }
}

/// Length in bytes of the longest start of `text`, ending on a character boundary, that takes at
/// most `limit` bytes as JSON.
fn json_prefix_len(text: &str, limit: usize) -> usize {
    prefix_len_within(text, limit, escaped_len)
}

/// Length in bytes of the longest start of `text`, ending on a character boundary, whose
/// characters take at most `limit` bytes when an ASCII byte takes `ascii_width` of it (its
/// escape) and any other character its UTF-8 length.
fn prefix_len_within(text: &str, limit: usize, ascii_width: fn(u8) -> usize) -> usize {
    let mut size = 0;
    for (index, character) in text.char_indices() {
        // Only ASCII is escaped; other characters are written as their UTF-8.
        let width = if character.is_ascii() {
            ascii_width(character as u8)
        } else {
            character.len_utf8()
        };
        if size + width > limit {
            return index;
        }
        size += width;
    }
    text.len()
}

/// Splits text into pieces (at least one character each) that take at most `limit` bytes as
/// JSON, on character boundaries.
fn split_json_at_most(text: &str, limit: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        // 6 bytes hold any character's JSON form.
        let (piece, tail) = rest.split_at(json_prefix_len(rest, limit.max(6)));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// `{CorrelationId}:{table}:{SequenceNumber}`: the same row gets the same id every time it is sent.
fn row_id(correlation_id: &str, table: &str, sequence: i32) -> String {
    format!("{correlation_id}:{table}:{sequence}")
}

/// A row as JSON, with its id and its call's time, shortened to [`MAX_ROW_BYTES`] when it is
/// longer.
fn encode_row<R: Serialize>(
    id: String,
    call_time: OffsetDateTime,
    row: &R,
) -> Result<EncodedRow, AzureMonitorError> {
    let json = serde_json::to_vec(&IngestionRow {
        row_id: &id,
        call_time,
        row,
    })?;
    if json.len() <= MAX_ROW_BYTES {
        return Ok(EncodedRow { id, json });
    }
    let (shortened, cut) = shorten_row(&id, &json, MAX_ROW_BYTES)?;
    tracing::warn!(
        row_id = %id,
        bytes = json.len(),
        sent_bytes = shortened.json.len(),
        %cut,
        "azure monitor takes at most 1 MB a call; the row's longest texts were shortened, the whole values are in the call's record only"
    );
    Ok(shortened)
}

/// Columns a row is never shortened in: they identify it.
const IDENTITY_COLUMNS: [&str; 4] = [
    ROW_ID_COLUMN,
    "CorrelationId",
    "TimeGenerated",
    CALL_TIME_COLUMN,
];

/// Columns holding a JSON array, shortened by whole entries so that they stay one.
const ARRAY_COLUMNS: [&str; 2] = ["Groups", "Attempts"];

/// The body columns and the flag raised when one is cut.
const BODY_FLAGS: [(&str, &str); 2] = [
    ("BackendRequestBody", "RequestBodyTruncated"),
    ("BackendResponseBody", "ResponseBodyTruncated"),
];

/// A row (as JSON) with its longest texts shortened, all to one length, until it takes at most
/// `budget` bytes, and what was cut; [`AzureMonitorError::RowTooLarge`] when no shortening gets
/// it there.
fn shorten_row(
    id: &str,
    json: &[u8],
    budget: usize,
) -> Result<(EncodedRow, String), AzureMonitorError> {
    let mut row: Map<String, Value> = serde_json::from_slice(json)?;
    let mut cut = Vec::new();
    let mut shortened = json.to_vec();
    while shortened.len() > budget {
        let size = shortened.len();
        let lengths: Vec<(String, usize)> = row
            .iter()
            .filter(|(column, _)| !IDENTITY_COLUMNS.contains(&column.as_str()))
            .filter_map(|(column, value)| Some((column.clone(), json_len(value.as_str()?))))
            .collect();
        let level = water_level(lengths.iter().map(|(_, length)| *length), size - budget);
        for (column, length) in lengths.into_iter().filter(|(_, length)| *length > level) {
            if let Some(Value::String(text)) = row.get_mut(&column) {
                if ARRAY_COLUMNS.contains(&column.as_str()) {
                    cap_json_array(text, level);
                } else {
                    cut_text(text, level);
                }
            }
            if let Some((_, flag)) = BODY_FLAGS.iter().find(|(body, _)| *body == column) {
                row.insert((*flag).to_owned(), Value::Bool(true));
            }
            cut.push(format!("{column}: {length} bytes of JSON, cut to {level}"));
        }
        let shorter = serde_json::to_vec(&row)?;
        if shorter.len() >= size {
            // Nothing left to take but the row's identity, numbers and empty texts.
            return Err(AzureMonitorError::RowTooLarge {
                row_id: id.to_owned(),
                bytes: json.len(),
            });
        }
        shortened = shorter;
    }
    let row = EncodedRow {
        id: id.to_owned(),
        json: shortened,
    };
    Ok((row, cut.join("; ")))
}

/// The greatest length that, with every longer text cut to it, takes `excess` bytes or more off
/// `lengths` (0 when even cutting them all does not).
fn water_level(lengths: impl Iterator<Item = usize> + Clone, excess: usize) -> usize {
    let taken = |level: usize| {
        lengths
            .clone()
            .map(|length| length.saturating_sub(level))
            .sum::<usize>()
    };
    let (mut low, mut high) = (0, lengths.clone().max().unwrap_or(0));
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if taken(middle) >= excess {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    low
}

/// Cuts a body Azure would truncate silently to [`MAX_FIELD_BYTES`] as JSON and raises its
/// truncation flag: a body that is JSON keeps being JSON ([`fit_json`]), so that a query parsing
/// it (`parse_json(BackendResponseBody).usage`) still reads its numbers and short strings; any
/// other is cut on a character boundary.
fn cap_field(value: &mut Option<String>, truncated: &mut bool) {
    if let Some(text) = value
        .as_mut()
        .filter(|text| json_len(text) > MAX_FIELD_BYTES)
    {
        match fit_json(text, MAX_FIELD_BYTES) {
            Some(fitted) => *text = fitted,
            None => cut_text(text, MAX_FIELD_BYTES),
        }
        *truncated = true;
    }
}

/// `text`, a JSON document, with its longest strings cut (every one longer than a level to that
/// level, on a character boundary) so that it takes at most `limit` bytes as a JSON string:
/// still JSON with its members (in key order), numbers and shorter strings whole — a chat
/// completion keeps its `usage`, `model` and ids, its message's content is cut. The level is the
/// highest that takes enough off ([`water_level`] over what each string takes in the row: one
/// pass, then one serialization). `None` when `text` is not JSON, or does not fit with every
/// string emptied (a long array of numbers).
fn fit_json(text: &str, limit: usize) -> Option<String> {
    let document: Value = serde_json::from_str(text).ok()?;
    let whole = serde_json::to_string(&document).ok()?;
    let size = json_len(&whole);
    if size <= limit {
        return Some(whole);
    }
    let mut lengths = Vec::new();
    string_lengths(&document, &mut lengths);
    let mut level = water_level(lengths.iter().copied(), size - limit);
    loop {
        let mut cut = document.clone();
        shorten_strings(&mut cut, level);
        let fitted = serde_json::to_string(&cut).ok()?;
        if json_len(&fitted) <= limit {
            return Some(fitted);
        }
        // Cutting to the level takes at least what it must off; lower it should that not hold.
        if level == 0 {
            return None;
        }
        level -= level / 16 + 1;
    }
}

/// Bytes a string inside a JSON document takes in the row, quotes excluded: written by
/// `serde_json` into the document (`"` and `\` as two bytes, the short escapes as two, other
/// control characters as six), then the document escaped again as the row's text ([`json_len`]).
fn sent_len(text: &str) -> usize {
    text.bytes().map(sent_byte_len).sum()
}

fn sent_byte_len(byte: u8) -> usize {
    match byte {
        // `\"` → `\\\"`, `\\` → `\\\\`
        b'"' | b'\\' => 4,
        // `\n` → `\\n`
        0x08 | b'\t' | b'\n' | 0x0c | b'\r' => 3,
        // `\u0001` → `\\u0001`
        0x00..=0x1f => 7,
        _ => 1,
    }
}

/// Cuts every string in `value` (not the keys) that takes more than `level` bytes in the row
/// ([`sent_len`]) to at most that, on a character boundary.
fn shorten_strings(value: &mut Value, level: usize) {
    match value {
        Value::String(text) if sent_len(text) > level => {
            let kept = prefix_len_within(text, level, sent_byte_len);
            text.truncate(kept);
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| shorten_strings(item, level)),
        Value::Object(members) => members
            .values_mut()
            .for_each(|member| shorten_strings(member, level)),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
    }
}

/// What each string in `value` (not the keys) takes in the row ([`sent_len`]).
fn string_lengths(value: &Value, lengths: &mut Vec<usize>) {
    match value {
        Value::String(text) => lengths.push(sent_len(text)),
        Value::Array(items) => items.iter().for_each(|item| string_lengths(item, lengths)),
        Value::Object(members) => members
            .values()
            .for_each(|member| string_lengths(member, lengths)),
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
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
    use serde_json::json;

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

    /// A JSON body over the limit as [`cap_field`] sends it: flagged, within the limit and close
    /// to it (only as much cut as needed), and still JSON.
    fn fitted(body: String) -> Value {
        let mut body = Some(body);
        let mut truncated = false;
        cap_field(&mut body, &mut truncated);
        let body = body.unwrap();
        assert!(truncated);
        let sent = json_len(&body);
        assert!(
            sent <= MAX_FIELD_BYTES && sent > MAX_FIELD_BYTES - 100,
            "{sent}"
        );
        serde_json::from_str(&body).unwrap()
    }

    /// A long streamed answer's reassembled completion: cut, it still parses, with its usage,
    /// model and id whole and its content cut to fit.
    #[test]
    fn a_long_json_body_is_cut_to_json_that_keeps_its_usage() {
        let content = "Line \"one\"\n".repeat(20_000);
        let completion = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 40_000, "total_tokens": 40_012},
        });
        let parsed = fitted(completion.to_string());
        assert_eq!(parsed["usage"], completion["usage"]);
        assert_eq!(parsed["model"], "gpt-4o-2024-08-06");
        assert_eq!(parsed["id"], "chatcmpl-1");
        assert_eq!(parsed["choices"][0]["message"]["role"], "assistant");
        let kept = parsed["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!kept.is_empty() && content.starts_with(kept));

        // Control characters, quotes and text beyond ASCII, in strings of several lengths.
        let strings: Vec<String> = (1..40)
            .map(|i| format!("{}\u{1}\"é東{}", "x".repeat(i * 97), "\\".repeat(i * 13)))
            .collect();
        let parsed = fitted(serde_json::json!({"items": strings, "n": 7}).to_string());
        assert_eq!(parsed["n"], 7);
        for (kept, whole) in parsed["items"].as_array().unwrap().iter().zip(&strings) {
            assert!(whole.starts_with(kept.as_str().unwrap()));
        }

        // JSON that cannot fit however its strings are cut: cut as text.
        let numbers = serde_json::to_string(&vec![0.123_456_f64; 20_000]).unwrap();
        let mut body = Some(numbers);
        let mut truncated = false;
        cap_field(&mut body, &mut truncated);
        assert!(truncated);
        assert_eq!(json_len(body.as_deref().unwrap()), MAX_FIELD_BYTES);
    }

    /// The JSON string form of `text` without its quotes, as serde_json writes it.
    fn as_json(text: &str) -> String {
        let quoted = serde_json::to_string(text).unwrap();
        quoted[1..quoted.len() - 1].to_owned()
    }

    #[test]
    fn json_len_counts_escapes_as_serde_json_writes_them() {
        let every_ascii: String = (0u8..128).map(char::from).collect();
        for text in [
            "",
            "plain",
            "\"quoted\" \\ back",
            "\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}",
            "Grüße — 東京 🦀 \u{2028}",
            every_ascii.as_str(),
        ] {
            assert_eq!(json_len(text), as_json(text).len(), "{text:?}");
        }
    }

    #[test]
    fn texts_are_cut_so_that_their_json_fits_and_no_character_is_split() {
        let unit = "a\u{1}ü\"€\n🦀\\";
        let whole = unit.repeat(20_000);
        for limit in [0, 1, 5, 6, 7, 100, 1_001, MAX_FIELD_BYTES] {
            let mut text = whole.clone();
            cut_text(&mut text, limit);
            assert!(whole.starts_with(&text));
            assert!(json_len(&text) <= limit, "limit {limit}");
            assert_eq!(as_json(&text).len(), json_len(&text));
            // The longest such start: the next character would not fit.
            let next = whole[text.len()..].chars().next().unwrap();
            assert!(json_len(&whole[..text.len() + next.len_utf8()]) > limit);
        }
        // 70,000 control characters: 420,000 bytes as JSON, cut to 10,666 of them.
        let mut control = "\u{1}".repeat(70_000);
        cut_text(&mut control, MAX_FIELD_BYTES);
        assert_eq!(control.len(), MAX_FIELD_BYTES / 6);
        assert!(as_json(&control).len() <= MAX_FIELD_BYTES);

        let pieces = split_json_at_most(&whole, 1_000);
        assert_eq!(pieces.concat(), whole);
        assert!(pieces.iter().all(|p| !p.is_empty() && json_len(p) <= 1_000));
        assert!(split_json_at_most("", 10).is_empty());
        assert_eq!(split_json_at_most("\u{1}\u{1}", 0), ["\u{1}", "\u{1}"]);
    }

    #[test]
    fn a_message_piece_over_the_field_limit_as_json_is_split_further() {
        let piece = "\u{1}ü".repeat(crate::rows::MESSAGE_PIECE_BYTES / 3);
        let row = LlmLogRow {
            time_generated: time::OffsetDateTime::UNIX_EPOCH,
            correlation_id: "c".to_owned(),
            operation_name: "chatcompletions_create".to_owned(),
            deployment_name: String::new(),
            model_name: String::new(),
            api_version: "2024-10-21".to_owned(),
            is_stream_completion: false,
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            sequence_number: 3,
            request_messages: Some(piece.clone()),
            response_messages: None,
        };
        let rows = fit_pieces(row.clone());
        assert!(rows.len() > 1);
        let joined: String = rows
            .iter()
            .map(|r| r.request_messages.as_deref().unwrap())
            .collect();
        assert_eq!(joined, piece);
        assert!(rows.iter().all(|r| {
            r.response_messages.is_none()
                && json_len(r.request_messages.as_deref().unwrap()) <= MAX_FIELD_BYTES
        }));
        let short = LlmLogRow {
            request_messages: Some("[\"hi\"]".to_owned()),
            ..row
        };
        assert_eq!(fit_pieces(short.clone()), [short]);
    }

    #[test]
    fn a_row_over_its_budget_has_its_longest_texts_shortened_alike() {
        let row = json!({
            "GatehouseRowId": "c:ApiManagementGatewayLogs:0",
            "CorrelationId": "c",
            "TimeGenerated": "2026-12-01T10:00:00Z",
            "ResponseCode": 200,
            "ModelName": "\u{1}".repeat(20_000),
            "UserName": "\"".repeat(30_000),
            "Url": "/short",
            "BackendRequestBody": "b".repeat(50_000),
            "RequestBodyTruncated": false,
            "Groups": serde_json::to_string(&vec!["group"; 10_000]).unwrap(),
            "UserId": null,
        });
        let json = serde_json::to_vec(&row).unwrap();
        let (shortened, cut) = shorten_row("c:ApiManagementGatewayLogs:0", &json, 100_000).unwrap();
        assert!(shortened.json.len() <= 100_000);
        assert!(shortened.json.len() > 95_000, "no more is cut than needed");
        assert!(cut.contains("ModelName") && !cut.contains("Url"));
        let row: Value = serde_json::from_slice(&shortened.json).unwrap();
        assert_eq!(row["CorrelationId"], "c");
        assert_eq!(row["ResponseCode"], 200);
        assert_eq!(row["Url"], "/short");
        assert_eq!(row["RequestBodyTruncated"], true);
        let groups: Vec<String> = serde_json::from_str(row["Groups"].as_str().unwrap()).unwrap();
        assert!(!groups.is_empty() && groups.len() < 10_000);
        // The longest texts were brought to about one length.
        let lengths: Vec<usize> = ["ModelName", "UserName", "BackendRequestBody", "Groups"]
            .iter()
            .map(|c| json_len(row[c].as_str().unwrap()))
            .collect();
        let (low, high) = (lengths.iter().min().unwrap(), lengths.iter().max().unwrap());
        assert!(high - low <= 10, "{lengths:?}");

        // Too small a budget even for the row's identity.
        assert!(matches!(
            shorten_row("c:ApiManagementGatewayLogs:0", &json, 100),
            Err(AzureMonitorError::RowTooLarge { .. })
        ));
        assert_eq!(water_level([10, 50, 30].into_iter(), 25), 27);
        assert_eq!(water_level([10, 50, 30].into_iter(), 1_000), 0);
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
    fn a_failed_refresh_waits_longer_each_time_and_never_less_than_retry_after() {
        assert_eq!(refresh_backoff(1, None), Duration::from_secs(30));
        assert_eq!(refresh_backoff(2, None), Duration::from_secs(60));
        assert_eq!(refresh_backoff(4, None), Duration::from_secs(240));
        assert_eq!(refresh_backoff(u32::MAX, None), MAX_REFRESH_BACKOFF);
        let asked = |seconds| refresh_backoff(1, Some(Duration::from_secs(seconds)));
        assert_eq!(asked(60), Duration::from_secs(60));
        assert_eq!(asked(5), FIRST_REFRESH_BACKOFF);
        assert_eq!(asked(3_600), Duration::from_secs(3_600));
    }

    #[test]
    fn every_row_carries_its_calls_time_in_a_column_of_its_own() {
        let at = time::macros::datetime!(2026-12-01 10:00:00.123456 UTC);
        let row = json!({"TimeGenerated": "2026-12-01T10:00:00.123456Z", "CorrelationId": "c"});
        let encoded = encode_row("c:ApiManagementGatewayLogs:0".to_owned(), at, &row).unwrap();
        let sent: Value = serde_json::from_slice(&encoded.json).unwrap();
        assert_eq!(sent[CALL_TIME_COLUMN], sent["TimeGenerated"]);
        assert_eq!(sent[ROW_ID_COLUMN], "c:ApiManagementGatewayLogs:0");
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
