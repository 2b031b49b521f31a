//! Usage rollups: per minute and per hour × dimension → requests, errors, tokens, latency.
//!
//! A batch of records is folded in memory first, so that a batch of 500 calls of a busy
//! deployment becomes a handful of upserts rather than thousands.

use std::collections::HashMap;

use gatehouse_schema::AuditRecord;
use time::OffsetDateTime;

/// The rollup granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Total time as a histogram: the value is the upper bound, ms, of the call's latency bucket
    /// (see [`latency_bucket`]). Not a way to split usage: for percentiles.
    LatencyMs,
    /// Time to first byte as a histogram, like [`Dimension::LatencyMs`].
    TimeToFirstByteMs,
    /// Time to first token as a histogram, like [`Dimension::LatencyMs`] (calls that sent
    /// output only).
    TimeToFirstTokenMs,
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

    /// The latency histograms, kept beside the dimensions of [`Dimension::ALL`].
    pub const HISTOGRAMS: [Dimension; 3] = [
        Dimension::LatencyMs,
        Dimension::TimeToFirstByteMs,
        Dimension::TimeToFirstTokenMs,
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
            Dimension::LatencyMs => "latency_ms",
            Dimension::TimeToFirstByteMs => "ttfb_ms",
            Dimension::TimeToFirstTokenMs => "ttft_ms",
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
                .map(|v| vec![dimension_value(v)])
                .unwrap_or_default()
        };
        match self {
            Dimension::All => vec!["*".to_owned()],
            Dimension::Model => one(record.model_name.as_deref()),
            Dimension::Deployment => one(record.deployment_name.as_deref()),
            Dimension::Operation => one(record.operation_id.map(|o| o.as_str())),
            Dimension::Subscription => one(record.apim_subscription_id.as_deref()),
            Dimension::User => one(record.user_id.as_deref().or(record.user_name.as_deref())),
            Dimension::Group => record.groups.iter().map(|g| dimension_value(g)).collect(),
            Dimension::CallerIp => one(Some(&record.caller_ip_address)),
            Dimension::Backend => one(record.backend_id.as_deref()),
            Dimension::StatusClass => vec![format!("{}xx", record.response_code / 100)],
            Dimension::LatencyMs => vec![latency_bucket(record.total_time).to_string()],
            Dimension::TimeToFirstByteMs => record
                .time_to_first_byte
                .map(|ms| vec![latency_bucket(ms).to_string()])
                .unwrap_or_default(),
            Dimension::TimeToFirstTokenMs => record
                .time_to_first_token
                .map(|ms| vec![latency_bucket(ms).to_string()])
                .unwrap_or_default(),
        }
    }
}

/// The key of one rollup row; ordered (granularity, bucket, dimension, value), the order writers
/// lock rows in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
///
/// Each record adds to about 24 rows, so the map is hashed with foldhash rather than the
/// slower SipHash, in its quality variant seeded at random: the values (user names,
/// deployments, addresses) come from callers.
pub fn fold<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> HashMap<RollupKey, RollupSums, foldhash::quality::RandomState> {
    let mut rows: HashMap<RollupKey, RollupSums, foldhash::quality::RandomState> =
        HashMap::default();
    for record in records {
        let usage = record.usage.unwrap_or_default();
        // A call's counts are taken as at most `u32::MAX` (a backend could report any number),
        // and sums saturate: a row of a store's `bigint` never overflows, on either engine.
        let bounded = |v: u64| i64::from(u32::try_from(v).unwrap_or(u32::MAX));
        let latency = bounded(record.total_time);
        for granularity in [Granularity::Minute, Granularity::Hour] {
            let bucket = granularity.bucket(record.time_generated);
            for dimension in Dimension::ALL.into_iter().chain(Dimension::HISTOGRAMS) {
                for value in dimension.values(record) {
                    let sums = rows
                        .entry(RollupKey {
                            granularity,
                            bucket,
                            dimension,
                            value,
                        })
                        .or_default();
                    sums.requests = sums.requests.saturating_add(1);
                    sums.errors = sums
                        .errors
                        .saturating_add(i64::from(record.response_code >= 400));
                    sums.prompt_tokens = sums
                        .prompt_tokens
                        .saturating_add(bounded(usage.prompt_tokens));
                    sums.completion_tokens = sums
                        .completion_tokens
                        .saturating_add(bounded(usage.completion_tokens));
                    sums.total_tokens = sums
                        .total_tokens
                        .saturating_add(bounded(usage.total_tokens));
                    sums.latency_sum_ms = sums.latency_sum_ms.saturating_add(latency);
                    sums.latency_max_ms = sums.latency_max_ms.max(latency);
                }
            }
        }
    }
    rows
}

/// [`fold`]'s rows in key order, the order every writer upserts (and so locks) them in: two
/// writers on one PostgreSQL store then never each hold a row the other waits for.
pub fn fold_in_lock_order<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Vec<(RollupKey, RollupSums)> {
    let mut rows: Vec<(RollupKey, RollupSums)> = fold(records).into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Latency buckets per decade: bounds about 12 % apart.
const BUCKETS_PER_DECADE: f64 = 20.0;

/// The longest value a rollup row keeps, in bytes: values are part of the rollup tables' keys,
/// and PostgreSQL refuses an index entry over ≈ 2,700 bytes, which would refuse every batch
/// holding the call (a backend naming an absurd `model`). Longer values are cut at a character
/// boundary; the calls' own rows keep them whole.
pub const MAX_DIMENSION_VALUE: usize = 256;

/// `value`, cut to [`MAX_DIMENSION_VALUE`] bytes.
fn dimension_value(value: &str) -> String {
    if value.len() <= MAX_DIMENSION_VALUE {
        return value.to_owned();
    }
    let mut end = MAX_DIMENSION_VALUE;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// The upper bound, ms, of the latency bucket holding `ms`: the bounds are 10^(k/20) rounded
/// (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 16, 18, 20, 22, 25, 28, 32, 35, 40, …), so a
/// percentile read from the histogram is within about 12 % of the exact one.
pub fn latency_bucket(ms: u64) -> u64 {
    if ms <= 1 {
        return 1;
    }
    let k = (BUCKETS_PER_DECADE * (ms as f64).log10()).ceil();
    let bound = 10f64.powf(k / BUCKETS_PER_DECADE).round() as u64;
    // Guard against floating-point rounding just below the value.
    bound.max(ms)
}

/// The value just below the latency bucket whose upper bound is `bound`: the bucket holds the
/// values above it up to `bound` (0 for the first bucket, which holds 0 and 1).
fn bucket_floor(bound: u64) -> u64 {
    // The least value the bucket holds, by bisection: buckets rise with their values.
    let (mut low, mut high) = (0u64, bound);
    while low < high {
        let middle = low + (high - low) / 2;
        if latency_bucket(middle) >= bound {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    low.saturating_sub(1)
}

/// The `p`th percentile (0–100) of a latency histogram given as (bucket upper bound, calls)
/// pairs in any order, interpolated linearly inside its bucket (from the bucket's own lower
/// edge, whatever buckets below it are empty); `None` when it holds no call.
pub fn histogram_percentile(buckets: &[(u64, i64)], p: f64) -> Option<u64> {
    let mut sorted: Vec<(u64, i64)> = buckets.iter().copied().filter(|(_, n)| *n > 0).collect();
    sorted.sort_unstable();
    let total: i64 = sorted.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0 * total as f64).ceil().max(1.0);
    let mut below = 0i64;
    for (bound, count) in sorted {
        if (below + count) as f64 >= rank {
            let within = (rank - below as f64) / count as f64;
            let lower = bucket_floor(bound);
            let span = bound.saturating_sub(lower) as f64;
            return Some(lower + (span * within).round() as u64);
        }
        below += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_hold_their_values_and_are_close() {
        let mut previous = 0;
        for ms in 0..200_000u64 {
            let bound = latency_bucket(ms);
            assert!(bound >= ms, "{ms} -> {bound}");
            assert!(bound >= previous, "buckets go up");
            if ms >= 10 {
                assert!((bound as f64) < ms as f64 * 1.13, "{ms} -> {bound}");
            }
            previous = bound;
        }
        assert_eq!(latency_bucket(1), 1);
        assert_eq!(latency_bucket(10), 10);
        assert_eq!(latency_bucket(1_000), 1_000);
    }

    #[test]
    fn rows_come_in_the_one_lock_order() {
        let records: Vec<AuditRecord> = (0..40)
            .map(|i| {
                let mut record = crate::queue::tests::record(&format!("c{i}"));
                record.time_generated += time::Duration::seconds(i * 50);
                record.model_name = Some(format!("model-{}", i % 7));
                record.user_name = Some(format!("user-{}", i % 5));
                record.groups = vec![format!("group-{}", i % 3)];
                record.response_code = if i % 4 == 0 { 429 } else { 200 };
                record.total_time = 10 * i as u64;
                record
            })
            .collect();
        let rows = fold_in_lock_order(&records);
        assert_eq!(rows.len(), fold(&records).len());
        assert!(rows.len() > 100, "{} rows", rows.len());
        assert!(
            rows.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "rows are in strictly increasing key order"
        );
    }

    #[test]
    fn percentiles_from_a_histogram_are_within_a_bucket() {
        // 1,000 calls of 1..=1000 ms.
        let mut counts: HashMap<u64, i64> = HashMap::new();
        for ms in 1..=1_000u64 {
            *counts.entry(latency_bucket(ms)).or_default() += 1;
        }
        let buckets: Vec<(u64, i64)> = counts.into_iter().collect();
        let p50 = histogram_percentile(&buckets, 50.0).unwrap();
        let p95 = histogram_percentile(&buckets, 95.0).unwrap();
        assert!((450..=560).contains(&p50), "p50 {p50}");
        assert!((900..=1_000).contains(&p95), "p95 {p95}");
        assert_eq!(histogram_percentile(&[], 50.0), None);
        assert_eq!(histogram_percentile(&[(100, 0)], 50.0), None);
        assert_eq!(histogram_percentile(&[(100, 5)], 100.0), Some(100));
    }

    /// A percentile is read inside its own bucket, not from the bucket below that has calls.
    #[test]
    fn a_percentile_stays_inside_its_bucket_past_empty_ones() {
        // Every call took 950 ms: bucket 1000 holds 892..=1000.
        let all_slow = [(latency_bucket(950), 10)];
        let p50 = histogram_percentile(&all_slow, 50.0).unwrap();
        assert!((891..=1_000).contains(&p50), "p50 {p50}");
        // 18 calls of 100 ms and two of 5 s: p95 is one of the slow ones.
        let two_slow = [(latency_bucket(100), 18), (latency_bucket(5_000), 2)];
        let p95 = histogram_percentile(&two_slow, 95.0).unwrap();
        assert!((4_467..=5_012).contains(&p95), "p95 {p95}");
        // Each bucket's floor is the bound of the bucket below it.
        for ms in 2..20_000u64 {
            let bound = latency_bucket(ms);
            let floor = bucket_floor(bound);
            assert!(floor < ms && ms <= bound, "{ms} in ({floor}, {bound}]");
            assert!(latency_bucket(floor) < bound, "{ms}: {floor}");
        }
        assert_eq!(bucket_floor(1), 0);
    }
}
