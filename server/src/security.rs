//! Security headers on every response, the Origin check on state-changing requests, and no
//! server function errors shown from a link made elsewhere ([`ACTION_ERROR_PARAMS`]). (GET
//! requests that record an audit access are checked by `Sec-Fetch-Site` where they are served:
//! `gatehouse_portal_app::ssr::from_another_site`.)
//!
//! Pages and server functions answer with prompts, completions, names and keys shown once: every
//! response but a static file of the site ([`mark_static_file`]) is `Cache-Control: no-store`,
//! so that no browser or proxy cache keeps one after its user signed out.

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use url::Url;

/// The policy of responses that set none themselves (pages set theirs, with the nonce of their
/// hydration script): nothing runs, nothing frames the portal.
const DEFAULT_CSP: &str = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Wraps the router in the Origin check and the security headers.
pub fn layers(app: Router, public_url: &Url) -> Router {
    let origin = public_url.origin().ascii_serialization();
    let hsts = public_url.scheme() == "https";
    app.layer(middleware::from_fn(move |request: Request, next: Next| {
        let origin = origin.clone();
        async move { check_origin(&origin, request, next).await }
    }))
    .layer(middleware::from_fn({
        let origin = public_url.origin().ascii_serialization();
        move |request: Request, next: Next| {
            let origin = origin.clone();
            async move { drop_foreign_action_errors(&origin, request, next).await }
        }
    }))
    .layer(middleware::from_fn(arguments_refused_as_bad_request))
    .layer(middleware::from_fn(
        move |request: Request, next: Next| async move { headers(hsts, request, next).await },
    ))
}

/// The header `server_fn` puts on a server function's error response (`SERVER_FN_ERROR_HEADER`).
const SERVER_FN_ERROR_HEADER: &str = "serverfnerror";

/// How `server_fn` encodes an error in the request's arguments (`ServerFnErrorEncoding`): they
/// could not be read, one is missing, or the body could not be decoded.
const ARGUMENT_ERRORS: [&[u8]; 3] = [b"Args|", b"MissingArg|", b"Deserialization|"];

/// Answers 400 instead of `server_fn`'s 500 when a server function was called with arguments it
/// could not read (a form field missing or malformed, a body that is not the encoding): the
/// caller sent bad input, the portal did not fail. The body, `server_fn`'s encoded error naming
/// what was wrong, is kept so that the caller can read it.
async fn arguments_refused_as_bad_request(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    if response.status() != StatusCode::INTERNAL_SERVER_ERROR
        || !response.headers().contains_key(SERVER_FN_ERROR_HEADER)
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // The portal's own error answer, read whole (its length is the portal's, not a caller's).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        // A body that cannot be read: not one of these.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server function failed.",
        )
            .into_response();
    };
    if ARGUMENT_ERRORS
        .iter()
        .any(|prefix| bytes.starts_with(prefix))
    {
        parts.status = StatusCode::BAD_REQUEST;
    }
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// Refuses a state-changing request whose `Origin` is not the portal's own (a cross-site form
/// post or fetch). A request without `Origin` passes only if the browser says it is same-origin.
async fn check_origin(expected: &str, request: Request, next: Next) -> Response {
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let allowed = match headers.get(header::ORIGIN) {
        Some(origin) => origin.as_bytes() == expected.as_bytes(),
        None => headers
            .get("sec-fetch-site")
            .is_some_and(|site| site.as_bytes() == b"same-origin"),
    };
    if allowed {
        next.run(request).await
    } else {
        tracing::warn!(path = %request.uri().path(), "refused a cross-origin state-changing request");
        (
            StatusCode::FORBIDDEN,
            "Cross-origin requests that change state are refused.",
        )
            .into_response()
    }
}

/// The query parameters in which Leptos carries a server function's error to the page a form
/// without JavaScript returns to (`server_fn`'s `ServerFnUrlError`): the page shows it as that
/// action's error.
const ACTION_ERROR_PARAMS: [&str; 2] = ["__err", "__path"];

/// Redirects (303) a page request that carries a server function's error in its query
/// ([`ACTION_ERROR_PARAMS`]) to the same page without it, unless the browser says the request
/// came from the portal itself (`Sec-Fetch-Site: same-origin`, as after the portal's own form
/// post; a browser that sends no `Sec-Fetch-Site`: a `Referer` of the portal's origin): a link
/// from anywhere else (a mail, another site) could otherwise make a portal page show text of the
/// link's author's choosing as an error of the portal ("your key was leaked, call …").
async fn drop_foreign_action_errors(origin: &str, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let Some(query) = request.uri().query() else {
        return next.run(request).await;
    };
    let carries_error = url::form_urlencoded::parse(query.as_bytes())
        .any(|(key, _)| ACTION_ERROR_PARAMS.contains(&key.as_ref()));
    let headers = request.headers();
    let from_the_portal = match headers.get("sec-fetch-site") {
        Some(site) => site.as_bytes() == b"same-origin",
        None => headers
            .get(header::REFERER)
            .and_then(|referer| referer.to_str().ok())
            .and_then(|referer| Url::parse(referer).ok())
            .is_some_and(|referer| referer.origin().ascii_serialization() == origin),
    };
    if !carries_error || from_the_portal {
        return next.run(request).await;
    }
    let kept: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| !ACTION_ERROR_PARAMS.contains(&key.as_ref()))
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    let mut target = request.uri().path().to_owned();
    if !kept.is_empty() {
        target.push('?');
        target.push_str(
            &url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&kept)
                .finish(),
        );
    }
    match HeaderValue::from_str(&target) {
        Ok(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "Malformed query.").into_response(),
    }
}

/// Marks a response as one of the site's static files (`/pkg/…`, `/favicon.svg`): the same for
/// everyone, so that caches may keep it; every other response is `Cache-Control: no-store`.
#[derive(Debug, Clone, Copy)]
pub struct StaticFile;

/// `response` of the site's file handler (`leptos_axum::file_and_error_handler`), marked as a
/// static file when it is one: the handler answers 200 only with a file, and otherwise renders
/// its not-found page (404) or a redirect, which are not marked.
pub fn mark_static_file(mut response: Response) -> Response {
    if response.status() == StatusCode::OK {
        response.extensions_mut().insert(StaticFile);
    }
    response
}

async fn headers(hsts: bool, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let static_file = response.extensions().get::<StaticFile>().is_some();
    let headers = response.headers_mut();
    if !static_file {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(DEFAULT_CSP));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if hsts {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    response
}
