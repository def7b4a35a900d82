-- leadsync schema, version 23: `wait_rebased_at` on `outbox_attempts` and
-- `message_outbox_attempts`: the wall-clock time at which the wait
-- leadsync set after this attempt was counted again from now, because the
-- attempt was logged under a clock ahead (outbox::rebase_future_waits);
-- NULL otherwise. A later rebase counts from it, not from the attempt
-- again: recounted from the attempt each time the clock is seen back, a
-- wait would shorten at every look (a 60 min `Retry-After` under a clock
-- 10 min ahead: due 61 min after the first look, then 53, 46, ...).
ALTER TABLE outbox_attempts ADD COLUMN wait_rebased_at TEXT;
ALTER TABLE message_outbox_attempts ADD COLUMN wait_rebased_at TEXT;
