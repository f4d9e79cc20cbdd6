//! Policies: what happens when a follower waits too long.

/// What a follower does once it has waited past the wait timeout for a leader that is still
/// running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitTimeoutPolicy {
    /// Run the work itself and store nothing (what nginx's `proxy_cache_lock_timeout` does).
    #[default]
    RunLocally,
    /// Give up: [`ParkError::WaitTimeout`](crate::ParkError), `504 Gateway Timeout` from the
    /// layer.
    Fail,
}
