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

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;

/// Copies of fresh values, by key hash, bounded in bytes.
#[derive(Debug)]
pub(super) struct LocalWindow {
    copies: DashMap<Box<str>, Copy>,
    health: Arc<Health>,
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Moves on at every drop, so a value read from Redis before a change but received after
    /// the change's notification is never kept.
    generation: AtomicU64,
}

#[derive(Debug)]
struct Copy {
    value: Bytes,
    expires: Instant,
    /// Until when it may be served without reading Redis again (the staleness bound).
    trusted_until: Instant,
}

impl LocalWindow {
    /// A window of at most `max_bytes` of values (0: keep nothing).
    pub(super) fn new(max_bytes: usize, health: Arc<Health>) -> Self {
        Self {
            copies: DashMap::new(),
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

    /// The copy of the entry with this hash, if it is still kept and was read from Redis within
    /// the staleness bound while notifications flow.
    pub(super) fn get(&self, hash: &str) -> Option<Bytes> {
        if !self.health.alive() {
            return None;
        }
        let now = Instant::now();
        {
            let copy = self.copies.get(hash)?;
            if copy.trusted_until > now {
                return Some(copy.value.clone());
            }
            if copy.expires > now {
                // Read too long ago: the caller reads Redis, which keeps it again.
                return None;
            }
        }
        if let Some((_, copy)) = self.copies.remove_if(hash, |_, copy| copy.expires <= now) {
            self.bytes.fetch_sub(copy.value.len(), Ordering::Relaxed);
        }
        None
    }

    /// Keeps `value` until `expires`, unless a change was heard of since `generation` was taken
    /// or the window is full.
    pub(super) fn keep(&self, hash: &str, value: Bytes, expires: Instant, generation: u64) {
        if self.max_bytes == 0 || value.len() > self.max_bytes / 4 {
            return;
        }
        if self.bytes.load(Ordering::Relaxed) + value.len() > self.max_bytes {
            self.drop_expired();
            if self.bytes.load(Ordering::Relaxed) + value.len() > self.max_bytes {
                return;
            }
        }
        let len = value.len();
        let replaced = {
            // Checked under the shard lock that `forget` also takes, so a drop of this hash
            // either happened before (the generation moved) or comes after the insert.
            let mut entry = self.copies.entry(hash.into());
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            let replaced = match &mut entry {
                dashmap::mapref::entry::Entry::Occupied(old) => Some(old.get().value.len()),
                dashmap::mapref::entry::Entry::Vacant(_) => None,
            };
            let trusted_until = Instant::now() + self.health.bound;
            entry.insert(Copy {
                value,
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

    /// Drops the copy of the value with this hash: it changed in Redis.
    pub(super) fn forget(&self, hash: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some((_, copy)) = self.copies.remove(hash) {
            self.bytes.fetch_sub(copy.value.len(), Ordering::Relaxed);
        }
    }

    /// Drops the copies of every variant of the URI with this hash: it was invalidated.
    pub(super) fn forget_uri(&self, uri: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.copies.retain(|hash, copy| {
            let other_uri = hash.split(':').next() != Some(uri);
            if !other_uri {
                self.bytes.fetch_sub(copy.value.len(), Ordering::Relaxed);
            }
            other_uri
        });
    }

    /// Drops every copy: notifications may have been lost.
    pub(super) fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.copies.retain(|_, copy| {
            self.bytes.fetch_sub(copy.value.len(), Ordering::Relaxed);
            false
        });
    }

    fn drop_expired(&self) {
        let now = Instant::now();
        self.copies.retain(|_, copy| {
            let fresh = copy.expires > now;
            if !fresh {
                self.bytes.fetch_sub(copy.value.len(), Ordering::Relaxed);
            }
            fresh
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn trusted_window(max_bytes: usize) -> LocalWindow {
        let health = Arc::new(Health::new("p:", 0, "test", Duration::from_secs(3600)));
        health.heard_every_canary();
        LocalWindow::new(max_bytes, health)
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_served_until_it_expires() {
        let window = trusted_window(1024);
        let generation = window.generation();
        window.keep(
            "a",
            Bytes::from_static(b"v"),
            Instant::now() + Duration::from_secs(1),
            generation,
        );
        assert_eq!(window.get("a").as_deref(), Some(&b"v"[..]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(window.get("a"), None);
        assert_eq!(window.bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_value_read_before_a_change_is_not_kept_after_it() {
        let window = trusted_window(1024);
        let generation = window.generation();
        window.forget("a");
        window.keep(
            "a",
            Bytes::from_static(b"old"),
            Instant::now() + Duration::from_secs(60),
            generation,
        );
        assert_eq!(window.get("a"), None);
    }

    #[tokio::test]
    async fn the_window_stays_within_its_bytes() {
        let window = trusted_window(100);
        let later = Instant::now() + Duration::from_secs(60);
        for i in 0..10 {
            window.keep(
                &i.to_string(),
                Bytes::from(vec![0; 20]),
                later,
                window.generation(),
            );
        }
        assert!(window.bytes.load(Ordering::Relaxed) <= 100);
        assert_eq!(window.copies.len(), 5);
        window.clear();
        assert_eq!(
            (window.copies.len(), window.bytes.load(Ordering::Relaxed)),
            (0, 0)
        );
        let disabled = trusted_window(0);
        disabled.keep("a", Bytes::from_static(b"v"), later, disabled.generation());
        assert_eq!(disabled.get("a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_read_longer_ago_than_the_bound_or_while_notifications_are_down_is_not_served() {
        let health = Arc::new(Health::new("p:", 0, "test", Duration::from_secs(3600)));
        let window = LocalWindow::new(1024, Arc::clone(&health));
        let later = Instant::now() + Duration::from_secs(60);
        window.keep("a", Bytes::from_static(b"v"), later, window.generation());
        assert_eq!(window.get("a"), None, "no canary heard yet");
        health.heard_every_canary();
        assert_eq!(window.get("a").as_deref(), Some(&b"v"[..]));
        health.lost();
        assert_eq!(window.get("a"), None, "notifications in doubt");

        let bounded = LocalWindow::new(1024, {
            let health = Arc::new(Health::new("p:", 0, "b", Duration::from_secs(1)));
            health.heard_every_canary();
            health
        });
        bounded.keep("a", Bytes::from_static(b"v"), later, bounded.generation());
        assert!(bounded.get("a").is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(bounded.get("a"), None, "read more than a bound ago");
    }
}
