//! `status` and `outbox list` only read the mirror: they never create it,
//! never migrate it, never leave a file beside it, and work for a user who
//! may read the database but not write its directory.

mod common;

use common::{Env, text};
use leadsync::store;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

/// The mirror as a stopped daemon leaves it: WAL mode, no -wal nor -shm.
fn closed_mirror(env: &Env) {
    drop(store::open_connection(&env.database(), true).unwrap());
    for suffix in ["-wal", "-shm"] {
        assert!(
            !sidecar(&env.database(), suffix).exists(),
            "a closed mirror has no {suffix}"
        );
    }
}

fn sidecar(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn user_version(env: &Env) -> i64 {
    env.sql()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

/// A read-only command leaves no -wal or -shm behind: SQLite creates both
/// to read a WAL database, as the user who runs the command, and a
/// read-only connection does not remove them; the daemon then met files
/// of another user beside its mirror.
#[tokio::test]
async fn status_and_outbox_list_leave_no_file_beside_a_closed_mirror() {
    let env = Env::small().await;
    closed_mirror(&env);
    let dir = env.database().parent().unwrap().to_path_buf();
    let before = files_in(&dir);
    for args in [
        &["status"][..],
        &["outbox", "list"],
        &["outbox", "list", "--kind", "message"],
    ] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert_eq!(files_in(&dir), before, "{args:?} left a file behind");
    }
}

/// An operator who may read the mirror but not write its directory (the
/// service user's /var/lib/leadsync) runs `status` and `outbox list`: the
/// mirror is read, not "unable to open database file" or "attempt to write
/// a readonly database". Run as root, the commands run as `nobody`.
#[tokio::test]
async fn status_and_outbox_list_read_a_mirror_whose_directory_is_not_writable() {
    let env = Env::small().await;
    closed_mirror(&env);
    let dir = env.database().parent().unwrap().to_path_buf();
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0;
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    if root {
        // `nobody` must reach the files: the temp directory is 0700.
        mode(env.dir.path(), 0o755);
        for f in env.config_files() {
            mode(&f, 0o644);
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                mode(&p, 0o644);
            }
        }
        // The sandbox writes its token files 0600, as secrets should be:
        // the configuration check reads them as `nobody` too.
        for e in std::fs::read_dir(dir.join("tokens")).unwrap() {
            mode(&e.unwrap().path(), 0o644);
        }
    }
    let run_all = |when: &str| {
        let before = files_in(&dir);
        for args in [&["status"][..], &["outbox", "list"]] {
            let mut c = env.cli();
            c.args(args);
            if root {
                c.uid(65534).gid(65534);
            }
            let o = c.output().unwrap();
            assert_eq!(o.status.code(), Some(0), "{when}, {args:?}: {}", text(&o));
            assert_eq!(
                files_in(&dir),
                before,
                "{when}: {args:?} left a file behind"
            );
        }
    };
    mode(&dir, 0o555);
    run_all("no leadsync running");
    // The daemon running: its -wal and -shm exist, writable by it alone.
    mode(&dir, 0o755);
    let daemon = env.sql();
    daemon
        .query_row("SELECT count(*) FROM outbox", [], |_| Ok(()))
        .unwrap();
    for suffix in ["-wal", "-shm"] {
        let p = sidecar(&env.database(), suffix);
        assert!(p.exists(), "{suffix}");
        mode(&p, 0o644);
    }
    mode(&dir, 0o555);
    run_all("a leadsync running");
    mode(&dir, 0o755);
    drop(daemon);
}

/// No database yet: a clear error, and the database is not created.
#[tokio::test]
async fn status_and_outbox_list_do_not_create_a_missing_database() {
    let env = Env::small().await;
    assert!(!env.database().exists());
    for args in [&["status"][..], &["outbox", "list"]] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("does not exist yet"),
            "{args:?}: {}",
            text(&o)
        );
        assert!(!env.database().exists(), "{args:?} created the database");
    }
}

/// A writer holding a write transaction open (the daemon mid-page, a
/// partner's program) does not make the readers fail with "database is
/// locked".
#[tokio::test]
async fn status_and_outbox_list_read_beside_an_open_write_transaction() {
    let env = Env::small().await;
    closed_mirror(&env);
    let writer = env.sql();
    writer
        .execute_batch(
            "BEGIN IMMEDIATE;
             INSERT INTO outbox (negotiation_id, status, partner_status_changed_at)
             VALUES ('900000000000000001', 'appt_scheduled', '2024-06-14T09:30:00Z');",
        )
        .unwrap();
    for args in [&["status"][..], &["outbox", "list"]] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        assert!(
            !text(&o).contains("900000000000000001"),
            "{args:?} read uncommitted: {}",
            text(&o)
        );
    }
    writer.execute_batch("COMMIT").unwrap();
    let o = env.run(&["outbox", "list"]);
    assert!(text(&o).contains("900000000000000001"), "{}", text(&o));
}

/// A mirror of the previous schema (the older daemon still runs on it):
/// read with a note, never migrated.
#[tokio::test]
async fn an_older_schema_is_read_with_a_note_and_not_migrated() {
    let env = Env::small().await;
    closed_mirror(&env);
    let older = store::schema_version() - 1;
    env.sql()
        .pragma_update(None, "user_version", older)
        .unwrap();
    for args in [&["status"][..], &["outbox", "list"], &["status", "--json"]] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("schema version {older}")) && err.contains("does not migrate"),
            "{args:?}: {err}"
        );
        assert_eq!(user_version(&env), older, "{args:?} migrated the mirror");
    }
}

/// A newer leadsync's mirror: exit 78 (as `run`), untouched.
#[tokio::test]
async fn a_newer_schema_exits_78_and_is_left_alone() {
    let env = Env::small().await;
    closed_mirror(&env);
    let newer = store::schema_version() + 1;
    env.sql()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    for args in [
        &["status"][..],
        &["outbox", "list"],
        &["outbox", "list", "--kind", "message"],
    ] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(78), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("newer leadsync"),
            "{args:?}: {}",
            text(&o)
        );
        assert_eq!(user_version(&env), newer);
    }
}

/// A -wal without its -shm (left by a crash, the -shm removed by hand):
/// reading it would create the -shm, so the commands say so instead.
#[tokio::test]
async fn a_wal_without_its_shm_is_said_and_left_alone() {
    let env = Env::small().await;
    closed_mirror(&env);
    std::fs::write(sidecar(&env.database(), "-wal"), b"").unwrap();
    let dir = env.database().parent().unwrap().to_path_buf();
    let before = files_in(&dir);
    for args in [&["status"][..], &["outbox", "list"]] {
        let o = env.run(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("-shm"), "{args:?}: {}", text(&o));
        assert_eq!(files_in(&dir), before, "{args:?} left a file behind");
    }
}

/// A mirror file that is not a SQLite database (damaged, overwritten, a
/// wrong `database` path pointing at another file): `status` and `outbox
/// list` blamed permissions ("this user must be able to read it ... run
/// the command as the user of the service"), sending the operator to sudo
/// rather than to the file. They now say what it is, and leave it as it was.
#[tokio::test]
async fn status_on_a_file_that_is_no_database_says_so_not_permissions() {
    let env = Env::small().await;
    std::fs::create_dir_all(env.database().parent().unwrap()).unwrap();
    let garbage = "not a database: a log file, or a mirror overwritten\n".repeat(200);
    std::fs::write(env.database(), &garbage).unwrap();
    for args in [&["status"][..], &["outbox", "list"]] {
        let o = env.run(args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains("not a SQLite database"), "{args:?}: {t}");
        assert!(
            t.contains(&env.database().display().to_string()),
            "{args:?}: {t}"
        );
        assert!(!t.contains("must be able to read"), "{args:?}: {t}");
        assert_eq!(std::fs::read_to_string(env.database()).unwrap(), garbage);
    }
}
