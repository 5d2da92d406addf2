//! API keys as one layer over the protected routes: [`require_key`] reads the key from
//! `Authorization: Bearer KEY` (scheme in any case) or `Authorization: Basic base64(user:KEY)`
//! (AUTOMATIC1111 clients send Basic; the user name is ignored), compares its SHA-256 digest
//! with every configured key's in constant time (equal lengths, so neither which key nor how
//! long one is shows in the time taken), and hands the handler the request's [`Owner`].

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// The accepted API keys, as digests; none means the server is open.
#[derive(Clone)]
pub struct ApiKeys(Vec<[u8; 32]>);

/// Who a request is for: the owner of the jobs it stores and of its share of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// A hash of the key (never the key), or [`ANONYMOUS`] on an open server.
    id: Arc<str>,
}

/// The one owner of every request on a server without keys.
pub const ANONYMOUS: &str = "anonymous";

impl Owner {
    /// The owner on a server without keys.
    pub fn anonymous() -> Self {
        Self { id: ANONYMOUS.into() }
    }

    /// The owner that `key` stands for: a SHA-256 of the key under this server's own prefix,
    /// so the stored value is not the digest the keys are compared by.
    pub fn of_key(key: &str) -> Self {
        let digest = Sha256::new().chain_update(b"sdxl job owner\0").chain_update(key.as_bytes()).finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Self { id: hex.into() }
    }

    /// What the job store records.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this is the anonymous owner of an open server.
    pub fn is_anonymous(&self) -> bool {
        &*self.id == ANONYMOUS
    }

    /// The name the queue counts this owner's waiting jobs under: none on an open server,
    /// whose one client may use the whole queue.
    pub fn queue_share(&self) -> Option<Arc<str>> {
        (!self.is_anonymous()).then(|| self.id.clone())
    }

    /// Whether a stored job with owner `stored` is this owner's. Jobs stored before jobs had
    /// owners (`None`) belong to the anonymous owner of an open server only.
    pub fn owns(&self, stored: Option<&str>) -> bool {
        match stored {
            Some(stored) => stored == &*self.id,
            None => self.is_anonymous(),
        }
    }
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self(keys.iter().filter(|k| !k.is_empty()).map(|k| digest(k.as_bytes())).collect())
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// The owner of a request with these headers, or 401 if a key is needed and none of the
    /// configured ones was given.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Owner, ApiError> {
        if !self.enabled() {
            return Ok(Owner::anonymous());
        }
        let presented = presented_key(headers).ok_or(ApiError::Unauthorized)?;
        let presented_digest = digest(presented.as_bytes());
        // every key is compared, so the time taken does not say which one matched
        let matched = self.0.iter().fold(0u8, |found, key| found | key.ct_eq(&presented_digest).unwrap_u8());
        if matched == 1 {
            Ok(Owner::of_key(&presented))
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The key in `Authorization`: `Bearer KEY`, or `Basic base64(user:KEY)`.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, credentials) = value.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(credentials.to_string())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(credentials).ok()?;
        let (_user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some(password.to_string())
    } else {
        None
    }
}

/// The layer over every protected route: 401 (in the route's API's envelope) without a
/// configured key; otherwise the request goes on with its [`Owner`] as an extension.
pub async fn require_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match state.inner.keys.authenticate(request.headers()) {
        Ok(owner) => {
            request.extensions_mut().insert(owner);
            next.run(request).await
        }
        Err(e) => e.render_for(request.uri().path()),
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic(user_and_password: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_and_password))
    }

    #[test]
    fn accepts_configured_keys_only() {
        let keys = ApiKeys::new(&["alpha".into(), "beta".into()]);
        assert_eq!(keys.authenticate(&headers("Bearer beta")).unwrap(), Owner::of_key("beta"));
        for refused in ["Bearer gamma", "beta", "Bearer ", "Bearer alph", "Bearer alphaa", "Token beta"] {
            assert!(keys.authenticate(&headers(refused)).is_err(), "{refused}");
        }
        assert!(keys.authenticate(&HeaderMap::new()).is_err());
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_basic_carries_the_key_as_password() {
        let keys = ApiKeys::new(&["alpha".into()]);
        for accepted in ["bearer alpha", "BEARER alpha", "Bearer  alpha ", &basic("webui:alpha"), &basic(":alpha")] {
            assert_eq!(keys.authenticate(&headers(accepted)).unwrap(), Owner::of_key("alpha"), "{accepted}");
        }
        for refused in [basic("alpha:"), basic("alpha"), basic("user:beta"), "Basic not-base64!".into()] {
            assert!(keys.authenticate(&headers(&refused)).is_err(), "{refused}");
        }
    }

    #[test]
    fn owners_are_hashes_of_their_keys() {
        let (a, b) = (Owner::of_key("alpha"), Owner::of_key("beta"));
        assert_ne!(a, b);
        assert_eq!(a.id().len(), 64);
        assert!(!a.id().contains("alpha"));
        assert!(a.owns(Some(a.id())) && !a.owns(Some(b.id())));
        assert!(!a.owns(None), "jobs from before owners are not a key's");
        assert!(Owner::anonymous().owns(None), "but an open server's");
        assert!(!Owner::anonymous().owns(Some(a.id())));
        assert_eq!(a.queue_share().as_deref(), Some(a.id()));
        assert_eq!(Owner::anonymous().queue_share(), None, "one client may use the whole open queue");
    }

    #[test]
    fn no_keys_means_open() {
        assert_eq!(ApiKeys::new(&[]).authenticate(&HeaderMap::new()).unwrap(), Owner::anonymous());
    }
}
