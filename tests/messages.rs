//! Messages (SPEC §9): polled conversations, paged back by `sentBefore`,
//! never duplicated; replies through `message_outbox`.

mod common;

use common::{Env, FAST, count, messages_of, text};
use leadsync::sandbox::{Faults, Mutation, SandboxOptions};
use leadsync::store::messages::{self, MessageSource};
use leadsync::thumbtack::model::parse_message;
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn with_messages() -> String {
    format!("{FAST}\n[messages]\nsync = true\n")
}

/// Stores some of the sandbox's messages as a webhook would have.
fn deliver_by_webhook(env: &Env, negotiation_id: &str, indexes: &[usize]) -> Vec<String> {
    let all = env.sandbox.messages(negotiation_id);
    let chosen: Vec<_> = indexes
        .iter()
        .map(|&i| {
            let raw: Box<serde_json::value::RawValue> = serde_json::from_str(&all[i].json).unwrap();
            parse_message(&raw).unwrap()
        })
        .collect();
    let mut conn = leadsync::store::open_connection(&env.database(), true).unwrap();
    let w = messages::insert_messages(
        &mut conn,
        negotiation_id,
        None,
        &chosen,
        MessageSource::Webhook,
        &leadsync::time::now(),
    )
    .unwrap();
    assert_eq!(w.inserted, chosen.len() as i64);
    chosen.into_iter().map(|m| m.message_id).collect()
}

fn pages_of(db: &rusqlite::Connection, negotiation_id: &str) -> (String, i64) {
    db.query_row(
        "SELECT outcome, pages FROM message_polls WHERE negotiation_id = ?1",
        [negotiation_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_is_read_back_in_pages_of_twenty_without_duplicates() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let long = env.sandbox.long_conversation_lead(&business).unwrap();
    let conversation = env.sandbox.messages(&long);
    assert_eq!(conversation.len(), 45);
    // A webhook delivered the newest message and two older ones first.
    let by_webhook = deliver_by_webhook(&env, &long, &[44, 30, 3]);

    let o = env.run_ok(&["sync", "--business", &business]);
    assert!(
        text(&o).contains("messages — 60 leads polled"),
        "{}",
        text(&o)
    );

    let db = env.sql();
    let q = |sql: &str| count(&db, &sql.replace("{n}", &long));
    assert_eq!(
        q("SELECT count(*) FROM messages WHERE negotiation_id = '{n}'"),
        45
    );
    assert_eq!(
        q("SELECT count(DISTINCT message_id) FROM messages WHERE negotiation_id = '{n}'"),
        45
    );
    assert_eq!(
        pages_of(&db, &long),
        ("ok".to_string(), 3),
        "three pages of 20, 20, 5"
    );
    for id in &by_webhook {
        let source: String = db
            .query_row(
                "SELECT source FROM messages WHERE message_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            source, "webhook",
            "a message already mirrored is left as it was"
        );
    }
    assert_eq!(
        q("SELECT count(*) FROM messages WHERE negotiation_id = '{n}' AND source = 'poll'"),
        42
    );
    // Every message exactly as served, in time order.
    let mirrored: Vec<(String, String, String)> = db
        .prepare("SELECT message_id, payload, sender FROM messages WHERE negotiation_id = ?1 ORDER BY sent_at")
        .unwrap()
        .query_map([&long], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    for (m, (id, payload, sender)) in conversation.iter().zip(&mirrored) {
        assert_eq!((&m.id, &m.json, &m.from), (id, payload, sender));
    }
    // Every lead of the business has its whole conversation.
    let expected: usize = env
        .sandbox
        .lead_ids(&business)
        .iter()
        .map(|l| env.sandbox.messages(l).len())
        .sum();
    assert_eq!(count(&db, "SELECT count(*) FROM messages"), expected as i64);

    // Two new messages and a change: the next pass reads one page and stops
    // at what the first poll already read.
    env.sandbox
        .mutate(Mutation::AddMessages {
            negotiation_id: long.clone(),
            count: 2,
        })
        .unwrap();
    env.sandbox
        .mutate(Mutation::SetStatus {
            negotiation_id: long.clone(),
            status: "Picked".into(),
        })
        .unwrap();
    let o = env.run_ok(&["sync", "--business", &business]);
    assert!(
        text(&o).contains("messages — 1 leads polled, 2 new messages"),
        "{}",
        text(&o)
    );
    assert_eq!(
        q("SELECT count(*) FROM messages WHERE negotiation_id = '{n}'"),
        47
    );
    assert_eq!(pages_of(&db, &long), ("ok".to_string(), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lead_failing_is_recorded_and_blocks_neither_its_row_nor_the_others() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[1].clone();
    let leads = env.sandbox.lead_ids(&business);
    let refused = leads[5].clone();
    env.sandbox.refuse(&refused);

    let o = env.run(&["sync", "--business", &business]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "the pass itself succeeded: {}",
        text(&o)
    );
    assert!(text(&o).contains("1 failed"), "{}", text(&o));
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM negotiations WHERE negotiation_id = '{refused}'")
        ),
        1
    );
    let (outcome, error): (String, String) = db
        .query_row(
            "SELECT outcome, error FROM message_polls WHERE negotiation_id = ?1",
            [&refused],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome, "error");
    assert!(error.contains("active leads only"), "{error}");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_polls WHERE outcome = 'ok'"
        ),
        leads.len() as i64 - 1
    );
    let long = env.sandbox.long_conversation_lead(&business).unwrap();
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM messages WHERE negotiation_id = '{long}'")
        ),
        45
    );

    // Nothing changed, but the failed lead is polled again after the next pass.
    let before = env
        .sandbox
        .stats()
        .by_route
        .get("messages")
        .copied()
        .unwrap_or(0);
    let o = env.run(&["sync", "--business", &business]);
    assert!(
        text(&o).contains("messages — 1 leads polled"),
        "{}",
        text(&o)
    );
    assert_eq!(env.sandbox.stats().by_route["messages"], before + 1);
}

/// A lead that is no longer active ("history is for active leads"; every
/// lead canceled or closed is one) is refused for good: it was polled again
/// after every pass, forever — one more request (four, with the read
/// retries and their backoff, ~7 s, inside the business's pass) per such
/// lead and pass, the failed polls in `status` growing without end. After
/// its first retry it is polled less and less often, at once again when
/// the lead changes, and its backoff forgotten once a poll succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_refused_again_and_again_is_polled_less_and_less_often() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[1].clone();
    let refused = env.sandbox.lead_ids(&business)[5].clone();
    env.sandbox.refuse(&refused);
    let polls = || {
        env.sandbox
            .stats()
            .by_route
            .get("messages")
            .copied()
            .unwrap_or(0)
    };
    let sync = || {
        let o = env.run(&["sync", "--business", &business]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    };
    let db = env.sql();
    let state = || -> (String, i64, bool) {
        db.query_row(
            "SELECT outcome, failures,
                    next_poll_at > strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 minute')
               FROM message_polls WHERE negotiation_id = ?1",
            [&refused],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<bool>>(2)?.unwrap_or(false),
                ))
            },
        )
        .unwrap()
    };
    sync();
    assert_eq!(state(), ("error".to_string(), 1, false));
    // A first failure may be passing: the lead is polled after the next pass.
    let first = polls();
    sync();
    assert_eq!(polls(), first + 1);
    assert_eq!(state(), ("error".to_string(), 2, true));
    // Refused twice: not after every pass any more.
    for _ in 0..3 {
        sync();
    }
    assert_eq!(
        polls(),
        first + 1,
        "polled again before its backoff ran out"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_polls WHERE outcome = 'error'"
        ),
        1,
        "still a failed poll, for `status`"
    );
    // `status` tells the leads refused and waiting from those failing now.
    let o = env.run_ok(&["status"]);
    assert!(
        text(&o)
            .contains("1 leads whose conversation could not be read (1 refused, waiting until 20"),
        "{}",
        text(&o)
    );
    // A change of the lead is news: polled at once, whatever its backoff.
    env.set_status(&refused, "Canceled");
    sync();
    assert_eq!(polls(), first + 2);
    assert_eq!(state(), ("error".to_string(), 3, true));
    // Its backoff over, it is polled after the next pass; accepted, the
    // backoff is forgotten.
    db.execute(
        "UPDATE message_polls SET next_poll_at = '2000-01-01T00:00:00.000Z' WHERE negotiation_id = ?1",
        [&refused],
    )
    .unwrap();
    env.sandbox.accept(&refused);
    sync();
    assert_eq!(polls(), first + 3);
    assert_eq!(state(), ("ok".to_string(), 0, false));
}

/// A customer's message delivered before its lead is mirrored (THUMBTACK.md:
/// "a message can arrive before its negotiation"; a customer's message names
/// no business) is stored without a business: it kept `business_id` NULL
/// for good once the lead was mirrored, polled or not, so a query of one
/// business's messages never showed the first message of a new lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_before_its_lead_gets_the_leads_business_when_it_is_mirrored() {
    for polling in [false, true] {
        let overrides = if polling {
            with_messages()
        } else {
            FAST.to_string()
        };
        let env = Env::new(SandboxOptions::default(), false, &overrides).await;
        let business = env.business_ids()[1].clone();
        let lead = env.sandbox.lead_ids(&business)[0].clone();
        let early = deliver_by_webhook(&env, &lead, &[0]).remove(0);
        let db = env.sql();
        let business_of = || -> Option<String> {
            db.query_row(
                "SELECT business_id FROM messages WHERE message_id = ?1",
                [&early],
                |r| r.get(0),
            )
            .unwrap()
        };
        assert_eq!(business_of(), None);
        let o = env.run(&["sync", "--business", &business]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        assert_eq!(business_of(), Some(business.clone()), "polling {polling}");
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM messages WHERE business_id IS NULL"
            ),
            0,
            "polling {polling}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_messages_sync_no_conversation_is_read() {
    let env = Env::small().await;
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains("messages"), "{}", text(&o));
    assert_eq!(env.sandbox.stats().by_route.get("messages"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_message_outbox_rows_are_refused_by_the_table_with_readable_messages() {
    let env = Env::small().await;
    let lead = env.first_leads(1)[0].clone();
    drop(leadsync::store::open_connection(&env.database(), true).unwrap());
    let db = env.sql();
    let long = "é".repeat(5001);
    let refused: &[(&str, &str)] = &[
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('abc', 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('', 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (NULL, 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (' 5191', 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (5.19e20, 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (x'3531', 'hi')",
            "negotiation_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, business_id, text) VALUES ('{n}', 'acme', 'hi')",
            "business_id must be",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', NULL)",
            "text is required",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', '')",
            "text is required",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', ' ' || char(10, 9) || ' ')",
            "text is required",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', x'6869')",
            "text is required",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', '{long}')",
            "at most 5000 characters",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text, state) VALUES ('{n}', 'hi', 'sent')",
            "a new row is pending",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text, attempts) VALUES ('{n}', 'hi', 3)",
            "a new row is pending",
        ),
    ];
    for (sql, why) in refused {
        let sql = sql.replace("{n}", &lead).replace("{long}", &long);
        let e = db
            .execute(&sql, [])
            .expect_err(&format!("accepted: {sql}"))
            .to_string();
        assert!(
            e.contains("message_outbox: ") && e.contains(why),
            "{sql}: {e}"
        );
    }
    assert_eq!(count(&db, "SELECT count(*) FROM message_outbox"), 0);

    // At the limit, in characters (not bytes), it is accepted.
    let at_limit = "é".repeat(5000);
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, ?2)",
        [&lead, &at_limit],
    )
    .unwrap();
    let id = db.last_insert_rowid();
    // Content changes while pending; never once the row left pending.
    db.execute(
        "UPDATE message_outbox SET text = 'On my way!' WHERE id = ?1",
        [id],
    )
    .unwrap();
    let e = db
        .execute(
            "UPDATE message_outbox SET state = 'bogus' WHERE id = ?1",
            [id],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("message_outbox: state must be one of"), "{e}");
    db.execute(
        "UPDATE message_outbox SET state = 'sent' WHERE id = ?1",
        [id],
    )
    .unwrap();
    for sql in [
        "UPDATE message_outbox SET text = 'changed' WHERE id = ?1",
        "UPDATE message_outbox SET negotiation_id = '1' WHERE id = ?1",
        "UPDATE message_outbox SET business_id = '1' WHERE id = ?1",
    ] {
        let e = db.execute(sql, [id]).unwrap_err().to_string();
        assert!(
            e.contains("can change only while it is pending"),
            "{sql}: {e}"
        );
    }
    let kept: String = db
        .query_row("SELECT text FROM message_outbox WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kept, "On my way!");

    // `leadsync reply` goes through the same checks.
    let o = env.run(&["reply", "--negotiation", &lead, "--text", "  "]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("rejected: message_outbox: text is required"),
        "{}",
        text(&o)
    );
    let o = env.run(&["reply", "--negotiation", &lead, "--text", "-- see you at 9"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (id + 1).to_string()
    );
}

/// SQLite's `length()` stops at a NUL, and its `trim()` knows only the
/// characters it is given: a long text behind a NUL, or a text of Unicode
/// spaces only, must be refused by the table too, not left to die at the
/// claim (the drainer counts every character and trims every space).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_outbox_refuses_text_hidden_behind_a_nul_or_of_unicode_spaces_only() {
    let env = Env::small().await;
    let lead = env.first_leads(1)[0].clone();
    drop(leadsync::store::open_connection(&env.database(), true).unwrap());
    let db = env.sql();
    let long = "x".repeat(6000);
    let refused: &[(&str, &str)] = &[
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', char(0) || '{long}')",
            "NUL",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', 'hi' || char(0))",
            "NUL",
        ),
        (
            "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{n}', char(160, 12288, 8203 - 3, 11, 12, 133))",
            "text is required",
        ),
    ];
    for (sql, why) in refused {
        let sql = sql.replace("{n}", &lead).replace("{long}", &long);
        let shown: String = sql.chars().take(120).collect();
        let e = db
            .execute(&sql, [])
            .expect_err(&format!("accepted: {shown}"))
            .to_string();
        assert!(
            e.contains("message_outbox: ") && e.contains(why),
            "{shown}: {e}"
        );
    }
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'hi')",
        [&lead],
    )
    .unwrap();
    let id = db.last_insert_rowid();
    for sql in [
        "UPDATE message_outbox SET text = char(0) || '{long}' WHERE id = ?1",
        "UPDATE message_outbox SET text = char(12288) WHERE id = ?1",
    ] {
        let sql = sql.replace("{long}", &long);
        let shown: String = sql.chars().take(120).collect();
        db.execute(&sql, [id])
            .expect_err(&format!("accepted: {shown}"));
    }
    // Unicode letters and a non-breaking space inside a text are fine.
    db.execute(
        "UPDATE message_outbox SET text = 'Bis gleich' || char(160) || '👋' WHERE id = ?1",
        [id],
    )
    .unwrap();
    assert_eq!(count(&db, "SELECT count(*) FROM message_outbox"), 1);

    // Control characters are text the table takes, but `outbox list` does
    // not replay them to the operator's terminal (an escape sequence could
    // rewrite the screen).
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text)
         VALUES (?1, 'a' || char(27) || '[2J' || char(7) || 'b' || char(155) || 'c')",
        [&lead],
    )
    .unwrap();
    let o = env.run(&["outbox", "list", "--kind", "message"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        !shown.chars().any(|c| c.is_control() && c != '\n'),
        "{shown:?}"
    );
    assert!(shown.contains("a [2J b c"), "{shown:?}");
}

/// One claim takes both kinds, each in its own transaction: when the second
/// fails, the rows the first one marked `sending` must still be sent — not
/// dropped, left `sending` until the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reply_claim_does_not_strand_the_transitions_claimed_with_it() {
    let env = Env::small().await;
    let leads = env.first_leads(1);
    drop(leadsync::store::open_connection(&env.database(), true).unwrap());
    let db = env.sql();
    db.execute(
        "INSERT INTO outbox (negotiation_id, business_id, status, partner_status_changed_at)
         VALUES (?1, ?2, 'appt_scheduled', '2024-06-14T09:30:00Z')",
        [&leads[0], &env.business_ids()[0]],
    )
    .unwrap();
    // A partner's trigger that fails at run time (an integer overflow: an
    // error, not a constraint) whenever a reply is claimed: every claim of
    // a reply errors (a locked database or a full disk would do the same).
    db.execute_batch(&format!(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES ('{}', 'hi');
         CREATE TRIGGER partner_audit AFTER UPDATE OF state ON message_outbox
          WHEN NEW.state = 'sending'
         BEGIN SELECT abs(-9223372036854775807 - 1); END;",
        leads[1]
    ))
    .unwrap();
    let o = env.run(&["drain"]);
    let state: String = db
        .query_row("SELECT state FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "sent", "{}", text(&o));
    assert_eq!(env.sandbox.deliveries().len(), 1, "{}", text(&o));
    // The reply is untouched, and the failure is reported.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_outbox WHERE state = 'pending' AND attempts = 0"
        ),
        1
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("integer overflow"), "{}", text(&o));
}

/// The replies the sandbox accepted, per negotiation, in order of acceptance.
fn replies_by_negotiation(env: &Env) -> HashMap<String, Vec<String>> {
    let mut by: HashMap<String, Vec<String>> = HashMap::new();
    for r in env.sandbox.replies() {
        by.entry(r.negotiation_id).or_default().push(r.text);
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_replies_under_faults_are_each_sent_once_in_id_order() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST
            .replace("concurrency = 4", "concurrency = 8")
            .replace("max_attempts = 5", "max_attempts = 100")
            .replace("backoff_max_secs = 2", "backoff_max_secs = 0.5"),
    )
    .await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        latency_ms: 2,
        error_5xx: 0.1,
        rate_429: 0.05,
        retry_after_secs: 0,
        waf_202: 0.05,
        reset: 0.03,
        malformed: 0.05,
        ..Default::default()
    });
    let leads: Vec<String> = env.first_leads(17).into_iter().take(50).collect();
    let db = env.sql();
    // Ten replies per negotiation, the negotiations interleaved.
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for k in 0..10 {
        for lead in &leads {
            let text = format!("reply {k} to {lead}: on my way 🚐");
            db.execute(
                "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, ?2)",
                rusqlite::params![lead, text],
            )
            .unwrap();
            expected.entry(lead.clone()).or_default().push(text);
        }
    }
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    common::wait_until("every reply sent", Duration::from_secs(120), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM message_outbox WHERE state = 'sent'",
        ) == 500
    })
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();

    assert!(
        env.sandbox.stats().faults_injected > 50,
        "the faults struck"
    );
    let replies = env.sandbox.replies();
    assert_eq!(replies.len(), 500, "each reply sent once");
    assert_eq!(
        replies_by_negotiation(&env),
        expected,
        "in id order per negotiation"
    );
    // The id Thumbtack gave each message is kept on its row.
    let mut stmt = db
        .prepare("SELECT text, message_id FROM message_outbox ORDER BY id")
        .unwrap();
    let ids: HashMap<String, Option<String>> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    for r in &replies {
        assert_eq!(ids[&r.text].as_deref(), Some(r.message_id.as_str()));
    }
    assert!(
        count(
            &db,
            "SELECT count(*) FROM message_outbox_attempts WHERE outcome = 'retry'"
        ) > 0,
        "failed attempts are in the attempts log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reply_dies_alone_and_the_operator_commands_cover_replies() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let leads = env.first_leads(1);
    let (refused, fine) = (leads[0].clone(), leads[1].clone());
    env.sandbox.refuse(&refused);
    let reply = |lead: &str, message: &str| -> i64 {
        let o = env.run(&["reply", "--negotiation", lead, "--text", message]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    let dead = reply(&refused, "first");
    let after_dead = reply(&refused, "second");
    let canceled = reply(&fine, "never mind");
    let sent = reply(&fine, "on my way");
    let o = env.run(&[
        "outbox",
        "cancel",
        "--kind",
        "message",
        &canceled.to_string(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The transition table has no such row: the kind matters.
    let o = env.run(&["outbox", "cancel", &sent.to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("outbox row 4 does not exist"),
        "{}",
        text(&o)
    );

    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(1), "a dead row: {}", text(&o));
    assert!(
        text(&o).contains("1 sent, 0 to retry later, 2 dead"),
        "{}",
        text(&o)
    );
    let db = env.sql();
    let row = |id: i64| -> (String, Option<i64>, Option<String>, Option<String>) {
        db.query_row(
            "SELECT state, last_http_status, last_error, message_id FROM message_outbox WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    let (state, http, error, _) = row(dead);
    assert_eq!((state.as_str(), http), ("dead", Some(400)));
    assert!(error.unwrap().contains("does not accept messages"));
    assert_eq!(
        row(after_dead).0,
        "dead",
        "a dead row holds nothing back: the next one was tried"
    );
    assert_eq!(row(canceled).0, "canceled");
    let (state, http, _, message_id) = row(sent);
    assert_eq!((state.as_str(), http), ("sent", Some(201)));
    let replies = env.sandbox.replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(message_id.as_deref(), Some(replies[0].message_id.as_str()));
    assert_eq!(replies[0].text, "on my way");
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM message_outbox_attempts WHERE outbox_id = {dead} AND http_status = 400"
            )
        ),
        1
    );

    let o = env.run(&["outbox", "list", "--kind", "message", "--state", "dead"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("does not accept messages"),
        "{}",
        text(&o)
    );
    let o = env.run(&["outbox", "list", "--kind", "message", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 4);
    assert_eq!(rows[3]["message_id"], replies[0].message_id.as_str());
    let o = env.run(&["status"]);
    assert!(
        text(&o).contains("message_outbox: 0 pending, 0 sending, 1 sent, 2 dead, 1 canceled"),
        "{}",
        text(&o)
    );
    let o = env.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["messages"]["outbox"]["dead"], 2);

    // Retried, it goes again (and is refused again: 400 is final).
    let o = env.run(&["outbox", "retry", "--kind", "message", "--all-dead"]);
    assert!(
        text(&o).contains("2 dead rows of message_outbox are pending again"),
        "{}",
        text(&o)
    );
    assert_eq!(row(dead).0, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_send_loses_no_reply_and_keeps_id_order() {
    let env = Env::new(SandboxOptions::default(), false, FAST).await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        latency_ms: 60,
        error_5xx: 0.1,
        ..Default::default()
    });
    let leads = env.first_leads(4);
    let db = env.sql();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for k in 0..5 {
        for lead in &leads {
            let text = format!("reply {k}");
            db.execute(
                "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, ?2)",
                rusqlite::params![lead, text],
            )
            .unwrap();
            expected.entry(lead.clone()).or_default().push(text);
        }
    }
    for round in 0..2 {
        let mut child = env.spawn_daemon();
        let target = 15 * (round + 1);
        common::wait_until(
            "some replies before the kill",
            Duration::from_secs(30),
            || env.sandbox.replies().len() >= target,
        )
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let mut child = env.spawn_daemon();
    common::wait_until(
        "every reply sent after restarts",
        Duration::from_secs(60),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM message_outbox WHERE state = 'sent'",
            ) == 60
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();

    // A reply in flight at a kill may go twice (README), never out of order.
    let mut by = replies_by_negotiation(&env);
    for texts in by.values_mut() {
        texts.dedup();
    }
    assert_eq!(by, expected);
    let replies = env.sandbox.replies().len();
    assert!(replies <= 60 + 2 * 4, "{replies} replies for 60 rows");
    let interrupted = count(
        &env.sql(),
        "SELECT count(*) FROM message_outbox_attempts WHERE outcome = 'interrupted'",
    ) as usize;
    assert!(
        interrupted >= replies - 60,
        "every duplicate comes from an attempt a kill interrupted ({interrupted} for {} duplicates)",
        replies - 60
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_reply_is_delivered_to_the_sandbox_webhooks_as_a_business_message() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let business = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&business)[0].clone();
    let token = env.sandbox.static_token(&business).unwrap();
    // A subscription whose receiver is not listening: the delivery is logged.
    let r = common::http_client()
        .post(format!(
            "{}/api/v4/businesses/{business}/webhooks",
            env.sandbox.base_url()
        ))
        .bearer_auth(token)
        .json(&serde_json::json!({
            "webhookURL": "http://127.0.0.1:9/hooks",
            "eventTypes": ["MessageCreatedV4"],
            "enabled": true,
            "auth": {"username": "u", "password": "p"},
        }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let o = env.run(&["reply", "--negotiation", &lead, "--text", "See you at 9"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.run(&["drain"]).status.code(), Some(0));
    let reply = env.sandbox.replies().pop().unwrap();
    let delivered = env
        .sandbox
        .webhook_deliveries()
        .into_iter()
        .find(|d| d.message_id.as_deref() == Some(reply.message_id.as_str()))
        .expect("a MessageCreatedV4 delivery for the reply");
    assert_eq!(delivered.event_type, "MessageCreatedV4");
    assert_eq!(delivered.negotiation_id.as_deref(), Some(lead.as_str()));
    let m = env
        .sandbox
        .messages(&lead)
        .into_iter()
        .find(|m| m.id == reply.message_id)
        .unwrap();
    assert_eq!(m.from, "Business");
    assert!(m.json.contains(r#""from":"Business""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_listed_under_another_negotiation_is_neither_stored_nor_a_mark() {
    // Review r11: a poll stored whatever a listing returned under the
    // negotiation the message named (with the business of the lead polled),
    // and its sentAt counted towards the lead's "read up to" mark.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    env.run_ok(&["sync", "--business", &business]);
    let leads = env.sandbox.lead_ids(&business);
    let (lead, other) = (
        leads[0].clone(),
        env.sandbox.lead_ids(&env.business_ids()[1])[0].clone(),
    );
    let stray = env
        .sandbox
        .mutate(Mutation::AddStrayMessage {
            negotiation_id: lead.clone(),
            names: other.clone(),
            sent_at: Some("2099-01-01T00:00:00Z".into()),
        })
        .unwrap()
        .remove(0);
    let change = |status: &str| env.set_status(&lead, status);
    change("Picked");
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM messages WHERE message_id = '{stray}'")
        ),
        0,
        "a message naming another negotiation is not this lead's"
    );
    // 25 new messages: more than a page. All of them are read (the stray
    // message is no mark).
    env.sandbox
        .mutate(Mutation::AddMessages {
            negotiation_id: lead.clone(),
            count: 25,
        })
        .unwrap();
    change("Hired");
    env.run_ok(&["sync", "--business", &business]);
    let expected = env.sandbox.messages(&lead).len() as i64 - 1;
    assert_eq!(messages_of(&db, &lead), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sharing_a_sent_at_across_a_page_boundary_are_all_read() {
    // Paging back with `sentBefore` = the oldest `sentAt` of a full page
    // (exclusive) skipped every other message sent at that same instant
    // that did not fit on the page, and the lead's mark then moved past
    // them: lost for good.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    env.run_ok(&["sync", "--business", &business]);
    let lead = env.sandbox.lead_ids(&business)[0].clone();
    // 21 new messages, oldest first: the two oldest share an instant, so
    // that the 20th and 21st newest straddle the first page's boundary.
    let mut times = vec!["2099-01-01T00:00:00Z".to_string(); 2];
    times.extend((1..=19).map(|s| format!("2099-01-01T00:00:{s:02}Z")));
    env.add_messages_at(&lead, times);
    env.set_status(&lead, "Picked");
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    let mirrored = messages_of(&db, &lead);
    assert_eq!(
        mirrored,
        env.sandbox.messages(&lead).len() as i64,
        "every message of the conversation is mirrored"
    );
    // Some instants shared by more messages than a page holds cannot be
    // paged past: the poll says so instead of moving its mark.
    let mark = |db: &rusqlite::Connection| -> Option<String> {
        db.query_row(
            "SELECT complete_through FROM message_polls WHERE negotiation_id = ?1",
            [&lead],
            |r| r.get(0),
        )
        .unwrap()
    };
    let before = mark(&db);
    assert!(before.is_some());
    let crowded = vec!["2099-01-02T00:00:00Z".to_string(); 25];
    env.add_messages_at(&lead, crowded);
    env.set_status(&lead, "Hired");
    let o = env.run_ok(&["sync", "--business", &business]);
    let (outcome, _) = pages_of(&db, &lead);
    assert_eq!(outcome, "error", "25 messages at one instant: {}", text(&o));
    assert_eq!(mark(&db), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dated_in_the_future_does_not_stop_later_polls_after_one_page() {
    // The lead's mark (`complete_through`) took the newest `sentAt` read,
    // even one in the future (a server clock ahead, a bogus date): every
    // later poll then "reached" it on its first page and stopped there, so
    // the messages beyond that page were never read.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    env.run_ok(&["sync", "--business", &business]);
    let lead = env.sandbox.lead_ids(&business)[0].clone();
    let change = |status: &str| env.set_status(&lead, status);
    env.add_messages_at(&lead, vec!["2099-01-01T00:00:00Z".into()]);
    change("Picked");
    env.run_ok(&["sync", "--business", &business]);
    // 25 messages sent now-ish (before the one dated 2099): more than a page.
    let soon = chrono::Utc::now() + chrono::Duration::minutes(5);
    let times: Vec<String> = (0..25)
        .map(|k| leadsync::time::fmt(soon + chrono::Duration::seconds(k)))
        .collect();
    env.add_messages_at(&lead, times);
    change("Hired");
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    assert_eq!(
        messages_of(&db, &lead),
        env.sandbox.messages(&lead).len() as i64,
        "every message of the conversation is mirrored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_older_than_an_instant_crowded_past_a_page_are_still_read() {
    // More messages share one millisecond than a page holds: paging back
    // cannot list them all, and the poll says so. It stopped there, so every
    // message sent before that instant was never read either, at any poll:
    // the older history of the lead was lost to polling for good.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&business)[0].clone();
    let crowded = "2000-01-02T00:00:00Z";
    let mut times: Vec<String> = (1..=3).map(|s| format!("2000-01-01T00:00:0{s}Z")).collect();
    times.extend(std::iter::repeat_n(crowded.to_string(), 25));
    env.add_messages_at(&lead, times);
    let o = env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    let crowded_at = leadsync::time::parse(crowded).unwrap();
    let older: Vec<String> = env
        .sandbox
        .messages(&lead)
        .into_iter()
        .filter(|m| m.sent_at < crowded_at)
        .map(|m| m.id)
        .collect();
    assert!(older.len() >= 3);
    for id in &older {
        assert_eq!(
            count(
                &db,
                &format!("SELECT count(*) FROM messages WHERE message_id = '{id}'")
            ),
            1,
            "message {id}, sent before the crowded instant, is mirrored"
        );
    }
    // The crowded instant is still reported, and the mark does not move.
    let (outcome, _) = pages_of(&db, &lead);
    assert_eq!(outcome, "error", "{}", text(&o));
    let mark: Option<String> = db
        .query_row(
            "SELECT complete_through FROM message_polls WHERE negotiation_id = ?1",
            [&lead],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(mark, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_sent_before_costs_a_few_pages_not_hundreds() {
    // Reading on before a crowded millisecond must not turn a server that
    // answers the newest page whatever `sentBefore` says into a loop of
    // requests up to the poll's page limit, for every lead, at every pass.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let long = env.sandbox.long_conversation_lead(&business).unwrap();
    env.sandbox.set_faults(Faults {
        ignore_sent_before: true,
        ..Faults::default()
    });
    let o = env.run_ok(&["sync", "--business", &business]);
    let (outcome, pages) = pages_of(&env.sql(), &long);
    assert_eq!(outcome, "error", "{}", text(&o));
    assert!(pages <= 3, "{pages} pages read");
}

/// A server that serves its default page of 10 whatever `limit` asks and
/// says nothing of its page size (no `pagination`): a page of 10 was read as
/// short of the 20 asked for, so the conversation "ended" there, its mark
/// was set to its newest message, and the older messages were never read,
/// by that poll or any later one. Without a `pagination.limit` only an
/// empty page ends the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_pages_by_ten_without_saying_so_still_gives_the_whole_conversation() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let long = env.sandbox.long_conversation_lead(&business).unwrap();
    let all = env.sandbox.messages(&long).len() as i64;
    assert!(all > 20, "{all}");
    env.sandbox.set_faults(Faults {
        ignore_message_limit: true,
        ..Faults::default()
    });
    let o = env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    assert_eq!(messages_of(&db, &long), all, "{}", text(&o));
    let (outcome, pages) = pages_of(&db, &long);
    assert_eq!(outcome, "ok");
    // Pages of 10, each after the first listing its predecessor's oldest again.
    assert!(pages <= all / 9 + 2, "{pages} pages for {all} messages");
    // A short conversation costs two pages more at most (its oldest
    // instant listed again, then an empty page), never a gap.
    let short = env
        .sandbox
        .lead_ids(&business)
        .into_iter()
        .find(|n| (1..10).contains(&env.sandbox.messages(n).len()))
        .unwrap();
    assert_eq!(pages_of(&db, &short), ("ok".to_string(), 3));
    assert_eq!(
        messages_of(&db, &short),
        env.sandbox.messages(&short).len() as i64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_keeps_a_conversation_in_time_order_whatever_is_added() {
    // A stray message dated in the past was appended at the end, so the
    // sandbox listed it as the newest (paging by time then proves nothing),
    // and `add_messages_at` placed later messages by a search that assumes
    // time order.
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&business);
    let (lead, other) = (ids[0].clone(), ids[1].clone());
    env.sandbox
        .mutate(Mutation::AddStrayMessage {
            negotiation_id: lead.clone(),
            names: other,
            sent_at: Some("2000-01-01T00:00:00Z".into()),
        })
        .unwrap();
    env.add_messages_at(
        &lead,
        vec!["2000-01-02T00:00:00Z".into(), "1999-12-31T00:00:00Z".into()],
    );
    let times: Vec<_> = env
        .sandbox
        .messages(&lead)
        .iter()
        .map(|m| m.sent_at)
        .collect();
    assert!(times.is_sorted(), "{times:?}");
}

/// An outage of the messages route (5xx, like 429s and network failures)
/// says nothing of the lead: it counted as a failure like Thumbtack's
/// refusal, so a few hours of 5xx pushed every changed lead into a wait of
/// hours after the outage ended. Only a refusal from Thumbtack backs off;
/// a lead refused before and now hit by an outage keeps its count and is
/// polled after the next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_outage_delays_no_lead_beyond_the_next_pass() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[1].clone();
    let leads = env.sandbox.lead_ids(&business);
    env.sandbox.set_faults(Faults {
        messages_503: true,
        ..Faults::default()
    });
    let polls = || {
        env.sandbox
            .stats()
            .by_route
            .get("messages")
            .copied()
            .unwrap_or(0)
    };
    let db = env.sql();
    env.run_ok(&["sync", "--business", &business]);
    // Refused twice before the outage.
    db.execute(
        "UPDATE message_polls SET failures = 2 WHERE negotiation_id = ?1",
        [&leads[0]],
    )
    .unwrap();
    for _ in 0..3 {
        let before = polls();
        env.run_ok(&["sync", "--business", &business]);
        assert_eq!(
            polls(),
            before + leads.len() as u64,
            "every lead polled again"
        );
    }
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_polls WHERE outcome = 'error' AND next_poll_at IS NULL"
        ),
        leads.len() as i64
    );
    assert_eq!(
        count(&db, "SELECT max(failures) FROM message_polls"),
        2,
        "an outage is no failure of the lead"
    );
    // The outage over, every conversation is read after the next pass.
    env.sandbox.set_faults(Faults::default());
    env.run_ok(&["sync", "--business", &business]);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_polls WHERE outcome = 'ok' AND failures = 0"
        ),
        leads.len() as i64
    );
}

/// A poll cut short because leadsync is stopping (no request sent) was
/// recorded as a failed poll: counted toward the lead's backoff, and the
/// lead found new was "polled". It is not recorded at all, and the leads
/// not polled stay due (the business's cursor stays).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_cut_short_by_shutdown_is_not_recorded_and_its_leads_stay_due() {
    let env = Env::small().await;
    let business = env.business_ids()[1].clone();
    let leads = env.sandbox.lead_ids(&business);
    env.run_ok(&["sync", "--business", &business]);
    let config = env.config();
    let store = leadsync::store::Store::open(config.database()).unwrap();
    let auth =
        std::sync::Arc::new(leadsync::app::open_auth(&config, None, HashMap::new()).unwrap());
    auth.begin_shutdown(std::time::Instant::now());
    let client = std::sync::Arc::new(
        leadsync::thumbtack::Client::new(
            leadsync::thumbtack::ClientSettings::from_config(&config),
            auth,
        )
        .unwrap(),
    );
    // A lead refused once before.
    let db = env.sql();
    db.execute(
        "INSERT INTO message_polls (negotiation_id, business_id, polled_at, outcome, error, failures)
         VALUES (?1, ?2, '2026-01-01T00:00:00.000Z', 'error', 'refused', 1)",
        [&leads[0], &business],
    )
    .unwrap();
    let settings = leadsync::messages::MessageSettings {
        sync: true,
        max_leads_per_pass: 1000,
    };
    let report = leadsync::messages::poll_after_pass(
        &store,
        &client,
        &business,
        settings,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(
        db.query_row(
            "SELECT polled_at, failures, error FROM message_polls WHERE negotiation_id = ?1",
            [&leads[0]],
            |r| Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?
            )),
        )
        .unwrap(),
        (
            "2026-01-01T00:00:00.000Z".to_string(),
            1,
            "refused".to_string()
        )
    );
    assert_eq!(count(&db, "SELECT count(*) FROM message_polls"), 1);
    let now = leadsync::time::now();
    let due = messages::leads_to_poll(&db, &business, 1000, &now, &now).unwrap();
    assert_eq!(due.0.len(), leads.len(), "every lead still due");
}

/// `next_poll_at` is set by the wall clock: one that ran ahead, then
/// corrected, left a lead hidden for the skew plus its wait. A wait longer
/// than the longest there is was not set by this clock: the lead is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_set_by_a_clock_that_ran_ahead_ends_once_it_is_corrected() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[1].clone();
    let refused = env.sandbox.lead_ids(&business)[5].clone();
    env.sandbox.refuse(&refused);
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    let polls = || {
        env.sandbox
            .stats()
            .by_route
            .get("messages")
            .copied()
            .unwrap_or(0)
    };
    // Within the longest wait: kept.
    db.execute(
        "UPDATE message_polls SET failures = 9,
                next_poll_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+23 hours')
          WHERE negotiation_id = ?1",
        [&refused],
    )
    .unwrap();
    let before = polls();
    env.run_ok(&["sync", "--business", &business]);
    assert_eq!(polls(), before);
    // Beyond it: set by a clock ahead of this one.
    db.execute(
        "UPDATE message_polls SET next_poll_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+3 days')
          WHERE negotiation_id = ?1",
        [&refused],
    )
    .unwrap();
    env.run_ok(&["sync", "--business", &business]);
    assert_eq!(polls(), before + 1);
}

/// A server that pages by 5 whatever `limit` asks and answers no
/// `pagination`: its first page, shorter than the default 10, was taken for
/// the start of the conversation, the mark set past the older messages, and
/// they were never read. Without `pagination.limit` only an empty page ends
/// the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_pages_by_five_without_saying_so_still_gives_the_whole_conversation() {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let long = env.sandbox.long_conversation_lead(&business).unwrap();
    let all = env.sandbox.messages(&long).len() as i64;
    env.sandbox.set_faults(Faults {
        message_page_size: 5,
        ..Faults::default()
    });
    let o = env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    assert_eq!(messages_of(&db, &long), all, "{}", text(&o));
    let (outcome, pages) = pages_of(&db, &long);
    assert_eq!(outcome, "ok");
    assert!(pages <= all / 4 + 3, "{pages} pages for {all} messages");
    for lead in env.sandbox.lead_ids(&business) {
        assert_eq!(
            messages_of(&db, &lead),
            env.sandbox.messages(&lead).len() as i64,
            "{lead}"
        );
        assert_eq!(pages_of(&db, &lead).0, "ok", "{lead}");
    }
}

/// A sandbox-backed environment whose replies are tried `max_attempts` times.
async fn env_with_max_attempts(max_attempts: u32) -> Env {
    Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace(
            "max_attempts = 5",
            &format!("max_attempts = {max_attempts}"),
        ),
    )
    .await
}

/// Mirrors the leads, then has Thumbtack accept every POST and lose its
/// answer: the first lead, whose replies will be in doubt.
fn losing_answers(env: &Env) -> String {
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    env.sandbox.set_faults(Faults {
        lose_after_accept: 1.0,
        ..Default::default()
    });
    env.first_leads(1)[0].clone()
}

/// A reply Thumbtack accepted whose answer was lost (the connection closed
/// after the POST was taken) was posted again at every retry: the customer
/// read it once per attempt. Before a reply whose earlier attempt may have
/// reached Thumbtack is posted again, its lead's conversation is read: the
/// reply found there is `sent`, with the id Thumbtack gave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_whose_answer_was_lost_is_found_in_the_conversation_not_sent_again() {
    let env = env_with_max_attempts(8).await;
    let lead = losing_answers(&env);
    let db = env.sql();
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'On my way!')",
        [&lead],
    )
    .unwrap();
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    common::wait_until(
        "the reply sent, or posted three times",
        Duration::from_secs(60),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM message_outbox WHERE state <> 'pending' AND state <> 'sending'",
            ) == 1
                || env.sandbox.replies().len() >= 3
        },
    )
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    let replies = env.sandbox.replies();
    assert_eq!(replies.len(), 1, "posted once: {replies:?}");
    let (state, message_id): (String, Option<String>) = db
        .query_row("SELECT state, message_id FROM message_outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(
        (state.as_str(), message_id.as_deref()),
        ("sent", Some(replies[0].message_id.as_str()))
    );
    let (note, trace_id): (String, Option<String>) = db
        .query_row(
            "SELECT error, trace_id FROM message_outbox_attempts WHERE outcome = 'sent'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(note.contains("already in the conversation"), "{note}");
    // The GET that found it, for whoever asks why it was not posted.
    assert!(trace_id.is_some_and(|t| !t.is_empty()), "{note}");
}

/// `outbox retry` of a reply that went dead after its answer was lost puts
/// its attempts back to 0: the check goes by the attempts log, not by the
/// attempt's number, so the retried reply is found, not posted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_reply_retried_by_hand_is_found_in_the_conversation_not_sent_again() {
    let env = env_with_max_attempts(1).await;
    let lead = losing_answers(&env);
    let db = env.sql();
    db.execute(
        "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'See you at 9')",
        [&lead],
    )
    .unwrap();
    assert_eq!(env.run(&["drain"]).status.code(), Some(1));
    let state = |db: &rusqlite::Connection| -> String {
        db.query_row("SELECT state FROM message_outbox", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(state(&db), "dead");
    assert_eq!(env.sandbox.replies().len(), 1);
    let o = env.run(&["outbox", "retry", "--kind", "message", "--all-dead"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    env.run(&["drain"]);
    assert_eq!(state(&db), "sent");
    let replies = env.sandbox.replies();
    assert_eq!(replies.len(), 1, "posted once: {replies:?}");
}

/// A reply `text` of the first lead whose one attempt was accepted by
/// Thumbtack with its answer lost (dead at once: `max_attempts = 1`), put
/// back by `outbox retry` with `faults` set: its next attempt looks for it
/// in the conversation first.
fn lost_then_retried(env: &Env, text_of_reply: &str, faults: Faults) -> String {
    let lead = losing_answers(env);
    env.sql()
        .execute(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, ?2)",
            rusqlite::params![lead, text_of_reply],
        )
        .unwrap();
    assert_eq!(env.run(&["drain"]).status.code(), Some(1));
    assert_eq!(env.sandbox.replies().len(), 1);
    env.sandbox.set_faults(faults);
    let o = env.run(&["outbox", "retry", "--kind", "message", "--all-dead"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    lead
}

fn message_gets(env: &Env) -> u64 {
    env.sandbox
        .stats()
        .by_route
        .get("messages")
        .copied()
        .unwrap_or(0)
}

/// The check before a reply is posted again is a convenience: when the
/// conversation cannot be read (a 500, a 401 for a static token without
/// `supply::messages.read` — which may still post replies —, a proxy's
/// HTML page with 200, no answer), the reply is posted as before, after
/// one GET (no retry), and the business is not taken for one needing
/// re-authorization: a 401 there said nothing of the token's right to post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_posted_as_before_when_its_conversation_cannot_be_read() {
    use leadsync::sandbox::MessagesGetFault as M;
    for fault in [M::MissingScope401, M::Error500, M::Html200, M::Hang] {
        let env = Env::new(
            SandboxOptions::default(),
            false,
            &FAST
                .replace("max_attempts = 5", "max_attempts = 1")
                .replace("read_retries = 0", "read_retries = 3"),
        )
        .await;
        lost_then_retried(
            &env,
            "Yes",
            Faults {
                messages_get: fault,
                timeout_ms: 60_000,
                ..Default::default()
            },
        );
        let o = env.run(&["drain"]);
        assert_eq!(o.status.code(), Some(0), "{fault:?}: {}", text(&o));
        let db = env.sql();
        let state: String = db
            .query_row("SELECT state FROM message_outbox", [], |r| r.get(0))
            .unwrap();
        assert_eq!(state, "sent", "{fault:?}");
        assert_eq!(env.sandbox.replies().len(), 2, "{fault:?}: posted again");
        assert_eq!(message_gets(&env), 1, "{fault:?}: one GET, no retry");
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM businesses WHERE needs_reauth = 1"
            ),
            0,
            "{fault:?}: no business flagged"
        );
    }
}

/// A stop while the conversation is being read: no POST was in flight, so
/// the reply goes back to `pending` as `stopped`, never left `sending` as a
/// request without an answer, whatever the read's retry settings; and the
/// read is given up at once, not waited for until its timeout (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_the_conversation_check_leaves_the_reply_pending_not_in_doubt() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST
            .replace("timeout_secs = 5", "timeout_secs = 30")
            .replace("shutdown_timeout_secs = 8", "shutdown_timeout_secs = 40")
            .replace("max_attempts = 5", "max_attempts = 1")
            .replace("read_retries = 0", "read_retries = 3")
            .replace(
                "read_retry_initial_ms = 50",
                "read_retry_initial_ms = 20000",
            ),
    )
    .await;
    lost_then_retried(
        &env,
        "Yes",
        Faults {
            messages_get: leadsync::sandbox::MessagesGetFault::Hang,
            timeout_ms: 60_000,
            ..Default::default()
        },
    );
    let stop = CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    common::wait_until(
        "the conversation being read",
        Duration::from_secs(30),
        || message_gets(&env) >= 1,
    )
    .await;
    let stopped = std::time::Instant::now();
    stop.cancel();
    daemon.await.unwrap().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "the read was waited for: {:?}",
        stopped.elapsed()
    );
    let db = env.sql();
    let state: String = db
        .query_row("SELECT state FROM message_outbox", [], |r| r.get(0))
        .unwrap();
    assert_eq!(state, "pending");
    let last: String = db
        .query_row(
            "SELECT outcome FROM message_outbox_attempts ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(last, "stopped");
    assert_eq!(env.sandbox.replies().len(), 1);
}

/// Another reply of the same text sent around then: the conversation
/// cannot tell the two apart, so the retried one is posted (a duplicate
/// rather than a reply lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_reply_with_a_same_text_twin_is_still_posted() {
    let env = env_with_max_attempts(1).await;
    let lead = losing_answers(&env);
    let db = env.sql();
    let insert = || {
        db.execute(
            "INSERT INTO message_outbox (negotiation_id, text) VALUES (?1, 'Yes')",
            [&lead],
        )
        .unwrap()
    };
    insert();
    assert_eq!(env.run(&["drain"]).status.code(), Some(1));
    env.sandbox.set_faults(Faults::default());
    insert();
    assert_eq!(env.run(&["drain"]).status.code(), Some(0));
    assert_eq!(env.sandbox.replies().len(), 2);
    let o = env.run(&["outbox", "retry", "--kind", "message", "--all-dead"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.run(&["drain"]).status.code(), Some(0));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM message_outbox WHERE state = 'sent'"
        ),
        2
    );
    assert_eq!(env.sandbox.replies().len(), 3, "the twin's retry is posted");
}

/// The sandbox's messages endpoint as SPEC §6 and THUMBTACK.md describe
/// Thumbtack's: `limit` 1–20 (default 10, anything else a 400), `sentBefore`
/// and `sentAfter` both exclusive and combinable, newest first — the
/// contract the poller's paging is held to, so it must hold itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_messages_endpoint_takes_limit_1_to_20_and_both_time_bounds() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let lead = env.sandbox.long_conversation_lead(&b).unwrap();
    let all = env.sandbox.messages(&lead);
    assert_eq!(all.len(), 45);
    let token = env.sandbox.static_token(&b).unwrap();
    let http = common::http_client();
    let get = |query: String| {
        let (http, token) = (http.clone(), token.clone());
        let url = format!(
            "{}/api/v4/negotiations/{lead}/messages{query}",
            env.sandbox.base_url()
        );
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap();
            (status, v)
        }
    };
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["messageID"].as_str().unwrap().to_string())
            .collect()
    };
    let newest_first = |from: usize, n: usize| -> Vec<String> {
        all[..from]
            .iter()
            .rev()
            .take(n)
            .map(|m| m.id.clone())
            .collect()
    };
    for bad in ["0", "21", "-1", "ten", ""] {
        let (status, v) = get(format!("?limit={bad}")).await;
        assert_eq!(status, 400, "limit={bad}: {v}");
        assert!(v["traceID"].is_string(), "a ProblemDetails: {v}");
    }
    let (status, v) = get(String::new()).await;
    assert_eq!((status, ids(&v)), (200, newest_first(45, 10)), "default 10");
    assert_eq!(v["pagination"]["limit"], 10);
    for limit in [1, 20] {
        let (status, v) = get(format!("?limit={limit}")).await;
        assert_eq!((status, ids(&v)), (200, newest_first(45, limit)));
        assert_eq!(v["pagination"]["limit"], limit);
    }
    let at = |i: usize| {
        all[i]
            .sent_at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    // Exclusive bounds: the message sent at the bound itself is left out.
    let (status, v) = get(format!("?limit=20&sentBefore={}", at(30))).await;
    assert_eq!((status, ids(&v)), (200, newest_first(30, 20)));
    let (status, v) = get(format!("?limit=20&sentAfter={}", at(40))).await;
    assert_eq!((status, ids(&v)), (200, newest_first(45, 4)));
    let (status, v) = get(format!(
        "?limit=20&sentAfter={}&sentBefore={}",
        at(10),
        at(14)
    ))
    .await;
    assert_eq!((status, ids(&v)), (200, newest_first(14, 3)));
    for key in ["sentBefore", "sentAfter"] {
        let (status, v) = get(format!("?{key}=yesterday")).await;
        assert_eq!(status, 400, "{key}: {v}");
    }
}

/// A daemon polling messages, its first business mirrored once, and a lead
/// of it without messages: (env, business id, lead id).
async fn mirrored_silent_lead() -> (Env, String, String) {
    let env = Env::new(SandboxOptions::default(), false, &with_messages()).await;
    let business = env.business_ids()[0].clone();
    let lead = env
        .sandbox
        .lead_ids(&business)
        .into_iter()
        .find(|l| env.sandbox.messages(l).is_empty())
        .expect("a lead without messages");
    env.run_ok(&["sync", "--business", &business]);
    (env, business, lead)
}

/// A message that becomes visible late (another node's clock a little
/// behind, a listing that showed it only after the poll) can be dated just
/// before the lead's mark. A later poll stopped on the first page holding
/// a message at or before the mark: when the page ended exactly there, the
/// late message was on the next page, and no poll ever read it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_visible_late_just_before_the_mark_is_still_read() {
    let (env, business, lead) = mirrored_silent_lead().await;
    let now = chrono::Utc::now();
    let at = |minutes: i64| leadsync::time::fmt(now - chrono::Duration::minutes(minutes));
    env.add_messages_at(&lead, vec![at(60), at(30)]);
    env.set_status(&lead, "Picked");
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    assert_eq!(messages_of(&db, &lead), 2);
    // 19 newer messages, and one dated a second before the mark: the
    // newest page is the 19 and the mark's message, exactly.
    let mut times: Vec<String> = (1..=19)
        .map(|k| leadsync::time::fmt(now - chrono::Duration::seconds(1000 - k)))
        .collect();
    times.push(leadsync::time::fmt(
        now - chrono::Duration::minutes(30) - chrono::Duration::seconds(1),
    ));
    env.add_messages_at(&lead, times);
    env.set_status(&lead, "Hired");
    let o = env.run_ok(&["sync", "--business", &business]);
    assert_eq!(
        messages_of(&db, &lead),
        env.sandbox.messages(&lead).len() as i64,
        "every message of the conversation is mirrored: {}",
        text(&o)
    );
}

/// Reading on to [`LATE_SLACK`] before the mark turned a server that
/// ignores `sentBefore` into a lasting error: its first page held the
/// mark's message, which ended the poll before the slack, but that page
/// stops short of the slack, and paging back by a server that lists the
/// same page again "does not advance". The poll failed, its mark stayed,
/// and every later poll failed the same way, polled less and less often.
/// A page that reached the mark itself ends such a poll as it used to.
///
/// [`LATE_SLACK`]: leadsync::messages::LATE_SLACK
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_sent_before_still_ends_a_poll_that_reached_the_mark() {
    let (env, business, lead) = mirrored_silent_lead().await;
    let now = chrono::Utc::now();
    let at = |seconds: i64| leadsync::time::fmt(now - chrono::Duration::seconds(seconds));
    env.add_messages_at(&lead, vec![at(3600), at(1800)]);
    env.set_status(&lead, "Picked");
    env.run_ok(&["sync", "--business", &business]);
    let db = env.sql();
    let mark = || -> Option<String> {
        db.query_row(
            "SELECT complete_through FROM message_polls WHERE negotiation_id = ?1",
            [&lead],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(mark(), Some(at(1800)));
    env.sandbox.set_faults(Faults {
        ignore_sent_before: true,
        ..Faults::default()
    });
    // 19 messages from 29.8 to 26.8 minutes ago: the newest page is they
    // and the mark's message, and nothing older is ever listed.
    env.add_messages_at(&lead, (0..19).map(|k| at(1788 - 10 * k)).collect());
    for (round, status) in ["Hired", "Picked"].into_iter().enumerate() {
        env.set_status(&lead, status);
        let o = env.run_ok(&["sync", "--business", &business]);
        let (outcome, _) = pages_of(&db, &lead);
        assert_eq!(outcome, "ok", "poll {round}: {}", text(&o));
        assert_eq!(messages_of(&db, &lead), 21, "poll {round}");
        assert_eq!(mark(), Some(at(1788 - 180)), "poll {round}");
    }
}

/// The same message object stored by a webhook delivery and by a poll gave
/// two different rows: an empty `text` was `''` from a webhook and NULL from
/// a poll, a `sentAt` that is a number was NULL from a webhook and the
/// number from a poll. Whichever path brings it first, a message's columns
/// are the same.
#[test]
fn a_message_has_the_same_columns_whether_delivered_or_polled() {
    use leadsync::thumbtack::webhook::parse_delivery;
    for data in [
        r#"{"messageID":"1","negotiationID":"5","from":"Customer","text":"","sentAt":"2024-06-14T09:30:00+23:59"}"#,
        r#"{"messageID":"2","negotiationID":"5","from":"","text":"hi","sentAt":1718357400}"#,
        r#"{"messageID":"3","negotiationID":"5","from":"Business","text":"a\u0000b","sentAt":"2024-06-14T09:30:00.1Z"}"#,
        r#"{"messageID":"4","negotiationID":"5","from":7,"text":12,"sentAt":null}"#,
        r#"{"messageID":"5","negotiationID":"5","from":"Customer","text":"ok \ud83d\ude00","sentAt":"x"}"#,
    ] {
        let body = format!(r#"{{"event":{{"eventType":"MessageCreatedV4"}},"data":{data}}}"#);
        let (_, effect) = leadsync::ingest::delivery_effect(
            parse_delivery(body.as_bytes()).unwrap(),
            &body,
            leadsync::time::now(),
        );
        let messages::Effect::Message(hook) = effect else {
            panic!("{data}: not a message");
        };
        let raw: Box<serde_json::value::RawValue> = serde_json::from_str(data).unwrap();
        let polled = parse_message(&raw).unwrap();
        assert_eq!(
            (&hook.sent_at, &hook.sender, &hook.text, &hook.payload),
            (
                &polled.sent_at,
                &polled.sender,
                &polled.text,
                &polled.payload
            ),
            "{data}"
        );
        // Agreeing is not enough: a message of attachments only has the
        // text `""`, not none, by either path.
        if polled.message_id == "1" {
            assert_eq!(polled.text.as_deref(), Some(""), "{data}");
        }
    }
}

/// A text with an escape that is no Unicode character (a lone surrogate,
/// as a client that cut an emoji in two sends it) was stored as NULL, by a
/// webhook and by a poll alike: the message looked empty. Its text is kept,
/// the broken escape shown as U+FFFD; the payload keeps it exactly.
#[test]
fn a_message_text_with_a_lone_surrogate_keeps_the_rest_of_its_text() {
    use leadsync::thumbtack::webhook::{Content, parse_delivery};
    let data = r#"{"messageID":"1","negotiationID":"5","from":"Customer","text":"On my way \ud83d and \"more\"\ude00","sentAt":"2024-06-14T09:30:00Z"}"#;
    let raw: Box<serde_json::value::RawValue> = serde_json::from_str(data).unwrap();
    let expected = "On my way \u{FFFD} and \"more\"\u{FFFD}";
    assert_eq!(parse_message(&raw).unwrap().text.as_deref(), Some(expected));
    let body = format!(r#"{{"event":{{"eventType":"MessageCreatedV4"}},"data":{data}}}"#);
    let Content::Message(m) = parse_delivery(body.as_bytes()).unwrap().content else {
        panic!("not a message");
    };
    assert_eq!(m.text.as_deref(), Some(expected));
    assert_eq!(m.payload, data);
}

/// Review (merge of main's id rule): a webhook takes a message's
/// `messageID` and `negotiationID` only as a non-blank string or a number
/// of plain digits (`model::id_text`), yet a poll took any string or number
/// as its text: a message whose id was `1e3`, `1.0` or `" "` was stored by
/// a poll and ignored by a webhook. The same bytes now have the same
/// outcome by either path: stored under the same ids, or skipped by both.
#[test]
fn a_message_polled_and_delivered_has_the_same_outcome_for_any_id() {
    use leadsync::thumbtack::model::parse_message_page;
    use leadsync::thumbtack::webhook::{Content, parse_delivery};
    let ids = [
        r#""7""#,
        "7",
        "519153480500518912",
        "1e3",
        "1E3",
        "1.0",
        "-0",
        "-7",
        r#"" ""#,
        r#""\t""#,
        r#""""#,
    ];
    let mut stored = 0;
    for message_id in ids {
        for negotiation_id in ids {
            let data = format!(
                r#"{{"messageID":{message_id},"negotiationID":{negotiation_id},"from":"Customer","text":"hi","sentAt":"2024-06-14T09:30:00Z"}}"#
            );
            let body = format!(r#"{{"event":{{"eventType":"MessageCreatedV4"}},"data":{data}}}"#);
            let hook = match parse_delivery(body.as_bytes()).unwrap().content {
                Content::Message(m) => Some((m.message_id, m.negotiation_id)),
                Content::Unusable { .. } => None,
                _ => panic!("{data}: not a message delivery"),
            };
            let page = format!(r#"{{"data":[{data}],"pagination":{{"limit":50}}}}"#);
            let page = parse_message_page(page.as_bytes()).unwrap();
            let polled = page
                .messages
                .into_iter()
                .map(|m| (m.message_id, m.negotiation_id))
                .next();
            assert_eq!(polled.is_none() as i64, page.skipped, "{data}");
            assert_eq!(
                polled,
                hook.map(|(m, n)| (m, Some(n))),
                "{data}: polled and delivered differ"
            );
            stored += page.skipped.abs_diff(1) as usize;
        }
    }
    // Plain digits and non-blank strings are ids on both paths: 3 × 3.
    assert_eq!(stored, 9);
}

/// JSON allows a repeated key, and a lead that repeats one is read with its
/// last value counting. A message that repeated one (any key: `text`,
/// `attachments`) was not a message at all: a poll skipped it as "without a
/// messageID" and a webhook kept it as `ignored`, so it was never mirrored.
/// Its last value counts, by either path.
#[test]
fn a_message_that_repeats_a_key_is_stored_with_its_last_value() {
    use leadsync::thumbtack::webhook::{Content, parse_delivery};
    // A key is the same key however it is escaped: `te\u0078t` is `text`.
    for data in [
        r#"{"messageID":"1","negotiationID":"5","from":"Customer","text":"draft","text":"final","sentAt":"2024-06-14T09:30:00Z","attachments":[],"attachments":[]}"#,
        r#"{"messageID":"1","negotiationID":"5","from":"Customer","text":"draft","te\u0078t":"final","sentAt":"2024-06-14T09:30:00Z"}"#,
        r#"{"messageID":"1","negotiationID":"5","from":"Customer","te\u0078t":"draft","te\u0078t":"final","sentAt":"2024-06-14T09:30:00Z"}"#,
        r#"{"messageID":"1","negotiationID":"5","from":"Customer","te\u0078t":"draft","text":"final","sentAt":"2024-06-14T09:30:00Z"}"#,
    ] {
        let raw: Box<serde_json::value::RawValue> = serde_json::from_str(data).unwrap();
        let polled = parse_message(&raw).expect("a message repeating a key is a message");
        assert_eq!(
            (polled.message_id.as_str(), polled.text.as_deref()),
            ("1", Some("final")),
            "{data}"
        );
        let body = format!(r#"{{"event":{{"eventType":"MessageCreatedV4"}},"data":{data}}}"#);
        match parse_delivery(body.as_bytes()).unwrap().content {
            Content::Message(m) => assert_eq!(m.text.as_deref(), Some("final"), "{data}"),
            Content::Unusable { reason, .. } => panic!("{data}: unusable: {reason}"),
            _ => panic!("{data}: not a message"),
        }
    }
    // A lead delivered repeating a key is a lead too, as a poll reads it.
    let body = r#"{"event":{"eventType":"NegotiationCreatedV4"},"data":{"negotiationID":"5","business":{"businessID":"1"},"business":{"businessID":"2"},"status":"Open"}}"#;
    match parse_delivery(body.as_bytes()).unwrap().content {
        Content::Negotiation { lead, business_id } => {
            assert_eq!(
                (lead.negotiation_id.as_str(), business_id.as_deref()),
                ("5", Some("2"))
            )
        }
        Content::Unusable { reason, .. } => panic!("unusable: {reason}"),
        _ => panic!("not a negotiation"),
    }
}

/// A delivery whose envelope or `event` repeats a key is still JSON, and
/// SPEC §8 answers 400 only to a body that is not JSON or has no
/// `event.eventType`. It was refused with a 400 ("not a delivery
/// envelope: duplicate field"), so the message it carried was never
/// stored, not even in `webhook_events`, and Thumbtack retried it in vain.
#[test]
fn a_delivery_that_repeats_a_key_of_its_envelope_is_read() {
    use leadsync::thumbtack::webhook::{Content, parse_delivery};
    let message = r#"{"messageID":"1","negotiationID":"5","text":"hi"}"#;
    for body in [
        format!(
            r#"{{"event":{{"eventType":"MessageCreatedV4","webhookID":"w","eventType":"MessageCreatedV4"}},"data":{message}}}"#
        ),
        format!(
            r#"{{"event":{{"eventType":"MessageCreatedV4"}},"data":{{"messageID":"0"}},"data":{message}}}"#
        ),
    ] {
        let delivery = parse_delivery(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
        match delivery.content {
            Content::Message(m) => assert_eq!(m.text.as_deref(), Some("hi"), "{body}"),
            Content::Unusable { reason, .. } => panic!("{body}: unusable: {reason}"),
            _ => panic!("{body}: not a message"),
        }
    }
}

/// A key repeated inside a message is read with its last value, but a
/// conversation page that repeats `data` or `pagination` is not guessed
/// at: it is refused whole (an unreadable answer, the lead polled again
/// after the next pass), as a page of leads is.
#[test]
fn a_messages_page_that_repeats_data_or_pagination_is_refused_whole() {
    use leadsync::thumbtack::model::{parse_message_page, parse_page};
    let m = r#"{"messageID":"1","negotiationID":"5","text":"hi","sentAt":"2024-06-14T09:30:00Z"}"#;
    let l = r#"{"negotiationID":"5","status":"Open"}"#;
    for (page, entry) in [(true, m), (false, l)] {
        let read = |body: String| {
            if page {
                parse_message_page(body.as_bytes()).map(|_| ())
            } else {
                parse_page(body.as_bytes()).map(|_| ())
            }
        };
        assert!(
            read(format!(
                r#"{{"data":[{entry}],"pagination":{{"limit":20}}}}"#
            ))
            .is_ok()
        );
        for body in [
            format!(r#"{{"data":[{entry}],"data":[{entry}]}}"#),
            format!(r#"{{"data":[],"data":[{entry}]}}"#),
            format!(
                r#"{{"data":[{entry}],"pagination":{{"limit":20}},"pagination":{{"limit":20}}}}"#
            ),
            format!(r#"{{"d\u0061ta":[{entry}],"data":[{entry}]}}"#),
        ] {
            assert!(read(body.clone()).is_err(), "{body}");
        }
    }
}
