use super::*;

fn node(id: u128, port: u16, status: NodeStatus, ready: &[&str]) -> Node {
    Node {
        id: Uuid::from_u128(id),
        machine_name: format!("gpu-{id}"),
        runtime_port: port,
        status,
        ready_models: ready.iter().map(|m| (*m).to_owned()).collect(),
        ..Node::example()
    }
}

#[test]
fn only_online_nodes_with_the_model_ready_are_candidates() {
    let routing = Routing::default();
    routing.update(&node(1, 8001, NodeStatus::Online, &["a", "b"]));
    routing.update(&node(2, 8002, NodeStatus::Registering, &["a"]));
    routing.update(&node(3, 8003, NodeStatus::Online, &["b"]));
    assert_eq!(routing.models(), vec!["a".to_owned(), "b".to_owned()]);
    for _ in 0..20 {
        assert_eq!(routing.pick("a", &[], 0).expect("a").target().node_id, Uuid::from_u128(1));
    }
    assert_eq!(routing.pick("c", &[], 0).err(), Some(NoNode::UnknownModel));
    assert_eq!(routing.pick("a", &[Uuid::from_u128(1)], 0).err(), Some(NoNode::Unavailable));
    // Offline: no longer a candidate; its figures stay.
    routing.update(&node(1, 8001, NodeStatus::Offline, &["a", "b"]));
    assert_eq!(routing.pick("a", &[], 0).err(), Some(NoNode::UnknownModel));
    assert!(routing.figures(Uuid::from_u128(1), 0).is_some());
    routing.remove(Uuid::from_u128(1));
    assert!(routing.figures(Uuid::from_u128(1), 0).is_none());
}

#[test]
fn the_least_loaded_of_two_takes_the_request_and_is_counted_until_dropped() {
    let routing = Routing::default();
    routing.update(&node(1, 8001, NodeStatus::Online, &["m"]));
    routing.update(&node(2, 8002, NodeStatus::Online, &["m"]));
    let busy: Vec<InFlight> = (0..3).map(|_| routing.pick("m", &[Uuid::from_u128(2)], 0).expect("pick")).collect();
    assert_eq!(routing.figures(Uuid::from_u128(1), 0).expect("figures").in_flight, 3);
    // With two candidates both are chosen; the less loaded one wins.
    for _ in 0..10 {
        let pick = routing.pick("m", &[], 0).expect("pick");
        assert_eq!(pick.target().node_id, Uuid::from_u128(2));
    }
    drop(busy);
    assert_eq!(routing.figures(Uuid::from_u128(1), 0).expect("figures").in_flight, 0);
    assert_eq!(routing.figures(Uuid::from_u128(1), 0).expect("figures").requests_total, 3);
}

#[test]
fn three_failures_eject_with_doubling_back_off_and_one_trial_restores() {
    let routing = Routing::default();
    routing.update(&node(1, 8001, NodeStatus::Online, &["m"]));
    let target = routing.pick("m", &[], 0).expect("pick").target().clone();
    assert!(!target.failed(0) && !target.failed(0));
    assert!(target.failed(1_000), "the third failure in a row ejects");
    assert_eq!(routing.figures(target.node_id, 1_000).expect("figures").ejected_until, Some(6_000));
    assert_eq!(routing.pick("m", &[], 5_999).err(), Some(NoNode::Unavailable));
    // After the period: one trial, and nobody else meanwhile.
    let trial = routing.pick("m", &[], 6_000).expect("the trial");
    assert_eq!(routing.pick("m", &[], 6_001).err(), Some(NoNode::Unavailable));
    assert!(trial.target().failed(6_500), "a failed trial ejects again at once");
    assert_eq!(routing.figures(target.node_id, 6_500).expect("figures").ejected_until, Some(16_500), "doubled");
    drop(trial);
    let trial = routing.pick("m", &[], 16_500).expect("the next trial");
    trial.target().succeeded();
    assert!(routing.pick("m", &[], 16_501).is_ok(), "a successful trial restores the node");
    assert_eq!(routing.figures(target.node_id, 16_501).expect("figures").ejected_until, None);
}

#[test]
fn a_model_change_moves_the_node_between_lists() {
    let routing = Routing::default();
    routing.update(&node(1, 8001, NodeStatus::Online, &["old"]));
    routing.update(&node(1, 8001, NodeStatus::Online, &["new"]));
    assert_eq!(routing.models(), vec!["new".to_owned()]);
    assert_eq!(routing.pick("old", &[], 0).err(), Some(NoNode::UnknownModel));
    assert!(routing.pick("new", &[], 0).is_ok());
}

#[test]
fn a_node_at_its_limit_takes_no_more_and_a_request_ending_wakes_one_queued_for_its_model() {
    let routing = Routing::default();
    let mut limited = node(1, 8001, NodeStatus::Online, &["m"]);
    limited.max_concurrency = Some(2);
    routing.update(&limited);
    let first = routing.pick("m", &[], 0).expect("first");
    let _second = routing.pick("m", &[], 0).expect("second");
    assert_eq!(routing.pick("m", &[], 0).err(), Some(NoNode::AtCapacity), "at its limit: wait, not fail");
    assert_eq!(routing.figures(Uuid::from_u128(1), 0).expect("figures").in_flight, 2);

    // A queued request is woken when one ends, and then finds room.
    let queue = routing.queue();
    let tenant = crate::model::tenant::Tenant::anonymous();
    let ticket = queue.join("m", &tenant, 1).expect("a place");
    assert!(queue.join("m", &tenant, 1).is_none(), "the queue holds at most `max`");
    drop(first);
    let woken = futures_util::FutureExt::now_or_never(ticket.woken()).is_some();
    assert!(woken, "the request that ended woke the queued one");
    assert!(ticket.is_first());
    assert!(routing.pick("m", &[], 0).is_ok());
    ticket.served();
    assert!(queue.is_empty());

    // Raising the limit gives room at once; no limit at all: never at capacity.
    limited.max_concurrency = None;
    routing.update(&limited);
    let many: Vec<InFlight> = (0..50).map(|_| routing.pick("m", &[], 0).expect("no limit")).collect();
    assert_eq!(many.len(), 50);
}

#[test]
fn at_capacity_only_when_a_usable_node_is_full_otherwise_unavailable() {
    let routing = Routing::default();
    let mut limited = node(1, 8001, NodeStatus::Online, &["m"]);
    limited.max_concurrency = Some(1);
    routing.update(&limited);
    routing.update(&node(2, 8002, NodeStatus::Online, &["m"]));
    let held = routing.pick("m", &[Uuid::from_u128(2)], 0).expect("node 1");
    // Node 2 has room: it takes every request while node 1 is full.
    for _ in 0..10 {
        assert_eq!(routing.pick("m", &[], 0).expect("pick").target().node_id, Uuid::from_u128(2));
    }
    assert_eq!(routing.pick("m", &[Uuid::from_u128(2)], 0).err(), Some(NoNode::AtCapacity));
    // An ejected node is not capacity to wait for.
    let target = held.target().clone();
    for _ in 0..3 {
        target.failed(0);
    }
    assert_eq!(routing.pick("m", &[Uuid::from_u128(2)], 1).err(), Some(NoNode::Unavailable));
}

/// A routing table with nodes 1..=n serving `m`, under the cache-aware policy.
fn fleet(n: u128, order: impl Iterator<Item = u128>) -> Routing {
    let routing = Routing::default();
    routing.set_choice(Choice::default());
    for id in order.take(n as usize) {
        routing.update(&node(id, 8000 + id as u16, NodeStatus::Online, &["m"]));
    }
    routing
}

fn node_for(routing: &Routing, key: u64) -> (Uuid, Outcome) {
    let (flight, outcome) = routing.pick_keyed("m", &[], 0, Affinity::Key(key)).expect("pick");
    (flight.target().node_id, outcome)
}

#[test]
fn a_key_keeps_its_node_and_keys_spread_evenly() {
    let routing = fleet(6, 1..=6);
    let mut per_node: HashMap<Uuid, u32> = HashMap::new();
    for key in 0..6_000u64 {
        let (first, outcome) = node_for(&routing, key);
        assert_eq!(outcome, Outcome::Affinity);
        assert_eq!(node_for(&routing, key).0, first, "the same key, the same node");
        *per_node.entry(first).or_default() += 1;
    }
    let (max, min) = (per_node.values().max().copied(), per_node.values().min().copied());
    assert_eq!(per_node.len(), 6);
    assert!(max.unwrap_or(0) as f64 <= 1.2 * min.unwrap_or(1) as f64, "{per_node:?}");
}

#[test]
fn routers_with_the_same_nodes_choose_alike_and_a_leaving_node_moves_only_its_keys() {
    let one = fleet(6, 1..=6);
    let other = fleet(6, (1..=6).rev());
    let before: Vec<Uuid> = (0..2_000u64).map(|key| node_for(&one, key).0).collect();
    for (key, node) in before.iter().enumerate() {
        assert_eq!(node_for(&other, key as u64).0, *node, "another router, the same choice");
    }
    one.remove(Uuid::from_u128(3));
    for (key, node) in before.iter().enumerate() {
        let now = node_for(&one, key as u64).0;
        if *node == Uuid::from_u128(3) {
            assert_ne!(now, *node);
        } else {
            assert_eq!(now, *node, "key {key} was not on the node that left");
        }
    }
}

#[test]
fn a_hot_key_spills_to_its_next_node_over_the_load_bound_and_comes_back() {
    let routing = fleet(3, 1..=3);
    let key = 42;
    let (first, _) = node_for(&routing, key);
    let held = [(); 2].map(|()| routing.pick_keyed("m", &[], 0, Affinity::Key(key)).expect("pick"));
    assert!(held.iter().all(|(flight, outcome)| flight.target().node_id == first && *outcome == Outcome::Affinity));
    // Two in flight on the first node of three: over 1.25 × 2 / 3 + 1.
    let (second, outcome) =
        routing.pick_keyed("m", &[], 0, Affinity::Key(key)).map(|(f, o)| (f.target().node_id, o)).expect("pick");
    assert_eq!(outcome, Outcome::Spilled);
    assert_ne!(second, first);
    let other = fleet(3, (1..=3).rev());
    let _busy = [(); 2].map(|()| other.pick_keyed("m", &[], 0, Affinity::Key(key)).expect("pick"));
    assert_eq!(node_for(&other, key).0, second, "the spill goes to the same next node on every router");
    drop(held);
    assert_eq!(node_for(&routing, key), (first, Outcome::Affinity), "and comes back as the load falls");
}

#[test]
fn a_full_or_tried_first_node_spills_and_least_loaded_ignores_keys() {
    let routing = fleet(2, 1..=2);
    let (first, _) = node_for(&routing, 7);
    let (other, outcome) =
        routing.pick_keyed("m", &[first], 0, Affinity::Key(7)).map(|(f, o)| (f.target().node_id, o)).expect("pick");
    assert_ne!(other, first);
    assert_eq!(outcome, Outcome::Spilled);
    let least = Routing::default();
    least.set_choice(Choice { policy: Policy::LeastLoaded, ..Choice::default() });
    least.update(&node(1, 8001, NodeStatus::Online, &["m"]));
    assert_eq!(least.pick_keyed("m", &[], 0, Affinity::Key(7)).expect("pick").1, Outcome::LeastLoaded);
    assert_eq!(routing.pick_keyed("m", &[], 0, Affinity::None).expect("pick").1, Outcome::NoPrefix);
}

#[test]
fn idle_nodes_share_sequential_traffic_under_least_loaded() {
    let routing = Routing::default();
    routing.set_choice(Choice { policy: Policy::LeastLoaded, ..Choice::default() });
    for id in 1..=2 {
        routing.update(&node(id, 8000 + id as u16, NodeStatus::Online, &["m"]));
    }
    let mut first = 0;
    for _ in 0..400 {
        // Each request ends before the next: the two nodes are always equally loaded.
        if routing.pick("m", &[], 0).expect("pick").target().node_id == Uuid::from_u128(1) {
            first += 1;
        }
    }
    assert!((120..=280).contains(&first), "a tie goes either way: {first} of 400 to the first node");
}
