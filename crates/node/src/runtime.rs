//! The local inference runtime, as the agent sees it: which models it serves (`GET /v1/models`, OpenAI shape),
//! which runtime it is (llama.cpp server, llama-cpp-python's server, vLLM or Ollama, told apart by the endpoints each
//! one answers) and how loaded it is (its own `/metrics`, in [`load`]).

pub mod load;

use std::time::Duration;

use llm_router_protocol::ModelList;
use reqwest::{Client, Url};
use serde::Deserialize;

/// Wire name of Ollama in `supported_runtimes`.
pub const OLLAMA: &str = "ollama";
/// Wire name of vLLM in `supported_runtimes`.
pub const VLLM: &str = "vllm";
/// Wire name of llama.cpp's `llama-server` in `supported_runtimes`.
pub const LLAMA_CPP: &str = "llama_cpp";
/// Wire name of llama-cpp-python's server (`python -m llama_cpp.server`) in `supported_runtimes`.
pub const LLAMA_CPP_PYTHON: &str = "llama_cpp_python";

/// The title of llama-cpp-python's OpenAPI document, after its leading emoji: what tells its server apart, since
/// it answers none of the other runtimes' version endpoints.
const LLAMA_CPP_PYTHON_TITLE: &str = "llama.cpp Python API";

/// What a runtime revealed about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedRuntime {
    /// One of [`OLLAMA`], [`VLLM`], [`LLAMA_CPP`], [`LLAMA_CPP_PYTHON`].
    pub kind: &'static str,
    pub version: Option<String>,
}

/// The runtime could not be asked for its models.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the runtime at {url} did not answer: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("the runtime at {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("the runtime at {url} answered something that is not a model list: {cause}")]
    Invalid { url: String, cause: String },
}

/// Client of the runtime at one base URL.
#[derive(Debug, Clone)]
pub struct Runtime {
    http: Client,
    base: Url,
}

impl Runtime {
    /// A client for the runtime at `base`, every call bounded by `timeout`.
    pub fn new(base: Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        crate::client::install_tls_provider();
        let http = Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Runtime { http, base })
    }

    /// The runtime's base URL.
    pub fn url(&self) -> &Url {
        &self.base
    }

    /// The ids of the models the runtime lists, in its order, without repeats.
    pub async fn models(&self) -> Result<Vec<String>, RuntimeError> {
        let url = endpoint(&self.base, "v1/models");
        let shown = url.to_string();
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| RuntimeError::Unreachable { url: shown.clone(), cause: error_chain(&e) })?;
        let status = response.status();
        if !status.is_success() {
            return Err(RuntimeError::Status { url: shown, status: status.as_u16() });
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| RuntimeError::Unreachable { url: shown.clone(), cause: error_chain(&e) })?;
        let list: ModelList =
            serde_json::from_slice(&body).map_err(|e| RuntimeError::Invalid { url: shown, cause: e.to_string() })?;
        let mut ids: Vec<String> = Vec::with_capacity(list.data.len());
        for id in list.ids() {
            if !id.trim().is_empty() && !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Tell which runtime answers at the base URL, or `None` when none of the known ones does.
    ///
    /// Ollama answers `GET /api/version`, vLLM `GET /version` (both `{"version": "..."}`), and llama.cpp's server
    /// `GET /props` (a JSON object, with `build_info` in recent builds). llama-cpp-python's server answers none of
    /// these; its FastAPI OpenAPI document (`GET /openapi.json`) carries the title "🦙 llama.cpp Python API" and the
    /// package's version. It is asked last, since other FastAPI servers (vLLM) serve such a document too: the most
    /// specific path is asked first.
    pub async fn detect(&self) -> Option<DetectedRuntime> {
        #[derive(Deserialize)]
        struct Version {
            version: String,
        }
        #[derive(Deserialize)]
        struct Props {
            #[serde(default)]
            build_info: Option<String>,
        }
        #[derive(Deserialize)]
        struct OpenApi {
            info: OpenApiInfo,
        }
        #[derive(Deserialize)]
        struct OpenApiInfo {
            title: String,
            #[serde(default)]
            version: Option<String>,
        }

        if let Some(v) = self.get_json::<Version>("api/version").await {
            return Some(DetectedRuntime { kind: OLLAMA, version: non_blank(v.version) });
        }
        if let Some(v) = self.get_json::<Version>("version").await {
            return Some(DetectedRuntime { kind: VLLM, version: non_blank(v.version) });
        }
        if let Some(p) = self.get_json::<Props>("props").await {
            return Some(DetectedRuntime { kind: LLAMA_CPP, version: p.build_info.and_then(non_blank) });
        }
        if let Some(doc) = self.get_json::<OpenApi>("openapi.json").await
            && doc.info.title.trim_end().ends_with(LLAMA_CPP_PYTHON_TITLE)
        {
            return Some(DetectedRuntime { kind: LLAMA_CPP_PYTHON, version: doc.info.version.and_then(non_blank) });
        }
        None
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Option<T> {
        let response = self.http.get(endpoint(&self.base, path)).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.bytes().await.ok()?;
        serde_json::from_slice(&body).ok()
    }
}

/// `base` joined with `path`, keeping any path prefix of `base` (a runtime behind a proxy at `/llm/`).
pub fn endpoint(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/');
    url.set_path(&format!("{prefix}/{path}"));
    url.set_query(None);
    url
}

fn non_blank(s: String) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// An error with its causes, on one line: reqwest's own message alone hides why a connection failed.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A runtime that answers fixed bodies by path and 404 to everything else, on a thread of its own.
    async fn serve(routes: HashMap<&'static str, &'static str>) -> Url {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, body) = match routes.get(path.as_str()) {
                    Some(body) => ("200 OK", *body),
                    None => ("404 Not Found", "{}"),
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Url::parse(&format!("http://{addr}")).expect("url")
    }

    fn runtime(url: Url) -> Runtime {
        Runtime::new(url, Duration::from_secs(2)).expect("client")
    }

    #[tokio::test]
    async fn models_are_listed_in_order_without_repeats() {
        let url = serve(HashMap::from([(
            "/v1/models",
            r#"{"object":"list","data":[{"id":"llama-3-8b"},{"id":"qwen2"},{"id":"llama-3-8b"},{"id":" "}]}"#,
        )]))
        .await;
        let models = runtime(url).models().await.expect("models");
        assert_eq!(models, vec!["llama-3-8b", "qwen2"]);
    }

    #[tokio::test]
    async fn a_runtime_that_is_down_or_odd_is_an_error_not_a_panic() {
        let url = serve(HashMap::from([("/v1/models", "not json")])).await;
        assert!(matches!(runtime(url).models().await, Err(RuntimeError::Invalid { .. })));

        let url = serve(HashMap::new()).await;
        assert!(matches!(runtime(url).models().await, Err(RuntimeError::Status { status: 404, .. })));

        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let url = Url::parse(&format!("http://{addr}")).expect("url");
        let err = runtime(url).models().await.expect_err("nothing listens");
        assert!(matches!(err, RuntimeError::Unreachable { .. }), "{err}");
    }

    #[tokio::test]
    async fn runtimes_are_told_apart_by_what_they_answer() {
        let ollama = serve(HashMap::from([("/api/version", r#"{"version":"0.3.12"}"#)])).await;
        assert_eq!(
            runtime(ollama).detect().await,
            Some(DetectedRuntime { kind: OLLAMA, version: Some("0.3.12".into()) })
        );
        let vllm = serve(HashMap::from([("/version", r#"{"version":"0.6.3.post1"}"#)])).await;
        assert_eq!(
            runtime(vllm).detect().await,
            Some(DetectedRuntime { kind: VLLM, version: Some("0.6.3.post1".into()) })
        );
        let llama = serve(HashMap::from([("/props", r#"{"total_slots":1,"build_info":"b4100-1a2b3c"}"#)])).await;
        assert_eq!(
            runtime(llama).detect().await,
            Some(DetectedRuntime { kind: LLAMA_CPP, version: Some("b4100-1a2b3c".into()) })
        );
        let old_llama = serve(HashMap::from([("/props", r#"{"total_slots":1}"#)])).await;
        assert_eq!(runtime(old_llama).detect().await, Some(DetectedRuntime { kind: LLAMA_CPP, version: None }));
        let unknown = serve(HashMap::new()).await;
        assert_eq!(runtime(unknown).detect().await, None);
    }

    #[tokio::test]
    async fn llama_cpp_python_is_told_apart_by_its_openapi_document() {
        // What `python -m llama_cpp.server` answers (cut short): no /props, /version or /api/version.
        let llama_python = serve(HashMap::from([(
            "/openapi.json",
            r#"{"openapi":"3.1.0","info":{"title":"🦙 llama.cpp Python API","version":"0.3.36"},"paths":{}}"#,
        )]))
        .await;
        assert_eq!(
            runtime(llama_python).detect().await,
            Some(DetectedRuntime { kind: LLAMA_CPP_PYTHON, version: Some("0.3.36".into()) })
        );
        // Another FastAPI server's document is not taken for it.
        let other = serve(HashMap::from([(
            "/openapi.json",
            r#"{"openapi":"3.1.0","info":{"title":"FastAPI","version":"0.1.0"},"paths":{}}"#,
        )]))
        .await;
        assert_eq!(runtime(other).detect().await, None);
        // vLLM serves an OpenAPI document too, but answers /version first.
        let vllm = serve(HashMap::from([
            ("/version", r#"{"version":"0.6.3"}"#),
            ("/openapi.json", r#"{"openapi":"3.1.0","info":{"title":"vLLM","version":"0.6.3"},"paths":{}}"#),
        ]))
        .await;
        assert_eq!(runtime(vllm).detect().await.map(|d| d.kind), Some(VLLM));
    }

    #[test]
    fn endpoints_keep_a_path_prefix() {
        let base = Url::parse("http://h:8000").expect("url");
        assert_eq!(endpoint(&base, "v1/models").as_str(), "http://h:8000/v1/models");
        let base = Url::parse("http://h/llm/?x=1").expect("url");
        assert_eq!(endpoint(&base, "v1/models").as_str(), "http://h/llm/v1/models");
    }
}
