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
    /// Whether it may be served stale (while a refresh runs, or in place of a failed run) for
    /// the parker's stale windows. No, for responses that must be revalidated once stale.
    pub(crate) may_serve_stale: bool,
    /// The run failed (a `5xx`): it is handed to the callers waiting for it unless a stale value
    /// may stand in for it, and a refresh that ends so keeps the previous value.
    pub(crate) failed: bool,
    /// Stale windows the value sets for itself, in place of the parker's (a response's
    /// `stale-while-revalidate=N`, `stale-if-error=N`).
    pub(crate) stale_windows: (Option<Duration>, Option<Duration>),
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
            may_serve_stale: true,
            failed: false,
            stale_windows: (None, None),
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
    stale: StaleSettings,
    /// Keys whose background refresh runs in this process.
    refreshing: dashmap::DashMap<Key, ()>,
    refresh_warnings: RateLimitedWarning,
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
        let (outcome, result) = self
            .execute(key.into(), Lookup::Check, |_: &V| true, work)
            .await;
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

    /// The value stored fresh for `key`, from a look that needs no I/O, when serving it starts no
    /// work (no early refresh to decide): the hit path, without building a run.
    pub(crate) fn fresh_hit(&self, key: &Key) -> Option<V> {
        if self.inner.stale.early.is_some() {
            return None;
        }
        let (stamp, payload) = self.inner.backend.peek_opened(key)?;
        if stamp.kind != EntryKind::Value || !stamp.is_fresh(clock::now()) {
            return None;
        }
        V::decode(payload).ok()
    }

    /// The heart of every call: joins or starts the key's flight and says how this caller was
    /// served. `Ok(None)`: the caller's own `work` ran and delivered its private value itself.
    ///
    /// `work` gets the key's stored value when it is no longer fresh but still kept (for
    /// revalidation). With [`Lookup::Skip`], a stored value, fresh or not, is not served: the
    /// call joins the key's running flight or starts one. A stored value is refreshed with `work`
    /// (stale-while-revalidate, early refresh) only if `refreshes` says `work` would make a
    /// value of its kind (a response that varies is refreshed with a request of its variant);
    /// otherwise it is still returned, and the caller sees it is not one for it. The outcome is
    /// not counted: the caller counts it once it knows it is the one it serves (see
    /// [`record`](Parker::record)).
    pub(crate) async fn execute<F, Fut>(
        &self,
        key: Key,
        lookup: Lookup,
        refreshes: impl Fn(&V) -> bool + Send + 'static,
        work: F,
    ) -> Landed<V>
    where
        F: FnOnce(Option<V>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Completion<V>, ParkError>> + Send + 'static,
    {
        let inner = &self.inner;
        let peeked = match lookup {
            Lookup::Check => inner.backend.peek_opened(&key),
            Lookup::Skip => None,
        };
        if let Some((stamp, payload)) = peeked {
            let now = clock::now();
            match stamp.kind {
                EntryKind::Pass if stamp.is_fresh(now) => {
                    return (Outcome::Pass, inner.run_unshared(work).await)
                }
                // One that does not decode is left to the flight, which overwrites it.
                EntryKind::Value => match V::decode(payload) {
                    Ok(value) if stamp.is_fresh(now) => {
                        if inner.stale.refresh_early(&stamp, now) && refreshes(&value) {
                            inner.refresh(key, work);
                        }
                        return (Outcome::Hit, Ok(Some(value)));
                    }
                    Ok(value) if stamp.serves_stale(now) => {
                        if refreshes(&value) {
                            inner.refresh(key, work);
                        }
                        return (Outcome::Stale, Ok(Some(value)));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        match inner.flights.join_or_start(&key) {
            Joined::Leader(landing, flight, fallback) => {
                let task_inner = Arc::clone(inner);
                // The flight hands the work back when the key turns out to be hit-for-pass, so
                // that it lands at once and its callers all run their own work together.
                let (give_back, given_back) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    match task_inner
                        .fly(&key, lookup, (refreshes, work), &fallback, give_back)
                        .await
                    {
                        Flown::Landed(landed) => landing.land(landed),
                        Flown::Stale(value, refresh) => {
                            // Everyone gets the stale value now; the refresh goes on.
                            landing.land((Outcome::Stale, Ok(Some(value))));
                            let (lease, work, previous) = refresh;
                            // Nobody waits for a refresh: its result is stored, or it failed.
                            let _ = task_inner.lead(lease, work, previous, true).await;
                        }
                    }
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
                    // The flight gave up on its leader and ran the work itself, for all; or it
                    // serves a stale value.
                    Some(Some((outcome @ (Outcome::Timeout | Outcome::Stale), result))) => {
                        (outcome, result)
                    }
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
    fn read(stamp: Stamp, payload: bytes::Bytes) -> Self {
        match stamp.kind {
            EntryKind::Pass => Self::Pass,
            EntryKind::Value => Self::Value(payload),
        }
    }
}

/// A stored value with its head: what a run may revalidate, or serve when it fails.
type Previous<V> = Option<(Stamp, V)>;

/// How a flight ended: landed, or serving a stale value while it goes on with a refresh under
/// this lease.
enum Flown<V, F> {
    Landed(Landed<V>),
    Stale(V, (Lease, F, Previous<V>)),
}

/// The stale windows (RFC 5861) and early refresh, as the parker applies them.
#[derive(Debug, Clone, Copy, Default)]
struct StaleSettings {
    /// How long past its freshness a value is served while one refresh runs.
    while_revalidate: Duration,
    /// How long past its freshness a value stands in for a run that failed.
    if_error: Duration,
    /// How long a failed refresh keeps others in the fleet from trying again.
    retry_after: Duration,
    /// XFetch's β: refresh a hot value before it expires, with a probability that grows as
    /// expiry nears, in proportion to how long its run took.
    early: Option<f64>,
}

impl StaleSettings {
    /// Whether a hit at `now` starts a refresh early (Vattani et al., VLDB 2015):
    /// `now − δ·β·ln(rand()) ≥ expiry`, δ the last run's duration.
    fn refresh_early(&self, stamp: &Stamp, now: clock::Micros) -> bool {
        let Some(beta) = self.early else {
            return false;
        };
        let delta = stamp.took_ms as f64 * 1_000.0;
        now as f64 - delta * beta * crate::random::unit().ln() >= stamp.fresh_until as f64
    }
}

/// An entry's head and value, when it holds a value that decodes.
fn decode_value<V: Value>(entry: &bytes::Bytes) -> Option<(Stamp, V)> {
    let (stamp, payload) = Stamp::open(entry)?;
    if stamp.kind != EntryKind::Value {
        return None;
    }
    Some((stamp, V::decode(payload).ok()?))
}

impl<V: Value> Inner<V> {
    /// The flight, on its own task: find the value, or lead the work, or wait for the leader.
    async fn fly<F, Fut>(
        self: &Arc<Self>,
        key: &Key,
        mut lookup: Lookup,
        (refreshes, work): (impl Fn(&V) -> bool, F),
        fallback: &Fallback<Landed<V>>,
        give_back: tokio::sync::oneshot::Sender<F>,
    ) -> Flown<V, F>
    where
        F: FnOnce(Option<V>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Completion<V>, ParkError>> + Send + 'static,
    {
        let landed = |landed| Flown::Landed(landed);
        let lease = self.backend.lease_settings().lease;
        let deadline = self.wait_timeout.map(|timeout| Instant::now() + timeout);
        // A value found after waiting for another leader came from that leader: parked, not hit.
        let mut waited = false;
        loop {
            let entry = match self.backend.acquire(key, lease, lookup).await {
                Err(error) => return landed(self.without_backend("acquire", error, work).await),
                Ok(Acquire::Acquired(lease, previous)) => {
                    let previous = previous.and_then(|entry| decode_value::<V>(&entry));
                    let now = clock::now();
                    return match previous {
                        Some((stamp, value))
                            if lookup == Lookup::Check
                                && stamp.serves_stale(now)
                                && refreshes(&value) =>
                        {
                            Flown::Stale(value.clone(), (lease, work, Some((stamp, value))))
                        }
                        previous => landed(self.lead(lease, work, previous, false).await),
                    };
                }
                Ok(Acquire::Fresh(entry)) => entry,
                Ok(Acquire::Held { leader, stored, .. }) => {
                    // A refresh runs elsewhere: the stale value serves meanwhile.
                    let stale = stored
                        .and_then(|entry| decode_value::<V>(&entry))
                        .filter(|(stamp, _)| stamp.serves_stale(clock::now()));
                    if let Some((_, value)) = stale.filter(|_| lookup == Lookup::Check) {
                        return landed((Outcome::Stale, Ok(Some(value))));
                    }
                    if let Some(hook) = &self.before_wait {
                        hook(key.clone()).await;
                    }
                    waited = true;
                    match self.backend.wait_for(key, lookup, deadline, leader).await {
                        Err(error) => {
                            return landed(self.without_backend("wait", error, work).await)
                        }
                        Ok(Wake::Stored(entry)) => entry,
                        Ok(Wake::Released) => {
                            lookup = Lookup::Check;
                            continue;
                        }
                        Ok(Wake::TimedOut) => {
                            return landed(self.after_wait_timeout(work, fallback).await)
                        }
                    }
                }
            };
            let opened = Stamp::open(&entry);
            let outcome = match &opened {
                // A value that was fresh once and no longer is: the leader's stale stand-in for
                // a run that failed.
                Some((stamp, _))
                    if waited
                        && stamp.fresh_until > stamp.stored_at
                        && !stamp.is_fresh(clock::now()) =>
                {
                    Outcome::Stale
                }
                _ if waited => Outcome::Parked,
                _ => Outcome::Hit,
            };
            let early = opened
                .as_ref()
                .is_some_and(|(stamp, _)| !waited && self.stale.refresh_early(stamp, clock::now()));
            let found = opened.map(|(stamp, payload)| Found::read(stamp, payload));
            let error = match found {
                Some(Found::Pass) => {
                    // Every caller of the flight runs its own work, the leading one included.
                    let _ = give_back.send(work);
                    return landed((Outcome::Pass, Ok(None)));
                }
                Some(Found::Value(payload)) => match V::decode(payload) {
                    Ok(value) => {
                        if early && refreshes(&value) {
                            self.refresh(key.clone(), work);
                        }
                        return landed((outcome, Ok(Some(value))));
                    }
                    Err(error) => error.to_string(),
                },
                None => "not an entry of this version".to_owned(),
            };
            tracing::warn!(key = %key, %error, "stored value does not decode: running the work again to overwrite it");
            lookup = Lookup::Skip;
        }
    }

    /// Runs the work as the leader, renewing the lease while it runs, then stores or releases.
    ///
    /// `previous` is the value still stored (stale), handed to the work to revalidate, and served
    /// in its place if the run fails within the stale-if-error window. A `refresh` runs for
    /// callers already served (stale): when it fails, the previous value stays, and nobody in
    /// the fleet refreshes the key again for the retry interval.
    async fn lead<F, Fut>(
        self: &Arc<Self>,
        lease: Lease,
        work: F,
        previous: Previous<V>,
        refresh: bool,
    ) -> Landed<V>
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
        let revalidating = previous.as_ref().map(|(_, value)| value.clone());
        let completion = self.run_work(move || work(revalidating)).await;
        renewal.abort();
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let now = clock::now();
        let failed = match &completion {
            Err(_) => true,
            Ok(Completion::Store(_, keep)) => keep.failed || (refresh && keep.fresh_for.is_zero()),
            Ok(Completion::Pass(_)) => refresh,
        };
        if failed && refresh {
            let stale_until = previous
                .as_ref()
                .map_or(now, |(stamp, _)| stamp.stale_until);
            self.refresh_failed(&lease, &completion, clock::between(now, stale_until))
                .await;
            return (Outcome::Stale, Ok(previous.map(|(_, value)| value)));
        }
        if let Some((stamp, value)) =
            previous.filter(|(stamp, _)| failed && stamp.serves_on_error(now))
        {
            // Stale if error: the value still stored stands in for the failed run, and stays.
            // Stored again under this lease (its own times kept), so that the requests parked
            // on this run in other processes take it too, instead of each running again.
            let entry = Stamp {
                fence: lease.fence(),
                ..stamp
            }
            .seal(&value.encode());
            let keep_for = clock::between(now, stamp.keep_until);
            if let Err(error) = self.backend.complete(&lease, entry, keep_for).await {
                self.backend_failed("complete", &error);
            }
            return (Outcome::Stale, Ok(Some(value)));
        }
        let at = |duration: Duration| now.saturating_add(clock::micros(duration));
        let stamp = |kind, fresh_for: Duration, keep_for: Duration| Stamp {
            fence: lease.fence(),
            fresh_until: at(fresh_for),
            keep_until: at(keep_for),
            stale_until: 0,
            error_until: 0,
            stored_at: now,
            took_ms,
            kind,
        };
        let (outcome, result, entry) = match completion {
            Ok(Completion::Store(value, keep)) => {
                let stale = &self.stale;
                let (stale_for, error_for) = if keep.may_serve_stale && !keep.failed {
                    let (while_revalidate, if_error) = keep.stale_windows;
                    (
                        while_revalidate.unwrap_or(stale.while_revalidate),
                        if_error.unwrap_or(stale.if_error),
                    )
                } else {
                    (Duration::ZERO, Duration::ZERO)
                };
                let keep_for = keep
                    .keep_for
                    .max(keep.fresh_for)
                    .max(keep.fresh_for + stale_for)
                    .max(keep.fresh_for + error_for);
                // Not fresh and not kept: kept just long enough for the callers parked on this
                // run elsewhere to pick it up.
                let keep_for = if keep_for.is_zero() {
                    HANDOFF
                } else {
                    keep_for
                };
                let entry = Stamp {
                    stale_until: at(keep.fresh_for + stale_for),
                    error_until: at(keep.fresh_for + error_for),
                    ..stamp(EntryKind::Value, keep.fresh_for, keep_for)
                }
                .seal(&value.encode());
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

    /// A background refresh failed: counted, said (at most every few seconds), and the key's lock
    /// held for the retry interval, so that nobody in the fleet hammers a failing upstream; the
    /// previous value keeps serving until its stale window ends.
    ///
    /// The lock is held no longer than `window_left`, the stale window's rest: past it, the next
    /// request runs the work at once.
    async fn refresh_failed(
        &self,
        lease: &Lease,
        completion: &Result<Completion<V>, ParkError>,
        window_left: Duration,
    ) {
        self.counters.refresh_failure();
        let why = match completion {
            Err(error) => error.to_string(),
            Ok(Completion::Pass(_)) => "its response may not be shared".to_owned(),
            Ok(Completion::Store(..)) => "its response is an error, or may not be kept".to_owned(),
        };
        self.refresh_warnings.warn(|suppressed| {
            tracing::warn!(key = %lease.key(), why, suppressed, "a refresh failed: the stale value keeps serving");
        });
        let retry = self.stale.retry_after.min(window_left);
        let cooldown = Lease::new(lease.key().clone(), lease.fence(), lease.token(), retry);
        if retry.is_zero() || !matches!(self.backend.renew(&cooldown).await, Ok(true)) {
            if let Err(error) = self.backend.release(lease).await {
                self.backend_failed("release", &error);
            }
        }
    }

    /// Refreshes `key` in the background with `work`, unless a refresh of it runs in this
    /// process already; across processes, the lease makes it one at a time.
    fn refresh<F, Fut>(self: &Arc<Self>, key: Key, work: F)
    where
        F: FnOnce(Option<V>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Completion<V>, ParkError>> + Send + 'static,
    {
        if self.refreshing.insert(key.clone(), ()).is_some() {
            return;
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let lease = inner.backend.lease_settings().lease;
            if let Ok(Acquire::Acquired(lease, previous)) =
                inner.backend.acquire(&key, lease, Lookup::Skip).await
            {
                let previous = previous.and_then(|entry| decode_value(&entry));
                // Nobody waits for a refresh: its result is stored, or it failed.
                let _ = inner.lead(lease, work, previous, true).await;
            }
            inner.refreshing.remove(&key);
        });
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
    stale: StaleSettings,
    wait_timeout: Option<Duration>,
    on_wait_timeout: WaitTimeoutPolicy,
    before_wait: Option<BeforeWait>,
}

impl Default for ParkerBuilder {
    fn default() -> Self {
        Self {
            backend: None,
            ttl: Duration::from_secs(10),
            stale: StaleSettings {
                retry_after: Duration::from_secs(1),
                ..StaleSettings::default()
            },
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

    /// How long past its freshness a value is still served, at once, while one refresh runs in
    /// the background across every process on the backend (RFC 5861 stale-while-revalidate;
    /// default zero: off). When the refresh fails, the value keeps serving until the window
    /// ends, and the refresh is tried again at most every [`refresh_retry`](Self::refresh_retry).
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale.while_revalidate = window;
        self
    }

    /// How long past its freshness a value stands in for a run that fails (an error, a panic,
    /// a `5xx` from the layer): its caller and every caller waiting for it get the old value
    /// (RFC 5861 stale-if-error; default zero: off).
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale.if_error = window;
        self
    }

    /// How long a failed background refresh keeps every process from trying again (default 1
    /// second), so that a failing upstream is not hammered.
    pub fn refresh_retry(mut self, interval: Duration) -> Self {
        self.stale.retry_after = interval;
        self
    }

    /// Refreshes hot values before they expire (XFetch, Vattani et al., VLDB 2015; default off):
    /// a hit at time `t` starts a background refresh when `t − δ·β·ln(rand()) ≥ expiry`, δ being
    /// how long the last run took. `beta` 1.0 is the usual choice; larger refreshes earlier.
    pub fn early_refresh(mut self, beta: f64) -> Self {
        self.stale.early = (beta > 0.0).then_some(beta);
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
                stale: self.stale,
                refreshing: dashmap::DashMap::new(),
                refresh_warnings: RateLimitedWarning::default(),
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
