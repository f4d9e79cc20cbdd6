//! Whether the notification path is alive end to end, proved by canaries.
//!
//! Every backend writes keys of its own (`P{canary-<nonce>-<n>}:beat`) every quarter of the
//! staleness bound, one on every primary (a cluster's keyspace notifications are per node: `<n>`
//! is picked so that the key's slot is on that primary), and listens on their keyspace channels.
//! Hearing a canary proves, in one go, that the command connection writes, that the node sends
//! notifications with the flags needed, and that the subscriber connection to that node receives
//! them. While any primary's canary has not been heard for a whole bound, nothing is served from
//! the local window and parked requests poll Redis in short steps instead of waiting to be woken.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

/// The notification path's health, as the canaries tell it.
#[derive(Debug)]
pub(super) struct Health {
    epoch: Instant,
    /// The current canaries' keys, one per primary, and the milliseconds after `epoch` until
    /// which each counts as heard.
    canaries: Mutex<Vec<(String, u64)>>,
    /// The earliest of those times (0 without canaries): read on every local-window hit, so
    /// without the lock.
    alive_until: AtomicU64,
    /// How long a canary heard keeps the path alive: the local window's staleness bound.
    pub(super) bound: Duration,
    /// What every canary key of this backend starts with (`P{canary-<nonce>-`).
    canary_head: String,
    /// The keyspace channel pattern of every canary key of this backend.
    pub(super) canary_pattern: String,
}

impl Health {
    pub(super) fn new(prefix: &str, db: u8, nonce: &str, bound: Duration) -> Self {
        let canary_head = format!("{prefix}{{canary-{nonce}-");
        Self {
            epoch: Instant::now(),
            canaries: Mutex::new(Vec::new()),
            alive_until: AtomicU64::new(0),
            bound,
            canary_pattern: format!("__keyspace@{db}__:{canary_head}*}}:beat"),
            canary_head,
        }
    }

    /// The `n`th canary key: `P{canary-<nonce>-<n>}:beat`, whose hash tag is
    /// `canary-<nonce>-<n>`.
    pub(super) fn canary_key(&self, n: u32) -> String {
        format!("{}{n}}}:beat", self.canary_head)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Changes the canaries under their lock, then publishes until when they are all heard.
    fn update<T>(&self, change: impl FnOnce(&mut Vec<(String, u64)>) -> T) -> T {
        let mut canaries = self.canaries.lock().unwrap_or_else(|e| e.into_inner());
        let changed = change(&mut canaries);
        let until = canaries.iter().map(|(_, until)| *until).min().unwrap_or(0);
        self.alive_until.store(until, Ordering::Release);
        changed
    }

    /// The canaries to fly from now on, one per primary: those kept keep when they were heard,
    /// new ones count as unheard until they are.
    pub(super) fn fly(&self, keys: Vec<String>) {
        self.update(|canaries| {
            if canaries.iter().map(|(key, _)| key).eq(keys.iter()) {
                return;
            }
            let kept = keys
                .into_iter()
                .map(|key| {
                    let heard = canaries
                        .iter()
                        .find(|(old, _)| *old == key)
                        .map_or(0, |(_, until)| *until);
                    (key, heard)
                })
                .collect();
            *canaries = kept;
        });
    }

    /// Whether every current canary was heard within the bound.
    pub(super) fn alive(&self) -> bool {
        self.now() < self.alive_until.load(Ordering::Acquire)
    }

    /// Whether this key is one of this backend's canaries (current or not).
    pub(super) fn is_canary(&self, key: &str) -> bool {
        key.starts_with(&self.canary_head)
    }

    /// A canary was heard: its primary's path is alive for another bound.
    pub(super) fn heard_canary(&self, key: &str) {
        let until = self.now().saturating_add(self.bound.as_millis() as u64);
        self.update(|canaries| {
            if let Some(canary) = canaries.iter_mut().find(|(k, _)| k == key) {
                canary.1 = until;
            }
        });
    }

    /// As if the only canary was heard (tests of the local window).
    #[cfg(test)]
    pub(super) fn heard_every_canary(&self) {
        let mut keys: Vec<String> =
            self.update(|canaries| canaries.iter().map(|(key, _)| key.clone()).collect());
        if keys.is_empty() {
            keys = vec![self.canary_key(0)];
            self.fly(keys.clone());
        }
        for key in keys {
            self.heard_canary(&key);
        }
    }

    /// Anything that may have lost notifications happened: alive again only once every canary
    /// is heard after it.
    pub(super) fn lost(&self) {
        self.update(|canaries| {
            for canary in canaries.iter_mut() {
                canary.1 = 0;
            }
        });
    }

    /// How long a parked request waits before it looks at Redis again by itself: about a second
    /// while notifications flow (a lock removed without one, by `FLUSHALL` or eviction, costs
    /// no more), tens of milliseconds while they do not.
    pub(super) fn recheck_after(&self) -> Duration {
        if self.alive() {
            jittered(800, 400)
        } else {
            jittered(25, 25)
        }
    }
}

/// `base` plus up to `spread` milliseconds, so that waiters of many processes do not look at
/// Redis in step.
pub(super) fn jittered(base: u64, spread: u64) -> Duration {
    Duration::from_millis(base + crate::random::u64() % (spread + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_only_while_every_canary_was_heard_within_the_bound() {
        let health = Health::new("p:", 0, "n", Duration::from_secs(60));
        assert!(!health.alive(), "not alive before the first canary");
        assert_eq!(health.canary_key(0), "p:{canary-n-0}:beat");
        assert_eq!(health.canary_pattern, "__keyspace@0__:p:{canary-n-*}:beat");
        health.fly(vec![health.canary_key(0), health.canary_key(1)]);
        assert!(!health.alive());
        assert!(health.recheck_after() <= Duration::from_millis(50));
        health.heard_canary(&health.canary_key(0));
        assert!(!health.alive(), "one primary's canary is not enough");
        health.heard_canary(&health.canary_key(1));
        assert!(health.alive());
        assert!(health.recheck_after() >= Duration::from_millis(800));
        health.fly(vec![health.canary_key(1), health.canary_key(2)]);
        assert!(!health.alive(), "a new primary's canary is not heard yet");
        health.heard_canary(&health.canary_key(2));
        assert!(health.alive(), "the kept canary keeps when it was heard");
        health.lost();
        assert!(!health.alive());
        assert!(health.is_canary("p:{canary-n-7}:beat"));
        assert!(!health.is_canary("p:{canary-m-7}:beat"));
    }
}
