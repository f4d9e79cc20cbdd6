//! The bounds the Redis backend keeps under faults (issue 8), against a real redis-server that
//! the tests start, kill and reconfigure, and instances that each have their own backend, layer
//! and HTTP server (`support::Instance`, as separate processes would).
//!
//! Each test asserts the bound users rely on: how stale a local copy can be, how long a parked
//! request waits, how many times the handler runs.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use support::{
    acquired, eventually,
    fleet::{
        assert_all_served, first_run_gated_app, gated_app, gated_by_key, outcomes,
        parked_behind_leader, parking, slow_app, start_instances, urls, wait_all_in, SOON,
    },
    payload, redis_key, sealed, FaultProxy, Gate, HttpClient, Instance, RedisServer, Resp, Tally,
};
use tower_parking::{
    backend::{Acquire, Lookup},
    Backend, Key, RedisBackend, WaitTimeoutPolicy,
};

const MINUTE: Duration = Duration::from_secs(60);

/// The local window's default staleness bound.
const BOUND: Duration = Duration::from_secs(1);

/// Two instances on `redis` with leases of `lease`, TTL a minute, followers counted in `parked`.
fn leased_pair(
    redis: &RedisServer,
    lease: Duration,
    parked: &Tally,
    app: &axum::Router,
) -> Vec<Instance> {
    start_instances(
        2,
        redis,
        |b| b.lease(lease),
        || parking(parked, MINUTE),
        app,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_is_seen_within_the_staleness_bound() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let instances = start_instances(2, &redis, |b| b, || parking(&parked, MINUTE), &app);
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let first = client.get(&a.url("/slow/k")).await.unwrap();
    assert_eq!((first.outcome(), first.text()), ("miss", "k run 1".into()));
    // `b` reads it from Redis once, then serves it from its local window.
    let hits = client.get_all_ok(urls(&[b], "/slow/k", 2)).await;
    assert_all_served(&hits, "k run 1");

    // FLUSHALL sends no notification per key: only the bound protects `b`'s copy.
    let flushed = Instant::now();
    assert_eq!(redis.cmd(&["FLUSHALL"]).text(), "OK");
    let fresh_after = eventually(SOON, "b to see the flush", || {
        let client = client.clone();
        let url = b.url("/slow/k");
        async move {
            let reply = client.get(&url).await.ok()?;
            (reply.text() != "k run 1").then(|| flushed.elapsed())
        }
    })
    .await;
    assert!(
        fresh_after <= BOUND + Duration::from_millis(500),
        "the flushed response was served for {fresh_after:?} (bound {BOUND:?})"
    );
    assert_eq!(runs.get(), 2, "the flush costs one run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_notifications_turned_off_parked_requests_wait_for_the_work_not_the_lease() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    let app = gated_app(&runs, &gate);
    let parked = Tally::new();
    let lease = Duration::from_secs(5);
    let instances = leased_pair(&redis, lease, &parked, &app);
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    // Turned off at runtime: no wake-up will come, and the backends notice within the bound.
    assert_eq!(
        redis
            .cmd(&["CONFIG", "SET", "notify-keyspace-events", ""])
            .text(),
        "OK"
    );
    let (leader, followers) =
        parked_behind_leader(&client, (&runs, &parked), a, &[b], "/slow/k", 5).await;
    let released = Instant::now();
    gate.open();
    let followers = followers.await.unwrap();
    let waited = released.elapsed();
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
    assert_all_served(&followers, "k run 1");
    assert_eq!(runs.get(), 1);
    assert!(
        waited < BOUND + Duration::from_millis(500),
        "parked requests answered {waited:?} after the leader, with a {lease:?} lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_notification_flags_are_turned_back_on_when_allowed() {
    let mut redis = RedisServer::start_with(&["--notify-keyspace-events", ""]);
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let _instances = start_instances(
        1,
        &redis,
        |b| b.enable_keyspace_events(true),
        || parking(&parked, MINUTE),
        &app,
    );
    let has_flags = |redis: &RedisServer| {
        let flags = redis.config_get("notify-keyspace-events");
        "Kg$x".chars().all(|flag| flags.contains(flag)) || flags.contains('A')
    };
    assert!(has_flags(&redis), "set at build");

    // Turned off at runtime, then lost with a restart (CONFIG SET is not persisted).
    assert_eq!(
        redis
            .cmd(&["CONFIG", "SET", "notify-keyspace-events", ""])
            .text(),
        "OK"
    );
    eventually(SOON, "the flags to be turned back on", || {
        let on = has_flags(&redis);
        async move { on.then_some(()) }
    })
    .await;
    redis.restart();
    assert!(!has_flags(&redis), "a restarted server starts without them");
    eventually(SOON, "the flags to be set again after the restart", || {
        let on = has_flags(&redis);
        async move { on.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_parked_behind_one_remote_leader_share_one_wait_timeout_run() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    let app = first_run_gated_app(&runs, &gate);
    let parked = Tally::new();
    let instances = start_instances(
        2,
        &redis,
        |b| b,
        || {
            parking(&parked, MINUTE)
                .wait_timeout(Duration::from_millis(500))
                .on_wait_timeout(WaitTimeoutPolicy::RunLocally)
        },
        &app,
    );
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let leader = client.spawn_get(a.url("/slow/k"));
    runs.wait_for(1, SOON, "the leader's run").await;
    let followers = client.get_all_ok(urls(&[b], "/slow/k", 10)).await;
    assert_eq!(
        runs.get(),
        2,
        "one local run for the ten: {:?}",
        outcomes(&followers)
    );
    assert_all_served(&followers, "k run 2");
    assert_eq!(outcomes(&followers).get("timeout"), Some(&10));
    gate.open();
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_shared_but_not_kept_reaches_the_requests_parked_in_every_process() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    let app = gated_app(&runs, &gate);
    let parked = Tally::new();
    // TTL zero: "share concurrent runs only".
    let instances = start_instances(4, &redis, |b| b, || parking(&parked, Duration::ZERO), &app);
    let all: Vec<_> = instances.iter().collect();
    let client = HttpClient::new();

    let burst = client.spawn_get_all_ok(urls(&all, "/slow/k", 25));
    for instance in &all {
        instance.waiting().wait_for(25, SOON, "requests in").await;
    }
    parked.wait_for(3, SOON, "the other instances parked").await;
    let released = Instant::now();
    gate.open();
    let replies = burst.await.unwrap();
    assert_eq!(runs.get(), 1, "{:?}", outcomes(&replies));
    assert_all_served(&replies, "k run 1");
    assert!(released.elapsed() < Duration::from_secs(1));

    // Nothing was kept: the next request runs again.
    let next = client.get(&all[1].url("/slow/k")).await.unwrap();
    assert_eq!(next.outcome(), "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_past_the_lease_still_runs_once() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {
        // Blocks the worker thread: the lease is renewed from another one.
        std::thread::sleep(Duration::from_millis(1200));
    });
    let parked = Tally::new();
    let instances = start_instances(
        2,
        &redis,
        |b| b.lease(Duration::from_millis(300)),
        || parking(&parked, MINUTE),
        &app,
    );
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let leader = client.spawn_get(a.url("/slow/k"));
    runs.wait_for(1, SOON, "the leader's run").await;
    let followers = client.get_all_ok(urls(&[b], "/slow/k", 3)).await;
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
    assert_all_served(&followers, "k run 1");
    assert_eq!(
        runs.get(),
        1,
        "four leases passed while the handler blocked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_command_connection_is_a_blip_not_a_run_in_every_process() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    let app = gated_app(&runs, &gate);
    let parked = Tally::new();
    let instances = start_instances(3, &redis, |b| b, || parking(&parked, MINUTE), &app);
    let all: Vec<_> = instances.iter().collect();
    let client = HttpClient::new();

    let (leader, followers) =
        parked_behind_leader(&client, (&runs, &parked), all[0], &all[1..], "/slow/k", 5).await;
    // Every command connection drops at once (subscribers are of another type).
    redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]);
    gate.open();
    let followers = followers.await.unwrap();
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
    assert_all_served(&followers, "k run 1");
    assert_eq!(runs.get(), 1, "{:?}", outcomes(&followers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_started_while_redis_is_down_serves_alone_then_joins_the_fleet() {
    let mut redis = RedisServer::start();
    redis.stop();
    let runs = Tally::new();
    let (alone_gate, joined_gate) = (Gate::new(), Gate::new());
    let app = gated_by_key(
        &runs,
        &[
            ("alone", alone_gate.clone()),
            ("joined", joined_gate.clone()),
        ],
    );
    let parked = Tally::new();
    // Fail-open (the default): the instances start although Redis does not answer.
    let instances = start_instances(2, &redis, |b| b, || parking(&parked, MINUTE), &app);
    let all: Vec<_> = instances.iter().collect();
    let client = HttpClient::new();

    // Alone: one run per instance, with in-process coalescing.
    let alone = client.spawn_get_all_ok(urls(&all, "/slow/alone", 3));
    wait_all_in(&all, 3).await;
    alone_gate.open();
    let alone = alone.await.unwrap();
    assert_eq!(runs.get(), 2, "{:?}", outcomes(&alone));

    redis.restart();
    // Joined once what one instance stores, the other reads from Redis.
    let mut probe = 0;
    eventually(SOON, "both instances to join", || {
        probe += 1;
        let (client, path) = (client.clone(), format!("/slow/probe-{probe}"));
        let (a, b) = (all[0].url(&path), all[1].url(&path));
        async move {
            let stored = client.get(&a).await.ok()?;
            let read = client.get(&b).await.ok()?;
            (stored.outcome() == "miss" && read.outcome() == "hit").then_some(())
        }
    })
    .await;

    // A burst over both instances runs the handler once.
    let before = runs.get();
    let leader = client.spawn_get(all[0].url("/slow/joined"));
    runs.wait_for(before + 1, SOON, "the leader's run").await;
    let follower = client.spawn_get(all[1].url("/slow/joined"));
    parked.wait_for(1, SOON, "the other instance parked").await;
    joined_gate.open();
    let (leader, follower) = (
        leader.await.unwrap().unwrap(),
        follower.await.unwrap().unwrap(),
    );
    assert_eq!(runs.get(), before + 1);
    assert_eq!(leader.text(), follower.text());
    assert_eq!(follower.outcome(), "parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_half_open_connection_no_copy_outlives_the_bound_and_the_backend_recovers() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port()).await;
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let direct = Instance::start(
        RedisBackend::builder(redis.url()),
        parking(&parked, MINUTE),
        app.clone(),
    );
    let command_timeout = Duration::from_millis(300);
    let behind = Instance::start(
        RedisBackend::builder(proxy.url()).command_timeout(command_timeout),
        parking(&parked, MINUTE),
        app.clone(),
    );
    let client = HttpClient::new();

    // Stored through one instance, read and kept by the other.
    let first = client.get(&direct.url("/slow/k")).await.unwrap();
    assert_eq!(first.text(), "k run 1");
    let kept = client.get_all_ok(urls(&[&behind], "/slow/k", 2)).await;
    assert_all_served(&kept, "k run 1");

    // Both of `behind`'s connections go silent, and the value changes in Redis.
    proxy.blackhole();
    let cut = Instant::now();
    redis.cmd(&["DEL", &redis_key(&Key::new("/slow/k"), "resp")]);
    let changed = client.get(&direct.url("/slow/k")).await.unwrap();
    assert_eq!(changed.text(), "k run 2");
    let stale_for = eventually(SOON, "the old copy to go", || {
        let (client, url) = (client.clone(), behind.url("/slow/k"));
        async move {
            let reply = client.get(&url).await.ok()?;
            (reply.text() != "k run 1").then(|| cut.elapsed())
        }
    })
    .await;
    assert!(
        stale_for <= BOUND + command_timeout + Duration::from_millis(500),
        "a copy was served {stale_for:?} after its connections went silent"
    );

    // Once the connection is known dead, requests fail open at once instead of each waiting
    // for the command timeout.
    let mut probe = 0;
    eventually(SOON, "requests to fail open at once", || {
        probe += 1;
        let (client, url) = (client.clone(), behind.url(&format!("/slow/fast-{probe}")));
        async move {
            let reply = client.get(&url).await.ok()?;
            (reply.elapsed < Duration::from_millis(100)).then_some(())
        }
    })
    .await;

    // The proxy passes again: the backend comes back by itself and parks through Redis again.
    proxy.pass();
    let mut probe = 0;
    eventually(Duration::from_secs(15), "the backend to come back", || {
        probe += 1;
        let client = client.clone();
        let path = format!("/slow/back-{probe}");
        let (stored_at, read_at) = (direct.url(&path), behind.url(&path));
        async move {
            client.get(&stored_at).await.ok()?;
            let read = client.get(&read_at).await.ok()?;
            (read.outcome() == "hit").then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_connection_loses_no_wake_up() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    let app = gated_app(&runs, &gate);
    let parked = Tally::new();
    let lease = Duration::from_secs(10);
    let instances = leased_pair(&redis, lease, &parked, &app);
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let (leader, followers) =
        parked_behind_leader(&client, (&runs, &parked), a, &[b], "/slow/k", 3).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    // The subscribers come back (subscribed again) before the leader finishes.
    let subscribed = eventually(SOON, "both subscribers back", || {
        let clients = redis.cmd(&["CLIENT", "LIST", "TYPE", "pubsub"]).text();
        let subscribed = clients
            .lines()
            .filter(|line| line.contains("psub=4"))
            .count();
        async move { (subscribed == 2).then_some(()) }
    });
    subscribed.await;
    let released = Instant::now();
    gate.open();
    let followers = followers.await.unwrap();
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
    assert_all_served(&followers, "k run 1");
    assert_eq!(runs.get(), 1);
    assert!(
        released.elapsed() < BOUND + Duration::from_millis(500),
        "woken {:?} after the leader, with a {lease:?} lease",
        released.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_or_sleeping_redis_costs_at_most_the_command_timeout() {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let command_timeout = Duration::from_millis(300);
    let instances = start_instances(
        2,
        &redis,
        |b| b.command_timeout(command_timeout),
        || parking(&parked, MINUTE),
        &app,
    );
    let all: Vec<_> = instances.iter().collect();
    let client = HttpClient::new();

    for (fault, key) in [
        (&["CLIENT", "PAUSE", "1500", "ALL"][..], "paused"),
        (&["DEBUG", "SLEEP", "1.5"][..], "sleeping"),
    ] {
        let started = Instant::now();
        // DEBUG SLEEP blocks the connection it is sent on: from a thread of its own.
        let fault: Vec<String> = fault.iter().map(|arg| arg.to_string()).collect();
        let port = redis.port();
        let faulted = std::thread::spawn(move || {
            let args: Vec<&str> = fault.iter().map(String::as_str).collect();
            RedisServer::cmd_on_port(port, &args)
        });
        // Nothing tells that the server took the command (a paused or sleeping server answers
        // nobody): give it a moment. The bound holds either way; only the test's strength
        // depends on it.
        std::thread::sleep(Duration::from_millis(50));
        let replies = client
            .get_all_ok(urls(&all, &format!("/slow/{key}"), 3))
            .await;
        for reply in &replies {
            assert_eq!(reply.status, 200, "{reply:?}");
            assert!(
                reply.elapsed < command_timeout * 2 + Duration::from_millis(500),
                "{key}: answered in {:?}",
                reply.elapsed
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        faulted.join().unwrap();
    }
}

/// The leader's lock goes away under a follower parked in the other instance: `take_away`
/// removes it from `redis` and returns when it was gone (the lock's Redis key is given). The
/// follower takes over within the bound, not the lease (run 2), and the leader still answers.
async fn a_parked_follower_takes_over_a_lock_taken_away(
    enable_keyspace_events: bool,
    take_away: impl FnOnce(&RedisServer, &str) -> Instant,
) {
    let redis = RedisServer::start();
    let runs = Tally::new();
    let gate = Gate::new();
    // Only the first run is held: the leader that loses its lock.
    let app = first_run_gated_app(&runs, &gate);
    let parked = Tally::new();
    let lease = Duration::from_secs(10);
    let instances = start_instances(
        2,
        &redis,
        |b| {
            b.lease(lease)
                .enable_keyspace_events(enable_keyspace_events)
        },
        || parking(&parked, MINUTE),
        &app,
    );
    let (a, b) = (&instances[0], &instances[1]);
    let client = HttpClient::new();

    let leader = client.spawn_get(a.url("/slow/k"));
    runs.wait_for(1, SOON, "the leader's run").await;
    let follower = client.spawn_get(b.url("/slow/k"));
    parked.wait_for(1, SOON, "b parked").await;
    // Its wait looked at the lock (one script run), and sleeps until something changes.
    let before = redis.scripts_run();
    eventually(SOON, "b's first look at the lock", || {
        let looked = redis.scripts_run() > before;
        async move { looked.then_some(()) }
    })
    .await;
    let gone_at = take_away(&redis, &redis_key(&Key::new("/slow/k"), "lock"));
    let follower = follower.await.unwrap().unwrap();
    let waited = gone_at.elapsed();
    assert_eq!(
        follower.text(),
        "k run 2",
        "it took over once the lock was gone"
    );
    assert!(
        waited < BOUND + Duration::from_millis(700),
        "noticed {waited:?} after the lock went, with a {lease:?} lease"
    );
    gate.open();
    assert_eq!(leader.await.unwrap().unwrap().text(), "k run 1");
    assert_eq!(runs.get(), 2, "losing the lock costs one more run, no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_that_vanishes_without_a_notification_costs_a_re_check_not_the_lease() {
    // FLUSHALL removes the lock and sends no per-key notification (as an eviction without the
    // `e` flag would).
    a_parked_follower_takes_over_a_lock_taken_away(false, |redis, _| {
        let flushed = Instant::now();
        assert_eq!(redis.cmd(&["FLUSHALL"]).text(), "OK");
        flushed
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_evicted_under_maxmemory_wakes_its_waiters_with_the_e_flag() {
    // Allowed to set the flags: `e` (evicted) joins the ones it needs.
    a_parked_follower_takes_over_a_lock_taken_away(true, |redis, lock| {
        assert!(redis.config_get("notify-keyspace-events").contains('e'));
        // Fill Redis past a small maxmemory until allkeys-lru evicts the leader's lock.
        redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
        let used: u64 = redis
            .cmd(&["INFO", "memory"])
            .text()
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse().ok())
            .expect("used_memory");
        redis.cmd(&[
            "CONFIG",
            "SET",
            "maxmemory",
            &(used + 512 * 1024).to_string(),
        ]);
        let filler = "x".repeat(1024);
        let mut evicted_at = None;
        for i in 0..100_000 {
            redis.cmd(&["SET", &format!("filler:{i}"), &filler]);
            if i % 64 == 0 && redis.cmd(&["EXISTS", lock]).integer() == 0 {
                evicted_at = Some(Instant::now());
                break;
            }
        }
        let evicted_at = evicted_at.expect("the lock was evicted");
        redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
        evicted_at
    })
    .await;
}

/// A connection that drops after Redis ran an acquisition but before its reply arrived: the
/// client sends the command again on a new connection. The caller must still learn that it leads
/// (and store), not find its own lock held by "another" leader and wait out the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquisition_sent_again_after_a_dropped_reply_still_leads() {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(redis.port()).await;
    let lease = Duration::from_secs(30);
    let behind = RedisBackend::builder(proxy.url())
        .lease(lease)
        .command_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("the backend behind the proxy");
    let direct = RedisBackend::builder(redis.url())
        .build()
        .await
        .expect("the backend on Redis");
    let key = Key::new("/resent");
    let lock = redis_key(&key, "lock");

    // The server knows the script (a first `EVALSHA` would only hear `NOSCRIPT`).
    acquired(
        behind
            .acquire(&Key::new("/warm"), lease, Lookup::Check)
            .await
            .unwrap(),
    );

    proxy.mute_replies();
    let acquisition = tokio::spawn({
        let (behind, key) = (behind.clone(), key.clone());
        async move { behind.acquire(&key, lease, Lookup::Check).await }
    });
    // Redis ran it: the lock is there, and its reply is lost with the connection.
    eventually(SOON, "the acquisition to run in Redis", || {
        let taken = redis.cmd(&["EXISTS", &lock]) == Resp::Integer(1);
        async move { taken.then_some(()) }
    })
    .await;
    proxy.pass();
    proxy.reset();

    let started = Instant::now();
    let lease_taken = acquired(
        acquisition
            .await
            .unwrap()
            .expect("the acquisition answered"),
    );
    assert!(
        started.elapsed() < lease / 2,
        "answered after {:?}, not at the end of the lease",
        started.elapsed()
    );
    assert!(behind
        .complete(
            &lease_taken,
            sealed(&lease_taken, MINUTE, b"stored"),
            MINUTE
        )
        .await
        .expect("the leader stores"));
    match direct.acquire(&key, lease, Lookup::Check).await.unwrap() {
        Acquire::Fresh(value) => assert_eq!(payload(&value), "stored"),
        other => panic!("expected the leader's value, got {other:?}"),
    }
}
