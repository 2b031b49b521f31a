//! An OpenID Connect provider double: discovery, JWKS, an authorization endpoint that redirects
//! straight back with a code, and a token endpoint that checks PKCE and the client's credential
//! and signs ID tokens with the committed test keys (`gateway/tests/fixtures/entra/`). What the
//! next ID token holds is set with [`Mode`]; an overage token names a claim source on the double
//! itself that counts its hits, so a test can show it is never called.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gatehouse_portal::oidc::OidcSettings;
use gatehouse_schema::portal::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

use super::{Browser, TestPortal, location};

pub const CLIENT_ID: &str = "portal-client";
pub const CLIENT_SECRET: &str = "portal-client-secret";
pub const LEADS_GROUP: &str = "7f1c-team-leads";

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../gateway/tests/fixtures/entra/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// What the double puts in (or does to) the next ID token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Good,
    WrongNonce,
    WrongAudience,
    WrongIssuer,
    Expired,
    OtherKey,
    NoRole,
    GroupOnly,
    /// No app role, no `groups`: `_claim_names`/`_claim_sources` instead (Entra ID's groups
    /// overage).
    Overage,
    /// As `Overage`, with the app role `Auditor`.
    OverageWithAppRole,
    /// No app role, no `groups`: `hasgroups: true` instead (the implicit flow's overage).
    ImplicitOverage,
}

struct Pending {
    nonce: String,
    challenge: String,
    redirect_uri: String,
}

pub struct Provider {
    pub issuer: String,
    pub mode: Mutex<Mode>,
    codes: Mutex<HashMap<String, Pending>>,
    /// When set, the client authenticates with an assertion signed by this certificate (DER)
    /// and key (public key PEM) instead of the client secret.
    certificate: Option<(Vec<u8>, String)>,
    /// The access token the token endpoint issues with every ID token, unique to this double.
    pub access_token: String,
    /// The scopes of the last authorization request.
    pub scopes: Mutex<Vec<String>>,
    /// Requests to the `_claim_sources` endpoint of overage tokens.
    pub claim_source_hits: AtomicUsize,
}

impl Provider {
    /// The scopes of the last authorization request.
    pub fn last_scopes(&self) -> Vec<String> {
        self.scopes.lock().unwrap().clone()
    }
}

async fn discovery(State(p): State<Arc<Provider>>) -> Json<Value> {
    Json(json!({
        "issuer": p.issuer,
        "authorization_endpoint": format!("{}/authorize", p.issuer),
        "token_endpoint": format!("{}/token", p.issuer),
        "jwks_uri": format!("{}/keys", p.issuer),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn keys() -> Json<Value> {
    let keys: Value = serde_json::from_str(&fixture("test-signing-keys.public.json")).unwrap();
    Json(json!({"keys": [
        {"kty": "RSA", "use": "sig", "kid": "key-a", "alg": "RS256", "n": keys["a"]["n"], "e": keys["a"]["e"]}
    ]}))
}

async fn claim_source(State(p): State<Arc<Provider>>) -> StatusCode {
    p.claim_source_hits.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn authorize(
    State(p): State<Arc<Provider>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    *p.scopes.lock().unwrap() = q
        .get("scope")
        .map(|s| s.split(' ').map(str::to_owned).collect())
        .unwrap_or_default();
    let ok = q.get("response_type").map(String::as_str) == Some("code")
        && q.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.get("scope")
            .is_some_and(|s| s.split(' ').any(|s| s == "openid"));
    let (Some(state), Some(nonce), Some(challenge), Some(redirect_uri)) = (
        q.get("state"),
        q.get("nonce"),
        q.get("code_challenge"),
        q.get("redirect_uri"),
    ) else {
        return (StatusCode::BAD_REQUEST, "missing parameter").into_response();
    };
    if !ok {
        return (StatusCode::BAD_REQUEST, "bad request").into_response();
    }
    let code = format!("code-{}", uuid::Uuid::new_v4().simple());
    p.codes.lock().unwrap().insert(
        code.clone(),
        Pending {
            nonce: nonce.clone(),
            challenge: challenge.clone(),
            redirect_uri: redirect_uri.clone(),
        },
    );
    let mut back = Url::parse(redirect_uri).unwrap();
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", state);
    Redirect::to(back.as_str()).into_response()
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    code: String,
    redirect_uri: String,
    code_verifier: String,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    client_assertion_type: Option<String>,
    #[serde(default)]
    client_assertion: Option<String>,
}

/// Checks a `private_key_jwt` client assertion as Entra ID does: type, `x5t#S256` of the
/// registered certificate, signature, audience (the token endpoint), issuer and subject.
fn assertion_is_valid(p: &Provider, form: &TokenRequest, der: &[u8], public_pem: &str) -> bool {
    if form.client_assertion_type.as_deref()
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        || form.client_id.as_deref() != Some(CLIENT_ID)
    {
        return false;
    }
    let Some(assertion) = &form.client_assertion else {
        return false;
    };
    let Ok(header) = jsonwebtoken::decode_header(assertion) else {
        return false;
    };
    if header.x5t_s256.as_deref() != Some(URL_SAFE_NO_PAD.encode(Sha256::digest(der)).as_str()) {
        return false;
    }
    let mut validation = jsonwebtoken::Validation::new(Algorithm::RS256);
    validation.set_audience(&[format!("{}/token", p.issuer)]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap();
    jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .is_ok_and(|data| data.claims["sub"] == CLIENT_ID && data.claims["jti"].is_string())
}

async fn token(
    State(p): State<Arc<Provider>>,
    headers: HeaderMap,
    Form(form): Form<TokenRequest>,
) -> Response {
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let authenticated = match &p.certificate {
        Some((der, public_pem)) => {
            headers.get("authorization").is_none() && assertion_is_valid(&p, &form, der, public_pem)
        }
        None => headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(basic.as_str()),
    };
    if !authenticated {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let Some(pending) = p.codes.lock().unwrap().remove(&form.code) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    };
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(form.code_verifier.as_bytes()));
    if form.grant_type != "authorization_code"
        || challenge != pending.challenge
        || form.redirect_uri != pending.redirect_uri
    {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        )
            .into_response();
    }
    let mode = *p.mode.lock().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = json!({
        "iss": p.issuer,
        "aud": CLIENT_ID,
        "sub": "subject-1",
        "oid": "00000000-0000-0000-0000-00000000a11c",
        "name": "Alice <Admin>",
        "nonce": pending.nonce,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "roles": ["Admin"],
    });
    match mode {
        Mode::Good => {}
        Mode::WrongNonce => claims["nonce"] = json!("another-nonce"),
        Mode::WrongAudience => claims["aud"] = json!("someone-else"),
        Mode::WrongIssuer => claims["iss"] = json!("https://issuer.example.invalid"),
        Mode::Expired => claims["exp"] = json!(now - 3600),
        Mode::NoRole => claims["roles"] = json!(["Reader"]),
        Mode::GroupOnly => {
            claims["roles"] = json!([]);
            claims["groups"] = json!(["some-other-group", LEADS_GROUP]);
        }
        Mode::Overage | Mode::OverageWithAppRole => {
            claims["roles"] = if mode == Mode::Overage {
                json!([])
            } else {
                json!(["Auditor"])
            };
            claims["_claim_names"] = json!({"groups": "src1"});
            claims["_claim_sources"] =
                json!({"src1": {"endpoint": format!("{}/claim-source", p.issuer)}});
        }
        Mode::ImplicitOverage => {
            claims["roles"] = json!([]);
            claims["hasgroups"] = json!(true);
        }
        Mode::OtherKey => {}
    }
    let key_file = if mode == Mode::OtherKey {
        "test-signing-key-b.pem"
    } else {
        "test-signing-key-a.pem"
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("key-a".to_owned());
    let id_token = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(fixture(key_file).as_bytes()).unwrap(),
    )
    .unwrap();
    Json(json!({
        "access_token": p.access_token,
        "token_type": "Bearer",
        "expires_in": 3600,
        "id_token": id_token,
    }))
    .into_response()
}

pub async fn provider() -> Arc<Provider> {
    provider_with(None).await
}

pub async fn provider_with(certificate: Option<(Vec<u8>, String)>) -> Arc<Provider> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/tenant-1/v2.0", listener.local_addr().unwrap());
    let provider = Arc::new(Provider {
        issuer,
        mode: Mutex::new(Mode::Good),
        codes: Mutex::new(HashMap::new()),
        certificate,
        access_token: format!("graph-access-token-{}", uuid::Uuid::new_v4().simple()),
        scopes: Mutex::new(Vec::new()),
        claim_source_hits: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route(
            "/tenant-1/v2.0/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/tenant-1/v2.0/keys", get(keys))
        .route("/tenant-1/v2.0/authorize", get(authorize))
        .route("/tenant-1/v2.0/token", post(token))
        .route(
            "/tenant-1/v2.0/claim-source",
            get(claim_source).post(claim_source),
        )
        .with_state(Arc::clone(&provider));
    tokio::spawn(async move { axum::serve(listener, app).await });
    provider
}

/// Settings for signing in at `provider` (its issuer is not Entra ID's: no Graph lookups), the
/// leads group mapped to TeamLead.
pub fn oidc(provider: &Provider) -> OidcSettings {
    OidcSettings {
        issuer: Url::parse(&provider.issuer).unwrap(),
        client_id: CLIENT_ID.to_owned(),
        client_secret: Some(CLIENT_SECRET.to_owned()),
        client_certificate: None,
        group_roles: HashMap::from([(LEADS_GROUP.to_owned(), Role::TeamLead)]),
        graph: None,
        clock_skew: Duration::from_secs(60),
    }
}

/// Runs the redirect dance; returns the browser, the callback URL and the callback's response.
pub async fn sign_in(portal: &TestPortal) -> (Browser, String, reqwest::Response) {
    let mut browser = Browser::new(portal);
    let start = browser
        .get(&format!(
            "{}/auth/sign-in?return_to=/subscriptions",
            portal.url
        ))
        .await;
    assert_eq!(start.status(), 303);
    assert!(
        browser.cookie.is_some(),
        "a session holds the pending sign-in"
    );
    let before = browser.cookie.clone();
    let at_provider = browser.client.get(location(&start)).send().await.unwrap();
    assert_eq!(
        at_provider.status(),
        303,
        "{}",
        at_provider.text().await.unwrap()
    );
    let callback = location(&at_provider);
    assert!(callback.starts_with(&format!("{}/auth/callback?", portal.url)));
    let response = browser.get(&callback).await;
    if response.status() == 303 {
        assert_ne!(browser.cookie, before, "the session id changes at sign-in");
    }
    (browser, callback, response)
}

/// The session as the app sees it (`user: null` when nobody is signed in).
pub async fn info(browser: &mut Browser, portal: &TestPortal) -> Value {
    browser
        .post(&format!("{}/api/portal_info", portal.url), &[])
        .await
        .json()
        .await
        .unwrap()
}
