//! Entra ID access tokens and access rules, against a local OpenID provider and Graph double.

use base64::Engine as _;
use gatehouse_gateway::SecretSettings;
use gatehouse_gateway::entra_credential::TokenCredential;
use gatehouse_gateway::secret::{Secret, SecretValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::azure_identity_double::{self as identity, EntraDouble as TokenEndpoint, Proof};
use crate::entra_double::*;
use crate::harness::*;

const GATEWAY_SECRET: &str = "gateway-graph-client-secret-0123456789";
const GROUP_CHAT: &str = "aaaaaaaa-0000-0000-0000-00000000c4a7";
const GROUP_EMBED: &str = "bbbbbbbb-0000-0000-0000-0000000e3bed";

fn pools(url: &str) -> Value {
    json!([{"id": "p", "deployments": ["gpt-4o", "text-embedding-3-small"], "members": [member("a", url, 1)]}])
}

/// A snapshot that trusts the double, with optional access rules.
fn entra_snapshot(
    version: u64,
    double: &EntraDouble,
    url: &str,
    require: &str,
    rules: Option<Value>,
) -> gatehouse_schema::ConfigSnapshot {
    let mut value = serde_json::to_value(snapshot(version, pools(url))).unwrap();
    value["identity"] = double.identity(require);
    if let Some(rules) = rules {
        value["access_rules"] = rules;
    }
    serde_json::from_value(value).unwrap()
}

fn group_rules() -> Value {
    json!([
        {"id": "chat", "grantee": {"kind": "group", "id": GROUP_CHAT, "display_name": "Chat users"},
         "deployments": ["gpt-4o"], "operations": ["chatcompletions_create"]},
        {"id": "embed", "grantee": {"kind": "group", "id": GROUP_EMBED},
         "deployments": ["text-embedding-*"]},
    ])
}

async fn call_with_token(gw: &TestGateway, token: &str) -> reqwest::Response {
    gw.raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .bearer_auth(token)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap()
}

async fn embed_with_token(gw: &TestGateway, token: &str) -> reqwest::Response {
    gw.raw(
        reqwest::Method::POST,
        "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21",
    )
    .bearer_auth(token)
    .json(&json!({"input": "hello"}))
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn v1_and_v2_tokens_of_two_tenants_are_accepted_and_recorded() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-ok").await;
    let gw = TestGateway::start(entra_snapshot(1, &double, &sim.url(), "key_or_token", None)).await;

    let v1 = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V1,
            "0000000a-0000-0000-0000-000000000001",
            &[GROUP_CHAT],
        ),
    );
    let v2 = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_B,
            Ver::V2,
            "0000000b-0000-0000-0000-000000000002",
            &[],
        ),
    );
    assert_eq!(call_with_token(&gw, &v1).await.status(), 200);
    assert_eq!(call_with_token(&gw, &v2).await.status(), 200);
    // A subscription key still works alongside.
    let by_key = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status(), 200);
    assert_eq!(sim.hits(), 3);
    // The backend never sees the caller's token.
    assert!(sim.requests().iter().all(|r| {
        r.header("authorization")
            .is_none_or(|v| !v.contains(&v1) && !v.contains(&v2))
    }));

    let records = gw.records(3).await;
    let first = records
        .iter()
        .find(|r| r.user_id.as_deref() == Some("0000000a-0000-0000-0000-000000000001"))
        .expect("record of the v1 caller");
    assert_eq!(first.tenant_id.as_deref(), Some(TENANT_A));
    assert_eq!(
        first.user_name.as_deref(),
        Some("0000000a-0000-0000-0000-000000000001@contoso.example")
    );
    assert_eq!(first.groups, vec![GROUP_CHAT.to_owned()]);
    assert_eq!(first.apim_subscription_id, None);
    let second = records
        .iter()
        .find(|r| r.tenant_id.as_deref() == Some(TENANT_B))
        .expect("record of the v2 caller");
    assert_eq!(
        second.user_id.as_deref(),
        Some("0000000b-0000-0000-0000-000000000002")
    );
    // No record holds a token.
    for record in &records {
        let text = serde_json::to_string(record).unwrap();
        assert!(!text.contains(&v1) && !text.contains(&v2));
    }
    // Metadata and keys were fetched once per tenant and version, not per call.
    assert_eq!(double.key_fetches(), 2);
}

/// Replaces the payload of a signed token, keeping its header and signature.
fn with_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_no_backend_call() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-bad").await;
    let gw = TestGateway::start(entra_snapshot(1, &double, &sim.url(), "key_or_token", None)).await;
    let oid = "0000000a-0000-0000-0000-00000000000a";
    let good = double.user_claims(TENANT_A, Ver::V2, oid, &[]);
    // The good token works, so each refusal below is down to the one thing changed.
    assert_eq!(
        call_with_token(&gw, &sign(TestKey::A, &good))
            .await
            .status(),
        200
    );
    let hits_before = sim.hits();

    let altered = |change: &dyn Fn(&mut Value)| {
        let mut claims = good.clone();
        change(&mut claims);
        claims
    };
    let now = now();
    let mut cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            sign(
                TestKey::A,
                &altered(&|c| {
                    c["exp"] = json!(now - 600);
                    c["nbf"] = json!(now - 4000);
                }),
            ),
            "expired",
        ),
        (
            "not yet valid",
            sign(TestKey::A, &altered(&|c| c["nbf"] = json!(now + 600))),
            "not valid yet",
        ),
        (
            "wrong audience",
            sign(
                TestKey::A,
                &altered(&|c| c["aud"] = json!("api://someone-else")),
            ),
            "audience",
        ),
        (
            "wrong issuer",
            sign(
                TestKey::A,
                &altered(&|c| c["iss"] = json!(format!("https://evil.example/{TENANT_A}/v2.0"))),
            ),
            "issuer",
        ),
        (
            "issuer of another allowed tenant",
            sign(
                TestKey::A,
                &altered(&|c| c["iss"] = json!(double.issuer(TENANT_B, Ver::V2))),
            ),
            "issuer",
        ),
        (
            "tenant not allowed",
            sign(
                TestKey::A,
                &altered(&|c| {
                    c["tid"] = json!(TENANT_EVIL);
                    c["iss"] = json!(double.issuer(TENANT_EVIL, Ver::V2));
                }),
            ),
            "tenant",
        ),
        (
            "v1 issuer on a v2 token",
            sign(
                TestKey::A,
                &altered(&|c| c["iss"] = json!(double.issuer(TENANT_A, Ver::V1))),
            ),
            "issuer",
        ),
        (
            "missing exp",
            sign(
                TestKey::A,
                &altered(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
            "exp",
        ),
        (
            "tampered payload",
            with_payload(
                &sign(TestKey::A, &good),
                &altered(&|c| c["oid"] = json!("00000000-0000-0000-0000-00000000beef")),
            ),
            "signature",
        ),
    ];
    // OpenID Connect ID tokens of the same tenant and keys, their `aud` accepted: they name
    // no client application (`azp` in v2, `appid` in v1), which every access token does.
    let id_token = |ver: Ver, client_claim: &str| {
        let mut claims = double.user_claims(TENANT_A, ver, oid, &[]);
        let object = claims.as_object_mut().unwrap();
        object.remove(client_claim);
        object.remove("scp");
        object.insert("nonce".to_owned(), json!("n-0S6_WzA2Mj"));
        sign(TestKey::A, &claims)
    };
    cases.push((
        "v2 ID token",
        id_token(Ver::V2, "azp"),
        "not an access token",
    ));
    cases.push((
        "v1 ID token",
        id_token(Ver::V1, "appid"),
        "not an access token",
    ));
    // Unknown kid: signed by a key the tenant does not publish.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("kid-unpublished".to_owned());
    let unknown_kid = jsonwebtoken::encode(
        &header,
        &good,
        &EncodingKey::from_rsa_pem(TestKey::B.private_pem()).unwrap(),
    )
    .unwrap();
    cases.push(("unknown kid", unknown_kid, "signing key"));
    // Key B under key A's kid: the signature does not verify.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(TestKey::A.kid().to_owned());
    let wrong_key = jsonwebtoken::encode(
        &header,
        &good,
        &EncodingKey::from_rsa_pem(TestKey::B.private_pem()).unwrap(),
    )
    .unwrap();
    cases.push(("signed by another key", wrong_key, "signature"));
    // `alg: none`, unsigned.
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        engine.encode(json!({"alg": "none", "typ": "JWT", "kid": "kid-a"}).to_string()),
        engine.encode(good.to_string())
    );
    cases.push(("alg none", none, "RS256"));
    // HS256 "signed" with the RSA public key (the algorithm-confusion attack).
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(TestKey::A.kid().to_owned());
    let hs256 = jsonwebtoken::encode(
        &header,
        &good,
        &EncodingKey::from_secret(include_bytes!(
            "../fixtures/entra/test-signing-key-a.public.pem"
        )),
    )
    .unwrap();
    cases.push(("HS256 with the public key", hs256, "RS256"));

    let count = cases.len();
    for (name, token, expected) in cases {
        let response = call_with_token(&gw, &token).await;
        let message = azure_error(response, 401).await;
        assert!(
            message.contains(expected),
            "{name}: message `{message}` should mention `{expected}`"
        );
        assert!(
            !message.contains(&token),
            "{name}: the token leaked into the error"
        );
    }
    // A valid token in the wrong header is taken for a subscription key, and fails as one.
    let good_token = sign(TestKey::A, &good);
    let response = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("api-key", &good_token)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(response, 401).await;
    assert!(message.contains("invalid subscription key"), "{message}");
    let response = gw
        .raw(
            reqwest::Method::POST,
            &format!("{}&subscription-key={good_token}", chat_path("gpt-4o")),
        )
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(response, 401).await;

    assert_eq!(
        sim.hits(),
        hits_before,
        "no refused call reached the backend"
    );
    // Every refusal is on record, without the token.
    let records = gw.records(1 + count + 2).await;
    let refused: Vec<_> = records.iter().filter(|r| r.response_code == 401).collect();
    assert_eq!(refused.len(), count + 2);
    assert!(
        refused
            .iter()
            .all(|r| r.last_error_reason.as_deref().is_some())
    );
    // The unknown kid did not make the gateway hammer the provider: one fetch for each token
    // version's key set (v2 at the first call, v1 for the v1 ID token), none more.
    assert_eq!(double.key_fetches(), 2);
}

/// A gateway taking tokens from `double` for `sim`, which fetches the signing keys again for an
/// unknown `kid` once a second at most.
async fn refetching_keys_after_a_second(
    double: &EntraDouble,
    sim: &gatehouse_simulator::RunningSimulator,
) -> TestGateway {
    let mut snapshot = entra_snapshot(1, double, &sim.url(), "token", None);
    snapshot
        .identity
        .entra
        .as_mut()
        .unwrap()
        .unknown_kid_refetch_seconds = 1;
    TestGateway::start(snapshot).await
}

#[tokio::test]
async fn signing_keys_rotate_mid_test() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-rotate").await;
    let gw = refetching_keys_after_a_second(&double, &sim).await;
    let claims = double.user_claims(
        TENANT_A,
        Ver::V2,
        "0000000a-0000-0000-0000-00000000000c",
        &[],
    );
    assert_eq!(
        call_with_token(&gw, &sign(TestKey::A, &claims))
            .await
            .status(),
        200
    );
    assert_eq!(double.key_fetches(), 1);

    // The provider rotates to key B; once the re-fetch interval has passed, a token signed with
    // B is accepted after one re-fetch, and tokens of the retired key A no longer are.
    double.publish(&[TestKey::B]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        call_with_token(&gw, &sign(TestKey::B, &claims))
            .await
            .status(),
        200
    );
    assert_eq!(double.key_fetches(), 2);
    let retired = call_with_token(&gw, &sign(TestKey::A, &claims)).await;
    let message = azure_error(retired, 401).await;
    assert!(message.contains("signing key"), "{message}");
    assert_eq!(sim.hits(), 2);
}

/// The provider rolls to a new key while its metadata cannot be fetched: a token signed with the
/// new key cannot be judged, which is not the token's fault, so it is answered 503 (try again),
/// not 401; once the keys can be fetched, it is accepted.
#[tokio::test]
async fn a_new_key_during_a_key_fetch_outage_is_unavailable_not_unknown() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-rollover-outage").await;
    let gw = refetching_keys_after_a_second(&double, &sim).await;
    let claims = double.user_claims(
        TENANT_A,
        Ver::V2,
        "0000000a-0000-0000-0000-00000000000d",
        &[],
    );
    assert_eq!(
        call_with_token(&gw, &sign(TestKey::A, &claims))
            .await
            .status(),
        200
    );
    double.publish(&[TestKey::A, TestKey::B]);
    double.fail_key_fetches(2);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let signed_with_b = sign(TestKey::B, &claims);
    // The re-fetch fails, and so does the next call within the interval.
    azure_error(call_with_token(&gw, &signed_with_b).await, 503).await;
    azure_error(call_with_token(&gw, &signed_with_b).await, 503).await;
    // Tokens of the key held are still served.
    assert_eq!(
        call_with_token(&gw, &sign(TestKey::A, &claims))
            .await
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    azure_error(call_with_token(&gw, &signed_with_b).await, 503).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let accepted = call_with_token(&gw, &signed_with_b).await;
    assert_eq!(accepted.status(), 200, "{}", accepted.text().await.unwrap());
}

/// Keys held longer than `keys_refresh_seconds` are fetched again before they are used; a key
/// the fresh set no longer has is retired on the very call that refreshed it.
#[tokio::test]
async fn a_key_gone_from_a_refreshed_key_set_is_refused_on_the_call_that_refreshed_it() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-refresh").await;
    let mut snapshot = entra_snapshot(1, &double, &sim.url(), "token", None);
    let entra = snapshot.identity.entra.as_mut().unwrap();
    entra.keys_refresh_seconds = 1;
    entra.unknown_kid_refetch_seconds = 1;
    let gw = TestGateway::start(snapshot).await;
    let token = |object_id: &str| {
        sign(
            TestKey::A,
            &double.user_claims(TENANT_A, Ver::V2, object_id, &[]),
        )
    };
    let first = token("0000000a-0000-0000-0000-000000000401");
    assert_eq!(call_with_token(&gw, &first).await.status(), 200);
    assert_eq!(double.key_fetches(), 1);

    // The provider retires key A; once the held set is stale, a token signed with A that was
    // never seen before is refused by the call that refreshes the set.
    double.publish(&[TestKey::B]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let unseen = token("0000000a-0000-0000-0000-000000000402");
    let message = azure_error(call_with_token(&gw, &unseen).await, 401).await;
    assert!(message.contains("signing key"), "{message}");
    assert_eq!(double.key_fetches(), 2);
    // And the token that passed before is judged again.
    azure_error(call_with_token(&gw, &first).await, 401).await;
    assert_eq!(sim.hits(), 1);
}

/// Tenant ids match without regard to case; however a token spells its tenant, it shares the
/// tenant's one key set, so spellings cannot multiply the key fetches the refetch interval limits.
#[tokio::test]
async fn a_tenant_spelled_in_other_cases_shares_one_key_set() {
    const TENANT: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let double = EntraDouble::start().await;
    let sim = simulator("entra-spelling").await;
    let mut snapshot = entra_snapshot(1, &double, &sim.url(), "token", None);
    snapshot.identity.entra.as_mut().unwrap().tenants = vec![TENANT.to_owned()];
    let gw = TestGateway::start(snapshot).await;
    let spellings = [
        TENANT.to_owned(),
        TENANT.to_ascii_uppercase(),
        "AaAaAaAa-BbBb-4cCc-8dDd-EeEeEeEeEeEe".to_owned(),
    ];
    for spelling in &spellings {
        let claims = double.user_claims(
            spelling,
            Ver::V2,
            "0000000a-0000-0000-0000-000000000501",
            &[],
        );
        let status = call_with_token(&gw, &sign(TestKey::A, &claims))
            .await
            .status();
        assert_eq!(status, 200, "{spelling}");
    }
    assert_eq!(double.key_fetches(), 1, "one key set for every spelling");
}

/// An identity provider that cannot be reached is the gateway's failure, not the token's: 503
/// in Azure's shape (a client may retry), with no URL or configuration in the message, and no
/// backend sees the call.
#[tokio::test]
async fn an_unreachable_identity_provider_is_503_without_its_address() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-down").await;
    let closed = format!("127.0.0.1:{}", free_port());
    let mut value =
        serde_json::to_value(entra_snapshot(1, &double, &sim.url(), "token", None)).unwrap();
    value["identity"]["entra"]["authority_host"] = json!(format!("http://{closed}"));
    let gw = TestGateway::start(serde_json::from_value(value).unwrap()).await;
    let claims = double.user_claims(
        TENANT_A,
        Ver::V2,
        "0000000a-0000-0000-0000-000000000601",
        &[],
    );
    let response = call_with_token(&gw, &sign(TestKey::A, &claims)).await;
    let message = azure_error(response, 503).await;
    assert!(message.contains("identity provider"), "{message}");
    assert!(!message.contains(&closed), "{message}");
    assert_eq!(sim.hits(), 0);
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("token_validation_unavailable")
    );
}

/// The first fetch of a tenant's signing keys fails (the provider is unreachable for a moment):
/// its tokens are refused with 503, and tried again a few seconds later, not only after the
/// five minutes that protect the provider from made-up key ids once keys are held.
#[tokio::test]
async fn a_failed_first_fetch_of_signing_keys_is_tried_again_soon() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-flaky").await;
    double.fail_key_fetches(1);
    let gw = TestGateway::start(entra_snapshot(1, &double, &sim.url(), "token", None)).await;
    let claims = double.user_claims(
        TENANT_A,
        Ver::V2,
        "0000000a-0000-0000-0000-000000000602",
        &[],
    );
    let token = sign(TestKey::A, &claims);
    let first = call_with_token(&gw, &token).await;
    azure_error(first, 503).await;
    tokio::time::sleep(
        gatehouse_gateway::entra::keys::FIRST_FETCH_RETRY + std::time::Duration::from_millis(200),
    )
    .await;
    let again = call_with_token(&gw, &token).await;
    assert_eq!(again.status(), 200, "{}", again.text().await.unwrap());
    assert_eq!(sim.hits(), 1);
}

#[tokio::test]
async fn a_member_of_two_groups_gets_the_union_and_one_in_none_is_refused() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-rules").await;
    let gw = TestGateway::start(entra_snapshot(
        1,
        &double,
        &sim.url(),
        "key_or_token",
        Some(group_rules()),
    ))
    .await;
    let both = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V2,
            "0000000a-0000-0000-0000-0000000000b0",
            &[GROUP_CHAT, GROUP_EMBED],
        ),
    );
    let chat_only = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V1,
            "0000000a-0000-0000-0000-0000000000c0",
            &[GROUP_CHAT],
        ),
    );
    let none = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V2,
            "0000000a-0000-0000-0000-0000000000d0",
            &[],
        ),
    );
    assert_eq!(call_with_token(&gw, &both).await.status(), 200);
    assert_eq!(embed_with_token(&gw, &both).await.status(), 200);
    assert_eq!(call_with_token(&gw, &chat_only).await.status(), 200);
    let message = azure_error(embed_with_token(&gw, &chat_only).await, 403).await;
    assert!(
        message.contains("'text-embedding-3-small'")
            && message.contains("no access rule grants it"),
        "{message}"
    );
    let message = azure_error(call_with_token(&gw, &none).await, 403).await;
    assert!(message.contains("'gpt-4o'"), "{message}");
    // The refusal does not reveal what other rules grant.
    assert!(!message.contains("embedding") && !message.contains(GROUP_CHAT));
    // A subscription key names no group: refused too, since no rule grants the subscription.
    let by_key = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(by_key, 403).await;
    assert_eq!(sim.hits(), 3);

    let records = gw.records(6).await;
    let denied: Vec<_> = records.iter().filter(|r| r.response_code == 403).collect();
    assert_eq!(denied.len(), 3);
    assert!(
        denied
            .iter()
            .all(|r| r.last_error_reason.as_deref() == Some("not_permitted"))
    );
    assert!(
        denied
            .iter()
            .any(|r| r.user_id.as_deref() == Some("0000000a-0000-0000-0000-0000000000d0"))
    );
}

#[tokio::test]
async fn a_rule_pushed_through_the_config_endpoint_takes_effect_on_the_next_call() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-push").await;
    let gw = TestGateway::start(entra_snapshot(
        1,
        &double,
        &sim.url(),
        "key_or_token",
        Some(json!([])),
    ))
    .await;
    let token = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V2,
            "0000000a-0000-0000-0000-0000000000e0",
            &[GROUP_CHAT],
        ),
    );
    azure_error(call_with_token(&gw, &token).await, 403).await;

    let next = entra_snapshot(2, &double, &sim.url(), "key_or_token", Some(group_rules()));
    let pushed = gw.push_config(&next).await;
    assert!(
        pushed.status().is_success(),
        "{}",
        pushed.text().await.unwrap()
    );
    assert_eq!(call_with_token(&gw, &token).await.status(), 200);

    // And taken away again.
    let revoked = entra_snapshot(3, &double, &sim.url(), "key_or_token", Some(json!([])));
    let pushed = gw.push_config(&revoked).await;
    assert!(pushed.status().is_success());
    azure_error(call_with_token(&gw, &token).await, 403).await;
    assert_eq!(sim.hits(), 1);
}

/// Claims of a user in more groups than a token carries: no `groups`, `_claim_names` and the
/// (never called) Azure AD Graph source instead.
fn overage_claims(double: &EntraDouble, tenant: &str, oid: &str) -> Value {
    let mut claims = double.user_claims(tenant, Ver::V2, oid, &[]);
    let object = claims.as_object_mut().unwrap();
    object.remove("groups");
    object.insert("_claim_names".to_owned(), json!({"groups": "src1"}));
    object.insert(
        "_claim_sources".to_owned(),
        json!({"src1": {"endpoint": format!("https://graph.windows.net/{tenant}/users/{oid}/getMemberObjects")}}),
    );
    claims
}

/// A gateway requiring tokens, with the group rules, whose own identity (client credentials
/// against a token-endpoint double whose tokens Graph trusts) is an app registered in
/// `tenants[0]` and consented in every one of `tenants`.
async fn overage_gateway(
    double: &EntraDouble,
    backend: &str,
    tenants: &[&str],
) -> (TestGateway, TokenEndpoint) {
    overage_gateway_caching(double, backend, tenants, 600).await
}

/// [`overage_gateway`] keeping Graph's answers `cache_seconds`.
async fn overage_gateway_caching(
    double: &EntraDouble,
    backend: &str,
    tenants: &[&str],
    cache_seconds: u64,
) -> (TestGateway, TokenEndpoint) {
    let token_endpoint = TokenEndpoint::start(Proof::Secret(GATEWAY_SECRET.to_owned()), 3600).await;
    for tenant in tenants {
        token_endpoint.consent_in(tenant);
    }
    double.trust_graph_tokens_of(&token_endpoint);
    let credential = TokenCredential::client_secret(
        tenants[0],
        identity::CLIENT_ID,
        SecretValue::new(Secret::new(GATEWAY_SECRET.to_owned())),
        Some(&url::Url::parse(&token_endpoint.url).unwrap()),
    )
    .unwrap();
    let mut snapshot = serde_json::to_value(entra_snapshot(
        1,
        double,
        backend,
        "token",
        Some(group_rules()),
    ))
    .unwrap();
    snapshot["identity"]["entra"]["graph"]["cache_seconds"] = json!(cache_seconds);
    let gw = TestGateway::start_with_secrets(
        serde_json::from_value(snapshot).unwrap(),
        SecretSettings {
            entra_credential: Some(credential),
            ..SecretSettings::default()
        },
    )
    .await;
    (gw, token_endpoint)
}

#[tokio::test]
async fn the_groups_overage_is_resolved_through_graph_and_cached() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage").await;
    // Registered in the users' tenant (A), as a single-tenant app is.
    let (gw, token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A]).await;
    let oid = "0000000a-0000-0000-0000-0000000000f0";
    double.set_graph_groups(oid, &["cccccccc-0000-0000-0000-000000000000", GROUP_CHAT]);
    let token = sign(TestKey::A, &overage_claims(&double, TENANT_A, oid));
    let first = call_with_token(&gw, &token).await;
    assert_eq!(first.status(), 200, "{}", first.text().await.unwrap());
    assert_eq!(call_with_token(&gw, &token).await.status(), 200);
    // The chat grant came from Graph, not from the token; embeddings are still not granted.
    azure_error(embed_with_token(&gw, &token).await, 403).await;
    assert_eq!(double.graph_calls(), 1, "Graph answers are cached per user");
    assert_eq!(
        token_endpoint.token_requests(),
        1,
        "one app token for Graph"
    );
    let records = gw.records(3).await;
    assert!(
        records
            .iter()
            .all(|r| r.groups.contains(&GROUP_CHAT.to_owned()))
    );

    // A user Graph does not know is refused, not let through.
    let stranger = "0000000a-0000-0000-0000-0000000000f1";
    let claims = overage_claims(&double, TENANT_A, stranger);
    let message = azure_error(call_with_token(&gw, &sign(TestKey::A, &claims)).await, 401).await;
    assert!(message.contains("group memberships"), "{message}");
    assert_eq!(sim.hits(), 2);
}

/// Groups from Graph are used at most `cache_seconds` after Graph gave them, also for a token
/// first seen while its user's answer was already in the cache (it was remembered for
/// `cache_seconds` from then, so a group removed in Entra went on granting for up to twice as
/// long).
#[tokio::test]
async fn groups_from_graph_are_not_used_past_their_cache_time_through_a_new_token() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage-age").await;
    let (gw, _token_endpoint) = overage_gateway_caching(&double, &sim.url(), &[TENANT_A], 3).await;
    let oid = "0000000a-0000-0000-0000-0000000000f3";
    double.set_graph_groups(oid, &[GROUP_CHAT]);
    let token = |n: u32| {
        let mut claims = overage_claims(&double, TENANT_A, oid);
        claims["uti"] = json!(format!("token-{n}"));
        sign(TestKey::A, &claims)
    };
    assert_eq!(call_with_token(&gw, &token(1)).await.status(), 200);
    // Graph was asked before this.
    let asked = std::time::Instant::now();
    // The user leaves the group; the cached answer still grants, through a new token too.
    double.set_graph_groups(oid, &[]);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let second = token(2);
    assert_eq!(call_with_token(&gw, &second).await.status(), 200);
    assert_eq!(double.graph_calls(), 1);
    // Past the cache time of Graph's answer (and before that of the second token's first use),
    // the new token is judged by a new answer.
    tokio::time::sleep(std::time::Duration::from_millis(3200).saturating_sub(asked.elapsed()))
        .await;
    azure_error(call_with_token(&gw, &second).await, 403).await;
    assert_eq!(double.graph_calls(), 2);
}

/// Graph throttling the gateway (429 with `Retry-After`) is not asked again before that wait is
/// over: the calls meanwhile are answered 503 at once, and the first one after it is served.
#[tokio::test]
async fn graph_is_not_asked_again_before_its_retry_after() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage-throttled").await;
    let (gw, _token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A]).await;
    let oid = "0000000a-0000-0000-0000-0000000000f4";
    double.set_graph_groups(oid, &[GROUP_CHAT]);
    double.throttle_graph(1, 2);
    let token = sign(TestKey::A, &overage_claims(&double, TENANT_A, oid));
    let throttled = std::time::Instant::now();
    for _ in 0..5 {
        let message = azure_error(call_with_token(&gw, &token).await, 503).await;
        assert!(message.contains("Microsoft Graph"), "{message}");
    }
    assert_eq!(double.graph_calls(), 1, "asked once, then waited");
    tokio::time::sleep(std::time::Duration::from_millis(2200).saturating_sub(throttled.elapsed()))
        .await;
    let served = call_with_token(&gw, &token).await;
    assert_eq!(served.status(), 200, "{}", served.text().await.unwrap());
    assert_eq!(double.graph_calls(), 2);
    assert_eq!(sim.hits(), 1);
}

/// Graph refusing the gateway itself (403: its app lacks the permission) is the gateway's
/// fault, not the caller's: 503 naming Graph, not a 401 that says the caller's groups could not
/// be resolved, and Graph is not asked again on every call meanwhile.
#[tokio::test]
async fn graph_refusing_the_gateways_own_token_is_503_and_paused() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage-forbidden").await;
    let (gw, _token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A]).await;
    let oid = "0000000a-0000-0000-0000-0000000000f5";
    double.set_graph_groups(oid, &[GROUP_CHAT]);
    double.forbid_graph(1);
    let token = sign(TestKey::A, &overage_claims(&double, TENANT_A, oid));
    for _ in 0..5 {
        let message = azure_error(call_with_token(&gw, &token).await, 503).await;
        assert!(message.contains("Microsoft Graph"), "{message}");
    }
    assert_eq!(double.graph_calls(), 1, "asked once, then paused");
    assert_eq!(sim.hits(), 0);
}

/// Parallel calls of one user whose token carries an overage (an SDK's concurrent requests with
/// a fresh token) ask Graph once: the others wait for that answer.
#[tokio::test]
async fn parallel_calls_of_one_overage_user_ask_graph_once() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage-parallel").await;
    let (gw, _token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A]).await;
    let oid = "0000000a-0000-0000-0000-0000000000f6";
    double.set_graph_groups(oid, &[GROUP_CHAT]);
    double.slow_graph(300);
    let token = sign(TestKey::A, &overage_claims(&double, TENANT_A, oid));
    let calls = (0..20).map(|_| call_with_token(&gw, &token));
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(double.graph_calls(), 1);
    assert_eq!(sim.hits(), 20);
}

/// A token of the implicit flow carries at most six groups: past them it says `hasgroups: true`
/// and no `groups` (azure-specs §5.3), and the groups are looked up in Graph as for an overage.
#[tokio::test]
async fn a_token_saying_hasgroups_is_looked_up_in_graph() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-hasgroups").await;
    let (gw, _token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A]).await;
    let oid = "0000000a-0000-0000-0000-0000000000f2";
    double.set_graph_groups(oid, &[GROUP_CHAT]);
    let mut claims = double.user_claims(TENANT_A, Ver::V1, oid, &[]);
    let object = claims.as_object_mut().unwrap();
    object.remove("groups");
    object.insert("hasgroups".to_owned(), json!(true));
    let answer = call_with_token(&gw, &sign(TestKey::A, &claims)).await;
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(double.graph_calls(), 1);
    assert!(
        gw.records(1).await[0]
            .groups
            .contains(&GROUP_CHAT.to_owned())
    );
}

/// A multi-tenant app registration: a user of the second tenant (B) with a groups overage is
/// looked up in Graph with a token of tenant B, since Graph answers about its token's directory;
/// the same object id in the app's own tenant (A) says nothing about them.
#[tokio::test]
async fn a_user_of_a_second_tenant_is_looked_up_in_graph_with_a_token_of_that_tenant() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-overage-b").await;
    let (gw, token_endpoint) = overage_gateway(&double, &sim.url(), &[TENANT_A, TENANT_B]).await;
    let in_tenant =
        |tenant: &str, oid: &str| sign(TestKey::A, &overage_claims(&double, tenant, oid));

    // A user of tenant B, in the chat group there.
    let user_b = "0000000b-0000-0000-0000-0000000000f0";
    double.set_graph_groups_in(TENANT_B, user_b, &[GROUP_CHAT]);
    let answer = call_with_token(&gw, &in_tenant(TENANT_B, user_b)).await;
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    let tenants: Vec<String> = token_endpoint
        .issued()
        .iter()
        .filter_map(|(token, _)| token_endpoint.tenant_of(token))
        .collect();
    assert_eq!(tenants, [TENANT_B], "one Graph token, from tenant B");

    // The same object id holds the chat group in tenant A: a user of B is not judged by it.
    let other = "0000000b-0000-0000-0000-0000000000f1";
    double.set_graph_groups_in(TENANT_A, other, &[GROUP_CHAT]);
    let message = azure_error(call_with_token(&gw, &in_tenant(TENANT_B, other)).await, 401).await;
    assert!(message.contains("group memberships"), "{message}");
    // And a user of the app's own tenant still gets a token of it.
    let answer = call_with_token(&gw, &in_tenant(TENANT_A, other)).await;
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert_eq!(sim.hits(), 2);
    assert_eq!(
        token_endpoint.token_requests(),
        2,
        "one token per tenant, cached"
    );
}

#[tokio::test]
async fn a_key_and_a_token_can_be_required_together() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-both").await;
    let gw = TestGateway::start(entra_snapshot(
        1,
        &double,
        &sim.url(),
        "key_and_token",
        None,
    ))
    .await;
    let token = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V2,
            "0000000a-0000-0000-0000-000000000100",
            &[],
        ),
    );
    let message = azure_error(call_with_token(&gw, &token).await, 401).await;
    assert!(message.contains("missing subscription key"), "{message}");
    let key_only = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(key_only, 401).await;
    assert!(
        message.contains("missing Entra ID access token"),
        "{message}"
    );
    let both = gw
        .post(&chat_path("gpt-4o"))
        .bearer_auth(&token)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 200);
    let wrong_key = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("api-key", "ghk_not-a-real-key")
        .bearer_auth(&token)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(wrong_key, 401).await;
    assert_eq!(sim.hits(), 1);
    let records = gw.records(4).await;
    let served = records.iter().find(|r| r.response_code == 200).unwrap();
    assert_eq!(served.apim_subscription_id.as_deref(), Some("team-a"));
    assert_eq!(
        served.user_id.as_deref(),
        Some("0000000a-0000-0000-0000-000000000100")
    );
}

#[tokio::test]
async fn limits_count_per_entra_user_and_share_one_counter_per_group() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-limits").await;
    let mut snapshot =
        serde_json::to_value(entra_snapshot(1, &double, &sim.url(), "token", None)).unwrap();
    snapshot["limits"] = json!([
        // The chat group's members share two calls a minute between them.
        {"id": "chat-group", "subject": {"kind": "group", "id": GROUP_CHAT}, "requests_per_minute": 2},
        // And no single user makes more than one call on the embeddings deployment.
        {"id": "per-user-embed", "subject": {"kind": "each_user"},
         "deployments": ["text-embedding-*"], "requests_per_minute": 1},
    ]);
    let gw = TestGateway::start(serde_json::from_value(snapshot).unwrap()).await;
    let user = |oid: &str, groups: &[&str]| {
        sign(
            TestKey::A,
            &double.user_claims(TENANT_A, Ver::V2, oid, groups),
        )
    };
    let first = user("0000000a-0000-0000-0000-000000000201", &[GROUP_CHAT]);
    let second = user("0000000a-0000-0000-0000-000000000202", &[GROUP_CHAT]);
    let outsider = user("0000000a-0000-0000-0000-000000000203", &[GROUP_EMBED]);

    assert_eq!(call_with_token(&gw, &first).await.status(), 200);
    assert_eq!(call_with_token(&gw, &second).await.status(), 200);
    // The group's two calls are used up, whoever of its members asks next.
    let refused = call_with_token(&gw, &first).await;
    assert!(refused.headers().contains_key("retry-after"));
    azure_error(refused, 429).await;
    azure_error(call_with_token(&gw, &second).await, 429).await;
    // Someone outside the group is not held by its counter.
    assert_eq!(call_with_token(&gw, &outsider).await.status(), 200);

    // Per user: each user's own counter.
    assert_eq!(embed_with_token(&gw, &outsider).await.status(), 200);
    azure_error(embed_with_token(&gw, &outsider).await, 429).await;
    let third = user("0000000a-0000-0000-0000-000000000204", &[]);
    assert_eq!(embed_with_token(&gw, &third).await.status(), 200);
    assert_eq!(sim.hits(), 5);
}

#[tokio::test]
async fn a_remembered_token_is_judged_again_under_a_new_policy() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-remember").await;
    let gw = TestGateway::start(entra_snapshot(1, &double, &sim.url(), "token", None)).await;
    let token = sign(
        TestKey::A,
        &double.user_claims(
            TENANT_A,
            Ver::V2,
            "0000000a-0000-0000-0000-000000000300",
            &[],
        ),
    );
    // Validated once, then served from memory.
    assert_eq!(call_with_token(&gw, &token).await.status(), 200);
    assert_eq!(call_with_token(&gw, &token).await.status(), 200);
    // The audience is no longer accepted: the same token is refused at once.
    let mut next = entra_snapshot(2, &double, &sim.url(), "token", None);
    next.identity.entra.as_mut().unwrap().audiences = vec!["api://another-api".to_owned()];
    let pushed = gw.push_config(&next).await;
    assert!(pushed.status().is_success());
    let message = azure_error(call_with_token(&gw, &token).await, 401).await;
    assert!(message.contains("audience"), "{message}");
    assert_eq!(sim.hits(), 2);
}

/// A call that arrived under the old policy and was still waiting (for room in the audit queue)
/// when a new one was installed is judged under the new one, as is the next call with the same
/// token: nothing it passed under the old policy is remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_when_the_identity_policy_is_replaced_is_judged_under_the_new_one() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-straddle").await;
    let gated = Gated::shut();
    let (queue, writer) = gated.queue(1).await;
    let gw = TestGateway::start_with_queue(
        entra_snapshot(1, &double, &sim.url(), "token", None),
        std::sync::Arc::new(tempfile::tempdir().unwrap()),
        gated.inner.clone(),
        queue,
        writer,
    )
    .await;
    let user = |object_id: &str| {
        sign(
            TestKey::A,
            &double.user_claims(TENANT_A, Ver::V2, object_id, &[]),
        )
    };
    let other = user("0000000a-0000-0000-0000-000000000301");
    let token = user("0000000a-0000-0000-0000-000000000302");
    // The first record holds the writer at the gate, the second fills the queue; the third call
    // waits for room before it is authenticated.
    assert_eq!(call_with_token(&gw, &other).await.status(), 200);
    gated.wait_for_a_write().await;
    assert_eq!(call_with_token(&gw, &other).await.status(), 200);
    let waiting = {
        let request = gw
            .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
            .bearer_auth(&token)
            .json(&chat(None, false));
        tokio::spawn(request.send())
    };
    for _ in 0..100 {
        if gw
            .metrics()
            .await
            .contains("gatehouse_audit_room_waits_total 1")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        gw.metrics()
            .await
            .contains("gatehouse_audit_room_waits_total 1")
    );

    // The audience is no longer accepted.
    let mut next = entra_snapshot(2, &double, &sim.url(), "token", None);
    next.identity.entra.as_mut().unwrap().audiences = vec!["api://another-api".to_owned()];
    assert!(gw.push_config(&next).await.status().is_success());
    gated.open.send_replace(true);
    // Refused under the policy in force when it went on, not the one it arrived under ...
    let message = azure_error(waiting.await.unwrap().unwrap(), 401).await;
    assert!(message.contains("audience"), "{message}");
    // ... and so is the next call with the token.
    let message = azure_error(call_with_token(&gw, &token).await, 401).await;
    assert!(message.contains("audience"), "{message}");
    assert_eq!(sim.hits(), 2);
}

#[tokio::test]
async fn app_only_tokens_are_told_apart_and_can_be_refused() {
    let double = EntraDouble::start().await;
    let sim = simulator("entra-app").await;
    let rules = json!([{"id": "batch-app", "grantee": {"kind": "app_role", "value": "Gatehouse.Caller"},
                        "deployments": ["gpt-4o"]}]);
    let gw = TestGateway::start(entra_snapshot(
        1,
        &double,
        &sim.url(),
        "token",
        Some(rules.clone()),
    ))
    .await;
    // A client-credentials token: no scp, no user names, idtyp = app, an app role.
    let mut claims = double.user_claims(
        TENANT_A,
        Ver::V2,
        "0000000a-0000-0000-0000-0000000000a9",
        &[],
    );
    let object = claims.as_object_mut().unwrap();
    for user_claim in ["scp", "preferred_username", "name", "groups"] {
        object.remove(user_claim);
    }
    object.insert("idtyp".to_owned(), json!("app"));
    object.insert(
        "azp".to_owned(),
        json!("5e3a0000-0000-0000-0000-00000000c11e"),
    );
    object.insert("roles".to_owned(), json!(["Gatehouse.Caller"]));
    let token = sign(TestKey::A, &claims);
    assert_eq!(call_with_token(&gw, &token).await.status(), 200);
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.user_id.as_deref(),
        Some("0000000a-0000-0000-0000-0000000000a9")
    );

    // A gateway that serves people only refuses it.
    let mut people_only = entra_snapshot(2, &double, &sim.url(), "token", Some(rules));
    people_only
        .identity
        .entra
        .as_mut()
        .unwrap()
        .accept_app_tokens = false;
    let gw = TestGateway::start(people_only).await;
    let message = azure_error(call_with_token(&gw, &token).await, 401).await;
    assert!(message.contains("app-only"), "{message}");
    assert_eq!(sim.hits(), 1);
}
