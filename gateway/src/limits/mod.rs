//! Step 6: usage limits — requests and tokens per minute, and token quotas per calendar period,
//! with API Management's `llm-token-limit` semantics (`azure-specs.md` §2.4).
//!
//! A call's tokens are **reserved** before it is forwarded, from an [`Estimate`] (the prompt
//! counted with the model's tokenizer, plus the completion the body allows: `max_tokens`,
//! `max_completion_tokens` or `max_output_tokens`, else a configured default), and
//! **reconciled** with the usage on its audit record when the call finishes (streams included):
//! the difference is refunded or charged. Parallel calls therefore cannot overrun a limit by more
//! than the estimation error of the calls in flight.
//!
//! Rates are token buckets: a bucket holds the per-minute number and refills continuously at a
//! sixtieth of it per second, so there is no burst at a minute boundary and the wait a refused
//! call is told (`Retry-After`, `retry-after-ms`) is exact: the deficit divided by the rate.
//! Quotas are fixed calendar windows in UTC (hour, day, week from Monday, month, year).
//!
//! Every counter that applies to a call is checked and charged together, all or nothing: in one
//! short critical section in this process ([`local`]), or in one Lua script in Redis
//! ([`redis`](self::redis)) whose clock is Redis's own `TIME`, so replicas with skewed clocks
//! agree.

mod local;
mod redis;

use std::time::{Duration, SystemTime};

use gatehouse_schema::audit::TokenUsage;
use gatehouse_schema::limits::{LimitRule, LimitSubjectRule, QuotaPeriod};
use gatehouse_schema::{AuditRecord, OperationId};
use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use time::OffsetDateTime;

use crate::auth::Principal;
use crate::classify::Call;
use crate::settings::{LimitSettings, OnStoreError};
use crate::usage::TokenWork;
use crate::warning_throttle::WarningThrottle;

/// Response header: tokens left in the tightest tokens-per-minute bucket after this call's
/// reservation.
pub const REMAINING_TOKENS_HEADER: &str = "x-gatehouse-remaining-tokens";
/// Response header: tokens left in the tightest quota after this call's reservation.
pub const REMAINING_QUOTA_TOKENS_HEADER: &str = "x-gatehouse-remaining-quota-tokens";
/// Response header: the tokens reserved for this call (the estimate; the headers leave before
/// the usage is known, the audit record has the exact count).
pub const CONSUMED_TOKENS_HEADER: &str = "x-gatehouse-consumed-tokens";
/// Response header: calls left in the tightest requests-per-minute bucket.
pub const REMAINING_REQUESTS_HEADER: &str = "x-gatehouse-remaining-requests";

/// Every counter key starts with this (after the configured prefix).
pub const KEY_NAMESPACE: &str = "gatehouse:limit:";

/// At most one warning about the store per this long.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Microseconds in a minute: a rate bucket refills `per_minute` tokens in this long.
const MINUTE_US: f64 = 60_000_000.0;

/// Who is calling, as limits see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitSubject<'a> {
    /// The subscription whose key was presented.
    pub subscription: Option<&'a str>,
    /// The Entra ID user's object id.
    pub user: Option<&'a str>,
    /// The Entra ID groups the user is in (object ids).
    pub groups: &'a [String],
}

impl<'a> LimitSubject<'a> {
    /// The subject of an authenticated principal.
    pub fn of(principal: &'a Principal) -> LimitSubject<'a> {
        LimitSubject {
            subscription: principal.subscription.as_deref().map(|s| s.id.as_str()),
            user: principal.user.as_deref().map(|u| u.object_id.as_str()),
            groups: principal
                .user
                .as_deref()
                .map_or(&[], |u| u.groups.as_slice()),
        }
    }
}

/// The tokens a call is expected to use, reserved before it is forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The prompt, counted with the model's tokenizer.
    pub prompt_tokens: u64,
    /// The completion the request allows (`max_tokens` and kin, times `n`), or the default.
    pub completion_tokens: u64,
}

impl Estimate {
    /// Prompt plus completion.
    pub fn total(self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// The estimate of a classified call. Operations whose tokens the gateway does not count
    /// (images, audio, files, …) are estimated at zero; their reported usage, if any, is charged
    /// when they finish.
    pub async fn of_call(call: &Call, default_completion_tokens: u64) -> Estimate {
        let json = call.json();
        if is_run(call.operation) {
            // A run's prompt is its thread, which the gateway does not see: what the run allows
            // itself (`max_prompt_tokens`), and its completion's allowance.
            return Estimate {
                prompt_tokens: json
                    .and_then(|body| body.get("max_prompt_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                completion_tokens: completion_allowance(
                    call.operation,
                    json,
                    default_completion_tokens,
                ),
            };
        }
        let Some(work) = TokenWork::plan(call.operation, json, None, call.deployment.as_deref())
        else {
            return Estimate::default();
        };
        let prompt_tokens = work
            .count_off_path()
            .await
            .map_or(0, |usage: TokenUsage| usage.prompt_tokens);
        Estimate {
            prompt_tokens,
            completion_tokens: completion_allowance(
                call.operation,
                json,
                default_completion_tokens,
            ),
        }
    }
}

/// The completion tokens a request allows: `max_completion_tokens`, `max_tokens` or
/// `max_output_tokens`, else `default`, times the number of choices (`n`, `best_of`).
/// Embeddings have no completion.
pub fn completion_allowance(operation: OperationId, body: Option<&Value>, default: u64) -> u64 {
    let field = |name: &str| {
        body.and_then(|b| b.get(name))
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
    };
    let (allowed, choices) = match operation {
        OperationId::EmbeddingsCreate => return 0,
        OperationId::ChatCompletionsCreate => (
            field("max_completion_tokens").or_else(|| field("max_tokens")),
            field("n").unwrap_or(1),
        ),
        OperationId::CompletionsCreate => (
            field("max_tokens"),
            field("n").unwrap_or(1).max(field("best_of").unwrap_or(1)),
        ),
        OperationId::CreateResponse => (field("max_output_tokens"), 1),
        // A run's whole completion, over all its steps.
        OperationId::CreateRun | OperationId::CreateThreadAndRun => {
            (field("max_completion_tokens"), 1)
        }
        _ => return 0,
    };
    allowed.unwrap_or(default).saturating_mul(choices)
}

/// Whether `operation` starts an Assistants run, whose model works on a thread the gateway does
/// not see.
fn is_run(operation: OperationId) -> bool {
    matches!(
        operation,
        OperationId::CreateRun | OperationId::CreateThreadAndRun
    )
}

/// The deployment whose model a call runs: the one it names, or for an Assistants run (whose
/// path names none) the `model` of its body, which Azure takes as a deployment name, or for an
/// eval run the model of its data source (the one that answers the eval's items).
pub(crate) fn deployment_run(call: &Call) -> Option<&str> {
    call.deployment
        .as_deref()
        .or_else(|| call.body_model_of(&[OperationId::CreateRun, OperationId::CreateThreadAndRun]))
        .or_else(|| {
            (call.operation == OperationId::CreateEvalRun)
                .then(|| call.json()?.pointer("/data_source/model")?.as_str())
                .flatten()
        })
}

/// A pool whose members rename every call to a deployment of their own: whatever name a client
/// gives, the call runs one of `runs`.
#[derive(Debug, Clone, Copy)]
pub struct Renaming<'a> {
    /// The pool's id: its calls share one per-deployment counter (`each_deployment`).
    pub pool: &'a str,
    /// The deployments its members run.
    pub runs: &'a [&'a str],
}

/// Whether a rule covers calls to `deployment` (served by the renaming pool `renaming`, if one):
/// its patterns match as access rules' do, `*` for any run of characters and ASCII case ignored,
/// as Azure ignores it in deployment names. A call a pool renames is covered by a rule for the
/// name it gives or for a deployment the pool runs, so that no invented name escapes a rule for
/// the model it runs.
fn covers(rule: &LimitRule, deployment: Option<&str>, renaming: Option<Renaming<'_>>) -> bool {
    if rule.deployments.is_empty() {
        return true;
    }
    let runs = renaming.map_or(&[][..], |renaming| renaming.runs);
    deployment
        .into_iter()
        .chain(runs.iter().copied())
        .any(|name| {
            rule.deployments
                .iter()
                .any(|pattern| gatehouse_schema::identity::glob_matches(pattern, name))
        })
}

/// The counter a rule keeps for this subject, or `None` when the rule does not apply to it.
fn counter_subject(rule: &LimitRule, subject: &LimitSubject<'_>) -> Option<String> {
    match &rule.subject {
        LimitSubjectRule::Subscription { id } => (subject.subscription == Some(id.as_str()))
            .then(|| format!("subscription={}", escape(id))),
        // Object ids are GUIDs: ignoring case as access rules do, whatever case a rule was
        // entered in.
        LimitSubjectRule::User { id } => subject
            .user
            .is_some_and(|user| user.eq_ignore_ascii_case(id))
            .then(|| format!("user={}", escape(id))),
        LimitSubjectRule::Group { id } => subject
            .groups
            .iter()
            .any(|g| g.eq_ignore_ascii_case(id))
            .then(|| format!("group={}", escape(id))),
        LimitSubjectRule::EachSubscription {} => subject
            .subscription
            .map(|id| format!("subscription={}", escape(id))),
        LimitSubjectRule::EachUser {} => subject.user.map(|id| format!("user={}", escape(id))),
    }
}

/// A key component with every character but `[A-Za-z0-9._@-]` percent-encoded, so that no
/// component can run into the next one.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b'@') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What one counter limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BucketKind {
    /// Calls per minute.
    Requests {
        /// Bucket size.
        per_minute: u64,
    },
    /// Tokens per minute.
    Tokens {
        /// Bucket size.
        per_minute: u64,
    },
    /// Tokens per calendar period.
    Quota {
        /// Tokens per period.
        tokens: u64,
        /// The period.
        period: QuotaPeriod,
    },
}

impl BucketKind {
    /// The most the counter can ever hold.
    pub(crate) fn capacity(self) -> u64 {
        match self {
            BucketKind::Requests { per_minute } | BucketKind::Tokens { per_minute } => per_minute,
            BucketKind::Quota { tokens, .. } => tokens,
        }
    }
}

/// One counter a call is charged on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bucket {
    /// The store key (configured prefix, [`KEY_NAMESPACE`], rule, subject, deployment, kind).
    pub key: String,
    /// What it limits.
    pub kind: BucketKind,
    /// What this call costs on it (1 for a request, the estimate for tokens).
    pub cost: u64,
    /// Index of the rule in the snapshot's list.
    pub rule: usize,
}

/// What a store answers to a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreAnswer {
    /// Every bucket was charged; per bucket, in order: what is left, and the start of the quota
    /// window charged (0 for rates).
    Admitted(Vec<(u64, i64)>),
    /// Nothing was charged: `bucket` (an index into the buckets) refuses the call for `wait_ms`.
    Refused {
        /// The refusing bucket.
        bucket: usize,
        /// Until it would admit the call (the rate's exact refill time, or the quota window's end).
        wait_ms: u64,
    },
}

/// A correction of one counter after a call finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Adjustment {
    /// The store key.
    pub key: String,
    /// What the counter limits.
    pub kind: BucketKind,
    /// Tokens to add (positive) or refund (negative).
    pub delta: i64,
    /// The quota window that was charged; a later window is left alone.
    pub window_start: i64,
}

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or answered something unexpected.
    #[error("limit store: {0}")]
    Redis(String),
    /// Redis took longer than the configured timeout.
    #[error("limit store: no answer within {0} ms")]
    Timeout(u64),
}

/// Rate-bucket arithmetic, shared by the in-process store and mirrored by the Redis script.
pub(crate) mod bucket {
    use super::MINUTE_US;

    /// Tokens still counted `elapsed_us` after the bucket held `used`: the bucket drains
    /// (refills) at `per_minute` per minute, continuously.
    pub fn drained(used: f64, elapsed_us: i64, per_minute: u64) -> f64 {
        let elapsed = elapsed_us.max(0) as f64;
        (used - elapsed * per_minute as f64 / MINUTE_US).max(0.0)
    }

    /// Milliseconds until `cost` more fits into a bucket that counts `used` now (0 when it fits).
    pub fn wait_ms(used: f64, cost: u64, per_minute: u64) -> u64 {
        let excess = used + cost as f64 - per_minute as f64;
        if excess <= 0.0 || per_minute == 0 {
            return 0;
        }
        (excess * MINUTE_US / per_minute as f64 / 1000.0).ceil() as u64
    }
}

/// Microseconds since the epoch, by this machine's clock (the in-process store's time).
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Why a call is refused by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitRefusal {
    /// A requests- or tokens-per-minute bucket has no room for the call now (429).
    #[error(
        "Requests {} have exceeded the {} rate limit of {per_minute} {} per minute set by limit '{limit}'. Please retry after {} seconds.",
        to_deployment(deployment.as_deref()),
        if *tokens { "token" } else { "request" },
        if *tokens { "tokens" } else { "requests" },
        whole_seconds(*retry_after)
    )]
    Rate {
        /// The rule's id.
        limit: String,
        /// The deployment the call names.
        deployment: Option<String>,
        /// Tokens per minute (`true`) or requests per minute.
        tokens: bool,
        /// The bucket size.
        per_minute: u64,
        /// Exactly when the call would fit.
        retry_after: Duration,
    },
    /// A token quota is used up until its period ends (403).
    #[error(
        "Token quota is exceeded. Limit '{limit}' allows {tokens} tokens {} {}; they are used up until {}. Try again in {}.",
        period_phrase(*period),
        to_deployment(deployment.as_deref()),
        resets_at_text(*retry_after),
        spoken_duration(*retry_after)
    )]
    Quota {
        /// The rule's id.
        limit: String,
        /// The deployment the call names.
        deployment: Option<String>,
        /// Tokens per period.
        tokens: u64,
        /// The period.
        period: QuotaPeriod,
        /// Until the period ends.
        retry_after: Duration,
    },
    /// The call alone needs more than a limit can ever hold, so it could never be admitted (400).
    #[error(
        "This request needs an estimated {estimate} tokens ({prompt} for the prompt, {completion} allowed for the completion), more than limit '{limit}' allows {} in total ({capacity} tokens). Lower max_tokens (max_completion_tokens, max_output_tokens) or shorten the prompt.",
        to_deployment(deployment.as_deref())
    )]
    TooLarge {
        /// The rule's id.
        limit: String,
        /// The deployment the call names.
        deployment: Option<String>,
        /// The whole estimate.
        estimate: u64,
        /// Its prompt part.
        prompt: u64,
        /// Its completion part.
        completion: u64,
        /// The limit's size.
        capacity: u64,
    },
    /// The shared store cannot be reached and the gateway is set to fail closed (503).
    #[error(
        "The gateway cannot check usage limits right now and is set to refuse calls until it can. Try again later."
    )]
    StoreUnavailable,
}

impl LimitRefusal {
    /// The id of the refusing rule (`store` when the store failed).
    pub fn limit_id(&self) -> &str {
        match self {
            LimitRefusal::Rate { limit, .. }
            | LimitRefusal::Quota { limit, .. }
            | LimitRefusal::TooLarge { limit, .. } => limit,
            LimitRefusal::StoreUnavailable => "store",
        }
    }

    /// A low-cardinality name of the refusal, for metrics and the audit record.
    pub fn reason(&self) -> &'static str {
        match self {
            LimitRefusal::Rate { tokens: true, .. } => "token_rate_limited",
            LimitRefusal::Rate { tokens: false, .. } => "request_rate_limited",
            LimitRefusal::Quota { .. } => "token_quota_exceeded",
            LimitRefusal::TooLarge { .. } => "exceeds_token_limit",
            LimitRefusal::StoreUnavailable => "limit_store_unavailable",
        }
    }

    /// How long the caller should wait, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LimitRefusal::Rate { retry_after, .. } | LimitRefusal::Quota { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }
}

fn to_deployment(deployment: Option<&str>) -> String {
    match deployment {
        Some(name) => format!("to deployment '{name}'"),
        None => "to this gateway".to_owned(),
    }
}

fn period_phrase(period: QuotaPeriod) -> &'static str {
    match period {
        QuotaPeriod::Hourly => "per hour",
        QuotaPeriod::Daily => "per day",
        QuotaPeriod::Weekly => "per week",
        QuotaPeriod::Monthly => "per month",
        QuotaPeriod::Yearly => "per year",
    }
}

/// Whole seconds, rounded up, at least one (what `Retry-After` carries).
pub fn whole_seconds(duration: Duration) -> u64 {
    (duration.as_secs() + u64::from(duration.subsec_nanos() > 0)).max(1)
}

fn resets_at_text(wait: Duration) -> String {
    let at = OffsetDateTime::now_utc() + wait;
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "the end of the period".to_owned())
}

/// `3 hours and 4 minutes`, `21 minutes and 33 seconds`, `5 seconds`.
fn spoken_duration(wait: Duration) -> String {
    let seconds = whole_seconds(wait);
    let (days, hours, minutes, secs) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    let unit = |n: u64, name: &str| format!("{n} {name}{}", if n == 1 { "" } else { "s" });
    let parts: Vec<String> = if days > 0 {
        vec![unit(days, "day"), unit(hours, "hour")]
    } else if hours > 0 {
        vec![unit(hours, "hour"), unit(minutes, "minute")]
    } else if minutes > 0 {
        vec![unit(minutes, "minute"), unit(secs, "second")]
    } else {
        vec![unit(secs, "second")]
    };
    parts.join(" and ")
}

/// The tokens held for one admitted call, to be reconciled when it finishes (or, for work that
/// goes on after its call, when a later call sees it end: `crate::deferred_work`, which keeps it
/// as JSON in Redis).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// What was reserved.
    estimate: u64,
    /// The token counters charged (tokens per minute and quotas), with their quota windows.
    charged: Vec<(String, BucketKind, i64)>,
    /// When it was charged (µs since the Unix epoch, this gateway's clock).
    charged_at_us: i64,
}

impl Reservation {
    /// The tokens reserved.
    pub fn estimate(&self) -> u64 {
        self.estimate
    }
}

/// An admitted call: its reservation and the values of the limit response headers.
#[derive(Debug, Default)]
pub struct Admission {
    reservation: Option<Reservation>,
    /// Calls left in the tightest requests-per-minute bucket.
    pub remaining_requests: Option<u64>,
    /// Tokens left in the tightest tokens-per-minute bucket, after this reservation.
    pub remaining_tokens: Option<u64>,
    /// Tokens left in the tightest quota, after this reservation.
    pub remaining_quota_tokens: Option<u64>,
    /// The tokens reserved for this call.
    pub consumed_tokens: Option<u64>,
}

impl Admission {
    /// Takes the reservation out, to reconcile when the call finishes.
    pub fn take_reservation(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }

    /// Adds the limit headers this admission has values for.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (name, value) in [
            (REMAINING_REQUESTS_HEADER, self.remaining_requests),
            (REMAINING_TOKENS_HEADER, self.remaining_tokens),
            (REMAINING_QUOTA_TOKENS_HEADER, self.remaining_quota_tokens),
            (CONSUMED_TOKENS_HEADER, self.consumed_tokens),
        ] {
            if let Some(value) = value {
                headers.insert(name, HeaderValue::from(value));
            }
        }
    }
}

/// The tokens a finished call used, to reconcile its reservation with: the usage on its record
/// (reported by the backend, or the gateway's count of prompt and answer); zero when no backend
/// answered it successfully (no model did any work); `None` — keep the estimate charged — when a
/// backend answered but no usage is known.
pub fn tokens_used(record: &AuditRecord) -> Option<u64> {
    if let Some(usage) = &record.usage {
        return Some(usage.total_tokens);
    }
    let answered = record
        .attempts
        .iter()
        .any(|a| a.status.is_some_and(|s| (200..300).contains(&s)));
    (!answered).then_some(0)
}

/// Where the counters live.
enum Store {
    Local(local::LocalStore),
    Redis(redis::RedisStore),
}

/// Checks and charges usage limits; one per gateway, shared by every call.
pub struct Limiter {
    store: Store,
    key_prefix: String,
    on_store_error: OnStoreError,
    default_completion_tokens: u64,
    store_errors: Counter,
    warnings: WarningThrottle,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the Redis connection: its address may carry a password.
        f.debug_struct("Limiter")
            .field(
                "store",
                &match self.store {
                    Store::Local(_) => "local",
                    Store::Redis(_) => "redis",
                },
            )
            .field("key_prefix", &self.key_prefix)
            .field("on_store_error", &self.on_store_error)
            .field("default_completion_tokens", &self.default_completion_tokens)
            .finish()
    }
}

impl Limiter {
    /// A limiter on the store the settings name; `store_errors` counts the store's failures.
    /// Redis is connected on first use, so a gateway starts while Redis is down; call this
    /// inside a Tokio runtime.
    pub fn new(settings: &LimitSettings, store_errors: Counter) -> anyhow::Result<Limiter> {
        let store = match &settings.redis_url {
            None => Store::Local(local::LocalStore::default()),
            Some(url) => {
                let url = url
                    .resolve()
                    .map_err(|e| anyhow::anyhow!("server.limits.redis_url: {e}"))?;
                Store::Redis(
                    redis::RedisStore::new(&url, Duration::from_millis(settings.store_timeout_ms))
                        .map_err(|e| anyhow::anyhow!("server.limits.redis_url: {e}"))?,
                )
            }
        };
        Ok(Limiter {
            store,
            key_prefix: settings.key_prefix.clone(),
            on_store_error: settings.on_store_error,
            default_completion_tokens: settings.default_completion_tokens,
            store_errors,
            warnings: WarningThrottle::new(WARNING_INTERVAL),
        })
    }

    /// The completion tokens reserved for a call that names no maximum.
    pub fn default_completion_tokens(&self) -> u64 {
        self.default_completion_tokens
    }

    /// Checks and charges a classified call: estimates its tokens only when a token limit
    /// applies to it.
    ///
    /// `renaming`: the pool serving the call when its members rename every call to a deployment
    /// of their own; such a pool runs its deployment under whatever name a client gives, so its
    /// calls share one per-deployment counter (`each_deployment`) instead of one per invented
    /// name, and rules for the deployments it runs cover them.
    pub async fn admit_call(
        &self,
        rules: &[LimitRule],
        subject: &LimitSubject<'_>,
        call: &Call,
        renaming: Option<Renaming<'_>>,
    ) -> Result<Admission, LimitRefusal> {
        let deployment = deployment_run(call);
        let applicable = || {
            rules.iter().filter(|rule| {
                covers(rule, deployment, renaming) && counter_subject(rule, subject).is_some()
            })
        };
        if applicable().next().is_none() {
            return Ok(Admission::default());
        }
        let counts_tokens =
            applicable().any(|rule| rule.tokens_per_minute.is_some() || rule.token_quota.is_some());
        let estimate = if counts_tokens {
            Estimate::of_call(call, self.default_completion_tokens).await
        } else {
            Estimate::default()
        };
        self.admit(rules, subject, deployment, renaming, estimate)
            .await
    }

    /// Checks every rule that applies to a call of `subject` to `deployment` (served by the
    /// renaming pool `renaming`, if one: see [`Limiter::admit_call`]) and charges them all (one
    /// request, `estimate` tokens), or none when one refuses.
    pub async fn admit(
        &self,
        rules: &[LimitRule],
        subject: &LimitSubject<'_>,
        deployment: Option<&str>,
        renaming: Option<Renaming<'_>>,
        estimate: Estimate,
    ) -> Result<Admission, LimitRefusal> {
        let buckets = self.buckets(rules, subject, deployment, renaming, estimate.total());
        if buckets.is_empty() {
            return Ok(Admission::default());
        }
        if let Some(bucket) = buckets.iter().find(|b| b.cost > b.kind.capacity()) {
            return Err(LimitRefusal::TooLarge {
                limit: rules[bucket.rule].id.clone(),
                deployment: deployment.map(str::to_owned),
                estimate: estimate.total(),
                prompt: estimate.prompt_tokens,
                completion: estimate.completion_tokens,
                capacity: bucket.kind.capacity(),
            });
        }
        let answer = match &self.store {
            Store::Local(store) => Ok(store.admit(&buckets, now_us())),
            Store::Redis(store) => store.admit(&buckets, None).await,
        };
        let levels = match answer {
            Ok(StoreAnswer::Admitted(levels)) => levels,
            Ok(StoreAnswer::Refused { bucket, wait_ms }) => {
                let Some(bucket) = buckets.get(bucket) else {
                    return self
                        .store_failed(StoreError::Redis("the script named no bucket".to_owned()));
                };
                let retry_after = Duration::from_millis(wait_ms.max(1));
                let limit = rules[bucket.rule].id.clone();
                let deployment = deployment.map(str::to_owned);
                return Err(match bucket.kind {
                    BucketKind::Requests { per_minute } | BucketKind::Tokens { per_minute } => {
                        LimitRefusal::Rate {
                            limit,
                            deployment,
                            tokens: matches!(bucket.kind, BucketKind::Tokens { .. }),
                            per_minute,
                            retry_after,
                        }
                    }
                    BucketKind::Quota { tokens, period } => LimitRefusal::Quota {
                        limit,
                        deployment,
                        tokens,
                        period,
                        retry_after,
                    },
                });
            }
            Err(error) => return self.store_failed(error),
        };
        let mut admission = Admission::default();
        let mut charged = Vec::new();
        for (bucket, (remaining, window_start)) in buckets.into_iter().zip(levels) {
            let tightest = match bucket.kind {
                BucketKind::Requests { .. } => &mut admission.remaining_requests,
                BucketKind::Tokens { .. } => &mut admission.remaining_tokens,
                BucketKind::Quota { .. } => &mut admission.remaining_quota_tokens,
            };
            *tightest = Some(tightest.map_or(remaining, |t| t.min(remaining)));
            if !matches!(bucket.kind, BucketKind::Requests { .. }) {
                charged.push((bucket.key, bucket.kind, window_start));
            }
        }
        if !charged.is_empty() {
            admission.consumed_tokens = Some(estimate.total());
            admission.reservation = Some(Reservation {
                estimate: estimate.total(),
                charged,
                charged_at_us: now_us(),
            });
        }
        Ok(admission)
    }

    /// Settles a reservation with the tokens the call used: refunds what was reserved beyond
    /// them, charges what they exceed it by. `None` keeps the estimate charged. Never waits:
    /// a Redis update runs on its own task.
    pub fn reconcile(&self, reservation: Reservation, actual_tokens: Option<u64>) {
        let Some(actual) = actual_tokens else {
            return;
        };
        let delta = i64::try_from(actual)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(reservation.estimate).unwrap_or(i64::MAX));
        if delta < 0 && now_us().saturating_sub(reservation.charged_at_us) as f64 > MINUTE_US {
            // A tokens-per-minute bucket has drained what was charged a minute or more ago: a
            // refund now would give back room the caller has had already (and a caller could
            // bank it, settling old reservations when it wants room). Quotas keep theirs, in
            // the window they were charged to.
            let quotas: Vec<(String, BucketKind, i64)> = reservation
                .charged
                .into_iter()
                .filter(|(_, kind, _)| matches!(kind, BucketKind::Quota { .. }))
                .collect();
            self.adjust(&quotas, delta);
            return;
        }
        self.adjust(&reservation.charged, delta);
    }

    /// Charges `tokens` of work already done that nothing reserved for (a response a Realtime
    /// member started by itself) to every token counter of the rules that apply to `call` of
    /// `subject` (served by `renaming`, see [`Limiter::admit_call`]), quotas in their window of
    /// now. Refuses nothing, since the work is done: a caller it takes over a limit is refused
    /// at its next call. A store that fails is counted and logged.
    pub async fn charge(
        &self,
        rules: &[LimitRule],
        subject: &LimitSubject<'_>,
        call: &Call,
        renaming: Option<Renaming<'_>>,
        tokens: u64,
    ) {
        if tokens == 0 {
            return;
        }
        let buckets: Vec<Bucket> = self
            .buckets(rules, subject, deployment_run(call), renaming, tokens)
            .into_iter()
            .filter(|bucket| !matches!(bucket.kind, BucketKind::Requests { .. }))
            .collect();
        if buckets.is_empty() {
            return;
        }
        let charged = match &self.store {
            Store::Local(store) => {
                store.charge(&buckets, now_us());
                Ok(())
            }
            Store::Redis(store) => store.charge(&buckets, None).await,
        };
        if let Err(error) = charged {
            self.store_errors.inc();
            if self.warnings.should_warn() {
                tracing::warn!(%error, "usage limits: tokens used without a reservation could not be charged");
            }
        }
    }

    /// Moves the token counters `charged` by `delta` (refunds when negative).
    fn adjust(&self, charged: &[(String, BucketKind, i64)], delta: i64) {
        if delta == 0 || charged.is_empty() {
            return;
        }
        let adjustments: Vec<Adjustment> = charged
            .iter()
            .map(|(key, kind, window_start)| Adjustment {
                key: key.clone(),
                kind: *kind,
                delta,
                window_start: *window_start,
            })
            .collect();
        match &self.store {
            Store::Local(store) => store.adjust(&adjustments, now_us()),
            Store::Redis(store) => {
                // A record finished outside the runtime (a response dropped at shutdown) keeps
                // its estimate charged.
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let store = store.clone();
                let errors = self.store_errors.clone();
                runtime.spawn(async move {
                    if let Err(error) = store.adjust(&adjustments, None).await {
                        errors.inc();
                        tracing::warn!(%error, "a token reservation could not be reconciled");
                    }
                });
            }
        }
    }

    /// The counters of every rule that applies, in rule order.
    fn buckets(
        &self,
        rules: &[LimitRule],
        subject: &LimitSubject<'_>,
        deployment: Option<&str>,
        renaming: Option<Renaming<'_>>,
        tokens: u64,
    ) -> Vec<Bucket> {
        let mut buckets = Vec::new();
        for (index, rule) in rules.iter().enumerate() {
            if !covers(rule, deployment, renaming) {
                continue;
            }
            let Some(who) = counter_subject(rule, subject) else {
                continue;
            };
            let scope = match (rule.each_deployment, renaming, deployment) {
                (false, ..) => "all".to_owned(),
                // Every name runs the pool's own deployment: one counter.
                (true, Some(renaming), _) => format!("p.{}", escape(renaming.pool)),
                // One counter per deployment however a call spells its name.
                (true, None, Some(name)) => format!("d.{}", escape(&name.to_ascii_lowercase())),
                (true, None, None) => "none".to_owned(),
            };
            let base = format!(
                "{}{KEY_NAMESPACE}{}:{who}:{scope}",
                self.key_prefix,
                escape(&rule.id)
            );
            if let Some(per_minute) = rule.requests_per_minute {
                buckets.push(Bucket {
                    key: format!("{base}:rpm"),
                    kind: BucketKind::Requests { per_minute },
                    cost: 1,
                    rule: index,
                });
            }
            if let Some(per_minute) = rule.tokens_per_minute {
                buckets.push(Bucket {
                    key: format!("{base}:tpm"),
                    kind: BucketKind::Tokens { per_minute },
                    cost: tokens,
                    rule: index,
                });
            }
            if let Some(quota) = rule.token_quota {
                buckets.push(Bucket {
                    key: format!("{base}:quota:{}", quota.period.as_str()),
                    kind: BucketKind::Quota {
                        tokens: quota.tokens,
                        period: quota.period,
                    },
                    cost: tokens,
                    rule: index,
                });
            }
        }
        buckets
    }

    /// A store failure: counted, logged at most every ten seconds, then the call is admitted
    /// unchecked (fail open) or refused (fail closed).
    fn store_failed(&self, error: StoreError) -> Result<Admission, LimitRefusal> {
        self.store_errors.inc();
        if self.warnings.should_warn() {
            tracing::warn!(
                %error,
                policy = ?self.on_store_error,
                "the limit store failed; calls are {} while it does",
                match self.on_store_error {
                    OnStoreError::FailOpen => "admitted without limits",
                    OnStoreError::FailClosed => "refused",
                }
            );
        }
        match self.on_store_error {
            OnStoreError::FailOpen => Ok(Admission::default()),
            OnStoreError::FailClosed => Err(LimitRefusal::StoreUnavailable),
        }
    }
}

/// The label of a refusal kind in `gatehouse_limit_refusals_total`.
pub fn refusal_kind(refusal: &LimitRefusal) -> &'static str {
    match refusal {
        LimitRefusal::Rate { tokens: true, .. } => "tokens_per_minute",
        LimitRefusal::Rate { tokens: false, .. } => "requests_per_minute",
        LimitRefusal::Quota { .. } => "token_quota",
        LimitRefusal::TooLarge { .. } => "exceeds_limit",
        LimitRefusal::StoreUnavailable => "store_unavailable",
    }
}

#[cfg(test)]
mod tests;
