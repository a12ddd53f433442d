-- Deployments (SPEC §15): a model the router places on nodes whose agents run it. `args` and `selector_tags` are
-- JSON arrays of strings. A replica is one row per slot (0 … replicas - 1): its node once placed (`node_id` NULL:
-- pending, `reason` says why), and what that node's agent last reported of it.
CREATE TABLE deployments (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    model            TEXT NOT NULL,
    source           TEXT NOT NULL,
    sha256           TEXT,
    runtime          TEXT NOT NULL,
    args             TEXT NOT NULL,
    replicas         BIGINT NOT NULL,
    gpu_memory_bytes BIGINT,
    selector_tags    TEXT NOT NULL,
    max_concurrency  BIGINT,
    revision         BIGINT NOT NULL,
    created_by       TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

CREATE TABLE deployment_replicas (
    deployment_id TEXT NOT NULL,
    slot          BIGINT NOT NULL,
    node_id       TEXT,
    placed_at     BIGINT,
    state         TEXT NOT NULL,
    revision      BIGINT NOT NULL,
    reason        TEXT,
    bytes_done    BIGINT,
    bytes_total   BIGINT,
    port          BIGINT,
    pid           BIGINT,
    restarts      BIGINT NOT NULL,
    download_ms   BIGINT,
    start_ms      BIGINT,
    ready_at      BIGINT,
    updated_at    BIGINT NOT NULL,
    gpus          TEXT,
    PRIMARY KEY (deployment_id, slot)
);
