//! Random numbers without a dependency, for what needs no cryptographic quality: jitter, XFetch's
//! draw, a backend's lock-token prefix.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
};

/// A random number: `RandomState` is seeded from the OS's randomness once per thread and moves on
/// with every instance; the clock only adds to it.
pub(crate) fn u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}

/// A number drawn uniformly from (0, 1].
pub(crate) fn unit() -> f64 {
    1.0 - (u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_differ_and_stay_in_range() {
        let draws: Vec<f64> = (0..100).map(|_| super::unit()).collect();
        assert!(draws.iter().all(|draw| *draw > 0.0 && *draw <= 1.0));
        assert!(draws.windows(2).any(|pair| pair[0] != pair[1]));
    }
}
