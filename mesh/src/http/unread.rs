//! Answers given before a request's body was read, on HTTP/1.1. Such an answer leaves the rest
//! of the body on the connection, in front of the client's next request, and hyper then closes
//! the connection without saying so: a client that already reused it loses its next request.
//! So the rest of a small body is read and dropped before the answer goes (the connection
//! stays usable), and the answer to a larger or slower one says `connection: close` (the
//! client opens a new connection instead of losing a request).

use axum::body::Body;
use axum::http::{HeaderValue, Request, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper::body::{Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// The most of a body left unread that is read and dropped to keep the connection.
const DRAIN_MAX_BYTES: u64 = 64 << 10;

/// How long that may take; a body slower than this closes the connection instead.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(250);

/// A request body that, dropped before its end, leaves the rest where [`Unread`] finds it.
struct Tracked {
    inner: Option<Incoming>,
    ended: bool,
    leftover: Arc<Mutex<Option<Incoming>>>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take()
            && !self.ended
            && !inner.is_end_stream()
        {
            *self.leftover.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
        }
    }
}

/// What a request's handler left of its body, settled once the answer is built.
pub(crate) struct Unread(Arc<Mutex<Option<Incoming>>>);

/// The request with its body tracked, and where an unread rest of it will be.
pub(crate) fn track(request: Request<Incoming>) -> (Request<Body>, Unread) {
    let leftover = Arc::new(Mutex::new(None));
    let request = request.map(|inner| {
        Body::new(Tracked {
            inner: Some(inner),
            ended: false,
            leftover: leftover.clone(),
        })
    });
    (request, Unread(leftover))
}

impl Unread {
    /// Reads and drops a small unread rest of the body, or marks `response` to close the
    /// connection when the rest is large, of unknown size, slow or broken.
    pub(crate) async fn settle(self, response: &mut Response) {
        let rest = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(rest) = rest else { return };
        let small = rest
            .size_hint()
            .upper()
            .is_some_and(|n| n <= DRAIN_MAX_BYTES);
        if small && let Ok(Ok(())) = tokio::time::timeout(DRAIN_TIMEOUT, discard(rest)).await {
            return;
        }
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Reads a body to its end, keeping none of it.
async fn discard(mut body: Incoming) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}
