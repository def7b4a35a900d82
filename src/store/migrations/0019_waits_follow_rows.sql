-- Rows put aside behind a row wait for that row, not for its business
-- alone. Were the row that put them aside moved to another business or
-- negotiation, deleted, or taken out of `pending` (canceled by SQL, in
-- either table), its followers waited for that business for good: only
-- the business being allowed to send brought them back. Now that row and
-- the pending rows of its old negotiation put aside for the same value wait
-- for nothing; the next claim decides again, and puts back aside what still
-- must wait (a follower is never first in line while its leader is pending).

DROP TRIGGER IF EXISTS outbox_waits_follow_update;
CREATE TRIGGER outbox_waits_follow_update
  AFTER UPDATE OF negotiation_id, business_id, state ON outbox
  WHEN OLD.waiting_for IS NOT NULL
BEGIN
    UPDATE outbox
       SET waiting_for = NULL,
           last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
     WHERE id = NEW.id
        OR (negotiation_id = OLD.negotiation_id AND state = 'pending'
            AND waiting_for = OLD.waiting_for);
END;

DROP TRIGGER IF EXISTS outbox_waits_follow_delete;
CREATE TRIGGER outbox_waits_follow_delete AFTER DELETE ON outbox
  WHEN OLD.waiting_for IS NOT NULL
BEGIN
    UPDATE outbox SET waiting_for = NULL, last_error = NULL
     WHERE negotiation_id = OLD.negotiation_id AND state = 'pending'
       AND waiting_for = OLD.waiting_for;
END;

DROP TRIGGER IF EXISTS message_outbox_waits_follow_update;
CREATE TRIGGER message_outbox_waits_follow_update
  AFTER UPDATE OF negotiation_id, business_id, state ON message_outbox
  WHEN OLD.waiting_for IS NOT NULL
BEGIN
    UPDATE message_outbox
       SET waiting_for = NULL,
           last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
     WHERE id = NEW.id
        OR (negotiation_id = OLD.negotiation_id AND state = 'pending'
            AND waiting_for = OLD.waiting_for);
END;

DROP TRIGGER IF EXISTS message_outbox_waits_follow_delete;
CREATE TRIGGER message_outbox_waits_follow_delete AFTER DELETE ON message_outbox
  WHEN OLD.waiting_for IS NOT NULL
BEGIN
    UPDATE message_outbox SET waiting_for = NULL, last_error = NULL
     WHERE negotiation_id = OLD.negotiation_id AND state = 'pending'
       AND waiting_for = OLD.waiting_for;
END;

-- Rows already stranded so: every row put aside is decided again at the
-- next claim (those that must still wait are put back aside, not counted
-- as attempts), and a reply that left `pending` waits for nothing.
UPDATE outbox SET waiting_for = NULL WHERE waiting_for IS NOT NULL;
UPDATE message_outbox SET waiting_for = NULL WHERE waiting_for IS NOT NULL;
