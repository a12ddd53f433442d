-- Events older than the retention period are removed in batches by time (SPEC §9).
CREATE INDEX node_events_by_time ON node_events (at);
