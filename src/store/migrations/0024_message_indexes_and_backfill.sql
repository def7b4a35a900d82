-- leadsync schema, version 24 (second part; idempotent: run whenever
-- version 24 is applied, also over a schema that has its columns).
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

-- The failed polls whose wait is over, found without walking every failed
-- poll of the business (the leads no longer active stay refused for good).
CREATE INDEX IF NOT EXISTS message_polls_due ON message_polls (business_id, next_poll_at)
 WHERE outcome = 'error';
