//! The partner's programs (members of the `leadsync` group) run `enqueue`
//! and `reply` beside the service, whose mirror lock file
//! (`<database>.lock`) they may read but not write: created by `sudo -u
//! leadsync leadsync probe` under umask 0022 (README, "Install") it is
//! 0644. Only a pending migration needs that lock. Run as root, the
//! commands run as `nobody`, for whom the permissions hold.

mod common;

use common::{Env, count, text};
use leadsync::store;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0
}

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn lock_file(env: &Env) -> PathBuf {
    let mut s = env.database().into_os_string();
    s.push(".lock");
    s.into()
}

/// A closed mirror of the current schema that `nobody` (or, not run as
/// root, this user) may read and write, with a lock file it may only read.
fn partner_setup(env: &Env) {
    drop(store::open_connection(&env.database(), true).unwrap());
    let lock = lock_file(env);
    if !lock.exists() {
        std::fs::write(&lock, "").unwrap();
    }
    fn open_up(dir: &Path) {
        mode(dir, 0o777);
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                open_up(&p);
            } else {
                mode(&p, 0o666);
            }
        }
    }
    open_up(env.dir.path());
    mode(&lock, if root() { 0o644 } else { 0o444 });
}

/// `leadsync enqueue` as the partner's user.
fn partner(env: &Env, args: &[&str]) -> Command {
    let mut c = env.cli();
    c.args(args);
    if root() {
        c.uid(65534).gid(65534);
    }
    c
}

fn enqueue_args(business: &str) -> Vec<String> {
    [
        "enqueue",
        "--business",
        business,
        "--negotiation",
        "500000000000000001",
        "--status",
        "appt_scheduled",
        "--at",
        "2026-11-01T10:00:00Z",
    ]
    .map(String::from)
    .to_vec()
}

fn user_version(env: &Env) -> i64 {
    env.sql()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

/// On a current mirror `enqueue` and `reply` never open the lock file: a
/// lock file the partner may not write refuses nothing.
#[tokio::test]
async fn enqueue_and_reply_on_a_current_mirror_need_no_access_to_the_lock_file() {
    let env = Env::small().await;
    partner_setup(&env);
    let business = env.business_ids()[0].clone();
    let args = enqueue_args(&business);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = partner(&env, &args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = partner(
        &env,
        &[
            "reply",
            "--business",
            &business,
            "--negotiation",
            "500000000000000001",
            "--text",
            "On my way",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM outbox"), 1);
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM message_outbox"), 1);
}

/// A migration pending (the package was upgraded, the service not
/// restarted yet) and no leadsync running: the partner's `enqueue` may not
/// take the lock to migrate. It says what to do, not a bare "Permission
/// denied", and writes nothing.
#[tokio::test]
async fn enqueue_that_cannot_take_the_lock_for_a_pending_migration_says_what_to_do() {
    let env = Env::small().await;
    partner_setup(&env);
    let older = store::schema_version() - 1;
    env.sql()
        .pragma_update(None, "user_version", older)
        .unwrap();
    let business = env.business_ids()[0].clone();
    let args = enqueue_args(&business);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = partner(&env, &args).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("schema version {older}"))
            && err.contains("systemctl restart leadsync")
            && err.contains("sudo -u leadsync")
            && err.contains("nothing was written"),
        "{err}"
    );
    assert_eq!(user_version(&env), older, "migrated without the lock");
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM outbox"), 0);
}

/// The restarted service migrating (it holds the lock as "migrating"): the
/// partner's `enqueue` waits for it, though it cannot write the lock file,
/// and then inserts its row.
#[tokio::test]
async fn enqueue_that_cannot_write_the_lock_waits_for_another_process_migrating() {
    let env = Env::small().await;
    partner_setup(&env);
    let older = store::schema_version() - 1;
    env.sql()
        .pragma_update(None, "user_version", older)
        .unwrap();
    // The migrating process: this one, holding the lock as leadsync does.
    let lock = lock_file(&env);
    let before = std::fs::metadata(&lock).unwrap().permissions();
    mode(&lock, 0o644);
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock)
        .unwrap();
    mode(&lock, before.mode());
    holder.lock().unwrap();
    std::fs::write(&lock, format!("{}\nmigrating\n", std::process::id())).unwrap();

    let business = env.business_ids()[0].clone();
    let args = enqueue_args(&business);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = partner(&env, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It has opened the mirror (and read its schema version) before it
    // meets the lock.
    let database = std::fs::canonicalize(env.database()).unwrap();
    let pid = child.id();
    let opened = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .any(|l| l == database)
            })
            .unwrap_or(false)
    };
    common::wait_until_blocking("enqueue opens the mirror", Duration::from_secs(60), || {
        opened() || child.try_wait().unwrap().is_some()
    });
    // Held a moment longer: an enqueue that does not wait fails meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The migration ends: the schema is current, the lock released.
    env.sql()
        .pragma_update(None, "user_version", store::schema_version())
        .unwrap();
    drop(holder);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(count(&env.sql(), "SELECT count(*) FROM outbox"), 1);
}

/// The shipped state directory (2770: group writable, setgid, not sticky,
/// see the README's "The unit") holds `private/`, the token store's
/// directory: a warning there about its parent would fire on every
/// default install, and say nothing a user can act on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_state_directory_draws_no_warning_about_the_token_directory() {
    let env = common::oauth_env(3600, common::FAST).await;
    let state = env.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o2770)).unwrap();
    let store = state.join("private").join("tokens.db");
    env.set_overrides(&format!(
        "{}\n[oauth]\ntoken_store = \"{}\"\n",
        common::FAST,
        store.display()
    ));
    let o = env.run(&["drain"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(!t.contains("WARN"), "a default install warns: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_after_the_lock_file_was_deleted() {
    // The lock file deleted under a running holder (by hand, a cleanup of
    // the directory): a second `drain` took a new one, and its start set
    // the first one's rows in flight back to pending, to be sent twice.
    let env = Env::small().await;
    assert_eq!(env.run(&["sync", "--full"]).status.code(), Some(0));
    let held = store::ProcessLock::acquire(&env.database()).unwrap();
    std::fs::remove_file(lock_file(&env)).unwrap();
    let out = env.run(&["drain"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("another leadsync process"),
        "{}",
        text(&out)
    );
    drop(held);
    let out = env.run(&["drain"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}
