//! Origin handlers: for the freshness tests, one that answers with the caching headers a test
//! gives it, counts its runs, keeps the request headers of each, and waits at its gate; for the
//! stale-serving tests, one whose answers, pace and held runs a test scripts as it goes.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode},
    routing::get,
    Router,
};

use tokio::time::Instant;

use super::{Work, DELIBERATE};

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

/// What a [`ScriptedOrigin`] answers, from the run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `200`, body `run N`, with the origin's `Cache-Control`, if any.
    Fine,
    /// `503`, body `failed run N`.
    ServerError,
    /// The handler panics.
    Panic,
    /// `200` with `Cache-Control: private`, body `private run N`: it may not be stored.
    Private,
}

/// The origin of the stale-serving tests: counts its runs and when each started (on tokio's
/// clock, paused or not), waits at its gate (every run, or only the run it was told to hold),
/// takes its time, then answers as told. Clones share all of it.
#[derive(Clone)]
pub struct ScriptedOrigin {
    pub work: Work,
    held_run: Arc<Mutex<Option<usize>>>,
    answer: Arc<Mutex<Answer>>,
    cache_control: Option<&'static str>,
    takes: Duration,
    started: Arc<Mutex<Vec<Instant>>>,
    /// Runs running now, and the most that ever were.
    running: Arc<Mutex<(usize, usize)>>,
}

impl ScriptedOrigin {
    /// An origin that answers `run N` at once, its gate open.
    pub fn new() -> Self {
        Self {
            work: Work::free(),
            held_run: Arc::default(),
            answer: Arc::new(Mutex::new(Answer::Fine)),
            cache_control: None,
            takes: Duration::ZERO,
            started: Arc::default(),
            running: Arc::default(),
        }
    }

    /// Its `200`s carry `Cache-Control: directives`.
    pub fn stating(directives: &'static str) -> Self {
        Self {
            cache_control: Some(directives),
            ..Self::new()
        }
    }

    /// Each run takes `takes`: the work time W.
    pub fn taking(takes: Duration) -> Self {
        Self {
            takes,
            ..Self::new()
        }
    }

    /// Runs that start from now on answer this way.
    pub fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// Only run `run` waits at the gate (when closed); the others go through.
    pub fn hold_only(&self, run: usize) {
        *self.held_run.lock().unwrap() = Some(run);
    }

    /// How many times it ran.
    pub fn runs(&self) -> usize {
        self.work.runs()
    }

    /// When each run started.
    pub fn started(&self) -> Vec<Instant> {
        self.started.lock().unwrap().clone()
    }

    /// The most runs that were ever running at once.
    pub fn most_at_once(&self) -> usize {
        self.running.lock().unwrap().1
    }

    /// One run, answered with a body that starts with `prefix` (`"{key} "`, or nothing).
    pub async fn run(&self, prefix: &str) -> Response<Body> {
        let run = {
            let mut started = self.started.lock().unwrap();
            started.push(Instant::now());
            let mut running = self.running.lock().unwrap();
            running.0 += 1;
            running.1 = running.1.max(running.0);
            self.work.count_run()
        };
        let held = *self.held_run.lock().unwrap();
        if held.is_none_or(|held| held == run) {
            self.work.gate.wait().await;
        }
        if !self.takes.is_zero() {
            tokio::time::sleep(self.takes).await;
        }
        self.running.lock().unwrap().0 -= 1;
        let answer = *self.answer.lock().unwrap();
        let (status, cache_control, body) = match answer {
            Answer::Fine => (StatusCode::OK, self.cache_control, format!("run {run}")),
            Answer::ServerError => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!("failed run {run}"),
            ),
            Answer::Panic => panic!("{DELIBERATE} in run {run}"),
            Answer::Private => (
                StatusCode::OK,
                Some("private"),
                format!("private run {run}"),
            ),
        };
        let mut response = Response::new(Body::from(format!("{prefix}{body}")));
        *response.status_mut() = status;
        if let Some(directives) = cache_control {
            response
                .headers_mut()
                .insert("cache-control", HeaderValue::from_static(directives));
        }
        response
    }
}
