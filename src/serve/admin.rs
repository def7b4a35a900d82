//! The admin listener (`[admin] listen`, SPEC §10): `GET /metrics` in the
//! Prometheus text format, `GET /healthz` (200 while the scheduler and the
//! drainer loops beat, the database syncs to disk, and the mirror's and the
//! token store's paths name the files opened and take writes, else 503 with
//! the reason), `GET /readyz` (200 once the mirror is open and migrated, 503
//! while stopping, when the mirror cannot be read, or once a sync to disk
//! failed: webhook deliveries are refused until a restart).

use crate::config::Config;
use crate::store;
use crate::time::Heartbeat;
use anyhow::Result;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What `/healthz` and `/readyz` look at.
#[derive(Debug)]
pub struct Health {
    /// The scheduler loop's heartbeat.
    pub scheduler_beat: Arc<Heartbeat>,
    /// The drainer loop's heartbeat.
    pub drain_beat: Arc<Heartbeat>,
    /// A loop silent for longer is stuck.
    pub stale_after: Duration,
    /// Cancelled when the daemon starts shutting down.
    pub stopping: CancellationToken,
    /// Why the last reading of the mirror failed, if it did.
    pub mirror_error: Mutex<Option<String>>,
    /// Whether a sync of the database to disk has failed (then webhook
    /// deliveries are refused until restart); `None`: not watched.
    pub disk: Option<store::DurableSyncWatch>,
    /// The mirror's file as opened, to tell when it is removed or replaced
    /// under the daemon; `None`: not watched.
    pub database: Option<DatabaseFile>,
    /// Whether the daemon's writes to the mirror fail for want of storage;
    /// `None`: not watched.
    pub writes: Option<store::WriteWatch>,
    /// Whether the daemon's writes to the token store fail for want of
    /// storage; `None`: not watched (no token store open at the start).
    pub token_writes: Option<store::WriteWatch>,
}

/// The mirror's path and the file (device, inode) it named when the
/// daemon opened it.
#[derive(Debug)]
pub struct DatabaseFile {
    path: PathBuf,
    id: (u64, u64),
    /// How the file the path names is told (stat(2); a hook in tests).
    look: fn(&std::path::Path) -> std::io::Result<(u64, u64)>,
    /// How long `/healthz` waits for that before it answers 503.
    within: Duration,
    /// The look under way (perhaps hung on the storage), if one is.
    looking: Arc<Mutex<Option<Look>>>,
    /// The token store's path and the file it named when opened, looked
    /// at with the mirror's (one look at a time for both); `None`: not
    /// watched.
    tokens: Option<(PathBuf, (u64, u64))>,
}

/// A look at the database file under way: when it started, and its answer
/// once it has one (`Some(problem)`; the sender dropped with none: it
/// panicked, which says nothing either way).
#[derive(Debug)]
struct Look {
    started: std::time::Instant,
    answer: tokio::sync::watch::Receiver<Option<Option<String>>>,
}

/// The (device, inode) `path` names now.
fn file_id(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl DatabaseFile {
    /// The file `path` names now, and the token store's as it was opened.
    pub fn of(
        path: &std::path::Path,
        tokens: Option<&store::tokens::TokenWatch>,
    ) -> std::io::Result<DatabaseFile> {
        Ok(DatabaseFile {
            path: path.to_path_buf(),
            id: file_id(path)?,
            look: file_id,
            within: Duration::from_secs(2),
            looking: Arc::default(),
            tokens: tokens.and_then(|t| Some((t.path.clone(), t.opened?))),
        })
    }

    /// Why the path no longer names the file opened, if it does not (a
    /// path that cannot be looked at says nothing either way).
    fn problem(&self) -> Option<String> {
        Self::problem_of(&self.path, self.id, self.look, self.tokens.as_ref())
    }

    /// The mirror's problem and the token store's, if any.
    fn problem_of(
        path: &std::path::Path,
        id: (u64, u64),
        look: fn(&std::path::Path) -> std::io::Result<(u64, u64)>,
        tokens: Option<&(PathBuf, (u64, u64))>,
    ) -> Option<String> {
        let problems: Vec<String> = Self::mirror_problem(path, id, look)
            .into_iter()
            .chain(
                tokens.and_then(|(path, id)| store::tokens::moved_problem(path, *id, look(path))),
            )
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    fn mirror_problem(
        path: &std::path::Path,
        id: (u64, u64),
        look: fn(&std::path::Path) -> std::io::Result<(u64, u64)>,
    ) -> Option<String> {
        let now = match look(path) {
            Ok(now) => Some(now),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(_) => return None,
        };
        (now != Some(id)).then(|| {
            format!(
                "the database file {} was removed or replaced while leadsync runs: leadsync \
                 still writes the file it opened, which no other program sees and which is lost \
                 when leadsync stops, and outbox rows written to a new file are never read; put \
                 the file back, or restart leadsync to open what is there now",
                path.display()
            )
        })
    }

    /// [`DatabaseFile::problem`] off the async workers: a stat(2) on hung
    /// storage (a dead NFS server, a failing disk) blocks, and would tie up
    /// a worker per probe. One look at a time: a probe that arrives while
    /// one is under way waits for that look's answer (two monitors probing
    /// together both get it); a look that has not answered within `within`
    /// of its start is a problem itself, for the probe that started it and
    /// for every later one until it returns.
    async fn problem_promptly(&self) -> Option<String> {
        let hung = || {
            let tokens = match &self.tokens {
                Some((path, _)) => format!(" (or the token store {})", path.display()),
                None => String::new(),
            };
            format!(
                "the database file {}{tokens} could not be looked at within {:.1} s: the storage \
                 that holds it may hang, and writes to it with it",
                self.path.display(),
                self.within.as_secs_f64()
            )
        };
        let (started, mut answer) = {
            let mut looking = self.looking.lock().unwrap_or_else(|p| p.into_inner());
            match looking.as_ref() {
                Some(look) => (look.started, look.answer.clone()),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let started = std::time::Instant::now();
                    *looking = Some(Look {
                        started,
                        answer: rx.clone(),
                    });
                    let (path, id, look, slot, tokens) = (
                        self.path.clone(),
                        self.id,
                        self.look,
                        self.looking.clone(),
                        self.tokens.clone(),
                    );
                    // Not awaited: a look that hangs is left to finish (or
                    // never), and marks the file as hung meanwhile.
                    drop(tokio::task::spawn_blocking(move || {
                        /// Clears the mark however the look ends, a panic
                        /// included: else every later probe answered 503
                        /// until a restart.
                        struct Done(Arc<Mutex<Option<Look>>>);
                        impl Drop for Done {
                            fn drop(&mut self) {
                                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            }
                        }
                        let _done = Done(slot);
                        let _ = tx.send(Some(Self::problem_of(&path, id, look, tokens.as_ref())));
                    }));
                    (started, rx)
                }
            }
        };
        let left = self.within.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, answer.wait_for(Option::is_some)).await {
            Ok(Ok(problem)) => problem.clone().flatten(),
            // A look that panicked says nothing either way.
            Ok(Err(_)) => None,
            Err(_) => Some(hung()),
        }
    }
}

/// What `/healthz`, `status` and the log say once a sync of the database
/// to disk has failed ([`store::Store::durable_sync_failure`]).
pub fn disk_failure_message(why: &str) -> String {
    format!(
        "the database could not be synced to disk ({why}): every webhook delivery is answered \
         503 and recent writes may not survive a power cut until leadsync is restarted; check \
         the disk and the log (journalctl -u leadsync), then restart it"
    )
}

impl Health {
    /// Why durable writes fail until restart, once a sync to disk failed.
    pub fn disk_failure(&self) -> Option<String> {
        self.disk.as_ref().and_then(|d| d.failure())
    }

    /// `None` while both loops beat and the database syncs to disk, else why not.
    pub fn problem(&self) -> Option<String> {
        self.problem_with(self.database.as_ref().and_then(DatabaseFile::problem))
    }

    /// [`Health::problem`], with the database file looked at off the async
    /// workers ([`DatabaseFile::problem_promptly`]).
    async fn problem_promptly(&self) -> Option<String> {
        let database = match &self.database {
            Some(file) => file.problem_promptly().await,
            None => None,
        };
        self.problem_with(database)
    }

    fn problem_with(&self, database: Option<String>) -> Option<String> {
        let mut stuck = Vec::new();
        if let Some(why) = self.disk_failure() {
            stuck.push(disk_failure_message(&why));
        }
        if let Some(why) = database {
            stuck.push(why);
        }
        if let Some((why, since)) = self.writes.as_ref().and_then(store::WriteWatch::failure) {
            stuck.push(format!(
                "writes to the database fail ({why}) for {:.1} s: no pass, send or webhook \
                 delivery is recorded; check the disk that holds it (full? read-only?)",
                since.as_secs_f64()
            ));
        }
        if let Some((why, since)) = self
            .token_writes
            .as_ref()
            .and_then(store::WriteWatch::failure)
        {
            stuck.push(format!(
                "writes to the token store fail ({why}) for {:.1} s: a rotated refresh token \
                 that cannot be stored is held in memory only, and no other refresh of its grant \
                 starts; check the disk that holds the token store (full? read-only?)",
                since.as_secs_f64()
            ));
        }
        for (name, beat) in [
            ("scheduler", &self.scheduler_beat),
            ("drainer", &self.drain_beat),
        ] {
            let idle = beat.idle();
            if idle > self.stale_after {
                stuck.push(format!(
                    "the {name} loop has not beaten for {:.1} s (limit {:.1} s)",
                    idle.as_secs_f64(),
                    self.stale_after.as_secs_f64()
                ));
            }
        }
        (!stuck.is_empty()).then(|| stuck.join("; "))
    }
}

/// The router of the admin listener.
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

async fn metrics(State(health): State<Arc<Health>>, headers: HeaderMap) -> Response {
    crate::metrics::set_disk_sync_failed(health.disk_failure().is_some());
    // OpenMetrics only for a scraper that asks for it; Prometheus text otherwise.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let body = crate::metrics::encode(openmetrics);
    let content_type = if openmetrics {
        crate::metrics::OPENMETRICS_CONTENT_TYPE
    } else {
        crate::metrics::PROMETHEUS_CONTENT_TYPE
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz(State(health): State<Arc<Health>>) -> Response {
    match health.problem_promptly().await {
        None => (
            StatusCode::OK,
            "ok: the scheduler and the drainer loops beat\n",
        )
            .into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if health.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready: stopping\n").into_response();
    }
    // Webhook deliveries are refused until a restart: a proxy or load
    // balancer should route them elsewhere.
    if let Some(why) = health.disk_failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", disk_failure_message(&why)),
        )
            .into_response();
    }
    // Nor can a delivery be stored while writes fail.
    if let Some((why, _)) = health.writes.as_ref().and_then(store::WriteWatch::failure) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: writes to the database fail ({why})\n"),
        )
            .into_response();
    }
    let mirror_error = health
        .mirror_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    match mirror_error {
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the mirror cannot be read: {e}\n"),
        )
            .into_response(),
        None => (StatusCode::OK, "ready\n").into_response(),
    }
}

/// A running admin listener and its table-gauge refresher.
pub struct Admin {
    health: Arc<Health>,
    stop: CancellationToken,
    /// Fires when the listener's thread has stopped serving.
    server: tokio::sync::oneshot::Receiver<()>,
    refresher: tokio::task::JoinHandle<()>,
    /// Where it listens.
    local: std::net::SocketAddr,
}

/// Serves `router` on a thread of its own (a one-thread runtime), so that a
/// scrape or a health probe never queues behind the daemon's busy workers
/// (a first full sync parses pages on all of them), until `stop`.
fn serve_on_own_thread(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: CancellationToken,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("leadsync-admin".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the admin listener's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        super::serve(listener, router, stop, super::ServeOptions::default()).await
                    }
                    Err(e) => tracing::error!(error = %e, "admin listener failed"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok(done_rx)
}

impl Admin {
    /// Binds `[admin] listen` (when set), reads the table gauges once, and
    /// starts serving. A listen address that cannot be bound is an error.
    pub async fn start(
        config: &Config,
        database: PathBuf,
        scheduler_beat: Arc<Heartbeat>,
        drain_beat: Arc<Heartbeat>,
        disk: Option<store::DurableSyncWatch>,
        writes: Option<store::WriteWatch>,
        tokens: Option<store::tokens::TokenWatch>,
    ) -> Result<Option<Admin>> {
        let Some(addr) = config.admin_listen else {
            return Ok(None);
        };
        let listener = super::bind(addr, "admin.listen").await?;
        let database_file = DatabaseFile::of(&database, tokens.as_ref())
            .map_err(|e| warn!(error = %e, database = %database.display(), "cannot watch the database file for /healthz"))
            .ok();
        let stale_after = Duration::from_secs_f64(config.file.admin.stale_after_secs);
        let token_writes = tokens.map(|t| t.writes);
        for writes in writes.iter().chain(&token_writes) {
            // A failure of writes is cleared once they have worked for as
            // long as a loop may be silent, at most 30 s.
            writes.set_quiet(stale_after.min(store::WRITES_QUIET));
        }
        let health = Arc::new(Health {
            database: database_file,
            writes,
            token_writes,
            scheduler_beat,
            drain_beat,
            stale_after,
            stopping: CancellationToken::new(),
            mirror_error: Mutex::new(None),
            disk,
        });
        let stop = CancellationToken::new();
        let every = Duration::from_secs_f64(config.file.admin.refresh_secs);
        let mut reader = TableReader::new(database);
        reader.refresh(&health).await;
        let refresher = {
            let (health, stop) = (health.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => reader.refresh(&health).await,
                    }
                }
            })
        };
        let local = listener.local_addr().unwrap_or(addr);
        let server = serve_on_own_thread(listener, router(health.clone()), stop.clone())?;
        info!(listen = %local, "admin listener: /metrics, /healthz, /readyz");
        Ok(Some(Admin {
            health,
            stop,
            server,
            refresher,
            local,
        }))
    }

    /// The address it is bound to (with port 0 configured, the one the system chose).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// Shutdown has begun: `/readyz` answers 503 from now on.
    pub fn stopping(&self) {
        self.health.stopping.cancel();
    }

    /// Stops serving (open connections get a second to finish).
    pub async fn stop(self) {
        self.stopping();
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.server).await;
        self.refresher.abort();
    }
}

/// Reads the table gauges through its own read connection (WAL: it never
/// waits for the daemon's writer, nor holds it up).
struct TableReader {
    database: PathBuf,
    conn: Option<rusqlite::Connection>,
}

impl TableReader {
    fn new(database: PathBuf) -> TableReader {
        TableReader {
            database,
            conn: None,
        }
    }

    async fn refresh(&mut self, health: &Health) {
        let database = self.database.clone();
        let conn = self.conn.take();
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(c) => c,
                None => store::open_connection(&database, false)?,
            };
            let gauges = store::gauges::read(&mut conn);
            Ok::<_, anyhow::Error>((conn, gauges))
        })
        .await;
        let error = match result {
            Ok(Ok((conn, Ok(gauges)))) => {
                self.conn = Some(conn);
                crate::metrics::set_tables(gauges);
                None
            }
            // A failed reading drops the connection: the next one starts afresh.
            Ok(Ok((_, Err(e)))) | Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) => Some(format!("the reading task failed: {e}")),
        };
        if let Some(e) = &error {
            warn!(error = %e, "cannot read the mirror for the metrics");
        }
        *health
            .mirror_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a failed sync to disk every webhook delivery is 503 until a
    /// restart: `/healthz` must say so (the daemon cannot accept them), and
    /// `/metrics` too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_disk_sync_turns_healthz_503_and_the_metric_1() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let store = store::Store::open(&dir.path().join("m.db")).unwrap();
        let health = Arc::new(Health {
            scheduler_beat: Arc::new(Heartbeat::new()),
            drain_beat: Arc::new(Heartbeat::new()),
            stale_after: Duration::from_secs(3600),
            stopping: CancellationToken::new(),
            mirror_error: Mutex::new(None),
            disk: Some(store.durable_sync_watch()),
            database: None,
            writes: None,
            token_writes: None,
        });
        let get = |path: &'static str| {
            let health = health.clone();
            async move {
                let resp = router(health)
                    .oneshot(
                        axum::http::Request::get(path)
                            .body(axum::body::Body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = resp.status();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        assert_eq!(get("/healthz").await.0, StatusCode::OK);
        store.on_wal_sync_result(|| Err(std::io::Error::other("EIO (injected)")));
        let r = store
            .call_urgent_durable(|c| Ok(c.execute("DELETE FROM sync_requests", [])?))
            .await;
        assert!(r.is_err(), "the injected sync failure did not fail");
        let (status, body) = get("/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("could not be synced to disk") && body.contains("EIO (injected)"),
            "{body}"
        );
        // Nothing should be routed to a daemon that refuses deliveries.
        let (status, body) = get("/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("could not be synced to disk"), "{body}");
        let (_, metrics) = get("/metrics").await;
        assert!(
            metrics.lines().any(|l| l == "leadsync_disk_sync_failed 1"),
            "{metrics}"
        );
    }

    /// A stat(2) of the database file that hangs (a dead NFS server, a
    /// failing disk) ran on the async worker answering `/healthz`: each
    /// probe tied up a worker until the storage answered, and the probe
    /// itself got no answer. Now it is looked at off the workers, one look
    /// at a time, and `/healthz` answers 503 at once when it hangs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_answers_503_promptly_while_the_database_file_cannot_be_looked_at() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        static RELEASE: AtomicBool = AtomicBool::new(false);
        static LOOKS: AtomicUsize = AtomicUsize::new(0);
        fn hung(_: &std::path::Path) -> std::io::Result<(u64, u64)> {
            LOOKS.fetch_add(1, Ordering::SeqCst);
            // Bounded, so that a look made on a worker fails the test
            // rather than hangs it.
            let end = std::time::Instant::now() + Duration::from_secs(8);
            while !RELEASE.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((1, 1))
        }
        let health = health_looking_with("/hung/m.db", hung, Duration::from_millis(200));
        let probe = healthz_probe;
        let mut answers = Vec::new();
        for _ in 0..2 {
            let answer = tokio::time::timeout(Duration::from_secs(5), probe(health.clone())).await;
            answers.push(answer);
        }
        RELEASE.store(true, Ordering::SeqCst);
        for answer in answers {
            let (status, body) = answer.expect("healthz answers within 5 s").unwrap();
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
            assert!(
                body.contains("/hung/m.db could not be looked at within 0.2 s"),
                "{body}"
            );
        }
        assert_eq!(LOOKS.load(Ordering::SeqCst), 1, "one look at a time");
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = probe(health.clone()).await.unwrap();
            if status == StatusCode::OK {
                break;
            }
            assert!(std::time::Instant::now() < end, "never 200 again: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The token store moved aside under a running daemon (`mv private
    /// private.old`) or failing writes for storage left `/healthz` 200:
    /// rotated tokens went into the moved file, and the next start found
    /// an empty store. `/healthz` names both now; `/readyz` (can webhook
    /// deliveries be stored?) does not depend on the token store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_names_a_token_store_moved_aside_or_failing_writes() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let mirror = dir.path().join("m.db");
        std::fs::write(&mirror, b"").unwrap();
        let private = dir.path().join("private");
        let tokens = store::tokens::TokenStore::open(&private.join("tokens.db")).unwrap();
        let watch = tokens.watch();
        watch.writes.set_quiet(Duration::ZERO);
        let health = Arc::new(Health {
            scheduler_beat: Arc::new(Heartbeat::new()),
            drain_beat: Arc::new(Heartbeat::new()),
            stale_after: Duration::from_secs(3600),
            stopping: CancellationToken::new(),
            mirror_error: Mutex::new(None),
            disk: None,
            database: Some(DatabaseFile::of(&mirror, Some(&watch)).unwrap()),
            writes: None,
            token_writes: Some(watch.writes.clone()),
        });
        let get = |path: &'static str| {
            let health = health.clone();
            async move {
                let resp = router(health)
                    .oneshot(
                        axum::http::Request::get(path)
                            .body(axum::body::Body::empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = resp.status();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        // A probe right after a look may still share that look's answer:
        // `/healthz` until it answers `want`.
        let healthz = |want: StatusCode| {
            let get = &get;
            async move {
                let end = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let (status, body) = get("/healthz").await;
                    if status == want {
                        return body;
                    }
                    assert!(std::time::Instant::now() < end, "never {want}: {body}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        assert_eq!(get("/healthz").await.0, StatusCode::OK);
        assert_eq!(get("/readyz").await.0, StatusCode::OK);
        std::fs::rename(&private, dir.path().join("private.old")).unwrap();
        let body = healthz(StatusCode::SERVICE_UNAVAILABLE).await;
        assert!(
            body.contains("token store") && body.contains("tokens.db"),
            "{body}"
        );
        // Webhook deliveries are still stored: not a reason to route them away.
        assert_eq!(get("/readyz").await.0, StatusCode::OK);
        std::fs::rename(dir.path().join("private.old"), &private).unwrap();
        healthz(StatusCode::OK).await;
        tokens.set_query_only(true);
        let write = store::tokens::GrantWrite {
            refresh_token: crate::secret::Secret::new("r"),
            access_token: None,
            seed_sha256: None,
            source: "refresh".into(),
        };
        assert!(tokens.put("g", 0, &write).is_err());
        let (status, body) = get("/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("token store"), "{body}");
        assert_eq!(get("/readyz").await.0, StatusCode::OK);
        tokens.set_query_only(false);
        assert!(tokens.put("g", 0, &write).is_ok());
        healthz(StatusCode::OK).await;
    }

    /// `/healthz` on a `Health` whose only problem could be the database file.
    fn healthz_probe(health: Arc<Health>) -> tokio::task::JoinHandle<(StatusCode, String)> {
        use tower::ServiceExt;
        tokio::spawn(async move {
            let resp = router(health)
                .oneshot(
                    axum::http::Request::get("/healthz")
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }

    fn health_looking_with(
        path: &str,
        look: fn(&std::path::Path) -> std::io::Result<(u64, u64)>,
        within: Duration,
    ) -> Arc<Health> {
        Arc::new(Health {
            scheduler_beat: Arc::new(Heartbeat::new()),
            drain_beat: Arc::new(Heartbeat::new()),
            stale_after: Duration::from_secs(3600),
            stopping: CancellationToken::new(),
            mirror_error: Mutex::new(None),
            disk: None,
            database: Some(DatabaseFile {
                path: PathBuf::from(path),
                id: (1, 1),
                look,
                within,
                looking: Arc::default(),
                tokens: None,
            }),
            writes: None,
            token_writes: None,
        })
    }

    /// Two monitors probing at once: the second probe, arriving while the
    /// first one's look (well within the limit) was under way, was answered
    /// 503 "could not be looked at" at once. It shares that look instead.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_healthz_probes_of_a_healthy_daemon_all_answer_200() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        fn slowish(_: &std::path::Path) -> std::io::Result<(u64, u64)> {
            MOST.fetch_max(NOW.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            // A slow but healthy stat: far below the limit.
            std::thread::sleep(Duration::from_millis(30));
            NOW.fetch_sub(1, Ordering::SeqCst);
            Ok((1, 1))
        }
        let health = health_looking_with("/slowish/m.db", slowish, Duration::from_secs(5));
        let probes: Vec<_> = (0..32).map(|_| healthz_probe(health.clone())).collect();
        for probe in probes {
            let (status, body) = probe.await.unwrap();
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        assert_eq!(MOST.load(Ordering::SeqCst), 1, "one look at a time");
    }

    /// A look that panics after the probe that started it gave up left the
    /// "a look is under way" mark set for good: 503 until a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_look_that_panics_after_its_probe_gave_up_does_not_block_later_ones() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        static RELEASE: AtomicBool = AtomicBool::new(false);
        static LOOKS: AtomicUsize = AtomicUsize::new(0);
        fn hangs_then_panics(_: &std::path::Path) -> std::io::Result<(u64, u64)> {
            if LOOKS.fetch_add(1, Ordering::SeqCst) > 0 {
                return Ok((1, 1));
            }
            let end = std::time::Instant::now() + Duration::from_secs(8);
            while !RELEASE.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("the look panics (injected)");
        }
        let health = health_looking_with(
            "/panics/m.db",
            hangs_then_panics,
            Duration::from_millis(100),
        );
        let (status, body) = healthz_probe(health.clone()).await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("could not be looked at"), "{body}");
        RELEASE.store(true, Ordering::SeqCst);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = healthz_probe(health.clone()).await.unwrap();
            if status == StatusCode::OK {
                break;
            }
            assert!(std::time::Instant::now() < end, "never 200 again: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Staleness is read on the monotonic clock: tokio's paused clock
    /// advances it while the wall clock barely moves, as when NTP steps the
    /// wall clock back by as much as the loop has been stuck (on the wall
    /// clock the drainer would look fresh, the scheduler too).
    #[tokio::test(start_paused = true)]
    async fn a_silent_loop_is_named_on_the_monotonic_clock() {
        let h = Health {
            scheduler_beat: Arc::new(Heartbeat::new()),
            drain_beat: Arc::new(Heartbeat::new()),
            stale_after: Duration::from_secs(3),
            stopping: CancellationToken::new(),
            mirror_error: Mutex::new(None),
            disk: None,
            database: None,
            writes: None,
            token_writes: None,
        };
        assert_eq!(h.problem(), None);
        tokio::time::advance(Duration::from_millis(2_500)).await;
        h.scheduler_beat.beat();
        assert_eq!(h.problem(), None);
        tokio::time::advance(Duration::from_millis(4_000)).await;
        h.scheduler_beat.beat();
        let why = h.problem().expect("the drainer is stale");
        assert!(
            why.contains("drainer loop has not beaten for 6.5 s"),
            "{why}"
        );
        assert!(!why.contains("scheduler"), "{why}");
        h.drain_beat.beat();
        assert_eq!(h.problem(), None);
    }
}
