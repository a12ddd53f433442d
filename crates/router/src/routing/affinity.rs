//! Cache-aware choice (SPEC §13): affinity with bounded load.
//!
//! Each candidate's rank for a key is a hash of the key and the node's id (rendezvous hashing), so a key maps to the
//! same node on every router that sees the same candidates, and a node joining or leaving moves only the keys it
//! ranks first. The first-ranked node takes the request unless it already carries more than `load_factor` × the
//! mean load of the model's usable candidates, plus one: then the next-ranked node that does not takes it. The
//! "plus one" keeps an idle fleet's first requests on their own nodes, and makes the bound the same for a router
//! that sees all of a fleet's traffic as for each of several that see a share of it. A hot prefix so spreads over
//! its second, third… nodes as its load grows, in the same order on every router, and comes back as it falls.

use std::sync::Arc;

use super::Target;
use crate::clock::Millis;
pub use crate::config::{RoutingChoice as Choice, RoutingPolicy as Policy};

/// How a request's node was chosen, as `/metrics` counts it per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node its prefix or session ranks first.
    Affinity,
    /// Another node: the first-ranked one was over the load bound, ejected, at its limit, or tried already.
    Spilled,
    /// No prefix to follow (embeddings, no text): the least loaded of two.
    NoPrefix,
    /// The first request of its prefix through this router lately: no node holds it yet; the less loaded of two.
    NewPrefix,
    /// The policy is `least-loaded`.
    LeastLoaded,
    /// The one trial request of a node whose ejection ended.
    Trial,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Affinity => "affinity",
            Outcome::Spilled => "spilled",
            Outcome::NoPrefix => "no_prefix",
            Outcome::NewPrefix => "new_prefix",
            Outcome::LeastLoaded => "least_loaded",
            Outcome::Trial => "trial",
        }
    }
}

/// The node `key` ranks highest among the `usable` candidates with room that stay within the load bound, and
/// whether it is the one the key ranks first of `all` (a prefix whose node is cordoned, ejected, full or tried
/// already has spilled).
pub(super) fn choose(
    all: &[Arc<Target>],
    usable: impl Fn(&Target) -> bool,
    key: u64,
    load_factor: f64,
) -> Option<(&Arc<Target>, Outcome)> {
    let (count, total) = all
        .iter()
        .filter(|target| usable(target))
        .fold((0u64, 0u64), |(count, total), target| (count + 1, total + u64::from(target.load())));
    let bound = load_factor * total as f64 / count.max(1) as f64 + 1.0;
    let mut first: Option<(u64, &Arc<Target>)> = None;
    let mut within: Option<(u64, &Arc<Target>)> = None;
    for target in all {
        let rank = rank(key, target);
        if first.is_none_or(|(best, _)| rank > best) {
            first = Some((rank, target));
        }
        let fits = usable(target) && target.has_room() && f64::from(target.load()) <= bound;
        if fits && within.is_none_or(|(best, _)| rank > best) {
            within = Some((rank, target));
        }
    }
    let (_, first) = first?;
    // Those with room may all be over the bound when the others are full: then the least loaded of them.
    let chosen = within.map(|(_, target)| target).or_else(|| {
        all.iter().filter(|target| usable(target) && target.has_room()).min_by_key(|target| target.load())
    })?;
    let outcome = if Arc::ptr_eq(chosen, first) { Outcome::Affinity } else { Outcome::Spilled };
    Some((chosen, outcome))
}

/// A candidate's rank for a key: the same on every router.
fn rank(key: u64, target: &Target) -> u64 {
    mix(key ^ target.rank_seed)
}

/// SplitMix64's finaliser: every bit of the input moves every bit of the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a node is ranked by: its id, hashed once.
pub(super) fn rank_seed(id: uuid::Uuid) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id.as_bytes())
}

/// Whether a target can be ranked for a request now (not cordoned, not ejected, not tried).
pub(super) fn usable(target: &Target, tried: &[uuid::Uuid], now: Millis) -> bool {
    !target.is_cordoned() && !target.ejected_at(now) && !tried.contains(&target.node_id)
}
