-- leadsync schema, version 5: "sync now" while the daemon runs (SPEC §10),
-- and each schedule's backlog for `status` (SPEC §11).

-- Any program may ask the running daemon for a pass:
--   INSERT INTO sync_requests (business_id, kind) VALUES ('468046965846925323', 'full');
-- business_id NULL means every enabled business. The daemon takes new rows
-- within about a second (started_at), runs them through its queue, and
-- records the outcome: ok, error (some pass failed), or refused (a business
-- it does not have, or disabled). `summary` holds the lines `leadsync sync`
-- prints, one per business.
CREATE TABLE sync_requests (
    id            INTEGER PRIMARY KEY,
    business_id   TEXT CHECK (business_id IS NULL
                              OR (business_id <> '' AND business_id NOT GLOB '*[^0-9]*')),
    kind          TEXT NOT NULL DEFAULT 'head' CHECK (kind IN ('head', 'full')),
    -- 1: a full scan may mark more than half of a business's leads missing
    -- (`sync --full --accept-missing`).
    accept_missing INTEGER NOT NULL DEFAULT 0 CHECK (accept_missing IN (0, 1)),
    requested_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at    TEXT,
    finished_at   TEXT,
    outcome       TEXT CHECK (outcome IN ('ok', 'error', 'refused')),
    error         TEXT,
    summary       TEXT
);
-- The daemon looks for new requests every half second: this keeps that a
-- lookup of nothing when there are none.
CREATE INDEX sync_requests_new ON sync_requests (id)
    WHERE started_at IS NULL AND finished_at IS NULL;

-- The daemon's queue, per schedule, rewritten when it changes: how many
-- passes wait and since when the oldest has been due. The lag `status`
-- shows is now minus oldest_due_at.
CREATE TABLE schedule_lag (
    kind           TEXT NOT NULL,
    schedule       TEXT NOT NULL,
    businesses     INTEGER NOT NULL,
    waiting        INTEGER NOT NULL,
    oldest_due_at  TEXT,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (kind, schedule)
);
