//! [`Parker`]: the engine. One flight per key in this process, one leader per key across every
//! process that shares the backend, and a TTL window during which nobody runs the work again.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures_util::{future::BoxFuture, FutureExt};
use tokio::time::Instant;

use crate::{
    backend::{Acquire, Backend, BackendError, EntryKind, Lease, Lookup, Stamp, Wake},
    clock,
    flight::{Fallback, Flights, Joined},
    outcome::Counters,
    Key, MemoryBackend, Outcome, ParkError, Stats, Value, WaitTimeoutPolicy,
};

/// What a flight ends with, as every caller waiting on it sees it. `Ok(None)`: the value was
/// private to the leader's caller, who got it through its own channel.
type Landed<V> = (Outcome, Result<Option<V>, ParkError>);

/// How long a value that is shared but not fresh (TTL zero, `max-age=0`) stays readable, so that
/// the callers parked on its run in other processes can still pick it up.
const HANDOFF: Duration = Duration::from_secs(1);

/// What the work decided about its value.
pub(crate) enum Completion<V> {
    /// Hand it to every caller of this flight, and keep it as `keep` says.
    Store(V, Keep),
    /// Only the caller whose work ran may have it (it delivered it itself); every joined caller
    /// runs its own work, and so does every caller of the key for this long (hit-for-pass).
    Pass(Duration),
}

/// How long a stored value serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keep {
    /// Served without running the work for this long. Zero: handed only to the callers
    /// already waiting for this run, in every process.
    pub(crate) fresh_for: Duration,
    /// Kept this long in all (at least `fresh_for`): a stale value is handed to the next run of
    /// its key, which may revalidate it instead of producing it again.
    pub(crate) keep_for: Duration,
    /// The run revalidated the previous value rather than producing a new one.
    pub(crate) revalidated: bool,
}

impl Keep {
    /// Fresh for `ttl`, then gone.
    pub(crate) fn for_ttl(ttl: Duration) -> Self {
        Self {
            fresh_for: ttl,
            keep_for: ttl,
            revalidated: false,
        }
    }
}

/// A hook run by a follower between finding the lock held and waiting for the leader.
type BeforeWait = Arc<dyn Fn(Key) -> BoxFuture<'static, ()> + Send + Sync>;

/// Runs a piece of work once per key per TTL window and hands its value to every caller.
///
/// Concurrent calls with one key in this process share one flight; across processes, the
/// [backend](crate::Backend) elects one leader and parks everyone else until its value is stored.
/// The work runs on its own task, so a caller that goes away does not cancel it for the others.
///
/// ```
/// use std::{convert::Infallible, time::Duration};
/// use tower_parking::{Parker, ParkerBuilder};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let parker: Parker<String> = ParkerBuilder::new().ttl(Duration::from_secs(60)).build();
///
/// let fetch_token = || async { Ok::<_, Infallible>("token-42".to_string()) };
/// let (a, b) = tokio::join!(parker.run("token", fetch_token), parker.run("token", fetch_token));
/// assert_eq!(a.unwrap(), "token-42");
/// assert_eq!(b.unwrap(), "token-42");
/// assert_eq!(parker.stats().executions, 1);
/// # }
/// ```
pub struct Parker<V: Value> {
    inner: Arc<Inner<V>>,
}

struct Inner<V: Value> {
    flights: Arc<Flights<Landed<V>>>,
    backend: Arc<dyn Backend>,
    ttl: Duration,
    wait_timeout: Option<Duration>,
    on_wait_timeout: WaitTimeoutPolicy,
    counters: Counters,
    warnings: RateLimitedWarning,
    before_wait: Option<BeforeWait>,
}

impl<V: Value> Clone for Parker<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<V: Value> fmt::Debug for Parker<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parker")
            .field("ttl", &self.inner.ttl)
            .field("wait_timeout", &self.inner.wait_timeout)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl<V: Value> Default for Parker<V> {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl<V: Value> Parker<V> {
    /// A parker on a fresh [`MemoryBackend`], with the default settings of [`ParkerBuilder`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts building a parker.
    pub fn builder() -> ParkerBuilder {
        ParkerBuilder::default()
    }

    /// Runs `work` for `key` unless a flight for `key` is already running (then waits for it) or a
    /// value is stored for it (then returns that), and hands the value to every caller.
    ///
    /// `Ok` values are stored for the TTL window; errors and panics reach every waiting caller at
    /// once and store nothing, so the next call runs the work again.
    pub async fn run<F, Fut, E>(&self, key: impl Into<Key>, work: F) -> Result<V, ParkError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.run_with_outcome(key, work).await.0
    }

    /// Like [`run`](Parker::run), and also says how the call was served.
    pub async fn run_with_outcome<F, Fut, E>(
        &self,
        key: impl Into<Key>,
        work: F,
    ) -> (Result<V, ParkError>, Outcome)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let keep = Keep::for_ttl(self.inner.ttl);
        let work = move |_previous: Option<V>| async move {
            work()
                .await
                .map(|value| Completion::Store(value, keep))
                .map_err(ParkError::failed)
        };
        let (outcome, result) = self.execute(key.into(), work).await;
        self.record(outcome);
        // `work` never answers `Pass`, so a missing value means the flight was cut short.
        (
            result.and_then(|value| value.ok_or(ParkError::Cancelled)),
            outcome,
        )
    }

    /// Forgets every stored value whose key has `key`'s URI part (every variant), and the
    /// running flights for them, for later callers (callers already waiting still get the
    /// running flight's value, which is then not stored). The next call runs the work again.
    pub async fn invalidate(&self, key: impl Into<Key>) -> Result<(), BackendError> {
        let key = key.into();
        self.inner.flights.forget_uri(key.uri_part());
        self.inner.backend.invalidate(&key).await
    }

    /// Counters of outcomes and executions since the parker was built.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
    }

    /// How many flights are running in this process now.
    pub fn in_flight(&self) -> usize {
        self.inner.flights.len()
    }

    pub(crate) fn record(&self, outcome: Outcome) {
        self.inner.counters.record(outcome);
    }

    /// The heart of every call: joins or starts the key's flight and says how this caller was
    /// served. `Ok(None)`: the caller's own `work` ran and delivered its private value itself.
    ///
    /// `work` gets the key's stored value when it is no longer fresh but still kept (for
    /// revalidation). The outcome is not counted: the caller counts it once it knows it is the
    /// one it serves (see [`record`](Parker::record)).
    pub(crate) async fn execute<F, Fut>(&self, key: Key, work: F) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Completion<V>, ParkError>> + Send + 'static,
    {
        self.execute_with(key, Lookup::Check, work).await
    }

    /// [`execute`](Parker::execute); with [`Lookup::Skip`], a stored value, fresh or not, is not
    /// served: the call joins the key's running flight or starts one.
    pub(crate) async fn execute_with<F, Fut>(&self, key: Key, lookup: Lookup, work: F) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Completion<V>, ParkError>> + Send + 'static,
    {
        let inner = &self.inner;
        let peeked = match lookup {
            Lookup::Check => inner.backend.peek(&key).and_then(Found::fresh),
            Lookup::Skip => None,
        };
        match peeked {
            Some(Found::Value(payload)) => {
                // One that does not decode is left to the flight, which overwrites it.
                if let Ok(value) = V::decode(payload) {
                    return (Outcome::Hit, Ok(Some(value)));
                }
            }
            Some(Found::Pass) => return (Outcome::Pass, inner.run_unshared(work).await),
            None => {}
        }
        match inner.flights.join_or_start(&key) {
            Joined::Leader(landing, flight, fallback) => {
                let task_inner = Arc::clone(inner);
                // The flight hands the work back when the key turns out to be hit-for-pass, so
                // that it lands at once and its callers all run their own work together.
                let (give_back, given_back) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let landed = task_inner
                        .fly(&key, lookup, work, &fallback, give_back)
                        .await;
                    landing.land(landed);
                });
                let landed = flight
                    .await
                    .unwrap_or((Outcome::Miss, Err(ParkError::Cancelled)));
                match given_back.await {
                    Ok(work) => (Outcome::Pass, inner.run_unshared(work).await),
                    Err(_) => landed,
                }
            }
            Joined::Follower(flight, fallback) => {
                let landed = match inner.wait_timeout {
                    Some(timeout) => tokio::time::timeout(timeout, flight).await.ok(),
                    None => Some(flight.await),
                };
                match landed {
                    None => inner.after_wait_timeout(work, &fallback).await,
                    Some(Some((_, Ok(None)))) => (Outcome::Pass, inner.run_unshared(work).await),
                    // The flight gave up on its leader and ran the work itself, for all.
                    Some(Some((Outcome::Timeout, result))) => (Outcome::Timeout, result),
                    Some(Some((_, result))) => (Outcome::Coalesced, result),
                    Some(None) => (Outcome::Coalesced, Err(ParkError::Cancelled)),
                }
            }
        }
    }
}

fn refused(lease: &Lease) {
    tracing::warn!(
        key = %lease.key(),
        "the lease was lost or the key invalidated: this value is served but not stored"
    );
}

/// A stored entry, read.
enum Found {
    Value(bytes::Bytes),
    Pass,
}

impl Found {
    /// The entry if it is fresh now; `None` for a stale or unreadable one.
    fn fresh(entry: bytes::Bytes) -> Option<Self> {
        let (stamp, payload) = Stamp::open(&entry)?;
        stamp
            .is_fresh(clock::now())
            .then(|| Self::read(stamp, payload))
    }

    fn read(stamp: Stamp, payload: bytes::Bytes) -> Self {
        match stamp.kind {
            EntryKind::Pass => Self::Pass,
            EntryKind::Value => Self::Value(payload),
        }
    }
}

impl<V: Value> Inner<V> {
    /// The flight, on its own task: find the value, or lead the work, or wait for the leader.
    async fn fly<F, Fut>(
        self: &Arc<Self>,
        key: &Key,
        mut lookup: Lookup,
        work: F,
        fallback: &Fallback<Landed<V>>,
        give_back: tokio::sync::oneshot::Sender<F>,
    ) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        let lease = self.backend.lease_settings().lease;
        let deadline = self.wait_timeout.map(|timeout| Instant::now() + timeout);
        // A value found after waiting for another leader came from that leader: parked, not hit.
        let mut waited = false;
        loop {
            let entry = match self.backend.acquire(key, lease, lookup).await {
                Err(error) => return self.without_backend("acquire", error, work).await,
                Ok(Acquire::Acquired(lease, previous)) => {
                    let previous = previous
                        .and_then(|entry| Stamp::open(&entry))
                        .filter(|(stamp, _)| stamp.kind == EntryKind::Value)
                        .and_then(|(_, payload)| V::decode(payload).ok());
                    return self.lead(lease, work, previous).await;
                }
                Ok(Acquire::Fresh(entry)) => entry,
                Ok(Acquire::Held { leader, .. }) => {
                    if let Some(hook) = &self.before_wait {
                        hook(key.clone()).await;
                    }
                    waited = true;
                    match self.backend.wait_for(key, lookup, deadline, leader).await {
                        Err(error) => return self.without_backend("wait", error, work).await,
                        Ok(Wake::Stored(entry)) => entry,
                        Ok(Wake::Released) => {
                            lookup = Lookup::Check;
                            continue;
                        }
                        Ok(Wake::TimedOut) => return self.after_wait_timeout(work, fallback).await,
                    }
                }
            };
            let outcome = if waited {
                Outcome::Parked
            } else {
                Outcome::Hit
            };
            let found = Stamp::open(&entry).map(|(stamp, payload)| Found::read(stamp, payload));
            let error = match found {
                Some(Found::Pass) => {
                    // Every caller of the flight runs its own work, the leading one included.
                    let _ = give_back.send(work);
                    return (Outcome::Pass, Ok(None));
                }
                Some(Found::Value(payload)) => match V::decode(payload) {
                    Ok(value) => return (outcome, Ok(Some(value))),
                    Err(error) => error.to_string(),
                },
                None => "not an entry of this version".to_owned(),
            };
            tracing::warn!(key = %key, %error, "stored value does not decode: running the work again to overwrite it");
            lookup = Lookup::Skip;
        }
    }

    /// Runs the work as the leader, renewing the lease while it runs, then stores or releases.
    async fn lead<F, Fut>(self: &Arc<Self>, lease: Lease, work: F, previous: Option<V>) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        let started = Instant::now();
        // On a task of its own, so that a handler that blocks its thread still holds its lease
        // (on a multi-threaded runtime).
        let renewal = tokio::spawn(Arc::clone(self).renew_while_running(lease.clone()));
        // Lets the renewal start (and so leave this worker's own slot, which no other worker may
        // take it from) before the work may block this worker.
        tokio::task::yield_now().await;
        let completion = self.run_work(move || work(previous)).await;
        renewal.abort();
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now = clock::now();
        let stamp = |kind, fresh_for: Duration, keep_for: Duration| Stamp {
            fence: lease.fence(),
            fresh_until: now.saturating_add(clock::micros(fresh_for)),
            keep_until: now.saturating_add(clock::micros(keep_for)),
            stored_at: now,
            took_ms,
            kind,
        };
        let (outcome, result, entry) = match completion {
            Ok(Completion::Store(value, keep)) => {
                let keep_for = keep.keep_for.max(keep.fresh_for);
                // Not fresh and not kept: kept just long enough for the callers parked on this
                // run elsewhere to pick it up.
                let keep_for = if keep_for.is_zero() {
                    HANDOFF
                } else {
                    keep_for
                };
                let entry = stamp(EntryKind::Value, keep.fresh_for, keep_for).seal(&value.encode());
                let outcome = if keep.revalidated {
                    Outcome::Revalidated
                } else {
                    Outcome::Miss
                };
                (outcome, Ok(Some(value)), Some((entry, keep_for)))
            }
            Ok(Completion::Pass(pass_for)) => {
                let entry = (!pass_for.is_zero()).then(|| {
                    (
                        stamp(EntryKind::Pass, pass_for, pass_for).seal(b""),
                        pass_for,
                    )
                });
                (Outcome::Miss, Ok(None), entry)
            }
            Err(error) => (Outcome::Miss, Err(error), None),
        };
        match entry {
            Some((entry, keep_for)) => {
                match self.backend.complete(&lease, entry.clone(), keep_for).await {
                    Ok(true) => {}
                    Ok(false) => refused(&lease),
                    Err(error) => {
                        // The callers of this flight are not kept waiting for Redis to come back.
                        let this = Arc::clone(self);
                        tokio::spawn(
                            async move { this.store(&lease, entry, keep_for, error).await },
                        );
                    }
                }
            }
            None => {
                if let Err(error) = self.backend.release(&lease).await {
                    self.backend_failed("release", &error);
                }
            }
        }
        (outcome, result)
    }

    /// Stores the leader's entry after a first attempt failed with `error`, trying again while
    /// its lease would still be valid (the failure may be a passing one, a connection being made
    /// again), so that a blip does not lose the run's result.
    async fn store(
        &self,
        lease: &Lease,
        entry: bytes::Bytes,
        keep_for: Duration,
        error: BackendError,
    ) {
        let give_up = Instant::now() + lease.duration();
        let mut pause = Duration::from_millis(20);
        let mut error = error;
        while Instant::now() + pause < give_up {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
            match self.backend.complete(lease, entry.clone(), keep_for).await {
                Ok(true) => return,
                Ok(false) => return refused(lease),
                Err(again) => error = again,
            }
        }
        self.backend_failed("complete", &error);
    }

    /// Extends the lease every `renew_every` until aborted.
    async fn renew_while_running(self: Arc<Self>, lease: Lease) {
        let every = self
            .backend
            .lease_settings()
            .renew_every
            .max(Duration::from_millis(1));
        loop {
            tokio::time::sleep(every).await;
            match self.backend.renew(&lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        key = %lease.key(),
                        "lost the lease while the work runs (renewal refused): another leader may run it too"
                    );
                    return;
                }
                Err(error) => self.backend_failed("renew", &error),
            }
        }
    }

    /// The work, with its panics caught and counted.
    async fn run_work<F, Fut>(&self, work: F) -> Result<Completion<V>, ParkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        self.counters.execution();
        let result = match AssertUnwindSafe(async move { work().await })
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(_panic) => Err(ParkError::Panicked),
        };
        if result.is_err() {
            self.counters.failure();
        }
        result
    }

    /// Runs the work for this caller alone: nothing shared, nothing stored.
    async fn run_unshared<F, Fut>(&self, work: F) -> Result<Option<V>, ParkError>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        self.run_work(move || work(None))
            .await
            .map(|completion| match completion {
                Completion::Store(value, _) => Some(value),
                Completion::Pass(_) => None,
            })
    }

    /// What a caller gets once it gave up waiting for its flight's leader: the one run the
    /// flight's callers make themselves (started by whoever gave up first), or the error.
    async fn after_wait_timeout<F, Fut>(&self, work: F, fallback: &Fallback<Landed<V>>) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        let waited = self.wait_timeout.unwrap_or_default();
        match self.on_wait_timeout {
            WaitTimeoutPolicy::RunLocally => {
                let mut ran = false;
                let landed = fallback
                    .get_or_init(|| {
                        ran = true;
                        async { (Outcome::Timeout, self.run_unshared(work).await) }
                    })
                    .await
                    .clone();
                match landed {
                    // A private value went to the caller whose work ran; the others run theirs.
                    (outcome, Ok(None)) if !ran => (outcome, Err(ParkError::Cancelled)),
                    landed => landed,
                }
            }
            WaitTimeoutPolicy::Fail => (Outcome::Timeout, Err(ParkError::WaitTimeout(waited))),
        }
    }

    /// The backend failed mid-protocol: serve the flight alone (fail-open) or fail it.
    async fn without_backend<F, Fut>(
        &self,
        operation: &str,
        error: BackendError,
        work: F,
    ) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<Completion<V>, ParkError>>,
    {
        self.backend_failed(operation, &error);
        match self.backend.failure_policy() {
            crate::FailurePolicy::FailOpen => (Outcome::Miss, self.run_unshared(work).await),
            crate::FailurePolicy::FailClosed => {
                (Outcome::Miss, Err(ParkError::BackendUnavailable(error)))
            }
        }
    }

    fn backend_failed(&self, operation: &str, error: &BackendError) {
        self.counters.backend_error();
        self.warnings.warn(|suppressed| {
            tracing::warn!(
                operation,
                %error,
                suppressed,
                "parking backend failed: serving with in-process coalescing only"
            );
        });
    }
}

/// Builds a [`Parker`].
///
/// | setting | default |
/// |---|---|
/// | [`backend`](ParkerBuilder::backend) | a new [`MemoryBackend`] |
/// | [`ttl`](ParkerBuilder::ttl) | 10 seconds |
/// | [`wait_timeout`](ParkerBuilder::wait_timeout) | none: wait as long as the leader is alive |
/// | [`on_wait_timeout`](ParkerBuilder::on_wait_timeout) | [`WaitTimeoutPolicy::RunLocally`] |
#[derive(Clone)]
pub struct ParkerBuilder {
    backend: Option<Arc<dyn Backend>>,
    ttl: Duration,
    wait_timeout: Option<Duration>,
    on_wait_timeout: WaitTimeoutPolicy,
    before_wait: Option<BeforeWait>,
}

impl Default for ParkerBuilder {
    fn default() -> Self {
        Self {
            backend: None,
            ttl: Duration::from_secs(10),
            wait_timeout: None,
            on_wait_timeout: WaitTimeoutPolicy::default(),
            before_wait: None,
        }
    }
}

impl fmt::Debug for ParkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkerBuilder")
            .field("ttl", &self.ttl)
            .field("wait_timeout", &self.wait_timeout)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .finish_non_exhaustive()
    }
}

impl ParkerBuilder {
    /// A builder with the defaults in the table above; the same as [`Parker::builder`], without
    /// naming the value type until [`build`](ParkerBuilder::build).
    pub fn new() -> Self {
        Self::default()
    }

    /// Where windows and locks live: a [`MemoryBackend`] (one process) or a `RedisBackend`
    /// (every process on one Redis).
    pub fn backend(mut self, backend: impl Backend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// How long a value is served after the work produced it. Zero keeps nothing: concurrent
    /// callers still share one run.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a caller waits for a running leader before the
    /// [wait-timeout policy](ParkerBuilder::on_wait_timeout) applies. By default there is no
    /// timeout: a caller waits as long as the leader is alive (renewing its lease), and a dead
    /// leader is noticed when its lease expires.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = Some(timeout);
        self
    }

    /// What a caller does after waiting past the [wait timeout](ParkerBuilder::wait_timeout).
    pub fn on_wait_timeout(mut self, policy: WaitTimeoutPolicy) -> Self {
        self.on_wait_timeout = policy;
        self
    }

    /// For tests of the protocol: runs `hook` in a follower after it found the lock held and
    /// before it waits, so a test can make the leader finish in that gap.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn before_wait(
        mut self,
        hook: impl Fn(Key) -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Self {
        self.before_wait = Some(Arc::new(hook));
        self
    }

    /// Builds the parker.
    pub fn build<V: Value>(self) -> Parker<V> {
        Parker {
            inner: Arc::new(Inner {
                flights: Arc::new(Flights::new()),
                backend: self
                    .backend
                    .unwrap_or_else(|| Arc::new(MemoryBackend::new())),
                ttl: self.ttl,
                wait_timeout: self.wait_timeout,
                on_wait_timeout: self.on_wait_timeout,
                counters: Counters::default(),
                warnings: RateLimitedWarning::default(),
                before_wait: self.before_wait,
            }),
        }
    }
}

/// Lets one warning through per interval and counts the ones it held back, so a Redis outage
/// under load writes a line every few seconds, not one per request.
#[derive(Debug, Default)]
struct RateLimitedWarning {
    last: Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedWarning {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn warn(&self, emit: impl FnOnce(u64)) {
        let now = std::time::Instant::now();
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.is_some_and(|last| now.duration_since(last) < Self::INTERVAL) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        emit(self.suppressed.swap(0, Ordering::Relaxed));
    }
}
