//! The configuration snapshot a gateway runs on.
//!
//! A snapshot is immutable and versioned: the portal (or an operator with a YAML file) builds a
//! whole one, the gateway validates it whole and swaps it in atomically. Secrets never travel in a
//! snapshot: subscription keys appear only as SHA-256 hashes, backend credentials only as
//! [`SecretRef`]s that the gateway resolves itself.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

use crate::identity::{AccessRule, IdentityPolicy};

/// One complete, versioned gateway configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSnapshot {
    /// Monotonic version; a gateway refuses a snapshot that is not newer than the one it runs.
    pub version: u64,
    /// Client subscriptions and their key hashes.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Backend pools, each serving one or more deployments.
    #[serde(default)]
    pub pools: Vec<BackendPool>,
    /// Which request and response content is captured into the audit record.
    #[serde(default)]
    pub capture: CapturePolicy,
    /// Client addresses of proxies whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Request body size above which the gateway answers 413 (bytes).
    #[serde(default = "default_max_request_body")]
    pub max_request_body_bytes: u64,
    /// Which credentials callers present and how Entra ID tokens are validated.
    #[serde(default)]
    pub identity: IdentityPolicy,
    /// Who may call which deployments. Absent: every authenticated caller may call every
    /// deployment (a single-team set-up); present, even empty: everything not granted is denied.
    #[serde(default)]
    pub access_rules: Option<Vec<AccessRule>>,
    /// Requests and tokens per minute and token quotas, per subscription, user or group.
    #[serde(default)]
    pub limits: Vec<crate::limits::LimitRule>,
}

fn default_max_request_body() -> u64 {
    // Azure OpenAI accepts audio uploads up to 25 MB; a little headroom for multipart framing.
    26 * 1024 * 1024
}

/// A client subscription: who holds a pair of keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Stable id, recorded as `ApimSubscriptionId`.
    pub id: String,
    /// Human-readable name.
    #[serde(default)]
    pub display_name: String,
    /// Product (team, group) the subscription belongs to, recorded as `ProductId`.
    #[serde(default)]
    pub product: Option<String>,
    /// SHA-256 of the primary key, as [`KeyHash`].
    pub primary_key_hash: KeyHash,
    /// SHA-256 of the secondary key, if one is issued.
    #[serde(default)]
    pub secondary_key_hash: Option<KeyHash>,
    /// After this instant the secondary key is refused, the primary still accepted: the end of
    /// a rotation's overlap, enforced by the gateway itself so that it holds without a newer
    /// snapshot. Absent: the secondary is accepted as long as it is issued. Left out of the
    /// JSON when absent, so snapshots without one read the same as before it existed.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub secondary_expires_at: Option<OffsetDateTime>,
    /// Whether the subscription may be used.
    #[serde(default)]
    pub state: SubscriptionState,
    /// After this instant the keys are refused.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// The lifecycle state of a subscription (APIM's states, without the approval workflow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Keys are accepted.
    #[default]
    Active,
    /// Temporarily refused.
    Suspended,
    /// Permanently refused.
    Revoked,
}

/// A SHA-256 digest of a subscription key, written `sha256:<64 hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// The textual prefix of every key hash.
    pub const PREFIX: &'static str = "sha256:";
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::PREFIX)?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for KeyHash {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        let hex = text
            .strip_prefix(Self::PREFIX)
            .ok_or_else(|| format!("a key hash starts with `{}`", Self::PREFIX))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a key hash has 64 hexadecimal digits after `sha256:`".to_owned());
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| "a key hash has 64 hexadecimal digits after `sha256:`".to_owned())?;
        }
        Ok(KeyHash(digest))
    }
}

impl From<KeyHash> for String {
    fn from(hash: KeyHash) -> Self {
        hash.to_string()
    }
}

/// A pool of backend members serving a set of deployments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendPool {
    /// Stable id of the pool.
    pub id: String,
    /// Deployment (model) names clients use that this pool serves. `*` serves any name no other
    /// pool claims.
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Whether this pool also serves calls that name no deployment (files, batches, assistants, …).
    #[serde(default)]
    pub serves_resources: bool,
    /// The members, tried by priority then weight.
    pub members: Vec<PoolMember>,
}

/// One backend instance in a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    /// Stable id, recorded as `BackendId`; stateful objects stick to it.
    pub id: String,
    /// Which wire dialect the member speaks.
    #[serde(default)]
    pub kind: BackendKind,
    /// Base URL: `https://{resource}.openai.azure.com` for Azure, `https://host/v1` for OpenAI.
    pub endpoint: Url,
    /// Deployment (Azure) or model (OpenAI) name to use on this member instead of the client's.
    #[serde(default)]
    pub deployment: Option<String>,
    /// `api-version` sent to an Azure member when the client's route carries none.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Whether the gateway asks this member's streamed chat and completions for their usage
    /// chunk (`stream_options.include_usage`) when the client did not, and keeps the chunk from
    /// the client (default true; Azure classic routes are asked only from api-version
    /// `2024-09-01-preview` on). `false` for an OpenAI-compatible server that refuses the
    /// parameter: the tokens of its streams are then counted with the tokenizer, flagged
    /// estimated. Left out when true, so that a snapshot of members that keep the default reads
    /// the same to a gateway of an earlier release (which refuses fields it does not know).
    #[serde(
        default = "default_stream_usage",
        skip_serializing_if = "is_default_stream_usage"
    )]
    pub stream_usage: bool,
    /// Lower number = tried first.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// Relative share of traffic inside a priority group.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// How the gateway authenticates to this member.
    #[serde(default)]
    pub credential: BackendCredential,
    /// Transport settings (private CA, client certificate, timeouts).
    #[serde(default)]
    pub tls: BackendTls,
    /// Connect timeout in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long the gateway waits for the member's answer to begin (its status line and headers)
    /// once the call is sent, in milliseconds; default 300,000 (five minutes, API Management's
    /// `forward-request` default). A member that does not answer in time is set aside like one
    /// that fails, and the call goes to the next member, since nothing has reached the client yet.
    /// A stream that has begun is not cut by it.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// The longest the gateway waits for the next bytes of an answer that has begun (between the
    /// chunks of a stream, or inside a body), in milliseconds; default 300,000. When the member
    /// stays silent longer, the answer is cut: the client sees it broken, never complete, and the
    /// call's record says `response_idle_timeout`. It counts only while the gateway waits on the
    /// member, not while a slow client reads.
    #[serde(default = "default_response_idle_timeout_ms")]
    pub response_idle_timeout_ms: u64,
}

fn default_stream_usage() -> bool {
    true
}

// serde's `skip_serializing_if` passes the field by reference.
#[expect(clippy::trivially_copy_pass_by_ref, reason = "serde's signature")]
fn is_default_stream_usage(stream_usage: &bool) -> bool {
    *stream_usage
}

fn default_priority() -> u32 {
    1
}

fn default_weight() -> u32 {
    1
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

fn default_response_timeout_ms() -> u64 {
    300_000
}

fn default_response_idle_timeout_ms() -> u64 {
    300_000
}

/// The wire dialect of a backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Azure OpenAI: `/openai/deployments/{d}/…?api-version=` and `/openai/v1/…`, `api-key` header.
    #[default]
    AzureOpenai,
    /// OpenAI or an OpenAI-compatible server: `{endpoint}/chat/completions`, model in the body,
    /// `Authorization: Bearer`.
    Openai,
}

/// The scope of an access token for Azure OpenAI (Azure AI services): `azure-specs.md` §1.3.
pub const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// The Microsoft Entra ID authority used when a credential names none (Azure public cloud).
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// How the gateway authenticates to a backend member.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendCredential {
    /// No credential (a local simulator).
    #[default]
    None,
    /// A key sent as `api-key` (Azure) or `Authorization: Bearer` (OpenAI).
    ApiKey {
        /// Where the key is read from.
        secret: SecretRef,
    },
    /// A Microsoft Entra ID access token obtained with the client-credentials grant and a client
    /// secret, sent as `Authorization: Bearer` (no `api-key`).
    EntraClientSecret {
        /// Directory (tenant) id or domain of the app registration.
        tenant_id: String,
        /// Application (client) id of the app registration.
        client_id: String,
        /// Where the client secret is read from.
        secret: SecretRef,
        /// Entra authority; default `https://login.microsoftonline.com`.
        #[serde(default)]
        authority_host: Option<Url>,
        /// Token scope; default `https://cognitiveservices.azure.com/.default`.
        #[serde(default)]
        scope: Option<String>,
    },
    /// A Microsoft Entra ID access token obtained with the client-credentials grant and a
    /// certificate (a signed client assertion), sent as `Authorization: Bearer`.
    EntraCertificate {
        /// Directory (tenant) id or domain of the app registration.
        tenant_id: String,
        /// Application (client) id of the app registration.
        client_id: String,
        /// Where a PEM holding the certificate and its RSA private key is read from.
        certificate: SecretRef,
        /// Entra authority; default `https://login.microsoftonline.com`.
        #[serde(default)]
        authority_host: Option<Url>,
        /// Token scope; default `https://cognitiveservices.azure.com/.default`.
        #[serde(default)]
        scope: Option<String>,
    },
    /// An access token from the Azure managed identity of the machine (IMDS) or of the App
    /// Service / Container Apps environment, sent as `Authorization: Bearer`.
    ManagedIdentity {
        /// Client id of a user-assigned identity; absent: the system-assigned identity.
        #[serde(default)]
        client_id: Option<String>,
        /// Token endpoint speaking the IMDS protocol, instead of
        /// `http://169.254.169.254/metadata/identity/oauth2/token` (or the App Service endpoint
        /// named by `IDENTITY_ENDPOINT`).
        #[serde(default)]
        endpoint: Option<Url>,
        /// Token scope; default `https://cognitiveservices.azure.com/.default`.
        #[serde(default)]
        scope: Option<String>,
    },
}

impl BackendCredential {
    /// The Entra identity and the token scope, for the variants that use an access token.
    pub fn entra(&self) -> Option<(EntraIdentity, &str)> {
        let (identity, scope) = match self {
            BackendCredential::None | BackendCredential::ApiKey { .. } => return None,
            BackendCredential::EntraClientSecret {
                tenant_id,
                client_id,
                secret,
                authority_host,
                scope,
            } => (
                EntraIdentity::EntraClientSecret {
                    tenant_id: tenant_id.clone(),
                    client_id: client_id.clone(),
                    secret: secret.clone(),
                    authority_host: authority_host.clone(),
                },
                scope,
            ),
            BackendCredential::EntraCertificate {
                tenant_id,
                client_id,
                certificate,
                authority_host,
                scope,
            } => (
                EntraIdentity::EntraCertificate {
                    tenant_id: tenant_id.clone(),
                    client_id: client_id.clone(),
                    certificate: certificate.clone(),
                    authority_host: authority_host.clone(),
                },
                scope,
            ),
            BackendCredential::ManagedIdentity {
                client_id,
                endpoint,
                scope,
            } => (
                EntraIdentity::ManagedIdentity {
                    client_id: client_id.clone(),
                    endpoint: endpoint.clone(),
                },
                scope,
            ),
        };
        Some((
            identity,
            scope.as_deref().unwrap_or(COGNITIVE_SERVICES_SCOPE),
        ))
    }

    /// The secret references the credential reads, with their field names.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretRef)> {
        match self {
            BackendCredential::None | BackendCredential::ManagedIdentity { .. } => Vec::new(),
            BackendCredential::ApiKey { secret }
            | BackendCredential::EntraClientSecret { secret, .. } => vec![("secret", secret)],
            BackendCredential::EntraCertificate { certificate, .. } => {
                vec![("certificate", certificate)]
            }
        }
    }
}

/// A Microsoft Entra ID identity that obtains access tokens: the gateway's own (for Key Vault,
/// in the process settings) or a backend member's (inside [`BackendCredential`]). The variants and
/// field names are those of [`BackendCredential`], without `scope`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EntraIdentity {
    /// Client credentials with a client secret.
    EntraClientSecret {
        /// Directory (tenant) id or domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// Where the client secret is read from.
        secret: SecretRef,
        /// Entra authority; default `https://login.microsoftonline.com`.
        #[serde(default)]
        authority_host: Option<Url>,
    },
    /// Client credentials with a certificate (signed client assertion).
    EntraCertificate {
        /// Directory (tenant) id or domain.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// Where a PEM holding the certificate and its RSA private key is read from.
        certificate: SecretRef,
        /// Entra authority; default `https://login.microsoftonline.com`.
        #[serde(default)]
        authority_host: Option<Url>,
    },
    /// The Azure managed identity of the machine or of the App Service / Container Apps
    /// environment.
    ManagedIdentity {
        /// Client id of a user-assigned identity; absent: the system-assigned identity.
        #[serde(default)]
        client_id: Option<String>,
        /// Token endpoint speaking the IMDS protocol, instead of the platform's.
        #[serde(default)]
        endpoint: Option<Url>,
    },
}

impl EntraIdentity {
    /// The secret reference the identity reads, with its field name.
    pub fn secret_ref(&self) -> Option<(&'static str, &SecretRef)> {
        match self {
            EntraIdentity::EntraClientSecret { secret, .. } => Some(("secret", secret)),
            EntraIdentity::EntraCertificate { certificate, .. } => {
                Some(("certificate", certificate))
            }
            EntraIdentity::ManagedIdentity { .. } => None,
        }
    }
}

/// TLS settings for the connection to a backend member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM file with extra trusted CA certificates (a private CA), added to the system roots.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM file with a client certificate chain and its private key, for mutual TLS.
    #[serde(default)]
    pub client_identity_file: Option<String>,
}

/// A reference to a secret held outside the snapshot: `env:NAME`, `file:/path`, or an Azure Key
/// Vault secret URL `https://{vault}.vault.azure.net/secrets/{name}[/{version}]` (plain `http://`
/// and other hosts only on loopback addresses, for local test doubles).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretRef(String);

/// The DNS suffix of Azure Key Vault (public cloud).
pub const KEY_VAULT_DNS_SUFFIX: &str = ".vault.azure.net";

impl SecretRef {
    /// Where the secret lives, parsed.
    pub fn source(&self) -> SecretSource<'_> {
        if let Some(name) = self.0.strip_prefix("env:") {
            SecretSource::Env(name)
        } else if let Some(path) = self.0.strip_prefix("file:") {
            SecretSource::File(path)
        } else {
            // Constructors only admit the two prefixes above and Key Vault URLs.
            SecretSource::KeyVault(&self.0)
        }
    }

    /// The reference as written (never the secret itself).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({})", self.0)
    }
}

/// Whether `url`'s host is a loopback address or `localhost` (where local test doubles listen).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Whether `text` is a Key Vault secret URL this gateway fetches: `https`, a `*.vault.azure.net`
/// host (any host when it is a loopback address, where `http` is accepted too), the path
/// `/secrets/{name}` or `/secrets/{name}/{version}`, no credentials, query or fragment.
fn is_key_vault_url(text: &str) -> bool {
    let Ok(url) = Url::parse(text) else {
        return false;
    };
    let loopback = is_loopback(&url);
    let vault_host = url.host_str().is_some_and(|host| {
        host.len() > KEY_VAULT_DNS_SUFFIX.len()
            && host.to_ascii_lowercase().ends_with(KEY_VAULT_DNS_SUFFIX)
    });
    let scheme_ok = match url.scheme() {
        "https" => vault_host || loopback,
        "http" => loopback,
        _ => false,
    };
    if !scheme_ok
        || !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return false;
    }
    let segments: Vec<&str> = url
        .path_segments()
        .map(Iterator::collect)
        .unwrap_or_default();
    // Key Vault object names: 1–127 characters, letters, digits and dashes; versions: 32 hex
    // digits (any letters and digits accepted here).
    let name_ok = |name: &str| {
        !name.is_empty()
            && name.len() <= 127
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let version_ok = |version: &str| {
        !version.is_empty()
            && version.len() <= 64
            && version.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    match segments.as_slice() {
        ["secrets", name] => name_ok(name),
        ["secrets", name, version] => name_ok(name) && version_ok(version),
        _ => false,
    }
}

impl TryFrom<String> for SecretRef {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        // A reference is a name, a path or a URL: a control character (a NUL, which no
        // environment variable name or path holds, a line break) is never part of one.
        let ok = !text.chars().any(char::is_control)
            && match text.split_once(':') {
                Some(("env", name)) => !name.is_empty(),
                Some(("file", path)) => !path.is_empty(),
                Some(("https" | "http", _)) => is_key_vault_url(&text),
                _ => false,
            };
        if ok {
            Ok(SecretRef(text))
        } else {
            Err("a secret reference is `env:NAME`, `file:/path` or a Key Vault secret URL `https://{vault}.vault.azure.net/secrets/{name}[/{version}]`; secrets themselves never appear in configuration".to_owned())
        }
    }
}

impl From<SecretRef> for String {
    fn from(secret: SecretRef) -> Self {
        secret.0
    }
}

/// Where a [`SecretRef`] points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource<'a> {
    /// An environment variable of the gateway process.
    Env(&'a str),
    /// A file readable by the gateway process (trailing newline ignored).
    File(&'a str),
    /// An Azure Key Vault secret URL, fetched with the gateway's own Entra credential.
    KeyVault(&'a str),
}

/// What content the gateway captures into audit records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapturePolicy {
    /// Maximum bytes of the request body kept (0 = metadata only).
    #[serde(default = "default_capture_bytes")]
    pub max_request_body_bytes: usize,
    /// Maximum bytes of the response body kept (0 = metadata only).
    #[serde(default = "default_capture_bytes")]
    pub max_response_body_bytes: usize,
}

fn default_capture_bytes() -> usize {
    1024 * 1024
}

impl Default for CapturePolicy {
    fn default() -> Self {
        CapturePolicy {
            max_request_body_bytes: default_capture_bytes(),
            max_response_body_bytes: default_capture_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that keeps the default writes no `stream_usage`: a gateway of an earlier
    /// release, which refuses unknown fields, takes the portal's snapshot as before.
    #[test]
    fn stream_usage_is_written_only_when_turned_off() {
        let member: PoolMember =
            serde_json::from_value(serde_json::json!({"id": "m", "endpoint": "https://a.example"}))
                .unwrap();
        assert!(member.stream_usage);
        let written = serde_json::to_value(&member).unwrap();
        assert!(written.get("stream_usage").is_none(), "{written}");
        let off = PoolMember {
            stream_usage: false,
            ..member
        };
        assert_eq!(serde_json::to_value(&off).unwrap()["stream_usage"], false);
    }

    #[test]
    fn key_hash_round_trips_and_rejects_garbage() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let hash = KeyHash::try_from(text.clone()).unwrap();
        assert_eq!(hash.to_string(), text);
        assert!(KeyHash::try_from("sha256:xyz".to_owned()).is_err());
        assert!(KeyHash::try_from("ab".repeat(32)).is_err());
    }

    #[test]
    fn secret_refs_admit_only_env_and_file() {
        assert_eq!(
            SecretRef::try_from("env:KEY".to_owned()).unwrap().source(),
            SecretSource::Env("KEY")
        );
        assert_eq!(
            SecretRef::try_from("file:/run/key".to_owned())
                .unwrap()
                .source(),
            SecretSource::File("/run/key")
        );
        let err = SecretRef::try_from("sk-live-abc".to_owned()).unwrap_err();
        assert!(
            !err.contains("sk-live-abc"),
            "the error must not echo a secret"
        );
        assert!(SecretRef::try_from("env:".to_owned()).is_err());
    }

    #[test]
    fn secret_refs_admit_key_vault_urls_only_on_key_vault_or_loopback_hosts() {
        for good in [
            "https://my-vault.vault.azure.net/secrets/aoai-key",
            "https://my-vault.vault.azure.net/secrets/aoai-key/0123456789abcdef0123456789abcdef",
            "http://127.0.0.1:8200/secrets/k",
            "https://localhost/secrets/k",
        ] {
            let reference = SecretRef::try_from(good.to_owned()).unwrap();
            assert_eq!(reference.source(), SecretSource::KeyVault(good));
        }
        for bad in [
            "http://my-vault.vault.azure.net/secrets/k",
            "https://evil.example/secrets/k",
            "https://.vault.azure.net/secrets/k",
            "https://v.vault.azure.net/keys/k",
            "https://v.vault.azure.net/secrets/k?x=1",
            "https://v.vault.azure.net/secrets/k/v/extra",
            "https://user:pw@v.vault.azure.net/secrets/k",
            "https://v.vault.azure.net/secrets/bad_name",
            "http://10.0.0.1/secrets/k",
        ] {
            assert!(SecretRef::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }

    #[test]
    fn entra_credentials_parse_strictly() {
        let member: PoolMember = serde_json::from_value(serde_json::json!({
            "id": "m", "endpoint": "https://x.openai.azure.com",
            "credential": {"type": "entra_client_secret", "tenant_id": "t", "client_id": "c",
                           "secret": "env:S"}
        }))
        .unwrap();
        let (identity, scope) = member.credential.entra().unwrap();
        assert_eq!(scope, COGNITIVE_SERVICES_SCOPE);
        assert!(matches!(identity, EntraIdentity::EntraClientSecret { .. }));
        let unknown = serde_json::from_value::<BackendCredential>(serde_json::json!({
            "type": "managed_identity", "client_id": "c", "resource": "x"
        }));
        assert!(unknown.is_err(), "unknown fields are refused");
        let identity: EntraIdentity = serde_json::from_value(serde_json::json!({
            "type": "entra_certificate", "tenant_id": "t", "client_id": "c",
            "certificate": "https://v.vault.azure.net/secrets/cert"
        }))
        .unwrap();
        assert_eq!(
            identity.secret_ref().map(|(field, _)| field),
            Some("certificate")
        );
    }

    #[test]
    fn a_secondary_keys_end_is_optional_and_checked() {
        let hash = format!("sha256:{}", "ab".repeat(32));
        let other = format!("sha256:{}", "cd".repeat(32));
        let without: Subscription = serde_json::from_value(serde_json::json!({
            "id": "s", "primary_key_hash": hash, "secondary_key_hash": other
        }))
        .unwrap();
        assert_eq!(without.secondary_expires_at, None);
        assert!(
            !serde_json::to_string(&without)
                .unwrap()
                .contains("secondary_expires_at"),
            "a snapshot without an end serializes as before the field existed"
        );
        let with: Subscription = serde_json::from_value(serde_json::json!({
            "id": "s", "primary_key_hash": hash, "secondary_key_hash": other,
            "secondary_expires_at": "2030-01-02T03:04:05Z"
        }))
        .unwrap();
        assert_eq!(
            with.secondary_expires_at
                .map(OffsetDateTime::unix_timestamp),
            Some(1_893_553_445)
        );
        let round_trip: Subscription =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(round_trip, with);

        let mut snapshot: ConfigSnapshot = serde_json::from_str(r#"{"version": 1}"#).unwrap();
        snapshot.subscriptions.push(with);
        assert!(crate::validate::problems(&snapshot).is_empty());
        snapshot.subscriptions[0].secondary_key_hash = None;
        let problems = crate::validate::problems(&snapshot);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("subscriptions[0].secondary_expires_at")),
            "{problems:?}"
        );
    }

    #[test]
    fn minimal_snapshot_takes_defaults() {
        let snapshot: ConfigSnapshot = serde_json::from_str(r#"{"version": 3}"#).unwrap();
        assert_eq!(snapshot.version, 3);
        assert_eq!(snapshot.capture.max_request_body_bytes, 1024 * 1024);
        assert!(snapshot.pools.is_empty());
    }
}
