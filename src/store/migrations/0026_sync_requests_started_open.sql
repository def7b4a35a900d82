-- leadsync schema, version 26: an index of the requests that seem taken
-- (started, not finished). Every 10 s the daemon looks for such rows it did
-- not take itself (a program inserted them with started_at set): without
-- the index that was a scan of the whole table, finished rows included,
-- 100-200 ms at 300,000 rows on the one database thread. The index holds
-- only the few open rows.
CREATE INDEX IF NOT EXISTS sync_requests_started_open ON sync_requests(id)
    WHERE started_at IS NOT NULL AND finished_at IS NULL;
