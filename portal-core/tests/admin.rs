//! The admin operations behind the access-rule, pool and gateway pages, against a real in-process
//! gateway and simulator: rules (with limits) decide what a key may call, bad input changes
//! nothing, pools route calls and the gateway's view of each member's health comes back, two
//! versions can be compared and an old one rolled back to, and a rotation's overlap ends by itself
//! (by the portal's task, and at the gateway on the snapshot it has).
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;

use common::{ADMIN_TOKEN, TestGateway, admin, gateway_at, simulator};

use std::time::Duration;

use gatehouse_gateway::server::Listening;
use gatehouse_portal_core::db::{ActivityRow, NewActivity};
use gatehouse_portal_core::ops::{NewSubscription, PortalSettings, version_text};
use gatehouse_portal_core::pools::{MemberInput, PoolInput};
use gatehouse_portal_core::rules::AccessRuleInput;
use gatehouse_portal_core::user::SessionUser;
use gatehouse_portal_core::{ConfigDb, Portal, PortalError};
use gatehouse_schema::backends::MemberAvailability;
use gatehouse_schema::portal::Role;
use gatehouse_simulator::RunningSimulator;
use serde_json::{Value, json};
use time::OffsetDateTime;

struct Fleet {
    portal: Portal,
    gateway: String,
    simulator: RunningSimulator,
    _listening: Listening,
    dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// A portal on `db` with one registered gateway (started at version 0) and a simulator.
async fn fleet(db: &ConfigDb, rotation_overlap: Option<time::Duration>) -> Fleet {
    let secrets = tempfile::tempdir().unwrap();
    let TestGateway {
        url,
        listening,
        state_dir: state,
    } = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let simulator = simulator().await;
    let portal = Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings {
            rotation_overlap,
            ..PortalSettings::default()
        },
    };
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    portal
        .register_gateway(
            Some(&admin()),
            "gw",
            &url,
            &format!("file:{}", token_file.display()),
        )
        .await
        .unwrap();
    Fleet {
        portal,
        gateway: url,
        simulator,
        _listening: listening,
        dirs: (state, secrets),
    }
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

async fn running(url: &str) -> Value {
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

async fn subscription(portal: &Portal, id: &str) -> String {
    portal
        .create_subscription(
            Some(&admin()),
            NewSubscription {
                id: id.into(),
                display_name: id.into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap()
        .key
}

async fn simulator_pool(fleet: &Fleet) {
    let user = admin();
    fleet
        .portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "sim".into(),
                deployments: "gpt-4o, gpt-4o-mini".into(),
                serves_resources: false,
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap();
    fleet
        .portal
        .save_member(
            Some(&user),
            MemberInput {
                pool_id: "sim".into(),
                id: "sim".into(),
                kind: "azure_openai".into(),
                endpoint: fleet.simulator.url(),
                priority: "2".into(),
                ..MemberInput::default()
            },
        )
        .await
        .unwrap();
}

fn rule(id: &str, subscription: &str, deployments: &str) -> AccessRuleInput {
    AccessRuleInput {
        id: id.into(),
        grantee_kind: "subscription".into(),
        grantee_id: subscription.into(),
        deployments: deployments.into(),
        ..AccessRuleInput::default()
    }
}

async fn rules_decide_what_a_key_may_call(db: ConfigDb) {
    let fleet = fleet(&db, None).await;
    let portal = &fleet.portal;
    let user = admin();
    simulator_pool(&fleet).await;
    let key = subscription(portal, "team-a").await;
    assert_eq!(
        chat(&fleet.gateway, "gpt-4o", &key).await,
        403,
        "no rule yet"
    );

    // Bad input: refused with the field named, nothing written, nothing published.
    let versions = db.snapshot_versions(100).await.unwrap().len();
    let activity = db.activity(1000).await.unwrap().len();
    let mut bad = rule("team-a-gpt", "team-a", "gpt-4o");
    bad.quota_tokens = "1000".into();
    let error = portal
        .save_access_rule(Some(&user), bad, false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PortalError::Invalid {
                field: "quota_period",
                ..
            }
        ),
        "{error}"
    );
    let error = portal
        .save_access_rule(
            Some(&user),
            rule("x", "no-such-subscription", "gpt-4o"),
            false,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PortalError::Invalid {
                field: "grantee_id",
                ..
            }
        ),
        "{error}"
    );
    // Limits on a rule for calls without a deployment only would limit every call of the
    // grantee (a limit rule that names no deployment covers them all): refused at the limit.
    let mut resources_only = rule("team-a-files", "team-a", "");
    resources_only.resources = true;
    resources_only.tokens_per_minute = "5".into();
    let error = portal
        .save_access_rule(Some(&user), resources_only, false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            PortalError::Invalid {
                field: "tokens_per_minute",
                message,
            } if message.starts_with("limits apply to the deployments a rule names")
        ),
        "{error}"
    );
    // Free text with a control character (a NUL, which PostgreSQL's text columns refuse, a
    // line break) is refused with the field named, on both engines.
    for (display_name, app_role, field) in [
        ("Callers\u{0}", "Gatehouse.Caller", "grantee_display_name"),
        ("Callers", "Gatehouse.\u{0}Caller", "grantee_id"),
    ] {
        let mut garbled = rule("team-a-app", app_role, "gpt-4o");
        garbled.grantee_kind = "app_role".into();
        garbled.grantee_display_name = display_name.into();
        let error = portal
            .save_access_rule(Some(&user), garbled, false)
            .await
            .unwrap_err();
        assert!(
            matches!(error, PortalError::Invalid { field: f, .. } if f == field),
            "{error}"
        );
    }
    for (display_name, product, field) in [
        ("Team\u{0}B", "", "display_name"),
        ("Team B", "line\nbreak", "product"),
    ] {
        let error = portal
            .create_subscription(
                Some(&user),
                NewSubscription {
                    id: "team-b".into(),
                    display_name: display_name.into(),
                    product: product.into(),
                    ..NewSubscription::default()
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, PortalError::Invalid { field: f, .. } if f == field),
            "{error}"
        );
    }
    assert_eq!(db.snapshot_versions(100).await.unwrap().len(), versions);
    assert_eq!(db.activity(1000).await.unwrap().len(), activity);

    // A rule with a limit: the key works for the granted deployment, 403 for another.
    let mut limited = rule("team-a-gpt", "team-a", "gpt-4o");
    limited.requests_per_minute = "600".into();
    portal
        .save_access_rule(Some(&user), limited, false)
        .await
        .unwrap();
    let config = running(&fleet.gateway).await;
    assert_eq!(config["access_rules"][0]["id"], "team-a-gpt");
    assert_eq!(config["limits"][0]["id"], "rule:team-a-gpt");
    assert_eq!(config["limits"][0]["subject"]["kind"], "subscription");
    assert_eq!(config["limits"][0]["requests_per_minute"], 600);
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &key).await, 200);
    assert_eq!(chat(&fleet.gateway, "gpt-4o-mini", &key).await, 403);

    // Creating it again is refused; editing grants the other deployment.
    let again = portal
        .save_access_rule(Some(&user), rule("team-a-gpt", "team-a", "gpt-4o"), false)
        .await
        .unwrap_err();
    assert!(matches!(again, PortalError::Invalid { field: "id", .. }));
    let opened = db.access_rule("team-a-gpt").await.unwrap().unwrap();
    portal
        .save_access_rule(
            Some(&user),
            AccessRuleInput {
                version: version_text(opened.updated_at),
                ..rule("team-a-gpt", "team-a", "gpt-4o gpt-4o-mini")
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(chat(&fleet.gateway, "gpt-4o-mini", &key).await, 200);
    assert_eq!(running(&fleet.gateway).await["limits"], json!([]));

    // Deleting it denies everything again.
    let shown = db.access_rule("team-a-gpt").await.unwrap().unwrap();
    portal
        .delete_access_rule(Some(&user), "team-a-gpt", &version_text(shown.updated_at))
        .await
        .unwrap();
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &key).await, 403);
    let actions: Vec<String> = db
        .activity(10)
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.action)
        .collect();
    assert_eq!(
        actions[..3],
        [
            "access_rule.delete",
            "access_rule.update",
            "access_rule.create"
        ]
    );

    // Who searched and opened which calls is for admins; an auditor reads the changes only.
    db.log_activity(NewActivity {
        actor: "Ann Auditor <auditor-oid>",
        action: "audit.view",
        target: "call-000",
        before: None,
        after: None,
    })
    .await
    .unwrap();
    let auditor = SessionUser {
        subject: "auditor-oid".into(),
        name: "Ann Auditor".into(),
        roles: vec![Role::Auditor],
        ..admin()
    };
    let seen = |rows: Vec<ActivityRow>| rows.into_iter().map(|e| e.action).collect::<Vec<_>>();
    let by_admin = seen(portal.activity(Some(&user), 10).await.unwrap());
    assert_eq!(by_admin[..2], ["audit.view", "access_rule.delete"]);
    let by_auditor = seen(portal.activity(Some(&auditor), 10).await.unwrap());
    assert_eq!(by_auditor[..3], actions[..3]);
    assert!(!by_auditor.iter().any(|action| action.starts_with("audit.")));

    // Compare two versions, then roll back to the one with the edited rule.
    let with_rule = db.latest_snapshot().await.unwrap().unwrap().version - 1;
    let diff = portal
        .version_diff(Some(&user), with_rule, with_rule + 1)
        .await
        .unwrap();
    assert!(
        diff.iter()
            .any(|line| line.tag == '-' && line.text.contains("\"team-a-gpt\"")),
        "{diff:?}"
    );
    assert!(
        diff.iter().any(|line| line.tag == '+'
            && line
                .text
                .contains(&format!("\"version\": {}", with_rule + 1))),
        "{diff:?}"
    );
    assert!(
        !diff
            .iter()
            .any(|line| line.tag == '+' && line.text.contains("team-a-gpt"))
    );
    portal
        .revoke_subscription(Some(&user), "team-a")
        .await
        .unwrap();
    let shown = db.latest_snapshot().await.unwrap().unwrap().version;
    let new_version = portal
        .rollback(Some(&user), with_rule, shown)
        .await
        .unwrap()
        .version;
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        i64::try_from(new_version).unwrap()
    );
    let rules = db.access_rules().await.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].deployments, r#"["gpt-4o","gpt-4o-mini"]"#);
    let config = running(&fleet.gateway).await;
    assert_eq!(config["version"], json!(new_version));
    assert_eq!(config["access_rules"][0]["id"], "team-a-gpt");
    assert_eq!(
        chat(&fleet.gateway, "gpt-4o", &key).await,
        401,
        "a roll-back never brings a revoked key back"
    );
    let entry = &db.activity(1).await.unwrap()[0];
    assert_eq!(entry.action, "config.rollback");
    assert_eq!(entry.actor, "Ada Admin <admin-oid>");
    let current = db.latest_snapshot().await.unwrap().unwrap().version;
    let same = portal
        .rollback(Some(&user), current, current)
        .await
        .unwrap_err();
    assert!(matches!(
        same,
        PortalError::Invalid {
            field: "version",
            ..
        }
    ));
}

async fn pools_route_and_report_member_health(db: ConfigDb) {
    let fleet = fleet(&db, None).await;
    let portal = &fleet.portal;
    let user = admin();
    simulator_pool(&fleet).await;
    // A member tried first whose port nobody listens on: the gateway sets it aside.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // The gateway reads the member's key when it takes the snapshot: it must exist.
    let key_file = fleet.dirs.1.path().join("dead-key");
    std::fs::write(&key_file, "dead-member-key").unwrap();
    let key_ref = format!("file:{}", key_file.display());
    portal
        .save_member(
            Some(&user),
            MemberInput {
                pool_id: "sim".into(),
                id: "dead".into(),
                kind: "azure_openai".into(),
                endpoint: dead,
                priority: "1".into(),
                api_key_ref: key_ref.clone(),
                ..MemberInput::default()
            },
        )
        .await
        .unwrap();
    let key = subscription(portal, "team-p").await;
    portal
        .save_access_rule(Some(&user), rule("team-p", "team-p", "*"), false)
        .await
        .unwrap();
    assert_eq!(
        chat(&fleet.gateway, "gpt-4o", &key).await,
        200,
        "failed over"
    );

    let reports = portal.backend_health(Some(&user)).await.unwrap();
    assert_eq!(reports.len(), 1);
    let states = reports[0].result.as_ref().unwrap();
    let state_of = |id: &str| states.members.iter().find(|m| m.member == id).unwrap();
    assert_eq!(state_of("dead").state, MemberAvailability::Failing);
    assert!(state_of("dead").set_aside_until.unwrap() > OffsetDateTime::now_utc());
    assert_eq!(state_of("sim").state, MemberAvailability::Available);

    // Another pool may not claim the same deployment; a pool without members is not sent.
    let clash = portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "other".into(),
                deployments: "gpt-4o".into(),
                serves_resources: false,
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        clash,
        PortalError::Invalid {
            field: "deployments",
            ..
        }
    ));
    portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "empty".into(),
                deployments: "o1".into(),
                serves_resources: false,
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap();
    let config = running(&fleet.gateway).await;
    let pools: Vec<&str> = config["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(pools, ["sim"]);
    assert!(config.to_string().contains(&key_ref));
    assert!(
        !config.to_string().contains("dead-member-key"),
        "only the reference travels"
    );

    let dead = db.member("sim", "dead").await.unwrap().unwrap();
    portal
        .delete_member(Some(&user), "sim", "dead", &version_text(dead.updated_at))
        .await
        .unwrap();
    let empty = version_text(db.pool("empty").await.unwrap().unwrap().updated_at);
    portal
        .delete_pool(Some(&user), "empty", &empty)
        .await
        .unwrap();
    let left = portal.pools(Some(&user)).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].members.len(), 1);
    let gone = portal
        .delete_pool(Some(&user), "empty", &empty)
        .await
        .unwrap_err();
    assert!(matches!(gone, PortalError::NotFound(_)));
}

async fn a_rotation_overlap_ends_by_itself(db: ConfigDb) {
    let fleet = fleet(&db, Some(time::Duration::seconds(2))).await;
    let portal = &fleet.portal;
    let user = admin();
    simulator_pool(&fleet).await;
    let first = subscription(portal, "team-r").await;
    portal
        .save_access_rule(Some(&user), rule("team-r", "team-r", "gpt-4o"), false)
        .await
        .unwrap();
    let second = portal
        .rotate_subscription_key(Some(&user), "team-r", "")
        .await
        .unwrap()
        .key;
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &first).await, 200, "overlap");
    assert_eq!(portal.retire_ended_overlaps().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(portal.retire_ended_overlaps().await.unwrap(), 1);
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &first).await, 401);
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &second).await, 200);
    let row = db.subscription("team-r").await.unwrap().unwrap();
    assert_eq!(row.secondary_key_hash, None);
    assert_eq!(row.secondary_expires_at, None);
    assert_eq!(
        db.activity(1).await.unwrap()[0].actor,
        "portal (rotation overlap ended)"
    );
}

/// The end of a rotation's overlap travels in the published snapshot, so a gateway refuses the
/// previous key from then on by itself: here the portal's retire task never runs and no newer
/// snapshot reaches the gateway (as with the portal down).
async fn a_previous_key_is_refused_after_its_overlap_without_the_portal(db: ConfigDb) {
    let fleet = fleet(&db, Some(time::Duration::seconds(2))).await;
    let portal = &fleet.portal;
    let user = admin();
    simulator_pool(&fleet).await;
    let first = subscription(portal, "team-o").await;
    portal
        .save_access_rule(Some(&user), rule("team-o", "team-o", "gpt-4o"), false)
        .await
        .unwrap();
    let second = portal
        .rotate_subscription_key(Some(&user), "team-o", "")
        .await
        .unwrap()
        .key;
    let end = db
        .subscription("team-o")
        .await
        .unwrap()
        .unwrap()
        .secondary_expires_at
        .expect("a rotation with overlap stores its end");

    let config = running(&fleet.gateway).await;
    let published = config["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "team-o")
        .unwrap();
    assert!(published["secondary_key_hash"].is_string(), "{published}");
    let published_end = OffsetDateTime::parse(
        published["secondary_expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(published_end, end, "the snapshot carries the overlap's end");
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &first).await, 200, "overlap");

    let left = end - OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::try_from(left).unwrap_or_default() + Duration::from_millis(100))
        .await;
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &first).await, 401);
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &second).await, 200);
    assert_eq!(
        running(&fleet.gateway).await["version"],
        config["version"],
        "the gateway refused the key on the snapshot it already had"
    );
    assert!(
        db.subscription("team-o")
            .await
            .unwrap()
            .unwrap()
            .secondary_key_hash
            .is_some(),
        "the portal has not retired the key"
    );
}

/// The gateway settings page: what it saves is published beside the portal's own tables and
/// runs on the gateway; what it refuses (by shape, or by the checks a gateway makes) changes
/// nothing.
async fn gateway_settings_are_published_beside_the_portals_tables(db: ConfigDb) {
    let fleet = fleet(&db, None).await;
    let portal = &fleet.portal;
    let user = admin();
    simulator_pool(&fleet).await;
    let key = subscription(portal, "team-a").await;
    portal
        .save_access_rule(
            Some(&user),
            AccessRuleInput {
                tokens_per_minute: "20000".into(),
                ..rule("team-a-gpt", "team-a", "gpt-4o")
            },
            false,
        )
        .await
        .unwrap();
    let opened = portal.gateway_settings(Some(&user)).await.unwrap();
    assert_eq!((opened.text.as_str(), opened.version), ("{}", None));

    let settings = r#"{"version": 99, "trusted_proxies": ["10.0.1.0/24"],
        "limits": [{"id": "everyone", "subject": {"kind": "each_user"}, "requests_per_minute": 600}]}"#;
    let version = portal
        .save_gateway_settings(Some(&user), settings, "")
        .await
        .unwrap()
        .version;
    let config = running(&fleet.gateway).await;
    assert_eq!(
        config["version"],
        json!(version),
        "the portal numbers the version"
    );
    assert_eq!(config["trusted_proxies"], json!(["10.0.1.0/24"]));
    let limit_ids: Vec<&str> = config["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|limit| limit["id"].as_str().unwrap())
        .collect();
    assert_eq!(limit_ids, ["everyone", "rule:team-a-gpt"]);
    assert_eq!(config["access_rules"][0]["id"], "team-a-gpt");
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &key).await, 200);
    let entry = &db.activity(1).await.unwrap()[0];
    assert_eq!(
        (
            entry.action.as_str(),
            entry.target.as_str(),
            entry.before.as_deref()
        ),
        ("settings.update", "snapshot.base", None)
    );
    assert!(entry.after.as_deref().unwrap().contains("10.0.1.0/24"));
    let shown = portal.gateway_settings(Some(&user)).await.unwrap();
    assert!(
        shown.text.contains("\"trusted_proxies\"") && !shown.text.contains("\"version\""),
        "{shown:?}"
    );
    let shown_version = version_text(shown.version.unwrap());

    // Refused: nothing stored, nothing published, no activity.
    let auditor = SessionUser {
        roles: vec![Role::Auditor],
        ..admin()
    };
    for (who, text) in [
        (&auditor, r#"{"trusted_proxies": []}"#),
        (
            &user,
            r#"{"trusted_proxies": ["10.0.1.0/24", "10.0.2.0/33"]}"#,
        ),
        (&user, r#"{"pools": []}"#),
    ] {
        let error = portal
            .save_gateway_settings(Some(who), text, &shown_version)
            .await
            .unwrap_err();
        assert!(
            matches!(error, PortalError::Forbidden | PortalError::Invalid { .. }),
            "{error}"
        );
    }
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        i64::try_from(version).unwrap()
    );
    assert_eq!(db.activity(1).await.unwrap()[0].id, entry.id);
    assert!(portal.gateway_settings(Some(&auditor)).await.is_err());

    // A tenant given as a domain has a snapshot's shape, but a gateway would refuse it (tenants
    // are GUIDs): refused here, by the gateway's own checks, before anything is published.
    let domain = r#"{"identity": {"require": "key_or_token",
        "entra": {"tenants": ["contoso.onmicrosoft.com"], "audiences": ["api://gatehouse"]}}}"#;
    let error = portal
        .save_gateway_settings(Some(&user), domain, &shown_version)
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(
            "settings: identity.entra.tenants[0]: a tenant id is the directory's GUID"
        ),
        "{message}"
    );
    assert_eq!(
        db.latest_snapshot().await.unwrap().unwrap().version,
        i64::try_from(version).unwrap()
    );
    assert_eq!(running(&fleet.gateway).await["version"], json!(version));
    assert_eq!(db.gateways().await.unwrap()[0].last_error, None);
    assert_eq!(chat(&fleet.gateway, "gpt-4o", &key).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_rules_decide_what_a_key_may_call() {
    let test = common::sqlite().await;
    rules_decide_what_a_key_may_call(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_rules_decide_what_a_key_may_call() {
    let test = common::postgres().await;
    rules_decide_what_a_key_may_call(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_pools_route_and_report_member_health() {
    let test = common::sqlite().await;
    pools_route_and_report_member_health(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_pools_route_and_report_member_health() {
    let test = common::postgres().await;
    pools_route_and_report_member_health(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_rotation_overlap_ends_by_itself() {
    let test = common::sqlite().await;
    a_rotation_overlap_ends_by_itself(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_previous_key_is_refused_after_its_overlap_without_the_portal() {
    let test = common::sqlite().await;
    a_previous_key_is_refused_after_its_overlap_without_the_portal(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_previous_key_is_refused_after_its_overlap_without_the_portal() {
    let test = common::postgres().await;
    a_previous_key_is_refused_after_its_overlap_without_the_portal(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_gateway_settings_are_published_beside_the_portals_tables() {
    let test = common::sqlite().await;
    gateway_settings_are_published_beside_the_portals_tables(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_gateway_settings_are_published_beside_the_portals_tables() {
    let test = common::postgres().await;
    gateway_settings_are_published_beside_the_portals_tables(test.db.clone()).await;
}

/// A gateway URL that carries credentials (`https://user:password@…`) is refused beside the URL
/// field, without repeating the password, as a pool member's endpoint is: the portal sends the
/// gateway's admin token as a secret reference's value, never a password in a URL. Nothing is
/// registered or logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_url_with_credentials_is_refused() {
    let test = common::sqlite().await;
    let db = &test.db;
    let portal = Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings::default(),
    };
    let user = admin();
    let token_ref = format!(
        "file:{}/gatehouse-admin-token",
        std::env::temp_dir().display()
    );
    for url in [
        "https://ops:hunter2-gateway-pass@gw.example.com:8443",
        "http://:hunter2-gateway-pass@127.0.0.1:9",
        "http://hunter2-gateway-user@127.0.0.1:9/",
    ] {
        let refused = portal
            .register_gateway(Some(&user), "gw", url, &token_ref)
            .await
            .unwrap_err();
        match &refused {
            PortalError::Invalid {
                field: "url",
                message,
            } => assert!(!message.contains("hunter2"), "{message}"),
            other => panic!("{url}: {other:?}"),
        }
        assert!(!refused.public_message().contains("hunter2"));
    }
    assert!(db.gateways().await.unwrap().is_empty());
    assert!(db.activity(10).await.unwrap().is_empty());

    // The start option `--gateway ID=URL=SECRET_REF` uses the same check.
    let refused =
        gatehouse_portal_core::ops::checked_gateway("gw", "https://ops:hunter2@gw.example.com")
            .unwrap_err();
    assert!(
        matches!(&refused, PortalError::Invalid { field: "url", message } if !message.contains("hunter2")),
        "{refused:?}"
    );
    let refused =
        gatehouse_portal_core::ops::checked_gateway("g w", "https://gw.example.com").unwrap_err();
    assert!(
        matches!(refused, PortalError::Invalid { field: "id", .. }),
        "{refused:?}"
    );
    let refused =
        gatehouse_portal_core::ops::checked_gateway("gw", "ftp://gw.example.com").unwrap_err();
    assert!(
        matches!(refused, PortalError::Invalid { field: "url", .. }),
        "{refused:?}"
    );
    let (id, url) =
        gatehouse_portal_core::ops::checked_gateway(" gw ", " https://gw.example.com:8443")
            .unwrap();
    assert_eq!(
        (id.as_str(), url.as_str()),
        ("gw", "https://gw.example.com:8443/")
    );

    // Without credentials the same gateway is registered (and, down, not reached).
    portal
        .register_gateway(Some(&user), "gw", "http://127.0.0.1:9", &token_ref)
        .await
        .unwrap();
    assert_eq!(db.gateways().await.unwrap()[0].url, "http://127.0.0.1:9/");
}

/// A gateway on another host is reached over https:// only: the Gateways page refuses a plain
/// http:// URL there, and a row stored anyway (before the rule, or by hand) is not pushed to,
/// its push error saying why. (`--allow-plain-http-gateways` lifting the rule is shown by
/// `secret::tests::plain_http_reaches_loopback_gateways_only_unless_allowed`: a test here would
/// ask a resolver for the host.)
#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_gateway_on_another_host_is_refused_and_never_pushed_to() {
    let test = common::sqlite().await;
    let db = &test.db;
    let portal = Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings::default(),
    };
    let user = admin();
    let token_ref = format!(
        "file:{}/gatehouse-admin-token",
        std::env::temp_dir().display()
    );
    for url in ["http://gw.example.invalid:8080", "http://10.0.0.4:8080"] {
        let refused = portal
            .register_gateway(Some(&user), "gw", url, &token_ref)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, PortalError::Invalid { field: "url", message } if message.contains("https://")),
            "{url}: {refused:?}"
        );
    }
    assert!(db.gateways().await.unwrap().is_empty());
    assert!(db.activity(10).await.unwrap().is_empty());

    // Stored anyway: the push names the rule and reaches nothing (the host does not resolve, so
    // a connection attempt would have said "unreachable" instead).
    db.upsert_gateway(
        "legacy",
        "http://gw.example.invalid:8080/",
        &token_ref,
        NewActivity {
            actor: "test",
            action: "gateway.register",
            target: "legacy",
            before: None,
            after: None,
        },
    )
    .await
    .unwrap();
    let outcomes = portal.push_now(Some(&user)).await.unwrap();
    let legacy = outcomes.iter().find(|o| o.gateway == "legacy").unwrap();
    let why = legacy.result.as_ref().unwrap_err();
    assert!(why.contains("https:// only"), "{why}");
}
