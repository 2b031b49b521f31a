//! Signing keys of Entra ID tenants: discovery document → JWKS, cached per tenant and token version.
//!
//! Wire formats: OpenID Connect Discovery 1.0 (`jwks_uri`) and RFC 7517 key sets, as Entra serves
//! them (`https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration`; v1
//! without `/v2.0`; see `azure-specs.md` §5.1). Keys are re-read every `keys_refresh_seconds`
//! (Entra recommends daily) and when a token names an unknown `kid`, at most once per
//! `unknown_kid_refetch_seconds` (API Management re-pulls at most every 5 minutes). A failed
//! refresh keeps the keys already held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use url::Url;

/// One RSA signing key.
pub struct SigningKey {
    /// The verification key.
    pub key: DecodingKey,
    /// The key's `issuer` property, when Entra publishes one (a template with `{tenantid}`).
    pub issuer: Option<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// Which metadata document a token is validated with (`ver` claim).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenVersion {
    /// `ver` = `1.0`: issuer `https://sts.windows.net/{tid}/`.
    V1,
    /// `ver` = `2.0`: issuer `https://login.microsoftonline.com/{tid}/v2.0`.
    V2,
}

/// Why no key could be found.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The tenant's key set does not hold the `kid` (even after a permitted re-fetch).
    #[error("the token's signing key is not among the tenant's published keys")]
    UnknownKid,
    /// Metadata or keys could not be fetched and none are cached.
    #[error("the identity provider's signing keys could not be fetched: {0}")]
    Unavailable(String),
}

/// How soon a tenant's keys are fetched again after the first fetch failed (at most
/// [`KeyRefresh::unknown_kid_interval`]).
pub const FIRST_FETCH_RETRY: Duration = Duration::from_secs(5);

/// How often keys are re-read.
#[derive(Debug, Clone, Copy)]
pub struct KeyRefresh {
    /// Age after which a key set is re-read.
    pub max_age: Duration,
    /// Shortest interval between fetches caused by unknown key ids.
    pub unknown_kid_interval: Duration,
}

#[derive(Default)]
struct TenantKeys {
    keys: HashMap<String, Arc<SigningKey>>,
    fetched_at: Option<Instant>,
    /// Last fetch attempt, successful or not.
    attempted_at: Option<Instant>,
}

impl TenantKeys {
    /// Whether the keys held came from the last attempt to fetch them (a failed attempt keeps
    /// older keys and leaves `fetched_at` before `attempted_at`).
    fn last_attempt_worked(&self) -> bool {
        self.fetched_at.is_some_and(|fetched| {
            self.attempted_at
                .is_none_or(|attempted| fetched >= attempted)
        })
    }
}

/// Key sets of every tenant the gateway has seen tokens from; survives configuration changes.
#[derive(Default)]
pub struct KeyCache {
    client: reqwest::Client,
    tenants: Mutex<HashMap<(String, String, TokenVersion), Arc<TenantSlot>>>,
    /// How many refreshes removed a key that was published before (a retired or revoked key).
    retired: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct TenantSlot {
    state: Mutex<TenantKeys>,
    /// Held while fetching, so that a burst of calls causes one fetch.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: Url,
}

#[derive(Deserialize)]
struct KeySet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(rename = "use", default)]
    usage: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
}

impl KeyCache {
    /// A cache that fetches with `client`.
    pub fn new(client: reqwest::Client) -> KeyCache {
        KeyCache {
            client,
            tenants: Mutex::default(),
            retired: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Changes whenever a refresh finds that a key published before is gone: tokens it signed
    /// must not be accepted any longer, even from memory.
    pub fn retirements(&self) -> u64 {
        self.retired.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The key `kid` of `tenant` for tokens of `version`.
    pub async fn key(
        &self,
        authority: &Url,
        tenant: &str,
        version: TokenVersion,
        kid: &str,
        refresh: KeyRefresh,
    ) -> Result<Arc<SigningKey>, KeyError> {
        let slot = self.slot(authority, tenant, version);
        let now = Instant::now();
        let (cached, fresh, may_refetch) = {
            let state = lock(&slot.state);
            let fresh = state
                .fetched_at
                .is_some_and(|at| now.duration_since(at) < refresh.max_age);
            // With no keys held yet every token of the tenant is refused, so a failed first
            // fetch is tried again soon; once keys are held, unknown key ids wait the full
            // interval (they protect the identity provider from made-up `kid`s).
            let interval = if state.fetched_at.is_some() {
                refresh.unknown_kid_interval
            } else {
                refresh.unknown_kid_interval.min(FIRST_FETCH_RETRY)
            };
            let may_refetch = state
                .attempted_at
                .is_none_or(|at| now.duration_since(at) >= interval);
            (state.keys.get(kid).cloned(), fresh, may_refetch)
        };
        match cached {
            Some(key) if fresh => return Ok(key),
            // Stale: refresh. A failed refresh keeps the keys held, so the key is still there
            // and still served; a key set that no longer has it came from a refresh that worked
            // (this one or another caller's): the key is retired, and this token is refused too.
            Some(_) => {
                if may_refetch {
                    self.fetch(&slot, authority, tenant, version).await;
                }
                return lock(&slot.state)
                    .keys
                    .get(kid)
                    .cloned()
                    .ok_or(KeyError::UnknownKid);
            }
            None if !may_refetch => {
                // A key id not in a set fetched at the last attempt is unknown; after a failed
                // attempt it may be a new key the provider published meanwhile (a rollover
                // during its outage): the token cannot be judged yet, which is not its fault.
                return if lock(&slot.state).last_attempt_worked() {
                    Err(KeyError::UnknownKid)
                } else {
                    Err(KeyError::Unavailable(
                        "the last attempt failed; retrying shortly".to_owned(),
                    ))
                };
            }
            None => {}
        }
        let error = self.fetch(&slot, authority, tenant, version).await;
        let state = lock(&slot.state);
        match state.keys.get(kid) {
            Some(key) => Ok(Arc::clone(key)),
            None if state.last_attempt_worked() => Err(KeyError::UnknownKid),
            None => Err(KeyError::Unavailable(error.unwrap_or_else(|| {
                "the last attempt failed; retrying shortly".to_owned()
            }))),
        }
    }

    fn slot(&self, authority: &Url, tenant: &str, version: TokenVersion) -> Arc<TenantSlot> {
        let mut tenants = lock(&self.tenants);
        Arc::clone(
            tenants
                .entry((authority.to_string(), tenant.to_owned(), version))
                .or_default(),
        )
    }

    /// Fetches the key set once (concurrent callers wait for the one fetch). Returns the error
    /// text of a failed fetch.
    async fn fetch(
        &self,
        slot: &TenantSlot,
        authority: &Url,
        tenant: &str,
        version: TokenVersion,
    ) -> Option<String> {
        let started = Instant::now();
        let _fetching = slot.fetching.lock().await;
        // Someone else fetched while this caller waited.
        if lock(&slot.state)
            .attempted_at
            .is_some_and(|at| at >= started)
        {
            return None;
        }
        let result = self.download(authority, tenant, version).await;
        let mut state = lock(&slot.state);
        state.attempted_at = Some(Instant::now());
        match result {
            Ok(keys) => {
                if state.keys.keys().any(|kid| !keys.contains_key(kid)) {
                    self.retired
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                state.keys = keys;
                state.fetched_at = Some(Instant::now());
                None
            }
            Err(error) => {
                tracing::warn!(tenant, %error, "could not refresh Entra signing keys");
                // Keep what is held: it stays usable until the next permitted attempt.
                Some(error)
            }
        }
    }

    async fn download(
        &self,
        authority: &Url,
        tenant: &str,
        version: TokenVersion,
    ) -> Result<HashMap<String, Arc<SigningKey>>, String> {
        let path = match version {
            TokenVersion::V1 => format!("{tenant}/.well-known/openid-configuration"),
            TokenVersion::V2 => format!("{tenant}/v2.0/.well-known/openid-configuration"),
        };
        let metadata_url = join(authority, &path)?;
        let discovery: Discovery = self.get_json(metadata_url).await?;
        let set: KeySet = self.get_json(discovery.jwks_uri).await?;
        let mut keys = HashMap::new();
        for raw in set.keys {
            let usable = raw.kty == "RSA" && raw.usage.as_deref().is_none_or(|u| u == "sig");
            let (Some(kid), Some(n), Some(e), true) = (raw.kid, raw.n, raw.e, usable) else {
                continue;
            };
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    keys.insert(
                        kid,
                        Arc::new(SigningKey {
                            key,
                            issuer: raw.issuer,
                        }),
                    );
                }
                Err(error) => tracing::warn!(kid, %error, "skipping an unusable signing key"),
            }
        }
        if keys.is_empty() {
            return Err("the key set holds no RSA signing key".to_owned());
        }
        Ok(keys)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: Url) -> Result<T, String> {
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: HTTP {}", response.status().as_u16()));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| format!("{url}: unexpected document: {e}"))
    }
}

fn join(base: &Url, path: &str) -> Result<Url, String> {
    let mut text = base.to_string();
    if !text.ends_with('/') {
        text.push('/');
    }
    text.push_str(path);
    Url::parse(&text).map_err(|e| format!("metadata URL: {e}"))
}
