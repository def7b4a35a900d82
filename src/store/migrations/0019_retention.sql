-- leadsync schema, version 19: what pruning old `sync_runs` rows took away
-- from the check that keeps a held-up webhook delivery out (schema 18).
--
-- The daemon deletes passes older than `[retention] keep_days` (README,
-- Database). A delivery held up for longer than that may have been covered
-- by one of them: a listing that showed its lead as mirrored, and wrote
-- nothing. Such a pass's row is gone, so its business keeps here the
-- newest `listed_at` of its pruned passes; a delivery of a lead of that
-- business whose event is older than it (by the listing margin), and whose
-- mirrored row was written before it, is kept out as if a pruned listing
-- had covered it. That may keep out a delivery no pruned listing covered:
-- one held up for longer than the retention, which the next listing of the
-- lead corrects. Never the other way round (a stale copy over a listing).
CREATE TABLE IF NOT EXISTS sync_runs_pruned (
    business_id     TEXT PRIMARY KEY,
    listed_through  TEXT NOT NULL     -- the newest listed_at of the business's pruned passes
);
-- Pruning keeps the newest pass of each business and kind; finding whether
-- a newer pass of the same kind exists must not read every later pass of
-- the business (a monthly full scan older than the retention, behind 30
-- days of head passes: ~10 s a batch without this index).
CREATE INDEX IF NOT EXISTS sync_runs_by_business_kind ON sync_runs (business_id, kind, id);
