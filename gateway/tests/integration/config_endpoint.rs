//! `PUT /_gatehouse/config`: authenticated, validated whole, versioned, persisted, atomic.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::harness::*;

fn pools(url: &str, deployment: &str) -> Value {
    json!([{"id": "p", "deployments": [deployment], "members": [member("a", url, 1)]}])
}

async fn put(gw: &TestGateway, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = gw
        .raw(reqwest::Method::PUT, "/_gatehouse/config")
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_newer_valid_snapshot_is_applied_persisted_and_used_at_the_next_start() {
    let sim = simulator("config").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let next = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o-mini"))).unwrap();

    let refused = put(&gw, None, &next).await;
    azure_error(refused, 401).await;
    let refused = put(&gw, Some("wrong-token"), &next).await;
    azure_error(refused, 401).await;

    let applied = put(&gw, Some(ADMIN_TOKEN), &next).await;
    assert_eq!(applied.status(), 200);
    assert_eq!(
        gw.post(&chat_path("gpt-4o-mini"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let stale = put(&gw, Some(ADMIN_TOKEN), &next).await;
    assert_eq!(stale.status(), 409);

    // A restart with the old file still runs version 2.
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;
    let gw = TestGateway::start_in(snapshot(1, pools(&sim.url(), "gpt-4o")), state_dir).await;
    assert_eq!(gw.gateway.runtime().snapshot.version, 2);
    assert_eq!(
        gw.post(&chat_path("gpt-4o-mini"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn an_invalid_snapshot_is_refused_whole_with_the_field_path() {
    let sim = simulator("config-bad").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;

    let mut bad = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o-mini"))).unwrap();
    bad["pools"][0]["members"][0]["weight"] = json!("heavy");
    let response = put(&gw, Some(ADMIN_TOKEN), &bad).await;
    let message = azure_error(response, 422).await;
    assert!(
        message.starts_with("pools[0].members[0].weight"),
        "{message}"
    );

    let mut bad = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o-mini"))).unwrap();
    bad["pools"][0]["members"][0]["endpoint"] = json!("ftp://example.invalid");
    let response = put(&gw, Some(ADMIN_TOKEN), &bad).await;
    let message = azure_error(response, 422).await;
    assert!(
        message.contains("pools[0].members[0].endpoint"),
        "{message}"
    );

    // Nothing of either changed the running config.
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);
    assert_eq!(
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn calls_during_swaps_see_one_config_or_the_other_never_a_mix() {
    let old = simulator("old").await;
    let new = simulator("new").await;
    let gw = Arc::new(TestGateway::start(snapshot(1, pools(&old.url(), "gpt-4o"))).await);
    let caller = {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..150 {
                let response = gw
                    .post(&chat_path("gpt-4o"))
                    .json(&chat(None, false))
                    .send()
                    .await
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        })
    };
    for version in 2..40u64 {
        let url = if version % 2 == 0 {
            new.url()
        } else {
            old.url()
        };
        let body = serde_json::to_value(snapshot(version, pools(&url, "gpt-4o"))).unwrap();
        assert_eq!(put(&gw, Some(ADMIN_TOKEN), &body).await.status(), 200);
    }
    let statuses = caller.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(old.hits() + new.hits(), 150);
}
