//! The placer's decision (SPEC §15) at fleet scale, through the router library's own `deploy::plan`: a fleet of
//! nodes of which a share run `--manage-runtimes`, and deployments of several replicas each. Measured: the first
//! pass, which places every replica; a pass that changes nothing (what the placing router does every second); and a
//! pass after a share of the placed-on nodes went offline, which moves their replicas. The registry's walk over the
//! fleet that gathers the candidates is not in these times.

use std::time::Instant;

use llm_router::deploy::{Candidate, plan};
use llm_router::model::deployment::{Deployment, DeploymentSpec, Replica};
use llm_router_protocol::{NodeStatus, RuntimeKind};
use serde::Serialize;
use uuid::Uuid;

use crate::cli::PlacementArgs;
use crate::stats::median;

#[derive(Debug, Serialize)]
pub struct PlacementReport {
    pub nodes: usize,
    pub managed: usize,
    pub deployments: usize,
    pub replicas: usize,
    pub placed: usize,
    /// Medians over the runs, in milliseconds.
    pub first_pass_ms: f64,
    pub steady_pass_ms: f64,
    pub after_failures_pass_ms: f64,
    /// Replicas the pass after the failures moved.
    pub moved: usize,
}

fn fleet(args: &PlacementArgs) -> Vec<Candidate> {
    (0..args.managed)
        .map(|i| Candidate {
            id: Uuid::from_u128(1 + i as u128),
            status: NodeStatus::Online,
            cordoned: i % 97 == 0,
            runtimes: if i % 10 == 0 {
                vec![RuntimeKind::Vllm]
            } else {
                vec![RuntimeKind::LlamaCpp, RuntimeKind::Vllm]
            },
            tags: vec![format!("rack-{}", i % 20), if i % 2 == 0 { "a100".into() } else { "l4".into() }],
            free_per_gpu: vec![((i % 8) as u64 + 1) * 10_000_000_000],
        })
        .collect()
}

fn deployments(args: &PlacementArgs) -> Vec<Deployment> {
    (0..args.deployments)
        .map(|i| Deployment {
            id: Uuid::from_u128(1_000_000_000 + i as u128),
            name: format!("deployment-{i}"),
            spec: DeploymentSpec {
                model: format!("model-{i}"),
                source: format!("file:///models/{i}.gguf"),
                sha256: None,
                runtime: if i % 5 == 0 { RuntimeKind::Vllm } else { RuntimeKind::LlamaCpp },
                args: vec![],
                replicas: args.replicas,
                gpu_memory_bytes: Some(((i % 4) as u64 + 1) * 8_000_000_000),
                selector_tags: if i % 3 == 0 { vec!["a100".into()] } else { vec![] },
                max_concurrency: None,
            },
            revision: 1,
            created_by: "bench".into(),
            created_at: i as i64,
            updated_at: i as i64,
        })
        .collect()
}

fn apply(replicas: &mut Vec<Replica>, changes: Vec<Replica>) {
    let mut by_key: std::collections::HashMap<(Uuid, u32), Replica> =
        replicas.drain(..).map(|r| ((r.deployment_id, r.slot), r)).collect();
    for change in changes {
        by_key.insert((change.deployment_id, change.slot), change);
    }
    replicas.extend(by_key.into_values());
}

pub fn run(args: &PlacementArgs) -> anyhow::Result<PlacementReport> {
    let nodes = fleet(args);
    let deployments = deployments(args);
    let others = args.nodes.saturating_sub(args.managed);
    let (mut first, mut steady, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let (mut placed, mut moved) = (0, 0);
    for _ in 0..args.runs {
        let started = Instant::now();
        let changes = plan(&deployments, &[], &nodes, others, 1);
        first.push(started.elapsed().as_secs_f64() * 1e3);
        let mut replicas = Vec::new();
        apply(&mut replicas, changes);
        placed = replicas.iter().filter(|r| r.node_id.is_some()).count();

        let started = Instant::now();
        let unchanged = plan(&deployments, &replicas, &nodes, others, 2);
        steady.push(started.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(unchanged.is_empty(), "a pass over an unchanged fleet moved {} replicas", unchanged.len());

        // One node in fifty of those holding a replica goes offline.
        let mut failed = nodes.clone();
        for (i, node) in failed.iter_mut().enumerate() {
            if i % 50 == 0 {
                node.status = NodeStatus::Offline;
            }
        }
        let started = Instant::now();
        let changes = plan(&deployments, &replicas, &failed, others, 3);
        after.push(started.elapsed().as_secs_f64() * 1e3);
        moved = changes.iter().filter(|r| r.node_id.is_some()).count();
    }
    Ok(PlacementReport {
        nodes: args.nodes,
        managed: args.managed,
        deployments: args.deployments,
        replicas: args.deployments * args.replicas as usize,
        placed,
        first_pass_ms: median(&first).unwrap_or(0.0),
        steady_pass_ms: median(&steady).unwrap_or(0.0),
        after_failures_pass_ms: median(&after).unwrap_or(0.0),
        moved,
    })
}

pub fn print(report: &PlacementReport) {
    println!(
        "placement: {} nodes ({} with --manage-runtimes), {} deployments, {} replicas asked, {} placed",
        report.nodes, report.managed, report.deployments, report.replicas, report.placed
    );
    println!("  first pass (places every replica):      {:>9.2} ms", report.first_pass_ms);
    println!("  pass over an unchanged fleet:           {:>9.2} ms", report.steady_pass_ms);
    println!(
        "  pass after 1 in 50 nodes went offline:  {:>9.2} ms ({} replicas moved)",
        report.after_failures_pass_ms, report.moved
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_fleet_is_placed_and_a_failure_moves_replicas() {
        let args = PlacementArgs { nodes: 2_000, managed: 500, deployments: 40, replicas: 4, runs: 1 };
        let report = run(&args).expect("runs");
        assert_eq!(report.replicas, 160);
        assert_eq!(report.placed, 160, "500 nodes hold 160 replicas");
        assert!(report.moved > 0, "replicas on the failed nodes moved");
    }
}
