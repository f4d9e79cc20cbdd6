//! A configurable server for multi-process runs and load tools.
//!
//! ```text
//! cargo run --release --example server -- --listen 127.0.0.1:3000 --work-ms 200 --ttl-ms 10000
//! cargo run --release --example server -- --listen 127.0.0.1:3001 --redis redis://127.0.0.1:6379
//! ```
//!
//! Routes (every one but `/bare` and `/stats` behind one `ParkingLayer`, default key `PerUser`:
//! the authority, method, path, query and a hash of the credentials, so requests for one `Host`
//! without credentials share):
//!
//! - `GET /slow/{key}`: the handler behind the layer. It sleeps `--work-ms`, counts its run and
//!   answers JSON `{"key", "pid", "execution", "work_ms", "version"}`, where `execution` is its
//!   run number in this process and `version` the key's version as the run read it, after its
//!   work (`null` if it could not: Redis down).
//! - `POST /slow/{key}`: bumps the key's version by one and answers JSON `{"key", "pid",
//!   "version"}` (the new version). The version lives in Redis with `--redis` (`INCR` on
//!   `{prefix}version:{key}`, `{prefix}` being `--key-prefix`, so every process sees every bump),
//!   in this process otherwise. The layer lets the write through (`x-parking: bypass`) and, as it
//!   succeeded, invalidates what is stored for `/slow/{key}` on the backend (Redis, and this
//!   process's copies) before answering it: the next `GET /slow/{key}` runs the handler again and
//!   shows the new version. Other processes drop their local copies when Redis's notification of
//!   the invalidation reaches them, which can be a moment after the write is answered.
//! - `GET /private/{key}`: the same handler, answering with `Cache-Control: private`, its runs
//!   counted in `private_executions`. The layer never shares such a response: each caller gets
//!   its own run, and the key is remembered as hit-for-pass (`x-parking: pass`), so later requests
//!   go straight to the handler instead of parking behind a run they cannot have.
//! - `GET /sse/{key}`: server-sent events, 10 events 100 ms apart (`event: tick`, `id` 0 to 9,
//!   data `{"key", "pid", "n"}`), the first at once, counted in `sse_streams`. The layer does not
//!   buffer a stream: it reaches its own caller as it comes; it is never shared (requests that
//!   waited for it run their own) and the key is remembered as hit-for-pass.
//! - `GET /bare/{key}`: the `/slow` handler's work without the layer and without reading the
//!   version (no Redis round trip: the baseline of the load harness). Its runs are counted apart,
//!   in `bare_executions`, never in `executions`.
//! - `GET /stats`: JSON with `executions` (runs of the `/slow` handler in this process),
//!   `private_executions`, `bare_executions`, `sse_streams` and the layer's counters.
//!
//! It speaks HTTP/1.1 and HTTP/2 over cleartext on the same port: `axum::serve` reads the first
//! bytes of each connection and serves HTTP/2 when they are its preface (h2c with prior
//! knowledge, `curl --http2-prior-knowledge`), HTTP/1.1 otherwise. HTTP/2 needs axum's `http2`
//! feature, which this crate's dev-dependencies turn on. An HTTP/1.1 request with `Upgrade: h2c`
//! (`curl --http2` on an `http://` URL) is answered over HTTP/1.1, and goes past the layer as
//! every upgrade request does (`x-parking: bypass`). There is no TLS, so no ALPN.
//!
//! It prints `listening on ADDR` (the bound address; `--listen 127.0.0.1:0` picks a free port)
//! once it accepts connections, and shuts down gracefully on SIGTERM or Ctrl-C. Worker threads:
//! `TOKIO_WORKER_THREADS` (default: one per core). Logs: `RUST_LOG` (default `warn`). Built
//! without the `redis` feature (`--no-default-features`) it runs on the memory backend only and
//! refuses `--redis`.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Write,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{
        sse::{Event, Sse},
        IntoResponse,
    },
    routing::get,
    Json, Router,
};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tower_parking::{MemoryBackend, ParkingLayer};

const USAGE: &str = "\
usage: server [OPTIONS]

  --listen ADDR             address to listen on (default 127.0.0.1:3000; port 0 picks one)
  --work-ms N               how long the handler works, in ms (default 200)
  --ttl-ms N                how long a response is served again, in ms (default 10000)
  --redis URL               coordinate with every server on this Redis, and keep the versions
                            there (default: this process only)
  --lease-ms N              the leader's lease, in ms (default 10000)
  --wait-timeout-ms N       how long a request waits for a leader, then runs the handler itself
                            (default: as long as the leader is alive)
  --enable-keyspace-events  with --redis: turn on the keyspace notifications it needs (CONFIG SET)
  --key-prefix P            with --redis: prefix of its Redis keys (default parking:)
  --stale-ms N              serve a response up to N ms past its TTL while one refresh runs
                            (stale-while-revalidate; default 0: off)
  --early-refresh BETA      refresh hot responses before they expire (XFetch; default: off)
  -h, --help                print this help

routes (HTTP/1.1, and HTTP/2 with prior knowledge, on the same port):
  GET  /slow/{key}     parked: works --work-ms, answers JSON with the key's version
  POST /slow/{key}     bumps the key's version; invalidates what is stored for GET /slow/{key}
  GET  /private/{key}  the same handler, answering Cache-Control: private (never shared)
  GET  /sse/{key}      server-sent events: 10 events 100 ms apart (never buffered)
  GET  /bare/{key}     the same work, not parked
  GET  /stats          JSON counters";

/// How many events `GET /sse/{key}` sends, and how far apart.
const SSE_EVENTS: u64 = 10;
const SSE_INTERVAL: Duration = Duration::from_millis(100);

/// The command line, parsed.
#[derive(Debug)]
struct Options {
    listen: SocketAddr,
    work: Duration,
    ttl: Duration,
    redis: Option<String>,
    lease: Option<Duration>,
    wait_timeout: Option<Duration>,
    enable_keyspace_events: bool,
    key_prefix: Option<String>,
    stale: Option<Duration>,
    early_refresh: Option<f64>,
}

impl Options {
    /// Reads `--flag value` and `--flag=value`. `Ok(None)`: help was asked for.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut options = Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            work: Duration::from_millis(200),
            ttl: Duration::from_millis(10_000),
            redis: None,
            lease: None,
            wait_timeout: None,
            enable_keyspace_events: false,
            key_prefix: None,
            stale: None,
            early_refresh: None,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .map(str::to_owned)
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            let millis = |text: String| {
                text.parse::<u64>().map(Duration::from_millis).map_err(|_| {
                    format!("{flag} takes a whole number of milliseconds, not {text:?}")
                })
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--listen" => {
                    let text = value()?;
                    options.listen = text
                        .parse()
                        .map_err(|_| format!("--listen takes IP:PORT, not {text:?}"))?;
                }
                "--work-ms" => options.work = millis(value()?)?,
                "--ttl-ms" => options.ttl = millis(value()?)?,
                "--redis" => options.redis = Some(value()?),
                "--lease-ms" => options.lease = Some(millis(value()?)?),
                "--wait-timeout-ms" => options.wait_timeout = Some(millis(value()?)?),
                "--key-prefix" => options.key_prefix = Some(value()?),
                "--stale-ms" => options.stale = Some(millis(value()?)?),
                "--early-refresh" => {
                    let text = value()?;
                    let beta = text.parse::<f64>().ok().filter(|beta| *beta > 0.0);
                    let beta =
                        beta.ok_or_else(|| format!("{flag} takes a number above 0, not {text:?}"))?;
                    options.early_refresh = Some(beta);
                }
                "--enable-keyspace-events" if inline.is_none() => {
                    options.enable_keyspace_events = true;
                }
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        if options.redis.is_none() {
            if options.enable_keyspace_events {
                return Err("--enable-keyspace-events needs --redis".into());
            }
            if options.key_prefix.is_some() {
                return Err("--key-prefix needs --redis".into());
            }
        }
        if options.lease.is_some_and(|lease| lease.is_zero()) {
            return Err("--lease-ms must be above 0".into());
        }
        Ok(Some(options))
    }
}

/// Shared by the routes: the layer (for its counters), the versions and the handlers' own
/// counters.
#[derive(Clone)]
struct App {
    parking: ParkingLayer,
    work: Duration,
    versions: Versions,
    executions: Arc<AtomicU64>,
    private_executions: Arc<AtomicU64>,
    bare_executions: Arc<AtomicU64>,
    sse_streams: Arc<AtomicU64>,
}

/// The per-key versions `POST /slow/{key}` bumps: in Redis with `--redis`, so that a bump
/// through one process shows in a run in any other, in this process otherwise.
#[derive(Clone)]
enum Versions {
    Local(Arc<Mutex<HashMap<String, u64>>>),
    #[cfg(feature = "redis")]
    Redis {
        client: fred::clients::Client,
        prefix: String,
    },
}

impl Versions {
    /// The key's version: 0 until it is first bumped.
    async fn get(&self, key: &str) -> Result<u64, String> {
        match self {
            Versions::Local(versions) => Ok(lock(versions).get(key).copied().unwrap_or(0)),
            #[cfg(feature = "redis")]
            Versions::Redis { client, prefix } => {
                use fred::interfaces::KeysInterface;
                let version: Option<u64> = client
                    .get(format!("{prefix}version:{key}"))
                    .await
                    .map_err(|error| format!("cannot read the version of {key:?}: {error}"))?;
                Ok(version.unwrap_or(0))
            }
        }
    }

    /// Bumps the key's version and returns the new one.
    async fn bump(&self, key: &str) -> Result<u64, String> {
        match self {
            Versions::Local(versions) => {
                let mut versions = lock(versions);
                let version = versions.entry(key.to_owned()).or_insert(0);
                *version += 1;
                Ok(*version)
            }
            #[cfg(feature = "redis")]
            Versions::Redis { client, prefix } => {
                use fred::interfaces::KeysInterface;
                client
                    .incr(format!("{prefix}version:{key}"))
                    .await
                    .map_err(|error| format!("cannot bump the version of {key:?}: {error}"))
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Never held across an await or a panic that matters: a poisoned lock is still sound.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("error: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match serve(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(options: Options) -> Result<(), Box<dyn std::error::Error>> {
    let mut parking = ParkingLayer::new().ttl(options.ttl);
    if let Some(timeout) = options.wait_timeout {
        parking = parking.wait_timeout(timeout);
    }
    if let Some(window) = options.stale {
        parking = parking.stale_while_revalidate(window);
    }
    if let Some(beta) = options.early_refresh {
        parking = parking.early_refresh(beta);
    }
    parking = match &options.redis {
        Some(url) => parking.backend(redis_backend(url, &options).await?),
        None => {
            let mut memory = MemoryBackend::new();
            if let Some(lease) = options.lease {
                memory = memory.lease(lease);
            }
            parking.backend(memory)
        }
    };

    let versions = match &options.redis {
        Some(url) => redis_versions(url, &options).await?,
        None => Versions::Local(Arc::default()),
    };

    let app = App {
        parking: parking.clone(),
        work: options.work,
        versions,
        executions: Arc::default(),
        private_executions: Arc::default(),
        bare_executions: Arc::default(),
        sse_streams: Arc::default(),
    };
    // One layer over these routes: one engine, one set of counters. The POST goes through it
    // too: a write is not parked, and its success invalidates what is stored for its URI.
    let router = Router::new()
        .route("/slow/{key}", get(slow).post(bump))
        .route("/private/{key}", get(private))
        .route("/sse/{key}", get(sse))
        .route_layer(parking)
        .route("/bare/{key}", get(bare))
        .route("/stats", get(stats))
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    // Bound and listening: connections queue from here on, so load tools may start.
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_backend(
    url: &str,
    options: &Options,
) -> Result<tower_parking::RedisBackend, Box<dyn std::error::Error>> {
    let mut builder = tower_parking::RedisBackend::builder(url)
        .enable_keyspace_events(options.enable_keyspace_events);
    if let Some(lease) = options.lease {
        builder = builder.lease(lease);
    }
    if let Some(prefix) = &options.key_prefix {
        builder = builder.prefix(prefix.as_str());
    }
    Ok(builder.build().await?)
}

#[cfg(not(feature = "redis"))]
async fn redis_backend(_url: &str, _options: &Options) -> Result<MemoryBackend, String> {
    Err("--redis needs the `redis` cargo feature (on by default); this build left it out".into())
}

/// A plain client of its own on the Redis at `url`, for the versions. It connects in the
/// background and keeps reconnecting, so that the server starts (and fails open) while Redis
/// is down, as the backend does; meanwhile its commands fail after a second.
#[cfg(feature = "redis")]
async fn redis_versions(
    url: &str,
    options: &Options,
) -> Result<Versions, Box<dyn std::error::Error>> {
    use fred::interfaces::ClientLike;
    let mut config = fred::types::config::Config::from_url(url)?;
    config.fail_fast = false;
    let client = fred::types::Builder::from_config(config)
        .with_performance_config(|performance| {
            performance.default_command_timeout = Duration::from_secs(1);
        })
        .set_policy(fred::types::config::ReconnectPolicy::new_exponential(
            0, 50, 1_000, 2,
        ))
        .build()?;
    // The connection task runs on its own; commands sent before it is up wait for it.
    drop(client.connect());
    let prefix = options
        .key_prefix
        .as_deref()
        .unwrap_or("parking:")
        .to_owned();
    Ok(Versions::Redis { client, prefix })
}

#[cfg(not(feature = "redis"))]
async fn redis_versions(_url: &str, _options: &Options) -> Result<Versions, String> {
    Err("--redis needs the `redis` cargo feature (on by default); this build left it out".into())
}

/// The handler behind the layer: its runs are what parking saves.
async fn slow(State(app): State<App>, Path(key): Path<String>) -> Json<Value> {
    let execution = app.executions.fetch_add(1, Ordering::Relaxed) + 1;
    let mut body = work(&app, &key, execution).await;
    body["version"] = version(&app, &key).await;
    Json(body)
}

/// The key's version as a run reads it after its work: `null` when it cannot be read (Redis is
/// down), so that the run still answers, as the layer fails open.
async fn version(app: &App, key: &str) -> Value {
    match app.versions.get(key).await {
        Ok(version) => version.into(),
        Err(error) => {
            tracing::warn!(%error, "answering without the version");
            Value::Null
        }
    }
}

/// `POST /slow/{key}`: a write. Only its success (a 2xx) invalidates, so a failed bump answers
/// 503 and leaves the stored response in place.
async fn bump(
    State(app): State<App>,
    Path(key): Path<String>,
) -> Result<Json<Value>, (StatusCode, String)> {
    let version = app
        .versions
        .bump(&key)
        .await
        .map_err(|error| (StatusCode::SERVICE_UNAVAILABLE, error))?;
    Ok(Json(json!({
        "key": key,
        "pid": std::process::id(),
        "version": version,
    })))
}

/// The `/slow` handler, answering `Cache-Control: private`: never shared, never stored.
async fn private(State(app): State<App>, Path(key): Path<String>) -> impl IntoResponse {
    let execution = app.private_executions.fetch_add(1, Ordering::Relaxed) + 1;
    let mut body = work(&app, &key, execution).await;
    body["version"] = version(&app, &key).await;
    ([(header::CACHE_CONTROL, "private")], Json(body))
}

/// The same work without the layer, counted apart. It reads no version: no Redis round trip,
/// so it stays the load harness's baseline.
async fn bare(State(app): State<App>, Path(key): Path<String>) -> Json<Value> {
    let execution = app.bare_executions.fetch_add(1, Ordering::Relaxed) + 1;
    Json(work(&app, &key, execution).await)
}

async fn work(app: &App, key: &str, execution: u64) -> Value {
    if !app.work.is_zero() {
        tokio::time::sleep(app.work).await;
    }
    json!({
        "key": key,
        "pid": std::process::id(),
        "execution": execution,
        "work_ms": app.work.as_millis() as u64,
    })
}

/// `SSE_EVENTS` events, `SSE_INTERVAL` apart, the first at once.
async fn sse(
    State(app): State<App>,
    Path(key): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    app.sse_streams.fetch_add(1, Ordering::Relaxed);
    let events = stream::unfold(0, move |n| {
        let key = key.clone();
        async move {
            if n == SSE_EVENTS {
                return None;
            }
            if n > 0 {
                tokio::time::sleep(SSE_INTERVAL).await;
            }
            let data = json!({ "key": key, "pid": std::process::id(), "n": n });
            let event = Event::default()
                .event("tick")
                .id(n.to_string())
                .data(data.to_string());
            Some((Ok(event), n + 1))
        }
    });
    Sse::new(events)
}

async fn stats(State(app): State<App>) -> Json<Value> {
    let layer = app.parking.stats();
    Json(json!({
        "pid": std::process::id(),
        "executions": app.executions.load(Ordering::Relaxed),
        "private_executions": app.private_executions.load(Ordering::Relaxed),
        "bare_executions": app.bare_executions.load(Ordering::Relaxed),
        "sse_streams": app.sse_streams.load(Ordering::Relaxed),
        "hit": layer.hit,
        "miss": layer.miss,
        "coalesced": layer.coalesced,
        "parked": layer.parked,
        "bypass": layer.bypass,
        "timeout": layer.timeout,
        "pass": layer.pass,
        "revalidated": layer.revalidated,
        "failures": layer.failures,
        "backend_errors": layer.backend_errors,
        "in_flight": app.parking.parker().in_flight(),
    }))
}

/// Resolves on Ctrl-C or SIGTERM: the server stops accepting and finishes what it serves.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
