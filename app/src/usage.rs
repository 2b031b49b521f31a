//! The dashboard (overview figures against the previous range) and the usage page (over time,
//! split by a dimension, top-N table, SVG chart, CSV download). Both pages read their question
//! from the query string and ask with plain GET forms, so they work before hydration; the chart is
//! an image served by the portal server (`/usage/chart.svg`), the CSVs are plain downloads.

#![expect(
    missing_docs,
    reason = "#[server] turns each documented function's parameters into the fields of an argument struct"
)]

use leptos::prelude::*;
use leptos_router::hooks::use_query_map;
use serde::{Deserialize, Serialize};

use crate::ServerLink;

/// One figure of the dashboard, with its change against the previous range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FigureCard {
    /// Stable id for tests (`fig-requests`, …).
    pub id: String,
    /// What it is.
    pub label: String,
    /// This range's value, formatted.
    pub value: String,
    /// The previous range's value, formatted.
    pub previous: String,
    /// `+12.5%`, `−3.0%`, `no change`, `new`.
    pub change: String,
}

/// The dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverviewData {
    /// Which source answered.
    pub source: String,
    /// The range shown (UTC).
    pub range: String,
    /// The range compared with.
    pub previous_range: String,
    /// The figures.
    pub cards: Vec<FigureCard>,
    /// Notes on the figures (unpriced models, sampled percentiles).
    pub notes: Vec<String>,
    /// The source's warnings (Log Analytics' partial errors).
    pub warnings: Vec<String>,
    /// The query string of the question, for the CSV link.
    pub query: String,
}

/// One value of the usage table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRowView {
    /// The dimension value.
    pub value: String,
    /// Calls.
    pub requests: i64,
    /// Errors.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Total tokens.
    pub total_tokens: i64,
    /// Mean latency, ms.
    pub average_latency_ms: i64,
}

/// The usage page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageData {
    /// Which source answered.
    pub source: String,
    /// The range shown (UTC) and its bucket size.
    pub range: String,
    /// The dimension.
    pub dimension: String,
    /// For a team lead: the groups shown.
    pub restricted_to: Option<Vec<String>>,
    /// The top values.
    pub rows: Vec<UsageRowView>,
    /// Values beyond the top ones.
    pub more: usize,
    /// The source's warnings.
    pub warnings: Vec<String>,
    /// The query string of the question, for the chart and the CSV.
    pub query: String,
}

/// Rows of the usage table.
pub const TOP_N: usize = 20;

/// Percent-encodes a query string from pairs, leaving out empty values.
pub fn query_string(pairs: &[(&str, &str)]) -> String {
    fn encode(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for byte in text.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(byte));
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
        out
    }
    pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{}={}", encode(key), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Groups digits by thousands.
pub fn thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0 { format!("-{out}") } else { out }
}

/// The change from `previous` to `current`.
pub fn change(current: f64, previous: f64) -> String {
    if previous == 0.0 {
        return if current == 0.0 { "no change" } else { "new" }.to_owned();
    }
    let percent = (current - previous) / previous * 100.0;
    if percent.abs() < 0.05 {
        "no change".to_owned()
    } else {
        format!("{percent:+.1}%")
    }
}

#[cfg(feature = "ssr")]
pub(crate) mod ssr {
    //! The server side: the insights operations and their errors.

    use axum::Extension;
    use gatehouse_portal_core::SessionUser;
    use gatehouse_portal_core::insights::{Insights, InsightsError};
    use leptos::prelude::*;
    use leptos_axum::ResponseOptions;

    /// The insights operations and the signed-in user.
    pub async fn insights_and_user() -> Result<(Insights, Option<SessionUser>), ServerFnError> {
        let (_, user) = crate::ssr::portal_and_user().await?;
        let Extension(insights): Extension<Insights> = leptos_axum::extract().await?;
        Ok((insights, user))
    }

    /// An error as the caller sees it, with its status on a server function's own response.
    pub fn to_error(error: InsightsError) -> ServerFnError {
        let status = http::StatusCode::from_u16(error.status())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let is_server_function = use_context::<http::request::Parts>()
            .is_some_and(|parts| parts.uri.path().starts_with("/api/"));
        if let (true, Some(response)) = (is_server_function, use_context::<ResponseOptions>()) {
            response.set_status(status);
        }
        ServerFnError::ServerError(error.public_message())
    }

    /// `2026-12-01 10:00 – 2026-12-01 11:00 UTC`.
    pub fn range_text(range: &gatehouse_portal_core::insights::TimeRange) -> String {
        let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
        format!(
            "{} – {} UTC",
            range.from.format(format).unwrap_or_default(),
            range.to.format(format).unwrap_or_default()
        )
    }
}

/// The dashboard's figures for a range and the one before: Admin, Auditor, Viewer.
#[server(endpoint = "dashboard_overview")]
pub async fn dashboard_overview(
    range: String,
    from: String,
    to: String,
) -> Result<OverviewData, ServerFnError> {
    use gatehouse_portal_core::insights::parse_range;
    use ssr::{insights_and_user, range_text, to_error};
    let (insights, user) = insights_and_user().await?;
    let asked =
        parse_range(&range, &from, &to, time::OffsetDateTime::now_utc()).map_err(to_error)?;
    let answer = insights
        .overview(user.as_ref(), asked)
        .await
        .map_err(to_error)?;
    let report = answer.value;
    let (cur, prev) = (&report.current, &report.previous);
    let ms = |v: Option<i64>| v.map_or("–".to_owned(), |v| format!("{} ms", thousands(v)));
    let ms_change = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => change(a as f64, b as f64),
        _ => "–".to_owned(),
    };
    let rate = |set: &gatehouse_portal_core::insights::service::FigureSet| {
        set.error_rate()
            .map_or("–".to_owned(), |r| format!("{:.2}%", r * 100.0))
    };
    let count_card = |id: &str, label: &str, a: i64, b: i64| FigureCard {
        id: id.to_owned(),
        label: label.to_owned(),
        value: thousands(a),
        previous: thousands(b),
        change: change(a as f64, b as f64),
    };
    let ms_card = |id: &str, label: &str, a: Option<i64>, b: Option<i64>| FigureCard {
        id: id.to_owned(),
        label: label.to_owned(),
        value: ms(a),
        previous: ms(b),
        change: ms_change(a, b),
    };
    let cards = vec![
        count_card(
            "fig-requests",
            "requests",
            cur.figures.requests,
            prev.figures.requests,
        ),
        FigureCard {
            id: "fig-error-rate".to_owned(),
            label: "error rate".to_owned(),
            value: rate(cur),
            previous: rate(prev),
            change: change(
                cur.error_rate().unwrap_or_default(),
                prev.error_rate().unwrap_or_default(),
            ),
        },
        count_card(
            "fig-prompt-tokens",
            "prompt tokens",
            cur.figures.prompt_tokens,
            prev.figures.prompt_tokens,
        ),
        count_card(
            "fig-completion-tokens",
            "completion tokens",
            cur.figures.completion_tokens,
            prev.figures.completion_tokens,
        ),
        FigureCard {
            id: "fig-cost".to_owned(),
            label: "estimated cost".to_owned(),
            value: format!("${:.2}", cur.cost.usd),
            previous: format!("${:.2}", prev.cost.usd),
            change: change(cur.cost.usd, prev.cost.usd),
        },
        ms_card(
            "fig-latency-p50",
            "latency p50",
            cur.figures.latency.p50_ms,
            prev.figures.latency.p50_ms,
        ),
        ms_card(
            "fig-latency-p95",
            "latency p95",
            cur.figures.latency.p95_ms,
            prev.figures.latency.p95_ms,
        ),
        ms_card(
            "fig-ttft-p50",
            "time to first token p50",
            cur.figures.time_to_first_token.p50_ms,
            prev.figures.time_to_first_token.p50_ms,
        ),
        ms_card(
            "fig-ttft-p95",
            "time to first token p95",
            cur.figures.time_to_first_token.p95_ms,
            prev.figures.time_to_first_token.p95_ms,
        ),
    ];
    let mut notes = Vec::new();
    if insights.prices().is_empty() {
        notes.push("No model prices are configured (--model-prices); the cost is 0.".to_owned());
    }
    if !cur.cost.unpriced_models.is_empty() {
        notes.push(format!(
            "Models without a price, not in the cost: {}",
            cur.cost.unpriced_models.join(", ")
        ));
    }
    if report.source.starts_with("embedded") {
        notes.push(
            "Percentiles come from latency histograms (buckets about 12 % apart).".to_owned(),
        );
    }
    Ok(OverviewData {
        source: report.source.to_owned(),
        range: range_text(&cur.range),
        previous_range: range_text(&prev.range),
        cards,
        notes,
        warnings: answer.warnings,
        query: query_string(&[("range", &range), ("from", &from), ("to", &to)]),
    })
}

/// Usage split by a dimension: Admin (any), TeamLead (by group, their own groups).
#[server(endpoint = "usage_breakdown")]
pub async fn usage_breakdown(
    range: String,
    from: String,
    to: String,
    dimension: String,
) -> Result<UsageData, ServerFnError> {
    use gatehouse_portal_core::insights::parse_range;
    use gatehouse_portal_core::insights::service::parse_dimension;
    use ssr::{insights_and_user, range_text, to_error};
    let (insights, user) = insights_and_user().await?;
    let asked =
        parse_range(&range, &from, &to, time::OffsetDateTime::now_utc()).map_err(to_error)?;
    let parsed = parse_dimension(&dimension).map_err(to_error)?;
    // The totals alone, one row per value from the source (exact on Log Analytics, summed by
    // the database on the embedded store): the table reads no bucket.
    let answer = insights
        .usage(user.as_ref(), asked, parsed)
        .await
        .map_err(to_error)?;
    let report = answer.value;
    let bucket = match report.granularity {
        gatehouse_portal_core::insights::Granularity::Minute => "per minute",
        gatehouse_portal_core::insights::Granularity::Hour => "per hour",
    };
    let more = report.totals.len().saturating_sub(TOP_N);
    Ok(UsageData {
        source: insights.source_kind().unwrap_or_default().to_owned(),
        range: format!("{} ({bucket})", range_text(&report.range)),
        dimension: parsed.as_str().to_owned(),
        restricted_to: report.restricted_to.clone(),
        rows: report
            .totals
            .iter()
            .take(TOP_N)
            .map(|t| UsageRowView {
                value: t.value.clone(),
                requests: t.requests,
                errors: t.errors,
                prompt_tokens: t.prompt_tokens,
                completion_tokens: t.completion_tokens,
                total_tokens: t.total_tokens,
                average_latency_ms: t.average_latency_ms(),
            })
            .collect(),
        more,
        warnings: answer.warnings,
        query: query_string(&[
            ("range", &range),
            ("from", &from),
            ("to", &to),
            ("dimension", parsed.as_str()),
        ]),
    })
}

/// An error from the server, shown where the content would be.
#[component]
pub fn Problem(error: ServerFnError) -> impl IntoView {
    let message = match error {
        ServerFnError::ServerError(message) => message,
        other => other.to_string(),
    };
    view! {
        <div class="callout callout-error" role="alert">
            <p>{message}</p>
        </div>
    }
}

/// Warnings of the source (partial results), shown above the content.
#[component]
pub fn Warnings(warnings: Vec<String>) -> impl IntoView {
    (!warnings.is_empty()).then(|| {
        view! {
            <div class="callout callout-warn" role="status" id="source-warnings">
                <p>"The source answered with warnings; the figures may be incomplete:"</p>
                <ul>{warnings.into_iter().map(|w| view! { <li>{w}</li> }).collect_view()}</ul>
            </div>
        }
    })
}

/// The range part of a GET form: preset or from/to (UTC).
#[component]
pub fn RangeFields(range: String, from: String, to: String) -> impl IntoView {
    let presets = [
        ("1h", "last hour"),
        ("6h", "last 6 hours"),
        ("24h", "last 24 hours"),
        ("7d", "last 7 days"),
        ("30d", "last 30 days"),
    ];
    let current = if range.is_empty() {
        "24h".to_owned()
    } else {
        range
    };
    view! {
        <label>
            "Range"
            <select name="range">
                {presets
                    .into_iter()
                    .map(|(value, text)| {
                        view! {
                            <option value=value selected=current == value>
                                {text}
                            </option>
                        }
                    })
                    .collect_view()}
            </select>
        </label>
        <label>"From (UTC)" <input name="from" type="datetime-local" value=from /></label>
        <label>"To (UTC)" <input name="to" type="datetime-local" value=to /></label>
    }
}

fn param(map: &leptos_router::params::ParamsMap, key: &str) -> String {
    map.get(key).unwrap_or_default()
}

/// The dashboard: requests, tokens, cost, error rate, latency and time to first token for a
/// range, against the range before.
#[component]
pub fn Dashboard() -> impl IntoView {
    let query = use_query_map();
    let asked = move || query.with(|q| (param(q, "range"), param(q, "from"), param(q, "to")));
    let data = Resource::new(asked, |(range, from, to)| {
        dashboard_overview(range, from, to)
    });
    let (range, from, to) = asked();
    view! {
        <h1>"Dashboard"</h1>
        <form method="get" action="/dashboard" class="form-grid" id="dashboard-form">
            <RangeFields range from to />
            <div class="form-actions">
                <button type="submit" class="btn btn-primary">"Show"</button>
            </div>
        </form>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(o) => {
                        let csv = format!("/dashboard/export.csv?{}", o.query);
                        view! {
                            <Warnings warnings=o.warnings />
                            <p class="muted">
                                {o.range} " compared with " {o.previous_range} " · source: "
                                {o.source}
                            </p>
                            <div class="cards" id="dashboard-figures">
                                {o
                                    .cards
                                    .into_iter()
                                    .map(|card| {
                                        view! {
                                            <div class="card figure" id=card.id>
                                                <span class="card-value">{card.value}</span>
                                                <span class="card-label">{card.label}</span>
                                                <span class="figure-change">
                                                    {card.change} " (before: " {card.previous} ")"
                                                </span>
                                            </div>
                                        }
                                    })
                                    .collect_view()}
                            </div>
                            <ul class="notes">
                                {o.notes.into_iter().map(|n| view! { <li class="muted">{n}</li> }).collect_view()}
                            </ul>
                            <p>
                                <ServerLink href=csv id="dashboard-csv">"Download CSV"</ServerLink>
                            </p>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Problem error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

/// Usage over time split by a dimension, with a chart, a top-N table and a CSV download.
#[component]
pub fn Usage() -> impl IntoView {
    let query = use_query_map();
    let asked = move || {
        query.with(|q| {
            (
                param(q, "range"),
                param(q, "from"),
                param(q, "to"),
                param(q, "dimension"),
                param(q, "metric"),
            )
        })
    };
    let data = Resource::new(
        move || {
            let (range, from, to, dimension, _) = asked();
            (range, from, to, dimension)
        },
        |(range, from, to, dimension)| usage_breakdown(range, from, to, dimension),
    );
    let (range, from, to, dimension, metric) = asked();
    let dimension = if dimension.is_empty() {
        "group".to_owned()
    } else {
        dimension
    };
    let dimensions = [
        ("model", "model"),
        ("deployment", "deployment"),
        ("group", "group"),
        ("user", "user"),
        ("subscription", "subscription"),
        ("caller_ip", "caller IP"),
        ("backend", "backend"),
        ("operation", "operation"),
        ("status_class", "status class"),
    ];
    let metric_is_requests = metric == "requests";
    view! {
        <h1>"Usage"</h1>
        <form method="get" action="/usage" class="form-grid" id="usage-form">
            <RangeFields range from to />
            <label>
                "Split by"
                <select name="dimension">
                    {dimensions
                        .into_iter()
                        .map(|(value, text)| {
                            view! {
                                <option value=value selected=dimension == value>
                                    {text}
                                </option>
                            }
                        })
                        .collect_view()}
                </select>
            </label>
            <label>
                "Chart"
                <select name="metric">
                    <option value="tokens" selected=!metric_is_requests>"tokens"</option>
                    <option value="requests" selected=metric_is_requests>"requests"</option>
                </select>
            </label>
            <div class="form-actions">
                <button type="submit" class="btn btn-primary">"Show"</button>
            </div>
        </form>
        <Suspense fallback=|| view! { <p class="muted">"Loading…"</p> }>
            {move || Suspend::new(async move {
                match data.await {
                    Ok(u) => {
                        let metric = if metric_is_requests { "requests" } else { "tokens" };
                        let chart = format!("/usage/chart.svg?{}&metric={metric}", u.query);
                        let csv = format!("/usage/export.csv?{}", u.query);
                        let alt = format!("{metric} over time by {}", u.dimension);
                        view! {
                            <Warnings warnings=u.warnings />
                            <p class="muted">{u.range} " · source: " {u.source}</p>
                            {u
                                .restricted_to
                                .map(|groups| {
                                    let text = if groups.is_empty() {
                                        "You lead no groups, so there is nothing to show.".to_owned()
                                    } else {
                                        format!("Only the groups you lead: {}", groups.join(", "))
                                    };
                                    view! { <p class="callout" id="usage-restricted">{text}</p> }
                                })}
                            <figure class="chart">
                                <img src=chart alt=alt id="usage-chart" width="960" height="380" />
                            </figure>
                            <div class="table-wrap">
                                <table class="table" id="usage-table">
                                    <thead>
                                        <tr>
                                            <th>{u.dimension.clone()}</th>
                                            <th>"Requests"</th>
                                            <th>"Errors"</th>
                                            <th>"Prompt tokens"</th>
                                            <th>"Completion tokens"</th>
                                            <th>"Total tokens"</th>
                                            <th>"Mean latency"</th>
                                        </tr>
                                    </thead>
                                    <tbody>
                                        {u
                                            .rows
                                            .into_iter()
                                            .map(|r| {
                                                let key = r.value.clone();
                                                view! {
                                                    <tr class="usage-row" data-value=key>
                                                        <td>{r.value}</td>
                                                        <td class="num">{thousands(r.requests)}</td>
                                                        <td class="num">{thousands(r.errors)}</td>
                                                        <td class="num">{thousands(r.prompt_tokens)}</td>
                                                        <td class="num">{thousands(r.completion_tokens)}</td>
                                                        <td class="num">{thousands(r.total_tokens)}</td>
                                                        <td class="num">{format!("{} ms", thousands(r.average_latency_ms))}</td>
                                                    </tr>
                                                }
                                            })
                                            .collect_view()}
                                    </tbody>
                                </table>
                            </div>
                            {(u.more > 0).then(|| view! { <p class="muted">{format!("{} more values in the CSV.", u.more)}</p> })}
                            <p>
                                <ServerLink href=csv id="usage-csv">"Download CSV"</ServerLink>
                            </p>
                        }
                            .into_any()
                    }
                    Err(error) => view! { <Problem error /> }.into_any(),
                }
            })}
        </Suspense>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_numbers_and_changes() {
        assert_eq!(
            query_string(&[("range", "24h"), ("from", ""), ("text", "a b&c=d/é")]),
            "range=24h&text=a%20b%26c%3Dd%2F%C3%A9"
        );
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
        assert_eq!(thousands(12), "12");
        assert_eq!(change(110.0, 100.0), "+10.0%");
        assert_eq!(change(0.0, 0.0), "no change");
        assert_eq!(change(5.0, 0.0), "new");
        assert_eq!(change(50.0, 100.0), "-50.0%");
    }
}
