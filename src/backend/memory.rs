//! The embedded default backend: windows and locks in this process's memory.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::Notify, time::Instant};

use super::{Acquire, Backend, BackendError, BackendFuture, Lease, LeaseSettings, Lookup, Wake};
use crate::Key;

/// Windows and locks kept in this process's memory: no server, nothing to configure.
///
/// Every [`Parker`](crate::Parker) (and so every layer) built on clones of one `MemoryBackend`
/// acts as one, which is how a single process shares work between several routers. Memory is
/// bounded: past [`max_entries`](MemoryBackend::max_entries) keys, expired entries are dropped
/// first, then the ones closest to expiry.
///
/// ```
/// use std::time::Duration;
/// use tower_parking::{MemoryBackend, ParkingLayer};
///
/// let backend = MemoryBackend::new().max_entries(100_000).lease(Duration::from_secs(30));
/// let layer = ParkingLayer::new().backend(backend);
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
    max_entries: usize,
    lease: LeaseSettings,
}

#[derive(Debug, Default)]
struct Shared {
    entries: Mutex<HashMap<Key, Entry>>,
}

#[derive(Debug)]
struct Entry {
    value: Option<(Bytes, Instant)>,
    lock: Option<(u64, Instant)>,
    /// The fence of the latest acquisition (or invalidation): a lease with an older fence is
    /// stale.
    fence: u64,
    changed: Arc<Notify>,
}

impl Entry {
    fn new() -> Self {
        Self {
            value: None,
            lock: None,
            fence: 0,
            changed: Arc::new(Notify::new()),
        }
    }

    fn fresh_value(&self, now: Instant) -> Option<&Bytes> {
        self.value
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(value, _)| value)
    }

    fn live_lock(&self, now: Instant) -> Option<Instant> {
        self.lock
            .filter(|(_, until)| *until > now)
            .map(|(_, until)| until)
    }

    fn held_by(&self, lease: &Lease, now: Instant) -> bool {
        self.live_lock(now).is_some() && self.lock.map(|(fence, _)| fence) == Some(lease.fence())
    }

    /// Whether nothing here matters any more: no fresh value, no live lock.
    fn is_dead(&self, now: Instant) -> bool {
        self.fresh_value(now).is_none() && self.live_lock(now).is_none()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend holding at most 10,000 keys, with 10-second leases.
    pub fn new() -> Self {
        Self {
            shared: Arc::default(),
            max_entries: 10_000,
            lease: LeaseSettings::default(),
        }
    }

    /// How many keys it keeps at most (at least 1).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// How long a leader's lock lasts without renewal (renewed every third of it).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = LeaseSettings::new(lease);
        self
    }

    /// How many keys it holds now, expired or not.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // A panic while the lock is held cannot leave the map half-updated (every update is one
        // assignment), so a poisoned lock is still sound to use.
        self.shared
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The entry for `key`, making room for it first if the map is full.
    fn entry<'m>(
        &self,
        entries: &'m mut HashMap<Key, Entry>,
        key: &Key,
        now: Instant,
    ) -> &'m mut Entry {
        if !entries.contains_key(key) && entries.len() >= self.max_entries {
            entries.retain(|_, entry| !entry.is_dead(now));
            while entries.len() >= self.max_entries {
                let oldest = entries
                    .iter()
                    .filter(|(_, entry)| entry.live_lock(now).is_none())
                    .min_by_key(|(_, entry)| entry.value.as_ref().map(|(_, until)| *until))
                    .map(|(key, _)| key.clone());
                match oldest {
                    Some(oldest) => entries.remove(&oldest),
                    // Every entry is a running flight: those are never dropped.
                    None => break,
                };
            }
        }
        entries.entry(key.clone()).or_insert_with(Entry::new)
    }

    fn ready<T: Send + 'static>(value: T) -> BackendFuture<'static, T> {
        Box::pin(std::future::ready(Ok::<_, BackendError>(value)))
    }
}

impl Backend for MemoryBackend {
    fn acquire<'a>(
        &'a self,
        key: &'a Key,
        lease: Duration,
        lookup: Lookup,
    ) -> BackendFuture<'a, Acquire> {
        let now = Instant::now();
        let mut entries = self.entries();
        let entry = self.entry(&mut entries, key, now);
        if lookup == Lookup::Check {
            if let Some(value) = entry.fresh_value(now) {
                return Self::ready(Acquire::Fresh(value.clone()));
            }
        }
        if let Some(until) = entry.live_lock(now) {
            return Self::ready(Acquire::Held {
                expires_in: until - now,
            });
        }
        entry.fence += 1;
        entry.lock = Some((entry.fence, now + lease));
        let lease = Lease::new(key.clone(), entry.fence, entry.fence.to_string(), lease);
        Self::ready(Acquire::Acquired(lease))
    }

    fn renew<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, bool> {
        let now = Instant::now();
        let mut entries = self.entries();
        let renewed = match entries.get_mut(lease.key()) {
            Some(entry) if entry.held_by(lease, now) => {
                entry.lock = Some((lease.fence(), now + lease.duration()));
                true
            }
            _ => false,
        };
        Self::ready(renewed)
    }

    fn complete<'a>(
        &'a self,
        lease: &'a Lease,
        value: Bytes,
        ttl: Duration,
    ) -> BackendFuture<'a, bool> {
        let now = Instant::now();
        let mut entries = self.entries();
        let entry = self.entry(&mut entries, lease.key(), now);
        // Held, or lost with nobody taking over since: either way no later leader exists.
        let stored = entry.fence == lease.fence()
            && (entry.held_by(lease, now) || entry.live_lock(now).is_none());
        if stored {
            entry.value = Some((value, now + ttl));
            entry.lock = None;
            entry.changed.notify_waiters();
        }
        Self::ready(stored)
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, ()> {
        let now = Instant::now();
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(lease.key()) {
            if entry.held_by(lease, now) {
                entry.lock = None;
                entry.changed.notify_waiters();
            }
        }
        Self::ready(())
    }

    fn wait<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
    ) -> BackendFuture<'a, Wake> {
        Box::pin(async move {
            loop {
                let changed = {
                    let now = Instant::now();
                    let mut entries = self.entries();
                    let entry = self.entry(&mut entries, key, now);
                    Arc::clone(&entry.changed)
                };
                // Registered before the re-check below, so no change after it is missed.
                let notified = changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();

                let now = Instant::now();
                let lock_until = {
                    let entries = self.entries();
                    let entry = entries.get(key);
                    let stored = entry
                        .and_then(|entry| entry.fresh_value(now))
                        .filter(|_| lookup == Lookup::Check);
                    if let Some(value) = stored {
                        return Ok(Wake::Stored(value.clone()));
                    }
                    match entry.and_then(|entry| entry.live_lock(now)) {
                        Some(until) => until,
                        None => return Ok(Wake::Released),
                    }
                };
                if deadline.is_some_and(|deadline| deadline <= now) {
                    return Ok(Wake::TimedOut);
                }
                let wake_at = deadline.map_or(lock_until, |deadline| deadline.min(lock_until));
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep_until(wake_at) => {}
                }
            }
        })
    }

    fn invalidate<'a>(&'a self, key: &'a Key) -> BackendFuture<'a, ()> {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(key) {
            entry.value = None;
            entry.lock = None;
            entry.fence += 1;
            entry.changed.notify_waiters();
        }
        Self::ready(())
    }

    fn lease_settings(&self) -> LeaseSettings {
        self.lease
    }

    fn peek(&self, key: &Key) -> Option<Bytes> {
        self.entries()
            .get(key)
            .and_then(|entry| entry.fresh_value(Instant::now()).cloned())
    }
}
