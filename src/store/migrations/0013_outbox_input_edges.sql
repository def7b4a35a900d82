-- leadsync schema, version 13: the outboxes' input checks at their edges.
--
-- SQLite's GLOB stops at a NUL character: a negotiation_id or business_id
-- of digits, a NUL, then anything ('519' || char(0) || 'abc') passed the
-- "text of digits" checks of both outboxes. The outbox's validating
-- triggers are made again by the migration runner with the checks of
-- 0013_outbox_checks.sql added (which also refuse an instant outside the
-- years 0000-9999 in UTC); message_outbox gets the same NUL checks here,
-- with the messages its own triggers give (0007_messages.sql). Each
-- trigger is dropped first, so that the script can run again.

DROP TRIGGER IF EXISTS message_outbox_ids_without_nul_insert;
CREATE TRIGGER message_outbox_ids_without_nul_insert BEFORE INSERT ON message_outbox
  WHEN (typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0)
    OR (typeof(NEW.business_id) = 'text' AND instr(NEW.business_id, char(0)) > 0)
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: negotiation_id must be the lead''s negotiationID as text of digits (quote it: ''519153480500518912'')')
     WHERE typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0;
    SELECT RAISE(ABORT, 'message_outbox: business_id must be a Thumbtack business id (text of digits) or NULL');
END;

DROP TRIGGER IF EXISTS message_outbox_ids_without_nul_update;
CREATE TRIGGER message_outbox_ids_without_nul_update BEFORE UPDATE OF negotiation_id, business_id
    ON message_outbox
  WHEN (typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0)
    OR (typeof(NEW.business_id) = 'text' AND instr(NEW.business_id, char(0)) > 0)
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: negotiation_id must be the lead''s negotiationID as text of digits (quote it: ''519153480500518912'')')
     WHERE typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0;
    SELECT RAISE(ABORT, 'message_outbox: business_id must be a Thumbtack business id (text of digits) or NULL');
END;

-- The same NUL let anything follow a UTC time in next_attempt_at (schema
-- 8's check): refused with that check's message.
DROP TRIGGER IF EXISTS outbox_next_attempt_at_without_nul_insert;
CREATE TRIGGER outbox_next_attempt_at_without_nul_insert BEFORE INSERT ON outbox
  WHEN typeof(NEW.next_attempt_at) = 'text' AND instr(NEW.next_attempt_at, char(0)) > 0
BEGIN
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
DROP TRIGGER IF EXISTS outbox_next_attempt_at_without_nul_update;
CREATE TRIGGER outbox_next_attempt_at_without_nul_update BEFORE UPDATE OF next_attempt_at ON outbox
  WHEN NEW.next_attempt_at IS NOT OLD.next_attempt_at
   AND typeof(NEW.next_attempt_at) = 'text' AND instr(NEW.next_attempt_at, char(0)) > 0
BEGIN
    SELECT RAISE(ABORT, 'outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
DROP TRIGGER IF EXISTS message_outbox_next_attempt_at_without_nul_insert;
CREATE TRIGGER message_outbox_next_attempt_at_without_nul_insert BEFORE INSERT ON message_outbox
  WHEN typeof(NEW.next_attempt_at) = 'text' AND instr(NEW.next_attempt_at, char(0)) > 0
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
DROP TRIGGER IF EXISTS message_outbox_next_attempt_at_without_nul_update;
CREATE TRIGGER message_outbox_next_attempt_at_without_nul_update BEFORE UPDATE OF next_attempt_at ON message_outbox
  WHEN NEW.next_attempt_at IS NOT OLD.next_attempt_at
   AND typeof(NEW.next_attempt_at) = 'text' AND instr(NEW.next_attempt_at, char(0)) > 0
BEGIN
    SELECT RAISE(ABORT, 'message_outbox: next_attempt_at must be a UTC time like 2024-06-14T09:30:00Z (or 2024-06-14T09:30:00.250Z); leave it out to send now');
END;
