//! Fleet-level events (SPEC §10): what happened to the fleet as a whole rather than to one node.

use crate::clock::Millis;

/// The kind of a mass silence: more than half of the live nodes (and at least [`MASS_SILENCE_MIN_NODES`]) went
/// offline together.
pub const MASS_SILENCE: &str = "mass_silence";

/// The fewest nodes going offline together that make a mass silence.
pub const MASS_SILENCE_MIN_NODES: usize = 10;

/// A fleet event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetEvent {
    pub id: i64,
    pub at: Millis,
    /// [`MASS_SILENCE`] today.
    pub kind: String,
    /// For people, e.g. "mass silence: 15 of 20 nodes".
    pub message: String,
    /// Nodes the event is about (those that went offline), and the live nodes before it.
    pub nodes_affected: u64,
    pub nodes_live: u64,
    /// When it ended: the nodes came back or an administrator dismissed it.
    pub resolved_at: Option<Millis>,
    /// The administrator who dismissed it; `None` when the nodes came back (or while it lasts).
    pub resolved_by: Option<String>,
    /// `nodes returned` or `dismissed`.
    pub resolution: Option<String>,
}

/// Whether `silent` of `live` nodes going offline together is a mass silence: more than half, and at least
/// [`MASS_SILENCE_MIN_NODES`].
pub fn is_mass_silence(silent: usize, live: usize) -> bool {
    silent >= MASS_SILENCE_MIN_NODES && silent * 2 > live
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_than_half_and_at_least_ten() {
        assert!(is_mass_silence(15, 20));
        assert!(is_mass_silence(10, 19));
        assert!(!is_mass_silence(10, 20), "exactly half is not more than half");
        assert!(!is_mass_silence(9, 9), "fewer than ten");
        assert!(!is_mass_silence(0, 0));
    }
}
