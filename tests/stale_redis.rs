//! Stale-while-revalidate, stale-if-error and early refresh across processes (issue 9):
//! instances (each its own layer, `RedisBackend`, Redis connections and runtime, as separate
//! processes would have) on one real `redis-server`, reached over HTTP.
//!
//! Lifetimes are real and short (TTL 1 s): the layer's clock is the wall clock here. The origin
//! handler is shared by every instance, so its run count is the fleet's; a refresh the test must
//! not let land yet is held at a gate, so an answer that waited for it would never come.
#![cfg(feature = "redis")]

mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use axum::{
    extract::Path,
    http::{Request, StatusCode},
    routing::get,
    Router,
};
use bytes::Bytes;
use support::{
    eventually,
    fleet::{assert_all_served, outcomes, parking, start_instances, urls, wait_all_in, SOON},
    origin::{Answer, ScriptedOrigin},
    redis_key, HttpClient, Instance, RedisServer, Reply, Tally,
};
use tower_parking::{backend::Stamp, Key, ParkingLayer, Stats};

const TTL: Duration = Duration::from_secs(1);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// The origin's app, shared by every instance: `GET /r/{key}` answers `{key} run N` (or
/// `{key} failed run N`) as `origin` is told; `POST /r/{key}` answers `saved`.
fn app(origin: &ScriptedOrigin) -> Router {
    let origin = origin.clone();
    let read = move |Path(key): Path<String>| {
        let origin = origin.clone();
        async move { origin.run(&format!("{key} ")).await }
    };
    Router::new().route("/r/{key}", get(read).post(|| async { "saved" }))
}

/// Starts `n` instances on `redis` with `layer()` (keyed by path; the followers of each count
/// in `parked` when they park) over `origin`.
fn fleet(
    n: usize,
    redis: &RedisServer,
    parked: &Tally,
    origin: &ScriptedOrigin,
    layer: impl Fn(ParkingLayer) -> ParkingLayer,
) -> Vec<Instance> {
    start_instances(
        n,
        redis,
        |backend| backend,
        || layer(parking(parked, TTL)),
        &app(origin),
    )
}

/// The fleet's counters, added up.
fn fleet_stats(instances: &[Instance]) -> Stats {
    instances.iter().map(Instance::stats).sum()
}

/// The entry Redis holds for `path` (its head and value), and the key's `PTTL`.
fn entry_in_redis(redis: &RedisServer, path: &str) -> (Stamp, Bytes, i64) {
    let key = redis_key(&Key::new(path), "resp");
    let value = redis.cmd(&["GET", &key]);
    let value = value.bytes().expect("an entry in Redis");
    // Stored behind the URI's generation: `<gen> <entry>`.
    let space = value.iter().position(|&byte| byte == b' ').unwrap();
    let entry = Bytes::copy_from_slice(&value[space + 1..]);
    let (stamp, payload) = Stamp::open(&entry).expect("an entry of this version");
    (stamp, payload, redis.cmd(&["PTTL", &key]).integer())
}

fn view(reply: &Reply) -> (u16, &str, String) {
    (reply.status.as_u16(), reply.outcome(), reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_400_over_4_instances_in_the_stale_window_gets_400_stale_answers_and_one_refresh(
) {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let window = Duration::from_secs(10);
    let instances = fleet(4, &redis, &parked, &origin, |layer| {
        layer.stale_while_revalidate(window)
    });
    let all: Vec<&Instance> = instances.iter().collect();
    let client = HttpClient::new();

    let first = client.get(&instances[0].url("/r/k")).await.unwrap();
    let stored = Instant::now();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    // Redis keeps it for its stale window too, and its head says until when it is fresh and
    // until when it may be served stale.
    let (stamp, _, pttl) = entry_in_redis(&redis, "/r/k");
    assert_eq!(
        Duration::from_micros(stamp.fresh_until - stamp.stored_at),
        TTL
    );
    assert_eq!(
        Duration::from_micros(stamp.stale_until - stamp.fresh_until),
        window
    );
    let kept = (TTL + window).as_millis() as i64;
    assert!(
        (kept - 1_000..=kept).contains(&pttl),
        "PTTL {pttl} ms, kept for {kept} ms"
    );

    // While it is fresh, 400 hits: the instances keep local copies, and the client has its
    // connections open, so the burst below measures the layer, not connecting.
    let warm = client.get_all_ok(urls(&all, "/r/k", 100)).await;
    assert_all_served(&warm, "k run 1");
    let warm = outcomes(&warm);
    let (hit, coalesced) = (warm.get("hit").copied(), warm.get("coalesced").copied());
    let (hit, coalesced) = (hit.unwrap_or(0) as u64, coalesced.unwrap_or(0) as u64);
    assert_eq!(hit + coalesced, 400, "{warm:?}");

    // The TTL runs out (a real lifetime of 1 s).
    tokio::time::sleep_until((stored + TTL + ms(100)).into()).await;

    // The refresh is held at the gate: an answer that waited for it would never come.
    origin.work.gate.close();
    let replies = client.get_all_ok(urls(&all, "/r/k", 100)).await;
    assert_eq!(
        outcomes(&replies),
        BTreeMap::from([("stale".to_owned(), 400)])
    );
    assert_all_served(&replies, "k run 1");
    for reply in &replies {
        assert_eq!(reply.header("age"), Some("1"), "{reply:?}");
    }
    // None waited for the refresh (held, it would never have come); each took the time of a hit
    // through this harness (a debug build, 2 cores): 100-250 ms for the slowest of 400.
    let slowest = replies.iter().map(|reply| reply.elapsed).max().unwrap();
    assert!(
        slowest < ms(500),
        "the slowest of 400 stale answers took {slowest:?}"
    );
    origin.work.wait_started(2).await;
    assert_eq!(origin.runs(), 2, "one refresh across the four instances");

    // Once it lands, every instance serves the refreshed response.
    origin.work.gate.open();
    eventually(SOON, "the refresh to land in Redis", || {
        let (_, payload, _) = entry_in_redis(&redis, "/r/k");
        let landed = payload
            .windows(b"k run 2".len())
            .any(|window| window == b"k run 2");
        async move { landed.then_some(()) }
    })
    .await;
    for instance in &instances {
        let after = client.get(&instance.url("/r/k")).await.unwrap();
        assert_eq!(view(&after), (200, "hit", "k run 2".into()));
    }
    assert_eq!(origin.runs(), 2);
    assert_eq!(
        fleet_stats(&instances),
        stats! { miss: 1, stale: 400, hit: hit + 4, coalesced: coalesced, executions: 2 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_keeps_the_old_response_in_every_instance_until_the_window_ends() {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let retry = ms(300);
    let instances = fleet(4, &redis, &parked, &origin, |layer| {
        layer
            .stale_while_revalidate(Duration::from_secs(2))
            .refresh_retry(retry)
    });
    let client = HttpClient::new();

    let before = Instant::now();
    let first = client.get(&instances[0].url("/r/k")).await.unwrap();
    let after = Instant::now();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    origin.answer(Answer::ServerError);

    // Stored between `before` and `after`: stale from 1 s after, for 2 s. A request every 40 ms,
    // round the instances, within that.
    tokio::time::sleep_until((after + TTL + ms(50)).into()).await;
    let mut ticks = tokio::time::interval(ms(40));
    let mut stale = 0;
    for instance in instances.iter().cycle() {
        ticks.tick().await;
        if before.elapsed() > TTL + ms(1_900) {
            break;
        }
        let reply = client.get(&instance.url("/r/k")).await.unwrap();
        assert_eq!(
            view(&reply),
            (200, "stale", "k run 1".into()),
            "{:?} after the first run",
            before.elapsed()
        );
        stale += 1;
    }

    // Retried across the fleet, never twice within the retry interval.
    let attempts = origin.started()[1..].to_vec();
    assert!(attempts.len() >= 3, "{} refreshes", attempts.len());
    for pair in attempts.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= retry - ms(10),
            "refreshes {gap:?} apart, retry every {retry:?}"
        );
    }
    let attempts = attempts.len() as u64;
    assert_eq!(
        fleet_stats(&instances),
        stats! { miss: 1, stale: stale, executions: 1 + attempts, refresh_failures: attempts }
    );

    // The window has ended: a miss, which gets what the origin answers.
    tokio::time::sleep_until((after + TTL + ms(2_050)).into()).await;
    let reply = client.get(&instances[1].url("/r/k")).await.unwrap();
    let runs = origin.runs();
    assert_eq!(view(&reply), (503, "miss", format!("k failed run {runs}")));
    assert_eq!(runs as u64, 2 + attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_run_hands_the_held_response_to_the_requests_parked_in_every_instance() {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let window = Duration::from_secs(5);
    let instances = fleet(3, &redis, &parked, &origin, |layer| {
        layer.stale_if_error(window)
    });
    let (a, b, c) = (&instances[0], &instances[1], &instances[2]);
    let client = HttpClient::new();

    let first = client.get(&a.url("/r/k")).await.unwrap();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    let (stamp, _, pttl) = entry_in_redis(&redis, "/r/k");
    assert_eq!(
        Duration::from_micros(stamp.error_until - stamp.fresh_until),
        window
    );
    assert_eq!(stamp.stale_until, stamp.fresh_until, "no stale window");
    assert!(
        pttl > (TTL + window - ms(1_000)).as_millis() as i64,
        "{pttl}"
    );
    tokio::time::sleep(TTL + ms(100)).await;

    // The run after the TTL fails; it is held until requests wait for it in every instance.
    origin.answer(Answer::ServerError);
    origin.work.gate.close();
    let leader = client.spawn_get(a.url("/r/k"));
    origin.work.wait_started(2).await;
    let local = client.spawn_get_all_ok(urls(&[a], "/r/k", 2));
    let remote = client.spawn_get_all_ok(urls(&[b, c], "/r/k", 3));
    wait_all_in(&[a], 4).await;
    wait_all_in(&[b, c], 3).await;
    parked.wait_for(2, SOON, "b and c parked on a's run").await;
    origin.work.gate.open();

    let mut replies = vec![leader.await.unwrap().unwrap()];
    replies.extend(local.await.unwrap());
    replies.extend(remote.await.unwrap());
    assert_eq!(origin.runs(), 2, "one failing run for the nine requests");
    assert_eq!(
        outcomes(&replies),
        BTreeMap::from([("stale".to_owned(), 9)])
    );
    assert_all_served(&replies, "k run 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_run_within_the_error_window_serves_the_held_response_in_its_instance() {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let instances = fleet(2, &redis, &parked, &origin, |layer| {
        layer.stale_if_error(Duration::from_secs(5))
    });
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let first = client.get(&a.url("/r/k")).await.unwrap();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    tokio::time::sleep(TTL + ms(100)).await;

    // In the other instance: the run fails, its caller and the ones that joined it get run 1.
    origin.answer(Answer::ServerError);
    origin.work.gate.close();
    let burst = client.spawn_get_all_ok(urls(&[b], "/r/k", 4));
    origin.work.wait_started(2).await;
    wait_all_in(&[b], 4).await;
    origin.work.gate.open();
    let replies = burst.await.unwrap();
    assert_eq!(
        outcomes(&replies),
        BTreeMap::from([("stale".to_owned(), 4)])
    );
    assert_all_served(&replies, "k run 1");
    assert_eq!(origin.runs(), 2);

    // The origin is back: its new response, in both instances.
    origin.answer(Answer::Fine);
    let back = client.get(&a.url("/r/k")).await.unwrap();
    assert_eq!(view(&back), (200, "miss", "k run 3".into()));
    let hit = client.get(&b.url("/r/k")).await.unwrap();
    assert_eq!(view(&hit), (200, "hit", "k run 3".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_keeps_a_hot_key_fresh_across_the_fleet_one_refresh_at_a_time() {
    let redis = RedisServer::start();
    // W = 200 ms, TTL 1 s, β = 1, with the stale window on: a refresh that came too late would
    // show as `stale` (and, without early refresh, every window would start with one).
    let origin = ScriptedOrigin::taking(ms(200));
    let parked = Tally::new();
    let instances = fleet(4, &redis, &parked, &origin, |layer| {
        layer
            .early_refresh(1.0)
            .stale_while_revalidate(Duration::from_secs(10))
    });
    let client = HttpClient::new();
    let first = client.get(&instances[0].url("/r/k")).await.unwrap();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));

    // 3 s of a hot key: each instance asked every 20 ms (200 requests a second in all).
    let start = Instant::now();
    let loops = instances.iter().map(|instance| {
        let (client, url) = (client.clone(), instance.url("/r/k"));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(ms(20));
            let mut replies = Vec::new();
            while start.elapsed() < ms(3_000) {
                ticks.tick().await;
                replies.push(client.get(&url).await.unwrap());
            }
            replies
        })
    });
    let mut replies = Vec::new();
    for replies_of_one in futures_util::future::join_all(loops).await {
        replies.extend(replies_of_one.unwrap());
    }
    assert!(replies.len() > 300, "{} requests", replies.len());
    assert_eq!(
        outcomes(&replies).keys().collect::<Vec<_>>(),
        ["hit"],
        "after the first miss, hits only: {:?}",
        outcomes(&replies)
    );
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK);
    }
    // Three windows: at least one refresh each to stay fresh, a few at most (XFetch with δ =
    // 200 ms refreshes a key this hot about 0.7 s before expiry).
    let refreshes = origin.runs() - 1;
    assert!(
        (3..=15).contains(&refreshes),
        "{refreshes} refreshes in 3 windows of 1 s"
    );
    assert_eq!(
        origin.most_at_once(),
        1,
        "one refresh at a time across the fleet"
    );
    assert_eq!(fleet_stats(&instances).refresh_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_write_in_the_stale_window_no_instance_serves_the_old_response() {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let instances = fleet(4, &redis, &parked, &origin, |layer| {
        layer
            .stale_while_revalidate(Duration::from_secs(10))
            .stale_if_error(Duration::from_secs(10))
    });
    let client = HttpClient::new();

    let first = client.get(&instances[0].url("/r/k")).await.unwrap();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    for instance in &instances[1..] {
        let hit = client.get(&instance.url("/r/k")).await.unwrap();
        assert_eq!(view(&hit), (200, "hit", "k run 1".into()));
    }
    tokio::time::sleep(TTL + ms(100)).await;

    let write = client
        .send(
            Request::post(instances[2].url("/r/k"))
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(view(&write), (200, "bypass", "saved".into()));
    let next = client.get(&instances[1].url("/r/k")).await.unwrap();
    assert_eq!(view(&next), (200, "miss", "k run 2".into()));
    for instance in &instances {
        let after = client.get(&instance.url("/r/k")).await.unwrap();
        assert_eq!(view(&after), (200, "hit", "k run 2".into()));
    }
    assert_eq!(origin.runs(), 2);
    assert_eq!(fleet_stats(&instances).stale, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_a_refresh_runs_in_another_instance_discards_both_old_responses() {
    let redis = RedisServer::start();
    let origin = ScriptedOrigin::new();
    let parked = Tally::new();
    let instances = fleet(3, &redis, &parked, &origin, |layer| {
        layer.stale_while_revalidate(Duration::from_secs(10))
    });
    let (a, b, c) = (&instances[0], &instances[1], &instances[2]);
    let client = HttpClient::new();

    let first = client.get(&a.url("/r/k")).await.unwrap();
    assert_eq!(view(&first), (200, "miss", "k run 1".into()));
    tokio::time::sleep(TTL + ms(100)).await;

    // b serves run 1 stale and refreshes it; the refresh is held.
    origin.hold_only(2);
    origin.work.gate.close();
    let stale = client.get(&b.url("/r/k")).await.unwrap();
    assert_eq!(view(&stale), (200, "stale", "k run 1".into()));
    origin.work.wait_started(2).await;

    // A write through c: neither run 1 nor the refresh that began before it may be served.
    let write = client
        .send(Request::post(c.url("/r/k")).body(Bytes::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(view(&write), (200, "bypass", "saved".into()));
    let next = client.spawn_get(c.url("/r/k"));
    origin.work.gate.open();
    let next = next.await.unwrap().unwrap();
    assert_eq!(view(&next), (200, "miss", "k run 3".into()));
    for instance in &instances {
        let after = client.get(&instance.url("/r/k")).await.unwrap();
        assert_eq!(view(&after), (200, "hit", "k run 3".into()));
    }
    assert_eq!(origin.runs(), 3);
    assert_eq!(fleet_stats(&instances).stale, 1);
}
