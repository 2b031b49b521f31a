//! Two admins editing one thing at once (optimistic concurrency): an access rule, a pool, a pool
//! member and the gateway settings are each saved only from the version the form read. A save
//! from a version someone else has replaced since is refused with `PortalError::Conflict` and
//! writes nothing — the row stays as the other save left it, no activity entry, no published
//! version — and a save after reading again goes through. Deletes are conditional likewise, and
//! creating an id that exists never overwrites it. On SQLite and PostgreSQL.
#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

mod common;

use common::admin;

use gatehouse_portal_core::db::{NewActivity, next_version};
use gatehouse_portal_core::error::Edited;
use gatehouse_portal_core::ops::{PortalSettings, version_text};
use gatehouse_portal_core::pools::{MemberInput, PoolInput};
use gatehouse_portal_core::rules::AccessRuleInput;
use gatehouse_portal_core::user::SessionUser;
use gatehouse_portal_core::{ConfigDb, Portal, PortalError};
use time::OffsetDateTime;

/// A portal on `db` (no gateway registered: publishing stores the versions).
fn portal(db: &ConfigDb) -> Portal {
    Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings::default(),
    }
}

/// The second admin.
fn bea() -> SessionUser {
    SessionUser {
        subject: "bea-oid".into(),
        name: "Bea Admin".into(),
        ..admin()
    }
}

/// What a refused save must leave as it was: the activity log and the published versions.
#[derive(Debug, PartialEq)]
struct Written {
    activity_entries: usize,
    newest_activity: Option<(String, String)>,
    published: Option<i64>,
}

async fn written(db: &ConfigDb) -> Written {
    let log = db.activity(1000).await.unwrap();
    Written {
        activity_entries: log.len(),
        newest_activity: log
            .first()
            .map(|entry| (entry.action.clone(), entry.actor.clone())),
        published: db.latest_snapshot().await.unwrap().map(|row| row.version),
    }
}

/// The refusal of a save from a replaced version, naming when it was replaced.
#[track_caller]
fn assert_conflict(error: &PortalError, what: Edited, at: Option<OffsetDateTime>) {
    match error {
        PortalError::Conflict {
            what: refused,
            changed_at,
        } => assert_eq!((*refused, *changed_at), (what, at), "{error}"),
        other => panic!("expected a conflict about {what:?}, got {other:?}"),
    }
}

fn rule(deployments: &str, version: &str) -> AccessRuleInput {
    AccessRuleInput {
        id: "research".into(),
        grantee_kind: "group".into(),
        grantee_id: "5f1c0d3e-8a2b-4c6d-9e0f-123456789abc".into(),
        grantee_display_name: "Research".into(),
        deployments: deployments.into(),
        version: version.into(),
        ..AccessRuleInput::default()
    }
}

async fn rule_version(db: &ConfigDb) -> OffsetDateTime {
    db.access_rule("research")
        .await
        .unwrap()
        .unwrap()
        .updated_at
}

async fn an_access_rule_is_saved_only_from_the_version_read(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    let (created, _) = portal
        .save_access_rule(Some(&ada), rule("gpt-4o", ""), false)
        .await
        .unwrap();
    assert_eq!(
        rule_version(&db).await,
        created,
        "the version returned is stored"
    );

    // Both open the rule; the list the page reads carries its version.
    let listed = portal.access_rules(Some(&ada)).await.unwrap();
    let opened = version_text(listed[0].updated_at);

    // Ada saves first, from the version she read: written.
    let (first, _) = portal
        .save_access_rule(Some(&ada), rule("gpt-4o, gpt-4o-mini", &opened), true)
        .await
        .unwrap();
    let after_first = db.access_rule("research").await.unwrap().unwrap();
    assert_eq!(after_first.updated_at, first);
    assert_ne!(version_text(first), opened);
    let before = written(&db).await;
    assert_eq!(
        before.newest_activity,
        Some(("access_rule.update".into(), "Ada Admin <admin-oid>".into()))
    );

    // Bea saves from the same, now replaced, version: refused, nothing written.
    let error = portal
        .save_access_rule(Some(&bea), rule("o3", &opened), true)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::AccessRule, Some(first));
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    assert_eq!(
        error.public_message(),
        format!(
            "This access rule was changed by someone else since you opened it (at {} UTC): reload it and apply your change again.",
            first.format(format).unwrap()
        )
    );
    assert_eq!(
        db.access_rule("research").await.unwrap().unwrap(),
        after_first
    );
    assert_eq!(written(&db).await, before);

    // The write itself is conditional, in its transaction: past the operation's own check, a
    // stale version writes nothing either.
    let mut stale = after_first.clone();
    stale.deployments = r#"["o3"]"#.into();
    stale.updated_at = next_version(Some(first));
    let activity = NewActivity {
        actor: "bea",
        action: "access_rule.update",
        target: "research",
        before: None,
        after: None,
    };
    let opened_at =
        OffsetDateTime::parse(&opened, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(
        !db.update_access_rule(&stale, opened_at, activity.clone())
            .await
            .unwrap()
    );
    assert!(
        !db.delete_access_rule("research", opened_at, activity)
            .await
            .unwrap()
    );
    assert_eq!(
        db.access_rule("research").await.unwrap().unwrap(),
        after_first
    );
    assert_eq!(written(&db).await, before);

    // Bea reads it again and applies her change: written, logged, published.
    let reread = version_text(rule_version(&db).await);
    let (second, _) = portal
        .save_access_rule(Some(&bea), rule("gpt-4o, o3", &reread), true)
        .await
        .unwrap();
    let after_second = db.access_rule("research").await.unwrap().unwrap();
    assert_eq!(after_second.deployments, r#"["gpt-4o","o3"]"#);
    let now = written(&db).await;
    assert_eq!(now.activity_entries, before.activity_entries + 1);
    assert_eq!(
        now.newest_activity,
        Some(("access_rule.update".into(), "Bea Admin <bea-oid>".into()))
    );
    assert_eq!(now.published, before.published.map(|v| v + 1));

    // The version a save returns is the one stored: her form saves again without reading.
    let (third, _) = portal
        .save_access_rule(Some(&bea), rule("o3", &version_text(second)), true)
        .await
        .unwrap();
    assert_eq!(rule_version(&db).await, third);

    // Creating a rule with an id that exists is refused; it never overwrites.
    let error = portal
        .save_access_rule(Some(&ada), rule("gpt-4o", ""), false)
        .await
        .unwrap_err();
    assert!(
        matches!(error, PortalError::Invalid { field: "id", .. }),
        "{error}"
    );
    // An update without the version its form read is refused, not written blindly.
    let error = portal
        .save_access_rule(Some(&ada), rule("gpt-4o", ""), true)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            PortalError::Invalid {
                field: "version",
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(rule_version(&db).await, third);

    // A roll-back gives what it puts back a new version: a form opened before it is refused.
    let before_rollback = version_text(third);
    let published = db.latest_snapshot().await.unwrap().unwrap().version;
    portal
        .rollback(Some(&ada), published - 1, published)
        .await
        .unwrap();
    let rolled_back = rule_version(&db).await;
    assert!(rolled_back > third);
    let error = portal
        .save_access_rule(Some(&bea), rule("o3", &before_rollback), true)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::AccessRule, Some(rolled_back));

    // Deleting: only the version the page showed.
    let before = written(&db).await;
    let error = portal
        .delete_access_rule(Some(&bea), "research", &before_rollback)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::AccessRule, Some(rolled_back));
    assert_eq!(written(&db).await, before);
    assert!(db.access_rule("research").await.unwrap().is_some());
    let shown = version_text(rolled_back);
    portal
        .delete_access_rule(Some(&ada), "research", &shown)
        .await
        .unwrap();
    assert!(db.access_rule("research").await.unwrap().is_none());

    // Deleted meanwhile: a save from the version read says so, and creates nothing.
    let before = written(&db).await;
    let error = portal
        .save_access_rule(Some(&bea), rule("o3", &shown), true)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::AccessRule, None);
    assert!(
        error
            .to_string()
            .starts_with("This access rule was deleted by someone else since you opened it"),
        "{error}"
    );
    assert!(db.access_rule("research").await.unwrap().is_none());
    assert_eq!(written(&db).await, before);
}

fn pool(deployments: &str, version: &str) -> PoolInput {
    PoolInput {
        id: "main".into(),
        deployments: deployments.into(),
        serves_resources: false,
        version: version.into(),
    }
}

async fn pool_version(db: &ConfigDb) -> OffsetDateTime {
    db.pool("main").await.unwrap().unwrap().updated_at
}

async fn a_pool_is_saved_only_from_the_version_read(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    portal
        .save_pool(Some(&ada), pool("gpt-4o", ""), false)
        .await
        .unwrap();
    let listed = portal.pools(Some(&ada)).await.unwrap();
    let opened = version_text(listed[0].pool.updated_at);

    let (first, _) = portal
        .save_pool(Some(&ada), pool("gpt-4o, gpt-4o-mini", &opened), true)
        .await
        .unwrap();
    let after_first = db.pool("main").await.unwrap().unwrap();
    assert_eq!(after_first.updated_at, first);
    let before = written(&db).await;

    let error = portal
        .save_pool(Some(&bea), pool("o3", &opened), true)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Pool, Some(first));
    assert!(
        error
            .to_string()
            .starts_with("This pool was changed by someone else since you opened it (at "),
        "{error}"
    );
    assert_eq!(db.pool("main").await.unwrap().unwrap(), after_first);
    assert_eq!(written(&db).await, before);
    let opened_at = after_first.updated_at - time::Duration::seconds(1);
    assert!(
        !db.update_pool(
            &after_first,
            opened_at,
            NewActivity {
                actor: "bea",
                action: "pool.update",
                target: "main",
                before: None,
                after: None,
            },
        )
        .await
        .unwrap()
    );
    assert_eq!(written(&db).await, before);

    let reread = version_text(pool_version(&db).await);
    let (second, _) = portal
        .save_pool(Some(&bea), pool("gpt-4o, o3", &reread), true)
        .await
        .unwrap();
    assert_eq!(
        db.pool("main").await.unwrap().unwrap().deployments,
        r#"["gpt-4o","o3"]"#
    );
    let now = written(&db).await;
    assert_eq!(now.activity_entries, before.activity_entries + 1);
    assert_eq!(
        now.newest_activity,
        Some(("pool.update".into(), "Bea Admin <bea-oid>".into()))
    );
    assert_eq!(now.published, before.published.map(|v| v + 1));

    // Creating a pool whose id exists is refused.
    let error = portal
        .save_pool(Some(&ada), pool("o1", ""), false)
        .await
        .unwrap_err();
    assert!(
        matches!(error, PortalError::Invalid { field: "id", .. }),
        "{error}"
    );
    assert_eq!(pool_version(&db).await, second);

    // Deleting: only the version the page showed; the pool and its members stay otherwise.
    let before = written(&db).await;
    let error = portal
        .delete_pool(Some(&ada), "main", &opened)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Pool, Some(second));
    assert!(db.pool("main").await.unwrap().is_some());
    assert_eq!(written(&db).await, before);
    portal
        .delete_pool(Some(&ada), "main", &version_text(second))
        .await
        .unwrap();
    assert!(db.pool("main").await.unwrap().is_none());
}

fn member(weight: &str, version: &str) -> MemberInput {
    MemberInput {
        pool_id: "main".into(),
        id: "east".into(),
        kind: "azure_openai".into(),
        endpoint: "https://east.example.invalid".into(),
        weight: weight.into(),
        api_key_ref: "env:EAST_KEY".into(),
        version: version.into(),
        ..MemberInput::default()
    }
}

async fn member_version(db: &ConfigDb) -> OffsetDateTime {
    db.member("main", "east").await.unwrap().unwrap().updated_at
}

async fn a_pool_member_is_saved_only_from_the_version_read(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    portal
        .save_pool(Some(&ada), pool("gpt-4o", ""), false)
        .await
        .unwrap();
    let (created, _) = portal
        .save_member(Some(&ada), member("1", ""))
        .await
        .unwrap();
    assert_eq!(member_version(&db).await, created);
    let listed = portal.pools(Some(&ada)).await.unwrap();
    let opened = version_text(listed[0].members[0].updated_at);

    let (first, _) = portal
        .save_member(Some(&ada), member("5", &opened))
        .await
        .unwrap();
    let after_first = db.member("main", "east").await.unwrap().unwrap();
    assert_eq!((after_first.weight, after_first.updated_at), (5, first));
    let before = written(&db).await;

    let error = portal
        .save_member(Some(&bea), member("9", &opened))
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Member, Some(first));
    assert!(
        error
            .to_string()
            .starts_with("This pool member was changed by someone else since you opened it (at "),
        "{error}"
    );
    assert_eq!(
        db.member("main", "east").await.unwrap().unwrap(),
        after_first
    );
    assert_eq!(written(&db).await, before);
    // Adding a member whose id the pool has is refused: it never overwrites the member.
    let error = portal
        .save_member(Some(&bea), member("9", ""))
        .await
        .unwrap_err();
    assert!(
        matches!(error, PortalError::Invalid { field: "id", .. }),
        "{error}"
    );
    assert_eq!(
        db.member("main", "east").await.unwrap().unwrap(),
        after_first
    );
    assert_eq!(written(&db).await, before);

    let reread = version_text(member_version(&db).await);
    let (second, _) = portal
        .save_member(Some(&bea), member("9", &reread))
        .await
        .unwrap();
    assert_eq!(db.member("main", "east").await.unwrap().unwrap().weight, 9);
    let now = written(&db).await;
    assert_eq!(now.activity_entries, before.activity_entries + 1);
    assert_eq!(
        now.newest_activity,
        Some(("member.update".into(), "Bea Admin <bea-oid>".into()))
    );
    assert_eq!(now.published, before.published.map(|v| v + 1));

    // A member's changes are not the pool's: the pool's form stays current.
    let pool_opened = version_text(pool_version(&db).await);
    portal
        .save_pool(Some(&ada), pool("gpt-4o, gpt-4o-mini", &pool_opened), true)
        .await
        .unwrap();

    // Removing: only the version the page showed.
    let before = written(&db).await;
    let error = portal
        .delete_member(Some(&ada), "main", "east", &opened)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Member, Some(second));
    assert!(db.member("main", "east").await.unwrap().is_some());
    assert_eq!(written(&db).await, before);
    portal
        .delete_member(Some(&ada), "main", "east", &version_text(second))
        .await
        .unwrap();
    assert!(db.member("main", "east").await.unwrap().is_none());

    // Removed meanwhile: a save from the version read is refused, and adds nothing back.
    let error = portal
        .save_member(Some(&bea), member("2", &version_text(second)))
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Member, None);
    assert!(db.member("main", "east").await.unwrap().is_none());
}

async fn gateway_settings_are_saved_only_from_the_version_read(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    // Both open the page while no settings are set: the form carries no version.
    let opened = portal.gateway_settings(Some(&ada)).await.unwrap();
    assert_eq!(opened.version, None);

    portal
        .save_gateway_settings(Some(&ada), r#"{"trusted_proxies": ["10.0.1.0/24"]}"#, "")
        .await
        .unwrap();
    let first = portal.gateway_settings(Some(&ada)).await.unwrap();
    let first_version = first.version.unwrap();
    let before = written(&db).await;

    // Bea's form was opened before Ada's save: refused, Ada's settings stay.
    let error = portal
        .save_gateway_settings(Some(&bea), r#"{"trusted_proxies": ["10.9.0.0/16"]}"#, "")
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::GatewaySettings, Some(first_version));
    assert!(
        error.to_string().starts_with(
            "The gateway settings were changed by someone else since you opened them (at "
        ),
        "{error}"
    );
    assert_eq!(portal.gateway_settings(Some(&ada)).await.unwrap(), first);
    assert_eq!(written(&db).await, before);

    // Ada changes them again from the version she read; Bea, from that same one, is refused.
    let opened = version_text(first_version);
    portal
        .save_gateway_settings(
            Some(&ada),
            r#"{"trusted_proxies": ["10.0.2.0/24"]}"#,
            &opened,
        )
        .await
        .unwrap();
    let second = portal.gateway_settings(Some(&ada)).await.unwrap();
    assert!(second.text.contains("10.0.2.0/24"), "{}", second.text);
    let before = written(&db).await;
    let error = portal
        .save_gateway_settings(
            Some(&bea),
            r#"{"trusted_proxies": ["10.9.0.0/16"]}"#,
            &opened,
        )
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::GatewaySettings, second.version);
    assert_eq!(portal.gateway_settings(Some(&ada)).await.unwrap(), second);
    assert_eq!(written(&db).await, before);
    // The write itself is conditional too.
    assert!(
        !db.save_setting(
            gatehouse_portal_core::snapshot::BASE_SETTING,
            "{}",
            OffsetDateTime::now_utc(),
            Some(first_version),
            NewActivity {
                actor: "bea",
                action: "settings.update",
                target: "snapshot.base",
                before: None,
                after: None,
            },
        )
        .await
        .unwrap()
    );
    assert_eq!(written(&db).await, before);

    // Read again: her change is written, logged and published.
    let reread = version_text(second.version.unwrap());
    portal
        .save_gateway_settings(
            Some(&bea),
            r#"{"trusted_proxies": ["10.9.0.0/16"]}"#,
            &reread,
        )
        .await
        .unwrap();
    let third = portal.gateway_settings(Some(&bea)).await.unwrap();
    assert!(third.text.contains("10.9.0.0/16"), "{}", third.text);
    let now = written(&db).await;
    assert_eq!(now.activity_entries, before.activity_entries + 1);
    assert_eq!(
        now.newest_activity,
        Some(("settings.update".into(), "Bea Admin <bea-oid>".into()))
    );
    assert_eq!(now.published, before.published.map(|v| v + 1));
}

/// Two admins saving from one version at the same moment, and two creating one id: exactly one
/// of each pair is written, the other refused, every time.
async fn two_saves_from_one_version_at_once_write_one(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    for round in 0..10 {
        let id = format!("race-{round}");
        let create = |deployments: &str| AccessRuleInput {
            id: id.clone(),
            ..rule(deployments, "")
        };
        let (a, b) = tokio::join!(
            portal.save_access_rule(Some(&ada), create("gpt-4o"), false),
            portal.save_access_rule(Some(&bea), create("o3"), false),
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} {b:?}");
        let refused = a.err().or(b.err()).unwrap();
        assert!(
            matches!(refused, PortalError::Invalid { field: "id", .. }),
            "{refused}"
        );

        let opened = version_text(db.access_rule(&id).await.unwrap().unwrap().updated_at);
        let change = |deployments: &str| AccessRuleInput {
            id: id.clone(),
            ..rule(deployments, &opened)
        };
        let entries = db.activity(1000).await.unwrap().len();
        let (a, b) = tokio::join!(
            portal.save_access_rule(Some(&ada), change("gpt-4o-mini"), true),
            portal.save_access_rule(Some(&bea), change("o1"), true),
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} {b:?}");
        let (saved, refused) = match (a, b) {
            (Ok((saved, _)), Err(refused)) | (Err(refused), Ok((saved, _))) => (saved, refused),
            other => panic!("{other:?}"),
        };
        assert_conflict(&refused, Edited::AccessRule, Some(saved));
        assert_eq!(
            db.access_rule(&id).await.unwrap().unwrap().updated_at,
            saved
        );
        assert_eq!(db.activity(1000).await.unwrap().len(), entries + 1);
    }
}

/// A roll-back is done only from the newest version the page showed, as every other change is
/// saved only from the version its form read: once someone else published a version (a change,
/// or a roll-back of their own), a roll-back from the page opened before it is refused and
/// writes nothing — the tables, the activity log and the published versions stay as they are.
async fn a_rollback_is_done_only_from_the_newest_version_shown(db: ConfigDb) {
    let portal = portal(&db);
    let (ada, bea) = (admin(), bea());
    let (created, _) = portal
        .save_access_rule(Some(&ada), rule("gpt-4o", ""), false)
        .await
        .unwrap();
    let first = db.latest_snapshot().await.unwrap().unwrap().version;
    portal
        .save_access_rule(
            Some(&ada),
            rule("gpt-4o, gpt-4o-mini", &version_text(created)),
            true,
        )
        .await
        .unwrap();
    let deployments = |db: ConfigDb| async move {
        db.access_rule("research")
            .await
            .unwrap()
            .unwrap()
            .deployments
    };
    let both = deployments(db.clone()).await;

    // Both open the Gateways page: its versions list shows the newest.
    let shown = portal.versions(Some(&ada)).await.unwrap()[0].version;
    assert_eq!(shown, first + 1);

    // Ada rolls back to the first version from the newest she was shown: written.
    let rolled_back = portal.rollback(Some(&ada), first, shown).await.unwrap();
    let newest = db.latest_snapshot().await.unwrap().unwrap();
    assert_eq!(newest.version, i64::try_from(rolled_back.version).unwrap());
    let one = deployments(db.clone()).await;
    assert_ne!(one, both);

    // Bea, on the page that still shows the version before it, rolls back too: refused.
    let before = written(&db).await;
    let error = portal.rollback(Some(&bea), shown, shown).await.unwrap_err();
    assert_conflict(&error, Edited::Configuration, Some(newest.created_at));
    assert!(error.to_string().contains("someone else"), "{error}");
    assert_eq!(written(&db).await, before);
    assert_eq!(deployments(db.clone()).await, one);
    // A newest version the page cannot have shown (none is that new) is refused likewise.
    let error = portal
        .rollback(Some(&bea), shown, newest.version + 1)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Configuration, Some(newest.created_at));
    assert_eq!(written(&db).await, before);

    // After reading the versions again, her roll-back is written.
    let shown = portal.versions(Some(&bea)).await.unwrap()[0].version;
    portal.rollback(Some(&bea), first + 1, shown).await.unwrap();
    assert_eq!(deployments(db.clone()).await, both);
    assert_eq!(
        written(&db).await.newest_activity,
        Some(("config.rollback".into(), "Bea Admin <bea-oid>".into()))
    );

    // A change saved and published after the page was opened is not rolled over either.
    let opened = portal.versions(Some(&ada)).await.unwrap()[0].version;
    let rule_now = version_text(rule_version(&db).await);
    portal
        .save_access_rule(Some(&bea), rule("o3", &rule_now), true)
        .await
        .unwrap();
    let before = written(&db).await;
    let error = portal
        .rollback(Some(&ada), first, opened)
        .await
        .unwrap_err();
    let newest = db.latest_snapshot().await.unwrap().unwrap();
    assert_conflict(&error, Edited::Configuration, Some(newest.created_at));
    assert_eq!(written(&db).await, before);
    assert!(deployments(db.clone()).await.contains("o3"));
}

/// Two admins handling one subscription's keys: a rotation or a "Retire previous key" made from
/// the version a page showed is refused once the other admin has rotated since, so that the
/// key the first page called "previous" is not confused with the one the second rotation made
/// previous (the key still in production use); nothing is written, nothing published.
async fn keys_are_rotated_and_retired_only_from_the_version_shown(db: ConfigDb) {
    use gatehouse_portal_core::ops::NewSubscription;
    let portal = portal(&db);
    let first_key = portal
        .create_subscription(
            Some(&admin()),
            NewSubscription {
                id: "team-k".into(),
                display_name: "Team K".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap()
        .key;
    let subscription = || async { db.subscription("team-k").await.unwrap().unwrap() };
    // Both admins' pages show the subscription after one rotation: K1 previous, K2 primary.
    portal
        .rotate_subscription_key(Some(&admin()), "team-k", "")
        .await
        .unwrap();
    let shown = subscription().await;
    let shown_version = version_text(shown.updated_at);
    // Bea rotates again: K2 becomes previous, K3 primary.
    let third = portal
        .rotate_subscription_key(Some(&bea()), "team-k", &shown_version)
        .await
        .unwrap();
    let after_bea = subscription().await;
    let before = written(&db).await;
    // The first admin, from the older page, retires "the previous key" and rotates: refused.
    let error = portal
        .retire_secondary_key(Some(&admin()), "team-k", &shown_version)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Subscription, Some(after_bea.updated_at));
    let error = portal
        .rotate_subscription_key(Some(&admin()), "team-k", &shown_version)
        .await
        .unwrap_err();
    assert_conflict(&error, Edited::Subscription, Some(after_bea.updated_at));
    assert_eq!(subscription().await, after_bea, "nothing written");
    assert_eq!(written(&db).await, before);
    assert_eq!(
        after_bea.secondary_key_hash.as_ref(),
        Some(&shown.primary_key_hash),
        "the key the older page showed as primary stays valid, as the previous one"
    );
    assert_eq!(
        after_bea.primary_key_hash,
        gatehouse_schema::keys::hash_key(&third.key).to_string(),
        "Bea's key is the primary one"
    );
    let first = gatehouse_schema::keys::hash_key(&first_key).to_string();
    assert!(
        after_bea.primary_key_hash != first
            && after_bea.secondary_key_hash.as_ref() != Some(&first),
        "the first key, rotated away twice, is valid no more"
    );
    // From the version read again, the retirement goes through.
    portal
        .retire_secondary_key(
            Some(&admin()),
            "team-k",
            &version_text(after_bea.updated_at),
        )
        .await
        .unwrap();
    assert_eq!(subscription().await.secondary_key_hash, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_keys_are_rotated_and_retired_only_from_the_version_shown() {
    let test = common::sqlite().await;
    keys_are_rotated_and_retired_only_from_the_version_shown(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_keys_are_rotated_and_retired_only_from_the_version_shown() {
    let test = common::postgres().await;
    keys_are_rotated_and_retired_only_from_the_version_shown(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_rollback_is_done_only_from_the_newest_version_shown() {
    let test = common::sqlite().await;
    a_rollback_is_done_only_from_the_newest_version_shown(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_rollback_is_done_only_from_the_newest_version_shown() {
    let test = common::postgres().await;
    a_rollback_is_done_only_from_the_newest_version_shown(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_an_access_rule_is_saved_only_from_the_version_read() {
    let test = common::sqlite().await;
    an_access_rule_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_an_access_rule_is_saved_only_from_the_version_read() {
    let test = common::postgres().await;
    an_access_rule_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_pool_is_saved_only_from_the_version_read() {
    let test = common::sqlite().await;
    a_pool_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_pool_is_saved_only_from_the_version_read() {
    let test = common::postgres().await;
    a_pool_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_pool_member_is_saved_only_from_the_version_read() {
    let test = common::sqlite().await;
    a_pool_member_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_pool_member_is_saved_only_from_the_version_read() {
    let test = common::postgres().await;
    a_pool_member_is_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_gateway_settings_are_saved_only_from_the_version_read() {
    let test = common::sqlite().await;
    gateway_settings_are_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_gateway_settings_are_saved_only_from_the_version_read() {
    let test = common::postgres().await;
    gateway_settings_are_saved_only_from_the_version_read(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_two_saves_from_one_version_at_once_write_one() {
    let test = common::sqlite().await;
    two_saves_from_one_version_at_once_write_one(test.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_saves_from_one_version_at_once_write_one() {
    let test = common::postgres().await;
    two_saves_from_one_version_at_once_write_one(test.db.clone()).await;
}
