//! Alerts: rules on the usage figures, the gateways' view of the pool members and the config
//! database, evaluated every minute; each rule notifies a webhook once when one of its subjects
//! starts firing and once when it resolves.
//!
//! A rule watches either one figure (`daily_tokens`, `error_rate`, `latency_p95`: its one subject
//! has the empty name) or many subjects, each notified on its own: every pool member on every
//! registered gateway (`backend_set_aside`), every subject of every limit rule with a token quota
//! (`quota_nearly_used`), every subscription key (`key_expiring`).
//!
//! The webhook body is `{"text": "…"}`, which Slack incoming webhooks and Microsoft Teams
//! (Office 365 connector) incoming webhooks both accept. A webhook URL is a credential: the portal
//! takes it as a secret reference. A notification that cannot be delivered is tried again at the
//! next evaluation; a subject's state changes only once its notification is delivered.
//!
//! The state of every subject that fires (or is being watched: a member seen set aside, not yet
//! for long enough) is kept in the config database (`alert_states`), so that after a restart a
//! rule that still fires does not notify again and one that resolved meanwhile notifies the
//! resolution. A rule is known by its name: the state of a name no longer configured is dropped
//! at start.

mod evaluate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

pub use evaluate::quota_window;

use super::AuditSource;
use crate::db::{AlertStateRow, ConfigDb};
use crate::error::PortalError;
use crate::secret::AdminTokenRefs;

/// The longest a member may be watched for: a week, in minutes.
const MAX_SET_ASIDE_MINUTES: i64 = 7 * 24 * 60;
/// The furthest ahead a key expiry is looked for: ten years, in days.
const MAX_EXPIRY_DAYS: i64 = 3_650;

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
    /// A pool member set aside (throttled or failing) on a registered gateway, seen so at every
    /// evaluation for longer than `minutes`; one subject per gateway × pool × member.
    BackendSetAside {
        /// Minutes it must have been set aside without a break.
        minutes: i64,
        /// Only the members of this pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pool: Option<String>,
        /// Only members with this id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        member: Option<String>,
    },
    /// The tokens a limit rule's subject used in the current quota period reach `percent` % of
    /// the rule's token quota; one subject per limit rule × counted subject.
    QuotaNearlyUsed {
        /// Share of the quota, above 0 and at most 100.
        percent: f64,
        /// Only the limit rule with this id (`rule:{access rule id}` for an access rule's limits).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
    /// A subscription key that expires within `days` days, or has expired, on a subscription
    /// that is not revoked; one subject per key (primary, secondary).
    KeyExpiring {
        /// Days ahead.
        days: i64,
    },
}

fn one() -> i64 {
    1
}

impl AlertCondition {
    /// Whether evaluating it needs the audit source (the usage rollups).
    pub fn needs_audit_source(&self) -> bool {
        matches!(
            self,
            AlertCondition::DailyTokens { .. }
                | AlertCondition::ErrorRate { .. }
                | AlertCondition::LatencyP95 { .. }
                | AlertCondition::QuotaNearlyUsed { .. }
        )
    }
}

/// A named rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Shown in the notification and the portal; names the rule's stored state.
    pub name: String,
    /// What it watches.
    pub condition: AlertCondition,
}

/// Whether `text` is an id as the portal writes them (letters, digits, `.`, `_`, `-`).
fn is_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses and checks a JSON array of rules.
pub fn parse_rules(json: &str) -> Result<Vec<AlertRule>, String> {
    let rules: Vec<AlertRule> =
        serde_json::from_str(json).map_err(|e| format!("alert rules: {e}"))?;
    let mut names = BTreeSet::new();
    for rule in &rules {
        let bad = |why: &str| Err(format!("alert rule `{}`: {why}", rule.name));
        if rule.name.trim().is_empty()
            || rule.name.chars().any(char::is_control)
            || rule.name.chars().count() > 200
        {
            return bad("a name of 1 to 200 characters without control characters is needed");
        }
        if !names.insert(rule.name.as_str()) {
            return bad("two rules have this name; the name is what the rule's state is kept by");
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
            AlertCondition::BackendSetAside {
                minutes,
                pool,
                member,
            } => {
                if !(1..=MAX_SET_ASIDE_MINUTES).contains(minutes) {
                    return bad(&format!(
                        "minutes 1 to {MAX_SET_ASIDE_MINUTES} (a week), got {minutes}"
                    ));
                }
                if pool.as_deref().is_some_and(|p| !is_id(p)) {
                    return bad(
                        "pool is a pool id (1 to 64 letters, digits, dots, underscores or hyphens)",
                    );
                }
                if member.as_deref().is_some_and(|m| !is_id(m)) {
                    return bad(
                        "member is a member id (1 to 64 letters, digits, dots, underscores or hyphens)",
                    );
                }
            }
            AlertCondition::QuotaNearlyUsed { percent, limit } => {
                if !(percent.is_finite() && *percent > 0.0 && *percent <= 100.0) {
                    return bad(&format!("percent above 0 and at most 100, got {percent}"));
                }
                if limit.as_deref().is_some_and(|l| {
                    l.trim().is_empty() || l.chars().any(char::is_control) || l.len() > 200
                }) {
                    return bad("limit is a limit rule id");
                }
            }
            AlertCondition::KeyExpiring { days } => {
                if !(0..=MAX_EXPIRY_DAYS).contains(days) {
                    return bad(&format!("days 0 to {MAX_EXPIRY_DAYS}, got {days}"));
                }
            }
        }
    }
    Ok(rules)
}

/// One subject as one evaluation found it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    /// The subject within the rule (empty for a rule that watches one figure).
    pub subject: String,
    /// Whether it fires.
    pub firing: bool,
    /// What was observed, for a person (the notification's text after the rule's name).
    pub observed: String,
    /// Since when its condition holds, for a rule that fires only once it has held long enough
    /// (kept while it does not fire yet).
    #[serde(with = "time::serde::rfc3339::option")]
    pub watching_since: Option<OffsetDateTime>,
}

/// One evaluation of a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// The rule's figure as a whole, for a person.
    pub observed: String,
    /// The subjects observed; a stored subject absent here (and not unobserved) no longer exists.
    pub findings: Vec<Finding>,
    /// Prefixes of subjects that could not be observed this time (a gateway that did not
    /// answer, an audit source that answered in part; the empty prefix: every subject): their
    /// stored state is kept as it is.
    pub unobserved: Vec<String>,
    /// What could not be observed, for the page.
    pub problems: Vec<String>,
}

impl Evaluation {
    /// The evaluation of a rule that watches one figure.
    fn single(firing: bool, observed: String) -> Evaluation {
        Evaluation {
            findings: vec![Finding {
                subject: String::new(),
                firing,
                observed: observed.clone(),
                watching_since: None,
            }],
            observed,
            unobserved: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// One subject of a rule that fires or is being watched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectState {
    /// The subject (empty for a rule that watches one figure).
    pub subject: String,
    /// Whether it fires (as notified).
    pub firing: bool,
    /// Firing: since when. Watched: since when its condition holds.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// What was observed last.
    pub observed: String,
}

impl From<&AlertStateRow> for SubjectState {
    fn from(row: &AlertStateRow) -> Self {
        SubjectState {
            subject: row.subject.clone(),
            firing: row.firing,
            since: row.since,
            observed: row.observed.clone(),
        }
    }
}

/// A rule and what is known of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertState {
    /// The rule.
    pub rule: AlertRule,
    /// Whether any of its subjects fires (as last notified).
    pub firing: bool,
    /// Since when its longest-firing subject fires.
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// The last observed value of the rule as a whole.
    pub observed: Option<String>,
    /// When it was last evaluated.
    #[serde(with = "time::serde::rfc3339::option")]
    pub checked_at: Option<OffsetDateTime>,
    /// Why the last evaluation or a notification failed, or what could not be observed.
    pub error: Option<String>,
    /// The subjects that fire or are being watched.
    pub subjects: Vec<SubjectState>,
}

impl AlertState {
    fn new(rule: AlertRule, rows: &[AlertStateRow]) -> AlertState {
        let mut state = AlertState {
            rule,
            firing: false,
            since: None,
            observed: None,
            checked_at: None,
            error: None,
            subjects: Vec::new(),
        };
        state.set_subjects(rows.iter().map(SubjectState::from).collect());
        state
    }

    fn set_subjects(&mut self, subjects: Vec<SubjectState>) {
        self.firing = subjects.iter().any(|s| s.firing);
        self.since = subjects.iter().filter(|s| s.firing).map(|s| s.since).min();
        self.subjects = subjects;
    }
}

/// Why the alerter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AlertSetupError {
    /// A rule needs the audit source and none is configured.
    #[error("alert rule `{0}` reads the usage rollups: it needs an audit source")]
    NoAuditSource(String),
    /// The config database failed.
    #[error(transparent)]
    Database(#[from] PortalError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Evaluates the rules and notifies the webhook of changes.
#[derive(Debug)]
pub struct Alerter {
    source: Option<Arc<dyn AuditSource>>,
    db: ConfigDb,
    webhook: Option<Url>,
    client: reqwest::Client,
    admin_token_refs: AdminTokenRefs,
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
    /// An alerter of `rules` over `source` and the config database `db`, notifying `webhook`
    /// (none: state only). Loads the stored state and drops that of rules no longer configured.
    pub async fn new(
        db: ConfigDb,
        source: Option<Arc<dyn AuditSource>>,
        rules: Vec<AlertRule>,
        webhook: Option<Url>,
    ) -> Result<Alerter, AlertSetupError> {
        if source.is_none()
            && let Some(rule) = rules.iter().find(|r| r.condition.needs_audit_source())
        {
            return Err(AlertSetupError::NoAuditSource(rule.name.clone()));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let stored = db.alert_states().await?;
        for row in &stored {
            if !rules.iter().any(|rule| rule.name == row.rule_name) {
                tracing::info!(rule = %row.rule_name, subject = %row.subject, "alert rule no longer configured; its state is dropped");
                db.delete_alert_state(&row.rule_name, &row.subject).await?;
            }
        }
        let states = rules
            .into_iter()
            .map(|rule| {
                let rows: Vec<AlertStateRow> = stored
                    .iter()
                    .filter(|row| row.rule_name == rule.name)
                    .cloned()
                    .collect();
                AlertState::new(rule, &rows)
            })
            .collect();
        Ok(Alerter {
            source,
            db,
            webhook,
            client,
            admin_token_refs: AdminTokenRefs::default(),
            states: Mutex::new(states),
        })
    }

    /// This alerter, reading gateway admin tokens only from the references `refs` allows
    /// (without it: [`AdminTokenRefs::default`]).
    pub fn with_admin_token_refs(mut self, refs: AdminTokenRefs) -> Alerter {
        self.admin_token_refs = refs;
        self
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

    /// Evaluates every rule at `now`; each change of a subject is notified once. Returns the
    /// texts sent.
    pub async fn tick(&self, now: OffsetDateTime) -> Vec<String> {
        // Both engines keep microseconds: a time read back must equal the one written.
        let now = now
            .replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
            .unwrap_or(now);
        let rules: Vec<AlertRule> = lock(&self.states).iter().map(|s| s.rule.clone()).collect();
        let mut sent = Vec::new();
        let stored = match self.db.alert_states().await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::error!(%error, "alert states unreadable; no rule evaluated");
                let message = error.public_message();
                for state in lock(&self.states).iter_mut() {
                    state.checked_at = Some(now);
                    state.error = Some(message.clone());
                }
                return sent;
            }
        };
        for (i, rule) in rules.iter().enumerate() {
            let rows: BTreeMap<String, AlertStateRow> = stored
                .iter()
                .filter(|row| row.rule_name == rule.name)
                .map(|row| (row.subject.clone(), row.clone()))
                .collect();
            let outcome = self.tick_rule(rule, now, rows, &mut sent).await;
            if let Some(state) = lock(&self.states).get_mut(i) {
                state.checked_at = Some(now);
                match outcome {
                    Ok((observed, subjects, problems)) => {
                        state.observed = Some(observed);
                        state.error = (!problems.is_empty()).then(|| problems.join("; "));
                        state.set_subjects(subjects);
                    }
                    Err(error) => state.error = Some(error),
                }
            }
        }
        sent
    }

    /// Evaluates one rule against its stored subjects, notifies and stores the changes. Returns
    /// the rule's figure, its subjects as now stored and the problems met.
    async fn tick_rule(
        &self,
        rule: &AlertRule,
        now: OffsetDateTime,
        mut rows: BTreeMap<String, AlertStateRow>,
        sent: &mut Vec<String>,
    ) -> Result<(String, Vec<SubjectState>, Vec<String>), String> {
        let evaluation = evaluate::evaluate(
            &evaluate::Context {
                source: self.source.as_deref(),
                db: &self.db,
                http: &self.client,
                admin_token_refs: &self.admin_token_refs,
            },
            rule,
            now,
            &rows,
        )
        .await
        .map_err(|error| error.public_message())?;
        let mut problems = evaluation.problems;
        let mut seen = BTreeSet::new();
        let mut changes: Vec<(Option<AlertStateRow>, Finding)> = Vec::new();
        for finding in evaluation.findings {
            seen.insert(finding.subject.clone());
            changes.push((rows.get(&finding.subject).cloned(), finding));
        }
        for (subject, row) in &rows {
            let unobserved = evaluation
                .unobserved
                .iter()
                .any(|prefix| subject.starts_with(prefix.as_str()));
            if seen.contains(subject) || unobserved {
                continue;
            }
            changes.push((
                Some(row.clone()),
                Finding {
                    subject: subject.clone(),
                    firing: false,
                    observed: format!("{subject}: no longer in the configuration"),
                    watching_since: None,
                },
            ));
        }
        for (before, finding) in changes {
            let was_firing = before.as_ref().is_some_and(|row| row.firing);
            if was_firing != finding.firing {
                let text = format!(
                    "{}: {}: {}",
                    if finding.firing { "FIRING" } else { "RESOLVED" },
                    rule.name,
                    finding.observed
                );
                if let Err(why) = self.notify(&text).await {
                    tracing::warn!(rule = %rule.name, subject = %finding.subject, error = %why, "alert notification failed; retried at the next evaluation");
                    problems.push(why);
                    continue;
                }
                sent.push(text);
            }
            let after = (finding.firing || finding.watching_since.is_some()).then(|| {
                let since = match (&before, finding.watching_since) {
                    (_, Some(since)) => since,
                    (Some(row), None) if row.firing => row.since,
                    _ => now,
                };
                AlertStateRow {
                    rule_name: rule.name.clone(),
                    subject: finding.subject.clone(),
                    firing: finding.firing,
                    since,
                    observed: finding.observed.clone(),
                    updated_at: now,
                }
            });
            let stored = match (&before, &after) {
                (Some(_), None) => self
                    .db
                    .delete_alert_state(&rule.name, &finding.subject)
                    .await
                    .map(|()| rows.remove(&finding.subject).map(|_| ())),
                (_, Some(row)) if !same_state(before.as_ref(), row) => {
                    self.db.save_alert_state(row).await.map(|()| {
                        rows.insert(finding.subject.clone(), row.clone())
                            .map(|_| ())
                    })
                }
                _ => Ok(None),
            };
            if let Err(error) = stored {
                tracing::error!(rule = %rule.name, subject = %finding.subject, %error, "alert state not stored");
                problems.push(error.public_message());
            }
        }
        let subjects = rows.values().map(SubjectState::from).collect();
        Ok((evaluation.observed, subjects, problems))
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

/// Whether a stored row already says what `row` says (its time of writing aside).
fn same_state(before: Option<&AlertStateRow>, row: &AlertStateRow) -> bool {
    before.is_some_and(|b| {
        b.firing == row.firing && b.since == row.since && b.observed == row.observed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_are_refused() {
        let rules = parse_rules(
            r#"[{"name": "red tokens", "condition": {"kind": "daily_tokens", "dimension": "group", "value": "g-red", "above": 1000}},
                {"name": "errors", "condition": {"kind": "error_rate", "minutes": 5, "above": 0.1}},
                {"name": "slow", "condition": {"kind": "latency_p95", "minutes": 15, "above_ms": 2000}},
                {"name": "aside", "condition": {"kind": "backend_set_aside", "minutes": 10, "pool": "chat"}},
                {"name": "quota", "condition": {"kind": "quota_nearly_used", "percent": 90}},
                {"name": "one quota", "condition": {"kind": "quota_nearly_used", "percent": 100, "limit": "rule:team-a"}},
                {"name": "keys", "condition": {"kind": "key_expiring", "days": 14}}]"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 7);
        assert!(matches!(
            rules[1].condition,
            AlertCondition::ErrorRate {
                min_requests: 1,
                ..
            }
        ));
        assert_eq!(
            rules[3].condition,
            AlertCondition::BackendSetAside {
                minutes: 10,
                pool: Some("chat".to_owned()),
                member: None
            }
        );
        assert!(rules[4].condition.needs_audit_source());
        assert!(!rules[6].condition.needs_audit_source());
        for (bad, why) in [
            (
                r#"[{"name": "x", "condition": {"kind": "daily_tokens", "dimension": "model", "value": "m", "above": 1}}]"#,
                "dimension",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "error_rate", "minutes": 0, "above": 0.1}}]"#,
                "minutes",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "error_rate", "minutes": 5, "above": 2}}]"#,
                "above",
            ),
            (
                r#"[{"name": "", "condition": {"kind": "latency_p95", "minutes": 5, "above_ms": 1}}]"#,
                "name",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "unknown"}}]"#,
                "unknown variant",
            ),
            (
                r#"[{"name": "x", "extra": 1, "condition": {"kind": "latency_p95", "minutes": 5, "above_ms": 1}}]"#,
                "unknown field",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "backend_set_aside", "minutes": -5}}]"#,
                "minutes 1 to 10080",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "backend_set_aside", "minutes": 0}}]"#,
                "minutes 1 to 10080",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "backend_set_aside", "minutes": 5, "pool": "a/b"}}]"#,
                "pool is a pool id",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "backend_set_aside", "minutes": 5, "member": ""}}]"#,
                "member is a member id",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "backend_set_aside", "minutes": 5, "pools": "a"}}]"#,
                "unknown field",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "quota_nearly_used", "percent": 0}}]"#,
                "percent above 0 and at most 100",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "quota_nearly_used", "percent": 100.5}}]"#,
                "percent above 0 and at most 100",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "quota_nearly_used", "percent": -3}}]"#,
                "percent above 0 and at most 100",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "quota_nearly_used", "percent": 90, "limit": " "}}]"#,
                "limit is a limit rule id",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "key_expiring", "days": -1}}]"#,
                "days 0 to 3650",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "key_expiring"}}]"#,
                "missing field `days`",
            ),
            (
                r#"[{"name": "x", "condition": {"kind": "key_expiring", "days": 3}},
                    {"name": "x", "condition": {"kind": "key_expiring", "days": 5}}]"#,
                "two rules have this name",
            ),
        ] {
            let error = parse_rules(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
