-- leadsync schema, version 18 (after 0018_listing_confirmations.sql): the
-- passes of a business whose listing confirmed leads, by `listed_at`.
CREATE INDEX IF NOT EXISTS sync_runs_listed ON sync_runs (business_id, listed_at)
    WHERE listed_at IS NOT NULL;
