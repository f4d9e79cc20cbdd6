//! The engine on its own, no HTTP: Go's `singleflight` suite re-expressed (do, error, duplicate
//! suppression, forget, panic, cancellation), plus TTL windows, wait timeouts and parkers that
//! share a backend.
//!
//! Every test holds the work at a [`Gate`] until every caller has joined the flight, so the
//! counts it asserts do not depend on scheduling.

mod support;

use std::{convert::Infallible, future::Future, io, time::Duration};

use futures_util::future::BoxFuture;
use support::{
    burst, counting_waits, join_spawned, quiet_deliberate_panics, spawn_burst, spawn_joined,
    within, Gate, Tally, Work, DELIBERATE, HANG,
};
use tokio::time::Instant;
use tower_parking::{MemoryBackend, Outcome, ParkError, Parker, Stats, WaitTimeoutPolicy};

type Call = (Result<String, ParkError>, Outcome);

/// What a parker runs: `FnOnce() -> BoxFuture<Result<String, E>>`.
trait Job<E>: FnOnce() -> BoxFuture<'static, Result<String, E>> + Send + 'static {}

impl<E, F: FnOnce() -> BoxFuture<'static, Result<String, E>> + Send + 'static> Job<E> for F {}

/// `work`, with the value `"{label} (run N)"`.
fn returning(work: &Work, label: &'static str) -> impl Job<Infallible> {
    let work = work.clone();
    move || {
        Box::pin(async move {
            let run = work.enter().await;
            Ok(format!("{label} (run {run})"))
        })
    }
}

fn failing(work: &Work, message: &'static str) -> impl Job<io::Error> {
    let work = work.clone();
    move || {
        Box::pin(async move {
            work.enter().await;
            Err(io::Error::other(message))
        })
    }
}

fn panicking(work: &Work) -> impl Job<Infallible> {
    let work = work.clone();
    move || {
        Box::pin(async move {
            let run = work.enter().await;
            if run > 0 {
                panic!("{DELIBERATE} in run {run}");
            }
            Ok(String::new())
        })
    }
}

fn parker(ttl: Duration) -> Parker<String> {
    Parker::<String>::builder().ttl(ttl).build()
}

/// `parker.run_with_outcome(key, job)` as a future that owns its parker, to spawn.
fn call<E>(
    parker: &Parker<String>,
    key: &'static str,
    job: impl Job<E>,
) -> impl Future<Output = Call>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let parker = parker.clone();
    async move { parker.run_with_outcome(key, job).await }
}

/// One call that must not hang nor fail: its value and outcome.
async fn served<E>(parker: &Parker<String>, key: &str, job: impl Job<E>) -> (String, Outcome)
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let (result, outcome) = within(parker.run_with_outcome(key, job)).await;
    (
        result.unwrap_or_else(|error| panic!("{outcome}: {error}")),
        outcome,
    )
}

/// `n` concurrent calls of `work_for(i)` on `key`, released together once all have joined.
async fn burst_of<J, E>(
    parker: &Parker<String>,
    key: &str,
    n: usize,
    gate: &Gate,
    work_for: impl Fn(usize) -> J,
) -> Vec<Call>
where
    J: Job<E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let calls = (0..n).map(|i| parker.run_with_outcome(key, work_for(i)));
    burst(calls, gate).await
}

fn outcomes(calls: &[Call]) -> Vec<Outcome> {
    calls.iter().map(|(_, outcome)| *outcome).collect()
}

/// The outcomes of calls whose order is up to the scheduler, the miss first.
fn outcomes_miss_first(calls: &[Call]) -> Vec<Outcome> {
    let mut seen = outcomes(calls);
    seen.sort_by_key(|outcome| *outcome != Outcome::Miss);
    seen
}

/// One miss first, then `n - 1` coalesced: what a burst of `n` joined callers must see.
fn one_miss_then_coalesced(n: usize) -> Vec<Outcome> {
    let mut expected = vec![Outcome::Coalesced; n];
    expected[0] = Outcome::Miss;
    expected
}

fn values(calls: Vec<Call>) -> Vec<String> {
    calls
        .into_iter()
        .map(|(result, outcome)| result.unwrap_or_else(|error| panic!("{outcome}: {error}")))
        .collect()
}

/// Asserts `parker`'s counters, and that no flight was left behind.
#[track_caller]
fn assert_settled(parker: &Parker<String>, stats: Stats) {
    assert_eq!(parker.stats(), stats);
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test]
async fn do_returns_the_value_once_and_keeps_it_for_the_window() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::free();

    assert_eq!(
        served(&parker, "key", returning(&work, "v")).await,
        ("v (run 1)".to_string(), Outcome::Miss)
    );
    assert_eq!(parker.in_flight(), 0);
    assert_eq!(
        served(&parker, "key", returning(&work, "v")).await,
        ("v (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(
        served(&parker, "other", returning(&work, "o")).await,
        ("o (run 2)".to_string(), Outcome::Miss)
    );

    assert_eq!(work.runs(), 2);
    assert_settled(
        &parker,
        stats! {
            miss: 2,
            hit: 1,
            executions: 2,
        },
    );
}

#[tokio::test]
async fn an_error_reaches_every_caller_and_nothing_is_stored() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = burst_of(&parker, "key", 5, &work.gate, |_| {
        failing(&work, "upstream said no")
    })
    .await;
    assert_eq!(outcomes(&calls), one_miss_then_coalesced(5));
    for (result, _) in calls {
        match result {
            Err(ParkError::Failed(error)) => assert_eq!(error.to_string(), "upstream said no"),
            other => panic!("expected the work's error, got {other:?}"),
        }
    }
    assert_eq!(work.runs(), 1);
    assert_eq!(parker.in_flight(), 0);

    // Nothing was stored: the next call runs the work again.
    assert_eq!(
        served(&parker, "key", returning(&work, "v")).await,
        ("v (run 2)".to_string(), Outcome::Miss)
    );
    assert_eq!(work.runs(), 2);
    assert_settled(
        &parker,
        stats! {
            miss: 2,
            coalesced: 4,
            executions: 2,
            failures: 1,
        },
    );
}

async fn duplicates_are_suppressed(n: usize) {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = (0..n).map(|_| call(&parker, "key", returning(&work, "shared")));
    let calls = spawn_burst(calls, &work.gate, || {
        assert_eq!(parker.in_flight(), 1, "{n} joined callers, one flight");
        assert!(work.runs() <= 1);
    })
    .await;

    assert_eq!(outcomes_miss_first(&calls), one_miss_then_coalesced(n));
    assert!(values(calls).iter().all(|value| value == "shared (run 1)"));
    assert_eq!(work.runs(), 1);
    assert_settled(
        &parker,
        stats! {
            miss: 1,
            coalesced: n as u64 - 1,
            executions: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_callers_run_the_work_once() {
    duplicates_are_suppressed(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_callers_run_the_work_once() {
    duplicates_are_suppressed(1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_after_invalidate_joins_a_new_flight() {
    let parker = parker(Duration::from_secs(60));
    let old = Work::held();

    let old_callers =
        spawn_joined((0..3).map(|_| call(&parker, "key", returning(&old, "old")))).await;
    old.wait_started(1).await;
    assert_eq!(parker.in_flight(), 1);

    parker.invalidate("key").await.unwrap();
    assert_eq!(
        parker.in_flight(),
        0,
        "the old flight is forgotten for later callers"
    );

    let new = Work::free();
    assert_eq!(
        served(&parker, "key", returning(&new, "new")).await,
        ("new (run 1)".to_string(), Outcome::Miss),
        "the call after invalidate ran its own work, not the old flight's"
    );

    old.gate.open();
    let old_calls = join_spawned(old_callers).await;
    assert_eq!(outcomes_miss_first(&old_calls), one_miss_then_coalesced(3));
    assert!(values(old_calls).iter().all(|value| value == "old (run 1)"));

    // The old flight ended after invalidate: its value was served but not stored over the new one.
    assert_eq!(
        served(&parker, "key", returning(&new, "newer")).await,
        ("new (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!((old.runs(), new.runs()), (1, 1));
    assert_settled(
        &parker,
        stats! {
            miss: 2,
            coalesced: 2,
            hit: 1,
            executions: 2,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_reaches_every_waiter_at_once() {
    quiet_deliberate_panics();
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = (0..10).map(|_| call(&parker, "key", panicking(&work)));
    // `spawn_burst` fails the test if any caller is still waiting after HANG.
    let calls = spawn_burst(calls, &work.gate, || {}).await;

    assert_eq!(outcomes_miss_first(&calls), one_miss_then_coalesced(10));
    for (result, _) in &calls {
        assert!(matches!(result, Err(ParkError::Panicked)), "{result:?}");
    }
    assert_eq!(work.runs(), 1);
    assert_eq!(parker.in_flight(), 0);

    assert_eq!(
        served(&parker, "key", returning(&work, "after")).await,
        ("after (run 2)".to_string(), Outcome::Miss)
    );
    assert_settled(
        &parker,
        stats! {
            miss: 2,
            coalesced: 9,
            executions: 2,
            failures: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_starting_caller_does_not_cancel_the_work() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let starter = tokio::spawn(call(&parker, "key", returning(&work, "v")));
    work.wait_started(1).await;
    let followers =
        spawn_joined((0..4).map(|_| call(&parker, "key", returning(&work, "never runs")))).await;

    starter.abort();
    assert!(starter.await.unwrap_err().is_cancelled());
    assert_eq!(parker.in_flight(), 1, "the flight outlives its starter");

    work.gate.open();
    let calls = join_spawned(followers).await;
    assert_eq!(outcomes(&calls), vec![Outcome::Coalesced; 4]);
    assert!(values(calls).iter().all(|value| value == "v (run 1)"));

    // The value was stored, though its starter never saw it.
    assert_eq!(
        served(&parker, "key", returning(&work, "again")).await,
        ("v (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(work.runs(), 1);
    // The cancelled starter got no outcome, so none is counted for it.
    assert_settled(
        &parker,
        stats! {
            coalesced: 4,
            hit: 1,
            executions: 1,
        },
    );
}

#[tokio::test(start_paused = true)]
async fn inside_the_window_nothing_runs_after_it_exactly_one_run() {
    let ttl = Duration::from_secs(10);
    let parker = parker(ttl);
    let work = Work::held();

    let first = burst_of(&parker, "key", 5, &work.gate, |_| returning(&work, "v")).await;
    assert_eq!(outcomes(&first), one_miss_then_coalesced(5));
    assert!(values(first).iter().all(|value| value == "v (run 1)"));

    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    work.gate.close();
    let inside = burst_of(&parker, "key", 5, &work.gate, |_| returning(&work, "v")).await;
    assert_eq!(outcomes(&inside), vec![Outcome::Hit; 5]);
    assert!(values(inside).iter().all(|value| value == "v (run 1)"));
    assert_eq!(work.runs(), 1, "inside the window: no run");

    tokio::time::advance(Duration::from_millis(2)).await;
    work.gate.close();
    let after = burst_of(&parker, "key", 5, &work.gate, |_| returning(&work, "v")).await;
    assert_eq!(outcomes(&after), one_miss_then_coalesced(5));
    assert!(values(after).iter().all(|value| value == "v (run 2)"));
    assert_eq!(work.runs(), 2, "after the window: exactly one more run");

    assert_settled(
        &parker,
        stats! {
            miss: 2,
            coalesced: 8,
            hit: 5,
            executions: 2,
        },
    );
}

#[tokio::test]
async fn a_zero_ttl_still_coalesces_but_keeps_nothing() {
    let parker = parker(Duration::ZERO);
    let work = Work::held();

    let calls = burst_of(&parker, "key", 5, &work.gate, |_| returning(&work, "v")).await;
    assert_eq!(outcomes(&calls), one_miss_then_coalesced(5));
    assert!(values(calls).iter().all(|value| value == "v (run 1)"));
    assert_eq!(work.runs(), 1);

    assert_eq!(
        served(&parker, "key", returning(&work, "v")).await,
        ("v (run 2)".to_string(), Outcome::Miss)
    );
    assert_settled(
        &parker,
        stats! {
            miss: 2,
            coalesced: 4,
            executions: 2,
        },
    );
}

/// A leader held at its gate and a follower that gives up on it after `timeout`.
async fn follower_past_the_wait_timeout(
    policy: WaitTimeoutPolicy,
) -> (Parker<String>, Work, Work, Call, Duration) {
    let timeout = Duration::from_millis(100);
    let parker: Parker<String> = Parker::<String>::builder()
        .ttl(Duration::from_secs(60))
        .wait_timeout(timeout)
        .on_wait_timeout(policy)
        .build();
    let leader_work = Work::held();
    let follower_work = Work::free();

    let leader = tokio::spawn(call(&parker, "key", returning(&leader_work, "leader")));
    leader_work.wait_started(1).await;

    let start = Instant::now();
    let follower = within(parker.run_with_outcome("key", returning(&follower_work, "local"))).await;
    let waited = start.elapsed();

    leader_work.gate.open();
    let (value, outcome) = within(leader).await.unwrap();
    assert_eq!(
        (value.unwrap(), outcome),
        ("leader (run 1)".to_string(), Outcome::Miss)
    );
    (parker, leader_work, follower_work, follower, waited)
}

#[tokio::test(start_paused = true)]
async fn past_the_wait_timeout_a_follower_runs_the_work_itself_and_stores_nothing() {
    let (parker, leader_work, follower_work, (value, outcome), waited) =
        follower_past_the_wait_timeout(WaitTimeoutPolicy::RunLocally).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("local (run 1)".to_string(), Outcome::Timeout)
    );
    assert!(
        (Duration::from_millis(100)..=Duration::from_millis(101)).contains(&waited),
        "waited {waited:?}"
    );
    assert_eq!((leader_work.runs(), follower_work.runs()), (1, 1));

    // The leader's value is the one kept, not the follower's.
    assert_eq!(
        served(&parker, "key", returning(&follower_work, "x")).await,
        ("leader (run 1)".to_string(), Outcome::Hit)
    );
    assert_settled(
        &parker,
        stats! {
            miss: 1,
            timeout: 1,
            hit: 1,
            executions: 2,
        },
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_wait_timeout_a_follower_fails_when_told_to() {
    let (parker, leader_work, follower_work, (value, outcome), waited) =
        follower_past_the_wait_timeout(WaitTimeoutPolicy::Fail).await;
    assert_eq!(outcome, Outcome::Timeout);
    assert!(
        matches!(value, Err(ParkError::WaitTimeout(after)) if after == Duration::from_millis(100)),
        "{value:?}"
    );
    assert!(
        (Duration::from_millis(100)..=Duration::from_millis(101)).contains(&waited),
        "waited {waited:?}"
    );
    assert_eq!((leader_work.runs(), follower_work.runs()), (1, 0));
    assert_settled(
        &parker,
        stats! {
            miss: 1,
            timeout: 1,
            executions: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parkers_on_one_backend_act_as_one() {
    let backend = MemoryBackend::new();
    let first: Parker<String> = Parker::<String>::builder()
        .backend(backend.clone())
        .ttl(Duration::from_secs(60))
        .build();
    let waiting = Tally::new();
    let second: Parker<String> = counting_waits(&waiting)
        .backend(backend)
        .ttl(Duration::from_secs(60))
        .build();
    let work = Work::held();

    let leader = tokio::spawn(call(&first, "key", returning(&work, "first")));
    work.wait_started(1).await;
    let parked = tokio::spawn(call(&second, "key", returning(&work, "second")));
    // The second parker found the lock held by the first.
    waiting.wait_for(1, HANG, "callers parked").await;
    work.gate.open();

    let (value, outcome) = within(leader).await.unwrap();
    assert_eq!(
        (value.unwrap(), outcome),
        ("first (run 1)".to_string(), Outcome::Miss)
    );
    let (value, outcome) = within(parked).await.unwrap();
    assert_eq!(
        (value.unwrap(), outcome),
        ("first (run 1)".to_string(), Outcome::Parked)
    );

    assert_eq!(
        served(&second, "key", returning(&work, "second")).await,
        ("first (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(work.runs(), 1);
    assert_settled(
        &first,
        stats! {
            miss: 1,
            executions: 1,
        },
    );
    assert_settled(
        &second,
        stats! {
            parked: 1,
            hit: 1,
        },
    );
}
