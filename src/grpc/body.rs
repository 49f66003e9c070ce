//! A response body wrapped with a watcher that sees each frame and is dropped when the body
//! ends or the caller goes away: how the tower layers learn when a call (a stream included)
//! is over, since the handler returns long before.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

/// The future of a layer's call, boxed: the layers wrapping every service share it.
pub type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Told about a response as it streams; its `Drop` marks the end of the call.
pub trait Watcher: Send + Unpin + 'static {
    /// Each frame sent, trailers included.
    fn frame(&mut self, _frame: &Frame<bytes::Bytes>) {}
}

/// `body`, with `watcher` kept (and told each frame) until it ends.
pub fn watched(body: tonic::body::Body, watcher: impl Watcher) -> tonic::body::Body {
    tonic::body::Body::new(Watched { body, watcher })
}

struct Watched<W> {
    body: tonic::body::Body,
    watcher: W,
}

impl<W: Watcher> Body for Watched<W> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.watcher.frame(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
