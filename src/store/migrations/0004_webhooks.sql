-- leadsync schema, version 4: webhooks (SPEC §8) and messages (SPEC §9).

-- Where an observed change came from: 'poll' (a listing) or 'webhook'
-- (a NegotiationCreatedV4 delivery). Rows written before this version were polled.
ALTER TABLE negotiation_changes ADD COLUMN source TEXT NOT NULL DEFAULT 'poll';

-- Every accepted webhook delivery, exactly as received, with what it did.
CREATE TABLE webhook_events (
    id              INTEGER PRIMARY KEY,
    received_at     TEXT NOT NULL,
    event_type      TEXT NOT NULL,            -- event.eventType
    webhook_id      TEXT,                     -- event.webhookID
    triggered_at    TEXT,                     -- event.triggeredAt, as sent
    business_id     TEXT,
    negotiation_id  TEXT,
    message_id      TEXT,
    payload         TEXT NOT NULL,            -- the request body exactly as received
    outcome         TEXT NOT NULL CHECK (outcome IN ('applied', 'duplicate', 'ignored', 'unknown_business')),
    error           TEXT                      -- why a delivery was ignored, when it was not just another event type
);
CREATE INDEX webhook_events_by_negotiation ON webhook_events (negotiation_id)
    WHERE negotiation_id IS NOT NULL;

-- One row per message (SPEC §9); a message may arrive before its negotiation.
CREATE TABLE messages (
    message_id      TEXT PRIMARY KEY,
    negotiation_id  TEXT NOT NULL,
    business_id     TEXT,
    sent_at         TEXT,                     -- UTC
    sender          TEXT,                     -- Customer / Business
    text            TEXT,
    payload         TEXT NOT NULL,            -- the message object exactly as received
    source          TEXT NOT NULL CHECK (source IN ('webhook', 'poll')),
    first_seen_at   TEXT NOT NULL
);
CREATE INDEX messages_by_negotiation ON messages (negotiation_id, sent_at);
