//! Test support: signals to hold work until every caller is in place, a private `redis-server`
//! per test, in-process "instances" (a layer, a backend and an HTTP server on a runtime of their
//! own, so one can die mid-handler like a process), real processes of the server example, and an
//! HTTP client.
//!
//! Each integration test crate (and `benches/redis.rs`) compiles this module on its own and uses
//! part of it.
#![allow(dead_code, unused_imports, unreachable_pub)]

/// A `Stats` with the named counters set and every other one zero (`Stats` is
/// `#[non_exhaustive]`, so it has no struct expression outside the crate).
#[macro_export]
macro_rules! stats {
    ($($field:ident: $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut stats = tower_parking::Stats::default();
        $(stats.$field = $value;)*
        stats
    }};
}

#[cfg(feature = "redis")]
mod backend;
mod choreography;
mod client;
#[cfg(feature = "redis")]
pub mod fleet;
mod got;
#[cfg(feature = "redis")]
mod instance;
pub mod origin;
mod process;
mod proxy;
pub mod redis_cluster;
mod redis_server;

use std::sync::atomic::{AtomicU64, Ordering};

/// The format tag a `StoredResponse` is stored with today (its first bytes), to tell a value
/// overwritten in the current format from an older one.
pub fn stored_response_tag() -> Vec<u8> {
    use tower_parking::{StoredResponse, Value};
    let empty = StoredResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        bytes::Bytes::new(),
    );
    empty.encode()[..4].to_vec()
}

/// Prints the library's `tracing` events to the test's output when `RUST_LOG` asks for them
/// (`RUST_LOG=tower_parking=debug cargo test ... -- --nocapture`), to see why a fault test failed.
pub fn log_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

#[cfg(feature = "redis")]
pub use backend::{acquired, entry, payload, redis_key, sealed};
pub use choreography::{
    burst, counting_waits, eventually, join_spawned, quiet_deliberate_panics, spawn_burst,
    spawn_joined, tracked, within, Gate, Tally, Work, DELIBERATE, HANG,
};
pub use client::{HttpClient, Reply};
pub use got::Got;
#[cfg(feature = "redis")]
pub use instance::Instance;
pub use process::ServerProcess;
pub use proxy::FaultProxy;
pub use redis_server::{RedisServer, Resp};

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
