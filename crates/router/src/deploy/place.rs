//! Where each replica goes (SPEC §15): a pure decision over the deployments, their replicas and the nodes as the
//! registry knows them now, so that it is tested without a router.
//!
//! The rules:
//! - a replica stays on its node while the node is approved, heartbeating and healthy (`online` or `registering`,
//!   cordoned or not), still starts the deployment's runtime, and still has the selector's tags; otherwise it is
//!   placed anew;
//! - a replica to place goes to a schedulable node (`online` or `registering`, not cordoned) whose agent starts the
//!   runtime (`managed:<runtime>` in its `supported_runtimes`), that has every tag of the selector, no replica of
//!   the same deployment (spread: at most one per node), and the GPU memory asked for free (the heartbeat's free
//!   memory, less what replicas placed there and not started yet will take); a runtime that runs on a set number of
//!   GPUs (vLLM: its tensor × pipeline parallel size) also needs that many GPUs each with its share free (the
//!   agent then picks the GPUs themselves);
//! - among those, the node with the fewest replicas of any deployment, then the most free GPU memory, then by id;
//! - a replica no node can take is `pending`, with the reason.

use std::collections::HashMap;

use llm_router_protocol::{NodeStatus, ReplicaState, RuntimeKind};
use uuid::Uuid;

use crate::clock::Millis;
use crate::model::deployment::{AWAITING_AGENT, Deployment, Replica, ReplicaStatus};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: Uuid,
    pub status: NodeStatus,
    pub cordoned: bool,
    /// The runtimes its agent starts itself.
    pub runtimes: Vec<RuntimeKind>,
    pub tags: Vec<String>,
    /// Each GPU's free memory from its latest heartbeat, the most first; empty when it reported none (or not for
    /// every GPU).
    pub free_per_gpu: Vec<u64>,
}

impl Candidate {
    /// Free GPU memory, all GPUs together; `None` when it reported none.
    fn free_gpu_bytes(&self) -> Option<u64> {
        let total = self.free_per_gpu.iter().fold(0u64, |sum, free| sum.saturating_add(*free));
        (!self.free_per_gpu.is_empty()).then_some(total)
    }

    fn keeps(&self, deployment: &Deployment) -> bool {
        matches!(self.status, NodeStatus::Online | NodeStatus::Registering)
            && self.runtimes.contains(&deployment.spec.runtime)
            && has_tags(&self.tags, &deployment.spec.selector_tags)
    }
}

fn has_tags(tags: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|tag| tags.contains(tag))
}

/// Why candidates could not take a replica, counted.
#[derive(Debug, Default, Clone, Copy)]
struct Refusals {
    nodes: usize,
    runtime: usize,
    unschedulable: usize,
    tags: usize,
    taken: usize,
    memory: usize,
    gpus: usize,
}

impl Refusals {
    fn reason(&self, deployment: &Deployment) -> String {
        let runtime = deployment.spec.runtime;
        if self.nodes == 0 {
            return "no node can take it: no node is approved yet".to_owned();
        }
        let mut parts = Vec::new();
        let mut add = |count: usize, what: String| {
            if count > 0 {
                parts.push(format!("{count} {what}"));
            }
        };
        add(self.runtime, format!("without an agent that starts {runtime} (llm-node --manage-runtimes)"));
        add(self.unschedulable, "not schedulable (offline, degraded, pending approval or cordoned)".to_owned());
        add(self.tags, format!("without the tags {}", deployment.spec.selector_tags.join(", ")));
        add(self.taken, "running a replica of it already".to_owned());
        if let Some(bytes) = deployment.spec.gpu_memory_bytes {
            add(self.memory, format!("with less than {bytes} bytes of GPU memory free"));
        }
        if let Some((count, share)) = per_gpu(deployment) {
            let gpus = if count == 1 { "GPU".to_owned() } else { format!("{count} GPUs") };
            add(self.gpus, format!("without {gpus} with {share} bytes free each ({runtime} runs on {gpus})"));
        }
        let nodes = if self.nodes == 1 { "1 node".to_owned() } else { format!("{} nodes", self.nodes) };
        format!("no node can take it: of {nodes}, {}", parts.join("; "))
    }
}

/// The GPUs one replica runs on and the memory each must have free, for a runtime that sets their number.
fn per_gpu(deployment: &Deployment) -> Option<(u32, u64)> {
    let spec = &deployment.spec;
    let count = spec.runtime.gpus_needed(&spec.args)?;
    Some((count, spec.gpu_memory_bytes?.div_ceil(u64::from(count.max(1)))))
}

/// The replicas that change: placed, moved, dropped to pending, or pending for another reason. Each comes whole,
/// as it should be stored. `nodes` are the approved nodes whose agents start runtimes; `others` counts the approved
/// nodes whose agents start none, for the reasons.
pub fn plan(
    deployments: &[Deployment],
    replicas: &[Replica],
    nodes: &[Candidate],
    others: usize,
    now: Millis,
) -> Vec<Replica> {
    // Per node, by its position in `nodes`: what placement adds up as it goes (replicas of any deployment, memory
    // reserved by replicas that do not use it yet), and the last deployment that has a replica there.
    let position: HashMap<Uuid, usize> = nodes.iter().enumerate().map(|(i, node)| (node.id, i)).collect();
    let mut load = vec![0usize; nodes.len()];
    // Read for every candidate of every replica placed: kept apart from the rest of each node.
    let free_bytes: Vec<Option<u64>> = nodes.iter().map(Candidate::free_gpu_bytes).collect();
    let mut reserved = vec![0u64; nodes.len()];
    let mut used_by = vec![usize::MAX; nodes.len()];
    let mut current: HashMap<(Uuid, u32), &Replica> = HashMap::with_capacity(replicas.len());
    let specs: HashMap<Uuid, &Deployment> = deployments.iter().map(|d| (d.id, d)).collect();
    for replica in replicas {
        current.insert((replica.deployment_id, replica.slot), replica);
        if let (Some(&at), Some(deployment)) =
            (replica.node_id.and_then(|node| position.get(&node)), specs.get(&replica.deployment_id))
        {
            load[at] += 1;
            if matches!(replica.report.state, ReplicaState::Pending | ReplicaState::Downloading) {
                reserved[at] += deployment.spec.gpu_memory_bytes.unwrap_or(0);
            }
        }
    }

    let mut changes = Vec::new();
    let mut ordered: Vec<&Deployment> = deployments.iter().collect();
    ordered.sort_by_key(|d| (d.created_at, d.id));
    for (turn, deployment) in ordered.into_iter().enumerate() {
        let mut to_place = Vec::new();
        for slot in 0..deployment.spec.replicas {
            let replica = current.get(&(deployment.id, slot));
            let at = replica.and_then(|r| r.node_id).and_then(|node| position.get(&node).copied());
            let kept = at.filter(|&at| used_by[at] != turn && nodes[at].keeps(deployment));
            match kept {
                Some(at) => used_by[at] = turn,
                None => {
                    // It leaves its node: the node no longer counts it.
                    if let Some(at) = at {
                        load[at] = load[at].saturating_sub(1);
                    }
                    to_place.push(slot);
                }
            }
        }
        if to_place.is_empty() {
            continue;
        }
        // What does not change from one slot to the next, decided once: the nodes that may take a replica of this
        // deployment at all, and why the others may not.
        let mut fixed = Refusals { nodes: others + nodes.len(), runtime: others, ..Refusals::default() };
        let per_gpu = per_gpu(deployment);
        let short_of_gpus = |node: &Candidate| {
            per_gpu.is_some_and(|(count, share)| {
                let nth = usize::try_from(count).unwrap_or(usize::MAX).saturating_sub(1);
                node.free_per_gpu.get(nth).is_none_or(|free| *free < share)
            })
        };
        let eligible: Vec<usize> = (0..nodes.len())
            .filter(|&at| {
                let node = &nodes[at];
                if !node.runtimes.contains(&deployment.spec.runtime) {
                    fixed.runtime += 1;
                } else if node.cordoned || !matches!(node.status, NodeStatus::Online | NodeStatus::Registering) {
                    fixed.unschedulable += 1;
                } else if !has_tags(&node.tags, &deployment.spec.selector_tags) {
                    fixed.tags += 1;
                } else if short_of_gpus(node) {
                    fixed.gpus += 1;
                } else {
                    return true;
                }
                false
            })
            .collect();
        let memory = deployment.spec.gpu_memory_bytes;
        for slot in to_place {
            let mut refusals = Refusals { taken: 0, memory: 0, ..fixed };
            // The fewest replicas, then the most free memory, then the lowest id (read only on a tie).
            let mut best: Option<(usize, usize, u64)> = None;
            for &at in &eligible {
                let free = free_bytes[at].map(|free| free.saturating_sub(reserved[at]));
                if used_by[at] == turn {
                    refusals.taken += 1;
                } else if memory.is_some_and(|needed| free.is_none_or(|free| free < needed)) {
                    refusals.memory += 1;
                } else {
                    let free = free.unwrap_or(0);
                    let better = best.is_none_or(|(other, other_load, other_free)| {
                        match (load[at], std::cmp::Reverse(free)).cmp(&(other_load, std::cmp::Reverse(other_free))) {
                            std::cmp::Ordering::Equal => nodes[at].id < nodes[other].id,
                            order => order.is_lt(),
                        }
                    });
                    if better {
                        best = Some((at, load[at], free));
                    }
                }
            }
            let previous = current.get(&(deployment.id, slot)).copied();
            let next = match best {
                Some((at, _, _)) => {
                    used_by[at] = turn;
                    load[at] += 1;
                    reserved[at] += memory.unwrap_or(0);
                    Replica {
                        deployment_id: deployment.id,
                        slot,
                        node_id: Some(nodes[at].id),
                        placed_at: Some(now),
                        report: ReplicaStatus::pending(AWAITING_AGENT, now),
                    }
                }
                None => {
                    let reason = refusals.reason(deployment);
                    if let Some(previous) = previous
                        && previous.node_id.is_none()
                        && previous.report.reason.as_deref() == Some(reason.as_str())
                    {
                        continue;
                    }
                    Replica {
                        deployment_id: deployment.id,
                        slot,
                        node_id: None,
                        placed_at: None,
                        report: ReplicaStatus::pending(reason, now),
                    }
                }
            };
            changes.push(next);
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::deployment::DeploymentSpec;

    fn deployment(replicas: u32) -> Deployment {
        Deployment {
            id: Uuid::from_u128(1),
            name: "tiny".into(),
            spec: DeploymentSpec {
                model: "tiny".into(),
                source: "file:///m.gguf".into(),
                sha256: None,
                runtime: RuntimeKind::LlamaCpp,
                args: vec![],
                replicas,
                gpu_memory_bytes: Some(10),
                selector_tags: vec!["gpu".into()],
                max_concurrency: None,
            },
            revision: 1,
            created_by: "admin".into(),
            created_at: 0,
            updated_at: 0,
        }
    }

    fn node(n: u128, free: u64) -> Candidate {
        Candidate {
            id: Uuid::from_u128(100 + n),
            status: NodeStatus::Registering,
            cordoned: false,
            runtimes: vec![RuntimeKind::LlamaCpp],
            tags: vec!["gpu".into(), "eu".into()],
            free_per_gpu: vec![free],
        }
    }

    fn apply(replicas: &mut Vec<Replica>, changes: Vec<Replica>) {
        for change in changes {
            replicas.retain(|r| (r.deployment_id, r.slot) != (change.deployment_id, change.slot));
            replicas.push(change);
        }
        replicas.sort_by_key(|r| r.slot);
    }

    #[test]
    fn replicas_spread_one_per_node_and_the_rest_wait_with_the_reason() {
        let d = deployment(3);
        let nodes = [node(1, 50), node(2, 80)];
        let mut replicas = Vec::new();
        let changes = plan(std::slice::from_ref(&d), &replicas, &nodes, 0, 5);
        apply(&mut replicas, changes);
        let placed: Vec<Option<Uuid>> = replicas.iter().map(|r| r.node_id).collect();
        // The most free memory first, then the other; the third has nowhere to go.
        assert_eq!(placed, vec![Some(nodes[1].id), Some(nodes[0].id), None]);
        let reason = replicas[2].report.reason.clone().expect("reason");
        assert_eq!(reason, "no node can take it: of 2 nodes, 2 running a replica of it already");
        // Nothing changes on a second pass over the same fleet.
        assert!(plan(&[d], &replicas, &nodes, 0, 6).is_empty());
    }

    #[test]
    fn a_node_that_goes_offline_or_degraded_has_its_replica_placed_elsewhere() {
        let d = deployment(1);
        let mut nodes = vec![node(1, 50), node(2, 40)];
        let mut replicas = Vec::new();
        let changes = plan(std::slice::from_ref(&d), &replicas, &nodes, 0, 5);
        apply(&mut replicas, changes);
        assert_eq!(replicas[0].node_id, Some(nodes[0].id));
        for status in [NodeStatus::Offline, NodeStatus::Degraded] {
            let mut fleet = nodes.clone();
            fleet[0].status = status;
            let moved = plan(std::slice::from_ref(&d), &replicas, &fleet, 0, 9);
            assert_eq!(moved.len(), 1);
            assert_eq!(moved[0].node_id, Some(nodes[1].id), "{status}");
            assert_eq!(moved[0].placed_at, Some(9));
        }
        // Cordoned: it stays where it runs, and nothing new goes there.
        nodes[0].cordoned = true;
        assert!(plan(std::slice::from_ref(&d), &replicas, &nodes, 0, 9).is_empty());
        let two = Deployment { spec: DeploymentSpec { replicas: 2, ..d.spec.clone() }, ..d };
        let second = plan(&[two], &replicas, &nodes, 0, 9);
        assert_eq!(second[0].node_id, Some(nodes[1].id));
    }

    #[test]
    fn runtime_tags_and_memory_are_required_and_reported() {
        let d = deployment(1);
        let mut without_runtime = node(1, 50);
        without_runtime.runtimes = vec![RuntimeKind::Vllm];
        let mut without_tag = node(2, 50);
        without_tag.tags = vec!["eu".into()];
        let short = node(3, 5);
        let mut unknown = node(4, 0);
        unknown.free_per_gpu = Vec::new();
        let changes = plan(std::slice::from_ref(&d), &[], &[without_runtime, without_tag, short, unknown], 0, 1);
        assert_eq!(changes[0].node_id, None);
        assert_eq!(
            changes[0].report.reason.as_deref(),
            Some(
                "no node can take it: of 4 nodes, 1 without an agent that starts llama_cpp (llm-node \
                 --manage-runtimes); 1 without the tags gpu; 2 with less than 10 bytes of GPU memory free"
            )
        );
        // vLLM runs on one GPU unless told otherwise: two GPUs of 6 do not hold 10, four of 6 hold 10 over -tp 2.
        let vllm = |args: &[&str]| Deployment {
            spec: DeploymentSpec {
                runtime: RuntimeKind::Vllm,
                args: args.iter().map(|a| a.to_string()).collect(),
                ..d.spec.clone()
            },
            ..d.clone()
        };
        let mut two_small = node(1, 12);
        two_small.runtimes = vec![RuntimeKind::Vllm];
        two_small.free_per_gpu = vec![6, 6];
        let changes = plan(&[vllm(&[])], &[], std::slice::from_ref(&two_small), 0, 1);
        assert_eq!(
            changes[0].report.reason.as_deref(),
            Some("no node can take it: of 1 node, 1 without GPU with 10 bytes free each (vllm runs on GPU)")
        );
        let changes = plan(&[vllm(&["-tp", "4"])], &[], std::slice::from_ref(&two_small), 0, 1);
        assert_eq!(
            changes[0].report.reason.as_deref(),
            Some("no node can take it: of 1 node, 1 without 4 GPUs with 3 bytes free each (vllm runs on 4 GPUs)")
        );
        let changes = plan(&[vllm(&["-tp", "2"])], &[], &[two_small], 0, 1);
        assert_eq!(changes[0].node_id, Some(Uuid::from_u128(101)));
        // Memory placed but not started yet is reserved: a node with room for one takes one.
        let d2 = Deployment { id: Uuid::from_u128(2), created_at: 1, ..d.clone() };
        let changes = plan(&[d, d2], &[], &[node(1, 15)], 0, 1);
        assert_eq!(changes.iter().filter(|r| r.node_id.is_some()).count(), 1);
    }

    #[test]
    fn the_emptiest_node_gets_the_next_replica() {
        let a = deployment(1);
        let b = Deployment { id: Uuid::from_u128(2), created_at: 1, ..deployment(1) };
        let nodes = [node(1, 100), node(2, 20)];
        let mut replicas = Vec::new();
        let changes = plan(&[a.clone(), b.clone()], &replicas, &nodes, 0, 1);
        apply(&mut replicas, changes);
        let of = |id: Uuid| replicas.iter().find(|r| r.deployment_id == id).and_then(|r| r.node_id);
        assert_eq!(of(a.id), Some(nodes[0].id));
        assert_eq!(of(b.id), Some(nodes[1].id), "spread over nodes before filling one");
    }
}
