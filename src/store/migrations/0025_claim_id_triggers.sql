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

-- A new row is pending (schema 8): it has no claim's number either. A
-- claim writes its own over any, but a row that came with one would look
-- claimed to whoever reads the table.
CREATE TRIGGER IF NOT EXISTS {table}_new_row_no_claim_id BEFORE INSERT ON {table}
  WHEN NEW.claim_id IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, '{table}: a new row is pending: leave claim_id out (each claim writes its own)');
END;

-- AUTOINCREMENT keeps only the ids SQLite gives new. An id given with the
-- INSERT (`REPLACE INTO {table} (id, ...)` as an upsert, or a DELETE then an
-- INSERT with the old id) made a new row with the id of a row being sent or
-- sent long ago: it took that row's attempts log, and an outcome in flight
-- could land on it. A row inserted must have an id above 0 and above
-- SQLite's mark for the table (sqlite_sequence: the highest id ever in it).
--
-- After the insert, not before: a BEFORE INSERT rule runs before SQLite
-- resolves a conflict, so it refused `INSERT OR IGNORE` and `ON CONFLICT
-- (id) DO NOTHING / DO UPDATE` of an id already there (which make no new
-- row: no INSERT trigger fires for them), aborting the whole statement.
-- SQLite writes sqlite_sequence at the end of each statement, so here it
-- holds the mark from before the statement: several new ids in one
-- statement go in in any order. A REPLACE of a row there fires this after
-- deleting it, and is refused with the whole statement.
--
-- A table with no row in sqlite_sequence (never inserted into, or a
-- partner's edit deleted it): the mark is the highest id of the other rows,
-- until SQLite writes the sequence again at the end of the next insert
-- (several new ids in one statement must then rise). The upgrade writes
-- the mark of each table (at least its highest id), so only such an edit
-- leaves one without.
INSERT INTO sqlite_sequence (name, seq)
SELECT '{table}', COALESCE((SELECT max(id) FROM {table}), 0)
 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = '{table}');
UPDATE sqlite_sequence SET seq = (SELECT max(id) FROM {table})
 WHERE name = '{table}' AND seq < (SELECT max(id) FROM {table});
CREATE TRIGGER IF NOT EXISTS {table}_id_never_reused AFTER INSERT ON {table}
  WHEN NEW.id <= 0
    OR NEW.id <= COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{table}'),
                          (SELECT max(id) FROM {table} WHERE id <> NEW.id), 0)
BEGIN
    SELECT RAISE(ABORT, '{table}: a row''s id is never used again (its attempts log, and a send in flight, belong to the row that had it); leave id out, or give one above 0 and above every id used so far');
END;
