//! The dashboards' and the search's questions as KQL, against the custom tables the Azure Monitor
//! sink writes (`ApiManagementGatewayLogs_CL`, `ApiManagementGatewayLlmLog_CL`; column names as in
//! `gatehouse_audit::rows`).
//!
//! Nothing a user typed is ever placed in a query except through [`string_literal`]; times are
//! formatted from parsed values ([`datetime_literal`]), numbers from integers, column names from
//! fixed enums.

use super::{
    Dimension, Granularity, InsightsError, SearchRequest, TimeRange, UsageRequest, iso_utc,
};
use gatehouse_audit::azure_monitor::ROW_ID_COLUMN;
use ipnet::IpNet;

/// The gateway-log table (one row per call).
pub const GATEWAY_TABLE: &str = "ApiManagementGatewayLogs_CL";
/// The LLM-log table (a header row, then prompt and completion pieces).
pub const LLM_TABLE: &str = "ApiManagementGatewayLlmLog_CL";
/// Longest string a literal may hold.
pub const MAX_LITERAL_CHARS: usize = 1_000;

/// The columns a search result row needs, in order.
pub const SUMMARY_COLUMNS: &str = "TimeGenerated, CorrelationId, OperationId, DeploymentName, ModelName, CallerIpAddress, UserId, UserName, ApimSubscriptionId, ResponseCode, TotalTokens, TotalTime";

/// `value` as a double-quoted KQL string literal.
///
/// KQL string literals (the "string data type" reference, section "string literals") escape the
/// enclosing quote, tab (`\t`), newline (`\n`) and the backslash itself with a backslash; a
/// carriage return cannot appear in a quoted literal at all. Anything else that is a control
/// character is refused rather than guessed at, and so is a value over [`MAX_LITERAL_CHARS`].
pub fn string_literal(value: &str) -> Result<String, InsightsError> {
    if value.chars().count() > MAX_LITERAL_CHARS {
        return Err(InsightsError::invalid(
            "query",
            format!("a value of at most {MAX_LITERAL_CHARS} characters"),
        ));
    }
    let mut literal = String::with_capacity(value.len() + 2);
    literal.push('"');
    for c in value.chars() {
        match c {
            '"' => literal.push_str("\\\""),
            '\\' => literal.push_str("\\\\"),
            '\t' => literal.push_str("\\t"),
            '\n' => literal.push_str("\\n"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                return Err(InsightsError::invalid(
                    "query",
                    "control characters cannot be searched for",
                ));
            }
            c => literal.push(c),
        }
    }
    literal.push('"');
    Ok(literal)
}

/// A `datetime(…)` literal.
pub fn datetime_literal(at: time::OffsetDateTime) -> String {
    format!("datetime({})", iso_utc(at))
}

fn time_filter(range: &TimeRange) -> String {
    format!(
        "| where TimeGenerated >= {} and TimeGenerated < {}",
        datetime_literal(range.from),
        datetime_literal(range.to)
    )
}

/// Keeps one row of each `GatehouseRowId`: the Logs Ingestion API stores a batch twice when its
/// answer was lost and the sink sent it again, and the sink gives each row the same id both times
/// (`gatehouse_audit::azure_monitor::ROW_ID_COLUMN`). `take_any(*)` keeps the columns' names.
fn deduplicated() -> String {
    format!("| summarize take_any(*) by {ROW_ID_COLUMN}")
}

/// The gateway-log rows of a range, each call once.
fn calls_in(range: &TimeRange) -> String {
    format!(
        "{GATEWAY_TABLE}\n{}\n{}\n",
        time_filter(range),
        deduplicated()
    )
}

/// The overall figures of a range, percentiles included.
pub fn figures(range: &TimeRange) -> String {
    format!(
        "{}| summarize Requests = count(), Errors = countif(ResponseCode >= 400), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens), LatencyP50 = percentile(TotalTime, 50), LatencyP95 = percentile(TotalTime, 95), TtftP50 = percentile(TimeToFirstByte, 50), TtftP95 = percentile(TimeToFirstByte, 95)",
        calls_in(range)
    )
}

/// Tokens by model in a range.
pub fn tokens_by_model(range: &TimeRange) -> String {
    format!(
        "{}| summarize Requests = count(), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens) by Model = tostring(ModelName)\n| order by Model asc",
        calls_in(range)
    )
}

/// The expression of a dimension's value (every one a fixed column name).
fn dimension_value(dimension: Dimension) -> &'static str {
    match dimension {
        Dimension::All => "\"*\"",
        Dimension::Model => "ModelName",
        Dimension::Deployment => "DeploymentName",
        Dimension::Operation => "OperationId",
        Dimension::Subscription => "ApimSubscriptionId",
        Dimension::User => "iff(isnotempty(UserId), UserId, UserName)",
        // Expanded from the JSON array below.
        Dimension::Group => "Groups",
        Dimension::CallerIp => "CallerIpAddress",
        Dimension::Backend => "BackendId",
        Dimension::StatusClass => "strcat(tostring(toint(ResponseCode / 100)), \"xx\")",
        // The latency histograms are the embedded store's way to percentiles; Log Analytics
        // computes them with percentile() and never splits by these.
        Dimension::LatencyMs => "TotalTime",
        Dimension::TimeToFirstByteMs => "TimeToFirstByte",
    }
}

fn bin_size(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Minute => "1m",
        Granularity::Hour => "1h",
    }
}

/// Usage over time, split by a dimension, in the shape of the rollups.
pub fn usage(request: &UsageRequest) -> Result<String, InsightsError> {
    let mut query = calls_in(&request.range);
    if request.dimension == Dimension::Group {
        query.push_str("| mv-expand Value = todynamic(Groups) to typeof(string)\n");
    } else {
        query.push_str(&format!(
            "| extend Value = tostring({})\n",
            dimension_value(request.dimension)
        ));
    }
    query.push_str("| where isnotempty(Value)\n");
    if let Some(only) = &request.only {
        let values = only
            .iter()
            .map(|value| string_literal(value))
            .collect::<Result<Vec<_>, _>>()?;
        if values.is_empty() {
            // Nothing may be seen: a query that matches nothing, rather than everything.
            query.push_str("| where false\n");
        } else {
            query.push_str(&format!("| where Value in ({})\n", values.join(", ")));
        }
    }
    query.push_str(&format!(
        "| summarize Requests = count(), Errors = countif(ResponseCode >= 400), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens), TotalTokens = sum(TotalTokens), LatencySumMs = sum(TotalTime), LatencyMaxMs = max(TotalTime) by Bucket = bin(TimeGenerated, {}), Value\n| order by Bucket asc, Value asc",
        bin_size(request.granularity)
    ));
    Ok(query)
}

/// A keyset position of the Log Analytics search: the last row's time and correlation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KqlCursor {
    /// Time of the last row.
    pub time: time::OffsetDateTime,
    /// Its correlation id.
    pub correlation_id: String,
}

impl KqlCursor {
    /// The cursor as a URL token: `{unix micros}_{correlation id}`.
    pub fn encode(&self) -> String {
        format!(
            "{}_{}",
            self.time.unix_timestamp_nanos() / 1_000,
            self.correlation_id
        )
    }

    /// Parses [`KqlCursor::encode`]'s token.
    pub fn decode(token: &str) -> Result<KqlCursor, InsightsError> {
        let bad = || InsightsError::invalid("cursor", "the page cursor is not valid");
        let (micros, id) = token.split_once('_').ok_or_else(bad)?;
        let micros: i128 = micros.parse().map_err(|_| bad())?;
        let time =
            time::OffsetDateTime::from_unix_timestamp_nanos(micros * 1_000).map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(KqlCursor {
            time,
            correlation_id: id.to_owned(),
        })
    }
}

fn caller_filter(net: IpNet) -> Result<String, InsightsError> {
    // The network is a parsed value; its text is still passed as a literal.
    let literal = string_literal(&net.to_string())?;
    Ok(match net {
        IpNet::V4(_) => format!("| where ipv4_is_in_range(CallerIpAddress, {literal})"),
        IpNet::V6(_) => format!("| where ipv6_is_in_range(CallerIpAddress, {literal})"),
    })
}

/// One page of a search (`take` is the page size plus one, to know whether more follow).
pub fn search(request: &SearchRequest, take: u32) -> Result<String, InsightsError> {
    let mut query = String::new();
    let words: Vec<&str> = request
        .text
        .as_deref()
        .map(|text| text.split_whitespace().collect())
        .unwrap_or_default();
    for (i, word) in words.iter().enumerate() {
        let word = string_literal(word)?;
        query.push_str(&format!(
            "let text{i} = {LLM_TABLE}\n{}\n| where SequenceNumber > 0 and (RequestMessages has {word} or ResponseMessages has {word})\n| distinct CorrelationId;\n",
            time_filter(&request.range)
        ));
    }
    query.push_str(GATEWAY_TABLE);
    query.push('\n');
    query.push_str(&time_filter(&request.range));
    query.push('\n');
    if let Some(user) = &request.user {
        let user = string_literal(user)?;
        query.push_str(&format!("| where UserId == {user} or UserName == {user}\n"));
    }
    if let Some(net) = request.caller {
        query.push_str(&caller_filter(net)?);
        query.push('\n');
    }
    for (column, value) in [
        ("ModelName", &request.model),
        ("DeploymentName", &request.deployment),
        ("OperationId", &request.operation),
        ("ApimSubscriptionId", &request.subscription),
    ] {
        if let Some(value) = value {
            query.push_str(&format!("| where {column} == {}\n", string_literal(value)?));
        }
    }
    if let Some(status) = request.status {
        query.push_str(&format!("| where ResponseCode == {status}\n"));
    }
    for i in 0..words.len() {
        query.push_str(&format!("| where CorrelationId in (text{i})\n"));
    }
    if let Some(token) = &request.cursor {
        let cursor = KqlCursor::decode(token)?;
        let at = datetime_literal(cursor.time);
        query.push_str(&format!(
            "| where TimeGenerated < {at} or (TimeGenerated == {at} and CorrelationId < {})\n",
            string_literal(&cursor.correlation_id)?
        ));
    }
    // After the filters, so that only the matches are grouped.
    query.push_str(&deduplicated());
    query.push('\n');
    query.push_str(&format!(
        "| order by TimeGenerated desc, CorrelationId desc\n| take {take}\n| project {SUMMARY_COLUMNS}"
    ));
    Ok(query)
}

/// One call's gateway-log row.
pub fn call(correlation_id: &str) -> Result<String, InsightsError> {
    Ok(format!(
        "{GATEWAY_TABLE}\n| where CorrelationId == {}\n| take 1\n| project {SUMMARY_COLUMNS}, BackendId, Attempts, PromptTokens, CompletionTokens, TokensEstimated, TimeToFirstByte, RequestBodyTruncated, ResponseBodyTruncated, ClientAborted, ChainId, ChainSequence, RecordHash",
        string_literal(correlation_id)?
    ))
}

/// One call's prompt and completion pieces, in order (a piece delivered twice counts once).
pub fn call_pieces(correlation_id: &str) -> Result<String, InsightsError> {
    Ok(format!(
        "{LLM_TABLE}\n| where CorrelationId == {} and SequenceNumber > 0\n| summarize RequestMessages = take_any(RequestMessages), ResponseMessages = take_any(ResponseMessages) by SequenceNumber\n| order by SequenceNumber asc",
        string_literal(correlation_id)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insights::{SearchForm, SearchRequest};
    use time::macros::datetime;

    #[test]
    fn literals_escape_quotes_backslashes_tabs_and_newlines() {
        assert_eq!(string_literal("plain").unwrap(), "\"plain\"");
        assert_eq!(
            string_literal(r#"a" or 1==1 //"#).unwrap(),
            r#""a\" or 1==1 //""#
        );
        assert_eq!(string_literal(r"C:\x\").unwrap(), r#""C:\\x\\""#);
        assert_eq!(string_literal("a\tb\nc").unwrap(), r#""a\tb\nc""#);
        assert_eq!(string_literal("'single'").unwrap(), "\"'single'\"");
        // A literal stays one token: after the opening quote, every quote is escaped.
        let hostile = string_literal("\\\" | take 1000000 | where \"x").unwrap();
        let inner = &hostile[1..hostile.len() - 1];
        let mut escaped = false;
        for c in inner.chars() {
            assert!(escaped || c != '"', "unescaped quote in {hostile}");
            escaped = !escaped && c == '\\';
        }
        assert!(!escaped, "the literal ends in a dangling escape: {hostile}");
    }

    #[test]
    fn what_cannot_be_escaped_is_refused() {
        for bad in ["a\rb", "a\u{0}b", "\u{1b}[31m", "a\u{2028}b", "\u{7f}"] {
            assert!(
                matches!(string_literal(bad), Err(InsightsError::Invalid { .. })),
                "{bad:?}"
            );
        }
        assert!(string_literal(&"x".repeat(MAX_LITERAL_CHARS + 1)).is_err());
    }

    #[test]
    fn a_search_places_every_value_in_a_literal() {
        let request = SearchRequest::parse(
            &SearchForm {
                from: "2026-12-01T00:00".into(),
                to: "2026-12-02T00:00".into(),
                user: "eve\" or true or \"".into(),
                caller: "10.1.0.0/16".into(),
                model: "gpt-4o".into(),
                status: "429".into(),
                text: "secret \"plan\"".into(),
                ..SearchForm::default()
            },
            datetime!(2026-12-03 00:00 UTC),
        )
        .unwrap();
        let query = search(&request, 51).unwrap();
        assert!(
            query.contains(
                r#"| where UserId == "eve\" or true or \"" or UserName == "eve\" or true or \"""#
            ),
            "{query}"
        );
        assert!(query.contains(r#"ipv4_is_in_range(CallerIpAddress, "10.1.0.0/16")"#));
        assert!(query.contains("| where ModelName == \"gpt-4o\""));
        assert!(query.contains("| where ResponseCode == 429"));
        assert!(query.contains(r#"RequestMessages has "secret""#));
        assert!(query.contains(r#"ResponseMessages has "\"plan\"""#));
        assert!(query.contains("| where CorrelationId in (text1)"));
        assert!(query.contains(
            "TimeGenerated >= datetime(2026-12-01T00:00:00.000000Z) and TimeGenerated < datetime(2026-12-02T00:00:00.000000Z)"
        ));
        assert!(query.ends_with(&format!("| take 51\n| project {SUMMARY_COLUMNS}")));
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let cursor = KqlCursor {
            time: datetime!(2026-12-01 10:00:00.123456 UTC),
            correlation_id: "id_with_underscores".into(),
        };
        assert_eq!(KqlCursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in ["", "x_y", "123", "123_"] {
            assert!(KqlCursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_by_group_expands_the_groups_and_keeps_a_lead_to_their_own() {
        let request = UsageRequest {
            range: TimeRange::new(
                datetime!(2026-12-01 00:00 UTC),
                datetime!(2026-12-02 00:00 UTC),
            )
            .unwrap(),
            granularity: Granularity::Hour,
            dimension: Dimension::Group,
            only: Some(vec!["g-1".into(), "g\"2".into()]),
        };
        let query = usage(&request).unwrap();
        assert!(query.contains("mv-expand Value = todynamic(Groups) to typeof(string)"));
        assert!(
            query.contains(r#"| where Value in ("g-1", "g\"2")"#),
            "{query}"
        );
        assert!(query.contains("bin(TimeGenerated, 1h)"));
        let nobody = usage(&UsageRequest {
            only: Some(Vec::new()),
            ..request
        })
        .unwrap();
        assert!(nobody.contains("| where false"));
    }

    #[test]
    fn rows_delivered_twice_count_once() {
        let range = TimeRange::new(
            datetime!(2026-12-01 00:00 UTC),
            datetime!(2026-12-02 00:00 UTC),
        )
        .unwrap();
        let once = "| summarize take_any(*) by GatehouseRowId\n";
        let before = |query: &str, step: &str| {
            let dedup = query
                .find(once)
                .unwrap_or_else(|| panic!("no de-duplication: {query}"));
            let step_at = query
                .find(step)
                .unwrap_or_else(|| panic!("no {step}: {query}"));
            assert!(dedup < step_at, "{step} before the de-duplication: {query}");
            assert_eq!(query.matches(once).count(), 1, "{query}");
        };
        before(&figures(&range), "| summarize Requests");
        before(&tokens_by_model(&range), "| summarize Requests");
        let by_group = usage(&UsageRequest {
            range,
            granularity: Granularity::Hour,
            dimension: Dimension::Group,
            only: None,
        })
        .unwrap();
        before(&by_group, "| mv-expand");
        let request = SearchRequest::parse(
            &SearchForm {
                from: "2026-12-01T00:00".into(),
                to: "2026-12-02T00:00".into(),
                ..SearchForm::default()
            },
            datetime!(2026-12-03 00:00 UTC),
        )
        .unwrap();
        before(&search(&request, 51).unwrap(), "| take 51");
    }
}
