//! The outbox: claim / finish / recover, attempts, and the operator's commands.

use anyhow::{Result, bail};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;

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
    let rows = stmt
        .query_map([state], |r| {
            Ok(OutboxRow {
                id: r.get(0)?,
                negotiation_id: r.get(1)?,
                business_id: r.get(2)?,
                status: r.get(3)?,
                partner_status_changed_at: r.get(4)?,
                invoice_amount_in_cents: r.get(5)?,
                state: r.get(6)?,
                attempts: r.get(7)?,
                next_attempt_at: r.get(8)?,
                last_error: r.get(9)?,
                last_http_status: r.get(10)?,
                last_trace_id: r.get(11)?,
                created_at: r.get(12)?,
                sent_at: r.get(13)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn state_of(conn: &Connection, id: i64) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| r.get(0))
        .optional()?)
}

/// Puts dead rows back to pending with their attempts reset. Returns, per
/// id, `Ok(())` or why it was not changed.
pub fn retry_dead(
    conn: &mut Connection,
    ids: &[i64],
    now: &str,
) -> Result<Vec<(i64, Result<(), String>)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    for &id in ids {
        let r = match state_of(&tx, id)? {
            None => Err(format!("outbox row {id} does not exist")),
            Some(s) if s == "dead" => {
                tx.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?2,
                         last_error = NULL WHERE id = ?1",
                    params![id, now],
                )?;
                Ok(())
            }
            Some(s) => Err(format!(
                "outbox row {id} is {s}, not dead; only dead rows can be retried"
            )),
        };
        out.push((id, r));
    }
    tx.commit()?;
    Ok(out)
}

/// Puts every dead row back to pending; returns their ids.
pub fn retry_all_dead(conn: &Connection, now: &str) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare(
        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?1, last_error = NULL
          WHERE state = 'dead' RETURNING id",
    )?;
    let mut ids = stmt
        .query_map([now], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// Cancels pending rows (never sent). Returns, per id, `Ok(())` or why not.
pub fn cancel(conn: &mut Connection, ids: &[i64]) -> Result<Vec<(i64, Result<(), String>)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    for &id in ids {
        let r = match state_of(&tx, id)? {
            None => Err(format!("outbox row {id} does not exist")),
            Some(s) if s == "pending" => {
                tx.execute(
                    "UPDATE outbox SET state = 'canceled', last_error = 'canceled by an operator'
                      WHERE id = ?1",
                    [id],
                )?;
                Ok(())
            }
            Some(s) if s == "sending" => Err(format!(
                "outbox row {id} is being sent right now and cannot be canceled"
            )),
            Some(s) => Err(format!(
                "outbox row {id} is {s}; only pending rows can be canceled"
            )),
        };
        out.push((id, r));
    }
    tx.commit()?;
    Ok(out)
}

/// A row claimed for sending (now in state `sending`).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub negotiation_id: String,
    /// The row's business, or the lead's in the mirror, or the only configured one.
    pub business_id: Option<String>,
    pub status: String,
    pub partner_status_changed_at: String,
    pub invoice_amount_in_cents: Option<i64>,
    /// This attempt's number (1 for the first).
    pub attempt: i64,
}

/// Which rows a claim may take.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    /// Businesses whose rows stay pending (needs re-authorization, disabled).
    pub blocked_businesses: Vec<String>,
    /// The business of rows that name none and whose lead is not mirrored,
    /// when exactly one business is configured.
    pub default_business: Option<String>,
}

/// The columns a claim reads, in the order [`claimed_from_row`] expects.
const CLAIM_COLUMNS: &str =
    "o.id, o.negotiation_id, COALESCE(o.business_id, n.business_id, :default_business),
    o.status, o.partner_status_changed_at, o.invoice_amount_in_cents, o.attempts";

fn claimed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Claimed> {
    Ok(Claimed {
        id: r.get(0)?,
        negotiation_id: r.get(1)?,
        business_id: r.get(2)?,
        status: r.get(3)?,
        partner_status_changed_at: r.get(4)?,
        invoice_amount_in_cents: r.get(5)?,
        attempt: r.get::<_, i64>(6)? + 1,
    })
}

/// Marks claimed rows `sending` and counts their attempt.
fn mark_sending(tx: &rusqlite::Transaction<'_>, claimed: &[Claimed]) -> Result<()> {
    let now = crate::time::now();
    let mut mark = tx.prepare_cached(
        "UPDATE outbox SET state = 'sending', attempts = ?2, sending_since = ?3,
             business_id = COALESCE(business_id, ?4)
          WHERE id = ?1",
    )?;
    for c in claimed {
        mark.execute(params![c.id, c.attempt, now, c.business_id])?;
    }
    Ok(())
}

/// Claims up to `limit` rows due by `due_by`, at most one per negotiation
/// and only the first open row of each (in order of the instant, then id);
/// marks them `sending` and counts the attempt.
pub fn claim(
    conn: &mut Connection,
    due_by: &str,
    limit: usize,
    filter: &ClaimFilter,
) -> Result<Vec<Claimed>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // INDEXED BY: walk the due rows in order and stop at `limit`. Left to
    // itself (no statistics) the planner sorted every pending row for each
    // claim, which made draining 10,000 rows quadratic.
    let claimed = {
        let mut select = tx.prepare_cached(&format!(
            "SELECT {CLAIM_COLUMNS}
               FROM outbox o INDEXED BY outbox_due
               LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
              WHERE o.state = 'pending' AND o.next_attempt_at <= :due_by
                AND NOT EXISTS (
                    SELECT 1 FROM outbox p
                     WHERE p.negotiation_id = o.negotiation_id
                       AND p.state IN ('pending', 'sending')
                       AND p.id <> o.id
                       AND (p.state = 'sending'
                            OR p.changed_at_utc < o.changed_at_utc
                            OR (p.changed_at_utc = o.changed_at_utc AND p.id < o.id)))
                AND COALESCE(o.business_id, n.business_id, :default_business, '')
                    NOT IN (SELECT value FROM json_each(:blocked))
              ORDER BY o.next_attempt_at, o.id
              LIMIT :limit"
        ))?;
        let blocked = serde_json::to_string(&filter.blocked_businesses)?;
        select
            .query_map(
                rusqlite::named_params! {
                    ":due_by": due_by,
                    ":blocked": blocked,
                    ":default_business": filter.default_business,
                    ":limit": limit as i64,
                },
                claimed_from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?
    };
    mark_sending(&tx, &claimed)?;
    tx.commit()?;
    Ok(claimed)
}

/// Inside a transaction: claims the negotiation's first open row if it is
/// pending, due by `due_by`, of a business not blocked, and no other row of
/// the negotiation is being sent.
fn claim_head_of(
    tx: &rusqlite::Transaction<'_>,
    negotiation_id: &str,
    due_by: &str,
    filter: &ClaimFilter,
) -> Result<Option<Claimed>> {
    let mut select = tx.prepare_cached(&format!(
        "SELECT {CLAIM_COLUMNS}, o.state, o.next_attempt_at,
                EXISTS (SELECT 1 FROM outbox s WHERE s.negotiation_id = o.negotiation_id
                          AND s.state = 'sending' AND s.id <> o.id)
           FROM outbox o INDEXED BY outbox_open_by_negotiation
           LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
          WHERE o.negotiation_id = :negotiation_id AND o.state IN ('pending', 'sending')
          ORDER BY o.changed_at_utc, o.id
          LIMIT 1"
    ))?;
    let head = select
        .query_row(
            rusqlite::named_params! {
                ":negotiation_id": negotiation_id,
                ":default_business": filter.default_business,
            },
            |r| {
                Ok((
                    claimed_from_row(r)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, bool>(9)?,
                ))
            },
        )
        .optional()?;
    let Some((claimed, state, next_attempt_at, other_sending)) = head else {
        return Ok(None);
    };
    let blocked = claimed
        .business_id
        .as_ref()
        .is_some_and(|b| filter.blocked_businesses.contains(b));
    if state != "pending" || next_attempt_at.as_str() > due_by || other_sending || blocked {
        return Ok(None);
    }
    mark_sending(tx, std::slice::from_ref(&claimed))?;
    Ok(Some(claimed))
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
    Sent,
    /// Back to pending until `next_attempt_at`.
    Retry {
        next_attempt_at: String,
    },
    Dead,
    /// Back to pending without counting the attempt: its business must be
    /// re-authorized first.
    Hold,
}

/// After a row, which row of its negotiation may go next (see [`finish`]).
#[derive(Debug, Clone)]
pub struct NextOf<'a> {
    pub due_by: &'a str,
    pub filter: &'a ClaimFilter,
}

/// Records a claimed row's attempts and its new state, in one transaction;
/// with `next`, also claims the next row of the same negotiation when it may
/// go now, so a negotiation's rows follow each other without a new search.
pub fn finish(
    conn: &mut Connection,
    id: i64,
    finish: &Finish,
    attempts: &[Attempt],
    now: &str,
    next: Option<NextOf<'_>>,
) -> Result<Option<Claimed>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut log = tx.prepare_cached(
            "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome,
                 error, trace_id, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
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
    let last = attempts.last();
    // The last HTTP status received (a token refusal after a 401 has none).
    let http_status = attempts.iter().rev().find_map(|a| a.http_status);
    let error = last.and_then(|a| a.error.clone());
    let trace_id = attempts.iter().rev().find_map(|a| a.trace_id.clone());
    match finish {
        Finish::Sent => tx.execute(
            "UPDATE outbox SET state = 'sent', sent_at = ?2, sending_since = NULL, last_error = NULL,
                 last_http_status = ?3, last_trace_id = ?4
              WHERE id = ?1",
            params![id, now, http_status, trace_id],
        )?,
        Finish::Retry { next_attempt_at } => tx.execute(
            "UPDATE outbox SET state = 'pending', next_attempt_at = ?2, sending_since = NULL,
                 last_error = ?3, last_http_status = ?4, last_trace_id = ?5
              WHERE id = ?1",
            params![id, next_attempt_at, error, http_status, trace_id],
        )?,
        Finish::Dead => tx.execute(
            "UPDATE outbox SET state = 'dead', sending_since = NULL, last_error = ?2,
                 last_http_status = ?3, last_trace_id = ?4
              WHERE id = ?1",
            params![id, error, http_status, trace_id],
        )?,
        Finish::Hold => tx.execute(
            "UPDATE outbox SET state = 'pending', attempts = max(attempts - 1, 0), next_attempt_at = ?2,
                 sending_since = NULL, last_error = ?3, last_http_status = ?4, last_trace_id = ?5
              WHERE id = ?1",
            params![id, now, error, http_status, trace_id],
        )?,
    };
    let claimed = match next {
        Some(next) => {
            let negotiation_id: String = tx.query_row(
                "SELECT negotiation_id FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            claim_head_of(&tx, &negotiation_id, next.due_by, next.filter)?
        }
        None => None,
    };
    tx.commit()?;
    Ok(claimed)
}

/// At start-up: rows left `sending` by a process that stopped go back to
/// pending, due now, with the interrupted attempt recorded. Returns their ids.
pub fn recover_sending(conn: &mut Connection, now: &str) -> Result<Vec<i64>> {
    const WHY: &str = "interrupted: leadsync stopped before the response was recorded; \
                       the transition may or may not have reached Thumbtack and is sent again";
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
         SELECT id, attempts, COALESCE(sending_since, ?1), NULL, 'interrupted', ?2
           FROM outbox WHERE state = 'sending'",
        params![now, WHY],
    )?;
    let ids = {
        let mut stmt = tx.prepare(
            "UPDATE outbox SET state = 'pending', next_attempt_at = ?1, sending_since = NULL,
                 last_error = ?2, last_http_status = NULL
              WHERE state = 'sending' RETURNING id",
        )?;
        stmt.query_map(params![now, WHY], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?
    };
    tx.commit()?;
    Ok(ids)
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

/// Counts rows by state.
pub fn counts(conn: &Connection) -> Result<Counts> {
    let mut c = Counts::default();
    let mut stmt = conn.prepare_cached("SELECT state, count(*) FROM outbox GROUP BY state")?;
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
            "SELECT min(created_at) FROM outbox WHERE state IN ('pending', 'sending')",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(c)
}

/// Pending rows whose business (the row's, or its lead's) is one of `businesses`.
pub fn pending_for(conn: &Connection, businesses: &[String]) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT count(*) FROM outbox o LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
          WHERE o.state = 'pending'
            AND COALESCE(o.business_id, n.business_id) IN (SELECT value FROM json_each(?1))",
        [serde_json::to_string(businesses)?],
        |r| r.get(0),
    )?)
}

/// The earliest `next_attempt_at` of a pending row, to know when to look again.
pub fn next_due(conn: &Connection) -> Result<Option<String>> {
    Ok(conn
        .query_row(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
}
