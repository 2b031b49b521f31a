//! Server functions: what the pages ask the server for. Each one checks the caller's role on the
//! server (inside `gatehouse-portal-core`'s operations); the types here are what the browser sees
//! and hold no secret except the one-time key of [`IssuedKey`].

#![expect(
    missing_docs,
    reason = "#[server] turns each documented function's parameters into the fields of an argument struct"
)]
#![expect(
    clippy::too_many_arguments,
    reason = "a server function that a form posts to takes one argument per form field"
)]

use gatehouse_schema::portal::Role;
use leptos::prelude::*;
use serde::{Deserialize, Serialize};

#[cfg(feature = "ssr")]
use crate::ssr::{portal_and_user, to_server_error};
#[cfg(feature = "ssr")]
use gatehouse_portal_core::ops::version_text;

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
    /// Its version as the page shows it (rotations and their end are made from this one).
    pub version: String,
}

/// A gateway that did not take the version a change published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotTakenView {
    /// The gateway's id.
    pub gateway: String,
    /// Why, as the gateway answered (untrusted text, shortened) or why it was not reached.
    pub reason: String,
    /// Whether it was not reached (it is offered the version again), rather than refusing it.
    pub unreachable: bool,
    /// The version it keeps running, as far as the portal knows.
    pub running: Option<u64>,
}

/// What a change published: its version and the gateways that did not take it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishedView {
    /// The version published.
    pub version: u64,
    /// The gateways that did not take it.
    pub not_taken: Vec<NotTakenView>,
    /// Why the change, saved, was not published (it is published by the next push).
    pub not_published: Option<String>,
}

/// What an edit form's save returns: the item's new version (for the form's next save) and
/// what was published.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedView {
    /// The item's new version.
    pub version: String,
    /// What the save published.
    pub published: PublishedView,
}

// A result that says what was published (read by the pages' notes).
impl AsRef<PublishedView> for PublishedView {
    fn as_ref(&self) -> &PublishedView {
        self
    }
}

impl AsRef<PublishedView> for SavedView {
    fn as_ref(&self) -> &PublishedView {
        &self.published
    }
}

impl AsRef<PublishedView> for IssuedKey {
    fn as_ref(&self) -> &PublishedView {
        &self.published
    }
}

/// Longest gateway answer the page shows (the portal keeps 300 characters of it already).
#[cfg(feature = "ssr")]
const MAX_REASON_CHARS: usize = 400;

#[cfg(feature = "ssr")]
impl From<gatehouse_portal_core::push::Published> for PublishedView {
    fn from(published: gatehouse_portal_core::push::Published) -> PublishedView {
        PublishedView {
            version: published.version,
            not_taken: published
                .not_taken
                .into_iter()
                .map(|not_taken| NotTakenView {
                    unreachable: not_taken.unreachable(),
                    reason: not_taken.reason.chars().take(MAX_REASON_CHARS).collect(),
                    gateway: not_taken.gateway,
                    running: not_taken.running,
                })
                .collect(),
            not_published: published.not_published,
        }
    }
}

#[cfg(feature = "ssr")]
fn saved_view(
    (version, published): (time::OffsetDateTime, gatehouse_portal_core::push::Published),
) -> SavedView {
    SavedView {
        version: version_text(version),
        published: published.into(),
    }
}

/// A key just issued: shown once.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedKey {
    /// The subscription.
    pub subscription: String,
    /// The key.
    pub key: String,
    /// What issuing it published.
    pub published: PublishedView,
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
    /// The prefixes a registered gateway's admin-token reference must start with.
    pub token_prefixes: Vec<String>,
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

/// The gateway settings as their form shows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewaySettingsView {
    /// The settings as JSON, pretty-printed (`{}` when none are set).
    pub text: String,
    /// Their version, which the form carries back (empty while none are set).
    pub version: String,
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
            version: version_text(row.updated_at),
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
        published: issued.published.into(),
    })
}

/// Issues a new primary key; the old one stays valid as the secondary: Admin.
#[server(endpoint = "rotate_subscription_key")]
pub async fn rotate_subscription_key(
    id: String,
    #[server(default)] version: String,
) -> Result<IssuedKey, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let issued = portal
        .rotate_subscription_key(user.as_ref(), &id, &version)
        .await
        .map_err(to_server_error)?;
    Ok(IssuedKey {
        subscription: issued.subscription,
        key: issued.key,
        published: issued.published.into(),
    })
}

/// Ends a rotation's overlap: the previous key stops working: Admin.
#[server(endpoint = "retire_secondary_key")]
pub async fn retire_secondary_key(
    id: String,
    #[server(default)] version: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .retire_secondary_key(user.as_ref(), &id, &version)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
}

/// Revokes a subscription: Admin.
#[server(endpoint = "revoke_subscription")]
pub async fn revoke_subscription(id: String) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .revoke_subscription(user.as_ref(), &id)
        .await
        .map(PublishedView::from)
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
        token_prefixes: portal
            .publisher
            .admin_token_refs()
            .prefixes()
            .into_iter()
            .map(str::to_owned)
            .collect(),
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

/// The gateway settings no other page manages (trusted proxies, identity, capture, limits of
/// their own), as pretty JSON, with their version: Admin.
#[server(endpoint = "gateway_settings")]
pub async fn gateway_settings() -> Result<GatewaySettingsView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let settings = portal
        .gateway_settings(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(GatewaySettingsView {
        text: settings.text,
        version: settings.version.map(version_text).unwrap_or_default(),
    })
}

/// Checks and stores the gateway settings and publishes a version built on them: Admin.
/// `version` is theirs as the form read it (empty: none were set); settings saved by someone
/// else since are not overwritten. Returns what was published.
#[server(endpoint = "save_gateway_settings")]
pub async fn save_gateway_settings(
    settings: String,
    #[server(default)] version: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .save_gateway_settings(user.as_ref(), &settings, &version)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
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

/// An access rule as the page shows and edits it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessRuleView {
    /// Stable id.
    pub id: String,
    /// `group`, `subscription`, `user` or `app_role`.
    pub grantee_kind: String,
    /// Object id, subscription id or app-role value.
    pub grantee_id: String,
    /// A group's display name.
    pub grantee_display_name: String,
    /// Deployment names or patterns.
    pub deployments: Vec<String>,
    /// Operation ids or patterns (empty: every operation).
    pub operations: Vec<String>,
    /// Whether calls naming no deployment are granted.
    pub resources: bool,
    /// Calls per minute.
    pub requests_per_minute: Option<i64>,
    /// Tokens per minute.
    pub tokens_per_minute: Option<i64>,
    /// Tokens per quota period.
    pub quota_tokens: Option<i64>,
    /// The quota period.
    pub quota_period: Option<String>,
    /// Its version (when it last changed), which its edit and delete forms carry back.
    pub version: String,
}

/// The state of one member as one gateway sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberHealthView {
    /// The gateway's id.
    pub gateway: String,
    /// `available`, `throttled`, `failing`, or `not running` when the gateway's version does not
    /// have the member yet.
    pub state: String,
    /// Until when it is set aside (RFC 3339).
    pub until: Option<String>,
}

/// A pool member as the page shows it: the credential as a description of its reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    /// Stable id.
    pub id: String,
    /// `azure_openai` or `openai`.
    pub kind: String,
    /// Base URL.
    pub endpoint: String,
    /// Deployment name on the member.
    pub deployment: Option<String>,
    /// `api-version`.
    pub api_version: Option<String>,
    /// Priority.
    pub priority: i64,
    /// Weight.
    pub weight: i64,
    /// The API key's secret reference, if the member uses one.
    pub api_key_ref: Option<String>,
    /// Another kind of credential (Entra, managed identity), described.
    pub other_credential: Option<String>,
    /// The member's state at each gateway that answered.
    pub health: Vec<MemberHealthView>,
    /// Its version (when it last changed), which its edit and remove forms carry back.
    pub version: String,
}

/// A pool and its members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    /// Stable id.
    pub id: String,
    /// Deployments it serves.
    pub deployments: Vec<String>,
    /// Whether it serves calls that name no deployment.
    pub serves_resources: bool,
    /// Members by priority.
    pub members: Vec<MemberView>,
    /// Its version (when its deployments last changed), which its edit and delete forms carry
    /// back.
    pub version: String,
}

/// The pools page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolsView {
    /// Every pool.
    pub pools: Vec<PoolView>,
    /// Gateways that could not say how their members are, and why.
    pub unreachable: Vec<(String, String)>,
}

/// A stored config version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionView {
    /// The version.
    pub version: i64,
    /// When (RFC 3339).
    pub created_at: String,
    /// Who caused it.
    pub created_by: String,
}

/// One line of a diff: `+`, `-`, ` ` (context) or `…` (lines left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffLineView {
    /// The kind of line.
    pub tag: char,
    /// The text.
    pub text: String,
}

#[cfg(feature = "ssr")]
fn list_of(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_default()
}

/// Every access rule: Admin.
#[server(endpoint = "list_access_rules")]
pub async fn list_access_rules() -> Result<Vec<AccessRuleView>, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let rows = portal
        .access_rules(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(rows
        .into_iter()
        .map(|row| AccessRuleView {
            deployments: list_of(&row.deployments),
            operations: list_of(&row.operations),
            id: row.id,
            grantee_kind: row.grantee_kind,
            grantee_id: row.grantee_id,
            grantee_display_name: row.grantee_display_name,
            resources: row.resources,
            requests_per_minute: row.requests_per_minute,
            tokens_per_minute: row.tokens_per_minute,
            quota_tokens: row.quota_tokens,
            quota_period: row.quota_period,
            version: version_text(row.updated_at),
        })
        .collect())
}

#[cfg(feature = "ssr")]
fn rule_input(
    id: String,
    grantee_kind: String,
    grantee_id: String,
    grantee_display_name: String,
    deployments: String,
    operations: String,
    resources: Option<String>,
    requests_per_minute: String,
    tokens_per_minute: String,
    quota_tokens: String,
    quota_period: String,
    version: String,
) -> gatehouse_portal_core::rules::AccessRuleInput {
    gatehouse_portal_core::rules::AccessRuleInput {
        id,
        grantee_kind,
        grantee_id,
        grantee_display_name,
        deployments,
        operations,
        resources: resources.is_some_and(|v| !v.is_empty() && v != "false"),
        requests_per_minute,
        tokens_per_minute,
        quota_tokens,
        quota_period,
        version,
    }
}

/// Creates an access rule: Admin.
#[server(endpoint = "create_access_rule")]
pub async fn create_access_rule(
    id: String,
    grantee_kind: String,
    grantee_id: String,
    #[server(default)] grantee_display_name: String,
    #[server(default)] deployments: String,
    #[server(default)] operations: String,
    #[server(default)] resources: Option<String>,
    #[server(default)] requests_per_minute: String,
    #[server(default)] tokens_per_minute: String,
    #[server(default)] quota_tokens: String,
    #[server(default)] quota_period: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let input = rule_input(
        id,
        grantee_kind,
        grantee_id,
        grantee_display_name,
        deployments,
        operations,
        resources,
        requests_per_minute,
        tokens_per_minute,
        quota_tokens,
        quota_period,
        String::new(),
    );
    portal
        .save_access_rule(user.as_ref(), input, false)
        .await
        .map(|(_, published)| published.into())
        .map_err(to_server_error)
}

/// Changes an access rule (found by its id) from the version its form read (`version`): Admin.
/// A rule changed by someone else since is not overwritten. Returns the rule's new version and
/// what was published.
#[server(endpoint = "update_access_rule")]
pub async fn update_access_rule(
    id: String,
    grantee_kind: String,
    grantee_id: String,
    #[server(default)] grantee_display_name: String,
    #[server(default)] deployments: String,
    #[server(default)] operations: String,
    #[server(default)] resources: Option<String>,
    #[server(default)] requests_per_minute: String,
    #[server(default)] tokens_per_minute: String,
    #[server(default)] quota_tokens: String,
    #[server(default)] quota_period: String,
    #[server(default)] version: String,
) -> Result<SavedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let input = rule_input(
        id,
        grantee_kind,
        grantee_id,
        grantee_display_name,
        deployments,
        operations,
        resources,
        requests_per_minute,
        tokens_per_minute,
        quota_tokens,
        quota_period,
        version,
    );
    portal
        .save_access_rule(user.as_ref(), input, true)
        .await
        .map(saved_view)
        .map_err(to_server_error)
}

/// Deletes an access rule as the page showed it (`version`): Admin.
#[server(endpoint = "delete_access_rule")]
pub async fn delete_access_rule(
    id: String,
    #[server(default)] version: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .delete_access_rule(user.as_ref(), &id, &version)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
}

/// Every pool with its members and their health at each gateway: Admin.
#[server(endpoint = "list_pools")]
pub async fn list_pools() -> Result<PoolsView, ServerFnError> {
    use gatehouse_schema::config::BackendCredential;
    let (portal, user) = portal_and_user().await?;
    let pools = portal.pools(user.as_ref()).await.map_err(to_server_error)?;
    let reports = portal
        .backend_health(user.as_ref())
        .await
        .map_err(to_server_error)?;
    let mut unreachable = Vec::new();
    let mut seen = Vec::new();
    for report in reports {
        match report.result {
            Ok(states) => seen.push((report.gateway, states)),
            Err(reason) => unreachable.push((report.gateway, reason)),
        }
    }
    let health_of = |pool: &str, member: &str| -> Vec<MemberHealthView> {
        seen.iter()
            .map(|(gateway, states)| {
                match states
                    .members
                    .iter()
                    .find(|m| m.pool == pool && m.member == member)
                {
                    Some(state) => MemberHealthView {
                        gateway: gateway.clone(),
                        state: state.state.as_str().to_owned(),
                        until: state.set_aside_until.map(rfc3339),
                    },
                    None => MemberHealthView {
                        gateway: gateway.clone(),
                        state: "not running".to_owned(),
                        until: None,
                    },
                }
            })
            .collect()
    };
    let pools = pools
        .into_iter()
        .map(|entry| PoolView {
            members: entry
                .members
                .into_iter()
                .map(|member| {
                    let credential: BackendCredential =
                        serde_json::from_str(&member.credential).unwrap_or_default();
                    let (api_key_ref, other_credential) = match credential {
                        BackendCredential::None => (None, None),
                        BackendCredential::ApiKey { secret } => {
                            (Some(secret.as_str().to_owned()), None)
                        }
                        BackendCredential::EntraClientSecret { .. } => {
                            (None, Some("Entra ID client secret".to_owned()))
                        }
                        BackendCredential::EntraCertificate { .. } => {
                            (None, Some("Entra ID certificate".to_owned()))
                        }
                        BackendCredential::ManagedIdentity { .. } => {
                            (None, Some("managed identity".to_owned()))
                        }
                    };
                    MemberView {
                        health: health_of(&entry.pool.id, &member.id),
                        id: member.id,
                        kind: member.kind,
                        endpoint: member.endpoint,
                        deployment: member.deployment,
                        api_version: member.api_version,
                        priority: member.priority,
                        weight: member.weight,
                        api_key_ref,
                        other_credential,
                        version: version_text(member.updated_at),
                    }
                })
                .collect(),
            deployments: list_of(&entry.pool.deployments),
            version: version_text(entry.pool.updated_at),
            id: entry.pool.id,
            serves_resources: entry.pool.serves_resources,
        })
        .collect();
    Ok(PoolsView { pools, unreachable })
}

/// Creates a pool: Admin.
#[server(endpoint = "create_pool")]
pub async fn create_pool(
    id: String,
    #[server(default)] deployments: String,
    #[server(default)] serves_resources: Option<String>,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let input = gatehouse_portal_core::pools::PoolInput {
        id,
        deployments,
        serves_resources: serves_resources.is_some_and(|v| !v.is_empty() && v != "false"),
        version: String::new(),
    };
    portal
        .save_pool(user.as_ref(), input, false)
        .await
        .map(|(_, published)| published.into())
        .map_err(to_server_error)
}

/// Changes a pool's deployments from the version its form read (`version`): Admin. A pool
/// changed by someone else since is not overwritten. Returns the pool's new version and what was
/// published.
#[server(endpoint = "update_pool")]
pub async fn update_pool(
    id: String,
    #[server(default)] deployments: String,
    #[server(default)] serves_resources: Option<String>,
    #[server(default)] version: String,
) -> Result<SavedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let input = gatehouse_portal_core::pools::PoolInput {
        id,
        deployments,
        serves_resources: serves_resources.is_some_and(|v| !v.is_empty() && v != "false"),
        version,
    };
    portal
        .save_pool(user.as_ref(), input, true)
        .await
        .map(saved_view)
        .map_err(to_server_error)
}

/// Deletes a pool and its members, the pool as the page showed it (`version`): Admin.
#[server(endpoint = "delete_pool")]
pub async fn delete_pool(
    id: String,
    #[server(default)] version: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .delete_pool(user.as_ref(), &id, &version)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
}

/// Adds a pool member (no `version`) or changes one from the version its form read: Admin. A
/// member changed by someone else since is not overwritten. Returns the member's new version and
/// what was published.
#[server(endpoint = "save_member")]
pub async fn save_member(
    pool_id: String,
    id: String,
    kind: String,
    endpoint: String,
    #[server(default)] deployment: String,
    #[server(default)] api_version: String,
    #[server(default)] priority: String,
    #[server(default)] weight: String,
    #[server(default)] api_key_ref: String,
    #[server(default)] version: String,
) -> Result<SavedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let input = gatehouse_portal_core::pools::MemberInput {
        pool_id,
        id,
        kind,
        endpoint,
        deployment,
        api_version,
        priority,
        weight,
        api_key_ref,
        version,
    };
    portal
        .save_member(user.as_ref(), input)
        .await
        .map(saved_view)
        .map_err(to_server_error)
}

/// Removes a member from a pool, as the page showed it (`version`): Admin.
#[server(endpoint = "delete_member")]
pub async fn delete_member(
    pool_id: String,
    id: String,
    #[server(default)] version: String,
) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .delete_member(user.as_ref(), &pool_id, &id, &version)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
}

/// The stored config versions, newest first: Admin.
#[server(endpoint = "list_versions")]
pub async fn list_versions() -> Result<Vec<VersionView>, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let rows = portal
        .versions(user.as_ref())
        .await
        .map_err(to_server_error)?;
    Ok(rows
        .into_iter()
        .map(|row| VersionView {
            version: row.version,
            created_at: rfc3339(row.created_at),
            created_by: row.created_by,
        })
        .collect())
}

/// What changed between two versions: Admin.
#[server(endpoint = "version_diff")]
pub async fn version_diff(from: i64, to: i64) -> Result<Vec<DiffLineView>, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    let lines = portal
        .version_diff(user.as_ref(), from, to)
        .await
        .map_err(to_server_error)?;
    Ok(lines
        .into_iter()
        .map(|line| DiffLineView {
            tag: line.tag,
            text: line.text,
        })
        .collect())
}

/// Rolls back to a stored version (a new version equal to it is published): Admin. `latest` is
/// the newest version the page showed; when another was published since, the roll-back is
/// refused (409) and nothing is written.
#[server(endpoint = "rollback")]
pub async fn rollback(version: i64, latest: i64) -> Result<PublishedView, ServerFnError> {
    let (portal, user) = portal_and_user().await?;
    portal
        .rollback(user.as_ref(), version, latest)
        .await
        .map(PublishedView::from)
        .map_err(to_server_error)
}
