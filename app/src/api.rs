//! Server functions: what the pages ask the server for. Each one checks the caller's role on the
//! server (inside `gatehouse-portal-core`'s operations); the types here are what the browser sees
//! and hold no secret except the one-time key of [`IssuedKey`].

#![expect(
    missing_docs,
    reason = "#[server] turns each documented function's parameters into the fields of an argument struct"
)]

use gatehouse_schema::portal::Role;
use leptos::prelude::*;
use serde::{Deserialize, Serialize};

#[cfg(feature = "ssr")]
use crate::ssr::{portal_and_user, to_server_error};

/// Who is signed in, as pages show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    /// Display name.
    pub name: String,
    /// Portal roles.
    pub roles: Vec<Role>,
}

/// What every page needs to know about the portal and the user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The signed-in user, if any.
    pub user: Option<UserView>,
    /// Whether the development sign-in is enabled (every page says so).
    pub dev_sign_in: bool,
}

/// The overview's counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverviewView {
    /// Subscriptions.
    pub subscriptions: usize,
    /// Access rules.
    pub access_rules: usize,
    /// Backend pools.
    pub pools: usize,
    /// Registered gateways.
    pub gateways: usize,
    /// Gateways behind the current version.
    pub lagging_gateways: usize,
    /// The newest published version.
    pub current_version: Option<i64>,
}

/// A subscription as listed (no key, no hash).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionView {
    /// Stable id.
    pub id: String,
    /// Name.
    pub display_name: String,
    /// Team or group.
    pub product: Option<String>,
    /// `active`, `suspended`, `revoked`.
    pub state: String,
    /// Whether a previous key is still valid (a rotation's overlap).
    pub has_secondary: bool,
    /// Expiry date, `YYYY-MM-DD`.
    pub expires_on: Option<String>,
    /// Expires within 14 days.
    pub expires_soon: bool,
    /// Who created it.
    pub created_by: String,
}

/// A key just issued: shown once.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedKey {
    /// The subscription.
    pub subscription: String,
    /// The key.
    pub key: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

/// A registered gateway and how far behind it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayView {
    /// Stable id.
    pub id: String,
    /// Base URL.
    pub url: String,
    /// The version it runs, as far as the portal knows.
    pub pushed_version: Option<i64>,
    /// Versions behind the current one.
    pub lag: i64,
    /// When the portal last pushed to it.
    pub last_attempt_at: Option<String>,
    /// Why the last push failed.
    pub last_error: Option<String>,
}

/// The gateways page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewaysView {
    /// The newest published version.
    pub current_version: Option<i64>,
    /// Every gateway.
    pub gateways: Vec<GatewayView>,
}

/// One activity entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityView {
    /// When (RFC 3339).
    pub at: String,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// Which object.
    pub target: String,
    /// JSON before.
    pub before: Option<String>,
    /// JSON after.
    pub after: Option<String>,
}

#[cfg(feature = "ssr")]
fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The signed-in user and whether the dev sign-in is on: anyone may ask.
#[server(endpoint = "portal_info")]
pub async fn portal_info() -> Result<SessionInfo, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    Ok(SessionInfo {
        user: user.map(|user| UserView {
            name: user.name,
            roles: user.roles,
        }),
        dev_sign_in: portal.settings.dev_sign_in,
    })
}

/// The overview's counts: any role.
#[server(endpoint = "overview")]
pub async fn overview() -> Result<OverviewView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let o = portal
        .overview(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(OverviewView {
        subscriptions: o.subscriptions,
        access_rules: o.access_rules,
        pools: o.pools,
        gateways: o.gateways,
        lagging_gateways: o.lagging_gateways,
        current_version: o.current_version,
    })
}

/// Every subscription: Admin.
#[server(endpoint = "list_subscriptions")]
pub async fn list_subscriptions() -> Result<Vec<SubscriptionView>, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let rows = portal
        .subscriptions(user.as_ref())
        .await
        .map_err(to_server_error)?;
    let now = time::OffsetDateTime::now_utc();
    let day = time::macros::format_description!("[year]-[month]-[day]");
    Ok(rows
        .into_iter()
        .map(|row| SubscriptionView {
            expires_on: row.expires_at.and_then(|at| at.format(day).ok()),
            expires_soon: row
                .expires_at
                .is_some_and(|at| at - now < time::Duration::days(14)),
            has_secondary: row.secondary_key_hash.is_some(),
            id: row.id,
            display_name: row.display_name,
            product: row.product,
            state: row.state,
            created_by: row.created_by,
        })
        .collect())
}

/// Creates a subscription; the key is returned once: Admin.
#[server(endpoint = "create_subscription")]
pub async fn create_subscription(
    id: String,
    display_name: String,
    product: String,
    expires_on: String,
) -> Result<IssuedKey, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let issued = portal
        .create_subscription(
            user.as_ref(),
            gatehouse_portal_core::ops::NewSubscription {
                id,
                display_name,
                product,
                expires_on,
            },
        )
        .await
        .map_err(to_server_error)?;
    Ok(IssuedKey {
        subscription: issued.subscription,
        key: issued.key,
    })
}

/// Issues a new primary key; the old one stays valid as the secondary: Admin.
#[server(endpoint = "rotate_subscription_key")]
pub async fn rotate_subscription_key(id: String) -> Result<IssuedKey, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let issued = portal
        .rotate_subscription_key(user.as_ref(), &id)
        .await
        .map_err(to_server_error)?;
    Ok(IssuedKey {
        subscription: issued.subscription,
        key: issued.key,
    })
}

/// Ends a rotation's overlap: the previous key stops working: Admin.
#[server(endpoint = "retire_secondary_key")]
pub async fn retire_secondary_key(id: String) -> Result<(), ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .retire_secondary_key(user.as_ref(), &id)
        .await
        .map_err(to_server_error)
}

/// Revokes a subscription: Admin.
#[server(endpoint = "revoke_subscription")]
pub async fn revoke_subscription(id: String) -> Result<(), ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .revoke_subscription(user.as_ref(), &id)
        .await
        .map_err(to_server_error)
}

/// The gateways and their versions: Admin.
#[server(endpoint = "list_gateways")]
pub async fn list_gateways() -> Result<GatewaysView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let (current_version, rows) = portal
        .gateways(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(GatewaysView {
        current_version,
        gateways: rows
            .into_iter()
            .map(|row| GatewayView {
                lag: current_version.unwrap_or(0) - row.pushed_version.unwrap_or(0),
                id: row.id,
                url: row.url,
                pushed_version: row.pushed_version,
                last_attempt_at: row.last_attempt_at.map(rfc3339),
                last_error: row.last_error,
            })
            .collect(),
    })
}

/// Registers a gateway by URL and admin-token secret reference: Admin.
#[server(endpoint = "register_gateway")]
pub async fn register_gateway(
    id: String,
    url: String,
    admin_token_ref: String,
) -> Result<(), ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .register_gateway(user.as_ref(), &id, &url, &admin_token_ref)
        .await
        .map_err(to_server_error)?;
    Ok(())
}

/// Pushes the current version to every lagging gateway now: Admin.
#[server(endpoint = "push_now")]
pub async fn push_now() -> Result<(), ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .push_now(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(())
}

/// The newest changes: Admin and Auditor.
#[server(endpoint = "list_activity")]
pub async fn list_activity() -> Result<Vec<ActivityView>, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let rows = portal
        .activity(user.as_ref(), 200)
        .await
        .map_err(to_server_error)?;
    Ok(rows
        .into_iter()
        .map(|row| ActivityView {
            at: rfc3339(row.at),
            actor: row.actor,
            action: row.action,
            target: row.target,
            before: row.before,
            after: row.after,
        })
        .collect())
}
