//! A configurable server for multi-process runs and load tools.
//!
//! ```text
//! cargo run --release --example server -- --listen 127.0.0.1:3000 --work-ms 200 --ttl-ms 10000
//! cargo run --release --example server -- --listen 127.0.0.1:3001 --redis redis://127.0.0.1:6379
//! ```
//!
//! Routes:
//!
//! - `GET /slow/{key}`: the handler behind `ParkingLayer` (default key: `PerUser`, so requests
//!   without credentials share). It sleeps `--work-ms`, counts its run and answers JSON
//!   `{"key", "pid", "execution", "work_ms"}`, where `execution` is its run number in this process.
//! - `GET /bare/{key}`: the same handler without the layer. Its runs are counted apart, in
//!   `bare_executions`, never in `executions`.
//! - `GET /stats`: JSON with `executions` (runs of the `/slow` handler in this process),
//!   `bare_executions` and the layer's counters.
//!
//! It prints `listening on ADDR` (the bound address; `--listen 127.0.0.1:0` picks a free port)
//! once it accepts connections, and shuts down gracefully on SIGTERM or Ctrl-C. Worker threads:
//! `TOKIO_WORKER_THREADS` (default: one per core). Logs: `RUST_LOG` (default `warn`).

use std::{
    io::Write,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    extract::{Path, State},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};
use tower_parking::{MemoryBackend, ParkingLayer};

const USAGE: &str = "\
usage: server [OPTIONS]

  --listen ADDR             address to listen on (default 127.0.0.1:3000; port 0 picks one)
  --work-ms N               how long the handler works, in ms (default 200)
  --ttl-ms N                how long a response is served again, in ms (default 10000)
  --redis URL               coordinate with every server on this Redis (default: this process only)
  --lease-ms N              the leader's lease, in ms (default 10000)
  --wait-timeout-ms N       how long a request waits for a leader, then runs the handler itself
                            (default: as long as the leader is alive)
  --enable-keyspace-events  with --redis: turn on the keyspace notifications it needs (CONFIG SET)
  --key-prefix P            with --redis: prefix of its Redis keys (default parking:)
  -h, --help                print this help

routes: GET /slow/{key} (parked), GET /bare/{key} (not parked), GET /stats (JSON counters)";

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

/// Shared by the routes: the layer (for its counters) and the handlers' own counters.
#[derive(Clone)]
struct App {
    parking: ParkingLayer,
    work: Duration,
    executions: Arc<AtomicU64>,
    bare_executions: Arc<AtomicU64>,
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

    let app = App {
        parking: parking.clone(),
        work: options.work,
        executions: Arc::default(),
        bare_executions: Arc::default(),
    };
    let router = Router::new()
        .route("/slow/{key}", get(slow).layer(parking))
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

/// The handler behind the layer: its runs are what parking saves.
async fn slow(State(app): State<App>, Path(key): Path<String>) -> Json<Value> {
    let execution = app.executions.fetch_add(1, Ordering::Relaxed) + 1;
    work(&app, key, execution).await
}

/// The same handler without the layer, counted apart.
async fn bare(State(app): State<App>, Path(key): Path<String>) -> Json<Value> {
    let execution = app.bare_executions.fetch_add(1, Ordering::Relaxed) + 1;
    work(&app, key, execution).await
}

async fn work(app: &App, key: String, execution: u64) -> Json<Value> {
    if !app.work.is_zero() {
        tokio::time::sleep(app.work).await;
    }
    Json(json!({
        "key": key,
        "pid": std::process::id(),
        "execution": execution,
        "work_ms": app.work.as_millis() as u64,
    }))
}

async fn stats(State(app): State<App>) -> Json<Value> {
    let layer = app.parking.stats();
    Json(json!({
        "pid": std::process::id(),
        "executions": app.executions.load(Ordering::Relaxed),
        "bare_executions": app.bare_executions.load(Ordering::Relaxed),
        "hit": layer.hit,
        "miss": layer.miss,
        "coalesced": layer.coalesced,
        "parked": layer.parked,
        "bypass": layer.bypass,
        "timeout": layer.timeout,
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
