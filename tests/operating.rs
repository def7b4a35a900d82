//! Operating (SPEC §10) against what the partner's programs may write: the
//! outbox tables are theirs, and a row their triggers let through with odd
//! values must not take `status`, the metrics or `/readyz` down with it.

mod common;

use common::{Env, text};

/// Writes, as a partner's program may: one pending row whose `created_at` is
/// a BLOB, one whose `created_at` is text that is no time and sorts before
/// every time, one pending since 2020, and a row the program itself marked
/// dead with a text HTTP status, a BLOB error and a negative attempt count.
fn odd_rows(env: &Env) -> String {
    let lead = env.first_leads(1)[0].clone();
    let sql = env.sql();
    let insert = |created_at: &str| {
        sql.execute(
            &format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, created_at)
                 VALUES (?1, 'job_complete', '2024-06-14T09:30:00Z', {created_at})"
            ),
            [&lead],
        )
        .unwrap();
        sql.last_insert_rowid()
    };
    insert("x'0102'");
    insert("'1 hour ago'");
    insert("'2020-01-01T00:00:00.000Z'");
    let dead = insert("'2024-06-14T09:30:00.000Z'");
    sql.execute(
        "UPDATE outbox SET state = 'dead', last_http_status = 'abc', last_error = x'ff00',
                attempts = -5, last_trace_id = x'00'
          WHERE id = ?1",
        [dead],
    )
    .unwrap();
    lead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_outbox_rows_never_fail_status_nor_the_table_gauges() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    odd_rows(&env);

    let o = env.run(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("outbox: 3 pending"), "{t}");
    assert!(t.contains("1 dead"), "{t}");

    let o = env.run(&["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The oldest pending row whose age can be told is the one of 2020:
    // neither a BLOB nor text that sorts first hides it.
    let age = report["outbox"]["oldest_pending_age_secs"]
        .as_i64()
        .unwrap_or_else(|| panic!("no oldest pending age: {report}"));
    assert!(age > 5 * 365 * 86_400, "{age}");
    let dead = &report["outbox"]["recent_dead"][0];
    // What the partner wrote is shown, not turned into "none".
    assert_eq!(dead["last_http_status"], "abc", "{dead}");

    // What the admin listener's refresher reads: one bad row failed the
    // whole reading, kept the metrics stale and turned /readyz 503.
    let gauges = leadsync::store::gauges::read(&mut env.sql()).expect("the table gauges");
    let pending = gauges
        .outbox_rows
        .iter()
        .find(|r| r.table == "outbox" && r.state == "pending")
        .unwrap();
    assert_eq!(pending.rows, 3);
    let (_, oldest) = gauges
        .oldest_pending
        .iter()
        .find(|(t, _)| t == "outbox")
        .unwrap();
    assert!(*oldest > 5.0 * 365.0 * 86_400.0, "{oldest}");
}
