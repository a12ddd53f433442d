//! The node state machine of SPEC §2.3 as pure functions: given the current status and an event, the next status.
//! Nothing here touches HTTP, SQL or the clock, so every row of the table is unit-tested directly.

use llm_router_protocol::NodeStatus;

use crate::model::health::{Condition, Conditions, Findings};

/// The status an approved node should have, by whether its runtime serves a model.
pub fn by_readiness(ready_models: &[String]) -> NodeStatus {
    if ready_models.is_empty() { NodeStatus::Registering } else { NodeStatus::Online }
}

/// The status of an approved, heartbeating node: `degraded` while it has a condition (SPEC §10), otherwise by
/// whether its runtime serves a model.
pub fn by_health(ready_models: &[String], conditions: Conditions) -> NodeStatus {
    if conditions.is_empty() { by_readiness(ready_models) } else { NodeStatus::Degraded }
}

/// Status after a heartbeat. A pending node stays pending: only an administrator approves.
pub fn after_heartbeat(current: NodeStatus, ready_models: &[String], conditions: Conditions) -> NodeStatus {
    match current {
        NodeStatus::Pending => NodeStatus::Pending,
        NodeStatus::Registering | NodeStatus::Online | NodeStatus::Degraded | NodeStatus::Offline => {
            by_health(ready_models, conditions)
        }
    }
}

/// Status after an administrator's approval, or `None` when the node is not pending.
pub fn after_approval(current: NodeStatus, ready_models: &[String], conditions: Conditions) -> Option<NodeStatus> {
    (current == NodeStatus::Pending).then(|| by_health(ready_models, conditions))
}

/// Whether a node of this status is live: approved and heard from, so silence makes it offline.
pub fn is_live(current: NodeStatus) -> bool {
    matches!(current, NodeStatus::Registering | NodeStatus::Online | NodeStatus::Degraded)
}

/// Whether silence of `silent_ms` makes a node of this status offline.
pub fn goes_offline(current: NodeStatus, silent_ms: i64, offline_after_ms: i64) -> bool {
    is_live(current) && silent_ms >= offline_after_ms
}

/// Why a heartbeat moves a node from `from`, with the conditions it had (`had`), to `to` (SPEC §10): entering
/// `degraded` names the conditions found and on which GPUs; leaving it names the conditions that cleared.
pub fn heartbeat_reason(from: NodeStatus, had: Conditions, to: NodeStatus, findings: &Findings) -> String {
    let names = |conditions: Conditions| conditions.iter().map(Condition::as_str).collect::<Vec<_>>().join(", ");
    let readiness =
        if to == NodeStatus::Online { "heartbeat reports ready models" } else { "heartbeat reports no ready model" };
    match to {
        NodeStatus::Degraded => format!("{}: {}", names(findings.conditions), findings.detail),
        _ if from == NodeStatus::Degraded && !had.is_empty() => format!("{} cleared; {readiness}", names(had)),
        _ if from == NodeStatus::Degraded => format!("GPU conditions cleared; {readiness}"),
        _ => readiness.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeStatus::*;

    fn models(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    fn healthy() -> Conditions {
        Conditions::default()
    }

    fn faulty() -> Conditions {
        Conditions::decode("gpu_fault")
    }

    #[test]
    fn heartbeat_rows_of_the_table() {
        assert_eq!(after_heartbeat(Pending, &models(1), healthy()), Pending);
        assert_eq!(after_heartbeat(Pending, &models(0), healthy()), Pending);
        assert_eq!(after_heartbeat(Registering, &models(1), healthy()), Online);
        assert_eq!(after_heartbeat(Registering, &models(0), healthy()), Registering);
        assert_eq!(after_heartbeat(Online, &models(0), healthy()), Registering);
        assert_eq!(after_heartbeat(Online, &models(2), healthy()), Online);
        assert_eq!(after_heartbeat(Offline, &models(1), healthy()), Online);
        assert_eq!(after_heartbeat(Offline, &models(0), healthy()), Registering);
    }

    #[test]
    fn a_condition_makes_every_approved_node_degraded_until_it_clears() {
        for from in [Registering, Online, Degraded, Offline] {
            assert_eq!(after_heartbeat(from, &models(1), faulty()), Degraded, "from {from}");
            assert_eq!(after_heartbeat(from, &models(0), faulty()), Degraded, "from {from}");
        }
        assert_eq!(after_heartbeat(Pending, &models(1), faulty()), Pending, "only an administrator approves");
        assert_eq!(after_heartbeat(Degraded, &models(1), healthy()), Online);
        assert_eq!(after_heartbeat(Degraded, &models(0), healthy()), Registering);
    }

    #[test]
    fn approval_only_from_pending() {
        assert_eq!(after_approval(Pending, &models(1), healthy()), Some(Online));
        assert_eq!(after_approval(Pending, &models(0), healthy()), Some(Registering));
        assert_eq!(after_approval(Pending, &models(1), faulty()), Some(Degraded));
        for status in [Registering, Online, Degraded, Offline] {
            assert_eq!(after_approval(status, &models(1), healthy()), None);
        }
    }

    #[test]
    fn only_approved_live_nodes_go_offline() {
        assert!(goes_offline(Online, 30_000, 30_000));
        assert!(goes_offline(Registering, 31_000, 30_000));
        assert!(goes_offline(Degraded, 30_000, 30_000));
        assert!(!goes_offline(Online, 29_999, 30_000));
        assert!(!goes_offline(Pending, 99_000, 30_000));
        assert!(!goes_offline(Offline, 99_000, 30_000));
    }

    #[test]
    fn leaving_degraded_names_the_conditions_that_cleared() {
        let clean = Findings { conditions: healthy(), detail: String::new() };
        let had = Conditions::decode("gpu_fault,gpu_overheat");
        assert_eq!(
            heartbeat_reason(Degraded, had, Online, &clean),
            "gpu_fault, gpu_overheat cleared; heartbeat reports ready models"
        );
        assert_eq!(
            heartbeat_reason(Degraded, Conditions::decode("gpu_missing"), Registering, &clean),
            "gpu_missing cleared; heartbeat reports no ready model"
        );
        let found = Findings { conditions: faulty(), detail: "GPU 1: XID 79".to_owned() };
        assert_eq!(heartbeat_reason(Online, healthy(), Degraded, &found), "gpu_fault: GPU 1: XID 79");
        assert_eq!(heartbeat_reason(Registering, healthy(), Online, &clean), "heartbeat reports ready models");
    }
}
