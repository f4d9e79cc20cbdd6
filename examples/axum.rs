//! The README's quick-start: one slow route behind `ParkingLayer`.
//!
//! ```text
//! cargo run --example axum            # or: ADDR=127.0.0.1:8080 cargo run --example axum
//! curl -i http://127.0.0.1:3000/report/7   # x-parking: miss, after 2 s
//! curl -i http://127.0.0.1:3000/report/7   # x-parking: hit, at once
//! ```

use std::time::Duration;

use axum::{extract::Path, routing::get, Router};
use tower_parking::ParkingLayer;

/// Stands for the expensive part: a billed upstream call, a token refresh, a 20-second report.
async fn report(Path(id): Path<u32>) -> String {
    tokio::time::sleep(Duration::from_secs(2)).await;
    format!("report {id}, built once for everyone who asked")
}

#[tokio::main]
async fn main() {
    let app = Router::new()
        .route("/report/{id}", get(report))
        // Concurrent GETs of one URL (per user) share one run; later ones reuse it for 30 s.
        .layer(ParkingLayer::new().ttl(Duration::from_secs(30)));

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    println!("listening on http://{}", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}
