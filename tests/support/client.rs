//! An HTTP client for the tests (HTTP/1, or HTTP/2 over cleartext): status, headers, body, and
//! how long it took.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tokio::task::JoinHandle;

/// No request in these tests may take longer: past it, the request counts as hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// What one request got.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The response status.
    pub status: StatusCode,
    /// The `x-parking` header: `miss`, `hit`, `coalesced`, `parked`, `stale`, `pass`, ...
    pub parking: Option<String>,
    /// Every response header.
    pub headers: HeaderMap,
    /// The HTTP version the response came in.
    pub version: Version,
    /// The whole body.
    pub body: Bytes,
    /// From sending the request to the end of the body.
    pub elapsed: Duration,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-parking` header, or `""` when absent.
    pub fn outcome(&self) -> &str {
        self.parking.as_deref().unwrap_or("")
    }

    /// The value of the response header `name`, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// A pooled HTTP/1 client (or HTTP/2 with prior knowledge: [`HttpClient::http2`]).
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    host: Option<http::HeaderValue>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A new client with its own connection pool.
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            host: None,
        }
    }

    /// A client that speaks HTTP/2 over cleartext TCP (h2c, prior knowledge): every request of
    /// one client shares one connection, as HTTP/2 streams.
    pub fn http2() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
            host: None,
        }
    }

    /// A client that names `host` in every request's `Host`, whichever server it connects to:
    /// what servers behind a load balancer see.
    pub fn with_host(host: &'static str) -> Self {
        Self {
            host: Some(http::HeaderValue::from_static(host)),
            ..Self::new()
        }
    }

    /// `GET url`. `Err` says why there was no complete response (connection refused or reset,
    /// or no answer within 20 s: a hang).
    pub async fn get(&self, url: &str) -> Result<Reply, String> {
        let request = Request::get(url)
            .body(Bytes::new())
            .map_err(|e| format!("bad request {url}: {e}"))?;
        self.send(request).await
    }

    /// Sends `request` (with this client's `Host`, unless the request names one) and reads the
    /// whole response. `Err` says why there was no complete response, as for [`get`](Self::get).
    pub async fn send(&self, request: Request<Bytes>) -> Result<Reply, String> {
        let started = Instant::now();
        let what = format!("{} {}", request.method(), request.uri());
        let (mut parts, body) = request.into_parts();
        if let Some(host) = &self.host {
            parts
                .headers
                .entry(http::header::HOST)
                .or_insert(host.clone());
        }
        let request = Request::from_parts(parts, Full::new(body));
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
            let (parts, body) = response.into_parts();
            let parking = parts
                .headers
                .get("x-parking")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = body
                .collect()
                .await
                .map_err(|e| format!("{what}: body: {e}"))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                parking,
                headers: parts.headers,
                version: parts.version,
                body,
                elapsed: started.elapsed(),
            })
        };
        tokio::time::timeout(ANSWER_WITHIN, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("{what}: no answer within {ANSWER_WITHIN:?} (hung)")))
    }

    /// [`send`](Self::send) on a task of its own, so the test can go on while it waits.
    pub fn spawn_send(&self, request: Request<Bytes>) -> JoinHandle<Result<Reply, String>> {
        let client = self.clone();
        tokio::spawn(async move { client.send(request).await })
    }

    /// Sends every request at once, each on its own task, and returns the results in order.
    pub async fn get_all(
        &self,
        urls: impl IntoIterator<Item = String>,
    ) -> Vec<Result<Reply, String>> {
        let tasks: Vec<_> = urls
            .into_iter()
            .map(|url| {
                let client = self.clone();
                tokio::spawn(async move { client.get(&url).await })
            })
            .collect();
        let mut replies = Vec::with_capacity(tasks.len());
        for task in tasks {
            replies.push(
                task.await
                    .unwrap_or_else(|e| Err(format!("request task failed: {e}"))),
            );
        }
        replies
    }

    /// Like [`get_all`](Self::get_all), for requests that must all succeed: panics on the first
    /// that got no response.
    pub async fn get_all_ok(&self, urls: impl IntoIterator<Item = String>) -> Vec<Reply> {
        self.get_all(urls)
            .await
            .into_iter()
            .map(|reply| reply.unwrap_or_else(|error| panic!("{error}")))
            .collect()
    }

    /// [`get`](Self::get) on a task of its own, so the test can go on while it waits.
    pub fn spawn_get(&self, url: String) -> JoinHandle<Result<Reply, String>> {
        let client = self.clone();
        tokio::spawn(async move { client.get(&url).await })
    }

    /// [`get_all_ok`](Self::get_all_ok) on a task of its own, so the test can go on while they
    /// wait.
    pub fn spawn_get_all_ok(&self, urls: Vec<String>) -> JoinHandle<Vec<Reply>> {
        let client = self.clone();
        tokio::spawn(async move { client.get_all_ok(urls).await })
    }
}
