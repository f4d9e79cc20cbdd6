//! A fleet of instances on one redis-server, as the cross-process tests build it: requests keyed
//! by path, a `GET /slow/{key}` route whose runs are counted across the fleet, and ways to send
//! bursts to several instances and wait until they are all inside the layer.

use std::{collections::BTreeMap, future::Future, time::Duration};

use axum::{extract::Path, http::request::Parts, routing::get, Router};
use tower_parking::{Key, ParkingLayer, RedisBackend, RedisBackendBuilder};

use tokio::task::JoinHandle;

use super::{counting_waits, Gate, HttpClient, Instance, RedisServer, Reply, Tally};

/// Time allowed for things that take milliseconds, so a loaded CI machine does not fail a test.
pub const SOON: Duration = Duration::from_secs(10);

/// Requests are keyed by path alone, so a test can name the Redis keys of a request.
pub fn by_path(parts: &Parts) -> Option<Key> {
    Some(Key::new(parts.uri.path()))
}

/// The layer of an instance: keyed by path; its followers count, in `parked`, each time they
/// found the lock held by another instance and are about to wait for it.
pub fn parking(parked: &Tally, ttl: Duration) -> ParkingLayer {
    ParkingLayer::new()
        .parker_builder(counting_waits(parked))
        .key(by_path)
        .ttl(ttl)
}

/// The service behind the layer: `GET /slow/{key}` counts its run in `runs` (shared by every
/// instance), awaits `work(key, run)` and answers `"{key} run {run}"`.
pub fn slow_app<W, Fut>(runs: &Tally, work: W) -> Router
where
    W: Fn(String, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runs = runs.clone();
    Router::new().route(
        "/slow/{key}",
        get(move |Path(key): Path<String>| {
            let runs = runs.clone();
            let work = work.clone();
            async move {
                let run = runs.add();
                work(key.clone(), run).await;
                format!("{key} run {run}")
            }
        }),
    )
}

/// [`slow_app`] whose every run waits at `gate`.
pub fn gated_app(runs: &Tally, gate: &Gate) -> Router {
    let gate = gate.clone();
    slow_app(runs, move |_, _| {
        let gate = gate.clone();
        async move { gate.wait().await }
    })
}

/// [`slow_app`] whose runs for a key named in `gates` wait at that key's gate; other keys go
/// straight through.
pub fn gated_by_key<const N: usize>(runs: &Tally, gates: &[(&'static str, Gate); N]) -> Router {
    let gates = gates.clone();
    slow_app(runs, move |key, _| {
        let gate = gates
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, gate)| gate.clone());
        async move {
            if let Some(gate) = gate {
                gate.wait().await;
            }
        }
    })
}

/// [`slow_app`] whose first run waits at `gate` (the leader a fault hits); later runs (a
/// takeover) go straight through.
pub fn first_run_gated_app(runs: &Tally, gate: &Gate) -> Router {
    let gate = gate.clone();
    slow_app(runs, move |_, run| {
        let gate = gate.clone();
        async move {
            if run == 1 {
                gate.wait().await;
            }
        }
    })
}

/// Starts `n` instances on `redis`, each with its own backend (`backend` adjusts the builder),
/// its own `layer()` and a clone of `app`.
pub fn start_instances(
    n: usize,
    redis: &RedisServer,
    backend: impl Fn(RedisBackendBuilder) -> RedisBackendBuilder,
    layer: impl Fn() -> ParkingLayer,
    app: &Router,
) -> Vec<Instance> {
    start_instances_on(n, &redis.url(), backend, layer, app)
}

/// Like [`start_instances`], on the Redis at `url` (a cluster's, a Sentinel's).
pub fn start_instances_on(
    n: usize,
    url: &str,
    backend: impl Fn(RedisBackendBuilder) -> RedisBackendBuilder,
    layer: impl Fn() -> ParkingLayer,
    app: &Router,
) -> Vec<Instance> {
    super::log_from_env();
    (0..n)
        .map(|_| Instance::start(backend(RedisBackend::builder(url)), layer(), app.clone()))
        .collect()
}

/// `count` requests for `path` to each instance, interleaved.
pub fn urls(instances: &[&Instance], path: &str, count: usize) -> Vec<String> {
    (0..count)
        .flat_map(|_| instances.iter().map(|instance| instance.url(path)))
        .collect()
}

/// Waits until `total` requests (since the instance started) are in each instance's parking
/// layer: each has joined or started its key's flight, so none can arrive after it ended.
pub async fn wait_all_in(instances: &[&Instance], total: usize) {
    for instance in instances {
        instance
            .waiting()
            .wait_for(total, SOON, "requests in the instance")
            .await;
    }
}

/// Sends the leader's request for `path` to `leader` and, once the leader runs (as `runs`
/// counts), `per_instance` requests for it to each of `followers`; returns when every follower
/// request is in its layer and each follower instance has parked behind the leader (as
/// `parked`, the [`parking`] layers' counter, counts). Returns the leader's reply and the
/// followers'.
pub async fn parked_behind_leader(
    client: &HttpClient,
    (runs, parked): (&Tally, &Tally),
    leader: &Instance,
    followers: &[&Instance],
    path: &str,
    per_instance: usize,
) -> (JoinHandle<Result<Reply, String>>, JoinHandle<Vec<Reply>>) {
    let leading = client.spawn_get(leader.url(path));
    runs.wait_for(1, SOON, "the leader's run").await;
    let following = client.spawn_get_all_ok(urls(followers, path, per_instance));
    wait_all_in(followers, per_instance).await;
    parked
        .wait_for(followers.len(), SOON, "every follower instance parked")
        .await;
    (leading, following)
}

/// How many replies carry each `x-parking` outcome.
pub fn outcomes(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.outcome().to_string()).or_default() += 1;
    }
    counts
}

/// Asserts that every reply is a `200` with `body`.
#[track_caller]
pub fn assert_all_served(replies: &[Reply], body: &str) {
    for reply in replies {
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, body.to_owned()),
            "{reply:?}"
        );
    }
}
