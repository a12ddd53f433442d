//! Starts and stops the real `llm-router` binary, the way an operator would, on a data directory of the bench's
//! choosing and an ephemeral port.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router::app::LISTENING_ON;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::http::{Answer, Client, encode_request};
use crate::procfs::{self, Memory};

/// How long a start may take before the bench gives up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a SIGTERM'd router may take to flush and exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `/healthz` is retried while the router does not answer 200 yet.
const READY_POLL: Duration = Duration::from_millis(2);

/// Lines of the router's stderr kept to explain a failed start.
const STDERR_LINES_KEPT: usize = 20;

/// The `llm-router` beside the bench's own executable: same target directory, same profile.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe.parent().context("the bench executable has no directory")?;
    Ok(dir.join(format!("llm-router{}", std::env::consts::EXE_SUFFIX)))
}

/// How to start a router: which binary, which data directory, which administrator password, whether registrations
/// are probed.
#[derive(Debug, Clone)]
pub struct RouterSpec {
    pub binary: PathBuf,
    pub data_dir: PathBuf,
    pub admin_password: String,
    /// Probe each registering node's runtime (off unless a mode measures the probe: the simulated fleet has no
    /// runtimes).
    pub reachability_check: bool,
    /// Run the router under this open-file limit, soft and hard (so it cannot raise it); `None`: the bench's own.
    pub open_file_limit: Option<u64>,
    /// Further arguments of `llm-router serve`.
    pub extra_args: Vec<String>,
}

impl RouterSpec {
    /// Checks the binary exists, so a missing build is reported before any work.
    pub fn new(binary: PathBuf, data_dir: &Path, admin_password: String) -> anyhow::Result<Self> {
        if !binary.is_file() {
            bail!(
                "no router binary at {}: build it with `cargo build --release -p llm-router -p bench`, or pass --router-bin",
                binary.display()
            );
        }
        Ok(RouterSpec {
            binary,
            data_dir: data_dir.to_owned(),
            admin_password,
            reachability_check: false,
            open_file_limit: None,
            extra_args: Vec::new(),
        })
    }

    /// Spawns the router and waits for its listening line.
    pub async fn start(&self) -> anyhow::Result<Router> {
        let mut command = match self.open_file_limit {
            // `ulimit -n` without -S or -H sets both limits; the shell then becomes the router, same pid.
            Some(limit) => {
                let mut command = Command::new("sh");
                command.args(["-c", "ulimit -n \"$0\" && exec \"$@\"", &limit.to_string()]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&self.data_dir);
        if !self.reachability_check {
            command.arg("--no-reachability-check");
        }
        command.args(&self.extra_args);
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // Defaults for everything the bench does not set; a stray LLM_ROUTER_* in the shell must not change them.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("LLM_ROUTER_") {
                command.env_remove(name);
            }
        }
        command.env("LLM_ROUTER_ADMIN_PASSWORD", &self.admin_password).env("LLM_ROUTER_LOG", "warn");
        // The bench registers its whole fleet from one address and leaves nodes pending while it sets up: the
        // anonymous registration limits would refuse that, so they are off (as environment variables, which a
        // router from before the limits ignores, so the same bench measures both).
        command.env("LLM_ROUTER_REGISTRATION_RATE", "0").env("LLM_ROUTER_MAX_PENDING", "0");
        // Likewise every simulated node connects from 127.0.0.1, where a real fleet has an address per machine: one
        // address may hold any number of connections.
        command.env("LLM_ROUTER_MAX_CONNECTIONS_PER_SOURCE", "0");

        let spawned_at = Instant::now();
        let mut child = command.spawn().with_context(|| format!("starting {}", self.binary.display()))?;
        let pid = child.id().context("the router exited at once")?;
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut tail) = tail.lock() {
                        if tail.len() == STDERR_LINES_KEPT {
                            tail.pop_front();
                        }
                        tail.push_back(line);
                    }
                }
            });
        }
        let stdout = child.stdout.take().context("the router's stdout is not piped")?;
        let mut lines = BufReader::new(stdout).lines();
        let waited = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix(LISTENING_ON).and_then(|url| url.strip_prefix("http://")) {
                    return Ok(Some(addr.trim().parse::<SocketAddr>()?));
                }
            }
            anyhow::Ok(None)
        })
        .await;
        let addr = match waited {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                let status = child.wait().await.ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
                bail!("the router exited before listening ({status:?}); its stderr:\n{}", tail_text(&stderr_tail));
            }
            Ok(Err(err)) => return Err(err.context("reading the router's listening line")),
            Err(_) => bail!("the router did not print its listening line within {START_TIMEOUT:?}"),
        };
        let listening_after = spawned_at.elapsed();
        // Keep draining stdout so the router never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Router { child, pid, addr, spawned_at, listening_after, stderr_tail })
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    tail.lock().map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// A running router; killed if dropped without [`Router::stop`].
pub struct Router {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub spawned_at: Instant,
    /// From spawn to the listening line.
    pub listening_after: Duration,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Router {
    /// The `Host` header value for requests to this router.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        procfs::memory(self.pid)
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        procfs::cpu_seconds(Some(self.pid))
    }

    /// Polls `GET /healthz` until it answers 200 and returns the time from spawn to that answer. Only then is the
    /// router fully serving, with its SIGTERM handler installed.
    pub async fn wait_ready(&self) -> anyhow::Result<Duration> {
        let request = encode_request("GET", "/healthz", &self.host(), &[], b"");
        loop {
            let answer = Client::new(self.addr).send(&request).await;
            if let Ok(Answer { status: 200 }) = answer {
                return Ok(self.spawned_at.elapsed());
            }
            if self.spawned_at.elapsed() > START_TIMEOUT {
                bail!("GET /healthz did not answer 200 within {START_TIMEOUT:?} (last: {answer:?})");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The last lines the router wrote on stderr.
    pub fn stderr_tail(&self) -> String {
        tail_text(&self.stderr_tail)
    }

    /// Asks the router to stop (SIGTERM: it writes its last figures and closes the database) and waits; kills it
    /// if it takes longer than 30 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid).ok().and_then(Pid::from_raw).context("router pid out of range")?;
        if kill_process(pid, Signal::TERM).is_err() {
            // Already gone; reap it.
            self.child.wait().await.context("waiting for the router")?;
            bail!("the router had already exited; its stderr:\n{}", self.stderr_tail());
        }
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => {
                let status = status.context("waiting for the router")?;
                if !status.success() {
                    bail!("the router exited with {status} on SIGTERM; its stderr:\n{}", self.stderr_tail());
                }
                Ok(())
            }
            Err(_) => {
                self.child.kill().await.context("killing the router")?;
                bail!("the router did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed")
            }
        }
    }
}

/// A router serving in this process, for the tests of the modes: the defaults, but no reachability check, no
/// registration limits, `/v1` open, and the given policy (or settings).
#[cfg(test)]
pub struct InProcess {
    pub addr: SocketAddr,
    pub admin_password: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

#[cfg(test)]
impl InProcess {
    pub async fn start(policy: llm_router::config::RoutingPolicy) -> InProcess {
        InProcess::start_with(|settings| settings.routing.policy = policy).await
    }

    /// A router with those settings, changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut llm_router::config::Settings)) -> InProcess {
        InProcess::start_in(tempfile::tempdir().expect("temporary directory"), configure).await
    }

    /// A router on the data directory `dir` (e.g. a database the test wrote), with those settings changed by
    /// `configure`.
    pub async fn start_in(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut llm_router::config::Settings),
    ) -> InProcess {
        use llm_router::app::App;
        use llm_router::clock::SystemClock;
        use llm_router::config::{InferenceAuth, Settings};

        let admin_password = "bench-test-password".to_owned();
        let mut settings = Settings {
            admin_password: Some(admin_password.clone()),
            reachability_check: false,
            inference_auth: InferenceAuth::None,
            registration_rate: 0,
            max_pending: 0,
            ..Settings::new(dir.path().to_owned())
        };
        configure(&mut settings);
        let app = App::build(settings, Arc::new(SystemClock)).await.expect("router builds");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        InProcess { addr, admin_password, stop, server, _dir: dir }
    }

    /// Stops the router and checks that it stopped cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.expect("server task").expect("router stops cleanly");
    }
}
