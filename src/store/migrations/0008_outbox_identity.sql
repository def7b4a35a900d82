-- leadsync schema, version 8: a row being sent keeps its identity (review r11).
--
-- The drainer records an outcome on the row it sent, found by its id and its
-- attempt number (the claim's). A partner's program that renumbered a
-- `sending` row, or reset its attempts, made the outcome land nowhere: the
-- row stayed `sending` until the next start and held back every later row
-- of its negotiation. Both tables refuse it; an id never changes at all (the
-- attempts log refers to it, and ids give replies their order).

CREATE TRIGGER outbox_id_frozen BEFORE UPDATE OF id ON outbox
  WHEN NEW.id IS NOT OLD.id
BEGIN
    SELECT RAISE(ABORT, 'outbox: a row''s id never changes (its attempts refer to it); to replace a row, cancel it and insert a new one');
END;

CREATE TRIGGER outbox_claim_frozen BEFORE UPDATE OF attempts ON outbox
  WHEN OLD.state = 'sending' AND NEW.state IS 'sending' AND NEW.attempts IS NOT OLD.attempts
BEGIN
    SELECT RAISE(ABORT, 'outbox: attempts cannot change while the row is being sent (state sending); wait for its outcome');
END;

CREATE TRIGGER message_outbox_id_frozen BEFORE UPDATE OF id ON message_outbox
  WHEN NEW.id IS NOT OLD.id
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: a row''s id never changes (its attempts refer to it, and ids are the order of replies); to replace a reply, cancel it and insert a new one');
END;

CREATE TRIGGER message_outbox_claim_frozen BEFORE UPDATE OF attempts ON message_outbox
  WHEN OLD.state = 'sending' AND NEW.state IS 'sending' AND NEW.attempts IS NOT OLD.attempts
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: attempts cannot change while the row is being sent (state sending); wait for its outcome');
END;

-- A new transition is pending, like a new reply (0007): a row inserted
-- `sending` sat there until the next start, and one inserted with
-- `waiting_for` naming a business that is not waiting was outside every
-- claim for good; both held back the later transitions of their negotiation.
CREATE TRIGGER outbox_new_row_pending BEFORE INSERT ON outbox
  WHEN NEW.state IS NOT 'pending' OR NEW.attempts IS NOT 0 OR NEW.sent_at IS NOT NULL
    OR NEW.sending_since IS NOT NULL OR NEW.late IS NOT 0 OR NEW.waiting_for IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, 'outbox: a new row is pending: leave state, attempts, sent_at, sending_since, late and waiting_for out');
END;

-- `next_attempt_at` is compared as text with the drainer's clock (UTC, `Z`,
-- milliseconds). 'tomorrow' made a row never due, silently holding back the
-- later rows of its negotiation; '2030-01-01 09:00:00' (a space) made it due
-- at once. Only a UTC time in that form is taken (fraction optional); an
-- UPDATE that leaves the value as it was (the drainer's bookkeeping on a row
-- written before this rule) is not refused.
CREATE TRIGGER outbox_next_attempt_at_insert BEFORE INSERT ON outbox
  WHEN NOT COALESCE(typeof(NEW.next_attempt_at) = 'text'
       AND (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(NEW.next_attempt_at, 21, length(NEW.next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(NEW.next_attempt_at, 1, 19)) = substr(NEW.next_attempt_at, 1, 19), 0)
BEGIN
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
CREATE TRIGGER outbox_next_attempt_at_update BEFORE UPDATE OF next_attempt_at ON outbox
  WHEN NEW.next_attempt_at IS NOT OLD.next_attempt_at AND NOT COALESCE(typeof(NEW.next_attempt_at) = 'text'
       AND (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(NEW.next_attempt_at, 21, length(NEW.next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(NEW.next_attempt_at, 1, 19)) = substr(NEW.next_attempt_at, 1, 19), 0)
BEGIN
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
CREATE TRIGGER message_outbox_next_attempt_at_insert BEFORE INSERT ON message_outbox
  WHEN NOT COALESCE(typeof(NEW.next_attempt_at) = 'text'
       AND (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(NEW.next_attempt_at, 21, length(NEW.next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(NEW.next_attempt_at, 1, 19)) = substr(NEW.next_attempt_at, 1, 19), 0)
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
CREATE TRIGGER message_outbox_next_attempt_at_update BEFORE UPDATE OF next_attempt_at ON message_outbox
  WHEN NEW.next_attempt_at IS NOT OLD.next_attempt_at AND NOT COALESCE(typeof(NEW.next_attempt_at) = 'text'
       AND (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (NEW.next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(NEW.next_attempt_at, 21, length(NEW.next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(NEW.next_attempt_at, 1, 19)) = substr(NEW.next_attempt_at, 1, 19), 0)
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;

-- Only a claim makes a row `sending` (from pending, counting the attempt and
-- stamping sending_since): a row set to `sending` by hand sat there until
-- the next start, holding back the later rows of its negotiation.
CREATE TRIGGER outbox_sending_by_claim BEFORE UPDATE OF state ON outbox
  WHEN NEW.state IS 'sending' AND OLD.state IS NOT 'sending'
   AND (OLD.state IS NOT 'pending' OR NEW.attempts IS NOT OLD.attempts + 1 OR NEW.sending_since IS NULL)
BEGIN
    SELECT RAISE(ABORT, 'outbox: only leadsync sets a row to sending (as it sends it); set pending to send a row again');
END;
CREATE TRIGGER message_outbox_sending_by_claim BEFORE UPDATE OF state ON message_outbox
  WHEN NEW.state IS 'sending' AND OLD.state IS NOT 'sending'
   AND (OLD.state IS NOT 'pending' OR NEW.attempts IS NOT OLD.attempts + 1 OR NEW.sending_since IS NULL)
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: only leadsync sets a row to sending (as it sends it); set pending to send a row again');
END;
