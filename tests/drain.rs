//! The outbox drainer: each outcome of SPEC §4's table, ordering, holding
//! back, Retry-After, crash safety with kill -9, concurrent external writers.

mod common;

use common::{Env, FAST, count};
use leadsync::app::Session;
use leadsync::drain::{DrainSettings, Drainer};
use leadsync::sandbox::{Delivery, Faults, SandboxOptions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Rig {
    env: Env,
    session: Session,
    drainer: Arc<Drainer>,
}

impl Rig {
    async fn new(overrides: &str) -> Rig {
        let env = Env::new(SandboxOptions::default(), false, overrides).await;
        assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
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

    fn insert(&self, negotiation: &str, status: &str, at: &str, cents: Option<i64>) -> i64 {
        let db = self.env.sql();
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at, invoice_amount_in_cents) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![negotiation, status, at, cents],
        )
        .unwrap();
        db.last_insert_rowid()
    }

    async fn drain(&self) -> leadsync::drain::DrainSummary {
        self.drainer
            .drain_once(&CancellationToken::new())
            .await
            .unwrap()
    }

    fn row(&self, id: i64) -> (String, i64, Option<i64>, Option<String>, Option<String>) {
        self.env
            .sql()
            .query_row(
                "SELECT state, attempts, last_http_status, last_error, last_trace_id FROM outbox WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap()
    }

    /// Seconds until the row is due again.
    fn due_in(&self, id: i64) -> f64 {
        let at: String = self
            .env
            .sql()
            .query_row(
                "SELECT next_attempt_at FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        (leadsync::time::parse(&at).unwrap() - chrono::Utc::now()).num_milliseconds() as f64
            / 1000.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_and_refused_rows() {
    let rig = Rig::new(FAST).await;
    let ok = rig.insert(
        &rig.lead(0, 0),
        "job_complete",
        "2024-06-14T11:30:00.120+02:00",
        Some(125_000),
    );
    let refused_lead = rig.lead(1, 0);
    rig.env.sandbox.refuse(&refused_lead);
    let refused = rig.insert(&refused_lead, "pro_cancel", "2024-06-14T09:30:00Z", None);
    // Unknown to Thumbtack: 404, dead. The business is named, so it is sent.
    let db = rig.env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at) VALUES ('100000000000000000', ?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
        [&rig.env.business_ids()[2]],
    )
    .unwrap();
    let missing = db.last_insert_rowid();

    let s = rig.drain().await;
    assert_eq!((s.sent, s.dead), (1, 2), "{s:?}");

    let (state, attempts, http, error, _) = rig.row(ok);
    assert_eq!(
        (state.as_str(), attempts, http, error),
        ("sent", 1, Some(200), None)
    );
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM outbox WHERE id = {ok} AND sent_at IS NOT NULL")
        ),
        1
    );
    let d = rig.env.sandbox.deliveries();
    assert_eq!(d.len(), 1);
    assert_eq!(
        d[0].partner_status_changed_at, "2024-06-14T09:30:00.120Z",
        "the row's instant in UTC, never the send time"
    );
    assert_eq!(d[0].invoice_amount_in_cents, Some(125_000));

    let (state, _, http, error, trace) = rig.row(refused);
    assert_eq!((state.as_str(), http), ("dead", Some(400)));
    let error = error.unwrap();
    assert!(error.contains("does not accept the transition"), "{error}");
    // ProblemDetails `errors` (the field errors) are kept with the detail.
    assert!(
        error.contains("pro_cancel is not allowed in the negotiation's state"),
        "{error}"
    );
    assert!(trace.is_some_and(|t| t.len() >= 16));
    let (state, _, http, _, trace) = rig.row(missing);
    assert_eq!((state.as_str(), http), ("dead", Some(404)));
    assert!(trace.is_some());
    assert_eq!(count(&db, "SELECT count(*) FROM outbox_attempts"), 3);
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM outbox_attempts WHERE outbox_id = {refused} AND http_status = 400 AND outcome = 'dead' AND trace_id IS NOT NULL AND duration_ms >= 0"
            )
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transient_failure_is_retried_from_the_persisted_attempt_count() {
    // A long backoff keeps each row out of the next kind's drain.
    let rig = Rig::new(
        &FAST
            .replace("timeout_secs = 5", "timeout_secs = 1")
            .replace("backoff_initial_secs = 0.2", "backoff_initial_secs = 30")
            .replace("backoff_max_secs = 2", "backoff_max_secs = 120"),
    )
    .await;
    let kinds: Vec<(&str, Faults, Option<i64>)> = vec![
        (
            "5xx",
            Faults {
                error_5xx: 1.0,
                ..Default::default()
            },
            None,
        ),
        (
            "202",
            Faults {
                waf_202: 1.0,
                ..Default::default()
            },
            Some(202),
        ),
        (
            "reset",
            Faults {
                reset: 1.0,
                ..Default::default()
            },
            None,
        ),
        (
            "timeout",
            Faults {
                timeout: 1.0,
                timeout_ms: 2500,
                ..Default::default()
            },
            None,
        ),
        (
            "garbage",
            Faults {
                malformed: 1.0,
                ..Default::default()
            },
            Some(500),
        ),
        // A POST redirected is never followed (it could come back a GET
        // answered 200), and a proxy's HTML 404 is no refusal of Thumbtack's.
        (
            "redirect",
            Faults {
                redirect: 1.0,
                ..Default::default()
            },
            Some(301),
        ),
        (
            "html 404",
            Faults {
                html_404: 1.0,
                ..Default::default()
            },
            Some(404),
        ),
    ];
    for (i, (name, faults, http)) in kinds.into_iter().enumerate() {
        let id = rig.insert(
            &rig.lead(0, i),
            "appt_scheduled",
            "2024-06-14T09:30:00Z",
            None,
        );
        rig.env.sandbox.set_faults(faults);
        let s = rig.drain().await;
        assert_eq!(s.retried, 1, "{name}: {s:?}");
        let (state, attempts, got_http, error, _) = rig.row(id);
        assert_eq!((state.as_str(), attempts), ("pending", 1), "{name}");
        if let Some(h) = http {
            assert_eq!(got_http, Some(h), "{name}");
        }
        assert!(error.is_some(), "{name}: the error is recorded");
        let due = rig.due_in(id);
        assert!(
            (25.0..=60.0).contains(&due),
            "{name}: due in {due}s (first backoff: 30 s plus jitter)"
        );
    }
    rig.env.sandbox.set_faults(Faults::default());
    rig.env
        .sql()
        .execute(
            "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z'",
            [],
        )
        .unwrap();
    let s = rig.drain().await;
    assert_eq!(s.sent, 7, "{s:?}");
    assert_eq!(rig.env.sandbox.deliveries().len(), 7);
    assert_eq!(
        count(
            &rig.env.sql(),
            "SELECT count(*) FROM outbox_attempts WHERE outcome = 'retry' AND error IS NOT NULL"
        ),
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_max_attempts_ends_in_dead() {
    let rig = Rig::new(
        &FAST
            .replace("max_attempts = 5", "max_attempts = 2")
            .replace("backoff_max_secs = 2", "backoff_max_secs = 10"),
    )
    .await;
    let id = rig.insert(
        &rig.lead(0, 0),
        "appt_scheduled",
        "2024-06-14T09:30:00Z",
        None,
    );
    rig.env.sandbox.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 3,
        ..Default::default()
    });
    rig.drain().await;
    let due = rig.due_in(id);
    assert!((2.0..=4.5).contains(&due), "Retry-After 3 s: due in {due}s");
    assert_eq!(rig.row(id).2, Some(429));
    // Not due yet: nothing is attempted.
    let s = rig.drain().await;
    assert_eq!(s, Default::default());

    rig.env.sandbox.set_faults(Faults {
        error_5xx: 1.0,
        ..Default::default()
    });
    rig.env
        .sql()
        .execute(
            "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z'",
            [],
        )
        .unwrap();
    let s = rig.drain().await;
    assert_eq!(s.dead, 1, "{s:?}");
    let (state, attempts, _, error, _) = rig.row(id);
    assert_eq!((state.as_str(), attempts), ("dead", 2));
    assert!(error.unwrap().starts_with("gave up after 2 attempts"));
    assert!(rig.env.sandbox.deliveries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_static_token_holds_rows_without_counting_attempts() {
    let rig = Rig::new(FAST).await;
    let b = rig.env.business_ids()[0].clone();
    std::fs::write(
        rig.env.dir.path().join("fixture/tokens").join(&b),
        "revoked\n",
    )
    .unwrap();
    let id = rig.insert(
        &rig.lead(0, 0),
        "appt_scheduled",
        "2024-06-14T09:30:00Z",
        None,
    );
    let other = rig.insert(
        &rig.lead(1, 0),
        "appt_scheduled",
        "2024-06-14T09:30:00Z",
        None,
    );
    let s = rig.drain().await;
    assert_eq!((s.sent, s.held), (1, 1), "{s:?}");
    let (state, attempts, http, _, _) = rig.row(id);
    assert_eq!((state.as_str(), attempts, http), ("pending", 0, Some(401)));
    assert_eq!(rig.row(other).0, "sent");
    assert_eq!(
        count(
            &rig.env.sql(),
            &format!("SELECT needs_reauth FROM businesses WHERE business_id = '{b}'")
        ),
        1
    );
    // Held rows are not claimed again while the business waits.
    let s = rig.drain().await;
    assert_eq!(s, Default::default());
}

/// Checks that each negotiation's deliveries arrived in the order of their instants.
fn assert_in_order(deliveries: &[Delivery]) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for d in deliveries {
        let v = by.entry(d.negotiation_id.clone()).or_default();
        // A duplicate after a crash repeats the last one; anything else must be later.
        if v.last() == Some(&d.partner_status_changed_at) {
            continue;
        }
        if let Some(last) = v.last() {
            assert!(
                leadsync::time::parse(last) < leadsync::time::parse(&d.partner_status_changed_at),
                "negotiation {}: {} delivered after {last}",
                d.negotiation_id,
                d.partner_status_changed_at
            );
        }
        v.push(d.partner_status_changed_at.clone());
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_negotiation_goes_out_in_time_order_whatever_the_insert_order() {
    let rig = Rig::new(FAST).await;
    let (a, b) = (rig.lead(0, 1), rig.lead(2, 4));
    // Inserted out of order, in mixed zones.
    rig.insert(&a, "invoice_paid", "2024-06-14T12:00:00-04:00", Some(5000)); // 16:00Z
    rig.insert(&a, "appt_scheduled", "2024-06-14T09:30:00Z", None);
    rig.insert(&b, "customer_cancel", "2024-06-15T00:30:00+02:00", None); // 14th 22:30Z
    rig.insert(
        &a,
        "job_complete",
        "2024-06-14T17:15:00.5+02:00",
        Some(5000),
    ); // 15:15:00.5Z
    rig.insert(&b, "appt_scheduled", "2024-06-14T21:00:00Z", None);
    rig.insert(&a, "not_scheduled", "2024-06-14T09:30:00Z", None); // same instant: by id
    let s = rig.drain().await;
    assert_eq!(s.sent, 6, "{s:?}");
    let d = rig.env.sandbox.deliveries();
    let by = assert_in_order(&d);
    assert_eq!(
        by[&a],
        [
            "2024-06-14T09:30:00Z",
            "2024-06-14T15:15:00.500Z",
            "2024-06-14T16:00:00Z"
        ],
        "{d:?}"
    );
    let statuses: Vec<&str> = d
        .iter()
        .filter(|x| x.negotiation_id == a)
        .map(|x| x.status.as_str())
        .collect();
    assert_eq!(
        statuses,
        [
            "appt_scheduled",
            "not_scheduled",
            "job_complete",
            "invoice_paid"
        ]
    );
    assert_eq!(by[&b], ["2024-06-14T21:00:00Z", "2024-06-14T22:30:00Z"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_row_holds_back_only_its_own_negotiation() {
    let rig = Rig::new(FAST).await;
    // A lead newer than the last sync: not in the mirror, no business_id,
    // three businesses configured — its rows wait for a sync.
    let business = rig.env.business_ids()[0].clone();
    let other = rig.lead(0, 0);
    let unknown = rig
        .env
        .sandbox
        .mutate(leadsync::sandbox::Mutation::AddLeads {
            business_id: business.clone(),
            count: 1,
        })
        .unwrap()[0]
        .clone();
    let unknown = unknown.as_str();
    let first = rig.insert(unknown, "appt_scheduled", "2024-06-14T09:30:00Z", None);
    let second = rig.insert(unknown, "job_complete", "2024-06-15T09:30:00Z", None);
    rig.insert(&other, "appt_scheduled", "2024-06-14T09:30:00Z", None);
    // A canceled and a dead row are final: later rows of their negotiation still go.
    let c = rig.lead(1, 2);
    let canceled = rig.insert(&c, "appt_scheduled", "2024-06-14T09:00:00Z", None);
    rig.env.run(&["outbox", "cancel", &canceled.to_string()]);
    rig.insert(&c, "job_complete", "2024-06-14T10:00:00Z", None);
    let d = rig.lead(2, 2);
    let dead = rig.insert(&d, "appt_scheduled", "2024-06-14T09:00:00Z", None);
    rig.env
        .sql()
        .execute("UPDATE outbox SET state = 'dead' WHERE id = ?1", [dead])
        .unwrap();
    rig.insert(&d, "job_complete", "2024-06-14T10:00:00Z", None);

    let s = rig.drain().await;
    assert_eq!((s.sent, s.retried), (3, 1), "{s:?}");
    let (state, attempts, _, error, _) = rig.row(first);
    assert_eq!((state.as_str(), attempts), ("pending", 1));
    assert!(error.unwrap().contains("not in the mirror yet"));
    assert_eq!(rig.row(second).1, 0, "the later row was never attempted");

    // The next sync mirrors the lead; once due, both rows go, in order.
    let settings = leadsync::sync::PassSettings {
        page_size: 10,
        stop_after_unchanged_pages: 1,
        accept_missing: false,
    };
    let pass = leadsync::sync::sync_business(
        &rig.session.store,
        &rig.session.client,
        &business,
        leadsync::sync::ScanKind::Head,
        settings,
        &CancellationToken::new(),
    )
    .await;
    assert!(pass.is_ok(), "{}", pass.summary());
    // Strictly past: `due_in` truncates to whole milliseconds, so 0.0 can
    // still be up to 1 ms early for the drain's own (millisecond) clock.
    common::wait_until("the waiting row is due", Duration::from_secs(5), || {
        rig.due_in(first) < 0.0
    })
    .await;
    let s = rig.drain().await;
    assert_eq!(s.sent, 2, "{s:?}");
    let statuses: Vec<String> = rig
        .env
        .sandbox
        .deliveries()
        .into_iter()
        .filter(|d| d.negotiation_id == unknown)
        .map(|d| d.status)
        .collect();
    assert_eq!(statuses, ["appt_scheduled", "job_complete"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_while_the_daemon_drains_are_all_delivered_once_in_order() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace("concurrency = 4", "concurrency = 8"),
    )
    .await;
    env.sandbox.set_faults(Faults {
        latency_ms: 5,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    let leads = env.first_leads(10);
    let db = env.database();
    common::wait_until("the first sync", Duration::from_secs(60), || {
        rusqlite::Connection::open(&db).ok().and_then(|c| {
            c.query_row("SELECT count(*) FROM negotiations", [], |r| {
                r.get::<_, i64>(0)
            })
            .ok()
        }) == Some(180)
    })
    .await;
    // Another program inserts 150 rows while the drainer runs.
    let writer = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        for i in 0..150 {
            let lead = &leads[i % leads.len()];
            let at = format!("2024-06-14T{:02}:{:02}:00Z", 8 + i / 60, i % 60);
            c.execute(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', ?2)",
                rusqlite::params![lead, at],
            )
            .unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    writer.join().unwrap();
    common::wait_until("every row sent", Duration::from_secs(60), || {
        env.sandbox.deliveries().len() >= 150
    })
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    let d = env.sandbox.deliveries();
    assert_eq!(d.len(), 150, "no duplicates without a crash");
    assert_in_order(&d);
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox WHERE state = 'sent'"
        ),
        150
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_drain_loses_nothing_and_keeps_order() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        latency_ms: 60,
        error_5xx: 0.1,
        ..Default::default()
    });
    let leads = env.first_leads(4);
    let db = env.sql();
    let mut expected = 0;
    // 12 negotiations x 5 transitions, each negotiation's rows inserted newest first.
    for (n, lead) in leads.iter().enumerate() {
        for k in (0..5).rev() {
            db.execute(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', ?2)",
                rusqlite::params![lead, format!("2024-06-{:02}T10:00:00+0{}:00", 10 + k, n % 3)],
            )
            .unwrap();
            expected += 1;
        }
    }
    for round in 0..2 {
        let mut child = env.spawn_daemon();
        let target = 15 * (round + 1);
        common::wait_until(
            "some deliveries before the kill",
            Duration::from_secs(30),
            || env.sandbox.deliveries().len() >= target,
        )
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = env.spawn_daemon();
    common::wait_until(
        "every row sent after restarts",
        Duration::from_secs(60),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM outbox WHERE state = 'sent'",
            ) == expected
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    let d = env.sandbox.deliveries();
    let by = assert_in_order(&d);
    assert_eq!(
        by.values().map(Vec::len).sum::<usize>(),
        expected as usize,
        "every transition delivered"
    );
    // Duplicates only for rows in flight at a kill: at most `concurrency` (4) per kill.
    assert!(
        d.len() <= expected as usize + 2 * 4,
        "{} deliveries for {expected} rows",
        d.len()
    );
    assert!(
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox_attempts WHERE outcome = 'interrupted'"
        ) <= 8,
        "interrupted attempts are recorded"
    );
}

/// A row naming no business is sent under its lead's, which the claim
/// writes into the row. Killed while the row is `sending`, the next start
/// puts it back to pending as a failed claim does: without that business,
/// so a lead mirrored under another business meanwhile is sent under that
/// one (SPEC §3: NULL means the mirror's business), not the stale one (the
/// sandbox, as Thumbtack, refuses that one's token: 403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_left_sending_by_a_kill_takes_its_leads_business_again() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let businesses = env.business_ids();
    let (first, second) = (businesses[0].clone(), businesses[1].clone());
    // The lead is the second business's; the mirror says the first's (as
    // a pass would have said before the lead moved).
    let lead = env.sandbox.lead_ids(&second)[0].clone();
    env.sql()
        .execute(
            "UPDATE negotiations SET business_id = ?2 WHERE negotiation_id = ?1",
            [&lead, &first],
        )
        .unwrap();
    // The answer takes longer than the client waits: the row is `sending`
    // for seconds, and the kill comes meanwhile.
    env.sandbox.set_faults(Faults {
        latency_ms: 30_000,
        ..Default::default()
    });
    let db = env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
         VALUES (?1, 'appt_scheduled', '2024-06-10T10:00:00Z')",
        [&lead],
    )
    .unwrap();
    let row = db.last_insert_rowid();
    let state_and_business = || -> (String, Option<String>) {
        env.sql()
            .query_row(
                "SELECT state, business_id FROM outbox WHERE id = ?1",
                [row],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    };
    let mut child = env.spawn_daemon();
    common::wait_until("the row claimed", Duration::from_secs(30), || {
        state_and_business().0 == "sending"
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        state_and_business(),
        ("sending".to_string(), Some(first.clone())),
        "killed while sending, the claim's business filled in"
    );
    // The mirror learns of the move before the retry.
    db.execute(
        "UPDATE negotiations SET business_id = ?2 WHERE negotiation_id = ?1",
        [&lead, &second],
    )
    .unwrap();
    env.sandbox.set_faults(Faults::default());
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    assert_eq!(
        state_and_business(),
        ("sent".to_string(), Some(second.clone())),
        "{}",
        common::text(&o)
    );
    let last = env.sandbox.deliveries().pop().expect("a delivery");
    assert_eq!(
        (last.negotiation_id, last.business_id),
        (lead, second),
        "sent under the lead's business now"
    );
}

/// A retry leadsync scheduled while the clock was far ahead (a year, then
/// corrected) waits only the delay it was given after its attempt, not
/// until the wrong clock's time; times the partner wrote are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_scheduled_under_a_clock_far_ahead_waits_only_its_delay_once_corrected() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let leads = env.first_leads(5);
    let now = chrono::Utc::now();
    let at = |d: chrono::Duration| leadsync::time::fmt(now + d);
    let (year, hour) = (chrono::Duration::days(365), chrono::Duration::hours(1));
    let db = env.sql();
    // (lead, attempts, last attempt's time, next_attempt_at)
    let rows = [
        // leadsync's retry under the clock a year ahead: an hour's backoff.
        (&leads[0], 2, Some(at(year)), at(year + hour)),
        // The partner's own schedule for a row never tried.
        (&leads[1], 0, None, at(year)),
        // A row tried (clock right) that the partner postponed by a year.
        (&leads[2], 1, Some(at(-hour)), at(year)),
        // A retry scheduled with the clock right.
        (&leads[3], 1, Some(at(-hour)), at(chrono::Duration::days(2))),
        // Tried under the clock ahead, then postponed by the partner 9 days
        // after that attempt: longer than leadsync ever waits, the partner's.
        (
            &leads[4],
            1,
            Some(at(year)),
            at(year + chrono::Duration::days(9)),
        ),
    ];
    let mut ids = Vec::new();
    for (lead, attempts, tried, next) in &rows {
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES (?1, 'appt_scheduled', '2024-06-10T10:00:00Z')",
            [lead],
        )
        .unwrap();
        let id = db.last_insert_rowid();
        db.execute(
            "UPDATE outbox SET attempts = ?2, next_attempt_at = ?3,
                 last_error = CASE WHEN ?2 > 0 THEN 'HTTP 503' END WHERE id = ?1",
            rusqlite::params![id, attempts, next],
        )
        .unwrap();
        if let Some(tried) = tried {
            db.execute(
                "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
                 VALUES (?1, ?2, ?3, 503, 'retry', 'HTTP 503')",
                rusqlite::params![id, attempts, tried],
            )
            .unwrap();
        }
        ids.push(id);
    }
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(0), "{}", common::text(&o));
    let next = |id: i64| -> chrono::DateTime<chrono::Utc> {
        let t: String = env
            .sql()
            .query_row(
                "SELECT next_attempt_at FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        leadsync::time::parse(&t).unwrap()
    };
    // Its hour counted from now (at the latest): not a year and an hour.
    let rebased = next(ids[0]);
    assert!(
        rebased > now + chrono::Duration::minutes(59) && rebased <= chrono::Utc::now() + hour,
        "{rebased}"
    );
    for (i, (_, _, _, written)) in rows.iter().enumerate().skip(1) {
        assert_eq!(leadsync::time::fmt(next(ids[i])), *written, "row {i}");
    }
}

/// The daemon's drainer sees its wall clock step back (a year ahead, then
/// corrected) while it runs: the retry it had scheduled under that clock
/// is due its delay after the correction, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_drainer_rebases_retries_when_its_wall_clock_steps_back() {
    let rig = Rig::new(FAST).await;
    let lead = rig.lead(0, 0);
    let id = rig.insert(&lead, "appt_scheduled", "2024-06-10T10:00:00Z", None);
    let (year, half_hour) = (chrono::Duration::days(365), chrono::Duration::minutes(30));
    let ahead = chrono::Utc::now() + year;
    let db = rig.env.sql();
    db.execute(
        "UPDATE outbox SET attempts = 1, next_attempt_at = ?2, last_error = 'HTTP 503' WHERE id = ?1",
        rusqlite::params![id, leadsync::time::fmt(ahead + half_hour)],
    )
    .unwrap();
    db.execute(
        "INSERT INTO outbox_attempts (outbox_id, attempt, started_at, http_status, outcome, error)
         VALUES (?1, 1, ?2, 503, 'retry', 'HTTP 503')",
        rusqlite::params![id, leadsync::time::fmt(ahead)],
    )
    .unwrap();
    let corrected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = corrected.clone();
    rig.drainer.set_wall_clock(Arc::new(move || {
        let now = chrono::Utc::now();
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            now
        } else {
            now + year
        }
    }));
    let stop = CancellationToken::new();
    let beat = Arc::new(leadsync::time::Heartbeat::new());
    let run = tokio::spawn(rig.drainer.clone().run(stop.clone(), beat.clone()));
    // The loop has looked at the clock ahead; then it is corrected.
    common::wait_until("the drainer's loop runs", Duration::from_secs(30), || {
        beat.count() != 0
    })
    .await;
    let before = chrono::Utc::now();
    corrected.store(true, std::sync::atomic::Ordering::SeqCst);
    let next = || -> chrono::DateTime<chrono::Utc> {
        let t: String = rig
            .env
            .sql()
            .query_row(
                "SELECT next_attempt_at FROM outbox WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        leadsync::time::parse(&t).unwrap()
    };
    common::wait_until("the retry is rebased", Duration::from_secs(30), || {
        next() < before + year
    })
    .await;
    stop.cancel();
    run.await.unwrap();
    let rebased = next();
    assert!(
        rebased >= before + half_hour && rebased <= chrono::Utc::now() + half_hour,
        "{rebased}"
    );
    assert_eq!(rig.row(id).0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_holding_the_lock_mid_drain_delays_but_loses_nothing() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        latency_ms: 30,
        ..Default::default()
    });
    let leads = env.first_leads(5);
    let db = env.sql();
    for (i, lead) in leads.iter().enumerate() {
        for k in 0..3 {
            db.execute(
                "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', ?2)",
                rusqlite::params![lead, format!("2024-06-14T10:{i:02}:{k:02}Z")],
            )
            .unwrap();
        }
    }
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    common::wait_until("the drain is under way", Duration::from_secs(60), || {
        env.sandbox.deliveries().len() >= 5
    })
    .await;
    // Another program takes the write lock for 2.5 s (under the 10 s busy timeout).
    let path = env.database();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("BEGIN IMMEDIATE").unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        c.execute_batch("ROLLBACK").unwrap();
    });
    holder.join().unwrap();
    common::wait_until("every row sent", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM outbox WHERE state = 'sent'",
        ) == 45
    })
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    let d = env.sandbox.deliveries();
    assert_eq!(d.len(), 45, "exactly once");
    assert_in_order(&d);
}

/// The database refuses to record a send's outcome (disk full, an I/O error;
/// here a trigger standing in for them) after Thumbtack took the transition.
/// The outcome is kept and recorded once the database takes it: the row is
/// never sent a second time, nothing later of its negotiation goes out
/// before it, and other negotiations are not held up meanwhile. (Before, the
/// outcome was dropped: the row stayed `sending` until the next start, which
/// sent it again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_database_cannot_record_yet_is_recorded_later_and_never_resent() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let leads = env.first_leads(3);
    let db = env.sql();
    let insert = |lead: &str, at: &str| -> i64 {
        db.execute(
            "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', ?2)",
            rusqlite::params![lead, at],
        )
        .unwrap();
        db.last_insert_rowid()
    };
    let first = insert(&leads[0], "2024-06-14T10:00:00Z");
    let second = insert(&leads[0], "2024-06-14T10:00:01Z");
    db.execute_batch(&format!(
        "CREATE TABLE failing (on_ INTEGER NOT NULL);
         INSERT INTO failing VALUES (1);
         CREATE TRIGGER refuse_the_outcome BEFORE UPDATE ON outbox
         WHEN OLD.id = {first} AND OLD.state = 'sending' AND NEW.state <> 'sending'
              AND (SELECT on_ FROM failing) = 1
         BEGIN SELECT RAISE(ABORT, 'simulated: database or disk is full'); END;"
    ))
    .unwrap();
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    let sent_to = |lead: &str| {
        env.sandbox
            .deliveries()
            .iter()
            .filter(|d| d.negotiation_id == lead)
            .count()
    };
    common::wait_until(
        "the first row reaches Thumbtack",
        Duration::from_secs(60),
        || sent_to(&leads[0]) >= 1,
    )
    .await;
    // Another negotiation goes on meanwhile, and by the time it is sent the
    // drainer has claimed again with the first outcome still unrecorded.
    let other = insert(&leads[1], "2024-06-14T10:00:00Z");
    common::wait_until(
        "another negotiation is sent",
        Duration::from_secs(60),
        || {
            count(
                &env.sql(),
                &format!("SELECT count(*) FROM outbox WHERE id = {other} AND state = 'sent'"),
            ) == 1
        },
    )
    .await;
    assert_eq!(
        sent_to(&leads[0]),
        1,
        "the second row waits for the first's outcome"
    );
    env.sql().execute("UPDATE failing SET on_ = 0", []).unwrap();
    common::wait_until("both rows recorded sent", Duration::from_secs(60), || {
        count(
            &env.sql(),
            &format!(
                "SELECT count(*) FROM outbox WHERE id IN ({first}, {second}) AND state = 'sent'"
            ),
        ) == 2
    })
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    let d = env.sandbox.deliveries();
    let to_first: Vec<&str> = d
        .iter()
        .filter(|x| x.negotiation_id == leads[0])
        .map(|x| x.partner_status_changed_at.as_str())
        .collect();
    assert_eq!(
        to_first,
        ["2024-06-14T10:00:00Z", "2024-06-14T10:00:01Z"],
        "each row exactly once, in order"
    );
    let (attempts, state): (i64, String) = env
        .sql()
        .query_row(
            &format!("SELECT attempts, state FROM outbox WHERE id = {first}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((attempts, state.as_str()), (1, "sent"));
}

/// `leadsync drain` whose outcome the database refuses until the end: it
/// tries again for the shutdown grace, then fails naming the row, which
/// stays `sending` (sent again by the next drain or start), instead of
/// reporting it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_record_an_outcome_fails_instead_of_reporting_it_sent() {
    let rig = Rig::new(FAST).await;
    let mut settings = DrainSettings::from_config(&rig.session.config);
    settings.shutdown_grace = Duration::from_millis(1500);
    rig.drainer.update(settings, rig.session.client.clone());
    let lead = rig.lead(0, 0);
    let id = rig.insert(&lead, "appt_scheduled", "2024-06-14T10:00:00Z", None);
    rig.env
        .sql()
        .execute_batch(&format!(
            "CREATE TRIGGER refuse_the_outcome BEFORE UPDATE ON outbox
             WHEN OLD.id = {id} AND OLD.state = 'sending' AND NEW.state <> 'sending'
             BEGIN SELECT RAISE(ABORT, 'simulated: database or disk is full'); END;"
        ))
        .unwrap();
    let e = rig
        .drainer
        .drain_once(&CancellationToken::new())
        .await
        .expect_err("the outcome was not recorded");
    let text = format!("{e:#}");
    assert!(text.contains("refused to record"), "{text}");
    assert_eq!(rig.row(id).0, "sending");
    assert_eq!(rig.env.sandbox.deliveries().len(), 1);
}

/// A stop while the database refuses an answered send's outcome (disk full;
/// a trigger standing in for it): the send bound passes, then the database
/// takes writes again before the whole stop's bound. The outcome is still
/// recorded then: the drainer does not return with an answered send
/// unrecorded while there is time left to record it. (Before, it gave up at
/// the send bound: the row stayed `sending` and was sent again at the next
/// start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_before_the_send_bound_is_recorded_after_it_while_time_is_left() {
    let rig = Rig::new(FAST).await;
    let lead = rig.lead(0, 0);
    let id = rig.insert(&lead, "appt_scheduled", "2024-06-14T10:00:00Z", None);
    rig.env
        .sql()
        .execute_batch(&format!(
            "CREATE TABLE failing (on_ INTEGER NOT NULL);
             INSERT INTO failing VALUES (1);
             CREATE TRIGGER refuse_the_outcome BEFORE UPDATE ON outbox
             WHEN OLD.id = {id} AND OLD.state = 'sending' AND NEW.state <> 'sending'
                  AND (SELECT on_ FROM failing) = 1
             BEGIN SELECT RAISE(ABORT, 'simulated: database or disk is full'); END;"
        ))
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        rig.drainer
            .clone()
            .run(stop.clone(), Arc::new(leadsync::time::Heartbeat::new())),
    );
    common::wait_until(
        "Thumbtack took the row and its outcome waits to be recorded",
        Duration::from_secs(60),
        || rig.env.sandbox.deliveries().len() == 1 && rig.drainer.unrecorded() == 1,
    )
    .await;
    let sends_by = std::time::Instant::now() + Duration::from_millis(800);
    rig.drainer.stop_sends_by(sends_by);
    // The recording bound far past the send bound (the daemon sets it from
    // its own deadline): by default 1.5 s after it, a window a loaded
    // machine could miss between the database taking writes again and the
    // drainer's next try, failing the test with the behaviour intact.
    rig.drainer
        .stop_records_by(sends_by + Duration::from_secs(20));
    stop.cancel();
    // Past the send bound (the drainer must still be at work: the answer is
    // not recorded), the database takes writes again.
    common::wait_until("the send bound has passed", Duration::from_secs(30), || {
        run.is_finished() || std::time::Instant::now() >= sends_by + Duration::from_millis(50)
    })
    .await;
    assert!(
        !run.is_finished(),
        "the drainer stopped with an answered send unrecorded, time left before the stop's bound"
    );
    rig.env
        .sql()
        .execute("UPDATE failing SET on_ = 0", [])
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the drainer ends by its bound")
        .unwrap();
    assert_eq!(rig.row(id).0, "sent", "the answer is recorded");
    assert_eq!(rig.drainer.unrecorded(), 0);
    assert_eq!(rig.env.sandbox.deliveries().len(), 1);
}

/// A request still without an answer at the stop's send bound is given up
/// there (nothing can tell whether Thumbtack took it): the drainer does not
/// spend the recording reserve waiting for it, and the row stays `sending`
/// (named in the log, sent again at the next start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_an_answer_at_the_send_bound_is_given_up_there() {
    // The answer (60 s away, within the 60 s request timeout) and the
    // recording bound (20 s after the send bound, set below) both far from
    // the send bound: a drainer that waited for either ends 20 s or more
    // after it, one that gave up there within a few seconds even on a
    // loaded machine. (With 4 s of latency, the default 1.5 s reserve and a
    // 1 s allowance, the test failed when the machine was slow to end the
    // run.)
    let rig = Rig::new(
        &FAST
            .replace("timeout_secs = 5", "timeout_secs = 60")
            .replace("shutdown_timeout_secs = 8", "shutdown_timeout_secs = 63"),
    )
    .await;
    let lead = rig.lead(0, 0);
    let id = rig.insert(&lead, "appt_scheduled", "2024-06-14T10:00:00Z", None);
    rig.env.sandbox.set_faults(Faults {
        latency_ms: 60_000,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(
        rig.drainer
            .clone()
            .run(stop.clone(), Arc::new(leadsync::time::Heartbeat::new())),
    );
    common::wait_until("the request is out", Duration::from_secs(60), || {
        rig.env
            .sandbox
            .stats()
            .by_route
            .get("job-status")
            .is_some_and(|n| *n == 1)
    })
    .await;
    let sends_by = std::time::Instant::now() + Duration::from_millis(300);
    rig.drainer.stop_sends_by(sends_by);
    rig.drainer
        .stop_records_by(sends_by + Duration::from_secs(20));
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the drainer ends")
        .unwrap();
    let ended = std::time::Instant::now();
    assert!(
        ended < sends_by + Duration::from_secs(10),
        "given up at the send bound, not at the recording bound ({:?} after it)",
        ended - sends_by
    );
    assert_eq!(rig.row(id).0, "sending", "sent again at the next start");
}

/// Thumbtack takes a transition and the connection drops before its answer
/// (the sandbox's `lose_after_accept`): nothing can tell it was taken, so
/// the row is retried — never dead, never lost — with the same instant; the
/// later row of its negotiation waits until it is recorded sent, so the
/// negotiation's transitions still reach Thumbtack in order (the first one
/// twice: at least once). A reply is retried the same way, and found in
/// its lead's conversation instead of posted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_after_thumbtack_acted_is_retried_in_order() {
    let rig = Rig::new(FAST).await;
    let lead = rig.lead(0, 0);
    let first = rig.insert(&lead, "appt_scheduled", "2024-06-14T10:00:00Z", None);
    let second = rig.insert(&lead, "job_complete", "2024-06-14T11:00:00Z", Some(12500));
    let db = rig.env.sql();
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'On my way')",
        [&lead],
    )
    .unwrap();
    let reply = db.last_insert_rowid();
    rig.env.sandbox.set_faults(Faults {
        lose_after_accept: 1.0,
        ..Default::default()
    });
    let s = rig.drain().await;
    assert_eq!((s.sent, s.retried, s.dead), (0, 2, 0), "{s:?}");
    assert_eq!(rig.env.sandbox.deliveries().len(), 1, "taken by Thumbtack");
    assert_eq!(rig.env.sandbox.replies().len(), 1, "taken by Thumbtack");
    let (state, attempts, http, error, _) = rig.row(first);
    assert_eq!((state.as_str(), attempts, http), ("pending", 1, None));
    assert!(error.is_some(), "the lost answer is recorded");
    assert_eq!(rig.row(second).0, "pending", "held back by the first");
    rig.env.sandbox.set_faults(Faults::default());
    db.execute_batch(
        "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE state = 'pending';
         UPDATE message_outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE state = 'pending';",
    )
    .unwrap();
    let s = rig.drain().await;
    assert_eq!((s.sent, s.retried, s.dead), (3, 0, 0), "{s:?}");
    let sent: Vec<(String, String)> = rig
        .env
        .sandbox
        .deliveries()
        .iter()
        .map(|d| (d.partner_status_changed_at.clone(), d.status.clone()))
        .collect();
    assert_eq!(
        sent,
        [
            ("2024-06-14T10:00:00Z".into(), "appt_scheduled".into()),
            ("2024-06-14T10:00:00Z".into(), "appt_scheduled".into()),
            ("2024-06-14T11:00:00Z".into(), "job_complete".into()),
        ],
        "in order, the first twice with its own instant"
    );
    assert_eq!(rig.row(first).0, "sent");
    assert_eq!(rig.row(first).1, 2);
    assert_eq!(rig.row(second).0, "sent");
    assert_eq!(
        count(&db, &format!("SELECT late FROM outbox WHERE id = {second}")),
        0
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM outbox_attempts WHERE outbox_id = {first}
                  AND ((attempt = 1 AND outcome = 'retry' AND http_status IS NULL)
                    OR (attempt = 2 AND outcome = 'sent' AND http_status = 200))"
            )
        ),
        2
    );
    let state: String = db
        .query_row(
            "SELECT state FROM message_outbox WHERE id = ?1",
            [reply],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, "sent");
    // A reply is not posted again when its conversation shows it (README,
    // Messages).
    assert_eq!(
        rig.env.sandbox.replies().len(),
        1,
        "a reply whose answer was lost is found in its conversation"
    );
}

/// Thumbtack accepts a transition and a reply, its 2xx status and headers
/// arrive, then the connection drops before the body (the sandbox's
/// `cut_body_after_accept`): the status says Thumbtack acted, so the rows
/// are sent (no message id), not retried — a retry posted the reply to the
/// customer again, up to `max_attempts` times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_is_cut_is_sent_not_retried() {
    let rig = Rig::new(FAST).await;
    let lead = rig.lead(0, 0);
    let first = rig.insert(&lead, "appt_scheduled", "2024-06-14T10:00:00Z", None);
    let db = rig.env.sql();
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'On my way')",
        [&lead],
    )
    .unwrap();
    let reply = db.last_insert_rowid();
    rig.env.sandbox.set_faults(Faults {
        cut_body_after_accept: 1.0,
        ..Default::default()
    });
    let s = rig.drain().await;
    assert_eq!(
        (s.sent, s.retried, s.dead),
        (2, 0, 0),
        "{s:?} {:?}",
        rig.row(first)
    );
    assert_eq!(rig.env.sandbox.deliveries().len(), 1);
    assert_eq!(rig.env.sandbox.replies().len(), 1);
    let (state, attempts, http, _, _) = rig.row(first);
    assert_eq!((state.as_str(), attempts, http), ("sent", 1, Some(200)));
    let (state, attempts, message_id): (String, i64, Option<String>) = db
        .query_row(
            "SELECT state, attempts, message_id FROM message_outbox WHERE id = ?1",
            [reply],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), attempts, message_id), ("sent", 1, None));
    // Nothing is left to send: another drain posts nothing again.
    db.execute_batch(
        "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE state = 'pending';
         UPDATE message_outbox SET next_attempt_at = '2000-01-01T00:00:00.000Z' WHERE state = 'pending';",
    )
    .unwrap();
    let s = rig.drain().await;
    assert_eq!((s.sent, s.retried), (0, 0), "{s:?}");
    assert_eq!(
        rig.env.sandbox.replies().len(),
        1,
        "the customer got one copy"
    );
}

/// `leadsync drain` after a 429: while the rate budget is paused nothing is
/// claimed, as in the daemon — a row claimed then sat `sending` for the
/// whole `Retry-After` (up to `backoff_max_secs`, an hour by default),
/// waiting for its turn, where a kill left it with an attempt counted that
/// was never sent. The rows due go once the pause is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_claims_nothing_while_a_429_pauses_the_budget() {
    let rig = Rig::new(&FAST.replace("concurrency = 4", "concurrency = 1")).await;
    let first = rig.insert(
        &rig.lead(0, 0),
        "appt_scheduled",
        "2024-06-14T10:00:00Z",
        None,
    );
    let others: Vec<i64> = (1..3)
        .map(|i| {
            rig.insert(
                &rig.lead(0, i),
                "appt_scheduled",
                "2024-06-14T10:00:00Z",
                None,
            )
        })
        .collect();
    rig.env.sandbox.set_faults(Faults {
        rate_429: 1.0,
        retry_after_secs: 2,
        ..Default::default()
    });
    let drainer = rig.drainer.clone();
    let drain = tokio::spawn(async move { drainer.drain_once(&CancellationToken::new()).await });
    common::wait_until("the first answer is a 429", Duration::from_secs(60), || {
        rig.env.sandbox.stats().faults_injected >= 1
    })
    .await;
    rig.env.sandbox.set_faults(Faults::default());
    let budget = rig.session.client.budget().clone();
    let db = rig.env.sql();
    common::wait_until("the drain ends", Duration::from_secs(60), || {
        // (The row answered 429 is `sending` until its outcome is recorded.)
        let sending = count(
            &db,
            &format!("SELECT count(*) FROM outbox WHERE state = 'sending' AND id <> {first}"),
        );
        let paused = budget.paused_for().unwrap_or_default();
        assert!(
            sending == 0 || paused < Duration::from_millis(300),
            "{sending} row(s) held `sending` while the budget is paused for {paused:?} more"
        );
        drain.is_finished()
    })
    .await;
    let s = drain.await.unwrap().unwrap();
    assert_eq!((s.sent, s.retried), (2, 1), "{s:?}");
    assert_eq!(rig.row(first).2, Some(429));
    for id in others {
        assert_eq!(rig.row(id).0, "sent");
    }
}
