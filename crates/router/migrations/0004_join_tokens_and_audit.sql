-- Join tokens (SPEC §9): enrollment an operator controls. Only the hash of a token is stored.
CREATE TABLE join_tokens (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    max_uses      INTEGER,
    uses          INTEGER NOT NULL DEFAULT 0,
    auto_approve  INTEGER NOT NULL,
    tags          TEXT NOT NULL,
    revoked_at    INTEGER
);

-- The name of the join token a node registered with, if any.
ALTER TABLE nodes ADD COLUMN join_token TEXT;

-- The audit log (SPEC §9): admin actions, sign-ins, throttling decisions.
CREATE TABLE audit_events (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    actor    TEXT NOT NULL,
    client   TEXT,
    action   TEXT NOT NULL,
    target   TEXT,
    outcome  TEXT NOT NULL
);
CREATE INDEX audit_events_by_time ON audit_events (at);
CREATE INDEX audit_events_by_actor ON audit_events (actor, id);
CREATE INDEX audit_events_by_action ON audit_events (action, id);
