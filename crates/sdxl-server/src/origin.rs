//! What a web page the user visits may make this server do: nothing, unless the operator
//! allows its origin. Browsers send cross-site `POST`s with "simple" bodies (`text/plain`,
//! forms) without asking first, and a page can rebind its own DNS name to 127.0.0.1 to read
//! the answers. So, over every route:
//!
//! - `Host` must be an IP address (no DNS name to rebind), a loopback name (`localhost`,
//!   `*.localhost`), or a name the operator allowed (`--allowed-host`, the listen address
//!   among them); otherwise 421.
//! - A request that changes state (any method but GET, HEAD, OPTIONS) and carries `Origin`
//!   must come from this server's own origin (the playground) or one in `--cors-origin`;
//!   otherwise 403. `Origin: null` (sandboxed frames, files) is never allowed. Browsers that
//!   send no `Origin` but say `Sec-Fetch-Site: cross-site` are refused the same way.
//! - A browser's `POST` must declare `application/json`: a JSON body labelled `text/plain`
//!   or as a form is what a cross-site page sends to avoid a preflight, so it gets 415.
//!
//! Clients that are not browsers (curl, the SDKs) send no `Origin` and are unaffected.
//! Allowed origins get CORS answers, preflights included ([`cors_layer`]).

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::error::ApiError;
use crate::AppState;

/// The operator's allow-lists, normalised.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Lower-case host names (no port) accepted in `Host` besides IPs and loopback names;
    /// `*` accepts any.
    allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`, lower case) allowed to call from a browser.
    cors_origins: Vec<String>,
}

impl OriginPolicy {
    pub fn new(allowed_hosts: &[String], cors_origins: &[String]) -> Self {
        let host = |h: &String| strip_port(h.trim()).to_ascii_lowercase();
        let origin = |o: &String| o.trim().trim_end_matches('/').to_ascii_lowercase();
        Self {
            allowed_hosts: allowed_hosts.iter().map(host).filter(|h| !h.is_empty()).collect(),
            cors_origins: cors_origins.iter().map(origin).filter(|o| !o.is_empty()).collect(),
        }
    }

    /// Whether a `Host` header value names this server.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed_hosts.iter().any(|allowed| allowed == "*" || allowed == name)
    }

    /// Whether `origin` may make state-changing requests: this server's own (the same host
    /// and port as `Host`, over http or https, as behind a TLS proxy), or one the operator
    /// listed.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.cors_origins.contains(&origin) {
            return true;
        }
        let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        match (authority, host) {
            (Some(authority), Some(host)) => same_authority(authority, &host.to_ascii_lowercase(), &origin),
            _ => false,
        }
    }

    /// The checks above for one request, `Err` with the refusal.
    fn check(&self, method: &Method, headers: &HeaderMap, host: Option<&str>) -> Result<(), ApiError> {
        if let Some(host) = host.filter(|h| !self.host_allowed(h)) {
            return Err(ApiError::MisdirectedHost(format!(
                "this server does not answer for host {host:?}; the operator can allow it with --allowed-host"
            )));
        }
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return Ok(());
        }
        let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        match text(header::ORIGIN) {
            Some(origin) if !self.origin_allowed(origin, host) => {
                return Err(ApiError::Forbidden(format!(
                    "requests from origin {origin:?} are not allowed; the operator can allow it with --cors-origin"
                )))
            }
            None if text(HeaderName::from_static("sec-fetch-site")) == Some("cross-site") => {
                return Err(ApiError::Forbidden("cross-site browser requests are not allowed".into()))
            }
            _ => {}
        }
        let from_browser = headers.contains_key(header::ORIGIN) || headers.contains_key("sec-fetch-mode");
        if from_browser && *method == Method::POST {
            let declared = text(header::CONTENT_TYPE).unwrap_or("");
            let essence = declared.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if essence != "application/json" {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "a browser request's body must be declared `Content-Type: application/json`, got {declared:?}"
                )));
            }
        }
        Ok(())
    }
}

/// `host[:port]` → host (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether an origin's `authority` is `host` (the `Host` header): the same name and the same
/// port, with the scheme's default port spelt or not.
fn same_authority(authority: &str, host: &str, origin: &str) -> bool {
    let default_port = if origin.starts_with("https://") { "443" } else { "80" };
    let with_port = |a: &str| {
        let name = strip_port(a);
        if name.len() == a.len() {
            format!("{a}:{default_port}")
        } else {
            a.to_string()
        }
    };
    with_port(authority) == with_port(host)
}

/// The `Host` a request names: the header, or the URI's authority (HTTP/2).
fn request_host(request: &Request) -> Option<String> {
    match request.headers().get(header::HOST) {
        Some(value) => Some(value.to_str().unwrap_or("\u{fffd}").to_string()),
        None => request.uri().authority().map(|a| a.as_str().to_string()),
    }
}

/// The layer over every route: refuses what [`OriginPolicy`] refuses, in the route's API's
/// envelope.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let host = request_host(&request);
    match state.inner.origins.check(request.method(), request.headers(), host.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.render_for(request.uri().path()),
    }
}

/// CORS for the operator's `--cors-origin`s (none: no CORS headers at all, so browsers keep
/// other origins' pages from reading answers).
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> =
        origins.iter().filter_map(|o| HeaderValue::from_str(o.trim().trim_end_matches('/')).ok()).collect();
    if origins.is_empty() {
        return None;
    }
    let exposed = ["x-seed", "x-queue-time-ms", "x-inference-time-ms", "retry-after", "location"];
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers(exposed.map(HeaderName::from_static))
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn hosts_are_addresses_loopback_names_or_allowed() {
        let policy = OriginPolicy::new(&["Images.Example.com".into(), "gpu-box:8080".into()], &[]);
        for host in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost",
            "images.example.com",
            "gpu-box",
            "gpu-box:9000",
            "localhost.",
        ] {
            assert!(policy.host_allowed(host), "{host}");
        }
        for host in
            ["attacker.example", "localhost.attacker.example", "127.0.0.1.nip.io", "images.example.com.evil", ""]
        {
            assert!(!policy.host_allowed(host), "{host}");
        }
        assert!(OriginPolicy::new(&["*".into()], &[]).host_allowed("anything.example"));
    }

    #[test]
    fn browsers_may_post_from_the_servers_own_origin_or_an_allowed_one() {
        let policy = OriginPolicy::new(&[], &["https://app.example".into()]);
        let json = ("content-type", "application/json");
        let post =
            |pairs: &[(&'static str, &str)], host: &str| policy.check(&Method::POST, &headers(pairs), Some(host));
        // no Origin: not a browser (curl, SDKs), any content type
        assert!(post(&[("content-type", "application/x-www-form-urlencoded")], "127.0.0.1:8080").is_ok());
        assert!(post(&[("origin", "http://127.0.0.1:8080"), json], "127.0.0.1:8080").is_ok(), "the playground");
        assert!(post(&[("origin", "http://localhost"), json], "localhost:80").is_ok(), "default port");
        assert!(post(&[("origin", "https://app.example"), json], "127.0.0.1:8080").is_ok(), "--cors-origin");
        // either scheme: behind a TLS proxy the page is https, and its authority is still ours
        assert!(post(&[("origin", "https://127.0.0.1:8080"), json], "127.0.0.1:8080").is_ok());
        for origin in ["http://evil.example", "null", "http://127.0.0.1:9999", "ftp://127.0.0.1:8080"] {
            let refused = post(&[("origin", origin), json], "127.0.0.1:8080");
            assert!(matches!(refused, Err(ApiError::Forbidden(_))), "{origin}");
        }
        let delete = policy.check(&Method::DELETE, &headers(&[("origin", "http://evil.example")]), Some("localhost"));
        assert!(matches!(delete, Err(ApiError::Forbidden(_))));
        let fetch_only = post(&[("sec-fetch-site", "cross-site"), json], "127.0.0.1:8080");
        assert!(matches!(fetch_only, Err(ApiError::Forbidden(_))));
        assert!(policy.check(&Method::GET, &headers(&[("origin", "http://evil.example")]), Some("localhost")).is_ok());
    }

    #[test]
    fn browser_bodies_must_be_declared_json() {
        let policy = OriginPolicy::new(&[], &[]);
        let own = ("origin", "http://127.0.0.1:8080");
        for declared in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            let refused =
                policy.check(&Method::POST, &headers(&[own, ("content-type", declared)]), Some("127.0.0.1:8080"));
            assert!(matches!(refused, Err(ApiError::UnsupportedMediaType(_))), "{declared:?}");
        }
        let json = headers(&[own, ("content-type", "Application/JSON; charset=utf-8")]);
        assert!(policy.check(&Method::POST, &json, Some("127.0.0.1:8080")).is_ok());
    }

    #[test]
    fn a_foreign_host_is_misdirected_on_every_method() {
        let policy = OriginPolicy::new(&[], &[]);
        let refused = policy.check(&Method::GET, &HeaderMap::new(), Some("rebound.attacker.example:8080"));
        assert!(matches!(refused, Err(ApiError::MisdirectedHost(_))));
        assert!(policy.check(&Method::GET, &HeaderMap::new(), None).is_ok(), "HTTP/1.0 without Host");
    }
}
