//! Building the gateway's [`ConfigSnapshot`] from the config database.
//!
//! Everything the portal manages (subscriptions, access rules and their limits, pools) comes from
//! its tables; the rest of the snapshot (trusted proxies, identity policy, capture, limits of its
//! own) from the `snapshot.base` setting, a snapshot-shaped JSON object an operator sets once.
//!
//! An access rule's limits travel as a [`LimitRule`] with the id `rule:{rule id}` on the rule's
//! grantee and deployments. A pool without members is not sent (a gateway refuses one). A
//! secondary key whose rotation overlap has ended is not sent either.

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::config::{
    BackendCredential, BackendPool, KeyHash, PoolMember, Subscription, SubscriptionState,
};
use gatehouse_schema::identity::{AccessRule, Grantee};
use gatehouse_schema::limits::{LimitRule, LimitSubjectRule, QuotaPeriod, TokenQuota};
use serde_json::json;
use time::OffsetDateTime;

use crate::db::{AccessRuleRow, ConfigDb, ConfigTables, MemberRow, PoolRow, SubscriptionRow};
use crate::error::PortalError;

/// The setting holding the base of every snapshot.
pub const BASE_SETTING: &str = "snapshot.base";

/// The prefix of the ids of limit rules that come from access rules.
pub const RULE_LIMIT_PREFIX: &str = "rule:";

/// Builds the snapshot the database describes, numbered `version`.
pub async fn build(db: &ConfigDb, version: u64) -> Result<ConfigSnapshot, PortalError> {
    assemble(&db.config_tables().await?, version)
}

/// What a gateway would refuse the snapshot `tables` describe for (the checks of
/// [`gatehouse_schema::validate`]); empty when it would run it.
pub fn problems(tables: &ConfigTables) -> Result<Vec<String>, PortalError> {
    Ok(gatehouse_schema::validate::problems(&assemble(tables, 1)?))
}

/// [`PortalError::Invalid`] (field `configuration`) naming every [`problems`] of the snapshot
/// `tables` describe.
pub fn check(tables: &ConfigTables) -> Result<(), PortalError> {
    refuse(
        "a gateway would refuse the configuration this change makes",
        &problems(tables)?,
    )
}

/// [`PortalError::Invalid`] (field `configuration`) saying `what`, then every one of
/// `problems`; `Ok` when there are none.
pub fn refuse(what: &str, problems: &[String]) -> Result<(), PortalError> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(PortalError::invalid(
        "configuration",
        format!("{what}: {}", problems.join("; ")),
    ))
}

/// The snapshot `tables` describe (the portal's tables on the gateway settings), numbered
/// `version`.
pub fn assemble(tables: &ConfigTables, version: u64) -> Result<ConfigSnapshot, PortalError> {
    let mut base = match &tables.base {
        Some(text) => serde_json::from_str(text)
            .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?,
        None => json!({}),
    };
    // The base's own `version`, if it has one (a base written by hand), is replaced.
    if let Some(base) = base.as_object_mut() {
        base.insert("version".to_owned(), json!(version));
    }
    let mut snapshot: ConfigSnapshot = serde_json::from_value(base)
        .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?;
    let now = OffsetDateTime::now_utc();
    snapshot.subscriptions = tables
        .subscriptions
        .iter()
        .map(|row| subscription_at(row, now))
        .collect::<Result<_, _>>()?;
    let rules = &tables.access_rules;
    // Deny by default: the portal always sends its rules, even none.
    snapshot.access_rules = Some(rules.iter().map(access_rule).collect::<Result<_, _>>()?);
    for rule in rules {
        if let Some(limit) = rule_limit(rule)? {
            snapshot.limits.push(limit);
        }
    }
    let members = &tables.members;
    snapshot.pools = tables
        .pools
        .iter()
        .filter(|pool| members.iter().any(|member| member.pool_id == pool.id))
        .map(|pool| backend_pool(pool, members))
        .collect::<Result<_, _>>()?;
    Ok(snapshot)
}

/// The limit rule an access rule's limits become, if it has any.
pub fn rule_limit(row: &AccessRuleRow) -> Result<Option<LimitRule>, PortalError> {
    let positive = |what: &str, value: Option<i64>| -> Result<Option<u64>, PortalError> {
        value
            .map(|v| u64::try_from(v).map_err(|error| corrupt(what, error)))
            .transpose()
    };
    let requests_per_minute = positive("rule requests per minute", row.requests_per_minute)?;
    let tokens_per_minute = positive("rule tokens per minute", row.tokens_per_minute)?;
    let token_quota = match (positive("rule quota", row.quota_tokens)?, &row.quota_period) {
        (Some(tokens), Some(period)) => Some(TokenQuota {
            tokens,
            period: quota_period(period)?,
        }),
        _ => None,
    };
    if requests_per_minute.is_none() && tokens_per_minute.is_none() && token_quota.is_none() {
        return Ok(None);
    }
    let subject = match row.grantee_kind.as_str() {
        "group" => LimitSubjectRule::Group {
            id: row.grantee_id.clone(),
        },
        "subscription" => LimitSubjectRule::Subscription {
            id: row.grantee_id.clone(),
        },
        "user" => LimitSubjectRule::User {
            id: row.grantee_id.clone(),
        },
        other => return Err(corrupt("limited grantee kind", other)),
    };
    Ok(Some(LimitRule {
        id: format!("{RULE_LIMIT_PREFIX}{}", row.id),
        subject,
        deployments: string_list("rule deployments", &row.deployments)?,
        each_deployment: false,
        requests_per_minute,
        tokens_per_minute,
        token_quota,
    }))
}

/// A quota period named in a row or a form.
pub fn quota_period(text: &str) -> Result<QuotaPeriod, PortalError> {
    serde_json::from_value(json!(text)).map_err(|error| corrupt("quota period", error))
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> PortalError {
    PortalError::Corrupt(format!("{what}: {error}"))
}

fn key_hash(text: &str) -> Result<KeyHash, PortalError> {
    KeyHash::try_from(text.to_owned()).map_err(|error| corrupt("key hash", error))
}

/// The snapshot form of a subscription row.
pub fn subscription(row: &SubscriptionRow) -> Result<Subscription, PortalError> {
    subscription_at(row, OffsetDateTime::now_utc())
}

/// The snapshot form of a subscription row at `now`: a secondary key whose overlap has ended
/// is left out; one still in its overlap carries the overlap's end, so that gateways refuse it
/// from then on even if no newer snapshot reaches them.
pub fn subscription_at(
    row: &SubscriptionRow,
    now: OffsetDateTime,
) -> Result<Subscription, PortalError> {
    let overlap_over = row.secondary_expires_at.is_some_and(|end| end <= now);
    let secondary_key_hash = row
        .secondary_key_hash
        .as_deref()
        .filter(|_| !overlap_over)
        .map(key_hash)
        .transpose()?;
    Ok(Subscription {
        id: row.id.clone(),
        display_name: row.display_name.clone(),
        product: row.product.clone(),
        primary_key_hash: key_hash(&row.primary_key_hash)?,
        secondary_expires_at: row
            .secondary_expires_at
            .filter(|_| secondary_key_hash.is_some()),
        secondary_key_hash,
        state: state(&row.state)?,
        expires_at: row.expires_at,
    })
}

/// The subscription state named in a row.
pub fn state(text: &str) -> Result<SubscriptionState, PortalError> {
    serde_json::from_value(json!(text)).map_err(|error| corrupt("subscription state", error))
}

fn string_list(what: &str, text: &str) -> Result<Vec<String>, PortalError> {
    serde_json::from_str(text).map_err(|error| corrupt(what, error))
}

/// The snapshot form of an access-rule row.
pub fn access_rule(row: &AccessRuleRow) -> Result<AccessRule, PortalError> {
    let grantee = match row.grantee_kind.as_str() {
        "group" => Grantee::Group {
            id: row.grantee_id.clone(),
            display_name: row.grantee_display_name.clone(),
        },
        "subscription" => Grantee::Subscription {
            id: row.grantee_id.clone(),
        },
        "user" => Grantee::User {
            id: row.grantee_id.clone(),
        },
        "app_role" => Grantee::AppRole {
            value: row.grantee_id.clone(),
        },
        other => return Err(corrupt("grantee kind", other)),
    };
    Ok(AccessRule {
        id: row.id.clone(),
        grantee,
        deployments: string_list("rule deployments", &row.deployments)?,
        operations: string_list("rule operations", &row.operations)?,
        resources: row.resources,
    })
}

fn backend_pool(row: &PoolRow, members: &[MemberRow]) -> Result<BackendPool, PortalError> {
    Ok(BackendPool {
        id: row.id.clone(),
        deployments: string_list("pool deployments", &row.deployments)?,
        serves_resources: row.serves_resources,
        members: members
            .iter()
            .filter(|member| member.pool_id == row.id)
            .map(pool_member)
            .collect::<Result<_, _>>()?,
    })
}

fn pool_member(row: &MemberRow) -> Result<PoolMember, PortalError> {
    let credential: BackendCredential = serde_json::from_str(&row.credential)
        .map_err(|error| corrupt("member credential", error))?;
    // Build through serde so the member's defaults (TLS, timeouts) stay the schema's.
    serde_json::from_value(json!({
        "id": row.id,
        "kind": row.kind,
        "endpoint": row.endpoint,
        "deployment": row.deployment,
        "api_version": row.api_version,
        "priority": row.priority,
        "weight": row.weight,
        "credential": credential,
    }))
    .map_err(|error| corrupt("pool member", error))
}
