//! A simulated fleet: what its agents send (registration and heartbeat bodies, built from the protocol crate's
//! types) and the calls that set it up (register many, sign in, approve many, count).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llm_router_protocol::{
    GpuDevice, GpuMetrics, HEARTBEAT_PATH, HeartbeatRequest, NODE_TOKEN_HEADER, REGISTER_PATH, RegisterRequest,
    RegisterResponse,
};
use serde::Deserialize;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::http::{Client, ClientError, encode_request};
use crate::stats::ErrorCounts;

/// GPU models of the two groups every simulated machine has, four GPUs each.
pub const GPU_GROUPS: [(&str, u64); 2] =
    [("NVIDIA H100 80GB HBM3", 85_520_809_984), ("NVIDIA A100-SXM4-80GB", 85_899_345_920)];

/// GPUs per group.
pub const GPUS_PER_GROUP: u32 = 4;

/// Model ids every simulated runtime has loaded and ready.
pub const MODELS: [&str; 2] = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-32B-Instruct"];

/// Machine name of simulated node `i`.
pub fn machine_name(i: usize) -> String {
    format!("gpu-node-{i:06}")
}

/// An address in 10.0.0.0/8 for simulated node `i`.
pub fn ip_address(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// The two tags of simulated node `i`: its rack and its zone.
pub fn tags(i: usize) -> Vec<String> {
    vec![format!("rack-{:02}", i % 40), if i.is_multiple_of(2) { "zone-a" } else { "zone-b" }.to_owned()]
}

/// The GPUs every simulated machine registers: the two groups of [`GPU_GROUPS`].
pub fn gpu_devices() -> Vec<GpuDevice> {
    GPU_GROUPS
        .iter()
        .map(|(model, memory)| GpuDevice {
            model: (*model).to_owned(),
            count: i64::from(GPUS_PER_GROUP),
            memory_bytes: Some(*memory),
            uuids: None,
        })
        .collect()
}

/// The registration body of simulated node `i`: two GPU groups, two models loaded and, when `ready`, ready, two tags.
pub fn register_body_with(i: usize, ready: bool) -> anyhow::Result<Vec<u8>> {
    let models: Vec<String> = MODELS.iter().map(|m| (*m).to_owned()).collect();
    let ready_models = if ready { models.clone() } else { Vec::new() };
    let request = RegisterRequest {
        machine_name: machine_name(i),
        ip_address: Some(ip_address(i)),
        runtime_port: 8000,
        runtime_version: "vllm 0.8.5".to_owned(),
        gpu_devices: Some(gpu_devices()),
        supported_runtimes: Some(vec!["vllm".to_owned(), "llama_cpp".to_owned()]),
        loaded_models: Some(models),
        ready_models: Some(ready_models),
        tags: Some(tags(i)),
    };
    Ok(serde_json::to_vec(&request)?)
}

/// Per-GPU figures of simulated node `i`, varied a little by node so bodies are not all identical.
pub fn gpu_metrics(i: usize) -> Vec<GpuMetrics> {
    let mut gpus = Vec::new();
    for (group, (model, memory)) in GPU_GROUPS.iter().enumerate() {
        for g in 0..GPUS_PER_GROUP {
            let index = group as u32 * GPUS_PER_GROUP + g;
            let load = ((i as u64 * 7 + u64::from(index) * 13) % 100) as f64;
            gpus.push(GpuMetrics {
                index,
                model: Some((*model).to_owned()),
                utilization: Some(load),
                memory_used_bytes: Some(memory / 100 * (20 + load as u64 * 3 / 4)),
                memory_total_bytes: Some(*memory),
                temperature_c: Some(35.0 + load / 2.5),
                ..GpuMetrics::default()
            });
        }
    }
    gpus
}

/// The heartbeat body of simulated node `i`: CPU and memory figures, eight GPUs, both model lists.
pub fn heartbeat_body(i: usize, node_id: Uuid) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&heartbeat(i, node_id))?)
}

/// Node `i`'s heartbeat, as [`heartbeat_body`] serializes it.
pub fn heartbeat(i: usize, node_id: Uuid) -> HeartbeatRequest {
    let models: Vec<String> = MODELS.iter().map(|m| (*m).to_owned()).collect();
    HeartbeatRequest {
        node_id,
        cpu_usage: Some((i % 90) as f64 + 5.5),
        memory_usage: Some((i % 70) as f64 + 20.25),
        gpus: Some(gpu_metrics(i)),
        loaded_models: Some(models.clone()),
        ready_models: Some(models),
        active_requests: Some((i % 17) as u64),
        load: None,
        replicas: None,
    }
}

/// The whole heartbeat request of a node, ready to write on a connection.
pub fn heartbeat_request(host: &str, node: &NodeCredentials, body: &[u8]) -> Vec<u8> {
    encode_request(
        "POST",
        HEARTBEAT_PATH,
        host,
        &[("Content-Type", "application/json"), (NODE_TOKEN_HEADER, &node.token)],
        body,
    )
}

/// A registered node's identity.
#[derive(Debug, Clone)]
pub struct NodeCredentials {
    pub id: Uuid,
    pub token: String,
}

/// The outcome of one request sent by [`send_all`].
#[derive(Debug)]
pub struct Sent {
    pub latency: Duration,
    /// Status and body, or why there was no answer.
    pub result: Result<(u16, Vec<u8>), ClientError>,
}

/// Sends every request once, `concurrency` at a time over as many keep-alive connections, and returns the
/// outcomes in the order of `requests`.
pub async fn send_all(addr: SocketAddr, requests: Arc<Vec<Vec<u8>>>, concurrency: usize) -> Vec<Sent> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let requests = requests.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut client = Client::new(addr);
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(request) = requests.get(i) else { break };
                let started = Instant::now();
                let result = client.send(request).await.map(|answer| (answer.status, client.body().to_vec()));
                done.push((i, Sent { latency: started.elapsed(), result }));
            }
            done
        });
    }
    let mut all = Vec::with_capacity(requests.len());
    while let Some(done) = workers.join_next().await {
        // A worker only ends by running out of requests; a panic in one is a bug worth surfacing.
        all.extend(done.unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic())));
    }
    all.sort_unstable_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, sent)| sent).collect()
}

/// Counts a failed outcome by kind; `true` when the answer had the expected status.
pub fn tally(sent: &Sent, expected: u16, errors: &mut ErrorCounts) -> bool {
    match &sent.result {
        Ok((status, _)) if *status == expected => true,
        Ok((status, _)) => {
            errors.add(format!("HTTP {status}"));
            false
        }
        Err(err) => {
            errors.add(err.label());
            false
        }
    }
}

/// Builds the registration requests of nodes `0..count`.
pub fn registration_requests(host: &str, count: usize, ready: bool) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..count)
        .map(|i| {
            let body = register_body_with(i, ready)?;
            Ok(encode_request("POST", REGISTER_PATH, host, &[("Content-Type", "application/json")], &body))
        })
        .collect()
}

/// Registers nodes `0..count`, their models ready or not yet, and returns their credentials; any failure stops the
/// bench.
pub async fn register_nodes(
    addr: SocketAddr,
    host: &str,
    count: usize,
    concurrency: usize,
    ready: bool,
) -> anyhow::Result<Vec<NodeCredentials>> {
    let requests = Arc::new(registration_requests(host, count, ready)?);
    let outcomes = send_all(addr, requests, concurrency).await;
    let mut errors = ErrorCounts::default();
    let mut nodes = Vec::with_capacity(count);
    for sent in &outcomes {
        if tally(sent, 201, &mut errors)
            && let Ok((_, body)) = &sent.result
        {
            let answer: RegisterResponse = serde_json::from_slice(body).context("parsing a registration answer")?;
            nodes.push(NodeCredentials { id: answer.node_id, token: answer.node_token });
        }
    }
    if errors.total() > 0 {
        bail!("{} of {count} registrations failed: {}", errors.total(), errors.line());
    }
    Ok(nodes)
}

/// Signs in as `admin` and returns the session token for `Authorization: Bearer`.
pub async fn login(addr: SocketAddr, host: &str, password: &str) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct LoginAnswer {
        token: String,
    }
    let body = serde_json::to_vec(&serde_json::json!({"username": "admin", "password": password}))?;
    let request = encode_request("POST", "/v0/auth/login", host, &[("Content-Type", "application/json")], &body);
    let mut client = Client::new(addr);
    let answer = client.send(&request).await.context("signing in")?;
    if answer.status != 200 {
        bail!("signing in answered HTTP {}: {}", answer.status, String::from_utf8_lossy(client.body()));
    }
    let login: LoginAnswer = serde_json::from_slice(client.body()).context("parsing the login answer")?;
    Ok(login.token)
}

/// Makes an API key of the `inference` scope named `name`, with `limits` (an object of SPEC §14's limits; `null`:
/// none), and returns the key to send as `Authorization: Bearer`.
pub async fn create_api_key(
    addr: SocketAddr,
    host: &str,
    session: &str,
    name: &str,
    limits: serde_json::Value,
) -> anyhow::Result<String> {
    let mut body = serde_json::json!({"name": name, "scope": "inference"});
    if !limits.is_null() {
        body["limits"] = limits;
    }
    let bearer = format!("Bearer {session}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    let request = encode_request("POST", "/v0/api-keys", host, &headers, body.to_string().as_bytes());
    let mut client = Client::new(addr);
    let answer = client.send(&request).await.context("creating an API key")?;
    if answer.status != 201 && answer.status != 200 {
        bail!("POST /v0/api-keys answered HTTP {}: {}", answer.status, String::from_utf8_lossy(client.body()));
    }
    let made: serde_json::Value = serde_json::from_slice(client.body()).context("parsing the new key")?;
    made["key"].as_str().map(str::to_owned).context("the new key's answer has no `key`")
}

/// Approves every node; any failure stops the bench.
pub async fn approve_nodes(
    addr: SocketAddr,
    host: &str,
    session: &str,
    nodes: &[NodeCredentials],
    concurrency: usize,
) -> anyhow::Result<()> {
    let bearer = format!("Bearer {session}");
    let requests: Vec<Vec<u8>> = nodes
        .iter()
        .map(|node| {
            encode_request("POST", &format!("/v0/nodes/{}/approve", node.id), host, &[("Authorization", &bearer)], b"")
        })
        .collect();
    let outcomes = send_all(addr, Arc::new(requests), concurrency).await;
    let mut errors = ErrorCounts::default();
    for sent in &outcomes {
        tally(sent, 200, &mut errors);
    }
    if errors.total() > 0 {
        bail!("{} of {} approvals failed: {}", errors.total(), nodes.len(), errors.line());
    }
    Ok(())
}

/// How many nodes `GET /v0/nodes` lists.
pub async fn count_nodes(addr: SocketAddr, host: &str, session: &str) -> anyhow::Result<usize> {
    let bearer = format!("Bearer {session}");
    let request = encode_request("GET", REGISTER_PATH, host, &[("Authorization", &bearer)], b"");
    let mut client = Client::new(addr);
    let answer = client.send(&request).await.context("listing nodes")?;
    if answer.status != 200 {
        bail!("GET /v0/nodes answered HTTP {}", answer.status);
    }
    let nodes: Vec<serde::de::IgnoredAny> = serde_json::from_slice(client.body()).context("parsing the node list")?;
    Ok(nodes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_through_the_protocol_types() {
        let register: RegisterRequest =
            serde_json::from_slice(&register_body_with(70_000, true).expect("body")).expect("parse");
        assert_eq!(register.machine_name, "gpu-node-070000");
        assert_eq!(register.ip_address.as_deref(), Some("10.1.17.112"));
        let gpus = register.gpu_devices.expect("gpus");
        assert_eq!(gpus.iter().map(|g| g.count).sum::<i64>(), 8);
        let id = Uuid::new_v4();
        let heartbeat: HeartbeatRequest = serde_json::from_slice(&heartbeat_body(3, id).expect("body")).expect("parse");
        assert_eq!(heartbeat.node_id, id);
        let gpus = heartbeat.gpus.expect("gpus");
        assert_eq!(gpus.len(), 8);
        assert!(gpus.iter().all(|g| g.utilization.is_some_and(|u| (0.0..=100.0).contains(&u))));
        assert_eq!(heartbeat.ready_models.map(|m| m.len()), Some(2));
    }
}
