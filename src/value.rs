//! Values a [`Parker`](crate::Parker) can share and store.

use std::{fmt, sync::Arc};

use bytes::Bytes;

/// A value that can be handed to many callers and stored in a backend for the TTL window.
///
/// Implemented for [`Bytes`], [`String`], `Vec<u8>` and
/// [`StoredResponse`](crate::StoredResponse). Implement it for your own types with any encoding
/// (serde_json, bincode, ...): `decode` must accept what `encode` produced, and may be handed
/// bytes written by another version of your program, so it returns an error rather than
/// panicking on anything else.
pub trait Value: Clone + Send + Sync + 'static {
    /// The bytes stored in the backend.
    fn encode(&self) -> Bytes;

    /// Reads a value back from stored bytes.
    fn decode(bytes: Bytes) -> Result<Self, DecodeError>;
}

impl Value for Bytes {
    fn encode(&self) -> Bytes {
        self.clone()
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        Ok(bytes)
    }
}

impl Value for Vec<u8> {
    fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(self)
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        Ok(bytes.to_vec())
    }
}

impl Value for String {
    fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }

    fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError::new("stored string is not UTF-8"))
    }
}

/// Stored bytes that do not decode: the parker treats them as a miss and overwrites them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    reason: Arc<str>,
}

impl DecodeError {
    /// An error saying why the bytes do not decode.
    pub fn new(reason: impl fmt::Display) -> Self {
        Self {
            reason: reason.to_string().into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stored value does not decode: {}", self.reason)
    }
}

impl std::error::Error for DecodeError {}
