//! Choreography shared by the integration tests: signals that let a test hold a handler until every
//! caller has joined its flight, without sleeping.
#![allow(dead_code)] // each test binary uses its own subset

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Once,
    },
    time::Duration,
};

use futures_util::future::join_all;
use tokio::sync::{watch, Notify};

/// How long a test waits for something that should happen at once before it calls it a hang.
pub const HANG: Duration = Duration::from_secs(5);

/// Awaits `future`, failing the test instead of hanging if it takes longer than [`HANG`] (virtual
/// time in tests with a paused clock, so a broken implementation fails there at once too).
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(HANG, future)
        .await
        .unwrap_or_else(|_| panic!("still waiting after {HANG:?}"))
}

/// A gate the work waits at until the test opens it. It stays open until closed again, so work
/// that starts after the opening passes straight through.
#[derive(Clone)]
pub struct Gate(Arc<watch::Sender<bool>>);

impl Default for Gate {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Self::default()
    }

    /// A gate that lets everyone through.
    pub fn open_already() -> Self {
        let gate = Self::default();
        gate.open();
        gate
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    pub fn close(&self) {
        self.0.send_replace(false);
    }

    pub async fn pass(&self) {
        let mut open = self.0.subscribe();
        // The sender lives in `self`, so this only ends when the gate opens.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A counter a test can wait on: "this many callers have joined", "the handler has started".
#[derive(Default)]
pub struct Tally {
    count: AtomicUsize,
    changed: Notify,
}

impl Tally {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn bump(&self) -> usize {
        let now = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        self.changed.notify_waiters();
        now
    }

    pub fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count is at least `n`; panics after [`HANG`].
    pub async fn reached(&self, n: usize) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                let mut changed = pin!(changed);
                // Registered before the check, so a bump right after it is not missed.
                changed.as_mut().enable();
                if self.get() >= n {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(HANG, wait).await.is_err() {
            panic!("waited {HANG:?} for a count of {n}, it is {}", self.get());
        }
    }
}

/// Wraps a call so that `joined` counts it once it has been polled once. A call through a parker
/// or the layer joins (or starts) its key's flight synchronously in its first poll, so a count
/// of `n` means `n` callers are in the flights map or already served.
pub async fn tracked<F: Future>(call: F, joined: Arc<Tally>) -> F::Output {
    let mut call = pin!(call);
    let mut first = true;
    poll_fn(|cx| {
        let poll = call.as_mut().poll(cx);
        if std::mem::take(&mut first) {
            joined.bump();
        }
        poll
    })
    .await
}

/// Runs `calls` concurrently, opens `gate` once every one of them has joined its flight, and
/// returns their results in order.
pub async fn burst<F: Future>(calls: impl IntoIterator<Item = F>, gate: &Gate) -> Vec<F::Output> {
    let joined = Tally::new();
    let calls: Vec<_> = calls
        .into_iter()
        .map(|call| tracked(call, Arc::clone(&joined)))
        .collect();
    let n = calls.len();
    let (results, ()) = within(async {
        tokio::join!(join_all(calls), async {
            joined.reached(n).await;
            gate.open();
        })
    })
    .await;
    results
}

/// Spawns `calls` as tasks (so they really run in parallel on a multi-thread runtime), waits until
/// every one has joined its flight, runs `all_joined`, opens `gate`, and returns their results in
/// order. Panics if any of them hangs.
pub async fn spawn_burst<F>(
    calls: impl IntoIterator<Item = F>,
    gate: &Gate,
    all_joined: impl FnOnce(),
) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let joined = Tally::new();
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|call| tokio::spawn(tracked(call, Arc::clone(&joined))))
        .collect();
    joined.reached(tasks.len()).await;
    all_joined();
    gate.open();
    within(join_all(tasks))
        .await
        .into_iter()
        .map(|result| result.expect("caller task"))
        .collect()
}

/// The marker in the message of panics that tests cause on purpose.
pub const DELIBERATE: &str = "deliberate panic";

/// Keeps the panics tests cause on purpose out of the output; every other panic still prints.
pub fn quiet_deliberate_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str));
            if !payload.is_some_and(|message| message.contains(DELIBERATE)) {
                default(info);
            }
        }));
    });
}
