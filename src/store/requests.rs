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
/// let through but that is no request (a `business_id` written as a BLOB,
/// or, before schema 16, text with a NUL: SQLite's GLOB stops there) is
/// refused here, alone, with an error that says why, so that it never stops
/// the rows after it from being read nor reaches the daemon as a business.
pub fn new_requests(conn: &Connection) -> Result<Vec<NewRequest>> {
    let mut bad: Vec<(i64, &'static str)> = Vec::new();
    let mut rows = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT id, business_id, kind, accept_missing FROM sync_requests
              WHERE started_at IS NULL AND finished_at IS NULL ORDER BY id",
        )?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            let id: i64 = r.get(0)?;
            match read_request(id, r) {
                Ok(request) => rows.push(request),
                Err(why) => bad.push((id, why)),
            }
        }
    }
    for (id, why) in bad {
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

/// One row of `sync_requests` as a request, or why it is none. The errors
/// are fixed text: never the bad value itself, whose NUL would cut the
/// message short in the partner's tools.
fn read_request(id: i64, r: &rusqlite::Row<'_>) -> Result<NewRequest, &'static str> {
    use rusqlite::types::ValueRef;
    const NOT_TEXT: &str = "business_id is not text (a BLOB, or bytes that are not UTF-8): \
                            write it as a quoted string of digits, \
                            e.g. VALUES ('468046965846925323', 'full')";
    const NOT_DIGITS: &str = "business_id holds something other than digits (a NUL character, \
                              char(0), cuts what sqlite3 shows of it): write it as a quoted \
                              string of digits, e.g. VALUES ('468046965846925323', 'full')";
    const BAD_KIND: &str = "kind must be 'head' or 'full'";
    let business_id = match r.get_ref(1) {
        Ok(ValueRef::Null) => None,
        Ok(ValueRef::Text(t)) => match std::str::from_utf8(t) {
            Ok(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => Some(t.to_string()),
            Ok(_) => return Err(NOT_DIGITS),
            Err(_) => return Err(NOT_TEXT),
        },
        _ => return Err(NOT_TEXT),
    };
    let kind = match r.get_ref(2) {
        Ok(ValueRef::Text(b"head")) => "head",
        Ok(ValueRef::Text(b"full")) => "full",
        _ => return Err(BAD_KIND),
    };
    Ok(NewRequest {
        id,
        business_id,
        kind: kind.to_string(),
        accept_missing: matches!(r.get_ref(3), Ok(ValueRef::Integer(1))),
    })
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

/// Records the end of a request the daemon took, on that row only: one
/// deleted meanwhile (a program's way to cancel it) and another inserted
/// with the same id (explicitly, or SQLite reusing the highest rowid) is
/// another request, which this answer must not end. The row is told by the
/// `started_at` the daemon wrote when it took it (to the millisecond: the
/// daemon takes rows at most every half second, so a reused id is taken at
/// another time); nothing else of the row is compared, so a program that
/// rewrites `requested_at` (an ORM touching its timestamps) still gets its
/// answer. False when the row is no longer that one, or already finished.
pub fn finish_taken(
    conn: &Connection,
    id: i64,
    taken_at: &str,
    outcome: &str,
    error: Option<&str>,
    summary: &str,
    now: &str,
) -> Result<bool> {
    let n = conn.execute(
        "UPDATE sync_requests SET finished_at = ?6, outcome = ?3, error = ?4, summary = ?5
          WHERE id = ?1 AND started_at IS ?2 AND finished_at IS NULL",
        params![id, taken_at, outcome, error, summary, now],
    )?;
    Ok(n == 1)
}

/// The requests that seem taken, a page at a time: read through the
/// partial index of migration 26, never a scan of the whole table (finished
/// rows are kept for days, hundreds of thousands of them).
const STARTED_OPEN: &str = "SELECT id, started_at FROM sync_requests
  WHERE started_at IS NOT NULL AND finished_at IS NULL AND id > ?1 ORDER BY id LIMIT ?2";
/// The first page: from the lowest id there is, `i64::MIN` included (a
/// program may give any id), which no `id > ?` bound can take in.
const STARTED_OPEN_FIRST: &str = "SELECT id, started_at FROM sync_requests
  WHERE started_at IS NOT NULL AND finished_at IS NULL ORDER BY id LIMIT ?1";

/// Requests taken (`started_at` set) and not finished: the daemon's own,
/// and any a program inserted with `started_at` already set, or changed
/// since the daemon took them. At most `limit` with an id above `after`
/// (from the first when `None`), oldest first (the caller pages on with
/// the last id it got).
pub fn started_open(
    conn: &Connection,
    after: Option<i64>,
    limit: usize,
) -> Result<Vec<(i64, rusqlite::types::Value)>> {
    let row = |r: &rusqlite::Row| Ok((r.get(0)?, r.get(1)?));
    let rows = match after {
        Some(after) => conn
            .prepare_cached(STARTED_OPEN)?
            .query_map(params![after, limit as i64], row)?
            .collect::<rusqlite::Result<_>>()?,
        None => conn
            .prepare_cached(STARTED_OPEN_FIRST)?
            .query_map(params![limit as i64], row)?
            .collect::<rusqlite::Result<_>>()?,
    };
    Ok(rows)
}

/// Refuses a request that looks taken but that the daemon never took (or
/// whose `started_at` changed since): nobody would ever finish it. Only
/// while the row still has the `started_at` it was seen with.
pub fn refuse_started(
    conn: &Connection,
    id: i64,
    started_at: &rusqlite::types::Value,
    why: &str,
    now: &str,
) -> Result<bool> {
    let n = conn.execute(
        "UPDATE sync_requests SET finished_at = ?4, outcome = 'refused', error = ?3, summary = ?3
          WHERE id = ?1 AND started_at IS ?2 AND finished_at IS NULL",
        params![id, started_at, why, now],
    )?;
    Ok(n == 1)
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

    /// The sweep's first page starts at the lowest id there can be: a row
    /// with id -9223372036854775808 (a program may give any id) is read too.
    #[test]
    fn the_first_page_of_started_rows_includes_the_lowest_id() {
        let c = conn();
        for id in [i64::MIN, i64::MIN + 1, 7] {
            c.execute(
                "INSERT INTO sync_requests (id, kind, started_at) VALUES (?1, 'head', 't')",
                [id],
            )
            .unwrap();
        }
        let first = started_open(&c, None, 2).unwrap();
        let ids: Vec<i64> = first.iter().map(|r| r.0).collect();
        assert_eq!(ids, [i64::MIN, i64::MIN + 1]);
        let next = started_open(&c, Some(ids[1]), 2).unwrap();
        assert_eq!(next.iter().map(|r| r.0).collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn a_row_the_table_could_not_refuse_is_refused_alone_and_stalls_nothing() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::migrate_to(&mut c, 15).unwrap();
        insert(&c, Some("12"), "head", false).unwrap();
        // Before schema 16, the CHECK read a BLOB's bytes as digits, and TEXT
        // affinity keeps a BLOB a BLOB: a program's `sqlite3` typo got this
        // far, and such a row may still wait after the upgrade.
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
        crate::store::migrate(&mut c).unwrap();
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

    /// The row as the table has it, in the partner's words.
    fn outcome(c: &Connection, id: i64) -> (Option<String>, Option<String>) {
        c.query_row(
            "SELECT outcome, error FROM sync_requests WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn a_business_id_with_a_nul_is_refused_by_the_table() {
        let c = conn();
        // SQLite's GLOB stops at the NUL: '12' passed the digits check.
        for (sql, what) in [
            (
                "INSERT INTO sync_requests (business_id) VALUES ('12' || char(0) || 'abc')",
                "NUL",
            ),
            (
                "INSERT INTO sync_requests (business_id) VALUES (x'3132')",
                "BLOB",
            ),
        ] {
            let e = c.execute(sql, []).expect_err(what).to_string();
            assert!(e.contains("sync_requests: business_id"), "{what}: {e}");
        }
        insert(&c, Some("12"), "head", false).unwrap();
        let e = c
            .execute(
                "UPDATE sync_requests SET business_id = '12' || char(0) WHERE id = 1",
                [],
            )
            .expect_err("NUL by UPDATE")
            .to_string();
        assert!(e.contains("sync_requests: business_id"), "{e}");
        // NULL (every business) and digits still go in.
        insert(&c, None, "full", false).unwrap();
        assert_eq!(new_requests(&c).unwrap().len(), 2);
    }

    #[test]
    fn a_pre_upgrade_row_with_a_nul_is_refused_alone_with_a_readable_error() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::migrate_to(&mut c, 15).unwrap();
        // Written before schema 16, when the table let them in.
        c.execute_batch(
            "INSERT INTO sync_requests (id, business_id) VALUES (1, '12' || char(0) || 'abc');
             INSERT INTO sync_requests (id, business_id) VALUES (2, '34');
             INSERT INTO sync_requests (id, business_id) VALUES (3, x'3536');
             INSERT INTO sync_requests (id, business_id, kind) VALUES (4, NULL, 'full');
             CREATE TABLE partner_log (request_id INTEGER);
             CREATE TRIGGER partner_logs AFTER INSERT ON sync_requests
               BEGIN INSERT INTO partner_log VALUES (NEW.id); END;
             CREATE VIEW partner_open AS SELECT id FROM sync_requests WHERE finished_at IS NULL;",
        )
        .unwrap();
        crate::store::migrate(&mut c).unwrap();
        // The upgrade keeps the partner's own trigger and view (no rebuild).
        insert(&c, Some("78"), "head", false).unwrap();
        assert_eq!(
            c.query_row("SELECT count(*) FROM partner_log", [], |r| r
                .get::<_, i64>(0))
                .unwrap(),
            1
        );
        c.execute("DELETE FROM sync_requests WHERE business_id = '78'", [])
            .unwrap();
        assert_eq!(
            c.query_row("SELECT count(*) FROM partner_open", [], |r| r
                .get::<_, i64>(0))
                .unwrap(),
            4
        );
        let new = new_requests(&c).unwrap();
        let ids: Vec<(i64, Option<String>)> =
            new.iter().map(|r| (r.id, r.business_id.clone())).collect();
        assert_eq!(ids, vec![(2, Some("34".into())), (4, None)]);
        for id in [1, 3] {
            let (o, e) = outcome(&c, id);
            assert_eq!(o.as_deref(), Some("refused"), "row {id}");
            let e = e.unwrap();
            assert!(e.contains("business_id"), "row {id}: {e}");
            // The partner's tools cut text at a NUL: the error holds none.
            assert!(!e.contains('\0'), "row {id}: {e:?}");
        }
        assert!(outcome(&c, 1).1.unwrap().contains("NUL"));
        assert_eq!(new_requests(&c).unwrap().len(), 2);
    }

    /// The sweep for requests that seem taken runs every 10 s on the one
    /// database thread: it reads the partial index, not the whole table.
    #[test]
    fn the_sweep_reads_the_started_open_index_not_the_table() {
        let c = conn();
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {STARTED_OPEN}"))
            .unwrap()
            .query_map(params![i64::MIN, 1000], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|d| d.contains("USING INDEX sync_requests_started_open")),
            "{plan:?}"
        );
    }

    /// Pages on past the rows already seen, negative ids included; a row a
    /// program rewrote `requested_at` of is still finished by its taker.
    #[test]
    fn started_open_pages_and_finish_taken_matches_on_started_at() {
        let c = conn();
        for id in [-5, 1, 2, 3] {
            c.execute(
                "INSERT INTO sync_requests (id, business_id, kind, started_at)
                 VALUES (?1, '12', 'head', '2026-01-01T00:00:00.123Z')",
                [id],
            )
            .unwrap();
        }
        let first = started_open(&c, None, 2).unwrap();
        assert_eq!(first.iter().map(|r| r.0).collect::<Vec<_>>(), [-5, 1]);
        let next = started_open(&c, Some(1), 2).unwrap();
        assert_eq!(next.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3]);
        c.execute(
            "UPDATE sync_requests SET requested_at = '2030-01-01T00:00:00Z' WHERE id = 2",
            [],
        )
        .unwrap();
        assert!(finish_taken(&c, 2, "2026-01-01T00:00:00.123Z", "ok", None, "s", "now").unwrap());
        assert!(!finish_taken(&c, 3, "2026-01-01T00:00:00.124Z", "ok", None, "s", "now").unwrap());
    }
}
