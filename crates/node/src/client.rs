//! Client of the router's node API (SPEC §2): registration and heartbeats, with answers sorted into what the
//! agent loop must do about them ([`Failure`]).

use std::time::Duration;

use llm_router_protocol::{
    ASSIGNMENTS_PATH, AssignmentsAnswer, ErrorBody, HEARTBEAT_PATH, HeartbeatRequest, HeartbeatResponse,
    JOIN_TOKEN_HEADER, NODE_TOKEN_HEADER, REGISTER_PATH, RegisterRequest, RegisterResponse,
};
use reqwest::header::RETRY_AFTER;
use reqwest::{Client, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::runtime::{endpoint, error_chain};

/// A call to the router that did not succeed, sorted by what the agent does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No answer (connection refused, timeout), a server error, or an answer that is not the API's: retry with
    /// backoff.
    #[error("router unreachable: {0}")]
    Unreachable(String),
    /// 401: the token is unknown (the node was deleted, or the router's database was replaced).
    #[error("the router does not know this node's token ({0})")]
    Unauthorized(String),
    /// Any other 4xx (403 gpu_required or forbidden, 409 node_exists, 422 node_unreachable, 400): the router
    /// understood and said no. Retrying fast would not change its mind.
    #[error("the router refused the node: HTTP {status} {code}: {message}")]
    Refused { status: u16, code: String, message: String },
    /// 429 or 503 with `Retry-After` (rate limited, too many pending nodes, storage unavailable): the router is up
    /// and says when to come back.
    #[error("the router asks to retry in {} s: HTTP {status} {code}: {message}", retry_after.as_secs())]
    RetryLater { status: u16, code: String, message: String, retry_after: Duration },
}

/// Makes rustls' ring provider the process's, as every HTTP client of the agent needs; installing it again (a
/// second client) changes nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Client of one router.
#[derive(Debug, Clone)]
pub struct RouterClient {
    http: Client,
    base: Url,
    /// Sent with every registration as `X-Join-Token`; the router ignores it on a token rotation.
    join_token: Option<String>,
}

impl RouterClient {
    /// A client for the router at `base`, every call bounded by `timeout`. For `https://`, the router's certificate
    /// must chain to the system's roots or to `ca_pem` (a private CA's certificate, PEM).
    pub fn new(base: Url, timeout: Duration, ca_pem: Option<&[u8]>) -> Result<Self, reqwest::Error> {
        install_tls_provider();
        let mut builder = Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("llm-node/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build()?;
        Ok(RouterClient { http, base, join_token: None })
    }

    /// Registrations carry `token` as `X-Join-Token`.
    pub fn with_join_token(mut self, token: Option<String>) -> Self {
        self.join_token = token;
        self
    }

    /// The router's base URL.
    pub fn url(&self) -> &Url {
        &self.base
    }

    /// `POST /v0/nodes`. With `token`, the router keeps the node's id and status and rotates its token.
    pub async fn register(&self, request: &RegisterRequest, token: Option<&str>) -> Result<RegisterResponse, Failure> {
        let mut call = self.http.post(endpoint(&self.base, REGISTER_PATH.trim_start_matches('/'))).json(request);
        if let Some(token) = token {
            call = call.header(NODE_TOKEN_HEADER, token);
        }
        if let Some(join) = &self.join_token {
            call = call.header(JOIN_TOKEN_HEADER, join);
        }
        self.send(call).await
    }

    /// `POST /v0/health` with the node's token.
    pub async fn heartbeat(&self, token: &str, request: &HeartbeatRequest) -> Result<HeartbeatResponse, Failure> {
        let call = self
            .http
            .post(endpoint(&self.base, HEARTBEAT_PATH.trim_start_matches('/')))
            .header(NODE_TOKEN_HEADER, token)
            .json(request);
        self.send(call).await
    }

    /// `GET /v0/assignments`: the node's assignments once they differ from the ones `known` fingerprints, or after
    /// `wait` with the same ones (SPEC §15).
    pub async fn assignments(
        &self,
        token: &str,
        known: Option<&str>,
        wait: Duration,
    ) -> Result<AssignmentsAnswer, Failure> {
        let mut url = endpoint(&self.base, ASSIGNMENTS_PATH.trim_start_matches('/'));
        url.query_pairs_mut().append_pair("wait_secs", &wait.as_secs().to_string());
        if let Some(known) = known {
            url.query_pairs_mut().append_pair("known", known);
        }
        // The router holds the answer up to `wait`: the call's own bound is that, and the usual one on top.
        let call = self.http.get(url).header(NODE_TOKEN_HEADER, token).timeout(wait + Duration::from_secs(10));
        self.send(call).await
    }

    async fn send<T: DeserializeOwned>(&self, call: reqwest::RequestBuilder) -> Result<T, Failure> {
        let response = call.send().await.map_err(|e| Failure::Unreachable(error_chain(&e)))?;
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|value| value.to_str().ok()).map(str::to_owned);
        let body = response.bytes().await.map_err(|e| Failure::Unreachable(error_chain(&e)))?;
        classify(status, retry_after.as_deref(), &body)
    }
}

/// `Retry-After` in its seconds form; the HTTP-date form, which the router never sends, counts as absent.
fn retry_after_secs(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Sort an answer of the router (its status, `Retry-After` header and body) into success or a [`Failure`]. Pure,
/// so every case is tested without a server.
pub fn classify<T: DeserializeOwned>(status: StatusCode, retry_after: Option<&str>, body: &[u8]) -> Result<T, Failure> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| {
            Failure::Unreachable(format!("HTTP {} with a body that is not the API's answer: {e}", status.as_u16()))
        });
    }
    let (code, message) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => (error.error.code, error.error.message),
        Err(_) => (
            String::from("unknown"),
            String::from_utf8_lossy(body).chars().take(200).collect::<String>().trim().to_owned(),
        ),
    };
    let asks_to_wait = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
    if let Some(retry_after) = retry_after_secs(retry_after).filter(|_| asks_to_wait) {
        Err(Failure::RetryLater { status: status.as_u16(), code, message, retry_after })
    } else if status == StatusCode::UNAUTHORIZED {
        Err(Failure::Unauthorized(if message.is_empty() { code } else { message }))
    } else if status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
    {
        Err(Failure::Refused { status: status.as_u16(), code, message })
    } else {
        Err(Failure::Unreachable(format!("HTTP {} {code}: {message}", status.as_u16())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_router_protocol::NodeStatus;

    fn error_body(code: &str, message: &str) -> Vec<u8> {
        format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#).into_bytes()
    }

    #[test]
    fn success_is_parsed() {
        let answer: HeartbeatResponse =
            classify(StatusCode::OK, None, br#"{"status":"online","heartbeat_interval_secs":10}"#).expect("ok");
        assert_eq!(
            answer,
            HeartbeatResponse { status: NodeStatus::Online, heartbeat_interval_secs: 10, assignments: None }
        );
    }

    #[test]
    fn unauthorized_means_register_again() {
        let err =
            classify::<HeartbeatResponse>(StatusCode::UNAUTHORIZED, None, &error_body("unauthorized", "unknown token"))
                .expect_err("401");
        assert_eq!(err, Failure::Unauthorized("unknown token".into()));
    }

    #[test]
    fn refusals_keep_the_routers_reason() {
        for (status, code) in [
            (StatusCode::FORBIDDEN, "gpu_required"),
            (StatusCode::CONFLICT, "node_exists"),
            (StatusCode::UNPROCESSABLE_ENTITY, "node_unreachable"),
            (StatusCode::BAD_REQUEST, "invalid_request"),
        ] {
            let err = classify::<RegisterResponse>(status, None, &error_body(code, "why")).expect_err("refused");
            assert_eq!(err, Failure::Refused { status: status.as_u16(), code: code.into(), message: "why".into() });
        }
    }

    #[test]
    fn server_errors_and_foreign_answers_are_retried_as_unreachable() {
        let err =
            classify::<RegisterResponse>(StatusCode::BAD_GATEWAY, None, b"<html>bad gateway</html>").expect_err("502");
        assert!(matches!(&err, Failure::Unreachable(text) if text.contains("502")), "{err}");
        let err = classify::<RegisterResponse>(StatusCode::TOO_MANY_REQUESTS, None, b"").expect_err("429");
        assert!(matches!(err, Failure::Unreachable(_)));
        let err =
            classify::<RegisterResponse>(StatusCode::OK, None, b"<html>a proxy page</html>").expect_err("not json");
        assert!(matches!(err, Failure::Unreachable(_)));
    }

    #[test]
    fn retry_after_on_429_and_503_says_when_to_come_back() {
        for (status, code) in
            [(StatusCode::TOO_MANY_REQUESTS, "rate_limited"), (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")]
        {
            let err = classify::<RegisterResponse>(status, Some("42"), &error_body(code, "later")).expect_err("wait");
            assert_eq!(
                err,
                Failure::RetryLater {
                    status: status.as_u16(),
                    code: code.into(),
                    message: "later".into(),
                    retry_after: Duration::from_secs(42)
                }
            );
        }
        // Another status, or a Retry-After that is not a number of seconds, is not a request to wait.
        let err = classify::<RegisterResponse>(StatusCode::CONFLICT, Some("42"), &error_body("node_exists", "x"))
            .expect_err("409");
        assert!(matches!(err, Failure::Refused { status: 409, .. }), "{err}");
        let date = Some("Wed, 21 Oct 2015 07:28:00 GMT");
        let err = classify::<RegisterResponse>(StatusCode::TOO_MANY_REQUESTS, date, b"").expect_err("429");
        assert!(matches!(err, Failure::Unreachable(_)), "{err}");
    }

    /// An HTTP server on a thread of its own, answering every request with `answer`.
    fn answering(answer: String) -> Url {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                // Read the whole request (head, then Content-Length bytes) so closing sends no reset.
                let mut request = Vec::new();
                let mut buf = [0; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    let Some(head_end) = text.find("\r\n\r\n") else {
                        if n == 0 {
                            break;
                        }
                        continue;
                    };
                    let length = text[..head_end]
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .and_then(|value| value.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if n == 0 || request.len() >= head_end + 4 + length {
                        break;
                    }
                }
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Url::parse(&format!("http://{addr}/")).expect("url")
    }

    #[tokio::test]
    async fn the_client_reads_retry_after_from_the_answer() {
        let body = r#"{"error":{"code":"rate_limited","message":"slow down"}}"#;
        let answer = format!(
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 37\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let client = RouterClient::new(answering(answer), Duration::from_secs(5), None).expect("client");
        let request = HeartbeatRequest {
            node_id: uuid::Uuid::nil(),
            cpu_usage: None,
            memory_usage: None,
            gpus: None,
            loaded_models: None,
            ready_models: None,
            active_requests: None,
            load: None,
            replicas: None,
        };
        let err = client.heartbeat("llmn_x", &request).await.expect_err("429");
        assert!(
            matches!(&err, Failure::RetryLater { retry_after, code, .. }
                if *retry_after == Duration::from_secs(37) && code == "rate_limited"),
            "{err}"
        );
    }
}
