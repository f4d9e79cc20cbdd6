//! The engine on its own, no HTTP: Go's `singleflight` suite re-expressed (do, error, duplicate
//! suppression, forget, panic, cancellation), plus TTL windows, wait timeouts and parkers that
//! share a backend.
//!
//! Every test holds the work at a [`Gate`] until every caller has joined the flight, so the
//! counts it asserts do not depend on scheduling.

mod common;

use std::{
    convert::Infallible,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{burst, spawn_burst, within, Gate, Tally, DELIBERATE};
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower_parking::{MemoryBackend, Outcome, ParkError, Parker, Stats, WaitTimeoutPolicy};

type Call = (Result<String, ParkError>, Outcome);

/// A piece of work that counts its runs, says when it started, and waits at a gate.
#[derive(Clone)]
struct Work {
    runs: Arc<AtomicUsize>,
    started: Arc<Tally>,
    gate: Gate,
}

impl Work {
    /// Work held at a closed gate.
    fn held() -> Self {
        Self {
            runs: Arc::default(),
            started: Tally::new(),
            gate: Gate::closed(),
        }
    }

    /// Work that runs through.
    fn free() -> Self {
        let work = Self::held();
        work.gate.open();
        work
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    async fn enter(&self) -> usize {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        self.started.bump();
        self.gate.pass().await;
        run
    }

    /// Work whose value is `"{label} (run N)"`.
    fn returning(
        &self,
        label: &'static str,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<String, Infallible>> + Send + 'static {
        let work = self.clone();
        move || {
            Box::pin(async move {
                let run = work.enter().await;
                Ok(format!("{label} (run {run})"))
            })
        }
    }

    fn failing(
        &self,
        message: &'static str,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<String, io::Error>> + Send + 'static {
        let work = self.clone();
        move || {
            Box::pin(async move {
                work.enter().await;
                Err(io::Error::other(message))
            })
        }
    }

    fn panicking(
        &self,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<String, Infallible>> + Send + 'static {
        let work = self.clone();
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
}

fn parker(ttl: Duration) -> Parker<String> {
    Parker::<String>::builder().ttl(ttl).build()
}

/// `n` concurrent calls of `work_for(i)` on `key`, released together once all have joined.
async fn burst_of<F, Fut, E>(
    parker: &Parker<String>,
    key: &str,
    n: usize,
    gate: &Gate,
    work_for: F,
) -> Vec<Call>
where
    F: Fn(usize) -> Fut,
    Fut: FnOnce() -> BoxFuture<'static, Result<String, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let calls = (0..n).map(|i| parker.run_with_outcome(key, work_for(i)));
    burst(calls, gate).await
}

fn outcomes(calls: &[Call]) -> Vec<Outcome> {
    calls.iter().map(|(_, outcome)| *outcome).collect()
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

#[tokio::test]
async fn do_returns_the_value_once_and_keeps_it_for_the_window() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::free();

    let (first, outcome) = within(parker.run_with_outcome("key", work.returning("v"))).await;
    assert_eq!(
        (first.unwrap(), outcome),
        ("v (run 1)".to_string(), Outcome::Miss)
    );
    assert_eq!(parker.in_flight(), 0);

    let (again, outcome) = within(parker.run_with_outcome("key", work.returning("v"))).await;
    assert_eq!(
        (again.unwrap(), outcome),
        ("v (run 1)".to_string(), Outcome::Hit)
    );

    let (other, outcome) = within(parker.run_with_outcome("other", work.returning("o"))).await;
    assert_eq!(
        (other.unwrap(), outcome),
        ("o (run 2)".to_string(), Outcome::Miss)
    );

    assert_eq!(work.runs(), 2);
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            hit: 1,
            executions: 2,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test]
async fn an_error_reaches_every_caller_and_nothing_is_stored() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = burst_of(&parker, "key", 5, &work.gate, |_| {
        work.failing("upstream said no")
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
    let (value, outcome) = within(parker.run_with_outcome("key", work.returning("v"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v (run 2)".to_string(), Outcome::Miss)
    );
    assert_eq!(work.runs(), 2);
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            coalesced: 4,
            executions: 2,
            failures: 1,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

async fn duplicates_are_suppressed(n: usize) {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = (0..n).map(|_| {
        let parker = parker.clone();
        let work = work.returning("shared");
        async move { parker.run_with_outcome("key", work).await }
    });
    let calls = spawn_burst(calls, &work.gate, || {
        assert_eq!(parker.in_flight(), 1, "{n} joined callers, one flight");
        assert!(work.runs() <= 1);
    })
    .await;

    let mut seen = outcomes(&calls);
    seen.sort_by_key(|outcome| *outcome != Outcome::Miss);
    assert_eq!(seen, one_miss_then_coalesced(n));
    assert!(values(calls).iter().all(|value| value == "shared (run 1)"));
    assert_eq!(work.runs(), 1);
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 1,
            coalesced: n as u64 - 1,
            executions: 1,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
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

    let old_callers: Vec<_> = {
        let joined = Tally::new();
        let callers = (0..3)
            .map(|_| {
                let parker = parker.clone();
                let work = old.returning("old");
                tokio::spawn(common::tracked(
                    async move { parker.run_with_outcome("key", work).await },
                    Arc::clone(&joined),
                ))
            })
            .collect();
        joined.reached(3).await;
        old.started.reached(1).await;
        callers
    };
    assert_eq!(parker.in_flight(), 1);

    parker.invalidate("key").await.unwrap();
    assert_eq!(
        parker.in_flight(),
        0,
        "the old flight is forgotten for later callers"
    );

    let new = Work::free();
    let (value, outcome) = within(parker.run_with_outcome("key", new.returning("new"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("new (run 1)".to_string(), Outcome::Miss),
        "the call after invalidate ran its own work, not the old flight's"
    );

    old.gate.open();
    let old_calls: Vec<Call> = futures_util::future::join_all(old_callers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut seen = outcomes(&old_calls);
    seen.sort_by_key(|outcome| *outcome != Outcome::Miss);
    assert_eq!(seen, one_miss_then_coalesced(3));
    assert!(values(old_calls).iter().all(|value| value == "old (run 1)"));

    // The old flight ended after invalidate: its value was served but not stored over the new one.
    let (value, outcome) = within(parker.run_with_outcome("key", new.returning("newer"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("new (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!((old.runs(), new.runs()), (1, 1));
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            coalesced: 2,
            hit: 1,
            executions: 2,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_reaches_every_waiter_at_once() {
    common::quiet_deliberate_panics();
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let calls = (0..10).map(|_| {
        let parker = parker.clone();
        let work = work.panicking();
        async move { parker.run_with_outcome("key", work).await }
    });
    // `spawn_burst` fails the test if any caller is still waiting after HANG.
    let calls = spawn_burst(calls, &work.gate, || {}).await;

    let mut seen = outcomes(&calls);
    seen.sort_by_key(|outcome| *outcome != Outcome::Miss);
    assert_eq!(seen, one_miss_then_coalesced(10));
    for (result, _) in &calls {
        assert!(matches!(result, Err(ParkError::Panicked)), "{result:?}");
    }
    assert_eq!(work.runs(), 1);
    assert_eq!(parker.in_flight(), 0);

    let (value, outcome) = within(parker.run_with_outcome("key", work.returning("after"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("after (run 2)".to_string(), Outcome::Miss)
    );
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            coalesced: 9,
            executions: 2,
            failures: 1,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_starting_caller_does_not_cancel_the_work() {
    let parker = parker(Duration::from_secs(60));
    let work = Work::held();

    let starter = {
        let parker = parker.clone();
        let work = work.returning("v");
        tokio::spawn(async move { parker.run_with_outcome("key", work).await })
    };
    work.started.reached(1).await;

    let followers: Vec<_> = {
        let joined = Tally::new();
        let followers = (0..4)
            .map(|_| {
                let parker = parker.clone();
                let work = work.returning("never runs");
                tokio::spawn(common::tracked(
                    async move { parker.run_with_outcome("key", work).await },
                    Arc::clone(&joined),
                ))
            })
            .collect();
        joined.reached(4).await;
        followers
    };

    starter.abort();
    assert!(starter.await.unwrap_err().is_cancelled());
    assert_eq!(parker.in_flight(), 1, "the flight outlives its starter");

    work.gate.open();
    let calls: Vec<Call> = within(futures_util::future::join_all(followers))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(outcomes(&calls), vec![Outcome::Coalesced; 4]);
    assert!(values(calls).iter().all(|value| value == "v (run 1)"));

    // The value was stored, though its starter never saw it.
    let (value, outcome) = within(parker.run_with_outcome("key", work.returning("again"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(work.runs(), 1);
    // The cancelled starter got no outcome, so none is counted for it.
    assert_eq!(
        parker.stats(),
        Stats {
            coalesced: 4,
            hit: 1,
            executions: 1,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn inside_the_window_nothing_runs_after_it_exactly_one_run() {
    let ttl = Duration::from_secs(10);
    let parker = parker(ttl);
    let work = Work::held();

    let first = burst_of(&parker, "key", 5, &work.gate, |_| work.returning("v")).await;
    assert_eq!(outcomes(&first), one_miss_then_coalesced(5));
    assert!(values(first).iter().all(|value| value == "v (run 1)"));

    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    work.gate.close();
    let inside = burst_of(&parker, "key", 5, &work.gate, |_| work.returning("v")).await;
    assert_eq!(outcomes(&inside), vec![Outcome::Hit; 5]);
    assert!(values(inside).iter().all(|value| value == "v (run 1)"));
    assert_eq!(work.runs(), 1, "inside the window: no run");

    tokio::time::advance(Duration::from_millis(2)).await;
    work.gate.close();
    let after = burst_of(&parker, "key", 5, &work.gate, |_| work.returning("v")).await;
    assert_eq!(outcomes(&after), one_miss_then_coalesced(5));
    assert!(values(after).iter().all(|value| value == "v (run 2)"));
    assert_eq!(work.runs(), 2, "after the window: exactly one more run");

    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            coalesced: 8,
            hit: 5,
            executions: 2,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test]
async fn a_zero_ttl_still_coalesces_but_keeps_nothing() {
    let parker = parker(Duration::ZERO);
    let work = Work::held();

    let calls = burst_of(&parker, "key", 5, &work.gate, |_| work.returning("v")).await;
    assert_eq!(outcomes(&calls), one_miss_then_coalesced(5));
    assert!(values(calls).iter().all(|value| value == "v (run 1)"));
    assert_eq!(work.runs(), 1);

    let (value, outcome) = within(parker.run_with_outcome("key", work.returning("v"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v (run 2)".to_string(), Outcome::Miss)
    );
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 2,
            coalesced: 4,
            executions: 2,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
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

    let leader = {
        let parker = parker.clone();
        let work = leader_work.returning("leader");
        tokio::spawn(async move { parker.run_with_outcome("key", work).await })
    };
    leader_work.started.reached(1).await;

    let start = Instant::now();
    let follower = within(parker.run_with_outcome("key", follower_work.returning("local"))).await;
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
    let (value, outcome) =
        within(parker.run_with_outcome("key", follower_work.returning("x"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("leader (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 1,
            timeout: 1,
            hit: 1,
            executions: 2,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
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
    assert_eq!(
        parker.stats(),
        Stats {
            miss: 1,
            timeout: 1,
            executions: 1,
            ..Stats::default()
        }
    );
    assert_eq!(parker.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parkers_on_one_backend_act_as_one() {
    let backend = MemoryBackend::new();
    let first: Parker<String> = Parker::<String>::builder()
        .backend(backend.clone())
        .ttl(Duration::from_secs(60))
        .build();
    let waiting = Tally::new();
    let second: Parker<String> = Parker::<String>::builder()
        .backend(backend)
        .ttl(Duration::from_secs(60))
        .before_wait({
            let waiting = Arc::clone(&waiting);
            move |_key| {
                waiting.bump();
                Box::pin(async {})
            }
        })
        .build();
    let work = Work::held();

    let leader = {
        let first = first.clone();
        let work = work.returning("first");
        tokio::spawn(async move { first.run_with_outcome("key", work).await })
    };
    work.started.reached(1).await;
    let parked = {
        let second = second.clone();
        let work = work.returning("second");
        tokio::spawn(async move { second.run_with_outcome("key", work).await })
    };
    // The second parker found the lock held by the first.
    waiting.reached(1).await;
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

    let (value, outcome) = within(second.run_with_outcome("key", work.returning("second"))).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("first (run 1)".to_string(), Outcome::Hit)
    );
    assert_eq!(work.runs(), 1);
    assert_eq!(
        first.stats(),
        Stats {
            miss: 1,
            executions: 1,
            ..Stats::default()
        }
    );
    assert_eq!(
        second.stats(),
        Stats {
            parked: 1,
            hit: 1,
            ..Stats::default()
        }
    );
    assert_eq!((first.in_flight(), second.in_flight()), (0, 0));
}
