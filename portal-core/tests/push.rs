//! Publishing to real in-process gateways: a change reaches every gateway at once, the key the
//! portal issued works there (and stops working when revoked), and a gateway that was down
//! during a change catches up when it is back.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;

use common::{
    ADMIN_TOKEN, admin, admin_token_file, gateway_allowing_refs, gateway_at, gateway_on_snapshot,
    restart_empty, simulator,
};
use gatehouse_simulator::RunningSimulator;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_portal_core::db::{AccessRuleRow, MemberRow, NewActivity, PoolRow};
use gatehouse_portal_core::ops::{NewSubscription, PortalSettings};
use gatehouse_portal_core::pools::{MemberInput, PoolInput};
use gatehouse_portal_core::rules::AccessRuleInput;
use gatehouse_portal_core::{ConfigDb, Portal};
use serde_json::{Value, json};

fn portal(db: &ConfigDb) -> Portal {
    Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings::default(),
    }
}

async fn running_config(url: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{url}/_gatehouse/config"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn chat(url: &str, deployment: &str, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "{url}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21"
        ))
        .header("api-key", key)
        .json(&json!({"messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn seed_pool_and_rule(db: &ConfigDb, simulator: &RunningSimulator, subscription: &str) {
    let activity = |action: &'static str| NewActivity {
        actor: "seed",
        action,
        target: "seed",
        before: None,
        after: None,
    };
    let now = time::OffsetDateTime::now_utc();
    db.replace_pool(
        &PoolRow {
            id: "sim".into(),
            deployments: "[\"gpt-4o\", \"gpt-4o-mini\"]".into(),
            serves_resources: false,
            updated_at: now,
        },
        &[MemberRow {
            pool_id: "sim".into(),
            id: "sim".into(),
            kind: "azure_openai".into(),
            endpoint: simulator.url(),
            deployment: None,
            api_version: None,
            priority: 1,
            weight: 1,
            credential: "{\"type\":\"none\"}".into(),
            updated_at: now,
        }],
        activity("pool.replace"),
    )
    .await
    .unwrap();
    let rule = AccessRuleRow {
        id: "team-a-gpt-4o".into(),
        grantee_kind: "subscription".into(),
        grantee_id: subscription.into(),
        grantee_display_name: String::new(),
        deployments: "[\"gpt-4o\"]".into(),
        operations: "[]".into(),
        resources: false,
        updated_at: now,
        ..Default::default()
    };
    // Seeded again for another subscription: changed from the version there.
    let written = match db.access_rule(&rule.id).await.unwrap() {
        Some(seeded) => db
            .update_access_rule(&rule, seeded.updated_at, activity("rule.update"))
            .await
            .unwrap(),
        None => db
            .insert_access_rule(&rule, activity("rule.create"))
            .await
            .unwrap(),
    };
    assert!(written);
}

async fn publish_reaches_gateways(db: ConfigDb) {
    // The portal stores a reference to the gateway's admin token, never the token.
    let (_secrets, token_ref) = admin_token_file();
    let simulator = simulator().await;
    let up = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let down_addr = free_port();
    let portal = portal(&db);
    let user = admin();

    portal
        .register_gateway(Some(&user), "up", &up.url, &token_ref)
        .await
        .unwrap();
    let outcomes = portal
        .register_gateway(
            Some(&user),
            "down",
            &format!("http://{down_addr}"),
            &token_ref,
        )
        .await
        .unwrap();
    assert!(
        outcomes.iter().all(|o| o.gateway != "up"),
        "up is current already"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.gateway == "down" && o.result.is_err())
    );

    let issued = portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                product: "research".into(),
                expires_on: String::new(),
            },
        )
        .await
        .unwrap();
    // A rule names an existing subscription (the database refuses one that does not).
    seed_pool_and_rule(&db, &simulator, "team-a").await;
    portal.publisher.publish("seed").await.unwrap();
    assert!(issued.key.starts_with("ghk_"));

    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    let running = running_config(&up.url).await;
    assert_eq!(running["version"], json!(current));
    assert!(
        !running.to_string().contains(&issued.key),
        "only the hash travels"
    );
    assert_eq!(chat(&up.url, "gpt-4o", &issued.key).await, 200);
    assert_eq!(
        chat(&up.url, "gpt-4o-mini", &issued.key).await,
        403,
        "no rule grants it"
    );

    let gateways = db.gateways().await.unwrap();
    let down = gateways.iter().find(|g| g.id == "down").unwrap();
    assert_eq!(down.pushed_version, None);
    assert!(
        down.last_error
            .as_deref()
            .unwrap()
            .starts_with("unreachable")
    );

    // The gateway comes up; the catch-up task brings it to the current version.
    let late = gateway_at(down_addr).await;
    let catch_up = Arc::clone(&portal.publisher).spawn_catch_up(Duration::from_millis(100));
    let mut caught_up = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let row = db
            .gateways()
            .await
            .unwrap()
            .into_iter()
            .find(|g| g.id == "down")
            .unwrap();
        if row.pushed_version == Some(current) {
            assert_eq!(row.last_error, None);
            caught_up = true;
            break;
        }
    }
    catch_up.abort();
    assert!(caught_up, "the gateway that was down caught up");
    assert_eq!(running_config(&late.url).await["version"], json!(current));
    assert_eq!(chat(&late.url, "gpt-4o", &issued.key).await, 200);

    // Revoking reaches both gateways at once.
    portal
        .revoke_subscription(Some(&user), "team-a")
        .await
        .unwrap();
    assert_eq!(chat(&up.url, "gpt-4o", &issued.key).await, 401);
    assert_eq!(chat(&late.url, "gpt-4o", &issued.key).await, 401);

    // Rotation with overlap: the old key keeps working until it is retired.
    portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-b".into(),
                display_name: "Team B".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .map(|_| ())
        .unwrap();
    seed_pool_and_rule(&db, &simulator, "team-b").await;
    let first = portal
        .rotate_subscription_key(Some(&user), "team-b", "")
        .await
        .unwrap();
    let second = portal
        .rotate_subscription_key(Some(&user), "team-b", "")
        .await
        .unwrap();
    assert_eq!(chat(&up.url, "gpt-4o", &second.key).await, 200);
    assert_eq!(
        chat(&up.url, "gpt-4o", &first.key).await,
        200,
        "the previous key overlaps"
    );
    portal
        .retire_secondary_key(Some(&user), "team-b", "")
        .await
        .unwrap();
    assert_eq!(chat(&up.url, "gpt-4o", &first.key).await, 401);
    assert_eq!(chat(&up.url, "gpt-4o", &second.key).await, 200);

    // The gateway `up` moves to another host: registered again under its id with the new URL,
    // it is pushed the current version there (the old host's pushed version does not count).
    let moved = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    let outcomes = portal
        .register_gateway(Some(&user), "up", &moved.url, &token_ref)
        .await
        .unwrap();
    assert!(
        outcomes
            .iter()
            .any(|o| o.gateway == "up" && o.result.is_ok()),
        "{outcomes:?}"
    );
    assert_eq!(running_config(&moved.url).await["version"], json!(current));
    assert_eq!(chat(&moved.url, "gpt-4o", &second.key).await, 200);
    // The activity log keeps the address the new registration replaced, and of the keys'
    // hashes only fingerprints (Auditors read the log).
    let log = db.activity(1000).await.unwrap();
    let moved_entry = log
        .iter()
        .find(|entry| entry.action == "gateway.register" && entry.target == "up")
        .unwrap();
    assert!(
        moved_entry
            .before
            .as_deref()
            .is_some_and(|before| before.contains(&up.url)),
        "{moved_entry:?}"
    );
    let hashes = [&first.key, &second.key].map(|key| {
        gatehouse_schema::keys::hash_key(key)
            .to_string()
            .trim_start_matches("sha256:")
            .to_owned()
    });
    let rotation = log
        .iter()
        .find(|entry| entry.action.starts_with("subscription.rotate"))
        .unwrap();
    assert!(
        rotation
            .after
            .as_deref()
            .is_some_and(|after| after.contains("sha256:")),
        "{rotation:?}"
    );
    for entry in &log {
        for text in [&entry.before, &entry.after].into_iter().flatten() {
            assert!(
                hashes.iter().all(|hash| !text.contains(hash.as_str())),
                "{entry:?}"
            );
        }
    }

    // Registered once more under another spelling of the same address, it is offered the
    // version it already runs: the gateway refuses it as not newer, which is being current.
    let outcomes = portal
        .register_gateway(
            Some(&user),
            "up",
            &moved.url.replace("127.0.0.1", "localhost"),
            &token_ref,
        )
        .await
        .unwrap();
    assert!(
        outcomes
            .iter()
            .any(|o| o.gateway == "up" && o.result.is_ok()),
        "{outcomes:?}"
    );
    let row = |gateways: Vec<gatehouse_portal_core::db::GatewayRow>| {
        gateways.into_iter().find(|g| g.id == "up").unwrap()
    };
    let up_row = row(db.gateways().await.unwrap());
    assert_eq!(
        (up_row.pushed_version, up_row.last_error),
        (Some(current), None)
    );
    // A push that ends after a newer one does not lower the version recorded.
    db.record_push("up", Some(current - 1), None).await.unwrap();
    assert_eq!(
        row(db.gateways().await.unwrap()).pushed_version,
        Some(current)
    );

    let log = db.activity(50).await.unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "subscription.revoke" && e.actor == "Ada Admin <admin-oid>")
    );
    drop((up.listening, late.listening, moved.listening));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_changes_reach_every_gateway_and_a_down_one_catches_up() {
    let test = common::sqlite().await;
    publish_reaches_gateways(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_changes_reach_every_gateway_and_a_down_one_catches_up() {
    let test = common::postgres().await;
    publish_reaches_gateways(test.db.clone()).await;
}

/// A save tells which gateways did not take the version it published, and why: one that refuses
/// it (its `server.snapshot_secret_refs` do not cover the member's key reference) and one that
/// is down; never one that took it.
async fn a_save_reports_the_gateways_that_did_not_take_its_version(db: ConfigDb) {
    let (secrets, token_ref) = admin_token_file();
    let key_file = secrets.path().join("member-key");
    std::fs::write(&key_file, "member-key-value-never-shown").unwrap();
    let key_ref = format!("file:{}", key_file.display());
    let simulator = simulator().await;
    let healthy = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let strict = gateway_allowing_refs(&["env:GATEHOUSE_BACKEND_".to_owned()]).await;
    let down_addr = free_port();
    let portal = portal(&db);
    let user = admin();
    for (id, url) in [
        ("gw-healthy", healthy.url.clone()),
        ("gw-strict", strict.url.clone()),
        ("gw-down", format!("http://{down_addr}")),
    ] {
        portal
            .register_gateway(Some(&user), id, &url, &token_ref)
            .await
            .unwrap();
    }
    let names = |published: &gatehouse_portal_core::push::Published| -> Vec<String> {
        let mut names: Vec<String> = published
            .not_taken
            .iter()
            .map(|n| n.gateway.clone())
            .collect();
        names.sort();
        names
    };

    // A pool without members is not sent: only the gateway that is down misses the version.
    let (_, published) = portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "sim".into(),
                deployments: "gpt-4o".into(),
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(names(&published), ["gw-down"], "{published:?}");
    let before = published.version;

    // A member whose key reference the strict gateway does not allow: it refuses the version.
    let (_, published) = portal
        .save_member(
            Some(&user),
            MemberInput {
                pool_id: "sim".into(),
                id: "east".into(),
                kind: "azure_openai".into(),
                endpoint: simulator.url(),
                priority: "1".into(),
                api_key_ref: key_ref.clone(),
                ..MemberInput::default()
            },
        )
        .await
        .unwrap();
    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    assert_eq!(i64::try_from(published.version).unwrap(), current);
    assert_eq!(names(&published), ["gw-down", "gw-strict"], "{published:?}");
    let strict_refusal = published
        .not_taken
        .iter()
        .find(|n| n.gateway == "gw-strict")
        .unwrap();
    assert!(!strict_refusal.unreachable());
    assert!(
        strict_refusal.reason.starts_with("refused with 422")
            && strict_refusal
                .reason
                .contains("is not under a prefix of server.snapshot_secret_refs"),
        "{strict_refusal:?}"
    );
    assert!(
        !strict_refusal
            .reason
            .contains("member-key-value-never-shown")
    );
    assert_eq!(
        strict_refusal.running,
        Some(before),
        "it keeps the version before"
    );
    let down = published
        .not_taken
        .iter()
        .find(|n| n.gateway == "gw-down")
        .unwrap();
    assert!(down.unreachable(), "{down:?}");
    assert_eq!(down.running, None);
    assert_eq!(
        running_config(&healthy.url).await["version"],
        json!(current)
    );
    assert_eq!(running_config(&strict.url).await["version"], json!(before));

    // An access rule saved meanwhile is refused by the strict gateway as well: the member is
    // still in every version.
    portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    let (_, published) = portal
        .save_access_rule(
            Some(&user),
            AccessRuleInput {
                id: "team-a".into(),
                grantee_kind: "subscription".into(),
                grantee_id: "team-a".into(),
                deployments: "gpt-4o".into(),
                ..AccessRuleInput::default()
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(names(&published), ["gw-down", "gw-strict"], "{published:?}");

    // Without the member, the strict gateway takes the next version again.
    let member = db.member("sim", "east").await.unwrap().unwrap();
    let published = portal
        .delete_member(
            Some(&user),
            "sim",
            "east",
            &gatehouse_portal_core::ops::version_text(member.updated_at),
        )
        .await
        .unwrap();
    assert_eq!(names(&published), ["gw-down"], "{published:?}");
    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    assert_eq!(running_config(&strict.url).await["version"], json!(current));
    drop((healthy.listening, strict.listening));
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_save_reports_the_gateways_that_did_not_take_its_version() {
    let test = common::sqlite().await;
    a_save_reports_the_gateways_that_did_not_take_its_version(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_save_reports_the_gateways_that_did_not_take_its_version() {
    let test = common::postgres().await;
    a_save_reports_the_gateways_that_did_not_take_its_version(test.db.clone()).await;
}

/// A gateway started on a configuration file of its own at `version: 1` (the annotated example's
/// number) runs other content under the portal's first version: the portal says so instead of
/// taking the 409 for "already applied", and the gateway takes the next version.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_version_with_other_content_is_not_taken_for_applied() {
    let db = common::sqlite().await;
    let (_secrets, token_ref) = admin_token_file();
    let gateway =
        gateway_on_snapshot(json!({"version": 1, "trusted_proxies": ["10.0.0.0/8"]})).await;
    let portal = portal(&db.db);
    let user = admin();
    // Registering publishes the portal's first version, 1, and pushes it.
    portal
        .register_gateway(Some(&user), "gw-file", &gateway.url, &token_ref)
        .await
        .unwrap();
    assert_eq!(db.db.latest_snapshot().await.unwrap().unwrap().version, 1);
    let row = db.db.gateways().await.unwrap().remove(0);
    assert_eq!(
        row.pushed_version, None,
        "version 1 is not taken for applied"
    );
    let error = row.last_error.unwrap_or_default();
    assert!(
        error.contains("another configuration under version 1"),
        "{error}"
    );
    assert_eq!(
        running_config(&gateway.url).await["trusted_proxies"],
        json!(["10.0.0.0/8"])
    );

    let (_, published) = portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "sim".into(),
                deployments: "gpt-4o".into(),
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(published.version, 2);
    assert!(published.not_taken.is_empty(), "{published:?}");
    assert_eq!(running_config(&gateway.url).await["version"], json!(2));
    drop(gateway.listening);
}

/// A gateway's admin token is read only from the references the portal's policy allows: an
/// Admin cannot register a gateway at a URL of their own with the reference of another of the
/// portal's secrets, and a row that names one anyway (written before the policy, or by hand) is
/// not read: nothing is sent to its URL, and its push and health errors say why.
#[tokio::test]
async fn a_token_reference_outside_the_policy_is_neither_registered_nor_read() {
    let test = common::sqlite().await;
    let db = &test.db;
    let portal = portal(db);
    let user = admin();
    // Where the secret would go: a listener that counts the connections it gets.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });

    for reference in [
        "env:GATEHOUSE_PORTAL_OIDC_CLIENT_SECRET",
        "file:/etc/hostname",
        "file:/run/secrets/gatehouse-db-password",
    ] {
        let refused = portal
            .register_gateway(Some(&user), "collector", &collector, reference)
            .await
            .unwrap_err();
        match refused {
            gatehouse_portal_core::PortalError::Invalid {
                field: "admin_token_ref",
                message,
            } => assert!(message.contains("is not one"), "{message}"),
            other => panic!("{reference}: {other:?}"),
        }
    }
    assert!(db.gateways().await.unwrap().is_empty());
    assert!(db.activity(10).await.unwrap().is_empty());

    // Written around the portal's check.
    db.upsert_gateway(
        "collector",
        &collector,
        "file:/etc/hostname",
        NewActivity {
            actor: "by hand",
            action: "gateway.register",
            target: "collector",
            before: None,
            after: None,
        },
    )
    .await
    .unwrap();
    portal
        .save_gateway_settings(Some(&user), "{}", "")
        .await
        .unwrap();
    let gateway = &db.gateways().await.unwrap()[0];
    let error = gateway.last_error.as_deref().unwrap();
    assert!(error.contains("`file:/etc/hostname` is not one"), "{error}");
    assert_eq!(gateway.pushed_version, None);
    let health = portal.backend_health(Some(&user)).await.unwrap();
    let reason = health[0].result.as_ref().unwrap_err();
    assert!(reason.contains("is not one"), "{reason}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was sent to the registered URL"
    );
}

/// An Admin who registers a URL of their own with the token reference of a real gateway gets
/// signed requests there, which expire in minutes and cover one request each, never the token:
/// the push and the health check both sign.
#[tokio::test]
async fn a_registered_url_receives_signatures_never_the_admin_token() {
    let test = common::sqlite().await;
    let db = &test.db;
    let portal = portal(db);
    let user = admin();
    let (_secrets, token_ref) = admin_token_file();
    let seen: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let recorded = Arc::clone(&seen);
    let collector = axum::Router::new().fallback(
        move |method: axum::http::Method, headers: axum::http::HeaderMap| {
            let recorded = Arc::clone(&recorded);
            async move {
                let authorization = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                recorded
                    .lock()
                    .unwrap()
                    .push((method.to_string(), authorization));
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, collector).await.unwrap() });

    portal
        .register_gateway(Some(&user), "prod", &url, &token_ref)
        .await
        .unwrap();
    portal.backend_health(Some(&user)).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let methods: Vec<&str> = seen.iter().map(|(method, _)| method.as_str()).collect();
    assert!(
        methods.contains(&"PUT") && methods.contains(&"GET"),
        "{seen:?}"
    );
    for (method, authorization) in &seen {
        assert!(
            authorization.starts_with("Gatehouse-HMAC-SHA256 time="),
            "{method}: {authorization}"
        );
        assert!(
            !authorization.contains(ADMIN_TOKEN),
            "{method}: {authorization}"
        );
    }
}

/// Makes every insert of a snapshot version fail (`on`), or not any more.
async fn snapshot_inserts_fail(db: &ConfigDb, on: bool) {
    use gatehouse_portal_core::db::Engine;
    let statements: &[&str] = match (&db.engine, on) {
        (Engine::Sqlite(_), true) => &[
            "CREATE TRIGGER no_snapshots BEFORE INSERT ON snapshot_versions BEGIN SELECT RAISE(ABORT, 'publishing is broken'); END",
        ],
        (Engine::Sqlite(_), false) => &["DROP TRIGGER no_snapshots"],
        (Engine::Postgres(_), true) => &[
            "CREATE FUNCTION no_snapshots() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'publishing is broken'; END $$",
            "CREATE TRIGGER no_snapshots BEFORE INSERT ON snapshot_versions FOR EACH ROW EXECUTE FUNCTION no_snapshots()",
        ],
        (Engine::Postgres(_), false) => &[
            "DROP TRIGGER no_snapshots ON snapshot_versions",
            "DROP FUNCTION no_snapshots()",
        ],
    };
    for statement in statements {
        match &db.engine {
            Engine::Sqlite(pool) => sqlx::query(statement).execute(pool).await.map(|_| ()),
            Engine::Postgres(pool) => sqlx::query(statement).execute(pool).await.map(|_| ()),
        }
        .unwrap();
    }
}

/// A change saved whose publish fails: a rotation still returns its new key, saying it was not
/// published, and a revocation says so too; the catch-up and *Push now* then publish what was
/// saved, so that the gateway takes the new key and refuses the revoked one.
async fn a_saved_change_whose_publish_failed_is_published_by_the_next_push(db: ConfigDb) {
    let (_secrets, token_ref) = admin_token_file();
    let simulator = simulator().await;
    let gateway = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let portal = portal(&db);
    let user = admin();
    portal
        .register_gateway(Some(&user), "gw", &gateway.url, &token_ref)
        .await
        .unwrap();
    let created = portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    seed_pool_and_rule(&db, &simulator, "team-a").await;
    portal.publisher.publish("seed").await.unwrap();
    assert_eq!(chat(&gateway.url, "gpt-4o", &created.key).await, 200);
    let published = db.latest_snapshot().await.unwrap().unwrap().version;

    // The rotation is saved; its publish fails. The new key is returned all the same.
    snapshot_inserts_fail(&db, true).await;
    let rotated = portal
        .rotate_subscription_key(Some(&user), "team-a", "")
        .await
        .expect("a saved rotation returns its key");
    assert!(rotated.key.starts_with("ghk_") && rotated.key != created.key);
    let why = rotated.published.not_published.as_deref().unwrap();
    assert!(why.starts_with("Saved, but not published"), "{why}");
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        published
    );
    assert_eq!(
        chat(&gateway.url, "gpt-4o", &rotated.key).await,
        401,
        "not published yet"
    );
    // Nothing is published while publishing fails; the gateway keeps what it runs.
    assert!(portal.push_now(Some(&user)).await.is_err());
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        published
    );
    snapshot_inserts_fail(&db, false).await;

    // The catch-up publishes what was saved: the gateway takes the new key.
    let catch_up = Arc::clone(&portal.publisher).spawn_catch_up(Duration::from_millis(100));
    let mut taken = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if chat(&gateway.url, "gpt-4o", &rotated.key).await == 200 {
            taken = true;
            break;
        }
    }
    assert!(taken, "the catch-up published the rotation");
    let caught_up = db.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(caught_up.version, published + 1);
    assert_eq!(caught_up.created_by, "portal (unpublished changes)");
    // With nothing unpublished, it publishes no other version.
    tokio::time::sleep(Duration::from_millis(350)).await;
    catch_up.abort();
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        caught_up.version
    );
    assert_eq!(
        chat(&gateway.url, "gpt-4o", &created.key).await,
        200,
        "the previous key overlaps"
    );

    // A revocation whose publish fails is published by Push now.
    snapshot_inserts_fail(&db, true).await;
    let revoked = portal
        .revoke_subscription(Some(&user), "team-a")
        .await
        .unwrap();
    assert!(revoked.not_published.is_some(), "{revoked:?}");
    assert_eq!(chat(&gateway.url, "gpt-4o", &rotated.key).await, 200);
    snapshot_inserts_fail(&db, false).await;
    let outcomes = portal.push_now(Some(&user)).await.unwrap();
    assert!(
        outcomes
            .iter()
            .any(|o| o.gateway == "gw" && o.result.is_ok()),
        "{outcomes:?}"
    );
    assert_eq!(chat(&gateway.url, "gpt-4o", &rotated.key).await, 401);
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        caught_up.version + 1
    );
    drop(gateway.listening);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_saved_change_whose_publish_failed_is_published_by_the_next_push() {
    let test = common::sqlite().await;
    a_saved_change_whose_publish_failed_is_published_by_the_next_push(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_saved_change_whose_publish_failed_is_published_by_the_next_push() {
    let test = common::postgres().await;
    a_saved_change_whose_publish_failed_is_published_by_the_next_push(test.db.clone()).await;
}

/// A gateway that restarts at its address on an older version than the portal pushed to it (an
/// empty state directory, or a last-known-good it could not load) is noticed: *Push now* and the
/// catch-up push it the current version again, and the pools page's look at the gateways lowers
/// the version recorded for it to the one it runs, so that the Gateways page shows its lag.
async fn a_restarted_gateway_on_an_older_version_is_pushed_the_current_one(db: ConfigDb) {
    let (_secrets, token_ref) = admin_token_file();
    let simulator = simulator().await;
    let gateway = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let portal = portal(&db);
    let user = admin();
    portal
        .register_gateway(Some(&user), "gw", &gateway.url, &token_ref)
        .await
        .unwrap();
    let issued = portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    seed_pool_and_rule(&db, &simulator, "team-a").await;
    portal.publisher.publish("seed").await.unwrap();
    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    assert_eq!(
        running_config(&gateway.url).await["version"],
        json!(current)
    );
    let recorded = |db: ConfigDb| async move {
        db.gateways()
            .await
            .unwrap()
            .into_iter()
            .find(|g| g.id == "gw")
            .unwrap()
            .pushed_version
    };
    assert_eq!(recorded(db.clone()).await, Some(current));

    // It restarts at the same address with nothing: version 0. Push now notices and pushes.
    let gateway = restart_empty(gateway).await;
    assert_eq!(running_config(&gateway.url).await["version"], json!(0));
    assert_eq!(chat(&gateway.url, "gpt-4o", &issued.key).await, 401);
    let outcomes = portal.push_now(Some(&user)).await.unwrap();
    let expected = u64::try_from(current).unwrap();
    assert!(
        outcomes
            .iter()
            .any(|o| o.gateway == "gw" && o.result == Ok(expected) && o.running_before == Some(0)),
        "{outcomes:?}"
    );
    assert_eq!(
        running_config(&gateway.url).await["version"],
        json!(current)
    );
    assert_eq!(chat(&gateway.url, "gpt-4o", &issued.key).await, 200);
    assert_eq!(recorded(db.clone()).await, Some(current));
    // The push is on the activity log: who pushed, and what each gateway made of it.
    let pushed = db.activity(1).await.unwrap().remove(0);
    assert_eq!(
        (pushed.action.as_str(), pushed.actor.as_str()),
        ("gateways.push", user.actor().as_str())
    );
    let after: serde_json::Value = serde_json::from_str(pushed.after.as_deref().unwrap()).unwrap();
    assert_eq!(after["gw"]["runs"], json!(current));
    // Current again: nothing more to push.
    assert!(portal.push_now(Some(&user)).await.unwrap().is_empty());

    // Again: the pools page asks each gateway for its members' states, which carries the
    // version it runs; the lag shows, and the catch-up brings it to the current version.
    let gateway = restart_empty(gateway).await;
    let health = portal.backend_health(Some(&user)).await.unwrap();
    assert_eq!(health[0].result.as_ref().unwrap().version, 0);
    assert_eq!(recorded(db.clone()).await, Some(0), "the lag shows");
    let catch_up = Arc::clone(&portal.publisher).spawn_catch_up(Duration::from_millis(100));
    let mut caught_up = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if running_config(&gateway.url).await["version"] == json!(current) {
            caught_up = true;
            break;
        }
    }
    catch_up.abort();
    assert!(caught_up, "the catch-up pushed the current version again");
    assert_eq!(chat(&gateway.url, "gpt-4o", &issued.key).await, 200);

    // And a third time, with nothing but the catch-up task to notice it.
    let gateway = restart_empty(gateway).await;
    let catch_up = Arc::clone(&portal.publisher).spawn_catch_up(Duration::from_millis(100));
    let mut caught_up = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if running_config(&gateway.url).await["version"] == json!(current) {
            caught_up = true;
            break;
        }
    }
    catch_up.abort();
    assert!(caught_up, "the catch-up noticed the restart by itself");
    assert_eq!(recorded(db.clone()).await, Some(current));
    drop(gateway.listening);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_restarted_gateway_on_an_older_version_is_pushed_the_current_one() {
    let test = common::sqlite().await;
    a_restarted_gateway_on_an_older_version_is_pushed_the_current_one(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_restarted_gateway_on_an_older_version_is_pushed_the_current_one() {
    let test = common::postgres().await;
    a_restarted_gateway_on_an_older_version_is_pushed_the_current_one(test.db.clone()).await;
}
