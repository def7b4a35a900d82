-- leadsync schema, version 16: sync_requests.business_id at its edges.
--
-- SQLite's GLOB stops at a NUL character: '12' || char(0) || 'abc' passed
-- the table's "text of digits" CHECK (0005_sync_requests.sql), and so did a
-- BLOB of digit bytes. The daemon refused such a request, but with an error
-- holding the NUL, which sqlite3 and most drivers cut there: "business 12 is
-- not in the configuration" for a business that is. Refused here at INSERT
-- and UPDATE, as schema 13 did for the outboxes.
--
-- Triggers, not a new CHECK: a CHECK needs the table rebuilt, which drops
-- the triggers and indexes a partner put on it and would fail on a row
-- already written this way. Rows written before this version stay; the
-- daemon refuses them one by one when it reads them (store/requests.rs).
-- Each trigger is dropped first, so that the script can run again.

DROP TRIGGER IF EXISTS sync_requests_business_id_insert;
CREATE TRIGGER sync_requests_business_id_insert BEFORE INSERT ON sync_requests
  WHEN NEW.business_id IS NOT NULL
   AND (typeof(NEW.business_id) <> 'text' OR instr(NEW.business_id, char(0)) > 0)
BEGIN
    SELECT RAISE(ABORT, 'sync_requests: business_id must be a Thumbtack business id as quoted text of digits (like ''468046965846925323''), or NULL for every business');
END;

DROP TRIGGER IF EXISTS sync_requests_business_id_update;
CREATE TRIGGER sync_requests_business_id_update BEFORE UPDATE OF business_id ON sync_requests
  WHEN NEW.business_id IS NOT NULL
   AND (typeof(NEW.business_id) <> 'text' OR instr(NEW.business_id, char(0)) > 0)
BEGIN
    SELECT RAISE(ABORT, 'sync_requests: business_id must be a Thumbtack business id as quoted text of digits (like ''468046965846925323''), or NULL for every business');
END;
