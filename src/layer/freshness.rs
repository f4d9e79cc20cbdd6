//! Freshness as a shared cache computes it (RFC 9111 §4), on `http-cache-semantics`: whether a
//! response may be stored, for how long it is fresh, what `Age` a reuse carries, whether a stored
//! variant answers a request, how a stale response is revalidated and a `304` merged into it.
//!
//! The rules are the library's `CachePolicy` with `shared: true`. The only parsing done here is a
//! small normalisation in front of it, for RFC 9111 rules it gets wrong (see [`normalise`]).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};

use crate::{
    clock::{self, Micros},
    key::{effective_uri_of, fields_digest, hex_digest, CREDENTIAL_HEADERS},
    parker::Keep,
    response::PolicyRecord,
    StoredResponse,
};

/// What the operator configured, as the freshness rules use it.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// The ceiling of every lifetime, and the lifetime of a response that states none.
    pub(crate) ttl: Duration,
    /// Whether a lifetime the response states may exceed `ttl`.
    pub(crate) lifetime_may_exceed_ttl: bool,
    /// How long a stale response with a validator is kept to be revalidated.
    pub(crate) revalidate_for: Duration,
    /// Fields obeyed instead of `Cache-Control` when present (RFC 9213), first match wins.
    pub(crate) targeted_fields: Arc<[HeaderName]>,
    /// Whether keys separate credentials, so `Authorization` does not bar storing.
    pub(crate) separates_credentials: bool,
    /// Which statuses may be kept.
    pub(crate) storable_statuses: Arc<[http::StatusCode]>,
    /// Whether a request's own `Cache-Control` / `Pragma` may refuse a stored response.
    pub(crate) honor_request_directives: bool,
}

/// RFC 9111 §4.2.2: heuristics are the operator's TTL, not a fraction of `Last-Modified`.
const OPTIONS: CacheOptions = CacheOptions {
    shared: true,
    cache_heuristic: 0.0,
    immutable_min_time_to_live: Duration::ZERO,
    ignore_cargo_cult: false,
};

/// A lifetime no response states: what a response that states none is given to tell it apart.
const UNSTATED: Duration = Duration::from_secs(500 * 365 * 24 * 60 * 60);

/// RFC 9111 §1.2.2: the greatest `Age` a cache needs to represent; an invalid one counts as this
/// (stale), as §4.2.1 encourages for invalid freshness information.
const MAX_AGE_VALUE: u64 = 1 << 31;

/// The head of a request, borrowed from wherever it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
}

impl<'a> Head<'a> {
    pub(crate) fn of<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
        }
    }

    fn effective_uri(&self) -> String {
        effective_uri_of(self.uri, self.headers)
    }
}

/// What a response is to the other requests of its key.
#[derive(Debug)]
// Made once per run and matched at once: boxing the response would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Decision {
    /// Nobody but its own caller may have it (`private`, `no-store`, `Set-Cookie`, `Vary: *`).
    Pass,
    /// It may be handed to the requests waiting for it, and kept as `Keep` says.
    Share(StoredResponse, Keep),
}

/// Judges a response received at `received_at` for the plain request `request`.
pub(crate) fn judge(
    request: Head<'_>,
    status: http::StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    rules: &Rules,
    received_at: Micros,
) -> Decision {
    let vary = vary_names(headers);
    if headers.contains_key(header::SET_COOKIE) || vary.iter().any(|name| name == "*") {
        return Decision::Pass;
    }
    let normalised = normalise(headers, &rules.targeted_fields);
    let policy_request = policy_request(request, &vary, rules.separates_credentials);
    let response = response_of(status, normalised.clone());
    let now = clock::system_time(received_at);
    let policy = CachePolicy::new_options(&policy_request, &response, now, OPTIONS);
    let storable = policy.is_storable();
    if !storable && is_private(&policy_request, &normalised, now) {
        return Decision::Pass;
    }
    // The library decides which fields a reuse replays (no hop-by-hop, none that `Connection`
    // names); the values come from the response itself, every line of them.
    let replayed = match policy.after_response(&policy_request, &response, now) {
        AfterResponse::Modified(_, parts) | AfterResponse::NotModified(_, parts) => parts.headers,
    };
    let mut stored = StoredResponse::new(status, keep_lines(&replayed, &[headers]), body);
    let keep = if storable && rules.storable_statuses.contains(&status) {
        keep_for(&policy_request, status, &normalised, rules, now)
    } else {
        Keep {
            failed: status.is_server_error(),
            ..Keep::for_ttl(Duration::ZERO)
        }
    };
    stored.policy = Some(PolicyRecord {
        received_at,
        age_when_received: policy.age(now).as_secs(),
        variant: (!vary.is_empty()).then(|| variant_digest(&vary, request)),
        policy: serde_json::to_vec(&policy).map_or_else(|_| Bytes::new(), Bytes::from),
    });
    Decision::Share(stored, keep)
}

/// The lifetime of a storable response: its own (the library's `time_to_live`), or the TTL when
/// it states none, capped by the TTL unless the operator lets it exceed it; plus the
/// revalidation window when it has a validator.
fn keep_for(
    policy_request: &Request<()>,
    status: http::StatusCode,
    normalised: &HeaderMap,
    rules: &Rules,
    now: SystemTime,
) -> Keep {
    // Whether the response states a lifetime is the library's call too: with an `Expires` far in
    // the future added after its own fields, its lifetime is still its own if it states one
    // (`s-maxage`, `max-age` and a first `Expires` all take precedence over a second `Expires`).
    let mut probe = normalised.clone();
    let date = normalised
        .get(header::DATE)
        .and_then(|date| httpdate::parse_http_date(date.to_str().ok()?).ok())
        .unwrap_or(now);
    if let Ok(expires) = HeaderValue::from_str(&httpdate::fmt_http_date(date + UNSTATED)) {
        probe.append(header::EXPIRES, expires);
    }
    let lifetime =
        CachePolicy::new_options(policy_request, &response_of(status, probe), now, OPTIONS)
            .time_to_live(now);
    let fresh_for = if lifetime >= UNSTATED / 2 {
        rules.ttl
    } else if rules.lifetime_may_exceed_ttl {
        lifetime
    } else {
        lifetime.min(rules.ttl)
    };
    let has_validator =
        normalised.contains_key(header::ETAG) || normalised.contains_key(header::LAST_MODIFIED);
    Keep {
        may_serve_stale: !forbids_stale(normalised),
        failed: status.is_server_error(),
        // RFC 5861's windows, when the response may set its own freshness.
        stale_windows: if rules.lifetime_may_exceed_ttl {
            (
                directive_seconds(normalised, "stale-while-revalidate"),
                directive_seconds(normalised, "stale-if-error"),
            )
        } else {
            (None, None)
        },
        fresh_for,
        keep_for: fresh_for
            + if has_validator {
                rules.revalidate_for
            } else {
                Duration::ZERO
            },
        revalidated: false,
    }
}

/// Whether a stale response may not be served without revalidating it (RFC 9111 §4.2.4):
/// `must-revalidate`, and for a shared cache `proxy-revalidate` and `s-maxage` (§5.2.2.2,
/// §5.2.2.8, §5.2.2.10); and `no-cache` (§5.2.2.4). The library applies only the first when it
/// serves stale, so the layer checks for the directives' presence here, in the fields
/// [`normalise`] made (lowercase names, the targeted field in force).
fn forbids_stale(normalised: &HeaderMap) -> bool {
    normalised
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|directive| directive.split('=').next().unwrap_or("").trim())
        .any(|name| {
            matches!(
                name,
                "must-revalidate" | "proxy-revalidate" | "s-maxage" | "no-cache"
            )
        })
}

/// The value of an RFC 5861 extension directive (`stale-while-revalidate=N`,
/// `stale-if-error=N`) in the normalised `Cache-Control`, which the library does not read.
fn directive_seconds(normalised: &HeaderMap, name: &str) -> Option<Duration> {
    normalised
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|directive| {
            let (directive, seconds) = directive.split_once('=')?;
            let seconds = seconds.trim().trim_matches('"').parse().ok()?;
            (directive.trim() == name).then(|| Duration::from_secs(seconds))
        })
}

/// Whether the response is for its own caller only: a shared cache may not store it even with a
/// status the library knows and no credentials in the request (`private`, `no-store`).
fn is_private(policy_request: &Request<()>, normalised: &HeaderMap, now: SystemTime) -> bool {
    let mut anonymous = Request::new(());
    *anonymous.method_mut() = http::Method::GET;
    *anonymous.uri_mut() = policy_request.uri().clone();
    let probe = response_of(http::StatusCode::OK, normalised.clone());
    !CachePolicy::new_options(&anonymous, &probe, now, OPTIONS).is_storable()
}

/// `Age` of a stored response now, in seconds: its age when received plus the time since.
pub(crate) fn age(record: &PolicyRecord, now: Micros) -> u64 {
    record.age_when_received + clock::between(record.received_at, now).as_secs()
}

/// Whether a stored response answers this request: always, unless its `Vary` names request
/// fields, which must then have the values they had in the request it answered (compared by
/// digest: the key already holds the method and the effective URI the library would compare).
pub(crate) fn matches(stored: &StoredResponse, request: Head<'_>) -> bool {
    other_variant(stored, request).is_none()
}

/// When `stored` varies and this request is of another variant: the digest of the request's
/// values of the fields its `Vary` names.
pub(crate) fn other_variant(stored: &StoredResponse, request: Head<'_>) -> Option<String> {
    let variant = stored.policy.as_ref()?.variant.as_ref()?;
    let digest = variant_digest(&vary_names(&stored.headers), request);
    (digest != *variant).then_some(digest)
}

/// The digest of a request's values of the fields a response's `Vary` names.
fn variant_digest(vary: &[String], request: Head<'_>) -> String {
    fields_digest(request.headers, vary.iter().map(String::as_str))
}

/// Whether the request says it will not take `stored` as it is (`Cache-Control: no-cache`,
/// `max-age` below its age, `Pragma: no-cache`...), as the library judges; only asked when the
/// operator lets requests say so.
pub(crate) fn refused_by_request(
    stored: &StoredResponse,
    request: Head<'_>,
    rules: &Rules,
) -> bool {
    if !rules.honor_request_directives
        || !(request.headers.contains_key(header::CACHE_CONTROL)
            || request.headers.contains_key(header::PRAGMA))
    {
        return false;
    }
    let Some(record) = &stored.policy else {
        return false;
    };
    let mut policy_request = policy_request(
        request,
        &vary_names(&stored.headers),
        rules.separates_credentials,
    );
    for name in [header::CACHE_CONTROL, header::PRAGMA] {
        for value in request.headers.get_all(&name) {
            policy_request
                .headers_mut()
                .append(name.clone(), value.clone());
        }
    }
    // The layer decided the response is fresh; the library is asked only about the request's
    // directives, of a response of the same age that it sees as fresh for long.
    let now = clock::now();
    let age = age(record, now);
    let mut seen_fresh = HeaderMap::new();
    seen_fresh.insert(header::AGE, HeaderValue::from(age));
    let lifetime = format!("max-age={}", age + 365 * 24 * 60 * 60);
    if let Ok(lifetime) = HeaderValue::from_str(&lifetime) {
        seen_fresh.insert(header::CACHE_CONTROL, lifetime);
    }
    let now = clock::system_time(now);
    let policy = CachePolicy::new_options(
        &policy_request,
        &response_of(http::StatusCode::OK, seen_fresh),
        now,
        OPTIONS,
    );
    !matches!(
        policy.before_request(&policy_request, now),
        BeforeRequest::Fresh(_)
    )
}

/// The `If-None-Match` / `If-Modified-Since` that revalidate `stored` (RFC 9111 §4.3.1), as the
/// library builds them, if it has a validator and answers `request`.
pub(crate) fn revalidation(
    stored: &StoredResponse,
    request: Head<'_>,
    rules: &Rules,
) -> Option<HeaderMap> {
    let record = stored.policy.as_ref()?;
    if stored.status != http::StatusCode::OK {
        return None;
    }
    let policy = decode(record)?;
    let mut request = policy_request(
        request,
        &vary_names(&stored.headers),
        rules.separates_credentials,
    );
    // Asked as a request that will not take a stored answer, the library returns the
    // revalidation request even while the response is fresh by its own (uncapped) lifetime.
    request
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    match policy.before_request(&request, clock::system_time(clock::now())) {
        BeforeRequest::Stale {
            request,
            matches: true,
        } => {
            let conditions: HeaderMap = [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE]
                .into_iter()
                .filter_map(|name| Some((name.clone(), request.headers.get(&name)?.clone())))
                .collect();
            (!conditions.is_empty()).then_some(conditions)
        }
        _ => None,
    }
}

/// `stored` refreshed by a `304 Not Modified` with these headers (RFC 9111 §4.3.4, the
/// library's `after_response`), judged again as a response received now; `None` when the `304`
/// does not select it (another validator).
pub(crate) fn refreshed(
    stored: &StoredResponse,
    request: Head<'_>,
    not_modified: &HeaderMap,
    rules: &Rules,
) -> Option<Decision> {
    let policy = decode(stored.policy.as_ref()?)?;
    let now = clock::now();
    let policy_request = policy_request(
        request,
        &vary_names(&stored.headers),
        rules.separates_credentials,
    );
    let mut selecting = normalise(not_modified, &rules.targeted_fields);
    // A 304 need not repeat `Last-Modified` (RFC 9110 §15.4.5), and many servers send none. The
    // library then selects no stored response (RFC 9111 §4.3.4 selects by validator among
    // several), but this one answers the condition the layer made from `stored` alone: a 304
    // with no validator of its own is taken to carry `stored`'s. One with another validator
    // still selects nothing.
    if !selecting.contains_key(header::ETAG) && !selecting.contains_key(header::LAST_MODIFIED) {
        for name in [header::ETAG, header::LAST_MODIFIED] {
            if let Some(value) = stored.headers.get(&name) {
                selecting.insert(name, value.clone());
            }
        }
    }
    let response = response_of(http::StatusCode::NOT_MODIFIED, selecting);
    match policy.after_response(&policy_request, &response, clock::system_time(now)) {
        AfterResponse::NotModified(_, parts) => {
            // The library keeps the stored body's own description; so do the lines taken here.
            let mut update = not_modified.clone();
            for name in [
                header::CONTENT_LENGTH,
                header::CONTENT_ENCODING,
                header::TRANSFER_ENCODING,
                header::CONTENT_RANGE,
            ] {
                update.remove(name);
            }
            let mut merged = keep_lines(&parts.headers, &[&update, &stored.headers]);
            // RFC 9111 §3.2: the 304's fields are added as well as replaced; the library only
            // replaces the fields the stored response had. (Hop-by-hop ones are dropped by
            // `judge`, as for any response.)
            for name in update.keys() {
                if name != header::AGE && !merged.contains_key(name) {
                    for value in update.get_all(name) {
                        merged.append(name.clone(), value.clone());
                    }
                }
            }
            Some(judge(
                request,
                stored.status,
                &merged,
                stored.body.clone(),
                rules,
                now,
            ))
        }
        AfterResponse::Modified(..) => None,
    }
}

fn decode(record: &PolicyRecord) -> Option<CachePolicy> {
    serde_json::from_slice(&record.policy).ok()
}

fn response_of(status: http::StatusCode, headers: HeaderMap) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The request as the policy sees it: the effective URI, the method, `Host`, and the fields the
/// response's `Vary` names. Credential values enter as hashes, so none is ever stored; the
/// request's own cache directives are left out (a client cannot make the handler run).
fn policy_request(request: Head<'_>, vary: &[String], separates_credentials: bool) -> Request<()> {
    let effective_uri = request.effective_uri();
    let mut policy_request = Request::new(());
    *policy_request.method_mut() = request.method.clone();
    *policy_request.uri_mut() = effective_uri
        .parse()
        .unwrap_or_else(|_| request.uri.clone());
    let headers = policy_request.headers_mut();
    let authority = effective_uri
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|authority| HeaderValue::from_str(authority).ok());
    if let Some(authority) = authority {
        headers.insert(header::HOST, authority);
    }
    for name in vary {
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        for value in request.headers.get_all(&name) {
            let value = if CREDENTIAL_HEADERS.contains(&name) {
                HeaderValue::from_str(&hex_digest(&[value.as_bytes()], 16)).ok()
            } else {
                Some(value.clone())
            };
            if let Some(value) = value {
                headers.append(name.clone(), value);
            }
        }
    }
    if !separates_credentials && request.headers.contains_key(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("present"));
    }
    policy_request
}

/// The field names `Vary` lists, lowercase.
pub(crate) fn vary_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect()
}

/// Every line of the fields in `chosen`, from the first of `sources` that has them (the library
/// keeps one line per field); fields only the library has (`Date` of a response without one)
/// as it has them; never `Age`, which a reuse computes.
fn keep_lines(chosen: &HeaderMap, sources: &[&HeaderMap]) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(chosen.len());
    for name in chosen.keys() {
        if name == header::AGE {
            continue;
        }
        match sources.iter().find(|source| source.contains_key(name)) {
            Some(source) => {
                for value in source.get_all(name) {
                    kept.append(name.clone(), value.clone());
                }
            }
            None => {
                for value in chosen.get_all(name) {
                    kept.append(name.clone(), value.clone());
                }
            }
        }
    }
    kept
}

/// The response's fields as the library should read them. Three fixes for RFC 9111 rules the
/// library gets wrong, each as small as it can be:
///
/// 1. A targeted field (RFC 9213, e.g. `CDN-Cache-Control`) present and non-empty replaces
///    `Cache-Control`, and `Expires` and `Pragma` are ignored (RFC 9213 §2.1).
/// 2. Cache directive names are case-insensitive (RFC 9111 §5.2); the library matches them
///    case-sensitively, so they are lowercased.
/// 3. An `Age` that is not a non-negative integer, or is beyond 2³¹, counts as 2³¹ (RFC 9111
///    §1.2.2, §4.2.1); the library reads an invalid one as 0, which makes a response fresh.
/// 4. `Expires` and `Date` in the obsolete HTTP-date formats (RFC 850, asctime), which a
///    recipient must accept (RFC 9110 §5.6.7), are rewritten as IMF-fixdates; the library reads
///    only the latter, and takes an `Expires` it cannot read as already expired.
pub(crate) fn normalise(headers: &HeaderMap, targeted_fields: &[HeaderName]) -> HeaderMap {
    let mut headers = headers.clone();
    let targeted = targeted_fields.iter().find_map(|name| {
        let values: Vec<HeaderValue> = headers
            .get_all(name)
            .iter()
            .filter(|value| !value.as_bytes().iter().all(u8::is_ascii_whitespace))
            .cloned()
            .collect();
        (!values.is_empty()).then_some(values)
    });
    if let Some(values) = targeted {
        headers.remove(header::CACHE_CONTROL);
        headers.remove(header::EXPIRES);
        headers.remove(header::PRAGMA);
        for value in values {
            headers.append(header::CACHE_CONTROL, value);
        }
    }
    let directives: Vec<HeaderValue> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .map(lowercase_directive_names)
        .collect();
    headers.remove(header::CACHE_CONTROL);
    for value in directives {
        headers.append(header::CACHE_CONTROL, value);
    }
    for name in [header::EXPIRES, header::DATE] {
        let dates: Vec<HeaderValue> = headers
            .get_all(&name)
            .iter()
            .map(|value| {
                value
                    .to_str()
                    .ok()
                    .and_then(|text| httpdate::parse_http_date(text).ok())
                    .and_then(|date| HeaderValue::from_str(&httpdate::fmt_http_date(date)).ok())
                    .unwrap_or_else(|| value.clone())
            })
            .collect();
        if !dates.is_empty() {
            headers.remove(&name);
            for value in dates {
                headers.append(name.clone(), value);
            }
        }
    }
    if let Some(age) = headers.get(header::AGE) {
        let age = age
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|age| !age.is_empty() && age.bytes().all(|b| b.is_ascii_digit()))
            .map_or(MAX_AGE_VALUE, |age| {
                age.parse::<u64>()
                    .unwrap_or(MAX_AGE_VALUE)
                    .min(MAX_AGE_VALUE)
            });
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    headers
}

fn lowercase_directive_names(value: &HeaderValue) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let lowered: Vec<String> = text
        .split(',')
        .map(|directive| match directive.split_once('=') {
            Some((name, argument)) => format!("{}={argument}", name.trim().to_ascii_lowercase()),
            None => directive.trim().to_ascii_lowercase(),
        })
        .collect();
    HeaderValue::from_str(&lowered.join(", ")).unwrap_or_else(|_| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn rules(ttl: u64) -> Rules {
        Rules {
            ttl: Duration::from_secs(ttl),
            lifetime_may_exceed_ttl: false,
            revalidate_for: Duration::from_secs(60),
            targeted_fields: Arc::from([HeaderName::from_static("cdn-cache-control")]),
            separates_credentials: true,
            storable_statuses: Arc::from([StatusCode::OK]),
            honor_request_directives: false,
        }
    }

    fn request() -> Request<()> {
        Request::get("/a")
            .header("host", "acme.example")
            .body(())
            .unwrap()
    }

    fn judged(ttl: u64, pairs: &[(&str, &str)]) -> Decision {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        judge(
            Head::of(&request()),
            StatusCode::OK,
            &headers,
            Bytes::from_static(b"body"),
            &rules(ttl),
            clock::now(),
        )
    }

    fn fresh_for(ttl: u64, pairs: &[(&str, &str)]) -> Option<u64> {
        match judged(ttl, pairs) {
            Decision::Share(_, keep) => Some(keep.fresh_for.as_secs()),
            Decision::Pass => None,
        }
    }

    #[test]
    fn lifetimes_are_the_response_s_capped_by_the_ttl() {
        assert_eq!(fresh_for(10, &[]), Some(10), "no stated lifetime: the TTL");
        assert_eq!(fresh_for(10, &[("cache-control", "max-age=2")]), Some(2));
        assert_eq!(fresh_for(10, &[("cache-control", "max-age=60")]), Some(10));
        assert_eq!(
            fresh_for(10, &[("cache-control", "Max-Age=2")]),
            Some(2),
            "case"
        );
        for zero in [
            "max-age=0",
            "no-cache",
            "max-age=-1",
            "s-maxage=0, max-age=600",
            "max-age=3600, must-revalidate, proxy-revalidate",
        ] {
            assert_eq!(fresh_for(10, &[("cache-control", zero)]), Some(0), "{zero}");
        }
        assert_eq!(
            fresh_for(10, &[("expires", "Thu, 01 Jan 1970 00:00:00 GMT")]),
            Some(0)
        );
        assert_eq!(
            fresh_for(10, &[("expires", "0")]),
            Some(0),
            "an invalid Expires"
        );
        assert_eq!(
            fresh_for(10, &[("cache-control", "max-age=3600"), ("age", "7200")]),
            Some(0)
        );
        assert_eq!(
            fresh_for(10, &[("cache-control", "max-age=3600"), ("age", "soon")]),
            Some(0),
            "an invalid Age is stale"
        );
        assert_eq!(
            fresh_for(
                10,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "max-age=3")
                ]
            ),
            Some(3)
        );
    }

    #[test]
    fn private_responses_pass() {
        for pairs in [
            &[("cache-control", "private")][..],
            &[("cache-control", "No-Store")],
            &[("set-cookie", "a=b")],
            &[("vary", "*")],
            &[
                ("cache-control", "max-age=60"),
                ("cdn-cache-control", "no-store"),
            ],
        ] {
            assert!(matches!(judged(10, pairs), Decision::Pass), "{pairs:?}");
        }
    }

    #[test]
    fn stored_heads_drop_hop_by_hop_and_connection_fields_but_keep_every_line() {
        let Decision::Share(stored, _) = judged(
            10,
            &[
                ("connection", "x-trace"),
                ("x-trace", "1"),
                ("keep-alive", "timeout=5"),
                ("link", "</a>; rel=preload"),
                ("link", "</b>; rel=preload"),
                ("age", "3"),
            ],
        ) else {
            panic!("shared")
        };
        for gone in ["connection", "x-trace", "keep-alive", "age"] {
            assert!(!stored.headers.contains_key(gone), "{gone}");
        }
        assert_eq!(stored.headers.get_all("link").iter().count(), 2);
        assert_eq!(stored.policy.unwrap().age_when_received, 3);
    }

    #[test]
    fn a_response_sets_its_own_stale_windows_only_when_it_may_set_its_freshness() {
        let windows = |own: bool, cache_control: &str| {
            let mut rules = rules(10);
            rules.lifetime_may_exceed_ttl = own;
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(cache_control).unwrap(),
            );
            match judge(
                Head::of(&request()),
                StatusCode::OK,
                &headers,
                Bytes::new(),
                &rules,
                clock::now(),
            ) {
                Decision::Share(_, keep) => (keep.may_serve_stale, keep.stale_windows),
                Decision::Pass => panic!("shared"),
            }
        };
        let secs = |n| Some(Duration::from_secs(n));
        let stated = "max-age=5, Stale-While-Revalidate=30, stale-if-error=\"60\"";
        assert_eq!(windows(true, stated), (true, (secs(30), secs(60))));
        assert_eq!(windows(false, stated), (true, (None, None)));
        assert!(
            !windows(
                true,
                "max-age=5, must-revalidate, stale-while-revalidate=30"
            )
            .0,
            "never stale once it must be revalidated"
        );
    }

    #[test]
    fn a_stored_policy_costs_well_under_a_kilobyte() {
        use crate::Value;
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("cache-control", "public, max-age=60"),
            ("etag", "\"33a64df551425fcc55e4d42a148795d9f25f89d4\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("vary", "accept-encoding"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let Decision::Share(stored, _) = judge(
            Head::of(&request()),
            StatusCode::OK,
            &headers,
            Bytes::from(vec![b'x'; 2048]),
            &rules(10),
            clock::now(),
        ) else {
            panic!("shared")
        };
        let with_policy = stored.encode().len();
        let without = StoredResponse {
            policy: None,
            ..stored
        }
        .encode()
        .len();
        eprintln!("a 2 KiB response: {without} bytes stored, {with_policy} with its policy");
        assert!(with_policy - without < 1024, "{with_policy} - {without}");
    }
}
