//! Run an expensive handler once per key per TTL window, across every process behind your load
//! balancer, and hand its response to every request that asked for it meanwhile.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_parking::ParkingLayer;
//!
//! # #[tokio::main]
//! # async fn main() {
//! async fn expensive() -> &'static str {
//!     tokio::time::sleep(Duration::from_secs(2)).await; // a billed upstream call
//!     "the answer"
//! }
//!
//! let app: Router = Router::new()
//!     .route("/answer", get(expensive))
//!     .layer(ParkingLayer::new().ttl(Duration::from_secs(30)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! A thousand concurrent `GET /answer` run `expensive` once; requests in the next 30 seconds get
//! the same response without running it. Each response says how it was served in `x-parking`:
//! `miss`, `hit`, `coalesced`, `parked`, `bypass`, `pass`, `revalidated`, `stale` or `timeout`.
//!
//! The layer is a shared cache in the sense of RFC 9111: a response reaches a request other than
//! its own only if a correct shared cache could give it to that request (its `Cache-Control`,
//! `Vary`, the request's conditions and range), it is fresh for no longer than it says (nor than
//! the TTL), a stale one with a validator is revalidated with a conditional run, and a
//! successful write drops what is stored for its URI.
//!
//! - [`ParkingLayer`] / [`Parking`]: the tower middleware (for axum, hyper, tonic).
//! - [`Parker`]: the engine on its own, for any [`Value`] (Go's `singleflight`, plus TTL windows and
//!   processes).
//! - [`MemoryBackend`] (default, one process) and `RedisBackend` (feature `redis`, on by default):
//!   where windows and locks live.
//!
//! The default key ([`PerUser`]) includes the authority and a hash of the credentials
//! (`Authorization`, `Cookie`, `Proxy-Authorization`, `X-Api-Key`): one user's response never
//! reaches another user unless you pick a key function that says it may.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod backend;
mod body;
mod clock;
mod error;
mod flight;
mod key;
mod layer;
mod outcome;
mod parker;
mod policy;
mod random;
mod response;
mod value;

pub use backend::{Backend, BackendError, FailurePolicy, LeaseSettings, MemoryBackend};
#[cfg(feature = "redis")]
pub use backend::{NodeKeyspaceEvents, RedisBackend, RedisBackendBuilder, RedisSetupError};
pub use body::{BoxError, ParkingBody};
pub use error::ParkError;
pub use key::{ByHeader, Key, KeyFn, PerUser, PerUserWith, SharedAcrossUsers, CREDENTIAL_HEADERS};
pub use layer::{sharing, Parking, ParkingLayer, ResponseFuture, PARKING_HEADER};
pub use outcome::{Outcome, Stats};
pub use parker::{Parker, ParkerBuilder};
pub use policy::WaitTimeoutPolicy;
pub use response::StoredResponse;
pub use value::{DecodeError, Value};
