//! Starting a portal server in-process on SQLite, and a small HTTP client that carries the
//! session cookie and the portal's Origin by hand.
#![allow(dead_code, reason = "each test file uses a part")]

pub mod provider;

use std::net::SocketAddr;
use std::time::Duration;

use gatehouse_portal::oidc::OidcSettings;
use gatehouse_portal::{PortalServer, SESSION_COOKIE, Settings, build};
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};
use url::Url;

/// A running portal.
pub struct TestPortal {
    pub url: String,
    pub server: PortalServer,
    _dir: tempfile::TempDir,
}

pub fn settings(dir: &tempfile::TempDir, addr: SocketAddr, oidc: Option<OidcSettings>) -> Settings {
    Settings {
        listen: addr,
        database: format!("sqlite:{}", dir.path().join("portal.db").display()),
        public_url: Url::parse(&format!("http://{addr}")).unwrap(),
        // The dev sign-in never runs beside OpenID Connect.
        dev_sign_in: oidc.is_none(),
        oidc,
        session_idle: Duration::from_secs(600),
        session_absolute: Duration::from_secs(3600),
        push_retry: Duration::from_secs(60),
        rotation_overlap: None,
        gateways: Vec::new(),
        admin_token_refs: Default::default(),
        leptos: leptos::config::LeptosOptions::builder()
            .output_name(gatehouse_portal_app::OUTPUT_NAME)
            .site_root(dir.path().join("site").display().to_string())
            .build(),
        insights: Default::default(),
    }
}

/// Starts a portal with the dev sign-in on (and OIDC if given).
pub async fn start(oidc: Option<OidcSettings>) -> TestPortal {
    start_with(oidc, |_| {}).await
}

/// Starts a portal after `adjust` changed its settings.
pub async fn start_with(
    oidc: Option<OidcSettings>,
    adjust: impl FnOnce(&mut Settings),
) -> TestPortal {
    try_start_with(oidc, adjust).await.unwrap()
}

/// Starts a portal after `adjust` changed its settings, or says why it would not start.
pub async fn try_start_with(
    oidc: Option<OidcSettings>,
    adjust: impl FnOnce(&mut Settings),
) -> anyhow::Result<TestPortal> {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut settings = settings(&dir, addr, oidc);
    adjust(&mut settings);
    let server = build(settings).await?;
    let router = server.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(TestPortal {
        url: format!("http://{addr}"),
        server,
        _dir: dir,
    })
}

impl TestPortal {
    /// The directory the portal serves its static files from (`/pkg/…`, `/favicon.svg`).
    pub fn site_root(&self) -> std::path::PathBuf {
        self._dir.path().join("site")
    }
}

/// A browser stand-in: no redirects followed, the session cookie kept by hand.
pub struct Browser {
    pub client: reqwest::Client,
    pub origin: String,
    pub cookie: Option<String>,
}

impl Browser {
    pub fn new(portal: &TestPortal) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .unwrap(),
            origin: portal.url.clone(),
            cookie: None,
        }
    }

    /// Keeps the session cookie a response sets.
    pub fn remember(&mut self, headers: &HeaderMap) {
        for value in headers.get_all(SET_COOKIE) {
            let text = value.to_str().unwrap();
            if let Some(pair) = text.split(';').next()
                && pair.starts_with(&format!("{SESSION_COOKIE}="))
            {
                self.cookie = Some(pair.to_owned());
            }
        }
    }

    pub async fn get(&mut self, url: &str) -> reqwest::Response {
        let mut request = self.client.get(url);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        self.remember(response.headers());
        response
    }

    /// A top-level navigation as a browser sends it, with the `Sec-Fetch-Site` that says who
    /// started it: `same-origin` (a link on the portal's pages), `none` (typed in, a bookmark),
    /// `cross-site` or `same-site` (a link on another site).
    pub async fn navigate(&mut self, url: &str, site: &str) -> reqwest::Response {
        let mut request = self
            .client
            .get(url)
            .header("sec-fetch-site", site)
            .header("sec-fetch-mode", "navigate")
            .header("sec-fetch-dest", "document");
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        self.remember(response.headers());
        response
    }

    /// A form post from the portal's own pages.
    pub async fn post(&mut self, url: &str, form: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .client
            .post(url)
            .header("origin", &self.origin)
            .header("accept", "application/json")
            .form(form);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        self.remember(response.headers());
        response
    }

    /// Creates subscription `id` named `display_name` (no product, no expiry) through the
    /// server function, as the admin page's form does.
    pub async fn create_subscription(
        &mut self,
        portal: &TestPortal,
        id: &str,
        display_name: &str,
    ) -> reqwest::Response {
        self.post(
            &format!("{}/api/create_subscription", portal.url),
            &[
                ("id", id),
                ("display_name", display_name),
                ("product", ""),
                ("expires_on", ""),
            ],
        )
        .await
    }

    pub async fn dev_sign_in(&mut self, portal: &TestPortal, role: &str) {
        let response = self
            .post(&format!("{}/auth/dev", portal.url), &[("role", role)])
            .await;
        assert_eq!(response.status(), 303, "dev sign-in as {role}");
        assert!(self.cookie.is_some());
    }
}

pub fn location(response: &reqwest::Response) -> String {
    response.headers()[LOCATION].to_str().unwrap().to_owned()
}

/// Log lines written while the guard an `install_*` returns lives, on the test's thread (the
/// portal's tasks run there too in a current-thread test).
#[derive(Clone, Default)]
pub struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Captures log lines as JSON, one object a line.
    pub fn install_json() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Captures log lines as the portal writes them by default: text, without colour codes.
    pub fn install_text() -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The JSON lines at WARN whose text holds `needle`.
    pub fn warnings(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|line| line["level"] == "WARN" && line.to_string().contains(needle))
            .count()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
