//! `PUT /_gatehouse/config`: authenticated, validated whole, versioned, persisted, atomic.

use std::sync::Arc;

use futures::StreamExt as _;
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
    let refusal: serde_json::Value = stale.json().await.unwrap();
    assert_eq!(refusal["error"]["code"], "409");
    assert_eq!(refusal["runningVersion"], 2);
    assert_eq!(
        refusal["sameContent"], true,
        "the very snapshot, pushed again"
    );
    let mut other = next.clone();
    other["trusted_proxies"] = serde_json::json!([]);
    let refusal: serde_json::Value = put(&gw, Some(ADMIN_TOKEN), &other)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(refusal["runningVersion"], 2);
    assert_eq!(refusal["sameContent"], false, "version 2, other content");

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

/// A pushed snapshot that no longer builds at the next start (its member's key file was removed
/// meanwhile) does not keep the gateway down: it says why and starts on the file's snapshot,
/// keeping the last-known-good file.
#[tokio::test]
async fn a_last_known_good_snapshot_that_no_longer_builds_gives_way_to_the_files() {
    let sim = simulator("config-lkg").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let key_file = push_a_snapshot_keyed_from_a_file(&gw, &sim.url()).await;
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;
    key_file.close().unwrap();

    let (logs, _guard) = CapturedLogs::install(tracing::Level::INFO);
    let gw = TestGateway::start_in(snapshot(1, pools(&sim.url(), "gpt-4o")), state_dir).await;
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
    let line = logs.line(
        "the last-known-good configuration could not be built; starting on the configuration \
         file's snapshot (the last-known-good file is kept)",
    );
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["fields"]["version"], 2);
    assert_eq!(line["fields"]["file_version"], 1);
    let problems = line["fields"]["problems"].as_str().unwrap();
    assert!(
        problems.contains("pools[0].members[0].credential.secret"),
        "{problems}"
    );
    assert!(!logs.text().contains(BACKEND_KEY));
    assert!(gw.state_dir.path().join("last-known-good.json").exists());
    let text = gw.metrics().await;
    assert!(
        text.contains("gatehouse_config_last_known_good_refused 2"),
        "{text}"
    );

    // The next push replaces it.
    let next = serde_json::to_value(snapshot(3, pools(&sim.url(), "gpt-4o"))).unwrap();
    assert_eq!(put(&gw, Some(ADMIN_TOKEN), &next).await.status(), 200);
    let text = gw.metrics().await;
    assert!(
        text.contains("gatehouse_config_last_known_good_refused 0"),
        "{text}"
    );
}

/// `/readyz` of a gateway started on its file's snapshot because the pushed one no longer
/// builds: 200 by default (the case above), 503 with the reason when
/// `server.ready_on_config_fallback` is false, and 200 again once a push installs a snapshot.
#[tokio::test]
async fn a_gateway_can_be_unready_while_it_runs_on_its_files_snapshot() {
    let sim = simulator("config-lkg-ready").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let key_file = push_a_snapshot_keyed_from_a_file(&gw, &sim.url()).await;
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;
    // Ready as long as the saved snapshot builds.
    let gw = TestGateway::start_in_unready_on_config_fallback(
        snapshot(1, pools(&sim.url(), "gpt-4o")),
        Arc::clone(&state_dir),
    )
    .await;
    assert_eq!(gw.gateway.runtime().snapshot.version, 2);
    assert_eq!(readyz(&gw).await, (200, "ready".to_owned()));
    gw.stop().await;
    key_file.close().unwrap();

    let gw = TestGateway::start_in_unready_on_config_fallback(
        snapshot(1, pools(&sim.url(), "gpt-4o")),
        state_dir,
    )
    .await;
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);
    let (status, reason) = readyz(&gw).await;
    assert_eq!(status, 503);
    assert!(
        reason.contains("the last-known-good configuration (version 2) could not be built"),
        "{reason}"
    );
    // It still serves the calls that reach it.
    let answered = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);

    let next = serde_json::to_value(snapshot(3, pools(&sim.url(), "gpt-4o"))).unwrap();
    assert_eq!(put(&gw, Some(ADMIN_TOKEN), &next).await.status(), 200);
    assert_eq!(readyz(&gw).await, (200, "ready".to_owned()));
}

/// Pushes version 2: one member whose key is read from a file, which the caller may remove so
/// that the saved snapshot no longer builds at the next start.
async fn push_a_snapshot_keyed_from_a_file(
    gw: &TestGateway,
    backend: &str,
) -> tempfile::NamedTempFile {
    let (key_file, key_ref) = backend_key_file();
    let mut keyed = member("keyed", backend, 1);
    keyed["credential"] = json!({"type": "api_key", "secret": key_ref});
    let pushed = serde_json::to_value(snapshot(
        2,
        json!([{"id": "p", "deployments": ["gpt-4o-mini"], "members": [keyed]}]),
    ))
    .unwrap();
    assert_eq!(put(gw, Some(ADMIN_TOKEN), &pushed).await.status(), 200);
    key_file
}

/// `/readyz`'s status and text.
async fn readyz(gw: &TestGateway) -> (u16, String) {
    let answer = gw.get("/readyz").send().await.unwrap();
    (answer.status().as_u16(), answer.text().await.unwrap())
}

/// A last-known-good file this gateway cannot read (written by a newer version, torn, edited by
/// hand) is an error in the log and in `gatehouse_config_last_known_good_refused`, as one that no
/// longer builds is, not a quiet warning; the gateway starts on the file's snapshot.
#[tokio::test]
async fn an_unreadable_last_known_good_snapshot_is_an_error_not_a_warning() {
    let sim = simulator("config-lkg-unreadable").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;
    for (content, gauge) in [
        // A field this version does not know, in a subscription (which admits none).
        (
            json!({"version": 5, "subscriptions": [{"id": "a", "bogus": 1}]}).to_string(),
            "gatehouse_config_last_known_good_refused 5",
        ),
        // Not JSON at all: not even the version can be read.
        (
            "{\"version\": 7, \"subscr".to_owned(),
            "gatehouse_config_last_known_good_refused 9223372036854775807",
        ),
    ] {
        std::fs::write(state_dir.path().join("last-known-good.json"), &content).unwrap();
        let (logs, _guard) = CapturedLogs::install(tracing::Level::INFO);
        let gw = TestGateway::start_in(
            snapshot(1, pools(&sim.url(), "gpt-4o")),
            Arc::clone(&state_dir),
        )
        .await;
        assert_eq!(gw.gateway.runtime().snapshot.version, 1);
        let line = logs.line(
            "the last-known-good configuration cannot be read; starting on the configuration \
             file's snapshot (the last-known-good file is kept)",
        );
        assert_eq!(line["level"], "ERROR", "{content}");
        let text = gw.metrics().await;
        assert!(text.contains(gauge), "{content}: {text}");
        assert!(state_dir.path().join("last-known-good.json").exists());
        gw.stop().await;
    }
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

    // A valid snapshot followed by anything (a second snapshot, stray text) is not a snapshot.
    let two = serde_json::to_vec(&snapshot(2, pools(&sim.url(), "gpt-4o-mini"))).unwrap();
    let three = serde_json::to_vec(&snapshot(3, pools(&sim.url(), "gpt-4o-mini"))).unwrap();
    for trailing in [three.as_slice(), b" garbage".as_slice()] {
        let body = [two.as_slice(), trailing].concat();
        let response = gw
            .raw(reqwest::Method::PUT, "/_gatehouse/config")
            .header("content-type", "application/json")
            .bearer_auth(ADMIN_TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        let message = azure_error(response, 422).await;
        assert!(message.contains("trailing"), "{message}");
    }

    // Nothing of these changed the running config.
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

/// A call is served whole under one configuration: the one in force when it arrived or, when a
/// push was applied while it waited or its body arrived, the newer one, from authentication on;
/// never parts of two.
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

/// A chat call to `gpt-4o` whose body stops halfway: the rest goes when the sender is given it.
/// Returns once the gateway has had the head and the first half a while (it has authenticated
/// the caller and is waiting for the rest).
async fn call_with_a_slow_body(
    gw: &TestGateway,
) -> (
    futures::channel::oneshot::Sender<()>,
    tokio::task::JoinHandle<reqwest::Response>,
) {
    let body = serde_json::to_vec(&chat(None, false)).unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    let (first, rest) = (first.to_vec(), rest.to_vec());
    let (go, wait) = futures::channel::oneshot::channel::<()>();
    let chunks = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures::stream::once(async move {
            let _ = wait.await;
            Ok(rest)
        }),
    );
    let request = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(reqwest::Body::wrap_stream(chunks))
        .send();
    let call = tokio::spawn(async move { request.await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    (go, call)
}

/// A subscription revoked by a push answered 200 stops a call whose body was still arriving:
/// the call is authenticated again under the configuration in force when its body is in.
#[tokio::test]
async fn a_push_that_revokes_a_subscription_stops_calls_still_sending_their_body() {
    let sim = simulator("config-revoke").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let (go, call) = call_with_a_slow_body(&gw).await;
    let mut revoked = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o"))).unwrap();
    revoked["subscriptions"][0]["state"] = json!("revoked");
    assert_eq!(put(&gw, Some(ADMIN_TOKEN), &revoked).await.status(), 200);
    go.send(()).unwrap();
    azure_error(call.await.unwrap(), 401).await;
    assert_eq!(sim.hits(), 0);
    let records = gw.records(1).await;
    assert_eq!(records[0].response_code, 401);
}

/// An access rule removed by a push answered 200 stops a call whose body was still arriving.
#[tokio::test]
async fn a_push_that_removes_a_rule_stops_calls_still_sending_their_body() {
    let sim = simulator("config-rule").await;
    let with_rules = |version: u64, deployments: Value| {
        let mut value =
            serde_json::to_value(snapshot(version, pools(&sim.url(), "gpt-4o"))).unwrap();
        value["access_rules"] = json!([
            {"id": "team-a", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": deployments}
        ]);
        value
    };
    let gw =
        TestGateway::start(serde_json::from_value(with_rules(1, json!(["gpt-4o"]))).unwrap()).await;
    let (go, call) = call_with_a_slow_body(&gw).await;
    assert_eq!(
        put(
            &gw,
            Some(ADMIN_TOKEN),
            &with_rules(2, json!(["gpt-4o-mini"]))
        )
        .await
        .status(),
        200
    );
    go.send(()).unwrap();
    azure_error(call.await.unwrap(), 403).await;
    assert_eq!(sim.hits(), 0);

    // A call under way when a push changes nothing it depends on goes through.
    let (go, call) = call_with_a_slow_body(&gw).await;
    assert_eq!(
        put(&gw, Some(ADMIN_TOKEN), &with_rules(3, json!(["gpt-4o*"])))
            .await
            .status(),
        200
    );
    go.send(()).unwrap();
    assert_eq!(call.await.unwrap().status(), 200);
    assert_eq!(sim.hits(), 1);
}

/// A push refused after a key file changed leaves the running members on the key they had: the
/// file is read for the new snapshot, and put back when that snapshot is not installed.
#[tokio::test]
async fn a_refused_push_leaves_the_running_secrets_as_they_were() {
    let (key_file, key_ref) = backend_key_file();
    let sim = simulator("config-secret").await;
    let mut keyed = member("keyed", &sim.url(), 1);
    keyed["credential"] = json!({"type": "api_key", "secret": key_ref});
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [keyed.clone()]}]),
    ))
    .await;
    std::fs::write(key_file.path(), "a-key-not-yet-in-use\n").unwrap();
    let mut broken = member("broken", &sim.url(), 2);
    broken["credential"] =
        json!({"type": "api_key", "secret": "env:GATEHOUSE_TEST_NEVER_SET_7301"});
    let next = serde_json::to_value(snapshot(
        2,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [keyed, broken]}]),
    ))
    .unwrap();
    let refused = put(&gw, Some(ADMIN_TOKEN), &next).await;
    let message = azure_error(refused, 422).await;
    assert!(
        message.contains("members[1].credential.secret"),
        "{message}"
    );
    let answered = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let sent = sim
        .requests()
        .last()
        .unwrap()
        .header("api-key")
        .map(str::to_owned);
    assert_eq!(sent.as_deref(), Some(BACKEND_KEY), "the running key");
}

/// A member that a newer snapshot removed is no longer reported as available or not.
#[tokio::test]
async fn a_removed_member_leaves_the_backend_metrics() {
    let sim = simulator("config-metrics").await;
    let two = json!([{"id": "p", "deployments": ["gpt-4o"],
                      "members": [member("stays", &sim.url(), 1), member("goes", &sim.url(), 2)]}]);
    let gw = TestGateway::start(snapshot(1, two)).await;
    assert!(gw.metrics().await.contains(r#"backend="goes""#));
    let one = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o"))).unwrap();
    assert!(
        put(&gw, Some(ADMIN_TOKEN), &one)
            .await
            .status()
            .is_success()
    );
    let text = gw.metrics().await;
    assert!(!text.contains(r#"backend="goes""#), "{text}");
    assert!(
        text.contains(r#"gatehouse_backend_available{pool="p",backend="a"} 1"#),
        "{text}"
    );
}

/// A snapshot of many thousand subscriptions (more than axum's default body limit of 2 MiB)
/// is taken.
#[tokio::test]
async fn a_snapshot_larger_than_two_mebibytes_is_taken() {
    let sim = simulator("config-large").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let mut next = serde_json::to_value(snapshot(2, pools(&sim.url(), "gpt-4o"))).unwrap();
    let subscriptions: Vec<Value> = (0..12_000)
        .map(|i| {
            let hash = gatehouse_schema::keys::hash_key(&format!("ghk_team_{i}")).to_string();
            json!({"id": format!("team-{i:05}"), "display_name": format!("Team number {i} of the large enterprise"),
                   "product": "research", "primary_key_hash": hash})
        })
        .collect();
    next["subscriptions"] = Value::Array(subscriptions);
    let size = serde_json::to_vec(&next).unwrap().len();
    assert!(size > 2 * 1024 * 1024, "{size} bytes");
    let applied = put(&gw, Some(ADMIN_TOKEN), &next).await;
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
}

/// A request signed with the admin token (as the portal sends it, so that the token never
/// leaves the portal) is taken; one signed with another token, at another time, for another
/// request or with another body than the one signed is refused 401 with the reason, and a
/// signed request replayed with a changed body changes nothing.
#[tokio::test]
async fn a_push_signed_with_the_admin_token_is_taken_and_a_tampered_one_refused() {
    use gatehouse_schema::admin_signature::{CONTENT_SHA256_HEADER, authorization, content_sha256};
    let sim = simulator("config-signed").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed_put = |token: &str, time: i64, signed_body: &[u8], sent_body: Vec<u8>| {
        let digest = content_sha256(signed_body);
        gw.raw(reqwest::Method::PUT, "/_gatehouse/config")
            .header(
                "authorization",
                authorization(token, "PUT", "/_gatehouse/config", time, &digest),
            )
            .header(CONTENT_SHA256_HEADER, digest)
            .header("content-type", "application/json")
            .body(sent_body)
            .send()
    };
    let version =
        |n: u64| serde_json::to_vec(&snapshot(n, pools(&sim.url(), "gpt-4o-mini"))).unwrap();

    let refusals = [
        (
            signed_put("wrong-token", now, &version(2), version(2))
                .await
                .unwrap(),
            "does not match",
        ),
        (
            signed_put(ADMIN_TOKEN, now - 3_600, &version(2), version(2))
                .await
                .unwrap(),
            "behind the gateway's clock",
        ),
        (
            signed_put(ADMIN_TOKEN, now, &version(2), version(3))
                .await
                .unwrap(),
            "not the one signed",
        ),
    ];
    for (response, reason) in refusals {
        let message = azure_error(response, 401).await;
        assert!(message.contains(reason), "{message}");
        assert!(!message.contains(ADMIN_TOKEN), "{message}");
    }
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);

    let applied = signed_put(ADMIN_TOKEN, now, &version(2), version(2))
        .await
        .unwrap();
    assert_eq!(applied.status(), 200);
    assert_eq!(gw.gateway.runtime().snapshot.version, 2);

    // A signed read: its signature covers the method and path, and an empty body.
    let digest = content_sha256(b"");
    let read = |method: &str| {
        gw.raw(reqwest::Method::GET, "/_gatehouse/backends")
            .header(
                "authorization",
                authorization(ADMIN_TOKEN, method, "/_gatehouse/backends", now, &digest),
            )
            .header(CONTENT_SHA256_HEADER, digest.clone())
            .send()
    };
    assert_eq!(read("GET").await.unwrap().status(), 200);
    azure_error(read("PUT").await.unwrap(), 401).await;
}

/// A gateway set to take only signed admin requests (`server.admin_signed_only`) refuses its
/// own token as a bearer token, saying why, and takes the same push signed.
#[tokio::test]
async fn a_gateway_taking_signed_requests_only_refuses_the_bearer_token() {
    use gatehouse_schema::admin_signature::{CONTENT_SHA256_HEADER, authorization, content_sha256};
    let sim = simulator("config-signed-only").await;
    let gw = TestGateway::start_taking_signed_admin_requests_only(snapshot(
        1,
        pools(&sim.url(), "gpt-4o"),
    ))
    .await;
    let next = serde_json::to_vec(&snapshot(2, pools(&sim.url(), "gpt-4o-mini"))).unwrap();
    let bearer = gw
        .raw(reqwest::Method::PUT, "/_gatehouse/config")
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(next.clone())
        .send()
        .await
        .unwrap();
    let message = azure_error(bearer, 401).await;
    assert!(message.contains("admin_signed_only"), "{message}");
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);

    let digest = content_sha256(&next);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed = gw
        .raw(reqwest::Method::PUT, "/_gatehouse/config")
        .header(
            "authorization",
            authorization(ADMIN_TOKEN, "PUT", "/_gatehouse/config", now, &digest),
        )
        .header(CONTENT_SHA256_HEADER, digest)
        .header("content-type", "application/json")
        .body(next)
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    assert_eq!(gw.gateway.runtime().snapshot.version, 2);
}

/// A push without the admin token is refused before its body is read, and a push whose body
/// stops arriving is answered 408: neither holds memory or the connection.
#[tokio::test]
async fn a_push_is_refused_before_its_body_and_a_stalled_one_times_out() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sim = simulator("config-slow-push").await;
    let gw = TestGateway::start_with_client_timeouts(
        snapshot(1, pools(&sim.url(), "gpt-4o")),
        gatehouse_gateway::ClientTimeouts {
            request_head: std::time::Duration::from_secs(10),
            request_body: std::time::Duration::from_secs(1),
            send: std::time::Duration::from_secs(10),
            ..gatehouse_gateway::ClientTimeouts::default()
        },
    )
    .await;
    for (token, expected) in [("", "HTTP/1.1 401"), (ADMIN_TOKEN, "HTTP/1.1 408")] {
        let mut stream = tokio::net::TcpStream::connect(gw.listening.addr)
            .await
            .unwrap();
        let auth = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        // A body of 32 MiB is announced; one byte of it is sent.
        let head = format!(
            "PUT /_gatehouse/config HTTP/1.1\r\nHost: gateway\r\n{auth}Content-Type: application/json\r\nContent-Length: 33554432\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0_u8; 1024];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("the gateway answers without the rest of the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with(expected), "{answer}");
    }
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);
}

/// A push that leaves a member as it was keeps its client, and with it the pooled connection:
/// the next call reuses it, with no new connection (nor, over TLS, handshake) to the backend.
#[tokio::test]
async fn a_push_keeps_the_connections_of_members_it_leaves_as_they_were() {
    use axum::serve::ListenerExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = listener.tap_io(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let app = axum::Router::new().fallback(|| async {
        axum::Json(json!({"id": "c1", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Oslo."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}))
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = TestGateway::start(snapshot(1, pools(&url, "gpt-4o"))).await;
    let call = || async {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    };
    call().await;
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    // Another subscription, the same member.
    let mut next = serde_json::to_value(snapshot(2, pools(&url, "gpt-4o"))).unwrap();
    next["subscriptions"][0]["display_name"] = json!("Team A, renamed");
    let applied = put(&gw, Some(ADMIN_TOKEN), &next).await;
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
    call().await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the pooled connection is reused"
    );
    // A member whose settings change gets a new client.
    let mut changed = serde_json::to_value(snapshot(3, pools(&url, "gpt-4o"))).unwrap();
    changed["pools"][0]["members"][0]["connect_timeout_ms"] = json!(4321);
    let applied = put(&gw, Some(ADMIN_TOKEN), &changed).await;
    assert_eq!(applied.status(), 200, "{}", applied.text().await.unwrap());
    call().await;
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

/// `check` refuses what `serve` would refuse in the server settings, not only in the snapshot:
/// a file it calls valid starts.
#[tokio::test]
async fn check_refuses_the_server_settings_serve_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let snapshot = "snapshot:\n  version: 1\n  pools:\n    - id: p\n      deployments: [d]\n      members:\n        - {id: m, endpoint: 'http://127.0.0.1:9'}\n";
    let check = |name: &str, server: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "server:\n  state_dir: {}\n{server}{snapshot}",
                state.display()
            ),
        )
        .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let valid = check("valid", "");
    assert!(valid.status.success(), "{valid:?}");
    // A certificate, its key, and the key of another certificate.
    let issued = |name: &str| rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let (gateway, other) = (issued("localhost"), issued("elsewhere"));
    let (cert, key, other_key) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("other-key.pem"),
    );
    std::fs::write(&cert, gateway.cert.pem()).unwrap();
    std::fs::write(&key, gateway.key_pair.serialize_pem()).unwrap();
    std::fs::write(&other_key, other.key_pair.serialize_pem()).unwrap();
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        format!(
            "  tls:\n    cert_file: {}\n    key_file: {}\n",
            cert.display(),
            key.display()
        )
    };
    let with_tls = check("tls", &tls(&cert, &key));
    assert!(with_tls.status.success(), "{with_tls:?}");
    let mismatched = tls(&cert, &other_key);
    let missing = tls(&dir.path().join("absent.pem"), &key);
    let no_certificate = tls(&key, &key);
    for (name, server, expected) in [
        ("tls-mismatched", mismatched.as_str(), "server.tls"),
        ("tls-missing", missing.as_str(), "absent.pem"),
        (
            "tls-no-certificate",
            no_certificate.as_str(),
            "no certificate",
        ),
        (
            "timeout",
            "  request_head_timeout_seconds: 0\n",
            "request_head_timeout_seconds",
        ),
        ("threads", "  worker_threads: 0\n", "worker_threads"),
        (
            "sinks",
            "  audit:\n    jsonl: /tmp/a.jsonl\n    database: 'sqlite:/tmp/a.db'\n",
            "name one of",
        ),
        (
            "token",
            "  admin_token: env:GATEHOUSE_SURELY_UNSET_TOKEN\n",
            "server.admin_token",
        ),
    ] {
        let refused = check(name, server);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{name}: {refused:?}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

/// A snapshot cannot make the gateway send one of its own secrets to a member: the admin
/// token's reference, the configuration file, anything in the state directory, the audit
/// store's `PGPASSWORD`, the managed-identity header, a proxy URL, and, with
/// `server.snapshot_secret_refs`, anything outside the listed prefixes, are refused (422, with
/// the field path) before they are read, and no member is called.
#[tokio::test]
async fn a_snapshot_cannot_name_the_gateways_own_secrets() {
    let sim = simulator("own-secrets").await;
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let token_ref = format!("file:{}", token_file.display());
    let start = |name: &'static str, extra: Value| {
        let mut settings = json!({"admin_token": token_ref});
        for (key, value) in extra.as_object().unwrap() {
            settings[key] = value.clone();
        }
        let snapshot = snapshot(1, pools(&sim.url(), "gpt-4o"));
        async move { GatewayProcess::start_with(name, &snapshot, settings).await }
    };
    let sim_url = sim.url();
    let push = |url: String, secret: String| {
        let sim_url = sim_url.clone();
        async move { push_member_secret(&url, &sim_url, &secret).await }
    };

    let gateway = start("own-secrets", json!({})).await;
    let config = gateway.config_path();
    let state_file = gateway.state_dir().join("instance-id");
    for secret in [
        token_ref.clone(),
        format!("file:{}", config.display()),
        format!("file:{}", state_file.display()),
        // The host's own secrets that the gateway's libraries read, whatever its settings say.
        "env:PGPASSWORD".to_owned(),
        "env:IDENTITY_HEADER".to_owned(),
        "env:HTTPS_PROXY".to_owned(),
        "env:http_proxy".to_owned(),
    ] {
        let refused = push(gateway.url.clone(), secret.clone()).await;
        let message = azure_error(refused, 422).await;
        assert!(
            message.contains("pools[0].members[0].credential.secret") && message.contains("own"),
            "{secret}: {message}"
        );
        assert!(!message.contains(ADMIN_TOKEN), "{message}");
    }
    // Nor a file of its own as a member's TLS file, which goes to the member too.
    for field in ["ca_file", "client_identity_file"] {
        let mut member = member("m", &sim.url(), 1);
        member["tls"] = json!({field: state_file.display().to_string()});
        let body = json!({"version": 2, "pools": [{"id": "p", "deployments": ["gpt-4o"], "members": [member]}]});
        let refused = put_to(&gateway.url, &body).await;
        let message = azure_error(refused, 422).await;
        assert!(
            message.contains(&format!("pools[0].members[0].tls.{field}"))
                && message.contains("own"),
            "{field}: {message}"
        );
    }
    // Any other reference is taken.
    let backend_key = secrets.path().join("backend-key");
    std::fs::write(&backend_key, "backend-key-value\n").unwrap();
    let taken = push(
        gateway.url.clone(),
        format!("file:{}", backend_key.display()),
    )
    .await;
    assert_eq!(taken.status(), 200, "{}", taken.text().await.unwrap());
    gateway.stop().await;

    // With listed prefixes, only references under them.
    let listed = start(
        "listed-secrets",
        json!({"snapshot_secret_refs": ["env:GATEHOUSE_TEST_AOAI_"]}),
    )
    .await;
    let refused = push(
        listed.url.clone(),
        format!("file:{}", backend_key.display()),
    )
    .await;
    let message = azure_error(refused, 422).await;
    assert!(message.contains("snapshot_secret_refs"), "{message}");
    assert_eq!(sim.hits(), 0, "no member was called");
    listed.stop().await;
}

/// A member's TLS file that is not a small regular file — a device that never ends, a FIFO that
/// would block the reader, a file of megabytes — is refused (422, with the field path) without
/// being read through, and the running snapshot stays; so is such a `file:` secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_file_that_is_no_small_regular_file_is_refused_unread() {
    let sim = simulator("odd-files").await;
    let gw = TestGateway::start(snapshot(1, pools(&sim.url(), "gpt-4o"))).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.pem");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let big = dir.path().join("big.pem");
    std::fs::write(&big, vec![b'A'; 2 * 1024 * 1024]).unwrap();
    for (file, why) in [
        ("/dev/zero".to_owned(), "/dev"),
        (fifo.display().to_string(), "not a regular file"),
        (big.display().to_string(), "larger than 1048576 bytes"),
    ] {
        for field in ["ca_file", "client_identity_file"] {
            let mut member = member("m", &sim.url(), 1);
            member["tls"] = json!({field: file});
            let body = json!({"version": 2, "pools": [{"id": "p", "deployments": ["gpt-4o"], "members": [member]}]});
            let refused = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                put(&gw, Some(ADMIN_TOKEN), &body),
            )
            .await
            .expect("answered without reading the file through");
            let message = azure_error(refused, 422).await;
            assert!(
                message.contains("pools[0].members[0].tls") && message.contains(why),
                "{file} as {field}: {message}"
            );
        }
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            push_member_secret(&gw.url, &sim.url(), &format!("file:{file}")),
        )
        .await
        .expect("answered without reading the file through");
        let message = azure_error(refused, 422).await;
        assert!(
            message.contains("pools[0].members[0].credential.secret") && message.contains(why),
            "{file} as a secret: {message}"
        );
    }
    assert_eq!(gw.gateway.runtime().snapshot.version, 1);
}

/// Pushes `body` to the gateway at `url` with the admin token.
async fn put_to(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .put(format!("{url}/_gatehouse/config"))
        .bearer_auth(ADMIN_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Pushes version 2 to the gateway at `url`: one pool whose member (at `backend`) has its
/// `api-key` from `secret`.
async fn push_member_secret(url: &str, backend: &str, secret: &str) -> reqwest::Response {
    let mut member = member("m", backend, 1);
    member["credential"] = json!({"type": "api_key", "secret": secret});
    let body = json!({"version": 2, "pools": [{"id": "p", "deployments": ["gpt-4o"], "members": [member]}]});
    put_to(url, &body).await
}

/// A call keeps the capture policy it was admitted under: a push that starts keeping answers
/// while its answer is on the way does not put that answer into its record, and a push that
/// stops keeping them does not take it out.
#[tokio::test]
async fn a_calls_answer_is_kept_as_its_own_configuration_says() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let member_url = serve_stub(axum::Router::new().fallback({
        let (arrived, release) = (Arc::clone(&arrived), Arc::clone(&release));
        move || async move {
            arrived.notify_one();
            release.notified().await;
            (
                [("content-type", "application/json")],
                json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "kept?"},
                                    "finish_reason": "stop"}]})
                .to_string(),
            )
        }
    }))
    .await;
    let with_capture = |version: u64, response_bytes: usize| {
        let mut next =
            serde_json::to_value(snapshot(version, pools(&member_url, "gpt-4o"))).unwrap();
        next["capture"] =
            json!({"max_request_body_bytes": 65536, "max_response_body_bytes": response_bytes});
        next
    };
    let gw =
        Arc::new(TestGateway::start(serde_json::from_value(with_capture(1, 0)).unwrap()).await);
    for (pushed, (version, response_bytes)) in [(2, 65536), (3, 0)].into_iter().enumerate() {
        let call = tokio::spawn({
            let gw = Arc::clone(&gw);
            async move {
                let response = gw
                    .post(&chat_path("gpt-4o"))
                    .json(&chat(None, false))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response.text().await.unwrap()
            }
        });
        arrived.notified().await;
        let applied = put(
            &gw,
            Some(ADMIN_TOKEN),
            &with_capture(version, response_bytes),
        )
        .await;
        assert_eq!(applied.status(), 200);
        release.notify_one();
        assert!(call.await.unwrap().contains("kept?"));
        let record = gw.records(pushed + 1).await.pop().unwrap();
        if pushed == 0 {
            assert_eq!(record.backend_response_body, None, "admitted under 0 bytes");
        } else {
            assert!(
                record
                    .backend_response_body
                    .as_deref()
                    .is_some_and(|body| body.contains("kept?")),
                "admitted under 65536 bytes: {record:?}"
            );
        }
    }
}
