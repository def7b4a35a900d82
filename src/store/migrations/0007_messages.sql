-- leadsync schema, version 7: the conversation of each lead, and replies
-- through a message outbox (SPEC §9). Table and column names are a public
-- interface, like the rest of the schema.

-- The `messages` table itself is schema 4's (the webhooks migration); this
-- version adds polling and replies to it.

-- The last message poll of each lead (`[messages] sync = true`): a lead whose
-- poll failed is polled again after its business's next pass.
CREATE TABLE message_polls (
    negotiation_id  TEXT PRIMARY KEY,
    business_id     TEXT NOT NULL,
    polled_at       TEXT NOT NULL,
    outcome         TEXT NOT NULL CHECK (outcome IN ('ok', 'error')),
    error           TEXT,
    pages           INTEGER NOT NULL DEFAULT 0,
    new_messages    INTEGER NOT NULL DEFAULT 0,
    -- the newest sentAt read by complete polls: the history up to it is in
    -- the mirror, so the next poll stops when it reaches it
    complete_through TEXT
);
CREATE INDEX message_polls_failed ON message_polls (business_id, polled_at) WHERE outcome = 'error';

-- How far each business's leads have been polled for messages: the last
-- negotiation_changes.id looked at. A crash between a pass and its message
-- poll loses nothing; the next pass polls those leads.
CREATE TABLE message_poll_cursors (
    business_id     TEXT PRIMARY KEY,
    last_change_id  INTEGER NOT NULL
);

-- The leads a business's passes found new or changed since a cursor, without
-- reading every change ever recorded. Change ids only grow, so each business's
-- part of this index is appended to (cheap even during a first full sync).
CREATE INDEX negotiation_changes_news_by_business ON negotiation_changes (business_id, id)
    WHERE kind IN ('new', 'changed', 'reappeared');

-- Replies the partner's software sends, written with plain SQL:
--   INSERT INTO message_outbox (negotiation_id, text) VALUES ('519153480500518912', 'On my way!');
-- AUTOINCREMENT: an id is never reused, so "in id order" means the order of insertion.
CREATE TABLE message_outbox (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    negotiation_id    TEXT NOT NULL,
    business_id       TEXT,
    text              TEXT NOT NULL,
    state             TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'sending', 'sent', 'dead', 'canceled')),
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_error        TEXT,
    last_http_status  INTEGER,
    last_trace_id     TEXT,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_at           TEXT,
    message_id        TEXT,                 -- from the response, when it has one
    sending_since     TEXT,
    -- 1: sent after a later reply of the same negotiation had already been
    -- sent (retried after being dead)
    late              INTEGER NOT NULL DEFAULT 0 CHECK (late IN (0, 1)),
    -- while set, the row waits for this business (not configured, disabled,
    -- needs re-authorization, OAuth client refused); last_error says why
    waiting_for       TEXT
);
-- The same indexes as the outbox's, replies being ordered by id alone.
CREATE INDEX message_outbox_due ON message_outbox (next_attempt_at, id)
    WHERE state = 'pending' AND waiting_for IS NULL;
CREATE INDEX message_outbox_open_by_negotiation ON message_outbox (negotiation_id, id)
    WHERE state IN ('pending', 'sending');
CREATE INDEX message_outbox_sent_by_negotiation ON message_outbox (negotiation_id, id)
    WHERE state = 'sent';
CREATE INDEX message_outbox_by_state ON message_outbox (state, id);
CREATE INDEX message_outbox_waiting ON message_outbox (waiting_for) WHERE waiting_for IS NOT NULL;
CREATE INDEX message_outbox_waiting_by_negotiation ON message_outbox (negotiation_id)
    WHERE waiting_for IS NOT NULL;
CREATE INDEX message_outbox_ready_by_business ON message_outbox (business_id)
    WHERE state = 'pending' AND waiting_for IS NULL;

-- One row per HTTP attempt of a message_outbox row: the same columns as
-- outbox_attempts, `outbox_id` being the message_outbox row's id.
CREATE TABLE message_outbox_attempts (
    id           INTEGER PRIMARY KEY,
    outbox_id    INTEGER NOT NULL REFERENCES message_outbox (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    http_status  INTEGER,
    outcome      TEXT NOT NULL,
    error        TEXT,
    trace_id     TEXT,
    duration_ms  INTEGER
);
CREATE INDEX message_outbox_attempts_by_row ON message_outbox_attempts (outbox_id, id);

-- The table refuses bad rows itself, with messages a person can act on.
-- "Blank" is every Unicode White_Space character (what the drainer trims);
-- a NUL is refused because SQLite's length() stops at it, which would let
-- any length through.
CREATE TRIGGER message_outbox_validate_insert BEFORE INSERT ON message_outbox BEGIN
    SELECT RAISE(ABORT, 'message_outbox: negotiation_id must be the lead''s negotiationID as text of digits (quote it: ''519153480500518912'')')
     WHERE NEW.negotiation_id IS NULL OR typeof(NEW.negotiation_id) <> 'text'
        OR NEW.negotiation_id = '' OR NEW.negotiation_id GLOB '*[^0-9]*';
    SELECT RAISE(ABORT, 'message_outbox: business_id must be a Thumbtack business id (text of digits) or NULL')
     WHERE NEW.business_id IS NOT NULL
       AND (typeof(NEW.business_id) <> 'text' OR NEW.business_id = '' OR NEW.business_id GLOB '*[^0-9]*');
    SELECT RAISE(ABORT, 'message_outbox: text must not contain NUL characters (char(0))')
     WHERE typeof(NEW.text) = 'text' AND instr(NEW.text, char(0)) > 0;
    SELECT RAISE(ABORT, 'message_outbox: text is required: the message to send, as text that is not blank')
     WHERE NEW.text IS NULL OR typeof(NEW.text) <> 'text'
        OR trim(NEW.text, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192, 8193, 8194, 8195, 8196,
                                8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233, 8239, 8287, 12288)) = '';
    SELECT RAISE(ABORT, 'message_outbox: text must be at most 5000 characters')
     WHERE length(NEW.text) > 5000;
    SELECT RAISE(ABORT, 'message_outbox: a new row is pending: leave state, attempts, sent_at, message_id, late and waiting_for out')
     WHERE NEW.state IS NOT 'pending' OR NEW.attempts IS NOT 0
        OR NEW.sent_at IS NOT NULL OR NEW.message_id IS NOT NULL
        OR NEW.late IS NOT 0 OR NEW.waiting_for IS NOT NULL;
END;

CREATE TRIGGER message_outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, text
    ON message_outbox BEGIN
    SELECT RAISE(ABORT, 'message_outbox: a row''s negotiation_id, business_id and text can change only while it is pending; to send a corrected message, insert a new row')
     WHERE OLD.state <> 'pending'
       AND (NEW.negotiation_id IS NOT OLD.negotiation_id OR NEW.business_id IS NOT OLD.business_id
            OR NEW.text IS NOT OLD.text);
    SELECT RAISE(ABORT, 'message_outbox: negotiation_id must be the lead''s negotiationID as text of digits (quote it: ''519153480500518912'')')
     WHERE NEW.negotiation_id IS NULL OR typeof(NEW.negotiation_id) <> 'text'
        OR NEW.negotiation_id = '' OR NEW.negotiation_id GLOB '*[^0-9]*';
    SELECT RAISE(ABORT, 'message_outbox: business_id must be a Thumbtack business id (text of digits) or NULL')
     WHERE NEW.business_id IS NOT NULL
       AND (typeof(NEW.business_id) <> 'text' OR NEW.business_id = '' OR NEW.business_id GLOB '*[^0-9]*');
    SELECT RAISE(ABORT, 'message_outbox: text must not contain NUL characters (char(0))')
     WHERE typeof(NEW.text) = 'text' AND instr(NEW.text, char(0)) > 0;
    SELECT RAISE(ABORT, 'message_outbox: text is required: the message to send, as text that is not blank')
     WHERE NEW.text IS NULL OR typeof(NEW.text) <> 'text'
        OR trim(NEW.text, char(9, 10, 11, 12, 13, 32, 133, 160, 5760, 8192, 8193, 8194, 8195, 8196,
                                8197, 8198, 8199, 8200, 8201, 8202, 8232, 8233, 8239, 8287, 12288)) = '';
    SELECT RAISE(ABORT, 'message_outbox: text must be at most 5000 characters')
     WHERE length(NEW.text) > 5000;
END;

CREATE TRIGGER message_outbox_validate_state BEFORE UPDATE OF state ON message_outbox BEGIN
    SELECT RAISE(ABORT, 'message_outbox: state must be one of pending, sending, sent, dead, canceled')
     WHERE NEW.state IS NULL OR NEW.state NOT IN ('pending', 'sending', 'sent', 'dead', 'canceled');
END;
