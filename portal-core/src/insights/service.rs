//! The dashboards' and the search's operations: each checks the caller's role first; every
//! search, detail view and export by anyone is written to the activity log before it runs
//! (actions `audit.search`, `audit.view`, `audit.export`), so an access that cannot be recorded
//! does not happen.
//!
//! Who sees what:
//! - overview figures (whole service): Admin, Auditor, Viewer;
//! - usage by any dimension: Admin; by group, restricted to the groups they lead: TeamLead;
//! - audit search, call detail and export: Auditor, Admin.

use std::sync::Arc;

use futures::stream::BoxStream;
use gatehouse_schema::portal::Role;
use serde::Serialize;

use super::{
    Answer, AuditSource, CallFull, CallPage, CallRow, ChainCheck, Dimension, Figures, Granularity,
    InsightsError, ModelTokens, SearchRequest, TimeRange, UsagePoint, UsageRequest,
};
use crate::db::{ConfigDb, NewActivity};
use crate::error::PortalError;
use crate::user::{SessionUser, require};

/// The price of a model, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelPrice {
    /// Per million prompt tokens.
    pub prompt_per_million: f64,
    /// Per million completion tokens.
    pub completion_per_million: f64,
}

/// Prices by model name; a logged model matches its exact name, else a priced name followed by a
/// dated version (`gpt-4o` prices `gpt-4o-2024-08-06`, not `gpt-4o-mini-2024-07-18`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PriceTable {
    prices: Vec<(String, ModelPrice)>,
}

/// An estimated cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cost {
    /// US dollars, for the priced models.
    pub usd: f64,
    /// Models that used tokens but have no price.
    pub unpriced_models: Vec<String>,
}

impl PriceTable {
    /// Parses `MODEL=PROMPT/COMPLETION,…` (US dollars per million tokens), e.g.
    /// `gpt-4o=2.5/10,gpt-4o-mini=0.15/0.6`.
    pub fn parse(text: &str) -> Result<PriceTable, String> {
        let mut prices = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (model, price) = entry
                .split_once('=')
                .ok_or_else(|| format!("price `{entry}`: expected MODEL=PROMPT/COMPLETION"))?;
            let (prompt, completion) = price
                .split_once('/')
                .ok_or_else(|| format!("price `{entry}`: expected MODEL=PROMPT/COMPLETION"))?;
            let number = |text: &str| {
                text.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("price `{entry}`: prices are non-negative numbers"))
            };
            let model = model.trim();
            if model.is_empty() {
                return Err(format!("price `{entry}`: the model is empty"));
            }
            prices.push((
                model.to_owned(),
                ModelPrice {
                    prompt_per_million: number(prompt)?,
                    completion_per_million: number(completion)?,
                },
            ));
        }
        Ok(PriceTable { prices })
    }

    /// The price of a logged model name.
    pub fn price(&self, model: &str) -> Option<ModelPrice> {
        self.prices
            .iter()
            .filter(|(name, _)| {
                model == name
                    || model
                        .strip_prefix(name.as_str())
                        .and_then(|rest| rest.strip_prefix('-'))
                        .is_some_and(|version| version.starts_with(|c: char| c.is_ascii_digit()))
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
    }

    /// Whether no price is set.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The estimated cost of the tokens of some models.
    pub fn cost(&self, by_model: &[ModelTokens]) -> Cost {
        let mut cost = Cost::default();
        for model in by_model {
            match self.price(&model.model) {
                Some(price) => {
                    cost.usd += model.prompt_tokens as f64 / 1e6 * price.prompt_per_million
                        + model.completion_tokens as f64 / 1e6 * price.completion_per_million;
                }
                None if model.prompt_tokens + model.completion_tokens > 0 => {
                    cost.unpriced_models.push(model.model.clone());
                }
                None => {}
            }
        }
        cost
    }
}

/// The figures of one range with what is derived from them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FigureSet {
    /// The range.
    pub range: TimeRange,
    /// The figures.
    pub figures: Figures,
    /// Estimated cost.
    pub cost: Cost,
}

impl FigureSet {
    /// Errors per request, when there were requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.figures.requests > 0)
            .then(|| self.figures.errors as f64 / self.figures.requests as f64)
    }
}

/// The overview: a range and the range of equal length before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverviewReport {
    /// Which source answered.
    pub source: &'static str,
    /// Bucket size the range was aligned to.
    #[serde(skip)]
    pub granularity: Granularity,
    /// This range.
    pub current: FigureSet,
    /// The one before.
    pub previous: FigureSet,
}

/// The sums of one dimension value over a range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageTotal {
    /// The value (model name, group id, …).
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
}

impl UsageTotal {
    /// The buckets of usage points added up per value, in the order of the values.
    pub fn sum_by_value(points: &[UsagePoint]) -> Vec<UsageTotal> {
        let mut totals: std::collections::BTreeMap<&str, UsageTotal> =
            std::collections::BTreeMap::new();
        for point in points {
            let total = totals
                .entry(point.value.as_str())
                .or_insert_with(|| UsageTotal {
                    value: point.value.clone(),
                    ..UsageTotal::default()
                });
            total.requests += point.requests;
            total.errors += point.errors;
            total.prompt_tokens += point.prompt_tokens;
            total.completion_tokens += point.completion_tokens;
            total.total_tokens += point.total_tokens;
            total.latency_sum_ms += point.latency_sum_ms;
        }
        totals.into_values().collect()
    }

    /// Mean latency, ms.
    pub fn average_latency_ms(&self) -> i64 {
        if self.requests > 0 {
            self.latency_sum_ms / self.requests
        } else {
            0
        }
    }
}

/// At most this many usage points (buckets × values) are read for one chart or CSV: the CSV of
/// a request that would hold more is refused (a shorter range or another split), and the chart
/// then reads only the values it draws.
pub const MAX_USAGE_POINTS: usize = 100_000;

/// Which buckets a usage report reads besides the totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsagePoints {
    /// Every bucket of every value (the CSV); refused beyond [`MAX_USAGE_POINTS`].
    All,
    /// Every bucket of every value when they fit in [`MAX_USAGE_POINTS`], else those of the
    /// `n` values with the most tokens only (the chart's lines).
    Top(usize),
}

/// Usage over a range split by a dimension.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// The range (aligned).
    pub range: TimeRange,
    /// Bucket size.
    #[serde(skip)]
    pub granularity: Granularity,
    /// Split by.
    #[serde(skip)]
    pub dimension: Dimension,
    /// The values the caller may see, when restricted (a team lead's groups).
    pub restricted_to: Option<Vec<String>>,
    /// Totals per value, most tokens first, asked of the source as totals (never the points
    /// added up, which a source with a row limit may have cut short).
    pub totals: Vec<UsageTotal>,
    /// The buckets read, by time: none for the totals alone ([`Insights::usage`]); every value's,
    /// or only the top values' when `points_complete` is false ([`Insights::usage_over_time`]).
    pub points: Vec<UsagePoint>,
    /// Whether `points` holds the buckets of every value in `totals`.
    pub points_complete: bool,
}

impl UsageReport {
    /// Sums the points per value (for a report built from points alone).
    pub fn build(request: &UsageRequest, points: Vec<UsagePoint>) -> UsageReport {
        let totals = UsageTotal::sum_by_value(&points);
        UsageReport::of(request, totals, points, true)
    }

    /// A report of totals (sorted here, most tokens first) and the points read beside them.
    pub fn of(
        request: &UsageRequest,
        mut totals: Vec<UsageTotal>,
        points: Vec<UsagePoint>,
        points_complete: bool,
    ) -> UsageReport {
        totals.sort_by(|a, b| {
            b.total_tokens
                .cmp(&a.total_tokens)
                .then(b.requests.cmp(&a.requests))
                .then(a.value.cmp(&b.value))
        });
        UsageReport {
            range: request.range,
            granularity: request.granularity,
            dimension: request.dimension,
            restricted_to: request.only.clone(),
            totals,
            points,
            points_complete,
        }
    }
}

/// One call in full, with the chain check when asked for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallReport {
    /// The call.
    pub call: CallFull,
    /// The chain check, when asked for.
    pub chain_check: Option<ChainCheck>,
}

/// Which body of a call: what the gateway sent its backend, or what the backend answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyPart {
    /// `BackendRequestBody`.
    Request,
    /// `BackendResponseBody`.
    Response,
}

impl BodyPart {
    /// `request` or `response`.
    pub fn parse(text: &str) -> Result<BodyPart, InsightsError> {
        match text {
            "request" => Ok(BodyPart::Request),
            "response" => Ok(BodyPart::Response),
            _ => Err(InsightsError::invalid("part", "request or response")),
        }
    }

    /// The name [`BodyPart::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            BodyPart::Request => "request",
            BodyPart::Response => "response",
        }
    }
}

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// RFC 4180 CSV.
    Csv,
    /// One JSON object per line.
    JsonLines,
}

/// The source, the config database (for the access log) and the price table.
#[derive(Debug, Clone)]
pub struct Insights {
    source: Option<Arc<dyn AuditSource>>,
    db: ConfigDb,
    prices: PriceTable,
    alerter: Option<Arc<super::alerts::Alerter>>,
}

/// Parses a dimension name (`model`, `group`, …; empty: `group`).
pub fn parse_dimension(name: &str) -> Result<Dimension, InsightsError> {
    match name.trim() {
        "" => Ok(Dimension::Group),
        name => Dimension::parse(name).ok_or_else(|| {
            InsightsError::invalid(
                "dimension",
                "one of model, deployment, operation, subscription, user, group, caller_ip, backend, status_class, all",
            )
        }),
    }
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut clipped: String = text.chars().take(max).collect();
        clipped.push('…');
        clipped
    }
}

impl SearchRequest {
    /// A short description for the activity log.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "{}..{}",
            super::iso_utc(self.range.from),
            super::iso_utc(self.range.to)
        )];
        let mut add = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                parts.push(format!("{name}={value}"));
            }
        };
        add("user", self.user.clone());
        add("caller", self.caller.map(|c| c.to_string()));
        add("model", self.model.clone());
        add("deployment", self.deployment.clone());
        add("operation", self.operation.clone());
        add("status", self.status.map(|s| s.to_string()));
        add("subscription", self.subscription.clone());
        add("text", self.text.clone());
        add("cursor", self.cursor.clone());
        clip(&parts.join(" "), 1_000)
    }
}

impl Insights {
    /// The operations over `source` (none: every question answers "not configured").
    pub fn new(source: Option<Arc<dyn AuditSource>>, db: ConfigDb, prices: PriceTable) -> Insights {
        Insights {
            source,
            db,
            prices,
            alerter: None,
        }
    }

    /// The same with alert rules.
    pub fn with_alerter(mut self, alerter: Arc<super::alerts::Alerter>) -> Insights {
        self.alerter = Some(alerter);
        self
    }

    /// The alerter, to run it.
    pub fn alerter(&self) -> Option<&Arc<super::alerts::Alerter>> {
        self.alerter.as_ref()
    }

    /// The alert rules and their states: Admin.
    pub fn alerts(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<super::alerts::AlertState>, InsightsError> {
        require(user, &[Role::Admin])?;
        Ok(self
            .alerter
            .as_ref()
            .map(|a| a.states())
            .unwrap_or_default())
    }

    /// Which source answers, if any.
    pub fn source_kind(&self) -> Option<&'static str> {
        self.source.as_ref().map(|s| s.kind())
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    fn source(&self) -> Result<&Arc<dyn AuditSource>, InsightsError> {
        self.source.as_ref().ok_or(InsightsError::NotConfigured)
    }

    async fn record(
        &self,
        user: &SessionUser,
        action: &str,
        target: &str,
        detail: Option<String>,
    ) -> Result<(), InsightsError> {
        self.db
            .log_activity(NewActivity {
                actor: &user.actor(),
                action,
                target,
                before: None,
                after: detail,
            })
            .await?;
        Ok(())
    }

    /// The overview's figures for `range` and the range before it: Admin, Auditor, Viewer.
    pub async fn overview(
        &self,
        user: Option<&SessionUser>,
        range: TimeRange,
    ) -> Result<Answer<OverviewReport>, InsightsError> {
        require(user, &[Role::Admin, Role::Auditor, Role::Viewer])?;
        let source = self.source()?;
        let (range, granularity) = range.aligned()?;
        let previous = range.previous()?;
        let current_answer = source.figures(range, granularity).await?;
        let previous_answer = source.figures(previous, granularity).await?;
        let mut warnings = current_answer.warnings;
        super::merge_warnings(&mut warnings, previous_answer.warnings);
        let set = |range: TimeRange, figures: Figures| FigureSet {
            cost: self.prices.cost(&figures.by_model),
            range,
            figures,
        };
        Ok(Answer {
            value: OverviewReport {
                source: source.kind(),
                granularity,
                current: set(range, current_answer.value),
                previous: set(previous, previous_answer.value),
            },
            warnings,
        })
    }

    /// The usage question of `user` over `range` split by `dimension`: Admin (any), TeamLead
    /// (by group, their own groups only).
    fn usage_request(
        user: Option<&SessionUser>,
        range: TimeRange,
        dimension: Dimension,
    ) -> Result<UsageRequest, InsightsError> {
        let user = require(user, &[Role::Admin, Role::TeamLead])?;
        let only = if user.has(Role::Admin) {
            None
        } else if dimension == Dimension::Group {
            Some(user.led_groups.clone())
        } else {
            return Err(PortalError::Forbidden.into());
        };
        let (range, granularity) = range.aligned()?;
        Ok(UsageRequest {
            range,
            granularity,
            dimension,
            only,
        })
    }

    /// The totals per value of usage over `range` split by `dimension` (no points): Admin (any),
    /// TeamLead (by group, their own groups only). One row per value from the source, exact
    /// where the buckets would meet a row limit.
    pub async fn usage(
        &self,
        user: Option<&SessionUser>,
        range: TimeRange,
        dimension: Dimension,
    ) -> Result<Answer<UsageReport>, InsightsError> {
        let request = Self::usage_request(user, range, dimension)?;
        let answer = self.source()?.usage_totals(&request).await?;
        Ok(Answer {
            value: UsageReport::of(&request, answer.value, Vec::new(), false),
            warnings: answer.warnings,
        })
    }

    /// The totals and the buckets of usage over `range` split by `dimension`, for the chart and
    /// the CSV; who may ask as for [`Insights::usage`]. The buckets are read for every value when
    /// there are at most [`MAX_USAGE_POINTS`] of them (buckets × values); beyond that, only the
    /// top values' for [`UsagePoints::Top`], and [`UsagePoints::All`] is refused.
    pub async fn usage_over_time(
        &self,
        user: Option<&SessionUser>,
        range: TimeRange,
        dimension: Dimension,
        which: UsagePoints,
    ) -> Result<Answer<UsageReport>, InsightsError> {
        let request = Self::usage_request(user, range, dimension)?;
        let source = self.source()?;
        let totals = source.usage_totals(&request).await?;
        let mut warnings = totals.warnings;
        let report = UsageReport::of(&request, totals.value, Vec::new(), false);
        if report.totals.is_empty() {
            return Ok(Answer {
                value: UsageReport {
                    points_complete: true,
                    ..report
                },
                warnings,
            });
        }
        let step_minutes: i64 = match request.granularity {
            Granularity::Minute => 1,
            Granularity::Hour => 60,
        };
        let buckets = usize::try_from(
            ((request.range.to - request.range.from).whole_minutes() / step_minutes).max(1),
        )
        .unwrap_or(usize::MAX);
        let everything = buckets.saturating_mul(report.totals.len());
        let points_request = if everything <= MAX_USAGE_POINTS {
            None
        } else {
            match which {
                UsagePoints::All => {
                    return Err(InsightsError::invalid(
                        "range",
                        format!(
                            "{} values × {buckets} buckets is more than {MAX_USAGE_POINTS} points; choose a shorter range or another split",
                            report.totals.len()
                        ),
                    ));
                }
                UsagePoints::Top(n) => Some(UsageRequest {
                    // The top values are among those the caller may see (the totals were
                    // restricted), so this narrows a team lead's restriction, never widens it.
                    only: Some(
                        report
                            .totals
                            .iter()
                            .take(n.max(1))
                            .map(|t| t.value.clone())
                            .collect(),
                    ),
                    ..request.clone()
                }),
            }
        };
        let points_complete = points_request.is_none();
        let points = source
            .usage(points_request.as_ref().unwrap_or(&request))
            .await?;
        super::merge_warnings(&mut warnings, points.warnings);
        Ok(Answer {
            value: UsageReport {
                points: points.value,
                points_complete,
                ..report
            },
            warnings,
        })
    }

    /// One page of a search: Auditor, Admin; recorded.
    pub async fn search(
        &self,
        user: Option<&SessionUser>,
        request: &SearchRequest,
    ) -> Result<Answer<CallPage>, InsightsError> {
        let user = require(user, &[Role::Auditor])?;
        let source = self.source()?;
        self.record(
            user,
            "audit.search",
            &request.describe(),
            serde_json::to_string(request).ok(),
        )
        .await?;
        source.search(request).await
    }

    /// One call in full (and its chain verified when `verify`): Auditor, Admin; recorded.
    pub async fn call(
        &self,
        user: Option<&SessionUser>,
        correlation_id: &str,
        verify: bool,
    ) -> Result<Answer<CallReport>, InsightsError> {
        let user = require(user, &[Role::Auditor])?;
        let id = super::filter_value("id", correlation_id, super::MAX_FILTER_CHARS)?
            .ok_or_else(|| InsightsError::invalid("id", "a call id"))?;
        let source = self.source()?;
        self.record(user, "audit.view", &id, None).await?;
        let answer = source.call(&id).await?;
        let call = answer
            .value
            .ok_or_else(|| PortalError::NotFound(format!("call {id}")))?;
        let chain_check = if verify {
            Some(source.verify_chain(&call).await?)
        } else {
            None
        };
        Ok(Answer {
            value: CallReport { call, chain_check },
            warnings: answer.warnings,
        })
    }

    /// One body of a call, whole and as captured (`None` when it was not captured, or retention
    /// removed it): Auditor, Admin; recorded (`audit.body`, the call's id and which body).
    pub async fn call_body(
        &self,
        user: Option<&SessionUser>,
        correlation_id: &str,
        part: BodyPart,
    ) -> Result<Answer<Option<String>>, InsightsError> {
        let user = require(user, &[Role::Auditor])?;
        let id = super::filter_value("id", correlation_id, super::MAX_FILTER_CHARS)?
            .ok_or_else(|| InsightsError::invalid("id", "a call id"))?;
        let source = self.source()?;
        self.record(user, "audit.body", &format!("{id} {}", part.as_str()), None)
            .await?;
        let answer = source.call(&id).await?;
        let call = answer
            .value
            .ok_or_else(|| PortalError::NotFound(format!("call {id}")))?;
        Ok(Answer {
            value: match part {
                BodyPart::Request => call.request_body,
                BodyPart::Response => call.response_body,
            },
            warnings: answer.warnings,
        })
    }

    /// Every call of a search, streamed: Auditor, Admin; recorded.
    pub async fn export(
        &self,
        user: Option<&SessionUser>,
        request: SearchRequest,
        format: ExportFormat,
    ) -> Result<BoxStream<'static, Result<CallRow, InsightsError>>, InsightsError> {
        let user = require(user, &[Role::Auditor])?;
        let source = Arc::clone(self.source()?);
        let format = match format {
            ExportFormat::Csv => "csv",
            ExportFormat::JsonLines => "jsonl",
        };
        self.record(
            user,
            "audit.export",
            &format!("{format} {}", request.describe()),
            serde_json::to_string(&request).ok(),
        )
        .await?;
        Ok(super::export(source, request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_match_by_prefix_and_estimate_cost() {
        let only_4o = PriceTable::parse("gpt-4o=2.5/10").unwrap();
        assert!(only_4o.price("gpt-4o-mini-2024-07-18").is_none());
        let prices = PriceTable::parse("gpt-4o=2.5/10, gpt-4o-mini=0.15/0.6").unwrap();
        assert_eq!(
            prices
                .price("gpt-4o-2024-08-06")
                .unwrap()
                .prompt_per_million,
            2.5
        );
        assert_eq!(
            prices
                .price("gpt-4o-mini-2024-07-18")
                .unwrap()
                .prompt_per_million,
            0.15
        );
        assert!(prices.price("o1").is_none());
        let cost = prices.cost(&[
            ModelTokens {
                model: "gpt-4o".into(),
                requests: 1,
                prompt_tokens: 1_000_000,
                completion_tokens: 500_000,
            },
            ModelTokens {
                model: "o1".into(),
                requests: 1,
                prompt_tokens: 5,
                completion_tokens: 0,
            },
        ]);
        assert!((cost.usd - 7.5).abs() < 1e-9);
        assert_eq!(cost.unpriced_models, ["o1"]);
        for bad in ["gpt-4o", "gpt-4o=1", "gpt-4o=a/1", "=1/2", "x=-1/2"] {
            assert!(PriceTable::parse(bad).is_err(), "{bad}");
        }
    }
}
