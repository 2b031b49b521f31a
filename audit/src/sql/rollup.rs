//! Usage rollups: per minute and per hour × dimension → requests, errors, tokens, latency.
//!
//! A batch of records is folded in memory first, so that a batch of 500 calls of a busy
//! deployment becomes a handful of upserts rather than thousands.

use std::collections::HashMap;

use gatehouse_schema::AuditRecord;
use time::OffsetDateTime;

/// The rollup granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// Buckets of one minute.
    Minute,
    /// Buckets of one hour.
    Hour,
}

impl Granularity {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
        }
    }

    /// The start of the bucket holding `at`.
    pub fn bucket(self, at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        let at = at
            .replace_nanosecond(0)
            .unwrap_or(at)
            .replace_second(0)
            .unwrap_or(at);
        match self {
            Granularity::Minute => at,
            Granularity::Hour => at.replace_minute(0).unwrap_or(at),
        }
    }
}

/// A dimension usage can be split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// Everything together (value `*`).
    All,
    /// Model that answered.
    Model,
    /// Deployment asked for.
    Deployment,
    /// Operation id.
    Operation,
    /// Subscription.
    Subscription,
    /// User (object id, else name).
    User,
    /// Entra group (a call counts once for each of its caller's groups).
    Group,
    /// Resolved caller address.
    CallerIp,
    /// Backend member.
    Backend,
    /// `2xx`, `4xx`, `5xx`, …
    StatusClass,
}

impl Dimension {
    /// Every dimension.
    pub const ALL: [Dimension; 10] = [
        Dimension::All,
        Dimension::Model,
        Dimension::Deployment,
        Dimension::Operation,
        Dimension::Subscription,
        Dimension::User,
        Dimension::Group,
        Dimension::CallerIp,
        Dimension::Backend,
        Dimension::StatusClass,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::All => "all",
            Dimension::Model => "model",
            Dimension::Deployment => "deployment",
            Dimension::Operation => "operation",
            Dimension::Subscription => "subscription",
            Dimension::User => "user",
            Dimension::Group => "group",
            Dimension::CallerIp => "caller_ip",
            Dimension::Backend => "backend",
            Dimension::StatusClass => "status_class",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.as_str() == name)
    }

    fn values(self, record: &AuditRecord) -> Vec<String> {
        let one = |value: Option<&str>| {
            value
                .filter(|v| !v.is_empty())
                .map(|v| vec![v.to_owned()])
                .unwrap_or_default()
        };
        match self {
            Dimension::All => vec!["*".to_owned()],
            Dimension::Model => one(record.model_name.as_deref()),
            Dimension::Deployment => one(record.deployment_name.as_deref()),
            Dimension::Operation => one(record.operation_id.map(|o| o.as_str())),
            Dimension::Subscription => one(record.apim_subscription_id.as_deref()),
            Dimension::User => one(record.user_id.as_deref().or(record.user_name.as_deref())),
            Dimension::Group => record.groups.clone(),
            Dimension::CallerIp => one(Some(&record.caller_ip_address)),
            Dimension::Backend => one(record.backend_id.as_deref()),
            Dimension::StatusClass => vec![format!("{}xx", record.response_code / 100)],
        }
    }
}

/// The key of one rollup row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RollupKey {
    /// Granularity.
    pub granularity: Granularity,
    /// Bucket start.
    pub bucket: OffsetDateTime,
    /// Dimension.
    pub dimension: Dimension,
    /// Dimension value.
    pub value: String,
}

/// The sums of one rollup row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupSums {
    /// Calls.
    pub requests: i64,
    /// Calls answered with status ≥ 400.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Total tokens.
    pub total_tokens: i64,
    /// Sum of total times, ms.
    pub latency_sum_ms: i64,
    /// Largest total time, ms.
    pub latency_max_ms: i64,
}

/// Folds records into rollup rows.
pub fn fold<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> HashMap<RollupKey, RollupSums> {
    let mut rows: HashMap<RollupKey, RollupSums> = HashMap::new();
    for record in records {
        let usage = record.usage.unwrap_or_default();
        let latency = i64::try_from(record.total_time).unwrap_or(i64::MAX);
        let tokens = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for granularity in [Granularity::Minute, Granularity::Hour] {
            let bucket = granularity.bucket(record.time_generated);
            for dimension in Dimension::ALL {
                for value in dimension.values(record) {
                    let sums = rows
                        .entry(RollupKey {
                            granularity,
                            bucket,
                            dimension,
                            value,
                        })
                        .or_default();
                    sums.requests += 1;
                    sums.errors += i64::from(record.response_code >= 400);
                    sums.prompt_tokens += tokens(usage.prompt_tokens);
                    sums.completion_tokens += tokens(usage.completion_tokens);
                    sums.total_tokens += tokens(usage.total_tokens);
                    sums.latency_sum_ms += latency;
                    sums.latency_max_ms = sums.latency_max_ms.max(latency);
                }
            }
        }
    }
    rows
}
