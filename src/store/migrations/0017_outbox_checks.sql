-- The outbox's validating triggers since schema 17, after the checks of
-- 0003_outbox_checks.sql: those of 0013_outbox_checks.sql, with the years
-- checked on the time without its fraction. SQLite reads a fraction as one
-- floating-point number: one of more than 309 digits (RFC 3339 sets no
-- bound) read as no time at all, and the row was refused as outside the
-- years 0000-9999. A fraction never moves the whole seconds, so the year
-- in UTC is the one of the time without it.
SELECT RAISE(ABORT, 'outbox: negotiation_id must be text of digits (the lead''s negotiationID, like ''519153480500518912''), not a number or a blob')
 WHERE typeof(NEW.negotiation_id) = 'text' AND instr(NEW.negotiation_id, char(0)) > 0;
SELECT RAISE(ABORT, 'outbox: business_id must be a Thumbtack business id (a string of digits) or NULL')
 WHERE typeof(NEW.business_id) = 'text' AND instr(NEW.business_id, char(0)) > 0;
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at must be an RFC 3339 time with T and a zone, like 2024-06-14T09:30:00Z or 2024-06-14T11:30:00.250+02:00')
 WHERE typeof(NEW.partner_status_changed_at) = 'text' AND instr(NEW.partner_status_changed_at, char(0)) > 0;
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at is outside the years 0000-9999 once in UTC; Thumbtack takes none other (write the time in UTC, with Z)')
  FROM (SELECT NEW.partner_status_changed_at AS t)
 WHERE typeof(t) = 'text'
   AND substr(COALESCE(strftime('%Y-%m-%dT%H:%M:%SZ',
                   substr(t, 1, 19)
                   || CASE WHEN substr(t, 20, 1) = '.' THEN ltrim(substr(t, 21), '0123456789')
                           ELSE substr(t, 20) END), '-'), 1, 5)
       NOT GLOB '[0-9][0-9][0-9][0-9]-';
