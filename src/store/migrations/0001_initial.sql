-- leadsync schema, version 1.
-- Table and column names are a public interface (SPEC §3): users write SQL
-- against them. Timestamps are RFC 3339 UTC text; Thumbtack ids are TEXT.

CREATE TABLE businesses (
    business_id           TEXT PRIMARY KEY,
    name                  TEXT,
    enabled               INTEGER NOT NULL DEFAULT 1,
    configured            INTEGER NOT NULL DEFAULT 1,   -- 0: no longer in the configuration
    last_sync_started_at  TEXT,
    last_sync_finished_at TEXT,
    last_sync_kind        TEXT,                         -- head / full
    last_sync_outcome     TEXT CHECK (last_sync_outcome IN ('ok', 'error')),
    last_error            TEXT,
    last_full_sync_at     TEXT,                         -- last successful full scan
    needs_reauth          INTEGER NOT NULL DEFAULT 0 CHECK (needs_reauth IN (0, 1)),
    needs_reauth_since    TEXT,
    needs_reauth_reason   TEXT
);

CREATE TABLE negotiations (
    negotiation_id  TEXT PRIMARY KEY,
    business_id     TEXT NOT NULL,
    status          TEXT,
    created_at      TEXT,             -- createTime or createdAt, in UTC
    payload         TEXT NOT NULL,    -- the JSON object exactly as received
    payload_hash    INTEGER NOT NULL, -- xxh3-64 of payload, to skip unchanged leads cheaply
    category        TEXT,             -- payload.category.name
    customer_name   TEXT,             -- payload.customer.displayName
    city            TEXT,             -- payload.customer.location.city
    zip             TEXT,             -- payload.customer.location.zipCode
    first_seen_at   TEXT NOT NULL,
    last_seen_at    TEXT NOT NULL,    -- refreshed at most hourly while unchanged (README)
    changed_at      TEXT NOT NULL,    -- last time the payload changed
    missing_since   TEXT              -- a successful full scan no longer lists it
);
CREATE INDEX negotiations_by_business ON negotiations (business_id, status);

CREATE TABLE negotiation_changes (
    id              INTEGER PRIMARY KEY,      -- increasing: a change feed cursor
    negotiation_id  TEXT NOT NULL,
    business_id     TEXT NOT NULL,
    observed_at     TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('new', 'changed', 'missing', 'reappeared')),
    old_status      TEXT,
    new_status      TEXT,
    changed_fields  TEXT,                     -- JSON array of top-level keys that differ
    old_payload     TEXT,                     -- the payload before a change
    sync_run_id     INTEGER
);
-- First sightings ('new', one per lead, the bulk of a first sync) stay out of
-- this index: indexing them by a random key multiplied the WAL written by a
-- first full sync. Look a lead's changes up with `kind <> 'new'`.
CREATE INDEX negotiation_changes_by_negotiation ON negotiation_changes (negotiation_id, id)
    WHERE kind <> 'new';

CREATE TABLE sync_runs (
    id           INTEGER PRIMARY KEY,
    business_id  TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('head', 'full')),
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    outcome      TEXT NOT NULL DEFAULT 'running'
                 CHECK (outcome IN ('running', 'ok', 'error', 'skipped')),
    pages        INTEGER NOT NULL DEFAULT 0,
    seen         INTEGER NOT NULL DEFAULT 0,
    inserted     INTEGER NOT NULL DEFAULT 0,
    updated      INTEGER NOT NULL DEFAULT 0,
    unchanged    INTEGER NOT NULL DEFAULT 0,
    missing      INTEGER NOT NULL DEFAULT 0,  -- leads newly marked missing (full scans)
    skipped      INTEGER NOT NULL DEFAULT 0,  -- list entries without a negotiationID
    error        TEXT
);
CREATE INDEX sync_runs_by_business ON sync_runs (business_id, id);

CREATE TABLE outbox (
    id                        INTEGER PRIMARY KEY,
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
    -- the instant in UTC, for ordering rows given in different zones; only
    -- date-shaped text is evaluated, so that a bad value ('now') reaches the
    -- validating trigger instead of failing here
    changed_at_utc            TEXT GENERATED ALWAYS AS
                              (CASE WHEN partner_status_changed_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*'
                                    THEN strftime('%Y-%m-%dT%H:%M:%fZ', partner_status_changed_at) END) VIRTUAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX outbox_open_by_negotiation ON outbox (negotiation_id, changed_at_utc, id)
    WHERE state IN ('pending', 'sending');
CREATE INDEX outbox_by_state ON outbox (state, id);

CREATE TABLE outbox_attempts (
    id           INTEGER PRIMARY KEY,
    outbox_id    INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    http_status  INTEGER,            -- NULL: no HTTP response (network error, timeout, crash)
    outcome      TEXT NOT NULL,      -- sent / retry / dead / reauth / interrupted / waiting
    error        TEXT,
    trace_id     TEXT,
    duration_ms  INTEGER
);
CREATE INDEX outbox_attempts_by_row ON outbox_attempts (outbox_id, id);

-- The outbox's validating triggers (INSERT and UPDATE) are created from
-- outbox_checks.sql by the migration runner, so both run the same checks.
