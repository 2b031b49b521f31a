//! Entra ID access tokens presented by callers (`Authorization: Bearer <jwt>`).
//!
//! Validation follows `azure-specs.md` §5: the token's `ver` picks the v1 or v2 metadata; the
//! issuer must be exactly the one of the token's tenant (`https://sts.windows.net/{tid}/` or
//! `{authority}/{tid}/v2.0`) and that tenant must be allowed; the signing key is chosen by `kid`
//! from the tenant's published keys; only RS256 is accepted; `aud` must be configured; `exp` and
//! `nbf` hold within the configured skew. The cryptography is the `jsonwebtoken` crate's.
//!
//! A token that passed is remembered (by its SHA-256, never the token itself) until it expires or
//! the Graph cache time passes, whichever is first, so a client that reuses its token — as every
//! SDK does for about an hour — pays for the signature check once. A new snapshot forgets them all.

pub mod graph;
pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use gatehouse_schema::identity::EntraTokenPolicy;
use jsonwebtoken::{Algorithm, Validation, errors::ErrorKind};
use serde::Deserialize;

use keys::{KeyCache, KeyError, KeyRefresh, TokenVersion};

use crate::sync::{read, write};

/// The caller an Entra token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraIdentity {
    /// `oid`: the user's or service principal's immutable object id.
    pub object_id: String,
    /// `tid`: the tenant.
    pub tenant_id: String,
    /// `name`, for display.
    pub name: Option<String>,
    /// `upn` / `unique_name` (v1) or `preferred_username` (v2), for display.
    pub username: Option<String>,
    /// Group object ids, from the `groups` claim or resolved through Microsoft Graph.
    pub groups: Vec<String>,
    /// `roles`: app roles.
    pub roles: Vec<String>,
    /// `appid` (v1) / `azp` (v2): the calling application.
    pub app_id: Option<String>,
    /// Whether the token is app-only (`idtyp` = `app`, or no `scp` and no user claims).
    pub app_only: bool,
    /// The token held more groups than fit (`_claim_names.groups`): `groups` came from Graph.
    pub groups_overage: bool,
}

/// Why a token was refused. The texts are safe to return to the caller: they never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url segments with JSON inside.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// `alg` is not RS256 (`none`, HS256, …).
    #[error("the token is not signed with RS256")]
    Algorithm,
    /// No `kid` in the header.
    #[error("the token names no signing key (kid)")]
    NoKid,
    /// `tid` missing or not an allowed tenant.
    #[error("the token's tenant is not accepted")]
    Tenant,
    /// `iss` is not the issuer of the token's tenant and version.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` is none of the configured audiences.
    #[error("the token's audience is not accepted")]
    Audience,
    /// Past `exp`.
    #[error("the token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// The signature does not verify.
    #[error("the token's signature does not verify")]
    Signature,
    /// `kid` unknown to the tenant.
    #[error("the token's signing key is not among the tenant's published keys")]
    UnknownKey,
    /// An app-only token where only user tokens are accepted.
    #[error("app-only tokens are not accepted")]
    AppOnly,
    /// No `appid`/`azp`: not an access token (an OpenID Connect ID token is not a credential).
    #[error(
        "the token is not an access token for this API (it names no client application: an ID token?)"
    )]
    NotAccessToken,
    /// A required claim (`oid`, `exp`, …) is missing.
    #[error("the token lacks the `{0}` claim")]
    MissingClaim(&'static str),
    /// The groups overage could not be resolved.
    #[error("the caller's group memberships could not be resolved")]
    Groups,
    /// Signing keys or Graph could not be reached; the caller may retry.
    #[error("tokens cannot be validated right now: {0}")]
    Unavailable(String),
}

impl TokenError {
    /// Whether the failure is the gateway's (503), not the token's (401).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, TokenError::Unavailable(_))
    }
}

/// Whether a bearer value is a JWT rather than a subscription key.
pub fn looks_like_jwt(value: &str) -> bool {
    value.starts_with("eyJ") && value.bytes().filter(|&b| b == b'.').count() == 2
}

#[derive(Deserialize)]
struct Routing {
    #[serde(default)]
    tid: Option<String>,
    #[serde(default)]
    ver: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    tid: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    upn: Option<String>,
    #[serde(default)]
    unique_name: Option<String>,
    #[serde(default)]
    preferred_username: Option<String>,
    #[serde(default)]
    groups: Option<Vec<String>>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    appid: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    idtyp: Option<String>,
    #[serde(default)]
    scp: Option<String>,
    #[serde(default, rename = "_claim_names")]
    claim_names: Option<serde_json::Map<String, serde_json::Value>>,
    /// Set instead of `groups` in a token of the implicit flow when the user is in more groups
    /// than it carries (six): the groups are looked up as for `_claim_names` (azure-specs §5.3).
    #[serde(default)]
    hasgroups: Option<bool>,
}

/// Most remembered tokens; beyond it, expired ones are dropped, then all.
const MAX_VALIDATED: usize = 100_000;

/// A token that passed, remembered by its digest.
#[derive(Debug)]
struct Validated {
    identity: Arc<EntraIdentity>,
    /// Unix seconds from which the token may be used (`nbf` minus the skew).
    usable_from: i64,
    /// Unix seconds until which the answer holds (`exp` plus the skew, or the Graph cache time).
    usable_until: i64,
    /// The policy generation and key retirements it passed under.
    generation: (u64, u64),
}

/// Validates Entra ID tokens; holds the signing-key cache, the Graph client and the tokens that
/// passed.
#[derive(Debug)]
pub struct TokenValidator {
    keys: KeyCache,
    /// Resolves the groups overage.
    pub graph: graph::GroupResolver,
    validated: RwLock<HashMap<[u8; 32], Validated>>,
    /// Bumped whenever the policy may have changed; older answers no longer count.
    generation: std::sync::atomic::AtomicU64,
}

impl TokenValidator {
    /// A validator fetching metadata, keys and Graph answers with `client`.
    pub fn new(client: reqwest::Client, graph: graph::GroupResolver) -> TokenValidator {
        TokenValidator {
            keys: KeyCache::new(client),
            graph,
            validated: RwLock::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current policy generation and the key retirements so far.
    fn generation(&self) -> (u64, u64) {
        (
            self.generation.load(std::sync::atomic::Ordering::SeqCst),
            self.keys.retirements(),
        )
    }

    /// Forgets every token that passed and starts a new policy generation, which the caller
    /// stamps on the runtime it installs next ([`crate::runtime::Runtime::policy_generation`]).
    /// A call still served by an older runtime validates under that runtime's policy, and its
    /// answer is not remembered: a token the new policy refuses is never taken from memory.
    pub fn next_policy_generation(&self) -> u64 {
        let mut validated = write(&self.validated);
        let next = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        validated.clear();
        next
    }

    /// Validates `token` under `policy`, the policy of generation `policy_generation`, from
    /// memory when it passed before under the same generation and is still valid.
    pub async fn validate(
        &self,
        policy: &EntraTokenPolicy,
        policy_generation: u64,
        token: &str,
    ) -> Result<Arc<EntraIdentity>, TokenError> {
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()).into();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let generation = (policy_generation, self.keys.retirements());
        if let Some(known) = read(&self.validated).get(&digest)
            && known.generation == generation
            && (known.usable_from..known.usable_until).contains(&now)
        {
            return Ok(Arc::clone(&known.identity));
        }
        let validation = self.validate_fully(policy, token).await?;
        let identity = Arc::new(validation.identity);
        let skew = i64::try_from(policy.clock_skew_seconds).unwrap_or(i64::MAX);
        // Groups from Graph are used no longer than `cache_seconds` after Graph gave them: a
        // token first seen with a cached answer is remembered only for what is left of its age.
        let graph_age = i64::try_from(policy.graph.cache_seconds)
            .unwrap_or(i64::MAX)
            .saturating_sub(
                // In whole seconds, as `now`, rounded up.
                i64::try_from(validation.groups_age.as_millis().div_ceil(1000)).unwrap_or(i64::MAX),
            );
        let remembered = Validated {
            identity: Arc::clone(&identity),
            usable_from: validation
                .nbf
                .map_or(i64::MIN, |nbf| nbf.saturating_sub(skew)),
            usable_until: validation
                .exp
                .saturating_add(skew)
                .min(now.saturating_add(graph_age)),
            generation,
        };
        let mut validated = write(&self.validated);
        if self.generation() != generation {
            return Ok(identity);
        }
        if validated.len() >= MAX_VALIDATED {
            validated.retain(|_, known| known.usable_until > now);
            if validated.len() >= MAX_VALIDATED {
                validated.clear();
            }
        }
        validated.insert(digest, remembered);
        Ok(identity)
    }

    /// The whole validation: header, tenant, issuer, key, signature, claims, groups.
    async fn validate_fully(
        &self,
        policy: &EntraTokenPolicy,
        token: &str,
    ) -> Result<FullValidation, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|error| match error.kind() {
            // An `alg` the crate does not know (`none`, …) fails header parsing.
            ErrorKind::Json(_) => TokenError::Algorithm,
            _ => TokenError::Malformed,
        })?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Algorithm);
        }
        let kid = header.kid.ok_or(TokenError::NoKid)?;

        // The tenant and version pick the issuer and the key set; the signature check below
        // covers these claims too.
        let routing = unverified_claims(token)?;
        let tenant = routing.tid.ok_or(TokenError::MissingClaim("tid"))?;
        if !policy
            .tenants
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(&tenant))
        {
            return Err(TokenError::Tenant);
        }
        let version = match routing.ver.as_deref() {
            Some("1.0") => TokenVersion::V1,
            Some("2.0") => TokenVersion::V2,
            _ => return Err(TokenError::MissingClaim("ver")),
        };
        let issuer = expected_issuer(policy, &tenant, version);

        let refresh = KeyRefresh {
            max_age: Duration::from_secs(policy.keys_refresh_seconds),
            unknown_kid_interval: Duration::from_secs(policy.unknown_kid_refetch_seconds),
        };
        // One key set per tenant however a token spells its id: the allowed tenants match
        // without regard to case, and a slot per spelling would let anyone multiply the fetches
        // that `unknown_kid_refetch_seconds` limits.
        let key = self
            .keys
            .key(
                &policy.authority_host,
                &tenant.to_ascii_lowercase(),
                version,
                &kid,
                refresh,
            )
            .await
            .map_err(|error| match error {
                KeyError::UnknownKid => TokenError::UnknownKey,
                // The cause (the URL and the error) is in the key cache's warning; the caller
                // learns only that the provider could not be reached.
                KeyError::Unavailable(_) => TokenError::Unavailable(
                    "the tenant's signing keys cannot be fetched from the identity provider"
                        .to_owned(),
                ),
            })?;
        // A key that states its issuer must state this one (§5.2).
        if version == TokenVersion::V2
            && let Some(template) = &key.issuer
            && template.replace("{tenantid}", &tenant) != issuer
        {
            return Err(TokenError::Issuer);
        }

        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&policy.audiences);
        validation.set_issuer(&[issuer.as_str()]);
        validation.leeway = policy.clock_skew_seconds;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|error| {
                match error.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                    ErrorKind::InvalidAudience => TokenError::Audience,
                    ErrorKind::InvalidIssuer => TokenError::Issuer,
                    ErrorKind::InvalidSignature => TokenError::Signature,
                    ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                        "exp" => TokenError::MissingClaim("exp"),
                        "aud" => TokenError::MissingClaim("aud"),
                        _ => TokenError::MissingClaim("iss"),
                    },
                    _ => TokenError::Malformed,
                }
            })?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        if claims.tid.as_deref() != Some(tenant.as_str()) {
            return Err(TokenError::Tenant);
        }
        // An access token names the application it was issued to (`appid` in v1, `azp` in v2,
        // azure-specs.md §5.3, Entra's access token claims reference); an OpenID Connect ID
        // token, made for the client that signed the user in, names none. Same tenant, same
        // keys, and an `aud` that can be the API's own client id: without this check, an ID
        // token a client keeps in a browser would be a credential for the gateway.
        if claims.appid.is_none() && claims.azp.is_none() {
            return Err(TokenError::NotAccessToken);
        }
        let object_id = claims.oid.ok_or(TokenError::MissingClaim("oid"))?;
        let app_only = match claims.idtyp.as_deref() {
            Some(kind) => kind.eq_ignore_ascii_case("app"),
            None => {
                claims.scp.is_none() && claims.upn.is_none() && claims.preferred_username.is_none()
            }
        };
        if app_only && !policy.accept_app_tokens {
            return Err(TokenError::AppOnly);
        }
        let overage = claims
            .claim_names
            .as_ref()
            .is_some_and(|names| names.contains_key("groups"))
            || claims.hasgroups == Some(true);
        let (groups, groups_age) = match (claims.groups, overage) {
            (Some(groups), _) => (groups, Duration::ZERO),
            (None, true) => {
                let (groups, age) = self
                    .graph
                    .member_groups(&policy.graph, &tenant, &object_id, app_only)
                    .await?;
                (groups.as_ref().clone(), age)
            }
            (None, false) => (Vec::new(), Duration::ZERO),
        };
        let identity = EntraIdentity {
            object_id,
            tenant_id: tenant,
            name: claims.name,
            username: claims
                .upn
                .or(claims.unique_name)
                .or(claims.preferred_username),
            groups,
            roles: claims.roles,
            app_id: claims.azp.or(claims.appid),
            app_only,
            groups_overage: overage,
        };
        Ok(FullValidation {
            identity,
            exp,
            nbf: claims.nbf,
            groups_age,
        })
    }
}

/// What a whole validation found: the identity, the token's `exp` and `nbf`, and the age of the
/// groups Graph gave for it (zero when the token carried them).
struct FullValidation {
    identity: EntraIdentity,
    exp: i64,
    nbf: Option<i64>,
    groups_age: Duration,
}

/// The issuer a token of `tenant` and `version` must carry.
fn expected_issuer(policy: &EntraTokenPolicy, tenant: &str, version: TokenVersion) -> String {
    match version {
        TokenVersion::V1 => format!(
            "{}/{tenant}/",
            policy.v1_issuer_host.as_str().trim_end_matches('/')
        ),
        TokenVersion::V2 => format!(
            "{}/{tenant}/v2.0",
            policy.authority_host.as_str().trim_end_matches('/')
        ),
    }
}

/// The routing claims of a token, read before its signature is checked.
fn unverified_claims(token: &str) -> Result<Routing, TokenError> {
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_are_told_from_keys() {
        assert!(looks_like_jwt("eyJhbGciOiJSUzI1NiJ9.eyJ9.sig"));
        assert!(!looks_like_jwt("ghk_abc"));
        assert!(!looks_like_jwt("eyJonlyonepart"));
    }

    #[test]
    fn issuers_follow_the_token_version() {
        let policy: EntraTokenPolicy = serde_json::from_value(serde_json::json!({
            "tenants": ["t1"], "audiences": ["a"]
        }))
        .unwrap();
        assert_eq!(
            expected_issuer(&policy, "t1", TokenVersion::V1),
            "https://sts.windows.net/t1/"
        );
        assert_eq!(
            expected_issuer(&policy, "t1", TokenVersion::V2),
            "https://login.microsoftonline.com/t1/v2.0"
        );
    }
}
