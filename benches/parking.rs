//! What parking costs on the hit path, and what it saves under a burst.
//!
//! ```text
//! cargo bench --bench parking
//! cargo bench --bench parking -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! - `hit/*`: a tower `service_fn` answering a small response, called bare; the same service behind
//!   `ParkingLayer` on a warm key (served from the memory backend); and `Parker::run` on a warm
//!   key. Target: a layered hit costs under 2 µs more than the bare call.
//! - `coalesce/*`: one call of a 20 ms piece of work, against 10,000 concurrent callers (each its
//!   own task) of one cold key. Target: the 10,000 finish within the work's duration plus 20 ms.
// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::{runtime::Runtime, task::JoinSet};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_parking::{Parker, ParkerBuilder, ParkingLayer, PARKING_HEADER};

const BODY: &[u8] = b"{\"report\":7,\"rows\":[1,2,3]}";
const WORK: Duration = Duration::from_millis(20);
const CALLERS: usize = 10_000;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn request() -> Request<()> {
    Request::get("/report/7").body(()).expect("a valid request")
}

/// The request of a client that takes gzip, to a route whose responses vary on it.
fn gzip_request() -> Request<()> {
    Request::get("/report/7")
        .header("accept-encoding", "gzip")
        .body(())
        .expect("a valid request")
}

async fn small_response(_request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(BODY))))
}

/// [`small_response`] with `Vary: Accept-Encoding`, as a compressed route sends it.
async fn varying_response(_request: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        http::header::VARY,
        http::HeaderValue::from_static("accept-encoding"),
    );
    Ok(response)
}

/// Calls `service` once and reads the whole body, as a server would before writing it out.
async fn call<S, B>(service: &S) -> Response<Bytes>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    call_with(service, request()).await
}

/// [`call`] with this request.
async fn call_with<S, B>(service: &S, request: Request<()>) -> Response<Bytes>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, body)
}

fn hit_path(c: &mut Criterion) {
    let runtime = runtime();
    let bare = service_fn(small_response);
    let layered = ParkingLayer::new()
        .ttl(Duration::from_secs(3600))
        .layer(service_fn(small_response));
    let varying = ParkingLayer::new()
        .ttl(Duration::from_secs(3600))
        .layer(service_fn(varying_response));
    let parker: Parker<Bytes> = ParkerBuilder::new().ttl(Duration::from_secs(3600)).build();
    let work = || async { Ok::<_, Infallible>(Bytes::from_static(BODY)) };

    runtime.block_on(async {
        call(&layered).await;
        let warm = call(&layered).await;
        assert_eq!(warm.headers()[PARKING_HEADER], "hit", "the key is warm");
        assert_eq!(warm.body().as_ref(), BODY);
        parker.run("report 7", work).await.unwrap();
        call_with(&varying, gzip_request()).await;
        let warm = call_with(&varying, gzip_request()).await;
        assert_eq!(
            warm.headers()[PARKING_HEADER],
            "hit",
            "the varying key is warm"
        );
    });

    let mut group = c.benchmark_group("hit");
    group.bench_function("bare service", |b| {
        b.to_async(&runtime).iter(|| call(&bare));
    });
    group.bench_function("layered hit", |b| {
        b.to_async(&runtime).iter(|| call(&layered));
    });
    group.bench_function("layered hit, Vary: Accept-Encoding", |b| {
        b.to_async(&runtime)
            .iter(|| call_with(&varying, gzip_request()));
    });
    group.bench_function("Parker::run hit", |b| {
        b.to_async(&runtime)
            .iter(|| async { parker.run("report 7", work).await.unwrap() });
    });
    group.finish();
    assert_eq!(
        layered.parker().stats().executions,
        1,
        "every layered call after the first was a hit"
    );
    assert_eq!(varying.parker().stats().executions, 1);
}

fn coalescing(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("coalesce");
    group.sample_size(10);
    group.bench_function("one call of the work (20 ms)", |b| {
        b.to_async(&runtime).iter(|| tokio::time::sleep(WORK));
    });
    group.bench_function("10000 callers, one cold key", |b| {
        b.to_async(&runtime).iter(|| async {
            // A new parker per iteration: every burst meets a cold key.
            let parker: Parker<Bytes> = Parker::new();
            let runs = Arc::new(AtomicUsize::new(0));
            let mut callers = JoinSet::new();
            for _ in 0..CALLERS {
                let parker = parker.clone();
                let runs = Arc::clone(&runs);
                callers.spawn(async move {
                    parker
                        .run("cold", move || async move {
                            runs.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(WORK).await;
                            Ok::<_, Infallible>(Bytes::from_static(BODY))
                        })
                        .await
                });
            }
            while let Some(value) = callers.join_next().await {
                assert_eq!(value.unwrap().unwrap().as_ref(), BODY);
            }
            assert_eq!(runs.load(Ordering::Relaxed), 1, "the work ran once");
            assert_eq!(parker.in_flight(), 0, "the flight left the map");
        });
    });
    group.finish();
}

criterion_group!(benches, hit_path, coalescing);
criterion_main!(benches);
