//! The Redis backend's protocol, operation by operation, against a real `redis-server` that each
//! test starts on its own free port (never the machine's own Redis).
#![cfg(feature = "redis")]

use std::time::Duration;

use bytes::Bytes;
use fred::{
    prelude::{Client, ClientLike, Config, KeysInterface},
    types::{CustomCommand, Expiration, Value},
};
use tokio::time::Instant;
use tower_parking::{
    backend::{Acquire, Lease, Lookup, Wake},
    Backend, BackendError, FailurePolicy, Key, RedisBackend, RedisSetupError,
};

mod support;

use support::{acquired, entry, eventually, payload, redis_key, sealed, RedisServer, TempDir};

/// A plain client, to look at and poke the server from outside the backend.
async fn inspector(server: &RedisServer) -> Client {
    let client = Client::new(Config::from_url(&server.url()).unwrap(), None, None, None);
    client.init().await.expect("the inspector connects");
    client
}

async fn command(client: &Client, name: &'static str, args: Vec<&str>) -> Value {
    client
        .custom(CustomCommand::new_static(name, None::<u16>, false), args)
        .await
        .unwrap_or_else(|error| panic!("{name}: {error}"))
}

/// The connections the server has open, without the inspector's own.
async fn connections(inspector: &Client) -> Vec<String> {
    let list = command(inspector, "CLIENT", vec!["LIST"]).await;
    let list = list.as_string().unwrap();
    list.lines()
        .filter(|line| !line.contains("cmd=client"))
        .map(str::to_owned)
        .collect()
}

async fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::builder(server.url())
        .build()
        .await
        .expect("the backend builds")
}

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

#[tokio::test]
async fn one_leader_then_the_stored_value_for_everyone() {
    let server = RedisServer::start();
    let (a, b) = (backend(&server).await, backend(&server).await);
    let key = Key::new("GET /report");

    let lease = acquired(a.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    match b.acquire(&key, LEASE, Lookup::Check).await.unwrap() {
        Acquire::Held { expires_in, .. } => assert!(
            expires_in > LEASE - Duration::from_secs(1) && expires_in <= LEASE,
            "{expires_in:?}"
        ),
        other => panic!("a second caller must find the lock held, got {other:?}"),
    }
    assert!(a
        .complete(&lease, sealed(&lease, TTL, b"report"), TTL)
        .await
        .unwrap());
    for backend in [&a, &b] {
        match backend.acquire(&key, LEASE, Lookup::Check).await.unwrap() {
            Acquire::Fresh(value) => assert_eq!(payload(&value), "report"),
            other => panic!("expected the stored value, got {other:?}"),
        }
    }

    // The Redis keys are hashed and hash-tagged; the lock is gone, the value has its TTL.
    let inspector = inspector(&server).await;
    let resp: Option<String> = inspector.get(redis_key(&key, "resp")).await.unwrap();
    let resp = resp.expect("stored");
    assert!(
        resp.starts_with("0 TP2 ") && resp.ends_with("\nreport"),
        "generation 0 and the entry: {resp}"
    );
    let lock_exists: i64 = inspector.exists(redis_key(&key, "lock")).await.unwrap();
    assert_eq!(lock_exists, 0);
    let pttl: i64 = inspector.pttl(redis_key(&key, "resp")).await.unwrap();
    assert!(pttl > 59_000 && pttl <= 60_000, "{pttl}");

    // `Skip` ignores the stored value (it did not decode) and leads.
    let lease = acquired(b.acquire(&key, LEASE, Lookup::Skip).await.unwrap());
    assert!(lease.fence() > 0);
}

#[tokio::test]
async fn a_fenced_out_leader_cannot_store_or_renew() {
    let server = RedisServer::start();
    let (a, b) = (backend(&server).await, backend(&server).await);
    let key = Key::new("fenced");
    let short = Duration::from_millis(200);

    let stale = acquired(a.acquire(&key, short, Lookup::Check).await.unwrap());
    // The leader stalls past its lease: the lock expires and another caller takes over.
    assert!(matches!(
        b.wait(&key, Lookup::Check, None).await.unwrap(),
        Wake::Released
    ));
    let later = acquired(b.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    assert!(later.fence() > stale.fence());

    assert!(!a.renew(&stale).await.unwrap(), "the stale lease renewed");
    assert!(
        !a.complete(&stale, sealed(&stale, TTL, b"stale"), TTL)
            .await
            .unwrap(),
        "the stale leader stored over a live one"
    );
    assert!(b
        .complete(&later, sealed(&later, TTL, b"fresh"), TTL)
        .await
        .unwrap());
    // Even after the later leader finished, the stale one is still refused.
    assert!(!a
        .complete(&stale, sealed(&stale, TTL, b"stale"), TTL)
        .await
        .unwrap());
    match a.acquire(&key, LEASE, Lookup::Check).await.unwrap() {
        Acquire::Fresh(value) => assert_eq!(payload(&value), "fresh"),
        other => panic!("expected the later leader's value, got {other:?}"),
    }
}

#[tokio::test]
async fn a_leader_that_lost_its_lease_to_nobody_may_still_store() {
    let server = RedisServer::start();
    let a = backend(&server).await;
    let key = Key::new("late but alone");
    let lease = acquired(
        a.acquire(&key, Duration::from_millis(100), Lookup::Check)
            .await
            .unwrap(),
    );
    assert!(matches!(
        a.wait(&key, Lookup::Check, None).await.unwrap(),
        Wake::Released
    ));
    assert!(a
        .complete(&lease, sealed(&lease, TTL, b"late"), TTL)
        .await
        .unwrap());
}

#[tokio::test]
async fn invalidate_forgets_the_value_and_fences_out_the_running_leader() {
    let server = RedisServer::start();
    let a = backend(&server).await;
    let key = Key::new("invalidated");

    let first = acquired(a.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    assert!(a
        .complete(&first, sealed(&first, TTL, b"old"), TTL)
        .await
        .unwrap());
    let running = acquired({
        a.invalidate(&key).await.unwrap();
        a.acquire(&key, LEASE, Lookup::Check).await.unwrap()
    });
    a.invalidate(&key).await.unwrap();
    assert!(
        !a.complete(&running, sealed(&running, TTL, b"stale"), TTL)
            .await
            .unwrap(),
        "a leader that started before the invalidation stored its value"
    );
    assert!(matches!(
        a.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Acquired(..)
    ));
}

#[tokio::test]
async fn renewal_keeps_the_lock_past_its_lease() {
    let server = RedisServer::start();
    let (a, b) = (backend(&server).await, backend(&server).await);
    let key = Key::new("long work");
    let lease_time = Duration::from_millis(300);
    let lease = acquired(a.acquire(&key, lease_time, Lookup::Check).await.unwrap());

    let started = Instant::now();
    let mut renewals = tokio::time::interval(lease_time / 3);
    while started.elapsed() < lease_time * 4 {
        renewals.tick().await;
        assert!(
            a.renew(&lease).await.unwrap(),
            "a held lease was not renewed"
        );
        assert!(
            matches!(
                b.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
                Acquire::Held { .. }
            ),
            "the lock was lost while renewed"
        );
    }
    let impostor = Lease::new(key.clone(), lease.fence(), "not-the-token", lease_time);
    assert!(!a.renew(&impostor).await.unwrap());
    a.release(&impostor).await.unwrap();
    assert!(matches!(
        b.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Held { .. }
    ));
    a.release(&lease).await.unwrap();
    assert!(matches!(
        b.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Acquired(..)
    ));
}

/// Starts `follower.wait(key)` on its own task once the key's lock is held, and gives it time to
/// park (there is no signal for "parked": either way the wait must end fast, the pause only makes
/// the notification the likely path).
async fn parked_waiter(
    follower: &RedisBackend,
    key: &Key,
    deadline: Option<Instant>,
) -> tokio::task::JoinHandle<(Result<Wake, BackendError>, Instant)> {
    let (follower, key) = (follower.clone(), key.clone());
    let waiter = tokio::spawn(async move {
        let wake = follower.wait(&key, Lookup::Check, deadline).await;
        (wake, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiter
}

#[tokio::test]
async fn a_parked_follower_wakes_on_complete_long_before_the_lease() {
    let server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("GET /slow");
    let lease = acquired(leader.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let waiter = parked_waiter(&follower, &key, None).await;
    assert_eq!(follower.waiting_keys(), 1);

    let completed = Instant::now();
    assert!(leader
        .complete(&lease, sealed(&lease, TTL, b"done"), TTL)
        .await
        .unwrap());
    let (wake, woken) = waiter.await.unwrap();
    let wake = wake.unwrap();
    match wake {
        Wake::Stored(value) => assert_eq!(payload(&value), "done"),
        other => panic!("expected the stored value, got {other:?}"),
    }
    let latency = woken - completed;
    // Without the notification it would sleep until the lease (10 s) ran out.
    assert!(
        latency < Duration::from_millis(200),
        "woken {latency:?} after complete"
    );
    assert_eq!(
        follower.waiting_keys(),
        0,
        "the waiter's registration leaked"
    );
}

#[tokio::test]
async fn a_parked_follower_wakes_on_release() {
    let server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("GET /fails");
    let lease = acquired(leader.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let waiter = parked_waiter(&follower, &key, None).await;

    let released = Instant::now();
    leader.release(&lease).await.unwrap();
    let (wake, woken) = waiter.await.unwrap();
    let wake = wake.unwrap();
    assert!(matches!(wake, Wake::Released), "{wake:?}");
    let latency = woken - released;
    assert!(
        latency < Duration::from_millis(200),
        "woken {latency:?} after release"
    );
}

#[tokio::test]
async fn a_wait_that_starts_after_the_leader_finished_returns_at_once() {
    let server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("raced");
    let lease = acquired(leader.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    assert!(matches!(
        follower.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Held { .. }
    ));
    // The leader finishes between the follower's failed acquire and its wait.
    assert!(leader
        .complete(&lease, sealed(&lease, TTL, b"v"), TTL)
        .await
        .unwrap());
    let started = Instant::now();
    let wake = follower
        .wait(
            &key,
            Lookup::Check,
            Some(Instant::now() + Duration::from_secs(5)),
        )
        .await
        .unwrap();
    assert!(matches!(wake, Wake::Stored(_)), "{wake:?}");
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test]
async fn a_dead_leaders_lock_ends_the_wait_when_it_expires() {
    let server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("orphaned");
    let lease_time = Duration::from_millis(500);
    let _never_renewed = acquired(
        leader
            .acquire(&key, lease_time, Lookup::Check)
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let wake = follower.wait(&key, Lookup::Check, None).await.unwrap();
    let waited = started.elapsed();
    assert!(matches!(wake, Wake::Released), "{wake:?}");
    assert!(
        waited >= lease_time - Duration::from_millis(50)
            && waited < lease_time + Duration::from_millis(300),
        "waited {waited:?} for a {lease_time:?} lease"
    );
}

#[tokio::test]
async fn the_deadline_ends_a_wait_on_a_live_leader() {
    let server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("patience");
    let _lease = acquired(leader.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let started = Instant::now();
    let timeout = Duration::from_millis(300);
    let wake = follower
        .wait(&key, Lookup::Check, Some(started + timeout))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(matches!(wake, Wake::TimedOut), "{wake:?}");
    assert!(
        waited >= timeout && waited < timeout + Duration::from_millis(100),
        "waited {waited:?}"
    );
}

#[tokio::test]
async fn two_connections_per_backend_however_many_waits() {
    let server = RedisServer::start();
    let inspector = inspector(&server).await;
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    assert_eq!(connections(&inspector).await.len(), 4, "two backends");

    let keys: Vec<Key> = (0..200)
        .map(|i| Key::new(format!("GET /item/{}", i % 50)))
        .collect();
    let mut leases = Vec::new();
    for key in &keys[..50] {
        leases.push(acquired(
            leader.acquire(key, LEASE, Lookup::Check).await.unwrap(),
        ));
    }
    let waiters: Vec<_> = keys
        .iter()
        .map(|key| {
            let (follower, key) = (follower.clone(), key.clone());
            tokio::spawn(async move { follower.wait(&key, Lookup::Check, None).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(follower.waiting_keys(), 50);

    let open = connections(&inspector).await;
    assert_eq!(open.len(), 4, "200 waits opened connections: {open:#?}");
    let subscribers = open
        .iter()
        .filter(|line| line.contains("psub=4") && line.contains(" sub=0 "))
        .count();
    assert_eq!(
        subscribers, 2,
        "one subscriber (entries, locks, generations, its canaries: 4 patterns) per backend: {open:#?}"
    );

    let completed = Instant::now();
    for lease in &leases {
        let value = Bytes::from(format!("value of {}", lease.key()));
        assert!(leader
            .complete(lease, sealed(lease, TTL, &value), TTL)
            .await
            .unwrap());
    }
    for (key, waiter) in keys.iter().zip(waiters) {
        match waiter.await.unwrap() {
            Wake::Stored(value) => assert_eq!(payload(&value), format!("value of {key}")),
            other => panic!("expected the stored value, got {other:?}"),
        }
    }
    let all_woken = completed.elapsed();
    assert!(
        all_woken < Duration::from_secs(1),
        "200 waiters woken in {all_woken:?}"
    );
    assert_eq!(follower.waiting_keys(), 0);
    assert_eq!(connections(&inspector).await.len(), 4);
}

#[tokio::test]
async fn redis_down_fails_fast_and_a_restarted_redis_is_picked_up() {
    let mut server = RedisServer::start();
    let (leader, follower) = (backend(&server).await, backend(&server).await);
    let key = Key::new("outage");
    let _lease = acquired(leader.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let waiter = parked_waiter(&follower, &key, None).await;

    let killed = Instant::now();
    server.kill();
    // The parked waiter hears the subscriber drop, re-checks, waits out what could be a blip
    // (the 1 s command timeout), and fails: its caller's failure policy applies long before the
    // 10 s lease would have ended the wait.
    let (waited, failed) = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("a wait hung while Redis was down")
        .unwrap();
    assert!(waited.is_err(), "{waited:?}");
    assert!(
        failed - killed < Duration::from_millis(1_500),
        "{:?}",
        failed - killed
    );
    let started = Instant::now();
    assert!(follower.wait(&key, Lookup::Check, None).await.is_err());
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let error = follower
        .acquire(&key, LEASE, Lookup::Check)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(1_100), "{error}");
    assert_eq!(follower.failure_policy(), FailurePolicy::FailOpen);

    server.restart();
    // Bounded: the backends must come back by themselves within a few seconds.
    let (restarted, reconnect_within) = (Instant::now(), Duration::from_secs(5));
    let lease = acquired(
        eventually(
            reconnect_within,
            "the backend to reconnect to the restarted Redis",
            || async { leader.acquire(&key, LEASE, Lookup::Check).await.ok() },
        )
        .await,
    );
    // The subscription is back too: a parked follower wakes on the notification.
    eventually(
        reconnect_within.saturating_sub(restarted.elapsed()),
        "the follower to reconnect",
        || async { follower.acquire(&key, LEASE, Lookup::Check).await.ok() },
    )
    .await;
    let waiter = parked_waiter(&follower, &key, None).await;
    let completed = Instant::now();
    assert!(leader
        .complete(&lease, sealed(&lease, TTL, b"back"), TTL)
        .await
        .unwrap());
    let (wake, woken) = waiter.await.unwrap();
    let wake = wake.unwrap();
    assert!(matches!(wake, Wake::Stored(_)), "{wake:?}");
    assert!(
        woken - completed < Duration::from_millis(200),
        "{:?}",
        woken - completed
    );
}

#[tokio::test]
async fn a_slow_redis_fails_each_command_within_the_timeout() {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .command_timeout(Duration::from_millis(300))
        .failure_policy(FailurePolicy::FailClosed)
        .build()
        .await
        .unwrap();
    let other = RedisBackend::connect(&server.url()).await.unwrap();
    assert_eq!(backend.failure_policy(), FailurePolicy::FailClosed);
    let inspector = inspector(&server).await;
    let key = Key::new("slow");
    let _: Value = command(&inspector, "CLIENT", vec!["PAUSE", "1000", "ALL"]).await;

    let started = Instant::now();
    let result = backend.acquire(&key, LEASE, Lookup::Check).await;
    let took = started.elapsed();
    assert!(result.is_err(), "{result:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(500),
        "a 300 ms timeout took {took:?}"
    );

    // Redis runs the timed-out acquire once the pause ends, and drops its lock right after: the
    // next caller leads at once instead of waiting out a lease nobody uses.
    let _: Value = command(&inspector, "PING", vec![]).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(matches!(
        other.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Acquired(..)
    ));
}

#[tokio::test]
async fn a_fence_counter_created_again_still_only_grows() {
    let server = RedisServer::start();
    let backend = backend(&server).await;
    let inspector = inspector(&server).await;
    let key = Key::new("forgotten fence");
    let first = acquired(backend.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    backend.release(&first).await.unwrap();
    // As if the counter expired while the first leader stalled.
    let deleted: i64 = inspector.del(redis_key(&key, "fence")).await.unwrap();
    assert_eq!(deleted, 1);
    let second = acquired(backend.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    assert!(second.fence() > first.fence(), "{second:?} after {first:?}");
    backend.release(&second).await.unwrap();
    assert!(
        !backend
            .complete(&first, sealed(&first, TTL, b"stale"), TTL)
            .await
            .unwrap(),
        "a stale leader passed for a later one"
    );
}

#[tokio::test]
async fn scripts_are_loaded_again_after_a_script_flush() {
    let server = RedisServer::start();
    let backend = backend(&server).await;
    let inspector = inspector(&server).await;
    let _: Value = command(&inspector, "SCRIPT", vec!["FLUSH"]).await;
    let lease = acquired(
        backend
            .acquire(&Key::new("k"), LEASE, Lookup::Check)
            .await
            .unwrap(),
    );
    assert!(backend
        .complete(&lease, sealed(&lease, TTL, b"v"), TTL)
        .await
        .unwrap());
}

#[tokio::test]
async fn keyspace_events_off_fail_the_build_with_what_to_set() {
    let server = RedisServer::start_with(&["--notify-keyspace-events", "Ex"]);
    let error = RedisBackend::connect(&server.url()).await.unwrap_err();
    match &error {
        RedisSetupError::KeyspaceEventsDisabled { current, needed } => {
            assert_eq!(current, "xE");
            assert_eq!(needed, "xEKg$");
        }
        other => panic!("expected KeyspaceEventsDisabled, got {other:?}"),
    }
    let message = error.to_string();
    for part in [
        "notify-keyspace-events",
        "\"xE\"",
        "CONFIG SET notify-keyspace-events 'xEKg$'",
        ".enable_keyspace_events(true)",
    ] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }

    // A failed build leaves no connection behind.
    let inspector = inspector(&server).await;
    eventually(
        Duration::from_secs(2),
        "the failed build to close its connections",
        || async { connections(&inspector).await.is_empty().then_some(()) },
    )
    .await;

    // Asked to, the backend turns on what is missing and keeps what was there.
    let backend = RedisBackend::builder(server.url())
        .enable_keyspace_events(true)
        .build()
        .await
        .expect("enabling keyspace events");
    let setting = command(&inspector, "CONFIG", vec!["GET", "notify-keyspace-events"]).await;
    let value = setting
        .into_array()
        .pop()
        .and_then(|value| value.as_string())
        .unwrap();
    for flag in ['K', 'g', '$', 'x', 'E'] {
        assert!(value.contains(flag), "{flag} missing from {value:?}");
    }
    // And waits work on it.
    let key = Key::new("enabled");
    let lease = acquired(backend.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let waiter = parked_waiter(&backend, &key, None).await;
    backend.release(&lease).await.unwrap();
    let (wake, _) = tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .unwrap()
        .unwrap();
    let wake = wake.unwrap();
    assert!(matches!(wake, Wake::Released));
}

#[tokio::test]
async fn without_config_the_build_checks_notifications_live() {
    let locked_down = RedisServer::start_with(&[
        "--rename-command",
        "CONFIG",
        "",
        "--notify-keyspace-events",
        "",
    ]);
    let error = RedisBackend::builder(locked_down.url())
        .enable_keyspace_events(true)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(error, RedisSetupError::ConfigNotAllowed { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    for part in ["notify-keyspace-events", "parameter group", "redis.conf"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }

    // Set by the operator (as a managed service's parameter group would), it passes.
    let configured = RedisServer::start_with(&[
        "--rename-command",
        "CONFIG",
        "",
        "--notify-keyspace-events",
        "KEA",
    ]);
    let started = Instant::now();
    RedisBackend::connect(&configured.url())
        .await
        .expect("notifications on, CONFIG renamed away");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_settings_fail_before_connecting() {
    // Nothing listens on port 1: these must fail on the settings alone.
    for prefix in ["", "a{b}", "app*", "with space"] {
        let error = RedisBackend::builder("redis://127.0.0.1:1")
            .prefix(prefix)
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(error, RedisSetupError::InvalidPrefix(_)),
            "{prefix:?}: {error:?}"
        );
        assert!(error.to_string().contains("prefix"), "{error}");
    }
    let error = RedisBackend::builder("redis://127.0.0.1:1")
        .lease(Duration::from_secs(1))
        .renew_every(Duration::from_secs(1))
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(error, RedisSetupError::InvalidLease { .. }),
        "{error:?}"
    );
    let error = RedisBackend::connect("http://127.0.0.1:6379")
        .await
        .unwrap_err();
    assert!(matches!(error, RedisSetupError::InvalidUrl(_)), "{error:?}");
    let error = RedisBackend::builder("redis://127.0.0.1:1")
        .start_when_down(false)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(error, RedisSetupError::Connect(_)), "{error:?}");
    let error = RedisBackend::builder("redis://127.0.0.1:1")
        .failure_policy(FailurePolicy::FailClosed)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(error, RedisSetupError::Connect(_)),
        "fail-closed never starts without Redis: {error:?}"
    );
}

#[tokio::test]
async fn settings_are_reported_and_databases_are_separate() {
    let server = RedisServer::start();
    let backend = RedisBackend::builder(format!("{}/3", server.url()))
        .prefix("app:")
        .lease(Duration::from_secs(6))
        .build()
        .await
        .unwrap();
    let settings = backend.lease_settings();
    assert_eq!(settings.lease, Duration::from_secs(6));
    assert_eq!(settings.renew_every, Duration::from_secs(2));
    assert_eq!(backend.prefix(), "app:");

    // Keyspace notifications of database 3 wake waiters of a backend on database 3.
    let other = RedisBackend::builder(format!("{}/3", server.url()))
        .prefix("app:")
        .build()
        .await
        .unwrap();
    let key = Key::new("db3");
    let lease = acquired(backend.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    let waiter = parked_waiter(&other, &key, None).await;
    let completed = Instant::now();
    assert!(backend
        .complete(&lease, sealed(&lease, TTL, b"3"), TTL)
        .await
        .unwrap());
    let (wake, woken) = waiter.await.unwrap();
    let wake = wake.unwrap();
    assert!(matches!(wake, Wake::Stored(_)));
    assert!(woken - completed < Duration::from_millis(200));

    // Database 0 and another prefix see nothing of it.
    let db0 = backend_on(&server.url(), "app:").await;
    assert!(matches!(
        db0.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Acquired(..)
    ));
    let other_prefix = backend_on(&format!("{}/3", server.url()), "other:").await;
    assert!(matches!(
        other_prefix
            .acquire(&key, LEASE, Lookup::Check)
            .await
            .unwrap(),
        Acquire::Acquired(..)
    ));
}

async fn backend_on(url: &str, prefix: &str) -> RedisBackend {
    RedisBackend::builder(url)
        .prefix(prefix)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn unix_socket_urls_connect() {
    let dir = TempDir::new("tower-parking-sock");
    let socket = dir.path().join("redis.sock");
    let socket_arg = socket.to_str().unwrap().to_owned();
    let server = RedisServer::start_with(&[
        "--unixsocket",
        &socket_arg,
        "--notify-keyspace-events",
        "Kg$x",
    ]);
    eventually(Duration::from_secs(5), "the server's socket", || async {
        socket.exists().then_some(())
    })
    .await;
    let over_tcp = backend(&server).await;
    let key = Key::new("over a socket");
    let lease = acquired(over_tcp.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    for url in [
        format!("unix://{socket_arg}"),
        format!("redis+unix://{socket_arg}"),
    ] {
        let over_socket = RedisBackend::connect(&url).await.expect(&url);
        assert!(matches!(
            over_socket
                .acquire(&key, LEASE, Lookup::Check)
                .await
                .unwrap(),
            Acquire::Held { .. }
        ));
    }
    over_tcp.release(&lease).await.unwrap();
}

/// Reads `key` through `backend` until its copy of `expected` is kept locally: the notification
/// of the write that stored it may land just after the read and drop the first copy.
async fn read_until_kept(backend: &RedisBackend, key: &Key, expected: &str) {
    eventually(
        Duration::from_secs(1),
        &format!("{expected} to be kept"),
        || async {
            match backend.acquire(key, LEASE, Lookup::Check).await.unwrap() {
                Acquire::Fresh(value) => assert_eq!(payload(&value), expected),
                other => panic!("expected the stored value, got {other:?}"),
            }
            backend
                .peek(key)
                .is_some_and(|kept| payload(&kept) == expected)
                .then_some(())
        },
    )
    .await;
}

/// Waits until `backend` keeps no local copy of `key`; returns how long that took.
async fn until_not_kept(backend: &RedisBackend, key: &Key) -> Duration {
    let started = Instant::now();
    eventually(Duration::from_secs(1), "the local copy to go", || async {
        backend.peek(key).is_none().then_some(())
    })
    .await;
    started.elapsed()
}

/// Writes `value` at the Redis key `key`, expiring in `expires_in_ms`, behind the backends' back
/// (as another version of the application or an operator would).
async fn write_directly(inspector: &Client, key: &str, value: &str, expires_in_ms: i64) {
    // The URI's current generation and an entry as the parker writes it, fresh as long as it
    // lives in Redis.
    let (uri, _) = key.split_once('}').expect("a hash-tagged key");
    let generation: Option<String> = inspector.get(format!("{uri}}}:gen")).await.unwrap();
    let entry = entry(
        1,
        Duration::from_millis(expires_in_ms as u64),
        value.as_bytes(),
    );
    let mut stored = format!("{} ", generation.as_deref().unwrap_or("0")).into_bytes();
    stored.extend_from_slice(&entry);
    let _: () = inspector
        .set(
            key,
            stored.as_slice(),
            Some(Expiration::PX(expires_in_ms)),
            None,
            false,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn hits_are_served_locally_until_the_value_changes_anywhere() {
    let server = RedisServer::start();
    let (a, b) = (backend(&server).await, backend(&server).await);
    let key = Key::new("GET /token");
    assert_eq!(b.peek(&key), None, "nothing read yet, nothing kept");

    let lease = acquired(a.acquire(&key, LEASE, Lookup::Check).await.unwrap());
    assert!(a
        .complete(&lease, sealed(&lease, TTL, b"v1"), TTL)
        .await
        .unwrap());
    read_until_kept(&b, &key, "v1").await;

    // Another process invalidates: the copy goes with the notification, not with its TTL.
    a.invalidate(&key).await.unwrap();
    let took = until_not_kept(&b, &key).await;
    assert!(
        took < Duration::from_millis(200),
        "the copy outlived the invalidation by {took:?}"
    );

    // A value written behind the backend's back (another version, an operator) drops it too.
    assert!(matches!(
        b.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Acquired(..)
    ));
    let inspector = inspector(&server).await;
    let resp = redis_key(&key, "resp");
    write_directly(&inspector, &resp, "v2", 60_000).await;
    read_until_kept(&b, &key, "v2").await;
    write_directly(&inspector, &resp, "v3", 60_000).await;
    until_not_kept(&b, &key).await;

    // A short-lived value is served locally no longer than it lives in Redis.
    write_directly(&inspector, &resp, "short", 150).await;
    read_until_kept(&b, &key, "short").await;
    // Expiry makes no notification reach this process in time: the copy's own deadline ends it.
    tokio::time::sleep(Duration::from_millis(160)).await;
    assert_eq!(b.peek(&key), None, "expired in Redis, so expired here");

    // Turned off, nothing is kept.
    let off = RedisBackend::builder(server.url())
        .local_window_bytes(0)
        .build()
        .await
        .unwrap();
    write_directly(&inspector, &resp, "v4", 60_000).await;
    assert!(matches!(
        off.acquire(&key, LEASE, Lookup::Check).await.unwrap(),
        Acquire::Fresh(_)
    ));
    assert_eq!(off.peek(&key), None);
}
