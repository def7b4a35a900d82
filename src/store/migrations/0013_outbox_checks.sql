-- Added to the outbox's validating triggers by schema 13, after the checks
-- of 0003_outbox_checks.sql (so a time that is not RFC 3339 gets that
-- message first).
--
-- SQLite's GLOB stops at a NUL, so '519' || char(0) || 'abc' passed the
-- digits checks above, and '...+02:00' || char(0) || 'x' the zone's:
-- refused with their messages.
SELECT RAISE(ABORT, 'outbox: negotiation_id must be text of digits (the lead''s negotiationID, like ''519153480500518912''), not a number or a blob')
 WHERE typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0;
SELECT RAISE(ABORT, 'outbox: business_id must be a Thumbtack business id (a string of digits) or NULL')
 WHERE typeof(NEW.business_id) = 'text' AND instr(NEW.business_id, char(0)) > 0;
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at must be an RFC 3339 time with T and a zone, like 2024-06-14T09:30:00Z or 2024-06-14T11:30:00.250+02:00')
 WHERE typeof(NEW.partner_status_changed_at) = 'text' AND instr(NEW.partner_status_changed_at, char(0)) > 0;
-- A year 0000 time east of UTC, or a year 9999 time west of it, is another
-- year in UTC (-0001, 10000): no RFC 3339 form to send it in. The checks
-- above passed, so strftime reads the time unless its UTC year leaves
-- 0000-9999 (it answers NULL or a year that is not four digits).
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at is outside the years 0000-9999 once in UTC; Thumbtack takes none other (write the time in UTC, with Z)')
 WHERE typeof(NEW.partner_status_changed_at) = 'text'
   AND substr(COALESCE(strftime('%Y-%m-%dT%H:%M:%fZ', NEW.partner_status_changed_at), '-'), 1, 5)
       NOT GLOB '[0-9][0-9][0-9][0-9]-';
