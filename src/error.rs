//! [`ParkError`]: why a parked call got no value.

use std::{error::Error, fmt, sync::Arc, time::Duration};

use crate::BackendError;

/// Why a call through a [`Parker`](crate::Parker) got no value. Every caller of a flight gets
/// the same error, at once.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ParkError {
    /// The work panicked. Nothing was stored; the next call runs it again.
    Panicked,
    /// The work returned this error. Nothing was stored; the next call runs it again.
    Failed(Arc<dyn Error + Send + Sync>),
    /// The caller waited this long for a leader that was still running, and the wait-timeout
    /// policy is [`Fail`](crate::WaitTimeoutPolicy::Fail).
    WaitTimeout(Duration),
    /// The backend failed and the failure policy is
    /// [`FailClosed`](crate::FailurePolicy::FailClosed).
    BackendUnavailable(BackendError),
    /// The flight was dropped before it ended: its runtime is shutting down.
    Cancelled,
}

impl ParkError {
    pub(crate) fn failed(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self::Failed(Arc::from(error.into()))
    }
}

impl fmt::Display for ParkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Panicked => f.write_str("the parked work panicked; nothing was stored, the next call runs it again"),
            Self::Failed(error) => write!(f, "the parked work failed: {error}"),
            Self::WaitTimeout(waited) => write!(
                f,
                "waited {waited:?} for the leader and gave up; raise the wait timeout, or use \
                 WaitTimeoutPolicy::RunLocally to run the work instead"
            ),
            Self::BackendUnavailable(error) => write!(
                f,
                "{error}; the failure policy is FailClosed (use FailurePolicy::FailOpen to serve with \
                 in-process coalescing while the backend is down)"
            ),
            Self::Cancelled => f.write_str("the parked work was cancelled before it ended (runtime shutting down)"),
        }
    }
}

impl Error for ParkError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            Self::Failed(error) => Some(&**error),
            Self::BackendUnavailable(error) => Some(error),
            _ => None,
        }
    }
}
