//! The real Thumbtack wire (SPEC §5): every pagination style with full and
//! head scans, known and unknown ends, the mass-missing guard, both lead
//! shapes, responses that did not come from the API, and `leadsync probe`.

mod common;

use common::{Env, FAST, count, text};
use leadsync::sandbox::{Faults, Mutation, Pagination, SandboxOptions, Shape};
use leadsync::thumbtack::paging::Cursor;
use leadsync::thumbtack::{Client, ClientSettings, Disposition};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

async fn env_with(pagination: Pagination, shape: Shape, businesses: usize) -> Env {
    Env::new(
        SandboxOptions {
            businesses,
            pagination,
            shape,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await
}

fn missing_ids(env: &Env) -> BTreeSet<String> {
    let db = env.sql();
    let mut st = db
        .prepare("SELECT negotiation_id FROM negotiations WHERE missing_since IS NOT NULL")
        .unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn last_run(env: &Env) -> (String, String, Option<String>, Option<String>, i64) {
    env.sql()
        .query_row(
            "SELECT kind, outcome, pagination, error, missing FROM sync_runs ORDER BY id DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap()
}

fn sync(env: &Env, args: &[&str]) -> (i32, String) {
    let mut all = vec!["sync"];
    all.extend_from_slice(args);
    let o = env.run(&all);
    (o.status.code().unwrap_or(-1), text(&o))
}

/// One style, end to end: head and full scans mirror every lead, a full
/// scan marks exactly the removed leads missing, the guard refuses a listing
/// that lost 80% of its leads until `--accept-missing`, and an unknown end
/// marks nothing.
async fn style_end_to_end(style: Pagination, name: &str) {
    let env = env_with(style, Shape::Mixed, 1).await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    assert_eq!(ids.len(), 60);

    // A head scan of an empty mirror reads to the end: every page is news.
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    let db = env.sql();
    assert_eq!(count(&db, "SELECT count(*) FROM negotiations"), 60, "{out}");
    let (kind, outcome, pagination, error, _) = last_run(&env);
    assert_eq!(
        (
            kind.as_str(),
            outcome.as_str(),
            pagination.as_deref(),
            error
        ),
        ("head", "ok", Some(name), None)
    );
    // A full scan of the same listing: nothing new, nothing missing.
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("0 new, 0 changed, 60 unchanged, 0 newly missing"),
        "{out}"
    );
    assert_eq!(last_run(&env).2.as_deref(), Some(name));

    // Three leads go (first page, middle, last page), two arrive.
    let removed: BTreeSet<String> = [3, 31, 59].iter().map(|&i| ids[i].clone()).collect();
    for id in &removed {
        env.sandbox
            .mutate(Mutation::Remove {
                negotiation_id: id.clone(),
            })
            .unwrap();
    }
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 2,
        })
        .unwrap();
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 new"), "{out}");
    assert!(
        missing_ids(&env).is_empty(),
        "a head scan marks nothing missing"
    );
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 newly missing"), "{out}");
    assert_eq!(missing_ids(&env), removed, "exactly the removed leads");
    assert_eq!(count(&db, "SELECT count(*) FROM negotiations"), 62);

    // The listing silently shrinks by 80%: 48 of the 59 present leads vanish.
    let listed = env.sandbox.lead_ids(&b);
    let vanished: BTreeSet<String> = listed[..48].iter().cloned().collect();
    for id in &vanished {
        env.sandbox
            .mutate(Mutation::Remove {
                negotiation_id: id.clone(),
            })
            .unwrap();
    }
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("listing looks truncated: 48 of 59 leads would go missing"),
        "{out}"
    );
    assert!(out.contains("--accept-missing"), "{out}");
    assert_eq!(missing_ids(&env), removed, "the guard marked nothing");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("error", 0));
    assert!(error.unwrap_or_default().contains("48 of 59"));
    // The operator accepts it.
    let (code, out) = sync(&env, &["--full", "--accept-missing"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("48 newly missing"), "{out}");
    let expected: BTreeSet<String> = removed.union(&vanished).cloned().collect();
    assert_eq!(missing_ids(&env), expected);

    // An unknown end (a full page, no marker): the pass succeeds, says so,
    // and marks nothing, though only 10 of the 11 listed leads were read.
    env.sandbox.set_pagination(Pagination::None);
    for args in [&["--full"][..], &[][..]] {
        let (code, out) = sync(&env, args);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("end is unknown"), "{out}");
        let (_, outcome, pagination, error, missing) = last_run(&env);
        assert_eq!(
            (outcome.as_str(), pagination.as_deref(), missing),
            ("ok", Some("single"), 0)
        );
        assert!(error.unwrap_or_default().contains("no pagination marker"));
        assert_eq!(missing_ids(&env), expected, "nothing newly missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_style_scans_mirror_everything_and_mark_exactly_the_removed() {
    style_end_to_end(Pagination::Next, "next").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_style_scans_mirror_everything_and_mark_exactly_the_removed() {
    style_end_to_end(Pagination::Token, "token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_style_scans_mirror_everything_and_mark_exactly_the_removed() {
    style_end_to_end(Pagination::Offset, "offset").await;
}

/// Style 1 with a token: `next` whose query carries `pageToken`, not an
/// offset (applied to our list path as it stands).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_with_a_page_token_scans_mirror_everything_and_mark_exactly_the_removed() {
    style_end_to_end(Pagination::NextToken, "next").await;
}

/// A bare array is one last page: short, the end is known (a full scan
/// marks the removed lead missing); full, the end is unknown (the pass
/// succeeds, says so, marks nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_array_is_one_last_page_known_when_short_unknown_when_full() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 7,
            pagination: Pagination::Bare,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 7);
    let (_, outcome, pagination, error, _) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), error),
        ("ok", Some("single"), None)
    );
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[4].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 newly missing"), "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[4].clone()]));

    // Ten leads more: the array is now a full page (page_size 10).
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 10,
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    let (_, outcome, pagination, error, missing) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), missing),
        ("ok", Some("single"), 0)
    );
    assert!(error.unwrap_or_default().contains("no pagination marker"));
    assert_eq!(
        missing_ids(&env),
        BTreeSet::from([ids[4].clone()]),
        "the six leads past the page are not marked missing"
    );
}

/// A listing of `leads` leads mirrored in full (uncapped, short pages),
/// then served with pages capped at 3 (page_size asks 10) and `faults`.
async fn capped_after_a_full_sync(pagination: Pagination, faults: Faults) -> (Env, Vec<String>) {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 8,
            pagination,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 8);
    env.sandbox.set_max_page_size(3);
    env.sandbox.set_faults(faults);
    (env, ids)
}

/// The reviewer's mirror corruption: a bare array never echoes its limit,
/// so a page the server capped below what we asked looked short, was taken
/// for the listing's known end, and a full scan marked every lead past it
/// missing. A short page without an echoed limit is now confirmed at the
/// next offset: this server honours `offset`, so the whole listing is read
/// (head and full scans), nothing goes missing, and a lead really gone
/// still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_bare_listing_is_read_by_offset_not_taken_for_its_end() {
    let (env, ids) = capped_after_a_full_sync(Pagination::Bare, Faults::default()).await;
    let b = env.business_ids()[0].clone();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 newly missing"), "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    let (_, outcome, pagination, error, _) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), error),
        ("ok", Some("offset"), None)
    );
    // Four leads arrive: a head scan reads
    // past the capped first page while its pages bring news.
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 4,
        })
        .unwrap();
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        count(&env.sql(), "SELECT count(*) FROM negotiations"),
        12,
        "{out}"
    );
    // With no news, a head scan takes the short first page for its end:
    // no request to confirm it.
    let before = env.sandbox.list_requests(&b);
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(env.sandbox.list_requests(&b) - before, 1, "{out}");
    // A lead really gone is still marked missing, and only it.
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[5].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 newly missing"), "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[5].clone()]));
}

/// The same capped bare listing from a server that ignores `offset`: the
/// confirmation answers the same leads again, so the end is unknown: the
/// pass succeeds, marks nothing, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_bare_listing_that_ignores_offset_is_an_unknown_end() {
    let (env, _) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            ignore_offset: true,
            ..Default::default()
        },
    )
    .await;
    for args in [&["--full"][..], &["--full"][..]] {
        let (code, out) = sync(&env, args);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("end is unknown"), "{out}");
        // The repeated page is not written (nor counted) a second time.
        assert!(out.contains("1 pages, 3 leads seen"), "{out}");
        assert!(missing_ids(&env).is_empty(), "{out}");
        let (_, outcome, _, error, missing) = last_run(&env);
        assert_eq!((outcome.as_str(), missing), ("ok", 0));
        let error = error.unwrap_or_default();
        assert!(error.contains("offset"), "{error}");
        assert!(error.contains("no lead was marked missing"), "{error}");
    }
}

/// The reviewer's unbounded confirm chain: a server that ignores `offset`
/// and lists leads whose id it spells `negotiationId` (unreadable, so the
/// repeated page has no digest to be caught by). Every confirmation
/// answered entries, was taken for new leads, and the next offset was
/// asked (up to a million requests). The end is now unknown at once: a
/// short page with no readable id has no lead to ask back, so it is not
/// confirmed at all (no request but the page's): the pass ends, succeeds
/// and marks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_listing_of_unreadable_ids_that_ignores_offset_ends_without_a_confirmation() {
    let (env, ids) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            ignore_offset: true,
            ..Default::default()
        },
    )
    .await;
    let b = env.business_ids()[0].clone();
    for id in &ids {
        env.sandbox
            .mutate(Mutation::Patch {
                negotiation_id: id.clone(),
                patch: serde_json::json!({"negotiationID": null, "negotiationId": id}),
            })
            .unwrap();
    }
    let before = env.sandbox.list_requests(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(env.sandbox.list_requests(&b) - before, 1, "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0));
    assert!(
        error
            .unwrap_or_default()
            .contains("readable negotiationID to ask back"),
        "{out}"
    );
}

/// A server that reads `offset` as a page number: the confirmation asks
/// the short page's last lead back (offset 2 of a page of 3) and gets
/// page 2 instead (leads 6 and 7), which does not start with it: the end is
/// unknown. It used to be asked offset 3 (page 3: empty), take that for the
/// end, and mark the five leads it never read missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_bare_listing_that_reads_offset_as_a_page_number_is_an_unknown_end() {
    let (env, _) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            offset_as_page: true,
            ..Default::default()
        },
    )
    .await;
    let b = env.business_ids()[0].clone();
    let before = env.sandbox.list_requests(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    assert_eq!(env.sandbox.list_requests(&b) - before, 2, "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0));
    assert!(error.unwrap_or_default().contains("lead offset"), "{out}");
}

/// The short page's last entry has no readable id (its lead spells it
/// `negotiationId`), so its last lead cannot be asked back: the confirmation
/// asked the next offset unchecked (offset 3), which a server reading
/// `offset` as a page number answers with page 3 (nothing), taken for the
/// end: a full scan marked the five leads it never read missing. The last
/// lead the page did list (one entry before) is asked back instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_page_ending_in_an_unreadable_id_is_not_confirmed_unchecked() {
    let (env, ids) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            offset_as_page: true,
            ..Default::default()
        },
    )
    .await;
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[2].clone(),
            patch: serde_json::json!({"negotiationID": null, "negotiationId": ids[2]}),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let unread: BTreeSet<String> = ids[3..].iter().cloned().collect();
    assert!(missing_ids(&env).is_disjoint(&unread), "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0));
    assert!(error.unwrap_or_default().contains("lead offset"), "{out}");
    // A server that pages by offset: the page's last listed lead comes
    // back first and the listing is read to its end; while it lists an
    // entry it cannot name (ids[2]'s), no lead is proven gone
    // (wire::a_full_scan_listing_an_entry_it_cannot_name_marks_no_lead_missing);
    // once it can, a lead really gone is marked missing.
    env.sandbox.set_faults(Faults::default());
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[6].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0), "{out}");
    assert!(
        error
            .unwrap_or_default()
            .contains("read without a readable negotiationID"),
        "{out}"
    );
    assert!(missing_ids(&env).is_disjoint(&unread), "{out}");
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[2].clone(),
            patch: serde_json::json!({"negotiationID": ids[2], "negotiationId": null}),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let (_, outcome, _, error, _) = last_run(&env);
    assert_eq!((outcome.as_str(), error), ("ok", None), "{out}");
    assert!(missing_ids(&env).contains(&ids[6]), "{out}");
    assert!(
        missing_ids(&env).is_disjoint(&unread.iter().filter(|i| **i != ids[6]).cloned().collect()),
        "{out}"
    );
}

/// A list entry with no readable `negotiationID` (here the lead spells it
/// `negotiationId`) is a lead the scan listed but cannot name: any of the
/// leads it did not list may be that one. A full scan used to mark every
/// unlisted lead missing all the same, the lead behind that entry with
/// them (a lead Thumbtack still lists shown gone). It now marks none,
/// says why, and does not claim to have confirmed every lead; once the
/// entry is readable again, a lead really gone is marked as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scan_listing_an_entry_it_cannot_name_marks_no_lead_missing() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 8,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 8);
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[2].clone(),
            patch: serde_json::json!({"negotiationID": null, "negotiationId": ids[2]}),
        })
        .unwrap();
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[6].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::new(), "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0), "{out}");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("1 list entry read without a readable negotiationID")
            && error.contains("no lead was marked missing"),
        "{error}"
    );
    assert!(out.contains("without a readable negotiationID"), "{out}");
    let confirmed_every = count(
        &env.sql(),
        "SELECT count(*) FROM sync_runs WHERE id = (SELECT max(id) FROM sync_runs)
             AND listed_at IS NOT NULL AND listed_ids IS NULL",
    );
    assert_eq!(
        confirmed_every, 0,
        "the scan did not name every lead it listed"
    );
    // Readable again: the listing names every lead, and the gone one is missing.
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[2].clone(),
            patch: serde_json::json!({"negotiationID": ids[2], "negotiationId": null}),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[6].clone()]), "{out}");
    let (_, outcome, _, error, _) = last_run(&env);
    assert_eq!((outcome.as_str(), error), ("ok", None), "{out}");
}

/// Merge of poll and hooks: an entry whose `negotiationID` is blank or a
/// number not written as plain digits (`1000.0`) is skipped, its text
/// named in `unread_ids` (hooks), yet it names no lead either: any lead the
/// scan did not list may be that one. Counted as listed by name only, it
/// let the scan mark the unlisted leads missing, the lead behind that
/// entry among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_scan_listing_a_blank_or_odd_id_marks_no_lead_missing() {
    for odd in [serde_json::json!(" "), serde_json::json!(1000.0)] {
        let env = Env::new(
            SandboxOptions {
                businesses: 1,
                leads_per_business: 8,
                ..Default::default()
            },
            false,
            FAST,
        )
        .await;
        let b = env.business_ids()[0].clone();
        let ids = env.sandbox.lead_ids(&b);
        let (code, out) = sync(&env, &["--full"]);
        assert_eq!(code, 0, "{out}");
        env.sandbox
            .mutate(Mutation::Patch {
                negotiation_id: ids[2].clone(),
                patch: serde_json::json!({ "negotiationID": odd }),
            })
            .unwrap();
        env.sandbox
            .mutate(Mutation::Remove {
                negotiation_id: ids[6].clone(),
            })
            .unwrap();
        let (code, out) = sync(&env, &["--full"]);
        assert_eq!(code, 0, "{odd}: {out}");
        assert_eq!(missing_ids(&env), BTreeSet::new(), "{odd}: {out}");
        let (_, outcome, _, error, missing) = last_run(&env);
        assert_eq!((outcome.as_str(), missing), ("ok", 0), "{odd}: {out}");
        assert!(
            error
                .unwrap_or_default()
                .contains("1 list entry read without a readable negotiationID"),
            "{odd}: {out}"
        );
    }
}

/// A strict server that refuses `offset` (400): the confirmation fails,
/// so the end is unknown: the pass succeeds, marks nothing, says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_bare_listing_that_refuses_offset_is_an_unknown_end() {
    let (env, _) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            reject_offset: true,
            ..Default::default()
        },
    )
    .await;
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0));
    let error = error.unwrap_or_default();
    assert!(
        error.contains("?offset=2) that would confirm the end was refused"),
        "{error}"
    );
    assert!(error.contains("unknown query parameter"), "{error}");
    // A head scan with news asks too, and ends as well.
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: env.business_ids()[0].clone(),
            count: 1,
        })
        .unwrap();
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 new"), "{out}");
}

/// A confirmation that fails on the way (a 503 beyond retries) says
/// nothing of the listing: the pass fails as any page error fails it
/// (it used to succeed with an unknown end, moving `last_full_sync_at`
/// forward), marks nothing; a head scan with news fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_bare_listing_whose_confirmation_fails_on_the_way_fails_the_pass() {
    let (env, _) = capped_after_a_full_sync(
        Pagination::Bare,
        Faults {
            offset_503: true,
            ..Default::default()
        },
    )
    .await;
    let b = env.business_ids()[0].clone();
    let full_at = || {
        env.sql()
            .query_row(
                "SELECT last_full_sync_at FROM businesses WHERE business_id = ?1",
                [&b],
                |r| r.get::<_, Option<String>>(0),
            )
            .unwrap()
    };
    let before = full_at();
    assert!(before.is_some());
    let (code, out) = sync(&env, &["--full"]);
    assert_ne!(code, 0, "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("error", 0), "{out}");
    assert!(error.unwrap_or_default().contains("503"), "{out}");
    assert_eq!(full_at(), before, "a failed pass is no full sync");
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 1,
        })
        .unwrap();
    let (code, out) = sync(&env, &[]);
    assert_ne!(code, 0, "{out}");
    assert_eq!(last_run(&env).1, "error", "{out}");
}

/// The confirmation's cost, counted: the default style (`next`, limit
/// echoed) asks no extra request in a full pass, whether the last page is
/// short or full; a `next` listing of one page that echoes no limit and
/// names no `next` at all looks like a marker-less page, and asks one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_next_style_asks_no_confirmation_request() {
    for (leads, pages) in [(63, 7), (60, 6), (7, 1)] {
        let env = Env::new(
            SandboxOptions {
                businesses: 1,
                leads_per_business: leads,
                ..Default::default()
            },
            false,
            FAST,
        )
        .await;
        let b = env.business_ids()[0].clone();
        for args in [&["--full"][..], &["--full"][..], &[][..]] {
            let before = env.sandbox.list_requests(&b);
            let (code, out) = sync(&env, args);
            assert_eq!(code, 0, "{out}");
            let asked = env.sandbox.list_requests(&b) - before;
            // A head scan stops after its unchanged pages.
            if args.is_empty() {
                assert!(asked <= pages, "{leads} leads: {asked} requests: {out}");
            } else {
                assert_eq!(asked, pages, "{leads} leads, {args:?}: {out}");
            }
            assert_eq!(last_run(&env).3, None, "{out}");
        }
        if leads == 7 {
            env.sandbox.set_faults(Faults {
                no_limit_echo: true,
                ..Default::default()
            });
            let before = env.sandbox.list_requests(&b);
            let (code, out) = sync(&env, &["--full"]);
            assert_eq!(code, 0, "{out}");
            assert_eq!(env.sandbox.list_requests(&b) - before, 2, "{out}");
        }
    }
}

/// Offset style echoing `offset` and `limit`, full pages, from a server that
/// reads `offset` as a page number: the full first page's next offset (3)
/// was asked unchecked, page 3 (nothing) was taken for the end, and a full
/// scan marked the five leads it never read missing. The first full page
/// is now proven: its last lead asked back (offset 2) must come first; page
/// 2 (leads 6 and 7) does not, so the end is unknown. A server paging by
/// offset proves it, and its listing is read to the end (as many requests
/// here: the proof's overlap of one lead moves no page boundary past the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_offset_listing_that_reads_offset_as_a_page_number_marks_nothing_missing() {
    let (env, ids) = capped_after_a_full_sync(
        Pagination::Offset,
        Faults {
            offset_as_page: true,
            ..Default::default()
        },
    )
    .await;
    let b = env.business_ids()[0].clone();
    let before = env.sandbox.list_requests(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    assert!(out.contains("end is unknown"), "{out}");
    assert_eq!(env.sandbox.list_requests(&b) - before, 2, "{out}");
    let (_, outcome, pagination, error, missing) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), missing),
        ("ok", Some("offset"), 0)
    );
    assert!(error.unwrap_or_default().contains("lead offset"), "{out}");
    // A server paging by offset: leads 0-2, 2-4 (the proof), then 5-6
    // (short: the end), read twice (the second reading confirms the lead
    // not listed); a lead really gone is marked missing.
    env.sandbox.set_faults(Faults::default());
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[7].clone(),
        })
        .unwrap();
    let before = env.sandbox.list_requests(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[7].clone()]), "{out}");
    assert_eq!(env.sandbox.list_requests(&b) - before, 6, "{out}");
    assert!(out.contains("7 leads seen"), "{out}");
    let (_, outcome, _, error, _) = last_run(&env);
    assert_eq!((outcome.as_str(), error), ("ok", None), "{out}");
}

/// Offset style echoing `offset` and `limit`, 3 pages of leads, from a
/// server that refuses (400) an offset not a multiple of the limit: the
/// first full page's proof (its last lead asked back, offset 9) is refused.
/// That failed every pass, head and full, after its first page (before the
/// proof, offset 10 was accepted and the whole listing read). A refused
/// proof now reads on at the next offset unproven: every lead is read, the
/// end is unknown (nothing marked missing, a lead really gone included),
/// the pass is `ok` and says the proof was refused; a head scan succeeds.
/// A proof that fails otherwise (a 503) still fails the pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_proof_of_a_full_offset_page_reads_on_unproven() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 30,
            pagination: Pagination::Offset,
            ..Default::default()
        },
        false,
        FAST,
    )
    .await;
    env.sandbox.set_faults(Faults {
        reject_unaligned_offset: true,
        ..Default::default()
    });
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 30);
    assert!(out.contains("end is unknown"), "{out}");
    let (_, outcome, pagination, error, missing) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), missing),
        ("ok", Some("offset"), 0),
        "{out}"
    );
    let error = error.unwrap_or_default();
    assert!(error.contains("?offset=9"), "{error}");
    assert!(error.contains("refused"), "{error}");
    assert!(
        error.contains("offset must be a multiple of limit"),
        "{error}"
    );
    // A lead gone is not marked missing (the end is unknown), and the
    // leads past the first page are still read.
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[25].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    assert!(out.contains("29 leads seen"), "{out}");
    assert_eq!(last_run(&env).1, "ok", "{out}");
    // A head scan with news asks the proof too, and succeeds.
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 1,
        })
        .unwrap();
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 new"), "{out}");
    assert!(out.contains("lead offset was refused"), "{out}");
    assert_eq!(last_run(&env).1, "ok", "{out}");
    // The proof failing on the way (a 503, no refusal) says nothing of
    // the listing: the pass fails, as on any page, and marks nothing.
    env.sandbox.set_faults(Faults {
        offset_503: true,
        ..Default::default()
    });
    let (code, out) = sync(&env, &["--full"]);
    assert_ne!(code, 0, "{out}");
    assert!(missing_ids(&env).is_empty(), "{out}");
    let (_, outcome, _, error, _) = last_run(&env);
    assert_eq!(outcome, "error", "{out}");
    assert!(error.unwrap_or_default().contains("503"), "{out}");
}

/// Offset style whose `pagination` leaves `limit` out: a capped page is
/// short against what we asked, but not the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_offset_listing_without_its_limit_is_read_to_the_end() {
    let (env, ids) = capped_after_a_full_sync(
        Pagination::Offset,
        Faults {
            no_limit_echo: true,
            ..Default::default()
        },
    )
    .await;
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[7].clone(),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 newly missing"), "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[7].clone()]));
    let (_, outcome, pagination, error, _) = last_run(&env);
    assert_eq!(
        (outcome.as_str(), pagination.as_deref(), error),
        ("ok", Some("offset"), None)
    );
}

/// A `next` naming another host is an error and is never followed (nor is
/// anything marked missing); one naming Thumbtack's production host (as
/// the documented example does) has its query applied to `api.base_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_on_another_host_fails_the_pass_unfollowed_and_thumbtacks_own_is_applied_here() {
    let env = env_with(Pagination::Next, Shape::Mixed, 1).await;
    let other = leadsync::sandbox::Sandbox::start(SandboxOptions {
        businesses: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let b = env.business_ids()[0].clone();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let listed = env.sandbox.list_requests(&b);
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: env.sandbox.lead_ids(&b)[30].clone(),
        })
        .unwrap();

    for style in [Pagination::Next, Pagination::NextToken] {
        env.sandbox.set_pagination(style);
        env.sandbox.set_faults(Faults {
            // Same address, another name: the host is what is judged.
            next_host: Some(format!("localhost:{}", other.addr().port())),
            ..Default::default()
        });
        let (code, out) = sync(&env, &["--full"]);
        assert_eq!(code, 1, "{style:?}: {out}");
        assert!(out.contains("names another host (localhost)"), "{out}");
        let (_, outcome, _, error, missing) = last_run(&env);
        assert_eq!((outcome.as_str(), missing), ("error", 0), "{style:?}");
        assert!(error.unwrap_or_default().contains("another host"));
        assert!(
            missing_ids(&env).is_empty(),
            "{style:?}: nothing marked missing"
        );
        assert_eq!(other.stats().requests, 0, "{style:?}: never followed");
    }
    // Only the first page of each failed pass was asked of this sandbox.
    assert_eq!(env.sandbox.list_requests(&b), listed + 2);

    env.sandbox.set_faults(Faults {
        next_host: Some("api.thumbtack.com".into()),
        ..Default::default()
    });
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 newly missing"), "{out}");
    assert_eq!(missing_ids(&env).len(), 1);
    assert_eq!(other.stats().requests, 0);
}

/// SPEC §5 headers on every request each command makes (listing, GET,
/// job status, reply, messages, webhooks, probe, token endpoint): the
/// sandbox records any request without `accept: application/json`, a
/// `user-agent` or (API calls) `authorization: Bearer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_accept_user_agent_and_bearer() {
    const AGENT: &str = "acme-leads/2.1 (+ops@acme.test)";
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 12,
            ..Default::default()
        },
        true,
        &format!(
            "{}\n[messages]\nsync = true\n",
            FAST.replacen("[api]\n", &format!("[api]\nuser_agent = \"{AGENT}\"\n"), 1)
        ),
    )
    .await;
    let b = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&b)[0].clone();
    env.run_ok(&["sync", "--full"]);
    env.run_ok(&[
        "enqueue",
        "--negotiation",
        &lead,
        "--business",
        &b,
        "--status",
        "appt_scheduled",
        "--at",
        "2026-11-01T10:00:00Z",
    ]);
    env.run_ok(&[
        "reply",
        "--business",
        &b,
        "--negotiation",
        &lead,
        "--text",
        "On my way",
    ]);
    env.run_ok(&["drain"]);
    env.run_ok(&["webhooks", "list"]);
    let (code, out) = probe(&env, &b, false);
    assert_eq!(code, 0, "{out}");
    assert_eq!(env.sandbox.deliveries().len(), 1);
    assert_eq!(env.sandbox.replies().len(), 1);

    let stats = env.sandbox.stats();
    for route in [
        format!("list {b}"),
        "get".into(),
        "job-status".into(),
        "reply".into(),
        "messages".into(),
    ] {
        assert!(stats.by_route.contains_key(&route), "{route}: {stats:?}");
    }
    assert!(
        stats.by_route.keys().any(|r| r.starts_with("token ")),
        "{stats:?}"
    );
    assert!(
        stats.by_route.keys().any(|r| r.starts_with("webhooks ")),
        "{stats:?}"
    );
    assert!(
        stats.missing_headers.is_empty(),
        "{:?}",
        stats.missing_headers
    );
    assert_eq!(
        stats.user_agents,
        BTreeSet::from([AGENT.to_string()]),
        "api.user_agent, on every request"
    );
    assert!(stats.requests > 5, "{stats:?}");
}

/// `leadsync sandbox` itself: its variant knobs reach the server it runs
/// (`--pagination next-token`, `--next-host`, `--shape docs`,
/// `--client-id`/`--client-secret`, `--token-error`), and a sync against
/// its written configuration meets each in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_command_serves_the_variants_its_knobs_name() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let fixture_dir = dir.path().join("fixture");
    /// Stopped however the test ends (a panic included).
    struct Stopped(std::process::Child);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stopped(
        common::spawn(
            std::process::Command::new(common::bin())
                .args([
                    "sandbox",
                    "--listen",
                    "127.0.0.1:0",
                    "--businesses",
                    "1",
                    "--leads-per-business",
                    "25",
                    "--pagination",
                    "next-token",
                    "--next-host",
                    "elsewhere.test:8080",
                    "--shape",
                    "docs",
                    "--client-id",
                    "cli:client+1",
                    "--client-secret",
                    "cli secret%+",
                    "--token-error",
                    "invalid_scope",
                    "--token-fail",
                    "503,0",
                    "--ignore-offset",
                    "--no-limit-echo",
                    "--write-config",
                ])
                .arg(&fixture_dir)
                .env_remove("LEADSYNC_LOG")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null()),
        )
        .unwrap(),
    );
    let mut lines = std::io::BufReader::new(child.0.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("inspect: GET") {
            break;
        }
    }
    assert!(
        printed.contains("(next-token pagination, docs lead shape)"),
        "{printed}"
    );
    assert!(
        printed.contains("OAuth client: cli:client+1 / "),
        "{printed}"
    );
    let base = printed
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let overrides = common::write(dir.path(), "overrides.toml", FAST);
    let run = |args: &[&str]| {
        let o = common::output(
            std::process::Command::new(common::bin())
                .arg("--config")
                .arg(fixture_dir.join("leadsync.toml"))
                .arg("--config")
                .arg(&overrides)
                .args(args)
                .env_remove("LEADSYNC_LOG"),
        )
        .unwrap();
        (o.status.code().unwrap_or(-1), text(&o))
    };
    let http = common::http_client();
    let faults: serde_json::Value = http
        .get(format!("{base}/_sandbox/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(faults["next_host"], "elsewhere.test:8080");
    assert_eq!(faults["ignore_offset"], true);
    assert_eq!(faults["no_limit_echo"], true);

    // The token endpoint refuses the client (once the credentials, sent
    // form-urlencoded, were accepted).
    let (code, out) = run(&["sync"]);
    assert_eq!(code, 1, "{out}");
    // `--token-fail 503,0`: two answers lost, asked again at once each time.
    assert!(out.contains("HTTP 503"), "{out}");
    assert!(out.contains("asking again at once"), "{out}");
    assert!(out.contains("OAuth client refused"), "{out}");
    assert!(out.contains("invalid_scope"), "{out}");
    // Cleared: the first page names another host; the pass fails there.
    let r = http
        .post(format!("{base}/_sandbox/token-faults"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (code, out) = run(&["sync", "--full"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("names another host (elsewhere.test)"), "{out}");
    // Cleared: every lead, read through a `next` carrying a page token.
    let r = http
        .post(format!("{base}/_sandbox/faults"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (code, out) = run(&["sync", "--full"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("3 pages, 25 leads seen: 25 new"), "{out}");
    let db = rusqlite::Connection::open(fixture_dir.join("leadsync.db")).unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE customer_name IS NOT NULL AND lead_price IS NULL"
        ),
        25,
        "the docs shape"
    );
    assert_eq!(
        db.query_row(
            "SELECT pagination FROM sync_runs ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get::<_, String>(0)
        )
        .unwrap(),
        "next"
    );
}

/// Knob values the sandbox could not honour as named are refused at start,
/// with the reason, instead of being served silently otherwise.
#[test]
fn the_sandbox_command_refuses_knobs_it_cannot_honour() {
    for (args, why) in [
        (&["--next-host", "a\"b"][..], "host[:port]"),
        (&["--next-host", "evil.test/x?y="][..], "host[:port]"),
        (&["--next-host", "h:99999"][..], "host[:port]"),
        (
            &["--next-host", "h:80", "--pagination", "offset"][..],
            "next or next-token only",
        ),
        (&["--token-fail", "503,1000"][..], "100-599"),
        (&["--token-fail", "42"][..], "100-599"),
        (&["--client-id", " id"][..], "whitespace"),
        (&["--client-secret", "secret\n"][..], "whitespace"),
        (&["--client-secret", ""][..], "empty"),
    ] {
        let mut child = common::spawn(
            std::process::Command::new(common::bin())
                .args(["sandbox", "--listen", "127.0.0.1:0"])
                .args(args)
                .env_remove("LEADSYNC_LOG")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .unwrap();
        // A knob accepted would serve until stopped: bounded, then killed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let status = status.unwrap_or_else(|| panic!("{args:?} was accepted: {err}"));
        assert!(!status.success(), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

fn lead_value(env: &Env, id: &str) -> serde_json::Value {
    serde_json::from_str(&env.sandbox.lead_json(id).unwrap()).unwrap()
}

type Columns = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn columns(env: &Env, id: &str) -> Columns {
    env.sql()
        .query_row(
            "SELECT created_at, category, customer_name, city, zip, customer_phone, lead_price, charge_state
               FROM negotiations WHERE negotiation_id = ?1",
            [id],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            },
        )
        .unwrap()
}

fn utc(t: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(t)
        .unwrap()
        .with_timezone(&chrono::Utc)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_shape_fills_every_column() {
    let env = env_with(Pagination::Next, Shape::Schema, 1).await;
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let b = env.business_ids()[0].clone();
    let mut offsets = 0;
    for id in env.sandbox.lead_ids(&b) {
        let v = lead_value(&env, &id);
        let (created, category, name, city, zip, phone, price, charge) = columns(&env, &id);
        let sent = v["createdAt"].as_str().unwrap();
        if !sent.ends_with('Z') {
            offsets += 1;
        }
        assert_eq!(
            created.as_deref(),
            Some(utc(sent).as_str()),
            "UTC whatever the offset"
        );
        assert_eq!(
            category.as_deref(),
            v["request"]["category"]["name"].as_str()
        );
        let first = v["customer"]["firstName"].as_str().unwrap();
        let last = v["customer"]["lastName"].as_str().unwrap();
        let expected = if last.is_empty() {
            first.to_string()
        } else {
            format!("{first} {last}")
        };
        assert_eq!(name, Some(expected), "First Last");
        assert_eq!(city.as_deref(), v["request"]["location"]["city"].as_str());
        assert_eq!(zip.as_deref(), v["request"]["location"]["zipCode"].as_str());
        assert_eq!(phone.as_deref(), v["customer"]["phone"].as_str());
        assert_eq!(
            price.as_deref(),
            v["leadPrice"].as_str(),
            "the price as sent"
        );
        assert!(price.unwrap().starts_with('$'));
        assert_eq!(charge.as_deref(), v["chargeState"].as_str());
    }
    assert!(offsets > 0, "some createdAt values carry an offset");
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM negotiations WHERE typeof(lead_price) <> 'text'"
        ),
        0,
        "lead_price is text, never a number"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_shape_fills_its_columns_and_leaves_the_rest_empty() {
    let env = env_with(Pagination::Token, Shape::Docs, 1).await;
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let b = env.business_ids()[0].clone();
    for id in env.sandbox.lead_ids(&b) {
        let v = lead_value(&env, &id);
        let (created, category, name, city, zip, phone, price, charge) = columns(&env, &id);
        assert_eq!(created, v["createTime"].as_str().map(utc));
        assert_eq!(category.as_deref(), v["category"]["name"].as_str());
        assert_eq!(name.as_deref(), v["customer"]["displayName"].as_str());
        assert_eq!(city.as_deref(), v["customer"]["location"]["city"].as_str());
        assert_eq!(
            zip.as_deref(),
            v["customer"]["location"]["zipCode"].as_str()
        );
        assert_eq!((phone, price, charge), (None, None, None));
    }
}

/// One lead carrying both published shapes at once, with different values:
/// each convenience column takes the first present source (SPEC §5), then
/// the next one once the first is gone; a price is kept as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_convenience_column_takes_the_first_present_source() {
    let env = env_with(Pagination::Next, Shape::Schema, 1).await;
    let b = env.business_ids()[0].clone();
    let id = env.sandbox.lead_ids(&b)[5].clone();
    let patch = |p: serde_json::Value| {
        env.sandbox
            .mutate(Mutation::Patch {
                negotiation_id: id.clone(),
                patch: p,
            })
            .unwrap();
        let (code, out) = sync(&env, &["--full"]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("1 changed"), "{out}");
    };
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    patch(serde_json::json!({
        "category": {"name": "Docs Category"},
        "customer": {
            "displayName": "Docs Name",
            "firstName": "Ann",
            "lastName": "Lee",
            "location": {"city": "Docsville", "zipCode": "99999"}
        },
        "leadPrice": "$1,234.50",
        "chargeState": "Refunded"
    }));
    let v = lead_value(&env, &id);
    let (_, category, name, city, zip, phone, price, charge) = columns(&env, &id);
    assert_eq!(
        category.as_deref(),
        v["request"]["category"]["name"].as_str(),
        "request.category.name before category.name"
    );
    assert_ne!(category.as_deref(), Some("Docs Category"));
    assert_eq!(
        name.as_deref(),
        Some("Docs Name"),
        "displayName before first + last"
    );
    assert_eq!(city.as_deref(), v["request"]["location"]["city"].as_str());
    assert_eq!(zip.as_deref(), v["request"]["location"]["zipCode"].as_str());
    assert_ne!(city.as_deref(), Some("Docsville"), "request.location first");
    assert_ne!(zip.as_deref(), Some("99999"), "request.location first");
    assert_eq!(phone.as_deref(), v["customer"]["phone"].as_str());
    assert_eq!(
        (price.as_deref(), charge.as_deref()),
        (Some("$1,234.50"), Some("Refunded")),
        "the price as sent"
    );

    // The first sources go: the second ones fill the columns.
    patch(serde_json::json!({
        "request": {"category": null, "location": null},
        "customer": {"displayName": null, "phone": null},
        "leadPrice": "25",
        "chargeState": null
    }));
    let (_, category, name, city, zip, phone, price, charge) = columns(&env, &id);
    assert_eq!(
        (category, name, city, zip, phone, price, charge),
        (
            Some("Docs Category".into()),
            Some("Ann Lee".into()),
            Some("Docsville".into()),
            Some("99999".into()),
            None,
            Some("25".into()),
            None
        )
    );
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiations WHERE negotiation_id = '{id}' AND typeof(lead_price) = 'text'"
            )
        ),
        1,
        "\"25\" stays text"
    );
}

fn client(env: &Env) -> Arc<Client> {
    let config = env.config();
    let auth = Arc::new(leadsync::app::open_auth(&config, None, HashMap::new()).unwrap());
    Arc::new(Client::new(ClientSettings::from_config(&config), auth).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_html_404s_are_retried_never_followed_or_dead() {
    let env = env_with(Pagination::Next, Shape::Mixed, 1).await;
    let c = client(&env);
    let b = env.business_ids()[0].clone();

    env.sandbox.set_faults(Faults {
        redirect: 1.0,
        ..Default::default()
    });
    let e = c.list_page(&b, &Cursor::first(10)).await.unwrap_err();
    assert_eq!(e.disposition, Disposition::Retry);
    assert_eq!(e.http_status, Some(301));
    assert!(
        e.message.contains(&format!(
            "redirected to {}/moved/api/v4/businesses/{b}/negotiations",
            env.sandbox.base_url()
        )) && e.message.contains("check api.base_url"),
        "{}",
        e.message
    );
    assert_eq!(
        env.sandbox.stats().requests,
        1,
        "the redirect was not followed"
    );

    env.sandbox.set_faults(Faults {
        html_404: 1.0,
        ..Default::default()
    });
    let e = c.list_page(&b, &Cursor::first(10)).await.unwrap_err();
    assert_eq!(e.disposition, Disposition::Retry, "{}", e.message);
    assert_eq!(e.http_status, Some(404));
    assert!(
        e.message.contains("not from the API") && e.message.contains("<!DOCTYPE html>"),
        "the body's first line is recorded: {}",
        e.message
    );

    // The drainer: a job status under either fault stays pending, counted, never dead.
    env.sandbox.set_faults(Faults::default());
    assert_eq!(sync(&env, &[]).0, 0);
    let lead = env.sandbox.lead_ids(&b)[0].clone();
    for (faults, status, needle) in [
        (
            Faults {
                redirect: 1.0,
                ..Default::default()
            },
            301,
            "redirected to",
        ),
        (
            Faults {
                html_404: 1.0,
                ..Default::default()
            },
            404,
            "not from the API",
        ),
    ] {
        env.sandbox.set_faults(faults);
        let o = env.run(&[
            "enqueue",
            "--negotiation",
            &lead,
            "--status",
            "appt_scheduled",
            "--at",
            "2026-01-02T10:00:00Z",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let row: i64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        let o = env.run(&["drain"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let (state, attempts, http, error): (String, i64, i64, String) = env
            .sql()
            .query_row(
                "SELECT state, attempts, last_http_status, last_error FROM outbox WHERE id = ?1",
                [row],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!((state.as_str(), attempts, http), ("pending", 1, status));
        assert!(error.contains(needle), "{error}");
        env.sql()
            .execute("UPDATE outbox SET state = 'canceled' WHERE id = ?1", [row])
            .unwrap();
    }
    assert!(env.sandbox.deliveries().is_empty());

    // A success records its real status and trace id.
    env.sandbox.set_faults(Faults::default());
    let o = env.run(&[
        "enqueue",
        "--negotiation",
        &lead,
        "--status",
        "job_complete",
        "--at",
        "2026-01-03T10:00:00Z",
    ]);
    let row: i64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (http, trace): (i64, Option<String>) = env
        .sql()
        .query_row(
            "SELECT last_http_status, last_trace_id FROM outbox WHERE id = ?1",
            [row],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(http, 200);
    assert!(
        trace.is_some_and(|t| !t.is_empty()),
        "trace id of a success"
    );
}

fn probe(env: &Env, business: &str, json: bool) -> (i32, String) {
    let mut args = vec!["probe", "--business", business];
    if json {
        args.push("--json");
    }
    let o = env.run(&args);
    (o.status.code().unwrap_or(-1), text(&o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_shows_each_style_in_text_and_json() {
    for (style, name, next) in [
        (Pagination::Next, "next", Some("?limit=10&offset=10")),
        (Pagination::Token, "token", Some("?limit=10&pageToken=")),
        // The first full page of an offset listing: its last lead is asked
        // back (offset 9), to prove that the server pages by lead offset.
        (Pagination::Offset, "offset", Some("?limit=10&offset=9")),
        (Pagination::None, "single", None),
        (Pagination::NextToken, "next", Some("?limit=10&pageToken=")),
        (Pagination::Bare, "single", None),
    ] {
        let env = Env::new(
            SandboxOptions {
                businesses: 1,
                pagination: style,
                ..Default::default()
            },
            true,
            FAST,
        )
        .await;
        let b = env.business_ids()[0].clone();
        let first = env.sandbox.lead_ids(&b)[0].clone();
        let (code, out) = probe(&env, &b, false);
        assert_eq!(code, 0, "{out}");
        for needle in [
            &format!("list: GET /api/v4/businesses/{b}/negotiations?limit=10"),
            "HTTP 200, traceID ",
            &format!("pagination style: {name}"),
            &format!("lead {first}"),
            "top-level keys: ",
            "negotiationID",
            "columns filled: ",
            &format!("get: GET /api/v4/negotiations/{first}"),
            "the listed entry and the GET body are the same",
            "scopes: supply::negotiations.read",
            "probe: ok",
        ] {
            assert!(out.contains(needle), "{name}: {needle:?} in\n{out}");
        }
        match next {
            Some(q) => assert!(out.contains(&format!("next page: {q}")), "{out}"),
            None => assert!(out.contains("end of the listing: UNKNOWN"), "{out}"),
        }
        assert!(!out.contains("traceID (none)"), "{out}");

        let (code, out) = probe(&env, &b, true);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
        assert_eq!(v["pagination"]["style"], name);
        assert_eq!(v["list"]["http_status"], 200);
        assert_eq!(v["lead"]["negotiation_id"], first.as_str());
        assert_eq!(v["comparison"]["same"], true);
        assert_eq!(v["token"]["kind"], "oauth");
        assert!(
            v["lead"]["filled"]["customer_name"].is_string(),
            "{}",
            v["lead"]
        );
        assert!(
            v["lead"]["top_level_keys"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("negotiationID"))
        );
        // Read-only: the mirror was never created.
        assert!(!env.database().exists());
    }
}

/// A short bare page: probe says the end is not confirmed and which query
/// a sync asks to confirm it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_says_a_short_page_without_its_limit_is_not_a_confirmed_end() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            leads_per_business: 4,
            pagination: Pagination::Bare,
            ..Default::default()
        },
        true,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let (code, out) = probe(&env, &b, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("end of the listing: NOT CONFIRMED"), "{out}");
    // The page's last lead asked back (offset 3 of 4).
    assert!(out.contains("?limit=10&offset=3"), "{out}");
    let (code, out) = probe(&env, &b, true);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(v["pagination"]["confirm_query"], "limit=10&offset=3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_a_refused_listing_and_fails() {
    let env = env_with(Pagination::Next, Shape::Schema, 1).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_faults(Faults {
        html_404: 1.0,
        ..Default::default()
    });
    let (code, out) = probe(&env, &b, false);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("HTTP 404") && out.contains("not from the API"),
        "{out}"
    );
    assert!(out.contains("probe: FAILED"), "{out}");
    assert!(out.contains("the access token is opaque"), "{out}");
    let (code, out) = probe(&env, "123", false);
    assert_eq!(code, 1);
    assert!(
        out.contains("business 123 is not in the configuration"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_an_oauth_grant_refuses_to_race_a_running_daemon() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            ..Default::default()
        },
        true,
        FAST,
    )
    .await;
    let b = env.business_ids()[0].clone();
    let session = common::open_session(env.config()).await;
    let (code, out) = probe(&env, &b, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("another leadsync process"), "{out}");
    assert_eq!(env.sandbox.stats().requests, 0, "nothing was sent");
    drop(session);
    let (code, out) = probe(&env, &b, false);
    assert_eq!(code, 0, "{out}");
}

/// A lead removed while a full scan is between two pages shifts every later
/// lead one place down an offset listing: the lead at the page boundary is
/// never listed to this scan. It must not be marked missing for that.
async fn a_lead_removed_mid_scan(style: Pagination) {
    let env = env_with(style, Shape::Mixed, 1).await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 60);

    let scan = full_scan_at_its_second_page(&env, &b).await;
    // The second page is asked for (and held 400 ms): remove a lead of the first.
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[3].clone(),
        })
        .unwrap();
    env.sandbox.set_faults(Faults::default());
    let o = tokio::task::spawn_blocking(move || scan.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // ids[3] was listed before it went; ids[10] never was, but exists.
    assert_eq!(
        missing_ids(&env),
        BTreeSet::new(),
        "ids[10], skipped by the shift, is not missing: {}",
        text(&o)
    );
    // Nor does the scan say it confirmed every lead as mirrored (for the
    // ordering of webhook deliveries): ids[10] was listed only by the
    // second reading, which is compared with nothing.
    let confirmed = || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_runs WHERE id = (SELECT max(id) FROM sync_runs)
                 AND outcome = 'ok' AND listed_at = started_at AND listed_ids IS NULL",
        )
    };
    assert_eq!(confirmed(), 0);
    // The next full scan finds the removed lead gone, and only it.
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[3].clone()]), "{out}");
    assert_eq!(confirmed(), 1, "every lead listed, or found gone");
}

/// A `sync --full` started with every answer held 400 ms, once business
/// `b`'s second page is requested: the first page is read, the second not
/// yet. The caller clears the faults.
async fn full_scan_at_its_second_page(env: &Env, b: &str) -> std::process::Child {
    env.sandbox.set_faults(Faults {
        latency_ms: 400,
        ..Faults::default()
    });
    let before = env.sandbox.list_requests(b);
    let scan = env
        .cli()
        .args(["sync", "--full"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_until(
        "the second page is requested",
        std::time::Duration::from_secs(30),
        || env.sandbox.list_requests(b) >= before + 2,
    )
    .await;
    scan
}

/// [`a_lead_removed_mid_scan`], and the lead the shift hid from the scan
/// (ids[10]) loses its readable id meanwhile: the second reading, which
/// looks for the leads the first one did not list, lists it as an entry it
/// cannot name. It used to be marked missing all the same, though it is
/// listed; now no lead is (any unlisted one may be that entry), the pass
/// says why, and a later scan that can name it marks only the gone lead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_second_reading_cannot_name_marks_no_lead_missing() {
    let env = env_with(Pagination::Next, Shape::Mixed, 1).await;
    let b = env.business_ids()[0].clone();
    let ids = env.sandbox.lead_ids(&b);
    let (code, out) = sync(&env, &[]);
    assert_eq!(code, 0, "{out}");
    let scan = full_scan_at_its_second_page(&env, &b).await;
    env.sandbox
        .mutate(Mutation::Remove {
            negotiation_id: ids[3].clone(),
        })
        .unwrap();
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[10].clone(),
            patch: serde_json::json!({"negotiationID": null, "negotiationId": ids[10]}),
        })
        .unwrap();
    env.sandbox.set_faults(Faults::default());
    let o = tokio::task::spawn_blocking(move || scan.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(missing_ids(&env), BTreeSet::new(), "{}", text(&o));
    let (_, outcome, _, error, missing) = last_run(&env);
    assert_eq!((outcome.as_str(), missing), ("ok", 0), "{}", text(&o));
    assert!(
        error
            .unwrap_or_default()
            .contains("1 list entry read without a readable negotiationID"),
        "{}",
        text(&o)
    );
    env.sandbox
        .mutate(Mutation::Patch {
            negotiation_id: ids[10].clone(),
            patch: serde_json::json!({"negotiationID": ids[10], "negotiationId": null}),
        })
        .unwrap();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(missing_ids(&env), BTreeSet::from([ids[3].clone()]), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_removed_mid_scan_marks_no_neighbour_missing_offset() {
    a_lead_removed_mid_scan(Pagination::Offset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_removed_mid_scan_marks_no_neighbour_missing_next() {
    a_lead_removed_mid_scan(Pagination::Next).await;
}

/// Every transient fault SPEC §5 and §6 name, each striking a listing
/// request of a real `sync --full` (the poller's code) at least once, in
/// every pagination style: the pass retries through them, mirrors every
/// lead, and marks exactly the removed leads missing — a page that failed
/// on the way is neither skipped nor taken for the listing's end.
async fn a_full_scan_through_every_transient_fault(style: Pagination, name: &str) {
    use leadsync::sandbox::ScriptedFault as F;
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            pagination: style,
            ..Default::default()
        },
        false,
        &FAST
            .replace("timeout_secs = 5", "timeout_secs = 1")
            .replace("read_retries = 0", "read_retries = 3"),
    )
    .await;
    let b = env.business_ids()[0].clone();
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{out}");
    let ids = env.sandbox.lead_ids(&b);
    let removed: BTreeSet<String> = [3, 31, 59].iter().map(|&i| ids[i].clone()).collect();
    for id in &removed {
        env.sandbox
            .mutate(Mutation::Remove {
                negotiation_id: id.clone(),
            })
            .unwrap();
    }
    env.sandbox
        .mutate(Mutation::AddLeads {
            business_id: b.clone(),
            count: 2,
        })
        .unwrap();
    // Two faults in a row on some requests (retried twice), one on others,
    // spread over the listing's seven pages.
    let script = [
        F::Rate429,
        F::Waf202,
        F::Served,
        F::Timeout,
        F::Served,
        F::Reset,
        F::Malformed,
        F::Served,
        F::Html503,
        F::Served,
        F::Problem500,
        F::Rate429Date,
        F::Served,
        F::Html404,
        F::Served,
        F::Redirect,
    ];
    env.sandbox.set_faults(Faults {
        retry_after_secs: 1,
        timeout_ms: 1500,
        script: script.into_iter().collect(),
        ..Default::default()
    });
    let before = env.sandbox.stats().faults_injected;
    let (code, out) = sync(&env, &["--full"]);
    assert_eq!(code, 0, "{style:?}: {out}");
    assert!(
        env.sandbox.faults().script.is_empty(),
        "{style:?}: every scripted fault struck"
    );
    assert_eq!(
        env.sandbox.stats().faults_injected - before,
        script.iter().filter(|f| **f != F::Served).count() as u64
    );
    assert!(out.contains("2 new"), "{style:?}: {out}");
    assert!(out.contains("3 newly missing"), "{style:?}: {out}");
    assert_eq!(missing_ids(&env), removed, "{style:?}: exactly the removed");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 62);
    let (kind, outcome, pagination, error, missing) = last_run(&env);
    assert_eq!(
        (
            kind.as_str(),
            outcome.as_str(),
            pagination.as_deref(),
            error,
            missing
        ),
        ("full", "ok", Some(name), None, 3),
        "{style:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_next_scan_through_every_transient_fault_misses_nothing() {
    a_full_scan_through_every_transient_fault(Pagination::Next, "next").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_token_scan_through_every_transient_fault_misses_nothing() {
    a_full_scan_through_every_transient_fault(Pagination::Token, "token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_offset_scan_through_every_transient_fault_misses_nothing() {
    a_full_scan_through_every_transient_fault(Pagination::Offset, "offset").await;
}

/// The variant the `next` style tests stand on: the sandbox's `next` is the
/// documented form, a path without `/api` (which the sandbox does not
/// serve: a client following it could not pass those tests) and the page's
/// query — `offset`, or `pageToken` for `next-token`. Were the sandbox to
/// answer `/api/v4/...`, following `next` verbatim would pass unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_next_is_a_path_without_api_carrying_the_pages_query() {
    let env = env_with(Pagination::Next, Shape::Mixed, 1).await;
    let b = env.business_ids()[0].clone();
    let token = env.sandbox.static_token(&b).unwrap();
    let http = common::http_client();
    let get = |url: String| {
        let (http, token) = (http.clone(), token.clone());
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let first = format!(
        "{}/api/v4/businesses/{b}/negotiations?limit=10",
        env.sandbox.base_url()
    );
    for (style, key) in [
        (Pagination::Next, "offset=10"),
        (Pagination::NextToken, "pageToken="),
    ] {
        env.sandbox.set_pagination(style);
        let (status, body) = get(first.clone()).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let next = v["pagination"]["next"].as_str().unwrap().to_string();
        let url = reqwest::Url::parse(&next).unwrap();
        assert_eq!(
            url.path(),
            format!("/v4/businesses/{b}/negotiations"),
            "{style:?}: {next}"
        );
        assert!(url.query().unwrap().contains(key), "{style:?}: {next}");
        assert!(
            url.query().unwrap().contains("limit=10"),
            "{style:?}: {next}"
        );
        let (status, _) = get(next.clone()).await;
        assert_eq!(status, 404, "{style:?}: {next} is not served as it stands");
    }
}

/// README's sandbox coverage table names tests as `file::function` (with
/// `{a,b}` for alternatives, `*` or `…` for any run of characters, and
/// "(N tests)" after a pattern for how many it matches): each must be a
/// test function in `tests/FILE.rs`, so a renamed test, a helper named as
/// one or a miscount is caught.
#[test]
fn every_test_the_readme_coverage_table_names_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table: Vec<&str> = readme
        .split("### What the sandbox covers")
        .nth(1)
        .expect("the coverage section")
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .collect();
    assert!(table.len() > 20, "{table:?}");
    // Test functions: a `fn` after a `#[test]` or `#[tokio::test...]`.
    let tests_of = |file: &str| -> Vec<String> {
        let src = std::fs::read_to_string(root.join("tests").join(format!("{file}.rs")))
            .unwrap_or_else(|e| panic!("tests/{file}.rs: {e}"));
        let mut names = Vec::new();
        let mut attributed = false;
        for line in src.lines().map(str::trim) {
            if line.starts_with("#[test]") || line.starts_with("#[tokio::test") {
                attributed = true;
            } else if attributed && let Some(rest) = line.split("fn ").nth(1) {
                names.push(rest.split('(').next().unwrap().to_string());
                attributed = false;
            }
        }
        names
    };
    fn expand(p: &str) -> Vec<String> {
        match (p.find('{'), p.find('}')) {
            (Some(a), Some(b)) if a < b => p[a + 1..b]
                .split(',')
                .flat_map(|alt| expand(&format!("{}{alt}{}", &p[..a], &p[b + 1..])))
                .collect(),
            _ => vec![p.to_string()],
        }
    }
    fn matches(pattern: &str, name: &str) -> bool {
        let parts: Vec<&str> = pattern.split(['*', '…']).collect();
        if parts.len() == 1 {
            return pattern == name;
        }
        let (first, last) = (parts[0], parts[parts.len() - 1]);
        if !name.starts_with(first) || !name[first.len()..].ends_with(last) {
            return false;
        }
        let mut rest = &name[first.len()..name.len() - last.len()];
        for part in &parts[1..parts.len() - 1] {
            match rest.find(part) {
                Some(i) => rest = &rest[i + part.len()..],
                None => return false,
            }
        }
        true
    }
    let mut checked = 0;
    for row in table {
        let cell = row.trim_end_matches('|').rsplit('|').next().unwrap();
        let spans: Vec<&str> = cell.split('`').collect();
        for (i, span) in spans.iter().enumerate().skip(1).step_by(2) {
            let Some((file, pattern)) = span.split_once("::") else {
                continue;
            };
            let said = spans
                .get(i + 1)
                .and_then(|after| after.trim_start().strip_prefix('('))
                .and_then(|after| after.split_once(" tests)"))
                .and_then(|(n, _)| n.parse::<usize>().ok());
            let tests = tests_of(file);
            for pattern in expand(pattern) {
                let n = tests.iter().filter(|t| matches(&pattern, t)).count();
                assert!(n > 0, "README names {file}::{pattern}: no such test\n{row}");
                if let Some(said) = said {
                    assert_eq!(n, said, "README counts {file}::{pattern}\n{row}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "{checked}");
}
