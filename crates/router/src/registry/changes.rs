//! The change log of the fleet for `changed_since` (SPEC §12): the revision each answer gives its client, the nodes
//! deleted lately with their revisions, and, with a shared database, which revisions this router gave out itself.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use super::{RegistryError, RegistryResult};
use crate::revision::Revisions;

/// Deletions remembered for `changed_since`; a client asking from before the oldest one forgotten lists again.
const DELETIONS_KEPT: usize = 10_000;

/// How much earlier than asked a router that shares its database answers a `changed_since` it did not give itself
/// (three seconds of revisions): a change another router made reaches this one within a second or two (SPEC §11)
/// and is stamped on arrival, so a client whose requests go to the routers in turn is sent such a change twice
/// rather than never.
const SHARED_LAG_REVISIONS: i64 = 3_000_000;

/// Revisions this router answered with lately, remembered to tell its own from another router's.
const ISSUED_KEPT: usize = 16_384;

/// What `changed_since` is answered from.
pub(super) struct ChangeLog {
    revisions: Arc<Revisions>,
    /// Whether the database is shared with other routers.
    shared: bool,
    log: Mutex<Log>,
}

struct Log {
    deleted: VecDeque<(i64, Uuid)>,
    /// The oldest revision `changed_since` may name: the router's start, or the latest deletion forgotten.
    horizon: i64,
    issued: HashSet<i64>,
    issued_order: VecDeque<i64>,
}

impl ChangeLog {
    /// A log that answers from the revision of now on.
    pub(super) fn new(revisions: Arc<Revisions>, shared: bool) -> Self {
        let log = Log {
            deleted: VecDeque::new(),
            horizon: revisions.now(),
            issued: HashSet::new(),
            issued_order: VecDeque::new(),
        };
        ChangeLog { revisions, shared, log: Mutex::new(log) }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The revision an answer gives the client to ask `changed_since` with next time: the newest, remembered as
    /// this router's own when the database is shared.
    pub(super) fn answer_revision(&self) -> i64 {
        let now = self.revisions.now();
        if self.shared {
            let mut log = self.log();
            if log.issued.insert(now) {
                log.issued_order.push_back(now);
                if log.issued_order.len() > ISSUED_KEPT
                    && let Some(old) = log.issued_order.pop_front()
                {
                    log.issued.remove(&old);
                }
            }
        }
        now
    }

    /// The revision after which changes are sent to a client asking `changed_since=since`: `since` itself, or,
    /// with a shared database, [`SHARED_LAG_REVISIONS`] earlier when another router gave it. `RevisionExpired`
    /// when this router cannot tell what changed since.
    pub(super) fn changes_after(&self, since: i64) -> RegistryResult<i64> {
        let newest = self.revisions.now();
        let log = self.log();
        // Another router's revision may be a little ahead of this one's: their counters meet the clock once a second.
        let ahead = if self.shared { SHARED_LAG_REVISIONS } else { 0 };
        if since < log.horizon || since > newest.saturating_add(ahead) {
            return Err(RegistryError::RevisionExpired { since, oldest: log.horizon, newest });
        }
        if !self.shared || log.issued.contains(&since) {
            return Ok(since);
        }
        Ok((since.min(newest) - SHARED_LAG_REVISIONS).max(log.horizon))
    }

    /// The nodes deleted after revision `after`.
    pub(super) fn deleted_after(&self, after: i64) -> Vec<Uuid> {
        self.log().deleted.iter().filter(|(at, _)| *at > after).map(|(_, id)| *id).collect()
    }

    /// Notes that node `id` was deleted, at a revision of its own.
    pub(super) fn deleted(&self, id: Uuid) {
        let mut log = self.log();
        log.deleted.push_back((self.revisions.next(), id));
        while log.deleted.len() > DELETIONS_KEPT {
            if let Some((at, _)) = log.deleted.pop_front() {
                log.horizon = log.horizon.max(at);
            }
        }
    }
}
