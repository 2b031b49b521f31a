//! Access rules: who (an Entra group, a subscription, a user or an app role) may call which
//! deployments and operations, with optional limits. Every input is checked here, on the server,
//! and a refusal names the form field it is about.

use gatehouse_schema::OperationId;
use gatehouse_schema::portal::Role;
use serde::Serialize;

use time::OffsetDateTime;

use crate::db::{AccessRuleRow, NewActivity, next_version};
use crate::error::{Edited, PortalError};
use crate::ops::{Portal, check_version, json_of, required_version, valid_id};
use crate::push::Published;
use crate::snapshot;
use crate::user::{SessionUser, require};

/// An access rule as a form sends it: lists as text, numbers as text, empty = not set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AccessRuleInput {
    /// Stable id (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// `group`, `subscription`, `user` or `app_role`.
    pub grantee_kind: String,
    /// The group's or user's object id, the subscription id, or the app role's value.
    pub grantee_id: String,
    /// The group's display name (required for a group).
    pub grantee_display_name: String,
    /// Deployment names or `*` patterns, separated by commas, spaces or new lines.
    pub deployments: String,
    /// Operation ids or `*` patterns, separated likewise; empty = every operation.
    pub operations: String,
    /// Whether calls naming no deployment (files, batches, …) are granted too.
    pub resources: bool,
    /// Calls per minute, or empty.
    pub requests_per_minute: String,
    /// Tokens per minute, or empty.
    pub tokens_per_minute: String,
    /// Tokens per quota period, or empty.
    pub quota_tokens: String,
    /// `hourly`, `daily`, `weekly`, `monthly`, `yearly`, or empty.
    pub quota_period: String,
    /// The version of the rule the form was opened on ([`crate::ops::version_text`] of its
    /// `updated_at`); empty for a new rule.
    pub version: String,
}

/// Longest list a rule may hold, and longest display name.
const MAX_ITEMS: usize = 100;
const MAX_NAME_CHARS: usize = 200;

fn items(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether `text` is an Entra object id: a GUID, `8-4-4-4-12` hexadecimal digits.
pub fn is_object_id(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Whether `text` is a deployment name or a `*` pattern the gateway accepts.
pub fn is_deployment_pattern(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'*'))
}

fn limit(field: &'static str, text: &str) -> Result<Option<i64>, PortalError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<i64>() {
        Ok(value) if value >= 1 => Ok(Some(value)),
        _ => Err(PortalError::invalid(
            field,
            "a whole number of at least 1, or empty for no limit",
        )),
    }
}

/// Checks a form's rule and turns it into a row; the first problem found is returned, naming
/// its field.
fn validate(input: &AccessRuleInput) -> Result<AccessRuleRow, PortalError> {
    let id = input.id.trim().to_owned();
    valid_id("id", &id)?;
    let kind = input.grantee_kind.trim();
    let grantee_id = input.grantee_id.trim().to_owned();
    let display_name = input.grantee_display_name.trim().to_owned();
    match kind {
        "group" | "user" => {
            if !is_object_id(&grantee_id) {
                return Err(PortalError::invalid(
                    "grantee_id",
                    "an Entra object id: a GUID such as 5f1c0d3e-8a2b-4c6d-9e0f-123456789abc",
                ));
            }
        }
        "subscription" => valid_id("grantee_id", &grantee_id)?,
        "app_role" => {
            if grantee_id.is_empty()
                || grantee_id.len() > 120
                || grantee_id
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(PortalError::invalid(
                    "grantee_id",
                    "an app role value without spaces, at most 120 characters",
                ));
            }
        }
        _ => {
            return Err(PortalError::invalid(
                "grantee_kind",
                "choose a group, a subscription, a user or an app role",
            ));
        }
    }
    if kind == "group" && (display_name.is_empty() || display_name.chars().count() > MAX_NAME_CHARS)
    {
        return Err(PortalError::invalid(
            "grantee_display_name",
            "the group's display name, 1 to 200 characters",
        ));
    }
    if display_name.chars().count() > MAX_NAME_CHARS {
        return Err(PortalError::invalid(
            "grantee_display_name",
            "at most 200 characters",
        ));
    }
    crate::ops::plain_text("grantee_display_name", &display_name)?;
    let deployments = items(&input.deployments);
    if deployments.len() > MAX_ITEMS {
        return Err(PortalError::invalid("deployments", "at most 100 entries"));
    }
    if let Some(bad) = deployments.iter().find(|d| !is_deployment_pattern(d)) {
        return Err(PortalError::invalid(
            "deployments",
            format!("`{bad}` is not a deployment name or pattern (letters, digits, . _ - : and *)"),
        ));
    }
    if deployments.is_empty() && !input.resources {
        return Err(PortalError::invalid(
            "deployments",
            "name at least one deployment (or *), or grant calls without a deployment",
        ));
    }
    let operations = items(&input.operations);
    if operations.len() > MAX_ITEMS {
        return Err(PortalError::invalid("operations", "at most 100 entries"));
    }
    for operation in &operations {
        let known = OperationId::parse(&operation.to_ascii_lowercase()).is_some();
        let pattern = operation.contains('*')
            && operation
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'*'));
        if !known && !pattern {
            return Err(PortalError::invalid(
                "operations",
                format!(
                    "`{operation}` is not an operation id (such as chatcompletions_create or embeddings_create) or a * pattern"
                ),
            ));
        }
    }
    let operations: Vec<String> = operations.iter().map(|o| o.to_ascii_lowercase()).collect();
    let requests_per_minute = limit("requests_per_minute", &input.requests_per_minute)?;
    let tokens_per_minute = limit("tokens_per_minute", &input.tokens_per_minute)?;
    let quota_tokens = limit("quota_tokens", &input.quota_tokens)?;
    let quota_period = Some(input.quota_period.trim().to_owned()).filter(|p| !p.is_empty());
    if let Some(period) = &quota_period
        && snapshot::quota_period(period).is_err()
    {
        return Err(PortalError::invalid(
            "quota_period",
            "hourly, daily, weekly, monthly or yearly",
        ));
    }
    match (quota_tokens, &quota_period) {
        (Some(_), None) => {
            return Err(PortalError::invalid(
                "quota_period",
                "choose the period of the token quota",
            ));
        }
        (None, Some(_)) => {
            return Err(PortalError::invalid(
                "quota_tokens",
                "set the tokens of the quota, or no period",
            ));
        }
        _ => {}
    }
    let limited =
        requests_per_minute.is_some() || tokens_per_minute.is_some() || quota_tokens.is_some();
    if limited && kind == "app_role" {
        return Err(PortalError::invalid(
            "requests_per_minute",
            "limits apply to a group, a subscription or a user, not to an app role",
        ));
    }
    // A limit rule covers the deployments it names, and one that names none covers every call:
    // the limits of a rule for resource calls only would throttle all of the grantee's calls.
    if limited && deployments.is_empty() {
        let field = if requests_per_minute.is_some() {
            "requests_per_minute"
        } else if tokens_per_minute.is_some() {
            "tokens_per_minute"
        } else {
            "quota_tokens"
        };
        return Err(PortalError::invalid(
            field,
            "limits apply to the deployments a rule names; a rule for calls without a deployment only cannot carry limits — put them on a rule that names deployments, or use the gateway settings' limits",
        ));
    }
    let as_json = |list: &[String]| serde_json::to_string(list).unwrap_or_else(|_| "[]".to_owned());
    Ok(AccessRuleRow {
        id,
        grantee_kind: kind.to_owned(),
        grantee_id,
        grantee_display_name: display_name,
        deployments: as_json(&deployments),
        operations: as_json(&operations),
        resources: input.resources,
        requests_per_minute,
        tokens_per_minute,
        quota_tokens,
        quota_period,
        // Set as it is written.
        updated_at: OffsetDateTime::UNIX_EPOCH,
    })
}

impl Portal {
    /// Every access rule: Admin.
    pub async fn access_rules(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<AccessRuleRow>, PortalError> {
        require(user, &[Role::Admin])?;
        self.db.access_rules().await
    }

    /// Creates (`existing = false`) or changes (`existing = true`) an access rule after checking
    /// every field, then publishes: Admin. Returns the rule's new version, for the form to carry
    /// to its next save, and what was published (with the gateways that did not take it).
    ///
    /// A change is made from the version of the rule its form was opened on (`input.version`):
    /// it is written only while the rule still has that version, checked in the transaction that
    /// writes it, and otherwise refused ([`PortalError::Conflict`]) with nothing written, logged
    /// or published, so that two admins editing one rule cannot undo each other's change. A new
    /// rule is written only if no rule has its id.
    pub async fn save_access_rule(
        &self,
        user: Option<&SessionUser>,
        input: AccessRuleInput,
        existing: bool,
    ) -> Result<(OffsetDateTime, Published), PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = if existing {
            Some(required_version(&input.version)?)
        } else {
            None
        };
        let mut row = validate(&input)?;
        if row.grantee_kind == "subscription"
            && self.db.subscription(&row.grantee_id).await?.is_none()
        {
            return Err(PortalError::invalid(
                "grantee_id",
                "no subscription has this id; create the subscription first",
            ));
        }
        let exists = || PortalError::invalid("id", "a rule with this id exists");
        let before = self.db.access_rule(&row.id).await?;
        let actor = user.actor();
        let written = match read_at {
            None => {
                if before.is_some() {
                    return Err(exists());
                }
                row.updated_at = next_version(None);
                self.db
                    .insert_access_rule(
                        &row,
                        NewActivity {
                            actor: &actor,
                            action: "access_rule.create",
                            target: &row.id,
                            before: None,
                            after: json_of(&row),
                        },
                    )
                    .await?
            }
            Some(read_at) => {
                check_version(
                    Edited::AccessRule,
                    before.as_ref().map(|rule| rule.updated_at),
                    read_at,
                )?;
                row.updated_at = next_version(Some(read_at));
                self.db
                    .update_access_rule(
                        &row,
                        read_at,
                        NewActivity {
                            actor: &actor,
                            action: "access_rule.update",
                            target: &row.id,
                            before: before.as_ref().and_then(json_of),
                            after: json_of(&row),
                        },
                    )
                    .await?
            }
        };
        if !written {
            // Created, changed or deleted by someone else between the check and the write.
            return Err(match read_at {
                None => exists(),
                Some(_) => PortalError::Conflict {
                    what: Edited::AccessRule,
                    changed_at: self.db.access_rule(&row.id).await?.map(|r| r.updated_at),
                },
            });
        }
        let published = self.publisher.publish_change(&actor).await;
        Ok((row.updated_at, published))
    }

    /// Deletes an access rule, then publishes: Admin. Only the version the page showed (`version`,
    /// as [`crate::ops::version_text`] writes it) is deleted: one changed since is refused
    /// ([`PortalError::Conflict`]) and stays. Returns what was published.
    pub async fn delete_access_rule(
        &self,
        user: Option<&SessionUser>,
        id: &str,
        version: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = required_version(version)?;
        let not_found = || PortalError::NotFound(format!("access rule {id}"));
        let before = self.db.access_rule(id).await?.ok_or_else(not_found)?;
        check_version(Edited::AccessRule, Some(before.updated_at), read_at)?;
        let deleted = self
            .db
            .delete_access_rule(
                id,
                read_at,
                NewActivity {
                    actor: &user.actor(),
                    action: "access_rule.delete",
                    target: id,
                    before: json_of(&before),
                    after: None,
                },
            )
            .await?;
        if !deleted {
            return Err(match self.db.access_rule(id).await? {
                Some(now) => PortalError::Conflict {
                    what: Edited::AccessRule,
                    changed_at: Some(now.updated_at),
                },
                None => not_found(),
            });
        }
        Ok(self.publisher.publish_change(&user.actor()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> AccessRuleInput {
        AccessRuleInput {
            id: "research".into(),
            grantee_kind: "group".into(),
            grantee_id: "5f1c0d3e-8a2b-4c6d-9e0f-123456789abc".into(),
            grantee_display_name: "Research".into(),
            deployments: "gpt-4o, gpt-4o-mini\nembed*".into(),
            operations: "ChatCompletions_Create embeddings_*".into(),
            ..AccessRuleInput::default()
        }
    }

    fn field_of(input: AccessRuleInput) -> &'static str {
        match validate(&input) {
            Err(PortalError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_good_rule_becomes_a_row_with_json_lists() {
        let row = validate(&good()).unwrap();
        assert_eq!(row.deployments, r#"["gpt-4o","gpt-4o-mini","embed*"]"#);
        assert_eq!(
            row.operations,
            r#"["chatcompletions_create","embeddings_*"]"#
        );
        assert_eq!(row.quota_period, None);
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut input = good();
        input.id = "no spaces".into();
        assert_eq!(field_of(input), "id");
        let mut input = good();
        input.grantee_id = "research-group".into();
        assert_eq!(field_of(input), "grantee_id");
        let mut input = good();
        input.grantee_display_name = String::new();
        assert_eq!(field_of(input), "grantee_display_name");
        let mut input = good();
        input.grantee_kind = "everyone".into();
        assert_eq!(field_of(input), "grantee_kind");
        let mut input = good();
        input.deployments = "gpt 4o; drop".into();
        assert_eq!(field_of(input), "deployments");
        let mut input = good();
        input.deployments = String::new();
        assert_eq!(field_of(input), "deployments");
        let mut input = good();
        input.operations = "chat".into();
        assert_eq!(field_of(input), "operations");
        let mut input = good();
        input.tokens_per_minute = "0".into();
        assert_eq!(field_of(input), "tokens_per_minute");
        let mut input = good();
        input.quota_tokens = "1000".into();
        assert_eq!(field_of(input), "quota_period");
        let mut input = good();
        input.quota_period = "fortnightly".into();
        assert_eq!(field_of(input), "quota_period");
        let mut input = good();
        input.grantee_kind = "app_role".into();
        input.grantee_id = "Gatehouse.Caller".into();
        input.requests_per_minute = "10".into();
        assert_eq!(field_of(input), "requests_per_minute");
    }

    #[test]
    fn limits_become_a_limit_rule_on_the_grantee() {
        let mut input = good();
        input.tokens_per_minute = "1000".into();
        input.quota_tokens = "50000".into();
        input.quota_period = "monthly".into();
        let row = validate(&input).unwrap();
        let limit = snapshot::rule_limit(&row).unwrap().unwrap();
        assert_eq!(limit.id, "rule:research");
        assert_eq!(limit.tokens_per_minute, Some(1000));
        assert_eq!(limit.token_quota.map(|q| q.tokens), Some(50000));
        assert_eq!(limit.deployments, ["gpt-4o", "gpt-4o-mini", "embed*"]);
        assert!(
            snapshot::rule_limit(&validate(&good()).unwrap())
                .unwrap()
                .is_none()
        );
    }
}
