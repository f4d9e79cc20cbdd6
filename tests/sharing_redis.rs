//! Issue 7 across processes: several instances (each its own layer, `RedisBackend`, Redis
//! connections and runtime, as separate processes would have) on one real `redis-server`, with
//! the layer's default key over a whole axum app. Writes invalidate in every instance, `Vary`
//! variants are stored apart and served everywhere, keys whose responses cannot be shared pass
//! in every instance, and the layer's own errors carry the configured status.
#![cfg(feature = "redis")]

mod support;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::Path, routing::get, Router};
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use support::{HttpClient, Instance, RedisServer, Reply, Tally};
use tower_http::compression::CompressionLayer;
use tower_parking::{FailurePolicy, ParkingLayer, RedisBackend};

const MINUTE: Duration = Duration::from_secs(60);

/// The local window's staleness bound (the default): no process serves a copy longer after the
/// entry changed in Redis, whatever its notifications do.
const STALENESS_BOUND: Duration = Duration::from_secs(1);

/// Every request names this authority, as requests behind one load balancer do, so the default
/// key (which holds the authority) is the same in every instance.
const HOST: &str = "app.example";

fn start(
    n: usize,
    redis: &RedisServer,
    layer: impl Fn() -> ParkingLayer,
    app: &Router,
) -> Vec<Instance> {
    (0..n)
        .map(|_| Instance::start(RedisBackend::builder(redis.url()), layer(), app.clone()))
        .collect()
}

fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Request<Bytes> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Bytes::new()).expect("a valid request")
}

async fn send(client: &HttpClient, request: Request<Bytes>) -> Reply {
    client
        .send(request)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

fn view(reply: &Reply) -> (u16, &str, String) {
    (reply.status.as_u16(), reply.outcome(), reply.text())
}

fn count(replies: &[Reply], outcome: &str) -> usize {
    replies
        .iter()
        .filter(|reply| reply.outcome() == outcome)
        .count()
}

/// Requests per instance in each burst.
const PER_INSTANCE: usize = 3;

/// Three bursts of requests, [`PER_INSTANCE`] to each of 4 instances, on a route whose work takes
/// `work` and whose responses are private. Returns each burst's replies and how long it took to
/// answer them all, and how many times the handler ran.
async fn private_bursts(work: Duration) -> (Vec<(Vec<Reply>, Duration)>, usize) {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let app = {
        let runs = runs.clone();
        Router::new().route(
            "/private/{key}",
            get(move |Path(key): Path<String>| {
                let run = runs.add();
                async move {
                    tokio::time::sleep(work).await;
                    (
                        [(header::CACHE_CONTROL, "private")],
                        format!("{key} for one caller, run {run}"),
                    )
                }
            }),
        )
    };
    let instances = start(4, &redis, || ParkingLayer::new().ttl(MINUTE), &app);
    let client = HttpClient::with_host(HOST);
    let urls: Vec<String> = (0..PER_INSTANCE)
        .flat_map(|_| instances.iter().map(|instance| instance.url("/private/x")))
        .collect();
    let mut bursts = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let replies = client.get_all_ok(urls.clone()).await;
        bursts.push((replies, started.elapsed()));
    }
    let executions: u64 = instances.iter().map(|i| i.stats().executions).sum();
    assert_eq!(executions, runs.get() as u64);
    (bursts, runs.get())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_responses_pass_in_every_instance_and_each_caller_gets_its_own() {
    let (bursts, runs) = private_bursts(Duration::from_millis(100)).await;
    let n = 4 * PER_INSTANCE;
    let mut bodies: Vec<String> = Vec::new();
    for (i, (replies, _)) in bursts.iter().enumerate() {
        let leaders = if i == 0 { 1 } else { 0 };
        assert_eq!(count(replies, "miss"), leaders, "burst {i}: {replies:?}");
        assert_eq!(
            count(replies, "pass"),
            n - leaders,
            "burst {i}: {replies:?}"
        );
        for reply in replies {
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            assert_eq!(reply.header("cache-control"), Some("private"));
            bodies.push(reply.text());
        }
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        3 * n,
        "a private response reached another caller"
    );
    assert_eq!(runs, 3 * n, "every request ran its own");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_responses_first_burst_within_2w_later_bursts_within_w() {
    const WORK: Duration = Duration::from_secs(1);
    const SLACK: Duration = Duration::from_millis(500);
    let (bursts, _) = private_bursts(WORK).await;
    let took: Vec<Duration> = bursts.iter().map(|(_, took)| *took).collect();
    assert!(
        took[0] < 2 * WORK + SLACK,
        "the first burst took {:?} with work of {WORK:?} (bursts: {took:?})",
        took[0]
    );
    for later in &took[1..] {
        assert!(
            *later < WORK + SLACK,
            "a later burst took {later:?} with work of {WORK:?} (bursts: {took:?})"
        );
    }
}

/// `GET /item` shows the item's version to the caller, in the caller's language (`Vary:
/// Accept-Language`), counting its runs in `reads`; `POST /item` bumps the version.
fn item(reads: &Tally) -> Router {
    let version = Arc::new(AtomicU64::new(0));
    let read = {
        let (version, reads) = (Arc::clone(&version), reads.clone());
        move |headers: HeaderMap| {
            reads.add();
            let version = version.load(Ordering::SeqCst);
            let value = |name| {
                headers
                    .get(name)
                    .map_or("nobody", |value: &http::HeaderValue| {
                        value.to_str().unwrap()
                    })
                    .to_owned()
            };
            let (who, language) = (value(header::AUTHORIZATION), value(header::ACCEPT_LANGUAGE));
            async move {
                (
                    [(header::VARY, "accept-language")],
                    format!("item v{version} for {who} in {language}"),
                )
            }
        }
    };
    let write = move || {
        version.fetch_add(1, Ordering::SeqCst);
        async { "saved" }
    };
    Router::new().route("/item", get(read).post(write))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_invalidates_every_user_and_variant_in_every_instance() {
    let redis = RedisServer::start();
    let reads = Tally::new();
    let instances = start(2, &redis, || ParkingLayer::new().ttl(MINUTE), &item(&reads));
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::with_host(HOST);
    let read = |instance: &Instance, user: &str, language: &str| {
        let auth = format!("Bearer {user}");
        request(
            Method::GET,
            &instance.url("/item"),
            &[("authorization", &auth), ("accept-language", language)],
        )
    };
    let body = |version: u64, user: &str, language: &str| {
        format!("item v{version} for Bearer {user} in {language}")
    };

    // Every user and language is stored, and each instance has served it (B's copies of what A
    // stored came from Redis and stay in B's local window).
    let stored = [("alice", "en"), ("alice", "fr"), ("bob", "en")];
    for (user, language) in stored {
        let first = send(&client, read(a, user, language)).await;
        assert_eq!(view(&first), (200, "miss", body(0, user, language)));
        for _ in 0..2 {
            let again = send(&client, read(b, user, language)).await;
            assert_eq!(view(&again), (200, "hit", body(0, user, language)));
        }
    }
    assert_eq!(reads.get(), 3);

    let saved = send(
        &client,
        request(
            Method::POST,
            &a.url("/item"),
            &[("authorization", "Bearer alice")],
        ),
    )
    .await;
    assert_eq!(view(&saved), (200, "bypass", "saved".into()));

    // In the other instance, for every user and variant: the new state, run again, as soon as
    // the write's notification reaches it (Redis sent it to both processes when the writer heard
    // its own; until the other process's dispatcher has read it, its local copy may still serve).
    let written = Instant::now();
    for (user, language) in stored {
        loop {
            let after = send(&client, read(b, user, language)).await;
            if view(&after) == (200, "hit", body(0, user, language)) {
                assert!(
                    written.elapsed() < STALENESS_BOUND,
                    "{user} in {language}: the old copy served {:?} after the write",
                    written.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            assert_eq!(
                view(&after),
                (200, "miss", body(1, user, language)),
                "{user} in {language}, after the write through the other instance"
            );
            break;
        }
    }
    // And what B stored again is what A serves.
    for (user, language) in stored {
        let after = send(&client, read(a, user, language)).await;
        assert_eq!(view(&after), (200, "hit", body(1, user, language)));
    }
    assert_eq!(reads.get(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_encoding_variants_are_stored_apart_and_each_is_a_hit_in_the_other_instance() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let app = {
        let runs = runs.clone();
        Router::new()
            .route(
                "/page",
                get(move || {
                    let run = runs.add();
                    async move { format!("run {run}: {}", "a compressible line of text\n".repeat(40)) }
                }),
            )
            .layer(CompressionLayer::new())
    };
    let instances = start(2, &redis, || ParkingLayer::new().ttl(MINUTE), &app);
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::with_host(HOST);
    let gzip = |instance: &Instance| {
        request(
            Method::GET,
            &instance.url("/page"),
            &[("accept-encoding", "gzip")],
        )
    };
    let identity = |instance: &Instance| request(Method::GET, &instance.url("/page"), &[]);
    let is_gzip = |reply: &Reply| {
        reply.header("content-encoding") == Some("gzip") && reply.body.starts_with(&[0x1f, 0x8b])
    };
    let plain = |run: usize| format!("run {run}: {}", "a compressible line of text\n".repeat(40));

    let gzipped = send(&client, gzip(a)).await;
    assert!(is_gzip(&gzipped), "{gzipped:?}");
    assert_eq!(gzipped.outcome(), "miss");
    let unencoded = send(&client, identity(b)).await;
    assert_eq!(unencoded.header("content-encoding"), None, "{unencoded:?}");
    assert_eq!(view(&unencoded), (200, "miss", plain(2)));

    for _ in 0..2 {
        let gzip_in_b = send(&client, gzip(b)).await;
        assert!(is_gzip(&gzip_in_b), "{gzip_in_b:?}");
        assert_eq!(
            (gzip_in_b.outcome(), &gzip_in_b.body),
            ("hit", &gzipped.body)
        );
        let identity_in_a = send(&client, identity(a)).await;
        assert_eq!(
            identity_in_a.header("content-encoding"),
            None,
            "{identity_in_a:?}"
        );
        assert_eq!(view(&identity_in_a), (200, "hit", plain(2)));
    }
    assert_eq!(runs.get(), 2, "one run per variant across both instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_fail_closed_answers_the_configured_unavailable_status() {
    let mut redis = RedisServer::start();
    let runs = Tally::new();
    let app = {
        let runs = runs.clone();
        Router::new().route(
            "/report",
            get(move || {
                let run = runs.add();
                async move { format!("report, run {run}") }
            }),
        )
    };
    let instance = Instance::start(
        RedisBackend::builder(redis.url())
            .failure_policy(FailurePolicy::FailClosed)
            .command_timeout(Duration::from_millis(300)),
        ParkingLayer::new()
            .ttl(Duration::ZERO)
            .unavailable_status(StatusCode::BAD_GATEWAY),
        app,
    );
    let client = HttpClient::with_host(HOST);
    let up = client.get(&instance.url("/report")).await.unwrap();
    assert_eq!(view(&up), (200, "miss", "report, run 1".into()));

    redis.kill();
    let down = client.get(&instance.url("/report")).await.unwrap();
    assert_eq!(down.status, StatusCode::BAD_GATEWAY, "{down:?}");
    assert_eq!(down.text(), "request parking is unavailable");
    assert_eq!(runs.get(), 1, "fail-closed runs nothing");
}
