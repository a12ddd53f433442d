//! Sign-in throttling per (username, client address) (SPEC §9).
//!
//! After [`MAX_FAILURES`] wrong passwords within [`WINDOW_MS`], the pair is locked for [`FIRST_LOCK_MS`]; each
//! further failure after a lock locks it again for twice as long, up to [`MAX_LOCK_MS`]. A success forgets the
//! pair; so do 15 quiet minutes after its last failure or lock. Unknown usernames are counted exactly like known
//! ones, so the answers do not tell which names exist. A locked attempt is refused before the password is hashed:
//! it costs a map lookup, not 19 MiB of Argon2.
//!
//! Attempts still being checked count too: while the failures already recorded plus those in flight could reach
//! the limit, a further attempt waits for them to finish, so a burst of parallel guesses gets no more tries than
//! the same guesses one after another.
//!
//! The table holds at most a fixed number of pairs. When it is full, expired pairs go first, then those closest
//! to expiring; an attacker who cycles usernames or addresses therefore cannot grow it, only push out pairs of its
//! own age, each of which costs it a password hash to create.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use crate::clock::Millis;
use crate::net::limit_key;
use crate::rate_limit;

/// Failures within [`WINDOW_MS`] that lock a (username, address) pair.
pub const MAX_FAILURES: usize = 5;
/// The window failures are counted in, and how long a pair is remembered after its last failure or lock.
pub const WINDOW_MS: i64 = 15 * 60 * 1000;
/// The first lock.
pub const FIRST_LOCK_MS: i64 = 60 * 1000;
/// The longest lock.
pub const MAX_LOCK_MS: i64 = 15 * 60 * 1000;
/// Pairs remembered at most.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A sign-in refused without checking the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Seconds until an attempt is accepted again.
    pub retry_after_secs: u64,
}

/// The throttling state of every recently failing (username, address) pair.
pub struct LoginThrottle {
    table: Mutex<HashMap<Key, Entry>>,
    /// Keys usernames by a keyed hash: a pair then costs the same memory whatever the name's length.
    names: RandomState,
    capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    user: u64,
    addr: IpAddr,
}

#[derive(Debug, Default)]
struct Entry {
    /// Times of the latest failures, oldest first; `count` of them are real.
    recent: [Millis; MAX_FAILURES],
    count: usize,
    /// Locks since the pair was last forgotten; each next one is twice as long.
    locks: u32,
    locked_until: Millis,
    /// Attempts admitted and not yet settled.
    in_flight: u32,
}

impl Entry {
    fn last_failure(&self) -> Option<Millis> {
        self.count.checked_sub(1).map(|i| self.recent[i])
    }

    /// When the pair is forgotten, if nothing happens meanwhile.
    fn expires_at(&self) -> Millis {
        self.last_failure().unwrap_or(Millis::MIN).max(self.locked_until).saturating_add(WINDOW_MS)
    }

    fn expired(&self, now: Millis) -> bool {
        self.in_flight == 0 && now >= self.expires_at()
    }

    /// Failures recorded within the window before `now`.
    fn failures_in_window(&self, now: Millis) -> usize {
        self.recent[..self.count].iter().filter(|at| now - **at < WINDOW_MS).count()
    }

    fn record_failure(&mut self, now: Millis) {
        if self.count == MAX_FAILURES {
            self.recent.rotate_left(1);
            self.count -= 1;
        }
        self.recent[self.count] = now;
        self.count += 1;
        let due = self.locks > 0 || self.failures_in_window(now) >= MAX_FAILURES;
        if due {
            let lock = FIRST_LOCK_MS.saturating_mul(1 << self.locks.min(16)).min(MAX_LOCK_MS);
            self.locks = self.locks.saturating_add(1);
            self.locked_until = now + lock;
        }
    }
}

/// An admitted sign-in attempt; settle it with [`Attempt::failed`] or [`Attempt::succeeded`]. Dropped unsettled
/// (the password was never checked, e.g. the hashing pool was full), it counts as nothing.
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    key: Key,
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown).
    pub fn failed(self, now: Millis) {
        let mut table = self.throttle.lock();
        if let Some(entry) = table.get_mut(&self.key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.record_failure(now);
        }
        drop(table);
        std::mem::forget(self);
    }

    /// The password was right: the pair starts afresh.
    pub fn succeeded(self) {
        self.throttle.lock().remove(&self.key);
        std::mem::forget(self);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut table = self.throttle.lock();
        if let Some(entry) = table.get_mut(&self.key) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if entry.in_flight == 0 && entry.count == 0 {
                table.remove(&self.key);
            }
        }
    }
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::new(DEFAULT_CAPACITY)
    }
}

impl LoginThrottle {
    /// A throttle remembering at most `capacity` pairs.
    pub fn new(capacity: usize) -> Self {
        LoginThrottle { table: Mutex::new(HashMap::new()), names: RandomState::new(), capacity: capacity.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // The table holds plain counters; after a panic elsewhere they are still usable.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pairs remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Admits a sign-in attempt of `username` from `addr`, or refuses it with the seconds to wait.
    pub fn begin(&self, username: &str, addr: IpAddr, now: Millis) -> Result<Attempt<'_>, Throttled> {
        let key = self.key(username, addr);
        let mut table = self.lock();
        let entry = self.entry(&mut table, key, now);
        if now < entry.locked_until {
            return Err(Throttled { retry_after_secs: secs_until(now, entry.locked_until) });
        }
        let room = if entry.locks > 0 { 1 } else { MAX_FAILURES - entry.failures_in_window(now) };
        if entry.in_flight as usize >= room {
            // The attempts being checked may use up what is left; this one waits for their outcome.
            return Err(Throttled { retry_after_secs: 1 });
        }
        entry.in_flight += 1;
        Ok(Attempt { throttle: self, key })
    }
}

impl LoginThrottle {
    fn key(&self, name: &str, addr: IpAddr) -> Key {
        Key { user: self.names.hash_one(name), addr: limit_key(addr) }
    }

    /// The entry of `key` as of `now`: a fresh one for a pair that expired or was never seen, making room first
    /// when the table is full.
    fn entry<'t>(&self, table: &'t mut HashMap<Key, Entry>, key: Key, now: Millis) -> &'t mut Entry {
        if table.get(&key).is_some_and(|entry| entry.expired(now)) {
            table.remove(&key);
        }
        if !table.contains_key(&key) && table.len() >= self.capacity {
            make_room(table, self.capacity, now);
        }
        table.entry(key).or_default()
    }

    /// Refuses `name` from `addr` while it is locked, without admitting an attempt: for failures that cost little to
    /// check (a join token is one lookup), where parallel tries need no holding back, only counting.
    pub fn check(&self, name: &str, addr: IpAddr, now: Millis) -> Result<(), Throttled> {
        match self.lock().get(&self.key(name, addr)) {
            Some(entry) if now < entry.locked_until => {
                Err(Throttled { retry_after_secs: secs_until(now, entry.locked_until) })
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure of `name` from `addr` (see [`LoginThrottle::check`]); returns the lock it started, if it
    /// started one.
    pub fn record_failure(&self, name: &str, addr: IpAddr, now: Millis) -> Option<Throttled> {
        let mut table = self.lock();
        let entry = self.entry(&mut table, self.key(name, addr), now);
        let before = entry.locked_until;
        entry.record_failure(now);
        (entry.locked_until > before).then(|| Throttled { retry_after_secs: secs_until(now, entry.locked_until) })
    }
}

/// Frees at least one place: expired pairs first, then the eighth of the table closest to expiring.
fn make_room(table: &mut HashMap<Key, Entry>, capacity: usize, now: Millis) {
    rate_limit::make_room(table, capacity, |entry| entry.expired(now), Entry::expires_at);
}

fn secs_until(now: Millis, then: Millis) -> u64 {
    u64::try_from((then - now + 999) / 1000).unwrap_or(0).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_767_225_600_000;

    fn addr(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn fail(throttle: &LoginThrottle, user: &str, from: &str, now: Millis) {
        throttle.begin(user, addr(from), now).expect("admitted").failed(now);
    }

    #[test]
    fn five_failures_lock_the_pair_and_locks_double_up_to_fifteen_minutes() {
        let throttle = LoginThrottle::default();
        for i in 0..5 {
            fail(&throttle, "alice", "198.51.100.7", T0 + i * 1000);
        }
        let now = T0 + 4000;
        assert_eq!(throttle.begin("alice", addr("198.51.100.7"), now).err(), Some(Throttled { retry_after_secs: 60 }));
        let mut now = now + FIRST_LOCK_MS;
        for expected in [120, 240, 480, 900, 900] {
            fail(&throttle, "alice", "198.51.100.7", now);
            let refused = throttle.begin("alice", addr("198.51.100.7"), now).err().expect("locked again");
            assert_eq!(refused.retry_after_secs, expected);
            now += i64::try_from(expected).expect("secs") * 1000;
        }
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_lock() {
        let throttle = LoginThrottle::default();
        for i in 0..10 {
            fail(&throttle, "alice", "198.51.100.7", T0 + i * 4 * 60 * 1000);
        }
        assert!(throttle.begin("alice", addr("198.51.100.7"), T0 + 40 * 60 * 1000).is_ok());
    }

    #[test]
    fn success_forgets_the_pair_and_other_pairs_are_untouched() {
        let throttle = LoginThrottle::default();
        for _ in 0..4 {
            fail(&throttle, "alice", "198.51.100.7", T0);
        }
        throttle.begin("alice", addr("198.51.100.7"), T0).expect("fifth try").succeeded();
        for _ in 0..4 {
            fail(&throttle, "alice", "198.51.100.7", T0);
        }
        assert!(throttle.begin("alice", addr("198.51.100.7"), T0).is_ok(), "the count started afresh");

        fail(&throttle, "bob", "198.51.100.7", T0);
        for _ in 0..4 {
            fail(&throttle, "bob", "198.51.100.7", T0);
        }
        assert!(throttle.begin("bob", addr("198.51.100.7"), T0).is_err());
        assert!(throttle.begin("bob", addr("198.51.100.8"), T0).is_ok(), "another address");
        assert!(throttle.begin("carol", addr("198.51.100.7"), T0).is_ok(), "another username");
    }

    #[test]
    fn parallel_attempts_get_no_more_tries_than_sequential_ones() {
        let throttle = LoginThrottle::default();
        let admitted: Vec<Attempt<'_>> =
            (0..MAX_FAILURES).map(|_| throttle.begin("alice", addr("198.51.100.7"), T0).expect("admitted")).collect();
        assert_eq!(throttle.begin("alice", addr("198.51.100.7"), T0).err(), Some(Throttled { retry_after_secs: 1 }));
        for attempt in admitted {
            attempt.failed(T0);
        }
        assert_eq!(throttle.begin("alice", addr("198.51.100.7"), T0).err(), Some(Throttled { retry_after_secs: 60 }));
    }

    #[test]
    fn an_unsettled_attempt_counts_as_nothing() {
        let throttle = LoginThrottle::default();
        for _ in 0..10 {
            drop(throttle.begin("alice", addr("198.51.100.7"), T0).expect("admitted"));
        }
        assert!(throttle.is_empty());
    }

    #[test]
    fn pairs_are_forgotten_fifteen_quiet_minutes_after_their_lock() {
        let throttle = LoginThrottle::default();
        for _ in 0..5 {
            fail(&throttle, "alice", "198.51.100.7", T0);
        }
        let lock_ends = T0 + FIRST_LOCK_MS;
        fail(&throttle, "alice", "198.51.100.7", lock_ends);
        // The second lock (2 min) ends; within 15 minutes of it a failure locks again, for 4 minutes.
        let second_ends = lock_ends + 2 * FIRST_LOCK_MS;
        assert!(throttle.begin("alice", addr("198.51.100.7"), second_ends + WINDOW_MS - 1).is_ok());
        // A quarter of an hour after it, the pair starts afresh: five more tries.
        let later = second_ends + WINDOW_MS;
        for _ in 0..4 {
            fail(&throttle, "alice", "198.51.100.7", later);
        }
        assert!(throttle.begin("alice", addr("198.51.100.7"), later).is_ok());
    }

    #[test]
    fn the_table_stays_bounded_when_usernames_or_addresses_cycle() {
        let throttle = LoginThrottle::new(64);
        for i in 0..10_000 {
            fail(&throttle, &format!("user-{i}"), "198.51.100.7", T0 + i);
            fail(&throttle, "alice", &format!("10.{}.{}.1", i / 256 % 256, i % 256), T0 + i);
        }
        assert!(throttle.len() <= 64, "{}", throttle.len());
        // The newest pairs are the ones kept.
        for _ in 0..4 {
            fail(&throttle, "user-9999", "198.51.100.7", T0 + 10_000);
        }
        assert!(throttle.begin("user-9999", addr("198.51.100.7"), T0 + 10_000).is_err());
    }

    #[test]
    fn ipv6_addresses_of_one_slash_64_share_a_pair() {
        let throttle = LoginThrottle::default();
        for i in 0..5 {
            fail(&throttle, "alice", &format!("2001:db8:1:2::{i:x}"), T0);
        }
        assert!(throttle.begin("alice", addr("2001:db8:1:2:ffff::1"), T0).is_err());
        assert!(throttle.begin("alice", addr("2001:db8:1:3::1"), T0).is_ok());
    }

    #[test]
    fn counted_failures_lock_without_holding_parallel_tries_back() {
        let throttle = LoginThrottle::default();
        let from = addr("198.51.100.7");
        // Parallel checks all pass while nothing is recorded.
        for _ in 0..10 {
            assert!(throttle.check("join-token", from, T0).is_ok());
        }
        for i in 0..4 {
            assert_eq!(throttle.record_failure("join-token", from, T0 + i), None);
        }
        assert_eq!(throttle.record_failure("join-token", from, T0 + 4), Some(Throttled { retry_after_secs: 60 }));
        assert_eq!(throttle.check("join-token", from, T0 + 5), Err(Throttled { retry_after_secs: 60 }));
        // Another name or address is not locked; the lock ends on time.
        assert!(throttle.check("join-token", addr("198.51.100.8"), T0 + 5).is_ok());
        assert!(throttle.check("alice", from, T0 + 5).is_ok());
        assert!(throttle.check("join-token", from, T0 + 4 + FIRST_LOCK_MS).is_ok());
    }
}
