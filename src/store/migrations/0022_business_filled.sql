-- leadsync schema, version 22: `business_filled` on `outbox` and
-- `message_outbox`, 1 while the row's `business_id` is one a claim filled in
-- from the mirror (the partner wrote NULL: "the lead's business"), else 0.
-- The claim writes the business into the row as it leaves `pending`; a row
-- that goes back to pending (a retry, a hold, dead, or `sending` left by a
-- process that died and recovered at the next start) gets NULL back, so its
-- next claim takes the lead's business again, whichever it is by then. Only
-- a sent row keeps the business it was sent under. Before this schema the
-- recovery at start could not tell a filled-in business from the
-- partner's, and kept it: rows claimed before it say 0.
ALTER TABLE outbox ADD COLUMN business_filled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message_outbox ADD COLUMN business_filled INTEGER NOT NULL DEFAULT 0;
