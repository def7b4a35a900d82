-- leadsync schema, version 18: what a sync pass's listing confirmed, so that
-- a webhook delivery held up past a listing is never applied over it.
-- A listing that shows a lead exactly as mirrored writes nothing to
-- `negotiations` (an unchanged re-sync writes no row), so the lead's row
-- cannot say when its copy was last confirmed; the pass's row says it
-- instead, once per pass:
--   listed_at   the pass's `started_at` (no page of it was asked for
--               earlier) when its listing confirmed leads; NULL when it
--               confirmed none (a failed full scan, an unknown end, a
--               skipped pass, and every pass before this schema).
--   listed_ids  the leads a partial listing (a head scan) showed, as
--               8-byte little-endian fingerprints of their ids; NULL with
--               listed_at set: a complete listing (a successful full scan
--               with a known end) showed every lead of the business, or
--               found it gone.
-- Read only for a delivery of a known lead newer than its mirrored copy,
-- through the partial index below (passes since the delivery's event).
ALTER TABLE sync_runs ADD COLUMN listed_at TEXT;
ALTER TABLE sync_runs ADD COLUMN listed_ids BLOB;
CREATE INDEX IF NOT EXISTS sync_runs_listed ON sync_runs (business_id, listed_at)
    WHERE listed_at IS NOT NULL;
