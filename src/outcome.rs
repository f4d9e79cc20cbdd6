//! How each call was served, and counters of it.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

/// How one call was served. The layer sends it in the `x-parking` response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// This call led: it ran the work (and stored its value when it could).
    Miss,
    /// Served from the TTL window: the work did not run.
    Hit,
    /// Joined a flight already running in this process and got its value.
    Coalesced,
    /// Waited for a leader in another process and got the value it stored.
    Parked,
    /// Not parked at all (method not parked, key function said no): went straight through.
    Bypass,
    /// Waited past the wait timeout, then ran the work itself without storing (or failed, when
    /// the policy says so).
    Timeout,
    /// The key's responses cannot be shared (private, streamed, too large, ...), as a recent run
    /// showed: the call ran the work itself, without waiting for anybody (hit-for-pass).
    Pass,
    /// This call led, and its run revalidated the stored response (the handler answered `304 Not
    /// Modified` to a conditional request): the stored body is served with the refreshed head.
    Revalidated,
    /// Served a value past its freshness, within a stale window: while one refresh runs
    /// (stale-while-revalidate), or in place of a run that failed (stale-if-error).
    Stale,
}

impl Outcome {
    /// Every outcome, in the order [`Stats`] lists them.
    pub const ALL: [Outcome; 9] = [
        Outcome::Miss,
        Outcome::Hit,
        Outcome::Coalesced,
        Outcome::Parked,
        Outcome::Bypass,
        Outcome::Timeout,
        Outcome::Pass,
        Outcome::Revalidated,
        Outcome::Stale,
    ];

    /// The outcome's name, as sent in the `x-parking` header: `miss`, `hit`, `coalesced`,
    /// `parked`, `bypass`, `timeout`, `pass`, `revalidated` or `stale`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Miss => "miss",
            Outcome::Hit => "hit",
            Outcome::Coalesced => "coalesced",
            Outcome::Parked => "parked",
            Outcome::Bypass => "bypass",
            Outcome::Timeout => "timeout",
            Outcome::Pass => "pass",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a [`Parker`](crate::Parker)'s counters since it was built.
///
/// Outcomes are counted when a call is served: a caller that went away before (a client that
/// disconnected) is not counted, though the flight it started still runs and counts in
/// `executions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls served from the TTL window.
    pub hit: u64,
    /// Calls that led and ran the work.
    pub miss: u64,
    /// Calls that joined a flight in this process.
    pub coalesced: u64,
    /// Calls served by a leader in another process.
    pub parked: u64,
    /// Calls let through unparked.
    pub bypass: u64,
    /// Calls that waited past the wait timeout.
    pub timeout: u64,
    /// Calls that ran the work themselves because the key's responses cannot be shared.
    pub pass: u64,
    /// Calls whose run revalidated the stored response with a `304`.
    pub revalidated: u64,
    /// Calls served a stale value (while a refresh ran, or in place of a failed run).
    pub stale: u64,
    /// Background refreshes that failed (the stale value kept serving).
    pub refresh_failures: u64,
    /// How many times the parker ran the work (the handler), whoever asked. Bypassed requests
    /// run the handler outside the parker and count in `bypass` only.
    pub executions: u64,
    /// How many times the work panicked or failed.
    pub failures: u64,
    /// How many backend operations failed (Redis down or slow).
    pub backend_errors: u64,
}

impl Stats {
    /// The count for one outcome.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Miss => self.miss,
            Outcome::Hit => self.hit,
            Outcome::Coalesced => self.coalesced,
            Outcome::Parked => self.parked,
            Outcome::Bypass => self.bypass,
            Outcome::Timeout => self.timeout,
            Outcome::Pass => self.pass,
            Outcome::Revalidated => self.revalidated,
            Outcome::Stale => self.stale,
        }
    }

    /// Calls served, whatever their outcome.
    pub fn calls(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.outcome(*o)).sum()
    }
}

/// Counters added up, as across the layers of several processes.
impl std::ops::Add for Stats {
    type Output = Stats;

    fn add(self, other: Stats) -> Stats {
        Stats {
            hit: self.hit + other.hit,
            miss: self.miss + other.miss,
            coalesced: self.coalesced + other.coalesced,
            parked: self.parked + other.parked,
            bypass: self.bypass + other.bypass,
            timeout: self.timeout + other.timeout,
            pass: self.pass + other.pass,
            revalidated: self.revalidated + other.revalidated,
            stale: self.stale + other.stale,
            refresh_failures: self.refresh_failures + other.refresh_failures,
            executions: self.executions + other.executions,
            failures: self.failures + other.failures,
            backend_errors: self.backend_errors + other.backend_errors,
        }
    }
}

impl std::iter::Sum for Stats {
    fn sum<I: Iterator<Item = Stats>>(iter: I) -> Stats {
        iter.fold(Stats::default(), std::ops::Add::add)
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    executions: AtomicU64,
    failures: AtomicU64,
    backend_errors: AtomicU64,
    refresh_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn execution(&self) {
        self.executions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn refresh_failure(&self) {
        self.refresh_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn backend_error(&self) {
        self.backend_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let outcome = |o: Outcome| self.outcomes[o.index()].load(Ordering::Relaxed);
        Stats {
            hit: outcome(Outcome::Hit),
            miss: outcome(Outcome::Miss),
            coalesced: outcome(Outcome::Coalesced),
            parked: outcome(Outcome::Parked),
            bypass: outcome(Outcome::Bypass),
            timeout: outcome(Outcome::Timeout),
            pass: outcome(Outcome::Pass),
            revalidated: outcome(Outcome::Revalidated),
            stale: outcome(Outcome::Stale),
            refresh_failures: self.refresh_failures.load(Ordering::Relaxed),
            executions: self.executions.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            backend_errors: self.backend_errors.load(Ordering::Relaxed),
        }
    }
}
