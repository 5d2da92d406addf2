//! Bearer-token authentication against the configured keys, compared in constant time.

use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The accepted API keys; none means the server is open.
#[derive(Clone)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self(keys.iter().filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()).collect())
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Accepts `Authorization: Bearer <key>` for a configured key (every key is compared, so
    /// the time taken does not say which one, or how much of one, matched).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        let matched =
            self.0.iter().fold(0u8, |found, key| found | key.as_slice().ct_eq(presented.as_bytes()).unwrap_u8());
        if matched == 1 {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
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

    #[test]
    fn accepts_configured_keys_only() {
        let keys = ApiKeys::new(&["alpha".into(), "beta".into()]);
        assert!(keys.check(&headers("Bearer beta")).is_ok());
        assert!(keys.check(&headers("Bearer gamma")).is_err());
        assert!(keys.check(&headers("beta")).is_err());
        assert!(keys.check(&HeaderMap::new()).is_err());
    }

    #[test]
    fn no_keys_means_open() {
        assert!(ApiKeys::new(&[]).check(&HeaderMap::new()).is_ok());
    }
}
