//! [`ParkingBody`]: the body of every response the layer returns.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;

/// The error type of [`ParkingBody`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The body of a response from [`Parking`](crate::Parking): a shared buffered body, or the
    /// inner service's own body streamed through (bypassed requests, responses over the body
    /// limit).
    pub struct ParkingBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        Inner { #[pin] body: B },
    }
}

impl<B> ParkingBody<B> {
    /// A body made of these bytes.
    pub fn full(data: Bytes) -> Self {
        Self::with_trailers(data, None)
    }

    pub(crate) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Full {
                data: Some(data).filter(|data| !data.is_empty()),
                trailers,
            },
        }
    }

    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: Kind::Prefixed {
                prefix: Some(prefix).filter(|prefix| !prefix.is_empty()),
                rest,
            },
        }
    }
}

impl<B> std::fmt::Debug for ParkingBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Full { .. } => "full",
            Kind::Prefixed { .. } => "prefixed",
            Kind::Inner { .. } => "inner",
        };
        f.debug_struct("ParkingBody").field("kind", &kind).finish()
    }
}

fn data_frame<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

impl<B> Body for ParkingBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Full { data, trailers } => {
                let frame = data
                    .take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers));
                Poll::Ready(frame.map(Ok))
            }
            KindProj::Prefixed { prefix, rest } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => rest
                    .as_mut()
                    .poll_frame(cx)
                    .map(|frame| frame.map(|f| f.map(data_frame).map_err(Into::into))),
            },
            KindProj::Inner { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map(data_frame).map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            Kind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |data| data.len() as u64))
            }
            Kind::Prefixed { prefix, rest } => {
                let prefix = prefix.as_ref().map_or(0, |prefix| prefix.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + prefix);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + prefix);
                }
                hint
            }
            Kind::Inner { body } => body.size_hint(),
        }
    }
}

/// A body read up to a limit.
pub(crate) enum Collected<B> {
    /// The whole body fit.
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body is larger than the limit: what was read, and the rest, still to stream.
    Overflow(ParkingBody<B>),
}

/// Reads `body` whole if it fits in `limit` bytes and ends within `timeout`; otherwise stops at
/// the frame that crosses the limit (or when the time is up) and hands back what was read
/// followed by the rest, so the caller still gets every byte.
pub(crate) async fn collect_limited<B>(
    body: B,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Collected<B>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = Box::pin(body);
    if body.size_hint().lower() > limit as u64 {
        return Ok(Collected::Overflow(ParkingBody::prefixed(
            Bytes::new(),
            body,
        )));
    }
    let mut data = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_elapsed) => {
                return Ok(Collected::Overflow(ParkingBody::prefixed(
                    data.freeze(),
                    body,
                )))
            }
        };
        let frame = data_frame(frame.map_err(Into::into)?);
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    return Ok(Collected::Overflow(ParkingBody::prefixed(
                        data.freeze(),
                        body,
                    )));
                }
            }
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                return Ok(Collected::Complete {
                    data: data.freeze(),
                    trailers,
                });
            }
        }
    }
    Ok(Collected::Complete {
        data: data.freeze(),
        trailers: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

    #[tokio::test]
    async fn a_body_within_the_limit_is_collected_whole() {
        let Collected::Complete { data, trailers } =
            collect_limited(Full::new(Bytes::from_static(b"hello")), 5, MINUTE)
                .await
                .unwrap()
        else {
            panic!("fits");
        };
        assert_eq!((data.as_ref(), trailers), (&b"hello"[..], None));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_still_yields_every_byte() {
        let chunks = (0..10)
            .map(|i| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![i; 100]))));
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let Collected::Overflow(rest) = collect_limited(body, 250, MINUTE).await.unwrap() else {
            panic!("over the limit")
        };
        let all = rest.collect().await.unwrap().to_bytes();
        let expected: Vec<u8> = (0..10).flat_map(|i| vec![i; 100]).collect();
        assert_eq!(all.as_ref(), expected.as_slice());
    }

    #[tokio::test]
    async fn a_body_announcing_more_than_the_limit_is_not_read() {
        let Collected::Overflow(rest) =
            collect_limited(Full::new(Bytes::from(vec![7u8; 1000])), 10, MINUTE)
                .await
                .unwrap()
        else {
            panic!("over the limit");
        };
        assert_eq!(rest.size_hint().exact(), Some(1000));
        assert_eq!(rest.collect().await.unwrap().to_bytes().len(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_end_in_time_streams_on_with_every_byte() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .await
            .unwrap();
        let body = StreamBody::new(tokio_stream_from(receiver));
        let Collected::Overflow(rest) = collect_limited(body, 1024, MINUTE).await.unwrap() else {
            panic!("a body still open after the timeout streams on")
        };
        sender
            .send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await
            .unwrap();
        drop(sender);
        let all = rest.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"first second");
    }

    fn tokio_stream_from<T>(
        mut receiver: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
    }
}
