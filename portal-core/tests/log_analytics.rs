//! The Log Analytics source against a local double of the Query API and of the identity
//! platform's token endpoint, speaking the documented formats (`shared/reference/azure-specs.md`
//! §4.1: `POST /v1/workspaces/{id}/query` with `{"query", "timespan"}`, answers
//! `{"tables": [{"name", "columns": [{"name", "type"}], "rows"}]}`, a non-fatal
//! `"error": {"code": "PartialError", …}` beside the tables, 429 with `Retry-After`; client
//! credentials token answer `{"token_type", "expires_in", "access_token"}`). Like Log Analytics,
//! the double applies a query's `timespan` to the stored `TimeGenerated`, and a call's rows may be
//! stored with the time Azure received them there (more than two days after the call) and the
//! call's own time in `GatehouseTimeGenerated`.
#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use gatehouse_portal_core::insights::log_analytics::{
    ClientCredentials, LogAnalyticsSettings, LogAnalyticsSource,
};
use gatehouse_portal_core::insights::{
    AuditSource, Dimension, Granularity, InsightsError, SearchForm, SearchRequest, TimeRange,
    UsageRequest, export,
};
use gatehouse_schema::config::SecretRef;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

const WORKSPACE: &str = "0b9d5a3e-1111-4c2b-9d2e-0123456789ab";
const TENANT: &str = "contoso.onmicrosoft.com";
const SECRET: &str = "s3cr3t-value-never-shown";
const TOKEN: &str = "token-abc";

#[derive(Default)]
struct Double {
    /// (query, timespan) of every query received.
    queries: Mutex<Vec<(String, String)>>,
    tokens_issued: AtomicU32,
    /// Answer the next N queries with 429.
    throttle: AtomicU32,
    /// The Retry-After of a 429.
    retry_after: AtomicU32,
    /// The token endpoint refuses (echoing the secret, as a careless endpoint might).
    refuse_tokens: AtomicU32,
    /// The gateway-log rows a search reads: (time in ticks since the Unix epoch, correlation
    /// id); empty: the seven rows of [`default_calls`].
    calls: Mutex<Vec<(i128, String)>>,
    /// From the N-th search on (1-based; 0: never), the answer is partial: half its rows and a
    /// `PartialError`, as when a query passes the Query API's limits.
    partial_from_search: AtomicU32,
    /// Searches answered.
    searches: AtomicU32,
    /// Refuse every query with an error whose message echoes the token across the 300th
    /// character of the error text.
    echo_token: AtomicU32,
    /// Calls whose rows Azure received more than two days after them: their id and the time
    /// received, which Azure stored in `TimeGenerated` (ticks); their own time is in
    /// `GatehouseTimeGenerated`. Every other call's rows have its time in both.
    received_late: Mutex<HashMap<String, i128>>,
}

async fn token(
    State(double): State<Arc<Double>>,
    Path(tenant): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let get = |key: &str| {
        form.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if double.refuse_tokens.load(Ordering::SeqCst) > 0 {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client", "error_description": format!("bad secret {}", get("client_secret"))})),
        )
            .into_response();
    }
    assert_eq!(tenant, TENANT);
    assert_eq!(get("grant_type"), "client_credentials");
    assert_eq!(get("scope"), "https://api.loganalytics.io/.default");
    assert_eq!(get("client_id"), "portal-app");
    assert_eq!(get("client_secret"), SECRET);
    double.tokens_issued.fetch_add(1, Ordering::SeqCst);
    Json(json!({"token_type": "Bearer", "expires_in": 3599, "access_token": TOKEN})).into_response()
}

fn table(columns: &[(&str, &str)], rows: Value) -> Value {
    json!({
        "name": "PrimaryResult",
        "columns": columns.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
        "rows": rows,
    })
}

const SUMMARY: [(&str, &str); 12] = [
    ("TimeGenerated", "datetime"),
    ("CorrelationId", "string"),
    ("OperationId", "string"),
    ("DeploymentName", "string"),
    ("ModelName", "string"),
    ("CallerIpAddress", "string"),
    ("UserId", "string"),
    ("UserName", "string"),
    ("ApimSubscriptionId", "string"),
    ("ResponseCode", "int"),
    ("TotalTokens", "long"),
    ("TotalTime", "long"),
];

/// Ticks (100 ns, the unit Log Analytics keeps times in) in a second.
const TICKS_PER_SECOND: i128 = 10_000_000;

fn ticks(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 100
}

/// A time as the Query API writes a `datetime` cell: RFC 3339, UTC, seven fractional digits.
fn tick_text(ticks: i128) -> String {
    let seconds = ticks.div_euclid(TICKS_PER_SECOND);
    let at = OffsetDateTime::from_unix_timestamp(i64::try_from(seconds).unwrap()).unwrap();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        ticks.rem_euclid(TICKS_PER_SECOND)
    )
}

/// `call-0` … `call-6`, a minute apart from 10:59:00.5 back.
fn default_calls() -> Vec<(i128, String)> {
    (0..7)
        .map(|i| {
            (
                ticks(datetime!(2026-12-01 10:59:00.5 UTC) - time::Duration::minutes(i)),
                format!("call-{i}"),
            )
        })
        .collect()
}

fn summary_row(ticks: i128, id: &str) -> Value {
    json!([
        tick_text(ticks),
        id,
        "chatcompletions_create",
        "chat",
        "gpt-4o",
        "198.51.100.7",
        "oid-alice",
        "alice@contoso.com",
        "team-a",
        200,
        30,
        120
    ])
}

/// The value of the KQL string literal at the start of `text` (after its opening quote), as
/// `kql::string_literal` escapes it, and the text after its closing quote.
fn literal_value(text: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (value, &text[i + 1..]),
            // Kusto's escapes (`grammar/KqlTokens.g4` of microsoft/Kusto-Query-Language).
            '\\' => match chars.next().unwrap().1 {
                't' => value.push('\t'),
                'n' => value.push('\n'),
                'r' => value.push('\r'),
                'u' => {
                    let hex: String = (0..4).map(|_| chars.next().unwrap().1).collect();
                    value.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    panic!("unterminated literal: {text}")
}

/// The left operand and the operator of every `<`, `<=`, `>`, `>=` whose right operand is a
/// string literal. Kusto defines these between numbers, datetimes and timespans only (the
/// "Numerical operators" reference; the "String operators" reference has none, strings
/// compare with `==`, `has`, … or `strcmp()`): such a query is refused with 400.
fn string_comparisons(kql: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, c) in kql.char_indices() {
        if c != '<' && c != '>' {
            continue;
        }
        let rest = kql[i + 1..].trim_start_matches('=').trim_start();
        if rest.starts_with('"') || rest.starts_with('\'') || rest.starts_with("@\"") {
            let left = kql[..i].split_whitespace().next_back().unwrap_or_default();
            found.push(format!("{left} {c}"));
        }
    }
    found
}

/// The line every query reads a table with (`kql::rows_of`): the call's own time in
/// `TimeGenerated`.
const CALL_TIME: &str = "| extend TimeGenerated = coalesce(column_ifexists(\"GatehouseTimeGenerated\", datetime(null)), TimeGenerated)\n";

fn parse_ticks(text: &str) -> i128 {
    let at = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| panic!("an unreadable time: {text}"));
    ticks(at)
}

/// The range of `| where TimeGenerated >= datetime(…) and TimeGenerated < datetime(…)`.
fn range_filter(kql: &str) -> Option<(i128, i128)> {
    let (_, rest) = kql.split_once("| where TimeGenerated >= datetime(")?;
    let (from, rest) = rest.split_once(')').unwrap();
    let rest = rest
        .strip_prefix(" and TimeGenerated < datetime(")
        .unwrap_or_else(|| panic!("an unexpected range filter: {kql}"));
    let (to, _) = rest.split_once(')').unwrap();
    Some((parse_ticks(from), parse_ticks(to)))
}

/// A call's time as a query reads it, as Log Analytics answers: `None` when the `timespan`
/// (which the Query API applies to the stored `TimeGenerated`) or the query's range leaves its
/// row out. The query reads the call's own time when it asks for it ([`CALL_TIME`]), else the
/// stored `TimeGenerated`.
fn time_as_read(double: &Double, kql: &str, timespan: &str, at: i128, id: &str) -> Option<i128> {
    let stored = double
        .received_late
        .lock()
        .unwrap()
        .get(id)
        .copied()
        .unwrap_or(at);
    let (from, to) = timespan.split_once('/').unwrap();
    if stored < parse_ticks(from) || stored >= parse_ticks(to) {
        return None;
    }
    let read = if kql.contains(CALL_TIME) { at } else { stored };
    match range_filter(kql) {
        Some((from, to)) if read < from || read >= to => None,
        _ => Some(read),
    }
}

/// The calls a search reads: the double's, or the seven of [`default_calls`].
fn calls_of(double: &Double) -> Vec<(i128, String)> {
    let calls = double.calls.lock().unwrap().clone();
    if calls.is_empty() {
        default_calls()
    } else {
        calls
    }
}

/// The keyset position of a search's next page, when it has one: the `datetime(…)` and the
/// id of `TimeGenerated < at or (TimeGenerated == at and strcmp(CorrelationId, "id") < 0)`.
fn after(kql: &str) -> Option<(i128, String)> {
    let datetime = |text: &str| {
        let at = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| panic!("an unreadable datetime literal: {kql}"));
        ticks(at)
    };
    let (_, rest) = kql.split_once("| where TimeGenerated < datetime(")?;
    let (at, rest) = rest.split_once(')').unwrap();
    let rest = rest
        .strip_prefix(" or (TimeGenerated == datetime(")
        .unwrap_or_else(|| panic!("an unexpected keyset filter: {kql}"));
    let (same, rest) = rest.split_once(')').unwrap();
    assert_eq!(datetime(at), datetime(same), "{kql}");
    let id = rest
        .strip_prefix(" and strcmp(CorrelationId, \"")
        .unwrap_or_else(|| panic!("an unexpected keyset filter: {kql}"));
    let (id, tail) = literal_value(id);
    assert!(
        tail.starts_with(") < 0)\n"),
        "an unexpected keyset filter: {kql}"
    );
    Some((datetime(at), id))
}

async fn query(
    State(double): State<Arc<Double>>,
    Path(workspace): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    assert_eq!(workspace, WORKSPACE);
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "InvalidTokenError", "message": "bad token"}})),
        )
            .into_response();
    }
    if double.throttle.load(Ordering::SeqCst) > 0 {
        double.throttle.fetch_sub(1, Ordering::SeqCst);
        let retry = double.retry_after.load(Ordering::SeqCst).to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry)],
            Json(json!({"error": {"code": "ThrottledError", "message": "too many requests"}})),
        )
            .into_response();
    }
    if double.echo_token.load(Ordering::SeqCst) > 0 {
        // "BadArgumentError: " is 18 characters: the token starts at the 295th.
        let message = format!("{} Bearer {TOKEN} was used", "x".repeat(270));
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadArgumentError", "message": message}})),
        )
            .into_response();
    }
    let kql = body["query"].as_str().unwrap().to_owned();
    let timespan = body["timespan"].as_str().unwrap().to_owned();
    double
        .queries
        .lock()
        .unwrap()
        .push((kql.clone(), timespan.clone()));
    let compared = string_comparisons(&kql);
    if !compared.is_empty() {
        // A semantic error is fatal: 400 with the OneAPI error object (§4.1).
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadArgumentError", "message": "The request had some invalid properties", "details": [{"code": "SemanticError", "message": format!("A semantic error occurred: cannot compare values of types string and string ({})", compared.join("; "))}]}})),
        )
            .into_response();
    }
    if kql.contains("syntax-error") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadArgumentError", "message": "The request had some invalid properties", "details": [{"code": "SyntaxError", "message": "A recognition error occurred."}]}})),
        )
            .into_response();
    }
    let answer = if kql.contains("LatencyP50") {
        json!({
            "tables": [table(
                &[("Requests", "long"), ("Errors", "long"), ("PromptTokens", "long"), ("CompletionTokens", "long"), ("LatencyP50", "real"), ("LatencyP95", "real"), ("TtftP50", "real"), ("TtftP95", "real")],
                json!([[120, 6, 4000, 2000, 81.0, 412.6, 20.0, 95.0]]),
            )],
            // A non-fatal error beside the results (response-format doc: "PartialError").
            "error": {"code": "PartialError", "message": "There were some errors when processing your query.", "details": [{"code": "EngineError", "message": "Query result set has exceeded the internal data size limit"}]}
        })
    } else if kql.contains("by Model") {
        json!({"tables": [table(
            &[("Model", "string"), ("Requests", "long"), ("PromptTokens", "long"), ("CompletionTokens", "long")],
            json!([["gpt-4o-2024-08-06", 100, 3000, 1500], ["gpt-4o-mini", 20, 1000, 500]]),
        )]})
    } else if kql.contains("bin(TimeGenerated") {
        json!({"tables": [table(
            &[("Bucket", "datetime"), ("Value", "string"), ("Requests", "long"), ("Errors", "long"), ("PromptTokens", "long"), ("CompletionTokens", "long"), ("TotalTokens", "long"), ("LatencySumMs", "long"), ("LatencyMaxMs", "long")],
            json!([["2026-12-01T10:00:00Z", "g-red", 3, 0, 30, 15, 45, 300, 150], ["2026-12-01T11:00:00Z", "g-red", "2", 1, 20, 10, 30, 200, 120]]),
        )]})
    } else if kql.contains("by Value\n") {
        // Usage totals: one row per value.
        json!({"tables": [table(
            &[("Value", "string"), ("Requests", "long"), ("Errors", "long"), ("PromptTokens", "long"), ("CompletionTokens", "long"), ("TotalTokens", "long")],
            json!([["oid-1", 5, "1", 300, 200, 500], ["oid-2", 2, 0, 30, 20, 50]]),
        )]})
    } else if kql.contains("by SequenceNumber") {
        json!({"tables": [table(
            &[("SequenceNumber", "int"), ("RequestMessages", "string"), ("ResponseMessages", "string")],
            json!([[1, "[{\"role\":\"user\",\"content\":\"first half ", null], [2, "second half\"}]", null], [3, null, "[\"the answer\"]"]]),
        )]})
    } else if kql.contains("| take 1\n") {
        let mut columns = SUMMARY.to_vec();
        columns.extend([
            ("BackendId", "string"),
            ("Attempts", "string"),
            ("PromptTokens", "long"),
            ("CompletionTokens", "long"),
            ("TokensEstimated", "bool"),
            ("TimeToFirstByte", "long"),
            ("TimeToFirstToken", "long"),
            ("RequestBodyTruncated", "bool"),
            ("ResponseBodyTruncated", "bool"),
            ("ClientAborted", "bool"),
            ("ChainId", "string"),
            ("ChainSequence", "long"),
            ("RecordHash", "string"),
            ("BackendRequestBody", "string"),
            ("BackendResponseBody", "string"),
        ]);
        let (_, asked) = kql
            .split_once("| where CorrelationId == \"")
            .unwrap_or_else(|| panic!("no call asked for: {kql}"));
        let asked = literal_value(asked).0;
        let Some(at) = calls_of(&double)
            .into_iter()
            .filter(|(_, id)| *id == asked)
            .find_map(|(at, id)| time_as_read(&double, &kql, &timespan, at, &id))
        else {
            return Json(json!({"tables": [table(&columns, json!([]))]})).into_response();
        };
        let mut row = summary_row(at, &asked).as_array().unwrap().clone();
        row.extend([
            json!("east"),
            json!("[]"),
            json!(10),
            json!(20),
            json!(true),
            json!(15),
            json!(18),
            json!(false),
            json!(true),
            json!(false),
            json!("gw-1/2026-12-01"),
            json!(4),
            json!("ab12"),
            json!("{\"messages\":[]}"),
            Value::Null,
        ]);
        json!({"tables": [table(&columns, json!([row]))]})
    } else {
        // A search: the calls after the cursor, in the order of `order by TimeGenerated desc,
        // CorrelationId desc` (ids compared character by character, as strcmp() does), as many
        // as `take` asks for.
        assert!(
            kql.contains("| order by TimeGenerated desc, CorrelationId desc\n"),
            "{kql}"
        );
        let take: usize = kql
            .split("| take ")
            .nth(1)
            .and_then(|t| t.split('\n').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap();
        let mut calls: Vec<(i128, String)> = calls_of(&double)
            .into_iter()
            .filter_map(|(at, id)| Some((time_as_read(&double, &kql, &timespan, at, &id)?, id)))
            .collect();
        calls.sort_by(|a, b| b.cmp(a));
        let cursor = after(&kql);
        let mut rows: Vec<Value> = calls
            .iter()
            .filter(|(at, id)| {
                cursor
                    .as_ref()
                    .is_none_or(|(after, last)| at < after || (at == after && id < last))
            })
            .take(take)
            .map(|(at, id)| summary_row(*at, id))
            .collect();
        let search = double.searches.fetch_add(1, Ordering::SeqCst) + 1;
        let partial_from = double.partial_from_search.load(Ordering::SeqCst);
        if partial_from > 0 && search >= partial_from {
            rows.truncate(rows.len() / 2);
            return Json(json!({
                "tables": [table(&SUMMARY, json!(rows))],
                "error": {"code": "PartialError", "message": "There were some errors when processing your query.", "details": [{"code": "EngineError", "message": "Query result set has exceeded the internal record count limit 500000"}]}
            }))
            .into_response();
        }
        json!({"tables": [table(&SUMMARY, json!(rows))]})
    };
    Json(answer).into_response()
}

async fn start_double() -> (String, Arc<Double>) {
    let double = Arc::new(Double::default());
    let app = Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1/workspaces/{workspace}/query", post(query))
        .with_state(Arc::clone(&double));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), double)
}

async fn source(base: &str, dir: &tempfile::TempDir) -> LogAnalyticsSource {
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let mut settings = LogAnalyticsSettings::new(
        WORKSPACE.to_owned(),
        ClientCredentials {
            tenant_id: TENANT.to_owned(),
            client_id: "portal-app".to_owned(),
            client_secret: SecretRef::try_from(format!("file:{}", secret_file.display())).unwrap(),
            authority: Some(base.parse().unwrap()),
        },
    );
    settings.endpoint = Some(base.parse().unwrap());
    settings.max_retry_wait = Duration::from_secs(2);
    LogAnalyticsSource::new(settings).await.unwrap()
}

fn range() -> TimeRange {
    TimeRange::new(
        datetime!(2026-12-01 00:00 UTC),
        datetime!(2026-12-02 00:00 UTC),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn figures_usage_search_and_call_come_from_the_query_api() {
    let (base, double) = start_double().await;
    let dir = tempfile::tempdir().unwrap();
    let source = source(&base, &dir).await;

    // Figures: the PartialError becomes a warning, the values are read.
    let figures = source.figures(range(), Granularity::Hour).await.unwrap();
    assert_eq!(figures.value.requests, 120);
    assert_eq!(figures.value.errors, 6);
    assert_eq!(figures.value.latency.p95_ms, Some(413));
    assert_eq!(figures.value.time_to_first_token.p50_ms, Some(20));
    assert_eq!(figures.value.by_model.len(), 2);
    assert_eq!(figures.warnings.len(), 1);
    assert!(
        figures.warnings[0].starts_with("PartialError"),
        "{:?}",
        figures.warnings
    );
    assert!(figures.warnings[0].contains("internal data size limit"));
    {
        let queries = double.queries.lock().unwrap();
        // From the range's start to now: a row Azure received days after its call is stored
        // with the time received in TimeGenerated, which the timespan filters on.
        let (from, to) = queries[0].1.split_once('/').unwrap();
        assert_eq!(from, "2026-12-01T00:00:00.000000Z");
        assert!(to >= "2026-12-02T00:00:00.000000Z", "{to}");
        assert!(queries[0].0.starts_with("ApiManagementGatewayLogs_CL\n"));
    }

    // Usage: numbers as numbers or text are both read.
    let usage = source
        .usage(&UsageRequest {
            range: range(),
            granularity: Granularity::Hour,
            dimension: Dimension::Group,
            only: Some(vec!["g-red".into()]),
        })
        .await
        .unwrap();
    assert_eq!(usage.value.len(), 2);
    assert_eq!(usage.value[1].requests, 2);
    assert_eq!(usage.value[0].bucket, datetime!(2026-12-01 10:00 UTC));
    // A top value read back from the store may hold any character: it is escaped, not refused.
    source
        .usage(&UsageRequest {
            range: range(),
            granularity: Granularity::Hour,
            dimension: Dimension::User,
            only: Some(vec!["mallory\u{1}\r".into()]),
        })
        .await
        .unwrap();
    {
        let queries = double.queries.lock().unwrap();
        let kql = &queries.last().unwrap().0;
        let at = kql.find("Value in (\"").expect(kql) + "Value in (\"".len();
        assert_eq!(literal_value(&kql[at..]).0, "mallory\u{1}\r", "{kql}");
    }

    // Search: a page of 5 of 7 and a cursor; hostile input stays inside literals.
    let request = SearchRequest::parse(
        &SearchForm {
            from: "2026-12-01T00:00".into(),
            to: "2026-12-02T00:00".into(),
            user: "x\" or 1==1 | union *".into(),
            text: "launch".into(),
            limit: "5".into(),
            ..SearchForm::default()
        },
        datetime!(2026-12-03 00:00 UTC),
    )
    .unwrap();
    let page = source.search(&request).await.unwrap().value;
    assert_eq!(page.items.len(), 5);
    assert_eq!(page.items[0].correlation_id, "call-0");
    assert_eq!(
        page.items[0].user_name.as_deref(),
        Some("alice@contoso.com")
    );
    let next = page.next.clone().unwrap();
    {
        let queries = double.queries.lock().unwrap();
        let kql = &queries.last().unwrap().0;
        assert!(
            kql.contains(r#"UserId =~ "x\" or 1==1 | union *""#),
            "{kql}"
        );
        assert!(kql.contains("| take 6\n"));
        assert!(kql.contains(r#"RequestMessages has "launch""#));
    }
    let second = source
        .search(&SearchRequest {
            cursor: Some(next),
            ..request.clone()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = second
        .value
        .items
        .iter()
        .map(|row| row.correlation_id.as_str())
        .collect();
    assert_eq!(ids, ["call-5", "call-6"]);
    assert_eq!(second.value.next, None);
    {
        let queries = double.queries.lock().unwrap();
        let kql = &queries.last().unwrap().0;
        assert!(
            kql.contains(r#"TimeGenerated == datetime(2026-12-01T10:55:00.5000000Z) and strcmp(CorrelationId, "call-4") < 0)"#),
            "{kql}"
        );
    }

    // Totals per value: one row per value, no buckets.
    let totals = source
        .usage_totals(&UsageRequest {
            range: range(),
            granularity: Granularity::Hour,
            dimension: Dimension::User,
            only: None,
        })
        .await
        .unwrap();
    assert_eq!(totals.value.len(), 2);
    assert_eq!(totals.value[0].value, "oid-1");
    assert_eq!(totals.value[0].errors, 1);
    assert_eq!(totals.value[0].total_tokens, 500);
    {
        let queries = double.queries.lock().unwrap();
        let kql = &queries.last().unwrap().0;
        assert!(!kql.contains("bin("), "{kql}");
    }

    // One call: the summary, flags, chain link, and the pieces joined in order.
    let call = source.call("call-0").await.unwrap().value.unwrap();
    assert_eq!(call.backend_id.as_deref(), Some("east"));
    assert!(call.tokens_estimated);
    assert_eq!(
        (call.time_to_first_byte, call.time_to_first_token),
        (Some(15), Some(18))
    );
    assert!(call.response_truncated && !call.request_truncated);
    assert_eq!(call.chain.as_ref().unwrap().sequence, 4);
    assert_eq!(
        call.request_messages.as_deref(),
        Some("[{\"role\":\"user\",\"content\":\"first half second half\"}]")
    );
    assert_eq!(call.response_messages.as_deref(), Some("[\"the answer\"]"));
    // The bodies as Azure Monitor keeps them; one removed by retention (or never captured) is
    // absent.
    assert_eq!(call.request_body.as_deref(), Some("{\"messages\":[]}"));
    assert_eq!(call.response_body, None);

    // A refused query is an error with the API's code and message.
    let bad = source
        .search(&SearchRequest {
            model: Some("syntax-error".into()),
            cursor: None,
            ..request
        })
        .await;
    match bad {
        Err(InsightsError::LogAnalytics(message)) => {
            assert!(message.contains("HTTP 400"), "{message}");
            assert!(message.contains("BadArgumentError"), "{message}");
        }
        other => unreachable!("expected a refusal, got {other:?}"),
    }
    // The token was fetched once and reused.
    assert_eq!(double.tokens_issued.load(Ordering::SeqCst), 1);
}

/// A call whose rows Azure received days after it (a journal replayed after a long outage): Azure
/// stored the time received in `TimeGenerated`, the call's own time in `GatehouseTimeGenerated`.
/// A search of the call's day finds it at its own time and place, and its detail shows that time.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_stored_days_late_is_found_and_shown_at_its_own_time() {
    let (base, double) = start_double().await;
    let calls = default_calls();
    let (late_at, late_id) = calls[3].clone();
    let received = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    double
        .received_late
        .lock()
        .unwrap()
        .insert(late_id.clone(), ticks(received));
    let dir = tempfile::tempdir().unwrap();
    let source = source(&base, &dir).await;

    let page = source.search(&whole_day()).await.unwrap().value;
    let found: Vec<(i128, String)> = page
        .items
        .iter()
        .map(|row| (ticks(row.time_generated), row.correlation_id.clone()))
        .collect();
    assert_eq!(
        found, calls,
        "the late call among the others, at its own time"
    );
    {
        let queries = double.queries.lock().unwrap();
        let (kql, timespan) = queries.last().unwrap();
        let (from, to) = timespan.split_once('/').unwrap();
        assert_eq!(from, "2026-12-01T00:00:00.000000Z");
        assert!(
            parse_ticks(to) > ticks(received),
            "{timespan}: the span reaches the time Azure received the call's rows"
        );
        assert!(
            kql.starts_with(&format!("ApiManagementGatewayLogs_CL\n{CALL_TIME}")),
            "{kql}"
        );
    }

    let call = source.call(&late_id).await.unwrap().value.unwrap();
    assert_eq!(call.row.correlation_id, late_id);
    assert_eq!(ticks(call.row.time_generated), late_at);
}

/// 3,500 calls, seven in each microsecond, at its ticks 6, 6, 5, 4, 4, 3 and 1 (two pairs share
/// a tick), ids falling with the time: pages of 1,000 end inside a microsecond, on the second
/// and on the first call of a pair sharing a tick.
fn many_calls() -> Vec<(i128, String)> {
    let base = ticks(datetime!(2026-12-01 10:00 UTC));
    (0..3_500_u32)
        .map(|i| {
            let tick = [6, 6, 5, 4, 4, 3, 1][(i % 7) as usize];
            (
                base - 10 * i128::from(i / 7) + tick,
                format!("{:08x}-0000-7000-8000-{i:012x}", u32::MAX - i),
            )
        })
        .collect()
}

fn whole_day() -> SearchRequest {
    SearchRequest::parse(
        &SearchForm {
            from: "2026-12-01T00:00".into(),
            to: "2026-12-02T00:00".into(),
            ..SearchForm::default()
        },
        datetime!(2026-12-03 00:00 UTC),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_reads_every_page_and_every_call_to_the_tick() {
    let (base, double) = start_double().await;
    *double.calls.lock().unwrap() = many_calls();
    let dir = tempfile::tempdir().unwrap();
    let source: Arc<dyn AuditSource> = Arc::new(source(&base, &dir).await);
    let rows: Vec<_> = export(source, whole_day()).collect().await;
    let rows: Vec<(i128, String)> = rows
        .into_iter()
        .map(|row| {
            let row = row.unwrap_or_else(|error| panic!("the export failed: {error}"));
            (ticks(row.time_generated), row.correlation_id)
        })
        .collect();
    assert_eq!(rows.len(), 3_500);
    assert_eq!(rows, many_calls());
    // Four pages of 1,000 (and one more row each, to know that more follow).
    let queries = double.queries.lock().unwrap();
    assert_eq!(queries.len(), 4);
    assert!(queries.iter().all(|(kql, _)| kql.contains("| take 1001\n")));
    assert!(
        queries[3].0.contains(&format!(
            "TimeGenerated == datetime({}) and strcmp(CorrelationId, \"{}\") < 0",
            tick_text(many_calls()[2_999].0),
            many_calls()[2_999].1
        )),
        "{}",
        queries[3].0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_export_answered_in_part_fails_rather_than_end_short() {
    let (base, double) = start_double().await;
    *double.calls.lock().unwrap() = many_calls();
    double.partial_from_search.store(2, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let source: Arc<dyn AuditSource> = Arc::new(source(&base, &dir).await);
    let mut rows: Vec<_> = export(Arc::clone(&source), whole_day()).collect().await;
    assert_eq!(rows.len(), 1_001, "the first page, then the error");
    match rows.pop() {
        Some(Err(error @ InsightsError::LogAnalytics(_))) => {
            let shown = error.public_message();
            assert!(
                shown.contains("answered in part after 1000 rows"),
                "{shown}"
            );
            assert!(shown.contains("PartialError"), "{shown}");
            assert!(shown.contains("record count limit"), "{shown}");
        }
        other => panic!("expected the export to fail, got {other:?}"),
    }
    assert!(rows.iter().all(Result::is_ok));
    // The search page itself shows the warning beside the rows it has.
    let page = source.search(&whole_day()).await.unwrap();
    assert!(page.warnings[0].starts_with("PartialError"), "{page:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_is_waited_out_when_short_and_reported_when_long() {
    let (base, double) = start_double().await;
    let dir = tempfile::tempdir().unwrap();
    let source = source(&base, &dir).await;
    double.retry_after.store(1, Ordering::SeqCst);
    double.throttle.store(1, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let figures = source.figures(range(), Granularity::Hour).await.unwrap();
    assert_eq!(figures.value.requests, 120);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );

    double.retry_after.store(120, Ordering::SeqCst);
    double.throttle.store(1, Ordering::SeqCst);
    let throttled = source.figures(range(), Granularity::Hour).await;
    assert!(
        matches!(throttled, Err(InsightsError::Throttled(120))),
        "{throttled:?}"
    );
    assert_eq!(
        InsightsError::Throttled(120).public_message(),
        "Log Analytics is throttling queries; try again in 120 seconds"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_limits_itself_and_never_shows_the_secret() {
    let (base, double) = start_double().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut settings = LogAnalyticsSettings::new(
        WORKSPACE.to_owned(),
        ClientCredentials {
            tenant_id: TENANT.to_owned(),
            client_id: "portal-app".to_owned(),
            client_secret: SecretRef::try_from(format!("file:{}", secret_file.display())).unwrap(),
            authority: Some(base.parse().unwrap()),
        },
    );
    settings.endpoint = Some(base.parse().unwrap());
    settings.rate_limit = 2;
    settings.rate_window = Duration::from_millis(600);
    let source = LogAnalyticsSource::new(settings.clone()).await.unwrap();
    let started = std::time::Instant::now();
    // Figures are two queries each: the third query waits for the window.
    source.figures(range(), Granularity::Hour).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    source.figures(range(), Granularity::Hour).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(590),
        "{:?}",
        started.elapsed()
    );

    // A token endpoint that echoes the secret: the error does not carry it.
    double.refuse_tokens.store(1, Ordering::SeqCst);
    let fresh = LogAnalyticsSource::new(settings.clone()).await.unwrap();
    let error = fresh.figures(range(), Granularity::Hour).await.unwrap_err();
    let shown = format!("{error} {error:?} {}", error.public_message());
    assert!(shown.contains("HTTP 401"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(!format!("{fresh:?}").contains(SECRET));

    // An error that echoes the token where the shown text is cut: no part of it is shown.
    double.echo_token.store(1, Ordering::SeqCst);
    let error = source
        .figures(range(), Granularity::Hour)
        .await
        .unwrap_err();
    let shown = format!("{error} {error:?} {}", error.public_message());
    assert!(shown.contains("HTTP 400"), "{shown}");
    assert!(!shown.contains("Bearer t"), "{shown}");
    double.echo_token.store(0, Ordering::SeqCst);

    // Bad settings are refused before any request.
    let mut bad = settings;
    bad.workspace_id = "../../other".to_owned();
    assert!(LogAnalyticsSource::new(bad).await.is_err());
}

/// Every column the detail of one call asks Log Analytics for is a column of the gateway-log table
/// that the deployment template creates (`deploy/azure/gatehouse-dcr.json`): the double above
/// answers whatever the query names, so this is what fails when the query names a column the
/// real table does not have.
#[test]
fn the_call_query_asks_only_for_columns_the_table_has() {
    let template: Value =
        serde_json::from_str(include_str!("../../deploy/azure/gatehouse-dcr.json")).unwrap();
    let table = template["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|resource| {
            resource["properties"]["schema"]["name"]
                == gatehouse_portal_core::insights::kql::GATEWAY_TABLE
        })
        .expect("the template declares the gateway-log table");
    let columns: Vec<&str> = table["properties"]["schema"]["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|column| column["name"].as_str().unwrap())
        .collect();
    let query = gatehouse_portal_core::insights::kql::call("call-1").unwrap();
    let projected: Vec<&str> = query
        .split("| project ")
        .nth(1)
        .unwrap()
        .split(',')
        .map(str::trim)
        .collect();
    assert!(projected.contains(&"BackendRequestBody"), "{projected:?}");
    assert!(projected.contains(&"BackendResponseBody"), "{projected:?}");
    for column in projected {
        assert!(
            columns.contains(&column),
            "{column} is not a column of the table"
        );
    }
}
