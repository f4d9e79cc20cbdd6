//! The layer through real axum routers: keys, bypasses, the header, the TTL window and every
//! one-process row of DESIGN.md's "When things go wrong".
//!
//! Requests go through `Router::oneshot` (one test goes over a real TCP socket). Handlers wait at a
//! [`Gate`] that opens once every request has joined its flight, so the counts asserted do not
//! depend on scheduling.

mod support;

use std::{convert::Infallible, io, time::Duration};

use axum::{
    body::Body,
    http::{
        header::{AUTHORIZATION, CACHE_CONTROL, SET_COOKIE},
        request::Parts,
        HeaderMap, HeaderName, Method, Request, Response, StatusCode,
    },
    response::IntoResponse,
    routing::{get, MethodRouter},
    Router,
};
use bytes::Bytes;
use http_body_util::{Empty, Full};
use support::{
    burst, counting_waits, join_spawned, quiet_deliberate_panics, spawn_joined, within, Gate, Got,
    Tally, Work, DELIBERATE, HANG,
};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_parking::{
    ByHeader, Key, KeyFn, MemoryBackend, Parker, ParkingLayer, PerUser, SharedAcrossUsers, Stats,
    WaitTimeoutPolicy,
};

const X_RUN: HeaderName = HeaderName::from_static("x-run");
const MINUTE: Duration = Duration::from_secs(60);

/// A route (`GET` and `POST`) whose response echoes the caller's `Authorization` (so a response
/// handed to the wrong user shows) and says which run of `handler` produced it in `x-run`.
fn echo(handler: &Work) -> MethodRouter {
    let handler = handler.clone();
    let echo = move |headers: HeaderMap| {
        let handler = handler.clone();
        async move {
            let run = handler.enter().await;
            let who = headers
                .get(AUTHORIZATION)
                .map_or("anonymous", |value| value.to_str().unwrap())
                .to_owned();
            ([(X_RUN, run.to_string())], format!("report for {who}"))
        }
    };
    get(echo.clone()).post(echo)
}

/// A `GET` route that enters `handler` (counts the run, waits at the gate) and answers
/// `respond(run)`.
fn entering<F, R>(handler: &Work, respond: F) -> MethodRouter
where
    F: Fn(usize) -> R + Clone + Send + Sync + 'static,
    R: IntoResponse,
{
    let handler = handler.clone();
    get(move || {
        let (handler, respond) = (handler.clone(), respond.clone());
        async move { respond(handler.enter().await) }
    })
}

fn app(route: MethodRouter, layer: &ParkingLayer) -> Router {
    Router::new().route("/report", route).layer(layer.clone())
}

impl Got {
    /// Status, `x-parking` and body, for one-line assertions.
    fn view(&self) -> (u16, Option<&str>, &str) {
        (self.status.as_u16(), self.parking(), self.text())
    }
}

async fn send(app: Router, request: Request<Body>) -> Got {
    within(async {
        let response = app.oneshot(request).await.expect("infallible");
        Got::read(response).await
    })
    .await
}

fn request(method: Method, user: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri("/report");
    if let Some(user) = user {
        request = request.header(AUTHORIZATION, format!("Bearer {user}"));
    }
    request.body(Body::empty()).unwrap()
}

fn get_as(user: &str) -> Request<Body> {
    request(Method::GET, Some(user))
}

fn anonymous_get() -> Request<Body> {
    request(Method::GET, None)
}

/// `n` concurrent anonymous GETs, released together once all have joined.
async fn get_burst(app: &Router, n: usize, gate: &Gate) -> Vec<Got> {
    burst((0..n).map(|_| send(app.clone(), anonymous_get())), gate).await
}

fn parking_values(got: &[Got]) -> Vec<Option<&str>> {
    got.iter().map(Got::parking).collect()
}

fn miss_then_coalesced(n: usize) -> Vec<Option<&'static str>> {
    let mut expected = vec![Some("coalesced"); n];
    expected[0] = Some("miss");
    expected
}

/// The runs that produced `got`, sorted: which caller got which run is up to the scheduler.
fn sorted_runs(got: &[Got]) -> Vec<usize> {
    let mut runs: Vec<_> = got.iter().map(Got::run).collect();
    runs.sort();
    runs
}

/// Asserts `layer`'s counters, and that no flight was left behind.
#[track_caller]
fn assert_settled(layer: &ParkingLayer, stats: Stats) {
    assert_eq!(layer.stats(), stats);
    assert_eq!(layer.parker().in_flight(), 0);
}

#[tokio::test]
async fn the_default_key_never_shares_a_response_between_users() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let app = app(echo(&handler), &layer);

    let users = [
        Some("alice"),
        Some("bob"),
        Some("alice"),
        Some("bob"),
        Some("alice"),
        None,
        Some("bob"),
    ];
    let got = burst(
        users
            .iter()
            .map(|user| send(app.clone(), request(Method::GET, *user))),
        &handler.gate,
    )
    .await;

    assert_eq!(handler.runs(), 3, "one run per user");
    let expected = [
        (Some("miss"), "report for Bearer alice"),
        (Some("miss"), "report for Bearer bob"),
        (Some("coalesced"), "report for Bearer alice"),
        (Some("coalesced"), "report for Bearer bob"),
        (Some("coalesced"), "report for Bearer alice"),
        (Some("miss"), "report for anonymous"),
        (Some("coalesced"), "report for Bearer bob"),
    ];
    for (got, (parking, body)) in got.iter().zip(expected) {
        assert_eq!(got.view(), (200, parking, body));
    }
    let run_of = |index: usize| got[index].run();
    assert_eq!([run_of(2), run_of(4)], [run_of(0); 2]);
    assert_eq!([run_of(3), run_of(6)], [run_of(1); 2]);
    let mut runs = vec![run_of(0), run_of(1), run_of(5)];
    runs.sort();
    assert_eq!(
        runs,
        [1, 2, 3],
        "each user's response came from that user's run"
    );

    let again = send(app.clone(), get_as("alice")).await;
    assert_eq!(again.view(), (200, Some("hit"), "report for Bearer alice"));
    assert_eq!(again.run(), run_of(0));
    assert_eq!(handler.runs(), 3);
    assert_settled(
        &layer,
        stats! {
            miss: 3,
            coalesced: 4,
            hit: 1,
            executions: 3,
        },
    );
}

#[tokio::test]
async fn post_bypasses_and_runs_every_time() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let app = app(echo(&handler), &layer);

    // Held at the gate together, yet each runs the handler: nothing coalesces a POST.
    let got = burst(
        (0..3).map(|_| send(app.clone(), request(Method::POST, Some("alice")))),
        &handler.gate,
    )
    .await;
    assert_eq!(sorted_runs(&got), [1, 2, 3]);
    for got in &got {
        assert_eq!(got.view(), (200, Some("bypass"), "report for Bearer alice"));
    }
    assert_eq!(handler.runs(), 3);
    // A bypassed request is not a run of parked work: `executions` counts only those.
    assert_settled(
        &layer,
        stats! {
            bypass: 3,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_reaches_every_waiter_at_once_and_is_not_stored() {
    quiet_deliberate_panics();
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let route = entering(&handler, |run| {
        if run == 1 {
            panic!("{DELIBERATE} in the handler");
        }
        format!("fine in run {run}")
    });
    let app = app(route, &layer);

    // `burst` fails the test if any waiter is still waiting after HANG.
    let got = get_burst(&app, 4, &handler.gate).await;
    assert_eq!(parking_values(&got), miss_then_coalesced(4));
    for got in &got {
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (500, "the handler failed")
        );
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!(layer.parker().in_flight(), 0);

    let next = send(app.clone(), anonymous_get()).await;
    assert_eq!(next.view(), (200, Some("miss"), "fine in run 2"));
    assert_eq!(handler.runs(), 2);
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            coalesced: 3,
            executions: 2,
            failures: 1,
        },
    );
}

#[tokio::test]
async fn an_inner_service_error_reaches_its_caller_and_the_others_get_500() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let service = tower::service_fn({
        let handler = handler.clone();
        move |_request: Request<()>| {
            let handler = handler.clone();
            async move {
                let run = handler.enter().await;
                if run == 1 {
                    return Err(io::Error::other("database down"));
                }
                Ok(Response::new(Full::new(Bytes::from(format!(
                    "fine in run {run}"
                )))))
            }
        }
    });
    let parking = layer.layer(service);
    let call = || {
        parking
            .clone()
            .oneshot(Request::get("/report").body(()).unwrap())
    };

    let results = burst((0..4).map(|_| call()), &handler.gate).await;
    let mut results = results.into_iter();
    let leader = results.next().unwrap();
    assert_eq!(
        leader
            .expect_err("the leader's caller gets the service's own error")
            .to_string(),
        "database down"
    );
    for result in results {
        let got = Got::read(result.expect("a response")).await;
        assert_eq!(got.view(), (500, Some("coalesced"), "the handler failed"));
    }
    assert_eq!(handler.runs(), 1);
    assert_eq!(layer.parker().in_flight(), 0);

    let next = Got::read(within(call()).await.expect("a response")).await;
    assert_eq!(next.view(), (200, Some("miss"), "fine in run 2"));
    assert_eq!(handler.runs(), 2);
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            coalesced: 3,
            executions: 2,
            failures: 1,
        },
    );
}

fn status_route(handler: &Work, status: StatusCode) -> MethodRouter {
    entering(handler, move |run| {
        (
            status,
            [(X_RUN, run.to_string())],
            format!("{status} from run {run}"),
        )
    })
}

#[tokio::test]
async fn a_status_that_is_not_storable_is_shared_with_waiters_but_not_kept() {
    for status in [StatusCode::FOUND, StatusCode::INTERNAL_SERVER_ERROR] {
        let layer = ParkingLayer::new().ttl(MINUTE);
        let handler = Work::held();
        let app = app(status_route(&handler, status), &layer);

        let got = get_burst(&app, 3, &handler.gate).await;
        assert_eq!(parking_values(&got), miss_then_coalesced(3));
        for got in &got {
            assert_eq!(
                (got.status, got.text()),
                (status, &*format!("{status} from run 1"))
            );
        }
        assert_eq!(handler.runs(), 1);

        let next = send(app.clone(), anonymous_get()).await;
        assert_eq!(
            (next.status, next.parking(), next.text()),
            (status, Some("miss"), &*format!("{status} from run 2"))
        );
        assert_eq!(handler.runs(), 2);
        assert_settled(
            &layer,
            stats! {
                miss: 2,
                coalesced: 2,
                executions: 2,
            },
        );
    }
}

#[tokio::test]
async fn storable_statuses_decide_what_is_kept() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .storable_statuses([StatusCode::OK, StatusCode::NOT_FOUND]);
    let handler = Work::free();
    let app = app(status_route(&handler, StatusCode::NOT_FOUND), &layer);

    let first = send(app.clone(), anonymous_get()).await;
    let second = send(app.clone(), anonymous_get()).await;
    assert_eq!(
        first.view(),
        (404, Some("miss"), "404 Not Found from run 1")
    );
    assert_eq!(
        second.view(),
        (404, Some("hit"), "404 Not Found from run 1")
    );
    assert_eq!(handler.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            hit: 1,
            executions: 1,
        },
    );
}

/// The body run `run` streams: five 700-byte chunks, each saying which run and chunk it is.
fn big_body(run: usize) -> Vec<Bytes> {
    (0..5)
        .map(|chunk| {
            let mut bytes = format!("run {run} chunk {chunk} ").into_bytes();
            bytes.resize(700, b'a' + chunk as u8);
            Bytes::from(bytes)
        })
        .collect()
}

#[tokio::test]
async fn a_body_over_the_limit_streams_whole_to_every_caller_and_is_not_kept() {
    let layer = ParkingLayer::new().ttl(MINUTE).body_limit(1000);
    let handler = Work::held();
    let streamed = entering(&handler, |run| {
        let chunks = big_body(run).into_iter().map(Ok::<_, Infallible>);
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        ([(X_RUN, run.to_string())], body)
    });
    let announced = entering(&handler, |run| {
        ([(X_RUN, run.to_string())], vec![b'0' + run as u8; 5000])
    });
    let app = Router::new()
        .route("/report", streamed)
        .route("/announced", announced)
        .layer(layer.clone());

    // Each waiter finds nothing it may share, so it runs the handler itself (`pass`).
    let got = get_burst(&app, 3, &handler.gate).await;
    for got in &got {
        let expected = if got.run() == 1 { "miss" } else { "pass" };
        assert_eq!((got.status.as_u16(), got.parking()), (200, Some(expected)));
        assert_eq!(got.body, big_body(got.run()).concat(), "run {}", got.run());
    }
    assert_eq!(sorted_runs(&got), [1, 2, 3]);

    // The key is remembered as one that cannot be shared: the next request does not park.
    let next = send(app.clone(), anonymous_get()).await;
    assert_eq!((next.parking(), next.run()), (Some("pass"), 4));
    assert_eq!(next.body, big_body(4).concat());

    // A body whose size is known up front to exceed the limit is not even buffered.
    for (run, outcome) in [(5, "miss"), (6, "pass")] {
        let request = Request::get("/announced").body(Body::empty()).unwrap();
        let got = send(app.clone(), request).await;
        assert_eq!((got.parking(), got.run()), (Some(outcome), run));
        assert_eq!(got.body, vec![b'0' + run as u8; 5000]);
    }
    assert_eq!(handler.runs(), 6);
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            pass: 4,
            executions: 6,
        },
    );
}

/// The value of the header that makes run `run`'s response private.
type MarkerValue = fn(usize) -> String;

#[tokio::test]
async fn a_private_response_is_never_handed_to_another_caller() {
    let markers: [(HeaderName, MarkerValue); 3] = [
        (SET_COOKIE, |run| format!("session=run-{run}")),
        (CACHE_CONTROL, |run| format!("private, max-age={run}")),
        (CACHE_CONTROL, |run| format!("no-store, x-run={run}")),
    ];
    for (name, value) in markers {
        let layer = ParkingLayer::new().ttl(MINUTE);
        let handler = Work::held();
        let route = entering(&handler, {
            let name = name.clone();
            move |run| {
                (
                    [(name.clone(), value(run)), (X_RUN, run.to_string())],
                    format!("private to run {run}"),
                )
            }
        });
        let app = app(route, &layer);

        let got = get_burst(&app, 3, &handler.gate).await;
        for got in &got {
            let run = got.run();
            let expected = if run == 1 { "miss" } else { "pass" };
            assert_eq!(
                got.view(),
                (200, Some(expected), &*format!("private to run {run}"))
            );
            assert_eq!(got.header(name.as_str()), Some(&*value(run)), "{name}");
        }
        assert_eq!(
            sorted_runs(&got),
            [1, 2, 3],
            "{name}: each caller ran the handler itself"
        );

        // Remembered for the hit-for-pass window: the next request goes straight through.
        let next = send(app.clone(), anonymous_get()).await;
        assert_eq!(next.view(), (200, Some("pass"), "private to run 4"));
        assert_eq!(handler.runs(), 4);
        assert_settled(
            &layer,
            stats! {
                miss: 1,
                pass: 3,
                executions: 4,
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_s_client_disconnecting_does_not_stop_the_handler() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let app = app(echo(&handler), &layer);

    let leader = tokio::spawn(send(app.clone(), anonymous_get()));
    handler.wait_started(1).await;
    let followers = spawn_joined((0..3).map(|_| send(app.clone(), anonymous_get()))).await;

    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    handler.gate.open();

    for got in join_spawned(followers).await {
        assert_eq!(got.view(), (200, Some("coalesced"), "report for anonymous"));
        assert_eq!(got.run(), 1);
    }
    let stored = send(app.clone(), anonymous_get()).await;
    assert_eq!(stored.view(), (200, Some("hit"), "report for anonymous"));
    assert_eq!(handler.runs(), 1);
    // The disconnected leader got no response, so no outcome is counted for it.
    assert_settled(
        &layer,
        stats! {
            coalesced: 3,
            hit: 1,
            executions: 1,
        },
    );
}

#[tokio::test(start_paused = true)]
async fn a_burst_inside_the_window_runs_nothing_and_after_it_runs_once() {
    let ttl = Duration::from_secs(10);
    let layer = ParkingLayer::new().ttl(ttl);
    let handler = Work::held();
    let app = app(echo(&handler), &layer);

    let first = get_burst(&app, 4, &handler.gate).await;
    assert_eq!(parking_values(&first), miss_then_coalesced(4));
    assert!(first.iter().all(|got| got.run() == 1));

    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    handler.gate.close();
    let inside = get_burst(&app, 4, &handler.gate).await;
    assert_eq!(parking_values(&inside), vec![Some("hit"); 4]);
    assert!(inside.iter().all(|got| got.run() == 1));
    assert_eq!(handler.runs(), 1, "inside the window: no run");

    tokio::time::advance(Duration::from_millis(2)).await;
    handler.gate.close();
    let after = get_burst(&app, 4, &handler.gate).await;
    assert_eq!(parking_values(&after), miss_then_coalesced(4));
    assert!(after.iter().all(|got| got.run() == 2));
    assert_eq!(handler.runs(), 2, "after the window: exactly one more run");

    for got in first.iter().chain(&inside).chain(&after) {
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (200, "report for anonymous")
        );
    }
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            coalesced: 6,
            hit: 4,
            executions: 2,
        },
    );
}

/// Coalesced, hit and bypass requests through `layer`: what each got.
async fn one_of_each(layer: &ParkingLayer) -> Vec<Got> {
    let handler = Work::held();
    let app = app(echo(&handler), layer);
    let mut got = get_burst(&app, 2, &handler.gate).await;
    got.push(send(app.clone(), anonymous_get()).await);
    got.push(send(app.clone(), request(Method::POST, None)).await);
    assert_eq!(handler.runs(), 2);
    let runs: Vec<_> = got.iter().map(Got::run).collect();
    assert_eq!(runs, [1, 1, 1, 2]);
    for got in &got {
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (200, "report for anonymous")
        );
    }
    assert_settled(
        layer,
        stats! {
            miss: 1,
            coalesced: 1,
            hit: 1,
            bypass: 1,
            executions: 1,
        },
    );
    got
}

#[tokio::test]
async fn the_header_says_how_each_request_was_served_unless_turned_off() {
    let got = one_of_each(&ParkingLayer::new().ttl(MINUTE)).await;
    assert_eq!(
        parking_values(&got),
        [Some("miss"), Some("coalesced"), Some("hit"), Some("bypass")]
    );

    let got = one_of_each(&ParkingLayer::new().ttl(MINUTE).status_header(false)).await;
    assert_eq!(parking_values(&got), [None; 4]);
}

/// A leader held at the gate, then a second request that gives up waiting for it after 100 ms.
async fn a_request_past_the_wait_timeout(
    policy: WaitTimeoutPolicy,
) -> (ParkingLayer, Router, Work, Got) {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .wait_timeout(Duration::from_millis(100))
        .on_wait_timeout(policy);
    let handler = Work::held();
    // Only the leader's run waits at the gate: the follower's runs through once it gives up.
    let route = get({
        let handler = handler.clone();
        move || {
            let handler = handler.clone();
            async move {
                let run = handler.count_run();
                if run == 1 {
                    handler.gate.wait().await;
                }
                ([(X_RUN, run.to_string())], format!("from run {run}"))
            }
        }
    });
    let app = app(route, &layer);

    let leader = tokio::spawn(send(app.clone(), anonymous_get()));
    handler.wait_started(1).await;
    let start = Instant::now();
    let follower = send(app.clone(), anonymous_get()).await;
    let waited = start.elapsed();
    assert!(
        (Duration::from_millis(100)..=Duration::from_millis(101)).contains(&waited),
        "waited {waited:?}"
    );

    handler.gate.open();
    let leader = within(leader).await.unwrap();
    assert_eq!(leader.view(), (200, Some("miss"), "from run 1"));
    (layer, app, handler, follower)
}

#[tokio::test(start_paused = true)]
async fn past_the_wait_timeout_a_request_runs_the_handler_itself_and_stores_nothing() {
    let (layer, app, handler, follower) =
        a_request_past_the_wait_timeout(WaitTimeoutPolicy::RunLocally).await;
    assert_eq!(follower.view(), (200, Some("timeout"), "from run 2"));

    let next = send(app, anonymous_get()).await;
    assert_eq!(
        next.view(),
        (200, Some("hit"), "from run 1"),
        "the leader's response is kept"
    );
    assert_eq!(handler.runs(), 2);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            timeout: 1,
            hit: 1,
            executions: 2,
        },
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_wait_timeout_a_request_gets_504_when_told_to() {
    let (layer, _, handler, follower) =
        a_request_past_the_wait_timeout(WaitTimeoutPolicy::Fail).await;
    assert_eq!(
        follower.view(),
        (
            504,
            Some("timeout"),
            "timed out waiting for a parked request"
        )
    );
    assert_eq!(handler.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            timeout: 1,
            executions: 1,
        },
    );
}

#[tokio::test]
async fn a_stored_entry_that_does_not_decode_is_a_miss_and_is_overwritten() {
    let backend = MemoryBackend::new();
    let garbage = Parker::<Bytes>::builder()
        .backend(backend.clone())
        .ttl(MINUTE)
        .build::<Bytes>();
    garbage
        .run("report", || async {
            Ok::<_, Infallible>(Bytes::from_static(b"not a stored response"))
        })
        .await
        .unwrap();

    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .backend(backend)
        .key(|_: &Parts| Some(Key::new("report")));
    let handler = Work::free();
    let app = app(echo(&handler), &layer);

    let first = send(app.clone(), anonymous_get()).await;
    assert_eq!(first.view(), (200, Some("miss"), "report for anonymous"));
    let second = send(app.clone(), anonymous_get()).await;
    assert_eq!(second.view(), (200, Some("hit"), "report for anonymous"));
    assert_eq!(handler.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            hit: 1,
            executions: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layers_on_one_backend_park_each_other() {
    let backend = MemoryBackend::new();
    let waiting = Tally::new();
    let first = ParkingLayer::new().ttl(MINUTE).backend(backend.clone());
    let second =
        ParkingLayer::new().parker_builder(counting_waits(&waiting).backend(backend).ttl(MINUTE));
    let handler = Work::held();
    let first_app = app(echo(&handler), &first);
    let second_app = app(echo(&handler), &second);

    let leader = tokio::spawn(send(first_app, anonymous_get()));
    handler.wait_started(1).await;
    let parked = tokio::spawn(send(second_app.clone(), anonymous_get()));
    waiting.wait_for(1, HANG, "requests parked").await;
    handler.gate.open();

    assert_eq!(
        within(leader).await.unwrap().view(),
        (200, Some("miss"), "report for anonymous")
    );
    assert_eq!(
        within(parked).await.unwrap().view(),
        (200, Some("parked"), "report for anonymous")
    );
    let hit = send(second_app, anonymous_get()).await;
    assert_eq!(hit.view(), (200, Some("hit"), "report for anonymous"));
    assert_eq!(handler.runs(), 1);
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

#[tokio::test]
async fn shared_across_users_serves_one_response_to_every_user() {
    let layer = ParkingLayer::new().ttl(MINUTE).key(SharedAcrossUsers);
    let handler = Work::held();
    let app = app(echo(&handler), &layer);

    let got = burst(
        ["alice", "bob", "carol"].map(|user| send(app.clone(), get_as(user))),
        &handler.gate,
    )
    .await;
    assert_eq!(parking_values(&got), miss_then_coalesced(3));
    // The opt-in means exactly this: bob and carol get the response made for alice.
    assert!(got
        .iter()
        .all(|got| got.text() == "report for Bearer alice"));
    assert_eq!(handler.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            coalesced: 2,
            executions: 1,
        },
    );
}

#[tokio::test]
async fn by_header_shares_within_a_tenant_only() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .key(ByHeader::new(HeaderName::from_static("x-tenant")));
    let handler = Work::held();
    let app = app(echo(&handler), &layer);
    let as_tenant = |tenant: &str, user: &str| {
        let mut request = get_as(user);
        request
            .headers_mut()
            .insert("x-tenant", tenant.parse().unwrap());
        request
    };

    let got = burst(
        [
            as_tenant("acme", "alice"),
            as_tenant("globex", "bob"),
            as_tenant("acme", "carol"),
        ]
        .map(|request| send(app.clone(), request)),
        &handler.gate,
    )
    .await;
    assert_eq!(
        got[0].view(),
        (200, Some("miss"), "report for Bearer alice")
    );
    assert_eq!(got[1].view(), (200, Some("miss"), "report for Bearer bob"));
    assert_eq!(
        got[2].view(),
        (200, Some("coalesced"), "report for Bearer alice")
    );
    assert_eq!(handler.runs(), 2);
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            coalesced: 1,
            executions: 2,
        },
    );
}

#[tokio::test]
async fn a_key_closure_returning_none_bypasses() {
    let layer = ParkingLayer::new().ttl(MINUTE).key(|parts: &Parts| {
        (!parts.headers.contains_key("x-fresh")).then(|| Key::new(parts.uri.path()))
    });
    let handler = Work::free();
    let app = app(echo(&handler), &layer);
    let fresh = || {
        let mut request = anonymous_get();
        request
            .headers_mut()
            .insert("x-fresh", "1".parse().unwrap());
        request
    };

    let parked = send(app.clone(), anonymous_get()).await;
    let fresh_1 = send(app.clone(), fresh()).await;
    let fresh_2 = send(app.clone(), fresh()).await;
    let hit = send(app.clone(), anonymous_get()).await;
    assert_eq!(
        [&parked, &fresh_1, &fresh_2, &hit].map(|got| (got.parking(), got.run())),
        [
            (Some("miss"), 1),
            (Some("bypass"), 2),
            (Some("bypass"), 3),
            (Some("hit"), 1)
        ]
    );
    assert_eq!(handler.runs(), 3);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            hit: 1,
            bypass: 2,
            executions: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_real_socket_users_are_isolated_and_share_their_own_run() {
    // The default key, counted: a request has reached the layer once its key is taken.
    struct Counted(Tally);
    impl KeyFn for Counted {
        fn key(&self, parts: &Parts) -> Option<Key> {
            self.0.add();
            PerUser.key(parts)
        }
        fn separates_credentials(&self) -> bool {
            PerUser.separates_credentials()
        }
    }
    let keyed = Tally::new();
    let layer = ParkingLayer::new().ttl(MINUTE).key(Counted(keyed.clone()));
    let handler = Work::held();
    let app = app(echo(&handler), &layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let call = |method: Method, user: &str| {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{address}/report"))
            .header(AUTHORIZATION, format!("Bearer {user}"))
            .body(Empty::new())
            .unwrap();
        let client = client.clone();
        async move { Got::read(client.request(request).await.expect("response")).await }
    };

    let users = ["alice", "bob"].repeat(8);
    let requests: Vec<_> = users
        .iter()
        .map(|user| tokio::spawn(call(Method::GET, user)))
        .collect();
    keyed
        .wait_for(users.len(), HANG, "requests that reached the layer")
        .await;
    handler.gate.open();
    let got = join_spawned(requests).await;

    let mut runs_by_user = std::collections::BTreeMap::<&str, Vec<usize>>::new();
    for (user, got) in users.iter().zip(got) {
        assert_eq!(
            (got.status.as_u16(), got.text()),
            (200, &*format!("report for Bearer {user}"))
        );
        runs_by_user.entry(user).or_default().push(got.run());
        let parking = got.parking().unwrap();
        // Keyed but maybe not yet joined when the gate opened: then served from the window.
        assert!(["miss", "coalesced", "hit"].contains(&parking), "{parking}");
    }
    assert_eq!(handler.runs(), 2, "one run per user, over 16 requests");
    for runs in runs_by_user.values() {
        assert!(runs.iter().all(|run| *run == runs[0]), "{runs_by_user:?}");
    }
    let stats = layer.stats();
    assert_eq!(
        (stats.miss, stats.coalesced + stats.hit, stats.executions),
        (2, 14, 2)
    );

    let hit = within(call(Method::GET, "alice")).await;
    assert_eq!(hit.view(), (200, Some("hit"), "report for Bearer alice"));
    let bypass = within(call(Method::POST, "alice")).await;
    assert_eq!(
        bypass.view(),
        (200, Some("bypass"), "report for Bearer alice")
    );
    assert_eq!((bypass.run(), handler.runs()), (3, 3));
    assert_eq!(layer.parker().in_flight(), 0);
    server.abort();
}

#[tokio::test]
async fn the_layer_composes_with_route_layer_and_service_builder() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let other = Work::free();
    // `route_layer`: only the routes above it are parked; a route added after it is not.
    let app = Router::new()
        .route("/report", echo(&handler))
        .route_layer(
            tower::ServiceBuilder::new()
                .map_request(|request: Request<Body>| request)
                .layer(layer.clone()),
        )
        .route("/other", entering(&other, |run| format!("other {run}")));

    let got = get_burst(&app, 5, &handler.gate).await;
    assert_eq!(parking_values(&got), miss_then_coalesced(5));
    assert!(got
        .iter()
        .all(|got| got.text() == "report for anonymous" && got.run() == 1));
    assert_eq!(handler.runs(), 1);

    let uri = |path| Request::get(path).body(Body::empty()).unwrap();
    let outside = send(app.clone(), uri("/other")).await;
    assert_eq!((outside.text(), outside.parking()), ("other 1", None));
    let outside = send(app, uri("/other")).await;
    assert_eq!((outside.text(), outside.parking()), ("other 2", None));
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            coalesced: 4,
            executions: 1,
        },
    );
}
