//! What the end-to-end tests drive: the real `llm-router` and `llm-node` binaries, a stand-in runtime (a tiny HTTP
//! server answering `/v1/models`, vLLM's `/version` and, when a test gives it some, `/metrics`; a test can change
//! its model list and its metrics) and a stand-in `nvidia-smi` (a shell script first on `PATH` printing fixed CSV).
//!
//! Nothing here sleeps hoping something happened: every wait polls with a deadline ([`wait_for`]) and fails with
//! the agent's log when the deadline passes.

use std::fs;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use llm_router::app::LISTENING_ON;
use serde_json::{Value, json};

/// Password of the administrator every test router starts with.
pub const ADMIN_PASSWORD: &str = "secret-pass-123";

/// Output of the stand-in `nvidia-smi`: two H100 and one A100, with figures the tests look for. Columns: index,
/// name, memory total and used (MiB), utilization, temperature, uuid, uncorrectable ECC count, power (W), throttle
/// reasons (bitmask). The A100 has neither ECC count nor power figure nor throttle reasons.
pub const THREE_GPUS_CSV: &str = "\
0, NVIDIA H100 80GB HBM3, 81559, 1024, 35, 41, GPU-e2e00000-0000-0000-0000-000000000000, 0, 312.45, 0x0000000000000004
1, NVIDIA H100 80GB HBM3, 81559, 2048, 70, 52, GPU-e2e00000-0000-0000-0000-000000000001, 0, 698.1, 0x0000000000000028
2, NVIDIA A100-SXM4-40GB, 40960, [N/A], [Not Supported], 38, GPU-e2e00000-0000-0000-0000-000000000002, [N/A], \
[Not Supported], [N/A]
";

/// The query the agent asks `nvidia-smi`, as the stand-in expects it.
const NVIDIA_SMI_QUERY: &str = "--query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,uuid,\
                                ecc.errors.uncorrected.volatile.total,power.draw,clocks_throttle_reasons.active";

/// Version the stand-in runtime reports at `GET /version`, as vLLM does.
pub const RUNTIME_VERSION: &str = "0.6.3-e2e";

pub const MIB: u64 = 1024 * 1024;

/// The agent binary, built by cargo for this test.
pub fn node_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_llm-node"))
}

/// The router binary: `LLM_ROUTER_BIN`, else beside the agent binary (same target profile directory).
pub fn router_bin() -> PathBuf {
    let path = match std::env::var_os("LLM_ROUTER_BIN") {
        Some(path) => PathBuf::from(path),
        None => node_bin().with_file_name("llm-router"),
    };
    assert!(
        path.is_file(),
        "the router binary {} is missing: run `cargo build -p llm-router` first (or set LLM_ROUTER_BIN)",
        path.display()
    );
    path
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// Poll `check` every 100 ms until it gives a value or `timeout` passes; then fail with `what` and `context()`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, context: impl Fn() -> String, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}\n{}", context());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The per-test directory: stand-in `nvidia-smi`, state directories, router data, logs.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch { dir: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Write the stand-in `nvidia-smi` as a script `body` into `bin/` (replacing any earlier one).
    pub fn fake_nvidia_smi(&self, body: &str) {
        let bin = self.path("bin");
        fs::create_dir_all(&bin).expect("create bin dir");
        let script = bin.join("nvidia-smi");
        fs::write(&script, format!("#!/bin/sh\n{body}\n")).expect("write nvidia-smi");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod nvidia-smi");
    }

    /// Stand-in `nvidia-smi` printing `csv` when asked the agent's query (and failing otherwise).
    pub fn fake_nvidia_smi_printing(&self, csv: &str) {
        self.fake_nvidia_smi(&format!(
            "case \"$1\" in {NVIDIA_SMI_QUERY}) ;; \
             *) echo \"unexpected arguments: $*\" >&2; exit 2 ;; esac\ncat <<'CSV'\n{csv}CSV"
        ));
    }

    /// `PATH` with the stand-in `bin/` first.
    pub fn path_env(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        format!("{}:{rest}", self.path("bin").display())
    }
}

/// The stand-in runtime: `GET /v1/models` lists the current models, `GET /version` answers like vLLM, `GET /metrics`
/// the current metrics text (404 while there is none, as from a runtime without metrics).
pub struct FakeRuntime {
    pub port: u16,
    models: Arc<Mutex<Vec<String>>>,
    metrics: Arc<Mutex<Option<String>>>,
}

impl FakeRuntime {
    pub fn start(models: &[&str]) -> Self {
        Self::start_on(0, models)
    }

    pub fn start_on(port: u16, models: &[&str]) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the stand-in runtime");
        let port = listener.local_addr().expect("address").port();
        let models = Arc::new(Mutex::new(models.iter().map(|m| m.to_string()).collect::<Vec<_>>()));
        let metrics = Arc::new(Mutex::new(None));
        let (shared_models, shared_metrics) = (Arc::clone(&models), Arc::clone(&metrics));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (models, metrics) = (Arc::clone(&shared_models), Arc::clone(&shared_metrics));
                std::thread::spawn(move || answer(stream, &models, &metrics));
            }
        });
        FakeRuntime { port, models, metrics }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_models(&self, models: &[&str]) {
        *self.models.lock().expect("models lock") = models.iter().map(|m| m.to_string()).collect();
    }

    /// Serve `text` at `GET /metrics`, or nothing (404) with `None`.
    pub fn set_metrics(&self, text: Option<&str>) {
        *self.metrics.lock().expect("metrics lock") = text.map(str::to_owned);
    }
}

fn answer(mut stream: TcpStream, models: &Mutex<Vec<String>>, metrics: &Mutex<Option<String>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let metrics = if path == "/metrics" { metrics.lock().ok().and_then(|text| text.clone()) } else { None };
    let (status, body) = match path {
        "/v1/models" => {
            let data: Vec<Value> = models
                .lock()
                .map(|m| m.iter().map(|id| json!({"id": id, "object": "model", "owned_by": "e2e"})).collect())
                .unwrap_or_default();
            ("200 OK", json!({"object": "list", "data": data}).to_string())
        }
        "/version" => ("200 OK", json!({"version": RUNTIME_VERSION}).to_string()),
        "/metrics" if metrics.is_some() => ("200 OK", metrics.unwrap_or_default()),
        _ => ("404 Not Found", json!({"detail": "Not Found"}).to_string()),
    };
    let content_type = if path == "/metrics" && status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "application/json"
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
}

/// A running `llm-router serve`.
pub struct Router {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// `http` or `https`, as the router's listening line says.
    scheme: String,
}

impl Router {
    /// Start a router on a free port with its database in `data_dir`.
    pub fn start(data_dir: &Path, log: &Path) -> Self {
        Self::start_on(data_dir, log, 0)
    }

    /// Start a router on `port` (0: any free one) and wait for its "listening" line.
    pub fn start_on(data_dir: &Path, log: &Path, port: u16) -> Self {
        Self::start_with(data_dir, log, port, &[])
    }

    /// Start a router with extra flags, on `port` (0: any free one), and wait for its "listening" line.
    pub fn start_with(data_dir: &Path, log: &Path, port: u16, extra: &[&str]) -> Self {
        let log_file = fs::OpenOptions::new().create(true).append(true).open(log).expect("router log");
        let mut child = Command::new(router_bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(data_dir)
            .args(["--heartbeat-interval-secs", "1", "--offline-after-secs", "2"])
            .args(extra)
            .env("LLM_ROUTER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("LLM_ROUTER_ADMIN_USERNAME")
            .env_remove("LLM_ROUTER_NO_REACHABILITY_CHECK")
            .env("LLM_ROUTER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start llm-router");
        let stdout = child.stdout.take().expect("router stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading after the first line so the router never writes into a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (scheme, port) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(LISTENING_ON) {
                        let scheme = rest.split("://").next().unwrap_or("http").to_owned();
                        let port = rest.rsplit(':').next().and_then(|p| p.trim().parse::<u16>().ok());
                        break (scheme, port.unwrap_or_else(|| panic!("no port in the router's line `{line}`")));
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the router did not say it was listening within 20 s; its log:\n{}", tail(log));
                }
            }
        };
        Router { child, port, log: log.to_owned(), scheme }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    /// Send the router SIGHUP (it reads its certificate again).
    pub fn hang_up(&self) {
        let status = Command::new("kill").args(["-HUP", &self.child.id().to_string()]).status().expect("kill -HUP");
        assert!(status.success(), "kill -HUP failed");
    }

    /// Kill the router at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `llm-node`, its stderr captured in a log file.
pub struct Node {
    child: Child,
    pub log: PathBuf,
}

/// Settings of one agent run.
pub struct NodeSettings {
    pub router_url: String,
    pub runtime_url: String,
    pub state_dir: PathBuf,
    pub name: String,
    pub path_env: String,
    pub log: PathBuf,
    /// `--join-token`, when the agent has one.
    pub join_token: Option<String>,
    /// `--ca-cert`, when the router's certificate comes from a private CA.
    pub ca_cert: Option<PathBuf>,
}

impl Node {
    pub fn start(settings: &NodeSettings) -> Self {
        Node::start_with(settings, &[])
    }

    /// An agent with `extra` flags after the usual ones.
    pub fn start_with(settings: &NodeSettings, extra: &[&str]) -> Self {
        let log_file = fs::OpenOptions::new().create(true).append(true).open(&settings.log).expect("node log");
        let child = node_command(settings).args(extra).stderr(log_file).spawn().expect("start llm-node");
        Node { child, log: settings.log.clone() }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the agent's log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration, context: impl Fn() -> String) {
        let what = format!("the agent to log `{needle}`");
        wait_for(&what, timeout, context, || async move { self.log_text().contains(needle).then_some(()) }).await
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send SIGTERM and wait (at most `within`) for the agent to exit; its exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit(within)
    }

    /// Wait (at most `within`) for the agent to exit by itself; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("llm-node did not exit within {within:?}; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line of one agent run, environment cleaned of the caller's agent settings.
pub fn node_command(settings: &NodeSettings) -> Command {
    let mut command = Command::new(node_bin());
    command
        .args(["--router-url", &settings.router_url, "--runtime-url", &settings.runtime_url])
        .arg("--state-dir")
        .arg(&settings.state_dir)
        .args(["--name", &settings.name, "--gpu-detection", "nvidia-smi", "--tags", "e2e,rack-1"])
        .args(["--backoff-base-ms", "100", "--backoff-max-ms", "400", "--refused-retry-ms", "300"])
        .args(settings.join_token.iter().flat_map(|token| ["--join-token", token.as_str()]))
        .args(settings.ca_cert.iter().flat_map(|path| [std::ffi::OsStr::new("--ca-cert"), path.as_os_str()]))
        .env("PATH", &settings.path_env)
        .env("LLM_NODE_LOG", "info,llm_node=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for var in [
        "LLM_ROUTER_URL",
        "LLM_NODE_RUNTIME_URL",
        "LLM_NODE_IP",
        "LLM_NODE_NAME",
        "LLM_NODE_STATE_DIR",
        "LLM_NODE_TAGS",
        "LLM_NODE_GPU_DETECTION",
        "LLM_NODE_SUPPORTED_RUNTIMES",
        "LLM_NODE_RUNTIME_VERSION",
        "LLM_NODE_JOIN_TOKEN",
        "LLM_NODE_CA_CERT",
        "LLM_NODE_MANAGE_RUNTIMES",
        "LLM_NODE_SERVE_PORT",
        "LLM_NODE_MODEL_CACHE_DIR",
        "LLM_NODE_LLAMA_SERVER",
        "LLM_NODE_LLAMA_CPP_PYTHON",
        "LLM_NODE_VLLM",
    ] {
        command.env_remove(var);
    }
    command
}

/// The last 60 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// An administrator's session on a router's API.
#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    pub async fn login(router_url: &str) -> Self {
        Self::login_trusting(router_url, None).await
    }

    /// Sign in over HTTPS whose certificate chains to `ca_pem`.
    pub async fn login_trusting(router_url: &str, ca_pem: Option<&str>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(pem) = ca_pem {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("CA"));
        }
        let http = builder.build().expect("http client");
        let response = http
            .post(format!("{router_url}/v0/auth/login"))
            .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .expect("login request");
        assert_eq!(response.status(), 200, "admin login failed: {:?}", response.text().await);
        let body: Value = response.json().await.expect("login answer");
        let token = body["token"].as_str().expect("token in the login answer").to_owned();
        Admin { http, base: router_url.to_owned(), token }
    }

    /// Every node the router knows, or `None` if the router did not answer.
    pub async fn nodes(&self) -> Option<Vec<Value>> {
        let response = self.http.get(format!("{}/v0/nodes", self.base)).bearer_auth(&self.token).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<Vec<Value>>().await.ok()
    }

    /// The only node the router knows, when there is exactly one.
    pub async fn only_node(&self) -> Option<Value> {
        let mut nodes = self.nodes().await?;
        (nodes.len() == 1).then(|| nodes.remove(0))
    }

    pub async fn approve(&self, id: &str) -> Value {
        let response = self
            .http
            .post(format!("{}/v0/nodes/{id}/approve", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("approve request");
        assert_eq!(response.status(), 200, "approve failed: {:?}", response.text().await);
        response.json().await.expect("approve answer")
    }

    /// Creates a join token; the answer, with the token itself.
    pub async fn create_join_token(&self, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/v0/join-tokens", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .expect("join token request");
        assert_eq!(response.status(), 201, "creating a join token failed: {:?}", response.text().await);
        response.json().await.expect("join token answer")
    }

    pub async fn delete(&self, id: &str) {
        let response = self
            .http
            .delete(format!("{}/v0/nodes/{id}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("delete request");
        assert_eq!(response.status(), 204, "delete failed: {:?}", response.text().await);
    }
}

/// The node id kept in an agent's state directory.
pub fn stored_node_id(state_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(state_dir.join("node.json")).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value["node_id"].as_str().map(str::to_owned)
}

/// A private CA that signs the router's certificates for `127.0.0.1`.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "llm-node test CA");
        let key = rcgen::KeyPair::generate().expect("CA key");
        TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes a certificate for 127.0.0.1 and its key to `cert` and `key`; returns the certificate's DER.
    pub fn issue(&self, cert: &Path, key: &Path) -> Vec<u8> {
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let pair = rcgen::KeyPair::generate().expect("key");
        let signed = params.signed_by(&pair, &self.issuer).expect("certificate");
        fs::write(cert, signed.pem()).expect("write certificate");
        fs::write(key, pair.serialize_pem()).expect("write key");
        signed.der().to_vec()
    }
}
