//! Azure Monitor Log Analytics as a source, through its Query API.
//!
//! Wire format (`shared/reference/azure-specs.md` §4.1; Microsoft's "Query API" reference and
//! "Azure Monitor Log Analytics API response format"):
//! - `POST {endpoint}/v1/workspaces/{workspace id}/query` with `Authorization: Bearer …` and the
//!   JSON body `{"query": KQL, "timespan": ISO 8601 interval}` (applied to the stored
//!   `TimeGenerated`: a range's runs on to now, as a row Azure received days after its call is
//!   stored with the time received, see `stored_timespan`);
//! - the answer is `{"tables": [{"name", "columns": [{"name", "type"}], "rows": [[…]]}]}`; a
//!   non-fatal problem comes as 200 with an additional `"error": {"code": "PartialError",
//!   "message", "details": [{"message", …}]}`, shown to the user as a warning; a fatal one as a
//!   non-2xx status with `{"error": {"code", "message"}}`;
//! - limits: 200 requests per 30 seconds per user or client ([`RateLimiter`] keeps the portal
//!   under it); beyond, 429 with `Retry-After`, which is waited out when short and reported
//!   otherwise.
//!
//! The token comes from the client credentials grant of the Microsoft identity platform
//! (`POST {authority}/{tenant}/oauth2/v2.0/token`, form `grant_type=client_credentials`,
//! `client_id`, `client_secret`, `scope=https://api.loganalytics.io/.default`; the answer
//! `{"access_token", "expires_in", "token_type": "Bearer"}`), cached until five minutes before
//! it expires. Neither the secret nor a token ever appears in an error or a log.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
pub use gatehouse_audit::azure_monitor::ClientCredentials;
use gatehouse_audit::sql::UsagePoint;
use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::kql::{self, KqlCursor};
use super::{
    Answer, AuditSource, CallFull, CallPage, CallRow, ChainCheck, ChainLink, Figures, Granularity,
    InsightsError, ModelTokens, Percentiles, SearchRequest, TimeRange, UsageRequest, UsageTotal,
    merge_warnings,
};

/// The Query API's default endpoint (`api.loganalytics.io` is still served too).
pub const DEFAULT_ENDPOINT: &str = "https://api.loganalytics.azure.com";
/// The Microsoft identity platform.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The scope of a Query API token.
pub const LOG_ANALYTICS_SCOPE: &str = "https://api.loganalytics.io/.default";
/// The documented limit: requests per window.
pub const RATE_LIMIT_REQUESTS: usize = 200;
/// The documented window.
pub const RATE_LIMIT_WINDOW: Duration = Duration::from_secs(30);
/// How far back a call is looked for by id.
pub const CALL_LOOKBACK_DAYS: i64 = 730;

const TOKEN_MARGIN: Duration = Duration::from_secs(300);
const MAX_ERROR_CHARS: usize = 300;
const MIN_SCRUBBED_CHARS: usize = 8;

/// Where the workspace is and how to sign in to it.
#[derive(Debug, Clone)]
pub struct LogAnalyticsSettings {
    /// The workspace id (a GUID).
    pub workspace_id: String,
    /// The app registration (its secret as a reference); `authority` defaults to
    /// [`DEFAULT_AUTHORITY`].
    pub credentials: ClientCredentials,
    /// Query API base URL ([`DEFAULT_ENDPOINT`] when absent; a local double in tests).
    pub endpoint: Option<Url>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Requests allowed per `rate_window` (client side).
    pub rate_limit: usize,
    /// The limiter's window.
    pub rate_window: Duration,
    /// A 429's `Retry-After` up to this long is waited out; longer ones are reported.
    pub max_retry_wait: Duration,
}

impl LogAnalyticsSettings {
    /// Settings with the documented endpoint, authority and limits.
    pub fn new(workspace_id: String, credentials: ClientCredentials) -> LogAnalyticsSettings {
        LogAnalyticsSettings {
            workspace_id,
            credentials,
            endpoint: None,
            timeout: Duration::from_secs(60),
            rate_limit: RATE_LIMIT_REQUESTS,
            rate_window: RATE_LIMIT_WINDOW,
            max_retry_wait: Duration::from_secs(10),
        }
    }
}

/// A client-side sliding-window limiter: at most `limit` acquisitions per `window`.
#[derive(Debug)]
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    sent: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// A limiter of `limit` per `window`.
    pub fn new(limit: usize, window: Duration) -> RateLimiter {
        RateLimiter {
            limit: limit.max(1),
            window,
            sent: Mutex::new(VecDeque::new()),
        }
    }

    /// Waits until one more request fits in the window, and counts it.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut sent = self.sent.lock().await;
                let now = Instant::now();
                while sent
                    .front()
                    .is_some_and(|first| now.duration_since(*first) >= self.window)
                {
                    sent.pop_front();
                }
                if sent.len() < self.limit {
                    sent.push_back(now);
                    return;
                }
                sent.front()
                    .map(|first| self.window.saturating_sub(now.duration_since(*first)))
                    .unwrap_or_default()
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A secret value: `Debug` prints `*****`.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

#[derive(Debug)]
struct CachedToken {
    token: Secret,
    refresh_at: Instant,
}

/// Log Analytics through the Query API (see the module docs).
#[derive(Debug)]
pub struct LogAnalyticsSource {
    client: reqwest::Client,
    query_url: Url,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    token: Mutex<Option<CachedToken>>,
    limiter: RateLimiter,
    max_retry_wait: Duration,
}

fn with_segments(base: &Url, segments: &[&str]) -> Option<Url> {
    let mut url = base.clone();
    {
        let mut path = url.path_segments_mut().ok()?;
        path.pop_if_empty();
        for segment in segments {
            path.push(segment);
        }
    }
    Some(url)
}

/// A table of a Query API answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Table {
    /// `PrimaryResult`, …
    #[serde(default)]
    pub name: String,
    /// Column names and types.
    pub columns: Vec<Column>,
    /// Rows of cells.
    pub rows: Vec<Vec<Value>>,
}

/// A column of a [`Table`].
#[derive(Debug, Clone, Deserialize)]
pub struct Column {
    /// Name.
    pub name: String,
    /// KQL type name.
    #[serde(default, rename = "type")]
    pub kind: String,
}

#[derive(Debug, Deserialize)]
struct QueryAnswer {
    #[serde(default)]
    tables: Vec<Table>,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: ApiError,
}

impl ApiError {
    /// The whole text, to be scrubbed before it is shortened (a cut through a token would leave
    /// a part that no longer matches it).
    fn text(&self) -> String {
        let mut text = format!("{}: {}", self.code, self.message);
        for detail in &self.details {
            if let Some(message) = detail.get("message").and_then(Value::as_str) {
                text.push_str("; ");
                text.push_str(message);
            }
        }
        text
    }
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= MAX_ERROR_CHARS {
        text.to_owned()
    } else {
        let mut short: String = text.chars().take(MAX_ERROR_CHARS).collect();
        short.push('…');
        short
    }
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Value,
}

/// Cells of a table, read by column name, defensively (numbers may come as numbers or text,
/// times as RFC 3339 text).
struct Cells<'a> {
    table: &'a Table,
}

impl<'a> Cells<'a> {
    fn index(&self, name: &str) -> Option<usize> {
        self.table.columns.iter().position(|c| c.name == name)
    }

    fn cell(&self, row: &'a [Value], name: &str) -> Option<&'a Value> {
        self.index(name).and_then(|i| row.get(i))
    }

    fn i64(&self, row: &[Value], name: &str) -> Option<i64> {
        match self.cell(row, name)? {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.round() as i64)),
            Value::String(s) => s
                .parse::<i64>()
                .ok()
                .or_else(|| s.parse::<f64>().ok().map(|f| f.round() as i64)),
            _ => None,
        }
    }

    fn string(&self, row: &[Value], name: &str) -> Option<String> {
        match self.cell(row, name)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    fn bool(&self, row: &[Value], name: &str) -> bool {
        match self.cell(row, name) {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true") || s == "1",
            _ => false,
        }
    }

    fn time(&self, row: &[Value], name: &str) -> Result<OffsetDateTime, InsightsError> {
        let text = self.string(row, name).unwrap_or_default();
        OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).map_err(|_| {
            InsightsError::LogAnalytics(format!("the answer holds an unreadable {name}"))
        })
    }
}

fn first_table(tables: &[Table]) -> Result<&Table, InsightsError> {
    tables
        .iter()
        .find(|t| t.name == "PrimaryResult")
        .or_else(|| tables.first())
        .ok_or_else(|| InsightsError::LogAnalytics("the answer holds no table".to_owned()))
}

fn call_row(cells: &Cells<'_>, row: &[Value]) -> Result<CallRow, InsightsError> {
    Ok(CallRow {
        time_generated: cells.time(row, "TimeGenerated")?,
        correlation_id: cells
            .string(row, "CorrelationId")
            .ok_or_else(|| InsightsError::LogAnalytics("a row lacks CorrelationId".to_owned()))?,
        operation_id: cells.string(row, "OperationId").unwrap_or_default(),
        deployment_name: cells.string(row, "DeploymentName"),
        model_name: cells.string(row, "ModelName"),
        caller_ip_address: cells.string(row, "CallerIpAddress").unwrap_or_default(),
        user_id: cells.string(row, "UserId"),
        user_name: cells.string(row, "UserName"),
        apim_subscription_id: cells.string(row, "ApimSubscriptionId"),
        response_code: cells
            .i64(row, "ResponseCode")
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or_default(),
        total_tokens: cells.i64(row, "TotalTokens"),
        total_time: cells.i64(row, "TotalTime").unwrap_or_default(),
    })
}

/// The Query API's `timespan` for the calls of `range`. The API applies it to the stored
/// `TimeGenerated`, which for a row Azure received more than two days after its call is the time
/// received, while the queries filter on the call's own time (see [`kql`]): the span runs from
/// the range's start to its end or now, whichever is later, so that such a row is still found.
fn stored_timespan(range: &TimeRange) -> String {
    TimeRange {
        from: range.from,
        to: range.to.max(OffsetDateTime::now_utc()),
    }
    .iso_interval()
}

fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(seconds)
}

impl LogAnalyticsSource {
    /// Reads the client secret and prepares the client; no request is made yet.
    pub async fn new(settings: LogAnalyticsSettings) -> Result<LogAnalyticsSource, InsightsError> {
        let config = |message: &str| InsightsError::LogAnalytics(format!("settings: {message}"));
        let workspace = settings.workspace_id.trim();
        if workspace.is_empty()
            || workspace.len() > 64
            || !workspace.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            return Err(config("the workspace id must be a GUID"));
        }
        let tenant = settings.credentials.tenant_id.trim();
        if tenant.is_empty()
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(config("the tenant id must be a GUID or domain name"));
        }
        let secret = crate::secret::resolve(&settings.credentials.client_secret)
            .await
            .map_err(|reason| {
                config(&format!(
                    "client secret {}: {reason}",
                    settings.credentials.client_secret.as_str()
                ))
            })?;
        if secret.is_empty() {
            return Err(config("the client secret is empty"));
        }
        let authority = match &settings.credentials.authority {
            Some(authority) => authority.clone(),
            None => Url::parse(DEFAULT_AUTHORITY).map_err(|_| config("authority"))?,
        };
        let token_url = with_segments(&authority, &[tenant, "oauth2", "v2.0", "token"])
            .ok_or_else(|| config("the authority cannot take a path"))?;
        let endpoint = match &settings.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => Url::parse(DEFAULT_ENDPOINT).map_err(|_| config("endpoint"))?,
        };
        let query_url = with_segments(&endpoint, &["v1", "workspaces", workspace, "query"])
            .ok_or_else(|| config("the endpoint cannot take a path"))?;
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| config(&format!("HTTP client: {e}")))?;
        Ok(LogAnalyticsSource {
            client,
            query_url,
            token_url,
            client_id: settings.credentials.client_id.clone(),
            client_secret: Secret(secret),
            token: Mutex::new(None),
            limiter: RateLimiter::new(settings.rate_limit, settings.rate_window),
            max_retry_wait: settings.max_retry_wait,
        })
    }

    /// Removes the secret and the token from a text that came from the network.
    fn scrub(&self, text: &str, token: Option<&Secret>) -> String {
        let mut text = text.to_owned();
        // Real secrets and tokens are long; a very short one would turn every word into stars.
        for secret in std::iter::once(&self.client_secret).chain(token) {
            if secret.0.len() >= MIN_SCRUBBED_CHARS {
                text = text.replace(&secret.0, "*****");
            }
        }
        text
    }

    async fn token(&self) -> Result<Secret, InsightsError> {
        let mut cached = self.token.lock().await;
        if let Some(current) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(current.token.clone());
        }
        let issued_at = Instant::now();
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.0.as_str()),
            ("scope", LOG_ANALYTICS_SCOPE),
        ];
        let response = self
            .client
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                InsightsError::LogAnalytics(format!(
                    "token endpoint unreachable: {}",
                    self.scrub(&e.to_string(), None)
                ))
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            tracing::warn!(status = status.as_u16(), body = %shorten(&self.scrub(&body, None)), "Entra ID refused a Log Analytics token");
            return Err(InsightsError::LogAnalytics(format!(
                "Entra ID refused a token (HTTP {})",
                status.as_u16()
            )));
        }
        let answer: TokenAnswer = response.json().await.map_err(|_| {
            InsightsError::LogAnalytics("the token endpoint's answer is unreadable".to_owned())
        })?;
        let lifetime = match &answer.expires_in {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(300)
        // At most a day (Entra's tokens live about an hour; an absurd value would overflow).
        .min(24 * 60 * 60);
        let token = Secret(answer.access_token);
        *cached = Some(CachedToken {
            token: token.clone(),
            refresh_at: issued_at + Duration::from_secs(lifetime).saturating_sub(TOKEN_MARGIN),
        });
        Ok(token)
    }

    async fn forget(&self, stale: &Secret) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|c| &c.token == stale) {
            *cached = None;
        }
    }

    /// Runs one query: the tables and the warnings (a `PartialError`'s text).
    pub async fn query(
        &self,
        kql: &str,
        timespan: &str,
    ) -> Result<(Vec<Table>, Vec<String>), InsightsError> {
        let body = serde_json::json!({ "query": kql, "timespan": timespan });
        let mut refreshed = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.limiter.acquire().await;
            let token = self.token().await?;
            let response = self
                .client
                .post(self.query_url.clone())
                .bearer_auth(&token.0)
                .json(&body)
                .send()
                .await
                .map_err(|e| {
                    InsightsError::LogAnalytics(format!(
                        "the Query API is unreachable: {}",
                        self.scrub(&e.to_string(), Some(&token))
                    ))
                })?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let wait = retry_after(&response);
                if wait > self.max_retry_wait || attempts >= 3 {
                    return Err(InsightsError::Throttled(wait.as_secs().max(1)));
                }
                tracing::info!(
                    wait_seconds = wait.as_secs(),
                    "Log Analytics throttled a query"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                self.forget(&token).await;
                continue;
            }
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                let error = serde_json::from_str::<ErrorAnswer>(&text)
                    .map_or(text, |answer| answer.error.text());
                return Err(InsightsError::LogAnalytics(format!(
                    "the query was refused (HTTP {}): {}",
                    status.as_u16(),
                    shorten(&self.scrub(&error, Some(&token)))
                )));
            }
            let answer: QueryAnswer = serde_json::from_str(&text).map_err(|_| {
                InsightsError::LogAnalytics("the Query API's answer is unreadable".to_owned())
            })?;
            let warnings = answer
                .error
                .map(|error| vec![shorten(&self.scrub(&error.text(), Some(&token)))])
                .unwrap_or_default();
            return Ok((answer.tables, warnings));
        }
    }

    async fn figures_of(&self, range: TimeRange) -> Result<Answer<Figures>, InsightsError> {
        let timespan = stored_timespan(&range);
        let (tables, mut warnings) = self.query(&kql::figures(&range), &timespan).await?;
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let mut figures = Figures::default();
        if let Some(row) = table.rows.first() {
            figures.requests = cells.i64(row, "Requests").unwrap_or_default();
            figures.errors = cells.i64(row, "Errors").unwrap_or_default();
            figures.prompt_tokens = cells.i64(row, "PromptTokens").unwrap_or_default();
            figures.completion_tokens = cells.i64(row, "CompletionTokens").unwrap_or_default();
            figures.latency = Percentiles {
                p50_ms: cells.i64(row, "LatencyP50"),
                p95_ms: cells.i64(row, "LatencyP95"),
            };
            figures.time_to_first_token = Percentiles {
                p50_ms: cells.i64(row, "TtftP50"),
                p95_ms: cells.i64(row, "TtftP95"),
            };
        }
        let (tables, more) = self.query(&kql::tokens_by_model(&range), &timespan).await?;
        merge_warnings(&mut warnings, more);
        let table = first_table(&tables)?;
        let cells = Cells { table };
        figures.by_model = table
            .rows
            .iter()
            .filter_map(|row| {
                Some(ModelTokens {
                    model: cells.string(row, "Model")?,
                    requests: cells.i64(row, "Requests").unwrap_or_default(),
                    prompt_tokens: cells.i64(row, "PromptTokens").unwrap_or_default(),
                    completion_tokens: cells.i64(row, "CompletionTokens").unwrap_or_default(),
                })
            })
            .collect();
        Ok(Answer {
            value: figures,
            warnings,
        })
    }

    async fn usage_of(
        &self,
        request: &UsageRequest,
    ) -> Result<Answer<Vec<UsagePoint>>, InsightsError> {
        let (tables, warnings) = self
            .query(&kql::usage(request)?, &stored_timespan(&request.range))
            .await?;
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let points = table
            .rows
            .iter()
            .map(|row| {
                Ok(UsagePoint {
                    bucket: cells.time(row, "Bucket")?,
                    value: cells.string(row, "Value").unwrap_or_default(),
                    requests: cells.i64(row, "Requests").unwrap_or_default(),
                    errors: cells.i64(row, "Errors").unwrap_or_default(),
                    prompt_tokens: cells.i64(row, "PromptTokens").unwrap_or_default(),
                    completion_tokens: cells.i64(row, "CompletionTokens").unwrap_or_default(),
                    total_tokens: cells.i64(row, "TotalTokens").unwrap_or_default(),
                    latency_sum_ms: cells.i64(row, "LatencySumMs").unwrap_or_default(),
                    latency_max_ms: cells.i64(row, "LatencyMaxMs").unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, InsightsError>>()?;
        Ok(Answer {
            value: points,
            warnings,
        })
    }

    async fn usage_totals_of(
        &self,
        request: &UsageRequest,
    ) -> Result<Answer<Vec<UsageTotal>>, InsightsError> {
        let (tables, warnings) = self
            .query(
                &kql::usage_totals(request)?,
                &stored_timespan(&request.range),
            )
            .await?;
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let totals = table
            .rows
            .iter()
            .map(|row| UsageTotal {
                value: cells.string(row, "Value").unwrap_or_default(),
                requests: cells.i64(row, "Requests").unwrap_or_default(),
                errors: cells.i64(row, "Errors").unwrap_or_default(),
                prompt_tokens: cells.i64(row, "PromptTokens").unwrap_or_default(),
                completion_tokens: cells.i64(row, "CompletionTokens").unwrap_or_default(),
                total_tokens: cells.i64(row, "TotalTokens").unwrap_or_default(),
                latency_sum_ms: cells.i64(row, "LatencySumMs").unwrap_or_default(),
            })
            .collect();
        Ok(Answer {
            value: totals,
            warnings,
        })
    }

    async fn search_of(&self, request: &SearchRequest) -> Result<Answer<CallPage>, InsightsError> {
        let limit = request.limit.clamp(1, super::EXPORT_PAGE);
        let (tables, warnings) = self
            .query(
                &kql::search(request, limit + 1)?,
                &stored_timespan(&request.range),
            )
            .await?;
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let mut items = table
            .rows
            .iter()
            .map(|row| call_row(&cells, row))
            .collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = if more {
            items.last().map(|last| {
                KqlCursor {
                    time: last.time_generated,
                    correlation_id: last.correlation_id.clone(),
                }
                .encode()
            })
        } else {
            None
        };
        Ok(Answer {
            value: CallPage { items, next },
            warnings,
        })
    }

    async fn call_of(&self, id: &str) -> Result<Answer<Option<CallFull>>, InsightsError> {
        let now = OffsetDateTime::now_utc();
        // Longer than a page may ask for: a call is looked up by id over the whole retention.
        let timespan = TimeRange {
            from: now - time::Duration::days(CALL_LOOKBACK_DAYS),
            to: now,
        }
        .iso_interval();
        let (tables, mut warnings) = self.query(&kql::call(id)?, &timespan).await?;
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let Some(row) = table.rows.first() else {
            return Ok(Answer {
                value: None,
                warnings,
            });
        };
        let summary = call_row(&cells, row)?;
        let chain = match (
            cells.string(row, "ChainId"),
            cells.i64(row, "ChainSequence"),
            cells.string(row, "RecordHash"),
        ) {
            (Some(chain_id), Some(sequence), Some(record_hash)) => Some(ChainLink {
                chain_id,
                sequence,
                record_hash,
            }),
            _ => None,
        };
        let mut full = CallFull {
            backend_id: cells.string(row, "BackendId"),
            attempts: cells
                .string(row, "Attempts")
                .unwrap_or_else(|| "[]".to_owned()),
            prompt_tokens: cells.i64(row, "PromptTokens"),
            completion_tokens: cells.i64(row, "CompletionTokens"),
            tokens_estimated: cells.bool(row, "TokensEstimated"),
            time_to_first_byte: cells.i64(row, "TimeToFirstByte"),
            time_to_first_token: cells.i64(row, "TimeToFirstToken"),
            request_messages: None,
            response_messages: None,
            request_body: cells.string(row, "BackendRequestBody"),
            response_body: cells.string(row, "BackendResponseBody"),
            request_truncated: cells.bool(row, "RequestBodyTruncated"),
            response_truncated: cells.bool(row, "ResponseBodyTruncated"),
            client_aborted: cells.bool(row, "ClientAborted"),
            chain,
            row: summary,
        };
        let (tables, more) = self.query(&kql::call_pieces(id)?, &timespan).await?;
        merge_warnings(&mut warnings, more);
        let table = first_table(&tables)?;
        let cells = Cells { table };
        let join = |column: &str| {
            let pieces: Vec<String> = table
                .rows
                .iter()
                .filter_map(|row| cells.string(row, column))
                .collect();
            (!pieces.is_empty()).then(|| pieces.concat())
        };
        full.request_messages = join("RequestMessages");
        full.response_messages = join("ResponseMessages");
        Ok(Answer {
            value: Some(full),
            warnings,
        })
    }
}

impl AuditSource for LogAnalyticsSource {
    fn kind(&self) -> &'static str {
        "Log Analytics"
    }

    fn figures(
        &self,
        range: TimeRange,
        _granularity: Granularity,
    ) -> BoxFuture<'_, Result<Answer<Figures>, InsightsError>> {
        self.figures_of(range).boxed()
    }

    fn usage<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsagePoint>>, InsightsError>> {
        self.usage_of(request).boxed()
    }

    fn usage_totals<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsageTotal>>, InsightsError>> {
        self.usage_totals_of(request).boxed()
    }

    fn search<'a>(
        &'a self,
        request: &'a SearchRequest,
    ) -> BoxFuture<'a, Result<Answer<CallPage>, InsightsError>> {
        self.search_of(request).boxed()
    }

    fn call<'a>(
        &'a self,
        correlation_id: &'a str,
    ) -> BoxFuture<'a, Result<Answer<Option<CallFull>>, InsightsError>> {
        self.call_of(correlation_id).boxed()
    }

    fn verify_chain<'a>(
        &'a self,
        call: &'a CallFull,
    ) -> BoxFuture<'a, Result<ChainCheck, InsightsError>> {
        async move {
            Ok(match call.chain {
                None => ChainCheck::NotChained,
                Some(_) => ChainCheck::Unavailable(
                    "chains are verified on the embedded store or the JSON-lines files (gatehouse-audit verify), not over the Query API".to_owned(),
                ),
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_holds_the_window() {
        let limiter = RateLimiter::new(3, Duration::from_millis(300));
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(200));
        limiter.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn cells_are_read_defensively() {
        let table: Table = serde_json::from_value(serde_json::json!({
            "name": "PrimaryResult",
            "columns": [{"name": "A", "type": "long"}, {"name": "B", "type": "real"}, {"name": "C", "type": "string"}, {"name": "D", "type": "bool"}],
            "rows": [[12, 3.6, "7", true], [null, null, "", 0]]
        }))
        .unwrap();
        let cells = Cells { table: &table };
        assert_eq!(cells.i64(&table.rows[0], "A"), Some(12));
        assert_eq!(cells.i64(&table.rows[0], "B"), Some(4));
        assert_eq!(cells.i64(&table.rows[0], "C"), Some(7));
        assert!(cells.bool(&table.rows[0], "D"));
        assert_eq!(cells.i64(&table.rows[1], "A"), None);
        assert_eq!(cells.string(&table.rows[1], "C"), None);
        assert!(!cells.bool(&table.rows[1], "D"));
        assert_eq!(cells.i64(&table.rows[0], "Missing"), None);
    }
}
