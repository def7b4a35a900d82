//! OAuth: rotating single-use refresh tokens stored before use, across
//! expiry and restarts; refused grants isolate their business; secrets stay
//! out of logs and the mirror.

mod common;

use common::{FAST, count, oauth_env, refreshes, text};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_syncs_across_expiry_and_restarts_never_reuse_a_refresh_token() {
    let env = oauth_env(1, FAST).await;
    // Separate processes: each restart must continue from the stored rotated token.
    for round in 0..3 {
        let o = env.run(&["sync"]);
        assert_eq!(o.status.code(), Some(0), "round {round}: {}", text(&o));
        tokio::time::sleep(Duration::from_millis(1100)).await; // let the access tokens expire
    }
    // The daemon, across expiry, then a restart of it.
    let overrides = FAST.replace(
        "[poll]\npage_size = 10\n",
        "[poll]\npage_size = 10\nschedule = \"* * * * * *\"\n",
    );
    env.set_overrides(&overrides);
    for _ in 0..2 {
        let before = refreshes(&env);
        let stop = CancellationToken::new();
        let daemon = tokio::spawn(leadsync::run(env.config(), stop.clone()));
        common::wait_until(
            "two refreshes per business in the daemon",
            Duration::from_secs(60),
            || refreshes(&env) >= before + 6,
        )
        .await;
        stop.cancel();
        daemon.await.unwrap().unwrap();
    }
    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        env.sandbox.stats().reused_refresh_tokens,
        0,
        "a refresh token was presented twice"
    );
    let db = env.sql();
    // A stop interrupts the passes still running (no refresh starts after it).
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sync_runs WHERE outcome <> 'ok' \
             AND coalesce(error, '') NOT LIKE 'interrupted by shutdown%'"
        ),
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM businesses WHERE needs_reauth = 1"
        ),
        0
    );
    let tokens = env.dir.path().join("fixture/tokens.db");
    let mode = std::fs::metadata(&tokens).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token store mode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_grant_marks_only_its_business_until_a_new_grant_arrives() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    let file = env.dir.path().join("fixture/tokens").join(&ids[0]);
    std::fs::write(&file, "sbx_rt_bogus\n").unwrap();

    let o = env.run(&["sync"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let db = env.sql();
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
            "SELECT count(*) FROM businesses WHERE needs_reauth = 1"
        ),
        1,
        "only that business"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM negotiations"),
        120,
        "the others synced"
    );
    let reason: String = db
        .query_row(
            "SELECT needs_reauth_reason FROM businesses WHERE needs_reauth = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        reason.contains("invalid_grant") && reason.contains("auth exchange"),
        "{reason}"
    );

    // Its outbox rows stay pending, their attempts untouched; others go out.
    let lead0 = "500000000000000001";
    let lead1 = env.sandbox.lead_ids(&ids[1])[0].clone();
    env.run(&[
        "enqueue",
        "--negotiation",
        lead0,
        "--business",
        &ids[0],
        "--status",
        "appt_scheduled",
        "--at",
        "2026-11-01T10:00:00Z",
    ]);
    env.run(&[
        "enqueue",
        "--negotiation",
        &lead1,
        "--status",
        "appt_scheduled",
        "--at",
        "2026-11-01T10:00:00Z",
    ]);
    let o = env.run(&["drain"]);
    assert!(text(&o).contains("1 sent"), "{}", text(&o));
    assert_eq!(o.status.code(), Some(1), "held rows are not a success");
    assert!(
        text(&o).contains("1 rows wait for businesses needing re-authorization"),
        "{}",
        text(&o)
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts = 0"
        ),
        1
    );
    // A new process does not call the token endpoint again with the refused token.
    let calls_before = refreshes(&env);
    env.run(&["sync", "--business", &ids[0]]);
    assert_eq!(refreshes(&env), calls_before);
    let o = env.run(&["status"]);
    assert!(text(&o).contains("NEEDS RE-AUTHORIZATION"), "{}", text(&o));
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM sync_runs WHERE business_id = '{}' AND outcome = 'skipped'",
                ids[0]
            )
        ),
        1
    );

    // A person re-authorizes: a new token file content clears the flag.
    std::fs::write(&file, env.sandbox.mint_refresh_token(&ids[0])).unwrap();
    let o = env.run(&["sync", "--business", &ids[0]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM businesses WHERE needs_reauth = 1"
        ),
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM negotiations"), 180);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_exchange_stores_a_grant_for_a_business_with_an_empty_token_file() {
    let env = oauth_env(3600, FAST).await;
    let ids = env.business_ids();
    std::fs::write(env.dir.path().join("fixture/tokens").join(&ids[1]), "").unwrap();
    let o = env.run(&["sync", "--business", &ids[1]]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("auth exchange"),
        "tells what to do: {}",
        text(&o)
    );

    let code = env.sandbox.mint_auth_code(&ids[1]);
    let args = [
        "auth",
        "exchange",
        "--business",
        &ids[1],
        "--code",
        &code,
        "--redirect-uri",
        "https://partner.example/callback",
    ];
    let o = env.run(&args);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(!text(&o).contains(&code));
    let db = env.sql();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM businesses WHERE needs_reauth = 1"
        ),
        0,
        "exchange clears the flag"
    );

    let o = env.run(&["sync", "--business", &ids[1]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM negotiations WHERE business_id = '{}'",
                ids[1]
            )
        ),
        60
    );

    // Codes are single-use.
    let o = env.run(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("refused"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_the_mirror() {
    let env = oauth_env(1, FAST).await;
    let ids = env.business_ids();
    std::fs::write(
        env.dir.path().join("fixture/tokens").join(&ids[2]),
        "sbx_rt_refused_one\n",
    )
    .unwrap();
    let mut logs = String::new();
    for args in [
        &["sync", "--full"][..],
        &["sync"][..],
        &["drain"][..],
        &["config", "check"][..],
        &["status", "--json"][..],
    ] {
        let o = env
            .cli()
            .args(args)
            .env("LEADSYNC_LOG", "trace")
            .output()
            .unwrap();
        logs.push_str(&text(&o));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let o = env
        .cli()
        .args(["--log-format", "json", "sync"])
        .env("LEADSYNC_LOG", "debug")
        .output()
        .unwrap();
    logs.push_str(&text(&o));
    assert!(
        logs.contains("access token refreshed"),
        "the logs did cover refreshes:\n{logs}"
    );
    let mut mirror = Vec::new();
    for suffix in ["", "-wal"] {
        if let Ok(bytes) = std::fs::read(format!("{}{suffix}", env.database().display())) {
            mirror.extend(bytes);
        }
    }
    let mirror = String::from_utf8_lossy(&mirror);
    let secrets = env.sandbox.issued_secrets();
    assert!(secrets.len() > 6);
    // Every text column of the mirror, `status --json` and `config check` too.
    common::assert_no_secret_anywhere(&env, &logs);
    for s in secrets
        .iter()
        .chain(std::iter::once(&"sbx_rt_refused_one".to_string()))
    {
        assert!(!logs.contains(s.as_str()), "secret {s} appears in the logs");
        assert!(
            !mirror.contains(s.as_str()),
            "secret {s} appears in the mirror database"
        );
    }
}
