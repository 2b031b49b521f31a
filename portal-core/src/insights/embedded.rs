//! The embedded audit store as a source: `gatehouse_audit::sql::SqlStore`'s read API (search,
//! call, usage rollups, chain verification).
//!
//! Percentiles come from the rollups' latency histograms (buckets about 12 % apart, interpolated
//! inside the bucket), so the overview costs the same on a day and on a month of calls; they are
//! within a bucket of the exact nearest-rank figure. Calls recorded before the histograms existed
//! have none.

use futures::FutureExt;
use futures::future::BoxFuture;
use gatehouse_audit::sql::rollup::histogram_percentile;
use gatehouse_audit::sql::{SearchFilter, SqlStore, UsagePoint, UsageQuery};

use super::{
    Answer, AuditSource, CallFull, CallPage, CallRow, ChainCheck, ChainLink, Dimension, Figures,
    Granularity, InsightsError, ModelTokens, Percentiles, SearchRequest, TimeRange, UsageRequest,
    UsageTotal, last_backend,
};

/// The embedded store (SQLite or PostgreSQL).
#[derive(Debug, Clone)]
pub struct EmbeddedSource {
    store: SqlStore,
}

impl EmbeddedSource {
    /// A source over an open store.
    pub fn new(store: SqlStore) -> EmbeddedSource {
        EmbeddedSource { store }
    }

    /// Opens the store at `sqlite:PATH` or `postgres://…`, creating its tables if they are
    /// missing. The gateway's writer owns the store: when this build cannot migrate it (a newer
    /// writer migrated it further), the store is read as it is and a warning logged, rather than
    /// the portal refusing to start.
    pub async fn open(url: &str) -> Result<EmbeddedSource, InsightsError> {
        let store = SqlStore::connect(url).await?;
        if let Err(error) = store.migrate().await {
            tracing::warn!(%error, "the portal could not migrate the audit store; reading it as it is");
        }
        Ok(EmbeddedSource::new(store))
    }

    /// The store.
    pub fn store(&self) -> &SqlStore {
        &self.store
    }

    async fn figures_of(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> Result<Answer<Figures>, InsightsError> {
        let query = |dimension| usage_query(range, granularity, dimension, None);
        let mut figures = Figures::default();
        for point in self.store.usage_totals(&query(Dimension::All)).await? {
            figures.requests += point.requests;
            figures.errors += point.errors;
            figures.prompt_tokens += point.prompt_tokens;
            figures.completion_tokens += point.completion_tokens;
        }
        let mut by_model: Vec<ModelTokens> = Vec::new();
        for point in self.store.usage_totals(&query(Dimension::Model)).await? {
            match by_model.iter_mut().find(|m| m.model == point.value) {
                Some(model) => {
                    model.requests += point.requests;
                    model.prompt_tokens += point.prompt_tokens;
                    model.completion_tokens += point.completion_tokens;
                }
                None => by_model.push(ModelTokens {
                    model: point.value,
                    requests: point.requests,
                    prompt_tokens: point.prompt_tokens,
                    completion_tokens: point.completion_tokens,
                }),
            }
        }
        by_model.sort_by(|a, b| a.model.cmp(&b.model));
        figures.by_model = by_model;
        let (latency, ttft) = self.percentiles(range, granularity).await?;
        figures.latency = latency;
        figures.time_to_first_token = ttft;
        Ok(Answer::new(figures))
    }

    /// p50/p95 of total time and time to first token in the range, from the rollups' latency
    /// histograms (see the module docs).
    async fn percentiles(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> Result<(Percentiles, Percentiles), InsightsError> {
        let mut result = [Percentiles::default(), Percentiles::default()];
        for (slot, dimension) in [Dimension::LatencyMs, Dimension::TimeToFirstTokenMs]
            .into_iter()
            .enumerate()
        {
            let points = self
                .store
                .usage_totals(&usage_query(range, granularity, dimension, None))
                .await?;
            let buckets: Vec<(u64, i64)> = points
                .iter()
                .filter_map(|point| Some((point.value.parse().ok()?, point.requests)))
                .collect();
            let at = |p| histogram_percentile(&buckets, p).and_then(|ms| i64::try_from(ms).ok());
            result[slot] = Percentiles {
                p50_ms: at(50.0),
                p95_ms: at(95.0),
            };
        }
        let [latency, ttft] = result;
        Ok((latency, ttft))
    }
}

/// A rollup question over `range`, split by `dimension`, only for the values `only` when set.
fn usage_query(
    range: TimeRange,
    granularity: Granularity,
    dimension: Dimension,
    only: Option<Vec<String>>,
) -> UsageQuery {
    UsageQuery {
        granularity,
        dimension,
        from: range.from,
        to: range.to,
        only,
    }
}

/// The rollup question a usage request asks.
fn query_of(request: &UsageRequest) -> UsageQuery {
    usage_query(
        request.range,
        request.granularity,
        request.dimension,
        request.only.clone(),
    )
}

fn filter_of(request: &SearchRequest, limit: u32) -> Result<SearchFilter, InsightsError> {
    let mut filter = SearchFilter::between(request.range.from, request.range.to);
    filter.user = request.user.clone();
    filter.caller = request.caller;
    filter.model = request.model.clone();
    filter.deployment = request.deployment.clone();
    filter.operation = request.operation.clone();
    filter.status = request.status;
    filter.subscription = request.subscription.clone();
    filter.text = request.text.clone();
    filter.limit = limit;
    filter.cursor = request
        .cursor
        .as_deref()
        .map(gatehouse_audit::sql::Cursor::decode)
        .transpose()?;
    Ok(filter)
}

fn row_of(summary: gatehouse_audit::sql::CallSummary) -> CallRow {
    CallRow {
        time_generated: summary.time_generated,
        correlation_id: summary.correlation_id,
        operation_id: summary.operation_id,
        deployment_name: summary.deployment_name,
        model_name: summary.model_name,
        caller_ip_address: summary.caller_ip_address,
        user_id: summary.user_id,
        user_name: summary.user_name,
        apim_subscription_id: summary.apim_subscription_id,
        response_code: summary.response_code,
        total_tokens: summary.total_tokens,
        total_time: summary.total_time,
    }
}

impl AuditSource for EmbeddedSource {
    fn kind(&self) -> &'static str {
        if self.store.sqlite_pool().is_some() {
            "embedded store (SQLite)"
        } else {
            "embedded store (PostgreSQL)"
        }
    }

    fn figures(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> BoxFuture<'_, Result<Answer<Figures>, InsightsError>> {
        self.figures_of(range, granularity).boxed()
    }

    fn usage<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsagePoint>>, InsightsError>> {
        async move {
            // Every bucket of every value (the chart and the CSV export plot them by time), not
            // the per-value totals the figures and percentiles read.
            let points = self.store.usage(&query_of(request)).await?;
            Ok(Answer::new(points))
        }
        .boxed()
    }

    fn usage_totals<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsageTotal>>, InsightsError>> {
        async move {
            // Summed by the database (GROUP BY value over the range's rollup rows): one row per
            // value, whatever the number of buckets.
            let totals = self
                .store
                .usage_totals(&query_of(request))
                .await?
                .into_iter()
                .map(|point| UsageTotal {
                    value: point.value,
                    requests: point.requests,
                    errors: point.errors,
                    prompt_tokens: point.prompt_tokens,
                    completion_tokens: point.completion_tokens,
                    total_tokens: point.total_tokens,
                    latency_sum_ms: point.latency_sum_ms,
                })
                .collect();
            Ok(Answer::new(totals))
        }
        .boxed()
    }

    fn search<'a>(
        &'a self,
        request: &'a SearchRequest,
    ) -> BoxFuture<'a, Result<Answer<CallPage>, InsightsError>> {
        async move {
            let page = self
                .store
                .search(&filter_of(request, request.limit)?)
                .await?;
            Ok(Answer::new(CallPage {
                items: page.items.into_iter().map(row_of).collect(),
                next: page.next,
            }))
        }
        .boxed()
    }

    fn call<'a>(
        &'a self,
        correlation_id: &'a str,
    ) -> BoxFuture<'a, Result<Answer<Option<CallFull>>, InsightsError>> {
        async move {
            let Some(detail) = self.store.call(correlation_id).await? else {
                return Ok(Answer::new(None));
            };
            Ok(Answer::new(Some(CallFull {
                backend_id: last_backend(&detail.attempts),
                row: row_of(detail.summary),
                attempts: detail.attempts,
                prompt_tokens: detail.prompt_tokens,
                completion_tokens: detail.completion_tokens,
                tokens_estimated: detail.tokens_estimated,
                time_to_first_byte: detail.time_to_first_byte,
                time_to_first_token: detail.time_to_first_token,
                request_messages: detail.request_messages,
                response_messages: detail.response_messages,
                request_body: detail.backend_request_body,
                response_body: detail.backend_response_body,
                request_truncated: detail.truncated.0,
                response_truncated: detail.truncated.1,
                client_aborted: detail.client_aborted,
                chain: detail
                    .chain
                    .map(|(chain_id, sequence, record_hash)| ChainLink {
                        chain_id,
                        sequence,
                        record_hash,
                    }),
            })))
        }
        .boxed()
    }

    fn verify_chain<'a>(
        &'a self,
        call: &'a CallFull,
    ) -> BoxFuture<'a, Result<ChainCheck, InsightsError>> {
        async move {
            let Some(link) = &call.chain else {
                return Ok(ChainCheck::NotChained);
            };
            let at = call.row.time_generated;
            let report = self
                .store
                .verify_chains(at, at + time::Duration::microseconds(1))
                .await?;
            Ok(match report.chain(&link.chain_id) {
                Some(chain) => match &chain.first_break {
                    None => ChainCheck::Intact {
                        records: chain.records,
                    },
                    Some(broken) => ChainCheck::Broken {
                        detail: format!(
                            "record {} ({}) {}: {}",
                            broken.sequence, broken.correlation_id, broken.reason, broken.detail
                        ),
                    },
                },
                None => ChainCheck::Broken {
                    detail: "the record's chain was not found".to_owned(),
                },
            })
        }
        .boxed()
    }
}
