//! h3's QUIC traits over quinn (through h3-quinn), with every received stream passed through
//! a [`FrameGuard`]: a stream whose peer announces an oversized frame is stopped with
//! `H3_EXCESSIVE_LOAD` before h3 buffers any of it.

use super::frames::FrameGuard;
use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};
use std::task::{Context, Poll, ready};

/// The HTTP/3 error code for a peer generating excessive load (RFC 9114 8.1).
const H3_EXCESSIVE_LOAD: u64 = 0x107;

/// A server connection whose received streams are guarded.
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    max_frame: u64,
}

impl GuardedConnection {
    /// Wraps `connection`; frames other than DATA longer than `max_frame` bytes are refused.
    pub fn new(connection: quinn::Connection, max_frame: u64) -> GuardedConnection {
        GuardedConnection {
            inner: h3_quinn::Connection::new(connection),
            max_frame,
        }
    }
}

/// A received stream checked frame by frame.
pub struct GuardedRecv {
    inner: h3_quinn::RecvStream,
    guard: Option<FrameGuard>,
}

impl quic::RecvStream for GuardedRecv {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let data = ready!(self.inner.poll_data(cx))?;
        if let (Some(bytes), Some(guard)) = (&data, &mut self.guard)
            && let Err(oversized) = guard.feed(bytes)
        {
            tracing::debug!(%oversized, "HTTP/3 stream stopped");
            self.inner.stop_sending(H3_EXCESSIVE_LOAD);
            return Poll::Ready(Err(StreamErrorIncoming::StreamTerminated {
                error_code: H3_EXCESSIVE_LOAD,
            }));
        }
        Poll::Ready(Ok(data))
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

/// A request stream: the guarded receiving half and h3-quinn's sending half.
pub struct GuardedBidi<B: Buf> {
    send: h3_quinn::SendStream<B>,
    recv: GuardedRecv,
}

impl<B: Buf> GuardedBidi<B> {
    fn new(stream: h3_quinn::BidiStream<B>, guard: Option<FrameGuard>) -> GuardedBidi<B> {
        let (send, recv) = quic::BidiStream::split(stream);
        GuardedBidi {
            send,
            recv: GuardedRecv { inner: recv, guard },
        }
    }
}

impl<B: Buf> quic::RecvStream for GuardedBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for GuardedBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

impl<B: Buf> quic::BidiStream<B> for GuardedBidi<B> {
    type SendStream = h3_quinn::SendStream<B>;
    type RecvStream = GuardedRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

/// Opens streams (the server opens only its control and QPACK streams; a bidirectional one
/// it opened would carry our own frames, so it is not guarded).
pub struct GuardedOpener(h3_quinn::OpenStreams);

impl<B: Buf> quic::OpenStreams<B> for GuardedOpener {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let stream = ready!(self.0.poll_open_bidi(cx))?;
        Poll::Ready(Ok(GuardedBidi::new(stream, None)))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.0.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.0, code, reason);
    }
}

impl<B: Buf> quic::OpenStreams<B> for GuardedConnection {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        let stream = ready!(quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(GuardedBidi::new(stream, None)))
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason);
    }
}

impl<B: Buf> quic::Connection<B> for GuardedConnection {
    type RecvStream = GuardedRecv;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        let inner = ready!(quic::Connection::<B>::poll_accept_recv(&mut self.inner, cx))?;
        Poll::Ready(Ok(GuardedRecv {
            inner,
            guard: Some(FrameGuard::unidirectional(self.max_frame)),
        }))
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        let stream = ready!(quic::Connection::<B>::poll_accept_bidi(&mut self.inner, cx))?;
        Poll::Ready(Ok(GuardedBidi::new(
            stream,
            Some(FrameGuard::request(self.max_frame)),
        )))
    }

    fn opener(&self) -> Self::OpenStreams {
        GuardedOpener(quic::Connection::<Bytes>::opener(&self.inner))
    }
}
