//! Alerts: rules on the usage figures, evaluated every minute against the same [`AuditSource`] as
//! the dashboards; each rule notifies a webhook once when it starts firing and once when it
//! resolves.
//!
//! The webhook body is `{"text": "…"}`, which Slack incoming webhooks and Microsoft Teams
//! (Office 365 connector) incoming webhooks both accept. A webhook URL is a credential: the portal
//! takes it as a secret reference. A notification that cannot be delivered is tried again at the
//! next evaluation; the rule's state changes only once its notification is delivered.
//!
//! The state lives in memory: after a restart a rule that still fires notifies again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

use super::{AuditSource, Dimension, InsightsError, TimeRange, UsageRequest};

/// What a rule watches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AlertCondition {
    /// Tokens of one group or subscription since the start of the UTC day above a threshold.
    DailyTokens {
        /// `group` or `subscription`.
        dimension: String,
        /// The group id or subscription id.
        value: String,
        /// Tokens.
        above: i64,
    },
    /// Errors per request over the last `minutes` above `above` (0 to 1), once at least
    /// `min_requests` calls were made.
    ErrorRate {
        /// Window, minutes.
        minutes: i64,
        /// Rate.
        above: f64,
        /// Fewer calls than this never fire.
        #[serde(default = "one")]
        min_requests: i64,
    },
    /// p95 of total time over the last `minutes` above `above_ms`.
    LatencyP95 {
        /// Window, minutes.
        minutes: i64,
        /// Milliseconds.
        above_ms: i64,
    },
}

fn one() -> i64 {
    1
}

/// A named rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Shown in the notification and the portal.
    pub name: String,
    /// What it watches.
    pub condition: AlertCondition,
}

/// Parses and checks a JSON array of rules.
pub fn parse_rules(json: &str) -> Result<Vec<AlertRule>, String> {
    let rules: Vec<AlertRule> =
        serde_json::from_str(json).map_err(|e| format!("alert rules: {e}"))?;
    for rule in &rules {
        let bad = |why: &str| Err(format!("alert rule `{}`: {why}", rule.name));
        if rule.name.trim().is_empty() || rule.name.chars().any(char::is_control) {
            return bad("a name without control characters is needed");
        }
        match &rule.condition {
            AlertCondition::DailyTokens {
                dimension, above, ..
            } => {
                if !matches!(dimension.as_str(), "group" | "subscription") {
                    return bad("dimension is group or subscription");
                }
                if *above < 0 {
                    return bad("above must not be negative");
                }
            }
            AlertCondition::ErrorRate { minutes, above, .. } => {
                if !(1..=1440).contains(minutes) || !(0.0..=1.0).contains(above) {
                    return bad("minutes 1 to 1440, above 0 to 1");
                }
            }
            AlertCondition::LatencyP95 { minutes, above_ms } => {
                if !(1..=1440).contains(minutes) || *above_ms < 0 {
                    return bad("minutes 1 to 1440, above_ms not negative");
                }
            }
        }
    }
    Ok(rules)
}

/// One evaluation of a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Whether the condition holds.
    pub firing: bool,
    /// The observed value, for a person.
    pub observed: String,
}

/// Evaluates one rule at `now`.
pub async fn evaluate(
    source: &dyn AuditSource,
    rule: &AlertRule,
    now: OffsetDateTime,
) -> Result<Evaluation, InsightsError> {
    match &rule.condition {
        AlertCondition::DailyTokens {
            dimension,
            value,
            above,
        } => {
            let day = now.replace_time(time::Time::MIDNIGHT);
            let (range, granularity) =
                TimeRange::new(day, now.max(day + time::Duration::MINUTE))?.aligned();
            let dimension = if dimension == "group" {
                Dimension::Group
            } else {
                Dimension::Subscription
            };
            let points = source
                .usage(&UsageRequest {
                    range,
                    granularity,
                    dimension,
                    only: Some(vec![value.clone()]),
                })
                .await?
                .value;
            let tokens: i64 = points.iter().map(|p| p.total_tokens).sum();
            Ok(Evaluation {
                firing: tokens > *above,
                observed: format!("{tokens} tokens today (threshold {above})"),
            })
        }
        AlertCondition::ErrorRate {
            minutes,
            above,
            min_requests,
        } => {
            let (range, granularity) =
                TimeRange::new(now - time::Duration::minutes(*minutes), now)?.aligned();
            let points = source
                .usage(&UsageRequest {
                    range,
                    granularity,
                    dimension: Dimension::All,
                    only: None,
                })
                .await?
                .value;
            let requests: i64 = points.iter().map(|p| p.requests).sum();
            let errors: i64 = points.iter().map(|p| p.errors).sum();
            let rate = if requests > 0 {
                errors as f64 / requests as f64
            } else {
                0.0
            };
            Ok(Evaluation {
                firing: requests >= *min_requests && rate > *above,
                observed: format!(
                    "{:.1}% errors in {requests} calls over {minutes} min (threshold {:.1}%)",
                    rate * 100.0,
                    above * 100.0
                ),
            })
        }
        AlertCondition::LatencyP95 { minutes, above_ms } => {
            let (range, granularity) =
                TimeRange::new(now - time::Duration::minutes(*minutes), now)?.aligned();
            let figures = source.figures(range, granularity).await?.value;
            let p95 = figures.latency.p95_ms;
            Ok(Evaluation {
                firing: p95.is_some_and(|p| p > *above_ms),
                observed: format!(
                    "p95 latency {} over {minutes} min (threshold {above_ms} ms)",
                    p95.map_or("n/a".to_owned(), |p| format!("{p} ms"))
                ),
            })
        }
    }
}

/// A rule and what is known of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertState {
    /// The rule.
    pub rule: AlertRule,
    /// Whether it fires (as last notified).
    pub firing: bool,
    /// Since when it fires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// The last observed value.
    pub observed: Option<String>,
    /// When it was last evaluated.
    #[serde(with = "time::serde::rfc3339::option")]
    pub checked_at: Option<OffsetDateTime>,
    /// Why the last evaluation or notification failed.
    pub error: Option<String>,
}

/// Evaluates the rules and notifies the webhook of changes.
#[derive(Debug)]
pub struct Alerter {
    source: Arc<dyn AuditSource>,
    webhook: Option<Url>,
    client: reqwest::Client,
    states: Mutex<Vec<AlertState>>,
}

/// Locks a mutex, recovering the data of a poisoned one (a panic elsewhere leaves the states
/// usable).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Alerter {
    /// An alerter of `rules` over `source`, notifying `webhook` (none: state only).
    pub fn new(
        source: Arc<dyn AuditSource>,
        rules: Vec<AlertRule>,
        webhook: Option<Url>,
    ) -> Result<Alerter, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Alerter {
            source,
            webhook,
            client,
            states: Mutex::new(
                rules
                    .into_iter()
                    .map(|rule| AlertState {
                        rule,
                        firing: false,
                        since: None,
                        observed: None,
                        checked_at: None,
                        error: None,
                    })
                    .collect(),
            ),
        })
    }

    /// The rules and their states.
    pub fn states(&self) -> Vec<AlertState> {
        lock(&self.states).clone()
    }

    async fn notify(&self, text: &str) -> Result<(), String> {
        let Some(webhook) = &self.webhook else {
            return Ok(());
        };
        let response = self
            .client
            .post(webhook.clone())
            .json(&serde_json::json!({ "text": text }))
            .send()
            .await
            // The URL is a credential: the error names neither it nor its host.
            .map_err(|e| {
                format!(
                    "webhook unreachable ({})",
                    if e.is_timeout() {
                        "timeout"
                    } else {
                        "connection failed"
                    }
                )
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!(
                "webhook answered HTTP {}",
                response.status().as_u16()
            ))
        }
    }

    /// Evaluates every rule at `now`; each change is notified once. Returns the texts sent.
    pub async fn tick(&self, now: OffsetDateTime) -> Vec<String> {
        let rules: Vec<AlertRule> = lock(&self.states).iter().map(|s| s.rule.clone()).collect();
        let mut sent = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let evaluation = evaluate(self.source.as_ref(), rule, now).await;
            let was_firing = lock(&self.states).get(i).is_some_and(|s| s.firing);
            let (outcome, error) = match evaluation {
                Ok(evaluation) => {
                    let text = match (was_firing, evaluation.firing) {
                        (false, true) => {
                            Some(format!("FIRING: {}: {}", rule.name, evaluation.observed))
                        }
                        (true, false) => {
                            Some(format!("RESOLVED: {}: {}", rule.name, evaluation.observed))
                        }
                        _ => None,
                    };
                    let delivered = match &text {
                        Some(text) => self.notify(text).await,
                        None => Ok(()),
                    };
                    match delivered {
                        Ok(()) => {
                            sent.extend(text);
                            (Some(evaluation), None)
                        }
                        Err(why) => {
                            tracing::warn!(rule = %rule.name, error = %why, "alert notification failed; retried at the next evaluation");
                            (None, Some(why))
                        }
                    }
                }
                Err(error) => (None, Some(error.public_message())),
            };
            let mut states = lock(&self.states);
            if let Some(state) = states.get_mut(i) {
                state.checked_at = Some(now);
                state.error = error;
                if let Some(evaluation) = outcome {
                    if evaluation.firing && !state.firing {
                        state.since = Some(now);
                    }
                    if !evaluation.firing {
                        state.since = None;
                    }
                    state.firing = evaluation.firing;
                    state.observed = Some(evaluation.observed);
                }
            }
        }
        sent
    }

    /// Evaluates every `every` until the task is dropped.
    pub fn spawn(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                self.tick(OffsetDateTime::now_utc()).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_are_refused() {
        let rules = parse_rules(
            r#"[{"name": "red tokens", "condition": {"kind": "daily_tokens", "dimension": "group", "value": "g-red", "above": 1000}},
                {"name": "errors", "condition": {"kind": "error_rate", "minutes": 5, "above": 0.1}},
                {"name": "slow", "condition": {"kind": "latency_p95", "minutes": 15, "above_ms": 2000}}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert!(matches!(
            rules[1].condition,
            AlertCondition::ErrorRate {
                min_requests: 1,
                ..
            }
        ));
        for bad in [
            r#"[{"name": "x", "condition": {"kind": "daily_tokens", "dimension": "model", "value": "m", "above": 1}}]"#,
            r#"[{"name": "x", "condition": {"kind": "error_rate", "minutes": 0, "above": 0.1}}]"#,
            r#"[{"name": "x", "condition": {"kind": "error_rate", "minutes": 5, "above": 2}}]"#,
            r#"[{"name": "", "condition": {"kind": "latency_p95", "minutes": 5, "above_ms": 1}}]"#,
            r#"[{"name": "x", "condition": {"kind": "unknown"}}]"#,
            r#"[{"name": "x", "extra": 1, "condition": {"kind": "latency_p95", "minutes": 5, "above_ms": 1}}]"#,
        ] {
            assert!(parse_rules(bad).is_err(), "{bad}");
        }
    }
}
