//! The config database on both engines: migrations apply (twice), every table round-trips, and
//! the snapshot built from it is one a gateway accepts.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use gatehouse_portal_core::ConfigDb;
use gatehouse_portal_core::db::{AccessRuleRow, MemberRow, NewActivity, PoolRow, SubscriptionRow};
use gatehouse_portal_core::snapshot;
use gatehouse_schema::config::SubscriptionState;
use gatehouse_schema::identity::Grantee;
use gatehouse_schema::keys::hash_key;
use time::{Duration, OffsetDateTime};

fn activity<'a>(action: &'a str, target: &'a str) -> NewActivity<'a> {
    NewActivity {
        actor: "tester",
        action,
        target,
        before: None,
        after: Some("{\"x\":1}".to_owned()),
    }
}

async fn round_trip(db: &ConfigDb) {
    // Migrating again is a no-op.
    db.migrate().await.unwrap();

    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let row = SubscriptionRow {
        id: "team-a".into(),
        display_name: "Team A <script>".into(),
        product: Some("research".into()),
        primary_key_hash: hash_key("ghk_a").to_string(),
        secondary_key_hash: None,
        secondary_expires_at: None,
        state: "active".into(),
        expires_at: Some(now + Duration::days(30)),
        created_at: now,
        created_by: "tester".into(),
        updated_at: now,
    };
    db.insert_subscription(&row, activity("subscription.create", "team-a"))
        .await
        .unwrap();
    assert_eq!(db.subscription("team-a").await.unwrap().unwrap(), row);
    let duplicate = db
        .insert_subscription(&row, activity("subscription.create", "team-a"))
        .await
        .unwrap_err();
    assert!(duplicate.to_string().starts_with("id:"), "{duplicate}");

    let mut rotated = row.clone();
    rotated.secondary_key_hash = Some(rotated.primary_key_hash.clone());
    rotated.primary_key_hash = hash_key("ghk_b").to_string();
    rotated.updated_at = now + Duration::seconds(1);
    assert!(
        db.update_subscription(
            &rotated,
            row.updated_at,
            activity("subscription.rotate", "team-a")
        )
        .await
        .unwrap()
    );
    assert_eq!(db.subscriptions().await.unwrap(), vec![rotated.clone()]);
    // A change made from the row as it was before the rotation is not written: it would undo
    // the rotation (or a revocation).
    let mut stale = row.clone();
    stale.state = "revoked".into();
    stale.updated_at = now + Duration::seconds(2);
    assert!(
        !db.update_subscription(
            &stale,
            row.updated_at,
            activity("subscription.revoke", "team-a")
        )
        .await
        .unwrap()
    );
    assert_eq!(db.subscriptions().await.unwrap(), vec![rotated.clone()]);

    db.upsert_access_rule(
        &AccessRuleRow {
            id: "r1".into(),
            grantee_kind: "group".into(),
            grantee_id: "0000-group".into(),
            grantee_display_name: "Researchers".into(),
            deployments: "[\"gpt-4o*\"]".into(),
            operations: "[]".into(),
            resources: false,
            ..Default::default()
        },
        activity("rule.create", "r1"),
    )
    .await
    .unwrap();
    db.replace_pool(
        &PoolRow {
            id: "main".into(),
            deployments: "[\"gpt-4o\"]".into(),
            serves_resources: true,
        },
        &[MemberRow {
            pool_id: "main".into(),
            id: "east".into(),
            kind: "azure_openai".into(),
            endpoint: "https://east.example.invalid".into(),
            deployment: None,
            api_version: None,
            priority: 1,
            weight: 2,
            credential: "{\"type\":\"api_key\",\"secret\":\"env:EAST_KEY\"}".into(),
        }],
        activity("pool.replace", "main"),
    )
    .await
    .unwrap();

    db.upsert_gateway(
        "gw1",
        "http://127.0.0.1:1/",
        "env:GW1_TOKEN",
        activity("gateway.register", "gw1"),
    )
    .await
    .unwrap();
    let other = db
        .upsert_gateway(
            "gw2",
            "http://127.0.0.1:1/",
            "env:GW1_TOKEN",
            activity("gateway.register", "gw2"),
        )
        .await
        .unwrap_err();
    assert!(other.to_string().starts_with("url:"), "{other}");
    db.record_push("gw1", None, Some("unreachable"))
        .await
        .unwrap();
    db.record_push("gw1", Some(3), None).await.unwrap();
    db.record_push("gw1", None, Some("down again"))
        .await
        .unwrap();
    let gateway = &db.gateways().await.unwrap()[0];
    assert_eq!(
        gateway.pushed_version,
        Some(3),
        "a failure keeps the last good version"
    );
    assert_eq!(gateway.last_error.as_deref(), Some("down again"));

    db.set_setting("k", "v1").await.unwrap();
    db.set_setting("k", "v2").await.unwrap();
    assert_eq!(db.setting("k").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(db.setting("missing").await.unwrap(), None);

    let built = snapshot::build(db, 7).await.unwrap();
    assert_eq!(built.version, 7);
    assert_eq!(built.subscriptions.len(), 1);
    assert_eq!(built.subscriptions[0].state, SubscriptionState::Active);
    assert_eq!(
        built.subscriptions[0].secondary_key_hash,
        Some(hash_key("ghk_a"))
    );
    let rules = built.access_rules.as_ref().unwrap();
    assert!(
        matches!(&rules[0].grantee, Grantee::Group { display_name, .. } if display_name == "Researchers")
    );
    assert_eq!(built.pools[0].members[0].weight, 2);
    assert_eq!(
        built.pools[0].members[0].connect_timeout_ms, 5_000,
        "schema defaults apply"
    );
    let text = serde_json::to_string(&built).unwrap();
    db.insert_snapshot(7, &text, "tester").await.unwrap();
    assert!(
        db.insert_snapshot(7, &text, "tester").await.is_err(),
        "a version is stored once"
    );
    let latest = db.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(latest.version, 7);
    assert_eq!(latest.snapshot, text);

    let log = db.activity(10).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|entry| entry.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "gateway.register",
            "pool.replace",
            "rule.create",
            "subscription.rotate",
            "subscription.create"
        ],
        "newest first; the failed duplicates wrote nothing"
    );
    assert_eq!(log[0].after.as_deref(), Some("{\"x\":1}"));
}

#[tokio::test]
async fn sqlite_migrates_and_round_trips() {
    let test = common::sqlite().await;
    round_trip(&test.db).await;
}

#[tokio::test]
async fn postgres_migrates_and_round_trips() {
    let test = common::postgres().await;
    round_trip(&test.db).await;
}
