//! Deployments (SPEC §15): the replicas the router assigns to this node, run by the agent itself
//! (`--manage-runtimes`).
//!
//! Each heartbeat's answer carries the node's whole desired state; [`Deployments::reconcile`] compares it with what
//! runs ([`plan`], a pure function) and starts a task per new replica ([`supervise`]: model from [`fetch`], command
//! from [`launch`]) and stops what is no longer wanted. A replica of an older revision of a listed deployment keeps
//! serving until a replica of the listed revision is ready: a change rolls. Ready replicas are reached through the
//! agent's forwarding port ([`forward`]) and their models reported in `ready_models`.

pub mod fetch;
pub mod forward;
pub mod gpus;
pub mod launch;
pub mod supervise;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use llm_router_protocol::{Assignment, ReplicaReport, ReplicaState};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use supervise::{Context, Hooks, Status};

/// A replica: one revision of one deployment.
pub type Key = (Uuid, i64);

/// What to change so that what runs matches the assignments.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub start: Vec<Assignment>,
    pub stop: Vec<Key>,
}

/// Compare the replicas that run (each with whether it is ready) with the assignments:
/// - an assignment no replica runs is started;
/// - a replica whose deployment is not assigned at all is stopped;
/// - a replica of another revision of an assigned deployment is stopped once a replica of an assigned revision of
///   that deployment is ready, or at once when it is not ready itself (it serves nothing worth waiting for).
pub fn plan(running: &[(Key, bool)], assignments: &[Assignment]) -> Plan {
    let assigned: HashSet<Key> = assignments.iter().map(|a| (a.deployment_id, a.revision)).collect();
    let deployments: HashSet<Uuid> = assignments.iter().map(|a| a.deployment_id).collect();
    let mut seen = HashSet::new();
    let start = assignments
        .iter()
        .filter(|a| {
            let key = (a.deployment_id, a.revision);
            seen.insert(key) && !running.iter().any(|(k, _)| *k == key)
        })
        .cloned()
        .collect();
    let stop = running
        .iter()
        .filter(|(key, ready)| {
            if assigned.contains(key) {
                return false;
            }
            if !deployments.contains(&key.0) || !ready {
                return true;
            }
            running.iter().any(|(other, other_ready)| other.0 == key.0 && *other_ready && assigned.contains(other))
        })
        .map(|(key, _)| *key)
        .collect();
    Plan { start, stop }
}

struct Replica {
    assignment: Assignment,
    status: Arc<Mutex<Status>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// The last assignments the router sent.
    assignments: Vec<Assignment>,
    replicas: BTreeMap<Key, Replica>,
    /// Tasks of replicas being stopped, awaited at shutdown.
    stopping: Vec<JoinHandle<()>>,
    shut_down: bool,
}

impl State {
    /// Tell replica `key`'s task to stop; its end is awaited at shutdown.
    fn stop(&mut self, key: Key, why: &str) {
        if let Some(replica) = self.replicas.remove(&key) {
            tracing::info!(deployment = %key.0, revision = key.1, model = %replica.assignment.model, "stopping replica: {why}");
            let _ = replica.stop.send(true);
            self.stopping.push(replica.task);
        }
    }
}

struct Shared {
    ctx: Arc<Context>,
    state: Mutex<State>,
    /// A replica changed state: the agent heartbeats early.
    changed: Notify,
}

/// The replicas this agent runs; cheap to clone.
#[derive(Clone)]
pub struct Deployments {
    shared: Arc<Shared>,
}

impl Deployments {
    pub fn new(ctx: Context) -> Self {
        Deployments { shared: Arc::new(Shared { ctx: Arc::new(ctx), state: Mutex::default(), changed: Notify::new() }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make what runs match `assignments`, the node's whole desired state.
    pub fn reconcile(&self, assignments: Vec<Assignment>) {
        let mut state = self.state();
        if state.assignments != assignments {
            tracing::info!(
                assignments = %assignments.iter().map(|a| format!("{} r{} ({})", a.model, a.revision, a.deployment_id)).collect::<Vec<_>>().join(", "),
                "assignments changed"
            );
        }
        state.assignments = assignments;
        drop(state);
        self.apply();
    }

    /// Start and stop replicas by [`plan`].
    fn apply(&self) {
        let mut state = self.state();
        if state.shut_down {
            return;
        }
        let running: Vec<(Key, bool)> = state
            .replicas
            .iter()
            .map(|(key, r)| (*key, r.status.lock().unwrap_or_else(|e| e.into_inner()).state == ReplicaState::Ready))
            .collect();
        let Plan { start, stop } = plan(&running, &state.assignments);
        for key in stop {
            state.stop(key, "no longer assigned, or a newer revision serves");
        }
        state.stopping.retain(|task| !task.is_finished());
        for assignment in start {
            let key = (assignment.deployment_id, assignment.revision);
            let status = Arc::new(Mutex::new(Status::new()));
            let (stop, stopped) = watch::channel(false);
            let weak: Weak<Shared> = Arc::downgrade(&self.shared);
            let changed = Arc::new(move |now: ReplicaState| {
                if let Some(shared) = weak.upgrade() {
                    shared.changed.notify_one();
                    if now == ReplicaState::Ready {
                        // A new revision ready may retire an old one.
                        Deployments { shared }.apply();
                    }
                }
            });
            let weak: Weak<Shared> = Arc::downgrade(&self.shared);
            let retire_older = Arc::new(move || {
                if let Some(shared) = weak.upgrade() {
                    Deployments { shared }.retire_older(key);
                }
            });
            let task = tokio::spawn(supervise::run(
                self.shared.ctx.clone(),
                assignment.clone(),
                status.clone(),
                stopped,
                Hooks { changed, retire_older },
            ));
            state.replicas.insert(key, Replica { assignment, status, stop, task });
        }
    }

    /// The agent's latest sample of the node's GPUs, for the replicas that ask for GPU memory.
    pub fn gpus_sampled(&self, sample: &[crate::gpu::GpuSample]) {
        self.shared.ctx.gpus.sampled(sample);
    }

    /// Stop the replicas of other revisions of `key`'s deployment that are no longer assigned, ready or not: the
    /// replica `key` has no room on the GPUs while they run.
    fn retire_older(&self, key: Key) {
        let mut state = self.state();
        let assigned: HashSet<Key> = state.assignments.iter().map(|a| (a.deployment_id, a.revision)).collect();
        let older: Vec<Key> =
            state.replicas.keys().filter(|k| k.0 == key.0 && k.1 != key.1 && !assigned.contains(k)).copied().collect();
        for old in older {
            state.stop(old, "the new revision needs its GPUs");
        }
        drop(state);
        self.shared.changed.notify_one();
    }

    /// Every replica's state, for the heartbeat.
    pub fn reports(&self) -> Vec<ReplicaReport> {
        self.state()
            .replicas
            .values()
            .map(|r| r.status.lock().unwrap_or_else(|e| e.into_inner()).report(&r.assignment))
            .collect()
    }

    /// The models of the ready replicas, without repeats.
    pub fn ready_models(&self) -> Vec<String> {
        let mut models: Vec<String> = Vec::new();
        for replica in self.state().replicas.values() {
            let ready = replica.status.lock().unwrap_or_else(|e| e.into_inner()).state == ReplicaState::Ready;
            if ready && !models.contains(&replica.assignment.model) {
                models.push(replica.assignment.model.clone());
            }
        }
        models
    }

    /// The local ports of the ready replicas, for their load.
    pub fn ready_ports(&self) -> Vec<u16> {
        self.state()
            .replicas
            .values()
            .filter_map(|r| {
                let status = r.status.lock().unwrap_or_else(|e| e.into_inner());
                (status.state == ReplicaState::Ready).then_some(status.port).flatten()
            })
            .collect()
    }

    /// The local port of the ready replica serving `model`, the newest revision's when several do.
    pub fn port_for(&self, model: &str) -> Option<u16> {
        self.state().replicas.values().rev().filter(|r| r.assignment.model == model).find_map(|r| {
            let status = r.status.lock().unwrap_or_else(|e| e.into_inner());
            (status.state == ReplicaState::Ready).then_some(status.port).flatten()
        })
    }

    /// Completes when a replica changed state since the last call.
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// Stop every replica (SIGTERM, then SIGKILL after the grace period) and wait until they are gone; later
    /// assignments are ignored.
    pub async fn shutdown(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut state = self.state();
            state.shut_down = true;
            let replicas = std::mem::take(&mut state.replicas);
            let mut tasks = std::mem::take(&mut state.stopping);
            for replica in replicas.into_values() {
                let _ = replica.stop.send(true);
                tasks.push(replica.task);
            }
            tasks
        };
        if !tasks.is_empty() {
            tracing::info!(replicas = tasks.len(), "stopping the runtimes");
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl forward::Routes for Deployments {
    fn port_for(&self, model: &str) -> Option<u16> {
        Deployments::port_for(self, model)
    }

    fn models(&self) -> Vec<String> {
        self.ready_models()
    }
}

#[cfg(test)]
mod tests;
