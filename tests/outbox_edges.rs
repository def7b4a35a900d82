//! The outbox at its edges (issue 11): rows edited, canceled or deleted in
//! flight, rows that cannot be read, `Retry-After` against the backoff, a
//! failing claim, late rows, rows waiting for their business, a hanging
//! token endpoint, and a second writer racing the drainer under faults; and
//! the same edges for replies (message_outbox).

mod common;

use common::{Env, FAST, count};
use leadsync::app::Session;
use leadsync::drain::{DrainSettings, Drainer};
use leadsync::sandbox::{Faults, SandboxOptions};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Rig {
    env: Env,
    session: Session,
    drainer: Arc<Drainer>,
}

impl Rig {
    async fn new(overrides: &str) -> Rig {
        Rig::open(overrides, false, None).await
    }

    /// With OAuth grants or static tokens; `needs_reauth`: a business the
    /// mirror flags as waiting for re-authorization when the session opens.
    async fn open(overrides: &str, oauth: bool, needs_reauth: Option<usize>) -> Rig {
        let env = Env::new(SandboxOptions::default(), oauth, overrides).await;
        assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
        if let Some(i) = needs_reauth {
            env.sql()
                .execute(
                    "UPDATE businesses SET needs_reauth = 1, needs_reauth_reason = 'refused in a test'
                      WHERE business_id = ?1",
                    [&env.business_ids()[i]],
                )
                .unwrap();
            // The access tokens that sync stored are gone too: a recheck
            // must ask the token endpoint, not adopt a stored token.
            let tokens = env.dir.path().join("fixture/tokens.db");
            if oauth && tokens.exists() {
                rusqlite::Connection::open(&tokens)
                    .unwrap()
                    .execute(
                        "UPDATE grants SET access_token = NULL, access_expires_at = NULL",
                        [],
                    )
                    .unwrap();
            }
        }
        let session = common::open_session(env.config()).await;
        let drainer = Arc::new(Drainer::new(
            session.store.clone(),
            session.client.clone(),
            DrainSettings::from_config(&session.config),
        ));
        Rig {
            env,
            session,
            drainer,
        }
    }

    fn lead(&self, business: usize, n: usize) -> String {
        self.env
            .sandbox
            .lead_ids(&self.env.business_ids()[business])[n]
            .clone()
    }

    fn insert(&self, negotiation: &str, status: &str, at: &str) -> i64 {
        let db = self.env.sql();
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![negotiation, status, at],
        )
        .unwrap();
        db.last_insert_rowid()
    }

    fn sql(&self, sql: &str) {
        self.env.sql().execute_batch(sql).unwrap();
    }

    fn state(&self, id: i64) -> (String, i64, Option<String>) {
        self.env
            .sql()
            .query_row(
                "SELECT state, attempts, last_error FROM outbox WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        count(&self.env.sql(), sql)
    }

    async fn drain(&self) -> leadsync::drain::DrainSummary {
        self.drainer
            .drain_once(&CancellationToken::new())
            .await
            .unwrap()
    }

    /// `drain` in the background, to act on rows while they are in flight.
    fn drain_in_background(
        &self,
    ) -> tokio::task::JoinHandle<anyhow::Result<leadsync::drain::DrainSummary>> {
        let d = self.drainer.clone();
        tokio::spawn(async move { d.drain_once(&CancellationToken::new()).await })
    }

    async fn wait_sending(&self, n: i64) {
        common::wait_until(
            &format!("{n} rows in flight"),
            Duration::from_secs(20),
            || self.count("SELECT count(*) FROM outbox WHERE state = 'sending'") >= n,
        )
        .await;
    }

    /// (negotiation, status, instant in UTC) of every delivery.
    fn delivered(&self) -> HashSet<(String, String, String)> {
        self.env
            .sandbox
            .deliveries()
            .into_iter()
            .map(|d| {
                (
                    d.negotiation_id,
                    d.status,
                    leadsync::time::to_utc_z(&d.partner_status_changed_at).unwrap(),
                )
            })
            .collect()
    }
}

fn with_latency(ms: u64) -> Faults {
    Faults {
        latency_ms: ms,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_lands_only_on_the_row_that_was_sent() {
    // Defect 1: `finish` wrote `sent` on whatever the row had become.
    let rig = Rig::new(FAST).await;
    let canceled = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let edited = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let untouched = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.env.sandbox.set_faults(with_latency(1500));
    let drain = rig.drain_in_background();
    rig.wait_sending(3).await;
    // The partner's program, with plain SQL, while the three are in flight.
    rig.sql(&format!(
        "UPDATE outbox SET state = 'canceled' WHERE id = {canceled};
         UPDATE outbox SET state = 'pending' WHERE id = {edited};
         UPDATE outbox SET status = 'pro_cancel' WHERE id = {edited};"
    ));
    drain.await.unwrap().unwrap();
    rig.env.sandbox.set_faults(Faults::default());
    rig.drain().await;

    assert_eq!(
        rig.state(canceled).0,
        "canceled",
        "the user's cancel stands"
    );
    assert_eq!(rig.state(untouched).0, "sent");
    // Every `sent` row's content is what Thumbtack got.
    let delivered = rig.delivered();
    let db = rig.env.sql();
    let mut stmt = db
        .prepare(
            "SELECT id, negotiation_id, status, changed_at_utc FROM outbox WHERE state = 'sent'",
        )
        .unwrap();
    let sent: Vec<(i64, String, String, String)> = stmt
        .query_map([], |r| {
            let at: String = r.get(3)?;
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, at.replace(".000Z", "Z")))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for (id, n, status, at) in sent {
        assert!(
            delivered.contains(&(n.clone(), status.clone(), at.clone())),
            "row {id} says sent {status} {at}, Thumbtack got {delivered:?}"
        );
    }
    assert_eq!(
        rig.state(edited).0,
        "sent",
        "the edited row goes out with its new content"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_be_read_fails_alone() {
    // Defect 2: a BLOB negotiation_id failed every claim, stopping the drainer.
    let rig = Rig::new(FAST).await;
    // Rows written before schema 3, or past a dropped trigger.
    rig.sql(
        "DROP TRIGGER outbox_validate_insert;
         INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES (X'3531393135', 'appt_scheduled', '2024-06-14T09:30:00Z');
         INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES (CAST(X'FF3531' AS TEXT), 'appt_scheduled', '2024-06-14T09:30:00Z');
         INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('51915x', 'appt_scheduled', '2024-06-14T09:30:00Z');",
    );
    let good = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let s = rig.drain().await;
    assert_eq!(s.sent, 1, "{s:?}");
    assert_eq!(rig.state(good).0, "sent");
    for id in 1..=3 {
        let (state, _, error) = rig.state(id);
        assert_eq!(state, "dead", "row {id}");
        let error = error.unwrap_or_default();
        assert!(error.contains("cannot be sent"), "row {id}: {error}");
    }
    assert!(rig.state(1).2.unwrap().contains("BLOB"));
    assert!(rig.state(2).2.unwrap().contains("UTF-8"));
    // `outbox list` still shows them.
    let out = rig.env.run(&["outbox", "list", "--json"]);
    assert!(out.status.success(), "{}", common::text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_keeps_the_backoff() {
    // Defect 3: `Retry-After: 0` replaced the backoff, spinning a row through its attempts.
    let rig = Rig::new(
        &FAST
            .replace("backoff_initial_secs = 0.2", "backoff_initial_secs = 30")
            .replace("backoff_max_secs = 2", "backoff_max_secs = 120"),
    )
    .await;
    rig.env.sandbox.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 0,
        ..Default::default()
    });
    let ids: Vec<i64> = (0..2)
        .map(|i| rig.insert(&rig.lead(0, i), "appt_scheduled", "2024-06-14T09:30:00Z"))
        .collect();
    rig.drain().await;
    for id in ids {
        let at: String = rig
            .env
            .sql()
            .query_row(
                "SELECT next_attempt_at FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        let due = (leadsync::time::parse(&at).unwrap() - chrono::Utc::now()).num_seconds();
        assert!(
            due >= 25,
            "row {id}: due in {due} s, not after its 30 s backoff"
        );
        assert_eq!(rig.state(id).1, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_while_sending_frees_its_slot() {
    // Defect 4: recording the attempt of a deleted row failed on the foreign
    // key and was retried forever, holding a concurrency slot.
    let rig = Rig::new(&FAST.replace("concurrency = 4", "concurrency = 1")).await;
    let deleted = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let next = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.env.sandbox.set_faults(with_latency(1000));
    let drain = rig.drain_in_background();
    rig.wait_sending(1).await;
    rig.sql(&format!(
        "PRAGMA foreign_keys = ON; DELETE FROM outbox WHERE id = {deleted};"
    ));
    let s = tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("the drain ends: the deleted row's task gave its slot back")
        .unwrap()
        .unwrap();
    assert_eq!(s.sent, 2, "{s:?}");
    assert_eq!(rig.state(next).0, "sent");
    assert_eq!(rig.count("SELECT count(*) FROM outbox"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_claim_lets_in_flight_sends_finish() {
    // Defect 5: `claim(...).await?` dropped the JoinSet, aborting sends in flight.
    let rig = Rig::new(&FAST.replace("concurrency = 4", "concurrency = 2")).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    for k in 0..3 {
        rig.insert(&b, "appt_scheduled", &format!("2024-06-14T1{k}:30:00Z"));
    }
    rig.env.sandbox.set_faults(with_latency(700));
    let drain = rig.drain_in_background();
    rig.wait_sending(2).await;
    // The next claim fails (a row of another negotiation, due, whose claim
    // a partner's trigger breaks: not a constraint, so not that row's
    // failure alone); the sends in flight, and their chains, must not.
    let other = rig.lead(0, 1);
    rig.sql(&format!(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at)
             VALUES ('{other}', 'appt_scheduled', '2024-06-14T09:30:00Z', '2000-01-01T00:00:00Z');
         CREATE TRIGGER breaks_the_claim BEFORE UPDATE OF late ON outbox
           WHEN NEW.negotiation_id = '{other}'
         BEGIN SELECT abs(NEW.attempts * 0 - 9223372036854775807 - 1); END;"
    ));
    let r = tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .expect("the drain ends")
        .unwrap();
    assert!(r.is_err(), "claims kept failing: {r:?}");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state = 'sending'"),
        0,
        "no row left `sending` without a crash"
    );
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state = 'sent'"),
        4
    );
    assert_eq!(rig.env.sandbox.deliveries().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_go_out_when_the_indexes_leadsync_made_were_dropped_and_it_says_how_to_restore_them() {
    // The schema is the user's too (SPEC §3): a dropped or renamed index
    // used to fail every claim for good ("no such index").
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let n = env.sandbox.lead_ids(&env.business_ids()[0])[0].clone();
    let db = env.sql();
    db.execute_batch(&format!(
        "DROP INDEX outbox_due; DROP INDEX outbox_waiting_by_negotiation;
         DROP INDEX outbox_sent_by_negotiation; DROP INDEX outbox_open_by_negotiation;
         DROP INDEX outbox_ready_by_business;
         INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES
             ('{n}', 'appt_scheduled', '2024-06-14T09:30:00Z'),
             ('{n}', 'job_complete', '2024-06-14T10:30:00Z');"
    ))
    .unwrap();
    let out = env.run(&["drain"]);
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox WHERE state = 'sent'"),
        2,
        "{text}"
    );
    let statuses: Vec<String> = env
        .sandbox
        .deliveries()
        .into_iter()
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, ["appt_scheduled", "job_complete"]);
    assert!(text.contains("outbox_due"), "{text}");
    assert!(
        text.contains(
            "CREATE INDEX outbox_due ON outbox (next_attempt_at, id) WHERE state = 'pending' AND waiting_for IS NULL"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_without_an_instant_is_never_first_in_line() {
    // Defect 6: +15:00 made the instant NULL; NULL comparisons let two rows
    // of one negotiation go out together.
    let rig = Rig::new(FAST).await;
    let n = rig.lead(0, 0);
    rig.sql(&format!(
        "DROP TRIGGER outbox_validate_insert;
         INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('{n}', 'appt_scheduled', '2024-06-14T09:30:00+15:00');"
    ));
    let later = rig.insert(&n, "job_complete", "2024-06-15T09:30:00Z");
    let s = rig.drain().await;
    let (state, _, error) = rig.state(1);
    assert_eq!(state, "dead", "{s:?}");
    assert!(error.unwrap().contains("cannot be read as an instant"));
    assert_eq!(rig.state(later).0, "sent");
    let statuses: Vec<String> = rig
        .env
        .sandbox
        .deliveries()
        .into_iter()
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, ["job_complete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_are_sent_and_marked_late() {
    // Defect 7: a row earlier than an already-sent one went out unremarked.
    let rig = Rig::new(FAST).await;
    let n = rig.lead(0, 0);
    let first = rig.insert(&n, "job_complete", "2024-06-14T12:00:00Z");
    rig.drain().await;
    let inserted_late = rig.insert(&n, "appt_scheduled", "2024-06-14T10:00:00Z");
    let retried = rig.insert(&n, "not_scheduled", "2024-06-14T09:00:00Z");
    rig.sql(&format!(
        "UPDATE outbox SET state = 'dead' WHERE id = {retried}"
    ));
    rig.drain().await;
    assert_eq!(rig.state(inserted_late).0, "sent");
    let out = rig.env.run(&["outbox", "retry", &retried.to_string()]);
    assert!(out.status.success(), "{}", common::text(&out));
    rig.drain().await;
    let after = rig.insert(&n, "invoice_paid", "2024-06-14T13:00:00Z");
    rig.drain().await;
    let late = |id: i64| {
        rig.count(&format!(
            "SELECT late FROM outbox WHERE id = {id} AND state = 'sent'"
        ))
    };
    assert_eq!(
        (late(first), late(inserted_late), late(retried), late(after)),
        (0, 1, 1, 0)
    );
    assert_eq!(rig.env.sandbox.deliveries().len(), 4, "late rows are sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_waiting_for_their_business_are_outside_what_a_claim_walks() {
    // Defect 8: every claim rescanned the held rows inside BEGIN IMMEDIATE.
    let rig = Rig::new(FAST).await;
    let b = rig.env.business_ids()[0].clone();
    let token_file = rig.env.dir.path().join("fixture/tokens").join(&b);
    let token = std::fs::read_to_string(&token_file).unwrap();
    std::fs::write(&token_file, "revoked\n").unwrap();
    let db = rig.env.sql();
    db.execute_batch("BEGIN").unwrap();
    for i in 0..3000 {
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', ?2)",
            rusqlite::params![rig.lead(0, i % 60), format!("2024-06-14T09:{:02}:{:02}Z", i / 60, i % 60)],
        )
        .unwrap();
    }
    db.execute_batch("COMMIT").unwrap();
    let other = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let s = rig.drain().await;
    assert!(s.sent == 1 && s.held >= 1, "{s:?}");
    assert_eq!(rig.state(other).0, "sent");
    rig.drain().await;
    // A claim walks the due index: none of the 3,000 held rows is in it.
    assert_eq!(
        rig.count(
            "SELECT count(*) FROM outbox INDEXED BY outbox_due
              WHERE state = 'pending' AND waiting_for IS NULL AND next_attempt_at <= '9999'"
        ),
        0
    );
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM outbox WHERE waiting_for = '{b}' AND attempts = 0
                AND last_error LIKE 'waiting: %re-authoriz%'"
        )),
        3000
    );
    // Re-authorized: they come back and go out.
    std::fs::write(&token_file, token).unwrap();
    assert!(rig.session.auth.token(&b).await.is_ok());
    rig.env.sandbox.set_faults(Faults::default());
    let s = rig.drain().await;
    assert_eq!(s.sent, 3000, "{s:?}");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE waiting_for IS NOT NULL"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_removed_business_wait_without_counting_attempts() {
    // Defect 9: the waiting path counted attempts, so rows of a business
    // removed from the configuration died without one HTTP attempt.
    let rig = Rig::new(&FAST.replace("max_attempts = 5", "max_attempts = 2")).await;
    let (full, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    let id = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let named = {
        let db = rig.env.sql();
        db.execute(
            "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
             VALUES (?1, '123456789', 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [rig.lead(0, 1)],
        )
        .unwrap();
        db.last_insert_rowid()
    };
    for _ in 0..4 {
        rig.sql(
            "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00Z' WHERE state = 'pending'",
        );
        rig.drain().await;
    }
    for row in [id, named] {
        let (state, attempts, error) = rig.state(row);
        assert_eq!((state.as_str(), attempts), ("pending", 0), "row {row}");
        assert!(
            error
                .unwrap_or_default()
                .contains("not in the configuration"),
            "row {row}"
        );
    }
    assert_eq!(rig.env.sandbox.deliveries().len(), 0);
    // Configured again: its row goes out.
    rig.drainer.update(full, rig.session.client.clone());
    let s = rig.drain().await;
    assert_eq!(s.sent, 1, "{s:?}");
    assert_eq!(rig.state(id).0, "sent");
    assert_eq!(rig.state(named).1, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_token_endpoint_stalls_neither_claims_nor_the_heartbeat() {
    // Defect 12: the re-auth recheck awaited each blocked business's refresh
    // inside the drain loop.
    let overrides = FAST
        .replace("timeout_secs = 5", "timeout_secs = 15")
        .replace("shutdown_timeout_secs = 8", "shutdown_timeout_secs = 18");
    // Business 1 waits for re-authorization (a flag left by a previous run).
    let rig = Rig::open(&overrides, true, Some(1)).await;
    let (a, b) = (
        rig.env.business_ids()[0].clone(),
        rig.env.business_ids()[1].clone(),
    );
    assert_eq!(rig.session.auth.blocked(), std::slice::from_ref(&b));
    // Business 0 has a fresh access token; then the token endpoint stops answering.
    rig.session.auth.token(&a).await.unwrap();
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let accepted = Arc::new(AtomicI64::new(0));
    {
        let (hole, accepted) = (hole.try_clone().unwrap(), accepted.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in hole.incoming().flatten() {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(conn); // never answered
            }
        });
    }
    rig.env.set_overrides(&format!(
        "{overrides}\n[oauth]\ntoken_url = \"http://{}/oauth2/token\"\n",
        hole.local_addr().unwrap()
    ));
    rig.session.auth.reconfigure(&rig.env.config());

    let mut settings = DrainSettings::from_config(&rig.session.config);
    settings.reauth_recheck = Duration::from_millis(50);
    let drainer = Arc::new(Drainer::new(
        rig.session.store.clone(),
        rig.session.client.clone(),
        settings,
    ));
    let stop = CancellationToken::new();
    let heartbeat = Arc::new(leadsync::time::Heartbeat::new());
    let run = tokio::spawn(drainer.run(stop.clone(), heartbeat.clone()));
    common::wait_until(
        "the recheck reaches the token endpoint",
        Duration::from_secs(10),
        || accepted.load(Ordering::SeqCst) > 0,
    )
    .await;
    let beat = heartbeat.count();
    let id = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    common::wait_until(
        "a row of another business is sent while the refresh hangs",
        Duration::from_secs(5),
        || rig.state(id).0 == "sent",
    )
    .await;
    common::wait_until("the heartbeat goes on", Duration::from_secs(3), || {
        heartbeat.count() > beat
    })
    .await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one recheck round at a time"
    );
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the drainer stops within the refresh's bound")
        .unwrap();
}

/// What the second writer last did to a row, as the table confirmed it.
#[derive(Debug, Clone)]
enum Intent {
    /// Send this content (status, instant).
    Send(String, String),
    Cancel,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_racing_the_drainer_under_faults() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST
            .replace("max_attempts = 5", "max_attempts = 1000")
            .replace("backoff_initial_secs = 0.2", "backoff_initial_secs = 0.05")
            .replace("backoff_max_secs = 2", "backoff_max_secs = 0.3")
            .replace("poll_interval_ms = 100", "poll_interval_ms = 20"),
    )
    .await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        latency_ms: 15,
        error_5xx: 0.2,
        reset: 0.05,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    let leads = env.first_leads(3);
    let path = env.database();
    // Another process's connection, in a thread: inserts, edits pending rows,
    // cancels rows, and remembers what each row should end as.
    let writer = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut rng = fastrand::Rng::with_seed(11);
        let mut intents: HashMap<i64, Intent> = HashMap::new();
        let mut instant = 0u32;
        let mut next_instant = || {
            instant += 1;
            // Shuffled: some rows come earlier than rows already sent (late).
            let s = (instant * 7919) % 86_000 + instant % 7;
            format!(
                "2024-06-14T{:02}:{:02}:{:02}Z",
                s / 3600 % 24,
                s / 60 % 60,
                s % 60
            )
        };
        let statuses = [
            "appt_scheduled",
            "not_scheduled",
            "customer_cancel",
            "pro_cancel",
        ];
        for step in 0..400 {
            let ids: Vec<i64> = intents.keys().copied().collect();
            let op = if ids.is_empty() { 0 } else { rng.u8(0..10) };
            match op {
                0..=4 => {
                    let (status, at) = (statuses[rng.usize(0..4)], next_instant());
                    c.execute(
                        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, ?2, ?3)",
                        rusqlite::params![leads[rng.usize(0..leads.len())], status, at],
                    )
                    .unwrap();
                    intents.insert(c.last_insert_rowid(), Intent::Send(status.into(), at));
                }
                5..=7 => {
                    let id = ids[rng.usize(0..ids.len())];
                    let (status, at) = (statuses[rng.usize(0..4)], next_instant());
                    let changed = c
                        .execute(
                            "UPDATE outbox SET status = ?2, partner_status_changed_at = ?3 WHERE id = ?1 AND state = 'pending'",
                            rusqlite::params![id, status, at],
                        )
                        .unwrap();
                    if changed == 1 {
                        intents.insert(id, Intent::Send(status.into(), at));
                    }
                }
                _ => {
                    let id = ids[rng.usize(0..ids.len())];
                    let changed = c
                        .execute(
                            "UPDATE outbox SET state = 'canceled' WHERE id = ?1 AND state = 'pending'",
                            [id],
                        )
                        .unwrap();
                    if changed == 1 {
                        intents.insert(id, Intent::Cancel);
                    }
                }
            }
            // Sent rows are frozen: an edit is refused with the table's message.
            if step % 50 == 49
                && let Some(id) = c
                    .query_row(
                        "SELECT id FROM outbox WHERE state = 'sent' LIMIT 1",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .ok()
            {
                let e = c
                    .execute(
                        "UPDATE outbox SET status = CASE status WHEN 'pro_cancel' THEN 'not_scheduled'
                             ELSE 'pro_cancel' END WHERE id = ?1",
                        [id],
                    )
                    .unwrap_err();
                assert!(
                    e.to_string().contains("only change while it is pending"),
                    "{e}"
                );
            }
            std::thread::sleep(Duration::from_millis(rng.u64(0..8)));
        }
        intents
    });
    let intents = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    common::wait_until(
        "every row sent or canceled",
        Duration::from_secs(120),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM outbox WHERE state NOT IN ('sent', 'canceled')",
            ) == 0
        },
    )
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();

    // Every row ends as the user's last action implies, its recorded outcome
    // matching its content.
    let db = env.sql();
    let rows: HashMap<i64, (String, String, String, String, i64)> = db
        .prepare(
            "SELECT id, state, status, partner_status_changed_at, changed_at_utc, late FROM outbox",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), intents.len());
    let deliveries = env.sandbox.deliveries();
    let mut by_content: HashMap<(String, String, String), usize> = HashMap::new();
    for d in &deliveries {
        *by_content
            .entry((
                d.negotiation_id.clone(),
                d.status.clone(),
                d.partner_status_changed_at.clone(),
            ))
            .or_default() += 1;
    }
    let negotiation_of: HashMap<i64, String> = db
        .prepare("SELECT id, negotiation_id FROM outbox")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (id, intent) in &intents {
        let (state, status, at, _, _) = &rows[id];
        let key = (negotiation_of[id].clone(), status.clone(), at.clone());
        match intent {
            Intent::Cancel => {
                assert_eq!(state, "canceled", "row {id}");
                assert_eq!(
                    by_content.get(&key),
                    None,
                    "canceled row {id} was delivered"
                );
            }
            Intent::Send(s, t) => {
                assert_eq!((state.as_str(), status, at), ("sent", s, t), "row {id}");
                assert_eq!(
                    by_content.get(&key),
                    Some(&1),
                    "row {id} delivered exactly once"
                );
            }
        }
    }
    assert_eq!(
        deliveries.len(),
        rows.values().filter(|r| r.0 == "sent").count(),
        "no delivery that no row accounts for"
    );
    // Per negotiation, non-late rows went out in order of their instants.
    let instant: HashMap<(String, String, String), (String, i64)> = intents
        .keys()
        .map(|id| {
            let (_, status, at, utc, late) = &rows[id];
            (
                (negotiation_of[id].clone(), status.clone(), at.clone()),
                (utc.clone(), *late),
            )
        })
        .collect();
    let mut last: HashMap<String, String> = HashMap::new();
    let mut late_rows = 0;
    for d in &deliveries {
        let (utc, late) = &instant[&(
            d.negotiation_id.clone(),
            d.status.clone(),
            d.partner_status_changed_at.clone(),
        )];
        if *late == 1 {
            late_rows += 1;
            continue;
        }
        if let Some(before) = last.get(&d.negotiation_id) {
            assert!(
                before < utc,
                "negotiation {}: {utc} after {before}",
                d.negotiation_id
            );
        }
        last.insert(d.negotiation_id.clone(), utc.clone());
    }
    assert!(late_rows > 0, "the shuffled instants made some rows late");
}

// The same edges for replies (`message_outbox`): one drainer, one claim,
// one finish — these hold them to it.

impl Rig {
    /// The drainer's settings from the configuration, and the same without
    /// the business at `index` (as a reload removing it would give).
    fn settings_without(&self, index: usize) -> (DrainSettings, DrainSettings) {
        let removed = self.env.business_ids()[index].clone();
        let full = DrainSettings::from_config(&self.session.config);
        let mut without = full.clone();
        without.configured = Arc::new(
            full.configured
                .iter()
                .filter(|b| **b != removed)
                .cloned()
                .collect(),
        );
        (full, without)
    }

    fn reply(&self, negotiation: &str, text: &str) -> i64 {
        let db = self.env.sql();
        db.execute(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, ?2)",
            [negotiation, text],
        )
        .unwrap();
        db.last_insert_rowid()
    }

    fn reply_state(&self, id: i64) -> (String, i64, Option<String>) {
        self.env
            .sql()
            .query_row(
                "SELECT state, attempts, last_error FROM message_outbox WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    }

    async fn wait_replies_sending(&self, n: i64) {
        common::wait_until(
            &format!("{n} replies in flight"),
            Duration::from_secs(20),
            || self.count("SELECT count(*) FROM message_outbox WHERE state = 'sending'") >= n,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_outcome_lands_only_on_the_row_that_was_sent_and_its_text_is_frozen_in_flight() {
    let rig = Rig::new(FAST).await;
    let canceled = rig.reply(&rig.lead(0, 0), "first");
    let edited = rig.reply(&rig.lead(1, 0), "second");
    let untouched = rig.reply(&rig.lead(2, 0), "third");
    rig.env.sandbox.set_faults(with_latency(1500));
    let drain = rig.drain_in_background();
    rig.wait_replies_sending(3).await;
    // In flight: the business was filled in as the row left pending, and
    // the text cannot change any more.
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM message_outbox WHERE id = {untouched} AND business_id = '{}'",
            rig.env.business_ids()[2]
        )),
        1
    );
    let refused = rig
        .env
        .sql()
        .execute(
            "UPDATE message_outbox SET text = 'changed in flight' WHERE id = ?1",
            [untouched],
        )
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("can change only while it is pending"),
        "{refused}"
    );
    rig.sql(&format!(
        "UPDATE message_outbox SET state = 'canceled' WHERE id = {canceled};
         UPDATE message_outbox SET state = 'pending' WHERE id = {edited};
         UPDATE message_outbox SET text = 'second, corrected' WHERE id = {edited};"
    ));
    drain.await.unwrap().unwrap();
    rig.env.sandbox.set_faults(Faults::default());
    rig.drain().await;

    assert_eq!(rig.reply_state(canceled).0, "canceled");
    assert_eq!(rig.reply_state(untouched).0, "sent");
    assert_eq!(rig.reply_state(edited).0, "sent");
    let received: HashSet<(String, String)> = rig
        .env
        .sandbox
        .replies()
        .into_iter()
        .map(|r| (r.negotiation_id, r.text))
        .collect();
    let db = rig.env.sql();
    let mut stmt = db
        .prepare("SELECT negotiation_id, text FROM message_outbox WHERE state = 'sent'")
        .unwrap();
    let sent: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for row in sent {
        assert!(
            received.contains(&row),
            "{row:?} is sent, Thumbtack got {received:?}"
        );
    }
    // The attempts of the row changed in flight are recorded all the same.
    assert!(
        rig.count(&format!(
            "SELECT count(*) FROM message_outbox_attempts WHERE outbox_id = {canceled}"
        )) >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replies_are_sent_and_marked_late_and_ids_are_never_reused() {
    let rig = Rig::new(FAST).await;
    let n = rig.lead(0, 0);
    let first = rig.reply(&n, "one");
    rig.drain().await;
    let retried = rig.reply(&n, "two");
    let after_it = rig.reply(&n, "three");
    rig.sql(&format!(
        "UPDATE message_outbox SET state = 'dead' WHERE id = {retried}"
    ));
    rig.drain().await;
    assert_eq!(rig.reply_state(after_it).0, "sent");
    let out = rig
        .env
        .run(&["outbox", "retry", "--kind", "message", &retried.to_string()]);
    assert!(out.status.success(), "{}", common::text(&out));
    rig.drain().await;
    let late = |id: i64| {
        rig.count(&format!(
            "SELECT late FROM message_outbox WHERE id = {id} AND state = 'sent'"
        ))
    };
    assert_eq!((late(first), late(retried), late(after_it)), (0, 1, 0));
    let texts: Vec<String> = rig
        .env
        .sandbox
        .replies()
        .into_iter()
        .map(|r| r.text)
        .collect();
    assert_eq!(texts, ["one", "three", "two"], "the late reply is sent");
    // AUTOINCREMENT: a deleted last row's id is not given again, so id
    // order stays insertion order.
    rig.sql(&format!("DELETE FROM message_outbox WHERE id = {after_it}"));
    assert!(rig.reply(&n, "four") > after_it);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_of_a_removed_or_refused_business_wait_without_counting_attempts() {
    let rig = Rig::new(&FAST.replace("max_attempts = 5", "max_attempts = 2")).await;
    let (full, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    // Business 0 loses its grant: its replies wait for re-authorization.
    let b0 = rig.env.business_ids()[0].clone();
    let token_file = rig.env.dir.path().join("fixture/tokens").join(&b0);
    let token = std::fs::read_to_string(&token_file).unwrap();
    std::fs::write(&token_file, "revoked\n").unwrap();
    let of_removed = rig.reply(&rig.lead(2, 0), "to the removed business");
    for i in 0..20 {
        rig.reply(&rig.lead(0, i % 5), &format!("reply {i}"));
    }
    let other = rig.reply(&rig.lead(1, 0), "to the business that works");
    for _ in 0..4 {
        rig.sql(
            "UPDATE message_outbox SET next_attempt_at = '2000-01-01T00:00:00Z' WHERE state = 'pending'",
        );
        rig.drain().await;
    }
    assert_eq!(rig.reply_state(other).0, "sent");
    let (state, attempts, error) = rig.reply_state(of_removed);
    assert_eq!((state.as_str(), attempts), ("pending", 0));
    assert!(
        error
            .unwrap_or_default()
            .contains("not in the configuration"),
        "the removed business's reply says why it waits"
    );
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM message_outbox WHERE waiting_for = '{b0}' AND attempts = 0
                AND state = 'pending' AND last_error LIKE 'waiting: %'"
        )),
        20
    );
    assert_eq!(rig.env.sandbox.replies().len(), 1);
    // Configured again and re-authorized: they go out, in id order per lead.
    std::fs::write(&token_file, token).unwrap();
    assert!(rig.session.auth.token(&b0).await.is_ok());
    rig.drainer.update(full, rig.session.client.clone());
    let s = rig.drain().await;
    assert_eq!(s.sent, 21, "{s:?}");
    assert_eq!(
        rig.count(
            "SELECT count(*) FROM message_outbox WHERE waiting_for IS NOT NULL OR state <> 'sent'"
        ),
        0
    );
    let mut by_lead: HashMap<String, Vec<String>> = HashMap::new();
    for r in rig.env.sandbox.replies() {
        by_lead.entry(r.negotiation_id).or_default().push(r.text);
    }
    for i in 0..5 {
        let want: Vec<String> = (0..20)
            .filter(|j| j % 5 == i)
            .map(|j| format!("reply {j}"))
            .collect();
        assert_eq!(by_lead[&rig.lead(0, i)], want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_id_or_attempts_are_changed_in_flight_is_neither_stuck_nor_blocking() {
    // Review r11: `finish` finds the sent row by id and attempt number. A
    // partner renumbering a `sending` row, or resetting its attempts, made
    // the outcome land nowhere: the row stayed `sending` until a restart and
    // held back every later row of its negotiation meanwhile.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let renumbered = rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    let after_renumbered = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let reset = rig.reply(&b, "first");
    let after_reset = rig.reply(&b, "second");
    rig.env.sandbox.set_faults(with_latency(1500));
    let drain = rig.drain_in_background();
    rig.wait_sending(1).await;
    rig.wait_replies_sending(1).await;
    // The partner's program; the table may refuse these (then nothing changed).
    let db = rig.env.sql();
    let _ = db.execute(
        "UPDATE outbox SET id = id + 1000 WHERE id = ?1",
        [renumbered],
    );
    let _ = db.execute(
        "UPDATE message_outbox SET attempts = 0 WHERE id = ?1",
        [reset],
    );
    drain.await.unwrap().unwrap();
    rig.env.sandbox.set_faults(Faults::default());
    rig.drain().await;
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state = 'sending'")
            + rig.count("SELECT count(*) FROM message_outbox WHERE state = 'sending'"),
        0,
        "no row is left `sending` by a running drainer"
    );
    assert_eq!(rig.state(after_renumbered).0, "sent");
    assert_eq!(rig.reply_state(after_reset).0, "sent");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state <> 'sent'")
            + rig.count("SELECT count(*) FROM message_outbox WHERE state <> 'sent'"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_inserted_in_a_drainer_only_state_stalls_nothing() {
    // Review r11: `outbox` (unlike `message_outbox`) took any state and
    // bookkeeping on INSERT. A row inserted `sending` sat there until a
    // restart; one inserted with `waiting_for` naming a business that is not
    // waiting was outside every claim for good. Both held back the later
    // transitions of their negotiation.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let db = rig.env.sql();
    let hostile = [
        (a.as_str(), "state", "'sending'"),
        (
            b.as_str(),
            "waiting_for",
            &format!("'{}'", rig.env.business_ids()[1]),
        ),
    ];
    for (n, column, value) in hostile {
        let _ = db.execute(
            &format!(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, {column})
                 VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z', {value})"
            ),
            [n],
        );
    }
    let later_a = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let later_b = rig.insert(&b, "job_complete", "2024-06-14T10:30:00Z");
    rig.drain().await;
    assert_eq!(rig.state(later_a).0, "sent");
    assert_eq!(rig.state(later_b).0, "sent");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state <> 'sent'"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_attempt_at_that_is_not_a_utc_time_holds_nothing_back() {
    // Review r11: `next_attempt_at` is compared as text. A partner's program
    // writing 'tomorrow' made a row never due, silently holding back every
    // later row of its negotiation; '2030-01-01 09:00:00' (a space, meant
    // as "later") made it due at once.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let first = rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    let later = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let reply = rig.reply(&b, "first");
    let later_reply = rig.reply(&b, "second");
    let db = rig.env.sql();
    let _ = db.execute(
        "UPDATE outbox SET next_attempt_at = 'tomorrow' WHERE id = ?1",
        [first],
    );
    let _ = db.execute(
        "INSERT INTO message_outbox (negotiation_id, text, next_attempt_at) VALUES (?1, 'x', 'soon')",
        [&b],
    );
    let _ = db.execute(
        "UPDATE message_outbox SET next_attempt_at = '2030-01-01 09:00:00' WHERE id = ?1",
        [reply],
    );
    rig.drain().await;
    assert_eq!(
        rig.state(later).0,
        "sent",
        "not held back by a row never due"
    );
    assert_eq!(rig.reply_state(later_reply).0, "sent");
    assert_eq!(
        rig.count("SELECT count(*) FROM message_outbox WHERE text = 'x' AND state <> 'sent'"),
        0
    );
    assert_eq!(
        rig.reply_state(reply).0,
        "sent",
        "a time the table took is a time the drainer reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_from_before_schema_8_with_a_loose_next_attempt_at_is_still_recorded() {
    // The rule on next_attempt_at (schema 8) must not refuse the drainer's
    // own bookkeeping on a row written before it: recording the outcome
    // leaves next_attempt_at as it is.
    let rig = Rig::new(FAST).await;
    let n = rig.lead(0, 0);
    let m = rig.lead(1, 0);
    rig.sql(
        "DROP TRIGGER outbox_next_attempt_at_insert;
         DROP TRIGGER message_outbox_next_attempt_at_insert;",
    );
    let db = rig.env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at)
         VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z', '2000-01-01 00:00:00')",
        [&n],
    )
    .unwrap();
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text, next_attempt_at)
         VALUES (?1, 'hello', '2000-01-01 00:00:00')",
        [&m],
    )
    .unwrap();
    let s = rig.drain().await;
    assert_eq!(s.sent, 2, "{s:?}");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state = 'sent'")
            + rig.count("SELECT count(*) FROM message_outbox WHERE state = 'sent'"),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_set_to_sending_by_hand_stalls_nothing() {
    // Review r11: only a claim makes a row `sending`. A partner's program
    // doing it by hand left the row there until the next start, holding
    // back the later rows of its negotiation.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let first = rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    let later = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let reply = rig.reply(&b, "first");
    let later_reply = rig.reply(&b, "second");
    let db = rig.env.sql();
    let _ = db.execute("UPDATE outbox SET state = 'sending' WHERE id = ?1", [first]);
    let _ = db.execute(
        "UPDATE message_outbox SET state = 'sending' WHERE id = ?1",
        [reply],
    );
    rig.drain().await;
    assert_eq!(rig.state(later).0, "sent");
    assert_eq!(rig.reply_state(later_reply).0, "sent");
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE state <> 'sent'")
            + rig.count("SELECT count(*) FROM message_outbox WHERE state <> 'sent'"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_put_aside_by_hand_for_a_business_that_may_send_stalls_nothing() {
    // Schema 8 refuses `waiting_for` on INSERT, but an UPDATE (or a DELETE
    // FROM outbox_waits) still put a pending row aside for a business that
    // is not waiting: only businesses recorded in outbox_waits were ever
    // brought back, so the row and every later row of its negotiation
    // stayed pending for good.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let alone = rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    let first = rig.insert(&b, "appt_scheduled", "2024-06-14T09:30:00Z");
    let later = rig.insert(&b, "job_complete", "2024-06-14T10:30:00Z");
    let business = &rig.env.business_ids()[1];
    rig.env
        .sql()
        .execute(
            "UPDATE outbox SET waiting_for = ?1 WHERE id IN (?2, ?3)",
            rusqlite::params![business, alone, first],
        )
        .unwrap();
    rig.drain().await;
    for id in [alone, first, later] {
        assert_eq!(rig.state(id).0, "sent", "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_put_aside_by_hand_while_the_drainer_runs_comes_back_with_its_later_rows() {
    // As above, but after the drainer's first claim (its view of the
    // businesses unchanged since): a later row of the negotiation was
    // skipped claim after claim, behind a row no claim walks.
    let rig = Rig::new(FAST).await;
    let b = rig.lead(1, 0);
    let first = rig.insert(&b, "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.drain().await;
    assert_eq!(rig.state(first).0, "sent");
    let second = rig.insert(&b, "job_complete", "2024-06-14T10:30:00Z");
    rig.env
        .sql()
        .execute(
            "UPDATE outbox SET waiting_for = ?1 WHERE id = ?2",
            rusqlite::params![&rig.env.business_ids()[1], second],
        )
        .unwrap();
    let third = rig.insert(&b, "invoice_paid", "2024-06-14T11:30:00Z");
    rig.drain().await;
    for id in [second, third] {
        assert_eq!(rig.state(id).0, "sent", "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_outside_the_years_0000_to_9999_in_utc_fails_alone_unsent() {
    // '0000-01-01T00:30:00+01:00' is year -1 in UTC: it was sent as
    // '-0001-12-31T23:30:00Z' (and '9999-12-31T23:30:00-01:00' as year
    // 10000), which Thumbtack cannot take. Rows written before schema 13
    // (the table refuses them since), or past a dropped trigger.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    rig.sql("DROP TRIGGER outbox_validate_insert;");
    let before_year_0 = rig.insert(&a, "appt_scheduled", "0000-01-01T00:30:00+01:00");
    let after_a = rig.insert(&a, "job_complete", "2024-06-15T09:30:00Z");
    let first_b = rig.insert(&b, "appt_scheduled", "2024-06-14T09:30:00Z");
    let after_year_9999 = rig.insert(&b, "job_complete", "9999-12-31T23:30:00-01:00");
    let last_b = rig.insert(&b, "invoice_paid", "9999-12-31T23:40:00Z");
    rig.drain().await;
    for id in [before_year_0, after_year_9999] {
        let (state, attempts, error) = rig.state(id);
        let error = error.unwrap_or_default();
        assert_eq!(state, "dead", "row {id}: {error}");
        assert!(
            error.contains("cannot be sent") && error.contains("outside the years 0000-9999"),
            "row {id}: {error}"
        );
        assert_eq!(attempts, 0, "row {id}: never attempted");
    }
    for id in [after_a, first_b, last_b] {
        assert_eq!(rig.state(id).0, "sent", "row {id}");
    }
    let sent: Vec<(String, String)> = rig
        .env
        .sandbox
        .deliveries()
        .into_iter()
        .map(|d| (d.status, d.partner_status_changed_at))
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    for (status, at) in &sent {
        assert!(
            at.len() == 20 && at.as_bytes()[..4].iter().all(u8::is_ascii_digit),
            "{status} sent with {at}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_put_aside_by_hand_with_a_blob_or_broken_text_comes_back_in_order() {
    // waiting_for is TEXT: `SET waiting_for = 1` stores '1' (a business
    // id), but a BLOB, or text that is not UTF-8, stays what it is; and
    // text that is not digits names no business that could ever be
    // configured. The claim did not see the first two as put aside: the later rows of its
    // negotiation went out before it, and it came back only at the next
    // start.
    let rig = Rig::new(FAST).await;
    let (a, b, c) = (rig.lead(0, 0), rig.lead(1, 0), rig.lead(0, 1));
    let warm_up = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.drain().await;
    assert_eq!(rig.state(warm_up).0, "sent");
    let mut rows = Vec::new();
    for (n, aside) in [
        (&a, "X'3131'"),
        (&b, "CAST(X'FF31' AS TEXT)"),
        (&c, "'7' || char(0) || 'x'"),
    ] {
        let first = rig.insert(n, "appt_scheduled", "2024-06-14T09:30:00Z");
        rig.sql(&format!(
            "UPDATE outbox SET waiting_for = {aside} WHERE id = {first}"
        ));
        let later = rig.insert(n, "job_complete", "2024-06-14T10:30:00Z");
        rows.push((n.clone(), first, later));
    }
    rig.drain().await;
    rig.drain().await;
    let order: Vec<(String, String)> = rig
        .env
        .sandbox
        .deliveries()
        .into_iter()
        .map(|d| (d.negotiation_id, d.status))
        .collect();
    for (n, first, later) in rows {
        for id in [first, later] {
            assert_eq!(rig.state(id).0, "sent", "row {id}");
        }
        let statuses: Vec<&str> = order
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(statuses, ["appt_scheduled", "job_complete"], "{n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_put_aside_with_broken_text_before_the_start_stalls_nothing() {
    // Bringing the waits in line (at start, and when a business's state
    // changes) read waiting_for as UTF-8: one row put aside with broken
    // text failed every claim of both outboxes.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    let first = rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z");
    let later = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let other = rig.insert(&b, "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.sql(&format!(
        "UPDATE outbox SET waiting_for = CAST(X'FF' AS TEXT) WHERE id = {first};
         INSERT INTO message_outbox (negotiation_id, text) VALUES ('{b}', 'hi');
         UPDATE message_outbox SET waiting_for = CAST(X'FE' AS TEXT);"
    ));
    let s = rig
        .drainer
        .drain_once(&CancellationToken::new())
        .await
        .expect("the drain runs");
    for id in [first, later, other] {
        assert_eq!(rig.state(id).0, "sent", "row {id}: {s:?}");
    }
    assert_eq!(
        rig.count("SELECT count(*) FROM message_outbox WHERE state = 'sent'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_attempt_at_with_a_nul_and_broken_text_after_it_stalls_nothing() {
    // SQLite's GLOB stops at a NUL: schema 8's check of next_attempt_at took
    // '2024-06-14T09:30:00Z' || char(0) || <not UTF-8>, and the claim, which
    // read the value back as UTF-8 to walk on from it, failed every time.
    let rig = Rig::new(FAST).await;
    let row = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let other = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let smuggle = format!(
        "UPDATE outbox SET next_attempt_at = '2024-06-14T09:30:00Z' || char(0) || CAST(X'FF' AS TEXT)
          WHERE id = {row}"
    );
    let refused = rig
        .env
        .sql()
        .execute(&smuggle, [])
        .map_err(|e| e.to_string());
    assert!(
        matches!(&refused, Err(e) if e.contains("next_attempt_at must be a UTC time")),
        "{refused:?}"
    );
    // A row written before schema 13, or past its dropped triggers.
    for name in [
        "outbox_next_attempt_at_update",
        "outbox_next_attempt_at_without_nul_update",
    ] {
        rig.sql(&format!("DROP TRIGGER IF EXISTS {name};"));
    }
    rig.sql(&smuggle);
    let s = rig
        .drainer
        .drain_once(&CancellationToken::new())
        .await
        .expect("the drain runs");
    for id in [row, other] {
        assert_eq!(rig.state(id).0, "sent", "row {id}: {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_a_nul_from_before_schema_13_fail_alone_in_both_outboxes() {
    // Rows written before schema 13 (or past its dropped triggers) with a
    // NUL in an id or in the instant: each fails alone, and the rows
    // around them (their negotiation's later ones, other negotiations')
    // go out in order. message_outbox's NUL check on UPDATE has no
    // "changed" guard: the drainer must never write those columns of such
    // a row (filling in business_id at the claim), or every claim fails.
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 0), rig.lead(1, 0));
    for name in [
        "outbox_validate_insert",
        "message_outbox_ids_without_nul_insert",
    ] {
        rig.sql(&format!("DROP TRIGGER {name};"));
    }
    let db = rig.env.sql();
    let mut bad = Vec::new();
    for (n, business, at) in [
        (
            format!("'{a}' || char(0) || 'x'"),
            "NULL",
            "'2024-06-14T09:30:00Z'",
        ),
        (format!("'{a}'"), "'7' || char(0)", "'2024-06-14T09:31:00Z'"),
        (
            format!("'{b}'"),
            "NULL",
            "'2024-06-14T09:30:00Z' || char(0) || 'x'",
        ),
    ] {
        db.execute_batch(&format!(
            "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
             VALUES ({n}, {business}, 'appt_scheduled', {at});"
        ))
        .unwrap();
        bad.push(db.last_insert_rowid());
    }
    let good_a = rig.insert(&a, "job_complete", "2024-06-14T10:30:00Z");
    let good_b = rig.insert(&b, "job_complete", "2024-06-14T10:30:00Z");
    db.execute_batch(&format!(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{a}' || char(0) || 'x', 'nul id');
         INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES ('{a}', '7' || char(0), 'nul business');
         INSERT INTO message_outbox (negotiation_id, text) VALUES ('{a}', 'fine');
         INSERT INTO message_outbox (negotiation_id, text) VALUES ('{b}', 'fine too');"
    ))
    .unwrap();
    let s = rig.drain().await;
    for id in bad {
        assert_eq!(rig.state(id).0, "dead", "row {id}: {s:?}");
    }
    for id in [good_a, good_b] {
        assert_eq!(rig.state(id).0, "sent", "row {id}: {s:?}");
    }
    let states: Vec<(String, String)> = db
        .prepare("SELECT text, state FROM message_outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let states: Vec<(&str, &str)> = states
        .iter()
        .map(|(t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("nul id", "dead"),
            ("nul business", "dead"),
            ("fine", "sent"),
            ("fine too", "sent")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_a_partners_trigger_refuses_to_change_stalls_nothing() {
    // A partner's own trigger refuses every UPDATE of one row (an audit
    // rule, say): neither `sending` nor `dead` can be written on it. The
    // claim failed as a whole, tick after tick: every other row, of every
    // business, stalled behind it.
    let rig = Rig::new(FAST).await;
    let stuck = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let ignored = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.sql(&format!(
        "CREATE TRIGGER partner_freeze BEFORE UPDATE ON outbox WHEN OLD.id = {stuck}
         BEGIN SELECT RAISE(ABORT, 'frozen by the partner''s audit rule'); END;
         CREATE TRIGGER partner_ignore BEFORE UPDATE ON outbox WHEN OLD.id = {ignored}
         BEGIN SELECT RAISE(IGNORE); END;"
    ));
    let others: Vec<i64> = (1..4)
        .map(|i| {
            rig.insert(
                &rig.lead(i % 2, i),
                "appt_scheduled",
                "2024-06-14T09:30:00Z",
            )
        })
        .collect();
    let s = rig.drain().await;
    assert_eq!(s.sent, 3, "{s:?}");
    for id in others {
        assert_eq!(rig.state(id).0, "sent", "row {id}");
    }
    // The rows the triggers guard are untouched, and no attempt is logged
    // for them claim after claim.
    rig.drain().await;
    for id in [stuck, ignored] {
        assert_eq!(rig.state(id).0, "pending", "row {id}");
        assert_eq!(
            rig.count(&format!(
                "SELECT count(*) FROM outbox_attempts WHERE outbox_id = {id}"
            )),
            0,
            "row {id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_left_sending_that_a_trigger_guards_stops_no_start() {
    // A row left `sending` by a kill, which a partner's trigger then
    // refuses to let change: the start-up recovery failed as a whole, so
    // no `drain`, `sync` or daemon could open the database at all.
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let ids = env.business_ids();
    let lead = |b: usize, n: usize| env.sandbox.lead_ids(&ids[b])[n].clone();
    let db = env.sql();
    let insert = |negotiation: &str| {
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
            [negotiation],
        )
        .unwrap();
        db.last_insert_rowid()
    };
    let stuck = insert(&lead(0, 0));
    let other = insert(&lead(1, 0));
    // As a claim leaves it, then a kill.
    db.execute_batch(&format!(
        "UPDATE outbox SET state = 'sending', attempts = attempts + 1,
             sending_since = '2024-06-14T09:31:00Z', claim_id = 7 WHERE id = {stuck};
         CREATE TRIGGER partner_freeze BEFORE UPDATE ON outbox WHEN OLD.id = {stuck}
         BEGIN SELECT RAISE(ABORT, 'frozen by the partner''s audit rule'); END;"
    ))
    .unwrap();
    let out = env.run(&["drain"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::text(&out));
    let state = |id: i64| -> String {
        db.query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(state(other), "sent");
    assert_eq!(state(stuck), "sending", "left as the trigger wants it");
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM outbox_attempts WHERE outbox_id = {stuck}")
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_row_a_trigger_guards_stalls_nothing_when_its_business_comes_back() {
    // Rows put aside for a removed business come back (or are put aside)
    // with one UPDATE per business: a partner's trigger refusing any
    // change of one of them failed it, and with it every claim of every
    // business.
    let rig = Rig::new(FAST).await;
    let (full, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    let guarded = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let free = rig.insert(&rig.lead(2, 1), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.drain().await;
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE waiting_for IS NOT NULL"),
        2
    );
    rig.sql(&format!(
        "CREATE TRIGGER partner_freeze BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(ABORT, 'frozen by the partner''s audit rule'); END;"
    ));
    // Configured again: the others go out.
    rig.drainer.update(full, rig.session.client.clone());
    let other = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let s = rig.drain().await;
    assert_eq!(s.sent, 2, "{s:?}");
    assert_eq!(rig.state(free).0, "sent");
    assert_eq!(rig.state(other).0, "sent");
    assert_eq!(rig.state(guarded).0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_rolls_back_the_claim_writes_nothing_outside_it() {
    // A partner's RAISE(ROLLBACK) on one row's UPDATE ends the claim's
    // transaction: what the drainer wrote next for that row (its `dead`
    // attempt) ran outside any transaction and stayed, one row of
    // outbox_attempts per claim, for ever; and every claim failed.
    let rig = Rig::new(FAST).await;
    let stuck = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    // A row sent just before a guarded one of its negotiation: the claim of
    // the next row is made with the first one's outcome.
    let before = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let next = rig.insert(&rig.lead(2, 0), "job_complete", "2024-06-14T10:30:00Z");
    let other = rig.insert(&rig.lead(1, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.sql(&format!(
        "CREATE TRIGGER partner_rollback BEFORE UPDATE ON outbox WHEN OLD.id IN ({stuck}, {next})
         BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
    ));
    let s = rig.drain().await;
    assert_eq!(s.sent, 2, "{s:?}");
    assert_eq!(rig.state(other).0, "sent");
    assert_eq!(rig.state(before).0, "sent", "its outcome is recorded");
    assert_eq!(rig.state(next).0, "pending");
    assert_eq!(rig.state(stuck).0, "pending");
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM outbox_attempts WHERE outbox_id = {stuck}"
        )),
        0
    );
}

/// `drain_once` on a thread and runtime of its own, failing the test when
/// it has not returned in `secs` (a claim that loops for ever would hang
/// the test, not fail it; the thread is left behind, on this test's own
/// database).
fn drain_within(rig: &Rig, secs: u64) -> leadsync::drain::DrainSummary {
    let d = rig.drainer.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _ = tx.send(rt.block_on(d.drain_once(&CancellationToken::new())));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("drain_once did not return within {secs} s"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ignored_row_whose_business_must_wait_ends_the_claim() {
    // A row a partner's trigger answers with RAISE(IGNORE), of a business
    // that must wait (removed from the configuration): putting it aside
    // changed nothing, so the claim walked again from the start, found it
    // first again, for ever, holding the write lock.
    let rig = Rig::new(FAST).await;
    let (_, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    let guarded = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.sql(&format!(
        "CREATE TRIGGER partner_ignore BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(IGNORE); END;"
    ));
    let other = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let s = drain_within(&rig, 30);
    assert_eq!(s.sent, 1, "{s:?}");
    assert_eq!(rig.state(other).0, "sent");
    assert_eq!(rig.state(guarded).0, "pending");
    // And again: the next claim ends too.
    drain_within(&rig, 30);
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM outbox WHERE id = {guarded} AND waiting_for IS NULL"
        )),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_row_whose_trigger_rolls_back_stalls_nothing_when_its_business_comes_back() {
    // Rows put aside for a removed business come back when it is
    // configured again; a partner's RAISE(ROLLBACK) on one of them failed
    // that whole step, and with it the claim of every business, every tick.
    let rig = Rig::new(FAST).await;
    let (full, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    let guarded = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let free = rig.insert(&rig.lead(2, 1), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.drain().await;
    assert_eq!(
        rig.count("SELECT count(*) FROM outbox WHERE waiting_for IS NOT NULL"),
        2
    );
    rig.sql(&format!(
        "CREATE TRIGGER partner_rollback BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
    ));
    rig.drainer.update(full, rig.session.client.clone());
    let other = rig.insert(&rig.lead(0, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    let s = drain_within(&rig, 30);
    assert_eq!(s.sent, 2, "{s:?}");
    assert_eq!(rig.state(free).0, "sent");
    assert_eq!(rig.state(other).0, "sent");
    assert_eq!(rig.state(guarded).0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_a_clock_ahead_scheduled_on_a_row_whose_trigger_rolls_back_stops_no_start() {
    // At start, waits a clock ahead scheduled are counted from now again;
    // a partner's RAISE(ROLLBACK) on one such row ended the transaction
    // unseen: the later rows were written outside it, its commit failed,
    // and so did every start.
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let ids = env.business_ids();
    let lead = |b: usize, n: usize| env.sandbox.lead_ids(&ids[b])[n].clone();
    let db = env.sql();
    // Logged as tried under a clock two days ahead, due an hour after that
    // (with no attempt counted: due at once when rebased).
    let ahead = |negotiation: &str| {
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at)
             VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z',
                     strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days', '+1 hour'))",
            [negotiation],
        )
        .unwrap();
        let id = db.last_insert_rowid();
        db.execute(
            "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
             VALUES (?1, 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days'), 503, 'retry', 'HTTP 503')",
            [id],
        )
        .unwrap();
        id
    };
    let guarded = ahead(&lead(0, 0));
    let rebased = ahead(&lead(1, 0));
    db.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
         VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
        [lead(2, 0)],
    )
    .unwrap();
    let due = db.last_insert_rowid();
    db.execute_batch(&format!(
        "CREATE TRIGGER partner_rollback BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
    ))
    .unwrap();
    let next_of = |id: i64| -> String {
        db.query_row(
            "SELECT next_attempt_at FROM outbox WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (guarded_next, rebased_next) = (next_of(guarded), next_of(rebased));
    let out = env.run(&["drain"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::text(&out));
    let state = |id: i64| -> String {
        db.query_row("SELECT state FROM outbox WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(state(due), "sent");
    assert_eq!(
        next_of(guarded),
        guarded_next,
        "left as the trigger wants it"
    );
    assert!(next_of(rebased) < rebased_next, "the other wait is rebased");
    assert_eq!(state(rebased), "sent");
    assert_eq!(state(guarded), "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_the_id_of_an_outbox_row_whose_trigger_rolls_back_still_comes_back() {
    // `outbox` and `message_outbox` count their ids apart: the rows a step
    // left where they were (RAISE(ROLLBACK)) were named by id alone, so the
    // reply with the same id as a guarded transition stayed put aside for a
    // business long back, unsent for ever, and no log named it.
    let rig = Rig::new(FAST).await;
    let (full, without) = rig.settings_without(2);
    rig.drainer.update(without, rig.session.client.clone());
    let guarded = rig.insert(&rig.lead(2, 0), "appt_scheduled", "2024-06-14T09:30:00Z");
    rig.sql(&format!(
        "INSERT INTO message_outbox (id, negotiation_id, text) VALUES ({guarded}, '{}', 'On my way')",
        rig.lead(2, 1)
    ));
    rig.drain().await;
    for table in ["outbox", "message_outbox"] {
        assert_eq!(
            rig.count(&format!(
                "SELECT count(*) FROM {table} WHERE id = {guarded} AND waiting_for IS NOT NULL"
            )),
            1,
            "{table}"
        );
    }
    rig.sql(&format!(
        "CREATE TRIGGER partner_rollback BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
    ));
    rig.drainer.update(full, rig.session.client.clone());
    drain_within(&rig, 30);
    assert_eq!(
        rig.count(&format!(
            "SELECT count(*) FROM message_outbox WHERE id = {guarded} AND waiting_for IS NULL"
        )),
        1,
        "the reply came back"
    );
    if rig.reply_state(guarded).0 != "sent" {
        drain_within(&rig, 30);
    }
    assert_eq!(rig.reply_state(guarded).0, "sent");
    assert_eq!(rig.state(guarded).0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_the_id_of_an_outbox_row_whose_trigger_rolls_back_is_rebased_at_start() {
    // The clock rebase at start left out the rows a RAISE(ROLLBACK) answered
    // by id alone: the reply with the same id as the guarded transition
    // kept a wait a clock two days ahead scheduled.
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let ids = env.business_ids();
    let lead = |b: usize, n: usize| env.sandbox.lead_ids(&ids[b])[n].clone();
    let db = env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, next_attempt_at)
         VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z',
                 strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days', '+1 hour'))",
        [lead(0, 0)],
    )
    .unwrap();
    let guarded = db.last_insert_rowid();
    db.execute(
        "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
         VALUES (?1, 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days'), 503, 'retry', 'HTTP 503')",
        [guarded],
    )
    .unwrap();
    db.execute(
        "INSERT INTO message_outbox (id, negotiation_id, text, next_attempt_at)
         VALUES (?1, ?2, 'On my way', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days', '+1 hour'))",
        rusqlite::params![guarded, lead(1, 0)],
    )
    .unwrap();
    db.execute(
        "INSERT INTO message_outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
         VALUES (?1, 1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+2 days'), 503, 'retry', 'HTTP 503')",
        [guarded],
    )
    .unwrap();
    db.execute_batch(&format!(
        "CREATE TRIGGER partner_rollback BEFORE UPDATE ON outbox WHEN OLD.id = {guarded}
         BEGIN SELECT RAISE(ROLLBACK, 'rolled back by the partner''s rule'); END;"
    ))
    .unwrap();
    let out = env.run(&["drain"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::text(&out));
    let state = |table: &str| -> String {
        db.query_row(
            &format!("SELECT state FROM {table} WHERE id = ?1"),
            [guarded],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(state("message_outbox"), "sent", "the reply was rebased");
    assert_eq!(state("outbox"), "pending");
}
