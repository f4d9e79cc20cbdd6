//! Keys: which requests ask the same question.
//!
//! A [`Key`] names one piece of work. Requests with equal keys share one run of the handler and
//! its response, so a key must hold everything that can change the response. It has two parts:
//!
//! - the **URI part** names the resource (scheme, authority, path, query): a write to the
//!   resource drops every stored response whose key has its URI part;
//! - the **variant part** separates the answers to different askers of one resource: method,
//!   a hash of the credentials, and the values of the request headers the response's `Vary`
//!   names.
//!
//! The default, [`PerUser`], holds the whole URI and a hash of the caller's credentials
//! (`Authorization`, `Cookie`, `Proxy-Authorization`, `X-Api-Key`): two users never share a
//! response unless you choose a key function that says they may.

use std::{fmt, sync::Arc};

use http::{header, request::Parts, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

/// The name of one piece of work: callers with equal keys share its result.
///
/// Any string is a valid key. Backends that store keys outside the process (Redis) use SHA-256
/// digests of its parts, never the raw text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The URI part followed by the variant part: one allocation per key, built on every request.
    text: Arc<str>,
    /// Where the variant part starts in `text`.
    split: usize,
}

impl Key {
    /// A key made of this text, as its URI part, with no variant part.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        let text = key.into();
        Self {
            split: text.len(),
            text,
        }
    }

    /// A key with a URI part (what a write to the resource invalidates) and a variant part (what
    /// separates the answers to different askers).
    pub fn with_variant(uri: impl AsRef<str>, variant: impl AsRef<str>) -> Self {
        let (uri, variant) = (uri.as_ref(), variant.as_ref());
        let mut text = String::with_capacity(uri.len() + variant.len());
        text.push_str(uri);
        text.push_str(variant);
        Self::from_parts(text, uri.len())
    }

    fn from_parts(text: String, split: usize) -> Self {
        Self {
            text: text.into(),
            split,
        }
    }

    /// The URI part.
    pub fn uri_part(&self) -> &str {
        &self.text[..self.split]
    }

    /// The variant part (empty for keys made with [`Key::new`]).
    pub fn variant_part(&self) -> &str {
        &self.text[self.split..]
    }

    /// This key with `extra` added to its variant part.
    pub fn refined(&self, extra: &str) -> Self {
        Self::from_parts(format!("{} {extra}", self.text), self.split)
    }

    /// The first 128 bits of the SHA-256 digest of the URI part, in lowercase hex (32
    /// characters): the stable name under which backends outside the process group the variants
    /// of one resource.
    pub fn uri_digest_hex(&self) -> String {
        hex_digest(&[self.uri_part().as_bytes()], 16)
    }

    /// The first 128 bits of the SHA-256 digest of the variant part, in lowercase hex.
    pub fn variant_digest_hex(&self) -> String {
        hex_digest(&[self.variant_part().as_bytes()], 16)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.variant_part().is_empty() {
            f.write_str(self.uri_part())
        } else {
            write!(f, "{} #{}", self.uri_part(), self.variant_part())
        }
    }
}

impl From<&str> for Key {
    fn from(key: &str) -> Self {
        Self::new(key)
    }
}

impl From<String> for Key {
    fn from(key: String) -> Self {
        Self::new(key)
    }
}

/// SHA-256 of the parts (each length-prefixed, so `["ab", "c"]` and `["a", "bc"]` differ),
/// truncated to `bytes` bytes, in lowercase hex.
pub(crate) fn hex_digest(parts: &[&[u8]], bytes: usize) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(bytes * 2);
    for byte in &digest[..bytes] {
        out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// Derives the [`Key`] of a request from its head. `None` lets the request through unparked.
///
/// Implemented by every `Fn(&Parts) -> Option<Key>` closure, and by the built-in [`PerUser`]
/// (the default), [`SharedAcrossUsers`] and [`ByHeader`].
///
/// The layer also asks it for the key of a write (`POST`, `PUT`, `PATCH`, `DELETE`) that
/// succeeded, and drops every stored response whose key has the same URI part.
///
/// ```
/// use tower_parking::{Key, KeyFn};
///
/// // One key per tenant and path; requests without a tenant are not parked.
/// let by_tenant = |parts: &http::request::Parts| {
///     let tenant = parts.headers.get("x-tenant")?.to_str().ok()?;
///     Some(Key::new(format!("{tenant} {}", parts.uri.path())))
/// };
/// let request = http::Request::get("/report").header("x-tenant", "acme").body(()).unwrap();
/// let (parts, _) = request.into_parts();
/// assert_eq!(by_tenant.key(&parts), Some(Key::new("acme /report")));
/// ```
pub trait KeyFn: Send + Sync + 'static {
    /// The key of the request with this head, or `None` to bypass parking.
    fn key(&self, parts: &Parts) -> Option<Key>;

    /// Whether the key separates every set of credentials (`Authorization` among them), so that a
    /// response to an authenticated request is only ever reused for the same credentials.
    ///
    /// When it does not (the default), a response to a request with `Authorization` is stored
    /// only if it says it may be (`public`, `s-maxage` or `must-revalidate`, RFC 9111 §3.5).
    fn separates_credentials(&self) -> bool {
        false
    }
}

impl<F> KeyFn for F
where
    F: Fn(&Parts) -> Option<Key> + Send + Sync + 'static,
{
    fn key(&self, parts: &Parts) -> Option<Key> {
        self(parts)
    }
}

/// The request headers that carry credentials in common apps, hashed into [`PerUser`] keys.
pub const CREDENTIAL_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::COOKIE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
];

/// The default key: the URI (scheme, authority, path, query), the method, and a hash of the
/// credential headers ([`CREDENTIAL_HEADERS`]: `Authorization`, `Cookie`, `Proxy-Authorization`,
/// `X-Api-Key`).
///
/// Two requests share a response only if they come with the same credentials, so one user's
/// response never reaches another user. Anonymous requests (none of the headers) share with each
/// other. An app that authenticates with another header adds it with
/// [`with_header`](PerUser::with_header).
#[derive(Debug, Clone, Copy, Default)]
pub struct PerUser;

impl PerUser {
    /// [`PerUser`] that also hashes `header` into the key.
    ///
    /// ```
    /// use tower_parking::{ParkingLayer, PerUser};
    ///
    /// let layer = ParkingLayer::new().key(PerUser.with_header("x-session".parse().unwrap()));
    /// # drop(layer);
    /// ```
    pub fn with_header(self, header: HeaderName) -> PerUserWith {
        PerUserWith(Vec::new()).with_header(header)
    }
}

impl KeyFn for PerUser {
    fn key(&self, parts: &Parts) -> Option<Key> {
        Some(request_key(
            parts,
            "user",
            &hash_headers(parts, &CREDENTIAL_HEADERS, &[]),
        ))
    }

    fn separates_credentials(&self) -> bool {
        true
    }
}

/// [`PerUser`] with more credential headers: made by [`PerUser::with_header`].
#[derive(Debug, Clone)]
pub struct PerUserWith(Vec<HeaderName>);

impl PerUserWith {
    /// Also hashes `header` into the key.
    pub fn with_header(mut self, header: HeaderName) -> Self {
        if !self.0.contains(&header) && !CREDENTIAL_HEADERS.contains(&header) {
            self.0.push(header);
        }
        self
    }
}

impl KeyFn for PerUserWith {
    fn key(&self, parts: &Parts) -> Option<Key> {
        Some(request_key(
            parts,
            "user",
            &hash_headers(parts, &CREDENTIAL_HEADERS, &self.0),
        ))
    }

    fn separates_credentials(&self) -> bool {
        true
    }
}

/// The URI and the method only: every user shares one response per URL.
///
/// Use it only for routes whose response does not depend on who asks (public data, a token
/// shared by the whole service).
#[derive(Debug, Clone, Copy, Default)]
pub struct SharedAcrossUsers;

impl KeyFn for SharedAcrossUsers {
    fn key(&self, parts: &Parts) -> Option<Key> {
        Some(request_key(parts, "shared", ""))
    }
}

/// The URI, the method and the value of one header (a tenant, an API key): requests share a
/// response when that header is equal (or absent in both).
///
/// The header's value enters the key as a hash, never as text.
#[derive(Debug, Clone)]
pub struct ByHeader(HeaderName);

impl ByHeader {
    /// Keys by the value of `header`.
    pub fn new(header: HeaderName) -> Self {
        Self(header)
    }
}

impl KeyFn for ByHeader {
    fn key(&self, parts: &Parts) -> Option<Key> {
        let value = hash_headers(parts, std::slice::from_ref(&self.0), &[]);
        Some(request_key(parts, self.0.as_str(), &value))
    }
}

/// The effective request URI, `scheme://authority/path?query`, whatever the HTTP version: an
/// HTTP/1 request names its authority in `Host`, an HTTP/2 one in the URI.
pub(crate) fn effective_uri(parts: &Parts) -> String {
    effective_uri_of(&parts.uri, &parts.headers)
}

/// [`effective_uri`] of a request's URI and fields.
pub(crate) fn effective_uri_of(uri: &http::Uri, headers: &HeaderMap) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
        })
        .unwrap_or("");
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut effective =
        String::with_capacity(scheme.len() + 3 + authority.len() + path_and_query.len() + 32);
    effective.push_str(scheme);
    effective.push_str("://");
    effective.extend(authority.chars().map(|c| c.to_ascii_lowercase()));
    effective.push_str(path_and_query);
    effective
}

/// URI part: the effective URI. Variant part: `METHOD scope:extra`, so keys from different
/// functions never collide.
fn request_key(parts: &Parts, scope: &str, extra: &str) -> Key {
    use std::fmt::Write;
    let mut text = effective_uri(parts);
    let split = text.len();
    let _ = write!(text, "{} {scope}:{extra}", parts.method);
    Key::from_parts(text, split)
}

/// A hash of every value of these headers, or an empty string when none is present.
fn hash_headers(parts: &Parts, names: &[HeaderName], more: &[HeaderName]) -> String {
    let names = || names.iter().chain(more);
    if names().all(|name| !parts.headers.contains_key(name)) {
        return String::new();
    }
    fields_digest(&parts.headers, names().map(HeaderName::as_str))
}

/// A digest of these fields, each name followed by every value it has in `headers`.
pub(crate) fn fields_digest<'n>(
    headers: &HeaderMap,
    names: impl IntoIterator<Item = &'n str>,
) -> String {
    let mut parts: Vec<&[u8]> = Vec::new();
    for name in names {
        parts.push(name.as_bytes());
        parts.extend(headers.get_all(name).iter().map(|v| v.as_bytes()));
    }
    hex_digest(&parts, 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(builder: http::request::Builder) -> Parts {
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn per_user_separates_credentials_and_keeps_path_and_query() {
        let alice = parts(http::Request::get("/a?x=1").header("authorization", "Bearer alice"));
        let alice_again =
            parts(http::Request::get("/a?x=1").header("authorization", "Bearer alice"));
        let bob = parts(http::Request::get("/a?x=1").header("authorization", "Bearer bob"));
        let anonymous = parts(http::Request::get("/a?x=1"));
        let other_query =
            parts(http::Request::get("/a?x=2").header("authorization", "Bearer alice"));
        let cookie = parts(http::Request::get("/a?x=1").header("cookie", "session=alice"));

        let key = |p: &Parts| PerUser.key(p).unwrap();
        assert_eq!(key(&alice), key(&alice_again));
        assert_ne!(key(&alice), key(&bob));
        assert_ne!(key(&alice), key(&anonymous));
        assert_ne!(key(&alice), key(&other_query));
        assert_ne!(key(&cookie), key(&anonymous));
        assert!(
            !key(&alice).to_string().contains("alice"),
            "credentials never enter a key as text"
        );
    }

    #[test]
    fn shared_across_users_ignores_credentials_but_not_method() {
        let alice = parts(http::Request::get("/a").header("authorization", "alice"));
        let bob = parts(http::Request::get("/a").header("authorization", "bob"));
        let head = parts(http::Request::head("/a"));
        assert_eq!(SharedAcrossUsers.key(&alice), SharedAcrossUsers.key(&bob));
        assert_ne!(SharedAcrossUsers.key(&alice), SharedAcrossUsers.key(&head));
        assert_ne!(
            SharedAcrossUsers.key(&alice),
            PerUser.key(&parts(http::Request::get("/a")))
        );
    }

    #[test]
    fn by_header_keys_by_that_header_only() {
        let by_tenant = ByHeader::new(HeaderName::from_static("x-tenant"));
        let acme = parts(
            http::Request::get("/a")
                .header("x-tenant", "acme")
                .header("authorization", "1"),
        );
        let acme2 = parts(
            http::Request::get("/a")
                .header("x-tenant", "acme")
                .header("authorization", "2"),
        );
        let globex = parts(http::Request::get("/a").header("x-tenant", "globex"));
        assert_eq!(by_tenant.key(&acme), by_tenant.key(&acme2));
        assert_ne!(by_tenant.key(&acme), by_tenant.key(&globex));
    }

    #[test]
    fn digests_are_stable_and_128_bits() {
        let key = Key::new("GET /a");
        assert_eq!(key.uri_digest_hex().len(), 32);
        assert_eq!(key.uri_digest_hex(), Key::new("GET /a").uri_digest_hex());
        assert_ne!(key.uri_digest_hex(), Key::new("GET /b").uri_digest_hex());
        let varied = Key::with_variant("GET /a", "gzip");
        assert_eq!(varied.uri_digest_hex(), key.uri_digest_hex());
        assert_ne!(varied.variant_digest_hex(), key.variant_digest_hex());
    }

    #[test]
    fn every_built_in_key_holds_the_authority_and_scheme() {
        let acme = parts(http::Request::get("/a").header("host", "acme.example"));
        let globex = parts(http::Request::get("/a").header("host", "globex.example"));
        let acme_h2 = parts(http::Request::get("http://ACME.example/a"));
        let acme_tls = parts(http::Request::get("https://acme.example/a"));
        let tenant = ByHeader::new(HeaderName::from_static("x-tenant"));
        for key_fn in [&PerUser as &dyn KeyFn, &SharedAcrossUsers, &tenant] {
            let key = |p: &Parts| key_fn.key(p).unwrap();
            assert_ne!(key(&acme), key(&globex));
            assert_eq!(
                key(&acme),
                key(&acme_h2),
                "HTTP/1 Host and HTTP/2 authority agree"
            );
            assert_ne!(key(&acme), key(&acme_tls));
            assert_eq!(key(&acme).uri_part(), "http://acme.example/a");
        }
    }

    #[test]
    fn per_user_hashes_api_keys_and_headers_it_is_given() {
        let key = |p: &Parts| PerUser.key(p).unwrap();
        let anonymous = parts(http::Request::get("/a"));
        for name in ["proxy-authorization", "x-api-key"] {
            let one = parts(http::Request::get("/a").header(name, "1"));
            let two = parts(http::Request::get("/a").header(name, "2"));
            assert_ne!(key(&one), key(&two), "{name}");
            assert_ne!(key(&one), key(&anonymous), "{name}");
        }
        let by_session = PerUser.with_header(HeaderName::from_static("x-session"));
        let alice = parts(http::Request::get("/a").header("x-session", "alice"));
        let bob = parts(http::Request::get("/a").header("x-session", "bob"));
        assert_eq!(key(&alice), key(&bob), "PerUser alone ignores x-session");
        assert_ne!(by_session.key(&alice), by_session.key(&bob));
        assert!(by_session.separates_credentials() && PerUser.separates_credentials());
        assert!(!SharedAcrossUsers.separates_credentials());
    }

    #[test]
    fn a_write_and_a_read_of_one_uri_share_the_uri_part_only() {
        let get = PerUser.key(&parts(http::Request::get("/item"))).unwrap();
        let post = PerUser
            .key(&parts(
                http::Request::post("/item").header("authorization", "x"),
            ))
            .unwrap();
        assert_eq!(get.uri_part(), post.uri_part());
        assert_ne!(get, post);
    }
}
