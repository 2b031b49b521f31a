//! Every server function, called over HTTP with each role (and signed out): the role check is on
//! the server. Plus the Origin check, the security headers and the dev sign-in's guard.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use common::{Browser, TestPortal, start};
use gatehouse_portal_core::ops::version_text;

/// Roles, and signed out (`None`).
const CALLERS: [Option<&str>; 5] = [
    Some("Admin"),
    Some("Auditor"),
    Some("TeamLead"),
    Some("Viewer"),
    None,
];

/// A server function, its form, and the roles allowed to call it.
type Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static [&'static str],
);

fn matrix() -> Vec<Case> {
    const EVERYONE: &[&str] = &["Admin", "Auditor", "TeamLead", "Viewer"];
    const ADMIN: &[&str] = &["Admin"];
    vec![
        ("overview", vec![], EVERYONE),
        (
            "create_subscription",
            vec![
                ("id", "team-a"),
                ("display_name", "Team A"),
                ("product", "research"),
                ("expires_on", ""),
            ],
            ADMIN,
        ),
        ("list_subscriptions", vec![], ADMIN),
        ("rotate_subscription_key", vec![("id", "team-a")], ADMIN),
        ("retire_secondary_key", vec![("id", "team-a")], ADMIN),
        ("revoke_subscription", vec![("id", "team-a")], ADMIN),
        (
            "register_gateway",
            vec![
                ("id", "gw"),
                ("url", "http://127.0.0.1:9/"),
                (
                    "admin_token_ref",
                    "env:GATEHOUSE_GATEWAY_TOKEN_TEST_NO_SUCH",
                ),
            ],
            ADMIN,
        ),
        ("list_gateways", vec![], ADMIN),
        ("push_now", vec![], ADMIN),
        (
            "create_access_rule",
            vec![
                ("id", "team-a-gpt"),
                ("grantee_kind", "subscription"),
                ("grantee_id", "team-a"),
                ("deployments", "gpt-4o"),
            ],
            ADMIN,
        ),
        (
            "update_access_rule",
            vec![
                ("id", "team-a-gpt"),
                ("grantee_kind", "subscription"),
                ("grantee_id", "team-a"),
                ("deployments", "gpt-4o, gpt-4o-mini"),
                ("tokens_per_minute", "1000"),
                ("version", RULE_VERSION),
            ],
            ADMIN,
        ),
        ("list_access_rules", vec![], ADMIN),
        (
            "delete_access_rule",
            vec![("id", "team-a-gpt"), ("version", RULE_VERSION)],
            ADMIN,
        ),
        (
            "create_pool",
            vec![("id", "main"), ("deployments", "gpt-4o")],
            ADMIN,
        ),
        (
            "update_pool",
            vec![
                ("id", "main"),
                ("deployments", "gpt-4o, gpt-4o-mini"),
                ("version", POOL_VERSION),
            ],
            ADMIN,
        ),
        (
            "save_member",
            vec![
                ("pool_id", "main"),
                ("id", "east"),
                ("kind", "azure_openai"),
                ("endpoint", "http://127.0.0.1:9"),
                ("api_key_ref", "env:GATEHOUSE_PORTAL_TEST_EAST_KEY"),
            ],
            ADMIN,
        ),
        ("list_pools", vec![], ADMIN),
        (
            "delete_member",
            vec![
                ("pool_id", "main"),
                ("id", "east"),
                ("version", MEMBER_VERSION),
            ],
            ADMIN,
        ),
        (
            "delete_pool",
            vec![("id", "main"), ("version", POOL_VERSION)],
            ADMIN,
        ),
        ("list_versions", vec![], ADMIN),
        ("version_diff", vec![("from", "1"), ("to", "2")], ADMIN),
        (
            "rollback",
            vec![("version", "1"), ("latest", LATEST_VERSION)],
            ADMIN,
        ),
        ("list_activity", vec![], &["Admin", "Auditor"]),
        (
            "dashboard_overview",
            vec![("range", "24h"), ("from", ""), ("to", "")],
            &["Admin", "Auditor", "Viewer"],
        ),
        (
            "usage_breakdown",
            vec![
                ("range", "24h"),
                ("from", ""),
                ("to", ""),
                ("dimension", "group"),
            ],
            &["Admin", "TeamLead"],
        ),
        ("audit_search", search_form(), &["Admin", "Auditor"]),
        ("list_alerts", vec![], ADMIN),
    ]
}

/// Form values read from the config database as the form is posted: the version of the access
/// rule, pool or member the form changes, as its page would carry it (empty while there is none).
const RULE_VERSION: &str = "<version of access rule team-a-gpt>";
const POOL_VERSION: &str = "<version of pool main>";
const MEMBER_VERSION: &str = "<version of member east of pool main>";
/// The newest published version, as the Gateways page shows it to a roll-back.
const LATEST_VERSION: &str = "<newest published version>";

/// `form` with each version placeholder replaced by the version it names.
async fn filled(
    portal: &TestPortal,
    form: &[(&'static str, &'static str)],
) -> Vec<(&'static str, String)> {
    let db = &portal.server.portal.db;
    let mut filled = Vec::with_capacity(form.len());
    for &(name, value) in form {
        let version = match value {
            RULE_VERSION => db
                .access_rule("team-a-gpt")
                .await
                .unwrap()
                .map(|r| r.updated_at),
            POOL_VERSION => db.pool("main").await.unwrap().map(|p| p.updated_at),
            MEMBER_VERSION => db
                .member("main", "east")
                .await
                .unwrap()
                .map(|m| m.updated_at),
            LATEST_VERSION => {
                let latest = db.latest_snapshot().await.unwrap().map(|v| v.version);
                filled.push((name, latest.unwrap_or_default().to_string()));
                continue;
            }
            _ => {
                filled.push((name, value.to_owned()));
                continue;
            }
        };
        filled.push((name, version.map(version_text).unwrap_or_default()));
    }
    filled
}

/// Every field of the audit search form, empty but the range.
fn search_form() -> Vec<(&'static str, &'static str)> {
    let mut form = vec![("range", "24h")];
    for field in [
        "from",
        "to",
        "user",
        "caller",
        "model",
        "deployment",
        "operation",
        "status",
        "subscription",
        "text",
        "limit",
        "cursor",
    ] {
        form.push((field, ""));
    }
    form
}

/// A portal whose dashboards read an (empty) embedded audit store beside its config database.
async fn start_with_audit_store() -> TestPortal {
    common::start_with(None, |settings| {
        settings.insights.audit_database = Some(settings.database.replace("portal.db", "audit.db"));
    })
    .await
}

async fn browser_for(portal: &TestPortal, caller: Option<&str>) -> Browser {
    let mut browser = Browser::new(portal);
    if let Some(role) = caller {
        browser.dev_sign_in(portal, role).await;
    }
    browser
}

#[tokio::test(flavor = "multi_thread")]
async fn every_server_function_checks_the_role_on_the_server() {
    let portal = start_with_audit_store().await;
    // Non-admins first, so that nothing they might have done is hidden by the admin's changes.
    for caller in CALLERS.iter().rev() {
        let mut browser = browser_for(&portal, *caller).await;
        for (function, form, allowed) in matrix() {
            let form = filled(&portal, &form).await;
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let response = browser
                .post(&format!("{}/api/{function}", portal.url), &form)
                .await;
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            let expected = match caller {
                None => 401,
                Some(role) if allowed.contains(role) => 200,
                Some(_) => 403,
            };
            assert_eq!(status, expected, "{function} as {caller:?}: {body}");
            if expected == 403 {
                assert!(body.contains("your role does not allow this"), "{body}");
            }
        }
    }
    // Only the admin's calls changed anything, and each one is in the activity log; searches
    // are recorded for the roles allowed to search, and only for them.
    let log = portal.server.portal.db.activity(100).await.unwrap();
    let (sign_ins, log): (Vec<_>, Vec<_>) =
        log.into_iter().partition(|e| e.action == "session.sign_in");
    let signed_in: Vec<&str> = sign_ins.iter().rev().map(|e| e.actor.as_str()).collect();
    assert_eq!(
        signed_in,
        [
            "dev Viewer (dev sign-in)",
            "dev TeamLead (dev sign-in)",
            "dev Auditor (dev sign-in)",
            "dev Admin (dev sign-in)"
        ]
    );
    let (searches, log): (Vec<_>, Vec<_>) =
        log.into_iter().partition(|e| e.action == "audit.search");
    let searchers: Vec<&str> = searches.iter().rev().map(|e| e.actor.as_str()).collect();
    assert_eq!(
        searchers,
        ["dev Auditor (dev sign-in)", "dev Admin (dev sign-in)"]
    );
    let actions: Vec<&str> = log.iter().rev().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "subscription.create",
            "subscription.rotate",
            "subscription.retire_secondary",
            "subscription.revoke",
            "gateway.register",
            "gateways.push",
            "access_rule.create",
            "access_rule.update",
            "access_rule.delete",
            "pool.create",
            "pool.update",
            "member.create",
            "member.delete",
            "pool.delete",
            "config.rollback",
        ]
    );
    assert!(log.iter().all(|e| e.actor == "dev Admin (dev sign-in)"));
    let subscription = portal
        .server
        .portal
        .db
        .subscription("team-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(subscription.state, "revoked");
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_info_is_open_and_says_who_is_signed_in() {
    let portal = start(None).await;
    let mut browser = Browser::new(&portal);
    let anonymous: serde_json::Value = browser
        .post(&format!("{}/api/portal_info", portal.url), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(anonymous["user"], serde_json::Value::Null);
    assert_eq!(anonymous["dev_sign_in"], true);
    browser.dev_sign_in(&portal, "Auditor").await;
    let signed_in: serde_json::Value = browser
        .post(&format!("{}/api/portal_info", portal.url), &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(signed_in["user"]["roles"], serde_json::json!(["Auditor"]));
    // Signing out ends the session.
    let out = browser
        .post(&format!("{}/auth/sign-out", portal.url), &[])
        .await;
    assert_eq!(out.status(), 303);
    let after = browser
        .post(&format!("{}/api/list_activity", portal.url), &[])
        .await;
    assert_eq!(after.status(), 401);
}

/// Who signed in, with which roles, and when they signed out, is on the activity log; an admin
/// reads it, an auditor (who reads the configuration changes) does not.
#[tokio::test(flavor = "multi_thread")]
async fn sign_ins_and_sign_outs_are_on_the_activity_log_for_admins() {
    let portal = start(None).await;
    let mut lead = Browser::new(&portal);
    lead.post(
        &format!("{}/auth/dev", portal.url),
        &[
            ("role", "TeamLead"),
            ("name", "Tove"),
            ("groups", "g-red, g-blue"),
        ],
    )
    .await;
    let out = lead
        .post(&format!("{}/auth/sign-out", portal.url), &[])
        .await;
    assert_eq!(out.status(), 303);
    let entries = |list: serde_json::Value| -> Vec<(String, String, String, String)> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let text = |key: &str| e[key].as_str().unwrap_or_default().to_owned();
                (text("actor"), text("action"), text("target"), text("after"))
            })
            .collect()
    };

    let mut admin = browser_for(&portal, Some("Admin")).await;
    let created = admin.create_subscription(&portal, "team-a", "A").await;
    assert_eq!(created.status(), 200);
    let seen = entries(
        admin
            .post(&format!("{}/api/list_activity", portal.url), &[])
            .await
            .json()
            .await
            .unwrap(),
    );
    let lead_name = "Tove (dev sign-in)".to_owned();
    let lead_entries: Vec<_> = seen.iter().filter(|e| e.0 == lead_name).rev().collect();
    assert_eq!(lead_entries.len(), 2, "{seen:?}");
    let (_, action, target, after) = lead_entries[0];
    assert_eq!(
        (action.as_str(), target.as_str()),
        ("session.sign_in", "dev:TeamLead")
    );
    let after: serde_json::Value = serde_json::from_str(after).unwrap();
    assert_eq!(
        after,
        serde_json::json!({"roles": ["TeamLead"], "led_groups": ["g-red", "g-blue"], "dev": true})
    );
    assert_eq!(lead_entries[1].1, "session.sign_out");
    assert!(
        seen.iter()
            .any(|e| e.0 == "dev Admin (dev sign-in)" && e.1 == "session.sign_in"),
        "{seen:?}"
    );

    let mut auditor = browser_for(&portal, Some("Auditor")).await;
    let seen = entries(
        auditor
            .post(&format!("{}/api/list_activity", portal.url), &[])
            .await
            .json()
            .await
            .unwrap(),
    );
    let actions: Vec<&str> = seen.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(actions, ["subscription.create"]);
}

/// A server function called with arguments it cannot read (one missing, a number that is not
/// one, a body in another encoding) answers 400 with `server_fn`'s error saying what is wrong,
/// not a 500, and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_function_given_unreadable_arguments_answers_400_and_changes_nothing() {
    let portal = start(None).await;
    let mut admin = browser_for(&portal, Some("Admin")).await;
    let logged = portal.server.portal.db.activity(100).await.unwrap().len();
    // A function, its form, and what its error must name.
    type Unreadable = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        &'static str,
    );
    let cases: [Unreadable; 4] = [
        (
            "create_subscription",
            vec![("display_name", "A"), ("product", ""), ("expires_on", "")],
            "id",
        ),
        (
            "rollback",
            vec![("version", "one"), ("latest", "2")],
            "invalid digit",
        ),
        ("version_diff", vec![("from", "1")], "to"),
        ("revoke_subscription", vec![], "id"),
    ];
    for (function, form, named) in cases {
        let response = admin
            .post(&format!("{}/api/{function}", portal.url), &form)
            .await;
        assert_eq!(response.status(), 400, "{function}");
        let body = response.text().await.unwrap();
        assert!(
            body.starts_with("Args|") || body.starts_with("MissingArg|"),
            "{function}: {body}"
        );
        assert!(body.contains(named), "{function}: {body}");
    }
    // A JSON body where the form encoding is expected.
    let json = admin
        .client
        .post(format!("{}/api/create_subscription", portal.url))
        .header("origin", &portal.url)
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .header("cookie", admin.cookie.clone().unwrap())
        .body(r#"{"id":"x","display_name":"X","product":"","expires_on":""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 400);
    // A function that fails for a reason of its own keeps its status.
    let unknown = admin
        .post(
            &format!("{}/api/revoke_subscription", portal.url),
            &[("id", "nobody")],
        )
        .await;
    assert_eq!(unknown.status(), 404);
    assert!(
        portal
            .server
            .portal
            .db
            .subscriptions()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        portal.server.portal.db.activity(100).await.unwrap().len(),
        logged
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn state_changing_requests_from_another_origin_are_refused() {
    let portal = start(None).await;
    let mut browser = browser_for(&portal, Some("Admin")).await;
    browser.origin = "http://evil.example".to_owned();
    let response = browser.create_subscription(&portal, "x", "X").await;
    assert_eq!(response.status(), 403);
    assert!(
        portal
            .server
            .portal
            .db
            .subscriptions()
            .await
            .unwrap()
            .is_empty()
    );
    let dev = browser
        .post(&format!("{}/auth/dev", portal.url), &[("role", "Admin")])
        .await;
    assert_eq!(dev.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_render_on_the_server_with_security_headers_and_the_dev_banner() {
    let portal = start(None).await;
    let mut browser = browser_for(&portal, Some("Admin")).await;
    browser
        .create_subscription(&portal, "team-x", "<script>alert(1)</script>")
        .await;
    let response = browser.get(&format!("{}/subscriptions", portal.url)).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("'nonce-"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = response.text().await.unwrap();
    assert!(html.contains("Development sign-in is enabled"), "{html}");
    assert!(html.contains("team-x"));
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "user text is escaped"
    );
    assert!(!html.contains("<script>alert(1)</script>"));
    // Every inline script carries the nonce of the policy.
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    for script in html.split("<script").skip(1) {
        let tag = script.split('>').next().unwrap();
        if !tag.contains("src=") {
            assert!(
                tag.contains(&format!("nonce=\"{nonce}\"")),
                "inline script without nonce: {tag}"
            );
        }
    }
}

/// A link made elsewhere cannot make a page show an error of its author's choosing: the query
/// parameters in which a form without JavaScript gets its server function's error back are
/// dropped (a 303 to the page without them) unless the browser says the request came from the
/// portal itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_link_from_elsewhere_cannot_put_an_error_on_a_page() {
    let portal = start(None).await;
    let mut browser = browser_for(&portal, Some("Admin")).await;
    // "ServerError|Your key leaked: call +1 555 0100", as `server_fn` encodes an error.
    let made_up = "U2VydmVyRXJyb3J8WW91ciBrZXkgbGVha2VkOiBjYWxsICsxIDU1NSAwMTAw";
    let link = format!(
        "{}/subscriptions?__path=%2Fapi%2Fcreate_subscription&__err={made_up}&view=all",
        portal.url
    );
    for site in ["cross-site", "same-site", "none"] {
        let response = browser.navigate(&link, site).await;
        assert_eq!(response.status(), 303, "{site}");
        assert_eq!(
            common::location(&response),
            "/subscriptions?view=all",
            "{site}"
        );
    }
    let bare = browser.get(&link).await;
    assert_eq!(
        bare.status(),
        303,
        "no Sec-Fetch-Site nor Referer: not known to come from the portal"
    );
    // A browser that sends no Sec-Fetch-Site: its Referer says where the request came from.
    for (referer, status) in [
        ("https://mail.example.com/inbox".to_owned(), 303),
        (format!("{}/subscriptions", portal.url), 200),
    ] {
        let response = browser
            .client
            .get(&link)
            .header("referer", &referer)
            .header("cookie", browser.cookie.clone().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{referer}");
    }
    let only = browser
        .navigate(
            &format!("{}/subscriptions?__err={made_up}", portal.url),
            "cross-site",
        )
        .await;
    assert_eq!(common::location(&only), "/subscriptions");
    // The portal's own form, returning to its page: kept.
    let own = browser.navigate(&link, "same-origin").await;
    assert_eq!(own.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dev_sign_in_does_not_exist_unless_enabled_and_never_off_loopback() {
    let portal = common::start_with(None, |settings| settings.dev_sign_in = false).await;
    let mut browser = Browser::new(&portal);
    let response = browser
        .post(&format!("{}/auth/dev", portal.url), &[("role", "Admin")])
        .await;
    assert_eq!(response.status(), 404);
    let page = browser.get(&portal.url).await.text().await.unwrap();
    assert!(!page.contains("Development sign-in is enabled"));

    let dir = tempfile::tempdir().unwrap();
    let settings = common::settings(&dir, "0.0.0.0:3000".parse().unwrap(), None);
    let error = gatehouse_portal::build(settings).await.unwrap_err();
    assert!(error.to_string().contains("loopback"), "{error}");

    // On loopback behind a proxy that serves it to others: refused too.
    let mut settings = common::settings(&dir, "127.0.0.1:3000".parse().unwrap(), None);
    settings.public_url = "https://portal.example.com".parse().unwrap();
    let error = gatehouse_portal::build(settings).await.unwrap_err();
    assert!(error.to_string().contains("public URL"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_form_shows_its_error_beside_the_field_without_javascript() {
    let portal = start(None).await;
    let mut browser = browser_for(&portal, Some("Admin")).await;
    // A plain form post, as a browser sends it before the app hydrates.
    let response = browser
        .client
        .post(format!("{}/api/create_access_rule", portal.url))
        .header("origin", &portal.url)
        .header("referer", format!("{}/access-rules", portal.url))
        .header("accept", "text/html")
        .header("cookie", browser.cookie.clone().unwrap())
        .form(&[
            ("id", "research"),
            ("grantee_kind", "group"),
            ("grantee_id", "<b>not-a-guid</b>"),
            ("grantee_display_name", "Research"),
            ("deployments", "gpt-4o"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302, "back to the form");
    let back = common::location(&response);
    assert!(
        back.starts_with(&format!("{}/access-rules?", portal.url)),
        "{back}"
    );
    // The browser follows the redirect from the portal's own form post.
    let page = browser
        .navigate(&back, "same-origin")
        .await
        .text()
        .await
        .unwrap();
    let beside = page
        .split("data-field=\"grantee_id\"")
        .nth(1)
        .expect("the error is beside the object id field");
    assert!(beside.contains("an Entra object id"), "{beside}");
    assert!(!page.contains("<b>not-a-guid</b>"));
    assert!(
        portal
            .server
            .portal
            .db
            .access_rules()
            .await
            .unwrap()
            .is_empty()
    );

    // The admin pages render on the server.
    for (path, text) in [
        ("/access-rules", "New access rule"),
        ("/pools", "New pool"),
        ("/gateways", "Config versions"),
    ] {
        let response = browser.get(&format!("{}{path}", portal.url)).await;
        assert_eq!(response.status(), 200, "{path}");
        let html = response.text().await.unwrap();
        assert!(html.contains(text), "{path}: {html}");
    }
}
