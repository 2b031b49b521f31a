//! The dashboards' plain HTTP routes: the usage chart (SVG), the CSV downloads of the overview
//! and the usage views, the streamed export of an audit search (CSV or JSON lines) and the
//! download of one call's whole request or response body. Each one
//! reads the signed-in user from the session and calls a role-checked operation of
//! `gatehouse_portal_core::insights`; errors are plain text with the status that says what
//! happened. None of them has a place for the warnings the pages show beside their figures, so an
//! answer the source gave only in part is refused (502, naming the warnings) rather than served
//! as a whole one.

use std::sync::Arc;

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures::StreamExt;
use gatehouse_portal_app::ssr::from_another_site;
use gatehouse_portal_core::insights::alerts::{AlertRule, Alerter};
use gatehouse_portal_core::insights::chart::{MAX_SERIES, Metric, usage_svg};
use gatehouse_portal_core::insights::embedded::EmbeddedSource;
use gatehouse_portal_core::insights::log_analytics::{LogAnalyticsSettings, LogAnalyticsSource};
use gatehouse_portal_core::insights::service::{
    BodyPart, ExportFormat, PriceTable, UsagePoints, parse_dimension,
};
use gatehouse_portal_core::insights::{
    Answer, AuditSource, Insights, InsightsError, SearchForm, SearchRequest, csv, iso_utc,
    parse_range,
};
use gatehouse_portal_core::secret::AdminTokenRefs;
use gatehouse_portal_core::user::current_user;
use gatehouse_portal_core::{ConfigDb, Portal, SessionUser};
use gatehouse_schema::config::SecretRef;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use leptos::config::LeptosOptions;
use serde::Deserialize;
use time::OffsetDateTime;
use tower_sessions::Session;

/// Where the dashboards and the audit search read from, and the price table.
#[derive(Debug, Clone, Default)]
pub struct InsightsSettings {
    /// The embedded audit store: `sqlite:PATH` or `postgres://…`.
    pub audit_database: Option<String>,
    /// Log Analytics instead of the embedded store.
    pub log_analytics: Option<LogAnalyticsSettings>,
    /// Prices per model, for the cost estimate.
    pub prices: PriceTable,
    /// Alert rules, evaluated every minute against the source, the gateways and the config
    /// database.
    pub alert_rules: Vec<AlertRule>,
    /// Where alerts are sent (a Slack or Teams incoming webhook URL, as a secret reference).
    pub alert_webhook: Option<SecretRef>,
}

impl InsightsSettings {
    /// Opens the configured source (at most one); the alerter reads gateway admin tokens as
    /// `admin_token_refs` allows.
    pub async fn open(
        &self,
        db: ConfigDb,
        admin_token_refs: AdminTokenRefs,
    ) -> anyhow::Result<Insights> {
        let source: Option<Arc<dyn AuditSource>> = match (&self.audit_database, &self.log_analytics)
        {
            (Some(_), Some(_)) => anyhow::bail!(
                "configure either the audit database or Log Analytics as the dashboards' source, not both"
            ),
            (Some(url), None) => Some(Arc::new(
                EmbeddedSource::open(url)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("audit database")?,
            )),
            (None, Some(settings)) => Some(Arc::new(
                LogAnalyticsSource::new(settings.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .context("Log Analytics")?,
            )),
            (None, None) => None,
        };
        let alerter = if self.alert_rules.is_empty() {
            None
        } else {
            let webhook = match &self.alert_webhook {
                None => None,
                Some(reference) => {
                    let value = gatehouse_portal_core::secret::resolve(reference)
                        .await
                        .map_err(|error| anyhow::anyhow!("alert webhook: {error}"))?;
                    // The URL is a credential: the error does not repeat it.
                    Some(url::Url::parse(value.trim()).map_err(|_| {
                        anyhow::anyhow!("alert webhook {}: not a URL", reference.as_str())
                    })?)
                }
            };
            Some(Arc::new(
                Alerter::new(
                    db.clone(),
                    source.clone(),
                    self.alert_rules.clone(),
                    webhook,
                )
                .await
                .context("alert rules")?
                .with_admin_token_refs(admin_token_refs),
            ))
        };
        let insights = Insights::new(source, db, self.prices.clone());
        Ok(match alerter {
            Some(alerter) => insights.with_alerter(alerter),
            None => insights,
        })
    }
}

/// The routes.
pub fn routes() -> Router<LeptosOptions> {
    Router::new()
        .route("/usage/chart.svg", get(chart))
        .route("/usage/export.csv", get(usage_csv))
        .route("/dashboard/export.csv", get(overview_csv))
        .route("/audit/export", get(audit_export))
        .route("/audit/call/body", get(call_body))
}

fn failure(error: InsightsError) -> Response {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, error.public_message()).into_response()
}

async fn user_of(portal: &Portal, session: &Session) -> Result<Option<SessionUser>, Response> {
    current_user(session, &portal.db, portal.settings.sessions)
        .await
        .map_err(|error| failure(error.into()))
}

/// The usage views' query.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct UsageParams {
    /// Preset range.
    pub range: String,
    /// Start.
    pub from: String,
    /// End.
    pub to: String,
    /// Split by.
    pub dimension: String,
    /// `tokens` or `requests`.
    pub metric: String,
}

fn download(content_type: &'static str, name: &str, body: Body) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The usage report for the chart (the top values' buckets) and the CSV download (every bucket,
/// refused with a 422 beyond `MAX_USAGE_POINTS`): refused when the source answered only in part,
/// since neither has a place for the warning the usage page shows beside its figures.
async fn usage_report(
    portal: &Portal,
    insights: &Insights,
    session: &Session,
    params: &UsageParams,
    which: UsagePoints,
) -> Result<gatehouse_portal_core::insights::service::UsageReport, Response> {
    let user = user_of(portal, session).await?;
    let range = parse_range(
        &params.range,
        &params.from,
        &params.to,
        OffsetDateTime::now_utc(),
    )
    .map_err(failure)?;
    let dimension = parse_dimension(&params.dimension).map_err(failure)?;
    insights
        .usage_over_time(user.as_ref(), range, dimension, which)
        .await
        .and_then(Answer::whole)
        .map_err(failure)
}

async fn chart(
    Extension(portal): Extension<Portal>,
    Extension(insights): Extension<Insights>,
    session: Session,
    Query(params): Query<UsageParams>,
) -> Response {
    let metric = match Metric::parse(&params.metric) {
        Ok(metric) => metric,
        Err(error) => return failure(error),
    };
    let report = match usage_report(
        &portal,
        &insights,
        &session,
        &params,
        UsagePoints::Top(MAX_SERIES),
    )
    .await
    {
        Ok(report) => report,
        Err(response) => return response,
    };
    match usage_svg(&report, metric) {
        Ok(svg) => {
            let mut response = svg.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("image/svg+xml"),
            );
            // Opened on its own, the image may not run or load anything.
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => failure(error),
    }
}

async fn usage_csv(
    Extension(portal): Extension<Portal>,
    Extension(insights): Extension<Insights>,
    session: Session,
    Query(params): Query<UsageParams>,
) -> Response {
    match usage_report(&portal, &insights, &session, &params, UsagePoints::All).await {
        Ok(report) => download(
            "text/csv; charset=utf-8",
            "usage.csv",
            Body::from(csv::usage(&report)),
        ),
        Err(response) => response,
    }
}

async fn overview_csv(
    Extension(portal): Extension<Portal>,
    Extension(insights): Extension<Insights>,
    session: Session,
    Query(params): Query<UsageParams>,
) -> Response {
    let user = match user_of(&portal, &session).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let range = match parse_range(
        &params.range,
        &params.from,
        &params.to,
        OffsetDateTime::now_utc(),
    ) {
        Ok(range) => range,
        Err(error) => return failure(error),
    };
    let report = match insights
        .overview(user.as_ref(), range)
        .await
        .and_then(Answer::whole)
    {
        Ok(report) => report,
        Err(error) => return failure(error),
    };
    let mut out = csv::line(
        &[
            "From",
            "To",
            "Requests",
            "Errors",
            "PromptTokens",
            "CompletionTokens",
            "CostUsd",
            "LatencyP50Ms",
            "LatencyP95Ms",
            "TtftP50Ms",
            "TtftP95Ms",
        ]
        .map(str::to_owned),
    );
    let num = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for set in [&report.current, &report.previous] {
        let f = &set.figures;
        out.push_str(&csv::line(&[
            iso_utc(set.range.from),
            iso_utc(set.range.to),
            f.requests.to_string(),
            f.errors.to_string(),
            f.prompt_tokens.to_string(),
            f.completion_tokens.to_string(),
            format!("{:.4}", set.cost.usd),
            num(f.latency.p50_ms),
            num(f.latency.p95_ms),
            num(f.time_to_first_token.p50_ms),
            num(f.time_to_first_token.p95_ms),
        ]));
    }
    download("text/csv; charset=utf-8", "overview.csv", Body::from(out))
}

/// The export's query: the search form plus the format.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExportParams {
    /// `csv` (default) or `jsonl`.
    pub format: String,
    /// The search.
    #[serde(flatten)]
    pub search: SearchForm,
}

/// Streams the export of an audit search: Auditor, Admin; recorded. Refused (403) when the
/// browser says another site started it: a link there would otherwise export, and record an
/// export, in the name of whoever follows it signed in.
async fn audit_export(
    Extension(portal): Extension<Portal>,
    Extension(insights): Extension<Insights>,
    session: Session,
    headers: HeaderMap,
    Query(params): Query<ExportParams>,
) -> Response {
    if from_another_site(&headers) {
        tracing::warn!("refused an audit export started from another site");
        return (
            StatusCode::FORBIDDEN,
            "An audit export started from another site (a link or a script elsewhere) is refused: \
             start it from the portal's audit search.",
        )
            .into_response();
    }
    let user = match user_of(&portal, &session).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let format = match params.format.as_str() {
        "" | "csv" => ExportFormat::Csv,
        "jsonl" => ExportFormat::JsonLines,
        _ => return failure(InsightsError::invalid("format", "csv or jsonl")),
    };
    let request = match SearchRequest::parse(&params.search, OffsetDateTime::now_utc()) {
        Ok(request) => request,
        Err(error) => return failure(error),
    };
    let rows = match insights.export(user.as_ref(), request, format).await {
        Ok(rows) => rows,
        Err(error) => return failure(error),
    };
    let lines = rows.map(move |row| match row {
        Ok(row) => Ok(Bytes::from(match format {
            ExportFormat::Csv => csv::call_line(&row),
            ExportFormat::JsonLines => csv::call_json_line(&row),
        })),
        Err(error) => {
            tracing::error!(%error, "audit export failed part-way");
            Err(std::io::Error::other(error.public_message()))
        }
    });
    match format {
        ExportFormat::Csv => {
            let header = futures::stream::once(async { Ok(Bytes::from(csv::call_header())) });
            download(
                "text/csv; charset=utf-8",
                "audit.csv",
                Body::from_stream(header.chain(lines)),
            )
        }
        ExportFormat::JsonLines => download(
            "application/x-ndjson",
            "audit.jsonl",
            Body::from_stream(lines),
        ),
    }
}

/// The body download's query.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct BodyParams {
    /// The call's correlation id.
    pub id: String,
    /// `request` or `response`.
    pub part: String,
}

/// Downloads one call's request or response body, whole and as captured (the call page shows
/// the first [`gatehouse_portal_app::audit_search::BODY_SHOWN`] characters): Auditor, Admin;
/// recorded. A body that reads as JSON is `application/json`, any other `text/plain`; both are
/// attachments, never shown by the browser as a page (the content is the callers' untrusted
/// text). Refused (403) when the browser says another site started it, as the export is.
async fn call_body(
    Extension(portal): Extension<Portal>,
    Extension(insights): Extension<Insights>,
    session: Session,
    headers: HeaderMap,
    Query(params): Query<BodyParams>,
) -> Response {
    if from_another_site(&headers) {
        tracing::warn!("refused a call body download started from another site");
        return (
            StatusCode::FORBIDDEN,
            "A body download started from another site (a link or a script elsewhere) is \
             refused: start it from the call's page in the portal.",
        )
            .into_response();
    }
    let user = match user_of(&portal, &session).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let part = match BodyPart::parse(&params.part) {
        Ok(part) => part,
        Err(error) => return failure(error),
    };
    let body = match insights
        .call_body(user.as_ref(), &params.id, part)
        .await
        .and_then(Answer::whole)
    {
        Ok(Some(body)) => body,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                format!(
                    "The {} body of this call was not captured, or retention removed it.",
                    part.as_str()
                ),
            )
                .into_response();
        }
        Err(error) => return failure(error),
    };
    let json = body.trim_start().starts_with(['{', '['])
        && serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok();
    let (content_type, extension) = if json {
        ("application/json", "json")
    } else {
        ("text/plain; charset=utf-8", "txt")
    };
    download(
        content_type,
        &format!(
            "call-{}-{}.{extension}",
            file_name_part(&params.id),
            part.as_str()
        ),
        Body::from(body),
    )
}

/// `text` with every character but ASCII letters, digits, `-` and `.` made `_`, at most 80 of
/// them: a part of a download's file name that cannot break out of its header quotes or name a
/// directory.
fn file_name_part(text: &str) -> String {
    text.trim()
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
