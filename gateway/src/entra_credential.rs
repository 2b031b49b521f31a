//! Access tokens from Microsoft Entra ID for the gateway's outbound calls: to Azure OpenAI members
//! (`https://cognitiveservices.azure.com/.default`, `azure-specs.md` §1.3), to Key Vault
//! (`https://vault.azure.net/.default`), to Microsoft Graph (`https://graph.microsoft.com/.default`).
//!
//! A [`TokenCredential`] is one identity; it is cheap to clone (an `Arc`) and caches one token per
//! scope. A cached token is used until shortly before it expires (5 minutes before, or after half
//! its lifetime when it lives less than 10 minutes); then the next caller refreshes it. Refreshes
//! are single-flight: however many callers need a token at once, one request goes out and all of
//! them get its answer. When a refresh fails while the old token is still valid, the old token is
//! used (and the failure logged).
//!
//! Wire formats, as documented by Microsoft:
//!
//! - Client credentials with a client secret — "Microsoft identity platform and the OAuth 2.0
//!   client credentials flow", <https://learn.microsoft.com/entra/identity-platform/v2-oauth2-client-creds-grant-flow>:
//!   `POST {authority}/{tenant}/oauth2/v2.0/token`, `application/x-www-form-urlencoded` body
//!   `client_id`, `scope`, `client_secret`, `grant_type=client_credentials`; success
//!   `{"token_type":"Bearer","expires_in":3599,"access_token":"…"}`; error
//!   `{"error":"invalid_client","error_description":"AADSTS7000215: …","error_codes":[7000215],…}`.
//! - Client credentials with a certificate — same flow, with `client_assertion_type=
//!   urn:ietf:params:oauth:client-assertion-type:jwt-bearer` and `client_assertion` instead of the
//!   secret; the assertion format is "Microsoft identity platform application authentication
//!   certificate credentials", <https://learn.microsoft.com/entra/identity-platform/certificate-credentials>:
//!   a JWT with header `alg` (RS256), `typ: JWT`, `x5t#S256` (base64url SHA-256 thumbprint of the
//!   certificate's DER), and claims `aud` (the token endpoint URL), `iss` = `sub` = client id,
//!   `jti` (unique), `nbf`, `iat`, `exp`.
//! - Managed identity — "How to use managed identities for Azure resources on an Azure VM to
//!   acquire an access token", <https://learn.microsoft.com/entra/identity/managed-identities-azure-resources/how-to-use-vm-token>:
//!   `GET http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&resource=…
//!   [&client_id=…]` with header `Metadata: true`; answer `{"access_token":"…","expires_in":"3599",
//!   "expires_on":"…","resource":"…","token_type":"Bearer"}` (numbers as strings). In App Service
//!   and Container Apps ("How to use managed identities for App Service and Azure Functions",
//!   <https://learn.microsoft.com/azure/app-service/overview-managed-identity#rest-endpoint-reference>):
//!   `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=…[&client_id=…]` with header
//!   `X-IDENTITY-HEADER: {IDENTITY_HEADER}`; answer with `expires_on` (Unix seconds).
//!   Both take a `resource`, which is the scope without its `/.default` suffix.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use gatehouse_audit::azure_monitor::{IdentityTokenError, IssuedToken};
use gatehouse_schema::config::{DEFAULT_AUTHORITY_HOST, EntraIdentity, SecretSource};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use crate::secret::{Secret, SecretStore, SecretValue};

pub use gatehouse_schema::config::COGNITIVE_SERVICES_SCOPE;

/// Scope of a token for Azure Key Vault.
pub const KEY_VAULT_SCOPE: &str = "https://vault.azure.net/.default";
/// Scope of a token for Microsoft Graph with the application's permissions.
pub const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
/// The Azure Instance Metadata Service token endpoint.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a signed client assertion is valid (Entra accepts up to 10 minutes' worth).
const ASSERTION_LIFETIME_SECONDS: u64 = 600;
/// How long one token request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A token that lives at least twice this long is refreshed this long before it expires.
const EARLY_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Why no access token could be obtained. Never holds a secret, an assertion or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token endpoint {endpoint} could not be reached: {reason}")]
    Unreachable {
        /// The endpoint (without query).
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The token endpoint refused to issue a token.
    #[error("token endpoint {endpoint} refused a token (HTTP {status}): {code}")]
    Refused {
        /// The endpoint (without query).
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// The OAuth `error` and the `AADSTS` code, e.g. `invalid_client (AADSTS7000215)`.
        code: String,
    },
    /// The token endpoint answered 2xx without a usable token.
    #[error("token endpoint {endpoint} answered without a usable access token")]
    Malformed {
        /// The endpoint (without query).
        endpoint: String,
    },
    /// The certificate PEM cannot be used to sign an assertion.
    #[error("the certificate cannot be used: {0}")]
    Certificate(String),
    /// The credential's settings are wrong.
    #[error("{0}")]
    Config(String),
}

impl CredentialError {
    /// A low-cardinality name of the failure, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CredentialError::Unreachable { .. } => "token_endpoint_unreachable",
            CredentialError::Refused { .. } => "token_refused",
            CredentialError::Malformed { .. } => "token_malformed",
            CredentialError::Certificate(_) => "certificate_unusable",
            CredentialError::Config(_) => "credential_misconfigured",
        }
    }
}

/// An access token and when it expires.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The bearer token.
    pub token: Secret<String>,
    /// When it stops being valid (as the issuer said, measured from the request).
    pub expires_at: Instant,
}

/// Where a managed identity gets its tokens.
#[derive(Clone, Debug)]
pub enum ManagedIdentityEndpoint {
    /// The IMDS protocol (`Metadata: true`, api-version 2018-02-01) at this URL.
    Imds(Url),
    /// The App Service / Container Apps protocol (`X-IDENTITY-HEADER`, api-version 2019-08-01).
    AppService {
        /// `IDENTITY_ENDPOINT`.
        endpoint: Url,
        /// `IDENTITY_HEADER`.
        header: Secret<String>,
    },
}

impl ManagedIdentityEndpoint {
    /// `configured` when given (IMDS protocol); else App Service when `IDENTITY_ENDPOINT` and
    /// `IDENTITY_HEADER` are set; else the VM's IMDS.
    pub fn from_environment(configured: Option<&Url>) -> Result<Self, CredentialError> {
        if let Some(url) = configured {
            return Ok(ManagedIdentityEndpoint::Imds(url.clone()));
        }
        let variable = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let (Some(endpoint), Some(header)) =
            (variable("IDENTITY_ENDPOINT"), variable("IDENTITY_HEADER"))
        {
            let endpoint = Url::parse(&endpoint).map_err(|_| {
                CredentialError::Config("IDENTITY_ENDPOINT is not a URL".to_owned())
            })?;
            return Ok(ManagedIdentityEndpoint::AppService {
                endpoint,
                header: Secret::new(header),
            });
        }
        Url::parse(IMDS_ENDPOINT)
            .map(ManagedIdentityEndpoint::Imds)
            .map_err(|error| CredentialError::Config(format!("IMDS endpoint: {error}")))
    }
}

/// How the identity proves itself.
#[derive(Debug)]
enum Source {
    ClientSecret {
        token_url: Url,
        client_id: String,
        secret: SecretValue,
    },
    Certificate {
        token_url: Url,
        client_id: String,
        certificate: SecretValue,
    },
    ManagedIdentity {
        endpoint: ManagedIdentityEndpoint,
        client_id: Option<String>,
    },
}

type TokenFuture = Shared<BoxFuture<'static, Result<CachedToken, CredentialError>>>;

/// How long a token is kept however often resources refuse it ([`TokenCredential::forget_refused`]).
const REFUSED_TOKEN_KEPT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
struct CachedToken {
    token: Secret<String>,
    /// When the request that got it was sent.
    obtained_at: Instant,
    refresh_at: Instant,
    /// After this the token is not handed out even when a refresh fails.
    usable_until: Instant,
    expires_at: Instant,
}

#[derive(Default)]
struct Slot {
    token: Option<CachedToken>,
    inflight: Option<TokenFuture>,
    /// After a failed refresh, while the cached token is still usable: no new attempt before
    /// this ([`REFRESH_RETRY`]).
    retry_at: Option<Instant>,
}

/// How long after a failed refresh the next is tried, while the cached token still serves.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

struct Inner {
    source: Source,
    http: reqwest::Client,
    slots: Mutex<HashMap<String, Slot>>,
}

/// One Entra ID identity that obtains access tokens, with a per-scope cache and single-flight
/// refresh. Clones share the cache.
///
/// ```no_run
/// # async fn demo(credential: gatehouse_gateway::entra_credential::TokenCredential) {
/// use gatehouse_gateway::entra_credential::GRAPH_SCOPE;
/// let token = credential.token(GRAPH_SCOPE).await;
/// # }
/// ```
#[derive(Clone)]
pub struct TokenCredential {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, client_id) = match &self.inner.source {
            Source::ClientSecret { client_id, .. } => ("client_secret", Some(client_id.as_str())),
            Source::Certificate { client_id, .. } => ("certificate", Some(client_id.as_str())),
            Source::ManagedIdentity { client_id, .. } => ("managed_identity", client_id.as_deref()),
        };
        f.debug_struct("TokenCredential")
            .field("kind", &kind)
            .field("client_id", &client_id)
            .finish_non_exhaustive()
    }
}

impl TokenCredential {
    /// Client credentials with a client secret, read from `secret` at each token request.
    pub fn client_secret(
        tenant_id: &str,
        client_id: &str,
        secret: SecretValue,
        authority_host: Option<&Url>,
    ) -> Result<Self, CredentialError> {
        let token_url = token_url(tenant_id, authority_host)?;
        check_client_id(client_id)?;
        Ok(Self::from_source(Source::ClientSecret {
            token_url,
            client_id: client_id.to_owned(),
            secret,
        }))
    }

    /// Client credentials with a certificate: `certificate` holds a PEM with the certificate
    /// (the first `CERTIFICATE` block) and its RSA private key (`PRIVATE KEY` or
    /// `RSA PRIVATE KEY`), read at each token request. The PEM is checked now.
    pub fn certificate(
        tenant_id: &str,
        client_id: &str,
        certificate: SecretValue,
        authority_host: Option<&Url>,
    ) -> Result<Self, CredentialError> {
        let token_url = token_url(tenant_id, authority_host)?;
        check_client_id(client_id)?;
        SigningCertificate::parse(certificate.current().expose())?;
        Ok(Self::from_source(Source::Certificate {
            token_url,
            client_id: client_id.to_owned(),
            certificate,
        }))
    }

    /// A managed identity (`client_id` of a user-assigned one, or the system-assigned one).
    pub fn managed_identity(
        client_id: Option<&str>,
        endpoint: ManagedIdentityEndpoint,
    ) -> Result<Self, CredentialError> {
        if let Some(client_id) = client_id {
            check_client_id(client_id)?;
        }
        Ok(Self::from_source(Source::ManagedIdentity {
            endpoint,
            client_id: client_id.map(str::to_owned),
        }))
    }

    /// The credential an [`EntraIdentity`] describes, its secret read through `secrets`. The
    /// error starts with the field name (`secret: …`, `tenant_id: …`).
    pub fn from_identity(identity: &EntraIdentity, secrets: &SecretStore) -> Result<Self, String> {
        // Config errors start with their field already; certificate errors belong to `certificate`.
        let field = |error: CredentialError| match error {
            CredentialError::Certificate(_) => format!("certificate: {error}"),
            other => other.to_string(),
        };
        match identity {
            EntraIdentity::EntraClientSecret {
                tenant_id,
                client_id,
                secret,
                authority_host,
            } => {
                let secret = secrets
                    .resolve(secret)
                    .map_err(|error| format!("secret: {error}"))?;
                Self::client_secret(tenant_id, client_id, secret, authority_host.as_ref())
                    .map_err(field)
            }
            EntraIdentity::EntraCertificate {
                tenant_id,
                client_id,
                certificate,
                authority_host,
            } => {
                let certificate = secrets
                    .resolve(certificate)
                    .map_err(|error| format!("certificate: {error}"))?;
                Self::certificate(tenant_id, client_id, certificate, authority_host.as_ref())
                    .map_err(field)
            }
            EntraIdentity::ManagedIdentity {
                client_id,
                endpoint,
            } => {
                if let Some(url) = endpoint {
                    check_http_url(url, false).map_err(|e| format!("endpoint: {e}"))?;
                }
                let source = ManagedIdentityEndpoint::from_environment(endpoint.as_ref())
                    .map_err(|error| format!("endpoint: {error}"))?;
                Self::managed_identity(client_id.as_deref(), source).map_err(field)
            }
        }
    }

    fn from_source(source: Source) -> Self {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            // A redirect could carry the secret or the assertion elsewhere.
            .redirect(reqwest::redirect::Policy::none());
        if matches!(source, Source::ManagedIdentity { .. }) {
            // The metadata endpoint is link-local or local: never through a proxy.
            builder = builder.no_proxy();
        }
        let http = builder.build().unwrap_or_else(|_| reqwest::Client::new());
        TokenCredential {
            inner: Arc::new(Inner {
                source,
                http,
                slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Checks that the credential can be used as configured now (the certificate PEM parses).
    pub fn check(&self) -> Result<(), CredentialError> {
        if let Source::Certificate { certificate, .. } = &self.inner.source {
            SigningCertificate::parse(certificate.current().expose())?;
        }
        Ok(())
    }

    /// A bearer token for `scope` (e.g. [`COGNITIVE_SERVICES_SCOPE`], [`GRAPH_SCOPE`]), cached.
    pub async fn token(&self, scope: &str) -> Result<Secret<String>, CredentialError> {
        Ok(self.access_token(scope).await?.token)
    }

    /// A bearer token for `scope` from the tenant `tenant` (a GUID): for a multi-tenant app
    /// registration, a token of another directory that has consented to it (Microsoft Graph
    /// answers about the directory its token is from). A client secret or certificate asks
    /// `{authority}/{tenant}/oauth2/v2.0/token`; a managed identity belongs to one tenant and
    /// always gets its own tenant's token. Cached per tenant and scope.
    pub async fn token_in_tenant(
        &self,
        scope: &str,
        tenant: &str,
    ) -> Result<Secret<String>, CredentialError> {
        match self.token_url_in(tenant)? {
            Some(url) => Ok(self
                .cached_token(&format!("tenant {tenant} {scope}"), scope, Some(url))
                .await?
                .token),
            None => self.token(scope).await,
        }
    }

    /// The token endpoint of `tenant` when it is not the credential's own and the credential
    /// can ask another tenant; `None` to use the credential's own.
    fn token_url_in(&self, tenant: &str) -> Result<Option<Url>, CredentialError> {
        let (Source::ClientSecret { token_url, .. } | Source::Certificate { token_url, .. }) =
            &self.inner.source
        else {
            return Ok(None);
        };
        if uuid::Uuid::try_parse(tenant).is_err() {
            return Err(CredentialError::Config(format!(
                "tenant `{tenant}`: must be a tenant id (GUID)"
            )));
        }
        // `{authority path}/{tenant}/oauth2/v2.0/token`: the tenant is the fourth segment from
        // the end.
        let segments: Vec<&str> = token_url.path_segments().into_iter().flatten().collect();
        let Some(own) = segments.len().checked_sub(4).map(|i| segments[i]) else {
            return Ok(None);
        };
        if own.eq_ignore_ascii_case(tenant) {
            return Ok(None);
        }
        let mut url = token_url.clone();
        url.path_segments_mut()
            .map_err(|()| CredentialError::Config("authority_host: not a base URL".to_owned()))?
            .pop()
            .pop()
            .pop()
            .pop()
            .extend([tenant, "oauth2", "v2.0", "token"]);
        Ok(Some(url))
    }

    /// Like [`TokenCredential::token`], with the token's expiry.
    pub async fn access_token(&self, scope: &str) -> Result<AccessToken, CredentialError> {
        self.cached_token(scope, scope, None).await
    }

    /// The token of the cache slot `key`, for `scope`, from `token_url` instead of the
    /// credential's own endpoint when given; refreshed single-flight.
    async fn cached_token(
        &self,
        key: &str,
        scope: &str,
        token_url: Option<Url>,
    ) -> Result<AccessToken, CredentialError> {
        let now = Instant::now();
        let pending = {
            let mut slots = self.slots();
            let slot = slots.entry(key.to_owned()).or_default();
            if let Some(cached) = &slot.token
                && now < cached.refresh_at
            {
                return Ok(public(cached));
            }
            if let Some(cached) = slot
                .token
                .as_ref()
                .filter(|cached| now < cached.usable_until)
            {
                // Due for refresh but still valid: it serves while the refresh runs on its own
                // (a slow or unreachable token endpoint delays no call), and after a failed
                // refresh the next waits `REFRESH_RETRY` (no request per call).
                let token = public(cached);
                if slot.inflight.is_none() && slot.retry_at.is_none_or(|at| now >= at) {
                    let pending = self
                        .refresh(key.to_owned(), scope.to_owned(), token_url)
                        .boxed()
                        .shared();
                    slot.inflight = Some(pending.clone());
                    tokio::spawn(pending);
                }
                return Ok(token);
            }
            match &slot.inflight {
                Some(pending) => pending.clone(),
                None => {
                    let pending = self
                        .refresh(key.to_owned(), scope.to_owned(), token_url)
                        .boxed()
                        .shared();
                    slot.inflight = Some(pending.clone());
                    pending
                }
            }
        };
        pending.await.map(|fresh| public(&fresh))
    }

    /// Drops the cached token for `scope` (e.g. after the resource answered 401 to it), so that
    /// the next call fetches a new one.
    pub fn forget(&self, scope: &str) {
        if let Some(slot) = self.slots().get_mut(scope) {
            slot.token = None;
        }
    }

    /// Drops the cached token for `scope` after a resource refused it (401), unless it was
    /// obtained within [`REFUSED_TOKEN_KEPT`]: a token that new was not revoked or expired, the
    /// identity lacks a permission (Azure answers 401 `PermissionDenied` to an operation its role
    /// does not allow), and dropping it on every such answer would fetch a token per call, until
    /// the token endpoint throttles the gateway and every call fails.
    pub fn forget_refused(&self, scope: &str) {
        if let Some(slot) = self.slots().get_mut(scope)
            && slot
                .token
                .as_ref()
                .is_some_and(|cached| cached.obtained_at.elapsed() >= REFUSED_TOKEN_KEPT)
        {
            slot.token = None;
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The one request for `scope` into the slot `key`; stores its outcome for every waiter.
    fn refresh(
        &self,
        key: String,
        scope: String,
        token_url: Option<Url>,
    ) -> impl Future<Output = Result<CachedToken, CredentialError>> + Send + 'static {
        let credential = self.clone();
        async move {
            let outcome = credential.request(&scope, token_url.as_ref()).await;
            let mut slots = credential.slots();
            let slot = slots.entry(key).or_default();
            slot.inflight = None;
            match &outcome {
                Ok(token) => {
                    slot.token = Some(token.clone());
                    slot.retry_at = None;
                }
                Err(error) => {
                    slot.retry_at = Some(Instant::now() + REFRESH_RETRY);
                    if slot
                        .token
                        .as_ref()
                        .is_some_and(|cached| Instant::now() < cached.usable_until)
                    {
                        tracing::warn!(%error, scope, "token refresh failed; the current token is still valid and stays in use");
                    } else {
                        tracing::warn!(%error, scope, "no access token");
                    }
                }
            }
            outcome
        }
    }

    async fn request(
        &self,
        scope: &str,
        other_tenant: Option<&Url>,
    ) -> Result<CachedToken, CredentialError> {
        let started = Instant::now();
        let (request, endpoint) = match &self.inner.source {
            Source::ClientSecret {
                token_url,
                client_id,
                secret,
            } => {
                let token_url = other_tenant.unwrap_or(token_url);
                let secret = secret.current();
                let form = form(&[
                    ("client_id", client_id),
                    ("scope", scope),
                    ("client_secret", secret.expose()),
                    ("grant_type", "client_credentials"),
                ]);
                (self.post_form(token_url, form), endpoint_of(token_url))
            }
            Source::Certificate {
                token_url,
                client_id,
                certificate,
            } => {
                let token_url = other_tenant.unwrap_or(token_url);
                let assertion = SigningCertificate::parse(certificate.current().expose())?
                    .assertion(token_url, client_id)?;
                let form = form(&[
                    ("client_id", client_id),
                    ("scope", scope),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                    ("client_assertion", assertion.expose()),
                    ("grant_type", "client_credentials"),
                ]);
                (self.post_form(token_url, form), endpoint_of(token_url))
            }
            Source::ManagedIdentity {
                endpoint,
                client_id,
            } => {
                let resource = scope.strip_suffix("/.default").unwrap_or(scope);
                let (url, api_version) = match endpoint {
                    ManagedIdentityEndpoint::Imds(url) => (url, IMDS_API_VERSION),
                    ManagedIdentityEndpoint::AppService { endpoint, .. } => {
                        (endpoint, APP_SERVICE_API_VERSION)
                    }
                };
                let mut url = url.clone();
                {
                    let mut query = url.query_pairs_mut();
                    query
                        .append_pair("api-version", api_version)
                        .append_pair("resource", resource);
                    if let Some(client_id) = client_id {
                        query.append_pair("client_id", client_id);
                    }
                }
                let request = self.inner.http.get(url.clone());
                let request = match endpoint {
                    ManagedIdentityEndpoint::Imds(_) => request.header("Metadata", "true"),
                    ManagedIdentityEndpoint::AppService { header, .. } => {
                        request.header("X-IDENTITY-HEADER", header.expose().as_str())
                    }
                };
                (request, endpoint_of(&url))
            }
        };
        let response = request
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|error| CredentialError::Unreachable {
                endpoint: endpoint.clone(),
                reason: transport_reason(&error),
            })?;
        let status = response.status();
        let body = read_limited(response)
            .await
            .map_err(|reason| CredentialError::Unreachable {
                endpoint: endpoint.clone(),
                reason,
            })?;
        if !status.is_success() {
            return Err(CredentialError::Refused {
                endpoint,
                status: status.as_u16(),
                code: error_code(&body),
            });
        }
        let malformed = || CredentialError::Malformed {
            endpoint: endpoint.clone(),
        };
        // Parsed as a `Value` so that no parse error can quote the token back.
        let answer: Value = serde_json::from_slice(&body).map_err(|_| malformed())?;
        let token = answer
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|token| !token.is_empty())
            .ok_or_else(malformed)?;
        let lifetime = lifetime(&answer).ok_or_else(malformed)?;
        Ok(cached_token(
            Secret::new(token.to_owned()),
            started,
            lifetime,
        ))
    }

    fn post_form(&self, url: &Url, form: String) -> reqwest::RequestBuilder {
        self.inner
            .http
            .post(url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
    }
}

fn public(cached: &CachedToken) -> AccessToken {
    AccessToken {
        token: cached.token.clone(),
        expires_at: cached.expires_at,
    }
}

/// When to refresh and until when to fall back to a token that lives `lifetime` from `started`.
fn cached_token(token: Secret<String>, started: Instant, lifetime: Duration) -> CachedToken {
    let refresh_after = if lifetime >= 2 * EARLY_REFRESH {
        lifetime - EARLY_REFRESH
    } else {
        lifetime / 2
    };
    let margin = (lifetime / 4).min(Duration::from_secs(60));
    CachedToken {
        token,
        obtained_at: started,
        refresh_at: started + refresh_after,
        usable_until: started + lifetime.saturating_sub(margin),
        expires_at: started + lifetime,
    }
}

/// The longest a token is taken to live, whatever its endpoint says: Entra's access tokens live
/// 60 to 90 minutes, a managed identity's up to 24 hours. (A larger `expires_in` would also
/// overflow the clock's arithmetic.)
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The token's lifetime from `expires_in` (seconds; a number, or a string from IMDS) or else
/// `expires_on` (Unix seconds, App Service), at most [`MAX_TOKEN_LIFETIME`].
fn lifetime(answer: &Value) -> Option<Duration> {
    let seconds = |value: &Value| match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    let lifetime = match answer.get("expires_in").and_then(seconds) {
        Some(expires_in) => Duration::from_secs(expires_in),
        None => {
            let expires_on = answer.get("expires_on").and_then(seconds)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
            Duration::from_secs(expires_on.saturating_sub(now))
        }
    };
    Some(lifetime.min(MAX_TOKEN_LIFETIME))
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| transport_reason(&error))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err("the answer is too large".to_owned());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The transport failure, without the URL (which the error names separately).
fn transport_reason(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut reason = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// `invalid_client (AADSTS7000215)` from an OAuth error body; only the short codes, never the
/// free text (which could quote what was sent).
fn error_code(body: &[u8]) -> String {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return "no OAuth error in the answer".to_owned();
    };
    let code = answer
        .get("error")
        .and_then(Value::as_str)
        .filter(|code| {
            code.len() <= 64
                && code
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        })
        .unwrap_or("unknown_error");
    let number = answer
        .get("error_codes")
        .and_then(Value::as_array)
        .and_then(|codes| codes.first())
        .and_then(Value::as_u64)
        .or_else(|| {
            let description = answer.get("error_description")?.as_str()?;
            let digits: String = description
                .strip_prefix("AADSTS")?
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        });
    match number {
        Some(number) => format!("{code} (AADSTS{number})"),
        None => code.to_owned(),
    }
}

fn endpoint_of(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// `{authority}/{tenant}/oauth2/v2.0/token`, built from segments.
fn token_url(tenant_id: &str, authority_host: Option<&Url>) -> Result<Url, CredentialError> {
    let tenant_ok = !tenant_id.is_empty()
        && tenant_id.len() <= 256
        && tenant_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !tenant_ok {
        return Err(CredentialError::Config(
            "tenant_id: must be a tenant id (GUID) or domain".to_owned(),
        ));
    }
    let mut url = match authority_host {
        Some(url) => {
            check_http_url(url, true)
                .map_err(|e| CredentialError::Config(format!("authority_host: {e}")))?;
            url.clone()
        }
        None => Url::parse(DEFAULT_AUTHORITY_HOST)
            .map_err(|e| CredentialError::Config(format!("authority_host: {e}")))?,
    };
    url.path_segments_mut()
        .map_err(|()| CredentialError::Config("authority_host: not a base URL".to_owned()))?
        .pop_if_empty()
        .extend([tenant_id, "oauth2", "v2.0", "token"]);
    Ok(url)
}

/// An `https` URL (or `http` on loopback when `https_unless_loopback`; any `http(s)` otherwise),
/// without credentials, query or fragment.
fn check_http_url(url: &Url, https_unless_loopback: bool) -> Result<(), String> {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback || !https_unless_loopback => {}
        _ => {
            return Err(if https_unless_loopback {
                "must be an https URL (http only on loopback)".to_owned()
            } else {
                "must be an http or https URL".to_owned()
            });
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not carry a query or fragment".to_owned());
    }
    Ok(())
}

fn check_client_id(client_id: &str) -> Result<(), CredentialError> {
    let ok = !client_id.is_empty()
        && client_id.len() <= 256
        && client_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(CredentialError::Config(
            "client_id: must be an application (client) id".to_owned(),
        ))
    }
}

/// A certificate and its RSA key, ready to sign client assertions.
struct SigningCertificate {
    thumbprint_sha256: String,
    key: jsonwebtoken::EncodingKey,
}

impl SigningCertificate {
    fn parse(pem_text: &str) -> Result<Self, CredentialError> {
        let blocks = pem::parse_many(pem_text.as_bytes()).map_err(|_| {
            CredentialError::Certificate("the certificate secret is not PEM".to_owned())
        })?;
        let certificate = blocks
            .iter()
            .find(|block| block.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                CredentialError::Certificate("the PEM holds no CERTIFICATE block".to_owned())
            })?;
        let key_block = blocks
            .iter()
            .find(|block| matches!(block.tag(), "PRIVATE KEY" | "RSA PRIVATE KEY"))
            .ok_or_else(|| {
                CredentialError::Certificate(
                    "the PEM holds no unencrypted PRIVATE KEY or RSA PRIVATE KEY block".to_owned(),
                )
            })?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem::encode(key_block).as_bytes())
            .map_err(|_| {
                CredentialError::Certificate("the private key is not an RSA key".to_owned())
            })?;
        Ok(SigningCertificate {
            thumbprint_sha256: URL_SAFE_NO_PAD.encode(Sha256::digest(certificate.contents())),
            key,
        })
    }

    /// The signed client assertion for `token_url`.
    fn assertion(
        &self,
        token_url: &Url,
        client_id: &str,
    ) -> Result<Secret<String>, CredentialError> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.typ = Some("JWT".to_owned());
        header.x5t_s256 = Some(self.thumbprint_sha256.clone());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| CredentialError::Certificate("the clock is before 1970".to_owned()))?
            .as_secs();
        let claims = serde_json::json!({
            "aud": token_url.as_str(),
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(Secret::new)
            .map_err(|_| CredentialError::Certificate("signing the assertion failed".to_owned()))
    }
}

/// Token credentials by identity, kept across snapshots so that a new snapshot does not throw the
/// cached tokens away.
#[derive(Debug, Default)]
pub struct CredentialRegistry {
    credentials: Mutex<HashMap<EntraIdentity, TokenCredential>>,
}

impl CredentialRegistry {
    /// The credential of `identity`, built on first use; its secret is resolved (and checked)
    /// again each time. The error starts with the field name.
    pub fn get_or_build(
        &self,
        identity: &EntraIdentity,
        secrets: &SecretStore,
    ) -> Result<TokenCredential, String> {
        let existing = self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .cloned();
        let Some(credential) = existing else {
            let credential = TokenCredential::from_identity(identity, secrets)?;
            self.credentials
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(identity.clone(), credential.clone());
            return Ok(credential);
        };
        if let Some((field, reference)) = identity.secret_ref() {
            // env:/file: are read again (the shared holder follows); Key Vault must be fetched.
            secrets
                .resolve(reference)
                .map_err(|error| format!("{field}: {error}"))?;
        }
        credential
            .check()
            .map_err(|error| match identity.secret_ref() {
                Some((field, _)) => format!("{field}: {error}"),
                None => error.to_string(),
            })?;
        Ok(credential)
    }

    /// Forgets the credentials of identities `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&EntraIdentity) -> bool) {
        self.credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|identity, _| keep(identity));
    }
}

/// Whether a reference is read from Key Vault (the gateway's own credential may not be).
pub fn is_key_vault(reference: &gatehouse_schema::config::SecretRef) -> bool {
    matches!(reference.source(), SecretSource::KeyVault(_))
}

/// The gateway's identity signs the Azure Monitor audit sink in when its settings name no
/// credential of their own (`server.audit.azure_monitor`).
impl gatehouse_audit::azure_monitor::IdentityTokenSource for TokenCredential {
    fn token<'a>(
        &'a self,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<IssuedToken, IdentityTokenError>> {
        Box::pin(async move {
            match self.access_token(scope).await {
                Ok(token) => Ok(IssuedToken {
                    token: token.token.expose().clone(),
                    valid_for: token.expires_at.saturating_duration_since(Instant::now()),
                }),
                Err(error) => Err(IdentityTokenError {
                    // Out of reach or a garbled answer may pass; a refusal or a credential that
                    // cannot work will not.
                    refused: !matches!(
                        error,
                        CredentialError::Unreachable { .. } | CredentialError::Malformed { .. }
                    ),
                    message: error.to_string(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_of_another_tenant_comes_from_that_tenants_endpoint() {
        const OWN: &str = "11111111-1111-1111-1111-111111111111";
        const OTHER: &str = "22222222-2222-2222-2222-222222222222";
        let authority = Url::parse("https://login.example/sovereign/").unwrap();
        let credential = TokenCredential::client_secret(
            OWN,
            "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            SecretValue::new(Secret::new("s".into())),
            Some(&authority),
        )
        .unwrap();
        assert_eq!(
            credential.token_url_in(OTHER).unwrap().unwrap().as_str(),
            format!("https://login.example/sovereign/{OTHER}/oauth2/v2.0/token")
        );
        assert!(credential.token_url_in(OWN).unwrap().is_none());
        assert!(
            credential
                .token_url_in(&OWN.to_uppercase())
                .unwrap()
                .is_none()
        );
        assert!(credential.token_url_in("../evil").is_err());
        let imds = Url::parse("http://169.254.169.254/metadata/identity/oauth2/token").unwrap();
        let managed =
            TokenCredential::managed_identity(None, ManagedIdentityEndpoint::Imds(imds)).unwrap();
        assert!(managed.token_url_in(OTHER).unwrap().is_none());
    }

    #[test]
    fn early_refresh_for_long_tokens_and_half_life_for_short_ones() {
        let now = Instant::now();
        let long = cached_token(Secret::new("t".into()), now, Duration::from_secs(3600));
        assert_eq!(long.refresh_at - now, Duration::from_secs(3300));
        let short = cached_token(Secret::new("t".into()), now, Duration::from_secs(120));
        assert_eq!(short.refresh_at - now, Duration::from_secs(60));
        assert!(short.usable_until > short.refresh_at && short.usable_until < short.expires_at);
    }

    #[test]
    fn lifetimes_come_as_numbers_or_strings() {
        let json = |v: Value| lifetime(&v);
        assert_eq!(
            json(serde_json::json!({"expires_in": 3599})),
            Some(Duration::from_secs(3599))
        );
        assert_eq!(
            json(serde_json::json!({"expires_in": "86399"})),
            Some(Duration::from_secs(86399))
        );
        let on = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 100;
        let from_on = json(serde_json::json!({"expires_on": on.to_string()})).unwrap();
        assert!(from_on <= Duration::from_secs(100) && from_on >= Duration::from_secs(98));
        assert_eq!(json(serde_json::json!({})), None);
        // An absurd lifetime is capped, so that the refresh times can be computed.
        for absurd in [
            serde_json::json!({"expires_in": u64::MAX}),
            serde_json::json!({"expires_in": "18446744073709551615"}),
            serde_json::json!({"expires_on": u64::MAX}),
        ] {
            let capped = json(absurd).unwrap();
            assert_eq!(capped, MAX_TOKEN_LIFETIME);
            let cached = cached_token(Secret::new("t".into()), Instant::now(), capped);
            assert!(cached.expires_at > cached.refresh_at);
        }
    }

    #[test]
    fn error_codes_keep_only_the_codes() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. secret=hunter2","error_codes":[7000215]}"#;
        assert_eq!(error_code(body), "invalid_client (AADSTS7000215)");
        let body =
            br#"{"error":"invalid_request","error_description":"AADSTS90002: Tenant not found."}"#;
        assert_eq!(error_code(body), "invalid_request (AADSTS90002)");
        assert_eq!(error_code(br#"{"error":"x y z"}"#), "unknown_error");
        assert_eq!(error_code(b"<html>"), "no OAuth error in the answer");
    }

    #[test]
    fn token_urls_are_built_from_segments_and_checked() {
        let url = token_url("contoso.onmicrosoft.com", None).unwrap();
        assert_eq!(
            url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let local = Url::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(
            token_url("t", Some(&local)).unwrap().as_str(),
            "http://127.0.0.1:9/t/oauth2/v2.0/token"
        );
        let plain = Url::parse("http://login.example/").unwrap();
        assert!(token_url("t", Some(&plain)).is_err());
        assert!(token_url("../x", None).is_err());
    }

    #[test]
    fn a_pem_without_key_or_certificate_is_refused() {
        assert!(matches!(
            SigningCertificate::parse("not pem"),
            Err(CredentialError::Certificate(_))
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let only_ec = format!(
            "{}{}",
            rcgen::CertificateParams::new(vec!["x".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap()
                .pem(),
            key.serialize_pem()
        );
        let error = SigningCertificate::parse(&only_ec)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("not an RSA key"), "{error}");
    }
}
