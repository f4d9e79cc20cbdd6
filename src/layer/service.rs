//! [`Parking`]: what each request goes through.
//!
//! - A write (an unsafe method that is not parked) goes through, and its success invalidates
//!   what is stored for its URI before its response is returned.
//! - A request that must reach the inner service as it is (method not parked, upgrade, origin
//!   preconditions, no key) goes through.
//! - Every other request is parked, with its own conditions and range taken off: the run it may
//!   share is the plain one, and each caller's answer (`304`, full `200`) is derived from it.

use std::{
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::oneshot;
use tower_service::Service;

use super::{
    freshness::{self, Decision, Head},
    sharing::{self, Conditions},
    status::mark,
    HttpConfig, ResponseFuture,
};
use crate::{
    backend::Lookup,
    body::{collect_limited, BoxError, Collected},
    clock,
    parker::{Completion, Keep},
    Key, Outcome, ParkError, Parker, ParkingBody, StoredResponse,
};

/// The middleware built by [`ParkingLayer`](super::ParkingLayer).
///
/// It never reserves the inner service for a request that does not run it: only the request
/// that runs the handler calls `poll_ready` on (a clone of) the inner service, so requests parked
/// behind a leader, and hits, hold none of its capacity.
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
    pub(crate) fn new(inner: S, parker: Parker<StoredResponse>, http: Arc<HttpConfig>) -> Self {
        Self {
            inner,
            parker,
            http,
        }
    }

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
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is asked of the inner service by the request that runs it, and only then.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The path is chosen here, so each boxed future holds the state of its own path only.
        let (parker, http, inner) = (
            self.parker.clone(),
            Arc::clone(&self.http),
            self.inner.clone(),
        );
        let parked = http.methods.contains(request.method());
        // An unsafe method (RFC 9110 §9.2.1) changes the resource: its success invalidates what
        // is stored for it (RFC 9111 §4.4).
        if !parked && !request.method().is_safe() {
            return ResponseFuture::new(write(parker, http, inner, request));
        }
        let (parts, body) = request.into_parts();
        let key = (parked
            && !sharing::is_upgrade(&parts)
            && !sharing::has_origin_preconditions(&parts.headers))
        .then(|| http.key.key(&parts))
        .flatten();
        let mut request = Request::from_parts(parts, body);
        let Some(key) = key else {
            return ResponseFuture::new(
                async move { bypass(&parker, &http, inner, request).await },
            );
        };
        let conditions = Conditions::take(request.headers_mut());
        ResponseFuture::new(park(parker, http, key, inner, request, conditions))
    }
}

/// The services the layer wraps, as its request path needs them (spawned, cloned, sent).
trait Inner<ReqBody, ResBody>:
    Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send, Error: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S, ReqBody, ResBody> Inner<ReqBody, ResBody> for S where
    S: Service<Request<ReqBody>, Response = Response<ResBody>, Future: Send, Error: Send>
        + Clone
        + Send
        + 'static
{
}

/// The bodies of the responses the layer shares.
trait SharedBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

impl<B> SharedBody for B where B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static {}

/// Waits for `service` to be ready, then calls it.
async fn ready_call<S, R>(mut service: S, request: R) -> Result<S::Response, S::Error>
where
    S: Service<R>,
{
    std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
    service.call(request).await
}

async fn bypass<S, ReqBody, ResBody>(
    parker: &Parker<StoredResponse>,
    http: &HttpConfig,
    inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ParkingBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    parker.record(Outcome::Bypass);
    let mut response = ready_call(inner, request).await?.map(ParkingBody::inner);
    mark(http, response.headers_mut(), Outcome::Bypass);
    Ok(response)
}

/// A write: goes through; when it succeeds, every stored response of its URI (and of its
/// `Location` and `Content-Location` on the same authority) is dropped, in every process on the
/// backend, before the writer gets its response (RFC 9111 §4.4).
async fn write<S, ReqBody, ResBody>(
    parker: Parker<StoredResponse>,
    http: Arc<HttpConfig>,
    inner: S,
    request: Request<ReqBody>,
) -> Result<Response<ParkingBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let (parts, body) = request.into_parts();
    let own_key = http.key.key(&parts);
    let mut target = Request::new(());
    *target.uri_mut() = parts.uri.clone();
    *target.headers_mut() = parts.headers.clone();
    let (mut target, ()) = target.into_parts();
    let response = bypass(&parker, &http, inner, Request::from_parts(parts, body)).await?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        let mut keys: Vec<Key> = own_key.into_iter().collect();
        for location in sharing::invalidated_locations(&target, response.headers()) {
            target.uri = location;
            keys.extend(http.key.key(&target));
        }
        for key in keys {
            if let Err(error) = parker.invalidate(key).await {
                tracing::warn!(%error, "a write could not invalidate what is stored for its URI");
            }
        }
    }
    Ok(response)
}

/// What the leader's work hands straight to its own caller: its original response (same head,
/// extensions and version), or the inner service's error.
type OwnDelivery<ResBody, E> = Result<Response<ParkingBody<ResBody>>, E>;

/// The request, held where both the caller (to match stored variants against it) and the run
/// that may take it can reach it.
type Slot<ReqBody> = Arc<Mutex<Caller<ReqBody>>>;

/// A caller's request until a run of its own takes it, then the head it ran with: the caller
/// still matches what it is served against its own head (a stale response served while its
/// request runs as the refresh, on another task that may take it first).
struct Caller<ReqBody> {
    request: Option<Request<ReqBody>>,
    ran_with: Option<Arc<Request<()>>>,
}

impl<ReqBody> Caller<ReqBody> {
    fn new(request: Request<ReqBody>) -> Self {
        Self {
            request: Some(request),
            ran_with: None,
        }
    }

    /// The request, for a run; its head stays for the caller.
    fn take_to_run(&mut self) -> Option<(Request<ReqBody>, Arc<Request<()>>)> {
        let request = self.request.take()?;
        let mut head = Request::new(());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.headers_mut() = request.headers().clone();
        let head = Arc::new(head);
        self.ran_with = Some(Arc::clone(&head));
        Some((request, head))
    }

    fn head(&self) -> Option<Head<'_>> {
        match (&self.request, &self.ran_with) {
            (Some(request), _) => Some(Head::of(request)),
            (None, Some(head)) => Some(Head::of(head)),
            (None, None) => None,
        }
    }
}

fn lock<T>(slot: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only taken for a moment and never across an await: a poisoned lock is still sound.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn park<S, ReqBody, ResBody>(
    parker: Parker<StoredResponse>,
    http: Arc<HttpConfig>,
    mut key: Key,
    inner: S,
    request: Request<ReqBody>,
    conditions: Conditions,
) -> Result<Response<ParkingBody<ResBody>>, S::Error>
where
    S: Inner<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: SharedBody,
{
    let mut lookup = Lookup::Check;
    // The hit path: a fresh response this request may have, without building a run.
    if let Some(stored) = parker.fresh_hit(&key) {
        match next_step(&stored, Head::of(&request), Outcome::Hit, &http) {
            None => {
                parker.record(Outcome::Hit);
                return Ok(reused(&http, stored, Outcome::Hit, &conditions));
            }
            Some(Err(variant)) => key = key.refined(&variant),
            Some(Ok(skip)) => lookup = skip,
        }
    }
    let slot: Slot<ReqBody> = Arc::new(Mutex::new(Caller::new(request)));
    // A response found under the key may be another variant (its `Vary` names fields this
    // request has other values of): the request then parks under a key with those values.
    for _ in 0..3 {
        let (deliver, mut delivered) = oneshot::channel();
        let work = leader_work(Arc::clone(&slot), Arc::clone(&http), inner.clone(), deliver);
        let refreshes = {
            let slot = Arc::clone(&slot);
            move |stored: &StoredResponse| {
                let caller = lock(&slot);
                caller
                    .head()
                    .is_some_and(|head| freshness::matches(stored, head))
            }
        };
        let (outcome, result) = parker.execute(key.clone(), lookup, refreshes, work).await;
        // A stale value stands in for a failed run: its own response is not delivered.
        let own = delivered
            .try_recv()
            .ok()
            .filter(|_| outcome != Outcome::Stale);
        if let Some(own) = own {
            parker.record(outcome);
            let mut response = own?;
            if conditions.not_modified(response.status(), response.headers()) {
                response = not_modified(response.into_parts().0.headers);
            }
            mark(&http, response.headers_mut(), outcome);
            return Ok(response);
        }
        let stored = match result {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                parker.record(outcome);
                return Ok(error_response(&http, &ParkError::Cancelled, outcome));
            }
            Err(error) => {
                parker.record(outcome);
                return Ok(error_response(&http, &error, outcome));
            }
        };
        let next = {
            let caller = lock(&slot);
            caller
                .head()
                .and_then(|head| next_step(&stored, head, outcome, &http))
        };
        match next {
            None => {
                parker.record(outcome);
                return Ok(reused(&http, stored, outcome, &conditions));
            }
            Some(Err(variant)) => key = key.refined(&variant),
            Some(Ok(skip)) => lookup = skip,
        }
    }
    // Variants keep changing under this request: it goes through on its own.
    let request = lock(&slot).request.take();
    match request {
        Some(request) => bypass(&parker, &http, inner, request).await,
        None => {
            parker.record(Outcome::Bypass);
            Ok(error_response(
                &http,
                &ParkError::Cancelled,
                Outcome::Bypass,
            ))
        }
    }
}

/// What a request does with a response found for its key: take it (`None`), park under the key
/// of its own variant (`Err`), or, refusing a stored one by its own directives, run (`Ok(Skip)`).
fn next_step(
    stored: &StoredResponse,
    head: Head<'_>,
    outcome: Outcome,
    http: &HttpConfig,
) -> Option<Result<Lookup, String>> {
    if let Some(variant) = freshness::other_variant(stored, head) {
        // The part a request adds to its key for a response that varies.
        return Some(Err(format!("vary:{variant}")));
    }
    (outcome == Outcome::Hit && freshness::refused_by_request(stored, head, &http.rules))
        .then_some(Ok(Lookup::Skip))
}

fn leader_work<S, ReqBody, ResBody>(
    slot: Slot<ReqBody>,
    http: Arc<HttpConfig>,
    inner: S,
    deliver: oneshot::Sender<OwnDelivery<ResBody, S::Error>>,
) -> impl FnOnce(
    Option<StoredResponse>,
) -> BoxFuture<'static, Result<Completion<StoredResponse>, ParkError>>
       + Send
       + 'static
where
    S: Inner<ReqBody, ResBody>,
    ReqBody: Send + 'static,
    ResBody: SharedBody,
{
    move |previous| Box::pin(lead(slot, http, inner, deliver, previous))
}

/// The run: the inner service answers the plain request (or a revalidation of `previous`), and
/// the answer is judged: shared and kept, shared only, or for its own caller alone.
async fn lead<S, ReqBody, ResBody>(
    slot: Slot<ReqBody>,
    http: Arc<HttpConfig>,
    inner: S,
    deliver: oneshot::Sender<OwnDelivery<ResBody, S::Error>>,
    previous: Option<StoredResponse>,
) -> Result<Completion<StoredResponse>, ParkError>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    let taken = lock(&slot).take_to_run();
    let Some((mut request, plain)) = taken else {
        return Err(ParkError::Cancelled);
    };
    let rules = &http.rules;
    let revalidating = previous.and_then(|previous| {
        let conditions = freshness::revalidation(&previous, Head::of(&request), rules)?;
        Some((previous, conditions))
    });
    if let Some((_, conditions)) = &revalidating {
        request.headers_mut().extend(conditions.clone());
    }
    let response = match ready_call(inner, request).await {
        Ok(response) => response,
        Err(error) => {
            let _ = deliver.send(Err(error));
            return Err(ParkError::failed("the inner service returned an error"));
        }
    };
    let (parts, body) = response.into_parts();
    if let Some((previous, _)) = revalidating {
        if parts.status == StatusCode::NOT_MODIFIED {
            return match freshness::refreshed(&previous, Head::of(&plain), &parts.headers, rules)
            {
                Some(Decision::Share(stored, keep)) => Ok(Completion::Store(
                    stored,
                    Keep {
                        revalidated: true,
                        ..keep
                    },
                )),
                _ => Err(ParkError::failed(
                    "the handler answered 304 Not Modified for a validator the stored response does not have",
                )),
            };
        }
    }
    let pass = Completion::Pass(http.pass_for);
    if !http.share_when.should_share(&parts) {
        let _ = deliver.send(Ok(Response::from_parts(parts, ParkingBody::inner(body))));
        return Ok(pass);
    }
    let collected = collect_limited(body, http.body_limit, http.body_timeout)
        .await
        .map_err(ParkError::failed)?;
    let (data, trailers) = match collected {
        Collected::Overflow(body) => {
            let _ = deliver.send(Ok(Response::from_parts(parts, body)));
            return Ok(pass);
        }
        Collected::Complete { data, trailers } => (data, trailers),
    };
    if trailers.is_some() {
        let body = ParkingBody::with_trailers(data, trailers);
        let _ = deliver.send(Ok(Response::from_parts(parts, body)));
        return Ok(pass);
    }
    let decision = freshness::judge(
        Head::of(&plain),
        parts.status,
        &parts.headers,
        data.clone(),
        rules,
        clock::now(),
    );
    let _ = deliver.send(Ok(Response::from_parts(parts, ParkingBody::full(data))));
    Ok(match decision {
        Decision::Pass => pass,
        Decision::Share(stored, keep) => Completion::Store(stored, keep),
    })
}

/// A stored or shared response as this caller gets it: with its `Age`, and as `304 Not
/// Modified` when the caller's own conditions say it has it already.
fn reused<B>(
    http: &HttpConfig,
    stored: StoredResponse,
    outcome: Outcome,
    conditions: &Conditions,
) -> Response<ParkingBody<B>> {
    let mut response = if conditions.not_modified(stored.status, &stored.headers) {
        not_modified(stored.headers)
    } else {
        let mut response = Response::new(ParkingBody::full(stored.body));
        *response.status_mut() = stored.status;
        *response.headers_mut() = stored.headers;
        response
    };
    if let Some(record) = &stored.policy {
        let age = freshness::age(record, clock::now());
        response.headers_mut().insert(header::AGE, age_value(age));
    }
    mark(http, response.headers_mut(), outcome);
    response
}

/// An `Age` value; the first minute's, the usual ones on a hot key, without an allocation.
fn age_value(age: u64) -> HeaderValue {
    const SMALL: [&str; 60] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
        "32", "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46",
        "47", "48", "49", "50", "51", "52", "53", "54", "55", "56", "57", "58", "59",
    ];
    match SMALL.get(age as usize) {
        Some(small) => HeaderValue::from_static(small),
        None => HeaderValue::from(age),
    }
}

fn not_modified<B>(headers: http::HeaderMap) -> Response<ParkingBody<B>> {
    let mut response = Response::new(ParkingBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.headers_mut() = sharing::not_modified_head(headers);
    response
}

/// The response a caller gets when its flight produced no response to hand out.
fn error_response<B>(
    http: &HttpConfig,
    error: &ParkError,
    outcome: Outcome,
) -> Response<ParkingBody<B>> {
    let (status, message) = match error {
        ParkError::WaitTimeout(_) => (
            http.wait_timeout_status,
            "timed out waiting for a parked request",
        ),
        ParkError::BackendUnavailable(_) => {
            (http.unavailable_status, "request parking is unavailable")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "the handler failed"),
    };
    tracing::debug!(%error, %status, "parked request failed");
    let mut response = Response::new(ParkingBody::full(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    mark(http, response.headers_mut(), outcome);
    response
}
