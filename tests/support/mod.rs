//! Test support: a private `redis-server` per test, in-process "instances" (a layer, a backend and
//! an HTTP server on a runtime of their own, so one can die mid-handler like a process), real
//! processes of the server example, an HTTP client, and small synchronisation helpers.
//!
//! Each integration test crate compiles this module on its own and uses part of it.
#![allow(dead_code, unused_imports, unreachable_pub)]

mod client;
#[cfg(feature = "redis")]
mod instance;
mod process;
mod redis_server;

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::sync::watch;

pub use client::{HttpClient, Reply};
#[cfg(feature = "redis")]
pub use instance::Instance;
pub use process::ServerProcess;
pub use redis_server::{RedisServer, Resp};

/// A counter that can be awaited: `wait_for(n)` returns once it reached `n`.
#[derive(Clone, Debug)]
pub struct Tally(watch::Sender<usize>);

impl Default for Tally {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl Tally {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one and returns the new count (1 for the first call).
    pub fn add(&self) -> usize {
        let mut now = 0;
        self.0.send_modify(|count| {
            *count += 1;
            now = *count;
        });
        now
    }

    /// The count now.
    pub fn get(&self) -> usize {
        *self.0.borrow()
    }

    /// Waits until the count reaches `n`; panics, naming `what`, if that takes longer than
    /// `within`.
    pub async fn wait_for(&self, n: usize, within: Duration, what: &str) {
        let mut seen = self.0.subscribe();
        let reached = tokio::time::timeout(within, seen.wait_for(|count| *count >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "waited {within:?} for {what} to reach {n}; it is {}",
            self.get()
        );
    }
}

/// A gate that handlers wait at until the test opens it.
#[derive(Clone, Debug)]
pub struct Gate(watch::Sender<bool>);

impl Default for Gate {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens the gate for every waiter, now and later.
    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Returns once the gate is open (at once if it already is).
    pub async fn wait(&self) {
        let mut open = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// Polls `check` every few milliseconds until it returns `Some`, for conditions outside the
/// process that offer no event to await (a port accepting connections, a key expiring in Redis).
/// Panics, naming `what`, after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A name unique in this test process, for temporary directories and keys.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// Creates a fresh, empty directory.
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        Self(path)
    }

    /// The directory's path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
