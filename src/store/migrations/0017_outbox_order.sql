-- leadsync schema, version 17 (after 0017_outbox_order_column.sql adds
-- changed_at_order, when the table lacks it): the order's indexes on the
-- exact instant, and the validating triggers (0017_outbox_checks.sql).
DROP INDEX IF EXISTS outbox_open_by_negotiation;
CREATE INDEX outbox_open_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
    WHERE state IN ('pending', 'sending');
DROP INDEX IF EXISTS outbox_sent_by_negotiation;
CREATE INDEX outbox_sent_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
    WHERE state = 'sent';

-- A pending row whose next_attempt_at is not a UTC time in the drainer's
-- form (written before schema 8 checked it): a BLOB or a word sorts after
-- every time, so the row was never due, and held back the later rows of
-- its negotiation for good. A time SQLite reads becomes that time in the
-- drainer's form (when it is one: not year 10000); anything else is due
-- now (as when left out). Rows in the form are left as they are.
UPDATE outbox
   SET next_attempt_at = COALESCE(
           (SELECT u FROM (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', next_attempt_at) AS u)
             WHERE typeof(next_attempt_at) = 'text'
               AND u GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
           strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
 WHERE state = 'pending' AND NOT COALESCE(typeof(next_attempt_at) = 'text'
       AND (next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(next_attempt_at, 21, length(next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND instr(next_attempt_at, char(0)) = 0
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(next_attempt_at, 1, 19)) = substr(next_attempt_at, 1, 19), 0);
UPDATE message_outbox
   SET next_attempt_at = COALESCE(
           (SELECT u FROM (SELECT strftime('%Y-%m-%dT%H:%M:%fZ', next_attempt_at) AS u)
             WHERE typeof(next_attempt_at) = 'text'
               AND u GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9]Z'),
           strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
 WHERE state = 'pending' AND NOT COALESCE(typeof(next_attempt_at) = 'text'
       AND (next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z'
            OR (next_attempt_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9]*Z'
                AND substr(next_attempt_at, 21, length(next_attempt_at) - 21) NOT GLOB '*[^0-9]*'))
       AND instr(next_attempt_at, char(0)) = 0
       AND strftime('%Y-%m-%dT%H:%M:%S', substr(next_attempt_at, 1, 19)) = substr(next_attempt_at, 1, 19), 0);
