//! Local doubles of Microsoft Entra ID (token endpoint, managed identity endpoints) and Azure Key
//! Vault that speak the documented wire formats, so that the gateway's real clients are what the
//! tests exercise. Entra and Key Vault cannot be reached from the test machine.
//!
//! - Token endpoint: `POST /{tenant}/oauth2/v2.0/token` (client credentials with a secret or a
//!   certificate assertion), answers `{"token_type","expires_in","ext_expires_in","access_token"}`
//!   or `{"error","error_description","error_codes",…}`.
//! - IMDS: `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=…` with
//!   `Metadata: true`; App Service: `GET /msi/token?api-version=2019-08-01&resource=…` with
//!   `X-IDENTITY-HEADER`.
//! - Key Vault: `GET /secrets/{name}[/{version}]?api-version=7.4` with a bearer token the token
//!   endpoint issued for `https://vault.azure.net/.default`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Tenant of the doubles.
pub const TENANT: &str = "11111111-2222-3333-4444-555555555555";
/// Client id of the app registration the token endpoint knows.
pub const CLIENT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
/// Client id of the user-assigned managed identity the IMDS double knows.
pub const MI_CLIENT_ID: &str = "99999999-8888-7777-6666-555555555555";
/// Every access token the doubles issue starts with this.
pub const TOKEN_PREFIX: &str = "entra-at-";
/// The `X-IDENTITY-HEADER` value the App Service double expects.
pub const IDENTITY_HEADER: &str = "identity-header-value-0123456789";

/// The test-only RSA key (see `gateway/tests/fixtures/entra/README.md`).
pub fn test_rsa_key() -> rcgen::KeyPair {
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/entra/test-only-rsa-key.pem"
    ))
    .unwrap();
    rcgen::KeyPair::from_pem(&pem).unwrap()
}

/// A self-signed certificate for the test key, with `name` as subject: (certificate DER,
/// PEM of certificate followed by the private key).
pub fn test_certificate(name: &str) -> (Vec<u8>, String) {
    let key = test_rsa_key();
    let certificate = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = format!("{}{}", certificate.pem(), key.serialize_pem());
    (certificate.der().to_vec(), pem)
}

/// What the token endpoint accepts as proof.
#[derive(Clone)]
pub enum Proof {
    /// This client secret.
    Secret(String),
    /// A client assertion signed by the key of this certificate (DER and PEM).
    Certificate { der: Vec<u8>, pem: String },
}

#[derive(Default)]
pub struct EntraState {
    base_url: Mutex<String>,
    proof: Mutex<Option<Proof>>,
    expires_in: AtomicU64,
    delay_ms: AtomicU64,
    failing: AtomicBool,
    /// Token requests (client credentials) answered, successful or not.
    pub token_requests: AtomicUsize,
    /// Managed identity requests answered.
    pub identity_requests: AtomicUsize,
    /// Client assertions whose signature, audience, subject, lifetime and thumbprint checked out.
    pub assertions_verified: AtomicUsize,
    issued: Mutex<Vec<(String, String)>>,
    /// The tenant of each token issued.
    issued_in: Mutex<HashMap<String, String>>,
    /// The tenants whose token endpoint knows the app: its own ([`TENANT`]) and those that
    /// consented to it (a multi-tenant app registration).
    tenants: Mutex<HashSet<String>>,
    assertions: Mutex<Vec<String>>,
    jtis: Mutex<HashSet<String>>,
}

/// The Entra double: a token endpoint and the managed identity endpoints.
#[derive(Clone)]
pub struct EntraDouble {
    pub url: String,
    pub state: Arc<EntraState>,
}

impl EntraDouble {
    /// Starts a double that accepts `proof` for [`CLIENT_ID`] and issues tokens living
    /// `expires_in` seconds.
    pub async fn start(proof: Proof, expires_in: u64) -> EntraDouble {
        let state = Arc::new(EntraState::default());
        *state.proof.lock().unwrap() = Some(proof);
        state.tenants.lock().unwrap().insert(TENANT.to_owned());
        state.expires_in.store(expires_in, Ordering::SeqCst);
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/metadata/identity/oauth2/token", get(imds))
            .route("/msi/token", get(app_service))
            .with_state(Arc::clone(&state));
        let url = serve(app).await;
        *state.base_url.lock().unwrap() = url.clone();
        EntraDouble { url, state }
    }

    /// The IMDS-protocol endpoint.
    pub fn imds_url(&self) -> String {
        format!("{}/metadata/identity/oauth2/token", self.url)
    }

    /// The App Service-protocol endpoint.
    pub fn app_service_url(&self) -> String {
        format!("{}/msi/token", self.url)
    }

    /// Token requests so far.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Managed identity requests so far.
    pub fn identity_requests(&self) -> usize {
        self.state.identity_requests.load(Ordering::SeqCst)
    }

    /// Every token issued (token, scope or resource it was issued for).
    pub fn issued(&self) -> Vec<(String, String)> {
        self.state.issued.lock().unwrap().clone()
    }

    /// Makes the token endpoint of `tenant` know the app too, as a directory that consented to
    /// a multi-tenant app registration does.
    pub fn consent_in(&self, tenant: &str) {
        self.state.tenants.lock().unwrap().insert(tenant.to_owned());
    }

    /// The tenant the double issued `token` in, if it issued it.
    pub fn tenant_of(&self, token: &str) -> Option<String> {
        self.state.issued_in.lock().unwrap().get(token).cloned()
    }

    /// Every client assertion received.
    pub fn assertions(&self) -> Vec<String> {
        self.state.assertions.lock().unwrap().clone()
    }

    /// Pauses each token answer (to make concurrent callers overlap).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Makes every endpoint answer 503 (`temporarily_unavailable`) or recover.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }
}

/// A new token for `scope` in `tenant` (a managed identity's are in [`TENANT`]), recorded.
fn issue(state: &EntraState, scope: &str, tenant: &str) -> String {
    let mut issued = state.issued.lock().unwrap();
    let token = format!(
        "{TOKEN_PREFIX}{}-{}",
        issued.len() + 1,
        uuid::Uuid::new_v4().simple()
    );
    issued.push((token.clone(), scope.to_owned()));
    state
        .issued_in
        .lock()
        .unwrap()
        .insert(token.clone(), tenant.to_owned());
    token
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// The documented error shape of the token endpoint.
fn oauth_error(status: StatusCode, error: &str, aadsts: u64, description: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "error": error,
            "error_description": format!("AADSTS{aadsts}: {description} Trace ID: 0 Correlation ID: 0 Timestamp: 2026-01-01 00:00:00Z"),
            "error_codes": [aadsts],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": uuid::Uuid::new_v4().to_string(),
            "correlation_id": uuid::Uuid::new_v4().to_string(),
        })),
    )
        .into_response()
}

async fn pause(state: &EntraState) {
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`, client credentials grant.
async fn token(
    State(state): State<Arc<EntraState>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    pause(&state).await;
    if state.failing.load(Ordering::SeqCst) {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            50196,
            "The server is temporarily unavailable.",
        );
    }
    let form_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !form_type.starts_with("application/x-www-form-urlencoded") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must be form-encoded.",
        );
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if !state.tenants.lock().unwrap().contains(&tenant) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            "Tenant not found.",
        );
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        );
    }
    let Some(scope) = form
        .get("scope")
        .filter(|scope| scope.ends_with("/.default"))
    else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid; client credential flows must have a scope value with /.default.",
        );
    };
    let proof = state.proof.lock().unwrap().clone();
    match proof {
        Some(Proof::Secret(expected)) => {
            if form.get("client_secret") != Some(&expected) {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                );
            }
        }
        Some(Proof::Certificate { der, pem }) => {
            let base = state.base_url.lock().unwrap().clone();
            let token_url = format!("{base}/{tenant}/oauth2/v2.0/token");
            if let Err(problem) = verify_assertion(&state, &form, &der, &pem, &token_url) {
                return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", 700027, problem);
            }
            state.assertions_verified.fetch_add(1, Ordering::SeqCst);
        }
        None => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                "No credential.",
            );
        }
    }
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    let token = issue(&state, scope, &tenant);
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": token,
    }))
    .into_response()
}

/// The checks Entra makes of a certificate client assertion.
fn verify_assertion(
    state: &EntraState,
    form: &HashMap<String, String>,
    der: &[u8],
    certificate_pem: &str,
    token_url: &str,
) -> Result<(), &'static str> {
    if form.get("client_assertion_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return Err("Client assertion type is missing or wrong.");
    }
    if form.contains_key("client_secret") {
        return Err("Both a secret and an assertion were sent.");
    }
    let assertion = form
        .get("client_assertion")
        .ok_or("Client assertion is missing.")?;
    state.assertions.lock().unwrap().push(assertion.clone());
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "Malformed assertion.")?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err("Assertion algorithm must be RS256.");
    }
    let thumbprint = URL_SAFE_NO_PAD.encode(Sha256::digest(der));
    if header.x5t_s256.as_deref() != Some(thumbprint.as_str()) {
        return Err("Client assertion contains an invalid signature: unknown key (x5t#S256).");
    }
    // The public key comes out of the certificate itself.
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(certificate_pem.as_bytes())
        .map_err(|_| "The registered certificate has no RSA key.")?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[CLIENT_ID]);
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|_| "Client assertion contains an invalid signature or claims.")?
        .claims;
    if claims["sub"] != CLIENT_ID {
        return Err("The assertion's sub is not the client id.");
    }
    let (Some(nbf), Some(exp)) = (claims["nbf"].as_u64(), claims["exp"].as_u64()) else {
        return Err("nbf and exp must be numbers.");
    };
    if exp.saturating_sub(nbf) > 3600 {
        return Err("The assertion lives too long.");
    }
    let jti = claims["jti"].as_str().ok_or("The assertion has no jti.")?;
    if !state.jtis.lock().unwrap().insert(jti.to_owned()) {
        return Err("The assertion was replayed (jti seen before).");
    }
    Ok(())
}

fn resource_of(query: &HashMap<String, String>) -> Option<String> {
    query
        .get("resource")
        .filter(|r| r.starts_with("https://"))
        .cloned()
}

/// `GET /metadata/identity/oauth2/token` (IMDS protocol).
async fn imds(
    State(state): State<Arc<EntraState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    state.identity_requests.fetch_add(1, Ordering::SeqCst);
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_request", "error_description": "Required metadata header not specified"})),
        )
            .into_response();
    }
    if query.get("api-version").map(String::as_str) != Some("2018-02-01") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": "invalid_request", "error_description": "Invalid api-version"}),
            ),
        )
            .into_response();
    }
    if query.get("client_id").is_some_and(|id| id != MI_CLIENT_ID) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({"error": "invalid_request", "error_description": "Identity not found"}),
            ),
        )
            .into_response();
    }
    let Some(resource) = resource_of(&query) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_resource", "error_description": "AADSTS500011: The resource principal was not found."})),
        )
            .into_response();
    };
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = issue(&state, &resource, TENANT);
    // IMDS sends its numbers as strings.
    axum::Json(json!({
        "access_token": token,
        "refresh_token": "",
        "expires_in": expires_in.to_string(),
        "expires_on": (now + expires_in).to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    }))
    .into_response()
}

/// `GET /msi/token` (App Service / Container Apps protocol).
async fn app_service(
    State(state): State<Arc<EntraState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    state.identity_requests.fetch_add(1, Ordering::SeqCst);
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(IDENTITY_HEADER)
        || query.get("api-version").map(String::as_str) != Some("2019-08-01")
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"statusCode": 401, "message": "Unauthorized request"})),
        )
            .into_response();
    }
    let Some(resource) = resource_of(&query) else {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"statusCode": 400, "message": "resource is required"})),
        )
            .into_response();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expires_in = state.expires_in.load(Ordering::SeqCst);
    let token = issue(&state, &resource, TENANT);
    axum::Json(json!({
        "access_token": token,
        "expires_on": (now + expires_in).to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": query.get("client_id").cloned().unwrap_or_else(|| MI_CLIENT_ID.to_owned()),
    }))
    .into_response()
}

struct VaultState {
    entra: Arc<EntraState>,
    secrets: Mutex<HashMap<String, String>>,
    failing: AtomicBool,
    requests: AtomicUsize,
}

/// The Key Vault double.
#[derive(Clone)]
pub struct KeyVaultDouble {
    pub url: String,
    state: Arc<VaultState>,
}

impl KeyVaultDouble {
    /// Starts a vault that accepts tokens `entra` issued for `https://vault.azure.net/.default`.
    pub async fn start(entra: &EntraDouble) -> KeyVaultDouble {
        let state = Arc::new(VaultState {
            entra: Arc::clone(&entra.state),
            secrets: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/secrets/{name}", get(get_latest))
            .route("/secrets/{name}/{version}", get(get_version))
            .with_state(Arc::clone(&state));
        let url = serve(app).await;
        KeyVaultDouble { url, state }
    }

    /// Sets (or rotates) a secret.
    pub fn set(&self, name: &str, value: &str) {
        self.state
            .secrets
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.to_owned());
    }

    /// The secret reference of `name`.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/secrets/{name}", self.url)
    }

    /// Makes every answer 503 or recovers.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Secret reads so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

fn vault_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

async fn get_latest(
    state: State<Arc<VaultState>>,
    Path(name): Path<String>,
    query: Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    get_secret(state, name, query, headers).await
}

async fn get_version(
    state: State<Arc<VaultState>>,
    Path((name, _version)): Path<(String, String)>,
    query: Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    get_secret(state, name, query, headers).await
}

async fn get_secret(
    State(state): State<Arc<VaultState>>,
    name: String,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state.failing.load(Ordering::SeqCst) {
        return vault_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "The service is unavailable.",
        );
    }
    if query.get("api-version").map(String::as_str) != Some("7.4") {
        return vault_error(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            "The specified version is not supported.",
        );
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = bearer.is_some_and(|token| {
        state
            .entra
            .issued
            .lock()
            .unwrap()
            .iter()
            // A scope from the token endpoint, a resource from the managed identity endpoints.
            .any(|(issued, scope)| {
                issued == token && scope.trim_end_matches("/.default") == "https://vault.azure.net"
            })
    });
    if !valid {
        return vault_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "AKV10000: Request is missing a Bearer or PoP token.",
        );
    }
    let Some(value) = state.secrets.lock().unwrap().get(&name).cloned() else {
        return vault_error(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            &format!("A secret with (name/id) {name} was not found in this key vault."),
        );
    };
    let version = format!("{:x}", Sha256::digest(value.as_bytes()))[..32].to_owned();
    axum::Json(json!({
        "value": value,
        "id": format!("https://double.vault.azure.net/secrets/{name}/{version}"),
        "attributes": {"enabled": true, "created": 1_700_000_000, "updated": 1_700_000_000, "recoveryLevel": "Recoverable+Purgeable"},
        "tags": {},
    }))
    .into_response()
}
