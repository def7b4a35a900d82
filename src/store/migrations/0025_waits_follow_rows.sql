-- Schema 25: schema 20's rule over rows put aside (0020_waits_follow_rows.sql),
-- run again, in one pass. That rule asked, of each row aside, whether its
-- negotiation had a pending row of the business it waits for at or before
-- it: a search of the negotiation per row, so the square of the rows aside
-- per negotiation (40,000 rows stranded in 50 negotiations: 114 s; this
-- pass: 3 s, debug build, with the update of the rows freed). Here
-- each negotiation's rows aside for one business are sorted once, in order,
-- and a row stays aside when a row of that business (or of none) is at or
-- before it: a running maximum. A row with no place in the order may be
-- first, and any row may be first before it (as in schema 20). The rows kept
-- aside are read before any is changed.
UPDATE outbox
   SET waiting_for = NULL,
       last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
 WHERE waiting_for IS NOT NULL
   AND (state IS NOT 'pending'
        OR id NOT IN (
            SELECT id FROM (
                SELECT id, changed_at_order AS at,
                       max(leads AND changed_at_order IS NULL) OVER w AS unordered_lead,
                       max(leads) OVER w AS any_lead,
                       max(leads AND changed_at_order IS NOT NULL)
                           OVER (w ORDER BY changed_at_order, id ROWS UNBOUNDED PRECEDING)
                           AS lead_before
                  FROM (SELECT id, negotiation_id, waiting_for, changed_at_order,
                               (business_id = waiting_for OR business_id IS NULL) AS leads
                          FROM outbox
                         WHERE waiting_for IS NOT NULL AND state = 'pending')
                WINDOW w AS (PARTITION BY negotiation_id, waiting_for))
             WHERE unordered_lead OR (at IS NULL AND any_lead) OR (at IS NOT NULL AND lead_before)));
UPDATE message_outbox
   SET waiting_for = NULL,
       last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
 WHERE waiting_for IS NOT NULL
   AND (state IS NOT 'pending'
        OR id NOT IN (
            SELECT id FROM (
                SELECT id,
                       max(business_id = waiting_for OR business_id IS NULL)
                           OVER (PARTITION BY negotiation_id, waiting_for ORDER BY id
                                 ROWS UNBOUNDED PRECEDING) AS lead_before
                  FROM message_outbox
                 WHERE waiting_for IS NOT NULL AND state = 'pending')
             WHERE lead_before));
