-- leadsync schema, version 25: `claim_id` on `outbox` and `message_outbox`,
-- a random number each claim writes as it marks the row `sending`. An
-- outcome is recorded only on the row whose claim_id is the claim's: the
-- attempt number alone did not tell one claim from the next when a
-- partner's program put a `sending` row back to pending and reset its
-- attempts ("send it again"); the next claim carried the same number, and
-- the first request's outcome was written over the second claim while that
-- was still in flight (the row said dead though Thumbtack had it).
ALTER TABLE outbox ADD COLUMN claim_id INTEGER;
ALTER TABLE message_outbox ADD COLUMN claim_id INTEGER;
