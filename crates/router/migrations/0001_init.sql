-- Nodes and everything they announce, auth, and the transition history.
-- Times are integer milliseconds since the Unix epoch (UTC).

CREATE TABLE nodes (
    id               TEXT PRIMARY KEY NOT NULL,
    machine_name     TEXT NOT NULL,
    ip_address       TEXT NOT NULL,
    runtime_port     INTEGER NOT NULL,
    runtime_version  TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'registering', 'online', 'offline')),
    display_name     TEXT,
    notes            TEXT,
    metrics          TEXT,
    registered_at    INTEGER NOT NULL,
    approved_at      INTEGER,
    approved_by      TEXT,
    last_seen_at     INTEGER,
    UNIQUE (machine_name, runtime_port)
);

CREATE TABLE node_gpu_devices (
    node_id      TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    model        TEXT NOT NULL,
    count        INTEGER NOT NULL CHECK (count >= 1),
    memory_bytes INTEGER,
    PRIMARY KEY (node_id, position)
);

-- kind: 'loaded' or 'ready'
CREATE TABLE node_loaded_models (
    node_id  TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    kind     TEXT NOT NULL CHECK (kind IN ('loaded', 'ready')),
    position INTEGER NOT NULL,
    model    TEXT NOT NULL,
    PRIMARY KEY (node_id, kind, position)
);

CREATE TABLE node_supported_runtimes (
    node_id  TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    runtime  TEXT NOT NULL,
    PRIMARY KEY (node_id, position)
);

CREATE TABLE node_tags (
    node_id  TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    tag      TEXT NOT NULL,
    PRIMARY KEY (node_id, position)
);

-- History outlives the node: a deleted node's events stay for the audit trail.
CREATE TABLE node_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    node_id     TEXT NOT NULL,
    at          INTEGER NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT NOT NULL,
    actor       TEXT
);
CREATE INDEX node_events_by_node ON node_events (node_id, id);

CREATE TABLE users (
    username      TEXT PRIMARY KEY NOT NULL,
    password_hash TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at    INTEGER NOT NULL
);

CREATE TABLE sessions (
    token_hash TEXT PRIMARY KEY NOT NULL,
    username   TEXT NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    role       TEXT NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE node_tokens (
    node_id    TEXT PRIMARY KEY NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
