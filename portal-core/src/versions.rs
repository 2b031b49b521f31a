//! The stored config versions: the difference between two, and the roll-back to an old one.
//!
//! A roll-back puts the access rules (with their limits), pools and members of the old version
//! back into the tables and publishes: the new version equals the old one in those, and the next
//! change starts from them. Subscriptions are left as they are now: rolling back must never bring
//! back a revoked or rotated-away key.

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::identity::Grantee;
use gatehouse_schema::limits::LimitRule;
use gatehouse_schema::portal::Role;
use serde::Serialize;
use similar::{ChangeTag, TextDiff};
use time::OffsetDateTime;

use crate::db::{AccessRuleRow, MemberRow, NewActivity, PoolRow, SnapshotVersionRow, next_version};
use crate::error::{Edited, PortalError};
use crate::ops::{Portal, json_of};
use crate::push::Published;
use crate::snapshot::RULE_LIMIT_PREFIX;
use crate::user::{SessionUser, require};

/// Lines of unchanged context kept around each change of a diff.
const CONTEXT_LINES: usize = 3;

/// One line of a diff between two versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffLine {
    /// `+` added in the newer version, `-` removed from the older one, ` ` unchanged context,
    /// `…` unchanged lines left out.
    pub tag: char,
    /// The line (pretty-printed JSON).
    pub text: String,
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> PortalError {
    PortalError::Corrupt(format!("{what}: {error}"))
}

fn pretty(row: &SnapshotVersionRow) -> Result<String, PortalError> {
    let value: serde_json::Value =
        serde_json::from_str(&row.snapshot).map_err(|error| corrupt("stored snapshot", error))?;
    serde_json::to_string_pretty(&value).map_err(|error| corrupt("stored snapshot", error))
}

/// The lines that differ between two texts, with a little context, in order.
pub fn diff_lines(old: &str, new: &str) -> Vec<DiffLine> {
    let diff = TextDiff::from_lines(old, new);
    let mut lines = Vec::new();
    for (i, group) in diff.grouped_ops(CONTEXT_LINES).iter().enumerate() {
        if i > 0 {
            lines.push(DiffLine {
                tag: '…',
                text: String::new(),
            });
        }
        for op in group {
            for change in diff.iter_changes(op) {
                lines.push(DiffLine {
                    tag: match change.tag() {
                        ChangeTag::Delete => '-',
                        ChangeTag::Insert => '+',
                        ChangeTag::Equal => ' ',
                    },
                    text: change.value().trim_end_matches('\n').to_owned(),
                });
            }
        }
    }
    lines
}

fn rule_row(
    rule: &gatehouse_schema::identity::AccessRule,
    limits: &[LimitRule],
    updated_at: OffsetDateTime,
) -> AccessRuleRow {
    let (kind, id, display_name) = match &rule.grantee {
        Grantee::Group { id, display_name } => ("group", id.clone(), display_name.clone()),
        Grantee::Subscription { id } => ("subscription", id.clone(), String::new()),
        Grantee::User { id } => ("user", id.clone(), String::new()),
        Grantee::AppRole { value } => ("app_role", value.clone(), String::new()),
    };
    let limit = limits
        .iter()
        .find(|l| l.id.strip_prefix(RULE_LIMIT_PREFIX) == Some(rule.id.as_str()));
    let signed = |value: Option<u64>| value.and_then(|v| i64::try_from(v).ok());
    let list = |items: &[String]| serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned());
    AccessRuleRow {
        id: rule.id.clone(),
        grantee_kind: kind.to_owned(),
        grantee_id: id,
        grantee_display_name: display_name,
        deployments: list(&rule.deployments),
        operations: list(&rule.operations),
        resources: rule.resources,
        requests_per_minute: signed(limit.and_then(|l| l.requests_per_minute)),
        tokens_per_minute: signed(limit.and_then(|l| l.tokens_per_minute)),
        quota_tokens: signed(limit.and_then(|l| l.token_quota.map(|q| q.tokens))),
        quota_period: limit
            .and_then(|l| l.token_quota)
            .map(|q| q.period.as_str().to_owned()),
        updated_at,
    }
}

fn pool_rows(
    snapshot: &ConfigSnapshot,
    updated_at: OffsetDateTime,
) -> Result<(Vec<PoolRow>, Vec<MemberRow>), PortalError> {
    let mut pools = Vec::new();
    let mut members = Vec::new();
    for pool in &snapshot.pools {
        pools.push(PoolRow {
            id: pool.id.clone(),
            deployments: serde_json::to_string(&pool.deployments)
                .map_err(|error| corrupt("pool deployments", error))?,
            serves_resources: pool.serves_resources,
            updated_at,
        });
        for member in &pool.members {
            let kind = serde_json::to_value(member.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .ok_or_else(|| corrupt("member kind", &member.id))?;
            members.push(MemberRow {
                pool_id: pool.id.clone(),
                id: member.id.clone(),
                kind,
                endpoint: member.endpoint.to_string(),
                deployment: member.deployment.clone(),
                api_version: member.api_version.clone(),
                priority: i64::from(member.priority),
                weight: i64::from(member.weight),
                credential: serde_json::to_string(&member.credential)
                    .map_err(|error| corrupt("member credential", error))?,
                updated_at,
            });
        }
    }
    Ok((pools, members))
}

/// The refusal of a roll-back from a page that showed an older newest version than `newest`.
fn changed_since(newest: Option<&SnapshotVersionRow>) -> PortalError {
    PortalError::Conflict {
        what: Edited::Configuration,
        changed_at: newest.map(|newest| newest.created_at),
    }
}

impl Portal {
    /// The stored versions, newest first (without their content): Admin.
    pub async fn versions(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<SnapshotVersionRow>, PortalError> {
        require(user, &[Role::Admin])?;
        self.db.snapshot_versions(200).await
    }

    /// What changed from version `from` to version `to` (pretty-printed JSON, line by line):
    /// Admin.
    pub async fn version_diff(
        &self,
        user: Option<&SessionUser>,
        from: i64,
        to: i64,
    ) -> Result<Vec<DiffLine>, PortalError> {
        require(user, &[Role::Admin])?;
        let load = |field: &'static str, version: i64| async move {
            self.db.snapshot(version).await?.ok_or_else(|| {
                PortalError::invalid(field, format!("there is no version {version}"))
            })
        };
        let old = load("from", from).await?;
        let new = load("to", to).await?;
        Ok(diff_lines(&pretty(&old)?, &pretty(&new)?))
    }

    /// Rolls the access rules, limits and pools back to those of `version` and publishes them
    /// as a new version: Admin. `latest` is the newest version the page showed: when another
    /// has been published since (someone else's change or roll-back), nothing is written and
    /// the roll-back is refused ([`PortalError::Conflict`]), as a form opened on an older
    /// version of what it edits is. Returns what was published: the new version, and the
    /// gateways that did not take it.
    pub async fn rollback(
        &self,
        user: Option<&SessionUser>,
        version: i64,
        latest: i64,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let old = self.db.snapshot(version).await?.ok_or_else(|| {
            PortalError::invalid("version", format!("there is no version {version}"))
        })?;
        let newest = self.db.latest_snapshot().await?;
        if newest
            .as_ref()
            .is_some_and(|newest| newest.version == version)
        {
            return Err(PortalError::invalid(
                "version",
                "this is the current version already",
            ));
        }
        if newest
            .as_ref()
            .is_none_or(|newest| newest.version != latest)
        {
            return Err(changed_since(newest.as_ref()));
        }
        let snapshot: ConfigSnapshot = serde_json::from_str(&old.snapshot)
            .map_err(|error| corrupt("stored snapshot", error))?;
        // Every row put back is a new version of it: a form opened before the roll-back is
        // refused instead of saving over it.
        let now = next_version(None);
        let rules: Vec<AccessRuleRow> = snapshot
            .access_rules
            .iter()
            .flatten()
            .map(|rule| rule_row(rule, &snapshot.limits, now))
            .collect();
        let (pools, members) = pool_rows(&snapshot, now)?;
        let before = serde_json::json!({
            "access_rules": self.db.access_rules().await?,
            "pools": self.db.pools().await?,
            "members": self.db.members().await?,
        });
        let after = serde_json::json!({
            "restored_from_version": version,
            "access_rules": rules,
            "pools": pools,
            "members": members,
        });
        // Checked again as it is written: a version published meanwhile refuses it too.
        let written = self
            .db
            .restore_rules_and_pools(
                latest,
                &rules,
                &pools,
                &members,
                NewActivity {
                    actor: &user.actor(),
                    action: "config.rollback",
                    target: &format!("version {version}"),
                    before: json_of(&before),
                    after: json_of(&after),
                },
            )
            .await?;
        if !written {
            return Err(changed_since(self.db.latest_snapshot().await?.as_ref()));
        }
        Ok(self.publisher.publish_change(&user.actor()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_keeps_context_and_marks_changes() {
        let old = (1..=20).map(|i| format!("line {i}\n")).collect::<String>();
        let new = old.replace("line 10\n", "line ten\n");
        let lines = diff_lines(&old, &new);
        let tags: String = lines.iter().map(|l| l.tag).collect();
        assert_eq!(tags, "   -+   ");
        assert_eq!(lines[3].text, "line 10");
        assert_eq!(lines[4].text, "line ten");
        assert!(diff_lines(&old, &old).is_empty());
    }
}
