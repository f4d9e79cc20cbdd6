//! What one caller received, read whole from a response of the layer.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;

/// What one caller received.
#[derive(Debug)]
pub struct Got {
    /// The status.
    pub status: StatusCode,
    /// Every header.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Got {
    /// Reads `response` whole.
    pub async fn read<B>(response: Response<B>) -> Self
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = response.into_parts();
        Self {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    /// The header `name`, which must be ASCII when present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("ASCII header"))
    }

    /// The `x-parking` header.
    pub fn parking(&self) -> Option<&str> {
        self.header("x-parking")
    }

    /// Which run of the handler produced it (its `x-run` header).
    pub fn run(&self) -> usize {
        self.header("x-run")
            .expect("x-run header")
            .parse()
            .expect("run number")
    }

    /// The body, which must be UTF-8.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    /// The `Age` header, which must be a whole number when present.
    pub fn age(&self) -> Option<u64> {
        self.header("age")
            .map(|age| age.parse().unwrap_or_else(|_| panic!("Age {age:?}")))
    }
}
