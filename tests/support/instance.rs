//! An "instance": what one process of a service behind a load balancer would have, inside the
//! test process. Its own `RedisBackend` (so its own Redis connections), its own `ParkingLayer`, and
//! an axum server, all on a tokio runtime of its own on its own OS thread, so the test can make it
//! die mid-handler: shutting the runtime down drops every task, connection and lease renewal at
//! once, and nothing is released cleanly, as when a process is killed.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::mpsc,
    task::{Context, Poll},
    thread,
    time::Duration,
};

use axum::Router;
use tokio::sync::oneshot;
use tower::{Layer, Service};
use tower_parking::{ParkingLayer, RedisBackendBuilder, Stats};

use super::Tally;

/// A running instance; drop (or [`kill`](Instance::kill)) makes it die.
#[derive(Debug)]
pub struct Instance {
    addr: SocketAddr,
    layer: ParkingLayer,
    waiting: Tally,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Instance {
    /// Starts an instance: builds `backend` on the instance's runtime, wraps `app` in `layer` with
    /// that backend, and serves it on a fresh loopback port. Panics with the backend's error if
    /// it cannot be built (use [`try_start`](Instance::try_start) to see it).
    pub fn start(backend: RedisBackendBuilder, layer: ParkingLayer, app: Router) -> Self {
        Self::try_start(backend, layer, app)
            .unwrap_or_else(|error| panic!("instance did not start: {error}"))
    }

    /// Like [`start`](Instance::start), returning the backend's setup error as text.
    pub fn try_start(
        backend: RedisBackendBuilder,
        layer: ParkingLayer,
        app: Router,
    ) -> Result<Self, String> {
        let (started_tx, started_rx) = mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let waiting = Tally::new();
        let count_waiting = CountWaiting(waiting.clone());
        let thread = thread::Builder::new()
            .name("parking-instance".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("cannot build the instance's runtime");
                let started = runtime.block_on(async move {
                    let backend = backend.build().await.map_err(|error| error.to_string())?;
                    let layer = layer.backend(backend);
                    let app = app.layer(layer.clone()).layer(count_waiting);
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .map_err(|error| error.to_string())?;
                    let addr = listener.local_addr().map_err(|error| error.to_string())?;
                    tokio::spawn(async move { axum::serve(listener, app).await });
                    Ok::<_, String>((addr, layer))
                });
                let running = started.is_ok();
                let _ = started_tx.send(started);
                if running {
                    runtime.block_on(async move {
                        let _ = stopped.await;
                    });
                }
                // Drops every task where it stands: handlers, lease renewals, connections.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("cannot spawn the instance's thread");
        let (addr, layer) = started_rx
            .recv()
            .map_err(|_| "the instance's thread panicked while starting".to_string())??;
        Ok(Self {
            addr,
            layer,
            waiting,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The address the instance serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The instance's layer (its engine's counters, flights).
    pub fn layer(&self) -> &ParkingLayer {
        &self.layer
    }

    /// How many requests reached the parking layer and are waiting in it (or were, once): counted
    /// when the layer's future first returns `Pending`, which is after the request joined or
    /// started its key's flight. A test that waits for this count knows each request is in.
    pub fn waiting(&self) -> &Tally {
        &self.waiting
    }

    /// The instance's counters.
    pub fn stats(&self) -> Stats {
        self.layer.stats()
    }

    /// Kills the instance: its runtime shuts down with every task where it stands (a handler
    /// mid-run, the renewal of its lease, its Redis connections), and the thread is joined.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Counts requests whose response future returned `Pending` for the first time: by then the
/// parking layer inside has put the request into its key's flight.
#[derive(Clone, Debug)]
struct CountWaiting(Tally);

impl<S> Layer<S> for CountWaiting {
    type Service = CountWaitingService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountWaitingService {
            inner,
            waiting: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
struct CountWaitingService<S> {
    inner: S,
    waiting: Tally,
}

impl<S: Service<R>, R> Service<R> for CountWaitingService<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        Counted {
            inner: Box::pin(self.inner.call(request)),
            waiting: Some(self.waiting.clone()),
        }
    }
}

struct Counted<F> {
    inner: Pin<Box<F>>,
    waiting: Option<Tally>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let poll = self.inner.as_mut().poll(cx);
        if poll.is_pending() {
            if let Some(waiting) = self.waiting.take() {
                waiting.add();
            }
        }
        poll
    }
}
