//! The anonymous registration rate limit (SPEC §9): a token bucket per client address, on the router's clock.
//!
//! Each address may register `rate` times a minute, in bursts of up to twice that: its bucket holds `2 × rate`
//! tokens, refills at `rate` a minute, and each registration takes one. A bucket that has refilled completely is
//! the same as no bucket, so it may be dropped at any time; that is how the table stays bounded. When it is full,
//! full buckets go first, then the eighth of the table closest to full (those addresses merely get their burst
//! back early). IPv6 addresses share a bucket per /64 ([`crate::net::limit_key`]).
//!
//! Beside it, [`bodies`]: the memory budget of request bodies.

pub mod bodies;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::clock::Millis;
use crate::net::limit_key;

/// Addresses tracked at most.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A registration refused by the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// Seconds until the address has a token again.
    pub retry_after_secs: u64,
}

/// Token buckets of the addresses that registered recently.
pub struct RegistrationLimiter {
    /// Registrations a minute; 0 turns the limit off.
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    capacity: usize,
}

/// One token, in the units buckets are kept in: a bucket refills `per_minute` units a millisecond, so every
/// figure stays an exact integer.
const TOKEN: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens × [`TOKEN`].
    level: u64,
    at: Millis,
}

impl RegistrationLimiter {
    /// A limiter of `per_minute` registrations a minute and address (0: no limit), tracking at most `capacity`
    /// addresses.
    pub fn new(per_minute: u32, capacity: usize) -> Self {
        RegistrationLimiter { per_minute, buckets: Mutex::new(HashMap::new()), capacity: capacity.max(1) }
    }

    fn burst(&self) -> u64 {
        2 * u64::from(self.per_minute) * TOKEN
    }

    /// The level of `bucket` at `now`.
    fn refilled(&self, bucket: Bucket, now: Millis) -> u64 {
        let elapsed = u64::try_from(now - bucket.at).unwrap_or(0);
        bucket.level.saturating_add(elapsed.saturating_mul(u64::from(self.per_minute))).min(self.burst())
    }

    /// Takes a token of `addr`'s bucket, or says how long until there is one.
    pub fn check(&self, addr: IpAddr, now: Millis) -> Result<(), RateLimited> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let key = limit_key(addr);
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(&key) && buckets.len() >= self.capacity {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket { level: self.burst(), at: now });
        let level = self.refilled(*bucket, now);
        if level < TOKEN {
            let wait_ms = (TOKEN - level).div_ceil(u64::from(self.per_minute));
            return Err(RateLimited { retry_after_secs: wait_ms.div_ceil(1000).max(1) });
        }
        *bucket = Bucket { level: level - TOKEN, at: now };
        Ok(())
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Millis) {
        let burst = self.burst();
        make_room(
            buckets,
            self.capacity,
            |bucket| self.refilled(*bucket, now) >= burst,
            |bucket| Reverse(self.refilled(*bucket, now)),
        );
    }
}

/// Frees at least one place in a bounded table of per-client state: drops the entries `forgotten` says are as good
/// as absent, then, while the table is still at `capacity`, the eighth of it that `rank` puts first (the entries
/// closest to being forgotten).
pub(crate) fn make_room<K, V, R>(
    table: &mut HashMap<K, V>,
    capacity: usize,
    forgotten: impl Fn(&V) -> bool,
    rank: impl Fn(&V) -> R,
) where
    K: Copy + Eq + Hash,
    R: Ord,
{
    table.retain(|_, value| !forgotten(value));
    if table.len() < capacity {
        return;
    }
    let mut ranked: Vec<(R, K)> = table.iter().map(|(key, value)| (rank(value), *key)).collect();
    let evict = (capacity / 8).max(1).min(ranked.len());
    ranked.select_nth_unstable_by(evict - 1, |a, b| a.0.cmp(&b.0));
    for (_, key) in &ranked[..evict] {
        table.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_767_225_600_000;

    fn addr(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_burst_of_twice_the_rate_then_one_per_period() {
        let limiter = RegistrationLimiter::new(10, DEFAULT_CAPACITY);
        for i in 0..20 {
            assert_eq!(limiter.check(addr("198.51.100.7"), T0), Ok(()), "registration {i} of the burst");
        }
        // Ten a minute: the next token comes in 6 s.
        assert_eq!(limiter.check(addr("198.51.100.7"), T0), Err(RateLimited { retry_after_secs: 6 }));
        assert_eq!(limiter.check(addr("198.51.100.7"), T0 + 5_000), Err(RateLimited { retry_after_secs: 1 }));
        assert_eq!(limiter.check(addr("198.51.100.7"), T0 + 6_000), Ok(()));
        assert!(limiter.check(addr("198.51.100.7"), T0 + 6_000).is_err());
        assert_eq!(limiter.check(addr("198.51.100.8"), T0), Ok(()), "another address has its own bucket");
    }

    #[test]
    fn an_idle_bucket_refills_to_the_burst_and_no_further() {
        let limiter = RegistrationLimiter::new(1, DEFAULT_CAPACITY);
        assert!(limiter.check(addr("198.51.100.7"), T0).is_ok());
        assert!(limiter.check(addr("198.51.100.7"), T0).is_ok());
        assert_eq!(limiter.check(addr("198.51.100.7"), T0), Err(RateLimited { retry_after_secs: 60 }));
        let later = T0 + 24 * 3_600_000;
        assert!(limiter.check(addr("198.51.100.7"), later).is_ok());
        assert!(limiter.check(addr("198.51.100.7"), later).is_ok());
        assert!(limiter.check(addr("198.51.100.7"), later).is_err());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter = RegistrationLimiter::new(0, DEFAULT_CAPACITY);
        for _ in 0..10_000 {
            assert!(limiter.check(addr("198.51.100.7"), T0).is_ok());
        }
        assert!(limiter.is_empty());
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_busiest_addresses() {
        let limiter = RegistrationLimiter::new(1, 64);
        for _ in 0..2 {
            limiter.check(addr("198.51.100.7"), T0).expect("burst");
        }
        for i in 0..10_000u32 {
            let spoofed = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limiter.check(spoofed, T0).is_ok());
        }
        assert!(limiter.len() <= 64, "{}", limiter.len());
        assert!(limiter.check(addr("198.51.100.7"), T0).is_err(), "an empty bucket is never the one dropped");
    }

    #[test]
    fn ipv6_addresses_share_a_bucket_per_slash_64() {
        let limiter = RegistrationLimiter::new(1, DEFAULT_CAPACITY);
        assert!(limiter.check(addr("2001:db8:1:2::1"), T0).is_ok());
        assert!(limiter.check(addr("2001:db8:1:2::2"), T0).is_ok());
        assert!(limiter.check(addr("2001:db8:1:2:ffff::3"), T0).is_err());
        assert!(limiter.check(addr("2001:db8:1:3::1"), T0).is_ok());
    }
}
