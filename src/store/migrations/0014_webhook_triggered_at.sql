-- leadsync schema, version 14: `negotiations.webhook_triggered_at`, the
-- event time (`triggeredAt`, UTC) of the webhook delivery whose data the row
-- holds; NULL when a listing wrote it (or the delivery had no believable
-- time). A later delivery is compared with the event its copy came from, not
-- with the moment that copy was received: of two versions delivered out of
-- order, the one triggered later wins. Existing rows keep NULL (they are
-- compared by `changed_at`, as before).
ALTER TABLE negotiations ADD COLUMN webhook_triggered_at TEXT;
