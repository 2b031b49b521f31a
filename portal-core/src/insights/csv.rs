//! CSV and JSON-lines output of the views and the search.
//!
//! CSV follows RFC 4180 (fields with a comma, quote or line break quoted, quotes doubled, CRLF
//! line ends). Text that a spreadsheet would take for a formula — a cell starting with `=`, `+`,
//! `-`, `@`, a tab or a carriage return — gets a leading apostrophe (OWASP "CSV injection"), so
//! that a prompt or a user name can never run as a formula when the file is opened. Numbers the
//! portal computes are written as numbers.

use super::service::{UsageReport, UsageTotal};
use super::{CallRow, iso_utc};

/// One text cell, neutralised and quoted as needed.
pub fn text(value: &str) -> String {
    let neutral = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if neutral.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

/// A line of cells (already encoded) with its CRLF.
pub fn line(cells: &[String]) -> String {
    let mut line = cells.join(",");
    line.push_str("\r\n");
    line
}

fn opt(value: &Option<String>) -> String {
    value.as_deref().map(text).unwrap_or_default()
}

fn num(value: Option<i64>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// The header of a call listing.
pub fn call_header() -> String {
    line(
        &[
            "TimeGenerated",
            "CorrelationId",
            "OperationId",
            "DeploymentName",
            "ModelName",
            "CallerIpAddress",
            "UserId",
            "UserName",
            "ApimSubscriptionId",
            "ResponseCode",
            "TotalTokens",
            "TotalTime",
        ]
        .map(str::to_owned),
    )
}

/// One call as a CSV line.
pub fn call_line(row: &CallRow) -> String {
    line(&[
        iso_utc(row.time_generated),
        text(&row.correlation_id),
        text(&row.operation_id),
        opt(&row.deployment_name),
        opt(&row.model_name),
        text(&row.caller_ip_address),
        opt(&row.user_id),
        opt(&row.user_name),
        opt(&row.apim_subscription_id),
        row.response_code.to_string(),
        num(row.total_tokens),
        row.total_time.to_string(),
    ])
}

/// One call as a JSON line (JSON escapes everything itself).
pub fn call_json_line(row: &CallRow) -> String {
    let mut line = serde_json::to_string(row).unwrap_or_else(|_| "{}".to_owned());
    line.push('\n');
    line
}

fn total_line(dimension: &str, total: &UsageTotal) -> String {
    line(&[
        text(dimension),
        text(&total.value),
        total.requests.to_string(),
        total.errors.to_string(),
        total.prompt_tokens.to_string(),
        total.completion_tokens.to_string(),
        total.total_tokens.to_string(),
        total.average_latency_ms().to_string(),
    ])
}

/// A usage view: the totals per value, then every bucket.
pub fn usage(report: &UsageReport) -> String {
    let dimension = report.dimension.as_str();
    let mut out = line(
        &[
            "Dimension",
            "Value",
            "Requests",
            "Errors",
            "PromptTokens",
            "CompletionTokens",
            "TotalTokens",
            "AverageLatencyMs",
        ]
        .map(str::to_owned),
    );
    for total in &report.totals {
        out.push_str(&total_line(dimension, total));
    }
    out.push_str("\r\n");
    out.push_str(&line(
        &[
            "Bucket",
            "Dimension",
            "Value",
            "Requests",
            "Errors",
            "PromptTokens",
            "CompletionTokens",
            "TotalTokens",
        ]
        .map(str::to_owned),
    ));
    for point in &report.points {
        out.push_str(&line(&[
            iso_utc(point.bucket),
            text(dimension),
            text(&point.value),
            point.requests.to_string(),
            point.errors.to_string(),
            point.prompt_tokens.to_string(),
            point.completion_tokens.to_string(),
            point.total_tokens.to_string(),
        ]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_quoted_and_formulas_neutralised() {
        assert_eq!(text("plain"), "plain");
        assert_eq!(text("a,b"), "\"a,b\"");
        assert_eq!(text("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(text("two\nlines"), "\"two\nlines\"");
        assert_eq!(text("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(text("+1"), "'+1");
        assert_eq!(text("-2+3"), "'-2+3");
        assert_eq!(text("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(text("\tx"), "'\tx");
        assert_eq!(text("a=b"), "a=b");
        assert_eq!(line(&["a".into(), text("b,c")]), "a,\"b,c\"\r\n");
    }
}
