-- leadsync schema, version 11: a business's present leads in one index, in
-- the order they were first seen, holding what a full scan reads of them:
-- the known leads before it (id, payload hash, last_seen_at) and the
-- unlisted ones after it (count_unseen, mark_missing). Those three reads
-- went through negotiations_by_business to every lead's table row, ~40% of
-- an unchanged re-sync's CPU (README, "Performance"); now they read the
-- index alone. Cheap to keep: a business's new leads are appended to its
-- part of the index (first_seen_at only grows), and last_seen_at changes at
-- most hourly per lead. missing_since (always NULL here, one byte) is in it
-- so that SQLite sees the reads covered and never seeks the table row.
CREATE INDEX IF NOT EXISTS negotiations_present_by_business
    ON negotiations (business_id, first_seen_at, negotiation_id, payload_hash, last_seen_at,
                     missing_since)
    WHERE missing_since IS NULL;
