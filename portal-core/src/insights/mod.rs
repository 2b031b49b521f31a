//! Usage dashboards and audit search, over one interface with two sources.
//!
//! [`AuditSource`] is what the pages ask: figures for a time range, usage over time split by a
//! dimension, a search with keyset paging, one call in full, and the hash-chain check of a call.
//! Two sources answer it:
//! - [`embedded::EmbeddedSource`]: the audit store the gateway writes (`gatehouse_audit::sql`,
//!   SQLite or PostgreSQL), through its read API and the rollup tables;
//! - [`log_analytics::LogAnalyticsSource`]: Azure Monitor Log Analytics through its Query API,
//!   the same questions rendered as KQL ([`kql`]) against the `…_CL` tables the Azure Monitor sink
//!   writes.
//!
//! [`service::Insights`] puts the role checks and the audit-access log in front of the source;
//! the pages never see which source answers.

pub mod alerts;
pub mod chart;
pub mod csv;
pub mod embedded;
pub mod kql;
pub mod log_analytics;
pub mod service;
pub mod transcript;

use std::fmt;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use gatehouse_audit::sql::StoreError;
pub use gatehouse_audit::sql::UsagePoint;
pub use gatehouse_audit::sql::rollup::{Dimension, Granularity};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

pub use service::{Insights, UsageTotal};

use crate::error::PortalError;

/// The longest time range a page may ask for.
pub const MAX_SPAN_DAYS: i64 = 400;
/// Ranges up to this long use the per-minute rollups, longer ones the hourly ones.
pub const MINUTE_GRANULARITY_UP_TO: Duration = Duration::hours(6);
/// Rows a search page holds at most.
pub const MAX_SEARCH_PAGE: u32 = 200;
/// Rows an export reads per page from the source.
pub const EXPORT_PAGE: u32 = 1_000;
/// Longest filter value accepted (user, model, …).
pub const MAX_FILTER_CHARS: usize = 256;
/// Longest full-text query accepted.
pub const MAX_TEXT_CHARS: usize = 500;
/// The earliest time a range may start: 1970-01-01 UTC.
pub const EARLIEST: OffsetDateTime = time::macros::datetime!(1970-01-01 00:00 UTC);
/// The latest time a range may end: the start of 9999 UTC, so that widening a range to whole
/// buckets, and the times shown beside it, stay inside the years the `time` crate represents.
pub const LATEST: OffsetDateTime = time::macros::datetime!(9999-01-01 00:00 UTC);

/// Why a dashboard or search question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum InsightsError {
    /// Not signed in, or the role does not allow it.
    #[error(transparent)]
    Portal(#[from] PortalError),
    /// The portal has no audit source configured.
    #[error("no audit source is configured on this portal")]
    NotConfigured,
    /// A field of the question is not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// The form field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The embedded store failed.
    #[error("{0}")]
    Store(StoreError),
    /// Log Analytics refused or failed a query (the text holds no secret).
    #[error("Log Analytics: {0}")]
    LogAnalytics(String),
    /// Log Analytics is throttling and asked to wait longer than the portal waits.
    #[error("Log Analytics is throttling queries; try again in {0} seconds")]
    Throttled(u64),
    /// A chart could not be drawn.
    #[error("chart: {0}")]
    Chart(String),
}

impl From<StoreError> for InsightsError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::BadCursor => {
                InsightsError::invalid("cursor", "the page cursor is not valid")
            }
            other => InsightsError::Store(other),
        }
    }
}

impl InsightsError {
    /// An invalid-field error.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        InsightsError::Invalid {
            field,
            message: message.into(),
        }
    }

    /// A message safe to show: internals are logged, never shown.
    pub fn public_message(&self) -> String {
        match self {
            InsightsError::Portal(error) => error.public_message(),
            InsightsError::Store(_) | InsightsError::Chart(_) => {
                tracing::error!(error = %self, "dashboard query failed");
                "internal error; the details are in the portal's log".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The HTTP status that says what happened.
    pub fn status(&self) -> u16 {
        match self {
            InsightsError::Portal(PortalError::NotSignedIn) => 401,
            InsightsError::Portal(PortalError::Forbidden) => 403,
            InsightsError::Portal(PortalError::NotFound(_)) => 404,
            InsightsError::Portal(PortalError::Invalid { .. }) | InsightsError::Invalid { .. } => {
                422
            }
            InsightsError::NotConfigured | InsightsError::Throttled(_) => 503,
            InsightsError::LogAnalytics(_) => 502,
            _ => 500,
        }
    }
}

/// A half-open time range `[from, to)`, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TimeRange {
    /// Inclusive start.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    /// Exclusive end.
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
}

impl TimeRange {
    /// A range; the end must follow the start, the span be at most [`MAX_SPAN_DAYS`], and both
    /// lie between [`EARLIEST`] and [`LATEST`].
    pub fn new(from: OffsetDateTime, to: OffsetDateTime) -> Result<TimeRange, InsightsError> {
        // Compared as instants (whatever their offsets), before anything converts or adds to
        // them: near the end of year 9999 that would panic.
        if from < EARLIEST {
            return Err(InsightsError::invalid(
                "from",
                "a time from 1970-01-01 (UTC) on",
            ));
        }
        if to > LATEST {
            return Err(InsightsError::invalid(
                "to",
                "a time before 9999-01-01 (UTC)",
            ));
        }
        if from >= to {
            return Err(InsightsError::invalid(
                "to",
                "the end must be after the start",
            ));
        }
        if to - from > Duration::days(MAX_SPAN_DAYS) {
            return Err(InsightsError::invalid(
                "from",
                format!("a range of at most {MAX_SPAN_DAYS} days"),
            ));
        }
        Ok(TimeRange {
            from: from.to_offset(time::UtcOffset::UTC),
            to: to.to_offset(time::UtcOffset::UTC),
        })
    }

    /// The last `span` before `now`.
    pub fn last(span: Duration, now: OffsetDateTime) -> Result<TimeRange, InsightsError> {
        let from = now.checked_sub(span).ok_or_else(|| out_of_years("range"))?;
        TimeRange::new(from, now)
    }

    /// Its length.
    pub fn span(&self) -> Duration {
        self.to - self.from
    }

    /// The rollup granularity for this range: minutes up to [`MINUTE_GRANULARITY_UP_TO`], hours
    /// beyond.
    pub fn granularity(&self) -> Granularity {
        if self.span() <= MINUTE_GRANULARITY_UP_TO {
            Granularity::Minute
        } else {
            Granularity::Hour
        }
    }

    /// The range widened to whole buckets of its granularity (rollups hold whole buckets), with
    /// that granularity. A range [`TimeRange::new`] accepted always widens; one built by hand
    /// that ends in the last bucket the `time` crate represents is refused, not a panic.
    pub fn aligned(&self) -> Result<(TimeRange, Granularity), InsightsError> {
        self.aligned_at(self.granularity())
    }

    /// The range widened to whole buckets of `granularity`: for a window that must not reach
    /// further back than it says by more than a minute (an alert's "last `minutes`"), whatever
    /// its length.
    pub fn aligned_at(
        &self,
        granularity: Granularity,
    ) -> Result<(TimeRange, Granularity), InsightsError> {
        let step = match granularity {
            Granularity::Minute => Duration::MINUTE,
            Granularity::Hour => Duration::HOUR,
        };
        let from = granularity.bucket(self.from);
        let end = granularity.bucket(self.to);
        let to = if end == self.to {
            end
        } else {
            end.checked_add(step).ok_or_else(|| out_of_years("to"))?
        };
        Ok((TimeRange { from, to }, granularity))
    }

    /// The range of equal length just before this one (refused, not a panic, for a range built
    /// by hand that starts in the first span the `time` crate represents).
    pub fn previous(&self) -> Result<TimeRange, InsightsError> {
        Ok(TimeRange {
            from: self
                .from
                .checked_sub(self.span())
                .ok_or_else(|| out_of_years("from"))?,
            to: self.from,
        })
    }

    /// The range as an ISO 8601 interval (`start/end`), for Log Analytics' `timespan`.
    pub fn iso_interval(&self) -> String {
        format!("{}/{}", iso_utc(self.from), iso_utc(self.to))
    }
}

fn out_of_years(field: &'static str) -> InsightsError {
    InsightsError::invalid(field, "a range inside the years 1970 to 9998")
}

/// A UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (fixed width, sortable, no untrusted text).
pub fn iso_utc(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// A value with the warnings the source attached to it (Log Analytics' `PartialError`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer<T> {
    /// The answer.
    pub value: T,
    /// Warnings to show beside it.
    pub warnings: Vec<String>,
}

impl<T> Answer<T> {
    /// An answer without warnings.
    pub fn new(value: T) -> Answer<T> {
        Answer {
            value,
            warnings: Vec::new(),
        }
    }

    /// The value, if the source answered in whole; an answer with warnings (Log Analytics'
    /// `PartialError`) is refused with an error that names them. For what has no place to show a
    /// warning beside the figures (a CSV file, a chart opened on its own), which would otherwise
    /// pass a cut-short answer off as a whole one; [`export`] refuses a page answered in part
    /// in the same way.
    pub fn whole(self) -> Result<T, InsightsError> {
        if self.warnings.is_empty() {
            Ok(self.value)
        } else {
            Err(InsightsError::LogAnalytics(format!(
                "answered only in part ({}); refused rather than served with figures missing",
                self.warnings.join("; ")
            )))
        }
    }
}

/// Adds warnings not already present (several queries of one page often share one).
pub fn merge_warnings(warnings: &mut Vec<String>, more: Vec<String>) {
    for warning in more {
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
}

/// The 50th and 95th percentiles of a duration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median, ms.
    pub p50_ms: Option<i64>,
    /// 95th percentile, ms.
    pub p95_ms: Option<i64>,
}

/// Tokens of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelTokens {
    /// Model name as logged.
    pub model: String,
    /// Calls.
    pub requests: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
}

/// The overview's figures for one range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    /// Calls.
    pub requests: i64,
    /// Calls answered with status ≥ 400.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Tokens by model (for the cost estimate).
    pub by_model: Vec<ModelTokens>,
    /// Total time of calls.
    pub latency: Percentiles,
    /// Time to the first byte sent to the client (first token of a stream).
    pub time_to_first_token: Percentiles,
}

/// A usage question.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRequest {
    /// Range (aligned to `granularity`).
    pub range: TimeRange,
    /// Bucket size.
    pub granularity: Granularity,
    /// Split by.
    pub dimension: Dimension,
    /// Only these values (a team lead's groups), when set.
    pub only: Option<Vec<String>>,
}

/// One call in a result list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallRow {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub time_generated: OffsetDateTime,
    /// Request id.
    pub correlation_id: String,
    /// Operation id.
    pub operation_id: String,
    /// Deployment asked for.
    pub deployment_name: Option<String>,
    /// Model that answered.
    pub model_name: Option<String>,
    /// Resolved caller.
    pub caller_ip_address: String,
    /// User object id.
    pub user_id: Option<String>,
    /// User name.
    pub user_name: Option<String>,
    /// Subscription.
    pub apim_subscription_id: Option<String>,
    /// Status sent.
    pub response_code: i32,
    /// Total tokens.
    pub total_tokens: Option<i64>,
    /// Milliseconds in all.
    pub total_time: i64,
}

/// A page of calls, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallPage {
    /// The calls.
    pub items: Vec<CallRow>,
    /// Cursor of the next page, when there may be one.
    pub next: Option<String>,
}

/// A call's place in its hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainLink {
    /// Chain id (`{gateway}/{day}`).
    pub chain_id: String,
    /// Position.
    pub sequence: i64,
    /// The record's hash.
    pub record_hash: String,
}

/// The result of checking a call's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ChainCheck {
    /// The record carries no chain link.
    NotChained,
    /// Every record of the chain verifies.
    Intact {
        /// Records checked.
        records: u64,
    },
    /// The chain does not verify.
    Broken {
        /// Where and why.
        detail: String,
    },
    /// This source cannot verify chains.
    Unavailable(String),
}

/// One call in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallFull {
    /// The list columns.
    pub row: CallRow,
    /// Backend member of the final attempt.
    pub backend_id: Option<String>,
    /// Backend attempts (JSON text).
    pub attempts: String,
    /// Prompt tokens.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens.
    pub completion_tokens: Option<i64>,
    /// Whether the token counts are the gateway's estimate.
    pub tokens_estimated: bool,
    /// Time to first byte, ms.
    pub time_to_first_byte: Option<i64>,
    /// Time to first token, ms: the first generated output sent (none for calls recorded before
    /// Gatehouse kept it, or that sent none).
    pub time_to_first_token: Option<i64>,
    /// The prompt messages (JSON text as captured).
    pub request_messages: Option<String>,
    /// The completion (JSON text as captured).
    pub response_messages: Option<String>,
    /// The request body as captured (`BackendRequestBody`: cut at the capture limit, in Azure
    /// Monitor at 64 KB too), when content retention has not removed it.
    pub request_body: Option<String>,
    /// The response body as captured (`BackendResponseBody`: a stream's answer reassembled as
    /// one object).
    pub response_body: Option<String>,
    /// Request body cut at the capture limit.
    pub request_truncated: bool,
    /// Response body cut at the capture limit.
    pub response_truncated: bool,
    /// The client hung up early.
    pub client_aborted: bool,
    /// The call's chain link, if chained.
    pub chain: Option<ChainLink>,
}

/// The backend member of the last attempt in an attempts JSON array.
pub fn last_backend(attempts: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(attempts).ok()?;
    value
        .as_array()?
        .last()?
        .get("BackendId")?
        .as_str()
        .map(str::to_owned)
}

/// A search, as the form sends it: every field text, empty when unused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SearchForm {
    /// Preset range (`1h`, `24h`, `7d`, `30d`), used when `from`/`to` are empty.
    pub range: String,
    /// Start (`YYYY-MM-DDTHH:MM[:SS]`, UTC, or RFC 3339).
    pub from: String,
    /// End.
    pub to: String,
    /// User object id, name or UPN.
    pub user: String,
    /// Caller address or CIDR.
    pub caller: String,
    /// Model.
    pub model: String,
    /// Deployment.
    pub deployment: String,
    /// Operation id.
    pub operation: String,
    /// Status code.
    pub status: String,
    /// Subscription.
    pub subscription: String,
    /// Words of the prompt or completion.
    pub text: String,
    /// Cursor of the page to show.
    pub cursor: String,
    /// Page size.
    pub limit: String,
}

/// A validated search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SearchRequest {
    /// Range.
    pub range: TimeRange,
    /// User object id, name or UPN (exact).
    pub user: Option<String>,
    /// Caller network.
    pub caller: Option<IpNet>,
    /// Model.
    pub model: Option<String>,
    /// Deployment.
    pub deployment: Option<String>,
    /// Operation id.
    pub operation: Option<String>,
    /// Status.
    pub status: Option<u16>,
    /// Subscription.
    pub subscription: Option<String>,
    /// Words that must all appear in the prompt or the completion.
    pub text: Option<String>,
    /// Page size.
    pub limit: u32,
    /// Continue after this cursor.
    pub cursor: Option<String>,
}

fn no_control(field: &'static str, value: &str) -> Result<(), InsightsError> {
    if value.chars().any(char::is_control) {
        return Err(InsightsError::invalid(
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

/// A trimmed optional filter value of at most `max` characters without control characters.
pub fn filter_value(
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<Option<String>, InsightsError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > max {
        return Err(InsightsError::invalid(
            field,
            format!("at most {max} characters"),
        ));
    }
    no_control(field, value)?;
    Ok(Some(value.to_owned()))
}

/// Parses a time from a form: `YYYY-MM-DDTHH:MM[:SS]` (UTC; what `datetime-local` sends) or
/// RFC 3339.
pub fn parse_time(field: &'static str, text: &str) -> Result<OffsetDateTime, InsightsError> {
    let text = text.trim();
    if let Ok(at) = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339) {
        return Ok(at);
    }
    let with_seconds =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let minutes = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    time::PrimitiveDateTime::parse(text, with_seconds)
        .or_else(|_| time::PrimitiveDateTime::parse(text, minutes))
        .map(time::PrimitiveDateTime::assume_utc)
        .map_err(|_| InsightsError::invalid(field, "a time as YYYY-MM-DDTHH:MM (UTC)"))
}

/// The range a form asks for: `from`/`to` when given, else the preset `range` (default 24 h)
/// ending at `now`.
pub fn parse_range(
    range: &str,
    from: &str,
    to: &str,
    now: OffsetDateTime,
) -> Result<TimeRange, InsightsError> {
    if !from.trim().is_empty() || !to.trim().is_empty() {
        let from = parse_time("from", from)?;
        let to = if to.trim().is_empty() {
            now
        } else {
            parse_time("to", to)?
        };
        return TimeRange::new(from, to);
    }
    let span = match range.trim() {
        "" | "24h" => Duration::hours(24),
        "1h" => Duration::hours(1),
        "6h" => Duration::hours(6),
        "7d" => Duration::days(7),
        "30d" => Duration::days(30),
        _ => {
            return Err(InsightsError::invalid(
                "range",
                "one of 1h, 6h, 24h, 7d, 30d",
            ));
        }
    };
    TimeRange::last(span, now)
}

/// Parses a caller address (`/32` or `/128`) or network.
pub fn parse_caller(text: &str) -> Result<Option<IpNet>, InsightsError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(Some(net.trunc()));
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| Some(IpNet::from(ip)))
        .map_err(|_| InsightsError::invalid("caller", "an IP address or a CIDR network"))
}

impl SearchRequest {
    /// Validates a search form.
    pub fn parse(form: &SearchForm, now: OffsetDateTime) -> Result<SearchRequest, InsightsError> {
        let range = parse_range(&form.range, &form.from, &form.to, now)?;
        let status = match form.status.trim() {
            "" => None,
            text => Some(
                text.parse::<u16>()
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        InsightsError::invalid("status", "an HTTP status, 100 to 599")
                    })?,
            ),
        };
        let limit = match form.limit.trim() {
            "" => 50,
            text => text
                .parse::<u32>()
                .ok()
                .filter(|l| (1..=MAX_SEARCH_PAGE).contains(l))
                .ok_or_else(|| {
                    InsightsError::invalid("limit", format!("1 to {MAX_SEARCH_PAGE} rows"))
                })?,
        };
        Ok(SearchRequest {
            range,
            user: filter_value("user", &form.user, MAX_FILTER_CHARS)?,
            caller: parse_caller(&form.caller)?,
            model: filter_value("model", &form.model, MAX_FILTER_CHARS)?,
            deployment: filter_value("deployment", &form.deployment, MAX_FILTER_CHARS)?,
            operation: filter_value("operation", &form.operation, MAX_FILTER_CHARS)?,
            status,
            subscription: filter_value("subscription", &form.subscription, MAX_FILTER_CHARS)?,
            text: filter_value("text", &form.text, MAX_TEXT_CHARS)?,
            limit,
            cursor: filter_value("cursor", &form.cursor, MAX_FILTER_CHARS)?,
        })
    }
}

/// The source behind the dashboards and the audit search.
pub trait AuditSource: Send + Sync + fmt::Debug {
    /// `embedded (sqlite)`, `embedded (postgres)` or `log analytics`.
    fn kind(&self) -> &'static str;

    /// The overview's figures for `range` (aligned to `granularity`).
    fn figures(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> BoxFuture<'_, Result<Answer<Figures>, InsightsError>>;

    /// Usage over time split by a dimension.
    fn usage<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsagePoint>>, InsightsError>>;

    /// Usage over the whole range of `request`, one total per value (its granularity aside):
    /// for a question that only adds the buckets up (the usage table, the alert rules). By
    /// default the buckets of [`AuditSource::usage`] added up; the embedded store and Log
    /// Analytics ask for the totals themselves (one row per value, however many buckets).
    fn usage_totals<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsageTotal>>, InsightsError>> {
        async move {
            let answer = self.usage(request).await?;
            Ok(Answer {
                value: UsageTotal::sum_by_value(&answer.value),
                warnings: answer.warnings,
            })
        }
        .boxed()
    }

    /// One page of calls matching a search, newest first.
    fn search<'a>(
        &'a self,
        request: &'a SearchRequest,
    ) -> BoxFuture<'a, Result<Answer<CallPage>, InsightsError>>;

    /// One call in full.
    fn call<'a>(
        &'a self,
        correlation_id: &'a str,
    ) -> BoxFuture<'a, Result<Answer<Option<CallFull>>, InsightsError>>;

    /// Verifies the hash chain the call belongs to.
    fn verify_chain<'a>(
        &'a self,
        call: &'a CallFull,
    ) -> BoxFuture<'a, Result<ChainCheck, InsightsError>>;
}

/// Every call matching `request` (its limit and cursor ignored), newest first, read a page at a
/// time from the source, so that memory stays flat whatever the size of the export.
///
/// A page the source answered only in part (a warning beside it: Log Analytics' `PartialError`,
/// e.g. past its row or size limits) ends the export with an error instead of its rows: the
/// export's files (CSV, JSON lines) have no place for a warning that a reader would not take
/// for a row, and their headers are sent before the first page is read, so the error, which
/// breaks off the download, is what keeps a file with rows missing from passing for a whole one.
pub fn export(
    source: Arc<dyn AuditSource>,
    request: SearchRequest,
) -> BoxStream<'static, Result<CallRow, InsightsError>> {
    let first = SearchRequest {
        limit: EXPORT_PAGE,
        cursor: None,
        ..request
    };
    futures::stream::unfold(Some((first, 0_u64)), move |state| {
        let source = Arc::clone(&source);
        async move {
            let (request, exported) = state?;
            match source.search(&request).await {
                Ok(answer) if !answer.warnings.is_empty() => {
                    let error = InsightsError::LogAnalytics(format!(
                        "a page was answered in part after {exported} rows ({}); the export stops here rather than leave rows out",
                        answer.warnings.join("; ")
                    ));
                    Some((futures::stream::iter(vec![Err(error)]), None))
                }
                Ok(answer) => {
                    let exported = exported + answer.value.items.len() as u64;
                    let next = answer.value.next.map(|cursor| {
                        (
                            SearchRequest {
                                cursor: Some(cursor),
                                ..request.clone()
                            },
                            exported,
                        )
                    });
                    let items: Vec<Result<CallRow, InsightsError>> =
                        answer.value.items.into_iter().map(Ok).collect();
                    Some((futures::stream::iter(items), next))
                }
                Err(error) => Some((futures::stream::iter(vec![Err(error)]), None)),
            }
        }
    })
    .flatten()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ranges_align_to_their_granularity_and_have_a_previous_of_equal_length() {
        let range = TimeRange::new(
            datetime!(2026-12-01 10:00:30 UTC),
            datetime!(2026-12-01 11:00:30 UTC),
        )
        .unwrap();
        let (aligned, granularity) = range.aligned().unwrap();
        assert_eq!(granularity, Granularity::Minute);
        assert_eq!(aligned.from, datetime!(2026-12-01 10:00 UTC));
        assert_eq!(aligned.to, datetime!(2026-12-01 11:01 UTC));
        assert_eq!(aligned.previous().unwrap().to, aligned.from);
        assert_eq!(aligned.previous().unwrap().span(), aligned.span());
        let week = TimeRange::last(Duration::days(7), datetime!(2026-12-01 10:20 UTC)).unwrap();
        let (aligned, granularity) = week.aligned().unwrap();
        assert_eq!(granularity, Granularity::Hour);
        assert_eq!(aligned.to, datetime!(2026-12-01 11:00 UTC));
        assert_eq!(
            aligned.iso_interval(),
            "2026-11-24T10:00:00.000000Z/2026-12-01T11:00:00.000000Z"
        );
    }

    #[test]
    fn ranges_at_the_ends_of_the_representable_years_are_refused_not_a_panic() {
        let now = datetime!(2026-12-01 10:00 UTC);
        // Each would panic once widened to whole buckets, shown in UTC or given a previous range.
        for (from, to, field) in [
            ("9999-12-31T23:00", "9999-12-31T23:59:30", "to"),
            ("9999-12-31T23:00", "9999-12-31T23:59", "to"),
            ("9999-12-30T00:00", "9999-12-31T23:59:59", "to"),
            (
                "9999-12-31T20:00:00-05:00",
                "9999-12-31T22:00:00-05:00",
                "to",
            ),
            ("0000-01-01T00:00", "0000-01-02T00:00", "from"),
            (
                "0000-01-01T00:00:00+05:00",
                "0000-01-01T10:00:00+05:00",
                "from",
            ),
            ("1969-12-31T23:00", "1970-01-01T01:00", "from"),
        ] {
            match parse_range("", from, to, now) {
                Err(error @ InsightsError::Invalid { .. }) => {
                    assert_eq!(error.status(), 422, "{from}..{to}");
                    assert!(
                        matches!(error, InsightsError::Invalid { field: f, .. } if f == field),
                        "{from}..{to}: {error}"
                    );
                }
                other => panic!("{from}..{to}: {other:?}"),
            }
        }
        // The last and first ranges accepted widen and have a previous range.
        for (from, to) in [
            ("9998-12-31T23:00", "9999-01-01T00:00"),
            ("9998-12-31T23:00:30", "9998-12-31T23:59:30"),
            ("9998-01-01T00:00", "9998-12-31T23:59:59"),
            ("1970-01-01T00:00", "1970-01-01T00:00:30"),
        ] {
            let range = parse_range("", from, to, now).unwrap();
            let (aligned, _) = range.aligned().unwrap();
            assert!(aligned.to <= LATEST, "{from}..{to}");
            aligned.previous().unwrap();
        }
        // A range built by hand at the very end is refused when widened, not a panic.
        let end = datetime!(9999-12-31 23:59:30 UTC);
        let by_hand = TimeRange {
            from: end - Duration::HOUR,
            to: end,
        };
        assert!(matches!(
            by_hand.aligned(),
            Err(InsightsError::Invalid { field: "to", .. })
        ));
        let start = datetime!(-9999-01-01 00:00:30 UTC);
        let by_hand = TimeRange {
            from: start,
            to: start + Duration::HOUR,
        };
        assert!(matches!(
            by_hand.previous(),
            Err(InsightsError::Invalid { field: "from", .. })
        ));
    }

    #[test]
    fn bad_ranges_and_filters_are_refused_with_the_field_named() {
        let now = datetime!(2026-12-01 10:00 UTC);
        let err = |form: SearchForm| match SearchRequest::parse(&form, now) {
            Err(InsightsError::Invalid { field, .. }) => field,
            _ => "(accepted or another error)",
        };
        assert_eq!(
            err(SearchForm {
                from: "2026-12-02T00:00".into(),
                to: "2026-12-01T00:00".into(),
                ..SearchForm::default()
            }),
            "to"
        );
        assert_eq!(
            err(SearchForm {
                range: "1y".into(),
                ..SearchForm::default()
            }),
            "range"
        );
        assert_eq!(
            err(SearchForm {
                caller: "10.0.0.300".into(),
                ..SearchForm::default()
            }),
            "caller"
        );
        assert_eq!(
            err(SearchForm {
                status: "99".into(),
                ..SearchForm::default()
            }),
            "status"
        );
        assert_eq!(
            err(SearchForm {
                user: "a\nb".into(),
                ..SearchForm::default()
            }),
            "user"
        );
        let ok = SearchRequest::parse(
            &SearchForm {
                caller: "10.1.2.3/8".into(),
                from: "2026-11-30T00:00".into(),
                ..SearchForm::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(ok.caller.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(ok.range.to, now);
        assert_eq!(ok.limit, 50);
    }
}
