//! Which requests are parked, which responses may reach a request other than their own, and what
//! a write invalidates (RFC 9110 §9.3, §13, §14; RFC 9111 §4).

use std::sync::Arc;

use http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode, Uri};

/// Decides, from the head of a response, whether it may be shared with the other requests of its
/// key and kept for later ones. Like tower-http's `compress_when`; the default is
/// [`DefaultSharing`].
///
/// Whatever the predicate says, a response is never shared when the cache rules forbid it
/// (`private`, `no-store`, `Set-Cookie`, `Vary: *`): it can only make sharing stricter.
///
/// ```
/// use tower_parking::{sharing::{DefaultSharing, NotForContentType, SharePredicate}, ParkingLayer};
///
/// // Never share PDFs, on top of the defaults.
/// let layer = ParkingLayer::new()
///     .share_when(DefaultSharing.and(NotForContentType::const_new("application/pdf")));
/// # drop(layer);
/// ```
pub trait SharePredicate: Send + Sync + 'static {
    /// Whether the response with this head may be shared.
    fn should_share(&self, response: &http::response::Parts) -> bool;

    /// Both this predicate and `other` must agree.
    fn and<Other: SharePredicate>(self, other: Other) -> And<Self, Other>
    where
        Self: Sized,
    {
        And(self, other)
    }
}

impl<F> SharePredicate for F
where
    F: Fn(&http::response::Parts) -> bool + Send + Sync + 'static,
{
    fn should_share(&self, response: &http::response::Parts) -> bool {
        self(response)
    }
}

/// Two predicates that must both agree: made by [`SharePredicate::and`].
#[derive(Debug, Clone, Copy)]
pub struct And<A, B>(A, B);

impl<A: SharePredicate, B: SharePredicate> SharePredicate for And<A, B> {
    fn should_share(&self, response: &http::response::Parts) -> bool {
        self.0.should_share(response) && self.1.should_share(response)
    }
}

/// The default: shares full answers only. Never an informational (`1xx`) response, a partial
/// (`206`) or a `304`, a response that switches protocols or streams by nature
/// (`text/event-stream`, `application/grpc*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultSharing;

impl SharePredicate for DefaultSharing {
    fn should_share(&self, response: &http::response::Parts) -> bool {
        let status = response.status;
        !(status.is_informational()
            || status == StatusCode::PARTIAL_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || is_stream(&response.headers))
    }
}

/// Not for responses whose `Content-Type` starts with this type.
#[derive(Debug, Clone, Copy)]
pub struct NotForContentType(&'static str);

impl NotForContentType {
    /// Refuses responses whose content type starts with `content_type` (ASCII case-insensitive).
    pub const fn const_new(content_type: &'static str) -> Self {
        Self(content_type)
    }
}

impl SharePredicate for NotForContentType {
    fn should_share(&self, response: &http::response::Parts) -> bool {
        !content_type_starts_with(&response.headers, self.0)
    }
}

fn content_type_starts_with(headers: &HeaderMap, prefix: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.len() >= prefix.len() && value[..prefix.len()].eq_ignore_ascii_case(prefix)
        })
}

/// Whether a response's head says its body is a stream that must reach its caller as it comes.
fn is_stream(headers: &HeaderMap) -> bool {
    content_type_starts_with(headers, "text/event-stream")
        || content_type_starts_with(headers, "application/grpc")
}

pub(crate) type SharedPredicate = Arc<dyn SharePredicate>;

/// Whether a request asks to switch protocols or open a tunnel: it must reach the inner service
/// as it is, and its response must reach it untouched.
pub(crate) fn is_upgrade(parts: &Parts) -> bool {
    parts.method == Method::CONNECT
        || parts.headers.contains_key(header::UPGRADE)
        || parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Whether a request's preconditions are for the origin alone to judge (`If-Match`,
/// `If-Unmodified-Since`): such a request goes straight through.
pub(crate) fn has_origin_preconditions(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_UNMODIFIED_SINCE)
}

/// A request's own conditions and range, taken off it so that the run it shares with others is
/// the plain one; each caller's answer is then derived from the shared full response.
#[derive(Debug, Default)]
pub(crate) struct Conditions {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
}

impl Conditions {
    /// Takes `If-None-Match`, `If-Modified-Since`, `Range` and `If-Range` off `headers`. A
    /// `Range` request then gets the full response, which RFC 9110 §14.2 allows.
    pub(crate) fn take(headers: &mut HeaderMap) -> Self {
        headers.remove(header::RANGE);
        headers.remove(header::IF_RANGE);
        Self {
            if_none_match: headers.remove(header::IF_NONE_MATCH),
            if_modified_since: headers.remove(header::IF_MODIFIED_SINCE),
        }
    }

    /// Whether this request's conditions make `304 Not Modified` its answer to a response with
    /// this status and headers (RFC 9110 §13.1.2, §13.1.3, §13.2.2).
    pub(crate) fn not_modified(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        if status != StatusCode::OK {
            return false;
        }
        if let Some(if_none_match) = &self.if_none_match {
            let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return false;
            };
            let Ok(candidates) = if_none_match.to_str() else {
                return false;
            };
            return candidates.trim() == "*"
                || entity_tags(candidates).any(|tag| weak_match(tag, etag));
        }
        let date = |value: &HeaderValue| httpdate::parse_http_date(value.to_str().ok()?).ok();
        let Some(since) = self.if_modified_since.as_ref().and_then(date) else {
            return false;
        };
        headers
            .get(header::LAST_MODIFIED)
            .and_then(date)
            .is_some_and(|modified| modified <= since)
    }
}

/// The entity tags of an `If-None-Match` list (commas inside quotes belong to a tag).
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([',', ' ', '\t']);
        if rest.is_empty() {
            return None;
        }
        let opaque_start = if rest.starts_with("W/") { 2 } else { 0 };
        let end = if rest[opaque_start..].starts_with('"') {
            rest[opaque_start + 1..]
                .find('"')
                .map_or(rest.len(), |close| opaque_start + close + 2)
        } else {
            rest.find(',').unwrap_or(rest.len())
        };
        let (tag, after) = rest.split_at(end);
        rest = after;
        Some(tag.trim())
    })
}

/// Weak comparison (RFC 9110 §8.8.3.2): equal opaque tags, whether either is weak or not.
fn weak_match(a: &str, b: &str) -> bool {
    fn opaque(tag: &str) -> &str {
        tag.trim().trim_start_matches("W/")
    }
    opaque(a) == opaque(b)
}

/// The `304 Not Modified` answer to a conditional request, from the full response's head
/// (RFC 9110 §15.4.5: the fields a `200` would carry, no content).
pub(crate) fn not_modified_head(mut headers: HeaderMap) -> HeaderMap {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::TRANSFER_ENCODING);
    headers
}

/// The URIs a successful write invalidates beside its own (RFC 9111 §4.4): `Location` and
/// `Content-Location`, when on the request's own authority.
pub(crate) fn invalidated_locations(request: &Parts, response: &HeaderMap) -> Vec<Uri> {
    let own_authority = crate::key::effective_uri(request);
    let own_authority = own_authority
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    [header::LOCATION, header::CONTENT_LOCATION]
        .iter()
        .filter_map(|name| response.get(name)?.to_str().ok()?.parse::<Uri>().ok())
        .filter(|uri| match uri.authority() {
            Some(authority) => authority.as_str().eq_ignore_ascii_case(own_authority),
            None => uri.path().starts_with('/'),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    fn conditions(pairs: &[(&'static str, &'static str)]) -> Conditions {
        Conditions::take(&mut headers(pairs))
    }

    #[test]
    fn if_none_match_compares_weakly_and_takes_precedence() {
        let response = headers(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        let ok = StatusCode::OK;
        assert!(conditions(&[("if-none-match", "\"v1\"")]).not_modified(ok, &response));
        assert!(conditions(&[("if-none-match", "\"x\", W/\"v1\"")]).not_modified(ok, &response));
        assert!(conditions(&[("if-none-match", "*")]).not_modified(ok, &response));
        assert!(!conditions(&[("if-none-match", "\"v2\"")]).not_modified(ok, &response));
        assert!(
            !conditions(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Tue, 01 Dec 2026 11:00:00 GMT")
            ])
            .not_modified(ok, &response),
            "If-Modified-Since is ignored when If-None-Match is present"
        );
        assert!(!conditions(&[("if-none-match", "\"v1\"")])
            .not_modified(StatusCode::NOT_FOUND, &response));
    }

    #[test]
    fn if_modified_since_compares_dates() {
        let response = headers(&[("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT")]);
        let ok = StatusCode::OK;
        let since = |date| conditions(&[("if-modified-since", date)]).not_modified(ok, &response);
        assert!(since("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert!(since("Tue, 01 Dec 2026 11:00:00 GMT"));
        assert!(!since("Tue, 01 Dec 2026 09:59:59 GMT"));
        assert!(!since("not a date"));
        assert!(!conditions(&[]).not_modified(ok, &response));
    }

    #[test]
    fn taking_conditions_leaves_the_plain_request() {
        let mut request = headers(&[
            ("if-none-match", "\"v1\""),
            ("range", "bytes=0-3"),
            ("if-range", "\"v1\""),
            ("accept", "*/*"),
        ]);
        let taken = Conditions::take(&mut request);
        assert!(taken.if_none_match.is_some());
        assert_eq!(request, headers(&[("accept", "*/*")]));
    }

    #[test]
    fn the_default_predicate_shares_full_answers_only() {
        let share = |status: u16, content_type: &'static str| {
            let mut response = http::Response::new(());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            DefaultSharing.should_share(&response.into_parts().0)
        };
        assert!(share(200, "text/html"));
        assert!(share(404, "text/html"));
        for status in [101, 103, 206, 304] {
            assert!(!share(status, "text/html"), "{status}");
        }
        assert!(!share(200, "text/event-stream; charset=utf-8"));
        assert!(!share(200, "application/grpc+proto"));
        let no_pdf = DefaultSharing.and(NotForContentType::const_new("application/pdf"));
        let mut response = http::Response::new(());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/PDF"),
        );
        assert!(!no_pdf.should_share(&response.into_parts().0));
    }

    #[test]
    fn upgrades_and_writes_are_told_apart() {
        let parts = |request: http::request::Builder| request.body(()).unwrap().into_parts().0;
        assert!(is_upgrade(&parts(
            http::Request::get("/ws")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
        )));
        assert!(is_upgrade(&parts(
            http::Request::builder().method(Method::CONNECT).uri("/")
        )));
        assert!(!is_upgrade(&parts(http::Request::get("/"))));
    }

    #[test]
    fn writes_invalidate_locations_on_their_own_authority_only() {
        let request = http::Request::post("/items")
            .header("host", "acme.example")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let response = headers(&[
            ("location", "http://ACME.example/items/7"),
            ("content-location", "http://globex.example/items/7"),
        ]);
        let uris = invalidated_locations(&request, &response);
        assert_eq!(uris, [Uri::from_static("http://ACME.example/items/7")]);
        let relative = headers(&[("location", "/items/8")]);
        assert_eq!(
            invalidated_locations(&request, &relative),
            [Uri::from_static("/items/8")]
        );
    }
}
