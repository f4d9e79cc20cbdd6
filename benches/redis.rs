//! What coordinating through Redis costs, against a private `redis-server` the bench starts on a
//! free loopback port (and kills at the end).
//!
//! ```text
//! cargo bench --bench redis
//! cargo bench --bench redis -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `crowd` (once, before criterion starts): 1,000 requests on one key over 4 instances (a
//!   `ParkingLayer` and a `RedisBackend` each), held while the handler blocks. Target: the server
//!   sees 2 connections per instance, the handler runs once, all 1,000 get its body.
//! - `wake-up/*`: a follower parked in one instance, woken by the leader's `complete` in another;
//!   timed from just before `complete` (its round trip included) to the follower's `wait`
//!   returning the value. Also sampled on its own for percentiles. Target: p99 under 2 ms.
//! - `hit/*`: a warm 2 KB value read with a raw fred `GET`, then through the backend and the
//!   engine with the local window off (a round trip per hit) and on. Target: a hit served from
//!   Redis costs under 1.5x the raw `GET`.
//!
//! A summary with the percentiles and ratios criterion does not give is printed at the end.
// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    hint::black_box,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::Criterion;
use fred::{
    prelude::{Client, ClientLike, Config, KeysInterface},
    types::{Builder, CustomCommand, InfoKind},
};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::{runtime::Runtime, task::JoinSet};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_parking::{
    backend::{Acquire, Lookup, Wake},
    Backend, Key, Parker, ParkerBuilder, ParkingLayer, RedisBackend, Stats, PARKING_HEADER,
};

use support::{acquired, eventually, payload, sealed, Gate, RedisServer, Tally};

/// The size of a typical stored response.
const VALUE_LEN: usize = 2 * 1024;
const TTL: Duration = Duration::from_secs(3600);
const LEASE: Duration = Duration::from_secs(10);
const INSTANCES: usize = 4;
const CALLERS_PER_INSTANCE: usize = 250;
/// How long anything the bench waits for may take before it fails.
const WITHIN: Duration = Duration::from_secs(10);
const WAKE_UP_TARGET: Duration = Duration::from_millis(2);
const HIT_RATIO_TARGET: f64 = 1.5;

/// How criterion was asked to run: without `--bench` (`cargo test`) it runs each benchmark once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bench,
    Test,
    List,
}

impl Mode {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        let has = |flag: &str| args.iter().any(|arg| arg == flag);
        if has("--list") {
            Mode::List
        } else if has("--bench") && !has("--test") {
            Mode::Bench
        } else {
            Mode::Test
        }
    }

    /// How many wake-ups to sample for the percentiles.
    fn wake_up_samples(self) -> usize {
        match self {
            Mode::Bench => 1_000,
            Mode::Test | Mode::List => 20,
        }
    }
}

fn main() {
    let mode = Mode::from_args();
    let mut criterion = Criterion::default().configure_from_args();
    if mode == Mode::List {
        // Listing names must not start a server or print figures into the list.
        criterion.final_summary();
        return;
    }
    let server = RedisServer::start();
    let runtime = runtime();
    let crowd = runtime.block_on(crowd(&server));
    let fixture = runtime.block_on(Fixture::connect(&server));

    let wake_up = wake_up(&mut criterion, &runtime, &fixture, mode);
    let hits = hits(&mut criterion, &runtime, &fixture);
    criterion.final_summary();

    print_summary(mode, &crowd, &wake_up, &hits);
    // Closing the connections needs the runtime; the server goes last.
    runtime.block_on(fixture.close());
    drop(runtime);
    drop(server);
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn request(path: &str) -> Request<()> {
    Request::get(path).body(()).expect("a valid request")
}

fn value() -> Bytes {
    Bytes::from(
        (0..VALUE_LEN)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// A plain fred client with the backend's connection settings, for the raw `GET` baseline and
/// for looking at the server.
async fn plain_client(server: &RedisServer) -> Client {
    let config = Config::from_url(&server.url()).expect("a valid Redis URL");
    let client = Builder::from_config(config)
        .with_connection_config(|connection| connection.tcp.nodelay = Some(true))
        .build()
        .expect("a fred client");
    client.init().await.expect("the plain client connects");
    client
}

async fn command(client: &Client, name: &'static str, args: Vec<&str>) -> fred::types::Value {
    client
        .custom(CustomCommand::new_static(name, None::<u16>, false), args)
        .await
        .unwrap_or_else(|error| panic!("{name}: {error}"))
}

// ---------------------------------------------------------------------------------------------
// 1,000 parked requests over 4 instances

/// What the crowd saw.
struct Crowd {
    callers: usize,
    runs: usize,
    bodies: usize,
    connections_before: Connections,
    connections_parked: Connections,
    answered_after_release: Duration,
    stats: Stats,
}

/// The server's connections other than the inspector's.
#[derive(Clone, Copy)]
struct Connections {
    total: usize,
    /// Connections with pattern subscriptions: the backends' subscribers.
    subscribers: usize,
}

impl Connections {
    async fn count(inspector: &Client, inspector_id: i64) -> Self {
        let list = command(inspector, "CLIENT", vec!["LIST"]).await;
        let list = list.as_string().expect("CLIENT LIST is text");
        let others: Vec<&str> = list
            .lines()
            .filter(|line| !line.starts_with(&format!("id={inspector_id} ")))
            .collect();
        Self {
            total: others.len(),
            subscribers: others
                .iter()
                .filter(|line| {
                    line.split(' ')
                        .any(|field| field.starts_with("psub=") && field != "psub=0")
                })
                .count(),
        }
    }
}

/// 250 concurrent requests per instance on one key, held at a handler that waits for a gate;
/// counts the server's connections while all of them are parked, then opens the gate.
async fn crowd(server: &RedisServer) -> Crowd {
    let inspector = plain_client(server).await;
    let inspector_id = command(&inspector, "CLIENT", vec!["ID"])
        .await
        .as_i64()
        .expect("CLIENT ID is a number");
    let (runs, joined, gate) = (Tally::new(), Tally::new(), Gate::new());

    let mut instances = Vec::with_capacity(INSTANCES);
    for _ in 0..INSTANCES {
        let backend = RedisBackend::builder(server.url())
            .prefix("bench-crowd:")
            .lease(LEASE)
            .build()
            .await
            .expect("the instance's backend builds");
        let layer = ParkingLayer::new().ttl(TTL).backend(backend.clone());
        let (runs, gate) = (runs.clone(), gate.clone());
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let run = runs.add();
                gate.wait().await;
                let body = Bytes::from(format!("report 7, run {run}"));
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            }
        }));
        instances.push((backend, layer, service));
    }
    let connections_before = Connections::count(&inspector, inspector_id).await;

    let callers = INSTANCES * CALLERS_PER_INSTANCE;
    let mut answers = JoinSet::new();
    for (_, _, service) in &instances {
        for _ in 0..CALLERS_PER_INSTANCE {
            answers.spawn(call_and_report_joined(service.clone(), joined.clone()));
        }
    }
    joined
        .wait_for(callers, WITHIN, "callers that joined their flight")
        .await;
    runs.wait_for(1, WITHIN, "handler runs").await;
    // The leading instance runs the handler; the other three wait on Redis. `waiting_keys` has no
    // event to await, so it is polled.
    eventually(WITHIN, "3 instances waiting on the key", || {
        let waiting: usize = instances.iter().map(|(b, _, _)| b.waiting_keys()).sum();
        async move { (waiting == INSTANCES - 1).then_some(()) }
    })
    .await;
    let connections_parked = Connections::count(&inspector, inspector_id).await;

    let released = Instant::now();
    gate.open();
    let mut bodies = HashSet::new();
    while let Some(answer) = answers.join_next().await {
        bodies.insert(answer.expect("a caller's task"));
    }
    let answered_after_release = released.elapsed();

    let stats = instances
        .iter()
        .map(|(_, layer, _)| layer.stats())
        .sum::<Stats>();
    let _ = inspector.quit().await;
    let crowd = Crowd {
        callers,
        runs: runs.get(),
        bodies: bodies.len(),
        connections_before,
        connections_parked,
        answered_after_release,
        stats,
    };
    assert_eq!(crowd.runs, 1, "the handler ran once for the 4 instances");
    assert_eq!(
        crowd.bodies, 1,
        "every caller got the same body: {bodies:?}"
    );
    assert_eq!(
        crowd.stats.miss + crowd.stats.coalesced + crowd.stats.parked,
        callers as u64,
        "every caller was served by the one run: {:?}",
        crowd.stats
    );
    for (when, connections) in [
        ("before the crowd", crowd.connections_before),
        ("while 1,000 callers were parked", crowd.connections_parked),
    ] {
        assert_eq!(
            (connections.total, connections.subscribers),
            (2 * INSTANCES, INSTANCES),
            "{when}: 2 connections per instance (1 command, 1 subscriber)"
        );
    }
    crowd
}

/// Calls the service, counted in `joined` once the call is in its flight, and returns the body.
async fn call_and_report_joined<S, B>(service: S, joined: Tally) -> Bytes
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = support::tracked(service.oneshot(request("/report/7")), joined)
        .await
        .expect("the layered service is infallible");
    response.into_body().collect().await.unwrap().to_bytes()
}

// ---------------------------------------------------------------------------------------------
// Cross-instance wake-up and hits

/// Backends and a plain client on the bench's runtime.
struct Fixture {
    plain: Client,
    /// Leads the wake-up keys.
    leader: RedisBackend,
    /// Waits on them: another instance, with connections of its own.
    follower: RedisBackend,
    /// Every hit a round trip.
    windowless: RedisBackend,
    /// Warm keys served from the local window.
    windowed: RedisBackend,
    value: Bytes,
}

impl Fixture {
    async fn connect(server: &RedisServer) -> Self {
        let backend = |prefix: &str, window_bytes: Option<usize>| {
            let mut builder = RedisBackend::builder(server.url())
                .prefix(prefix)
                .lease(LEASE);
            if let Some(bytes) = window_bytes {
                builder = builder.local_window_bytes(bytes);
            }
            async move { builder.build().await.expect("the backend builds") }
        };
        Self {
            plain: plain_client(server).await,
            leader: backend("bench-wake:", None).await,
            follower: backend("bench-wake:", None).await,
            windowless: backend("bench-hit:", Some(0)).await,
            windowed: backend("bench-hit:", None).await,
            value: value(),
        }
    }

    async fn close(self) {
        let _ = self.plain.quit().await;
        // The backends close their connections on drop, on this runtime.
    }

    /// `EVALSHA` calls the server ran so far (every backend operation is one).
    async fn scripts_run(&self) -> u64 {
        let info: String = self
            .plain
            .info(Some(InfoKind::CommandStats))
            .await
            .expect("INFO commandstats");
        info.lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |calls| calls.parse().expect("a call count"))
    }
}

/// One wake-up, timed.
struct WakeUp {
    /// From just before the leader's `complete` to the follower's `wait` returning the value.
    woken: Duration,
    /// The leader's `complete` round trip alone.
    complete: Duration,
}

/// The leader takes a fresh key; the follower, in the other instance, waits on it on a task of its
/// own; once it is parked the leader completes.
async fn wake_up_once(fixture: &Fixture, n: u64) -> WakeUp {
    let key = Key::new(format!("GET /wake/{n}"));
    let lease = acquired(
        fixture
            .leader
            .acquire(&key, LEASE, Lookup::Check)
            .await
            .expect("acquire"),
    );
    let scripts_before = fixture.scripts_run().await;
    let follower = fixture.follower.clone();
    let waited = key.clone();
    let parked = tokio::spawn(async move {
        let wake = follower.wait(&waited, Lookup::Check, None).await;
        (wake, Instant::now())
    });
    // Registered with its subscriber...
    let deadline = Instant::now() + WITHIN;
    while fixture.follower.waiting_keys() != 1 {
        assert!(Instant::now() < deadline, "the follower never waited");
        tokio::task::yield_now().await;
    }
    // ...and its re-check ran on the server (the only script sent since), so it found the lock
    // held: from here only the notification of the leader's store ends its wait.
    while fixture.scripts_run().await == scripts_before {
        assert!(
            Instant::now() < deadline,
            "the follower's re-check never ran"
        );
    }

    let start = Instant::now();
    let stored = fixture
        .leader
        .complete(&lease, sealed(&lease, TTL, &fixture.value), TTL)
        .await
        .expect("complete");
    let complete = start.elapsed();
    assert!(stored, "the leader still held its lease");
    let (wake, woken_at) = parked.await.expect("the follower's task");
    match wake.expect("wait") {
        Wake::Stored(value) => assert_eq!(payload(&value), fixture.value, "the leader's value"),
        other => panic!("the follower should get the stored value, got {other:?}"),
    }
    // Keeps Redis and the follower's local window from growing with the iterations.
    fixture.leader.invalidate(&key).await.expect("invalidate");
    WakeUp {
        woken: woken_at - start,
        complete,
    }
}

/// Wake-up percentiles, from samples taken outside criterion.
struct WakeUpFigures {
    woken: Vec<Duration>,
    complete: Vec<Duration>,
}

fn wake_up(
    criterion: &mut Criterion,
    runtime: &Runtime,
    fixture: &Fixture,
    mode: Mode,
) -> WakeUpFigures {
    let next_key = std::sync::atomic::AtomicU64::new(0);
    let next = || next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut group = criterion.benchmark_group("wake-up");
    group.bench_function("leader's complete to follower in another instance", |b| {
        b.to_async(runtime).iter_custom(|iters| async move {
            let mut woken = Duration::ZERO;
            for _ in 0..iters {
                woken += wake_up_once(fixture, next()).await.woken;
            }
            woken
        });
    });
    group.finish();

    runtime.block_on(async {
        let mut figures = WakeUpFigures {
            woken: Vec::new(),
            complete: Vec::new(),
        };
        for _ in 0..mode.wake_up_samples() {
            let wake_up = wake_up_once(fixture, next()).await;
            figures.woken.push(wake_up.woken);
            figures.complete.push(wake_up.complete);
        }
        figures.woken.sort();
        figures.complete.sort();
        figures
    })
}

/// The per-iteration time of every criterion sample of one benchmark, for the summary.
#[derive(Clone, Default)]
struct PerCall(Arc<Mutex<Vec<Duration>>>);

impl PerCall {
    fn record(&self, iters: u64, elapsed: Duration) {
        let per_call = elapsed.div_f64(iters.max(1) as f64);
        self.0.lock().unwrap().push(per_call);
    }

    fn median(&self) -> Duration {
        let mut samples = self.0.lock().unwrap().clone();
        samples.sort();
        samples.get(samples.len() / 2).copied().unwrap_or_default()
    }
}

/// Benchmarks `call` (whose result is kept from the optimiser), recording its time per call.
fn bench_call<T, F, Fut>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &Runtime,
    name: &'static str,
    call: F,
) -> (&'static str, PerCall)
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
{
    let per_call = PerCall::default();
    group.bench_function(name, |b| {
        b.to_async(runtime).iter_custom(|iters| {
            let (call, per_call) = (&call, per_call.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(call().await);
                }
                let elapsed = start.elapsed();
                per_call.record(iters, elapsed);
                elapsed
            }
        });
    });
    (name, per_call)
}

async fn report_2kb(_request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(value())))
}

/// Calls a layered service and reads the whole body, as a server would before writing it out.
async fn call_layered<S, B>(service: &S, path: &str) -> Response<Bytes>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request(path)).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, body)
}

/// Nothing runs the work of a warm key; if it ran, the hit path is broken.
async fn not_run() -> Result<Bytes, &'static str> {
    Err("the work ran for a warm key")
}

fn hits(
    criterion: &mut Criterion,
    runtime: &Runtime,
    fixture: &Fixture,
) -> Vec<(&'static str, PerCall)> {
    let key = Key::new("GET /report/7 (2 KB)");
    let windowless_parker: Parker<Bytes> = ParkerBuilder::new()
        .backend(fixture.windowless.clone())
        .ttl(TTL)
        .build();
    let windowed_parker: Parker<Bytes> = ParkerBuilder::new()
        .backend(fixture.windowed.clone())
        .ttl(TTL)
        .build();
    let layer = |backend: &RedisBackend| {
        ParkingLayer::new()
            .ttl(TTL)
            .backend(backend.clone())
            .layer(service_fn(report_2kb))
    };
    let (windowless_layered, windowed_layered) =
        (layer(&fixture.windowless), layer(&fixture.windowed));
    // The backends name a key's entry `<prefix>{<uri digest>}:<variant digest>:resp`: the raw GET
    // reads the same bytes.
    let resp_key = format!(
        "{}{{{}}}:{}:resp",
        fixture.windowless.prefix(),
        key.uri_digest_hex(),
        key.variant_digest_hex()
    );

    runtime.block_on(async {
        let lease = acquired(
            fixture
                .windowless
                .acquire(&key, LEASE, Lookup::Check)
                .await
                .unwrap(),
        );
        assert!(fixture
            .windowless
            .complete(&lease, sealed(&lease, TTL, &fixture.value), TTL)
            .await
            .unwrap());
        let raw: Bytes = fixture.plain.get(resp_key.as_str()).await.unwrap();
        assert!(
            raw.ends_with(&fixture.value),
            "the raw GET reads the stored entry: its generation, its head, the value"
        );
        for parker in [&windowless_parker, &windowed_parker] {
            for _ in 0..2 {
                let value = parker.run(key.clone(), not_run).await.unwrap();
                assert_eq!(value, fixture.value);
            }
            let stats = parker.stats();
            assert_eq!((stats.hit, stats.executions), (2, 0), "hits: {stats:?}");
        }
        call_layered(&windowless_layered, "/report/7").await;
        for layered in [&windowless_layered, &windowed_layered] {
            for _ in 0..2 {
                let warm = call_layered(layered, "/report/7").await;
                assert_eq!(warm.headers()[PARKING_HEADER], "hit", "the key is warm");
                assert_eq!(warm.body(), &fixture.value);
            }
        }
    });

    let mut group = criterion.benchmark_group("hit (2 KB)");
    let figures = vec![
        bench_call(&mut group, runtime, "raw fred GET", || async {
            let value: Bytes = fixture.plain.get(resp_key.as_str()).await.unwrap();
            value
        }),
        bench_call(
            &mut group,
            runtime,
            "RedisBackend::acquire, window off",
            || async {
                match fixture.windowless.acquire(&key, LEASE, Lookup::Check).await {
                    Ok(Acquire::Fresh(value)) => payload(&value),
                    other => panic!("a warm key is fresh, got {other:?}"),
                }
            },
        ),
        bench_call(&mut group, runtime, "Parker::run, window off", || async {
            windowless_parker.run(key.clone(), not_run).await.unwrap()
        }),
        bench_call(&mut group, runtime, "ParkingLayer, window off", || {
            call_layered(&windowless_layered, "/report/7")
        }),
        bench_call(&mut group, runtime, "Parker::run, local window", || async {
            windowed_parker.run(key.clone(), not_run).await.unwrap()
        }),
        bench_call(&mut group, runtime, "ParkingLayer, local window", || {
            call_layered(&windowed_layered, "/report/7")
        }),
    ];
    group.finish();

    let executions = windowless_parker.stats().executions
        + windowed_parker.stats().executions
        + windowless_layered.parker().stats().executions
        + windowed_layered.parker().stats().executions;
    assert_eq!(executions, 1, "only the layer's first call ran the handler");
    figures
}

// ---------------------------------------------------------------------------------------------
// Summary

fn micros(duration: Duration) -> String {
    if duration < Duration::from_micros(10) {
        format!("{} ns", duration.as_nanos())
    } else {
        format!("{:.1} µs", duration.as_secs_f64() * 1e6)
    }
}

/// The sample at quantile `q` of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn print_summary(
    mode: Mode,
    crowd: &Crowd,
    wake_up: &WakeUpFigures,
    hits: &[(&'static str, PerCall)],
) {
    println!();
    println!("== tower-parking on Redis: summary ==");
    if mode == Mode::Test {
        println!("(test mode: each benchmark ran once; the timings below are not measurements)");
    }
    let stats = &crowd.stats;
    println!(
        "crowd: {} callers on 1 key over {INSTANCES} instances: handler ran {} time(s), {} distinct body; \
         outcomes miss {} / coalesced {} / parked {}; all answered {} after release",
        crowd.callers,
        crowd.runs,
        crowd.bodies,
        stats.miss,
        stats.coalesced,
        stats.parked,
        micros(crowd.answered_after_release),
    );
    for (when, connections) in [
        ("idle", crowd.connections_before),
        ("1,000 parked", crowd.connections_parked),
    ] {
        println!(
            "  Redis connections ({when}): {} ({} subscribers) = {} per instance (target 2)",
            connections.total,
            connections.subscribers,
            connections.total as f64 / INSTANCES as f64,
        );
    }

    let p99 = quantile(&wake_up.woken, 0.99);
    println!(
        "wake-up, complete in instance A to wait returning in B ({} samples): p50 {}, p99 {}, max {} \
         (target p99 < {:?}: {})",
        wake_up.woken.len(),
        micros(quantile(&wake_up.woken, 0.5)),
        micros(p99),
        micros(wake_up.woken.last().copied().unwrap_or_default()),
        WAKE_UP_TARGET,
        verdict(p99 < WAKE_UP_TARGET),
    );
    println!(
        "  of which A's complete round trip: p50 {}, p99 {}",
        micros(quantile(&wake_up.complete, 0.5)),
        micros(quantile(&wake_up.complete, 0.99)),
    );

    println!("hit of a 2 KB value, median time per call over criterion's samples:");
    let raw = hits.first().map(|(_, per_call)| per_call.median());
    for (name, per_call) in hits {
        let median = per_call.median();
        let ratio = raw.map_or(f64::NAN, |raw| {
            median.as_secs_f64() / raw.as_secs_f64().max(f64::MIN_POSITIVE)
        });
        println!("  {name:<36} {:>10}  {ratio:>7.3}x raw GET", micros(median));
    }
    if let Some((_, acquire)) = hits.get(1) {
        let ratio = raw.map_or(f64::NAN, |raw| {
            acquire.median().as_secs_f64() / raw.as_secs_f64().max(f64::MIN_POSITIVE)
        });
        println!(
            "  hit served from Redis (acquire) vs raw GET: {ratio:.2}x (target < {HIT_RATIO_TARGET}x: {})",
            verdict(ratio < HIT_RATIO_TARGET)
        );
    }
}
