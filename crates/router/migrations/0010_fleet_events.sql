-- Fleet-level events (SPEC §10): what happened to the fleet as a whole rather than to one node, e.g. a mass silence
-- (more than half of the live nodes went offline in one sweep). `resolved_at` is set when the nodes came back or an
-- administrator dismissed it (`resolved_by`, NULL when the nodes came back).
CREATE TABLE fleet_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    nodes_affected INTEGER NOT NULL,
    nodes_live INTEGER NOT NULL,
    resolved_at INTEGER,
    resolved_by TEXT,
    resolution TEXT
);
