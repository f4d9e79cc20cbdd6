//! The Redis backend on a real Redis Cluster (6 nodes: 3 primaries, 3 replicas) and a real
//! Sentinel set (a primary, a replica, 3 sentinels), started by `support::redis_cluster`
//! (issue 10): one run per key across instances and primaries, and at most one extra run, with
//! every request answered within lease + failover time + 1 s, through a killed primary, a slot
//! migrated away (or left half-migrated), a `SENTINEL FAILOVER` and a killed Sentinel primary;
//! and a local window that serves nothing the new primary no longer holds beyond its bound.
#![cfg(feature = "redis")]

mod support;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use support::{
    eventually,
    fleet::{
        assert_all_served, first_run_gated_app, outcomes, parked_behind_leader, parking, slow_app,
        start_instances_on, urls, SOON,
    },
    redis_cluster::{spread, RedisCluster, SentinelSet},
    redis_key, Gate, HttpClient, Instance, RedisServer, Reply, Tally,
};
use tower_parking::{Key, RedisBackend, RedisSetupError};

const MINUTE: Duration = Duration::from_secs(60);

/// The lease of the fault tests: how long followers of a leader whose lock was lost may wait.
const LEASE: Duration = Duration::from_secs(2);

/// The command timeout of the fault tests: longer than a failover, as the README advises, so
/// that parked requests ride it out. A killed primary's failover takes 4-4.5 s here, and longer
/// on a loaded machine: with 5 s, a follower sometimes gave up and ran the work a third time.
const RIDE_OUT_TIMEOUT: Duration = Duration::from_secs(10);

/// The notification flags the backend needs.
fn has_flags(flags: &str) -> bool {
    "Kg$x".chars().all(|flag| flags.contains(flag)) || flags.contains('A')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_run_each_of_twenty_keys_once_across_three_primaries() {
    let cluster = RedisCluster::start();
    let paths: Vec<String> = (0..20).map(|i| format!("/slow/k{i}")).collect();
    let locks: Vec<String> = paths
        .iter()
        .map(|path| redis_key(&Key::new(path.as_str()), "lock"))
        .collect();
    let owners = spread(&cluster, &locks);
    assert_eq!(owners.len(), 3, "the keys cover every primary: {owners:?}");

    let runs = Tally::new();
    let gate = Gate::new();
    let app = slow_app(&runs, {
        let gate = gate.clone();
        move |_, _| {
            let gate = gate.clone();
            async move { gate.wait().await }
        }
    });
    let parked = Tally::new();
    let instances = start_instances_on(4, &cluster.url(), |b| b, || parking(&parked, MINUTE), &app);
    let all: Vec<&Instance> = instances.iter().collect();
    let client = HttpClient::new();
    // 100 concurrent requests per instance: 5 for each of the 20 keys.
    let requests: Vec<String> = paths.iter().flat_map(|path| urls(&all, path, 5)).collect();
    let burst = client.spawn_get_all_ok(requests.clone());
    for instance in &all {
        instance.waiting().wait_for(100, SOON, "requests in").await;
    }
    runs.wait_for(20, SOON, "one leader per key").await;
    gate.open();
    let replies = burst.await.unwrap();
    assert_eq!(runs.get(), 20, "{:?}", outcomes(&replies));
    let mut bodies: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (url, reply) in requests.iter().zip(&replies) {
        assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
        let path = url.split_once("/slow/").unwrap().1.to_owned();
        bodies.entry(path).or_default().push(reply.text());
    }
    for (key, bodies) in bodies {
        assert!(
            bodies
                .iter()
                .all(|body| *body == bodies[0] && body.starts_with(&key)),
            "{key}: {bodies:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_names_every_primary_without_flags_and_enabling_sets_every_node() {
    let cluster = RedisCluster::start_with(&["--notify-keyspace-events", ""]);
    let error = RedisBackend::builder(cluster.url())
        .build()
        .await
        .expect_err("no node has the flags");
    let message = error.to_string();
    match &error {
        RedisSetupError::NodesLackKeyspaceEvents { nodes } => {
            assert_eq!(nodes.len(), 3, "{message}")
        }
        other => panic!("expected NodesLackKeyspaceEvents, got {other:?}"),
    }
    for primary in cluster.primaries() {
        assert!(
            message.contains(&format!("127.0.0.1:{primary}")),
            "{message}"
        );
    }

    let backend = RedisBackend::builder(cluster.url())
        .enable_keyspace_events(true)
        .build()
        .await
        .expect("enabled on every node");
    for node in cluster.nodes() {
        let flags = node.config_get("notify-keyspace-events");
        assert!(has_flags(&flags), "node {}: {flags:?}", node.port());
    }
    drop(backend);
}

/// One key's flight across 4 instances, with `fault` striking while the leader runs and the other
/// instances' requests are parked; `fault` returns how long the failover took. Asserts every
/// request is answered, at most 2 runs, and none later than lease + failover + 1 s after the
/// fault.
async fn parked_through_a_fault(url: String, key_path: &str, fault: impl FnOnce() -> Duration) {
    let runs = Tally::new();
    let gate = Gate::new();
    let app = first_run_gated_app(&runs, &gate);
    let parked = Tally::new();
    let instances = start_instances_on(
        4,
        &url,
        |b| b.lease(LEASE).command_timeout(RIDE_OUT_TIMEOUT),
        || parking(&parked, MINUTE),
        &app,
    );
    let all: Vec<&Instance> = instances.iter().collect();
    let client = HttpClient::new();
    let (leader, followers) =
        parked_behind_leader(&client, (&runs, &parked), all[0], &all[1..], key_path, 10).await;

    let struck = Instant::now();
    let failover = tokio::task::block_in_place(fault);
    gate.open();
    let followers = followers.await.unwrap();
    let leader = leader.await.unwrap().expect("the leader is answered");
    let took = struck.elapsed();
    let bound = LEASE + failover + Duration::from_secs(1);
    let mut replies = followers;
    replies.push(leader);
    for reply in &replies {
        assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
    }
    assert!(
        runs.get() <= 2,
        "{} runs: {:?}",
        runs.get(),
        outcomes(&replies)
    );
    assert!(
        took <= bound,
        "answered {took:?} after the fault; bound {bound:?} (failover {failover:?})"
    );
    eprintln!(
        "{key_path}: runs {}, answered {took:?} after the fault (failover {failover:?}, bound {bound:?}), {:?}",
        runs.get(),
        outcomes(&replies)
    );
    if runs.get() == 1 {
        assert_all_served(&replies, &format!("{} run 1", &key_path[6..]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_primary_of_a_parked_key_costs_at_most_one_run() {
    let mut cluster = RedisCluster::start();
    let path = "/slow/k";
    let slot = cluster.keyslot(&redis_key(&Key::new(path), "lock"));
    let url = cluster.url();
    parked_through_a_fault(url, path, || {
        let primary = cluster.owner(slot);
        let killed = Instant::now();
        cluster.kill(primary);
        cluster.wait_for_failover(slot, primary);
        killed.elapsed()
    })
    .await;
}

/// The `cmdstat_evalsha` line of a node's `INFO commandstats` (every read of the backend is a
/// script): unchanged across a request, the request was answered without asking that node.
fn scripts_run_on(node: &RedisServer) -> Option<String> {
    node.cmd(&["INFO", "commandstats"])
        .text()
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"))
        .map(str::to_owned)
}

/// `instance`'s answer to `path` if it came from its local window: a `200` hit with `body` for
/// which `primary`, the owner of the key's slot, ran no script.
async fn from_window(
    client: &HttpClient,
    instance: &Instance,
    primary: &RedisServer,
    path: &str,
    body: &str,
) -> Option<Reply> {
    let before = scripts_run_on(primary);
    let reply = client.get(&instance.url(path)).await.unwrap();
    assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
    (reply.outcome() == "hit" && reply.text() == body && scripts_run_on(primary) == before)
        .then_some(reply)
}

/// Asks `instance` for `path` every 20 ms from `removed` on, until it answers something else than
/// `body`, every answer a `200`: how long after `removed` it last answered `body` (if it did),
/// and the answer that followed.
async fn served_after(
    client: &HttpClient,
    instance: &Instance,
    path: &str,
    body: &str,
    removed: Instant,
) -> (Option<Duration>, String) {
    let mut served_for = None;
    loop {
        let reply = client.get(&instance.url(path)).await.unwrap();
        assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
        if reply.text() != body {
            return (served_for, reply.text());
        }
        served_for = Some(removed.elapsed());
        assert!(
            removed.elapsed() < SOON,
            "{body:?} still served {:?} after it was removed",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Users rely on the local window staying coherent through a failover: once the primary that
/// took over no longer holds a response, no instance serves it from its local window for longer
/// than the staleness bound the backend documents (`local_window_staleness`, 1 s by default).
/// The key is in the second instance's window when its primary dies, and again, read from the
/// new primary, when the new primary deletes it: first with the notification that drops the
/// copy, then without (a promoted replica whose notification flags were never set), when only
/// the bound does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_local_window_serves_a_deleted_response_no_longer_than_its_bound() {
    /// The backend's default `local_window_staleness`.
    const BOUND: Duration = Duration::from_secs(1);
    /// Allowed on top of the bound on a loaded 2-core machine (a slow request, a late beat).
    const MARGIN: Duration = Duration::from_secs(1);
    let mut cluster = RedisCluster::start();
    let path = "/slow/k";
    let resp = redis_key(&Key::new(path), "resp");
    let slot = cluster.keyslot(&resp);
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let instances = start_instances_on(2, &cluster.url(), |b| b, || parking(&parked, MINUTE), &app);
    let (first, second) = (&instances[0], &instances[1]);
    let client = HttpClient::new();
    let reply = client.get(&first.url(path)).await.unwrap();
    assert_eq!(
        (reply.outcome(), reply.text().as_str()),
        ("miss", "k run 1")
    );

    let old = cluster.owner(slot);
    eventually(SOON, "the key in the window", || {
        from_window(&client, second, cluster.node(old), path, "k run 1")
    })
    .await;
    let new = tokio::task::block_in_place(|| {
        cluster.wait_for_replica(old);
        cluster.kill(old);
        cluster.wait_for_failover(slot, old)
    });
    let primary = cluster.node(new);
    assert_eq!(
        primary.cmd(&["EXISTS", &resp]).integer(),
        1,
        "the replica that took over holds the response"
    );

    let mut body = "k run 1".to_owned();
    for notified in [true, false] {
        // Served from the window: a copy read from the new primary, trusted only while the
        // backend hears the new primary's notifications.
        eventually(SOON, "the key in the window after the failover", || {
            from_window(&client, second, primary, path, &body)
        })
        .await;
        if !notified {
            let off = primary.cmd(&["CONFIG", "SET", "notify-keyspace-events", ""]);
            assert_eq!(off.text(), "OK");
        }
        let deleted = Instant::now();
        assert_eq!(primary.cmd(&["DEL", &resp]).integer(), 1);
        let (served_for, next) = served_after(&client, second, path, &body, deleted).await;
        eprintln!("notified {notified}: {body:?} served for {served_for:?} after its deletion");
        assert!(
            served_for.is_none_or(|served_for| served_for <= BOUND + MARGIN),
            "notified {notified}: {body:?} served {served_for:?} after the new primary deleted \
             it; bound {BOUND:?} + {MARGIN:?}"
        );
        assert!(next.starts_with("k run "), "{next:?}");
        body = next;
    }
}

/// The followers woken by `MIGRATE`'s deletions look again while the slot is `MIGRATING`, and
/// Redis redirects them with `ASK` (with one attempt per command, fred 10.1 stopped the whole
/// client on that, and every instance ran the key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_the_slot_of_a_parked_key_costs_at_most_one_run() {
    let cluster = RedisCluster::start();
    let path = "/slow/k";
    let slot = cluster.keyslot(&redis_key(&Key::new(path), "lock"));
    let url = cluster.url();
    parked_through_a_fault(url, path, || {
        let from = cluster.owner(slot);
        let to = cluster.other_primary(from);
        let started = Instant::now();
        cluster.migrate_slot(slot, from, to);
        assert_eq!(cluster.owner(slot), to);
        started.elapsed()
    })
    .await;
}

/// A reshard that stopped half-way (its tool crashed) leaves a slot `MIGRATING` with its keys on
/// the new node, until an operator fixes it. Commands for that slot's keys bounce between the two
/// nodes (fred 10.1 sends them back to the old one after `ASKING` the new one): such requests are
/// served without the fleet within the command timeout, the backend's other keys keep their
/// fleet, and the slot's keys have it back once the migration is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_left_migrating_fails_open_for_its_keys_only() {
    const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
    let cluster = RedisCluster::start();
    let (stuck, other) = ("/slow/stuck", "/slow/other");
    let slot = cluster.keyslot(&redis_key(&Key::new(stuck), "lock"));
    assert_ne!(
        cluster.owner(slot),
        cluster.owner(cluster.keyslot(&redis_key(&Key::new(other), "lock"))),
        "the two keys live on different primaries"
    );
    let runs = Tally::new();
    let app = slow_app(&runs, |_, _| async {});
    let parked = Tally::new();
    let instances = start_instances_on(
        2,
        &cluster.url(),
        |b| b.command_timeout(COMMAND_TIMEOUT),
        || parking(&parked, MINUTE),
        &app,
    );
    let (first, second) = (&instances[0], &instances[1]);
    let client = HttpClient::new();
    for path in [stuck, other] {
        let reply = client.get(&first.url(path)).await.unwrap();
        assert_eq!(reply.outcome(), "miss", "{reply:?}");
    }
    assert_eq!(runs.get(), 2);

    let from = cluster.owner(slot);
    let to = cluster.other_primary(from);
    cluster.begin_migration(slot, from, to);

    // The second instance has neither key in its local window: it asks the cluster.
    let asked = Instant::now();
    let reply = client.get(&second.url(stuck)).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(reply.status.as_u16(), 200, "{reply:?}");
    assert_eq!(reply.text(), "stuck run 3", "served by a run of its own");
    assert!(
        took < COMMAND_TIMEOUT * 2,
        "answered after {took:?}; command timeout {COMMAND_TIMEOUT:?}"
    );
    let reply = client.get(&second.url(other)).await.unwrap();
    assert_eq!(
        (reply.outcome(), reply.text().as_str()),
        ("hit", "other run 2"),
        "the backend still reaches the cluster for other slots"
    );

    cluster.finish_migration(slot, from, to);
    let reply = client.get(&second.url(stuck)).await.unwrap();
    assert_eq!(
        (reply.outcome(), reply.text().as_str()),
        ("hit", "stuck run 1"),
        "the stored response moved with its slot, and the key is back in the fleet"
    );
    assert_eq!(runs.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_mid_flight_costs_at_most_one_run() {
    let sentinels = SentinelSet::start();
    let url = sentinels.url();
    parked_through_a_fault(url, "/slow/k", || {
        let old = sentinels.primary_port();
        let started = Instant::now();
        sentinels.failover();
        sentinels.wait_for_failover(old);
        started.elapsed()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_sentinel_primary_mid_flight_costs_at_most_one_run() {
    // Without notifications on either node: the first backend turns them on on both.
    let mut sentinels = SentinelSet::start_with(&["--notify-keyspace-events", ""]);
    let url = sentinels.url();
    let backend = RedisBackend::builder(&url)
        .enable_keyspace_events(true)
        .build()
        .await
        .expect("the backend on the Sentinel set");
    parked_through_a_fault(url, "/slow/k", || {
        let old = sentinels.primary_port();
        let started = Instant::now();
        sentinels.kill(old);
        let new = sentinels.wait_for_failover(old);
        // The new primary has the flags: set on the replica by the first backend, or on the new
        // primary when the backends connected to it.
        let flags = sentinels.server(new).config_get("notify-keyspace-events");
        assert!(has_flags(&flags), "{flags:?}");
        started.elapsed()
    })
    .await;
    drop(backend);
}
