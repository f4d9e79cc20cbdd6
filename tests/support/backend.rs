//! Helpers for tests that drive a `Backend` by hand and look at the Redis keys it writes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tower_parking::{
    backend::{Acquire, EntryKind, Lease, Stamp},
    Key,
};

/// An entry as the parker stores it: `value`, written under `lease`, fresh and kept for
/// `fresh_for` from now.
pub fn sealed(lease: &Lease, fresh_for: Duration, value: &[u8]) -> Bytes {
    entry(lease.fence(), fresh_for, value)
}

/// An entry as the parker stores it: `value`, written under `fence`, fresh and kept for
/// `fresh_for` from now.
pub fn entry(fence: u64, fresh_for: Duration, value: &[u8]) -> Bytes {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let until = now + fresh_for.as_micros() as u64;
    Stamp {
        fence,
        fresh_until: until,
        keep_until: until,
        stale_until: 0,
        error_until: 0,
        stored_at: now,
        took_ms: 0,
        kind: EntryKind::Value,
    }
    .seal(value)
}

/// The value an entry holds.
pub fn payload(entry: &Bytes) -> Bytes {
    Stamp::open(entry).expect("a stored entry").1
}

/// The lease of an `acquire` that made the caller the leader; panics on any other answer.
pub fn acquired(acquire: Acquire) -> Lease {
    match acquire {
        Acquire::Acquired(lease, _) => lease,
        other => panic!("expected to lead, got {other:?}"),
    }
}

/// The Redis key holding `key`'s `part` (`resp`, `lock` or `fence`) under the default prefix.
pub fn redis_key(key: &Key, part: &str) -> String {
    format!(
        "parking:{{{}}}:{}:{part}",
        key.uri_digest_hex(),
        key.variant_digest_hex()
    )
}
