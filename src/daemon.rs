//! `leadsync run`: the scheduler and the drainer in one process, the systemd
//! notify protocol (READY, STATUS, WATCHDOG, STOPPING), configuration reload
//! and a bounded graceful shutdown.

use crate::app::Session;
use crate::config::{Config, ConfigSource};
use crate::drain::{DrainSettings, Drainer};
use crate::store::{Store, mirror, outbox};
use crate::sync::{PassSettings, ScanKind, sync_business};
use crate::thumbtack::{Auth, Client, ClientSettings};
use anyhow::{Context, Result};
use sd_notify::NotifyState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How often the one-line `STATUS=` summary is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What can happen to a running daemon from outside.
#[derive(Clone, Default)]
pub struct Controls {
    /// Cancel to stop (SIGTERM, SIGINT).
    pub shutdown: CancellationToken,
    /// Notify to re-read the configuration (SIGHUP).
    pub reload: Arc<Notify>,
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
    let session = Session::open(config).await?;
    let daemon = Arc::new(Daemon {
        store: session.store.clone(),
        auth: session.auth.clone(),
        client: RwLock::new(session.client.clone()),
        config: RwLock::new(session.config.clone()),
        guards: Mutex::new(HashMap::new()),
        passes: TaskTracker::new(),
        stop: controls.shutdown.child_token(),
        sync_slots: Arc::new(Semaphore::new(session.config.file.daemon.sync_concurrency)),
        scheduler_beat: Arc::new(AtomicI64::new(now_ms())),
        drain_beat: Arc::new(AtomicI64::new(now_ms())),
        drainer: Arc::new(Drainer::new(
            session.store.clone(),
            session.client.clone(),
            DrainSettings::from_config(&session.config),
        )),
    });
    // The receiver is bound before READY=1: a port that is taken fails the start.
    let receiver = match session.config.webhooks.as_ref() {
        Some(w) => match w.listen {
            Some(addr) => {
                let listener = crate::serve::bind(addr, "webhooks.listen").await?;
                let router = crate::serve::webhooks::router(w, session.store.clone(), None);
                let options = crate::serve::ServeOptions {
                    header_read_timeout: w.read_timeout,
                    shutdown_grace: Duration::from_secs(
                        session.config.file.daemon.shutdown_timeout_secs,
                    ),
                    ..Default::default()
                };
                info!(listen = %listener.local_addr().unwrap_or(addr), path = %w.path, "webhook receiver listening");
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
    notify(&[NotifyState::Ready]);
    daemon.send_status().await;
    info!(
        database = %session.store.path().display(),
        businesses = session.config.businesses.len(),
        "leadsync started"
    );

    let mut scheduler = daemon.build_scheduler(&session.config).await?;
    scheduler
        .start()
        .await
        .context("cannot start the scheduler")?;
    daemon.start_initial_passes(None).await;
    let drainer = daemon.spawn_drainer();
    let monitor = tokio::spawn(daemon.clone().monitor());

    loop {
        tokio::select! {
            _ = controls.shutdown.cancelled() => break,
            _ = controls.reload.notified() => {
                let Some(source) = &source else {
                    warn!("reload requested, but this daemon was not started from configuration files");
                    continue;
                };
                match source.load() {
                    Err(e) => error!(error = %e, "configuration reload failed; keeping the previous configuration"),
                    Ok(new) => match daemon.apply(new, &mut scheduler).await {
                        Ok(()) => info!("configuration reloaded"),
                        Err(e) => error!(error = %format!("{e:#}"), "configuration reload failed; keeping the previous configuration"),
                    },
                }
            }
        }
    }

    // Shutdown: no new work; in-flight requests finish within the bound.
    notify(&[NotifyState::Stopping]);
    info!("stopping: finishing in-flight work");
    daemon.stop.cancel();
    let _ = scheduler.shutdown().await;
    // One bound for everything in flight: the drainer gives up on its sends
    // after `grace` (their rows are resent at the next start), and passes
    // still running then are recorded as interrupted.
    let grace = Duration::from_secs(daemon.config().file.daemon.shutdown_timeout_secs);
    daemon.passes.close();
    let in_flight = async {
        let _ = drainer.await;
        daemon.passes.wait().await;
        if let Some(r) = receiver {
            let _ = r.await;
        }
    };
    if tokio::time::timeout(grace + Duration::from_millis(500), in_flight)
        .await
        .is_err()
    {
        warn!(
            "in-flight work did not finish in time; unfinished passes are recorded as interrupted"
        );
    }
    // A refresh in flight finishes and its rotated token is stored before we exit.
    daemon
        .auth
        .settle(crate::cli::settle_bound(&daemon.config()))
        .await;
    monitor.abort();
    let now = crate::time::now();
    if let Err(e) = daemon
        .store
        .call(move |c| mirror::interrupt_running(c, &now, "interrupted by shutdown"))
        .await
    {
        warn!(error = %format!("{e:#}"), "cannot record interrupted passes");
    }
    info!("stopped");
    drop(session);
    Ok(())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Sends states to the service manager (`NOTIFY_SOCKET`, a path or an
/// abstract `@name`); a no-op when not run by one.
fn notify(state: &[NotifyState]) {
    let result = match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(()),
        Some(s) if s.as_encoded_bytes().first() == Some(&b'@') => {
            notify_abstract(&s.as_encoded_bytes()[1..], state)
        }
        Some(_) => sd_notify::notify(state),
    };
    if let Err(e) = result {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// sd-notify connects to filesystem paths only; systemd may hand out an
/// abstract socket.
fn notify_abstract(name: &[u8], state: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.connect_addr(&addr)?;
    let message: String = state.iter().map(|s| format!("{s}\n")).collect();
    socket.send(message.as_bytes())?;
    Ok(())
}

/// Whether both work loops showed progress recently enough for a watchdog ping.
fn loops_alive(
    now_ms: i64,
    scheduler_beat_ms: i64,
    drainer_beat_ms: i64,
    stale_after: Duration,
) -> bool {
    let fresh = |beat: i64| Duration::from_millis((now_ms - beat).max(0) as u64) <= stale_after;
    fresh(scheduler_beat_ms) && fresh(drainer_beat_ms)
}

struct Daemon {
    store: Store,
    auth: Arc<Auth>,
    client: RwLock<Arc<Client>>,
    config: RwLock<Arc<Config>>,
    /// One per business: a pass holds it, so passes of a business never overlap.
    guards: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    passes: TaskTracker,
    stop: CancellationToken,
    sync_slots: Arc<Semaphore>,
    scheduler_beat: Arc<AtomicI64>,
    drain_beat: Arc<AtomicI64>,
    drainer: Arc<Drainer>,
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

    /// Starts a pass unless one of the same business is running (then the
    /// tick is skipped and logged).
    fn start_pass(self: &Arc<Self>, business_id: String, kind: ScanKind) {
        if self.stop.is_cancelled() {
            return;
        }
        let guard = {
            let mut guards = self.guards.lock().unwrap_or_else(|p| p.into_inner());
            guards.entry(business_id.clone()).or_default().clone()
        };
        let Ok(held) = guard.try_lock_owned() else {
            info!(
                business_id,
                kind = kind.as_str(),
                "a pass of this business is still running; this tick is skipped"
            );
            return;
        };
        let me = self.clone();
        self.passes.spawn(async move {
            let _held = held;
            let Ok(_slot) = me.sync_slots.clone().acquire_owned().await else {
                return;
            };
            let config = me.config();
            let settings = PassSettings {
                page_size: config.file.poll.page_size,
                stop_after_unchanged_pages: config.file.poll.stop_after_unchanged_pages,
                accept_missing: false,
            };
            let report = sync_business(
                &me.store,
                &me.client(),
                &business_id,
                kind,
                settings,
                &me.stop,
            )
            .await;
            if !report.is_ok() {
                warn!("{}", report.summary());
            }
            me.send_status().await;
        });
    }

    /// A scheduler (not started) with cron jobs for every enabled business
    /// of `config`, plus the scheduler's heartbeat.
    async fn build_scheduler(self: &Arc<Self>, config: &Config) -> Result<JobScheduler> {
        let scheduler = JobScheduler::new()
            .await
            .context("cannot start the scheduler")?;
        for b in config.businesses.iter().filter(|b| b.enabled) {
            for (expr, kind) in [
                (&b.schedule, ScanKind::Head),
                (&b.full_schedule, ScanKind::Full),
            ] {
                let me = self.clone();
                let id = b.id.clone();
                let job = Job::new_async(expr.as_str(), move |_, _| {
                    let me = me.clone();
                    let id = id.clone();
                    Box::pin(async move { me.start_pass(id, kind) })
                })
                .with_context(|| format!("business {}: cannot schedule `{expr}`", b.id))?;
                scheduler
                    .add(job)
                    .await
                    .context("cannot add a scheduled job")?;
            }
        }
        let beat = self.scheduler_beat.clone();
        let heartbeat = Job::new_async("* * * * * *", move |_, _| {
            let beat = beat.clone();
            Box::pin(async move { beat.store(now_ms(), Ordering::Relaxed) })
        })
        .context("cannot schedule the heartbeat")?;
        scheduler
            .add(heartbeat)
            .await
            .context("cannot add the heartbeat")?;
        Ok(scheduler)
    }

    /// A pass for each enabled business at start (or when added by a reload):
    /// a full scan when it never had one, else a head scan.
    async fn start_initial_passes(self: &Arc<Self>, only: Option<&[String]>) {
        let never = self
            .store
            .call(|c| mirror::never_fully_synced(c))
            .await
            .unwrap_or_default();
        for b in self.config().businesses.iter().filter(|b| b.enabled) {
            if only.is_some_and(|ids| !ids.contains(&b.id)) {
                continue;
            }
            let kind = if never.contains(&b.id) {
                ScanKind::Full
            } else {
                ScanKind::Head
            };
            self.start_pass(b.id.clone(), kind);
        }
    }

    fn spawn_drainer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let drainer = self.drainer.clone();
        tokio::spawn(drainer.run(self.stop.clone(), self.drain_beat.clone()))
    }

    /// Applies a reloaded configuration without a restart. Everything that
    /// can fail is prepared first, so a failure leaves the old configuration
    /// fully in place.
    async fn apply(self: &Arc<Self>, new: Config, scheduler: &mut JobScheduler) -> Result<()> {
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
        let added: Vec<String> = new
            .businesses
            .iter()
            .filter(|b| b.enabled && old.business(&b.id).is_none_or(|o| !o.enabled))
            .map(|b| b.id.clone())
            .collect();
        let next_scheduler = self.build_scheduler(&new).await?;
        let client = Arc::new(Client::with_budget(
            ClientSettings::from_config(&new),
            self.auth.clone(),
            self.client().budget().clone(),
        )?);
        let businesses = new.businesses.clone();
        self.store
            .call(move |c| mirror::upsert_businesses(c, &businesses))
            .await?;

        self.auth.reconfigure(&new);
        if let Ok(mut c) = self.client.write() {
            *c = client.clone();
        }
        self.drainer
            .update(DrainSettings::from_config(&new), client);
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(new);
        }
        let _ = scheduler.shutdown().await;
        *scheduler = next_scheduler;
        scheduler
            .start()
            .await
            .context("cannot start the scheduler")?;
        self.start_initial_passes(Some(&added)).await;
        Ok(())
    }

    /// The one-line summary systemd shows (`STATUS=`).
    async fn send_status(&self) {
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
                Ok((leads, last, reauth, counts))
            })
            .await;
        let line = match line {
            Ok((leads, last, reauth, counts)) => {
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
                format!(
                    "{leads} leads, {last}; outbox: {} pending, {} dead{reauth}",
                    counts.pending + counts.sending,
                    counts.dead
                )
            }
            Err(e) => format!("cannot read the database: {e:#}"),
        };
        notify(&[NotifyState::Status(&line)]);
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
                let (sched, drain) = (
                    self.scheduler_beat.load(Ordering::Relaxed),
                    self.drain_beat.load(Ordering::Relaxed),
                );
                if loops_alive(now_ms(), sched, drain, stale_after) {
                    notify(&[NotifyState::Watchdog]);
                } else {
                    error!(
                        scheduler_idle_ms = now_ms() - sched,
                        drainer_idle_ms = now_ms() - drain,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_loop_withholds_the_watchdog() {
        let stale = Duration::from_secs(3);
        assert!(loops_alive(10_000, 9_000, 9_500, stale));
        assert!(!loops_alive(10_000, 6_000, 9_500, stale), "scheduler stuck");
        assert!(!loops_alive(10_000, 9_900, 1_000, stale), "drainer stuck");
    }
}
