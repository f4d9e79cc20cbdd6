//! Freshness, `Age` and revalidation across processes (issue 12): instances (each its own layer,
//! `RedisBackend`, Redis connections and runtime, as separate processes would have) on one real
//! `redis-server`, with an origin handler that sets the caching headers, reached over HTTP.
//!
//! Lifetimes are real and short (1–2 s): the layer's clock is the wall clock here. Each test
//! asserts the origin's run count across instances and what every caller received: status,
//! body, `Age`, the refreshed head after a `304`, and `x-parking`.
#![cfg(feature = "redis")]

mod support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    http::{request::Parts, HeaderMap, Response, StatusCode},
    Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use support::{
    counting_waits, eventually,
    origin::{fields, reply, stating, Fields, Origin},
    redis_key, stored_response_tag, Instance, RedisServer, Resp, Tally,
};
use tower_parking::{Key, ParkingLayer, RedisBackend, Stats};

/// Time allowed for things that take milliseconds, so a loaded machine does not fail a test.
const SOON: Duration = Duration::from_secs(10);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// `GET /{key}` on `origin` (the instance puts its layer over it).
fn origin_app<F>(origin: &Origin, respond: F) -> Router
where
    F: Fn(usize, &HeaderMap) -> Response<Body> + Clone + Send + Sync + 'static,
{
    origin.router("/{key}", respond)
}

/// Requests keyed by path alone, so a test can name the Redis key of a response.
fn by_path(parts: &Parts) -> Option<Key> {
    Some(Key::new(parts.uri.path()))
}

/// The layer of every instance: keyed by path, TTL 10 s; its callers count in `parked` each
/// time they find the lock held by another instance and are about to wait for it.
fn parking(parked: &Tally) -> ParkingLayer {
    ParkingLayer::new()
        .parker_builder(counting_waits(parked))
        .key(by_path)
        .ttl(Duration::from_secs(10))
}

/// Two instances on `redis`, each with its own `parking(parked)` layer over `app`.
fn two_instances(redis: &RedisServer, parked: &Tally, app: &Router) -> [Instance; 2] {
    [0, 1].map(|_| {
        Instance::start(
            RedisBackend::builder(redis.url()),
            parking(parked),
            app.clone(),
        )
    })
}

/// What one caller received, and when it asked and got it.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    sent: Instant,
    received: Instant,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("ASCII header"))
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    fn age(&self) -> Option<u64> {
        self.header("age")
            .map(|age| age.parse().unwrap_or_else(|_| panic!("Age {age:?}")))
    }

    /// Status, `x-parking` and body.
    fn view(&self) -> (u16, &str, &str) {
        (
            self.status.as_u16(),
            self.header("x-parking").unwrap_or(""),
            self.text(),
        )
    }

    /// Asserts `Age` is `own` plus the whole seconds the response was held, for a response
    /// received by the origin's caller between `stored.0` and `stored.1`.
    #[track_caller]
    fn assert_age(&self, own: u64, stored: (Instant, Instant)) {
        let least = own + self.sent.saturating_duration_since(stored.1).as_secs();
        let most = own + self.received.duration_since(stored.0).as_secs();
        let age = self.age().expect("an Age");
        assert!(
            (least..=most).contains(&age),
            "Age {age}, expected {least}..={most}"
        );
    }
}

/// An HTTP/1 client that sends header lines of the test's choosing.
#[derive(Clone)]
struct HttpClient(Client<HttpConnector, Empty<Bytes>>);

impl HttpClient {
    fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build_http())
    }

    async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Got {
        let mut request = http::Request::get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).unwrap();
        let sent = Instant::now();
        let answer = async {
            let response = self.0.request(request).await.expect("a response");
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("a body").to_bytes();
            (parts, body)
        };
        let (parts, body) = tokio::time::timeout(Duration::from_secs(20), answer)
            .await
            .unwrap_or_else(|_| panic!("GET {url}: no answer within 20 s (hung)"));
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
            sent,
            received: Instant::now(),
        }
    }

    fn spawn_get(&self, url: String, headers: Fields) -> tokio::task::JoinHandle<Got> {
        let client = self.clone();
        tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            client.get(&url, &headers).await
        })
    }
}

async fn joined(task: tokio::task::JoinHandle<Got>) -> Got {
    tokio::time::timeout(SOON, task)
        .await
        .expect("answered")
        .expect("request task")
}

fn total(instances: &[Instance]) -> Stats {
    instances.iter().map(Instance::stats).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stated_lifetime_and_the_age_hold_in_every_instance() {
    let redis = RedisServer::start();
    let parked = Tally::new();
    let origin = Origin::free();
    let app = origin_app(&origin, |run, request: &HeaderMap| {
        // /own-age answers with an Age of its own, as a response from another cache would.
        let mut headers = fields(&[("cache-control", "max-age=2")]);
        if request.get("x-path").is_some_and(|path| path == "own-age") {
            headers = fields(&[("cache-control", "max-age=60"), ("age", "5")]);
        }
        reply(StatusCode::OK, &headers, run, format!("run {run}"))
    });
    let instances = two_instances(&redis, &parked, &app);
    let [a, b] = &instances;
    let client = HttpClient::new();

    let first = client.get(&a.url("/short"), &[]).await;
    assert_eq!(first.view(), (200, "miss", "run 1"));
    assert_eq!(first.age(), None, "straight from the handler");
    let stored = (first.sent, first.received);

    tokio::time::sleep(ms(1_100)).await;
    let hit = client.get(&b.url("/short"), &[]).await;
    assert_eq!(hit.view(), (200, "hit", "run 1"), "fresh for 2 s in B too");
    hit.assert_age(0, stored);
    assert!(hit.age().unwrap() >= 1, "held over a second");

    // Past max-age=2 (under a TTL of 10 s), in either instance.
    tokio::time::sleep((first.received + ms(2_100)).saturating_duration_since(Instant::now()))
        .await;
    let after = client.get(&b.url("/short"), &[]).await;
    assert_eq!(after.view(), (200, "miss", "run 2"));
    assert_eq!(origin.runs(), 2);

    let own = client
        .get(&a.url("/own-age"), &[("x-path", "own-age")])
        .await;
    assert_eq!(own.view(), (200, "miss", "run 3"));
    assert_eq!(own.age(), Some(5), "the origin's own Age, untouched");
    let stored = (own.sent, own.received);
    tokio::time::sleep(ms(1_100)).await;
    let hit = client
        .get(&b.url("/own-age"), &[("x-path", "own-age")])
        .await;
    assert_eq!(hit.view(), (200, "hit", "run 3"));
    hit.assert_age(5, stored);
    assert!(hit.age().unwrap() >= 6);
    assert_eq!(origin.runs(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifetime_of_zero_reaches_callers_parked_in_another_instance_and_is_never_reused() {
    let redis = RedisServer::start();
    let cases = [
        ("max-age=0", fields(&[("cache-control", "max-age=0")])),
        (
            "no-cache",
            fields(&[("cache-control", "max-age=60, no-cache")]),
        ),
        ("Expires: 0", fields(&[("expires", "0")])),
        (
            "Age past max-age",
            fields(&[("cache-control", "max-age=3600"), ("age", "7200")]),
        ),
    ];
    for (n, (case, headers)) in cases.into_iter().enumerate() {
        let parked = Tally::new();
        let origin = Origin::held();
        let own_age = if case == "Age past max-age" { 7200 } else { 0 };
        let app = origin_app(&origin, stating(headers));
        let instances = two_instances(&redis, &parked, &app);
        let [a, b] = &instances;
        let client = HttpClient::new();
        let path = format!("/zero-{n}");

        let leader = client.spawn_get(a.url(&path), vec![]);
        origin.work.wait_started(1).await;
        let scripts = redis.scripts_run();
        let followers = [
            client.spawn_get(a.url(&path), vec![]),
            client.spawn_get(b.url(&path), vec![]),
            client.spawn_get(b.url(&path), vec![]),
        ];
        a.waiting().wait_for(2, SOON, "requests in A").await;
        b.waiting().wait_for(2, SOON, "requests in B").await;
        parked.wait_for(1, SOON, "B's flight parked").await;
        // B's flight acquires (one script), finds the lock held, then looks again as it starts
        // waiting (another): only then has it learnt which leader it waits for.
        eventually(SOON, "B's flight waiting on the leader", || async {
            (redis.scripts_run() >= scripts + 2).then_some(())
        })
        .await;
        origin.work.gate.open();

        let leader = joined(leader).await;
        assert_eq!(leader.view(), (200, "miss", "run 1"), "{case}");
        let mut outcomes = Vec::new();
        for follower in followers {
            let got = joined(follower).await;
            assert_eq!(
                (got.status.as_u16(), got.text()),
                (200, "run 1"),
                "{case}: {:?}",
                got.header("x-parking")
            );
            assert_eq!(got.age(), Some(own_age), "{case}");
            outcomes.push(got.header("x-parking").unwrap_or("").to_owned());
        }
        outcomes.sort();
        assert_eq!(outcomes, ["coalesced", "coalesced", "parked"], "{case}");
        assert_eq!(origin.runs(), 1, "{case}");

        let next = client.get(&b.url(&path), &[]).await;
        assert_eq!(
            next.view(),
            (200, "miss", "run 2"),
            "{case}: never reused after its run"
        );
        assert_eq!(origin.runs(), 2, "{case}");
        assert_eq!(
            total(&instances),
            stats! { miss: 2, coalesced: 2, parked: 1, executions: 2 },
            "{case}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_lifetime_run_ending_between_a_follower_s_acquire_and_its_wait_still_reaches_it() {
    let redis = RedisServer::start();
    let origin = Origin::held();
    let app = origin_app(&origin, stating(fields(&[("cache-control", "max-age=0")])));
    // B's callers, once they found the lock held, wait for `leader_done` before they wait.
    let (parked, leader_done) = (Tally::new(), support::Gate::new());
    let hook = {
        let (parked, leader_done) = (parked.clone(), leader_done.clone());
        tower_parking::ParkerBuilder::default().before_wait(move |_key| {
            parked.add();
            let leader_done = leader_done.clone();
            Box::pin(async move { leader_done.wait().await })
        })
    };
    let a = Instance::start(
        RedisBackend::builder(redis.url()),
        parking(&Tally::new()),
        app.clone(),
    );
    let b = Instance::start(
        RedisBackend::builder(redis.url()),
        parking(&Tally::new()).parker_builder(hook),
        app,
    );
    let client = HttpClient::new();

    let leader = client.spawn_get(a.url("/gap"), vec![]);
    origin.work.wait_started(1).await;
    let follower = client.spawn_get(b.url("/gap"), vec![]);
    parked
        .wait_for(1, SOON, "B's caller found the lock held")
        .await;
    origin.work.gate.open();
    assert_eq!(joined(leader).await.view(), (200, "miss", "run 1"));
    let lock = redis_key(&Key::new("/gap"), "lock");
    eventually(SOON, "the leader's store and release", || async {
        (redis.cmd(&["EXISTS", &lock]) == Resp::Integer(0)).then_some(())
    })
    .await;
    leader_done.open();
    let follower = joined(follower).await;
    assert_eq!(
        follower.view(),
        (200, "parked", "run 1"),
        "the response of the run it was parked on"
    );
    assert_eq!(origin.runs(), 1);
}

/// The origin's resource: `ETag: "v1"`, fresh for 1 s, `X-Version` as `head` says; a `304`
/// (fresh for 5 s, the current `X-Version`) to `If-None-Match: "v1"`.
fn versioned(head: &Arc<Mutex<u32>>) -> impl Fn(usize, &HeaderMap) -> Response<Body> + Clone {
    let head = Arc::clone(head);
    move |run, request| {
        let version = head.lock().unwrap().to_string();
        if request
            .get("if-none-match")
            .is_some_and(|tag| tag.to_str().unwrap().contains("\"v1\""))
        {
            let headers = vec![
                ("etag".to_owned(), "\"v1\"".to_owned()),
                ("cache-control".to_owned(), "max-age=5".to_owned()),
                ("x-version".to_owned(), version),
            ];
            reply(StatusCode::NOT_MODIFIED, &headers, run, String::new())
        } else {
            let headers = vec![
                ("etag".to_owned(), "\"v1\"".to_owned()),
                ("cache-control".to_owned(), "max-age=1".to_owned()),
                ("x-version".to_owned(), version),
            ];
            reply(StatusCode::OK, &headers, run, "body v1".to_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revalidation_is_one_run_across_instances_and_refreshes_every_caller_s_head() {
    let redis = RedisServer::start();
    let parked = Tally::new();
    let origin = Origin::held();
    let head = Arc::new(Mutex::new(1));
    let app = origin_app(&origin, versioned(&head));
    let instances = two_instances(&redis, &parked, &app);
    let [a, b] = &instances;
    let client = HttpClient::new();

    origin.work.gate.open();
    let first = client.get(&a.url("/doc"), &[]).await;
    assert_eq!(first.view(), (200, "miss", "body v1"));
    origin.work.gate.close();

    // Stale after max-age=1; the origin's head changes, its body does not.
    tokio::time::sleep(ms(1_200)).await;
    *head.lock().unwrap() = 2;
    let leader = client.spawn_get(a.url("/doc"), vec![]);
    origin.work.wait_started(2).await;
    assert_eq!(
        origin.request_of(2).get("if-none-match").unwrap(),
        "\"v1\"",
        "the run is a revalidation"
    );
    let coalesced = client.spawn_get(a.url("/doc"), vec![]);
    let parked_plain = client.spawn_get(b.url("/doc"), vec![]);
    let parked_conditional =
        client.spawn_get(b.url("/doc"), fields(&[("if-none-match", "\"v1\"")]));
    a.waiting().wait_for(3, SOON, "requests in A").await;
    b.waiting().wait_for(2, SOON, "requests in B").await;
    parked.wait_for(1, SOON, "B's flight parked").await;
    origin.work.gate.open();

    let leader = joined(leader).await;
    let coalesced = joined(coalesced).await;
    let mut in_b = [joined(parked_plain).await, joined(parked_conditional).await];
    assert_eq!(leader.view(), (200, "revalidated", "body v1"));
    assert_eq!(coalesced.view(), (200, "coalesced", "body v1"));
    // Which of B's two requests led B's flight (parked) and which joined it is up to the
    // scheduler; their answers are the same but for the 304 the conditional one gets.
    assert_eq!((in_b[0].status.as_u16(), in_b[0].text()), (200, "body v1"));
    assert_eq!((in_b[1].status.as_u16(), in_b[1].text()), (304, ""));
    in_b.sort_by(|x, y| x.header("x-parking").cmp(&y.header("x-parking")));
    assert_eq!(
        in_b.iter()
            .map(|got| got.header("x-parking").unwrap_or(""))
            .collect::<Vec<_>>(),
        ["coalesced", "parked"]
    );
    for got in [&leader, &coalesced].into_iter().chain(&in_b) {
        assert_eq!(got.header("x-version"), Some("2"), "the refreshed head");
        assert_eq!(got.header("cache-control"), Some("max-age=5"));
        assert_eq!(got.header("etag"), Some("\"v1\""));
        assert_eq!(got.header("x-run"), Some("2"));
        assert_eq!(got.age(), Some(0), "received again just now");
    }
    assert_eq!(origin.runs(), 2, "one run across both instances");
    assert_eq!(
        total(&instances),
        stats! { miss: 1, revalidated: 1, coalesced: 2, parked: 1, executions: 2 }
    );

    // The refreshed lifetime (5 s) holds in B, past the old one (1 s).
    tokio::time::sleep(ms(1_200)).await;
    let hit = client.get(&b.url("/doc"), &[]).await;
    assert_eq!(hit.view(), (200, "hit", "body v1"));
    assert_eq!(hit.header("x-version"), Some("2"));
    hit.assert_age(0, (leader.sent, leader.received));
    assert_eq!(origin.runs(), 2);
}

/// A stored entry as the parker writes it in Redis (generation 0, fence 1), fresh until
/// `fresh_until_us` and kept for ever, whose value is `value`.
fn entry(fresh_until_us: u64, value: &[u8]) -> Vec<u8> {
    let mut entry = format!("0 TP2 1 {fresh_until_us} 9999999999999999 0 0 0 0 V\n").into_bytes();
    entry.extend_from_slice(value);
    entry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_in_the_older_format_is_a_miss_and_is_overwritten_never_misread() {
    let redis = RedisServer::start();
    // The previous format: its tag, status 200, one field (ETag: "old"), a body.
    let mut older = b"TPR1\x00\xc8\x00\x00\x00\x01".to_vec();
    for part in [&b"etag"[..], b"\"old\""] {
        older.extend_from_slice(&(part.len() as u32).to_be_bytes());
        older.extend_from_slice(part);
    }
    older.extend_from_slice(b"stale body");
    // One entry fresh for ever, one stale but kept (a revalidation would use it).
    for (path, fresh_until) in [("/fresh-old", 9_999_999_999_999_999), ("/stale-old", 1)] {
        let key = redis_key(&Key::new(path), "resp");
        let value = entry(fresh_until, &older);
        assert_eq!(
            redis.cmd_bytes(&[b"SET", key.as_bytes(), &value, b"PX", b"30000"]),
            Resp::Simple("OK".into())
        );
    }
    let parked = Tally::new();
    let origin = Origin::free();
    let app = origin_app(
        &origin,
        stating(fields(&[
            ("cache-control", "max-age=60"),
            ("etag", "\"new\""),
        ])),
    );
    let instances = two_instances(&redis, &parked, &app);
    let [a, b] = &instances;
    let client = HttpClient::new();

    for (n, path) in ["/fresh-old", "/stale-old"].into_iter().enumerate() {
        let run = n + 1;
        let first = client.get(&a.url(path), &[]).await;
        assert_eq!(
            first.view(),
            (200, "miss", &*format!("run {run}")),
            "{path}"
        );
        assert!(
            !origin.request_of(run).contains_key("if-none-match"),
            "{path}: nothing was revalidated from the older value"
        );
        let stored = redis
            .cmd(&["GET", &redis_key(&Key::new(path), "resp")])
            .bytes()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        assert!(
            stored.starts_with(b"0 TP2 ") && stored.windows(4).any(|w| w == stored_response_tag()),
            "{path}: overwritten in the current format: {:?}",
            String::from_utf8_lossy(&stored)
        );
        let hit = client.get(&b.url(path), &[]).await;
        assert_eq!(hit.view(), (200, "hit", &*format!("run {run}")), "{path}");
        assert_eq!(hit.header("etag"), Some("\"new\""));
    }
    assert_eq!(origin.runs(), 2);
}
