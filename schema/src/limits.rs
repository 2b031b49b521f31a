//! Usage limits: requests and tokens per minute, and token quotas per calendar period.
//!
//! The semantics follow API Management's `llm-token-limit` policy (`azure-specs.md` §2.4): a rate
//! limit that is exceeded answers 429 with `Retry-After`, an exhausted quota answers 403. Tokens
//! are reserved from an estimate before a call and reconciled with the reported usage after it,
//! so that parallel calls cannot overrun a limit.

use serde::{Deserialize, Serialize};

/// One limit: who it applies to, on which deployments, and how much they may use.
///
/// Every rule that applies to a call is checked, and all of them are charged together or none
/// is. A rule keeps its own counters (keyed by its `id`), so two rules never share a counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    /// Stable id; names the counters, the refusal message and the metric label.
    pub id: String,
    /// Whose calls the rule counts.
    pub subject: LimitSubjectRule,
    /// Deployment (or model) names the rule covers: exact names or patterns with `*` (any run of
    /// characters). Empty: every call, including calls that name no deployment (files, batches).
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Whether each deployment gets its own counter; otherwise one counter covers every
    /// deployment the rule matches.
    #[serde(default)]
    pub each_deployment: bool,
    /// Calls per minute (a token bucket of this size refilled continuously); 429 beyond it.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Prompt + completion tokens per minute (a token bucket of this size refilled
    /// continuously); 429 beyond it.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per calendar period (UTC); 403 once used up, until the period ends.
    #[serde(default)]
    pub token_quota: Option<TokenQuota>,
}

/// Whose calls a [`LimitRule`] counts, and how its counters are shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitSubjectRule {
    /// The calls of one subscription.
    Subscription {
        /// The subscription id.
        id: String,
    },
    /// The calls of one Entra ID user.
    User {
        /// The user's object id (`oid`).
        id: String,
    },
    /// The calls of every member of an Entra ID group, all counted together in one counter.
    Group {
        /// The group's object id.
        id: String,
    },
    /// Every subscription, each with its own counter.
    EachSubscription {},
    /// Every Entra ID user, each with its own counter.
    EachUser {},
}

/// A number of tokens per calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenQuota {
    /// Tokens allowed in one period.
    pub tokens: u64,
    /// The period; it starts at the beginning of the calendar unit, in UTC.
    pub period: QuotaPeriod,
}

/// A calendar period of a [`TokenQuota`], in UTC. Weeks start on Monday.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPeriod {
    /// From the full hour to the next.
    Hourly,
    /// From midnight to midnight.
    Daily,
    /// From Monday 00:00 to the next Monday 00:00.
    Weekly,
    /// From the first of the month to the first of the next.
    Monthly,
    /// From 1 January to the next 1 January.
    Yearly,
}

impl QuotaPeriod {
    /// The period as configuration writes it (`daily`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Hourly => "hourly",
            QuotaPeriod::Daily => "daily",
            QuotaPeriod::Weekly => "weekly",
            QuotaPeriod::Monthly => "monthly",
            QuotaPeriod::Yearly => "yearly",
        }
    }

    /// The UTC calendar window of this period holding `now` (seconds since the epoch): its start
    /// and its end (exclusive). The one definition of the windows the gateway counts quotas over
    /// and the portal's quota alert reads usage over.
    pub fn window(self, now: i64) -> (i64, i64) {
        const DAY: i64 = 86_400;
        match self {
            QuotaPeriod::Hourly => {
                let start = now - now.rem_euclid(3_600);
                (start, start + 3_600)
            }
            QuotaPeriod::Daily => {
                let start = now - now.rem_euclid(DAY);
                (start, start + DAY)
            }
            QuotaPeriod::Weekly => {
                // 1970-01-01 was a Thursday: three days after a Monday.
                let days = now.div_euclid(DAY);
                let monday = days - (days + 3).rem_euclid(7);
                (monday * DAY, (monday + 7) * DAY)
            }
            QuotaPeriod::Monthly | QuotaPeriod::Yearly => {
                let Ok(at) = time::OffsetDateTime::from_unix_timestamp(now) else {
                    return (now, now + DAY);
                };
                let (year, month) = (at.year(), at.month());
                let (start, end) = if self == QuotaPeriod::Monthly {
                    let next = if month == time::Month::December {
                        (year + 1, time::Month::January)
                    } else {
                        (year, month.next())
                    };
                    ((year, month), next)
                } else {
                    (
                        (year, time::Month::January),
                        (year + 1, time::Month::January),
                    )
                };
                let first = |(y, m): (i32, time::Month)| {
                    time::Date::from_calendar_date(y, m, 1)
                        .map(|d| d.midnight().assume_utc().unix_timestamp())
                };
                match (first(start), first(end)) {
                    (Ok(start), Ok(end)) => (start, end),
                    _ => (now, now + DAY),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use time::macros::datetime;

    /// Seconds since the epoch of a UTC date-time.
    fn at(moment: OffsetDateTime) -> i64 {
        moment.unix_timestamp()
    }

    #[test]
    fn quota_windows_are_utc_calendar_units() {
        use QuotaPeriod::{Daily, Hourly, Monthly, Weekly, Yearly};
        // (period, moment, the window's start, its end)
        let cases = [
            (
                Hourly,
                datetime!(2025-03-12 14:35:07 UTC),
                datetime!(2025-03-12 14:00 UTC),
                datetime!(2025-03-12 15:00 UTC),
            ),
            (
                Daily,
                datetime!(2025-03-12 14:35:07 UTC),
                datetime!(2025-03-12 0:00 UTC),
                datetime!(2025-03-13 0:00 UTC),
            ),
            // 2025-03-12 is a Wednesday; its week starts on Monday the 10th.
            (
                Weekly,
                datetime!(2025-03-12 14:35:07 UTC),
                datetime!(2025-03-10 0:00 UTC),
                datetime!(2025-03-17 0:00 UTC),
            ),
            // A Monday at midnight starts its own week; the Sunday before belongs to the previous one.
            (
                Weekly,
                datetime!(2025-03-10 0:00 UTC),
                datetime!(2025-03-10 0:00 UTC),
                datetime!(2025-03-17 0:00 UTC),
            ),
            (
                Weekly,
                datetime!(2025-03-09 23:59:59 UTC),
                datetime!(2025-03-03 0:00 UTC),
                datetime!(2025-03-10 0:00 UTC),
            ),
            // The week of 1 January 2025 (a Wednesday) starts in 2024.
            (
                Weekly,
                datetime!(2025-01-01 12:00 UTC),
                datetime!(2024-12-30 0:00 UTC),
                datetime!(2025-01-06 0:00 UTC),
            ),
            (
                Monthly,
                datetime!(2025-01-31 23:59:59 UTC),
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2025-02-01 0:00 UTC),
            ),
            (
                Monthly,
                datetime!(2024-02-29 10:00 UTC),
                datetime!(2024-02-01 0:00 UTC),
                datetime!(2024-03-01 0:00 UTC),
            ),
            (
                Monthly,
                datetime!(2025-12-31 23:59:59 UTC),
                datetime!(2025-12-01 0:00 UTC),
                datetime!(2026-01-01 0:00 UTC),
            ),
            (
                Monthly,
                datetime!(2026-01-01 0:00 UTC),
                datetime!(2026-01-01 0:00 UTC),
                datetime!(2026-02-01 0:00 UTC),
            ),
            (
                Yearly,
                datetime!(2025-03-12 14:35:07 UTC),
                datetime!(2025-01-01 0:00 UTC),
                datetime!(2026-01-01 0:00 UTC),
            ),
        ];
        for (period, moment, start, end) in cases {
            assert_eq!(
                period.window(at(moment)),
                (at(start), at(end)),
                "{period:?} at {moment}"
            );
        }
    }

    #[test]
    fn a_rule_reads_as_documented() {
        let rule: LimitRule = serde_json::from_value(serde_json::json!({
            "id": "research-tpm",
            "subject": {"kind": "group", "id": "5f1c0d3e-0000-4000-8000-000000000001"},
            "deployments": ["gpt-4o*"],
            "each_deployment": true,
            "tokens_per_minute": 10000,
            "token_quota": {"tokens": 1000000, "period": "monthly"}
        }))
        .unwrap();
        assert_eq!(
            rule.subject,
            LimitSubjectRule::Group {
                id: "5f1c0d3e-0000-4000-8000-000000000001".to_owned()
            }
        );
        assert_eq!(rule.token_quota.unwrap().period, QuotaPeriod::Monthly);
        assert_eq!(rule.requests_per_minute, None);
        let each: LimitSubjectRule =
            serde_json::from_value(serde_json::json!({"kind": "each_subscription"})).unwrap();
        assert_eq!(each, LimitSubjectRule::EachSubscription {});
    }

    #[test]
    fn unknown_fields_are_refused() {
        let wrong = serde_json::from_value::<LimitRule>(serde_json::json!({
            "id": "x", "subject": {"kind": "each_user"}, "tokens_per_hour": 5
        }));
        assert!(wrong.is_err());
        let wrong_subject = serde_json::from_value::<LimitSubjectRule>(
            serde_json::json!({"kind": "each_user", "id": "u"}),
        );
        assert!(wrong_subject.is_err());
    }
}
