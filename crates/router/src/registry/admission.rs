//! Who may register a machine, how often, and how many may wait for approval (SPEC §2.1, §9): the join token a
//! registration brings (required in `--registration-mode token`), the throttle of unknown join tokens per address,
//! and the limits of anonymous registrations (a rate per address, the pending cap). A token rotation, or a valid join
//! token, is not anonymous and skips those limits.

use std::net::IpAddr;
use std::sync::Arc;

use llm_router_protocol::JOIN_TOKEN_HEADER;

use super::{PendingReservation, RegistrationPlan, Registry, RegistryError, RegistryResult};
use crate::audit::{AuditLog, Outcome};
use crate::auth::throttle::LoginThrottle;
use crate::clock::Clock;
use crate::config::RegistrationMode;
use crate::metrics::Metrics;
use crate::model::auth::TokenHash;
use crate::model::enrollment::{JoinToken, Unusable};
use crate::rate_limit::{self, RegistrationLimiter};
use crate::store::Store;

/// The name unknown join tokens are counted under, per client address, in the join-token throttle.
const JOIN_TOKEN_GUESSES: &str = "join-token";

/// Seconds a registration refused at the pending cap is asked to wait: places free up only as an administrator
/// approves or deletes nodes, or as silent ones expire.
pub const TOO_MANY_PENDING_RETRY_AFTER_SECS: u64 = 60;

/// The audit log's name for a registration.
const REGISTER: &str = "node.register";

/// The registration policy, with the state its limits keep.
pub struct Admission {
    mode: RegistrationMode,
    /// Anonymous registrations by client address.
    limiter: RegistrationLimiter,
    per_minute: u32,
    /// Pending nodes at most (0: no cap).
    max_pending: u64,
    /// Unknown join tokens by client address.
    guesses: LoginThrottle,
    store: Store,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
}

/// What a registration was admitted with: its join token, and its place under the pending cap, held until the
/// registration is settled so that the cap stays exact.
pub struct Admitted<'r> {
    pub join: Option<JoinToken>,
    _place: Option<PendingReservation<'r>>,
}

impl Admission {
    /// The policy of `mode`, with `per_minute` anonymous registrations a minute and address (0: no limit) and at most
    /// `max_pending` pending nodes (0: no cap).
    pub fn new(
        mode: RegistrationMode,
        per_minute: u32,
        max_pending: u64,
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        audit: AuditLog,
    ) -> Self {
        Admission {
            mode,
            limiter: RegistrationLimiter::new(per_minute, rate_limit::DEFAULT_CAPACITY),
            per_minute,
            max_pending,
            guesses: LoginThrottle::default(),
            store,
            clock,
            metrics,
            audit,
        }
    }

    /// Admits a registration from `from` that brings `join_token` (the header's value, if any), or says why not.
    /// The anonymous limits come before the probe of the node's runtime, the one costly step of a registration.
    pub async fn admit<'r>(
        &self,
        registry: &'r Registry,
        plan: &RegistrationPlan,
        join_token: Option<&str>,
        from: IpAddr,
    ) -> RegistryResult<Admitted<'r>> {
        // A token rotation needs no join token; anything else does in `token` mode, and may bring one in `open` mode.
        let join = match plan {
            RegistrationPlan::Rotate(..) => None,
            RegistrationPlan::Create | RegistrationPlan::TakeOver(_) => self.join_token(join_token, from).await?,
        };
        let place = match (plan, &join) {
            (RegistrationPlan::Rotate(..), _) | (_, Some(_)) => None,
            _ => Some(self.anonymous_limits(registry, from)?),
        };
        Ok(Admitted { join, _place: place })
    }

    /// The registration's join token, checked now (its use is counted when the node is stored): `None` when the
    /// request carries none and the router is in `open` mode.
    ///
    /// Unknown join tokens are treated like wrong passwords (SPEC §9): counted per client address, and after five
    /// within fifteen minutes the address is refused before any lookup, for a minute, doubling up to fifteen; each
    /// such lock is one audit event, with the count, rather than one per guess.
    async fn join_token(&self, presented: Option<&str>, from: IpAddr) -> RegistryResult<Option<JoinToken>> {
        let Some(presented) = presented.filter(|v| !v.is_empty()) else {
            if self.mode == RegistrationMode::Token {
                return Err(RegistryError::JoinTokenRequired);
            }
            return Ok(None);
        };
        let now = self.clock.now_ms();
        self.guesses.check(JOIN_TOKEN_GUESSES, from, now).map_err(|throttled| {
            Metrics::inc(&self.metrics.join_tokens_throttled);
            RegistryError::Limited {
                code: "join_token_throttled",
                message: format!(
                    "Too many unknown join tokens from this address; try again in {} s.",
                    throttled.retry_after_secs
                ),
                retry_after_secs: throttled.retry_after_secs,
            }
        })?;
        let Some(token) = self.store.join_token(TokenHash::of(presented)).await? else {
            Metrics::inc(&self.metrics.join_tokens_unknown);
            if let Some(lock) = self.guesses.record_failure(JOIN_TOKEN_GUESSES, from, now) {
                let what = format!("unknown join tokens: address refused for {} s", lock.retry_after_secs);
                self.audit.record("anonymous", Some(from), REGISTER, Some(what), Outcome::Throttled);
            }
            return Err(RegistryError::JoinTokenInvalid(Unusable::Unknown));
        };
        token.check(now).map_err(RegistryError::JoinTokenInvalid)?;
        Ok(Some(token))
    }

    /// The per-address rate limit, then the pending cap; the cap's reservation on success.
    fn anonymous_limits<'r>(&self, registry: &'r Registry, from: IpAddr) -> RegistryResult<PendingReservation<'r>> {
        let refused = |code: &'static str| {
            self.audit.record("anonymous", Some(from), REGISTER, Some(code.to_owned()), Outcome::Throttled);
        };
        if let Err(limited) = self.limiter.check(from, self.clock.now_ms()) {
            Metrics::inc(&self.metrics.registrations_rate_limited);
            refused("rate_limited");
            return Err(RegistryError::Limited {
                code: "rate_limited",
                message: format!(
                    "Too many registrations from {from}: at most {} a minute (bursts of twice that); try again in {} \
                     s.",
                    self.per_minute, limited.retry_after_secs
                ),
                retry_after_secs: limited.retry_after_secs,
            });
        }
        let cap = self.max_pending;
        registry.reserve_pending(cap).ok_or_else(|| {
            Metrics::inc(&self.metrics.registrations_too_many_pending);
            refused("too_many_pending");
            RegistryError::Limited {
                code: "too_many_pending",
                message: format!(
                    "The router already holds {cap} pending nodes, its limit; an administrator must approve or \
                     delete some before more can register."
                ),
                retry_after_secs: TOO_MANY_PENDING_RETRY_AFTER_SECS,
            }
        })
    }
}

/// The sentence of [`RegistryError::JoinTokenRequired`].
pub(super) fn join_token_required() -> String {
    format!(
        "This router admits machines with a join token only: send it in the {JOIN_TOKEN_HEADER} header (llm-node \
         --join-token); an administrator creates one with POST /v0/join-tokens."
    )
}
