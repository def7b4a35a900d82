//! The poller: passes into the mirror, change tracking, early stop,
//! isolation of failing businesses, whole pages only, no overlap.

mod common;

use common::{Env, FAST, count, text};
use leadsync::app::Session;
use leadsync::sandbox::{Faults, Mutation, SandboxOptions};
use leadsync::sync::{PassOutcome, PassSettings, ScanKind, sync_business};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SETTINGS: PassSettings = PassSettings {
    page_size: 10,
    stop_after_unchanged_pages: 1,
    accept_missing: false,
};

async fn pass(s: &Session, business: &str, kind: ScanKind) -> leadsync::sync::PassReport {
    sync_business(
        &s.store,
        &s.client,
        business,
        kind,
        SETTINGS,
        &CancellationToken::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_mirrors_every_lead_exactly() {
    let env = Env::small().await;
    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("60 new"), "{}", text(&o));
    let db = env.sql();
    for b in env.business_ids() {
        assert_eq!(
            count(
                &db,
                &format!("SELECT count(*) FROM negotiations WHERE business_id = '{b}'")
            ),
            60
        );
        for id in env.sandbox.lead_ids(&b) {
            let payload: String = db
                .query_row(
                    "SELECT payload FROM negotiations WHERE negotiation_id = ?1",
                    [&id],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(
                Some(payload),
                env.sandbox.lead_json(&id),
                "payload of {id} byte for byte"
            );
        }
    }
    // Every lead has created_at, whichever field name it came with.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE created_at IS NULL"
        ),
        0
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE payload LIKE '%\"createdAt\"%'"
        ) > 0
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE payload LIKE '%\"createTime\"%'"
        ) > 0
    );
    // json_extract reaches unknown nested fields; 64-bit integers survive.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE json_extract(payload, '$.sandboxExtension.nested.deep[1].k') = 'v'"
        ),
        180
    );
    let big: i64 = db
        .query_row(
            "SELECT min(json_extract(payload, '$.sandboxExtension.bigNumber')) FROM negotiations",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(big, 9_007_199_254_740_993);
    assert!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE customer_name IN ('Zoë Ø.', '李雷', 'Noa 🌵 B.')"
        ) > 0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sync_runs WHERE outcome = 'ok' AND kind = 'full' AND pages = 6 AND inserted = 60"
        ),
        3
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiation_changes WHERE kind = 'new'"
        ),
        180
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM businesses WHERE last_sync_outcome = 'ok' AND last_full_sync_at IS NOT NULL"
        ),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_changed_removed_and_reappearing_leads() {
    let env = Env::small().await;
    let s = common::open_session(env.config()).await;
    let b = env.business_ids()[0].clone();
    assert!(pass(&s, &b, ScanKind::Full).await.is_ok());
    let ids = env.sandbox.lead_ids(&b);

    let added = env
        .sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 3,
        })
        .unwrap();
    env.sandbox
        .mutate(Mutation::SetStatus {
            negotiation_id: ids[0].clone(),
            status: "Hired".into(),
        })
        .unwrap();
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[5].clone(),
        })
        .unwrap();
    // A change deep in the list: only a full scan reads that far.
    env.sandbox
        .mutate(Mutation::DeepChange {
            negotiation_id: ids[55].clone(),
        })
        .unwrap();

    let head = pass(&s, &b, ScanKind::Head).await;
    let PassOutcome::Ok(h) = &head.outcome else {
        panic!("{}", head.summary())
    };
    assert_eq!((h.inserted, h.updated), (3, 1), "{}", head.summary());

    let full = pass(&s, &b, ScanKind::Full).await;
    let PassOutcome::Ok(f) = &full.outcome else {
        panic!("{}", full.summary())
    };
    assert_eq!(
        (f.inserted, f.updated, f.missing),
        (0, 1, 1),
        "{}",
        full.summary()
    );

    let db = env.sql();
    let status: String = db
        .query_row(
            "SELECT status FROM negotiations WHERE negotiation_id = ?1",
            [&ids[0]],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "Hired");
    let (old, new): (String, String) = db
        .query_row(
            "SELECT old_status, new_status FROM negotiation_changes WHERE negotiation_id = ?1 AND kind = 'changed'",
            [&ids[0]],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_ne!(old, "Hired");
    assert_eq!(new, "Hired");
    let fields: String = db
        .query_row("SELECT changed_fields FROM negotiation_changes WHERE negotiation_id = ?1 AND kind = 'changed'", [&ids[55]], |r| r.get(0))
        .unwrap();
    // The zip code lives in `request` (schema shape) or `customer` (docs shape).
    let holder = if env
        .sandbox
        .lead_json(&ids[55])
        .unwrap()
        .contains(r#""request":{"#)
    {
        "request"
    } else {
        "customer"
    };
    assert_eq!(fields, format!(r#"["{holder}","sandboxExtension"]"#));
    for id in &added {
        assert_eq!(
            count(
                &db,
                &format!(
                    "SELECT count(*) FROM negotiations WHERE negotiation_id = '{id}' AND missing_since IS NULL"
                )
            ),
            1
        );
    }
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiations WHERE negotiation_id = '{}' AND missing_since IS NOT NULL",
                ids[5]
            )
        ),
        1
    );

    // It comes back: missing_since is cleared and the reappearance recorded.
    env.sandbox
        .mutate(Mutation::Restore {
            negotiation_id: ids[5].clone(),
        })
        .unwrap();
    let full = pass(&s, &b, ScanKind::Full).await;
    assert!(full.is_ok(), "{}", full.summary());
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiations WHERE negotiation_id = '{}' AND missing_since IS NULL",
                ids[5]
            )
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiation_changes WHERE negotiation_id = '{}' AND kind IN ('missing', 'reappeared')",
                ids[5]
            )
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_unchanged_leads_writes_nothing_to_them() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let db = env.sql();
    db.execute_batch(
        "CREATE TABLE test_writes (n INTEGER);
         CREATE TRIGGER test_count_updates AFTER UPDATE ON negotiations BEGIN INSERT INTO test_writes VALUES (1); END;
         CREATE TRIGGER test_count_inserts AFTER INSERT ON negotiations BEGIN INSERT INTO test_writes VALUES (1); END;",
    )
    .unwrap();
    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("0 new, 0 changed, 60 unchanged"),
        "{}",
        text(&o)
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM test_writes"),
        0,
        "no lead row was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scan_writes_what_changed_since_it_was_mirrored_and_refreshes_last_seen_hourly() {
    // A full scan reads the business's known leads once and writes only the
    // leads that differ from them: each way a stored row can differ from
    // its listing must still be written, and nothing else.
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let db = env.sql();
    let ids: Vec<String> = db
        .prepare("SELECT negotiation_id FROM negotiations ORDER BY negotiation_id LIMIT 5")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let at = |i: usize| ids[i].as_str();
    // 0: seen more than an hour ago; 1: seen just now (not due); 2: a stored
    // payload another writer altered; 3: missing; 4: stored in odd forms.
    db.execute(
        "UPDATE negotiations SET last_seen_at = '2020-01-01T00:00:00.000Z' WHERE negotiation_id = ?1",
        [at(0)],
    )
    .unwrap();
    db.execute(
        "UPDATE negotiations SET payload = '{}', payload_hash = 1 WHERE negotiation_id = ?1",
        [at(2)],
    )
    .unwrap();
    db.execute(
        "UPDATE negotiations SET missing_since = '2020-01-01T00:00:00.000Z' WHERE negotiation_id = ?1",
        [at(3)],
    )
    .unwrap();
    db.execute(
        "UPDATE negotiations SET last_seen_at = '2020-01-01 00:00:00' WHERE negotiation_id = ?1",
        [at(4)],
    )
    .unwrap();
    let fresh: String = db
        .query_row(
            "SELECT last_seen_at FROM negotiations WHERE negotiation_id = ?1",
            [at(1)],
            |r| r.get(0),
        )
        .unwrap();
    let before = count(&db, "SELECT count(*) FROM negotiation_changes");
    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("0 new, 2 changed, 58 unchanged"),
        "{}",
        text(&o)
    );
    let last_seen = |id: &str| -> String {
        db.query_row(
            "SELECT last_seen_at FROM negotiations WHERE negotiation_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!(last_seen(at(0)).as_str() > "2021", "refreshed when due");
    assert_eq!(last_seen(at(1)), fresh, "not refreshed before it is due");
    assert!(
        last_seen(at(4)).as_str() > "2021",
        "an odd form is refreshed"
    );
    let payload_ok = count(
        &db,
        &format!(
            "SELECT count(*) FROM negotiations WHERE negotiation_id = '{}' AND payload <> '{{}}'",
            at(2)
        ),
    );
    assert_eq!(payload_ok, 1, "the altered payload was written back");
    let missing = count(
        &db,
        &format!(
            "SELECT count(*) FROM negotiations WHERE negotiation_id = '{}' AND missing_since IS NULL",
            at(3)
        ),
    );
    assert_eq!(missing, 1, "the missing lead reappeared");
    let kinds: Vec<String> = db
        .prepare("SELECT kind FROM negotiation_changes WHERE id > ?1 ORDER BY id")
        .unwrap()
        .query_map([before], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut sorted = kinds.clone();
    sorted.sort();
    assert_eq!(sorted, ["changed", "reappeared"], "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_scan_stops_at_the_first_page_without_news() {
    let env = Env::small().await;
    let s = common::open_session(env.config()).await;
    let ids = env.business_ids();
    for b in &ids {
        assert!(pass(&s, b, ScanKind::Full).await.is_ok());
    }
    let before = env.sandbox.list_requests(&ids[0]);
    let head = pass(&s, &ids[0], ScanKind::Head).await;
    assert!(head.is_ok());
    assert_eq!(
        env.sandbox.list_requests(&ids[0]) - before,
        1,
        "nothing new: one page read"
    );

    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: ids[0].clone(),
            count: 25,
        })
        .unwrap();
    let before = env.sandbox.list_requests(&ids[0]);
    let head = pass(&s, &ids[0], ScanKind::Head).await;
    let PassOutcome::Ok(h) = &head.outcome else {
        panic!("{}", head.summary())
    };
    assert_eq!(h.inserted, 25);
    // Pages 1-3 bring the 25 new leads, page 4 nothing: four requests of the 9 pages.
    assert_eq!(
        env.sandbox.list_requests(&ids[0]) - before,
        4,
        "{}",
        head.summary()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_business_does_not_stop_the_others() {
    let env = Env::small().await;
    let ids = env.business_ids();
    let tokens = env.dir.path().join("fixture/tokens");
    std::fs::write(tokens.join(&ids[0]), "revoked-token\n").unwrap(); // 401, refused for good
    std::fs::write(
        tokens.join(&ids[1]),
        env.sandbox.static_token(&ids[2]).unwrap(),
    )
    .unwrap(); // 403
    let o = env.run(&["sync", "--full"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("{}: FAILED", ids[0])) && t.contains("re-authorization"),
        "{t}"
    );
    assert!(
        t.contains(&format!("{}: FAILED", ids[1])) && t.contains("403"),
        "{t}"
    );
    assert!(t.contains(&format!("{}: ok", ids[2])), "{t}");
    assert!(t.contains("2 of 3 businesses failed"), "{t}");
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiations WHERE business_id = '{}'",
                ids[2]
            )
        ),
        60
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT needs_reauth FROM businesses WHERE business_id = '{}'",
                ids[0]
            )
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM businesses WHERE business_id = '{}' AND last_sync_outcome = 'error' AND last_error LIKE '%403%'",
                ids[1]
            )
        ),
        1
    );

    // Only the selected business, and a clear error for an unknown one.
    let o = env.run(&["sync", "--business", &ids[2]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = env.run(&["sync", "--business", "123"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("business 123 is not in the configuration"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_page_fails_the_pass_without_a_partial_page() {
    let env = Env::small().await;
    env.sandbox.set_faults(Faults {
        malformed: 0.25,
        ..Default::default()
    });
    for _ in 0..3 {
        env.run(&["sync", "--full"]);
    }
    let db = env.sql();
    assert!(
        count(
            &db,
            "SELECT count(*) FROM sync_runs WHERE outcome = 'error' AND error LIKE '%unreadable%'"
        ) > 0
    );
    for b in env.business_ids() {
        let n = count(
            &db,
            &format!("SELECT count(*) FROM negotiations WHERE business_id = '{b}'"),
        );
        assert_eq!(
            n % 10,
            0,
            "business {b} has {n} leads: only whole pages of 10 are written"
        );
        // A failed full scan never marks leads missing.
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM negotiations WHERE missing_since IS NOT NULL"
            ),
            0
        );
    }
    // Once the faults stop, the next pass completes the mirror.
    env.sandbox.set_faults(Faults::default());
    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(count(&db, "SELECT count(*) FROM negotiations"), 180);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_passes_of_a_business_never_overlap() {
    let overrides = FAST.replace(
        "[poll]\npage_size = 10\n",
        "[poll]\npage_size = 10\nschedule = \"* * * * * *\"\nfull_schedule = \"0 0 0 1 1 *\"\nstop_after_unchanged_pages = 100\n",
    );
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            ..Default::default()
        },
        false,
        &overrides,
    )
    .await;
    // Each pass reads 6 pages at 250 ms: longer than the one-second schedule.
    env.sandbox.set_faults(Faults {
        latency_ms: 250,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    let db = env.database();
    common::wait_until("four finished passes", Duration::from_secs(30), || {
        rusqlite::Connection::open(&db)
            .ok()
            .and_then(|c| {
                c.query_row(
                    "SELECT count(*) FROM sync_runs WHERE outcome = 'ok'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
            })
            .is_some_and(|n| n >= 4)
    })
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    let runs: Vec<(String, String)> = {
        let c = env.sql();
        let mut st = c.prepare("SELECT started_at, finished_at FROM sync_runs WHERE finished_at IS NOT NULL ORDER BY started_at").unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "passes overlap: {pair:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_page_write_ends_a_full_scan_at_once_with_whole_pages_only() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 400,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let id = env.business_ids()[0].clone();
    let s = common::open_session(env.config()).await;
    // The mirror refuses leads past the 55th: the batch holding it fails.
    env.sql()
        .execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON negotiations
               WHEN (SELECT count(*) FROM negotiations) >= 55
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), pass(&s, &id, ScanKind::Full))
        .await
        .expect("the pass ends");
    match &report.outcome {
        PassOutcome::Failed(_, e) => assert!(
            e.contains("cannot write page") && e.contains("refused by the test"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    let db = env.sql();
    let n = count(&db, "SELECT count(*) FROM negotiations");
    assert!(n <= 55 && n % 10 == 0, "{n} leads: whole pages only");
    assert_eq!(
        count(&db, "SELECT count(*) FROM negotiation_changes"),
        n,
        "one change row per lead written"
    );
    // The fetcher stopped with the writer: not all 40 pages were read.
    assert!(
        env.sandbox.list_requests(&id) < 40,
        "{} pages requested",
        env.sandbox.list_requests(&id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_error_after_pages_fetched_ahead_writes_them_and_marks_nothing_missing() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 2_000,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let id = env.business_ids()[0].clone();
    let s = common::open_session(env.config()).await;
    assert!(matches!(
        pass(&s, &id, ScanKind::Full).await.outcome,
        PassOutcome::Ok(_)
    ));
    let before = env.sandbox.list_requests(&id);
    let db = env.sql();
    // Every lead is due for its hourly `last_seen_at` refresh, so that the
    // second pass writes every page it reads: a pass finding every lead as
    // it was writes nothing, and the lock below would hold no writer (its
    // fetcher then raced through all 200 pages before the listing broke,
    // and the pass succeeded).
    db.execute(
        "UPDATE negotiations SET last_seen_at = '2000-01-01T00:00:00.000Z'",
        [],
    )
    .unwrap();
    // The pass's writer waits for another writer while its fetcher runs
    // ahead; then the listing breaks. Until the writer is held, each page
    // takes 200 ms, so that the pass is still near its start when it is
    // (on a loaded machine the test took the lock only once the pass was
    // near its end). Once held, the fetcher is bounded by PAGES_AHEAD.
    env.sandbox.set_faults(Faults {
        latency_ms: 200,
        ..Default::default()
    });
    let running = {
        let id = id.clone();
        tokio::spawn(async move { pass(&s, &id, ScanKind::Full).await })
    };
    common::wait_until("the second pass started", Duration::from_secs(30), || {
        count(&db, "SELECT count(*) FROM sync_runs") == 2
    })
    .await;
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    env.sandbox.set_faults(Faults::default());
    let locked_at = env.sandbox.list_requests(&id);
    assert!(
        locked_at - before < 150,
        "{} of 200 pages read before the writer was held",
        locked_at - before
    );
    common::wait_until("pages fetched ahead", Duration::from_secs(30), || {
        env.sandbox.list_requests(&id) >= locked_at + 5
    })
    .await;
    env.sandbox.set_faults(Faults {
        malformed: 1.0,
        ..Default::default()
    });
    db.execute_batch("COMMIT").unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the pass ends")
        .unwrap();
    let fetched = env.sandbox.list_requests(&id) - before;
    match &report.outcome {
        PassOutcome::Failed(stats, e) => {
            assert!(e.contains("unreadable"), "{e}");
            // Every page read before the broken one was written, whole.
            assert_eq!(stats.pages as u64, fetched - 1, "{stats:?}");
            assert_eq!(stats.seen, stats.pages * 10, "{stats:?}");
        }
        other => panic!("{other:?}"),
    }
    // ... and written: exactly their leads were seen again.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE last_seen_at > '2001'"
        ) as u64,
        (fetched - 1) * 10
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sync_runs WHERE outcome = 'error' AND pages = seen / 10"
        ),
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE missing_since IS NOT NULL"
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_of_several_pages_names_every_page_it_held() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 2_000,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let id = env.business_ids()[0].clone();
    let s = common::open_session(env.config()).await;
    // Until the writer is held, each page takes 200 ms, so that the pass is
    // still near its start when it is (on a loaded machine the test took
    // the lock only once the pass was near its end, or past it).
    env.sandbox.set_faults(Faults {
        latency_ms: 200,
        ..Default::default()
    });
    let running = {
        let id = id.clone();
        tokio::spawn(async move { pass(&s, &id, ScanKind::Full).await })
    };
    // The pass's writer is held while its fetcher runs ahead, so that the
    // pages waiting go into one transaction; the third of them is refused.
    // Its second page is asked for only once the business's known leads
    // are read (a read the held lock would otherwise queue behind a write).
    let lock = env.sql();
    common::wait_until("the pass started", Duration::from_secs(30), || {
        count(&lock, "SELECT count(*) FROM sync_runs") == 1 && env.sandbox.list_requests(&id) >= 2
    })
    .await;
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    env.sandbox.set_faults(Faults::default());
    let written = count(&lock, "SELECT count(*) FROM negotiations");
    assert!(
        written < 1_500,
        "{written} of 2000 leads written before the writer was held"
    );
    lock.execute_batch(&format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON negotiations
           WHEN (SELECT count(*) FROM negotiations) >= {}
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        written + 25
    ))
    .unwrap();
    let held_at = env.sandbox.list_requests(&id);
    common::wait_until("pages fetched ahead", Duration::from_secs(30), || {
        env.sandbox.list_requests(&id) >= held_at + 8
    })
    .await;
    lock.execute_batch("COMMIT").unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the pass ends")
        .unwrap();
    // The page refused is the third after those written when the writer
    // was held; it went into one transaction with other pages, all rolled
    // back together, and the error names them all.
    let refused = written / 10 + 3;
    let e = match &report.outcome {
        PassOutcome::Failed(_, e) => e.clone(),
        other => panic!("{other:?}"),
    };
    let held = e
        .strip_prefix("cannot write pages ")
        .and_then(|r| r.split(':').next())
        .and_then(|r| r.split_once('–'))
        .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)));
    assert!(
        held.is_some_and(|(a, b)| a < b && (a..=b).contains(&refused)),
        "page {refused} refused: {e}"
    );
    assert!(e.contains("refused by the test"), "{e}");
    // Whole pages only: those before the failed transaction.
    let first_held = held.map_or(0, |(a, _)| a);
    assert_eq!(
        count(&lock, "SELECT count(*) FROM negotiations"),
        (first_held - 1) * 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_full_scan_ends_after_the_page_in_flight_and_keeps_whole_pages() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 2_000,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    env.sandbox.set_faults(Faults {
        latency_ms: 100,
        ..Default::default()
    });
    let id = env.business_ids()[0].clone();
    let s = common::open_session(env.config()).await;
    let stop = CancellationToken::new();
    let running = {
        let (id, stop) = (id.clone(), stop.clone());
        tokio::spawn(async move {
            sync_business(&s.store, &s.client, &id, ScanKind::Full, SETTINGS, &stop).await
        })
    };
    common::wait_until("a few pages read", Duration::from_secs(30), || {
        env.sandbox.list_requests(&id) >= 3
    })
    .await;
    stop.cancel();
    let at_stop = env.sandbox.list_requests(&id);
    let report = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the pass ends soon after the stop")
        .unwrap();
    // At most the request already on its way when the stop came.
    let requested = env.sandbox.list_requests(&id);
    assert!(requested <= at_stop + 1, "{at_stop} then {requested}");
    match &report.outcome {
        PassOutcome::Failed(stats, e) => {
            assert!(e.contains("interrupted by shutdown"), "{e}");
            // Every page read was written, whole.
            assert!(stats.pages as u64 + 1 >= requested, "{stats:?}");
        }
        other => panic!("{other:?}"),
    }
    let db = env.sql();
    let n = count(&db, "SELECT count(*) FROM negotiations");
    assert_eq!(n % 10, 0, "{n} leads: whole pages only");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE missing_since IS NOT NULL"
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_full_scan_ends_without_waiting_for_the_page_in_flight() {
    let overrides = common::FAST
        .replace("timeout_secs = 5", "timeout_secs = 60")
        .replace("shutdown_timeout_secs = 8", "shutdown_timeout_secs = 63");
    let env = Env::new(SandboxOptions::default(), false, &overrides).await;
    let s = std::sync::Arc::new(common::open_session(env.config()).await);
    let b = env.business_ids()[0].clone();
    // Every page takes 20 s: a pass that waits for the page in flight
    // after the stop takes that long.
    env.sandbox.set_faults(Faults {
        latency_ms: 20_000,
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let pass = {
        let (s, b, stop) = (s.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            sync_business(&s.store, &s.client, &b, ScanKind::Full, SETTINGS, &stop).await
        })
    };
    common::wait_until("the first page requested", Duration::from_secs(30), || {
        env.sandbox.list_requests(&b) >= 1
    })
    .await;
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(8), pass)
        .await
        .expect("the pass waited for the page in flight after the stop")
        .unwrap();
    match &report.outcome {
        PassOutcome::Failed(_, why) => assert!(why.contains("interrupted"), "{why}"),
        o => panic!("expected an interrupted pass, got {o:?}"),
    }
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sync_runs WHERE outcome = 'error' AND error LIKE '%interrupted%'"
        ),
        1
    );
}

/// A small sandbox's first business mirrored by a full pass, then its
/// newest lead (first page) changed on Thumbtack to `Picked`: the
/// environment, business, session, lead id, the lead as now listed, and a
/// delivery's `data` for it as an event triggered later says it (`Canceled`).
async fn changed_on_thumbtack() -> (Env, String, std::sync::Arc<Session>, String, String, String) {
    let env = Env::small().await;
    let b = env.business_ids()[0].clone();
    let s = std::sync::Arc::new(common::open_session(env.config()).await);
    assert!(pass(&s, &b, ScanKind::Full).await.is_ok());
    let x = env.sandbox.lead_ids(&b)[0].clone();
    env.sandbox
        .mutate(Mutation::SetStatus {
            negotiation_id: x.clone(),
            status: "Picked".into(),
        })
        .unwrap();
    let listed = env.sandbox.lead_json(&x).unwrap();
    let data = format!(
        "{{\"businessID\":\"{b}\",{}",
        &listed.replace("\"status\":\"Picked\"", "\"status\":\"Canceled\"")[1..]
    );
    (env, b, s, x, listed, data)
}

/// The mirrored status of lead `x`.
fn status_of(env: &Env, x: &str) -> String {
    env.sql()
        .query_row(
            "SELECT status FROM negotiations WHERE negotiation_id = ?1",
            [x],
            |r| r.get(0),
        )
        .unwrap()
}

/// A pass of `kind` over business `b`, running in a task of its own.
fn spawn_pass(
    s: &std::sync::Arc<Session>,
    b: &str,
    kind: ScanKind,
) -> tokio::task::JoinHandle<leadsync::sync::PassReport> {
    let (s, b) = (s.clone(), b.to_string());
    tokio::spawn(async move { pass(&s, &b, kind).await })
}

/// A full scan reads pages ahead of writing them. A webhook delivery of an
/// event triggered after a page was read, applied while that page waited
/// for the writer, is newer than the page's copy of its lead: the page must
/// not overwrite it (the next listing, read after the event, is compared
/// as usual).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_read_before_a_delivered_event_does_not_overwrite_the_delivered_copy() {
    let (env, b, s, x, listed, data) = changed_on_thumbtack().await;
    assert!(listed.contains("\"status\":\"Picked\""), "{listed}");
    env.sandbox.set_faults(Faults {
        latency_ms: 1_500,
        ..Default::default()
    });
    let requested = env.sandbox.list_requests(&b);
    let running = spawn_pass(&s, &b, ScanKind::Full);
    common::wait_until("the scan started", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_runs WHERE outcome = 'running'",
        ) == 1
    })
    .await;
    // Hold the writer thread (before the first page, 1.5 s away, reaches
    // it) and apply the delivery there once the third page is asked for:
    // the first page was read more than 1.5 s before the event.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let delivered = {
        let store = s.store.clone();
        tokio::spawn(async move {
            store
                .call(move |conn| {
                    go_rx.recv()?;
                    let body = format!(
                        "{{\"event\":{{\"eventType\":\"NegotiationCreatedV4\",\"webhookID\":\"w\",\
                         \"triggeredAt\":\"{}\"}},\"data\":{data}}}",
                        leadsync::time::now()
                    );
                    let d = leadsync::thumbtack::webhook::parse_delivery(body.as_bytes())
                        .map_err(anyhow::Error::msg)?;
                    let (row, effect) =
                        leadsync::ingest::delivery_effect(d, &body, leadsync::time::now());
                    let rec = leadsync::store::messages::record_delivery(conn, &row, &effect)?;
                    Ok(rec.outcome.as_str().to_string())
                })
                .await
        })
    };
    common::wait_until("the third page asked for", Duration::from_secs(30), || {
        env.sandbox.list_requests(&b) >= requested + 3
    })
    .await;
    env.sandbox.set_faults(Faults::default());
    go_tx.send(()).unwrap();
    let outcome = delivered.await.unwrap().unwrap();
    assert_eq!(outcome, "applied");
    let report = running.await.unwrap();
    assert!(report.is_ok(), "{}", report.summary());
    let status = status_of(&env, &x);
    assert_eq!(
        status, "Canceled",
        "the page read before the event overwrote the delivered copy"
    );
}

/// A listing page reflects the moment the server made it, which may be
/// well before its answer arrives (a slow link, a proxy). An event
/// delivered between those two moments is newer than the page's copy of its
/// lead: the page must not overwrite it. The page's read time was taken
/// when the answer arrived, so such a page rolled the lead back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_made_before_a_delivered_event_but_answered_after_it_does_not_overwrite_it() {
    for kind in [ScanKind::Head, ScanKind::Full] {
        let (env, b, s, x, _, data) = changed_on_thumbtack().await;
        env.sandbox.set_faults(Faults {
            list_hold_ms: 1_500,
            ..Default::default()
        });
        let held = env.sandbox.stats().lists_held;
        let running = spawn_pass(&s, &b, kind);
        // The first page is made (and held back): the event comes after,
        // in a later millisecond than the page's request (a tie is not
        // "after": the page may have been made after the event).
        common::wait_until("the first page made", Duration::from_secs(30), || {
            env.sandbox.stats().lists_held > held
        })
        .await;
        next_millisecond().await;
        env.sandbox.set_faults(Faults::default());
        let outcome = deliver_now(&s, &data).await;
        assert_eq!(outcome, "applied");
        let report = running.await.unwrap();
        assert!(report.is_ok(), "{}", report.summary());
        let status = status_of(&env, &x);
        assert_eq!(
            status, "Canceled",
            "{kind:?}: the page made before the event overwrote the delivered copy"
        );
    }
}

/// Returns once the clock is past the millisecond it was called in: an
/// event stamped after this is later, to the database's millisecond, than
/// anything before the call.
async fn next_millisecond() {
    let called = leadsync::time::now();
    while leadsync::time::now() <= called {
        tokio::task::yield_now().await;
    }
}

/// Applies a `NegotiationCreatedV4` delivery of `data`, triggered now, the
/// way the receiver does; its outcome.
async fn deliver_now(s: &std::sync::Arc<Session>, data: &str) -> String {
    let data = data.to_string();
    s.store
        .call(move |conn| {
            let body = format!(
                "{{\"event\":{{\"eventType\":\"NegotiationCreatedV4\",\"webhookID\":\"w\",\
                 \"triggeredAt\":\"{}\"}},\"data\":{data}}}",
                leadsync::time::now()
            );
            let d = leadsync::thumbtack::webhook::parse_delivery(body.as_bytes())
                .map_err(anyhow::Error::msg)?;
            let (row, effect) = leadsync::ingest::delivery_effect(d, &body, leadsync::time::now());
            let rec = leadsync::store::messages::record_delivery(conn, &row, &effect)?;
            Ok(rec.outcome.as_str().to_string())
        })
        .await
        .unwrap()
}

/// A delivery identical to the mirrored copy changes no column, but it is
/// still a newer observation: a page made before its event must not
/// overwrite the copy it confirmed. (It kept the older event's time, so
/// such a page rolled the lead back until the next listing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identical_delivery_still_outdates_a_page_made_before_it() {
    let (env, b, s, x, _, data) = changed_on_thumbtack().await;
    assert_eq!(deliver_now(&s, &data).await, "applied");
    env.sandbox.set_faults(Faults {
        list_hold_ms: 1_500,
        ..Default::default()
    });
    let held = env.sandbox.stats().lists_held;
    let running = spawn_pass(&s, &b, ScanKind::Head);
    common::wait_until("the first page made", Duration::from_secs(30), || {
        env.sandbox.stats().lists_held > held
    })
    .await;
    next_millisecond().await;
    env.sandbox.set_faults(Faults::default());
    // The same copy again, for an event after the page was made.
    let again = deliver_now(&s, &data).await;
    assert_ne!(again, "applied", "identical: nothing to apply");
    let report = running.await.unwrap();
    assert!(report.is_ok(), "{}", report.summary());
    let status = status_of(&env, &x);
    assert_eq!(
        status, "Canceled",
        "the page made before the identical delivery rolled the lead back"
    );
}

/// Applies a `NegotiationCreatedV4` delivery of `data` for an event
/// triggered at `triggered` (received now), the way the receiver does; its
/// outcome.
async fn deliver_triggered(s: &std::sync::Arc<Session>, data: &str, triggered: &str) -> String {
    let (data, triggered) = (data.to_string(), triggered.to_string());
    s.store
        .call(move |conn| {
            let body = format!(
                "{{\"event\":{{\"eventType\":\"NegotiationCreatedV4\",\"webhookID\":\"w\",\
                 \"triggeredAt\":\"{triggered}\"}},\"data\":{data}}}"
            );
            let d = leadsync::thumbtack::webhook::parse_delivery(body.as_bytes())
                .map_err(anyhow::Error::msg)?;
            let (row, effect) = leadsync::ingest::delivery_effect(d, &body, leadsync::time::now());
            let rec = leadsync::store::messages::record_delivery(conn, &row, &effect)?;
            Ok(rec.outcome.as_str().to_string())
        })
        .await
        .unwrap()
}

/// Now less `secs` seconds, in the database's form.
fn seconds_ago(secs: i64) -> String {
    leadsync::time::fmt(chrono::Utc::now() - chrono::TimeDelta::seconds(secs))
}

/// Dates lead `x`'s mirrored copy `secs` seconds back (`changed_at`, and
/// `webhook_triggered_at` for a delivered copy), as if written then, and
/// every pass so far with it (none listed the lead later).
fn written_ago(env: &Env, x: &str, secs: i64) {
    let at = seconds_ago(secs);
    let sql = env.sql();
    sql.execute(
        "UPDATE sync_runs SET started_at = ?1,
             listed_at = CASE WHEN listed_at IS NOT NULL THEN ?1 END",
        [at.as_str()],
    )
    .unwrap();
    let n = sql
        .execute(
            "UPDATE negotiations SET changed_at = ?2, webhook_triggered_at =
                 CASE WHEN webhook_triggered_at IS NOT NULL THEN ?2 END
             WHERE negotiation_id = ?1",
            [x, at.as_str()],
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// A lead as listed (`business.businessID` in it), as a delivery's
/// `data`, its status `from` changed to `status`.
fn delivered_as(listed: &str, from: &str, status: &str) -> String {
    listed.replace(
        &format!("\"status\":\"{from}\""),
        &format!("\"status\":\"{status}\""),
    )
}

/// The mirror holds a lead as Thumbtack lists it (B). The lead changes (C,
/// an event at t1 whose delivery is held up) and back (B). A pass after
/// that lists B, identical to the mirrored copy: nothing is written, by
/// design. The held-up delivery of t1 then arrives: it is older than that
/// listing, and must not overwrite B with C (it did: it was compared with
/// the mirrored copy's `changed_at`, or its event time, both before t1).
/// For a head scan and a full scan, and for a mirrored copy that came from a
/// listing or from an earlier delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_up_delivery_older_than_a_listing_that_confirmed_the_lead_does_not_overwrite_it() {
    let env = Env::small().await;
    let b = env.business_ids()[0].clone();
    let s = std::sync::Arc::new(common::open_session(env.config()).await);
    let report = pass(&s, &b, ScanKind::Full).await;
    assert!(report.is_ok(), "{}", report.summary());
    let mut rolled_back = Vec::new();
    let mut on_first_page = env.sandbox.lead_ids(&b).into_iter();
    for kind in [ScanKind::Head, ScanKind::Full] {
        for from_delivery in [false, true] {
            // On the first page: a head scan lists it. (One lead a case:
            // the cases before listed it unchanged, and wrote nothing.)
            let x = on_first_page.next().unwrap();
            let listed = env.sandbox.lead_json(&x).unwrap();
            let status = status_of(&env, &x);
            let case = format!("{kind:?}, mirrored copy from a delivery: {from_delivery}");
            if from_delivery {
                next_millisecond().await;
                let t0 = leadsync::time::now();
                next_millisecond().await;
                let same = delivered_as(&listed, &status, &status);
                let outcome = deliver_triggered(&s, &same, &t0).await;
                assert_ne!(outcome, "applied", "{case}: identical");
            }
            // B -> C at t1 (the delivery is held up), C -> B at t2; then a
            // pass lists B, more than a minute (the margin for clocks and
            // listings lagging) after t1: the mirrored copy was written
            // before t1.
            written_ago(&env, &x, 180);
            let t1 = seconds_ago(120);
            let c = delivered_as(&listed, &status, "Canceled");
            let report = pass(&s, &b, kind).await;
            assert!(report.is_ok(), "{case}: {}", report.summary());
            assert_eq!(
                count(
                    &env.sql(),
                    &format!(
                        "SELECT count(*) FROM negotiation_changes WHERE negotiation_id = '{x}'"
                    )
                ),
                1,
                "{case}: the listing was identical"
            );
            let outcome = deliver_triggered(&s, &c, &t1).await;
            if status_of(&env, &x) != status || outcome != "duplicate" {
                rolled_back.push(format!("{case} ({outcome})"));
                continue;
            }
            // An event after that listing is newer: applied.
            next_millisecond().await;
            let t4 = leadsync::time::now();
            next_millisecond().await;
            assert_eq!(deliver_triggered(&s, &c, &t4).await, "applied", "{case}");
            assert_eq!(status_of(&env, &x), "Canceled", "{case}");
        }
    }
    assert!(
        rolled_back.is_empty(),
        "the held-up delivery overwrote the newer listing: {rolled_back:?}"
    );
}

/// A head scan lists the newest leads only: a pass that did not list a
/// lead confirmed nothing of it, and a delivery of an event after its
/// mirrored copy (and before that pass) is still applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_scan_confirms_only_the_leads_it_listed() {
    let env = Env::small().await;
    let b = env.business_ids()[0].clone();
    let s = std::sync::Arc::new(common::open_session(env.config()).await);
    assert!(pass(&s, &b, ScanKind::Full).await.is_ok());
    // On the last page: a head scan (one unchanged page) never reaches it.
    let x = env.sandbox.lead_ids(&b).last().unwrap().clone();
    let listed = env.sandbox.lead_json(&x).unwrap();
    let status = status_of(&env, &x);
    // Written before t1, and t1 long enough before the pass that a pass
    // that listed the lead would keep the delivery out.
    written_ago(&env, &x, 180);
    let t1 = seconds_ago(120);
    let report = pass(&s, &b, ScanKind::Head).await;
    assert!(report.is_ok(), "{}", report.summary());
    let c = delivered_as(&listed, &status, "Canceled");
    assert_eq!(deliver_triggered(&s, &c, &t1).await, "applied");
    assert_eq!(status_of(&env, &x), "Canceled");
}

/// The converse, with four businesses' passes at once (as
/// `daemon.sync_concurrency = 4` runs them), their pages answered
/// interleaved and well after they were made: a page made before a
/// delivered event never overwrites the delivered copy, nor does a page
/// asked for after the event but less than `LISTING_MARGIN` after it (a
/// listing may lag the event); the first listing asked for a margin after
/// it is compared as usual and written. Which pages were asked for before
/// the event is read from the sandbox's request counts around it, not
/// guessed from how long pages are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_passes_at_once_keep_delivered_copies_newer_than_their_pages() {
    let env = Env::new(
        SandboxOptions {
            businesses: 4,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let s = std::sync::Arc::new(common::open_session(env.config()).await);
    let businesses = env.business_ids();
    assert_eq!(businesses.len(), 4);
    // (business, kind, the leads changed with their pages): pages of 10,
    // 60 leads; a full scan, one lead on each page from the third; a head
    // scan, one on its first page.
    let mut cases = Vec::new();
    let mut deliveries = Vec::new();
    for (i, b) in businesses.iter().enumerate() {
        assert!(pass(&s, b, ScanKind::Full).await.is_ok());
        let ids = env.sandbox.lead_ids(b);
        let (kind, changed): (_, Vec<(u64, String)>) = match i % 2 {
            0 => (
                ScanKind::Full,
                (2..6)
                    .map(|p| (p as u64 + 1, ids[p * 10 + 5].clone()))
                    .collect(),
            ),
            _ => (ScanKind::Head, vec![(1, ids[0].clone())]),
        };
        for (_, x) in &changed {
            env.sandbox
                .mutate(Mutation::SetStatus {
                    negotiation_id: x.clone(),
                    // A status no lead of the sandbox has: the listing
                    // differs from the mirror as the scan started.
                    status: "Hired".into(),
                })
                .unwrap();
            let listed = env.sandbox.lead_json(x).unwrap();
            // A status no listing has.
            deliveries.push(delivered_as(&listed, "Hired", "Archived"));
        }
        cases.push((b.clone(), kind, changed));
    }
    env.sandbox.set_faults(Faults {
        list_hold_ms: 1_500,
        ..Default::default()
    });
    let asked: Vec<u64> = businesses
        .iter()
        .map(|b| env.sandbox.list_requests(b))
        .collect();
    let requests = |i: usize| env.sandbox.list_requests(&businesses[i]) - asked[i];
    let running: Vec<_> = cases
        .iter()
        .map(|(b, kind, _)| spawn_pass(&s, b, *kind))
        .collect();
    // Each page held in turn: the full scans until page 4 is asked for,
    // the head scans until their first page is.
    let wanted = |i: usize| if i.is_multiple_of(2) { 4 } else { 1 };
    common::wait_until("pages asked for", Duration::from_secs(60), || {
        (0..4).all(|i| requests(i) >= wanted(i))
    })
    .await;
    // A listing's pages are asked for one at a time, each once the one
    // before is answered (no faults: no retries): the pages counted before
    // the event were asked for before it, and a page two past those counted
    // after it was asked for after it (the one in between may be either).
    let before: Vec<u64> = (0..4).map(requests).collect();
    next_millisecond().await;
    let event = leadsync::time::now();
    let after: Vec<u64> = (0..4).map(requests).collect();
    let held = env.sandbox.stats().lists_held;
    assert!(held >= 10, "{held} pages held");
    env.sandbox.set_faults(Faults::default());
    // In the order of `cases` and their changed leads.
    let mut outcomes = Vec::new();
    for d in &deliveries {
        outcomes.push(deliver_triggered(&s, d, &event).await);
    }
    let mut outcomes = outcomes.into_iter();
    for r in running {
        let report = r.await.unwrap();
        assert!(report.is_ok(), "{}", report.summary());
    }
    let mut asked_after = 0;
    for (i, (b, kind, changed)) in cases.iter().enumerate() {
        for (page, x) in changed {
            let outcome = outcomes.next().unwrap();
            if *page <= before[i] {
                assert_eq!(
                    outcome, "applied",
                    "{b} ({kind:?}): the delivery of {x}, whose page was made before the event"
                );
                assert_eq!(
                    status_of(&env, x),
                    "Archived",
                    "{b} ({kind:?}): page {page}, made before the event, overwrote the delivered copy of {x}"
                );
            } else if *page >= after[i] + 2 {
                // Asked for after the event, but less than LISTING_MARGIN
                // after it: a listing may lag the event, so it does not
                // roll the delivery back, nor keep it out when its page was
                // written first (the passes run on meanwhile).
                assert_eq!(
                    outcome, "applied",
                    "{b} ({kind:?}): the delivery of {x}, whose page was asked for just after the event"
                );
                asked_after += 1;
                assert_eq!(
                    status_of(&env, x),
                    "Archived",
                    "{b} ({kind:?}): page {page}, asked for just after the event, overwrote the delivered copy of {x}"
                );
            }
        }
    }
    // Page 4 is held 1.5 s: pages 6 were asked for after the event.
    assert!(
        asked_after > 0,
        "no page asked for after the event: {before:?} {after:?}"
    );
    // The next listing asked for a margin after the event is compared as
    // usual (the event is moved back by the margin rather than waited for).
    let (b, _, changed) = &cases[1];
    let x = &changed[0].1;
    let moved = leadsync::time::fmt(
        leadsync::time::parse(&event).unwrap() - leadsync::store::mirror::LISTING_MARGIN,
    );
    env.sql()
        .execute(
            "UPDATE negotiations SET webhook_triggered_at = ?2 WHERE negotiation_id = ?1",
            [x, &moved],
        )
        .unwrap();
    assert!(pass(&s, b, ScanKind::Head).await.is_ok());
    assert_eq!(status_of(&env, x), "Hired");
}
