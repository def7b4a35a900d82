//! OAuth rotation under stress (issue 12) and the token endpoint's
//! classification (SPEC §5): a rotated refresh token is never lost, never
//! reused, never leaked; a refused OAuth client marks no business.

mod common;

use common::{Env, FAST, assert_no_secret_anywhere, count, oauth_env, refreshes, text, wait_until};
use leadsync::sandbox::{SandboxOptions, TokenFaults};
use leadsync::store::tokens::{GrantWrite, StoredGrant, TokenStore, Written};
use leadsync::thumbtack::auth::GrantStore;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn reauth_count(env: &Env) -> i64 {
    count(
        &env.sql(),
        "SELECT count(*) FROM businesses WHERE needs_reauth = 1",
    )
}

fn token_file(env: &Env, business: &str) -> std::path::PathBuf {
    env.dir.path().join("fixture/tokens").join(business)
}

fn enqueue(env: &Env, negotiation: &str, business: &str) {
    let o = env.run(&[
        "enqueue",
        "--negotiation",
        negotiation,
        "--business",
        business,
        "--status",
        "appt_scheduled",
        "--at",
        "2026-11-01T10:00:00Z",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[cfg(unix)]
fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(r, 0, "kill failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_token_endpoint_holds_a_rotated_token_loses_nothing() {
    // The refresh must finish and store its rotated token before the
    // process exits, whatever else the shutdown cuts short. (Before the
    // shutdown bound had to cover the request timeout, this test ran with a
    // 1 s bound and failed on the old code.)
    let env = oauth_env(2, FAST).await;
    env.sandbox.set_token_faults(TokenFaults {
        hold_after_rotate_ms: 3000,
        ..Default::default()
    });
    let mut child = env.spawn_daemon();
    wait_until(
        "a refresh token rotated and its answer held",
        Duration::from_secs(60),
        || env.sandbox.stats().rotations >= 1,
    )
    .await;
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        env.daemon_log()
    );
    env.sandbox.set_token_faults(TokenFaults::default());

    // After the restart every business refreshes with its stored rotated token.
    tokio::time::sleep(Duration::from_millis(2100)).await; // the stored access tokens expire
    let before = refreshes(&env);
    let o = env.run(&["sync"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        env.daemon_log()
    );
    assert!(refreshes(&env) > before, "the restart refreshed");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert!(!text(&o).contains("invalid_grant"), "{}", text(&o));
    assert!(!env.daemon_log().contains("invalid_grant"));
    assert_eq!(reauth_count(&env), 0);
    assert_no_secret_anywhere(&env, &text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_oauth_client_marks_no_business_and_its_rows_wait_uncounted() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    env.sandbox.set_token_faults(TokenFaults {
        invalid_client: true,
        ..Default::default()
    });
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("OAuth client refused"), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0, "no business is marked");

    let lead = env.sandbox.lead_ids(&ids[0])[0].clone();
    enqueue(&env, &lead, &ids[0]);
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0"
        ),
        1,
        "the row waits without counting an attempt"
    );
    let last_error: String = db
        .query_row("SELECT last_error FROM outbox", [], |r| r.get(0))
        .unwrap();
    assert!(
        last_error.contains("OAuth client refused")
            || last_error.contains("OAuth client was refused"),
        "{last_error}"
    );
    assert_eq!(reauth_count(&env), 0);

    let o = env.run(&["status"]);
    assert_eq!(
        text(&o).matches("OAuth client refused").count(),
        1,
        "shown once:\n{}",
        text(&o)
    );
    let o = env.run(&["status", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["auth_alerts"].as_array().map(Vec::len), Some(1));

    // Fixed: the next run refreshes, the row goes out, the alert is gone.
    env.sandbox.set_token_faults(TokenFaults::default());
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.deliveries().len(), 1);
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = env.run(&["status"]);
    assert!(!text(&o).contains("OAuth client refused"), "{}", text(&o));
    assert_no_secret_anywhere(&env, "");
}

/// SPEC §5: the client id and secret go by HTTP Basic, each form-urlencoded
/// first (RFC 6749 §2.3.1): an id with `:` and `+`, a secret with `%`, `+`,
/// `&`, `=`, a space and a non-ASCII letter reach the token endpoint intact
/// (the id, with a quote, a backslash and a control character, is written
/// into the fixture's TOML as a valid string).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_any_characters_reach_the_token_endpoint() {
    let env = Env::new(
        SandboxOptions {
            businesses: 1,
            client_id: "acme:partner/1+x \"é\" \\ \u{1b}".into(),
            client_secret: "s3:cr%2B+t &=/ ü".into(),
            ..Default::default()
        },
        true,
        FAST,
    )
    .await;
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().rotations, 1);
    assert_eq!(reauth_count(&env), 0);
    assert_no_secret_anywhere(&env, &text(&o));
}

/// SPEC §5: a token endpoint answering 5xx, 408, 429 or dropping the
/// connection (nothing rotated) is transient: no business is marked, the
/// client is not refused, the grant survives, and the next run refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_token_endpoint_failures_mark_nothing_and_keep_the_grant() {
    // A lost answer (5xx, a dropped connection) is asked again at once, up
    // to 2 times; a 429 or 408, a redirect (never followed) or a proxy's
    // HTML 404 fails this pass only.
    for (statuses, code) in [
        (vec![503], 0),
        (vec![0], 0),
        (vec![500, 502, 503], 1),
        (vec![429], 1),
        (vec![408], 1),
        // A moved or mistyped token_url: a proxy's page, not OAuth's words.
        (vec![301], 1),
        (vec![404], 1),
    ] {
        // A grant never used: the run must refresh.
        let env = Env::new(
            SandboxOptions {
                businesses: 1,
                ..Default::default()
            },
            true,
            FAST,
        )
        .await;
        env.sandbox.set_token_faults(TokenFaults {
            before_rotate: statuses.clone(),
            ..Default::default()
        });
        let o = env.run(&["sync"]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(code), "{statuses:?}: {out}");
        assert_eq!(
            env.sandbox.stats().faults_injected,
            statuses.len() as u64,
            "{statuses:?}: every fault was met: {out}"
        );
        assert!(!out.contains("OAuth client refused"), "{statuses:?}: {out}");
        assert!(
            !out.contains("needs re-authorization:"),
            "{statuses:?}: {out}"
        );
        assert_eq!(reauth_count(&env), 0, "{statuses:?}");
        let o = env.run(&["status"]);
        assert!(!text(&o).contains("OAuth client refused"), "{}", text(&o));
        env.sandbox.set_token_faults(TokenFaults::default());
        let o = env.run(&["sync"]);
        assert_eq!(o.status.code(), Some(0), "{statuses:?}: {}", text(&o));
        assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    }
}

/// SPEC §5: `unauthorized_client`, `invalid_request` and `invalid_scope`
/// refuse the application's configuration as `invalid_client` does: no
/// business is marked, a row waits without counting an attempt, the grants
/// survive, and the next run after the fix goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_oauth_client_error_is_the_clients_refusal_not_the_businesss() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let lead = env.sandbox.lead_ids(&ids[0])[0].clone();
    enqueue(&env, &lead, &ids[0]);
    for code in ["unauthorized_client", "invalid_request", "invalid_scope"] {
        env.sandbox.set_token_faults(TokenFaults {
            client_error: Some(code.into()),
            ..Default::default()
        });
        let o = env.run(&["sync"]);
        assert_eq!(o.status.code(), Some(1), "{code}: {}", text(&o));
        assert!(
            text(&o).contains("OAuth client refused"),
            "{code}: {}",
            text(&o)
        );
        assert!(text(&o).contains(code), "{code}: {}", text(&o));
        let o = env.run(&["drain"]);
        assert_eq!(o.status.code(), Some(1), "{code}: {}", text(&o));
        assert_eq!(reauth_count(&env), 0, "{code}: no business is marked");
        assert_eq!(
            count(
                &env.sql(),
                "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0"
            ),
            1,
            "{code}: the row waits without counting an attempt"
        );
        let o = env.run(&["status"]);
        assert_eq!(
            text(&o).matches("OAuth client refused").count(),
            1,
            "{code}: shown once:\n{}",
            text(&o)
        );
    }
    assert_eq!(env.sandbox.stats().rotations, 0, "no grant was consumed");
    env.sandbox.set_token_faults(TokenFaults::default());
    let o = env.run(&["drain"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.deliveries().len(), 1);
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_oauth_failed_is_the_clients_refusal_not_the_businesss() {
    let env = oauth_env(3600, FAST).await;
    env.sandbox.set_token_faults(TokenFaults {
        proxy_oauth_failed: true,
        ..Default::default()
    });
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("proxy_oauth_failed"), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0, "no business is marked");
    let o = env.run(&["status"]);
    assert!(text(&o).contains("oauth.audience"), "{}", text(&o));
    // The grants are intact: once the audience is right, every business syncs.
    env.sandbox.set_token_faults(TokenFaults::default());
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_token_response_is_asked_again_with_the_same_refresh_token() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        lose_after_rotate: 1,
        grace_secs: 60,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stats = env.sandbox.stats();
    assert_eq!(refreshes(&env), 2, "the lost refresh and its one retry");
    assert_eq!(stats.grace_replays, 1, "the retry presented the same token");
    assert_eq!(stats.reused_refresh_tokens, 0);
    // The chain continues from the token the lost answer carried.
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// `sync --business b` with the log at `level`, which succeeds.
fn sync_logged(env: &Env, b: &str, level: &str) -> std::process::Output {
    let o = common::output(
        env.cli()
            .args(["sync", "--business", b])
            .env("LEADSYNC_LOG", level),
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    o
}

/// A token answer far larger than any token response (a broken proxy
/// padding it): not read, and taken as lost, not as a refusal — the server
/// may have rotated the token — so it is asked again with the same refresh
/// token, and the chain goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_token_answer_is_lost_and_asked_again() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        oversized_after_rotate: 1,
        grace_secs: 60,
        ..Default::default()
    });
    let o = sync_logged(&env, &b, "debug");
    assert!(
        text(&o).contains("larger than 1048576 bytes: not read"),
        "{}",
        text(&o)
    );
    let stats = env.sandbox.stats();
    assert_eq!(refreshes(&env), 2, "the oversized answer and its one retry");
    assert_eq!(stats.grace_replays, 1, "the retry presented the same token");
    assert_eq!(stats.reused_refresh_tokens, 0);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// A 4xx whose body is larger than any token answer (a proxy's page, or a
/// padded `invalid_grant`) cannot be read, so what it says is unknown: a
/// small `400 invalid_grant` cannot have rotated the token, but a proxy
/// may stand between a server that did and us. The safe reading stays —
/// lost, asked again with the same token, the refresh note kept — and the
/// log says which HTTP status came back unread, so the operator can tell a
/// proxy from a lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_4xx_token_answer_is_asked_again_and_named_with_its_status() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        oversized_refusal: 1,
        ..Default::default()
    });
    let o = sync_logged(&env, &b, "info");
    let out = text(&o);
    assert!(out.contains("answered HTTP 400 with a body"), "{out}");
    assert!(out.contains("larger than 1048576 bytes: not read"), "{out}");
    assert_eq!(refreshes(&env), 2, "the unread answer and its one retry");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
    assert_no_secret_anywhere(&env, &out);
}

/// The same answer every time: the refresh fails (nothing is marked
/// refused: an unread answer says nothing), the note of a refresh whose
/// answer was not stored stays, and `status` tells the operator until a
/// refresh gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_4xx_token_answers_every_time_are_shown_in_status_until_a_refresh_works() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        oversized_refusal: 3,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(refreshes(&env), 3, "{}", text(&o));
    assert_eq!(reauth_count(&env), 0);
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let store = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    let note = store.refresh_note(&key).unwrap().unwrap_or_default();
    assert!(note.starts_with("sent at"), "{note:?}");
    let status = text(&env.run(&["status"]));
    assert!(status.contains("HTTP 400"), "{status}");
    assert!(status.contains("not read"), "{status}");
    assert_no_secret_anywhere(&env, &status);
    // The endpoint answers again: the stored token (never rotated) works,
    // and the alert goes.
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    let status = text(&env.run(&["status"]));
    assert!(!status.contains("not read"), "{status}");
}

/// The "lost answer" and "unsaved" alerts are shared (the mirror): a
/// manual `sync` behind a bad proxy, or whose token store refused its
/// write, may raise them while the daemon, which had already stored a
/// token since it started (and cleared them then), keeps refreshing fine.
/// The daemon's next stored token clears both: the grant works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_alert_raised_by_another_process_goes_at_the_next_stored_token() {
    // Access tokens valid ~2 s: the daemon's next token() refreshes.
    let env = oauth_env(2, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let mirror = leadsync::store::Store::open(config.database()).unwrap();
    let daemon = leadsync::app::open_auth(&config, Some(mirror), Default::default()).unwrap();
    daemon.token(&b).await.expect("the daemon's first refresh");
    assert_eq!(refreshes(&env), 1);
    // An operator's `sync` loses every answer and raises the alert.
    env.sandbox.set_token_faults(TokenFaults {
        oversized_refusal: 3,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(refreshes(&env), 4, "{}", text(&o));
    let alert = "its refresh token may be spent";
    let status = text(&env.run(&["status"]));
    assert!(status.contains(alert), "{status}");
    // And another process (a `sync` by hand whose token store refused its
    // write) said it held a rotated token unsaved; it ended since.
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let unsaved = "the rotated refresh token (test) cannot be stored";
    env.sql()
        .execute(
            "INSERT INTO auth_alerts (alert_key, message, since) VALUES (?1, ?2, '2026-11-29T00:00:00.000Z')",
            [format!("unsaved:{key}"), unsaved.to_string()],
        )
        .unwrap();
    let status = text(&env.run(&["status"]));
    assert!(status.contains(unsaved), "{status}");
    // The daemon's access token expires; its refresh gets through.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while refreshes(&env) < 5 {
        assert!(std::time::Instant::now() < deadline, "no refresh");
        let _ = daemon.token(&b).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.token(&b).await.expect("refreshed");
    let status = text(&env.run(&["status"]));
    assert!(!status.contains(alert), "{status}");
    assert!(!status.contains(unsaved), "{status}");
    daemon.settle(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_answer_is_never_quoted() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        truncate_after_rotate: 1,
        grace_secs: 60,
        ..Default::default()
    });
    let o = sync_logged(&env, &b, "trace");
    assert!(
        text(&o).contains("unreadable token response ("),
        "{}",
        text(&o)
    );
    assert_no_secret_anywhere(&env, &text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_file_does_not_poison_the_stored_chain() {
    let env = oauth_env(1, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Someone puts a mistyped (or an old, used) token in the file.
    std::fs::write(token_file(&env, &b), "sbx_rt_mistyped\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the access token expires
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0);
    let o = env.run(&["status"]);
    assert!(
        text(&o).contains("refused; using the stored token"),
        "{}",
        text(&o)
    );
    // The refused file is not presented again; the chain keeps working.
    let before = refreshes(&env);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(refreshes(&env) > before);
    assert!(
        !text(&o).contains("the token file was refused"),
        "{}",
        text(&o)
    );
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_token_store_refresh_once() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    // A second configuration with its own mirror, sharing the token store.
    let other = common::write(
        env.dir.path(),
        "other.toml",
        &format!(
            "database = \"{}\"\n",
            env.dir.path().join("other.db").display()
        ),
    );
    env.sandbox.set_token_faults(TokenFaults {
        hold_after_rotate_ms: 1500,
        ..Default::default()
    });
    let first = common::output(env.cli().args(["sync", "--business", &b]));
    let first = tokio::task::spawn_blocking(move || first);
    wait_until("the first process rotated", Duration::from_secs(30), || {
        env.sandbox.stats().rotations >= 1
    })
    .await;
    let mut second = Command::new(common::bin());
    for f in env.config_files() {
        second.arg("--config").arg(f);
    }
    let second = common::output(
        second
            .arg("--config")
            .arg(&other)
            .args(["sync", "--business", &b])
            .env_remove("LEADSYNC_LOG"),
    )
    .unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert_eq!(refreshes(&env), 1, "one refresh for both processes");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_businesses_on_one_grant_share_one_chain() {
    // Tokens live 4 s: long enough that no pass outlives one under load.
    let env = oauth_env(4, FAST).await;
    let ids = env.business_ids();
    // One pro's grant covers businesses 0 and 1: both name the same file.
    let shared = token_file(&env, &ids[0]);
    std::fs::write(&shared, env.sandbox.mint_grant(&[&ids[0], &ids[1]])).unwrap();
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let fixture = fixture.replace(
        &token_file(&env, &ids[1]).display().to_string(),
        &shared.display().to_string(),
    );
    std::fs::write(&env.fixture, fixture).unwrap();

    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Businesses 0 and 1 share one refresh; business 2 has its own.
    assert_eq!(refreshes(&env), 2);
    let db = env.sql();
    assert_eq!(count(&db, "SELECT count(*) FROM negotiations"), 180);
    // Across expiry and processes the shared chain keeps rotating.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 4);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);

    // A refused grant marks both of its businesses, and only them.
    std::fs::write(&shared, "sbx_rt_other_grant\n").unwrap();
    let conn = rusqlite::Connection::open(env.dir.path().join("fixture/tokens.db")).unwrap();
    let key = shared.canonicalize().unwrap().display().to_string();
    let n = conn
        .execute(
            "UPDATE grants SET refused_at = 'x', refused_reason = 'refused (test)' WHERE grant_key = ?1",
            [&key],
        )
        .unwrap();
    assert_eq!(n, 1, "one stored chain for the shared grant");
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(reauth_count(&env), 2, "{}", text(&o));
}

/// A check a hooked store asks before each write of a grant.
type BeforeSave = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;
/// What a hooked store does once it has written a refresh note.
type AfterNote = Box<dyn Fn(Option<&str>) + Send + Sync>;

/// The token store, with a test's hooks around two calls: `before_save`
/// may refuse a write, `after_note` runs once a refresh note is written.
struct Hooked {
    inner: leadsync::app::StoreGrants,
    before_save: BeforeSave,
    after_note: AfterNote,
    /// The pid its "held unsaved" note names instead of this process's.
    unsaved_pid: Option<u32>,
    /// Set once a try of the grant's lock found it held.
    lock_busy: Arc<AtomicBool>,
    /// While set, writing a refresh note fails (a full disk).
    note_fails: Arc<AtomicBool>,
    /// While set, a refresh note is written but its write then fails (the
    /// directory's fsync after the rename).
    note_sync_fails: Arc<AtomicBool>,
    /// Its write check passes whatever `before_save` says (a store that
    /// fails only after the check: the disk filled in between). The
    /// default; `checked` makes the check fail with the writes.
    check_passes: bool,
}

impl Hooked {
    fn new(
        config: &leadsync::config::Config,
        before_save: BeforeSave,
        after_note: AfterNote,
    ) -> Self {
        Hooked {
            inner: leadsync::app::StoreGrants(
                TokenStore::open(&config.file.oauth.token_store).unwrap(),
            ),
            before_save,
            after_note,
            unsaved_pid: None,
            lock_busy: Arc::new(AtomicBool::new(false)),
            note_fails: Arc::new(AtomicBool::new(false)),
            note_sync_fails: Arc::new(AtomicBool::new(false)),
            check_passes: true,
        }
    }

    /// Its write check fails while its writes do.
    fn checked(mut self) -> Self {
        self.check_passes = false;
        self
    }

    /// Its "held unsaved" note names `pid`: a process the reader cannot see
    /// in /proc, as under systemd's `ProtectProc=invisible`.
    fn naming(self, pid: u32) -> Self {
        Hooked {
            unsaved_pid: Some(pid),
            ..self
        }
    }
}

impl GrantStore for Hooked {
    fn load(
        &self,
        grant: &str,
        seed: Option<&str>,
        businesses: &[String],
    ) -> anyhow::Result<Option<StoredGrant>> {
        self.inner.load(grant, seed, businesses)
    }
    fn save(&self, grant: &str, expected: i64, write: &GrantWrite) -> anyhow::Result<Written> {
        (self.before_save)()?;
        self.inner.save(grant, expected, write)
    }
    fn refuse(
        &self,
        grant: &str,
        expected: i64,
        file: Option<&str>,
        reason: &str,
    ) -> anyhow::Result<bool> {
        self.inner.refuse(grant, expected, file, reason)
    }
    fn refuse_file(&self, grant: &str, file: &str) -> anyhow::Result<()> {
        self.inner.refuse_file(grant, file)
    }
    fn forget_access(&self, grant: &str, token: &leadsync::secret::Secret) -> anyhow::Result<()> {
        self.inner.forget_access(grant, token)
    }
    fn try_lock(&self, grant: &str) -> anyhow::Result<Option<Box<dyn Send>>> {
        let lock = self.inner.try_lock(grant)?;
        if lock.is_none() {
            self.lock_busy.store(true, Ordering::SeqCst);
        }
        Ok(lock)
    }
    fn refresh_note(&self, grant: &str) -> anyhow::Result<Option<String>> {
        self.inner.refresh_note(grant)
    }
    fn lock_unsaved(&self, grant: &str) -> anyhow::Result<Option<Box<dyn Send>>> {
        self.inner.lock_unsaved(grant)
    }
    fn unsaved_held(&self, grant: &str) -> anyhow::Result<bool> {
        self.inner.unsaved_held(grant)
    }
    fn set_refresh_note(&self, grant: &str, note: Option<&str>) -> anyhow::Result<()> {
        if note.is_some() && self.note_fails.load(Ordering::SeqCst) {
            anyhow::bail!("No space left on device (os error 28) (test)");
        }
        self.inner.set_refresh_note(grant, note)?;
        if note.is_some() && self.note_sync_fails.load(Ordering::SeqCst) {
            // Renamed into place, then the directory's fsync failed.
            anyhow::bail!("Input/output error (os error 5) (test)");
        }
        (self.after_note)(note);
        Ok(())
    }
    fn check_writable(&self) -> anyhow::Result<()> {
        if !self.check_passes {
            (self.before_save)()?;
        }
        self.inner.check_writable()
    }
    fn note_unsaved(&self, grant: &str, over: i64, token: &str) -> anyhow::Result<()> {
        match self.unsaved_pid {
            Some(pid) => self.inner.set_refresh_note(
                grant,
                Some(&leadsync::store::tokens::unsaved_note(
                    pid,
                    over,
                    Some(token),
                )),
            ),
            None => self.inner.note_unsaved(grant, over, token),
        }
    }
}

/// A token store whose writes fail while `fail` is set.
fn failing_store(config: &leadsync::config::Config, fail: &Arc<AtomicBool>) -> Hooked {
    let failing = fail.clone();
    Hooked::new(
        config,
        Box::new(move || {
            if failing.load(Ordering::SeqCst) {
                anyhow::bail!("disk I/O error (test)");
            }
            Ok(())
        }),
        Box::new(|_| {}),
    )
}

/// An `Auth` on `store` holding its grant's rotated token in memory,
/// unsaved (`fail` set), over a chain the store holds (generation 1,
/// written by a `sync` run before).
async fn held_unsaved(env: &Env, store: Hooked, fail: &AtomicBool) -> leadsync::thumbtack::Auth {
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(env);
    fail.store(true, Ordering::SeqCst);
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let e = auth.token(&b).await.expect_err("unsaved");
    assert!(e.message.contains("cannot be stored"), "{}", e.message);
    assert_eq!(refreshes(env), 2);
    auth
}

/// The token store moved aside under a running process (`mv private
/// private.old`): SQLite refuses writes to the moved file ("readonly
/// database"), so no refresh started, but the failure said only "make the
/// token store writable". It says the store was moved now, and where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refresh_starts_while_the_token_store_is_moved_aside() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let config = env.config();
    let path = config.file.oauth.token_store.clone();
    let auth = leadsync::thumbtack::Auth::new(
        &config,
        Some(Arc::new(leadsync::app::StoreGrants(
            TokenStore::open(&path).unwrap(),
        ))),
        None,
        Default::default(),
    )
    .unwrap();
    let before = refreshes(&env);
    let aside = env.dir.path().join("tokens.db.aside");
    std::fs::rename(&path, &aside).unwrap();
    let e = auth
        .token(&b)
        .await
        .expect_err("no refresh while moved aside");
    assert!(
        e.message.contains(&path.display().to_string()) && e.message.contains("was moved"),
        "{}",
        e.message
    );
    assert_eq!(refreshes(&env), before, "a refresh was sent");
    std::fs::rename(&aside, &path).unwrap();
    auth.token(&b)
        .await
        .expect("refreshes once the store is back");
    assert_eq!(refreshes(&env), before + 1);
    auth.settle(Duration::from_secs(5)).await;
}

/// While a rotated token is held in memory, unsaved, its process holds the
/// grant's lock: nothing else can tell whether it lives. It named itself in
/// the lock file, but /proc may not show it (systemd's
/// `ProtectProc=invisible` hides another user's processes): a moved token
/// file read that as "gone" and took the chain, and the rotated token's
/// later write was a conflict: dropped, the grant lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_rotated_token_held_unsaved_keeps_the_grant_locked_whatever_proc_shows() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let fail = Arc::new(AtomicBool::new(false));
    let store = failing_store(&config, &fail).naming(u32::MAX - 1);
    let auth = held_unsaved(&env, store, &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&config.file.oauth.token_store).unwrap();
    let seed = other
        .get(&key, None, &[])
        .unwrap()
        .expect("stored chain")
        .seed_sha256;
    assert!(
        other.try_lock_grant(&key).unwrap().is_none(),
        "the grant's lock is free while its rotated token is held unsaved"
    );
    // The token file moves (another process, a restore): its old name is gone.
    let moved = env.dir.path().join("moved-token");
    std::fs::rename(token_file(&env, &b), &moved).unwrap();
    // It holds the rotated token (kept there since the store refused it),
    // not the chain's seed: still the held chain's, not a new grant.
    let held = std::fs::read_to_string(&moved).unwrap();
    let held = leadsync::store::tokens::sha256_hex(held.trim());
    assert_ne!(Some(&held), seed.as_ref());
    for probe in [Some(held.as_str()), seed.as_deref()] {
        let during = other.get(&moved.display().to_string(), probe, &[]);
        assert!(
            during.is_err(),
            "a moved file took the chain (or was a new grant) while its rotated token is \
             unsaved: {:?}",
            during.map(|g| g.map(|g| g.generation))
        );
    }
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    assert!(
        other.try_lock_grant(&key).unwrap().is_some(),
        "let go once stored"
    );
    drop(gate);
    // Once stored, the stored chain names the file's content as its seed.
    let g = other
        .get(&moved.display().to_string(), Some(&held), &[])
        .unwrap()
        .expect("taken over once stored");
    assert_eq!(g.generation, 2, "the rotated token, not the spent one");
    assert_eq!(refreshes(&env), 2);
    auth.settle(Duration::from_secs(5)).await;
}

/// The daemon holds a rotated token unsaved and has kept it in the token
/// file; the operator moves the file and a `sync` configured with the new
/// name runs before the daemon reloads. The file's content matches no
/// stored seed (the chain's seed is still the spent file content), so it
/// was taken for a new grant and presented: the token spent twice, the
/// grant lost. The holder's note names the token's fingerprint: the moved
/// file waits for the holder, then takes the chain over once it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_moved_token_file_holding_an_unsaved_token_is_not_a_new_grant() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let old = token_file(&env, &b);
    let moved = old.with_file_name(format!("{b}-moved"));
    std::fs::rename(&old, &moved).unwrap();
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let needle = format!("\"{}\"", old.display());
    assert!(fixture.contains(&needle), "{fixture}");
    std::fs::write(
        &env.fixture,
        fixture.replace(&needle, &format!("\"{}\"", moved.display())),
    )
    .unwrap();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(refreshes(&env), 2, "presented as a new grant: {}", text(&o));
    assert!(text(&o).contains("unsaved"), "{}", text(&o));
    assert_no_secret_anywhere(&env, &text(&o));
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    drop(gate);
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 3, "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0, "{}", text(&o));
    assert_eq!(reauth_count(&env), 0, "{}", text(&o));
}

/// Once a rotated token the store refused was kept in the token file and
/// then stored, the chain's seed named that token and the file's original
/// content was forgotten: the original content deployed again at a new
/// path (Ansible, a vault, a backup; not a `mv`) was a new grant, its spent
/// token presented and refused, the grant re-authorized. The original
/// content stays known to the chain as its prior seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn the_original_token_file_redeployed_at_a_new_path_keeps_its_chain_after_an_unsaved_episode()
{
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let old = token_file(&env, &b);
    let original = std::fs::read_to_string(&old).unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    drop(gate);
    assert_ne!(
        std::fs::read_to_string(&old).unwrap().trim(),
        original.trim()
    );
    // Deployed again from its original content at a new path.
    let redeployed = old.with_file_name(format!("{b}-redeployed"));
    std::fs::write(&redeployed, &original).unwrap();
    std::fs::remove_file(&old).unwrap();
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let needle = format!("\"{}\"", old.display());
    assert!(fixture.contains(&needle), "{fixture}");
    std::fs::write(
        &env.fixture,
        fixture.replace(&needle, &format!("\"{}\"", redeployed.display())),
    )
    .unwrap();
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0, "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0, "{}", text(&o));
}

/// Another process (a `sync` run by hand, the daemon's next start beside a
/// stopping one) never presents the stored refresh token while a rotated
/// one is held unsaved elsewhere: it is spent. It says why, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_never_refreshes_while_a_rotated_token_is_held_unsaved() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&config, &fail), &fail).await;
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(refreshes(&env), 2, "{}", text(&o));
    assert!(text(&o).contains("unsaved"), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// The token file is renamed and the configuration reloaded while this
/// process holds the grant's rotated token unsaved: the chain of the old
/// name is named by no business now, so no caller asks it to store its
/// token, and the new name waits for it — every business on the grant
/// stalled until a restart. Its write is retried with the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_reload_that_renames_the_token_file_takes_the_unsaved_token_once_stored() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let moved = env.dir.path().join("renamed-token");
    let mut config = env.config();
    let old_key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&config.file.oauth.token_store).unwrap();
    std::fs::rename(token_file(&env, &b), &moved).unwrap();
    for business in &mut config.businesses {
        if business.id == b {
            business.token = leadsync::config::TokenSource::Refresh(moved.clone());
        }
    }
    auth.reconfigure(&config);
    let e = auth.token(&b).await.expect_err("still unsaved");
    assert!(e.message.contains("unsaved"), "{}", e.message);
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    // The old name's token is stored (by this call's turn or by its own
    // retry task, whichever comes first): wait for it, or that task may
    // hold the old name's lock during the call below (a loaded machine).
    wait_until(
        "the old name's unsaved token stored and its lock let go",
        Duration::from_secs(120),
        || {
            !other.unsaved_held(&old_key).unwrap()
                && other.try_lock_grant(&old_key).unwrap().is_some()
        },
    )
    .await;
    auth.token(&b)
        .await
        .expect("the old name's token stored, then taken over by the new name");
    drop(gate);
    assert_eq!(refreshes(&env), 2, "the rotated token, not a new refresh");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// A process stops while the store still refuses its rotated token: the
/// token ends with it (and its lock), the note stays. The next process
/// neither waits for it nor blames "a refresh cut short": it says the
/// rotated token was lost, and why the grant needs re-authorization.
/// (Its token file cannot take the token either: a directory stands where
/// the file's atomic replacement puts its temporary file.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_lost_with_its_process_is_named_at_the_next_refresh() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let file = token_file(&env, &b);
    let blocker = file.with_file_name(format!(".{b}.leadsync-tmp"));
    std::fs::create_dir(&blocker).unwrap();
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let o = env.run(&["sync", "--business", &b]);
    let out = text(&o);
    assert!(
        out.contains("ended without storing it: that token is lost"),
        "{out}"
    );
    assert!(!out.contains("cut short"), "{out}");
    assert_no_secret_anywhere(&env, &out);
}

/// The token store refuses a rotated refresh token (a full disk, EIO) and
/// its process ends before the store takes it (a stop, the watchdog, a
/// crash, the OOM killer): the token lived only in that process, so the
/// next start presented the spent one and the grant needed re-authorizing.
/// It is kept in the grant's token file as soon as the store refuses it,
/// and the next refresh, in any process, presents it from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_the_store_refused_outlives_its_process_in_the_token_file() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let file = token_file(&env, &b);
    let before = std::fs::read_to_string(&file).unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    // Already there while the process runs: a crash now loses nothing.
    let kept = std::fs::read_to_string(&file).unwrap();
    assert_ne!(
        kept.trim(),
        before.trim(),
        "the token file still holds the spent token"
    );
    assert!(!kept.trim().is_empty());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let o = env.run(&["sync", "--business", &b]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0, "{out}");
    assert_eq!(reauth_count(&env), 0, "{out}");
    assert_eq!(refreshes(&env), 3, "{out}");
    assert!(!out.contains("that token is lost"), "{out}");
    assert_no_secret_anywhere(&env, &out);
    // Once stored, the file is the chain's seed again, not a new grant.
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 4);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert!(!text(&o).contains("refused"), "{}", text(&o));
}

/// `auth exchange` in another process while this one holds the grant's
/// rotated token unsaved: the new grant is stored (it supersedes that
/// token) at once, not after waiting out the holder's lock; the holder's
/// note and lock stay its own until its write — a conflict now — lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn auth_exchange_supersedes_a_token_held_unsaved_by_another_process() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    let code = env.sandbox.mint_auth_code(&b);
    let started = std::time::Instant::now();
    let o = env.run(&[
        "auth",
        "exchange",
        "--business",
        &b,
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited for the holder: {:?}",
        started.elapsed()
    );
    let note = other.refresh_note(&key).unwrap().unwrap_or_default();
    assert!(note.contains("held in memory"), "{note:?}");
    assert!(other.try_lock_grant(&key).unwrap().is_none());
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("the new grant's chain");
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    drop(gate);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// The token file cannot be read when the store refuses the rotated token
/// (EACCES after a restore, or bytes that are not text; the refresh used the
/// stored chain): it was taken for an empty one and overwritten with the
/// rotated token uncompared, though it may hold a grant a person put there.
/// A file that cannot be read is not written over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn an_unreadable_token_file_is_not_overwritten_by_an_unsaved_token() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let file = token_file(&env, &b);
    let unreadable = [0xffu8, 0xfe, b'g', b'r', b'a', b'n', b't'];
    std::fs::write(&file, unreadable).unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(failing_store(&env.config(), &fail))),
        None,
        Default::default(),
    )
    .unwrap();
    let e = auth.token(&b).await.expect_err("unsaved");
    assert!(e.message.contains("cannot be stored"), "{}", e.message);
    assert_eq!(refreshes(&env), 2);
    // Compared, not printed: the rotated token must not reach the output.
    assert!(
        std::fs::read(&file).unwrap() == unreadable,
        "the unreadable token file was overwritten"
    );
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    drop(gate);
    assert!(std::fs::read(&file).unwrap() == unreadable);
    auth.settle(Duration::from_secs(5)).await;
}

/// Runs `auth exchange` for `b` while a rotated token is held unsaved, then
/// makes its grant name the seed the store held before (as if the exchange
/// had read the token file before the rotated token was kept there);
/// returns the exchanged grant as stored.
fn exchanged_over_the_spent_seed(env: &Env, b: &str, key: &str, store: &TokenStore) -> StoredGrant {
    let spent_seed = store.get(key, None, &[]).unwrap().unwrap().seed_sha256;
    let code = env.sandbox.mint_auth_code(b);
    let o = env.run(&[
        "auth",
        "exchange",
        "--business",
        b,
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let c = rusqlite::Connection::open(&env.config().file.oauth.token_store).unwrap();
    c.execute(
        "UPDATE grants SET seed_sha256 = ?1 WHERE grant_key = ?2",
        rusqlite::params![spent_seed, key],
    )
    .unwrap();
    store.get(key, None, &[]).unwrap().unwrap()
}

/// `auth exchange` read the token file (the spent seed) while this
/// process's refresh was out; the store refused the rotated token, which
/// was then kept in the file (it still held what the refresh was sent
/// with); the exchange stored its new grant over the seed it read. The
/// rotated token's write is a conflict and it is dropped — but the file
/// still held it, so the next refresh took the file for a new grant and
/// replaced the exchange's grant with it. The dropped token's file copy is
/// remembered as refused: the exchange's grant is the one refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_token_dropped_for_an_exchanged_grant_is_not_presented_from_its_file() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let exchanged = exchanged_over_the_spent_seed(&env, &b, &key, &other);
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    forget_stored_access_tokens(&env);
    auth.token(&b).await.expect("the new grant's chain");
    drop(gate);
    let after = other.get(&key, None, &[]).unwrap().unwrap();
    assert_eq!(after.generation, exchanged.generation + 1);
    assert_eq!(
        after.seed_sha256, exchanged.seed_sha256,
        "the dropped rotated token was presented from the token file over the exchanged grant"
    );
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// `auth exchange` read the token file (the spent seed) before another
/// process, holding its rotated token unsaved, kept that token in the file;
/// the exchange stored its grant over the seed it read, then the holder
/// ended (killed, or the store still failing) before its write could be a
/// conflict that refuses the file's copy. The next refresh took the file
/// for a new grant and presented the dropped token: valid, so the exchange
/// was silently undone. The exchange refuses the file copy the holder's
/// note names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_grant_is_not_undone_by_the_file_copy_of_a_holder_that_ended() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let exchanged = exchanged_over_the_spent_seed(&env, &b, &key, &other);
    // The holder ends with its token unsaved (the store still fails).
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let after = other.get(&key, None, &[]).unwrap().unwrap();
    assert_eq!(after.generation, exchanged.generation + 1, "{}", text(&o));
    assert_eq!(
        after.seed_sha256,
        exchanged.seed_sha256,
        "the dropped rotated token was presented from the token file over the exchanged grant: {}",
        text(&o)
    );
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// A process stored its rotated token and was killed before it cleared its
/// note (the note's write is the step after the store's): the lock ended
/// with it, the note stayed. The token is not lost — the store holds a
/// generation beyond the one the note's write was to replace — and nobody
/// may say it is, nor blame a refresh cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_note_left_after_its_token_was_stored_reports_nothing_lost() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    // The note as it was before the store took generation 2 (over 1).
    drop(other.try_lock_grant(&key).unwrap().expect("free"));
    drop(gate);
    other
        .set_refresh_note(
            &key,
            Some(&leadsync::store::tokens::unsaved_note(
                u32::MAX - 1,
                1,
                None,
            )),
        )
        .unwrap();
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("lost"), "{out}");
    assert!(!out.contains("did not get its answer stored"), "{out}");
    // A moved token file neither.
    let moved = env.dir.path().join("moved-token");
    let seed = other.get(&key, None, &[]).unwrap().unwrap().seed_sha256;
    other
        .set_refresh_note(
            &key,
            Some(&leadsync::store::tokens::unsaved_note(
                u32::MAX - 1,
                1,
                None,
            )),
        )
        .unwrap();
    std::fs::rename(token_file(&env, &b), &moved).unwrap();
    let g = other
        .get(&moved.display().to_string(), seed.as_deref(), &[])
        .unwrap()
        .expect("taken over");
    assert_eq!(g.generation, 3);
    assert_eq!(other.refresh_note(&key).unwrap(), None);
}

/// A process killed between the store's write of its rotated token and the
/// removal of its "sent" note (the step after) left a note the next refresh
/// read as "a refresh cut short before its answer was stored", and a later
/// refusal blamed it. The note names the generation its token was to
/// replace; a row beyond it says the answer was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_note_left_after_its_answer_was_stored_reports_nothing_cut_short() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let written = Arc::new(std::sync::Mutex::new(None::<String>));
    let w = written.clone();
    let store = Hooked::new(
        &config,
        Box::new(|| Ok(())),
        Box::new(move |note| {
            if let Some(n) = note {
                *w.lock().unwrap() = Some(n.to_string());
            }
        }),
    );
    let auth =
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap();
    auth.token(&b).await.expect("refreshed and stored");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let note = written.lock().unwrap().clone().expect("a sent note");
    // Killed before the note's removal: it is back, as it was.
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&config.file.oauth.token_store).unwrap();
    other.set_refresh_note(&key, Some(&note)).unwrap();
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(
        !out.contains("did not get its answer stored"),
        "{note:?}\n{out}"
    );
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// A rotated token held unsaved was written again only when a business of
/// its grant asked for a token: a grant whose businesses are not asked
/// (disabled, nothing to send, a long schedule) kept the token in memory
/// and the grant locked — every other process refused — until the process
/// stopped, though the store took writes again long before. It is written
/// again on its own, and the lock let go once it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn a_token_held_unsaved_is_stored_and_its_lock_let_go_though_no_business_asks() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    assert!(other.try_lock_grant(&key).unwrap().is_none());
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    wait_until(
        "the unsaved token stored and the grant's lock let go, with no business asking",
        Duration::from_secs(30),
        || other.try_lock_grant(&key).unwrap().is_some(),
    )
    .await;
    assert_eq!(other.get(&key, None, &[]).unwrap().unwrap().generation, 2);
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    assert!(!other.unsaved_held(&key).unwrap());
    drop(gate);
    // Another process continues the chain from the stored token.
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 3);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// The write of a token held unsaved fails as a task (a panic, the
/// runtime's shutdown): the grant's lock is taken back, and so is its
/// "unsaved" lock — else another process, finding the grant's lock held
/// and no unsaved lock, waits for it as for an ordinary refresh instead
/// of being told at once that a rotated token is held here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing below starts a process.
async fn a_failed_write_task_of_an_unsaved_token_takes_back_its_unsaved_lock() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let panic = Arc::new(AtomicBool::new(false));
    let (failing, panicking) = (fail.clone(), panic.clone());
    let store = Hooked::new(
        &env.config(),
        Box::new(move || {
            if failing.load(Ordering::SeqCst) {
                anyhow::bail!("disk I/O error (test)");
            }
            assert!(
                !panicking.load(Ordering::SeqCst),
                "the write task fails (test)"
            );
            Ok(())
        }),
        Box::new(|_| {}),
    );
    let auth = held_unsaved(&env, store, &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    assert!(other.unsaved_held(&key).unwrap());
    // The locks the failed task drops are taken back in this process: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    panic.store(true, Ordering::SeqCst);
    fail.store(false, Ordering::SeqCst);
    // Its write is tried (and its task fails) before this returns.
    auth.token(&b).await.expect_err("the write task failed");
    assert!(
        other.try_lock_grant(&key).unwrap().is_none(),
        "the grant's lock taken back"
    );
    assert!(
        other.unsaved_held(&key).unwrap(),
        "the unsaved lock taken back"
    );
    panic.store(false, Ordering::SeqCst);
    auth.token(&b).await.expect("stored now");
    assert_eq!(other.get(&key, None, &[]).unwrap().unwrap().generation, 2);
    assert!(!other.unsaved_held(&key).unwrap());
    drop(gate);
    assert_eq!(refreshes(&env), 2);
    auth.settle(Duration::from_secs(5)).await;
}

/// The same when another process's `auth exchange` supersedes the token
/// held unsaved: the holder's write, a conflict now, lets the lock go on
/// its own, with no business asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_held_unsaved_and_superseded_lets_its_lock_go_though_no_business_asks() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    let new_grant = GrantWrite {
        refresh_token: leadsync::secret::Secret::new(env.sandbox.mint_refresh_token(&b)),
        access_token: None,
        seed_sha256: None,
        source: "auth exchange".into(),
    };
    assert_eq!(other.put(&key, 1, &new_grant).unwrap(), Written::Stored(2));
    fail.store(false, Ordering::SeqCst);
    wait_until(
        "the superseded token dropped and the grant's lock let go, with no business asking",
        Duration::from_secs(30),
        || other.try_lock_grant(&key).unwrap().is_some(),
    )
    .await;
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    assert_eq!(other.get(&key, None, &[]).unwrap().unwrap().generation, 2);
    auth.settle(Duration::from_secs(5)).await;
}

/// Process A holds the grant's lock for an ordinary refresh while the note
/// still says a process held a rotated token unsaved — one that ended with
/// it (or was killed right after storing it, before it cleared the note).
/// Process B read the note while A held the lock and failed at once, as if
/// A were that holder. It waits for A as for any refresh, and judges the
/// note once it holds the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_unsaved_note_does_not_fail_a_process_waiting_for_an_ordinary_refresh() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let config = env.config();
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&config.file.oauth.token_store).unwrap();
    // The stale note, whose writer ended; then A takes the lock.
    other
        .set_refresh_note(
            &key,
            Some(&leadsync::store::tokens::unsaved_note(
                u32::MAX - 1,
                1,
                None,
            )),
        )
        .unwrap();
    let a = other.try_lock_grant(&key).unwrap().expect("free");
    let store = Hooked::new(&config, Box::new(|| Ok(())), Box::new(|_| {}));
    let busy = store.lock_busy.clone();
    let auth = Arc::new(
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap(),
    );
    let asking = auth.clone();
    let bid = b.clone();
    let task = tokio::spawn(async move { asking.token(&bid).await });
    wait_until("B meets the lock A holds", Duration::from_secs(30), || {
        busy.load(Ordering::SeqCst)
    })
    .await;
    drop(a);
    let got = task.await.unwrap();
    assert!(got.is_ok(), "B gave up instead of waiting for A: {got:?}");
    assert_eq!(refreshes(&env), 2);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// A token held unsaved (its store write failing), with a store whose
/// writes can then be made slow: `fail` fails them, `slow` holds them
/// (`in_write` once one is held) until it is cleared, or 60 s.
struct SlowWrite {
    auth: leadsync::thumbtack::Auth,
    fail: Arc<AtomicBool>,
    slow: Arc<AtomicBool>,
    in_write: Arc<AtomicBool>,
    _release: Release,
}

/// Ends a slow write however the test ends.
struct Release(Arc<AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

async fn slow_write_held_unsaved(env: &Env) -> SlowWrite {
    let fail = Arc::new(AtomicBool::new(false));
    let slow = Arc::new(AtomicBool::new(false));
    let in_write = Arc::new(AtomicBool::new(false));
    let (failing, slowing, writing) = (fail.clone(), slow.clone(), in_write.clone());
    let store = Hooked::new(
        &env.config(),
        Box::new(move || {
            if failing.load(Ordering::SeqCst) {
                anyhow::bail!("disk I/O error (test)");
            }
            if slowing.load(Ordering::SeqCst) {
                writing.store(true, Ordering::SeqCst);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while slowing.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Ok(())
        }),
        Box::new(|_| {}),
    );
    let auth = held_unsaved(env, store, &fail).await;
    SlowWrite {
        auth,
        fail,
        slow: slow.clone(),
        in_write,
        _release: Release(slow),
    }
}

/// A stop's last try to store a token held unsaved runs out of time while
/// the store's write is still running (a slow disk): the write may yet
/// land. Letting the grant's lock go then (with the token) let another
/// process take the lock, read the generation before that write, and
/// present the spent token. The lock is let go only once the write ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_times_out_a_store_write_keeps_the_lock_until_the_write_ends() {
    let env = oauth_env(3600, FAST).await;
    let SlowWrite {
        auth,
        fail,
        slow,
        in_write,
        _release,
    } = slow_write_held_unsaved(&env).await;
    fail.store(false, Ordering::SeqCst);
    slow.store(true, Ordering::SeqCst);
    auth.settle(Duration::from_secs(3)).await;
    assert!(in_write.load(Ordering::SeqCst), "the stop tried the write");
    let b = env.business_ids()[0].clone();
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    assert!(
        other.try_lock_grant(&key).unwrap().is_none(),
        "the lock went while the token's write was still running"
    );
    slow.store(false, Ordering::SeqCst);
    wait_until(
        "the write ends and the lock goes",
        Duration::from_secs(30),
        || other.try_lock_grant(&key).unwrap().is_some(),
    )
    .await;
    assert_eq!(other.get(&key, None, &[]).unwrap().unwrap().generation, 2);
    drop(auth);
}

/// A `Write` into a shared buffer: the log of this test's thread.
#[derive(Clone)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stop comes while the task writing a token held unsaved again is in
/// the middle of its (slow) write: the stop cannot take the chain, and
/// said only "a token store write was still running" — not that the
/// process may end with a rotated token it could not store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_the_background_write_of_an_unsaved_token_says_so_loudly() {
    let env = oauth_env(3600, FAST).await;
    let SlowWrite {
        auth,
        fail,
        slow,
        in_write,
        _release,
    } = slow_write_held_unsaved(&env).await;
    slow.store(true, Ordering::SeqCst);
    fail.store(false, Ordering::SeqCst);
    // No business asks: the chain's own retry task starts the write.
    wait_until(
        "the retry task in its write",
        Duration::from_secs(60),
        || in_write.load(Ordering::SeqCst),
    )
    .await;
    let log = LogBuf(Arc::default());
    let writer = log.clone();
    // tracing caches whether a log line is wanted, process-wide, when it
    // is first reached; with a single subscriber registered (the one set
    // below, for this thread alone), a line first reached on another
    // thread — another test stopping with a token unsaved — asks only that
    // thread's (none) and is cached as never wanted: the line below was
    // lost (1 run in 5 of this file's tests on a loaded machine). With two
    // registered, every one registered is asked.
    let _second = tracing::Dispatch::new(tracing_subscriber::registry());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    {
        // settle's own logging runs on this thread.
        let _guard = tracing::subscriber::set_default(subscriber);
        auth.settle(Duration::from_millis(500)).await;
    }
    let out = String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
    assert!(
        out.contains("stops with a rotated refresh token it could not store"),
        "{out}"
    );
    slow.store(false, Ordering::SeqCst);
    drop(auth);
}

/// A rotated token held unsaved that an `auth exchange` superseded is
/// dropped (the store holds a newer grant): its note goes with it, or the
/// next start would report a token lost that was not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // common::no_spawns: nothing under it starts a process.
async fn an_unsaved_token_superseded_by_a_new_grant_leaves_no_note() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&config, &fail), &fail).await;
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&config.file.oauth.token_store).unwrap();
    let new_grant = GrantWrite {
        refresh_token: leadsync::secret::Secret::new(env.sandbox.mint_refresh_token(&b)),
        access_token: None,
        seed_sha256: None,
        source: "auth exchange".into(),
    };
    assert_eq!(other.put(&key, 1, &new_grant).unwrap(), Written::Stored(2));
    // The grant's locks are let go in this process, then looked at: no
    // child of another test may hold a copy of them meanwhile.
    let gate = common::no_spawns();
    fail.store(false, Ordering::SeqCst);
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    assert_eq!(other.refresh_note(&key).unwrap(), None);
    assert!(other.try_lock_grant(&key).unwrap().is_some());
    drop(gate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_the_store_refuses_is_kept_and_no_refresh_starts_until_it_is_stored() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let fail = Arc::new(AtomicBool::new(true));
    let failing = fail.clone();
    let store = Hooked::new(
        &config,
        Box::new(move || {
            if failing.load(Ordering::SeqCst) {
                anyhow::bail!("disk I/O error (test)");
            }
            Ok(())
        }),
        Box::new(|_| {}),
    );
    let auth =
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap();
    let e = auth
        .token(&b)
        .await
        .expect_err("no access token before the store took the rotated one");
    assert!(e.message.contains("cannot be stored"), "{}", e.message);
    assert_eq!(refreshes(&env), 1);
    // A changed token file does not start a refresh meanwhile either.
    std::fs::write(token_file(&env, &b), env.sandbox.mint_refresh_token(&b)).unwrap();
    for _ in 0..3 {
        let e = auth.token(&b).await.expect_err("still unsaved");
        assert!(e.message.contains("not stored yet"), "{}", e.message);
    }
    assert_eq!(
        refreshes(&env),
        1,
        "no second refresh while the rotated token is unsaved"
    );
    fail.store(false, Ordering::SeqCst);
    auth.token(&b)
        .await
        .expect("stored now: its access token is handed out");
    assert_eq!(refreshes(&env), 1);
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    // The rotated token is stored: the grant's lock file no longer says a
    // refresh's answer was not stored (a stale note would blame the next
    // refusal on a refresh "cut short" that was not).
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    assert_eq!(
        TokenStore::open(&config.file.oauth.token_store)
            .unwrap()
            .refresh_note(&key)
            .unwrap(),
        None
    );
    // Another process continues the stored chain.
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert!(
        !text(&o).contains("did not get its answer stored"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_with_a_fresh_token_does_not_start_a_refresh_storm() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let lead = env.sandbox.lead_ids(&b)[0].clone();
    enqueue(&env, &lead, &b);
    env.sandbox.set_token_faults(TokenFaults {
        missing_scope: true,
        ..Default::default()
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
    wait_until(
        "the row tried several times",
        Duration::from_secs(30),
        || count(&env.sql(), "SELECT max(attempts) FROM outbox") >= 3,
    )
    .await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
    // One refresh per grant (three businesses): every later 401 came with a
    // fresh token and is retried with backoff, not refreshed again.
    assert!(
        refreshes(&env) <= 3,
        "refreshes from 401s are limited: {}",
        refreshes(&env)
    );
    let errors: String = env
        .sql()
        .query_row(
            "SELECT group_concat(error, ' | ') FROM outbox_attempts",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(errors.contains("missing scope?"), "{errors}");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_exchanges_a_code_from_stdin_and_writes_a_conf_per_covered_business() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    // A configuration with the OAuth client but no business yet.
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let head = fixture.split("[[businesses]]").next().unwrap().to_string();
    let base = common::write(env.dir.path(), "base.toml", &head);
    let conf_d = env.dir.path().join("conf.d");
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::create_dir_all(&grants).unwrap();
    let token_file = grants.join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0], &ids[1]]);

    let run = |extra: &[&std::path::Path], args: &[&str], stdin: Option<&str>| {
        let mut c = Command::new(common::bin());
        for f in [&base, &env.overrides] {
            c.arg("--config").arg(f);
        }
        for f in extra {
            c.arg("--config").arg(f);
        }
        c.args(args).env_remove("LEADSYNC_LOG");
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = common::spawn(&mut c).unwrap();
        if let Some(s) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let o = run(
        &[],
        &[
            "auth",
            "exchange",
            "--token-file",
            token_file.to_str().unwrap(),
            "--code-file",
            "-",
            "--redirect-uri",
            "https://partner.example/callback",
            "--write-conf",
            conf_d.to_str().unwrap(),
        ],
        Some(&format!("{code}\n")),
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains(&code), "the code is never printed");
    for id in &ids[..2] {
        assert!(text(&o).contains(id.as_str()), "lists {id}: {}", text(&o));
        assert!(conf_d.join(format!("{id}.toml")).is_file());
    }
    assert!(!conf_d.join(format!("{}.toml", ids[2])).exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The written configuration works: both businesses sync on the one grant.
    let confs: Vec<std::path::PathBuf> = ids[..2]
        .iter()
        .map(|id| conf_d.join(format!("{id}.toml")))
        .collect();
    let refs: Vec<&std::path::Path> = confs.iter().map(|p| p.as_path()).collect();
    let o = run(&refs, &["sync"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM negotiations"), 120);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

#[test]
fn a_plain_http_token_url_is_refused_unless_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let token = common::write(dir.path(), "rt", "sbx_rt_x\n");
    let secret = common::write(dir.path(), "cs", "secret\n");
    for (url, ok) in [
        ("http://auth.example.com/oauth2/token", false),
        ("http://127.0.0.1:8765/oauth2/token", true),
        ("https://auth.thumbtack.com/oauth2/token", true),
    ] {
        let f = common::write(
            dir.path(),
            "c.toml",
            &format!(
                "database = \"{db}\"\n[oauth]\ntoken_url = \"{url}\"\nclient_id = \"x\"\nclient_secret_file = \"{cs}\"\ntoken_store = \"{ts}\"\n\n[[businesses]]\nid = \"1\"\nrefresh_token_file = \"{rt}\"\n",
                db = dir.path().join("m.db").display(),
                cs = secret.display(),
                ts = dir.path().join("t.db").display(),
                rt = token.display()
            ),
        );
        let o = common::output(
            Command::new(common::bin())
                .arg("--config")
                .arg(&f)
                .args(["config", "check"]),
        )
        .unwrap();
        let code = if ok { 0 } else { 78 };
        assert_eq!(o.status.code(), Some(code), "{url}: {}", text(&o));
    }
}

#[test]
fn run_as_root_a_command_refuses_files_of_the_service_user() {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        != 0
    {
        return; // only root can show it
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    let f = common::write(
        dir.path(),
        "c.toml",
        &format!("database = \"{}\"\n", state.join("leadsync.db").display()),
    );
    let o = common::output(Command::new(common::bin()).arg("--config").arg(&f).args([
        "enqueue",
        "--negotiation",
        "1",
        "--status",
        "job_complete",
        "--at",
        "2026-01-01T00:00:00Z",
    ]))
    .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("sudo -u"), "{}", text(&o));
    assert!(
        !state.join("leadsync.db").exists(),
        "no root-owned database created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_store_of_the_previous_version_is_adopted_per_grant() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    // The previous version rotated the file's token once and kept the new
    // one per business.
    let initial = std::fs::read_to_string(token_file(&env, &b)).unwrap();
    let (id, secret) = env.sandbox.client_credentials();
    let http = leadsync::thumbtack::client::http_client(Duration::from_secs(5), "test").unwrap();
    let answer: serde_json::Value = http
        .post(env.sandbox.token_url())
        .basic_auth(&id, Some(&secret))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", initial.trim()),
            ("audience", "urn:partner-api"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rotated = answer["refresh_token"].as_str().unwrap().to_string();
    let store = env.dir.path().join("fixture/tokens.db");
    {
        let c = rusqlite::Connection::open(&store).unwrap();
        c.execute_batch(
            "CREATE TABLE refresh_tokens (business_id TEXT PRIMARY KEY, refresh_token TEXT NOT NULL,
                 generation INTEGER NOT NULL, seed_sha256 TEXT, source TEXT NOT NULL,
                 updated_at TEXT NOT NULL, refused_at TEXT, refused_reason TEXT);",
        )
        .unwrap();
        c.execute(
            "INSERT INTO refresh_tokens VALUES (?1, ?2, 3, ?3, 'refresh', '2026-11-01T00:00:00Z', NULL, NULL)",
            rusqlite::params![
                b,
                rotated,
                leadsync::store::tokens::sha256_hex(initial.trim())
            ],
        )
        .unwrap();
    }
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    let c = rusqlite::Connection::open(&store).unwrap();
    assert_eq!(count(&c, "SELECT count(*) FROM refresh_tokens"), 0, "moved");
    assert_eq!(count(&c, "SELECT generation FROM grants"), 4);
}

/// Forgets the access token the store keeps for every grant, so the next
/// command must refresh.
fn forget_stored_access_tokens(env: &Env) {
    let path = env.dir.path().join("fixture/tokens.db");
    if !path.exists() {
        return;
    }
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute(
        "UPDATE grants SET access_token = NULL, access_expires_at = NULL",
        [],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_expires_in_never_loses_the_rotated_token() {
    // A lifetime past what the clocks can add (an Instant or a wall-clock
    // overflow) panicked between the token endpoint's answer and the write
    // of the rotated token: the token was lost, the next refresh refused.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    for value in [
        serde_json::json!(1e300),
        serde_json::json!(100_000_000_000_000u64),
        serde_json::json!("1e400"),
        serde_json::json!(-5),
        serde_json::json!("soon"),
    ] {
        env.sandbox.set_token_faults(TokenFaults {
            expires_in: Some(value.clone()),
            ..Default::default()
        });
        forget_stored_access_tokens(&env);
        let o = env.run(&["sync", "--business", &b]);
        assert_eq!(o.status.code(), Some(0), "expires_in {value}: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{value}: {}", text(&o));
    }
    env.sandbox.set_token_faults(TokenFaults::default());
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_after_the_rotation_is_asked_again_at_once_with_the_same_token() {
    // A gateway can fail after the server rotated the token: only a retry
    // within the grace period gets the new one, so it must not wait for
    // the next pass.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        error_5xx_after_rotate: 1,
        grace_secs: 60,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 2, "the failed refresh and its retry");
    assert_eq!(env.sandbox.stats().grace_replays, 1);
    assert!(!text(&o).contains("<html>"), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_refresh_token_keeps_the_presented_one() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        keep_refresh_token: 1,
        ..Default::default()
    });
    for _ in 0..3 {
        forget_stored_access_tokens(&env);
        let o = env.run(&["sync", "--business", &b]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    }
    assert_eq!(refreshes(&env), 3);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

/// How many authorization codes the sandbox's token endpoint was sent.
fn codes_spent(env: &Env) -> u64 {
    env.sandbox
        .stats()
        .by_route
        .get("token authorization_code")
        .copied()
        .unwrap_or(0)
}

fn exchange_into(env: &Env, file: &std::path::Path, code: &str) -> std::process::Output {
    common::output(env.cli().args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_into_an_existing_readable_token_file_makes_it_private() {
    // An operator's `touch` (umask 022) leaves a 0644 file: the initial
    // refresh token must not be written into it as it is.
    use std::os::unix::fs::PermissionsExt;
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let file = grants.join("pro-1");
    std::fs::write(&file, "").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = exchange_into(&env, &file, &code);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is the owner's alone");
    assert!(!std::fs::read_to_string(&file).unwrap().trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_never_replaces_another_grant_in_its_token_file() {
    // `--token-file` naming a file that holds a token (a typo for another
    // pro's file), or one configured businesses name, replaced that grant:
    // its single-use refresh token overwritten in the file and the store,
    // its businesses silently moved to the new pro's grant.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let other = grants.join("pro-9");
    std::fs::write(&other, "old-pro-token\n").unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[1]]);
    let o = exchange_into(&env, &other, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("not spent"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "old-pro-token\n");
    // A configured business's file, emptied (its grant lives in the store).
    let o = env.run(&["sync", "--business", &ids[0]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let configured = token_file(&env, &ids[0]);
    std::fs::write(&configured, "").unwrap();
    let o = exchange_into(&env, &configured, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("--business"), "{}", text(&o));
    assert!(text(&o).contains(&ids[0]), "{}", text(&o));
    assert_eq!(codes_spent(&env), 0, "the code is not spent: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_where_the_token_file_cannot_be_replaced_does_not_spend_the_code() {
    // The token file is replaced through a sibling temporary file: a
    // directory that refuses it (read-only for the service user; here, as
    // tests may run as root, the temporary name is taken by a directory)
    // must be found before the single-use code is spent, else the new
    // grant's refresh token is lost.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(grants.join(".pro-1.leadsync-tmp/x")).unwrap();
    let file = grants.join("pro-1");
    std::fs::write(&file, "").unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = exchange_into(&env, &file, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("token file"), "{}", text(&o));
    assert_eq!(codes_spent(&env), 0, "the code is not spent: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_refuses_a_symlinked_token_file_before_spending_the_code() {
    // A link planted where the grant goes would send the refresh token
    // wherever it points.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let elsewhere = env.dir.path().join("public-copy");
    let file = grants.join("pro-1");
    std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = exchange_into(&env, &file, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("symbolic link"), "{}", text(&o));
    assert!(!elsewhere.exists(), "nothing written through the link");
    assert_eq!(codes_spent(&env), 0, "the code is not spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quoted_in_a_token_endpoint_error_is_never_repeated() {
    // The description of an OAuth error is the server's text: one that
    // quotes the presented token must not carry it into the logs, `status`
    // or the mirror.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        echo_token_in_errors: true,
        ..Default::default()
    });
    let mut seen = String::new();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let store = env.dir.path().join("fixture/tokens.db");
    let stored = || -> String {
        rusqlite::Connection::open(&store)
            .unwrap()
            .query_row("SELECT refresh_token FROM grants", [], |r| r.get(0))
            .unwrap()
    };
    let used = stored();
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_ne!(stored(), used);
    // A used token in the file: refused, its description quotes it.
    std::fs::write(token_file(&env, &b), format!("{used}\n")).unwrap();
    forget_stored_access_tokens(&env);
    let o = sync_logged(&env, &b, "trace");
    seen.push_str(&text(&o));
    assert!(seen.contains("has already been used"), "{seen}");
    assert!(!seen.contains(&used), "{seen}");
    assert_no_secret_anywhere(&env, &seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_never_writes_through_a_link_or_over_a_file() {
    // A link planted in the configuration directory (a dangling one
    // `exists()` does not see) must not make leadsync — possibly root —
    // create a file wherever it points.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let head = fixture.split("[[businesses]]").next().unwrap().to_string();
    let base = common::write(env.dir.path(), "base.toml", &head);
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    let elsewhere = env.dir.path().join("planted.toml");
    std::os::unix::fs::symlink(&elsewhere, conf_d.join(format!("{}.toml", ids[0]))).unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0], &ids[1]]);
    let token_file = env.dir.path().join("pro-1");
    let o = common::output(
        Command::new(common::bin())
            .arg("--config")
            .arg(&base)
            .arg("--config")
            .arg(&env.overrides)
            .args([
                "auth",
                "exchange",
                "--token-file",
                token_file.to_str().unwrap(),
                "--code",
                &code,
                "--redirect-uri",
                "https://partner.example/callback",
                "--write-conf",
                conf_d.to_str().unwrap(),
            ]),
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        !elsewhere.exists(),
        "written through the link: {}",
        text(&o)
    );
    assert!(conf_d.join(format!("{}.toml", ids[1])).is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&conf_d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".toml"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_into_a_directory_that_refuses_files_does_not_spend_the_code() {
    // The configuration files are written after the single-use code is
    // spent: a directory that takes no file must be found before, or the
    // pro's businesses are left to be configured by hand. (/proc/self is a
    // directory that refuses a new file even to root, as tests may run.)
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let file = grants.join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = common::output(env.cli().args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
        "--write-conf",
        "/proc/self",
    ]))
    .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("/proc/self"), "{}", text(&o));
    assert!(text(&o).contains("not spent"), "{}", text(&o));
    assert_eq!(codes_spent(&env), 0, "the code is not spent: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_whose_business_list_fails_says_what_to_write_by_hand() {
    // The code is spent and the grant stored when the list fails (an HTML
    // page, a 401 for a missing scope): the exchange cannot be run again,
    // so the error must say how to finish by hand.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    let file = env.dir.path().join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    env.sandbox.set_faults(leadsync::sandbox::Faults {
        html_404: 1.0,
        ..Default::default()
    });
    let o = common::output(env.cli().args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
        "--write-conf",
        conf_d.to_str().unwrap(),
    ]))
    .unwrap();
    // Exit 0: a script must not take it for a failed exchange and retry.
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(codes_spent(&env), 1);
    let out = text(&o);
    assert!(
        out.contains(&format!("refresh_token_file = \"{}\"", file.display())),
        "{out}"
    );
    assert!(out.contains("do not run the exchange again"), "{out}");
    assert!(!out.contains(&code), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_business_list_on_a_dead_stderr_ends_with_its_exit_code() {
    // The grant stored, the business list failed: its warning and the
    // final error went out with `eprintln!`, which panics on a dead
    // terminal (exit 101), before the conf files or in place of the
    // exit code that says what happened.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let file = env.dir.path().join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    env.sandbox.set_faults(leadsync::sandbox::Faults {
        html_404: 1.0,
        ..Default::default()
    });
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]);
    let o = output_of(spawn_with_dead_stderr(&mut c)).await;
    assert_eq!(o.status.code(), Some(0), "{:?} {}", o.status, text(&o));
    assert!(text(&o).contains("stored the new grant"), "{}", text(&o));
    // With --write-conf too: exit 0 (the grant is stored), not a panic.
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    let file = env.dir.path().join("pro-2");
    let code = env.sandbox.mint_grant_code(&[&ids[1]]);
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
        "--write-conf",
        conf_d.to_str().unwrap(),
    ]);
    let o = output_of(spawn_with_dead_stderr(&mut c)).await;
    assert_eq!(o.status.code(), Some(0), "{:?} {}", o.status, text(&o));
    assert_eq!(codes_spent(&env), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_while_the_business_list_hangs_ends_the_exchange_at_once() {
    // The grant stored, Ctrl-C during the business list was held until the
    // list's request gave up (the client's timeout), then ignored.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    let file = env.dir.path().join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    env.sandbox.set_faults(leadsync::sandbox::Faults {
        timeout: 1.0,
        timeout_ms: 120_000,
        ..Default::default()
    });
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
        "--write-conf",
        conf_d.to_str().unwrap(),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = common::spawn(&mut c).unwrap();
    wait_until("the grant is stored", Duration::from_secs(30), || {
        stored_refresh_token(&env, &file).is_some()
    })
    .await;
    let signalled = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = output_of(child).await;
    let took = signalled.elapsed();
    assert_eq!(o.status.code(), Some(1), "{:?} {}", o.status, text(&o));
    assert!(text(&o).contains("interrupted"), "{}", text(&o));
    assert!(text(&o).contains("no configuration file"), "{}", text(&o));
    assert!(took < Duration::from_secs(10), "{took:?}: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_without_an_access_token_is_still_stored() {
    // The server used up the presented token and issued a new one; the
    // answer's missing access token does not make the new one disposable.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        no_access_token_after_rotate: 1,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert!(!text(&o).contains("sbx_rt_"), "{}", text(&o));
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

/// A daemon killed when the test ends, even by a failed assertion.
struct Daemon(Option<std::process::Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM, then waits for the exit (at most `within`): its status and how long it took.
async fn stop_within(mut daemon: Daemon, within: Duration) -> (std::process::ExitStatus, Duration) {
    let mut child = daemon.0.take().expect("a running daemon");
    sigterm(&child);
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_gives_up_a_refresh_still_waiting_for_another_process_within_the_bound() {
    // Every business's grant is locked by "another process" (this test):
    // the daemon's refreshes wait for it. A stop must not wait for them
    // (the old code waited up to three request timeouts after the bound,
    // past systemd's TimeoutStopSec): they sent nothing, so nothing is lost.
    let env = oauth_env(3600, FAST).await;
    let config = env.config();
    let store = TokenStore::open(&config.file.oauth.token_store).unwrap();
    let _locks: Vec<_> = env
        .business_ids()
        .iter()
        .map(|b| {
            let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, b));
            store
                .try_lock_grant(&key)
                .unwrap()
                .expect("the grant lock is free")
        })
        .collect();
    // At debug level the daemon says when a refresh starts waiting for the
    // grant's lock: the stop below must come while one does. (A pass in
    // `sync_runs` as running is not enough: on a loaded machine the stop
    // came after the row was written, before the refresh asked for the
    // lock, and there was no refresh to abandon.)
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let daemon = Daemon(Some(
        common::spawn(
            env.cli()
                .arg("run")
                .env("LEADSYNC_LOG", "leadsync=debug")
                .stderr(log),
        )
        .unwrap(),
    ));
    wait_until(
        "a refresh waits for the grant's lock",
        Duration::from_secs(60),
        || {
            env.daemon_log()
                .contains("another process holds the grant's lock")
        },
    )
    .await;
    // shutdown_timeout_secs = 8 in FAST; the old code took about 16 s.
    let (status, took) = stop_within(daemon, Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        env.daemon_log()
    );
    assert!(
        took < Duration::from_secs(10),
        "the stop took {took:?}, beyond shutdown_timeout_secs = 8\n{}",
        env.daemon_log()
    );
    assert_eq!(refreshes(&env), 0, "no refresh was sent");
    assert_eq!(reauth_count(&env), 0, "no business is marked");
    let log = env.daemon_log();
    assert!(
        log.contains("token refresh of the grant in")
            && log.contains("is abandoned")
            && log.contains("nothing was sent"),
        "the log names the abandoned refresh:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_lost_at_a_stop_is_asked_again_within_the_bound_and_stored() {
    // The token endpoint rotates and then never answers; its grace period
    // replays the answer to the same request. A refresh sent before the
    // stop is given its request timeout and one more ask within the
    // bound, so the rotated token is stored and the next start uses it.
    let env = oauth_env(3600, FAST).await;
    env.sandbox.set_token_faults(TokenFaults {
        hold_after_rotate_ms: 600_000,
        grace_secs: 600,
        ..Default::default()
    });
    let daemon = Daemon(Some(env.spawn_daemon()));
    wait_until(
        "a refresh token rotated and its answer held",
        Duration::from_secs(60),
        || env.sandbox.stats().rotations >= 1,
    )
    .await;
    let (status, took) = stop_within(daemon, Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        env.daemon_log()
    );
    assert!(
        took < Duration::from_secs(10),
        "the stop took {took:?}, beyond shutdown_timeout_secs = 8\n{}",
        env.daemon_log()
    );
    let rotated = env.sandbox.stats().rotations;
    assert!(
        env.sandbox.stats().grace_replays >= 1,
        "the lost answer was asked again\n{}",
        env.daemon_log()
    );
    env.sandbox.set_token_faults(TokenFaults::default());
    // The grants whose answer was replayed and stored refresh with their
    // rotated token: no reuse, no re-authorization.
    forget_stored_access_tokens(&env);
    let o = env.run(&["sync"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        env.daemon_log()
    );
    assert!(env.sandbox.stats().rotations > rotated);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_killed_before_its_answer_was_stored_is_named_at_the_next_refresh() {
    // SIGKILL (systemd past TimeoutStopSec, the OOM killer, a power cut)
    // after Thumbtack rotated the token and before the answer was stored:
    // the stored token is spent. The next refresh is refused; the reason
    // must say why (the token store remembers the refresh in flight),
    // instead of a bare invalid_grant.
    let env = oauth_env(3600, FAST).await;
    env.sandbox.set_token_faults(TokenFaults {
        hold_after_rotate_ms: 600_000,
        ..Default::default()
    });
    let mut daemon = Daemon(Some(env.spawn_daemon()));
    wait_until(
        "a refresh token rotated and its answer held",
        Duration::from_secs(60),
        || env.sandbox.stats().rotations >= 1,
    )
    .await;
    if let Some(mut c) = daemon.0.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    env.sandbox.set_token_faults(TokenFaults::default());
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(reauth_count(&env) >= 1, "{}", text(&o));
    let reasons: Vec<String> = env
        .sql()
        .prepare("SELECT needs_reauth_reason FROM businesses WHERE needs_reauth = 1")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("an earlier refresh of this grant") && r.contains("was cut short")),
        "{reasons:?}\n{}",
        text(&o)
    );
    assert!(
        text(&o).contains("did not get its answer stored"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_token_answer_whose_re_ask_is_throttled_keeps_the_refresh_note() {
    // The first answer is lost after Thumbtack rotated the token (a 5xx);
    // asking again is throttled (429). Whether the token rotated is still
    // unknown: the note must stay, so that the next refusal names it.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    env.sandbox.set_token_faults(TokenFaults {
        error_5xx_after_rotate: 1,
        throttle_reused: 5,
        ..Default::default()
    });
    let store =
        leadsync::app::StoreGrants(TokenStore::open(&config.file.oauth.token_store).unwrap());
    let auth =
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap();
    auth.token(&b)
        .await
        .expect_err("the answer was lost and the re-ask throttled");
    assert_eq!(env.sandbox.stats().rotations, 1);
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let note = TokenStore::open(&config.file.oauth.token_store)
        .unwrap()
        .refresh_note(&key)
        .unwrap();
    assert!(
        note.as_deref().is_some_and(|n| n.starts_with("sent at ")),
        "{note:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_the_refresh_note_is_written_sends_no_refresh() {
    // The note is written (fsync, slow on a loaded disk) just before the
    // request; a stop meanwhile must keep the request from being sent:
    // nothing is sent after the stop, the stored token stays valid.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let config = env.config();
    let (entered, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (entering, released) = (entered.clone(), release.clone());
    let store = Hooked::new(
        &config,
        Box::new(|| Ok(())),
        // A refresh note's write held until released.
        Box::new(move |note| {
            if note.is_some() {
                entering.store(true, Ordering::SeqCst);
                let end = std::time::Instant::now() + Duration::from_secs(60);
                while !released.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }),
    );
    let auth = Arc::new(
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap(),
    );
    let (a, b2) = (auth.clone(), b.clone());
    let unit = tokio::spawn(async move { a.token(&b2).await });
    wait_until(
        "the refresh note is being written",
        Duration::from_secs(60),
        || entered.load(Ordering::SeqCst),
    )
    .await;
    auth.begin_shutdown(std::time::Instant::now() + Duration::from_secs(10));
    release.store(true, Ordering::SeqCst);
    let e = unit.await.unwrap().expect_err("stopping: no token");
    assert!(e.message.contains("stopping"), "{}", e.message);
    assert_eq!(refreshes(&env), 0, "no refresh sent after the stop");
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    assert_eq!(
        TokenStore::open(&config.file.oauth.token_store)
            .unwrap()
            .refresh_note(&key)
            .unwrap(),
        None,
        "nothing was sent: no note"
    );
}

/// `auth exchange` for a token file that moved (the configuration names its
/// new path) while another process holds the old name's rotated token
/// unsaved: the exchange read the store the way a refresh does, which tried
/// to take the old name's chain over, failed on the holder's lock, and so
/// failed after the single-use code was spent — the new grant thrown away,
/// though a new grant needs no old chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_exchange_for_a_moved_token_file_works_while_the_old_name_is_held_unsaved() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(false));
    let auth = held_unsaved(&env, failing_store(&env.config(), &fail), &fail).await;
    let moved = env.dir.path().join("moved-token");
    let mut config = env.config();
    std::fs::rename(token_file(&env, &b), &moved).unwrap();
    for business in &mut config.businesses {
        if business.id == b {
            business.token = leadsync::config::TokenSource::Refresh(moved.clone());
        }
    }
    // Another process: its own store handle (and lock files).
    let other = leadsync::app::open_auth(&config, None, Default::default()).unwrap();
    let code = env.sandbox.mint_auth_code(&b);
    other
        .exchange_code(
            &b,
            &leadsync::secret::Secret::new(code),
            "https://partner.example/callback",
        )
        .await
        .expect("the new grant is stored");
    let store = TokenStore::open(&config.file.oauth.token_store).unwrap();
    let key = leadsync::thumbtack::auth::grant_key(&moved);
    assert!(store.get(&key, None, &[]).unwrap().is_some(), "stored");
    other.settle(Duration::from_secs(5)).await;
    fail.store(false, Ordering::SeqCst);
    auth.settle(Duration::from_secs(5)).await;
}

/// A stop whose bound (the runtime's shutdown) cuts a refresh while the
/// store's write of its rotated token is still running (a slow disk): the
/// refresh's task is dropped, and with it the grant's lock, while the write
/// may yet land. Another process then took the lock, read the generation
/// before that write and presented the spent token. The write owns the
/// lock until it ends, as the write of a token held unsaved does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_drops_a_refresh_mid_write_keeps_the_lock_until_the_write_ends() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let slow = Arc::new(AtomicBool::new(true));
    let in_write = Arc::new(AtomicBool::new(false));
    /// Ends the slow write however the test ends.
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let _release = Release(slow.clone());
    let (slowing, writing) = (slow.clone(), in_write.clone());
    let store = Hooked::new(
        &env.config(),
        Box::new(move || {
            writing.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while slowing.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        }),
        Box::new(|_| {}),
    );
    let config = env.config();
    let (bb, writing) = (b.clone(), in_write.clone());
    // The daemon's own runtime, shut down (its tasks dropped) mid-write.
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let auth = Arc::new(
                leadsync::thumbtack::Auth::new(
                    &config,
                    Some(Arc::new(store)),
                    None,
                    Default::default(),
                )
                .unwrap(),
            );
            let a = auth.clone();
            tokio::spawn(async move { a.token(&bb).await });
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while !writing.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        rt.shutdown_timeout(Duration::ZERO);
    })
    .await
    .unwrap();
    assert!(
        in_write.load(Ordering::SeqCst),
        "the refresh reached its write"
    );
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let other = TokenStore::open(&env.config().file.oauth.token_store).unwrap();
    assert!(
        other.try_lock_grant(&key).unwrap().is_none(),
        "the lock went while the rotated token's write was still running"
    );
    slow.store(false, Ordering::SeqCst);
    wait_until(
        "the write ends and the lock goes",
        Duration::from_secs(30),
        || other.try_lock_grant(&key).unwrap().is_some(),
    )
    .await;
    assert_eq!(other.get(&key, None, &[]).unwrap().unwrap().generation, 2);
}

/// `--token-file` given relative to where the command runs: the conf.d file
/// written names it absolutely (a path in a file is relative to that file's
/// directory, so `grants/pro-1` there would be `conf.d/grants/pro-1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_names_a_relative_token_file_absolutely() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let head = fixture.split("[[businesses]]").next().unwrap().to_string();
    let base = common::write(env.dir.path(), "base.toml", &head);
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::create_dir_all(env.dir.path().join("grants")).unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = Command::new(common::bin())
        .arg("--config")
        .arg(&base)
        .arg("--config")
        .arg(&env.overrides)
        .args([
            "auth",
            "exchange",
            "--token-file",
            "grants/pro-1",
            "--code",
            &code,
            "--redirect-uri",
            "https://partner.example/callback",
            "--write-conf",
            conf_d.to_str().unwrap(),
        ])
        .current_dir(env.dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let written = conf_d.join(format!("{}.toml", ids[0]));
    let o = Command::new(common::bin())
        .arg("--config")
        .arg(&base)
        .arg("--config")
        .arg(&env.overrides)
        .arg("--config")
        .arg(&written)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        std::fs::read_to_string(&written).unwrap()
    );
}

/// `auth exchange --business` with a token store that refuses writes (a
/// disk I/O error): the single-use code was spent before the store's
/// write, which failed, and the new grant's refresh token was dropped —
/// the code, presented again, was refused. The store's write is checked
/// before the code is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_exchange_with_an_unwritable_store_does_not_spend_the_code() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let fail = Arc::new(AtomicBool::new(true));
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(failing_store(&env.config(), &fail).checked())),
        None,
        Default::default(),
    )
    .unwrap();
    let code = leadsync::secret::Secret::new(env.sandbox.mint_auth_code(&b));
    let e = auth
        .exchange_code(&b, &code, "https://partner.example/callback")
        .await
        .expect_err("the store refuses writes");
    let e = format!("{e:#}");
    assert!(e.contains("disk I/O error"), "{e}");
    assert!(e.contains("not spent"), "{e}");
    fail.store(false, Ordering::SeqCst);
    auth.exchange_code(&b, &code, "https://partner.example/callback")
        .await
        .expect("the same code works once the store does");
    auth.settle(Duration::from_secs(5)).await;
}

/// The store's write fails after the code was spent (its check passed):
/// the new grant's refresh token is never dropped. It goes to the grant's
/// token file (0600), which the next refresh takes as a changed file, and
/// the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_exchange_whose_store_write_fails_keeps_the_new_token_in_the_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let file = token_file(&env, &b);
    let before = std::fs::read_to_string(&file).unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let store = failing_store(&env.config(), &fail);
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let code = leadsync::secret::Secret::new(env.sandbox.mint_auth_code(&b));
    let e = auth
        .exchange_code(&b, &code, "https://partner.example/callback")
        .await
        .expect_err("the store's write fails");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let e = format!("{e:#}");
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("disk I/O error"), "{e}");
    let after = std::fs::read_to_string(&file).unwrap();
    assert_ne!(after.trim(), before.trim(), "the new token is in the file");
    assert!(!after.trim().is_empty());
    assert!(!e.contains(after.trim()), "the token is not in the message");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The next run (a working store) takes the file's token.
    forget_stored_access_tokens(&env);
    let rotations = env.sandbox.stats().rotations;
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(env.sandbox.stats().rotations > rotations);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    assert_eq!(reauth_count(&env), 0);
    assert_no_secret_anywhere(&env, &format!("{e}\n{}", text(&o)));
}

/// Review (authfix): the exchange's fallback wrote the new token to the
/// business's token file as configured, replacing a symlink (tokens/b ->
/// shared) by a regular file while the grant is keyed by the canonical path:
/// the grant split at the next reload. It writes the file the link names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_fallback_writes_through_a_symlinked_token_file() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let file = token_file(&env, &b);
    let shared = file.with_file_name("shared");
    std::fs::rename(&file, &shared).unwrap();
    std::os::unix::fs::symlink(&shared, &file).unwrap();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let before = std::fs::read_to_string(&shared).unwrap();
    let fail = Arc::new(AtomicBool::new(true));
    let store = failing_store(&env.config(), &fail);
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let code = leadsync::secret::Secret::new(env.sandbox.mint_auth_code(&b));
    let e = auth
        .exchange_code(&b, &code, "https://partner.example/callback")
        .await
        .expect_err("the store's write fails");
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    let e = format!("{e:#}");
    assert!(e.contains("NOT lost"), "{e}");
    assert!(
        std::fs::symlink_metadata(&file)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link is kept: {e}"
    );
    let after = std::fs::read_to_string(&shared).unwrap();
    assert_ne!(
        after.trim(),
        before.trim(),
        "the new token is in the shared file"
    );
}

/// The fsynced note that a refresh is being sent cannot be written (a full
/// disk, a read-only file system): the refresh was sent all the same, and
/// its rotated token could then only live in memory, lost at the next
/// stop. Nothing is sent; the stored token stays the valid one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_note_cannot_be_written_is_not_sent() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let store = Hooked::new(&env.config(), Box::new(|| Ok(())), Box::new(|_| {}));
    let note_fails = store.note_fails.clone();
    note_fails.store(true, Ordering::SeqCst);
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let before = refreshes(&env);
    let e = auth.token(&b).await.expect_err("no note, no refresh");
    assert_eq!(refreshes(&env), before, "no refresh was sent");
    assert_eq!(
        e.disposition,
        leadsync::thumbtack::problem::Disposition::Retry,
        "{}",
        e.message
    );
    assert!(
        e.message.contains("No space left on device"),
        "{}",
        e.message
    );
    assert!(e.message.contains("not sent"), "{}", e.message);
    note_fails.store(false, Ordering::SeqCst);
    auth.token(&b)
        .await
        .expect("sent once the note can be written");
    assert_eq!(refreshes(&env), before + 1);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
}

/// Review (authfix): the note (a file beside the store) could be written
/// while the token database could not (read-only tokens.db, SQLITE_FULL, a
/// refusing trigger): the refresh was sent and its rotated token lived only
/// in memory, lost when a one-shot command exited. Not sent now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_is_not_sent_when_the_token_database_cannot_be_written() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let fail = Arc::new(AtomicBool::new(true));
    let store = failing_store(&env.config(), &fail).checked();
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let before = refreshes(&env);
    let e = auth
        .token(&b)
        .await
        .expect_err("no writable store, no refresh");
    assert_eq!(
        refreshes(&env),
        before,
        "no refresh was sent: {}",
        e.message
    );
    assert!(e.message.contains("not sent"), "{}", e.message);
    fail.store(false, Ordering::SeqCst);
    auth.token(&b)
        .await
        .expect("sent once the store can be written");
    assert_eq!(refreshes(&env), before + 1);
    auth.settle(Duration::from_secs(5)).await;
}

/// Review (authfix): a note renamed into place whose directory fsync then
/// failed was left saying "sent at ... by pid N" though nothing was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_not_sent_leaves_no_note_saying_it_was() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let store = Hooked::new(&env.config(), Box::new(|| Ok(())), Box::new(|_| {}));
    store.note_sync_fails.store(true, Ordering::SeqCst);
    let auth = leadsync::thumbtack::Auth::new(
        &env.config(),
        Some(Arc::new(store)),
        None,
        Default::default(),
    )
    .unwrap();
    let before = refreshes(&env);
    let e = auth.token(&b).await.expect_err("the note's write failed");
    assert_eq!(refreshes(&env), before, "{}", e.message);
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let note = TokenStore::open(&env.config().file.oauth.token_store)
        .unwrap()
        .refresh_note(&key)
        .unwrap();
    assert_eq!(note, None, "{}", e.message);
}

/// The initial token file removed once its chain is stored (the daemon
/// running): the stored chain is used (the README: the file is read again
/// only when its content changes); every refresh failed "cannot read token
/// file" instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_file_leaves_the_stored_chain_working() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let config = env.config();
    let auth = leadsync::app::open_auth(&config, None, Default::default()).unwrap();
    std::fs::remove_file(token_file(&env, &b)).unwrap();
    forget_stored_access_tokens(&env);
    let before = refreshes(&env);
    auth.token(&b).await.expect("the stored chain");
    assert_eq!(refreshes(&env), before + 1);
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
    auth.settle(Duration::from_secs(5)).await;
    // With no stored chain, a missing file is the error it was.
    let gone = &env.business_ids()[1];
    let fresh = leadsync::app::open_auth(&config, None, Default::default()).unwrap();
    std::fs::remove_file(token_file(&env, gone)).unwrap();
    let e = fresh.token(gone).await.expect_err("nothing stored");
    assert!(
        e.message.contains("cannot read token file"),
        "{}",
        e.message
    );
    assert_eq!(reauth_count(&env), 0);
}

/// Review (authfix): a removed token file falls back to the stored chain,
/// but config validation still requires the file at start and reload: the
/// next restart fails. `status` says so until the file is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_file_is_a_status_alert_until_it_is_back() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let config = env.config();
    let mirror = leadsync::store::Store::open(config.database()).unwrap();
    let auth = leadsync::app::open_auth(&config, Some(mirror), Default::default()).unwrap();
    let file = token_file(&env, &b);
    std::fs::remove_file(&file).unwrap();
    forget_stored_access_tokens(&env);
    auth.token(&b).await.expect("the stored chain");
    let db = rusqlite::Connection::open(config.database()).unwrap();
    let alerts = |db: &rusqlite::Connection| -> Vec<String> {
        db.prepare("SELECT message FROM auth_alerts")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let a = alerts(&db);
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(a[0].contains(&file.display().to_string()), "{a:?}");
    assert!(a[0].contains("restart"), "{a:?}");
    // Restored (an empty file will do): the alert goes at the next refresh.
    auth.settle(Duration::from_secs(5)).await;
    drop(auth);
    std::fs::write(&file, "").unwrap();
    forget_stored_access_tokens(&env);
    let mirror = leadsync::store::Store::open(config.database()).unwrap();
    let auth = leadsync::app::open_auth(&config, Some(mirror), Default::default()).unwrap();
    auth.token(&b).await.expect("the stored chain");
    assert_eq!(alerts(&db), Vec::<String>::new());
    auth.settle(Duration::from_secs(5)).await;
}

/// `webhooks list` (like `register` and `delete`) settled nothing at its
/// exit: a rotated token its store could not take ended with the process
/// without a last write and without the loud "stops with a rotated refresh
/// token it could not store" that `sync` and `drain` give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_commands_settle_a_rotated_token_left_unsaved() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    // The store refuses every write of a grant (reads work).
    let db = rusqlite::Connection::open(env.dir.path().join("fixture/tokens.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE ON grants
         BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END;",
    )
    .unwrap();
    let before = refreshes(&env);
    let o = env.run(&["webhooks", "list", "--business", &b]);
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    assert_eq!(refreshes(&env), before + 1, "{}", text(&o));
    // Not stored, but kept in the grant's token file: nothing lost.
    assert!(
        text(&o).contains("leadsync stops with a rotated refresh token the token store could not take; it is in the grant's token file"),
        "{}",
        text(&o)
    );
    assert_no_secret_anywhere(&env, &text(&o));
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// The token store's directory must not be another user's: its owner could
/// replace or remove the store and its lock files. A directory its group or
/// others can write (/tmp, a umask-002 home, the /var/lib/leadsync of older
/// releases) is a warning whose advice is a private subdirectory, never a
/// chmod of the parent (review authfix: refusing it broke those setups).
#[test]
fn a_token_store_directory_another_user_owns_is_refused_a_shared_one_is_not() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose");
    std::fs::create_dir(&loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o770)).unwrap();
    TokenStore::open(&loose.join("tokens.db")).expect("group-writable: a warning");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o1777)).unwrap();
    TokenStore::open(&loose.join("tokens.db")).expect("sticky, like /tmp: a warning");
    // Only entered (not written) by the group: still a warning.
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o750)).unwrap();
    TokenStore::open(&loose.join("tokens.db")).expect("only readable by the group");
    // Another user's directory (running as root, the tests can make one).
    if std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .ok()
        == Some(0)
    {
        let foreign = dir.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = foreign.join("tokens.db");
        std::fs::write(&store, b"").unwrap();
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(54_321), None).unwrap();
        let e = TokenStore::open(&store)
            .err()
            .expect("another user's directory");
        let e = format!("{e:#}");
        assert!(e.contains("belongs to uid 54321"), "{e}");
    }
}

/// `probe` refreshes a grant's single-use refresh token like any request
/// (README: "A probe of a business with an OAuth grant refreshes its
/// single-use token"), but had no signal handler: a Ctrl-C while Thumbtack
/// had already rotated the token killed it before the new token was
/// stored, and the next refresh presented the spent one (a re-authorization
/// once Thumbtack's grace for retries is over). Ctrl-C now lets the refresh
/// in flight finish and be stored, and the probe stops, saying so. Nothing
/// further is asked after the signal (review adm: the list GET waiting for
/// that refresh was still sent, and a 401 on it could start another
/// refresh after the interrupt, drawing the wait out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_a_probes_token_refresh_keeps_the_rotated_token() {
    use std::io::Read;
    let env = oauth_env(3600, FAST).await;
    let business = env.business_ids()[0].clone();
    let gate = env.sandbox.hold_refresh_answers();
    let rotations = env.sandbox.stats().rotations;
    let api_requests = || {
        env.sandbox
            .stats()
            .by_route
            .iter()
            .filter(|(route, _)| !route.starts_with("token"))
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let mut child = common::spawn(
        env.cli()
            .args(["probe", "--business", &business])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("start probe");
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (mut pipe, stderr) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    wait_until(
        "the probe's refresh token rotated and its answer held",
        Duration::from_secs(60),
        || env.sandbox.stats().rotations > rotations,
    )
    .await;
    let asked_before = api_requests();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    wait_until(
        "the probe saw the interrupt",
        Duration::from_secs(60),
        || stderr.lock().unwrap().contains("probe: interrupted"),
    )
    .await;
    // A second Ctrl-C does not cut the wait short (the token would be
    // lost): it says how long the wait may still take.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    wait_until(
        "the probe answered the second interrupt",
        Duration::from_secs(60),
        || stderr.lock().unwrap().contains("probe: still waiting"),
    )
    .await;
    // Only now does the refresh answer (with the rotated token).
    gate.cancel();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    reader.join().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr.lock().unwrap()
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("interrupted"), "{all}");
    assert_eq!(
        api_requests(),
        asked_before,
        "requests sent after the interrupt: {all}"
    );

    // The next refresh presents the rotated token, not the spent one.
    let stats = env.sandbox.stats();
    let o = env.run(&["sync", "--business", &business]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let after = env.sandbox.stats();
    assert_eq!(after.reused_refresh_tokens, 0, "{}", text(&o));
    assert_eq!(
        after.grace_replays,
        stats.grace_replays,
        "the spent token was presented again: {}",
        text(&o)
    );
    assert_eq!(reauth_count(&env), 0);
    assert_no_secret_anywhere(&env, &all);
}

/// `auth exchange --token-file FILE --code CODE`, spawned with its output piped.
fn spawn_exchange_into(env: &Env, file: &std::path::Path, code: &str) -> std::process::Child {
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        code,
        "--redirect-uri",
        "https://partner.example/callback",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    common::spawn(&mut c).unwrap()
}

/// A child's stderr, read as it comes (a test waits for a line of it),
/// and its output once it ends, that stderr included.
struct Watched {
    child: std::process::Child,
    err: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Watched {
    fn new(mut child: std::process::Child) -> Self {
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let seen = err.clone();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Watched { child, err, reader }
    }

    async fn until(&self, what: &str, needle: &str) {
        wait_until(what, Duration::from_secs(30), || {
            self.err.lock().unwrap().contains(needle)
        })
        .await;
    }

    async fn output(self) -> std::process::Output {
        let mut o = output_of(self.child).await;
        self.reader.join().unwrap();
        o.stderr = self.err.lock().unwrap().clone().into_bytes();
        o
    }
}

async fn output_of(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

fn stored_refresh_token(env: &Env, file: &std::path::Path) -> Option<String> {
    let key = leadsync::thumbtack::auth::grant_key(file);
    let db = rusqlite::Connection::open(env.dir.path().join("fixture/tokens.db")).unwrap();
    db.query_row(
        "SELECT refresh_token FROM grants WHERE grant_key = ?1",
        [key],
        |r| r.get(0),
    )
    .ok()
}

/// An onboarding of the first business into `grants/pro-1` whose token
/// file cannot be written once its code is spent (a directory stands
/// where the write makes its temporary file, left there): the env, the
/// business ids, the token file and the exchange's output (exit 0 checked).
async fn exchange_whose_token_file_cannot_be_written()
-> (Env, Vec<String>, std::path::PathBuf, std::process::Output) {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let file = grants.join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let answer = env.sandbox.hold_code_answers();
    let child = spawn_exchange_into(&env, &file, &code);
    wait_until("the code is spent", Duration::from_secs(30), || {
        codes_spent(&env) == 1
    })
    .await;
    std::fs::create_dir(grants.join(".pro-1.leadsync-tmp")).unwrap();
    answer.cancel();
    let o = output_of(child).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    (env, ids, file, o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_stores_the_grant_when_its_token_file_cannot_be_written() {
    // The token file's write failing after the code is spent (a full disk
    // or a quota on the tokens directory) returned before the store was
    // tried: the spent code's grant was lost though the store had room.
    let (env, _, file, o) = exchange_whose_token_file_cannot_be_written().await;
    assert!(
        text(&o).contains("cannot write the token file"),
        "{}",
        text(&o)
    );
    let stored = stored_refresh_token(&env, &file);
    assert!(
        stored.as_deref().is_some_and(|t| !t.is_empty()),
        "the grant is in the token store: {}",
        text(&o)
    );
    assert_eq!(codes_spent(&env), 1);
}

/// `cmd` spawned with its stdout piped and its stderr a pipe whose reader
/// is closed: every write there fails (EPIPE), as on a dead terminal.
fn spawn_with_dead_stderr(cmd: &mut Command) -> std::process::Child {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(writer);
    common::spawn(cmd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_with_a_dead_stderr_still_stores_the_grant() {
    // A dead terminal (an SSH session dropped, a closed pipe): the error
    // logged when the token file cannot be written failed its stderr
    // write, which tracing-subscriber reported with `eprintln!`, which
    // panicked before the store was tried: the spent code's grant was lost.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let file = grants.join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let answer = env.sandbox.hold_code_answers();
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]);
    let child = spawn_with_dead_stderr(&mut c);
    wait_until("the code is spent", Duration::from_secs(30), || {
        codes_spent(&env) == 1
    })
    .await;
    std::fs::create_dir(grants.join(".pro-1.leadsync-tmp")).unwrap();
    answer.cancel();
    let o = output_of(child).await;
    let stored = stored_refresh_token(&env, &file);
    assert!(
        stored.as_deref().is_some_and(|t| !t.is_empty()),
        "the grant is in the token store: {:?} {}",
        o.status,
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("stored the new grant"), "{}", text(&o));
    assert_eq!(codes_spent(&env), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_into_an_empty_file_whose_grant_is_only_stored_is_refused_unspent() {
    // The token file's write failed after the code was spent: the file is
    // empty, the grant is in the token store alone (keyed by the file's
    // path). A later onboarding into that file saw it empty, spent its
    // code and silently replaced that grant.
    let (env, ids, file, _) = exchange_whose_token_file_cannot_be_written().await;
    let obstacle = file.with_file_name(".pro-1.leadsync-tmp");
    std::fs::remove_dir(&obstacle).unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), "");
    let first = stored_refresh_token(&env, &file).expect("stored");
    env.sandbox.set_token_faults(TokenFaults::default());
    let code = env.sandbox.mint_grant_code(&[&ids[1]]);
    let o = exchange_into(&env, &file, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("not spent"), "{}", text(&o));
    assert!(text(&o).contains("--business"), "{}", text(&o));
    assert_eq!(codes_spent(&env), 1, "{}", text(&o));
    assert_eq!(stored_refresh_token(&env, &file), Some(first));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_onboardings_into_one_token_file_keep_the_first_grant() {
    // Both saw the file empty before either took the grant's lock: the
    // second spent its code and silently replaced the first pro's grant.
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grants = env.dir.path().join("grants");
    std::fs::create_dir_all(&grants).unwrap();
    let file = grants.join("pro-1");
    let (first, second) = (
        env.sandbox.mint_grant_code(&[&ids[0]]),
        env.sandbox.mint_grant_code(&[&ids[1]]),
    );
    let answer = env.sandbox.hold_code_answers();
    let a = spawn_exchange_into(&env, &file, &first);
    wait_until("the first code is spent", Duration::from_secs(30), || {
        codes_spent(&env) == 1
    })
    .await;
    // The file is there, empty, while the first exchange waits for its
    // answer: the second waits for the grant's lock, and its answer is
    // released only then.
    let mut c = env.cli();
    c.env("LEADSYNC_LOG", "debug")
        .args([
            "auth",
            "exchange",
            "--token-file",
            file.to_str().unwrap(),
            "--code",
            &second,
            "--redirect-uri",
            "https://partner.example/callback",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let b = Watched::new(common::spawn(&mut c).unwrap());
    b.until("the second waits for the grant's lock", "waiting for it")
        .await;
    answer.cancel();
    let (a, b) = (output_of(a).await, b.output().await);
    assert_eq!(a.status.code(), Some(0), "{}", text(&a));
    assert_ne!(b.status.code(), Some(0), "{}", text(&b));
    assert!(text(&b).contains("not spent"), "{}", text(&b));
    assert_eq!(codes_spent(&env), 1, "{}", text(&b));
    let in_file = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        stored_refresh_token(&env, &file).as_deref(),
        Some(in_file.trim())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onboarding_refuses_a_file_that_is_not_text_and_leaves_its_mode() {
    // `--token-file /var/lib/leadsync/leadsync.db` (a typo): the "holds a
    // token" check only refused files read as text, so the mirror was let
    // through and made 0600 before anything refused it.
    use std::os::unix::fs::PermissionsExt;
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let file = env.dir.path().join("mirror.db");
    let bytes = b"SQLite format 3\0\xff\xfe\x00\x01binary";
    std::fs::write(&file, bytes).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let code = env.sandbox.mint_grant_code(&[&ids[0]]);
    let o = exchange_into(&env, &file, &code);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("not spent"), "{}", text(&o));
    assert!(text(&o).contains("move the file aside"), "{}", text(&o));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "left as it was");
    assert_eq!(std::fs::read(&file).unwrap(), bytes);
    assert_eq!(codes_spent(&env), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_while_the_code_is_spent_waits_for_the_grant_to_be_stored() {
    // An SSH drop (SIGHUP) or Ctrl-C after the code was sent killed the
    // exchange with the new grant's refresh token in memory only.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let code = env.sandbox.mint_grant_code(&[&b]);
    let answer = env.sandbox.hold_code_answers();
    let mut c = env.cli();
    c.args([
        "auth",
        "exchange",
        "--business",
        &b,
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = Watched::new(common::spawn(&mut c).unwrap());
    wait_until("the code is spent", Duration::from_secs(30), || {
        codes_spent(&env) == 1
    })
    .await;
    for signal in ["-HUP", "-INT"] {
        let killed = Command::new("kill")
            .args([signal, &child.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    // Its answer held until the signal was taken.
    child.until("the signal is taken", "received").await;
    answer.cancel();
    let o = child.output().await;
    assert_eq!(o.status.code(), Some(1), "{:?} {}", o.status, text(&o));
    assert!(text(&o).contains("interrupted"), "{}", text(&o));
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let db = rusqlite::Connection::open(env.dir.path().join("fixture/tokens.db")).unwrap();
    let source: String = db
        .query_row(
            "SELECT source FROM grants WHERE grant_key = ?1",
            [key],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(source, "auth exchange", "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_before_the_code_is_sent_keeps_it_unspent() {
    // Another process holds the grant's lock: the exchange waits for it,
    // and Ctrl-C meanwhile ends it without sending the code.
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let code = env.sandbox.mint_grant_code(&[&b]);
    let key = leadsync::thumbtack::auth::grant_key(&token_file(&env, &b));
    let store = TokenStore::open(&env.dir.path().join("fixture/tokens.db")).unwrap();
    let lock = store
        .try_lock_grant(&key)
        .unwrap()
        .expect("the grant's lock");
    let mut c = env.cli();
    c.env("LEADSYNC_LOG", "debug")
        .args([
            "auth",
            "exchange",
            "--business",
            &b,
            "--code",
            &code,
            "--redirect-uri",
            "https://partner.example/callback",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = common::spawn(&mut c).unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let (mut all, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&all).contains("waiting for it") {
                return (true, stderr, all);
            }
        }
        (false, stderr, all)
    })
    .await
    .unwrap();
    assert!(seen.0, "{}", String::from_utf8_lossy(&seen.2));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    drop(lock);
    let mut rest = seen.2;
    std::io::Read::read_to_end(&mut { seen.1 }, &mut rest).unwrap();
    let err = String::from_utf8_lossy(&rest);
    assert_eq!(status.code(), Some(1), "{status:?} {err}");
    assert!(err.contains("not spent"), "{err}");
    assert_eq!(codes_spent(&env), 0);
}

/// `webhooks list | head -1`: the reader gone, a `println!` panicked
/// (EPIPE) and main's panic hook exited before `auth.settle`: a rotated
/// token the store could not take got neither its last write nor the loud
/// line (review xb). Output now ignores a dead standard output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_list_into_a_closed_pipe_still_settles_its_rotated_token() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    forget_stored_access_tokens(&env);
    let db = rusqlite::Connection::open(env.dir.path().join("fixture/tokens.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE ON grants
         BEGIN SELECT RAISE(ABORT, 'disk I/O error (test)'); END;",
    )
    .unwrap();
    let before = refreshes(&env);
    let mut c = env.cli();
    c.args(["webhooks", "list", "--business", &b]);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    c.stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped());
    let child = common::spawn(&mut c).unwrap();
    let o = output_of(child).await;
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(refreshes(&env), before + 1, "{err}");
    assert!(
        err.contains("leadsync stops with a rotated refresh token the token store could not take"),
        "settled: {:?} {err}",
        o.status
    );
    // 1: the listing failed (its token cannot be stored), said on a dead
    // standard output; not a panic.
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// `webhooks list > list.json` on a full disk, or into a closed pipe: the
/// output was lost, yet the command exited 0 once its writes stopped
/// panicking (review of xb), so a script took a cut file for the whole
/// answer. It exits 1, as every other command does on a closed pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_list_whose_output_is_lost_exits_1() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let o = env.run(&["webhooks", "list", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for full_disk in [false, true] {
        let mut c = env.cli();
        c.args(["webhooks", "list", "--business", &b]);
        if full_disk {
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            c.stdout(full);
        } else {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            c.stdout(writer);
        }
        c.stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let o = output_of(common::spawn(&mut c).unwrap()).await;
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "full disk {full_disk}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_follows_every_page_of_the_business_list() {
    // The list answers `pagination: {limit}` and no `next`, as Thumbtack's
    // does: reading its first page only wrote one conf file of three, and
    // the code is spent, so the others had to be written by hand.
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 1,
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [true, true, true], "{out}");
    assert!(!out.contains("may cover more"), "{out}");
}

/// Runs `auth exchange --write-conf` for a grant of the first three
/// businesses with `faults` set: its output, and which of the three got
/// a conf file.
async fn exchange_three_with(
    faults: leadsync::sandbox::Faults,
) -> (std::process::Output, Vec<bool>) {
    let (o, written, _) = exchange_three_configured(faults, |_, _| String::new()).await;
    (o, written)
}

/// [`exchange_three_with`], with `businesses(ids, dir)` appended to the
/// configuration (businesses configured before the exchange); also
/// returns the three ids.
async fn exchange_three_configured(
    faults: leadsync::sandbox::Faults,
    businesses: impl FnOnce(&[String], &std::path::Path) -> String,
) -> (std::process::Output, Vec<bool>, Vec<String>) {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    assert!(ids.len() >= 3, "{ids:?}");
    let conf_d = env.dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    let file = env.dir.path().join("pro-1");
    let code = env.sandbox.mint_grant_code(&[&ids[0], &ids[1], &ids[2]]);
    env.sandbox.set_faults(faults);
    let fixture = std::fs::read_to_string(&env.fixture).unwrap();
    let head = fixture.split("[[businesses]]").next().unwrap().to_string();
    let extra = businesses(&ids[..3], env.dir.path());
    let base = common::write(env.dir.path(), "base.toml", &format!("{head}\n{extra}"));
    let mut c = Command::new(common::bin());
    c.arg("--config")
        .arg(&base)
        .arg("--config")
        .arg(&env.overrides)
        .env_remove("LEADSYNC_LOG");
    let o = common::output(c.args([
        "auth",
        "exchange",
        "--token-file",
        file.to_str().unwrap(),
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
        "--write-conf",
        conf_d.to_str().unwrap(),
    ]))
    .unwrap();
    let written = ids[..3]
        .iter()
        .map(|id| conf_d.join(format!("{id}.toml")).is_file())
        .collect();
    (o, written, ids[..3].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_list_reading_offset_as_a_page_number_is_warned_about() {
    // Pages of 2; offset 2 read as page 2 (businesses 5..) answers empty:
    // taken for the end, the third business silently got no conf file.
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 2,
        offset_as_page: true,
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [true, true, false], "{out}");
    assert!(
        out.contains("may cover more") && out.contains("empty after a full page"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_page_of_the_business_list_failing_keeps_what_was_read() {
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 1,
        business_offset_503: true,
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [true, false, false], "{out}");
    assert!(
        out.contains("may cover more") && out.contains("page 2 could not be read"),
        "{out}"
    );
    // Exit 0 (the grant is stored, the code spent: nothing to retry), and
    // the last line of the error output says the list may be incomplete.
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.contains("may be incomplete") && last.contains("do not run the exchange again"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_outage_of_the_business_list_is_retried() {
    // Two 503s, then the list: one 503 ended the listing before.
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 1,
        business_fail_first: 2,
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [true, true, true], "{out}");
    assert!(!out.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_business_page_failing_after_its_retries_exits_0_with_the_warning_last() {
    // Every try of the first page fails: the grant is stored and the code
    // spent, so exit 1 invited a script to run the exchange again.
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 1,
        business_fail_first: leadsync::thumbtack::auth::BUSINESS_PAGE_ATTEMPTS,
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [false, false, false], "{out}");
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("leadsync: WARNING:")
            && last.contains("do not run the exchange again")
            && last.contains("<businessID>.toml")
            && last.contains("refresh_token_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_the_business_list_is_retried_after_its_retry_after() {
    // Two 429s naming Retry-After: 1, then the list: each retry waits the
    // second it names (a lower bound; the tries are not spent).
    let started = std::time::Instant::now();
    let (o, written) = exchange_three_with(leadsync::sandbox::Faults {
        business_page_size: 1,
        business_fail_first: 2,
        business_fail_retry_after: Some(1),
        ..Default::default()
    })
    .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(written, [true, true, true], "{out}");
    assert!(!out.contains("warning"), "{out}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{out}"
    );
}

/// A business configured with leading zeros (`0468`, which config check
/// only warns about) is the one the grant lists as `468`: config refuses
/// the two as one business configured twice, so writing `468.toml` would
/// make the reload the command suggests refuse the whole configuration,
/// and the next start exit 78. It is "configured already", as the exact
/// id would be, and no file is written for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_conf_takes_a_business_configured_with_leading_zeros_as_configured() {
    let (o, written, ids) =
        exchange_three_configured(leadsync::sandbox::Faults::default(), |ids, dir| {
            let token = common::write(dir, "static-token", "tok\n");
            format!(
                "[[businesses]]\nid = \"0{}\"\naccess_token_file = {:?}\n",
                ids[0],
                token.to_str().unwrap()
            )
        })
        .await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(
        written,
        [false, true, true],
        "a second entry for 0{}: {out}",
        ids[0]
    );
    assert!(
        out.contains(&format!("{} is configured already as 0{}", ids[0], ids[0])),
        "{out}"
    );
}

/// Review (oauth adversarial): a token file saved by an editor that writes a
/// UTF-8 byte order mark (Notepad, PowerShell 5's `-Encoding UTF8`) with CRLF
/// line ends was presented with the BOM (`trim` keeps U+FEFF): Thumbtack
/// refused it and the business was marked `needs_reauth` ("re-authorize the
/// pro") for a token that was fine all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_with_a_byte_order_mark_and_crlf_is_its_token() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let file = token_file(&env, &b);
    let token = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("\u{feff}{}\r\n", token.trim())).unwrap();
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0);
    assert_eq!(refreshes(&env), 1);
}

/// Review (oauth adversarial): two businesses of one pro configured with
/// two token files holding the same grant (the onboarding's file copied
/// instead of named twice) were two chains presenting one single-use
/// token: the second presented it spent (or, racing, spent the first's),
/// and one business had to be re-authorized. The copy is not presented:
/// both businesses wait with a reason naming the other file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_copied_into_a_second_token_file_is_never_presented_twice() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grant = env.sandbox.mint_grant(&[&ids[0], &ids[1]]);
    std::fs::write(token_file(&env, &ids[0]), format!("{grant}\n")).unwrap();
    std::fs::write(token_file(&env, &ids[1]), format!("{grant}\n")).unwrap();
    let o = env.run(&["sync"]);
    let out = text(&o);
    assert_eq!(
        env.sandbox.stats().reused_refresh_tokens,
        0,
        "the copy was presented spent: {out}"
    );
    assert_eq!(env.sandbox.stats().grace_replays, 0, "{out}");
    assert!(
        out.contains("holds the same refresh token as")
            && out.contains(&token_file(&env, &ids[1]).display().to_string()),
        "{out}"
    );
    assert_eq!(
        refreshes(&env),
        1,
        "only the third business refreshed: {out}"
    );
    // Named once, the grant works for both.
    let fixture = std::fs::read_to_string(&env.fixture).unwrap().replace(
        &token_file(&env, &ids[1]).display().to_string(),
        &token_file(&env, &ids[0]).display().to_string(),
    );
    std::fs::write(&env.fixture, fixture).unwrap();
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(reauth_count(&env), 0, "{}", text(&o));
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// Review (oauth adversarial): a static `access_token_file` given a new
/// token and reloaded kept sending the old one (cached since its first
/// read) until the API refused it, so a token replaced because it was
/// leaked, or named the wrong account, stayed in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sends_the_new_content_of_a_static_token_file() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    let file = env.dir.path().join("static-token");
    std::fs::write(&file, "static_old\n").unwrap();
    let mut config = env.config();
    for business in &mut config.businesses {
        if business.id == b {
            business.token = leadsync::config::TokenSource::Static(file.clone());
        }
    }
    let auth = leadsync::thumbtack::Auth::new(&config, None, None, Default::default()).unwrap();
    assert_eq!(auth.token(&b).await.unwrap().expose(), "static_old");
    std::fs::write(&file, "static_new\n").unwrap();
    auth.reconfigure(&config);
    assert_eq!(auth.token(&b).await.unwrap().expose(), "static_new");
}

/// Review (oauth adversarial): `config check` said nothing of two token
/// files holding one grant; the refresh refuses them (above), so the
/// operator learns of it before the start, with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_warns_of_a_grant_copied_into_two_token_files() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let grant = env.sandbox.mint_grant(&[&ids[0], &ids[1]]);
    std::fs::write(token_file(&env, &ids[0]), format!("{grant}\n")).unwrap();
    std::fs::write(token_file(&env, &ids[1]), format!("\u{feff}{grant}\r\n")).unwrap();
    let o = env.run(&["config", "check"]);
    let out = text(&o);
    assert!(
        out.contains("hold the same refresh token")
            && out.contains(&token_file(&env, &ids[0]).display().to_string())
            && out.contains(&token_file(&env, &ids[1]).display().to_string()),
        "{out}"
    );
    assert!(!out.contains(&grant), "{out}");
    // Empty token files (onboarding's) are no copies of each other.
    std::fs::write(token_file(&env, &ids[0]), "\n").unwrap();
    std::fs::write(token_file(&env, &ids[1]), "").unwrap();
    let o = env.run(&["config", "check"]);
    assert!(!text(&o).contains("same refresh token"), "{}", text(&o));
}

/// An OAuth daemon's second business with an empty token file and a fresh
/// authorization code: (env, business id, code).
async fn a_business_awaiting_its_exchange() -> (Env, String, String) {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[1].clone();
    std::fs::write(token_file(&env, &b), "").unwrap();
    let code = env.sandbox.mint_auth_code(&b);
    (env, b, code)
}

/// `auth exchange` of `code` for business `b`.
fn exchange_args<'a>(b: &'a str, code: &'a str) -> [&'a str; 8] {
    [
        "auth",
        "exchange",
        "--business",
        b,
        "--code",
        code,
        "--redirect-uri",
        "https://partner.example/callback",
    ]
}

/// Review (oauth adversarial): an exchange whose answer was lost (the
/// connection cut after the code was sent) or that the token endpoint did
/// not serve (a 503 page, a 429) ended with the bare transport error: the
/// operator could not tell whether the single-use code was spent, nor what
/// to do. It says what happened to the code and the next step; a code the
/// endpoint never took still works when run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_without_an_answer_says_what_became_of_the_code() {
    let (env, b, code) = a_business_awaiting_its_exchange().await;
    let args = exchange_args(&b, &code);
    for (status, says) in [
        (0, "the code may have been spent"),
        (503, "the code may have been spent"),
        (429, "the code was not spent"),
    ] {
        env.sandbox.set_token_faults(TokenFaults {
            before_rotate: vec![status],
            ..Default::default()
        });
        let o = env.run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains(says) && text(&o).contains("run the same command again"),
            "HTTP {status}: {}",
            text(&o)
        );
        assert!(!text(&o).contains(&code));
    }
    env.sandbox.set_token_faults(TokenFaults::default());
    let o = env.run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Review (oauth adversarial): a redirecting token endpoint (a moved or
/// mistyped `oauth.token_url`) is never followed — the client secret and
/// the refresh token must not go where it points — but the error said only
/// "answered HTTP 301 (N bytes)": it names where it was sent and the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_token_endpoint_is_named_with_its_target_and_the_key() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        before_rotate: vec![307],
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("redirected to https://elsewhere.invalid/oauth2/token")
            && out.contains("check oauth.token_url"),
        "{out}"
    );
    assert_eq!(refreshes(&env), 1, "not followed: {out}");
    assert_eq!(reauth_count(&env), 0);
}

/// Review (oauth adversarial): an access token answered with a trailing
/// newline (a token service padding its values) was sent as is: no HTTP
/// header may hold it, so every request of the business failed as a
/// "connection failed: builder error" until the token expired (an hour),
/// and then again with the next one. Whitespace around it is no part of
/// it (a refresh token is kept exactly as answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_answered_with_a_trailing_newline_is_used_without_it() {
    let env = oauth_env(3600, FAST).await;
    let b = env.business_ids()[0].clone();
    env.sandbox.set_token_faults(TokenFaults {
        padded_access_token_after_rotate: 1,
        ..Default::default()
    });
    let o = env.run(&["sync", "--business", &b]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(refreshes(&env), 1);
    assert_eq!(reauth_count(&env), 0);
}

/// Review (oauth adversarial): the other token files were indexed once per
/// configuration, so a copy made after the index was read was presented:
/// A refreshed (index read), the pro re-authorized A (a new grant in A's
/// file), the operator copied A's file over B's without a reload: B spent
/// A's new token, and A needed re-authorization again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_copied_after_a_refresh_is_not_presented_by_the_copy() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let config = env.config();
    let store =
        leadsync::app::StoreGrants(TokenStore::open(&config.file.oauth.token_store).unwrap());
    let auth =
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap();
    auth.token(&a).await.expect("A refreshes");
    let grant = env.sandbox.mint_grant(&[&a, &b]);
    std::fs::write(token_file(&env, &a), format!("{grant}\n")).unwrap();
    std::fs::copy(token_file(&env, &a), token_file(&env, &b)).unwrap();
    let refused = auth.token(&b).await.expect_err("the copy is not presented");
    assert!(
        format!("{refused:?}").contains("holds the same refresh token as"),
        "{refused:?}"
    );
    auth.token(&a).await.expect("A's new grant works");
    assert_eq!(env.sandbox.stats().reused_refresh_tokens, 0);
}

/// Review (oauth adversarial): a token file renamed by copying (`cp old
/// new`, the configuration pointed at the new name, reloaded) was the twin
/// of the old name's chain, which no business names any more: the business
/// waited as needs_reauth until a restart. A chain without businesses is
/// nobody's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_renamed_by_a_copy_is_presented() {
    let env = oauth_env(3600, FAST).await;
    let a = env.business_ids()[0].clone();
    let mut config = env.config();
    let store =
        leadsync::app::StoreGrants(TokenStore::open(&config.file.oauth.token_store).unwrap());
    let auth =
        leadsync::thumbtack::Auth::new(&config, Some(Arc::new(store)), None, Default::default())
            .unwrap();
    let renamed = env.dir.path().join("renamed.tok");
    std::fs::copy(token_file(&env, &a), &renamed).unwrap();
    for business in &mut config.businesses {
        if business.id == a {
            business.token = leadsync::config::TokenSource::Refresh(renamed.clone());
        }
    }
    auth.reconfigure(&config);
    auth.token(&a)
        .await
        .expect("the renamed file's grant is presented");
    assert!(auth.blocked().is_empty(), "{:?}", auth.blocked());
}

/// Review (oauth adversarial): every exchange the endpoint did not serve
/// said "the code was not spent ... run the same command again", a
/// redirect too (running it again meets the same redirect) and any other
/// 4xx (the endpoint refused it without saying why). A redirect says to
/// fix oauth.token_url first; another refusal does not claim to know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_redirected_or_refused_without_a_reason_says_what_to_fix() {
    let (env, b, code) = a_business_awaiting_its_exchange().await;
    let args = exchange_args(&b, &code);
    for (status, says) in [
        (307, "fix oauth.token_url, then run the command again"),
        (
            404,
            "without an OAuth error: the code is most likely not spent",
        ),
    ] {
        env.sandbox.set_token_faults(TokenFaults {
            before_rotate: vec![status],
            ..Default::default()
        });
        let o = env.run(&args);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            text(&o).contains(says) && !text(&o).contains("the code was not spent"),
            "HTTP {status}: {}",
            text(&o)
        );
    }
}
