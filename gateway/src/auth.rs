//! Step 3: who is calling.
//!
//! A subscription key may come in `api-key` (what the Azure SDKs send), `Ocp-Apim-Subscription-Key`
//! (API Management's header), the `subscription-key` query parameter, or `Authorization: Bearer`
//! (what the OpenAI SDKs send). Keys are kept only as SHA-256 digests; the presented key is hashed
//! and the digest compared in constant time.
//!
//! When the snapshot accepts Entra ID tokens, a JWT in `Authorization: Bearer` is validated by
//! [`crate::entra`]; `identity.require` says whether a key, a token, either or both are needed.
//! A token anywhere else (an `api-key` header, the query) is only ever taken for a key, and fails
//! as one.

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_schema::config::{Subscription, SubscriptionState};
use gatehouse_schema::identity::{CredentialRequirement, IdentityPolicy};
use http::HeaderMap;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::classify::query_param;
use crate::entra::{EntraIdentity, TokenError, TokenValidator, looks_like_jwt};
use crate::error::GatewayError;

pub use gatehouse_schema::keys::{KEY_PREFIX, digest, generate_key, hash_key};

/// Header names that carry a subscription key.
pub const KEY_HEADERS: [&str; 2] = ["api-key", "ocp-apim-subscription-key"];
/// Query parameter that carries a subscription key.
pub const KEY_QUERY: &str = "subscription-key";

/// The authenticated caller: a subscription, an Entra identity, or both.
#[derive(Debug, Clone, Default)]
pub struct Principal {
    /// The subscription whose key was presented.
    pub subscription: Option<Arc<Subscription>>,
    /// The user or application an Entra token names.
    pub user: Option<Arc<EntraIdentity>>,
}

/// What the caller presented.
#[derive(Debug, Default)]
struct Presented {
    key: Option<String>,
    token: Option<String>,
}

/// Authenticates a request under the snapshot's identity policy (of `policy_generation`, see
/// [`TokenValidator::validate`]).
pub async fn authenticate(
    keys: &KeyIndex,
    policy: &IdentityPolicy,
    policy_generation: u64,
    validator: &TokenValidator,
    headers: &HeaderMap,
    query: Option<&str>,
    now: OffsetDateTime,
) -> Result<Principal, GatewayError> {
    let Some(entra) = &policy.entra else {
        let subscription = keys.authenticate(headers, query, now)?.subscription;
        return Ok(Principal {
            subscription,
            user: None,
        });
    };
    let presented = presented(headers, query, true);
    let (need_key, need_token, use_key, use_token) = credentials(policy.require);
    let key = presented.key.filter(|_| use_key);
    let token = presented.token.filter(|_| use_token);
    if need_key && key.is_none() {
        return Err(GatewayError::MissingKey);
    }
    if need_token && token.is_none() {
        return Err(GatewayError::MissingToken);
    }
    if key.is_none() && token.is_none() {
        return Err(GatewayError::MissingKey);
    }
    let subscription = match key {
        Some(key) => Some(keys.subscription_for(&key, now)?),
        None => None,
    };
    let user = match token {
        Some(token) => Some(
            validator
                .validate(entra, policy_generation, &token)
                .await
                .map_err(GatewayError::InvalidToken)?,
        ),
        None => None,
    };
    Ok(Principal { subscription, user })
}

/// What `require` asks of a caller: (a key needed, a token needed, a key taken, a token taken).
fn credentials(require: CredentialRequirement) -> (bool, bool, bool, bool) {
    match require {
        CredentialRequirement::KeyOrToken => (false, false, true, true),
        CredentialRequirement::Key => (true, false, true, false),
        CredentialRequirement::Token => (false, true, false, true),
        CredentialRequirement::KeyAndToken => (true, true, true, true),
    }
}

/// Judges again, under `policy`, a caller admitted earlier as `admitted` (its key's subscription
/// as the running keys hold it now, and the Entra identity its token gave): the credentials
/// `policy` requires now, and the identity's tenant and kind (app-only). Returns the caller as
/// `policy` sees it: a key or a token it no longer takes is left out, so that access rules judge
/// the caller by what still counts. The token itself is not validated again: a Realtime session,
/// as Azure's, outlives the token that opened it.
pub fn judge_admitted(
    policy: &IdentityPolicy,
    admitted: &Principal,
) -> Result<Principal, GatewayError> {
    let Some(entra) = &policy.entra else {
        // Tokens are not accepted any more: the key alone counts.
        return match &admitted.subscription {
            Some(subscription) => Ok(Principal {
                subscription: Some(Arc::clone(subscription)),
                user: None,
            }),
            None => Err(GatewayError::MissingKey),
        };
    };
    let (need_key, need_token, use_key, use_token) = credentials(policy.require);
    let subscription = admitted.subscription.clone().filter(|_| use_key);
    let user = admitted.user.clone().filter(|_| use_token);
    if need_key && subscription.is_none() {
        return Err(GatewayError::MissingKey);
    }
    if need_token && user.is_none() {
        return Err(GatewayError::MissingToken);
    }
    if subscription.is_none() && user.is_none() {
        return Err(GatewayError::MissingKey);
    }
    if let Some(user) = &user {
        if !entra
            .tenants
            .iter()
            .any(|tenant| tenant.eq_ignore_ascii_case(&user.tenant_id))
        {
            return Err(GatewayError::InvalidToken(TokenError::Tenant));
        }
        if user.app_only && !entra.accept_app_tokens {
            return Err(GatewayError::InvalidToken(TokenError::AppOnly));
        }
    }
    Ok(Principal { subscription, user })
}

/// Subscriptions indexed by key digest.
#[derive(Debug, Default, Clone)]
pub struct KeyIndex {
    by_digest: HashMap<[u8; 32], Arc<Subscription>>,
}

impl KeyIndex {
    /// Indexes the primary and secondary key digests of every subscription.
    pub fn new(subscriptions: &[Subscription]) -> KeyIndex {
        let mut by_digest = HashMap::new();
        for subscription in subscriptions {
            let subscription = Arc::new(subscription.clone());
            by_digest.insert(subscription.primary_key_hash.0, Arc::clone(&subscription));
            if let Some(secondary) = &subscription.secondary_key_hash {
                by_digest.insert(secondary.0, Arc::clone(&subscription));
            }
        }
        KeyIndex { by_digest }
    }

    /// Authenticates a request from its headers and query string.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<Principal, GatewayError> {
        let key = presented(headers, query, false)
            .key
            .ok_or(GatewayError::MissingKey)?;
        Ok(Principal {
            subscription: Some(self.subscription_for(&key, now)?),
            user: None,
        })
    }

    /// The active subscription `key` belongs to, at `now`: past the subscription's
    /// `expires_at` no key is accepted, past its `secondary_expires_at` not the secondary one.
    pub fn subscription_for(
        &self,
        key: &str,
        now: OffsetDateTime,
    ) -> Result<Arc<Subscription>, GatewayError> {
        self.subscription_for_digest(&digest(key), now)
    }

    /// [`KeyIndex::subscription_for`] the key whose SHA-256 is `digest`: how a session opened
    /// earlier has its key judged again under a newer snapshot without the gateway keeping the
    /// key itself.
    pub fn subscription_for_digest(
        &self,
        digest: &[u8; 32],
        now: OffsetDateTime,
    ) -> Result<Arc<Subscription>, GatewayError> {
        // The map is keyed by a digest of a high-entropy key, so a lookup reveals nothing an
        // attacker can steer; the final comparison is constant-time regardless.
        let subscription = self.by_digest.get(digest).ok_or(GatewayError::InvalidKey)?;
        let primary: bool = subscription.primary_key_hash.0.ct_eq(digest).into();
        let secondary: bool = subscription
            .secondary_key_hash
            .as_ref()
            .is_some_and(|h| h.0.ct_eq(digest).into());
        if !(primary | secondary) {
            return Err(GatewayError::InvalidKey);
        }
        if subscription.state != SubscriptionState::Active {
            return Err(GatewayError::InvalidKey);
        }
        if subscription.expires_at.is_some_and(|at| at <= now) {
            return Err(GatewayError::ExpiredKey);
        }
        // Compared here rather than left to the portal's next snapshot, so that a rotation's
        // overlap ends on time with the portal down or this gateway unreachable.
        if !primary
            && subscription
                .secondary_expires_at
                .is_some_and(|at| at <= now)
        {
            return Err(GatewayError::RetiredKey);
        }
        Ok(Arc::clone(subscription))
    }
}

/// The SHA-256 of the subscription key a request presents under `policy` (the key
/// [`authenticate`] judged), if it presents one the policy takes.
pub fn presented_key_digest(
    policy: &IdentityPolicy,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<[u8; 32]> {
    let takes_key =
        policy.entra.is_none() || !matches!(policy.require, CredentialRequirement::Token);
    let key = presented(headers, query, policy.entra.is_some()).key?;
    takes_key.then(|| digest(&key))
}

/// The key the client presented (from the first place that has one) and, when tokens are
/// accepted, the JWT in `Authorization: Bearer`.
fn presented(headers: &HeaderMap, query: Option<&str>, tokens_accepted: bool) -> Presented {
    let mut presented = Presented::default();
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|authorization| {
            let (scheme, value) = authorization.trim().split_once(' ')?;
            let value = value.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !value.is_empty()).then(|| value.to_owned())
        });
    let bearer_key = match bearer {
        Some(value) if tokens_accepted && looks_like_jwt(&value) => {
            presented.token = Some(value);
            None
        }
        other => other,
    };
    for name in KEY_HEADERS {
        if let Some(value) = headers.get(name).and_then(|v| v.to_str().ok()) {
            let value = value.trim();
            if !value.is_empty() {
                presented.key = Some(value.to_owned());
                return presented;
            }
        }
    }
    if let Some(value) = query_param(query, KEY_QUERY).filter(|v| !v.is_empty()) {
        presented.key = Some(value);
        return presented;
    }
    presented.key = bearer_key;
    presented
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn subscription(id: &str, primary: &str, secondary: Option<&str>) -> Subscription {
        Subscription {
            id: id.to_owned(),
            display_name: String::new(),
            product: None,
            primary_key_hash: hash_key(primary),
            secondary_key_hash: secondary.map(hash_key),
            secondary_expires_at: None,
            state: SubscriptionState::Active,
            expires_at: None,
        }
    }

    fn with_header(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().unwrap());
        headers
    }

    fn user(tenant: &str, app_only: bool) -> Arc<EntraIdentity> {
        Arc::new(EntraIdentity {
            object_id: "u1".to_owned(),
            tenant_id: tenant.to_owned(),
            name: None,
            username: None,
            groups: vec!["g-1".to_owned()],
            roles: Vec::new(),
            app_id: Some("app".to_owned()),
            app_only,
            groups_overage: false,
        })
    }

    fn policy(require: &str, tenants: &[&str], accept_app_tokens: bool) -> IdentityPolicy {
        serde_json::from_value(serde_json::json!({
            "require": require,
            "entra": {"tenants": tenants, "audiences": ["api://gatehouse"],
                      "accept_app_tokens": accept_app_tokens}
        }))
        .unwrap()
    }

    /// A caller admitted earlier, judged under the identity settings in force now: what they
    /// require, the tenants and kinds of tokens they take; what they no longer take is left out.
    #[test]
    fn an_admitted_caller_is_judged_by_the_settings_in_force() {
        let key = Some(Arc::new(subscription("team-a", "k", None)));
        let both = Principal {
            subscription: key.clone(),
            user: Some(user("t1", false)),
        };
        let judged = judge_admitted(&policy("key_or_token", &["t1"], true), &both).unwrap();
        assert!(judged.subscription.is_some() && judged.user.is_some());
        let judged = judge_admitted(&policy("key", &["t1"], true), &both).unwrap();
        assert!(judged.subscription.is_some() && judged.user.is_none());
        let judged = judge_admitted(&policy("token", &["T1"], true), &both).unwrap();
        assert!(judged.subscription.is_none() && judged.user.is_some());
        let judged = judge_admitted(&IdentityPolicy::default(), &both).unwrap();
        assert!(judged.subscription.is_some() && judged.user.is_none());

        let token_only = Principal {
            subscription: None,
            user: Some(user("t1", false)),
        };
        let refused = |policy: &IdentityPolicy, caller: &Principal| {
            judge_admitted(policy, caller).unwrap_err().reason()
        };
        assert_eq!(
            refused(&policy("token", &["t2"], true), &token_only),
            "invalid_token"
        );
        assert_eq!(
            refused(&policy("key", &["t1"], true), &token_only),
            "missing_key"
        );
        assert_eq!(
            refused(&IdentityPolicy::default(), &token_only),
            "missing_key"
        );
        let app = Principal {
            subscription: None,
            user: Some(user("t1", true)),
        };
        assert_eq!(
            refused(&policy("token", &["t1"], false), &app),
            "invalid_token"
        );
        let key_only = Principal {
            subscription: key,
            user: None,
        };
        assert_eq!(
            refused(&policy("token", &["t1"], true), &key_only),
            "missing_token"
        );
        assert_eq!(
            refused(&policy("key_and_token", &["t1"], true), &key_only),
            "missing_token"
        );
    }

    #[test]
    fn keys_are_accepted_from_every_documented_place() {
        let index = KeyIndex::new(&[subscription("team-a", "key-one", Some("key-two"))]);
        let now = OffsetDateTime::now_utc();
        for headers in [
            with_header("api-key", "key-one"),
            with_header("ocp-apim-subscription-key", "key-two"),
            with_header("authorization", "Bearer key-one"),
        ] {
            assert_eq!(
                index
                    .authenticate(&headers, None, now)
                    .unwrap()
                    .subscription
                    .unwrap()
                    .id,
                "team-a"
            );
        }
        let by_query = index.authenticate(
            &HeaderMap::new(),
            Some("api-version=1&subscription-key=key-two"),
            now,
        );
        assert_eq!(by_query.unwrap().subscription.unwrap().id, "team-a");
    }

    #[test]
    fn missing_wrong_revoked_and_expired_keys_are_refused() {
        let mut revoked = subscription("revoked", "key-r", None);
        revoked.state = SubscriptionState::Revoked;
        let mut expired = subscription("expired", "key-e", None);
        expired.expires_at = Some(OffsetDateTime::now_utc() - Duration::hours(1));
        let index = KeyIndex::new(&[subscription("ok", "key-ok", None), revoked, expired]);
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            index.authenticate(&HeaderMap::new(), None, now),
            Err(GatewayError::MissingKey)
        ));
        assert!(matches!(
            index.authenticate(&with_header("api-key", "nope"), None, now),
            Err(GatewayError::InvalidKey)
        ));
        assert!(matches!(
            index.authenticate(&with_header("api-key", "key-r"), None, now),
            Err(GatewayError::InvalidKey)
        ));
        assert!(matches!(
            index.authenticate(&with_header("api-key", "key-e"), None, now),
            Err(GatewayError::ExpiredKey)
        ));
    }

    #[test]
    fn a_secondary_key_is_refused_from_its_end_and_the_primary_is_not() {
        let now = OffsetDateTime::now_utc();
        let mut rotated = subscription("rotated", "new", Some("old"));
        rotated.secondary_expires_at = Some(now);
        let index = KeyIndex::new(&[rotated]);
        let before = now - Duration::seconds(1);
        assert!(index.subscription_for("old", before).is_ok());
        assert!(matches!(
            index.subscription_for("old", now),
            Err(GatewayError::RetiredKey)
        ));
        assert!(
            index
                .subscription_for("new", now + Duration::days(1))
                .is_ok()
        );
    }

    #[test]
    fn generated_keys_are_prefixed_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 40);
        assert_ne!(a, b);
    }
}
