//! The load harness behind `scripts/load`: a typical deployment on one machine, side by side with
//! what users would pick instead.
//!
//! One redis-server and 4 server processes (`examples/server.rs`, 2 worker threads each), and a
//! client that spreads a burst of N concurrent requests for a cold key over the 4 ports, as a
//! load balancer would, and releases them together. Strategies, all in the same run:
//!
//! - `no coalescing`: `/bare/{key}` on the 4 processes;
//! - `in-process only`: `/slow/{key}` on the memory backend (each process coalesces alone);
//! - `tower-parking + Redis`: `/slow/{key}` with `--redis`;
//! - `tower-parking + Redis Cluster`: the same on a cluster of 3 primaries (3 more
//!   redis-servers, made a cluster with `redis-cli --cluster create`);
//! - `nginx proxy_cache_lock`: nginx (4 workers) in front of `/bare/{key}` of the 4 processes.
//!
//! Then the steady-state hit path with wrk: requests per second of a warm `/slow/{key}` (memory
//! backend, Redis, Redis Cluster) against `/bare/{key}` with no work.
//!
//! Then steady load across TTL windows (issue 9; `--steady-only` runs it alone, in under a
//! minute): 4 processes on the Redis per strategy, TTL 1 s, W = 300 ms, one key, requests at a
//! fixed rate (400/s round-robin over the 4 ports) for 10 s, with no stale serving,
//! stale-while-revalidate (`--stale-ms 5000`) and stale-while-revalidate with early refresh
//! (`--early-refresh 1`), beside the hit path (the same load on a key that never expires). Handler
//! runs from each process's `/stats`, how many ran at once from polling it, p50/p99/max latency
//! and the p99 of every 100 ms over time.
//!
//! It writes `load-results.md`, `load-latency.svg` (the bursts) and `stale-latency.svg` (the
//! steady load) into `--out` (default `docs`). A run that leaves a part out (`--steady-only`,
//! `--no-steady`) keeps that part of the existing `load-results.md` as it was.
//!
//! Run it through `scripts/load`, which installs what it needs and builds in release mode:
//! `cargo run --release --example load -- --help` lists the options.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Barrier,
};

const USAGE: &str = "\
usage: load [--requests N] [--work-ms W[,W...]] [--repeats R] [--ttl-ms T] [--wrk-seconds S]
            [--steady-rate R] [--steady-seconds S] [--steady-only] [--no-steady]
            [--server PATH] [--out DIR] [--no-nginx] [--no-cluster] [--no-wrk]

  --requests N        burst size, spread evenly over the 4 processes      (default 400)
  --work-ms W,...     handler work per set of bursts, in milliseconds      (default 300,50)
  --repeats R         bursts per strategy and work, each on a fresh key    (default 3)
  --ttl-ms T          TTL window of the servers and of nginx's cache       (default 10000)
  --wrk-seconds S     duration of each wrk run of the hit path             (default 5)
  --steady-rate R     steady load: requests per second over the 4 processes (default 400)
  --steady-seconds S  steady load: how long each strategy is loaded, 1-20  (default 10)
  --steady-only       run only the steady load (TTL 1 s, W = 300 ms) and rewrite only its
                      section of load-results.md
  --no-steady         skip the steady load (and keep its section of load-results.md)
  --server PATH       the server example binary           (default: next to this binary)
  --out DIR           where load-results.md, load-latency.svg and stale-latency.svg go
                                                                            (default docs)
  --no-nginx          skip the nginx strategy
  --no-cluster        skip the Redis Cluster strategy (3 primaries)
  --no-wrk            skip the hit-path measurement";

const PROCESSES: usize = 4;
const NO_COALESCING: &str = "no coalescing";
const IN_PROCESS: &str = "in-process only";
const REDIS: &str = "tower-parking + Redis";
const REDIS_CLUSTER: &str = "tower-parking + Redis Cluster";
const NGINX: &str = "nginx proxy_cache_lock";
const WORKER_THREADS: &str = "2";

struct Options {
    requests: usize,
    work_ms: Vec<u64>,
    repeats: usize,
    ttl_ms: u64,
    wrk_seconds: u64,
    steady_rate: u64,
    steady_seconds: u64,
    bursts: bool,
    steady: bool,
    server: PathBuf,
    out: PathBuf,
    nginx: bool,
    cluster: bool,
    wrk: bool,
}

fn parse_options() -> Result<Options, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut options = Options {
        requests: 400,
        work_ms: vec![300, 50],
        repeats: 3,
        ttl_ms: 10_000,
        wrk_seconds: 5,
        steady_rate: 400,
        steady_seconds: 10,
        bursts: true,
        steady: true,
        server: exe.with_file_name("server"),
        out: PathBuf::from("docs"),
        nginx: true,
        cluster: true,
        wrk: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        match flag.as_str() {
            "--requests" => options.requests = number(value()?)? as usize,
            "--work-ms" => {
                options.work_ms = value()?
                    .split(',')
                    .map(|w| number(w.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--repeats" => options.repeats = number(value()?)? as usize,
            "--ttl-ms" => options.ttl_ms = number(value()?)?,
            "--wrk-seconds" => options.wrk_seconds = number(value()?)?,
            "--steady-rate" => options.steady_rate = number(value()?)?,
            "--steady-seconds" => options.steady_seconds = number(value()?)?,
            "--steady-only" => {
                options.bursts = false;
                options.wrk = false;
            }
            "--no-steady" => options.steady = false,
            "--server" => options.server = PathBuf::from(value()?),
            "--out" => options.out = PathBuf::from(value()?),
            "--no-nginx" => options.nginx = false,
            "--no-cluster" => options.cluster = false,
            "--no-wrk" => options.wrk = false,
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if options.requests < PROCESSES || options.repeats == 0 || options.work_ms.is_empty() {
        return Err("--requests must be at least 4, --repeats and --work-ms non-empty".into());
    }
    if !options.bursts && !options.steady {
        return Err("--steady-only and --no-steady leave nothing to run".into());
    }
    // Bounded: at most 20 s of load per strategy (under 2 minutes for the four), at most 2,000
    // requests a second.
    if !(1..=20).contains(&options.steady_seconds)
        || !(PROCESSES as u64..=2_000).contains(&options.steady_rate)
    {
        return Err("--steady-seconds must be 1 to 20, --steady-rate 4 to 2000".into());
    }
    Ok(options)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("load: {error}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(error) = run(options).await {
        eprintln!("load: {error}");
        std::process::exit(1);
    }
}

/// A child process that is killed (and reaped) however the harness ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits until something accepts connections on `addr`.
async fn wait_for_port(addr: SocketAddr, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not accept connections on {addr} within 10 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn start_redis(dir: &Path) -> Result<(Killed, String), String> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--notify-keyspace-events", "Kg$x", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start redis-server ({e}): run scripts/load, which installs it")
        })?;
    let child = Killed(child);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "redis-server").await?;
    Ok((child, format!("redis://127.0.0.1:{port}")))
}

/// Starts 3 redis-servers in cluster mode, makes them a cluster of 3 primaries (no replicas: the
/// harness measures the fleet's protocol, not failover) and waits until every node says the
/// cluster is ok. Returns the nodes and the cluster's URL, with every node as a seed.
async fn start_redis_cluster(dir: &Path) -> Result<(Vec<Killed>, String), String> {
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..3 {
        let (port, bus) = (free_port()?, free_port()?);
        let node_dir = dir.join(format!("cluster-{port}"));
        std::fs::create_dir_all(&node_dir).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--notify-keyspace-events", "Kg$x"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
            ])
            .args(["--cluster-config-file", "nodes.conf", "--dir"])
            .arg(&node_dir)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}): run scripts/load, which installs it")
            })?;
        nodes.push(Killed(child));
        wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "redis-server").await?;
        ports.push(port);
    }
    let addresses: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run redis-cli ({e}): run scripts/load, which installs it"))?;
    if !created.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in &ports {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "CLUSTER", "INFO"])
                .output()
                .map_err(|e| e.to_string())?;
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the cluster's node {port} is not ok after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let seeds: Vec<String> = addresses[1..].iter().map(|a| format!("node={a}")).collect();
    Ok((
        nodes,
        format!("redis-cluster://{}?{}", addresses[0], seeds.join("&")),
    ))
}

/// One server example process, started with `args`; returns once it printed its address.
fn start_server(options: &Options, args: &[String]) -> Result<(Killed, SocketAddr), String> {
    let mut child = Command::new(&options.server)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("TOKIO_WORKER_THREADS", WORKER_THREADS)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} ({e}): build it with --example server",
                options.server.display()
            )
        })?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let child = Killed(child);
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    while stdout.read_line(&mut line).map_err(|e| e.to_string())? > 0 {
        if let Some(addr) = line.trim().strip_prefix("listening on ") {
            let addr = addr
                .parse()
                .map_err(|e| format!("bad address {addr}: {e}"))?;
            // Keep reading what it prints later, so a full pipe never blocks it.
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            return Ok((child, addr));
        }
        line.clear();
    }
    Err(format!(
        "{} never printed `listening on ADDR`",
        options.server.display()
    ))
}

/// A set of 4 server processes.
struct Fleet {
    _children: Vec<Killed>,
    addrs: Vec<SocketAddr>,
}

fn start_fleet(options: &Options, work_ms: u64, redis: Option<&str>) -> Result<Fleet, String> {
    start_fleet_with(options, work_ms, options.ttl_ms, redis, &[])
}

/// A set of 4 server processes with this TTL and `extra` arguments.
fn start_fleet_with(
    options: &Options,
    work_ms: u64,
    ttl_ms: u64,
    redis: Option<&str>,
    extra: &[&str],
) -> Result<Fleet, String> {
    let mut args = vec![
        "--work-ms".to_string(),
        work_ms.to_string(),
        "--ttl-ms".into(),
        ttl_ms.to_string(),
    ];
    if let Some(url) = redis {
        args.extend(["--redis".to_string(), url.to_string()]);
    }
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let mut fleet = Fleet {
        _children: Vec::new(),
        addrs: Vec::new(),
    };
    for _ in 0..PROCESSES {
        let (child, addr) = start_server(options, &args)?;
        fleet._children.push(child);
        fleet.addrs.push(addr);
    }
    Ok(fleet)
}

async fn start_nginx(
    dir: &Path,
    upstreams: &[SocketAddr],
    ttl_ms: u64,
) -> Result<(Killed, SocketAddr), String> {
    let port = free_port()?;
    let servers: String = upstreams
        .iter()
        .map(|addr| format!("        server {addr};\n"))
        .collect();
    let ttl_s = ttl_ms.div_ceil(1000);
    let config = format!(
        "worker_processes 4;
daemon off;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    proxy_cache_path {dir}/cache keys_zone=parking:10m;
    upstream app {{
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_cache parking;
            proxy_cache_valid 200 {ttl_s}s;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
        }}
    }}
}}
",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start nginx ({e}): run scripts/load, which installs it"))?;
    let child = Killed(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, "nginx").await?;
    Ok((child, addr))
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let reply = get(&mut stream, addr, path).await?;
    serde_json::from_slice(&reply.body).map_err(|e| format!("{addr}{path}: not JSON: {e}"))
}

/// Handler runs across the fleet: the /slow handler's, or the /bare handler's.
async fn executions(fleet: &Fleet, field: &str) -> Result<u64, String> {
    let mut total = 0;
    for addr in &fleet.addrs {
        let stats = get_json(*addr, "/stats").await?;
        total += stats[field]
            .as_u64()
            .ok_or_else(|| format!("{addr}/stats has no `{field}`: {stats}"))?;
    }
    Ok(total)
}

/// One request's result: latency, status and body.
struct Answer {
    latency: Duration,
    status: u16,
    body: Bytes,
}

/// Sends `n` requests for `path`, spread round-robin over `targets`, each on its own connection
/// opened beforehand, all released together.
///
/// Plain HTTP/1.1 over the socket rather than a client library: one task and two syscalls a
/// request, so the client adds as little as it can to the latency it measures on a machine whose
/// cores it shares with the servers.
async fn burst(targets: &[SocketAddr], path: &str, n: usize) -> Result<Vec<Answer>, String> {
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let addr = targets[i % targets.len()];
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let path = path.to_owned();
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let reply = get(&mut stream, addr, &path).await?;
            Ok::<_, String>(Answer {
                latency: start.elapsed(),
                status: reply.status,
                body: reply.body,
            })
        }));
    }
    barrier.wait().await;
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.map_err(|e| e.to_string())??);
    }
    Ok(answers)
}

/// `GET path` on an open connection: plain HTTP/1.1, the only client the harness uses. Every
/// request names one host, whichever server it reaches, as behind a load balancer: the layer's
/// default key holds the authority.
async fn get(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<Reply, String> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: app.example\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    read_response(stream)
        .await
        .map_err(|e| format!("{addr}{path}: {e}"))
}

/// One HTTP/1.1 response: its status, its `x-parking` header (how the layer served it) and its
/// body.
struct Reply {
    status: u16,
    parking: Option<String>,
    body: Bytes,
}

/// Reads one HTTP/1.1 response with a `content-length` (what the server and nginx send here).
async fn read_response(stream: &mut TcpStream) -> Result<Reply, String> {
    let mut buffer = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if stream
            .read_buf(&mut buffer)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("connection closed before the response head".into());
        }
    };
    let head =
        std::str::from_utf8(&buffer[..head_end]).map_err(|_| "response head is not UTF-8")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let field = |wanted: &str| {
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(wanted).then(|| value.trim())
        })
    };
    let length: usize = field("content-length")
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    let parking = field("x-parking").map(str::to_owned);
    while buffer.len() < head_end + length {
        if stream
            .read_buf(&mut buffer)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("connection closed before the end of the body".into());
        }
    }
    Ok(Reply {
        status,
        parking,
        body: Bytes::copy_from_slice(&buffer[head_end..head_end + length]),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One burst's figures.
struct Run {
    work_ms: u64,
    strategy: &'static str,
    run: usize,
    handler_runs: u64,
    /// Latencies in milliseconds, sorted.
    latencies: Vec<f64>,
    all_ok: bool,
    distinct_bodies: usize,
}

impl Run {
    fn new(
        work_ms: u64,
        strategy: &'static str,
        run: usize,
        handler_runs: u64,
        answers: &[Answer],
    ) -> Self {
        let mut latencies: Vec<f64> = answers
            .iter()
            .map(|a| a.latency.as_secs_f64() * 1000.0)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let mut bodies: Vec<&Bytes> = answers.iter().map(|a| &a.body).collect();
        bodies.sort();
        bodies.dedup();
        Run {
            work_ms,
            strategy,
            run,
            handler_runs,
            latencies,
            all_ok: answers.iter().all(|a| a.status == 200),
            distinct_bodies: bodies.len(),
        }
    }

    fn p(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }

    /// Every request's wait beyond the work (latency minus W), at least `lowest` ms.
    fn waits_beyond_work(&self, lowest: f64) -> impl Iterator<Item = f64> + '_ {
        self.latencies
            .iter()
            .map(move |ms| (ms - self.work_ms as f64).max(lowest))
    }

    /// The wait beyond the work: latency minus W, at percentile `p`.
    fn beyond(&self, p: f64) -> f64 {
        (self.p(p) - self.work_ms as f64).max(0.0)
    }
}

struct Strategy {
    name: &'static str,
    targets: Vec<SocketAddr>,
    path: &'static str,
    /// The fleet whose counter tells the handler runs, and the counter's name in /stats.
    fleet: usize,
    counter: &'static str,
}

async fn run(options: Options) -> Result<(), String> {
    let dir = tempdir()?;
    let (_redis, redis_url) = start_redis(&dir).await?;
    println!("redis-server at {redis_url}; {PROCESSES} server processes per strategy, {WORKER_THREADS} worker threads each");
    let (_cluster, cluster_url) = match options.cluster && options.bursts {
        true => {
            let (nodes, url) = start_redis_cluster(&dir).await?;
            println!("Redis Cluster at {url}");
            (nodes, Some(url))
        }
        false => (Vec::new(), None),
    };

    let bursts = match options.bursts {
        true => Some(run_bursts(&options, &redis_url, cluster_url.as_deref(), &dir).await?),
        false => None,
    };
    let steady = match options.steady {
        true => Some(run_steady(&options, &redis_url).await?),
        false => None,
    };

    std::fs::create_dir_all(&options.out).map_err(|e| e.to_string())?;
    let results = options.out.join("load-results.md");
    // The parts this run left out stay as the last run that measured them wrote them.
    let existing = std::fs::read_to_string(&results).unwrap_or_default();
    let (kept_bursts, kept_steady) = split_report(&existing);
    let mut written = vec![results.clone()];
    let bursts_part = match &bursts {
        Some((runs, hit_path)) => {
            let svg = options.out.join("load-latency.svg");
            std::fs::write(&svg, plot(runs, &options.work_ms)).map_err(|e| e.to_string())?;
            written.push(svg);
            report(&options, runs, hit_path.as_ref())
        }
        None => kept_bursts,
    };
    let steady_part = match &steady {
        Some(strategies) => {
            let svg = options.out.join("stale-latency.svg");
            std::fs::write(&svg, steady_plot(&options, strategies)).map_err(|e| e.to_string())?;
            written.push(svg);
            Some(steady_report(&options, strategies))
        }
        None => kept_steady,
    };
    let mut file = bursts_part.trim_end().to_string();
    if let Some(steady_part) = steady_part {
        if !file.is_empty() {
            file.push_str("\n\n");
        }
        file.push_str(steady_part.trim_end());
    }
    file.push('\n');
    std::fs::write(&results, &file).map_err(|e| e.to_string())?;
    println!("\n{file}");
    let written: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("written: {}", written.join(", "));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The bursts on cold keys, then the hit path with wrk.
async fn run_bursts(
    options: &Options,
    redis_url: &str,
    cluster_url: Option<&str>,
    dir: &Path,
) -> Result<(Vec<Run>, Option<HitPath>), String> {
    let mut runs = Vec::new();
    for &work_ms in &options.work_ms {
        let memory = start_fleet(options, work_ms, None)?;
        let redis = start_fleet(options, work_ms, Some(redis_url))?;
        let cluster = match cluster_url {
            Some(url) => Some(start_fleet(options, work_ms, Some(url))?),
            None => None,
        };
        let nginx_dir = dir.join(format!("nginx-{work_ms}"));
        std::fs::create_dir_all(&nginx_dir).map_err(|e| e.to_string())?;
        let nginx = match options.nginx {
            true => Some(start_nginx(&nginx_dir, &memory.addrs, options.ttl_ms).await?),
            false => None,
        };
        let mut fleets = vec![&memory, &redis];
        let mut strategies = vec![
            Strategy {
                name: NO_COALESCING,
                targets: memory.addrs.clone(),
                path: "bare",
                fleet: 0,
                counter: "bare_executions",
            },
            Strategy {
                name: IN_PROCESS,
                targets: memory.addrs.clone(),
                path: "slow",
                fleet: 0,
                counter: "executions",
            },
            Strategy {
                name: REDIS,
                targets: redis.addrs.clone(),
                path: "slow",
                fleet: 1,
                counter: "executions",
            },
        ];
        if let Some(cluster) = &cluster {
            fleets.push(cluster);
            strategies.push(Strategy {
                name: REDIS_CLUSTER,
                targets: cluster.addrs.clone(),
                path: "slow",
                fleet: fleets.len() - 1,
                counter: "executions",
            });
        }
        if let Some((_, addr)) = &nginx {
            strategies.push(Strategy {
                name: NGINX,
                targets: vec![*addr],
                path: "bare",
                fleet: 0,
                counter: "bare_executions",
            });
        }
        for strategy in &strategies {
            // One burst that is not reported: fresh processes pay for their first connections,
            // allocations and scripts once, which a deployment that has been up a while does not.
            let warm_up = format!("/{}/warm-up-{work_ms}-{}", strategy.path, unique());
            burst(&strategy.targets, &warm_up, options.requests).await?;
            for run in 1..=options.repeats {
                let key = format!("w{work_ms}-{}-{run}-{}", strategy.path, unique());
                let before = executions(fleets[strategy.fleet], strategy.counter).await?;
                let answers = burst(
                    &strategy.targets,
                    &format!("/{}/{key}", strategy.path),
                    options.requests,
                )
                .await?;
                let after = executions(fleets[strategy.fleet], strategy.counter).await?;
                let run = Run::new(work_ms, strategy.name, run, after - before, &answers);
                println!(
                    "W={work_ms:>3} ms  {:<29} run {}  handler runs {:>3}  p50 {:>7.1}  p99 {:>7.1}  max {:>7.1} ms",
                    run.strategy, run.run, run.handler_runs, run.p(50.0), run.p(99.0), run.p(100.0)
                );
                runs.push(run);
            }
        }
        drop(nginx);
        drop((memory, redis, cluster));
    }

    let hit_path = match options.wrk {
        true => Some(measure_hit_path(options, redis_url, cluster_url).await?),
        false => None,
    };
    Ok((runs, hit_path))
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn tempdir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "tower-parking-load-{}-{}",
        std::process::id(),
        unique()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Requests per second of each route on a warm key, with wrk.
struct HitPath {
    rows: Vec<(&'static str, f64)>,
}

async fn measure_hit_path(
    options: &Options,
    redis_url: &str,
    cluster_url: Option<&str>,
) -> Result<HitPath, String> {
    let memory = start_fleet(options, 0, None)?;
    let redis = start_fleet(options, 0, Some(redis_url))?;
    let cluster = match cluster_url {
        Some(url) => Some(start_fleet(options, 0, Some(url))?),
        None => None,
    };
    let mut targets = vec![
        (
            "/bare/{key}, no work (baseline)",
            memory.addrs[0],
            "/bare/warm",
        ),
        (
            "/slow/{key} hit, memory backend",
            memory.addrs[0],
            "/slow/warm",
        ),
        (
            "/slow/{key} hit, Redis backend",
            redis.addrs[0],
            "/slow/warm",
        ),
    ];
    if let Some(cluster) = &cluster {
        targets.push((
            "/slow/{key} hit, Redis Cluster backend",
            cluster.addrs[0],
            "/slow/warm",
        ));
    }
    let mut rows = Vec::new();
    for (name, addr, path) in targets {
        // Warm the key (and the connection pools) before measuring.
        get_json(addr, "/stats").await?;
        let _ = burst(&[addr], path, 1).await?;
        let output = Command::new("wrk")
            .args([
                "-t1",
                "-c32",
                &format!("-d{}s", options.wrk_seconds),
                &format!("http://{addr}{path}"),
            ])
            .output()
            .map_err(|e| format!("cannot run wrk ({e}): run scripts/load, which installs it"))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let rps = text
            .lines()
            .find_map(|line| line.strip_prefix("Requests/sec:"))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("wrk printed no Requests/sec:\n{text}"))?;
        println!("hit path: {name:<34} {rps:>10.0} requests/s");
        rows.push((name, rps));
    }
    Ok(HitPath { rows })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}), Linux, loopback")
}

fn report(options: &Options, runs: &[Run], hit_path: Option<&HitPath>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {}. Command: `scripts/load` (N = {} requests per burst over {PROCESSES} processes × {WORKER_THREADS} worker threads, {} bursts per strategy, fresh key each).\n",
        machine(),
        options.requests,
        options.repeats
    );
    for &work_ms in &options.work_ms {
        let _ = writeln!(
            out,
            "**W = {work_ms} ms** (latency in ms; \"beyond W\" = latency − W)\n"
        );
        let _ = writeln!(out, "| strategy | run | handler runs | p50 | p90 | p99 | max | beyond W p50 | beyond W p99 | all 200 | distinct bodies |");
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
        for run in runs.iter().filter(|r| r.work_ms == work_ms) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
                run.strategy,
                run.run,
                run.handler_runs,
                run.p(50.0),
                run.p(90.0),
                run.p(99.0),
                run.p(100.0),
                run.beyond(50.0),
                run.beyond(99.0),
                if run.all_ok { "yes" } else { "NO" },
                run.distinct_bodies
            );
        }
        let worst_p99 = |name: &str| {
            runs.iter()
                .filter(|r| r.work_ms == work_ms && r.strategy == name)
                .map(|r| r.beyond(99.0))
                .fold(f64::NAN, f64::max)
        };
        let ours = worst_p99(REDIS);
        let floor = worst_p99(NO_COALESCING);
        let _ = write!(
            out,
            "\nFollowers' wait beyond W, worst p99 over the runs: tower-parking + Redis {ours:.1} ms. \
             Floor: {floor:.1} ms for no coalescing, where nobody waits for anybody, so it is what a \
             burst of {} requests costs on this machine alone; tower-parking + Redis is {} it.",
            options.requests,
            against_floor(ours - floor)
        );
        let cluster = worst_p99(REDIS_CLUSTER);
        if !cluster.is_nan() {
            let _ = write!(
                out,
                " On a Redis Cluster of 3 primaries: {cluster:.1} ms, {} the floor.",
                against_floor(cluster - floor)
            );
        }
        let nginx = worst_p99(NGINX);
        if !nginx.is_nan() {
            let _ = write!(
                out,
                " nginx: {nginx:.1} ms, {:.0}× tower-parking's.",
                nginx / ours.max(0.1)
            );
        }
        out.push_str("\n\n");
    }
    if let Some(hit_path) = hit_path {
        let baseline = hit_path.rows[0].1;
        let _ = writeln!(out, "**Hit path** (wrk -t1 -c32, {} s each, one process with {WORKER_THREADS} worker threads)\n", options.wrk_seconds);
        let _ = writeln!(out, "| route | requests/s | ratio to bare |");
        let _ = writeln!(out, "|---|---|---|");
        for (name, rps) in &hit_path.rows {
            let _ = writeln!(out, "| {name} | {rps:.0} | {:.2} |", rps / baseline);
        }
    }
    out
}

/// `2.1 ms above` or `0.3 ms below`: a difference to the floor, which noise can make negative.
fn against_floor(difference: f64) -> String {
    match difference >= 0.0 {
        true => format!("{difference:.1} ms above"),
        false => format!("{:.1} ms below", -difference),
    }
}

/// A latency distribution plot: one panel per work duration, one curve per strategy (all runs
/// pooled): the share of requests answered within a wait beyond W, on a log axis, so a waiter
/// that polls every 500 ms and one woken within a millisecond are told apart at a glance.
fn plot(runs: &[Run], work: &[u64]) -> String {
    const COLORS: [&str; 5] = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#1f77b4"];
    const LOWEST_MS: f64 = 0.5;
    let (panel_w, panel_h, margin) = (520.0, 300.0, 70.0);
    let width = margin + work.len() as f64 * (panel_w + margin);
    let height = panel_h + 2.0 * margin + 50.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let mut strategies: Vec<&str> = Vec::new();
    for run in runs {
        if !strategies.contains(&run.strategy) {
            strategies.push(run.strategy);
        }
    }
    let max = runs
        .iter()
        .flat_map(|r| r.waits_beyond_work(LOWEST_MS))
        .fold(10.0, f64::max);
    let (lo, hi) = (LOWEST_MS.log10(), (max * 1.5).log10());
    for (panel, &work_ms) in work.iter().enumerate() {
        let x0 = margin + panel as f64 * (panel_w + margin);
        let y0 = margin;
        let x = |ms: f64| x0 + (ms.log10() - lo) / (hi - lo) * panel_w;
        let y = |share: f64| y0 + panel_h - share * panel_h;
        let _ = writeln!(
            svg,
            "<text x=\"{x0}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">W = {work_ms} ms: \
             share of requests answered within a wait beyond W</text>",
            y0 - 20.0
        );
        let _ = writeln!(
            svg,
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{panel_w}\" height=\"{panel_h}\" fill=\"none\" stroke=\"#888\"/>"
        );
        let mut decade = 10f64.powf(lo.floor());
        while decade <= 10f64.powf(hi) {
            for step in [1.0, 2.0, 5.0] {
                let ms = decade * step;
                if (lo..=hi).contains(&ms.log10()) {
                    let _ = writeln!(
                        svg,
                        "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{y0}\" y2=\"{1}\" stroke=\"#eee\"/>\
                         <text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{ms}</text>",
                        x(ms),
                        y0 + panel_h,
                        y0 + panel_h + 15.0
                    );
                }
            }
            decade *= 10.0;
        }
        for share in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let _ = writeln!(
                svg,
                "<line x1=\"{x0}\" x2=\"{1}\" y1=\"{2:.1}\" y2=\"{2:.1}\" stroke=\"#eee\"/>\
                 <text x=\"{0}\" y=\"{3:.1}\" text-anchor=\"end\">{4}%</text>",
                x0 - 5.0,
                x0 + panel_w,
                y(share),
                y(share) + 4.0,
                share * 100.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">wait beyond W (latency − W), ms, log scale</text>",
            x0 + panel_w / 2.0,
            y0 + panel_h + 34.0
        );
        for (i, strategy) in strategies.iter().enumerate() {
            let mut waits: Vec<f64> = runs
                .iter()
                .filter(|r| r.work_ms == work_ms && r.strategy == *strategy)
                .flat_map(|r| r.waits_beyond_work(LOWEST_MS))
                .collect();
            if waits.is_empty() {
                continue;
            }
            waits.sort_by(f64::total_cmp);
            let points: Vec<String> = waits
                .iter()
                .enumerate()
                .map(|(rank, ms)| {
                    format!(
                        "{:.1},{:.1}",
                        x(*ms),
                        y((rank + 1) as f64 / waits.len() as f64)
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
                COLORS[i % COLORS.len()],
                points.join(" ")
            );
        }
    }
    for (i, strategy) in strategies.iter().enumerate() {
        let lx = margin + i as f64 * 220.0;
        let ly = height - 18.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{lx}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{strategy}</text>",
            ly - 6.0,
            COLORS[i % COLORS.len()],
            lx + 20.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

// ---------------------------------------------------------------------------------------------
// Steady load across TTL windows (issue 9): stale-while-revalidate and early refresh.

/// The steady load's TTL and work: a window short enough that 10 s cross several of them.
const STEADY_TTL_MS: u64 = 1_000;
const STEADY_WORK_MS: u64 = 300;
/// How often each process's `/stats` is read to see when runs start.
const STATS_EVERY: Duration = Duration::from_millis(5);
/// The width of a bucket of the p99-over-time plot.
const BUCKET_MS: u64 = 100;
/// No request of the steady load waits longer than this for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections opened to each process before the load; more are opened if these are all busy.
const CONNECTIONS_PER_PROCESS: usize = 40;
/// The hit-path reference: the first steady strategy, on a key that does not expire.
const HIT_PATH: &str = "hit path (no expiry)";

/// One steady-load strategy: a fleet started with these arguments.
struct SteadyStrategy {
    name: &'static str,
    ttl_ms: u64,
    args: &'static [&'static str],
    color: &'static str,
    /// Whether it serves stale responses: the targets apply to it.
    stale: bool,
}

const STEADY_STRATEGIES: [SteadyStrategy; 4] = [
    SteadyStrategy {
        name: HIT_PATH,
        // Ten minutes: every request of the load is a hit.
        ttl_ms: 600_000,
        args: &[],
        color: "#7f7f7f",
        stale: false,
    },
    SteadyStrategy {
        name: "no stale serving",
        ttl_ms: STEADY_TTL_MS,
        args: &[],
        color: "#d62728",
        stale: false,
    },
    SteadyStrategy {
        name: "stale-while-revalidate",
        ttl_ms: STEADY_TTL_MS,
        args: &["--stale-ms", "5000"],
        color: "#2ca02c",
        stale: true,
    },
    SteadyStrategy {
        name: "stale-while-revalidate + early refresh",
        ttl_ms: STEADY_TTL_MS,
        args: &["--stale-ms", "5000", "--early-refresh", "1"],
        color: "#1f77b4",
        stale: true,
    },
];

/// Idle keep-alive connections to one process, shared by the requests of the steady load.
struct Pool {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
    opened: AtomicUsize,
}

impl Pool {
    async fn new(addr: SocketAddr, size: usize) -> Result<Self, String> {
        let pool = Pool {
            addr,
            idle: Mutex::new(Vec::with_capacity(size)),
            opened: AtomicUsize::new(0),
        };
        for _ in 0..size {
            let stream = pool.connect().await?;
            pool.give_back(stream);
        }
        Ok(pool)
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("{}: {e}", self.addr))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(stream)
    }

    /// An idle connection, or a new one when every connection is busy.
    async fn take(&self) -> Result<TcpStream, String> {
        let idle = self.lock().pop();
        match idle {
            Some(stream) => Ok(stream),
            None => self.connect().await,
        }
    }

    fn give_back(&self, stream: TcpStream) {
        self.lock().push(stream);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
        // Never held across an await; a poisoned lock still holds sound connections.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request of the steady load.
struct Sample {
    /// When it was sent, from the start of the load.
    at: Duration,
    /// Its latency, from just before it took a connection to the end of its body.
    latency: Duration,
    /// How far behind its schedule the client sent it.
    lag: Duration,
    reply: Result<Reply, String>,
}

/// One strategy's steady load.
struct SteadyRun {
    strategy: &'static SteadyStrategy,
    samples: Vec<Sample>,
    /// Latencies of the answered requests, in milliseconds, sorted.
    latencies: Vec<f64>,
    /// Handler runs across the fleet during the load (from `/stats`, before and after).
    handler_runs: u64,
    /// The handler runs polling `/stats` saw start during the load, in order of start.
    runs: Vec<HandlerRun>,
    /// The priming request's latency (the first window's miss), in milliseconds.
    prime_ms: f64,
    /// Connections the client opened in all.
    connections: usize,
}

impl SteadyRun {
    fn p(&self, p: f64) -> f64 {
        match self.latencies.is_empty() {
            true => f64::NAN,
            false => percentile(&self.latencies, p),
        }
    }

    fn errors(&self) -> usize {
        self.samples
            .iter()
            .filter(|s| !matches!(&s.reply, Ok(reply) if reply.status == 200))
            .count()
    }

    /// How many answers the layer served each way (`x-parking`).
    fn outcomes(&self) -> BTreeMap<String, usize> {
        let mut outcomes = BTreeMap::new();
        for sample in &self.samples {
            if let Ok(reply) = &sample.reply {
                let outcome = reply.parking.clone().unwrap_or_else(|| "none".into());
                *outcomes.entry(outcome).or_insert(0) += 1;
            }
        }
        outcomes
    }

    /// Answers that waited for a handler run: its leader's (`miss`) and those parked on it.
    fn waited_for_a_run(&self) -> usize {
        let outcomes = self.outcomes();
        ["miss", "parked", "coalesced", "timeout"]
            .iter()
            .map(|o| outcomes.get(*o).copied().unwrap_or(0))
            .sum()
    }

    fn at_least_work(&self) -> usize {
        self.latencies
            .iter()
            .filter(|&&ms| ms >= STEADY_WORK_MS as f64)
            .count()
    }

    /// Pairs of runs that certainly ran at once: each began before the other could have ended
    /// (a run lasts at least W).
    fn proven_overlaps(&self) -> usize {
        let work = Duration::from_millis(STEADY_WORK_MS);
        let mut pairs = 0;
        for (i, a) in self.runs.iter().enumerate() {
            for b in &self.runs[i + 1..] {
                if b.started.1 < a.started.0 + work && a.started.1 < b.started.0 + work {
                    pairs += 1;
                }
            }
        }
        pairs
    }

    /// Of the pairs of consecutive runs, how many are proven apart (the earlier one's response
    /// was answered before the later one could have begun), and how many pairs there are. All
    /// of them proven apart: never two runs at once.
    fn proven_apart(&self) -> (usize, usize) {
        let apart = self
            .runs
            .windows(2)
            .filter(|pair| {
                pair[0]
                    .landed
                    .is_some_and(|landed| landed <= pair[1].started.0)
            })
            .count();
        (apart, self.runs.len().saturating_sub(1))
    }

    /// What the table says about runs at once.
    fn at_once(&self) -> String {
        let overlaps = self.proven_overlaps();
        let (apart, pairs) = self.proven_apart();
        match (overlaps, pairs) {
            (0, 0) => "never (one run or none)".into(),
            (0, _) if apart == pairs => format!("never ({apart} of {pairs} pairs proven apart)"),
            (0, _) => format!(
                "none proven ({apart} of {pairs} pairs proven apart, {} within the polling step)",
                pairs - apart
            ),
            (overlaps, _) => format!("**{overlaps} pairs**"),
        }
    }

    /// The median time from a run's response first reaching a client to the next run's start
    /// (its polled midpoint).
    fn median_idle(&self) -> Option<f64> {
        let mut idle: Vec<f64> = self
            .runs
            .windows(2)
            .filter_map(|pair| {
                let landed = pair[0].landed?;
                Some((pair[1].start().as_secs_f64() - landed.as_secs_f64()) * 1_000.0)
            })
            .collect();
        idle.sort_by(f64::total_cmp);
        (!idle.is_empty()).then(|| percentile(&idle, 50.0))
    }

    /// The shortest time between two runs' starts (their polled midpoints).
    fn min_gap(&self) -> Option<Duration> {
        self.runs
            .windows(2)
            .map(|pair| pair[1].start().saturating_sub(pair[0].start()))
            .min()
    }

    fn max_lag(&self) -> Duration {
        self.samples.iter().map(|s| s.lag).max().unwrap_or_default()
    }

    /// The p99 latency of the requests sent in each `BUCKET_MS` of the load.
    fn p99_per_bucket(&self, seconds: u64) -> Vec<Option<f64>> {
        let buckets = (seconds * 1_000 / BUCKET_MS) as usize;
        let mut per_bucket = vec![Vec::new(); buckets];
        for sample in self.samples.iter().filter(|s| s.reply.is_ok()) {
            let bucket = (sample.at.as_millis() as u64 / BUCKET_MS) as usize;
            if let Some(latencies) = per_bucket.get_mut(bucket.min(buckets - 1)) {
                latencies.push(sample.latency.as_secs_f64() * 1_000.0);
            }
        }
        per_bucket
            .into_iter()
            .map(|mut latencies| {
                latencies.sort_by(f64::total_cmp);
                (!latencies.is_empty()).then(|| percentile(&latencies, 99.0))
            })
            .collect()
    }
}

/// Every steady strategy in turn, each on a fleet of its own and a key of its own.
async fn run_steady(options: &Options, redis_url: &str) -> Result<Vec<SteadyRun>, String> {
    let began = Instant::now();
    println!(
        "\nsteady load: {} requests/s over {PROCESSES} processes for {} s per strategy, TTL {STEADY_TTL_MS} ms, W = {STEADY_WORK_MS} ms",
        options.steady_rate, options.steady_seconds
    );
    let mut runs = Vec::new();
    for strategy in &STEADY_STRATEGIES {
        let run = steady_load(options, redis_url, strategy).await?;
        println!(
            "{:<40} handler runs {:>2}  at once: {}  p50 {:>6.1}  p99 {:>6.1}  max {:>6.1} ms  waited for a run {:>4}  >= W {:>4}  errors {}",
            strategy.name,
            run.handler_runs,
            run.at_once(),
            run.p(50.0),
            run.p(99.0),
            run.p(100.0),
            run.waited_for_a_run(),
            run.at_least_work(),
            run.errors()
        );
        runs.push(run);
    }
    println!("steady load done in {:.1} s", began.elapsed().as_secs_f64());
    Ok(runs)
}

async fn steady_load(
    options: &Options,
    redis_url: &str,
    strategy: &'static SteadyStrategy,
) -> Result<SteadyRun, String> {
    let fleet = start_fleet_with(
        options,
        STEADY_WORK_MS,
        strategy.ttl_ms,
        Some(redis_url),
        strategy.args,
    )?;
    let mut pools = Vec::with_capacity(PROCESSES);
    for addr in &fleet.addrs {
        pools.push(Arc::new(Pool::new(*addr, CONNECTIONS_PER_PROCESS).await?));
    }
    let path = format!("/slow/steady-{}", unique());

    // The first window: one miss primes the key, then a hit through every other process (their
    // first Redis round trips), outside the figures.
    let prime = Instant::now();
    let reply = get_json(fleet.addrs[0], &path).await?;
    let prime_ms = prime.elapsed().as_secs_f64() * 1_000.0;
    if reply["work_ms"] != STEADY_WORK_MS {
        return Err(format!("{path}: unexpected answer {reply}"));
    }
    for addr in &fleet.addrs[1..] {
        get_json(*addr, &path).await?;
    }

    let before = executions(&fleet, "executions").await?;
    let total = options.steady_rate * options.steady_seconds;
    let period = Duration::from_secs(1).div_f64(options.steady_rate as f64);
    let load_for = Duration::from_secs(options.steady_seconds);
    // A run that starts at the very end still shows in /stats when this much later.
    let drain = Duration::from_millis(STEADY_WORK_MS + 200);
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_runs(
        fleet.addrs.clone(),
        start,
        start + load_for + drain + REQUEST_TIMEOUT,
        Arc::clone(&stop),
    ));

    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let pool = Arc::clone(&pools[i as usize % PROCESSES]);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let request = async {
                let mut stream = pool.take().await?;
                let reply = get(&mut stream, pool.addr, &path).await?;
                pool.give_back(stream);
                Ok::<_, String>(reply)
            };
            let reply = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
                Ok(reply) => reply,
                Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
            };
            Sample {
                at: sent - start,
                latency: sent.elapsed(),
                lag: sent.saturating_duration_since(scheduled),
                reply,
            }
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        samples.push(task.await.map_err(|e| e.to_string())?);
    }
    let until = start + load_for + drain;
    tokio::time::sleep_until(until.into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut runs = watcher.await.map_err(|e| e.to_string())??;
    let after = executions(&fleet, "executions").await?;

    // A run has certainly ended once any client has its response: the body names its process
    // and its number there.
    let mut landed: BTreeMap<(u64, u64), Duration> = BTreeMap::new();
    for sample in &samples {
        let Ok(reply) = &sample.reply else { continue };
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
            continue;
        };
        if let (Some(pid), Some(execution)) = (body["pid"].as_u64(), body["execution"].as_u64()) {
            let answered = sample.at + sample.latency;
            let first = landed.entry((pid, execution)).or_insert(answered);
            *first = answered.min(*first);
        }
    }
    for run in &mut runs {
        run.landed = landed.get(&(run.pid, run.execution)).copied();
    }
    runs.sort_by_key(|run| run.started);

    let mut latencies: Vec<f64> = samples
        .iter()
        .filter(|s| s.reply.is_ok())
        .map(|s| s.latency.as_secs_f64() * 1_000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(SteadyRun {
        strategy,
        samples,
        latencies,
        handler_runs: after - before,
        runs,
        prime_ms,
        connections: pools.iter().map(|p| p.opened.load(Ordering::Relaxed)).sum(),
    })
}

/// A handler run, as the client saw it.
struct HandlerRun {
    pid: u64,
    /// Its number in its process (`execution` in its body).
    execution: u64,
    /// It began after the first and at the latest at the second, from the start of the load:
    /// after the last read of `/stats` that did not count it was sent, by the time the first
    /// that did was answered.
    started: (Duration, Duration),
    /// When a client first had its response: it had ended by then.
    landed: Option<Duration>,
}

impl HandlerRun {
    /// The middle of the time it may have begun in.
    fn start(&self) -> Duration {
        self.started.0 + (self.started.1 - self.started.0) / 2
    }
}

/// Reads every process's `/stats` every `STATS_EVERY` until `stop` (or `deadline`), and returns
/// the handler runs that began meanwhile: the handler counts its run as it begins, so a count
/// that went up between two reads is a run that began between them.
async fn watch_runs(
    addrs: Vec<SocketAddr>,
    start: Instant,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Vec<HandlerRun>, String> {
    let mut streams = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        streams.push(
            TcpStream::connect(addr)
                .await
                .map_err(|e| format!("{addr}: {e}"))?,
        );
    }
    // Per process: the last count read, and when the read that found it was sent.
    let mut last: Vec<Option<(u64, Instant)>> = vec![None; addrs.len()];
    let mut runs = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for (i, (stream, addr)) in streams.iter_mut().zip(&addrs).enumerate() {
            let sent = Instant::now();
            let reply = get(stream, *addr, "/stats").await?;
            let read = Instant::now();
            let stats: serde_json::Value = serde_json::from_slice(&reply.body)
                .map_err(|e| format!("{addr}/stats: not JSON: {e}"))?;
            let (Some(count), Some(pid)) = (stats["executions"].as_u64(), stats["pid"].as_u64())
            else {
                return Err(format!(
                    "{addr}/stats has no `executions` or `pid`: {stats}"
                ));
            };
            if let Some((before, previous)) = last[i] {
                for execution in before + 1..=count {
                    runs.push(HandlerRun {
                        pid,
                        execution,
                        started: (
                            previous.saturating_duration_since(start),
                            read.saturating_duration_since(start),
                        ),
                        landed: None,
                    });
                }
            }
            last[i] = Some((count, sent));
        }
        next += STATS_EVERY;
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(runs)
}

const STEADY_BEGIN: &str =
    "<!-- steady load: begin (written by `scripts/load`; `scripts/load --steady-only` rewrites only this part) -->";
const STEADY_END: &str = "<!-- steady load: end -->";

/// The existing report, split into the bursts' part and the steady load's (markers included).
fn split_report(existing: &str) -> (String, Option<String>) {
    let Some(begin) = existing.find("<!-- steady load: begin") else {
        return (existing.to_string(), None);
    };
    let end = existing[begin..]
        .find(STEADY_END)
        .map_or(existing.len(), |end| begin + end + STEADY_END.len());
    let outside = format!("{}{}", &existing[..begin], &existing[end..]);
    (outside, Some(existing[begin..end].to_string()))
}

fn steady_report(options: &Options, runs: &[SteadyRun]) -> String {
    let seconds = options.steady_seconds;
    let windows = seconds * 1_000 / STEADY_TTL_MS;
    let mut out = String::new();
    let _ = writeln!(out, "{STEADY_BEGIN}\n");
    let _ = writeln!(
        out,
        "## Steady load across TTL windows: stale-while-revalidate and early refresh\n"
    );
    let _ = writeln!(
        out,
        "Machine: {}. Command: `scripts/load --steady-only` (this section alone; `scripts/load` runs it after the bursts). Per strategy, {PROCESSES} server \
         processes ({WORKER_THREADS} worker threads each) on one Redis, TTL {STEADY_TTL_MS} ms, \
         work W = {STEADY_WORK_MS} ms, one key, {} requests/s sent at fixed times round-robin over \
         the {PROCESSES} processes for {seconds} s ({} requests). A request's latency runs from just \
         before it takes a keep-alive connection (a new one when all are busy, so a slow answer \
         never holds back the next request) to the end of its body. Before the load, one miss \
         primes the key (the first window: W, outside the figures) and one hit goes through each \
         other process. The hit path: the same load on a key whose TTL (10 min) never runs out. \
         Handler runs: the fleet's `executions` in `/stats` before and {} ms after the load. \
         Runs at once: every process's `/stats` is read every {} ms, so a run is known to have \
         begun between two reads; it has ended by the time a client first gets its response \
         (its body names its process and number), and not before W after it began. Two runs \
         are proven apart when the first one's response reached a client before the read \
         preceding the second one's start; proven at once when each began before the other \
         could have ended. Gap: between the midpoints of consecutive runs' starts. Waited for a \
         run: answers with `x-parking` `miss`, `parked` or `coalesced`; ≥ W: answers that took \
         W or longer.\n",
        machine(),
        options.steady_rate,
        options.steady_rate * seconds,
        STEADY_WORK_MS + 200,
        STATS_EVERY.as_millis(),
    );
    let _ = writeln!(
        out,
        "| strategy | handler runs ({windows} TTL windows) | two runs at once | shortest gap between runs | p50 | p99 | max | hit | stale | waited for a run | ≥ W | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for run in runs {
        let outcomes = run.outcomes();
        let count = |o: &str| outcomes.get(o).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} |",
            run.strategy.name,
            run.handler_runs,
            run.at_once(),
            run.min_gap()
                .map_or("–".into(), |gap| format!("{} ms", gap.as_millis())),
            run.p(50.0),
            run.p(99.0),
            run.p(100.0),
            count("hit"),
            count("stale"),
            run.waited_for_a_run(),
            run.at_least_work(),
            run.errors(),
        );
    }
    let hit_p99 = runs
        .iter()
        .find(|r| r.strategy.name == HIT_PATH)
        .map_or(f64::NAN, |r| r.p(99.0));
    let _ = writeln!(
        out,
        "\nTargets, with stale serving: p99 over the whole run within 5 ms of the hit path's \
         ({hit_p99:.1} ms), no request waiting W after the first window, and runs one per TTL \
         window at most ({windows} in {seconds} s), never two at once across processes.\n"
    );
    for run in runs.iter().filter(|r| r.strategy.stale) {
        let p99 = run.p(99.0);
        let within = p99 - hit_p99 <= 5.0;
        let no_wait = run.waited_for_a_run() == 0 && run.at_least_work() == 0;
        let one_per_window = run.handler_runs <= windows;
        let (apart, pairs) = run.proven_apart();
        let at_once = match (run.proven_overlaps(), apart == pairs) {
            (0, true) => "met",
            (0, false) => "not proven",
            _ => "**not met**",
        };
        let verdict = |met: bool| if met { "met" } else { "**not met**" };
        let _ = writeln!(
            out,
            "- {}: p99 {p99:.1} ms, {:+.1} ms from the hit path's: {}; {} requests waited for \
             a run, {} took W or more (max {:.1} ms): {}; {} runs in {windows} windows: {} (the \
             next run began a median {} after a run's response was first served); two runs at \
             once: {}, {}.",
            run.strategy.name,
            p99 - hit_p99,
            verdict(within),
            run.waited_for_a_run(),
            run.at_least_work(),
            run.p(100.0),
            verdict(no_wait),
            run.handler_runs,
            verdict(one_per_window),
            run.median_idle()
                .map_or("–".into(), |ms| format!("{ms:.0} ms")),
            run.at_once(),
            at_once,
        );
    }
    let lag = runs.iter().map(|r| r.max_lag()).max().unwrap_or_default();
    let primes: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.prime_ms)).collect();
    let connections: Vec<String> = runs.iter().map(|r| r.connections.to_string()).collect();
    let _ = writeln!(
        out,
        "\nThe client sent every request at most {:.1} ms behind its schedule; it opened {} \
         connections per strategy (in table order); the priming misses took {} ms.\n",
        lag.as_secs_f64() * 1_000.0,
        connections.join(", "),
        primes.join(", ")
    );
    let _ = writeln!(
        out,
        "![p99 latency per {BUCKET_MS} ms over the steady load, per strategy](stale-latency.svg)\n"
    );
    let _ = writeln!(out, "{STEADY_END}");
    out
}

/// The p99 latency of every `BUCKET_MS` of the load over time, one curve per strategy, on a log
/// axis (the sawtooth of W without stale serving, flat at the hit path's with it), and below it
/// every handler run, from where polling saw it start to when a client first had its response.
fn steady_plot(options: &Options, runs: &[SteadyRun]) -> String {
    let seconds = options.steady_seconds;
    let (w, h, left, top) = (900.0, 340.0, 70.0, 50.0);
    let lane = 16.0;
    let lanes_top = top + h + 62.0;
    let width = left + w + 30.0;
    let height = lanes_top + lane * runs.len() as f64 + 30.0 + 18.0 * runs.len() as f64;
    let series: Vec<Vec<Option<f64>>> = runs.iter().map(|r| r.p99_per_bucket(seconds)).collect();
    let values = series.iter().flatten().flatten().copied();
    let (min, max) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let lo = if min.is_finite() {
        min.max(0.01).log10().floor()
    } else {
        -1.0
    };
    let hi = (max.max(STEADY_WORK_MS as f64) * 1.5).log10();
    let x = |ms: f64| left + ms / (seconds as f64 * 1_000.0) * w;
    let y = |ms: f64| top + h - (ms.max(10f64.powf(lo)).log10() - lo) / (hi - lo) * h;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">p99 latency per {BUCKET_MS} ms \
         of steady load ({} requests/s over {PROCESSES} processes, TTL {STEADY_TTL_MS} ms, W = {STEADY_WORK_MS} ms)</text>",
        top - 20.0,
        options.steady_rate
    );
    let _ = writeln!(
        svg,
        "<rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#888\"/>"
    );
    let mut decade = 10f64.powf(lo);
    while decade <= 10f64.powf(hi) {
        for step in [1.0, 2.0, 5.0] {
            let ms = decade * step;
            if (lo..=hi).contains(&ms.log10()) {
                let _ = writeln!(
                    svg,
                    "<line x1=\"{left}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/>\
                     <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{ms}</text>",
                    left + w,
                    y(ms),
                    left - 5.0,
                    y(ms) + 4.0
                );
            }
        }
        decade *= 10.0;
    }
    for second in 0..=seconds {
        let sx = x(second as f64 * 1_000.0);
        let _ = writeln!(
            svg,
            "<line x1=\"{sx:.1}\" x2=\"{sx:.1}\" y1=\"{top}\" y2=\"{}\" stroke=\"#eee\"/>\
             <text x=\"{sx:.1}\" y=\"{}\" text-anchor=\"middle\">{second}</text>",
            top + h,
            top + h + 15.0
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#444\" stroke-dasharray=\"4 4\"/>\
         <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">W = {STEADY_WORK_MS} ms</text>",
        left + w,
        y(STEADY_WORK_MS as f64),
        left + w - 4.0,
        y(STEADY_WORK_MS as f64) - 4.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since the load began, s (p99 of the requests sent in each {BUCKET_MS} ms; latency, ms, log scale)</text>",
        left + w / 2.0,
        top + h + 32.0
    );
    for (run, points) in runs.iter().zip(&series) {
        let points: Vec<String> = points
            .iter()
            .enumerate()
            .filter_map(|(i, p99)| {
                let mid = (i as f64 + 0.5) * BUCKET_MS as f64;
                p99.map(|ms| format!("{:.1},{:.1}", x(mid), y(ms)))
            })
            .collect();
        let dash = match run.strategy.name == HIT_PATH {
            true => " stroke-dasharray=\"6 3\"",
            false => "",
        };
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            run.strategy.color,
            points.join(" ")
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\">handler runs, from where polling /stats saw each start to when a client first had its response:</text>",
        lanes_top - 6.0
    );
    for (i, run) in runs.iter().enumerate() {
        let ly = lanes_top + i as f64 * lane;
        for handler_run in &run.runs {
            let from = handler_run.start().as_secs_f64() * 1_000.0;
            let to = handler_run
                .landed
                .map_or(from + STEADY_WORK_MS as f64, |landed| {
                    landed.as_secs_f64() * 1_000.0
                })
                .min(seconds as f64 * 1_000.0);
            if from < seconds as f64 * 1_000.0 {
                let _ = writeln!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\" fill-opacity=\"0.6\"/>",
                    x(from),
                    ly + 2.0,
                    x(to) - x(from),
                    lane - 4.0,
                    run.strategy.color
                );
            }
        }
    }
    let legend_top = lanes_top + lane * runs.len() as f64 + 20.0;
    for (i, run) in runs.iter().enumerate() {
        let ly = legend_top + i as f64 * 18.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{left}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{ly}\">{} \
             (p99 {:.1} ms, max {:.1} ms, {} handler runs)</text>",
            ly - 6.0,
            run.strategy.color,
            left + 20.0,
            run.strategy.name,
            run.p(99.0),
            run.p(100.0),
            run.handler_runs
        );
    }
    svg.push_str("</svg>\n");
    svg
}
