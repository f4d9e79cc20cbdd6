//! A caching reverse proxy: every request goes to an upstream, with `ParkingLayer` in front, so
//! the upstream's own caching headers decide what is shared and for how long.
//!
//! ```text
//! cargo run --release --example proxy -- --upstream http://127.0.0.1:8080
//! cargo run --release --example proxy -- --upstream http://127.0.0.1:8080 --listen 127.0.0.1:3001 \
//!     --redis redis://127.0.0.1:6379
//! ```
//!
//! Every request (method, path, query, headers, body) is forwarded to the upstream base URL with
//! hyper-util's client, the base's own path (if any) put in front of the request's path. The
//! hop-by-hop fields (`Connection`, those it names, `Keep-Alive`, `Transfer-Encoding`, ...) are
//! dropped both ways, the upstream gets its own `Host` and the caller's in `X-Forwarded-Host`.
//! An upstream that cannot be reached is a `502 Bad Gateway`.
//!
//! The layer (default key `PerUser`: the caller's authority, method, path, query and a hash of
//! its credentials) parks concurrent `GET`s and `HEAD`s of one URL behind one upstream request
//! and keeps the response as long as the upstream says (`Cache-Control`, `CDN-Cache-Control`,
//! `Expires`, `Age`), at most `--ttl-ms`. A stale response with an `ETag` or `Last-Modified`
//! is revalidated: the next request of its URL asks the upstream with `If-None-Match` /
//! `If-Modified-Since`, and a `304` serves the kept body again (`x-parking: revalidated`).
//! Writes go through and drop what is kept for their URL.
//!
//! It prints `listening on ADDR` once it accepts connections, and shuts down gracefully on
//! SIGTERM or Ctrl-C. Logs: `RUST_LOG` (default `warn`).

use std::{io::Write, net::SocketAddr, process::ExitCode, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderName, StatusCode, Uri, Version},
    response::{IntoResponse, Response},
    Router,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower_parking::ParkingLayer;

const USAGE: &str = "\
usage: proxy --upstream URL [OPTIONS]

  --upstream URL            where every request goes, an http:// base URL such as
                            http://127.0.0.1:8080 or http://10.0.0.5:8080/api (required)
  --listen ADDR             address to listen on (default 127.0.0.1:3000; port 0 picks one)
  --ttl-ms N                the longest a response is served again, in ms, and the lifetime of
                            one that states none (default 10000)
  --ttl-from-response       let a lifetime the upstream states (max-age, s-maxage, Expires)
                            exceed --ttl-ms
  --redis URL               share with every proxy on this Redis (default: this process only)
  --enable-keyspace-events  with --redis: turn on the keyspace notifications it needs (CONFIG SET)
  -h, --help                print this help";

/// The command line, parsed.
#[derive(Debug)]
struct Options {
    listen: SocketAddr,
    upstream: Uri,
    ttl: Duration,
    ttl_from_response: bool,
    redis: Option<String>,
    enable_keyspace_events: bool,
}

impl Options {
    /// Reads `--flag value` and `--flag=value`. `Ok(None)`: help was asked for.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut listen = SocketAddr::from(([127, 0, 0, 1], 3000));
        let mut upstream = None;
        let mut ttl = Duration::from_millis(10_000);
        let mut ttl_from_response = false;
        let mut redis = None;
        let mut enable_keyspace_events = false;
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
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--listen" => {
                    let text = value()?;
                    listen = text
                        .parse()
                        .map_err(|_| format!("--listen takes IP:PORT, not {text:?}"))?;
                }
                "--upstream" => upstream = Some(upstream_base(&value()?)?),
                "--ttl-ms" => {
                    let text = value()?;
                    ttl = text
                        .parse::<u64>()
                        .map(Duration::from_millis)
                        .map_err(|_| {
                            format!("--ttl-ms takes a whole number of milliseconds, not {text:?}")
                        })?;
                }
                "--redis" => redis = Some(value()?),
                "--ttl-from-response" if inline.is_none() => ttl_from_response = true,
                "--enable-keyspace-events" if inline.is_none() => enable_keyspace_events = true,
                _ => return Err(format!("unknown argument {arg:?}")),
            }
        }
        let upstream = upstream.ok_or(
            "--upstream is required: the base URL to forward to, such as http://127.0.0.1:8080",
        )?;
        if redis.is_none() && enable_keyspace_events {
            return Err("--enable-keyspace-events needs --redis".into());
        }
        Ok(Some(Options {
            listen,
            upstream,
            ttl,
            ttl_from_response,
            redis,
            enable_keyspace_events,
        }))
    }
}

/// Checks an `--upstream` value: `http://host[:port][/path]`, no query.
fn upstream_base(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|_| {
        format!("--upstream takes a URL such as http://127.0.0.1:8080, not {text:?}")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "--upstream {text}: this example speaks plain HTTP to its upstream; give an \
                 http:// URL (or put a TLS-terminating proxy between them)"
            ))
        }
        _ => {
            return Err(format!(
                "--upstream takes an http:// URL with a host, such as http://127.0.0.1:8080, \
                 not {text:?}"
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(format!(
            "--upstream {text:?} has no host: give one, such as http://127.0.0.1:8080"
        ));
    }
    if uri.query().is_some() {
        return Err(format!(
            "--upstream {text:?} has a query: give a base URL only, each request brings its own"
        ));
    }
    Ok(uri)
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
    let mut parking = ParkingLayer::new()
        .ttl(options.ttl)
        .ttl_from_response(options.ttl_from_response);
    if let Some(url) = &options.redis {
        parking = parking.backend(redis_backend(url, options.enable_keyspace_events).await?);
    }
    let app = router(options.upstream.clone(), parking);

    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", options.listen))?;
    println!(
        "listening on {} (forwarding to {})",
        listener.local_addr()?,
        options.upstream
    );
    std::io::stdout().flush()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

#[cfg(feature = "redis")]
async fn redis_backend(
    url: &str,
    enable_keyspace_events: bool,
) -> Result<tower_parking::RedisBackend, Box<dyn std::error::Error>> {
    Ok(tower_parking::RedisBackend::builder(url)
        .enable_keyspace_events(enable_keyspace_events)
        .build()
        .await?)
}

#[cfg(not(feature = "redis"))]
async fn redis_backend(
    _url: &str,
    _enable_keyspace_events: bool,
) -> Result<tower_parking::MemoryBackend, String> {
    Err("--redis needs the `redis` cargo feature (on by default); this build left it out".into())
}

/// The proxy's app: every request forwarded to `upstream` (an `http://` base URL), with
/// `parking` over it.
pub(crate) fn router(upstream: Uri, parking: ParkingLayer) -> Router {
    let proxy = Proxy {
        client: Client::builder(TokioExecutor::new()).build_http(),
        upstream,
    };
    Router::new()
        .fallback(forward)
        .with_state(proxy)
        .layer(parking)
}

#[derive(Clone)]
struct Proxy {
    client: Client<HttpConnector, Body>,
    upstream: Uri,
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    match proxy.send(request).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, upstream = %proxy.upstream, "upstream request failed");
            (StatusCode::BAD_GATEWAY, format!("upstream: {error}\n")).into_response()
        }
    }
}

impl Proxy {
    async fn send(&self, request: Request) -> Result<Response, String> {
        let (mut parts, body) = request.into_parts();
        parts.uri = self.target(&parts.uri)?;
        // The client speaks HTTP/1.1 to the upstream, whatever the caller spoke.
        parts.version = Version::HTTP_11;
        drop_hop_by_hop(&mut parts.headers);
        // The client names the upstream in `Host`; the caller's goes in X-Forwarded-Host.
        if let Some(host) = parts.headers.remove(header::HOST) {
            parts
                .headers
                .insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        let response = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|error| format!("{error:?}"))?;
        let (mut parts, body) = response.into_parts();
        drop_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    /// The upstream URL of a request: the base's scheme and authority, the base's path in front
    /// of the request's path, and the request's query.
    fn target(&self, uri: &Uri) -> Result<Uri, String> {
        let base = self.upstream.path().trim_end_matches('/');
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme(self.upstream.scheme_str().unwrap_or("http"))
            .authority(self.upstream.authority().map_or("", |a| a.as_str()))
            .path_and_query(format!("{base}{path_and_query}"))
            .build()
            .map_err(|error| format!("cannot forward {uri}: {error}"))
    }
}

/// Drops the fields that describe one connection, not the message (RFC 9110 §7.6.1): those
/// `Connection` names, and the usual hop-by-hop fields.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Resolves on Ctrl-C or SIGTERM: the proxy stops accepting and finishes what it serves.
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
