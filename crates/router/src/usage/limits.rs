//! Limits per API key and per user (SPEC §14), held on the request path from memory.
//!
//! A request is admitted while its tenant's requests of this minute are under `requests_per_minute` and its tokens
//! of this minute, day and month are under their limits. Tokens count when an answer ends ([`Limiter::spend`]), so
//! a request is admitted while the budget is not yet spent, and the one that spends it may go over by its own size.
//!
//! Tokens: what this router counted itself since the last look at the storage, plus what the roll-ups held then
//! (every router's records, this one's included), looked at every [`REFRESH_INTERVAL`] after this router's own
//! records were written: so routers sharing a database share budgets, a second or so apart.
//!
//! Requests per minute, with a shared database: a router claims a principal's requests from the minute's row a few at
//! a time ([`SharedStorage::claim_requests`], which never grants past the limit between all routers) and admits
//! from its claim; the claim is small (1/50 of the limit, at least one) so requests claimed and not used at the end
//! of a minute are few. With SQLite, one router counts alone. While the database cannot be reached, a router counts
//! its own requests against the whole limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use crate::clock::{Clock, Millis};
use crate::model::tenant::Limits;
use crate::model::usage::Step;
use crate::store::Store;

/// How often the tokens spent are read back from the roll-ups.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// A tenant's limits and weight as set on its key or user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub limits: Limits,
    pub weight: u32,
}

/// The limits of every tenant that has some, and what each has used.
pub struct Limiter {
    clock: Arc<dyn Clock>,
    store: Store,
    tenants: RwLock<HashMap<Arc<str>, Arc<TenantLimits>>>,
}

struct TenantLimits {
    policy: Mutex<Policy>,
    used: Mutex<Used>,
}

/// What a tenant has used, as this router knows it.
#[derive(Debug, Default)]
struct Used {
    /// The minute the per-minute counts are of.
    minute: Millis,
    /// Requests admitted this minute (by this router).
    requests: u64,
    /// Requests claimed from the shared count and not yet admitted.
    claimed: u64,
    /// Tokens counted here since the last look at the storage: this minute, day, month; and the periods they are
    /// of.
    local: [u64; 3],
    local_periods: [Millis; 3],
    /// Tokens the storage held at the last look, and the minute, day and month they are of.
    stored: [u64; 3],
    stored_periods: [Millis; 3],
}

/// A request admitted, with what its answer's `x-ratelimit-*` headers say; all `None` for a tenant without limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

/// A limit, what is left of it, and when it turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: Millis,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// A per-minute limit: try again when the minute turns.
    RateLimit { limit: &'static str, retry_after_ms: Millis },
    /// A budget (day, month) is spent: until the period turns.
    Quota { limit: &'static str, retry_after_ms: Millis },
}

impl Refused {
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::RateLimit { limit, .. } | Refused::Quota { limit, .. } => limit,
        }
    }
}

/// The start of the minute, day and month `now` is in (UTC), and the start of the next of each.
fn periods(now: Millis) -> ([Millis; 3], [Millis; 3]) {
    let minute = Step::Minute.floor(now);
    let day = Step::Day.floor(now);
    let at = OffsetDateTime::from_unix_timestamp(day / 1000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let month_start = at.replace_day(1).unwrap_or(at);
    let next_month = match month_start.month() {
        time::Month::December => {
            month_start.replace_year(month_start.year() + 1).and_then(|m| m.replace_month(time::Month::January))
        }
        month => month_start.replace_month(month.next()),
    }
    .unwrap_or(month_start);
    let ms = |t: OffsetDateTime| t.unix_timestamp() * 1000;
    ([minute, day, ms(month_start)], [minute + 60_000, day + 86_400_000, ms(next_month)])
}

/// The token limits, in the order of [`periods`]: minute, day, month.
const TOKEN_LIMITS: [&str; 3] = ["tokens_per_minute", "tokens_per_day", "tokens_per_month"];

/// Each token limit set, with what is left of it given `tokens` used this minute, day and month, and when it turns.
fn token_quotas(limits: &Limits, tokens: [u64; 3], now: Millis) -> [Option<Quota>; 3] {
    let (_, next) = periods(now);
    let set = [limits.tokens_per_minute, limits.tokens_per_day, limits.tokens_per_month];
    std::array::from_fn(|i| {
        set[i].map(|limit| Quota { limit, remaining: limit.saturating_sub(tokens[i]), reset_ms: next[i] - now })
    })
}

/// The token limit with the least left (the first of equals): what the `x-ratelimit-*-tokens` headers report.
fn tightest(quotas: [Option<Quota>; 3]) -> Option<Quota> {
    quotas.into_iter().flatten().min_by_key(|quota| quota.remaining)
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>, store: Store) -> Limiter {
        Limiter { clock, store, tenants: RwLock::new(HashMap::new()) }
    }

    /// Sets a tenant's limits and weight (a key or user created, changed, or read at start).
    pub fn set(&self, tenant: &str, policy: Policy) {
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if policy.limits.is_empty() && policy.weight <= 1 {
            tenants.remove(tenant);
            return;
        }
        match tenants.get(tenant) {
            Some(found) => *found.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy,
            None => {
                let limits = TenantLimits { policy: Mutex::new(policy), used: Mutex::new(Used::default()) };
                tenants.insert(Arc::from(tenant), Arc::new(limits));
            }
        }
    }

    /// Replaces every tenant's policy with `policies` (as read from the storage), keeping what each has used.
    pub fn set_all(&self, policies: Vec<(String, Policy)>) {
        let keep: std::collections::HashSet<&str> = policies.iter().map(|(id, _)| id.as_str()).collect();
        self.tenants.write().unwrap_or_else(|p| p.into_inner()).retain(|id, _| keep.contains(&**id));
        for (id, policy) in &policies {
            self.set(id, *policy);
        }
    }

    fn get(&self, tenant: &str) -> Option<Arc<TenantLimits>> {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).get(tenant).cloned()
    }

    /// A tenant's weight in the queue's fair share.
    pub fn weight(&self, tenant: &str) -> u32 {
        self.get(tenant).map_or(1, |t| t.policy.lock().unwrap_or_else(|p| p.into_inner()).weight)
    }

    /// A tenant's limits (none when it has none).
    pub fn limits(&self, tenant: &str) -> Limits {
        self.get(tenant).map(|t| t.policy.lock().unwrap_or_else(|p| p.into_inner()).limits).unwrap_or_default()
    }

    /// What a tenant has used of its limits now: requests this minute, tokens this minute, day, month.
    pub fn used(&self, tenant: &str) -> Option<[u64; 4]> {
        let limits = self.get(tenant)?;
        let now = self.clock.now_ms();
        let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
        used.turn(now);
        let tokens = used.tokens(now);
        Some([used.requests, tokens[0], tokens[1], tokens[2]])
    }

    /// Admits a request of `tenant`, or says which limit refuses it.
    pub async fn admit(&self, tenant: &str) -> Result<Admitted, Refused> {
        let Some(limits) = self.get(tenant) else { return Ok(Admitted::default()) };
        let policy = *limits.policy.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_ms();
        // Tokens first: a spent budget refuses without taking a request.
        let quotas = {
            let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
            used.turn(now);
            token_quotas(&policy.limits, used.tokens(now), now)
        };
        for (i, (name, quota)) in TOKEN_LIMITS.into_iter().zip(quotas).enumerate() {
            let Some(quota) = quota.filter(|quota| quota.remaining == 0) else { continue };
            let retry_after_ms = quota.reset_ms;
            return Err(if i == 0 {
                Refused::RateLimit { limit: name, retry_after_ms }
            } else {
                Refused::Quota { limit: name, retry_after_ms }
            });
        }
        let requests = match policy.limits.requests_per_minute {
            None => None,
            Some(limit) => Some(self.take_request(tenant, &limits, limit, now).await?),
        };
        Ok(Admitted { requests, tokens: tightest(quotas) })
    }

    /// What an answer's headers say of a tenant's limits now, without taking anything.
    pub fn peek(&self, tenant: &str) -> Admitted {
        let Some(limits) = self.get(tenant) else { return Admitted::default() };
        let policy = *limits.policy.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_ms();
        let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
        used.turn(now);
        let tokens = tightest(token_quotas(&policy.limits, used.tokens(now), now));
        let requests = policy.limits.requests_per_minute.map(|limit| Quota {
            limit,
            remaining: limit.saturating_sub(used.requests),
            reset_ms: Step::Minute.floor(now) + 60_000 - now,
        });
        Admitted { requests, tokens }
    }

    /// Takes one of this minute's requests: from this router's claim, claiming more from the shared count when it
    /// is used up.
    async fn take_request(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        limit: u64,
        now: Millis,
    ) -> Result<Quota, Refused> {
        let minute = Step::Minute.floor(now);
        let reset_ms = minute + 60_000 - now;
        let refused = Refused::RateLimit { limit: "requests_per_minute", retry_after_ms: reset_ms };
        let quota = |requests: u64| Quota { limit, remaining: limit.saturating_sub(requests), reset_ms };
        {
            let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
            used.turn(now);
            if self.store.shared().is_none() || used.claimed > 0 {
                if used.requests >= limit {
                    return Err(refused);
                }
                used.requests += 1;
                used.claimed = used.claimed.saturating_sub(1);
                return Ok(quota(used.requests));
            }
        }
        let Some(shared) = self.store.shared() else { return Err(refused) };
        let want = (limit / 50).max(1);
        let granted = match shared.claim_requests(tenant, minute, want, limit).await {
            Ok(granted) => granted,
            // Cut off from the others: this router alone keeps the whole limit.
            Err(_) => want,
        };
        let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
        used.turn(now);
        used.claimed += granted;
        if used.claimed == 0 || used.requests >= limit {
            return Err(refused);
        }
        used.requests += 1;
        used.claimed -= 1;
        Ok(quota(used.requests))
    }

    /// Counts tokens a tenant's answer used.
    pub fn spend(&self, tenant: &str, tokens: u64) {
        let Some(limits) = self.get(tenant) else { return };
        let now = self.clock.now_ms();
        let (starts, _) = periods(now);
        let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
        used.turn(now);
        let Used { local, local_periods, .. } = &mut *used;
        for ((local, period), start) in local.iter_mut().zip(local_periods.iter_mut()).zip(starts) {
            if *period != start {
                *period = start;
                *local = 0;
            }
            *local = local.saturating_add(tokens);
        }
    }

    /// Reads back from the roll-ups what every tenant with limits has spent, once this router's own records are
    /// written (the caller flushes them first).
    pub async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let tenants: Vec<(Arc<str>, Arc<TenantLimits>)> = self
            .tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if tenants.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let (starts, _) = periods(now);
        // What was counted here before the read is in the storage now; what comes during the read stays local.
        let counted: Vec<([u64; 3], [Millis; 3])> = tenants
            .iter()
            .map(|(_, t)| {
                let used = t.used.lock().unwrap_or_else(|p| p.into_inner());
                (used.local, used.local_periods)
            })
            .collect();
        let read = [
            self.store.spent_since(Step::Minute, starts[0]).await?,
            self.store.spent_since(Step::Hour, starts[1]).await?,
            self.store.spent_since(Step::Day, starts[2]).await?,
        ];
        let stored: Vec<HashMap<&str, u64>> =
            read.iter().map(|rows| rows.iter().map(|(id, _, tokens)| (id.as_str(), *tokens)).collect()).collect();
        for ((id, limits), (counted, counted_periods)) in tenants.iter().zip(counted) {
            let mut used = limits.used.lock().unwrap_or_else(|p| p.into_inner());
            used.turn(now);
            for i in 0..3 {
                if used.local_periods[i] == counted_periods[i] {
                    used.local[i] = used.local[i].saturating_sub(counted[i]);
                }
                used.stored[i] = stored[i].get(&**id).copied().unwrap_or(0);
                used.stored_periods[i] = starts[i];
            }
        }
        Ok(())
    }
}

impl Used {
    /// Starts the per-minute counts over when the minute turned.
    fn turn(&mut self, now: Millis) {
        let minute = Step::Minute.floor(now);
        if minute != self.minute {
            self.minute = minute;
            self.requests = 0;
            self.claimed = 0;
        }
    }

    /// Tokens used this minute, day and month: the storage's at the last look, if of the same period, and this
    /// router's since.
    fn tokens(&self, now: Millis) -> [u64; 3] {
        let (starts, _) = periods(now);
        std::array::from_fn(|i| {
            let stored = if self.stored_periods[i] == starts[i] { self.stored[i] } else { 0 };
            let local = if self.local_periods[i] == starts[i] { self.local[i] } else { 0 };
            stored.saturating_add(local)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_turn_at_utc_minute_midnight_and_the_first_of_the_month() {
        // 2026-12-31T23:59:30Z
        let now = 1_798_761_570_000;
        let (starts, next) = periods(now);
        assert_eq!(starts[0], 1_798_761_540_000);
        assert_eq!(next[0], 1_798_761_600_000);
        assert_eq!(next[1], 1_798_761_600_000, "midnight");
        assert_eq!(next[2], 1_798_761_600_000, "January the first");
        assert_eq!(starts[2], 1_796_083_200_000, "December the first");
    }
}
