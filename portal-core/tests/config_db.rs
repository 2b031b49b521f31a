//! The config database on both engines: migrations apply (twice), every table round-trips, and
//! the snapshot built from it is one a gateway accepts; a change that would make one a gateway
//! refuses is not written, nor published.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use gatehouse_portal_core::db::{
    AccessRuleRow, Engine, MemberRow, NewActivity, PoolRow, SubscriptionRow,
};
use gatehouse_portal_core::push::Publisher;
use gatehouse_portal_core::{ConfigDb, PortalError, snapshot};
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

    assert!(
        db.insert_access_rule(
            &AccessRuleRow {
                id: "r1".into(),
                grantee_kind: "group".into(),
                grantee_id: "0000-group".into(),
                grantee_display_name: "Researchers".into(),
                deployments: "[\"gpt-4o*\"]".into(),
                operations: "[]".into(),
                resources: false,
                updated_at: now,
                ..Default::default()
            },
            activity("rule.create", "r1"),
        )
        .await
        .unwrap()
    );
    db.replace_pool(
        &PoolRow {
            id: "main".into(),
            deployments: "[\"gpt-4o\"]".into(),
            serves_resources: true,
            updated_at: now,
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
            updated_at: now,
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
    assert!(db.insert_snapshot(7, &text, "tester").await.unwrap());
    assert!(
        !db.insert_snapshot(7, &text, "tester").await.unwrap(),
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

fn pool(id: &str, deployment: &str) -> PoolRow {
    PoolRow {
        id: id.into(),
        deployments: format!("[\"{deployment}\"]"),
        serves_resources: false,
        updated_at: OffsetDateTime::now_utc(),
    }
}

fn member(pool_id: &str, id: &str) -> MemberRow {
    MemberRow {
        pool_id: pool_id.into(),
        id: id.into(),
        kind: "azure_openai".into(),
        endpoint: format!("https://{id}.example.invalid"),
        deployment: None,
        api_version: None,
        priority: 1,
        weight: 1,
        credential: "{\"type\":\"api_key\",\"secret\":\"env:KEY\"}".into(),
        updated_at: OffsetDateTime::now_utc(),
    }
}

fn refused(error: PortalError) -> String {
    assert!(
        matches!(
            &error,
            PortalError::Invalid {
                field: "configuration",
                ..
            }
        ),
        "expected the configuration to be refused, got {error:?}"
    );
    error.to_string()
}

/// Each way of writing what snapshots are built from checks the result as a gateway would,
/// before its commit: a change that would make a snapshot every gateway refuses (here written
/// past the portal's own form checks) is refused whole — no row, no activity entry — and the
/// database still builds a snapshot a gateway runs.
async fn refuses_what_a_gateway_would(db: &ConfigDb) {
    db.replace_pool(
        &pool("a", "gpt-4o"),
        &[member("a", "east")],
        activity("pool.replace", "a"),
    )
    .await
    .unwrap();

    // `replace_pool`: a second pool serving the same deployment.
    let message = refused(
        db.replace_pool(
            &pool("b", "gpt-4o"),
            &[member("b", "west")],
            activity("pool.replace", "b"),
        )
        .await
        .unwrap_err(),
    );
    assert!(
        message.contains("`gpt-4o` is already served by"),
        "{message}"
    );

    // `write` (`insert_pool`, `insert_member`): a pool without members is not sent, so it may
    // name the deployment; its first member would make it served twice.
    assert!(
        db.insert_pool(&pool("c", "gpt-4o"), activity("pool.upsert", "c"))
            .await
            .unwrap()
    );
    let message = refused(
        db.insert_member(&member("c", "north"), activity("member.upsert", "c"))
            .await
            .unwrap_err(),
    );
    assert!(message.contains("already served by"), "{message}");
    // A member id used in another pool.
    assert!(
        db.insert_pool(&pool("d", "gpt-4o-mini"), activity("pool.upsert", "d"))
            .await
            .unwrap()
    );
    let message = refused(
        db.insert_member(&member("d", "east"), activity("member.upsert", "d"))
            .await
            .unwrap_err(),
    );
    assert!(message.contains("duplicate member id `east`"), "{message}");

    // `insert_access_rule`: a rule for a subscription that does not exist.
    let message = refused(
        db.insert_access_rule(
            &AccessRuleRow {
                id: "ghost".into(),
                grantee_kind: "subscription".into(),
                grantee_id: "nobody".into(),
                deployments: "[\"gpt-4o\"]".into(),
                operations: "[]".into(),
                ..Default::default()
            },
            activity("rule.create", "ghost"),
        )
        .await
        .unwrap_err(),
    );
    assert!(message.contains("no subscription `nobody`"), "{message}");

    // `save_setting`: gateway settings naming a tenant by its domain.
    let settings =
        r#"{"identity":{"entra":{"tenants":["contoso.com"],"audiences":["api://gatehouse"]}}}"#;
    let message = refused(
        db.save_setting(
            snapshot::BASE_SETTING,
            settings,
            OffsetDateTime::now_utc(),
            None,
            activity("settings.update", snapshot::BASE_SETTING),
        )
        .await
        .unwrap_err(),
    );
    assert!(message.contains("identity.entra.tenants[0]"), "{message}");
    assert_eq!(db.setting(snapshot::BASE_SETTING).await.unwrap(), None);

    let pools: Vec<String> = db
        .pools()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(pools, ["a", "c", "d"], "the refused pool was not written");
    let members: Vec<String> = db
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(members, ["east"], "no refused member was written");
    assert!(db.access_rules().await.unwrap().is_empty());
    let log = db.activity(20).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|entry| entry.action.as_str()).collect();
    assert_eq!(
        actions,
        ["pool.upsert", "pool.upsert", "pool.replace"],
        "only the changes written have an activity entry"
    );
    let built = snapshot::build(db, 1).await.unwrap();
    assert!(gatehouse_schema::validate::problems(&built).is_empty());
}

#[tokio::test]
async fn sqlite_refuses_a_change_a_gateway_would_refuse() {
    let test = common::sqlite().await;
    refuses_what_a_gateway_would(&test.db).await;
}

#[tokio::test]
async fn postgres_refuses_a_change_a_gateway_would_refuse() {
    let test = common::postgres().await;
    refuses_what_a_gateway_would(&test.db).await;
}

/// Two changes at once that each pass the check alone but not together (two pools claiming one
/// deployment, from two admins or two portal replicas): exactly one is written, every time.
async fn two_changes_at_once_cannot_both_pass(db: &ConfigDb) {
    for round in 0..20 {
        let deployment = format!("model-{round}");
        let (left, right) = (format!("left-{round}"), format!("right-{round}"));
        let (left_pool, right_pool) = (pool(&left, &deployment), pool(&right, &deployment));
        let left_members = [member(&left, &format!("{left}-m"))];
        let right_members = [member(&right, &format!("{right}-m"))];
        let (first, second) = tokio::join!(
            db.replace_pool(&left_pool, &left_members, activity("pool.replace", &left)),
            db.replace_pool(
                &right_pool,
                &right_members,
                activity("pool.replace", &right)
            ),
        );
        assert!(
            first.is_ok() != second.is_ok(),
            "round {round}: exactly one of the two pools is written ({first:?}, {second:?})"
        );
    }
    let built = snapshot::build(db, 1).await.unwrap();
    assert_eq!(built.pools.len(), 20);
    assert!(gatehouse_schema::validate::problems(&built).is_empty());
}

#[tokio::test]
async fn sqlite_two_changes_at_once_cannot_both_pass_the_check() {
    let test = common::sqlite().await;
    two_changes_at_once_cannot_both_pass(&test.db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_changes_at_once_cannot_both_pass_the_check() {
    let test = common::postgres().await;
    two_changes_at_once_cannot_both_pass(&test.db).await;
}

/// What was written around the portal (by hand here) and would make a snapshot gateways refuse
/// is not published: no version is stored, and the error says why.
async fn publishes_nothing_a_gateway_would_refuse(db: &ConfigDb) {
    const POOL: &str = "INSERT INTO backend_pools (id, deployments, serves_resources, created_at, updated_at) VALUES ($1, $2, FALSE, $3, $3)";
    const MEMBER: &str = "INSERT INTO pool_members (pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential) VALUES ($1, $2, 'azure_openai', 'https://x.example.invalid', NULL, NULL, 1, 1, '{\"type\":\"api_key\",\"secret\":\"env:KEY\"}')";
    let now = OffsetDateTime::now_utc();
    macro_rules! insert_two_pools {
        ($conn:expr) => {
            for (pool, member) in [("a", "a-1"), ("b", "b-1")] {
                sqlx::query(POOL)
                    .bind(pool)
                    .bind("[\"gpt-4o\"]")
                    .bind(now)
                    .execute($conn)
                    .await
                    .unwrap();
                sqlx::query(MEMBER)
                    .bind(pool)
                    .bind(member)
                    .execute($conn)
                    .await
                    .unwrap();
            }
        };
    }
    match &db.engine {
        Engine::Sqlite(conn) => insert_two_pools!(conn),
        Engine::Postgres(conn) => insert_two_pools!(conn),
    }
    let publisher = Publisher::new(db.clone(), std::time::Duration::from_secs(2)).unwrap();
    let message = refused(publisher.publish("tester").await.unwrap_err());
    assert!(message.contains("nothing was published"), "{message}");
    assert!(
        message.contains("`gpt-4o` is already served by"),
        "{message}"
    );
    assert!(db.latest_snapshot().await.unwrap().is_none());
}

#[tokio::test]
async fn sqlite_publishes_nothing_a_gateway_would_refuse() {
    let test = common::sqlite().await;
    publishes_nothing_a_gateway_would_refuse(&test.db).await;
}

#[tokio::test]
async fn postgres_publishes_nothing_a_gateway_would_refuse() {
    let test = common::postgres().await;
    publishes_nothing_a_gateway_would_refuse(&test.db).await;
}

/// Two portal replicas on one database publishing at the same moment both store a version, one
/// after the other: the one that finds its number taken builds again.
async fn replicas_publishing_at_once_both_store_a_version(db: &ConfigDb) {
    let first = Publisher::new(db.clone(), std::time::Duration::from_secs(2)).unwrap();
    let second = Publisher::new(db.clone(), std::time::Duration::from_secs(2)).unwrap();
    for round in 0..10_u64 {
        let (a, b) = tokio::join!(first.publish("first"), second.publish("second"));
        let mut versions = [a.unwrap().0, b.unwrap().0];
        versions.sort_unstable();
        assert_eq!(versions, [2 * round + 1, 2 * round + 2]);
    }
    let latest = db.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(latest.version, 20);
}

#[tokio::test]
async fn sqlite_replicas_publishing_at_once_both_store_a_version() {
    let test = common::sqlite().await;
    replicas_publishing_at_once_both_store_a_version(&test.db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_publishing_at_once_both_store_a_version() {
    let test = common::postgres().await;
    replicas_publishing_at_once_both_store_a_version(&test.db).await;
}

/// Sign-outs are found by hash, and those past their time are deleted at the next sign-out.
async fn signed_out_sessions(db: &ConfigDb) {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!(!db.is_signed_out("sha256:aa").await.unwrap());
    db.record_signed_out("sha256:aa", now - 10).await.unwrap();
    db.record_signed_out("sha256:bb", now + 3600).await.unwrap();
    assert!(db.is_signed_out("sha256:bb").await.unwrap());
    // Recorded again (signed out twice): one row.
    db.record_signed_out("sha256:bb", now + 3600).await.unwrap();
    // "aa", past its time, went at the sign-out after it.
    assert!(!db.is_signed_out("sha256:aa").await.unwrap());
    assert_eq!(db.signed_out_count().await.unwrap(), 1);
}

#[tokio::test]
async fn sqlite_signed_out_sessions_are_kept_until_their_time() {
    signed_out_sessions(&common::sqlite().await.db).await;
}

#[tokio::test]
async fn postgres_signed_out_sessions_are_kept_until_their_time() {
    signed_out_sessions(&common::postgres().await.db).await;
}
