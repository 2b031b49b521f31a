//! Security headers on every response and the Origin check on state-changing requests. (GET
//! requests that record an audit access are checked by `Sec-Fetch-Site` where they are served:
//! `gatehouse_portal_app::ssr::from_another_site`.)

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
    .layer(middleware::from_fn(
        move |request: Request, next: Next| async move { headers(hsts, request, next).await },
    ))
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

async fn headers(hsts: bool, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
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
