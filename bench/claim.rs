//! Claim latency with and without rows held for a business that needs
//! re-authorization (issue 11, defect 8): `cargo bench --bench claim`.
//!
//! Each measured claim takes up to 16 due rows of a healthy business (16
//! new negotiations inserted just before it, not timed); after it, the rows
//! are marked sent (not timed). Scenarios: no held rows, and 100,000 rows of
//! a needs-reauth business (half naming their business, half only through
//! their lead, 1,000 negotiations). For reference, the claim query of
//! schema 1 (walk every pending row, skip the blocked businesses) runs on
//! the same data. Results are printed and written to bench/out/claim.md.

use leadsync::store::outbox::{self, ClaimFilter};
use rusqlite::{Connection, params};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HEALTHY: &str = "100000000000000001";
const REAUTH: &str = "100000000000000002";
const CLAIMS: usize = 2000;
const BATCH: usize = 16;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn filter() -> ClaimFilter {
    ClaimFilter {
        waiting: HashMap::from([(
            REAUTH.to_string(),
            format!("waiting: business {REAUTH} needs re-authorization"),
        )]),
        configured: Arc::new(HashSet::from([HEALTHY.to_string(), REAUTH.to_string()])),
        default_business: None,
    }
}

/// A fresh mirror with leads for both businesses and `held` rows of the
/// needs-reauth one.
fn setup(dir: &std::path::Path, held: usize) -> Connection {
    let path = dir.join(format!("claim-{held}.db"));
    let conn = leadsync::store::open_connection(&path, true).expect("open");
    conn.execute_batch("BEGIN").unwrap();
    {
        let mut lead = conn
            .prepare(
                "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                     first_seen_at, last_seen_at, changed_at)
                 VALUES (?1, ?2, '{}', 0, 'x', 'x', 'x')",
            )
            .unwrap();
        for i in 0..1000 {
            lead.execute(params![format!("2{i:017}"), REAUTH]).unwrap();
        }
        let mut row = conn
            .prepare(
                "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at,
                     next_attempt_at)
                 VALUES (?1, ?2, 'appt_scheduled', ?3, '2000-01-01T00:00:00.000Z')",
            )
            .unwrap();
        for i in 0..held {
            let business = (i % 2 == 0).then_some(REAUTH);
            let at = format!(
                "2024-06-14T{:02}:{:02}:{:02}Z",
                i / 3600 % 24,
                i / 60 % 60,
                i % 60
            );
            row.execute(params![format!("2{:017}", i % 1000), business, at])
                .unwrap();
        }
    }
    conn.execute_batch("COMMIT").unwrap();
    conn
}

struct Run {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// Claims of schema 1's query (each walks every held row: slow).
const OLD_CLAIMS: usize = 20;

/// Times `claims` claims of `BATCH` fresh rows each.
fn measure(conn: &mut Connection, old_query: bool, claims: usize) -> Run {
    let filter = filter();
    let mut times = Vec::with_capacity(claims);
    let mut n = if old_query { 1_000_000u64 } else { 0 };
    for _ in 0..claims {
        conn.execute_batch("BEGIN").unwrap();
        for _ in 0..BATCH {
            n += 1;
            conn.execute(
                "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at,
                     next_attempt_at)
                 VALUES (?1, ?2, 'appt_scheduled', '2024-06-14T09:30:00Z', '2000-01-01T00:00:00.000Z')",
                params![format!("3{n:017}"), HEALTHY],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        let now = leadsync::time::now();
        let start = Instant::now();
        let got = if old_query {
            schema_1_claim(conn, &now, BATCH)
        } else {
            outbox::claim(conn, outbox::Kind::Transition, &now, BATCH, &filter)
                .unwrap()
                .len()
        };
        times.push(start.elapsed());
        assert_eq!(got, BATCH, "every fresh row is claimed");
        conn.execute(
            "UPDATE outbox SET state = 'sent', sending_since = NULL WHERE state = 'sending'",
            [],
        )
        .unwrap();
        if old_query {
            conn.execute(
                "UPDATE outbox SET state = 'sent' WHERE business_id = ?1 AND state = 'pending'",
                [HEALTHY],
            )
            .unwrap();
        }
    }
    times.sort();
    Run {
        p50: percentile(&times, 0.50),
        p99: percentile(&times, 0.99),
        max: *times.last().unwrap(),
    }
}

/// The claim of schema 1 (before issue 11), reading only: it walked every
/// due pending row and skipped the blocked businesses' rows one by one.
fn schema_1_claim(conn: &mut Connection, due_by: &str, limit: usize) -> usize {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let n = {
        let mut select = tx
            .prepare_cached(
                "SELECT o.id FROM outbox o INDEXED BY schema_1_due
                   LEFT JOIN negotiations n ON n.negotiation_id = o.negotiation_id
                  WHERE o.state = 'pending' AND o.next_attempt_at <= ?1
                    AND NOT EXISTS (
                        SELECT 1 FROM outbox p
                         WHERE p.negotiation_id = o.negotiation_id
                           AND p.state IN ('pending', 'sending') AND p.id <> o.id
                           AND (p.state = 'sending' OR p.changed_at_utc < o.changed_at_utc
                                OR (p.changed_at_utc = o.changed_at_utc AND p.id < o.id)))
                    AND COALESCE(o.business_id, n.business_id, '')
                        NOT IN (SELECT value FROM json_each(?2))
                  ORDER BY o.next_attempt_at, o.id LIMIT ?3",
            )
            .unwrap();
        select
            .query_map(
                params![due_by, format!("[\"{REAUTH}\"]"), limit as i64],
                |r| r.get::<_, i64>(0),
            )
            .unwrap()
            .count()
    };
    tx.commit().unwrap();
    n
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lines = vec![
        format!(
            "Claim latency, {CLAIMS} claims of {BATCH} fresh rows each (`cargo bench --bench claim`):"
        ),
        String::new(),
        "| held rows (needs-reauth business) | p50 | p99 | max |".into(),
        "|---|---|---|---|".into(),
    ];
    let mut p99 = Vec::new();
    for held in [0, 100_000] {
        let mut conn = setup(dir.path(), held);
        // The first claim after the business starts waiting puts its rows
        // aside, once: timed on its own.
        let start = Instant::now();
        outbox::sync_waits(&mut conn, &filter()).unwrap();
        outbox::claim(
            &mut conn,
            outbox::Kind::Transition,
            &leadsync::time::now(),
            BATCH,
            &filter(),
        )
        .unwrap();
        let aside = start.elapsed();
        let r = measure(&mut conn, false, CLAIMS);
        eprintln!("{held} held: p50 {:?} p99 {:?}", r.p50, r.p99);
        p99.push(r.p99);
        lines.push(format!(
            "| {held} | {:.3} ms | {:.3} ms | {:.3} ms |",
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3
        ));
        if held > 0 {
            lines.push(format!(
                "| (once: putting the {held} rows aside when the business started waiting) | {:.0} ms | | |",
                aside.as_secs_f64() * 1e3
            ));
            // Schema 1's claim on the same rows, not put aside.
            conn.execute_batch(
                "UPDATE outbox SET waiting_for = NULL WHERE waiting_for IS NOT NULL;
                 CREATE INDEX schema_1_due ON outbox (next_attempt_at, id) WHERE state = 'pending';",
            )
            .unwrap();
            let old = measure(&mut conn, true, OLD_CLAIMS);
            lines.push(format!(
                "| {held}, schema 1's claim (before; {OLD_CLAIMS} claims) | {:.3} ms | {:.3} ms | {:.3} ms |",
                old.p50.as_secs_f64() * 1e3,
                old.p99.as_secs_f64() * 1e3,
                old.max.as_secs_f64() * 1e3
            ));
        }
    }
    let ratio = p99[1].as_secs_f64() / p99[0].as_secs_f64();
    lines.push(String::new());
    lines.push(format!(
        "p99 with 100,000 held / p99 with none: {ratio:.2} (target ≤ 2) — {}",
        if ratio <= 2.0 { "met" } else { "NOT met" }
    ));
    let text = lines.join("\n");
    println!("{text}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/out");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("claim.md"), text + "\n");
}
