//! Freshness, `Age` and revalidation as a shared cache computes them (RFC 9111 §4; issue 12), on
//! the memory backend: an axum app whose origin handler sets the caching headers, with
//! `ParkingLayer` over its `Router`.
//!
//! Requests go through `Router::oneshot` on tokio's paused clock (the crate's clock follows
//! tokio's), so a lifetime of 2 s is crossed with `tokio::time::advance`, to the millisecond.
//! Handlers wait at a [`Gate`] that opens once every request of a burst has joined its flight.
//! Each test asserts how many times the origin ran and what every caller received: status,
//! body, `Age`, the refreshed headers after a `304`, and `x-parking`.
//!
//! The last test puts `examples/proxy.rs` (its router function) in front of a real axum origin
//! on a TCP port.

mod support;

#[allow(dead_code)]
#[path = "../examples/proxy.rs"]
mod proxy;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    http::{request::Parts, HeaderMap, HeaderName, Request, Response, StatusCode},
    Router,
};
use bytes::Bytes;
use support::{
    burst, counting_waits,
    origin::{fields, reply, stating, Fields, Origin},
    spawn_joined, stored_response_tag, within, Got, Tally,
};
use tokio::time::advance;
use tower::ServiceExt;
use tower_parking::{
    backend::Stamp, Backend, Key, MemoryBackend, Parker, ParkingLayer, StoredResponse, Value,
};

const PATH: &str = "/r";
const MINUTE: Duration = Duration::from_secs(60);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// `GET /r` on `origin`, with `layer` over the router.
fn origin_app<F>(origin: &Origin, layer: &ParkingLayer, respond: F) -> Router
where
    F: Fn(usize, &HeaderMap) -> Response<Body> + Clone + Send + Sync + 'static,
{
    origin.router(PATH, respond).layer(layer.clone())
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

/// `GET /r` with these extra header lines.
fn get_with(headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(PATH);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

fn plain_get() -> Request<Body> {
    get_with(&[])
}

async fn send(app: &Router, request: Request<Body>) -> Got {
    within(async {
        let response = app.clone().oneshot(request).await.expect("infallible");
        Got::read(response).await
    })
    .await
}

/// The requests sent at once, released together once all have joined their flight (the first
/// one leads).
async fn send_burst(app: &Router, origin: &Origin, requests: Vec<Request<Body>>) -> Vec<Got> {
    burst(
        requests.into_iter().map(|request| send(app, request)),
        &origin.work.gate,
    )
    .await
}

fn views(got: &[Got]) -> Vec<(u16, &str, &str)> {
    got.iter().map(Got::view).collect()
}

/// Requests keyed by path alone, so a test can name the key its response is stored under.
fn by_path(parts: &Parts) -> Option<Key> {
    Some(Key::new(parts.uri.path()))
}

/// The response stored in `backend` for `path`, decoded, if any.
fn stored(backend: &MemoryBackend, path: &str) -> Option<StoredResponse> {
    let entry = backend.peek(&Key::new(path))?;
    let (_, payload) = Stamp::open(&entry).expect("an entry of this version");
    Some(StoredResponse::decode(payload).expect("a stored response"))
}

/// An HTTP date `offset` seconds from now (wall clock).
fn http_date(offset: i64) -> String {
    let now = SystemTime::now();
    let at = if offset >= 0 {
        now + Duration::from_secs(offset as u64)
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

// ------------------------------------------------------------------------------------------
// Freshness: the response's own lifetime, capped by the TTL.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_max_age_shorter_than_the_ttl_ends_the_window_there() {
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        &layer,
        stating(fields(&[("cache-control", "max-age=2")])),
    );

    let first = send(&app, plain_get()).await;
    assert_eq!(first.view(), (200, "miss", "run 1"));
    assert_eq!(first.age(), None, "straight from the handler: no Age added");

    advance(ms(1_500)).await;
    let inside = send(&app, plain_get()).await;
    assert_eq!(inside.view(), (200, "hit", "run 1"));
    assert_eq!(inside.age(), Some(1));

    advance(ms(1_000)).await;
    let after = send(&app, plain_get()).await;
    assert_eq!(
        after.view(),
        (200, "miss", "run 2"),
        "max-age=2 under a TTL of 10 s: not served 2.5 s later"
    );
    assert_eq!(origin.runs(), 2);
    assert_eq!(layer.stats(), stats! { miss: 2, hit: 1, executions: 2 });
}

/// Requests at `at` (ms since the first one): `(outcome, body)` of each.
async fn timeline(app: &Router, at: &[u64]) -> Vec<(String, String)> {
    let mut now = 0;
    let mut got = Vec::new();
    for &when in at {
        advance(ms(when - now)).await;
        now = when;
        let reply = send(app, plain_get()).await;
        got.push((
            reply.parking().unwrap_or("").to_owned(),
            reply.text().to_owned(),
        ));
    }
    got
}

fn expect(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(outcome, body)| (outcome.to_string(), body.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_lifetime_longer_than_the_ttl_is_capped_unless_the_response_may_exceed_it() {
    let ttl = Duration::from_secs(2);
    let long = || stating(fields(&[("cache-control", "max-age=60")]));
    let unstated = || stating(fields(&[("content-type", "text/plain")]));

    let capped = Origin::free();
    let app = origin_app(&capped, &ParkingLayer::new().ttl(ttl), long());
    assert_eq!(
        timeline(&app, &[0, 1_500, 2_500]).await,
        expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")]),
        "max-age=60 under a TTL of 2 s: fresh for 2 s"
    );

    let exceeding = Origin::free();
    let layer = ParkingLayer::new().ttl(ttl).ttl_from_response(true);
    let app = origin_app(&exceeding, &layer, long());
    assert_eq!(
        timeline(&app, &[0, 2_500, 59_500, 60_500]).await,
        expect(&[
            ("miss", "run 1"),
            ("hit", "run 1"),
            ("hit", "run 1"),
            ("miss", "run 2")
        ]),
        "ttl_from_response(true): fresh for its own 60 s"
    );

    // A response that states no lifetime is fresh for the TTL either way.
    for layer in [
        ParkingLayer::new().ttl(ttl),
        ParkingLayer::new().ttl(ttl).ttl_from_response(true),
    ] {
        let origin = Origin::free();
        let app = origin_app(&origin, &layer, unstated());
        assert_eq!(
            timeline(&app, &[0, 1_500, 2_500]).await,
            expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")]),
            "{layer:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_valid_expires_is_a_lifetime_from_the_date() {
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::free();
    // Date and Expires from one reading, 3 s apart: the lifetime is 3 s whatever the clocks.
    let now = SystemTime::now();
    let headers = vec![
        ("date".to_owned(), httpdate::fmt_http_date(now)),
        (
            "expires".to_owned(),
            httpdate::fmt_http_date(now + Duration::from_secs(3)),
        ),
    ];
    let app = origin_app(&origin, &layer, stating(headers));
    assert_eq!(
        timeline(&app, &[0, 2_500, 3_500]).await,
        expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")])
    );
}

/// `date` (an IMF-fixdate) in the two obsolete HTTP-date formats: RFC 850 and asctime.
fn obsolete_forms(date: &str) -> [String; 2] {
    // "Tue, 01 Dec 2026 22:03:07 GMT"
    let parts: Vec<&str> = date.split(' ').collect();
    let (weekday, day, month, year, time) = (
        parts[0].trim_end_matches(','),
        parts[1],
        parts[2],
        parts[3],
        parts[4],
    );
    let long_weekday = match weekday {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    [
        format!("{long_weekday}, {day}-{month}-{} {time} GMT", &year[2..]),
        format!(
            "{weekday} {month} {:>2} {time} {year}",
            day.trim_start_matches('0')
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn an_expires_in_an_obsolete_date_format_is_a_lifetime_too() {
    // RFC 9110 §5.6.7: a recipient MUST accept all three HTTP-date formats.
    let now = SystemTime::now();
    let date = httpdate::fmt_http_date(now);
    let expires = httpdate::fmt_http_date(now + Duration::from_secs(3));
    for expires in obsolete_forms(&expires) {
        assert!(httpdate::parse_http_date(&expires).is_ok(), "{expires}");
        let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
        let origin = Origin::free();
        let headers = vec![
            ("date".to_owned(), date.clone()),
            ("expires".to_owned(), expires.clone()),
        ];
        let app = origin_app(&origin, &layer, stating(headers));
        assert_eq!(
            timeline(&app, &[0, 2_500, 3_500]).await,
            expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")]),
            "Expires: {expires}"
        );
    }
}

/// For each `(case, response fields, next outcome)`: a burst of 4 callers parked on one run all
/// get its response; the request right after either runs the origin again (`miss`: a lifetime
/// of zero or less) or is served from the window (`hit`: the control case).
async fn burst_then_next(cases: Vec<(&str, Fields, &str)>) {
    for (case, headers, next) in cases {
        let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
        let origin = Origin::held();
        let app = origin_app(&origin, &layer, stating(headers.clone()));
        let own_age = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("age"))
            .and_then(|(_, age)| age.parse::<u64>().ok());

        let got = send_burst(&app, &origin, (0..4).map(|_| plain_get()).collect()).await;
        assert_eq!(
            views(&got),
            [
                (200, "miss", "run 1"),
                (200, "coalesced", "run 1"),
                (200, "coalesced", "run 1"),
                (200, "coalesced", "run 1"),
            ],
            "{case}: handed to every caller parked on the run"
        );
        for coalesced in &got[1..] {
            let age = coalesced.age().unwrap_or_else(|| panic!("{case}: no Age"));
            if let Some(own) = own_age {
                assert_eq!(age, own, "{case}");
            }
        }

        let after = send(&app, plain_get()).await;
        let body = if next == "hit" { "run 1" } else { "run 2" };
        assert_eq!(after.view(), (200, next, body), "{case}: the next request");
        let runs = if next == "hit" { 1 } else { 2 };
        assert_eq!(origin.runs(), runs, "{case}");
        let expected = if next == "hit" {
            stats! { miss: 1, coalesced: 3, hit: 1, executions: 1 }
        } else {
            stats! { miss: 2, coalesced: 3, executions: 2 }
        };
        assert_eq!(layer.stats(), expected, "{case}");
        assert_eq!(layer.parker().in_flight(), 0, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lifetime_of_zero_or_less_is_handed_to_parked_callers_and_never_reused() {
    let cc = |value: &str| fields(&[("cache-control", value)]);
    burst_then_next(vec![
        ("control: max-age=60", cc("max-age=60"), "hit"),
        ("max-age=0", cc("max-age=0"), "miss"),
        (
            "no-cache beside max-age",
            cc("max-age=60, no-cache"),
            "miss",
        ),
        (
            "s-maxage=0 beside a long max-age",
            cc("s-maxage=0, max-age=600"),
            "miss",
        ),
        ("max-age=-1", cc("max-age=-1"), "miss"),
        (
            "Expires an hour before Date",
            vec![
                ("date".into(), http_date(0)),
                ("expires".into(), http_date(-3_600)),
            ],
            "miss",
        ),
        ("Expires: 0 (invalid)", fields(&[("expires", "0")]), "miss"),
        (
            "Expires: not a date",
            fields(&[("expires", "next tuesday")]),
            "miss",
        ),
        (
            "Age: 7200 with max-age=3600 (stale on arrival)",
            fields(&[("cache-control", "max-age=3600"), ("age", "7200")]),
            "miss",
        ),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn must_revalidate_proxy_revalidate_and_s_maxage_are_never_served_stale() {
    for (case, directives) in [
        ("must-revalidate", "max-age=1, must-revalidate"),
        ("proxy-revalidate", "max-age=1, proxy-revalidate"),
        ("s-maxage beside a long max-age", "s-maxage=1, max-age=600"),
        (
            "must-revalidate with stale-while-revalidate",
            "max-age=1, must-revalidate, stale-while-revalidate=60, stale-if-error=60",
        ),
    ] {
        let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
        let origin = Origin::free();
        let app = origin_app(
            &origin,
            &layer,
            stating(fields(&[("cache-control", directives)])),
        );
        let got = timeline(&app, &[0, 1_500, 1_600]).await;
        assert_eq!(
            got[1],
            ("miss".to_owned(), "run 2".to_owned()),
            "{case}: once stale, the origin runs again"
        );
        // http-cache-semantics gives proxy-revalidate a lifetime of zero in a shared cache:
        // stricter than RFC 9111 §5.2.2.8 (fresh for its max-age, then never served stale).
        let (third, runs) = if case == "proxy-revalidate" {
            (("miss", "run 3"), 3)
        } else {
            (("hit", "run 2"), 2)
        };
        assert_eq!(got[2], expect(&[third])[0], "{case}");
        assert_eq!(origin.runs(), runs, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn must_revalidate_with_a_validator_is_revalidated_once_stale_not_served() {
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::free();
    let respond = |run: usize, request: &HeaderMap| {
        let headers = fields(&[
            ("cache-control", "max-age=1, must-revalidate"),
            ("etag", "\"a\""),
        ]);
        if request.contains_key("if-none-match") {
            reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
        } else {
            reply(StatusCode::OK, &headers, run, "the body".into())
        }
    };
    let app = origin_app(&origin, &layer, respond);
    assert_eq!(
        send(&app, plain_get()).await.view(),
        (200, "miss", "the body")
    );
    advance(ms(500)).await;
    assert_eq!(
        send(&app, plain_get()).await.view(),
        (200, "hit", "the body")
    );
    advance(ms(1_000)).await;
    let stale = send(&app, plain_get()).await;
    assert_eq!(stale.view(), (200, "revalidated", "the body"));
    assert_eq!(stale.header("x-run"), Some("2"), "the 304's head");
    assert_eq!(origin.request_of(2).get("if-none-match").unwrap(), "\"a\"");
    assert_eq!(origin.runs(), 2);
}

// ------------------------------------------------------------------------------------------
// Age, and what a reuse replays.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn every_reused_response_carries_its_own_age_plus_the_time_held() {
    for own_age in [None, Some(5)] {
        let backend = MemoryBackend::new();
        let waiting = Tally::new();
        let first = ParkingLayer::new().ttl(MINUTE).backend(backend.clone());
        let second = ParkingLayer::new()
            .parker_builder(counting_waits(&waiting).backend(backend))
            .ttl(MINUTE);
        let origin = Origin::held();
        let mut headers = fields(&[("cache-control", "max-age=60")]);
        if let Some(age) = own_age {
            headers.push(("age".into(), age.to_string()));
        }
        let first_app = origin_app(&origin, &first, stating(headers.clone()));
        let second_app = origin_app(&origin, &second, stating(headers));

        let leader = tokio::spawn({
            let app = first_app.clone();
            async move { send(&app, plain_get()).await }
        });
        origin.work.wait_started(1).await;
        let coalesced = spawn_joined([{
            let app = first_app.clone();
            async move { send(&app, plain_get()).await }
        }])
        .await;
        let parked = tokio::spawn({
            let app = second_app.clone();
            async move { send(&app, plain_get()).await }
        });
        waiting
            .wait_for(1, support::HANG, "the other layer's caller parked")
            .await;
        // Held 2 s before the origin answers: that is not time the response was held.
        advance(ms(2_000)).await;
        origin.work.gate.open();
        let leader = within(leader).await.unwrap();
        let coalesced = support::join_spawned(coalesced).await.remove(0);
        let parked = within(parked).await.unwrap();

        let own = own_age.unwrap_or(0);
        assert_eq!(leader.view(), (200, "miss", "run 1"));
        assert_eq!(
            leader.age(),
            own_age,
            "the leader's own response is the origin's"
        );
        assert_eq!(coalesced.view(), (200, "coalesced", "run 1"));
        assert_eq!(coalesced.age(), Some(own), "{own_age:?}");
        assert_eq!(parked.view(), (200, "parked", "run 1"));
        assert_eq!(parked.age(), Some(own), "{own_age:?}");

        advance(ms(3_500)).await;
        for app in [&first_app, &second_app] {
            let hit = send(app, plain_get()).await;
            assert_eq!(hit.view(), (200, "hit", "run 1"));
            assert_eq!(hit.age(), Some(own + 3), "{own_age:?}: held 3.5 s");
        }
        advance(ms(20_000)).await;
        let later = send(&first_app, plain_get()).await;
        assert_eq!(later.age(), Some(own + 23), "{own_age:?}: held 23.5 s");
        assert_eq!(origin.runs(), 1);
        assert_eq!(
            first.stats() + second.stats(),
            stats! { miss: 1, coalesced: 1, parked: 1, hit: 3, executions: 1 }
        );
    }
}

#[tokio::test(start_paused = true)]
async fn hop_by_hop_fields_and_those_connection_names_are_neither_stored_nor_replayed() {
    let backend = MemoryBackend::new();
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .key(by_path)
        .backend(backend.clone());
    let origin = Origin::held();
    let gone = [
        "connection",
        "x-trace",
        "x-session",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "te",
    ];
    let app = origin_app(
        &origin,
        &layer,
        stating(fields(&[
            ("cache-control", "max-age=60"),
            ("connection", "x-trace, X-Session"),
            ("x-trace", "abc"),
            ("x-session", "s1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"origin\""),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-kept", "yes"),
            ("link", "</a.css>; rel=preload"),
            ("link", "</b.js>; rel=preload"),
        ])),
    );

    let mut got = send_burst(&app, &origin, vec![plain_get(), plain_get()]).await;
    got.push(send(&app, plain_get()).await);
    assert_eq!(
        views(&got),
        [
            (200, "miss", "run 1"),
            (200, "coalesced", "run 1"),
            (200, "hit", "run 1")
        ]
    );
    for reused in &got[1..] {
        for name in gone {
            assert!(
                !reused.headers.contains_key(name),
                "{name} replayed to a {:?} caller",
                reused.parking()
            );
        }
        assert_eq!(reused.header("x-kept"), Some("yes"));
        assert_eq!(reused.headers.get_all("link").iter().count(), 2);
    }
    let stored = stored(&backend, PATH).expect("stored");
    for name in gone {
        assert!(!stored.headers.contains_key(name), "{name} stored");
    }
    assert_eq!(
        stored.headers.get("x-kept").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    assert_eq!(origin.runs(), 1);
}

// ------------------------------------------------------------------------------------------
// Revalidation.
// ------------------------------------------------------------------------------------------

/// An origin whose resource is `version` with `ETag: "v{version}"` and `X-Version`; it answers
/// `304` (with a longer `max-age`, its current `X-Version`, a field the `200` did not have and
/// hop-by-hop fields) to an `If-None-Match` naming the current tag.
#[derive(Clone)]
struct Versioned {
    version: Arc<Mutex<u32>>,
    /// The `X-Version` a `304` carries: bumped without changing the body, as a refreshed head.
    head: Arc<Mutex<u32>>,
}

impl Versioned {
    fn new() -> Self {
        Self {
            version: Arc::new(Mutex::new(1)),
            head: Arc::new(Mutex::new(1)),
        }
    }

    fn respond(&self) -> impl Fn(usize, &HeaderMap) -> Response<Body> + Clone {
        let this = self.clone();
        move |run, request| {
            let version = *this.version.lock().unwrap();
            let head = *this.head.lock().unwrap();
            let tag = format!("\"v{version}\"");
            let matches = request
                .get("if-none-match")
                .is_some_and(|value| value.to_str().unwrap().contains(&tag));
            if matches {
                let headers = vec![
                    ("etag".to_owned(), tag),
                    ("cache-control".to_owned(), "max-age=5".to_owned()),
                    ("x-version".to_owned(), head.to_string()),
                    ("x-refreshed-by".to_owned(), "304".to_owned()),
                    ("connection".to_owned(), "x-hop".to_owned()),
                    ("x-hop".to_owned(), "1".to_owned()),
                    ("keep-alive".to_owned(), "timeout=5".to_owned()),
                ];
                reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
            } else {
                let headers = vec![
                    ("etag".to_owned(), tag),
                    ("cache-control".to_owned(), "max-age=1".to_owned()),
                    ("x-version".to_owned(), head.to_string()),
                    ("content-type".to_owned(), "text/plain".to_owned()),
                ];
                reply(StatusCode::OK, &headers, run, format!("body v{version}"))
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stale_response_with_an_etag_is_revalidated_by_one_conditional_run() {
    let layer = ParkingLayer::new()
        .ttl(Duration::from_secs(10))
        .cache_status(true);
    let origin = Origin::held();
    let resource = Versioned::new();
    let app = origin_app(&origin, &layer, resource.respond());

    origin.work.gate.open();
    let first = send(&app, plain_get()).await;
    assert_eq!(first.view(), (200, "miss", "body v1"));
    assert!(!origin.request_of(1).contains_key("if-none-match"));
    origin.work.gate.close();

    // Stale after 1 s. The origin's head changes (X-Version 2), its body does not.
    advance(ms(1_500)).await;
    *resource.head.lock().unwrap() = 2;
    let got = send_burst(
        &app,
        &origin,
        vec![
            plain_get(),
            plain_get(),
            get_with(&[("if-none-match", "\"v1\"")]),
            get_with(&[("if-none-match", "\"v0\"")]),
        ],
    )
    .await;
    assert_eq!(origin.runs(), 2, "one run for the whole burst");
    let conditional = origin.request_of(2);
    assert_eq!(conditional.get("if-none-match").unwrap(), "\"v1\"");
    assert_eq!(
        views(&got),
        [
            (200, "revalidated", "body v1"),
            (200, "coalesced", "body v1"),
            (304, "coalesced", ""),
            (200, "coalesced", "body v1"),
        ]
    );
    for got in &got {
        assert_eq!(got.header("x-version"), Some("2"), "the refreshed head");
        assert_eq!(got.header("cache-control"), Some("max-age=5"));
        assert_eq!(got.header("etag"), Some("\"v1\""));
        assert_eq!(got.header("x-run"), Some("2"));
        assert_eq!(got.age(), Some(0), "received again just now");
    }
    for full in [&got[0], &got[1], &got[3]] {
        assert_eq!(full.header("content-type"), Some("text/plain"));
        assert_eq!(full.header("content-length"), Some("7"));
    }
    assert_eq!(
        got[0].header("cache-status"),
        Some("tower-parking; fwd=stale; fwd-status=304")
    );
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, revalidated: 1, coalesced: 3, executions: 2 }
    );

    // The refreshed lifetime (max-age=5 from the 304) holds: a hit 3 s later.
    advance(ms(3_000)).await;
    let hit = send(&app, plain_get()).await;
    assert_eq!(hit.view(), (200, "hit", "body v1"));
    assert_eq!(hit.header("x-version"), Some("2"));
    assert_eq!(hit.age(), Some(3));
    let not_modified = send(&app, get_with(&[("if-none-match", "W/\"v1\"")])).await;
    assert_eq!(not_modified.view(), (304, "hit", ""));
    assert_eq!(not_modified.header("x-version"), Some("2"));
    assert_eq!(origin.runs(), 2);

    // Stale again, and changed at the origin: the conditional run gets a 200, which replaces
    // the stored response.
    advance(ms(2_500)).await;
    *resource.version.lock().unwrap() = 2;
    *resource.head.lock().unwrap() = 3;
    origin.work.gate.open();
    let changed = send(&app, plain_get()).await;
    assert_eq!(changed.view(), (200, "miss", "body v2"));
    assert_eq!(origin.request_of(3).get("if-none-match").unwrap(), "\"v1\"");
    let after = send(&app, get_with(&[("if-none-match", "\"v1\"")])).await;
    assert_eq!(
        after.view(),
        (200, "hit", "body v2"),
        "v1 is no longer current"
    );
    assert_eq!(after.header("x-version"), Some("3"));
    assert_eq!(after.header("etag"), Some("\"v2\""));
    let current = send(&app, get_with(&[("if-none-match", "\"v2\"")])).await;
    assert_eq!(current.view(), (304, "hit", ""));
    assert_eq!(origin.runs(), 3);
    assert_eq!(
        layer.stats(),
        stats! { miss: 2, revalidated: 1, coalesced: 3, hit: 4, executions: 3 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_304_adds_the_fields_the_stored_response_did_not_have() {
    // RFC 9111 §3.2: the cache adds or replaces each field of the 304 in the stored response.
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::free();
    let resource = Versioned::new();
    let app = origin_app(&origin, &layer, resource.respond());
    send(&app, plain_get()).await;
    advance(ms(1_500)).await;
    let revalidated = send(&app, plain_get()).await;
    assert_eq!(revalidated.view(), (200, "revalidated", "body v1"));
    let hit = send(&app, plain_get()).await;
    assert_eq!(hit.view(), (200, "hit", "body v1"));
    for got in [&revalidated, &hit] {
        assert_eq!(got.header("x-refreshed-by"), Some("304"));
        for hop in ["connection", "x-hop", "keep-alive"] {
            assert!(!got.headers.contains_key(hop), "the 304's {hop} replayed");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stale_response_with_only_last_modified_is_revalidated_with_if_modified_since() {
    const MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::held();
    let respond = |run: usize, request: &HeaderMap| {
        if request
            .get("if-modified-since")
            .is_some_and(|since| since == MODIFIED)
        {
            let headers = fields(&[
                ("last-modified", MODIFIED),
                ("cache-control", "max-age=5"),
                ("x-version", "2"),
            ]);
            reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
        } else {
            let headers = fields(&[
                ("last-modified", MODIFIED),
                ("cache-control", "max-age=1"),
                ("x-version", "1"),
            ]);
            reply(StatusCode::OK, &headers, run, "the page".into())
        }
    };
    let app = origin_app(&origin, &layer, respond);
    origin.work.gate.open();
    assert_eq!(
        send(&app, plain_get()).await.view(),
        (200, "miss", "the page")
    );
    origin.work.gate.close();

    advance(ms(1_500)).await;
    let got = send_burst(
        &app,
        &origin,
        vec![
            plain_get(),
            plain_get(),
            get_with(&[("if-modified-since", MODIFIED)]),
            get_with(&[("if-modified-since", "Tue, 20 Oct 2015 07:28:00 GMT")]),
        ],
    )
    .await;
    let conditional = origin.request_of(2);
    assert_eq!(conditional.get("if-modified-since").unwrap(), MODIFIED);
    assert!(!conditional.contains_key("if-none-match"));
    assert_eq!(
        views(&got),
        [
            (200, "revalidated", "the page"),
            (200, "coalesced", "the page"),
            (304, "coalesced", ""),
            (200, "coalesced", "the page"),
        ]
    );
    for got in &got {
        assert_eq!(got.header("x-version"), Some("2"));
        assert_eq!(got.header("last-modified"), Some(MODIFIED));
    }
    advance(ms(3_000)).await;
    let hit = send(&app, plain_get()).await;
    assert_eq!(hit.view(), (200, "hit", "the page"));
    assert_eq!(hit.header("x-version"), Some("2"));
    assert_eq!(origin.runs(), 2);
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, revalidated: 1, coalesced: 3, hit: 1, executions: 2 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_304_without_validators_answers_the_layer_s_own_condition() {
    // RFC 9110 §15.4.5 does not make a 304 repeat Last-Modified, and common servers (Python's
    // http.server, many frameworks) do not: the 304 still answers the one stored response the
    // layer asked about.
    const MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let origin = Origin::free();
    let respond = |run: usize, request: &HeaderMap| {
        if request.contains_key("if-modified-since") {
            let headers = fields(&[("cache-control", "max-age=5")]);
            reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
        } else {
            let headers = fields(&[("last-modified", MODIFIED), ("cache-control", "max-age=1")]);
            reply(StatusCode::OK, &headers, run, "the page".into())
        }
    };
    let app = origin_app(&origin, &layer, respond);
    assert_eq!(
        send(&app, plain_get()).await.view(),
        (200, "miss", "the page")
    );
    advance(ms(1_500)).await;
    let revalidated = send(&app, plain_get()).await;
    assert_eq!(revalidated.view(), (200, "revalidated", "the page"));
    assert_eq!(revalidated.header("last-modified"), Some(MODIFIED));
    assert_eq!(revalidated.header("cache-control"), Some("max-age=5"));
    advance(ms(3_000)).await;
    assert_eq!(
        send(&app, plain_get()).await.view(),
        (200, "hit", "the page")
    );
    assert_eq!(origin.runs(), 2);
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, revalidated: 1, hit: 1, executions: 2 }
    );
}

// ------------------------------------------------------------------------------------------
// The request's own directives.
// ------------------------------------------------------------------------------------------

const REQUEST_DIRECTIVES: [(&str, &str); 3] = [
    ("cache-control", "no-cache"),
    ("cache-control", "max-age=0"),
    ("pragma", "no-cache"),
];

#[tokio::test(start_paused = true)]
async fn a_request_s_own_cache_directives_are_ignored_by_default() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        &layer,
        stating(fields(&[("cache-control", "max-age=60")])),
    );
    assert_eq!(send(&app, plain_get()).await.view(), (200, "miss", "run 1"));
    advance(ms(1_500)).await;
    for directive in REQUEST_DIRECTIVES {
        let got = send(&app, get_with(&[directive])).await;
        assert_eq!(got.view(), (200, "hit", "run 1"), "{directive:?}");
        assert_eq!(got.age(), Some(1));
    }
    assert_eq!(origin.runs(), 1);
    assert_eq!(layer.stats(), stats! { miss: 1, hit: 3, executions: 1 });
}

#[tokio::test(start_paused = true)]
async fn honoured_request_directives_run_the_origin_but_still_join_a_run_in_flight() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .honor_request_cache_control(true);
    let origin = Origin::held();
    let app = origin_app(
        &origin,
        &layer,
        stating(fields(&[("cache-control", "max-age=60")])),
    );
    origin.work.gate.open();
    assert_eq!(send(&app, plain_get()).await.view(), (200, "miss", "run 1"));

    let mut run = 1;
    for directive in REQUEST_DIRECTIVES {
        // Aged past a second, so that max-age=0 refuses it too.
        advance(ms(1_500)).await;
        run += 1;
        let got = send(&app, get_with(&[directive])).await;
        assert_eq!(
            got.view(),
            (200, "miss", &*format!("run {run}")),
            "{directive:?}"
        );
        let plain = send(&app, plain_get()).await;
        assert_eq!(
            plain.view(),
            (200, "hit", &*format!("run {run}")),
            "{directive:?}: the new response is stored"
        );
    }
    assert_eq!(origin.runs(), 4);

    // A run in flight for a request that refused the stored response: another such request
    // joins it; a plain one is still served the stored response meanwhile.
    advance(ms(1_500)).await;
    origin.work.gate.close();
    let refusing = || {
        let app = app.clone();
        async move { send(&app, get_with(&[("cache-control", "no-cache")])).await }
    };
    let leader = tokio::spawn(refusing());
    origin.work.wait_started(5).await;
    let joined = spawn_joined([refusing()]).await;
    let plain = send(&app, plain_get()).await;
    assert_eq!(
        plain.view(),
        (200, "hit", "run 4"),
        "served while the run is in flight"
    );
    origin.work.gate.open();
    let leader = within(leader).await.unwrap();
    let joined = support::join_spawned(joined).await.remove(0);
    assert_eq!(leader.view(), (200, "miss", "run 5"));
    assert_eq!(joined.view(), (200, "coalesced", "run 5"));
    assert_eq!(
        origin.runs(),
        5,
        "the second refusing request joined the run"
    );
}

#[tokio::test(start_paused = true)]
async fn honoured_request_directives_count_one_outcome_per_request() {
    let layer = ParkingLayer::new()
        .ttl(MINUTE)
        .honor_request_cache_control(true);
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        &layer,
        stating(fields(&[("cache-control", "max-age=60")])),
    );
    send(&app, plain_get()).await;
    advance(ms(1_500)).await;
    let refused = send(&app, get_with(&[("cache-control", "no-cache")])).await;
    assert_eq!(refused.view(), (200, "miss", "run 2"));
    assert_eq!(
        layer.stats(),
        stats! { miss: 2, executions: 2 },
        "the stored response the request refused is not also counted as a hit"
    );
}

// ------------------------------------------------------------------------------------------
// Targeted fields (RFC 9213).
// ------------------------------------------------------------------------------------------

/// Two requests one after the other: `(outcome of the second, origin runs)`.
async fn second_request(layer: ParkingLayer, headers: &[(&str, &str)]) -> (String, usize) {
    let origin = Origin::free();
    let app = origin_app(&origin, &layer, stating(fields(headers)));
    assert_eq!(send(&app, plain_get()).await.view(), (200, "miss", "run 1"));
    let second = send(&app, plain_get()).await;
    let outcome = second.parking().unwrap_or("").to_owned();
    let expected_body = if outcome == "hit" { "run 1" } else { "run 2" };
    assert_eq!(second.text(), expected_body, "{headers:?}");
    (outcome, origin.runs())
}

#[tokio::test(start_paused = true)]
async fn cdn_cache_control_is_obeyed_instead_of_cache_control_and_the_list_is_configurable() {
    let layer = || ParkingLayer::new().ttl(MINUTE);
    let cdn_no_store = [
        ("cache-control", "max-age=60"),
        ("cdn-cache-control", "no-store"),
    ];
    let cdn_max_age = [
        ("cache-control", "no-store"),
        ("cdn-cache-control", "max-age=60"),
    ];
    let surrogate_no_store = [
        ("cache-control", "max-age=60"),
        ("surrogate-control", "no-store"),
    ];

    let (outcome, runs) = second_request(layer(), &cdn_no_store).await;
    assert_ne!(outcome, "hit", "CDN-Cache-Control: no-store is not stored");
    assert_eq!(runs, 2);
    assert_eq!(
        second_request(layer(), &cdn_max_age).await,
        ("hit".to_owned(), 1),
        "CDN-Cache-Control: max-age=60 is stored, whatever Cache-Control says to browsers"
    );
    assert_eq!(
        second_request(layer(), &surrogate_no_store).await,
        ("hit".to_owned(), 1),
        "not a targeted field by default"
    );

    let surrogate = || layer().targeted_fields([HeaderName::from_static("surrogate-control")]);
    let (outcome, runs) = second_request(surrogate(), &surrogate_no_store).await;
    assert_ne!(outcome, "hit", "Surrogate-Control: no-store, once listed");
    assert_eq!(runs, 2);
    assert_eq!(
        second_request(surrogate(), &cdn_no_store).await,
        ("hit".to_owned(), 1),
        "CDN-Cache-Control, no longer listed, is ignored"
    );
    assert_eq!(
        second_request(layer().targeted_fields([]), &cdn_no_store).await,
        ("hit".to_owned(), 1),
        "an empty list: Cache-Control alone"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shorter_cdn_max_age_ends_the_window_before_cache_control_s() {
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        &ParkingLayer::new().ttl(MINUTE),
        stating(fields(&[
            ("cache-control", "max-age=60"),
            ("cdn-cache-control", "max-age=1"),
        ])),
    );
    assert_eq!(
        timeline(&app, &[0, 500, 1_500]).await,
        expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")])
    );
}

// ------------------------------------------------------------------------------------------
// Normalisations in front of http-cache-semantics.
// ------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn directive_names_are_case_insensitive() {
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        &ParkingLayer::new().ttl(Duration::from_secs(10)),
        stating(fields(&[("cache-control", "Max-Age=1")])),
    );
    assert_eq!(
        timeline(&app, &[0, 500, 1_500]).await,
        expect(&[("miss", "run 1"), ("hit", "run 1"), ("miss", "run 2")]),
        "Max-Age=1 is max-age=1, not a lifetime left to the TTL"
    );

    for directive in ["No-Store", "PRIVATE"] {
        let (outcome, runs) = second_request(
            ParkingLayer::new().ttl(MINUTE),
            &[("cache-control", directive)],
        )
        .await;
        assert_ne!(outcome, "hit", "{directive}");
        assert_eq!(runs, 2, "{directive}");
    }
    burst_then_next(vec![(
        "No-Cache",
        fields(&[("cache-control", "max-age=60, No-Cache")]),
        "miss",
    )])
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_age_counts_as_stale() {
    let invalid = |age: &str| fields(&[("cache-control", "max-age=3600"), ("age", age)]);
    burst_then_next(vec![
        ("control: Age: 10", invalid("10"), "hit"),
        ("Age: soon", invalid("soon"), "miss"),
        ("Age: -5", invalid("-5"), "miss"),
        ("Age: 1.5", invalid("1.5"), "miss"),
        (
            "Age: 99999999999999999999",
            invalid("99999999999999999999"),
            "miss",
        ),
    ])
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_value_stored_in_the_older_format_is_a_miss_and_is_overwritten() {
    // What the previous formats wrote: a tag, a status, no headers, (TPR2: no policy,) a body.
    let olders: [&[u8]; 2] = [
        b"TPR1\x00\xc8\x00\x00\x00\x00stale body",
        b"TPR2\x00\xc8\x00\x00\x00\x00\x00stale body",
    ];
    for older_bytes in olders {
        let backend = MemoryBackend::new();
        let older = Parker::<Bytes>::builder()
            .backend(backend.clone())
            .ttl(MINUTE)
            .build::<Bytes>();
        older
            .run(PATH, move || async move {
                Ok::<_, Infallible>(Bytes::from_static(older_bytes))
            })
            .await
            .unwrap();

        let layer = ParkingLayer::new()
            .ttl(MINUTE)
            .key(by_path)
            .backend(backend.clone());
        let origin = Origin::free();
        let app = origin_app(
            &origin,
            &layer,
            stating(fields(&[("cache-control", "max-age=60")])),
        );
        assert_eq!(send(&app, plain_get()).await.view(), (200, "miss", "run 1"));
        assert_eq!(send(&app, plain_get()).await.view(), (200, "hit", "run 1"));
        let entry = backend.peek(&Key::new(PATH)).unwrap();
        assert!(Stamp::open(&entry)
            .unwrap()
            .1
            .starts_with(&stored_response_tag()));
        assert_eq!(origin.runs(), 1);
    }
}

// ------------------------------------------------------------------------------------------
// examples/proxy.rs in front of a real origin.
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_example_runs_the_origin_once_per_burst_and_revalidates_with_304() {
    // The origin, on a real port: ETag "v1", fresh for 1 s, answering 304 to If-None-Match.
    let origin = Origin::held();
    let respond = |run: usize, request: &HeaderMap| {
        let headers = fields(&[
            ("etag", "\"v1\""),
            ("cache-control", "max-age=1"),
            ("x-origin-run", "yes"),
        ]);
        if request
            .get("if-none-match")
            .is_some_and(|tag| tag == "\"v1\"")
        {
            reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
        } else {
            reply(StatusCode::OK, &headers, run, "from the origin".into())
        }
    };
    let origin_app = origin.router("/items/{id}", respond);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, origin_app).await });

    let layer = ParkingLayer::new().ttl(Duration::from_secs(10));
    let proxy = proxy::router(upstream.parse().unwrap(), layer.clone());
    let request = |headers: &[(&str, &str)]| {
        let mut request = Request::get("/items/7?view=full").header("host", "proxy.example");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(Body::empty()).unwrap()
    };

    let first = burst(
        (0..8).map(|_| send(&proxy, request(&[]))),
        &origin.work.gate,
    )
    .await;
    assert_eq!(origin.runs(), 1, "one origin run for a burst of 8");
    for (n, got) in first.iter().enumerate() {
        let outcome = if n == 0 { "miss" } else { "coalesced" };
        assert_eq!(got.view(), (200, outcome, "from the origin"));
        assert_eq!(got.header("etag"), Some("\"v1\""));
    }
    let forwarded = origin.request_of(1);
    assert!(!forwarded.contains_key("if-none-match"));

    // Stale after its max-age=1 (real time: the origin is on a real socket).
    tokio::time::sleep(ms(1_100)).await;
    origin.work.gate.close();
    let second = burst(
        [
            send(&proxy, request(&[])),
            send(&proxy, request(&[])),
            send(&proxy, request(&[("if-none-match", "\"v1\"")])),
        ],
        &origin.work.gate,
    )
    .await;
    assert_eq!(origin.runs(), 2);
    assert_eq!(
        origin.request_of(2).get("if-none-match").unwrap(),
        "\"v1\"",
        "the proxy forwarded its revalidation"
    );
    assert_eq!(
        views(&second),
        [
            (200, "revalidated", "from the origin"),
            (200, "coalesced", "from the origin"),
            (304, "coalesced", ""),
        ]
    );
    assert_eq!(second[0].header("x-run"), Some("2"), "the 304's head");
    assert_eq!(
        layer.stats(),
        stats! { miss: 1, coalesced: 9, revalidated: 1, executions: 2 }
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_for_another_variant_counts_one_outcome() {
    let layer = ParkingLayer::new().ttl(MINUTE);
    let origin = Origin::free();
    let respond = |run: usize, request: &HeaderMap| {
        let language = request
            .get("accept-language")
            .map_or("en", |value| value.to_str().unwrap())
            .to_owned();
        let headers = fields(&[("cache-control", "max-age=60"), ("vary", "accept-language")]);
        reply(
            StatusCode::OK,
            &headers,
            run,
            format!("{language} run {run}"),
        )
    };
    let app = origin_app(&origin, &layer, respond);
    let en = send(&app, get_with(&[("accept-language", "en")])).await;
    assert_eq!(en.view(), (200, "miss", "en run 1"));
    let fr = send(&app, get_with(&[("accept-language", "fr")])).await;
    assert_eq!(fr.view(), (200, "miss", "fr run 2"));
    assert_eq!(
        layer.stats(),
        stats! { miss: 2, executions: 2 },
        "the other variant found under the key is not also counted as a hit"
    );
}

/// A stale response that varies reaches only requests of its own variant: a request of another
/// variant in the stale window runs for its own response, and the refresh the stale response
/// calls for is run with a request of its variant, never with that other request.
#[tokio::test(start_paused = true)]
async fn a_stale_response_that_varies_reaches_only_its_own_variant() {
    let layer = ParkingLayer::new()
        .ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::from_secs(10));
    let origin = Origin::free();
    let respond = |run: usize, request: &HeaderMap| {
        let language = request
            .get("accept-language")
            .map_or("en", |value| value.to_str().unwrap())
            .to_owned();
        let headers = fields(&[("cache-control", "max-age=1"), ("vary", "accept-language")]);
        reply(
            StatusCode::OK,
            &headers,
            run,
            format!("{language} run {run}"),
        )
    };
    let app = origin_app(&origin, &layer, respond);
    let en = || get_with(&[("accept-language", "en")]);
    let fr = || get_with(&[("accept-language", "fr")]);
    assert_eq!(send(&app, en()).await.view(), (200, "miss", "en run 1"));
    advance(ms(1_500)).await;

    // Another variant in the stale window: its own run, and no refresh of `en` with its request.
    assert_eq!(send(&app, fr()).await.view(), (200, "miss", "fr run 2"));
    assert_eq!(origin.runs(), 2);
    // `en` in its stale window: served stale while one refresh runs, with an `en` request.
    assert_eq!(send(&app, en()).await.view(), (200, "stale", "en run 1"));
    origin.work.wait_started(3).await;
    assert_eq!(origin.request_of(3).get("accept-language").unwrap(), "en");
    // The paused clock moves once the refresh has landed (nothing else is left to run).
    advance(ms(1)).await;
    assert_eq!(send(&app, en()).await.view(), (200, "hit", "en run 3"));
    assert_eq!(send(&app, fr()).await.view(), (200, "hit", "fr run 2"));
    assert_eq!(origin.runs(), 3);
    assert_eq!(
        layer.stats(),
        stats! { miss: 2, stale: 1, hit: 2, executions: 3 },
        "no refresh failed: none was started with a request of the other variant"
    );
}
