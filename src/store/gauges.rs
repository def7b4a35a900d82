//! What the metrics' table gauges show, read from the mirror in one read
//! transaction (the daemon does this on a timer, never per scrape).

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension};

/// Leads of one business (those marked missing included: counting them
/// apart would read every row, where this count reads an index).
#[derive(Debug, Clone, PartialEq)]
pub struct LeadCount {
    pub business_id: String,
    pub leads: i64,
}

/// Rows of one outbox table in one state.
#[derive(Debug, Clone, PartialEq)]
pub struct RowCount {
    pub table: String,
    pub state: String,
    pub rows: i64,
}

/// One schedule's backlog, as the daemon last wrote it to `schedule_lag`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleGauge {
    /// `head` or `full`.
    pub kind: String,
    /// The cron expression (schedules are few: one per distinct expression).
    pub schedule: String,
    pub businesses: i64,
    /// Passes of this schedule due and waiting for a worker.
    pub waiting: i64,
    /// How long the oldest of them has been due, in seconds (0 when none waits).
    pub lag_seconds: f64,
}

/// One reading of the mirror for the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableGauges {
    pub leads: Vec<LeadCount>,
    pub outbox_rows: Vec<RowCount>,
    /// Per outbox table: age in seconds of the oldest pending row (0 when none).
    pub oldest_pending: Vec<(String, f64)>,
    /// Configured businesses with `needs_reauth = 1`.
    pub needs_reauth: Vec<String>,
    /// Per business: Unix time of the end of its last successful pass.
    pub last_ok_sync: Vec<(String, f64)>,
    /// Each schedule's backlog.
    pub schedules: Vec<ScheduleGauge>,
    /// Unix time of this reading.
    pub read_at: f64,
    /// How long the reading took, in seconds.
    pub read_seconds: f64,
}

/// The outbox tables whose rows are counted, when they exist (`message_outbox`
/// since schema 7).
const OUTBOX_TABLES: &[&str] = &["outbox", "message_outbox"];

/// Every state a row can be in; each is reported, zero included, so that a
/// series does not vanish when its last row moves on.
const STATES: &[&str] = &["pending", "sending", "sent", "dead", "canceled"];

/// Reads the gauges.
pub fn read(conn: &mut Connection) -> Result<TableGauges> {
    let started = std::time::Instant::now();
    let tx = conn.transaction()?;
    let now = chrono::Utc::now();
    let mut g = TableGauges {
        read_at: now.timestamp_millis() as f64 / 1000.0,
        ..TableGauges::default()
    };
    {
        // Every configured business appears, with 0 leads before its first pass.
        let mut stmt = tx.prepare_cached(
            "SELECT b.business_id,
                    (SELECT count(*) FROM negotiations n WHERE n.business_id = b.business_id),
                    b.needs_reauth,
                    CASE WHEN b.last_sync_outcome = 'ok' THEN b.last_sync_finished_at END
               FROM businesses b WHERE b.configured = 1 ORDER BY b.business_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (business_id, leads, reauth, last_ok) = row?;
            if reauth == 1 {
                g.needs_reauth.push(business_id.clone());
            }
            if let Some(t) = last_ok.as_deref().and_then(crate::time::parse) {
                g.last_ok_sync
                    .push((business_id.clone(), t.timestamp_millis() as f64 / 1000.0));
            }
            g.leads.push(LeadCount { business_id, leads });
        }
    }
    for table in OUTBOX_TABLES {
        let exists: bool = tx.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get(0),
        )?;
        if !exists {
            continue;
        }
        let mut counts: Vec<(String, i64)> = STATES.iter().map(|s| (s.to_string(), 0)).collect();
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT state, count(*) FROM {table} GROUP BY state"
        ))?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            match counts.iter_mut().find(|(s, _)| *s == state) {
                Some(c) => c.1 = n,
                None => counts.push((state, n)),
            }
        }
        g.outbox_rows
            .extend(counts.into_iter().map(|(state, rows)| RowCount {
                table: table.to_string(),
                state,
                rows,
            }));
        let oldest: Option<String> = tx
            .query_row(
                &format!(
                    "SELECT min(created_at) FROM {table} WHERE state = 'pending' AND {}",
                    super::outbox::TIME_SHAPED_CREATED_AT
                ),
                [],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let age = oldest
            .as_deref()
            .and_then(crate::time::parse)
            .map_or(0.0, |t| {
                ((now - t).num_milliseconds().max(0) as f64) / 1000.0
            });
        g.oldest_pending.push((table.to_string(), age));
    }
    {
        let mut stmt = tx.prepare_cached(
            "SELECT kind, schedule, businesses, waiting, oldest_due_at
               FROM schedule_lag ORDER BY kind DESC, schedule",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        for row in rows {
            let (kind, schedule, businesses, waiting, oldest) = row?;
            let lag_seconds = match oldest.as_deref().and_then(crate::time::parse) {
                Some(t) if waiting > 0 => ((now - t).num_milliseconds().max(0) as f64) / 1000.0,
                _ => 0.0,
            };
            g.schedules.push(ScheduleGauge {
                kind,
                schedule,
                businesses,
                waiting,
                lag_seconds,
            });
        }
    }
    tx.commit()?;
    g.read_seconds = started.elapsed().as_secs_f64();
    Ok(g)
}
