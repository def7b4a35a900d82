-- leadsync schema, version 17 (after 0017_outbox_order_column.sql adds
-- changed_at_order, when the table lacks it): the order's indexes on the
-- exact instant, and the validating triggers (0017_outbox_checks.sql).
DROP INDEX IF EXISTS outbox_open_by_negotiation;
CREATE INDEX outbox_open_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
    WHERE state IN ('pending', 'sending');
DROP INDEX IF EXISTS outbox_sent_by_negotiation;
CREATE INDEX outbox_sent_by_negotiation ON outbox (negotiation_id, changed_at_order, id)
    WHERE state = 'sent';
