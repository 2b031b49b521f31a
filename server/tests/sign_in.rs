//! OpenID Connect sign-in against a local provider double (`common::provider`) that serves
//! discovery and JWKS and signs ID tokens with the committed test keys
//! (`gateway/tests/fixtures/entra/`): PKCE, state, nonce, issuer, audience, signature and expiry
//! are all checked; the session id changes at sign-in; roles come from the `roles` claim or the
//! group mapping.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use common::provider::{Mode, fixture, info, oidc, provider, provider_with, sign_in};
use common::{Browser, location};
use gatehouse_portal::oidc::ClientCertificate;
use serde_json::{Value, json};
use url::Url;

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
    browser.create_subscription(&portal, "team-a", "A").await;
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

/// The development sign-in never runs beside OpenID Connect: anyone could take Admin there.
#[tokio::test(flavor = "multi_thread")]
async fn the_dev_sign_in_is_refused_beside_openid_connect() {
    let provider = provider().await;
    let refused = common::try_start_with(Some(oidc(&provider)), |settings| {
        settings.dev_sign_in = true;
    })
    .await;
    let error = refused
        .err()
        .expect("the portal started with both sign-ins");
    assert!(error.to_string().contains("OpenID Connect"), "{error}");
}

/// What the identity provider's `error` says reaches the log quoted: a line break in it, which
/// anyone can put in the callback's query, forges no log line.
#[tokio::test]
async fn an_error_in_the_callback_forges_no_log_line() {
    let (logs, _guard) = common::CapturedLogs::install_text();
    let provider = provider().await;
    let portal = common::start(Some(oidc(&provider))).await;
    let mut browser = Browser::new(&portal);
    browser.get(&format!("{}/auth/sign-in", portal.url)).await;
    let response = browser
        .get(&format!(
            "{}/auth/callback?error=access_denied%0AFORGED%20INFO%20signed%20in%20roles=[Admin]",
            portal.url
        ))
        .await;
    assert_eq!(response.status(), 403);
    let text = logs.text();
    assert!(text.contains("refused the sign-in"), "{text}");
    assert!(
        !text.lines().any(|line| line.starts_with("FORGED")),
        "{text}"
    );
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
