-- leadsync schema, version 3: the outbox at its edges (issue 11).
--
-- The table is rebuilt (SQLite cannot add AUTOINCREMENT in place) so that a
-- row id is never reused: a deleted-and-reinserted id must not inherit the
-- outcome of an old send. Every row keeps its id, state, attempts and
-- history; `outbox_attempts` keeps pointing at the same ids (the runner turns
-- foreign keys off around the rebuild, so dropping the old table deletes no
-- attempt, and checks them before committing).
CREATE TABLE outbox_v3 (
    id                        INTEGER PRIMARY KEY AUTOINCREMENT,
    negotiation_id            TEXT NOT NULL,
    business_id               TEXT,
    status                    TEXT NOT NULL,
    partner_status_changed_at TEXT NOT NULL,
    invoice_amount_in_cents   INTEGER,
    state                     TEXT NOT NULL DEFAULT 'pending'
                              CHECK (state IN ('pending', 'sending', 'sent', 'dead', 'canceled')),
    attempts                  INTEGER NOT NULL DEFAULT 0,
    next_attempt_at           TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_error                TEXT,
    last_http_status          INTEGER,
    last_trace_id             TEXT,
    created_at                TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at                   TEXT,
    sending_since             TEXT,
    -- 1: sent after a later transition of the same negotiation had already
    -- been sent (inserted late, or retried after being dead)
    late                      INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1)),
    -- while set, the row waits for this business (not configured, disabled,
    -- needs re-authorization, OAuth client refused); last_error says why
    waiting_for               TEXT,
    -- the instant in UTC, for ordering rows given in different zones; only
    -- date-shaped text is evaluated, so that a bad value ('now') reaches the
    -- validating trigger instead of failing here
    changed_at_utc            TEXT GENERATED ALWAYS AS
                              (CASE WHEN partner_status_changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*'
                                    THEN strftime('%Y-%m-%dT%H:%M:%fZ', partner_status_changed_at) END) VIRTUAL
);
INSERT INTO outbox_v3 (id, negotiation_id, business_id, status, partner_status_changed_at,
        invoice_amount_in_cents, state, attempts, next_attempt_at, last_error, last_http_status,
        last_trace_id, created_at, sent_at, sending_since)
    SELECT id, negotiation_id, business_id, status, partner_status_changed_at,
        invoice_amount_in_cents, state, attempts, next_attempt_at, last_error, last_http_status,
        last_trace_id, created_at, sent_at, sending_since
      FROM outbox ORDER BY id;
DROP TABLE outbox;
ALTER TABLE outbox_v3 RENAME TO outbox;

-- What a claim walks: due rows that wait for nothing. Rows waiting for their
-- business are outside it, so 100,000 of them cost a claim nothing.
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE state = 'pending' AND waiting_for IS NULL;
CREATE INDEX outbox_open_by_negotiation ON outbox (negotiation_id, changed_at_utc, id)
    WHERE state IN ('pending', 'sending');
-- Is a row late? (an already-sent row of its negotiation with a later instant)
CREATE INDEX outbox_sent_by_negotiation ON outbox (negotiation_id, changed_at_utc, id)
    WHERE state = 'sent';
CREATE INDEX outbox_by_state ON outbox (state, id);
-- Rows put aside for a business, and rows to put aside when it starts waiting.
CREATE INDEX outbox_waiting ON outbox (waiting_for) WHERE waiting_for IS NOT NULL;
-- Is a row behind a row put aside? A probe into this (small) index, made for
-- every row a claim walks, instead of reading its negotiation's open rows.
CREATE INDEX outbox_waiting_by_negotiation ON outbox (negotiation_id) WHERE waiting_for IS NOT NULL;
CREATE INDEX outbox_ready_by_business ON outbox (business_id)
    WHERE state = 'pending' AND waiting_for IS NULL;

-- Businesses whose rows are put aside, and why: compared with the drainer's
-- view at each change, so rows come back as soon as their business may send.
CREATE TABLE outbox_waits (
    business_id TEXT PRIMARY KEY,
    reason      TEXT NOT NULL,
    since       TEXT NOT NULL
);

-- A row that leaves `pending` (canceled, sent...) waits for nothing: were
-- it put back to pending by hand, it must be due, not aside for good.
CREATE TRIGGER outbox_left_pending AFTER UPDATE OF state ON outbox
  WHEN NEW.state <> 'pending' AND NEW.waiting_for IS NOT NULL
BEGIN
    UPDATE outbox SET waiting_for = NULL WHERE id = NEW.id;
END;

-- The validating triggers (INSERT and UPDATE) are created by the migration
-- runner from 0003_outbox_checks.sql.
