//! The reconcile decisions, and the supervision of real child processes: a stand-in runtime (a Python script that
//! serves `/v1/models` on the port it is given and starts a grandchild `sleep` in its group).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llm_router_protocol::{Assignment, ReplicaReport, ReplicaState, RuntimeKind};
use uuid::Uuid;

use super::fetch::Fetcher;
use super::launch::Launchers;
use super::supervise::{Context, Timing};
use super::{Deployments, Plan, plan};

fn assignment(deployment: u128, revision: i64) -> Assignment {
    Assignment {
        deployment_id: Uuid::from_u128(deployment),
        revision,
        model: format!("model-{deployment}"),
        source: "file:///m.gguf".into(),
        sha256: None,
        runtime: RuntimeKind::LlamaCpp,
        args: Vec::new(),
        max_concurrency: None,
        gpu_memory_bytes: None,
    }
}

fn key(deployment: u128, revision: i64) -> super::Key {
    (Uuid::from_u128(deployment), revision)
}

#[test]
fn new_assignments_start_and_unlisted_deployments_stop() {
    let got = plan(&[(key(1, 1), true), (key(2, 1), false)], &[assignment(1, 1), assignment(3, 1)]);
    assert_eq!(got, Plan { start: vec![assignment(3, 1)], stop: vec![key(2, 1)] });
    assert_eq!(plan(&[(key(1, 1), true)], &[assignment(1, 1)]), Plan::default());
    // Everything unassigned: everything stops, ready or not.
    let got = plan(&[(key(1, 1), true), (key(2, 1), false)], &[]);
    assert_eq!(got.stop, vec![key(1, 1), key(2, 1)]);
    // The same assignment twice starts one replica.
    assert_eq!(plan(&[], &[assignment(1, 1), assignment(1, 1)]).start.len(), 1);
}

#[test]
fn an_old_revision_serves_until_the_new_one_is_ready() {
    // The new revision is assigned: it starts, the ready old one keeps serving.
    let got = plan(&[(key(1, 1), true)], &[assignment(1, 2)]);
    assert_eq!(got, Plan { start: vec![assignment(1, 2)], stop: vec![] });
    // Still starting: nothing changes.
    assert_eq!(plan(&[(key(1, 1), true), (key(1, 2), false)], &[assignment(1, 2)]), Plan::default());
    // Ready: the old one stops.
    let got = plan(&[(key(1, 1), true), (key(1, 2), true)], &[assignment(1, 2)]);
    assert_eq!(got, Plan { start: vec![], stop: vec![key(1, 1)] });
    // An old revision that serves nothing is not waited for.
    let got = plan(&[(key(1, 1), false), (key(1, 2), false)], &[assignment(1, 2)]);
    assert_eq!(got.stop, vec![key(1, 1)]);
    // Another deployment's ready replica does not retire it.
    let got = plan(&[(key(1, 1), true), (key(2, 1), true)], &[assignment(1, 2), assignment(2, 1)]);
    assert_eq!(got, Plan { start: vec![assignment(1, 2)], stop: vec![] });
}

/// A stand-in for `llama-server`: serves `{"data":[{"id": <--alias>}]}` on `--port` after `--delay` seconds, writes
/// its own pid and its grandchild's to `--pid-file` and the GPUs it sees to `<pid-file>.gpus`; with `--fail` it
/// prints a line and exits 3 at once.
const STAND_IN: &str = r#"
import http.server, json, os, subprocess, sys, time
args = sys.argv[1:]
def arg(name, default=None):
    return args[args.index(name) + 1] if name in args else default
if "--fail" in args:
    print("loading model")
    print("error: cannot load the model file", flush=True)
    sys.exit(3)
port, model = int(arg("--port")), arg("--alias")
sleeper = subprocess.Popen(["sleep", "600"])
with open(arg("--pid-file"), "w") as f:
    f.write(f"{os.getpid()} {sleeper.pid}")
with open(arg("--pid-file") + ".gpus", "w") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
time.sleep(float(arg("--delay", "0")))
class Models(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": model}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("serving", model, "on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), Models).serve_forever()
"#;

struct Bench {
    dir: tempfile::TempDir,
    deployments: Deployments,
    model_file: PathBuf,
}

impl Bench {
    fn new() -> Self {
        crate::client::install_tls_provider();
        let dir = tempfile::tempdir().expect("dir");
        let python = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs");
        let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
        let script = dir.path().join("llama-server");
        std::fs::write(&script, format!("#!{python}\n{STAND_IN}")).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let model_file = dir.path().join("tiny.gguf");
        std::fs::write(&model_file, b"GGUF").expect("model");
        let ctx = Context {
            fetcher: Fetcher::new(reqwest::Client::new(), dir.path().join("models")),
            launchers: Launchers { llama_server: Some(script), ..Launchers::default() },
            log_dir: dir.path().join("runtimes"),
            timing: Timing {
                restart_base: Duration::from_millis(100),
                restart_max: Duration::from_secs(1),
                stable_after: Duration::from_secs(60),
                ready_poll: Duration::from_millis(20),
                start_timeout: Duration::from_secs(10),
                stop_grace: Duration::from_secs(3),
            },
            probe: reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("client"),
            gpus: super::gpus::Gpus::default(),
        };
        Bench { deployments: Deployments::new(ctx), model_file, dir }
    }

    fn assignment(&self, deployment: u128, revision: i64, extra: &[&str]) -> Assignment {
        let mut args = vec!["--pid-file".to_owned(), self.pid_file(deployment, revision).display().to_string()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Assignment { source: format!("file://{}", self.model_file.display()), args, ..assignment(deployment, revision) }
    }

    fn pid_file(&self, deployment: u128, revision: i64) -> PathBuf {
        self.dir.path().join(format!("pids-{deployment}-{revision}"))
    }

    /// The GPUs the stand-in saw at its last start (`CUDA_VISIBLE_DEVICES`, or `all`).
    fn seen_gpus(&self, deployment: u128, revision: i64) -> String {
        let mut file = self.pid_file(deployment, revision).into_os_string();
        file.push(".gpus");
        std::fs::read_to_string(file).expect("gpus file")
    }

    /// The stand-in's pid and its grandchild's, as its last start wrote them.
    fn pids(&self, deployment: u128, revision: i64) -> (u32, u32) {
        let text = std::fs::read_to_string(self.pid_file(deployment, revision)).expect("pid file");
        let mut pids = text.split_whitespace().map(|p| p.parse::<u32>().expect("pid"));
        (pids.next().expect("pid"), pids.next().expect("grandchild pid"))
    }

    fn report(&self, deployment: u128, revision: i64) -> Option<ReplicaReport> {
        self.deployments
            .reports()
            .into_iter()
            .find(|r| r.deployment_id == Uuid::from_u128(deployment) && r.revision == revision)
    }

    /// Poll the reports until `done` holds, for at most `limit`.
    async fn until(&self, limit: Duration, what: &str, done: impl Fn(&[ReplicaReport]) -> bool) -> Vec<ReplicaReport> {
        let deadline = Instant::now() + limit;
        loop {
            let reports = self.deployments.reports();
            if done(&reports) {
                return reports;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {reports:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether a process runs (a zombie does not count: it waits only for its parent to reap it).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state != 'Z')
}

async fn until_dead(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|pid| alive(*pid)) {
        assert!(Instant::now() < deadline, "still alive: {:?}", pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ready(reports: &[ReplicaReport], deployment: u128, revision: i64) -> bool {
    reports.iter().any(|r| {
        r.deployment_id == Uuid::from_u128(deployment) && r.revision == revision && r.state == ReplicaState::Ready
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_becomes_ready_restarts_when_killed_and_stops_with_its_group() {
    let bench = Bench::new();
    bench.deployments.reconcile(vec![bench.assignment(1, 1, &[])]);
    let reports = bench.until(Duration::from_secs(15), "ready", |r| ready(r, 1, 1)).await;
    let report = &reports[0];
    let port = report.port.expect("port");
    assert_eq!(report.restarts, 0);
    assert_eq!(report.download_ms, Some(0), "a file on the node is not downloaded");
    assert_eq!((report.bytes_done, report.bytes_total), (Some(4), Some(4)));
    assert!(report.start_ms.is_some());
    assert_eq!(bench.deployments.ready_models(), ["model-1"]);
    assert_eq!(bench.deployments.port_for("model-1"), Some(port));
    assert_eq!(bench.deployments.port_for("model-2"), None);
    let (runtime, grandchild) = bench.pids(1, 1);
    assert_eq!(report.pid, Some(runtime));
    assert!(alive(grandchild));
    let log = bench.dir.path().join("runtimes").join(format!("{}-r1.log", Uuid::from_u128(1)));
    assert!(std::fs::read_to_string(&log).expect("log").contains("serving model-1"));

    // Killed: serving again within the first restart delay and its start time, the group's rest gone.
    let killed_at = Instant::now();
    let pid = rustix::process::Pid::from_raw(i32::try_from(runtime).expect("pid")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
    let reports = bench.until(Duration::from_secs(10), "ready again", |r| r[0].restarts == 1 && ready(r, 1, 1)).await;
    let back_in = killed_at.elapsed();
    assert!(back_in < Duration::from_secs(3), "served again after {back_in:?}");
    assert_ne!(reports[0].pid, Some(runtime));
    until_dead(&[runtime, grandchild], Duration::from_secs(2)).await;

    // No longer assigned: gone from the reports at once, the whole group stopped.
    let (runtime, grandchild) = bench.pids(1, 1);
    assert!(alive(runtime) && alive(grandchild));
    bench.deployments.reconcile(Vec::new());
    assert!(bench.deployments.reports().is_empty());
    assert!(bench.deployments.ready_models().is_empty());
    until_dead(&[runtime, grandchild], Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revision_is_ready_before_the_old_one_stops() {
    let bench = Bench::new();
    bench.deployments.reconcile(vec![bench.assignment(7, 1, &[])]);
    bench.until(Duration::from_secs(15), "revision 1 ready", |r| ready(r, 7, 1)).await;
    let (old, old_grandchild) = bench.pids(7, 1);

    bench.deployments.reconcile(vec![bench.assignment(7, 2, &["--delay", "0.5"])]);
    let both = bench.deployments.reports();
    assert_eq!(both.len(), 2, "old and new reported: {both:#?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // At every moment one of them serves the model.
        assert_eq!(bench.deployments.ready_models(), ["model-7"]);
        let old_report = bench.report(7, 1);
        if old_report.is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "revision 1 never retired: {:#?}", bench.deployments.reports());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new = bench.report(7, 2).expect("revision 2");
    assert_eq!(new.state, ReplicaState::Ready);
    assert_eq!(bench.deployments.port_for("model-7"), new.port);
    until_dead(&[old, old_grandchild], Duration::from_secs(5)).await;

    // The agent's exit stops everything before it returns.
    let (runtime, grandchild) = bench.pids(7, 2);
    bench.deployments.shutdown().await;
    assert!(!alive(runtime), "the runtime is reaped before shutdown returns");
    // SIGKILL has been sent to the rest of the group; it dies as the kernel gets to it.
    until_dead(&[grandchild], Duration::from_millis(500)).await;
    bench.deployments.reconcile(vec![bench.assignment(8, 1, &[])]);
    assert!(bench.deployments.reports().is_empty(), "nothing starts after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_exits_while_starting_fails_with_its_last_words_and_is_retried() {
    let bench = Bench::new();
    bench.deployments.reconcile(vec![bench.assignment(3, 1, &["--fail"])]);
    let reports = bench
        .until(Duration::from_secs(10), "failed twice", |r| r[0].state == ReplicaState::Failed && r[0].restarts >= 1)
        .await;
    let reason = reports[0].reason.as_deref().expect("reason");
    assert!(reason.contains("exit status 3"), "{reason}");
    assert!(reason.ends_with("error: cannot load the model file"), "{reason}");
    assert_eq!(reports[0].port, None);
    bench.deployments.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_model_file_or_runtime_fails_with_a_reason() {
    let bench = Bench::new();
    let missing = Assignment { source: "file:///nonexistent/tiny.gguf".into(), ..bench.assignment(4, 1, &[]) };
    let vllm = Assignment { runtime: RuntimeKind::Vllm, ..bench.assignment(5, 1, &[]) };
    bench.deployments.reconcile(vec![missing, vllm]);
    let reports =
        bench.until(Duration::from_secs(5), "both failed", |r| r.iter().all(|r| r.state == ReplicaState::Failed)).await;
    let reasons: Vec<&str> = reports.iter().filter_map(|r| r.reason.as_deref()).collect();
    assert!(reasons[0].contains("/nonexistent/tiny.gguf"), "{reasons:?}");
    assert_eq!(reasons[1], "this node cannot start vllm runtimes");
    bench.deployments.shutdown().await;
}

#[test]
fn reports_carry_download_progress() {
    let status = super::supervise::Status {
        state: ReplicaState::Downloading,
        progress: Some(std::sync::Arc::new(super::fetch::Progress::new())),
        ..super::supervise::Status::new()
    };
    let report = status.report(&assignment(1, 1));
    assert_eq!((report.bytes_done, report.bytes_total), (Some(0), None));
}

use super::gpus::tests::{GIB, sample};

/// Two 80 GiB GPUs, the first with 10 GiB in use by something else.
fn two_gpus() -> Vec<crate::gpu::GpuSample> {
    sample(&[(0, 80, 10), (1, 80, 0)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_ask_for_gpu_memory_each_see_only_the_gpus_they_were_given() {
    let bench = Bench::new();
    bench.deployments.gpus_sampled(&two_gpus());
    let asking =
        |deployment: u128| Assignment { gpu_memory_bytes: Some(60 * GIB), ..bench.assignment(deployment, 1, &[]) };
    bench.deployments.reconcile(vec![asking(1), asking(2), bench.assignment(3, 1, &[])]);
    let reports =
        bench.until(Duration::from_secs(15), "all ready", |r| ready(r, 1, 1) && ready(r, 2, 1) && ready(r, 3, 1)).await;
    let gpus_of = |deployment: u128| {
        reports.iter().find(|r| r.deployment_id == Uuid::from_u128(deployment)).and_then(|r| r.gpus.clone())
    };
    // One GPU each, never the same one; each runtime saw its own GPU alone; the one that asked for no memory saw all.
    let (first, second) = (gpus_of(1).expect("gpus of 1"), gpus_of(2).expect("gpus of 2"));
    let mut both = [first.clone(), second.clone()];
    both.sort();
    assert_eq!(both, [vec![0], vec![1]]);
    assert_eq!(bench.seen_gpus(1, 1), format!("GPU-{}", first[0]));
    assert_eq!(bench.seen_gpus(2, 1), format!("GPU-{}", second[0]));
    assert_eq!(gpus_of(3), None);
    assert_eq!(bench.seen_gpus(3, 1), "all");

    // A third that fits on neither waits with the figures; once the first stops, it starts on the first's GPU.
    bench.deployments.reconcile(vec![asking(1), asking(2), asking(4)]);
    let reports = bench
        .until(Duration::from_secs(10), "the third failed", |r| {
            r.iter().any(|r| r.deployment_id == Uuid::from_u128(4) && r.state == ReplicaState::Failed)
        })
        .await;
    let reason = reports.iter().find_map(|r| r.reason.clone()).expect("reason");
    assert!(reason.starts_with("no GPUs to start it on: the replica needs 60.00 GiB of GPU memory;"), "{reason}");
    bench.deployments.reconcile(vec![asking(2), asking(4)]);
    let reports = bench.until(Duration::from_secs(15), "the third ready", |r| ready(r, 4, 1)).await;
    let third = reports.iter().find(|r| r.deployment_id == Uuid::from_u128(4)).and_then(|r| r.gpus.clone());
    assert_eq!(third, Some(first.clone()));
    assert_eq!(bench.seen_gpus(4, 1), format!("GPU-{}", first[0]));
    bench.deployments.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revision_without_room_beside_the_old_one_stops_it_first() {
    let bench = Bench::new();
    bench.deployments.gpus_sampled(&sample(&[(0, 80, 0)]));
    let asking = |revision: i64| Assignment { gpu_memory_bytes: Some(60 * GIB), ..bench.assignment(1, revision, &[]) };
    bench.deployments.reconcile(vec![asking(1)]);
    bench.until(Duration::from_secs(15), "revision 1 ready", |r| ready(r, 1, 1)).await;
    let (old, old_grandchild) = bench.pids(1, 1);
    // The next sample shows what revision 1 holds: no room for revision 2 beside it.
    bench.deployments.gpus_sampled(&sample(&[(0, 80, 61)]));

    bench.deployments.reconcile(vec![asking(2)]);
    let reports = bench.until(Duration::from_secs(15), "revision 2 ready", |r| ready(r, 1, 2)).await;
    assert_eq!(reports.len(), 1, "revision 1 is gone: {reports:#?}");
    assert_eq!(reports[0].gpus, Some(vec![0]));
    assert_eq!(bench.seen_gpus(1, 2), "GPU-0");
    until_dead(&[old, old_grandchild], Duration::from_secs(5)).await;
    bench.deployments.shutdown().await;
}
