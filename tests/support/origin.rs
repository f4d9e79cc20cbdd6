//! An origin handler for the freshness tests: it answers with the caching headers a test gives
//! it, counts its runs, keeps the request headers of each, and waits at its gate.

use std::sync::{Arc, Mutex};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode},
    routing::get,
    Router,
};

use super::Work;

/// Header lines, as the origin sends them or a client adds them.
pub type Fields = Vec<(String, String)>;

/// `Fields` from pairs.
pub fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// A response with these fields, `x-run: run` and `body`.
pub fn reply(status: StatusCode, headers: &Fields, run: usize, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    response
        .headers_mut()
        .insert("x-run", HeaderValue::from(run));
    response
}

/// An origin that answers `200` with `headers` and the body `run N`, whatever it is asked.
pub fn stating(headers: Fields) -> impl Fn(usize, &HeaderMap) -> Response<Body> + Clone {
    move |run, _request| reply(StatusCode::OK, &headers, run, format!("run {run}"))
}

/// The origin handler: counts its runs, keeps the request headers of each, waits at its gate,
/// then answers as `respond(run, request headers)` says. Clones share all of it.
#[derive(Clone, Default)]
pub struct Origin {
    pub work: Work,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

impl Origin {
    /// An origin whose runs wait at a closed gate.
    pub fn held() -> Self {
        Self::default()
    }

    /// An origin whose runs go straight through.
    pub fn free() -> Self {
        let origin = Self::default();
        origin.work.gate.open();
        origin
    }

    /// How many times it ran.
    pub fn runs(&self) -> usize {
        self.work.runs()
    }

    /// The request headers run `run` (1 for the first) received.
    pub fn request_of(&self, run: usize) -> HeaderMap {
        self.seen.lock().unwrap()[run - 1].clone()
    }

    /// A router answering `GET path` (an axum path pattern) with this origin.
    pub fn router<F>(&self, path: &str, respond: F) -> Router
    where
        F: Fn(usize, &HeaderMap) -> Response<Body> + Clone + Send + Sync + 'static,
    {
        let origin = self.clone();
        let handler = move |headers: HeaderMap| {
            let (origin, respond) = (origin.clone(), respond.clone());
            async move {
                let run = {
                    // Counted and recorded under one lock: once the count shows a run, its
                    // request headers are there.
                    let mut seen = origin.seen.lock().unwrap();
                    seen.push(headers.clone());
                    origin.work.count_run()
                };
                origin.work.gate.wait().await;
                respond(run, &headers)
            }
        };
        Router::new().route(path, get(handler))
    }
}
