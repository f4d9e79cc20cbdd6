//! Stale-while-revalidate, stale-if-error and early refresh (issue 9) in one process, on the
//! memory backend: an axum app with `ParkingLayer` over its `Router`, driven through
//! `Router::oneshot` on tokio's paused clock (the crate's clock follows it).
//!
//! Time moves with `tokio::time::sleep` on the paused clock: it moves only once every task that
//! can run has run, so a refresh started by a request runs (and fails or lands) at the instant of
//! that request, and the windows (TTL 1 s, stale windows of a few seconds, retry intervals) are
//! crossed to the millisecond. A refresh runs on its own task: the tests wait for it on signals
//! (the origin counting its runs, the entry the memory backend holds, the refresh-failure
//! counter), never on a sleep, and prove that a stale answer did not wait for the refresh by
//! holding the refresh at a closed gate: an answer that waited for it would never come.

mod support;

use std::{io, time::Duration};

use axum::{
    body::Body,
    http::{request::Parts, Request, Response},
    routing::get,
    Router,
};
use futures_util::future::join_all;
use support::{
    burst,
    origin::{Answer, ScriptedOrigin},
    quiet_deliberate_panics, within, Got, Work,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_parking::{
    backend::Stamp, Backend, Key, MemoryBackend, Outcome, Parker, ParkingLayer, StoredResponse,
    Value,
};

const PATH: &str = "/report";
const TTL: Duration = Duration::from_secs(1);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// How a test case sets up its layer.
type Configure = fn(ParkingLayer) -> ParkingLayer;

/// A way for a refresh to fail, the retry interval set (`None`: the default), and the status and
/// body (of run N) of the request after the window.
type RefreshFailure = (Answer, Option<Duration>, u16, fn(usize) -> String);

/// Moves the paused clock on by `duration`, once every task that can run now has run (the
/// runtime advances a paused clock only when it is idle): what a refresh started now does, it
/// does now.
async fn step(duration: Duration) {
    tokio::time::sleep(duration).await;
}

/// Lets the other tasks run until `done` holds, without moving the clock (a paused clock does
/// not move while a task is runnable); panics, naming `what`, if it never does.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what}: still not so after 10 000 turns of the scheduler");
}

/// The app: `origin` answering `GET /report` (body `run N`), `POST /report` answering `saved` (a
/// successful write), with `layer` over the router.
fn app(origin: &ScriptedOrigin, layer: &ParkingLayer) -> Router {
    let origin = origin.clone();
    let read = move || {
        let origin = origin.clone();
        async move { origin.run("").await }
    };
    Router::new()
        .route(PATH, get(read).post(|| async { "saved" }))
        .layer(layer.clone())
}

/// Requests keyed by path alone, so a test can look at the entry stored for `PATH`.
fn by_path(parts: &Parts) -> Option<Key> {
    Some(Key::new(parts.uri.path()))
}

/// The layer of these tests: keyed by path, TTL 1 s, on `backend`.
fn layer(backend: &MemoryBackend) -> ParkingLayer {
    ParkingLayer::new()
        .key(by_path)
        .ttl(TTL)
        .backend(backend.clone())
}

/// The body of the response `backend` holds for `PATH`, fresh or not.
fn stored(backend: &MemoryBackend) -> Option<String> {
    let entry = backend.peek(&Key::new(PATH))?;
    let (_, payload) = Stamp::open(&entry).expect("an entry of this version");
    let response = StoredResponse::decode(payload).expect("a stored response");
    Some(String::from_utf8_lossy(&response.body).into_owned())
}

impl Got {
    /// Status, `x-parking` and body.
    fn view(&self) -> (u16, &str, &str) {
        (
            self.status.as_u16(),
            self.parking().unwrap_or(""),
            self.text(),
        )
    }
}

async fn send_request(app: &Router, request: Request<Body>) -> Got {
    within(async {
        let response = app.clone().oneshot(request).await.expect("infallible");
        Got::read(response).await
    })
    .await
}

/// `GET /report`; panics if it does not answer within 5 s (of the paused clock).
async fn send(app: &Router) -> Got {
    send_request(app, Request::get(PATH).body(Body::empty()).unwrap()).await
}

/// `POST /report`: a write, which invalidates what is stored for the URI when it succeeds.
async fn write(app: &Router) -> Got {
    send_request(app, Request::post(PATH).body(Body::empty()).unwrap()).await
}

// ------------------------------------------------------------------------------------------
// Stale while revalidate.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn after_the_ttl_the_old_response_is_served_at_once_while_one_refresh_runs() {
    let backend = MemoryBackend::new();
    let layer = layer(&backend)
        .stale_while_revalidate(ms(10_000))
        .cache_status(true);
    let origin = ScriptedOrigin::new();
    let app = app(&origin, &layer);

    assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
    step(ms(1_500)).await;

    // The refresh is held at the gate: an answer that waited for it would never come.
    origin.work.gate.close();
    let asked = Instant::now();
    let burst = join_all((0..20).map(|_| send(&app))).await;
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "nobody waited for anything"
    );
    for got in &burst {
        assert_eq!(got.view(), (200, "stale", "run 1"));
        assert_eq!(got.age(), Some(1), "stored 1.5 s ago");
        assert_eq!(
            got.header("cache-status"),
            Some("tower-parking; hit; detail=stale")
        );
    }
    origin.work.wait_started(2).await;

    // The refresh still runs a second later; the old response keeps serving, and ages.
    step(ms(1_000)).await;
    let meanwhile = join_all((0..5).map(|_| send(&app))).await;
    for got in &meanwhile {
        assert_eq!(got.view(), (200, "stale", "run 1"));
        assert_eq!(got.age(), Some(2), "stored 2.5 s ago");
    }
    assert_eq!(origin.runs(), 2, "one refresh for 25 stale answers");

    origin.work.gate.open();
    until("the refresh to store run 2", || {
        stored(&backend).as_deref() == Some("run 2")
    })
    .await;
    let hit = send(&app).await;
    assert_eq!(hit.view(), (200, "hit", "run 2"));
    assert_eq!(hit.age(), Some(0));
    assert_eq!(origin.runs(), 2);
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, stale: 25, hit: 1, executions: 2 }
    );

    // The next window goes the same way, from run 2.
    step(ms(1_200)).await;
    let stale = send(&app).await;
    assert_eq!(stale.view(), (200, "stale", "run 2"));
    assert_eq!(stale.age(), Some(1));
    until("the refresh to store run 3", || {
        stored(&backend).as_deref() == Some("run 3")
    })
    .await;
    assert_eq!(send(&app).await.view(), (200, "hit", "run 3"));
    assert_eq!(origin.runs(), 3);
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, stale: 26, hit: 2, executions: 3 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_response_is_served_stale_only_until_its_window_ends() {
    // TTL 1 s and a window of 2 s: fresh until 1 s, stale until 3 s, never after. A longer
    // stale-if-error window does not lengthen it: it only stands in for failed runs.
    let cases = [
        (999, (200, "hit", "run 1")),
        (1_001, (200, "stale", "run 1")),
        (2_999, (200, "stale", "run 1")),
        (3_001, (200, "miss", "run 2")),
    ];
    for if_error in [None, Some(ms(10_000))] {
        for (at, expected) in cases {
            let backend = MemoryBackend::new();
            let mut layer = layer(&backend).stale_while_revalidate(ms(2_000));
            if let Some(window) = if_error {
                layer = layer.stale_if_error(window);
            }
            let origin = ScriptedOrigin::new();
            let app = app(&origin, &layer);
            assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
            step(ms(at)).await;
            assert_eq!(
                send(&app).await.view(),
                expected,
                "{at} ms after the response was stored, stale-if-error {if_error:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn with_ttl_from_response_a_response_s_own_directives_set_its_stale_windows() {
    let own: Configure = |layer| layer.ttl_from_response(true);
    let own_over_10_s: Configure = |layer| {
        layer
            .ttl_from_response(true)
            .stale_while_revalidate(ms(10_000))
            .stale_if_error(ms(10_000))
    };
    let not_own: Configure = |layer| layer;
    let swr = "max-age=1, stale-while-revalidate=2";
    let sie = "max-age=1, stale-if-error=3";
    let cases = [
        (
            "its own 2 s window",
            own,
            swr,
            2_900,
            Answer::Fine,
            (200, "stale", "run 1"),
        ),
        (
            "its own 2 s window",
            own,
            swr,
            3_100,
            Answer::Fine,
            (200, "miss", "run 2"),
        ),
        (
            "its own 2 s, not the layer's 10 s",
            own_over_10_s,
            swr,
            3_100,
            Answer::Fine,
            (200, "miss", "run 2"),
        ),
        (
            "not read without ttl_from_response",
            not_own,
            swr,
            1_500,
            Answer::Fine,
            (200, "miss", "run 2"),
        ),
        (
            "its own stale-while-revalidate=0, not the layer's 10 s",
            own_over_10_s,
            "max-age=1, stale-while-revalidate=0",
            1_500,
            Answer::Fine,
            (200, "miss", "run 2"),
        ),
        (
            "its own 3 s error window",
            own,
            sie,
            3_900,
            Answer::ServerError,
            (200, "stale", "run 1"),
        ),
        (
            "its own 3 s error window",
            own,
            sie,
            4_100,
            Answer::ServerError,
            (503, "miss", "failed run 2"),
        ),
        (
            "not read without ttl_from_response",
            not_own,
            sie,
            1_500,
            Answer::ServerError,
            (503, "miss", "failed run 2"),
        ),
        (
            "must-revalidate beats its own windows",
            own,
            "max-age=1, must-revalidate, stale-while-revalidate=60, stale-if-error=60",
            1_500,
            Answer::ServerError,
            (503, "miss", "failed run 2"),
        ),
    ];
    for (what, configure, directives, at, then, expected) in cases {
        let backend = MemoryBackend::new();
        let layer = configure(
            ParkingLayer::new()
                .key(by_path)
                .ttl(ms(10_000))
                .backend(backend),
        );
        let origin = ScriptedOrigin::stating(directives);
        let app = app(&origin, &layer);
        assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
        origin.answer(then);
        step(ms(at)).await;
        assert_eq!(
            send(&app).await.view(),
            expected,
            "{what}: {directives}, {at} ms after it was stored, then {then:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_refresh_keeps_the_old_response_until_the_window_ends_retrying_once_per_interval()
{
    quiet_deliberate_panics();
    // A request every 70 ms from 1.05 s to the end of the window at 5 s. Each failure kind with
    // another retry interval: the default (1 s), and two set with `refresh_retry`.
    let cases: [RefreshFailure; 3] = [
        (Answer::ServerError, None, 503, |run| {
            format!("failed run {run}")
        }),
        (Answer::Panic, Some(ms(300)), 500, |_| {
            "the handler failed".into()
        }),
        (Answer::Private, Some(ms(650)), 200, |run| {
            format!("private run {run}")
        }),
    ];
    for (failure, retry, after_status, after_body) in cases {
        let backend = MemoryBackend::new();
        let mut layer = layer(&backend).stale_while_revalidate(ms(4_000));
        if let Some(retry) = retry {
            layer = layer.refresh_retry(retry);
        }
        let retry = retry.unwrap_or(ms(1_000));
        let origin = ScriptedOrigin::new();
        let app = app(&origin, &layer);
        let start = Instant::now();
        assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
        origin.answer(failure);

        step(ms(1_050)).await;
        let mut stale = 0;
        while start.elapsed() < ms(5_000) {
            let got = send(&app).await;
            let at = start.elapsed();
            assert_eq!(got.view(), (200, "stale", "run 1"), "{failure:?} at {at:?}");
            assert_eq!(got.age(), Some(at.as_secs()), "{failure:?} at {at:?}");
            stale += 1;
            step(ms(70)).await;
        }

        let attempts = origin.started()[1..].to_vec();
        assert!(attempts.len() >= 2, "{failure:?}: retried: {attempts:?}");
        for pair in attempts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= retry && gap < retry + ms(70),
                "{failure:?}: refreshes {gap:?} apart, retry every {retry:?}: at most once per \
                 interval, and again at the first request after it"
            );
        }
        let last = *attempts.last().unwrap() - start;
        assert!(
            last + retry + ms(70) > ms(5_000),
            "{failure:?}: retried until the window ended (last at {last:?})"
        );
        let attempts = attempts.len() as u64;
        let panics = if failure == Answer::Panic {
            attempts
        } else {
            0
        };
        assert_eq!(
            layer.stats(),
            stats! {
                miss: 1,
                stale: stale,
                executions: 1 + attempts,
                failures: panics,
                refresh_failures: attempts,
            },
            "{failure:?}"
        );

        // The window has ended: the next request is a miss, and gets what the origin answers.
        let after = send(&app).await;
        let runs = origin.runs();
        assert_eq!(
            after.view(),
            (after_status, "miss", &*after_body(runs)),
            "{failure:?} after the window"
        );
        assert_eq!(runs as u64, 2 + attempts, "{failure:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn after_the_window_a_request_runs_the_handler_at_once_however_recent_the_last_failed_refresh(
) {
    // Window ends at 2 s; the last refresh fails at 1.9 s and may not be retried before 2.9 s.
    let backend = MemoryBackend::new();
    let layer = layer(&backend).stale_while_revalidate(ms(1_000));
    let origin = ScriptedOrigin::new();
    let app = app(&origin, &layer);
    assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
    origin.answer(Answer::ServerError);

    step(ms(1_900)).await;
    assert_eq!(send(&app).await.view(), (200, "stale", "run 1"));
    until("the refresh to fail", || {
        layer.stats().refresh_failures == 1
    })
    .await;

    step(ms(200)).await;
    let asked = Instant::now();
    let after = send(&app).await;
    assert_eq!(after.view(), (503, "miss", "failed run 3"));
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "a miss after the window waited for the retry interval of a refresh nobody runs"
    );
}

// ------------------------------------------------------------------------------------------
// Stale if error.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_failing_run_within_the_error_window_hands_the_held_response_to_its_caller_and_every_waiter(
) {
    quiet_deliberate_panics();
    // Stale-if-error alone; and after a stale-while-revalidate window that has ended.
    let configs: [(&str, Configure); 2] = [
        ("stale_if_error alone", |layer| {
            layer.stale_if_error(ms(5_000))
        }),
        ("after a stale window of 1 s", |layer| {
            layer
                .stale_while_revalidate(ms(1_000))
                .stale_if_error(ms(5_000))
        }),
    ];
    for (config, configure) in configs {
        for (failure, failed) in [
            (Answer::ServerError, (503, "miss", "failed run 5")),
            (Answer::Panic, (500, "miss", "the handler failed")),
        ] {
            let case = format!("{config}, {failure:?}");
            let backend = MemoryBackend::new();
            let layer = configure(layer(&backend));
            let origin = ScriptedOrigin::new();
            let app = app(&origin, &layer);
            assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));

            // 2.5 s: past the TTL (and the stale window), within the error window. Four
            // requests park on one run, which fails.
            step(ms(2_500)).await;
            origin.answer(failure);
            origin.work.gate.close();
            let parked = burst((0..4).map(|_| send(&app)), &origin.work.gate).await;
            for got in &parked {
                assert_eq!(got.view(), (200, "stale", "run 1"), "{case}");
                assert_eq!(got.age(), Some(2), "{case}");
            }
            assert_eq!(origin.runs(), 2, "{case}: one run for the four");

            // Nothing was stored: the next request runs the origin again, and is covered again.
            step(ms(100)).await;
            assert_eq!(send(&app).await.view(), (200, "stale", "run 1"), "{case}");
            assert_eq!(origin.runs(), 3, "{case}");

            // The origin is back: its new response, not the held one.
            origin.answer(Answer::Fine);
            step(ms(100)).await;
            assert_eq!(send(&app).await.view(), (200, "miss", "run 4"), "{case}");
            assert_eq!(send(&app).await.view(), (200, "hit", "run 4"), "{case}");

            // Past the error window of run 4 (stored at 2.7 s, fresh until 3.7 s, held until
            // 8.7 s): a failing run reaches its caller.
            origin.answer(failure);
            step(ms(6_100)).await;
            assert_eq!(send(&app).await.view(), failed, "{case}");
            assert_eq!(origin.runs(), 5, "{case}");
            let panics = if failure == Answer::Panic { 3 } else { 0 };
            assert_eq!(
                layer.stats(),
                stats! { miss: 3, stale: 5, hit: 1, executions: 5, failures: panics },
                "{case}"
            );
        }
    }
}

/// An inner service (not a router) whose run 1 answers `run 1` and every later run fails with
/// an error of its own (not a `5xx`: an `Err`), counting its runs in `runs`.
fn failing_after_run_1(
    runs: &Work,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = io::Error,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    let runs = runs.clone();
    tower::service_fn(move |_request: Request<Body>| {
        let run = runs.count_run();
        async move {
            if run > 1 {
                return Err(io::Error::other("database down"));
            }
            Ok(Response::new(Body::from(format!("run {run}"))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn an_inner_service_error_keeps_the_old_response_in_both_windows() {
    for window in ["stale_while_revalidate", "stale_if_error"] {
        let backend = MemoryBackend::new();
        let layer = match window {
            "stale_while_revalidate" => layer(&backend).stale_while_revalidate(ms(5_000)),
            _ => layer(&backend).stale_if_error(ms(5_000)),
        };
        let runs = Work::free();
        let parking = layer.layer(failing_after_run_1(&runs));
        let send = || async {
            let request = Request::get(PATH).body(Body::empty()).unwrap();
            let response = within(parking.clone().oneshot(request)).await;
            Got::read(response.expect("the held response, not the service's error")).await
        };
        assert_eq!(send().await.view(), (200, "miss", "run 1"));
        step(ms(1_500)).await;
        assert_eq!(send().await.view(), (200, "stale", "run 1"), "{window}");
        step(ms(100)).await;
        assert_eq!(send().await.view(), (200, "stale", "run 1"), "{window}");
        // Whatever that request set going runs now, before the counts are read.
        step(ms(10)).await;
        assert_eq!(stored(&backend).as_deref(), Some("run 1"), "{window}");
        let (refresh_failures, executions) = match window {
            // One refresh, not retried within the retry interval.
            "stale_while_revalidate" => (1, 2),
            // Two foreground runs, each covered.
            _ => (0, 3),
        };
        assert_eq!(
            layer.stats(),
            stats! { miss: 1, stale: 2, executions: executions, failures: executions - 1, refresh_failures: refresh_failures },
            "{window}"
        );
        assert_eq!(runs.runs() as u64, executions, "{window}");
    }
}

// ------------------------------------------------------------------------------------------
// Early refresh.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn early_refresh_keeps_a_hot_key_fresh_one_refresh_at_a_time() {
    // A request every 5 ms (200 a second) for 5 s; the origin takes 200 ms; β = 1. XFetch then
    // starts a refresh at least 200 ms before expiry in all but ~1e-7 of windows. With the
    // stale window on, a late refresh would show as `stale`; without early refresh, every
    // window would start with one.
    let backend = MemoryBackend::new();
    let layer = layer(&backend)
        .early_refresh(1.0)
        .stale_while_revalidate(ms(10_000));
    let origin = ScriptedOrigin::taking(ms(200));
    let app = app(&origin, &layer);
    assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));

    let start = Instant::now();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut last_run = 1;
    while start.elapsed() < ms(5_000) {
        let got = send(&app).await;
        let (status, outcome, body) = got.view();
        assert_eq!(status, 200);
        *outcomes.entry(outcome.to_owned()).or_default() += 1;
        let run: usize = body.trim_start_matches("run ").parse().unwrap();
        assert!(run >= last_run, "{body} after run {last_run}");
        last_run = run;
        step(ms(5)).await;
    }
    assert_eq!(
        outcomes.keys().collect::<Vec<_>>(),
        ["hit"],
        "after the first miss, hits only: {outcomes:?}"
    );
    // Five windows: at least one refresh each to stay fresh; XFetch with δ = 200 ms and β = 1
    // refreshes a key this hot about 0.6 s before expiry, so 2 to 3 a window; never one a
    // request.
    let refreshes = origin.runs() - 1;
    assert!(
        (5..=20).contains(&refreshes),
        "{refreshes} refreshes in 5 windows of 1 s"
    );
    assert_eq!(origin.most_at_once(), 1, "one refresh at a time");
    assert_eq!(layer.stats().refresh_failures, 0);
}

// ------------------------------------------------------------------------------------------
// What nobody may get.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn no_stale_response_for_a_key_whose_response_could_not_be_stored() {
    for (case, origin, first, second) in [
        (
            "Cache-Control: private",
            {
                let origin = ScriptedOrigin::new();
                origin.answer(Answer::Private);
                origin
            },
            (200, "miss", "private run 1"),
            (200, "pass", "private run 2"),
        ),
        (
            "Cache-Control: no-store",
            ScriptedOrigin::stating("no-store"),
            (200, "miss", "run 1"),
            (200, "pass", "run 2"),
        ),
        (
            "503",
            {
                let origin = ScriptedOrigin::new();
                origin.answer(Answer::ServerError);
                origin
            },
            (503, "miss", "failed run 1"),
            (503, "miss", "failed run 2"),
        ),
    ] {
        let backend = MemoryBackend::new();
        let layer = layer(&backend)
            .stale_while_revalidate(ms(10_000))
            .stale_if_error(ms(10_000));
        let app = app(&origin, &layer);
        assert_eq!(send(&app).await.view(), first, "{case}");
        step(ms(1_500)).await;
        assert_eq!(send(&app).await.view(), second, "{case}");
        assert_eq!(origin.runs(), 2, "{case}");
        assert_eq!(layer.stats().stale, 0, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_stale_response_after_an_invalidation() {
    for case in ["a write", "Parker::invalidate"] {
        let backend = MemoryBackend::new();
        let layer = layer(&backend)
            .stale_while_revalidate(ms(10_000))
            .stale_if_error(ms(10_000));
        let origin = ScriptedOrigin::new();
        let app = app(&origin, &layer);
        assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
        step(ms(1_500)).await;
        match case {
            "a write" => assert_eq!(write(&app).await.view(), (200, "bypass", "saved")),
            _ => layer.parker().invalidate(Key::new(PATH)).await.unwrap(),
        }
        assert_eq!(
            send(&app).await.view(),
            (200, "miss", "run 2"),
            "{case} in the stale window"
        );
        assert_eq!(send(&app).await.view(), (200, "hit", "run 2"), "{case}");
        assert_eq!(layer.stats().stale, 0, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_write_while_the_refresh_runs_discards_the_refresh_and_the_old_response() {
    let backend = MemoryBackend::new();
    let layer = layer(&backend).stale_while_revalidate(ms(10_000));
    let origin = ScriptedOrigin::new();
    let app = app(&origin, &layer);
    assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));
    step(ms(1_500)).await;

    origin.hold_only(2);
    origin.work.gate.close();
    assert_eq!(send(&app).await.view(), (200, "stale", "run 1"));
    origin.work.wait_started(2).await;
    assert_eq!(write(&app).await.view(), (200, "bypass", "saved"));

    // Neither the old response nor the refresh that began before the write.
    assert_eq!(send(&app).await.view(), (200, "miss", "run 3"));
    origin.work.gate.open();
    step(ms(10)).await;
    assert_eq!(stored(&backend).as_deref(), Some("run 3"));
    assert_eq!(send(&app).await.view(), (200, "hit", "run 3"));
    assert_eq!(
        layer.stats(),
        stats! { miss: 2, stale: 1, hit: 1, bypass: 1, executions: 3 }
    );
}

#[tokio::test(start_paused = true)]
async fn responses_that_must_be_revalidated_are_never_served_stale() {
    for directives in [
        "max-age=1, must-revalidate",
        "max-age=1, proxy-revalidate",
        "s-maxage=1, max-age=600",
        "max-age=1, no-cache",
        "no-cache",
    ] {
        let backend = MemoryBackend::new();
        let layer = ParkingLayer::new()
            .key(by_path)
            .ttl(ms(10_000))
            .backend(backend)
            .stale_while_revalidate(ms(10_000))
            .stale_if_error(ms(10_000));
        let origin = ScriptedOrigin::stating(directives);
        let app = app(&origin, &layer);
        assert_eq!(send(&app).await.view(), (200, "miss", "run 1"));

        // Stale: the origin runs again, nobody gets the old response.
        step(ms(1_500)).await;
        assert_eq!(
            send(&app).await.view(),
            (200, "miss", "run 2"),
            "{directives}"
        );
        // Nor in place of a failed run.
        origin.answer(Answer::ServerError);
        step(ms(1_500)).await;
        assert_eq!(
            send(&app).await.view(),
            (503, "miss", "failed run 3"),
            "{directives}"
        );
        assert_eq!(layer.stats().stale, 0, "{directives}");
    }
}

// ------------------------------------------------------------------------------------------
// The engine on its own.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_parker_serves_its_stale_value_while_one_refresh_runs_and_keeps_it_when_that_fails() {
    let parker: Parker<String> = tower_parking::ParkerBuilder::new()
        .ttl(TTL)
        .stale_while_revalidate(ms(3_000))
        .refresh_retry(ms(500))
        .build();
    let work = Work::free();
    let job = |value: Result<&'static str, &'static str>| {
        let work = work.clone();
        move || async move {
            let run = work.enter().await;
            value
                .map(|value| format!("{value} (run {run})"))
                .map_err(io::Error::other)
        }
    };
    let run = |value| {
        let parker = parker.clone();
        let job = job(value);
        async move { within(parker.run_with_outcome("k", job)).await }
    };

    let (value, outcome) = run(Ok("v1")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v1 (run 1)".into(), Outcome::Miss)
    );

    // Stale: the old value at once, while the refresh (held) runs; then it fails.
    step(ms(1_500)).await;
    work.gate.close();
    let (value, outcome) = run(Err("upstream down")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v1 (run 1)".into(), Outcome::Stale)
    );
    work.wait_started(2).await;
    let (value, outcome) = run(Ok("v2")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v1 (run 1)".into(), Outcome::Stale)
    );
    work.gate.open();
    until("the refresh to fail", || {
        parker.stats().refresh_failures == 1
    })
    .await;

    // Within the retry interval: still the old value, and no run.
    step(ms(400)).await;
    let (value, outcome) = run(Ok("v2")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v1 (run 1)".into(), Outcome::Stale)
    );
    assert_eq!(work.runs(), 2);

    // After it: the refresh is tried again, with the work of the request that started it.
    step(ms(200)).await;
    let (value, outcome) = run(Ok("v2")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v1 (run 1)".into(), Outcome::Stale)
    );
    step(ms(1)).await;
    let (value, outcome) = run(Ok("v3")).await;
    assert_eq!(
        (value.unwrap(), outcome),
        ("v2 (run 3)".into(), Outcome::Hit)
    );
    assert_eq!(
        parker.stats(),
        stats! {
            miss: 1,
            stale: 4,
            hit: 1,
            executions: 3,
            failures: 1,
            refresh_failures: 1,
        }
    );
}
