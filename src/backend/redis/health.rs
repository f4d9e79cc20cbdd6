//! Whether the notification path is alive end to end, proved by a canary.
//!
//! Every backend writes a key of its own (`P{canary-<nonce>}:beat`) every quarter of the
//! staleness bound, and listens on that key's own keyspace channel. Hearing the notification
//! proves, in one go, that the command connection writes, that Redis sends notifications with
//! the flags needed, and that the subscriber connection receives them. While the canary has not
//! been heard for a whole bound, nothing is served from the local window and parked requests
//! poll Redis in short steps instead of waiting to be woken.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The notification path's health, as the canary tells it.
#[derive(Debug)]
pub(super) struct Health {
    epoch: Instant,
    /// Milliseconds after `epoch` until which the path counts as alive.
    alive_until: AtomicU64,
    /// How long a canary heard keeps the path alive: the local window's staleness bound.
    pub(super) bound: Duration,
    /// The canary's key, and the keyspace channel its notifications come on.
    pub(super) canary_key: String,
    pub(super) canary_channel: String,
}

impl Health {
    pub(super) fn new(prefix: &str, db: u8, nonce: &str, bound: Duration) -> Self {
        let canary_key = format!("{prefix}{{canary-{nonce}}}:beat");
        Self {
            epoch: Instant::now(),
            alive_until: AtomicU64::new(0),
            bound,
            canary_channel: format!("__keyspace@{db}__:{canary_key}"),
            canary_key,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether a canary was heard within the bound.
    pub(super) fn alive(&self) -> bool {
        self.now() < self.alive_until.load(Ordering::Acquire)
    }

    /// The canary was heard: the path is alive for another bound.
    pub(super) fn heard_canary(&self) {
        let until = self.now().saturating_add(self.bound.as_millis() as u64);
        self.alive_until.store(until, Ordering::Release);
    }

    /// Anything that may have lost notifications happened: alive again only once a canary is
    /// heard after it.
    pub(super) fn lost(&self) {
        self.alive_until.store(0, Ordering::Release);
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
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(Instant::now().elapsed().as_nanos());
    Duration::from_millis(base + hasher.finish() % (spread + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_only_within_the_bound_after_a_canary() {
        let health = Health::new("p:", 0, "n", Duration::from_secs(60));
        assert!(!health.alive(), "not alive before the first canary");
        assert!(health.recheck_after() <= Duration::from_millis(50));
        health.heard_canary();
        assert!(health.alive());
        assert!(health.recheck_after() >= Duration::from_millis(800));
        health.lost();
        assert!(!health.alive());
        assert_eq!(health.canary_key, "p:{canary-n}:beat");
        assert_eq!(health.canary_channel, "__keyspace@0__:p:{canary-n}:beat");
    }
}
