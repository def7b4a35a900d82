-- leadsync schema 20, per outbox table (`{table}`: `outbox`, then
-- `message_outbox`; src/store/mod.rs fills it in, before
-- 0020_waits_follow_rows.sql): rows put aside follow the row that put
-- them aside (see that file).

DROP TRIGGER IF EXISTS {table}_waits_follow_update;
CREATE TRIGGER {table}_waits_follow_update
  AFTER UPDATE OF negotiation_id, business_id, state ON {table}
  WHEN OLD.waiting_for IS NOT NULL
   AND (NEW.state IS NOT OLD.state OR NEW.business_id IS NOT OLD.business_id
        OR NEW.negotiation_id IS NOT OLD.negotiation_id)
BEGIN
    UPDATE {table}
       SET waiting_for = NULL,
           last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
     WHERE id = NEW.id
        OR (negotiation_id = OLD.negotiation_id AND state = 'pending'
            AND waiting_for = OLD.waiting_for);
END;

DROP TRIGGER IF EXISTS {table}_waits_follow_delete;
CREATE TRIGGER {table}_waits_follow_delete AFTER DELETE ON {table}
  WHEN OLD.waiting_for IS NOT NULL
BEGIN
    UPDATE {table} SET waiting_for = NULL, last_error = NULL
     WHERE negotiation_id = OLD.negotiation_id AND state = 'pending'
       AND waiting_for = OLD.waiting_for;
END;
