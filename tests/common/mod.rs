//! Shared test helpers: a sandbox on loopback, a temp directory with a
//! configuration for it, the real binary, and waits with deadlines.
#![allow(dead_code)]

use leadsync::config::{Config, ConfigSource};
use leadsync::sandbox::{Mutation, Sandbox, SandboxOptions};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Child processes of this test binary start under its read side; a test
/// that lets go of a lock file it holds in process and takes it again holds
/// the write side meanwhile ([`no_spawns`]). A `flock` lives as long as any
/// copy of its descriptor, and a child being started holds a copy of every
/// descriptor of the process until its `exec` (close-on-exec or not): a
/// lock let go in that moment stays held, and taking it again in process
/// fails as if another process held it — seen on a loaded machine, where a
/// child waits long for its `exec` (`Session::open` told "another leadsync
/// process (pid <this test binary>) is running", a grant's lock not taken
/// back). Not an issue of the daemon, which starts no process.
static SPAWNS: RwLock<()> = RwLock::new(());

fn spawns_allowed() -> RwLockReadGuard<'static, ()> {
    SPAWNS.read().unwrap_or_else(|e| e.into_inner())
}

/// No child process of this test binary starts (nor holds a copy of this
/// process's descriptors) while the guard lives. Start none under it: that
/// waits for itself.
pub fn no_spawns() -> RwLockWriteGuard<'static, ()> {
    SPAWNS.write().unwrap_or_else(|e| e.into_inner())
}

/// `cmd.spawn()`, but never while a test holds [`no_spawns`]. (`spawn`
/// returns once the child has exec'd: its copies of this process's
/// descriptors are gone then.)
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _allowed = spawns_allowed();
    cmd.spawn()
}

/// `cmd.output()` (stdin empty, stdout and stderr captured), started as
/// [`spawn`] does.
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd)?.wait_with_output()
}

/// `Session::open`, no child process starting meanwhile ([`no_spawns`]):
/// it takes the database's lock file for the migration, lets it go, and
/// takes it again as the command's.
#[allow(clippy::await_holding_lock)] // Session::open starts no process.
pub async fn open_session(config: Config) -> leadsync::app::Session {
    let _gate = no_spawns();
    leadsync::app::Session::open(config)
        .await
        .expect("open the session")
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leadsync"))
}

/// A sandbox, a temp directory and a configuration pointing at both.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub sandbox: Sandbox,
    /// Written by the sandbox: database, api, oauth, businesses.
    pub fixture: PathBuf,
    /// Test-specific settings, merged after the fixture.
    pub overrides: PathBuf,
}

/// Fast settings for tests: everything on short timers.
pub const FAST: &str = r#"
[api]
timeout_secs = 5
max_requests_per_second = 1000
read_retries = 0
read_retry_initial_ms = 50

[poll]
page_size = 10

[outbox]
poll_interval_ms = 100
concurrency = 4
max_attempts = 5
backoff_initial_secs = 0.2
backoff_max_secs = 2

[daemon]
# At least api.timeout_secs + 3 (the line must not contain "timeout_secs = 5":
# tests replace that text to change the request timeout).
shutdown_timeout_secs = 8
"#;

impl Env {
    /// A sandbox with `options` and a configuration using OAuth grants (or static tokens).
    pub async fn new(options: SandboxOptions, oauth: bool, overrides: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let sandbox = Sandbox::start(options).await.expect("sandbox starts");
        let fixture = sandbox
            .write_fixture(&dir.path().join("fixture"), oauth)
            .expect("fixture");
        let overrides_path = dir.path().join("overrides.toml");
        std::fs::write(&overrides_path, overrides).expect("overrides");
        Env {
            dir,
            sandbox,
            fixture,
            overrides: overrides_path,
        }
    }

    /// The default small sandbox with static tokens and [`FAST`] settings.
    pub async fn small() -> Env {
        Env::new(SandboxOptions::default(), false, FAST).await
    }

    /// The configuration files, in order.
    pub fn config_files(&self) -> Vec<PathBuf> {
        vec![self.fixture.clone(), self.overrides.clone()]
    }

    /// Replaces the overrides file.
    pub fn set_overrides(&self, toml: &str) {
        std::fs::write(&self.overrides, toml).expect("overrides");
    }

    /// The configuration, loaded the way the binary loads it.
    pub fn config(&self) -> Config {
        ConfigSource {
            files: self.config_files(),
            ..Default::default()
        }
        .load()
        .expect("test configuration is valid")
    }

    /// The mirror database path.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("fixture").join("leadsync.db")
    }

    /// A plain SQLite connection, as a user's program would open one.
    pub fn sql(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.database()).expect("open database");
        c.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        c
    }

    /// `leadsync --config fixture --config overrides ARGS...`.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin());
        for f in self.config_files() {
            c.arg("--config").arg(f);
        }
        c.env_remove("LEADSYNC_LOG");
        c
    }

    /// Starts `leadsync run` in the background, its logs appended to `daemon.log`.
    pub fn spawn_daemon(&self) -> std::process::Child {
        self.spawn_daemon_with(&[])
    }

    /// [`Env::spawn_daemon`] with `vars` in the daemon's environment.
    pub fn spawn_daemon_with(&self, vars: &[(&str, &str)]) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log file");
        spawn(self.cli().arg("run").envs(vars.iter().copied()).stderr(log))
            .expect("start leadsync run")
    }

    /// What the background daemons logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts `leadsync run` like [`Env::spawn_daemon`] and waits until it
    /// logs the address of each listener in `markers` (the start of its log
    /// line, e.g. "admin listener", whose `listen=` field is the address it
    /// is bound to: with port 0 in the configuration, the port the system
    /// chose). The addresses come in the order of `markers`.
    ///
    /// Nothing is guessed: no port is picked, released and hoped free. If the
    /// daemon exits first, or is not listening within a minute (a loaded
    /// machine), it is stopped and the test fails with what it logged.
    pub async fn spawn_daemon_listening(
        &self,
        markers: &[&str],
    ) -> (std::process::Child, Vec<SocketAddr>) {
        self.spawn_daemon_listening_with(markers, &[]).await
    }

    /// [`Env::spawn_daemon_listening`] with `vars` in the daemon's environment.
    pub async fn spawn_daemon_listening_with(
        &self,
        markers: &[&str],
        vars: &[(&str, &str)],
    ) -> (std::process::Child, Vec<SocketAddr>) {
        let from = self.daemon_log().len();
        let mut child = self.spawn_daemon_with(vars);
        let deadline = Duration::from_secs(60);
        let end = Instant::now() + deadline;
        loop {
            let log = self.daemon_log();
            let ours = log.get(from..).unwrap_or("");
            let found: Vec<Option<SocketAddr>> =
                markers.iter().map(|m| listen_address(ours, m)).collect();
            if found.iter().all(Option::is_some) {
                return (child, found.into_iter().flatten().collect());
            }
            let failure = match child.try_wait() {
                Ok(Some(status)) => Some(format!("the daemon exited ({status}) before listening")),
                Err(e) => Some(format!("cannot watch the daemon: {e}")),
                Ok(None) if Instant::now() > end => {
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                    let _ = child.wait();
                    Some(format!(
                        "the daemon did not log {markers:?} within {deadline:?}"
                    ))
                }
                Ok(None) => None,
            };
            if let Some(why) = failure {
                panic!(
                    "{why}; its log:\n{}",
                    self.daemon_log().get(from..).unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Runs the CLI to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        output(self.cli().args(args)).expect("run leadsync")
    }

    /// Runs the CLI to completion and asserts it exits 0 (its output shown
    /// otherwise).
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        o
    }

    /// `leadsync run` as systemd starts a `Type=notify` unit: a datagram
    /// socket bound in the temp directory (its reads time out after
    /// `read_timeout`) and the daemon, its stderr discarded, told of it by
    /// NOTIFY_SOCKET, with `vars` in its environment too.
    pub fn spawn_notified(
        &self,
        read_timeout: Duration,
        vars: &[(&str, &str)],
    ) -> (UnixDatagram, Child) {
        let socket_path = self.dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(read_timeout))
            .expect("notify socket timeout");
        let child = spawn(
            self.cli()
                .arg("run")
                .env("NOTIFY_SOCKET", &socket_path)
                .envs(vars.iter().copied())
                .stderr(std::process::Stdio::null()),
        )
        .expect("start leadsync run");
        (socket, child)
    }

    /// Waits (30 s at most) until a daemon of [`Env::spawn_daemon`] has
    /// started and `ok_passes` sync passes have ended `ok`.
    pub fn wait_for_initial_passes(&self, ok_passes: i64) {
        wait_until_blocking("the initial passes", Duration::from_secs(30), || {
            self.daemon_log().contains("leadsync started")
                && count(
                    &self.sql(),
                    "SELECT count(*) FROM sync_runs WHERE outcome = 'ok'",
                ) == ok_passes
        });
    }

    /// Adds messages to a sandbox lead, sent at `sent_at`.
    pub fn add_messages_at(&self, negotiation_id: &str, sent_at: Vec<String>) {
        self.sandbox
            .mutate(Mutation::AddMessagesAt {
                negotiation_id: negotiation_id.to_string(),
                sent_at,
            })
            .expect("add messages");
    }

    /// Changes a sandbox lead's status, so that the next head scan finds
    /// it changed (and polls its messages).
    pub fn set_status(&self, negotiation_id: &str, status: &str) {
        self.sandbox
            .mutate(Mutation::SetStatus {
                negotiation_id: negotiation_id.to_string(),
                status: status.to_string(),
            })
            .expect("set a lead's status");
    }

    /// The newest `per_business` leads of every business, business by business.
    pub fn first_leads(&self, per_business: usize) -> Vec<String> {
        self.business_ids()
            .iter()
            .flat_map(|b| self.sandbox.lead_ids(b)[..per_business].to_vec())
            .collect()
    }

    /// Business ids of the sandbox, in order.
    pub fn business_ids(&self) -> Vec<String> {
        self.sandbox
            .businesses()
            .into_iter()
            .map(|b| b.id)
            .collect()
    }
}

/// The daemon run in-process by a test (see [`start_in_process`]).
pub struct InProcess {
    /// Cancel to stop it.
    pub stop: tokio_util::sync::CancellationToken,
    /// Its end: `run`'s result.
    pub daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where its listeners are bound (port 0 configured: the system's choice).
    pub bound: leadsync::daemon::Bound,
}

/// Runs the daemon in-process with `config` and waits until its listeners
/// are bound, as the daemon itself reports (no port is guessed). If it
/// stops first, or is not listening within a minute, the test fails at once
/// with its error.
pub async fn start_in_process(config: Config) -> InProcess {
    let controls = leadsync::daemon::Controls::default();
    let stop = controls.shutdown.clone();
    let mut bound = controls.bound.subscribe();
    let mut daemon = tokio::spawn(leadsync::daemon::run_with(config, None, controls));
    let deadline = Duration::from_secs(60);
    let got = tokio::select! {
        b = bound.wait_for(Option::is_some) => b.ok().and_then(|b| *b),
        end = &mut daemon => panic!("the daemon stopped before listening: {end:?}"),
        _ = tokio::time::sleep(deadline) => {
            stop.cancel();
            panic!("the daemon was not listening within {deadline:?}");
        }
    };
    match got {
        Some(bound) => InProcess {
            stop,
            daemon,
            bound,
        },
        // The daemon is gone (its sender with it): say why.
        None => panic!("the daemon stopped before listening: {:?}", daemon.await),
    }
}

/// The `listen=` address on the first whole line of `log` (one that ends in a
/// newline: not one still being written) that contains `marker`.
pub fn listen_address(log: &str, marker: &str) -> Option<SocketAddr> {
    log.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains(marker))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("listen=")))
        .and_then(|a| a.parse().ok())
}

/// A plain `reqwest` client. reqwest is built without a TLS crypto
/// provider: the process must install one first, as leadsync's own clients
/// do. A test must not count on another test, or on a task the sandbox
/// spawned, having done it already (`reqwest::Client::new()` panics when
/// none has: that made tests fail depending on what ran first).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// stdout and stderr as one string, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until `f` is true or the deadline passes (then panics with `what`).
pub async fn wait_until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Blocking variant of [`wait_until`].
pub fn wait_until_blocking(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !f() {
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Counts rows of a query returning one integer.
/// How many messages of one lead the mirror holds.
pub fn messages_of(conn: &rusqlite::Connection, negotiation_id: &str) -> i64 {
    conn.query_row(
        "SELECT count(*) FROM messages WHERE negotiation_id = ?1",
        [negotiation_id],
        |r| r.get(0),
    )
    .expect("count messages")
}

pub fn count(conn: &rusqlite::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Writes a file and returns its path.
pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(&p, content).expect("write file");
    p
}

/// Every text column of every mirror table, `status --json`, `config check`
/// and the daemon's log: none may hold a token or secret the sandbox issued.
pub fn assert_no_secret_anywhere(env: &Env, more: &str) {
    let mut seen = String::from(more);
    seen.push_str(&env.daemon_log());
    for args in [&["status", "--json"][..], &["config", "check"][..]] {
        let o = output(env.cli().args(args).env("LEADSYNC_LOG", "trace")).unwrap();
        seen.push_str(&text(&o));
    }
    let db = env.sql();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for t in tables {
        let columns: Vec<String> = db
            .prepare(&format!("SELECT name FROM pragma_table_info('{t}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for c in columns {
            let mut stmt = db
                .prepare(&format!(
                    "SELECT \"{c}\" FROM \"{t}\" WHERE typeof(\"{c}\") = 'text'"
                ))
                .unwrap();
            let values = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
            for v in values {
                seen.push_str(&v.unwrap());
                seen.push('\n');
            }
        }
    }
    for s in env.sandbox.issued_secrets() {
        assert!(
            !seen.contains(&s),
            "secret {s} was found in logs, status, config check or the mirror"
        );
    }
}

/// An environment whose grants go through the sandbox's token endpoint,
/// access tokens living `ttl` seconds.
pub async fn oauth_env(ttl: u64, overrides: &str) -> Env {
    Env::new(
        SandboxOptions {
            access_token_ttl_secs: ttl,
            ..Default::default()
        },
        true,
        overrides,
    )
    .await
}

/// How many refresh-token grants the sandbox's token endpoint answered.
pub fn refreshes(env: &Env) -> u64 {
    env.sandbox
        .stats()
        .by_route
        .get("token refresh_token")
        .copied()
        .unwrap_or(0)
}
