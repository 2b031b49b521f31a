//! The Gatehouse portal's pages, components and server functions.
//!
//! Built twice: with `ssr` into the portal server (the server functions run there, against
//! `gatehouse-portal-core`), and with `hydrate` into the browser's wasm (the same components,
//! the server functions become HTTP calls). Never both in one build.

pub mod alerts;
pub mod api;
pub mod audit_search;
mod pages;
pub mod usage;

use leptos::prelude::*;
use leptos_meta::{MetaTags, Stylesheet, Title, provide_meta_context};
use leptos_router::components::{A, Route, Router, Routes};
use leptos_router::{SsrMode, StaticSegment};

use crate::api::{SessionInfo, portal_info};

/// The name of the compiled site bundle (`/pkg/{OUTPUT_NAME}.js|.wasm|.css`).
pub const OUTPUT_NAME: &str = "gatehouse-portal";

/// The HTML document around the app, rendered on the server.
pub fn shell(options: LeptosOptions) -> impl IntoView {
    #[cfg(feature = "ssr")]
    ssr::content_security_policy();
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <meta name="viewport" content="width=device-width, initial-scale=1" />
                <meta name="color-scheme" content="light dark" />
                <link rel="icon" href="/favicon.svg" type="image/svg+xml" />
                <HydrationScripts options />
                <MetaTags />
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The portal: layout and routes.
#[component]
pub fn App() -> impl IntoView {
    provide_meta_context();
    let info = Resource::new(|| (), |()| portal_info());
    view! {
        <Stylesheet id="portal-style" href="/pkg/gatehouse-portal.css" />
        <Title text="Gatehouse portal" />
        <Router>
            <Suspense fallback=|| ()>
                {move || Suspend::new(async move {
                    match info.await {
                        Ok(info) => view! { <Header info /> }.into_any(),
                        Err(_) => view! { <Header info=SessionInfo::default() /> }.into_any(),
                    }
                })}
            </Suspense>
            <main class="page">
                <Routes fallback=NotFound>
                    <Route path=StaticSegment("") view=pages::Overview ssr=SsrMode::Async />
                    <Route
                        path=StaticSegment("subscriptions")
                        view=pages::Subscriptions
                        ssr=SsrMode::Async
                    />
                    <Route
                        path=StaticSegment("access-rules")
                        view=pages::AccessRules
                        ssr=SsrMode::Async
                    />
                    <Route path=StaticSegment("pools") view=pages::Pools ssr=SsrMode::Async />
                    <Route path=StaticSegment("gateways") view=pages::Gateways ssr=SsrMode::Async />
                    <Route path=StaticSegment("activity") view=pages::Activity ssr=SsrMode::Async />
                    <Route path=StaticSegment("dashboard") view=usage::Dashboard ssr=SsrMode::Async />
                    <Route path=StaticSegment("usage") view=usage::Usage ssr=SsrMode::Async />
                    <Route path=StaticSegment("alerts") view=alerts::Alerts ssr=SsrMode::Async />
                    <Route path=StaticSegment("audit") view=audit_search::AuditSearch ssr=SsrMode::Async />
                    <Route
                        path=(StaticSegment("audit"), StaticSegment("call"))
                        view=audit_search::AuditCall
                        ssr=SsrMode::Async
                    />
                </Routes>
            </main>
        </Router>
    }
}

/// The page for unknown paths (status 404 on the server).
#[component]
fn NotFound() -> impl IntoView {
    #[cfg(feature = "ssr")]
    if let Some(response) = use_context::<leptos_axum::ResponseOptions>() {
        response.set_status(http::StatusCode::NOT_FOUND);
    }
    view! { <p class="empty">"Page not found."</p> }
}

/// A button-styled link to a route the server answers itself (the sign-in redirect to the
/// identity provider, the exports), not a page of the portal. `rel="external"` leaves its click to
/// the browser: the client-side router would look for a page of that path and show "Page not
/// found".
#[component]
pub(crate) fn ServerLink(
    /// Where the server answers.
    #[prop(into)]
    href: String,
    /// The element's id, if any.
    #[prop(optional)]
    id: Option<&'static str>,
    children: Children,
) -> impl IntoView {
    view! {
        <a class="btn" href=href rel="external" id=id>
            {children()}
        </a>
    }
}

/// The top bar: product name, navigation, who is signed in; the dev sign-in banner above it.
#[component]
fn Header(info: SessionInfo) -> impl IntoView {
    let dev = info.dev_sign_in;
    let user = info.user.clone();
    view! {
        <Show when=move || dev>
            <div class="banner banner-warn" role="alert">
                "Development sign-in is enabled: anyone on this machine can sign in with any role. Never use it for real data."
            </div>
        </Show>
        <header class="topbar">
            <A href="/" attr:class="brand">
                "Gatehouse"
            </A>
            <nav class="nav">
                <A href="/access-rules">"Access rules"</A>
                <A href="/subscriptions">"Subscriptions"</A>
                <A href="/pools">"Backend pools"</A>
                <A href="/gateways">"Gateways"</A>
                <A href="/activity">"Activity"</A>
                <A href="/dashboard">"Dashboard"</A>
                <A href="/usage">"Usage"</A>
                <A href="/audit">"Audit"</A>
                <A href="/alerts">"Alerts"</A>
            </nav>
            <div class="who">
                {match user {
                    Some(user) => {
                        let roles = user
                            .roles
                            .iter()
                            .map(|role| role.as_str())
                            .collect::<Vec<_>>()
                            .join(", ");
                        view! {
                            <span class="who-name">{user.name}</span>
                            <span class="badge">{roles}</span>
                            <form method="post" action="/auth/sign-out" class="inline">
                                <button type="submit" class="btn btn-quiet">
                                    "Sign out"
                                </button>
                            </form>
                        }
                            .into_any()
                    }
                    None if dev => {
                        view! {
                            <form method="post" action="/auth/dev" class="inline">
                                <select name="role" aria-label="Role">
                                    <option value="Admin">"Admin"</option>
                                    <option value="Auditor">"Auditor"</option>
                                    <option value="TeamLead">"TeamLead"</option>
                                    <option value="Viewer">"Viewer"</option>
                                </select>
                                " "
                                <button type="submit" class="btn btn-primary">
                                    "Dev sign-in"
                                </button>
                            </form>
                        }
                            .into_any()
                    }
                    None => view! { <ServerLink href="/auth/sign-in">"Sign in"</ServerLink> }.into_any(),
                }}
            </div>
        </header>
    }
}

#[cfg(feature = "ssr")]
pub mod ssr {
    //! Server-only helpers: the portal state and the signed-in user of the current request.

    use axum::Extension;
    use gatehouse_portal_core::{Portal, PortalError, SessionUser, user::current_user};
    use leptos::prelude::*;
    use leptos_axum::ResponseOptions;
    use tower_sessions::Session;

    /// The portal state and the signed-in user (if any) of the request being served.
    pub async fn portal_and_user() -> Result<(Portal, Option<SessionUser>), ServerFnError> {
        let Extension(portal): Extension<Portal> = leptos_axum::extract().await?;
        let session: Session = leptos_axum::extract().await?;
        let user = current_user(&session, &portal.db, portal.settings.sessions)
            .await
            .map_err(to_server_error)?;
        Ok((portal, user))
    }

    /// Whether the browser says the request was started by another site: `Sec-Fetch-Site` is
    /// `cross-site` or `same-site` (a link, a form or a script on another origin). The session
    /// cookie is `SameSite=Lax`, so a top-level GET from another site still carries it: a GET
    /// that records an audit access in the user's name (a search, a call opened, an export)
    /// must not run on such a request, or any site could write entries in that user's activity
    /// log. `same-origin` (the portal's own pages) and `none` (typed in, a bookmark, a link
    /// opened from another application) are not from another site, nor is a request without
    /// the header: browsers send it on every request to an https or loopback origin (Chrome 76,
    /// Firefox 90, Safari 16.4 and later), so that is a client that is not a browser, which
    /// another site cannot drive, or a browser this does not protect (an older one, or a portal
    /// served over plain http). (A state-changing request is checked by its `Origin` in the
    /// server's `security` layer.)
    pub fn from_another_site(headers: &http::HeaderMap) -> bool {
        headers
            .get("sec-fetch-site")
            .is_some_and(|site| matches!(site.as_bytes(), b"cross-site" | b"same-site"))
    }

    /// [`from_another_site`] for the request being served: a page's, or a server function's.
    pub fn request_from_another_site() -> bool {
        use_context::<http::request::Parts>().is_some_and(|parts| from_another_site(&parts.headers))
    }

    /// Turns an operation's error into what the caller sees: a generic message for internal
    /// failures, and the HTTP status that says what happened.
    pub fn to_server_error(error: PortalError) -> ServerFnError {
        let status = match &error {
            PortalError::NotSignedIn => http::StatusCode::UNAUTHORIZED,
            PortalError::Forbidden => http::StatusCode::FORBIDDEN,
            PortalError::NotFound(_) => http::StatusCode::NOT_FOUND,
            PortalError::Invalid { .. } => http::StatusCode::UNPROCESSABLE_ENTITY,
            PortalError::Conflict { .. } => http::StatusCode::CONFLICT,
            _ => http::StatusCode::INTERNAL_SERVER_ERROR,
        };
        // Only a server function's own response to a script carries the status; a page that
        // renders the error in place stays a 200, and a plain form post (before hydration) keeps
        // the redirect back to its form, which carries the error.
        let is_server_function = use_context::<http::request::Parts>().is_some_and(|parts| {
            let accepts_html = parts
                .headers
                .get(http::header::ACCEPT)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.contains("text/html"));
            parts.uri.path().starts_with("/api/") && !accepts_html
        });
        if let (true, Some(response)) = (is_server_function, use_context::<ResponseOptions>()) {
            response.set_status(status);
        }
        ServerFnError::ServerError(error.public_message())
    }

    /// Sets the page's Content-Security-Policy: scripts only from this origin or with this
    /// response's nonce (the hydration bootstrap), nothing inline otherwise.
    pub fn content_security_policy() {
        let (Some(nonce), Some(response)) =
            (leptos::nonce::use_nonce(), use_context::<ResponseOptions>())
        else {
            return;
        };
        let policy = format!(
            "default-src 'self'; script-src 'self' 'nonce-{nonce}' 'wasm-unsafe-eval'; \
             style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
             base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        );
        if let Ok(value) = http::HeaderValue::from_str(&policy) {
            response.insert_header(http::header::CONTENT_SECURITY_POLICY, value);
        }
    }
}
