//! Messages and webhook deliveries: `messages`, `webhook_events`, and the one
//! transaction that stores a delivery together with its effect; and what
//! message polling remembers (`message_polls`, `message_poll_cursors`).

use super::mirror::{self, PageContext, Source, Upserted};
use crate::lead::LeadRow;
use crate::thumbtack::model::Message;
use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

/// A message row (SPEC §9), source-agnostic.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub message_id: String,
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub sent_at: Option<String>,
    pub sender: Option<String>,
    pub text: Option<String>,
    /// The message object exactly as received.
    pub payload: String,
    /// `webhook` or `poll`.
    pub source: &'static str,
}

/// The `webhook_events` columns known before the delivery is applied.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub received_at: String,
    pub event_type: String,
    pub webhook_id: Option<String>,
    pub triggered_at: Option<String>,
    pub business_id: Option<String>,
    pub negotiation_id: Option<String>,
    pub message_id: Option<String>,
    /// The request body exactly as received.
    pub payload: String,
}

/// What a delivery asks of the mirror.
#[derive(Debug, Clone)]
pub enum Effect {
    /// A new lead of `business_id` (when the delivery names one).
    Lead {
        lead: LeadRow,
        business_id: Option<String>,
        /// When the event happened (UTC, the database's format); `None` when
        /// the delivery does not say: then a lead already mirrored is kept.
        event_time: Option<String>,
    },
    /// A message.
    Message(MessageRow),
    /// Nothing: kept as `ignored`, with the reason when there is one.
    Ignore(Option<String>),
}

/// `webhook_events.outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    UnknownBusiness,
}

impl Outcome {
    /// The stored value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::UnknownBusiness => "unknown_business",
        }
    }
}

/// A stored delivery: its `webhook_events` id, outcome and note.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub event_id: i64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

fn is_configured(conn: &Connection, business_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM businesses WHERE business_id = ?1 AND configured = 1")?
        .query_row([business_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// The business named by the newest `unknown_business` delivery of lead ?1
/// (from the index `webhook_events_by_negotiation`).
const BUSINESS_OF_UNKNOWN_LEAD: &str = "SELECT business_id FROM webhook_events
  WHERE negotiation_id = ?1 AND outcome = 'unknown_business' AND business_id IS NOT NULL
  ORDER BY id DESC LIMIT 1";

/// Gives the messages of lead ?2 stored without a business business ?1.
const MESSAGES_OF_UNKNOWN_LEAD: &str = "UPDATE messages SET business_id = ?1
  WHERE negotiation_id = ?2 AND business_id IS NULL";

/// Stores a delivery and applies its effect in one transaction: either both
/// are committed or neither is (the receiver answers 2xx only after this).
pub fn record_delivery(
    conn: &mut Connection,
    event: &EventRow,
    effect: &Effect,
) -> Result<Recorded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut row = event.clone();
    let (outcome, error) = match effect {
        Effect::Ignore(reason) => (Outcome::Ignored, reason.clone()),
        Effect::Lead {
            lead,
            business_id,
            event_time,
        } => {
            row.negotiation_id = Some(lead.negotiation_id.clone());
            row.business_id = business_id.clone();
            match business_id {
                None => (
                    Outcome::UnknownBusiness,
                    Some("the negotiation names no businessID".to_string()),
                ),
                Some(b) if !is_configured(&tx, b)? => {
                    // Messages of this lead stored before it (a customer's
                    // names no business) take the business it names, as a
                    // mirrored lead gives its own: none is left without one.
                    tx.prepare_cached(MESSAGES_OF_UNKNOWN_LEAD)?
                        .execute(params![b, lead.negotiation_id])?;
                    (
                        Outcome::UnknownBusiness,
                        Some(format!("business {b} is not configured")),
                    )
                }
                Some(b) => {
                    let ctx = PageContext {
                        business_id: b.clone(),
                        run_id: None,
                        source: Source::Webhook,
                        now: event.received_at.clone(),
                        stale_before: String::new(),
                        insert_first: false,
                        read_at: None,
                    };
                    let origin = mirror::Origin::Delivered {
                        triggered_at: event_time.as_deref(),
                    };
                    match mirror::upsert_lead(&tx, &ctx, lead, origin)? {
                        Upserted::Inserted | Upserted::Changed | Upserted::Reappeared => {
                            (Outcome::Applied, None)
                        }
                        Upserted::Unchanged | Upserted::Kept { identical: true } => {
                            (Outcome::Duplicate, None)
                        }
                        Upserted::Kept { identical: false } => (
                            Outcome::Duplicate,
                            Some(match event_time {
                                Some(_) => "the mirror has a newer copy of this lead (from an event \
                                            triggered no earlier, listed from a page asked for \
                                            over a minute after this event's triggeredAt, found \
                                            missing after it, or listed unchanged over a minute \
                                            after it, by a pass since pruned perhaps); kept"
                                    .to_string(),
                                None => "the mirror has a newer copy of this lead: the delivery has \
                                         no believable triggeredAt (absent, unreadable, or after it \
                                         was received); kept"
                                    .to_string(),
                            }),
                        ),
                    }
                }
            }
        }
        Effect::Message(m) => {
            row.negotiation_id = Some(m.negotiation_id.clone());
            row.message_id = Some(m.message_id.clone());
            // Every message is stored (`applied`), whatever its business:
            // nothing replays `webhook_events` and message polling is off by
            // default, so one set aside would never be in `messages` once its
            // business is configured again and its lead mirrored. Storing
            // only the customer's side (naming no business) of a lead of a
            // business not configured left a mirror quietly missing the
            // pro's replies (naming it). Its business: the one it names, else
            // its mirrored lead's, else the one an `unknown_business`
            // delivery of its lead named, else none until that delivery.
            let business = match &m.business_id {
                Some(b) => Some(b.clone()),
                None => match mirror::business_of(&tx, &m.negotiation_id)? {
                    Some(b) => Some(b),
                    None => tx
                        .prepare_cached(BUSINESS_OF_UNKNOWN_LEAD)?
                        .query_row([&m.negotiation_id], |r| r.get::<_, String>(0))
                        .optional()?,
                },
            };
            row.business_id = business.clone();
            let mut m = m.clone();
            m.business_id = business;
            if insert_message(&tx, &m, &event.received_at)? {
                (Outcome::Applied, None)
            } else {
                (Outcome::Duplicate, None)
            }
        }
    };
    tx.prepare_cached(
        "INSERT INTO webhook_events (received_at, event_type, webhook_id, triggered_at, business_id,
             negotiation_id, message_id, payload, outcome, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        row.received_at,
        row.event_type,
        row.webhook_id,
        row.triggered_at,
        row.business_id,
        row.negotiation_id,
        row.message_id,
        row.payload,
        outcome.as_str(),
        error,
    ])?;
    let event_id = tx.last_insert_rowid();
    tx.commit()?;
    Ok(Recorded {
        event_id,
        outcome,
        error,
    })
}

/// Inserts a message unless its `message_id` is known; true when inserted.
pub fn insert_message(conn: &Connection, m: &MessageRow, now: &str) -> Result<bool> {
    let n = conn
        .prepare_cached(
            "INSERT INTO messages (message_id, negotiation_id, business_id, sent_at, sender, text,
                 payload, source, first_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (message_id) DO NOTHING",
        )?
        .execute(params![
            m.message_id,
            m.negotiation_id,
            m.business_id,
            m.sent_at,
            m.sender,
            m.text,
            m.payload,
            m.source,
            now
        ])?;
    Ok(n > 0)
}

/// Where a message came from (`messages.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSource {
    Webhook,
    Poll,
}

impl MessageSource {
    /// The value stored in `messages.source`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageSource::Webhook => "webhook",
            MessageSource::Poll => "poll",
        }
    }
}

/// What writing a batch of messages did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    /// Messages new to the mirror.
    pub inserted: i64,
    /// Ids that were already in the mirror (nothing was changed for them).
    pub already_known: Vec<String>,
}

/// Inserts messages in one transaction, keyed by `message_id`: a message
/// already in the mirror (from a webhook, an earlier poll) is left as it is.
/// `negotiation_id` is used when a message does not name its own.
pub fn insert_messages(
    conn: &mut Connection,
    negotiation_id: &str,
    business_id: Option<&str>,
    messages: &[Message],
    source: MessageSource,
    now: &str,
) -> Result<Written> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut written = Written::default();
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO messages (message_id, negotiation_id, business_id, sent_at, sender, text,
                 payload, source, first_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (message_id) DO NOTHING",
        )?;
        for m in messages {
            let n = insert.execute(params![
                m.message_id,
                m.negotiation_id.as_deref().unwrap_or(negotiation_id),
                business_id,
                m.sent_at,
                m.sender,
                m.text,
                m.payload,
                source.as_str(),
                now,
            ])?;
            if n == 0 {
                written.already_known.push(m.message_id.clone());
            } else {
                written.inserted += 1;
            }
        }
    }
    tx.commit()?;
    Ok(written)
}

/// A business's changes since a cursor that are news (?1, the business;
/// ?2, the cursor), read in the news index from the cursor on. Left to
/// itself, with statistics taken while one business had every change, the
/// planner reads the primary key's range instead: every business's changes
/// since the cursor, once there are several.
fn news_since(pins: &super::Pins) -> String {
    format!(
        "SELECT id, negotiation_id FROM negotiation_changes {}
          WHERE business_id = ?1 AND id > ?2 AND kind <> 'missing'
          ORDER BY id",
        pins.by("negotiation_changes_news_by_business")
    )
}

/// The leads to poll after a pass of `business_id`: those found new, changed
/// or back since the business's cursor (oldest first), then those whose last
/// poll failed and whose backoff is over (`next_poll_at` unset, not after
/// `now`, or after `horizon`: a wait longer than the longest there is was
/// set by a clock that ran ahead, since corrected); at most `limit` in all.
/// Also returns the change id to move the cursor to once they are polled.
pub fn leads_to_poll(
    conn: &Connection,
    business_id: &str,
    limit: usize,
    now: &str,
    horizon: &str,
) -> Result<(Vec<String>, Option<i64>)> {
    let cursor: i64 = conn
        .query_row(
            "SELECT last_change_id FROM message_poll_cursors WHERE business_id = ?1",
            [business_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    let mut leads = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut new_cursor = None;
    {
        let pins = super::Pins::read(conn)?;
        let mut stmt = conn.prepare_cached(&news_since(&pins))?;
        let mut rows = stmt.query(params![business_id, cursor])?;
        while let Some(r) = rows.next()? {
            let (id, negotiation_id): (i64, String) = (r.get(0)?, r.get(1)?);
            if seen.contains(&negotiation_id) {
                new_cursor = Some(id);
                continue;
            }
            if leads.len() >= limit {
                break;
            }
            seen.insert(negotiation_id.clone());
            leads.push(negotiation_id);
            new_cursor = Some(id);
        }
    }
    if leads.len() < limit {
        let mut stmt = conn.prepare_cached(FAILED_DUE)?;
        let failed = stmt
            .query_map(params![business_id, limit as i64, now, horizon], |r| {
                r.get::<_, String>(0)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for n in failed {
            if leads.len() < limit && seen.insert(n.clone()) {
                leads.push(n);
            }
        }
    }
    Ok((leads, new_cursor))
}

/// The failed leads of business ?1 whose wait is over at ?3 (or set beyond
/// ?4), the longest failed first, at most ?2.
/// Three ranges of `message_polls_due`, each read alone: with one OR of
/// them the planner walked `message_polls_failed`, every failed poll of the
/// business, reading each one's row. Disjoint while ?4 is not before ?3.
const FAILED_DUE: &str = "SELECT negotiation_id FROM (
    SELECT negotiation_id, polled_at FROM message_polls
     WHERE business_id = ?1 AND outcome = 'error' AND next_poll_at IS NULL
    UNION ALL
    SELECT negotiation_id, polled_at FROM message_polls
     WHERE business_id = ?1 AND outcome = 'error' AND next_poll_at <= ?3
    UNION ALL
    SELECT negotiation_id, polled_at FROM message_polls
     WHERE business_id = ?1 AND outcome = 'error' AND next_poll_at > max(?3, ?4))
  ORDER BY polled_at LIMIT ?2";

/// Moves a business's cursor forward (never back).
pub fn advance_cursor(conn: &Connection, business_id: &str, change_id: i64) -> Result<()> {
    conn.execute(
        "INSERT INTO message_poll_cursors (business_id, last_change_id) VALUES (?1, ?2)
         ON CONFLICT (business_id) DO UPDATE SET last_change_id = max(last_change_id, excluded.last_change_id)",
        params![business_id, change_id],
    )?;
    Ok(())
}

/// The outcome of polling one lead's conversation.
#[derive(Debug, Clone)]
pub struct PollRecord<'a> {
    pub negotiation_id: &'a str,
    pub business_id: &'a str,
    pub polled_at: &'a str,
    pub error: Option<&'a str>,
    pub pages: i64,
    pub new_messages: i64,
    /// The newest `sent_at` up to which the lead's history is in the mirror.
    pub complete_through: Option<&'a str>,
    /// Failed polls in a row, this one included (0 when it succeeded).
    pub failures: i64,
    /// When a failed lead is polled again after a pass (`None`: after the next).
    pub next_poll_at: Option<&'a str>,
}

/// Records a lead's last poll (`message_polls`).
pub fn record_poll(conn: &Connection, p: &PollRecord<'_>) -> Result<()> {
    conn.execute(
        "INSERT INTO message_polls (negotiation_id, business_id, polled_at, outcome, error, pages,
             new_messages, complete_through, failures, next_poll_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (negotiation_id) DO UPDATE SET business_id = excluded.business_id,
             polled_at = excluded.polled_at, outcome = excluded.outcome, error = excluded.error,
             pages = excluded.pages, new_messages = excluded.new_messages,
             complete_through = excluded.complete_through, failures = excluded.failures,
             next_poll_at = excluded.next_poll_at",
        params![
            p.negotiation_id,
            p.business_id,
            p.polled_at,
            if p.error.is_some() { "error" } else { "ok" },
            p.error,
            p.pages,
            p.new_messages,
            p.complete_through,
            p.failures,
            p.next_poll_at
        ],
    )?;
    Ok(())
}

/// What the mirror knows of a lead's earlier polls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollState {
    /// Up to when the lead's history is known to be in the mirror (`None`:
    /// never read completely; the next poll reads it to the end).
    pub complete_through: Option<String>,
    /// Failed polls in a row.
    pub failures: i64,
}

/// A lead's [`PollState`] (the default when it was never polled).
pub fn poll_state(conn: &Connection, negotiation_id: &str) -> Result<PollState> {
    Ok(conn
        .query_row(
            "SELECT complete_through, failures FROM message_polls WHERE negotiation_id = ?1",
            [negotiation_id],
            |r| {
                Ok(PollState {
                    complete_through: r.get(0)?,
                    failures: r.get(1)?,
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

/// Messages in the mirror, for `status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MessageCounts {
    pub total: i64,
    pub from_customers: i64,
    pub from_business: i64,
    /// Leads whose last message poll failed.
    pub failed_polls: i64,
    /// Of them, those refused again and again, waiting (`next_poll_at` not
    /// past); they are polled again at once when they change.
    pub waiting_polls: i64,
    /// The latest `next_poll_at` of those waiting.
    pub waiting_until: Option<String>,
}

/// Counts messages and failed polls, at `now`. A wait ending after
/// `horizon` was set by a clock that ran ahead: the poller takes it as over
/// ([`FAILED_DUE`]), and so is it counted (failed, not waiting).
pub fn counts(conn: &Connection, now: &str, horizon: &str) -> Result<MessageCounts> {
    let (total, from_customers, from_business) = conn.query_row(
        "SELECT count(*), count(*) FILTER (WHERE sender = 'Customer'),
                count(*) FILTER (WHERE sender = 'Business') FROM messages",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    // `status` reads the schema of an older daemon still running on the
    // mirror after an upgrade: message_polls came with schema 7, its
    // next_poll_at with schema 24. Decided by the schema's version, so that
    // on the current one a missing table or column is an error, not zero.
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let (failed_polls, waiting_polls, waiting_until) = if version >= 24 {
        conn.query_row(
            "SELECT count(*), count(*) FILTER (WHERE next_poll_at > ?1 AND next_poll_at <= ?2),
                    max(next_poll_at) FILTER (WHERE next_poll_at > ?1 AND next_poll_at <= ?2)
               FROM message_polls WHERE outcome = 'error'",
            [now, horizon],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
    } else if version >= 7 {
        conn.query_row(
            "SELECT count(*) FROM message_polls WHERE outcome = 'error'",
            [],
            |r| Ok((r.get(0)?, 0, None)),
        )?
    } else {
        (0, 0, None)
    };
    Ok(MessageCounts {
        total,
        from_customers,
        from_business,
        failed_polls,
        waiting_polls,
        waiting_until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changes of businesses `b` and `c`: `b`'s news are leads 1 and 4.
    fn with_changes(conn: &Connection) {
        conn.execute_batch(
            "INSERT INTO negotiation_changes (id, negotiation_id, business_id, observed_at, kind) VALUES
             (1, '1', 'b', 't', 'new'), (2, '2', 'c', 't', 'new'), (3, '3', 'b', 't', 'missing'),
             (4, '1', 'b', 't', 'changed'), (5, '4', 'b', 't', 'reappeared'), (6, '5', 'c', 't', 'new');",
        )
        .unwrap();
    }

    #[test]
    fn counts_fail_on_the_current_schema_without_its_polls_table() {
        // Only an older schema may lack message_polls (status reads the
        // schema of an older daemon still running): on the current one a
        // missing table is damage, reported, not zero failed polls.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        assert_eq!(
            counts(
                &conn,
                "2026-01-01T10:00:00.000Z",
                "2026-01-02T10:01:00.000Z"
            )
            .unwrap(),
            MessageCounts::default()
        );
        conn.execute_batch("DROP TABLE message_polls").unwrap();
        let e = format!(
            "{:#}",
            counts(
                &conn,
                "2026-01-01T10:00:00.000Z",
                "2026-01-02T10:01:00.000Z"
            )
            .expect_err("no message_polls")
        );
        assert!(e.contains("message_polls"), "{e}");
    }

    #[test]
    fn a_wait_set_by_a_clock_far_ahead_is_not_counted_as_waiting() {
        // Three leads refused: one waiting an hour, one whose wait a clock
        // a year ahead set (the poller takes it as over: beyond the
        // horizon), one polled after the next pass. Status counted the
        // second as waiting, "until" a year ahead.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "INSERT INTO message_polls (negotiation_id, business_id, polled_at, outcome, failures,
                 next_poll_at) VALUES
             ('1', 'b', 't', 'error', 3, '2026-01-01T11:00:00.000Z'),
             ('2', 'b', 't', 'error', 3, '2027-01-01T10:00:00.000Z'),
             ('3', 'b', 't', 'error', 1, NULL),
             ('4', 'b', 't', 'ok', 0, NULL);",
        )
        .unwrap();
        let c = counts(
            &conn,
            "2026-01-01T10:00:00.000Z",
            "2026-01-02T10:01:00.000Z",
        )
        .unwrap();
        assert_eq!(
            (c.failed_polls, c.waiting_polls, c.waiting_until.as_deref()),
            (3, 1, Some("2026-01-01T11:00:00.000Z"))
        );
    }

    #[test]
    fn the_leads_to_poll_are_found_when_their_index_was_dropped() {
        // A user's maintenance (or a partner's tool) may drop or rename an
        // index: the message poll is slower, never failing for good.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        with_changes(&conn);
        assert_eq!(
            leads_to_poll(&conn, "b", 10, "t", "u").unwrap(),
            (vec!["1".to_string(), "4".to_string()], Some(5))
        );
        conn.execute_batch("DROP INDEX negotiation_changes_news_by_business")
            .unwrap();
        assert_eq!(
            leads_to_poll(&conn, "b", 10, "t", "u").unwrap(),
            (vec!["1".to_string(), "4".to_string()], Some(5))
        );
        advance_cursor(&conn, "b", 4).unwrap();
        assert_eq!(
            leads_to_poll(&conn, "b", 10, "t", "u").unwrap(),
            (vec!["4".to_string()], Some(5))
        );
        // Another index under its name (of the changes that are not news):
        // not named, the same leads.
        conn.execute_batch(
            "CREATE INDEX negotiation_changes_news_by_business ON negotiation_changes (business_id, id)
              WHERE kind = 'missing'",
        )
        .unwrap();
        assert_eq!(
            leads_to_poll(&conn, "b", 10, "t", "u").unwrap(),
            (vec!["4".to_string()], Some(5))
        );
    }

    /// The steps of a statement's plan.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // Unbound parameters are NULL: EXPLAIN only compiles.
        let mut rows = stmt.raw_query();
        let mut plan = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            plan.push(r.get::<_, String>(3).unwrap());
        }
        plan
    }

    /// The failed leads that are due were found by walking every failed
    /// poll of the business (tens of thousands, with the leads no longer
    /// active refused for good), reading each one's row for `next_poll_at`.
    #[test]
    fn the_failed_leads_due_are_read_from_their_index_alone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let plan = plan(&conn, FAILED_DUE);
        assert!(
            plan.iter().all(|p| !p.starts_with("SCAN message_polls")
                && !p.contains("message_polls_failed")
                && (!p.contains("message_polls")
                    || p.contains("INDEX message_polls_due (business_id=? AND next_poll_at"))),
            "{plan:?}"
        );
        conn.execute_batch(
            "INSERT INTO message_polls (negotiation_id, business_id, polled_at, outcome, next_poll_at)
             VALUES ('null', 'b', '5', 'error', NULL), ('past', 'b', '4', 'error', '2026-01-01'),
                    ('waiting', 'b', '3', 'error', '2026-06-01'), ('beyond', 'b', '2', 'error', '2027-01-01'),
                    ('ok', 'b', '1', 'ok', NULL), ('other', 'c', '1', 'error', NULL);",
        )
        .unwrap();
        let due = |limit: usize| {
            leads_to_poll(&conn, "b", limit, "2026-03-01", "2026-09-01")
                .unwrap()
                .0
        };
        assert_eq!(due(10), ["beyond", "past", "null"]);
        assert_eq!(due(2), ["beyond", "past"]);
    }

    #[test]
    fn the_leads_to_poll_are_read_from_the_news_index_fresh_and_after_analyze() {
        // Unnamed, after ANALYZE of a mirror whose changes were all one
        // business's, the planner read the primary key's range: every
        // business's changes since the cursor, once there are several.
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let news = |conn: &Connection| {
            let plan = plan(conn, &news_since(&super::super::Pins::read(conn).unwrap()));
            assert!(
                plan.len() == 1
                    && plan[0].contains(
                        "INDEX negotiation_changes_news_by_business (business_id=? AND id>?)"
                    ),
                "{plan:?}"
            );
        };
        news(&conn);
        conn.execute_batch(
            "CREATE INDEX users_changes ON negotiation_changes (business_id);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
             INSERT INTO negotiation_changes (negotiation_id, business_id, observed_at, kind)
             SELECT i % 500, '8', 't', CASE WHEN i % 7 = 0 THEN 'missing' ELSE 'changed' END FROM n;
             ANALYZE;",
        )
        .unwrap();
        news(&conn);
    }
}
