//! Entra ID's groups overage: an ID token that leaves `groups` out (`_claim_names` /
//! `_claim_sources`, or `hasgroups`) and a Microsoft Graph double that answers
//! `GET /v1.0/me/transitiveMemberOf/microsoft.graph.group` in pages, as Graph does, only to the
//! access token the provider double issued. The portal reads the groups from Graph with the
//! user's token, across pages, never from the token's claim source and never from another host;
//! a Graph that fails refuses a user whose role needs it with a page that says why, and leaves a
//! user with an app role signed in with it. Logs are captured (current-thread tests: the portal's
//! tasks run on the test's thread) to show the access token is never written.
#![expect(clippy::unwrap_used, reason = "test code")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::provider::{LEADS_GROUP, Mode, Provider, info, oidc, provider, sign_in};
use common::{CapturedLogs, TestPortal, location};
use gatehouse_portal::oidc::{Oidc, OidcSettings, SignInError};
use gatehouse_portal_core::SessionUser;
use gatehouse_schema::portal::Role;
use serde_json::{Value, json};
use url::Url;

const ADMINS_GROUP: &str = "3b9e-portal-admins";

/// What the Graph double answers.
#[derive(Debug, Clone)]
enum Answer {
    /// The pages, each with an `@odata.nextLink` to the next one on the double itself.
    Pages,
    /// The pages, with a first `@odata.nextLink` on this other origin.
    NextLinkTo(String),
    /// An error status with Graph's error body.
    Status(u16),
    /// 200 with something that is not a page of groups.
    NotAPage,
    /// The pages, the last one linking back to the first: pages without end.
    Endless,
}

/// A Microsoft Graph double: the signed-in user's groups in pages, to one bearer token.
struct Graph {
    url: String,
    token: String,
    pages: Vec<Vec<String>>,
    answer: Mutex<Answer>,
    hits: AtomicUsize,
}

impl Graph {
    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn graph_error(status: u16, code: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("retry-after", "1")],
        Json(json!({"error": {"code": code, "message": "refused by the Graph double"}})),
    )
        .into_response()
}

/// `GET /v1.0/me/transitiveMemberOf/microsoft.graph.group` (Microsoft Graph v1.0, "List a
/// user's memberships (direct and transitive)").
async fn memberships(
    State(graph): State<Arc<Graph>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    graph.hits.fetch_add(1, Ordering::SeqCst);
    let bearer = format!("Bearer {}", graph.token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(bearer.as_str()) {
        return graph_error(401, "InvalidAuthenticationToken");
    }
    if query.get("$select").map(String::as_str) != Some("id") {
        return graph_error(400, "BadRequest");
    }
    let answer = graph.answer.lock().unwrap().clone();
    let endless = matches!(answer, Answer::Endless);
    let next_origin = match answer {
        Answer::Status(429) => return graph_error(429, "TooManyRequests"),
        Answer::Status(status) if status >= 500 => {
            return graph_error(status, "serviceNotAvailable");
        }
        Answer::Status(status) => return graph_error(status, "Authorization_RequestDenied"),
        Answer::NotAPage => return (StatusCode::OK, "<html>maintenance</html>").into_response(),
        Answer::Pages | Answer::Endless => graph.url.clone(),
        Answer::NextLinkTo(origin) => origin,
    };
    let page: usize = query
        .get("$skiptoken")
        .map_or(0, |token| token.parse().unwrap());
    let mut body = json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#groups(id)",
        "value": graph.pages[page]
            .iter()
            .map(|id| json!({"@odata.type": "#microsoft.graph.group", "id": id}))
            .collect::<Vec<_>>(),
    });
    if endless || page + 1 < graph.pages.len() {
        body["@odata.nextLink"] = json!(format!(
            "{next_origin}/v1.0/me/transitiveMemberOf/microsoft.graph.group?$select=id&$top=999&$skiptoken={}",
            (page + 1) % graph.pages.len()
        ));
    }
    Json(body).into_response()
}

/// A Graph double on `ip` that knows `provider`'s access token; the leads and admins groups
/// are on the second of its pages.
async fn graph_on(ip: &str, provider: &Provider) -> Arc<Graph> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let graph = Arc::new(Graph {
        url: format!("http://{}", listener.local_addr().unwrap()),
        token: provider.access_token.clone(),
        pages: vec![
            vec!["g-0001".into(), "g-0002".into(), "g-0003".into()],
            vec!["g-0004".into(), LEADS_GROUP.into(), ADMINS_GROUP.into()],
        ],
        answer: Mutex::new(Answer::Pages),
        hits: AtomicUsize::new(0),
    });
    let app = Router::new()
        .route(
            "/v1.0/me/transitiveMemberOf/microsoft.graph.group",
            get(memberships),
        )
        .with_state(Arc::clone(&graph));
    tokio::spawn(async move { axum::serve(listener, app).await });
    graph
}

async fn graph_double(provider: &Provider) -> Arc<Graph> {
    graph_on("127.0.0.1", provider).await
}

/// Settings for `provider` with the admins group mapped too, reading overages from `graph`.
fn settings(provider: &Provider, graph: Option<&str>) -> OidcSettings {
    let mut settings = oidc(provider);
    settings
        .group_roles
        .insert(ADMINS_GROUP.to_owned(), Role::Admin);
    settings.graph = graph.map(|url| Url::parse(url).unwrap());
    settings
}

/// A Graph URL where nothing listens.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// Signs in with the relying party itself (no portal): the user it makes, or why not.
async fn finish(settings: OidcSettings) -> Result<SessionUser, SignInError> {
    let oidc = Oidc::discover(
        settings,
        Url::parse("http://127.0.0.1:9/auth/callback").unwrap(),
    )
    .await
    .unwrap();
    let (url, pending) = oidc.start("/".to_owned());
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let back = client.get(url).send().await.unwrap();
    assert_eq!(back.status(), 303);
    let back = Url::parse(&location(&back)).unwrap();
    let query: HashMap<String, String> = back.query_pairs().into_owned().collect();
    oidc.finish(&pending, &query["code"], &query["state"]).await
}

/// The scopes of the authorization request the relying party starts with `settings`.
async fn asked_scopes(settings: OidcSettings) -> Vec<String> {
    let oidc = Oidc::discover(
        settings,
        Url::parse("http://127.0.0.1:9/auth/callback").unwrap(),
    )
    .await
    .unwrap();
    let (url, _) = oidc.start("/".to_owned());
    let scope = url
        .query_pairs()
        .find(|(name, _)| name == "scope")
        .unwrap()
        .1;
    scope.split(' ').map(str::to_owned).collect()
}

async fn portal(settings: OidcSettings) -> TestPortal {
    common::start(Some(settings)).await
}

#[tokio::test]
async fn an_overage_user_gets_the_roles_of_groups_on_the_second_graph_page() {
    let (logs, _guard) = CapturedLogs::install_json();
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::Overage;
    let graph = graph_double(&provider).await;
    let portal = portal(settings(&provider, Some(&graph.url))).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        info(&mut browser, &portal).await["user"]["roles"],
        json!(["Admin", "TeamLead"])
    );
    assert!(
        provider
            .last_scopes()
            .contains(&format!("{}/User.Read", graph.url)),
        "{:?}",
        provider.last_scopes()
    );
    assert_eq!(graph.hits(), 2, "both pages were read");
    assert_eq!(
        provider.claim_source_hits.load(Ordering::SeqCst),
        0,
        "the token's claim source is never called"
    );
    assert!(!logs.text().contains(&provider.access_token));
}

#[tokio::test]
async fn both_forms_of_the_overage_give_the_led_groups_from_graph() {
    let provider = provider().await;
    let graph = graph_double(&provider).await;
    for mode in [Mode::Overage, Mode::ImplicitOverage] {
        *provider.mode.lock().unwrap() = mode;
        let user = finish(settings(&provider, Some(&graph.url))).await.unwrap();
        assert_eq!(user.roles, [Role::Admin, Role::TeamLead], "{mode:?}");
        assert_eq!(user.led_groups, [LEADS_GROUP], "{mode:?}");
    }
    assert_eq!(graph.hits(), 4);

    // The groups claim of a token without the overage is all there is: Graph is not asked.
    *provider.mode.lock().unwrap() = Mode::GroupOnly;
    let user = finish(settings(&provider, Some(&graph.url))).await.unwrap();
    assert_eq!(user.roles, [Role::TeamLead]);
    assert_eq!(graph.hits(), 4);
}

#[tokio::test]
async fn a_next_link_off_the_configured_graph_is_not_followed() {
    let (logs, _guard) = CapturedLogs::install_json();
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::Overage;
    let graph = graph_double(&provider).await;
    // Another host (the whole of 127/8 is loopback), with the same pages and the same token.
    let elsewhere = graph_on("127.0.0.2", &provider).await;
    graph.answer(Answer::NextLinkTo(elsewhere.url.clone()));
    let portal = portal(settings(&provider, Some(&graph.url))).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 502);
    let page = response.text().await.unwrap();
    assert!(
        page.contains("could not be read from Microsoft Graph"),
        "{page}"
    );
    assert_eq!(info(&mut browser, &portal).await["user"], Value::Null);
    assert_eq!(graph.hits(), 1);
    assert_eq!(elsewhere.hits(), 0, "no request reached the other host");
    assert_eq!(logs.warnings("@odata.nextLink points away"), 1);

    // Another port on the same host is another origin too.
    let other_port = graph_double(&provider).await;
    graph.answer(Answer::NextLinkTo(other_port.url.clone()));
    let error = finish(settings(&provider, Some(&graph.url)))
        .await
        .unwrap_err();
    assert!(matches!(error, SignInError::Groups(_)), "{error}");
    assert_eq!(other_port.hits(), 0);
}

#[tokio::test]
async fn a_graph_without_a_last_page_is_read_fifty_pages_deep_at_most() {
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::Overage;
    let graph = graph_double(&provider).await;
    graph.answer(Answer::Endless);
    let portal = portal(settings(&provider, Some(&graph.url))).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 502);
    assert_eq!(graph.hits(), 50);
    assert_eq!(info(&mut browser, &portal).await["user"], Value::Null);
}

#[tokio::test]
async fn a_failing_graph_refuses_a_user_without_an_app_role_and_says_why() {
    let (logs, _guard) = CapturedLogs::install_json();
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::Overage;
    let graph = graph_double(&provider).await;
    let portal = portal(settings(&provider, Some(&graph.url))).await;
    for (answer, status, says) in [
        (Answer::Status(503), 503, "try again in a few minutes"),
        (Answer::Status(429), 503, "try again in a few minutes"),
        (Answer::Status(403), 403, "refused"),
        (Answer::Status(401), 403, "refused"),
        (Answer::NotAPage, 502, "could not be used"),
    ] {
        graph.answer(answer.clone());
        let (mut browser, _, response) = sign_in(&portal).await;
        assert_eq!(response.status(), status, "{answer:?}");
        let page = response.text().await.unwrap();
        for text in [
            "Your group memberships could not be read from Microsoft Graph",
            says,
            "delegated Microsoft Graph permission User.Read",
        ] {
            assert!(page.contains(text), "{answer:?}: {page}");
        }
        assert!(!page.contains(&provider.access_token));
        assert_eq!(
            info(&mut browser, &portal).await["user"],
            Value::Null,
            "{answer:?} signed nobody in"
        );
    }

    // Graph unreachable.
    let portal = self::portal(settings(&provider, Some(&closed_port().await))).await;
    let (_, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 503);

    // What is logged, and the error itself, say what to check and never quote the token.
    graph.answer(Answer::Status(403));
    let error = finish(settings(&provider, Some(&graph.url)))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, SignInError::Groups(_)), "{text}");
    assert!(
        text.contains("could not be read from Microsoft Graph") && text.contains("User.Read"),
        "{text}"
    );
    assert!(!text.contains(&provider.access_token), "{text}");
    assert!(!format!("{error:?}").contains(&provider.access_token));
    assert_eq!(logs.warnings("could not be read from Microsoft Graph"), 6);
    assert!(!logs.text().contains(&provider.access_token));
}

#[tokio::test]
async fn a_failing_graph_leaves_a_user_with_an_app_role_signed_in_with_it() {
    let (logs, _guard) = CapturedLogs::install_json();
    let provider = provider().await;
    *provider.mode.lock().unwrap() = Mode::OverageWithAppRole;
    let graph = graph_double(&provider).await;
    graph.answer(Answer::Status(503));
    let portal = portal(settings(&provider, Some(&graph.url))).await;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        info(&mut browser, &portal).await["user"]["roles"],
        json!(["Auditor"])
    );
    assert_eq!(graph.hits(), 1);
    assert_eq!(
        logs.warnings("signed in with the token's app roles only"),
        1
    );
    assert!(!logs.text().contains(&provider.access_token));

    // Graph working, the app role and the group roles count together.
    graph.answer(Answer::Pages);
    let user = finish(settings(&provider, Some(&graph.url))).await.unwrap();
    assert_eq!(user.roles, [Role::Admin, Role::Auditor, Role::TeamLead]);
}

#[tokio::test]
async fn the_graph_scope_is_asked_for_only_when_graph_lookups_are_on() {
    let provider = provider().await;
    let graph = graph_double(&provider).await;
    let standard = ["openid", "profile", "email"].map(str::to_owned).to_vec();
    let mut with_graph = standard.clone();
    with_graph.push(format!("{}/User.Read", graph.url));
    assert_eq!(
        asked_scopes(settings(&provider, Some(&graph.url))).await,
        with_graph
    );
    assert_eq!(asked_scopes(settings(&provider, None)).await, standard);
    // No group maps to a role: Graph would never be asked, so neither is its scope.
    let mut no_groups = settings(&provider, Some(&graph.url));
    no_groups.group_roles.clear();
    assert_eq!(asked_scopes(no_groups).await, standard);

    // What the portal sends the provider (a generic issuer: no Graph by default).
    let portal = portal(oidc(&provider)).await;
    let (_, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(provider.last_scopes(), standard);
}

#[tokio::test]
async fn an_overage_with_graph_lookups_off_keeps_the_token_roles_and_warns() {
    let (logs, _guard) = CapturedLogs::install_json();
    let provider = provider().await;
    let portal = portal(settings(&provider, None)).await;
    *provider.mode.lock().unwrap() = Mode::OverageWithAppRole;
    let (mut browser, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 303);
    assert_eq!(
        info(&mut browser, &portal).await["user"]["roles"],
        json!(["Auditor"])
    );
    assert_eq!(logs.warnings("GATEHOUSE_PORTAL_GRAPH_URL"), 1);

    *provider.mode.lock().unwrap() = Mode::Overage;
    let (_, _, response) = sign_in(&portal).await;
    assert_eq!(response.status(), 403);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("holds no Gatehouse portal role")
    );
    assert_eq!(logs.warnings("GATEHOUSE_PORTAL_GRAPH_URL"), 2);
    assert_eq!(provider.claim_source_hits.load(Ordering::SeqCst), 0);
}
