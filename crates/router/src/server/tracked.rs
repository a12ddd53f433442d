//! The wrappers that keep a connection's phase word up to date: its socket (a first byte starts a request), its
//! hyper service (headers complete: busy) and each answer's body (written: idle).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use super::conn::{ConnState, Phase};
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

impl AsyncWrite for TrackedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
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

    fn call(&self, mut request: Request<Incoming>) -> Answering {
        self.state.set(Phase::Busy);
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let future = tower::Service::call(&mut self.router.clone(), request);
        Answering { future, state: Some(self.state.clone()) }
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
