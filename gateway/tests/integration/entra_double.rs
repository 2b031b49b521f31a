//! A local stand-in for Microsoft Entra ID and Microsoft Graph, which this machine cannot reach.
//!
//! It speaks the documented wire formats, so the gateway's real client code is what is tested:
//! - OpenID Connect discovery per tenant, v2 (`/{tenant}/v2.0/.well-known/openid-configuration`)
//!   and v1 (`/{tenant}/.well-known/openid-configuration`), each naming a `jwks_uri`
//!   (https://learn.microsoft.com/entra/identity-platform/access-tokens, "Validate tokens");
//! - JWKS (RFC 7517) with RSA keys `kid`/`n`/`e`/`use` and Entra's `issuer` template property;
//! - Microsoft Graph `POST /v1.0/users/{id}/getMemberObjects` answering `{"value": [ids]}`
//!   (https://learn.microsoft.com/graph/api/directoryobject-getmemberobjects).
//!
//! Tokens are signed with the test-only keys in `tests/fixtures/entra/` by the `jsonwebtoken`
//! crate. The published key set can be switched mid-test (key rotation). Graph accepts only the
//! app tokens a token-endpoint double ([`crate::azure_identity_double`]) issued for the Graph
//! scope, so the gateway's real client-credentials code is what obtains them, and answers about
//! the users of the tenant the token was issued in, as Graph answers about its token's directory
//! (https://learn.microsoft.com/entra/identity-platform/howto-convert-app-to-be-multi-tenant).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// Tenants the tests use.
pub const TENANT_A: &str = "11111111-1111-1111-1111-111111111111";
pub const TENANT_B: &str = "22222222-2222-2222-2222-222222222222";
/// A tenant no policy allows.
pub const TENANT_EVIL: &str = "99999999-9999-9999-9999-999999999999";
/// The gateway's audience.
pub const AUDIENCE: &str = "api://gatehouse";
/// The client application the users sign in to (the `appid`/`azp` of their access tokens).
pub const CLIENT_APP: &str = "5e3a0000-0000-0000-0000-0000000c11e1";

/// A signing key of the double.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKey {
    A,
    B,
}

impl TestKey {
    pub fn kid(self) -> &'static str {
        match self {
            TestKey::A => "kid-a",
            TestKey::B => "kid-b",
        }
    }

    pub fn private_pem(self) -> &'static [u8] {
        match self {
            TestKey::A => include_bytes!("../fixtures/entra/test-signing-key-a.pem"),
            TestKey::B => include_bytes!("../fixtures/entra/test-signing-key-b.pem"),
        }
    }

    fn public(self) -> Value {
        let all: Value = serde_json::from_str(include_str!(
            "../fixtures/entra/test-signing-keys.public.json"
        ))
        .unwrap();
        all[match self {
            TestKey::A => "a",
            TestKey::B => "b",
        }]
        .clone()
    }
}

/// Token versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ver {
    V1,
    V2,
}

struct DoubleState {
    url: String,
    published: Mutex<Vec<TestKey>>,
    key_fetches: AtomicU64,
    /// Key fetches still to answer 503 (the provider unreachable for a moment).
    failing_key_fetches: AtomicU64,
    graph_calls: AtomicU64,
    /// Graph calls still to answer 429 with `Retry-After: graph_retry_after` (seconds).
    throttled_graph_calls: AtomicU64,
    /// Graph calls still to be refused 403, as for an app without `GroupMember.Read.All`.
    forbidden_graph_calls: AtomicU64,
    /// Milliseconds Graph takes to answer.
    graph_delay_ms: AtomicU64,
    graph_retry_after: AtomicU64,
    /// Groups by tenant and object id: Graph answers about the directory its token is from.
    graph_groups: Mutex<HashMap<(String, String), Vec<String>>>,
    graph_tokens: Mutex<Option<crate::azure_identity_double::EntraDouble>>,
}

/// The running double.
pub struct EntraDouble {
    pub url: String,
    state: Arc<DoubleState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EntraDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EntraDouble {
    /// Starts the double on a free loopback port, publishing key A.
    pub async fn start() -> EntraDouble {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(DoubleState {
            url: url.clone(),
            published: Mutex::new(vec![TestKey::A]),
            key_fetches: AtomicU64::new(0),
            failing_key_fetches: AtomicU64::new(0),
            graph_calls: AtomicU64::new(0),
            throttled_graph_calls: AtomicU64::new(0),
            forbidden_graph_calls: AtomicU64::new(0),
            graph_delay_ms: AtomicU64::new(0),
            graph_retry_after: AtomicU64::new(0),
            graph_groups: Mutex::default(),
            graph_tokens: Mutex::default(),
        });
        let router = Router::new()
            .route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                get(v2_metadata),
            )
            .route(
                "/{tenant}/.well-known/openid-configuration",
                get(v1_metadata),
            )
            .route("/{tenant}/discovery/v2.0/keys", get(keys))
            .route("/{tenant}/discovery/keys", get(keys))
            .route("/v1.0/users/{oid}/getMemberObjects", post(member_objects))
            .route(
                "/v1.0/servicePrincipals/{oid}/getMemberObjects",
                post(member_objects),
            )
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        EntraDouble { url, state, task }
    }

    /// Answers the next `count` key fetches 503.
    pub fn fail_key_fetches(&self, count: u64) {
        self.state
            .failing_key_fetches
            .store(count, Ordering::SeqCst);
    }

    /// Publishes exactly `keys` from now on (rotation).
    pub fn publish(&self, keys: &[TestKey]) {
        *self.state.published.lock().unwrap() = keys.to_vec();
    }

    /// Makes Graph accept the tokens `issuer` issued for the Graph scope (and nothing else).
    pub fn trust_graph_tokens_of(&self, issuer: &crate::azure_identity_double::EntraDouble) {
        *self.state.graph_tokens.lock().unwrap() = Some(issuer.clone());
    }

    /// How many times a key set was fetched.
    pub fn key_fetches(&self) -> u64 {
        self.state.key_fetches.load(Ordering::SeqCst)
    }

    /// How many Graph lookups were made.
    /// Makes Graph answer the next `count` calls 429 with `Retry-After: {seconds}`, as Graph
    /// throttles ("Microsoft Graph throttling guidance": 429 Too Many Requests and a
    /// `Retry-After` header in seconds).
    pub fn throttle_graph(&self, count: u64, seconds: u64) {
        self.state
            .graph_retry_after
            .store(seconds, Ordering::SeqCst);
        self.state
            .throttled_graph_calls
            .store(count, Ordering::SeqCst);
    }

    /// Makes Graph refuse the next `count` calls 403 `Authorization_RequestDenied`, as it does
    /// for an app that lacks the permission ("Microsoft Graph error responses": 403 Forbidden,
    /// "Insufficient privileges to complete the operation.").
    pub fn forbid_graph(&self, count: u64) {
        self.state
            .forbidden_graph_calls
            .store(count, Ordering::SeqCst);
    }

    /// Makes Graph take `millis` to answer each call.
    pub fn slow_graph(&self, millis: u64) {
        self.state.graph_delay_ms.store(millis, Ordering::SeqCst);
    }

    pub fn graph_calls(&self) -> u64 {
        self.state.graph_calls.load(Ordering::SeqCst)
    }

    /// Sets the groups Graph reports for the user `oid` of tenant A.
    pub fn set_graph_groups(&self, oid: &str, groups: &[&str]) {
        self.set_graph_groups_in(TENANT_A, oid, groups);
    }

    /// Sets the groups Graph reports for the user `oid` of `tenant`, to a token of that tenant.
    pub fn set_graph_groups_in(&self, tenant: &str, oid: &str, groups: &[&str]) {
        self.state.graph_groups.lock().unwrap().insert(
            (tenant.to_owned(), oid.to_owned()),
            groups.iter().map(|g| (*g).to_owned()).collect(),
        );
    }

    /// The issuer of tokens of `tenant` and `ver`.
    pub fn issuer(&self, tenant: &str, ver: Ver) -> String {
        match ver {
            Ver::V1 => format!("{}/sts/{tenant}/", self.url),
            Ver::V2 => format!("{}/{tenant}/v2.0", self.url),
        }
    }

    /// The `identity` section of a snapshot that trusts this double for tenants A and B.
    pub fn identity(&self, require: &str) -> Value {
        json!({
            "require": require,
            "entra": {
                "tenants": [TENANT_A, TENANT_B],
                "audiences": [AUDIENCE],
                "authority_host": self.url,
                "v1_issuer_host": format!("{}/sts", self.url),
                "clock_skew_seconds": 30,
                "graph": {"endpoint": self.url, "cache_seconds": 600},
            }
        })
    }

    /// Valid claims of a user of `tenant` in `groups`.
    pub fn user_claims(&self, tenant: &str, ver: Ver, oid: &str, groups: &[&str]) -> Value {
        let now = now();
        let mut claims = json!({
            "aud": AUDIENCE,
            "iss": self.issuer(tenant, ver),
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + 3600,
            "ver": if ver == Ver::V1 { "1.0" } else { "2.0" },
            "tid": tenant,
            "oid": oid,
            "sub": format!("sub-{oid}"),
            "name": format!("User {oid}"),
            "scp": "user_impersonation",
            "groups": groups,
        });
        // The client application the access token was issued to: `appid` in v1, `azp` in v2.
        match ver {
            Ver::V1 => {
                claims["upn"] = json!(format!("{oid}@contoso.example"));
                claims["appid"] = json!(CLIENT_APP);
            }
            Ver::V2 => {
                claims["preferred_username"] = json!(format!("{oid}@contoso.example"));
                claims["azp"] = json!(CLIENT_APP);
            }
        }
        claims
    }
}

/// Signs `claims` with `key` (RS256, `kid` of the key).
pub fn sign(key: TestKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid().to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(key.private_pem()).unwrap(),
    )
    .unwrap()
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn v2_metadata(
    State(state): State<Arc<DoubleState>>,
    Path(tenant): Path<String>,
) -> Json<Value> {
    Json(json!({
        "issuer": format!("{}/{tenant}/v2.0", state.url),
        "jwks_uri": format!("{}/{tenant}/discovery/v2.0/keys", state.url),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn v1_metadata(
    State(state): State<Arc<DoubleState>>,
    Path(tenant): Path<String>,
) -> Json<Value> {
    Json(json!({
        "issuer": format!("{}/sts/{tenant}/", state.url),
        "jwks_uri": format!("{}/{tenant}/discovery/keys", state.url),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn keys(State(state): State<Arc<DoubleState>>) -> Response {
    state.key_fetches.fetch_add(1, Ordering::SeqCst);
    if state
        .failing_key_fetches
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let published = state.published.lock().unwrap().clone();
    let keys: Vec<Value> = published
        .into_iter()
        .map(|key| {
            let public = key.public();
            json!({
                "kty": "RSA",
                "use": "sig",
                "kid": key.kid(),
                "n": public["n"],
                "e": public["e"],
                "issuer": format!("{}/{{tenantid}}/v2.0", state.url),
            })
        })
        .collect();
    Json(json!({ "keys": keys })).into_response()
}

async fn member_objects(
    State(state): State<Arc<DoubleState>>,
    Path(oid): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let issuer = state.graph_tokens.lock().unwrap().clone();
    // The directory Graph answers about is the one the token was issued in.
    let tenant = issuer.and_then(|issuer| {
        let for_graph = issuer.issued().iter().any(|(token, scope)| {
            scope == "https://graph.microsoft.com/.default" && *token == presented
        });
        for_graph.then(|| issuer.tenant_of(&presented)).flatten()
    });
    let Some(tenant) = tenant else {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": "InvalidAuthenticationToken", "message": "Access token is empty."}})),
        )
            .into_response();
    };
    assert_eq!(body["securityEnabledOnly"], json!(true));
    state.graph_calls.fetch_add(1, Ordering::SeqCst);
    let delay = state.graph_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    if state
        .throttled_graph_calls
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        let seconds = state.graph_retry_after.load(Ordering::SeqCst);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", seconds.to_string())],
            Json(json!({"error": {"code": "TooManyRequests", "message": "Too many requests."}})),
        )
            .into_response();
    }
    if state
        .forbidden_graph_calls
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": "Authorization_RequestDenied",
                                  "message": "Insufficient privileges to complete the operation."}})),
        )
            .into_response();
    }
    match state.graph_groups.lock().unwrap().get(&(tenant, oid.clone())) {
        Some(groups) => Json(json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)",
            "value": groups,
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": "Request_ResourceNotFound", "message": format!("Resource '{oid}' does not exist.")}})),
        )
            .into_response(),
    }
}
