//! Backend credentials from Microsoft Entra ID (client secret, certificate, managed identity) and
//! secrets from Azure Key Vault, against local doubles that speak the documented wire formats
//! (`azure_identity_double`), with the simulator accepting only bearer tokens.

use std::io::Write as _;
use std::time::Duration;

use gatehouse_gateway::SecretSettings;
use gatehouse_gateway::entra_credential::{
    COGNITIVE_SERVICES_SCOPE, CredentialError, GRAPH_SCOPE, KEY_VAULT_SCOPE,
    ManagedIdentityEndpoint, TokenCredential,
};
use gatehouse_gateway::secret::{Secret, SecretValue};
use gatehouse_simulator::{RunningSimulator, SimulatorConfig};
use serde_json::{Value, json};

use crate::azure_identity_double::*;
use crate::harness::*;

const CLIENT_SECRET: &str = "client-secret-value-Q8~abcdefghijklmnop";
const WRONG_SECRET: &str = "wrong-secret-value-Z9~zyxwvutsrqponmlk";
const GATEWAY_SECRET: &str = "gateway-own-secret-R7~0123456789abcdef";

/// A simulator that takes only `Authorization: Bearer entra-at-…` (no `api-key`).
async fn bearer_simulator(id: &str) -> RunningSimulator {
    simulator_with(SimulatorConfig {
        id: id.to_owned(),
        require_bearer_prefix: Some(TOKEN_PREFIX.to_owned()),
        ..SimulatorConfig::default()
    })
    .await
}

/// A file holding `value` and its `file:` reference; keep the file alive.
fn secret_file(value: &str) -> (tempfile::NamedTempFile, String) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(format!("{value}\n").as_bytes()).unwrap();
    let reference = format!("file:{}", file.path().display());
    (file, reference)
}

fn client_secret_member(
    id: &str,
    url: &str,
    priority: u32,
    entra: &EntraDouble,
    secret: &str,
) -> Value {
    let mut m = member(id, url, priority);
    m["credential"] = json!({
        "type": "entra_client_secret",
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "secret": secret,
        "authority_host": entra.url,
    });
    m
}

/// A gateway with one pool member at `sim` that signs in to `entra` with [`CLIENT_SECRET`] (from
/// a file, kept alive by the first value).
async fn client_secret_gateway(
    entra: &EntraDouble,
    sim: &RunningSimulator,
) -> (tempfile::NamedTempFile, TestGateway) {
    let (file, secret) = secret_file(CLIENT_SECRET);
    let gw = TestGateway::start(snapshot(
        1,
        pool(json!([client_secret_member(
            "m",
            &sim.url(),
            1,
            entra,
            &secret
        )])),
    ))
    .await;
    (file, gw)
}

fn pool(members: Value) -> Value {
    json!([{"id": "p", "deployments": ["gpt-4o"], "members": members}])
}

/// The bearer tokens a simulator saw, in order; asserts it never saw an `api-key`.
fn bearer_tokens(sim: &RunningSimulator) -> Vec<String> {
    sim.requests()
        .iter()
        .map(|request| {
            assert_eq!(request.header("api-key"), None, "no api-key with a token");
            request
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .expect("a bearer token")
                .to_owned()
        })
        .collect()
}

async fn chat_ok(gw: &TestGateway) -> reqwest::Response {
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.headers());
    response
}

#[tokio::test]
async fn client_secret_tokens_are_sent_as_bearer_and_cached_across_parallel_calls() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    entra.set_delay(Duration::from_millis(200));
    let sim = bearer_simulator("s-entra").await;
    let (_file, gw) = client_secret_gateway(&entra, &sim).await;

    // 50 parallel calls while the first token request is still in flight: one token request.
    let calls = (0..50).map(|_| {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
    });
    for response in futures::future::join_all(calls).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    for _ in 0..5 {
        chat_ok(&gw).await;
    }
    assert_eq!(entra.token_requests(), 1, "one token for 55 calls");
    let issued = entra.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].1, COGNITIVE_SERVICES_SCOPE);
    let tokens = bearer_tokens(&sim);
    assert_eq!(tokens.len(), 55);
    assert!(tokens.iter().all(|token| *token == issued[0].0));
}

#[tokio::test]
async fn token_credential_is_single_flight_per_scope_and_shared_by_clones() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    entra.set_delay(Duration::from_millis(300));
    let authority = url::Url::parse(&entra.url).unwrap();
    let credential = TokenCredential::client_secret(
        TENANT,
        CLIENT_ID,
        SecretValue::new(Secret::new(CLIENT_SECRET.to_owned())),
        Some(&authority),
    )
    .unwrap();

    let calls = (0..100).map(|_| {
        let credential = credential.clone();
        tokio::spawn(async move { credential.token(COGNITIVE_SERVICES_SCOPE).await })
    });
    let tokens: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap().expose().clone())
        .collect();
    assert_eq!(
        entra.token_requests(),
        1,
        "100 parallel callers, one request"
    );
    assert!(tokens.iter().all(|token| *token == tokens[0]));

    // Another scope is another token; the first stays cached.
    let graph = credential.token(GRAPH_SCOPE).await.unwrap();
    assert_ne!(graph.expose(), &tokens[0]);
    assert_eq!(entra.token_requests(), 2);
    let again = credential
        .clone()
        .token(COGNITIVE_SERVICES_SCOPE)
        .await
        .unwrap();
    assert_eq!(again.expose(), &tokens[0]);
    assert_eq!(entra.token_requests(), 2);
    assert_eq!(
        entra
            .issued()
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>(),
        [COGNITIVE_SERVICES_SCOPE, GRAPH_SCOPE]
    );
    // `forget` drops the cached token (e.g. after a 401).
    credential.forget(GRAPH_SCOPE);
    let fresh = credential.token(GRAPH_SCOPE).await.unwrap();
    assert_ne!(fresh.expose(), graph.expose());
    assert_eq!(entra.token_requests(), 3);
}

/// A member that refuses the gateway's fresh token (Azure answers 401 `PermissionDenied` to an
/// operation the identity's role does not allow) does not make every call fetch a new token: a
/// token is dropped after a 401 only once it is some time old.
#[tokio::test]
async fn a_member_refusing_a_fresh_token_does_not_make_every_call_fetch_one() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    let sim = simulator_with(SimulatorConfig {
        id: "s-refusing".to_owned(),
        require_bearer_prefix: Some("a-prefix-no-token-has-".to_owned()),
        ..SimulatorConfig::default()
    })
    .await;
    let (_file, gw) = client_secret_gateway(&entra, &sim).await;
    for _ in 0..20 {
        let refused = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
    }
    assert_eq!(sim.hits(), 20);
    assert_eq!(entra.token_requests(), 1);
}

#[tokio::test]
async fn tokens_are_refreshed_before_they_expire() {
    // A 2-second token is refreshed after half its life.
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 2).await;
    let sim = bearer_simulator("s-refresh").await;
    let (_file, gw) = client_secret_gateway(&entra, &sim).await;
    chat_ok(&gw).await;
    chat_ok(&gw).await;
    assert_eq!(entra.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Due for refresh: this call still goes with the valid token, and starts the refresh.
    chat_ok(&gw).await;
    for _ in 0..100 {
        if entra.issued().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(entra.token_requests(), 2, "refreshed before expiry");
    chat_ok(&gw).await;
    let tokens = bearer_tokens(&sim);
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!(tokens[1], tokens[2]);
    assert_ne!(tokens[2], tokens[3]);
    let issued: Vec<String> = entra.issued().into_iter().map(|(t, _)| t).collect();
    assert_eq!(tokens[3], issued[1]);
}

/// A token due for refresh but still valid serves while the refresh runs: a slow (or
/// unreachable) token endpoint delays no call, and a failed refresh is not tried again on every
/// call.
#[tokio::test]
async fn a_slow_token_endpoint_delays_no_call_while_the_token_is_valid() {
    // A 4-second token: due for refresh after 2 s, usable until 3 s.
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 4).await;
    let sim = bearer_simulator("s-slow-refresh").await;
    let (_file, gw) = client_secret_gateway(&entra, &sim).await;
    chat_ok(&gw).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    entra.set_delay(Duration::from_secs(30));
    chat_ok(&gw).await;
    for _ in 0..100 {
        if entra.token_requests() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..5 {
        chat_ok(&gw).await;
    }
    // Answered while the one refresh the first of them started still waits on the endpoint.
    assert_eq!(entra.token_requests(), 2, "one refresh, not one per call");
    assert_eq!(entra.issued().len(), 1, "no new token came yet");
    let tokens = bearer_tokens(&sim);
    assert!(tokens.iter().all(|token| *token == tokens[0]));
}

#[tokio::test]
async fn certificate_credential_signs_an_assertion_the_endpoint_verifies() {
    let (der, pem) = test_certificate("gatehouse-test-client");
    let entra = EntraDouble::start(
        Proof::Certificate {
            der,
            pem: pem.clone(),
        },
        3600,
    )
    .await;
    let sim = bearer_simulator("s-cert").await;
    let (_file, certificate) = secret_file(&pem);
    let mut m = member("m", &sim.url(), 1);
    m["credential"] = json!({
        "type": "entra_certificate",
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "certificate": certificate,
        "authority_host": entra.url,
    });
    let gw = TestGateway::start(snapshot(1, pool(json!([m])))).await;
    chat_ok(&gw).await;
    chat_ok(&gw).await;
    assert_eq!(entra.token_requests(), 1);
    assert_eq!(
        entra
            .state
            .assertions_verified
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "signature, aud, iss/sub, nbf/exp, jti and x5t#S256 verified"
    );
    assert_eq!(bearer_tokens(&sim)[0], entra.issued()[0].0);

    // The same key in another certificate has another thumbprint: refused, with Entra's code.
    let (_, other_pem) = test_certificate("another-certificate");
    let other = TokenCredential::certificate(
        TENANT,
        CLIENT_ID,
        SecretValue::new(Secret::new(other_pem)),
        Some(&url::Url::parse(&entra.url).unwrap()),
    )
    .unwrap();
    match other.token(COGNITIVE_SERVICES_SCOPE).await {
        Err(CredentialError::Refused { status, code, .. }) => {
            assert_eq!(status, 401);
            assert_eq!(code, "invalid_client (AADSTS700027)");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A PEM without a usable key is refused when the snapshot is built.
    let (_bad_file, bad) =
        secret_file("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----");
    let mut m = member("m2", &sim.url(), 1);
    m["credential"] = json!({
        "type": "entra_certificate", "tenant_id": TENANT, "client_id": CLIENT_ID,
        "certificate": bad, "authority_host": entra.url,
    });
    let response = gw.push_config(&snapshot(2, pool(json!([m])))).await;
    let message = azure_error(response, 422).await;
    assert!(
        message
            .contains("pools[0].members[0].credential.certificate: the certificate cannot be used"),
        "{message}"
    );
}

#[tokio::test]
async fn managed_identity_tokens_come_from_imds_with_the_metadata_header() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    let sim = bearer_simulator("s-mi").await;
    let mut m = member("m", &sim.url(), 1);
    m["credential"] = json!({
        "type": "managed_identity",
        "client_id": MI_CLIENT_ID,
        "endpoint": entra.imds_url(),
    });
    let gw = TestGateway::start(snapshot(1, pool(json!([m])))).await;
    chat_ok(&gw).await;
    chat_ok(&gw).await;
    assert_eq!(entra.identity_requests(), 1);
    let issued = entra.issued();
    // IMDS takes a resource: the scope without `/.default`.
    assert_eq!(issued[0].1, "https://cognitiveservices.azure.com");
    assert_eq!(
        bearer_tokens(&sim),
        [issued[0].0.clone(), issued[0].0.clone()]
    );

    // The double insists on `Metadata: true`, as IMDS does.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let refused = plain
        .get(format!(
            "{}?api-version=2018-02-01&resource=https://vault.azure.net",
            entra.imds_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    // The App Service / Container Apps protocol: `X-IDENTITY-HEADER`, `expires_on`.
    let app_service = |header: &str| {
        TokenCredential::managed_identity(
            None,
            ManagedIdentityEndpoint::AppService {
                endpoint: url::Url::parse(&entra.app_service_url()).unwrap(),
                header: Secret::new(header.to_owned()),
            },
        )
        .unwrap()
    };
    let token = app_service(IDENTITY_HEADER)
        .access_token(KEY_VAULT_SCOPE)
        .await
        .unwrap();
    assert!(token.token.expose().starts_with(TOKEN_PREFIX));
    assert!(token.expires_at > std::time::Instant::now() + Duration::from_secs(3000));
    assert!(matches!(
        app_service("wrong-header").token(KEY_VAULT_SCOPE).await,
        Err(CredentialError::Refused { status: 401, .. })
    ));
}

#[tokio::test]
async fn a_member_without_a_token_is_set_aside_and_the_call_fails_over_or_gets_503() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    let first = bearer_simulator("s-first").await;
    let second = simulator("s-second").await;
    let (_wrong_file, wrong) = secret_file(WRONG_SECRET);
    let (_key_file, key_ref) = backend_key_file();
    let mut b = member("second", &second.url(), 2);
    b["credential"] = json!({"type": "api_key", "secret": key_ref});
    let gw = TestGateway::start(snapshot(
        1,
        pool(json!([
            client_secret_member("first", &first.url(), 1, &entra, &wrong),
            b
        ])),
    ))
    .await;

    let answered = chat_ok(&gw).await;
    assert_eq!(answered.headers()["x-gatehouse-simulator"], "s-second");
    assert_eq!(first.hits(), 0, "no call without a token");
    assert_eq!(entra.token_requests(), 1);
    // The member is set aside: the next call goes straight to the second one.
    chat_ok(&gw).await;
    assert_eq!(entra.token_requests(), 1);
    let records = gw.records(2).await;
    let attempts = &records[0].attempts;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].backend_id, "first");
    assert_eq!(attempts[0].status, None);
    let reason = attempts[0].error.as_deref().unwrap();
    assert!(reason.starts_with("credential_failed:"), "{reason}");
    assert!(
        reason.contains("invalid_client (AADSTS7000215)"),
        "{reason}"
    );
    assert_eq!(attempts[1].status, Some(200));
    // The record names the member that answered.
    assert_eq!(records[0].backend_id.as_deref(), Some("second"));
    assert!(
        records[0]
            .backend_url
            .as_deref()
            .unwrap()
            .starts_with(&second.url())
    );
    assert_eq!(records[1].attempts.len(), 1);

    // A pool whose only member gets no token answers 503, Azure-shaped, without secrets.
    entra.set_failing(true);
    let (_good_file, good) = secret_file(CLIENT_SECRET);
    let only = TestGateway::start(snapshot(
        1,
        pool(json!([client_secret_member(
            "only",
            &first.url(),
            1,
            &entra,
            &good
        )])),
    ))
    .await;
    let response = only
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body = response.text().await.unwrap();
    let parsed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["error"]["code"], "503");
    assert!(
        parsed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("No backend")
    );
    let record = &only.records(1).await[0];
    assert_eq!(record.response_code, 503);
    // The member whose failure the client got, with its URL (never sent).
    assert_eq!(record.backend_id.as_deref(), Some("only"));
    assert!(
        record
            .backend_url
            .as_deref()
            .unwrap()
            .starts_with(&first.url())
    );
    assert!(
        record.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("temporarily_unavailable (AADSTS50196)")
    );
    let record_text = serde_json::to_string(&record).unwrap();
    for secret in [CLIENT_SECRET, WRONG_SECRET, BACKEND_KEY] {
        assert!(!body.contains(secret));
        assert!(!record_text.contains(secret));
        assert!(!serde_json::to_string(&records).unwrap().contains(secret));
    }
}

/// The gateway's own credential: client secret against `entra`.
fn gateway_credential(entra: &EntraDouble) -> TokenCredential {
    TokenCredential::client_secret(
        TENANT,
        CLIENT_ID,
        SecretValue::new(Secret::new(GATEWAY_SECRET.to_owned())),
        Some(&url::Url::parse(&entra.url).unwrap()),
    )
    .unwrap()
}

fn key_vault_settings(entra: &EntraDouble, refresh: Duration) -> SecretSettings {
    SecretSettings {
        entra_credential: Some(gateway_credential(entra)),
        key_vault_refresh: refresh,
        ..SecretSettings::default()
    }
}

#[tokio::test]
async fn a_key_vault_backend_key_is_used_and_its_rotation_takes_effect_without_restart() {
    let entra = EntraDouble::start(Proof::Secret(GATEWAY_SECRET.to_owned()), 3600).await;
    let vault = KeyVaultDouble::start(&entra).await;
    vault.set("aoai-key", "kv-backend-key-version-1");
    let sim = simulator("s-kv").await;
    let mut m = member("m", &sim.url(), 1);
    m["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let gw = TestGateway::start_with_secrets(
        snapshot(1, pool(json!([m]))),
        key_vault_settings(&entra, Duration::from_millis(200)),
    )
    .await;
    chat_ok(&gw).await;
    let seen_key = |sim: &RunningSimulator| {
        sim.requests()
            .last()
            .and_then(|r| r.header("api-key").map(str::to_owned))
    };
    assert_eq!(seen_key(&sim).as_deref(), Some("kv-backend-key-version-1"));

    vault.set("aoai-key", "kv-backend-key-version-2");
    let mut rotated = false;
    for _ in 0..50 {
        chat_ok(&gw).await;
        if seen_key(&sim).as_deref() == Some("kv-backend-key-version-2") {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the rotated key was never used");

    // Key Vault down: refreshes fail, the last value stays in use.
    vault.set_failing(true);
    let before = vault.requests();
    for _ in 0..50 {
        if vault.requests() >= before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(vault.requests() >= before + 2, "the refresher kept trying");
    chat_ok(&gw).await;
    assert_eq!(seen_key(&sim).as_deref(), Some("kv-backend-key-version-2"));
    // One token for Key Vault served every read.
    assert_eq!(entra.token_requests(), 1);
    assert_eq!(entra.issued()[0].1, KEY_VAULT_SCOPE);
}

#[tokio::test]
async fn a_key_vault_client_secret_authenticates_a_member() {
    let entra = EntraDouble::start(Proof::Secret(CLIENT_SECRET.to_owned()), 3600).await;
    // The gateway's own identity is a managed identity here; the member's secret is in the vault.
    let vault = KeyVaultDouble::start(&entra).await;
    vault.set("member-client-secret", CLIENT_SECRET);
    let sim = bearer_simulator("s-kv-secret").await;
    let reference = format!(
        "{}/0123456789abcdef0123456789abcdef",
        vault.reference("member-client-secret")
    );
    let gw = TestGateway::start_with_secrets(
        snapshot(
            1,
            pool(json!([client_secret_member(
                "m",
                &sim.url(),
                1,
                &entra,
                &reference
            )])),
        ),
        SecretSettings {
            entra_credential: Some(
                TokenCredential::managed_identity(
                    Some(MI_CLIENT_ID),
                    ManagedIdentityEndpoint::Imds(url::Url::parse(&entra.imds_url()).unwrap()),
                )
                .unwrap(),
            ),
            key_vault_refresh: Duration::from_secs(300),
            ..SecretSettings::default()
        },
    )
    .await;
    chat_ok(&gw).await;
    let issued = entra.issued();
    assert_eq!(
        issued[0].1, "https://vault.azure.net",
        "IMDS token for Key Vault"
    );
    assert_eq!(
        issued[1].1, COGNITIVE_SERVICES_SCOPE,
        "member token with the vault's secret"
    );
    assert_eq!(bearer_tokens(&sim), [issued[1].0.clone()]);
}

#[tokio::test]
async fn an_unfetchable_key_vault_secret_rejects_the_snapshot() {
    let entra = EntraDouble::start(Proof::Secret(GATEWAY_SECRET.to_owned()), 3600).await;
    let vault = KeyVaultDouble::start(&entra).await;
    vault.set("aoai-key", "kv-backend-key-version-1");
    let sim = simulator("s-kv-bad").await;
    let mut good = member("m", &sim.url(), 1);
    good["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let gw = TestGateway::start_with_secrets(
        snapshot(1, pool(json!([good]))),
        key_vault_settings(&entra, Duration::from_secs(300)),
    )
    .await;

    let mut bad = member("m", &sim.url(), 1);
    bad["credential"] = json!({"type": "api_key", "secret": vault.reference("no-such-secret")});
    let response = gw.push_config(&snapshot(2, pool(json!([bad])))).await;
    let message = azure_error(response, 422).await;
    assert!(
        message.starts_with("pools[0].members[0].credential.secret: Key Vault secret"),
        "{message}"
    );
    assert!(message.contains("HTTP 404: SecretNotFound"), "{message}");
    assert!(!message.contains("kv-backend-key"), "{message}");
    assert_eq!(
        gw.gateway.runtime().snapshot.version,
        1,
        "the running snapshot stays"
    );
    chat_ok(&gw).await;

    // Without the gateway's own credential a Key Vault reference cannot be resolved at all.
    let mut m = member("m", &sim.url(), 1);
    m["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let error = TestGateway::try_start_with_secrets(
        snapshot(1, pool(json!([m]))),
        SecretSettings::default(),
    )
    .await
    .err()
    .expect("refused")
    .to_string();
    assert!(
        error.contains("pools[0].members[0].credential.secret")
            && error.contains("server.entra_credential"),
        "{error}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn no_credential_secret_token_or_vault_value_reaches_logs_records_or_errors() {
    let (logs, _guard) = CapturedLogs::install(tracing::Level::TRACE);

    // Gateway identity (client secret) reads the vault; members use a wrong client secret (fails),
    // a certificate, and a key from the vault that rotates.
    let (der, pem) = test_certificate("gatehouse-test-client");
    let entra = EntraDouble::start(
        Proof::Certificate {
            der,
            pem: pem.clone(),
        },
        3600,
    )
    .await;
    let gateway_entra = EntraDouble::start(Proof::Secret(GATEWAY_SECRET.to_owned()), 3600).await;
    let vault = KeyVaultDouble::start(&gateway_entra).await;
    vault.set("aoai-key", "kv-secret-value-one-7f3a9");
    let bearer_sim = bearer_simulator("s-bearer").await;
    let key_sim = simulator("s-key").await;
    let (_cert_file, certificate) = secret_file(&pem);
    let (_wrong_file, wrong) = secret_file(WRONG_SECRET);

    let failing = client_secret_member("failing", &bearer_sim.url(), 1, &entra, &wrong);
    let mut cert = member("cert", &bearer_sim.url(), 2);
    cert["credential"] = json!({
        "type": "entra_certificate", "tenant_id": TENANT, "client_id": CLIENT_ID,
        "certificate": certificate, "authority_host": entra.url,
    });
    let mut keyed = member("keyed", &key_sim.url(), 1);
    keyed["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let gw = TestGateway::start_with_secrets(
        snapshot(
            1,
            json!([
                {"id": "p", "deployments": ["gpt-4o"], "members": [failing, cert]},
                {"id": "q", "deployments": ["gpt-4o-mini"], "members": [keyed]},
            ]),
        ),
        key_vault_settings(&gateway_entra, Duration::from_millis(100)),
    )
    .await;

    let mut bodies = Vec::new();
    for deployment in ["gpt-4o", "gpt-4o", "gpt-4o-mini"] {
        let response = gw
            .post(&chat_path(deployment))
            .json(&chat(None, true))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.text().await.unwrap());
    }
    vault.set("aoai-key", "kv-secret-value-two-81c4e");
    for _ in 0..50 {
        let response = gw
            .post(&chat_path("gpt-4o-mini"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        bodies.push(response.text().await.unwrap());
        if key_sim
            .requests()
            .last()
            .and_then(|r| r.header("api-key").map(str::to_owned))
            == Some("kv-secret-value-two-81c4e".to_owned())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vault.set_failing(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rejected = member("keyed", &key_sim.url(), 1);
    rejected["credential"] = json!({"type": "api_key", "secret": vault.reference("gone")});
    let put = gw
        .push_config(&snapshot(
            2,
            json!([{"id": "q", "deployments": ["gpt-4o-mini"], "members": [rejected]}]),
        ))
        .await;
    assert_eq!(put.status(), 422);
    bodies.push(put.text().await.unwrap());

    let records = serde_json::to_string(&gw.records(3).await).unwrap();
    let logs = logs.text();
    assert!(
        logs.contains("Key Vault secret refresh failed"),
        "the failed refresh warns"
    );
    assert!(
        logs.contains("invalid_client"),
        "the token failure is logged"
    );
    let mut secrets: Vec<String> = [
        CLIENT_SECRET,
        WRONG_SECRET,
        GATEWAY_SECRET,
        "kv-secret-value-one-7f3a9",
        "kv-secret-value-two-81c4e",
    ]
    .map(str::to_owned)
    .to_vec();
    secrets.extend(entra.issued().into_iter().map(|(token, _)| token));
    secrets.extend(gateway_entra.issued().into_iter().map(|(token, _)| token));
    secrets.extend(entra.assertions());
    // Every base64 line of the private key.
    let key_pem = test_rsa_key().serialize_pem();
    secrets.extend(
        key_pem
            .lines()
            .filter(|line| !line.starts_with("-----") && line.len() > 20)
            .map(str::to_owned),
    );
    assert!(secrets.len() > 10);
    for secret in &secrets {
        assert!(
            !records.contains(secret.as_str()),
            "a secret in an audit record"
        );
        assert!(!logs.contains(secret.as_str()), "a secret in a log line");
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "a secret in a response body"
            );
        }
    }
}

/// A push whose client leaves while the snapshot is built (here: its member's key is still being
/// fetched from Key Vault, behind a slow token) is applied whole all the same: the running
/// snapshot and the last-known-good file agree, never one without the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_client_leaves_midway_is_applied_whole() {
    let entra = EntraDouble::start(Proof::Secret(GATEWAY_SECRET.to_owned()), 3600).await;
    let vault = KeyVaultDouble::start(&entra).await;
    vault.set("aoai-key", "kv-backend-key");
    let sim = simulator("s-kv-push").await;
    let gw = TestGateway::start_with_secrets(
        snapshot(1, pool(json!([member("m", &sim.url(), 1)]))),
        key_vault_settings(&entra, Duration::from_secs(300)),
    )
    .await;
    entra.set_delay(Duration::from_millis(1500));
    let mut keyed = member("m", &sim.url(), 1);
    keyed["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let pushed = serde_json::to_value(snapshot(2, pool(json!([keyed])))).unwrap();
    let left = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap()
        .put(format!("{}/_gatehouse/config", gw.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&pushed)
        .send()
        .await;
    assert!(left.is_err(), "the client gave up before the answer");
    let saved = gw.state_dir.path().join("last-known-good.json");
    let mut applied = false;
    for _ in 0..100 {
        if gw.gateway.runtime().snapshot.version == 2 {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(applied, "the push was applied once its key came");
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(on_disk["version"], 2);
    entra.set_delay(Duration::ZERO);
    chat_ok(&gw).await;
    assert_eq!(
        sim.requests().last().unwrap().header("api-key"),
        Some("kv-backend-key")
    );
}
