//! SQLite: the only module that writes SQL. One writer thread owns the
//! daemon's connection; readers (sqlite3, Datasette, the CLI) never block it
//! thanks to WAL.

pub mod mirror;
pub mod outbox;
pub mod tokens;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OpenFlags};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// How long a statement waits for another writer (the partner's program, say)
/// before it fails with "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The numbered migrations; `PRAGMA user_version` records the last applied.
fn migrations() -> Vec<(i64, String)> {
    let checks = include_str!("migrations/outbox_checks.sql");
    let v1 = format!(
        "{}\nCREATE TRIGGER outbox_validate_insert BEFORE INSERT ON outbox BEGIN\n{checks}END;\n\
         CREATE TRIGGER outbox_validate_update BEFORE UPDATE OF negotiation_id, business_id, status, \
         partner_status_changed_at, invoice_amount_in_cents ON outbox BEGIN\n{checks}END;\n",
        include_str!("migrations/0001_initial.sql")
    );
    vec![
        (1, v1),
        (
            2,
            include_str!("migrations/0002_lead_shapes.sql").to_string(),
        ),
    ]
}

/// The schema version this binary writes.
pub fn schema_version() -> i64 {
    migrations().last().map(|(v, _)| *v).unwrap_or(0)
}

/// Opens (creating if `create`) the mirror with leadsync's settings and
/// applies pending migrations.
pub fn open_connection(path: &Path, create: bool) -> Result<Connection> {
    if !create && !path.exists() {
        bail!(
            "database {} does not exist yet: it is created by `leadsync run`, `sync`, `drain` or `enqueue`",
            path.display()
        );
    }
    if create
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        bail!(
            "cannot create database {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .with_context(|| format!("cannot switch {} to WAL mode", path.display()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "database {} refused WAL mode (journal_mode is {mode})",
            path.display()
        );
    }
    // A checkpoint every 10,000 pages (about 40 MB of WAL) rather than
    // SQLite's 1,000: a first full sync rewrites the same index pages many
    // times, and checkpointing them ten times as often made it 40% slower
    // (README, "Performance"). The WAL file is trimmed back to 64 MB after.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 10000;
         PRAGMA journal_size_limit = 67108864;",
    )?;
    migrate(&mut conn).with_context(|| format!("cannot migrate database {}", path.display()))?;
    Ok(conn)
}

/// Applies every migration newer than the database's `user_version`.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let latest = schema_version();
    if current > latest {
        bail!(
            "the database has schema version {current}, newer than this leadsync knows ({latest}); \
             run a newer leadsync"
        );
    }
    for (version, sql) in migrations() {
        if version <= current {
            continue;
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now >= version {
            continue;
        }
        tx.execute_batch(&sql)
            .with_context(|| format!("migration {version} failed"))?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The daemon's handle on the mirror: every statement runs on one writer
/// thread that owns the connection, never on an async worker.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl Store {
    /// Opens the mirror (creating and migrating it) and starts its writer thread.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = open_connection(path, true)?;
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("leadsync-db".into())
            .spawn(move || {
                for job in rx {
                    // A panic in one job must not take the writer down with it.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut conn)));
                }
            })
            .context("cannot start the database thread")?;
        Ok(Store {
            jobs,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread and waits for its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Connection) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| anyhow!("the database thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the database thread stopped before answering (a bug)"))?
    }
}

/// An exclusive hold on a database for one leadsync process that sends
/// requests (`run`, `sync`, `drain`): two of them would reset each other's
/// in-flight rows and race for single-use refresh tokens.
pub struct ProcessLock {
    _file: File,
}

impl ProcessLock {
    /// Takes the lock next to the database (`<database>.lock`) or says who holds it.
    pub fn acquire(database: &Path) -> Result<ProcessLock> {
        let mut name = database.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another leadsync process (pid {}) is running against {}; \
                     `leadsync run` already syncs and drains on schedule — stop it first to run this by hand",
                    holder.trim(),
                    database.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        use std::io::Write;
        (&file).write_all(std::process::id().to_string().as_bytes())?;
        Ok(ProcessLock { _file: file })
    }
}

/// True when SQLite gave up waiting for another connection's lock.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Maps a SQLite error from a write by the outbox's triggers or constraints
/// to its message alone (`outbox: status must be ...`).
pub fn constraint_message(e: &rusqlite::Error) -> Option<String> {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg))
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Some(msg.clone())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        drop(open_connection(&path, true).unwrap());
        let conn = open_connection(&path, true).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema_version());
    }

    #[test]
    fn version_2_back_fills_the_columns_of_both_shapes_from_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v1.db")).unwrap();
        let (_, v1) = migrations().remove(0);
        conn.execute_batch(&v1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let schema = r#"{"negotiationID":"1","createdAt":"2026-01-01T00:00:00Z",
            "request":{"category":{"name":"Plumbing"},"location":{"city":"Austin","zipCode":"78701"}},
            "customer":{"firstName":"Zoë","lastName":"Ø.","phone":"+1 555 0100"},
            "leadPrice":"$25.00","chargeState":"Charged"}"#;
        let docs = r#"{"negotiationID":"2","category":{"name":"Roofing"},
            "customer":{"displayName":"Ann B.","location":{"city":"Reno","zipCode":"89501"}}}"#;
        let only_first =
            r#"{"negotiationID":"3","customer":{"firstName":"李雷","lastName":""},"leadPrice":25}"#;
        for (id, payload) in [("1", schema), ("2", docs), ("3", only_first)] {
            conn.execute(
                "INSERT INTO negotiations (negotiation_id, business_id, payload, payload_hash,
                     first_seen_at, last_seen_at, changed_at)
                 VALUES (?1, 'b', ?2, 0, 't', 't', 't')",
                [id, payload],
            )
            .unwrap();
        }
        migrate(&mut conn).unwrap();
        let row = |id: &str| -> [Option<String>; 7] {
            conn.query_row(
                "SELECT category, customer_name, city, zip, customer_phone, lead_price, charge_state
                   FROM negotiations WHERE negotiation_id = ?1",
                [id],
                |r| {
                    Ok([
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ])
                },
            )
            .unwrap()
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            row("1"),
            [
                s("Plumbing"),
                s("Zoë Ø."),
                s("Austin"),
                s("78701"),
                s("+1 555 0100"),
                s("$25.00"),
                s("Charged")
            ]
        );
        assert_eq!(
            row("2"),
            [
                s("Roofing"),
                s("Ann B."),
                s("Reno"),
                s("89501"),
                None,
                None,
                None
            ]
        );
        assert_eq!(row("3"), [None, s("李雷"), None, None, None, s("25"), None]);
        // The same columns as the wire module fills from the same payloads.
        for (id, payload) in [("1", schema), ("2", docs), ("3", only_first)] {
            let lead = crate::thumbtack::model::parse_lead_body(payload).unwrap();
            let cols = row(id);
            assert_eq!(
                [
                    lead.category,
                    lead.customer_name,
                    lead.city,
                    lead.zip,
                    lead.customer_phone,
                    lead.lead_price,
                    lead.charge_state
                ],
                cols,
                "lead {id}"
            );
        }
        let typ: String = conn
            .query_row(
                "SELECT typeof(lead_price) FROM negotiations WHERE negotiation_id = '3'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(typ, "text");
    }
}
