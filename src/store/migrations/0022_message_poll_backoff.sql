-- leadsync schema, version 22: a lead whose message poll keeps failing is
-- polled less and less often. A lead that is no longer active is refused for
-- good ("history is for active leads": every lead canceled or closed), and
-- was polled again after every pass, forever. `failures` counts the failed
-- polls in a row (0 after a poll that succeeds); `next_poll_at` (UTC,
-- leadsync's form) is when a failed lead is polled again after a pass, NULL
-- meaning after the next pass. A lead found new or changed is polled at once
-- whatever its backoff. Rows from before count as one failure.
ALTER TABLE message_polls ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message_polls ADD COLUMN next_poll_at TEXT;
UPDATE message_polls SET failures = 1 WHERE outcome = 'error';

-- A message stored before its lead was mirrored (a customer's message names
-- no business) got no business_id; since this version the lead's insertion
-- gives it one. The rows stored before get theirs here. The partial index
-- tells a page of new leads at once whether any message waits for its
-- business (nearly always none: nothing to update per lead).
CREATE INDEX IF NOT EXISTS messages_without_business ON messages (negotiation_id)
 WHERE business_id IS NULL;
UPDATE messages
   SET business_id = (SELECT n.business_id FROM negotiations n
                       WHERE n.negotiation_id = messages.negotiation_id)
 WHERE business_id IS NULL
   AND EXISTS (SELECT 1 FROM negotiations n
                WHERE n.negotiation_id = messages.negotiation_id AND n.business_id IS NOT NULL);
