//! The Gatehouse portal server: axum + leptos_axum around the app, OpenID Connect sign-in,
//! sessions in the config database, security headers, and the publisher that pushes snapshots to
//! the gateways.
//!
//! Layers, outermost first: security headers → Origin check (state-changing requests) →
//! sessions → the portal state as request extensions → routes (`/auth/*`, server functions under
//! `/api/*`, pages, static files).

pub mod auth;
pub mod dashboards;
pub mod oidc;
pub mod security;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::Uri;
use axum::{Extension, Router};
use gatehouse_portal_app::{App, shell};
use gatehouse_portal_core::db::Engine;
use gatehouse_portal_core::ops::PortalSettings;
use gatehouse_portal_core::push::Publisher;
use gatehouse_portal_core::secret::AdminTokenRefs;
use gatehouse_portal_core::user::SessionLifetime;
use gatehouse_portal_core::{ConfigDb, Portal};
use gatehouse_schema::config::SecretRef;
use leptos::config::LeptosOptions;
use leptos_axum::{LeptosRoutes, generate_route_list};
use tower_sessions::cookie::SameSite;
use tower_sessions::session_store::ExpiredDeletion;
use tower_sessions::{Expiry, SessionManagerLayer, SessionStore};
use tower_sessions_sqlx_store::{PostgresStore, SqliteStore};
use url::Url;

use crate::auth::AuthState;
use crate::oidc::{Oidc, OidcSettings};

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "gatehouse_session";

/// Everything the portal server needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// `sqlite:PATH` or `postgres://…`.
    pub database: String,
    /// The URL browsers use to reach the portal: the redirect URI, the allowed Origin, and
    /// whether cookies are `Secure` (https).
    pub public_url: Url,
    /// OpenID Connect sign-in; `None` leaves only the dev sign-in (if enabled).
    pub oidc: Option<OidcSettings>,
    /// The development sign-in: refused unless `listen` and `public_url` are loopback addresses
    /// and OpenID Connect is off.
    pub dev_sign_in: bool,
    /// A session unused this long ends.
    pub session_idle: Duration,
    /// A session this old ends, however active.
    pub session_absolute: Duration,
    /// How often gateways that lag are offered the current version again.
    pub push_retry: Duration,
    /// How long the previous key of a rotated subscription stays valid; `None`: until an admin
    /// retires it.
    pub rotation_overlap: Option<Duration>,
    /// Gateways to register at start (id, URL, admin-token secret reference).
    pub gateways: Vec<(String, String, String)>,
    /// The references gateway admin tokens may be read from (besides those of `gateways`,
    /// always allowed).
    pub admin_token_refs: AdminTokenRefs,
    /// Leptos' site settings (output name, site root, package directory).
    pub leptos: LeptosOptions,
    /// The dashboards' and the audit search's source, and the price table.
    pub insights: dashboards::InsightsSettings,
}

/// A built portal: the router and the state behind it.
#[derive(Debug, Clone)]
pub struct PortalServer {
    /// The whole HTTP application.
    pub router: Router,
    /// The state (database, publisher).
    pub portal: Portal,
    /// The dashboards' operations (source, prices, alerts).
    pub insights: gatehouse_portal_core::insights::Insights,
    /// The session store, for the expired-session cleanup.
    pub session_cleanup: SessionCleanup,
}

/// Opens the database (migrating it), discovers the OIDC issuer, and builds the router.
pub async fn build(settings: Settings) -> anyhow::Result<PortalServer> {
    if settings.dev_sign_in {
        // Anyone who reaches the portal could sign in as Admin: only on a developer's own machine,
        // never behind a proxy that serves it under another address, never beside real sign-in.
        if !settings.listen.ip().is_loopback() {
            anyhow::bail!(
                "the development sign-in is only available when the portal listens on a loopback address, not {}",
                settings.listen
            );
        }
        if !gatehouse_schema::config::is_loopback(&settings.public_url) {
            anyhow::bail!(
                "the development sign-in is only available when the portal's public URL is a loopback address, not {} (a proxy would let anyone sign in as Admin)",
                settings.public_url
            );
        }
        if settings.oidc.is_some() {
            anyhow::bail!(
                "the development sign-in cannot run beside OpenID Connect sign-in: turn one of them off"
            );
        }
    }
    let db = ConfigDb::open(&settings.database)
        .await
        .context("config database")?;
    // A gateway given at start over plain http:// to another host is refused as the Gateways
    // page refuses it, before anything is pushed.
    for (id, url, _) in &settings.gateways {
        let url = url::Url::parse(url).with_context(|| format!("--gateway {id}: URL"))?;
        settings
            .admin_token_refs
            .check_gateway_url(&url)
            .map_err(|why| anyhow::anyhow!("--gateway {id}: {why}"))?;
    }
    let admin_token_refs = settings.admin_token_refs.clone().with_exact(
        settings
            .gateways
            .iter()
            .filter_map(|(_, _, reference)| SecretRef::try_from(reference.clone()).ok()),
    );
    let publisher = Arc::new(
        Publisher::new(db.clone(), Duration::from_secs(10))?
            .with_admin_token_refs(admin_token_refs.clone()),
    );
    let sessions = SessionLifetime {
        idle: time::Duration::try_from(settings.session_idle).context("session idle timeout")?,
        absolute: time::Duration::try_from(settings.session_absolute)
            .context("session absolute timeout")?,
    };
    let portal = Portal {
        db: db.clone(),
        publisher,
        settings: PortalSettings {
            dev_sign_in: settings.dev_sign_in,
            sessions,
            rotation_overlap: settings
                .rotation_overlap
                .map(time::Duration::try_from)
                .transpose()
                .context("rotation overlap")?,
        },
    };
    for (id, url, token_ref) in &settings.gateways {
        portal
            .db
            .upsert_gateway(
                id,
                url,
                token_ref,
                gatehouse_portal_core::db::NewActivity {
                    actor: "portal start-up",
                    action: "gateway.register",
                    target: id,
                    before: None,
                    after: serde_json::to_string(
                        &serde_json::json!({"url": url, "admin_token_ref": token_ref}),
                    )
                    .ok(),
                },
            )
            .await?;
    }
    let insights = settings
        .insights
        .open(db.clone(), admin_token_refs)
        .await
        .context("dashboards' audit source")?;
    let oidc = match &settings.oidc {
        Some(oidc) => {
            let mut redirect = settings.public_url.clone();
            redirect.set_path(auth::CALLBACK_PATH);
            Some(Arc::new(
                Oidc::discover(oidc.clone(), redirect)
                    .await
                    .context("OpenID Connect issuer")?,
            ))
        }
        None => None,
    };
    let auth = Arc::new(AuthState {
        oidc,
        dev_sign_in: settings.dev_sign_in,
    });
    let leptos_options = settings.leptos.clone();
    let routes = generate_route_list(App);
    // Static files, or the not-found page: only the files may be cached.
    let files = leptos_axum::file_and_error_handler(shell);
    let files = move |uri: Uri, state: State<LeptosOptions>, request: Request| {
        let files = files.clone();
        async move { security::mark_static_file(files(uri, state, request).await) }
    };
    let app: Router = Router::new()
        .merge(auth::routes(settings.dev_sign_in))
        .merge(dashboards::routes())
        .leptos_routes_with_context(&leptos_options, routes, leptos::nonce::provide_nonce, {
            let options = leptos_options.clone();
            move || shell(options.clone())
        })
        .fallback(files)
        .with_state(leptos_options)
        .layer(Extension(portal.clone()))
        .layer(Extension(insights.clone()))
        .layer(Extension(auth));
    let secure = settings.public_url.scheme() == "https";
    let (app, session_cleanup) = match &db.engine {
        Engine::Sqlite(pool) => {
            let store = SqliteStore::new(pool.clone());
            store.migrate().await.context("session table")?;
            (
                with_sessions(app, store.clone(), sessions.idle, secure),
                SessionCleanup::Sqlite(store),
            )
        }
        Engine::Postgres(pool) => {
            let store = PostgresStore::new(pool.clone());
            store.migrate().await.context("session table")?;
            (
                with_sessions(app, store.clone(), sessions.idle, secure),
                SessionCleanup::Postgres(store),
            )
        }
    };
    let app = security::layers(app, &settings.public_url);
    Ok(PortalServer {
        router: app,
        portal,
        insights,
        session_cleanup,
    })
}

/// The session store, kept to delete expired sessions from it.
#[derive(Debug, Clone)]
pub enum SessionCleanup {
    /// Sessions in SQLite.
    Sqlite(SqliteStore),
    /// Sessions in PostgreSQL.
    Postgres(PostgresStore),
}

impl SessionCleanup {
    /// Deletes expired sessions now, then every `every` (the store's own deletion task).
    pub fn spawn(self, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let result = match self {
                SessionCleanup::Sqlite(store) => store.continuously_delete_expired(every).await,
                SessionCleanup::Postgres(store) => store.continuously_delete_expired(every).await,
            };
            if let Err(error) = result {
                tracing::error!(%error, "expired-session cleanup stopped");
            }
        })
    }
}

/// How often the portal looks for rotation overlaps that have ended.
const OVERLAP_CHECK: Duration = Duration::from_secs(60);
/// How often expired sessions are deleted.
const SESSION_CLEANUP: Duration = Duration::from_secs(600);

/// Every `every`, retires the previous keys whose rotation overlap has ended (and publishes).
pub fn spawn_overlap_retirement(portal: Portal, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match portal.retire_ended_overlaps().await {
                Ok(0) => {}
                Ok(retired) => {
                    tracing::info!(retired, "previous keys retired at the end of their overlap")
                }
                Err(error) => tracing::warn!(%error, "could not retire ended rotation overlaps"),
            }
        }
    })
}

/// Sessions in `store` that end `idle` after their last use: the store's expiry and the cookie's
/// Max-Age move when a session is saved, which `current_user` makes happen now and then while the
/// session is in use (tower-sessions saves only a session the request changed).
fn with_sessions<S>(app: Router, store: S, idle: time::Duration, secure: bool) -> Router
where
    S: SessionStore + Clone,
{
    app.layer(
        SessionManagerLayer::new(store)
            .with_name(SESSION_COOKIE)
            .with_secure(secure)
            .with_http_only(true)
            .with_same_site(SameSite::Lax)
            .with_path("/")
            .with_expiry(Expiry::OnInactivity(idle)),
    )
}

/// Serves the portal until the process is stopped; the catch-up push runs alongside.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let listen = settings.listen;
    let retry = settings.push_retry;
    let server = build(settings).await?;
    let _catch_up = Arc::clone(&server.portal.publisher).spawn_catch_up(retry);
    let _alerts = server
        .insights
        .alerter()
        .map(|alerter| Arc::clone(alerter).spawn(Duration::from_secs(60)));
    let _overlaps = spawn_overlap_retirement(server.portal.clone(), OVERLAP_CHECK);
    let _sessions = server.session_cleanup.clone().spawn(SESSION_CLEANUP);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(%listen, "portal listening");
    axum::serve(listener, server.router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
