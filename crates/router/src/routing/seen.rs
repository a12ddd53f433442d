//! The prefixes this router has routed lately (SPEC §13): a prefix seen for the first time is on no node's cache
//! yet, so its request goes to the less loaded of two nodes, as a request without a prefix does; from its second
//! request on, it goes to the node its key ranks first. Prompts that never repeat (fresh questions, one-off
//! documents) so spread as evenly as under `least-loaded`, while the prefixes that do repeat keep their node.
//!
//! A fixed table of keys, each with two places (from two parts of the key): a key is known when either place holds
//! it; a new key takes the first place, or the second when the first holds another key, or the first again when both
//! do. Lock-free, 512 KiB, no allocation per request; a prefix that does not come back within some 65,000 other new
//! prefixes is new again, and its next request goes to the less loaded of two once more.

use std::sync::atomic::{AtomicU64, Ordering};

/// Places in the table (a power of two).
const PLACES: usize = 1 << 16;

pub struct Seen {
    places: Box<[AtomicU64]>,
}

impl Default for Seen {
    fn default() -> Self {
        Seen { places: (0..PLACES).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Seen {
    /// Whether `key` was seen lately; remembers it either way.
    pub fn seen(&self, key: u64) -> bool {
        // Zero marks an empty place.
        let key = key.max(1);
        let first = &self.places[(key as usize) & (PLACES - 1)];
        let second = &self.places[((key >> 32) as usize) & (PLACES - 1)];
        let (a, b) = (first.load(Ordering::Relaxed), second.load(Ordering::Relaxed));
        if a == key || b == key {
            return true;
        }
        if a == 0 || b != 0 {
            first.store(key, Ordering::Relaxed);
        } else {
            second.store(key, Ordering::Relaxed);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_new_once_then_known() {
        let seen = Seen::default();
        assert!(!seen.seen(42));
        assert!(seen.seen(42));
        assert!(!seen.seen(0));
        assert!(seen.seen(0));
    }

    #[test]
    fn two_keys_that_share_a_place_are_both_kept() {
        let seen = Seen::default();
        // The same first place, different second places.
        let (a, b) = (7 | (1 << 32), 7 | (2 << 32));
        assert!(!seen.seen(a));
        assert!(!seen.seen(b));
        for _ in 0..3 {
            assert!(seen.seen(a) && seen.seen(b));
        }
    }

    #[test]
    fn thousands_of_repeating_prefixes_stay_known_among_many_fresh_ones() {
        let seen = Seen::default();
        let shared: Vec<u64> = (0..5_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        for &key in &shared {
            seen.seen(key);
        }
        let mut fresh = 0x1234_5678_u64;
        let mut lost = 0;
        for round in 0..4 {
            for &key in &shared {
                // A fresh prompt between every two shared ones.
                fresh = fresh.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                seen.seen(fresh);
                if !seen.seen(key) && round > 0 {
                    lost += 1;
                }
            }
        }
        // 20,000 fresh keys written over the table cost a few of the shared ones their place.
        assert!(lost < 450, "{lost} of 15,000 repeats were taken for new");
    }
}
