//! The groups overage: a user in more groups than a token carries gets `_claim_names.groups`
//! instead of `groups`, and the gateway asks Microsoft Graph.
//!
//! Wire format: `POST {graph}/v1.0/users/{oid}/getMemberObjects` (or `servicePrincipals/{oid}` for
//! an app-only token) with `{"securityEnabledOnly": true}`, answered `{"value": ["<id>", …]}`
//! (Microsoft Graph v1.0, "directoryObject: getMemberObjects"; `azure-specs.md` §5.4). The call
//! carries the gateway's own app token for `https://graph.microsoft.com/.default`, from the
//! user's tenant: Graph answers about the directory its token is from, so a user of a second
//! tenant (a multi-tenant app registration consented there) is looked up with a token of that
//! tenant (a managed identity has its own tenant's only). Answers are cached per tenant and
//! object id for `graph.cache_seconds`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use gatehouse_schema::identity::GraphPolicy;
use serde::Deserialize;

use super::TokenError;
use crate::secret::Secret;
use crate::sync::lock;
use crate::warning_throttle::WarningThrottle;

pub use crate::entra_credential::GRAPH_SCOPE;

/// Something that obtains access tokens for a scope with the gateway's own identity.
pub trait AccessTokenSource: Send + Sync + std::fmt::Debug {
    /// A token for `scope` from the directory `tenant` (Graph answers about the directory its
    /// token is from); the error text never contains a secret.
    fn token<'a>(
        &'a self,
        scope: &'a str,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Secret<String>, String>>;
}

impl AccessTokenSource for crate::entra_credential::TokenCredential {
    fn token<'a>(
        &'a self,
        scope: &'a str,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<Secret<String>, String>> {
        Box::pin(async move {
            self.token_in_tenant(scope, tenant)
                .await
                .map_err(|error| error.to_string())
        })
    }
}

/// Most cached users; beyond it, expired entries are dropped, then the cache is cleared.
const MAX_CACHED: usize = 50_000;

/// How long Graph is left alone after it failed without saying how long (5xx, unreachable, a
/// 429 without `Retry-After`), and the longest wait a `Retry-After` may ask.
const DEFAULT_PAUSE: Duration = Duration::from_secs(5);
const MAX_PAUSE: Duration = Duration::from_secs(60);

/// How often a failing Graph is logged (every failure is answered 503 all the same).
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Resolves and caches group memberships.
#[derive(Debug)]
pub struct GroupResolver {
    client: reqwest::Client,
    credential: Option<Arc<dyn AccessTokenSource>>,
    cache: Mutex<HashMap<UserKey, Cached>>,
    /// Per tenant, until when Graph is not asked: it throttled (`Retry-After`) or failed. Calls
    /// meanwhile are answered 503 at once instead of adding to its load.
    paused: Mutex<HashMap<String, Instant>>,
    /// Per user, the turn to ask Graph: calls that miss the cache for the same user at once
    /// (an SDK's parallel calls with a fresh token) wait for the first one's answer instead of
    /// each asking Graph. An entry lives while someone holds or waits for it.
    asking: Mutex<HashMap<UserKey, Arc<tokio::sync::Mutex<()>>>>,
    warnings: WarningThrottle,
}

/// Tenant id and object id.
type UserKey = (String, String);

/// A user's groups and when Graph said so.
type Cached = (Instant, Arc<Vec<String>>);

#[derive(Deserialize)]
struct MemberObjects {
    value: Vec<String>,
}

impl GroupResolver {
    /// A resolver calling Graph with `client` and tokens from `credential` (none: overage tokens
    /// are refused with a clear reason).
    pub fn new(
        client: reqwest::Client,
        credential: Option<Arc<dyn AccessTokenSource>>,
    ) -> GroupResolver {
        GroupResolver {
            client,
            credential,
            cache: Mutex::default(),
            paused: Mutex::default(),
            asking: Mutex::default(),
            warnings: WarningThrottle::new(WARNING_INTERVAL),
        }
    }

    /// The groups `object_id` of `tenant` is a member of (transitively), and how long ago Graph
    /// said so (zero when it was asked now; at most `cache_seconds` for a cached answer).
    pub async fn member_groups(
        &self,
        policy: &GraphPolicy,
        tenant: &str,
        object_id: &str,
        app_only: bool,
    ) -> Result<(Arc<Vec<String>>, Duration), TokenError> {
        let ttl = Duration::from_secs(policy.cache_seconds);
        let key = (tenant.to_owned(), object_id.to_owned());
        let cached = || {
            lock(&self.cache)
                .get(&key)
                .filter(|(at, _)| at.elapsed() < ttl)
                .map(|(at, groups)| (Arc::clone(groups), at.elapsed()))
        };
        if let Some(found) = cached() {
            return Ok(found);
        }
        let turn = Arc::clone(lock(&self.asking).entry(key.clone()).or_default());
        let answer = {
            let _turn = turn.lock().await;
            // The call before in line may have asked already.
            match cached() {
                Some(found) => Ok(found),
                None => {
                    self.ask(policy, tenant, object_id, app_only, key.clone())
                        .await
                }
            }
        };
        let mut asking = lock(&self.asking);
        // Only the map and this call hold it: nobody waits, the entry goes.
        if Arc::strong_count(&turn) == 2 {
            asking.remove(&key);
        }
        answer
    }

    /// Asks Graph for the groups of `object_id` of `tenant` and caches the answer under `key`.
    async fn ask(
        &self,
        policy: &GraphPolicy,
        tenant: &str,
        object_id: &str,
        app_only: bool,
        key: UserKey,
    ) -> Result<(Arc<Vec<String>>, Duration), TokenError> {
        let ttl = Duration::from_secs(policy.cache_seconds);
        let Some(credential) = &self.credential else {
            if self.warnings.should_warn() {
                tracing::warn!(
                    "a token carries a groups overage but the gateway has no Entra credential to ask Microsoft Graph (server.entra_credential)"
                );
            }
            return Err(TokenError::Groups);
        };
        if lock(&self.paused)
            .get(tenant)
            .is_some_and(|until| Instant::now() < *until)
        {
            return Err(TokenError::Unavailable(
                "Microsoft Graph asked the gateway to wait (it was throttling or failing); try again shortly"
                    .to_owned(),
            ));
        }
        let token = credential
            .token(GRAPH_SCOPE, tenant)
            .await
            .map_err(|error| {
                if self.warnings.should_warn() {
                    tracing::warn!(%error, tenant, "no Microsoft Graph token");
                }
                TokenError::Unavailable("Microsoft Graph cannot be reached".to_owned())
            })?;
        if !object_id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            return Err(TokenError::MissingClaim("oid"));
        }
        let collection = if app_only {
            "servicePrincipals"
        } else {
            "users"
        };
        let url = format!(
            "{}/v1.0/{collection}/{object_id}/getMemberObjects",
            policy.endpoint.as_str().trim_end_matches('/')
        );
        let response = self
            .client
            .post(&url)
            .bearer_auth(token.expose())
            .json(&serde_json::json!({"securityEnabledOnly": true}))
            .send()
            .await
            .map_err(|error| {
                self.pause(tenant, DEFAULT_PAUSE);
                if self.warnings.should_warn() {
                    tracing::warn!(error = %error.without_url(), "Microsoft Graph unreachable");
                }
                TokenError::Unavailable("Microsoft Graph cannot be reached".to_owned())
            })?;
        let status = response.status();
        // 401/403: Graph refuses the gateway (consent revoked, `GroupMember.Read.All` not
        // granted), not the caller: a fault of the gateway's set-up, paused and answered 503
        // like an outage, so that neither the user is told their token is bad nor Graph is asked
        // on every call meanwhile.
        let refuses_the_gateway = matches!(status.as_u16(), 401 | 403);
        if status.is_server_error() || status.as_u16() == 429 || refuses_the_gateway {
            let wait = retry_after(response.headers()).unwrap_or(DEFAULT_PAUSE);
            self.pause(tenant, wait);
            if refuses_the_gateway && self.warnings.should_warn() {
                tracing::error!(
                    status = status.as_u16(),
                    wait_ms = wait.as_millis(),
                    "Microsoft Graph refused the gateway's own token: check the Entra credential's Graph permission (GroupMember.Read.All) and consent; not asked again before the wait is over"
                );
            } else if self.warnings.should_warn() {
                tracing::warn!(
                    status = status.as_u16(),
                    wait_ms = wait.as_millis(),
                    "Microsoft Graph refused; not asked again before the wait is over"
                );
            }
            return Err(TokenError::Unavailable(format!(
                "Microsoft Graph answered HTTP {}",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            if self.warnings.should_warn() {
                tracing::warn!(
                    status = status.as_u16(),
                    "Microsoft Graph refused the lookup"
                );
            }
            return Err(TokenError::Groups);
        }
        let groups: MemberObjects = response.json().await.map_err(|error| {
            if self.warnings.should_warn() {
                tracing::warn!(error = %error.without_url(), "unexpected Microsoft Graph answer");
            }
            TokenError::Groups
        })?;
        let groups = Arc::new(groups.value);
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), Arc::clone(&groups)));
        Ok((groups, Duration::ZERO))
    }

    /// Asks Graph nothing for `tenant` for `wait` (at most [`MAX_PAUSE`]).
    fn pause(&self, tenant: &str, wait: Duration) {
        let until = Instant::now() + wait.min(MAX_PAUSE);
        let mut paused = lock(&self.paused);
        // Tenants are the policy's, a short list; expired pauses go when another is set.
        paused.retain(|_, until| Instant::now() < *until);
        paused.insert(tenant.to_owned(), until);
    }
}

/// A `Retry-After` in seconds, as Graph sends it when it throttles.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}
