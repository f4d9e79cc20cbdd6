//! The clock of stored values: wall-clock microseconds, shared by every process of a fleet.
//!
//! A stored value says until when it is fresh in wall-clock time, so that every process that
//! reads it from a shared backend agrees (to within their clocks' skew). Readings follow tokio's
//! clock from a wall-clock anchor taken once per process, so a paused test clock moves them too.

use std::{
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;

/// Microseconds since the Unix epoch.
pub(crate) type Micros = u64;

fn anchor() -> &'static (Micros, Instant) {
    static ANCHOR: OnceLock<(Micros, Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (micros(wall), Instant::now())
    })
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now() -> Micros {
    let (wall, instant) = anchor();
    let now = Instant::now();
    // A paused test clock can stand before the anchor (its runtime started before another took
    // the anchor): readings still move with it, before the anchor as after.
    match now.checked_duration_since(*instant) {
        Some(after) => wall.saturating_add(micros(after)),
        None => wall.saturating_sub(micros(instant.duration_since(now))),
    }
}

/// A reading of [`now`] as a `SystemTime`.
pub(crate) fn system_time(at: Micros) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(at)
}

/// A duration in whole microseconds (saturating).
pub(crate) fn micros(duration: Duration) -> Micros {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// How long from `from` to `to` (zero if `to` is earlier).
pub(crate) fn between(from: Micros, to: Micros) -> Duration {
    Duration::from_micros(to.saturating_sub(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readings_follow_a_paused_clock_whenever_its_runtime_started() {
        let before = now();
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(now() - before, 1_000);
    }
}
