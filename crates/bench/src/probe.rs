//! `bench probe`: what hostile runtimes cost the registration reachability probe (SPEC §9). A stand-in runtime in
//! this process answers `/v1/models` the way a stranger would (a body of 1 GiB, a lying `Content-Length`, 200,000
//! models), `--registrations` registrations point at it at once, and the report gives their answers and the router's
//! peak resident memory. A last phase lists many short ids within 1 MiB, to show what the router keeps of them.
//!
//! Each phase runs against a fresh router process on the same data directory, so its peak memory (`VmHWM`) is that
//! phase's alone.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use llm_router_protocol::{GpuDevice, REGISTER_PATH, RegisterRequest, RegisterResponse};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cli::ProbeArgs;
use crate::fleet;
use crate::http::{Client, encode_request};
use crate::router::RouterSpec;
use crate::stats::ErrorCounts;

/// Bytes of one chunk the stand-in writes.
const CHUNK_BYTES: usize = 64 * 1024;

/// Short ids the last phase lists: about 360 KB, within the probe's 1 MiB.
const FITTING_MODELS: usize = 20_000;

/// How a stand-in runtime answers `GET /v1/models`.
#[derive(Debug, Clone)]
enum Answer {
    /// A model list padded to this many bytes, chunked, without a length.
    Stream(u64),
    /// `Content-Length` of this many bytes, then the same padded list, unchunked.
    Declared(u64),
    /// This body, chunked.
    Listing(Arc<Vec<u8>>),
}

/// One hostile runtime and what it did.
struct Phase {
    name: &'static str,
    runtime: String,
    answer: Answer,
}

/// What one phase saw.
#[derive(Debug, Serialize)]
pub struct PhaseReport {
    pub name: &'static str,
    /// What the stand-in runtime sent.
    pub runtime: String,
    /// Answers to the registrations, by status (`HTTP 422`, ...).
    pub answers: ErrorCounts,
    /// The message of the first error answer, if any.
    pub message: Option<String>,
    /// Bytes the stand-in managed to write before the router hung up, over all registrations.
    pub runtime_sent_mb: f64,
    pub elapsed_secs: f64,
    pub router_rss_mb: f64,
    pub router_peak_rss_mb: f64,
    /// Model ids the router kept for the first node registered (phases whose registrations succeed).
    pub kept_models: Option<usize>,
}

/// What `bench probe` reports.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub registrations: usize,
    pub phases: Vec<PhaseReport>,
}

/// Runs every phase, each against a fresh router started from `spec` with the reachability check on.
pub async fn run(spec: &RouterSpec, args: &ProbeArgs) -> anyhow::Result<ProbeReport> {
    let spec = RouterSpec { reachability_check: true, ..spec.clone() };
    let stream_bytes = args.stream_mib << 20;
    let phases = [
        Phase {
            name: "stream",
            runtime: format!("{} MiB model list, chunked, no length", args.stream_mib),
            answer: Answer::Stream(stream_bytes),
        },
        Phase {
            name: "declared",
            runtime: format!("Content-Length of {} MiB, then the body", args.stream_mib),
            answer: Answer::Declared(stream_bytes),
        },
        Phase {
            name: "models",
            runtime: format!("{} models listed, chunked", args.models),
            answer: Answer::Listing(Arc::new(model_list(args.models))),
        },
        Phase {
            name: "fitting",
            runtime: format!("{FITTING_MODELS} short ids within 1 MiB"),
            answer: Answer::Listing(Arc::new(model_list(FITTING_MODELS))),
        },
    ];
    let mut reports = Vec::with_capacity(phases.len());
    for phase in phases {
        eprintln!("probe/{}: {} registrations against: {}", phase.name, args.registrations, phase.runtime);
        reports.push(run_phase(&spec, &phase, args.registrations).await?);
    }
    Ok(ProbeReport { registrations: args.registrations, phases: reports })
}

async fn run_phase(spec: &RouterSpec, phase: &Phase, registrations: usize) -> anyhow::Result<PhaseReport> {
    let runtime = StandIn::start(phase.answer.clone()).await?;
    // On an early return the router is dropped, which kills it.
    let router = spec.start().await?;
    router.wait_ready().await?;
    let host = router.host();
    let requests: Vec<Vec<u8>> = (0..registrations)
        .map(|i| {
            let body = register_body(&format!("probe-{}-{i:04}", phase.name), runtime.addr.port())?;
            Ok(encode_request("POST", REGISTER_PATH, &host, &[("Content-Type", "application/json")], &body))
        })
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let outcomes = fleet::send_all(router.addr, Arc::new(requests), registrations).await;
    let elapsed = started.elapsed().as_secs_f64();
    let memory = router.memory();

    let mut answers = ErrorCounts::default();
    let mut message = None;
    let mut first_node = None;
    for sent in &outcomes {
        match &sent.result {
            Ok((status, body)) => {
                answers.add(format!("HTTP {status}"));
                if *status == 201 {
                    first_node = first_node.or(serde_json::from_slice::<RegisterResponse>(body).ok());
                } else if message.is_none() {
                    message = serde_json::from_slice::<serde_json::Value>(body)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned));
                }
            }
            Err(err) => answers.add(err.label()),
        }
    }
    let kept_models = match first_node {
        Some(node) => Some(loaded_models(&router, &spec.admin_password, &node).await?),
        None => None,
    };
    router.stop().await?;
    let memory = memory?;
    let sent = runtime.stop();
    Ok(PhaseReport {
        name: phase.name,
        runtime: phase.runtime.clone(),
        answers,
        message,
        runtime_sent_mb: sent as f64 / 1e6,
        elapsed_secs: elapsed,
        router_rss_mb: memory.rss_mb(),
        router_peak_rss_mb: memory.peak_mb(),
        kept_models,
    })
}

/// A registration whose runtime is the stand-in, without model lists, so the probe's answer fills them.
fn register_body(name: &str, port: u16) -> anyhow::Result<Vec<u8>> {
    let request = RegisterRequest {
        machine_name: name.to_owned(),
        ip_address: Some(Ipv4Addr::LOCALHOST.to_string()),
        runtime_port: i64::from(port),
        runtime_version: "stand-in".to_owned(),
        gpu_devices: Some(vec![GpuDevice { model: "NVIDIA L4".to_owned(), count: 1, memory_bytes: None, uuids: None }]),
        supported_runtimes: None,
        loaded_models: None,
        ready_models: None,
        tags: None,
    };
    Ok(serde_json::to_vec(&request)?)
}

/// How many model ids the router kept for `node`.
async fn loaded_models(
    router: &crate::router::Router,
    password: &str,
    node: &RegisterResponse,
) -> anyhow::Result<usize> {
    let host = router.host();
    let session = fleet::login(router.addr, &host, password).await?;
    let bearer = format!("Bearer {session}");
    let path = format!("{REGISTER_PATH}/{}", node.node_id);
    let mut client = Client::new(router.addr);
    let answer = client.send(&encode_request("GET", &path, &host, &[("Authorization", &bearer)], b"")).await?;
    if answer.status != 200 {
        bail!("GET {path} answered HTTP {}", answer.status);
    }
    let node: serde_json::Value = serde_json::from_slice(client.body()).context("parsing a node")?;
    Ok(node["loaded_models"].as_array().map_or(0, Vec::len))
}

/// `{"object":"list","data":[{"id":"m-000000"},…]}` with `count` ids.
fn model_list(count: usize) -> Vec<u8> {
    let mut body = b"{\"object\":\"list\",\"data\":[".to_vec();
    for i in 0..count {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("{{\"id\":\"m-{i:06}\"}}").as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

/// The stand-in runtime: answers every connection's first request as its [`Answer`] says, then closes.
struct StandIn {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

impl StandIn {
    async fn start(answer: Answer) -> anyhow::Result<StandIn> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.context("binding the stand-in runtime")?;
        let addr = listener.local_addr()?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (answer, counter) = (answer.clone(), counter.clone());
                tokio::spawn(async move { serve(stream, &answer, &counter).await });
            }
        });
        Ok(StandIn { addr, sent, server })
    }

    /// Stops accepting and returns the bytes written so far.
    fn stop(self) -> u64 {
        self.server.abort();
        self.sent.load(Ordering::Relaxed)
    }
}

/// Reads one request head and writes the answer until done or until the router hangs up; adds the body bytes
/// written to `sent` before the connection closes.
async fn serve(mut stream: TcpStream, answer: &Answer, sent: &AtomicU64) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) if head.len() + n > 64 * 1024 => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let mut written = 0;
    let _ = write_answer(&mut stream, answer, &mut written).await;
    sent.fetch_add(written, Ordering::Relaxed);
}

async fn write_answer(stream: &mut TcpStream, answer: &Answer, written: &mut u64) -> std::io::Result<()> {
    let chunked = !matches!(answer, Answer::Declared(_));
    let length = match answer {
        Answer::Declared(bytes) => format!("Content-Length: {bytes}\r\n"),
        _ => "Transfer-Encoding: chunked\r\n".to_owned(),
    };
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{length}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    match answer {
        Answer::Listing(body) => {
            for chunk in body.chunks(CHUNK_BYTES) {
                write_chunk(stream, chunk, chunked, written).await?;
            }
        }
        Answer::Stream(total) | Answer::Declared(total) => {
            // A valid list start, then whitespace: JSON to the last byte, so only the size can refuse it.
            let start = b"{\"object\":\"list\",\"data\":[{\"id\":\"m\"}";
            let end = b"]}";
            let padding = vec![b' '; CHUNK_BYTES];
            write_chunk(stream, start, chunked, written).await?;
            let mut left = total.saturating_sub((start.len() + end.len()) as u64);
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(CHUNK_BYTES).min(CHUNK_BYTES);
                write_chunk(stream, &padding[..n], chunked, written).await?;
                left -= n as u64;
            }
            write_chunk(stream, end, chunked, written).await?;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    stream.flush().await
}

async fn write_chunk(stream: &mut TcpStream, data: &[u8], chunked: bool, written: &mut u64) -> std::io::Result<()> {
    if chunked {
        stream.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
        stream.write_all(data).await?;
        stream.write_all(b"\r\n").await?;
    } else {
        stream.write_all(data).await?;
    }
    *written += data.len() as u64;
    Ok(())
}

/// The report for people.
pub fn print(report: &ProbeReport) {
    println!("probe: {} registrations at once per hostile runtime, reachability check on", report.registrations);
    for phase in &report.phases {
        println!("  {:<9} {}", phase.name, phase.runtime);
        println!("            answers      {} in {:.2} s", phase.answers.line(), phase.elapsed_secs);
        if let Some(message) = &phase.message {
            println!("            message      {message}");
        }
        if let Some(kept) = phase.kept_models {
            println!("            models kept  {kept} (first node)");
        }
        println!("            runtime sent {:.1} MB in all", phase.runtime_sent_mb);
        println!("            router RSS   {:.1} MB, peak {:.1} MB", phase.router_rss_mb, phase.router_peak_rss_mb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_list_is_json_with_every_id() {
        let list: llm_router_protocol::ModelList = serde_json::from_slice(&model_list(3)).expect("json");
        assert_eq!(list.ids(), ["m-000000", "m-000001", "m-000002"]);
        assert!(model_list(FITTING_MODELS).len() < 1 << 20, "the fitting phase must fit the probe's limit");
        assert!(model_list(200_000).len() > 1 << 20);
    }

    #[tokio::test]
    async fn the_stand_in_streams_a_chunked_list_of_the_asked_size() {
        let runtime = StandIn::start(Answer::Stream(200_000)).await.expect("start");
        let mut client = Client::new(runtime.addr);
        let answer = client.send(&encode_request("GET", "/v1/models", "x", &[], b"")).await.expect("answer");
        assert_eq!(answer.status, 200);
        assert_eq!(client.body().len(), 200_000);
        let list: llm_router_protocol::ModelList = serde_json::from_slice(client.body()).expect("json");
        assert_eq!(list.ids(), ["m"]);

        // The count is added before the connection closes, so after the end of a raw read it is complete.
        let mut raw = TcpStream::connect(runtime.addr).await.expect("connect");
        raw.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut answer = Vec::new();
        raw.read_to_end(&mut answer).await.expect("read");
        assert!(answer.ends_with(b"]}\r\n0\r\n\r\n"));
        assert_eq!(runtime.stop(), 400_000);
    }
}
