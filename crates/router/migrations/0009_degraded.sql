-- no-transaction
-- Fleet health (SPEC §10): `degraded` joins the statuses, and a node keeps the conditions that made it so
-- (`gpu_missing`, `gpu_fault`, `gpu_overheat`, comma-separated; NULL when none).
--
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt, in one transaction. Foreign keys are
-- off meanwhile: with them on, dropping the old table would delete every node's child rows (ON DELETE CASCADE).
PRAGMA foreign_keys = OFF;

BEGIN;

CREATE TABLE nodes_rebuilt (
    id               TEXT PRIMARY KEY NOT NULL,
    machine_name     TEXT NOT NULL,
    ip_address       TEXT NOT NULL,
    runtime_port     INTEGER NOT NULL,
    runtime_version  TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'registering', 'online', 'degraded', 'offline')),
    display_name     TEXT,
    notes            TEXT,
    metrics          TEXT,
    registered_at    INTEGER NOT NULL,
    approved_at      INTEGER,
    approved_by      TEXT,
    last_seen_at     INTEGER,
    lists            TEXT,
    join_token       TEXT,
    cordoned         INTEGER NOT NULL DEFAULT 0,
    max_concurrency  INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0),
    conditions       TEXT,
    UNIQUE (machine_name, runtime_port)
);

INSERT INTO nodes_rebuilt (id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, notes,
                           metrics, registered_at, approved_at, approved_by, last_seen_at, lists, join_token, cordoned,
                           max_concurrency)
SELECT id, machine_name, ip_address, runtime_port, runtime_version, status, display_name, notes,
       metrics, registered_at, approved_at, approved_by, last_seen_at, lists, join_token, cordoned,
       max_concurrency
FROM nodes;

DROP TABLE nodes;

ALTER TABLE nodes_rebuilt RENAME TO nodes;

COMMIT;

PRAGMA foreign_keys = ON;
