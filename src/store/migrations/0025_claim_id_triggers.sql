-- Schema 25, made in any case (the columns may have been there already).
--
-- A row's claim_id cannot change while it is being sent (its outcome would
-- land nowhere, and the row would stay `sending` until the next start,
-- holding back its negotiation), like its attempts (schema 8).
CREATE TRIGGER IF NOT EXISTS {table}_claim_id_frozen BEFORE UPDATE OF claim_id ON {table}
  WHEN OLD.state = 'sending' AND NEW.state IS 'sending' AND NEW.claim_id IS NOT OLD.claim_id
BEGIN
    SELECT RAISE(ABORT, '{table}: claim_id cannot change while the row is being sent (state sending); wait for its outcome');
END;

-- AUTOINCREMENT keeps only the ids SQLite gives new. An id given with the
-- INSERT (`REPLACE INTO {table} (id, ...)` as an upsert, or a DELETE then an
-- INSERT with the old id) made a new row with the id of a row being sent or
-- sent long ago: it took that row's attempts log, and an outcome in flight
-- could land on it. An id given explicitly must be above every id used so
-- far (SQLite's sequence, and the largest id there is, for a statement
-- inserting several rows); one left out is SQLite's (NEW.id is -1 here).
CREATE TRIGGER IF NOT EXISTS {table}_id_never_reused BEFORE INSERT ON {table}
  WHEN NEW.id > 0
   AND (NEW.id <= COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0)
        OR NEW.id <= COALESCE((SELECT max(id) FROM {table}), 0))
BEGIN
    SELECT RAISE(ABORT, '{table}: a row''s id is never used again (its attempts log, and a send in flight, belong to the row that had it); leave id out, or give one above every id used so far');
END;

-- An id of 0 or below is never one SQLite gives: only an INSERT that gave it
-- made it, and the rule above cannot see it before the row is in (NEW.id
-- reads -1 there when SQLite chooses). Refused after the insert, in the
-- same statement.
CREATE TRIGGER IF NOT EXISTS {table}_id_positive AFTER INSERT ON {table}
  WHEN NEW.id <= 0
BEGIN
    SELECT RAISE(ABORT, '{table}: a row''s id is never used again (its attempts log, and a send in flight, belong to the row that had it); leave id out, or give one above every id used so far (and above 0)');
END;
