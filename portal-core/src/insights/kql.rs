//! The dashboards' and the search's questions as KQL, against the custom tables the Azure Monitor
//! sink writes (`ApiManagementGatewayLogs_CL`, `ApiManagementGatewayLlmLog_CL`; column names as in
//! `gatehouse_audit::rows`).
//!
//! A call's time is its row's `GatehouseTimeGenerated` where the row has one, else its
//! `TimeGenerated` (`rows_of`): Azure stores a row received more than two days after its call
//! with the time received in `TimeGenerated` (see `gatehouse_audit::azure_monitor`, "Rows sent
//! late"), so every query first puts the call's time in `TimeGenerated`, and filters, bins,
//! orders and shows that.
//!
//! Nothing a user typed is ever placed in a query except through [`string_literal`], nor a value
//! read back from the store except through [`escaped_literal`]; times are formatted from parsed
//! values ([`datetime_literal`]), numbers from integers, column names from fixed enums.

use std::fmt::Write as _;

use super::{Dimension, Granularity, InsightsError, SearchRequest, TimeRange, UsageRequest};
use gatehouse_audit::azure_monitor::{CALL_TIME_COLUMN, ROW_ID_COLUMN};
use ipnet::IpNet;

/// The gateway-log table (one row per call).
pub const GATEWAY_TABLE: &str = "ApiManagementGatewayLogs_CL";
/// The LLM-log table (a header row, then prompt and completion pieces).
pub const LLM_TABLE: &str = "ApiManagementGatewayLlmLog_CL";
/// Longest string a literal may hold.
pub const MAX_LITERAL_CHARS: usize = 1_000;

/// The columns a search result row needs, in order.
pub const SUMMARY_COLUMNS: &str = "TimeGenerated, CorrelationId, OperationId, DeploymentName, ModelName, CallerIpAddress, UserId, UserName, ApimSubscriptionId, ResponseCode, TotalTokens, TotalTime";

/// `value`, typed by a user, as a double-quoted KQL string literal: [`escaped_literal`], refused
/// when it is over [`MAX_LITERAL_CHARS`].
pub fn string_literal(value: &str) -> Result<String, InsightsError> {
    if value.chars().count() > MAX_LITERAL_CHARS {
        return Err(InsightsError::invalid(
            "query",
            format!("a value of at most {MAX_LITERAL_CHARS} characters"),
        ));
    }
    Ok(escaped_literal(value))
}

/// `value` as a double-quoted KQL string literal, whatever it holds: for values read back from
/// the store (a chart's top values), which may be long or hold any character.
///
/// KQL string literals (the "string data type" reference, section "string literals") escape the
/// enclosing quote, tab (`\t`), newline (`\n`) and the backslash itself with a backslash; a raw
/// line break ends a literal. Kusto's own grammar (`grammar/KqlTokens.g4` of
/// microsoft/Kusto-Query-Language, `EscapeSequence`) also takes `\r` and `\u` with four hex
/// digits, which spell every other control character here (all of them, and the Unicode line and
/// paragraph separators, are in the Basic Multilingual Plane).
pub fn escaped_literal(value: &str) -> String {
    let mut literal = String::with_capacity(value.len() + 2);
    literal.push('"');
    for c in value.chars() {
        match c {
            '"' => literal.push_str("\\\""),
            '\\' => literal.push_str("\\\\"),
            '\t' => literal.push_str("\\t"),
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                // Writing to a String cannot fail.
                let _ = write!(literal, "\\u{:04x}", u32::from(c));
            }
            c => literal.push(c),
        }
    }
    literal.push('"');
    literal
}

/// Nanoseconds in a tick, the unit Log Analytics keeps `datetime` values in (the "datetime data
/// type" reference: "Time values are measured in 100-nanosecond units called ticks").
pub const NANOS_PER_TICK: i128 = 100;

/// A `datetime(…)` literal to the tick: `datetime(2026-12-01T10:55:00.1234567Z)`.
///
/// Seven fractional digits say exactly the tick a stored value holds, so that a row read back
/// from an answer compares equal to the literal made of its time (the search's cursor relies on
/// it). Finer parts of `at` are dropped.
pub fn datetime_literal(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "datetime({:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z)",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.nanosecond() / 100
    )
}

/// A table's rows with the call's own time in `TimeGenerated`: the sink's
/// [`CALL_TIME_COLUMN`], else the stored `TimeGenerated` (rows written before the sink sent the
/// column, and tables created before it was declared: `column_ifexists`). `extend` replaces a
/// column of the same name (the "extend operator" reference: names "that already exist in the
/// input are removed and appended as their new calculated values").
fn rows_of(table: &str) -> String {
    format!(
        "{table}\n| extend TimeGenerated = coalesce(column_ifexists(\"{CALL_TIME_COLUMN}\", datetime(null)), TimeGenerated)\n"
    )
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
        "{}{}\n{}\n",
        rows_of(GATEWAY_TABLE),
        time_filter(range),
        deduplicated()
    )
}

/// The overall figures of a range, percentiles included (time to first token from the column
/// Gatehouse added later: a table created before it has none, and gives no figure).
pub fn figures(range: &TimeRange) -> String {
    format!(
        "{}| extend TimeToFirstToken = column_ifexists(\"TimeToFirstToken\", long(null))\n| summarize Requests = count(), Errors = countif(ResponseCode >= 400), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens), LatencyP50 = percentile(TotalTime, 50), LatencyP95 = percentile(TotalTime, 95), TtftP50 = percentile(TimeToFirstToken, 50), TtftP95 = percentile(TimeToFirstToken, 95)",
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
        Dimension::TimeToFirstTokenMs => "TimeToFirstToken",
    }
}

fn bin_size(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Minute => "1m",
        Granularity::Hour => "1h",
    }
}

/// The calls of a usage question's range, each with its `Value` of the dimension, restricted to
/// the values asked for.
fn usage_values(request: &UsageRequest) -> Result<String, InsightsError> {
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
        // The values a chart's top values were read as, or a lead's groups: never refused.
        let values: Vec<String> = only.iter().map(|value| escaped_literal(value)).collect();
        if values.is_empty() {
            // Nothing may be seen: a query that matches nothing, rather than everything.
            query.push_str("| where false\n");
        } else {
            query.push_str(&format!("| where Value in ({})\n", values.join(", ")));
        }
    }
    Ok(query)
}

/// Usage over time, split by a dimension, in the shape of the rollups.
pub fn usage(request: &UsageRequest) -> Result<String, InsightsError> {
    let mut query = usage_values(request)?;
    query.push_str(&format!(
        "| summarize Requests = count(), Errors = countif(ResponseCode >= 400), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens), TotalTokens = sum(TotalTokens), LatencySumMs = sum(TotalTime), LatencyMaxMs = max(TotalTime) by Bucket = bin(TimeGenerated, {}), Value\n| order by Bucket asc, Value asc",
        bin_size(request.granularity)
    ));
    Ok(query)
}

/// Usage over the whole range, one row per value (`granularity` is not used): what a question
/// that only adds the buckets up asks, in as many rows as there are values rather than buckets
/// times values, far below the Query API's 500,000-row limit.
pub fn usage_totals(request: &UsageRequest) -> Result<String, InsightsError> {
    let mut query = usage_values(request)?;
    query.push_str(
        "| summarize Requests = count(), Errors = countif(ResponseCode >= 400), PromptTokens = sum(PromptTokens), CompletionTokens = sum(CompletionTokens), TotalTokens = sum(TotalTokens), LatencySumMs = sum(TotalTime) by Value\n| order by Value asc",
    );
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

/// The mark of a cursor whose time is in ticks ([`NANOS_PER_TICK`]); a cursor without it is the
/// earlier form, in microseconds.
const TICKS_MARK: char = 't';

impl KqlCursor {
    /// The cursor as a URL token: `t{unix ticks}_{correlation id}`, to the tick (100 ns) Log
    /// Analytics keeps: a coarser time would make the next page skip the rows stored within the
    /// same coarser unit as the last one but before it.
    pub fn encode(&self) -> String {
        format!(
            "{TICKS_MARK}{}_{}",
            self.time.unix_timestamp_nanos() / NANOS_PER_TICK,
            self.correlation_id
        )
    }

    /// Parses [`KqlCursor::encode`]'s token, and the earlier `{unix micros}_{correlation id}`
    /// of links made before it (anything else: an invalid cursor).
    pub fn decode(token: &str) -> Result<KqlCursor, InsightsError> {
        let bad = || InsightsError::invalid("cursor", "the page cursor is not valid");
        let (number, id) = token.split_once('_').ok_or_else(bad)?;
        let (digits, nanos_per_unit) = match number.strip_prefix(TICKS_MARK) {
            Some(ticks) => (ticks, NANOS_PER_TICK),
            None => (number, 1_000),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
            return Err(bad());
        }
        let units: i128 = digits.parse().map_err(|_| bad())?;
        let nanos = units.checked_mul(nanos_per_unit).ok_or_else(bad)?;
        let time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| bad())?;
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
        // `ipv6_is_in_range` takes an IPv4 address as IPv4-mapped IPv6, so a network spanning
        // the mapped range (`::/0`, `::/64`) would find every IPv4 caller too; a search of it
        // means IPv6 callers, as on the SQL stores.
        IpNet::V6(v6) if spans_ipv4_mapped(v6) => format!(
            "| where ipv6_is_in_range(CallerIpAddress, {literal}) and isnull(parse_ipv4(CallerIpAddress))"
        ),
        IpNet::V6(_) => format!("| where ipv6_is_in_range(CallerIpAddress, {literal})"),
    })
}

/// Whether an IPv6 network holds the IPv4-mapped range `::ffff:0:0/96` without being it.
fn spans_ipv4_mapped(net: ipnet::Ipv6Net) -> bool {
    ipnet::Ipv6Net::new(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96)
        .is_ok_and(|mapped| net.contains(&mapped) && net != mapped)
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
            "let text{i} = {}{}\n| where SequenceNumber > 0 and (RequestMessages has {word} or ResponseMessages has {word})\n| distinct CorrelationId;\n",
            rows_of(LLM_TABLE),
            time_filter(&request.range)
        ));
    }
    query.push_str(&rows_of(GATEWAY_TABLE));
    query.push_str(&time_filter(&request.range));
    query.push('\n');
    if let Some(user) = &request.user {
        let user = string_literal(user)?;
        query.push_str(&format!("| where UserId =~ {user} or UserName =~ {user}\n"));
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
        // The rows after the cursor in the order below (time, then id, both descending). KQL
        // has no `<` between two strings (the "Numerical operators" reference defines `<` and
        // `>` between numbers, datetimes and timespans; the "String operators" reference has
        // none): the Query API would refuse the query. strcmp() compares them (its reference:
        // "<0 - the first character that doesn't match has a lower value in string1"),
        // character by character, as the sort orders the ids (the gateway's lowercase UUIDs).
        query.push_str(&format!(
            "| where TimeGenerated < {at} or (TimeGenerated == {at} and strcmp(CorrelationId, {}) < 0)\n",
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
        "{}| where CorrelationId == {}\n| take 1\n| extend TimeToFirstToken = column_ifexists(\"TimeToFirstToken\", long(null))\n| project {SUMMARY_COLUMNS}, BackendId, Attempts, PromptTokens, CompletionTokens, TokensEstimated, TimeToFirstByte, TimeToFirstToken, RequestBodyTruncated, ResponseBodyTruncated, ClientAborted, ChainId, ChainSequence, RecordHash, BackendRequestBody, BackendResponseBody",
        rows_of(GATEWAY_TABLE),
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
    fn control_characters_are_escaped_and_only_typed_values_are_bounded() {
        for (value, literal) in [
            ("a\rb", r#""a\rb""#),
            ("a\u{0}b", r#""a\u0000b""#),
            ("\u{1b}[31m", r#""\u001b[31m""#),
            ("a\u{2028}b", r#""a\u2028b""#),
            ("\u{7f}", r#""\u007f""#),
            ("\u{85}", r#""\u0085""#),
        ] {
            assert_eq!(string_literal(value).unwrap(), literal, "{value:?}");
            assert!(
                !literal.chars().any(char::is_control),
                "{literal:?} holds a raw control character"
            );
        }
        let long = "x".repeat(MAX_LITERAL_CHARS + 1);
        assert!(string_literal(&long).is_err());
        assert_eq!(escaped_literal(&long).len(), long.len() + 2);
    }

    #[test]
    fn a_charts_top_values_are_placed_whatever_they_hold() {
        let stored = format!("eve\u{1}{}", "x".repeat(MAX_LITERAL_CHARS));
        let query = usage(&UsageRequest {
            range: TimeRange::new(
                datetime!(2026-12-01 00:00 UTC),
                datetime!(2026-12-02 00:00 UTC),
            )
            .unwrap(),
            granularity: Granularity::Hour,
            dimension: Dimension::User,
            only: Some(vec![stored]),
        })
        .unwrap();
        assert!(query.contains(r#"in ("eve\u0001xxx"#), "{query}");
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
                r#"| where UserId =~ "eve\" or true or \"" or UserName =~ "eve\" or true or \"""#
            ),
            "{query}"
        );
        assert!(query.contains(r#"ipv4_is_in_range(CallerIpAddress, "10.1.0.0/16")"#));
        // An IPv6 network that spans the IPv4-mapped range finds IPv6 callers only; one inside
        // it finds the IPv4 callers it holds.
        for (caller, ipv6_only) in [
            ("::/0", true),
            ("2001:db8::/32", false),
            ("::ffff:0:0/96", false),
            ("::ffff:10.0.0.0/104", false),
        ] {
            let filter = caller_filter(caller.parse().unwrap()).unwrap();
            assert!(
                filter.contains("ipv6_is_in_range(CallerIpAddress, "),
                "{filter}"
            );
            assert_eq!(
                filter.ends_with("and isnull(parse_ipv4(CallerIpAddress))"),
                ipv6_only,
                "{caller}: {filter}"
            );
        }
        assert!(query.contains("| where ModelName == \"gpt-4o\""));
        assert!(query.contains("| where ResponseCode == 429"));
        assert!(query.contains(r#"RequestMessages has "secret""#));
        assert!(query.contains(r#"ResponseMessages has "\"plan\"""#));
        assert!(query.contains("| where CorrelationId in (text1)"));
        assert!(query.contains(
            "TimeGenerated >= datetime(2026-12-01T00:00:00.0000000Z) and TimeGenerated < datetime(2026-12-02T00:00:00.0000000Z)"
        ));
        assert!(query.ends_with(&format!("| take 51\n| project {SUMMARY_COLUMNS}")));
    }

    #[test]
    fn cursors_round_trip_to_the_tick_and_bad_ones_are_refused() {
        // The gateway stamps nanoseconds; Log Analytics keeps ticks of 100 ns.
        let cursor = KqlCursor {
            time: datetime!(2026-12-01 10:00:00.1234567 UTC),
            correlation_id: "id_with_underscores".into(),
        };
        assert_eq!(cursor.encode(), "t17961192001234567_id_with_underscores");
        assert_eq!(KqlCursor::decode(&cursor.encode()).unwrap(), cursor);
        assert_eq!(
            datetime_literal(cursor.time),
            "datetime(2026-12-01T10:00:00.1234567Z)"
        );
        // A link made before cursors had ticks (microseconds) still reads.
        assert_eq!(
            KqlCursor::decode("1796119200123456_abc").unwrap(),
            KqlCursor {
                time: datetime!(2026-12-01 10:00:00.123456 UTC),
                correlation_id: "abc".into(),
            }
        );
        for bad in [
            "",
            "x_y",
            "123",
            "123_",
            "t_abc",
            "t12x_abc",
            "-5_abc",
            "+5_abc",
            "tt5_abc",
            "t99999999999999999999999999999999999_abc",
        ] {
            match KqlCursor::decode(bad) {
                Err(
                    error @ InsightsError::Invalid {
                        field: "cursor", ..
                    },
                ) => {
                    assert_eq!(error.status(), 422, "{bad}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// The left operand and the operator of every comparison `<`, `<=`, `>` or `>=` of a query
    /// whose right operand is a string literal (KQL defines these between numbers, datetimes
    /// and timespans only: the Query API refuses the query).
    fn string_comparisons(query: &str) -> Vec<String> {
        let mut found = Vec::new();
        let bytes = query.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b != b'<' && b != b'>' {
                continue;
            }
            let rest = query[i + 1..].trim_start_matches('=').trim_start();
            if rest.starts_with('"') || rest.starts_with('\'') || rest.starts_with("@\"") {
                let left = query[..i]
                    .split_whitespace()
                    .next_back()
                    .unwrap_or_default();
                found.push(format!("{left} {}", char::from(b)));
            }
        }
        found
    }

    #[test]
    fn a_next_page_compares_ids_with_strcmp_in_the_order_of_the_sort() {
        let request = SearchRequest::parse(
            &SearchForm {
                from: "2026-12-01T00:00".into(),
                to: "2026-12-02T00:00".into(),
                model: "gpt-4o".into(),
                ..SearchForm::default()
            },
            datetime!(2026-12-03 00:00 UTC),
        )
        .unwrap();
        let next = KqlCursor {
            time: datetime!(2026-12-01 10:55:00.5000001 UTC),
            correlation_id: "call-\"4".into(),
        };
        let query = search(
            &SearchRequest {
                cursor: Some(next.encode()),
                ..request
            },
            51,
        )
        .unwrap();
        assert!(
            query.contains(
                r#"| where TimeGenerated < datetime(2026-12-01T10:55:00.5000001Z) or (TimeGenerated == datetime(2026-12-01T10:55:00.5000001Z) and strcmp(CorrelationId, "call-\"4") < 0)"#
            ),
            "{query}"
        );
        assert_eq!(string_comparisons(&query), Vec::<String>::new(), "{query}");
        // Rows after the cursor in the order the page is taken in: time then id, both
        // descending, so a smaller time, or the same time and a smaller id.
        assert!(
            query.contains("| order by TimeGenerated desc, CorrelationId desc\n| take 51"),
            "{query}"
        );
        // The helper sees the comparison the Query API refuses.
        assert_eq!(
            string_comparisons(r#"T | where (A == 1 and CorrelationId < "x")"#),
            ["CorrelationId <"]
        );
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
    fn usage_totals_are_one_row_per_value() {
        let request = UsageRequest {
            range: TimeRange::new(
                datetime!(2026-12-01 00:00 UTC),
                datetime!(2026-12-31 00:00 UTC),
            )
            .unwrap(),
            granularity: Granularity::Hour,
            dimension: Dimension::User,
            only: None,
        };
        let query = usage_totals(&request).unwrap();
        assert!(!query.contains("bin("), "{query}");
        assert!(
            query.contains("LatencySumMs = sum(TotalTime) by Value\n| order by Value asc"),
            "{query}"
        );
        assert!(
            query.contains("| extend Value = tostring(iff(isnotempty(UserId), UserId, UserName))")
        );
        let only = usage_totals(&UsageRequest {
            only: Some(vec!["oid-1".into()]),
            ..request
        })
        .unwrap();
        assert!(only.contains(r#"| where Value in ("oid-1")"#), "{only}");
    }

    #[test]
    fn every_query_takes_a_calls_time_from_its_own_column_first() {
        let range = TimeRange::new(
            datetime!(2026-12-01 00:00 UTC),
            datetime!(2026-12-02 00:00 UTC),
        )
        .unwrap();
        let usage_request = UsageRequest {
            range,
            granularity: Granularity::Hour,
            dimension: Dimension::Model,
            only: None,
        };
        let search_request = SearchRequest::parse(
            &SearchForm {
                from: "2026-12-01T00:00".into(),
                to: "2026-12-02T00:00".into(),
                text: "launch".into(),
                ..SearchForm::default()
            },
            datetime!(2026-12-03 00:00 UTC),
        )
        .unwrap();
        let call_time = "\n| extend TimeGenerated = coalesce(column_ifexists(\"GatehouseTimeGenerated\", datetime(null)), TimeGenerated)\n";
        for query in [
            figures(&range),
            tokens_by_model(&range),
            usage(&usage_request).unwrap(),
            usage_totals(&usage_request).unwrap(),
            search(&search_request, 51).unwrap(),
            call("call-1").unwrap(),
        ] {
            let mut tables = 0;
            for table in [GATEWAY_TABLE, LLM_TABLE] {
                for (at, _) in query.match_indices(table) {
                    tables += 1;
                    assert!(
                        query[at + table.len()..].starts_with(call_time),
                        "{table} is read without the call's time: {query}"
                    );
                }
            }
            assert!(tables > 0, "{query}");
        }
    }

    #[test]
    fn time_to_first_token_is_read_from_its_own_column_where_the_table_has_it() {
        let range = TimeRange::new(
            datetime!(2026-12-01 00:00 UTC),
            datetime!(2026-12-02 00:00 UTC),
        )
        .unwrap();
        let query = figures(&range);
        assert!(
            query.contains(
                "| extend TimeToFirstToken = column_ifexists(\"TimeToFirstToken\", long(null))\n| summarize"
            ),
            "{query}"
        );
        assert!(
            query.contains("TtftP50 = percentile(TimeToFirstToken, 50)"),
            "{query}"
        );
        assert!(!query.contains("TimeToFirstByte"), "{query}");
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
        before(
            &usage_totals(&UsageRequest {
                range,
                granularity: Granularity::Hour,
                dimension: Dimension::Subscription,
                only: None,
            })
            .unwrap(),
            "| summarize Requests",
        );
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
