//! The outboxes: claim / finish / recover, attempts, and the operator's
//! commands, for both tables the drainer sends — `outbox` (job-status
//! transitions) and `message_outbox` (replies). One machinery; [`Kind`] says
//! what differs: the table, its attempts log, the content and the order.

use super::Pins;
use anyhow::{Result, bail};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What an outbox row sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A job-status transition (`outbox`), ordered by its instant, then id.
    Transition,
    /// A reply (`message_outbox`), ordered by id.
    Message,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Transition, Kind::Message];

    /// `transition` or `message` (as `outbox list --kind` takes it).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Transition => "transition",
            Kind::Message => "message",
        }
    }

    /// The table of rows to send.
    pub fn table(self) -> &'static str {
        match self {
            Kind::Transition => "outbox",
            Kind::Message => "message_outbox",
        }
    }

    /// Its attempts log (same columns for both).
    pub fn attempts_table(self) -> &'static str {
        match self {
            Kind::Transition => "outbox_attempts",
            Kind::Message => "message_outbox_attempts",
        }
    }

    /// The content columns a claim reads, after the common ones.
    fn content_columns(self) -> &'static str {
        match self {
            Kind::Transition => {
                "o.status, o.partner_status_changed_at, o.invoice_amount_in_cents, o.changed_at_order"
            }
            Kind::Message => "o.text",
        }
    }

    /// How many columns [`Kind::content_columns`] has.
    fn content_len(self) -> usize {
        match self {
            Kind::Transition => 4,
            Kind::Message => 1,
        }
    }

    /// SQL: row `p` goes out before row `o` of the same negotiation (a
    /// transition whose instant SQLite cannot read goes first, so that it
    /// fails alone instead of holding the others back forever).
    fn goes_before(self, p: &str, o: &str) -> String {
        match self {
            Kind::Transition => format!(
                "({p}.changed_at_order IS NULL OR {p}.changed_at_order < {o}.changed_at_order
                  OR ({p}.changed_at_order = {o}.changed_at_order AND {p}.id < {o}.id))"
            ),
            Kind::Message => format!("{p}.id < {o}.id"),
        }
    }

    /// SQL: row `s` goes out after row `o` of the same negotiation.
    fn goes_after(self, s: &str, o: &str) -> String {
        match self {
            Kind::Transition => format!(
                "({s}.changed_at_order > {o}.changed_at_order
                  OR ({s}.changed_at_order = {o}.changed_at_order AND {s}.id > {o}.id))"
            ),
            Kind::Message => format!("{s}.id > {o}.id"),
        }
    }

    /// SQL: the order of a negotiation's rows.
    fn order(self) -> &'static str {
        match self {
            Kind::Transition => "o.changed_at_order, o.id",
            Kind::Message => "o.id",
        }
    }

    /// SQL: a row with no place in the order (always first in line).
    fn unordered(self) -> &'static str {
        match self {
            Kind::Transition => "o.changed_at_order IS NULL",
            Kind::Message => "0",
        }
    }

    /// What the row is, in log lines and errors.
    pub fn row_name(self) -> &'static str {
        match self {
            Kind::Transition => "outbox row",
            Kind::Message => "message_outbox row",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Kind, String> {
        match s {
            "transition" => Ok(Kind::Transition),
            "message" => Ok(Kind::Message),
            other => Err(format!("kind must be transition or message, not {other:?}")),
        }
    }
}

/// A transition to enqueue, as `leadsync enqueue` takes it.
#[derive(Debug, Clone)]
pub struct NewTransition {
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub status: String,
    pub partner_status_changed_at: String,
    pub invoice_amount_in_cents: Option<i64>,
}

/// Inserts one row through the table's own validation; the error is the
/// table's message (`outbox: status must be ...`).
pub fn enqueue(conn: &Connection, t: &NewTransition) -> Result<i64> {
    let r = conn.execute(
        "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at,
             invoice_amount_in_cents)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            t.negotiation_id,
            t.business_id,
            t.status,
            t.partner_status_changed_at,
            t.invoice_amount_in_cents
        ],
    );
    match r {
        Ok(_) => Ok(conn.last_insert_rowid()),
        Err(e) if super::is_busy(&e) => bail!(
            "the database stayed locked by another program for {} s; nothing was written — try again",
            super::BUSY_TIMEOUT.as_secs()
        ),
        Err(e) => match super::constraint_message(&e) {
            Some(msg) => bail!("rejected: {msg}"),
            None => Err(e.into()),
        },
    }
}

/// One outbox row as users see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub status: String,
    pub partner_status_changed_at: String,
    pub invoice_amount_in_cents: Option<i64>,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub last_http_status: Option<i64>,
    pub last_trace_id: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
}

/// Rows in id order, optionally of one state.
pub fn list(conn: &Connection, state: Option<&str>) -> Result<Vec<OutboxRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, negotiation_id, business_id, status, partner_status_changed_at,
                invoice_amount_in_cents, state, attempts, next_attempt_at, last_error,
                last_http_status, last_trace_id, created_at, sent_at
           FROM outbox WHERE ?1 IS NULL OR state = ?1 ORDER BY id",
    )?;
    // Leniently: a row a partner's program wrote with a BLOB or a number
    // where text belongs is shown, not an error for the whole list.
    let rows = stmt
        .query_map([state], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                negotiation_id: shown(r, 1)?.unwrap_or_default(),
                business_id: shown(r, 2)?,
                status: shown(r, 3)?.unwrap_or_default(),
                partner_status_changed_at: shown(r, 4)?.unwrap_or_default(),
                invoice_amount_in_cents: r.get(5).ok(),
                state: shown(r, 6)?.unwrap_or_default(),
                attempts: r.get(7).unwrap_or_default(),
                next_attempt_at: shown(r, 8)?.unwrap_or_default(),
                last_error: shown(r, 9)?,
                last_http_status: r.get(10).ok().flatten(),
                last_trace_id: shown(r, 11)?,
                created_at: shown(r, 12)?.unwrap_or_default(),
                sent_at: shown(r, 13)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// One `message_outbox` row as users see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MessageOutboxRow {
    pub id: i64,
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub text: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub last_http_status: Option<i64>,
    pub last_trace_id: Option<String>,
    pub created_at: String,
    pub sent_at: Option<String>,
    pub message_id: Option<String>,
}

/// `message_outbox` rows in id order, optionally of one state.
pub fn list_messages(conn: &Connection, state: Option<&str>) -> Result<Vec<MessageOutboxRow>> {
    let mut stmt = conn.prepare(
        "SELECT id, negotiation_id, business_id, text, state, attempts, next_attempt_at,
                last_error, last_http_status, last_trace_id, created_at, sent_at, message_id
           FROM message_outbox WHERE ?1 IS NULL OR state = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([state], |r| {
            Ok(MessageOutboxRow {
                id: r.get(0)?,
                negotiation_id: shown(r, 1)?.unwrap_or_default(),
                business_id: shown(r, 2)?,
                text: shown(r, 3)?.unwrap_or_default(),
                state: shown(r, 4)?.unwrap_or_default(),
                attempts: r.get(5).unwrap_or_default(),
                next_attempt_at: shown(r, 6)?.unwrap_or_default(),
                last_error: shown(r, 7)?,
                last_http_status: r.get(8).ok().flatten(),
                last_trace_id: shown(r, 9)?,
                created_at: shown(r, 10)?.unwrap_or_default(),
                sent_at: shown(r, 11)?,
                message_id: shown(r, 12)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// A column as text for people, whatever its type (a BLOB shows as hex).
pub(crate) fn shown(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<String>> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Null => None,
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Integer(n) => Some(n.to_string()),
        ValueRef::Real(f) => Some(f.to_string()),
        ValueRef::Blob(b) => Some(format!(
            "x'{}'",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )),
    })
}

fn state_of(conn: &Connection, kind: Kind, id: i64) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            &format!("SELECT state FROM {} WHERE id = ?1", kind.table()),
            [id],
            |r| r.get(0),
        )
        .optional()?)
}

/// Puts dead rows back to pending with their attempts reset. Returns, per
/// id, `Ok(())` or why it was not changed.
pub fn retry_dead(
    conn: &mut Connection,
    kind: Kind,
    ids: &[i64],
    now: &str,
) -> Result<Vec<(i64, Result<(), String>)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    let row = kind.row_name();
    for &id in ids {
        let r = match state_of(&tx, kind, id)? {
            None => Err(format!("{row} {id} does not exist")),
            Some(s) if s == "dead" => {
                tx.execute(
                    &format!(
                        "UPDATE {} SET state = 'pending', attempts = 0, next_attempt_at = ?2,
                             last_error = NULL WHERE id = ?1",
                        kind.table()
                    ),
                    params![id, now],
                )?;
                Ok(())
            }
            Some(s) => Err(format!(
                "{row} {id} is {s}, not dead; only dead rows can be retried"
            )),
        };
        out.push((id, r));
    }
    tx.commit()?;
    Ok(out)
}

/// Puts every dead row back to pending; returns their ids.
pub fn retry_all_dead(conn: &Connection, kind: Kind, now: &str) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare(&format!(
        "UPDATE {} SET state = 'pending', attempts = 0, next_attempt_at = ?1, last_error = NULL
          WHERE state = 'dead' RETURNING id",
        kind.table()
    ))?;
    let mut ids = stmt
        .query_map([now], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// Cancels pending rows (never sent). Returns, per id, `Ok(())` or why not.
pub fn cancel(
    conn: &mut Connection,
    kind: Kind,
    ids: &[i64],
) -> Result<Vec<(i64, Result<(), String>)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    let row = kind.row_name();
    for &id in ids {
        let r = match state_of(&tx, kind, id)? {
            None => Err(format!("{row} {id} does not exist")),
            Some(s) if s == "pending" => {
                tx.execute(
                    &format!(
                        "UPDATE {} SET state = 'canceled', last_error = 'canceled by an operator',
                             waiting_for = NULL
                          WHERE id = ?1",
                        kind.table()
                    ),
                    [id],
                )?;
                Ok(())
            }
            Some(s) if s == "sending" => Err(format!(
                "{row} {id} is being sent right now and cannot be canceled"
            )),
            Some(s) => Err(format!(
                "{row} {id} is {s}; only pending rows can be canceled"
            )),
        };
        out.push((id, r));
    }
    tx.commit()?;
    Ok(out)
}

/// What a claimed row sends, as it was read when it was claimed.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Transition {
        status: String,
        partner_status_changed_at: String,
        invoice_amount_in_cents: Option<i64>,
    },
    Message {
        text: String,
    },
}

impl Content {
    /// SQL comparing the row's content columns with [`Content::values`]
    /// bound from `?first` on.
    fn matches(&self, first: usize) -> String {
        match self {
            Content::Transition { .. } => format!(
                "status IS ?{} AND partner_status_changed_at IS ?{} AND invoice_amount_in_cents IS ?{}",
                first,
                first + 1,
                first + 2
            ),
            Content::Message { .. } => format!("text IS ?{first}"),
        }
    }

    fn values(&self) -> Vec<rusqlite::types::Value> {
        use rusqlite::types::Value;
        match self {
            Content::Transition {
                status,
                partner_status_changed_at,
                invoice_amount_in_cents,
            } => vec![
                Value::Text(status.clone()),
                Value::Text(partner_status_changed_at.clone()),
                invoice_amount_in_cents.map_or(Value::Null, Value::Integer),
            ],
            Content::Message { text } => vec![Value::Text(text.clone())],
        }
    }
}

/// A row claimed for sending (now in state `sending`).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub kind: Kind,
    pub id: i64,
    pub negotiation_id: String,
    /// The row's business, or the lead's in the mirror, or the only configured one.
    pub business_id: Option<String>,
    pub content: Content,
    /// This attempt's number (1 for the first).
    pub attempt: i64,
    /// This claim's own number (`claim_id`, schema 25), random: an outcome
    /// is recorded only on the row that still carries it. The attempt
    /// number does not tell one claim from the next: a partner's program
    /// may put a `sending` row back to pending and reset its attempts.
    pub claim_id: i64,
    /// A later row of the negotiation was already sent (SPEC §4: sent anyway).
    pub late: bool,
    /// The row names no business: `business_id` is its lead's (or the only
    /// configured one), written into the row by the claim and kept only
    /// when the row ends sent.
    pub business_filled: bool,
}

/// Which rows a claim may take.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClaimFilter {
    /// Configured businesses whose rows wait, and why (needs
    /// re-authorization, disabled, OAuth client refused): the text goes to
    /// the rows' `last_error`.
    pub waiting: HashMap<String, String>,
    /// The configured businesses; the rows of any other business wait.
    pub configured: Arc<HashSet<String>>,
    /// The business of rows that name none and whose lead is not mirrored,
    /// when exactly one business is configured.
    pub default_business: Option<String>,
}

impl ClaimFilter {
    /// Why rows of `business_id` must wait now, or `None` when they may go.
    pub fn wait_reason(&self, business_id: &str) -> Option<String> {
        if let Some(why) = self.waiting.get(business_id) {
            return Some(why.clone());
        }
        (!self.configured.contains(business_id)).then(|| {
            format!(
                "waiting: business {business_id} is not in the configuration (add it, or cancel the first row of the negotiation waiting for it, or set that row's business_id: its business may be its lead's; the rows behind it then go)"
            )
        })
    }
}

/// A due row as read for a claim, before anything is decided about it.
struct Candidate {
    id: i64,
    /// The row's content, or why it cannot be read (a BLOB id, bad UTF-8...).
    content: std::result::Result<Claimed, String>,
    /// What an open row of the same negotiation is put aside for.
    behind: Option<Stored>,
}

/// A value exactly as stored (`waiting_for`, `next_attempt_at`), to find
/// its rows again: text is bound as its bytes and cast back
/// ([`Stored::sql`]), as text that is not UTF-8 cannot be bound as text.
/// A `waiting_for` names a business only as text of digits; anything else
/// a partner's program wrote there (a BLOB, broken text, 'x') names none.
#[derive(Debug, Clone)]
struct Stored {
    value: rusqlite::types::Value,
    text: bool,
}

impl Stored {
    /// SQL for the value, bound as `?{n}` ([`Stored::value`]) and
    /// `?{n + 1}` ([`Stored::text`]).
    fn sql(n: usize) -> String {
        format!("CASE WHEN ?{} THEN CAST(?{n} AS TEXT) ELSE ?{n} END", n + 1)
    }

    fn of(v: rusqlite::types::ValueRef<'_>) -> Stored {
        use rusqlite::types::{Value, ValueRef};
        let (value, text) = match v {
            ValueRef::Null => (Value::Null, false),
            ValueRef::Integer(i) => (Value::Integer(i), false),
            ValueRef::Real(f) => (Value::Real(f), false),
            ValueRef::Text(t) => (Value::Blob(t.to_vec()), true),
            ValueRef::Blob(b) => (Value::Blob(b.to_vec()), false),
        };
        Stored { value, text }
    }

    /// The business it names, when it names one: text of digits, as every
    /// business id is (what else a program wrote there could never be
    /// configured, and the rows would wait for good).
    fn business(&self) -> Option<&str> {
        match &self.value {
            rusqlite::types::Value::Blob(b)
                if self.text && !b.is_empty() && b.iter().all(u8::is_ascii_digit) =>
            {
                std::str::from_utf8(b).ok()
            }
            _ => None,
        }
    }
}

/// The columns a claim reads, in the order [`candidate_from_row`] expects:
/// these, then the kind's content columns.
const CANDIDATE_COLUMNS: &str = "o.id, o.negotiation_id, o.business_id,
    COALESCE(o.business_id, n.business_id, :default_business), o.attempts";

/// The columns [`candidate_from_row`] reads for `kind`: the common ones,
/// the business a row of the same negotiation that goes before it is put
/// aside for (one that goes after it holds nothing back), then the content.
fn candidate_columns(kind: Kind, pins: &Pins) -> String {
    let table = kind.table();
    format!(
        "{CANDIDATE_COLUMNS},
         (SELECT w.waiting_for FROM {table} w {waiting}
           WHERE w.negotiation_id = o.negotiation_id AND w.waiting_for IS NOT NULL
             AND {before} LIMIT 1),
         {}",
        kind.content_columns(),
        waiting = waiting_probe(kind, pins),
        before = kind.goes_before("w", "o"),
    )
}

/// The index a claim probes, for each row it walks, for a row of the same
/// negotiation put aside: small, whatever waits elsewhere. Unnamed, the
/// planner may scan the index of every waiting row instead (statistics
/// taken while none waited say it is empty), per walked row.
fn waiting_probe(kind: Kind, pins: &Pins) -> String {
    pins.by(&format!("{}_waiting_by_negotiation", kind.table()))
}

/// How many columns [`candidate_columns`] has.
fn candidate_len(kind: Kind) -> usize {
    6 + kind.content_len()
}

/// Reads a candidate leniently from column `base` on: whatever a partner's
/// program wrote, the claim goes on; a row that cannot be sent is reported,
/// not fatal.
fn candidate_from_row(
    r: &rusqlite::Row<'_>,
    kind: Kind,
    base: usize,
) -> rusqlite::Result<Candidate> {
    use rusqlite::types::ValueRef;
    let id: i64 = r.get(base)?;
    fn text(v: ValueRef<'_>, column: &str) -> std::result::Result<Option<String>, String> {
        match v {
            ValueRef::Null => Ok(None),
            ValueRef::Text(t) => std::str::from_utf8(t)
                .map(|s| Some(s.to_string()))
                .map_err(|_| format!("{column} is not valid UTF-8 text")),
            ValueRef::Blob(b) => Err(format!("{column} is a BLOB of {} bytes, not text", b.len())),
            ValueRef::Integer(i) => Err(format!("{column} is the number {i}, not text")),
            ValueRef::Real(f) => Err(format!("{column} is the number {f}, not text")),
        }
    }
    let col = |i: usize| r.get_ref(base + i).map_err(|e| e.to_string());
    let read = || -> std::result::Result<Claimed, String> {
        let negotiation_id = text(col(1)?, "negotiation_id")?.ok_or("negotiation_id is NULL")?;
        if negotiation_id.is_empty() || !negotiation_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "negotiation_id {negotiation_id:?} is not text of digits"
            ));
        }
        let business_id = text(col(3)?, "business_id")?;
        // From before schema 13, whose check a NUL got through: no such
        // business can be configured, so waiting for it would be for good.
        if let Some(b) = &business_id
            && (b.is_empty() || !b.bytes().all(|c| c.is_ascii_digit()))
        {
            return Err(format!("business_id {b:?} is not text of digits"));
        }
        let attempts = match col(4)? {
            ValueRef::Integer(i) => i,
            _ => return Err("attempts is not a whole number".into()),
        };
        let content = match kind {
            Kind::Transition => {
                let status = text(col(6)?, "status")?.ok_or("status is NULL")?;
                let at = text(col(7)?, "partner_status_changed_at")?
                    .ok_or("partner_status_changed_at is NULL")?;
                let invoice = match col(8)? {
                    ValueRef::Null => None,
                    ValueRef::Integer(i) => Some(i),
                    _ => return Err("invoice_amount_in_cents is not a whole number".into()),
                };
                // An instant in UTC outside the years 0000-9999 (from before
                // schema 13) has no RFC 3339 form to send.
                if let Some(why) = crate::time::utc_z_problem(&at) {
                    return Err(why);
                }
                // SQLite could not read the instant (a zone offset beyond ±14:00 from
                // before schema 3): it cannot be ordered, so it is never "first in line".
                if matches!(col(9), Ok(ValueRef::Null) | Err(_)) {
                    return Err(format!(
                        "partner_status_changed_at {at:?} cannot be read as an instant (a zone offset beyond ±14:00?)"
                    ));
                }
                Content::Transition {
                    status,
                    partner_status_changed_at: at,
                    invoice_amount_in_cents: invoice,
                }
            }
            Kind::Message => {
                let text = text(col(6)?, "text")?.ok_or("text is NULL")?;
                if text.trim().is_empty() {
                    return Err("text is blank".into());
                }
                if text.chars().count() > 5000 {
                    return Err("text is longer than 5000 characters".into());
                }
                Content::Message { text }
            }
        };
        let business_filled = matches!(col(2)?, ValueRef::Null) && business_id.is_some();
        Ok(Claimed {
            kind,
            id,
            negotiation_id,
            business_id,
            content,
            attempt: attempts.saturating_add(1),
            claim_id: 0,
            late: false,
            business_filled,
        })
    };
    let behind = match r.get_ref(base + 5)? {
        ValueRef::Null => None,
        v => Some(Stored::of(v)),
    };
    Ok(Candidate {
        id,
        content: read(),
        behind,
    })
}

/// What a claim did with one candidate.
enum Taken {
    Claimed(Claimed),
    /// Put aside until its business may send.
    Parked,
    /// Failed alone: it cannot be read or sent.
    Dead,
    /// Not first in line after all.
    Skipped,
}

/// Marks a row that cannot be read or sent `dead`, alone, with why.
fn fail_alone(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    id: i64,
    why: &str,
    now: &str,
) -> Result<()> {
    let why = format!("cannot be sent: {why}; insert a corrected row");
    tx.execute(
        &format!(
            "INSERT INTO {} (outbox_id, attempt, started_at, http_status, outcome, error, duration_ms)
             SELECT id, CAST(attempts AS INTEGER), ?2, NULL, 'dead', ?3, 0 FROM {} WHERE id = ?1",
            kind.attempts_table(),
            kind.table()
        ),
        params![id, now, why],
    )?;
    let dead = tx.execute(
        &format!(
            "UPDATE {} SET state = 'dead', sending_since = NULL, waiting_for = NULL, last_error = ?2
              WHERE id = ?1",
            kind.table()
        ),
        params![id, why],
    )?;
    if dead == 0 {
        // A trigger's RAISE(IGNORE): the row is still first in line, and
        // taking it for dead would walk the claim back to it for ever.
        return Err(Untouchable("its UPDATE to `dead` was ignored".into()).into());
    }
    tracing::error!(outbox_id = id, kind = kind.as_str(), error = %why, "{} marked dead", kind.row_name());
    Ok(())
}

/// A row the table will not let the drainer change at all (a partner's
/// trigger refuses or ignores every UPDATE of it): it is left as it is.
#[derive(Debug)]
struct Untouchable(String);

impl std::fmt::Display for Untouchable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untouchable {}

/// A partner's trigger answered a change of row `id` with RAISE(ROLLBACK):
/// the transaction it was made in is gone (with whatever it had done). The
/// claim starts again without that row ([`claim`]); a finish records its
/// outcome again without claiming the next row ([`finish`]). `kind` says
/// which table: `outbox` and `message_outbox` count their ids apart, so an
/// id alone names a row of each.
#[derive(Debug)]
struct TransactionEnded {
    kind: Kind,
    id: i64,
    why: String,
}

impl std::fmt::Display for TransactionEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "row {} of {} undid the transaction: {}",
            self.id,
            self.kind.table(),
            self.why
        )
    }
}

impl std::error::Error for TransactionEnded {}

/// The rows already logged as untouchable, so that a claim every tick does
/// not log them every tick.
static UNTOUCHABLE_LOGGED: std::sync::Mutex<
    Option<std::collections::HashSet<(&'static str, i64)>>,
> = std::sync::Mutex::new(None);

/// Logs, once per row and process, that row `id` cannot be changed.
fn log_untouchable(kind: Kind, id: i64, why: &str) {
    let first = UNTOUCHABLE_LOGGED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Default::default)
        .insert((kind.table(), id));
    if first {
        tracing::error!(
            outbox_id = id,
            kind = kind.as_str(),
            error = %why,
            "{} cannot be changed by leadsync (a trigger of the database refuses it): \
             left as it is, unsent; the later rows of its negotiation wait behind it",
            kind.row_name()
        );
    }
}

/// Decides about one candidate (a pending, due, first-in-line row): fails
/// it alone, puts it aside for its business, or marks it `sending` and
/// counts the attempt. A row whose every change the table refuses (a
/// partner's trigger: RAISE(ABORT) or RAISE(IGNORE) on any UPDATE of it)
/// is left exactly as it was and skipped: it cannot be marked `sending`
/// nor `dead`, and failing the whole claim for it stalled every other row.
/// The later rows of its negotiation wait behind it (README, Outbox).
fn take(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    candidate: Candidate,
    filter: &ClaimFilter,
    now: &str,
    pins: &Pins,
) -> Result<Taken> {
    let id = candidate.id;
    tx.execute_batch("SAVEPOINT leadsync_take")?;
    let taken = take_row(tx, kind, candidate, filter, now, pins);
    let refused = match &taken {
        Ok(_) => None,
        Err(e) => e
            .downcast_ref::<Untouchable>()
            .map(|u| u.0.clone())
            .or_else(|| {
                e.downcast_ref::<rusqlite::Error>()
                    .and_then(super::constraint_message)
            }),
    };
    let Some(why) = refused else {
        // An error of another kind fails the claim: its transaction is
        // rolled back whole.
        let _ = tx.execute_batch("RELEASE leadsync_take");
        return taken;
    };
    if tx.is_autocommit() {
        // RAISE(ROLLBACK): the savepoint went with the transaction.
        return Err(TransactionEnded { kind, id, why }.into());
    }
    tx.execute_batch("ROLLBACK TO leadsync_take; RELEASE leadsync_take")?;
    log_untouchable(kind, id, &why);
    Ok(Taken::Skipped)
}

fn take_row(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    candidate: Candidate,
    filter: &ClaimFilter,
    now: &str,
    pins: &Pins,
) -> Result<Taken> {
    let id = candidate.id;
    let mut c = match candidate.content.clone() {
        Ok(c) => c,
        Err(why) => {
            fail_alone(tx, kind, id, &why, now)?;
            return Ok(Taken::Dead);
        }
    };
    // Behind a row put aside: it waits with it (it would only be walked
    // over, claim after claim, otherwise).
    if let Some(aside) = &candidate.behind {
        let waits = aside
            .business()
            .and_then(|b| Some((b, filter.wait_reason(b)?)));
        return match waits {
            Some((business_id, why)) => {
                park(tx, kind, id, business_id, &why, now, pins)?;
                Ok(Taken::Parked)
            }
            None => {
                // Put aside for a business that may send (by hand, since
                // the waits were last brought in line), or for nothing a
                // business could be (a BLOB, broken text): no claim walks
                // that row, so it comes back now, or this row waits for good
                // (or goes before it).
                let table = kind.table();
                let back = tx
                    .prepare_cached(&format!(
                        "UPDATE {table} SET waiting_for = NULL,
                             last_error = CASE WHEN state = 'pending' THEN NULL ELSE last_error END
                          WHERE negotiation_id = (SELECT negotiation_id FROM {table} WHERE id = ?1)
                            AND waiting_for = {}",
                        Stored::sql(2)
                    ))?
                    .execute(params![id, aside.value, aside.text])
                    .map_err(|e| other_row_refused(e, "a row of its negotiation put aside"))?;
                // Walked again from the start, where the row may now be
                // (only when one came back: the walk must end).
                Ok(if back > 0 {
                    Taken::Parked
                } else {
                    Taken::Skipped
                })
            }
        };
    }
    if let Some(business_id) = &c.business_id
        && let Some(why) = filter.wait_reason(business_id)
    {
        park(tx, kind, id, business_id, &why, now, pins)?;
        return Ok(Taken::Parked);
    }
    // One statement: the business is filled in (when the row names none)
    // as the row leaves `pending` (the frozen-content rule reads the old
    // state), and whether it is late comes back with it.
    c.claim_id = fastrand::i64(..);
    let marked = tx.prepare_cached(&mark_sending(kind, pins))?.query_row(
        params![id, c.attempt, now, c.business_id, c.claim_id],
        |r| r.get::<_, bool>(0),
    );
    match marked {
        Ok(late) => c.late = late,
        Err(rusqlite::Error::QueryReturnedNoRows) => {
            return Err(Untouchable("its UPDATE to `sending` was ignored".into()).into());
        }
        Err(e) => match super::constraint_message(&e) {
            // A RAISE(ROLLBACK) ended the claim's transaction: anything
            // written now would be written outside it, claim after claim.
            Some(msg) if tx.is_autocommit() => {
                return Err(TransactionEnded { kind, id, why: msg }.into());
            }
            Some(msg) => {
                fail_alone(tx, kind, id, &msg, now)?;
                return Ok(Taken::Dead);
            }
            None => return Err(e.into()),
        },
    }
    Ok(Taken::Claimed(c))
}

/// Marks row ?1 `sending` (?2, the attempt; ?3, now; ?4, its business when
/// it names none, recorded as filled in: `business_filled`, schema 22, so
/// that a recovery at start knows to take it back) and returns whether it
/// is late; ?5, the claim's own number (`claim_id`). The late check reads the
/// sent rows of the row's negotiation only: unnamed, without statistics,
/// the planner reads every sent row of the table (`{table}_by_state`).
fn mark_sending(kind: Kind, pins: &Pins) -> String {
    let table = kind.table();
    format!(
        "UPDATE {table} SET state = 'sending', attempts = ?2, sending_since = ?3, claim_id = ?5,
             business_id = COALESCE(business_id, ?4),
             business_filled = (business_id IS NULL AND ?4 IS NOT NULL),
             late = EXISTS (SELECT 1 FROM {table} s {sent}
                             WHERE s.negotiation_id = {table}.negotiation_id AND s.state = 'sent'
                               AND {after})
          WHERE id = ?1
          RETURNING late",
        sent = pins.by(&format!("{table}_sent_by_negotiation")),
        after = kind.goes_after("s", table)
    )
}

/// Puts one row aside for its business, with the pending rows of its
/// negotiation (they wait behind it anyway).
fn park(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    id: i64,
    business_id: &str,
    why: &str,
    now: &str,
    pins: &Pins,
) -> Result<()> {
    let table = kind.table();
    let parked = tx
        .prepare_cached(&format!(
            "UPDATE {table} SET waiting_for = ?2, last_error = ?3 WHERE id = ?1"
        ))?
        .execute(params![id, business_id, why])?;
    if parked == 0 {
        // A trigger's RAISE(IGNORE): the row is still first in line, and
        // taking it for put aside would walk the claim back to it for ever
        // (inside the claim's transaction, holding the write lock).
        return Err(Untouchable("its UPDATE putting it aside was ignored".into()).into());
    }
    tx.prepare_cached(&park_followers(kind, pins))?
        .execute(params![id, business_id, why])
        .map_err(|e| other_row_refused(e, "a later row of its negotiation"))?;
    tx.prepare_cached(
        "INSERT INTO outbox_waits (business_id, reason, since) VALUES (?1, ?2, ?3)
         ON CONFLICT (business_id) DO NOTHING",
    )?
    .execute(params![business_id, why, now])?;
    Ok(())
}

/// A trigger's refusal met while changing other rows of a candidate's
/// negotiation with it (`whose`): the candidate is left as it is too, and
/// the log says which row refused, not the candidate alone.
fn other_row_refused(e: rusqlite::Error, whose: &str) -> anyhow::Error {
    match super::constraint_message(&e) {
        Some(why) => Untouchable(format!("{whose} cannot be changed with it: {why}")).into(),
        None => e.into(),
    }
}

/// Puts aside (for ?2, why ?3) the pending rows of row ?1's negotiation
/// not aside yet that go after it (one that goes before it is first in
/// line, or behind another row: it does not wait for this one's
/// business), found in the index of open rows by negotiation. Unnamed,
/// the planner read every pending row of the table (`{table}_by_state`;
/// ~15 ms a row put aside with 100k pending): `state = 'pending'` alone
/// does not imply the index's `state IN ('pending', 'sending')`.
fn park_followers(kind: Kind, pins: &Pins) -> String {
    let table = kind.table();
    format!(
        "UPDATE {table} {open} SET waiting_for = ?2, last_error = ?3
          WHERE negotiation_id = (SELECT p.negotiation_id FROM {table} p WHERE p.id = ?1)
            AND state IN ('pending', 'sending') AND state = 'pending' AND waiting_for IS NULL
            AND EXISTS (SELECT 1 FROM {table} p WHERE p.id = ?1 AND {after})",
        open = pins.by(&format!("{table}_open_by_negotiation")),
        after = kind.goes_after(table, "p"),
    )
}

/// Puts aside the ready rows that name business ?1, with why (?2), found
/// in the index of ready rows by business: the statement [`sync_waits`]
/// runs (through [`update_rows`]), whole, for the test of its plan.
#[cfg(test)]
fn set_aside(kind: Kind, pins: &Pins) -> String {
    let (by, set, filter) = set_aside_parts(kind, pins);
    format!("UPDATE {} {by} SET {set} WHERE {filter}", kind.table())
}

/// [`set_aside`] in the parts [`update_rows`] takes.
fn set_aside_parts(kind: Kind, pins: &Pins) -> (String, &'static str, &'static str) {
    (
        pins.by(&format!("{}_ready_by_business", kind.table())),
        "waiting_for = ?1, last_error = ?2",
        "business_id = ?1 AND state = 'pending' AND waiting_for IS NULL",
    )
}

/// How [`update_rows`] goes past rows a partner's trigger answers with
/// RAISE(ROLLBACK): such an answer ends the transaction, so [`sync_waits`]
/// starts again, row by row (the bulk UPDATE does not say which row), and
/// then without each row that did it: (table, id), since `outbox` and
/// `message_outbox` count their ids apart (by id alone, the other table's
/// row of the same id was left where it was too, unsent for ever).
#[derive(Default)]
struct RowGuard {
    one_by_one: bool,
    skip: HashSet<(&'static str, i64)>,
}

/// The transaction of [`sync_waits`] ended under it (RAISE(ROLLBACK)): in
/// a bulk UPDATE (`None`), or on row `Some(id)`.
#[derive(Debug)]
struct UpdateEnded {
    table: &'static str,
    id: Option<i64>,
    why: String,
}

impl std::fmt::Display for UpdateEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(
                f,
                "row {id} of {} undid the transaction: {}",
                self.table, self.why
            ),
            None => write!(
                f,
                "a row of {} undid the transaction: {}",
                self.table, self.why
            ),
        }
    }
}

impl std::error::Error for UpdateEnded {}

/// `UPDATE {table} {by} SET {set} WHERE {filter}` over many rows, bound to
/// `values` (`?1`…). When the table refuses it (a partner's trigger on one
/// of the rows: see [`take`]), the rows are updated one by one and the ones
/// refused are left as they are: one row must not hold every other row of
/// every business where it was. A RAISE(ROLLBACK) is an [`UpdateEnded`]
/// (nothing may be written after it: it would be outside the transaction);
/// with `guard.one_by_one` the rows go one by one at once, past the rows in
/// `guard.skip`. Returns the rows changed.
fn update_rows(
    tx: &rusqlite::Transaction<'_>,
    guard: &RowGuard,
    table: &'static str,
    by: &str,
    set: &str,
    filter: &str,
    values: &[rusqlite::types::Value],
) -> Result<usize> {
    if !guard.one_by_one {
        match tx
            .prepare_cached(&format!("UPDATE {table} {by} SET {set} WHERE {filter}"))?
            .execute(rusqlite::params_from_iter(values))
        {
            Ok(n) => return Ok(n),
            Err(e) => match super::constraint_message(&e) {
                Some(_) if !tx.is_autocommit() => {}
                Some(why) => {
                    return Err(UpdateEnded {
                        table,
                        id: None,
                        why,
                    }
                    .into());
                }
                None => return Err(e.into()),
            },
        }
    }
    let ids: Vec<i64> = tx
        .prepare(&format!("SELECT id FROM {table} WHERE {filter}"))?
        .query_map(rusqlite::params_from_iter(values), |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut one = tx.prepare(&format!(
        "UPDATE {table} SET {set} WHERE ({filter}) AND id = ?{}",
        values.len() + 1
    ))?;
    let mut changed = 0;
    for id in ids {
        if guard.skip.contains(&(table, id)) {
            continue;
        }
        let mut bound = values.to_vec();
        bound.push(rusqlite::types::Value::Integer(id));
        match one.execute(rusqlite::params_from_iter(bound)) {
            Ok(n) => changed += n,
            Err(e) => match super::constraint_message(&e) {
                Some(why) if !tx.is_autocommit() => {
                    tracing::error!(outbox_id = id, table, error = %why,
                        "a row a trigger of the database will not let leadsync change is left as it is");
                }
                Some(why) => {
                    return Err(UpdateEnded {
                        table,
                        id: Some(id),
                        why,
                    }
                    .into());
                }
                None => return Err(e.into()),
            },
        }
    }
    Ok(changed)
}

/// Brings the rows put aside in line with `filter`: rows of a business that
/// may send again come back (due as they were), rows of a business that
/// started waiting are put aside, in bulk. Costs the number of waiting
/// businesses and of rows that move, never the rows that stay aside; the
/// drainer calls it when its view of the businesses changes.
/// A row a partner's trigger answers with RAISE(ROLLBACK) is left where it
/// is: the step starts again, row by row, without it (each row once, so
/// this ends), and the others move.
pub fn sync_waits(conn: &mut Connection, filter: &ClaimFilter) -> Result<()> {
    let mut guard = RowGuard::default();
    loop {
        match sync_waits_once(conn, filter, &guard) {
            Err(e) => match e.downcast::<UpdateEnded>() {
                Ok(ended) => match ended.id {
                    None if !guard.one_by_one => guard.one_by_one = true,
                    Some(id) if guard.skip.insert((ended.table, id)) => {
                        tracing::error!(outbox_id = id, table = ended.table, error = %ended.why,
                            "a row a trigger of the database will not let leadsync change is left as it is");
                    }
                    _ => return Err(ended.into()),
                },
                Err(e) => return Err(e),
            },
            done => return done,
        }
    }
}

/// [`sync_waits`] in one transaction, as `guard` says.
fn sync_waits_once(conn: &mut Connection, filter: &ClaimFilter, guard: &RowGuard) -> Result<()> {
    use rusqlite::types::Value;
    let now = crate::time::now();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let recorded: Vec<(String, String)> = tx
        .prepare("SELECT business_id, reason FROM outbox_waits")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut known = HashSet::new();
    let pins = Pins::read(&tx)?;
    for (business_id, reason) in recorded {
        match filter.wait_reason(&business_id) {
            None => {
                for kind in Kind::ALL {
                    let table = kind.table();
                    let b = [Value::Text(business_id.clone())];
                    update_rows(
                        &tx,
                        guard,
                        table,
                        "",
                        "waiting_for = NULL, last_error = NULL",
                        "waiting_for = ?1 AND state = 'pending'",
                        &b,
                    )?;
                    update_rows(
                        &tx,
                        guard,
                        table,
                        "",
                        "waiting_for = NULL",
                        "waiting_for = ?1",
                        &b,
                    )?;
                }
                tx.execute(
                    "DELETE FROM outbox_waits WHERE business_id = ?1",
                    [&business_id],
                )?;
            }
            Some(why) => {
                if why != reason {
                    for kind in Kind::ALL {
                        update_rows(
                            &tx,
                            guard,
                            kind.table(),
                            "",
                            "last_error = ?2",
                            "waiting_for = ?1 AND state = 'pending'",
                            &[Value::Text(business_id.clone()), Value::Text(why.clone())],
                        )?;
                    }
                    tx.execute(
                        "UPDATE outbox_waits SET reason = ?2 WHERE business_id = ?1",
                        params![business_id, why],
                    )?;
                }
                known.insert(business_id);
            }
        }
    }
    for (business_id, why) in &filter.waiting {
        if known.contains(business_id) {
            continue;
        }
        for kind in Kind::ALL {
            let table = kind.table();
            let b = [Value::Text(business_id.clone()), Value::Text(why.clone())];
            let (by, set, filter) = set_aside_parts(kind, &pins);
            update_rows(&tx, guard, table, &by, set, filter, &b)?;
            // Rows that name no business: theirs is their lead's.
            update_rows(
                &tx,
                guard,
                table,
                "",
                "waiting_for = ?1, last_error = ?2",
                "negotiation_id IN (SELECT negotiation_id FROM negotiations WHERE business_id = ?1)
                   AND business_id IS NULL AND state = 'pending' AND waiting_for IS NULL",
                &b,
            )?;
        }
        tx.execute(
            "INSERT INTO outbox_waits (business_id, reason, since) VALUES (?1, ?2, ?3)
             ON CONFLICT (business_id) DO UPDATE SET reason = excluded.reason",
            params![business_id, why, now],
        )?;
    }
    // Rows put aside for a business outside outbox_waits (a partner's
    // UPDATE of waiting_for, a DELETE FROM outbox_waits): nothing above
    // would ever bring them back. One index seek per business named.
    // A value that names no business (a BLOB, text that is not digits or
    // not UTF-8) comes back too; it is read and found again as stored.
    for kind in Kind::ALL {
        let table = kind.table();
        let mut last: Option<Stored> = None;
        loop {
            let read = |r: &rusqlite::Row<'_>| r.get_ref(0).map(Stored::of);
            let next = match &last {
                None => tx
                    .query_row(
                        &format!(
                            "SELECT waiting_for FROM {table} WHERE waiting_for IS NOT NULL
                              ORDER BY waiting_for LIMIT 1"
                        ),
                        [],
                        read,
                    )
                    .optional()?,
                Some(v) => tx
                    .query_row(
                        &format!(
                            "SELECT waiting_for FROM {table} WHERE waiting_for > {}
                              ORDER BY waiting_for LIMIT 1",
                            Stored::sql(1)
                        ),
                        params![v.value, v.text],
                        read,
                    )
                    .optional()?,
            };
            let Some(value) = next else { break };
            let waits = value
                .business()
                .and_then(|b| Some((b, filter.wait_reason(b)?)));
            match waits {
                Some((business_id, why)) => {
                    tx.execute(
                        "INSERT INTO outbox_waits (business_id, reason, since) VALUES (?1, ?2, ?3)
                         ON CONFLICT (business_id) DO NOTHING",
                        params![business_id, why, now],
                    )?;
                }
                None => {
                    let stored = Stored::sql(1);
                    let v = [value.value.clone(), Value::Integer(i64::from(value.text))];
                    update_rows(
                        &tx,
                        guard,
                        table,
                        "",
                        "waiting_for = NULL, last_error = NULL",
                        &format!("waiting_for IS {stored} AND state = 'pending'"),
                        &v,
                    )?;
                    update_rows(
                        &tx,
                        guard,
                        table,
                        "",
                        "waiting_for = NULL",
                        &format!("waiting_for IS {stored}"),
                        &v,
                    )?;
                }
            }
            last = Some(value);
        }
    }
    tx.commit()?;
    Ok(())
}

/// The due rows of `kind` that are first in line, from a point of the walk
/// on (see [`claim`]). Walks the due index in order and stops at a page:
/// unnamed, without statistics, the planner sorted every pending row for
/// each claim (`{table}_by_state`), which made draining 10,000 rows
/// quadratic. Rows put aside for their business are not in this index.
fn claim_select(kind: Kind, pins: &Pins) -> String {
    format!(
        "SELECT o.next_attempt_at, {columns}
           FROM {table} o {due}
           LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
          WHERE o.state = 'pending' AND o.waiting_for IS NULL
            AND o.next_attempt_at <= :due_by
            AND (:from_start
                 OR o.next_attempt_at > {after_at}
                 OR (o.next_attempt_at = {after_at} AND o.id > :after_id))
            AND {first_in_line}
          ORDER BY o.next_attempt_at, o.id
          LIMIT :page",
        columns = candidate_columns(kind, pins),
        due = pins.by(&format!("{}_due", kind.table())),
        table = kind.table(),
        first_in_line = first_in_line(kind, pins),
        after_at = "CASE WHEN :after_text THEN CAST(:after_at AS TEXT) ELSE :after_at END",
    )
}

/// SQL: due row `o` is one a claim takes a decision on — first in line in
/// its negotiation (or with no place in the order), or behind a row put
/// aside (to be put aside with it; a row put aside after it holds it
/// nothing back).
fn first_in_line(kind: Kind, pins: &Pins) -> String {
    format!(
        "({unordered}
                 -- a probe into an index of the rows put aside only
                 OR EXISTS (SELECT 1 FROM {table} w {waiting}
                             WHERE w.negotiation_id = o.negotiation_id
                               AND w.waiting_for IS NOT NULL AND {aside_before})
                 OR NOT EXISTS (
                SELECT 1 FROM {table} p
                 WHERE p.negotiation_id = o.negotiation_id
                   AND p.state IN ('pending', 'sending')
                   AND p.id <> o.id
                   AND (p.state = 'sending' OR {before})))",
        waiting = waiting_probe(kind, pins),
        table = kind.table(),
        unordered = kind.unordered(),
        before = kind.goes_before("p", "o"),
        aside_before = kind.goes_before("w", "o"),
    )
}

/// Whether any row of `kind` is pending, not put aside, due by `due_by`
/// and first in line: what [`claim_select`] walks (the same conditions, so
/// the same answer for values of any type), from the due index. A due row
/// held back by an earlier one of its negotiation (on a retry, or being
/// sent) is nothing to claim: counted, it took the write lock every tick
/// for as long as the earlier row's backoff lasted.
fn any_due(conn: &Connection, kind: Kind, due_by: &str, pins: &Pins) -> Result<bool> {
    Ok(conn
        .prepare_cached(&due_select(kind, pins))?
        .query_row([due_by], |r| r.get(0))?)
}

/// Whether a claim of `kind` by `due_by` would find a row to decide on
/// (see [`any_due`]), without claiming it.
pub fn any_claimable(conn: &Connection, kind: Kind, due_by: &str) -> Result<bool> {
    any_due(conn, kind, due_by, &Pins::read(conn)?)
}

/// [`any_due`]'s statement. Without the index named, SQLite reads every
/// pending row (by state).
fn due_select(kind: Kind, pins: &Pins) -> String {
    let table = kind.table();
    format!(
        "SELECT EXISTS (SELECT 1 FROM {table} o {due} WHERE o.state = 'pending'
             AND o.waiting_for IS NULL AND o.next_attempt_at <= ?1
             AND {first_in_line})",
        due = pins.by(&format!("{table}_due")),
        first_in_line = first_in_line(kind, pins),
    )
}

/// Claims up to `limit` rows due by `due_by`, at most one per negotiation
/// and only the first open row of each (in order of the instant, then id);
/// marks them `sending` and counts the attempt. On the way, a row that
/// cannot be read fails alone (`dead`), and a row whose business must wait
/// is put aside without counting an attempt.
pub fn claim(
    conn: &mut Connection,
    kind: Kind,
    due_by: &str,
    limit: usize,
    filter: &ClaimFilter,
) -> Result<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    // The drainer claims every tick: with nothing due it takes no write
    // lock, which a partner's own writer (often with SQLite's default busy
    // timeout of 0) would meet at random. A read neither waits for a writer
    // nor holds one up (WAL); a row due meanwhile is claimed next tick.
    if !any_due(conn, kind, due_by, &Pins::read(conn)?)? {
        return Ok(Vec::new());
    }
    // Rows whose change a partner's trigger answered with RAISE(ROLLBACK):
    // the claim's transaction went with it, and the walk starts again
    // without them (each row once, so this ends).
    let mut skip = HashSet::new();
    loop {
        match claim_walk(conn, kind, due_by, limit, filter, &skip) {
            Err(e) => match e.downcast::<TransactionEnded>() {
                Ok(ended) => {
                    // The walk touches rows of its own table only, so an
                    // id alone is enough to skip here (unlike sync_waits).
                    debug_assert_eq!(ended.kind, kind, "a claim walk ended on another table");
                    log_untouchable(kind, ended.id, &ended.why);
                    if !skip.insert(ended.id) {
                        return Err(ended.into());
                    }
                }
                Err(e) => return Err(e),
            },
            claimed => return claimed,
        }
    }
}

/// [`claim`]'s walk, in one transaction, past the rows in `skip`.
fn claim_walk(
    conn: &mut Connection,
    kind: Kind,
    due_by: &str,
    limit: usize,
    filter: &ClaimFilter,
    skip: &HashSet<i64>,
) -> Result<Vec<Claimed>> {
    let now = crate::time::now();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pins = Pins::read(&tx)?;
    // A page of `limit`: every candidate costs its negotiation's order check,
    // and most claims (a slot freed by one send) want one row.
    let page = limit.min(256);
    let mut claimed = Vec::new();
    // Where the walk is: `None` from the start (an explicit flag: any id,
    // i64::MIN included, is a row's). The last row's next_attempt_at is
    // kept as stored: text that is not UTF-8 (a NUL got it past schema 8's
    // check) cannot be read as a String, and failed every claim.
    let mut after: Option<(Stored, i64)> = None;
    loop {
        let (after_at, after_id) = after.clone().unwrap_or((
            Stored {
                value: rusqlite::types::Value::Null,
                text: false,
            },
            0,
        ));
        let candidates = {
            let mut select = tx.prepare_cached(&claim_select(kind, &pins))?;
            select
                .query_map(
                    rusqlite::named_params! {
                        ":due_by": due_by,
                        ":default_business": filter.default_business,
                        ":from_start": after.is_none(),
                        ":after_at": after_at.value,
                        ":after_text": after_at.text,
                        ":after_id": after_id,
                        ":page": page as i64,
                    },
                    |r| Ok((candidate_from_row(r, kind, 1)?, Stored::of(r.get_ref(0)?))),
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let full = candidates.len() == page;
        let mut set_aside = false;
        for (candidate, next_attempt_at) in candidates {
            if claimed.len() == limit {
                break;
            }
            after = Some((next_attempt_at, candidate.id));
            if skip.contains(&candidate.id) {
                continue;
            }
            match take(&tx, kind, candidate, filter, &now, &pins)? {
                Taken::Claimed(c) => claimed.push(c),
                Taken::Parked | Taken::Dead => set_aside = true,
                Taken::Skipped => {}
            }
        }
        if claimed.len() == limit {
            break;
        }
        if set_aside {
            // A row that died or was put aside may have held back later rows
            // of its negotiation, anywhere in the walk: walk again from the
            // start (each row leaves the walk once, so this ends).
            after = None;
        } else if !full {
            break;
        }
    }
    tx.commit()?;
    Ok(claimed)
}

/// The first open row of negotiation `:negotiation_id`, with what
/// [`claim_head_of`] checks, from the index of open rows.
fn head_select(kind: Kind, pins: &Pins) -> String {
    format!(
        "SELECT {columns}, o.state, o.next_attempt_at, o.waiting_for IS NULL,
                EXISTS (SELECT 1 FROM {table} s WHERE s.negotiation_id = o.negotiation_id
                          AND s.state = 'sending' AND s.id <> o.id)
           FROM {table} o {open}
           LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
          WHERE o.negotiation_id = :negotiation_id AND o.state IN ('pending', 'sending')
          ORDER BY {order}
          LIMIT 1",
        columns = candidate_columns(kind, pins),
        table = kind.table(),
        open = pins.by(&format!("{}_open_by_negotiation", kind.table())),
        order = kind.order(),
    )
}

/// Inside a transaction: claims the negotiation's first open row if it is
/// pending, due by `due_by`, not put aside, and no other row of the
/// negotiation is being sent (with the same checks as [`claim`]).
fn claim_head_of(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    negotiation_id: &str,
    due_by: &str,
    filter: &ClaimFilter,
) -> Result<Option<Claimed>> {
    let pins = Pins::read(tx)?;
    let mut select = tx.prepare_cached(&head_select(kind, &pins))?;
    let extra = candidate_len(kind);
    let head = select
        .query_row(
            rusqlite::named_params! {
                ":negotiation_id": negotiation_id,
                ":default_business": filter.default_business,
            },
            |r| {
                let due = match r.get_ref(extra + 1)? {
                    rusqlite::types::ValueRef::Text(t) => t <= due_by.as_bytes(),
                    _ => true,
                };
                Ok((
                    candidate_from_row(r, kind, 0)?,
                    matches!(
                        r.get_ref(extra)?,
                        rusqlite::types::ValueRef::Text(b"pending")
                    ),
                    due,
                    r.get::<_, bool>(extra + 2)?,
                    r.get::<_, bool>(extra + 3)?,
                ))
            },
        )
        .optional()?;
    let Some((candidate, pending, due, not_aside, other_sending)) = head else {
        return Ok(None);
    };
    if !pending || !due || !not_aside || other_sending {
        return Ok(None);
    }
    match take(tx, kind, candidate, filter, &crate::time::now(), &pins)? {
        Taken::Claimed(c) => Ok(Some(c)),
        Taken::Parked | Taken::Dead | Taken::Skipped => Ok(None),
    }
}

/// One HTTP attempt (or a wait without one), for `outbox_attempts`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub attempt: i64,
    pub started_at: String,
    pub http_status: Option<u16>,
    pub outcome: &'static str,
    pub error: Option<String>,
    pub trace_id: Option<String>,
    pub duration_ms: i64,
}

/// How a claimed row ends this time.
#[derive(Debug, Clone)]
pub enum Finish {
    /// With the id Thumbtack gave a sent message, when its response had one.
    Sent {
        message_id: Option<String>,
    },
    /// Back to pending until `next_attempt_at`.
    Retry {
        next_attempt_at: String,
    },
    Dead,
    /// Back to pending without counting the attempt: its business must be
    /// re-authorized (or configured) first.
    Hold,
}

/// After a row, which row of its negotiation may go next (see [`finish`]).
#[derive(Debug, Clone)]
pub struct NextOf<'a> {
    pub due_by: &'a str,
    pub filter: &'a ClaimFilter,
}

/// Whether [`finish`] could write the outcome on the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// The row took the outcome.
    Yes,
    /// The row was deleted while it was sent: nothing is written.
    RowDeleted,
    /// The row was changed while it was sent (canceled, put back to pending,
    /// edited, or claimed again): the attempts are recorded, the row keeps
    /// what the user did. The row's state now.
    RowChanged(String),
}

/// Records a claimed row's attempts and its new state, in one transaction,
/// only if the row is still `sending` with the content that was sent; with
/// `next`, also claims the next row of the same negotiation when it may go
/// now, so a negotiation's rows follow each other without a new search.
pub fn finish(
    conn: &mut Connection,
    row: &Claimed,
    finish: &Finish,
    attempts: &[Attempt],
    now: &str,
    next: Option<NextOf<'_>>,
) -> Result<(Recorded, Option<Claimed>)> {
    use rusqlite::types::Value;
    let id = row.id;
    let (table, attempts_table) = (row.kind.table(), row.kind.attempts_table());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let last = attempts.last();
    // The last HTTP status received (a token refusal after a 401 has none).
    let http_status = attempts.iter().rev().find_map(|a| a.http_status);
    let error = last.and_then(|a| a.error.clone());
    let trace_id = attempts.iter().rev().find_map(|a| a.trace_id.clone());
    let (state, next_attempt_at, attempts_change, message_id) = match finish {
        Finish::Sent { message_id } => ("sent", None, 0, message_id.clone()),
        Finish::Retry { next_attempt_at } => ("pending", Some(next_attempt_at.clone()), 0, None),
        Finish::Dead => ("dead", None, 0, None),
        Finish::Hold => ("pending", Some(now.to_string()), 1, None),
    };
    let text = |v: Option<String>| v.map_or(Value::Null, Value::Text);
    let int = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
    let mut values: Vec<Value> = vec![
        Value::Integer(id),
        Value::Text(state.into()),
        Value::Text(now.into()),
        text(next_attempt_at),
        Value::Integer(attempts_change),
        text(error),
        int(http_status.map(i64::from)),
        text(trace_id),
        text(message_id),
        Value::Null,
        Value::Text(row.negotiation_id.clone()),
        text(row.business_id.clone()),
    ];
    values.extend(row.content.values());
    values.push(Value::Integer(row.attempt));
    values.push(Value::Integer(row.claim_id));
    // Only on the row as it was sent: still `sending`, same content, same
    // claim (its claim_id, and its attempt number); anything else is what
    // the user did meanwhile (a row put back to pending by hand, with its
    // attempts reset, and claimed again is another claim).
    let same_row = format!(
        "id = ?1 AND state = 'sending' AND negotiation_id IS ?11 AND business_id IS ?12
         AND {} AND attempts IS ?{} AND claim_id IS ?{}",
        row.content.matches(13),
        values.len() - 1,
        values.len()
    );
    // A sent message keeps the id Thumbtack gave it.
    let message_id_column = match row.kind {
        Kind::Transition => "",
        Kind::Message => ", message_id = CASE WHEN ?2 = 'sent' THEN ?9 ELSE message_id END",
    };
    // A business the claim filled in stays only on a sent row: a row that
    // goes back to pending (or dead, to be retried) takes its lead's
    // business again at its next claim (SPEC §3), whichever it is by then.
    // Set back in steps: the content is frozen once a row left `pending`.
    let mut same_row = same_row;
    if row.business_filled && state != "sent" {
        let back = tx
            .prepare_cached(&format!(
                "UPDATE {table} SET state = 'pending' WHERE {same_row}"
            ))?
            .execute(rusqlite::params_from_iter(values.clone()))?;
        if back == 1 {
            same_row = same_row.replacen("state = 'sending'", "state = 'pending'", 1);
            // A row from before a check the table now makes is refused any
            // change of content: it keeps the business, its outcome still
            // written.
            match tx
                .prepare_cached(&format!(
                    "UPDATE {table} SET business_id = NULL, business_filled = 0 WHERE id = ?1"
                ))?
                .execute([id])
            {
                Ok(_) => {
                    same_row = same_row.replacen("business_id IS ?12", "business_id IS NULL", 1);
                }
                Err(e) if super::constraint_message(&e).is_some() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let updated = tx
        .prepare_cached(&format!(
            "UPDATE {table} SET state = ?2, sending_since = NULL,
                 sent_at = CASE WHEN ?2 = 'sent' THEN ?3 ELSE sent_at END,
                 next_attempt_at = COALESCE(?4, next_attempt_at),
                 attempts = max(attempts - ?5, 0),
                 last_error = CASE WHEN ?2 = 'sent' THEN NULL ELSE ?6 END,
                 last_http_status = ?7, last_trace_id = ?8{message_id_column}
              WHERE {same_row}"
        ))?
        .execute(rusqlite::params_from_iter(values))?;
    let recorded = if updated == 1 {
        Recorded::Yes
    } else {
        match tx
            .query_row(
                &format!("SELECT CASE WHEN typeof(state) = 'text' THEN state END FROM {table} WHERE id = ?1"),
                [id],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
        {
            None => Recorded::RowDeleted,
            Some(state) => Recorded::RowChanged(state.unwrap_or_default()),
        }
    };
    if recorded != Recorded::RowDeleted {
        let mut log = tx.prepare_cached(&format!(
            "INSERT INTO {attempts_table} (outbox_id, attempt, started_at, http_status, outcome,
                 error, trace_id, duration_ms)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8
              WHERE NOT EXISTS (SELECT 1 FROM {attempts_table}
                                 WHERE outbox_id = ?1 AND attempt = ?2 AND started_at IS ?3)"
        ))?;
        // Idempotent per request: a finish queued twice (a stop's round
        // dropped while its job still waited on the database thread, then
        // tried again) logs each request once.
        for a in attempts {
            log.execute(params![
                id,
                a.attempt,
                a.started_at,
                a.http_status,
                a.outcome,
                a.error,
                a.trace_id,
                a.duration_ms
            ])?;
        }
    }
    if recorded != Recorded::Yes {
        tx.commit()?;
        return Ok((recorded, None));
    }
    let claimed = match next {
        Some(next) => {
            match claim_head_of(&tx, row.kind, &row.negotiation_id, next.due_by, next.filter) {
                Ok(claimed) => claimed,
                // The next row's trigger undid the outcome with the claim:
                // recorded again, the next row left to a claim (which
                // walks past it).
                Err(e) if e.downcast_ref::<TransactionEnded>().is_some() => {
                    drop(tx);
                    return self::finish(conn, row, finish, attempts, now, None);
                }
                Err(e) => return Err(e),
            }
        }
        None => None,
    };
    tx.commit()?;
    Ok((Recorded::Yes, claimed))
}

/// At start-up: rows left `sending` by a process that stopped go back to
/// pending, due now, with the interrupted attempt recorded, and without the
/// business their claim filled in (`business_filled`), as after a failed
/// claim ([`finish`]). Returns their ids.
pub fn recover_sending(conn: &mut Connection, now: &str) -> Result<Vec<(Kind, i64)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut recovered = Vec::new();
    for kind in Kind::ALL {
        let why = format!(
            "interrupted: leadsync stopped before the response was recorded; \
             the {} may or may not have reached Thumbtack and is sent again",
            match kind {
                Kind::Transition => "transition",
                Kind::Message => "message",
            }
        );
        let table = kind.table();
        // Row by row: a row a partner's trigger will not let change (see
        // [`take`]) is left `sending` as it is, and the others still come
        // back. Refusing the whole recovery for it stopped every start.
        let left: Vec<i64> = tx
            .prepare(&format!("SELECT id FROM {table} WHERE state = 'sending'"))?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut log = tx.prepare(&format!(
            "INSERT INTO {} (outbox_id, attempt, started_at, http_status, outcome, error)
             SELECT id, attempts, COALESCE(sending_since, ?1), NULL, 'interrupted', ?2
               FROM {table} WHERE id = ?3 AND state = 'sending'",
            kind.attempts_table(),
        ))?;
        let mut back = tx.prepare(&format!(
            "UPDATE {table} SET state = 'pending', next_attempt_at = ?1, sending_since = NULL,
                 last_error = ?2, last_http_status = NULL
              WHERE id = ?3 AND state = 'sending' RETURNING business_filled IS 1"
        ))?;
        // In a second step: the content is frozen while the row is not
        // `pending`. A row from before a check the table now makes is
        // refused any change of content: it keeps the business (as in
        // `finish`).
        let mut unfill = tx.prepare(&format!(
            "UPDATE {table} SET business_id = NULL, business_filled = 0 WHERE id = ?1"
        ))?;
        for id in left {
            tx.execute_batch("SAVEPOINT leadsync_recover")?;
            log.execute(params![now, why, id])?;
            let filled = match back
                .query_row(params![now, why, id], |r| r.get::<_, bool>(0))
                .optional()
            {
                Ok(Some(filled)) => filled,
                Ok(None) => {
                    tx.execute_batch("ROLLBACK TO leadsync_recover; RELEASE leadsync_recover")?;
                    tracing::error!(
                        outbox_id = id,
                        kind = kind.as_str(),
                        "{} left `sending` cannot be set back to pending (a trigger of the database ignores the change): left as it is",
                        kind.row_name()
                    );
                    continue;
                }
                Err(e) => match super::constraint_message(&e) {
                    Some(why) if !tx.is_autocommit() => {
                        tx.execute_batch("ROLLBACK TO leadsync_recover; RELEASE leadsync_recover")?;
                        tracing::error!(outbox_id = id, kind = kind.as_str(), error = %why,
                            "{} left `sending` cannot be set back to pending (a trigger of the database refuses it): left as it is",
                            kind.row_name());
                        continue;
                    }
                    _ => return Err(e.into()),
                },
            };
            if filled {
                match unfill.execute([id]) {
                    Ok(_) => {}
                    Err(e) if super::constraint_message(&e).is_some() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            tx.execute_batch("RELEASE leadsync_recover")?;
            recovered.push((kind, id));
        }
    }
    tx.commit()?;
    Ok(recovered)
}

/// The longest wait leadsync itself puts in `next_attempt_at` after an
/// attempt: a retry is due before the wall clock plus 8 days (the backoff
/// and `Retry-After` are capped at 7), counted from the end of the
/// attempt, which started (`started_at` of its log) at most a request's
/// time before — an hour is ample.
pub const LONGEST_OWN_WAIT: chrono::TimeDelta = chrono::TimeDelta::hours(8 * 24 + 1);

/// After the wall clock went back (it was ahead, then corrected; checked
/// at start, and by the drainer when it sees the clock step back): a
/// pending row whose last logged attempt started after `now` — a time
/// only a clock ahead could have written — and whose `next_attempt_at`
/// lies after it by no more than leadsync's own longest wait
/// ([`LONGEST_OWN_WAIT`]) was scheduled by leadsync under that clock. It
/// would wait until the wrong clock's time; it is due instead after the
/// same wait counted from `now` (so a backoff or a `Retry-After` is still
/// waited out in full since the attempt), or at once when it has no
/// attempt counted (a hold, or a dead row retried, due at once when they
/// were written). A `next_attempt_at` the partner wrote is left alone: on
/// a row never tried (no attempt log), on one whose last attempt was
/// logged with the clock right, or one earlier than that attempt or later
/// than leadsync's longest wait after it. A wait once rebased is counted
/// from then on from the rebase (`wait_rebased_at` of the attempt, schema
/// 23), not from the attempt: rebased again only if the clock went back
/// before that rebase too, and with the wait it had then — a rebase
/// repeated at every look would shorten it each time. Returns the rows
/// changed.
///
/// A row a partner's trigger answers with RAISE(ROLLBACK) keeps its wait:
/// the transaction went with it, and the rebase starts again without that
/// row (each row once, so this ends).
pub fn rebase_future_waits(conn: &mut Connection, now: &str) -> Result<Vec<(Kind, i64)>> {
    let mut skip = HashSet::new();
    loop {
        match rebase_future_waits_once(conn, now, &skip) {
            Err(e) => match e.downcast::<TransactionEnded>() {
                Ok(ended) => {
                    tracing::error!(outbox_id = ended.id, table = ended.kind.table(), error = %ended.why,
                        "a row a trigger of the database will not let leadsync change keeps its wait");
                    // By table and id: the two tables count ids apart.
                    if !skip.insert((ended.kind, ended.id)) {
                        return Err(ended.into());
                    }
                }
                Err(e) => return Err(e),
            },
            done => return done,
        }
    }
}

/// [`rebase_future_waits`] in one transaction, past the rows in `skip`.
fn rebase_future_waits_once(
    conn: &mut Connection,
    now: &str,
    skip: &HashSet<(Kind, i64)>,
) -> Result<Vec<(Kind, i64)>> {
    let Some(now_t) = crate::time::parse(now) else {
        return Ok(Vec::new());
    };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pins = Pins::read(&tx)?;
    let mut changed = Vec::new();
    for kind in Kind::ALL {
        let attempts_table = kind.attempts_table();
        let mut rows: Vec<(i64, i64, String)> = Vec::new();
        for aside in [false, true] {
            let mut stmt = tx.prepare_cached(&rebase_select(kind, &pins, aside))?;
            let found = stmt.query_map([now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?.unwrap_or(0),
                    r.get::<_, Option<String>>(2)?,
                ))
            })?;
            for row in found {
                if let (id, attempts, Some(next)) = row? {
                    rows.push((id, attempts, next));
                }
            }
        }
        let mut last_tried = tx.prepare_cached(&format!(
            "SELECT id, started_at, wait_rebased_at FROM {attempts_table}
              WHERE outbox_id = ?1 ORDER BY id DESC LIMIT 1"
        ))?;
        let mut set = tx.prepare_cached(&format!(
            "UPDATE {} SET next_attempt_at = ?3
              WHERE id = ?1 AND state = 'pending' AND next_attempt_at IS ?2",
            kind.table()
        ))?;
        let mut mark = tx.prepare_cached(&format!(
            "UPDATE {attempts_table} SET wait_rebased_at = ?2 WHERE id = ?1"
        ))?;
        for (id, attempts, next) in rows {
            if skip.contains(&(kind, id)) {
                continue;
            }
            let Some((log, tried, rebased)) = last_tried
                .query_row([id], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                })
                .optional()?
            else {
                continue;
            };
            // The wait runs from the last rebase, or else the attempt.
            let (Some(from), Some(next_t)) = (
                rebased.or(tried).as_deref().and_then(crate::time::parse),
                crate::time::parse(&next),
            ) else {
                continue;
            };
            let own = from > now_t && next_t >= from && next_t - from <= LONGEST_OWN_WAIT;
            if !own {
                continue;
            }
            let due = if attempts > 0 {
                now_t + (next_t - from)
            } else {
                now_t
            };
            // A row a partner's trigger will not let change keeps its wait
            // (see [`take`]): refusing the start for it stopped everything.
            // A RAISE(ROLLBACK) ended the transaction: nothing may be
            // written after it (it would be outside it, and the commit fails).
            let set_it = match set.execute(params![id, next, crate::time::fmt(due)]) {
                Ok(n) => n,
                Err(e) => match super::constraint_message(&e) {
                    Some(why) if tx.is_autocommit() => {
                        return Err(TransactionEnded { kind, id, why }.into());
                    }
                    Some(_) => 0,
                    None => return Err(e.into()),
                },
            };
            if set_it == 1 {
                mark.execute(params![log, now])?;
                changed.push((kind, id));
            }
        }
    }
    tx.commit()?;
    Ok(changed)
}

/// The pending rows not due by ?1 ([`rebase_future_waits`]), `o`: those
/// ready from the due index, or (`aside`) those put aside from the index
/// of rows aside. Unnamed, the planner read every pending row
/// (`{table}_by_state`), inside a write transaction.
fn rebase_select(kind: Kind, pins: &Pins, aside: bool) -> String {
    let table = kind.table();
    if aside {
        format!(
            "SELECT o.id, o.attempts, o.next_attempt_at FROM {table} o {waiting}
              WHERE o.waiting_for IS NOT NULL AND o.state = 'pending' AND o.next_attempt_at > ?1",
            waiting = pins.by(&format!("{table}_waiting_by_negotiation"))
        )
    } else {
        format!(
            "SELECT o.id, o.attempts, o.next_attempt_at FROM {table} o {due}
              WHERE o.state = 'pending' AND o.waiting_for IS NULL AND o.next_attempt_at > ?1",
            due = pins.by(&format!("{table}_due"))
        )
    }
}

/// Row counts by state and the oldest pending row's creation time.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    pub pending: i64,
    pub sending: i64,
    pub sent: i64,
    pub dead: i64,
    pub canceled: i64,
    pub oldest_pending_created_at: Option<String>,
}

/// Counts `outbox` rows (transitions) by state.
pub fn counts(conn: &Connection) -> Result<Counts> {
    counts_of(conn, Kind::Transition)
}

/// Rows whose `created_at` is a time (the partner's program may write the
/// column itself): a BLOB sorts after every text and text such as `1 hour
/// ago` before every time, so `min(created_at)` over them was no time (and
/// read as a BLOB, an error) and the age of the oldest pending row was lost.
pub const TIME_SHAPED_CREATED_AT: &str = "typeof(created_at) = 'text'
    AND created_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*'";

/// Counts the rows of one kind's table by state.
pub fn counts_of(conn: &Connection, kind: Kind) -> Result<Counts> {
    let table = kind.table();
    let mut c = Counts::default();
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT state, count(*) FROM {table} GROUP BY state"
    ))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (state, n) = row?;
        match state.as_str() {
            "pending" => c.pending = n,
            "sending" => c.sending = n,
            "sent" => c.sent = n,
            "dead" => c.dead = n,
            "canceled" => c.canceled = n,
            _ => {}
        }
    }
    c.oldest_pending_created_at = conn
        .query_row(
            &format!(
                "SELECT min(created_at) FROM {table}
                  WHERE state IN ('pending', 'sending') AND {TIME_SHAPED_CREATED_AT}"
            ),
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(c)
}

/// Pending rows of both tables whose business (the row's, or its lead's) is
/// one of `businesses`.
pub fn pending_for(conn: &Connection, businesses: &[String]) -> Result<i64> {
    let businesses = serde_json::to_string(businesses)?;
    let mut total = 0;
    for kind in Kind::ALL {
        total += conn.query_row(
            &format!(
                "SELECT count(*) FROM {} o LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
                  WHERE o.state = 'pending'
                    AND COALESCE(o.business_id, n.business_id) IN (SELECT value FROM json_each(?1))",
                kind.table()
            ),
            [&businesses],
            |r| r.get::<_, i64>(0),
        )?;
    }
    Ok(total)
}

/// The earliest `next_attempt_at` of a pending row of either table, to know
/// when to look again.
pub fn next_due(conn: &Connection) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT min(t) FROM (
                 SELECT min(next_attempt_at) AS t FROM outbox
                  WHERE state = 'pending' AND waiting_for IS NULL
                 UNION ALL
                 SELECT min(next_attempt_at) FROM message_outbox
                  WHERE state = 'pending' AND waiting_for IS NULL)",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
}

/// A reply to enqueue, as `leadsync reply` takes it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub negotiation_id: String,
    pub business_id: Option<String>,
    pub text: String,
}

/// Inserts one `message_outbox` row through the table's own validation; the
/// error is the table's message (`message_outbox: text must be ...`).
pub fn enqueue_message(conn: &Connection, m: &NewMessage) -> Result<i64> {
    let r = conn.execute(
        "INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES (?1, ?2, ?3)",
        params![m.negotiation_id, m.business_id, m.text],
    );
    match r {
        Ok(_) => Ok(conn.last_insert_rowid()),
        Err(e) if super::is_busy(&e) => bail!(
            "the database stayed locked by another program for {} s; nothing was written — try again",
            super::BUSY_TIMEOUT.as_secs()
        ),
        Err(e) => match super::constraint_message(&e) {
            Some(msg) => bail!("rejected: {msg}"),
            None => Err(e.into()),
        },
    }
}

/// What the drainer must know before it posts a reply again whose earlier
/// attempt may have reached Thumbtack (README, Messages): a reply is not
/// idempotent, so it first looks for it in the lead's conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyCheck {
    /// One `(start, end)` per attempt of the row whose outcome is unknown
    /// (no answer — a connection reset, a timeout, a kill —, a 5xx: a
    /// gateway may answer one after the API acted —, or a 2xx whose body
    /// was lost), oldest first: its start, and its start and duration (its
    /// start alone for an attempt cut by a kill, whose start is its claim).
    /// Thumbtack took a reply of that attempt within it, but for its own
    /// lag and the clocks' difference; never between two of them, when
    /// the row waited for its retry and nothing of it was in flight.
    pub windows: Vec<(String, String)>,
    /// The ids Thumbtack gave the negotiation's other sent replies: a
    /// message with one of them is not this reply.
    pub taken: HashSet<String>,
    /// Another row of the negotiation with the same text was tried or sent
    /// from the clocks' slack twice over before the first window's start on: a message
    /// of that text found in the conversation may be that row's, so the
    /// conversation cannot tell, and the reply is posted (a duplicate
    /// rather than a reply lost).
    pub twin: bool,
}

/// The earlier attempts of `message_outbox` row ?1 whose outcome is unknown.
const UNKNOWN_OUTCOMES: &str = "SELECT started_at, duration_ms FROM message_outbox_attempts
  WHERE outbox_id = ?1 AND outcome IN ('retry', 'interrupted', 'dead')
    AND (http_status IS NULL OR http_status < 300 OR http_status >= 500)";

/// Whether another row of negotiation ?1 than ?2 with text ?3 was sent,
/// is being sent, or was tried from ?4 on. Each state through the index
/// of its own: while an outage makes every retry's outcome unknown, every
/// reply retried asks this, and a walk of the whole table (or of every
/// sent row, which the planner chose without statistics) each time would
/// hold the database up. Dead rows are walked by state (a few, as a rule).
fn twin_of_reply(pins: &Pins) -> String {
    let tried = "EXISTS (SELECT 1 FROM message_outbox_attempts a
                          WHERE a.outbox_id = o.id AND a.started_at >= ?4)";
    format!(
        "SELECT EXISTS (SELECT 1 FROM message_outbox o {sent}
                 WHERE o.negotiation_id = ?1 AND o.state = 'sent' AND o.id <> ?2
                   AND o.text IS ?3 AND o.sent_at >= ?4)
             OR EXISTS (SELECT 1 FROM message_outbox o {open}
                 WHERE o.negotiation_id = ?1 AND o.state IN ('pending', 'sending') AND o.id <> ?2
                   AND o.text IS ?3 AND (o.state = 'sending' OR {tried}))
             OR EXISTS (SELECT 1 FROM message_outbox o
                 WHERE o.state = 'dead' AND o.negotiation_id = ?1 AND o.id <> ?2
                   AND o.text IS ?3 AND {tried})",
        sent = pins.by("message_outbox_sent_by_negotiation"),
        open = pins.by("message_outbox_open_by_negotiation"),
    )
}

/// Whether reply `id` (of `negotiation_id`, with `text`) must be looked
/// for in its conversation before it is posted again; `None` when none of
/// its attempts may have reached Thumbtack. `slack`: how far the clocks
/// (Thumbtack's, this one) may differ (the caller's policy).
pub fn reply_check(
    conn: &Connection,
    id: i64,
    negotiation_id: &str,
    text: &str,
    slack: chrono::TimeDelta,
) -> Result<Option<ReplyCheck>> {
    let mut windows = conn
        .prepare_cached(UNKNOWN_OUTCOMES)?
        .query_map([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?
        .map(|r| {
            let (start, ms) = r?;
            let ms = ms.unwrap_or(0).clamp(0, 8 * 86_400_000);
            let end = crate::time::parse(&start).map_or_else(
                || start.clone(),
                |t| crate::time::fmt(t + chrono::TimeDelta::milliseconds(ms)),
            );
            Ok((start, end))
        })
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // Starts as written (the database's own format, compared as text like
    // every date of it).
    windows.sort();
    let Some(since) = windows.first().map(|(s, _)| s.clone()) else {
        return Ok(None);
    };
    let taken = conn
        .prepare_cached(
            "SELECT message_id FROM message_outbox
              WHERE negotiation_id = ?1 AND state = 'sent' AND id <> ?2 AND message_id IS NOT NULL",
        )?
        .query_map(params![negotiation_id, id], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<HashSet<_>>>()?;
    let around = crate::time::parse(&since)
        .map(|t| crate::time::fmt(t - slack * 2))
        .unwrap_or_default();
    let twin = conn
        .prepare_cached(&twin_of_reply(&Pins::read(conn)?))?
        .query_row(params![negotiation_id, id, text, around], |r| r.get(0))?;
    Ok(Some(ReplyCheck {
        windows,
        taken,
        twin,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAR: &str = "9999-01-01T00:00:00.000Z";

    #[test]
    fn a_reply_is_checked_only_after_an_attempt_that_may_have_reached_thumbtack() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        conn.execute_batch(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('5', 'hi'), ('5', 'hi'), ('5', 'ho');
             INSERT INTO message_outbox_attempts (outbox_id, attempt, started_at, http_status, outcome)
             VALUES (1, 1, '2026-01-01T10:00:00.000Z', 429, 'retry'),
                    (1, 2, '2026-01-01T10:01:00.000Z', 403, 'retry'),
                    (1, 3, '2026-01-01T10:02:00.000Z', 401, 'refresh');",
        )
        .unwrap();
        let slack = chrono::TimeDelta::minutes(5);
        let check = |id: i64, text: &str| reply_check(&conn, id, "5", text, slack).unwrap();
        // Refused each time: it never reached the API's action.
        assert_eq!(check(1, "hi"), None);
        conn.execute_batch(
            "INSERT INTO message_outbox_attempts (outbox_id, attempt, started_at, http_status, outcome)
             VALUES (1, 4, '2026-01-01T10:04:00.000Z', NULL, 'retry'),
                    (1, 5, '2026-01-01T10:03:00.000Z', 502, 'retry'),
                    (1, 6, '2026-01-01T10:03:30.000Z', 503, 'retry'),
                    (3, 1, '2026-01-01T10:03:00.000Z', 200, 'retry');
             UPDATE message_outbox SET state = 'sent', sent_at = '2026-01-01T09:40:00.000Z',
                 message_id = 'm2' WHERE id = 2;",
        )
        .unwrap();
        conn.execute(
            "UPDATE message_outbox_attempts SET duration_ms = 60000 WHERE attempt = 6",
            [],
        )
        .unwrap();
        // Each unknown outcome on its own, oldest first: from its start to
        // its end (10:03:30 for a minute; without a duration, its start);
        // the other sent reply's id is taken; the same text sent 20 minutes
        // before is no twin.
        let w = |a: &str, b: &str| {
            (
                format!("2026-01-01T{a}.000Z"),
                format!("2026-01-01T{b}.000Z"),
            )
        };
        assert_eq!(
            check(1, "hi"),
            Some(ReplyCheck {
                windows: vec![
                    w("10:03:00", "10:03:00"),
                    w("10:03:30", "10:04:30"),
                    w("10:04:00", "10:04:00"),
                ],
                taken: HashSet::from(["m2".to_string()]),
                twin: false
            })
        );
        // Sent within twice the slack before: a twin.
        conn.execute(
            "UPDATE message_outbox SET sent_at = '2026-01-01T09:54:00.000Z' WHERE id = 2",
            [],
        )
        .unwrap();
        assert!(check(1, "hi").unwrap().twin);
        // A row of another text is none.
        assert!(!check(3, "ho").unwrap().twin);
        // A dead twin tried around then, and one being sent.
        conn.execute_batch(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('5', 'ho'), ('5', 'ho');
             UPDATE message_outbox SET state = 'dead' WHERE id = 4;
             INSERT INTO message_outbox_attempts (outbox_id, attempt, started_at, http_status, outcome)
             VALUES (4, 1, '2026-01-01T09:59:00.000Z', NULL, 'dead');",
        )
        .unwrap();
        assert!(check(3, "ho").unwrap().twin);
        conn.execute_batch("UPDATE message_outbox SET state = 'canceled' WHERE id = 4;")
            .unwrap();
        assert!(!check(3, "ho").unwrap().twin);
        conn.execute_batch(
            "UPDATE message_outbox SET state = 'sending', attempts = 1, sending_since = 't' WHERE id = 5;",
        )
        .unwrap();
        assert!(check(3, "ho").unwrap().twin);
        // Each state through the negotiation's index, never every sent row.
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                twin_of_reply(&Pins::read(&conn).unwrap())
            ))
            .unwrap()
            .query_map(params!["5", 1, "hi", "t"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            plan.iter()
                .any(|p| p.contains("message_outbox_sent_by_negotiation"))
                && plan
                    .iter()
                    .any(|p| p.contains("message_outbox_open_by_negotiation"))
                && plan
                    .iter()
                    .all(|p| !p.starts_with("SCAN") || p.contains("CONSTANT ROW")),
            "{plan:?}"
        );
    }

    /// Business 7 may send; business 8 waits.
    fn filter() -> ClaimFilter {
        ClaimFilter {
            waiting: HashMap::from([("8".to_string(), "waiting: a test".to_string())]),
            configured: Arc::new(HashSet::from(["7".to_string(), "8".to_string()])),
            default_business: None,
        }
    }

    /// One pending row of `kind`, `n`th of its negotiation in order.
    fn insert(
        conn: &Connection,
        kind: Kind,
        negotiation_id: &str,
        business_id: &str,
        n: u32,
    ) -> i64 {
        match kind {
            Kind::Transition => conn.execute(
                "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
                 VALUES (?1, ?2, 'appt_scheduled', ?3)",
                params![negotiation_id, business_id, format!("2024-06-14T09:3{n}:00Z")],
            ),
            Kind::Message => conn.execute(
                "INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES (?1, ?2, 'hi')",
                params![negotiation_id, business_id],
            ),
        }
        .unwrap();
        conn.last_insert_rowid()
    }

    fn sent(conn: &mut Connection, row: &Claimed, next: bool) -> Option<Claimed> {
        let filter = filter();
        let next = next.then_some(NextOf {
            due_by: FAR,
            filter: &filter,
        });
        let (recorded, claimed) = finish(
            conn,
            row,
            &Finish::Sent { message_id: None },
            &[],
            &crate::time::now(),
            next,
        )
        .unwrap();
        assert_eq!(recorded, Recorded::Yes);
        claimed
    }

    /// What every row of `kind` waits for, in id order.
    fn waits(conn: &Connection, kind: Kind) -> Vec<(i64, String, Option<String>)> {
        conn.prepare(&format!(
            "SELECT id, state, waiting_for FROM {} ORDER BY id",
            kind.table()
        ))
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    /// Claims what is due and marks it sent; returns the ids claimed.
    fn send_due(conn: &mut Connection, kind: Kind) -> Vec<i64> {
        let claimed = claim(conn, kind, FAR, 10, &filter()).unwrap();
        for c in &claimed {
            sent(conn, c, false);
        }
        let mut ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids
    }

    /// Rows put aside wait for the row that put them aside, not for its
    /// business alone: when that row is moved to another business or
    /// negotiation, deleted, or leaves `pending` (by SQL or `cancel`), in
    /// either table, the rows behind it are decided again at the next
    /// claim. They stayed aside for business 9 (not configured) for good.
    #[test]
    fn rows_put_aside_behind_a_row_come_back_when_that_row_changes_or_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        for kind in Kind::ALL {
            let table = kind.table();
            let sql = |c: &mut Connection, s: &str, id: i64| {
                c.execute(&s.replace("{table}", table), [id]).unwrap();
            };
            for way in 0..5 {
                let negotiation = format!("{}", 100 + way);
                let leader = insert(&conn, kind, &negotiation, "9", 1);
                let follower = insert(&conn, kind, &negotiation, "7", 2);
                assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
                let aside = |conn: &Connection, id: i64| {
                    waits(conn, kind).into_iter().find(|w| w.0 == id).unwrap().2
                };
                assert_eq!(aside(&conn, follower).as_deref(), Some("9"));
                match way {
                    0 => sql(
                        &mut conn,
                        "UPDATE {table} SET business_id = '7' WHERE id = ?1",
                        leader,
                    ),
                    1 => sql(
                        &mut conn,
                        "UPDATE {table} SET negotiation_id = '999' WHERE id = ?1",
                        leader,
                    ),
                    2 => sql(&mut conn, "DELETE FROM {table} WHERE id = ?1", leader),
                    3 => sql(
                        &mut conn,
                        "UPDATE {table} SET state = 'canceled' WHERE id = ?1",
                        leader,
                    ),
                    _ => assert_eq!(
                        cancel(&mut conn, kind, &[leader]).unwrap(),
                        [(leader, Ok(()))]
                    ),
                }
                if way == 0 {
                    // In order: the leader, then the follower.
                    assert_eq!(send_due(&mut conn, kind), [leader], "{kind:?} way {way}");
                }
                assert_eq!(
                    send_due(&mut conn, kind),
                    [follower],
                    "{kind:?} way {way}: {:?}",
                    waits(&conn, kind)
                );
                if way == 1 {
                    // The moved row, alone in its negotiation, is aside again.
                    assert_eq!(aside(&conn, leader).as_deref(), Some("9"));
                    sql(&mut conn, "DELETE FROM {table} WHERE id = ?1", leader);
                }
            }
            assert!(
                waits(&conn, kind)
                    .iter()
                    .all(|w| w.2.is_none() && w.1 != "pending"),
                "{kind:?}: {:?}",
                waits(&conn, kind)
            );
            // A row behind the one that must wait goes (canceled): the rest
            // are decided again and put back aside; nothing overtakes the
            // leader, still pending.
            let leader = insert(&conn, kind, "200", "9", 1);
            let middle = insert(&conn, kind, "200", "7", 2);
            let last = insert(&conn, kind, "200", "7", 3);
            assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
            sql(
                &mut conn,
                "UPDATE {table} SET state = 'canceled' WHERE id = ?1",
                middle,
            );
            assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
            let w = waits(&conn, kind);
            for id in [leader, last] {
                let row = w.iter().find(|r| r.0 == id).unwrap();
                assert_eq!((row.1.as_str(), row.2.as_deref()), ("pending", Some("9")));
            }
            // The follower moved to a business that may send still waits
            // behind its leader.
            sql(
                &mut conn,
                "UPDATE {table} SET business_id = '7' WHERE id = ?1",
                last,
            );
            assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
            let w = waits(&conn, kind);
            assert!(
                w.iter()
                    .filter(|r| r.0 == leader || r.0 == last)
                    .all(|r| r.2.as_deref() == Some("9"))
            );
        }
    }

    /// Schema 20 on rows put aside before it: only the rows stranded (their
    /// negotiation has no pending row of the business they wait for) wait
    /// for nothing; the rest stay aside. It freed every row put aside, and
    /// the business, still in outbox_waits, was never put aside again in
    /// bulk: the first claim walked and put back aside every negotiation's
    /// head, one by one, holding the write lock (25 minutes for 100k rows).
    #[test]
    fn schema_20_frees_only_the_rows_stranded_and_leaves_the_claim_nothing_to_put_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        // Schema 18 had no trigger following the row that put rows aside.
        for t in ["outbox", "message_outbox"] {
            conn.execute_batch(&format!(
                "DROP TRIGGER {t}_waits_follow_update; DROP TRIGGER {t}_waits_follow_delete;"
            ))
            .unwrap();
        }
        let mut stranded = HashSet::new();
        for kind in Kind::ALL {
            let table = kind.table();
            let mut leaders = Vec::new();
            // Business 8 waits (filter), business 9 is not configured.
            for n in 0..60 {
                let negotiation = format!("{}", 1000 + n);
                let business = if n % 2 == 0 { "8" } else { "9" };
                leaders.push(insert(&conn, kind, &negotiation, business, 1));
                insert(&conn, kind, &negotiation, "7", 2);
                insert(&conn, kind, &negotiation, business, 3);
            }
            assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
            assert!(waits(&conn, kind).iter().all(|w| w.2.is_some()));
            // Stranded before schema 20: a leader deleted, moved to another
            // business, canceled; (the third row of each waits for the
            // business it names, and stays aside).
            let edits = [
                format!("DELETE FROM {table} WHERE id = {}", leaders[0]),
                format!("DELETE FROM {table} WHERE id = {}", leaders[1]),
                format!(
                    "UPDATE {table} SET business_id = '7' WHERE id = {}",
                    leaders[2]
                ),
                format!(
                    "UPDATE {table} SET state = 'canceled' WHERE id = {}",
                    leaders[3]
                ),
            ];
            for e in &edits {
                conn.execute_batch(e).unwrap();
            }
            for n in 0..4 {
                let negotiation = format!("{}", 1000 + n);
                let ids: Vec<i64> = conn
                    .prepare(&format!(
                        "SELECT id FROM {table} WHERE negotiation_id = ?1 AND state = 'pending'
                          ORDER BY id"
                    ))
                    .unwrap()
                    .query_map([&negotiation], |r| r.get(0))
                    .unwrap()
                    .collect::<rusqlite::Result<_>>()
                    .unwrap();
                // The row moved to business 7, and the follower of business 7.
                let free = if n == 2 { &ids[..2] } else { &ids[..1] };
                stranded.extend(free.iter().map(|id| (kind, *id)));
            }
        }
        let before: Vec<_> = Kind::ALL.iter().map(|k| waits(&conn, *k)).collect();
        conn.pragma_update(None, "user_version", 18).unwrap();
        crate::store::migrate(&mut conn).unwrap();
        sync_waits(&mut conn, &filter()).unwrap();
        for (kind, before) in Kind::ALL.iter().zip(before) {
            let after = waits(&conn, *kind);
            for (b, a) in before.iter().zip(&after) {
                let want = if stranded.contains(&(*kind, b.0)) || b.1 != "pending" {
                    None
                } else {
                    b.2.clone()
                };
                assert_eq!(a.2, want, "{kind:?} row {}: {after:?}", b.0);
            }
            // What a claim walks: the pending rows not aside, the stranded.
            let walked: i64 = conn
                .query_row(
                    &format!(
                        "SELECT count(*) FROM {} WHERE state = 'pending' AND waiting_for IS NULL",
                        kind.table()
                    ),
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(walked, 5, "{kind:?}");
        }
    }

    /// An UPDATE that changes neither the state, the business nor the
    /// negotiation of a row put aside (`SET state = state`, an ORM writing
    /// every column) leaves the waits as they are: it freed the row and
    /// the rows behind it, put back aside one by one at the next claim.
    #[test]
    fn an_update_that_changes_nothing_the_waits_follow_leaves_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        for kind in Kind::ALL {
            let table = kind.table();
            let leader = insert(&conn, kind, "500", "8", 1);
            insert(&conn, kind, "500", "7", 2);
            assert_eq!(send_due(&mut conn, kind), Vec::<i64>::new());
            let before = waits(&conn, kind);
            assert!(before.iter().all(|w| w.2.as_deref() == Some("8")));
            conn.execute(
                &format!(
                    "UPDATE {table} SET state = state, business_id = business_id,
                         negotiation_id = negotiation_id, last_error = 'x' WHERE id = ?1"
                ),
                [leader],
            )
            .unwrap();
            conn.execute(
                &format!("UPDATE {table} SET state = state WHERE negotiation_id = '500'"),
                [],
            )
            .unwrap();
            assert_eq!(waits(&conn, kind), before, "{kind:?}");
        }
    }

    /// A row that names no business is sent under its lead's (here the only
    /// configured one): that business is written into the row only once it
    /// is sent. A claim filled it in for good, so a row retried, held or
    /// dead went on naming it after its lead was mirrored under another
    /// business (SPEC §3: when NULL it is taken from negotiations).
    #[test]
    fn a_business_filled_in_by_a_claim_stays_only_on_a_sent_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let filter = ClaimFilter {
            default_business: Some("7".into()),
            ..filter()
        };
        for kind in Kind::ALL {
            let table = kind.table();
            let business = |conn: &Connection, id: i64| -> (String, Option<String>) {
                conn.query_row(
                    &format!("SELECT state, business_id FROM {table} WHERE id = ?1"),
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
            };
            let ends = [
                Finish::Retry {
                    next_attempt_at: "2000-01-01T00:00:00.000Z".into(),
                },
                Finish::Hold,
                Finish::Dead,
                Finish::Sent { message_id: None },
            ];
            for (n, end) in ends.iter().enumerate() {
                let negotiation = format!("{}", 300 + n);
                let id = insert(&conn, kind, &negotiation, "7", 1);
                conn.execute(
                    &format!("UPDATE {table} SET business_id = NULL WHERE id = ?1"),
                    [id],
                )
                .unwrap();
                let row = claim(&mut conn, kind, FAR, 10, &filter).unwrap().remove(0);
                assert_eq!(row.business_id.as_deref(), Some("7"));
                let (recorded, _) =
                    finish(&mut conn, &row, end, &[], &crate::time::now(), None).unwrap();
                assert_eq!(recorded, Recorded::Yes, "{kind:?} {end:?}");
                let (state, b) = business(&conn, id);
                let want = matches!(end, Finish::Sent { .. }).then(|| "7".to_string());
                assert_eq!(b, want, "{kind:?} {end:?} ({state})");
                // A business the partner wrote stays whatever the outcome.
                if state == "pending" {
                    conn.execute(
                        &format!("UPDATE {table} SET business_id = '7' WHERE id = ?1"),
                        [id],
                    )
                    .unwrap();
                    let row = claim(&mut conn, kind, FAR, 10, &filter).unwrap().remove(0);
                    finish(&mut conn, &row, end, &[], &crate::time::now(), None).unwrap();
                    assert_eq!(business(&conn, id).1.as_deref(), Some("7"));
                    conn.execute(
                        &format!("UPDATE {table} SET state = 'canceled' WHERE id = ?1"),
                        [id],
                    )
                    .unwrap();
                }
            }
        }
    }

    /// A row left `sending` by a process that died is recovered like a
    /// failed claim: the business the claim filled in goes (the next claim
    /// takes the lead's business again), one the partner wrote stays.
    #[test]
    fn a_row_left_sending_by_a_crash_loses_the_business_its_claim_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let filter = ClaimFilter {
            default_business: Some("7".into()),
            ..filter()
        };
        for kind in Kind::ALL {
            let table = kind.table();
            let filled = insert(&conn, kind, "401", "7", 1);
            conn.execute(
                &format!("UPDATE {table} SET business_id = NULL WHERE id = ?1"),
                [filled],
            )
            .unwrap();
            insert(&conn, kind, "402", "7", 1);
            let claimed = claim(&mut conn, kind, FAR, 10, &filter).unwrap();
            assert_eq!(claimed.len(), 2, "{kind:?}");
        }
        // The process dies here; the next start recovers the rows.
        let recovered = recover_sending(&mut conn, &crate::time::now()).unwrap();
        assert_eq!(recovered.len(), 4);
        for kind in Kind::ALL {
            let rows: Vec<(String, String, Option<String>)> = conn
                .prepare(&format!(
                    "SELECT negotiation_id, state, business_id FROM {} ORDER BY id",
                    kind.table()
                ))
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let want = [
                ("401".to_string(), "pending".to_string(), None),
                ("402".into(), "pending".into(), Some("7".to_string())),
            ];
            assert_eq!(rows, want, "{kind:?}");
        }
    }

    /// Claimed and finished with the clock a year ahead, then corrected:
    /// a retry waits its backoff counted from now, a hold is due at once,
    /// in both tables; a rebase once done changes nothing more.
    #[test]
    fn waits_a_clock_far_ahead_wrote_are_counted_from_now_once_it_is_corrected() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let now = chrono::Utc::now();
        let ahead = now + chrono::Duration::days(365);
        let fmt = crate::time::fmt;
        for kind in Kind::ALL {
            for (n, end) in [
                Finish::Retry {
                    next_attempt_at: fmt(ahead + chrono::Duration::minutes(30)),
                },
                Finish::Hold,
            ]
            .iter()
            .enumerate()
            {
                let id = insert(&conn, kind, &format!("{}", 500 + n), "7", 1);
                // Due by the clock ahead: the retry before is not.
                let mut rows = claim(&mut conn, kind, &fmt(ahead), 10, &filter()).unwrap();
                assert_eq!(rows.len(), 1);
                let row = rows.remove(0);
                assert_eq!(row.id, id);
                let tried = [Attempt {
                    attempt: row.attempt,
                    started_at: fmt(ahead),
                    http_status: Some(503),
                    outcome: "retry",
                    error: Some("HTTP 503".into()),
                    trace_id: None,
                    duration_ms: 5,
                }];
                finish(&mut conn, &row, end, &tried, &fmt(ahead), None).unwrap();
            }
        }
        let rebased = rebase_future_waits(&mut conn, &fmt(now)).unwrap();
        assert_eq!(rebased.len(), 4, "{rebased:?}");
        for kind in Kind::ALL {
            let next: Vec<String> = conn
                .prepare(&format!(
                    "SELECT next_attempt_at FROM {} ORDER BY id",
                    kind.table()
                ))
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!(
                next,
                [fmt(now + chrono::Duration::minutes(30)), fmt(now)],
                "{kind:?}"
            );
        }
        assert!(
            rebase_future_waits(&mut conn, &fmt(now))
                .unwrap()
                .is_empty()
        );
    }

    /// A `leadsync drain` each minute under a clock 10 min ahead, each
    /// rebasing: a 60 min `Retry-After` is waited out in full from the
    /// first rebase (due at T+61 min), not shortened by each next one
    /// (T+53, T+46, ...). A new attempt may be rebased again.
    #[test]
    fn a_wait_is_rebased_once_per_attempt_however_often_the_clock_is_seen_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let fmt = crate::time::fmt;
        let minutes = chrono::Duration::minutes;
        // Rows are due from their insertion (the real clock).
        let t = chrono::Utc::now() + minutes(1);
        let ahead = t + minutes(10);
        let kind = Kind::Transition;
        let try_once = |conn: &mut Connection, at: chrono::DateTime<chrono::Utc>| {
            let row = claim(conn, kind, &fmt(at), 10, &filter())
                .unwrap()
                .remove(0);
            let tried = [Attempt {
                attempt: row.attempt,
                started_at: fmt(at),
                http_status: Some(429),
                outcome: "retry",
                error: Some("HTTP 429".into()),
                trace_id: None,
                duration_ms: 5,
            }];
            let end = Finish::Retry {
                next_attempt_at: fmt(at + minutes(60)),
            };
            finish(conn, &row, &end, &tried, &fmt(at), None).unwrap();
        };
        let id = insert(&conn, kind, "600", "7", 1);
        try_once(&mut conn, ahead);
        let next = |conn: &Connection| -> String {
            conn.query_row(
                "SELECT next_attempt_at FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
        };
        for n in 1..=5 {
            let rebased = rebase_future_waits(&mut conn, &fmt(t + minutes(n))).unwrap();
            assert_eq!(rebased.len(), usize::from(n == 1), "{n}");
            assert_eq!(next(&conn), fmt(t + minutes(61)), "{n}");
        }
        // Tried again, still under a clock ahead: that attempt's wait is
        // rebased once in its turn.
        try_once(&mut conn, t + minutes(61) + minutes(10));
        for n in 62..=64 {
            let rebased = rebase_future_waits(&mut conn, &fmt(t + minutes(n))).unwrap();
            assert_eq!(rebased.len(), usize::from(n == 62), "{n}");
            assert_eq!(next(&conn), fmt(t + minutes(122)), "{n}");
        }
    }

    /// A finish that claims the next row of its negotiation, whose
    /// partner's trigger answers the claim with RAISE(ROLLBACK): the
    /// outcome went with the transaction, and the finish records it again
    /// at once (the next row left to a claim), in either table. Failing the
    /// finish instead left the row `sending` until the drainer retried it.
    #[test]
    fn a_finish_whose_next_claim_is_rolled_back_records_its_outcome_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        for kind in Kind::ALL {
            let table = kind.table();
            let first = insert(&conn, kind, "1", "7", 1);
            let next = insert(&conn, kind, "1", "7", 2);
            let row = claim(&mut conn, kind, FAR, 10, &filter())
                .unwrap()
                .remove(0);
            assert_eq!(row.id, first);
            conn.execute_batch(&format!(
                "CREATE TRIGGER partner_rollback_{table} BEFORE UPDATE ON {table} WHEN OLD.id = {next}
                 BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
            ))
            .unwrap();
            assert!(sent(&mut conn, &row, true).is_none(), "{kind:?}");
            assert_eq!(
                waits(&conn, kind),
                [
                    (first, "sent".to_string(), None),
                    (next, "pending".to_string(), None)
                ],
                "{kind:?}"
            );
        }
    }

    /// A finish queued twice for one claim (a stop's dropped round whose job
    /// still ran, then its retry) logs the request's attempt row once.
    #[test]
    fn a_finish_run_twice_logs_its_attempt_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        insert(&conn, Kind::Transition, "1", "7", 1);
        let row = claim(&mut conn, Kind::Transition, FAR, 10, &filter())
            .unwrap()
            .remove(0);
        let a = [Attempt {
            attempt: row.attempt,
            started_at: crate::time::now(),
            http_status: Some(200),
            outcome: "sent",
            error: None,
            trace_id: None,
            duration_ms: 1,
        }];
        let sent = Finish::Sent { message_id: None };
        let now = crate::time::now();
        finish(&mut conn, &row, &sent, &a, &now, None).unwrap();
        finish(&mut conn, &row, &sent, &a, &now, None).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM outbox_attempts WHERE outbox_id = ?1",
                [row.id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    /// A claim is told from a later claim of the same row by more than its
    /// attempt number: a partner's program that put a `sending` row back
    /// to pending and reset its attempts (`UPDATE ... SET state = 'pending',
    /// attempts = 0`, "send it again") made the next claim carry the same
    /// number, and the first request's outcome (here dead) was written over
    /// the second claim while that was still in flight; the second's outcome
    /// (sent) was then dropped, and the row said dead though Thumbtack had it.
    #[test]
    fn an_outcome_never_lands_on_a_later_claim_after_the_attempts_were_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        for kind in Kind::ALL {
            let table = kind.table();
            let id = insert(&conn, kind, "1", "7", 1);
            let first = claim(&mut conn, kind, FAR, 10, &filter())
                .unwrap()
                .remove(0);
            conn.execute(
                &format!("UPDATE {table} SET state = 'pending', attempts = 0 WHERE id = ?1"),
                [id],
            )
            .unwrap();
            let second = claim(&mut conn, kind, FAR, 10, &filter())
                .unwrap()
                .remove(0);
            assert_eq!((first.id, second.id), (id, id));
            // The claim's number cannot be rewritten while it is sent.
            let e = conn
                .execute(
                    &format!("UPDATE {table} SET claim_id = 1 WHERE id = ?1"),
                    [id],
                )
                .unwrap_err();
            assert!(e.to_string().contains("claim_id cannot change"), "{e}");
            let now = crate::time::now();
            let (recorded, _) = finish(&mut conn, &first, &Finish::Dead, &[], &now, None).unwrap();
            assert_eq!(
                recorded,
                Recorded::RowChanged("sending".into()),
                "{kind:?}: the first request's outcome is not the second claim's"
            );
            let (recorded, _) = finish(
                &mut conn,
                &second,
                &Finish::Sent { message_id: None },
                &[],
                &now,
                None,
            )
            .unwrap();
            assert_eq!(recorded, Recorded::Yes, "{kind:?}");
            let state: String = conn
                .query_row(
                    &format!("SELECT state FROM {table} WHERE id = ?1"),
                    [id],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(state, "sent", "{kind:?}");
        }
    }

    /// A row left `sending` by a leadsync of schema 24 (no `claim_id`: NULL
    /// after the upgrade) is put back to pending at the start, claimed
    /// again, and its outcome recorded.
    #[test]
    fn a_row_left_sending_before_schema_25_is_sent_again_and_its_outcome_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut old = Connection::open(&path).unwrap();
        crate::store::migrate_to(&mut old, 24).unwrap();
        for kind in Kind::ALL {
            let id = insert(&old, kind, "1", "7", 1);
            old.execute(
                &format!(
                    "UPDATE {} SET state = 'sending', attempts = 1,
                            sending_since = '2024-06-14T09:31:00.000Z' WHERE id = ?1",
                    kind.table()
                ),
                [id],
            )
            .unwrap();
        }
        drop(old);
        let mut conn = crate::store::open_connection(&path, false).unwrap();
        for kind in Kind::ALL {
            let claim_id: Option<i64> = conn
                .query_row(&format!("SELECT claim_id FROM {}", kind.table()), [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(claim_id, None, "{kind:?}");
        }
        let recovered = recover_sending(&mut conn, &crate::time::now()).unwrap();
        assert_eq!(recovered.len(), 2, "{recovered:?}");
        for kind in Kind::ALL {
            let row = claim(&mut conn, kind, FAR, 10, &filter())
                .unwrap()
                .remove(0);
            assert_eq!(row.attempt, 2, "{kind:?}");
            sent(&mut conn, &row, false);
            let (state, claim_id): (String, Option<i64>) = conn
                .query_row(
                    &format!("SELECT state, claim_id FROM {} WHERE id = ?1", kind.table()),
                    [row.id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                (state.as_str(), claim_id),
                ("sent", Some(row.claim_id)),
                "{kind:?}"
            );
        }
    }

    /// A row put aside waits for its business with the rows after it only:
    /// a transition inserted after it with an earlier instant is first in
    /// line and goes when its own business may send. It was put aside behind
    /// the later row, for that row's business — when walked, or with the
    /// rows of a later one put aside (here while it waits for its retry).
    #[test]
    fn a_row_put_aside_holds_back_only_the_rows_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let kind = Kind::Transition;
        let waits_for = |conn: &Connection, id: i64| -> Option<String> {
            conn.query_row("SELECT waiting_for FROM outbox WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .unwrap()
        };
        // Business 9 is not configured: the row waits for it.
        let aside = insert(&conn, kind, "1", "9", 3);
        assert!(
            claim(&mut conn, kind, FAR, 10, &filter())
                .unwrap()
                .is_empty()
        );
        assert_eq!(waits_for(&conn, aside).as_deref(), Some("9"));
        // Before it: one waiting for its retry, one due; after it, one due.
        let retrying = insert(&conn, kind, "1", "7", 1);
        conn.execute(
            "UPDATE outbox SET next_attempt_at = '9999-06-01T00:00:00.000Z' WHERE id = ?1",
            [retrying],
        )
        .unwrap();
        let due = insert(&conn, kind, "1", "7", 2);
        let after = insert(&conn, kind, "1", "7", 4);
        let claimed = claim(&mut conn, kind, FAR, 10, &filter()).unwrap();
        assert!(claimed.is_empty(), "{claimed:?}");
        assert_eq!(waits_for(&conn, after).as_deref(), Some("9"));
        assert_eq!(
            waits_for(&conn, retrying),
            None,
            "it goes before the row aside"
        );
        assert_eq!(waits_for(&conn, due), None, "it goes before the row aside");
        conn.execute(
            "UPDATE outbox SET next_attempt_at = '2024-01-01T00:00:00.000Z' WHERE id = ?1",
            [retrying],
        )
        .unwrap();
        let first = claim(&mut conn, kind, FAR, 10, &filter()).unwrap();
        assert_eq!(first.iter().map(|c| c.id).collect::<Vec<_>>(), [retrying]);
        let next = sent(&mut conn, &first[0], true).expect("the next row before the aside one");
        assert_eq!(next.id, due);
        assert!(
            sent(&mut conn, &next, true).is_none(),
            "then the row aside holds back"
        );
        assert_eq!(waits_for(&conn, after).as_deref(), Some("9"));
    }

    /// Every statement that names an index, run once: rows put aside for
    /// their business, a claim, the next row of a chain, a late row.
    fn drain_a_little(conn: &mut Connection, kind: Kind) {
        let table = kind.table();
        let x1 = insert(conn, kind, "1", "7", 1);
        let x2 = insert(conn, kind, "1", "7", 2);
        let x3 = insert(conn, kind, "1", "7", 3);
        let y1 = insert(conn, kind, "2", "8", 1);
        conn.execute(
            &format!("UPDATE {table} SET state = 'dead' WHERE id = ?1"),
            [x1],
        )
        .unwrap();
        sync_waits(conn, &filter()).unwrap();
        let aside: Option<String> = conn
            .query_row(
                &format!("SELECT waiting_for FROM {table} WHERE id = ?1"),
                [y1],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(aside.as_deref(), Some("8"));
        // Behind y1, a row of a business that may send waits with it.
        let y2 = insert(conn, kind, "2", "7", 2);
        let claimed = claim(conn, kind, FAR, 10, &filter()).unwrap();
        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
        assert_eq!(ids, [x2], "x3 is behind x2, y1 is aside, y2 behind it");
        let aside: Option<String> = conn
            .query_row(
                &format!("SELECT waiting_for FROM {table} WHERE id = ?1"),
                [y2],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(aside.as_deref(), Some("8"));
        let next = sent(conn, &claimed[0], true).expect("the chain goes on");
        assert_eq!((next.id, next.late), (x3, false));
        assert!(sent(conn, &next, true).is_none());
        conn.execute(
            &format!("UPDATE {table} SET state = 'pending' WHERE id = ?1"),
            [x1],
        )
        .unwrap();
        let claimed = claim(conn, kind, FAR, 10, &filter()).unwrap();
        let got: Vec<(i64, bool)> = claimed.iter().map(|c| (c.id, c.late)).collect();
        assert_eq!(got, [(x1, true)], "sent after a later row");
    }

    /// With another connection (a partner's program) holding the write
    /// lock and no wait for it, every kind's claim answers nothing, without
    /// an error: nothing due needs no lock. Leaves `conn` waiting no time.
    fn claims_nothing_under_a_partners_write_lock(conn: &mut Connection, path: &std::path::Path) {
        conn.busy_timeout(std::time::Duration::ZERO).unwrap();
        let partner = rusqlite::Connection::open(path).unwrap();
        partner.execute_batch("BEGIN IMMEDIATE").unwrap();
        for kind in Kind::ALL {
            let claimed = claim(conn, kind, "2999-01-01T00:00:00.000Z", 4, &filter());
            assert_eq!(
                claimed.map(|c| c.len()).map_err(|e| format!("{e:#}")),
                Ok(0),
                "{kind:?}"
            );
        }
        partner.execute_batch("COMMIT").unwrap();
    }

    /// The drainer claims every tick. With nothing due it takes no write
    /// lock: a partner's own writer (plain SQL, often with SQLite's default
    /// busy timeout of 0) would otherwise meet the lock at random and have
    /// its INSERT refused with `database is locked`.
    #[test]
    fn a_claim_with_nothing_due_takes_no_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut conn = crate::store::open_connection(&path, true).unwrap();
        for kind in Kind::ALL {
            // Not due yet, and put aside: neither is claimable now.
            let later = insert(&conn, kind, "1", "7", 1);
            let aside = insert(&conn, kind, "2", "8", 1);
            conn.execute(
                &format!(
                    "UPDATE {} SET next_attempt_at = ?2 WHERE id = ?1",
                    kind.table()
                ),
                params![later, FAR],
            )
            .unwrap();
            conn.execute(
                &format!(
                    "UPDATE {} SET waiting_for = '8' WHERE id = ?1",
                    kind.table()
                ),
                [aside],
            )
            .unwrap();
        }
        claims_nothing_under_a_partners_write_lock(&mut conn, &path);
        let by = "2999-01-01T00:00:00.000Z";
        // A due row still needs the lock, and is claimed.
        let due = insert(&conn, Kind::Transition, "3", "7", 1);
        let claimed = claim(&mut conn, Kind::Transition, by, 4, &filter()).unwrap();
        assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [due]);
    }

    /// A due row held back by an earlier row of its negotiation (waiting
    /// on its retry, or being sent) is not claimable either: the claim must
    /// not take the write lock for it every tick for as long as the earlier
    /// row's backoff lasts (up to `backoff_max_secs`).
    #[test]
    fn a_claim_with_only_held_back_rows_due_takes_no_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let mut conn = crate::store::open_connection(&path, true).unwrap();
        let mut later_ones = Vec::new();
        for kind in Kind::ALL {
            // The first row of negotiation 1 waits on a retry far ahead;
            // the second is due, but behind it. Negotiation 2's first row
            // is being sent; its second is due, behind it.
            let retrying = insert(&conn, kind, "1", "7", 1);
            later_ones.push((kind, insert(&conn, kind, "1", "7", 2)));
            conn.execute(
                &format!(
                    "UPDATE {} SET next_attempt_at = ?2 WHERE id = ?1",
                    kind.table()
                ),
                params![retrying, FAR],
            )
            .unwrap();
            insert(&conn, kind, "2", "7", 1);
            let c = claim(&mut conn, kind, "2999-01-01T00:00:00.000Z", 1, &filter()).unwrap();
            assert_eq!(c.len(), 1, "{kind:?}");
            later_ones.push((kind, insert(&conn, kind, "2", "7", 2)));
        }
        claims_nothing_under_a_partners_write_lock(&mut conn, &path);
        let by = "2999-01-01T00:00:00.000Z";
        // Once the row ahead is out of the way, the row behind it is claimed.
        for (kind, id) in later_ones.iter().step_by(2) {
            conn.execute(
                &format!(
                    "UPDATE {} SET state = 'canceled' WHERE negotiation_id = '1' AND id < ?1",
                    kind.table()
                ),
                [id],
            )
            .unwrap();
            let claimed = claim(&mut conn, *kind, by, 4, &filter()).unwrap();
            assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [*id]);
        }
    }

    /// SPEC §4: a negotiation's rows go in order of
    /// (`partner_status_changed_at`, id), the instant exactly as given.
    /// The order read the instant to the millisecond (`strftime('%f')`
    /// truncates), so two rows within one millisecond went in id order;
    /// and a fraction of 309 digits (RFC 3339 sets no bound) read
    /// as no fraction at all.
    #[test]
    fn rows_within_one_millisecond_or_with_a_long_fraction_go_in_the_order_of_their_instants() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        let long = format!("2024-06-14T09:30:00.{}Z", "1".repeat(309));
        let cases: [(&str, [&str; 3]); 3] = [
            (
                "1",
                [
                    "2024-06-14T09:30:00.0004Z",
                    "2024-06-14T11:30:00.00019+02:00",
                    "2024-06-14T09:30:00.0001Z",
                ],
            ),
            (
                "2",
                [
                    "2024-06-14T09:30:00.0009999Z",
                    "2024-06-14T09:30:00.000999Z",
                    "2024-06-14T04:30:00.00099-05:00",
                ],
            ),
            (
                "3",
                [
                    long.as_str(),
                    "2024-06-14T09:30:00.11Z",
                    "2024-06-14T09:30:00.05Z",
                ],
            ),
        ];
        for (negotiation, times) in &cases {
            for at in times {
                conn.execute(
                    "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
                     VALUES (?1, '7', 'appt_scheduled', ?2)",
                    params![negotiation, at],
                )
                .unwrap();
            }
        }
        let mut order: HashMap<String, Vec<String>> = HashMap::new();
        loop {
            let claimed = claim(&mut conn, Kind::Transition, FAR, 10, &filter()).unwrap();
            if claimed.is_empty() {
                break;
            }
            for c in claimed {
                let Content::Transition {
                    partner_status_changed_at,
                    ..
                } = &c.content
                else {
                    unreachable!()
                };
                order
                    .entry(c.negotiation_id.clone())
                    .or_default()
                    .push(partner_status_changed_at.clone());
                sent(&mut conn, &c, false);
            }
        }
        for (negotiation, times) in &cases {
            let expected = [times[2], times[1], times[0]];
            assert_eq!(order[*negotiation], expected, "negotiation {negotiation}");
        }
    }

    #[test]
    fn a_row_with_the_smallest_id_is_walked_over_like_any_other() {
        // The walk from the start was `after_id = i64::MIN`: a row with that
        // id (plain SQL may insert one) walked over as the last row of a
        // full page restarted the walk, forever, holding the write lock.
        // A row is walked over when the row put aside ahead of it stays
        // aside (here a partner's trigger keeps it there). Schema 25 refuses
        // an id of 0 or below; a table from before may hold one.
        for kind in Kind::ALL {
            let dir = tempfile::tempdir().unwrap();
            let mut conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
            let table = kind.table();
            let aside = insert(&conn, kind, "1", "7", 1);
            let (columns, values) = match kind {
                Kind::Transition => (
                    "status, partner_status_changed_at",
                    "'job_complete', '2024-06-14T09:32:00Z'",
                ),
                Kind::Message => ("text", "'hi'"),
            };
            conn.execute_batch(&format!(
                "UPDATE {table} SET waiting_for = '7' WHERE id = {aside};
                 CREATE TRIGGER keep_aside BEFORE UPDATE OF waiting_for ON {table}
                   WHEN NEW.waiting_for IS NULL BEGIN SELECT RAISE(IGNORE); END;
                 DROP TRIGGER {table}_id_never_reused;
                 INSERT INTO {table} (id, negotiation_id, business_id, next_attempt_at, {columns})
                 VALUES (-9223372036854775808, '1', '7', '2024-01-01T00:00:00.000Z', {values});
                 INSERT INTO {table} (negotiation_id, business_id, next_attempt_at, {columns})
                 VALUES ('2', '7', '2024-01-01T00:00:01.000Z', {values});"
            ))
            .unwrap();
            let other = conn.last_insert_rowid();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let claimed: Vec<i64> = claim(&mut conn, kind, FAR, 1, &filter())
                    .unwrap()
                    .iter()
                    .map(|c| c.id)
                    .collect();
                let _ = tx.send(claimed);
            });
            let claimed = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{kind:?}: the claim never ended"));
            // A reply goes in id order: that one goes before the reply put
            // aside, so it is first in line (a row put aside holds back only
            // the rows after it), and the claim ends with it.
            let expected = match kind {
                Kind::Transition => other,
                Kind::Message => i64::MIN,
            };
            assert_eq!(claimed, [expected], "{kind:?}");
        }
    }

    #[test]
    fn the_drainer_works_when_any_of_its_indexes_was_dropped() {
        // SQLite fails a statement whose INDEXED BY names a missing index:
        // a user's maintenance (or a partner's tool) that dropped one made
        // every claim fail for good. Slower, never stuck.
        let mut failed = Vec::new();
        for kind in Kind::ALL {
            let table = kind.table();
            for index in [
                "",
                "due",
                "waiting_by_negotiation",
                "sent_by_negotiation",
                "ready_by_business",
                "open_by_negotiation",
            ] {
                let dir = tempfile::tempdir().unwrap();
                let mut conn =
                    crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
                if !index.is_empty() {
                    conn.execute_batch(&format!("DROP INDEX {table}_{index}"))
                        .unwrap();
                }
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    drain_a_little(&mut conn, kind)
                }));
                if run.is_err() {
                    failed.push(format!("{table}_{index}"));
                }
                // The same name on another definition (no use to these
                // statements): not named either.
                if !index.is_empty() {
                    let mut conn =
                        crate::store::open_connection(&dir.path().join("r.db"), true).unwrap();
                    conn.execute_batch(&format!(
                        "DROP INDEX {table}_{index};
                         CREATE INDEX {table}_{index} ON {table} (last_error) WHERE state = 'dead';"
                    ))
                    .unwrap();
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        drain_a_little(&mut conn, kind)
                    }));
                    if run.is_err() {
                        failed.push(format!("{table}_{index} redefined"));
                    }
                }
            }
        }
        assert!(failed.is_empty(), "failed without: {failed:?}");
    }

    /// The index each statement's table `alias` is read through: every
    /// step on `alias` goes through `index`.
    fn reads_through(conn: &Connection, sql: &str, alias: &str, index: &str) {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // Unbound parameters are NULL: EXPLAIN only compiles.
        let mut rows = stmt.raw_query();
        let mut plan = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            plan.push(r.get::<_, String>(3).unwrap());
        }
        let steps: Vec<&String> = plan
            .iter()
            .filter(|p| {
                p.starts_with(&format!("SEARCH {alias} "))
                    || p.starts_with(&format!("SCAN {alias} "))
            })
            .collect();
        assert!(
            !steps.is_empty()
                && steps.iter().all(|p| p.contains(&format!("INDEX {index} ("))
                    || p.ends_with(&format!("INDEX {index}"))),
            "{alias} not through {index}: {plan:?}\n{sql}"
        );
    }

    /// Each statement of a claim reads the index it was written for.
    fn plans(conn: &Connection) {
        let pins = Pins::read(conn).unwrap();
        for kind in Kind::ALL {
            let t = kind.table();
            let claim = claim_select(kind, &pins);
            reads_through(conn, &claim, "o", &format!("{t}_due"));
            reads_through(conn, &due_select(kind, &pins), "o", &format!("{t}_due"));
            reads_through(conn, &claim, "w", &format!("{t}_waiting_by_negotiation"));
            let late = mark_sending(kind, &pins);
            reads_through(conn, &late, "s", &format!("{t}_sent_by_negotiation"));
            let head = head_select(kind, &pins);
            reads_through(conn, &head, "o", &format!("{t}_open_by_negotiation"));
            reads_through(conn, &head, "w", &format!("{t}_waiting_by_negotiation"));
            reads_through(
                conn,
                &set_aside(kind, &pins),
                t,
                &format!("{t}_ready_by_business"),
            );
            reads_through(
                conn,
                &park_followers(kind, &pins),
                t,
                &format!("{t}_open_by_negotiation"),
            );
            let (ready, aside) = (
                rebase_select(kind, &pins, false),
                rebase_select(kind, &pins, true),
            );
            reads_through(conn, &ready, "o", &format!("{t}_due"));
            reads_through(conn, &aside, "o", &format!("{t}_waiting_by_negotiation"));
        }
    }

    #[test]
    fn a_claim_reads_its_indexes_fresh_after_analyze_and_beside_a_users_indexes() {
        // Unnamed, the planner read outbox_by_state without statistics
        // (sorting every pending row per claim; every sent row per late
        // check), and with statistics taken while no row waited it may
        // scan the index of all waiting rows for each walked row. Named,
        // claiming costs the same whether or not 100k rows wait (SPEC §4).
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        plans(&conn);
        // A user's own indexes, rows sent and pending, ANALYZE while none
        // waits; then 2,000 rows start waiting.
        conn.execute_batch(
            "CREATE INDEX users_outbox ON outbox (negotiation_id);
             CREATE INDEX users_outbox_state ON outbox (state, next_attempt_at);
             CREATE INDEX users_replies ON message_outbox (negotiation_id);
             CREATE INDEX users_replies_state ON message_outbox (state, next_attempt_at);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000)
             INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
             SELECT 1000 + i % 400, 100 + i % 10, 'appt_scheduled',
                    strftime('%Y-%m-%dT%H:%M:%SZ', '2024-01-01', '+' || i || ' minutes') FROM n;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 4000)
             INSERT INTO message_outbox (negotiation_id, business_id, text)
             SELECT 1000 + i % 400, 100 + i % 10, 'hi' FROM n;
             UPDATE outbox SET state = 'sending', attempts = 1, sending_since = 't' WHERE id <= 3800;
             UPDATE outbox SET state = 'sent' WHERE id <= 3800;
             UPDATE message_outbox SET state = 'sending', attempts = 1, sending_since = 't'
              WHERE id <= 3800;
             UPDATE message_outbox SET state = 'sent' WHERE id <= 3800;
             ANALYZE;",
        )
        .unwrap();
        plans(&conn);
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
             SELECT 5000 + i, 99, 'appt_scheduled', '2024-06-14T09:30:00Z' FROM n;
             UPDATE outbox SET waiting_for = '99' WHERE business_id = '99';
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
             INSERT INTO message_outbox (negotiation_id, business_id, text)
             SELECT 5000 + i, 99, 'hi' FROM n;
             UPDATE message_outbox SET waiting_for = '99' WHERE business_id = '99';",
        )
        .unwrap();
        plans(&conn);
    }

    /// A queue of `kind` in 40 negotiations of businesses 7 and 8
    /// (deterministic): rows in and out of order, some sent already (so
    /// later ones are late), some dead, some not due yet.
    fn a_mixed_queue(conn: &Connection, kind: Kind) {
        let table = kind.table();
        let mut x: u64 = 20;
        let mut next = move |n: u64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 33) % n
        };
        for _ in 0..300 {
            let negotiation = next(40).to_string();
            let business = if next(4) == 0 { "8" } else { "7" };
            let due = if next(6) == 0 {
                "2030-01-01T00:00:00.000Z".to_string()
            } else {
                format!("2024-01-01T00:{:02}:00.000Z", next(60))
            };
            match kind {
                Kind::Transition => conn.execute(
                    "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at,
                         next_attempt_at)
                     VALUES (?1, ?2, 'appt_scheduled', ?3, ?4)",
                    params![
                        negotiation,
                        business,
                        format!("2024-06-14T09:{:02}:00+0{}:00", next(60), next(2)),
                        due
                    ],
                ),
                Kind::Message => conn.execute(
                    "INSERT INTO message_outbox (negotiation_id, business_id, text, next_attempt_at)
                     VALUES (?1, ?2, 'hi', ?3)",
                    params![negotiation, business, due],
                ),
            }
            .unwrap();
            let id = conn.last_insert_rowid();
            match next(8) {
                0 | 1 => {
                    conn.execute(
                        &format!(
                            "UPDATE {table} SET state = 'sending', attempts = 1, sending_since = 't'
                              WHERE id = ?1"
                        ),
                        [id],
                    )
                    .unwrap();
                    conn.execute(
                        &format!("UPDATE {table} SET state = 'sent' WHERE id = ?1"),
                        [id],
                    )
                    .unwrap();
                }
                2 => {
                    conn.execute(
                        &format!("UPDATE {table} SET state = 'dead' WHERE id = ?1"),
                        [id],
                    )
                    .unwrap();
                }
                _ => {}
            }
        }
    }

    /// Drains `kind` as the drainer does (rows put aside, claims of 3,
    /// each sent row's chain), then again once business 8 may send: every
    /// row sent in order, whether late, and every row's final state.
    type Drained = (Vec<(i64, bool)>, Vec<(i64, String, Option<String>, bool)>);
    fn drain_all(conn: &mut Connection, kind: Kind) -> Drained {
        let due_by = "2025-01-01T00:00:00.000Z";
        let mut log = Vec::new();
        for round in 0..2 {
            let mut f = filter();
            if round == 1 {
                f.waiting.clear();
            }
            sync_waits(conn, &f).unwrap();
            loop {
                let claimed = claim(conn, kind, due_by, 3, &f).unwrap();
                if claimed.is_empty() {
                    break;
                }
                for c in claimed {
                    let mut row = Some(c);
                    while let Some(r) = row {
                        log.push((r.id, r.late));
                        let next = Some(NextOf { due_by, filter: &f });
                        let sent = Finish::Sent { message_id: None };
                        row = finish(conn, &r, &sent, &[], &crate::time::now(), next)
                            .unwrap()
                            .1;
                    }
                }
            }
        }
        let rows = conn
            .prepare(&format!(
                "SELECT id, state, waiting_for, late FROM {} ORDER BY id",
                kind.table()
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        (log, rows)
    }

    #[test]
    fn the_drainer_sends_the_same_rows_in_the_same_order_with_or_without_its_indexes() {
        // The statements differ only in INDEXED BY (or none): the rows they
        // find must not, whether an index is as made, gone, or another index
        // of the same name (which the planner may use where it fits).
        for kind in Kind::ALL {
            let mut drained = Vec::new();
            for variant in ["as made", "dropped", "redefined"] {
                let dir = tempfile::tempdir().unwrap();
                let mut conn =
                    crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
                for (index, _) in crate::store::PINNED_INDEXES {
                    let table = if index.starts_with("message_outbox_") {
                        "message_outbox"
                    } else if index.starts_with("outbox_") {
                        "outbox"
                    } else {
                        continue;
                    };
                    match variant {
                        "dropped" => conn.execute_batch(&format!("DROP INDEX {index}")),
                        "redefined" => conn.execute_batch(&format!(
                            "DROP INDEX {index};
                             CREATE INDEX {index} ON {table} (negotiation_id, next_attempt_at)
                              WHERE state = 'pending'"
                        )),
                        _ => Ok(()),
                    }
                    .unwrap();
                }
                let missing = Pins::read(&conn).unwrap().missing().len();
                assert_eq!(missing, if variant == "as made" { 0 } else { 10 });
                a_mixed_queue(&conn, kind);
                drained.push((variant, drain_all(&mut conn, kind)));
            }
            let (_, (log, rows)) = &drained[0];
            assert!(
                log.len() > 50 && log.iter().any(|(_, late)| *late),
                "{log:?}"
            );
            assert!(
                rows.iter().any(|(_, state, ..)| state == "pending"),
                "not due"
            );
            for (variant, other) in &drained[1..] {
                assert!(other == &drained[0].1, "{kind:?} {variant}: differs");
            }
        }
    }
}
