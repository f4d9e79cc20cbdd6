//! Helpers for tests that drive a `Backend` by hand and look at the Redis keys it writes.

use tower_parking::{
    backend::{Acquire, Lease},
    Key,
};

/// The lease of an `acquire` that made the caller the leader; panics on any other answer.
pub fn acquired(acquire: Acquire) -> Lease {
    match acquire {
        Acquire::Acquired(lease) => lease,
        other => panic!("expected to lead, got {other:?}"),
    }
}

/// The Redis key holding `key`'s `part` (`resp`, `lock` or `fence`) under the default prefix.
pub fn redis_key(key: &Key, part: &str) -> String {
    format!("parking:{{{}}}:{part}", key.digest_hex())
}
