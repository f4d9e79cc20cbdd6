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
//! - `nginx proxy_cache_lock`: nginx (4 workers) in front of `/bare/{key}` of the 4 processes.
//!
//! Then the steady-state hit path with wrk: requests per second of a warm `/slow/{key}` against
//! `/bare/{key}` with no work.
//!
//! Run it through `scripts/load`, which installs what it needs and builds in release mode:
//! `cargo run --release --example load -- --help` lists the options.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
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
            [--server PATH] [--out DIR] [--no-nginx] [--no-wrk]

  --requests N      burst size, spread evenly over the 4 processes      (default 400)
  --work-ms W,...   handler work per set of bursts, in milliseconds      (default 300,50)
  --repeats R       bursts per strategy and work, each on a fresh key    (default 3)
  --ttl-ms T        TTL window of the servers and of nginx's cache       (default 10000)
  --wrk-seconds S   duration of each wrk run of the hit path             (default 5)
  --server PATH     the server example binary         (default: next to this binary)
  --out DIR         where results.md and latency.svg go                  (default results)
  --no-nginx        skip the nginx strategy
  --no-wrk          skip the hit-path measurement";

const PROCESSES: usize = 4;
const NO_COALESCING: &str = "no coalescing";
const IN_PROCESS: &str = "in-process only";
const REDIS: &str = "tower-parking + Redis";
const NGINX: &str = "nginx proxy_cache_lock";
const WORKER_THREADS: &str = "2";

struct Options {
    requests: usize,
    work_ms: Vec<u64>,
    repeats: usize,
    ttl_ms: u64,
    wrk_seconds: u64,
    server: PathBuf,
    out: PathBuf,
    nginx: bool,
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
        server: exe.with_file_name("server"),
        out: PathBuf::from("results"),
        nginx: true,
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
            "--server" => options.server = PathBuf::from(value()?),
            "--out" => options.out = PathBuf::from(value()?),
            "--no-nginx" => options.nginx = false,
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
    let mut args = vec![
        "--work-ms".to_string(),
        work_ms.to_string(),
        "--ttl-ms".into(),
        options.ttl_ms.to_string(),
    ];
    if let Some(url) = redis {
        args.extend(["--redis".to_string(), url.to_string()]);
    }
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
    let (_, body) = get(&mut stream, addr, path).await?;
    serde_json::from_slice(&body).map_err(|e| format!("{addr}{path}: not JSON: {e}"))
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
            let (status, body) = get(&mut stream, addr, &path).await?;
            Ok::<_, String>(Answer {
                latency: start.elapsed(),
                status,
                body,
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
async fn get(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: app.example\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    read_response(stream)
        .await
        .map_err(|e| format!("{addr}{path}: {e}"))
}

/// Reads one HTTP/1.1 response with a `content-length` (what the server and nginx send here).
async fn read_response(stream: &mut TcpStream) -> Result<(u16, Bytes), String> {
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
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
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
    Ok((
        status,
        Bytes::copy_from_slice(&buffer[head_end..head_end + length]),
    ))
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

    let mut runs = Vec::new();
    let mut hit_path = None;
    for &work_ms in &options.work_ms {
        let memory = start_fleet(&options, work_ms, None)?;
        let redis = start_fleet(&options, work_ms, Some(&redis_url))?;
        let nginx_dir = dir.join(format!("nginx-{work_ms}"));
        std::fs::create_dir_all(&nginx_dir).map_err(|e| e.to_string())?;
        let nginx = match options.nginx {
            true => Some(start_nginx(&nginx_dir, &memory.addrs, options.ttl_ms).await?),
            false => None,
        };
        let fleets = [&memory, &redis];
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
                    "W={work_ms:>3} ms  {:<24} run {}  handler runs {:>3}  p50 {:>7.1}  p99 {:>7.1}  max {:>7.1} ms",
                    run.strategy, run.run, run.handler_runs, run.p(50.0), run.p(99.0), run.p(100.0)
                );
                runs.push(run);
            }
        }
        drop(nginx);
        drop((memory, redis));
    }

    if options.wrk {
        hit_path = Some(measure_hit_path(&options, &redis_url).await?);
    }

    std::fs::create_dir_all(&options.out).map_err(|e| e.to_string())?;
    let report = report(&options, &runs, hit_path.as_ref());
    let svg = plot(&runs, &options.work_ms);
    std::fs::write(options.out.join("results.md"), &report).map_err(|e| e.to_string())?;
    std::fs::write(options.out.join("latency.svg"), svg).map_err(|e| e.to_string())?;
    println!("\n{report}");
    println!(
        "written: {}/results.md, {}/latency.svg",
        options.out.display(),
        options.out.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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

async fn measure_hit_path(options: &Options, redis_url: &str) -> Result<HitPath, String> {
    let memory = start_fleet(options, 0, None)?;
    let redis = start_fleet(options, 0, Some(redis_url))?;
    let targets = [
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
             burst of {} requests costs on this machine alone; tower-parking + Redis is {:.1} ms \
             above it.",
            options.requests,
            ours - floor
        );
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

/// A latency distribution plot: one panel per work duration, one curve per strategy (all runs
/// pooled): the share of requests answered within a wait beyond W, on a log axis, so a waiter
/// that polls every 500 ms and one woken within a millisecond are told apart at a glance.
fn plot(runs: &[Run], work: &[u64]) -> String {
    const COLORS: [&str; 4] = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"];
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
