//! The audit log (SPEC §9): who did what, from where, to what, and how it ended.

use crate::clock::Millis;

/// One audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub at: Millis,
    /// A username, `api-key:<name>`, the username a sign-in named, or `anonymous`.
    pub actor: String,
    /// The client's address, when the action came over the network.
    pub client: Option<String>,
    /// What was done: `node.approve`, `auth.login`, `join_token.create`, ...
    pub action: String,
    /// What it was done to: a node id, a username, a key or token id.
    pub target: Option<String>,
    /// `success`, `failure`, `throttled`, `refused`.
    pub outcome: String,
}

/// An audit event as stored, with the id that orders the log and pages through it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedAudit {
    pub id: i64,
    pub event: AuditEvent,
}
