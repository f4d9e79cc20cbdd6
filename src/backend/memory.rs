//! The embedded default backend: windows and locks in this process's memory.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::Notify, time::Instant};

use super::{
    Acquire, Backend, BackendError, BackendFuture, Lease, LeaseSettings, Lookup, Stamp, Wake,
};
use crate::{clock, Key};

/// Windows and locks kept in this process's memory: no server, nothing to configure.
///
/// Every [`Parker`](crate::Parker) (and so every layer) built on clones of one `MemoryBackend`
/// acts as one, which is how a single process shares work between several routers. Memory is
/// bounded in entries and in bytes (keys and values): past either bound, entries that are no
/// longer kept go first, then the ones closest to the end of their keep time; a running flight's
/// lock is never dropped.
///
/// ```
/// use std::time::Duration;
/// use tower_parking::{MemoryBackend, ParkingLayer};
///
/// let backend = MemoryBackend::new()
///     .max_entries(100_000)
///     .max_bytes(256 * 1024 * 1024)
///     .lease(Duration::from_secs(30));
/// let layer = ParkingLayer::new().backend(backend);
/// # drop(layer);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    shared: Arc<Mutex<State>>,
    max_entries: usize,
    max_bytes: usize,
    lease: LeaseSettings,
}

#[derive(Debug, Default)]
struct State {
    /// Entries by URI part, then by variant part: a write drops every variant of its URI.
    uris: HashMap<Arc<str>, HashMap<Arc<str>, Entry>>,
    entries: usize,
    bytes: usize,
    /// The last fence handed out, by any key. One counter for the backend, so a key dropped and
    /// created again never reuses a fence, and a stale leader is never taken for a later one.
    fence: u64,
    /// When entries no longer kept were last dropped.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    value: Option<Stored>,
    lock: Option<(u64, Instant)>,
    /// The fence of the latest acquisition (or invalidation): a lease with an older fence is
    /// stale.
    fence: u64,
    changed: Arc<Notify>,
}

#[derive(Debug)]
struct Stored {
    entry: Bytes,
    stamp: Stamp,
    /// The value's bytes, within `entry`.
    payload: Bytes,
}

/// How often entries no longer kept are dropped, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What an entry's bookkeeping costs beside its key and value bytes.
const ENTRY_OVERHEAD: usize = 128;

impl Entry {
    fn new(fence: u64) -> Self {
        Self {
            value: None,
            lock: None,
            fence,
            changed: Arc::new(Notify::new()),
        }
    }

    fn kept(&self, now: clock::Micros) -> Option<&Stored> {
        self.value
            .as_ref()
            .filter(|stored| stored.stamp.keep_until > now)
    }

    fn live_lock(&self, now: Instant) -> Option<(u64, Instant)> {
        self.lock.filter(|(_, until)| *until > now)
    }

    fn held_by(&self, lease: &Lease, now: Instant) -> bool {
        self.live_lock(now)
            .is_some_and(|(fence, _)| fence == lease.fence())
    }

    /// Whether nothing here matters any more: nothing kept, no live lock.
    fn is_dead(&self, now: Instant, micros: clock::Micros) -> bool {
        self.kept(micros).is_none() && self.live_lock(now).is_none()
    }

    fn value_bytes(&self) -> usize {
        self.value.as_ref().map_or(0, |stored| stored.entry.len())
    }
}

fn entry_cost(uri: &str, variant: &str, value_bytes: usize) -> usize {
    ENTRY_OVERHEAD + uri.len() + variant.len() + value_bytes
}

impl State {
    fn get(&self, key: &Key) -> Option<&Entry> {
        self.uris.get(key.uri_part())?.get(key.variant_part())
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut Entry> {
        self.uris
            .get_mut(key.uri_part())?
            .get_mut(key.variant_part())
    }

    /// Sets the entry's value, keeping the byte count true.
    fn set_value(&mut self, key: &Key, value: Option<Stored>) {
        let Some(entry) = self.get_mut(key) else {
            return;
        };
        let before = entry.value_bytes();
        entry.value = value;
        let after = entry.value_bytes();
        self.bytes = self.bytes + after - before;
    }

    /// Drops the entries that matter no more (nothing kept, no lock), at most once a second, so
    /// that expired entries give their memory back without a scan on every call.
    fn sweep(&mut self) {
        let now = Instant::now();
        if self
            .swept
            .is_some_and(|swept| now.duration_since(swept) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        let micros = clock::now();
        self.retain(|_, _, entry| !entry.is_dead(now, micros));
    }

    /// Drops entries that matter no more, then (while over a bound) the ones closest to the end
    /// of their keep time, down to 7/8 of the bounds so that the scan is not paid on every insert.
    /// The entry of `spared`, the key being stored, stays whatever its state.
    fn make_room(&mut self, max_entries: usize, max_bytes: usize, spared: &Key) {
        let now = Instant::now();
        let micros = clock::now();
        self.swept = Some(now);
        let is_spared =
            |uri: &str, variant: &str| uri == spared.uri_part() && variant == spared.variant_part();
        self.retain(|uri, variant, entry| is_spared(uri, variant) || !entry.is_dead(now, micros));
        let (entries_goal, bytes_goal) = (max_entries - max_entries / 8, max_bytes - max_bytes / 8);
        if self.entries <= entries_goal && self.bytes <= bytes_goal {
            return;
        }
        let mut candidates: Vec<(clock::Micros, Arc<str>, Arc<str>)> = self
            .uris
            .iter()
            .flat_map(|(uri, variants)| {
                variants
                    .iter()
                    .filter(|(variant, entry)| {
                        entry.live_lock(now).is_none() && !is_spared(uri, variant)
                    })
                    .map(|(variant, entry)| {
                        let until = entry.value.as_ref().map_or(0, |v| v.stamp.keep_until);
                        (until, Arc::clone(uri), Arc::clone(variant))
                    })
            })
            .collect();
        candidates.sort_unstable_by_key(|(until, _, _)| *until);
        for (_, uri, variant) in candidates {
            if self.entries <= entries_goal && self.bytes <= bytes_goal {
                break;
            }
            self.remove(&uri, &variant);
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, &str, &Entry) -> bool) {
        let (mut entries, mut bytes) = (self.entries, self.bytes);
        self.uris.retain(|uri, variants| {
            variants.retain(|variant, entry| {
                let kept = keep(uri, variant, entry);
                if !kept {
                    entries -= 1;
                    bytes -= entry_cost(uri, variant, entry.value_bytes());
                }
                kept
            });
            !variants.is_empty()
        });
        (self.entries, self.bytes) = (entries, bytes);
    }

    fn remove(&mut self, uri: &str, variant: &str) {
        let Some(variants) = self.uris.get_mut(uri) else {
            return;
        };
        if let Some(entry) = variants.remove(variant) {
            self.entries -= 1;
            self.bytes -= entry_cost(uri, variant, entry.value_bytes());
        }
        if variants.is_empty() {
            self.uris.remove(uri);
        }
    }

    fn next_fence(&mut self) -> u64 {
        self.fence += 1;
        self.fence
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend holding at most 10,000 entries and 64 MiB, with 10-second leases.
    pub fn new() -> Self {
        Self {
            shared: Arc::default(),
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            lease: LeaseSettings::default(),
        }
    }

    /// How many entries (one per key) it keeps at most (at least 1).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// How many bytes of keys and values it keeps at most (default 64 MiB). A value larger than
    /// an eighth of it is handed to the callers waiting for it but not kept.
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// How long a leader's lock lasts without renewal (renewed every third of it).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = LeaseSettings::new(lease);
        self
    }

    /// How many entries it holds now, expired or not.
    pub fn len(&self) -> usize {
        self.state().entries
    }

    /// How many bytes of keys and values it holds now (with a fixed overhead per entry).
    pub fn bytes(&self) -> usize {
        self.state().bytes
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held cannot leave the map half-updated (every update is one
        // assignment), so a poisoned lock is still sound to use.
        self.shared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The entry for `key`, making room for it first if the backend is full.
    fn entry<'s>(&self, state: &'s mut State, key: &Key) -> &'s mut Entry {
        state.sweep();
        if state.get(key).is_some() {
            return state.get_mut(key).expect("just found");
        }
        let cost = entry_cost(key.uri_part(), key.variant_part(), 0);
        if state.entries >= self.max_entries || state.bytes + cost > self.max_bytes {
            state.make_room(self.max_entries, self.max_bytes, key);
        }
        state.entries += 1;
        state.bytes += cost;
        let fence = state.fence;
        state
            .uris
            .entry(Arc::from(key.uri_part()))
            .or_default()
            .entry(Arc::from(key.variant_part()))
            .or_insert_with(|| Entry::new(fence))
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
        let (now, micros) = (Instant::now(), clock::now());
        let mut state = self.state();
        let entry = self.entry(&mut state, key);
        let kept = entry.kept(micros);
        if lookup == Lookup::Check {
            if let Some(stored) = kept.filter(|stored| stored.stamp.is_fresh(micros)) {
                return Self::ready(Acquire::Fresh(stored.entry.clone()));
            }
        }
        if let Some((fence, until)) = entry.live_lock(now) {
            return Self::ready(Acquire::Held {
                expires_in: until - now,
                leader: Some(fence),
                stored: kept.map(|stored| stored.entry.clone()),
            });
        }
        let previous = kept.map(|stored| stored.entry.clone());
        let fence = state.next_fence();
        let entry = state.get_mut(key).expect("made above");
        entry.fence = fence;
        entry.lock = Some((fence, now + lease));
        let lease = Lease::new(key.clone(), fence, fence.to_string(), lease);
        Self::ready(Acquire::Acquired(lease, previous))
    }

    fn renew<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, bool> {
        let now = Instant::now();
        let mut state = self.state();
        let renewed = match state.get_mut(lease.key()) {
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
        entry: Bytes,
        keep: Duration,
    ) -> BackendFuture<'a, bool> {
        let now = Instant::now();
        let mut state = self.state();
        let key = lease.key();
        let Some(current) = state.get_mut(key) else {
            // Dropped (invalidated, or evicted with its lock lost): nothing to store over.
            return Self::ready(false);
        };
        // Held, or lost with nobody taking over since: either way no later leader exists.
        let stored = current.fence == lease.fence()
            && (current.held_by(lease, now) || current.live_lock(now).is_none());
        if !stored {
            return Self::ready(false);
        }
        current.lock = None;
        current.changed.notify_waiters();
        let fits = entry.len() <= self.max_bytes / 8;
        let value = Stamp::open(&entry)
            .filter(|_| fits)
            .map(|(mut stamp, payload)| {
                // The entry's own keep time, bounded by what the parker asked for.
                stamp.keep_until = stamp
                    .keep_until
                    .min(clock::now().saturating_add(clock::micros(keep)));
                Stored {
                    entry,
                    stamp,
                    payload,
                }
            });
        if let Some(value) = &value {
            let grows = value.entry.len();
            if state.bytes + grows > self.max_bytes {
                state.make_room(self.max_entries, self.max_bytes, key);
            }
        }
        state.set_value(key, value);
        Self::ready(true)
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> BackendFuture<'a, ()> {
        let now = Instant::now();
        let mut state = self.state();
        if let Some(entry) = state.get_mut(lease.key()) {
            if entry.held_by(lease, now) {
                entry.lock = None;
                entry.changed.notify_waiters();
            }
        }
        Self::ready(())
    }

    fn wait_for<'a>(
        &'a self,
        key: &'a Key,
        lookup: Lookup,
        deadline: Option<Instant>,
        leader: Option<u64>,
    ) -> BackendFuture<'a, Wake> {
        Box::pin(async move {
            // The fence of the leader this wait is for: its entry ends the wait, fresh or not.
            let mut awaited = leader;
            loop {
                let changed = {
                    let mut state = self.state();
                    Arc::clone(&self.entry(&mut state, key).changed)
                };
                // Registered before the re-check below, so no change after it is missed.
                let notified = changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();

                let (now, micros) = (Instant::now(), clock::now());
                let lock_until = {
                    let state = self.state();
                    let entry = state.get(key);
                    let lock = entry.and_then(|entry| entry.live_lock(now));
                    let awaited_fence = *awaited.get_or_insert(lock.map_or(0, |(fence, _)| fence));
                    let stored = entry.and_then(|entry| entry.kept(micros)).filter(|stored| {
                        (lookup == Lookup::Check && stored.stamp.is_fresh(micros))
                            || (awaited_fence > 0 && stored.stamp.fence >= awaited_fence)
                    });
                    if let Some(stored) = stored {
                        return Ok(Wake::Stored(stored.entry.clone()));
                    }
                    match lock {
                        Some((_, until)) => until,
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
        let mut state = self.state();
        let State {
            uris, fence, bytes, ..
        } = &mut *state;
        if let Some(variants) = uris.get_mut(key.uri_part()) {
            for entry in variants.values_mut() {
                *bytes -= entry.value_bytes();
                entry.value = None;
                entry.lock = None;
                *fence += 1;
                entry.fence = *fence;
                entry.changed.notify_waiters();
            }
        }
        Self::ready(())
    }

    fn lease_settings(&self) -> LeaseSettings {
        self.lease
    }

    fn peek(&self, key: &Key) -> Option<Bytes> {
        let micros = clock::now();
        self.state()
            .get(key)
            .and_then(|entry| entry.kept(micros))
            .map(|stored| stored.entry.clone())
    }

    fn peek_opened(&self, key: &Key) -> Option<(Stamp, Bytes)> {
        // Whether it is still kept is the parker's to judge from the head, with the one
        // reading of the clock it takes anyway: no reading here.
        let state = self.state();
        let stored = state.get(key)?.value.as_ref()?;
        Some((stored.stamp, stored.payload.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::EntryKind;

    fn sealed(fence: u64, fresh_for: Duration, body: &[u8]) -> Bytes {
        let now = clock::now();
        Stamp {
            fence,
            fresh_until: now + clock::micros(fresh_for),
            keep_until: now + clock::micros(fresh_for),
            stale_until: 0,
            error_until: 0,
            stored_at: now,
            took_ms: 0,
            kind: EntryKind::Value,
        }
        .seal(body)
    }

    async fn lead(backend: &MemoryBackend, key: &Key) -> Lease {
        match backend
            .acquire(key, Duration::from_secs(10), Lookup::Check)
            .await
            .unwrap()
        {
            Acquire::Acquired(lease, _) => lease,
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_key_dropped_and_created_again_never_reuses_a_fence() {
        let backend = MemoryBackend::new().max_entries(1);
        let (a, b) = (Key::new("a"), Key::new("b"));
        let stale = lead(&backend, &a).await;
        // `b` evicts `a`'s entry only if `a` holds no lock: release it, then fill the backend.
        backend.release(&stale).await.unwrap();
        let _b = lead(&backend, &b).await;
        let current = lead(&backend, &a).await;
        assert!(current.fence() > stale.fence());
        assert!(!backend.renew(&stale).await.unwrap());
        assert!(!backend
            .complete(
                &stale,
                sealed(stale.fence(), Duration::from_secs(60), b"old"),
                Duration::from_secs(60)
            )
            .await
            .unwrap());
        assert!(
            backend.renew(&current).await.unwrap(),
            "the stale leader released nothing"
        );
    }

    #[tokio::test]
    async fn the_byte_bound_holds_keys_included() {
        let backend = MemoryBackend::new().max_bytes(64 * 1024);
        for i in 0..200 {
            let key = Key::new(format!("/item?page={i}&{}", "q".repeat(200)));
            let lease = lead(&backend, &key).await;
            let entry = sealed(lease.fence(), Duration::from_secs(60), &[0; 4096]);
            backend
                .complete(&lease, entry, Duration::from_secs(60))
                .await
                .unwrap();
            assert!(
                backend.bytes() <= 64 * 1024,
                "{} bytes after {i}",
                backend.bytes()
            );
        }
        assert!(backend.len() > 4, "it keeps what fits: {}", backend.len());
    }

    #[tokio::test]
    async fn a_value_stored_at_the_byte_bound_is_kept_and_older_ones_make_room() {
        let backend = MemoryBackend::new().max_bytes(64 * 1024);
        for i in 0..40 {
            let key = Key::new(format!("/item/{i}"));
            let lease = lead(&backend, &key).await;
            let entry = sealed(lease.fence(), Duration::from_secs(60), &[0; 4096]);
            assert!(backend
                .complete(&lease, entry, Duration::from_secs(60))
                .await
                .unwrap());
            assert!(
                backend.peek(&key).is_some(),
                "the value stored for item {i} was dropped ({} bytes held)",
                backend.bytes()
            );
        }
        assert!(
            backend.peek(&Key::new("/item/0")).is_none(),
            "the oldest made room"
        );
    }

    #[tokio::test]
    async fn invalidating_a_uri_drops_every_variant_and_fences_their_leaders() {
        let backend = MemoryBackend::new();
        let gzip = Key::with_variant("/a", "gzip");
        let plain = Key::with_variant("/a", "plain");
        let other = Key::new("/b");
        for key in [&gzip, &other] {
            let lease = lead(&backend, key).await;
            let entry = sealed(lease.fence(), Duration::from_secs(60), b"v");
            assert!(backend
                .complete(&lease, entry, Duration::from_secs(60))
                .await
                .unwrap());
        }
        let running = lead(&backend, &plain).await;
        backend.invalidate(&Key::new("/a")).await.unwrap();
        assert!(backend.peek(&gzip).is_none());
        assert!(backend.peek(&other).is_some());
        let entry = sealed(running.fence(), Duration::from_secs(60), b"old");
        assert!(!backend
            .complete(&running, entry, Duration::from_secs(60))
            .await
            .unwrap());
        assert!(backend.peek(&plain).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_give_their_memory_back() {
        let backend = MemoryBackend::new();
        for i in 0..100 {
            let key = Key::new(format!("/item/{i}"));
            let lease = lead(&backend, &key).await;
            let entry = sealed(lease.fence(), Duration::from_millis(500), &[0; 1000]);
            backend
                .complete(&lease, entry, Duration::from_millis(500))
                .await
                .unwrap();
        }
        assert!(backend.bytes() > 100_000);
        tokio::time::advance(Duration::from_secs(2)).await;
        // Any later call sweeps what is no longer kept.
        let _ = backend
            .acquire(&Key::new("/other"), Duration::from_secs(1), Lookup::Check)
            .await;
        assert_eq!(backend.len(), 1, "only the new entry is left");
        assert!(backend.bytes() < 1_000, "{} bytes", backend.bytes());
    }
}
