//! [`ParkingLayer`] and [`Parking`]: the HTTP face of the [`Parker`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    body::{collect_limited, BoxError, Collected},
    parker::Completion,
    Backend, Key, KeyFn, Outcome, ParkError, Parker, ParkerBuilder, ParkingBody, PerUser, Stats,
    StoredResponse, WaitTimeoutPolicy,
};

/// The default name of the outcome header.
pub const PARKING_HEADER: HeaderName = HeaderName::from_static("x-parking");

/// Parks concurrent requests for the same key behind one run of the inner service, and serves its
/// response to all of them and to every request in the TTL window.
///
/// | setting | default |
/// |---|---|
/// | [`key`](ParkingLayer::key) | [`PerUser`]: method, path, query, hash of `Authorization` and `Cookie` |
/// | [`ttl`](ParkingLayer::ttl) | 10 seconds |
/// | [`methods`](ParkingLayer::methods) | `GET`, `HEAD` |
/// | [`storable_statuses`](ParkingLayer::storable_statuses) | 200, 301, 302 |
/// | [`body_limit`](ParkingLayer::body_limit) | 1 MiB |
/// | [`status_header`](ParkingLayer::status_header) | on, `x-parking: <outcome>` |
/// | [`wait_timeout`](ParkingLayer::wait_timeout) | none: wait as long as the leader is alive |
/// | [`on_wait_timeout`](ParkingLayer::on_wait_timeout) | run the handler locally, store nothing |
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
struct HttpConfig {
    key: Arc<dyn KeyFn>,
    methods: Vec<Method>,
    storable_statuses: Vec<StatusCode>,
    body_limit: usize,
    status_header: Option<HeaderName>,
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
            .field("storable_statuses", &self.http.storable_statuses)
            .field("body_limit", &self.http.body_limit)
            .field("status_header", &self.http.status_header)
            .finish_non_exhaustive()
    }
}

impl ParkingLayer {
    /// A layer with the defaults in the table above.
    pub fn new() -> Self {
        Self {
            parker: Parker::<StoredResponse>::builder(),
            built: Arc::default(),
            http: Arc::new(HttpConfig {
                key: Arc::new(PerUser),
                methods: vec![Method::GET, Method::HEAD],
                storable_statuses: vec![
                    StatusCode::OK,
                    StatusCode::MOVED_PERMANENTLY,
                    StatusCode::FOUND,
                ],
                body_limit: 1024 * 1024,
                status_header: Some(PARKING_HEADER),
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
        self.with_http(|http| http.key = Arc::new(key))
    }

    /// How long a response is served to later requests without running the handler. Zero keeps
    /// nothing: concurrent requests still share one run.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with_parker(|parker| parker.ttl(ttl))
    }

    /// Which methods are parked; others go straight through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with_http(|http| http.methods = methods)
    }

    /// Which statuses are kept for the TTL window. Other responses are still shared with the
    /// requests that waited for them, but not kept.
    pub fn storable_statuses(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses = statuses.into_iter().collect();
        self.with_http(|http| http.storable_statuses = statuses)
    }

    /// The largest body shared or stored, in bytes. A larger one streams to its own caller whole;
    /// the requests that waited for it run the handler themselves.
    pub fn body_limit(self, bytes: usize) -> Self {
        self.with_http(|http| http.body_limit = bytes)
    }

    /// Whether responses carry `x-parking: <outcome>`.
    pub fn status_header(self, enabled: bool) -> Self {
        self.with_http(|http| http.status_header = enabled.then_some(PARKING_HEADER))
    }

    /// How long a request waits for a running leader before the
    /// [wait-timeout policy](ParkingLayer::on_wait_timeout) applies. By default it waits as long
    /// as the leader is alive.
    pub fn wait_timeout(self, timeout: Duration) -> Self {
        self.with_parker(|parker| parker.wait_timeout(timeout))
    }

    /// What a request does after the wait timeout: run the handler itself and store nothing (the
    /// default), or answer `504 Gateway Timeout`.
    pub fn on_wait_timeout(self, policy: WaitTimeoutPolicy) -> Self {
        self.with_parker(|parker| parker.on_wait_timeout(policy))
    }

    /// Where windows and locks live: a [`MemoryBackend`](crate::MemoryBackend) (one process, the
    /// default) or a `RedisBackend` (every process on one Redis).
    pub fn backend(self, backend: impl Backend) -> Self {
        self.with_parker(|parker| parker.backend(backend))
    }

    /// Uses `builder`'s settings for the engine (for its test hooks, or to share one builder).
    #[doc(hidden)]
    pub fn parker_builder(self, builder: ParkerBuilder) -> Self {
        self.with_parker(|_| builder)
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

impl<S> Layer<S> for ParkingLayer {
    type Service = Parking<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Parking {
            inner,
            parker: self.parker().clone(),
            http: Arc::clone(&self.http),
        }
    }
}

/// The middleware built by [`ParkingLayer`].
#[derive(Clone)]
pub struct Parking<S> {
    inner: S,
    parker: Parker<StoredResponse>,
    http: Arc<HttpConfig>,
}

impl<S: fmt::Debug> fmt::Debug for Parking<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parking")
            .field("inner", &self.inner)
            .field("parker", &self.parker)
            .finish()
    }
}

impl<S> Parking<S> {
    /// The engine this service parks requests with.
    pub fn parker(&self) -> &Parker<StoredResponse> {
        &self.parker
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Parking<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ParkingBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let key = self
            .http
            .methods
            .contains(&parts.method)
            .then(|| self.http.key.key(&parts))
            .flatten();
        let request = Request::from_parts(parts, body);
        let Some(key) = key else {
            self.parker.record_bypass();
            let header = self.http.status_header.clone();
            return ResponseFuture {
                kind: Kind::Bypass {
                    future: self.inner.call(request),
                    header,
                },
            };
        };
        // The service that was polled ready handles this request; a clone takes its place.
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let future = park(
            self.parker.clone(),
            Arc::clone(&self.http),
            key,
            inner,
            request,
        );
        ResponseFuture {
            kind: Kind::Parked {
                future: Box::pin(future),
            },
        }
    }
}

/// What the work hands straight to its own caller: a response nobody else may have, or the
/// inner service's error.
type OwnDelivery<ResBody, E> = Result<Response<ParkingBody<ResBody>>, E>;

async fn park<S, ReqBody, ResBody>(
    parker: Parker<StoredResponse>,
    http: Arc<HttpConfig>,
    key: Key,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ParkingBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    let (deliver, mut delivered) = oneshot::channel::<OwnDelivery<ResBody, S::Error>>();
    let work_http = Arc::clone(&http);
    let work = move || async move {
        let response = match inner.call(request).await {
            Ok(response) => response,
            Err(error) => {
                let _ = deliver.send(Err(error));
                return Err(ParkError::failed("the inner service returned an error"));
            }
        };
        let (parts, body) = response.into_parts();
        let (data, trailers) = match collect_limited(body, work_http.body_limit)
            .await
            .map_err(ParkError::failed)?
        {
            Collected::Overflow(body) => {
                let _ = deliver.send(Ok(Response::from_parts(parts, body)));
                return Ok(Completion::Private);
            }
            Collected::Complete { data, trailers } => (data, trailers),
        };
        if trailers.is_some() || StoredResponse::is_private(&parts.headers) {
            let body = ParkingBody::with_trailers(data, trailers);
            let _ = deliver.send(Ok(Response::from_parts(parts, body)));
            return Ok(Completion::Private);
        }
        let storable = work_http.storable_statuses.contains(&parts.status);
        let stored = StoredResponse::new(parts.status, parts.headers, data);
        Ok(if storable {
            Completion::Store(stored)
        } else {
            Completion::Share(stored)
        })
    };

    let (outcome, result) = parker.execute(key, work).await;
    let mut response = match (result, delivered.try_recv()) {
        (_, Ok(own)) => own?,
        (Ok(Some(stored)), _) => {
            let mut response = Response::new(ParkingBody::full(stored.body));
            *response.status_mut() = stored.status;
            *response.headers_mut() = stored.headers;
            response
        }
        (Ok(None), Err(_)) => error_response(&ParkError::Cancelled),
        (Err(error), Err(_)) => error_response(&error),
    };
    if let Some(header) = &http.status_header {
        response
            .headers_mut()
            .insert(header.clone(), HeaderValue::from_static(outcome.as_str()));
    }
    Ok(response)
}

/// The response a caller gets when its flight produced no response to hand out.
fn error_response<B>(error: &ParkError) -> Response<ParkingBody<B>> {
    let (status, message) = match error {
        ParkError::WaitTimeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "timed out waiting for a parked request",
        ),
        ParkError::BackendUnavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "request parking is unavailable",
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "the handler failed"),
    };
    tracing::debug!(%error, %status, "parked request failed");
    let mut response = Response::new(ParkingBody::full(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pin_project! {
    /// The response future of [`Parking`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Bypass { #[pin] future: F, header: Option<HeaderName> },
        Parked { future: BoxFuture<'static, Result<Response<ParkingBody<B>>, E>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ParkingBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Bypass { future, header } => {
                let response = std::task::ready!(future.poll(cx))?;
                let mut response = response.map(ParkingBody::inner);
                if let Some(header) = header {
                    response.headers_mut().insert(
                        header.clone(),
                        HeaderValue::from_static(Outcome::Bypass.as_str()),
                    );
                }
                Poll::Ready(Ok(response))
            }
            KindProj::Parked { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
