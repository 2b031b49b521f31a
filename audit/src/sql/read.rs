//! The read API for the portal: search with keyset paging, one call in full, usage over time,
//! and a streaming export.

use futures::{Stream, StreamExt};
use ipnet::IpNet;
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use super::rollup::{Dimension, Granularity};
use super::{
    Engine, SqlStore, StoreError, full_text, ipv4_keys_left_out, net_key_range, search_blocks,
    sqlite_time,
};

/// Largest page a search returns.
pub const MAX_PAGE: u32 = 1_000;

/// What to look for. Every filter is optional except the time range.
#[derive(Debug, Clone)]
pub struct SearchFilter {
    /// Inclusive start.
    pub from: OffsetDateTime,
    /// Exclusive end.
    pub to: OffsetDateTime,
    /// User object id, name or UPN (exact).
    pub user: Option<String>,
    /// Caller address or network (a single address is a /32 or /128).
    pub caller: Option<IpNet>,
    /// Model that answered.
    pub model: Option<String>,
    /// Deployment asked for.
    pub deployment: Option<String>,
    /// Operation id.
    pub operation: Option<String>,
    /// Status sent.
    pub status: Option<u16>,
    /// Subscription.
    pub subscription: Option<String>,
    /// Words that must all appear in the prompt or the completion. On SQLite, a full-text search
    /// without a user, subscription or narrow-network filter lists its calls newest stored first
    /// (which differs from newest first only for calls recorded late, e.g. replayed from the
    /// journal), so that it can stop at the end of the page.
    pub text: Option<String>,
    /// Page size (at most [`MAX_PAGE`]).
    pub limit: u32,
    /// Continue after this cursor (from a previous [`Page`]).
    pub cursor: Option<Cursor>,
}

impl SearchFilter {
    /// A filter for a time range with nothing else set and a page of 50.
    pub fn between(from: OffsetDateTime, to: OffsetDateTime) -> SearchFilter {
        SearchFilter {
            from,
            to,
            user: None,
            caller: None,
            model: None,
            deployment: None,
            operation: None,
            status: None,
            subscription: None,
            text: None,
            limit: 50,
            cursor: None,
        }
    }
}

/// A position in a newest-first listing: (time, record id) of the last row of a page, and which
/// order the listing ran in. Most searches list by time; a SQLite full-text search led by its
/// index lists newest stored first (by record id, which a call replayed late from the journal
/// puts out of time order), so a cursor of one order is refused by a search of the other, where
/// it would skip or repeat calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    time: OffsetDateTime,
    record_id: i64,
    by_record: bool,
}

impl Cursor {
    /// The cursor as an opaque token for URLs.
    pub fn encode(&self) -> String {
        let micros = self.time.unix_timestamp_nanos() / 1_000;
        let order = if self.by_record { "r" } else { "" };
        format!("{order}{micros}_{}", self.record_id)
    }

    /// Parses a token from [`Cursor::encode`]. A time outside the years 1 to 9999 is no record's
    /// and is refused as a bad cursor (PostgreSQL would refuse it as out of range, an error of
    /// the store rather than of the request).
    pub fn decode(token: &str) -> Result<Cursor, StoreError> {
        let (by_record, token) = match token.strip_prefix('r') {
            Some(rest) => (true, rest),
            None => (false, token),
        };
        let (micros, id) = token.split_once('_').ok_or(StoreError::BadCursor)?;
        let micros: i128 = micros.parse().map_err(|_| StoreError::BadCursor)?;
        let record_id: i64 = id.parse().map_err(|_| StoreError::BadCursor)?;
        let nanos = micros.checked_mul(1_000).ok_or(StoreError::BadCursor)?;
        let time =
            OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| StoreError::BadCursor)?;
        if !(1..=9999).contains(&time.year()) {
            return Err(StoreError::BadCursor);
        }
        Ok(Cursor {
            time,
            record_id,
            by_record,
        })
    }
}

/// One call in a result list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallSummary {
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
    #[serde(skip)]
    record_id: i64,
}

/// A page of results, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    /// The calls.
    pub items: Vec<CallSummary>,
    /// Token for the next page, when there may be one.
    pub next: Option<String>,
}

/// One call in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CallDetail {
    /// The summary columns.
    pub summary: CallSummary,
    /// Backend attempts (JSON).
    pub attempts: String,
    /// Prompt tokens.
    pub prompt_tokens: Option<i64>,
    /// Completion tokens.
    pub completion_tokens: Option<i64>,
    /// Whether token counts are estimates.
    pub tokens_estimated: bool,
    /// Time to first byte, ms.
    pub time_to_first_byte: Option<i64>,
    /// Time to first token, ms (see `AuditRecord::time_to_first_token`).
    pub time_to_first_token: Option<i64>,
    /// Request body (None once content retention removed it).
    pub backend_request_body: Option<String>,
    /// Response body.
    pub backend_response_body: Option<String>,
    /// Prompt, reassembled from the LLM log pieces.
    pub request_messages: Option<String>,
    /// Completion, reassembled.
    pub response_messages: Option<String>,
    /// Truncation flags (request, response).
    pub truncated: (bool, bool),
    /// Client hung up early.
    pub client_aborted: bool,
    /// Hash-chain position and hash.
    pub chain: Option<(String, i64, String)>,
}

/// A usage question for the rollups.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// Bucket size.
    pub granularity: Granularity,
    /// Split by.
    pub dimension: Dimension,
    /// Inclusive start.
    pub from: OffsetDateTime,
    /// Exclusive end.
    pub to: OffsetDateTime,
    /// Only these values (a team lead's groups), when set.
    pub only: Option<Vec<String>>,
}

/// One bucket of one dimension value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct UsagePoint {
    /// Bucket start.
    #[serde(with = "time::serde::rfc3339")]
    pub bucket: OffsetDateTime,
    /// Dimension value.
    pub value: String,
    /// Calls.
    pub requests: i64,
    /// Calls with status ≥ 400.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Total tokens.
    pub total_tokens: i64,
    /// Sum of latencies, ms.
    pub latency_sum_ms: i64,
    /// Largest latency, ms.
    pub latency_max_ms: i64,
}

/// Turns free text into an FTS5 query of quoted terms (all must match), so that no FTS syntax
/// from the user is interpreted.
fn fts5_terms(text: &str) -> Option<String> {
    let terms: Vec<String> = text
        .split_whitespace()
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

fn parse_sqlite_time(text: &str) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

/// The summary columns of the calls table `l`.
macro_rules! sqlite_summary_columns {
    () => {
        "SELECT l.RecordId, l.TimeGenerated, l.CorrelationId, l.OperationId, l.DeploymentName, l.ModelName, l.CallerIpAddress, l.UserId, l.UserName, l.ApimSubscriptionId, l.ResponseCode, l.TotalTokens, l.TotalTime"
    };
}
const SQLITE_SUMMARY: &str = concat!(
    sqlite_summary_columns!(),
    " FROM GatehouseGatewayLogs l WHERE l.TimeGenerated >= "
);
const POSTGRES_SUMMARY: &str = r#"SELECT l."RecordId", l."TimeGenerated", l."CorrelationId", l."OperationId", l."DeploymentName", l."ModelName", l."CallerIpAddress", l."UserId", l."UserName", l."ApimSubscriptionId", l."ResponseCode", l."TotalTokens", l."TotalTime" FROM "GatehouseGatewayLogs" l WHERE l."TimeGenerated" >= "#;

/// Builds a [`CallSummary`] from a row of the summary SELECTs (same column order on both engines);
/// `$time` decodes column 1 the engine's way.
macro_rules! summary_from_row {
    ($row:expr, $time:expr) => {{
        let time = $time;
        let row = &$row;
        CallSummary {
            record_id: row.try_get(0)?,
            time_generated: time,
            correlation_id: row.try_get(2)?,
            operation_id: row.try_get(3)?,
            deployment_name: row.try_get(4)?,
            model_name: row.try_get(5)?,
            caller_ip_address: row.try_get(6)?,
            user_id: row.try_get(7)?,
            user_name: row.try_get(8)?,
            apim_subscription_id: row.try_get(9)?,
            response_code: row.try_get(10)?,
            total_tokens: row.try_get(11)?,
            total_time: row.try_get(12)?,
        }
    }};
}

/// Builds a [`CallDetail`] from the detail row (same column order on both engines) and the
/// call's prompt and completion pieces.
macro_rules! detail_from_rows {
    ($summary:expr, $detail:expr, $pieces:expr) => {{
        let detail = &$detail;
        let pieces = &$pieces;
        let requests = pieces
            .iter()
            .map(|r| r.try_get::<Option<String>, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        let responses = pieces
            .iter()
            .map(|r| r.try_get::<Option<String>, _>(1))
            .collect::<Result<Vec<_>, _>>()?;
        let chain = match (
            detail.try_get::<Option<String>, _>(10)?,
            detail.try_get::<Option<i64>, _>(11)?,
            detail.try_get::<Option<String>, _>(12)?,
        ) {
            (Some(chain), Some(sequence), Some(hash)) => Some((chain, sequence, hash)),
            _ => None,
        };
        CallDetail {
            summary: $summary,
            attempts: detail.try_get(0)?,
            prompt_tokens: detail.try_get(1)?,
            completion_tokens: detail.try_get(2)?,
            tokens_estimated: detail.try_get(3)?,
            time_to_first_byte: detail.try_get(4)?,
            time_to_first_token: detail.try_get(13)?,
            backend_request_body: detail.try_get(5)?,
            backend_response_body: detail.try_get(6)?,
            request_messages: reassemble(requests),
            response_messages: reassemble(responses),
            truncated: (detail.try_get(7)?, detail.try_get(8)?),
            client_aborted: detail.try_get(9)?,
            chain,
        }
    }};
}

impl SqlStore {
    /// Searches calls, newest first, one page at a time.
    pub async fn search(&self, filter: &SearchFilter) -> Result<Page, StoreError> {
        let limit = filter.limit.clamp(1, MAX_PAGE);
        let by_record = matches!(self.engine, Engine::Sqlite { .. }) && sqlite_text_leads(filter);
        if filter
            .cursor
            .is_some_and(|cursor| cursor.by_record != by_record)
        {
            return Err(StoreError::BadCursor);
        }
        let mut items = match &self.engine {
            Engine::Sqlite { reader, .. } => search_sqlite(reader, filter, limit + 1).await?,
            Engine::Postgres { pool, .. } => search_postgres(pool, filter, limit + 1).await?,
        };
        let more = items.len() > limit as usize;
        items.truncate(limit as usize);
        let next = more
            .then(|| {
                items.last().map(|last| {
                    Cursor {
                        time: last.time_generated,
                        record_id: last.record_id,
                        by_record,
                    }
                    .encode()
                })
            })
            .flatten();
        Ok(Page { items, next })
    }

    /// Every call matching `filter` (its limit and cursor are ignored), newest first, read a page
    /// at a time so that memory stays flat whatever the size of the export.
    pub fn export(
        &self,
        filter: SearchFilter,
    ) -> impl Stream<Item = Result<CallSummary, StoreError>> + '_ {
        let first = SearchFilter {
            limit: MAX_PAGE,
            cursor: None,
            ..filter
        };
        futures::stream::unfold(Some(first), move |state| async move {
            let filter = state?;
            match self.search(&filter).await {
                Ok(page) => {
                    let next = match page.next.as_deref().map(Cursor::decode) {
                        Some(Ok(cursor)) => Some(SearchFilter {
                            cursor: Some(cursor),
                            ..filter
                        }),
                        _ => None,
                    };
                    let items: Vec<Result<CallSummary, StoreError>> =
                        page.items.into_iter().map(Ok).collect();
                    Some((futures::stream::iter(items), next))
                }
                Err(error) => Some((futures::stream::iter(vec![Err(error)]), None)),
            }
        })
        .flatten()
    }

    /// One call in full, by request id.
    pub async fn call(&self, correlation_id: &str) -> Result<Option<CallDetail>, StoreError> {
        match &self.engine {
            Engine::Sqlite { reader, .. } => call_sqlite(reader, correlation_id).await,
            Engine::Postgres { pool, .. } => call_postgres(pool, correlation_id).await,
        }
    }

    /// Usage over time from the rollups.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsagePoint>, StoreError> {
        self.rollups(query, false).await
    }

    /// Usage over the whole range from the rollups: one point per dimension value (its bucket is
    /// the first bucket that holds it), summed by the database.
    pub async fn usage_totals(&self, query: &UsageQuery) -> Result<Vec<UsagePoint>, StoreError> {
        self.rollups(query, true).await
    }

    async fn rollups(
        &self,
        query: &UsageQuery,
        totals: bool,
    ) -> Result<Vec<UsagePoint>, StoreError> {
        match &self.engine {
            Engine::Sqlite { reader, .. } => {
                let mut q = QueryBuilder::<Sqlite>::new(if totals {
                    "SELECT MIN(Bucket), DimensionValue, SUM(Requests), SUM(Errors), SUM(PromptTokens), SUM(CompletionTokens), SUM(TotalTokens), SUM(LatencySumMs), MAX(LatencyMaxMs) FROM GatehouseUsageRollup WHERE Granularity = "
                } else {
                    "SELECT Bucket, DimensionValue, Requests, Errors, PromptTokens, CompletionTokens, TotalTokens, LatencySumMs, LatencyMaxMs FROM GatehouseUsageRollup WHERE Granularity = "
                });
                q.push_bind(query.granularity.as_str())
                    .push(" AND Dimension = ")
                    .push_bind(query.dimension.as_str())
                    .push(" AND Bucket >= ")
                    .push_bind(sqlite_time(query.from))
                    .push(" AND Bucket < ")
                    .push_bind(sqlite_time(query.to));
                if let Some(only) = &query.only {
                    if only.is_empty() {
                        return Ok(Vec::new());
                    }
                    q.push(" AND DimensionValue IN (");
                    let mut values = q.separated(", ");
                    for value in only {
                        values.push_bind(value.clone());
                    }
                    q.push(")");
                }
                if totals {
                    q.push(" GROUP BY DimensionValue ORDER BY DimensionValue");
                } else {
                    q.push(" ORDER BY Bucket, DimensionValue");
                }
                let rows = q.build().fetch_all(reader).await?;
                rows.iter()
                    .map(|row| {
                        Ok(UsagePoint {
                            bucket: parse_sqlite_time(row.try_get::<&str, _>(0)?)?,
                            value: row.try_get(1)?,
                            requests: row.try_get(2)?,
                            errors: row.try_get(3)?,
                            prompt_tokens: row.try_get(4)?,
                            completion_tokens: row.try_get(5)?,
                            total_tokens: row.try_get(6)?,
                            latency_sum_ms: row.try_get(7)?,
                            latency_max_ms: row.try_get(8)?,
                        })
                    })
                    .collect()
            }
            Engine::Postgres { pool, .. } => {
                let mut q = QueryBuilder::<Postgres>::new(if totals {
                    r#"SELECT MIN("Bucket"), "DimensionValue", SUM("Requests")::bigint, SUM("Errors")::bigint, SUM("PromptTokens")::bigint, SUM("CompletionTokens")::bigint, SUM("TotalTokens")::bigint, SUM("LatencySumMs")::bigint, MAX("LatencyMaxMs") FROM "GatehouseUsageRollup" WHERE "Granularity" = "#
                } else {
                    r#"SELECT "Bucket", "DimensionValue", "Requests", "Errors", "PromptTokens", "CompletionTokens", "TotalTokens", "LatencySumMs", "LatencyMaxMs" FROM "GatehouseUsageRollup" WHERE "Granularity" = "#
                });
                q.push_bind(query.granularity.as_str())
                    .push(r#" AND "Dimension" = "#)
                    .push_bind(query.dimension.as_str())
                    .push(r#" AND "Bucket" >= "#)
                    .push_bind(query.from)
                    .push(r#" AND "Bucket" < "#)
                    .push_bind(query.to);
                if let Some(only) = &query.only {
                    if only.is_empty() {
                        return Ok(Vec::new());
                    }
                    q.push(r#" AND "DimensionValue" = ANY("#)
                        .push_bind(only.clone())
                        .push(")");
                }
                if totals {
                    q.push(r#" GROUP BY "DimensionValue" ORDER BY "DimensionValue""#);
                } else {
                    q.push(r#" ORDER BY "Bucket", "DimensionValue""#);
                }
                let rows = q.build().fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(UsagePoint {
                            bucket: row.try_get(0)?,
                            value: row.try_get(1)?,
                            requests: row.try_get(2)?,
                            errors: row.try_get(3)?,
                            prompt_tokens: row.try_get(4)?,
                            completion_tokens: row.try_get(5)?,
                            total_tokens: row.try_get(6)?,
                            latency_sum_ms: row.try_get(7)?,
                            latency_max_ms: row.try_get(8)?,
                        })
                    })
                    .collect()
            }
        }
    }
}

/// Whether a SQLite search is led by the full-text index: full text without a selective filter.
/// The index then lists newest stored first (its rowid is the RecordId), and the query stops at
/// the page's end instead of collecting every call that holds a common word. Otherwise the calls
/// table leads, by time, and the index is asked about each candidate by rowid.
fn sqlite_text_leads(f: &SearchFilter) -> bool {
    let selective = f.user.is_some() || f.subscription.is_some() || f.caller.is_some_and(is_narrow);
    f.text.as_deref().and_then(fts5_terms).is_some() && !selective
}

async fn search_sqlite(
    pool: &sqlx::SqlitePool,
    f: &SearchFilter,
    limit: u32,
) -> Result<Vec<CallSummary>, StoreError> {
    let terms = f.text.as_deref().and_then(fts5_terms);
    let text_leads = sqlite_text_leads(f);
    let mut q = QueryBuilder::<Sqlite>::new("");
    match &f.user {
        // A user is named by object id or by name: one branch per column, each read newest first
        // from its own index and stopped at the page's end, then merged. With `UserId = ? OR
        // UserName = ?` SQLite collects every call of the user in the range from both indexes and
        // sorts them, a random read per call (p95 630 ms at 10 million calls). Both compare
        // ignoring ASCII case (user names come in the case Entra issued them; migration 0008's
        // indexes).
        Some(user) => {
            q.push("SELECT * FROM (");
            push_sqlite_search(
                &mut q,
                f,
                terms.as_deref(),
                false,
                Some((" AND l.UserId COLLATE NOCASE = ", user)),
                limit,
            );
            q.push(") UNION SELECT * FROM (");
            push_sqlite_search(
                &mut q,
                f,
                terms.as_deref(),
                false,
                Some((" AND l.UserName COLLATE NOCASE = ", user)),
                limit,
            );
            q.push(") ORDER BY 2 DESC, 1 DESC LIMIT ")
                .push_bind(i64::from(limit));
        }
        None => push_sqlite_search(&mut q, f, terms.as_deref(), text_leads, None, limit),
    }
    let rows = q.build().fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            Ok(summary_from_row!(
                row,
                parse_sqlite_time(row.try_get::<&str, _>(1)?)?
            ))
        })
        .collect()
}

/// One SELECT of a SQLite search, newest first and limited: `user` is the condition on one of
/// the user columns and its value.
fn push_sqlite_search(
    q: &mut QueryBuilder<'_, Sqlite>,
    f: &SearchFilter,
    terms: Option<&str>,
    text_leads: bool,
    user: Option<(&'static str, &str)>,
    limit: u32,
) {
    q.push(sqlite_summary_columns!());
    if text_leads {
        q.push(" FROM GatehouseContentSearch CROSS JOIN GatehouseGatewayLogs l ON l.RecordId = GatehouseContentSearch.rowid");
    } else {
        q.push(" FROM GatehouseGatewayLogs l");
    }
    // Without statistics SQLite takes the time index for any address filter and walks every
    // call of the range; a narrow network has few calls, which its own index finds at once.
    if !text_leads && f.caller.is_some_and(is_narrow) {
        q.push(" INDEXED BY GatehouseGatewayLogs_CallerKey");
    }
    q.push(" WHERE l.TimeGenerated >= ")
        .push_bind(sqlite_time(f.from))
        .push(" AND l.TimeGenerated < ")
        .push_bind(sqlite_time(f.to));
    if let Some((condition, user)) = user {
        q.push(condition).push_bind(user.to_owned());
    }
    if let Some(net) = f.caller {
        let (low, high) = net_key_range(net);
        if low == high {
            q.push(" AND l.CallerIpKey = ").push_bind(low);
        } else {
            q.push(" AND l.CallerIpKey BETWEEN ")
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
        if let Some((low, high)) = ipv4_keys_left_out(net) {
            q.push(" AND l.CallerIpKey NOT BETWEEN ")
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
    }
    for (column, value) in [
        (" AND l.ModelName = ", &f.model),
        (" AND l.DeploymentName = ", &f.deployment),
        (" AND l.OperationId = ", &f.operation),
        (" AND l.ApimSubscriptionId = ", &f.subscription),
    ] {
        if let Some(value) = value {
            q.push(column).push_bind(value.clone());
        }
    }
    if let Some(status) = f.status {
        q.push(" AND l.ResponseCode = ")
            .push_bind(i32::from(status));
    }
    match terms {
        Some(terms) if text_leads => {
            q.push(" AND GatehouseContentSearch MATCH ")
                .push_bind(terms.to_owned());
        }
        Some(terms) => {
            q.push(" AND EXISTS (SELECT 1 FROM GatehouseContentSearch WHERE GatehouseContentSearch MATCH ")
                .push_bind(terms.to_owned())
                .push(" AND GatehouseContentSearch.rowid = l.RecordId)");
        }
        None => {}
    }
    match f.cursor {
        Some(cursor) if text_leads => {
            q.push(" AND GatehouseContentSearch.rowid < ")
                .push_bind(cursor.record_id);
        }
        Some(cursor) => {
            q.push(" AND (l.TimeGenerated, l.RecordId) < (")
                .push_bind(sqlite_time(cursor.time))
                .push(", ")
                .push_bind(cursor.record_id)
                .push(")");
        }
        None => {}
    }
    if text_leads {
        q.push(" ORDER BY GatehouseContentSearch.rowid DESC LIMIT ");
    } else {
        q.push(" ORDER BY l.TimeGenerated DESC, l.RecordId DESC LIMIT ");
    }
    q.push_bind(i64::from(limit));
}

async fn search_postgres(
    pool: &sqlx::PgPool,
    f: &SearchFilter,
    limit: u32,
) -> Result<Vec<CallSummary>, StoreError> {
    let words = match f.text.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(text) => Some(postgres_search_words(pool, text).await?),
        None => None,
    };
    let words = words.as_deref();
    let mut q = QueryBuilder::<Postgres>::new("");
    match &f.user {
        // One branch per user column, each read newest first from its own index and stopped at
        // the page's end (see `search_sqlite`). Both compare ignoring ASCII case, as SQLite's
        // NOCASE does (migration 0010's indexes).
        Some(user) => {
            let folded = user.to_ascii_lowercase();
            q.push("(");
            push_postgres_search(
                &mut q,
                f,
                words,
                Some((r#" AND lower(l."UserId" COLLATE "C") = "#, folded.as_str())),
                limit,
            );
            q.push(") UNION (");
            push_postgres_search(
                &mut q,
                f,
                words,
                Some((
                    r#" AND lower(l."UserName" COLLATE "C") = "#,
                    folded.as_str(),
                )),
                limit,
            );
            q.push(") ORDER BY 2 DESC, 1 DESC LIMIT ")
                .push_bind(i64::from(limit));
        }
        None => push_postgres_search(&mut q, f, words, None, limit),
    }
    // Not a cached prepared statement: after five runs PostgreSQL may switch such a statement to
    // one generic plan, made without the parameters, and a search's best plan depends on them.
    // For a rare full-text term that plan walked the time index of every day partition and
    // tested each call's text (seconds on 10 million calls) instead of asking the full-text
    // index for the few matches (milliseconds). An unnamed statement is planned with its values.
    let rows = q.build().persistent(false).fetch_all(pool).await?;
    rows.iter()
        .map(|row| Ok(summary_from_row!(row, row.try_get(1)?)))
        .collect()
}

/// One SELECT of a PostgreSQL search, newest first and limited: `words` are the search words of
/// `f.text` ([`postgres_search_words`]), `user` is the condition on one of the user columns and
/// its value.
fn push_postgres_search(
    q: &mut QueryBuilder<'_, Postgres>,
    f: &SearchFilter,
    words: Option<&[PgSearchWord<'_>]>,
    user: Option<(&'static str, &str)>,
    limit: u32,
) {
    q.push(POSTGRES_SUMMARY);
    q.push_bind(f.from)
        .push(r#" AND l."TimeGenerated" < "#)
        .push_bind(f.to);
    if let Some((condition, user)) = user {
        q.push(condition).push_bind(user.to_owned());
    }
    if let Some(net) = f.caller {
        let (low, high) = net_key_range(net);
        if low == high {
            q.push(r#" AND l."CallerIpKey" = "#).push_bind(low);
        } else {
            q.push(r#" AND l."CallerIpKey" BETWEEN "#)
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
        if let Some((low, high)) = ipv4_keys_left_out(net) {
            q.push(r#" AND l."CallerIpKey" NOT BETWEEN "#)
                .push_bind(low)
                .push(" AND ")
                .push_bind(high);
        }
    }
    for (column, value) in [
        (r#" AND l."ModelName" = "#, &f.model),
        (r#" AND l."DeploymentName" = "#, &f.deployment),
        (r#" AND l."OperationId" = "#, &f.operation),
        (r#" AND l."ApimSubscriptionId" = "#, &f.subscription),
    ] {
        if let Some(value) = value {
            q.push(column).push_bind(value.clone());
        }
    }
    if let Some(status) = f.status {
        q.push(r#" AND l."ResponseCode" = "#)
            .push_bind(i32::from(status));
    }
    match words {
        None => {}
        // Search words without a word in them (`?? --`) find nothing, as on SQLite.
        Some(words) if !words.iter().any(PgSearchWord::is_searched) => {
            q.push(" AND FALSE");
        }
        Some(words) => {
            // The calls of the blocks whose words hold every search word (the word index), each
            // checked against its own vector (`search_blocks.rs`). The same time range on the
            // content side keeps the search to the range's day partitions; a block is dated at its
            // day's UTC midnight.
            let first_day = search_blocks::day_start(f.from);
            q.push(r#" AND (l."CorrelationId", l."TimeGenerated") IN (SELECT c."CorrelationId", c."TimeGenerated" FROM "GatehouseCallContent" c WHERE c."TimeGenerated" >= "#)
                .push_bind(f.from)
                .push(r#" AND c."TimeGenerated" < "#)
                .push_bind(f.to)
                .push(r#" AND c."SearchText" @@ "#);
            push_postgres_words(q, words, false);
            q.push(r#" AND coalesce(c."SearchBlock", c."CorrelationId") IN (SELECT b."BlockId" FROM "GatehouseSearchBlocks" b WHERE b."TimeGenerated" >= "#)
                .push_bind(first_day)
                .push(r#" AND b."TimeGenerated" < "#)
                .push_bind(f.to)
                .push(r#" AND b."Words" @@ "#);
            push_postgres_words(q, words, true);
            q.push("))");
        }
    }
    if let Some(cursor) = f.cursor {
        q.push(r#" AND (l."TimeGenerated", l."RecordId") < ("#)
            .push_bind(cursor.time)
            .push(", ")
            .push_bind(cursor.record_id)
            .push(")");
    }
    q.push(r#" ORDER BY l."TimeGenerated" DESC, l."RecordId" DESC LIMIT "#)
        .push_bind(i64::from(limit));
}

/// One search word of a PostgreSQL search (a run of the text between white space) and what
/// finds it.
struct PgSearchWord<'a> {
    /// The word as it was typed.
    text: &'a str,
    /// The store's words of it as a phrase ([`full_text::tsquery`]), for a call's own vector.
    phrase: Option<String>,
    /// The store's words of it, all of them ([`full_text::block_tsquery`]), for the blocks of
    /// the word index.
    parts: Option<String>,
    /// Whether PostgreSQL's parser makes of it a word the store never makes, which vectors that
    /// parser built may hold ([`postgres_search_words`]).
    legacy: bool,
}

impl PgSearchWord<'_> {
    /// Whether the word is searched at all: it holds a word of the store's or of PostgreSQL's.
    fn is_searched(&self) -> bool {
        self.phrase.is_some() || self.legacy
    }
}

/// Whether PostgreSQL's parser and the store split `word` alike without asking: ASCII letters
/// and digits alone are one word to both (`simple` lower-cases it, as the store does).
fn parsed_alike(word: &str) -> bool {
    word.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The search words of `text`. Calls stored before the store split the words itself
/// (2026-12-03) have vectors that PostgreSQL's parser built, with words the store never makes:
/// an e-mail address, a URL, a path, `1234.56` or the `-2024` of `INV-2024-0042` as one word,
/// accented words unfolded. A search word is also searched as that parser splits it (a phrase,
/// `phraseto_tsquery('simple', …)`), so that those calls are found as they were, but only when
/// the parser makes of it such a word ([`full_text::is_word`]): every word of a phrase must be
/// in the vector, so that query matches no vector the store made and finds no call that SQLite
/// would not find. ORed for every search word, as `plainto_tsquery` (a plain AND of the parser's
/// words) it was, `user_id`, `don't` or `x,y` found a call saying "user name and id" on
/// PostgreSQL only. The parser is asked, in one query, only about words it could split
/// otherwise than the store ([`parsed_alike`]).
async fn postgres_search_words<'a>(
    pool: &sqlx::PgPool,
    text: &'a str,
) -> Result<Vec<PgSearchWord<'a>>, StoreError> {
    let mut words: Vec<PgSearchWord<'a>> = text
        .split_whitespace()
        .map(|word| PgSearchWord {
            text: word,
            phrase: full_text::tsquery(word),
            parts: full_text::block_tsquery(word),
            legacy: false,
        })
        .collect();
    let asked: Vec<&str> = words
        .iter()
        .map(|word| word.text)
        .filter(|word| !parsed_alike(word))
        .collect();
    if asked.is_empty() {
        return Ok(words);
    }
    let lexemes: Vec<Vec<String>> = sqlx::query_scalar(
        "SELECT tsvector_to_array(to_tsvector('simple', w)) FROM unnest($1::text[]) WITH ORDINALITY AS a(w, n) ORDER BY n",
    )
    .bind(&asked)
    .fetch_all(pool)
    .await?;
    let unlike = words.iter_mut().filter(|word| !parsed_alike(word.text));
    for (word, lexemes) in unlike.zip(lexemes) {
        word.legacy = lexemes.iter().any(|lexeme| !full_text::is_word(lexeme));
    }
    Ok(words)
}

/// A `tsquery` that finds what holds every one of `words` (each a searched word, see
/// [`PgSearchWord::is_searched`]): its store's words (its `phrase`, or its `parts` for the blocks
/// of the word index, whose vectors have no positions), ORed with PostgreSQL's parse of it (a
/// phrase, or all of its words for the blocks) where that parse is `legacy`.
fn push_postgres_words(
    q: &mut QueryBuilder<'_, Postgres>,
    words: &[PgSearchWord<'_>],
    blocks: bool,
) {
    q.push("(");
    let mut first = true;
    for word in words.iter().filter(|word| word.is_searched()) {
        if !first {
            q.push(" && ");
        }
        first = false;
        q.push("(");
        let store = if blocks { &word.parts } else { &word.phrase };
        if let Some(store) = store {
            q.push_bind(store.clone()).push("::tsquery");
            if word.legacy {
                q.push(" || ");
            }
        }
        if word.legacy {
            q.push(if blocks {
                "plainto_tsquery('simple', "
            } else {
                "phraseto_tsquery('simple', "
            })
            .push_bind(word.text.to_owned())
            .push(")");
        }
        q.push(")");
    }
    q.push(")");
}

/// Whether a caller filter names so few addresses (an IPv4 /24 or narrower, an IPv6 /64 or
/// narrower) that its calls are best found through the address index. An IPv6 network written
/// for IPv4 callers (inside `::ffff:0:0/96`) is judged as the IPv4 network it is, and one that
/// holds all of them (`::/64`) is wide whatever its prefix.
fn is_narrow(net: IpNet) -> bool {
    /// The length of `::ffff:0:0/96`, the IPv4-mapped addresses, stored under their IPv4 keys.
    const MAPPED_PREFIX: u8 = 96;
    match net {
        IpNet::V4(v4) => v4.prefix_len() >= 24,
        IpNet::V6(v6)
            if v6.prefix_len() >= MAPPED_PREFIX && v6.network().to_ipv4_mapped().is_some() =>
        {
            v6.prefix_len() - MAPPED_PREFIX >= 24
        }
        // It holds every IPv4-mapped address.
        IpNet::V6(v6)
            if v6.prefix_len() <= MAPPED_PREFIX
                && v6.contains(&std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()) =>
        {
            false
        }
        IpNet::V6(v6) => v6.prefix_len() >= 64,
    }
}

/// Joins LLM-log pieces of one kind back into the whole text.
fn reassemble(pieces: Vec<Option<String>>) -> Option<String> {
    let pieces: Vec<String> = pieces.into_iter().flatten().collect();
    (!pieces.is_empty()).then(|| pieces.concat())
}

async fn call_sqlite(pool: &sqlx::SqlitePool, id: &str) -> Result<Option<CallDetail>, StoreError> {
    let mut q = QueryBuilder::<Sqlite>::new(SQLITE_SUMMARY);
    q.push_bind("")
        .push(" AND l.CorrelationId = ")
        .push_bind(id.to_owned());
    let Some(summary) = search_rows_sqlite(q.build().fetch_optional(pool).await?)? else {
        return Ok(None);
    };
    let detail = sqlx::query(
        "SELECT Attempts, PromptTokens, CompletionTokens, TokensEstimated, TimeToFirstByte, BackendRequestBody, BackendResponseBody, RequestBodyTruncated, ResponseBodyTruncated, ClientAborted, ChainId, ChainSequence, RecordHash, TimeToFirstToken FROM ApiManagementGatewayLogs WHERE CorrelationId = ?",
    )
    .bind(id)
    .fetch_one(pool)
    .await?;
    let pieces = sqlx::query("SELECT RequestMessages, ResponseMessages FROM ApiManagementGatewayLlmLog WHERE CorrelationId = ? AND SequenceNumber > 0 ORDER BY SequenceNumber")
        .bind(id)
        .fetch_all(pool)
        .await?;
    Ok(Some(detail_from_rows!(summary, detail, pieces)))
}

fn search_rows_sqlite(
    row: Option<sqlx::sqlite::SqliteRow>,
) -> Result<Option<CallSummary>, StoreError> {
    let Some(row) = row else { return Ok(None) };
    Ok(Some(summary_from_row!(
        row,
        parse_sqlite_time(row.try_get::<&str, _>(1)?)?
    )))
}

async fn call_postgres(pool: &sqlx::PgPool, id: &str) -> Result<Option<CallDetail>, StoreError> {
    let mut q = QueryBuilder::<Postgres>::new(POSTGRES_SUMMARY);
    q.push_bind(OffsetDateTime::UNIX_EPOCH)
        .push(r#" AND l."CorrelationId" = "#)
        .push_bind(id.to_owned());
    let Some(row) = q.build().fetch_optional(pool).await? else {
        return Ok(None);
    };
    let summary = summary_from_row!(row, row.try_get(1)?);
    // The call's time names the one day partition that holds its content and pieces.
    let detail = sqlx::query(
        r#"SELECT "Attempts"::text, "PromptTokens", "CompletionTokens", "TokensEstimated", "TimeToFirstByte", "BackendRequestBody", "BackendResponseBody", "RequestBodyTruncated", "ResponseBodyTruncated", "ClientAborted", "ChainId", "ChainSequence", "RecordHash", "TimeToFirstToken" FROM "ApiManagementGatewayLogs" WHERE "CorrelationId" = $1 AND "TimeGenerated" = $2"#,
    )
    .bind(id)
    .bind(summary.time_generated)
    .fetch_one(pool)
    .await?;
    let pieces = sqlx::query(r#"SELECT "RequestMessages", "ResponseMessages" FROM "GatehouseLlmLogPieces" WHERE "CorrelationId" = $1 AND "TimeGenerated" = $2 ORDER BY "SequenceNumber""#)
        .bind(id)
        .bind(summary.time_generated)
        .fetch_all(pool)
        .await?;
    Ok(Some(detail_from_rows!(summary, detail, pieces)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 networks of IPv4 callers are as narrow as the IPv4 networks they are; one holding
    /// every IPv4 caller is wide.
    #[test]
    fn a_network_is_narrow_by_the_callers_it_holds() {
        let narrow = |net: &str| is_narrow(net.parse().unwrap());
        assert!(narrow("10.1.2.0/24") && !narrow("10.0.0.0/8"));
        assert!(narrow("2001:db8::/64") && !narrow("2001:db8::/48"));
        assert!(!narrow("::ffff:0:0/96"), "every IPv4 caller");
        assert!(!narrow("::ffff:10.0.0.0/104"), "10.0.0.0/8");
        assert!(narrow("::ffff:10.0.0.0/120"), "10.0.0.0/24");
        assert!(!narrow("::/64"), "holds every IPv4 caller");
        assert!(!narrow("::/0"));
    }
}
