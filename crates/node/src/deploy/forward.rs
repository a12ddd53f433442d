//! The agent's forwarding port (`--serve-port`): the port the router knows the node by when the agent runs
//! deployments. A request whose JSON body names a `model` a ready replica serves goes to that replica's local port;
//! anything else (other models, bodies that are not JSON, `GET /metrics`, `/health`…) goes to the runtime of
//! `--runtime-url`. `GET /v1/models` answers the union of both, and answers 200 even when nothing runs: the router's
//! registration probe reads it.
//!
//! The answer streams through as it comes (server-sent events), hop-by-hop headers dropped both ways. A request body
//! is read whole (up to [`MAX_BODY`]) to find its model, then sent on as it came.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use reqwest::Url;
use tokio::net::TcpListener;

use crate::runtime::Runtime;

/// The largest request body forwarded: larger ones are answered 413.
pub const MAX_BODY: usize = 64 << 20;

/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `GET /v1/models` waits for the own runtime's list.
pub const OWN_MODELS_TIMEOUT: Duration = Duration::from_millis(1500);

/// Where ready models are served locally.
pub trait Routes: Send + Sync + 'static {
    /// The local port of the replica serving `model`, when one is ready.
    fn port_for(&self, model: &str) -> Option<u16>;
    /// The models the replicas serve now.
    fn models(&self) -> Vec<String>;
}

type Body = Either<Incoming, Full<Bytes>>;

/// Forwards requests to the replicas and to the node's own runtime.
pub struct Forwarder<R> {
    routes: R,
    /// The node's own runtime (`--runtime-url`), for everything no replica serves.
    own: Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl<R: Routes> Forwarder<R> {
    pub fn new(routes: R, own: Runtime) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Forwarder { routes, own, client }
    }

    /// Serve connections from `listener` until the future is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarding port: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(request, peer).await) }
                });
                // A client that opens a connection and sends nothing holds it for this long at most.
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "forwarding port: connection ended");
                }
            });
        }
    }

    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if request.method() == Method::GET && request.uri().path() == "/v1/models" {
            return self.models().await;
        }
        let too_long = |len: usize| {
            error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", &format!("the request body is over {len} bytes"))
        };
        let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return too_long(MAX_BODY);
        }
        let (parts, body) = request.into_parts();
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_long(MAX_BODY),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "forwarding port: cannot read a request body");
                return error(StatusCode::BAD_REQUEST, "invalid_request", "the request body could not be read");
            }
        };
        let model = model_of(&body);
        let (authority, prefix) = match model.as_deref().and_then(|m| self.routes.port_for(m)) {
            Some(port) => (format!("127.0.0.1:{port}"), String::new()),
            None => own_target(self.own.url()),
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = match format!("http://{authority}{prefix}{path}").parse() {
            Ok(uri) => uri,
            Err(_) => return error(StatusCode::BAD_REQUEST, "invalid_request", "the request path is not valid"),
        };
        let mut upstream = Request::new(Full::new(body));
        *upstream.method_mut() = parts.method;
        *upstream.uri_mut() = uri.clone();
        *upstream.headers_mut() = strip_hop_by_hop(parts.headers);
        if let Ok(host) = HeaderValue::from_str(&authority) {
            upstream.headers_mut().insert(header::HOST, host);
        }
        match self.client.request(upstream).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                parts.headers = strip_hop_by_hop(parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Err(e) => {
                let cause = crate::runtime::error_chain(&e);
                tracing::debug!(upstream = %uri, %cause, "forwarding port: upstream unavailable");
                error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    &format!("the runtime at {authority} did not answer: {cause}"),
                )
            }
        }
    }

    /// The union of the replicas' models and the own runtime's, in OpenAI's shape.
    async fn models(&self) -> Response<Body> {
        let mut ids = self.routes.models();
        // Within the router's registration probe's time (3 s by default), whatever the own runtime does.
        if let Ok(Ok(own)) = tokio::time::timeout(OWN_MODELS_TIMEOUT, self.own.models()).await {
            for id in own {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let data: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "llm-node"}))
            .collect();
        json(StatusCode::OK, &serde_json::json!({"object": "list", "data": data}))
    }
}

/// The `model` field of a JSON object body, if it has one.
pub fn model_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Named {
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.model
}

/// `host:port` and the path prefix (without its trailing slash) of the own runtime.
fn own_target(base: &Url) -> (String, String) {
    let host = base.host_str().unwrap_or("127.0.0.1");
    let port = base.port_or_known_default().unwrap_or(80);
    (format!("{host}:{port}"), base.path().trim_end_matches('/').to_owned())
}

/// Headers meant for one connection only (RFC 9110 §7.6.1), and those the `Connection` header names.
pub fn strip_hop_by_hop(mut headers: HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    headers
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({"error": {"code": code, "message": message}}))
}

#[cfg(test)]
mod tests;
