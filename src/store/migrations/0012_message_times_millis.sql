-- leadsync schema, version 12: `messages.sent_at` with milliseconds, as
-- `negotiations.created_at` got in version 9 and as every leadsync time has,
-- so that text order is time order: a message sent on a whole second
-- ("…:00Z", as a server trimming trailing zeros sends it) sorted after one
-- sent later in the same second ("…:00.500Z"), and after a reply queued in
-- `message_outbox` at "…:00.000Z". Stored times had no fraction or 3, 6 or
-- 9 digits; only those without one change. Payloads are untouched.
UPDATE messages SET sent_at = substr(sent_at, 1, 19) || '.000Z'
 WHERE sent_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z';
