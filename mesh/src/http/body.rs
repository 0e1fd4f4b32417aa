//! Request bodies and headers as every route reads them: size, read time and the node-wide
//! byte budget ([`read_body`], [`LimitedBody`]), a route that takes none refusing one
//! ([`refuse_body`]), and numeric headers.

use crate::http::error::ApiError;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use meshserve_host::ErrorClass;
use std::sync::Arc;
use std::time::Duration;

/// How request bodies are read.
#[derive(Clone)]
pub struct BodyLimits {
    /// Largest request body accepted, in bytes; larger is 413.
    pub max_bytes: usize,
    /// Time to receive a body once its headers arrived; slower is 408.
    pub read_timeout: Duration,
    /// Bytes buffered at once over all requests; one permit a byte.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

impl BodyLimits {
    /// Limits of `max_bytes` per body, `read_timeout`, and `max_in_flight` bytes node-wide.
    pub fn new(max_bytes: usize, read_timeout: Duration, max_in_flight: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            read_timeout,
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                max_in_flight.min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }
    }
}

/// A request body and its share of the node's body budget, given back when dropped: keep it
/// while the body (or what was decoded from it) is in use.
pub(crate) struct ReadBody {
    pub(crate) bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// `bytes` of the node's in-flight body budget, held until the permit is dropped; past the
/// budget, a 503 with `Retry-After`.
pub(crate) fn reserve(
    in_flight: &Arc<tokio::sync::Semaphore>,
    bytes: u32,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    in_flight.clone().try_acquire_many_owned(bytes).map_err(|_| {
        let mut error = ApiError::new(
            ErrorClass::Unavailable,
            "the node is buffering too many request bytes (max_body_bytes_in_flight); retry later",
        );
        error.retry_after = Some(Duration::from_secs(1));
        error
    })
}

/// Reads a body within `limits`: larger than `max_bytes` is a 413 before the rest is read,
/// slower than `read_timeout` a 408, and past the node's in-flight byte budget a 503.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limits: &BodyLimits,
) -> Result<ReadBody, ApiError> {
    let limit = limits.max_bytes;
    let too_large = || {
        ApiError::new(
            ErrorClass::TooLarge,
            format!("request body exceeds the limit of {limit} bytes (max_body_bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut budget: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut take = |bytes: usize| -> Result<(), ApiError> {
        let Ok(bytes) = u32::try_from(bytes) else {
            return Err(too_large());
        };
        let permit = reserve(&limits.in_flight, bytes)?;
        match &mut budget {
            Some(held) => held.merge(permit),
            None => budget = Some(permit),
        }
        Ok(())
    };
    let mut body = Limited::new(body, limit);
    // A small body arrives as one frame: keep that frame's bytes as they are, and copy
    // into one buffer only when a second frame comes.
    let mut first: Option<Bytes> = None;
    let mut collected = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    return Err(too_large());
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorClass::InvalidInput,
                        format!("could not read the request body: {e}"),
                    ));
                }
            };
            if let Ok(data) = frame.into_data() {
                take(data.len())?;
                if collected.is_empty() && first.is_none() {
                    first = Some(data);
                    continue;
                }
                if let Some(first) = first.take() {
                    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
                    collected.reserve(expected.min(limit).max(first.len() + data.len()));
                    collected.extend_from_slice(&first);
                }
                collected.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(())) => Ok(ReadBody {
            bytes: first.unwrap_or_else(|| collected.freeze()),
            _budget: budget,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(
            ErrorClass::RequestTimeout,
            format!(
                "the request body did not arrive within {} ms (body_read_timeout_ms)",
                limits.read_timeout.as_millis()
            ),
        )),
    }
}

/// A request body read by [`read_body`] within the node's [`BodyLimits`]: the extractor of
/// every route that takes a body and does not stream it elsewhere.
pub struct LimitedBody(pub(crate) ReadBody);

impl<S> axum::extract::FromRequest<S> for LimitedBody
where
    S: Send + Sync,
    BodyLimits: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let limits = <BodyLimits as axum::extract::FromRef<S>>::from_ref(state);
        let (parts, body) = request.into_parts();
        read_body(&parts.headers, body, &limits)
            .await
            .map(LimitedBody)
    }
}

impl LimitedBody {
    /// The body as an optional JSON document of type `T`: empty (or only whitespace) is
    /// `T::default()`, malformed JSON a 400 naming `what`.
    pub(crate) fn json_or_default<T: serde::de::DeserializeOwned + Default>(
        &self,
        what: &str,
    ) -> Result<T, ApiError> {
        let bytes = &self.0.bytes;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(bytes)
            .map_err(|e| ApiError::new(ErrorClass::InvalidInput, format!("malformed {what}: {e}")))
    }
}

/// Middleware of the routes that take no body: a request that brings one is refused (413)
/// rather than left unread, and waiting for the end of an empty body is bounded by the body
/// read timeout like any other body.
pub(crate) async fn refuse_body(
    State(limits): State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let none = BodyLimits {
        max_bytes: 0,
        ..limits
    };
    match read_body(&parts.headers, body, &none).await {
        Ok(_) => {
            next.run(axum::extract::Request::from_parts(parts, Body::empty()))
                .await
        }
        Err(mut error) => {
            if error.class == ErrorClass::TooLarge {
                error.message = format!(
                    "{} {} takes no request body",
                    parts.method,
                    parts.uri.path()
                );
            }
            error.into_response()
        }
    }
}

pub(crate) fn header_number(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<u64>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorClass::InvalidInput,
                        format!("header {name} must be a non-negative integer"),
                    )
                })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::{BodyLimits, read_body};
    use axum::body::Body;
    use bytes::Bytes;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    /// A body that arrives in these frames, one per poll.
    struct Frames(VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn a_body_in_one_frame_is_kept_as_is_and_frames_are_joined_in_order() {
        let limits = BodyLimits::new(1024, Duration::from_secs(1), 4096);
        let headers = http::HeaderMap::new();
        let single = Bytes::from_static(b"{\"inputs\":[]}");
        let read = read_body(
            &headers,
            Body::new(Frames([single.clone()].into())),
            &limits,
        )
        .await
        .unwrap();
        assert_eq!(read.bytes, single);
        assert_eq!(
            read.bytes.as_ptr(),
            single.as_ptr(),
            "one frame is not copied"
        );
        drop(read);
        let parts = [&b"{\"in"[..], b"puts\"", b":[]}"].map(Bytes::from_static);
        let read = read_body(&headers, Body::new(Frames(parts.into())), &limits)
            .await
            .unwrap();
        assert_eq!(read.bytes.as_ref(), b"{\"inputs\":[]}");
        // The budget counts every frame's bytes while the body is held.
        assert_eq!(limits.in_flight.available_permits(), 4096 - 13);
        drop(read);
        assert_eq!(limits.in_flight.available_permits(), 4096);
    }
}
