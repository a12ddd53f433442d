-- Capacity (SPEC §8): most inference requests in flight at once on a node through one router; NULL: no limit.
ALTER TABLE nodes ADD COLUMN max_concurrency INTEGER CHECK (max_concurrency IS NULL OR max_concurrency > 0);
