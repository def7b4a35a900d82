//! `leadsync backup FILE`: a consistent copy while a sync and another
//! program write, never the token store, never over a file without --force;
//! and the README's restore procedure.

mod common;

use common::{Env, FAST, count, text};
use leadsync::sandbox::SandboxOptions;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// Checks one backup: intact, and holding every row committed before it
/// started — as one snapshot (no gaps in the outbox ids, every lead with
/// its first-sighting change row, since both are written in one transaction).
fn check_backup(path: &std::path::Path, outbox_committed: i64, leads_committed: i64) -> (i64, i64) {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the backup");
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "delete", "the copy is one self-contained file");
    let (rows, max_id): (i64, i64) = c
        .query_row(
            "SELECT count(*), coalesce(max(id), 0) FROM outbox",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("outbox");
    assert!(
        max_id >= outbox_committed,
        "the backup lost committed outbox rows: has up to {max_id}, {outbox_committed} were committed before it started"
    );
    assert_eq!(rows, max_id, "outbox ids in the backup have gaps");
    let leads = count(&c, "SELECT count(*) FROM negotiations");
    assert!(
        leads >= leads_committed,
        "the backup lost committed leads: {leads} < {leads_committed}"
    );
    assert_eq!(
        leads,
        count(
            &c,
            "SELECT count(*) FROM negotiation_changes WHERE kind = 'new'"
        ),
        "a page's leads and its change rows come from different moments"
    );
    let tables = count(
        &c,
        "SELECT count(*) FROM sqlite_master WHERE name = 'refresh_tokens'",
    );
    assert_eq!(tables, 0, "the token store must never be in a backup");
    (rows, leads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_while_a_sync_and_a_program_write() {
    let env = Env::new(
        SandboxOptions {
            businesses: 3,
            leads_per_business: 3000,
            ..SandboxOptions::default()
        },
        true,
        FAST,
    )
    .await;
    let mut sync = env
        .cli()
        .args(["sync", "--full"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sync");
    common::wait_until_blocking(
        "the sync created the mirror",
        Duration::from_secs(30),
        || {
            env.database().exists()
                && rusqlite::Connection::open(env.database())
                    .and_then(|c| {
                        c.query_row("SELECT count(*) FROM negotiations", [], |r| {
                            r.get::<_, i64>(0)
                        })
                    })
                    .is_ok_and(|n| n > 0)
        },
    );

    // Another program inserts outbox rows, one transaction each, all along.
    let committed = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (committed, stop, db) = (committed.clone(), stop.clone(), env.database());
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(db).expect("open");
            c.busy_timeout(Duration::from_secs(10))
                .expect("busy timeout");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                c.execute(
                    "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at) VALUES (?1, 'appt_scheduled', '2024-06-14T09:30:00Z')",
                    [format!("{}", 900_000_000 + n)],
                )
                .expect("insert");
                committed.store(c.last_insert_rowid(), Ordering::SeqCst);
                // Pacing, so that the sync gets the write lock too.
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let mut while_syncing = 0;
    let mut copies = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let syncing = sync.try_wait().expect("sync status").is_none();
        let outbox_before = committed.load(Ordering::SeqCst);
        let leads_before = count(&env.sql(), "SELECT count(*) FROM negotiations");
        let file = env.dir.path().join(format!("copy-{copies}.db"));
        let out = env.run(&["backup", file.to_str().expect("path")]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("backed up"),
            "{}",
            text(&out)
        );
        check_backup(&file, outbox_before, leads_before);
        copies += 1;
        let still = sync.try_wait().expect("sync status").is_none();
        if syncing && still {
            while_syncing += 1;
        }
        if (!still && copies >= 2) || while_syncing >= 3 || Instant::now() > deadline {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    let status = sync.wait().expect("sync");
    assert!(status.success(), "the sync failed");
    assert!(
        while_syncing >= 1,
        "no backup ran while the sync was writing"
    );

    // After everything: the last copy equals the mirror.
    let file = env.dir.path().join("final.db");
    let out = env.run(&["backup", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (rows, leads) = check_backup(&file, committed.load(Ordering::SeqCst), 9000);
    assert_eq!(rows, count(&env.sql(), "SELECT count(*) FROM outbox"));
    assert_eq!(leads, 9000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_to_overwrite_without_force_and_never_the_mirror() {
    let env = Env::new(SandboxOptions::default(), true, FAST).await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let file = env.dir.path().join("copy.db");
    std::fs::write(&file, "precious").expect("write");

    let out = env.run(&["backup", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "precious");

    let out = env.run(&["backup", "--force", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    check_backup(&file, 0, 180);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a copy of customer data is private");

    let db = env.database();
    let out = env.run(&["backup", "--force", db.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("the mirror itself"), "{}", text(&out));
    let wal = format!("{}-wal", db.display());
    let out = env.run(&["backup", "--force", &wal]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Nor over the token store.
    let tokens = env.config().file.oauth.token_store;
    assert!(tokens.exists(), "the OAuth sync stored tokens");
    let before = std::fs::read(&tokens).expect("read");
    let out = env.run(&["backup", "--force", tokens.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("token store"), "{}", text(&out));
    assert_eq!(std::fs::read(&tokens).expect("read"), before);

    // No temporary file is left behind, even after a refusal.
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A synced mirror padded with about 96 MiB of pages, so that a backup's
/// copy takes a while.
async fn padded_mirror() -> Env {
    let env = Env::new(SandboxOptions::default(), true, FAST).await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    env.sql()
        .execute_batch(
            "CREATE TABLE pad (x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 24000)
             INSERT INTO pad SELECT randomblob(4000) FROM n;",
        )
        .expect("pad the mirror");
    env
}

/// How many of a backup's temporary `.FILE.partial-PID` copies `dir` holds.
fn partials_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .count()
}

/// SIGINT, SIGTERM or SIGHUP (an SSH session dropped: it killed the backup
/// and left its `.FILE.partial-PID`) in the middle of a copy: the backup stops, removes its
/// temporary file and leaves no FILE (or, if it had already finished, a
/// whole one); a big database's copy is never left half-written in the
/// destination directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backup_leaves_nothing_behind() {
    let env = padded_mirror().await;
    let out_dir = tempfile::tempdir().expect("tempdir");
    let partials = || partials_in(out_dir.path());
    for signal in ["-INT", "-TERM", "-HUP"] {
        let file = out_dir.path().join(format!("copy{signal}.db"));
        let mut child = env
            .cli()
            .args(["backup", file.to_str().expect("path")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn backup");
        let end = Instant::now() + Duration::from_secs(60);
        while partials() == 0 && child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < end, "the backup never started its copy");
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        let status = child.wait().expect("wait");
        assert_eq!(
            partials(),
            0,
            "{signal}: a temporary copy was left behind ({status:?}, kill {killed:?})"
        );
        if status.success() {
            check_backup(&file, 0, 180);
        } else {
            assert!(
                !file.exists(),
                "{signal}: an interrupted backup left {}",
                file.display()
            );
        }
    }
}

/// `nohup leadsync backup FILE &`, then the session ends: SIGHUP was
/// ignored when the backup started, and listening for it (to clean up
/// after a dropped session) replaced that, so the logout stopped a copy
/// the user had asked to outlive it (review of xb). It finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_nohup_outlives_a_hangup() {
    let env = padded_mirror().await;
    let out_dir = tempfile::tempdir().expect("tempdir");
    let partials = || partials_in(out_dir.path());
    let file = out_dir.path().join("copy.db");
    let mut cli = env.cli();
    cli.args(["backup", file.to_str().expect("path")]);
    // The same command under `nohup`, which ignores SIGHUP and execs it.
    let mut nohup = std::process::Command::new("nohup");
    nohup.arg(cli.get_program()).args(cli.get_args());
    for (k, v) in cli.get_envs() {
        match v {
            Some(v) => nohup.env(k, v),
            None => nohup.env_remove(k),
        };
    }
    if let Some(dir) = cli.get_current_dir() {
        nohup.current_dir(dir);
    }
    let mut child = nohup
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn nohup backup");
    let end = Instant::now() + Duration::from_secs(60);
    while partials() == 0 && child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < end, "the backup never started its copy");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Whatever the race with the copy: the kernel's record of the running
    // backup (nohup exec'd it, same pid) says SIGHUP is still ignored and
    // no handler was put in its place.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .expect("the backup still runs while its temporary copy exists");
    let low = |field: &str| {
        let mask = proc_status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("{field} in {proc_status}"));
        mask.trim()
            .chars()
            .last()
            .and_then(|c| c.to_digit(16))
            .unwrap()
            & 1
    };
    assert_eq!(low("SigIgn:"), 1, "SIGHUP no longer ignored: {proc_status}");
    assert_eq!(
        low("SigCgt:"),
        0,
        "SIGHUP caught under nohup: {proc_status}"
    );
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "a hangup stopped a backup under nohup: {status:?}"
    );
    assert_eq!(partials(), 0);
    check_backup(&file, 0, 180);
}

/// The terminal gone during a copy (a dropped SSH session under `nohup`,
/// whose progress line then fails with EIO): the progress `eprint!`
/// panicked inside the copy's task and main's panic hook exited, leaving
/// `.FILE.partial-PID` behind. Progress is best effort: the copy goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_terminal_is_gone_finishes_its_copy() {
    let env = padded_mirror().await;
    let out_dir = tempfile::tempdir().expect("tempdir");
    let partials = || partials_in(out_dir.path());
    // A pseudo-terminal as standard error (not the child's controlling
    // terminal: closing its master sends no SIGHUP, writes fail with EIO).
    // Opened close-on-exec (std's `open` always is): a master inherited by
    // any child, this test's or another's, would keep the terminal alive.
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")
        .expect("open /dev/ptmx");
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: our own master descriptor; ptsname_r writes at most the
    // buffer's length.
    unsafe {
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
    }
    // SAFETY: ptsname_r wrote a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_str()
        .expect("pty name")
        .to_string();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .expect("open the pty's slave");
    let file = out_dir.path().join("copy.db");
    let mut child = env
        .cli()
        .args(["backup", file.to_str().expect("path")])
        .stdout(std::process::Stdio::null())
        .stderr(slave)
        .spawn()
        .expect("spawn backup");
    let end = Instant::now() + Duration::from_secs(60);
    while partials() == 0 && child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < end, "the backup never started its copy");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(master);
    let status = child.wait().expect("wait");
    assert_eq!(
        partials(),
        0,
        "a temporary copy was left behind ({status:?})"
    );
    assert!(status.success(), "{status:?}");
    check_backup(&file, 0, 180);
}

/// The statements of the README's restore procedure ("Backup and restore"),
/// as written there, between its `sqlite3` line and `SQL`.
fn readme_restore() -> Vec<String> {
    readme_block("")
}

/// The README's block to run instead when the restore stopped after `.restore`.
fn readme_recovery() -> Vec<String> {
    readme_block("  ")
}

/// The statements of the README's `sqlite3 -bail` block indented by `indent`.
fn readme_block(indent: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let start =
        format!("\n{indent}sudo -u leadsync sqlite3 -bail /var/lib/leadsync/leadsync.db <<'SQL'\n");
    let from = readme.find(&start).expect("the README's block") + start.len();
    let to = from
        + readme[from..]
            .find(&format!("\n{indent}SQL\n"))
            .expect("its end");
    let mut statements = vec![String::new()];
    for line in readme[from..to].lines() {
        let line = line.strip_prefix(indent).expect("indented");
        let last = statements.last_mut().expect("one");
        last.push_str(line);
        last.push('\n');
        if line.starts_with('.') || line.ends_with(';') {
            statements.push(String::new());
        }
    }
    statements.retain(|s| !s.trim().is_empty());
    statements
}

/// Runs the README's restore block on `mirror` from `backup`, statement by
/// statement as `sqlite3 -bail` would (its dot-commands through the same
/// SQLite calls), and returns the connection it ran on.
fn run_readme_restore(mirror: &std::path::Path, backup: &std::path::Path) -> rusqlite::Connection {
    let statements = readme_restore();
    assert!(
        statements.iter().any(|s| s.starts_with(".restore ")),
        "{statements:?}"
    );
    let conn = rusqlite::Connection::open(mirror).expect("open the mirror");
    run_statements(conn, &statements, backup)
}

fn run_statements(
    mut conn: rusqlite::Connection,
    statements: &[String],
    backup: &std::path::Path,
) -> rusqlite::Connection {
    for statement in statements {
        if statement.starts_with(".restore ") {
            conn.restore(rusqlite::MAIN_DB, backup, rusqlite::backup::NO_PROGRESS)
                .expect("restore");
        } else if let Some(ms) = statement.strip_prefix(".timeout ") {
            let ms: u64 = ms.trim().parse().expect(statement);
            conn.busy_timeout(Duration::from_millis(ms))
                .expect(statement);
        } else if statement.starts_with('.') {
            panic!("a dot-command this test does not know: {statement}");
        } else if statement.starts_with("PRAGMA quick_check") {
            let check: String = conn
                .query_row(statement, [], |r| r.get(0))
                .expect(statement);
            assert_eq!(check, "ok");
        } else {
            conn.execute_batch(statement).expect(statement);
        }
    }
    conn
}

/// A transition and a reply as the partner's application inserts them.
const TRANSITION: &str = "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                          VALUES ('519153480500518912', 'appt_scheduled', '2024-06-14T09:30:00Z')";
const REPLY: &str = "INSERT INTO message_outbox (negotiation_id, business_id, text)
                     VALUES ('519153480500518912', '468046965846925323', 'On my way!')";

/// A mirror with outbox ids 1-5 and reply ids 1-2 handed out, and a backup
/// made by an older leadsync (schema 2) with outbox rows 1-3.
fn mirror_and_schema_2_backup(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mirror = dir.join("leadsync.db");
    let backup = dir.join("mirror-2026-11-28.db");
    let old = rusqlite::Connection::open(&backup).expect("backup");
    old.execute_batch(concat!(
        include_str!("../src/store/migrations/0001_initial.sql"),
        include_str!("../src/store/migrations/0002_lead_shapes.sql"),
        "PRAGMA user_version = 2;"
    ))
    .expect("schema 2");
    for _ in 0..3 {
        old.execute(TRANSITION, []).expect("outbox row");
    }
    let conn = leadsync::store::open_connection(&mirror, true).expect("mirror");
    for _ in 0..5 {
        conn.execute(TRANSITION, []).expect("outbox row");
    }
    for _ in 0..2 {
        conn.execute(REPLY, []).expect("reply");
    }
    (mirror, backup)
}

/// Starts leadsync's store on the restored `mirror` (the upgrade) and
/// returns the ids a new outbox row and a new reply are given.
fn ids_after_upgrade(mirror: &std::path::Path) -> (i64, i64) {
    let conn = leadsync::store::open_connection(mirror, false).expect("upgrade");
    conn.execute(TRANSITION, []).expect("outbox row");
    let transition = conn.last_insert_rowid();
    conn.execute(REPLY, []).expect("reply");
    let reply = conn.last_insert_rowid();
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_sequence WHERE name = 'outbox'"
        ),
        1,
        "one counter for the outbox"
    );
    (transition, reply)
}

/// The README's restore of a backup an older leadsync made (schema 2: no
/// table with AUTOINCREMENT yet, so no `sqlite_sequence`), then the start
/// that upgrades it: no id handed out since the backup is handed out again.
#[test]
fn the_readme_restore_of_a_schema_2_backup_keeps_ids_from_being_reused() {
    let dir = tempfile::tempdir().expect("dir");
    let (mirror, backup) = mirror_and_schema_2_backup(dir.path());
    let conn = run_readme_restore(&mirror, &backup);
    assert_eq!(count(&conn, "SELECT count(*) FROM outbox"), 3);
    drop(conn);
    // Outbox ids 4 and 5, reply ids 1 and 2 were handed out after the backup.
    assert_eq!(ids_after_upgrade(&mirror), (6, 3));
}

/// The restore stopped right after `.restore` (the counters not carried
/// over): the README's block to run instead moves the counters past every
/// id the lost rows had, and is safe to run twice.
#[test]
fn the_readme_restore_recovery_after_restore_keeps_ids_from_being_reused() {
    let dir = tempfile::tempdir().expect("dir");
    let (mirror, backup) = mirror_and_schema_2_backup(dir.path());
    let statements = readme_restore();
    let restored = 1 + statements
        .iter()
        .position(|s| s.starts_with(".restore "))
        .expect(".restore");
    let conn = rusqlite::Connection::open(&mirror).expect("open the mirror");
    drop(run_statements(conn, &statements[..restored], &backup));
    for _ in 0..2 {
        let conn = rusqlite::Connection::open(&mirror).expect("open the mirror");
        drop(run_statements(conn, &readme_recovery(), &backup));
    }
    assert_eq!(ids_after_upgrade(&mirror), (2_000_001, 2_000_001));
}

/// The README's restore procedure, run through the same SQLite: the
/// backup's rows come back, and no id handed out since the backup is
/// handed out again — neither the outbox's (counted in the backup) nor the
/// replies' (`message_outbox` had no row, so no counter, at the backup).
#[test]
fn the_readme_restore_keeps_ids_from_being_reused() {
    let dir = tempfile::tempdir().expect("dir");
    let mirror = dir.path().join("leadsync.db");
    let backup = dir.path().join("mirror-2026-11-28.db");
    let transition = "INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
                      VALUES ('519153480500518912', 'appt_scheduled', '2024-06-14T09:30:00Z')";
    let reply = "INSERT INTO message_outbox (negotiation_id, business_id, text)
                 VALUES ('519153480500518912', '468046965846925323', 'On my way!')";
    {
        let conn = leadsync::store::open_connection(&mirror, true).expect("mirror");
        for _ in 0..3 {
            conn.execute(transition, []).expect("outbox row");
        }
        // Schema 25 writes both tables' counters; a backup taken before it
        // (or after a hand edit) has none for the replies.
        conn.execute(
            "DELETE FROM sqlite_sequence WHERE name = 'message_outbox'",
            [],
        )
        .expect("drop the replies' counter");
        conn.backup(rusqlite::MAIN_DB, &backup, rusqlite::backup::NO_PROGRESS)
            .expect("backup");
        for _ in 0..2 {
            conn.execute(transition, []).expect("outbox row");
            conn.execute(reply, []).expect("reply");
        }
    }
    let b = rusqlite::Connection::open(&backup).expect("open the backup");
    assert_eq!(
        count(
            &b,
            "SELECT count(*) FROM sqlite_sequence WHERE name = 'message_outbox'"
        ),
        0,
        "the backup has no counter for the replies"
    );
    drop(b);

    let conn = run_readme_restore(&mirror, &backup);
    assert_eq!(count(&conn, "SELECT count(*) FROM outbox"), 3);
    assert_eq!(count(&conn, "SELECT count(*) FROM message_outbox"), 0);
    drop(conn);

    let conn = leadsync::store::open_connection(&mirror, false).expect("reopen");
    conn.execute(transition, []).expect("outbox row");
    assert_eq!(
        conn.last_insert_rowid(),
        6,
        "ids 4 and 5 were handed out after the backup"
    );
    conn.execute(reply, []).expect("reply");
    assert_eq!(
        conn.last_insert_rowid(),
        3,
        "reply ids 1 and 2 were handed out after the backup"
    );
}
