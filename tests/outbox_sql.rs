//! The outbox as another program sees it: plain SQL inserts validated by the
//! table itself; WAL readers beside the writer; the outbox commands.

mod common;

use common::{Env, count, text};
use leadsync::store::{self, Store};
use rusqlite::{Connection, params};
use std::time::Duration;

fn fresh() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    drop(store::open_connection(&path, true).unwrap());
    // From here on, a plain connection: what a partner's program has.
    let conn = Connection::open(&path).unwrap();
    (dir, conn)
}

fn insert(
    conn: &Connection,
    negotiation: Option<&str>,
    status: Option<&str>,
    at: Option<&str>,
    cents: Option<rusqlite::types::Value>,
) -> Result<usize, String> {
    conn.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, invoice_amount_in_cents)
         VALUES (?1, ?2, ?3, ?4)",
        params![negotiation, status, at, cents],
    )
    .map_err(|e| e.to_string())
}

fn rejected(r: Result<usize, String>, needle: &str) {
    match r {
        Ok(_) => panic!("row accepted; expected a rejection mentioning {needle:?}"),
        Err(e) => assert!(
            e.contains(needle),
            "message {e:?} should mention {needle:?}"
        ),
    }
}

#[test]
fn bad_rows_are_rejected_with_messages_a_person_understands() {
    let (_d, c) = fresh();
    let n = Some("519153480500518912");
    let at = Some("2024-06-14T09:30:00Z");
    rejected(
        insert(&c, n, Some("done"), at, None),
        "status must be one of",
    );
    rejected(insert(&c, n, None, at, None), "status must be one of");
    rejected(
        insert(&c, None, Some("job_complete"), at, None),
        "negotiation_id is required",
    );
    rejected(
        insert(&c, Some(""), Some("job_complete"), at, None),
        "negotiation_id is required",
    );
    rejected(
        insert(&c, n, Some("job_complete"), None, None),
        "partner_status_changed_at is required",
    );
    for bad_time in [
        "now",
        "2024-06-14",
        "2024-06-14T09:30:00",  // no zone
        "2024-06-14 09:30:00Z", // no T
        "2024-02-30T09:30:00Z", // no such day
        "2023-02-29T09:30:00Z", // not a leap year
        "2024-06-14T24:00:00Z",
        "2024-06-14T09:60:00Z",
        "2024-06-14T09:30:00.Z", // empty fraction
        "2024-06-14T09:30:00+25:00",
        "2024-06-14T09:30:00Zjunk",
        "14/06/2024 09:30",
    ] {
        let r = insert(&c, n, Some("appt_scheduled"), Some(bad_time), None);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("must be an RFC 3339 time")),
            "{bad_time:?} should be rejected as not RFC 3339, got {r:?}"
        );
    }
    rejected(
        insert(&c, n, Some("job_complete"), at, Some((-1i64).into())),
        "must not be negative",
    );
    rejected(
        insert(&c, n, Some("appt_scheduled"), at, Some(100i64.into())),
        "only allowed with status job_complete or invoice_paid",
    );
    rejected(
        insert(&c, n, Some("job_complete"), at, Some(12.5f64.into())),
        "whole number of cents",
    );
    rejected(
        c.execute(
            "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at) VALUES ('1', 'acme', 'job_complete', '2024-06-14T09:30:00Z')",
            [],
        )
        .map_err(|e| e.to_string()),
        "business_id must be",
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM outbox"),
        0,
        "nothing was written"
    );
}

#[test]
fn the_three_time_forms_and_amounts_are_accepted() {
    let (_d, c) = fresh();
    let n = Some("519153480500518912");
    for at in [
        "2024-06-14T09:30:00Z",
        "2024-06-14T11:30:00+02:00",
        "2024-06-14T09:30:00.123456Z",
        "2024-06-14T04:30:00.5-05:00",
        "2024-02-29T23:59:59Z",
    ] {
        insert(&c, n, Some("appt_scheduled"), Some(at), None)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
    }
    insert(
        &c,
        n,
        Some("job_complete"),
        Some("2024-06-14T09:30:00Z"),
        Some(125000i64.into()),
    )
    .unwrap();
    insert(
        &c,
        n,
        Some("invoice_paid"),
        Some("2024-06-14T09:30:00Z"),
        Some(0i64.into()),
    )
    .unwrap();
    // A number given as text is stored as an integer (column affinity) and accepted.
    insert(
        &c,
        n,
        Some("invoice_paid"),
        Some("2024-06-14T09:30:00Z"),
        Some("4200".to_string().into()),
    )
    .unwrap();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0"
        ),
        8
    );
    // The ordering column holds the instant in UTC whatever the zone.
    let utc: String = c
        .query_row("SELECT changed_at_utc FROM outbox WHERE partner_status_changed_at = '2024-06-14T11:30:00+02:00'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(utc, "2024-06-14T09:30:00.000Z");
}

#[test]
fn updates_are_validated_like_inserts() {
    let (_d, c) = fresh();
    insert(
        &c,
        Some("1"),
        Some("appt_scheduled"),
        Some("2024-06-14T09:30:00Z"),
        None,
    )
    .unwrap();
    let e = c
        .execute("UPDATE outbox SET status = 'finished'", [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("status must be one of"), "{e}");
    let e = c
        .execute("UPDATE outbox SET state = 'lost'", [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("CHECK"), "{e}");
}

#[test]
fn migrations_are_idempotent_and_the_schema_is_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    for _ in 0..3 {
        let c = store::open_connection(&path, true).unwrap();
        assert_eq!(count(&c, "PRAGMA user_version"), store::schema_version());
    }
    let c = Connection::open(&path).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    for table in [
        "negotiations",
        "negotiation_changes",
        "businesses",
        "sync_runs",
        "outbox",
        "outbox_attempts",
    ] {
        assert_eq!(
            count(
                &c,
                &format!(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'"
                )
            ),
            1,
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_are_not_blocked_while_the_writer_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let store = Store::open(&path).unwrap();
    // The daemon's writer holds a write transaction open...
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .call(move |c| {
                    let tx = c.transaction()?;
                    tx.execute(
                        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES ('1', 'appt_scheduled', '2024-06-14T09:30:00Z')",
                        [],
                    )?;
                    held_tx.send(()).ok();
                    release_rx.recv_timeout(Duration::from_secs(10)).ok();
                    tx.commit()?;
                    Ok(())
                })
                .await
        })
    };
    held_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // ...and a reader (sqlite3, Datasette) reads at once, without waiting.
    let reader = Connection::open(&path).unwrap();
    reader.busy_timeout(Duration::ZERO).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        count(&reader, "SELECT count(*) FROM outbox"),
        0,
        "uncommitted row invisible"
    );
    // A reader that waited for the writer would wait until the writer gives
    // up (10 s, above): well under that is "at once", whatever the load.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    release_tx.send(()).unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(count(&reader, "SELECT count(*) FROM outbox"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_and_outbox_commands_end_to_end() {
    let env = Env::small().await;
    let n = env.sandbox.lead_ids(&env.business_ids()[0])[0].clone();

    let o = env.run(&[
        "enqueue",
        "--negotiation",
        &n,
        "--status",
        "job_complete",
        "--at",
        "2024-06-14T11:30:00+02:00",
        "--invoice-cents",
        "125000",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let id: i64 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("prints the row id");

    // The same validation as the table, and nothing written.
    for (status, at, cents, message) in [
        (
            "finished",
            "2024-06-14T09:30:00Z",
            None,
            "status must be one of",
        ),
        ("appt_scheduled", "yesterday", None, "RFC 3339"),
        (
            "job_complete",
            "2024-06-14T09:30:00Z",
            Some("-5"),
            "must not be negative",
        ),
    ] {
        let mut args = vec![
            "enqueue",
            "--negotiation",
            &n,
            "--status",
            status,
            "--at",
            at,
        ];
        if let Some(c) = cents {
            args.extend(["--invoice-cents", c]);
        }
        let o = env.run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(text(&o).contains(message), "{}", text(&o));
    }
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM outbox"), 1);

    let o = env.run(&["outbox", "list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows[0]["id"], id);
    assert_eq!(rows[0]["state"], "pending");
    assert_eq!(rows[0]["invoice_amount_in_cents"], 125000);
    assert_eq!(
        rows[0]["partner_status_changed_at"],
        "2024-06-14T11:30:00+02:00"
    );

    // Only dead rows can be retried; only pending ones canceled.
    let o = env.run(&["outbox", "retry", &id.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&format!("row {id} is pending, not dead")),
        "{}",
        text(&o)
    );
    let o = env.run(&["outbox", "retry", "999"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("999 does not exist"), "{}", text(&o));

    env.sql()
        .execute(
            "UPDATE outbox SET state = 'dead', attempts = 20, last_error = 'x' WHERE id = ?1",
            [id],
        )
        .unwrap();
    let o = env.run(&["outbox", "list", "--state", "dead"]);
    assert!(text(&o).contains(&n), "{}", text(&o));
    let o = env.run(&["outbox", "retry", "--all-dead"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0"
        ),
        1
    );

    let o = env.run(&["outbox", "cancel", &id.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox WHERE state = 'canceled'"
        ),
        1
    );
    let o = env.run(&["outbox", "cancel", &id.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("only pending rows can be canceled"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_before_the_first_run_and_after() {
    let env = Env::small().await;
    let o = env.run(&["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("does not exist yet"), "{}", text(&o));

    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    env.run(&[
        "enqueue",
        "--negotiation",
        "1",
        "--status",
        "pro_cancel",
        "--at",
        "2024-06-14T09:30:00Z",
    ]);
    let o = env.run(&["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let businesses = s["businesses"].as_array().unwrap();
    assert_eq!(businesses.len(), 3);
    for b in businesses {
        assert_eq!(b["leads"], 60, "{b}");
        assert_eq!(b["last_sync_outcome"], "ok");
        assert_eq!(b["needs_reauth"], false);
        assert!(b["last_sync_age_secs"].as_i64().unwrap() < 60);
        assert!(b["last_full_sync_at"].is_string());
    }
    assert_eq!(s["outbox"]["pending"], 1);
    assert_eq!(s["outbox"]["dead"], 0);
    assert!(s["outbox"]["oldest_pending_age_secs"].is_number());
    let o = env.run(&["status"]);
    assert!(text(&o).contains("outbox: 1 pending"), "{}", text(&o));
}

#[test]
fn content_is_frozen_once_a_row_leaves_pending() {
    // Issue 11, defect 1: a row edited while in flight ended `sent` with
    // content Thumbtack never got.
    let (_d, c) = fresh();
    for _ in 0..4 {
        insert(
            &c,
            Some("519153480500518912"),
            Some("job_complete"),
            Some("2024-06-14T09:30:00Z"),
            Some(100i64.into()),
        )
        .unwrap();
    }
    c.execute("UPDATE outbox SET state = 'sending', attempts = 1, sending_since = '2024-06-14T09:31:00.000Z' WHERE id = 1", [])
        .unwrap();
    c.execute("UPDATE outbox SET state = 'sent' WHERE id = 2", [])
        .unwrap();
    c.execute("UPDATE outbox SET state = 'canceled' WHERE id = 3", [])
        .unwrap();
    for id in 1..=3 {
        for edit in [
            "status = 'invoice_paid'",
            "partner_status_changed_at = '2024-06-15T09:30:00Z'",
            "invoice_amount_in_cents = 200",
            "negotiation_id = '1'",
            "business_id = '2'",
        ] {
            let e = c
                .execute(&format!("UPDATE outbox SET {edit} WHERE id = {id}"), [])
                .map_err(|e| e.to_string());
            rejected(e, "can only change while it is pending");
        }
    }
    // Pending: the partner may still correct it; an unchanged value is no edit.
    c.execute(
        "UPDATE outbox SET status = 'invoice_paid', invoice_amount_in_cents = 150 WHERE id = 4",
        [],
    )
    .unwrap();
    c.execute(
        "UPDATE outbox SET status = 'job_complete' WHERE id = 2 AND 0",
        [],
    )
    .unwrap();
    c.execute("UPDATE outbox SET status = status WHERE id = 2", [])
        .unwrap();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox WHERE status = 'job_complete' AND invoice_amount_in_cents = 100"
        ),
        3
    );
}

#[test]
fn row_ids_are_never_reused() {
    // Issue 11, defect 1: a deleted-and-reinserted id must not inherit an old outcome.
    let (_d, c) = fresh();
    let add = || {
        insert(
            &c,
            Some("1"),
            Some("appt_scheduled"),
            Some("2024-06-14T09:30:00Z"),
            None,
        )
        .unwrap();
        c.last_insert_rowid()
    };
    assert_eq!((add(), add(), add()), (1, 2, 3));
    c.execute("DELETE FROM outbox WHERE id = 3", []).unwrap();
    assert_eq!(add(), 4, "id 3 is not given again");
}

#[test]
fn an_id_given_explicitly_is_never_one_used_before() {
    // AUTOINCREMENT only keeps leadsync's own ids new: a partner's program
    // that gave the id itself (`REPLACE INTO outbox (id, ...)` as an upsert,
    // or a DELETE and an INSERT with the old id) made a new row with the id
    // of one being sent, or of one sent long ago: the new row took that
    // row's attempts log (an HTTP 200 it never had), and an outcome in
    // flight could land on it. Both tables refuse such an id.
    let (_d, c) = fresh();
    for table in ["outbox", "message_outbox"] {
        let columns = match table {
            "outbox" => "negotiation_id, status, partner_status_changed_at",
            _ => "negotiation_id, text",
        };
        let values = match table {
            "outbox" => "'1', 'appt_scheduled', '2024-06-14T09:30:00Z'",
            _ => "'1', 'hi'",
        };
        let add = |id: Option<i64>| {
            let (id_column, id_value) = match id {
                Some(id) => ("id, ", format!("{id}, ")),
                None => ("", String::new()),
            };
            c.execute(
                &format!("INSERT INTO {table} ({id_column}{columns}) VALUES ({id_value}{values})"),
                [],
            )
            .map(|_| c.last_insert_rowid())
            .map_err(|e| e.to_string())
        };
        assert_eq!((add(None), add(None), add(None)), (Ok(1), Ok(2), Ok(3)));
        // Row 3 is being sent when the partner's program replaces it, or
        // deletes it and inserts its id again.
        c.execute(
            &format!(
                "UPDATE {table} SET state = 'sending', attempts = 1,
                     sending_since = '2024-06-14T09:31:00.000Z' WHERE id = 3"
            ),
            [],
        )
        .unwrap();
        let replaced = c
            .execute(
                &format!("REPLACE INTO {table} (id, {columns}) VALUES (3, {values})"),
                [],
            )
            .map_err(|e| e.to_string());
        rejected(replaced, "never used again");
        c.execute(&format!("DELETE FROM {table} WHERE id = 3"), [])
            .unwrap();
        rejected(add(Some(3)).map(|_| 0), "never used again");
        // Row 1 is there: a plain INSERT of its id is refused by SQLite.
        rejected(add(Some(1)).map(|_| 0), "UNIQUE constraint failed");
        // Nor an id of 0 or below (SQLite never gives one; a second row
        // could take it again after a DELETE).
        for id in [0, -1, -5] {
            rejected(add(Some(id)).map(|_| 0), "never used again");
        }
        // A new id is welcome, however given; leadsync's go on after it.
        assert_eq!(add(Some(10)), Ok(10));
        // An id never used, but below the highest used so far, is refused
        // too (the table keeps only that mark, not which ids were used).
        rejected(add(Some(7)).map(|_| 0), "never used again");
        assert_eq!(add(None), Ok(11));
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM {table} WHERE id = 3")),
            0,
            "{table}"
        );
    }
}

/// The two tables, each with the columns a partner's INSERT names besides
/// `id`, and one row's values for them (`{n}`: the negotiation).
const TABLES: [(&str, &str, &str); 2] = [
    (
        "outbox",
        "negotiation_id, status, partner_status_changed_at",
        "'{n}', 'appt_scheduled', '2024-06-14T09:30:00Z'",
    ),
    ("message_outbox", "negotiation_id, text", "'{n}', 'hi'"),
];

/// `INSERT {verb} INTO table (id, ...) VALUES` one row per id (negotiation
/// 1), then `tail`: what a partner's program runs.
fn insert_ids(
    c: &Connection,
    table: &str,
    verb: &str,
    ids: &[i64],
    tail: &str,
) -> Result<usize, String> {
    let (_, columns, values) = TABLES.iter().find(|t| t.0 == table).unwrap();
    let rows: Vec<String> = ids
        .iter()
        .map(|id| format!("({id}, {})", values.replace("{n}", "1")))
        .collect();
    c.execute(
        &format!(
            "INSERT {verb} INTO {table} (id, {columns}) VALUES {} {tail}",
            rows.join(", ")
        ),
        [],
    )
    .map_err(|e| e.to_string())
}

fn ids(c: &Connection, table: &str) -> Vec<i64> {
    c.prepare(&format!("SELECT id FROM {table} ORDER BY id"))
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn insert_or_ignore_of_ids_already_there_is_taken() {
    // A BEFORE INSERT rule refused every id at or below the mark before
    // SQLite saw the conflict: `INSERT OR IGNORE` of rows already there
    // (which inserts nothing of them) aborted the whole statement, the new
    // rows with it.
    let (_d, c) = fresh();
    for (table, _, _) in TABLES {
        assert_eq!(insert_ids(&c, table, "", &[1, 2, 3], ""), Ok(3));
        assert_eq!(
            insert_ids(&c, table, "OR IGNORE", &[2, 3, 4], ""),
            Ok(1),
            "{table}"
        );
        assert_eq!(
            insert_ids(&c, table, "OR IGNORE", &[1], ""),
            Ok(0),
            "{table}"
        );
        assert_eq!(ids(&c, table), [1, 2, 3, 4], "{table}");
    }
}

#[test]
fn a_partners_job_copying_its_events_by_id_may_run_again() {
    // A cron job `INSERT OR IGNORE INTO outbox (id, ...) SELECT id, ... FROM
    // crm_events`, run again: the events copied before are ignored, the new
    // ones (in any order, some below the highest id of the statement) go in.
    let (_d, c) = fresh();
    for (table, columns, values) in TABLES {
        let events = format!("{table}_events");
        c.execute_batch(&format!(
            "CREATE TABLE {events} (id INTEGER PRIMARY KEY, n TEXT)"
        ))
        .unwrap();
        let copy = || {
            c.execute(
                &format!(
                    "INSERT OR IGNORE INTO {table} (id, {columns})
                     SELECT id, {} FROM {events} ORDER BY id DESC",
                    values.replace("'{n}'", "n")
                ),
                [],
            )
            .map_err(|e| e.to_string())
        };
        c.execute_batch(&format!("INSERT INTO {events} VALUES (1, '1'), (2, '1')"))
            .unwrap();
        assert_eq!(copy(), Ok(2), "{table}");
        // New events 10 and 5: 10 goes in first (descending), 5 after it,
        // below 10 but above every id used before the statement.
        c.execute_batch(&format!("INSERT INTO {events} VALUES (5, '1'), (10, '1')"))
            .unwrap();
        assert_eq!(copy(), Ok(2), "{table}");
        assert_eq!(copy(), Ok(0), "{table}");
        assert_eq!(ids(&c, table), [1, 2, 5, 10], "{table}");
    }
}

#[test]
fn on_conflict_do_nothing_and_do_update_on_the_id_are_taken() {
    // An upsert on the id keeps the row there: DO NOTHING leaves it, DO
    // UPDATE edits it (its attempts log stays its own); neither makes a new
    // row with a used id.
    let (_d, c) = fresh();
    for (table, _, _) in TABLES {
        assert_eq!(insert_ids(&c, table, "", &[1, 2], ""), Ok(2));
        assert_eq!(
            insert_ids(&c, table, "", &[2, 3], "ON CONFLICT(id) DO NOTHING"),
            Ok(1),
            "{table}"
        );
        assert_eq!(
            insert_ids(
                &c,
                table,
                "",
                &[1],
                "ON CONFLICT(id) DO UPDATE SET negotiation_id = '42'"
            ),
            Ok(1),
            "{table}"
        );
        assert_eq!(ids(&c, table), [1, 2, 3], "{table}");
        assert_eq!(
            count(
                &c,
                &format!("SELECT count(*) FROM {table} WHERE id = 1 AND negotiation_id = '42'")
            ),
            1,
            "{table}"
        );
    }
}

#[test]
fn several_new_ids_in_one_statement_are_taken_in_any_order() {
    // The mark is the one from before the statement: ids never used go in
    // descending, or below one the same statement put in; a used id among
    // them refuses the whole statement.
    let (_d, c) = fresh();
    for (table, _, _) in TABLES {
        assert_eq!(insert_ids(&c, table, "", &[3], ""), Ok(1));
        assert_eq!(insert_ids(&c, table, "", &[10, 7, 5], ""), Ok(3), "{table}");
        assert_eq!(
            insert_ids(&c, table, "", &[20, 15, 11], ""),
            Ok(3),
            "{table}"
        );
        rejected(
            insert_ids(&c, table, "", &[30, 25, 4], ""),
            "never used again",
        );
        assert_eq!(ids(&c, table), [3, 5, 7, 10, 11, 15, 20], "{table}");
        // Refused statements moved no mark.
        assert_eq!(insert_ids(&c, table, "", &[25], ""), Ok(1), "{table}");
    }
}

#[test]
fn with_sqlites_sequence_row_gone_a_used_id_is_still_refused() {
    // A restore, or a partner's edit, may leave a table with rows and no
    // row of its own in sqlite_sequence: the mark is then the highest id of
    // the other rows, and SQLite writes the sequence again at the end of
    // the next insert.
    let (_d, c) = fresh();
    for (table, _, _) in TABLES {
        assert_eq!(insert_ids(&c, table, "", &[1, 2, 3], ""), Ok(3));
        c.execute(
            &format!("DELETE FROM sqlite_sequence WHERE name = '{table}'"),
            [],
        )
        .unwrap();
        rejected(
            insert_ids(&c, table, "OR REPLACE", &[2], ""),
            "never used again",
        );
        c.execute(&format!("DELETE FROM {table} WHERE id = 1"), [])
            .unwrap();
        rejected(insert_ids(&c, table, "", &[1], ""), "never used again");
        assert_eq!(insert_ids(&c, table, "", &[4], ""), Ok(1), "{table}");
        assert_eq!(
            count(
                &c,
                &format!("SELECT seq FROM sqlite_sequence WHERE name = '{table}'")
            ),
            4,
            "{table}"
        );
        rejected(
            insert_ids(&c, table, "OR REPLACE", &[4], ""),
            "never used again",
        );
        assert_eq!(ids(&c, table), [2, 3, 4], "{table}");
    }
}

#[test]
fn a_new_row_is_never_given_a_claim_id() {
    // claim_id is each claim's own number: a new row is pending and has
    // none, like its attempts and sending_since.
    let (_d, c) = fresh();
    for (table, columns, values) in TABLES {
        rejected(
            c.execute(
                &format!(
                    "INSERT INTO {table} ({columns}, claim_id) VALUES ({}, 5)",
                    values.replace("{n}", "1")
                ),
                [],
            )
            .map_err(|e| e.to_string()),
            "leave claim_id out",
        );
        assert_eq!(count(&c, &format!("SELECT count(*) FROM {table}")), 0);
    }
}

#[test]
fn negotiation_ids_must_be_text_of_digits() {
    // Issue 11, defect 2: a BLOB id passed the trigger and then failed every claim.
    let (_d, c) = fresh();
    for value in [
        "X'3531393135'",
        "CAST('519153480500518912' AS BLOB)",
        "'51915abc'",
        "' 519153480500518912'",
        "12.5",
    ] {
        let r = c
            .execute(
                &format!(
                    "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                     VALUES ({value}, 'appt_scheduled', '2024-06-14T09:30:00Z')"
                ),
                [],
            )
            .map_err(|e| e.to_string());
        rejected(r, "negotiation_id must be text of digits");
    }
    c.execute("UPDATE outbox SET negotiation_id = X'31' WHERE 0", [])
        .unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM outbox"), 0);
}

#[test]
fn zone_offsets_beyond_14_hours_are_refused() {
    // Issue 11, defect 6: SQLite's date functions cannot read +15:00 ... +23:59,
    // so the row's instant was NULL and broke ordering.
    let (_d, c) = fresh();
    let n = Some("519153480500518912");
    for bad in [
        "2024-06-14T09:30:00+15:00",
        "2024-06-14T09:30:00+23:59",
        "2024-06-14T09:30:00.5-14:01",
        "2024-06-14T09:30:00-18:00",
    ] {
        rejected(
            insert(&c, n, Some("appt_scheduled"), Some(bad), None),
            "zone offset beyond +14:00/-14:00",
        );
    }
    for good in ["2024-06-14T09:30:00+14:00", "2024-06-14T09:30:00.25-14:00"] {
        insert(&c, n, Some("appt_scheduled"), Some(good), None).unwrap();
    }
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox WHERE changed_at_utc IS NULL"
        ),
        0
    );
}

#[test]
fn a_waiting_row_that_leaves_pending_waits_for_nothing() {
    let (_d, c) = fresh();
    insert(
        &c,
        Some("1"),
        Some("appt_scheduled"),
        Some("2024-06-14T09:30:00Z"),
        None,
    )
    .unwrap();
    c.execute_batch(
        "UPDATE outbox SET waiting_for = '2';
         UPDATE outbox SET state = 'canceled';
         UPDATE outbox SET state = 'pending';",
    )
    .unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM outbox WHERE waiting_for IS NULL"),
        1,
        "put back by hand, the row is due, not aside for good"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_list_never_replays_control_characters_of_a_transition() {
    // Review r11: `last_error` holds a server's ProblemDetails title/detail
    // (or whatever a partner's program wrote); `outbox list` printed it raw,
    // so an escape sequence could rewrite the operator's screen.
    let env = Env::small().await;
    let n = env.sandbox.lead_ids(&env.business_ids()[0])[0].clone();
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let db = env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
         VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
        [&n],
    )
    .unwrap();
    db.execute(
        "UPDATE outbox SET state = 'dead',
             last_error = 'a' || char(27) || '[2J' || char(7) || 'b' || char(155) || 'c' || char(10) || 'd'",
        [],
    )
    .unwrap();
    let o = env.run(&["outbox", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
    assert!(shown.contains("a [2J b c d"), "{shown:?}");
}

#[test]
fn two_paths_to_one_database_share_one_process_lock() {
    // Review r11: the lock was `<path as configured>.lock`. A second
    // `leadsync run`/`drain` reaching the same database through a symlink
    // took its own lock, reset the first one's `sending` rows to pending at
    // start-up and drained alongside it: every in-flight row sent twice.
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("data");
    std::fs::create_dir(&real).unwrap();
    let db = real.join("mirror.db");
    // Store::open lets go of the lock it took to migrate, taken again below.
    let gate = common::no_spawns();
    drop(Store::open(&db).unwrap());
    let linked_dir = dir.path().join("linked");
    std::os::unix::fs::symlink(&real, &linked_dir).unwrap();
    let linked_file = dir.path().join("other.db");
    std::os::unix::fs::symlink(&db, &linked_file).unwrap();
    let held = store::ProcessLock::try_acquire(&db).unwrap().expect("free");
    drop(gate);
    for other in [linked_dir.join("mirror.db"), linked_file] {
        assert!(
            store::ProcessLock::try_acquire(&other).unwrap().is_none(),
            "{} is the same database",
            other.display()
        );
    }
    drop(held);
    assert!(
        store::ProcessLock::try_acquire(&dir.path().join("linked/mirror.db"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn ids_with_a_nul_and_anything_after_it_are_refused() {
    // SQLite's GLOB stops at a NUL: '519' || char(0) || 'x' passed the
    // digits check of both outboxes, on INSERT and on UPDATE (and a zone
    // of a time, its check).
    let (_d, c) = fresh();
    let smuggled = ["'519' || char(0) || 'abc'", "char(0)", "'7' || char(0)"];
    for value in smuggled {
        for (sql, why) in [
            (
                format!(
                    "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                     VALUES ({value}, 'appt_scheduled', '2024-06-14T09:30:00Z')"
                ),
                "outbox: negotiation_id must be text of digits",
            ),
            (
                format!(
                    "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
                     VALUES ('519', {value}, 'appt_scheduled', '2024-06-14T09:30:00Z')"
                ),
                "outbox: business_id must be a Thumbtack business id",
            ),
            (
                format!("INSERT INTO message_outbox (negotiation_id, text) VALUES ({value}, 'hi')"),
                "message_outbox: negotiation_id must be",
            ),
            (
                format!(
                    "INSERT INTO message_outbox (negotiation_id, business_id, text)
                     VALUES ('519', {value}, 'hi')"
                ),
                "message_outbox: business_id must be",
            ),
        ] {
            rejected(c.execute(&sql, []).map_err(|e| e.to_string()), why);
        }
    }
    // The zone's check too: '+02:00' || char(0) || 'x' passed it.
    for at in [
        "'2024-06-14T09:30:00+02:00' || char(0) || 'x'",
        "'2024-06-14T09:30:00Z' || char(0)",
    ] {
        rejected(
            c.execute(
                &format!(
                    "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                     VALUES ('519', 'appt_scheduled', {at})"
                ),
                [],
            )
            .map_err(|e| e.to_string()),
            "partner_status_changed_at must be an RFC 3339 time",
        );
    }
    c.execute_batch(
        "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
         VALUES ('519', '7', 'appt_scheduled', '2024-06-14T09:30:00Z');
         INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES ('519', '7', 'hi');",
    )
    .unwrap();
    for value in smuggled {
        for (sql, why) in [
            (
                format!("UPDATE outbox SET negotiation_id = {value}"),
                "outbox: negotiation_id must be text of digits",
            ),
            (
                format!("UPDATE outbox SET business_id = {value}"),
                "outbox: business_id must be a Thumbtack business id",
            ),
            (
                format!("UPDATE message_outbox SET negotiation_id = {value}"),
                "message_outbox: negotiation_id must be",
            ),
            (
                format!("UPDATE message_outbox SET business_id = {value}"),
                "message_outbox: business_id must be",
            ),
        ] {
            rejected(c.execute(&sql, []).map_err(|e| e.to_string()), why);
        }
    }
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM outbox WHERE negotiation_id = '519' AND business_id = '7'"
        ),
        1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM message_outbox WHERE negotiation_id = '519' AND business_id = '7'"
        ),
        1
    );
}

#[test]
fn instants_outside_the_years_0000_to_9999_in_utc_are_refused() {
    // '0000-01-01T00:30:00+01:00' is year -1 in UTC, and
    // '9999-12-31T23:30:00-01:00' year 10000: Thumbtack takes neither.
    let (_d, c) = fresh();
    let n = Some("519153480500518912");
    for bad in [
        "0000-01-01T00:30:00+01:00",
        "0000-01-01T00:00:00.001+00:01",
        "9999-12-31T23:30:00-01:00",
        "9999-12-31T23:59:59.999-00:01",
    ] {
        rejected(
            insert(&c, n, Some("appt_scheduled"), Some(bad), None),
            "outside the years 0000-9999",
        );
    }
    for good in [
        "0000-01-01T00:30:00Z",
        "0000-01-01T01:30:00+01:00",
        "0000-01-01T00:30:00-01:00",
        "9999-12-31T23:30:00Z",
        "9999-12-31T22:30:00-01:00",
        "9999-12-31T23:30:00+01:00",
    ] {
        insert(&c, n, Some("appt_scheduled"), Some(good), None).unwrap();
    }
    let e = c
        .execute(
            "UPDATE outbox SET partner_status_changed_at = '0000-01-01T00:30:00+01:00'",
            [],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the years 0000-9999"), "{e}");
}

/// The table's checks and the drainer read `partner_status_changed_at`
/// alike: every time the table takes is one the drainer can send (else it
/// would die at claim time, after the partner was told it was accepted),
/// across the edges SPEC's grammar allows — offsets up to ±14:00 (beyond
/// is refused, SPEC §4), long fractions, the years 0000 and 9999 on either
/// side of UTC, leap days.
#[test]
fn every_time_the_table_takes_is_one_the_drainer_can_send() {
    let (_d, c) = fresh();
    let n = Some("519153480500518912");
    let cases = [
        "2024-06-14T09:30:00Z",
        "2024-06-14T09:30:00+23:59",
        "2024-06-14T09:30:00-23:59",
        "2024-06-14T09:30:00+14:00",
        "2024-06-14T09:30:00-00:00",
        "2024-06-14T09:30:00.123456789012345678901234567890Z",
        "2024-06-14T09:30:00.000000000+02:00",
        "2024-02-29T23:59:59.999-01:00",
        "2023-02-29T10:00:00Z",
        "0000-01-01T00:00:00Z",
        "0000-01-01T00:00:00-23:59",
        "0000-01-01T23:58:59+23:59",
        "0000-01-01T23:59:00+23:59",
        "0000-01-01T00:00:00.0001+00:01",
        "0000-02-29T12:00:00Z",
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T00:00:00+23:59",
        "9999-12-31T00:01:00-23:59",
        "9999-12-31T00:00:59-23:59",
        "2024-06-14T23:59:60Z",
        "2024-06-14t09:30:00z",
        "2024-06-14T09:30:00.Z",
        "2024-06-14T09:30:00+24:00",
        "2024-06-14T09:30:00+05:60",
        "2024-06-14T09:30:00+14:01",
        "0000-01-01T13:59:59+14:00",
        "0000-01-01T14:00:00+14:00",
        "9999-12-31T09:59:59-14:00",
        "9999-12-31T10:00:00-14:00",
    ];
    // Valid at the very edges (SPEC: offsets up to ±14:00): the checks
    // must not refuse these either.
    let valid = [
        "2024-06-14T09:30:00+14:00",
        "2024-06-14T09:30:00-00:00",
        "2024-06-14T09:30:00.123456789012345678901234567890Z",
        "2024-02-29T23:59:59.999-01:00",
        "0000-01-01T00:00:00Z",
        "0000-01-01T14:00:00+14:00",
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T09:59:59-14:00",
    ];
    let mut disagree = Vec::new();
    for at in cases {
        let taken = insert(&c, n, Some("job_complete"), Some(at), None).is_ok();
        let sendable = leadsync::time::to_utc_z(at).is_some();
        if taken && !sendable {
            disagree.push(format!("{at}: taken by the table, refused by the drainer"));
        }
        if valid.contains(&at) && !taken {
            disagree.push(format!("{at}: a valid time refused by the table"));
        }
    }
    assert!(disagree.is_empty(), "{disagree:#?}");
}

#[test]
fn the_table_and_the_drainer_agree_on_every_time() {
    // A row the table takes must be one the drainer can send (else it dies
    // at its claim), and a time the drainer can send is taken, except the
    // forms the table refuses on purpose with its message: lower-case `t`
    // and `z`, a leap second, an offset beyond ±14:00. The table's order
    // (changed_at_order) is the order of the instants, to the last digit.
    let (_d, c) = fresh();
    let stricter = [
        "2024-06-14t09:30:00Z",
        "2024-06-14T09:30:00z",
        "2016-12-31T23:59:60Z",
        "2024-06-14T09:30:00-23:59",
        "2024-06-14T09:30:00+23:59",
        "2024-06-14T09:30:00+14:01",
    ];
    let long = |digit: &str, n: usize| format!("2024-06-14T09:30:00.{}Z", digit.repeat(n));
    let mut times: Vec<String> = [
        "2024-06-14T09:30:00Z",
        "2024-06-14T09:30:00.0Z",
        "2024-06-14T09:30:00.000100Z",
        "2024-06-14T11:30:00.0004+02:00",
        "2024-06-14T09:30:00.0009999Z",
        "2024-06-14T09:30:00.001Z",
        "2024-06-14T09:30:00.123456789123Z",
        "2024-06-14T09:30:00+14:00",
        "2024-06-14T09:30:00-14:00",
        "2024-06-14T09:30:00-00:00",
        "9999-12-31T23:30:00-01:00",
        "9999-12-31T23:59:59.9995Z",
        "9999-12-31T23:59:59.999999999999999999Z",
        "9999-12-31T22:59:59.9999+00:00",
        "9999-12-31T10:00:00-14:00",
        "9999-12-31T10:00:00.000001-14:00",
        "0000-01-01T00:30:00-01:00",
        "0000-01-01T00:30:00+01:00",
        "0000-01-01T00:59:59.9996+01:00",
        "0000-01-01T01:00:00+01:00",
        "0000-01-01T14:00:00+14:00",
        "0000-01-01T13:59:59.999999+14:00",
        "10000-01-01T00:00:00Z",
        "2024-02-29T09:30:00Z",
        "2023-02-29T09:30:00Z",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(stricter.iter().map(|s| s.to_string()))
    .collect();
    for n in [20, 308, 309, 310, 400] {
        times.push(long("1", n));
        times.push(long("9", n));
    }
    let mut taken = Vec::new();
    for t in &times {
        let table = insert(&c, Some("1"), Some("appt_scheduled"), Some(t), None);
        let drainer = leadsync::time::to_utc_z(t);
        match (&table, &drainer) {
            (Ok(_), Some(_)) => taken.push((c.last_insert_rowid(), t.clone())),
            (Err(_), None) => {}
            (Err(e), Some(_)) => assert!(
                stricter.contains(&t.as_str()),
                "{t}: the drainer can send it, the table refuses it: {e}"
            ),
            (Ok(_), None) => panic!("{t}: the table takes it, the drainer cannot send it"),
        }
    }
    let mut taken: Vec<_> = taken
        .into_iter()
        .map(|(id, t)| {
            let order: Option<String> = c
                .query_row(
                    "SELECT changed_at_order FROM outbox WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap();
            let order = order.unwrap_or_else(|| panic!("{t}: no place in the order"));
            (leadsync::time::parse(&t).unwrap(), t, order)
        })
        .collect();
    // Ordered by the text of changed_at_order: the instants' order (finer
    // than chrono's nanoseconds only past nine digits: those compare by
    // their text among equal instants).
    taken.sort_by(|a, b| a.2.cmp(&b.2));
    for w in taken.windows(2) {
        assert!(
            w[0].0 <= w[1].0,
            "{} ({}) sorts before {} ({})",
            w[0].1,
            w[0].2,
            w[1].1,
            w[1].2
        );
    }
}

/// After a package upgrade, before the service restarts, the older daemon
/// still runs on the database: `status` and `outbox list` of the newer
/// binary only read it, and never migrate it under that daemon.
#[tokio::test]
async fn status_and_outbox_list_never_migrate_the_database() {
    let env = Env::small().await;
    drop(store::open_connection(&env.database(), true).unwrap());
    let latest = store::schema_version();
    env.sql()
        .pragma_update(None, "user_version", latest - 1)
        .unwrap();
    let version = |env: &Env| -> i64 {
        env.sql()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    let o = env.run(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("older than this leadsync"),
        "status says the schema is older: {}",
        text(&o)
    );
    assert_eq!(version(&env), latest - 1, "status migrated the database");
    let o = env.run(&["outbox", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        version(&env),
        latest - 1,
        "outbox list migrated the database"
    );
}

/// The mirror holds text others chose: a business the configuration no
/// longer names (its id and name as an older configuration or a partner's
/// program wrote them), a server's error text, an alert, a dead row's
/// error. `status` printed them as they were, so an escape sequence in one
/// could clear the screen, retitle the terminal or forge a line of the
/// report; `outbox list` already cleaned its cells. The table now shows
/// each such character as a space; `--json` escapes the C1 controls and
/// invisible characters serde_json leaves raw, and reads back the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_hostile_text_from_the_mirror_harmlessly() {
    use leadsync::terminal::is_unsafe;
    let env = Env::small().await;
    env.run_ok(&["sync"]);
    let hostile = "x\u{1b}[2J\u{9b}31m\u{202e}\u{200b}\u{7}y";
    let c = env.sql();
    c.execute(
        "INSERT INTO businesses (business_id, name, configured, enabled, last_sync_outcome, last_error,
                                 needs_reauth, needs_reauth_reason)
         VALUES ('999' || ?1, 'gone' || ?1, 0, 1, 'error', 'err' || ?1, 1, 'why' || ?1)",
        [hostile],
    )
    .unwrap();
    c.execute(
        "INSERT INTO auth_alerts (alert_key, message, since) VALUES ('t', 'alert' || ?1, '2024-06-14T09:30:00Z'),
                ('daemon:t', 'daemon' || ?1, '2024-06-14T09:30:00Z')",
        [hostile],
    )
    .unwrap();
    let id: i64 = c
        .query_row(
            "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
             VALUES ('1', '999', 'pro_cancel', '2024-06-14T09:30:00Z') RETURNING id",
            [],
            |r| r.get(0),
        )
        .unwrap();
    c.execute(
        "UPDATE outbox SET state = 'dead', last_error = 'dead' || ?1 WHERE id = ?2",
        rusqlite::params![hostile, id],
    )
    .unwrap();
    drop(c);

    let o = env.run_ok(&["status"]);
    let out = String::from_utf8(o.stdout).unwrap();
    for what in ["gone", "why", "alert", "daemon", "dead"] {
        assert!(out.contains(&format!("{what}x")), "no {what} in\n{out}");
    }
    let bad: Vec<String> = out
        .chars()
        .filter(|c| *c != '\n' && is_unsafe(*c))
        .map(|c| c.escape_unicode().to_string())
        .collect();
    assert!(bad.is_empty(), "status printed {bad:?}:\n{out:?}");

    let o = env.run_ok(&["status", "--json"]);
    let out = String::from_utf8(o.stdout).unwrap();
    let bad: Vec<String> = out
        .chars()
        .filter(|c| *c != '\n' && is_unsafe(*c))
        .map(|c| c.escape_unicode().to_string())
        .collect();
    assert!(bad.is_empty(), "status --json printed {bad:?}:\n{out:?}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let gone = v["businesses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["configured"] == false)
        .expect("the unconfigured business");
    assert_eq!(gone["name"], format!("gone{hostile}"), "{gone}");
    assert_eq!(gone["business_id"], format!("999{hostile}"), "{gone}");
}

/// `outbox list --json` (both kinds) wrote C1 controls (U+009B is a
/// one-character CSI) and bidirectional overrides raw, as serde_json does;
/// the table already blanked them. Now escaped, and it reads back the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_list_json_escapes_what_a_terminal_would_obey() {
    use leadsync::terminal::is_unsafe;
    let env = Env::small().await;
    env.run_ok(&["sync"]);
    let hostile = "x\u{9b}2J\u{202e}\u{200b}y";
    let c = env.sql();
    let negotiation: String = c
        .query_row("SELECT negotiation_id FROM negotiations LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    let id: i64 = c
        .query_row(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES (?1, 'pro_cancel', '2024-06-14T09:30:00Z') RETURNING id",
            [&negotiation],
            |r| r.get(0),
        )
        .unwrap();
    c.execute(
        "UPDATE outbox SET state = 'dead', last_error = ?1 WHERE id = ?2",
        rusqlite::params![hostile, id],
    )
    .unwrap();
    drop(c);
    env.run_ok(&[
        "reply",
        "--negotiation",
        &negotiation,
        "--text",
        &format!("hi {hostile}"),
    ]);
    for (args, field) in [
        (&["outbox", "list", "--json"][..], "last_error"),
        (&["outbox", "list", "--kind", "message", "--json"], "text"),
    ] {
        let o = env.run_ok(args);
        let out = String::from_utf8(o.stdout).unwrap();
        let bad: Vec<String> = out
            .chars()
            .filter(|c| *c != '\n' && is_unsafe(*c))
            .map(|c| c.escape_unicode().to_string())
            .collect();
        assert!(bad.is_empty(), "{args:?} printed {bad:?}:\n{out:?}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let row = &v.as_array().unwrap()[0];
        assert!(
            row[field].as_str().unwrap().ends_with(hostile),
            "{args:?}: {row}"
        );
    }
}

/// What `drain` logs under journald (stderr is the stream
/// `JOURNAL_STREAM` names, as under systemd) when a partner's own trigger
/// refuses leadsync's change of a row with `why` (plain SQL:
/// `RAISE(ABORT, '...')`), with the command's own output.
async fn drain_log_when_a_trigger_refuses(why: &str) -> (String, String) {
    use std::os::unix::fs::MetadataExt;
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let lead = env.first_leads(1)[0].clone();
    let conn = env.sql();
    conn.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
        [&lead],
    )
    .unwrap();
    conn.execute_batch(&format!(
        "CREATE TRIGGER partner_freeze BEFORE UPDATE ON outbox
         BEGIN SELECT RAISE(ABORT, '{why}'); END;"
    ))
    .unwrap();
    drop(conn);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let journal = std::fs::File::create(&path).unwrap();
    let m = journal.metadata().unwrap();
    let child = common::spawn(
        env.cli()
            .args(["drain"])
            .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(journal),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    (std::fs::read_to_string(&path).unwrap(), text(&out))
}

/// A partner's own trigger refuses leadsync's change of a row with a
/// message holding a line break and escape sequences; `drain` logs it as
/// the reason the row is left as it is. Under journald the line break
/// forged an ERROR line of its own, and the escape sequences reached
/// whoever reads the journal on a terminal. The message is shown escaped,
/// on the one line of the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_trigger_message_forges_no_log_line_under_journald() {
    let why = "frozen\nERROR leadsync: forged\r\u{1b}]0;owned\u{7}\u{9b}2J";
    let (log, out) = drain_log_when_a_trigger_refuses(why).await;
    assert!(
        log.contains("frozen\\nERROR leadsync: forged\\r\\u{1b}]0;owned\\u{7}\\u{9b}2J"),
        "{out}\n{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.trim_start().starts_with("ERROR leadsync: forged")),
        "a forged line: {log}"
    );
    assert!(
        !log.chars()
            .any(|c| c != '\n' && leadsync::terminal::is_unsafe(c)),
        "a control character reached the journal: {log:?}"
    );
}

/// journald makes a line longer than its LineMax (48K by default) several
/// entries: 100 KB of a trigger's message followed by a line of
/// "leadsync's" started an entry of its own. The message is cut, saying
/// how much, and every line stays well under the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partners_long_trigger_message_stays_one_journal_entry() {
    let why = format!("{}\nERROR leadsync: forged", "x".repeat(100_000));
    let (log, out) = drain_log_when_a_trigger_refuses(&why).await;
    assert!(log.contains(&"x".repeat(4000)), "{out}\n{log:.500}");
    assert!(log.contains(" bytes more]"), "{out}\n{log:.500}");
    assert!(!log.contains("forged"), "{log:.500}");
    for line in log.lines() {
        assert!(line.len() <= 32 * 1024, "a line of {} bytes", line.len());
    }
}
