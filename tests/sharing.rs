//! Issue 7 in one process: the layer over a whole axum app (`Router::layer`) shares a response
//! only with requests it is a valid answer to, streams what cannot be shared, remembers keys
//! whose responses cannot be shared, and lets writes invalidate.
//!
//! Every test serves a real axum app on a loopback port and talks to it with a real HTTP client
//! (hyper; tokio-tungstenite for WebSocket). The server counts, in `joined`, each request once
//! the parking layer has taken it in (its first poll: it has joined or started its key's flight),
//! and handlers wait at a [`Gate`] the test opens once every request is where it must be, so the
//! outcomes asserted do not depend on scheduling.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{
        ws::{WebSocket, WebSocketUpgrade},
        Path,
    },
    response::{
        sse::{Event, Sse},
        IntoResponse,
    },
    routing::{get, MethodRouter},
    Router,
};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderName, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use support::{tracked, within, Gate, HttpClient, Reply, Tally, Work, HANG};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_tungstenite::tungstenite::Message;
use tower::{limit::ConcurrencyLimitLayer, util::MapFutureLayer, ServiceBuilder};
use tower_http::compression::CompressionLayer;
use tower_parking::{
    sharing::{DefaultSharing, NotForContentType, SharePredicate},
    ParkingLayer, Stats, WaitTimeoutPolicy,
};

const MINUTE: Duration = Duration::from_secs(60);
const X_RUN: HeaderName = HeaderName::from_static("x-run");
const ETAG: &str = "\"v1\"";
const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

/// An app on a loopback port.
struct Server {
    addr: SocketAddr,
    /// Requests the parking layer has taken in (polled once: in their key's flight, or served).
    joined: Tally,
}

impl Server {
    /// Serves `routes` behind `parking`, applied to the whole router as a user would.
    async fn start(routes: Router, parking: &ParkingLayer) -> Self {
        let joined = Tally::new();
        let app = routes.layer(parking.clone()).layer(counting(&joined));
        Self::serve(app, joined).await
    }

    /// Serves `app`, whose requests are counted in `joined` by a [`counting`] layer.
    async fn serve(app: Router, joined: Tally) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, joined }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `n` requests in all have been taken in by the parking layer.
    async fn joined(&self, n: usize) {
        self.joined
            .wait_for(n, HANG, "requests taken in by the parking layer")
            .await;
    }
}

/// A layer that counts, in `joined`, each call of the service it wraps once it has been polled.
fn counting<S>(
    joined: &Tally,
) -> MapFutureLayer<impl Fn(S) -> futures_util::future::BoxFuture<'static, S::Output> + Clone>
where
    S: std::future::Future + Send + 'static,
{
    let joined = joined.clone();
    MapFutureLayer::new(move |call: S| {
        let joined = joined.clone();
        Box::pin(tracked(call, joined)) as futures_util::future::BoxFuture<'static, S::Output>
    })
}

/// A request with these headers and no body.
fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Bytes::new()).expect("a valid request")
}

fn get_with(url: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    request(Method::GET, url, headers)
}

/// The reply of a spawned request; panics if it failed or hung.
async fn answered(task: JoinHandle<Result<Reply, String>>) -> Reply {
    within(task)
        .await
        .expect("request task")
        .unwrap_or_else(|error| panic!("{error}"))
}

async fn send(client: &HttpClient, request: Request<Bytes>) -> Reply {
    answered(client.spawn_send(request)).await
}

/// Status, `x-parking` and body, for one-line assertions.
fn view(reply: &Reply) -> (u16, &str, String) {
    (reply.status.as_u16(), reply.outcome(), reply.text())
}

/// The `x-parking` outcomes of `replies`, sorted.
fn sorted_outcomes(replies: &[Reply]) -> Vec<&str> {
    let mut outcomes: Vec<&str> = replies.iter().map(Reply::outcome).collect();
    outcomes.sort_unstable();
    outcomes
}

/// Asserts `layer`'s counters, and that no flight was left behind.
#[track_caller]
fn assert_settled(layer: &ParkingLayer, stats: Stats) {
    assert_eq!(layer.stats(), stats);
    assert_eq!(layer.parker().in_flight(), 0, "a flight was left behind");
}

/// The request heads a handler saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<HeaderMap>>>);

impl Seen {
    fn push(&self, headers: &HeaderMap) {
        self.0.lock().unwrap().push(headers.clone());
    }

    /// How many requests the handler saw that carried any of `names`.
    fn with_any_of(&self, names: &[HeaderName]) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|headers| names.iter().any(|name| headers.contains_key(name)))
            .count()
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A document with validators, served by an origin that honours `If-None-Match` itself: were the
/// layer to hand it a conditional request, it would answer `304`.
fn document(handler: &Work, seen: &Seen) -> MethodRouter {
    let (handler, seen) = (handler.clone(), seen.clone());
    get(move |headers: HeaderMap| {
        let (handler, seen) = (handler.clone(), seen.clone());
        async move {
            seen.push(&headers);
            let run = handler.enter().await;
            let validators = [
                (header::ETAG, ETAG.to_owned()),
                (header::LAST_MODIFIED, LAST_MODIFIED.to_owned()),
                (X_RUN, run.to_string()),
            ];
            let matches = headers
                .get(header::IF_NONE_MATCH)
                .is_some_and(|tags| tags.to_str().unwrap().contains("v1"));
            if matches {
                return (StatusCode::NOT_MODIFIED, validators, String::new());
            }
            (StatusCode::OK, validators, format!("document, run {run}"))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conditional_leader_runs_the_plain_request_and_each_caller_gets_its_own_answer() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let (handler, seen) = (Work::held(), Seen::default());
    let server = Server::start(
        Router::new().route("/doc", document(&handler, &seen)),
        &layer,
    )
    .await;
    let client = HttpClient::new();
    let url = server.url("/doc");

    // The conditional request leads; a plain one and one with another tag arrive meanwhile.
    let leader = client.spawn_send(get_with(&url, &[("if-none-match", ETAG)]));
    handler.wait_started(1).await;
    let plain = client.spawn_send(get_with(&url, &[]));
    let other_tag = client.spawn_send(get_with(&url, &[("if-none-match", "\"v0\"")]));
    server.joined(3).await;
    handler.gate.open();
    let (leader, plain, other_tag) = (
        answered(leader).await,
        answered(plain).await,
        answered(other_tag).await,
    );

    assert_eq!(handler.runs(), 1, "one run for all three");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen.with_any_of(&[header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE]),
        0,
        "the handler got the plain request"
    );
    assert_eq!(view(&leader), (304, "miss", String::new()));
    assert_eq!(leader.header("etag"), Some(ETAG), "{leader:?}");
    assert_eq!(view(&plain), (200, "coalesced", "document, run 1".into()));
    assert_eq!(
        view(&other_tag),
        (200, "coalesced", "document, run 1".into())
    );
    assert_eq!(plain.header("etag"), Some(ETAG));

    // A conditional leader whose tag does not match gets the full response.
    let stale_tag = send(
        &client,
        get_with(&server.url("/doc?v=2"), &[("if-none-match", "\"v0\"")]),
    )
    .await;
    assert_eq!(view(&stale_tag), (200, "miss", "document, run 2".into()));

    // From the stored 200: 304 when the caller's validators match, the full 200 otherwise.
    let from_window = [
        (vec![("if-none-match", ETAG)], 304),
        (vec![("if-none-match", "W/\"v1\"")], 304),
        (vec![("if-none-match", "\"v0\", \"v1\"")], 304),
        (vec![("if-none-match", "*")], 304),
        (vec![("if-none-match", "\"v0\"")], 200),
        (vec![("if-modified-since", LAST_MODIFIED)], 304),
        (
            vec![("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT")],
            304,
        ),
        (
            vec![("if-modified-since", "Mon, 30 Nov 2026 10:00:00 GMT")],
            200,
        ),
        (
            vec![
                ("if-none-match", "\"v0\""),
                ("if-modified-since", LAST_MODIFIED),
            ],
            200,
        ),
        (vec![], 200),
    ];
    for (headers, status) in &from_window {
        let reply = send(&client, get_with(&url, headers)).await;
        let body = if *status == 304 {
            String::new()
        } else {
            "document, run 1".into()
        };
        assert_eq!(view(&reply), (*status, "hit", body), "{headers:?}");
        assert_eq!(reply.header("etag"), Some(ETAG), "{headers:?}");
    }
    assert_eq!(
        handler.runs(),
        2,
        "the window answered every conditional request"
    );

    // Preconditions only the origin can judge go straight through to it.
    for headers in [
        [("if-match", ETAG)],
        [("if-unmodified-since", LAST_MODIFIED)],
    ] {
        let reply = send(&client, get_with(&url, &headers)).await;
        assert_eq!(reply.outcome(), "bypass", "{headers:?}");
        assert_eq!(reply.status, StatusCode::OK, "{headers:?}");
    }
    assert_eq!(handler.runs(), 4);
    assert_eq!(
        seen.with_any_of(&[header::IF_MATCH, header::IF_UNMODIFIED_SINCE]),
        2,
        "the origin saw the preconditions"
    );
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            coalesced: 2,
            hit: 10,
            bypass: 2,
            executions: 2,
        },
    );
}

/// Ten bytes, served by an origin that honours `Range` itself: were the layer to hand it a range
/// request, it would answer `206` with four of them.
fn ten_bytes(handler: &Work, seen: &Seen) -> MethodRouter {
    let (handler, seen) = (handler.clone(), seen.clone());
    get(move |headers: HeaderMap| {
        let (handler, seen) = (handler.clone(), seen.clone());
        async move {
            seen.push(&headers);
            handler.enter().await;
            if headers.contains_key(header::RANGE) {
                return (
                    StatusCode::PARTIAL_CONTENT,
                    [(header::CONTENT_RANGE, "bytes 0-3/10")],
                    "0123",
                )
                    .into_response();
            }
            ([(header::ACCEPT_RANGES, "bytes")], "0123456789").into_response()
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_leader_runs_the_plain_request_and_everyone_gets_the_full_200() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let (handler, seen) = (Work::held(), Seen::default());
    let server = Server::start(
        Router::new().route("/file", ten_bytes(&handler, &seen)),
        &layer,
    )
    .await;
    let client = HttpClient::new();
    let url = server.url("/file");

    let ranged = client.spawn_send(get_with(&url, &[("range", "bytes=0-3")]));
    handler.wait_started(1).await;
    let plain = client.spawn_send(get_with(&url, &[]));
    server.joined(2).await;
    handler.gate.open();
    let (ranged, plain) = (answered(ranged).await, answered(plain).await);

    assert_eq!(view(&ranged), (200, "miss", "0123456789".into()));
    assert_eq!(view(&plain), (200, "coalesced", "0123456789".into()));
    assert_eq!(ranged.header("content-range"), None);
    assert_eq!(handler.runs(), 1);
    assert_eq!(
        seen.with_any_of(&[header::RANGE, header::IF_RANGE]),
        0,
        "the handler never saw a range"
    );

    for headers in [
        vec![("range", "bytes=0-3")],
        vec![("range", "bytes=2-"), ("if-range", "\"x\"")],
        vec![],
    ] {
        let reply = send(&client, get_with(&url, &headers)).await;
        assert_eq!(
            view(&reply),
            (200, "hit", "0123456789".into()),
            "{headers:?}"
        );
    }
    assert_eq!(handler.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            coalesced: 1,
            hit: 3,
            executions: 1,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_virtual_hosts_never_share_in_a_flight_or_from_the_window() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let page = {
        let handler = handler.clone();
        get(move |headers: HeaderMap| {
            let handler = handler.clone();
            async move {
                let run = handler.enter().await;
                let host = headers[header::HOST].to_str().unwrap().to_owned();
                format!("home page of {host}, run {run}")
            }
        })
    };
    let server = Server::start(Router::new().route("/", page), &layer).await;
    let (acme, globex) = (
        HttpClient::with_host("acme.example"),
        HttpClient::with_host("globex.example"),
    );
    let url = server.url("/");

    let tasks: Vec<_> = (0..3)
        .flat_map(|_| [acme.spawn_get(url.clone()), globex.spawn_get(url.clone())])
        .collect();
    server.joined(6).await;
    handler.gate.open();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(answered(task).await);
    }

    assert_eq!(handler.runs(), 2, "one run per host");
    for (i, reply) in replies.iter().enumerate() {
        let host = if i % 2 == 0 { "acme" } else { "globex" };
        assert!(
            reply
                .text()
                .starts_with(&format!("home page of {host}.example, run ")),
            "{host} got {reply:?}"
        );
    }
    for host in [&replies[0], &replies[1]] {
        let same_host: Vec<_> = replies.iter().filter(|r| r.body == host.body).collect();
        assert_eq!(same_host.len(), 3, "{replies:?}");
    }
    assert_eq!(
        sorted_outcomes(&replies),
        [
            "coalesced",
            "coalesced",
            "coalesced",
            "coalesced",
            "miss",
            "miss"
        ]
    );

    let (acme_later, globex_later) = (
        acme.get(&url).await.unwrap(),
        globex.get(&url).await.unwrap(),
    );
    assert_eq!(
        (acme_later.outcome(), &acme_later.body),
        ("hit", &replies[0].body)
    );
    assert_eq!(
        (globex_later.outcome(), &globex_later.body),
        ("hit", &replies[1].body)
    );
    assert_eq!(handler.runs(), 2);
}

/// A page long enough for `CompressionLayer` to compress; says which run made it.
fn compressible(handler: &Work) -> MethodRouter {
    let handler = handler.clone();
    get(move || {
        let handler = handler.clone();
        async move {
            let run = handler.enter().await;
            format!("run {run}: {}", "a compressible line of text\n".repeat(40))
        }
    })
}

fn is_gzip(reply: &Reply) -> bool {
    reply.header("content-encoding") == Some("gzip") && reply.body.starts_with(&[0x1f, 0x8b])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_inside_the_layer_keeps_each_client_its_own_encoding() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let routes = Router::new()
        .route("/page", compressible(&handler))
        .layer(CompressionLayer::new());
    let server = Server::start(routes, &layer).await;
    let client = HttpClient::new();
    let url = server.url("/page");
    let gzip = || get_with(&url, &[("accept-encoding", "gzip")]);
    let identity = || get_with(&url, &[]);
    let plain_run =
        |run: usize| format!("run {run}: {}", "a compressible line of text\n".repeat(40));

    // A gzip client leads; an identity client arrives meanwhile.
    let gzipped = client.spawn_send(gzip());
    handler.wait_started(1).await;
    let plain = client.spawn_send(identity());
    server.joined(2).await;
    handler.gate.open();
    let (gzipped, plain) = (answered(gzipped).await, answered(plain).await);

    assert!(is_gzip(&gzipped), "{gzipped:?}");
    assert_eq!(gzipped.outcome(), "miss");
    assert!(
        gzipped
            .header("vary")
            .is_some_and(|vary| vary.eq_ignore_ascii_case("accept-encoding")),
        "{gzipped:?}"
    );
    assert_eq!(plain.header("content-encoding"), None, "{plain:?}");
    assert_eq!(
        plain.text(),
        plain_run(2),
        "the identity client ran its own variant"
    );
    assert_eq!(plain.outcome(), "miss");
    assert_eq!(handler.runs(), 2);

    // Both variants are stored: each client gets its own from the window.
    for _ in 0..2 {
        let later_plain = send(&client, identity()).await;
        assert_eq!(
            later_plain.header("content-encoding"),
            None,
            "{later_plain:?}"
        );
        assert_eq!(view(&later_plain), (200, "hit", plain_run(2)));
        let later_gzip = send(&client, gzip()).await;
        assert!(is_gzip(&later_gzip), "{later_gzip:?}");
        assert_eq!(later_gzip.outcome(), "hit");
        assert_eq!(later_gzip.body, gzipped.body, "the stored gzip variant");
    }
    assert_eq!(handler.runs(), 2, "each variant ran exactly once");
    assert_eq!(layer.parker().in_flight(), 0);
}

const EVENTS: usize = 15;
const EVENT_EVERY: Duration = Duration::from_millis(200);

/// Server-sent events: one every 200 ms for 3 s, each naming the run that sends it.
fn events(handler: &Work) -> MethodRouter {
    let handler = handler.clone();
    get(move || {
        let handler = handler.clone();
        async move {
            let run = handler.enter().await;
            let stream = futures_util::stream::unfold(0, move |n| async move {
                if n == EVENTS {
                    return None;
                }
                tokio::time::sleep(EVENT_EVERY).await;
                let event = Event::default().data(format!("run {run} event {n}"));
                Some((Ok::<_, Infallible>(event), n + 1))
            });
            Sse::new(stream)
        }
    })
}

/// A streamed response as one client sees it: its head, when its first chunk (event) arrived,
/// that chunk, and the rest of the body.
struct Streamed {
    outcome: String,
    content_type: String,
    first_at: Instant,
    first: String,
    rest: hyper::body::Incoming,
}

async fn open_stream(url: String) -> Streamed {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client
        .request(
            Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("response head");
    let (parts, mut rest) = response.into_parts();
    let header = |name| {
        parts
            .headers
            .get(name)
            .map_or("", |value: &http::HeaderValue| value.to_str().unwrap())
            .to_owned()
    };
    let first = loop {
        let frame = rest.frame().await.expect("an event").expect("a frame");
        if let Ok(data) = frame.into_data() {
            break String::from_utf8(data.to_vec()).expect("UTF-8 event");
        }
    };
    Streamed {
        outcome: header("x-parking"),
        content_type: header("content-type"),
        first_at: Instant::now(),
        first,
        rest,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_stream_to_every_caller_and_nothing_is_stored() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let server = Server::start(Router::new().route("/events", events(&handler)), &layer).await;
    let url = server.url("/events");

    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(open_stream(url.clone())))
        .collect();
    server.joined(3).await;
    let opened = Instant::now();
    handler.gate.open();
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(within(task).await.expect("stream task"));
    }

    let mut outcomes: Vec<&str> = streams.iter().map(|s| s.outcome.as_str()).collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["miss", "pass", "pass"]);
    let mut runs: Vec<String> = Vec::new();
    for stream in &streams {
        assert!(stream.content_type.starts_with("text/event-stream"));
        let first_after = stream.first_at - opened;
        assert!(
            first_after < Duration::from_secs(1),
            "the first event took {first_after:?}"
        );
        let run = stream
            .first
            .strip_prefix("data: run ")
            .and_then(|rest| rest.strip_suffix(" event 0\n\n"))
            .unwrap_or_else(|| panic!("not a first event: {:?}", stream.first));
        runs.push(run.to_owned());
    }
    runs.sort();
    assert_eq!(runs, ["1", "2", "3"], "each caller has a stream of its own");
    assert_eq!(handler.runs(), 3);

    // A later request goes straight through too: nothing was stored.
    let next_sent = Instant::now();
    let next = within(open_stream(url.clone())).await;
    assert_eq!(next.outcome, "pass");
    assert!(next.first_at - next_sent < Duration::from_secs(1));
    assert_eq!(next.first, "data: run 4 event 0\n\n");

    // The leader's whole stream arrives, an event at a time, to its end.
    let leader = streams.swap_remove(
        streams
            .iter()
            .position(|stream| stream.outcome == "miss")
            .unwrap(),
    );
    let rest = within(leader.rest.collect())
        .await
        .expect("the rest")
        .to_bytes();
    let ended_after = opened.elapsed();
    let rest = String::from_utf8(rest.to_vec()).unwrap();
    let events: Vec<String> = (1..EVENTS)
        .map(|n| format!("data: run 1 event {n}\n\n"))
        .collect();
    assert_eq!(rest, events.concat());
    assert!(
        ended_after >= EVENT_EVERY * (EVENTS as u32 - 1),
        "the stream ended after {ended_after:?}"
    );
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            pass: 3,
            executions: 4,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_open_at_the_body_timeout_streams_on_and_releases_the_waiters() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .body_timeout(Duration::from_millis(100));
    let (handler, finish) = (Work::held(), Gate::new());
    let slow_body = {
        let (handler, finish) = (handler.clone(), finish.clone());
        get(move || {
            let (handler, finish) = (handler.clone(), finish.clone());
            async move {
                let run = handler.enter().await;
                let chunks = futures_util::stream::unfold(0, move |n| {
                    let finish = finish.clone();
                    async move {
                        let chunk = match n {
                            0 => format!("first, run {run}; "),
                            1 => {
                                finish.wait().await;
                                "last".to_owned()
                            }
                            _ => return None,
                        };
                        Some((Ok::<_, Infallible>(Bytes::from(chunk)), n + 1))
                    }
                });
                axum::body::Body::from_stream(chunks)
            }
        })
    };
    let server = Server::start(Router::new().route("/slow-body", slow_body), &layer).await;
    let url = server.url("/slow-body");

    let tasks: Vec<_> = (0..3)
        .map(|_| tokio::spawn(open_stream(url.clone())))
        .collect();
    server.joined(3).await;
    handler.gate.open();
    // The leader's body is still open: the others are released and run their own.
    handler.wait_started(3).await;
    // Every caller gets its first chunk while every body is still open.
    let mut streams = Vec::new();
    for task in tasks {
        streams.push(within(task).await.expect("stream task"));
    }
    let mut outcomes: Vec<&str> = streams.iter().map(|s| s.outcome.as_str()).collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["miss", "pass", "pass"]);
    let mut firsts: Vec<&str> = streams.iter().map(|s| s.first.as_str()).collect();
    firsts.sort_unstable();
    assert_eq!(
        firsts,
        ["first, run 1; ", "first, run 2; ", "first, run 3; "]
    );

    finish.open();
    for stream in streams {
        let rest = within(stream.rest.collect())
            .await
            .expect("the rest")
            .to_bytes();
        assert_eq!(rest, "last");
    }
    let later = send(&HttpClient::new(), get_with(&url, &[])).await;
    assert_eq!(view(&later), (200, "pass", "first, run 4; last".into()));
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            pass: 3,
            executions: 4,
        },
    );
}

async fn echo_socket(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        if socket.send(message).await.is_err() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_goes_through_and_messages_echo() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let routes = Router::new().route(
        "/ws",
        get(|upgrade: WebSocketUpgrade| async move { upgrade.on_upgrade(echo_socket) }),
    );
    let server = Server::start(routes, &layer).await;
    let url = format!("ws://{}/ws", server.addr);

    let (mut first, first_head) = within(tokio_tungstenite::connect_async(url.clone()))
        .await
        .expect("the first handshake");
    let (mut second, second_head) = within(tokio_tungstenite::connect_async(url))
        .await
        .expect("the second handshake");
    for head in [&first_head, &second_head] {
        assert_eq!(head.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(head.headers()["x-parking"], "bypass");
    }
    for (socket, text) in [
        (&mut first, "hello from one"),
        (&mut second, "hello from two"),
    ] {
        within(socket.send(Message::text(text)))
            .await
            .expect("send");
    }
    for (socket, text) in [
        (&mut first, "hello from one"),
        (&mut second, "hello from two"),
    ] {
        let echoed = within(socket.next()).await.expect("a message").expect("ok");
        assert_eq!(echoed, Message::text(text));
    }
    assert_settled(&layer, stats! { bypass: 2 });
}

/// An item with a version: `GET /item` shows it (counting its runs in `reads`), `POST /item`
/// bumps it (or fails with the status in `x-fail`, changing nothing), `POST /items` bumps it and
/// names the URI in `x-location` as its `Location` (and `x-content-location` as its
/// `Content-Location`).
fn item_routes(reads: &Tally) -> Router {
    let version = Arc::new(AtomicU64::new(0));
    let reads = reads.clone();
    let read = {
        let version = Arc::clone(&version);
        move || {
            reads.add();
            let version = version.load(Ordering::SeqCst);
            async move { format!("item v{version}") }
        }
    };
    let write = {
        let version = Arc::clone(&version);
        move |headers: HeaderMap| {
            let version = Arc::clone(&version);
            async move {
                if let Some(status) = headers.get("x-fail") {
                    let status: u16 = status.to_str().unwrap().parse().unwrap();
                    return (StatusCode::from_u16(status).unwrap(), "refused").into_response();
                }
                version.fetch_add(1, Ordering::SeqCst);
                "saved".into_response()
            }
        }
    };
    let create = {
        let version = Arc::clone(&version);
        move |headers: HeaderMap| {
            let version = Arc::clone(&version);
            async move {
                version.fetch_add(1, Ordering::SeqCst);
                let mut response = (StatusCode::CREATED, "created").into_response();
                for (from, to) in [
                    ("x-location", header::LOCATION),
                    ("x-content-location", header::CONTENT_LOCATION),
                ] {
                    if let Some(value) = headers.get(from) {
                        response.headers_mut().insert(to, value.clone());
                    }
                }
                response
            }
        }
    };
    Router::new()
        .route("/item", get(read).post(write))
        .route("/items", axum::routing::post(create))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_write_invalidates_its_uri_and_same_authority_locations_for_every_user() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let reads = Tally::new();
    let server = Server::start(item_routes(&reads), &layer).await;
    let client = HttpClient::new();
    let (item, items) = (server.url("/item"), server.url("/items"));
    let as_user = |user: &str, method: Method, url: &str, extra: &[(&str, &str)]| {
        let auth = format!("Bearer {user}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        request(method, url, &headers)
    };
    let read = |user: &'static str| {
        let client = client.clone();
        let request = as_user(user, Method::GET, &item, &[]);
        async move { send(&client, request).await }
    };

    for (user, outcome) in [
        ("alice", "miss"),
        ("bob", "miss"),
        ("alice", "hit"),
        ("bob", "hit"),
    ] {
        assert_eq!(
            view(&read(user).await),
            (200, outcome, "item v0".into()),
            "{user}"
        );
    }
    assert_eq!(reads.get(), 2);

    let saved = send(&client, as_user("alice", Method::POST, &item, &[])).await;
    assert_eq!(view(&saved), (200, "bypass", "saved".into()));
    // The writer and every other user see the new state at once.
    assert_eq!(view(&read("alice").await), (200, "miss", "item v1".into()));
    assert_eq!(view(&read("bob").await), (200, "miss", "item v1".into()));
    assert_eq!(reads.get(), 4);

    // A write that fails changes nothing and invalidates nothing.
    for status in ["409", "500"] {
        let refused = send(
            &client,
            as_user("alice", Method::POST, &item, &[("x-fail", status)]),
        )
        .await;
        assert_eq!(refused.status.as_str(), status);
        assert_eq!(
            view(&read("alice").await),
            (200, "hit", "item v1".into()),
            "{status}"
        );
    }
    assert_eq!(reads.get(), 4);

    // A write whose Location names /item on another authority (another virtual host of this
    // very app) leaves that one alone: its stored v1 is still served, v2 is not seen.
    let globex = HttpClient::with_host("globex.example");
    let globex_read = || send(&globex, get_with(&item, &[]));
    assert_eq!(view(&globex_read().await), (200, "miss", "item v1".into()));
    let elsewhere = as_user(
        "carol",
        Method::POST,
        &items,
        &[("x-location", "http://globex.example/item")],
    );
    assert_eq!(send(&client, elsewhere).await.status, StatusCode::CREATED);
    assert_eq!(view(&globex_read().await), (200, "hit", "item v1".into()));
    assert_eq!(view(&read("bob").await), (200, "hit", "item v1".into()));

    // ...on its own authority, relative or absolute, in Location or Content-Location, drops it.
    let own_absolute = format!("http://{}/item", server.addr);
    for (header, location, version) in [
        ("x-location", "/item", 3),
        ("x-content-location", own_absolute.as_str(), 4),
    ] {
        let created = as_user("carol", Method::POST, &items, &[(header, location)]);
        assert_eq!(send(&client, created).await.status, StatusCode::CREATED);
        for user in ["alice", "bob"] {
            assert_eq!(
                view(&read(user).await),
                (200, "miss", format!("item v{version}")),
                "{user} after a write with {header}: {location}"
            );
        }
    }
    assert_eq!(reads.get(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_flight_keeps_later_readers_off_that_flight() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let version = Arc::new(AtomicU64::new(0));
    let (reads, hold) = (Tally::new(), Gate::new());
    let read = {
        let (version, reads, hold) = (Arc::clone(&version), reads.clone(), hold.clone());
        move || {
            let (version, reads, hold) = (Arc::clone(&version), reads.clone(), hold.clone());
            async move {
                let version = version.load(Ordering::SeqCst);
                if reads.add() == 1 {
                    hold.wait().await;
                }
                format!("item v{version}")
            }
        }
    };
    let write = {
        let version = Arc::clone(&version);
        move || {
            version.fetch_add(1, Ordering::SeqCst);
            async { "saved" }
        }
    };
    let server = Server::start(Router::new().route("/item", get(read).post(write)), &layer).await;
    let client = HttpClient::new();
    let url = server.url("/item");

    // A read of v0 is running when the write lands.
    let before = client.spawn_get(url.clone());
    reads.wait_for(1, HANG, "the first read").await;
    let saved = send(&client, request(Method::POST, &url, &[])).await;
    assert_eq!(view(&saved), (200, "bypass", "saved".into()));

    // A read after the write does not join it: it runs, while the first read is still held.
    let after = send(&client, get_with(&url, &[])).await;
    assert_eq!(view(&after), (200, "miss", "item v1".into()));
    hold.open();
    let before = answered(before).await;
    assert_eq!(view(&before), (200, "miss", "item v0".into()));

    // What the window keeps is the read that followed the write.
    let later = send(&client, get_with(&url, &[])).await;
    assert_eq!(view(&later), (200, "hit", "item v1".into()));
    assert_eq!(reads.get(), 2);
}

/// A route whose responses cannot be shared (`header: value`). Its first run waits at
/// `handler.gate`, every later one at `later`.
fn unshareable(
    handler: &Work,
    later: &Gate,
    header: &'static str,
    value: &'static str,
) -> MethodRouter {
    let (handler, later) = (handler.clone(), later.clone());
    get(move || {
        let (handler, later) = (handler.clone(), later.clone());
        async move {
            let run = handler.count_run();
            if run == 1 {
                handler.gate.wait().await;
            } else {
                later.wait().await;
            }
            ([(header, value)], format!("for one caller only, run {run}"))
        }
    })
}

/// Runs handed out to `replies`, sorted.
fn runs_of(replies: &[Reply]) -> Vec<usize> {
    let mut runs: Vec<usize> = replies
        .iter()
        .map(|reply| {
            reply
                .text()
                .rsplit(' ')
                .next()
                .and_then(|run| run.parse().ok())
                .unwrap_or_else(|| panic!("no run in {reply:?}"))
        })
        .collect();
    runs.sort_unstable();
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_be_shared_pass_and_their_requests_never_wait_for_each_other() {
    const N: usize = 5;
    for (header, value) in [
        ("cache-control", "private"),
        ("set-cookie", "session=1"),
        ("cache-control", "no-store"),
    ] {
        let layer = ParkingLayer::new().ttl(MINUTE);
        let (handler, later) = (Work::held(), Gate::new());
        let routes = Router::new().route("/mine", unshareable(&handler, &later, header, value));
        let server = Server::start(routes, &layer).await;
        let client = HttpClient::new();
        let url = server.url("/mine");

        // First burst: the others wait for the leader, whose response they cannot have; then
        // they are released together: all of them run at once.
        let first = client.spawn_get_all_ok(vec![url.clone(); N]);
        server.joined(N).await;
        handler.wait_started(1).await;
        assert_eq!(handler.runs(), 1, "{value}: the others wait for the leader");
        handler.gate.open();
        handler.wait_started(N).await;
        later.open();
        let first = within(first).await.expect("first burst");
        assert_eq!(
            sorted_outcomes(&first),
            ["miss", "pass", "pass", "pass", "pass"],
            "{value}"
        );
        assert_eq!(
            runs_of(&first),
            [1, 2, 3, 4, 5],
            "{value}: each its own response"
        );
        for reply in &first {
            assert_eq!(reply.header(header), Some(value), "{reply:?}");
        }

        // Later bursts go straight through: every request runs at once, none waits for another.
        later.close();
        let second = client.spawn_get_all_ok(vec![url.clone(); N]);
        handler.wait_started(2 * N).await;
        later.open();
        let second = within(second).await.expect("second burst");
        assert_eq!(sorted_outcomes(&second), ["pass"; N], "{value}");
        assert_eq!(runs_of(&second), [6, 7, 8, 9, 10], "{value}");
        assert_settled(
            &layer,
            stats! {
                miss: 1,
                pass: 2 * N as u64 - 1,
                executions: 2 * N as u64,
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inner_concurrency_limit_is_held_by_leaders_only() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let (slow, quick) = (Work::held(), Work::free());
    let item = {
        let (slow, quick) = (slow.clone(), quick.clone());
        get(move |Path(id): Path<String>| {
            let (slow, quick) = (slow.clone(), quick.clone());
            async move {
                let run = if id == "slow" {
                    slow.enter().await
                } else {
                    quick.enter().await
                };
                format!("{id}, run {run}")
            }
        })
    };
    // The limit wraps the whole app and the layer wraps the limit, as a `ServiceBuilder` stack:
    // the layer is the one that asks the limit for readiness.
    let joined = Tally::new();
    let stack = ServiceBuilder::new()
        .layer(counting(&joined))
        .layer(layer.clone())
        .layer(ConcurrencyLimitLayer::new(1))
        .service(Router::new().route("/item/{id}", item));
    let server = Server::serve(Router::new().fallback_service(stack), joined).await;
    let client = HttpClient::new();
    let (slow_url, quick_url) = (server.url("/item/slow"), server.url("/item/quick"));

    let stored = client.get(&quick_url).await.unwrap();
    assert_eq!(view(&stored), (200, "miss", "quick, run 1".into()));

    // The leader of `slow` holds the only permit...
    let leader = client.spawn_get(slow_url.clone());
    slow.wait_started(1).await;
    let followers: Vec<_> = (0..3).map(|_| client.spawn_get(slow_url.clone())).collect();
    server.joined(5).await;
    // ...and a hit for another key is served at once, while the leader still runs.
    let hit = within(client.get(&quick_url)).await.unwrap();
    assert_eq!(view(&hit), (200, "hit", "quick, run 1".into()));
    assert_eq!((slow.runs(), quick.runs()), (1, 1));

    slow.gate.open();
    assert_eq!(
        view(&answered(leader).await),
        (200, "miss", "slow, run 1".into())
    );
    for follower in followers {
        assert_eq!(
            view(&answered(follower).await),
            (200, "coalesced", "slow, run 1".into())
        );
    }
    assert_eq!(slow.runs(), 1);
    assert_settled(
        &layer,
        stats! {
            miss: 2,
            hit: 1,
            coalesced: 3,
            executions: 2,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_http2_requests_share_one_run() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let handler = Work::held();
    let report = {
        let handler = handler.clone();
        get(move |request: Request<axum::body::Body>| {
            let handler = handler.clone();
            async move {
                let version = request.version();
                let run = handler.enter().await;
                format!("report, run {run}, asked over {version:?}")
            }
        })
    };
    let server = Server::start(Router::new().route("/report", report), &layer).await;
    let client = HttpClient::http2();
    let url = server.url("/report");

    let tasks = [client.spawn_get(url.clone()), client.spawn_get(url.clone())];
    server.joined(2).await;
    handler.gate.open();
    let [first, second] = tasks;
    let replies = [answered(first).await, answered(second).await];

    assert_eq!(handler.runs(), 1);
    for reply in &replies {
        assert_eq!(reply.version, Version::HTTP_2, "{reply:?}");
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, "report, run 1, asked over HTTP/2.0".to_owned())
        );
    }
    assert_eq!(sorted_outcomes(&replies), ["coalesced", "miss"]);
    let later = client.get(&url).await.unwrap();
    assert_eq!(
        view(&later),
        (200, "hit", "report, run 1, asked over HTTP/2.0".into())
    );
    assert_eq!(later.version, Version::HTTP_2);
    assert_settled(
        &layer,
        stats! {
            miss: 1,
            coalesced: 1,
            hit: 1,
            executions: 1,
        },
    );
}

/// `GET` answers `"report, run N"` after waiting at `handler`'s gate; `POST` answers at once.
fn report(handler: &Work) -> MethodRouter {
    let handler = handler.clone();
    get(move || {
        let handler = handler.clone();
        async move { format!("report, run {}", handler.enter().await) }
    })
    .post(|| async { "posted" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_status_names_the_outcome_in_rfc_9211_terms_and_never_the_key() {
    let layer = ParkingLayer::new().ttl(MINUTE).cache_status(true);
    let handler = Work::held();
    let server = Server::start(
        Router::new().route("/report/{id}", report(&handler)),
        &layer,
    )
    .await;
    let client = HttpClient::new();
    let url = server.url("/report/7?user=alice");
    let with_auth = |method| request(method, &url, &[("authorization", "Bearer alice")]);

    let tasks = [
        client.spawn_send(with_auth(Method::GET)),
        client.spawn_send(with_auth(Method::GET)),
    ];
    server.joined(2).await;
    handler.gate.open();
    let [first, second] = tasks;
    let mut replies = vec![answered(first).await, answered(second).await];
    replies.push(send(&client, with_auth(Method::GET)).await);
    replies.push(send(&client, with_auth(Method::POST)).await);

    let expected = [
        ("miss", "tower-parking; fwd=uri-miss"),
        ("coalesced", "tower-parking; fwd=uri-miss; collapsed"),
        ("hit", "tower-parking; hit"),
        ("bypass", "tower-parking; fwd=bypass"),
    ];
    let mut seen: Vec<(&str, &str)> = replies
        .iter()
        .map(|reply| (reply.outcome(), reply.header("cache-status").unwrap_or("")))
        .collect();
    seen.sort_unstable();
    let mut expected_sorted = expected.to_vec();
    expected_sorted.sort_unstable();
    assert_eq!(seen, expected_sorted);
    for reply in &replies {
        let status = reply.header("cache-status").unwrap();
        for secret in ["report", "alice", "127.0.0.1", "http", "GET", "user", "7"] {
            assert!(
                !status.contains(secret),
                "Cache-Status {status:?} names the key"
            );
        }
    }

    // Without the x-parking header, Cache-Status alone says it.
    let quiet = ParkingLayer::new()
        .ttl(MINUTE)
        .status_header(false)
        .cache_status(true);
    let quiet_server = Server::start(
        Router::new().route("/report/{id}", report(&handler)),
        &quiet,
    )
    .await;
    let first = send(&client, get_with(&quiet_server.url("/report/8"), &[])).await;
    let again = send(&client, get_with(&quiet_server.url("/report/8"), &[])).await;
    for (reply, status) in [
        (&first, "tower-parking; fwd=uri-miss"),
        (&again, "tower-parking; hit"),
    ] {
        assert_eq!(reply.parking, None, "{reply:?}");
        assert_eq!(reply.header("cache-status"), Some(status));
    }
    // And it is off by default.
    let plain = ParkingLayer::new().ttl(MINUTE);
    let plain_server = Server::start(
        Router::new().route("/report/{id}", report(&handler)),
        &plain,
    )
    .await;
    let reply = send(&client, get_with(&plain_server.url("/report/9"), &[])).await;
    assert_eq!(
        (reply.outcome(), reply.header("cache-status")),
        ("miss", None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_answers_with_the_configured_status() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .wait_timeout(Duration::from_millis(100))
        .on_wait_timeout(WaitTimeoutPolicy::Fail)
        .wait_timeout_status(StatusCode::SERVICE_UNAVAILABLE);
    let handler = Work::held();
    let server = Server::start(
        Router::new().route("/report/{id}", report(&handler)),
        &layer,
    )
    .await;
    let client = HttpClient::new();
    let url = server.url("/report/1");

    let leader = client.spawn_get(url.clone());
    handler.wait_started(1).await;
    // The leader is held until after the follower's answer: it can only be the timeout's.
    let follower = within(client.get(&url)).await.unwrap();
    assert_eq!(
        view(&follower),
        (
            503,
            "timeout",
            "timed out waiting for a parked request".into()
        )
    );
    handler.gate.open();
    assert_eq!(
        view(&answered(leader).await),
        (200, "miss", "report, run 1".into())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_when_makes_the_responses_it_refuses_pass() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .share_when(DefaultSharing.and(NotForContentType::const_new("application/pdf")));
    let handler = Work::held();
    let respond = |content_type: &'static str| {
        let handler = handler.clone();
        get(move || {
            let handler = handler.clone();
            async move {
                let run = handler.enter().await;
                ([(header::CONTENT_TYPE, content_type)], format!("run {run}"))
            }
        })
    };
    let routes = Router::new()
        .route("/file.pdf", respond("application/pdf"))
        .route("/page", respond("text/html"));
    let server = Server::start(routes, &layer).await;
    let client = HttpClient::new();
    let (pdf, page) = (server.url("/file.pdf"), server.url("/page"));

    let pdfs = client.spawn_get_all_ok(vec![pdf.clone(); 3]);
    let pages = client.spawn_get_all_ok(vec![page.clone(); 3]);
    server.joined(6).await;
    handler.gate.open();
    let (pdfs, pages) = (within(pdfs).await.unwrap(), within(pages).await.unwrap());

    assert_eq!(sorted_outcomes(&pdfs), ["miss", "pass", "pass"]);
    let mut pdf_bodies: Vec<String> = pdfs.iter().map(Reply::text).collect();
    pdf_bodies.sort();
    pdf_bodies.dedup();
    assert_eq!(pdf_bodies.len(), 3, "each PDF caller ran its own: {pdfs:?}");
    assert_eq!(sorted_outcomes(&pages), ["coalesced", "coalesced", "miss"]);
    assert!(pages.iter().all(|reply| reply.body == pages[0].body));
    assert_eq!(handler.runs(), 4);

    assert_eq!(client.get(&pdf).await.unwrap().outcome(), "pass");
    assert_eq!(client.get(&page).await.unwrap().outcome(), "hit");
    assert_eq!(handler.runs(), 5);
}
