//! The dashboards, the usage views and the audit search over HTTP, on a portal whose embedded
//! audit store (SQLite) holds calls written through the audit crate's writer: pages render on the
//! server with the rows, a team lead sees only their groups, downloads are CSV-safe, and every
//! look at audit content is recorded.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use common::{Browser, TestPortal};
use gatehouse_audit::AuditRecord;
use gatehouse_audit::sql::SqlStore;
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use time::{Duration, OffsetDateTime};

fn record(
    i: usize,
    user: &str,
    ip: &str,
    groups: &[&str],
    prompt: &str,
    status: u16,
) -> AuditRecord {
    AuditRecord {
        time_generated: OffsetDateTime::now_utc() - Duration::minutes(30 - i as i64),
        correlation_id: format!("call-{i:03}"),
        gateway_id: "gw-1".to_owned(),
        operation_id: Some(OperationId::ChatCompletionsCreate),
        caller_ip_address: ip.to_owned(),
        peer_ip_address: "10.0.0.1".to_owned(),
        method: "POST".to_owned(),
        url: "/openai/deployments/chat/chat/completions".to_owned(),
        client_protocol: "HTTP/1.1".to_owned(),
        response_code: status,
        is_request_success: status < 400,
        backend_response_code: Some(status),
        backend_id: Some("east".to_owned()),
        backend_url: None,
        request_size: 100,
        response_size: 200,
        total_time: 40 + i as u64,
        backend_time: 30,
        time_to_first_byte: Some(10),
        time_to_first_token: Some(12),
        apim_subscription_id: Some("team-a".to_owned()),
        product_id: None,
        user_id: Some(format!("oid-{i}")),
        user_name: Some(user.to_owned()),
        tenant_id: None,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        deployment_name: Some("chat".to_owned()),
        model_name: Some("gpt-4o".to_owned()),
        api_version: None,
        is_stream_completion: false,
        usage: Some(TokenUsage {
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            ..TokenUsage::default()
        }),
        attempts: vec![gatehouse_schema::audit::BackendAttempt {
            backend_id: "east".to_owned(),
            status: Some(status),
            elapsed_ms: 30,
            error: None,
        }],
        backend_request_body: Some(
            serde_json::json!({"messages": [{"role": "user", "content": prompt}]}).to_string(),
        ),
        request_body_truncated: false,
        backend_response_body: None,
        response_body_truncated: false,
        request_messages: Some(prompt.to_owned()),
        response_messages: Some("fine".to_owned()),
        client_aborted: false,
        last_error_reason: None,
        last_error_message: None,
        chain: None,
    }
}

async fn portal_with_calls() -> TestPortal {
    let mut audit_url = String::new();
    let portal = common::start_with(None, |settings| {
        audit_url = settings.database.replace("portal.db", "audit.db");
        settings.insights.audit_database = Some(audit_url.clone());
        settings.insights.prices =
            gatehouse_portal_core::insights::service::PriceTable::parse("gpt-4o=2.5/10").unwrap();
    })
    .await;
    let store = SqlStore::open(&audit_url).await.unwrap();
    store
        .write(&[
            record(
                0,
                "alice@contoso.com",
                "198.51.100.7",
                &["g-red"],
                "secret launch <script>alert(1)</script>",
                200,
            ),
            record(
                1,
                "+bob@contoso.com",
                "203.0.113.9",
                &["g-blue"],
                "weather",
                429,
            ),
            record(
                2,
                "alice@contoso.com",
                "198.51.100.7",
                &["g-red"],
                "hello",
                200,
            ),
        ])
        .await
        .unwrap();
    store.close().await;
    portal
}

async fn signed_in(portal: &TestPortal, form: &[(&str, &str)]) -> Browser {
    let mut browser = Browser::new(portal);
    let response = browser
        .post(&format!("{}/auth/dev", portal.url), form)
        .await;
    assert_eq!(response.status(), 303);
    browser
}

#[tokio::test(flavor = "multi_thread")]
async fn a_team_lead_sees_only_the_groups_they_lead() {
    let portal = portal_with_calls().await;
    let mut lead = signed_in(&portal, &[("role", "TeamLead"), ("groups", "g-red")]).await;
    let usage: serde_json::Value = lead
        .post(
            &format!("{}/api/usage_breakdown", portal.url),
            &[
                ("range", "24h"),
                ("from", ""),
                ("to", ""),
                ("dimension", "group"),
            ],
        )
        .await
        .json()
        .await
        .unwrap();
    let values: Vec<&str> = usage["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["g-red"]);
    assert_eq!(usage["rows"][0]["requests"], 2);
    let by_model = lead
        .post(
            &format!("{}/api/usage_breakdown", portal.url),
            &[
                ("range", "24h"),
                ("from", ""),
                ("to", ""),
                ("dimension", "model"),
            ],
        )
        .await;
    assert_eq!(by_model.status(), 403);

    let csv = lead
        .get(&format!(
            "{}/usage/export.csv?range=24h&dimension=group",
            portal.url
        ))
        .await;
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let csv = csv.text().await.unwrap();
    assert!(csv.contains("group,g-red,2,"), "{csv}");
    assert!(!csv.contains("g-blue"), "{csv}");
    let chart = lead
        .get(&format!(
            "{}/usage/chart.svg?range=24h&dimension=group&metric=requests",
            portal.url
        ))
        .await;
    assert_eq!(chart.status(), 200);
    assert_eq!(chart.headers()["content-type"], "image/svg+xml");
    let svg = chart.text().await.unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("calls per hour") && svg.contains("g-red"));
    assert!(!svg.contains("g-blue"));
    let page = lead
        .get(&format!("{}/usage?range=24h&dimension=group", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("data-value=\"g-red\""), "{page}");
    assert!(page.contains("/usage/chart.svg?range=24h&amp;dimension=group&amp;metric=tokens"));
    assert!(!page.contains("data-value=\"g-blue\""));

    let mut admin = signed_in(&portal, &[("role", "Admin")]).await;
    let all = admin
        .get(&format!(
            "{}/usage/export.csv?range=24h&dimension=group",
            portal.url
        ))
        .await
        .text()
        .await
        .unwrap();
    assert!(all.contains("g-red") && all.contains("g-blue"));
    let bad = admin
        .get(&format!(
            "{}/usage/export.csv?range=24h&dimension=nope",
            portal.url
        ))
        .await;
    assert_eq!(bad.status(), 422);

    let mut anonymous = Browser::new(&portal);
    let refused = anonymous
        .get(&format!("{}/usage/chart.svg?range=24h", portal.url))
        .await;
    assert_eq!(refused.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_renders_figures_on_the_server() {
    let portal = portal_with_calls().await;
    let mut viewer = signed_in(&portal, &[("role", "Viewer")]).await;
    let page = viewer
        .get(&format!("{}/dashboard?range=24h", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("id=\"fig-requests\""), "{page}");
    assert!(page.contains("id=\"fig-cost\""));
    assert!(page.contains("embedded store (SQLite)"));
    let csv = viewer
        .get(&format!("{}/dashboard/export.csv?range=24h", portal.url))
        .await
        .text()
        .await
        .unwrap();
    let current = csv.lines().nth(1).unwrap();
    assert!(current.contains(",3,1,30,15,"), "{csv}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_alerts_page_lists_each_subject_that_fires() {
    use gatehouse_portal_core::insights::alerts::parse_rules;
    use gatehouse_portal_core::ops::NewSubscription;

    // A rule on the usage rollups needs an audit source: refused at start without one.
    let refused = common::try_start_with(None, |settings| {
        settings.insights.alert_rules = parse_rules(
            r#"[{"name": "quota", "condition": {"kind": "quota_nearly_used", "percent": 90}}]"#,
        )
        .unwrap();
    })
    .await
    .err()
    .unwrap();
    assert!(
        format!("{refused:#}").contains("alert rule `quota` reads the usage rollups"),
        "{refused:#}"
    );

    let portal = common::start_with(None, |settings| {
        settings.insights.alert_rules = parse_rules(
            r#"[{"name": "keys <soon>", "condition": {"kind": "key_expiring", "days": 7}},
                {"name": "aside", "condition": {"kind": "backend_set_aside", "minutes": 10}}]"#,
        )
        .unwrap();
    })
    .await;
    let tomorrow = (OffsetDateTime::now_utc().date() + Duration::days(1)).to_string();
    let admin = gatehouse_portal_core::SessionUser {
        subject: "admin-oid".into(),
        name: "Ada Admin".into(),
        roles: vec![gatehouse_schema::portal::Role::Admin],
        led_groups: vec![],
        signed_in_at: OffsetDateTime::now_utc(),
        dev: false,
    };
    portal
        .server
        .portal
        .create_subscription(
            Some(&admin),
            NewSubscription {
                id: "team-x".into(),
                display_name: "Team <X>".into(),
                expires_on: tomorrow,
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    let alerter = portal.server.insights.alerter().unwrap();
    // No webhook configured: the state changes all the same.
    assert!(alerter.tick(OffsetDateTime::now_utc()).await.len() == 1);

    let mut browser = signed_in(&portal, &[("role", "Admin")]).await;
    let page = browser
        .get(&format!("{}/alerts", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("keys &lt;soon&gt;"), "{page}");
    assert!(page.contains("1 of 1 keys expire within 7 days"), "{page}");
    assert!(
        page.contains("subscription team-x (Team &lt;X&gt;): primary key expires"),
        "{page}"
    );
    assert!(page.contains("firing since "), "{page}");
    assert!(page.contains("no gateway is registered"), "{page}");
    assert!(
        page.replace("&quot;", "\"")
            .contains(r#"{"kind":"backend_set_aside","minutes":10}"#),
        "the condition as configured: {page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_auditor_finds_opens_and_exports_calls_and_every_look_is_recorded() {
    let portal = portal_with_calls().await;
    let mut auditor = signed_in(&portal, &[("role", "Auditor")]).await;
    let page = auditor
        .get(&format!(
            "{}/audit?range=24h&user=alice%40contoso.com",
            portal.url
        ))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("data-id=\"call-000\""), "{page}");
    assert!(page.contains("data-id=\"call-002\""));
    assert!(!page.contains("data-id=\"call-001\""));
    let by_words = auditor
        .get(&format!("{}/audit?range=24h&text=launch", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(by_words.contains("data-id=\"call-000\""));
    assert!(!by_words.contains("data-id=\"call-002\""));
    let by_net = auditor
        .get(&format!(
            "{}/audit?range=24h&caller=203.0.113.0%2F24",
            portal.url
        ))
        .await
        .text()
        .await
        .unwrap();
    assert!(by_net.contains("data-id=\"call-001\"") && !by_net.contains("data-id=\"call-000\""));
    let bad = auditor
        .get(&format!("{}/audit?range=24h&caller=not-an-ip", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(bad.contains("caller: an IP address or a CIDR network"));

    // The detail shows the prompt as text.
    let detail = auditor
        .get(&format!("{}/audit/call?id=call-000", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        detail.contains("secret launch &lt;script&gt;alert(1)&lt;/script&gt;"),
        "{detail}"
    );
    assert!(!detail.contains("<script>alert(1)"));
    // The attempts as a table, the request body as captured, as text too.
    assert!(detail.contains("<td><code>east</code></td>"), "{detail}");
    assert!(detail.contains("id=\"call-request-body\""), "{detail}");
    assert!(
        detail.contains("&quot;content&quot;:&quot;secret launch &lt;script&gt;")
            || detail.contains("\"content\":\"secret launch &lt;script&gt;"),
        "{detail}"
    );
    assert!(detail.contains("Response body: not captured"), "{detail}");

    // Exports: CSV (formula-safe) and JSON lines, streamed.
    let csv = auditor
        .get(&format!("{}/audit/export?format=csv&range=24h", portal.url))
        .await;
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("audit.csv")
    );
    let csv = csv.text().await.unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("TimeGenerated,CorrelationId,"));
    assert!(csv.contains(",'+bob@contoso.com,"), "{csv}");
    let jsonl = auditor
        .get(&format!(
            "{}/audit/export?format=jsonl&range=24h&status=429",
            portal.url
        ))
        .await
        .text()
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["CorrelationId"], "call-001");

    // Others may not.
    for role in ["Viewer", "TeamLead"] {
        let mut other = signed_in(&portal, &[("role", role)]).await;
        let export = other
            .get(&format!("{}/audit/export?range=24h", portal.url))
            .await;
        assert_eq!(export.status(), 403, "{role}");
        let call = other
            .post(
                &format!("{}/api/audit_call", portal.url),
                &[("id", "call-000"), ("verify", "")],
            )
            .await;
        assert_eq!(call.status(), 403, "{role}");
    }

    // Every look was recorded, and an admin reads the record.
    let mut admin = signed_in(&portal, &[("role", "Admin")]).await;
    let activity: serde_json::Value = admin
        .post(&format!("{}/api/list_activity", portal.url), &[])
        .await
        .json()
        .await
        .unwrap();
    let entries: Vec<(String, String, String)> = activity
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let auditor_name = "dev Auditor (dev sign-in)";
    assert!(entries.iter().any(|(a, act, t)| a == auditor_name
        && act == "audit.search"
        && t.contains("user=alice@contoso.com")));
    assert!(
        entries
            .iter()
            .any(|(a, act, t)| a == auditor_name && act == "audit.view" && t == "call-000")
    );
    assert_eq!(
        entries
            .iter()
            .filter(|(a, act, _)| a == auditor_name && act == "audit.export")
            .count(),
        2
    );
    // The refused looks wrote nothing (their sign-ins are on the record as sign-ins).
    assert!(
        !entries.iter().any(|(a, act, _)| act.starts_with("audit.")
            && (a.contains("Viewer") || a.contains("TeamLead")))
    );
}

/// A body longer than the call page shows is downloaded whole, as captured, by an auditor only,
/// as an attachment the browser does not render; each download is recorded, and one a link on
/// another site starts is refused and recorded nowhere.
#[tokio::test(flavor = "multi_thread")]
async fn an_auditor_downloads_a_whole_body_the_page_shows_only_the_start_of() {
    let mut audit_url = String::new();
    let portal = common::start_with(None, |settings| {
        audit_url = settings.database.replace("portal.db", "audit.db");
        settings.insights.audit_database = Some(audit_url.clone());
    })
    .await;
    // 300,000 characters, more than the page's 262,144, with markup and characters of two and
    // four bytes: the download is the text, not its start or an escaped copy.
    let prompt = format!(
        "<script>alert(1)</script> é 😀 {}the end",
        "word ".repeat(60_000)
    );
    let mut call = record(
        0,
        "alice@contoso.com",
        "198.51.100.7",
        &["g-red"],
        &prompt,
        200,
    );
    call.correlation_id = "call-big".to_owned();
    call.backend_response_body = Some("plain text, not JSON".to_owned());
    // The prompt as messages is shown whole in the transcript; this test is about the body.
    call.request_messages = Some("a long prompt".to_owned());
    let whole = call.backend_request_body.clone().unwrap();
    assert!(whole.chars().count() > 262_144);
    let store = SqlStore::open(&audit_url).await.unwrap();
    store.write(&[call]).await.unwrap();
    store.close().await;
    let mut auditor = signed_in(&portal, &[("role", "Auditor")]).await;

    let page = auditor
        .navigate(&format!("{}/audit/call?id=call-big", portal.url), "none")
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("the first 262,144 shown"), "{page}");
    assert!(
        page.contains("href=\"/audit/call/body?id=call-big&amp;part=request\""),
        "{page}"
    );
    assert!(page.contains("id=\"call-request-body-download\""), "{page}");
    assert!(!page.contains("the end"), "the page shows the start only");

    let url = |part: &str| format!("{}/audit/call/body?id=call-big&part={part}", portal.url);
    let download = auditor.navigate(&url("request"), "same-origin").await;
    assert_eq!(download.status(), 200);
    let header = |name: &str| download.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(
        header("content-disposition"),
        "attachment; filename=\"call-call-big-request.json\""
    );
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert!(not_stored(&download));
    assert_eq!(download.text().await.unwrap(), whole);

    let answer = auditor.navigate(&url("response"), "same-origin").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["content-type"].to_str().unwrap(),
        "text/plain; charset=utf-8"
    );
    assert_eq!(answer.text().await.unwrap(), "plain text, not JSON");

    // What is not there, and what is asked wrongly.
    let absent = auditor
        .navigate(
            &format!("{}/audit/call/body?id=call-none&part=request", portal.url),
            "same-origin",
        )
        .await;
    assert_eq!(absent.status(), 404);
    let wrong = auditor.navigate(&url("headers"), "same-origin").await;
    assert_eq!(wrong.status(), 422);
    assert!(wrong.text().await.unwrap().contains("request or response"));

    // Another site's link, and other roles.
    for site in ["cross-site", "same-site"] {
        let refused = auditor.navigate(&url("request"), site).await;
        assert_eq!(refused.status(), 403, "{site}");
        assert!(refused.headers().get("content-disposition").is_none());
    }
    for role in ["Viewer", "TeamLead"] {
        let mut other = signed_in(&portal, &[("role", role)]).await;
        let refused = other.navigate(&url("request"), "same-origin").await;
        assert_eq!(refused.status(), 403, "{role}");
        assert!(!refused.text().await.unwrap().contains("the end"));
    }

    let log = portal.server.portal.db.activity(100).await.unwrap();
    let mut bodies: Vec<(String, String)> = log
        .into_iter()
        .filter(|e| e.action == "audit.body")
        .map(|e| (e.actor, e.target))
        .collect();
    bodies.sort();
    let auditor_name = "dev Auditor (dev sign-in)".to_owned();
    assert_eq!(
        bodies,
        [
            (auditor_name.clone(), "call-big request".to_owned()),
            (auditor_name.clone(), "call-big response".to_owned()),
            (auditor_name.clone(), "call-none request".to_owned()),
        ]
    );
}

/// Whether a response forbids every cache to keep it.
fn not_stored(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get_all("cache-control")
        .iter()
        .any(|value| value.to_str().unwrap().contains("no-store"))
}

/// Pages and server functions answer with prompts, completions and names: no browser or proxy
/// cache may keep them (`Cache-Control: no-store`), signed in or not, so that nobody reads them
/// back from a shared computer's cache after the auditor signed out. The static files (the
/// front end's bundle, the icon) are the same for everyone and may be cached.
#[tokio::test(flavor = "multi_thread")]
async fn pages_and_server_functions_are_never_cached_and_static_files_may_be() {
    let portal = portal_with_calls().await;
    std::fs::create_dir_all(portal.site_root().join("pkg")).unwrap();
    std::fs::write(
        portal.site_root().join("pkg/gatehouse-portal.css"),
        "body { margin: 0 }\n",
    )
    .unwrap();
    std::fs::write(portal.site_root().join("favicon.svg"), "<svg/>").unwrap();
    let mut auditor = signed_in(&portal, &[("role", "Auditor")]).await;

    let call = auditor
        .get(&format!("{}/audit/call?id=call-000", portal.url))
        .await;
    assert_eq!(call.status(), 200);
    assert!(not_stored(&call), "{:?}", call.headers());
    assert!(call.text().await.unwrap().contains("secret launch"));
    let search = auditor
        .get(&format!("{}/audit?range=24h&text=launch", portal.url))
        .await;
    assert!(not_stored(&search), "{:?}", search.headers());
    let answer = auditor
        .post(
            &format!("{}/api/audit_call", portal.url),
            &[("id", "call-000"), ("verify", "")],
        )
        .await;
    assert_eq!(answer.status(), 200);
    assert!(not_stored(&answer), "{:?}", answer.headers());
    assert!(answer.text().await.unwrap().contains("secret launch"));
    let refused = auditor
        .post(&format!("{}/api/list_gateways", portal.url), &[])
        .await;
    assert_eq!(refused.status(), 403);
    assert!(not_stored(&refused), "{:?}", refused.headers());
    let home = Browser::new(&portal).get(&format!("{}/", portal.url)).await;
    assert!(not_stored(&home), "{:?}", home.headers());

    for asset in ["/pkg/gatehouse-portal.css", "/favicon.svg"] {
        let file = auditor.get(&format!("{}{asset}", portal.url)).await;
        assert_eq!(file.status(), 200, "{asset}");
        assert!(!not_stored(&file), "{asset}: {:?}", file.headers());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_links_from_another_site_open_the_pages_but_run_and_record_nothing() {
    let portal = portal_with_calls().await;
    let mut auditor = signed_in(&portal, &[("role", "Auditor")]).await;
    let search = format!("{}/audit?range=24h&user=alice%40contoso.com", portal.url);
    let call = format!("{}/audit/call?id=call-000&verify=1", portal.url);
    let export = format!("{}/audit/export?format=csv&range=24h", portal.url);
    let audit_activity = || async {
        let log = portal.server.portal.db.activity(100).await.unwrap();
        log.into_iter()
            .filter(|e| e.action.starts_with("audit."))
            .map(|e| e.action)
            .collect::<Vec<_>>()
    };

    // A link (or a script) on another site, followed with the auditor's session cookie.
    for site in ["cross-site", "same-site"] {
        let page = auditor.navigate(&search, site).await;
        assert_eq!(page.status(), 200, "{site}");
        let page = page.text().await.unwrap();
        assert!(
            page.contains("value=\"alice@contoso.com\""),
            "{site}: the form shows the link's filters: {page}"
        );
        let held_back = page
            .split("id=\"audit-held-back\"")
            .nth(1)
            .unwrap_or_else(|| panic!("{site}: the page says the search did not run: {page}"));
        assert!(
            held_back.contains("href=\"/audit?range=24h&amp;user=alice%40contoso.com\""),
            "{site}: one click runs it: {held_back}"
        );
        assert!(!page.contains("data-id=\"call-"), "{site}: {page}");

        let detail = auditor.navigate(&call, site).await;
        assert_eq!(detail.status(), 200, "{site}");
        let detail = detail.text().await.unwrap();
        let held_back = detail
            .split("id=\"call-held-back\"")
            .nth(1)
            .unwrap_or_else(|| panic!("{site}: the page says the call is not shown: {detail}"));
        assert!(
            held_back.contains("href=\"/audit/call?id=call-000&amp;verify=1\""),
            "{site}: one click opens it: {held_back}"
        );
        assert!(!detail.contains("secret launch"), "{site}: {detail}");
        assert!(
            !detail.contains("id=\"call-chain-check\""),
            "{site}: {detail}"
        );

        let refused = auditor.navigate(&export, site).await;
        assert_eq!(refused.status(), 403, "{site}");
        assert!(refused.headers().get("content-disposition").is_none());
        let message = refused.text().await.unwrap();
        assert!(message.contains("another site"), "{site}: {message}");
    }
    assert_eq!(
        audit_activity().await,
        Vec::<String>::new(),
        "nothing ran, so nothing is recorded"
    );

    // The same links followed from the portal's own pages, or typed in.
    for site in ["same-origin", "none"] {
        let page = auditor.navigate(&search, site).await.text().await.unwrap();
        assert!(page.contains("data-id=\"call-000\""), "{site}: {page}");
        assert!(!page.contains("id=\"audit-held-back\""), "{site}");
        let detail = auditor.navigate(&call, site).await.text().await.unwrap();
        assert!(detail.contains("secret launch"), "{site}: {detail}");
        assert!(
            detail.contains("id=\"call-chain-check\""),
            "{site}: {detail}"
        );
        let csv = auditor.navigate(&export, site).await;
        assert_eq!(csv.status(), 200, "{site}");
        assert_eq!(csv.text().await.unwrap().lines().count(), 4, "{site}");
    }
    let mut recorded = audit_activity().await;
    recorded.sort();
    assert_eq!(
        recorded,
        [
            "audit.export",
            "audit.export",
            "audit.search",
            "audit.search",
            "audit.view",
            "audit.view"
        ]
    );
}

/// A Query API double that answers every query with one documented table (figures, usage over
/// time, usage totals per value, or tokens by model) and a `PartialError` beside it
/// (`shared/reference/azure-specs.md` §4.1), and a token endpoint. With `whole_totals`, the
/// usage totals (`by Value` alone) are answered in whole, with more than the buckets it cuts
/// short hold, as a workspace answers a question of one row per value under the row limit that
/// its buckets meet.
async fn log_analytics_double(whole_totals: bool) -> String {
    use axum::Json;
    use axum::extract::State;
    use axum::routing::post;
    async fn token() -> Json<serde_json::Value> {
        Json(
            serde_json::json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "token-of-the-double"}),
        )
    }
    async fn query(
        State(whole_totals): State<bool>,
        Json(body): Json<serde_json::Value>,
    ) -> Json<serde_json::Value> {
        let kql = body["query"].as_str().unwrap_or_default();
        if kql.contains("by Value") && !kql.contains("bin(") {
            let (requests, tokens) = if whole_totals {
                (9, 1_234_567)
            } else {
                (7, 1_000_000)
            };
            let table = serde_json::json!({"name": "PrimaryResult",
                "columns": [{"name": "Value", "type": "string"}, {"name": "Requests", "type": "long"}, {"name": "Errors", "type": "long"}, {"name": "PromptTokens", "type": "long"}, {"name": "CompletionTokens", "type": "long"}, {"name": "TotalTokens", "type": "long"}, {"name": "LatencySumMs", "type": "long"}],
                "rows": [["gpt-4o", requests, 0, tokens, 0, tokens, 560]]});
            return Json(if whole_totals {
                serde_json::json!({"tables": [table]})
            } else {
                serde_json::json!({
                    "tables": [table],
                    "error": {"code": "PartialError", "message": "There were some errors when processing your query.", "details": [{"message": "workspace eu-2 did not answer"}]}
                })
            });
        }
        let table = if kql.contains("by Bucket") {
            let hour = OffsetDateTime::now_utc()
                .replace_minute(0)
                .unwrap()
                .replace_second(0)
                .unwrap()
                .replace_nanosecond(0)
                .unwrap()
                - Duration::HOUR;
            let bucket = hour
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            serde_json::json!({"name": "PrimaryResult",
                "columns": [{"name": "Bucket", "type": "datetime"}, {"name": "Value", "type": "string"}, {"name": "Requests", "type": "long"}, {"name": "Errors", "type": "long"}, {"name": "PromptTokens", "type": "long"}, {"name": "CompletionTokens", "type": "long"}, {"name": "TotalTokens", "type": "long"}, {"name": "LatencySumMs", "type": "long"}, {"name": "LatencyMaxMs", "type": "long"}],
                "rows": [[bucket, "gpt-4o", 7, 0, 1000000, 0, 1000000, 560, 420]]})
        } else if kql.contains("by Model") {
            serde_json::json!({"name": "PrimaryResult",
                "columns": [{"name": "Model", "type": "string"}, {"name": "Requests", "type": "long"}, {"name": "PromptTokens", "type": "long"}, {"name": "CompletionTokens", "type": "long"}],
                "rows": [["gpt-4o", 7, 1000000, 0]]})
        } else {
            serde_json::json!({"name": "PrimaryResult",
                "columns": [{"name": "Requests", "type": "long"}, {"name": "Errors", "type": "long"}, {"name": "PromptTokens", "type": "long"}, {"name": "CompletionTokens", "type": "long"}, {"name": "LatencyP50", "type": "real"}, {"name": "LatencyP95", "type": "real"}, {"name": "TtftP50", "type": "real"}, {"name": "TtftP95", "type": "real"}],
                "rows": [[7, 0, 1000000, 0, 80.0, 420.0, 20.0, 90.0]]})
        };
        Json(serde_json::json!({
            "tables": [table],
            "error": {"code": "PartialError", "message": "There were some errors when processing your query.", "details": [{"message": "workspace eu-2 did not answer"}]}
        }))
    }
    let app = axum::Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .route("/v1/workspaces/{workspace}/query", post(query))
        .with_state(whole_totals);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A portal whose dashboards read the Log Analytics double; the directory holds its client
/// secret.
async fn portal_on_log_analytics(whole_totals: bool) -> (TestPortal, tempfile::TempDir) {
    use gatehouse_portal_core::insights::log_analytics::{ClientCredentials, LogAnalyticsSettings};
    let double = log_analytics_double(whole_totals).await;
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("client-secret");
    std::fs::write(&secret, "not-shown").unwrap();
    let portal = common::start_with(None, |settings| {
        let mut la = LogAnalyticsSettings::new(
            "0b9d5a3e-1111-4c2b-9d2e-0123456789ab".to_owned(),
            ClientCredentials {
                tenant_id: "contoso.onmicrosoft.com".to_owned(),
                client_id: "portal".to_owned(),
                client_secret: gatehouse_schema::config::SecretRef::try_from(format!(
                    "file:{}",
                    secret.display()
                ))
                .unwrap(),
                authority: Some(double.parse().unwrap()),
            },
        );
        la.endpoint = Some(double.parse().unwrap());
        settings.insights.log_analytics = Some(la);
        settings.insights.prices =
            gatehouse_portal_core::insights::service::PriceTable::parse("gpt-4o=2.5/10").unwrap();
    })
    .await;
    (portal, secrets)
}

/// The warning of every answer of the double, as the pages show it.
const PARTIAL_ERROR: &str = "PartialError: There were some errors when processing your query.; workspace eu-2 did not answer";

#[tokio::test(flavor = "multi_thread")]
async fn the_same_pages_read_log_analytics_and_show_its_partial_errors() {
    let (portal, _secrets) = portal_on_log_analytics(false).await;
    let mut viewer = signed_in(&portal, &[("role", "Viewer")]).await;
    let page = viewer
        .get(&format!("{}/dashboard?range=24h", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("Log Analytics"), "{page}");
    assert!(page.contains("id=\"source-warnings\""), "{page}");
    assert_eq!(
        page.matches(&format!("<li>{PARTIAL_ERROR}</li>")).count(),
        1,
        "one warning, however many queries carried it: {page}"
    );
    assert!(
        page.contains("$2.50"),
        "1M prompt tokens of gpt-4o at $2.5: {page}"
    );
    assert!(!page.contains("not-shown"));
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_of_a_partial_log_analytics_answer_are_refused_with_its_warning() {
    let (portal, _secrets) = portal_on_log_analytics(false).await;
    let mut admin = signed_in(&portal, &[("role", "Admin")]).await;
    // The page shows the figures with the warning beside them.
    let usage = admin
        .get(&format!("{}/usage?range=24h&dimension=model", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(usage.contains("id=\"source-warnings\""), "{usage}");
    assert!(
        usage.contains(&format!("<li>{PARTIAL_ERROR}</li>")),
        "{usage}"
    );
    assert!(usage.contains("gpt-4o"), "{usage}");
    // A file or an image has no place for the warning: each is refused, as the audit export
    // refuses a page answered in part, rather than passed off as a whole answer.
    for path in [
        "/usage/export.csv?range=24h&dimension=model",
        "/usage/chart.svg?range=24h&dimension=model&metric=tokens",
        "/dashboard/export.csv?range=24h",
    ] {
        let response = admin.get(&format!("{}{path}", portal.url)).await;
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 502, "{path}: {body}");
        assert!(body.contains(PARTIAL_ERROR), "{path}: {body}");
        assert!(
            !body.contains("gpt-4o") && !body.contains("1000000"),
            "{path}: {body}"
        );
    }
}

/// The usage table asks Log Analytics for one row per value, not for every bucket: a workspace
/// that cuts the buckets short (the 500,000-row limit of 30 days by the hour × many users) but
/// answers the totals whole gives the table exact totals and no warning.
#[tokio::test(flavor = "multi_thread")]
async fn the_usage_table_reads_whole_totals_where_the_buckets_are_cut_short() {
    let (portal, _secrets) = portal_on_log_analytics(true).await;
    let mut admin = signed_in(&portal, &[("role", "Admin")]).await;
    let usage: serde_json::Value = admin
        .post(
            &format!("{}/api/usage_breakdown", portal.url),
            &[
                ("range", "30d"),
                ("from", ""),
                ("to", ""),
                ("dimension", "model"),
            ],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["warnings"], serde_json::json!([]), "{usage}");
    assert_eq!(usage["rows"][0]["value"], "gpt-4o", "{usage}");
    assert_eq!(usage["rows"][0]["requests"], 9, "{usage}");
    assert_eq!(usage["rows"][0]["total_tokens"], 1_234_567, "{usage}");
    let page = admin
        .get(&format!("{}/usage?range=30d&dimension=model", portal.url))
        .await
        .text()
        .await
        .unwrap();
    assert!(!page.contains("id=\"source-warnings\""), "{page}");
    assert!(page.contains("gpt-4o"), "{page}");
    // The chart still reads buckets, and a cut-short answer is refused there, as before.
    let chart = admin
        .get(&format!(
            "{}/usage/chart.svg?range=30d&dimension=model&metric=tokens",
            portal.url
        ))
        .await;
    assert_eq!(chart.status(), 502);
}
