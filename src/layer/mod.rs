//! [`ParkingLayer`] and [`Parking`]: the HTTP face of the [`Parker`], a shared cache in the
//! sense of RFC 9111 whose misses are coalesced across processes.
//!
//! - `service`: what each request goes through (bypass, write, parked);
//! - `future`: the response future;
//! - [`sharing`](crate::sharing): which requests are parked and which responses reach a request
//!   other than their own;
//! - `freshness`: how long a response is fresh, its `Age`, revalidation, on
//!   `http-cache-semantics`;
//! - `status`: the `x-parking` and `Cache-Status` headers.

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http::{HeaderName, Method, StatusCode};

use crate::{
    Backend, KeyFn, Parker, ParkerBuilder, PerUser, Stats, StoredResponse, WaitTimeoutPolicy,
};

pub(crate) mod freshness;
mod future;
mod service;
pub mod sharing;
mod status;

pub use future::ResponseFuture;
pub use service::Parking;
pub use status::PARKING_HEADER;

use sharing::{DefaultSharing, SharePredicate, SharedPredicate};

/// Parks concurrent requests for the same key behind one run of the inner service, serves its
/// response to all of them and, while it is fresh, to every later request.
///
/// The layer is a shared cache (RFC 9111): a response reaches a request other than its own only
/// if a correct shared cache could give it to that request. See the README's "What is shared,
/// and what is not".
///
/// | setting | default |
/// |---|---|
/// | [`key`](ParkingLayer::key) | [`PerUser`]: URI with authority, method, hash of the credentials |
/// | [`ttl`](ParkingLayer::ttl) | 10 seconds: the longest a response is fresh, and the lifetime of one that states none |
/// | [`ttl_from_response`](ParkingLayer::ttl_from_response) | off: a lifetime the response states is capped by the TTL |
/// | [`revalidate_window`](ParkingLayer::revalidate_window) | 60 seconds: a stale response with a validator is kept this long to be revalidated |
/// | [`targeted_fields`](ParkingLayer::targeted_fields) | `CDN-Cache-Control` |
/// | [`honor_request_cache_control`](ParkingLayer::honor_request_cache_control) | off: a request's `no-cache` or `max-age=0` cannot make the handler run |
/// | [`methods`](ParkingLayer::methods) | `GET`, `HEAD` (writes invalidate) |
/// | [`storable_statuses`](ParkingLayer::storable_statuses) | 200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501 |
/// | [`body_limit`](ParkingLayer::body_limit) | 1 MiB |
/// | [`body_timeout`](ParkingLayer::body_timeout) | 10 seconds |
/// | [`share_when`](ParkingLayer::share_when) | [`DefaultSharing`](sharing::DefaultSharing) |
/// | [`hit_for_pass`](ParkingLayer::hit_for_pass) | 30 seconds |
/// | [`status_header`](ParkingLayer::status_header) | on, `x-parking: <outcome>` |
/// | [`cache_status`](ParkingLayer::cache_status) | off (RFC 9211 `Cache-Status`) |
/// | [`stale_while_revalidate`](ParkingLayer::stale_while_revalidate), [`stale_if_error`](ParkingLayer::stale_if_error) | off |
/// | [`early_refresh`](ParkingLayer::early_refresh) | off |
/// | [`wait_timeout`](ParkingLayer::wait_timeout) | none: wait as long as the leader is alive |
/// | [`on_wait_timeout`](ParkingLayer::on_wait_timeout) | run the handler locally, store nothing |
/// | [`wait_timeout_status`](ParkingLayer::wait_timeout_status), [`unavailable_status`](ParkingLayer::unavailable_status) | 504, 503 |
/// | [`backend`](ParkingLayer::backend) | a [`MemoryBackend`](crate::MemoryBackend) (one process) |
///
/// Every service the layer wraps (each route of a `Router`, each clone) shares one
/// [`Parker`]: one set of flights and one [`stats`](ParkingLayer::stats).
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_parking::ParkingLayer;
///
/// let parking = ParkingLayer::new().ttl(Duration::from_secs(30));
/// let app: Router = Router::new()
///     .route("/report/{id}", get(|| async { "an expensive report" }))
///     .layer(parking.clone());
/// // Later: parking.stats() counts hits, misses and handler runs.
/// ```
#[derive(Clone)]
pub struct ParkingLayer {
    parker: ParkerBuilder,
    built: Arc<OnceLock<Parker<StoredResponse>>>,
    http: Arc<HttpConfig>,
}

/// The HTTP side of the configuration: which requests are parked, which responses are shared.
#[derive(Clone)]
pub(crate) struct HttpConfig {
    pub(crate) key: Arc<dyn KeyFn>,
    pub(crate) methods: Vec<Method>,
    pub(crate) body_limit: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) share_when: SharedPredicate,
    pub(crate) pass_for: Duration,
    pub(crate) status_header: Option<HeaderName>,
    pub(crate) cache_status: bool,
    pub(crate) wait_timeout_status: StatusCode,
    pub(crate) unavailable_status: StatusCode,
    pub(crate) rules: freshness::Rules,
}

impl Default for ParkingLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ParkingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkingLayer")
            .field("parker", &self.parker)
            .field("methods", &self.http.methods)
            .field("rules", &self.http.rules)
            .field("body_limit", &self.http.body_limit)
            .field("body_timeout", &self.http.body_timeout)
            .field("pass_for", &self.http.pass_for)
            .field("status_header", &self.http.status_header)
            .field("cache_status", &self.http.cache_status)
            .finish_non_exhaustive()
    }
}

/// RFC 9110 §15.1: the statuses a cache may reuse without explicit freshness, that this layer
/// understands (`206` is never stored whole).
const STORABLE_BY_DEFAULT: [StatusCode; 11] = [
    StatusCode::OK,
    StatusCode::NON_AUTHORITATIVE_INFORMATION,
    StatusCode::NO_CONTENT,
    StatusCode::MULTIPLE_CHOICES,
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::PERMANENT_REDIRECT,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::GONE,
    StatusCode::URI_TOO_LONG,
    StatusCode::NOT_IMPLEMENTED,
];

const DEFAULT_TTL: Duration = Duration::from_secs(10);

impl ParkingLayer {
    /// A layer with the defaults in the table above.
    pub fn new() -> Self {
        Self {
            parker: Parker::<StoredResponse>::builder().ttl(DEFAULT_TTL),
            built: Arc::default(),
            http: Arc::new(HttpConfig {
                key: Arc::new(PerUser),
                methods: vec![Method::GET, Method::HEAD],
                body_limit: 1024 * 1024,
                body_timeout: Duration::from_secs(10),
                share_when: Arc::new(DefaultSharing),
                pass_for: Duration::from_secs(30),
                status_header: Some(PARKING_HEADER),
                cache_status: false,
                wait_timeout_status: StatusCode::GATEWAY_TIMEOUT,
                unavailable_status: StatusCode::SERVICE_UNAVAILABLE,
                rules: freshness::Rules {
                    ttl: DEFAULT_TTL,
                    lifetime_may_exceed_ttl: false,
                    revalidate_for: Duration::from_secs(60),
                    targeted_fields: Arc::from([HeaderName::from_static("cdn-cache-control")]),
                    separates_credentials: PerUser.separates_credentials(),
                    storable_statuses: Arc::from(STORABLE_BY_DEFAULT),
                    honor_request_directives: false,
                },
            }),
        }
    }

    /// Which requests share a response: [`PerUser`] (the default), [`SharedAcrossUsers`],
    /// [`ByHeader`], or any `Fn(&Parts) -> Option<Key>` closure (`None` lets the request through
    /// unparked).
    ///
    /// [`SharedAcrossUsers`]: crate::SharedAcrossUsers
    /// [`ByHeader`]: crate::ByHeader
    pub fn key(self, key: impl KeyFn) -> Self {
        self.with_http(|http| {
            http.rules.separates_credentials = key.separates_credentials();
            http.key = Arc::new(key);
        })
    }

    /// The longest a response is served to later requests without running the handler, and how
    /// long one that states no lifetime of its own is (default 10 seconds). A response that says
    /// it is fresh for less (`max-age`, `s-maxage`, `Expires`, `Age`, `no-cache`) is fresh for
    /// less. Zero keeps nothing: concurrent requests still share one run.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with_http(|http| http.rules.ttl = ttl)
            .with_parker(|parker| parker.ttl(ttl))
    }

    /// Whether a lifetime the response states (`s-maxage`, `max-age`, `Expires`) may exceed the
    /// [TTL](ParkingLayer::ttl) (default `false`: the TTL caps it). Responses that state none are
    /// fresh for the TTL either way.
    pub fn ttl_from_response(self, enabled: bool) -> Self {
        self.with_http(|http| http.rules.lifetime_may_exceed_ttl = enabled)
    }

    /// How long a stale response that has a validator (`ETag`, `Last-Modified`) is kept past its
    /// freshness, so that the next run of its key asks the handler whether it changed
    /// (`If-None-Match`, `If-Modified-Since`) and, on `304 Not Modified`, serves it again with
    /// its refreshed head (default 60 seconds; zero: never revalidate).
    pub fn revalidate_window(self, window: Duration) -> Self {
        self.with_http(|http| http.rules.revalidate_for = window)
    }

    /// Whether a request's own `Cache-Control: no-cache`, `max-age=N` or `Pragma: no-cache` may
    /// refuse a stored response (default `false`, as nginx and Varnish do: honouring them lets
    /// any client make the handler run on every request). Even when honoured, such a request
    /// still joins a run already in flight for its key.
    pub fn honor_request_cache_control(self, enabled: bool) -> Self {
        self.with_http(|http| http.rules.honor_request_directives = enabled)
    }

    /// Fields the layer obeys instead of `Cache-Control` when the response carries one (RFC 9213
    /// targeted fields; first present wins; default `CDN-Cache-Control`), so that an app can
    /// tell this layer one thing and browsers another.
    pub fn targeted_fields(self, fields: impl IntoIterator<Item = HeaderName>) -> Self {
        let fields: Arc<[HeaderName]> = fields.into_iter().collect();
        self.with_http(|http| http.rules.targeted_fields = fields)
    }

    /// Which methods are parked; others go straight through. A request with an unsafe method
    /// (`POST`, `PUT`, `PATCH`, `DELETE`, ...) that is not parked and succeeds (`2xx`, `3xx`)
    /// drops the stored responses of its URI (and of its `Location` and `Content-Location` on
    /// the same authority), for every user and variant, before its response is returned.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with_http(|http| http.methods = methods)
    }

    /// Which statuses may be kept for later requests (default: those RFC 9110 lets a cache reuse
    /// without explicit freshness). Other shareable responses are still handed to the requests
    /// that waited for them, but not kept.
    pub fn storable_statuses(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses: Arc<[StatusCode]> = statuses.into_iter().collect();
        self.with_http(|http| http.rules.storable_statuses = statuses)
    }

    /// The largest body shared or stored, in bytes (default 1 MiB). A larger one streams to its
    /// own caller whole; the requests that waited for it run the handler themselves.
    pub fn body_limit(self, bytes: usize) -> Self {
        self.with_http(|http| http.body_limit = bytes)
    }

    /// How long a body may take to end, from the response's head, to be shared (default 10
    /// seconds). One still open then streams on to its own caller, and the requests that waited
    /// for it run the handler themselves.
    pub fn body_timeout(self, timeout: Duration) -> Self {
        self.with_http(|http| http.body_timeout = timeout)
    }

    /// Which responses may be shared, judged from their head (default
    /// [`DefaultSharing`](sharing::DefaultSharing)). A response it refuses streams to its own
    /// caller at once.
    pub fn share_when(self, predicate: impl SharePredicate) -> Self {
        let predicate: SharedPredicate = Arc::new(predicate);
        self.with_http(|http| http.share_when = predicate)
    }

    /// How long a key whose response could not be shared (private, streamed, too large, `Vary:
    /// *`, ...) lets its requests go straight through instead of parking behind a leader whose
    /// response they cannot have, in every process on the backend (default 30 seconds;
    /// `x-parking: pass`). Zero turns it off.
    pub fn hit_for_pass(self, duration: Duration) -> Self {
        self.with_http(|http| http.pass_for = duration)
    }

    /// Whether responses carry `x-parking: <outcome>` (default on).
    pub fn status_header(self, enabled: bool) -> Self {
        self.with_http(|http| http.status_header = enabled.then_some(PARKING_HEADER))
    }

    /// Whether responses carry an RFC 9211 `Cache-Status` field (default off), such as
    /// `tower-parking; hit` or `tower-parking; fwd=uri-miss; collapsed`. It never holds the key.
    pub fn cache_status(self, enabled: bool) -> Self {
        self.with_http(|http| http.cache_status = enabled)
    }

    /// How long past its freshness a response is still served at once (`x-parking: stale`,
    /// with its `Age`) while one refresh runs in the background, across every process on the
    /// backend (RFC 5861 stale-while-revalidate; default zero: off). A refresh that fails (an
    /// error, a `5xx`, a response that may not be kept) leaves the old response serving until
    /// the window ends, and is tried again at most every
    /// [`refresh_retry`](ParkingLayer::refresh_retry). Never for responses that must be
    /// revalidated once stale (`must-revalidate`, `proxy-revalidate`, `s-maxage`, `no-cache`).
    pub fn stale_while_revalidate(self, window: Duration) -> Self {
        self.with_parker(|parker| parker.stale_while_revalidate(window))
    }

    /// How long past its freshness a response stands in for a run that fails (an error, a
    /// panic, a `5xx`): its caller and every request waiting for it get the old response
    /// (`x-parking: stale`; RFC 5861 stale-if-error; default zero: off). Never for responses
    /// that must be revalidated once stale.
    pub fn stale_if_error(self, window: Duration) -> Self {
        self.with_parker(|parker| parker.stale_if_error(window))
    }

    /// How long a failed background refresh keeps every process from trying again (default 1
    /// second).
    pub fn refresh_retry(self, interval: Duration) -> Self {
        self.with_parker(|parker| parker.refresh_retry(interval))
    }

    /// Refreshes hot responses before they expire (XFetch; default off): a hit starts one
    /// background refresh, across the fleet, with a probability that grows as expiry nears, in
    /// proportion to how long the last run took; `beta` 1.0 is the usual choice.
    pub fn early_refresh(self, beta: f64) -> Self {
        self.with_parker(|parker| parker.early_refresh(beta))
    }

    /// How long a request waits for a running leader before the
    /// [wait-timeout policy](ParkingLayer::on_wait_timeout) applies. By default it waits as long
    /// as the leader is alive.
    pub fn wait_timeout(self, timeout: Duration) -> Self {
        self.with_parker(|parker| parker.wait_timeout(timeout))
    }

    /// What a request does after the wait timeout: run the handler itself and store nothing (the
    /// default), or answer with the [wait-timeout status](ParkingLayer::wait_timeout_status).
    pub fn on_wait_timeout(self, policy: WaitTimeoutPolicy) -> Self {
        self.with_parker(|parker| parker.on_wait_timeout(policy))
    }

    /// The status of the layer's answer when a request gave up waiting (default `504 Gateway
    /// Timeout`).
    pub fn wait_timeout_status(self, status: StatusCode) -> Self {
        self.with_http(|http| http.wait_timeout_status = status)
    }

    /// The status of the layer's answer when the backend is down and fails closed (default `503
    /// Service Unavailable`).
    pub fn unavailable_status(self, status: StatusCode) -> Self {
        self.with_http(|http| http.unavailable_status = status)
    }

    /// Where windows and locks live: a [`MemoryBackend`](crate::MemoryBackend) (one process, the
    /// default) or a `RedisBackend` (every process on one Redis).
    pub fn backend(self, backend: impl Backend) -> Self {
        self.with_parker(|parker| parker.backend(backend))
    }

    /// Uses `builder`'s settings for the engine (to share one builder, or for its test hooks).
    /// The layer's [TTL](ParkingLayer::ttl) stays the layer's.
    pub fn parker_builder(self, builder: ParkerBuilder) -> Self {
        let ttl = self.http.rules.ttl;
        self.with_parker(|_| builder.ttl(ttl))
    }

    /// The engine behind this layer, shared by every service it wraps.
    pub fn parker(&self) -> &Parker<StoredResponse> {
        self.built.get_or_init(|| self.parker.clone().build())
    }

    /// Counters of outcomes and handler runs of every service this layer wraps.
    pub fn stats(&self) -> Stats {
        self.parker().stats()
    }

    fn with_http(mut self, change: impl FnOnce(&mut HttpConfig)) -> Self {
        change(Arc::make_mut(&mut self.http));
        self
    }

    fn with_parker(mut self, change: impl FnOnce(ParkerBuilder) -> ParkerBuilder) -> Self {
        self.parker = change(self.parker);
        // A new engine for the new settings: a layer is configured before it wraps anything.
        self.built = Arc::default();
        self
    }
}

impl<S> tower_layer::Layer<S> for ParkingLayer {
    type Service = Parking<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Parking::new(inner, self.parker().clone(), Arc::clone(&self.http))
    }
}
