//! Many businesses (SPEC §10–11) against the running daemon: "sync now"
//! through `sync_requests`, passes that never overlap, each schedule's lag
//! in `status`, and a reload that never blocks SIGTERM.

mod common;

use common::{Env, FAST, count, text, wait_until_blocking};
use leadsync::sandbox::{Faults, SandboxOptions};
use std::process::Child;
use std::time::{Duration, Instant};

/// Schedules that never fire during a test: passes come only from requests
/// and the initial pass.
const NEVER: &str =
    "\n[poll]\npage_size = 10\nschedule = \"0 0 0 1 1 *\"\nfull_schedule = \"0 0 0 1 1 *\"\n";

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill failed");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let end = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the daemon did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the daemon if a test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The summary line without its timing, for comparing a daemon's answer
/// with a local pass.
fn shape(line: &str) -> String {
    match line.rfind(" (") {
        Some(i) if line.ends_with("s)") => line[..i].to_string(),
        _ => line.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_now_round_trip_with_the_daemon_running() {
    let env = Env::new(
        SandboxOptions::default(),
        false,
        &FAST.replace("[poll]\npage_size = 10\n", NEVER),
    )
    .await;
    let mut ids = env.business_ids();
    ids.sort();
    let mut daemon = Running(env.spawn_daemon());
    let child = &mut daemon.0;
    env.wait_for_initial_passes(3);

    // One business, head scan: the daemon runs it and `sync` prints its line.
    let o = env.run(&["sync", "--business", &ids[0]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&format!("{}: ok — head scan", ids[0])),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sync_requests row"),
        "{}",
        text(&o)
    );
    let daemon_line = shape(out.trim());

    // Every business, full scan: one line each, in business order.
    let o = env.run(&["sync", "--full"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, id) in lines.iter().zip(&ids) {
        assert!(line.starts_with(&format!("{id}: ok — full scan")), "{line}");
    }
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE outcome = 'ok' AND finished_at IS NOT NULL"
        ),
        2
    );

    // An unknown business: refused by the command, and by the daemon when
    // another program inserts the row.
    let o = env.run(&["sync", "--business", "999"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("999"), "{}", text(&o));
    env.sql()
        .execute(
            "INSERT INTO sync_requests (business_id, kind) VALUES ('999', 'full')",
            [],
        )
        .unwrap();
    wait_until_blocking("the daemon refuses 999", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE business_id = '999' AND outcome = 'refused'
               AND error LIKE '%999%not in the configuration%'",
        ) == 1
    });
    // A business added to the files but not reloaded: the command knows it,
    // the daemon does not, and the refusal says what to do.
    let token_file = env.dir.path().join("fixture").join("tokens").join(&ids[0]);
    env.set_overrides(&format!(
        "{}\n[[businesses]]\nid = \"999\"\naccess_token_file = \"{}\"\n",
        FAST.replace("[poll]\npage_size = 10\n", NEVER),
        token_file.display()
    ));
    let o = env.run(&["sync", "--business", "999"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("refused") && text(&o).contains("systemctl reload leadsync"),
        "{}",
        text(&o)
    );
    env.set_overrides(&FAST.replace("[poll]\npage_size = 10\n", NEVER));
    // The table itself refuses what is not a request.
    let bad = env.sql().execute(
        "INSERT INTO sync_requests (business_id, kind) VALUES ('12a', 'head')",
        [],
    );
    assert!(bad.is_err(), "a business id that is not digits is refused");

    // A failing pass: exit 1 and the same lines as a local pass.
    env.sandbox.set_faults(Faults {
        error_5xx: 1.0,
        ..Faults::default()
    });
    let o = env.run(&["sync", "--business", &ids[1]]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.starts_with(&format!("{}: FAILED — head scan", ids[1])),
        "{out}"
    );
    assert!(out.contains("1 of 1 businesses failed"), "{out}");
    env.sandbox.set_faults(Faults::default());

    signal(child, libc::SIGTERM);
    assert_eq!(wait_exit(child, Duration::from_secs(15)).code(), Some(0));

    // Without the daemon, the command runs the pass itself and prints the same line.
    let o = env.run(&["sync", "--business", &ids[0]]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let local = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(shape(local.trim()), daemon_line);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("sync_requests"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_of_a_business_never_overlap_and_status_shows_the_lag() {
    // Passes take ~1.5 s, the schedule fires every second, one worker:
    // ticks find passes running (skipped), the schedule falls behind, and
    // status says by how much.
    let options = SandboxOptions {
        faults: Faults {
            latency_ms: 700,
            ..Faults::default()
        },
        ..SandboxOptions::default()
    };
    let overrides = FAST.replace(
        "[poll]\npage_size = 10\n",
        "[poll]\npage_size = 60\nschedule = \"* * * * * *\"\nfull_schedule = \"0 0 0 1 1 *\"\n",
    ) + "sync_concurrency = 1\n";
    let env = Env::new(options, false, &overrides).await;
    let mut daemon = Running(env.spawn_daemon());
    let child = &mut daemon.0;
    wait_until_blocking("a few passes of each", Duration::from_secs(60), || {
        env.daemon_log().contains("leadsync started")
            && count(
                &env.sql(),
                "SELECT count(*) FROM (SELECT business_id FROM sync_runs WHERE outcome = 'ok'
                   GROUP BY business_id HAVING count(*) >= 3)",
            ) == 3
    });
    // One worker, three businesses of ~0.7 s passes, a tick every second:
    // passes wait, and status says for how long.
    wait_until_blocking(
        "status shows waiting passes",
        Duration::from_secs(30),
        || {
            let o = env.run(&["status", "--json"]);
            let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            json["schedules"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|s| s["kind"] == "head" && s["waiting"].as_i64() > Some(0))
            })
        },
    );
    let status = env.run(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let head = json["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "head")
        .unwrap_or_else(|| panic!("a head schedule in {json}"))
        .clone();
    assert_eq!(head["schedule"], "* * * * * *");
    assert_eq!(head["businesses"], 3);
    let text_status = env.run(&["status"]);
    let t = String::from_utf8_lossy(&text_status.stdout).to_string();
    assert!(t.contains("head `* * * * * *`: 3 businesses"), "{t}");

    signal(child, libc::SIGTERM);
    assert_eq!(wait_exit(child, Duration::from_secs(15)).code(), Some(0));
    // Never two passes of one business at once.
    let sql = env.sql();
    let mut stmt = sql
        .prepare(
            "SELECT business_id, started_at, finished_at FROM sync_runs
              WHERE finished_at IS NOT NULL ORDER BY business_id, id",
        )
        .unwrap();
    let runs: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for pair in runs.windows(2) {
        if pair[0].0 == pair[1].0 {
            assert!(
                pair[1].1 >= pair[0].2,
                "passes overlap: {:?} and {:?}",
                pair[0],
                pair[1]
            );
        }
    }
    assert!(
        env.daemon_log().contains("this tick is skipped"),
        "{}",
        env.daemon_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_reload_stops_the_daemon_promptly() {
    let env = Env::small().await;
    let mut daemon = Running(env.spawn_daemon());
    let child = &mut daemon.0;
    wait_until_blocking("the daemon started", Duration::from_secs(30), || {
        env.daemon_log().contains("leadsync started")
    });
    // The reloaded configuration names a token file that blocks whoever
    // reads it (a FIFO nobody writes): loading it never finishes.
    let fifo = env.dir.path().join("blocking-token");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a path in our temp directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    env.set_overrides(&format!(
        "{FAST}\n[[businesses]]\nid = \"777\"\naccess_token_file = \"{}\"\n",
        fifo.display()
    ));
    signal(child, libc::SIGHUP);
    // A non-blocking open for writing succeeds once a reader waits on the
    // FIFO: then the daemon is inside the load. Holding this end open
    // without writing keeps its read blocked.
    let mut writer = None;
    wait_until_blocking("the reload reads the FIFO", Duration::from_secs(20), || {
        use std::os::unix::fs::OpenOptionsExt;
        writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .ok();
        writer.is_some()
    });
    signal(child, libc::SIGTERM);
    assert_eq!(
        wait_exit(child, Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        env.daemon_log()
    );
    assert!(env.daemon_log().contains("stopped"), "{}", env.daemon_log());
    drop(writer);
}

/// A service manager that stops reading its notify socket must not stall
/// the daemon: the bench's first 10,000-business run hung there (both
/// runtime threads blocked in a STATUS send, SIGHUP and SIGTERM unanswered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_never_stalls_the_daemon() {
    let env = Env::small().await;
    let path = env.dir.path().join("deaf.sock");
    let _socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let log = std::fs::File::create(env.dir.path().join("daemon.log")).unwrap();
    let mut daemon = Running(
        env.cli()
            .arg("run")
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "200000")
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let child = &mut daemon.0;
    wait_until_blocking(
        "the socket's queue is full",
        Duration::from_secs(30),
        || env.daemon_log().contains("cannot notify systemd"),
    );
    signal(child, libc::SIGTERM);
    assert_eq!(
        wait_exit(child, Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        env.daemon_log()
    );
}

/// `leadsync sync` finds the mirror's lock held by another one-shot command
/// (a `drain`, a long `sync --full`), not by the daemon: nobody would take a
/// `sync_requests` row, so it must say so at once instead of inserting one
/// and waiting for that command to end only to fail then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_beside_another_command_says_so_instead_of_waiting_for_a_daemon() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    // This test process plays the other command: it holds the lock as
    // `drain` or `sync` do.
    let held = leadsync::store::ProcessLock::try_acquire(&env.database())
        .unwrap()
        .expect("the lock is free");
    let mut child = Running(
        env.cli()
            .arg("sync")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "`sync` waited for a daemon that is not running ({} sync_requests rows)",
            count(&env.sql(), "SELECT count(*) FROM sync_requests")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.0.wait().unwrap();
    let mut said = String::new();
    use std::io::Read;
    for pipe in [
        child.0.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
        child.0.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        pipe.read_to_string(&mut said).unwrap();
    }
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains(&std::process::id().to_string()) && said.contains("not the daemon"),
        "{said}"
    );
    assert_eq!(
        count(&env.sql(), "SELECT count(*) FROM sync_requests"),
        0,
        "no request is left for a daemon that is not there"
    );
    drop(held);
}

/// `api.max_requests_per_second` changed by a reload applies to the running
/// daemon (README: a reload applies limits): a partner told to slow down
/// lowers it and reloads; requests must not keep going at the old rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_request_rate() {
    let fast = FAST.replace("[poll]\npage_size = 10\n", NEVER);
    let env = Env::new(SandboxOptions::default(), false, &fast).await;
    let mut daemon = Running(env.spawn_daemon());
    env.wait_for_initial_passes(3);
    env.set_overrides(&fast.replace(
        "max_requests_per_second = 1000",
        "max_requests_per_second = 2",
    ));
    signal(&daemon.0, libc::SIGHUP);
    wait_until_blocking("the reload", Duration::from_secs(20), || {
        env.daemon_log().contains("configuration reloaded")
    });
    // Full scans of every business: 18 or more pages to list.
    env.sql()
        .execute("INSERT INTO sync_requests (kind) VALUES ('full')", [])
        .unwrap();
    let requests = || env.sandbox.stats().requests;
    let before = requests();
    wait_until_blocking("the passes start", Duration::from_secs(20), || {
        requests() > before
    });
    let (start, started) = (requests(), Instant::now());
    while started.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = requests() - start;
    let secs = started.elapsed().as_secs_f64();
    // At 2 per second, at most one more than the rate allows in the window.
    assert!(
        sent as f64 <= secs * 2.0 + 1.0,
        "{sent} requests in {secs:.1} s after lowering the rate to 2 per second"
    );
    signal(&daemon.0, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut daemon.0, Duration::from_secs(20)).code(),
        Some(0)
    );
}

/// `leadsync sync` started beside a "daemon" played by this test process
/// (it holds the mirror's lock as the daemon, and takes no request); its
/// stdout and stderr once it exits within `within`, else the test fails.
fn sync_beside_a_silent_daemon(
    env: &Env,
    args: &[&str],
    within: Duration,
    meanwhile: impl FnOnce(),
) -> (Option<i32>, String) {
    let mut child = Running(
        env.cli()
            .arg("sync")
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until_blocking("the sync request", Duration::from_secs(20), || {
        count(&env.sql(), "SELECT count(*) FROM sync_requests") == 1
    });
    meanwhile();
    let end = Instant::now() + within;
    while child.0.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "`sync` still waits after {within:?} for a request nobody will take"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.0.wait().unwrap();
    let mut said = String::new();
    use std::io::Read;
    for pipe in [
        child.0.stdout.take().map(|p| Box::new(p) as Box<dyn Read>),
        child.0.stderr.take().map(|p| Box::new(p) as Box<dyn Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut pipe = pipe;
        pipe.read_to_string(&mut said).unwrap();
    }
    (status.code(), said)
}

/// The daemon died before taking the request, but its pid lives on (reused
/// by another process, or, here, this test process): `sync` used to look
/// at `/proc/PID` alone and waited forever. The lock is what says a daemon
/// is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_stops_waiting_once_the_daemons_lock_is_free_though_its_pid_lives() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = leadsync::store::ProcessLock::acquire_as(&env.database(), true).unwrap();
    let (code, said) =
        sync_beside_a_silent_daemon(&env, &[], Duration::from_secs(25), || drop(held));
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("stopped before taking"), "{said}");
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE finished_at IS NULL"
        ),
        0,
        "the request is withdrawn, not left for a later daemon"
    );
}

/// A daemon that holds its lock but never takes the request (stuck, or its
/// writer blocked): `sync` (a cron job, a script) must not wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_gives_up_on_a_daemon_that_never_takes_its_request() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = leadsync::store::ProcessLock::acquire_as(&env.database(), true).unwrap();
    // `--wait 3` instead of the default 20 s: the same path, sooner.
    let (code, said) =
        sync_beside_a_silent_daemon(&env, &["--wait", "3"], Duration::from_secs(20), || {});
    drop(held);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("has not taken the request"), "{said}");
    assert!(said.contains("within 3 s"), "{said}");
    assert!(said.contains("/healthz"), "{said}");
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE finished_at IS NULL"
        ),
        0,
        "the request is withdrawn: a daemon that recovers does not run it unasked"
    );
}

/// The daemon's writes are blocked (here: another program's transaction
/// holds the mirror's write lock for the whole wait), so withdrawing the
/// untaken request fails too: `sync` says what it meant to say, and that
/// the request could not be withdrawn and may still run, instead of a
/// bare "database is locked".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_says_a_request_it_could_not_withdraw_may_still_run() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = leadsync::store::ProcessLock::acquire_as(&env.database(), true).unwrap();
    let writer = env.sql();
    let (code, said) =
        sync_beside_a_silent_daemon(&env, &["--wait", "3"], Duration::from_secs(40), || {
            writer.execute_batch("BEGIN IMMEDIATE").unwrap();
        });
    writer.execute_batch("ROLLBACK").unwrap();
    drop(held);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("has not taken the request"), "{said}");
    assert!(
        said.contains("could not be withdrawn") && said.contains("it may still run"),
        "{said}"
    );
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE finished_at IS NULL"
        ),
        1,
        "the request is still open, as `sync` said"
    );
}

/// The daemon stops and systemd starts it again (`RestartSec=5s`): the
/// lock is free for those seconds, and the new daemon takes the request.
/// `sync` used to withdraw it once it saw the lock free twice, about
/// 100 ms apart. The 5 s here is the restart's delay being played, not a
/// wait for something to happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_waits_for_a_daemon_restarted_by_systemd_to_take_its_request() {
    use leadsync::store::{ProcessLock, requests};
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = ProcessLock::acquire_as(&env.database(), true).unwrap();
    let (code, said) = sync_beside_a_silent_daemon(&env, &[], Duration::from_secs(30), || {
        drop(held);
        std::thread::sleep(Duration::from_secs(5));
        let _restarted = ProcessLock::acquire_as(&env.database(), true).unwrap();
        let c = env.sql();
        let id: i64 = c
            .query_row("SELECT max(id) FROM sync_requests", [], |r| r.get(0))
            .unwrap();
        let now = leadsync::time::now();
        assert!(
            requests::mark_started(&c, id, &now).unwrap(),
            "`sync` withdrew the request while the daemon restarted"
        );
        requests::finish(&c, id, "ok", None, "", &now).unwrap();
    });
    assert_eq!(code, Some(0), "{said}");
}

/// The daemon stopped and another command (`leadsync drain` from cron)
/// holds the lock now: nobody will take the request, and `sync` says so at
/// once instead of waiting 20 s to call the daemon stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_meeting_another_command_holding_the_lock_says_so_at_once() {
    use leadsync::store::ProcessLock;
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = ProcessLock::acquire_as(&env.database(), true).unwrap();
    let mut drain = None;
    let (code, said) = sync_beside_a_silent_daemon(&env, &[], Duration::from_secs(10), || {
        drop(held);
        drain = Some(ProcessLock::acquire(&env.database()).unwrap());
    });
    drop(drain);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("not the daemon"), "{said}");
    assert!(!said.contains("stuck"), "{said}");
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE finished_at IS NULL"
        ),
        0,
        "the request is withdrawn"
    );
}

/// The daemon's lock file deleted while it runs (by hand, a cleanup of
/// the state directory): the daemon still holds the flock on the database
/// file itself, so it runs. `sync` looked at the lock file alone, found it
/// free and said "the daemon stopped before taking the request", withdrawing
/// it after 1.5 s; the truth is the daemon has not taken it (here: it is
/// stuck, played by this test process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_beside_a_daemon_whose_lock_file_was_deleted_does_not_call_it_stopped() {
    use leadsync::store::ProcessLock;
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = ProcessLock::acquire_as(&env.database(), true).unwrap();
    let mut lock_file = std::fs::canonicalize(env.database())
        .unwrap()
        .into_os_string();
    lock_file.push(".lock");
    std::fs::remove_file(&lock_file).unwrap();
    let (code, said) =
        sync_beside_a_silent_daemon(&env, &["--wait", "3"], Duration::from_secs(20), || {});
    drop(held);
    assert_eq!(code, Some(1), "{said}");
    assert!(!said.contains("stopped"), "{said}");
    assert!(said.contains("has not taken the request"), "{said}");
    assert!(said.contains("within 3 s"), "{said}");
}

/// A program deletes a request the daemon is running (to "cancel" it) and
/// a new request gets the same id (explicitly, or SQLite's rowid reuse
/// after the highest row is deleted). The new request is answered by its
/// own pass, never by the deleted one's: the daemon used to key its open
/// requests by row id, so the first pass to end answered the new row with
/// another business's line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_while_its_pass_runs_gets_its_own_answer() {
    let overrides = FAST.replace("[poll]\npage_size = 10\n", NEVER) + "sync_concurrency = 1\n";
    let env = Env::new(SandboxOptions::default(), false, &overrides).await;
    let mut ids = env.business_ids();
    ids.sort();
    let (a, b) = (ids[0].clone(), ids[1].clone());
    let _daemon = Running(env.spawn_daemon());
    env.wait_for_initial_passes(3);
    // A's full scan takes seconds: a slow page each time.
    env.sandbox.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    env.sql()
        .execute(
            "INSERT INTO sync_requests (id, business_id, kind) VALUES (50, ?1, 'full')",
            [&a],
        )
        .unwrap();
    wait_until_blocking("A's requested pass runs", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id = 50 AND started_at IS NOT NULL",
        ) == 1
            && count(
                &env.sql(),
                "SELECT count(*) FROM sync_runs WHERE kind = 'full' AND finished_at IS NULL",
            ) == 1
    });
    let sql = env.sql();
    sql.execute("DELETE FROM sync_requests WHERE id = 50", [])
        .unwrap();
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind) VALUES (50, ?1, 'head')",
        [&b],
    )
    .unwrap();
    env.sandbox.set_faults(Faults::default());
    wait_until_blocking("the new request 50 ends", Duration::from_secs(60), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id = 50 AND finished_at IS NOT NULL",
        ) == 1
    });
    let (outcome, summary): (Option<String>, Option<String>) = env
        .sql()
        .query_row(
            "SELECT outcome, summary FROM sync_requests WHERE id = 50",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let summary = summary.unwrap_or_default();
    assert!(
        summary.starts_with(&format!("{b}: ok — head scan")),
        "request 50 (business {b}) was answered with: {summary:?}"
    );
    assert_eq!(outcome.as_deref(), Some("ok"));
    // B's pass really ran after the request.
    assert_eq!(
        count(
            &env.sql(),
            &format!(
                "SELECT count(*) FROM sync_runs WHERE business_id = '{b}' AND kind = 'head'
                   AND started_at >= (SELECT requested_at FROM sync_requests WHERE id = 50)"
            )
        ),
        1
    );
}

/// A program inserts a request with `started_at` already set (or changes
/// it after the daemon took the request): no daemon would ever take or
/// finish it, and whoever waited on it used to wait until the next restart.
/// The daemon refuses it with a reason, and its own running requests are
/// untouched — also one whose passes ended but whose answer could not be
/// written (a partner holding the write lock past the busy timeout; here a
/// partner's trigger fails it): the daemon used to drop it anyway, and the
/// sweep then refused it as "not taken by this daemon" though its passes
/// ran well. It is written again once the database lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_inserted_as_already_started_is_refused_not_left_open() {
    let overrides = FAST.replace("[poll]\npage_size = 10\n", NEVER) + "sync_concurrency = 1\n";
    let env = Env::new(SandboxOptions::default(), false, &overrides).await;
    let mut ids = env.business_ids();
    ids.sort();
    let _daemon = Running(env.spawn_daemon());
    env.wait_for_initial_passes(3);
    env.sandbox.set_faults(Faults {
        latency_ms: 1000,
        ..Faults::default()
    });
    let sql = env.sql();
    // Row 1 cannot be finished while the gate is shut: each try is logged.
    sql.execute_batch(
        "CREATE TABLE partner_gate (shut INTEGER NOT NULL);
         INSERT INTO partner_gate VALUES (1);
         CREATE TABLE partner_log (at TEXT);
         CREATE TRIGGER partner_holds_row_1 BEFORE UPDATE OF finished_at ON sync_requests
           WHEN NEW.id = 1 AND NEW.finished_at IS NOT NULL
                AND (SELECT shut FROM partner_gate)
         BEGIN
           INSERT INTO partner_log VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
           SELECT RAISE(FAIL, 'row 1 is held by a partner');
         END;",
    )
    .unwrap();
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind) VALUES (1, ?1, 'full')",
        [&ids[0]],
    )
    .unwrap();
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind, started_at)
         VALUES (2, ?1, 'head', '2026-01-01T00:00:00Z')",
        [&ids[1]],
    )
    .unwrap();
    let mut row_1_open_then = None;
    wait_until_blocking("row 2 is refused", Duration::from_secs(30), || {
        // One read: row 2's state and row 1's at the same moment.
        let (refused, open): (i64, i64) = env
            .sql()
            .query_row(
                "SELECT (SELECT count(*) FROM sync_requests WHERE id = 2 AND outcome = 'refused'
                           AND finished_at IS NOT NULL AND error LIKE '%started_at%'),
                        (SELECT count(*) FROM sync_requests WHERE id = 1 AND started_at IS NOT NULL
                           AND finished_at IS NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        row_1_open_then = Some(open);
        refused == 1
    });
    assert_eq!(
        row_1_open_then,
        Some(1),
        "row 1 was not open when row 2 was refused"
    );
    env.sandbox.set_faults(Faults::default());
    wait_until_blocking(
        "row 1's answer fails to be written",
        Duration::from_secs(60),
        || count(&env.sql(), "SELECT count(*) FROM partner_log") >= 1,
    );
    env.sql()
        .execute("UPDATE partner_gate SET shut = 0", [])
        .unwrap();
    wait_until_blocking("row 1 ends", Duration::from_secs(60), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id = 1 AND finished_at IS NOT NULL",
        ) == 1
    });
    let (outcome, summary): (Option<String>, Option<String>) = env
        .sql()
        .query_row(
            "SELECT outcome, summary FROM sync_requests WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome.as_deref(), Some("ok"), "{summary:?}");
    assert!(
        summary
            .unwrap_or_default()
            .starts_with(&format!("{}: ok — full scan", ids[0]))
    );
}

/// Another program marks the request finished without an outcome (its own
/// way to cancel it): `sync` exits 1 and says so, instead of exiting 1
/// with nothing printed at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_says_so_when_another_program_finished_its_request() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = leadsync::store::ProcessLock::acquire_as(&env.database(), true).unwrap();
    let (code, said) = sync_beside_a_silent_daemon(&env, &[], Duration::from_secs(20), || {
        env.sql()
            .execute(
                "UPDATE sync_requests SET finished_at = '2026-01-01T00:00:00Z'",
                [],
            )
            .unwrap();
    });
    drop(held);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("without an outcome"), "{said}");
}

/// The row's `summary` and `error` are anyone's to write: `sync` printed
/// them raw, so a program's escape sequences reached the terminal (review
/// xb). Each line is printed, without its control characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_prints_a_request_rows_text_without_escape_sequences() {
    let env = Env::small().await;
    assert_eq!(env.run(&["sync"]).status.code(), Some(0));
    let held = leadsync::store::ProcessLock::acquire_as(&env.database(), true).unwrap();
    for (outcome, code) in [("ok", Some(0)), ("refused", Some(1))] {
        // The helper waits for the one row of this sync.
        env.sql().execute("DELETE FROM sync_requests", []).unwrap();
        let (got, said) = sync_beside_a_silent_daemon(&env, &[], Duration::from_secs(20), || {
            env.sql()
                .execute(
                    "UPDATE sync_requests SET finished_at = '2026-01-01T00:00:00Z',
                     outcome = ?1, summary = ?2, error = ?3 WHERE finished_at IS NULL",
                    [
                        outcome,
                        "one: ok\u{1b}]0;pwned\u{7}\ntwo: ok\u{9b}2J\u{200b}",
                        "no\u{1b}[2J reason",
                    ],
                )
                .unwrap();
        });
        assert_eq!(got, code, "{said}");
        assert!(
            !said.chars().any(|c| c.is_control() && c != '\n'),
            "{outcome}: {said:?}"
        );
        assert!(!said.contains('\u{200b}'), "{outcome}: {said:?}");
        if outcome == "ok" {
            assert!(
                said.contains("one: ok") && said.contains("\ntwo: ok"),
                "{said}"
            );
        } else {
            assert!(
                said.contains("refused the request: no [2J reason"),
                "{said}"
            );
        }
    }
    drop(held);
}

/// More than a page (1,000) of the daemon's own requests open — their
/// answers held back by a partner's trigger — and then a row inserted as
/// already started: the sweep pages on past its own rows and refuses it,
/// instead of reading the same first thousand every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_started_row_behind_a_thousand_own_ones_is_refused() {
    let overrides = FAST.replace("[poll]\npage_size = 10\n", NEVER);
    let env = Env::new(SandboxOptions::default(), false, &overrides).await;
    let mut ids = env.business_ids();
    ids.sort();
    let _daemon = Running(env.spawn_daemon());
    env.wait_for_initial_passes(3);
    let sql = env.sql();
    sql.execute_batch(
        "CREATE TABLE partner_gate (shut INTEGER NOT NULL);
         INSERT INTO partner_gate VALUES (1);
         CREATE TABLE partner_log (id INTEGER);
         CREATE TRIGGER partner_holds_own_rows BEFORE UPDATE OF finished_at ON sync_requests
           WHEN NEW.id < 5000 AND NEW.finished_at IS NOT NULL
                AND (SELECT shut FROM partner_gate)
         BEGIN
           INSERT INTO partner_log VALUES (NEW.id);
           SELECT RAISE(FAIL, 'held by a partner');
         END;",
    )
    .unwrap();
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind)
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1001)
         SELECT i, ?1, 'head' FROM n",
        [&ids[0]],
    )
    .unwrap();
    wait_until_blocking(
        "every own request ended, its answer held back",
        Duration::from_secs(60),
        || count(&env.sql(), "SELECT count(DISTINCT id) FROM partner_log") == 1001,
    );
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind, started_at)
         VALUES (5000, ?1, 'head', '2026-01-01T00:00:00Z')",
        [&ids[1]],
    )
    .unwrap();
    wait_until_blocking("row 5000 is refused", Duration::from_secs(30), || {
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id = 5000 AND outcome = 'refused'",
        ) == 1
    });
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id < 5000 AND finished_at IS NOT NULL"
        ),
        0,
        "an own request was finished while its answer was held back"
    );
    env.sql()
        .execute("UPDATE partner_gate SET shut = 0", [])
        .unwrap();
    wait_until_blocking(
        "the own requests are answered",
        Duration::from_secs(30),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM sync_requests WHERE id < 5000 AND outcome = 'ok'",
            ) == 1001
        },
    );
}

/// Held-back answers: rows 1 to 8 a partner's trigger refuses for ever,
/// row 9 only until the partner lifts its hold. The sweep skips past the
/// refused ones (the database accepts writes: only a busy one stops it)
/// and writes row 9's answer, whatever order it tries them in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_refused_for_ever_does_not_hold_back_the_others() {
    let overrides = FAST.replace("[poll]\npage_size = 10\n", NEVER);
    let env = Env::new(SandboxOptions::default(), false, &overrides).await;
    let mut ids = env.business_ids();
    ids.sort();
    let socket_path = env.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket_path = socket_path.display().to_string();
    let _daemon = Running(env.spawn_daemon_with(&[("NOTIFY_SOCKET", &socket_path)]));
    // The first STATUS= line that holds `until`, within a minute.
    let status_until = |what: &str, until: &dyn Fn(&str) -> bool| -> String {
        let mut buf = [0u8; 4096];
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Ok(n) = socket.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(s) = m.lines().find_map(|l| l.strip_prefix("STATUS="))
                    && until(s)
                {
                    return s.to_string();
                }
            }
        }
        panic!("no STATUS= line {what} within a minute");
    };
    env.wait_for_initial_passes(3);
    let sql = env.sql();
    sql.execute_batch(
        "CREATE TABLE partner_gate (shut INTEGER NOT NULL);
         INSERT INTO partner_gate VALUES (1);
         CREATE TABLE partner_log (id INTEGER);
         CREATE TRIGGER partner_refuses BEFORE UPDATE OF finished_at ON sync_requests
           WHEN NEW.finished_at IS NOT NULL
                AND (NEW.id < 9 OR (SELECT shut FROM partner_gate))
         BEGIN
           INSERT INTO partner_log VALUES (NEW.id);
           SELECT RAISE(FAIL, 'refused by a partner');
         END;",
    )
    .unwrap();
    sql.execute(
        "INSERT INTO sync_requests (id, business_id, kind)
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 9)
         SELECT i, ?1, 'head' FROM n",
        [&ids[0]],
    )
    .unwrap();
    wait_until_blocking(
        "every request ended, its answer held back",
        Duration::from_secs(60),
        || count(&env.sql(), "SELECT count(DISTINCT id) FROM partner_log") == 9,
    );
    status_until("counting the held answers", &|s| {
        s.starts_with("9 sync request answers not written (see the log); ")
    });
    sql.execute("UPDATE partner_gate SET shut = 0", []).unwrap();
    wait_until_blocking(
        "row 9 is answered by the sweep",
        Duration::from_secs(30),
        || {
            count(
                &env.sql(),
                "SELECT count(*) FROM sync_requests WHERE id = 9 AND outcome = 'ok'",
            ) == 1
        },
    );
    assert_eq!(
        count(
            &env.sql(),
            "SELECT count(*) FROM sync_requests WHERE id < 9 AND finished_at IS NOT NULL"
        ),
        0
    );
    status_until("counting what is still held", &|s| {
        s.starts_with("8 sync request answers not written (see the log); ")
    });
    // Tried every 10 s, each failure is logged once, not at every sweep.
    let log = env.daemon_log();
    assert_eq!(
        log.matches("cannot record the end of a sync request")
            .count(),
        9,
        "{log}"
    );
    assert_eq!(log.matches("written at last").count(), 1, "{log}");
}
