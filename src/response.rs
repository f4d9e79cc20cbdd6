//! [`StoredResponse`]: a whole HTTP response as it is shared and stored.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::{value::DecodeError, Value};

/// A response with its body buffered: what coalesced and parked callers receive and what the
/// backend keeps for the TTL window.
///
/// Hop-by-hop headers (`Connection`, `Transfer-Encoding`, ...) are never kept. A response stored
/// by the layer also carries its cache policy (RFC 9111, from `http-cache-semantics`) and when it
/// was received, so that every process computes its `Age` and revalidates it alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status code.
    pub status: StatusCode,
    /// The end-to-end headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    pub(crate) policy: Option<PolicyRecord>,
}

/// What the layer keeps beside a response to reuse it as a shared cache does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PolicyRecord {
    /// When the response was received (µs since the Unix epoch).
    pub(crate) received_at: u64,
    /// Its age when received, in seconds (its own `Age`, as the policy reads it).
    pub(crate) age_when_received: u64,
    /// When its `Vary` names request fields: their digest in the request it answered
    /// (`key::fields_digest`), which a request must have too to be answered with it.
    pub(crate) variant: Option<String>,
    /// The `http_cache_semantics::CachePolicy`, as JSON.
    pub(crate) policy: Bytes,
}

/// Format tag, so that bytes written by another format are told apart and treated as a miss.
/// `TPR1` (no policy) and `TPR2` (a vary flag, no digest) are read as a miss and overwritten by
/// the next run.
const MAGIC: &[u8; 4] = b"TPR3";

/// Headers that describe one connection, not the response (RFC 9110, 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl StoredResponse {
    /// A stored response made of these parts, without its hop-by-hop headers.
    pub fn new(status: StatusCode, mut headers: HeaderMap, body: Bytes) -> Self {
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        Self {
            status,
            headers,
            body,
            policy: None,
        }
    }
}

impl Value for StoredResponse {
    fn encode(&self) -> Bytes {
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 8 + n.as_str().len() + v.len())
            .sum();
        let mut out = BytesMut::with_capacity(MAGIC.len() + 2 + 4 + headers_len + self.body.len());
        out.put_slice(MAGIC);
        out.put_u16(self.status.as_u16());
        out.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            out.put_u32(name.as_str().len() as u32);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        match &self.policy {
            None => out.put_u8(0),
            Some(record) => {
                out.put_u8(1);
                out.put_u64(record.received_at);
                out.put_u64(record.age_when_received);
                let variant = record.variant.as_deref().unwrap_or_default();
                out.put_u32(variant.len() as u32);
                out.put_slice(variant.as_bytes());
                out.put_u32(record.policy.len() as u32);
                out.put_slice(&record.policy);
            }
        }
        out.put_slice(&self.body);
        out.freeze()
    }

    fn decode(mut bytes: Bytes) -> Result<Self, DecodeError> {
        fn take(bytes: &mut Bytes, len: usize, what: &str) -> Result<Bytes, DecodeError> {
            if bytes.remaining() < len {
                return Err(DecodeError::new(format!("truncated {what}")));
            }
            Ok(bytes.split_to(len))
        }
        fn take_u32(bytes: &mut Bytes, what: &str) -> Result<usize, DecodeError> {
            Ok(take(bytes, 4, what)?.get_u32() as usize)
        }

        if take(&mut bytes, MAGIC.len(), "format tag")?.as_ref() != MAGIC {
            return Err(DecodeError::new(
                "not a stored response (unknown format tag)",
            ));
        }
        let status = take(&mut bytes, 2, "status")?.get_u16();
        let status = StatusCode::from_u16(status)
            .map_err(|_| DecodeError::new(format!("invalid status {status}")))?;
        let count = take_u32(&mut bytes, "header count")?;
        // Room for the fields a reuse adds (`Age`, `x-parking`, `Cache-Status`) without growing.
        let mut headers = HeaderMap::with_capacity(count.min(64) + 3);
        for _ in 0..count {
            let len = take_u32(&mut bytes, "header name length")?;
            let name = HeaderName::from_bytes(&take(&mut bytes, len, "header name")?)
                .map_err(|_| DecodeError::new("invalid header name"))?;
            let len = take_u32(&mut bytes, "header value length")?;
            let value = HeaderValue::from_maybe_shared(take(&mut bytes, len, "header value")?)
                .map_err(|_| DecodeError::new("invalid header value"))?;
            headers.append(name, value);
        }
        let policy = match take(&mut bytes, 1, "policy tag")?.get_u8() {
            0 => None,
            1 => {
                let received_at = take(&mut bytes, 8, "receive time")?.get_u64();
                let age_when_received = take(&mut bytes, 8, "age")?.get_u64();
                let len = take_u32(&mut bytes, "variant length")?;
                let variant = take(&mut bytes, len, "variant")?;
                let variant = (!variant.is_empty())
                    .then(|| String::from_utf8(variant.to_vec()))
                    .transpose()
                    .map_err(|_| DecodeError::new("invalid variant"))?;
                let len = take_u32(&mut bytes, "policy length")?;
                let policy = take(&mut bytes, len, "policy")?;
                Some(PolicyRecord {
                    received_at,
                    age_when_received,
                    variant,
                    policy,
                })
            }
            tag => return Err(DecodeError::new(format!("invalid policy tag {tag}"))),
        };
        Ok(Self {
            status,
            headers,
            body: bytes,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(b"{\"ok\":true}"),
        )
    }

    #[test]
    fn round_trips_without_hop_by_hop_headers() {
        let mut stored = sample();
        stored.policy = Some(PolicyRecord {
            received_at: 1_800_000_000_000_000,
            age_when_received: 7,
            variant: Some("0123456789abcdef0123456789abcdef".into()),
            policy: Bytes::from_static(b"{}"),
        });
        assert!(!stored.headers.contains_key(header::CONNECTION));
        let decoded = StoredResponse::decode(stored.encode()).unwrap();
        assert_eq!(decoded, stored);
        assert_eq!(decoded.headers.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let encoded = sample().encode();
        for len in 0..encoded.len() - sample().body.len() {
            assert!(
                StoredResponse::decode(encoded.slice(..len)).is_err(),
                "prefix of {len} bytes"
            );
        }
        assert!(
            StoredResponse::decode(Bytes::from_static(b"garbage that is long enough")).is_err()
        );
        let mut older = sample().encode().to_vec();
        older[..4].copy_from_slice(b"TPR1");
        assert!(
            StoredResponse::decode(older.into()).is_err(),
            "a value of the older format is a miss, never misread"
        );
    }
}
