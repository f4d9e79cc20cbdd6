//! Keys: which requests ask the same question.
//!
//! A [`Key`] names one piece of work. Requests with equal keys share one run of the handler and
//! its response, so a key must hold everything that can change the response. The default,
//! [`PerUser`], holds the method, path, query and a hash of the caller's credentials
//! (`Authorization` and `Cookie`): two users never share a response unless you choose a key
//! function that says they may.

use std::{fmt, sync::Arc};

use http::{request::Parts, HeaderName};
use sha2::{Digest, Sha256};

/// The name of one piece of work: callers with equal keys share its result.
///
/// Any string is a valid key. Backends that store keys outside the process (Redis) use a
/// SHA-256 digest of it, never the raw text.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// A key made of this text.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Self(key.into())
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 128 bits of the SHA-256 digest of the key, in lowercase hex (32 characters):
    /// the stable name under which backends outside the process store it.
    pub fn digest_hex(&self) -> String {
        hex_digest(&[self.0.as_bytes()], 16)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
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
fn hex_digest(parts: &[&[u8]], bytes: usize) -> String {
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
}

impl<F> KeyFn for F
where
    F: Fn(&Parts) -> Option<Key> + Send + Sync + 'static,
{
    fn key(&self, parts: &Parts) -> Option<Key> {
        self(parts)
    }
}

/// The default key: method, path, query, and a hash of the `Authorization` and `Cookie` headers.
///
/// Two requests share a response only if they come with the same credentials, so one user's
/// response never reaches another user. Anonymous requests (neither header) share with each
/// other.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerUser;

impl KeyFn for PerUser {
    fn key(&self, parts: &Parts) -> Option<Key> {
        let credentials = hash_headers(parts, &[http::header::AUTHORIZATION, http::header::COOKIE]);
        Some(request_key(parts, "user", &credentials))
    }
}

/// Method, path and query only: every user shares one response per URL.
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

/// Method, path, query and the value of one header (a tenant, an API key): requests share a
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
        let value = hash_headers(parts, std::slice::from_ref(&self.0));
        Some(request_key(parts, self.0.as_str(), &value))
    }
}

/// `METHOD path?query #scope:extra`. Each key function has its own scope, so keys from
/// different functions never collide.
fn request_key(parts: &Parts, scope: &str, extra: &str) -> Key {
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    Key::new(format!(
        "{} {path_and_query} #{scope}:{extra}",
        parts.method
    ))
}

/// A hash of every value of these headers, or an empty string when none is present.
fn hash_headers(parts: &Parts, names: &[HeaderName]) -> String {
    let mut values: Vec<&[u8]> = Vec::new();
    for name in names {
        values.push(name.as_str().as_bytes());
        values.extend(parts.headers.get_all(name).iter().map(|v| v.as_bytes()));
    }
    if names.iter().all(|name| !parts.headers.contains_key(name)) {
        return String::new();
    }
    hex_digest(&values, 16)
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
            !key(&alice).as_str().contains("alice"),
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
    fn digest_is_stable_and_128_bits() {
        let key = Key::new("GET /a");
        assert_eq!(key.digest_hex().len(), 32);
        assert_eq!(key.digest_hex(), Key::new("GET /a").digest_hex());
        assert_ne!(key.digest_hex(), Key::new("GET /b").digest_hex());
    }
}
