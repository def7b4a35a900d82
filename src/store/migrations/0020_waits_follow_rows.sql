-- Rows put aside behind a row wait for that row, not for its business
-- alone. Were the row that put them aside moved to another business or
-- negotiation, deleted, or taken out of `pending` (canceled by SQL, in
-- either table), its followers waited for that business for good: only
-- the business being allowed to send brought them back. Now that row and
-- the pending rows of its old negotiation put aside for the same value wait
-- for nothing; the next claim decides again, and puts back aside what still
-- must wait (a follower is never first in line while its leader is pending).
-- The triggers, one pair per table: 0020_waits_follow_triggers.sql.

-- Rows already stranded so: a pending row waits on only while its
-- negotiation has a pending row of the business it waits for at or before
-- it in order (itself, or the row that put it aside; a row that names no
-- business may be of any, a row with no place in the order may be first);
-- the others wait for nothing, decided again at the next claim. Every row
-- freed so was stranded: the rows still aside stay aside, and a claim
-- after the upgrade walks only the few freed (freeing every row made the
-- first claim put back aside each negotiation's head, one by one, under
-- the write lock). A row that left `pending` waits for nothing.
UPDATE outbox
   SET waiting_for = NULL,
       last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
 WHERE waiting_for IS NOT NULL
   AND (state IS NOT 'pending'
        OR NOT EXISTS (SELECT 1 FROM outbox l
                        WHERE l.negotiation_id = outbox.negotiation_id
                          AND l.waiting_for = outbox.waiting_for AND l.state = 'pending'
                          AND (l.business_id = outbox.waiting_for OR l.business_id IS NULL)
                          AND NOT COALESCE(l.changed_at_order > outbox.changed_at_order
                                           OR (l.changed_at_order = outbox.changed_at_order
                                               AND l.id > outbox.id), 0)));
UPDATE message_outbox
   SET waiting_for = NULL,
       last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
 WHERE waiting_for IS NOT NULL
   AND (state IS NOT 'pending'
        OR NOT EXISTS (SELECT 1 FROM message_outbox l
                        WHERE l.negotiation_id = message_outbox.negotiation_id
                          AND l.waiting_for = message_outbox.waiting_for AND l.state = 'pending'
                          AND (l.business_id = message_outbox.waiting_for OR l.business_id IS NULL)
                          AND l.id <= message_outbox.id));
