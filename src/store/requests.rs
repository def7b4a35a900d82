//! `sync_requests` (passes asked of the running daemon) and `schedule_lag`
//! (each schedule's backlog, for `status`).

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, params};

/// A request as the daemon takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRequest {
    pub id: i64,
    /// `None`: every enabled business.
    pub business_id: Option<String>,
    /// `head` or `full`.
    pub kind: String,
    pub accept_missing: bool,
}

/// A request as its asker sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: i64,
    pub business_id: Option<String>,
    pub kind: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    pub summary: Option<String>,
}

/// Inserts a request; returns its id.
pub fn insert(
    conn: &Connection,
    business_id: Option<&str>,
    kind: &str,
    accept_missing: bool,
) -> Result<i64> {
    conn.execute(
        "INSERT INTO sync_requests (business_id, kind, accept_missing) VALUES (?1, ?2, ?3)",
        params![business_id, kind, accept_missing],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Reads one request.
pub fn get(conn: &Connection, id: i64) -> Result<Option<Request>> {
    Ok(conn
        .query_row(
            "SELECT id, business_id, kind, started_at, finished_at, outcome, error, summary
               FROM sync_requests WHERE id = ?1",
            [id],
            |r| {
                Ok(Request {
                    id: r.get(0)?,
                    business_id: r.get(1)?,
                    kind: r.get(2)?,
                    started_at: r.get(3)?,
                    finished_at: r.get(4)?,
                    outcome: r.get(5)?,
                    error: r.get(6)?,
                    summary: r.get(7)?,
                })
            },
        )
        .optional()?)
}

/// Requests nobody has taken yet, oldest first. A row the table's checks
/// let through but that is no request (a `business_id` written as a BLOB:
/// its bytes pass the digits check) is refused here, alone, so that it
/// never stops the rows after it from being read.
pub fn new_requests(conn: &Connection) -> Result<Vec<NewRequest>> {
    let mut bad = Vec::new();
    let mut rows = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT id, business_id, kind, accept_missing FROM sync_requests
              WHERE started_at IS NULL AND finished_at IS NULL ORDER BY id",
        )?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let id: i64 = r.get(0)?;
            let business_id = match r.get_ref(1)? {
                rusqlite::types::ValueRef::Null => None,
                rusqlite::types::ValueRef::Text(t) => match std::str::from_utf8(t) {
                    Ok(t) => Some(t.to_string()),
                    Err(_) => {
                        bad.push(id);
                        continue;
                    }
                },
                _ => {
                    bad.push(id);
                    continue;
                }
            };
            rows.push(NewRequest {
                id,
                business_id,
                kind: r.get(2)?,
                accept_missing: r.get::<_, i64>(3)? == 1,
            });
        }
    }
    for id in bad {
        let why = "business_id is not text: write it as a quoted string of digits, \
                   e.g. VALUES ('468046965846925323', 'full')";
        conn.execute(
            "UPDATE sync_requests SET started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                    finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                    outcome = 'refused', error = ?2, summary = ?2
              WHERE id = ?1 AND finished_at IS NULL",
            params![id, why],
        )?;
        tracing::warn!(request = id, error = why, "sync request refused");
    }
    Ok(rows)
}

/// The daemon took the request (it is queued); false when its asker
/// withdrew it meanwhile.
pub fn mark_started(conn: &Connection, id: i64, now: &str) -> Result<bool> {
    let n = conn.execute(
        "UPDATE sync_requests SET started_at = ?2
          WHERE id = ?1 AND started_at IS NULL AND finished_at IS NULL",
        params![id, now],
    )?;
    Ok(n == 1)
}

/// Records a request's end: `ok`, `error` or `refused`.
pub fn finish(
    conn: &Connection,
    id: i64,
    outcome: &str,
    error: Option<&str>,
    summary: &str,
    now: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE sync_requests SET started_at = COALESCE(started_at, ?5), finished_at = ?5,
                outcome = ?2, error = ?3, summary = ?4
          WHERE id = ?1 AND finished_at IS NULL",
        params![id, outcome, error, summary, now],
    )?;
    Ok(())
}

/// Withdraws a request nobody has taken yet; false when the daemon took it.
pub fn withdraw(conn: &Connection, id: i64, why: &str, now: &str) -> Result<bool> {
    let n = conn.execute(
        "UPDATE sync_requests SET finished_at = ?3, outcome = 'error', error = ?2
          WHERE id = ?1 AND started_at IS NULL AND finished_at IS NULL",
        params![id, why, now],
    )?;
    Ok(n == 1)
}

/// Closes requests a stopped daemon had taken but not finished.
pub fn interrupt_started(conn: &Connection, why: &str, now: &str) -> Result<usize> {
    Ok(conn.execute(
        "UPDATE sync_requests SET finished_at = ?2, outcome = 'error', error = ?1
          WHERE started_at IS NOT NULL AND finished_at IS NULL",
        params![why, now],
    )?)
}

/// One schedule's backlog.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScheduleLag {
    /// `head` or `full`.
    pub kind: String,
    pub schedule: String,
    pub businesses: i64,
    /// Passes of this schedule waiting for a worker.
    pub waiting: i64,
    /// Since when the oldest of them has been due.
    pub oldest_due_at: Option<String>,
    pub updated_at: String,
}

/// Replaces the backlog table.
pub fn write_lag(conn: &mut Connection, rows: &[ScheduleLag]) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM schedule_lag", [])?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO schedule_lag (kind, schedule, businesses, waiting, oldest_due_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for r in rows {
            stmt.execute(params![
                r.kind,
                r.schedule,
                r.businesses,
                r.waiting,
                r.oldest_due_at,
                r.updated_at
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The backlog table.
pub fn read_lag(conn: &Connection) -> Result<Vec<ScheduleLag>> {
    let mut stmt = conn.prepare(
        "SELECT kind, schedule, businesses, waiting, oldest_due_at, updated_at
           FROM schedule_lag ORDER BY kind DESC, schedule",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(ScheduleLag {
                kind: r.get(0)?,
                schedule: r.get(1)?,
                businesses: r.get(2)?,
                waiting: r.get(3)?,
                oldest_due_at: r.get(4)?,
                updated_at: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::migrate(&mut c).unwrap();
        c
    }

    #[test]
    fn a_row_the_table_could_not_refuse_is_refused_alone_and_stalls_nothing() {
        let c = conn();
        insert(&c, Some("12"), "head", false).unwrap();
        // The CHECK reads a BLOB's bytes as digits, and TEXT affinity keeps
        // a BLOB a BLOB: a program's `sqlite3` typo gets this far.
        c.execute(
            "INSERT INTO sync_requests (business_id, kind) VALUES (x'3334', 'full')",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT INTO sync_requests (id, business_id, kind) VALUES (-5, '56', 'head')",
            [],
        )
        .unwrap();
        let new = new_requests(&c).unwrap();
        let ids: Vec<(i64, Option<String>)> =
            new.iter().map(|r| (r.id, r.business_id.clone())).collect();
        assert_eq!(ids, vec![(-5, Some("56".into())), (1, Some("12".into()))]);
        let bad: (Option<String>, Option<String>) = c
            .query_row(
                "SELECT outcome, error FROM sync_requests WHERE id = 2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(bad.0.as_deref(), Some("refused"));
        assert!(bad.1.unwrap().contains("business_id"));
        // Taken once: the next look finds it no more.
        assert_eq!(new_requests(&c).unwrap().len(), 2);
    }
}
