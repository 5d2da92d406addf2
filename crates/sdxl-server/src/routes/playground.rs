//! `GET /`: the playground page, and its script and style sheet. Hand-written files embedded
//! in the binary, so the page works offline and needs nothing beside the server. Served with
//! a Content-Security-Policy that allows this server's own scripts, styles and API only (and
//! the page's own `blob:` results, which a script reading the result fetches; no
//! inline script, no framing), `nosniff` and no referrer.

use axum::http::header::{self, HeaderName};
use axum::response::IntoResponse;

/// Every playground response's security headers.
const SECURITY_HEADERS: [(HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
         connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::X_FRAME_OPTIONS, "DENY"),
];

fn with_security_headers(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (SECURITY_HEADERS, [(header::CONTENT_TYPE, content_type)], body)
}

pub async fn page() -> impl IntoResponse {
    with_security_headers("text/html; charset=utf-8", include_str!("../playground/index.html"))
}

pub async fn script() -> impl IntoResponse {
    with_security_headers("text/javascript; charset=utf-8", include_str!("../playground/app.js"))
}

pub async fn style() -> impl IntoResponse {
    with_security_headers("text/css; charset=utf-8", include_str!("../playground/style.css"))
}
