//! Where TTL windows and leader locks live.
//!
//! A [`Backend`] answers four questions for the [`Parker`](crate::Parker): is a fresh value
//! stored for this key, may I lead the work for it, has the leader finished, and store this
//! value for the window. [`MemoryBackend`] is the embedded default for one process;
//! `RedisBackend` (feature `redis`) shares windows and locks across every process that talks to
//! the same Redis.
//!
//! All values cross this trait as stored entries: a [`Stamp`] (whose lease wrote it, until when it
//! is fresh) followed by the encoded value, so a backend never knows what it stores.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::time::Instant;

use crate::Key;

mod memory;
#[cfg(feature = "redis")]
pub mod redis;
mod stamp;

pub use memory::MemoryBackend;
#[cfg(feature = "redis")]
pub use redis::{NodeKeyspaceEvents, RedisBackend, RedisBackendBuilder, RedisSetupError};
#[cfg(all(test, feature = "redis"))]
pub(crate) use stamp::LUA_HEAD_PATTERN;
pub use stamp::{EntryKind, Stamp};

/// A boxed future, as returned by every [`Backend`] method.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Storage for TTL windows and leader locks, shared by every [`Parker`](crate::Parker) that
/// should act as one.
///
/// The protocol, in the order the parker uses it:
///
/// 1. [`acquire`](Backend::acquire): return the stored entry if it is fresh ([`Stamp::open`],
///    [`Stamp::is_fresh`]), else try to take the key's lock for `lease`. One round trip for hits,
///    misses and followers alike.
/// 2. The leader runs the work, calling [`renew`](Backend::renew) every
///    [`LeaseSettings::renew_every`], then [`complete`](Backend::complete) (store and release in
///    one step) or [`release`](Backend::release) (nothing to store).
/// 3. A caller that found the lock [`Held`](Acquire::Held) calls [`wait`](Backend::wait), which
///    returns once the leader stored its entry, the lock is gone, or the deadline passed. It must
///    not lose a wake-up: an entry stored or a lock released at any moment after the failed
///    `acquire` ends the wait.
///
/// Keys group by their [URI part](Key::uri_part): [`invalidate`](Backend::invalidate) drops every
/// variant of one URI at once.
pub trait Backend: Send + Sync + 'static {
    /// Looks up the stored entry for `key` and returns it if it is fresh (unless `lookup` is
    /// [`Lookup::Skip`]); otherwise tries to take the key's lock for `lease`, and on success hands
    /// over the entry still stored, stale, for the leader to revalidate.
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        lease: Duration,
        lookup: Lookup,
    ) -> BackendFuture<'a, Acquire>;

    /// Extends a lease the caller still holds. `Ok(false)` means the lease was lost (it expired
    /// and maybe another leader took over).
    fn renew<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, bool>;

    /// Stores `entry` for `keep` and releases the lock, in one step, if the caller still holds the
    /// lease or nobody took the lock since it was lost, and the key's URI was not invalidated
    /// since the lease was taken. `Ok(false)` means the store was refused: a leader that lost its
    /// lease never overwrites another's entry, and a run that began before a write never stores
    /// what the write changed.
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        entry: Bytes,
        keep: Duration,
    ) -> BackendFuture<'a, bool>;

    /// Releases the lock without storing anything, if the caller still holds it.
    fn release<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, ()>;

    /// Waits until the leader holding `key`'s lock (or a later one) stored its entry, the lock is
    /// released or expires, or `deadline` passes (`None`: no deadline; the lock's expiry still
    /// bounds the wait). A fresh entry ends the wait too, unless `lookup` is [`Lookup::Skip`].
    ///
    /// The leader's entry ends the wait even when it is not fresh: a run whose value may not be
    /// kept is still handed to the callers that waited for it.
    fn wait<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
    ) -> BackendFuture<'a, Wake> {
        self.wait_for(key, lookup, deadline, None)
    }

    /// [`wait`](Backend::wait), for the entry of the leader whose fence `acquire` reported in
    /// [`Acquire::Held`] (`None`: the holder of the lock when the wait begins). Knowing it, the
    /// wait also ends on that leader's entry stored between the `acquire` and the wait.
    fn wait_for<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
        leader: Option<u64>,
    ) -> BackendFuture<'a, Wake>;

    /// Forgets the stored entries of every key with `key`'s URI part (every variant) and fences
    /// out their current leaders, if any: their `complete` will be refused, so the next caller of
    /// each runs the work again.
    fn invalidate<'a>(&'a self, key: &'a Key) -> BackendFuture<'a, ()>;

    /// How long leases last and how often the leader renews them.
    fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings::default()
    }

    /// What to do when the backend fails at request time.
    fn failure_policy(&self) -> FailurePolicy {
        FailurePolicy::FailOpen
    }

    /// A synchronous look at the stored entry, fresh or not, for backends that can answer
    /// without I/O (the memory backend, a local copy). `None` means "ask
    /// [`acquire`](Backend::acquire)".
    fn peek(&self, _key: &Key) -> Option<Bytes> {
        None
    }

    /// [`peek`](Backend::peek), with the entry's head read and the value's bytes apart. Backends
    /// that keep heads read already answer without reading them again (every hit asks this).
    fn peek_opened(&self, key: &Key) -> Option<(Stamp, Bytes)> {
        self.peek(key).and_then(|entry| Stamp::open(&entry))
    }
}

impl<T: Backend + ?Sized> Backend for Arc<T> {
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        lease: Duration,
        lookup: Lookup,
    ) -> BackendFuture<'a, Acquire> {
        (**self).acquire(key, lease, lookup)
    }
    fn renew<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, bool> {
        (**self).renew(lease)
    }
    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        entry: Bytes,
        keep: Duration,
    ) -> BackendFuture<'a, bool> {
        (**self).complete(lease, entry, keep)
    }
    fn release<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, ()> {
        (**self).release(lease)
    }
    fn wait_for<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
        leader: Option<u64>,
    ) -> BackendFuture<'a, Wake> {
        (**self).wait_for(key, lookup, deadline, leader)
    }
    fn invalidate<'a>(&'a self, key: &'a Key) -> BackendFuture<'a, ()> {
        (**self).invalidate(key)
    }
    fn lease_settings(&self) -> LeaseSettings {
        (**self).lease_settings()
    }
    fn failure_policy(&self) -> FailurePolicy {
        (**self).failure_policy()
    }
    fn peek(&self, key: &Key) -> Option<Bytes> {
        (**self).peek(key)
    }
    fn peek_opened(&self, key: &Key) -> Option<(Stamp, Bytes)> {
        (**self).peek_opened(key)
    }
}

/// Whether [`Backend::acquire`] should look for a stored value first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// Return the stored entry if it is fresh.
    Check,
    /// Go straight for the lock (the stored entry did not decode and will be overwritten).
    Skip,
}

/// The answer of [`Backend::acquire`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Acquire {
    /// A fresh entry is stored: serve it.
    Fresh(Bytes),
    /// The caller is the leader: run the work, then `complete` or `release`. With it, the entry
    /// still stored for the key (stale), if any.
    Acquired(Lease, Option<Bytes>),
    /// Another leader holds the lock; it expires in `expires_in` unless renewed.
    Held {
        /// The lock's remaining time to live, as the backend saw it.
        expires_in: Duration,
        /// The holder's fence, when the backend knows it: pass it to
        /// [`wait_for`](Backend::wait_for).
        leader: Option<u64>,
        /// The entry still stored for the key, stale, if any: it may serve while the holder
        /// refreshes it.
        stored: Option<Bytes>,
    },
}

/// The answer of [`Backend::wait`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Wake {
    /// The leader stored this entry (or a fresh one is stored).
    Stored(Bytes),
    /// The lock is gone and nothing is stored: try to acquire again.
    Released,
    /// The deadline passed while the lock was still held.
    TimedOut,
}

/// Proof of leadership for one key: the holder of a lease is the only one allowed to renew,
/// complete or release the key's lock.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    key: Key,
    fence: u64,
    token: Arc<str>,
    duration: Duration,
}

impl Lease {
    /// Builds a lease. `fence` orders acquisitions of one key (a later leader has a larger
    /// number); `token` is unique per acquisition.
    pub fn new(key: Key, fence: u64, token: impl Into<Arc<str>>, duration: Duration) -> Self {
        Self {
            key,
            fence,
            token: token.into(),
            duration,
        }
    }

    /// The key this lease leads.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The fencing number: larger for later acquisitions of the same key.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The unique token stored in the lock.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// How long the lease lasts from its last acquisition or renewal.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

/// How long a leader's lease lasts and how often it is renewed while the work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// How long a lock lives without renewal: the longest a dead leader can hold its followers.
    pub lease: Duration,
    /// How often a live leader extends its lease (default: a third of the lease).
    pub renew_every: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self::new(Duration::from_secs(10))
    }
}

impl LeaseSettings {
    /// A lease of `lease`, renewed every third of it.
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            renew_every: lease / 3,
        }
    }
}

/// What a [`Parker`](crate::Parker) does when its backend fails (down, slow, refusing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Serve the request anyway, with in-process coalescing alone, and log a (rate-limited)
    /// warning. The work may then run once per process instead of once in all.
    #[default]
    FailOpen,
    /// Fail the request ([`ParkError::BackendUnavailable`](crate::ParkError); `503` from the
    /// layer).
    FailClosed,
}

/// An error from a backend: connection lost, command timed out, server refused.
#[derive(Debug, Clone)]
pub struct BackendError {
    message: Arc<str>,
}

impl BackendError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string().into(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "parking backend failed: {}", self.message)
    }
}

impl std::error::Error for BackendError {}
