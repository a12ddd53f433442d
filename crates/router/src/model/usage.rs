//! What the router keeps of each `/v1` request (SPEC §14): one record per request, the roll-ups that sum them per
//! minute, hour and day, and the questions asked of them.

use std::sync::Arc;

use uuid::Uuid;

use crate::clock::Millis;

/// One `/v1` request as recorded: whom it was for, where it went, how it ended and what it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// When the request arrived.
    pub at: Millis,
    /// The tenant's id (`key:<uuid>`, `user:<name>`, `anonymous`) and name.
    pub principal: Arc<str>,
    pub principal_name: Arc<str>,
    pub model: Arc<str>,
    /// The node that answered; `None` for a request refused before any node.
    pub node: Option<Uuid>,
    /// The HTTP status the client got.
    pub status: u16,
    /// Tokens as the runtime's `usage` reported them; `None` when it reported none (never guessed).
    pub tokens: Option<Tokens>,
    /// Time to the first byte of a streamed answer.
    pub ttft_ms: Option<u32>,
    /// From arrival to the answer's last byte (or to the refusal, or to the client leaving).
    pub duration_ms: u32,
    /// Nodes tried before the one that answered.
    pub retries: u8,
    pub stream: bool,
}

/// A runtime's `usage`: prompt and completion tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
}

impl Tokens {
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

impl UsageRecord {
    /// The sums this record adds to its roll-ups.
    pub fn sums(&self) -> UsageSums {
        let tokens = self.tokens.unwrap_or_default();
        UsageSums {
            requests: 1,
            errors: u64::from(self.status >= 500),
            rejected: u64::from((400..500).contains(&self.status)),
            prompt_tokens: tokens.prompt,
            completion_tokens: tokens.completion,
            unknown_usage: u64::from(self.tokens.is_none() && self.status < 300 && self.node.is_some()),
            duration_ms: u64::from(self.duration_ms),
        }
    }
}

/// What a set of requests adds up to. `errors` counts answers of 500 and above (the fleet failed), `rejected` those of
/// 400–499 (refused: limits, unknown model, bad request); `unknown_usage` the answered requests whose runtime reported
/// no `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct UsageSums {
    pub requests: u64,
    pub errors: u64,
    pub rejected: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub unknown_usage: u64,
    /// Sum of the requests' durations, for their mean.
    pub duration_ms: u64,
}

impl UsageSums {
    pub fn add(&mut self, other: &UsageSums) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.rejected += other.rejected;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.unknown_usage += other.unknown_usage;
        self.duration_ms += other.duration_ms;
    }

    pub fn tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// The sums in the order the roll-up tables' columns hold them (`store::usage_sql::SUM_COLUMNS`), for whatever
    /// writes them out: rows, `COPY` text, CSV.
    pub fn columns(&self) -> [u64; 7] {
        [
            self.requests,
            self.errors,
            self.rejected,
            self.prompt_tokens,
            self.completion_tokens,
            self.unknown_usage,
            self.duration_ms,
        ]
    }
}

/// The width of a roll-up's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Minute,
    Hour,
    Day,
}

impl Step {
    pub fn millis(self) -> Millis {
        match self {
            Step::Minute => 60_000,
            Step::Hour => 3_600_000,
            Step::Day => 86_400_000,
        }
    }

    /// The start of the bucket `at` falls in (UTC).
    pub fn floor(self, at: Millis) -> Millis {
        at.div_euclid(self.millis()) * self.millis()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Minute => "minute",
            Step::Hour => "hour",
            Step::Day => "day",
        }
    }
}

/// What a usage series is split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Principal,
    Model,
    Node,
}

impl GroupBy {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Principal => "principal",
            GroupBy::Model => "model",
            GroupBy::Node => "node",
        }
    }
}

/// A question to the roll-ups: the buckets of `step` from `from` (inclusive) to `to` (exclusive), split by `group_by`
/// (or not at all), of one principal and one model when given.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub from: Millis,
    pub to: Millis,
    pub step: Step,
    pub group_by: Option<GroupBy>,
    pub principal: Option<String>,
    pub model: Option<String>,
}

/// One bucket of one group: its start, the group's key (`None` when not grouped), and its sums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub at: Millis,
    pub group: Option<String>,
    pub sums: UsageSums,
}

/// A page of the recorded requests, newest first: at most `limit` older than the request `before`, within
/// `from`–`to`, of one principal, model and node when given.
#[derive(Debug, Clone, Default)]
pub struct RequestQuery {
    pub limit: u32,
    pub before: Option<i64>,
    pub from: Option<Millis>,
    pub to: Option<Millis>,
    pub principal: Option<String>,
    pub model: Option<String>,
    pub node: Option<Uuid>,
}

/// A recorded request read back, with its id (the cursor of the next page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub id: i64,
    pub record: UsageRecord,
}

/// A tenant's tokens and requests since a moment, for its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    pub requests: u64,
    pub tokens: u64,
}
