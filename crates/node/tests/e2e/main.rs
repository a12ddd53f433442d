//! End-to-end tests of the agent: the real `llm-router` and `llm-node` binaries, a stand-in runtime and a stand-in
//! `nvidia-smi`. The router runs with a 1 s heartbeat interval and marks nodes offline after 2 s, so every scenario
//! takes seconds; every wait polls the router's API with a deadline.

mod helpers;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use helpers::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

/// One router, one stand-in runtime, one agent's settings, and the scratch directory they share.
struct Fleet {
    scratch: Scratch,
    runtime: FakeRuntime,
    router: Router,
    admin: Admin,
}

impl Fleet {
    async fn start(models: &[&str]) -> Self {
        let scratch = Scratch::new();
        scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
        let runtime = FakeRuntime::start(models);
        let router = Router::start(&scratch.path("router-data"), &scratch.path("router.log"));
        let admin = Admin::login(&router.url()).await;
        Fleet { scratch, runtime, router, admin }
    }

    fn state_dir(&self) -> PathBuf {
        self.scratch.path("node-state")
    }

    fn node_settings(&self) -> NodeSettings {
        NodeSettings {
            router_url: self.router.url(),
            runtime_url: self.runtime.url(),
            state_dir: self.state_dir(),
            name: "gpu-box-1".into(),
            path_env: self.scratch.path_env(),
            log: self.scratch.path("node.log"),
            join_token: None,
            ca_cert: None,
        }
    }

    fn start_node(&self) -> Node {
        Node::start(&self.node_settings())
    }

    /// Both logs, for a failed wait.
    fn logs(&self) -> String {
        format!(
            "--- llm-node log:\n{}\n--- llm-router log:\n{}",
            tail(&self.scratch.path("node.log")),
            tail(&self.router.log)
        )
    }

    /// Wait until the router lists exactly one node and `check` accepts it; that node.
    async fn wait_node(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let check = &check;
        wait_for(what, WAIT, || self.logs(), || async move { self.admin.only_node().await.filter(|node| check(node)) })
            .await
    }
}

fn status(node: &Value) -> &str {
    node["status"].as_str().unwrap_or("")
}

fn id(node: &Value) -> String {
    node["id"].as_str().expect("node id").to_owned()
}

#[test]
fn help_explains_every_setting() {
    let output = Command::new(node_bin()).arg("--help").output().expect("run llm-node --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--router-url",
        "LLM_ROUTER_URL",
        "--runtime-url",
        "LLM_NODE_RUNTIME_URL",
        "http://127.0.0.1:8000",
        "--ip",
        "LLM_NODE_IP",
        "--name",
        "LLM_NODE_NAME",
        "--state-dir",
        "LLM_NODE_STATE_DIR",
        "--tags",
        "LLM_NODE_TAGS",
        "--gpu-detection",
        "--manage-runtimes",
        "LLM_NODE_MANAGE_RUNTIMES",
        "--serve-port",
        "LLM_NODE_SERVE_PORT",
        "--model-cache-dir",
        "--llama-server",
        "--llama-cpp-python",
        "--vllm",
        "--runtime-start-timeout-secs",
        "LLM_NODE_GPU_DETECTION",
        "nvidia-smi",
        "--supported-runtimes",
        "--runtime-version",
    ] {
        assert!(help.contains(needle), "--help does not mention {needle}:\n{help}");
    }
    assert!(!help.contains("--backoff-base-ms"), "test-only flags stay hidden");
}

#[test]
fn no_gpu_is_a_clear_non_zero_exit() {
    for (case, script) in [
        (
            "nvidia-smi fails",
            "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9",
        ),
        ("nvidia-smi lists nothing", "exit 0"),
    ] {
        let scratch = Scratch::new();
        scratch.fake_nvidia_smi(script);
        let settings = NodeSettings {
            router_url: format!("http://127.0.0.1:{}", free_port()),
            runtime_url: format!("http://127.0.0.1:{}", free_port()),
            state_dir: scratch.path("state"),
            name: "no-gpu".into(),
            path_env: scratch.path_env(),
            log: scratch.path("node.log"),
            join_token: None,
            ca_cert: None,
        };
        let mut node = Node::start(&settings);
        let exit = node.wait_exit(Duration::from_secs(10));
        let log = node.log_text();
        assert_eq!(exit.code(), Some(3), "{case}: exit status {exit:?}; log:\n{log}");
        assert!(log.contains("no GPU was found"), "{case}: {log}");
        assert!(log.contains("nvidia-smi:"), "{case}: the message names the path tried: {log}");
        if case == "nvidia-smi fails" {
            assert!(log.contains("exit status 9"), "{case}: the cause is named: {log}");
        } else {
            assert!(log.contains("it lists no GPU"), "{case}: {log}");
        }
        assert!(!settings.state_dir.join("node.json").exists(), "{case}: nothing was registered");
    }
}

/// Registration, metrics while pending, approval, models coming and going, a clean stop, a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lifecycle_from_registration_to_restart() {
    let fleet = Fleet::start(&["llama-3-8b"]).await;
    let mut node = fleet.start_node();

    let registered = fleet.wait_node("the node registered as pending", |n| status(n) == "pending").await;
    let node_id = id(&registered);
    assert_eq!(registered["machine_name"], "gpu-box-1");
    assert_eq!(registered["runtime_port"], json!(fleet.runtime.port));
    assert_eq!(registered["runtime_version"], RUNTIME_VERSION);
    assert_eq!(registered["supported_runtimes"], json!(["vllm"]));
    assert_eq!(registered["tags"], json!(["e2e", "rack-1"]));
    assert_eq!(
        registered["gpu_devices"],
        json!([
            {"model": "NVIDIA H100 80GB HBM3", "count": 2, "memory_bytes": 81559 * MIB,
             "uuids": ["GPU-e2e00000-0000-0000-0000-000000000000", "GPU-e2e00000-0000-0000-0000-000000000001"]},
            {"model": "NVIDIA A100-SXM4-40GB", "count": 1, "memory_bytes": 40960 * MIB,
             "uuids": ["GPU-e2e00000-0000-0000-0000-000000000002"]},
        ])
    );

    // Identity kept, private to its owner.
    let state_file = fleet.state_dir().join("node.json");
    let mode = std::fs::metadata(&state_file).expect("state file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(stored_node_id(&fleet.state_dir()).as_deref(), Some(node_id.as_str()));

    // Heartbeats carry figures while the node waits for approval.
    let pending = fleet
        .wait_node("heartbeat figures while pending", |n| n["metrics"]["gpus"].as_array().is_some_and(|g| g.len() == 3))
        .await;
    assert_eq!(status(&pending), "pending", "a heartbeat never approves a node");
    let metrics = &pending["metrics"];
    assert!(metrics["cpu_usage"].as_f64().is_some_and(|v| (0.0..=100.0).contains(&v)), "{metrics}");
    assert!(metrics["memory_usage"].as_f64().is_some_and(|v| v > 0.0 && v <= 100.0), "{metrics}");
    let gpus = metrics["gpus"].as_array().expect("gpus");
    assert_eq!(gpus[0]["index"], 0);
    assert_eq!(gpus[0]["model"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpus[0]["utilization"].as_f64(), Some(35.0));
    assert_eq!(gpus[0]["memory_used_bytes"], json!(1024 * MIB));
    assert_eq!(gpus[0]["memory_total_bytes"], json!(81559 * MIB));
    assert_eq!(gpus[0]["temperature_c"].as_f64(), Some(41.0));
    assert_eq!(gpus[1]["utilization"].as_f64(), Some(70.0));
    assert!(gpus[2]["utilization"].is_null(), "[Not Supported] is absent, not zero: {}", gpus[2]);
    assert!(gpus[2]["memory_used_bytes"].is_null(), "[N/A] is absent, not zero: {}", gpus[2]);
    // GPU health, as far as nvidia-smi can tell (no XID from it).
    assert_eq!(gpus[0]["uuid"], "GPU-e2e00000-0000-0000-0000-000000000000");
    assert_eq!(gpus[0]["ecc_uncorrected"], 0);
    assert_eq!(gpus[0]["power_watts"].as_f64(), Some(312.45));
    assert_eq!(gpus[0]["throttle_reasons"], json!(["sw_power_cap"]));
    assert_eq!(gpus[1]["throttle_reasons"], json!(["hw_slowdown", "sw_thermal_slowdown"]));
    assert_eq!(gpus[2]["uuid"], "GPU-e2e00000-0000-0000-0000-000000000002");
    for field in ["ecc_uncorrected", "power_watts", "throttle_reasons", "xid"] {
        assert!(gpus[2].get(field).is_none(), "[N/A] and [Not Supported] are left out: {}", gpus[2]);
    }
    assert!(gpus.iter().all(|g| g.get("xid").is_none()), "nvidia-smi cannot tell XID errors");
    assert_eq!(pending["ready_models"], json!(["llama-3-8b"]));
    assert!(metrics.get("load").is_none(), "a runtime without /metrics reports no load: {metrics}");

    // Approval: the runtime has a model, so the node goes online.
    fleet.admin.approve(&node_id).await;
    fleet.wait_node("online after approval", |n| status(n) == "online").await;

    // The runtime unloads its model: registering; loads one again: online.
    fleet.runtime.set_models(&[]);
    let registering = fleet.wait_node("registering without models", |n| status(n) == "registering").await;
    assert_eq!(registering["ready_models"], json!([]));
    fleet.runtime.set_models(&["qwen2-7b"]);
    let online = fleet.wait_node("online with a model again", |n| status(n) == "online").await;
    assert_eq!(online["ready_models"], json!(["qwen2-7b"]));

    // SIGTERM: a prompt, clean exit; the router then marks the silent node offline.
    let exit = node.terminate(Duration::from_secs(2));
    assert!(exit.success(), "SIGTERM ends the agent with status 0, got {exit:?}");
    fleet.wait_node("offline after the agent stopped", |n| status(n) == "offline").await;

    // Restarted: the same node comes back online without a new approval.
    let _node = fleet.start_node();
    let back = fleet.wait_node("the same node online again", |n| status(n) == "online").await;
    assert_eq!(id(&back), node_id);
    assert_eq!(stored_node_id(&fleet.state_dir()).as_deref(), Some(node_id.as_str()));
}

/// The runtime's own load (SPEC §13): read from its `/metrics` into every heartbeat, and gone from them once the
/// runtime serves no metrics any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_carry_the_load_the_runtime_publishes() {
    let fleet = Fleet::start(&["meta-llama/Llama-3.1-8B-Instruct"]).await;
    fleet.runtime.set_metrics(Some(include_str!("../fixtures/metrics/vllm.txt")));
    let _node = fleet.start_node();

    let node = fleet.wait_node("the runtime's load in a heartbeat", |n| n["metrics"].get("load").is_some()).await;
    // Two vLLM engines: their requests summed, their KV caches averaged.
    let kv_cache_usage = (0.4285714285714286 + 0.125) / 2.0;
    assert_eq!(node["metrics"]["load"], json!({"running": 5, "waiting": 7, "kv_cache_usage": kv_cache_usage}));

    fleet.runtime.set_metrics(None);
    fleet
        .wait_node("heartbeats without load once /metrics answers 404", |n| {
            n["metrics"]["gpus"].is_array() && n["metrics"].get("load").is_none()
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_restart_keeps_the_same_node() {
    let mut fleet = Fleet::start(&["llama-3-8b"]).await;
    let node = fleet.start_node();
    let registered = fleet.wait_node("registered", |n| status(n) == "pending").await;
    let node_id = id(&registered);
    fleet.admin.approve(&node_id).await;
    fleet.wait_node("online", |n| status(n) == "online").await;

    fleet.router.kill();
    node.wait_log("router unreachable", WAIT, || fleet.logs()).await;

    let port = fleet.router.port;
    fleet.router = Router::start_on(&fleet.scratch.path("router-data"), &fleet.scratch.path("router.log"), port);
    fleet.admin = Admin::login(&fleet.router.url()).await;
    let before = fleet.admin.only_node().await.expect("the node survived the restart");
    let seen_before = before["last_seen_at"].clone();
    let back = fleet
        .wait_node("heartbeats reaching the restarted router", |n| {
            status(n) == "online" && n["last_seen_at"] != seen_before
        })
        .await;
    assert_eq!(id(&back), node_id, "the agent carries on as the same node");
    assert_eq!(stored_node_id(&fleet.state_dir()).as_deref(), Some(node_id.as_str()));
    node.wait_log("router reachable again", WAIT, || fleet.logs()).await;
    assert_eq!(node.log_text().matches("registered with the router").count(), 1, "no second registration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_registers_anew_and_waits_for_approval() {
    let fleet = Fleet::start(&["llama-3-8b"]).await;
    let _node = fleet.start_node();
    let first = fleet.wait_node("registered", |n| status(n) == "pending").await;
    let first_id = id(&first);
    fleet.admin.approve(&first_id).await;
    fleet.wait_node("online", |n| status(n) == "online").await;

    fleet.admin.delete(&first_id).await;
    let again = fleet.wait_node("registered anew as pending", |n| id(n) != first_id && status(n) == "pending").await;
    let new_id = id(&again);
    let (state_dir, new_id) = (&fleet.state_dir(), new_id.as_str());
    wait_for(
        "the new identity stored",
        WAIT,
        || fleet.logs(),
        || async move { (stored_node_id(state_dir).as_deref() == Some(new_id)).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_the_router_registers_once_it_is_up() {
    let scratch = Scratch::new();
    scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
    let runtime = FakeRuntime::start(&["m"]);
    let router_port = free_port();
    let settings = NodeSettings {
        router_url: format!("http://127.0.0.1:{router_port}"),
        runtime_url: runtime.url(),
        state_dir: scratch.path("state"),
        name: "early-bird".into(),
        path_env: scratch.path_env(),
        log: scratch.path("node.log"),
        join_token: None,
        ca_cert: None,
    };
    let mut node = Node::start(&settings);
    let log = || tail(&settings.log);
    node.wait_log("router unreachable", WAIT, log).await;
    assert!(node.is_running(), "an unreachable router never stops the agent");

    let router = Router::start_on(&scratch.path("router-data"), &scratch.path("router.log"), router_port);
    let admin = &Admin::login(&router.url()).await;
    let registered = wait_for("registration once the router is up", WAIT, log, || async move {
        admin.only_node().await.filter(|n| status(n) == "pending")
    })
    .await;
    assert_eq!(registered["machine_name"], "early-bird");
}

/// A refusal (here 422: the router cannot reach the runtime) is logged once and retried slowly; the agent stays
/// up and registers once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_retried_without_crashing() {
    let scratch = Scratch::new();
    scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
    let runtime_port = free_port();
    let router = Router::start(&scratch.path("router-data"), &scratch.path("router.log"));
    let admin = &Admin::login(&router.url()).await;
    let settings = NodeSettings {
        router_url: router.url(),
        runtime_url: format!("http://127.0.0.1:{runtime_port}"),
        state_dir: scratch.path("state"),
        name: "runtime-late".into(),
        path_env: scratch.path_env(),
        log: scratch.path("node.log"),
        join_token: None,
        ca_cert: None,
    };
    let mut node = Node::start(&settings);
    let log = || format!("{}\n--- router:\n{}", tail(&settings.log), tail(&scratch.path("router.log")));
    node.wait_log("still refuses", WAIT, log).await;
    let text = node.log_text();
    assert!(text.contains("node_unreachable"), "the router's reason is logged: {text}");
    assert_eq!(text.matches("the router refused this node").count(), 1, "one log line, not one per try: {text}");
    assert!(node.is_running(), "a refusal never stops the agent");
    assert!(admin.nodes().await.is_some_and(|n| n.is_empty()));

    let _runtime = FakeRuntime::start_on(runtime_port, &["m"]);
    let registered = wait_for("registration once the runtime answers", WAIT, log, || async move {
        admin.only_node().await.filter(|n| status(n) == "pending")
    })
    .await;
    assert_eq!(registered["ready_models"], json!(["m"]));
}

#[tokio::test]
async fn an_agent_with_an_auto_approving_join_token_comes_online_without_an_administrator() {
    let scratch = Scratch::new();
    scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
    let runtime = FakeRuntime::start(&["tiny-model"]);
    let router = Router::start_with(
        &scratch.path("router-data"),
        &scratch.path("router.log"),
        0,
        &["--registration-mode", "token"],
    );
    let admin = Admin::login(&router.url()).await;
    let created = admin.create_join_token(json!({"name": "e2e", "auto_approve": true, "tags": ["joined"]})).await;
    let settings = |join_token: Option<String>, state: &str| NodeSettings {
        router_url: router.url(),
        runtime_url: runtime.url(),
        state_dir: scratch.path(state),
        name: "gpu-joined".into(),
        path_env: scratch.path_env(),
        log: scratch.path("node.log"),
        join_token,
        ca_cert: None,
    };
    let logs = || {
        format!("--- llm-node log:\n{}\n--- llm-router log:\n{}", tail(&scratch.path("node.log")), tail(&router.log))
    };

    // Without a token the router refuses, and the agent says what it lacks and keeps trying.
    let mut refused = Node::start(&settings(None, "state-without"));
    refused.wait_log("check --join-token", WAIT, logs).await;
    assert!(refused.is_running(), "a refused agent keeps running");
    assert_eq!(admin.nodes().await.map(|nodes| nodes.len()), Some(0));
    refused.terminate(WAIT);

    let token = created["token"].as_str().expect("token").to_owned();
    let _node = Node::start(&settings(Some(token), "state-with"));
    let node = wait_for("the node online without an approval", WAIT, logs, || async {
        admin.only_node().await.filter(|node| status(node) == "online")
    })
    .await;
    assert_eq!(node["approved_by"], "join-token:e2e");
    assert_eq!(node["joined_with"], "e2e");
    assert_eq!(node["tags"], json!(["e2e", "rack-1", "joined"]));
    assert!(
        !tail(&scratch.path("node.log")).contains(created["token"].as_str().expect("token")),
        "the agent never logs its join token"
    );
}

#[tokio::test]
async fn an_agent_heartbeats_over_https_through_a_certificate_rotation() {
    let scratch = Scratch::new();
    scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
    let runtime = FakeRuntime::start(&["tiny-model"]);
    let ca = TestCa::new();
    let ca_file = scratch.path("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");
    let (cert, key) = (scratch.path("router.pem"), scratch.path("router.key"));
    let first = ca.issue(&cert, &key);
    let router = Router::start_with(
        &scratch.path("router-data"),
        &scratch.path("router.log"),
        0,
        &["--tls-cert", cert.to_str().expect("path"), "--tls-key", key.to_str().expect("path")],
    );
    assert!(router.url().starts_with("https://"), "{}", router.url());
    let admin = Admin::login_trusting(&router.url(), Some(&ca.pem())).await;
    let settings = NodeSettings {
        router_url: router.url(),
        runtime_url: runtime.url(),
        state_dir: scratch.path("node-state"),
        name: "gpu-https".into(),
        path_env: scratch.path_env(),
        log: scratch.path("node.log"),
        join_token: None,
        ca_cert: Some(ca_file),
    };
    let logs = || format!("--- llm-node log:\n{}\n--- llm-router log:\n{}", tail(&settings.log), tail(&router.log));
    let _node = Node::start(&settings);
    let pending = wait_for("the node pending over https", WAIT, logs, || async { admin.only_node().await }).await;
    admin.approve(&id(&pending)).await;
    let online = wait_for("the node online", WAIT, logs, || async {
        admin.only_node().await.filter(|node| status(node) == "online")
    })
    .await;

    // Rotate: a new certificate in the same files, then SIGHUP.
    let second = ca.issue(&cert, &key);
    assert_ne!(first, second);
    router.hang_up();
    wait_for("the router to reload its certificate", WAIT, logs, || async {
        std::fs::read_to_string(&router.log).ok().filter(|log| log.contains("TLS certificate reloaded")).map(|_| ())
    })
    .await;
    let seen = online["last_seen_at"].as_str().expect("last seen").to_owned();
    wait_for("heartbeats after the rotation", WAIT, logs, || async {
        admin.only_node().await.filter(|node| {
            status(node) == "online" && node["last_seen_at"].as_str().is_some_and(|at| at > seen.as_str())
        })
    })
    .await;
    // A new connection is served the new certificate.
    let fresh = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA")])
        .tls_info(true)
        .build()
        .expect("client");
    let answer = fresh.get(format!("{}/healthz", router.url())).send().await.expect("healthz over https");
    let info = answer.extensions().get::<reqwest::tls::TlsInfo>().expect("TLS info");
    assert_eq!(info.peer_certificate().map(<[u8]>::to_vec), Some(second));
}

/// `--check` prints the registration and a heartbeat's GPU figures, health included, and talks to no router.
#[test]
fn check_prints_the_gpu_health_it_would_report() {
    let scratch = Scratch::new();
    scratch.fake_nvidia_smi_printing(THREE_GPUS_CSV);
    let settings = NodeSettings {
        router_url: format!("http://127.0.0.1:{}", free_port()),
        runtime_url: format!("http://127.0.0.1:{}", free_port()),
        state_dir: scratch.path("state"),
        name: "check".into(),
        path_env: scratch.path_env(),
        log: scratch.path("node.log"),
        join_token: None,
        ca_cert: None,
    };
    let output = node_command(&settings).arg("--check").stdout(std::process::Stdio::piped()).output().expect("run");
    assert!(output.status.success(), "{output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    let groups = &printed["registration"]["gpu_devices"];
    assert_eq!(groups[0]["uuids"].as_array().map(Vec::len), Some(2), "{printed}");
    let gpus = &printed["heartbeat_gpus"];
    assert_eq!(gpus[1]["power_watts"].as_f64(), Some(698.1), "{printed}");
    assert_eq!(gpus[1]["throttle_reasons"], json!(["hw_slowdown", "sw_thermal_slowdown"]));
    assert!(gpus[2].get("ecc_uncorrected").is_none(), "{printed}");
    assert!(printed["heartbeat_load"].is_null(), "no runtime, no load: {printed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_managing_runtimes_registers_its_forwarding_port() {
    let fleet = Fleet::start(&["llama-3-8b"]).await;
    // A `llama-server` on PATH is enough to announce llama.cpp; nothing is assigned, so it never runs.
    let llama_server = fleet.scratch.path("bin").join("llama-server");
    std::fs::write(&llama_server, "#!/bin/sh\nexit 1\n").expect("write llama-server");
    std::fs::set_permissions(&llama_server, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let serve_port = free_port();
    let mut node =
        Node::start_with(&fleet.node_settings(), &["--manage-runtimes", "--serve-port", &serve_port.to_string()]);

    // The router's reachability probe went to the forwarding port, which lists the own runtime's models.
    let registered = fleet.wait_node("the node registered", |n| status(n) == "pending").await;
    assert_eq!(registered["runtime_port"], json!(serve_port));
    assert_eq!(registered["supported_runtimes"], json!(["vllm", "managed:llama_cpp"]));
    let models: Value = reqwest::get(format!("http://127.0.0.1:{serve_port}/v1/models"))
        .await
        .expect("forwarding port answers")
        .json()
        .await
        .expect("json");
    assert_eq!(models["data"][0]["id"], "llama-3-8b");
    // Everything but a replica's model goes to the own runtime.
    let version: Value = reqwest::get(format!("http://127.0.0.1:{serve_port}/version"))
        .await
        .expect("forwarded")
        .json()
        .await
        .expect("json");
    assert_eq!(version["version"], RUNTIME_VERSION);

    let node_id = id(&registered);
    fleet.admin.approve(&node_id).await;
    let online = fleet.wait_node("online with the own runtime's model", |n| status(n) == "online").await;
    assert_eq!(online["ready_models"], json!(["llama-3-8b"]));

    assert!(node.terminate(Duration::from_secs(5)).success(), "{}", fleet.logs());
}
