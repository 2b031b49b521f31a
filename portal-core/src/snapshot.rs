//! Building the gateway's [`ConfigSnapshot`] from the config database.
//!
//! Everything the portal manages (subscriptions, access rules, pools) comes from its tables; the
//! rest of the snapshot (trusted proxies, identity policy, capture, limits) from the
//! `snapshot.base` setting, a snapshot-shaped JSON object an operator sets once.

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::config::{
    BackendCredential, BackendPool, KeyHash, PoolMember, Subscription, SubscriptionState,
};
use gatehouse_schema::identity::{AccessRule, Grantee};
use serde_json::json;

use crate::db::{AccessRuleRow, ConfigDb, MemberRow, PoolRow, SubscriptionRow};
use crate::error::PortalError;

/// The setting holding the base of every snapshot.
pub const BASE_SETTING: &str = "snapshot.base";

/// Builds the snapshot the database describes, numbered `version`.
pub async fn build(db: &ConfigDb, version: u64) -> Result<ConfigSnapshot, PortalError> {
    let mut snapshot: ConfigSnapshot = match db.setting(BASE_SETTING).await? {
        Some(text) => serde_json::from_str(&text)
            .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?,
        None => serde_json::from_value(json!({"version": 0}))
            .map_err(|error| PortalError::Corrupt(format!("default snapshot: {error}")))?,
    };
    snapshot.version = version;
    snapshot.subscriptions = db
        .subscriptions()
        .await?
        .iter()
        .map(subscription)
        .collect::<Result<_, _>>()?;
    // Deny by default: the portal always sends its rules, even none.
    snapshot.access_rules = Some(
        db.access_rules()
            .await?
            .iter()
            .map(access_rule)
            .collect::<Result<_, _>>()?,
    );
    let members = db.members().await?;
    snapshot.pools = db
        .pools()
        .await?
        .iter()
        .map(|pool| backend_pool(pool, &members))
        .collect::<Result<_, _>>()?;
    Ok(snapshot)
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> PortalError {
    PortalError::Corrupt(format!("{what}: {error}"))
}

fn key_hash(text: &str) -> Result<KeyHash, PortalError> {
    KeyHash::try_from(text.to_owned()).map_err(|error| corrupt("key hash", error))
}

/// The snapshot form of a subscription row.
pub fn subscription(row: &SubscriptionRow) -> Result<Subscription, PortalError> {
    Ok(Subscription {
        id: row.id.clone(),
        display_name: row.display_name.clone(),
        product: row.product.clone(),
        primary_key_hash: key_hash(&row.primary_key_hash)?,
        secondary_key_hash: row
            .secondary_key_hash
            .as_deref()
            .map(key_hash)
            .transpose()?,
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
