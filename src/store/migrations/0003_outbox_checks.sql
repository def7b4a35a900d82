-- Body of the outbox's validating triggers since schema version 3: bad rows
-- are rejected when they are written, with messages a person can act on.
SELECT RAISE(ABORT, 'outbox: negotiation_id is required (the lead''s negotiationID, as text)')
 WHERE NEW.negotiation_id IS NULL OR (typeof(NEW.negotiation_id) = 'text' AND trim(NEW.negotiation_id) = '');
SELECT RAISE(ABORT, 'outbox: negotiation_id must be text of digits (the lead''s negotiationID, like ''519153480500518912''), not a number or a blob')
 WHERE typeof(NEW.negotiation_id) <> 'text' OR NEW.negotiation_id GLOB '*[^0-9]*';
SELECT RAISE(ABORT, 'outbox: business_id must be a Thumbtack business id (a string of digits) or NULL')
 WHERE NEW.business_id IS NOT NULL
   AND (typeof(NEW.business_id) <> 'text' OR NEW.business_id = '' OR NEW.business_id GLOB '*[^0-9]*');
SELECT RAISE(ABORT, 'outbox: status must be one of not_scheduled, appt_scheduled, job_complete, invoice_paid, customer_cancel, pro_cancel')
 WHERE NEW.status IS NULL OR typeof(NEW.status) <> 'text'
    OR NEW.status NOT IN ('not_scheduled', 'appt_scheduled', 'job_complete', 'invoice_paid', 'customer_cancel', 'pro_cancel');
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at is required: when the status changed on your platform, RFC 3339 with a zone (2024-06-14T09:30:00Z)')
 WHERE NEW.partner_status_changed_at IS NULL;
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at must be an RFC 3339 time with T and a zone, like 2024-06-14T09:30:00Z or 2024-06-14T11:30:00.250+02:00')
  FROM (SELECT t,
               CASE WHEN substr(t, 20, 1) = '.' THEN ltrim(substr(t, 21), '0123456789')
                    ELSE substr(t, 20) END AS zone
          FROM (SELECT NEW.partner_status_changed_at AS t))
 -- COALESCE: any NULL on the way (strftime of a non-time) means "not valid"
 WHERE NOT COALESCE((
       typeof(t) = 'text'
   AND substr(t, 1, 19) GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]'
   -- a real date and time: normalising must not change it (rejects Feb 30, 24:00, :60)
   AND strftime('%Y-%m-%dT%H:%M:%S', substr(t, 1, 19), '+0 seconds') = substr(t, 1, 19)
   -- a fraction, when present, has at least one digit
   AND (substr(t, 20, 1) <> '.' OR length(zone) < length(substr(t, 21)))
   -- then the zone, and nothing after it
   AND (zone = 'Z'
        OR (zone GLOB '[+-][0-2][0-9]:[0-5][0-9]' AND CAST(substr(zone, 2, 2) AS INTEGER) <= 23))
 ), 0);
SELECT RAISE(ABORT, 'outbox: partner_status_changed_at has a zone offset beyond +14:00/-14:00; no place on Earth uses one (write the time in UTC, with Z)')
 WHERE substr(NEW.partner_status_changed_at, -6, 1) IN ('+', '-')
   AND CAST(substr(NEW.partner_status_changed_at, -5, 2) AS INTEGER) * 60
       + CAST(substr(NEW.partner_status_changed_at, -2, 2) AS INTEGER) > 14 * 60;
SELECT RAISE(ABORT, 'outbox: invoice_amount_in_cents must be a whole number of cents')
 WHERE NEW.invoice_amount_in_cents IS NOT NULL AND typeof(NEW.invoice_amount_in_cents) <> 'integer';
SELECT RAISE(ABORT, 'outbox: invoice_amount_in_cents must not be negative')
 WHERE NEW.invoice_amount_in_cents < 0;
SELECT RAISE(ABORT, 'outbox: invoice_amount_in_cents is only allowed with status job_complete or invoice_paid')
 WHERE NEW.invoice_amount_in_cents IS NOT NULL AND NEW.status NOT IN ('job_complete', 'invoice_paid');
