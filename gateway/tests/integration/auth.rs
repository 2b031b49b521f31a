//! Subscription keys: accepted from every documented place, refused without a backend call.

use gatehouse_schema::config::SubscriptionState;
use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn a_key_is_accepted_from_each_header_and_the_query() {
    let sim = simulator("auth-a").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let path = chat_path("gpt-4o");
    let body = chat(None, false);
    let variants = [
        gw.raw(reqwest::Method::POST, &path).header("api-key", KEY),
        gw.raw(reqwest::Method::POST, &path)
            .header("Ocp-Apim-Subscription-Key", KEY),
        gw.raw(reqwest::Method::POST, &path)
            .header("authorization", format!("Bearer {KEY}")),
        gw.raw(
            reqwest::Method::POST,
            &format!("{path}&subscription-key={KEY}"),
        ),
    ];
    for request in variants {
        let response = request.json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(sim.hits(), 4);
    let records = gw.records(4).await;
    assert!(
        records
            .iter()
            .all(|r| r.apim_subscription_id.as_deref() == Some("team-a"))
    );
    assert!(
        records
            .iter()
            .all(|r| r.product_id.as_deref() == Some("research"))
    );
    // The query key is not kept in the recorded URL.
    assert!(
        records.iter().all(|r| !r.url.contains(KEY)),
        "{:?}",
        records.iter().map(|r| &r.url).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn missing_wrong_and_revoked_keys_get_401_and_no_backend_call() {
    let sim = simulator("auth-b").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    let mut revoked = config.subscriptions[0].clone();
    revoked.id = "revoked".into();
    revoked.primary_key_hash = gatehouse_gateway::auth::hash_key("ghk_revoked");
    revoked.state = SubscriptionState::Revoked;
    config.subscriptions.push(revoked);
    let gw = TestGateway::start(config).await;
    let path = chat_path("gpt-4o");

    let missing = gw
        .raw(reqwest::Method::POST, &path)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(missing, 401).await;
    assert!(message.contains("missing subscription key"), "{message}");

    let wrong = gw
        .raw(reqwest::Method::POST, &path)
        .header("api-key", "ghk_wrong")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(wrong, 401).await;
    assert!(message.contains("invalid subscription key"), "{message}");

    let revoked = gw
        .raw(reqwest::Method::POST, &path)
        .header("api-key", "ghk_revoked")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(revoked, 401).await;

    assert_eq!(
        sim.hits(),
        0,
        "no backend may be called for an unauthenticated request"
    );
    let records = gw.records(3).await;
    assert!(
        records
            .iter()
            .all(|r| r.response_code == 401 && r.backend_id.is_none())
    );
}

#[tokio::test]
async fn the_callers_key_never_reaches_the_backend_which_gets_its_own() {
    let (_key_file, key_ref) = backend_key_file();
    let sim = simulator("auth-c").await;
    let mut azure = member("azure", &sim.url(), 1);
    azure["credential"] = json!({"type": "api_key", "secret": key_ref});
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [azure]}]),
    ))
    .await;
    let response = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("cookie", "session=abc")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = &sim.requests()[0];
    assert_eq!(seen.header("api-key"), Some(BACKEND_KEY));
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("cookie"), None);
    assert!(
        seen.headers.iter().all(|(_, v)| !v.contains(KEY)),
        "client key leaked: {:?}",
        seen.headers
    );
}
