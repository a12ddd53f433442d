-- Tenants (SPEC §14): every /v1 request as recorded (`usage_requests`, kept `--request-log-days`), its sums per
-- (bucket, principal, model) per minute, hour and day (kept `--usage-retention-days`), per (bucket, node, model) per
-- hour and day, the names of the principals seen, and each key's and user's limits and weight.
CREATE TABLE usage_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    principal TEXT NOT NULL,
    model TEXT NOT NULL,
    node TEXT,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    ttft_ms INTEGER,
    duration_ms INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    stream INTEGER NOT NULL
);
CREATE INDEX usage_requests_by_time ON usage_requests (at);

CREATE TABLE usage_principals (
    principal TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE usage_minute (
    bucket INTEGER NOT NULL, principal TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, principal, model)
) WITHOUT ROWID;
CREATE TABLE usage_hour (
    bucket INTEGER NOT NULL, principal TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, principal, model)
) WITHOUT ROWID;
CREATE TABLE usage_day (
    bucket INTEGER NOT NULL, principal TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, principal, model)
) WITHOUT ROWID;
CREATE TABLE usage_node_hour (
    bucket INTEGER NOT NULL, node TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, node, model)
) WITHOUT ROWID;
CREATE TABLE usage_node_day (
    bucket INTEGER NOT NULL, node TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, node, model)
) WITHOUT ROWID;

-- The same sums per (bucket, model) alone, what the fleet's series and the split by model read; and the streamed
-- requests' time to first token per minute, as counts in bins 25 % wide (bin b holds times up to 1.25^b ms).
CREATE TABLE usage_model_minute (
    bucket INTEGER NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, model)
) WITHOUT ROWID;
CREATE TABLE usage_model_hour (
    bucket INTEGER NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, model)
) WITHOUT ROWID;
CREATE TABLE usage_model_day (
    bucket INTEGER NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, rejected INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, unknown_usage INTEGER NOT NULL, duration_ms INTEGER NOT NULL,
    PRIMARY KEY (bucket, model)
) WITHOUT ROWID;
CREATE TABLE usage_ttft_minute (
    bucket INTEGER NOT NULL,
    bin INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (bucket, bin)
) WITHOUT ROWID;

-- Requests admitted per principal and minute by every router sharing the database (SPEC §14's shared
-- requests_per_minute); rows older than a few minutes are removed.
CREATE TABLE limit_windows (
    principal TEXT NOT NULL,
    minute INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (principal, minute)
) WITHOUT ROWID;

-- Limits as JSON (`{"requests_per_minute": …}`), NULL for none.
ALTER TABLE api_keys ADD COLUMN limits TEXT;
ALTER TABLE api_keys ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN limits TEXT;
