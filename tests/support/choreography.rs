//! Signals that let a test hold work until every caller is where the test needs it, without
//! sleeping: gates, counters that can be awaited, work held at a gate, and bursts of calls
//! released together once every one of them has joined its flight.

use std::{
    future::{poll_fn, Future},
    pin::pin,
    sync::Once,
    time::Duration,
};

use futures_util::future::join_all;
use tokio::{sync::watch, task::JoinHandle};
use tower_parking::ParkerBuilder;

/// How long a test waits for something that should happen at once before it calls it a hang.
pub const HANG: Duration = Duration::from_secs(5);

/// Awaits `future`, failing the test instead of hanging if it takes longer than [`HANG`] (virtual
/// time in tests with a paused clock, so a broken implementation fails there at once too).
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(HANG, future)
        .await
        .unwrap_or_else(|_| panic!("still waiting after {HANG:?}"))
}

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

/// A gate that work waits at until the test opens it. It stays open until closed again, so work
/// that starts after the opening passes straight through.
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

    /// Closes the gate again: work that arrives from now on waits for the next opening.
    pub fn close(&self) {
        self.0.send_replace(false);
    }

    /// Returns once the gate is open (at once if it already is).
    pub async fn wait(&self) {
        let mut open = self.0.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// The state of a handler (or any piece of work) under test: how many times it ran, and the gate
/// each run waits at.
#[derive(Clone, Debug, Default)]
pub struct Work {
    runs: Tally,
    /// The gate every [`enter`](Work::enter) waits at.
    pub gate: Gate,
}

impl Work {
    /// Work held at a closed gate.
    pub fn held() -> Self {
        Self::default()
    }

    /// Work that runs through.
    pub fn free() -> Self {
        let work = Self::held();
        work.gate.open();
        work
    }

    /// How many runs have started.
    pub fn runs(&self) -> usize {
        self.runs.get()
    }

    /// Counts a run without waiting at the gate; returns the run's number (1 for the first).
    pub fn count_run(&self) -> usize {
        self.runs.add()
    }

    /// Counts a run and waits at the gate; returns the run's number.
    pub async fn enter(&self) -> usize {
        let run = self.count_run();
        self.gate.wait().await;
        run
    }

    /// Waits until `n` runs have started; panics after [`HANG`].
    pub async fn wait_started(&self, n: usize) {
        self.runs.wait_for(n, HANG, "runs started").await;
    }
}

/// Wraps a call so that `joined` counts it once it has been polled once. A call through a parker
/// or the layer joins (or starts) its key's flight synchronously in its first poll, so a count
/// of `n` means `n` callers are in the flights map or already served.
pub async fn tracked<F: Future>(call: F, joined: Tally) -> F::Output {
    let mut call = pin!(call);
    let mut first = true;
    poll_fn(|cx| {
        let poll = call.as_mut().poll(cx);
        if std::mem::take(&mut first) {
            joined.add();
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
        .map(|call| tracked(call, joined.clone()))
        .collect();
    let n = calls.len();
    let (results, ()) = within(async {
        tokio::join!(join_all(calls), async {
            joined.wait_for(n, HANG, "callers in their flight").await;
            gate.open();
        })
    })
    .await;
    results
}

/// Spawns `calls` as tasks (so they really run in parallel on a multi-thread runtime) and returns
/// them once every one has joined its flight; panics after [`HANG`].
pub async fn spawn_joined<F>(calls: impl IntoIterator<Item = F>) -> Vec<JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let joined = Tally::new();
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|call| tokio::spawn(tracked(call, joined.clone())))
        .collect();
    joined
        .wait_for(tasks.len(), HANG, "callers in their flight")
        .await;
    tasks
}

/// The results of spawned calls, in order; panics if any of them hangs or failed.
pub async fn join_spawned<T>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    within(join_all(tasks))
        .await
        .into_iter()
        .map(|result| result.expect("caller task"))
        .collect()
}

/// Spawns `calls`, waits until every one has joined its flight, runs `all_joined`, opens `gate`,
/// and returns their results in order. Panics if any of them hangs.
pub async fn spawn_burst<F>(
    calls: impl IntoIterator<Item = F>,
    gate: &Gate,
    all_joined: impl FnOnce(),
) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks = spawn_joined(calls).await;
    all_joined();
    gate.open();
    join_spawned(tasks).await
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

/// A parker builder whose callers add to `waiting` each time they found their key's lock held by
/// another parker and are about to wait for it: the signal that a caller is parked.
pub fn counting_waits(waiting: &Tally) -> ParkerBuilder {
    let waiting = waiting.clone();
    ParkerBuilder::default().before_wait(move |_key| {
        waiting.add();
        Box::pin(async {})
    })
}
