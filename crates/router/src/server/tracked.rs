//! The wrappers that keep a connection's phase word up to date: its socket (a first byte starts a request), its
//! hyper service (headers complete: busy) and each answer's body (written: idle).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::phase::{ConnState, Phase};
use crate::tls::ClientStream;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::routing::future::RouteFuture;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client's socket; bytes read from it may start a request on an idle connection.
pub(super) struct TrackedIo {
    pub(super) stream: ClientStream,
    pub(super) state: Arc<ConnState>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.received();
        }
        polled
    }
}

impl TrackedIo {
    /// A write that found the socket full starts the write timeout; one that went through ends it.
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.state.write_blocked(),
            Poll::Ready(_) => self.state.write_progressed(),
        }
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router, as one connection's hyper service: marks the connection busy for each request and gives handlers
/// the peer address.
pub(super) struct ConnService {
    pub(super) router: Router,
    pub(super) state: Arc<ConnState>,
    pub(super) peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, request: Request<Incoming>) -> Answering {
        self.state.request_started();
        let mut request = request.map(|incoming| RequestBody { incoming, state: self.state.clone() });
        request.extensions_mut().insert(ConnectInfo(self.peer));
        request.extensions_mut().insert(Connection(self.state.clone()));
        let future = tower::Service::call(&mut self.router.clone(), request);
        Answering { future, state: Some(self.state.clone()) }
    }
}

/// The connection a request came on, for a handler that waits on its client's say-so: see [`Connection::park`].
#[derive(Clone)]
pub struct Connection(Arc<ConnState>);

impl Connection {
    /// Marks the connection as held up by its client until the guard is dropped: a long poll answers whenever the
    /// client asks again, so at the connection cap it can make room for a new client like a connection whose body
    /// is slow to come, instead of counting as busy (its client sees the connection close and asks again).
    pub fn park(&self) -> Parked {
        self.0.parked();
        Parked(self.0.clone())
    }
}

/// The guard of [`Connection::park`]: the router works on the request again once it is dropped.
pub struct Parked(Arc<ConnState>);

impl Drop for Parked {
    fn drop(&mut self) {
        self.0.body_arrived();
    }
}

/// A request's body as the client sends it: while the handler waits for bytes that have not arrived, the
/// connection is marked as waiting for its client ([`Phase::Body`]), so a body that trickles in never makes the
/// connection count as busy.
struct RequestBody {
    incoming: Incoming,
    state: Arc<ConnState>,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        match polled {
            Poll::Pending => self.state.waiting_for_body(),
            Poll::Ready(_) => self.state.body_arrived(),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// The router's answer on its way; its body marks the connection idle once written.
pub(super) struct Answering {
    future: RouteFuture<Infallible>,
    state: Option<Arc<ConnState>>,
}

impl Future for Answering {
    type Output = Result<Response<TrackedBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Ok(response) = ready!(Pin::new(&mut this.future).poll(cx));
        let written = this.state.take().map(AnswerWritten);
        Poll::Ready(Ok(response.map(|body| TrackedBody { body, _written: written })))
    }
}

/// Marks the connection idle when dropped: hyper drops an answer's body once it has taken its last frame.
struct AnswerWritten(Arc<ConnState>);

impl Drop for AnswerWritten {
    fn drop(&mut self) {
        self.0.set(Phase::Idle);
    }
}

/// An answer's body, unchanged, with the mark that the answer is written.
pub(super) struct TrackedBody {
    body: Body,
    _written: Option<AnswerWritten>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
