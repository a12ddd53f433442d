-- Cordon (SPEC §8): a cordoned node gets no new inference request; requests in flight finish.
ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
