//! `leadsync run`: the scheduler and the drainer in one process, the systemd
//! notify protocol (READY, STATUS, WATCHDOG, STOPPING), configuration reload
//! and a bounded graceful shutdown.

use crate::app::{Session, StoreGrants};
use crate::config::{Config, ConfigSource};
use crate::drain::{DrainSettings, Drainer};
use crate::schedule::{Job, Origin, Pushed, ScheduleKey, Schedules, SyncQueue};
use crate::store::tokens::TokenStore;
use crate::store::{Store, mirror, outbox, requests, retention};
use crate::sync::{PANICKED, PassOutcome, PassReport, PassSettings, ScanKind, sync_business};
use crate::thumbtack::{Auth, Client, ClientSettings};
use crate::time::Heartbeat;
use anyhow::Result;
use sd_notify::NotifyState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How often the one-line `STATUS=` summary is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How often `sync_requests` is looked at ("within about a second").
const REQUESTS_EVERY: Duration = Duration::from_millis(500);
/// Every how many looks the requests that seem taken are checked against
/// the ones this daemon took (a scan of the unfinished taken rows).
const FOREIGN_STARTED_EVERY: u32 = 20;
/// How many of the requests that seem taken the sweep reads at a time.
const SWEEP_PAGE: usize = 1_000;
/// How often a request's answer that still cannot be written is logged
/// again (the sweep tries it every 10 s; the first failure is logged).
const HELD_WARN_EVERY_MS: i64 = 10 * 60 * 1000;
/// Why a request that seems taken, but not by this daemon, is refused.
const FOREIGN_STARTED: &str = "started_at was set, but not by this daemon (the program that \
    inserted the request set it, or changed it after the daemon took the request): nothing would \
    ever finish it. Insert requests with started_at and finished_at left out";

/// The logs (`sync_runs`, `webhook_events`, attempts, finished
/// `sync_requests`) are pruned this long after the start, then every
/// [`PRUNE_EVERY`] (README, Database).
const PRUNE_FIRST_AFTER: Duration = Duration::from_secs(120);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// A pause between two batches of pruning, so that the database thread's
/// other jobs (passes, the drainer) go between them, not only deliveries.
const PRUNE_PAUSE: Duration = Duration::from_millis(10);

/// While starting, how long each `EXTEND_TIMEOUT_USEC` gives, how often it
/// is sent, and for how long at most: opening a big mirror after an upgrade
/// (its migrations) may outlast the unit's TimeoutStartSec, and a start
/// killed there would begin the same migrations again at every restart.
const START_EXTEND: Duration = Duration::from_secs(30);
const START_EXTEND_EVERY: Duration = Duration::from_secs(10);
const START_EXTEND_MAX: Duration = Duration::from_secs(3600);

/// Tells systemd the start goes on until `started` is cancelled (READY=1 or
/// a failed start), for at most [`START_EXTEND_MAX`]: a start stuck beyond
/// that is left to TimeoutStartSec. Not once a stop is asked for (the
/// extension would then extend the stop): the stop's own timeout applies,
/// and a migration cut there is rolled back whole.
async fn extend_start(started: CancellationToken, shutdown: CancellationToken) {
    let begun = Instant::now();
    while begun.elapsed() < START_EXTEND_MAX && !shutdown.is_cancelled() {
        notify(&[NotifyState::ExtendTimeoutUsec(
            START_EXTEND.as_micros() as u32
        )]);
        tokio::select! {
            _ = started.cancelled() => return,
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(START_EXTEND_EVERY) => {}
        }
    }
}

/// What can happen to a running daemon from outside, and what it tells.
#[derive(Clone, Default)]
pub struct Controls {
    /// Cancel to stop (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
    /// Notify to re-read the configuration (SIGHUP).
    pub reload: Arc<Notify>,
    /// Set once the listeners are bound, before READY=1 (subscribe to wait for it).
    pub bound: Arc<tokio::sync::watch::Sender<Option<Bound>>>,
    /// Each finished reload, in order (subscribe to wait for one).
    pub reloads: Arc<tokio::sync::watch::Sender<Vec<ReloadOutcome>>>,
}

/// A finished reload's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Why it failed (the previous configuration kept); `None` if applied.
    pub error: Option<String>,
    /// The businesses in force after it.
    pub businesses: usize,
}

impl Controls {
    fn reloaded(&self, businesses: usize, error: Option<String>) {
        self.reloads
            .send_modify(|r| r.push(ReloadOutcome { error, businesses }));
    }
}

/// The addresses the daemon's listeners are bound to: with port 0 in the
/// configuration, the port the system chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The webhook receiver (`webhooks.listen`), when on.
    pub webhooks: Option<std::net::SocketAddr>,
    /// The admin listener (`admin.listen`), when on.
    pub admin: Option<std::net::SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled. Tests start and stop the
/// whole program in-process with this.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    run_with(
        config,
        None,
        Controls {
            shutdown,
            reload: Arc::new(Notify::new()),
            bound: Default::default(),
            reloads: Default::default(),
        },
    )
    .await
}

/// Like [`run`], re-reading the configuration from `source` when `controls.reload` fires.
pub async fn run_with(
    config: Config,
    source: Option<ConfigSource>,
    controls: Controls,
) -> Result<()> {
    if config.businesses.is_empty() {
        warn!("no business is configured: nothing will be synced or sent until one is added");
    }
    for w in config.warnings() {
        warn!("{w}");
    }
    // Only a receiver in this process refuses deliveries: without
    // `webhooks.listen` the value is logged, with no alert.
    let webhooks_problem = match &config.webhooks {
        Some(w) => match (&w.auth_problem, w.listen) {
            (Some(p), Some(_)) => {
                // Not a failed start: syncing and draining go on (README, "Webhooks").
                error!("{p}; syncing and draining go on, fix it and restart leadsync");
                Some(p.clone())
            }
            (Some(p), None) => {
                error!(
                    "{p}; no receiver runs in this daemon (webhooks.listen is not set), \
                     but `webhooks register` refuses it"
                );
                None
            }
            (None, _) => None,
        },
        None => None,
    };
    let schedules = Schedules::from_config(&config, chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("cannot schedule: {e}"))?;
    // Ends at READY=1, or with a failed start (the guard is dropped).
    let starting = CancellationToken::new();
    let _starting = starting.clone().drop_guard();
    tokio::spawn(extend_start(starting.clone(), controls.shutdown.clone()));
    let session = Session::open_as(config, true).await?;
    {
        let closed = close_previous_process(&session.store).await?;
        if let Some(p) = webhooks_problem {
            let now = crate::time::now();
            session
                .store
                .call(move |c| mirror::set_daemon_alert(c, WEBHOOKS_AUTH_ALERT, Some(&p), &now))
                .await?;
        }
        if closed > 0 {
            info!(
                requests = closed,
                "sync requests left unfinished by a stopped process were recorded as interrupted"
            );
        }
    }
    let daemon = Arc::new(Daemon {
        store: session.store.clone(),
        auth: session.auth.clone(),
        client: RwLock::new(session.client.clone()),
        config: RwLock::new(session.config.clone()),
        passes: TaskTracker::new(),
        stop: controls.shutdown.child_token(),
        queue: Mutex::new(SyncQueue::default()),
        work: Notify::new(),
        schedules: Mutex::new(schedules),
        schedules_changed: Notify::new(),
        requests: Mutex::new(HashMap::new()),
        last_ticket: AtomicI64::new(0),
        lag_written: Mutex::new(None),
        lag_failing: Mutex::new(None),
        last_status_ms: AtomicI64::new(0),
        scheduler_beat: Arc::new(Heartbeat::new()),
        drain_beat: Arc::new(Heartbeat::new()),
        drainer: Arc::new(Drainer::new(
            session.store.clone(),
            session.client.clone(),
            DrainSettings::from_config(&session.config),
        )),
        disk_alert: DiskAlert::default(),
        reload_failed: Mutex::new(None),
    });
    // The receiver is bound before READY=1: a port that is taken fails the start.
    let mut webhooks_at = None;
    let receiver = match session.config.webhooks.as_ref() {
        Some(w) => match w.listen {
            Some(addr) => {
                let listener = crate::serve::bind(addr, "webhooks.listen").await?;
                let local = listener.local_addr().unwrap_or(addr);
                webhooks_at = Some(local);
                let router = crate::serve::webhooks::router(w, session.store.clone());
                let options = crate::serve::ServeOptions {
                    header_read_timeout: w.read_timeout,
                    write_timeout: w.read_timeout,
                    // A slot held by a slow or idle client is free by then.
                    slot_wait: w.read_timeout + Duration::from_secs(1),
                    shutdown_grace: Duration::from_secs(
                        session.config.file.daemon.shutdown_timeout_secs,
                    )
                    .saturating_sub(crate::drain::SHUTDOWN_RESERVE),
                    ..Default::default()
                };
                info!(listen = %local, path = %w.path, "webhook receiver listening");
                Some(tokio::spawn(crate::serve::serve(
                    listener,
                    router,
                    daemon.stop.clone(),
                    options,
                )))
            }
            None => None,
        },
        None => None,
    };
    let admin = crate::serve::admin::Admin::start(
        &session.config,
        session.store.path().to_path_buf(),
        daemon.scheduler_beat.clone(),
        daemon.drain_beat.clone(),
        Some(session.store.durable_sync_watch()),
        Some(session.store.write_watch()),
        session.tokens.as_ref().map(TokenStore::watch),
    )
    .await?;
    controls.bound.send_replace(Some(Bound {
        webhooks: webhooks_at,
        admin: admin.as_ref().map(|a| a.local_addr()),
    }));
    starting.cancel();
    notify(&[NotifyState::Ready]);
    daemon.send_status().await;
    info!(
        database = %session.store.path().display(),
        businesses = session.config.businesses.len(),
        schedules = daemon.lock_schedules().groups.len(),
        "leadsync started"
    );

    daemon.queue_initial_passes(None).await;
    for _ in 0..session.config.file.daemon.sync_concurrency {
        daemon.passes.spawn(daemon.clone().worker());
    }
    let timer = tokio::spawn(daemon.clone().timer());
    let taker = tokio::spawn(daemon.clone().take_requests());
    let drainer = daemon.spawn_drainer();
    let monitor = tokio::spawn(daemon.clone().monitor());
    let pruner = tokio::spawn(daemon.clone().prune());

    'serve: loop {
        tokio::select! {
            _ = controls.shutdown.cancelled() => break,
            _ = controls.reload.notified() => {
                // A store loosened since it was opened (a chmod, a restore)
                // is set to 0600 again, whatever the reload's outcome.
                if daemon.auth.has_grant_store() {
                    TokenStore::tighten(&daemon.config().file.oauth.token_store);
                }
                let Some(source) = &source else {
                    warn!("reload requested, but this daemon was not started from configuration files");
                    continue;
                };
                // Reading thousands of files takes a while: it runs off this
                // loop, which keeps answering SIGTERM meanwhile.
                let source = source.clone();
                let running = daemon.config();
                let load = tokio::task::spawn_blocking(move || source.reload(&running));
                let loaded = tokio::select! {
                    _ = controls.shutdown.cancelled() => {
                        info!("stopping during a configuration reload; the reload is abandoned");
                        break 'serve;
                    }
                    loaded = load => loaded,
                };
                match loaded {
                    Err(e) => {
                        error!(error = %e, "configuration reload failed (a bug); keeping the previous configuration");
                        daemon.reload_outcome(false).await;
                        controls.reloaded(daemon.config().businesses.len(), Some(e.to_string()));
                    }
                    Ok(Err(e)) => {
                        error!(error = %e, "configuration reload failed; keeping the previous configuration");
                        daemon.reload_outcome(false).await;
                        controls.reloaded(daemon.config().businesses.len(), Some(e.to_string()));
                    }
                    // Its writes may wait long for a locked mirror (behind
                    // the other jobs of the database thread): a stop abandons
                    // it too, so that the stop begins at the signal. What it
                    // wrote is whole (each write is one transaction); what
                    // it did not is read from the files at the next start.
                    Ok(Ok(new)) => match {
                        for w in new.warnings() {
                            warn!("{w}");
                        }
                        if let Some(w) = &new.webhooks
                            && let Some(p) = &w.auth_problem
                        {
                            error!("{p}; {}", reload_auth_consequence(daemon.config().webhooks.as_ref(), w));
                        }
                        tokio::select! {
                        _ = controls.shutdown.cancelled() => {
                            info!("stopping during a configuration reload; the reload is abandoned");
                            break 'serve;
                        }
                        applied = daemon.apply(new) => applied,
                    }} {
                        Ok(r) => {
                            // The STATUS line of the new configuration (its
                            // businesses, the reload failure cleared), before
                            // the log says it is in force.
                            daemon.reload_outcome(true).await;
                            info!(
                                added = r.added,
                                removed = r.removed,
                                rows_written = r.rows_written,
                                elapsed_ms = r.started.elapsed().as_millis() as u64,
                                "configuration reloaded"
                            );
                            controls.reloaded(daemon.config().businesses.len(), None);
                        }
                        Err(e) => {
                            error!(error = %format!("{e:#}"), "configuration reload failed; keeping the previous configuration");
                            daemon.reload_outcome(false).await;
                            controls.reloaded(daemon.config().businesses.len(), Some(format!("{e:#}")));
                        }
                    },
                }
            }
        }
    }

    // Shutdown: no new work; in-flight requests finish within the bound.
    // Everything below ends by `deadline`, shutdown_timeout_secs after the
    // signal (below the unit's TimeoutStopSec, see config check): in-flight
    // sends and passes until `deadline - SHUTDOWN_RESERVE`, the outcomes of
    // sends already answered then recorded until `deadline - CLOSING_RESERVE`;
    // a token refresh already sent until `deadline - 1 s` (config validation
    // keeps the request timeout inside that); the closing records until
    // `deadline`.
    let started = Instant::now();
    let bound = Duration::from_secs(daemon.config().file.daemon.shutdown_timeout_secs);
    let deadline = started + bound;
    let refresh_deadline = deadline - Duration::from_secs(1).min(bound);
    // systemd is told how long the stop may take: a unit whose
    // TimeoutStopSec is shorter then waits instead of SIGKILLing a stop
    // that keeps its bound (systemd ignores it when its timeout is longer).
    let extend = bound + Duration::from_secs(crate::config::EXIT_ALLOWANCE_SECS);
    notify(&[
        NotifyState::Stopping,
        NotifyState::ExtendTimeoutUsec(u32::try_from(extend.as_micros()).unwrap_or(u32::MAX)),
    ]);
    if let Some(admin) = &admin {
        admin.stopping();
    }
    info!(
        bound_secs = bound.as_secs(),
        "stopping: finishing in-flight work"
    );
    daemon.auth.begin_shutdown(refresh_deadline);
    let sends_by = deadline - crate::drain::SHUTDOWN_RESERVE.min(bound);
    daemon.drainer.stop_sends_by(sends_by);
    // Answers already in are recorded until the closing reserve, always
    // before the daemon stops waiting for the drainer (even at a 1 s bound).
    daemon
        .drainer
        .stop_records_by(deadline - crate::drain::CLOSING_RESERVE.min(bound));
    daemon.stop.cancel();
    daemon.work.notify_waiters();
    daemon.passes.close();
    let in_flight = async {
        let _ = timer.await;
        let _ = taker.await;
        daemon.passes.wait().await;
        if let Some(r) = receiver {
            let _ = r.await;
        }
    };
    // The drainer runs meanwhile: it gives up on requests without an answer
    // at deadline - SHUTDOWN_RESERVE, and records answers already in until
    // deadline - CLOSING_RESERVE (then names the rows left, resent at the
    // next start); it is awaited after the token refreshes below.
    let in_flight_until = sends_by + Duration::from_millis(500);
    if tokio::time::timeout_at(in_flight_until.into(), in_flight)
        .await
        .is_err()
    {
        warn!(
            pass_workers = daemon.passes.len(),
            "in-flight work did not finish within daemon.shutdown_timeout_secs; sync passes still \
             running are recorded as interrupted (the next pass reads their pages again), webhook \
             deliveries not answered yet are delivered again by Thumbtack"
        );
    }
    // A refresh already sent finishes (or asks again for a lost answer)
    // and its rotated token is stored before anything is closed.
    daemon
        .auth
        .settle(refresh_deadline.saturating_duration_since(Instant::now()))
        .await;
    // A little after the drainer's own bound, so that it names its rows first.
    let reserve = crate::drain::CLOSING_RESERVE.min(bound);
    let _ = tokio::time::timeout_at((deadline - reserve + reserve / 2).into(), drainer).await;
    monitor.abort();
    pruner.abort();
    let closing = async {
        if let Some(admin) = admin {
            admin.stop().await;
        }
        daemon.close_requests().await;
        let now = crate::time::now();
        daemon
            .store
            .call(move |c| {
                requests::write_lag(c, &[])?;
                mirror::interrupt_running(c, &now, "interrupted by shutdown")
            })
            .await
    };
    match tokio::time::timeout_at(deadline.into(), closing).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %format!("{e:#}"), "cannot record interrupted passes"),
        Err(_) => warn!(
            "the shutdown bound was reached before the interrupted passes and sync requests were \
             recorded; the next start records them as interrupted"
        ),
    }
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "stopped");
    drop(session);
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends states to the service manager (`NOTIFY_SOCKET`, a path or an
/// abstract `@name`); a no-op when not run by one. The send never blocks: a
/// manager that stops reading its socket loses a STATUS line, it never
/// stalls the runtime thread that sent it (and with it signal handling).
fn notify(state: &[NotifyState]) {
    let result = match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(()),
        Some(s) => notify_to(s.as_encoded_bytes(), state),
    };
    if let Err(e) = result {
        warn!(error = %e, "cannot notify systemd");
    }
}

fn notify_to(socket_name: &[u8], state: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let addr = match socket_name.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        None => {
            std::os::unix::net::SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(socket_name))?
        }
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    socket.connect_addr(&addr)?;
    let message: String = state.iter().map(|s| format!("{s}\n")).collect();
    socket.send(message.as_bytes())?;
    Ok(())
}

/// Whether both work loops showed progress recently enough for a watchdog
/// ping (their idle times, on the monotonic clock).
fn loops_alive(scheduler_idle: Duration, drainer_idle: Duration, stale_after: Duration) -> bool {
    scheduler_idle <= stale_after && drainer_idle <= stale_after
}

/// What a reload changed.
struct Reloaded {
    started: Instant,
    added: usize,
    removed: usize,
    rows_written: usize,
}

/// A `sync_requests` row being worked on. The daemon knows it by a ticket
/// of its own, not by the row's id: a row deleted while it runs and another
/// inserted with the same id are two requests, each answered by its own
/// passes.
/// Writing `schedule_lag` fails: since when, when that was last logged,
/// and how many tries failed.
struct LagFailing {
    since_ms: i64,
    logged_ms: i64,
    attempts: u64,
}

#[derive(Clone)]
struct RequestState {
    row_id: i64,
    /// The `started_at` the daemon wrote when it took the row (to the
    /// millisecond): what tells it from a later row with the same id.
    taken_at: String,
    remaining: usize,
    /// (business id, the line `leadsync sync` prints for it).
    lines: Vec<(String, String)>,
    failed: usize,
    /// `sync --full --accept-missing`.
    accept_missing: bool,
    /// Its passes all ended, but writing its answer failed (a partner held
    /// the write lock past the busy timeout): the sweep writes it again.
    /// The ticket is kept until the answer is written, else the sweep
    /// would take the row for one this daemon never took.
    unwritten: bool,
    /// When the failure to write its answer was last logged (ms): the
    /// first one is, then one every [`HELD_WARN_EVERY_MS`], not one per
    /// sweep for an answer a partner's trigger refuses for ever.
    warned_ms: Option<i64>,
    /// Failed writes of its answer so far.
    failed_writes: u64,
}

/// How writing a request's answer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerWrite {
    /// Written (or the row is no longer the one taken): the ticket is gone.
    Done,
    /// SQLite gave up waiting for another connection's lock: the others
    /// would wait out the busy timeout too.
    Busy,
    /// Refused otherwise (a trigger, a read-only or full disk): this
    /// answer only, the others may still be written.
    Failed,
}

impl RequestState {
    /// The outcome and the lines to print, as a local `leadsync sync` prints them.
    fn render(mut self) -> (&'static str, String) {
        self.lines.sort();
        let n = self.lines.len();
        // One line per business, blanked as a local `sync` prints it: the
        // server's words in a failure (a detail of several lines) are kept
        // as sent in sync_runs.error, not here.
        let mut summary: Vec<String> = self
            .lines
            .into_iter()
            .map(|(_, l)| crate::terminal::blank(&l))
            .collect();
        if self.failed > 0 {
            summary.push(format!("{} of {n} businesses failed", self.failed));
        }
        let outcome = if self.failed > 0 { "error" } else { "ok" };
        (outcome, summary.join("\n"))
    }
}

struct Daemon {
    store: Store,
    auth: Arc<Auth>,
    client: RwLock<Arc<Client>>,
    config: RwLock<Arc<Config>>,
    /// The pass workers.
    passes: TaskTracker,
    stop: CancellationToken,
    /// Due passes, oldest first; never two of one business.
    queue: Mutex<SyncQueue>,
    /// Wakes the workers when the queue gets work.
    work: Notify,
    /// One timer per distinct schedule, not per business.
    schedules: Mutex<Schedules>,
    schedules_changed: Notify,
    /// `sync_requests` rows taken and not yet answered, by ticket (the
    /// `Origin::Request` of their passes).
    requests: Mutex<HashMap<i64, RequestState>>,
    /// The last ticket given to a taken request.
    last_ticket: AtomicI64,
    /// The backlog last written to `schedule_lag`, and when.
    lag_written: Mutex<Option<(Vec<requests::ScheduleLag>, i64)>>,
    /// Since when writing `schedule_lag` fails, while it does: logged when
    /// it starts, at most once a minute meanwhile, and when it ends.
    lag_failing: Mutex<Option<LagFailing>>,
    last_status_ms: AtomicI64,
    scheduler_beat: Arc<Heartbeat>,
    drain_beat: Arc<Heartbeat>,
    drainer: Arc<Drainer>,
    /// Where the daemon alert of a failed sync to disk stands.
    disk_alert: DiskAlert,
    /// When the last reload failed (cleared by one that succeeds): shown
    /// in `STATUS=`, since `systemctl reload` returns before it is read.
    reload_failed: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn client(&self) -> Arc<Client> {
        self.client
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, SyncQueue> {
        lock(&self.queue)
    }

    fn lock_schedules(&self) -> std::sync::MutexGuard<'_, Schedules> {
        lock(&self.schedules)
    }

    /// A worker: takes the oldest due pass, runs it, answers its requests.
    async fn worker(self: Arc<Self>) {
        loop {
            let job = loop {
                if self.stop.is_cancelled() {
                    return;
                }
                let notified = self.work.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(job) = self.lock_queue().pop() {
                    break job;
                }
                tokio::select! {
                    _ = notified => {}
                    _ = self.stop.cancelled() => return,
                }
            };
            let report = {
                let (me, j) = (self.clone(), job.clone());
                guarded(
                    &job.business_id,
                    job.kind,
                    async move { me.run_pass(&j).await },
                )
                .await
            };
            if report.panicked() {
                // Its sync_runs row would read `running` until the next start.
                let (id, why) = (job.business_id.clone(), report.summary());
                let closed = self
                    .store
                    .call(move |c| mirror::interrupt_running_of(c, &id, &crate::time::now(), &why))
                    .await;
                if let Err(e) = closed {
                    warn!(error = %format!("{e:#}"), "cannot close the panicked pass's run");
                }
            }
            self.lock_queue().finish(&job.business_id);
            self.work.notify_waiters();
            self.answer(
                &job.requests,
                &job.business_id,
                report.summary(),
                report.is_ok(),
            )
            .await;
            // STATUS= after passes, but not after each of thousands.
            if now_ms() - self.last_status_ms.load(Ordering::Relaxed) >= 2_000 {
                self.send_status().await;
            }
        }
    }

    async fn run_pass(&self, job: &Job) -> PassReport {
        let config = self.config();
        if config.business(&job.business_id).is_none_or(|b| !b.enabled) {
            return PassReport {
                business_id: job.business_id.clone(),
                kind: job.kind,
                outcome: PassOutcome::Skipped("no longer in the configuration (reloaded)".into()),
                elapsed: Duration::ZERO,
                note: None,
            };
        }
        let settings = PassSettings {
            page_size: config.file.poll.page_size,
            stop_after_unchanged_pages: config.file.poll.stop_after_unchanged_pages,
            // A request with --accept-missing lets this pass accept it.
            accept_missing: {
                let states = lock(&self.requests);
                job.requests
                    .iter()
                    .any(|id| states.get(id).is_some_and(|s| s.accept_missing))
            },
        };
        let report = sync_business(
            &self.store,
            &self.client(),
            &job.business_id,
            job.kind,
            settings,
            &self.stop,
        )
        .await;
        if !report.is_ok() {
            warn!("{}", report.summary());
        }
        // The conversations of the leads the pass found new or changed; a
        // failure here is logged and recorded, never fails the pass.
        let messages = crate::messages::MessageSettings::from_config(&config);
        if messages.sync && report.is_ok() {
            match crate::messages::poll_after_pass(
                &self.store,
                &self.client(),
                &job.business_id,
                messages,
                &self.stop,
            )
            .await
            {
                Ok(r) if !r.failed.is_empty() => {
                    warn!("{}", r.summary(&job.business_id))
                }
                Ok(_) => {}
                Err(e) => warn!(error = %format!("{e:#}"), "cannot poll messages"),
            }
        }
        report
    }

    /// Wants a pass of each business in `ids`.
    fn enqueue(
        &self,
        ids: &[String],
        kind: ScanKind,
        due_ms: i64,
        origin: Origin,
    ) -> (usize, Vec<String>) {
        let mut queued = 0;
        let mut skipped = Vec::new();
        {
            let mut queue = self.lock_queue();
            for id in ids {
                match queue.push(id, kind, due_ms, origin.clone()) {
                    Pushed::Skipped => skipped.push(id.clone()),
                    Pushed::Merged => {}
                    Pushed::Queued | Pushed::AfterRunning => queued += 1,
                }
            }
        }
        self.work.notify_waiters();
        (queued, skipped)
    }

    /// The timer: one per distinct schedule. Each occurrence queues its
    /// businesses, due at the occurrence's time. Wakes at least once a
    /// second (the scheduler's heartbeat for the watchdog).
    async fn timer(self: Arc<Self>) {
        loop {
            self.scheduler_beat.beat();
            let now = chrono::Utc::now();
            let (due, next) = {
                // Queued under the schedules' lock: a reload replaces the
                // schedules and retags the waiting passes under it too, so
                // passes of an occurrence of the old schedules are never
                // queued after the retag with a tag their business left.
                let mut schedules = self.lock_schedules();
                let due: Vec<(ScheduleKey, usize, usize, Vec<String>)> = schedules
                    .take_due(now)
                    .into_iter()
                    .filter_map(|(key, at)| {
                        let ids: Vec<String> = schedules
                            .groups
                            .get(&key)?
                            .businesses
                            .iter()
                            .cloned()
                            .collect();
                        let (queued, skipped) = self.enqueue(
                            &ids,
                            key.kind,
                            at.timestamp_millis(),
                            Origin::Schedule(key.clone()),
                        );
                        Some((key, ids.len(), queued, skipped))
                    })
                    .collect();
                (due, schedules.next_due())
            };
            for (key, n, queued, skipped) in due {
                let behind = n - queued - skipped.len();
                if !skipped.is_empty() {
                    if skipped.len() <= 20 {
                        info!(schedule = %key, businesses = ?skipped, "a pass of these businesses is still running; this tick is skipped for them");
                    } else {
                        info!(schedule = %key, skipped = skipped.len(), "passes still running; this tick is skipped for them");
                    }
                }
                if behind > 0 {
                    warn!(schedule = %key, behind, "passes from an earlier occurrence still wait: this schedule is behind (see `leadsync status`; `config check` shows the budget arithmetic)");
                }
            }
            self.write_lag().await;
            record_disk_failure(&self.store, &self.disk_alert).await;
            // No schedule (no business enabled): the second of the
            // heartbeat; with `Duration::ZERO` there, the timer spun every
            // 5 ms, and rewrote `schedule_lag` as often while writes failed.
            let wait = match next {
                None => Duration::from_secs(1),
                Some(n) => (n - chrono::Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .clamp(Duration::from_millis(5), Duration::from_secs(1)),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.schedules_changed.notified() => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Takes `sync_requests` rows other programs (and `leadsync sync`) insert.
    async fn take_requests(self: Arc<Self>) {
        let mut every = tokio::time::interval(REQUESTS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut looks = 0u32;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.stop.cancelled() => return,
            }
            if looks.is_multiple_of(FOREIGN_STARTED_EVERY) {
                self.refuse_foreign_started().await;
            }
            looks = looks.wrapping_add(1);
            let new = match self.store.call(|c| requests::new_requests(c)).await {
                Ok(new) => new,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot read sync_requests");
                    continue;
                }
            };
            for r in new {
                self.accept(r).await;
            }
        }
    }

    /// Refuses the requests that seem taken (`started_at` set, not finished)
    /// but that this daemon did not take: before, such a row stayed open
    /// until the next start, and whoever waited on it waited that long.
    /// Runs on the taker's task, so a request being taken (its row marked,
    /// then its ticket recorded) is never caught between the two; a request
    /// whose passes ended keeps its ticket until its answer is written.
    async fn refuse_foreign_started(&self) {
        // First the answers whose write failed: written, their tickets go.
        // In ticket order (the oldest request first).
        let mut unwritten: Vec<i64> = lock(&self.requests)
            .iter()
            .filter(|(_, s)| s.unwritten)
            .map(|(t, _)| *t)
            .collect();
        unwritten.sort_unstable();
        for ticket in unwritten {
            // The database is still locked: the others wait for the next
            // sweep rather than each wait out the busy timeout here. Any
            // other failure is this answer's own (a partner's trigger may
            // refuse that row for ever): the next ones are still tried.
            if self.write_answer(ticket).await == AnswerWrite::Busy {
                break;
            }
        }
        // A page at a time, paging on past this daemon's own rows, so that
        // thousands of them never hide a foreign one.
        let mut after = None;
        loop {
            let page = match self
                .store
                .call(move |c| requests::started_open(c, after, SWEEP_PAGE))
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot read sync_requests");
                    return;
                }
            };
            if page.is_empty() || self.stop.is_cancelled() {
                return;
            }
            let full = page.len() == SWEEP_PAGE;
            after = page.last().map_or(after, |r| Some(r.0));
            let ours: std::collections::HashSet<(i64, String)> = lock(&self.requests)
                .values()
                .map(|s| (s.row_id, s.taken_at.clone()))
                .collect();
            for (id, started_at) in page {
                let mine = matches!(&started_at, rusqlite::types::Value::Text(t)
                    if ours.contains(&(id, t.clone())));
                if mine {
                    continue;
                }
                let now = crate::time::now();
                match self
                    .store
                    .call(move |c| {
                        requests::refuse_started(c, id, &started_at, FOREIGN_STARTED, &now)
                    })
                    .await
                {
                    Ok(true) => warn!(
                        request = id,
                        error = FOREIGN_STARTED,
                        "sync request refused"
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(request = id, error = %format!("{e:#}"), "cannot record a refused sync request")
                    }
                }
            }
            if !full {
                return;
            }
        }
    }

    async fn accept(&self, r: requests::NewRequest) {
        let config = self.config();
        let kind = ScanKind::parse(&r.kind).unwrap_or(ScanKind::Head);
        let ids: Result<Vec<String>, String> = match &r.business_id {
            Some(id) => match config.business(id) {
                None => Err(format!(
                    "business {id} is not in the configuration the daemon runs with (added to \
                     the files since it started or was last reloaded? `systemctl reload leadsync`)"
                )),
                Some(b) if !b.enabled => {
                    Err(format!("business {id} is disabled (enabled = false)"))
                }
                Some(b) => Ok(vec![b.id.clone()]),
            },
            None => Ok(config
                .businesses
                .iter()
                .filter(|b| b.enabled)
                .map(|b| b.id.clone())
                .collect()),
        };
        let (id, now) = (r.id, crate::time::now());
        let ids = match ids {
            Err(e) => {
                warn!(request = id, error = %e, "sync request refused");
                let result = self
                    .store
                    .call(move |c| requests::finish(c, id, "refused", Some(&e), &e, &now))
                    .await;
                if let Err(e) = result {
                    warn!(request = id, error = %format!("{e:#}"), "cannot record a refused sync request");
                }
                return;
            }
            Ok(ids) if ids.is_empty() => {
                let line = "no enabled business is configured: nothing to sync";
                let _ = self
                    .store
                    .call(move |c| requests::finish(c, id, "ok", None, line, &now))
                    .await;
                return;
            }
            Ok(ids) => ids,
        };
        let taken_at = now.clone();
        match self
            .store
            .call(move |c| requests::mark_started(c, id, &now))
            .await
        {
            Ok(true) => {}
            Ok(false) => return, // withdrawn by its asker meanwhile
            Err(e) => {
                warn!(request = id, error = %format!("{e:#}"), "cannot take a sync request");
                return;
            }
        }
        info!(
            request = id,
            kind = kind.as_str(),
            businesses = ids.len(),
            "sync request taken"
        );
        let ticket = self.last_ticket.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.requests).insert(
            ticket,
            RequestState {
                row_id: id,
                taken_at,
                remaining: ids.len(),
                lines: Vec::new(),
                failed: 0,
                accept_missing: r.accept_missing,
                unwritten: false,
                warned_ms: None,
                failed_writes: 0,
            },
        );
        self.enqueue(&ids, kind, now_ms(), Origin::Request(ticket));
    }

    /// Records a pass's line in the requests (tickets) it answers; a
    /// request whose passes have all ended is finished.
    async fn answer(&self, tickets: &[i64], business_id: &str, line: String, ok: bool) {
        if tickets.is_empty() {
            return;
        }
        let mut done = Vec::new();
        {
            let mut states = lock(&self.requests);
            for id in tickets {
                let Some(st) = states.get_mut(id) else {
                    continue;
                };
                st.lines.push((business_id.to_string(), line.clone()));
                st.failed += usize::from(!ok);
                st.remaining = st.remaining.saturating_sub(1);
                if st.remaining == 0 {
                    done.push(*id);
                }
            }
        }
        for ticket in done {
            self.write_answer(ticket).await;
        }
    }

    /// Writes the answer of a request whose passes all ended. Its ticket
    /// goes only once the row is written (or is no longer the one taken):
    /// when the write fails the request is kept, marked, and the sweep
    /// writes it again.
    async fn write_answer(&self, ticket: i64) -> AnswerWrite {
        let Some(st) = lock(&self.requests).get(&ticket).cloned() else {
            return AnswerWrite::Done;
        };
        let failed_writes = st.failed_writes;
        let (id, taken_at) = (st.row_id, st.taken_at.clone());
        let (outcome, summary) = st.render();
        let now = crate::time::now();
        let err = (outcome == "error").then(|| "some passes failed".to_string());
        match self
            .store
            .call(move |c| {
                requests::finish_taken(c, id, &taken_at, outcome, err.as_deref(), &summary, &now)
            })
            .await
        {
            Ok(written) => {
                if !written {
                    info!(
                        request = id,
                        "a sync request ended, but its row was deleted, finished or replaced \
                         meanwhile: its answer is not recorded"
                    );
                } else if failed_writes > 0 {
                    info!(
                        request = id,
                        failed_writes, "the answer of a sync request is written at last"
                    );
                }
                lock(&self.requests).remove(&ticket);
                AnswerWrite::Done
            }
            Err(e) => {
                let now = now_ms();
                let log = {
                    let mut states = lock(&self.requests);
                    states.get_mut(&ticket).is_some_and(|st| {
                        st.unwritten = true;
                        st.failed_writes += 1;
                        let due = st.warned_ms.is_none_or(|at| now - at >= HELD_WARN_EVERY_MS);
                        if due {
                            st.warned_ms = Some(now);
                        }
                        due
                    })
                };
                if log {
                    warn!(
                        request = id,
                        failed_writes = failed_writes + 1,
                        error = %format!("{e:#}"),
                        "cannot record the end of a sync request; it is tried again every 10 s \
                         (logged again every 10 minutes while it fails), its asker waits"
                    );
                }
                if crate::store::is_busy_error(&e) {
                    AnswerWrite::Busy
                } else {
                    AnswerWrite::Failed
                }
            }
        }
    }

    /// At shutdown: requests still open end as interrupted, with the lines
    /// of the passes that did run.
    async fn close_requests(&self) {
        let open: Vec<(i64, RequestState)> = lock(&self.requests).drain().collect();
        for (_, st) in open {
            let (id, taken_at) = (st.row_id, st.taken_at.clone());
            // One whose passes all ended but whose answer is not written yet
            // gets that answer.
            let ended = st.remaining == 0;
            let (outcome, summary) = st.render();
            let (outcome, err) = if ended {
                (
                    outcome,
                    (outcome == "error").then_some("some passes failed"),
                )
            } else {
                (
                    "error",
                    Some("interrupted: leadsync stopped before every pass of this request ran"),
                )
            };
            let now = crate::time::now();
            let _ = self
                .store
                .call(move |c| {
                    requests::finish_taken(c, id, &taken_at, outcome, err, &summary, &now)
                })
                .await;
        }
    }

    /// A pass for each enabled business at start (or when added by a reload):
    /// a full scan when it never had one, else a head scan.
    async fn queue_initial_passes(self: &Arc<Self>, only: Option<&[String]>) {
        let never = self
            .store
            .call(|c| mirror::never_fully_synced(c))
            .await
            .unwrap_or_default();
        let only: Option<std::collections::HashSet<&String>> = only.map(|o| o.iter().collect());
        let config = self.config();
        let (mut full, mut head) = (Vec::new(), Vec::new());
        for b in config.businesses.iter().filter(|b| b.enabled) {
            if only.as_ref().is_some_and(|o| !o.contains(&b.id)) {
                continue;
            }
            if never.contains(&b.id) {
                full.push(b.id.clone());
            } else {
                head.push(b.id.clone());
            }
        }
        let now = now_ms();
        self.enqueue(&full, ScanKind::Full, now, Origin::Initial);
        self.enqueue(&head, ScanKind::Head, now, Origin::Initial);
    }

    fn spawn_drainer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let drainer = self.drainer.clone();
        tokio::spawn(drainer.run(self.stop.clone(), self.drain_beat.clone()))
    }

    /// Applies a reloaded configuration without a restart, touching only
    /// the businesses that changed (their schedule entries, their rows in
    /// `businesses`, their queued passes). Everything that can fail is
    /// prepared first, so a failure leaves the old configuration in place.
    async fn apply(self: &Arc<Self>, new: Config) -> Result<Reloaded> {
        let started = Instant::now();
        new.require_client_secret()?;
        let old = self.config();
        let mut new = new;
        for (what, changed) in [
            ("database", new.database() != old.database()),
            ("webhooks", new.webhooks != old.webhooks),
            (
                "oauth.token_store",
                new.file.oauth.token_store != old.file.oauth.token_store,
            ),
            (
                "daemon.sync_concurrency",
                new.file.daemon.sync_concurrency != old.file.daemon.sync_concurrency,
            ),
            ("[admin]", new.file.admin != old.file.admin),
        ] {
            if changed {
                warn!(
                    "`{what}` changed: that takes a restart; keeping the current value until then"
                );
            }
        }
        new.file.database = old.file.database.clone();
        new.webhooks = old.webhooks.clone();
        new.file.webhooks = old.file.webhooks.clone();
        new.file.oauth.token_store = old.file.oauth.token_store.clone();
        new.file.daemon.sync_concurrency = old.file.daemon.sync_concurrency;
        new.file.admin = old.file.admin.clone();
        new.admin_listen = old.admin_listen;
        let enabled = |c: &Config, id: &str| c.business(id).is_some_and(|b| b.enabled);
        let added: Vec<String> = new
            .businesses
            .iter()
            .filter(|b| b.enabled && !enabled(&old, &b.id))
            .map(|b| b.id.clone())
            .collect();
        let gone: Vec<String> = old
            .businesses
            .iter()
            .filter(|b| b.enabled && !enabled(&new, &b.id))
            .map(|b| b.id.clone())
            .collect();
        let now = chrono::Utc::now();
        let mut schedules = self.lock_schedules().clone();
        crate::schedule::apply_diff(&mut schedules, &old, &new, now)
            .map_err(|e| anyhow::anyhow!("cannot schedule: {e}"))?;
        let client = Arc::new(Client::with_budget(
            ClientSettings::from_config(&new),
            self.auth.clone(),
            self.client().budget().clone(),
        )?);
        // A daemon started with no OAuth business has no token store open:
        // the reload that adds the first one opens it (the configured path,
        // which only a restart changes), before anything is applied.
        let grants = if new.uses_oauth() && !self.auth.has_grant_store() {
            let path = new.file.oauth.token_store.clone();
            let store = tokio::task::spawn_blocking(move || TokenStore::open(&path))
                .await
                .map_err(|e| anyhow::anyhow!("cannot open the token store: {e}"))??;
            Some(Arc::new(StoreGrants(store)))
        } else {
            None
        };
        let new = Arc::new(new);
        let rows_written = {
            let new = new.clone();
            self.store
                .call(move |c| mirror::upsert_businesses(c, &new.businesses))
                .await?
        };

        if let Some(grants) = grants {
            info!("the first OAuth business was added: the token store is open now");
            self.auth.set_grant_store(grants);
        }
        self.auth.reconfigure(&new);
        // The budget is shared by everything in flight: it is kept, at the new rate.
        client
            .budget()
            .set_rate(new.file.api.max_requests_per_second);
        if let Ok(mut c) = self.client.write() {
            *c = client.clone();
        }
        self.drainer
            .update(DrainSettings::from_config(&new), client);
        if let Ok(mut c) = self.config.write() {
            *c = new;
        }
        {
            // The timer may have moved on since the copy was taken: keep its
            // next occurrences, so no occurrence fires twice.
            let mut live = self.lock_schedules();
            for (key, g) in schedules.groups.iter_mut() {
                if let Some(current) = live.groups.get(key) {
                    g.next = current.next;
                }
            }
            // Passes queued under a schedule their business left count
            // in the lag of the one it is in now.
            self.lock_queue().retag(&schedules);
            *live = schedules;
        }
        self.schedules_changed.notify_one();
        for id in &gone {
            let orphans = self.lock_queue().remove(id);
            for request in orphans {
                self.answer(
                    &[request],
                    id,
                    format!("{id}: SKIPPED — removed from the configuration by a reload"),
                    false,
                )
                .await;
            }
        }
        self.queue_initial_passes(Some(&added)).await;
        Ok(Reloaded {
            started,
            added: added.len(),
            removed: gone.len(),
            rows_written,
        })
    }

    /// Writes each schedule's backlog to `schedule_lag` when it changed (and
    /// at least once a minute, so `status` can tell a live daemon's figures).
    /// Called by the timer about once a second; writes nothing while idle,
    /// except while the store's writes fail for want of storage: then it
    /// writes each time until one lands, so that the failure (`/healthz`,
    /// `/readyz`) is cleared once writes have worked for its quiet period
    /// ([`crate::store::WriteWatch`]) even with no business to sync and no
    /// other write to make (the table rewritten empty still writes a page).
    /// A failure to write it is logged when it starts, at most once a
    /// minute while it lasts, and when it ends.
    async fn write_lag(&self) {
        let rows: Vec<requests::ScheduleLag> = {
            let lag = self.lock_queue().lag();
            let schedules = self.lock_schedules();
            schedules
                .groups
                .iter()
                .map(|(key, g)| {
                    let (waiting, oldest) = lag.get(key).copied().unwrap_or((0, 0));
                    requests::ScheduleLag {
                        kind: key.kind.as_str().to_string(),
                        schedule: key.expr.clone(),
                        businesses: g.businesses.len() as i64,
                        waiting: waiting as i64,
                        oldest_due_at: (waiting > 0)
                            .then(|| chrono::DateTime::from_timestamp_millis(oldest))
                            .flatten()
                            .map(crate::time::fmt),
                        updated_at: String::new(),
                    }
                })
                .collect()
        };
        let now = now_ms();
        {
            let written = lock(&self.lag_written);
            if let Some((last, at)) = written.as_ref()
                && *last == rows
                && now - at < 60_000
                && !self.store.write_watch().failing()
            {
                return;
            }
        }
        let stamp = crate::time::now();
        let stamped: Vec<requests::ScheduleLag> = rows
            .iter()
            .cloned()
            .map(|mut r| {
                r.updated_at = stamp.clone();
                r
            })
            .collect();
        match self
            .store
            .call(move |c| requests::write_lag(c, &stamped))
            .await
        {
            Ok(()) => {
                *lock(&self.lag_written) = Some((rows, now));
                if let Some(f) = lock(&self.lag_failing).take() {
                    info!(
                        failed_for_secs = (now - f.since_ms) / 1000,
                        attempts = f.attempts,
                        "the schedules' lag is recorded again"
                    );
                }
            }
            Err(e) => {
                let mut failing = lock(&self.lag_failing);
                match failing.as_mut() {
                    None => {
                        warn!(error = %format!("{e:#}"), "cannot record the schedules' lag (tried again every second; logged again at most once a minute while it fails)");
                        *failing = Some(LagFailing {
                            since_ms: now,
                            logged_ms: now,
                            attempts: 1,
                        });
                    }
                    Some(f) => {
                        f.attempts += 1;
                        if now - f.logged_ms >= 60_000 {
                            f.logged_ms = now;
                            warn!(
                                error = %format!("{e:#}"),
                                failing_for_secs = (now - f.since_ms) / 1000,
                                attempts = f.attempts,
                                "still cannot record the schedules' lag"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Records how a reload ended and shows it in `STATUS=` at once.
    async fn reload_outcome(&self, ok: bool) {
        if let Ok(mut f) = self.reload_failed.lock() {
            *f = (!ok).then(|| {
                chrono::Utc::now()
                    .format("%Y-%m-%d %H:%M:%S UTC")
                    .to_string()
            });
        }
        self.send_status().await;
    }

    /// The one-line summary systemd shows (`STATUS=`).
    async fn send_status(&self) {
        self.last_status_ms.store(now_ms(), Ordering::Relaxed);
        let (waiting, oldest) = {
            let q = self.lock_queue();
            (q.waiting(), q.oldest_due_ms())
        };
        let backlog = match oldest {
            Some(due) if waiting > 0 => format!(
                "; {waiting} passes waiting, oldest due {}s ago",
                (now_ms() - due).max(0) / 1000
            ),
            _ => String::new(),
        };
        let line = self
            .store
            .call(|c| {
                let leads: i64 =
                    c.query_row("SELECT count(*) FROM negotiations", [], |r| r.get(0))?;
                let last: Option<String> = c.query_row(
                    "SELECT max(last_sync_finished_at) FROM businesses",
                    [],
                    |r| r.get(0),
                )?;
                let reauth: i64 = c.query_row(
                    "SELECT count(*) FROM businesses WHERE needs_reauth = 1 AND configured = 1",
                    [],
                    |r| r.get(0),
                )?;
                let counts = outbox::counts(c)?;
                let replies = outbox::counts_of(c, outbox::Kind::Message)?;
                Ok((leads, last, reauth, counts, replies))
            })
            .await;
        // Requests that ended but whose answer cannot be written: their
        // askers (`leadsync sync`) wait. Kept when the counts cannot be read
        // (the same database trouble is the likely cause).
        let unwritten = lock(&self.requests)
            .values()
            .filter(|s| s.unwritten)
            .count();
        let line = match line {
            Ok((leads, last, reauth, counts, replies)) => {
                let now = chrono::Utc::now();
                let last = last
                    .and_then(|t| crate::time::parse(&t))
                    .map(|t| format!("last sync {} ago", crate::time::age(t, now)))
                    .unwrap_or_else(|| "no sync yet".into());
                let reauth = if reauth > 0 {
                    format!("; {reauth} business(es) need re-authorization")
                } else {
                    String::new()
                };
                // Replies only once there are any: most installations send none.
                let replies = if replies == outbox::Counts::default() {
                    String::new()
                } else {
                    format!(
                        "; replies: {} pending, {} dead",
                        replies.pending + replies.sending,
                        replies.dead
                    )
                };
                format!(
                    "{leads} leads, {last}{backlog}; outbox: {} pending, {} dead{replies}{reauth}",
                    counts.pending + counts.sending,
                    counts.dead
                )
            }
            Err(e) => format!("cannot read the database: {e:#}"),
        };
        let reload_failed = self.reload_failed.lock().ok().and_then(|f| f.clone());
        // `[webhooks]` is the running receiver's (a reload keeps it).
        let refused = self
            .config()
            .webhooks
            .as_ref()
            .is_some_and(|w| w.receiver_problem().is_some());
        let line = status_line(
            line,
            reload_failed.as_deref(),
            refused,
            self.store.durable_sync_failure().is_some(),
            unwritten,
        );
        notify(&[NotifyState::Status(&line)]);
    }

    /// Prunes the logs shortly after the start, then hourly, with the
    /// retention of the configuration in force (a reload applies at the
    /// next run).
    async fn prune(self: Arc<Self>) {
        let mut wait = PRUNE_FIRST_AFTER;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stop.cancelled() => return,
            }
            wait = PRUNE_EVERY;
            let kept = self.config().file.retention.clone();
            let horizons = retention::Horizons::at(
                chrono::Utc::now(),
                kept.keep_days,
                kept.webhook_events_keep_days,
            );
            if horizons == retention::Horizons::default() {
                continue;
            }
            let started = Instant::now();
            match prune_logs(&self.store, &horizons, &self.stop).await {
                Ok((pruned, longest)) if pruned.total() > 0 => info!(
                    before = horizons.logs.as_deref().unwrap_or("-"),
                    webhook_events_before = horizons.webhook_events.as_deref().unwrap_or("-"),
                    sync_runs = pruned.sync_runs,
                    webhook_events = pruned.webhook_events,
                    outbox_attempts = pruned.outbox_attempts,
                    message_outbox_attempts = pruned.message_outbox_attempts,
                    sync_requests = pruned.sync_requests,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    longest_batch_ms = longest.as_millis() as u64,
                    "pruned log rows older than their retention (retention.keep_days, retention.webhook_events_keep_days)"
                ),
                Ok(_) => {}
                Err(e) => warn!(
                    error = %format!("{e:#}"),
                    "cannot prune old log rows; trying again at the next run"
                ),
            }
        }
    }

    /// Refreshes STATUS and pings the watchdog while the scheduler and the
    /// drainer both show progress (a stuck loop lets systemd restart us).
    async fn monitor(self: Arc<Self>) {
        let watchdog = sd_notify::watchdog_enabled();
        let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let stale_after = watchdog.map_or(Duration::MAX, |w| w + Duration::from_secs(2));
        let mut since_status = Duration::ZERO;
        loop {
            tokio::time::sleep(tick).await;
            if watchdog.is_some() {
                let (sched, drain) = (self.scheduler_beat.idle(), self.drain_beat.idle());
                if loops_alive(sched, drain, stale_after) {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    error!(
                        scheduler_idle_ms = sched.as_millis() as u64,
                        drainer_idle_ms = drain.as_millis() as u64,
                        "a work loop is stuck; withholding the watchdog ping so systemd restarts leadsync"
                    );
                }
            }
            since_status += tick;
            if since_status >= STATUS_EVERY {
                since_status = Duration::ZERO;
                self.send_status().await;
            }
        }
    }
}

/// At a start, what the previous process left: its daemon alerts (they were
/// of its process: a failed sync to disk is trusted again after a restart)
/// and the sync requests it had taken; returns how many of those it closed.
async fn close_previous_process(store: &Store) -> Result<usize> {
    let now = crate::time::now();
    store
        .call(move |c| {
            mirror::clear_daemon_alerts(c)?;
            requests::interrupt_started(
                c,
                "interrupted: leadsync stopped before this request finished",
                &now,
            )
        })
        .await
}

/// What a reloaded `new` `[webhooks]` with credentials no delivery can carry
/// means, given the running one (`running`: a reload keeps it).
fn reload_auth_consequence(
    running: Option<&crate::config::Webhooks>,
    new: &crate::config::Webhooks,
) -> &'static str {
    match running.filter(|r| r.listen.is_some()) {
        Some(r) if r.receiver_problem().is_some() => {
            "the running receiver was started with a value that cannot be sent either and \
             refuses every webhook delivery: fix it and restart leadsync"
        }
        Some(_) => {
            "the running receiver keeps its value (a change of [webhooks] takes a restart), \
             but a restart with this one would refuse every webhook delivery"
        }
        None if new.listen.is_some() => {
            "a restart with it would start a receiver that refuses every webhook delivery"
        }
        None => {
            "no receiver runs with it (webhooks.listen is not set), but `webhooks register` \
                 refuses it"
        }
    }
}

/// The daemon alert key of webhook credentials no delivery can carry.
const WEBHOOKS_AUTH_ALERT: &str = "webhooks-auth";

/// The daemon alert key of a failed sync of the database to disk.
const DISK_ALERT: &str = "disk-sync";

/// Where the alert of a failed sync to disk stands: recorded in the mirror
/// for `status`, or a failed attempt already logged.
#[derive(Debug, Default)]
struct DiskAlert {
    recorded: std::sync::atomic::AtomicBool,
    warned: std::sync::atomic::AtomicBool,
}

/// Records, once, a failed sync of the database to disk as a daemon alert
/// in the mirror, where `status` shows it (the next start clears it); true
/// once it is recorded. Called about once a second by the scheduler loop.
async fn record_disk_failure(store: &Store, alert: &DiskAlert) -> bool {
    if alert.recorded.load(Ordering::Relaxed) {
        return true;
    }
    let Some(why) = store.durable_sync_failure() else {
        return false;
    };
    let message = crate::serve::admin::disk_failure_message(&why);
    let now = crate::time::now();
    let written = store
        .call(move |c| mirror::set_daemon_alert(c, DISK_ALERT, Some(&message), &now))
        .await;
    match written {
        Ok(()) => {
            alert.recorded.store(true, Ordering::Relaxed);
            true
        }
        Err(e) => {
            // The disk may refuse this write too: said once, tried each second.
            if !alert.warned.swap(true, Ordering::Relaxed) {
                warn!(error = %format!("{e:#}"), "cannot record the failed sync to disk for `leadsync status`; /healthz and /metrics still show it");
            }
            false
        }
    }
}

/// Prunes every log of rows dated before `before`, one batch per job of
/// the database thread (a webhook delivery goes ahead of the next one),
/// until done or `stop`. Returns the rows deleted and the longest batch.
async fn prune_logs(
    store: &Store,
    horizons: &retention::Horizons,
    stop: &CancellationToken,
) -> Result<(retention::Pruned, Duration)> {
    let mut pruned = retention::Pruned::default();
    let mut longest = Duration::ZERO;
    for log in retention::Log::ALL {
        let Some(before) = horizons.of(log) else {
            continue;
        };
        let mut after = i64::MIN;
        loop {
            if stop.is_cancelled() {
                return Ok((pruned, longest));
            }
            let before = before.to_string();
            let stepped = store
                .call(move |c| {
                    let started = Instant::now();
                    let step = retention::prune_step(c, log, &before, after, retention::BATCH)?;
                    Ok((step, started.elapsed()))
                })
                .await;
            // One log that cannot be pruned (a partner's trigger or foreign
            // key on it, say) does not keep the others from being pruned.
            let (step, took) = match stepped {
                Ok(done) => done,
                Err(e) => {
                    warn!(
                        table = log.table(),
                        error = %format!("{e:#}"),
                        "cannot prune old rows of this table; the other tables go on"
                    );
                    break;
                }
            };
            pruned.add(log, step.deleted);
            longest = longest.max(took);
            match step.next {
                Some(next) => after = next,
                None => break,
            }
            tokio::time::sleep(PRUNE_PAUSE).await;
        }
    }
    Ok((pruned, longest))
}

/// Runs one pass as its own task, so that a panic inside it fails that pass
/// instead of killing the worker: a dead worker never calls
/// `SyncQueue::finish`, and its business would stay "running" in the queue,
/// never synced again until a restart.
async fn guarded<F>(business_id: &str, kind: ScanKind, pass: F) -> PassReport
where
    F: std::future::Future<Output = PassReport> + Send + 'static,
{
    let started = Instant::now();
    match tokio::spawn(pass).await {
        Ok(report) => report,
        Err(e) => {
            let why = if e.is_panic() {
                let payload = e.into_panic();
                let what = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                format!("{PANICKED}: {what}")
            } else {
                format!("{PANICKED}: cancelled")
            };
            error!(business_id, "{why}");
            PassReport {
                business_id: business_id.to_string(),
                kind,
                outcome: PassOutcome::Failed(mirror::RunStats::default(), why),
                elapsed: started.elapsed(),
                note: None,
            }
        }
    }
}

/// The `STATUS=` line: `base` behind its alerts, the most serious first,
/// since `systemctl status` cuts a long line (README: it begins with
/// `DATABASE NOT SYNCED TO DISK` when the disk sync failed).
fn status_line(
    base: String,
    reload_failed: Option<&str>,
    webhook_refused: bool,
    disk_failed: bool,
    unwritten_answers: usize,
) -> String {
    // The least serious alert, so the innermost prefix.
    let line = match unwritten_answers {
        0 => base,
        1 => format!("1 sync request answer not written (see the log); {base}"),
        n => format!("{n} sync request answers not written (see the log); {base}"),
    };
    let line = match reload_failed {
        Some(at) => format!(
            "configuration reload failed at {at}, running on the previous configuration (see the log); {line}"
        ),
        None => line,
    };
    let line = if webhook_refused {
        format!(
            "WEBHOOK DELIVERIES REFUSED: the webhook header value cannot be sent (see leadsync status); {line}"
        )
    } else {
        line
    };
    // First (the outermost prefix), where `systemctl status` cuts a long
    // line.
    if disk_failed {
        format!(
            "DATABASE NOT SYNCED TO DISK: webhook deliveries refused until a restart (see leadsync status); {line}"
        )
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `systemctl status` cuts a long `STATUS=` line, so the alerts come
    /// most serious first: a database not synced to disk (every webhook
    /// delivery refused, data at risk) before a refused webhook header
    /// value, before a failed reload, before sync request answers not
    /// written, before the counts.
    #[test]
    fn the_status_line_puts_the_most_serious_alert_first() {
        let line = status_line(
            "3 leads, no sync yet".into(),
            Some("2026-11-29T12:00:00Z"),
            true,
            true,
            2,
        );
        let unwritten = line
            .find("2 sync request answers not written (see the log)")
            .unwrap();
        let disk = line.find("DATABASE NOT SYNCED TO DISK").unwrap();
        let webhook = line.find("WEBHOOK DELIVERIES REFUSED").unwrap();
        let reload = line
            .find("configuration reload failed at 2026-11-29T12:00:00Z")
            .unwrap();
        let base = line.find("3 leads, no sync yet").unwrap();
        assert_eq!(disk, 0, "{line}");
        assert!(
            disk < webhook && webhook < reload && reload < unwritten && unwritten < base,
            "{line}"
        );
        // Each alert alone still leads the line; none leaves the base out.
        assert_eq!(
            status_line("b".into(), None, false, false, 0),
            "b",
            "no alert, no prefix"
        );
        for (reload, refused, disk, unwritten, head) in [
            (
                Some("t"),
                false,
                false,
                0,
                "configuration reload failed at t",
            ),
            (None, true, false, 0, "WEBHOOK DELIVERIES REFUSED"),
            (None, false, true, 0, "DATABASE NOT SYNCED TO DISK"),
            (Some("t"), true, false, 0, "WEBHOOK DELIVERIES REFUSED"),
            (None, false, false, 1, "1 sync request answer not written"),
            (
                Some("t"),
                false,
                false,
                3,
                "configuration reload failed at t",
            ),
        ] {
            let line = status_line("b".into(), reload, refused, disk, unwritten);
            assert!(line.starts_with(head) && line.ends_with("; b"), "{line}");
        }
    }

    /// A failed sync to disk makes every later webhook delivery 503 until
    /// a restart: `status` must say so (not only the log), as an alert of
    /// the daemon, not of OAuth, and the next start forgets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_disk_sync_is_a_status_alert_until_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("m.db");
        let conf = dir.path().join("leadsync.toml");
        std::fs::write(
            &conf,
            format!("database = {:?}\n", db.display().to_string()),
        )
        .unwrap();
        let config = ConfigSource {
            files: vec![conf],
            ..Default::default()
        }
        .load()
        .unwrap();
        let store = Store::open(&db).unwrap();
        let alert = DiskAlert::default();
        assert!(
            !record_disk_failure(&store, &alert).await,
            "nothing failed yet"
        );
        store.on_wal_sync_result(|| Err(std::io::Error::other("EIO (injected)")));
        let now = crate::time::now();
        store
            .call(move |c| {
                mirror::set_auth_alert(c, "oauth-client", Some("OAuth client refused"), &now)
            })
            .await
            .unwrap();
        let delivery = store
            .call_urgent_durable(|c| Ok(c.execute("DELETE FROM sync_requests", [])?))
            .await;
        assert!(delivery.is_err(), "the injected sync failure did not fail");
        assert!(record_disk_failure(&store, &alert).await);
        let report = |store: &Store| {
            let config = config.clone();
            let store = store.clone();
            async move {
                store
                    .call(move |c| crate::status::report(c, &config))
                    .await
                    .unwrap()
            }
        };
        let r = report(&store).await;
        assert_eq!(r.daemon_alerts.len(), 1, "{:?}", r.daemon_alerts);
        assert!(r.daemon_alerts[0].message.contains("EIO (injected)"));
        assert!(r.daemon_alerts[0].message.contains("503"));
        assert_eq!(
            r.auth_alerts.len(),
            1,
            "the OAuth alert alone: {:?}",
            r.auth_alerts
        );
        let text = crate::status::render_text(&r);
        let daemon_at = text.find("daemon:").expect(&text);
        let oauth_at = text.find("OAuth:").expect(&text);
        assert!(daemon_at < oauth_at, "{text}");
        assert!(
            text[daemon_at..oauth_at].contains("could not be synced to disk"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert!(
            json["daemon_alerts"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("synced to disk")),
            "{json}"
        );
        close_previous_process(&store).await.unwrap();
        let r = report(&store).await;
        assert!(r.daemon_alerts.is_empty(), "{:?}", r.daemon_alerts);
        assert_eq!(r.auth_alerts.len(), 1, "OAuth alerts outlive a restart");
    }

    #[tokio::test]
    async fn a_panicking_pass_fails_alone_and_the_worker_goes_on() {
        let report = guarded("b1", ScanKind::Head, async {
            panic!("boom");
        })
        .await;
        assert!(!report.is_ok());
        assert!(report.panicked());
        assert!(report.summary().contains("boom"), "{}", report.summary());
        let ok = guarded("b1", ScanKind::Full, async {
            PassReport {
                business_id: "b1".into(),
                kind: ScanKind::Full,
                outcome: PassOutcome::Ok(mirror::RunStats::default()),
                elapsed: Duration::ZERO,
                note: None,
            }
        })
        .await;
        assert!(ok.is_ok() && !ok.panicked());
    }

    #[tokio::test]
    async fn the_logs_are_pruned_in_batches_through_the_store_until_done_or_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let old = retention::BATCH * 2 + 3;
        store
            .call(move |c| {
                let tx = c.transaction()?;
                for i in 0..=old {
                    let at = if i < old {
                        "2026-01-01T00:00:00.000Z"
                    } else {
                        "2026-03-01T00:00:00.000Z"
                    };
                    tx.execute(
                        "INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                         VALUES (?1, 'ReviewCreatedV4', '{}', 'ignored')",
                        [at],
                    )?;
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .unwrap();
        // The default retention keeps every delivery (SPEC §8), however old.
        let defaults = crate::config::RetentionConfig::default();
        let now = chrono::DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let by_default =
            retention::Horizons::at(now, defaults.keep_days, defaults.webhook_events_keep_days);
        assert!(by_default.logs.is_some());
        let (pruned, _) = prune_logs(&store, &by_default, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(pruned.webhook_events, 0);
        let horizons = retention::Horizons {
            logs: None,
            webhook_events: Some("2026-02-01T00:00:00.000Z".into()),
        };
        // A stop asked for first: nothing is pruned.
        let stopped = CancellationToken::new();
        stopped.cancel();
        let (pruned, _) = prune_logs(&store, &horizons, &stopped).await.unwrap();
        assert_eq!(pruned.total(), 0);
        let (pruned, longest) = prune_logs(&store, &horizons, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(pruned.webhook_events, old);
        assert!(longest > Duration::ZERO);
        let left: i64 = store
            .call(|c| Ok(c.query_row("SELECT count(*) FROM webhook_events", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_pruned_leaves_the_others_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        store
            .call(|c| {
                c.execute_batch(
                    "INSERT INTO sync_runs (business_id, kind, started_at, outcome)
                     VALUES ('1', 'head', '2026-01-01T00:00:00.000Z', 'ok'),
                            ('1', 'head', '2026-01-02T00:00:00.000Z', 'ok');
                     INSERT INTO webhook_events (received_at, event_type, payload, outcome)
                     VALUES ('2026-01-01T00:00:00.000Z', 'ReviewCreatedV4', '{}', 'ignored'),
                            ('2026-01-01T00:00:00.000Z', 'ReviewCreatedV4', '{}', 'ignored');
                     CREATE TRIGGER partner_keeps_runs BEFORE DELETE ON sync_runs
                     BEGIN SELECT RAISE(ABORT, 'the partner keeps its runs'); END;",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        let before = Some("2026-02-01T00:00:00.000Z".to_string());
        let horizons = retention::Horizons {
            logs: before.clone(),
            webhook_events: before,
        };
        let (pruned, _) = prune_logs(&store, &horizons, &CancellationToken::new())
            .await
            .unwrap();
        // sync_runs (pruned first) refused; webhook_events pruned after it
        // (its newest row stays, so that its ids never go back).
        assert_eq!((pruned.sync_runs, pruned.webhook_events), (0, 1));
    }

    #[test]
    fn a_stale_loop_withholds_the_watchdog() {
        let stale = Duration::from_secs(3);
        let ms = Duration::from_millis;
        assert!(loops_alive(ms(1_000), ms(500), stale));
        assert!(!loops_alive(ms(4_000), ms(500), stale), "scheduler stuck");
        assert!(!loops_alive(ms(100), ms(9_000), stale), "drainer stuck");
    }
}
