-- leadsync schema, version 24: a lead whose message poll keeps failing is
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

-- The indexes and the messages' backfill: 0024_message_indexes_and_backfill.sql
-- (run even when these columns exist already).
