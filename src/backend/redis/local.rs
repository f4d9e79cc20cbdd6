//! The local window: copies of entries fetched from Redis, served without a round trip for at
//! most the staleness bound after they were read, and only while notifications are known to
//! flow.
//!
//! A hit is the common case once a key is warm, and a round trip to Redis per hit would make every
//! hit cost more than the handler it saves on a fast route. The copies stay coherent through the
//! keyspace notifications the backend receives anyway: any change to a value key (`set`, `del`,
//! `expired`, ...) drops the copy, and so does anything that may have lost notifications (a
//! reconnect). Changes that send no notification (`FLUSHALL`, `FLUSHDB`) and notifications that
//! stop are covered by the bound: a copy read more than a bound ago is read again from Redis, and
//! while the canary ([`Health`]) is not heard nothing is served from here at all.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use super::health::Health;
use crate::{backend::Stamp, Key};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;

/// Copies of entries, by key (so that a hit hashes no digest), with the name each goes under in
/// Redis (`U:V`, so that a notification finds its copy), bounded in bytes.
#[derive(Debug)]
pub(super) struct LocalWindow {
    copies: DashMap<Key, Copy>,
    names: DashMap<Box<str>, Key>,
    health: Arc<Health>,
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Moves on at every drop, so a value read from Redis before a change but received after
    /// the change's notification is never kept.
    generation: AtomicU64,
}

#[derive(Debug)]
struct Copy {
    entry: Bytes,
    /// The entry's head, read once when kept, and the value's bytes.
    stamp: Stamp,
    payload: Bytes,
    expires: Instant,
    /// Until when it may be served without reading Redis again (the staleness bound).
    trusted_until: Instant,
}

impl LocalWindow {
    /// A window of at most `max_bytes` of values (0: keep nothing).
    pub(super) fn new(max_bytes: usize, health: Arc<Health>) -> Self {
        Self {
            copies: DashMap::new(),
            names: DashMap::new(),
            health,
            bytes: AtomicUsize::new(0),
            max_bytes,
            generation: AtomicU64::new(0),
        }
    }

    /// The generation to hand to [`keep`](LocalWindow::keep), taken before asking Redis.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The copy of the entry of `key`, if it is still kept and was read from Redis within the
    /// staleness bound while notifications flow: the entry, its head and its value's bytes.
    pub(super) fn get(&self, key: &Key) -> Option<(Bytes, Stamp, Bytes)> {
        if !self.health.alive() {
            return None;
        }
        let now = Instant::now();
        {
            let copy = self.copies.get(key)?;
            if copy.trusted_until > now {
                return Some((copy.entry.clone(), copy.stamp, copy.payload.clone()));
            }
            if copy.expires > now {
                // Read too long ago: the caller reads Redis, which keeps it again.
                return None;
            }
        }
        if let Some((_, copy)) = self.copies.remove_if(key, |_, copy| copy.expires <= now) {
            self.bytes.fetch_sub(copy.entry.len(), Ordering::Relaxed);
        }
        None
    }

    /// Keeps the entry of `key` (named `name` in notifications) until `expires`, unless a change
    /// was heard of since `generation` was taken, the window is full, or it is not an entry.
    pub(super) fn keep(
        &self,
        key: &Key,
        name: &str,
        entry: Bytes,
        expires: Instant,
        generation: u64,
    ) {
        if self.max_bytes == 0 || entry.len() > self.max_bytes / 4 {
            return;
        }
        let Some((stamp, payload)) = Stamp::open(&entry) else {
            return;
        };
        if self.bytes.load(Ordering::Relaxed) + entry.len() > self.max_bytes {
            self.drop_expired();
            if self.bytes.load(Ordering::Relaxed) + entry.len() > self.max_bytes {
                return;
            }
        }
        let len = entry.len();
        self.names.insert(name.into(), key.clone());
        let replaced = {
            // Checked under the shard lock that `forget` also takes, so a drop of this key
            // either happened before (the generation moved) or comes after the insert.
            let mut slot = self.copies.entry(key.clone());
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            let replaced = match &mut slot {
                dashmap::mapref::entry::Entry::Occupied(old) => Some(old.get().entry.len()),
                dashmap::mapref::entry::Entry::Vacant(_) => None,
            };
            let trusted_until = Instant::now() + self.health.bound;
            slot.insert(Copy {
                entry,
                stamp,
                payload,
                expires,
                trusted_until: trusted_until.min(expires),
            });
            replaced
        };
        self.bytes.fetch_add(len, Ordering::Relaxed);
        if let Some(old) = replaced {
            self.bytes.fetch_sub(old, Ordering::Relaxed);
        }
    }

    /// Drops the copy named `name`: it changed in Redis.
    pub(super) fn forget(&self, name: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some((_, key)) = self.names.remove(name) {
            self.remove(&key);
        }
    }

    /// Drops the copies of every variant of the URI with this hash: it was invalidated.
    pub(super) fn forget_uri(&self, uri: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.names.retain(|name, key| {
            let other_uri = name.split(':').next() != Some(uri);
            if !other_uri {
                self.remove(key);
            }
            other_uri
        });
    }

    /// Drops every copy: notifications may have been lost.
    pub(super) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.names.clear();
        self.copies.retain(|_, copy| {
            self.bytes.fetch_sub(copy.entry.len(), Ordering::Relaxed);
            false
        });
    }

    fn remove(&self, key: &Key) {
        if let Some((_, copy)) = self.copies.remove(key) {
            self.bytes.fetch_sub(copy.entry.len(), Ordering::Relaxed);
        }
    }

    fn drop_expired(&self) {
        let now = Instant::now();
        self.copies.retain(|_, copy| {
            let fresh = copy.expires > now;
            if !fresh {
                self.bytes.fetch_sub(copy.entry.len(), Ordering::Relaxed);
            }
            fresh
        });
        self.names.retain(|_, key| self.copies.contains_key(key));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::EntryKind;

    fn trusted_window(max_bytes: usize) -> LocalWindow {
        let health = Arc::new(Health::new("p:", 0, "test", Duration::from_secs(3600)));
        health.heard_every_canary();
        LocalWindow::new(max_bytes, health)
    }

    /// An entry holding `value`.
    fn entry(value: &[u8]) -> Bytes {
        Stamp {
            fence: 1,
            fresh_until: u64::MAX / 2,
            keep_until: u64::MAX / 2,
            stale_until: 0,
            error_until: 0,
            stored_at: 0,
            took_ms: 0,
            kind: EntryKind::Value,
        }
        .seal(value)
    }

    /// Keeps `value` for the key and name `name`, with the generation taken now.
    fn keep(window: &LocalWindow, name: &str, value: &[u8], expires: Instant) {
        let generation = window.generation();
        window.keep(&Key::new(name), name, entry(value), expires, generation);
    }

    /// The value kept for the key `name`.
    fn value(window: &LocalWindow, name: &str) -> Option<Bytes> {
        window.get(&Key::new(name)).map(|(_, _, payload)| payload)
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_served_until_it_expires() {
        let window = trusted_window(1024);
        keep(&window, "a", b"v", Instant::now() + Duration::from_secs(1));
        assert_eq!(value(&window, "a").as_deref(), Some(&b"v"[..]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(value(&window, "a"), None);
        assert_eq!(window.bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_value_read_before_a_change_is_not_kept_after_it() {
        let window = trusted_window(1024);
        let generation = window.generation();
        window.forget("a");
        let later = Instant::now() + Duration::from_secs(60);
        window.keep(&Key::new("a"), "a", entry(b"old"), later, generation);
        assert_eq!(value(&window, "a"), None);
    }

    #[tokio::test]
    async fn a_notification_drops_the_copy_by_its_name_and_a_write_every_variant() {
        let window = trusted_window(1024);
        let later = Instant::now() + Duration::from_secs(60);
        keep(&window, "u1:v1", b"a", later);
        keep(&window, "u1:v2", b"b", later);
        keep(&window, "u2:v1", b"c", later);
        window.forget("u1:v1");
        assert_eq!(value(&window, "u1:v1"), None);
        assert!(value(&window, "u1:v2").is_some());
        window.forget_uri("u1");
        assert_eq!(value(&window, "u1:v2"), None);
        assert_eq!(value(&window, "u2:v1").as_deref(), Some(&b"c"[..]));
    }

    #[tokio::test]
    async fn the_window_stays_within_its_bytes() {
        let window = trusted_window(600);
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..10 {
            keep(&window, &i.to_string(), &[0; 80], later);
        }
        assert!(window.bytes.load(Ordering::Relaxed) <= 600);
        assert!(window.copies.len() < 10, "{} copies", window.copies.len());
        window.clear();
        assert_eq!(
            (window.copies.len(), window.bytes.load(Ordering::Relaxed)),
            (0, 0)
        );
        let disabled = trusted_window(0);
        keep(&disabled, "a", b"v", later);
        assert_eq!(value(&disabled, "a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_read_longer_ago_than_the_bound_or_while_notifications_are_down_is_not_served() {
        let health = Arc::new(Health::new("p:", 0, "test", Duration::from_secs(3600)));
        let window = LocalWindow::new(1024, Arc::clone(&health));
        let later = Instant::now() + Duration::from_secs(60);
        keep(&window, "a", b"v", later);
        assert_eq!(value(&window, "a"), None, "no canary heard yet");
        health.heard_every_canary();
        assert_eq!(value(&window, "a").as_deref(), Some(&b"v"[..]));
        health.lost();
        assert_eq!(value(&window, "a"), None, "notifications in doubt");

        let bounded = LocalWindow::new(1024, {
            let health = Arc::new(Health::new("p:", 0, "b", Duration::from_secs(1)));
            health.heard_every_canary();
            health
        });
        keep(&bounded, "a", b"v", later);
        assert!(value(&bounded, "a").is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(value(&bounded, "a"), None, "read more than a bound ago");
    }
}
