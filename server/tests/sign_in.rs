//! OpenID Connect sign-in against a local provider double that serves discovery and JWKS and
//! signs ID tokens with the committed test keys (`gateway/tests/fixtures/entra/`): PKCE, state,
//! nonce, issuer, audience, signature and expiry are all checked; the session id changes at
//! sign-in; roles come from the `roles` claim or the group mapping.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{Browser, location};
use gatehouse_portal::oidc::{ClientCertificate, OidcSettings};
use gatehouse_schema::portal::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

const CLIENT_ID: &str = "portal-client";
const CLIENT_SECRET: &str = "portal-client-secret";
const LEADS_GROUP: &str = "7f1c-team-leads";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../gateway/tests/fixtures/entra/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// What the double puts in (or does to) the next ID token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Good,
    WrongNonce,
    WrongAudience,
    WrongIssuer,
    Expired,
    OtherKey,
    NoRole,
    GroupOnly,
}

struct Pending {
    nonce: String,
    challenge: String,
    redirect_uri: String,
}

struct Provider {
    issuer: String,
    mode: Mutex<Mode>,
    codes: Mutex<HashMap<String, Pending>>,
    /// When set, the client authenticates with an assertion signed by this certificate (DER)
    /// and key (public key PEM) instead of the client secret.
    certificate: Option<(Vec<u8>, String)>,
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

async fn authorize(
    State(p): State<Arc<Provider>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
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
        "access_token": "opaque-access-token",
        "token_type": "Bearer",
        "expires_in": 3600,
        "id_token": id_token,
    }))
    .into_response()
}

async fn provider() -> Arc<Provider> {
    provider_with(None).await
}

async fn provider_with(certificate: Option<(Vec<u8>, String)>) -> Arc<Provider> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/tenant-1/v2.0", listener.local_addr().unwrap());
    let provider = Arc::new(Provider {
        issuer,
        mode: Mutex::new(Mode::Good),
        codes: Mutex::new(HashMap::new()),
        certificate,
    });
    let app = Router::new()
        .route(
            "/tenant-1/v2.0/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/tenant-1/v2.0/keys", get(keys))
        .route("/tenant-1/v2.0/authorize", get(authorize))
        .route("/tenant-1/v2.0/token", post(token))
        .with_state(Arc::clone(&provider));
    tokio::spawn(async move { axum::serve(listener, app).await });
    provider
}

fn oidc(provider: &Provider) -> OidcSettings {
    OidcSettings {
        issuer: Url::parse(&provider.issuer).unwrap(),
        client_id: CLIENT_ID.to_owned(),
        client_secret: Some(CLIENT_SECRET.to_owned()),
        client_certificate: None,
        group_roles: HashMap::from([(LEADS_GROUP.to_owned(), Role::TeamLead)]),
        clock_skew: Duration::from_secs(60),
    }
}

/// Runs the redirect dance; returns the browser, the callback URL and the callback's response.
async fn sign_in(portal: &common::TestPortal) -> (Browser, String, reqwest::Response) {
    let mut browser = Browser::new(portal);
    let start = browser
        .get(&format!(
            "{}/auth/sign-in?return_to=/subscriptions",
            portal.url
        ))
        .await;
    assert_eq!(start.status(), 303);
    let before = browser
        .cookie
        .clone()
        .expect("a session holds the pending sign-in");
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
        assert_ne!(
            browser.cookie.as_ref(),
            Some(&before),
            "the session id changes at sign-in"
        );
    }
    (browser, callback, response)
}

async fn info(browser: &mut Browser, portal: &common::TestPortal) -> Value {
    browser
        .post(&format!("{}/api/portal_info", portal.url), &[])
        .await
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_signs_in_with_code_and_pkce_and_gets_the_roles_of_the_token() {
    let provider = provider().await;
    let portal = common::start(Some(oidc(&provider))).await;
    let (mut browser, callback, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/subscriptions");
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("gatehouse_session="))
        .unwrap();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Lax"), "{cookie}");
    let info = info(&mut browser, &portal).await;
    assert_eq!(info["user"]["name"], "Alice <Admin>");
    assert_eq!(info["user"]["roles"], json!(["Admin"]));
    // The admin's changes carry their name and object id.
    browser
        .post(
            &format!("{}/api/create_subscription", portal.url),
            &[
                ("id", "team-a"),
                ("display_name", "A"),
                ("product", ""),
                ("expires_on", ""),
            ],
        )
        .await;
    let log = portal.server.portal.db.activity(10).await.unwrap();
    assert_eq!(
        log[0].actor,
        "Alice <Admin> <00000000-0000-0000-0000-00000000a11c>"
    );

    // A replayed callback finds no sign-in in progress.
    let replay = browser.get(&callback).await;
    assert_eq!(replay.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_lead_gets_the_role_from_the_group_mapping() {
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::GroupOnly;
    let portal = common::start(Some(oidc(&provider))).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    let info = info(&mut browser, &portal).await;
    assert_eq!(info["user"]["roles"], json!(["TeamLead"]));
    let refused = browser
        .post(&format!("{}/api/list_subscriptions", portal.url), &[])
        .await;
    assert_eq!(refused.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_id_tokens_and_a_forged_state_are_refused() {
    let provider = provider().await;
    let portal = common::start(Some(oidc(&provider))).await;
    for mode in [
        Mode::WrongNonce,
        Mode::WrongAudience,
        Mode::WrongIssuer,
        Mode::Expired,
        Mode::OtherKey,
        Mode::NoRole,
    ] {
        *provider.mode.lock().unwrap() = mode;
        let (mut browser, _, response) = sign_in(&portal).await;
        assert_eq!(response.status(), 403, "{mode:?}");
        let info = info(&mut browser, &portal).await;
        assert_eq!(info["user"], Value::Null, "{mode:?} signed nobody in");
    }

    *provider.mode.lock().unwrap() = Mode::Good;
    let mut browser = Browser::new(&portal);
    let start = browser.get(&format!("{}/auth/sign-in", portal.url)).await;
    let at_provider = browser.client.get(location(&start)).send().await.unwrap();
    let mut callback = Url::parse(&location(&at_provider)).unwrap();
    let code = callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    callback
        .query_pairs_mut()
        .clear()
        .append_pair("code", &code)
        .append_pair("state", "forged-state");
    let response = browser.get(callback.as_str()).await;
    assert_eq!(response.status(), 403);
    assert_eq!(info(&mut browser, &portal).await["user"], Value::Null);
}

/// A self-signed certificate for the committed test-only RSA key: (DER, PEM of certificate and
/// key, public key PEM).
fn client_certificate(name: &str) -> (Vec<u8>, String, String) {
    let key = rcgen::KeyPair::from_pem(&fixture("test-only-rsa-key.pem")).unwrap();
    let certificate = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (
        certificate.der().to_vec(),
        format!("{}{}", certificate.pem(), key.serialize_pem()),
        key.public_key_pem(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_portal_can_authenticate_with_a_certificate_instead_of_a_secret() {
    let (der, pem, public_pem) = client_certificate("gatehouse-portal");
    let provider = provider_with(Some((der, public_pem))).await;
    let mut settings = oidc(&provider);
    settings.client_secret = None;
    settings.client_certificate = Some(ClientCertificate::from_pem(&pem).unwrap());
    let portal = common::start(Some(settings)).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        info(&mut browser, &portal).await["user"]["roles"],
        json!(["Admin"])
    );

    // The same key in another certificate has another thumbprint: the provider refuses it.
    let (_, other_pem, _) = client_certificate("another-certificate");
    let mut settings = oidc(&provider);
    settings.client_secret = None;
    settings.client_certificate = Some(ClientCertificate::from_pem(&other_pem).unwrap());
    let portal = common::start(Some(settings)).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 403);
    assert_eq!(info(&mut browser, &portal).await["user"], Value::Null);

    // A PEM without a key is refused with a message that does not quote it.
    let error = ClientCertificate::from_pem(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap_err();
    assert!(error.contains("no unencrypted PRIVATE KEY"), "{error}");
}
