-- Deployments (SPEC §15): a model the router places on nodes whose agents run it. `args` and `selector_tags` are
-- JSON arrays of strings. A replica is one row per slot (0 … replicas - 1): its node once placed (`node_id` NULL:
-- pending, `reason` says why), and what that node's agent last reported of it (`gpus`: a JSON array of the GPU indices
-- its runtime was started on).
CREATE TABLE deployments (
    id               TEXT PRIMARY KEY NOT NULL,
    name             TEXT NOT NULL UNIQUE,
    model            TEXT NOT NULL,
    source           TEXT NOT NULL,
    sha256           TEXT,
    runtime          TEXT NOT NULL,
    args             TEXT NOT NULL,
    replicas         INTEGER NOT NULL,
    gpu_memory_bytes INTEGER,
    selector_tags    TEXT NOT NULL,
    max_concurrency  INTEGER,
    revision         INTEGER NOT NULL,
    created_by       TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE TABLE deployment_replicas (
    deployment_id TEXT NOT NULL,
    slot          INTEGER NOT NULL,
    node_id       TEXT,
    placed_at     INTEGER,
    state         TEXT NOT NULL,
    revision      INTEGER NOT NULL,
    reason        TEXT,
    bytes_done    INTEGER,
    bytes_total   INTEGER,
    port          INTEGER,
    pid           INTEGER,
    restarts      INTEGER NOT NULL,
    download_ms   INTEGER,
    start_ms      INTEGER,
    ready_at      INTEGER,
    updated_at    INTEGER NOT NULL,
    gpus          TEXT,
    PRIMARY KEY (deployment_id, slot)
);
