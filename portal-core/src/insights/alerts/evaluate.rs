//! One evaluation of one rule: what each kind reads and when its subjects fire.

use std::collections::BTreeMap;

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::backends::MemberAvailability;
use gatehouse_schema::limits::{LimitRule, LimitSubjectRule, QuotaPeriod};
use time::{Duration, OffsetDateTime};

use super::{AlertCondition, AlertRule, Evaluation, Finding};
use crate::db::{AlertStateRow, ConfigDb, SubscriptionRow};
use crate::health::gateway_backends;
use crate::insights::{
    AuditSource, Dimension, Granularity, InsightsError, TimeRange, UsageRequest,
};
use crate::push::note_running;
use crate::secret::AdminTokenRefs;

/// What an evaluation may read.
pub(super) struct Context<'a> {
    /// The usage rollups (required by the rules that say so).
    pub source: Option<&'a dyn AuditSource>,
    /// The config database.
    pub db: &'a ConfigDb,
    /// The client the gateways are asked with.
    pub http: &'a reqwest::Client,
    /// The references their admin tokens may be read from.
    pub admin_token_refs: &'a AdminTokenRefs,
}

/// A time to the minute, UTC, for a person: `2025-03-01 14:05 UTC`.
fn minute_utc(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    )
}

/// A problem of a source's answer with a warning beside it.
fn answered_in_part(warning: &str) -> String {
    format!("the audit source answered in part: {warning}")
}

/// The evaluation of a rule that watches one figure when the source answered in part (a warning
/// beside the answer: Log Analytics' `PartialError`, e.g. past its row or size limits): rows may
/// be missing from the figure, so neither firing nor resolving is decided on it; the stored
/// state is kept as it is, and the warnings are the evaluation's problems.
fn held(warnings: &[String]) -> Evaluation {
    Evaluation {
        observed: "not observed: the audit source answered in part".to_owned(),
        findings: Vec::new(),
        // The prefix of every subject.
        unobserved: vec![String::new()],
        problems: warnings.iter().map(|w| answered_in_part(w)).collect(),
    }
}

/// Evaluates `rule` at `now`; `stored` holds the rule's stored subjects (what a rule that
/// watches a condition over time needs to know since when it holds).
pub(super) async fn evaluate(
    context: &Context<'_>,
    rule: &AlertRule,
    now: OffsetDateTime,
    stored: &BTreeMap<String, AlertStateRow>,
) -> Result<Evaluation, InsightsError> {
    let source = || context.source.ok_or(InsightsError::NotConfigured);
    match &rule.condition {
        AlertCondition::DailyTokens {
            dimension,
            value,
            above,
        } => {
            let day = now.replace_time(time::Time::MIDNIGHT);
            let (range, granularity) =
                TimeRange::new(day, now.max(day + Duration::MINUTE))?.aligned()?;
            let dimension = if dimension == "group" {
                Dimension::Group
            } else {
                Dimension::Subscription
            };
            let answer = source()?
                .usage_totals(&UsageRequest {
                    range,
                    granularity,
                    dimension,
                    only: Some(vec![value.clone()]),
                })
                .await?;
            if !answer.warnings.is_empty() {
                return Ok(held(&answer.warnings));
            }
            let tokens: i64 = answer.value.iter().map(|t| t.total_tokens).sum();
            Ok(Evaluation::single(
                tokens > *above,
                format!("{tokens} tokens today (threshold {above})"),
            ))
        }
        AlertCondition::ErrorRate {
            minutes,
            above,
            min_requests,
        } => {
            let (range, granularity) = TimeRange::new(now - Duration::minutes(*minutes), now)?
                .aligned_at(Granularity::Minute)?;
            let answer = source()?
                .usage_totals(&UsageRequest {
                    range,
                    granularity,
                    dimension: Dimension::All,
                    only: None,
                })
                .await?;
            if !answer.warnings.is_empty() {
                return Ok(held(&answer.warnings));
            }
            let requests: i64 = answer.value.iter().map(|t| t.requests).sum();
            let errors: i64 = answer.value.iter().map(|t| t.errors).sum();
            let rate = if requests > 0 {
                errors as f64 / requests as f64
            } else {
                0.0
            };
            Ok(Evaluation::single(
                requests >= *min_requests && rate > *above,
                format!(
                    "{:.1}% errors in {requests} calls over {minutes} min (threshold {:.1}%)",
                    rate * 100.0,
                    above * 100.0
                ),
            ))
        }
        AlertCondition::LatencyP95 { minutes, above_ms } => {
            let (range, granularity) = TimeRange::new(now - Duration::minutes(*minutes), now)?
                .aligned_at(Granularity::Minute)?;
            let answer = source()?.figures(range, granularity).await?;
            if !answer.warnings.is_empty() {
                return Ok(held(&answer.warnings));
            }
            let p95 = answer.value.latency.p95_ms;
            Ok(Evaluation::single(
                p95.is_some_and(|p| p > *above_ms),
                format!(
                    "p95 latency {} over {minutes} min (threshold {above_ms} ms)",
                    p95.map_or("n/a".to_owned(), |p| format!("{p} ms"))
                ),
            ))
        }
        AlertCondition::BackendSetAside {
            minutes,
            pool,
            member,
        } => {
            backend_set_aside(
                context,
                now,
                stored,
                *minutes,
                pool.as_deref(),
                member.as_deref(),
            )
            .await
        }
        AlertCondition::QuotaNearlyUsed { percent, limit } => {
            quota_nearly_used(
                source()?,
                context.db,
                now,
                stored,
                *percent,
                limit.as_deref(),
            )
            .await
        }
        AlertCondition::KeyExpiring { days } => {
            key_expiring(context.db, now, stored, Duration::days(*days)).await
        }
    }
}

/// Every member on every registered gateway: a member set aside is watched from the first
/// evaluation that sees it so, and fires once that is longer than `minutes` ago; an evaluation
/// that sees it available ends the watch. Members of a gateway that does not answer keep their
/// state.
async fn backend_set_aside(
    context: &Context<'_>,
    now: OffsetDateTime,
    stored: &BTreeMap<String, AlertStateRow>,
    minutes: i64,
    pool: Option<&str>,
    member: Option<&str>,
) -> Result<Evaluation, InsightsError> {
    let members = context.db.members().await?;
    if let Some(pool) = pool
        && !context.db.pools().await?.iter().any(|p| p.id == pool)
    {
        return Err(InsightsError::invalid(
            "pool",
            format!("pool `{pool}` is not in the configuration"),
        ));
    }
    if let Some(member) = member
        && !members
            .iter()
            .any(|m| m.id == member && pool.is_none_or(|p| m.pool_id == p))
    {
        return Err(InsightsError::invalid(
            "member",
            format!("member `{member}` is not in the configuration"),
        ));
    }
    let threshold = Duration::minutes(minutes);
    let gateways = context.db.gateways().await?;
    let mut evaluation = Evaluation {
        observed: String::new(),
        findings: Vec::new(),
        unobserved: Vec::new(),
        problems: Vec::new(),
    };
    let (mut watched, mut aside) = (0, 0);
    for gateway in &gateways {
        let states = match gateway_backends(context.http, context.admin_token_refs, gateway).await {
            Ok(states) => {
                // The version it runs: one older than it was pushed shows as its lag.
                if let Err(error) = note_running(context.db, gateway, states.version).await {
                    tracing::warn!(gateway = %gateway.id, %error, "could not record the version the gateway runs");
                }
                states
            }
            Err(why) => {
                evaluation.unobserved.push(format!("{}/", gateway.id));
                evaluation
                    .problems
                    .push(format!("gateway {}: {why}", gateway.id));
                continue;
            }
        };
        for state in states
            .members
            .iter()
            .filter(|m| pool.is_none_or(|p| m.pool == p) && member.is_none_or(|id| m.member == id))
        {
            watched += 1;
            let subject = format!("{}/{}/{}", gateway.id, state.pool, state.member);
            let named = format!(
                "member {} of pool {} on gateway {}",
                state.member, state.pool, gateway.id
            );
            if state.state == MemberAvailability::Available {
                evaluation.findings.push(Finding {
                    subject,
                    firing: false,
                    observed: format!("{named}: available again"),
                    watching_since: None,
                });
                continue;
            }
            aside += 1;
            let since = stored.get(&subject).map_or(now, |row| row.since);
            let held = now - since;
            evaluation.findings.push(Finding {
                subject,
                firing: held > threshold,
                observed: format!(
                    "{named}: {} since {} ({} min; threshold {minutes} min)",
                    state.state.as_str(),
                    minute_utc(since),
                    held.whole_minutes()
                ),
                watching_since: Some(since),
            });
        }
    }
    evaluation.observed = if gateways.is_empty() {
        "no gateway is registered".to_owned()
    } else {
        format!("{aside} of {watched} members set aside")
    };
    Ok(evaluation)
}

/// The UTC calendar window of `period` holding `at`: its start and its end (exclusive), as the
/// gateway counts quotas ([`QuotaPeriod::window`]).
pub fn quota_window(period: QuotaPeriod, at: OffsetDateTime) -> (OffsetDateTime, OffsetDateTime) {
    let (start, end) = period.window(at.unix_timestamp());
    let instant = |seconds: i64| OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(at);
    (instant(start), instant(end))
}

fn period_word(period: QuotaPeriod) -> &'static str {
    match period {
        QuotaPeriod::Hourly => "hour",
        QuotaPeriod::Daily => "day",
        QuotaPeriod::Weekly => "week",
        QuotaPeriod::Monthly => "month",
        QuotaPeriod::Yearly => "year",
    }
}

/// Every subject of every limit rule with a token quota in the published configuration (the
/// newest snapshot, which is what the gateways enforce): its tokens since the start of the
/// quota's period, from the rollups.
async fn quota_nearly_used(
    source: &dyn AuditSource,
    db: &ConfigDb,
    now: OffsetDateTime,
    stored: &BTreeMap<String, AlertStateRow>,
    percent: f64,
    only: Option<&str>,
) -> Result<Evaluation, InsightsError> {
    let limits: Vec<LimitRule> = match db.latest_snapshot().await? {
        Some(row) => {
            serde_json::from_str::<ConfigSnapshot>(&row.snapshot)
                .map_err(|error| {
                    crate::PortalError::Corrupt(format!("published snapshot: {error}"))
                })?
                .limits
        }
        None => Vec::new(),
    };
    if let Some(id) = only
        && !limits.iter().any(|l| l.id == id)
    {
        return Err(InsightsError::invalid(
            "limit",
            format!("limit rule `{id}` is not in the published configuration"),
        ));
    }
    let mut evaluation = Evaluation {
        observed: String::new(),
        findings: Vec::new(),
        unobserved: Vec::new(),
        problems: Vec::new(),
    };
    let (mut counted, mut held_back) = (0, 0);
    for limit in limits.iter().filter(|l| only.is_none_or(|id| l.id == id)) {
        let Some(quota) = limit.token_quota.filter(|q| q.tokens > 0) else {
            continue;
        };
        counted += 1;
        let (start, _) = quota_window(quota.period, now);
        let (range, granularity) =
            TimeRange::new(start, now.max(start + Duration::MINUTE))?.aligned()?;
        let (kind, dimension, values) = match &limit.subject {
            LimitSubjectRule::Subscription { id } => (
                "subscription",
                Dimension::Subscription,
                Some(vec![id.clone()]),
            ),
            LimitSubjectRule::User { id } => ("user", Dimension::User, Some(vec![id.clone()])),
            LimitSubjectRule::Group { id } => ("group", Dimension::Group, Some(vec![id.clone()])),
            LimitSubjectRule::EachSubscription {} => {
                ("subscription", Dimension::Subscription, None)
            }
            LimitSubjectRule::EachUser {} => ("user", Dimension::User, None),
        };
        // One total per subject: a row per subject and hour would pass the Query API's row
        // limit with a few hundred subjects over a month.
        let answer = source
            .usage_totals(&UsageRequest {
                range,
                granularity,
                dimension,
                only: values.clone(),
            })
            .await?;
        let prefix = format!("{}/{kind}/", limit.id);
        if !answer.warnings.is_empty() {
            // Subjects may be missing or undercounted: their stored state is kept.
            evaluation.unobserved.push(prefix);
            evaluation.problems.extend(
                answer
                    .warnings
                    .iter()
                    .map(|w| format!("limit rule {}: {}", limit.id, answered_in_part(w))),
            );
            held_back += 1;
            continue;
        }
        let mut used: BTreeMap<String, i64> = values
            .unwrap_or_default()
            .into_iter()
            .map(|value| (value, 0))
            .collect();
        for total in answer.value {
            *used.entry(total.value).or_default() += total.total_tokens;
        }
        // A subject that fired in an earlier period may have no calls in this one.
        for subject in stored.keys() {
            if let Some(value) = subject.strip_prefix(&prefix) {
                used.entry(value.to_owned()).or_default();
            }
        }
        // The rollups cannot split a subject by deployment: say so when the rule would.
        let covered = limit.deployments.join(", ");
        let scope = match (limit.deployments.is_empty(), limit.each_deployment) {
            (true, false) => String::new(),
            (false, false) => format!("; counted on every deployment, the rule covers {covered}"),
            (true, true) => {
                "; counted on every deployment together, the rule counts each apart".to_owned()
            }
            (false, true) => format!(
                "; counted on every deployment together, the rule counts each of {covered} apart"
            ),
        };
        for (value, tokens) in used {
            let share = tokens as f64 * 100.0 / quota.tokens as f64;
            evaluation.findings.push(Finding {
                subject: format!("{prefix}{value}"),
                firing: share >= percent,
                observed: format!(
                    "{kind} {value} used {tokens} of {} tokens ({share:.1}%, threshold {percent}%) of limit rule {} this {} (UTC, since {}){scope}",
                    quota.tokens,
                    limit.id,
                    period_word(quota.period),
                    minute_utc(start)
                ),
                watching_since: None,
            });
        }
    }
    let firing = evaluation.findings.iter().filter(|f| f.firing).count();
    evaluation.observed =
        format!("{firing} subjects at {percent}% or more of their quota ({counted} quotas)");
    if held_back > 0 {
        evaluation.observed.push_str(&format!(
            "; {held_back} not observed: the audit source answered in part"
        ));
    }
    Ok(evaluation)
}

/// When a subscription's key stops working, if it does: the primary with the subscription, the
/// secondary at the end of its rotation overlap or with the subscription, whichever is first.
fn key_ends(row: &SubscriptionRow) -> [(&'static str, bool, Option<OffsetDateTime>); 2] {
    let secondary_end = match (row.secondary_expires_at, row.expires_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    [
        ("primary", true, row.expires_at),
        ("secondary", row.secondary_key_hash.is_some(), secondary_end),
    ]
}

/// Every key of every subscription that is not revoked: it fires when it stops working within
/// `ahead`, or already has. Names subscriptions only; never a key or a hash.
async fn key_expiring(
    db: &ConfigDb,
    now: OffsetDateTime,
    stored: &BTreeMap<String, AlertStateRow>,
    ahead: Duration,
) -> Result<Evaluation, InsightsError> {
    let mut evaluation = Evaluation {
        observed: String::new(),
        findings: Vec::new(),
        unobserved: Vec::new(),
        problems: Vec::new(),
    };
    let subscriptions = db.subscriptions().await?;
    let mut keys = 0;
    for row in &subscriptions {
        let named = format!("subscription {} ({})", row.id, row.display_name);
        for (which, present, end) in key_ends(row) {
            let subject = format!("{}/{which}", row.id);
            if !present {
                // A previous key retired since it fired.
                if stored.contains_key(&subject) {
                    evaluation.findings.push(Finding {
                        subject,
                        firing: false,
                        observed: format!("{named}: {which} key retired"),
                        watching_since: None,
                    });
                }
                continue;
            }
            keys += 1;
            let (firing, observed) = if row.state == "revoked" {
                (false, format!("{named}: revoked"))
            } else {
                match end {
                    None => (false, format!("{named}: {which} key does not expire")),
                    Some(end) if end <= now => (
                        true,
                        format!("{named}: {which} key expired {}", minute_utc(end)),
                    ),
                    Some(end) => (
                        end - now <= ahead,
                        format!(
                            "{named}: {which} key expires {} (in {} days; threshold {} days)",
                            minute_utc(end),
                            (end - now).whole_days(),
                            ahead.whole_days()
                        ),
                    ),
                }
            };
            evaluation.findings.push(Finding {
                subject,
                firing,
                observed,
                watching_since: None,
            });
        }
    }
    let firing = evaluation.findings.iter().filter(|f| f.firing).count();
    evaluation.observed = format!(
        "{firing} of {keys} keys expire within {} days or have expired",
        ahead.whole_days()
    );
    Ok(evaluation)
}
