//! One replica's life: fetch its model, start its runtime on a free local port, wait until it serves the model,
//! watch it, start it again with backoff when it dies, and stop it (the whole process group) when told to.
//!
//! The runtime is a child in a process group of its own, so stopping it (SIGTERM, then SIGKILL after a grace
//! period) also stops what it started (vLLM's workers, a wrapper script's children); whatever is left of the group
//! once the runtime exited is killed too, before a restart. The waits are pure functions of the failures so far
//! (the agent's [`backoff_delay`] without jitter, [`failures_after_exit`]) and every duration is in [`Timing`], so tests run in milliseconds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llm_router_protocol::{Assignment, ReplicaReport, ReplicaState};
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::sync::watch;

use super::fetch::{Fetcher, Progress};
use super::gpus::Gpus;
use super::launch::{Launchers, command_line};
use crate::agent::backoff_delay;

/// Every wait of the supervision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The first restart's delay; each failure in a row doubles it.
    pub restart_base: Duration,
    pub restart_max: Duration,
    /// A runtime that served this long before it died is restarted after `restart_base` again.
    pub stable_after: Duration,
    /// Between two readiness probes of a starting runtime.
    pub ready_poll: Duration,
    /// How long a starting runtime may take to serve its model.
    pub start_timeout: Duration,
    /// Between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
}

impl Timing {
    pub fn new(start_timeout: Duration) -> Self {
        Timing {
            restart_base: Duration::from_secs(1),
            restart_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
            ready_poll: Duration::from_millis(100),
            start_timeout,
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// The failures in a row once a runtime that served for `served` died: a runtime that was stable starts the count
/// afresh.
pub fn failures_after_exit(failures: u32, served: Duration, stable_after: Duration) -> u32 {
    if served >= stable_after { 0 } else { failures }
}

/// What the replica's task shares with the reports and the forwarding.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: ReplicaState,
    pub reason: Option<String>,
    pub progress: Option<Arc<Progress>>,
    pub bytes: Option<u64>,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub download_ms: Option<u64>,
    pub start_ms: Option<u64>,
    /// The GPUs its runtime sees, when it was given some of them.
    pub gpus: Option<Vec<u32>>,
}

impl Status {
    pub fn new() -> Self {
        Status {
            state: ReplicaState::Pending,
            reason: None,
            progress: None,
            bytes: None,
            port: None,
            pid: None,
            restarts: 0,
            download_ms: None,
            start_ms: None,
            gpus: None,
        }
    }

    pub fn report(&self, assignment: &Assignment) -> ReplicaReport {
        let (bytes_done, bytes_total) = match (&self.progress, self.bytes) {
            (_, Some(size)) => (Some(size), Some(size)),
            (Some(progress), None) => {
                let (done, total) = progress.get();
                (Some(done), total)
            }
            (None, None) => (None, None),
        };
        ReplicaReport {
            deployment_id: assignment.deployment_id,
            revision: assignment.revision,
            state: self.state,
            reason: self.reason.clone(),
            bytes_done,
            bytes_total,
            port: self.port,
            pid: self.pid,
            restarts: self.restarts,
            download_ms: self.download_ms,
            start_ms: self.start_ms,
            gpus: self.gpus.clone(),
        }
    }
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

/// What every replica task uses.
pub struct Context {
    pub fetcher: Fetcher,
    pub launchers: Launchers,
    pub log_dir: PathBuf,
    pub timing: Timing,
    /// Readiness probes of the local runtimes.
    pub probe: reqwest::Client,
    /// The node's GPUs, given to the replicas that ask for GPU memory.
    pub gpus: Gpus,
}

/// A running runtime: its process group is killed when this is dropped without [`RuntimeProcess::stop`].
pub struct RuntimeProcess {
    child: tokio::process::Child,
    group: Option<Pid>,
    reaped: bool,
}

impl RuntimeProcess {
    /// Start `program` in a process group of its own, with `env` added to the agent's environment, its output
    /// appended to `log`.
    pub fn spawn(
        program: &Path,
        args: &[std::ffi::OsString],
        env: &[(&str, String)],
        log: &Path,
    ) -> std::io::Result<Self> {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let group = child.id().and_then(|id| Pid::from_raw(i32::try_from(id).ok()?));
        Ok(RuntimeProcess { child, group, reaped: false })
    }

    pub fn pid(&self) -> Option<u32> {
        self.group.map(|pid| pid.as_raw_nonzero().get().unsigned_abs())
    }

    /// Wait for the runtime to exit, then kill what is left of its group.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.reaped = true;
        self.kill_group(Signal::KILL);
        Ok(status)
    }

    /// SIGTERM to the group, SIGKILL after `grace`, and the runtime reaped.
    pub async fn stop(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        self.kill_group(Signal::TERM);
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            self.kill_group(Signal::KILL);
            let _ = self.child.wait().await;
        }
        self.reaped = true;
        self.kill_group(Signal::KILL);
    }

    fn kill_group(&self, signal: Signal) {
        if let Some(group) = self.group {
            // ESRCH: the group is gone already.
            let _ = kill_process_group(group, signal);
        }
    }
}

impl Drop for RuntimeProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group(Signal::KILL);
        }
    }
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The last non-empty line of a log file, for a failure's reason.
pub fn last_log_line(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(16 << 10))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(300).collect())
}

/// Whether the runtime on `port` lists `model` on `GET /v1/models` (200).
pub async fn serves(probe: &reqwest::Client, port: u16, model: &str) -> bool {
    let Ok(response) = probe.get(format!("http://127.0.0.1:{port}/v1/models")).send().await else {
        return false;
    };
    if !response.status().is_success() {
        return false;
    }
    let Ok(body) = response.bytes().await else { return false };
    serde_json::from_slice::<llm_router_protocol::ModelList>(&body)
        .is_ok_and(|list| list.data.iter().any(|m| m.id == model))
}

/// Completes once a stop is asked (or the asking side is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Run `fut` unless a stop is asked first (`None` then).
async fn or_stop<T>(stop: &mut watch::Receiver<bool>, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        out = fut => Some(out),
        () = stopped(stop) => None,
    }
}

/// What a replica's task tells the replicas' owner.
pub struct Hooks {
    /// The replica changed state.
    pub changed: Arc<dyn Fn(ReplicaState) + Send + Sync>,
    /// The replica fits on the GPUs only without the older revisions of its deployment: stop them now.
    pub retire_older: Arc<dyn Fn() + Send + Sync>,
}

/// The replica's task: runs `assignment` until `stop` turns true, telling `hooks` what happens.
pub async fn run(
    ctx: Arc<Context>,
    assignment: Assignment,
    status: Arc<Mutex<Status>>,
    mut stop: watch::Receiver<bool>,
    hooks: Hooks,
) {
    let changed = &hooks.changed;
    let set = |update: &dyn Fn(&mut Status)| {
        let state = {
            let mut status = status.lock().unwrap_or_else(|e| e.into_inner());
            let before = status.state;
            update(&mut status);
            (status.state != before).then_some(status.state)
        };
        if let Some(state) = state {
            changed(state);
        }
    };
    let log = ctx.log_dir.join(format!("{}-r{}.log", assignment.deployment_id, assignment.revision));
    let key = (assignment.deployment_id, assignment.revision);
    // Whichever way this task ends, the GPUs it was given are free again.
    struct GiveBack<'a>(&'a Gpus, super::Key);
    impl Drop for GiveBack<'_> {
        fn drop(&mut self) {
            self.0.release(self.1);
        }
    }
    let _give_back = GiveBack(&ctx.gpus, key);
    let timing = ctx.timing;
    let mut failures: u32 = 0;
    let mut spawned = false;
    loop {
        let fail = |reason: String, failures: u32| {
            // The agent's backoff without jitter: no other machine's runtime restarts in step with this one.
            let delay = backoff_delay(failures, timing.restart_base, timing.restart_max, 1.0);
            tracing::warn!(deployment = %assignment.deployment_id, revision = assignment.revision,
                model = %assignment.model, retry_in_secs = delay.as_secs_f64(), "replica failed: {reason}");
            set(&|s| {
                s.state = ReplicaState::Failed;
                s.reason = Some(reason.clone());
                s.port = None;
                s.pid = None;
            });
            delay
        };
        // A failure: shown with its reason, then the next try after the backoff, unless a stop comes first.
        macro_rules! retry {
            ($reason:expr) => {{
                let delay = fail($reason, failures);
                failures = failures.saturating_add(1);
                if or_stop(&mut stop, tokio::time::sleep(delay)).await.is_none() {
                    return;
                }
                continue;
            }};
        }

        // The model.
        if ctx.fetcher.needs_download(&assignment.source, assignment.sha256.as_deref()) {
            set(&|s| {
                s.state = ReplicaState::Downloading;
                s.reason = None;
            });
        }
        let fetch = ctx.fetcher.fetch(&assignment.source, assignment.sha256.as_deref(), |progress| {
            status.lock().unwrap_or_else(|e| e.into_inner()).progress = Some(progress);
        });
        let fetched = match or_stop(&mut stop, fetch).await {
            None => return,
            Some(Ok(fetched)) => fetched,
            Some(Err(e)) => retry!(e.to_string()),
        };
        {
            let mut s = status.lock().unwrap_or_else(|e| e.into_inner());
            s.bytes = Some(fetched.size);
            s.progress = None;
            s.download_ms.get_or_insert(fetched.download_ms);
        }

        // The runtime.
        let Some(launcher) = ctx.launchers.for_kind(assignment.runtime) else {
            retry!(format!("this node cannot start {} runtimes", assignment.runtime));
        };
        // Its GPUs, when the deployment asks for GPU memory: the same ones at every start of this replica.
        let pinned = match assignment.gpu_memory_bytes {
            None => None,
            Some(needed) => match ctx.gpus.claim(key, needed, assignment.runtime.gpus_needed(&assignment.args)) {
                Ok(pinned) => Some(pinned),
                Err(refused) => {
                    let mut reason = format!("no GPUs to start it on: {}", refused.reason);
                    if refused.older {
                        // No room for both revisions here: the older one stops first and this one takes its place.
                        reason.push_str("; stopping the replica of the previous revision to make room");
                        (hooks.retire_older)();
                    }
                    retry!(reason);
                }
            },
        };
        let env = pinned.as_ref().map(|p| p.env.as_slice()).unwrap_or_default();
        let spawn = free_port().and_then(|port| {
            let (program, args) = command_line(&launcher, &fetched.path, port, &assignment);
            tracing::info!(deployment = %assignment.deployment_id, revision = assignment.revision,
                model = %assignment.model, port, program = %program.display(), log = %log.display(),
                gpus = ?pinned.as_ref().map(|p| &p.indices), "starting runtime");
            RuntimeProcess::spawn(&program, &args, env, &log).map(|process| (port, process))
        });
        if spawned {
            status.lock().unwrap_or_else(|e| e.into_inner()).restarts += 1;
        }
        spawned = true;
        let (port, mut process) = match spawn {
            Ok(started) => started,
            Err(e) => retry!(format!("cannot start the runtime: {e}")),
        };
        let pid = process.pid();
        set(&|s| {
            s.state = ReplicaState::Starting;
            s.reason = None;
            s.port = Some(port);
            s.pid = pid;
            s.gpus = pinned.as_ref().map(|p| p.indices.clone());
        });
        let started = Instant::now();
        let ready = async {
            while started.elapsed() < timing.start_timeout {
                if serves(&ctx.probe, port, &assignment.model).await {
                    return true;
                }
                tokio::time::sleep(timing.ready_poll).await;
            }
            false
        };
        let outcome = tokio::select! {
            () = stopped(&mut stop) => {
                process.stop(timing.stop_grace).await;
                return;
            }
            exit = process.wait() => Err(format!(
                "the runtime exited before serving the model ({}){}",
                describe_exit(exit),
                last_log_line(&log).map(|l| format!(": {l}")).unwrap_or_default()
            )),
            ready = ready => if ready { Ok(()) } else { Err(format!(
                "the runtime did not serve the model within {} s{}",
                timing.start_timeout.as_secs(),
                last_log_line(&log).map(|l| format!(": {l}")).unwrap_or_default()
            )) },
        };
        if let Err(reason) = outcome {
            process.stop(timing.stop_grace).await;
            retry!(reason);
        }
        let start_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(deployment = %assignment.deployment_id, revision = assignment.revision,
            model = %assignment.model, port, start_ms, "replica ready");
        ctx.gpus.ready(key);
        set(&|s| {
            s.state = ReplicaState::Ready;
            s.start_ms = Some(start_ms);
        });

        let ready_at = Instant::now();
        let exit = tokio::select! {
            () = stopped(&mut stop) => {
                process.stop(timing.stop_grace).await;
                return;
            }
            exit = process.wait() => exit,
        };
        failures = failures_after_exit(failures, ready_at.elapsed(), timing.stable_after);
        let reason = format!(
            "the runtime exited ({}){}",
            describe_exit(exit),
            last_log_line(&log).map(|l| format!(": {l}")).unwrap_or_default()
        );
        retry!(reason);
    }
}

fn describe_exit(exit: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match exit {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => status.to_string(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_from_one_second_to_a_minute() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (0..9).map(|n| backoff_delay(n, base, max, 1.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(u32::MAX, base, max, 1.0), max);
    }

    #[test]
    fn a_runtime_that_served_long_enough_restarts_fast_again() {
        let stable = Duration::from_secs(60);
        assert_eq!(failures_after_exit(5, Duration::from_secs(59), stable), 5);
        assert_eq!(failures_after_exit(5, Duration::from_secs(60), stable), 0);
    }

    #[test]
    fn the_last_log_line_is_the_last_non_empty_one() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("r.log");
        assert_eq!(last_log_line(&log), None);
        std::fs::write(&log, "loading\nerror: out of memory\n\n  \n").expect("write");
        assert_eq!(last_log_line(&log).as_deref(), Some("error: out of memory"));
    }
}
