//! A thousand requests at once for a slow upstream, with and without `ParkingLayer`.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! Starts an axum app on a free loopback port whose handler stands for a slow upstream (200 ms:
//! a token refresh, a billed API, a report), then sends it 1,000 concurrent HTTP requests over 4
//! keys, first through the layer, then straight to the same handler. Every figure it prints is
//! counted from the outside: handler runs by the handler itself, outcomes from each response's
//! `x-parking` header, latencies by the client.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::{extract::Path, routing::get, routing::MethodRouter, Router};
use bytes::Bytes;
use dashmap::DashMap;
use http::{header::HOST, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, task::JoinSet};
use tower_parking::{ParkingLayer, PARKING_HEADER};

/// How long the handler takes: the slow upstream it stands for.
const UPSTREAM: Duration = Duration::from_millis(200);
const TTL: Duration = Duration::from_secs(10);
const REQUESTS: usize = 1_000;
const KEYS: [&str; 4] = ["token", "rates", "report", "profile"];
/// Keep-alive connections the client opens. Each costs two file descriptors here (client and
/// server share this process), so 250 stays well inside the usual limit of 1,024 open files.
const CONNECTIONS: usize = 250;

/// Runs of the handler, per key, counted by the handler itself.
type Runs = Arc<DashMap<String, usize>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let parked_runs = Runs::default();
    let bare_runs = Runs::default();
    let app = Router::new()
        .route(
            "/parked/{key}",
            slow_upstream(&parked_runs).layer(ParkingLayer::new().ttl(TTL)),
        )
        .route("/bare/{key}", slow_upstream(&bare_runs));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut connections = connect(addr, CONNECTIONS).await?;

    println!(
        "{REQUESTS} GET requests at once over {} keys, to a handler that takes {} ms,",
        KEYS.len(),
        UPSTREAM.as_millis()
    );
    println!("sent over {CONNECTIONS} keep-alive HTTP/1.1 connections to http://{addr}.\n");

    let parked = burst(&mut connections, addr, "parked").await?;
    print_table(
        &format!("With ParkingLayer (TTL {} s)", TTL.as_secs()),
        &parked,
        &parked_runs,
    );
    let bare = burst(&mut connections, addr, "bare").await?;
    print_table("Without the layer (same handler)", &bare, &bare_runs);

    let runs = |runs: &Runs| runs.iter().map(|entry| *entry.value()).sum::<usize>();
    println!(
        "\
What you see:
- With the layer the handler ran {parked} times for {REQUESTS} requests: once per key. The first
  request of a key led (miss); the ones that arrived while it ran waited for it and got its
  response (coalesced); the ones after it landed were served from the TTL window (hit).
  \"bodies\" counts distinct response bodies per key: every caller got the one response.
- Without it the handler ran {bare} times: every request paid the upstream again, and with
  {CONNECTIONS} connections the requests queued behind each other's {upstream_ms} ms.
- Latency counts from the moment the burst starts, so it includes waiting for a free
  connection, as a user behind a browser or a load balancer would.
- Counts come from the handler's own counter and each response's x-parking header.",
        parked = runs(&parked_runs),
        bare = runs(&bare_runs),
        upstream_ms = UPSTREAM.as_millis(),
    );
    Ok(())
}

/// The slow upstream: counts its run, takes [`UPSTREAM`], answers with its run number so that
/// distinct runs give distinct bodies.
fn slow_upstream(runs: &Runs) -> MethodRouter {
    let runs = Arc::clone(runs);
    get(move |Path(key): Path<String>| {
        let runs = Arc::clone(&runs);
        async move {
            let run = {
                let mut count = runs.entry(key.clone()).or_default();
                *count += 1;
                *count
            };
            tokio::time::sleep(UPSTREAM).await;
            format!("{key}: upstream run #{run}")
        }
    })
}

type Connection = SendRequest<Empty<Bytes>>;

/// Opens `count` HTTP/1.1 connections, each driven by its own task.
async fn connect(addr: SocketAddr, count: usize) -> std::io::Result<Vec<Connection>> {
    let mut opening = JoinSet::new();
    for _ in 0..count {
        opening.spawn(async move {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(connection);
            Ok::<_, std::io::Error>(sender)
        });
    }
    let mut connections = Vec::with_capacity(count);
    while let Some(opened) = opening.join_next().await {
        connections.push(opened??);
    }
    Ok(connections)
}

/// One response, as the client saw it.
struct Sample {
    key: usize,
    outcome: Option<String>,
    body: Bytes,
    latency: Duration,
}

struct Burst {
    samples: Vec<Sample>,
    took: Duration,
}

/// Sends [`REQUESTS`] requests (request `i` for key `i % KEYS.len()`), all issued at once: each
/// connection takes the next request as soon as it is free.
async fn burst(
    connections: &mut Vec<Connection>,
    addr: SocketAddr,
    route: &'static str,
) -> Result<Burst, Box<dyn std::error::Error + Send + Sync>> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for mut connection in connections.drain(..) {
        let next = Arc::clone(&next);
        workers.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                        connection, samples,
                    ));
                }
                let key = i % KEYS.len();
                let request = Request::get(format!("/{route}/{}", KEYS[key]))
                    .header(HOST, addr.to_string())
                    .body(Empty::new())?;
                connection.ready().await?;
                let response = connection.send_request(request).await?;
                let status = response.status();
                let outcome = response
                    .headers()
                    .get(PARKING_HEADER)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_owned);
                let body = response.into_body().collect().await?.to_bytes();
                if status != StatusCode::OK {
                    return Err(format!("{route}/{}: {status}: {body:?}", KEYS[key]).into());
                }
                samples.push(Sample {
                    key,
                    outcome,
                    body,
                    latency: start.elapsed(),
                });
            }
        });
    }
    let mut samples = Vec::with_capacity(REQUESTS);
    while let Some(worker) = workers.join_next().await {
        let (connection, mut own) = worker??;
        connections.push(connection);
        samples.append(&mut own);
    }
    Ok(Burst {
        samples,
        took: start.elapsed(),
    })
}

fn print_table(title: &str, burst: &Burst, runs: &Runs) {
    println!("{title}: all answered in {} ms", burst.took.as_millis());
    // The bare route sends no x-parking header: its outcome columns say "-", not 0.
    let headed = burst.samples.iter().any(|s| s.outcome.is_some());
    let outcome_cell = |count: usize| {
        if headed {
            count.to_string()
        } else {
            "-".to_owned()
        }
    };
    println!(
        "  {:<8} {:>8} {:>12} {:>6} {:>10} {:>6} {:>7} {:>8} {:>8}",
        "key", "requests", "handler runs", "miss", "coalesced", "hit", "bodies", "p50", "p99"
    );
    let mut total = [0; 6];
    for (index, key) in KEYS.iter().enumerate() {
        let samples: Vec<&Sample> = burst.samples.iter().filter(|s| s.key == index).collect();
        let outcome = |name: &str| {
            samples
                .iter()
                .filter(|s| s.outcome.as_deref() == Some(name))
                .count()
        };
        let bodies: HashSet<&Bytes> = samples.iter().map(|s| &s.body).collect();
        let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        latencies.sort();
        let row = [
            samples.len(),
            runs.get(*key).map_or(0, |runs| *runs),
            outcome("miss"),
            outcome("coalesced"),
            outcome("hit"),
            bodies.len(),
        ];
        for (sum, value) in total.iter_mut().zip(row) {
            *sum += value;
        }
        println!(
            "  {key:<8} {:>8} {:>12} {:>6} {:>10} {:>6} {:>7} {:>8} {:>8}",
            row[0],
            row[1],
            outcome_cell(row[2]),
            outcome_cell(row[3]),
            outcome_cell(row[4]),
            row[5],
            millis(percentile(&latencies, 50)),
            millis(percentile(&latencies, 99)),
        );
    }
    println!(
        "  {:<8} {:>8} {:>12} {:>6} {:>10} {:>6} {:>7}\n",
        "total",
        total[0],
        total[1],
        outcome_cell(total[2]),
        outcome_cell(total[3]),
        outcome_cell(total[4]),
        total[5],
    );
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (sorted.len() * percent).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn millis(duration: Duration) -> String {
    format!("{} ms", duration.as_millis())
}
