//! Retention: the logs that grow with every pass, delivery, attempt and
//! request (`sync_runs`, `webhook_events`, `outbox_attempts`,
//! `message_outbox_attempts`, `sync_requests`) lose their rows older than a
//! horizon, in small batches (one short transaction each), so that a
//! mirror run for a year does not fill its disk. The partner's rows
//! (`outbox`, `message_outbox`) and the mirror itself (`negotiations`,
//! `negotiation_changes`, `messages`, ...) are never touched.
//!
//! What each log keeps whatever its age (besides its newest row, so that
//! its ids never go back):
//! - `sync_runs`: a pass still `running`, and the newest pass of each
//!   business and kind (what a user looks at to see how a business syncs).
//!   A pruned pass's listing is summed up in `sync_runs_pruned` (schema
//!   19), which the held-up delivery check reads ([`super::mirror`]).
//! - `outbox_attempts`, `message_outbox_attempts`: every attempt of a row
//!   still `pending` or `sending`, or `dead` (it may be retried).
//! - `sync_requests`: every request not finished.
//!
//! `webhook_events` is a log only: a repeated delivery is recognised by the
//! mirror (a message by its id, a lead by its payload and event time), never
//! by this table, so a redelivery after its first copy was pruned is still
//! a duplicate.

use anyhow::Result;
use rusqlite::{Connection, TransactionBehavior, params};

/// Rows looked at by one batch (one transaction): small enough that a
/// webhook delivery waiting behind it is not held up noticeably.
pub const BATCH: usize = 200;

/// A log that is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    SyncRuns,
    WebhookEvents,
    OutboxAttempts,
    MessageOutboxAttempts,
    SyncRequests,
}

impl Log {
    /// Every pruned log, in the order a run prunes them.
    pub const ALL: [Log; 5] = [
        Log::SyncRuns,
        Log::WebhookEvents,
        Log::OutboxAttempts,
        Log::MessageOutboxAttempts,
        Log::SyncRequests,
    ];

    /// The table.
    pub fn table(self) -> &'static str {
        match self {
            Log::SyncRuns => "sync_runs",
            Log::WebhookEvents => "webhook_events",
            Log::OutboxAttempts => "outbox_attempts",
            Log::MessageOutboxAttempts => "message_outbox_attempts",
            Log::SyncRequests => "sync_requests",
        }
    }

    /// The column that dates a row (leadsync's clock, leadsync's format).
    fn dated_by(self) -> &'static str {
        match self {
            Log::SyncRuns => "started_at",
            Log::WebhookEvents => "received_at",
            Log::OutboxAttempts | Log::MessageOutboxAttempts => "started_at",
            Log::SyncRequests => "finished_at",
        }
    }

    /// Which rows (`r`) may go: dated before ?H and not kept for a reason.
    /// The newest row of every log stays whatever its age: the logs have no
    /// AUTOINCREMENT, and once the row with the highest id is gone SQLite
    /// hands its id (and those below) out again, so a program reading a log
    /// by id from where it stopped would skip the new rows.
    fn prunable(self) -> String {
        let dated = format!(
            "r.{} < ?H AND r.id < (SELECT max(m.id) FROM {} m)",
            self.dated_by(),
            self.table()
        );
        match self {
            // The newest pass of a business and kind stays: a pass is
            // pruned only when a newer one of both exists (found through
            // sync_runs_by_business, a step or two for a head pass).
            Log::SyncRuns => format!(
                "{dated} AND r.outcome IS NOT 'running'
                 AND EXISTS (SELECT 1 FROM sync_runs n
                              WHERE n.business_id = r.business_id AND n.id > r.id
                                AND n.kind = r.kind)"
            ),
            Log::WebhookEvents | Log::SyncRequests => dated,
            // A `dead` row may be sent again (`outbox retry`), and its
            // attempts' trace ids are what Thumbtack's support asks for.
            Log::OutboxAttempts => format!(
                "{dated} AND NOT EXISTS (SELECT 1 FROM outbox o
                  WHERE o.id = r.outbox_id AND o.state IN ('pending', 'sending', 'dead'))"
            ),
            Log::MessageOutboxAttempts => format!(
                "{dated} AND NOT EXISTS (SELECT 1 FROM message_outbox o
                  WHERE o.id = r.outbox_id AND o.state IN ('pending', 'sending', 'dead'))"
            ),
        }
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Rows deleted.
    pub deleted: usize,
    /// The id to go on after, or `None` when the log is done for this run.
    pub next: Option<i64>,
}

/// One batch of `log`: looks at up to `limit` rows after id `after`
/// (`i64::MIN` to begin; ids grow with time) and deletes those dated before `before` that are not
/// kept (see the module). The log is done at its end, or at a row dated at
/// or after `before`: later rows are newer (a row dated ahead by a clock
/// set back waits for the horizon to pass it). `before` is a time in
/// leadsync's form (`crate::time::fmt`).
pub fn prune_step(
    conn: &mut Connection,
    log: Log,
    before: &str,
    after: i64,
    limit: usize,
) -> Result<Step> {
    let table = log.table();
    let dated = log.dated_by();
    let prunable = log.prunable().replace("?H", "?2");
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // The last id looked at, and whether a row at or after the horizon was met.
    let (last, seen, reached): (Option<i64>, i64, i64) = tx.query_row(
        &format!(
            "SELECT max(id), count(*), COALESCE(max({dated} >= ?2), 0)
               FROM (SELECT id, {dated} FROM {table} WHERE id > ?1 ORDER BY id LIMIT ?3)"
        ),
        params![after, before, limit as i64],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let Some(last) = last else {
        return Ok(Step {
            deleted: 0,
            next: None,
        });
    };
    if log == Log::SyncRuns {
        // What the pruned listings confirmed, for the held-up delivery check.
        tx.execute(
            &format!(
                "INSERT INTO sync_runs_pruned (business_id, listed_through)
                 SELECT r.business_id, max(r.listed_at) FROM sync_runs r
                  WHERE r.id > ?1 AND r.id <= ?3 AND r.listed_at IS NOT NULL
                    AND r.business_id IS NOT NULL AND {prunable}
                  GROUP BY r.business_id
                 ON CONFLICT (business_id) DO UPDATE
                    SET listed_through = max(listed_through, excluded.listed_through)"
            ),
            params![after, before, last],
        )?;
    }
    let deleted = tx.execute(
        &format!("DELETE FROM {table} AS r WHERE r.id > ?1 AND r.id <= ?3 AND {prunable}"),
        params![after, before, last],
    )?;
    tx.commit()?;
    let done = reached != 0 || usize::try_from(seen).unwrap_or(0) < limit;
    Ok(Step {
        deleted,
        next: (!done).then_some(last),
    })
}

/// Rows deleted from each log by one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub sync_runs: usize,
    pub webhook_events: usize,
    pub outbox_attempts: usize,
    pub message_outbox_attempts: usize,
    pub sync_requests: usize,
}

impl Pruned {
    /// Counts `deleted` rows of `log`.
    pub fn add(&mut self, log: Log, deleted: usize) {
        let n = match log {
            Log::SyncRuns => &mut self.sync_runs,
            Log::WebhookEvents => &mut self.webhook_events,
            Log::OutboxAttempts => &mut self.outbox_attempts,
            Log::MessageOutboxAttempts => &mut self.message_outbox_attempts,
            Log::SyncRequests => &mut self.sync_requests,
        };
        *n += deleted;
    }

    /// Rows deleted in all.
    pub fn total(&self) -> usize {
        self.sync_runs
            + self.webhook_events
            + self.outbox_attempts
            + self.message_outbox_attempts
            + self.sync_requests
    }
}

/// Prunes every log at once, batch after batch (tests, one-shot use; the
/// daemon runs [`prune_step`] as separate jobs so that deliveries go
/// between them).
pub fn prune_all(conn: &mut Connection, before: &str, limit: usize) -> Result<Pruned> {
    let mut pruned = Pruned::default();
    for log in Log::ALL {
        let mut after = i64::MIN;
        loop {
            let step = prune_step(conn, log, before, after, limit)?;
            pruned.add(log, step.deleted);
            match step.next {
                Some(next) => after = next,
                None => break,
            }
        }
    }
    Ok(pruned)
}

/// The horizons of one run: rows dated before them go; `None` keeps a log
/// whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Horizons {
    /// `sync_runs`, the attempt logs and `sync_requests`.
    pub logs: Option<String>,
    /// `webhook_events` (kept forever unless configured: SPEC §8).
    pub webhook_events: Option<String>,
}

impl Horizons {
    /// The horizons at `now` for `keep_days` and `webhook_events_keep_days`.
    pub fn at(
        now: chrono::DateTime<chrono::Utc>,
        keep_days: u64,
        webhook_events_keep_days: u64,
    ) -> Horizons {
        Horizons {
            logs: horizon(now, keep_days),
            webhook_events: horizon(now, webhook_events_keep_days),
        }
    }

    /// The horizon of `log`.
    pub fn of(&self, log: Log) -> Option<&str> {
        match log {
            Log::WebhookEvents => self.webhook_events.as_deref(),
            _ => self.logs.as_deref(),
        }
    }
}

/// The horizon for a retention of `keep_days` at `now`: rows dated before
/// it go. `None` when nothing is pruned (0 days, or a horizon before the
/// calendar's start).
pub fn horizon(now: chrono::DateTime<chrono::Utc>, keep_days: u64) -> Option<String> {
    if keep_days == 0 {
        return None;
    }
    let keep = chrono::TimeDelta::try_days(i64::try_from(keep_days).ok()?)?;
    now.checked_sub_signed(keep).map(crate::time::fmt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "2026-01-01T00:00:00.000Z";
    const HORIZON: &str = "2026-02-01T00:00:00.000Z";
    const NEW: &str = "2026-03-01T00:00:00.000Z";

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::open_connection(&dir.path().join("m.db"), true).unwrap();
        (dir, conn)
    }

    fn ids(conn: &Connection, sql: &str) -> Vec<i64> {
        conn.prepare(sql)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn run(conn: &Connection, id: i64, business: &str, kind: &str, at: &str, outcome: &str) {
        conn.execute(
            "INSERT INTO sync_runs (id, business_id, kind, started_at, outcome, listed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?5 = 'ok' THEN ?4 END)",
            params![id, business, kind, at, outcome],
        )
        .unwrap();
    }

    #[test]
    fn old_passes_go_but_the_newest_of_each_business_and_kind_and_running_ones_stay() {
        let (_dir, mut conn) = db();
        // Business a: old full 1, old heads 2..4, an old pass left running
        // (5), a new head 6. Business b: only old passes (7 full, 8 head, 9 head).
        run(&conn, 1, "1", "full", OLD, "ok");
        run(&conn, 2, "1", "head", OLD, "ok");
        run(&conn, 3, "1", "head", OLD, "error");
        run(&conn, 4, "1", "head", OLD, "ok");
        run(&conn, 5, "1", "head", OLD, "running");
        run(&conn, 6, "1", "head", NEW, "ok");
        run(&conn, 7, "2", "full", OLD, "ok");
        run(&conn, 8, "2", "head", OLD, "ok");
        run(&conn, 9, "2", "head", "2026-01-02T00:00:00.000Z", "ok");
        let pruned = prune_all(&mut conn, HORIZON, BATCH).unwrap();
        assert_eq!(pruned.sync_runs, 4, "{pruned:?}");
        assert_eq!(
            ids(&conn, "SELECT id FROM sync_runs ORDER BY id"),
            [1, 5, 6, 7, 9]
        );
        // What the pruned listings confirmed stays known, per business.
        let through: Vec<(String, String)> = conn
            .prepare(
                "SELECT business_id, listed_through FROM sync_runs_pruned ORDER BY business_id",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            through,
            [
                ("1".to_string(), OLD.to_string()),
                ("2".to_string(), OLD.to_string())
            ]
        );
        // Again: nothing more to do.
        assert_eq!(prune_all(&mut conn, HORIZON, BATCH).unwrap().total(), 0);
    }

    #[test]
    fn the_watermark_only_moves_forward() {
        let (_dir, mut conn) = db();
        run(&conn, 1, "1", "head", "2026-01-20T00:00:00.000Z", "ok");
        run(&conn, 2, "1", "head", NEW, "ok");
        prune_all(&mut conn, HORIZON, BATCH).unwrap();
        // An older pass written later (by hand, a clock set back).
        run(&conn, 3, "1", "head", OLD, "ok");
        run(&conn, 4, "1", "head", "2026-03-02T00:00:00.000Z", "ok");
        prune_all(&mut conn, "2026-03-01T12:00:00.000Z", BATCH).unwrap();
        let through: String = conn
            .query_row("SELECT listed_through FROM sync_runs_pruned", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(through, NEW);
        assert_eq!(ids(&conn, "SELECT id FROM sync_runs"), [4]);
    }

    #[test]
    fn a_newer_pass_of_the_same_kind_is_found_by_business_and_kind() {
        // Not by business alone: a monthly full pass older than the horizon
        // would read every head pass after it, ~10 s a batch.
        let (_dir, conn) = db();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN DELETE FROM sync_runs AS r WHERE r.id > ?1 AND r.id <= ?3 AND {}",
                Log::SyncRuns.prunable().replace("?H", "?2")
            ))
            .unwrap()
            .query_map(params![0, HORIZON, 10], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            plan.iter()
                .any(|l| l
                    .contains("sync_runs_by_business_kind (business_id=? AND kind=? AND id>?)")),
            "{plan:?}"
        );
    }

    #[test]
    fn attempts_of_open_and_dead_rows_and_every_outbox_row_stay() {
        let (_dir, mut conn) = db();
        for (table, row) in [
            (
                "outbox",
                "(negotiation_id, status, partner_status_changed_at) VALUES ('1', 'appt_scheduled', '2026-01-01T00:00:00Z')",
            ),
            (
                "message_outbox",
                "(negotiation_id, text) VALUES ('1', 'hello')",
            ),
        ] {
            for _ in 0..3 {
                conn.execute(&format!("INSERT INTO {table} {row}"), [])
                    .unwrap();
            }
            // 1 sent, 2 dead, 3 pending (retrying).
            conn.execute(
                &format!("UPDATE {table} SET state = 'sent' WHERE id = 1"),
                [],
            )
            .unwrap();
            conn.execute(
                &format!("UPDATE {table} SET state = 'dead' WHERE id = 2"),
                [],
            )
            .unwrap();
            let attempts = format!("{table}_attempts");
            for (outbox_id, at) in [(1, OLD), (1, NEW), (2, OLD), (3, OLD), (3, NEW)] {
                conn.execute(
                    &format!(
                        "INSERT INTO {attempts} (outbox_id, attempt, started_at, outcome)
                         VALUES (?1, 1, ?2, 'retry')"
                    ),
                    params![outbox_id, at],
                )
                .unwrap();
            }
        }
        let pruned = prune_all(&mut conn, HORIZON, BATCH).unwrap();
        // Only the sent row's old attempt: a dead row may be retried.
        assert_eq!(
            (pruned.outbox_attempts, pruned.message_outbox_attempts),
            (1, 1)
        );
        for table in ["outbox", "message_outbox"] {
            assert_eq!(
                ids(&conn, &format!("SELECT id FROM {table} ORDER BY id")),
                [1, 2, 3],
                "{table}"
            );
            assert_eq!(
                ids(
                    &conn,
                    &format!("SELECT id FROM {table}_attempts ORDER BY id")
                ),
                [2, 3, 4, 5],
                "{table}"
            );
        }
    }

    #[test]
    fn old_deliveries_and_finished_requests_go() {
        let (_dir, mut conn) = db();
        for at in [OLD, OLD, NEW] {
            conn.execute(
                "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                 VALUES (?1, 'NegotiationCreatedV4', '{}', 'applied')",
                [at],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO sync_requests (id, business_id, requested_at, finished_at, outcome)
                 VALUES (-5, '1', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z', 'ok');
             INSERT INTO sync_requests (id, business_id, requested_at) VALUES (1, '1', '2026-01-01T00:00:00.000Z');
             INSERT INTO sync_requests (id, business_id, requested_at, finished_at, outcome)
                 VALUES (2, '1', '2026-03-01T00:00:00.000Z', '2026-03-01T00:00:01.000Z', 'ok');",
        )
        .unwrap();
        let pruned = prune_all(&mut conn, HORIZON, BATCH).unwrap();
        assert_eq!((pruned.webhook_events, pruned.sync_requests), (2, 1));
        assert_eq!(ids(&conn, "SELECT id FROM webhook_events"), [3]);
        assert_eq!(
            ids(&conn, "SELECT id FROM sync_requests ORDER BY id"),
            [1, 2]
        );
    }

    #[test]
    fn a_batch_looks_at_no_more_than_its_limit_and_stops_at_the_horizon() {
        let (_dir, mut conn) = db();
        for _ in 0..7 {
            conn.execute(
                "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                 VALUES (?1, 'ReviewCreatedV4', '{}', 'ignored')",
                [OLD],
            )
            .unwrap();
        }
        for _ in 0..3 {
            conn.execute(
                "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                 VALUES (?1, 'ReviewCreatedV4', '{}', 'ignored')",
                [NEW],
            )
            .unwrap();
        }
        let mut steps = Vec::new();
        let mut after = i64::MIN;
        loop {
            let step = prune_step(&mut conn, Log::WebhookEvents, HORIZON, after, 3).unwrap();
            steps.push(step.deleted);
            match step.next {
                Some(next) => after = next,
                None => break,
            }
        }
        // 3, 3, then one old row with the first new ones: the log is done there.
        assert_eq!(steps, [3, 3, 1]);
        assert_eq!(
            ids(&conn, "SELECT id FROM webhook_events ORDER BY id"),
            [8, 9, 10]
        );
    }

    /// A log whose rows were all older than the horizon lost them all, its
    /// newest included: SQLite then gives the next row the lowest free id
    /// again (no AUTOINCREMENT on the logs), and a program reading a log by
    /// id from where it stopped (`WHERE id > :last`) skipped every row
    /// until the ids passed its mark again.
    #[test]
    fn the_newest_row_of_each_log_stays_so_that_ids_never_go_back() {
        let (_dir, mut conn) = db();
        for _ in 0..3 {
            conn.execute(
                "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                 VALUES (?1, 'ReviewCreatedV4', '{}', 'ignored')",
                [OLD],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('1', 'hi');
             UPDATE message_outbox SET state = 'sent';
             INSERT INTO sync_requests (business_id, requested_at, finished_at, outcome)
                 VALUES ('1', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z', 'ok'),
                        ('1', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z', 'ok');",
        )
        .unwrap();
        for _ in 0..2 {
            conn.execute(
                "INSERT INTO message_outbox_attempts (outbox_id, attempt, started_at, outcome)
                 VALUES (1, 1, ?1, 'sent')",
                [OLD],
            )
            .unwrap();
        }
        let pruned = prune_all(&mut conn, HORIZON, BATCH).unwrap();
        assert_eq!(
            (
                pruned.webhook_events,
                pruned.message_outbox_attempts,
                pruned.sync_requests
            ),
            (2, 1, 1)
        );
        conn.execute(
            "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
             VALUES (?1, 'ReviewCreatedV4', '{}', 'ignored')",
            [NEW],
        )
        .unwrap();
        assert_eq!(conn.last_insert_rowid(), 4);
        // Kept, it goes once a newer row is there.
        prune_all(&mut conn, HORIZON, BATCH).unwrap();
        assert_eq!(ids(&conn, "SELECT id FROM webhook_events"), [4]);
    }

    #[test]
    fn no_horizon_for_zero_days() {
        let now = crate::time::parse(NEW).unwrap();
        assert_eq!(horizon(now, 0), None);
        assert_eq!(horizon(now, 28).as_deref(), Some(HORIZON));
        assert_eq!(horizon(now, u64::MAX), None);
    }
}
