//! The sign-in routes: OpenID Connect redirect and callback, sign-out, and the development
//! sign-in (routed only when enabled; the server refuses to start it off loopback).

use std::sync::Arc;

use axum::extract::{Form, Query};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use gatehouse_portal_core::user::{self, SESSION_USER_KEY};
use gatehouse_portal_core::{Portal, SessionUser};
use gatehouse_schema::portal::Role;
use http::StatusCode;
use leptos::config::LeptosOptions;
use serde::Deserialize;
use time::OffsetDateTime;
use tower_sessions::Session;

use crate::oidc::graph::GraphError;
use crate::oidc::{Oidc, PendingSignIn, SignInError};

/// Path of the OpenID Connect redirect URI.
pub const CALLBACK_PATH: &str = "/auth/callback";
const PENDING_KEY: &str = "gatehouse.oidc_pending";

/// What the sign-in routes need.
#[derive(Debug)]
pub struct AuthState {
    /// The OpenID Connect relying party, if configured.
    pub oidc: Option<Arc<Oidc>>,
    /// Whether the development sign-in is on.
    pub dev_sign_in: bool,
}

/// The sign-in routes.
pub fn routes(dev_sign_in: bool) -> Router<LeptosOptions> {
    let router = Router::new()
        .route("/auth/sign-in", get(sign_in))
        .route(CALLBACK_PATH, get(callback))
        .route("/auth/sign-out", post(sign_out));
    if dev_sign_in {
        router.route("/auth/dev", post(dev_sign_in_handler))
    } else {
        router
    }
}

fn page(status: StatusCode, message: &str) -> Response {
    // Plain text: nothing here is rendered as HTML.
    (status, message.to_owned()).into_response()
}

fn session_failed(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "session store failed");
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "The session store failed; try again.",
    )
}

/// A local path to return to: anything else (another host, `//host`) becomes `/`. Browsers
/// drop tabs and line breaks from a URL and read `\` as `/`, so `/<tab>/evil.example` would
/// become `//evil.example`, another host: a path with a control character, white space or a
/// backslash is refused too.
fn local_path(path: Option<String>) -> String {
    match path {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path
                    .chars()
                    .any(|c| c == '\\' || c.is_control() || c.is_whitespace()) =>
        {
            path
        }
        _ => "/".to_owned(),
    }
}

#[derive(Debug, Deserialize)]
struct SignInQuery {
    #[serde(default)]
    return_to: Option<String>,
}

async fn sign_in(
    Extension(auth): Extension<Arc<AuthState>>,
    session: Session,
    Query(query): Query<SignInQuery>,
) -> Response {
    let Some(oidc) = &auth.oidc else {
        if auth.dev_sign_in {
            return Redirect::to("/").into_response();
        }
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in is not configured on this portal.",
        );
    };
    let (url, pending) = oidc.start(local_path(query.return_to));
    if let Err(error) = session.insert(PENDING_KEY, &pending).await {
        return session_failed(error);
    }
    Redirect::to(url.as_str()).into_response()
}

#[derive(Debug, Deserialize)]
struct CallbackQuery {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

async fn callback(
    Extension(auth): Extension<Arc<AuthState>>,
    Extension(portal): Extension<Portal>,
    session: Session,
    Query(query): Query<CallbackQuery>,
) -> Response {
    let Some(oidc) = &auth.oidc else {
        return page(StatusCode::NOT_FOUND, "Sign-in is not configured.");
    };
    let pending: Option<PendingSignIn> = match session.remove(PENDING_KEY).await {
        Ok(pending) => pending,
        Err(error) => return session_failed(error),
    };
    let Some(pending) = pending else {
        return page(
            StatusCode::BAD_REQUEST,
            "No sign-in is in progress in this browser; start again from the portal.",
        );
    };
    if let Some(error) = query.error {
        // Debug-quoted: the text comes from the query string, and a line break in it would
        // forge a log line.
        tracing::warn!(?error, "the identity provider refused the sign-in");
        return page(
            StatusCode::FORBIDDEN,
            "The identity provider refused the sign-in.",
        );
    }
    let (Some(code), Some(state)) = (query.code, query.state) else {
        return page(StatusCode::BAD_REQUEST, "The callback lacks code or state.");
    };
    let user = match oidc.finish(&pending, &code, &state).await {
        Ok(user) => user,
        Err(SignInError::NoRole) => {
            return page(
                StatusCode::FORBIDDEN,
                "Your account holds no Gatehouse portal role; ask an administrator.",
            );
        }
        Err(error) => {
            tracing::warn!(%error, "sign-in failed");
            return match &error {
                SignInError::Groups(graph) => groups_unavailable(graph),
                _ => page(StatusCode::FORBIDDEN, "Sign-in failed."),
            };
        }
    };
    start_session(&portal, &session, &user, &pending.return_to).await
}

/// The page for a user whose role comes from groups the ID token left out (groups overage) and
/// which Microsoft Graph did not give: what happened and what to check, never the cause's detail
/// (which is logged).
fn groups_unavailable(error: &GraphError) -> Response {
    const WHY: &str = "Your group memberships could not be read from Microsoft Graph. You are in \
        more groups than a sign-in token carries, and your Gatehouse portal role comes from them.";
    const CHECK: &str = "If this persists, ask an administrator to check that the portal's app \
        registration has the delegated Microsoft Graph permission User.Read and that it is \
        consented for your organisation.";
    let (status, next) = if error.is_refusal() {
        (
            StatusCode::FORBIDDEN,
            "Microsoft Graph refused the portal's request for them.",
        )
    } else if error.is_unavailable() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Microsoft Graph is unavailable or busy; try again in a few minutes.",
        )
    } else {
        (
            StatusCode::BAD_GATEWAY,
            "Microsoft Graph's answer could not be used; try again.",
        )
    };
    page(status, &format!("{WHY} {next} {CHECK}"))
}

async fn start_session(
    portal: &Portal,
    session: &Session,
    user: &SessionUser,
    return_to: &str,
) -> Response {
    // On the record first: a sign-in that cannot be recorded is refused.
    if let Err(error) = portal.record_sign_in(user).await {
        tracing::error!(%error, "could not record a sign-in on the activity log");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Your sign-in could not be recorded, so it was refused; try again in a moment.",
        );
    }
    // Signed in already (as someone else, say): the old session ends as at sign-out, so that a
    // request in flight cannot bring it back under its old id.
    if let Err(error) = user::revoke(session, &portal.db, portal.settings.sessions).await {
        return session_failed(error);
    }
    // A new id at sign-in: a session id planted before sign-in is worthless after it.
    if let Err(error) = session.cycle_id().await {
        return session_failed(error);
    }
    if let Err(error) = session.insert(SESSION_USER_KEY, user).await {
        return session_failed(error);
    }
    tracing::info!(subject = %user.subject, roles = ?user.roles, dev = user.dev, "signed in");
    Redirect::to(return_to).into_response()
}

/// Ends the session for good: see [`user::sign_out`] (a request still in flight cannot bring it
/// back).
/// The sign-out is put on the activity log after the session ended; when that write fails the
/// user is signed out all the same, and the failure is logged.
async fn sign_out(Extension(portal): Extension<Portal>, session: Session) -> Response {
    let user: Option<SessionUser> = match session.get(SESSION_USER_KEY).await {
        Ok(user) => user,
        Err(error) => return session_failed(error),
    };
    if let Err(error) = user::sign_out(&session, &portal.db, portal.settings.sessions).await {
        return session_failed(error);
    }
    if let Some(user) = user
        && let Err(error) = portal.record_sign_out(&user).await
    {
        tracing::error!(%error, subject = %user.subject, "could not record a sign-out on the activity log");
    }
    Redirect::to("/").into_response()
}

#[derive(Debug, Deserialize)]
struct DevSignIn {
    role: String,
    #[serde(default)]
    name: Option<String>,
    /// For a team lead: the groups they lead, comma-separated.
    #[serde(default)]
    groups: Option<String>,
}

async fn dev_sign_in_handler(
    Extension(auth): Extension<Arc<AuthState>>,
    Extension(portal): Extension<Portal>,
    session: Session,
    Form(form): Form<DevSignIn>,
) -> Response {
    if !auth.dev_sign_in {
        return page(StatusCode::NOT_FOUND, "Not found.");
    }
    let Some(role) = Role::parse(&form.role) else {
        return page(StatusCode::UNPROCESSABLE_ENTITY, "role: unknown role");
    };
    let name = form
        .name
        .map(|n| n.trim().chars().take(100).collect::<String>())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("dev {}", role.as_str()));
    let led_groups = match (role, &form.groups) {
        (Role::TeamLead, Some(groups)) => groups
            .split(',')
            .map(|g| g.trim().chars().take(100).collect::<String>())
            .filter(|g| !g.is_empty())
            .take(50)
            .collect(),
        _ => Vec::new(),
    };
    let user = SessionUser {
        subject: format!("dev:{}", role.as_str()),
        name,
        roles: vec![role],
        led_groups,
        signed_in_at: OffsetDateTime::now_utc(),
        dev: true,
    };
    start_session(&portal, &session, &user, "/").await
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn only_local_paths_are_returned_to() {
        for (asked, returned) in [
            (Some("/subscriptions?tab=keys"), "/subscriptions?tab=keys"),
            (None, "/"),
            (Some("https://evil.example/"), "/"),
            (Some("//evil.example/"), "/"),
            (Some("/\\evil.example/"), "/"),
            (Some("/\t/evil.example/"), "/"),
            (Some("/\n/evil.example/"), "/"),
            (Some("/ /evil.example/"), "/"),
            (Some("relative"), "/"),
        ] {
            assert_eq!(local_path(asked.map(str::to_owned)), returned, "{asked:?}");
        }
    }
}
