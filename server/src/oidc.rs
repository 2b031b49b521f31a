//! Sign-in with OpenID Connect: authorization code + PKCE through the `oauth2` crate, `state`
//! and `nonce` checked, the ID token validated (issuer, audience, RS256 signature from the
//! issuer's JWKS, expiry), roles from the token's `roles` claim or a group→role mapping.
//!
//! Works with Microsoft Entra ID (issuer `https://login.microsoftonline.com/{tenant}/v2.0`) and
//! any standard issuer that publishes `/.well-known/openid-configuration`.
//!
//! The portal authenticates to the token endpoint with a client secret (HTTP Basic) or, instead,
//! with a certificate: a `private_key_jwt` client assertion as Entra ID accepts it ("Microsoft
//! identity platform application authentication certificate credentials"): a JWT with header
//! `alg` RS256, `typ` JWT and `x5t#S256` (base64url SHA-256 thumbprint of the certificate's DER),
//! claims `aud` = the token endpoint, `iss` = `sub` = the client id, a unique `jti`, `nbf`, `iat`
//! and `exp`, sent as `client_assertion` with `client_assertion_type`
//! `urn:ietf:params:oauth:client-assertion-type:jwt-bearer`.
//!
//! A user in more groups than an ID token carries (Entra ID's groups overage) gets their groups
//! from Microsoft Graph, with their own delegated token: see [`graph`].

pub mod graph;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use gatehouse_portal_core::SessionUser;
use gatehouse_schema::portal::Role;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AccessToken, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::sync::RwLock;
use url::Url;

/// How the portal signs users in. Its `Debug` shows no client secret.
#[derive(Clone)]
pub struct OidcSettings {
    /// The issuer (`iss`), whose `/.well-known/openid-configuration` is read at start.
    pub issuer: Url,
    /// The portal's client (application) id; the ID token's audience.
    pub client_id: String,
    /// The client secret, already read from its secret reference; `None` for a public client
    /// or one that authenticates with a certificate.
    pub client_secret: Option<String>,
    /// The certificate the portal signs client assertions with, instead of a secret.
    pub client_certificate: Option<ClientCertificate>,
    /// Group object id → portal role, for issuers without app roles.
    pub group_roles: HashMap<String, Role>,
    /// The Microsoft Graph origin the groups of a user in too many groups for the ID token are
    /// read from ([`graph::graph_url`] works it out from the setting); `None`: no lookups.
    pub graph: Option<Url>,
    /// Allowed clock difference for `exp`, `nbf` and `iat`.
    pub clock_skew: Duration,
}

impl std::fmt::Debug for OidcSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcSettings")
            .field("issuer", &self.issuer.as_str())
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "*****"),
            )
            .field("client_certificate", &self.client_certificate)
            .field("group_roles", &self.group_roles)
            .field("graph", &self.graph.as_ref().map(Url::as_str))
            .field("clock_skew", &self.clock_skew)
            .finish()
    }
}

/// The `client_assertion_type` of a JWT client assertion.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a client assertion is valid.
const ASSERTION_LIFETIME_SECONDS: i64 = 300;

/// A certificate and its RSA private key, for `private_key_jwt` client authentication. Its
/// `Debug` shows the thumbprint only.
#[derive(Clone)]
pub struct ClientCertificate {
    thumbprint_sha256: String,
    key: EncodingKey,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t#S256", &self.thumbprint_sha256)
            .finish_non_exhaustive()
    }
}

impl ClientCertificate {
    /// Reads a PEM holding a `CERTIFICATE` block and its unencrypted RSA private key (`PRIVATE
    /// KEY` or `RSA PRIVATE KEY`). The error never quotes the PEM.
    pub fn from_pem(text: &str) -> Result<ClientCertificate, String> {
        let blocks = pem::parse_many(text.as_bytes())
            .map_err(|_| "the certificate is not PEM".to_owned())?;
        let certificate = blocks
            .iter()
            .find(|block| block.tag() == "CERTIFICATE")
            .ok_or_else(|| "the PEM holds no CERTIFICATE block".to_owned())?;
        let key = blocks
            .iter()
            .find(|block| matches!(block.tag(), "PRIVATE KEY" | "RSA PRIVATE KEY"))
            .ok_or_else(|| {
                "the PEM holds no unencrypted PRIVATE KEY or RSA PRIVATE KEY block".to_owned()
            })?;
        let key = EncodingKey::from_rsa_pem(pem::encode(key).as_bytes())
            .map_err(|_| "the private key is not an RSA key".to_owned())?;
        use base64::Engine;
        use sha2::Digest;
        Ok(ClientCertificate {
            thumbprint_sha256: base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(certificate.contents())),
            key,
        })
    }

    /// A signed client assertion for `token_url`.
    fn assertion(&self, token_url: &Url, client_id: &str) -> Result<String, SignInError> {
        let mut header = Header::new(Algorithm::RS256);
        header.typ = Some("JWT".to_owned());
        header.x5t_s256 = Some(self.thumbprint_sha256.clone());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = serde_json::json!({
            "aud": token_url.as_str(),
            "iss": client_id,
            "sub": client_id,
            "jti": random_token(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|_| SignInError::Exchange("signing the client assertion failed".to_owned()))
    }
}

/// Why a sign-in failed. Shown to the user only as a generic message; logged in full.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The issuer's discovery document or keys could not be read.
    #[error("identity provider unavailable: {0}")]
    Provider(String),
    /// The callback's `state` is not the one this session started with.
    #[error("the sign-in state does not match")]
    State,
    /// The code exchange failed.
    #[error("code exchange failed: {0}")]
    Exchange(String),
    /// The ID token did not validate.
    #[error("ID token rejected: {0}")]
    Token(String),
    /// The user holds no portal role.
    #[error("the account has no portal role")]
    NoRole,
    /// The ID token left the groups out (groups overage), Microsoft Graph could not give them,
    /// and the token's app roles give the user no role.
    #[error(
        "the group memberships could not be read from Microsoft Graph (check that the portal's app registration has the delegated Microsoft Graph permission User.Read, consented): {0}"
    )]
    Groups(#[from] graph::GraphError),
}

/// What the sign-in keeps in the session between the redirect and the callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingSignIn {
    /// The `state` sent to the issuer.
    pub state: String,
    /// The `nonce` the ID token must carry.
    pub nonce: String,
    /// The PKCE verifier.
    pub pkce_verifier: String,
    /// Where to go after signing in (a local path).
    pub return_to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdTokenFields {
    id_token: String,
}

impl ExtraTokenFields for IdTokenFields {}

type OidcTokenResponse = StandardTokenResponse<IdTokenFields, BasicTokenType>;
type OidcClient = oauth2::Client<
    BasicErrorResponse,
    OidcTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    jwks_uri: Url,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
}

/// The claims of an ID token the portal reads.
#[derive(Debug, Deserialize)]
struct IdClaims {
    sub: String,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    preferred_username: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    /// Entra ID's groups overage: `{"groups": "src1"}` instead of `groups`. Its
    /// `_claim_sources` endpoint is never read, let alone called.
    #[serde(default, rename = "_claim_names")]
    claim_names: Option<serde_json::Value>,
    /// The groups overage of implicit-flow tokens: always `true` when present.
    #[serde(default)]
    hasgroups: Option<serde_json::Value>,
}

impl IdClaims {
    /// Whether the token says the user is in more groups than it carries.
    fn groups_overage(&self) -> bool {
        self.claim_names
            .as_ref()
            .is_some_and(|names| names.get("groups").is_some())
            || self.hasgroups == Some(serde_json::Value::Bool(true))
    }
}

struct KeyCache {
    keys: HashMap<String, DecodingKey>,
    fetched: Option<Instant>,
}

/// Shortest time between two key fetches caused by an unknown `kid`.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(60);

/// A configured OpenID Connect relying party.
pub struct Oidc {
    settings: OidcSettings,
    issuer: String,
    jwks_uri: Url,
    token_url: Url,
    client: OidcClient,
    http: reqwest::Client,
    keys: RwLock<KeyCache>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

fn random_token() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Oidc {
    /// Reads the issuer's discovery document and prepares the client; `redirect` is the portal's
    /// `/auth/callback` URL as registered with the issuer.
    pub async fn discover(settings: OidcSettings, redirect: Url) -> Result<Oidc, SignInError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|error| SignInError::Provider(error.to_string()))?;
        let mut discovery_url = settings.issuer.clone();
        discovery_url
            .path_segments_mut()
            .map_err(|()| SignInError::Provider("the issuer URL cannot have a path".into()))?
            .pop_if_empty()
            .extend([".well-known", "openid-configuration"]);
        let discovery: Discovery = http
            .get(discovery_url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| SignInError::Provider(error.to_string()))?
            .json()
            .await
            .map_err(|error| SignInError::Provider(error.to_string()))?;
        if discovery.issuer.trim_end_matches('/') != settings.issuer.as_str().trim_end_matches('/')
        {
            return Err(SignInError::Provider(format!(
                "the discovery document names issuer {}, not {}",
                discovery.issuer, settings.issuer
            )));
        }
        if let Some(graph) = &settings.graph {
            graph::check_graph_url(graph).map_err(SignInError::Provider)?;
        }
        if settings.client_secret.is_some() && settings.client_certificate.is_some() {
            return Err(SignInError::Provider(
                "configure a client secret or a client certificate, not both".to_owned(),
            ));
        }
        let token_url = discovery.token_endpoint.clone();
        let mut client = oauth2::Client::new(ClientId::new(settings.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(discovery.authorization_endpoint))
            .set_token_uri(TokenUrl::from_url(discovery.token_endpoint))
            .set_redirect_uri(RedirectUrl::from_url(redirect));
        if let Some(secret) = &settings.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.clone()));
        }
        Ok(Oidc {
            issuer: discovery.issuer,
            jwks_uri: discovery.jwks_uri,
            token_url,
            client,
            http,
            keys: RwLock::new(KeyCache {
                keys: HashMap::new(),
                fetched: None,
            }),
            settings,
        })
    }

    /// Starts a sign-in: the issuer URL to redirect to and what to keep in the session.
    pub fn start(&self, return_to: String) -> (Url, PendingSignIn) {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let nonce = random_token();
        let mut request = self
            .client
            .authorize_url(CsrfToken::new_random)
            .add_scope(Scope::new("openid".to_owned()))
            .add_scope(Scope::new("profile".to_owned()))
            .add_scope(Scope::new("email".to_owned()));
        // Graph's scope only where Graph is asked: another issuer would refuse a scope it does
        // not know, and the user is asked to consent to no more than is used.
        if let Some(graph) = self.graph_lookups() {
            request = request.add_scope(Scope::new(graph::user_read_scope(graph)));
        }
        let (url, state) = request
            .add_extra_param("nonce", nonce.clone())
            .set_pkce_challenge(challenge)
            .url();
        (
            url,
            PendingSignIn {
                state: state.secret().clone(),
                nonce,
                pkce_verifier: verifier.secret().clone(),
                return_to,
            },
        )
    }

    /// Completes a sign-in from the callback's `code` and `state`.
    pub async fn finish(
        &self,
        pending: &PendingSignIn,
        code: &str,
        state: &str,
    ) -> Result<SessionUser, SignInError> {
        let state_matches: bool = pending.state.as_bytes().ct_eq(state.as_bytes()).into();
        if !state_matches {
            return Err(SignInError::State);
        }
        let mut request = self
            .client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()));
        if let Some(certificate) = &self.settings.client_certificate {
            let assertion = certificate.assertion(&self.token_url, &self.settings.client_id)?;
            request = request
                .add_extra_param("client_assertion_type", CLIENT_ASSERTION_TYPE)
                .add_extra_param("client_assertion", assertion);
        }
        let response = request
            .request_async(&self.http)
            .await
            .map_err(|error| SignInError::Exchange(error.to_string()))?;
        let claims = self
            .validate(&response.extra_fields().id_token, &pending.nonce)
            .await?;
        let overage_groups = self
            .overage_groups(&claims, response.access_token())
            .await?;
        self.user(claims, overage_groups)
    }

    /// The Graph to read a groups overage from: only when groups map to roles at all.
    fn graph_lookups(&self) -> Option<&Url> {
        self.settings
            .graph
            .as_ref()
            .filter(|_| !self.settings.group_roles.is_empty())
    }

    /// The groups left out of the ID token (groups overage), from Microsoft Graph with the
    /// user's delegated `token`; none when the token carries them all, groups map to no role,
    /// lookups are off, or Graph failed for a user the token's app roles give a role.
    async fn overage_groups(
        &self,
        claims: &IdClaims,
        token: &AccessToken,
    ) -> Result<Vec<String>, SignInError> {
        if !claims.groups_overage() || self.settings.group_roles.is_empty() {
            return Ok(Vec::new());
        }
        let subject = claims.oid.as_deref().unwrap_or(&claims.sub);
        let Some(graph) = self.graph_lookups() else {
            tracing::warn!(
                subject,
                "the ID token leaves out the user's groups (groups overage) and Microsoft Graph lookups are off (GATEHOUSE_PORTAL_GRAPH_URL, --graph-url): the roles of the groups left out are not given"
            );
            return Ok(Vec::new());
        };
        match graph::member_groups(&self.http, graph, token).await {
            Ok(groups) => Ok(groups),
            Err(error) if claims.roles.iter().any(|role| Role::parse(role).is_some()) => {
                tracing::warn!(
                    subject,
                    %error,
                    "the user's groups could not be read from Microsoft Graph (groups overage): signed in with the token's app roles only"
                );
                Ok(Vec::new())
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn validate(&self, token: &str, nonce: &str) -> Result<IdClaims, SignInError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| SignInError::Token(error.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(SignInError::Token(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| SignInError::Token("the token names no key (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.settings.client_id]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.settings.clock_skew.as_secs();
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map_err(|error| SignInError::Token(error.to_string()))?;
        let nonce_matches: bool = data
            .claims
            .nonce
            .as_deref()
            .is_some_and(|claimed| claimed.as_bytes().ct_eq(nonce.as_bytes()).into());
        if !nonce_matches {
            return Err(SignInError::Token("the nonce does not match".into()));
        }
        Ok(data.claims)
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, SignInError> {
        if let Some(key) = self.keys.read().await.keys.get(kid) {
            return Ok(key.clone());
        }
        let mut cache = self.keys.write().await;
        if let Some(key) = cache.keys.get(kid) {
            return Ok(key.clone());
        }
        if cache
            .fetched
            .is_some_and(|at| at.elapsed() < UNKNOWN_KID_REFETCH)
        {
            return Err(SignInError::Token(format!("unknown signing key {kid}")));
        }
        let jwks: Jwks = self
            .http
            .get(self.jwks_uri.clone())
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| SignInError::Provider(error.to_string()))?
            .json()
            .await
            .map_err(|error| SignInError::Provider(error.to_string()))?;
        cache.keys = jwks
            .keys
            .into_iter()
            .filter(|jwk| jwk.kty == "RSA" && jwk.usage.as_deref().is_none_or(|u| u == "sig"))
            .filter_map(|jwk| {
                let key =
                    DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?).ok()?;
                Some((jwk.kid?, key))
            })
            .collect();
        cache.fetched = Some(Instant::now());
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| SignInError::Token(format!("unknown signing key {kid}")))
    }

    /// The signed-in user: roles from the `roles` claim and from the groups of the token and
    /// of `overage_groups` alike.
    fn user(
        &self,
        claims: IdClaims,
        overage_groups: Vec<String>,
    ) -> Result<SessionUser, SignInError> {
        let mut roles: BTreeSet<Role> =
            claims.roles.iter().filter_map(|r| Role::parse(r)).collect();
        let mut led_groups = Vec::new();
        for group in claims.groups.iter().chain(&overage_groups) {
            if let Some(role) = self.settings.group_roles.get(group) {
                roles.insert(*role);
                if *role == Role::TeamLead && !led_groups.contains(group) {
                    led_groups.push(group.clone());
                }
            }
        }
        if roles.is_empty() {
            return Err(SignInError::NoRole);
        }
        let name = claims
            .name
            .or(claims.preferred_username)
            .or(claims.email)
            .unwrap_or_else(|| claims.sub.clone());
        Ok(SessionUser {
            subject: claims.oid.unwrap_or(claims.sub),
            name,
            roles: roles.into_iter().collect(),
            led_groups,
            signed_in_at: OffsetDateTime::now_utc(),
            dev: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_never_print_the_client_secret() {
        let settings = OidcSettings {
            issuer: Url::parse("https://login.microsoftonline.com/t/v2.0").unwrap(),
            client_id: "portal".to_owned(),
            client_secret: Some("very-secret-client-secret".to_owned()),
            client_certificate: None,
            group_roles: HashMap::new(),
            graph: None,
            clock_skew: Duration::from_secs(60),
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("very-secret-client-secret"), "{printed}");
        assert!(printed.contains("*****"), "{printed}");
    }
}
