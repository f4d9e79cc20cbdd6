//! The headers that say how a response was served: `x-parking` and RFC 9211 `Cache-Status`.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::HttpConfig;
use crate::Outcome;

/// The default name of the outcome header.
pub const PARKING_HEADER: HeaderName = HeaderName::from_static("x-parking");

const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Adds the configured status headers for `outcome` to `headers`.
pub(crate) fn mark(http: &HttpConfig, headers: &mut HeaderMap, outcome: Outcome) {
    if let Some(header) = &http.status_header {
        headers.insert(header.clone(), HeaderValue::from_static(outcome.as_str()));
    }
    if http.cache_status {
        headers.insert(
            CACHE_STATUS,
            HeaderValue::from_static(cache_status(outcome)),
        );
    }
}

/// The `Cache-Status` entry of an outcome (RFC 9211 §2): a hit, or why and how the request went
/// forward.
fn cache_status(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Hit => "tower-parking; hit",
        Outcome::Miss => "tower-parking; fwd=uri-miss",
        Outcome::Coalesced | Outcome::Parked => "tower-parking; fwd=uri-miss; collapsed",
        Outcome::Bypass => "tower-parking; fwd=bypass",
        Outcome::Pass => "tower-parking; fwd=bypass; detail=pass",
        Outcome::Revalidated => "tower-parking; fwd=stale; fwd-status=304",
        Outcome::Timeout => "tower-parking; fwd=miss; detail=wait-timeout",
        Outcome::Stale => "tower-parking; hit; detail=stale",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_a_cache_status_that_names_no_key() {
        for outcome in Outcome::ALL {
            let status = cache_status(outcome);
            assert!(status.starts_with("tower-parking"), "{outcome}");
            assert!(HeaderValue::from_str(status).is_ok());
        }
        assert_eq!(cache_status(Outcome::Hit), "tower-parking; hit");
    }
}
